//! A scripted Kubernetes API server for node-level tests: plain HTTP/1.1 on
//! 127.0.0.1, no auth, and only what a node agent's pod watch and event
//! recorder use, on the real wire protocol:
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName=N`: a `PodList` with a
//!   `metadata.resourceVersion` (no pagination: `limit` is ignored and there
//!   is never a `continue`);
//! - `GET /api/v1/pods?watch=true&resourceVersion=RV&...`: a chunked stream
//!   of JSON lines, `ADDED` / `MODIFIED` / `DELETED` events after `RV`,
//!   `BOOKMARK` events every second when `allowWatchBookmarks=true`, and the
//!   `410 Gone` form a real server sends: HTTP 200 with one `ERROR` event
//!   whose object is a `Status` with `code: 410` (for a `RV` older than the
//!   last [`ApiServer::expire_watches`], or on open watches when it is called);
//! - `POST`/`PATCH /apis/events.k8s.io/v1/namespaces/NS/events[/NAME]`:
//!   recorded ([`ApiServer::events`]) and echoed back.
//!
//! What `netfaultctl --kube` uses (a pod, namespaced pod lists with label
//! and field selectors, a Secret, `pods/portforward` as a websocket) is in
//! [`portforward`]. NetworkFaults (`netfault.io/v1alpha1`): see [`networkfaults`].
//!
//! Anything else gets 404 and is recorded in [`ApiServer::requests`].
//! The test drives it: [`ApiServer::add_pod`], [`ApiServer::set_annotations`],
//! [`ApiServer::delete_pod`], [`ApiServer::expire_watches`],
//! [`ApiServer::drop_watches`] (connections cut mid-stream, no final chunk).
//! [`ApiServer::kubeconfig`] is a kubeconfig file pointing at it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Context, Result};
use crate::tmp::TempDir;

mod networkfaults;
pub mod portforward;
pub use portforward::Forward;
pub mod workloads;

/// Which collection a history event (and a watch) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collection {
    Pods,
    NetworkFaults,
    DaemonSets,
}

impl Collection {
    fn kind(self) -> &'static str {
        match self {
            Collection::Pods => "Pod",
            Collection::NetworkFaults => "NetworkFault",
            Collection::DaemonSets => "DaemonSet",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Collection::Pods => "v1",
            Collection::NetworkFaults => "netfault.io/v1alpha1",
            Collection::DaemonSets => "apps/v1",
        }
    }

    /// The collection a watchable path lists, and the namespace a
    /// namespaced path implies.
    fn of_path(path: &str) -> Option<(Collection, Option<&str>)> {
        if path == "/api/v1/pods" {
            return Some((Collection::Pods, None));
        }
        if path == networkfaults::COLLECTION {
            return Some((Collection::NetworkFaults, None));
        }
        let ns = path
            .strip_prefix("/apis/apps/v1/namespaces/")?
            .strip_suffix("/daemonsets")?;
        (!ns.contains('/')).then_some((Collection::DaemonSets, Some(ns)))
    }
}

/// What a module's `serve` did with a request.
enum Served {
    /// Not one of its paths.
    No,
    /// Answered; the connection may carry another request.
    Answered(std::io::Result<()>),
    /// The connection was taken over (upgraded) and is finished.
    Finished,
}

/// A `<Kind>List` of `items` at resourceVersion `rv`.
fn list_response(collection: Collection, rv: u64, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": collection.api_version(),
        "kind": format!("{}List", collection.kind()),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

/// Time between two bookmarks on an idle watch.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct St {
    rv: u64,
    /// By uid.
    pods: BTreeMap<String, Value>,
    /// Every event: (resourceVersion, collection, type, object).
    history: Vec<(u64, Collection, &'static str, Value)>,
    /// NetworkFaults and their status patches.
    nf: networkfaults::NfState,
    /// A watch from a resourceVersion below this one gets `410 Gone`.
    compacted: u64,
    /// Bumped by `expire_watches`: open watches end with `410 Gone`.
    gone_gen: u64,
    /// Bumped by `drop_watches`: open watches are cut.
    drop_gen: u64,
    events: Vec<Value>,
    requests: Vec<String>,
    lists: u64,
    watches: u64,
    /// Every connection, to cut them (drop_watches, Drop).
    conns: Vec<(bool, TcpStream)>,
    pf: portforward::State,
    /// (namespace, name) -> DaemonSet (see `workloads`).
    daemonsets: BTreeMap<(String, String), Value>,
    /// Path prefixes whose new requests get 403 ([`ApiServer::forbid`]).
    forbidden: Vec<String>,
}

struct Shared {
    st: Mutex<St>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The scripted API server; dropping it closes every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    accept: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiServer {
    pub fn start() -> Result<ApiServer> {
        let dir = TempDir::new("netfault-apiserver")?;
        let listener = TcpListener::bind("127.0.0.1:0").ctx(|| "binding 127.0.0.1:0".into())?;
        let addr = listener
            .local_addr()
            .ctx(|| "the listener's address".into())?;
        let kubeconfig = dir.path().join("kubeconfig");
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "scripted", "cluster": {"server": format!("http://{addr}")}}],
            "users": [{"name": "anonymous", "user": {}}],
            "contexts": [{"name": "scripted", "context": {"cluster": "scripted", "user": "anonymous", "namespace": "default"}}],
            "current-context": "scripted",
        });
        std::fs::write(&kubeconfig, cfg.to_string())
            .ctx(|| format!("writing {}", kubeconfig.display()))?;
        let shared = Arc::new(Shared {
            st: Mutex::new(St {
                rv: 1000,
                ..St::default()
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let sh = sh.clone();
                    let _ = std::thread::Builder::new()
                        .name("apiserver-conn".into())
                        .spawn(move || serve_conn(&sh, conn));
                }
            })
            .ctx(|| "starting the apiserver thread".into())?;
        Ok(ApiServer {
            shared,
            addr,
            kubeconfig,
            accept: Some(accept),
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig whose current context is this server, without auth.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn change(&self, f: impl FnOnce(&mut St, u64)) {
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        f(&mut st, rv);
        drop(st);
        self.shared.cv.notify_all();
    }

    /// Creates a running pod on `node` (an `ADDED` event).
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        annotations: &BTreeMap<String, String>,
    ) {
        self.add_pod_with_labels(namespace, name, uid, node, &BTreeMap::new(), annotations);
    }

    /// [`ApiServer::add_pod`] with labels (NetworkFault selection reads them).
    pub fn add_pod_with_labels(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) {
        self.change(|st, rv| {
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                    "resourceVersion": rv.to_string(),
                    "labels": labels,
                    "annotations": annotations,
                },
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "main", "image": "docker.io/library/busybox:latest"}],
                },
                "status": {"phase": "Running"},
            });
            st.pods.insert(uid.to_string(), pod.clone());
            st.history.push((rv, Collection::Pods, "ADDED", pod));
        });
    }

    /// Replaces a pod's annotations (a `MODIFIED` event). Unknown uids: no-op.
    pub fn set_annotations(&self, uid: &str, annotations: &BTreeMap<String, String>) {
        self.change(|st, rv| {
            let Some(pod) = st.pods.get_mut(uid) else {
                return;
            };
            pod["metadata"]["annotations"] = json!(annotations);
            pod["metadata"]["resourceVersion"] = json!(rv.to_string());
            let pod = pod.clone();
            st.history.push((rv, Collection::Pods, "MODIFIED", pod));
        });
    }

    /// Removes a pod (a `DELETED` event).
    pub fn delete_pod(&self, uid: &str) {
        self.change(|st, rv| {
            if let Some(mut pod) = st.pods.remove(uid) {
                pod["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.history.push((rv, Collection::Pods, "DELETED", pod));
            }
        });
    }

    /// Compacts the history: every open watch ends with `410 Gone`, and so
    /// does any watch from a resourceVersion before now. Clients re-list.
    pub fn expire_watches(&self) {
        self.change(|st, rv| {
            st.compacted = rv;
            st.gone_gen += 1;
        });
    }

    /// Cuts every open watch connection mid-stream (no final chunk).
    pub fn drop_watches(&self) {
        let mut st = self.shared.lock();
        st.drop_gen += 1;
        for (watch, c) in &st.conns {
            if *watch {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        drop(st);
        self.shared.cv.notify_all();
    }

    /// The Events POSTed or PATCHed so far (request bodies).
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Requests it answered 404 (method and target).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Panics, listing them, if any request went unscripted (got 404).
    pub fn assert_all_scripted(&self) {
        let unscripted = self.requests();
        assert!(unscripted.is_empty(), "unscripted requests: {unscripted:?}");
    }

    /// How many lists and watches were served.
    pub fn lists(&self) -> u64 {
        self.shared.lock().lists
    }

    pub fn watches(&self) -> u64 {
        self.shared.lock().watches
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let st = self.shared.lock();
            for (_, c) in &st.conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.shared.cv.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut len = 0usize;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

/// Percent-decoding (and `+` as a space) of a query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(w: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

fn chunk(w: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut s = line.to_string();
    s.push('\n');
    write!(w, "{:x}\r\n{s}\r\n", s.len())?;
    w.flush()
}

/// Whether `pod` passes a `fieldSelector` (only `spec.nodeName=` is understood).
fn selected(pod: &Value, query: &BTreeMap<String, String>) -> bool {
    let Some(sel) = query.get("fieldSelector") else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some(("spec.nodeName", node)) => pod["spec"]["nodeName"] == node,
        Some(("metadata.name", name)) => pod["metadata"]["name"] == name,
        Some(("metadata.namespace", ns)) => pod["metadata"]["namespace"] == ns,
        _ => true,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// `watch=true` (or `1`) in a query.
pub(super) fn is_watch(query: &BTreeMap<String, String>) -> bool {
    query.get("watch").is_some_and(|v| v == "true" || v == "1")
}

fn serve_conn(sh: &Shared, conn: TcpStream) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let Ok(registered) = conn.try_clone() else {
        return;
    };
    let idx = {
        let mut st = sh.lock();
        st.conns.push((false, registered));
        st.conns.len() - 1
    };
    let mut reader = BufReader::new(read_half);
    let mut w = conn;
    'requests: while let Some(req) = read_request(&mut reader) {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let forbidden = sh
            .lock()
            .forbidden
            .iter()
            .any(|p| req.path.starts_with(p.as_str()));
        if forbidden {
            let msg = format!("forbidden: {} {}", req.method, req.path);
            if respond(&mut w, "403 Forbidden", &status(403, "Forbidden", &msg)).is_err() {
                return;
            }
            continue;
        }
        let watched =
            Collection::of_path(&req.path).filter(|_| req.method == "GET" && is_watch(&req.query));
        if let Some((collection, ns)) = watched {
            let mut query = req.query.clone();
            if let Some(ns) = ns {
                let terms = query
                    .get("fieldSelector")
                    .map(|f| format!("{f},"))
                    .unwrap_or_default();
                query.insert(
                    "fieldSelector".into(),
                    format!("{terms}metadata.namespace={ns}"),
                );
            }
            if let Some(c) = sh.lock().conns.get_mut(idx) {
                c.0 = true;
            }
            // A watch ends its connection (Connection: close).
            let _ = watch(sh, &mut w, &query, collection);
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
        for serve in [workloads::serve, portforward::serve] {
            match serve(sh, &mut reader, &mut w, &req) {
                Served::No => {}
                Served::Answered(Ok(())) => continue 'requests,
                Served::Answered(Err(_)) | Served::Finished => return,
            }
        }
        let r = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/pods") => {
                let mut st = sh.lock();
                st.lists += 1;
                let items: Vec<Value> = st
                    .pods
                    .values()
                    .filter(|p| selected(p, &req.query))
                    .cloned()
                    .collect();
                let list = list_response(Collection::Pods, st.rv, items);
                drop(st);
                respond(&mut w, "200 OK", &list)
            }
            (_, p) if p.starts_with(networkfaults::PREFIX) => {
                networkfaults::serve(sh, &mut w, &req)
            }
            ("POST" | "PATCH" | "PUT", p)
                if p.starts_with("/apis/events.k8s.io/v1/namespaces/") && p.contains("/events") =>
            {
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                sh.lock().events.push(body.clone());
                let code = if req.method == "POST" {
                    "201 Created"
                } else {
                    "200 OK"
                };
                respond(&mut w, code, &body)
            }
            _ => {
                sh.lock()
                    .requests
                    .push(format!("{} {}", req.method, req.path));
                respond(
                    &mut w,
                    "404 Not Found",
                    &status(404, "NotFound", "not scripted"),
                )
            }
        };
        if r.is_err() {
            return;
        }
    }
}

fn watch(
    sh: &Shared,
    w: &mut TcpStream,
    query: &BTreeMap<String, String>,
    collection: Collection,
) -> std::io::Result<()> {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut st = sh.lock();
    st.watches += 1;
    let (gone_gen, drop_gen) = (st.gone_gen, st.drop_gen);
    if from < st.compacted {
        let rv = st.rv;
        drop(st);
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({rv})"),
        );
        chunk(w, &json!({"type": "ERROR", "object": gone}))?;
        return write!(w, "0\r\n\r\n");
    }
    let mut pos = from;
    loop {
        if sh.stop.load(Ordering::SeqCst) || st.drop_gen != drop_gen {
            // Cut: no final chunk.
            return Ok(());
        }
        if st.gone_gen != gone_gen {
            let rv = st.rv;
            drop(st);
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {pos} ({rv})"),
            );
            chunk(w, &json!({"type": "ERROR", "object": gone}))?;
            return write!(w, "0\r\n\r\n");
        }
        let due: Vec<Value> = st
            .history
            .iter()
            .filter(|(rv, c, _, obj)| *rv > pos && *c == collection && selected(obj, query))
            .map(|(_, _, ty, obj)| json!({"type": ty, "object": obj}))
            .collect();
        pos = st.rv.max(pos);
        let idle = due.is_empty();
        drop(st);
        for ev in &due {
            chunk(w, ev)?;
        }
        st = sh.lock();
        if idle || st.rv == pos {
            let (g, timeout) = sh
                .cv
                .wait_timeout(st, BOOKMARK_EVERY)
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            if timeout.timed_out() && bookmarks && st.rv == pos {
                let rv = st.rv;
                drop(st);
                chunk(
                    w,
                    &json!({"type": "BOOKMARK", "object": {
                        "kind": collection.kind(), "apiVersion": collection.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()},
                    }}),
                )?;
                st = sh.lock();
            }
        }
    }
}
