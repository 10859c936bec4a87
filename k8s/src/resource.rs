//! The `NetworkFault` custom resource and its CRD.
//!
//! The Rust types are lenient on purpose: strings where the schema has an
//! enum, JSON values where the fault body varies by action type. A kube
//! watcher fails its whole list when one object does not deserialize, so an
//! object the API server accepted must always read back; [`crate::validate`]
//! then checks it with netfault-api's parser and names the field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use kube::CustomResourceExt;
use netfault_api::BackendKind;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group.
pub const GROUP: &str = "netfault.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The kind.
pub const KIND: &str = "NetworkFault";
/// The plural, as in `kubectl get networkfaults` and RBAC rules.
pub const PLURAL: &str = "networkfaults";
/// The CRD's `metadata.name`.
pub const CRD_NAME: &str = "networkfaults.netfault.io";

/// A network fault applied to the pods its selector matches, by every node
/// agent to the selected pods on its node (no central controller).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "netfault.io",
    version = "v1alpha1",
    kind = "NetworkFault",
    plural = "networkfaults",
    namespaced,
    status = "NetworkFaultStatus",
    shortname = "nf",
    category = "netfault",
    doc = "A network fault (netfault.io) applied by each node's netfaultd to the selected pods on that node",
    derive = "PartialEq",
    // Raw JSON columns: the structured form repeats `type_`, which clippy's
    // duplicated_attributes lint rejects.
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action.type", "description": "The fault's action type"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode", "description": "How many matching pods are affected"}"#,
    printcolumn = r#"{"name": "Value", "type": "string", "jsonPath": ".spec.value", "description": "N for mode fixed, the percentage for fixed-percent", "priority": 1}"#,
    printcolumn = r#"{"name": "Pods", "type": "integer", "jsonPath": ".status.selectedPods", "description": "Pods selected cluster-wide (the same count on every node)"}"#,
    printcolumn = r#"{"name": "Duration", "type": "string", "jsonPath": ".spec.duration", "description": "How long each fault lasts"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFaultSpec {
    /// What the fault does: the API's `action` object (`type` plus that type's
    /// fields, e.g. `{"type": "delay", "latency": "100ms"}`); see docs/design.md "Fault JSON".
    #[schemars(schema_with = "action_schema")]
    pub action: Value,
    /// Which packets: `cidr` (the peer), `protocol`, `ports`. Absent matches all.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub r#match: Option<FaultMatch>,
    /// `egress`, `ingress` or `both` (the default), seen from the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["egress", "ingress", "both"]))]
    pub direction: Option<String>,
    /// How long the fault lasts on each pod, e.g. `"5m"`; it ends at this
    /// kernel deadline even when the node's agent is down.
    pub duration: String,
    /// The pods, in this resource's namespace, the fault may apply to.
    pub selector: LabelSelector,
    /// How many of the matching pods: `all`, `one`, `fixed` (`value` pods) or
    /// `fixed-percent` (`value` percent, rounded up).
    #[schemars(extend("enum" = ["all", "one", "fixed", "fixed-percent"]))]
    pub mode: String,
    /// N (at least 1) for `fixed`; the percentage (1 to 100, `50` or `"50%"`)
    /// for `fixed-percent`; absent for the other modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string_schema")]
    pub value: Option<Value>,
}

/// The fault's `match`, as in the API.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FaultMatch {
    /// The peer's address or network, e.g. `198.18.0.0/24` or `fd00::/64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// `tcp`, `udp`, `icmp` or `any`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["tcp", "udp", "icmp", "any"]))]
    pub protocol: Option<String>,
    /// Source or destination ports: `80`, `"80,8000-8100"` or a list of either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_schema")]
    pub ports: Option<Value>,
}

/// What the node agents report. Each node writes only its own entry of
/// `nodes` (server-side apply, field manager `netfaultd/<node>`); the list is
/// a map keyed by `node`, so the API server merges the entries per node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFaultStatus {
    /// How many pods the selection chose, cluster-wide. Every node computes
    /// the same number from the same pods, so the nodes that write an entry
    /// share this field (equal values do not conflict in server-side apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i64>,
    /// One entry per node that has selected pods (or that reports the spec invalid).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
}

