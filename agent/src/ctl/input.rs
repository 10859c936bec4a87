//! netfaultctl's input side: reading a fault file and validating it locally,
//! so that a bad file is rejected with the offending field named and nothing
//! is sent to the agent.

use std::fmt;

use netfault_api::{FaultSpec, FieldError, Limits};
use serde_json::Value;

/// One fault read from a file, validated, with the name it is reported under
/// (`faults[1]` in a list, `fault` for a lone object).
#[derive(Debug, Clone)]
pub struct Item {
    pub label: String,
    pub value: Value,
}

/// Why a fault file was rejected before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// Not JSON at all.
    Syntax(String),
    /// Neither an object nor an array of objects, or an empty array.
    Shape(String),
    /// A fault failed validation; `field` is the full path (`faults[1].action.percent`).
    Invalid { field: String, message: String },
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::Syntax(m) => write!(f, "not valid JSON: {m}"),
            InputError::Shape(m) => write!(f, "{m}"),
            InputError::Invalid { field, message } if field.is_empty() => write!(f, "{message}"),
            InputError::Invalid { field, message } => write!(f, "{field}: {message}"),
        }
    }
}

impl std::error::Error for InputError {}

fn invalid(e: FieldError) -> InputError {
    InputError::Invalid {
        field: e.field,
        message: e.message,
    }
}

/// Parses the text of a fault file: one fault object, or a JSON array of them.
/// Every fault is validated with the same rules as the agent before any is
/// returned, so either all are good or none is sent.
pub fn parse_faults(text: &str) -> Result<Vec<Item>, InputError> {
    if text.trim().is_empty() {
        return Err(InputError::Shape(
            "the input is empty; expected a fault object or a JSON array of faults".into(),
        ));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| InputError::Syntax(e.to_string()))?;
    let limits = Limits::default();
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(InputError::Shape(
                    "the array holds no faults; nothing to apply".into(),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let label = format!("faults[{i}]");
                FaultSpec::parse(&item, &limits).map_err(|e| invalid(e.prefixed(&label)))?;
                out.push(Item { label, value: item });
            }
            Ok(out)
        }
        Value::Object(_) => {
            FaultSpec::parse(&v, &limits).map_err(invalid)?;
            Ok(vec![Item {
                label: "fault".into(),
                value: v,
            }])
        }
        _ => Err(InputError::Shape(
            "expected a fault object or a JSON array of faults".into(),
        )),
    }
}

/// Percent-encodes an id for use as one path segment, so an id can never
/// reach another endpoint (`../healthz`, `a/b`).
pub fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        r#"{"target": {"sandbox": "abc"}, "action": {"type": "blackhole"}, "duration": "1m"}"#;

    #[test]
    fn single_object_is_one_item() {
        let items = parse_faults(GOOD).expect("valid");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].label, "fault");
        assert_eq!(items[0].value["action"]["type"], "blackhole");
    }

    #[test]
    fn array_items_keep_their_order_and_labels() {
        let text = format!(
            r#"[{GOOD}, {{"target": {{"pod": {{"name": "web"}}}}, "action": {{"type": "loss", "percent": 30}}, "duration": "5m"}}]"#
        );
        let items = parse_faults(&text).expect("valid");
        let labels: Vec<&str> = items.iter().map(|i| i.label.as_str()).collect();
        assert_eq!(labels, ["faults[0]", "faults[1]"]);
        assert_eq!(items[1].value["action"]["percent"], 30);
    }

    #[test]
    fn bad_item_in_array_names_index_and_field() {
        let text = format!(
            r#"[{GOOD}, {{"target": {{"sandbox": "x"}}, "action": {{"type": "loss", "percent": 130}}, "duration": "5m"}}]"#
        );
        let e = parse_faults(&text).expect_err("percent out of range");
        match &e {
            InputError::Invalid { field, .. } => assert_eq!(field, "faults[1].action.percent"),
            other => panic!("unexpected {other:?}"),
        }
        let shown = e.to_string();
        assert!(
            shown.starts_with("faults[1].action.percent: must be from 0 to 100"),
            "{shown}"
        );
    }

    #[test]
    fn bad_single_object_names_field() {
        let e = parse_faults(r#"{"target": {"sandbox": "x"}, "action": {"type": "blackhole"}}"#)
            .expect_err("no duration");
        assert_eq!(e.to_string(), "duration: is required");
        let e = parse_faults(
            r#"{"target": {"sandbox": "x"}, "match": {"cidr": "10.0.0.0/99"}, "action": {"type": "blackhole"}, "duration": "1s"}"#,
        )
        .expect_err("bad cidr");
        assert!(e.to_string().starts_with("match.cidr: "), "{e}");
    }

    #[test]
    fn non_object_item_is_named() {
        let e = parse_faults(&format!("[{GOOD}, 7]")).expect_err("7 is not a fault");
        assert_eq!(
            e,
            InputError::Invalid {
                field: "faults[1]".into(),
                message: "a fault must be a JSON object".into()
            }
        );
    }

    #[test]
    fn shape_and_syntax_errors() {
        assert!(matches!(parse_faults(""), Err(InputError::Shape(_))));
        assert!(matches!(parse_faults("[]"), Err(InputError::Shape(_))));
        assert!(matches!(parse_faults("42"), Err(InputError::Shape(_))));
        assert!(matches!(
            parse_faults("{\"target\":"),
            Err(InputError::Syntax(_))
        ));
        assert!(matches!(
            parse_faults("target: {sandbox: x}"),
            Err(InputError::Syntax(_))
        ));
    }

    #[test]
    fn ids_are_escaped_into_one_segment() {
        assert_eq!(path_segment("f-1a2b"), "f-1a2b");
        assert_eq!(path_segment("a/b"), "a%2Fb");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("x y?"), "x%20y%3F");
    }
}
