//! The sandbox registry and fault reconciler: the agent's source of truth.
//!
//! What it owns: enrolled sandboxes and faults (`state`), the state file
//! (`persist`), and the order of the steps that bring the kernel in line
//! with them: on every change, when faults expire (`reap`), and at start
//! (`reconcile`). The kernel work itself is the backends' (`backend`).
//! What it must not do: speak HTTP (see `server`), touch the kernel
//! itself, or hold a lock while a backend works.
//!
//! Concurrency: every change runs on one owner thread, which owns the
//! backends, so changes are serialized and each is atomic with respect to
//! the others. The records sit behind a mutex that is held only to read or
//! write them, never across a backend call, an `nft` run or a process
//! spawn; API reads take it briefly and read live counters through
//! [`CounterReader`]s, so they never wait for a change in progress.

mod error;
pub mod handover;
pub mod notice;
mod pending;
mod persist;
mod reconcile;
mod resource;
pub mod state;
mod target;
#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use netfault_api::{
    Action, BackendKind, EnrolRequest, EnrolSource, Fault, FaultSource, FaultSpec, FieldError,
    Limits, PodRef, Sandbox, Target,
};
use netfault_sys::netns::Netns;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::backend::proxy::{ConnectionGauge, ProxyBackend};
use crate::backend::{
    ActiveFault, Backend, BackendAction, BackendOps, Backends, CounterReader, SandboxMemo,
};
use crate::policy::Policy;
pub use error::AgentError;
use notice::{FaultNotice, NoticeKind, Notices};
use persist::StateDir;
pub use resource::{PodOutcome, ResourceFaults, ResourceOutcome};
use state::{annotation_digest, FaultId, FaultRecord, SandboxRecord, State};
pub use state::{NetnsId, SandboxId};
pub use target::{Host, SystemHost};

fn internal(what: &str) -> impl FnOnce(String) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// What the agent refuses (caps, denied namespaces, the host netns),
    /// applied to faults of every source on their one install path.
    pub policy: Policy,
    /// How long expired faults stay listed.
    pub retain_expired: Duration,
    /// How long a hand-over may keep this agent frozen (see `handover`).
    pub freeze_limit: Duration,
}

/// What every operation shares: the records and how to save them.
struct Shared {
    cfg: Config,
    host: Box<dyn Host>,
    dir: StateDir,
    state: Mutex<State>,
    /// Faults of pods applied, removed, expired or failed (pod Events).
    notices: Notices,
    /// Whether a new agent is taking the node over (see `handover`).
    handover: Mutex<handover::Handover>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves records that are still
        // consistent on disk; keep serving rather than poisoning forever.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the records: serialized under the lock, written without it.
    fn persist(&self) -> Result<(), AgentError> {
        let bytes = StateDir::serialize(&self.lock())?;
        self.dir.write(&bytes)
    }
}

type Job = Box<dyn FnOnce(&mut Backends) + Send>;

/// The thread that owns the backends and runs every change, one at a time.
struct Owner {
    tx: mpsc::Sender<Job>,
}

impl Owner {
    fn start(mut backends: Backends) -> Result<Owner, AgentError> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking change fails its caller (the reply is
                    // dropped); the owner goes on serving the next one.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut backends)));
                }
            })
            .map_err(|e| AgentError::Internal(format!("starting the registry thread: {e}")))?;
        Ok(Owner { tx })
    }

    /// Runs `f` on the owner thread and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Backends) -> T + Send + 'static,
    ) -> Result<T, AgentError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Box::new(move |b| {
                let _ = reply.send(f(b));
            }))
            .map_err(|_| AgentError::Internal("the registry thread is gone".into()))?;
        rx.recv()
            .map_err(|_| AgentError::Internal("the registry operation panicked".into()))
    }
}

/// An enrolled sandbox as [`Registry::enrolled`] lists it.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: SandboxId,
    pub source: EnrolSource,
    pub enrolled_at_ms: u64,
    pub netns: PathBuf,
    pub netns_id: NetnsId,
}

pub struct Registry {
    shared: Arc<Shared>,
    owner: Owner,
    gauge: Option<ConnectionGauge>,
    /// `kubernetes` in the capabilities (see the `kube` module).
    kube_status: Mutex<Value>,
    /// `kubernetes.networkfaults` in the capabilities (`kube::networkfault`).
    networkfault_status: Mutex<Value>,
}

/// What [`Registry::apply_pod_annotations`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationOutcome {
    /// No sandbox is enrolled for the pod (yet).
    NotEnrolled,
    /// The `netfault.io/*` annotations are those already applied.
    Unchanged,
    /// The annotation faults were replaced: ids removed, ids installed.
    Applied {
        sandbox: String,
        removed: Vec<String>,
        installed: Vec<String>,
    },
    /// The annotations are invalid (the message names the field); nothing changed.
    Invalid { sandbox: String, error: String },
}

/// One change in progress: the records, and the backends (owned by the
/// owner thread, lent for the change).
struct Core<'a> {
    sh: &'a Shared,
    b: &'a mut Backends,
}

