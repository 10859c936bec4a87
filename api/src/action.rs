//! Fault actions: what a fault does to the packets it matches.
//!
//! Parsing and the canonical JSON form of every action in the contract.
//! Which backend serves an action (eBPF tc, the NFQUEUE delay engine, the
//! transparent proxy) is the agent's business; [`Action::backend`] only names
//! the one that owns it, so the agent can say when it is unavailable.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::error::{ErrorCode, FieldError};
use crate::parse::{
    fmt_duration, opt_duration, opt_percent, opt_str, parse_percent, parse_rate, parse_size,
    parse_status, reject_unknown, req_percent,
};

/// netem's delay distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Uniform,
    Normal,
    Pareto,
    ParetoNormal,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
            Distribution::ParetoNormal => "paretonormal",
        }
    }
}

/// netem's Gilbert-Elliott loss model (`loss gemodel p r 1-h 1-k`), all in
/// percent: `p` good→bad transition, `r` bad→good transition, `one_minus_h`
/// loss probability in the bad state, `one_minus_k` loss probability in the
/// good state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    pub p: f64,
    pub r: f64,
    pub one_minus_h: f64,
    pub one_minus_k: f64,
}

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

/// The actions served by the tc eBPF datapath.
#[derive(Debug, Clone, PartialEq)]
pub enum PacketAction {
    /// Drop `percent` of matching packets. `correlation` (0–100) has netem's
    /// meaning; `model` replaces both with a Gilbert-Elliott chain.
    Loss {
        percent: f64,
        correlation: f64,
        model: Option<GilbertElliott>,
    },
    /// Drop every matching packet.
    Blackhole,
    /// Flip one random bit in `percent` of packets.
    Corrupt { percent: f64, correlation: f64 },
    /// Send `percent` of packets twice.
    Duplicate { percent: f64, correlation: f64 },
    /// Limit matching traffic to `bits_per_sec`, with a `burst_bytes` bucket.
    Rate {
        bits_per_sec: u64,
        burst_bytes: Option<u64>,
    },
}

/// The actions served by the NFQUEUE delay engine.
#[derive(Debug, Clone, PartialEq)]
pub enum DelayAction {
    /// Hold matching packets for `latency` ± `jitter` drawn from
    /// `distribution`, with netem's `correlation`; `percent` of packets.
    Delay {
        latency: Duration,
        jitter: Duration,
        correlation: f64,
        distribution: Distribution,
        percent: f64,
    },
    /// netem reordering: `percent` of packets (or every `gap`-th) skip the
    /// delay that the others get (`latency`, or a composing delay fault's).
    Reorder {
        percent: f64,
        correlation: f64,
        gap: u32,
        latency: Option<Duration>,
    },
}

const SUPPORTED: &str = "loss, blackhole, delay, reorder, corrupt, duplicate, rate, \
    http-abort, http-delay, http-replace, http-patch, tcp-reset, tcp-slow-close, tcp-bandwidth";

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

impl PacketAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            PacketAction::Loss { .. } => "loss",
            PacketAction::Blackhole => "blackhole",
            PacketAction::Corrupt { .. } => "corrupt",
            PacketAction::Duplicate { .. } => "duplicate",
            PacketAction::Rate { .. } => "rate",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            PacketAction::Loss {
                percent,
                correlation,
                model,
            } => {
                let mut v = json!({"type": "loss", "percent": percent, "correlation": correlation});
                if let Some(m) = model {
                    v["model"] = json!({"type": "gilbert-elliott", "p": m.p, "r": m.r,
                        "1-h": m.one_minus_h, "1-k": m.one_minus_k});
                }
                v
            }
            PacketAction::Blackhole => json!({"type": "blackhole"}),
            PacketAction::Corrupt {
                percent,
                correlation,
            }
            | PacketAction::Duplicate {
                percent,
                correlation,
            } => json!({"type": self.type_name(), "percent": percent, "correlation": correlation}),
            PacketAction::Rate {
                bits_per_sec,
                burst_bytes,
            } => {
                let mut v = json!({"type": "rate", "rate": format!("{bits_per_sec}bit")});
                if let Some(b) = burst_bytes {
                    v["burst"] = json!(b);
                }
                v
            }
        }
    }
}

