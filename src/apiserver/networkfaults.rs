//! NetworkFaults (`netfault.io/v1alpha1`) on the scripted API server, on
//! the wire as a real server serves a CRD with a status subresource:
//!
//! - `GET /apis/netfault.io/v1alpha1/networkfaults`: a list over all
//!   namespaces (`?watch=true`: the watch stream, served by the parent's
//!   `watch` for [`Collection::NetworkFaults`]);
//! - `GET .../namespaces/NS/networkfaults[/NAME]`: a namespace's list, one object;
//! - `PATCH .../namespaces/NS/networkfaults/NAME/status` with
//!   `application/apply-patch+yaml` (a JSON body, as kube sends it) and a
//!   `fieldManager`: server-side apply as the API server does it for
//!   `status.nodes`, a list map keyed by `node`: each manager owns the
//!   entries it applied, an apply replaces that manager's entries (one
//!   without entries removes them), and `selectedPods` is kept while some
//!   manager applies it. Every patch is recorded
//!   ([`ApiServer::status_patches`]), and the merged status is stored, bumps
//!   the resourceVersion (not the generation) and is watched as `MODIFIED`.
//!
//! The test drives the objects: [`ApiServer::create_networkfault`],
//! [`ApiServer::update_networkfault`] (bumps `metadata.generation`),
//! [`ApiServer::delete_networkfault`], [`ApiServer::networkfault`].

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde_json::{json, Value};

use super::{list_response, respond, status, ApiServer, Collection, Request, Shared};

/// The cluster-wide collection.
pub(super) const COLLECTION: &str = "/apis/netfault.io/v1alpha1/networkfaults";
/// Every path of the group.
pub(super) const PREFIX: &str = "/apis/netfault.io/v1alpha1/";

/// What the server keeps of NetworkFaults.
#[derive(Debug, Default)]
pub(super) struct NfState {
    /// By uid, with the merged status.
    objects: BTreeMap<String, Value>,
    /// By uid, then field manager: the status fields that manager applied
    /// (`nodes` entries, `selectedPods`).
    owned: BTreeMap<String, BTreeMap<String, Owned>>,
    /// Every status patch: (fieldManager, body).
    patches: Vec<(String, Value)>,
}

#[derive(Debug, Default, Clone)]
struct Owned {
    nodes: Vec<Value>,
    selected: Option<Value>,
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

impl ApiServer {
    /// Creates a NetworkFault (generation 1, created now): its uid.
    pub fn create_networkfault(&self, namespace: &str, name: &str, spec: Value) -> String {
        let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{:08x}-4e46-4000-8000-{:012x}", std::process::id(), n);
        let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let u = uid.clone();
        self.change(move |st, rv| {
            let obj = json!({
                "apiVersion": "netfault.io/v1alpha1",
                "kind": "NetworkFault",
                "metadata": {
                    "name": name, "namespace": namespace, "uid": u,
                    "generation": 1, "resourceVersion": rv.to_string(),
                    "creationTimestamp": created,
                },
                "spec": spec,
            });
            st.nf.objects.insert(u.clone(), obj.clone());
            st.history
                .push((rv, Collection::NetworkFaults, "ADDED", obj));
        });
        uid
    }

    /// Replaces a NetworkFault's spec: the generation goes up by one; the
    /// status stays. Unknown uids: no-op.
    pub fn update_networkfault(&self, uid: &str, spec: Value) {
        self.change(|st, rv| {
            let Some(obj) = st.nf.objects.get_mut(uid) else {
                return;
            };
            let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            obj["spec"] = spec;
            obj["metadata"]["generation"] = json!(generation);
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let obj = obj.clone();
            st.history
                .push((rv, Collection::NetworkFaults, "MODIFIED", obj));
        });
    }

    /// Deletes a NetworkFault (a `DELETED` event).
    pub fn delete_networkfault(&self, uid: &str) {
        self.change(|st, rv| {
            st.nf.owned.remove(uid);
            if let Some(mut obj) = st.nf.objects.remove(uid) {
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.history
                    .push((rv, Collection::NetworkFaults, "DELETED", obj));
            }
        });
    }

    /// The stored NetworkFault, with the status merged from every manager.
    pub fn networkfault(&self, uid: &str) -> Option<Value> {
        self.shared.lock().nf.objects.get(uid).cloned()
    }

    /// Every status patch received: (fieldManager, body).
    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.shared.lock().nf.patches.clone()
    }
}