impl Registry {
    /// Loads the datapath and the persisted state, and reconciles the kernel
    /// with it: faults still before their deadline are re-installed on the
    /// new programs (atomically replacing the old filters), the rest are
    /// marked expired and their filters removed.
    pub fn open(cfg: Config) -> Result<Registry, AgentError> {
        let ebpf = crate::backend::ebpf::EbpfBackend::load()?;
        let proxy = ProxyBackend::default();
        let gauge = proxy.gauge();
        let backends = Backends {
            ebpf: Box::new(ebpf),
            nfqueue: Box::new(crate::backend::nfqueue::NfqueueBackend::default()),
            proxy: Box::new(proxy),
        };
        let mut reg = Registry::with_parts(cfg, backends, Box::new(SystemHost))?;
        reg.gauge = Some(gauge);
        Ok(reg)
    }

    /// A registry over the given backends and host (tests use fakes).
    pub(crate) fn with_parts(
        cfg: Config,
        backends: Backends,
        host: Box<dyn Host>,
    ) -> Result<Registry, AgentError> {
        let dir = StateDir::new(&cfg.state_dir)?;
        let state = dir.load()?;
        let reg = Registry {
            shared: Arc::new(Shared {
                cfg,
                host,
                dir,
                state: Mutex::new(state),
                notices: Notices::default(),
                handover: Mutex::new(handover::Handover::Serving),
            }),
            owner: Owner::start(backends)?,
            gauge: None,
            kube_status: Mutex::new(serde_json::json!({"mode": "node-only"})),
            networkfault_status: Mutex::new(Value::Null),
        };
        reg.change(|c| c.reconcile())?;
        Ok(reg)
    }

