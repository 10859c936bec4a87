//! The agent's HTTP/1.1 + JSON API on a unix socket (docs/design.md, "Socket API").
//!
//! What it owns: routing, body limits, JSON (de)serialization and mapping
//! errors onto `{"error": {"code", "message", "field"}}`. What it must not
//! do: decide anything about faults; every request is handed to the
//! [`Registry`] on a blocking thread, since registry calls may enter netns.
//!
//! Access control is the socket file's: mode `0660`, owner root, group
//! [`SocketAccess::group`], in place before the first connection can be made
//! ([`bind`]). Every mutating request is logged at info with the caller's
//! pid, uid and gid (`SO_PEERCRED`).
//!
//! The same API can also be served on a loopback TCP port ([`serve_tcp`],
//! `netfaultd --listen-tcp`), for test suites that reach the agent through
//! `kubectl port-forward`. There every request needs
//! `Authorization: Bearer <token>`, the token being the content of
//! `--token-file` ([`TokenFile`]); mutating requests are logged with the TCP
//! peer's address. Until the token file exists (an optional Kubernetes Secret
//! not created yet), every TCP request is answered `503` with an error that
//! names the file and how to create the Secret; the unix socket is unaffected.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netfault_api::{EnrolRequest, ErrorBody, FieldError};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, UnixListener};

use crate::cri::{Adopter, TARGET_REFRESH_BUDGET};
use crate::metrics::Metrics;
use crate::registry::{AgentError, Registry};

/// Largest request body accepted; a larger one is refused with 413.
const MAX_BODY: usize = 1 << 20;

/// How long a client may take to send a request's head (from the moment the
/// agent waits for it: a new connection, or the next request on a kept-alive
/// one). Past it the connection is closed: a slow-loris client that sends a
/// header byte every few seconds holds nothing for longer than this.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a client may take to send a request's body once its head is
/// in: past it, 408 and the connection is closed.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections served at once, per listener. Further ones wait in the
/// listen backlog (not accepted) until one ends; the connections being
/// served are not slowed by them.
pub const MAX_CONNECTIONS: usize = 1024;

/// After a failed `accept` (EMFILE, ENFILE...), wait this long before the
/// next: the error would otherwise repeat in a busy loop.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// The socket file's mode: owner (root) and group read/write, nothing else.
pub const SOCKET_MODE: u32 = 0o660;

/// Who may connect to the API socket: root, and the members of `group`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketAccess {
    /// The socket file's group; `None` keeps the creating process's (root's).
    pub group: Option<nix::unistd::Gid>,
}

/// Who is calling: a process on the unix socket (from `SO_PEERCRED` on the
/// accepted stream), or a TCP peer that must present the bearer token.
#[derive(Debug, Clone)]
enum Peer {
    Unix {
        pid: Option<i32>,
        uid: u32,
        gid: u32,
    },
    Tcp {
        addr: SocketAddr,
        token: Arc<TokenFile>,
    },
}

pub struct Api {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// CRI adoption; `None` when `--cri-socket ""` turned it off.
    pub cri: Option<Arc<Adopter>>,
}

