//! A NetworkFault checked the way the API checks a fault: the fault body
//! (`action`, `match`, `direction`, `duration`) goes through netfault-api's
//! own parser, so each error names the same field the API names, under
//! `spec.` (`spec.action.percent`); then the selector, `mode` and `value`.

use std::time::Duration;

use netfault_api::{FaultSpec, FieldError, Limits};
use serde_json::{Map, Value};

use crate::resource::{FaultMatch, NetworkFault, NetworkFaultSpec};
use crate::select::{select, Mode, PodKey};
use crate::selector::Selector;

/// A resource that passed [`validate`]: what the reconciler applies.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The resource's namespace: only its pods are selected.
    pub namespace: String,
    /// The fault applied to each selected pod (no `target`: the reconciler
    /// sets it per pod). Its `duration` is the resource's.
    pub fault: FaultSpec,
    pub selector: Selector,
    pub mode: Mode,
}

impl ValidSpec {
    /// The uids of the pods the resource `resource_uid` applies to (see
    /// [`crate::select::select`]).
    pub fn select(&self, resource_uid: &str, candidates: &[PodKey]) -> Vec<String> {
        select(
            resource_uid,
            &self.namespace,
            &self.selector,
            self.mode,
            candidates,
        )
    }
}

/// [`validate_with`] under the API's default limit (24 h per fault).
pub fn validate(nf: &NetworkFault) -> Result<ValidSpec, FieldError> {
    validate_with(nf, Limits::default().max_duration)
}

/// Checks `nf` with faults allowed to last at most `max_duration` (the
/// agent's `--max-duration`). The first error names its field.
pub fn validate_with(nf: &NetworkFault, max_duration: Duration) -> Result<ValidSpec, FieldError> {
    let namespace = nf
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::missing("metadata.namespace"))?;
    let fault = FaultSpec::parse(
        &fault_json(&nf.spec),
        &Limits {
            max_duration,
            target_required: false,
        },
    )
    .map_err(|e| e.prefixed("spec"))?;
    let selector = Selector::parse(&nf.spec.selector, "spec.selector")?;
    let mode = parse_mode(&nf.spec)?;
    Ok(ValidSpec {
        namespace,
        fault,
        selector,
        mode,
    })
}

/// The spec's fault as the API's JSON (without `target`).
pub fn fault_json(spec: &NetworkFaultSpec) -> Value {
    let mut m = Map::new();
    m.insert("action".into(), spec.action.clone());
    if let Some(FaultMatch {
        cidr,
        protocol,
        ports,
    }) = &spec.r#match
    {
        let mut mm = Map::new();
        if let Some(c) = cidr {
            mm.insert("cidr".into(), Value::String(c.clone()));
        }
        if let Some(p) = protocol {
            mm.insert("protocol".into(), Value::String(p.clone()));
        }
        if let Some(p) = ports {
            mm.insert("ports".into(), p.clone());
        }
        m.insert("match".into(), Value::Object(mm));
    }
    if let Some(d) = &spec.direction {
        m.insert("direction".into(), Value::String(d.clone()));
    }
    m.insert("duration".into(), Value::String(spec.duration.clone()));
    Value::Object(m)
}

fn parse_mode(spec: &NetworkFaultSpec) -> Result<Mode, FieldError> {
    let value = spec.value.as_ref().filter(|v| !v.is_null());
    let no_value = |mode: Mode| match value {
        None => Ok(mode),
        Some(_) => Err(FieldError::invalid(
            "spec.value",
            &format!(
                "is only used with mode fixed or fixed-percent, not {}",
                spec.mode
            ),
        )),
    };
    match spec.mode.as_str() {
        "all" => no_value(Mode::All),
        "one" => no_value(Mode::One),
        "fixed" => {
            let v = value.ok_or_else(|| {
                FieldError::new(
                    netfault_api::ErrorCode::Missing,
                    "spec.value",
                    "is required for mode fixed: the number of pods (at least 1)",
                )
            })?;
            let n = whole(v, false)
                .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                .ok_or_else(|| {
                    FieldError::invalid(
                        "spec.value",
                        &format!("must be a whole number of pods, at least 1, got {v}"),
                    )
                })?;
            Ok(Mode::Fixed(n as u32))
        }
        "fixed-percent" => {
            let v = value.ok_or_else(|| {
                FieldError::new(
                    netfault_api::ErrorCode::Missing,
                    "spec.value",
                    "is required for mode fixed-percent: the percentage of pods (1 to 100)",
                )
            })?;
            let p = whole(v, true)
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| {
                    FieldError::invalid(
                        "spec.value",
                        &format!("must be a whole percentage from 1 to 100, got {v}"),
                    )
                })?;
            Ok(Mode::FixedPercent(p as u8))
        }
        other => Err(FieldError::invalid(
            "spec.mode",
            &format!("unknown mode {other:?}; expected all, one, fixed or fixed-percent"),
        )),
    }
}

