//! The fault specification: parsing and validation of the JSON shape in docs/design.md ("Fault JSON").
//!
//! Parsing is done by hand from `serde_json::Value` rather than with derived
//! `Deserialize`, so every rejection names the exact field (`action.percent`,
//! `match.ports`) the way the API contract promises. Nothing here touches the
//! system; the agent compiles a validated [`FaultSpec`] into backend plans.

use std::time::Duration;

use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::error::{ErrorCode, FieldError};
pub use crate::parse::PortRange;
use crate::parse::{join, obj, opt, parse_duration, parse_ports, reject_unknown, req, string};

/// Most port ranges a single fault may match: the eBPF rule has this many slots.
pub const MAX_PORT_RANGES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
    Both,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Both => "both",
        }
    }
    pub fn includes_egress(self) -> bool {
        matches!(self, Direction::Egress | Direction::Both)
    }
    pub fn includes_ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::Both)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// Which packets a fault applies to. Absent fields match everything.
///
/// `cidr` is the peer's address (destination on egress, source on ingress);
/// `ports` match either the source or the destination port, so "port 80"
/// means the same thing on a client and on a server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub cidr: Option<IpNet>,
    pub protocol: Option<Protocol>,
    pub ports: Vec<PortRange>,
}

impl Match {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::Any)
    }
}

pub use crate::action::{
    parse_action, Action, BackendKind, DelayAction, Distribution, GilbertElliott, PacketAction,
    ProxyAction,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Sandbox(String),
    Pod { namespace: String, name: String },
    Netns(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub target: Option<Target>,
    pub direction: Direction,
    pub r#match: Match,
    pub action: Action,
    pub duration: Duration,
}

/// Limits applied while parsing; the agent makes these configurable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_duration: Duration,
    /// API requests must name a target; annotations must not.
    pub target_required: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_duration: Duration::from_secs(24 * 3600),
            target_required: true,
        }
    }
}

impl Limits {
    /// For reading back a spec this crate wrote (the agent's state, the
    /// delay holder's control line): any duration, no target.
    pub fn stored() -> Self {
        Limits {
            max_duration: Duration::MAX,
            target_required: false,
        }
    }
}

