//! netfault-ebpf: the tc datapath (C programs built by `build.rs`), loaded
//! once per agent with aya and shared by every enrolled sandbox.
//!
//! What it owns: the loaded programs and their maps, attaching them on an
//! interface of the *current* network namespace, and the netns cookie that
//! keys a sandbox's rules. What it must not do: enter namespaces itself —
//! callers run the `*_here` functions on a thread that already did `setns`.

pub mod rule;
pub mod tc;

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use aya::Ebpf;

pub use rule::{RawCounters, RawRule, RawState, MAX_SANDBOXES, RULES_PER_SANDBOX};
pub use tc::{FilterInfo, Hook, QdiscInfo, TcError, TcSocket};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.bpf.o"));

/// Program names, as they appear on tc filters (`tc filter show`).
pub const EGRESS_PROGRAM: &str = "nf_egress";
pub const INGRESS_PROGRAM: &str = "nf_ingress";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("interface {ifname:?} not found in the target netns")]
    NoInterface { ifname: String },
    #[error("tc: {0}")]
    Tc(#[from] TcError),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("rule index {0} out of range")]
    OutOfRange(u32),
}

/// A pod address as the program keys it (`struct addr_key`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddrKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

// SAFETY: plain bytes, no padding.
unsafe impl aya::Pod for AddrKey {}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        let mut k = AddrKey::default();
        match ip {
            IpAddr::V4(a) => {
                k.family = 4;
                k.addr[..4].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                k.family = 6;
                k.addr = a.octets();
            }
        }
        k
    }
}

/// File descriptors of the loaded programs. Fds are process-wide, so a
/// thread that entered another netns can attach them there.
#[derive(Debug, Clone, Copy)]
pub struct ProgramFds {
    pub egress: i32,
    pub ingress: i32,
}

/// The loaded datapath: programs plus typed maps.
pub struct Datapath {
    // Keeps the programs loaded for as long as the agent runs.
    _ebpf: Ebpf,
    fds: ProgramFds,
    sandboxes: HashMap<MapData, AddrKey, u32>,
    rules: Array<MapData, RawRule>,
    counters: PerCpuArray<MapData, RawCounters>,
    last_draw: PerCpuArray<MapData, u32>,
    state: Array<MapData, RawState>,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<i32, DatapathError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    prog.load()
        .map_err(|source| DatapathError::Program { name, source })?;
    let fd = prog
        .fd()
        .map_err(|source| DatapathError::Program { name, source })?;
    Ok(fd.as_fd().as_raw_fd())
}

impl Datapath {
    /// Loads the object and both programs. Requires CAP_BPF/CAP_NET_ADMIN.
    pub fn load() -> Result<Datapath, DatapathError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        let egress = load_program(&mut ebpf, EGRESS_PROGRAM)?;
        let ingress = load_program(&mut ebpf, INGRESS_PROGRAM)?;
        let map_err = |name| move |source| DatapathError::Map { name, source };
        let sandboxes = HashMap::try_from(take_map(&mut ebpf, "nf_sandboxes")?)
            .map_err(map_err("nf_sandboxes"))?;
        let rules =
            Array::try_from(take_map(&mut ebpf, "nf_rules")?).map_err(map_err("nf_rules"))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "nf_counters")?)
            .map_err(map_err("nf_counters"))?;
        let last_draw = PerCpuArray::try_from(take_map(&mut ebpf, "nf_last_draw")?)
            .map_err(map_err("nf_last_draw"))?;
        let state =
            Array::try_from(take_map(&mut ebpf, "nf_state")?).map_err(map_err("nf_state"))?;
        Ok(Datapath {
            _ebpf: ebpf,
            fds: ProgramFds { egress, ingress },
            sandboxes,
            rules,
            counters,
            last_draw,
            state,
        })
    }

    pub fn program_fds(&self) -> ProgramFds {
        self.fds
    }

    /// Routes packets from/to `addr` (a pod's own address) to rule block `slot`.
    pub fn bind_address(&mut self, addr: IpAddr, slot: u32) -> Result<(), DatapathError> {
        if slot >= MAX_SANDBOXES {
            return Err(DatapathError::OutOfRange(slot));
        }
        self.sandboxes
            .insert(AddrKey::from(addr), slot, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_sandboxes",
                source,
            })
    }

    pub fn unbind_address(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        match self.sandboxes.remove(&AddrKey::from(addr)) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                name: "nf_sandboxes",
                source,
            }),
        }
    }

    fn index(slot: u32, rule: u32) -> Result<u32, DatapathError> {
        if slot >= MAX_SANDBOXES || rule >= RULES_PER_SANDBOX {
            return Err(DatapathError::OutOfRange(slot * RULES_PER_SANDBOX + rule));
        }
        Ok(slot * RULES_PER_SANDBOX + rule)
    }

    /// Installs a rule, with fresh counters, correlation, token bucket
    /// (full) and Gilbert-Elliott state (good).
    pub fn set_rule(&mut self, slot: u32, rule: u32, raw: &RawRule) -> Result<(), DatapathError> {
        let idx = Self::index(slot, rule)?;
        self.counters
            .set(idx, zeroed()?, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_counters",
                source,
            })?;
        self.last_draw
            .set(idx, zeroed()?, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_last_draw",
                source,
            })?;
        self.state
            .set(idx, RawState::default(), 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_state",
                source,
            })?;
        self.rules
            .set(idx, *raw, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_rules",
                source,
            })
    }

    /// Frees a rule slot; the program skips it from the next packet on.
    pub fn clear_rule(&mut self, slot: u32, rule: u32) -> Result<(), DatapathError> {
        self.set_rule_raw(slot, rule, &RawRule::default())
    }

    fn set_rule_raw(&mut self, slot: u32, rule: u32, raw: &RawRule) -> Result<(), DatapathError> {
        let idx = Self::index(slot, rule)?;
        self.rules
            .set(idx, *raw, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_rules",
                source,
            })
    }

    /// Sums a rule's per-CPU counters.
    pub fn counters(&self, slot: u32, rule: u32) -> Result<RawCounters, DatapathError> {
        let idx = Self::index(slot, rule)?;
        let values = self
            .counters
            .get(&idx, 0)
            .map_err(|source| DatapathError::Map {
                name: "nf_counters",
                source,
            })?;
        Ok(values
            .iter()
            .fold(RawCounters::default(), |acc, c| RawCounters {
                matched: acc.matched + c.matched,
                dropped: acc.dropped + c.dropped,
                affected: acc.affected + c.affected,
            }))
    }
}

