//! Fault counters shared by the agent and its holder processes: a memfd
//! region of `u64` slots that the holder increments and the agent reads,
//! plus node-wide statistics in slot 0 (queue overflows).
//! What it must not do: know about queues or plans.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use netfault_api::Counters;

/// Counter slots in the region; slot 0 holds node-wide statistics.
const SLOTS: usize = 8192;
/// u64 words per slot.
const WORDS: usize = 3;

/// The counter region shared by the agent and every holder.
struct Region {
    fd: OwnedFd,
    words: &'static [AtomicU64],
}

static REGION: OnceLock<Option<Region>> = OnceLock::new();
/// Free slots (the agent's side only).
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static FREE_INIT: AtomicBool = AtomicBool::new(false);

fn map(fd: OwnedFd) -> std::io::Result<Region> {
    let len = SLOTS * WORDS * 8;
    // SAFETY: a shared mapping of `len` bytes of a memfd that is at least
    // that long; never unmapped, so the 'static slice stays valid.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: page-aligned, zero-initialised memory of SLOTS*WORDS u64s;
    // AtomicU64 has the layout of u64 and is lock-free (address-free), so
    // two processes may share it.
    let words = unsafe { std::slice::from_raw_parts(p as *const AtomicU64, SLOTS * WORDS) };
    Ok(Region { fd, words })
}

/// The agent's region's descriptor, to hand to a holder (created on first use).
pub(super) fn region_fd() -> Option<BorrowedFd<'static>> {
    region().map(|r| r.fd.as_fd())
}

/// A holder maps the region the agent handed it.
pub(super) fn adopt_region(fd: OwnedFd) {
    let _ = REGION.set(
        map(fd)
            .map_err(|e| tracing::warn!(error = %e, "mapping the counter region failed"))
            .ok(),
    );
}

/// The agent's region, created on first use.
fn region() -> Option<&'static Region> {
    REGION
        .get_or_init(|| {
            let create = || -> std::io::Result<Region> {
                // SAFETY: memfd_create with a valid C string.
                let raw =
                    unsafe { libc::memfd_create(c"netfault-counters".as_ptr(), libc::MFD_CLOEXEC) };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: valid fd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), (SLOTS * WORDS * 8) as libc::off_t) }
                    < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                map(fd)
            };
            match create() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "no shared counter region: delay counters read 0");
                    None
                }
            }
        })
        .as_ref()
}

fn word(slot: usize, i: usize) -> Option<&'static AtomicU64> {
    REGION
        .get()
        .and_then(|r| r.as_ref())
        .and_then(|r| r.words.get(slot * WORDS + i))
}

/// Receive-buffer overflows of every queue socket since the agent started:
/// each let at least one packet through undelayed (fail-open). Exposed as
/// `netfault_delay_queue_overflows_total`. Every holder adds its queue
/// socket's overflows (see `NfQueue`) here.
pub fn queue_overflows() -> u64 {
    word(0, 0).map_or(0, |w| w.load(Ordering::Relaxed))
}

/// Malformed DNS messages the DNS engines passed through untouched, over
/// every sandbox (slot 0, word 1).
pub fn dns_malformed() -> u64 {
    word(0, 1).map_or(0, |w| w.load(Ordering::Relaxed))
}

pub(super) fn add_dns_malformed() {
    if let Some(w) = word(0, 1) {
        w.fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) fn add_overflows(n: u64) {
    if let Some(w) = word(0, 0) {
        w.fetch_add(n, Ordering::Relaxed);
    }
}

/// Live counters of one fault: a slot of the shared region.
#[derive(Debug)]
pub struct FaultCounters {
    slot: Option<usize>,
    /// The agent owns (allocates and frees) slots; a holder only counts.
    owned: bool,
}

impl Default for FaultCounters {
    /// Allocates a zeroed slot (the agent's side).
    fn default() -> Self {
        if region().is_none() {
            return FaultCounters {
                slot: None,
                owned: false,
            };
        }
        let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
        if !FREE_INIT.swap(true, Ordering::AcqRel) {
            free.extend((1..SLOTS).rev());
        }
        let slot = free.pop();
        if slot.is_none() {
            tracing::warn!("out of delay counter slots: this fault's counters read 0");
        }
        FaultCounters { slot, owned: true }
    }
}

impl Drop for FaultCounters {
    fn drop(&mut self) {
        if let (true, Some(slot)) = (self.owned, self.slot) {
            for i in 0..WORDS {
                if let Some(w) = word(slot, i) {
                    w.store(0, Ordering::Relaxed);
                }
            }
            FREE.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        }
    }
}

impl FaultCounters {
    /// A holder's view of the agent's slot `slot`.
    pub(super) fn view(slot: usize) -> FaultCounters {
        FaultCounters {
            slot: (slot > 0 && slot < SLOTS).then_some(slot),
            owned: false,
        }
    }

    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    fn add(&self, i: usize) {
        if let Some(w) = self.slot.and_then(|s| word(s, i)) {
            w.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add_matched(&self) {
        self.add(0)
    }

    pub fn add_affected(&self) {
        self.add(1)
    }

    pub fn add_dropped(&self) {
        self.add(2)
    }

    pub fn snapshot(&self) -> Counters {
        let get = |i| {
            self.slot
                .and_then(|s| word(s, i))
                .map_or(0, |w| w.load(Ordering::Relaxed))
        };
        Counters {
            matched: get(0),
            dropped: get(2),
            affected: get(1),
        }
    }
}
