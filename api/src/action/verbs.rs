//! The command-line form of every action: one verb per action type
//! (`netfaultctl delay 100ms --jitter 10ms`), each field of the action's
//! JSON a flag (or the one positional argument), and the fields every fault
//! has (target, direction, match, duration) as common flags.
//!
//! This table is checked against the parsers it feeds (the tests below): a
//! verb for every action type, a flag for every field a parser accepts and
//! no flag for one it rejects, so the CLI and the API cannot drift apart.
//! The CLI builds the fault JSON from the flags and validates it with
//! [`crate::FaultSpec::parse`], the API's own validation; an error names the
//! flag through [`flag_for_field`].

use serde_json::{Map, Value};

/// How a flag's text becomes the field's JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// The text as a string (durations, rates, sizes, names, codes).
    Text,
    /// A number from 0 to 100, `%` allowed: sent as given (the API reads
    /// `"10%"`).
    Percent,
    /// A whole number; text that is not one is sent as a string, for the
    /// API to name in its error.
    Integer,
    /// `true` when the flag is given; takes no value.
    Switch,
    /// A list: the flag repeated, or values separated by commas.
    List,
    /// An object: `KEY=VALUE`, the flag repeated.
    Pairs,
    /// A JSON value (a merge patch, a loss model); text that is not JSON
    /// is sent as a string.
    Json,
}

/// One field of an action as a flag.
#[derive(Debug, Clone, Copy)]
pub struct VerbField {
    /// Where the value goes in the action's JSON: `["percent"]`,
    /// `["http", "path"]`.
    pub path: &'static [&'static str],
    /// The flag, without `--`.
    pub flag: &'static str,
    pub kind: FieldKind,
    pub help: &'static str,
}

/// One action type as a verb.
#[derive(Debug, Clone, Copy)]
pub struct Verb {
    /// The action type, and the verb's name.
    pub action: &'static str,
    pub about: &'static str,
    /// The flag also taken as the verb's positional argument.
    pub positional: Option<&'static str>,
    pub fields: &'static [VerbField],
}

impl Verb {
    /// The field behind `flag`.
    pub fn field(&self, flag: &str) -> Option<&'static VerbField> {
        self.fields.iter().find(|f| f.flag == flag)
    }
}

const fn field(
    path: &'static [&'static str],
    flag: &'static str,
    kind: FieldKind,
    help: &'static str,
) -> VerbField {
    VerbField {
        path,
        flag,
        kind,
        help,
    }
}

use FieldKind::{Integer, Json, List, Pairs, Percent, Switch, Text};

const CORRELATION: VerbField = field(
    &["correlation"],
    "correlation",
    Percent,
    "netem's correlation with the previous packet, 0-100",
);
const PERCENT: VerbField = field(
    &["percent"],
    "percent",
    Percent,
    "the share of matching requests, connections or queries to act on (default 100)",
);
const HTTP_PATH: VerbField = field(
    &["http", "path"],
    "path",
    Text,
    "only requests whose path matches this glob (`/api/*`)",
);
const HTTP_METHOD: VerbField = field(
    &["http", "method"],
    "method",
    Text,
    "only requests with this method",
);
const HTTP_HEADERS: VerbField = field(
    &["http", "headers"],
    "match-header",
    Pairs,
    "only requests with this header exactly (NAME=VALUE, repeatable)",
);
const HTTP_CODE: VerbField = field(
    &["http", "code"],
    "code",
    Integer,
    "in the response phase, only responses with this status",
);
const PHASE: VerbField = field(
    &["phase"],
    "phase",
    Text,
    "request or response (default request)",
);
const DNS_NAMES: VerbField = field(
    &["dns", "names"],
    "name",
    List,
    "only queries for these names (`*.example.com`; repeatable or comma-separated)",
);
const DNS_TYPES: VerbField = field(
    &["dns", "types"],
    "type",
    List,
    "only queries of these types (A, AAAA, MX, ...; repeatable or comma-separated)",
);

