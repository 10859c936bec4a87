//! The JSON value parsers the fault model is read with.
//!
//! Every function takes the JSON path of the value it reads (`field`) or of
//! the object it reads from (`prefix`), and names it in its error, so the
//! fault parsers in [`crate::spec`] and [`crate::action`] report the exact
//! field the way the API contract promises. Nothing here knows about faults.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::FieldError;

/// The field every action sits under in a fault.
pub(crate) const ACTION: &str = "action";

/// A JSON object, or `must be an object`.
pub(crate) fn obj<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, FieldError> {
    v.as_object()
        .ok_or_else(|| FieldError::invalid(field, "must be an object"))
}

/// The path of `key` inside the object at `prefix` (`""` is the top level).
pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Rejects the first key of `m` (the object at `prefix`) not in `known`.
pub(crate) fn reject_unknown(
    m: &Map<String, Value>,
    prefix: &str,
    known: &[&str],
) -> Result<(), FieldError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(FieldError::invalid(
            &join(prefix, k),
            &format!("unknown field; expected one of: {}", known.join(", ")),
        )),
    }
}

/// `m[key]` unless it is absent or `null`.
pub(crate) fn given<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

/// `parse(m[key])` at `prefix.key`, or `None` when absent or `null`.
pub(crate) fn opt<'a, T>(
    m: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
    parse: impl FnOnce(&'a Value, &str) -> Result<T, FieldError>,
) -> Result<Option<T>, FieldError> {
    given(m, key)
        .map(|v| parse(v, &join(prefix, key)))
        .transpose()
}

/// `parse(m[key])` at `prefix.key`; `is required` when absent (a `null` is
/// handed to `parse`, which rejects it with its own message).
pub(crate) fn req<'a, T>(
    m: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
    parse: impl FnOnce(&'a Value, &str) -> Result<T, FieldError>,
) -> Result<T, FieldError> {
    let field = join(prefix, key);
    parse(
        m.get(key).ok_or_else(|| FieldError::missing(&field))?,
        &field,
    )
}

/// A non-empty string.
pub(crate) fn string<'a>(v: &'a Value, field: &str) -> Result<&'a str, FieldError> {
    let s = v
        .as_str()
        .ok_or_else(|| FieldError::invalid(field, "must be a string"))?;
    if s.is_empty() {
        return Err(FieldError::invalid(field, "must not be empty"));
    }
    Ok(s)
}

/// `m[key]` as a non-empty string, or `None` when absent or `null`.
pub(crate) fn opt_str<'a>(
    m: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<&'a str>, FieldError> {
    opt(m, prefix, key, string)
}

/// A percentage 0..=100, given as a number or as a string like `"5%"`.
pub fn parse_percent(v: &Value, field: &str) -> Result<f64, FieldError> {
    let p = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('%').trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| FieldError::invalid(field, "must be a number from 0 to 100"))?;
    if !p.is_finite() || !(0.0..=100.0).contains(&p) {
        return Err(FieldError::invalid(
            field,
            &format!("must be from 0 to 100, got {p}"),
        ));
    }
    Ok(p)
}

/// `m[key]` as a percentage, `default` when absent or `null`.
pub(crate) fn opt_percent(
    m: &Map<String, Value>,
    prefix: &str,
    key: &str,
    default: f64,
) -> Result<f64, FieldError> {
    Ok(opt(m, prefix, key, parse_percent)?.unwrap_or(default))
}

/// `m[key]` as a percentage; required.
pub(crate) fn req_percent(
    m: &Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<f64, FieldError> {
    req(m, prefix, key, parse_percent)
}

/// A humantime duration string such as `"150ms"` or `"5m"`.
pub fn parse_duration(v: &Value, field: &str) -> Result<Duration, FieldError> {
    let s = v.as_str().ok_or_else(|| {
        FieldError::invalid(field, "must be a duration string such as \"30s\" or \"5m\"")
    })?;
    humantime::parse_duration(s.trim())
        .map_err(|e| FieldError::invalid(field, &format!("invalid duration {s:?}: {e}")))
}

/// `m[key]` as a duration, or `None` when absent or `null`.
pub(crate) fn opt_duration(
    m: &Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<Duration>, FieldError> {
    opt(m, prefix, key, parse_duration)
}

/// A duration as the canonical form spells it (`"1s 500ms"`).
pub(crate) fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One `"80"` or `"8000-8100"`.
fn parse_port_range(part: &str, field: &str) -> Result<PortRange, FieldError> {
    let part = part.trim();
    let bad = || {
        FieldError::invalid(
            field,
            &format!("invalid port or range {part:?}; expected 1-65535 or LO-HI"),
        )
    };
    let (lo, hi) = match part.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (part, part),
    };
    let lo: u16 = lo.parse().map_err(|_| bad())?;
    let hi: u16 = hi.parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok(PortRange { lo, hi })
}

/// Ports as `"80,8000-8100"`, a single number, or an array of either; at
/// least one and at most `max` ranges.
pub fn parse_ports(v: &Value, field: &str, max: usize) -> Result<Vec<PortRange>, FieldError> {
    let mut out = Vec::new();
    let mut push = |part: &str| -> Result<(), FieldError> {
        out.push(parse_port_range(part, field)?);
        Ok(())
    };
    match v {
        Value::String(s) => s.split(',').try_for_each(&mut push)?,
        Value::Number(n) => push(&n.to_string())?,
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => push(s)?,
                    Value::Number(n) => push(&n.to_string())?,
                    _ => return Err(FieldError::invalid(field, "array items must be ports")),
                }
            }
        }
        _ => {
            return Err(FieldError::invalid(
                field,
                "must be a string such as \"80,8000-8100\"",
            ))
        }
    }
    if out.is_empty() {
        return Err(FieldError::invalid(field, "must name at least one port"));
    }
    if out.len() > max {
        return Err(FieldError::invalid(
            field,
            &format!("at most {max} ports or ranges per fault"),
        ));
    }
    Ok(out)
}

