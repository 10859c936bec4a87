//! NetworkFault faults in the registry: what one resource asks of this
//! node, applied as `resource` faults that record their owner (the
//! resource's uid and generation).
//!
//! What it owns: the per-resource record (`State::resources`, persisted):
//! the generation, when its duration started (`anchor_ms`), when it ends
//! (`end_ms`), and which sandboxes already got this generation's fault.
//! The rules mirror the annotation digest:
//! - a new generation (the spec was edited) replaces the resource's faults
//!   and starts a new duration;
//! - the same generation seen again (a re-list, an agent restart) changes
//!   nothing: no duration restarts, and a sandbox that already got its
//!   fault (since expired, or deleted through the API) does not get it again;
//! - nothing is applied past `end_ms`; a pod selected later gets only the
//!   remainder;
//! - a pod no longer selected loses its fault; a removed resource loses all.
//!
//! What it must not do: choose pods (the `kube::networkfault` reconciler
//! does, with `netfault_k8s::select`), talk to Kubernetes, or touch faults
//! of other sources or other resources.

use std::collections::BTreeSet;
use std::time::Duration;

use netfault_api::{FaultSource, FaultSpec, PodRef};

use super::state::{self, FaultId, ResourceOwner, ResourceRecord, SandboxId};
use super::{same_pod, AgentError, Core, Registry};

/// What a NetworkFault asks of this node: its fault on each of `pods` (the
/// selected pods scheduled here).
#[derive(Debug, Clone)]
pub struct ResourceFaults {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// `metadata.creationTimestamp` in wall-clock ms: where generation 1's
    /// duration starts, the same instant on every node.
    pub created_ms: Option<u64>,
    /// The validated fault, with the resource's full duration, no target.
    pub spec: FaultSpec,
    pub pods: Vec<PodRef>,
}

/// One selected pod's fault after [`Registry::apply_resource_faults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    /// Its fault acts.
    Active { fault_id: String },
    /// Its fault ran and ended (the id, while the fault is still listed), or
    /// the resource's duration was over before the pod could get one.
    Expired { fault_id: Option<String> },
    /// Installing the fault failed.
    Failed { error: String },
    /// No sandbox is enrolled for the pod yet.
    Pending,
}

/// What [`Registry::apply_resource_faults`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceOutcome {
    /// In the order of [`ResourceFaults::pods`].
    pub pods: Vec<(PodRef, PodOutcome)>,
    /// Fault ids removed (an older generation, pods no longer selected).
    pub removed: Vec<String>,
    /// Fault ids installed.
    pub installed: Vec<String>,
    /// When this generation's faults end (wall-clock ms).
    pub end_ms: u64,
}

impl Registry {
    /// Brings the resource's faults on this node in line with `want` (see
    /// the module's rules). Faults of other sources are untouched.
    pub fn apply_resource_faults(
        &self,
        want: ResourceFaults,
    ) -> Result<ResourceOutcome, AgentError> {
        self.change(move |c| c.apply_resource_faults(want))
    }

    /// Removes every fault of the resource `uid` and forgets it (the
    /// resource was deleted). Returns the fault ids removed.
    pub fn remove_resource_faults(&self, uid: &str) -> Result<Vec<String>, AgentError> {
        let uid = uid.to_string();
        self.change(move |c| c.remove_resource(&uid))
    }

    /// The uids of the resources the registry holds records of.
    pub fn resource_uids(&self) -> Vec<String> {
        self.shared.lock().resources.keys().cloned().collect()
    }
}