/// Every action type as a verb, in the order of the API's action list.
pub const VERBS: &[Verb] = &[
    Verb {
        action: "loss",
        about: "Drop a share of the matching packets",
        positional: Some("percent"),
        fields: &[
            field(
                &["percent"],
                "percent",
                Percent,
                "the share of packets to drop, 0-100",
            ),
            CORRELATION,
            field(
                &["model"],
                "model",
                Json,
                "a Gilbert-Elliott model instead: {\"p\":1,\"r\":20,\"1-h\":90,\"1-k\":0}",
            ),
        ],
    },
    Verb {
        action: "blackhole",
        about: "Drop every matching packet",
        positional: None,
        fields: &[],
    },
    Verb {
        action: "delay",
        about: "Delay the matching packets",
        positional: Some("latency"),
        fields: &[
            field(&["latency"], "latency", Text, "the added latency (100ms)"),
            field(&["jitter"], "jitter", Text, "the jitter around it (10ms)"),
            CORRELATION,
            field(
                &["distribution"],
                "distribution",
                Text,
                "uniform, normal, pareto or paretonormal",
            ),
            field(
                &["percent"],
                "percent",
                Percent,
                "the share of packets to delay (default 100)",
            ),
        ],
    },
    Verb {
        action: "reorder",
        about: "Send a share of the packets ahead of the delayed others",
        positional: Some("percent"),
        fields: &[
            field(
                &["percent"],
                "percent",
                Percent,
                "the share of packets sent at once, 0-100",
            ),
            CORRELATION,
            field(&["gap"], "gap", Integer, "reorder every Nth packet"),
            field(
                &["latency"],
                "latency",
                Text,
                "the delay of the others (else another delay fault's)",
            ),
        ],
    },
    Verb {
        action: "corrupt",
        about: "Flip a bit in a share of the matching packets",
        positional: Some("percent"),
        fields: &[
            field(
                &["percent"],
                "percent",
                Percent,
                "the share of packets to corrupt, 0-100",
            ),
            CORRELATION,
        ],
    },
    Verb {
        action: "duplicate",
        about: "Send a share of the matching packets twice",
        positional: Some("percent"),
        fields: &[
            field(
                &["percent"],
                "percent",
                Percent,
                "the share of packets to duplicate, 0-100",
            ),
            CORRELATION,
        ],
    },
    Verb {
        action: "rate",
        about: "Limit the matching traffic's rate",
        positional: Some("rate"),
        fields: &[
            field(&["rate"], "rate", Text, "the rate (20mbit, 10mbps)"),
            field(&["burst"], "burst", Text, "the bucket (500kb)"),
        ],
    },
    Verb {
        action: "http-abort",
        about: "Answer matching HTTP requests with a status instead of the server",
        positional: Some("status"),
        fields: &[
            field(&["status"], "status", Integer, "the status to answer (503)"),
            field(
                &["reset"],
                "reset",
                Switch,
                "reset the connection instead of answering",
            ),
            field(&["body"], "body", Text, "the answer's body"),
            HTTP_PATH,
            HTTP_METHOD,
            HTTP_HEADERS,
            HTTP_CODE,
            PERCENT,
        ],
    },
    Verb {
        action: "http-delay",
        about: "Delay matching HTTP requests or their responses",
        positional: Some("delay"),
        fields: &[
            field(&["delay"], "delay", Text, "the delay (200ms)"),
            PHASE,
            HTTP_PATH,
            HTTP_METHOD,
            HTTP_HEADERS,
            HTTP_CODE,
            PERCENT,
        ],
    },
    Verb {
        action: "http-replace",
        about: "Rewrite matching HTTP requests or responses",
        positional: None,
        fields: &[
            PHASE,
            field(&["status"], "status", Integer, "the response's new status"),
            field(
                &["headers"],
                "header",
                Pairs,
                "a header to set (NAME=VALUE, repeatable)",
            ),
            field(&["body"], "body", Text, "the new body"),
            field(&["path"], "new-path", Text, "the request's new path"),
            field(&["method"], "new-method", Text, "the request's new method"),
            HTTP_PATH,
            HTTP_METHOD,
            HTTP_HEADERS,
            HTTP_CODE,
            PERCENT,
        ],
    },
    Verb {
        action: "http-patch",
        about: "Add to matching HTTP requests or responses",
        positional: None,
        fields: &[
            PHASE,
            field(
                &["headers"],
                "header",
                Pairs,
                "a header to add (NAME=VALUE, repeatable)",
            ),
            field(
                &["query"],
                "query",
                Pairs,
                "a query parameter to add (NAME=VALUE, repeatable)",
            ),
            field(
                &["body_merge"],
                "body-merge",
                Json,
                "an RFC 7396 merge patch for a JSON body",
            ),
            HTTP_PATH,
            HTTP_METHOD,
            HTTP_HEADERS,
            HTTP_CODE,
            PERCENT,
        ],
    },
    Verb {
        action: "tcp-reset",
        about: "Reset matching TCP connections after a time or a number of bytes",
        positional: Some("after"),
        fields: &[
            field(
                &["after"],
                "after",
                Text,
                "reset this long after the connection opens",
            ),
            field(
                &["after_bytes"],
                "after-bytes",
                Integer,
                "reset after this many bytes",
            ),
            PERCENT,
        ],
    },
    Verb {
        action: "tcp-slow-close",
        about: "Hold back the FINs of matching TCP connections",
        positional: Some("delay"),
        fields: &[
            field(&["delay"], "delay", Text, "how long each FIN is held"),
            PERCENT,
        ],
    },
    Verb {
        action: "tcp-bandwidth",
        about: "Throttle each direction of matching TCP connections",
        positional: Some("rate"),
        fields: &[field(&["rate"], "rate", Text, "the rate (8mbit)"), PERCENT],
    },
    Verb {
        action: "dns-error",
        about: "Answer matching DNS queries with an error",
        positional: Some("rcode"),
        fields: &[
            field(
                &["rcode"],
                "rcode",
                Text,
                "nxdomain (the default), servfail, refused or formerr",
            ),
            DNS_NAMES,
            DNS_TYPES,
            PERCENT,
        ],
    },
    Verb {
        action: "dns-drop",
        about: "Leave matching DNS queries unanswered",
        positional: None,
        fields: &[DNS_NAMES, DNS_TYPES, PERCENT],
    },
    Verb {
        action: "dns-spoof",
        about: "Answer matching DNS queries with other addresses",
        positional: Some("address"),
        fields: &[
            field(
                &["addresses"],
                "address",
                List,
                "the addresses to answer (repeatable or comma-separated)",
            ),
            field(
                &["random"],
                "random",
                Switch,
                "a random documentation address per answer",
            ),
            field(&["ttl"], "ttl", Integer, "the answers' TTL (default 0)"),
            DNS_NAMES,
            DNS_TYPES,
            PERCENT,
        ],
    },
    Verb {
        action: "dns-delay",
        about: "Delay matching DNS queries",
        positional: Some("delay"),
        fields: &[
            field(&["delay"], "delay", Text, "the delay (at most 60s)"),
            DNS_NAMES,
            DNS_TYPES,
            PERCENT,
        ],
    },
    Verb {
        action: "dns-truncate",
        about: "Answer matching DNS queries over UDP with TC, so they retry over TCP",
        positional: None,
        fields: &[DNS_NAMES, DNS_TYPES, PERCENT],
    },
];

