//! Pod annotations: the fault specs a pod's `netfault.io/*` annotations ask
//! for, at CNI ADD, at adoption and on running pods.
//!
//! - `netfault.io/faults`: a JSON or YAML list of fault specs without
//!   `target` (a JSON list is also valid YAML; JSON is tried first so its
//!   error messages stay JSON's).
//! - Shorthands, each one fault on all traffic of the pod: `loss`,
//!   `corrupt`, `duplicate` (`"5%"`), `delay` (`"100ms"` or `"100ms 10ms"`,
//!   latency and jitter as netem spells them), `rate` (`"1mbit"`),
//!   `blackhole` (`"true"`). `netfault.io/duration` (default 1h) and
//!   `netfault.io/direction` (default: egress for delay and rate, as netem
//!   and tbf act on a pod's interface; both for the rest) apply to them.
//!
//! Every error names the annotation and the field inside it
//! (`netfault.io/faults[1].action.percent`, `netfault.io/delay`); an unknown
//! `netfault.io/*` key is an error too, so a typo is not silently ignored.
//! What it must not do: touch the system; it only parses.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::FieldError;
use crate::parse::{parse_duration, parse_percent};
use crate::spec::{parse_action, parse_direction, Direction, FaultSpec, Limits, Match};

/// The annotation carrying a JSON or YAML list of fault specs (without `target`).
pub const ANNOTATION_FAULTS: &str = "netfault.io/faults";
/// Shorthand: `netfault.io/loss: "5%"` is a loss fault on all traffic.
pub const ANNOTATION_LOSS: &str = "netfault.io/loss";
/// Shorthand: `netfault.io/delay: "100ms"` or `"100ms 10ms"` (with jitter).
pub const ANNOTATION_DELAY: &str = "netfault.io/delay";
/// Duration applied to shorthand annotations, and their override.
pub const ANNOTATION_DURATION: &str = "netfault.io/duration";
/// Direction of the shorthand faults: `egress`, `ingress` or `both`.
pub const ANNOTATION_DIRECTION: &str = "netfault.io/direction";
/// Default lifetime of a shorthand annotation fault.
pub const DEFAULT_ANNOTATION_DURATION: Duration = Duration::from_secs(3600);

/// A shorthand: its key, its default direction, and how its value becomes
/// an action (`None`: the value asks for no fault, e.g. `blackhole: "false"`).
struct Shorthand {
    key: &'static str,
    direction: Direction,
    action: fn(&str) -> Result<Option<Value>, String>,
}

const SHORTHANDS: &[Shorthand] = &[
    Shorthand {
        key: ANNOTATION_LOSS,
        direction: Direction::Both,
        action: |v| percent_action("loss", v),
    },
    Shorthand {
        key: ANNOTATION_DELAY,
        direction: Direction::Egress,
        action: delay_action,
    },
    Shorthand {
        key: "netfault.io/corrupt",
        direction: Direction::Both,
        action: |v| percent_action("corrupt", v),
    },
    Shorthand {
        key: "netfault.io/duplicate",
        direction: Direction::Both,
        action: |v| percent_action("duplicate", v),
    },
    Shorthand {
        key: "netfault.io/rate",
        direction: Direction::Egress,
        action: |v| Ok(Some(json!({"type": "rate", "rate": v.trim()}))),
    },
    Shorthand {
        key: "netfault.io/blackhole",
        direction: Direction::Both,
        action: blackhole_action,
    },
];

fn percent_action(ty: &str, v: &str) -> Result<Option<Value>, String> {
    let p = parse_percent(&Value::String(v.to_string()), "").map_err(|e| e.message)?;
    Ok(Some(json!({"type": ty, "percent": p})))
}

fn delay_action(v: &str) -> Result<Option<Value>, String> {
    let mut parts = v.split_whitespace();
    let latency = parts
        .next()
        .ok_or("must be a latency such as \"100ms\", optionally with a jitter: \"100ms 10ms\"")?;
    let jitter = parts.next();
    if parts.next().is_some() {
        return Err(format!(
            "{v:?}: expected a latency and at most a jitter, such as \"100ms 10ms\""
        ));
    }
    let mut a = json!({"type": "delay", "latency": latency});
    if let Some(j) = jitter {
        a["jitter"] = json!(j);
    }
    Ok(Some(a))
}

fn blackhole_action(v: &str) -> Result<Option<Value>, String> {
    match v.trim() {
        "true" => Ok(Some(json!({"type": "blackhole"}))),
        "false" => Ok(None),
        other => Err(format!("must be \"true\" or \"false\", got {other:?}")),
    }
}

/// Every `netfault.io/*` key this parser knows.
pub fn known_keys() -> Vec<&'static str> {
    let mut keys = vec![ANNOTATION_FAULTS, ANNOTATION_DURATION, ANNOTATION_DIRECTION];
    keys.extend(SHORTHANDS.iter().map(|s| s.key));
    keys
}