type Resp = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The HTTP status of an error: by the field error's code.
fn status_of(e: &AgentError) -> StatusCode {
    match e {
        AgentError::Field(fe) => match fe.code.as_str() {
            "unsupported" => StatusCode::UNPROCESSABLE_ENTITY,
            "not_found" => StatusCode::NOT_FOUND,
            "conflict" => StatusCode::CONFLICT,
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "policy_denied" => StatusCode::FORBIDDEN,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        },
        AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(e: AgentError) -> Resp {
    let status = status_of(&e);
    let fe = match e {
        AgentError::Field(fe) => fe,
        AgentError::Internal(m) => FieldError {
            code: netfault_api::ErrorCode::Internal,
            field: String::new(),
            message: m,
        },
    };
    let mut body = ErrorBody::from(fe.clone());
    if fe.field.is_empty() {
        // Whole-body problems (not JSON, not an object) are reported on `body`.
        body.error.field = Some("body".into());
        body.error.message = fe.message;
    }
    let mut r = json(status, &body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
    }
    r
}

fn bad(field: &str, msg: &str) -> AgentError {
    AgentError::Field(FieldError::invalid(field, msg))
}

/// The request's body as JSON; the error is the finished response (413 for
/// a body over [`MAX_BODY`], 408 for one not in within [`BODY_TIMEOUT`], 400
/// for anything else wrong with it: not UTF-8, not JSON, nested deeper than
/// serde_json's recursion limit of 128).
async fn body_json(req: Request<Incoming>) -> Result<Value, Resp> {
    use http_body_util::BodyExt;
    let collect = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, collect).await else {
        let msg = format!("the request body did not arrive within {BODY_TIMEOUT:?}");
        let mut r = error(bad("body", &msg));
        *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Err(r);
    };
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!("the request body is larger than {MAX_BODY} bytes");
            let mut r = error(bad("body", &msg));
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return Err(r);
        }
        Err(e) => return Err(error(bad("", &format!("reading the body: {e}")))),
    };
    if bytes.is_empty() {
        return Err(error(bad("", "the request needs a JSON body")));
    }
    if let Err(e) = std::str::from_utf8(&bytes) {
        let msg = format!(
            "body is not valid UTF-8 (byte {} is not), so it is not JSON",
            e.valid_up_to()
        );
        return Err(error(bad("body", &msg)));
    }
    // serde_json refuses nesting deeper than 128 with an error (no stack
    // overflow); it is a 400 like any other malformed body.
    serde_json::from_slice(&bytes)
        .map_err(|e| error(bad("", &format!("body is not valid JSON: {e}"))))
}

/// Runs a registry call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker failed: {e}")))?
}

impl Api {
    /// Answers one request; mutating ones (any method but GET and HEAD) are
    /// logged at info with the caller, reads at debug.
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Resp {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let read = method == Method::GET || method == Method::HEAD;
        match peer {
            Peer::Unix { pid, uid, gid } => {
                // The hand-over is for a new agent on this node only: the
                // unix socket, never the TCP listener.
                let resp = if path.starts_with("/v1/handover") {
                    self.handover(req).await
                } else {
                    self.route(req).await
                };
                let status = resp.status().as_u16();
                // SO_PEERCRED reports pid 0 for a caller outside the agent's pid
                // namespace (the DaemonSet runs with hostPID: false, so the CNI
                // plugin and host tools are such callers); the uid still names them.
                let pid = match pid {
                    Some(p) if p > 0 => p.to_string(),
                    _ => "outside-pidns".to_string(),
                };
                if read {
                    tracing::debug!(%method, %path, status, %pid, uid, gid, "api read");
                } else {
                    tracing::info!(%method, %path, status, %pid, uid, gid, "api request");
                }
                resp
            }
            Peer::Tcp { addr, token } => {
                // The token is checked before anything else, the body included.
                let values: Vec<&[u8]> = req
                    .headers()
                    .get_all(hyper::header::AUTHORIZATION)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                let header = match values.as_slice() {
                    [] => None,
                    [one] => Some(*one),
                    _ => Some(&b""[..]), // several: malformed
                };
                match token.check(header) {
                    Ok(()) => {}
                    Err(Refusal::Unauthorized(why)) => {
                        tracing::warn!(%method, %path, peer = %addr, reason = why, "api request refused: no valid bearer token");
                        self.metrics.count_request(401);
                        return unauthorized(why);
                    }
                    Err(Refusal::NoTokenYet) => {
                        // Logged once when the file is found missing (TokenFile).
                        tracing::debug!(%method, %path, peer = %addr, "api request refused: no token file yet");
                        self.metrics.count_request(503);
                        return no_token_yet(token.path());
                    }
                }
                let resp = self.route(req).await;
                let status = resp.status().as_u16();
                if read {
                    tracing::debug!(%method, %path, status, peer = %addr, "api read (tcp)");
                } else {
                    tracing::info!(%method, %path, status, peer = %addr, "api request (tcp)");
                }
                resp
            }
        }
    }