impl DelayAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            DelayAction::Delay { .. } => "delay",
            DelayAction::Reorder { .. } => "reorder",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            DelayAction::Delay {
                latency,
                jitter,
                correlation,
                distribution,
                percent,
            } => json!({"type": "delay", "latency": fmt_duration(*latency),
                "jitter": fmt_duration(*jitter), "correlation": correlation,
                "distribution": distribution.as_str(), "percent": percent}),
            DelayAction::Reorder {
                percent,
                correlation,
                gap,
                latency,
            } => {
                let mut v = json!({"type": "reorder", "percent": percent,
                    "correlation": correlation, "gap": gap});
                if let Some(l) = latency {
                    v["latency"] = json!(fmt_duration(*l));
                }
                v
            }
        }
    }
}

fn parse_model(v: &Value) -> Result<GilbertElliott, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid("action.model", "must be an object"))?;
    for k in m.keys() {
        if !["type", "p", "r", "1-h", "1-k"].contains(&k.as_str()) {
            return Err(FieldError::invalid(
                &format!("action.model.{k}"),
                "unknown field; expected type, p, r, 1-h, 1-k",
            ));
        }
    }
    match m.get("type").and_then(Value::as_str) {
        Some("gilbert-elliott") | None => {}
        Some(other) => {
            return Err(FieldError::invalid(
                "action.model.type",
                &format!("unknown model {other:?}; expected gilbert-elliott"),
            ))
        }
    }
    let get = |k: &str, default: Option<f64>| -> Result<f64, FieldError> {
        let field = format!("action.model.{k}");
        match (m.get(k), default) {
            (Some(v), _) => parse_percent(v, &field),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(FieldError::missing(&field)),
        }
    };
    let p = get("p", None)?;
    // netem's defaults: r = 1 - p, 1-h = 100%, 1-k = 0%.
    let r = get("r", Some(100.0 - p))?;
    Ok(GilbertElliott {
        p,
        r,
        one_minus_h: get("1-h", Some(100.0))?,
        one_minus_k: get("1-k", Some(0.0))?,
    })
}