    /// Runs a change on the owner thread.
    fn change<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core<'_>) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let sh = self.shared.clone();
        self.owner.run(move |b| {
            // Checked on the owner thread: a freeze runs there too, so no
            // change starts after it.
            let resumed = sh
                .handover
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(&sh.cfg.state_dir)?;
            let mut core = Core { sh: &sh, b };
            if resumed {
                core.reclaim();
            }
            f(&mut core)
        })?
    }

    /// Connections the transparent proxy serves now, over every sandbox.
    pub fn proxy_open_connections(&self) -> u64 {
        self.gauge.as_ref().map_or(0, |g| g.open_connections())
    }

    /// Malformed DNS messages the DNS faults passed through (UDP and TCP).
    pub fn dns_malformed(&self) -> u64 {
        crate::backend::dns_malformed() + self.gauge.as_ref().map_or(0, |g| g.dns_malformed())
    }

    /// Enrols a sandbox through the API (the CNI plugin's ADD).
    pub fn enrol(&self, id: &str, req: EnrolRequest) -> Result<Sandbox, AgentError> {
        self.enrol_from(id, req, EnrolSource::Cni)
    }

    fn enrol_from(
        &self,
        id: &str,
        req: EnrolRequest,
        source: EnrolSource,
    ) -> Result<Sandbox, AgentError> {
        let id = target::valid_sandbox_id(id)?;
        target::validate_enrol(&req)?;
        self.change(move |c| c.enrol(&id, req, source))
    }

    /// Enrols a sandbox the container runtime reported (CRI adoption). An
    /// empty `req.ifname` means: `eth0`, or the netns's sole interface when
    /// it has no `eth0`. Enrolling an id that is already enrolled on the
    /// same netns changes nothing (its source stays).
    pub fn adopt(&self, id: &str, mut req: EnrolRequest) -> Result<Sandbox, AgentError> {
        let id = target::valid_sandbox_id(id)?;
        if let Ok(ns) = netfault_sys::netns::identify(Path::new(&req.netns)) {
            // Before anything enters it (a hostNetwork pod's sandbox).
            self.shared.cfg.policy.check_netns(ns, "netns")?;
        }
        self.change(move |c| {
            if req.ifname.is_empty() {
                req.ifname = c.pod_interface(&req.netns)?;
            }
            target::validate_enrol(&req)?;
            c.enrol(&id, req, EnrolSource::Cri)
        })
    }

    /// What the runtime poll decides on: every enrolled sandbox's id,
    /// source, enrolment time and netns.
    pub fn enrolled(&self) -> Vec<Enrolled> {
        let st = self.shared.lock();
        st.sandboxes
            .values()
            .map(|s| Enrolled {
                id: s.id.clone(),
                source: s.source,
                enrolled_at_ms: s.enrolled_at_ms,
                netns: PathBuf::from(&s.netns),
                netns_id: s.netns_id,
            })
            .collect()
    }

    /// Removes everything installed for the sandbox. Unknown ids are fine.
    pub fn release(&self, id: &str) -> Result<(), AgentError> {
        let id = SandboxId::from(id);
        self.change(move |c| c.release(&id))
    }

    /// Enrols the sandboxes the CNI plugin recorded while the agent was
    /// unreachable (see `pending`); pods whose netns is gone by now are
    /// dropped. Returns how many were enrolled.
    pub fn adopt_pending(&self, dir: &Path) -> usize {
        if !self.serving() {
            // Left for the agent taking over.
            return 0;
        }
        let mut adopted = 0;
        for (id, req) in pending::take(dir) {
            match self.enrol_from(&id, req, EnrolSource::Pending) {
                Ok(_) => {
                    tracing::info!(sandbox = %id, "enrolled a pod created while the agent was down");
                    adopted += 1;
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "could not enrol a pending pod")
                }
            }
        }
        adopted
    }

    /// Reconciles the annotation faults of the sandbox enrolled for `pod`
    /// with the pod's current annotations (the Kubernetes watch). Only the
    /// faults the annotations created are replaced; an unchanged set of
    /// `netfault.io/*` annotations changes nothing (no duration restarts, no
    /// expired fault re-applied); an invalid set leaves the faults as they
    /// are and records why in the sandbox's `annotation_error`.
    pub fn apply_pod_annotations(
        &self,
        pod: &PodRef,
        annotations: BTreeMap<String, String>,
    ) -> Result<AnnotationOutcome, AgentError> {
        let pod = pod.clone();
        self.change(move |c| c.apply_pod_annotations(&pod, annotations))
    }

    /// Starts the queue of fault notices for pods (applied, removed,
    /// expired, failed), which the Kubernetes side posts as Events.
    pub fn subscribe_notices(&self) -> tokio::sync::mpsc::Receiver<FaultNotice> {
        self.shared.notices.subscribe()
    }

    /// Notices dropped because the queue was full.
    pub fn notices_dropped(&self) -> u64 {
        self.shared.notices.dropped()
    }

    /// Adds the `kubernetes` section to [`Registry::capabilities`].
    pub fn set_kubernetes_status(&self, status: Value) {
        *self.kube_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Sets `kubernetes.networkfaults` in [`Registry::capabilities`].
    pub fn set_networkfault_status(&self, status: Value) {
        *self
            .networkfault_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// The longest duration a fault may have (`--max-duration`).
    pub fn max_duration(&self) -> Duration {
        self.shared.cfg.policy.max_duration
    }

    /// The policy in effect.
    pub fn policy(&self) -> &Policy {
        &self.shared.cfg.policy
    }

    pub fn sandboxes(&self) -> Vec<Sandbox> {
        let st = self.shared.lock();
        st.sandboxes.values().map(SandboxRecord::view).collect()
    }

    /// Validates and installs a fault from an API body.
    pub fn create_fault(&self, body: &Value) -> Result<Fault, AgentError> {
        // The duration cap is the policy's (checked at install, worded
        // as a refusal like every other rule).
        let spec = FaultSpec::parse(
            body,
            &Limits {
                max_duration: Duration::MAX,
                target_required: true,
            },
        )?;
        let target = spec
            .target
            .clone()
            .ok_or_else(|| FieldError::missing("target"))?;
        self.change(move |c| {
            let sandbox = c.resolve(&target)?;
            c.install(&sandbox, spec, FaultSource::Api)
        })
    }

    pub fn faults(&self) -> Vec<Fault> {
        let now = netfault_ebpf::boottime_ns();
        let st = self.shared.lock();
        st.faults.values().map(|f| st.fault_view(f, now)).collect()
    }

    pub fn fault(&self, id: &str) -> Result<Fault, AgentError> {
        let now = netfault_ebpf::boottime_ns();
        let st = self.shared.lock();
        st.faults
            .get(&FaultId::from(id))
            .map(|f| st.fault_view(f, now))
            .ok_or_else(|| FieldError::not_found("id", &format!("no fault {id:?}")).into())
    }

    /// Removes a fault; unknown ids are fine.
    pub fn delete_fault(&self, id: &str) -> Result<(), AgentError> {
        let id = FaultId::from(id);
        self.change(move |c| c.delete_fault(&id))
    }

    /// Releases every sandbox (the agent is being uninstalled): their
    /// faults and everything the backends attached go, as at CNI DEL.
    /// Returns how many were released; a failure is logged and the rest
    /// still go.
    pub fn release_all(&self) -> Result<usize, AgentError> {
        let ids: Vec<SandboxId> = self.shared.lock().sandboxes.keys().cloned().collect();
        let mut released = 0;
        for id in ids {
            let sb = id.clone();
            match self.change(move |c| c.release(&sb)) {
                Ok(()) => released += 1,
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e, "releasing at uninstall failed")
                }
            }
        }
        Ok(released)
    }

    /// Marks faults past their deadline expired (the kernel already stopped
    /// applying them), takes their final counters, and removes what they
    /// installed. Returns the time until the next deadline, for the
    /// caller's sleep.
    pub fn reap(&self) -> Result<Option<Duration>, AgentError> {
        if !self.serving() {
            // The agent taking over expires the faults.
            return Ok(Some(Duration::from_millis(500)));
        }
        self.change(|c| c.reap())
    }

    /// What this node supports (`GET /v1/capabilities`).
    pub fn capabilities(&self) -> Result<Value, AgentError> {
        let mut caps = self.owner.run(|b| b.capabilities())?;
        if let Value::Object(m) = &mut caps {
            let kube = self
                .kube_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let nf = self
                .networkfault_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut kube = kube;
            if let (Value::Object(k), false) = (&mut kube, nf.is_null()) {
                k.insert("networkfaults".into(), nf);
            }
            m.insert("kubernetes".into(), kube);
            m.insert("policy".into(), self.shared.cfg.policy.capabilities());
        }
        Ok(caps)
    }
}

