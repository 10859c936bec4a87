//! A recording backend for the registry's unit tests: it keeps what it was
//! told in a shared log, serves fixed counters through readers that log
//! each read, and can be told to fail its next `sync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use netfault_api::{BackendKind, Counters, FieldError};

use super::{
    ActiveFault, Availability, Backend, BackendAction, BackendError, BackendOps, CounterReader,
    SandboxCtx, SandboxMemo,
};
use crate::ids::{FaultId, SandboxId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Sync {
        kind: BackendKind,
        sandbox: SandboxId,
        faults: Vec<FaultId>,
    },
    ReadCounters(FaultId),
    ForgetFault(BackendKind, FaultId),
    ForgetSandbox(BackendKind, SandboxId),
}

pub type Log = Arc<Mutex<Vec<Call>>>;

/// What every fake fault has counted.
pub const COUNTED: Counters = Counters {
    matched: 7,
    dropped: 3,
    affected: 1,
};

pub struct FakeBackend<A> {
    log: Log,
    _action: std::marker::PhantomData<fn() -> A>,
    installed: HashMap<SandboxId, Vec<FaultId>>,
    pub fail_next_sync: Arc<AtomicBool>,
}

impl<A> FakeBackend<A> {
    pub fn new(log: &Log) -> FakeBackend<A> {
        FakeBackend {
            log: log.clone(),
            _action: std::marker::PhantomData,
            installed: HashMap::new(),
            fail_next_sync: Arc::default(),
        }
    }

    fn record(&self, call: Call) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }
}

impl<A: BackendAction> BackendOps for FakeBackend<A> {
    fn kind(&self) -> BackendKind {
        A::KIND
    }

    fn counters(&self, fault: &FaultId) -> Option<CounterReader> {
        let installed = self.installed.values().any(|v| v.contains(fault));
        let (log, id) = (self.log.clone(), fault.clone());
        installed.then(|| {
            CounterReader::new(move || {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Call::ReadCounters(id.clone()));
                COUNTED
            })
        })
    }

    fn holds(&self, sandbox: &SandboxId) -> bool {
        self.installed.contains_key(sandbox)
    }

    fn forget_fault(&mut self, fault: &FaultId) {
        self.record(Call::ForgetFault(A::KIND, fault.clone()));
    }

    fn forget_sandbox(
        &mut self,
        sb: &SandboxCtx<'_>,
        _memo: &mut SandboxMemo,
    ) -> Result<(), BackendError> {
        self.installed.remove(sb.id);
        self.record(Call::ForgetSandbox(A::KIND, sb.id.clone()));
        Ok(())
    }

    fn availability(&self) -> Availability {
        Availability {
            section: None,
            actions: vec![A::KIND.as_str()],
        }
    }
}

impl<A: BackendAction> Backend for FakeBackend<A> {
    type Action = A;

    fn admit(&self, _action: &A, active: &[&A]) -> Result<(), FieldError> {
        if active.len() >= 2 {
            return Err(FieldError::conflict("target", "the fake takes two faults"));
        }
        Ok(())
    }

    fn sync(
        &mut self,
        sb: &SandboxCtx<'_>,
        memo: &mut SandboxMemo,
        faults: &mut [ActiveFault<'_, A>],
    ) -> Result<(), BackendError> {
        let ids: Vec<FaultId> = faults.iter().map(|f| f.id.clone()).collect();
        self.record(Call::Sync {
            kind: A::KIND,
            sandbox: sb.id.clone(),
            faults: ids.clone(),
        });
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(BackendError::new("syncing", "the fake was told to fail"));
        }
        for (i, f) in faults.iter_mut().enumerate() {
            *f.memo = Some(i as u32);
        }
        memo.attachment = (!ids.is_empty()).then_some(super::AttachmentRecord {
            created_clsact: true,
        });
        self.installed.insert(sb.id.clone(), ids);
        Ok(())
    }
}
