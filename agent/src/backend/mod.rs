//! The backends: each one turns a sandbox's active faults of its kind into
//! kernel state (and, for the proxy, a served listener).
//!
//! - `ebpf`: loss, blackhole, corrupt, duplicate and rate in the tc eBPF
//!   datapath (API name `ebpf-tc`);
//! - `nfqueue`: delay and reorder, nft diversion to NFQUEUE and a holder
//!   process per sandbox (API name `nfqueue`);
//! - `proxy`: HTTP and TCP faults, nft TPROXY diversion to the agent's
//!   transparent proxy (API name `proxy`).
//!
//! The trait is declarative: [`Backend::sync`] puts the sandbox's kernel
//! state into what the list of its active faults describes, whatever was
//! there before (a previous agent's leftovers included). Removal and
//! expiry are a `sync` with one fault fewer. Adding a backend means adding
//! one module and one entry in [`Backends`].
//! What a backend must not do: keep records of its own that the registry
//! also keeps (sandboxes, deadlines, specs), or persist anything itself.

pub mod caps;
pub mod ebpf;
#[cfg(test)]
pub mod fake;
#[cfg(test)]
pub mod golden;
pub mod nfqueue;
pub mod proxy;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use netfault_api::{
    Action, BackendKind, Counters, DelayAction, FaultSpec, FieldError, PacketAction, ProxyAction,
};
use netfault_sys::netns::Netns;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{FaultId, SandboxId};

/// Malformed DNS messages seen on DNS faults' ports (UDP and TCP), passed
/// through untouched.
pub fn dns_malformed() -> u64 {
    nfqueue::dns_malformed()
}

/// Why a backend could not bring the kernel in line.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct BackendError {
    pub what: &'static str,
    pub message: String,
}

impl BackendError {
    pub fn new(what: &'static str, e: impl std::fmt::Display) -> Self {
        BackendError {
            what,
            message: e.to_string(),
        }
    }
}

/// What a backend keeps about a sandbox across agent restarts. The
/// registry persists it with the sandbox (its fields are part of the state
/// file's sandbox record) and hands it back on every call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMemo {
    /// Present while the eBPF datapath is attached.
    #[serde(default)]
    pub attachment: Option<AttachmentRecord>,
}

/// What attaching the eBPF datapath changed, to undo exactly that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub created_clsact: bool,
}

/// A sandbox as a backend sees it.
pub struct SandboxCtx<'a> {
    pub id: &'a SandboxId,
    /// The sandbox's netns, opened for this call; `None` when it is gone
    /// (the pod was deleted before its CNI DEL, or a reused path).
    pub netns: Option<&'a Netns>,
    pub ifname: &'a str,
    /// The pod's own addresses: the datapath keys its packets on them.
    pub addresses: &'a [IpAddr],
    /// The sandbox's block of eBPF rules.
    pub slot: u32,
}

/// The part of [`Action`] one backend serves: each backend receives only
/// its own action type.
pub trait BackendAction: Clone + Send + Sync + 'static {
    const KIND: BackendKind;

    /// This backend's action, if `action` is one.
    fn of(action: &Action) -> Option<&Self>;
}

impl BackendAction for PacketAction {
    const KIND: BackendKind = BackendKind::Ebpf;

    fn of(action: &Action) -> Option<&Self> {
        match action {
            Action::Packet(a) => Some(a),
            Action::Delay(_) | Action::Proxy(_) => None,
        }
    }
}

impl BackendAction for DelayAction {
    const KIND: BackendKind = BackendKind::Nfqueue;

    fn of(action: &Action) -> Option<&Self> {
        match action {
            Action::Delay(a) => Some(a),
            Action::Packet(_) | Action::Proxy(_) => None,
        }
    }
}

impl BackendAction for ProxyAction {
    const KIND: BackendKind = BackendKind::Proxy;

    fn of(action: &Action) -> Option<&Self> {
        match action {
            Action::Proxy(a) => Some(a),
            Action::Packet(_) | Action::Delay(_) => None,
        }
    }
}

/// An active fault handed to its backend.
pub struct ActiveFault<'a, A> {
    pub id: &'a FaultId,
    /// Direction and selector (`spec.match`); the action is `action`.
    pub spec: &'a FaultSpec,
    pub action: &'a A,
    /// Absolute `CLOCK_BOOTTIME` deadline, ns (what the kernel checks).
    pub deadline_boot_ns: u64,
    /// Time left until the deadline.
    pub remaining: Duration,
    /// The backend's per-fault slot, persisted with the fault (the eBPF
    /// rule index); a backend that has none leaves it `None`.
    pub memo: &'a mut Option<u32>,
}

/// Reads a fault's live counters from any thread, without the backend
/// (atomics shared with the engine, or an eBPF map lookup).
#[derive(Clone)]
pub struct CounterReader(Arc<dyn Fn() -> Counters + Send + Sync>);

impl CounterReader {
    pub fn new(f: impl Fn() -> Counters + Send + Sync + 'static) -> Self {
        CounterReader(Arc::new(f))
    }

    pub fn read(&self) -> Counters {
        (self.0)()
    }
}

impl std::fmt::Debug for CounterReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CounterReader")
    }
}

