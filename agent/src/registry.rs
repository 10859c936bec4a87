//! The sandbox registry and fault reconciler: the agent's source of truth.
//!
//! What it owns: enrolled sandboxes, faults and their compiled datapath rules,
//! the persisted state file, and bringing the kernel in line with that state
//! (at start, on every change, and when faults expire).
//! What it must not do: speak HTTP (see `server`) or enter a namespace other
//! than through `netns::run_in`.
//!
//! Datapath programs are attached to a sandbox only while it has an active
//! fault, so removing the last fault restores the namespace exactly as it was
//! (no qdisc, no filter). Birth-time faults from annotations are installed
//! during CNI ADD, before the pod's containers start: from its first packet.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netfault_api::spec::{faults_from_annotations, BackendKind, DelayAction};
use netfault_api::{
    Action, Counters, EnrolRequest, ErrorCode, Fault, FaultSpec, FieldError, Limits, PodRef,
    Sandbox, Target,
};
use netfault_ebpf::{Attachment, Datapath, RawRule, MAX_SANDBOXES, RULES_PER_SANDBOX};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::nfqueue::{DelayEngine, DelayFault};
use crate::backend::proxy::{ProxyEngine, ProxyFault};
use crate::sys::netns::{self, NetnsError, NetnsId};

/// Why a request failed; maps onto an HTTP status and the error body.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    NotFound(FieldError),
    #[error("{0}")]
    Conflict(FieldError),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn status(&self) -> u16 {
        match self {
            AgentError::Invalid(e) if e.code == ErrorCode::Unsupported => 422,
            AgentError::Invalid(_) => 400,
            AgentError::NotFound(_) => 404,
            AgentError::Conflict(_) => 409,
            AgentError::Internal(_) => 500,
        }
    }

    pub fn field_error(&self) -> FieldError {
        match self {
            AgentError::Invalid(e) | AgentError::NotFound(e) | AgentError::Conflict(e) => e.clone(),
            AgentError::Internal(m) => FieldError::new(ErrorCode::Internal, "", m),
        }
    }
}

impl From<FieldError> for AgentError {
    fn from(e: FieldError) -> Self {
        AgentError::Invalid(e)
    }
}

