//! The netem-free delay backend: nft diversion to NFQUEUE in the pod netns
//! (`nft`), a packet-holding engine thread per sandbox (`engine`), and
//! netem's random distributions (`dist`).
//!
//! The same machinery, with its own table and queue ([`nft::DNS`]), serves
//! the UDP half of the `dns-*` faults for the proxy backend
//! ([`NfqueueBackend::for_dns`], [`NfqueueBackend::apply`]).
//!
//! What it owns: for each sandbox with delay or reorder faults, the nft
//! table `netfault` and the queue socket (opened inside the pod netns, which
//! it keeps), served by a thread of the agent's one holder process
//! (`holder`). Removing a sandbox's last such fault removes both, so the netns
//! returns to exactly its previous state.
//! Fail-open: the queue rule has `bypass` (no listener: packets pass) and the
//! queue `NFQA_CFG_F_FAIL_OPEN` (full queue: packets pass). Deadline: every
//! rule looks up a per-fault set element whose `timeout` is the fault's
//! remaining duration, so diversion ends in the kernel without the agent.

pub mod counters;
pub mod dist;
pub mod engine;
mod error;
pub mod holder;
pub mod nft;
pub mod queue;

pub use counters::{dns_malformed, queue_overflows};
pub use engine::REINJECT_MARK;
pub use error::DelayError;
pub use queue::{DNS_QUEUE_NUM, QUEUE_NUM};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use netfault_api::spec::{Direction, Match};
use netfault_api::{BackendKind, DelayAction, FaultSpec, FieldError};
use netfault_sys::netns::{InNetns, NetnsError};

use super::{
    ActiveFault, Availability, Backend, BackendError, BackendOps, CounterReader, SandboxCtx,
    SandboxMemo,
};
use crate::ids::{FaultId, SandboxId};
use counters::FaultCounters;
use holder::{Engine, HolderFault};
use queue::NfQueue;

/// Packets the kernel holds for the engine before failing open.
const QUEUE_MAXLEN: u32 = 8192;
/// Bytes of each packet copied to the engine: whole packets, because egress
/// packets are re-sent from the copy (see `engine`). NFQUEUE segments GSO
/// packets for a queue without `NFQA_CFG_F_GSO`, so copies are MTU-sized.
const COPY_RANGE: u32 = 65535;

/// Every sandbox's NFQUEUE state, in one table and queue ([`nft::Layout`]).
pub struct NfqueueBackend {
    layout: nft::Layout,
    sandboxes: HashMap<SandboxId, Engine>,
    counters: HashMap<FaultId, Arc<FaultCounters>>,
    /// Each fault's set tag in its sandbox's table, and what is installed.
    tags: nft::Tags,
    /// Sandboxes whose table this agent removed and has not installed
    /// since: removing it again (a sync with no faults, e.g. the DNS half
    /// of every proxy change on a pod without DNS faults) needs no `nft`
    /// run. Empty at start, so a table an earlier agent left is removed.
    absent: HashSet<SandboxId>,
    /// Sandboxes whose table's queue rule names this agent's holder's
    /// queue (set by a sync that succeeded; until then each sync takes the
    /// table over, see `nft::sync_here`).
    ruled: HashSet<SandboxId>,
}

impl Default for NfqueueBackend {
    fn default() -> Self {
        NfqueueBackend::with_layout(nft::DELAY)
    }
}

/// One fault as a queue engine diverts and applies it.
pub struct QueueFault<'a> {
    pub id: &'a FaultId,
    /// The whole spec (the holder applies its action).
    pub spec: &'a FaultSpec,
    pub remaining: Duration,
    /// What the kernel diverts to the queue.
    pub direction: Direction,
    pub selector: Match,
}

fn open_queue_here(
    inside: &InNetns,
    num: u16,
) -> Result<(NfQueue, engine::Reinjector), DelayError> {
    let queue = NfQueue::open(inside, num, QUEUE_MAXLEN, COPY_RANGE)?;
    let reinjector = engine::Reinjector::open_here(inside, REINJECT_MARK)?;
    Ok((queue, reinjector))
}

fn sync_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new("applying the delay faults", e)
}

