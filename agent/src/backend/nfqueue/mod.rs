//! The netem-free delay backend: nft diversion to NFQUEUE in the pod netns
//! (`nft`), a packet-holding engine thread per sandbox (`engine`), and
//! netem's random distributions (`dist`).
//!
//! What it owns: for each sandbox with delay or reorder faults, the nft
//! table `netfault` and the queue socket (opened inside the pod netns, which
//! it keeps). Removing a sandbox's last such fault removes both, so the netns
//! returns to exactly its previous state.
//! Fail-open: the queue rule has `bypass` (no listener: packets pass) and the
//! queue `NFQA_CFG_F_FAIL_OPEN` (full queue: packets pass). Deadline: every
//! rule looks up a per-fault set element whose `timeout` is the fault's
//! remaining duration, so diversion ends in the kernel without the agent.

pub mod caps;
pub mod dist;
pub mod engine;
pub mod holder;
pub mod nft;
pub mod queue;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use netfault_api::{Counters, FaultSpec};

use crate::sys::netns::{self, NetnsError};
use holder::{Engine, FaultCounters, HolderFault};
use queue::NfQueue;

/// The NFQUEUE number used in every pod netns (queues are per netns).
pub const QUEUE_NUM: u16 = 0x4e46;
/// Packets the kernel holds for the engine before failing open.
const QUEUE_MAXLEN: u32 = 8192;
/// Bytes of each packet copied to the engine: whole packets, because egress
/// packets are re-sent from the copy (see `engine`). NFQUEUE segments GSO
/// packets for a queue without `NFQA_CFG_F_GSO`, so copies are MTU-sized.
const COPY_RANGE: u32 = 65535;
/// `SO_MARK` of the engine's re-sent egress packets; the egress chain lets
/// them through undiverted.
pub const REINJECT_MARK: u32 = 0x4e46_0001;

/// Receive-buffer overflows of every queue socket since the agent started:
/// each one let at least one packet through undelayed (fail-open). Exposed
/// as `netfault_delay_queue_overflows_total`.
pub fn queue_overflows() -> u64 {
    holder::queue_overflows()
}

#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("nft: {0}")]
    Nft(String),
    #[error("nf_tables netlink: {0}")]
    Netlink(String),
    #[error("NFQUEUE: {0}")]
    Queue(String),
    #[error("starting the delay thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A delay-backend fault to apply.
#[derive(Debug, Clone)]
pub struct DelayFault {
    pub id: String,
    pub spec: FaultSpec,
    /// Time left until the fault's deadline.
    pub remaining: Duration,
}

struct SandboxQueue {
    engine: Engine,
}

/// Every sandbox's delay state, owned by the registry.
#[derive(Default)]
pub struct DelayEngine {
    sandboxes: HashMap<String, SandboxQueue>,
    counters: HashMap<String, Arc<FaultCounters>>,
    /// Each fault's set tag in its sandbox's table, and what is installed.
    tags: nft::Tags,
}

fn open_queue_here() -> Result<(NfQueue, engine::Reinjector), DelayError> {
    let queue = NfQueue::open(QUEUE_NUM, QUEUE_MAXLEN, COPY_RANGE)?;
    let reinjector = engine::Reinjector::open_here(REINJECT_MARK)?;
    Ok((queue, reinjector))
}

impl DelayEngine {
    pub fn has(&self, sandbox: &str) -> bool {
        self.sandboxes.contains_key(sandbox)
    }

    fn counters_for(&mut self, fault: &str) -> Arc<FaultCounters> {
        self.counters.entry(fault.to_string()).or_default().clone()
    }

    /// Brings a sandbox's netns in line with `faults` (its active delay and
    /// reorder faults): with none, removes the table and closes the queue.
    pub fn apply(
        &mut self,
        sandbox: &str,
        netns_path: &Path,
        faults: &[DelayFault],
    ) -> Result<(), DelayError> {
        let path = PathBuf::from(netns_path);
        if faults.is_empty() {
            let removed = match netns::run_in(&path, nft::remove_here) {
                Ok(r) => r,
                Err(NetnsError::Gone { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            };
            // Closing the queue after the table is gone: nothing is diverted
            // to a queue without a listener (which `bypass` would pass anyway).
            self.sandboxes.remove(sandbox);
            return removed;
        }
        let counters: Vec<Arc<FaultCounters>> =
            faults.iter().map(|f| self.counters_for(&f.id)).collect();
        let wire: Vec<HolderFault<'_>> = faults
            .iter()
            .zip(&counters)
            .map(|(f, c)| HolderFault {
                spec: &f.spec,
                remaining: f.remaining,
                counters: c,
            })
            .collect();
        let fresh = !self.sandboxes.contains_key(sandbox);
        if fresh {
            let (queue, reinjector) = netns::run_in(&path, open_queue_here)??;
            let engine = Engine::start(queue, reinjector, sandbox)?;
            self.sandboxes
                .insert(sandbox.to_string(), SandboxQueue { engine });
        }
        if let Some(sq) = self.sandboxes.get_mut(sandbox) {
            sq.engine.set_faults(&wire)?;
        }
        // Sandboxes whose last fault went (table removed) lose their tags.
        let live = &self.sandboxes;
        self.tags.retain_sandboxes(|sb| live.contains_key(sb));
        let ids: Vec<&str> = faults.iter().map(|f| f.id.as_str()).collect();
        self.tags.retain_faults(sandbox, &ids);
        let diversions: Vec<nft::Diversion> = faults
            .iter()
            .map(|f| nft::Diversion {
                tag: self.tags.tag(sandbox, &f.id),
                direction: f.spec.direction,
                selector: f.spec.r#match.clone(),
                timeout_ms: f.remaining.as_nanos().div_ceil(1_000_000) as u64,
            })
            .collect();
        let known = self.tags.installed(sandbox);
        // Only what changed is touched: unchanged faults keep diverting,
        // with their set elements' kernel timeouts running on.
        let applied = match netns::run_in(&path, move || {
            nft::sync_here(&diversions, &known, QUEUE_NUM)
        }) {
            Ok((installed, result)) => {
                self.tags.set_installed(sandbox, installed);
                result
            }
            Err(e) => Err(e.into()),
        };
        if applied.is_err() && fresh {
            self.sandboxes.remove(sandbox);
        }
        applied
    }

    /// Live counters of a delay fault.
    pub fn counters(&self, fault: &str) -> Option<Counters> {
        self.counters.get(fault).map(|c| c.snapshot())
    }

    /// Forgets a fault's counters (after it was removed or expired).
    pub fn forget(&mut self, fault: &str) {
        self.counters.remove(fault);
        self.tags.free(fault);
    }
}