    /// `POST /v1/handover` and `POST /v1/handover/commit`, body
    /// `{"successor": ID}` (see `registry::handover`).
    async fn handover(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let commit = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/handover") => false,
            (&Method::POST, "/v1/handover/commit") => true,
            (_, path) => {
                return error(AgentError::Field(FieldError::not_found(
                    "path",
                    &format!(
                        "no such endpoint {path} (POST /v1/handover, POST /v1/handover/commit)"
                    ),
                )))
            }
        };
        let v = match body_json(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let Some(successor) = v.get("successor").and_then(Value::as_u64) else {
            return error(bad(
                "successor",
                "must be the new agent's id (an unsigned integer)",
            ));
        };
        let reg = self.registry.clone();
        let done = blocking(move || {
            if commit {
                reg.commit_handover(successor)
            } else {
                reg.freeze(successor)
            }
        })
        .await;
        let resp = match done {
            Ok(()) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "state": if commit { "retired" } else { "frozen" },
                    "pid": std::process::id(),
                }),
            ),
            Err(e) => error(e),
        };
        self.metrics.count_request(resp.status().as_u16());
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let reg = self.registry.clone();
        let result: Result<Resp, AgentError> = match (&method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => {
                // 200 whenever the agent answers (the CNI plugin's STATUS);
                // `serving` is false while a hand-over freezes it or after
                // it retired, which `netfaultctl health` (the DaemonSet's
                // readiness probe) reports as not ready, so a new agent is
                // not ready until it serves the socket itself.
                let serving = reg.serving();
                let status = if serving {
                    "ok"
                } else if reg.retired() {
                    "retired"
                } else {
                    "handing-over"
                };
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "status": status,
                        "serving": serving,
                        "pid": std::process::id(),
                    }),
                ))
            }
            (&Method::GET, ["metrics"]) => {
                let text = self.metrics.render(&reg);
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok(r)
            }
            (&Method::GET, ["v1", "capabilities"]) => {
                let cri = self.cri.clone();
                blocking(move || {
                    let mut caps = reg.capabilities()?;
                    if let Some(obj) = caps.as_object_mut() {
                        let section = match &cri {
                            Some(c) => c.capabilities(),
                            None => serde_json::json!({"enabled": false}),
                        };
                        obj.insert("cri".into(), section);
                        obj.insert(
                            "api".into(),
                            serde_json::json!({
                                "max_body_bytes": MAX_BODY,
                                "header_timeout_ms": HEADER_TIMEOUT.as_millis() as u64,
                                "body_timeout_ms": BODY_TIMEOUT.as_millis() as u64,
                                "max_connections": MAX_CONNECTIONS,
                            }),
                        );
                    }
                    Ok(caps)
                })
                .await
                .map(|c| json(StatusCode::OK, &c))
            }
            (&Method::GET, ["v1", "sandboxes"]) => Ok(json(StatusCode::OK, &reg.sandboxes())),
            (&Method::PUT, ["v1", "sandboxes", id]) => {
                let id = id.to_string();
                match body_json(req).await {
                    Err(r) => Ok(r),
                    Ok(v) => match serde_json::from_value::<EnrolRequest>(v) {
                        Err(e) => Err(bad(&serde_field(&e), &e.to_string())),
                        Ok(enrol) => blocking(move || reg.enrol(&id, enrol))
                            .await
                            .map(|s| json(StatusCode::OK, &s)),
                    },
                }
            }
            (&Method::DELETE, ["v1", "sandboxes", id]) => {
                let id = id.to_string();
                blocking(move || reg.release(&id))
                    .await
                    .map(|_| empty(StatusCode::NO_CONTENT))
            }
            (&Method::GET, ["v1", "faults"]) => Ok(json(StatusCode::OK, &reg.faults())),
            (&Method::POST, ["v1", "faults"]) => match body_json(req).await {
                Err(r) => Ok(r),
                Ok(v) => self
                    .create_fault(v)
                    .await
                    .map(|f| json(StatusCode::CREATED, &f)),
            },
            (&Method::GET, ["v1", "faults", id]) => reg.fault(id).map(|f| json(StatusCode::OK, &f)),
            (&Method::DELETE, ["v1", "faults", id]) => {
                let id = id.to_string();
                blocking(move || reg.delete_fault(&id))
                    .await
                    .map(|_| empty(StatusCode::NO_CONTENT))
            }
            (_, segs) if allowed(segs).is_some() => {
                let allow = allowed(segs).unwrap_or_default();
                let mut r = error(bad(
                    "method",
                    &format!("{method} is not allowed on {path}; allowed: {allow}"),
                ));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                r.headers_mut().insert(
                    hyper::header::ALLOW,
                    hyper::header::HeaderValue::from_static(allow),
                );
                Ok(r)
            }
            _ => Err(AgentError::Field(FieldError::not_found(
                "path",
                &format!("no such endpoint {path}"),
            ))),
        };
        let resp = result.unwrap_or_else(error);
        self.metrics.count_request(resp.status().as_u16());
        resp
    }
}