impl NfqueueBackend {
    fn with_layout(layout: nft::Layout) -> Self {
        NfqueueBackend {
            layout,
            sandboxes: HashMap::new(),
            counters: HashMap::new(),
            tags: nft::Tags::default(),
            absent: HashSet::new(),
            ruled: HashSet::new(),
        }
    }

    /// The DNS engine: table `netfault_dns`, its own queue and holders.
    pub fn for_dns() -> Self {
        NfqueueBackend::with_layout(nft::DNS)
    }

    fn counters_for(&mut self, fault: &FaultId) -> Arc<FaultCounters> {
        self.counters.entry(fault.clone()).or_default().clone()
    }

    /// Detaches the sandbox from the holder (which releases what it holds
    /// and unbinds the queue), then removes the table. In between, packets
    /// the table still diverts find no listener, and the queue rule's
    /// `bypass` passes them.
    fn remove(&mut self, sb: &SandboxCtx<'_>) -> Result<(), DelayError> {
        if !self.sandboxes.contains_key(sb.id) && self.absent.contains(sb.id) {
            return Ok(());
        }
        drop(self.sandboxes.remove(sb.id));
        self.ruled.remove(sb.id);
        let layout = self.layout;
        let removed = match sb.netns {
            Some(ns) => ns.run(move |inside| nft::remove_here(inside, layout))?,
            None => Ok(()),
        };
        if removed.is_ok() {
            self.absent.insert(sb.id.clone());
        }
        removed
    }

    /// Brings a sandbox's netns in line with `faults` (its active faults
    /// of this engine): with none, removes the table and closes the queue.
    pub fn apply(
        &mut self,
        sb: &SandboxCtx<'_>,
        faults: &[QueueFault<'_>],
    ) -> Result<(), DelayError> {
        if faults.is_empty() {
            return self.remove(sb);
        }
        // From here on the table may exist, whatever happens below.
        self.absent.remove(sb.id);
        let Some(ns) = sb.netns else {
            return Err(DelayError::Netns(NetnsError::Gone {
                path: sb.id.to_string().into(),
            }));
        };
        let counters: Vec<Arc<FaultCounters>> =
            faults.iter().map(|f| self.counters_for(f.id)).collect();
        let wire: Vec<HolderFault<'_>> = faults
            .iter()
            .zip(&counters)
            .map(|(f, c)| HolderFault {
                spec: f.spec,
                remaining: f.remaining,
                counters: c,
            })
            .collect();
        let fresh = !self.sandboxes.contains_key(sb.id);
        if fresh {
            let nums = self.layout.queues();
            let (queue, reinjector) = ns.run(move |inside| {
                // The first number, unless an earlier agent's holder (a
                // hand-over in progress) still reads it: then the other.
                match open_queue_here(inside, nums[0]) {
                    Err(DelayError::QueueBusy(_)) => open_queue_here(inside, nums[1]),
                    other => other,
                }
            })??;
            let num = queue.num();
            let key = format!("{}/{}", self.layout.table, sb.id);
            let engine = Engine::start(queue, reinjector, &key, num)?;
            self.sandboxes.insert(sb.id.clone(), engine);
        }
        let mut queue_num = self.layout.queue;
        if let Some(engine) = self.sandboxes.get_mut(sb.id) {
            engine.set_faults(&wire)?;
            queue_num = engine.queue();
        }
        crate::crash::point_of(self.layout.table, "holder-set");
        // Sandboxes whose last fault went (table removed) lose their tags.
        let live = &self.sandboxes;
        self.tags
            .retain_sandboxes(|name| live.contains_key(&SandboxId::from(name)));
        let ids: Vec<&str> = faults.iter().map(|f| f.id.as_str()).collect();
        self.tags.retain_faults(sb.id.as_str(), &ids);
        let diversions: Vec<nft::Diversion> = faults
            .iter()
            .map(|f| nft::Diversion {
                tag: self.tags.tag(sb.id.as_str(), f.id.as_str()),
                direction: f.direction,
                selector: f.selector.clone(),
                timeout_ms: f.remaining.as_nanos().div_ceil(1_000_000) as u64,
            })
            .collect();
        let known = self.tags.installed(sb.id.as_str());
        let layout = self.layout;
        let takeover = fresh || !self.ruled.contains(sb.id);
        // Only what changed is touched: unchanged faults keep diverting,
        // with their set elements' kernel timeouts running on.
        let applied = match ns.run(move |inside| {
            nft::sync_here(inside, layout, queue_num, takeover, &diversions, &known)
        }) {
            Ok((installed, result)) => {
                self.tags.set_installed(sb.id.as_str(), installed);
                result
            }
            Err(e) => Err(e.into()),
        };
        if applied.is_ok() {
            self.ruled.insert(sb.id.clone());
        } else if fresh {
            self.sandboxes.remove(sb.id);
        }
        applied
    }
}

impl NfqueueBackend {
    /// Removes everything of the sandbox, at once (CNI DEL).
    pub fn release(&mut self, sb: &SandboxCtx<'_>) -> Result<(), DelayError> {
        let r = self.remove(sb);
        self.absent.remove(sb.id);
        r
    }