fn parse_target(v: &Value) -> Result<Target, FieldError> {
    let m = obj(v, "target")?;
    if m.len() != 1 {
        return Err(FieldError::invalid(
            "target",
            "must have exactly one of: sandbox, pod, netns",
        ));
    }
    if let Some(s) = m.get("sandbox") {
        return Ok(Target::Sandbox(string(s, "target.sandbox")?.to_string()));
    }
    if let Some(n) = m.get("netns") {
        let path = string(n, "target.netns")?;
        if !path.starts_with('/') {
            return Err(FieldError::invalid(
                "target.netns",
                "must be an absolute path",
            ));
        }
        return Ok(Target::Netns(path.to_string()));
    }
    if let Some(p) = m.get("pod") {
        let pm = obj(p, "target.pod")?;
        reject_unknown(pm, "target.pod", &["namespace", "name"])?;
        let name = string(
            pm.get("name")
                .ok_or_else(|| FieldError::missing("target.pod.name"))?,
            "target.pod.name",
        )?;
        let namespace = match pm.get("namespace") {
            Some(ns) => string(ns, "target.pod.namespace")?,
            None => "default",
        };
        return Ok(Target::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    }
    let k = m.keys().next().map(String::as_str).unwrap_or_default();
    Err(FieldError::invalid(
        &join("target", k),
        "unknown target; expected one of: sandbox, pod, netns",
    ))
}

fn parse_match(v: &Value) -> Result<Match, FieldError> {
    let m = obj(v, "match")?;
    reject_unknown(m, "match", &["cidr", "protocol", "ports"])?;
    let cidr = match m.get("cidr") {
        None | Some(Value::Null) => None,
        Some(c) => {
            let s = string(c, "match.cidr")?;
            let net = if s.contains('/') {
                s.parse::<IpNet>().ok()
            } else {
                s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
            };
            Some(net.ok_or_else(|| {
                FieldError::invalid(
                    "match.cidr",
                    &format!("invalid CIDR {s:?}; expected e.g. 198.18.0.0/24 or fd00::/64"),
                )
            })?)
        }
    };
    let protocol = match m.get("protocol") {
        None | Some(Value::Null) => None,
        Some(p) => Some(match string(p, "match.protocol")? {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            "any" => Protocol::Any,
            other => {
                return Err(FieldError::invalid(
                    "match.protocol",
                    &format!("unknown protocol {other:?}; expected tcp, udp, icmp or any"),
                ))
            }
        }),
    };
    let ports = match m.get("ports") {
        None | Some(Value::Null) => Vec::new(),
        Some(p) => parse_ports(p, "match.ports", MAX_PORT_RANGES)?,
    };
    if !ports.is_empty() && protocol == Some(Protocol::Icmp) {
        return Err(FieldError::invalid(
            "match.ports",
            "ports cannot be combined with protocol icmp",
        ));
    }
    Ok(Match {
        cidr: cidr.map(|c| c.trunc()),
        protocol,
        ports,
    })
}

/// The proxy diverts TCP connections to `match.ports`: it needs the ports.
fn check_proxy_match(m: &Match) -> Result<(), FieldError> {
    if m.ports.is_empty() {
        return Err(FieldError::new(
            ErrorCode::Missing,
            "match.ports",
            "is required for proxy actions: the TCP ports whose connections the proxy serves",
        ));
    }
    if !matches!(m.protocol, None | Some(Protocol::Tcp) | Some(Protocol::Any)) {
        return Err(FieldError::invalid(
            "match.protocol",
            "proxy actions act on TCP connections; use tcp or any",
        ));
    }
    Ok(())
}

/// DNS faults act on the queries the pod sends, over UDP and TCP, to port
/// 53 or `match.ports`.
fn check_dns_match(m: &Match, direction: Direction) -> Result<(), FieldError> {
    if !matches!(
        m.protocol,
        None | Some(Protocol::Tcp) | Some(Protocol::Udp) | Some(Protocol::Any)
    ) {
        return Err(FieldError::invalid(
            "match.protocol",
            "DNS actions act on DNS over UDP and TCP; use udp, tcp or any",
        ));
    }
    if direction == Direction::Ingress {
        return Err(FieldError::invalid(
            "direction",
            "DNS actions act on the queries the pod sends: use egress (or both, the default)",
        ));
    }
    Ok(())
}

/// The ports a DNS fault diverts: `match.ports`, or 53.
pub fn dns_ports(m: &Match) -> Vec<PortRange> {
    if m.ports.is_empty() {
        vec![PortRange {
            lo: crate::action::DNS_PORT,
            hi: crate::action::DNS_PORT,
        }]
    } else {
        m.ports.clone()
    }
}

pub(crate) fn parse_direction(v: &Value, field: &str) -> Result<Direction, FieldError> {
    match string(v, field)? {
        "egress" => Ok(Direction::Egress),
        "ingress" => Ok(Direction::Ingress),
        "both" => Ok(Direction::Both),
        other => Err(FieldError::invalid(
            field,
            &format!("unknown direction {other:?}; expected egress, ingress or both"),
        )),
    }
}

/// A fault's `duration`: above zero and within the agent's maximum.
fn check_duration(duration: Duration, limits: &Limits) -> Result<(), FieldError> {
    if duration.is_zero() {
        return Err(FieldError::invalid("duration", "must be greater than zero"));
    }
    if duration > limits.max_duration {
        return Err(FieldError::invalid(
            "duration",
            &format!(
                "{} exceeds this agent's maximum of {}",
                humantime::format_duration(duration),
                humantime::format_duration(limits.max_duration)
            ),
        ));
    }
    Ok(())
}

impl FaultSpec {
    /// Parses and validates one fault. Errors name the offending field.
    pub fn parse(v: &Value, limits: &Limits) -> Result<FaultSpec, FieldError> {
        let m = obj(v, "").map_err(|_| FieldError::invalid("", "a fault must be a JSON object"))?;
        let known: &[&str] = if limits.target_required {
            &["target", "direction", "match", "action", "duration"]
        } else {
            &["direction", "match", "action", "duration"]
        };
        reject_unknown(m, "", known)?;
        let target = if limits.target_required {
            Some(req(m, "", "target", |t, _| parse_target(t))?)
        } else {
            None
        };
        let direction = opt(m, "", "direction", parse_direction)?.unwrap_or(Direction::Both);
        let r#match = opt(m, "", "match", |mv, _| parse_match(mv))?.unwrap_or_default();
        let action = req(m, "", "action", |a, _| parse_action(a))?;
        match &action {
            Action::Proxy(ProxyAction::Dns(_)) => check_dns_match(&r#match, direction)?,
            a if a.backend() == BackendKind::Proxy => check_proxy_match(&r#match)?,
            _ => {}
        }
        let duration = req(m, "", "duration", parse_duration)?;
        check_duration(duration, limits)?;
        Ok(FaultSpec {
            target,
            direction,
            r#match,
            action,
            duration,
        })
    }

    /// The canonical JSON form (the shape accepted by [`FaultSpec::parse`]).
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(t) = &self.target {
            out.insert(
                "target".into(),
                match t {
                    Target::Sandbox(id) => json!({"sandbox": id}),
                    Target::Netns(p) => json!({"netns": p}),
                    Target::Pod { namespace, name } => {
                        json!({"pod": {"namespace": namespace, "name": name}})
                    }
                },
            );
        }
        out.insert("direction".into(), json!(self.direction.as_str()));
        let mut mm = Map::new();
        if let Some(c) = &self.r#match.cidr {
            mm.insert("cidr".into(), json!(c.to_string()));
        }
        if let Some(p) = self.r#match.protocol {
            mm.insert("protocol".into(), json!(p.as_str()));
        }
        if !self.r#match.ports.is_empty() {
            let s: Vec<String> = self.r#match.ports.iter().map(|p| p.to_string()).collect();
            mm.insert("ports".into(), json!(s.join(",")));
        }
        out.insert("match".into(), Value::Object(mm));
        out.insert("action".into(), self.action.to_json());
        out.insert(
            "duration".into(),
            json!(humantime::format_duration(self.duration).to_string()),
        );
        Value::Object(out)
    }
}