/// The methods a known path allows (the `Allow` header of a 405); `None`
/// for an unknown path (404).
fn allowed(segs: &[&str]) -> Option<&'static str> {
    match segs {
        ["healthz"] | ["metrics"] | ["v1", "capabilities"] | ["v1", "sandboxes"] => Some("GET"),
        ["v1", "sandboxes", _] => Some("PUT, DELETE"),
        ["v1", "faults"] => Some("GET, POST"),
        ["v1", "faults", _] => Some("GET, DELETE"),
        _ => None,
    }
}

/// The target names a pod or sandbox that is not enrolled: the runtime may
/// know it (CRI adoption).
fn unknown_target(e: &AgentError) -> bool {
    matches!(e, AgentError::Field(fe)
        if fe.code == netfault_api::ErrorCode::NotFound
            && matches!(fe.field.as_str(), "target.pod" | "target.sandbox"))
}

impl Api {
    /// `POST /v1/faults`. A target naming a pod or sandbox that is not
    /// enrolled triggers one runtime pass (shared with concurrent ones,
    /// bounded by [`TARGET_REFRESH_BUDGET`]) and is resolved again; still
    /// unknown, the first answer (404) stands.
    async fn create_fault(&self, body: Value) -> Result<netfault_api::Fault, AgentError> {
        let reg = self.registry.clone();
        let first_body = body.clone();
        let first = blocking(move || reg.create_fault(&first_body)).await;
        let cri = match (&first, &self.cri) {
            (Err(e), Some(cri)) if unknown_target(e) => cri,
            _ => return first,
        };
        if !cri.refresh_within(TARGET_REFRESH_BUDGET).await {
            return first;
        }
        let reg = self.registry.clone();
        blocking(move || reg.create_fault(&body)).await
    }
}

/// Best-effort field name from a serde error such as "missing field `netns`".
fn serde_field(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.split('`').nth(1).unwrap_or_default().to_string()
}

/// Binds the API socket at `socket` with [`SOCKET_MODE`] and `access`'s group
/// already in place when the path appears: it is bound inside a fresh
/// root-only (0700) directory next to `socket`, given its mode and group
/// there, and then renamed over `socket` (replacing a stale one). No process
/// but root can connect before the mode and group are set, and the process
/// umask is left alone (other threads may be creating files).
pub fn bind(socket: &Path, access: SocketAccess) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = socket
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file path", socket.display())))?;
    let mut private = name.to_os_string();
    private.push(".bind");
    let private = dir.join(format!(".{}", private.to_string_lossy()));
    match std::fs::remove_dir_all(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    // A one-letter name: the staged path is only 8 bytes longer than `socket`
    // (a unix socket path has at most 107).
    let staged = private.join("s");
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&staged)?;
        std::os::unix::fs::chown(&staged, Some(0), access.group.map(|g| g.as_raw()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        std::fs::rename(&staged, socket)?;
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    })();
    let cleanup = std::fs::remove_dir_all(&private);
    let listener = bound?;
    cleanup?;
    Ok(listener)
}