/// Serves a request under [`PREFIX`] (but not a watch).
pub(super) fn serve(sh: &Shared, w: &mut TcpStream, req: &Request) -> std::io::Result<()> {
    let rest = &req.path[PREFIX.len()..];
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["networkfaults"]) => list(sh, w, None),
        ("GET", ["namespaces", ns, "networkfaults"]) => list(sh, w, Some(ns)),
        ("GET", ["namespaces", ns, "networkfaults", name]) => {
            let found = find(&sh.lock().nf, ns, name).map(|(_, o)| o.clone());
            match found {
                Some(o) => respond(w, "200 OK", &o),
                None => not_found(w, ns, name),
            }
        }
        ("PATCH", ["namespaces", ns, "networkfaults", name, "status"]) => {
            apply_status(sh, w, req, ns, name)
        }
        _ => {
            sh.lock()
                .requests
                .push(format!("{} {}", req.method, req.path));
            respond(w, "404 Not Found", &status(404, "NotFound", "not scripted"))
        }
    }
}

fn find<'a>(st: &'a NfState, ns: &str, name: &str) -> Option<(&'a String, &'a Value)> {
    st.objects
        .iter()
        .find(|(_, o)| o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name)
}

fn not_found(w: &mut TcpStream, ns: &str, name: &str) -> std::io::Result<()> {
    respond(
        w,
        "404 Not Found",
        &status(
            404,
            "NotFound",
            &format!("networkfaults.netfault.io \"{name}\" not found in {ns}"),
        ),
    )
}

fn list(sh: &Shared, w: &mut TcpStream, ns: Option<&str>) -> std::io::Result<()> {
    let mut st = sh.lock();
    st.lists += 1;
    let items: Vec<Value> = st
        .nf
        .objects
        .values()
        .filter(|o| ns.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        .cloned()
        .collect();
    let list = list_response(Collection::NetworkFaults, st.rv, items);
    drop(st);
    respond(w, "200 OK", &list)
}

fn unprocessable(w: &mut TcpStream, message: &str) -> std::io::Result<()> {
    respond(
        w,
        "422 Unprocessable Entity",
        &status(422, "Invalid", message),
    )
}

/// Server-side apply of a status patch, merged per manager.
fn apply_status(
    sh: &Shared,
    w: &mut TcpStream,
    req: &Request,
    ns: &str,
    name: &str,
) -> std::io::Result<()> {
    let content_type = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map_or("", |(_, v)| v.as_str());
    if !content_type.starts_with("application/apply-patch+yaml") {
        return respond(
            w,
            "415 Unsupported Media Type",
            &status(
                415,
                "UnsupportedMediaType",
                &format!("only server-side apply is scripted, not {content_type}"),
            ),
        );
    }
    let Some(manager) = req.query.get("fieldManager").cloned() else {
        return unprocessable(w, "fieldManager is required for apply patch");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return unprocessable(w, "the apply body is not JSON");
    };
    if body["metadata"]["name"] != name {
        return unprocessable(w, "metadata.name does not match the URL");
    }
    let nodes: Vec<Value> = match &body["status"]["nodes"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        _ => return unprocessable(w, "status.nodes must be a list"),
    };
    if nodes.iter().any(|n| !n["node"].is_string()) {
        return unprocessable(w, "status.nodes[]: the key field node is required");
    }
    let selected = body["status"].get("selectedPods").cloned();
    let mut st = sh.lock();
    st.nf.patches.push((manager.clone(), body.clone()));
    let Some(uid) = find(&st.nf, ns, name).map(|(u, _)| u.clone()) else {
        drop(st);
        return not_found(w, ns, name);
    };
    st.rv += 1;
    let rv = st.rv;
    let owners = st.nf.owned.entry(uid.clone()).or_default();
    // Another manager's entry for the same node: taken over (forced apply).
    let keys: Vec<Value> = nodes.iter().map(|n| n["node"].clone()).collect();
    for (m, o) in owners.iter_mut() {
        if *m != manager {
            o.nodes.retain(|n| !keys.contains(&n["node"]));
        }
    }
    owners.insert(manager, Owned { nodes, selected });
    let mut merged: Vec<Value> = owners.values().flat_map(|o| o.nodes.clone()).collect();
    merged.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    // Equal values from several managers are shared (the agents agree);
    // if they differ, the manager that sorts last is shown.
    let selected = owners
        .values()
        .filter_map(|o| o.selected.clone())
        .next_back();
    let mut status = serde_json::Map::new();
    if let Some(s) = selected {
        status.insert("selectedPods".into(), s);
    }
    if !merged.is_empty() {
        status.insert("nodes".into(), Value::Array(merged));
    }
    let Some(obj) = st.nf.objects.get_mut(&uid) else {
        drop(st);
        return not_found(w, ns, name);
    };
    if status.is_empty() {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    } else {
        obj["status"] = Value::Object(status);
    }
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let obj = obj.clone();
    st.history
        .push((rv, Collection::NetworkFaults, "MODIFIED", obj.clone()));
    drop(st);
    sh.cv.notify_all();
    respond(w, "200 OK", &obj)
}
