//! Fault actions: what a fault does to the packets it matches.
//!
//! Parsing and the canonical JSON form of every action in the contract,
//! grouped by the backend that serves them: [`PacketAction`] (the tc eBPF
//! datapath), [`DelayAction`] (the NFQUEUE delay engine) and [`ProxyAction`]
//! (the transparent proxy). Whether a backend is available is the agent's
//! business; [`Action::backend`] only names the one that owns an action, so
//! the agent can say when it is unavailable.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::FieldError;
use crate::parse::{obj, ACTION};

mod delay;
mod dns;
mod packet;
mod proxy;
pub mod verbs;

pub use delay::{DelayAction, Distribution};
pub use dns::{
    DnsAction, DnsFault, DnsSelector, NamePattern, Rcode, RecordType, DNS_PORT, MAX_DNS_DELAY,
};
pub use packet::{GilbertElliott, PacketAction};
pub use proxy::{
    HttpAbort, HttpFault, HttpSelector, Phase, ProxyAction, ResetAfter, TcpFault, MAX_PROXY_BODY,
    MAX_PROXY_DELAY,
};

/// Which part of netfault serves an action: the one name of each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The tc eBPF datapath ([`PacketAction`]s).
    Ebpf,
    /// nft diversion to NFQUEUE and the agent's delay engine ([`DelayAction`]s).
    Nfqueue,
    /// nft TPROXY diversion to the agent's transparent L4/L7 proxy
    /// ([`ProxyAction`]s).
    Proxy,
}

impl BackendKind {
    /// Every backend.
    pub const ALL: [BackendKind; 3] = [BackendKind::Ebpf, BackendKind::Nfqueue, BackendKind::Proxy];

    /// The name the API reports (`"ebpf-tc"`, `"nfqueue"`, `"proxy"`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Ebpf => "ebpf-tc",
            BackendKind::Nfqueue => "nfqueue",
            BackendKind::Proxy => "proxy",
        }
    }

    /// The backend an API name stands for; also takes the older spellings
    /// `ebpf`, `delay` and `delayqueue`.
    pub fn from_api_name(name: &str) -> Option<Self> {
        match name {
            "ebpf-tc" | "ebpf" => Some(BackendKind::Ebpf),
            "nfqueue" | "delay" | "delayqueue" => Some(BackendKind::Nfqueue),
            "proxy" => Some(BackendKind::Proxy),
            _ => None,
        }
    }

    /// The action types this backend serves, by their API names.
    pub fn action_types(self) -> impl Iterator<Item = &'static str> {
        ACTION_TYPES
            .iter()
            .filter(move |(_, parser)| parser.backend() == self)
            .map(|(name, _)| *name)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BackendKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BackendKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        BackendKind::from_api_name(&name)
            .ok_or_else(|| de::Error::custom(format!("unknown backend {name:?}")))
    }
}

/// What a fault does to the packets or connections it matches, grouped by
/// the backend that serves it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Served by the tc eBPF datapath ([`BackendKind::Ebpf`]).
    Packet(PacketAction),
    /// Served by the NFQUEUE delay engine ([`BackendKind::Nfqueue`]).
    Delay(DelayAction),
    /// An HTTP or TCP fault served by the transparent proxy
    /// ([`BackendKind::Proxy`]) on the connections to `match.ports`.
    Proxy(ProxyAction),
}

impl Action {
    pub fn type_name(&self) -> &'static str {
        match self {
            Action::Packet(a) => a.type_name(),
            Action::Delay(a) => a.type_name(),
            Action::Proxy(a) => a.type_name(),
        }
    }

    pub fn backend(&self) -> BackendKind {
        match self {
            Action::Packet(_) => BackendKind::Ebpf,
            Action::Delay(_) => BackendKind::Nfqueue,
            Action::Proxy(_) => BackendKind::Proxy,
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Action::Packet(a) => a.to_json(),
            Action::Delay(a) => a.to_json(),
            Action::Proxy(a) => a.to_json(),
        }
    }
}

