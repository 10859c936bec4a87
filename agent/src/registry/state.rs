//! The registry's records: what is enrolled, which faults exist, and what
//! each backend keeps per sandbox and per fault. Typed in memory; the
//! serialized form is the state file's (see `persist`), which older agents
//! wrote too.
//! What it must not do: touch the kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use netfault_api::{
    BackendKind, Counters, EnrolSource, Fault, FaultSource, FaultSpec, PodRef, Sandbox,
};
use netfault_sys::netns::Netns;
pub use netfault_sys::netns::NetnsId;
use serde::{Deserialize, Serialize};

use crate::backend::{CounterReader, SandboxCtx, SandboxMemo};

pub use crate::ids::{FaultId, SandboxId};

/// Whether a fault still acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultState {
    Active,
    Expired,
}

impl FaultState {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultState::Active => "active",
            FaultState::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub netns: String,
    pub netns_id: NetnsId,
    pub ifname: String,
    pub ips: Vec<String>,
    pub pod: Option<PodRef>,
    pub annotations: BTreeMap<String, String>,
    pub enrolled_at_ms: u64,
    pub birth_faults: Vec<FaultId>,
    pub annotation_error: Option<String>,
    /// The sandbox's block of eBPF rules.
    pub slot: u32,
    /// The pod's own addresses, which the datapath keys its packets on.
    pub addresses: Vec<IpAddr>,
    /// Enrolled implicitly by a `{"netns": path}` target; released with its last fault.
    pub implicit: bool,
    /// How it was enrolled. Older agents' files lack it: see [`SandboxRecord::settle_source`].
    #[serde(default)]
    pub source: EnrolSource,
    /// Digest of the `netfault.io/*` annotations that produced the
    /// sandbox's annotation faults (see [`annotation_digest`]): the same set
    /// seen again (a re-list, an agent restart) changes nothing. Older
    /// agents' files lack it: it is then the digest of `annotations`.
    #[serde(default)]
    pub annotation_digest: Option<String>,
    /// Enrolled (and saved) with birth-time faults not yet installed: an
    /// agent that died in between left them to the next enrolment of the
    /// same sandbox (the CNI plugin's pending file, or a CRI adoption).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub birth_pending: bool,
    /// What the backends keep across restarts (`attachment`).
    #[serde(flatten)]
    pub memo: SandboxMemo,
}

/// A stable digest (64-bit FNV-1a, hex) of the `netfault.io/*` entries of
/// `annotations`, in key order; other annotations do not count.
pub fn annotation_digest(annotations: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (k, v) in annotations.iter().filter(|(k, _)| is_netfault_key(k)) {
        eat(k.as_bytes());
        eat(&[0]);
        eat(v.as_bytes());
        eat(&[0xff]);
    }
    format!("{h:016x}")
}

/// Whether an annotation key is netfault's.
pub fn is_netfault_key(key: &str) -> bool {
    key.starts_with("netfault.io/")
}

impl SandboxRecord {
    /// The pod it belongs to, if the runtime named one (Events go there).
    pub fn pod_ref(&self) -> Option<PodRef> {
        self.pod.clone().filter(|p| !p.name.is_empty())
    }

    /// The sandbox as its backends see it, in `netns` (`None`: gone).
    pub fn ctx<'a>(&'a self, netns: Option<&'a Netns>) -> SandboxCtx<'a> {
        SandboxCtx {
            id: &self.id,
            netns,
            ifname: &self.ifname,
            addresses: &self.addresses,
            slot: self.slot,
        }
    }

    /// A record from an older agent's file has no `source`: it was enrolled
    /// implicitly (`netns`) or through the API (`cni`, the default).
    pub fn settle_source(&mut self) {
        if self.implicit && self.source == EnrolSource::Cni {
            self.source = EnrolSource::Netns;
        }
    }