fn internal(what: &str) -> impl FnOnce(String) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub max_duration: Duration,
    /// How long expired faults stay listed.
    pub retain_expired: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxRecord {
    id: String,
    netns: String,
    netns_id: NetnsId,
    ifname: String,
    ips: Vec<String>,
    pod: Option<PodRef>,
    annotations: BTreeMap<String, String>,
    enrolled_at_ms: u64,
    birth_faults: Vec<String>,
    annotation_error: Option<String>,
    slot: u32,
    /// Addresses bound to `slot` in the datapath.
    addresses: Vec<IpAddr>,
    /// Enrolled implicitly by a `{"netns": path}` target; released with its last fault.
    implicit: bool,
    /// Present while the datapath is attached.
    attachment: Option<AttachmentRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct AttachmentRecord {
    created_clsact: bool,
}

impl From<AttachmentRecord> for Attachment {
    fn from(a: AttachmentRecord) -> Self {
        Attachment {
            created_clsact: a.created_clsact,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FaultRecord {
    id: String,
    sandbox: String,
    spec: Value,
    created_at_ms: u64,
    expires_at_ms: u64,
    deadline_boot_ns: u64,
    rule: u32,
    expired: bool,
    /// Counters frozen when the fault expired.
    final_counters: Counters,
    /// Served by the NFQUEUE delay engine rather than an eBPF rule (`rule`
    /// is then meaningless).
    #[serde(default)]
    nfqueue: bool,
    /// Served by the transparent proxy (`l7`).
    #[serde(default)]
    proxy: bool,
}

impl FaultRecord {
    /// An eBPF datapath rule (`rule` is its slot).
    fn is_ebpf(&self) -> bool {
        !self.nfqueue && !self.proxy
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    sandboxes: BTreeMap<String, SandboxRecord>,
    faults: BTreeMap<String, FaultRecord>,
}

struct Inner {
    state: StateFile,
    dp: Datapath,
    delay: DelayEngine,
    proxy: ProxyEngine,
}

fn parse_stored(spec: &Value) -> Result<FaultSpec, AgentError> {
    FaultSpec::parse(
        spec,
        &Limits {
            max_duration: Duration::MAX,
            target_required: true,
        },
    )
    .map_err(|e| internal("re-reading a stored fault")(e.to_string()))
}

impl Inner {
    /// The sandbox's delay-backend faults that are still before their deadline.
    fn delay_faults(&self, sandbox: &str) -> Result<Vec<DelayFault>, AgentError> {
        let now = netfault_ebpf::boottime_ns();
        self.state
            .faults
            .values()
            .filter(|f| f.sandbox == sandbox && f.nfqueue && !f.expired && f.deadline_boot_ns > now)
            .map(|f| {
                Ok(DelayFault {
                    id: f.id.clone(),
                    spec: parse_stored(&f.spec)?,
                    remaining: Duration::from_nanos(f.deadline_boot_ns - now),
                })
            })
            .collect()
    }

    /// Brings the sandbox's nft table and queue in line with its delay faults.
    fn sync_delay(&mut self, sandbox: &str) -> Result<(), AgentError> {
        let Some(sb) = self.state.sandboxes.get(sandbox) else {
            return Ok(());
        };
        let path = PathBuf::from(&sb.netns);
        let faults = self.delay_faults(sandbox)?;
        self.delay
            .apply(sandbox, &path, &faults)
            .map_err(|e| internal("applying the delay faults")(e.to_string()))
    }

    /// The sandbox's proxy faults that are still before their deadline.
    fn proxy_faults(&self, sandbox: &str) -> Result<Vec<ProxyFault>, AgentError> {
        let now = netfault_ebpf::boottime_ns();
        self.state
            .faults
            .values()
            .filter(|f| f.sandbox == sandbox && f.proxy && !f.expired && f.deadline_boot_ns > now)
            .map(|f| {
                Ok(ProxyFault {
                    id: f.id.clone(),
                    spec: parse_stored(&f.spec)?,
                    remaining: Duration::from_nanos(f.deadline_boot_ns - now),
                })
            })
            .collect()
    }

    /// Brings the sandbox's proxy (listeners, diversion, rules) in line with
    /// its proxy faults.
    fn sync_proxy(&mut self, sandbox: &str) -> Result<(), AgentError> {
        let Some(sb) = self.state.sandboxes.get(sandbox) else {
            return Ok(());
        };
        let path = PathBuf::from(&sb.netns);
        let local = sb.addresses.clone();
        let faults = self.proxy_faults(sandbox)?;
        self.proxy
            .apply(sandbox, &path, &local, &faults)
            .map_err(|e| internal("applying the proxy faults")(e.to_string()))
    }

    fn bind(&mut self, sb: &SandboxRecord) -> Result<(), AgentError> {
        for a in &sb.addresses {
            self.dp
                .bind_address(*a, sb.slot)
                .map_err(|e| internal("binding a sandbox address")(e.to_string()))?;
        }
        Ok(())
    }

    fn unbind(&mut self, sb: &SandboxRecord) -> Result<(), AgentError> {
        for a in &sb.addresses {
            self.dp
                .unbind_address(*a)
                .map_err(|e| internal("unbinding a sandbox address")(e.to_string()))?;
        }
        Ok(())
    }
}

pub struct Registry {
    cfg: Config,
    inner: Mutex<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn new_id() -> String {
    let r: u64 = rand::random();
    format!("f-{r:016x}")
}

fn netns_err(e: NetnsError) -> AgentError {
    AgentError::Internal(e.to_string())
}

/// Work done inside a sandbox's netns when binding it: the interface's own
/// addresses, which the datapath keys the sandbox's packets on.
fn addresses_in(path: &Path, ifname: &str) -> Result<Result<Vec<IpAddr>, String>, NetnsError> {
    let ifname = ifname.to_string();
    netns::run_in(path, move || {
        if nix::net::if_::if_nametoindex(ifname.as_str()).is_err() {
            return Err(format!("interface {ifname:?} does not exist in the netns"));
        }
        netfault_ebpf::addresses_here(&ifname).map_err(|e| e.to_string())
    })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

impl Registry {
    /// Loads the datapath and the persisted state, and reconciles the kernel
    /// with it: faults still before their deadline are re-installed on the
    /// new programs (atomically replacing the old filters), the rest are
    /// marked expired and their filters removed.
    /// Connections the transparent proxy serves now, over every sandbox.
    pub fn proxy_open_connections(&self) -> u64 {
        self.lock().proxy.open_connections()
    }

    pub fn open(cfg: Config) -> Result<Registry, AgentError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            AgentError::Internal(format!("creating {}: {e}", cfg.state_dir.display()))
        })?;
        let dp =
            Datapath::load().map_err(|e| internal("loading the eBPF datapath")(e.to_string()))?;
        let path = cfg.state_dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    let aside = cfg.state_dir.join("state.json.corrupt");
                    tracing::error!(error = %e, "state file is unreadable; moved aside to {}", aside.display());
                    let _ = std::fs::rename(&path, aside);
                    StateFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "reading {}: {e}",
                    path.display()
                )))
            }
        };
        let reg = Registry {
            cfg,
            inner: Mutex::new(Inner {
                state,
                dp,
                delay: DelayEngine::default(),
                proxy: ProxyEngine::default(),
            }),
        };
        reg.reconcile_all()?;
        Ok(reg)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves state that is still
        // consistent on disk; keep serving rather than poisoning forever.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, inner: &Inner) -> Result<(), AgentError> {
        let path = self.cfg.state_dir.join("state.json");
        let tmp = self.cfg.state_dir.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(&inner.state)
            .map_err(|e| internal("serializing state")(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| internal("writing state")(e.to_string()))
    }

    fn reconcile_all(&self) -> Result<(), AgentError> {
        let mut inner = self.lock();
        let now = netfault_ebpf::boottime_ns();
        let ids: Vec<String> = inner.state.sandboxes.keys().cloned().collect();
        for id in ids {
            let Some(sb) = inner.state.sandboxes.get(&id).cloned() else {
                continue;
            };
            let path = PathBuf::from(&sb.netns);
            let same = matches!(netns::identify(&path), Ok(nid) if nid == sb.netns_id);
            if !same {
                tracing::warn!(sandbox = %id, netns = %sb.netns, "sandbox's netns is gone; forgetting it");
                inner.state.sandboxes.remove(&id);
                inner.state.faults.retain(|_, f| f.sandbox != id);
                continue;
            }
            inner.bind(&sb)?;
            let mut active = 0;
            let faults: Vec<FaultRecord> = inner
                .state
                .faults
                .values()
                .filter(|f| f.sandbox == id && !f.expired)
                .cloned()
                .collect();
            for f in faults {
                if f.deadline_boot_ns <= now {
                    if let Some(rec) = inner.state.faults.get_mut(&f.id) {
                        rec.expired = true;
                    }
                    continue;
                }
                if !f.is_ebpf() {
                    continue;
                }
                let spec = parse_stored(&f.spec)?;
                let raw = RawRule::compile(&spec, f.deadline_boot_ns).ok_or_else(|| {
                    AgentError::Internal("a stored fault no longer compiles".into())
                })?;
                inner
                    .dp
                    .set_rule(sb.slot, f.rule, &raw)
                    .map_err(|e| internal("re-installing a rule")(e.to_string()))?;
                active += 1;
            }
            if active > 0 {
                let fds = inner.dp.program_fds();
                let ifname = sb.ifname.clone();
                let att = netns::run_in(&path, move || netfault_ebpf::attach_here(fds, &ifname))
                    .map_err(netns_err)?
                    .map_err(|e| internal("re-attaching the datapath")(e.to_string()))?;
                // Keep what the first attachment created: that is what to remove later.
                let created = sb
                    .attachment
                    .map(|a| a.created_clsact)
                    .unwrap_or(att.created_clsact);
                if let Some(rec) = inner.state.sandboxes.get_mut(&id) {
                    rec.attachment = Some(AttachmentRecord {
                        created_clsact: created,
                    });
                }
            } else if let Some(att) = sb.attachment {
                Self::detach(&sb, att)?;
                if let Some(rec) = inner.state.sandboxes.get_mut(&id) {
                    rec.attachment = None;
                }
            }
            // Re-installs live delay faults (new queue, fresh set timeouts),
            // or removes a table a previous agent left with none live; the
            // same for the proxy (new listeners, fresh leases).
            inner.sync_delay(&id)?;
            inner.sync_proxy(&id)?;
        }
        self.persist(&inner)
    }

    fn detach(sb: &SandboxRecord, att: AttachmentRecord) -> Result<(), AgentError> {
        let ifname = sb.ifname.clone();
        match netns::run_in(Path::new(&sb.netns), move || {
            netfault_ebpf::detach_here(&ifname, att.into())
        }) {
            Ok(r) => r.map_err(|e| internal("detaching the datapath")(e.to_string())),
            // The pod is gone, and its filters with it.
            Err(NetnsError::Gone { .. }) => Ok(()),
            Err(e) => Err(netns_err(e)),
        }
    }

    // ----- sandboxes -----

    pub fn enrol(&self, id: &str, req: EnrolRequest) -> Result<Sandbox, AgentError> {
        if !valid_id(id) {
            return Err(FieldError::invalid(
                "id",
                "sandbox id must be 1-256 characters of [A-Za-z0-9_.:-]",
            )
            .into());
        }
        if !req.netns.starts_with('/') {
            return Err(FieldError::invalid("netns", "must be an absolute path").into());
        }
        if req.ifname.is_empty() || req.ifname.len() > 15 {
            return Err(FieldError::invalid(
                "ifname",
                "must be an interface name of 1-15 characters",
            )
            .into());
        }
        for (i, ip) in req.ips.iter().enumerate() {
            let addr = ip.split('/').next().unwrap_or_default();
            if addr.parse::<IpAddr>().is_err() {
                return Err(FieldError::invalid(
                    &format!("ips[{i}]"),
                    &format!("{ip:?} is not an IP address"),
                )
                .into());
            }
        }
        let path = PathBuf::from(&req.netns);
        let netns_id =
            netns::identify(&path).map_err(|e| FieldError::invalid("netns", &e.to_string()))?;
        {
            let inner = self.lock();
            if let Some(sb) = inner.state.sandboxes.get(id) {
                if sb.netns_id == netns_id && sb.ifname == req.ifname {
                    return Ok(self.view_sandbox(sb));
                }
            }
        }
        // Same id, different namespace: the runtime reused the id; start over.
        if self.lock().state.sandboxes.contains_key(id) {
            self.release(id)?;
        }
        let mut addresses = addresses_in(&path, &req.ifname)
            .map_err(|e| FieldError::invalid("netns", &e.to_string()))?
            .map_err(|e| FieldError::invalid("ifname", &e))?;
        for ip in &req.ips {
            if let Ok(a) = ip.split('/').next().unwrap_or_default().parse::<IpAddr>() {
                if !addresses.contains(&a) {
                    addresses.push(a);
                }
            }
        }
        if addresses.is_empty() {
            return Err(FieldError::invalid(
                "ips",
                "the interface has no global address and none was given; faults could not match its packets",
            )
            .into());
        }
        // Parse birth-time faults before changing anything.
        let (birth_specs, annotation_error) = match faults_from_annotations(
            &req.annotations,
            self.cfg.max_duration,
        ) {
            Ok(specs) => (specs, None),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "invalid netfault annotations; no fault applied");
                (Vec::new(), Some(e.to_string()))
            }
        };
        {
            let mut inner = self.lock();
            let used: HashSet<u32> = inner.state.sandboxes.values().map(|s| s.slot).collect();
            let slot = (0..MAX_SANDBOXES)
                .find(|s| !used.contains(s))
                .ok_or_else(|| {
                    AgentError::Conflict(FieldError::conflict(
                        "id",
                        &format!("this agent serves at most {MAX_SANDBOXES} sandboxes"),
                    ))
                })?;
            if let Some((other, a)) = inner.state.sandboxes.values().find_map(|s| {
                s.addresses
                    .iter()
                    .find(|a| addresses.contains(a))
                    .map(|a| (s.id.clone(), *a))
            }) {
                return Err(AgentError::Conflict(FieldError::conflict(
                    "ips",
                    &format!("address {a} already belongs to sandbox {other:?}"),
                )));
            }
            let rec = SandboxRecord {
                id: id.to_string(),
                netns: req.netns.clone(),
                netns_id,
                ifname: req.ifname.clone(),
                ips: req.ips.clone(),
                pod: req.pod.clone(),
                annotations: req.annotations.clone(),
                enrolled_at_ms: now_ms(),
                birth_faults: Vec::new(),
                annotation_error,
                slot,
                addresses,
                implicit: false,
                attachment: None,
            };
            inner.bind(&rec)?;
            inner.state.sandboxes.insert(id.to_string(), rec);
            self.persist(&inner)?;
        }
        let mut birth = Vec::new();
        for spec in birth_specs {
            match self.install(id, spec) {
                Ok(f) => birth.push(f.id),
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %e, "birth-time fault failed");
                    let mut inner = self.lock();
                    if let Some(sb) = inner.state.sandboxes.get_mut(id) {
                        sb.annotation_error = Some(e.to_string());
                    }
                }
            }
        }
        let mut inner = self.lock();
        let sb = inner
            .state
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| AgentError::Internal("sandbox vanished during enrolment".into()))?;
        sb.birth_faults = birth;
        let view = self.view_sandbox(sb);
        self.persist(&inner)?;
        Ok(view)
    }

    /// Removes everything installed for the sandbox. Unknown ids are fine.
    pub fn release(&self, id: &str) -> Result<(), AgentError> {
        let mut inner = self.lock();
        let Some(sb) = inner.state.sandboxes.get(id).cloned() else {
            return Ok(());
        };
        let faults: Vec<FaultRecord> = inner
            .state
            .faults
            .values()
            .filter(|f| f.sandbox == id)
            .cloned()
            .collect();
        let had_delay = inner.delay.has(id) || faults.iter().any(|f| f.nfqueue);
        let had_proxy = inner.proxy.has(id) || faults.iter().any(|f| f.proxy);
        for f in faults {
            if !f.expired && f.is_ebpf() {
                inner
                    .dp
                    .clear_rule(sb.slot, f.rule)
                    .map_err(|e| internal("clearing a rule")(e.to_string()))?;
            }
            inner.delay.forget(&f.id);
            inner.proxy.forget(&f.id);
            inner.state.faults.remove(&f.id);
        }
        // The sandbox's netns is still the one it was enrolled with.
        let same = matches!(netns::identify(Path::new(&sb.netns)), Ok(n) if n == sb.netns_id);
        if had_proxy {
            if same {
                inner
                    .proxy
                    .release(id, Path::new(&sb.netns))
                    .map_err(|e| internal("removing the proxy diversion")(e.to_string()))?;
            } else {
                inner.proxy.close(id);
            }
        }
        if had_delay {
            if same {
                inner.sync_delay(id)?;
            } else {
                inner
                    .delay
                    .apply(id, Path::new("/nonexistent"), &[])
                    .map_err(|e| internal("closing the delay queue")(e.to_string()))?;
            }
        }
        if let Some(att) = sb.attachment {
            let same = matches!(netns::identify(Path::new(&sb.netns)), Ok(n) if n == sb.netns_id);
            if same {
                Self::detach(&sb, att)?;
            }
        }
        inner.unbind(&sb)?;
        inner.state.sandboxes.remove(id);
        self.persist(&inner)
    }

    /// Enrols sandboxes that the CNI plugin recorded while the agent was
    /// unreachable (`<socket dir>/pending/<id>.json`, an [`EnrolRequest`]).
    /// Pods whose netns is gone by now are dropped. Returns how many were
    /// enrolled.
    pub fn adopt_pending(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut adopted = 0;
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            let req = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<EnrolRequest>(&b).ok());
            match req {
                Some(req) if Path::new(&req.netns).exists() => match self.enrol(&id, req) {
                    Ok(_) => {
                        tracing::info!(sandbox = %id, "enrolled a pod created while the agent was down");
                        adopted += 1;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "could not enrol a pending pod")
                    }
                },
                _ => {
                    tracing::info!(sandbox = %id, "dropping a pending enrolment whose pod is gone")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        adopted
    }

    pub fn sandboxes(&self) -> Vec<Sandbox> {
        let inner = self.lock();
        inner
            .state
            .sandboxes
            .values()
            .map(|s| self.view_sandbox(s))
            .collect()
    }

    fn view_sandbox(&self, s: &SandboxRecord) -> Sandbox {
        Sandbox {
            id: s.id.clone(),
            netns: s.netns.clone(),
            ifname: s.ifname.clone(),
            ips: s.ips.clone(),
            pod: s.pod.clone(),
            annotations: s.annotations.clone(),
            enrolled_at_ms: s.enrolled_at_ms,
            birth_faults: s.birth_faults.clone(),
            annotation_error: s.annotation_error.clone(),
        }
    }

    // ----- faults -----

    /// Validates and installs a fault from an API body.
    pub fn create_fault(&self, body: &Value) -> Result<Fault, AgentError> {
        let spec = FaultSpec::parse(
            body,
            &Limits {
                max_duration: self.cfg.max_duration,
                target_required: true,
            },
        )?;
        let target = spec
            .target
            .clone()
            .ok_or_else(|| FieldError::missing("target"))?;
        let sandbox = self.resolve(&target)?;
        self.install(&sandbox, spec)
    }

    fn resolve(&self, target: &Target) -> Result<String, AgentError> {
        let inner = self.lock();
        match target {
            Target::Sandbox(id) => {
                if inner.state.sandboxes.contains_key(id) {
                    Ok(id.clone())
                } else {
                    Err(AgentError::NotFound(FieldError::not_found(
                        "target.sandbox",
                        &format!("no enrolled sandbox {id:?}"),
                    )))
                }
            }
            Target::Pod { namespace, name } => inner
                .state
                .sandboxes
                .values()
                .filter(|s| {
                    s.pod
                        .as_ref()
                        .is_some_and(|p| &p.namespace == namespace && &p.name == name)
                })
                .max_by_key(|s| s.enrolled_at_ms)
                .map(|s| s.id.clone())
                .ok_or_else(|| {
                    AgentError::NotFound(FieldError::not_found(
                        "target.pod",
                        &format!("no enrolled pod {namespace}/{name}"),
                    ))
                }),
            Target::Netns(path) => {
                let nid = netns::identify(Path::new(path))
                    .map_err(|e| FieldError::invalid("target.netns", &e.to_string()))?;
                if let Some(s) = inner.state.sandboxes.values().find(|s| s.netns_id == nid) {
                    return Ok(s.id.clone());
                }
                drop(inner);
                self.enrol_implicit(path, nid)
            }
        }
    }

    fn enrol_implicit(&self, path: &str, nid: NetnsId) -> Result<String, AgentError> {
        let ifname = netns::run_in(Path::new(path), netns::sole_interface_here)
            .map_err(|e| FieldError::invalid("target.netns", &e.to_string()))?
            .map_err(|e| FieldError::invalid("target.netns", &format!("{path} {e}")))?;
        let id = format!("netns-{}-{}", nid.dev, nid.ino);
        self.enrol(
            &id,
            EnrolRequest {
                netns: path.to_string(),
                ifname,
                ..Default::default()
            },
        )?;
        let mut inner = self.lock();
        if let Some(sb) = inner.state.sandboxes.get_mut(&id) {
            sb.implicit = true;
        }
        Ok(id)
    }

    fn install(&self, sandbox: &str, mut spec: FaultSpec) -> Result<Fault, AgentError> {
        let mut inner = self.lock();
        let sb = inner.state.sandboxes.get(sandbox).cloned().ok_or_else(|| {
            AgentError::NotFound(FieldError::not_found("target", "sandbox was released"))
        })?;
        if spec.target.is_none() {
            spec.target = Some(Target::Sandbox(sandbox.to_string()));
        }
        match spec.action.backend() {
            BackendKind::Nfqueue => return self.install_userspace(inner, &sb, spec, false),
            BackendKind::Proxy => return self.install_userspace(inner, &sb, spec, true),
            BackendKind::Ebpf => {}
        }
        let used: HashSet<u32> = inner
            .state
            .faults
            .values()
            .filter(|f| f.sandbox == sandbox && !f.expired && f.is_ebpf())
            .map(|f| f.rule)
            .collect();
        let rule = (0..RULES_PER_SANDBOX)
            .find(|r| !used.contains(r))
            .ok_or_else(|| {
                AgentError::Conflict(FieldError::conflict(
                    "target",
                    &format!("the sandbox already has {RULES_PER_SANDBOX} active packet faults"),
                ))
            })?;
        let now_boot = netfault_ebpf::boottime_ns();
        let deadline = now_boot.saturating_add(spec.duration.as_nanos() as u64);
        let raw = RawRule::compile(&spec, deadline).ok_or_else(|| {
            AgentError::Invalid(FieldError::unsupported(
                "action.type",
                &format!(
                    "action {:?} with these parameters is not available on this agent yet",
                    spec.action.type_name()
                ),
            ))
        })?;
        inner
            .dp
            .set_rule(sb.slot, rule, &raw)
            .map_err(|e| internal("installing the rule")(e.to_string()))?;
        if sb.attachment.is_none() {
            let fds = inner.dp.program_fds();
            let ifname = sb.ifname.clone();
            let attached = netns::run_in(Path::new(&sb.netns), move || {
                netfault_ebpf::attach_here(fds, &ifname)
            })
            .map_err(netns_err)
            .and_then(|r| r.map_err(|e| internal("attaching the datapath")(e.to_string())));
            match attached {
                Ok(att) => {
                    if let Some(rec) = inner.state.sandboxes.get_mut(sandbox) {
                        rec.attachment = Some(AttachmentRecord {
                            created_clsact: att.created_clsact,
                        });
                    }
                }
                Err(e) => {
                    let _ = inner.dp.clear_rule(sb.slot, rule);
                    return Err(e);
                }
            }
        }
        let created = now_ms();
        let rec = FaultRecord {
            id: new_id(),
            sandbox: sandbox.to_string(),
            spec: spec.to_json(),
            created_at_ms: created,
            expires_at_ms: created + spec.duration.as_millis() as u64,
            deadline_boot_ns: deadline,
            rule,
            expired: false,
            final_counters: Counters::default(),
            nfqueue: false,
            proxy: false,
        };
        let view = view_fault(&inner, &rec);
        inner.state.faults.insert(rec.id.clone(), rec);
        self.persist(&inner)?;
        tracing::info!(fault = %view.id, sandbox = %sandbox, action = %view.spec["action"]["type"], "fault installed");
        Ok(view)
    }

    /// Installs a fault served in user space: a delay or reorder fault (the
    /// sandbox's delay table and queue take it), or with `proxy`, an L4/L7
    /// fault (the sandbox's proxy takes it).
    fn install_userspace(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        sb: &SandboxRecord,
        spec: FaultSpec,
        proxy: bool,
    ) -> Result<Fault, AgentError> {
        if let Action::Delay(DelayAction::Reorder { latency: None, .. }) = spec.action {
            let now = netfault_ebpf::boottime_ns();
            let has_delay = inner.state.faults.values().any(|f| {
                f.sandbox == sb.id
                    && f.nfqueue
                    && !f.expired
                    && f.deadline_boot_ns > now
                    && f.spec["action"]["type"] == "delay"
            });
            if !has_delay {
                return Err(AgentError::Invalid(FieldError::unsupported(
                    "action.latency",
                    "reorder needs a latency: give action.latency, or first add a delay fault to this sandbox whose delay the in-order packets get",
                )));
            }
        }
        let now_boot = netfault_ebpf::boottime_ns();
        let deadline = now_boot.saturating_add(spec.duration.as_nanos() as u64);
        let created = now_ms();
        let rec = FaultRecord {
            id: new_id(),
            sandbox: sb.id.clone(),
            spec: spec.to_json(),
            created_at_ms: created,
            expires_at_ms: created + spec.duration.as_millis() as u64,
            deadline_boot_ns: deadline,
            rule: u32::MAX,
            expired: false,
            final_counters: Counters::default(),
            nfqueue: !proxy,
            proxy,
        };
        let id = rec.id.clone();
        inner.state.faults.insert(id.clone(), rec);
        let synced = if proxy {
            inner.sync_proxy(&sb.id)
        } else {
            inner.sync_delay(&sb.id)
        };
        if let Err(e) = synced {
            inner.state.faults.remove(&id);
            // Put things back as they were without this fault.
            if proxy {
                inner.proxy.forget(&id);
                let _ = inner.sync_proxy(&sb.id);
            } else {
                inner.delay.forget(&id);
                let _ = inner.sync_delay(&sb.id);
            }
            return Err(e);
        }
        let view = inner
            .state
            .faults
            .get(&id)
            .map(|f| view_fault(&inner, f))
            .ok_or_else(|| AgentError::Internal("fault vanished during install".into()))?;
        self.persist(&inner)?;
        tracing::info!(fault = %view.id, sandbox = %sb.id, action = %view.spec["action"]["type"], backend = %view.backend, "fault installed");
        Ok(view)
    }

    /// What this node supports (`GET /v1/capabilities`).
    pub fn capabilities(&self) -> Value {
        let samples = [
            ("loss", serde_json::json!({"type": "loss", "percent": 10})),
            ("blackhole", serde_json::json!({"type": "blackhole"})),
            (
                "corrupt",
                serde_json::json!({"type": "corrupt", "percent": 10}),
            ),
            (
                "duplicate",
                serde_json::json!({"type": "duplicate", "percent": 10}),
            ),
            ("rate", serde_json::json!({"type": "rate", "rate": "1mbit"})),
        ];
        let ebpf: Vec<&str> = samples
            .iter()
            .filter(|(_, action)| {
                let body = serde_json::json!({
                    "target": {"sandbox": "x"}, "action": action, "duration": "1s"
                });
                FaultSpec::parse(
                    &body,
                    &Limits {
                        max_duration: Duration::MAX,
                        target_required: true,
                    },
                )
                .ok()
                .and_then(|spec| RawRule::compile(&spec, u64::MAX))
                .is_some()
            })
            .map(|(name, _)| *name)
            .collect();
        crate::backend::nfqueue::caps::capabilities(&ebpf)
    }

    pub fn faults(&self) -> Vec<Fault> {
        let inner = self.lock();
        inner
            .state
            .faults
            .values()
            .map(|f| view_fault(&inner, f))
            .collect()
    }

    pub fn fault(&self, id: &str) -> Result<Fault, AgentError> {
        let inner = self.lock();
        inner
            .state
            .faults
            .get(id)
            .map(|f| view_fault(&inner, f))
            .ok_or_else(|| {
                AgentError::NotFound(FieldError::not_found("id", &format!("no fault {id:?}")))
            })
    }

    /// Removes a fault; unknown ids are fine.
    pub fn delete_fault(&self, id: &str) -> Result<(), AgentError> {
        let mut inner = self.lock();
        let Some(f) = inner.state.faults.remove(id) else {
            return Ok(());
        };
        let slot = inner.state.sandboxes.get(&f.sandbox).map(|s| s.slot);
        if f.nfqueue {
            inner.delay.forget(&f.id);
            if !f.expired {
                inner.sync_delay(&f.sandbox)?;
            }
        } else if f.proxy {
            inner.proxy.forget(&f.id);
            if !f.expired {
                inner.sync_proxy(&f.sandbox)?;
            }
        } else if let (false, Some(slot)) = (f.expired, slot) {
            inner
                .dp
                .clear_rule(slot, f.rule)
                .map_err(|e| internal("clearing the rule")(e.to_string()))?;
        }
        self.settle(&mut inner, &f.sandbox)?;
        self.persist(&inner)
    }

    /// Detaches the datapath from a sandbox with no active fault, and
    /// releases implicit sandboxes that have nothing left.
    fn settle(&self, inner: &mut Inner, sandbox: &str) -> Result<(), AgentError> {
        let active_ebpf = inner
            .state
            .faults
            .values()
            .any(|f| f.sandbox == sandbox && !f.expired && f.is_ebpf());
        let active_any = inner
            .state
            .faults
            .values()
            .any(|f| f.sandbox == sandbox && !f.expired);
        let Some(sb) = inner.state.sandboxes.get(sandbox).cloned() else {
            return Ok(());
        };
        if active_ebpf {
            return Ok(());
        }
        if let Some(att) = sb.attachment {
            Self::detach(&sb, att)?;
            if let Some(rec) = inner.state.sandboxes.get_mut(sandbox) {
                rec.attachment = None;
            }
        }
        if active_any {
            return Ok(());
        }
        if sb.implicit && !inner.state.faults.values().any(|f| f.sandbox == sandbox) {
            if inner.delay.has(sandbox) {
                inner.sync_delay(sandbox)?;
            }
            if inner.proxy.has(sandbox) {
                inner.sync_proxy(sandbox)?;
            }
            inner.unbind(&sb)?;
            inner.state.sandboxes.remove(sandbox);
        }
        Ok(())
    }

    /// Marks faults past their deadline expired (the kernel already stopped
    /// applying them), frees their rules and detaches idle sandboxes.
    /// Returns the time until the next deadline, for the caller's sleep.
    pub fn reap(&self) -> Result<Option<Duration>, AgentError> {
        let mut inner = self.lock();
        let now = netfault_ebpf::boottime_ns();
        let due: Vec<FaultRecord> = inner
            .state
            .faults
            .values()
            .filter(|f| !f.expired && f.deadline_boot_ns <= now)
            .cloned()
            .collect();
        let mut touched = Vec::new();
        for f in &due {
            let slot = inner.state.sandboxes.get(&f.sandbox).map(|s| s.slot);
            let mut counters = Counters::default();
            if f.nfqueue {
                counters = inner.delay.counters(&f.id).unwrap_or_default();
                inner.delay.forget(&f.id);
            } else if f.proxy {
                counters = inner.proxy.counters(&f.id).unwrap_or_default();
                inner.proxy.forget(&f.id);
            } else if let Some(slot) = slot {
                if let Ok(c) = inner.dp.counters(slot, f.rule) {
                    counters = Counters {
                        matched: c.matched,
                        dropped: c.dropped,
                        affected: c.affected,
                    };
                }
                inner
                    .dp
                    .clear_rule(slot, f.rule)
                    .map_err(|e| internal("clearing an expired rule")(e.to_string()))?;
            }
            if let Some(rec) = inner.state.faults.get_mut(&f.id) {
                rec.expired = true;
                rec.final_counters = counters;
            }
            tracing::info!(fault = %f.id, "fault expired");
            touched.push(f.sandbox.clone());
        }
        let retain_ms = self.cfg.retain_expired.as_millis() as u64;
        let wall = now_ms();
        let before = inner.state.faults.len();
        inner
            .state
            .faults
            .retain(|_, f| !f.expired || f.expires_at_ms + retain_ms > wall);
        let purged = before != inner.state.faults.len();
        touched.sort();
        touched.dedup();
        for sb in &touched {
            let delay_touched = due.iter().any(|f| f.nfqueue && &f.sandbox == sb);
            if delay_touched {
                inner.sync_delay(sb)?;
            }
            if due.iter().any(|f| f.proxy && &f.sandbox == sb) {
                inner.sync_proxy(sb)?;
            }
            self.settle(&mut inner, sb)?;
        }
        if !touched.is_empty() || purged {
            self.persist(&inner)?;
        }
        let next = inner
            .state
            .faults
            .values()
            .filter(|f| !f.expired)
            .map(|f| f.deadline_boot_ns.saturating_sub(now))
            .min();
        Ok(next.map(Duration::from_nanos))
    }
}

