//! The Kubernetes pod watch: annotations on running pods.
//!
//! What it owns: the client (in-cluster config or `--kubeconfig`), a kube-rs
//! `watcher` over the pods of this node only (field selector
//! `spec.nodeName=<node>`), and, per watched pod, only what reconciling
//! needs (uid, namespace/name, its `netfault.io/*` annotations, whether a
//! sandbox took them): memory grows with the node's pods, not the cluster's.
//! The watcher re-lists on `410 Gone` and backs off across disconnects and
//! API server restarts (`default_backoff`).
//! What it must not do: touch the kernel or the records itself: every
//! change goes through [`Registry::apply_pod_annotations`], which keeps the
//! annotation digest that makes a re-seen annotation a no-op.

pub mod networkfault;
pub mod podcache;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use netfault_api::PodRef;
use serde_json::json;

use crate::registry::notice::FaultNotice;
use crate::registry::state::is_netfault_key;
use crate::registry::{AnnotationOutcome, Registry};

pub mod uninstall;

/// How often pods seen before their sandbox was enrolled are retried.
const RETRY_UNENROLLED: Duration = Duration::from_millis(500);

/// How the agent reaches the API server.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--kubeconfig PATH` (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` is set).
    InCluster,
}

#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub source: Source,
    /// `--node-name` / `NODE_NAME`.
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the kubeconfig {path}: {msg}")]
    Kubeconfig { path: String, msg: String },
    #[error("in-cluster configuration: {0}")]
    InCluster(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// A client for `source`.
pub async fn make_client(source: &Source) -> Result<Client, KubeError> {
    let config = match source {
        Source::Kubeconfig(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    msg: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    msg: e.to_string(),
                })?
        }
        Source::InCluster => {
            kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?
        }
    };
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// What the watch keeps of one pod.
#[derive(Debug, Clone)]
struct Watched {
    pod: PodRef,
    annotations: BTreeMap<String, String>,
    /// Its sandbox is not enrolled yet: retried until it is.
    waiting: bool,
}

/// The watch and its status (`kubernetes` in `GET /v1/capabilities`).
pub struct Watch {
    cfg: KubeConfig,
    registry: Arc<Registry>,
    pods: HashMap<String, Watched>,
    connected: bool,
    last_error: Option<String>,
    /// Posts Events on the pods (set once the client exists).
    recorder: Option<Recorder>,
    /// Fault notices from the registry, queued from the start, posted as
    /// Events once the client exists.
    notices: Option<tokio::sync::mpsc::Receiver<FaultNotice>>,
}

/// The `reportingController` of the agent's Events.
pub const EVENT_CONTROLLER: &str = "netfault.io/netfaultd";

impl Watch {
    pub fn new(cfg: KubeConfig, registry: Arc<Registry>) -> Watch {
        let notices = Some(registry.subscribe_notices());
        Watch {
            cfg,
            registry,
            notices,
            pods: HashMap::new(),
            connected: false,
            last_error: None,
            recorder: None,
        }
    }

    fn publish(&self) {
        let mode = match &self.cfg.source {
            Source::Kubeconfig(_) => "kubeconfig",
            Source::InCluster => "in-cluster",
        };
        self.registry.set_kubernetes_status(json!({
            "mode": mode,
            "node": self.cfg.node,
            "connected": self.connected,
            "last_error": self.last_error,
            "watched_pods": self.pods.len(),
            "events_dropped": self.registry.notices_dropped(),
        }));
    }