/// One zero value per possible CPU, to reset a per-CPU map entry.
fn zeroed<T: aya::Pod + Default + Clone>() -> Result<PerCpuValues<T>, DatapathError> {
    let io = |source| DatapathError::Io {
        op: "reading the possible CPUs",
        source,
    };
    let n = aya::util::nr_cpus().map_err(|(_, source)| io(source))?;
    PerCpuValues::try_from(vec![T::default(); n]).map_err(io)
}

/// Current CLOCK_BOOTTIME in nanoseconds: the clock the program's deadline
/// check reads (`bpf_ktime_get_boot_ns`), which keeps counting in suspend.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The global-scope addresses of `ifname` in the calling thread's netns:
/// what the program keys a sandbox's packets on.
pub fn addresses_here(ifname: &str) -> Result<Vec<IpAddr>, DatapathError> {
    let ifindex = ifindex_here(ifname)?;
    Ok(TcSocket::open()?.addresses(ifindex)?)
}

fn ifindex_here(ifname: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|_| DatapathError::NoInterface {
        ifname: ifname.to_string(),
    })
}

/// What attaching changed, so that detaching restores exactly the previous state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attachment {
    /// We created the clsact qdisc (there was none), so we remove it on detach.
    pub created_clsact: bool,
}

/// Attaches (or atomically re-points, after an agent restart) both programs
/// on `ifname` in the calling thread's netns.
pub fn attach_here(fds: ProgramFds, ifname: &str) -> Result<Attachment, DatapathError> {
    let ifindex = ifindex_here(ifname)?;
    let mut sock = TcSocket::open()?;
    let created_clsact = sock.add_clsact(ifindex)?;
    let result = sock
        .attach_bpf(ifindex, Hook::Egress, fds.egress, EGRESS_PROGRAM)
        .and_then(|_| sock.attach_bpf(ifindex, Hook::Ingress, fds.ingress, INGRESS_PROGRAM));
    if let Err(e) = result {
        // Roll back so a failed attach leaves nothing behind.
        let _ = sock.detach_bpf(ifindex, Hook::Egress);
        let _ = sock.detach_bpf(ifindex, Hook::Ingress);
        if created_clsact {
            let _ = sock.del_clsact(ifindex);
        }
        return Err(e.into());
    }
    Ok(Attachment { created_clsact })
}

/// Removes netfault's filters from `ifname` in the calling thread's netns,
/// and the clsact qdisc if netfault created it and nothing else uses it.
/// A missing interface is not an error: the pod is gone.
pub fn detach_here(ifname: &str, attachment: Attachment) -> Result<(), DatapathError> {
    let ifindex = match ifindex_here(ifname) {
        Ok(i) => i,
        Err(DatapathError::NoInterface { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut sock = TcSocket::open()?;
    sock.detach_bpf(ifindex, Hook::Egress)?;
    sock.detach_bpf(ifindex, Hook::Ingress)?;
    if attachment.created_clsact {
        let others = sock.filters(ifindex, Hook::Egress)?.len()
            + sock.filters(ifindex, Hook::Ingress)?.len();
        if others == 0 {
            sock.del_clsact(ifindex)?;
        }
    }
    Ok(())
}

/// Every tc object on `ifname` in the calling thread's netns: qdiscs and
/// clsact filters. For leftover checks.
pub fn tc_state_here(ifname: &str) -> Result<(Vec<QdiscInfo>, Vec<FilterInfo>), DatapathError> {
    let ifindex = ifindex_here(ifname)?;
    let mut sock = TcSocket::open()?;
    let qdiscs = sock.qdiscs(ifindex)?;
    let mut filters = sock.filters(ifindex, Hook::Egress)?;
    filters.extend(sock.filters(ifindex, Hook::Ingress)?);
    Ok((qdiscs, filters))
}