impl Core<'_> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.sh.lock()
    }

    fn backend(&mut self, kind: BackendKind) -> &mut dyn BackendOps {
        self.b.ops_mut(kind)
    }

    /// Puts the sandbox's `kind` backend in line with its live faults of
    /// that kind.
    fn sync(&mut self, sandbox: &SandboxId, kind: BackendKind) -> Result<(), AgentError> {
        match kind {
            BackendKind::Ebpf => sync_with(self.sh, &mut *self.b.ebpf, sandbox),
            BackendKind::Nfqueue => sync_with(self.sh, &mut *self.b.nfqueue, sandbox),
            BackendKind::Proxy => sync_with(self.sh, &mut *self.b.proxy, sandbox),
        }
    }

    /// The backend of `spec`'s action admits it on the sandbox.
    fn admit(&self, st: &State, sandbox: &SandboxId, spec: &FaultSpec) -> Result<(), FieldError> {
        let now = netfault_ebpf::boottime_ns();
        match &spec.action {
            Action::Packet(a) => admit_with(&*self.b.ebpf, st, sandbox, a, now),
            Action::Delay(a) => admit_with(&*self.b.nfqueue, st, sandbox, a, now),
            Action::Proxy(a) => admit_with(&*self.b.proxy, st, sandbox, a, now),
        }
    }

    /// Installs a fault on an enrolled sandbox: the backend admits it, then
    /// syncs with it added. On failure the sandbox is put back as it was.
    fn install(
        &mut self,
        sandbox: &SandboxId,
        spec: FaultSpec,
        source: FaultSource,
    ) -> Result<Fault, AgentError> {
        self.install_owned(sandbox, spec, source, None)
    }

    /// [`Core::install`], recording the NetworkFault that owns the fault.
    fn install_owned(
        &mut self,
        sandbox: &SandboxId,
        mut spec: FaultSpec,
        source: FaultSource,
        owner: Option<state::ResourceOwner>,
    ) -> Result<Fault, AgentError> {
        let kind = spec.action.backend();
        let now = netfault_ebpf::boottime_ns();
        let id = {
            let mut st = self.sh.lock();
            if !st.sandboxes.contains_key(sandbox) {
                return Err(FieldError::not_found("target", "sandbox was released").into());
            }
            let policy = self.policy_allows(&st, sandbox, &spec, now);
            if spec.target.is_none() {
                spec.target = Some(Target::Sandbox(sandbox.to_string()));
            }
            if let Err(e) = policy.and_then(|()| self.admit(&st, sandbox, &spec)) {
                drop(st);
                let e = AgentError::from(e);
                let why = e.to_string();
                self.notice(NoticeKind::Failed, sandbox, None, &spec, source, Some(&why));
                return Err(e);
            }
            let mut rec = FaultRecord::new(sandbox, spec, source, now);
            rec.owner = owner;
            let id = rec.id.clone();
            st.faults.insert(id.clone(), rec);
            id
        };
        if let Err(e) = self.sync(sandbox, kind) {
            let gone = {
                let mut st = self.lock();
                st.readers.remove(&id);
                st.faults.remove(&id)
            };
            if let Some(f) = gone {
                let why = e.to_string();
                self.notice(
                    NoticeKind::Failed,
                    sandbox,
                    None,
                    &f.spec,
                    source,
                    Some(&why),
                );
            }
            self.backend(kind).forget_fault(&id);
            if let Err(undo) = self.sync(sandbox, kind) {
                tracing::warn!(sandbox = %sandbox, error = %undo, "putting the sandbox back after a failed install failed");
            }
            return Err(e);
        }
        crate::crash::backend_point("install.synced", kind);
        self.sh.persist()?;
        crate::crash::backend_point("install.persisted", kind);
        let view = {
            let st = self.lock();
            st.faults
                .get(&id)
                .map(|f| st.fault_view(f, netfault_ebpf::boottime_ns()))
                .ok_or_else(|| AgentError::Internal("fault vanished during install".into()))?
        };
        tracing::info!(fault = %view.id, sandbox = %sandbox, action = %view.spec["action"]["type"], backend = %view.backend, "fault installed");
        self.notify(NoticeKind::Applied, &id);
        Ok(view)
    }

    /// The policy lets `spec` be installed on `sandbox`: not the host's
    /// netns, not a denied namespace, within the caps, and the sandbox has
    /// room for one more live fault.
    fn policy_allows(
        &self,
        st: &State,
        sandbox: &SandboxId,
        spec: &FaultSpec,
        now: u64,
    ) -> Result<(), FieldError> {
        let policy = &self.sh.cfg.policy;
        let Some(rec) = st.sandboxes.get(sandbox) else {
            return Ok(());
        };
        let field = match spec.target {
            Some(Target::Netns(_)) => "target.netns",
            _ => "target",
        };
        policy.check_netns(rec.netns_id, field)?;
        let live = st.faults_of(sandbox).filter(|f| f.is_live(now)).count();
        let namespace = rec.pod.as_ref().map(|p| p.namespace.as_str());
        policy.check_fault(spec, namespace, live)
    }

    /// Tells the reporter what happened to fault `id` (a pod's only).
    fn notify(&self, kind: NoticeKind, id: &FaultId) {
        let found = {
            let st = self.lock();
            st.faults
                .get(id)
                .map(|f| (f.sandbox.clone(), f.spec.clone(), f.source))
        };
        if let Some((sandbox, spec, source)) = found {
            self.notice(kind, &sandbox, Some(id), &spec, source, None);
        }
    }

    /// Tells the reporter what happened to a fault of `sandbox`, if the
    /// sandbox is a pod's (a bare netns has nothing to show it on).
    fn notice(
        &self,
        kind: NoticeKind,
        sandbox: &SandboxId,
        fault: Option<&FaultId>,
        spec: &FaultSpec,
        source: FaultSource,
        error: Option<&str>,
    ) {
        let pod = self
            .lock()
            .sandboxes
            .get(sandbox)
            .and_then(SandboxRecord::pod_ref);
        if let Some(pod) = pod {
            let fault = fault.map(FaultId::as_str);
            let n = FaultNotice::new(kind, &pod, fault, spec, source, error);
            self.sh.notices.send(n);
        }
    }

    fn delete_fault(&mut self, id: &FaultId) -> Result<(), AgentError> {
        let removed = {
            let mut st = self.lock();
            st.readers.remove(id);
            st.faults.remove(id)
        };
        let Some(f) = removed else {
            return Ok(());
        };
        if !f.expired {
            self.sync(&f.sandbox, f.backend())?;
            crate::crash::backend_point("remove.synced", f.backend());
            let id = Some(&f.id);
            self.notice(NoticeKind::Removed, &f.sandbox, id, &f.spec, f.source, None);
        }
        self.backend(f.backend()).forget_fault(&f.id);
        self.settle(&f.sandbox);
        self.sh.persist()
    }

    /// Releases an implicit sandbox that has no fault left (not even an
    /// expired one still listed). Its backends are already in sync: each
    /// was synced when its last fault went.
    fn settle(&mut self, sandbox: &SandboxId) {
        let mut st = self.lock();
        let implicit = st.sandboxes.get(sandbox).is_some_and(|s| s.implicit);
        if implicit && st.faults_of(sandbox).next().is_none() {
            st.sandboxes.remove(sandbox);
        }
    }

    fn release(&mut self, sandbox: &SandboxId) -> Result<(), AgentError> {
        let (rec, faults) = {
            let st = self.lock();
            let Some(rec) = st.sandboxes.get(sandbox).cloned() else {
                return Ok(());
            };
            let faults: Vec<(FaultId, BackendKind)> = st
                .faults_of(sandbox)
                .map(|f| (f.id.clone(), f.backend()))
                .collect();
            (rec, faults)
        };
        // The sandbox's netns, if it is still the one it was enrolled with.
        let ns = Netns::open_if_same(Path::new(&rec.netns), rec.netns_id)
            .ok()
            .flatten();
        let ctx = rec.ctx(ns.as_ref());
        let mut memo = rec.memo;
        // Only the backends that hold something for it, or served one of
        // its faults (an `nft` run costs milliseconds on every CNI DEL).
        for kind in BackendKind::ALL {
            let served = faults.iter().any(|(_, k)| *k == kind);
            if served || self.b.ops(kind).holds(sandbox) {
                self.backend(kind).forget_sandbox(&ctx, &mut memo)?;
            }
        }
        for (id, kind) in &faults {
            self.backend(*kind).forget_fault(id);
        }
        crate::crash::point("release.backends");
        {
            let mut st = self.lock();
            for (id, _) in &faults {
                st.faults.remove(id);
                st.readers.remove(id);
            }
            st.sandboxes.remove(sandbox);
        }
        self.sh.persist()
    }

    /// The interface an adopted sandbox is enrolled on: `eth0` if the netns
    /// has it, else its sole non-loopback interface.
    fn pod_interface(&self, netns: &str) -> Result<String, AgentError> {
        let ns = Netns::open(Path::new(netns))
            .map_err(|e| FieldError::invalid("netns", &e.to_string()))?;
        let host = self.sh.host.as_ref();
        if let Ok(Ok(_)) = host.addresses(&ns, "eth0") {
            return Ok("eth0".into());
        }
        host.sole_interface(&ns)
            .map_err(|e| FieldError::invalid("netns", &e.to_string()))?
            .map_err(|e| FieldError::invalid("ifname", &format!("{netns}: {e}")).into())
    }

    fn enrol(
        &mut self,
        id: &SandboxId,
        req: EnrolRequest,
        source: EnrolSource,
    ) -> Result<Sandbox, AgentError> {
        let path = PathBuf::from(&req.netns);
        let ns = Netns::open(&path).map_err(|e| FieldError::invalid("netns", &e.to_string()))?;
        let field = if source == EnrolSource::Netns {
            "target.netns"
        } else {
            "netns"
        };
        self.sh.cfg.policy.check_netns(ns.id(), field)?;
        let existing = self.lock().sandboxes.get(id).cloned();
        if let Some(sb) = existing {
            if sb.netns_id == ns.id() && sb.ifname == req.ifname {
                if !sb.birth_pending {
                    return Ok(sb.view());
                }
                // A previous agent saved the enrolment and died before its
                // birth-time faults: install them now.
                drop(ns);
                let specs = self
                    .sh
                    .cfg
                    .policy
                    .annotation_faults(&sb.annotations)
                    .unwrap_or_default();
                return self.install_birth(id, specs);
            }
            // Same id, different namespace: the runtime reused the id; start over.
            self.release(id)?;
        }
        let addresses = target::addresses(self.sh.host.as_ref(), &ns, &req)?;
        // Parse birth-time faults before changing anything.
        let (birth_specs, annotation_error) = match self
            .sh
            .cfg
            .policy
            .annotation_faults(&req.annotations)
        {
            Ok(specs) => (specs, None),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "invalid netfault annotations; no fault applied");
                (Vec::new(), Some(e.to_string()))
            }
        };
        {
            let mut st = self.lock();
            let slot = target::free_slot(&st)?;
            target::check_addresses_free(&st, &addresses)?;
            let rec = SandboxRecord {
                id: id.clone(),
                netns: req.netns.clone(),
                netns_id: ns.id(),
                ifname: req.ifname.clone(),
                ips: req.ips.clone(),
                pod: req.pod.clone(),
                annotations: req.annotations.clone(),
                enrolled_at_ms: state::now_ms(),
                birth_faults: Vec::new(),
                annotation_error,
                slot,
                addresses,
                implicit: source == EnrolSource::Netns,
                source,
                annotation_digest: Some(annotation_digest(&req.annotations)),
                birth_pending: !birth_specs.is_empty(),
                memo: Default::default(),
            };
            st.sandboxes.insert(id.clone(), rec);
        }
        crate::crash::point("enrol.recorded");
        self.sh.persist()?;
        crate::crash::point("enrol.persisted");
        drop(ns);
        if source.may_predate_agent() {
            self.sweep(id);
        }
        self.install_birth(id, birth_specs)
    }

    /// Removes whatever an earlier agent left in a sandbox this agent has
    /// no record of (a lost or unreadable state file): filters, nft tables,
    /// routes and rules of every backend, as a CNI DEL would. Only for
    /// sandboxes whose netns may predate this agent (see
    /// [`EnrolSource::may_predate_agent`]); a CNI ADD's netns is new. A
    /// failure is logged, not fatal: the enrolment stands.
    fn sweep(&mut self, id: &SandboxId) {
        let Some(rec) = self.lock().sandboxes.get(id).cloned() else {
            return;
        };
        let Ok(Some(ns)) = Netns::open_if_same(Path::new(&rec.netns), rec.netns_id) else {
            return;
        };
        let ctx = rec.ctx(Some(&ns));
        let mut memo = SandboxMemo::default();
        for kind in BackendKind::ALL {
            if let Err(e) = self.backend(kind).forget_sandbox(&ctx, &mut memo) {
                tracing::warn!(sandbox = %id, backend = kind.as_str(), error = %e, "removing what an earlier agent left failed");
            }
        }
    }

    /// Installs an enrolled sandbox's birth-time faults (from its
    /// annotations) and returns its view.
    fn install_birth(
        &mut self,
        id: &SandboxId,
        birth_specs: Vec<FaultSpec>,
    ) -> Result<Sandbox, AgentError> {
        let with_birth_faults = !birth_specs.is_empty();
        let mut birth = Vec::new();
        for spec in birth_specs {
            match self.install(id, spec, FaultSource::Annotation) {
                Ok(f) => birth.push(FaultId::from(f.id)),
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e, "birth-time fault failed");
                    if let Some(sb) = self.lock().sandboxes.get_mut(id) {
                        sb.annotation_error = Some(e.to_string());
                    }
                }
            }
        }
        let view = {
            let mut st = self.lock();
            let sb = st
                .sandboxes
                .get_mut(id)
                .ok_or_else(|| AgentError::Internal("sandbox vanished during enrolment".into()))?;
            sb.birth_faults = birth;
            sb.birth_pending = false;
            sb.view()
        };
        // Without birth faults the records are as saved above (CNI ADD's latency).
        if with_birth_faults {
            self.sh.persist()?;
        }
        Ok(view)
    }

    fn apply_pod_annotations(
        &mut self,
        pod: &PodRef,
        annotations: BTreeMap<String, String>,
    ) -> Result<AnnotationOutcome, AgentError> {
        let found = {
            let st = self.lock();
            st.sandboxes
                .values()
                .filter(|s| s.pod.as_ref().is_some_and(|p| same_pod(p, pod)))
                .max_by_key(|s| s.enrolled_at_ms)
                .map(|s| (s.id.clone(), s.annotation_digest.clone()))
        };
        let Some((id, old_digest)) = found else {
            return Ok(AnnotationOutcome::NotEnrolled);
        };
        let digest = annotation_digest(&annotations);
        let parsed = self.sh.cfg.policy.annotation_faults(&annotations);
        let error = parsed.as_ref().err().map(ToString::to_string);
        if old_digest.as_deref() == Some(digest.as_str()) || error.is_some() {
            // Unchanged (or invalid): no fault is touched. The error reflects
            // the annotations the pod has now.
            let changed = {
                let mut st = self.lock();
                let sb = st
                    .sandboxes
                    .get_mut(&id)
                    .ok_or_else(|| AgentError::Internal("sandbox vanished".into()))?;
                let merged = merge_netfault_annotations(&sb.annotations, &annotations);
                let changed = sb.annotation_error != error || sb.annotations != merged;
                sb.annotation_error = error.clone();
                sb.annotations = merged;
                changed
            };
            if changed {
                self.sh.persist()?;
            }
            return Ok(match error {
                Some(error) => AnnotationOutcome::Invalid {
                    sandbox: id.to_string(),
                    error,
                },
                None => AnnotationOutcome::Unchanged,
            });
        }
        let specs = parsed.unwrap_or_default();
        let old: Vec<FaultId> = self
            .lock()
            .faults_of(&id)
            .filter(|f| f.source == FaultSource::Annotation)
            .map(|f| f.id.clone())
            .collect();
        for f in &old {
            self.delete_fault(f)?;
        }
        let mut installed = Vec::new();
        let mut failed = None;
        for spec in specs {
            match self.install(&id, spec, FaultSource::Annotation) {
                Ok(f) => installed.push(f.id),
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e, "annotation fault failed");
                    failed = Some(e.to_string());
                }
            }
        }
        {
            let mut st = self.lock();
            if let Some(sb) = st.sandboxes.get_mut(&id) {
                sb.annotation_digest = Some(digest);
                sb.annotations = merge_netfault_annotations(&sb.annotations, &annotations);
                sb.annotation_error = failed;
            }
        }
        self.sh.persist()?;
        Ok(AnnotationOutcome::Applied {
            sandbox: id.to_string(),
            removed: old.iter().map(ToString::to_string).collect(),
            installed,
        })
    }

    /// The sandbox a fault's target names; a bare netns is enrolled
    /// implicitly, on its sole interface, and released with its last fault.
    fn resolve(&mut self, target: &Target) -> Result<SandboxId, AgentError> {
        let found = target::resolve(&self.lock(), target)?;
        match found {
            target::Resolved::Enrolled(id) => Ok(id),
            target::Resolved::Bare { path, ns } => {
                // Before the implicit enrolment enters it.
                self.sh.cfg.policy.check_netns(ns.id(), "target.netns")?;
                let (id, req) = target::implicit_enrolment(self.sh.host.as_ref(), &path, &ns)?;
                self.enrol(&id, req, EnrolSource::Netns)?;
                Ok(id)
            }
        }
    }

    /// Engines that died on their own (a killed holder: its queue's
    /// `bypass` passes traffic meanwhile) are started again with the
    /// sandbox's faults and their remaining time.
    fn restart_lost_engines(&mut self) {
        for kind in BackendKind::ALL {
            for sb in self.backend(kind).lost_sandboxes() {
                match self.sync(&sb, kind) {
                    Ok(()) => {
                        tracing::info!(sandbox = %sb, backend = kind.as_str(), "engine restarted")
                    }
                    Err(e) => {
                        tracing::error!(sandbox = %sb, backend = kind.as_str(), error = %e, "restarting an engine failed")
                    }
                }
            }
        }
    }

    /// Reconcile at start (see `reconcile`): forgets sandboxes whose netns
    /// is gone, marks faults past their deadline expired, then syncs every
    /// backend of every sandbox.
    fn reconcile(&mut self) -> Result<(), AgentError> {
        let live = reconcile::settle_records(&mut self.lock(), netfault_ebpf::boottime_ns());
        for id in live {
            let mut failed = None;
            for kind in BackendKind::ALL {
                if let Err(e) = self.sync(&id, kind) {
                    failed = Some(e);
                    break;
                }
                crate::crash::backend_point("reconcile.synced", kind);
            }
            // One sandbox that cannot be put back (its interface went with
            // a CNI DEL the previous agent did not finish) must not keep
            // the agent from starting: it is released, as DEL would.
            if let Some(e) = failed {
                tracing::error!(sandbox = %id, error = %e, "cannot restore the sandbox at start; releasing it");
                if let Err(e) = self.release(&id) {
                    tracing::error!(sandbox = %id, error = %e, "releasing it failed");
                }
            }
        }
        self.sh.persist()
    }

    /// After a hand-over that froze this agent and ended without a commit:
    /// the new agent may have switched diversions to its own programs,
    /// queues or listeners before it died. Every backend forgets what it
    /// trusted to be its own, and every sandbox is synced again.
    fn reclaim(&mut self) {
        self.b.reclaim();
        let ids: Vec<SandboxId> = self.lock().sandboxes.keys().cloned().collect();
        for id in ids {
            for kind in BackendKind::ALL {
                if let Err(e) = self.sync(&id, kind) {
                    tracing::error!(sandbox = %id, backend = %kind.as_str(), error = %e, "reclaiming after a hand-over that did not complete");
                }
            }
        }
        tracing::info!("reclaimed every sandbox after a hand-over that did not complete");
    }

    fn reap(&mut self) -> Result<Option<Duration>, AgentError> {
        self.restart_lost_engines();
        let now = netfault_ebpf::boottime_ns();
        // Counters first: the snapshot is taken before the backend forgets.
        let due: Vec<(FaultId, SandboxId, BackendKind)> = {
            let mut st = self.lock();
            let due: Vec<(FaultId, SandboxId, BackendKind)> = st
                .faults
                .values()
                .filter(|f| !f.expired && f.deadline_boot_ns <= now)
                .map(|f| (f.id.clone(), f.sandbox.clone(), f.backend()))
                .collect();
            for (id, ..) in &due {
                let counters = st.readers.remove(id).map(|r| r.read()).unwrap_or_default();
                if let Some(f) = st.faults.get_mut(id) {
                    f.expired = true;
                    f.final_counters = counters;
                }
                tracing::info!(fault = %id, "fault expired");
            }
            due
        };
        for (id, ..) in &due {
            self.notify(NoticeKind::Expired, id);
        }
        let mut touched: Vec<(SandboxId, BackendKind)> =
            due.iter().map(|(_, sb, k)| (sb.clone(), *k)).collect();
        touched.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        touched.dedup();
        for (sb, kind) in &touched {
            self.sync(sb, *kind)?;
        }
        for (id, _, kind) in &due {
            self.backend(*kind).forget_fault(id);
        }
        let retain_ms = self.sh.cfg.retain_expired.as_millis() as u64;
        let wall = state::now_ms();
        let purged = {
            let mut st = self.lock();
            let before = st.faults.len();
            st.faults
                .retain(|_, f| !f.expired || f.expires_at_ms + retain_ms > wall);
            before != st.faults.len()
        };
        if purged {
            // Implicit sandboxes whose last (expired) fault was just purged:
            // a fault that expired now stays listed, so only a purge can
            // leave a sandbox without faults.
            let implicit: Vec<SandboxId> = self
                .lock()
                .sandboxes
                .values()
                .filter(|s| s.implicit)
                .map(|s| s.id.clone())
                .collect();
            for sb in &implicit {
                self.settle(sb);
            }
        }
        if !touched.is_empty() || purged {
            self.sh.persist()?;
        }
        let st = self.lock();
        let next = st
            .faults
            .values()
            .filter(|f| !f.expired)
            .map(|f| f.deadline_boot_ns.saturating_sub(now))
            .min();
        Ok(next.map(Duration::from_nanos))
    }
}