/// The flags every verb has for the fault around its action: where the
/// value goes in the fault JSON, the flag, and its help.
pub const COMMON_FLAGS: &[(&[&str], &str, &str)] = &[
    (
        &["target", "sandbox"],
        "sandbox",
        "the target: an enrolled sandbox's id",
    ),
    (
        &["target", "netns"],
        "netns",
        "the target: a network namespace's path (enrolled for the fault)",
    ),
    (
        &["direction"],
        "direction",
        "egress, ingress or both (default)",
    ),
    (
        &["match", "cidr"],
        "to",
        "only traffic to or from this network (10.0.0.0/8)",
    ),
    (&["match", "protocol"], "protocol", "tcp, udp, icmp or any"),
    (
        &["match", "ports"],
        "port",
        "only these ports (80,8000-8100)",
    ),
    (
        &["duration"],
        "for",
        "how long the fault lasts (default 5m)",
    ),
];

/// The duration a verb's fault gets without `--for`.
pub const DEFAULT_DURATION: &str = "5m";

/// The verb for an action type.
pub fn verb(action: &str) -> Option<&'static Verb> {
    VERBS.iter().find(|v| v.action == action)
}

/// The flag (`--percent`, `--for`, `--pod`) that sets a field the API
/// names (`action.percent`, `duration`, `target.pod.name`), for `verb`.
pub fn flag_for_field(verb: &Verb, field: &str) -> Option<String> {
    if field == "target" || field.starts_with("target.pod") {
        return Some("--pod".into());
    }
    if let Some(rest) = field.strip_prefix("action.") {
        // `names[0]` is in `names`.
        let parts: Vec<&str> = rest
            .split('.')
            .map(|p| p.split('[').next().unwrap_or(p))
            .collect();
        // The longest field path that starts the error's.
        return verb
            .fields
            .iter()
            .filter(|f| parts.starts_with(f.path))
            .max_by_key(|f| f.path.len())
            .map(|f| format!("--{}", f.flag));
    }
    let path: Vec<&str> = field.split('.').collect();
    COMMON_FLAGS
        .iter()
        .filter(|(p, _, _)| path.starts_with(p) || p.starts_with(&path))
        .max_by_key(|(p, _, _)| p.len())
        .map(|(_, flag, _)| format!("--{flag}"))
}

