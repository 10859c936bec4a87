//! What the HTTP faults do to a request or a response: abort replies
//! (plain and gRPC), replacements and patches of status, method, path,
//! query, headers and bodies. Framing headers are fixed after every body
//! change; nothing else is added to the message.

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use serde_json::Value;

use super::body::{self, Patched, ProxyBody};
use crate::error::BoxError;
use crate::rules::Headers;

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`...).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().len() >= 16 && v.as_bytes()[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

/// The gRPC status for an HTTP status, as a gRPC server behind a failing
/// proxy would report it.
pub(crate) fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        200 => 0,
        400 => 3,        // INVALID_ARGUMENT
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        408 => 4,        // DEADLINE_EXCEEDED
        409 => 10,       // ABORTED
        429 => 8,        // RESOURCE_EXHAUSTED
        499 => 1,        // CANCELLED
        500 => 13,       // INTERNAL
        501 => 12,       // UNIMPLEMENTED
        502 | 503 => 14, // UNAVAILABLE
        504 => 4,        // DEADLINE_EXCEEDED
        _ => 2,          // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
fn grpc_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The reply of an `http-abort` with a status. gRPC requests get HTTP 200
/// and a Trailers-Only response (`grpc-status` and `grpc-message` in the
/// only HEADERS frame), as a gRPC server that fails a call at once sends.
pub(crate) fn abort_response(
    status: StatusCode,
    body: Option<&Bytes>,
    grpc: bool,
) -> Response<ProxyBody> {
    let reason = status.canonical_reason().unwrap_or("");
    if grpc {
        let message = match body {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => format!("injected fault: HTTP {} {reason}", status.as_u16()),
        };
        let mut resp = Response::new(body::empty());
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(grpc_code(status))),
        );
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&message)) {
            h.insert("grpc-message", v);
        }
        return resp;
    }
    let text = match body {
        Some(b) => b.clone(),
        None => Bytes::from(format!("{} {reason}\n", status.as_u16())),
    };
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn set_headers(dst: &mut HeaderMap, headers: &Headers, append: bool) {
    for (k, v) in headers {
        if append {
            dst.append(k.clone(), v.clone());
        } else {
            dst.insert(k.clone(), v.clone());
        }
    }
}

/// Replaces the body: new framing, and no content coding (the new body is
/// plain, unless the fault sets `Content-Encoding` itself).
fn replace_body(headers: &mut HeaderMap, dst: &mut ProxyBody, b: &Bytes, fault_headers: &Headers) {
    let sets_encoding = fault_headers
        .iter()
        .any(|(k, _)| k == http::header::CONTENT_ENCODING);
    body::forget_framing(headers, sets_encoding);
    *dst = body::full(b.clone());
}

/// Sets the request path; the original query stays unless the new path
/// has its own.
fn replace_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = if path.contains('?') {
        path.to_string()
    } else {
        match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        }
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

fn add_query(uri: &Uri, query: &str) -> Option<Uri> {
    let path = uri.path();
    let pq = match uri.query() {
        Some(q) if !q.is_empty() => format!("{path}?{q}&{query}"),
        _ => format!("{path}?{query}"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

pub(crate) fn replace_request(
    req: &mut Request<ProxyBody>,
    headers: &Headers,
    new_body: Option<&Bytes>,
    path: Option<&str>,
    method: Option<&Method>,
) {
    if let Some(m) = method {
        *req.method_mut() = m.clone();
    }
    if let Some(p) = path {
        if req.method() != Method::CONNECT {
            match replace_path(req.uri(), p) {
                Some(u) => *req.uri_mut() = u,
                None => tracing::warn!(path = p, "cannot use the replacement path"),
            }
        }
    }
    set_headers(req.headers_mut(), headers, false);
    if let Some(b) = new_body {
        let (parts, mut body) = std::mem::replace(req, Request::new(body::empty())).into_parts();
        let mut parts = parts;
        replace_body(&mut parts.headers, &mut body, b, headers);
        *req = Request::from_parts(parts, body);
    }
}

pub(crate) fn replace_response(
    resp: &mut Response<ProxyBody>,
    status: Option<StatusCode>,
    headers: &Headers,
    new_body: Option<&Bytes>,
) {
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
    set_headers(resp.headers_mut(), headers, false);
    if let Some(b) = new_body {
        let (mut parts, mut body) =
            std::mem::replace(resp, Response::new(body::empty())).into_parts();
        replace_body(&mut parts.headers, &mut body, b, headers);
        *resp = Response::from_parts(parts, body);
    }
}

/// Applies a merge patch to a message body whose headers say JSON, fixing
/// the framing when it changed.
pub(crate) async fn patch_body(
    headers: &mut HeaderMap,
    b: ProxyBody,
    patch: &Value,
) -> Result<ProxyBody, BoxError> {
    if !body::is_plain_json(headers) {
        return Ok(b);
    }
    match body::patch_json(b, patch).await? {
        Patched::Changed(nb) => {
            body::forget_framing(headers, true);
            Ok(nb)
        }
        Patched::Unchanged(b) => Ok(b),
    }
}

pub(crate) async fn patch_request(
    req: Request<ProxyBody>,
    headers: &Headers,
    query: &str,
    body_merge: Option<&Value>,
) -> Result<Request<ProxyBody>, BoxError> {
    let (mut parts, mut b) = req.into_parts();
    set_headers(&mut parts.headers, headers, true);
    if !query.is_empty() && parts.method != Method::CONNECT {
        match add_query(&parts.uri, query) {
            Some(u) => parts.uri = u,
            None => tracing::warn!(query, "cannot add the query"),
        }
    }
    if let Some(p) = body_merge {
        b = patch_body(&mut parts.headers, b, p).await?;
    }
    Ok(Request::from_parts(parts, b))
}

pub(crate) async fn patch_response(
    resp: Response<ProxyBody>,
    headers: &Headers,
    body_merge: Option<&Value>,
    has_body: bool,
) -> Result<Response<ProxyBody>, BoxError> {
    let (mut parts, mut b) = resp.into_parts();
    set_headers(&mut parts.headers, headers, true);
    if let (Some(p), true) = (body_merge, has_body) {
        b = patch_body(&mut parts.headers, b, p).await?;
    }
    Ok(Response::from_parts(parts, b))
}

/// Declines an `Upgrade: h2c` offer by removing it (RFC 9113 §3.1 lets a
/// server ignore it), so the exchange stays HTTP/1.1 and later requests on
/// the connection still meet the faults. Other upgrade tokens stay.
pub(crate) fn decline_h2c(headers: &mut HeaderMap) {
    let Some(up) = headers.get(UPGRADE).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let tokens: Vec<&str> = up
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if !tokens.iter().any(|t| t.eq_ignore_ascii_case("h2c")) {
        return;
    }
    let rest: Vec<&str> = tokens
        .into_iter()
        .filter(|t| !t.eq_ignore_ascii_case("h2c"))
        .collect();
    let still_upgrading = !rest.is_empty();
    let rest = rest.join(", ");
    if still_upgrading {
        if let Ok(v) = HeaderValue::from_str(&rest) {
            headers.insert(UPGRADE, v);
        }
    } else {
        headers.remove(UPGRADE);
    }
    headers.remove("http2-settings");
    let conn: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("http2-settings")
                && (still_upgrading || !t.eq_ignore_ascii_case("upgrade"))
        })
        .collect();
    headers.remove(CONNECTION);
    if !conn.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&conn.join(", ")) {
            headers.insert(CONNECTION, v);
        }
    }
}

/// Whether a request asks to switch protocols (or tunnel) once the server
/// agrees.
pub(crate) fn wants_upgrade(req: &Request<ProxyBody>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_offers_are_declined_and_other_upgrades_kept() {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"),
        );
        decline_h2c(&mut h);
        assert!(h.get(UPGRADE).is_none());
        assert!(h.get(CONNECTION).is_none());
        assert!(h.get("http2-settings").is_none());

        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        decline_h2c(&mut h);
        assert_eq!(
            h.get(UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get(CONNECTION).map(|v| v.as_bytes()),
            Some(&b"Upgrade"[..])
        );

        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("h2c, foo/2"));
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade, HTTP2-Settings"),
        );
        decline_h2c(&mut h);
        assert_eq!(h.get(UPGRADE).map(|v| v.as_bytes()), Some(&b"foo/2"[..]));
        assert_eq!(
            h.get(CONNECTION).map(|v| v.as_bytes()),
            Some(&b"keep-alive, Upgrade"[..])
        );
    }

    #[test]
    fn paths_and_queries() {
        let u: Uri = "/a/b?x=1".parse().expect("uri");
        assert_eq!(replace_path(&u, "/c").expect("uri").to_string(), "/c?x=1");
        assert_eq!(
            replace_path(&u, "/c?y=2").expect("uri").to_string(),
            "/c?y=2"
        );
        assert_eq!(
            add_query(&u, "d=1").expect("uri").to_string(),
            "/a/b?x=1&d=1"
        );
        let abs: Uri = "http://h:8080/p".parse().expect("uri");
        assert_eq!(
            add_query(&abs, "d=1").expect("uri").to_string(),
            "http://h:8080/p?d=1"
        );
        assert_eq!(
            replace_path(&abs, "/q").expect("uri").to_string(),
            "http://h:8080/q"
        );
    }

    #[test]
    fn grpc_detection_and_codes() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
        assert_eq!(grpc_code(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_code(StatusCode::NOT_FOUND), 12);
        assert_eq!(grpc_code(StatusCode::FORBIDDEN), 7);
        assert_eq!(grpc_code(StatusCode::UNAUTHORIZED), 16);
        assert_eq!(grpc_code(StatusCode::TOO_MANY_REQUESTS), 8);
        assert_eq!(grpc_code(StatusCode::INTERNAL_SERVER_ERROR), 13);
        assert_eq!(grpc_code(StatusCode::IM_A_TEAPOT), 2);
        assert_eq!(grpc_message("50% off\n"), "50%25 off%0A");
    }
}
