//! The eBPF backend: loss, blackhole, corrupt, duplicate and rate, in the tc
//! datapath (API name `ebpf-tc`).
//!
//! What it owns: the loaded datapath (one object for the node), each
//! sandbox's addresses bound to its rule block, the rules, and the clsact
//! filters in the pod netns. The programs are attached to a sandbox only
//! while it has an active fault here, so removing the last one restores
//! the netns exactly as it was (the qdisc goes too if we created it).
//! Every rule carries its deadline, which the program checks itself.
//! What it must not do: enter a netns other than through `netfault_sys::netns`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use netfault_api::{BackendKind, Counters, FieldError, PacketAction};
use netfault_ebpf::{Attachment, Datapath, RawRule, RULES_PER_SANDBOX};

use super::{
    ActiveFault, AttachmentRecord, Availability, Backend, BackendError, BackendOps, CounterReader,
    SandboxCtx, SandboxMemo,
};
use crate::ids::{FaultId, SandboxId};

/// What is installed for a sandbox.
struct Installed {
    slot: u32,
    /// Fault → rule index in the sandbox's block.
    rules: HashMap<FaultId, u32>,
}

pub struct EbpfBackend {
    dp: Arc<Mutex<Datapath>>,
    sandboxes: HashMap<SandboxId, Installed>,
}

fn lock(dp: &Mutex<Datapath>) -> MutexGuard<'_, Datapath> {
    // Map updates leave nothing half-done in user space: keep serving.
    dp.lock().unwrap_or_else(|p| p.into_inner())
}

fn dp_err(what: &'static str) -> impl Fn(netfault_ebpf::DatapathError) -> BackendError {
    move |e| BackendError::new(what, e)
}

impl EbpfBackend {
    /// Loads the datapath. Requires CAP_BPF and CAP_NET_ADMIN.
    pub fn load() -> Result<EbpfBackend, BackendError> {
        let dp = Datapath::load().map_err(dp_err("loading the eBPF datapath"))?;
        Ok(EbpfBackend {
            dp: Arc::new(Mutex::new(dp)),
            sandboxes: HashMap::new(),
        })
    }

    fn bind(&self, sb: &SandboxCtx<'_>) -> Result<(), BackendError> {
        let mut dp = lock(&self.dp);
        for a in sb.addresses {
            dp.bind_address(*a, sb.slot)
                .map_err(dp_err("binding a sandbox address"))?;
        }
        Ok(())
    }