fn view_fault(inner: &Inner, f: &FaultRecord) -> Fault {
    // The kernel stops applying a rule at its deadline even before the reaper runs.
    let expired = f.expired || f.deadline_boot_ns <= netfault_ebpf::boottime_ns();
    let counters = if f.expired {
        f.final_counters
    } else if f.nfqueue {
        inner.delay.counters(&f.id).unwrap_or_default()
    } else if f.proxy {
        inner.proxy.counters(&f.id).unwrap_or_default()
    } else {
        inner
            .state
            .sandboxes
            .get(&f.sandbox)
            .and_then(|s| inner.dp.counters(s.slot, f.rule).ok())
            .map(|c| Counters {
                matched: c.matched,
                dropped: c.dropped,
                affected: c.affected,
            })
            .unwrap_or_default()
    };
    Fault {
        id: f.id.clone(),
        sandbox: f.sandbox.clone(),
        state: if expired { "expired" } else { "active" }.to_string(),
        spec: f.spec.clone(),
        created_at_ms: f.created_at_ms,
        expires_at_ms: f.expires_at_ms,
        backend: if f.nfqueue {
            "nfqueue"
        } else if f.proxy {
            "proxy"
        } else {
            "ebpf-tc"
        }
        .to_string(),
        counters,
    }
}
