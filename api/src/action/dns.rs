//! The DNS actions (`dns-error`, `dns-drop`, `dns-spoof`, `dns-delay`,
//! `dns-truncate`): they act on the DNS queries a pod sends, over UDP and
//! TCP, to any server, on port 53 or the ports in `match.ports`.
//!
//! Only the model and its validation live here; matching queries and
//! building answers is `netfault-dns`'s.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::ProxyAction;
use crate::error::FieldError;
use crate::parse::{fmt_duration, opt, opt_percent, reject_unknown, req, ACTION};

/// The port DNS faults divert when the fault gives no `match.ports`.
pub const DNS_PORT: u16 = 53;
/// Longest `dns-delay`.
pub const MAX_DNS_DELAY: Duration = Duration::from_secs(60);
/// Most `addresses` of a `dns-spoof`, and most `names` or `types`.
pub const MAX_DNS_LIST: usize = 64;
/// Largest `ttl` (RFC 2181: 2^31 - 1).
pub const MAX_DNS_TTL: u32 = i32::MAX as u32;

/// The response codes a `dns-error` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// 3: the name does not exist.
    NxDomain,
    /// 2: the server failed.
    ServFail,
    /// 5: the server refuses to answer.
    Refused,
    /// 1: the query was malformed.
    FormErr,
}

impl Rcode {
    pub const ALL: [Rcode; 4] = [
        Rcode::NxDomain,
        Rcode::ServFail,
        Rcode::Refused,
        Rcode::FormErr,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NxDomain => "nxdomain",
            Rcode::ServFail => "servfail",
            Rcode::Refused => "refused",
            Rcode::FormErr => "formerr",
        }
    }

    /// The 4-bit RCODE of the DNS header (RFC 1035).
    pub fn code(self) -> u8 {
        match self {
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::Refused => 5,
        }
    }

    fn parse(v: &Value, field: &str) -> Result<Rcode, FieldError> {
        let s = v.as_str().map(str::to_ascii_lowercase);
        Rcode::ALL
            .into_iter()
            .find(|r| s.as_deref() == Some(r.as_str()))
            .ok_or_else(|| {
                FieldError::invalid(field, "expected nxdomain, servfail, refused or formerr")
            })
    }
}

/// What a DNS fault does to a query it picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFault {
    /// Answer at once with this rcode, the query's id and question.
    Error { rcode: Rcode },
    /// No answer: the client times out and retries.
    Drop,
    /// Answer at once: A queries get the IPv4 `addresses`, AAAA queries
    /// the IPv6 ones, every other type (or a family with none) an empty
    /// NOERROR answer. With `random`, one address per family is drawn from
    /// the documentation ranges (192.0.2.0/24, 2001:db8::/32) per answer.
    Spoof {
        addresses: Vec<IpAddr>,
        ttl: u32,
        random: bool,
    },
    /// Forward the query `delay` late, so the real answer comes that much later.
    Delay { delay: Duration },
    /// Answer at once with the TC bit and no records, so the client retries
    /// over TCP (a fault on TCP is a fault of its own; truncation acts on
    /// UDP only).
    Truncate,
}

/// One pattern of `dns.names`: lower-case, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`: every name below `example.com`, not itself.
    Below(String),
}

impl NamePattern {
    /// Whether `name` (any case, trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self {
            NamePattern::Exact(p) => name.eq_ignore_ascii_case(p),
            NamePattern::Below(p) => {
                name.len() > p.len() + 1
                    && name.as_bytes()[name.len() - p.len() - 1] == b'.'
                    && name[name.len() - p.len()..].eq_ignore_ascii_case(p)
            }
        }
    }

    fn to_json(&self) -> Value {
        match self {
            NamePattern::Exact(p) => json!(p),
            NamePattern::Below(p) => json!(format!("*.{p}")),
        }
    }

    fn parse(v: &Value, field: &str) -> Result<NamePattern, FieldError> {
        let bad = |why: &str| FieldError::invalid(field, why);
        let s = v.as_str().ok_or_else(|| bad("must be a string"))?;
        let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        let (below, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, s),
        };
        if rest.is_empty() {
            return Err(bad(
                "must be a domain name such as example.com or *.example.com",
            ));
        }
        if rest.len() > 253 {
            return Err(bad("a name has at most 253 characters"));
        }
        for label in rest.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("each label has 1 to 63 characters"));
            }
            if label.contains('*') {
                return Err(bad("a wildcard is only a whole first label: *.example.com"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    "labels hold letters, digits, '-' and '_' (write IDNs in their xn-- form)",
                ));
            }
        }
        Ok(if below {
            NamePattern::Below(rest)
        } else {
            NamePattern::Exact(rest)
        })
    }
}

