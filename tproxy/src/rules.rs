//! Rules as the proxy uses them: compiled once in `Proxy::set_rules` into
//! ready-to-use header names, methods and bodies, and matched against
//! connections (direction, port, CIDR, deadline) and HTTP requests (path
//! glob, method, headers, response code). DNS rules are kept as they are:
//! `netfault-dns` matches queries.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use netfault_api::action::{
    DnsAction, HttpAbort, HttpFault, HttpSelector, Phase, ProxyAction, TcpFault,
};

use crate::{glob::glob_match, ProxyRule, Side};

/// A rule ready to apply.
#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub rule: ProxyRule,
    pub kind: RuleKind,
}

#[derive(Debug)]
pub(crate) enum RuleKind {
    Http(HttpRule),
    Tcp {
        fault: TcpFault,
        percent: f64,
    },
    /// Served by the DNS-over-TCP relay (`dns.rs`).
    Dns(DnsAction),
}

#[derive(Debug)]
pub(crate) struct HttpRule {
    pub percent: f64,
    pub phase: Phase,
    pub selector: Selector,
    pub op: HttpOp,
}

#[derive(Debug, Default)]
pub(crate) struct Selector {
    pub path: Option<String>,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub code: Option<StatusCode>,
}

pub(crate) type Headers = Vec<(HeaderName, HeaderValue)>;

#[derive(Debug)]
pub(crate) enum HttpOp {
    Abort {
        status: StatusCode,
        body: Option<Bytes>,
    },
    Reset,
    Delay(Duration),
    Replace {
        status: Option<StatusCode>,
        headers: Headers,
        body: Option<Bytes>,
        path: Option<String>,
        method: Option<Method>,
    },
    Patch {
        headers: Headers,
        /// Already encoded: `a=1&b=x%20y`.
        query: String,
        body_merge: Option<serde_json::Value>,
    },
}

fn header_pairs(rule: &str, map: &std::collections::BTreeMap<String, String>) -> Option<Headers> {
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) else {
            tracing::warn!(rule, header = %k, "skipping a rule with an unusable header");
            return None;
        };
        out.push((name, value));
    }
    Some(out)
}

fn status(rule: &str, s: u16) -> Option<StatusCode> {
    let code = StatusCode::from_u16(s).ok();
    if code.is_none() {
        tracing::warn!(rule, status = s, "skipping a rule with an unusable status");
    }
    code
}

fn method(rule: &str, m: &str) -> Option<Method> {
    let method = Method::from_bytes(m.as_bytes()).ok();
    if method.is_none() {
        tracing::warn!(rule, method = m, "skipping a rule with an unusable method");
    }
    method
}

impl Selector {
    fn compile(id: &str, selector: &HttpSelector) -> Option<Selector> {
        Some(Selector {
            path: selector.path.clone(),
            method: match &selector.method {
                Some(m) => Some(method(id, m)?),
                None => None,
            },
            headers: header_pairs(id, &selector.headers)?,
            code: match selector.code {
                Some(c) => Some(status(id, c)?),
                None => None,
            },
        })
    }
}

impl HttpOp {
    fn compile(id: &str, fault: &HttpFault) -> Option<HttpOp> {
        Some(match fault {
            HttpFault::Abort(HttpAbort::Reset) => HttpOp::Reset,
            HttpFault::Abort(HttpAbort::Status { status: s, body }) => HttpOp::Abort {
                status: status(id, *s)?,
                body: body.clone().map(Bytes::from),
            },
            HttpFault::Delay { delay, .. } => HttpOp::Delay(*delay),
            HttpFault::Replace {
                status: s,
                headers,
                body,
                path,
                method: m,
                ..
            } => HttpOp::Replace {
                status: match s {
                    Some(s) => Some(status(id, *s)?),
                    None => None,
                },
                headers: header_pairs(id, headers)?,
                body: body.clone().map(Bytes::from),
                path: path.clone(),
                method: match m {
                    Some(m) => Some(method(id, m)?),
                    None => None,
                },
            },
            HttpFault::Patch {
                headers,
                query,
                body_merge,
                ..
            } => {
                let mut q = String::new();
                for (k, v) in query {
                    if !q.is_empty() {
                        q.push('&');
                    }
                    encode_query_part(k, &mut q);
                    q.push('=');
                    encode_query_part(v, &mut q);
                }
                HttpOp::Patch {
                    headers: header_pairs(id, headers)?,
                    query: q,
                    body_merge: body_merge.clone(),
                }
            }
        })
    }
}