impl From<PacketAction> for Action {
    fn from(a: PacketAction) -> Self {
        Action::Packet(a)
    }
}

impl From<DelayAction> for Action {
    fn from(a: DelayAction) -> Self {
        Action::Delay(a)
    }
}

impl From<ProxyAction> for Action {
    fn from(a: ProxyAction) -> Self {
        Action::Proxy(a)
    }
}

/// The parser of one action type, by the backend that serves it.
#[derive(Clone, Copy)]
enum Parser {
    Packet(fn(&Map<String, Value>) -> Result<PacketAction, FieldError>),
    Delay(fn(&Map<String, Value>) -> Result<DelayAction, FieldError>),
    Proxy(fn(&Map<String, Value>) -> Result<ProxyAction, FieldError>),
}

impl Parser {
    fn backend(self) -> BackendKind {
        match self {
            Parser::Packet(_) => BackendKind::Ebpf,
            Parser::Delay(_) => BackendKind::Nfqueue,
            Parser::Proxy(_) => BackendKind::Proxy,
        }
    }

    fn parse(self, m: &Map<String, Value>) -> Result<Action, FieldError> {
        match self {
            Parser::Packet(parse) => parse(m).map(Action::Packet),
            Parser::Delay(parse) => parse(m).map(Action::Delay),
            Parser::Proxy(parse) => parse(m).map(Action::Proxy),
        }
    }
}

/// Every action type by its API name, in the order errors list them.
const ACTION_TYPES: &[(&str, Parser)] = &[
    ("loss", Parser::Packet(packet::loss)),
    ("blackhole", Parser::Packet(packet::blackhole)),
    ("delay", Parser::Delay(delay::delay)),
    ("reorder", Parser::Delay(delay::reorder)),
    ("corrupt", Parser::Packet(packet::corrupt)),
    ("duplicate", Parser::Packet(packet::duplicate)),
    ("rate", Parser::Packet(packet::rate)),
    ("http-abort", Parser::Proxy(proxy::http_abort)),
    ("http-delay", Parser::Proxy(proxy::http_delay)),
    ("http-replace", Parser::Proxy(proxy::http_replace)),
    ("http-patch", Parser::Proxy(proxy::http_patch)),
    ("tcp-reset", Parser::Proxy(proxy::tcp_reset)),
    ("tcp-slow-close", Parser::Proxy(proxy::tcp_slow_close)),
    ("tcp-bandwidth", Parser::Proxy(proxy::tcp_bandwidth)),
    ("dns-error", Parser::Proxy(dns::dns_error)),
    ("dns-drop", Parser::Proxy(dns::dns_drop)),
    ("dns-spoof", Parser::Proxy(dns::dns_spoof)),
    ("dns-delay", Parser::Proxy(dns::dns_delay)),
    ("dns-truncate", Parser::Proxy(dns::dns_truncate)),
];