/// Serves the API on `socket` until the process ends.
pub async fn serve(api: Arc<Api>, socket: &Path, access: SocketAccess) -> std::io::Result<()> {
    let listener = bind(socket, access)?;
    tracing::info!(
        socket = %socket.display(),
        mode = %format_args!("{SOCKET_MODE:04o}"),
        gid = access.group.map_or(0, |g| g.as_raw()),
        "serving the API"
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = wait_for_slot(&slots).await;
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer::Unix {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; dropping the connection");
                continue;
            }
        };
        serve_connection(api.clone(), stream, peer, slot);
    }
}

/// A permit to serve one more connection: waits while [`MAX_CONNECTIONS`]
/// are served (new connections wait in the kernel's listen backlog).
async fn wait_for_slot(
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if slots.available_permits() == 0 {
        tracing::warn!(
            max = MAX_CONNECTIONS,
            "the API serves its maximum of connections; new ones wait until one ends"
        );
    }
    // The semaphore is never closed; if it were, serving on without a cap
    // beats stopping the API.
    slots.clone().acquire_owned().await.ok()
}

/// Serves one accepted connection (unix or TCP) on its own task: HTTP/1.1,
/// every request answered by `api` on behalf of `peer`. The request head
/// must arrive within [`HEADER_TIMEOUT`]; `slot` is released when the
/// connection ends.
fn serve_connection<S>(
    api: Arc<Api>,
    stream: S,
    peer: Peer,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let svc = service_fn(move |req| {
            let api = api.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
        });
        if let Err(e) = http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            tracing::debug!(error = %e, elapsed = ?started.elapsed(), "connection ended with an error");
        }
    });
}

/// 401 with `WWW-Authenticate: Bearer` and the usual error body naming the
/// `Authorization` header.
fn unauthorized(why: &str) -> Resp {
    let fe = FieldError::new(netfault_api::ErrorCode::Unauthorized, "Authorization", why);
    let mut r = error(AgentError::Field(fe));
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer realm=\"netfaultd\""),
    );
    r
}

/// The Secret the DaemonSet mounts the token from (daemonset/daemonset.yaml).
pub const TOKEN_SECRET_HINT: &str = "kubectl -n netfault create secret generic netfault-api-token --from-literal=token=\"$(head -c 32 /dev/urandom | base64 | tr -d '/+=')\"";

/// 503 for every TCP request while the token file does not exist: the
/// listener is up, but nobody can be authenticated yet. The body names the
/// file and the Secret that fills it.
fn no_token_yet(path: &Path) -> Resp {
    let message = format!(
        "the TCP API has no token yet: {} does not exist. Create the Secret (the kubelet then fills the file and the agent uses it at once): {TOKEN_SECRET_HINT}",
        path.display()
    );
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"error": {"code": "unavailable", "message": message, "field": "token-file"}}),
    );
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("10"),
    );
    r
}

/// `--listen-tcp`: an IP address and port on the loopback interface
/// (127.0.0.0/8 or ::1); port 0 picks a free one (logged at start). The
/// DaemonSet runs with hostNetwork, so any other address would expose the
/// API to the node's network.
pub fn loopback_addr(value: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = value.parse().map_err(|_| {
        format!("{value:?} is not ADDR:PORT (for example 127.0.0.1:7979 or [::1]:7979)")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: only 127.0.0.0/8 and ::1 are accepted (the agent runs in the node's network namespace; reach it with kubectl port-forward)",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--token-file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--token-file {path}: the file holds no token (it is empty or only whitespace)")]
    Empty { path: PathBuf },
    #[error("--token-file {path}: the token must be printable ASCII without spaces (byte {index} is not)")]
    Invalid { path: PathBuf, index: usize },
}

/// What identifies one version of the token file (after symlinks: a
/// Kubernetes Secret volume swaps a `..data` symlink on update).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            len: m.len(),
        }
    }
}