/// The list in `netfault.io/faults`: JSON, else YAML.
fn fault_list(v: &str) -> Result<Vec<Value>, FieldError> {
    let list: Value = match serde_json::from_str(v) {
        Ok(list) => list,
        Err(json_err) => {
            // Not JSON: YAML (a block or flow list). A value that is neither
            // reports JSON's error when it looks like JSON, YAML's otherwise.
            let looks_json = v.trim_start().starts_with(['[', '{']);
            match serde_yaml::from_str::<Value>(v) {
                Ok(list) => list,
                Err(_) if looks_json => {
                    return Err(FieldError::invalid(
                        ANNOTATION_FAULTS,
                        &format!("not a JSON list: {json_err}"),
                    ))
                }
                Err(e) => {
                    return Err(FieldError::invalid(
                        ANNOTATION_FAULTS,
                        &format!("not a JSON or YAML list: {e}"),
                    ))
                }
            }
        }
    };
    match list {
        Value::Array(items) => Ok(items),
        _ => Err(FieldError::invalid(
            ANNOTATION_FAULTS,
            "must be a JSON or YAML list of faults",
        )),
    }
}

/// Parses the faults a pod's annotations ask for. Errors name the
/// annotation and the field inside it (`netfault.io/faults[1].action.percent`).
/// Annotations outside `netfault.io/` are ignored.
pub fn faults_from_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    max_duration: Duration,
) -> Result<Vec<FaultSpec>, FieldError> {
    let limits = Limits {
        max_duration,
        target_required: false,
    };
    let mut out = Vec::new();
    let mut shorthands: Vec<(&Shorthand, &str)> = Vec::new();
    let mut duration = None;
    let mut direction = None;
    for (k, v) in annotations {
        let Some(_) = k.strip_prefix("netfault.io/") else {
            continue;
        };
        match k.as_str() {
            ANNOTATION_FAULTS => {
                for (i, item) in fault_list(v)?.iter().enumerate() {
                    let spec = FaultSpec::parse(item, &limits)
                        .map_err(|e| e.prefixed(&format!("{ANNOTATION_FAULTS}[{i}]")))?;
                    out.push(spec);
                }
            }
            ANNOTATION_DURATION => duration = Some(v),
            ANNOTATION_DIRECTION => direction = Some(v),
            key => match SHORTHANDS.iter().find(|s| s.key == key) {
                Some(s) => shorthands.push((s, v.as_str())),
                None => {
                    return Err(FieldError::invalid(
                        key,
                        &format!(
                            "unknown netfault annotation; known: {}",
                            known_keys().join(", ")
                        ),
                    ))
                }
            },
        }
    }
    if shorthands.is_empty() {
        return Ok(out);
    }
    let duration = match duration {
        Some(d) => parse_duration(&Value::String(d.clone()), ANNOTATION_DURATION)?,
        None => DEFAULT_ANNOTATION_DURATION.min(max_duration),
    };
    if duration.is_zero() {
        return Err(FieldError::invalid(
            ANNOTATION_DURATION,
            "must be longer than zero",
        ));
    }
    if duration > max_duration {
        return Err(FieldError::invalid(
            ANNOTATION_DURATION,
            "exceeds this agent's maximum fault duration",
        ));
    }
    let direction = direction
        .map(|d| parse_direction(&Value::String(d.trim().to_string()), ANNOTATION_DIRECTION))
        .transpose()?;
    for (s, v) in shorthands {
        let action = (s.action)(v).map_err(|e| FieldError::invalid(s.key, &e))?;
        let Some(action) = action else {
            continue;
        };
        let action = parse_action(&action).map_err(|e| {
            // The action's own field (`action.latency`) is the annotation's value.
            FieldError::new(e.code, s.key, &e.message)
        })?;
        out.push(FaultSpec {
            target: None,
            direction: direction.unwrap_or(s.direction),
            r#match: Match::default(),
            action,
            duration,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Action, DelayAction, PacketAction};
    use std::collections::BTreeMap;

    const HOUR: Duration = Duration::from_secs(3600);

    fn parse(pairs: &[(&str, &str)]) -> Result<Vec<FaultSpec>, FieldError> {
        let a: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        faults_from_annotations(&a, 2 * HOUR)
    }

    fn field(pairs: &[(&str, &str)]) -> (String, String) {
        match parse(pairs) {
            Ok(f) => panic!("expected an error, got {f:?}"),
            Err(e) => (e.field, e.message),
        }
    }

    #[test]
    fn faults_list_errors_name_the_item_and_field() {
        let (f, _) = field(&[(
            ANNOTATION_FAULTS,
            r#"[{"action":{"type":"blackhole"},"duration":"1m"},{"action":{"type":"loss","percent":200},"duration":"1m"}]"#,
        )]);
        assert_eq!(f, "netfault.io/faults[1].action.percent");
    }

    #[test]
    fn faults_list_in_yaml() {
        let yaml = "- direction: egress\n  match: {protocol: udp, ports: \"53\"}\n  action: {type: loss, percent: 30}\n  duration: 5m\n- action:\n    type: delay\n    latency: 100ms\n  duration: 1m\n";
        let f = parse(&[(ANNOTATION_FAULTS, yaml)]).expect("YAML list");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].direction, Direction::Egress);
        assert_eq!(f[0].duration, Duration::from_secs(300));
        assert!(matches!(
            f[1].action,
            Action::Delay(DelayAction::Delay { .. })
        ));
        let (f, _) = field(&[(
            ANNOTATION_FAULTS,
            "- action: {type: loss, percent: 101}\n  duration: 1m\n",
        )]);
        assert_eq!(f, "netfault.io/faults[0].action.percent");
        let (f, m) = field(&[(ANNOTATION_FAULTS, "[{\"action\": ")]);
        assert_eq!(f, ANNOTATION_FAULTS);
        assert!(m.starts_with("not a JSON list"), "{m}");
        let (f, m) = field(&[(ANNOTATION_FAULTS, "action: loss")]);
        assert_eq!(f, ANNOTATION_FAULTS);
        assert!(m.contains("list"), "{m}");
    }

    #[test]
    fn loss_shorthand_on_both_directions_for_an_hour() {
        let f = parse(&[(ANNOTATION_LOSS, "5%")]).expect("shorthand");
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].action,
            Action::Packet(PacketAction::Loss {
                percent: 5.0,
                correlation: 0.0,
                model: None,
            })
        );
        assert_eq!(f[0].direction, Direction::Both);
        assert_eq!(f[0].duration, HOUR);
    }

    #[test]
    fn delay_shorthand_with_and_without_jitter() {
        let f = parse(&[(ANNOTATION_DELAY, "100ms")]).expect("delay");
        assert_eq!(f[0].direction, Direction::Egress);
        assert_eq!(f[0].to_json()["action"]["latency"], "100ms");
        let f = parse(&[
            (ANNOTATION_DELAY, "100ms 10ms"),
            (ANNOTATION_DURATION, "5m"),
            (ANNOTATION_DIRECTION, "both"),
        ])
        .expect("delay with jitter");
        assert_eq!(f[0].to_json()["action"]["jitter"], "10ms");
        assert_eq!(f[0].direction, Direction::Both);
        assert_eq!(f[0].duration, Duration::from_secs(300));
        assert_eq!(field(&[(ANNOTATION_DELAY, "100xs")]).0, ANNOTATION_DELAY);
        assert_eq!(
            field(&[(ANNOTATION_DELAY, "1ms 2ms 3ms")]).0,
            ANNOTATION_DELAY
        );
        assert_eq!(field(&[(ANNOTATION_DELAY, "")]).0, ANNOTATION_DELAY);
        assert_eq!(field(&[(ANNOTATION_DELAY, "2m")]).0, ANNOTATION_DELAY);
    }

    #[test]
    fn other_shorthands() {
        let f = parse(&[
            ("netfault.io/corrupt", "1%"),
            ("netfault.io/duplicate", "2"),
            ("netfault.io/rate", "1mbit"),
            ("netfault.io/blackhole", "true"),
        ])
        .expect("shorthands");
        let types: Vec<String> = f
            .iter()
            .map(|s| {
                s.to_json()["action"]["type"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        // In key order, as the annotations map keeps them.
        assert_eq!(types, ["blackhole", "corrupt", "duplicate", "rate"]);
        assert!(parse(&[("netfault.io/blackhole", "false")])
            .expect("no fault")
            .is_empty());
        assert_eq!(
            field(&[("netfault.io/blackhole", "yes")]).0,
            "netfault.io/blackhole"
        );
        assert_eq!(field(&[("netfault.io/rate", "fast")]).0, "netfault.io/rate");
        assert_eq!(
            field(&[("netfault.io/corrupt", "120%")]).0,
            "netfault.io/corrupt"
        );
    }

    #[test]
    fn duration_direction_and_unknown_keys() {
        assert_eq!(
            field(&[(ANNOTATION_LOSS, "5%"), (ANNOTATION_DURATION, "3h")]).0,
            ANNOTATION_DURATION
        );
        assert_eq!(
            field(&[(ANNOTATION_LOSS, "5%"), (ANNOTATION_DURATION, "0s")]).0,
            ANNOTATION_DURATION
        );
        assert_eq!(
            field(&[(ANNOTATION_LOSS, "5%"), (ANNOTATION_DIRECTION, "up")]).0,
            ANNOTATION_DIRECTION
        );
        let (f, m) = field(&[("netfault.io/dealy", "100ms")]);
        assert_eq!(f, "netfault.io/dealy");
        assert!(m.contains("netfault.io/delay"), "{m}");
        // Others' annotations are not ours to judge.
        assert!(parse(&[("example.com/x", "y")])
            .expect("ignored")
            .is_empty());
    }
}