impl Core<'_> {
    fn apply_resource_faults(
        &mut self,
        want: ResourceFaults,
    ) -> Result<ResourceOutcome, AgentError> {
        let now = state::now_ms();
        let duration_ms = want.spec.duration.as_millis() as u64;
        let owner = ResourceOwner {
            uid: want.uid.clone(),
            generation: want.generation,
        };
        // The record for this generation: kept if it is the same one.
        let (record, mut changed) = {
            let mut st = self.lock();
            match st.resources.get(&want.uid) {
                Some(r) if r.generation == want.generation => (r.clone(), false),
                _ => {
                    // Generation 1 starts at the resource's creation, the same
                    // instant for every node; a later generation at the time
                    // this agent first saw it (persisted: a restart keeps it).
                    let anchor = match want.created_ms {
                        Some(c) if want.generation <= 1 => c.min(now),
                        _ => now,
                    };
                    let r = ResourceRecord {
                        uid: want.uid.clone(),
                        namespace: want.namespace.clone(),
                        name: want.name.clone(),
                        generation: want.generation,
                        anchor_ms: anchor,
                        end_ms: anchor.saturating_add(duration_ms),
                        applied: BTreeSet::new(),
                    };
                    st.resources.insert(want.uid.clone(), r.clone());
                    (r, true)
                }
            }
        };
        // Which sandbox serves each wanted pod (the latest enrolled).
        let sandboxes: Vec<Option<SandboxId>> = {
            let st = self.lock();
            want.pods
                .iter()
                .map(|pod| {
                    st.sandboxes
                        .values()
                        .filter(|s| s.pod.as_ref().is_some_and(|p| same_pod(p, pod)))
                        .max_by_key(|s| s.enrolled_at_ms)
                        .map(|s| s.id.clone())
                })
                .collect()
        };
        let wanted: BTreeSet<&SandboxId> = sandboxes.iter().flatten().collect();
        // Faults of the resource to remove: an older generation, or on a
        // sandbox no longer selected.
        let stale: Vec<FaultId> = {
            let st = self.lock();
            st.faults
                .values()
                .filter(|f| {
                    f.owner.as_ref().is_some_and(|o| {
                        o.uid == want.uid
                            && (o.generation != want.generation || !wanted.contains(&f.sandbox))
                    })
                })
                .map(|f| f.id.clone())
                .collect()
        };
        let mut removed = Vec::new();
        for id in &stale {
            self.delete_fault(id)?;
            removed.push(id.to_string());
        }
        {
            // A sandbox no longer selected may get the fault again if it is
            // selected again.
            let mut st = self.lock();
            if let Some(r) = st.resources.get_mut(&want.uid) {
                let before = r.applied.len();
                r.applied.retain(|sb| wanted.contains(sb));
                changed |= before != r.applied.len();
            }
        }
        let mut pods = Vec::with_capacity(want.pods.len());
        let mut installed = Vec::new();
        for (pod, sandbox) in want.pods.iter().zip(&sandboxes) {
            let Some(sandbox) = sandbox else {
                pods.push((pod.clone(), PodOutcome::Pending));
                continue;
            };
            let (existing, applied) = {
                let st = self.lock();
                let existing = st
                    .faults_of(sandbox)
                    .find(|f| f.owner.as_ref() == Some(&owner))
                    .map(|f| (f.id.to_string(), f.is_live(netfault_ebpf::boottime_ns())));
                let applied = st
                    .resources
                    .get(&want.uid)
                    .is_some_and(|r| r.applied.contains(sandbox));
                (existing, applied)
            };
            let outcome = match existing {
                Some((id, true)) => PodOutcome::Active { fault_id: id },
                Some((id, false)) => PodOutcome::Expired { fault_id: Some(id) },
                None if applied || now >= record.end_ms => PodOutcome::Expired { fault_id: None },
                None => {
                    let mut spec = want.spec.clone();
                    spec.target = None;
                    // Only what is left of the resource's duration.
                    spec.duration = Duration::from_millis(record.end_ms - now);
                    match self.install_owned(
                        sandbox,
                        spec,
                        FaultSource::Resource,
                        Some(owner.clone()),
                    ) {
                        Ok(f) => {
                            if let Some(r) = self.lock().resources.get_mut(&want.uid) {
                                r.applied.insert(sandbox.clone());
                            }
                            changed = true;
                            installed.push(f.id.clone());
                            PodOutcome::Active { fault_id: f.id }
                        }
                        Err(e) => {
                            tracing::error!(resource = %want.name, pod = %pod.name, error = %e, "NetworkFault fault failed");
                            PodOutcome::Failed {
                                error: e.to_string(),
                            }
                        }
                    }
                }
            };
            pods.push((pod.clone(), outcome));
        }
        if changed {
            self.sh.persist()?;
        }
        Ok(ResourceOutcome {
            pods,
            removed,
            installed,
            end_ms: record.end_ms,
        })
    }

    fn remove_resource(&mut self, uid: &str) -> Result<Vec<String>, AgentError> {
        let owned: Vec<FaultId> = self
            .lock()
            .faults
            .values()
            .filter(|f| f.owner.as_ref().is_some_and(|o| o.uid == uid))
            .map(|f| f.id.clone())
            .collect();
        for id in &owned {
            self.delete_fault(id)?;
        }
        let known = self.lock().resources.remove(uid).is_some();
        if known {
            self.sh.persist()?;
        }
        Ok(owned.iter().map(ToString::to_string).collect())
    }
}
