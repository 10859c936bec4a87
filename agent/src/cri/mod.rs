//! Adoption through the container runtime (`netfaultd --cri-socket`): pods
//! that existed before the agent, or whose CNI chain has no netfault entry,
//! are enrolled from the runtime's CRI v1 list, and released when the
//! runtime stops them.
//!
//! What it owns: the CRI connection, one *pass* (list every sandbox, enrol
//! the READY ones not enrolled yet, release the ones [`decide`] says are
//! gone), the poll loop that runs a pass every `poll` (with a quiet backoff
//! while the runtime is unreachable), and the refresh a fault's target
//! triggers when it names an unknown pod or sandbox. Passes are serialized
//! and coalesced: a refresh asked for while one runs waits for the next
//! pass, which serves every caller that asked meanwhile.
//! What it must not do: touch the kernel or the records itself (enrolment
//! and release are the registry's, on blocking threads: the registry's
//! state lock is never held across a CRI call), or release anything on a
//! listing that failed.

pub mod decide;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netfault_api::{EnrolRequest, EnrolSource, PodRef};
use netfault_cri::{api, Cri, CriError, SandboxView};
use netfault_sys::netns::Netns;
use serde_json::{json, Value};

use crate::metrics::Metrics;
use crate::registry::{Enrolled, Registry};
use decide::{Candidate, Liveness, RuntimeState};

/// Longest wait between passes while the runtime is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct CriConfig {
    /// The runtime's CRI socket.
    pub socket: PathBuf,
    /// Time between passes while the runtime answers.
    pub poll: Duration,
    /// Bounds the connect and every CRI call.
    pub call_timeout: Duration,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A sandbox's verbose status: the status and the runtime's info map.
pub type StatusReply = (api::PodSandboxStatus, HashMap<String, String>);

/// What a pass asks of the container runtime: [`Cri`] over the socket (a
/// fake in the unit tests). The futures own what they need, so status
/// calls can run concurrently.
pub trait Runtime: Send + Sync + 'static {
    fn version(&self) -> BoxFut<Result<(String, String), CriError>>;
    /// Every sandbox, READY or NOTREADY.
    fn sandboxes(&self) -> BoxFut<Result<Vec<api::PodSandbox>, CriError>>;
    fn status(&self, id: String) -> BoxFut<Result<StatusReply, CriError>>;
}

/// How a pass reaches the runtime (again, after a failure).
pub trait Connect: Send + Sync + 'static {
    fn connect(&self) -> BoxFut<Result<Arc<dyn Runtime>, CriError>>;
}

impl Runtime for Cri {
    fn version(&self) -> BoxFut<Result<(String, String), CriError>> {
        let mut c = self.clone();
        // The inherent method: `c.version()` would be this one (by `&self`).
        Box::pin(async move { Cri::version(&mut c).await })
    }

    fn sandboxes(&self) -> BoxFut<Result<Vec<api::PodSandbox>, CriError>> {
        let mut c = self.clone();
        Box::pin(async move { Cri::sandboxes(&mut c).await })
    }

    fn status(&self, id: String) -> BoxFut<Result<StatusReply, CriError>> {
        let mut c = self.clone();
        Box::pin(async move { Cri::sandbox_status(&mut c, &id).await })
    }
}

/// The CRI socket of [`CriConfig`].
struct CriSocket {
    path: PathBuf,
    timeout: Duration,
}