/// `application/x-www-form-urlencoded`-style encoding of a query part.
pub(crate) fn encode_query_part(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

impl CompiledRule {
    /// Compiles a rule; `None` (with a warning) for a rule the proxy cannot
    /// serve. The API validates rules, so that means a caller's bug.
    pub(crate) fn compile(rule: ProxyRule) -> Option<CompiledRule> {
        let kind = match &rule.action {
            ProxyAction::Tcp { fault, percent } => RuleKind::Tcp {
                fault: *fault,
                percent: *percent,
            },
            ProxyAction::Http {
                fault,
                selector,
                percent,
            } => RuleKind::Http(HttpRule {
                percent: *percent,
                phase: fault.phase(),
                selector: Selector::compile(&rule.id, selector)?,
                op: HttpOp::compile(&rule.id, fault)?,
            }),
            ProxyAction::Dns(a) => RuleKind::Dns(a.clone()),
        };
        Some(CompiledRule { rule, kind })
    }

    /// The HTTP part of an HTTP rule.
    pub(crate) fn http(&self) -> Option<&HttpRule> {
        match &self.kind {
            RuleKind::Http(h) => Some(h),
            RuleKind::Tcp { .. } | RuleKind::Dns(_) => None,
        }
    }

    /// The action of a DNS rule.
    pub(crate) fn dns(&self) -> Option<&DnsAction> {
        match &self.kind {
            RuleKind::Dns(a) => Some(a),
            RuleKind::Http(_) | RuleKind::Tcp { .. } => None,
        }
    }

    /// Whether the rule applies to a connection: live, on this side, to this
    /// port, from or to this network.
    pub(crate) fn applies_to(
        &self,
        side: Side,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        now: Instant,
    ) -> bool {
        let r = &self.rule;
        if now >= r.deadline || !side.matches(r.direction) {
            return false;
        }
        let port = orig_dst.port();
        let m = &r.selector;
        if !m.ports.is_empty() && !m.ports.iter().any(|p| p.lo <= port && port <= p.hi) {
            return false;
        }
        if let Some(net) = m.cidr {
            let remote = match side {
                Side::Inbound => peer.ip(),
                Side::Outbound => orig_dst.ip(),
            };
            if !net.contains(&canonical(remote)) {
                return false;
            }
        }
        true
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view of IPv4 peers)
/// as plain IPv4, so an IPv4 CIDR matches them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Selector {
    /// The request half of the selector: path glob, method, headers.
    pub(crate) fn matches_request(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.matches_head(method.as_str(), path, |name, value| {
            headers.get_all(name).iter().any(|v| v == value)
        })
    }

    /// [`Selector::matches_request`] on a request head as parsed text:
    /// `has_header` says whether the request carries a header with this
    /// name (any case) and exactly this value.
    pub(crate) fn matches_head(
        &self,
        method: &str,
        path: &str,
        has_header: impl Fn(&HeaderName, &HeaderValue) -> bool,
    ) -> bool {
        if let Some(m) = &self.method {
            if !m.as_str().eq_ignore_ascii_case(method) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !glob_match(p, path) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| has_header(name, value))
    }

    /// The response half: the status code.
    pub(crate) fn matches_code(&self, status: StatusCode) -> bool {
        self.code.is_none_or(|c| c == status)
    }
}

/// Whether a fault with `percent` acts this time.
pub(crate) fn roll(percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    rand::random::<f64>() * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;
    use netfault_api::spec::{Direction, FaultSpec, Limits};
    use netfault_api::Action;
    use serde_json::json;
    use std::sync::Arc;

    fn rule(v: serde_json::Value) -> CompiledRule {
        let mut v = v;
        v["target"] = json!({"sandbox": "x"});
        v["duration"] = json!("1m");
        let spec = FaultSpec::parse(&v, &Limits::default()).expect("valid spec");
        CompiledRule::compile(ProxyRule {
            id: "r".into(),
            direction: spec.direction,
            selector: spec.r#match,
            action: match spec.action {
                Action::Proxy(a) => a,
                other => panic!("not a proxy action: {other:?}"),
            },
            deadline: Instant::now() + Duration::from_secs(60),
            counters: Arc::default(),
        })
        .expect("compiles")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn connection_matching_uses_side_port_and_remote_network() {
        let r = rule(
            json!({"direction": "ingress", "match": {"ports": "80,8000-8100", "cidr": "10.1.0.0/16"},
            "action": {"type": "tcp-reset", "after": "1s"}}),
        );
        let now = Instant::now();
        let client = addr("10.1.2.3:40000");
        assert!(r.applies_to(Side::Inbound, client, addr("10.9.0.1:80"), now));
        assert!(r.applies_to(Side::Inbound, client, addr("10.9.0.1:8050"), now));
        assert!(!r.applies_to(Side::Inbound, client, addr("10.9.0.1:81"), now));
        assert!(!r.applies_to(Side::Outbound, client, addr("10.1.0.1:80"), now));
        assert!(!r.applies_to(Side::Inbound, addr("10.2.0.1:1"), addr("10.9.0.1:80"), now));
        assert!(r.applies_to(
            Side::Inbound,
            addr("[::ffff:10.1.0.9]:1"),
            addr("[::1]:80"),
            now
        ));
        assert!(!r.applies_to(
            Side::Inbound,
            client,
            addr("10.9.0.1:80"),
            now + Duration::from_secs(61)
        ));
        let egress = rule(
            json!({"direction": "egress", "match": {"ports": "443", "cidr": "fd00::/64"},
            "action": {"type": "tcp-reset", "after": "1s"}}),
        );
        assert!(egress.applies_to(
            Side::Outbound,
            addr("[fd01::1]:5"),
            addr("[fd00::7]:443"),
            now
        ));
        assert!(!egress.applies_to(
            Side::Outbound,
            addr("[fd00::1]:5"),
            addr("[fd01::7]:443"),
            now
        ));
        assert_eq!(egress.rule.direction, Direction::Egress);
    }

    #[test]
    fn request_selector_matches_method_path_and_headers() {
        let r = rule(
            json!({"match": {"ports": "80"}, "action": {"type": "http-abort", "status": 503,
            "http": {"path": "/api/*", "method": "post", "headers": {"X-Tenant": "a"}}}}),
        );
        let RuleKind::Http(h) = &r.kind else {
            panic!("http rule");
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("a"));
        let s = &h.selector;
        assert!(s.matches_request(&Method::POST, "/api/v1", &headers));
        assert!(!s.matches_request(&Method::GET, "/api/v1", &headers));
        assert!(!s.matches_request(&Method::POST, "/web", &headers));
        assert!(!s.matches_request(&Method::POST, "/api/v1", &HeaderMap::new()));
        headers.insert("x-tenant", HeaderValue::from_static("b"));
        assert!(!s.matches_request(&Method::POST, "/api/v1", &headers));
    }

    #[test]
    fn percent_rolls_at_the_edges() {
        assert!((0..1000).all(|_| roll(100.0)));
        assert!((0..1000).all(|_| !roll(0.0)));
        let hits = (0..10_000).filter(|_| roll(30.0)).count();
        // 3000 expected; 10 sigma is about 460.
        assert!((2540..=3460).contains(&hits), "{hits}");
    }

    #[test]
    fn query_parts_are_percent_encoded() {
        let mut s = String::new();
        encode_query_part("a b&c=d/é", &mut s);
        assert_eq!(s, "a%20b%26c%3Dd%2F%C3%A9");
    }
}
