//! The NetworkFault reconciler: every node agent applies each resource to
//! its own share of the selected pods, with no central controller.
//!
//! What it owns: two kube-rs watchers (both with `default_backoff`, so they
//! re-list on `410 Gone` and resume after disconnects): NetworkFaults in all
//! namespaces (the stored objects, status included, by uid), and every pod
//! of the cluster mapped at once into the compact [`PodCache`]. For each
//! resource it validates (`netfault_k8s::validate_with`), selects
//! (`netfault_k8s::select`, the same choice on every node), hands this
//! node's chosen pods to [`Registry::apply_resource_faults`], and writes
//! this node's entry of the resource's status with server-side apply, only
//! when the entry differs from the one the object already carries (so a
//! re-list, or the echo of its own write, writes nothing). An invalid spec
//! gets a Warning Event `InvalidNetworkFault` on the resource, and the
//! error in the status entry, from one node only (the reporter all nodes
//! agree on).
//! Nothing is decided before both lists are complete: a partial pod list
//! would choose other pods than the other nodes do.
//! What it must not do: touch the kernel or records (the registry does),
//! act on faults of other sources, or post Events on pods (the registry's
//! lifecycle notices are turned into pod Events elsewhere).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Patch;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use netfault_api::PodRef;
use netfault_k8s::{
    node_status_patch, patch_params, release_patch, stable_hash, validate_with, NetworkFault,
    NodeState, NodeStatus, PodFault, PodKey,
};
use serde_json::json;

use super::podcache::{PodCache, SlimPod};
use crate::registry::{PodOutcome, Registry, ResourceFaults};

/// How often dirty resources are reconciled (changes are batched: one pod
/// event can change the selection of every resource in its namespace).
const TICK: Duration = Duration::from_millis(100);

/// The reason of the Warning Event on an invalid resource.
pub const INVALID_REASON: &str = "InvalidNetworkFault";

/// What this node last did for a resource.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Selected pods here are not enrolled yet: retried every tick.
    pending: bool,
    /// Faults act until then (wall-clock ms): reconciled again after, so
    /// the status says `Expired`.
    active_until_ms: Option<u64>,
    /// The (generation, message) a Warning Event was posted for.
    warned: Option<(i64, String)>,
    /// A status write failed: tried again then (wall-clock ms).
    retry_status_at_ms: Option<u64>,
    /// A pod's fault failed to install: tried again then (wall-clock ms).
    retry_failed_at_ms: Option<u64>,
}

/// How long after a failed status write (or fault install) it is tried again.
const STATUS_RETRY_MS: u64 = 2_000;

pub struct Reconciler {
    node: String,
    client: Client,
    registry: Arc<Registry>,
    recorder: Recorder,
    pods: PodCache,
    pods_synced: bool,
    /// A pod list in progress (replaces the cache when complete).
    pod_listing: Option<Vec<PodKey>>,
    resources: HashMap<String, NetworkFault>,
    resources_synced: bool,
    nf_listing: Option<Vec<String>>,
    progress: HashMap<String, Progress>,
    dirty: BTreeSet<String>,
    dirty_namespaces: BTreeSet<String>,
    last_error: Option<String>,
    status_patches: u64,
}

impl Reconciler {
    pub fn new(
        client: Client,
        node: String,
        registry: Arc<Registry>,
        recorder: Recorder,
    ) -> Reconciler {
        Reconciler {
            node,
            client,
            registry,
            recorder,
            pods: PodCache::default(),
            pods_synced: false,
            pod_listing: None,
            resources: HashMap::new(),
            resources_synced: false,
            nf_listing: None,
            progress: HashMap::new(),
            dirty: BTreeSet::new(),
            dirty_namespaces: BTreeSet::new(),
            last_error: None,
            status_patches: 0,
        }
    }

    fn publish(&self) {
        self.registry.set_networkfault_status(json!({
            "watched": self.resources.len(),
            "cluster_pods_cached": self.pods.len(),
            "synced": self.pods_synced && self.resources_synced,
            "status_patches": self.status_patches,
            "last_error": self.last_error,
        }));
    }

    /// Runs until the process ends.
    pub async fn run(mut self) {
        self.publish();
        let nf_api: Api<NetworkFault> = Api::all(self.client.clone());
        let pod_api: Api<SlimPod> = Api::all(self.client.clone());
        let mut nfs = watcher::watcher(nf_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut pods = watcher::watcher(pod_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = nfs.next() => {
                    let Some(ev) = ev else { break };
                    self.on_resource(ev).await;
                }
                ev = pods.next() => {
                    let Some(ev) = ev else { break };
                    self.on_pod(ev);
                }
                _ = tick.tick() => {
                    self.reconcile_due().await;
                    self.publish();
                }
            }
        }
        tracing::error!("the NetworkFault watch ended");
    }