/// A whole number given as a number or a string (`"5"`, and `"5%"` when
/// `percent`).
fn whole(v: &Value, percent: bool) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            let s = if percent {
                s.strip_suffix('%').unwrap_or(s).trim_end()
            } else {
                s
            };
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netfault_api::{Action, DelayAction, Direction, Protocol};
    use serde_json::json;

    fn nf(spec: Value) -> NetworkFault {
        serde_json::from_value(json!({
            "apiVersion": "netfault.io/v1alpha1",
            "kind": "NetworkFault",
            "metadata": {"name": "f", "namespace": "shop", "uid": "r-1", "generation": 1},
            "spec": spec
        }))
        .expect("deserializes as a NetworkFault")
    }

    fn base() -> Value {
        json!({
            "action": {"type": "delay", "latency": "100ms", "jitter": "10ms"},
            "match": {"protocol": "tcp", "ports": "80,8080", "cidr": "198.18.0.0/24"},
            "direction": "egress",
            "duration": "5m",
            "selector": {"matchLabels": {"app": "web"}},
            "mode": "fixed-percent",
            "value": "50%"
        })
    }

    fn with(path: &[&str], v: Value) -> NetworkFault {
        let mut s = base();
        let mut at = &mut s;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        let last = path[path.len() - 1];
        if v.is_null() {
            at.as_object_mut().expect("an object").remove(last);
        } else {
            at[last] = v;
        }
        nf(s)
    }

    fn field_of(n: NetworkFault) -> String {
        match validate(&n) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn a_full_spec_validates_to_the_api_fault() {
        let v = validate(&nf(base())).expect("valid");
        assert_eq!(v.namespace, "shop");
        assert_eq!(v.mode, Mode::FixedPercent(50));
        assert_eq!(v.fault.target, None);
        assert_eq!(v.fault.direction, Direction::Egress);
        assert_eq!(v.fault.duration, Duration::from_secs(300));
        assert_eq!(v.fault.r#match.protocol, Some(Protocol::Tcp));
        assert_eq!(v.fault.r#match.ports.len(), 2);
        assert!(matches!(
            v.fault.action,
            Action::Delay(DelayAction::Delay { .. })
        ));
        // The same fault the API parses from the same JSON.
        let api = FaultSpec::parse(
            &json!({"action": {"type": "delay", "latency": "100ms", "jitter": "10ms"},
                "match": {"protocol": "tcp", "ports": "80,8080", "cidr": "198.18.0.0/24"},
                "direction": "egress", "duration": "5m"}),
            &Limits {
                target_required: false,
                ..Limits::default()
            },
        )
        .expect("the API accepts it");
        assert_eq!(v.fault, api);
    }

    #[test]
    fn modes_and_values() {
        let m = |mode: &str, value: Value| {
            let mut s = base();
            s["mode"] = json!(mode);
            if value.is_null() {
                s.as_object_mut().expect("object").remove("value");
            } else {
                s["value"] = value;
            }
            validate(&nf(s)).map(|v| v.mode).map_err(|e| e.field)
        };
        assert_eq!(m("all", Value::Null), Ok(Mode::All));
        assert_eq!(m("one", Value::Null), Ok(Mode::One));
        assert_eq!(m("fixed", json!(3)), Ok(Mode::Fixed(3)));
        assert_eq!(m("fixed", json!("3")), Ok(Mode::Fixed(3)));
        assert_eq!(m("fixed-percent", json!(100)), Ok(Mode::FixedPercent(100)));
        assert_eq!(m("fixed-percent", json!("1")), Ok(Mode::FixedPercent(1)));
        assert_eq!(
            m("fixed-percent", json!("25 %")),
            Ok(Mode::FixedPercent(25))
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("x"),
            json!("3%"),
            json!(""),
        ] {
            assert_eq!(m("fixed", bad.clone()), Err("spec.value".into()), "{bad}");
        }
        for bad in [json!(0), json!(101), json!(12.5), json!("-5%"), json!("%")] {
            assert_eq!(
                m("fixed-percent", bad.clone()),
                Err("spec.value".into()),
                "{bad}"
            );
        }
        assert_eq!(m("fixed", Value::Null), Err("spec.value".into()));
        assert_eq!(m("fixed-percent", Value::Null), Err("spec.value".into()));
        assert_eq!(m("all", json!(3)), Err("spec.value".into()));
        assert_eq!(m("one", json!(1)), Err("spec.value".into()));
        assert_eq!(m("some", Value::Null), Err("spec.mode".into()));
        assert_eq!(m("", Value::Null), Err("spec.mode".into()));
    }

    #[test]
    fn fault_errors_name_the_field_as_the_api_does_under_spec() {
        let cases = [
            (with(&["action", "type"], json!("lose")), "spec.action.type"),
            (
                with(&["action"], json!({"type": "loss", "percent": 101})),
                "spec.action.percent",
            ),
            (
                with(&["action"], json!({"type": "loss"})),
                "spec.action.percent",
            ),
            (
                with(&["action", "latency"], json!("soon")),
                "spec.action.latency",
            ),
            (with(&["action", "speed"], json!(1)), "spec.action.speed"),
            (with(&["action"], json!("delay")), "spec.action"),
            (
                with(&["match", "cidr"], json!("1.2.3.4/40")),
                "spec.match.cidr",
            ),
            (
                with(&["match", "ports"], json!("90-80")),
                "spec.match.ports",
            ),
            (
                with(&["match", "protocol"], json!("sctp")),
                "spec.match.protocol",
            ),
            (with(&["direction"], json!("up")), "spec.direction"),
            (with(&["duration"], json!("soon")), "spec.duration"),
            (with(&["duration"], json!("0s")), "spec.duration"),
            (with(&["duration"], json!("2d")), "spec.duration"),
        ];
        for (n, field) in cases {
            assert_eq!(field_of(n.clone()), field, "{}", n.spec.action);
        }
        // Cross-field checks too: a proxy action needs match.ports.
        let mut s = base();
        s["action"] = json!({"type": "http-abort", "status": 503});
        s.as_object_mut().expect("object").remove("match");
        assert_eq!(field_of(nf(s)), "spec.match.ports");
        // The message is the API's, under the prefixed field.
        let e = validate(&with(&["action"], json!({"type": "loss", "percent": 200})))
            .expect_err("bad percent");
        assert_eq!(
            e.to_string(),
            "spec.action.percent: must be from 0 to 100, got 200"
        );
        // A longer agent maximum lets a longer fault through.
        let long = with(&["duration"], json!("2d"));
        assert!(validate_with(&long, Duration::from_secs(3 * 86400)).is_ok());
    }

    /// `match.ports` in each of the API's spellings (kept unpruned by the
    /// schema), and an absent or empty `match`.
    #[test]
    fn ports_and_match_take_every_api_form() {
        for ports in [json!(80), json!("80,8000-8100"), json!([80, "8000-8100"])] {
            let v = validate(&with(&["match", "ports"], ports.clone()))
                .unwrap_or_else(|e| panic!("{ports}: {e}"));
            assert_eq!(v.fault.r#match.ports[0].lo, 80, "{ports}");
        }
        assert_eq!(
            field_of(with(&["match", "ports"], json!([80, true]))),
            "spec.match.ports"
        );
        let v = validate(&with(&["match"], Value::Null)).expect("no match");
        assert_eq!(v.fault.r#match, netfault_api::Match::default());
        let v = validate(&with(&["match"], json!({}))).expect("empty match");
        assert_eq!(v.fault.r#match, netfault_api::Match::default());
        let v = validate(&with(&["direction"], Value::Null)).expect("no direction");
        assert_eq!(v.fault.direction, Direction::Both, "the API's default");
    }

    #[test]
    fn selector_and_metadata_errors_name_the_field() {
        assert_eq!(
            field_of(with(
                &["selector"],
                json!({"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["web"]}]})
            )),
            "spec.selector.matchExpressions[0].operator"
        );
        let mut n = nf(base());
        n.metadata.namespace = None;
        assert_eq!(field_of(n), "metadata.namespace");
    }

    #[test]
    fn selection_uses_the_namespace_and_selector() {
        let v = validate(&nf(base())).expect("valid");
        let key = |uid: &str, ns: &str, app: &str| PodKey {
            uid: uid.into(),
            namespace: ns.into(),
            name: uid.into(),
            node: "n".into(),
            labels: [("app".to_string(), app.to_string())].into(),
        };
        let pods = [
            key("a", "shop", "web"),
            key("b", "shop", "web"),
            key("c", "shop", "db"),
            key("d", "other", "web"),
        ];
        let chosen = v.select("r-1", &pods);
        assert_eq!(chosen.len(), 1, "50% of 2, rounded up");
        assert!(chosen[0] == "a" || chosen[0] == "b");
    }
}