    /// The live counters of a fault this engine serves.
    pub fn fault_counters(&self, fault: &FaultId) -> Option<Arc<FaultCounters>> {
        self.counters.get(fault).cloned()
    }
}

impl BackendOps for NfqueueBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nfqueue
    }

    fn counters(&self, fault: &FaultId) -> Option<CounterReader> {
        let c = self.counters.get(fault)?.clone();
        Some(CounterReader::new(move || c.snapshot()))
    }

    fn holds(&self, sandbox: &SandboxId) -> bool {
        self.sandboxes.contains_key(sandbox)
    }

    fn forget_fault(&mut self, fault: &FaultId) {
        self.counters.remove(fault);
        self.tags.free(fault.as_str());
    }

    fn lost_sandboxes(&mut self) -> Vec<SandboxId> {
        let mut lost = Vec::new();
        for (id, engine) in &mut self.sandboxes {
            if let Some(status) = engine.exited() {
                tracing::warn!(sandbox = %id, table = self.layout.table, %status, "a holder process died; starting a new one");
                lost.push(id.clone());
            }
        }
        for id in &lost {
            self.sandboxes.remove(id);
            self.ruled.remove(id);
        }
        lost
    }

    fn forget_sandbox(
        &mut self,
        sb: &SandboxCtx<'_>,
        _memo: &mut SandboxMemo,
    ) -> Result<(), BackendError> {
        self.release(sb)
            .map_err(|e| BackendError::new("removing the delay diversion", e))
    }

    fn reclaim(&mut self) {
        // The table's queue rule may name the dead agent's queue.
        self.ruled.clear();
    }

    fn drain(&mut self) {
        // One holder serves both engines (delay and DNS): the first call
        // drains it, the second finds nothing left to drain.
        holder::drain();
    }

    fn drained(&mut self) -> bool {
        holder::drained()
    }

    fn availability(&self) -> Availability {
        Availability::section(
            BackendKind::Nfqueue,
            "delay",
            super::caps::nfqueue_section(),
        )
    }
}

impl Backend for NfqueueBackend {
    type Action = DelayAction;

    fn admit(&self, action: &DelayAction, active: &[&DelayAction]) -> Result<(), FieldError> {
        // A reorder without its own latency reorders against a delay fault.
        if let DelayAction::Reorder { latency: None, .. } = action {
            let has_delay = active
                .iter()
                .any(|a| matches!(a, DelayAction::Delay { .. }));
            if !has_delay {
                return Err(FieldError::unsupported(
                    "action.latency",
                    "reorder needs a latency: give action.latency, or first add a delay fault to this sandbox whose delay the in-order packets get",
                ));
            }
        }
        Ok(())
    }

    fn sync(
        &mut self,
        sb: &SandboxCtx<'_>,
        _memo: &mut SandboxMemo,
        faults: &mut [ActiveFault<'_, DelayAction>],
    ) -> Result<(), BackendError> {
        let faults: Vec<QueueFault<'_>> = faults
            .iter()
            .map(|f| QueueFault {
                id: f.id,
                spec: f.spec,
                remaining: f.remaining,
                direction: f.spec.direction,
                selector: f.spec.r#match.clone(),
            })
            .collect();
        self.apply(sb, &faults).map_err(sync_err)
    }
}