    fn on_pod(&mut self, ev: Result<Event<SlimPod>, watcher::Error>) {
        match ev {
            Ok(Event::Init) => self.pod_listing = Some(Vec::new()),
            Ok(Event::InitApply(p)) => {
                if let Some(k) = p.into_key() {
                    self.pod_listing.get_or_insert_with(Vec::new).push(k);
                }
            }
            Ok(Event::InitDone) => {
                let keys = self.pod_listing.take().unwrap_or_default();
                self.pods.replace(keys);
                self.pods_synced = true;
                // Any resource's selection may differ after a re-list.
                self.dirty.extend(self.resources.keys().cloned());
                tracing::info!(pods = self.pods.len(), "cluster pod list synced");
            }
            Ok(Event::Apply(p)) => {
                let Some(uid) = p.metadata.uid.clone() else {
                    return;
                };
                let changed = self.pods.update(&uid, p.into_key());
                self.dirty_namespaces.extend(changed);
            }
            Ok(Event::Delete(p)) => {
                if let Some(ns) = p.metadata.uid.as_deref().and_then(|u| self.pods.remove(u)) {
                    self.dirty_namespaces.insert(ns);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster pod watch failed; it resumes with backoff");
                self.last_error = Some(format!("pods: {e}"));
            }
        }
    }

    async fn on_resource(&mut self, ev: Result<Event<NetworkFault>, watcher::Error>) {
        match ev {
            Ok(Event::Init) => self.nf_listing = Some(Vec::new()),
            Ok(Event::InitApply(nf)) => {
                if let Some(uid) = nf.metadata.uid.clone() {
                    self.nf_listing.get_or_insert_with(Vec::new).push(uid);
                }
                self.store(nf);
            }
            Ok(Event::InitDone) => {
                let listed: BTreeSet<String> = self
                    .nf_listing
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                self.resources.retain(|uid, _| listed.contains(uid));
                // Resources deleted while the watch (or the agent) was away.
                let known = self.registry.clone();
                let gone: Vec<String> = tokio::task::spawn_blocking(move || known.resource_uids())
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|u| !listed.contains(u))
                    .collect();
                for uid in gone {
                    self.forget(&uid).await;
                }
                self.resources_synced = true;
                self.last_error = None;
                tracing::info!(
                    networkfaults = self.resources.len(),
                    "NetworkFault list synced"
                );
            }
            Ok(Event::Apply(nf)) => self.store(nf),
            Ok(Event::Delete(nf)) => {
                if let Some(uid) = nf.metadata.uid.clone() {
                    self.resources.remove(&uid);
                    self.forget(&uid).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "NetworkFault watch failed; it resumes with backoff");
                self.last_error = Some(format!("networkfaults: {e}"));
            }
        }
    }

    /// Keeps the stored object; a new generation (or a new resource) is
    /// reconciled. A status-only change (another node's, or the echo of our
    /// own write) just refreshes the copy.
    fn store(&mut self, nf: NetworkFault) {
        let Some(uid) = nf.metadata.uid.clone() else {
            return;
        };
        let same = self.resources.get(&uid).is_some_and(|old| {
            old.metadata.generation == nf.metadata.generation && old.spec == nf.spec
        });
        if !same {
            self.dirty.insert(uid.clone());
        }
        self.resources.insert(uid, nf);
    }