/// A number, or a string of a number and a unit that `unit` scales.
/// The error is the offending text.
fn scaled(v: &Value, unit: impl Fn(&str) -> Option<f64>) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| n.to_string()),
        Value::String(s) => {
            let t = s.trim().to_ascii_lowercase();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (num, u) = t.split_at(split);
            let num: f64 = num.parse().map_err(|_| s.clone())?;
            Ok(num * unit(u.trim()).ok_or_else(|| s.clone())?)
        }
        other => Err(other.to_string()),
    }
}

/// A rate such as `"20mbit"`, `"1.5gbit"`, `"500kbit"`, `"10mbps"` (bytes per
/// second, as in tc) or a bare number of bits per second. Units are SI.
pub fn parse_rate(v: &Value, field: &str) -> Result<u64, FieldError> {
    let bad = |s: &str| {
        FieldError::invalid(
            field,
            &format!("invalid rate {s:?}; expected e.g. \"20mbit\", \"500kbit\", \"10mbps\""),
        )
    };
    let bits = scaled(v, |unit| match unit {
        "" | "bit" => Some(1.0),
        "kbit" => Some(1e3),
        "mbit" => Some(1e6),
        "gbit" => Some(1e9),
        "bps" => Some(8.0),
        "kbps" => Some(8e3),
        "mbps" => Some(8e6),
        "gbps" => Some(8e9),
        _ => None,
    })
    .map_err(|s| bad(&s))?;
    if !bits.is_finite() || !(8_000.0..=400e9).contains(&bits) {
        return Err(FieldError::invalid(
            field,
            "must be between 8kbit and 400gbit",
        ));
    }
    Ok(bits.round() as u64)
}

/// A size in bytes: a bare number, or with `b`, `kb`/`k`/`kib` (1024),
/// `mb`/`m`/`mib` (1024²).
pub fn parse_size(v: &Value, field: &str) -> Result<u64, FieldError> {
    let bad = |s: &str| {
        FieldError::invalid(
            field,
            &format!("invalid size {s:?}; expected bytes, e.g. 32768 or \"32kb\""),
        )
    };
    let bytes = scaled(v, |unit| match unit {
        "" | "b" => Some(1.0),
        "k" | "kb" | "kib" => Some(1024.0),
        "m" | "mb" | "mib" => Some(1024.0 * 1024.0),
        _ => None,
    })
    .map_err(|s| bad(&s))?;
    if !bytes.is_finite() || !(1500.0..=(1u64 << 30) as f64).contains(&bytes) {
        return Err(FieldError::invalid(
            field,
            "must be between 1500 bytes and 1gb",
        ));
    }
    Ok(bytes.round() as u64)
}

/// An HTTP status code from `lo` (100, or 200 for a final response) to 599.
pub fn parse_status(v: &Value, field: &str, lo: u16) -> Result<u16, FieldError> {
    v.as_u64()
        .filter(|s| (u64::from(lo)..=599).contains(s))
        .map(|s| s as u16)
        .ok_or_else(|| {
            FieldError::invalid(
                field,
                &if lo == 100 {
                    "must be an HTTP status from 100 to 599".to_string()
                } else {
                    format!(
                        "must be an HTTP status from {lo} to 599 (a 1xx is not a final response)"
                    )
                },
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_are_named_under_their_prefix() {
        let v = json!({"a": 1, "b": 2});
        let m = obj(&v, "x").expect("object");
        assert_eq!(reject_unknown(m, "", &["a", "b"]), Ok(()));
        let e = reject_unknown(m, "", &["a"]).expect_err("b is unknown");
        assert_eq!(e.to_string(), "b: unknown field; expected one of: a");
        let e = reject_unknown(m, "action.http", &["b", "c"]).expect_err("a is unknown");
        assert_eq!(
            e.to_string(),
            "action.http.a: unknown field; expected one of: b, c"
        );
    }

    #[test]
    fn optional_and_required_values() {
        let v = json!({"p": "5%", "n": null});
        let m = obj(&v, "").expect("object");
        assert_eq!(opt_percent(m, "action", "p", 1.0), Ok(5.0));
        assert_eq!(opt_percent(m, "action", "n", 1.0), Ok(1.0));
        assert_eq!(opt_percent(m, "action", "q", 1.0), Ok(1.0));
        assert_eq!(
            req_percent(m, "action", "q").map_err(|e| e.to_string()),
            Err("action.q: is required".to_string())
        );
        // A null is given, so it is not "missing" but not a percentage either.
        assert_eq!(
            req_percent(m, "action", "n").map_err(|e| e.to_string()),
            Err("action.n: must be a number from 0 to 100".to_string())
        );
    }

    #[test]
    fn ports_in_every_shape() {
        let f = |v: Value| parse_ports(&v, "p", 8).map_err(|e| e.message);
        assert_eq!(
            f(json!("80, 8000-8100")),
            Ok(vec![
                PortRange { lo: 80, hi: 80 },
                PortRange { lo: 8000, hi: 8100 }
            ])
        );
        assert_eq!(f(json!([53, "9-9"])).map(|p| p.len()), Ok(2));
        assert_eq!(
            f(json!("1,2,3,4,5,6,7,8,9")),
            Err("at most 8 ports or ranges per fault".to_string())
        );
        assert_eq!(
            f(json!("90-80")),
            Err("invalid port or range \"90-80\"; expected 1-65535 or LO-HI".to_string())
        );
        assert_eq!(f(json!([])), Err("must name at least one port".to_string()));
    }
}