#[derive(Debug)]
struct TokenState {
    stamp: Option<Stamp>,
    /// SHA-256 of the token; `None` while the file is unusable (every request
    /// is then refused).
    digest: Option<[u8; 32]>,
    /// The file does not exist (requests get 503, not 401).
    absent: bool,
}

/// Why a TCP request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no header, a malformed one, a wrong token, or a token file that
    /// exists but holds no usable token.
    Unauthorized(&'static str),
    /// 503: the token file does not exist (yet).
    NoTokenYet,
}

/// The TCP listener's bearer token: the content of `--token-file`, with
/// surrounding whitespace trimmed. Each request `stat`s the file (following
/// symlinks) and re-reads it when its device, inode, mtime or size changed,
/// so a rewritten file or a swapped Secret volume takes effect on the next
/// request. A file that becomes unreadable or empty refuses every request
/// until it is fixed (logged once per change). A file that does not exist
/// ([`TokenFile::open_or_wait`] at start, or removed later) makes every
/// request a 503 until it appears.
///
/// Only the token's SHA-256 is kept; a presented token is hashed and the two
/// digests compared in constant time, so neither the content nor the length
/// of the token leaks through timing.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

const NO_USABLE_TOKEN: Refusal =
    Refusal::Unauthorized("the agent has no usable token (see its log)");

/// Mode bits beyond `0640`: the token file should not be readable by others
/// (nor writable by the group).
const TOKEN_MODE_MAX: u32 = 0o640;

impl TokenFile {
    /// Reads the token file; an unreadable, empty or malformed file is an error.
    pub fn open(path: &Path) -> Result<TokenFile, TokenError> {
        let (stamp, digest) = load_token(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new(TokenState {
                stamp: Some(stamp),
                digest: Some(digest),
                absent: false,
            }),
        })
    }

    /// Like [`TokenFile::open`], but a file that does not exist yet is not an
    /// error: the DaemonSet mounts the token from an optional Secret, and the
    /// kubelet writes the file when the Secret is created. Until then every
    /// request is refused with [`Refusal::NoTokenYet`] (logged once here).
    /// An existing file that is unreadable, empty or malformed is still an
    /// error: that is a mistake to fix, not a step not taken yet.
    pub fn open_or_wait(path: &Path) -> Result<TokenFile, TokenError> {
        match TokenFile::open(path) {
            Err(TokenError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::warn!(
                    path = %path.display(),
                    "the API token file does not exist yet: every TCP API request is answered 503 until it appears (create the Secret: {TOKEN_SECRET_HINT})"
                );
                Ok(TokenFile {
                    path: path.to_path_buf(),
                    state: Mutex::new(TokenState {
                        stamp: None,
                        digest: None,
                        absent: true,
                    }),
                })
            }
            other => other,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current token's digest, re-reading the file if it changed
    /// (`Err` when there is none).
    fn current(&self) -> Result<[u8; 32], Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let meta = std::fs::metadata(&self.path);
        let stamp = meta.as_ref().ok().map(Stamp::of);
        if stamp.is_some() && stamp == st.stamp {
            return st.digest.ok_or(NO_USABLE_TOKEN);
        }
        if matches!(&meta, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            if !st.absent {
                tracing::error!(path = %self.path.display(), "the API token file is gone: every TCP API request is answered 503 until it is back");
            }
            st.stamp = None;
            st.digest = None;
            st.absent = true;
            return Err(Refusal::NoTokenYet);
        }
        match load_token(&self.path) {
            Ok((stamp, digest)) => {
                if st.digest.is_some() {
                    tracing::info!(path = %self.path.display(), "the API token file changed; using the new token");
                } else if st.absent {
                    tracing::info!(path = %self.path.display(), "the API token file appeared; serving TCP API requests that carry its token");
                } else {
                    tracing::info!(path = %self.path.display(), "the API token file is usable again");
                }
                st.stamp = Some(stamp);
                st.digest = Some(digest);
            }
            Err(e) => {
                if st.digest.is_some() || st.stamp.is_some() || st.absent {
                    tracing::error!(error = %e, "refusing every TCP API request until the token file is fixed");
                }
                st.stamp = None;
                st.digest = None;
            }
        }
        st.absent = false;
        st.digest.ok_or(NO_USABLE_TOKEN)
    }

    /// Checks an `Authorization` header value (`None`: absent). The error
    /// says why, for the 401's message, or that there is no token file yet
    /// (503, whatever the header).
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), Refusal> {
        let expected = self.current()?;
        let header = header.ok_or(Refusal::Unauthorized(
            "the request needs an Authorization: Bearer <token> header",
        ))?;
        let presented = bearer_token(header).ok_or(Refusal::Unauthorized(
            "the Authorization header is not \"Bearer <token>\"",
        ))?;
        if digest_eq(&sha256(presented), &expected) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized("the bearer token is not valid"))
        }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Constant-time equality of two digests.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(a.ct_eq(b))
}