    /// The resource is gone: its faults on this node go too.
    async fn forget(&mut self, uid: &str) {
        self.progress.remove(uid);
        self.dirty.remove(uid);
        let registry = self.registry.clone();
        let u = uid.to_string();
        match tokio::task::spawn_blocking(move || registry.remove_resource_faults(&u)).await {
            Ok(Ok(removed)) => {
                if !removed.is_empty() {
                    tracing::info!(resource = %uid, removed = ?removed, "NetworkFault deleted: its faults are removed");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(resource = %uid, error = %e, "removing a NetworkFault's faults failed")
            }
            Err(e) => tracing::error!(error = %e, "NetworkFault removal task failed"),
        }
    }

    /// Reconciles the resources that changed, whose pods changed, that wait
    /// for a pod to be enrolled, or whose faults just ended.
    async fn reconcile_due(&mut self) {
        if !(self.pods_synced && self.resources_synced) {
            return;
        }
        let now = crate::registry::state::now_ms();
        let mut due = std::mem::take(&mut self.dirty);
        let namespaces = std::mem::take(&mut self.dirty_namespaces);
        for (uid, nf) in &self.resources {
            let p = self.progress.get(uid);
            if nf
                .metadata
                .namespace
                .as_ref()
                .is_some_and(|ns| namespaces.contains(ns))
                || p.is_some_and(|p| {
                    p.pending
                        || p.active_until_ms.is_some_and(|t| t <= now)
                        || p.retry_status_at_ms.is_some_and(|t| t <= now)
                        || p.retry_failed_at_ms.is_some_and(|t| t <= now)
                })
            {
                due.insert(uid.clone());
            }
        }
        for uid in due {
            self.reconcile(&uid).await;
        }
    }

    async fn reconcile(&mut self, uid: &str) {
        let Some(nf) = self.resources.get(uid).cloned() else {
            return;
        };
        let generation = nf.metadata.generation.unwrap_or(1);
        let name = nf.metadata.name.clone().unwrap_or_default();
        let valid = match validate_with(&nf, self.registry.max_duration()) {
            Ok(v) => v,
            Err(e) => {
                self.invalid(uid, &nf, generation, e.to_string()).await;
                return;
            }
        };
        let chosen = valid.select(uid, self.pods.candidates());
        let chosen_set: BTreeSet<&str> = chosen.iter().map(String::as_str).collect();
        let mine: Vec<PodRef> = self
            .pods
            .candidates()
            .iter()
            .filter(|p| p.node == self.node && chosen_set.contains(p.uid.as_str()))
            .map(|p| PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
            })
            .collect();
        let want = ResourceFaults {
            uid: uid.to_string(),
            namespace: valid.namespace.clone(),
            name: name.clone(),
            generation,
            created_ms: nf
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_millisecond()).ok()),
            spec: valid.fault.clone(),
            pods: mine,
        };
        let registry = self.registry.clone();
        let out = match tokio::task::spawn_blocking(move || registry.apply_resource_faults(want))
            .await
        {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                tracing::error!(resource = %name, error = %e, "reconciling a NetworkFault failed");
                self.progress.entry(uid.to_string()).or_default().pending = true;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "NetworkFault reconcile task failed");
                return;
            }
        };
        if !out.removed.is_empty() || !out.installed.is_empty() {
            tracing::info!(resource = %name, generation, removed = ?out.removed, installed = ?out.installed, "NetworkFault reconciled");
        }
        let mut pods = Vec::new();
        let (mut pending, mut active, mut failed, mut errors) = (false, false, false, Vec::new());
        for (pod, o) in &out.pods {
            let (fault_id, state) = match o {
                PodOutcome::Active { fault_id } => {
                    active = true;
                    (Some(fault_id.clone()), NodeState::Applied)
                }
                PodOutcome::Expired { fault_id } => (fault_id.clone(), NodeState::Expired),
                PodOutcome::Failed { error } => {
                    failed = true;
                    errors.push(format!("{}: {error}", pod.name));
                    (None, NodeState::Failed)
                }
                PodOutcome::Pending => {
                    pending = true;
                    (None, NodeState::Pending)
                }
            };
            pods.push(PodFault {
                name: pod.name.clone(),
                fault_id,
                state: Some(state),
            });
        }
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        let progress = self.progress.entry(uid.to_string()).or_default();
        progress.pending = pending;
        progress.active_until_ms = active.then_some(out.end_ms);
        // A failed install is retried, not on every tick.
        progress.retry_failed_at_ms =
            failed.then(|| crate::registry::state::now_ms() + STATUS_RETRY_MS);
        progress.warned = None;
        let entry = (!pods.is_empty()).then(|| NodeStatus {
            node: self.node.clone(),
            state: if failed {
                NodeState::Failed
            } else if pending {
                NodeState::Pending
            } else if active {
                NodeState::Applied
            } else {
                NodeState::Expired
            },
            pods,
            message: (!errors.is_empty()).then(|| errors.join("; ")),
            observed_generation: Some(generation),
        });
        self.write_status(uid, &nf, entry, chosen.len()).await;
    }

    /// An invalid spec: no new fault (the faults of an earlier generation,
    /// if any, are left as they are, as for an invalid annotation); the
    /// reporter node posts the Event and writes the error.
    async fn invalid(&mut self, uid: &str, nf: &NetworkFault, generation: i64, error: String) {
        let name = nf.metadata.name.clone().unwrap_or_default();
        let namespace = nf.metadata.namespace.clone().unwrap_or_default();
        let progress = self.progress.entry(uid.to_string()).or_default();
        progress.pending = false;
        progress.active_until_ms = None;
        if self.reporter(uid, &namespace) != self.node {
            self.write_status(uid, nf, None, 0).await;
            return;
        }
        let warned = Some((generation, error.clone()));
        let fresh = self.progress.get(uid).is_none_or(|p| p.warned != warned)
            && !self.has_entry(nf, |e| {
                e.state == NodeState::Invalid
                    && e.observed_generation == Some(generation)
                    && e.message.as_deref() == Some(error.as_str())
            });
        if fresh {
            tracing::warn!(resource = %format!("{namespace}/{name}"), error = %error, "invalid NetworkFault; nothing applied");
            self.event(nf, EventType::Warning, INVALID_REASON, error.clone());
        }
        if let Some(p) = self.progress.get_mut(uid) {
            p.warned = warned;
        }
        let entry = NodeStatus {
            node: self.node.clone(),
            state: NodeState::Invalid,
            pods: Vec::new(),
            message: Some(error),
            observed_generation: Some(generation),
        };
        self.write_status(uid, nf, Some(entry), 0).await;
    }

    /// The node that reports on an invalid resource: the node of the
    /// namespace's candidate with the lowest hash (`reporter_node`); in an
    /// empty namespace, the node (among those with cached pods, and this
    /// one) with the lowest hash of its name, so that someone reports.
    fn reporter(&self, uid: &str, namespace: &str) -> String {
        if let Some(n) = netfault_k8s::reporter_node(uid, namespace, self.pods.candidates()) {
            return n.to_string();
        }
        self.pods
            .candidates()
            .iter()
            .map(|p| p.node.as_str())
            .chain([self.node.as_str()])
            .min_by_key(|n| (stable_hash(uid, n), *n))
            .unwrap_or(&self.node)
            .to_string()
    }

    fn has_entry(&self, nf: &NetworkFault, f: impl Fn(&NodeStatus) -> bool) -> bool {
        nf.status
            .as_ref()
            .is_some_and(|s| s.nodes.iter().any(|e| e.node == self.node && f(e)))
    }

    /// Server-side applies this node's entry (`None`: releases it), unless
    /// the object already says exactly that.
    async fn write_status(
        &mut self,
        uid: &str,
        nf: &NetworkFault,
        entry: Option<NodeStatus>,
        selected: usize,
    ) {
        let current = nf
            .status
            .as_ref()
            .and_then(|s| s.nodes.iter().find(|e| e.node == self.node));
        let body = match &entry {
            Some(e) => {
                let same_selected =
                    nf.status.as_ref().and_then(|s| s.selected_pods) == Some(selected as i64);
                if current == Some(e) && same_selected {
                    return;
                }
                node_status_patch(nf, e, selected)
            }
            None => {
                if current.is_none() {
                    return;
                }
                release_patch(nf)
            }
        };
        let (Some(body), Some(namespace), Some(name)) = (
            body,
            nf.metadata.namespace.as_deref(),
            nf.metadata.name.as_deref(),
        ) else {
            return;
        };
        let api: Api<NetworkFault> = Api::namespaced(self.client.clone(), namespace);
        match api
            .patch_status(name, &patch_params(&self.node), &Patch::Apply(body))
            .await
        {
            Ok(updated) => {
                self.status_patches += 1;
                if let Some(p) = self.progress.get_mut(uid) {
                    p.retry_status_at_ms = None;
                }
                // Our copy now says what we wrote: a tick before the echo
                // arrives writes nothing again.
                if let Some(stored) = self.resources.get_mut(uid) {
                    stored.status = updated.status;
                }
            }
            Err(e) => {
                tracing::warn!(resource = %name, error = %e, "writing the NetworkFault's status failed; retried");
                self.last_error = Some(format!("status of {namespace}/{name}: {e}"));
                self.progress
                    .entry(uid.to_string())
                    .or_default()
                    .retry_status_at_ms = Some(crate::registry::state::now_ms() + STATUS_RETRY_MS);
            }
        }
    }

    /// Posts an Event on the NetworkFault in the background.
    fn event(&self, nf: &NetworkFault, type_: EventType, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some(format!("{}/{}", netfault_k8s::GROUP, netfault_k8s::VERSION)),
            kind: Some(netfault_k8s::KIND.into()),
            name: nf.metadata.name.clone(),
            namespace: nf.metadata.namespace.clone(),
            uid: nf.metadata.uid.clone(),
            ..Default::default()
        };
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            // The API server caps a note at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, reason = %ev.reason, "posting an Event failed");
            }
        });
    }
}