/// Parses `action`. Errors name the field (`action.latency`).
pub fn parse_action(v: &Value) -> Result<Action, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid("action", "must be an object"))?;
    let ty = match m.get("type") {
        None => return Err(FieldError::missing("action.type")),
        Some(t) => t
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FieldError::invalid("action.type", "must be a string"))?,
    };
    match ty {
        "loss" => {
            reject_unknown(m, "action", &["type", "percent", "correlation", "model"])?;
            let model = match m.get("model") {
                None | Some(Value::Null) => None,
                Some(v) => Some(parse_model(v)?),
            };
            let percent = match model {
                Some(_) => opt_percent(m, "action", "percent", 0.0)?,
                None => req_percent(m, "action", "percent")?,
            };
            Ok(Action::Packet(PacketAction::Loss {
                percent,
                correlation: opt_percent(m, "action", "correlation", 0.0)?,
                model,
            }))
        }
        "blackhole" => {
            reject_unknown(m, "action", &["type"])?;
            Ok(Action::Packet(PacketAction::Blackhole))
        }
        "delay" => {
            reject_unknown(
                m,
                "action",
                &[
                    "type",
                    "latency",
                    "jitter",
                    "correlation",
                    "distribution",
                    "percent",
                ],
            )?;
            let latency = opt_duration(m, "action", "latency")?
                .ok_or_else(|| FieldError::missing("action.latency"))?;
            let jitter = opt_duration(m, "action", "jitter")?.unwrap_or_default();
            let distribution = match m.get("distribution") {
                None | Some(Value::Null) => Distribution::Uniform,
                Some(d) => match d.as_str() {
                    Some("uniform") => Distribution::Uniform,
                    Some("normal") => Distribution::Normal,
                    Some("pareto") => Distribution::Pareto,
                    Some("paretonormal") => Distribution::ParetoNormal,
                    _ => {
                        return Err(FieldError::invalid(
                            "action.distribution",
                            "expected uniform, normal, pareto or paretonormal",
                        ))
                    }
                },
            };
            if latency > Duration::from_secs(60) || jitter > Duration::from_secs(60) {
                return Err(FieldError::invalid(
                    if latency > Duration::from_secs(60) {
                        "action.latency"
                    } else {
                        "action.jitter"
                    },
                    "must be at most 60s",
                ));
            }
            if latency.is_zero() && jitter.is_zero() {
                return Err(FieldError::invalid(
                    "action.latency",
                    "a delay needs a latency or a jitter above zero",
                ));
            }
            Ok(Action::Delay(DelayAction::Delay {
                latency,
                jitter,
                correlation: opt_percent(m, "action", "correlation", 0.0)?,
                distribution,
                percent: opt_percent(m, "action", "percent", 100.0)?,
            }))
        }
        "reorder" => {
            reject_unknown(
                m,
                "action",
                &["type", "percent", "correlation", "gap", "latency"],
            )?;
            let gap = match m.get("gap") {
                None | Some(Value::Null) => 0,
                Some(g) => g.as_u64().filter(|g| *g <= 1_000_000).ok_or_else(|| {
                    FieldError::invalid("action.gap", "must be a whole number from 0 to 1000000")
                })? as u32,
            };
            Ok(Action::Delay(DelayAction::Reorder {
                percent: req_percent(m, "action", "percent")?,
                correlation: opt_percent(m, "action", "correlation", 0.0)?,
                gap,
                latency: opt_duration(m, "action", "latency")?,
            }))
        }
        "corrupt" | "duplicate" => {
            reject_unknown(m, "action", &["type", "percent", "correlation"])?;
            let percent = req_percent(m, "action", "percent")?;
            let correlation = opt_percent(m, "action", "correlation", 0.0)?;
            Ok(Action::Packet(if ty == "corrupt" {
                PacketAction::Corrupt {
                    percent,
                    correlation,
                }
            } else {
                PacketAction::Duplicate {
                    percent,
                    correlation,
                }
            }))
        }
        "rate" => {
            reject_unknown(m, "action", &["type", "rate", "burst"])?;
            let bits_per_sec = parse_rate(
                m.get("rate")
                    .ok_or_else(|| FieldError::missing("action.rate"))?,
                "action.rate",
            )?;
            let burst_bytes = match m.get("burst") {
                None | Some(Value::Null) => None,
                Some(b) => Some(parse_size(b, "action.burst")?),
            };
            Ok(Action::Packet(PacketAction::Rate {
                bits_per_sec,
                burst_bytes,
            }))
        }
        "http-abort" | "http-delay" | "http-replace" | "http-patch" | "tcp-reset"
        | "tcp-slow-close" | "tcp-bandwidth" => parse_proxy_action(ty, m).map(Action::Proxy),
        t => Err(FieldError::invalid(
            "action.type",
            &format!("unknown action {t:?}; supported: {SUPPORTED}"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Proxy actions: HTTP and TCP faults served by the transparent proxy.
// ---------------------------------------------------------------------------

/// Which half of an HTTP exchange an action acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Before the request is forwarded to the server.
    #[default]
    Request,
    /// Before the server's response is returned to the client.
    Response,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Response => "response",
        }
    }
}

/// Which HTTP requests an `http-*` action applies to. Absent fields match
/// every request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpSelector {
    /// A glob on the request path (without the query): `*` matches any run of
    /// characters including `/`, `?` exactly one character.
    pub path: Option<String>,
    /// The request method, upper-cased; matched case-insensitively.
    pub method: Option<String>,
    /// Headers that must be present with exactly these values. Names are
    /// lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The response status (response-phase actions only).
    pub code: Option<u16>,
}

impl HttpSelector {
    pub fn is_empty(&self) -> bool {
        self.path.is_none()
            && self.method.is_none()
            && self.headers.is_empty()
            && self.code.is_none()
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = &self.path {
            m.insert("path".into(), json!(p));
        }
        if let Some(x) = &self.method {
            m.insert("method".into(), json!(x));
        }
        if !self.headers.is_empty() {
            m.insert("headers".into(), json!(self.headers));
        }
        if let Some(c) = self.code {
            m.insert("code".into(), json!(c));
        }
        Value::Object(m)
    }
}

/// What an `http-abort` answers instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAbort {
    /// Reply with this status (and body, else a short text one). gRPC
    /// requests get HTTP 200 with the matching `grpc-status`.
    Status { status: u16, body: Option<String> },
    /// Close without a reply: a TCP reset on HTTP/1, `RST_STREAM` on HTTP/2.
    Reset,
}