/// Record types by mnemonic, for `dns.types` (`TYPE<n>` names any other).
const RECORD_TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("SSHFP", 44),
    ("RRSIG", 46),
    ("NSEC", 47),
    ("DNSKEY", 48),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

/// A query type of `dns.types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordType(pub u16);

impl RecordType {
    pub const A: RecordType = RecordType(1);
    pub const AAAA: RecordType = RecordType(28);

    /// The mnemonic (`A`, `AAAA`), or `TYPE<n>`.
    pub fn name(self) -> String {
        RECORD_TYPES
            .iter()
            .find(|(_, c)| *c == self.0)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| format!("TYPE{}", self.0))
    }

    fn parse(v: &Value, field: &str) -> Result<RecordType, FieldError> {
        let s = v
            .as_str()
            .ok_or_else(|| FieldError::invalid(field, "must be a string such as \"A\""))?
            .to_ascii_uppercase();
        if let Some((_, c)) = RECORD_TYPES.iter().find(|(n, _)| *n == s) {
            return Ok(RecordType(*c));
        }
        match s.strip_prefix("TYPE").and_then(|n| n.parse::<u16>().ok()) {
            Some(n) => Ok(RecordType(n)),
            None => Err(FieldError::invalid(
                field,
                &format!(
                    "unknown record type {s:?}; expected one of {} or TYPE<number>",
                    RECORD_TYPES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

/// Which queries a `dns-*` action acts on; empty lists match every query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsSelector {
    pub names: Vec<NamePattern>,
    pub types: Vec<RecordType>,
}

impl DnsSelector {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.types.is_empty()
    }

    /// Whether a query for `name` of type `qtype` is selected.
    pub fn matches(&self, name: &str, qtype: u16) -> bool {
        (self.names.is_empty() || self.names.iter().any(|p| p.matches(name)))
            && (self.types.is_empty() || self.types.iter().any(|t| t.0 == qtype))
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.names.is_empty() {
            m.insert(
                "names".into(),
                Value::Array(self.names.iter().map(NamePattern::to_json).collect()),
            );
        }
        if !self.types.is_empty() {
            m.insert(
                "types".into(),
                Value::Array(self.types.iter().map(|t| json!(t.name())).collect()),
            );
        }
        Value::Object(m)
    }

    fn parse(v: &Value, field: &str) -> Result<DnsSelector, FieldError> {
        let m = v
            .as_object()
            .ok_or_else(|| FieldError::invalid(field, "must be an object with names and types"))?;
        reject_unknown(m, field, &["names", "types"])?;
        Ok(DnsSelector {
            names: opt(m, field, "names", |v, f| list(v, f, NamePattern::parse))?
                .unwrap_or_default(),
            types: opt(m, field, "types", |v, f| list(v, f, RecordType::parse))?
                .unwrap_or_default(),
        })
    }
}

/// A non-empty JSON list of at most [`MAX_DNS_LIST`] items, each parsed at
/// `field[i]`.
fn list<T>(
    v: &Value,
    field: &str,
    item: impl Fn(&Value, &str) -> Result<T, FieldError>,
) -> Result<Vec<T>, FieldError> {
    let a = v
        .as_array()
        .ok_or_else(|| FieldError::invalid(field, "must be a list"))?;
    if a.is_empty() {
        return Err(FieldError::invalid(
            field,
            "must not be empty (leave it out to match everything)",
        ));
    }
    if a.len() > MAX_DNS_LIST {
        return Err(FieldError::invalid(
            field,
            &format!("at most {MAX_DNS_LIST} items"),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, v)| item(v, &format!("{field}[{i}]")))
        .collect()
}

/// A DNS action: `fault` on `percent` of the queries `selector` picks.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsAction {
    pub fault: DnsFault,
    pub selector: DnsSelector,
    pub percent: f64,
}

impl DnsAction {
    pub fn type_name(&self) -> &'static str {
        match self.fault {
            DnsFault::Error { .. } => "dns-error",
            DnsFault::Drop => "dns-drop",
            DnsFault::Spoof { .. } => "dns-spoof",
            DnsFault::Delay { .. } => "dns-delay",
            DnsFault::Truncate => "dns-truncate",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"type": self.type_name(), "percent": self.percent});
        if !self.selector.is_empty() {
            v["dns"] = self.selector.to_json();
        }
        match &self.fault {
            DnsFault::Error { rcode } => v["rcode"] = json!(rcode.as_str()),
            DnsFault::Spoof {
                addresses,
                ttl,
                random,
            } => {
                if *random {
                    v["random"] = json!(true);
                } else {
                    v["addresses"] = json!(addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>());
                }
                v["ttl"] = json!(ttl);
            }
            DnsFault::Delay { delay } => v["delay"] = json!(fmt_duration(*delay)),
            DnsFault::Drop | DnsFault::Truncate => {}
        }
        v
    }
}

/// Parses the fields every DNS action shares around its own.
fn dns_action(
    m: &Map<String, Value>,
    own: &[&str],
    fault: DnsFault,
) -> Result<DnsAction, FieldError> {
    let mut known = vec!["type", "dns", "percent"];
    known.extend_from_slice(own);
    reject_unknown(m, ACTION, &known)?;
    Ok(DnsAction {
        fault,
        selector: opt(m, ACTION, "dns", DnsSelector::parse)?.unwrap_or_default(),
        percent: opt_percent(m, ACTION, "percent", 100.0)?,
    })
}

pub(super) fn dns_error(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    let rcode = opt(m, ACTION, "rcode", Rcode::parse)?.unwrap_or(Rcode::NxDomain);
    dns_action(m, &["rcode"], DnsFault::Error { rcode }).map(ProxyAction::Dns)
}

pub(super) fn dns_drop(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    dns_action(m, &[], DnsFault::Drop).map(ProxyAction::Dns)
}

pub(super) fn dns_truncate(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    dns_action(m, &[], DnsFault::Truncate).map(ProxyAction::Dns)
}

pub(super) fn dns_delay(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    let delay = req(m, ACTION, "delay", |v, f| {
        let d = crate::parse::parse_duration(v, f)?;
        if d.is_zero() || d > MAX_DNS_DELAY {
            return Err(FieldError::invalid(
                f,
                &format!(
                    "must be above zero and at most {}",
                    fmt_duration(MAX_DNS_DELAY)
                ),
            ));
        }
        Ok(d)
    })?;
    dns_action(m, &["delay"], DnsFault::Delay { delay }).map(ProxyAction::Dns)
}

pub(super) fn dns_spoof(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    let random = opt(m, ACTION, "random", |v, f| {
        v.as_bool()
            .ok_or_else(|| FieldError::invalid(f, "must be true or false"))
    })?
    .unwrap_or(false);
    let addresses = opt(m, ACTION, "addresses", |v, f| {
        list(v, f, |v, f| {
            v.as_str()
                .and_then(|s| s.trim().parse::<IpAddr>().ok())
                .ok_or_else(|| {
                    FieldError::invalid(f, "must be an IPv4 or IPv6 address such as 192.0.2.1")
                })
        })
    })?;
    let addresses = match (addresses, random) {
        (Some(_), true) => {
            return Err(FieldError::invalid(
                "action.addresses",
                "give addresses or random: true, not both",
            ))
        }
        (None, false) => return Err(FieldError::missing("action.addresses")),
        (Some(a), false) => a,
        (None, true) => Vec::new(),
    };
    let ttl = opt(m, ACTION, "ttl", |v, f| {
        v.as_u64()
            .filter(|t| *t <= u64::from(MAX_DNS_TTL))
            .map(|t| t as u32)
            .ok_or_else(|| {
                FieldError::invalid(
                    f,
                    &format!("must be a whole number of seconds from 0 to {MAX_DNS_TTL}"),
                )
            })
    })?
    .unwrap_or(0);
    dns_action(
        m,
        &["addresses", "ttl", "random"],
        DnsFault::Spoof {
            addresses,
            ttl,
            random,
        },
    )
    .map(ProxyAction::Dns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{parse_action, Action};

    fn dns(v: Value) -> Result<DnsAction, FieldError> {
        match parse_action(&v)? {
            Action::Proxy(ProxyAction::Dns(a)) => Ok(a),
            other => panic!("not a DNS action: {other:?}"),
        }
    }

    #[test]
    fn every_dns_action_round_trips() {
        for v in [
            json!({"type": "dns-error"}),
            json!({"type": "dns-error", "rcode": "SERVFAIL", "percent": 50}),
            json!({"type": "dns-error", "rcode": "refused", "dns": {"names": ["*.Example.test."], "types": ["a", "AAAA", "type65"]}}),
            json!({"type": "dns-error", "rcode": "formerr"}),
            json!({"type": "dns-drop", "dns": {"names": ["api.example.test"]}}),
            json!({"type": "dns-spoof", "addresses": ["198.18.0.9", "fd00::9"], "ttl": 30}),
            json!({"type": "dns-spoof", "random": true}),
            json!({"type": "dns-delay", "delay": "150ms"}),
            json!({"type": "dns-truncate", "dns": {"types": ["TXT"]}}),
        ] {
            let a = dns(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(a.type_name(), v["type"].as_str().unwrap_or_default());
            let again = dns(a.to_json()).expect("the canonical form parses");
            assert_eq!(again, a, "{v}");
        }
    }

    #[test]
    fn defaults() {
        let a = dns(json!({"type": "dns-error"})).expect("valid");
        assert_eq!(
            (a.fault, a.percent, a.selector.is_empty()),
            (
                DnsFault::Error {
                    rcode: Rcode::NxDomain
                },
                100.0,
                true
            )
        );
        let a = dns(json!({"type": "dns-spoof", "addresses": ["192.0.2.1"]})).expect("valid");
        assert!(matches!(
            a.fault,
            DnsFault::Spoof {
                ttl: 0,
                random: false,
                ..
            }
        ));
    }

    #[test]
    fn name_patterns() {
        let below = NamePattern::parse(&json!("*.Example.COM."), "f").expect("valid");
        assert!(below.matches("api.example.com"));
        assert!(below.matches("a.b.EXAMPLE.com."));
        assert!(!below.matches("example.com"));
        assert!(!below.matches("badexample.com"));
        let exact = NamePattern::parse(&json!("example.com"), "f").expect("valid");
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("api.example.com"));
        let sel = DnsSelector {
            names: vec![NamePattern::Exact("api.example.test".into())],
            types: vec![RecordType::A],
        };
        assert!(sel.matches("api.example.test", 1));
        assert!(!sel.matches("api.example.test", 28));
        assert!(!sel.matches("web.example.test", 1));
    }

    #[test]
    fn errors_name_the_field() {
        for (v, f) in [
            (
                json!({"type": "dns-error", "rcode": "notimp"}),
                "action.rcode",
            ),
            (json!({"type": "dns-error", "rcode": 3}), "action.rcode"),
            (
                json!({"type": "dns-error", "dns": {"names": ["a..b"]}}),
                "action.dns.names[0]",
            ),
            (
                json!({"type": "dns-error", "dns": {"names": ["ok.test", "*"]}}),
                "action.dns.names[1]",
            ),
            (
                json!({"type": "dns-error", "dns": {"names": ["a.*.test"]}}),
                "action.dns.names[0]",
            ),
            (
                json!({"type": "dns-error", "dns": {"names": ["a b.test"]}}),
                "action.dns.names[0]",
            ),
            (
                json!({"type": "dns-error", "dns": {"names": []}}),
                "action.dns.names",
            ),
            (
                json!({"type": "dns-error", "dns": {"names": "a.test"}}),
                "action.dns.names",
            ),
            (
                json!({"type": "dns-error", "dns": {"types": ["AAA"]}}),
                "action.dns.types[0]",
            ),
            (
                json!({"type": "dns-error", "dns": {"class": "IN"}}),
                "action.dns.class",
            ),
            (json!({"type": "dns-error", "dns": "a.test"}), "action.dns"),
            (
                json!({"type": "dns-error", "percent": 101}),
                "action.percent",
            ),
            (json!({"type": "dns-error", "delay": "1s"}), "action.delay"),
            (json!({"type": "dns-spoof"}), "action.addresses"),
            (
                json!({"type": "dns-spoof", "addresses": ["web"]}),
                "action.addresses[0]",
            ),
            (
                json!({"type": "dns-spoof", "addresses": ["192.0.2.1", "1.2.3"]}),
                "action.addresses[1]",
            ),
            (
                json!({"type": "dns-spoof", "addresses": "192.0.2.1"}),
                "action.addresses",
            ),
            (
                json!({"type": "dns-spoof", "addresses": ["192.0.2.1"], "random": true}),
                "action.addresses",
            ),
            (
                json!({"type": "dns-spoof", "random": "yes"}),
                "action.random",
            ),
            (
                json!({"type": "dns-spoof", "random": true, "ttl": -1}),
                "action.ttl",
            ),
            (json!({"type": "dns-delay"}), "action.delay"),
            (json!({"type": "dns-delay", "delay": "0s"}), "action.delay"),
            (json!({"type": "dns-delay", "delay": "2m"}), "action.delay"),
            (
                json!({"type": "dns-drop", "rcode": "servfail"}),
                "action.rcode",
            ),
        ] {
            match dns(v.clone()) {
                Ok(a) => panic!("{v}: parsed {a:?}"),
                Err(e) => assert_eq!(e.field, f, "{v}: {e}"),
            }
        }
    }
}