    /// Clears the rules of faults no longer listed, and installs the new
    /// ones (a fault re-installed after a restart keeps its index).
    /// Returns the program fds, to attach.
    fn set_rules(
        &mut self,
        sandbox: &SandboxId,
        faults: &mut [ActiveFault<'_, PacketAction>],
    ) -> Result<netfault_ebpf::ProgramFds, BackendError> {
        let mut dp = lock(&self.dp);
        let Some(inst) = self.sandboxes.get_mut(sandbox) else {
            return Ok(dp.program_fds());
        };
        let listed: Vec<&FaultId> = faults.iter().map(|f| f.id).collect();
        let gone: Vec<FaultId> = inst
            .rules
            .keys()
            .filter(|id| !listed.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(rule) = inst.rules.remove(&id) {
                dp.clear_rule(inst.slot, rule)
                    .map_err(dp_err("clearing a rule"))?;
            }
        }
        for f in faults.iter_mut() {
            if inst.rules.contains_key(f.id) {
                continue;
            }
            let used: Vec<u32> = inst.rules.values().copied().collect();
            let rule = match *f.memo {
                Some(r) if r < RULES_PER_SANDBOX && !used.contains(&r) => r,
                _ => (0..RULES_PER_SANDBOX)
                    .find(|r| !used.contains(r))
                    .ok_or_else(|| {
                        BackendError::new(
                            "installing the rule",
                            format!("the sandbox already has {RULES_PER_SANDBOX} packet faults"),
                        )
                    })?,
            };
            let raw = RawRule::compile_packet(
                f.spec.direction,
                &f.spec.r#match,
                f.action,
                f.deadline_boot_ns,
            );
            dp.set_rule(inst.slot, rule, &raw)
                .map_err(dp_err("installing the rule"))?;
            inst.rules.insert(f.id.clone(), rule);
            *f.memo = Some(rule);
        }
        Ok(dp.program_fds())
    }

    /// Clears every rule, detaches the programs and unbinds the addresses.
    fn remove_all(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
    ) -> Result<(), BackendError> {
        if let Some(inst) = self.sandboxes.remove(sb.id) {
            let mut dp = lock(&self.dp);
            for rule in inst.rules.values() {
                dp.clear_rule(inst.slot, *rule)
                    .map_err(dp_err("clearing a rule"))?;
            }
        }
        if let Some(att) = memo.attachment {
            if let Some(ns) = sb.netns {
                detach(ns, sb.ifname, att)?;
            }
            // A netns that is gone took its filters with it.
            memo.attachment = None;
        } else if let Some(ns) = sb.netns {
            // Nothing recorded, but an agent that died between attaching
            // and saving its state may have left filters (with live rules).
            let ifname = sb.ifname.to_string();
            let found = ns
                .run(move |inside| netfault_ebpf::detach_unrecorded_here(inside, &ifname))
                .map_err(|e| BackendError::new("removing unrecorded filters", e))?
                .map_err(dp_err("removing unrecorded filters"))?;
            if found {
                tracing::warn!(sandbox = %sb.id, "removed filters a previous agent left unrecorded");
            }
        }
        let mut dp = lock(&self.dp);
        for a in sb.addresses {
            dp.unbind_address(*a)
                .map_err(dp_err("unbinding a sandbox address"))?;
        }
        Ok(())
    }
}

fn detach(
    ns: &netfault_sys::netns::Netns,
    ifname: &str,
    att: AttachmentRecord,
) -> Result<(), BackendError> {
    let ifname = ifname.to_string();
    ns.run(move |inside| {
        netfault_ebpf::detach_here(
            inside,
            &ifname,
            Attachment {
                created_clsact: att.created_clsact,
            },
        )
    })
    .map_err(|e| BackendError::new("detaching the datapath", e))?
    .map_err(dp_err("detaching the datapath"))
}

impl BackendOps for EbpfBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebpf
    }

    fn counters(&self, fault: &FaultId) -> Option<CounterReader> {
        let (slot, rule) = self
            .sandboxes
            .values()
            .find_map(|s| s.rules.get(fault).map(|r| (s.slot, *r)))?;
        let dp = self.dp.clone();
        Some(CounterReader::new(move || {
            lock(&dp)
                .counters(slot, rule)
                .map(|c| Counters {
                    matched: c.matched,
                    dropped: c.dropped,
                    affected: c.affected,
                })
                .unwrap_or_default()
        }))
    }

    fn holds(&self, sandbox: &SandboxId) -> bool {
        self.sandboxes.contains_key(sandbox)
    }

    fn forget_fault(&mut self, _fault: &FaultId) {
        // `sync` already freed the fault's rule.
    }

    fn forget_sandbox(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
    ) -> Result<(), BackendError> {
        self.remove_all(sb, memo)
    }

    fn reclaim(&mut self) {
        // The filters may run the dead agent's programs (with its maps):
        // the next sync of each sandbox binds its addresses, writes its
        // rules (at their remembered indexes) and attaches ours again.
        self.sandboxes.clear();
    }

    fn availability(&self) -> Availability {
        // The datapath compiles every packet action.
        Availability {
            section: None,
            actions: BackendKind::Ebpf.action_types().collect(),
        }
    }
}

impl Backend for EbpfBackend {
    type Action = PacketAction;

    fn admit(&self, _action: &PacketAction, active: &[&PacketAction]) -> Result<(), FieldError> {
        if active.len() >= RULES_PER_SANDBOX as usize {
            return Err(FieldError::conflict(
                "target",
                &format!("the sandbox already has {RULES_PER_SANDBOX} active packet faults"),
            ));
        }
        Ok(())
    }

    fn sync(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
        faults: &mut [ActiveFault<'_, PacketAction>],
    ) -> Result<(), BackendError> {
        if faults.is_empty() {
            return self.remove_all(sb, memo);
        }
        let Some(ns) = sb.netns else {
            return Err(BackendError::new(
                "attaching the datapath",
                format!("the sandbox's network namespace {} is gone", sb.id),
            ));
        };
        let fresh = !self.sandboxes.contains_key(sb.id);
        if fresh {
            self.bind(sb)?;
            self.sandboxes.insert(
                sb.id.clone(),
                Installed {
                    slot: sb.slot,
                    rules: HashMap::new(),
                },
            );
        }
        let fds = self.set_rules(sb.id, faults)?;
        crate::crash::point("ebpf.rules-set");
        // Attached once per sandbox; after an agent restart, the new
        // programs atomically replace the old filters.
        if fresh || memo.attachment.is_none() {
            let ifname = sb.ifname.to_string();
            let att = ns
                .run(move |inside| netfault_ebpf::attach_here(inside, fds, &ifname))
                .map_err(|e| BackendError::new("attaching the datapath", e))?
                .map_err(dp_err("attaching the datapath"))?;
            // Keep what the first attachment created: that is what to remove later.
            let created = memo
                .attachment
                .map(|a| a.created_clsact)
                .unwrap_or(att.created_clsact);
            memo.attachment = Some(AttachmentRecord {
                created_clsact: created,
            });
        }
        Ok(())
    }
}