impl Connect for CriSocket {
    fn connect(&self) -> BoxFut<Result<Arc<dyn Runtime>, CriError>> {
        let (path, timeout) = (self.path.clone(), self.timeout);
        Box::pin(async move {
            let c = Cri::connect(&path, timeout).await?;
            Ok(Arc::new(c) as Arc<dyn Runtime>)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error("registry worker failed: {0}")]
    Worker(String),
    /// The pass this call waited for failed (its error, as text).
    #[error("{0}")]
    Shared(String),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassOutcome {
    pub adopted: usize,
    pub released: usize,
}

/// What the last pass found, for `GET /v1/capabilities`.
#[derive(Debug, Default)]
struct Status {
    connected: bool,
    runtime: Option<(String, String)>,
    last_error: Option<String>,
    passes: u64,
}

/// The state passes hand to each other (behind the pass lock).
#[derive(Default)]
struct PassState {
    /// The generation of the last finished pass.
    done: u64,
    client: Option<Arc<dyn Runtime>>,
    /// Ids the runtime listed READY in an earlier pass.
    seen_ready: HashSet<String>,
    /// READY sandboxes that are not adopted, and why: each is logged once
    /// per reason.
    skipped: HashMap<String, Skipped>,
    /// The runtime was unreachable on the last pass (logged once).
    down: bool,
    /// Why the last pass failed.
    last_error: Option<String>,
}

pub struct Adopter {
    cfg: CriConfig,
    connector: Box<dyn Connect>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Generations of passes started.
    started: AtomicU64,
    pass: tokio::sync::Mutex<PassState>,
    status: Mutex<Status>,
}

impl Adopter {
    pub fn new(cfg: CriConfig, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Arc<Adopter> {
        let connector = Box::new(CriSocket {
            path: cfg.socket.clone(),
            timeout: cfg.call_timeout,
        });
        Adopter::with_connector(cfg, connector, registry, metrics)
    }

    /// An adopter that reaches its runtime through `connector`.
    pub fn with_connector(
        cfg: CriConfig,
        connector: Box<dyn Connect>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<Adopter> {
        Arc::new(Adopter {
            cfg,
            connector,
            registry,
            metrics,
            started: AtomicU64::new(0),
            pass: tokio::sync::Mutex::new(PassState::default()),
            status: Mutex::new(Status::default()),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a pass now and then every `poll`; while the runtime is
    /// unreachable, the wait doubles up to 30 s. Never returns.
    pub async fn run(self: Arc<Self>) {
        let mut wait = self.cfg.poll;
        loop {
            wait = match self.refresh().await {
                Ok(_) => self.cfg.poll,
                Err(_) => (wait * 2).clamp(self.cfg.poll, MAX_BACKOFF.max(self.cfg.poll)),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// A pass that starts after this call: the one in progress may have
    /// listed the runtime before what the caller wants to see existed.
    /// Callers that ask while a pass runs share the next one.
    pub async fn refresh(&self) -> Result<PassOutcome, AdoptError> {
        let want = self.started.load(Ordering::SeqCst) + 1;
        let mut st = self.pass.lock().await;
        if st.done >= want {
            // A pass that started after this call ran meanwhile: its outcome.
            return match &st.last_error {
                None => Ok(PassOutcome::default()),
                Some(e) => Err(AdoptError::Shared(e.clone())),
            };
        }
        let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let result = self.pass(&mut st).await;
        st.done = generation;
        match &result {
            Ok(_) => {
                if st.down {
                    tracing::info!(socket = %self.cfg.socket.display(), "the container runtime answers again");
                }
                st.down = false;
                st.last_error = None;
            }
            Err(e) => {
                // Connect again next time.
                st.client = None;
                self.metrics.cri.errors.fetch_add(1, Ordering::Relaxed);
                if !st.down {
                    tracing::warn!(socket = %self.cfg.socket.display(), error = %e,
                        "container runtime unreachable: running node-only (CNI and pending enrolments); retrying quietly");
                } else {
                    tracing::debug!(error = %e, "container runtime still unreachable");
                }
                st.down = true;
                st.last_error = Some(e.to_string());
            }
        }
        let mut status = self.status();
        status.passes += 1;
        match &result {
            Ok(_) => {
                status.connected = true;
                status.last_error = None;
            }
            Err(e) => {
                status.connected = false;
                status.last_error = Some(e.to_string());
            }
        }
        self.metrics
            .cri
            .connected
            .store(status.connected, Ordering::Relaxed);
        result
    }

    /// [`Adopter::refresh`], waiting at most `budget` (a fault's target
    /// names an unknown pod). The pass runs on to its end in the
    /// background if the budget runs out. Whether it finished in time.
    pub async fn refresh_within(self: &Arc<Self>, budget: Duration) -> bool {
        let me = self.clone();
        let pass = tokio::spawn(async move { me.refresh().await });
        matches!(tokio::time::timeout(budget, pass).await, Ok(Ok(Ok(_))))
    }

    /// `GET /v1/capabilities`' `cri` section.
    pub fn capabilities(&self) -> Value {
        let adopted = self
            .registry
            .enrolled()
            .iter()
            .filter(|s| s.source == EnrolSource::Cri)
            .count();
        let st = self.status();
        json!({
            "enabled": true,
            "socket": self.cfg.socket.display().to_string(),
            "connected": st.connected,
            "runtime": st.runtime.as_ref().map(|(name, version)| json!({"name": name, "version": version})),
            "adopted": adopted,
            "poll_interval_ms": self.cfg.poll.as_millis() as u64,
            "passes": st.passes,
            "last_error": st.last_error,
        })
    }

    /// One pass: list, adopt, release.
    async fn pass(&self, st: &mut PassState) -> Result<PassOutcome, AdoptError> {
        let started = std::time::Instant::now();
        let listed = self.list(st).await?;
        let runtime: HashMap<String, RuntimeState> = listed
            .iter()
            .map(|sb| {
                let state = if netfault_cri::is_ready(sb) {
                    RuntimeState::Ready
                } else {
                    RuntimeState::NotReady
                };
                (sb.id.clone(), state)
            })
            .collect();
        let adopted = self.adopt(st, &runtime).await?;
        let released = self.release(st, &runtime).await?;
        st.seen_ready.retain(|id| runtime.contains_key(id));
        st.seen_ready.extend(
            runtime
                .iter()
                .filter(|(_, s)| **s == RuntimeState::Ready)
                .map(|(id, _)| id.clone()),
        );
        st.skipped.retain(|id, _| runtime.contains_key(id));
        if adopted + released > 0 {
            tracing::info!(
                listed = runtime.len(),
                adopted,
                released,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "container runtime pass"
            );
        }
        Ok(PassOutcome { adopted, released })
    }

    /// Every sandbox the runtime knows (connecting first if needed).
    async fn list(&self, st: &mut PassState) -> Result<Vec<api::PodSandbox>, AdoptError> {
        let client = match &st.client {
            Some(c) => c.clone(),
            None => {
                let c = self.connector.connect().await?;
                let (name, version) = c.version().await?;
                tracing::info!(socket = %self.cfg.socket.display(), runtime = %name, %version, "connected to the container runtime");
                self.status().runtime = Some((name, version));
                st.client = Some(c.clone());
                c
            }
        };
        Ok(client.sandboxes().await?)
    }

    /// Enrols the READY sandboxes that are not enrolled yet. Returns how many.
    async fn adopt(
        &self,
        st: &mut PassState,
        runtime: &HashMap<String, RuntimeState>,
    ) -> Result<usize, AdoptError> {
        let enrolled: HashSet<String> = self
            .registry
            .enrolled()
            .into_iter()
            .map(|s| s.id.to_string())
            .collect();
        let todo: Vec<&String> = runtime
            .iter()
            .filter(|(id, s)| **s == RuntimeState::Ready && !enrolled.contains(*id))
            .filter(|(id, _)| !matches!(st.skipped.get(*id), Some(Skipped::Never(_))))
            .map(|(id, _)| id)
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let Some(client) = st.client.clone() else {
            return Ok(0);
        };
        // The status calls run concurrently over the one HTTP/2 channel.
        let mut calls = tokio::task::JoinSet::new();
        for id in todo {
            let call = client.status(id.clone());
            let id = id.clone();
            calls.spawn(async move { (id, call.await) });
        }
        let mut requests = Vec::new();
        while let Some(done) = calls.join_next().await {
            let (id, status) = done.map_err(|e| AdoptError::Worker(e.to_string()))?;
            let (status, info) = match status {
                Ok(s) => s,
                // Removed since the listing: nothing to adopt.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let view = SandboxView::new(&status, &info);
            match enrol_request(&view) {
                Ok(req) => requests.push((id, view, req)),
                Err(why) => skip(st, &id, &view, Skipped::Never(why)),
            }
        }
        let registry = self.registry.clone();
        let reqs: Vec<(String, EnrolRequest)> = requests
            .iter()
            .map(|(id, _, r)| (id.clone(), r.clone()))
            .collect();
        let results = tokio::task::spawn_blocking(move || {
            reqs.into_iter()
                .map(|(id, req)| registry.adopt(&id, req).map(drop))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| AdoptError::Worker(e.to_string()))?;
        let mut adopted = 0;
        for ((id, view, _), result) in requests.iter().zip(results) {
            match result {
                Ok(()) => {
                    adopted += 1;
                    st.skipped.remove(id);
                    self.metrics.cri.adopted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(sandbox = %id, pod = %format_args!("{}/{}", view.namespace, view.name),
                        netns = %view.netns.as_deref().unwrap_or(Path::new("")).display(),
                        "adopted a pod sandbox from the container runtime");
                }
                Err(e) => {
                    self.metrics.cri.errors.fetch_add(1, Ordering::Relaxed);
                    skip(st, id, view, Skipped::Refused(e.to_string()));
                }
            }
        }
        Ok(adopted)
    }

    /// Releases what [`decide::releases`] says is gone. Returns how many.
    async fn release(
        &self,
        st: &PassState,
        runtime: &HashMap<String, RuntimeState>,
    ) -> Result<usize, AdoptError> {
        let registry = self.registry.clone();
        let enrolled = tokio::task::spawn_blocking(move || {
            registry
                .enrolled()
                .into_iter()
                .map(|e| candidate(&e))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| AdoptError::Worker(e.to_string()))?;
        let now = crate::registry::state::now_ms();
        let gone = decide::releases(&enrolled, runtime, &st.seen_ready, now);
        if gone.is_empty() {
            return Ok(0);
        }
        let registry = self.registry.clone();
        let results = tokio::task::spawn_blocking(move || {
            gone.into_iter()
                .map(|(id, why)| {
                    let r = registry.release(&id);
                    (id, why, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| AdoptError::Worker(e.to_string()))?;
        let mut released = 0;
        for (id, why, r) in results {
            match r {
                Ok(()) => {
                    released += 1;
                    self.metrics.cri.released.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(sandbox = %id, reason = why.as_str(), "released a sandbox the runtime says is gone");
                }
                Err(e) => {
                    self.metrics.cri.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sandbox = %id, reason = why.as_str(), error = %e, "releasing a sandbox the runtime says is gone failed");
                }
            }
        }
        Ok(released)
    }
}

/// Why a READY sandbox is not adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Skipped {
    /// Its status says it cannot be (hostNetwork, no netns path, a closed
    /// netns): a sandbox's namespaces never change, so it is not asked again.
    Never(String),
    /// The registry refused it (an address another sandbox has, full
    /// slots): tried again on every pass.
    Refused(String),
}

/// Records why a READY sandbox is not adopted; logs it once per reason
/// (a refusal at warn, the rest at debug).
fn skip(st: &mut PassState, id: &str, view: &SandboxView, why: Skipped) {
    if st.skipped.get(id) == Some(&why) {
        return;
    }
    let pod = format!("{}/{}", view.namespace, view.name);
    match &why {
        Skipped::Refused(reason) => {
            tracing::warn!(sandbox = %id, %pod, %reason, "not adopting a pod sandbox")
        }
        Skipped::Never(reason) => {
            tracing::debug!(sandbox = %id, %pod, %reason, "not adopting a pod sandbox")
        }
    }
    st.skipped.insert(id.to_string(), why);
}

/// The enrolment of a READY sandbox, or why it has none.
pub fn enrol_request(view: &SandboxView) -> Result<EnrolRequest, String> {
    if view.host_network {
        return Err("hostNetwork: it shares the node's network".into());
    }
    let Some(netns) = &view.netns else {
        return Err("the runtime reports no network namespace path".into());
    };
    if view.netns_closed {
        return Err("the runtime closed its network namespace".into());
    }
    Ok(EnrolRequest {
        netns: netns.display().to_string(),
        // Empty: the registry takes eth0, or the netns's sole interface.
        ifname: view.ifname.clone().unwrap_or_default(),
        ips: view.ips.iter().map(ToString::to_string).collect(),
        pod: Some(PodRef {
            namespace: view.namespace.clone(),
            name: view.name.clone(),
            uid: view.uid.clone(),
        }),
        annotations: view.annotations.clone(),
    })
}

/// An enrolled sandbox with its netns measured now.
fn candidate(e: &Enrolled) -> Candidate {
    let netns = match Netns::open_if_same(&e.netns, e.netns_id) {
        Ok(Some(_)) => Liveness::Alive,
        Ok(None) => Liveness::Gone,
        Err(_) => Liveness::Unknown,
    };
    Candidate {
        id: e.id.to_string(),
        source: e.source,
        enrolled_at_ms: e.enrolled_at_ms,
        netns,
    }
}

/// The pass that found a target unknown must be quick: the caller's request waits on it.
pub const TARGET_REFRESH_BUDGET: Duration = Duration::from_secs(2);
