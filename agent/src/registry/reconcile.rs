//! Reconcile at start: the persisted records against the kernel as a
//! previous agent (or none) left it.
//!
//! Sandboxes whose netns is gone are forgotten. Faults past their deadline
//! are marked expired (the kernel already stopped applying them). Every
//! backend is then synced for every sandbox: live faults are re-installed
//! on this agent's programs, queues and listeners (the eBPF filters are
//! replaced atomically), and what a previous agent left without a live
//! fault is removed.

use std::path::Path;

use netfault_sys::netns::Netns;

use super::state::SandboxId;
use super::{AgentError, Core};

impl Core<'_> {
    pub(super) fn reconcile(&mut self) -> Result<(), AgentError> {
        let now = netfault_ebpf::boottime_ns();
        let sandboxes: Vec<(SandboxId, String, netfault_sys::netns::NetnsId)> = self
            .lock()
            .sandboxes
            .values()
            .map(|s| (s.id.clone(), s.netns.clone(), s.netns_id))
            .collect();
        for (id, netns, nid) in sandboxes {
            let alive = matches!(Netns::open_if_same(Path::new(&netns), nid), Ok(Some(_)));
            let mut st = self.lock();
            if !alive {
                tracing::warn!(sandbox = %id, netns = %netns, "sandbox's netns is gone; forgetting it");
                st.sandboxes.remove(&id);
                st.faults.retain(|_, f| f.sandbox != id);
                continue;
            }
            for f in st.faults.values_mut() {
                if f.sandbox == id && !f.expired && f.deadline_boot_ns <= now {
                    f.expired = true;
                }
            }
            drop(st);
            for kind in netfault_api::BackendKind::ALL {
                self.sync(&id, kind)?;
            }
        }
        self.sh.persist()
    }
}
