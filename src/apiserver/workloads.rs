//! The scripted API server's DaemonSets: what an agent reads on SIGTERM to
//! tell an uninstall from a restart (`agent/src/kube/uninstall.rs`).
//!
//! - `GET /apis/apps/v1/namespaces/NS/daemonsets/NAME`: the DaemonSet the
//!   test set ([`ApiServer::set_daemonset`]), or a `404` `Status`.
//!
//! Agent pods owned by one: [`ApiServer::add_owned_agent_pod`].

use std::io::BufReader;
use std::net::TcpStream;

use serde_json::{json, Value};

use super::portforward::agent_pod;
use super::{respond, status, ApiServer, Request, Shared};

impl ApiServer {
    /// Creates or replaces DaemonSet `namespace/name` with `uid`; `deleting`
    /// sets a `deletionTimestamp` (a foreground deletion in progress).
    pub fn set_daemonset(&self, namespace: &str, name: &str, uid: &str, deleting: bool) {
        let mut meta = json!({"name": name, "namespace": namespace, "uid": uid});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            meta["finalizers"] = json!(["foregroundDeletion"]);
        }
        let ds = json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "netfault"}},
                "template": {"metadata": {}, "spec": {"containers": []}},
            },
        });
        self.shared
            .lock()
            .daemonsets
            .insert((namespace.into(), name.into()), ds);
    }

    /// Deletes DaemonSet `namespace/name` (later GETs are 404).
    pub fn delete_daemonset(&self, namespace: &str, name: &str) {
        self.shared
            .lock()
            .daemonsets
            .remove(&(namespace.to_string(), name.to_string()));
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

/// Serves a DaemonSet GET; `None` for any other request.
pub(super) fn serve(
    sh: &Shared,
    _reader: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    req: &Request,
) -> Option<std::io::Result<()>> {
    if req.method != "GET" {
        return None;
    }
    let rest = req.path.strip_prefix("/apis/apps/v1/namespaces/")?;
    let [ns, "daemonsets", name] = rest.split('/').collect::<Vec<_>>()[..] else {
        return None;
    };
    let ds: Option<Value> = sh
        .lock()
        .daemonsets
        .get(&(ns.to_string(), name.to_string()))
        .cloned();
    Some(match ds {
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