/// Whether `token` may be sent in a header: printable ASCII, no spaces
/// (`Err(index)` of the first byte that is not).
fn check_token_bytes(token: &[u8]) -> Result<(), usize> {
    match token.iter().position(|b| !(0x21..=0x7e).contains(b)) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

fn load_token(path: &Path) -> Result<(Stamp, [u8; 32]), TokenError> {
    let read_err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let bytes = std::fs::read(path).map_err(read_err)?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    check_token_bytes(token).map_err(|index| TokenError::Invalid {
        path: path.to_path_buf(),
        index,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & !TOKEN_MODE_MAX != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = %format_args!("{mode:04o}"),
            "the API token file is readable or writable beyond owner and group; make it 0600 or 0640 (a Secret volume: defaultMode: 0400)"
        );
    }
    if token.len() < 16 {
        tracing::warn!(path = %path.display(), len = token.len(), "the API token is short; use at least 32 random characters");
    }
    Ok((Stamp::of(&meta), sha256(token)))
}

/// The token of an `Authorization` header value: the scheme `Bearer` in any
/// case, one or more spaces or tabs, then a token of printable ASCII without
/// spaces (trailing whitespace allowed). `None` for anything else, non-UTF-8
/// bytes included.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ' || *b == b'\t')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii_start();
    if token.is_empty() || check_token_bytes(token).is_err() {
        return None;
    }
    Some(token)
}

/// Binds the TCP listener (see [`loopback_addr`]; the address is checked
/// again here).
pub async fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "{addr} is not a loopback address"
        )));
    }
    TcpListener::bind(addr).await
}

