//! The scripted API server's side of `netfaultctl --kube`: what a client
//! outside the cluster uses to find a pod's node, the agent pod on it and
//! the API token, and the `pods/portforward` websocket that reaches the
//! agent's loopback TCP listener.
//!
//! - `GET /api/v1/namespaces/NS/pods/NAME`: the pod, or a `404` `Status`;
//! - `GET /api/v1/namespaces/NS/pods?labelSelector=..&fieldSelector=..`: a
//!   `PodList` of the namespace's pods that match (label terms `k=v`, `k==v`,
//!   `k!=v`, `k`, `!k`; fields `metadata.name`, `metadata.namespace`,
//!   `spec.nodeName`, `status.phase`; anything else is a `400`, as a real
//!   server answers);
//! - `GET /api/v1/namespaces/NS/secrets/NAME`: a Secret the test set
//!   ([`ApiServer::set_secret`]), or `404`;
//! - `GET /api/v1/namespaces/NS/pods/NAME/portforward?ports=P`: a websocket
//!   upgrade speaking the kubelet's `v4.channel.k8s.io` port-forward
//!   protocol, the one kube-rs's `Api::portforward` uses: port `i` has data
//!   channel `2i` and error channel `2i+1`; every binary message starts with
//!   its channel byte; the server's first message on each channel is the
//!   port number (2 bytes, little endian). Data is forwarded to the address
//!   the test scripted for that pod and port ([`ApiServer::forward_port`]);
//!   with none, or when connecting fails, the error channel carries the
//!   reason, as the kubelet's does, and the connection closes. When the far
//!   end closes, the server sends a websocket Close.
//!
//! Every port-forward request is recorded ([`ApiServer::forwards`]) so a
//! test can assert which pod and port were reached. It must not be used for
//! anything but tests: no auth, no TLS, one thread per connection.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha1::{Digest, Sha1};

use super::{
    is_watch, list_response, respond, status, ApiServer, Collection, Request, Served, Shared, St,
};

/// The subprotocol the kubelet serves port-forwards with (and kube-rs offers
/// after `v5.channel.k8s.io`, which port-forward does not support).
pub const PROTOCOL: &str = "v4.channel.k8s.io";

/// RFC 6455's GUID for `Sec-WebSocket-Accept`.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The labels the DaemonSet gives its agent pods.
pub const AGENT_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "netfault"),
    ("app.kubernetes.io/component", "agent"),
];

/// State of this module inside the server's [`St`].
#[derive(Default)]
pub(super) struct State {
    /// (namespace, name) -> Secret object.
    secrets: BTreeMap<(String, String), Value>,
    /// (namespace, pod, port) -> where its port-forward goes.
    targets: BTreeMap<(String, String, u16), SocketAddr>,
    forwards: Vec<Forward>,
}

/// One port-forward request, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub namespace: String,
    pub pod: String,
    pub ports: Vec<u16>,
    /// Whether it was upgraded to a websocket (the pod exists and the
    /// request was well formed).
    pub upgraded: bool,
}

impl ApiServer {
    /// Adds any pod object (an `ADDED` event). `metadata.uid` defaults to
    /// `NS/NAME`; `metadata.resourceVersion` is set.
    pub fn put_pod(&self, mut pod: Value) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let uid = match pod["metadata"]["uid"].as_str() {
            Some(u) => u.to_string(),
            None => format!("{ns}/{name}"),
        };
        pod["metadata"]["uid"] = json!(uid);
        self.change(|st, rv| {
            pod["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.pods.insert(uid, pod.clone());
            st.history.push((rv, Collection::Pods, "ADDED", pod));
        });
    }

    /// A running, ready agent pod as the DaemonSet makes it: labels
    /// [`AGENT_LABELS`], `hostNetwork`, on `node`.
    pub fn add_agent_pod(&self, namespace: &str, name: &str, node: &str) {
        self.put_pod(agent_pod(namespace, name, node, "Running", true));
    }

    /// Sets a Secret's `data` (values are raw bytes; they are base64-encoded
    /// on the wire, as a real server does).
    pub fn set_secret(&self, namespace: &str, name: &str, data: &[(&str, &[u8])]) {
        let data: BTreeMap<&str, String> = data
            .iter()
            .map(|(k, v)| (*k, base64::engine::general_purpose::STANDARD.encode(v)))
            .collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("secret-{namespace}-{name}")},
            "data": data,
        });
        self.shared
            .lock()
            .pf
            .secrets
            .insert((namespace.into(), name.into()), secret);
    }

    /// Removes a Secret (later GETs are 404).
    pub fn remove_secret(&self, namespace: &str, name: &str) {
        self.shared
            .lock()
            .pf
            .secrets
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// Port-forwards to `port` of pod `namespace/pod` reach `to`.
    pub fn forward_port(&self, namespace: &str, pod: &str, port: u16, to: SocketAddr) {
        self.shared
            .lock()
            .pf
            .targets
            .insert((namespace.into(), pod.into(), port), to);
    }

    /// Every port-forward request so far.
    pub fn forwards(&self) -> Vec<Forward> {
        self.shared.lock().pf.forwards.clone()
    }
}

