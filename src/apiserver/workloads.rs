//! The scripted API server's DaemonSets, and RBAC taken away: what an agent
//! uses to tell an uninstall from a restart (`agent/src/kube/uninstall.rs`).
//!
//! - `GET /apis/apps/v1/namespaces/NS/daemonsets/NAME`: the DaemonSet the
//!   test set ([`ApiServer::set_daemonset`]), or a `404` `Status`;
//! - `GET /apis/apps/v1/namespaces/NS/daemonsets?fieldSelector=metadata.name=N`:
//!   a `DaemonSetList`; with `watch=true` the server's shared watch streams
//!   its `ADDED`/`MODIFIED`/`DELETED` events;
//! - [`ApiServer::forbid`]: new requests under a path prefix get `403`, as
//!   after `kubectl delete -k` removed the agent's Role; watches already
//!   open keep streaming, as a real server's do (authorization is checked
//!   when a request starts).
//!
//! Agent pods owned by a DaemonSet: [`ApiServer::add_owned_agent_pod`].

use std::io::BufReader;
use std::net::TcpStream;

use serde_json::{json, Value};

use super::portforward::agent_pod;
use super::{
    list_response, respond, selected, status, ApiServer, Collection, Request, Served, Shared,
};

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
            let ty = if st.daemonsets.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.daemonsets.insert(key, ds.clone());
            st.history.push((rv, Collection::DaemonSets, ty, ds));
        });
    }

    /// Deletes DaemonSet `namespace/name` (a `DELETED` event; later GETs are 404).
    pub fn delete_daemonset(&self, namespace: &str, name: &str) {
        self.change(|st, rv| {
            let key = (namespace.to_string(), name.to_string());
            if let Some(mut ds) = st.daemonsets.remove(&key) {
                ds["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.history.push((rv, Collection::DaemonSets, "DELETED", ds));
            }
        });
    }

    /// New requests whose path starts with `prefix` get `403 Forbidden`.
    pub fn forbid(&self, prefix: &str) {
        self.shared.lock().forbidden.push(prefix.to_string());
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

/// Serves a DaemonSet GET or list (a watch is the server's shared one).
pub(super) fn serve(
    sh: &Shared,
    _reader: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    req: &Request,
) -> Served {
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
                .daemonsets
                .get(&(ns.to_string(), name.to_string()))
                .cloned();
            let not_found = || {
                let msg = format!("daemonsets.apps \"{name}\" not found");
                status(404, "NotFound", &msg)
            };
            Served::Answered(match ds {
                Some(ds) => respond(w, "200 OK", &ds),
                None => respond(w, "404 Not Found", &not_found()),
            })
        }
        [ns, "daemonsets"] => {
            let mut st = sh.lock();
            st.lists += 1;
            let items: Vec<Value> = st
                .daemonsets
                .values()
                .filter(|d| d["metadata"]["namespace"] == ns && selected(d, &req.query))
                .cloned()
                .collect();
            let list = list_response(Collection::DaemonSets, st.rv, items);
            drop(st);
            Served::Answered(respond(w, "200 OK", &list))
        }
        _ => Served::No,
    }
}
