//! CNI version negotiation.

use serde_json::{json, Value};

/// The CNI spec versions this plugin speaks, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version, used when the input names none we can use.
pub const LATEST: &str = "1.1.0";

/// Parses `MAJOR.MINOR.PATCH`.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

pub fn is_supported(v: &str) -> bool {
    SUPPORTED.contains(&v)
}

/// `v >= min`; false when either does not parse.
pub fn at_least(v: &str, min: &str) -> bool {
    match (parse(v), parse(min)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// The version to answer in: the input's `cniVersion` when we support it, else [`LATEST`].
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| is_supported(v))
        .unwrap_or_else(|| LATEST.to_string())
}

/// The answer to `CNI_COMMAND=VERSION`.
pub fn version_info(stdin: &[u8]) -> Value {
    json!({
        "cniVersion": reply_version(stdin),
        "supportedVersions": SUPPORTED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_compares() {
        assert_eq!(parse("1.0.0"), Some((1, 0, 0)));
        assert_eq!(parse("0.3.1"), Some((0, 3, 1)));
        assert_eq!(parse("1.0"), None);
        assert_eq!(parse("1.0.0.0"), None);
        assert_eq!(parse("a.b.c"), None);
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(at_least("1.0.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(at_least("1.1.0", "1.1.0"));
        assert!(!at_least("1.0.0", "1.1.0"));
        assert!(!at_least("x", "1.0.0"));
    }

    #[test]
    fn supported_set() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(is_supported(v), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "9.9.9", "", "1.0"] {
            assert!(!is_supported(v), "{v}");
        }
    }

    #[test]
    fn version_answer_follows_input() {
        let v = version_info(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
        assert_eq!(version_info(b"")["cniVersion"], LATEST);
        assert_eq!(
            version_info(br#"{"cniVersion":"9.9.9"}"#)["cniVersion"],
            LATEST
        );
        assert_eq!(reply_version(b"not json"), LATEST);
    }
}