    /// Runs the watch until the process ends.
    pub async fn run(mut self) {
        self.publish();
        let client = loop {
            match make_client(&self.cfg.source).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "no Kubernetes client; retrying in 5s");
                    self.last_error = Some(e.to_string());
                    self.publish();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(self.cfg.node.clone()),
            },
        );
        if let Some(rx) = self.notices.take() {
            tokio::spawn(post_notices(rx, recorder.clone()));
        }
        self.recorder = Some(recorder.clone());
        // NetworkFaults: their own watches (all namespaces, all pods).
        tokio::spawn(
            networkfault::Reconciler::new(
                client.clone(),
                self.cfg.node.clone(),
                self.registry.clone(),
                recorder,
            )
            .run(),
        );
        let api: Api<Pod> = Api::all(client);
        let selector = format!("spec.nodeName={}", self.cfg.node);
        let wc = watcher::Config::default().fields(&selector);
        let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
        let mut retry = tokio::time::interval(RETRY_UNENROLLED);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pods listed since the last `Init`: those missing at `InitDone` are gone.
        let mut listing: Option<Vec<String>> = None;
        loop {
            tokio::select! {
                ev = stream.next() => {
                    let Some(ev) = ev else { break };
                    let seen = Instant::now();
                    match ev {
                        Ok(Event::Init) => {
                            listing = Some(Vec::new());
                            self.connected = true;
                        }
                        Ok(Event::InitApply(pod)) => {
                            if let Some(uid) = pod.metadata.uid.clone() {
                                listing.get_or_insert_with(Vec::new).push(uid);
                            }
                            self.seen(pod, seen).await;
                        }
                        Ok(Event::InitDone) => {
                            if let Some(uids) = listing.take() {
                                let keep: std::collections::HashSet<String> = uids.into_iter().collect();
                                self.pods.retain(|uid, _| keep.contains(uid));
                            }
                            self.connected = true;
                            self.last_error = None;
                            tracing::info!(node = %self.cfg.node, pods = self.pods.len(), "pod list synced");
                        }
                        Ok(Event::Apply(pod)) => {
                            self.connected = true;
                            self.seen(pod, seen).await;
                        }
                        Ok(Event::Delete(pod)) => {
                            if let Some(uid) = &pod.metadata.uid {
                                self.pods.remove(uid);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "pod watch failed; it resumes with backoff");
                            self.connected = false;
                            self.last_error = Some(e.to_string());
                        }
                    }
                    self.publish();
                }
                _ = retry.tick() => self.retry_waiting().await,
            }
        }
        tracing::error!("the pod watch ended");
    }

    /// A pod was listed, added or modified.
    async fn seen(&mut self, pod: Pod, seen: Instant) {
        let meta = pod.metadata;
        let (Some(uid), Some(name)) = (meta.uid, meta.name) else {
            return;
        };
        let annotations: BTreeMap<String, String> = meta
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| is_netfault_key(k))
            .collect();
        let pod = PodRef {
            namespace: meta.namespace.unwrap_or_default(),
            name,
            uid: uid.clone(),
        };
        let unchanged = self
            .pods
            .get(&uid)
            .is_some_and(|w| w.annotations == annotations && !w.waiting);
        if unchanged {
            return;
        }
        // A pod without netfault annotations whose sandbox is not enrolled
        // has nothing to wait for: its enrolment applies nothing either.
        let waiting = !self.reconcile(&pod, &annotations, seen).await && !annotations.is_empty();
        self.pods.insert(
            uid,
            Watched {
                pod,
                annotations,
                waiting,
            },
        );
    }

    async fn retry_waiting(&mut self) {
        let waiting: Vec<(String, Watched)> = self
            .pods
            .iter()
            .filter(|(_, w)| w.waiting)
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        for (uid, w) in waiting {
            if self.reconcile(&w.pod, &w.annotations, Instant::now()).await {
                if let Some(p) = self.pods.get_mut(&uid) {
                    p.waiting = false;
                }
            }
        }
    }

    /// Applies a pod's annotations; false when its sandbox is not enrolled yet.
    async fn reconcile(
        &self,
        pod: &PodRef,
        annotations: &BTreeMap<String, String>,
        seen: Instant,
    ) -> bool {
        let registry = self.registry.clone();
        let (p, a) = (pod.clone(), annotations.clone());
        let out = tokio::task::spawn_blocking(move || registry.apply_pod_annotations(&p, a)).await;
        let took = seen.elapsed();
        let who = format!("{}/{}", pod.namespace, pod.name);
        match out {
            Ok(Ok(AnnotationOutcome::NotEnrolled)) => false,
            Ok(Ok(AnnotationOutcome::Unchanged)) => true,
            Ok(Ok(AnnotationOutcome::Applied {
                sandbox,
                removed,
                installed,
            })) => {
                tracing::info!(pod = %who, sandbox = %sandbox, removed = removed.len(), installed = ?installed, "annotation faults reconciled");
                tracing::debug!(pod = %who, micros = took.as_micros() as u64, "watch event to effect");
                true
            }
            Ok(Ok(AnnotationOutcome::Invalid { sandbox, error })) => {
                tracing::warn!(pod = %who, sandbox = %sandbox, error = %error, "invalid netfault annotations; the pod is untouched");
                self.event(pod, EventType::Warning, "InvalidFaultAnnotation", error);
                true
            }
            Ok(Err(e)) => {
                tracing::error!(pod = %who, error = %e, "reconciling annotations failed");
                true
            }
            Err(e) => {
                tracing::error!(pod = %who, error = %e, "reconcile task failed");
                true
            }
        }
    }

    /// Posts an Event on the pod in the background; a failure is logged.
    fn event(&self, pod: &PodRef, type_: EventType, reason: &str, note: String) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let reason = reason.to_string();
        let pod = pod.clone();
        tokio::spawn(async move { post_event(&recorder, &pod, type_, reason, note, None).await });
    }
}

/// Posts the registry's fault notices as Events on their pods, one at a
/// time (the queue bounds what waits while the API server is slow).
async fn post_notices(mut rx: tokio::sync::mpsc::Receiver<FaultNotice>, recorder: Recorder) {
    while let Some(n) = rx.recv().await {
        let type_ = if n.kind.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let action = n.fault.clone();
        post_event(
            &recorder,
            &n.pod,
            type_,
            n.kind.reason().into(),
            n.note,
            action,
        )
        .await;
    }
}

/// Posts one Event on `pod`; a failure is logged.
///
/// kube-rs's recorder turns a repeat of an Event into a series (count and
/// last seen) by its reason, action and object, not its note. So the
/// action names what the Event is about: the fault's id for a fault's
/// step (each fault its own Event), else `Reconcile-<digest of the note>`
/// (the same error seen again is a series; a new error a new Event).
async fn post_event(
    recorder: &Recorder,
    pod: &PodRef,
    type_: EventType,
    reason: String,
    note: String,
    fault: Option<String>,
) {
    let action = fault.unwrap_or_else(|| format!("Reconcile-{:08x}", digest(&note) as u32));
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(pod.namespace.clone()),
        uid: Some(pod.uid.clone()),
        ..Default::default()
    };
    let ev = KubeEvent {
        type_,
        reason,
        // The API server caps a note at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action,
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, reason = %ev.reason, "posting an Event failed");
    }
}

/// 64-bit FNV-1a: a stable digest for Event actions.
fn digest(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