/// A spec is stored as its canonical JSON ([`FaultSpec::to_json`]).
impl Serialize for FaultSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// A stored spec is read back with [`FaultSpec::parse`] under
/// [`Limits::stored`], taking a `target` when it has one. The error is the
/// [`FieldError`]'s `field: message`.
impl<'de> Deserialize<'de> for FaultSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let limits = Limits {
            target_required: v.get("target").is_some(),
            ..Limits::stored()
        };
        FaultSpec::parse(&v, &limits).map_err(de::Error::custom)
    }
}

pub use crate::annotations::{
    faults_from_annotations, ANNOTATION_DELAY, ANNOTATION_DIRECTION, ANNOTATION_DURATION,
    ANNOTATION_FAULTS, ANNOTATION_LOSS, DEFAULT_ANNOTATION_DURATION,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<FaultSpec, FieldError> {
        FaultSpec::parse(&v, &Limits::default())
    }

    fn field_of(v: Value) -> String {
        match parse(v) {
            Ok(s) => panic!("expected an error, parsed {s:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn full_loss_spec_round_trips() {
        let v = json!({
            "target": {"sandbox": "abc"},
            "direction": "egress",
            "match": {"cidr": "198.18.0.7/24", "protocol": "udp", "ports": "53,8000-8100"},
            "action": {"type": "loss", "percent": 10, "correlation": 25},
            "duration": "5m"
        });
        let s = parse(v).expect("valid");
        assert_eq!(s.direction, Direction::Egress);
        assert_eq!(
            s.r#match.cidr.map(|c| c.to_string()),
            Some("198.18.0.0/24".into())
        );
        assert_eq!(s.r#match.ports.len(), 2);
        assert_eq!(s.duration, Duration::from_secs(300));
        let again = parse(s.to_json()).expect("canonical form parses");
        assert_eq!(again, s);
    }

    #[test]
    fn defaults_apply() {
        let s = parse(json!({"target": {"pod": {"name": "web"}}, "action": {"type": "blackhole"}, "duration": "1s"}))
            .expect("valid");
        assert_eq!(s.direction, Direction::Both);
        assert_eq!(
            s.target,
            Some(Target::Pod {
                namespace: "default".into(),
                name: "web".into()
            })
        );
        assert_eq!(s.r#match, Match::default());
    }

    #[test]
    fn errors_name_the_field() {
        let base =
            |action: Value| json!({"target": {"sandbox": "x"}, "action": action, "duration": "1s"});
        assert_eq!(
            field_of(base(json!({"type": "loss", "percent": 101}))),
            "action.percent"
        );
        assert_eq!(field_of(base(json!({"type": "loss"}))), "action.percent");
        assert_eq!(
            field_of(base(json!({"type": "lose", "percent": 1}))),
            "action.type"
        );
        assert_eq!(
            field_of(base(json!({"type": "loss", "percent": "x"}))),
            "action.percent"
        );
        assert_eq!(
            field_of(base(json!({"type": "blackhole", "x": 1}))),
            "action.x"
        );
        assert_eq!(
            field_of(json!({"target": {"sandbox": "x"}, "action": {"type": "blackhole"}})),
            "duration"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "action": {"type": "blackhole"}, "duration": "soon"})
            ),
            "duration"
        );
        assert_eq!(
            field_of(json!({"action": {"type": "blackhole"}, "duration": "1s"})),
            "target"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "match": {"cidr": "1.2.3.4/40"}, "action": {"type": "blackhole"}, "duration": "1s"})
            ),
            "match.cidr"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "match": {"ports": "0"}, "action": {"type": "blackhole"}, "duration": "1s"})
            ),
            "match.ports"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "match": {"ports": "90-80"}, "action": {"type": "blackhole"}, "duration": "1s"})
            ),
            "match.ports"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "direction": "up", "action": {"type": "blackhole"}, "duration": "1s"})
            ),
            "direction"
        );
        assert_eq!(
            field_of(
                json!({"target": {"sandbox": "x"}, "action": {"type": "blackhole"}, "duration": "1000d"})
            ),
            "duration"
        );
    }

    #[test]
    fn proxy_actions_need_tcp_ports() {
        let with = |m: Value| {
            json!({"target": {"sandbox": "x"}, "match": m,
                "action": {"type": "http-abort", "status": 503}, "duration": "1s"})
        };
        let s = parse(with(json!({"ports": "80,8080", "protocol": "tcp"}))).expect("valid");
        assert_eq!(s.action.backend(), BackendKind::Proxy);
        assert_eq!(parse(s.to_json()).expect("canonical form parses"), s);
        parse(with(
            json!({"ports": 80, "protocol": "any", "cidr": "fd00::/64"}),
        ))
        .expect("valid");
        let e = parse(with(json!({}))).expect_err("ports are required");
        assert_eq!(
            (e.code.as_str(), e.field.as_str()),
            ("missing", "match.ports")
        );
        assert_eq!(
            field_of(json!({"target": {"sandbox": "x"},
            "action": {"type": "tcp-reset", "after": "1s"}, "duration": "1s"})),
            "match.ports"
        );
        assert_eq!(
            field_of(with(json!({"ports": "53", "protocol": "udp"}))),
            "match.protocol"
        );
        assert_eq!(
            field_of(json!({"target": {"sandbox": "x"}, "match": {"ports": "80"},
                "action": {"type": "http-abort"}, "duration": "1s"})),
            "action.status"
        );
    }

    /// A fault of every action type, with a target and without.
    fn samples() -> Vec<Value> {
        let actions = [
            json!({"type": "loss", "percent": 5, "correlation": 25}),
            json!({"type": "loss", "model": {"p": 1, "r": 20, "1-h": 90, "1-k": 0.5}}),
            json!({"type": "blackhole"}),
            json!({"type": "corrupt", "percent": 40}),
            json!({"type": "duplicate", "percent": 50, "correlation": 10}),
            json!({"type": "rate", "rate": "20mbit", "burst": "32kb"}),
            json!({"type": "delay", "latency": "20ms", "jitter": "5ms", "distribution": "pareto"}),
            json!({"type": "reorder", "percent": 25, "gap": 5, "latency": "10ms"}),
            json!({"type": "http-abort", "status": 503, "http": {"path": "/a/*", "method": "get"}}),
            json!({"type": "http-abort", "reset": true}),
            json!({"type": "http-delay", "delay": "1s", "phase": "response", "http": {"code": 500}}),
            json!({"type": "http-replace", "path": "/other?x=1", "method": "put"}),
            json!({"type": "http-patch", "headers": {"x-a": "1"}, "body_merge": {"a": null}}),
            json!({"type": "tcp-reset", "after": "300ms"}),
            json!({"type": "tcp-reset", "after_bytes": 4096, "percent": 25}),
            json!({"type": "tcp-slow-close", "delay": "2s"}),
            json!({"type": "tcp-bandwidth", "rate": "8mbit"}),
            json!({"type": "dns-error", "rcode": "servfail", "dns": {"names": ["*.example.test"]}}),
            json!({"type": "dns-drop", "percent": 50}),
            json!({"type": "dns-spoof", "addresses": ["192.0.2.7", "2001:db8::7"], "ttl": 60}),
            json!({"type": "dns-delay", "delay": "200ms", "dns": {"types": ["A", "AAAA"]}}),
            json!({"type": "dns-truncate"}),
        ];
        let mut out = Vec::new();
        for a in actions {
            let spec = json!({"direction": "egress",
                "match": {"cidr": "10.1.0.0/16", "protocol": "tcp", "ports": "80,8000-8100"},
                "action": a, "duration": "1h 30m"});
            let mut targeted = spec.clone();
            targeted["target"] = json!({"pod": {"namespace": "ns", "name": "web"}});
            out.extend([spec, targeted]);
        }
        out
    }

    /// A record that keeps its spec typed.
    #[derive(Debug, Serialize, Deserialize)]
    struct Stored {
        id: String,
        spec: FaultSpec,
    }

    #[test]
    fn every_action_type_round_trips_through_serde() {
        let mut types = std::collections::BTreeSet::new();
        for v in samples() {
            let limits = Limits {
                target_required: v.get("target").is_some(),
                ..Limits::default()
            };
            let spec = FaultSpec::parse(&v, &limits).unwrap_or_else(|e| panic!("{v}: {e}"));
            types.insert(spec.action.type_name());
            assert_eq!(serde_json::to_value(&spec).ok(), Some(spec.to_json()));
            let stored = Stored {
                id: "f-1".into(),
                spec,
            };
            let text = serde_json::to_string(&stored).expect("serializes");
            let back: Stored =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((back.id, back.spec), (stored.id, stored.spec), "{text}");
        }
        let all: std::collections::BTreeSet<&str> = BackendKind::ALL
            .into_iter()
            .flat_map(BackendKind::action_types)
            .collect();
        assert_eq!(types, all, "a sample of every action type");
    }

    #[test]
    fn dns_actions_take_udp_or_tcp_on_port_53_by_default() {
        let spec = |m: Value, dir: &str| {
            FaultSpec::parse(
                &json!({"target": {"sandbox": "x"}, "direction": dir, "match": m,
                    "action": {"type": "dns-error"}, "duration": "1m"}),
                &Limits::default(),
            )
        };
        let s = spec(json!({}), "both").expect("no ports: port 53");
        assert_eq!(dns_ports(&s.r#match), vec![PortRange { lo: 53, hi: 53 }]);
        let s = spec(json!({"protocol": "udp", "ports": "5353"}), "egress").expect("valid");
        assert_eq!(
            dns_ports(&s.r#match),
            vec![PortRange { lo: 5353, hi: 5353 }]
        );
        let e = spec(json!({"protocol": "icmp"}), "egress").expect_err("icmp");
        assert_eq!(e.field, "match.protocol");
        let e = spec(json!({}), "ingress").expect_err("ingress");
        assert_eq!(e.field, "direction");
    }

    #[test]
    fn stored_specs_take_any_duration() {
        let v = json!({"target": {"sandbox": "x"}, "action": {"type": "blackhole"}, "duration": "400d"});
        assert_eq!(field_of(v.clone()), "duration");
        let spec: FaultSpec = serde_json::from_value(v).expect("no maximum when stored");
        assert_eq!(spec.duration, Duration::from_secs(400 * 86400));
        assert_eq!(spec.target, Some(Target::Sandbox("x".into())));
    }

    #[test]
    fn a_bad_stored_spec_names_the_field() {
        let bad = json!({"action": {"type": "loss", "percent": 200}, "duration": "1m"});
        let e = serde_json::from_value::<FaultSpec>(bad).expect_err("bad percent");
        assert_eq!(
            e.to_string(),
            "action.percent: must be from 0 to 100, got 200"
        );
        let text = r#"{"id": "f-1", "spec": {"target": {"sandbox": ""}, "action": {"type": "blackhole"}, "duration": "1m"}}"#;
        let e = serde_json::from_str::<Stored>(text).expect_err("empty sandbox");
        assert!(
            e.to_string()
                .starts_with("target.sandbox: must not be empty"),
            "{e}"
        );
        let e = serde_json::from_value::<FaultSpec>(json!([1])).expect_err("not an object");
        assert_eq!(e.to_string(), ": a fault must be a JSON object");
    }
}