/// The sandbox's annotations with their `netfault.io/*` entries replaced by
/// those of `pod_now` (the others are kept as enrolled).
fn merge_netfault_annotations(
    enrolled: &BTreeMap<String, String>,
    pod_now: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    enrolled
        .iter()
        .filter(|(k, _)| !state::is_netfault_key(k))
        .chain(pod_now.iter().filter(|(k, _)| state::is_netfault_key(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether an enrolled sandbox's pod is `pod`: same namespace and name, and
/// the same uid when both know it.
fn same_pod(enrolled: &PodRef, pod: &PodRef) -> bool {
    enrolled.namespace == pod.namespace
        && enrolled.name == pod.name
        && (enrolled.uid.is_empty() || pod.uid.is_empty() || enrolled.uid == pod.uid)
}

/// [`Core::sync`] for a backend of action type `A`: hands it the sandbox's
/// live faults of that type, then records what it keeps (memos, counter
/// readers), whatever the outcome.
fn sync_with<A: BackendAction>(
    sh: &Shared,
    backend: &mut dyn Backend<Action = A>,
    sandbox: &SandboxId,
) -> Result<(), AgentError> {
    let now = netfault_ebpf::boottime_ns();
    let (rec, mut listed) = {
        let st = sh.lock();
        let Some(rec) = st.sandboxes.get(sandbox).cloned() else {
            return Ok(());
        };
        let listed: Vec<(FaultId, FaultSpec, u64, Option<u32>)> = st
            .live_faults(sandbox, A::KIND, now)
            .into_iter()
            .map(|f| (f.id.clone(), f.spec.clone(), f.deadline_boot_ns, f.memo))
            .collect();
        (rec, listed)
    };
    let ns = Netns::open_if_same(Path::new(&rec.netns), rec.netns_id)
        .map_err(|e| internal("opening the sandbox's netns")(e.to_string()))?;
    let mut memo = rec.memo;
    let result = {
        let mut active: Vec<ActiveFault<'_, A>> = listed
            .iter_mut()
            .filter_map(|(id, spec, deadline, m)| {
                Some(ActiveFault {
                    action: A::of(&spec.action)?,
                    id,
                    spec,
                    deadline_boot_ns: *deadline,
                    remaining: Duration::from_nanos(deadline.saturating_sub(now)),
                    memo: m,
                })
            })
            .collect();
        backend.sync(&rec.ctx(ns.as_ref()), &mut memo, &mut active)
    };
    let readers: Vec<(FaultId, CounterReader)> = listed
        .iter()
        .filter_map(|(id, ..)| Some((id.clone(), backend.counters(id)?)))
        .collect();
    let mut st = sh.lock();
    if let Some(r) = st.sandboxes.get_mut(sandbox) {
        r.memo = memo;
    }
    for (id, _, _, m) in &listed {
        if let Some(f) = st.faults.get_mut(id) {
            f.memo = *m;
        }
    }
    st.readers.extend(readers);
    result.map_err(AgentError::from)
}

/// [`Core::admit`] for a backend of action type `A`.
fn admit_with<A: BackendAction>(
    backend: &dyn Backend<Action = A>,
    st: &State,
    sandbox: &SandboxId,
    action: &A,
    now: u64,
) -> Result<(), FieldError> {
    let active: Vec<&A> = st
        .live_faults(sandbox, A::KIND, now)
        .into_iter()
        .filter_map(|f| A::of(&f.spec.action))
        .collect();
    backend.admit(action, &active)
}
