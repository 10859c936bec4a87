//! The agent's policy: what it refuses to do even when asked correctly
//! (docs/design.md, "Policy").
//!
//! What it owns: the caps (`--max-duration`, `--max-faults-per-pod`,
//! `--max-loss-percent`), the namespace deny list (`--deny-namespace`) and
//! the host network namespace rule, and the wording of every refusal: a
//! [`FieldError`] with code `policy_denied` (HTTP 403) whose field is the
//! JSON path of the offending value and whose message names the rule.
//! What it must not do: look anything up itself, or change anything. The
//! registry calls it from its one install path and its enrol paths, so no
//! source of faults (API, annotations, NetworkFault) goes around it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netfault_api::{Action, ErrorCode, FaultSpec, FieldError, PacketAction, Target};
use netfault_sys::netns::NetnsId;
use serde_json::{json, Value};

/// Namespaces denied unless `--deny-namespace` says otherwise.
pub const DEFAULT_DENY: [&str; 2] = ["kube-system", "netfault"];

/// The default of `--max-faults-per-pod`.
pub const DEFAULT_MAX_FAULTS_PER_POD: usize = 32;

/// Where the host's network namespace is read by default: pid 1's. In the
/// DaemonSet (`hostPID: false`, `hostNetwork: true`) that is the agent
/// pod's first process, whose netns is the node's.
pub const HOST_NETNS: &str = "/proc/1/ns/net";

/// The agent's own netns, refused as well: in the DaemonSet it is the
/// node's (hostNetwork), and where pid 1's cannot be opened (a sandbox
/// whose pid 1 belongs to another user namespace) it is what is left to
/// compare with. A fault there could also cut the agent off.
pub const OWN_NETNS: &str = "/proc/self/ns/net";

/// What the agent refuses. Built once at start from the flags.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_duration: Duration,
    pub max_faults_per_pod: usize,
    /// 0 to 100.
    pub max_loss_percent: f64,
    /// Pod namespaces that get no faults.
    pub deny_namespaces: BTreeSet<String>,
    /// The network namespaces that count as the host's, and where each was
    /// read: `--host-netns` (pid 1's by default) and the agent's own. One
    /// that cannot be read is left out (logged at start).
    pub host_netns: Vec<(PathBuf, NetnsId)>,
}

impl Default for Policy {
    /// The defaults of the flags (24h, 32, 100 %, `kube-system` and
    /// `netfault`), the host netns read from [`HOST_NETNS`].
    fn default() -> Self {
        Policy::new(
            Duration::from_secs(24 * 3600),
            DEFAULT_MAX_FAULTS_PER_POD,
            100.0,
            DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            Path::new(HOST_NETNS),
        )
    }
}

/// A refusal: code `policy_denied`, `field`, and a message that starts
/// with the rule.
fn denied(field: &str, rule: &str, why: &str) -> FieldError {
    FieldError::new(
        ErrorCode::PolicyDenied,
        field,
        &format!("refused by policy {rule}: {why}"),
    )
}

impl Policy {
    /// A policy with the host netns identified from `host_netns_path`.
    pub fn new(
        max_duration: Duration,
        max_faults_per_pod: usize,
        max_loss_percent: f64,
        deny_namespaces: BTreeSet<String>,
        host_netns_path: &Path,
    ) -> Policy {
        let mut host_netns = Vec::new();
        for path in [host_netns_path, Path::new(OWN_NETNS)] {
            match netfault_sys::netns::identify(path) {
                Ok(id) => host_netns.push((path.to_path_buf(), id)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot identify this network namespace: the host-netns rule compares with the others")
                }
            }
        }
        Policy {
            max_duration,
            max_faults_per_pod,
            max_loss_percent,
            deny_namespaces: deny_namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            host_netns,
        }
    }

