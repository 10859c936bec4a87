//! netfault-k8s: the Kubernetes side of netfault that needs no cluster to test.
//!
//! - [`NetworkFault`]: the `netfault.io/v1alpha1` custom resource (kube's
//!   `CustomResource` derive) and the CRD generated from it ([`crd_yaml`],
//!   committed as `daemonset/networkfault-crd.yaml`);
//! - [`validate`]: a resource's spec checked with netfault-api's own fault
//!   parser, every error naming its field under `spec.`;
//! - [`select`]: the pods a resource applies to, chosen the same way on every
//!   node with no controller (a stable hash of the resource's and the pod's uid);
//! - [`status`]: each node's entry in `status.nodes`, written with server-side
//!   apply under the field manager `netfaultd/<node>`.
//!
//! The reconciler in the agent (watch, apply, remove, Events) builds on these.

pub mod resource;
pub mod select;
pub mod selector;
pub mod status;
pub mod validate;

pub use resource::{
    crd_yaml, FaultMatch, NetworkFault, NetworkFaultSpec, NetworkFaultStatus, NodeState,
    NodeStatus, PodFault, CRD_NAME, GROUP, KIND, PLURAL, REGENERATE, VERSION,
};
pub use select::{eligible, reporter_node, select, stable_hash, Mode, PodKey};
pub use selector::{LabelSet, Labels, Requirement, Selector};
pub use status::{field_manager, node_status_patch, patch_params, release_patch};
pub use validate::{fault_json, validate, validate_with, ValidSpec};
