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

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
use tokio::net::UnixListener;

use crate::cri::{Adopter, TARGET_REFRESH_BUDGET};
use crate::metrics::Metrics;
use crate::registry::{AgentError, Registry};

/// Largest request body accepted; a larger one is refused with 413.
const MAX_BODY: usize = 1 << 20;

/// The socket file's mode: owner (root) and group read/write, nothing else.
pub const SOCKET_MODE: u32 = 0o660;

/// Who may connect to the API socket: root, and the members of `group`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketAccess {
    /// The socket file's group; `None` keeps the creating process's (root's).
    pub group: Option<nix::unistd::Gid>,
}

/// The connecting process, from `SO_PEERCRED` on the accepted stream.
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: Option<i32>,
    uid: u32,
    gid: u32,
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
    json(status, &body)
}

fn bad(field: &str, msg: &str) -> AgentError {
    AgentError::Field(FieldError::invalid(field, msg))
}

/// The request's body as JSON; the error is the finished response (413 for
/// a body over [`MAX_BODY`], 400 for anything else wrong with it).
async fn body_json(req: Request<Incoming>) -> Result<Value, Resp> {
    use http_body_util::BodyExt;
    let bytes = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
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
        let resp = self.route(req).await;
        let status = resp.status().as_u16();
        // SO_PEERCRED reports pid 0 for a caller outside the agent's pid
        // namespace (the DaemonSet runs with hostPID: false, so the CNI
        // plugin and host tools are such callers); the uid still names them.
        let pid = match peer.pid {
            Some(p) if p > 0 => p.to_string(),
            _ => "outside-pidns".to_string(),
        };
        if method == Method::GET || method == Method::HEAD {
            tracing::debug!(%method, %path, status, %pid, uid = peer.uid, gid = peer.gid, "api read");
        } else {
            tracing::info!(%method, %path, status, %pid, uid = peer.uid, gid = peer.gid, "api request");
        }
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let reg = self.registry.clone();
        let result: Result<Resp, AgentError> = match (&method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => {
                Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
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
            (
                _,
                ["healthz"]
                | ["metrics"]
                | ["v1", "capabilities"]
                | ["v1", "sandboxes", ..]
                | ["v1", "faults", ..],
            ) => {
                let mut r = error(bad("method", &format!("{method} is not allowed on {path}")));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
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
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; dropping the connection");
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, elapsed = ?started.elapsed(), "connection ended with an error");
            }
        });
    }
}
