//! The scripted API server's DaemonSets, and RBAC taken away: what an agent
//! uses to tell an uninstall from a restart (`agent/src/kube/uninstall.rs`).
//!
//! - `GET /apis/apps/v1/namespaces/NS/daemonsets/NAME`: the DaemonSet the
//!   test set ([`ApiServer::set_daemonset`]), or a `404` `Status`;
//! - `GET /apis/apps/v1/namespaces/NS/daemonsets?fieldSelector=metadata.name=N`:
//!   a `DaemonSetList` with a `resourceVersion`; with `watch=true`, a chunked
//!   stream of `ADDED`/`MODIFIED`/`DELETED` events after that version;
//! - [`ApiServer::forbid`]: new requests under a path prefix get `403`, as
//!   after `kubectl delete -k` removed the agent's Role; watches already
//!   open keep streaming, as a real server's do (authorization is checked
//!   when a request starts).
//!
//! Agent pods owned by a DaemonSet: [`ApiServer::add_owned_agent_pod`].

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use super::portforward::agent_pod;
use super::{chunk, is_watch, respond, status, ApiServer, Request, Shared};

/// What this module keeps inside the server's state.
#[derive(Default)]
pub(super) struct State {
    /// (namespace, name) -> DaemonSet.
    daemonsets: std::collections::BTreeMap<(String, String), Value>,
    /// Every DaemonSet event: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Path prefixes whose new requests get 403.
    forbidden: Vec<String>,
}

impl ApiServer {
    /// Creates or replaces DaemonSet `namespace/name` with `uid`; `deleting`
    /// sets a `deletionTimestamp` (a foreground deletion in progress).
    pub fn set_daemonset(&self, namespace: &str, name: &str, uid: &str, deleting: bool) {
        let mut meta = json!({"name": name, "namespace": namespace, "uid": uid});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            meta["finalizers"] = json!(["foregroundDeletion"]);
        }
        let mut ds = json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "netfault"}},
                "template": {"metadata": {}, "spec": {"containers": []}},
            },
        });
        self.change(|st, rv| {
            ds["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = (namespace.to_string(), name.to_string());
            let ty = if st.workloads.daemonsets.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.workloads.daemonsets.insert(key, ds.clone());
            st.workloads.history.push((rv, ty, ds));
        });
    }

    /// Deletes DaemonSet `namespace/name` (a `DELETED` event; later GETs are 404).
    pub fn delete_daemonset(&self, namespace: &str, name: &str) {
        self.change(|st, rv| {
            let key = (namespace.to_string(), name.to_string());
            if let Some(mut ds) = st.workloads.daemonsets.remove(&key) {
                ds["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.workloads.history.push((rv, "DELETED", ds));
            }
        });
    }

    /// New requests whose path starts with `prefix` get `403 Forbidden`.
    pub fn forbid(&self, prefix: &str) {
        self.shared
            .lock()
            .workloads
            .forbidden
            .push(prefix.to_string());
    }

    /// A running, ready agent pod owned by DaemonSet `daemonset` (`uid`).
    pub fn add_owned_agent_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        (daemonset, uid): (&str, &str),
    ) {
        let mut pod = agent_pod(namespace, name, node, "Running", true);
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": daemonset, "uid": uid,
            "controller": true, "blockOwnerDeletion": true,
        }]);
        self.put_pod(pod);
    }
}

/// What [`serve`] did.
pub(super) enum Served {
    No,
    Answered(std::io::Result<()>),
    /// A watch ran on the connection; it is finished.
    Streamed,
}

/// Serves a forbidden path's 403, and the DaemonSet paths.
pub(super) fn serve(
    sh: &Shared,
    _reader: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    req: &Request,
) -> Served {
    let forbidden = sh
        .lock()
        .workloads
        .forbidden
        .iter()
        .any(|p| req.path.starts_with(p.as_str()));
    if forbidden {
        return Served::Answered(respond(
            w,
            "403 Forbidden",
            &status(
                403,
                "Forbidden",
                &format!("forbidden: {} {}", req.method, req.path),
            ),
        ));
    }
    if req.method != "GET" {
        return Served::No;
    }
    let Some(rest) = req.path.strip_prefix("/apis/apps/v1/namespaces/") else {
        return Served::No;
    };
    match rest.split('/').collect::<Vec<_>>()[..] {
        [ns, "daemonsets", name] => {
            let ds = sh
                .lock()
                .workloads
                .daemonsets
                .get(&(ns.to_string(), name.to_string()))
                .cloned();
            Served::Answered(match ds {
                Some(ds) => respond(w, "200 OK", &ds),
                None => respond(
                    w,
                    "404 Not Found",
                    &status(
                        404,
                        "NotFound",
                        &format!("daemonsets.apps \"{name}\" not found"),
                    ),
                ),
            })
        }
        [ns, "daemonsets"] => {
            let name = req
                .query
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="))
                .map(str::to_string);
            let wanted = |ds: &Value| {
                ds["metadata"]["namespace"] == ns
                    && name.as_deref().is_none_or(|n| ds["metadata"]["name"] == n)
            };
            if is_watch(&req.query) {
                let from: u64 = req
                    .query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let _ = watch(sh, w, from, &wanted);
                let _ = w.shutdown(Shutdown::Both);
                return Served::Streamed;
            }
            let st = sh.lock();
            let items: Vec<Value> = st
                .workloads
                .daemonsets
                .values()
                .filter(|d| wanted(d))
                .cloned()
                .collect();
            let list = json!({
                "apiVersion": "apps/v1", "kind": "DaemonSetList",
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            });
            drop(st);
            Served::Answered(respond(w, "200 OK", &list))
        }
        _ => Served::No,
    }
}

/// A DaemonSet watch: the events after `from`, then each new one, until
/// the server stops or the connection breaks.
fn watch(
    sh: &Shared,
    w: &mut TcpStream,
    from: u64,
    wanted: &dyn Fn(&Value) -> bool,
) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut pos = from;
    let mut st = sh.lock();
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let due: Vec<Value> = st
            .workloads
            .history
            .iter()
            .filter(|(rv, _, obj)| *rv > pos && wanted(obj))
            .map(|(_, ty, obj)| json!({"type": ty, "object": obj}))
            .collect();
        pos = pos.max(st.rv);
        drop(st);
        for ev in &due {
            chunk(w, ev)?;
        }
        st = sh.lock();
        if st.rv == pos {
            let (g, _) = sh
                .cv
                .wait_timeout(st, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner());
            st = g;
        }
    }
}