/// One node's part of the status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's name (the list's key).
    pub node: String,
    /// The state of the resource's faults on this node.
    pub state: NodeState,
    /// The selected pods on this node and the ids of their faults.
    #[serde(default)]
    pub pods: Vec<PodFault>,
    /// Why, when the state is `Failed` or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The resource's `metadata.generation` this entry reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A selected pod and its fault on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodFault {
    /// The pod's name (in the resource's namespace).
    pub name: String,
    /// The agent's fault id, when the fault was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_id: Option<String>,
    /// This pod's fault: `Applied` (active), `Expired`, `Failed` or
    /// `Pending` (its sandbox is not enrolled on the node yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
}

/// The state of a resource's faults on one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeState {
    /// Every selected pod on the node has its fault.
    Applied,
    /// At least one selected pod's fault could not be applied (`message`).
    Failed,
    /// The spec is invalid (`message` names the field); nothing is applied.
    Invalid,
    /// The faults reached their duration and ended.
    Expired,
    /// Selected pods on the node are not enrolled with the agent yet (their
    /// sandbox is starting); their faults follow when they are.
    Pending,
}

impl NodeState {
    /// The status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Applied => "Applied",
            NodeState::Failed => "Failed",
            NodeState::Invalid => "Invalid",
            NodeState::Expired => "Expired",
            NodeState::Pending => "Pending",
        }
    }
}

/// The action object: `type` is one of the API's action types; the other
/// fields depend on it, so they are kept (not pruned) and checked by
/// netfault-api's parser.
fn action_schema(_: &mut SchemaGenerator) -> Schema {
    let mut types: Vec<&str> = BackendKind::ALL
        .into_iter()
        .flat_map(BackendKind::action_types)
        .collect();
    types.sort_unstable();
    json_schema!({
        "description": "The API's action object: `type` and that type's fields (docs/design.md, \"Fault JSON\").",
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": types, "description": "The action type."}
        },
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn int_or_string_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "N (at least 1) for mode fixed; the percentage (1 to 100, 50 or \"50%\") for fixed-percent.",
        "x-kubernetes-int-or-string": true
    })
}

fn any_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Source or destination ports: 80, \"80,8000-8100\" or a list of either.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The CRD failed to serialize (a bug in the types, not an input error).
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("CRD to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("CRD to YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// The command that regenerates the committed CRD manifest.
pub const REGENERATE: &str =
    "cargo run -p netfault-k8s --bin netfault-crd > daemonset/networkfault-crd.yaml";

/// The CRD manifest, as committed in `daemonset/networkfault-crd.yaml`: a
/// header comment, then the CRD with every mapping's keys sorted (so the text
/// does not depend on serde_json's `preserve_order` feature).
pub fn crd_yaml() -> Result<String, CrdError> {
    let crd = serde_json::to_value(NetworkFault::crd())?;
    let body = serde_yaml::to_string(&sorted(crd))?;
    Ok(format!(
        "# The NetworkFault CRD (netfault.io/v1alpha1), generated from k8s/src/resource.rs.\n\
         # Do not edit: regenerate with\n#   {REGENERATE}\n{body}"
    ))
}

/// `v` as YAML with every mapping's keys in sorted order.
fn sorted(v: Value) -> serde_yaml::Value {
    match v {
        Value::Null => serde_yaml::Value::Null,
        Value::Bool(b) => serde_yaml::Value::Bool(b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                serde_yaml::Value::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                serde_yaml::Value::Number(u.into())
            } else {
                serde_yaml::Value::Number(n.as_f64().unwrap_or(f64::NAN).into())
            }
        }
        Value::String(s) => serde_yaml::Value::String(s),
        Value::Array(a) => serde_yaml::Value::Sequence(a.into_iter().map(sorted).collect()),
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = serde_yaml::Mapping::new();
            for (k, v) in entries {
                out.insert(serde_yaml::Value::String(k), sorted(v));
            }
            serde_yaml::Value::Mapping(out)
        }
    }
}
