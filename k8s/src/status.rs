//! Each node's entry in a NetworkFault's status, written with server-side
//! apply (SSA).
//!
//! Node `N`'s agent applies, to the `status` subresource, a patch holding
//! only its own entry of `status.nodes` and `status.selectedPods`, as field
//! manager `netfaultd/N` ([`field_manager`]) with `force` ([`patch_params`]).
//! `status.nodes` is a list map keyed by `node`, so the API server merges
//! the entries of different managers instead of replacing the list; each
//! manager owns its entry. `selectedPods` is the same number on every node,
//! so the managers share it. When a node no longer has selected pods it
//! applies [`release_patch`], which drops its entry (SSA removes the fields a
//! manager stops applying) and its share of `selectedPods`.
//!
//! RBAC: `patch` on `networkfaults/status` (the agent's ClusterRole has it).
//!
//! ```no_run
//! # async fn f(api: kube::Api<netfault_k8s::NetworkFault>, nf: netfault_k8s::NetworkFault, entry: netfault_k8s::NodeStatus) -> kube::Result<()> {
//! use kube::api::Patch;
//! let body = netfault_k8s::node_status_patch(&nf, &entry, 3).expect("a stored object");
//! let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
//! api.patch_status(&name, &netfault_k8s::patch_params(&entry.node), &Patch::Apply(body))
//!     .await?;
//! # Ok(()) }
//! ```

use kube::api::PatchParams;
use serde_json::{json, Value};

use crate::resource::{NetworkFault, NodeStatus, GROUP, KIND, VERSION};

/// The field manager of node `node`'s agent: `netfaultd/<node>`.
pub fn field_manager(node: &str) -> String {
    format!("netfaultd/{node}")
}

/// Server-side apply as `node`'s manager, forcing (a node's entry and the
/// shared `selectedPods` are its own to set).
pub fn patch_params(node: &str) -> PatchParams {
    PatchParams::apply(&field_manager(node)).force()
}

/// The resource's name and namespace, or `None` for an object that was
/// never stored (no name or namespace).
fn identity(nf: &NetworkFault) -> Option<(&str, &str)> {
    Some((
        nf.metadata.name.as_deref()?,
        nf.metadata.namespace.as_deref()?,
    ))
}

/// The SSA body that sets `entry` (this node's) and `selectedPods`.
pub fn node_status_patch(nf: &NetworkFault, entry: &NodeStatus, selected: usize) -> Option<Value> {
    let (name, namespace) = identity(nf)?;
    Some(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "status": {
            "selectedPods": selected,
            "nodes": [entry],
        }
    }))
}

/// The SSA body with which a node gives up its entry and its share of
/// `selectedPods`: an apply that sets nothing.
pub fn release_patch(nf: &NetworkFault) -> Option<Value> {
    let (name, namespace) = identity(nf)?;
    Some(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{NodeState, PodFault};
    use kube::CustomResourceExt;

    fn nf() -> NetworkFault {
        serde_json::from_value(json!({
            "apiVersion": "netfault.io/v1alpha1", "kind": "NetworkFault",
            "metadata": {"name": "slow-web", "namespace": "shop", "uid": "r-1", "generation": 4,
                "resourceVersion": "77"},
            "spec": {"action": {"type": "blackhole"}, "duration": "1m",
                "selector": {}, "mode": "all"}
        }))
        .expect("a NetworkFault")
    }

    #[test]
    fn the_patch_holds_only_this_nodes_entry() {
        let entry = NodeStatus {
            node: "node-a".into(),
            state: NodeState::Applied,
            pods: vec![PodFault {
                name: "web-1".into(),
                fault_id: Some("f-12".into()),
                state: None,
            }],
            message: None,
            observed_generation: Some(4),
        };
        let body = node_status_patch(&nf(), &entry, 3).expect("stored object");
        assert_eq!(
            body,
            json!({
                "apiVersion": "netfault.io/v1alpha1", "kind": "NetworkFault",
                "metadata": {"name": "slow-web", "namespace": "shop"},
                "status": {"selectedPods": 3, "nodes": [{
                    "node": "node-a", "state": "Applied",
                    "pods": [{"name": "web-1", "faultId": "f-12"}],
                    "observedGeneration": 4
                }]}
            })
        );
        // No resourceVersion: an apply must not be refused for a stale one.
        assert!(body["metadata"].get("resourceVersion").is_none());
        let failed = NodeStatus {
            state: NodeState::Failed,
            message: Some("web-2: sandbox not found".into()),
            pods: vec![],
            ..entry
        };
        let body = node_status_patch(&nf(), &failed, 0).expect("stored object");
        assert_eq!(body["status"]["nodes"][0]["state"], "Failed");
        assert_eq!(
            body["status"]["nodes"][0]["message"],
            "web-2: sandbox not found"
        );
        assert_eq!(
            release_patch(&nf()).expect("stored")["metadata"],
            json!({"name": "slow-web", "namespace": "shop"})
        );
        let mut unsaved = nf();
        unsaved.metadata.namespace = None;
        assert!(node_status_patch(&unsaved, &failed, 0).is_none());
    }

    #[test]
    fn the_manager_is_per_node_and_forces() {
        assert_eq!(field_manager("node-a"), "netfaultd/node-a");
        let p = patch_params("node-a");
        assert_eq!(p.field_manager.as_deref(), Some("netfaultd/node-a"));
        assert!(p.force);
    }

    /// The schema lets SSA merge per node: `nodes` is a list map keyed by
    /// the required `node`.
    #[test]
    fn the_status_schema_merges_per_node() {
        let crd = serde_json::to_value(NetworkFault::crd()).expect("serializes");
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"];
        let nodes = &status["nodes"];
        assert_eq!(nodes["x-kubernetes-list-type"], "map");
        assert_eq!(nodes["x-kubernetes-list-map-keys"], json!(["node"]));
        let required = nodes["items"]["required"].as_array().expect("required");
        assert!(required.contains(&json!("node")), "{required:?}");
        assert_eq!(status["selectedPods"]["type"], "integer");
        assert_eq!(
            nodes["items"]["properties"]["state"]["enum"],
            json!(["Applied", "Failed", "Invalid", "Expired", "Pending"])
        );
    }

    /// A status the agent wrote reads back (the watcher must never fail on it).
    #[test]
    fn the_status_round_trips() {
        let mut n = nf();
        n.status = Some(crate::resource::NetworkFaultStatus {
            selected_pods: Some(2),
            nodes: vec![NodeStatus {
                node: "node-b".into(),
                state: NodeState::Expired,
                pods: vec![],
                message: None,
                observed_generation: Some(4),
            }],
        });
        let v = serde_json::to_value(&n).expect("serializes");
        let back: NetworkFault = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, n);
    }
}