/// The HTTP faults.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpFault {
    Abort(HttpAbort),
    Delay {
        delay: Duration,
        phase: Phase,
    },
    /// Replaces what is given; `path` and `method` only in the request phase,
    /// `status` only in the response phase. `headers` overwrite.
    Replace {
        phase: Phase,
        status: Option<u16>,
        headers: BTreeMap<String, String>,
        body: Option<String>,
        path: Option<String>,
        method: Option<String>,
    },
    /// Adds `headers` and `query` parameters (request phase only), and
    /// applies `body_merge` as an RFC 7396 merge patch to JSON bodies.
    Patch {
        phase: Phase,
        headers: BTreeMap<String, String>,
        query: BTreeMap<String, String>,
        body_merge: Option<Value>,
    },
}

impl HttpFault {
    /// The phase the fault acts in (aborts act on requests).
    pub fn phase(&self) -> Phase {
        match self {
            HttpFault::Abort(_) => Phase::Request,
            HttpFault::Delay { phase, .. }
            | HttpFault::Replace { phase, .. }
            | HttpFault::Patch { phase, .. } => *phase,
        }
    }
}

/// When a `tcp-reset` resets a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetAfter {
    /// This long after the connection was accepted.
    Time(Duration),
    /// Once this many bytes have passed, both directions counted.
    Bytes(u64),
}

/// The TCP faults; they act on whole connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpFault {
    /// Reset the client's connection (RST) and close the server's.
    Reset { after: ResetAfter },
    /// When one side closes, wait `delay` before passing the FIN on.
    SlowClose { delay: Duration },
    /// Throttle each direction of each connection to `bits_per_sec`.
    Bandwidth { bits_per_sec: u64 },
}

/// An action of the transparent proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyAction {
    /// Acts on `percent` of the requests that `selector` matches.
    Http {
        fault: HttpFault,
        selector: HttpSelector,
        percent: f64,
    },
    /// Acts on `percent` of the matching connections.
    Tcp { fault: TcpFault, percent: f64 },
}

impl ProxyAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            ProxyAction::Http { fault, .. } => match fault {
                HttpFault::Abort(_) => "http-abort",
                HttpFault::Delay { .. } => "http-delay",
                HttpFault::Replace { .. } => "http-replace",
                HttpFault::Patch { .. } => "http-patch",
            },
            ProxyAction::Tcp { fault, .. } => match fault {
                TcpFault::Reset { .. } => "tcp-reset",
                TcpFault::SlowClose { .. } => "tcp-slow-close",
                TcpFault::Bandwidth { .. } => "tcp-bandwidth",
            },
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"type": self.type_name()});
        match self {
            ProxyAction::Http {
                fault,
                selector,
                percent,
            } => {
                if !selector.is_empty() {
                    v["http"] = selector.to_json();
                }
                v["percent"] = json!(percent);
                match fault {
                    HttpFault::Abort(HttpAbort::Reset) => v["reset"] = json!(true),
                    HttpFault::Abort(HttpAbort::Status { status, body }) => {
                        v["status"] = json!(status);
                        if let Some(b) = body {
                            v["body"] = json!(b);
                        }
                    }
                    HttpFault::Delay { delay, phase } => {
                        v["delay"] = json!(fmt_duration(*delay));
                        v["phase"] = json!(phase.as_str());
                    }
                    HttpFault::Replace {
                        phase,
                        status,
                        headers,
                        body,
                        path,
                        method,
                    } => {
                        v["phase"] = json!(phase.as_str());
                        if let Some(s) = status {
                            v["status"] = json!(s);
                        }
                        if !headers.is_empty() {
                            v["headers"] = json!(headers);
                        }
                        if let Some(b) = body {
                            v["body"] = json!(b);
                        }
                        if let Some(p) = path {
                            v["path"] = json!(p);
                        }
                        if let Some(m) = method {
                            v["method"] = json!(m);
                        }
                    }
                    HttpFault::Patch {
                        phase,
                        headers,
                        query,
                        body_merge,
                    } => {
                        v["phase"] = json!(phase.as_str());
                        if !headers.is_empty() {
                            v["headers"] = json!(headers);
                        }
                        if !query.is_empty() {
                            v["query"] = json!(query);
                        }
                        if let Some(b) = body_merge {
                            v["body_merge"] = b.clone();
                        }
                    }
                }
            }
            ProxyAction::Tcp { fault, percent } => {
                v["percent"] = json!(percent);
                match fault {
                    TcpFault::Reset {
                        after: ResetAfter::Time(d),
                    } => v["after"] = json!(fmt_duration(*d)),
                    TcpFault::Reset {
                        after: ResetAfter::Bytes(n),
                    } => v["after_bytes"] = json!(n),
                    TcpFault::SlowClose { delay } => v["delay"] = json!(fmt_duration(*delay)),
                    TcpFault::Bandwidth { bits_per_sec } => {
                        v["rate"] = json!(format!("{bits_per_sec}bit"))
                    }
                }
            }
        }
        v
    }
}

