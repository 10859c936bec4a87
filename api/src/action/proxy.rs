//! The actions of the transparent proxy: HTTP faults (`http-abort`,
//! `http-delay`, `http-replace`, `http-patch`) and TCP faults (`tcp-reset`,
//! `tcp-slow-close`, `tcp-bandwidth`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::dns::DnsAction;
use crate::error::{ErrorCode, FieldError};
use crate::parse::ACTION;
use crate::parse::{
    fmt_duration, given, obj, opt, opt_duration, opt_percent, opt_str, parse_rate, parse_status,
    reject_unknown, req,
};

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
    /// Acts on the pod's DNS queries: over TCP in the proxy, over UDP in
    /// the proxy backend's DNS queue (see `netfault-dns`).
    Dns(DnsAction),
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
            ProxyAction::Dns(a) => a.type_name(),
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
                fault.write_json(&mut v);
            }
            ProxyAction::Tcp { fault, percent } => {
                v["percent"] = json!(percent);
                fault.write_json(&mut v);
            }
            ProxyAction::Dns(a) => return a.to_json(),
        }
        v
    }
}

impl HttpFault {
    /// Adds the fault's own fields to its action's canonical JSON.
    fn write_json(&self, v: &mut Value) {
        match self {
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
}

impl TcpFault {
    /// Adds the fault's own fields to its action's canonical JSON.
    fn write_json(&self, v: &mut Value) {
        match self {
            TcpFault::Reset {
                after: ResetAfter::Time(d),
            } => v["after"] = json!(fmt_duration(*d)),
            TcpFault::Reset {
                after: ResetAfter::Bytes(n),
            } => v["after_bytes"] = json!(n),
            TcpFault::SlowClose { delay } => v["delay"] = json!(fmt_duration(*delay)),
            TcpFault::Bandwidth { bits_per_sec } => v["rate"] = json!(format!("{bits_per_sec}bit")),
        }
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

/// `action.http`: which requests an HTTP fault applies to.
fn parse_selector(v: &Value, field: &str) -> Result<HttpSelector, FieldError> {
    let m = obj(v, field)?;
    reject_unknown(m, field, &["path", "method", "headers", "code"])?;
    Ok(HttpSelector {
        path: opt_str(m, field, "path")?
            .map(|p| selector_path(p, &format!("{field}.path")))
            .transpose()?,
        method: opt_str(m, field, "method")?
            .map(|s| parse_method(s, &format!("{field}.method")))
            .transpose()?,
        headers: opt(m, field, "headers", |h, f| parse_headers(h, f, false))?.unwrap_or_default(),
        code: opt(m, field, "code", |c, f| parse_status(c, f, 100))?,
    })
}

/// A path glob of a selector.
fn selector_path(p: &str, field: &str) -> Result<String, FieldError> {
    if !(p.starts_with('/') || p.starts_with('*')) {
        return Err(FieldError::invalid(field, "a path glob starts with / or *"));
    }
    if p.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(FieldError::invalid(
            field,
            "a path glob cannot hold whitespace, control characters or #",
        ));
    }
    if p.contains('?') && p.split_once('?').is_some_and(|(_, q)| q.contains('=')) {
        return Err(FieldError::invalid(
            field,
            "the glob matches the path only; ? matches one character, not a query",
        ));
    }
    Ok(p.to_string())
}

fn parse_phase(m: &Map<String, Value>) -> Result<Phase, FieldError> {
    let phase = opt(m, ACTION, "phase", |p, field| match p.as_str() {
        Some("request") => Ok(Phase::Request),
        Some("response") => Ok(Phase::Response),
        _ => Err(FieldError::invalid(field, "expected request or response")),
    })?;
    Ok(phase.unwrap_or_default())
}

/// A required delay, above zero and at most [`MAX_PROXY_DELAY`].
fn proxy_delay(m: &Map<String, Value>, key: &str) -> Result<Duration, FieldError> {
    let field = format!("{ACTION}.{key}");
    let d = opt_duration(m, ACTION, key)?.ok_or_else(|| FieldError::missing(&field))?;
    if d.is_zero() {
        return Err(FieldError::invalid(&field, "must be greater than zero"));
    }
    if d > MAX_PROXY_DELAY {
        return Err(FieldError::invalid(&field, "must be at most 10m"));
    }
    Ok(d)
}

/// `action.body`: a string of at most [`MAX_PROXY_BODY`] bytes.
fn body_string(m: &Map<String, Value>) -> Result<Option<String>, FieldError> {
    opt(m, ACTION, "body", |b, field| match b {
        Value::String(s) if s.len() <= MAX_PROXY_BODY => Ok(s.clone()),
        Value::String(_) => Err(FieldError::invalid(field, "must be at most 1 MiB")),
        _ => Err(FieldError::invalid(field, "must be a string")),
    })
}

/// `action.headers` of a replace or patch (no framing headers).
fn fault_headers(m: &Map<String, Value>) -> Result<BTreeMap<String, String>, FieldError> {
    Ok(opt(m, ACTION, "headers", |h, f| parse_headers(h, f, true))?.unwrap_or_default())
}

/// The fields every TCP action has besides its own.
const TCP_COMMON: &[&str] = &["type", "percent"];
/// The fields every HTTP action has besides its own.
const HTTP_COMMON: &[&str] = &["type", "http", "percent"];

/// Rejects fields other than `common` and `known`; the `percent` of the
/// requests or connections to act on, which every proxy action has.
fn check_fields(
    m: &Map<String, Value>,
    common: &[&str],
    known: &[&str],
) -> Result<f64, FieldError> {
    reject_unknown(m, ACTION, &[common, known].concat())?;
    opt_percent(m, ACTION, "percent", 100.0)
}

/// A TCP action with its own fields `known`, whose fault `fault` reads.
fn tcp(
    m: &Map<String, Value>,
    known: &[&str],
    fault: impl FnOnce(&Map<String, Value>) -> Result<TcpFault, FieldError>,
) -> Result<ProxyAction, FieldError> {
    let percent = check_fields(m, TCP_COMMON, known)?;
    Ok(ProxyAction::Tcp {
        fault: fault(m)?,
        percent,
    })
}

/// An HTTP action with its own fields `known`, whose fault `fault` reads.
fn http(
    m: &Map<String, Value>,
    known: &[&str],
    fault: impl FnOnce(&Map<String, Value>) -> Result<HttpFault, FieldError>,
) -> Result<ProxyAction, FieldError> {
    let percent = check_fields(m, HTTP_COMMON, known)?;
    let selector = opt(m, ACTION, "http", parse_selector)?.unwrap_or_default();
    let fault = fault(m)?;
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

/// Which of two alternative fields an action was given.
enum OneOf<A, B> {
    First(A),
    Second(B),
}

/// Exactly one of `first` and `second`: `both` when given both (on the
/// second's field), a `missing` error on `neither.0` when given none.
fn one_of<A, B>(
    first: Option<A>,
    second: Option<B>,
    both: (&str, &str),
    neither: (&str, &str),
) -> Result<OneOf<A, B>, FieldError> {
    match (first, second) {
        (Some(_), Some(_)) => Err(FieldError::invalid(both.0, both.1)),
        (None, None) => Err(FieldError::new(ErrorCode::Missing, neither.0, neither.1)),
        (Some(a), None) => Ok(OneOf::First(a)),
        (None, Some(b)) => Ok(OneOf::Second(b)),
    }
}

pub(super) fn tcp_reset(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    tcp(m, &["after", "after_bytes"], |m| {
        let bytes = opt(m, ACTION, "after_bytes", |b, field| {
            b.as_u64()
                .ok_or_else(|| FieldError::invalid(field, "must be a whole number of bytes"))
        })?;
        let after = match one_of(
            opt_duration(m, ACTION, "after")?,
            bytes,
            ("action.after_bytes", "give after or after_bytes, not both"),
            ("action.after", "give after (a duration) or after_bytes"),
        )? {
            OneOf::First(d) if d > Duration::from_secs(24 * 3600) => {
                return Err(FieldError::invalid("action.after", "must be at most 24h"))
            }
            OneOf::First(d) => ResetAfter::Time(d),
            OneOf::Second(n) => ResetAfter::Bytes(n),
        };
        Ok(TcpFault::Reset { after })
    })
}

pub(super) fn tcp_slow_close(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    tcp(m, &["delay"], |m| {
        Ok(TcpFault::SlowClose {
            delay: proxy_delay(m, "delay")?,
        })
    })
}

pub(super) fn tcp_bandwidth(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    tcp(m, &["rate"], |m| {
        Ok(TcpFault::Bandwidth {
            bits_per_sec: req(m, ACTION, "rate", parse_rate)?,
        })
    })
}

pub(super) fn http_abort(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    http(m, &["status", "reset", "body"], |m| {
        let reset = opt(m, ACTION, "reset", |r, field| {
            r.as_bool()
                .ok_or_else(|| FieldError::invalid(field, "must be true or false"))
        })?
        .unwrap_or(false);
        let status = given(m, "status");
        let body = body_string(m)?;
        let abort = match one_of(
            status,
            reset.then_some(()),
            ("action.reset", "give status or reset, not both"),
            (
                "action.status",
                "give status (the reply), or \"reset\": true",
            ),
        )? {
            OneOf::Second(()) if body.is_some() => {
                return Err(FieldError::invalid(
                    "action.body",
                    "a reset sends no reply, so no body",
                ))
            }
            OneOf::Second(()) => HttpAbort::Reset,
            OneOf::First(s) => HttpAbort::Status {
                status: parse_status(s, "action.status", 200)?,
                body,
            },
        };
        Ok(HttpFault::Abort(abort))
    })
}

pub(super) fn http_delay(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    http(m, &["delay", "phase"], |m| {
        Ok(HttpFault::Delay {
            delay: proxy_delay(m, "delay")?,
            phase: parse_phase(m)?,
        })
    })
}

pub(super) fn http_replace(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    const KNOWN: &[&str] = &["phase", "status", "headers", "body", "path", "method"];
    http(m, KNOWN, |m| {
        let phase = parse_phase(m)?;
        let status = opt(m, ACTION, "status", |s, f| parse_status(s, f, 200))?;
        let headers = fault_headers(m)?;
        let body = body_string(m)?;
        let path = opt_str(m, ACTION, "path")?
            .map(replacement_path)
            .transpose()?;
        let method = opt_str(m, ACTION, "method")?
            .map(|s| parse_method(s, "action.method"))
            .transpose()?;
        match phase {
            Phase::Request if status.is_some() => Err(FieldError::invalid(
                "action.status",
                "a status is replaced in the response phase; set \"phase\": \"response\"",
            )),
            Phase::Response if path.is_some() => Err(FieldError::invalid(
                "action.path",
                "the path is replaced in the request phase only",
            )),
            Phase::Response if method.is_some() => Err(FieldError::invalid(
                "action.method",
                "the method is replaced in the request phase only",
            )),
            _ if status.is_none()
                && headers.is_empty()
                && body.is_none()
                && path.is_none()
                && method.is_none() =>
            {
                Err(FieldError::invalid(
                    "action",
                    "http-replace needs at least one of: status, headers, body, path, method",
                ))
            }
            _ => Ok(HttpFault::Replace {
                phase,
                status,
                headers,
                body,
                path,
                method,
            }),
        }
    })
}

/// The path (and optional query) an `http-replace` sends instead.
fn replacement_path(p: &str) -> Result<String, FieldError> {
    if !p.starts_with('/') {
        return Err(FieldError::invalid("action.path", "must start with /"));
    }
    if !p.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(FieldError::invalid(
            "action.path",
            "must be a percent-encoded path (and optional ?query) without spaces or #",
        ));
    }
    Ok(p.to_string())
}

pub(super) fn http_patch(m: &Map<String, Value>) -> Result<ProxyAction, FieldError> {
    http(m, &["phase", "headers", "query", "body_merge"], |m| {
        let phase = parse_phase(m)?;
        let headers = fault_headers(m)?;
        let query = opt(m, ACTION, "query", parse_query)?.unwrap_or_default();
        if phase == Phase::Response && !query.is_empty() {
            return Err(FieldError::invalid(
                "action.query",
                "query parameters are added in the request phase only",
            ));
        }
        let body_merge = opt(m, ACTION, "body_merge", parse_body_merge)?;
        if headers.is_empty() && query.is_empty() && body_merge.is_none() {
            return Err(FieldError::invalid(
                "action",
                "http-patch needs at least one of: headers, query, body_merge",
            ));
        }
        Ok(HttpFault::Patch {
            phase,
            headers,
            query,
            body_merge,
        })
    })
}

/// `action.query`: parameter names to values (strings, numbers or booleans).
fn parse_query(v: &Value, field: &str) -> Result<BTreeMap<String, String>, FieldError> {
    let qm = v
        .as_object()
        .ok_or_else(|| FieldError::invalid(field, "must be an object of names to values"))?;
    let mut out = BTreeMap::new();
    for (k, v) in qm {
        if k.is_empty() {
            return Err(FieldError::invalid(
                field,
                "parameter names must not be empty",
            ));
        }
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(FieldError::invalid(
                    &format!("{field}.{k}"),
                    "must be a string",
                ))
            }
        };
        out.insert(k.clone(), v);
    }
    Ok(out)
}

/// `action.body_merge`: any JSON, at most [`MAX_PROXY_BODY`] serialized and
/// 64 levels deep.
fn parse_body_merge(b: &Value, field: &str) -> Result<Value, FieldError> {
    if b.to_string().len() > MAX_PROXY_BODY {
        return Err(FieldError::invalid(field, "must be at most 1 MiB"));
    }
    if depth(b) > 64 {
        return Err(FieldError::invalid(field, "nests deeper than 64 levels"));
    }
    Ok(b.clone())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