/// A flag's value that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct FlagError {
    pub flag: String,
    pub message: String,
}

/// Sets `path` in `obj` to `value`, creating the objects on the way.
fn set(obj: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            obj.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let inner = obj
                .entry((*first).to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !inner.is_object() {
                *inner = Value::Object(Map::new());
            }
            if let Value::Object(m) = inner {
                set(m, rest, value);
            }
        }
    }
}

/// The JSON value of a field from the flag's values (each occurrence of the
/// flag; a switch's values are ignored).
pub fn field_value(f: &VerbField, values: &[String]) -> Result<Value, FlagError> {
    let bad = |message: String| FlagError {
        flag: f.flag.to_string(),
        message,
    };
    let one = || values.last().cloned().unwrap_or_default();
    Ok(match f.kind {
        FieldKind::Text | FieldKind::Percent => Value::String(one()),
        FieldKind::Integer => {
            let v = one();
            match v.trim().parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::String(v),
            }
        }
        FieldKind::Switch => Value::Bool(true),
        FieldKind::List => Value::Array(
            values
                .iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        FieldKind::Pairs => {
            let mut m = Map::new();
            for v in values {
                let (k, val) = v
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{v:?} is not NAME=VALUE")))?;
                m.insert(k.trim().to_string(), Value::String(val.to_string()));
            }
            Value::Object(m)
        }
        FieldKind::Json => {
            let v = one();
            serde_json::from_str(&v).unwrap_or(Value::String(v))
        }
    })
}

/// The action JSON of `verb` from its flags' values (`(flag, values)`, only
/// the flags given).
pub fn action_json(verb: &Verb, given: &[(&str, Vec<String>)]) -> Result<Value, FlagError> {
    let mut m = Map::new();
    m.insert("type".into(), Value::String(verb.action.into()));
    for (flag, values) in given {
        let f = verb.field(flag).ok_or_else(|| FlagError {
            flag: (*flag).to_string(),
            message: format!("not a flag of {}", verb.action),
        })?;
        set(&mut m, f.path, field_value(f, values)?);
    }
    Ok(Value::Object(m))
}