/// A backend's part of `GET /v1/capabilities`.
pub struct Availability {
    /// The section of the capabilities document (`None`: no own section).
    pub section: Option<(&'static str, Value)>,
    /// The action types it serves on this node.
    pub actions: Vec<&'static str>,
}

impl Availability {
    /// Section `key` of the document, and every action of `kind` if the
    /// section says the backend is `available`.
    pub fn section(kind: BackendKind, key: &'static str, (doc, available): (Value, bool)) -> Self {
        Availability {
            section: Some((key, doc)),
            actions: if available {
                kind.action_types().collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// What every backend does, whatever its action type. Calls come from one
/// thread at a time (the registry's owner); none is made with a registry
/// lock held.
pub trait BackendOps: Send {
    fn kind(&self) -> BackendKind;

    /// A reader of the fault's live counters, once `sync` installed it.
    fn counters(&self, fault: &FaultId) -> Option<CounterReader>;

    /// Whether the backend has anything installed for the sandbox (after
    /// the reconcile at start, what it holds is all there is).
    fn holds(&self, sandbox: &SandboxId) -> bool;

    /// Drops what the backend keeps about a fault that is gone (after the
    /// `sync` that removed it, and after its counters were read).
    fn forget_fault(&mut self, fault: &FaultId);

    /// Sandboxes whose engine process died on its own (a killed delay or
    /// DNS holder). The backend has forgotten their engines; the caller
    /// syncs each again, which starts a new one.
    fn lost_sandboxes(&mut self) -> Vec<SandboxId> {
        Vec::new()
    }

    /// The sandbox is released (CNI DEL): removes everything, at once (no
    /// draining: the pod is going away). `sb.netns` is `None` when the
    /// netns is gone, and only user-space state is dropped then.
    fn forget_sandbox(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
    ) -> Result<(), BackendError>;

    /// What this backend can do on this node, and why not.
    fn availability(&self) -> Availability;

    /// A new agent has taken the node over (hand-over, see
    /// `docs/design.md`): from now on this backend changes nothing in the
    /// kernel on its own (no lease re-arms, no new listeners, no drains
    /// removing a diversion), while what is in flight goes on.
    fn retire(&mut self) {}

    /// A hand-over that froze this agent ended without a commit (the new
    /// agent died), after the new agent may have switched diversions to
    /// its own programs, queues or listeners: the next `sync` of every
    /// sandbox puts this agent's back, in one kernel transaction each.
    fn reclaim(&mut self) {}

    /// This agent is exiting after a hand-over: what it still holds is
    /// released at its time (delay holders), never early or lost.
    fn drain(&mut self) {}

    /// Whether nothing is held any more (after [`BackendOps::drain`]):
    /// holders exited, proxied connections closed.
    fn drained(&mut self) -> bool {
        true
    }
}

/// A backend of one action type.
pub trait Backend: BackendOps {
    type Action: BackendAction;

    /// Checks a new fault against what this backend can do for the sandbox
    /// (`active` are the actions of its other active faults here): an
    /// error is a 4xx naming the field.
    fn admit(&self, action: &Self::Action, active: &[&Self::Action]) -> Result<(), FieldError>;

    /// Puts the sandbox's kernel state into what `faults` (every active
    /// fault of this backend on the sandbox) describes. With none, removes
    /// everything the backend installed there.
    fn sync(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
        faults: &mut [ActiveFault<'_, Self::Action>],
    ) -> Result<(), BackendError>;
}

/// Every backend of the agent, one per [`BackendKind`] (and per variant of
/// [`Action`]).
pub struct Backends {
    pub ebpf: Box<dyn Backend<Action = PacketAction>>,
    pub nfqueue: Box<dyn Backend<Action = DelayAction>>,
    pub proxy: Box<dyn Backend<Action = ProxyAction>>,
}

impl Backends {
    pub fn ops(&self, kind: BackendKind) -> &dyn BackendOps {
        match kind {
            BackendKind::Ebpf => &*self.ebpf,
            BackendKind::Nfqueue => &*self.nfqueue,
            BackendKind::Proxy => &*self.proxy,
        }
    }

    pub fn ops_mut(&mut self, kind: BackendKind) -> &mut dyn BackendOps {
        match kind {
            BackendKind::Ebpf => &mut *self.ebpf,
            BackendKind::Nfqueue => &mut *self.nfqueue,
            BackendKind::Proxy => &mut *self.proxy,
        }
    }

    /// [`BackendOps::retire`] on every backend.
    pub fn retire(&mut self) {
        for kind in BackendKind::ALL {
            self.ops_mut(kind).retire();
        }
    }

    /// [`BackendOps::reclaim`] on every backend.
    pub fn reclaim(&mut self) {
        for kind in BackendKind::ALL {
            self.ops_mut(kind).reclaim();
        }
    }

    /// [`BackendOps::drain`] on every backend.
    pub fn drain(&mut self) {
        for kind in BackendKind::ALL {
            self.ops_mut(kind).drain();
        }
    }

    /// Whether every backend is [`BackendOps::drained`].
    pub fn drained(&mut self) -> bool {
        let mut all = true;
        // Every backend is asked (each reaps its exited holders).
        for kind in BackendKind::ALL {
            all &= self.ops_mut(kind).drained();
        }
        all
    }

    /// The capabilities document: the node facts, each backend's section,
    /// and the actions served.
    pub fn capabilities(&self) -> Value {
        let mut doc = caps::node_facts();
        let mut actions = Vec::new();
        for kind in BackendKind::ALL {
            let a = self.ops(kind).availability();
            if let (Some((key, section)), Some(obj)) = (a.section, doc.as_object_mut()) {
                obj.insert(key.to_string(), section);
            }
            actions.extend(a.actions);
        }
        doc["actions"] = serde_json::json!(actions);
        doc
    }
}
