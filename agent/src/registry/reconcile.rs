//! Reconcile at start: the persisted records against the kernel as a
//! previous agent (or none) left it.
//!
//! Sandboxes whose netns is gone are forgotten. Faults past their deadline
//! are marked expired (the kernel already stopped applying them). The
//! registry then syncs every backend of every live sandbox: live faults are
//! re-installed on this agent's programs, queues and listeners (the eBPF
//! filters are replaced atomically), and what a previous agent left without
//! a live fault is removed.

use std::path::Path;

use netfault_sys::netns::Netns;

use super::state::{SandboxId, State};

/// Settles the records at `now` (boot-time ns): forgets the sandboxes
/// whose netns is gone, with their faults, and marks faults past their
/// deadline expired. Returns the sandboxes that are still there.
pub(super) fn settle_records(st: &mut State, now: u64) -> Vec<SandboxId> {
    let mut live = Vec::new();
    let ids: Vec<SandboxId> = st.sandboxes.keys().cloned().collect();
    for id in ids {
        let Some(sb) = st.sandboxes.get(&id) else {
            continue;
        };
        let alive = matches!(
            Netns::open_if_same(Path::new(&sb.netns), sb.netns_id),
            Ok(Some(_))
        );
        if !alive {
            tracing::warn!(sandbox = %id, netns = %sb.netns, "sandbox's netns is gone; forgetting it");
            st.sandboxes.remove(&id);
            st.faults.retain(|_, f| f.sandbox != id);
            continue;
        }
        for f in st.faults.values_mut() {
            if f.sandbox == id && !f.expired && f.deadline_boot_ns <= now {
                f.expired = true;
            }
        }
        live.push(id);
    }
    live
}
