//! JSON bodies of the agent's socket API (requests and responses).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default agent socket, also read from `NETFAULT_SOCKET` by the CLI.
pub const DEFAULT_SOCKET: &str = "/run/netfault/netfaultd.sock";
/// Default agent state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/netfault";

/// Where the CNI plugin records enrolments the agent could not take (agent
/// down, `failurePolicy: ignore`): `<socket dir>/pending/<sandbox id>.json`,
/// each an [`EnrolRequest`]. The agent adopts them when it is back.
pub fn pending_dir(socket: &std::path::Path) -> std::path::PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| std::path::Path::new("/"))
        .join("pending")
}

/// The CNI plugin entry's `failurePolicy`: what the plugin does when the
/// agent cannot be reached. The plugin reads it from its config; install-cni
/// writes it into the conflist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Log and carry on: a pod never fails to start because chaos tooling is down.
    #[default]
    Ignore,
    /// Fail the CNI operation.
    Fail,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "ignore",
            FailurePolicy::Fail => "fail",
        }
    }
}

impl std::str::FromStr for FailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ignore" => Ok(FailurePolicy::Ignore),
            "fail" => Ok(FailurePolicy::Fail),
            other => Err(format!(
                "unknown failure policy {other:?}; expected ignore or fail"
            )),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// `PUT /v1/sandboxes/{id}` body, sent by the CNI plugin at ADD.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub netns: String,
    #[serde(default = "default_ifname")]
    pub ifname: String,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn default_ifname() -> String {
    "eth0".to_string()
}

/// How a sandbox came to be enrolled (`source` in `GET /v1/sandboxes` and
/// in the state file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrolSource {
    /// `PUT /v1/sandboxes/{id}`: the CNI plugin at ADD (or any API client).
    #[default]
    Cni,
    /// A pending-enrolment file the CNI plugin left while the agent was down.
    Pending,
    /// Adopted from the container runtime over CRI (`--cri-socket`).
    Cri,
    /// Enrolled implicitly by a fault's `{"netns": path}` target.
    Netns,
}

impl EnrolSource {
    /// Whether the sandbox's netns may have existed before this agent, so
    /// that an earlier agent whose records are lost may have left objects
    /// in it: a runtime's sandbox adopted over CRI, or a netns targeted by
    /// path. A CNI ADD's netns (also one recorded as pending) is new.
    pub fn may_predate_agent(self) -> bool {
        matches!(self, EnrolSource::Cri | EnrolSource::Netns)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EnrolSource::Cni => "cni",
            EnrolSource::Pending => "pending",
            EnrolSource::Cri => "cri",
            EnrolSource::Netns => "netns",
        }
    }
}

/// Where a fault came from (`source` in `GET /v1/faults` and in the state
/// file; records written before this field read as `api`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultSource {
    /// `POST /v1/faults`.
    #[default]
    Api,
    /// The pod's `netfault.io/*` annotations (at CNI ADD, adoption, or on a
    /// running pod through the Kubernetes watch).
    Annotation,
    /// A `NetworkFault` resource.
    Resource,
}

impl FaultSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultSource::Api => "api",
            FaultSource::Annotation => "annotation",
            FaultSource::Resource => "resource",
        }
    }
}

/// A sandbox as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub netns: String,
    pub ifname: String,
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub enrolled_at_ms: u64,
    /// Ids of faults created from annotations at enrolment.
    #[serde(default)]
    pub birth_faults: Vec<String>,
    /// Why the annotations were rejected, if they were (the pod is untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation_error: Option<String>,
    /// How it was enrolled (agents before this field: absent, read as `cni`).
    #[serde(default)]
    pub source: EnrolSource,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets that matched the fault's selector while it was active.
    pub matched: u64,
    /// Packets the fault dropped.
    pub dropped: u64,
    /// Packets the fault changed without dropping them (delayed, duplicated,
    /// corrupted, reordered).
    #[serde(default)]
    pub affected: u64,
}

/// A fault as the agent reports it: the canonical spec plus its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub id: String,
    /// The sandbox the target resolved to.
    pub sandbox: String,
    /// `active` or `expired`.
    pub state: String,
    /// Canonical spec (target, direction, match, action, duration).
    pub spec: Value,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Which datapath enforces it (`ebpf-tc`).
    pub backend: String,
    pub counters: Counters,
    /// Where it came from (agents before this field: absent, read as `api`).
    #[serde(default)]
    pub source: FaultSource,
}