/// Longest `http-delay` or `tcp-slow-close` delay.
pub const MAX_PROXY_DELAY: Duration = Duration::from_secs(600);
/// Largest `body` or `body_merge`, serialized.
pub const MAX_PROXY_BODY: usize = 1 << 20;

/// A header name or method: an RFC 9110 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value: no control characters other than tab.
fn is_header_value(s: &str) -> bool {
    s.chars().all(|c| c == '\t' || !c.is_control())
}

/// Headers the proxy sets itself (message framing and the connection), so
/// a fault may not.
const FRAMING_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// A map of header names to values; names are lower-cased. `framing`
/// rejects the headers the proxy owns.
fn parse_headers(
    v: &Value,
    field: &str,
    framing: bool,
) -> Result<BTreeMap<String, String>, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid(field, "must be an object of header names to values"))?;
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let f = format!("{field}.{k}");
        if !is_token(k) {
            return Err(FieldError::invalid(&f, "invalid header name"));
        }
        let name = k.to_ascii_lowercase();
        if framing && FRAMING_HEADERS.contains(&name.as_str()) {
            return Err(FieldError::invalid(
                &f,
                "the proxy sets message framing and connection headers itself",
            ));
        }
        let value = v
            .as_str()
            .ok_or_else(|| FieldError::invalid(&f, "must be a string"))?;
        if !is_header_value(value) {
            return Err(FieldError::invalid(
                &f,
                "header values cannot hold control characters",
            ));
        }
        if out.insert(name, value.to_string()).is_some() {
            return Err(FieldError::invalid(
                &f,
                "the same header is given twice (names are case-insensitive)",
            ));
        }
    }
    Ok(out)
}

fn parse_method(s: &str, field: &str) -> Result<String, FieldError> {
    if !is_token(s) {
        return Err(FieldError::invalid(
            field,
            &format!("invalid HTTP method {s:?}"),
        ));
    }
    Ok(s.to_ascii_uppercase())
}

fn parse_selector(v: &Value) -> Result<HttpSelector, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid("action.http", "must be an object"))?;
    for k in m.keys() {
        if !["path", "method", "headers", "code"].contains(&k.as_str()) {
            return Err(FieldError::invalid(
                &format!("action.http.{k}"),
                "unknown field; expected one of: path, method, headers, code",
            ));
        }
    }
    let path = match opt_str(m, "action.http", "path")? {
        None => None,
        Some(p) => {
            if !(p.starts_with('/') || p.starts_with('*')) {
                return Err(FieldError::invalid(
                    "action.http.path",
                    "a path glob starts with / or *",
                ));
            }
            if p.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
            {
                return Err(FieldError::invalid(
                    "action.http.path",
                    "a path glob cannot hold whitespace, control characters or #",
                ));
            }
            if p.contains('?') && p.split_once('?').is_some_and(|(_, q)| q.contains('=')) {
                return Err(FieldError::invalid(
                    "action.http.path",
                    "the glob matches the path only; ? matches one character, not a query",
                ));
            }
            Some(p.to_string())
        }
    };
    let method = opt_str(m, "action.http", "method")?
        .map(|s| parse_method(s, "action.http.method"))
        .transpose()?;
    let headers = match m.get("headers") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(h) => parse_headers(h, "action.http.headers", false)?,
    };
    let code = match m.get("code") {
        None | Some(Value::Null) => None,
        Some(c) => Some(parse_status(c, "action.http.code", 100)?),
    };
    Ok(HttpSelector {
        path,
        method,
        headers,
        code,
    })
}

fn parse_phase(m: &Map<String, Value>) -> Result<Phase, FieldError> {
    match m.get("phase") {
        None | Some(Value::Null) => Ok(Phase::Request),
        Some(p) => match p.as_str() {
            Some("request") => Ok(Phase::Request),
            Some("response") => Ok(Phase::Response),
            _ => Err(FieldError::invalid(
                "action.phase",
                "expected request or response",
            )),
        },
    }
}