/// Parses `action`. Errors name the field (`action.latency`).
pub fn parse_action(v: &Value) -> Result<Action, FieldError> {
    let m = obj(v, ACTION)?;
    let ty = match m.get("type") {
        None => return Err(FieldError::missing("action.type")),
        Some(t) => t
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FieldError::invalid("action.type", "must be a string"))?,
    };
    let Some((_, parser)) = ACTION_TYPES.iter().find(|(name, _)| *name == ty) else {
        let supported: Vec<&str> = ACTION_TYPES.iter().map(|(name, _)| *name).collect();
        return Err(FieldError::invalid(
            "action.type",
            &format!("unknown action {ty:?}; supported: {}", supported.join(", ")),
        ));
    };
    parser.parse(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse_rate, parse_size};
    use serde_json::json;
    use std::time::Duration;

    fn field(v: Value) -> String {
        match parse_action(&v) {
            Ok(a) => panic!("expected an error, parsed {a:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn every_packet_action_round_trips() {
        for v in [
            json!({"type": "loss", "percent": 5, "correlation": 25}),
            json!({"type": "loss", "model": {"type": "gilbert-elliott", "p": 1, "r": 20, "1-h": 90, "1-k": 0.5}}),
            json!({"type": "blackhole"}),
            json!({"type": "delay", "latency": "20ms", "jitter": "5ms", "correlation": 25, "distribution": "pareto"}),
            json!({"type": "reorder", "percent": 25, "gap": 5, "latency": "10ms"}),
            json!({"type": "corrupt", "percent": 40}),
            json!({"type": "duplicate", "percent": 50, "correlation": 10}),
            json!({"type": "rate", "rate": "20mbit", "burst": "32kb"}),
        ] {
            let a = parse_action(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
            let again = parse_action(&a.to_json()).expect("canonical form parses");
            assert_eq!(again, a, "{v}");
        }
    }

    #[test]
    fn backends_have_one_name_each() {
        for b in BackendKind::ALL {
            assert_eq!(BackendKind::from_api_name(b.as_str()), Some(b));
            assert_eq!(b.to_string(), b.as_str());
            let v = serde_json::to_value(b).expect("serializes");
            assert_eq!(v, json!(b.as_str()));
            assert_eq!(serde_json::from_value::<BackendKind>(v).ok(), Some(b));
        }
        assert_eq!(
            BackendKind::ALL.map(BackendKind::as_str),
            ["ebpf-tc", "nfqueue", "proxy"]
        );
        for (legacy, b) in [
            ("ebpf", BackendKind::Ebpf),
            ("delay", BackendKind::Nfqueue),
            ("delayqueue", BackendKind::Nfqueue),
        ] {
            assert_eq!(BackendKind::from_api_name(legacy), Some(b));
            assert_eq!(
                serde_json::from_value::<BackendKind>(json!(legacy)).ok(),
                Some(b)
            );
        }
        assert_eq!(BackendKind::from_api_name("tc"), None);
        assert!(serde_json::from_value::<BackendKind>(json!("tc")).is_err());
    }

    #[test]
    fn every_type_is_dispatched_to_its_backend() {
        let e = parse_action(&json!({"type": "lose"})).expect_err("unknown type");
        assert_eq!(
            e.to_string(),
            "action.type: unknown action \"lose\"; supported: loss, blackhole, delay, reorder, \
             corrupt, duplicate, rate, http-abort, http-delay, http-replace, http-patch, \
             tcp-reset, tcp-slow-close, tcp-bandwidth, dns-error, dns-drop, dns-spoof, dns-delay, \
             dns-truncate"
        );
        assert_eq!(
            BackendKind::Ebpf.action_types().collect::<Vec<_>>(),
            ["loss", "blackhole", "corrupt", "duplicate", "rate"]
        );
        assert_eq!(
            BackendKind::Nfqueue.action_types().collect::<Vec<_>>(),
            ["delay", "reorder"]
        );
        assert_eq!(BackendKind::Proxy.action_types().count(), 12);
        for b in BackendKind::ALL {
            for ty in b.action_types() {
                // Only the type: parsed by its own parser, which names a
                // missing field or accepts it, never `action.type`.
                match parse_action(&json!({ "type": ty })) {
                    Ok(a) => assert_eq!((a.type_name(), a.backend()), (ty, b)),
                    Err(e) => assert_ne!(e.field, "action.type", "{ty}: {e}"),
                }
            }
        }
    }

    #[test]
    fn actions_name_their_backend() {
        for (v, b) in [
            (json!({"type": "loss", "percent": 1}), BackendKind::Ebpf),
            (json!({"type": "blackhole"}), BackendKind::Ebpf),
            (json!({"type": "rate", "rate": "1mbit"}), BackendKind::Ebpf),
            (
                json!({"type": "delay", "latency": "1ms"}),
                BackendKind::Nfqueue,
            ),
            (
                json!({"type": "reorder", "percent": 5}),
                BackendKind::Nfqueue,
            ),
            (
                json!({"type": "tcp-reset", "after": "1s"}),
                BackendKind::Proxy,
            ),
        ] {
            let a = parse_action(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(a.backend(), b, "{v}");
        }
    }

    #[test]
    fn units_and_defaults() {
        assert_eq!(parse_rate(&json!("20mbit"), "r"), Ok(20_000_000));
        assert_eq!(parse_rate(&json!("1.5gbit"), "r"), Ok(1_500_000_000));
        assert_eq!(parse_rate(&json!("10mbps"), "r"), Ok(80_000_000));
        assert_eq!(parse_size(&json!("32kb"), "b"), Ok(32768));
        assert_eq!(parse_size(&json!(3000), "b"), Ok(3000));
        let Ok(Action::Packet(PacketAction::Loss { model: Some(m), .. })) =
            parse_action(&json!({"type": "loss", "model": {"p": 5}}))
        else {
            panic!("gemodel with defaults");
        };
        assert_eq!((m.r, m.one_minus_h, m.one_minus_k), (95.0, 100.0, 0.0));
        let Ok(Action::Delay(DelayAction::Delay {
            distribution,
            percent,
            ..
        })) = parse_action(&json!({"type": "delay", "latency": "1ms"}))
        else {
            panic!("delay defaults");
        };
        assert_eq!((distribution, percent), (Distribution::Uniform, 100.0));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(json!({"type": "delay"})), "action.latency");
        assert_eq!(
            field(json!({"type": "delay", "latency": "fast"})),
            "action.latency"
        );
        assert_eq!(
            field(json!({"type": "delay", "latency": "1ms", "distribution": "poisson"})),
            "action.distribution"
        );
        assert_eq!(
            field(json!({"type": "delay", "latency": "0ms"})),
            "action.latency"
        );
        assert_eq!(field(json!({"type": "rate"})), "action.rate");
        assert_eq!(
            field(json!({"type": "rate", "rate": "fast"})),
            "action.rate"
        );
        assert_eq!(
            field(json!({"type": "rate", "rate": "1bit"})),
            "action.rate"
        );
        assert_eq!(
            field(json!({"type": "rate", "rate": "1mbit", "burst": "huge"})),
            "action.burst"
        );
        assert_eq!(
            field(json!({"type": "reorder", "gap": 5})),
            "action.percent"
        );
        assert_eq!(
            field(json!({"type": "reorder", "percent": 5, "gap": -1})),
            "action.gap"
        );
        assert_eq!(
            field(json!({"type": "corrupt", "percent": 400})),
            "action.percent"
        );
        assert_eq!(
            field(json!({"type": "loss", "model": {"p": 5, "q": 1}})),
            "action.model.q"
        );
        assert_eq!(
            field(json!({"type": "loss", "model": {"r": 5}})),
            "action.model.p"
        );
        assert_eq!(field(json!({"type": "http-abort"})), "action.status");
    }

    #[test]
    fn every_proxy_action_round_trips() {
        for v in [
            json!({"type": "http-abort", "status": 503}),
            json!({"type": "http-abort", "status": 404, "body": "gone", "percent": 50,
                "http": {"path": "/api/*", "method": "get", "headers": {"X-User": "bob"}}}),
            json!({"type": "http-abort", "reset": true}),
            json!({"type": "http-delay", "delay": "150ms"}),
            json!({"type": "http-delay", "delay": "1s", "phase": "response", "http": {"code": 500}}),
            json!({"type": "http-replace", "phase": "response", "status": 500, "body": "x",
                "headers": {"Content-Type": "text/plain"}}),
            json!({"type": "http-replace", "path": "/other?x=1", "method": "put"}),
            json!({"type": "http-patch", "headers": {"x-a": "1"}, "query": {"debug": "1"}}),
            json!({"type": "http-patch", "phase": "response", "body_merge": {"a": null, "b": [1, 2]}}),
            json!({"type": "http-patch", "phase": "response", "body_merge": "replaced"}),
            json!({"type": "tcp-reset", "after": "300ms"}),
            json!({"type": "tcp-reset", "after_bytes": 4096, "percent": 25}),
            json!({"type": "tcp-slow-close", "delay": "2s"}),
            json!({"type": "tcp-bandwidth", "rate": "8mbit"}),
        ] {
            let a = parse_action(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(a.backend(), BackendKind::Proxy, "{v}");
            assert_eq!(a.type_name(), v["type"].as_str().unwrap_or_default());
            let again = parse_action(&a.to_json()).expect("canonical form parses");
            assert_eq!(again, a, "{v}");
        }
    }

    #[test]
    fn proxy_actions_parse_to_their_model() {
        let a = parse_action(
            &json!({"type": "http-abort", "status": 503, "percent": "50%",
            "http": {"path": "/a/*", "method": "post", "headers": {"X-Tenant": "t1"}}}),
        )
        .expect("valid");
        let Action::Proxy(ProxyAction::Http {
            fault,
            selector,
            percent,
        }) = a
        else {
            panic!("not an http action: {a:?}");
        };
        assert_eq!(
            fault,
            HttpFault::Abort(HttpAbort::Status {
                status: 503,
                body: None
            })
        );
        assert_eq!(percent, 50.0);
        assert_eq!(selector.path.as_deref(), Some("/a/*"));
        assert_eq!(selector.method.as_deref(), Some("POST"));
        assert_eq!(
            selector.headers.get("x-tenant").map(String::as_str),
            Some("t1")
        );
        let Ok(Action::Proxy(ProxyAction::Http { fault, .. })) =
            parse_action(&json!({"type": "http-delay", "delay": "20ms"}))
        else {
            panic!("delay");
        };
        assert_eq!(
            fault,
            HttpFault::Delay {
                delay: Duration::from_millis(20),
                phase: Phase::Request
            }
        );
        assert_eq!(
            parse_action(&json!({"type": "tcp-bandwidth", "rate": "1mbit"})),
            Ok(Action::Proxy(ProxyAction::Tcp {
                fault: TcpFault::Bandwidth {
                    bits_per_sec: 1_000_000
                },
                percent: 100.0
            }))
        );
        assert_eq!(
            parse_action(&json!({"type": "tcp-reset", "after_bytes": 0})),
            Ok(Action::Proxy(ProxyAction::Tcp {
                fault: TcpFault::Reset {
                    after: ResetAfter::Bytes(0)
                },
                percent: 100.0
            }))
        );
    }

    #[test]
    fn proxy_errors_name_the_field() {
        for (v, f) in [
            (json!({"type": "http-abort"}), "action.status"),
            (json!({"type": "http-abort", "status": 99}), "action.status"),
            (
                json!({"type": "http-abort", "status": 600}),
                "action.status",
            ),
            (
                json!({"type": "http-abort", "status": 101}),
                "action.status",
            ),
            (
                json!({"type": "http-abort", "status": "503"}),
                "action.status",
            ),
            (
                json!({"type": "http-abort", "status": 503, "reset": true}),
                "action.reset",
            ),
            (
                json!({"type": "http-abort", "reset": "yes"}),
                "action.reset",
            ),
            (
                json!({"type": "http-abort", "reset": true, "body": "x"}),
                "action.body",
            ),
            (
                json!({"type": "http-abort", "status": 503, "body": 5}),
                "action.body",
            ),
            (
                json!({"type": "http-abort", "status": 503, "percent": 101}),
                "action.percent",
            ),
            (
                json!({"type": "http-abort", "status": 503, "phase": "request"}),
                "action.phase",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": "/x"}),
                "action.http",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"path": "x"}}),
                "action.http.path",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"path": "/a b"}}),
                "action.http.path",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"path": ""}}),
                "action.http.path",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"method": "GE T"}}),
                "action.http.method",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"headers": {"a b": "1"}}}),
                "action.http.headers.a b",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"headers": {"x": 1}}}),
                "action.http.headers.x",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"headers": {"x": "a
b"}}}),
                "action.http.headers.x",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"code": 500}}),
                "action.http.code",
            ),
            (
                json!({"type": "http-abort", "status": 503, "http": {"host": "x"}}),
                "action.http.host",
            ),
            (json!({"type": "http-delay"}), "action.delay"),
            (json!({"type": "http-delay", "delay": "0s"}), "action.delay"),
            (json!({"type": "http-delay", "delay": "1h"}), "action.delay"),
            (
                json!({"type": "http-delay", "delay": "soon"}),
                "action.delay",
            ),
            (
                json!({"type": "http-delay", "delay": "1s", "phase": "both"}),
                "action.phase",
            ),
            (
                json!({"type": "http-delay", "delay": "1s", "http": {"code": 42}}),
                "action.http.code",
            ),
            (
                json!({"type": "http-delay", "delay": "1s", "http": {"code": 500}}),
                "action.http.code",
            ),
            (json!({"type": "http-replace"}), "action"),
            (
                json!({"type": "http-replace", "status": 500}),
                "action.status",
            ),
            (
                json!({"type": "http-replace", "phase": "response", "path": "/x"}),
                "action.path",
            ),
            (
                json!({"type": "http-replace", "phase": "response", "method": "GET"}),
                "action.method",
            ),
            (json!({"type": "http-replace", "path": "x"}), "action.path"),
            (
                json!({"type": "http-replace", "path": "/a b"}),
                "action.path",
            ),
            (
                json!({"type": "http-replace", "method": "G(T"}),
                "action.method",
            ),
            (
                json!({"type": "http-replace", "headers": {"content-length": "5"}}),
                "action.headers.content-length",
            ),
            (
                json!({"type": "http-replace", "headers": {"X-A": "1", "x-a": "2"}}),
                "action.headers.x-a",
            ),
            (
                json!({"type": "http-replace", "headers": []}),
                "action.headers",
            ),
            (
                json!({"type": "http-replace", "body": {"a": 1}}),
                "action.body",
            ),
            (json!({"type": "http-patch"}), "action"),
            (
                json!({"type": "http-patch", "query": "a=1"}),
                "action.query",
            ),
            (
                json!({"type": "http-patch", "query": {"a": [1]}}),
                "action.query.a",
            ),
            (
                json!({"type": "http-patch", "phase": "response", "query": {"a": "1"}}),
                "action.query",
            ),
            (
                json!({"type": "http-patch", "headers": {"Transfer-Encoding": "chunked"}}),
                "action.headers.Transfer-Encoding",
            ),
            (
                json!({"type": "http-patch", "body_merge": "x".repeat(MAX_PROXY_BODY + 1)}),
                "action.body_merge",
            ),
            (json!({"type": "http-patch", "body": "x"}), "action.body"),
            (json!({"type": "tcp-reset"}), "action.after"),
            (
                json!({"type": "tcp-reset", "after": "1s", "after_bytes": 10}),
                "action.after_bytes",
            ),
            (
                json!({"type": "tcp-reset", "after_bytes": -1}),
                "action.after_bytes",
            ),
            (
                json!({"type": "tcp-reset", "after": "forever"}),
                "action.after",
            ),
            (
                json!({"type": "tcp-reset", "after": "1s", "http": {}}),
                "action.http",
            ),
            (json!({"type": "tcp-slow-close"}), "action.delay"),
            (
                json!({"type": "tcp-slow-close", "delay": "0ms"}),
                "action.delay",
            ),
            (json!({"type": "tcp-bandwidth"}), "action.rate"),
            (
                json!({"type": "tcp-bandwidth", "rate": "fast"}),
                "action.rate",
            ),
            (
                json!({"type": "tcp-bandwidth", "rate": "1mbit", "percent": -1}),
                "action.percent",
            ),
        ] {
            assert_eq!(field(v.clone()), f, "{v}");
        }
    }
}