/// Serves the API on `listener` (see [`bind_tcp`]) until the process ends;
/// every request must carry `token`.
pub async fn serve_tcp(
    api: Arc<Api>,
    listener: TcpListener,
    token: Arc<TokenFile>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, token_file = %token.path().display(), "serving the API on TCP (bearer token required)");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = wait_for_slot(&slots).await;
        let (stream, addr) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer::Tcp {
            addr,
            token: token.clone(),
        };
        serve_connection(api.clone(), stream, peer, slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"  Bearer    abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer\tabc"), Some(&b"abc"[..]));
        assert_eq!(
            bearer_token(b"Bearer a.b-c_d~e+f/g=="),
            Some(&b"a.b-c_d~e+f/g=="[..])
        );
        for bad in [
            &b""[..],
            b"Bearer",
            b"Bearer ",
            b"Bearerabc",
            b"Basic abc",
            b"Token abc",
            b"Bearer abc def",
            b"Bearer \xff\xfe",
            b"Bearer caf\xc3\xa9",
            b"Bearer a\x00b",
        ] {
            assert_eq!(
                bearer_token(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        let a = sha256(b"secret-token-0123456789");
        assert!(digest_eq(&a, &sha256(b"secret-token-0123456789")));
        assert!(!digest_eq(&a, &sha256(b"secret-token-0123456788")));
        assert!(!digest_eq(&a, &sha256(b"secret-token")));
        assert!(!digest_eq(&a, &sha256(b"")));
        let mut b = a;
        b[31] ^= 1;
        assert!(!digest_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!digest_eq(&a, &b));
    }

    #[test]
    fn listen_tcp_accepts_only_loopback() {
        for ok in ["127.0.0.1:7979", "127.1.2.3:0", "[::1]:7979"] {
            assert!(loopback_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "0.0.0.0:7979",
            "10.0.0.1:7979",
            "[::]:7979",
            "[::ffff:127.0.0.1]:7979",
            "localhost:7979",
            "127.0.0.1",
            "7979",
        ] {
            assert!(loopback_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_file_is_trimmed_checked_and_reread() {
        let dir = std::env::temp_dir().join(format!("nf-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, "  \n").expect("write");
        assert!(matches!(
            TokenFile::open(&path),
            Err(TokenError::Empty { .. })
        ));
        std::fs::write(&path, "two words").expect("write");
        assert!(matches!(
            TokenFile::open(&path),
            Err(TokenError::Invalid { index: 3, .. })
        ));
        assert!(matches!(
            TokenFile::open(&dir.join("missing")),
            Err(TokenError::Read { .. })
        ));
        std::fs::write(&path, "first-token-0123456789\n").expect("write");
        let t = TokenFile::open(&path).expect("token");
        assert_eq!(t.check(Some(b"Bearer first-token-0123456789")), Ok(()));
        assert!(t.check(Some(b"Bearer first-token-012345678")).is_err());
        assert!(t.check(None).is_err());
        // Rotation: a new file renamed over the old one (a new inode).
        let next = dir.join("token.new");
        std::fs::write(&next, "second-token-0123456789").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert!(t.check(Some(b"Bearer first-token-0123456789")).is_err());
        assert_eq!(t.check(Some(b"Bearer second-token-0123456789")), Ok(()));
        // Emptied: everything is refused, until a token is back.
        std::fs::write(&path, "").expect("write");
        assert!(t.check(Some(b"Bearer second-token-0123456789")).is_err());
        std::fs::write(&path, "third-token-0123456789").expect("write");
        assert_eq!(t.check(Some(b"Bearer third-token-0123456789")), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_token_file_means_503_until_it_appears() {
        let dir = std::env::temp_dir().join(format!("nf-token-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        let _ = std::fs::remove_file(&path);
        // open() still refuses a missing file; open_or_wait() waits for it.
        assert!(matches!(
            TokenFile::open(&path),
            Err(TokenError::Read { .. })
        ));
        let t = TokenFile::open_or_wait(&path).expect("a missing file is not an error");
        let good = Some(&b"Bearer late-token-0123456789"[..]);
        assert_eq!(t.check(good), Err(Refusal::NoTokenYet));
        assert_eq!(t.check(None), Err(Refusal::NoTokenYet));
        std::fs::write(&path, "late-token-0123456789\n").expect("write");
        assert_eq!(t.check(good), Ok(()));
        assert!(matches!(
            t.check(Some(b"Bearer wrong-token-0123456789")),
            Err(Refusal::Unauthorized(_))
        ));
        // Removed again (the Secret deleted): 503 again; an empty file: 401.
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(t.check(good), Err(Refusal::NoTokenYet));
        std::fs::write(&path, "").expect("write");
        assert!(matches!(t.check(good), Err(Refusal::Unauthorized(_))));
        // An existing but empty file is still refused at start.
        assert!(matches!(
            TokenFile::open_or_wait(&path),
            Err(TokenError::Empty { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