fn proxy_delay(m: &Map<String, Value>, key: &str) -> Result<Duration, FieldError> {
    let field = format!("action.{key}");
    let d = opt_duration(m, "action", key)?.ok_or_else(|| FieldError::missing(&field))?;
    if d.is_zero() {
        return Err(FieldError::invalid(&field, "must be greater than zero"));
    }
    if d > MAX_PROXY_DELAY {
        return Err(FieldError::invalid(&field, "must be at most 10m"));
    }
    Ok(d)
}

fn body_string(m: &Map<String, Value>) -> Result<Option<String>, FieldError> {
    match m.get("body") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_PROXY_BODY => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(FieldError::invalid("action.body", "must be at most 1 MiB")),
        Some(_) => Err(FieldError::invalid("action.body", "must be a string")),
    }
}

/// Parses the proxy's action types (`ty` is one of them).
fn parse_proxy_action(ty: &str, m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    const HTTP_COMMON: &[&str] = &["type", "http", "percent"];
    let known: &[&str] = match ty {
        "http-abort" => &["status", "reset", "body"],
        "http-delay" => &["delay", "phase"],
        "http-replace" => &["phase", "status", "headers", "body", "path", "method"],
        "http-patch" => &["phase", "headers", "query", "body_merge"],
        "tcp-reset" => &["after", "after_bytes"],
        "tcp-slow-close" => &["delay"],
        _ => &["rate"],
    };
    let common: &[&str] = if ty.starts_with("http-") {
        HTTP_COMMON
    } else {
        &["type", "percent"]
    };
    let all: Vec<&str> = common.iter().chain(known).copied().collect();
    reject_unknown(m, "action", &all)?;
    let percent = opt_percent(m, "action", "percent", 100.0)?;
    if !ty.starts_with("http-") {
        let fault = match ty {
            "tcp-reset" => {
                let bytes = match m.get("after_bytes") {
                    None | Some(Value::Null) => None,
                    Some(b) => Some(b.as_u64().ok_or_else(|| {
                        FieldError::invalid("action.after_bytes", "must be a whole number of bytes")
                    })?),
                };
                let after = match (opt_duration(m, "action", "after")?, bytes) {
                    (Some(_), Some(_)) => {
                        return Err(FieldError::invalid(
                            "action.after_bytes",
                            "give after or after_bytes, not both",
                        ))
                    }
                    (None, None) => {
                        return Err(FieldError::new(
                            ErrorCode::Missing,
                            "action.after",
                            "give after (a duration) or after_bytes",
                        ))
                    }
                    (Some(d), None) if d > Duration::from_secs(24 * 3600) => {
                        return Err(FieldError::invalid("action.after", "must be at most 24h"))
                    }
                    (Some(d), None) => ResetAfter::Time(d),
                    (None, Some(n)) => ResetAfter::Bytes(n),
                };
                TcpFault::Reset { after }
            }
            "tcp-slow-close" => TcpFault::SlowClose {
                delay: proxy_delay(m, "delay")?,
            },
            _ => TcpFault::Bandwidth {
                bits_per_sec: parse_rate(
                    m.get("rate")
                        .ok_or_else(|| FieldError::missing("action.rate"))?,
                    "action.rate",
                )?,
            },
        };
        return Ok(ProxyAction::Tcp { fault, percent });
    }

    let selector = match m.get("http") {
        None | Some(Value::Null) => HttpSelector::default(),
        Some(v) => parse_selector(v)?,
    };
    let fault = match ty {
        "http-abort" => {
            let reset = match m.get("reset") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(FieldError::invalid("action.reset", "must be true or false"))
                }
            };
            let status = m.get("status").filter(|s| !s.is_null());
            let body = body_string(m)?;
            match (status, reset) {
                (Some(_), true) => {
                    return Err(FieldError::invalid(
                        "action.reset",
                        "give status or reset, not both",
                    ))
                }
                (None, false) => {
                    return Err(FieldError::new(
                        ErrorCode::Missing,
                        "action.status",
                        "give status (the reply), or \"reset\": true",
                    ))
                }
                (None, true) if body.is_some() => {
                    return Err(FieldError::invalid(
                        "action.body",
                        "a reset sends no reply, so no body",
                    ))
                }
                (None, true) => HttpFault::Abort(HttpAbort::Reset),
                (Some(s), false) => HttpFault::Abort(HttpAbort::Status {
                    status: parse_status(s, "action.status", 200)?,
                    body,
                }),
            }
        }
        "http-delay" => HttpFault::Delay {
            delay: proxy_delay(m, "delay")?,
            phase: parse_phase(m)?,
        },
        "http-replace" => {
            let phase = parse_phase(m)?;
            let status = match m.get("status") {
                None | Some(Value::Null) => None,
                Some(s) => Some(parse_status(s, "action.status", 200)?),
            };
            let headers = match m.get("headers") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(h) => parse_headers(h, "action.headers", true)?,
            };
            let body = body_string(m)?;
            let path = match opt_str(m, "action", "path")? {
                None => None,
                Some(p) => {
                    if !p.starts_with('/') {
                        return Err(FieldError::invalid("action.path", "must start with /"));
                    }
                    if !p.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
                        return Err(FieldError::invalid(
                            "action.path",
                            "must be a percent-encoded path (and optional ?query) without spaces or #",
                        ));
                    }
                    Some(p.to_string())
                }
            };
            let method = opt_str(m, "action", "method")?
                .map(|s| parse_method(s, "action.method"))
                .transpose()?;
            match phase {
                Phase::Request if status.is_some() => {
                    return Err(FieldError::invalid(
                        "action.status",
                        "a status is replaced in the response phase; set \"phase\": \"response\"",
                    ))
                }
                Phase::Response if path.is_some() => {
                    return Err(FieldError::invalid(
                        "action.path",
                        "the path is replaced in the request phase only",
                    ))
                }
                Phase::Response if method.is_some() => {
                    return Err(FieldError::invalid(
                        "action.method",
                        "the method is replaced in the request phase only",
                    ))
                }
                _ => {}
            }
            if status.is_none()
                && headers.is_empty()
                && body.is_none()
                && path.is_none()
                && method.is_none()
            {
                return Err(FieldError::invalid(
                    "action",
                    "http-replace needs at least one of: status, headers, body, path, method",
                ));
            }
            HttpFault::Replace {
                phase,
                status,
                headers,
                body,
                path,
                method,
            }
        }
        _ => {
            let phase = parse_phase(m)?;
            let headers = match m.get("headers") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(h) => parse_headers(h, "action.headers", true)?,
            };
            let query = match m.get("query") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(q) => {
                    let qm = q.as_object().ok_or_else(|| {
                        FieldError::invalid("action.query", "must be an object of names to values")
                    })?;
                    let mut out = BTreeMap::new();
                    for (k, v) in qm {
                        let f = format!("action.query.{k}");
                        if k.is_empty() {
                            return Err(FieldError::invalid(
                                "action.query",
                                "parameter names must not be empty",
                            ));
                        }
                        let v = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            Value::Bool(b) => b.to_string(),
                            _ => return Err(FieldError::invalid(&f, "must be a string")),
                        };
                        out.insert(k.clone(), v);
                    }
                    out
                }
            };
            if phase == Phase::Response && !query.is_empty() {
                return Err(FieldError::invalid(
                    "action.query",
                    "query parameters are added in the request phase only",
                ));
            }
            let body_merge = match m.get("body_merge") {
                None | Some(Value::Null) => None,
                Some(b) => {
                    if b.to_string().len() > MAX_PROXY_BODY {
                        return Err(FieldError::invalid(
                            "action.body_merge",
                            "must be at most 1 MiB",
                        ));
                    }
                    if depth(b) > 64 {
                        return Err(FieldError::invalid(
                            "action.body_merge",
                            "nests deeper than 64 levels",
                        ));
                    }
                    Some(b.clone())
                }
            };
            if headers.is_empty() && query.is_empty() && body_merge.is_none() {
                return Err(FieldError::invalid(
                    "action",
                    "http-patch needs at least one of: headers, query, body_merge",
                ));
            }
            HttpFault::Patch {
                phase,
                headers,
                query,
                body_merge,
            }
        }
    };
    if selector.code.is_some() && fault.phase() == Phase::Request {
        return Err(FieldError::invalid(
            "action.http.code",
            "the response code is known in the response phase only; set \"phase\": \"response\"",
        ));
    }
    Ok(ProxyAction::Http {
        fault,
        selector,
        percent,
    })
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