/// The fault JSON around `action`: the common flags given (`(flag,
/// value)`), the pod target when no other is given, and the default
/// duration.
pub fn fault_json(
    action: Value,
    common: &[(&str, String)],
    pod: Option<(&str, &str)>,
) -> Result<Value, FlagError> {
    let mut m = Map::new();
    for (flag, value) in common {
        let (path, _, _) = COMMON_FLAGS
            .iter()
            .find(|(_, f, _)| f == flag)
            .ok_or_else(|| FlagError {
                flag: (*flag).to_string(),
                message: "not a fault flag".into(),
            })?;
        set(&mut m, path, Value::String(value.clone()));
    }
    if let Some((namespace, name)) = pod {
        if m.contains_key("target") {
            return Err(FlagError {
                flag: "pod".into(),
                message: "give one target: --pod, --sandbox or --netns".into(),
            });
        }
        set(
            &mut m,
            &["target", "pod", "namespace"],
            Value::from(namespace),
        );
        set(&mut m, &["target", "pod", "name"], Value::from(name));
    }
    if let Some(Value::Object(t)) = m.get("target") {
        if t.len() > 1 {
            return Err(FlagError {
                flag: "sandbox".into(),
                message: "give one target: --pod, --sandbox or --netns".into(),
            });
        }
    }
    m.entry("duration")
        .or_insert_with(|| Value::String(DEFAULT_DURATION.into()));
    m.insert("action".into(), action);
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FaultSpec, Limits};
    use serde_json::json;
    use std::collections::BTreeSet;

    /// The fields a parser accepts at `path` of `base`, read from the
    /// error it gives for an unknown one ("expected one of: a, b").
    fn accepted(base: &Value, path: &[&str]) -> BTreeSet<String> {
        let mut v = base.clone();
        let mut at = &mut v;
        for p in path {
            at = &mut at[*p];
        }
        at["zz-unknown"] = json!(1);
        let e = match crate::action::parse_action(&v) {
            Ok(a) => panic!("{v}: an unknown field was accepted: {a:?}"),
            Err(e) => e,
        };
        let (_, list) = e
            .message
            .split_once("expected one of: ")
            .unwrap_or_else(|| panic!("{v}: not an unknown-field error: {e}"));
        list.split(", ").map(str::to_string).collect()
    }

    /// A valid action of each type, with its required fields.
    fn minimal(action: &str) -> Value {
        match action {
            "loss" | "reorder" | "corrupt" | "duplicate" => json!({"type": action, "percent": 5}),
            "delay" => json!({"type": action, "latency": "10ms"}),
            "rate" | "tcp-bandwidth" => json!({"type": action, "rate": "8mbit"}),
            "http-abort" => json!({"type": action, "status": 503}),
            "http-delay" | "tcp-slow-close" | "dns-delay" => {
                json!({"type": action, "delay": "10ms"})
            }
            "http-replace" => json!({"type": action, "headers": {"x": "1"}}),
            "http-patch" => json!({"type": action, "headers": {"x": "1"}}),
            "tcp-reset" => json!({"type": action, "after": "1s"}),
            "dns-spoof" => json!({"type": action, "addresses": ["192.0.2.1"]}),
            _ => json!({"type": action}),
        }
    }

    #[test]
    fn every_action_type_has_a_verb_and_every_verb_an_action_type() {
        let types: BTreeSet<&str> = crate::action::ACTION_TYPES
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let verbs: BTreeSet<&str> = VERBS.iter().map(|v| v.action).collect();
        assert_eq!(types, verbs);
        for v in VERBS {
            crate::action::parse_action(&minimal(v.action))
                .unwrap_or_else(|e| panic!("{}: {e}", v.action));
        }
    }

    #[test]
    fn every_field_a_parser_accepts_is_a_flag_and_no_flag_is_a_field_it_rejects() {
        for v in VERBS {
            let base = minimal(v.action);
            // Top-level fields, then each nested selector's.
            let mut objects: BTreeSet<Vec<&str>> = BTreeSet::new();
            objects.insert(Vec::new());
            for f in v.fields {
                if f.path.len() > 1 {
                    objects.insert(f.path[..f.path.len() - 1].to_vec());
                }
            }
            for obj in objects {
                let mut base = base.clone();
                if let Some(first) = obj.first() {
                    base[*first] = json!({});
                }
                let mut want = accepted(&base, &obj);
                if obj.is_empty() {
                    want.remove("type");
                }
                let have: BTreeSet<String> = v
                    .fields
                    .iter()
                    .filter(|f| f.path.len() == obj.len() + 1 && f.path.starts_with(&obj))
                    .map(|f| f.path[obj.len()].to_string())
                    .chain(
                        v.fields
                            .iter()
                            .filter(|f| obj.is_empty() && f.path.len() > 1)
                            .map(|f| f.path[0].to_string()),
                    )
                    .collect();
                assert_eq!(have, want, "{} at {obj:?}", v.action);
            }
            if let Some(p) = v.positional {
                assert!(
                    v.field(p).is_some(),
                    "{}: positional {p} is a flag",
                    v.action
                );
            }
            let mut flags = BTreeSet::new();
            for f in v.fields {
                assert!(flags.insert(f.flag), "{}: --{} twice", v.action, f.flag);
                assert!(
                    !COMMON_FLAGS.iter().any(|(_, c, _)| *c == f.flag) && f.flag != "pod",
                    "{}: --{} is also a fault flag",
                    v.action,
                    f.flag
                );
            }
        }
    }

    #[test]
    fn flags_build_the_json_the_api_parses_and_errors_name_the_flag() {
        let v = verb("http-abort").expect("verb");
        let action = action_json(
            v,
            &[
                ("status", vec!["503".into()]),
                ("path", vec!["/api/*".into()]),
                ("percent", vec!["30%".into()]),
                ("match-header", vec!["x-a=1".into(), "x-b=2".into()]),
            ],
        )
        .expect("action");
        let fault = fault_json(
            action,
            &[("port", "80".into()), ("to", "10.0.0.0/8".into())],
            Some(("shop", "cart")),
        )
        .expect("fault");
        assert_eq!(
            fault,
            json!({
                "target": {"pod": {"namespace": "shop", "name": "cart"}},
                "match": {"ports": "80", "cidr": "10.0.0.0/8"},
                "duration": "5m",
                "action": {"type": "http-abort", "status": 503, "percent": "30%",
                    "http": {"path": "/api/*", "headers": {"x-a": "1", "x-b": "2"}}},
            })
        );
        FaultSpec::parse(&fault, &Limits::default()).expect("the API's validation takes it");

        let v = verb("loss").expect("verb");
        let bad = action_json(v, &[("percent", vec!["150".into()])]).expect("json");
        let bad = fault_json(bad, &[("sandbox", "x".into())], None).expect("fault");
        let e = FaultSpec::parse(&bad, &Limits::default()).expect_err("150% is rejected");
        assert_eq!(flag_for_field(v, &e.field).as_deref(), Some("--percent"));
        assert_eq!(flag_for_field(v, "duration").as_deref(), Some("--for"));
        assert_eq!(flag_for_field(v, "match.cidr").as_deref(), Some("--to"));
        assert_eq!(
            flag_for_field(v, "target.pod.name").as_deref(),
            Some("--pod")
        );
        let d = verb("dns-error").expect("verb");
        assert_eq!(
            flag_for_field(d, "action.dns.names[0]").as_deref(),
            Some("--name")
        );
        assert_eq!(
            flag_for_field(d, "action.dns.names").as_deref(),
            Some("--name")
        );
        assert_eq!(
            fault_json(json!({}), &[("sandbox", "a".into())], Some(("d", "p")))
                .expect_err("two targets")
                .flag,
            "pod"
        );
        assert_eq!(
            action_json(
                verb("http-replace").expect("verb"),
                &[("header", vec!["novalue".into()])]
            )
            .expect_err("not a pair")
            .flag,
            "header"
        );
    }
}