/// A DaemonSet agent pod object (see [`ApiServer::add_agent_pod`]); `phase`
/// and `ready` make it a pod that is not ready, for tests of that case.
pub fn agent_pod(namespace: &str, name: &str, node: &str, phase: &str, ready: bool) -> Value {
    let labels: BTreeMap<&str, &str> = AGENT_LABELS.into_iter().collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "containers": [{"name": "netfaultd", "image": "docker.io/library/netfaultd:dev"}],
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// Serves the paths this module owns (see the module doc).
pub(super) fn serve(
    sh: &Shared,
    reader: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    req: &Request,
) -> Served {
    if req.method != "GET" {
        return Served::No;
    }
    let Some(rest) = req.path.strip_prefix("/api/v1/namespaces/") else {
        return Served::No;
    };
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        [ns, "pods"] if !is_watch(&req.query) => Served::Answered(list_pods(sh, w, ns, &req.query)),
        [ns, "pods", name] => {
            let pod = find_pod(&sh.lock(), ns, name);
            Served::Answered(match pod {
                Some(p) => respond(w, "200 OK", &p),
                None => not_found(w, "pods", name),
            })
        }
        [ns, "secrets", name] => {
            let secret = sh
                .lock()
                .pf
                .secrets
                .get(&(ns.to_string(), name.to_string()))
                .cloned();
            Served::Answered(match secret {
                Some(s) => respond(w, "200 OK", &s),
                None => not_found(w, "secrets", name),
            })
        }
        [ns, "pods", name, "portforward"] => match portforward(sh, reader, w, req, ns, name) {
            Ok(true) => Served::Finished,
            Ok(false) => Served::Answered(Ok(())),
            Err(e) => Served::Answered(Err(e)),
        },
        _ => Served::No,
    }
}

fn not_found(w: &mut TcpStream, kind: &str, name: &str) -> std::io::Result<()> {
    respond(
        w,
        "404 Not Found",
        &status(404, "NotFound", &format!("{kind} \"{name}\" not found")),
    )
}

fn bad_request(w: &mut TcpStream, message: &str) -> std::io::Result<()> {
    respond(w, "400 Bad Request", &status(400, "BadRequest", message))
}

fn find_pod(st: &St, ns: &str, name: &str) -> Option<Value> {
    st.pods
        .values()
        .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
        .cloned()
}

fn list_pods(
    sh: &Shared,
    w: &mut TcpStream,
    ns: &str,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let labels = match query.get("labelSelector").map(|s| label_selector(s)) {
        Some(Err(e)) => return bad_request(w, &e),
        Some(Ok(l)) => l,
        None => Vec::new(),
    };
    let fields = match query.get("fieldSelector").map(|s| field_selector(s)) {
        Some(Err(e)) => return bad_request(w, &e),
        Some(Ok(f)) => f,
        None => Vec::new(),
    };
    let mut st = sh.lock();
    st.lists += 1;
    let items: Vec<Value> = st
        .pods
        .values()
        .filter(|p| p["metadata"]["namespace"] == ns)
        .filter(|p| labels.iter().all(|t| t.matches(p)))
        .filter(|p| fields.iter().all(|t| t.matches(p)))
        .cloned()
        .collect();
    let list = list_response(Collection::Pods, st.rv, items);
    drop(st);
    respond(w, "200 OK", &list)
}

/// One term of a label or field selector.
enum Term {
    /// The value at `path` equals (`true`) or differs from (`false`) `value`.
    Eq(Vec<String>, String, bool),
    /// The label `key` exists (`true`) or not (`false`).
    Exists(String, bool),
}

impl Term {
    fn matches(&self, pod: &Value) -> bool {
        match self {
            Term::Eq(path, value, eq) => {
                let v = path.iter().fold(pod, |v, k| &v[k.as_str()]);
                (v.as_str().unwrap_or_default() == value) == *eq
            }
            Term::Exists(key, exists) => {
                pod["metadata"]["labels"].get(key.as_str()).is_some() == *exists
            }
        }
    }
}