    /// A network namespace may be enrolled or targeted: it is not the
    /// host's. `field` is where the request named it (`netns`,
    /// `target.netns`).
    pub fn check_netns(&self, id: NetnsId, field: &str) -> Result<(), FieldError> {
        if let Some((path, _)) = self.host_netns.iter().find(|(_, h)| *h == id) {
            return Err(denied(
                field,
                "host network namespace",
                &format!(
                    "this is the host's network namespace (that of {}); hostNetwork pods and the node itself never get faults",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// A fault may be installed on a sandbox whose pod is in `namespace`
    /// (`None`: not a pod), which has `live` faults already.
    pub fn check_fault(
        &self,
        spec: &FaultSpec,
        namespace: Option<&str>,
        live: usize,
    ) -> Result<(), FieldError> {
        if let Some(ns) = namespace.filter(|ns| self.deny_namespaces.contains(*ns)) {
            let field = match &spec.target {
                Some(Target::Pod { .. }) => "target.pod.namespace",
                _ => "target",
            };
            return Err(denied(
                field,
                &format!("--deny-namespace {ns}"),
                &format!("pods in namespace {ns:?} get no faults"),
            ));
        }
        if spec.duration > self.max_duration {
            return Err(denied(
                "duration",
                &format!(
                    "--max-duration {}",
                    humantime::format_duration(self.max_duration)
                ),
                &format!(
                    "duration {} is over the cap",
                    humantime::format_duration(spec.duration)
                ),
            ));
        }
        if let Some((field, percent)) = loss_percent(&spec.action) {
            if percent > self.max_loss_percent {
                return Err(denied(
                    field,
                    &format!("--max-loss-percent {}", self.max_loss_percent),
                    &format!("{field} {percent} is over the cap"),
                ));
            }
        }
        if live >= self.max_faults_per_pod {
            return Err(denied(
                "target",
                &format!("--max-faults-per-pod {}", self.max_faults_per_pod),
                &format!("the target already has {live} live faults"),
            ));
        }
        Ok(())
    }

    /// Annotation faults parsed against the policy: a duration over the cap
    /// is refused with the policy's wording (the parser's own check only
    /// says it is too long).
    pub fn annotation_faults<'a>(
        &self,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)> + Clone,
    ) -> Result<Vec<FaultSpec>, FieldError> {
        let parse = netfault_api::spec::faults_from_annotations;
        match parse(annotations.clone(), self.max_duration) {
            Ok(specs) => Ok(specs),
            Err(e) => match parse(annotations, Duration::MAX) {
                // Only the duration cap was wrong.
                Ok(specs) => Err(specs
                    .iter()
                    .find_map(|s| self.check_fault(s, None, 0).err())
                    .unwrap_or(e)),
                Err(_) => Err(e),
            },
        }
    }

    /// The `policy` section of `GET /v1/capabilities`.
    pub fn capabilities(&self) -> Value {
        json!({
            "max_duration": humantime::format_duration(self.max_duration).to_string(),
            "max_duration_ms": self.max_duration.as_millis() as u64,
            "max_faults_per_pod": self.max_faults_per_pod,
            "max_loss_percent": self.max_loss_percent,
            "loss_covers": ["loss.percent", "loss.model (its long-run loss)", "blackhole (100)"],
            "deny_namespaces": self.deny_namespaces,
            "host_netns": self.host_netns.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        })
    }
}

/// How much of the matching traffic an action drops on the wire, in
/// percent, and the field that says so: `loss` (its `percent`, or the
/// long-run loss of its Gilbert-Elliott model) and `blackhole` (100).
/// Other actions (corrupt, rate, L7 and DNS faults) are not loss.
fn loss_percent(action: &Action) -> Option<(&'static str, f64)> {
    match action {
        Action::Packet(PacketAction::Loss {
            percent,
            model: None,
            ..
        }) => Some(("action.percent", *percent)),
        Action::Packet(PacketAction::Loss { model: Some(m), .. }) => {
            // Stationary share of the bad state: p / (p + r).
            let bad = if m.p + m.r > 0.0 {
                m.p / (m.p + m.r)
            } else {
                0.0
            };
            let mean = bad * m.one_minus_h + (1.0 - bad) * m.one_minus_k;
            Some(("action.model", (mean * 100.0).round() / 100.0))
        }
        Action::Packet(PacketAction::Blackhole) => Some(("action.type", 100.0)),
        _ => None,
    }
}