    pub fn view(&self) -> Sandbox {
        Sandbox {
            id: self.id.to_string(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            ips: self.ips.clone(),
            pod: self.pod.clone(),
            annotations: self.annotations.clone(),
            enrolled_at_ms: self.enrolled_at_ms,
            birth_faults: self.birth_faults.iter().map(ToString::to_string).collect(),
            annotation_error: self.annotation_error.clone(),
            source: self.source,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    pub id: FaultId,
    pub sandbox: SandboxId,
    pub spec: FaultSpec,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub deadline_boot_ns: u64,
    /// The backend's per-fault slot (the eBPF rule index); `u32::MAX` in
    /// the file for none, as older agents wrote it.
    #[serde(rename = "rule", with = "rule_memo")]
    pub memo: Option<u32>,
    pub expired: bool,
    /// Counters frozen when the fault expired.
    pub final_counters: Counters,
    /// Older agents' backend flags: written so that an older agent can read
    /// the file after a downgrade; the backend is the action's.
    #[serde(default)]
    pub nfqueue: bool,
    #[serde(default)]
    pub proxy: bool,
    /// Where it came from. Older agents' files lack it: `api`, except the
    /// sandboxes' birth faults (see `persist`).
    #[serde(default)]
    pub source: FaultSource,
    /// The NetworkFault (uid and generation) a `resource` fault belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ResourceOwner>,
}

/// The NetworkFault generation that created a fault (see `resource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceOwner {
    pub uid: String,
    pub generation: i64,
}

/// What the agent keeps of a NetworkFault it reconciles (see `resource`),
/// persisted so that a restarted agent keeps the same duration and does
/// not re-apply what already ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The `metadata.generation` the record (and its faults) reflect.
    pub generation: i64,
    /// Wall-clock ms the resource's duration starts from for this generation.
    pub anchor_ms: u64,
    /// `anchor_ms` plus the duration: no fault of this generation acts past it.
    pub end_ms: u64,
    /// Sandboxes that got this generation's fault: never given it again
    /// while the generation is unchanged (it may have expired or been
    /// deleted through the API), unless the pod stops being selected.
    #[serde(default)]
    pub applied: BTreeSet<SandboxId>,
}

mod rule_memo {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(v.unwrap_or(u32::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        let v = u32::deserialize(d)?;
        Ok((v != u32::MAX).then_some(v))
    }
}

impl FaultRecord {
    /// When the fault's duration started, on the deadline's clock
    /// (`CLOCK_BOOTTIME`, ns): its creation, precise enough to order two
    /// faults created in the same millisecond.
    pub fn started_boot_ns(&self) -> u64 {
        let duration = u64::try_from(self.spec.duration.as_nanos()).unwrap_or(u64::MAX);
        self.deadline_boot_ns.saturating_sub(duration)
    }

    pub fn new(
        sandbox: &SandboxId,
        spec: FaultSpec,
        source: FaultSource,
        now_boot_ns: u64,
    ) -> FaultRecord {
        let created = now_ms();
        let backend = spec.action.backend();
        FaultRecord {
            id: FaultId::random(),
            sandbox: sandbox.clone(),
            created_at_ms: created,
            expires_at_ms: created + spec.duration.as_millis() as u64,
            deadline_boot_ns: now_boot_ns.saturating_add(spec.duration.as_nanos() as u64),
            memo: None,
            expired: false,
            final_counters: Counters::default(),
            nfqueue: backend == BackendKind::Nfqueue,
            proxy: backend == BackendKind::Proxy,
            spec,
            source,
            owner: None,
        }
    }

    pub fn backend(&self) -> BackendKind {
        self.spec.action.backend()
    }

    /// Active: not marked expired and before its deadline at `now`.
    pub fn is_live(&self, now_boot_ns: u64) -> bool {
        !self.expired && self.deadline_boot_ns > now_boot_ns
    }

    pub fn state(&self, now_boot_ns: u64) -> FaultState {
        // The kernel stops applying a fault at its deadline even before
        // the reaper marks it.
        if self.is_live(now_boot_ns) {
            FaultState::Active
        } else {
            FaultState::Expired
        }
    }

    pub fn view(&self, live: Option<&CounterReader>, now_boot_ns: u64) -> Fault {
        let counters = if self.expired {
            self.final_counters
        } else {
            live.map(CounterReader::read).unwrap_or_default()
        };
        Fault {
            id: self.id.to_string(),
            sandbox: self.sandbox.to_string(),
            state: self.state(now_boot_ns).as_str().to_string(),
            spec: self.spec.to_json(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            backend: self.backend().as_str().to_string(),
            counters,
            source: self.source,
        }
    }
}

/// Everything the registry knows. `sandboxes` and `faults` are persisted;
/// `readers` are the live counters of installed faults.
#[derive(Debug, Default)]
pub struct State {
    pub sandboxes: BTreeMap<SandboxId, SandboxRecord>,
    pub faults: BTreeMap<FaultId, FaultRecord>,
    /// NetworkFaults reconciled on this node, by uid.
    pub resources: BTreeMap<String, ResourceRecord>,
    pub readers: HashMap<FaultId, CounterReader>,
}

impl State {
    /// The sandbox's faults of `backend` that are still active at `now`.
    pub fn live_faults(
        &self,
        sandbox: &SandboxId,
        backend: BackendKind,
        now_boot_ns: u64,
    ) -> Vec<&FaultRecord> {
        let mut live: Vec<&FaultRecord> = self
            .faults
            .values()
            .filter(|f| &f.sandbox == sandbox && f.backend() == backend && f.is_live(now_boot_ns))
            .collect();
        // In creation order: where faults compose by order (the first
        // answer-type DNS fault decides), the older one comes first.
        live.sort_by_key(|f| (f.started_boot_ns(), f.created_at_ms, f.id.clone()));
        live
    }

    pub fn faults_of<'a>(
        &'a self,
        sandbox: &'a SandboxId,
    ) -> impl Iterator<Item = &'a FaultRecord> {
        self.faults.values().filter(move |f| &f.sandbox == sandbox)
    }

    pub fn fault_view(&self, f: &FaultRecord, now_boot_ns: u64) -> Fault {
        f.view(self.readers.get(&f.id), now_boot_ns)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