/// Splits `k=v`, `k==v` or `k!=v`.
fn split_eq(term: &str) -> Option<(&str, &str, bool)> {
    if let Some((k, v)) = term.split_once("!=") {
        return Some((k.trim(), v.trim(), false));
    }
    let (k, v) = term.split_once('=')?;
    Some((k.trim(), v.strip_prefix('=').unwrap_or(v).trim(), true))
}

fn label_selector(sel: &str) -> Result<Vec<Term>, String> {
    let mut out = Vec::new();
    for term in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
            return Err(format!(
                "unable to parse requirement: set-based term {term:?} is not scripted"
            ));
        }
        let labels = |k: &str| vec!["metadata".into(), "labels".into(), k.to_string()];
        match split_eq(term) {
            Some((k, v, eq)) => out.push(Term::Eq(labels(k), v.to_string(), eq)),
            None => match term.strip_prefix('!') {
                Some(k) => out.push(Term::Exists(k.trim().to_string(), false)),
                None => out.push(Term::Exists(term.to_string(), true)),
            },
        }
    }
    Ok(out)
}

fn field_selector(sel: &str) -> Result<Vec<Term>, String> {
    let mut out = Vec::new();
    for term in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v, eq) =
            split_eq(term).ok_or_else(|| format!("invalid selector: {term:?}: no operator"))?;
        let path = match k {
            "metadata.name" | "metadata.namespace" | "spec.nodeName" | "status.phase" => {
                k.split('.').map(str::to_string).collect()
            }
            other => return Err(format!("field label not supported: {other}")),
        };
        out.push(Term::Eq(path, v.to_string(), eq));
    }
    Ok(out)
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455, section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The port-forward endpoint; `Ok(true)` when the connection was upgraded
/// (and is now finished).
fn portforward(
    sh: &Shared,
    reader: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    req: &Request,
    ns: &str,
    name: &str,
) -> std::io::Result<bool> {
    let ports: Result<Vec<u16>, _> = req
        .query
        .get("ports")
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or(p))
        .collect();
    let exists = find_pod(&sh.lock(), ns, name).is_some();
    let mut record = Forward {
        namespace: ns.to_string(),
        pod: name.to_string(),
        ports: ports.clone().unwrap_or_default(),
        upgraded: false,
    };
    let header = |n: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let key = header("sec-websocket-key");
    let offers_v4 = header("sec-websocket-protocol")
        .is_some_and(|p| p.split(',').any(|p| p.trim() == PROTOCOL));
    let is_ws = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let answer = if !exists {
        Some(not_found(w, "pods", name))
    } else {
        match (&ports, key, is_ws && offers_v4) {
            (Err(p), _, _) => Some(bad_request(w, &format!("invalid port {p:?}"))),
            (Ok(p), _, _) if p.is_empty() => {
                Some(bad_request(w, "at least one port must be specified"))
            }
            (_, None, _) | (_, _, false) => Some(bad_request(
                w,
                &format!("a websocket upgrade with subprotocol {PROTOCOL} is required"),
            )),
            _ => None,
        }
    };
    if let Some(r) = answer {
        sh.lock().pf.forwards.push(record);
        return r.map(|()| false);
    }
    let (Ok(ports), Some(key)) = (ports, key) else {
        return Ok(false);
    };
    record.upgraded = true;
    let targets: Vec<Option<SocketAddr>> = {
        let mut st = sh.lock();
        st.pf.forwards.push(record);
        ports
            .iter()
            .map(|p| st.pf.targets.get(&(ns.into(), name.into(), *p)).copied())
            .collect()
    };
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n",
        accept_key(key)
    )?;
    w.flush()?;
    let out = Arc::new(Mutex::new(w.try_clone()?));
    let send = |op: u8, payload: &[u8]| -> std::io::Result<()> {
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut w, op, payload)
    };
    // The port number first, on each port's data and error channel.
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        let ch = u8::try_from(2 * i).unwrap_or(u8::MAX - 1);
        send(OP_BINARY, &[ch, lo, hi])?;
        send(OP_BINARY, &[ch + 1, lo, hi])?;
    }
    // Connect each port; a failure goes on its error channel.
    let mut conns: Vec<Option<TcpStream>> = Vec::with_capacity(ports.len());
    for (i, (port, to)) in ports.iter().zip(&targets).enumerate() {
        let ch = u8::try_from(2 * i + 1).unwrap_or(u8::MAX);
        let conn = match to {
            None => Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            Some(a) => TcpStream::connect_timeout(a, Duration::from_secs(2)),
        };
        match conn {
            Ok(c) => conns.push(Some(c)),
            Err(e) => {
                let msg = format!(
                    "error forwarding port {port} to pod {ns}/{name}: failed to connect to localhost:{port} inside the pod's network namespace: {e}"
                );
                let mut m = vec![ch];
                m.extend_from_slice(msg.as_bytes());
                send(OP_BINARY, &m)?;
                conns.push(None);
            }
        }
    }
    // One pump per connected port: far end -> data channel. When every port
    // is done, a Close; the client answers it and the read loop below ends.
    let open = Arc::new(Mutex::new(conns.iter().filter(|c| c.is_some()).count()));
    if *open.lock().unwrap_or_else(|p| p.into_inner()) == 0 {
        let _ = send(OP_CLOSE, &1000u16.to_be_bytes());
        let _ = w.set_read_timeout(Some(Duration::from_secs(5)));
    }
    let mut pumps = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let Some(c) = c else { continue };
        let mut from = c.try_clone()?;
        let (out, open, ws) = (out.clone(), open.clone(), w.try_clone()?);
        let ch = u8::try_from(2 * i).unwrap_or(u8::MAX - 1);
        pumps.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            buf[0] = ch;
            loop {
                match from.read(&mut buf[1..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                        if write_frame(&mut w, OP_BINARY, &buf[..=n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let mut left = open.lock().unwrap_or_else(|p| p.into_inner());
            *left = left.saturating_sub(1);
            if *left == 0 {
                let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = write_frame(&mut w, OP_CLOSE, &1000u16.to_be_bytes());
                let _ = ws.set_read_timeout(Some(Duration::from_secs(5)));
            }
        }));
    }
    // Client -> far end, until Close, EOF or an error.
    let mut message: Vec<u8> = Vec::new();
    while let Ok((fin, op, payload)) = read_frame(reader) {
        match op {
            OP_CLOSE => {
                let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = write_frame(&mut w, OP_CLOSE, &payload[..payload.len().min(2)]);
                break;
            }
            OP_PING => {
                let _ = send(OP_PONG, &payload);
                continue;
            }
            OP_PONG => continue,
            _ => message.extend_from_slice(&payload),
        }
        if !fin {
            continue;
        }
        let m = std::mem::take(&mut message);
        let Some((&ch, data)) = m.split_first() else {
            continue;
        };
        // Only data channels carry bytes from the client.
        let idx = usize::from(ch / 2);
        if ch % 2 == 0 && !data.is_empty() {
            if let Some(Some(c)) = conns.get_mut(idx) {
                if c.write_all(data).is_err() {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
    }
    for c in conns.iter().flatten() {
        let _ = c.shutdown(Shutdown::Both);
    }
    let _ = w.shutdown(Shutdown::Both);
    for p in pumps {
        let _ = p.join();
    }
    Ok(true)
}

const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// One unmasked server frame with FIN set.
fn write_frame(w: &mut TcpStream, op: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => head.push(u8::try_from(n).unwrap_or(125)),
        n if n <= usize::from(u16::MAX) => {
            head.push(126);
            head.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_be_bytes());
        }
    }
    head.extend_from_slice(payload);
    w.write_all(&head)?;
    w.flush()
}

/// One client frame: FIN, opcode, unmasked payload (clients must mask).
fn read_frame(r: &mut BufReader<TcpStream>) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let fin = h[0] & 0x80 != 0;
    let op = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if !masked {
        return Err(std::io::Error::other("an unmasked client frame"));
    }
    if len > 16 << 20 {
        return Err(std::io::Error::other("a frame over 16 MiB"));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok((fin, op, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_is_rfc6455s_example() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn selectors_match_labels_and_fields() {
        let a = agent_pod("netfault", "agent-a", "node-1", "Running", true);
        let l =
            label_selector("app.kubernetes.io/name=netfault,app.kubernetes.io/component==agent")
                .expect("valid");
        assert!(l.iter().all(|t| t.matches(&a)));
        let l = label_selector("app.kubernetes.io/name!=netfault").expect("valid");
        assert!(!l.iter().all(|t| t.matches(&a)));
        let l = label_selector("!app.kubernetes.io/name").expect("valid");
        assert!(!l.iter().all(|t| t.matches(&a)));
        let f = field_selector("spec.nodeName=node-1,status.phase=Running").expect("valid");
        assert!(f.iter().all(|t| t.matches(&a)));
        let f = field_selector("spec.nodeName=node-2").expect("valid");
        assert!(!f.iter().all(|t| t.matches(&a)));
        assert!(field_selector("spec.hostNetwork=true").is_err());
        assert!(label_selector("tier in (a,b)").is_err());
    }
}
