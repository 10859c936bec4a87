//! The packet holder: each sandbox's delay engine runs in its own child
//! process (`netfaultd delay-holder`), not in the agent.
//!
//! Why a process: the engine holds packets (copies of delayed egress packets,
//! and verdicts for ingress packets the kernel keeps in the queue). If the
//! agent died while holding them, they would be lost: the kernel drops the
//! packets of a queue whose socket closes. The holder notices the agent's
//! death as end-of-file on its control pipe, releases every held packet at
//! once (early, never lost), and exits; from then on the queue rule's
//! `bypass` passes traffic undelayed. A holder that dies itself closes its
//! queue, so traffic passes undelayed too.
//!
//! What crosses the process boundary:
//! - file descriptors, inherited at fixed numbers: the NFQUEUE socket (bound
//!   by the agent inside the pod netns), the two raw re-send sockets, and a
//!   shared-memory counter region;
//! - one JSON line per change on the child's stdin: the sandbox's faults
//!   (`spec`, time left, counter slot);
//! - counters, in the shared region: every fault has a slot of three `u64`
//!   (matched, affected, dropped) that the holder increments and the agent
//!   reads.
//!
//! The same holder serves the DNS engine's queue (`netfaultd delay-holder
//! NAME QUEUE`, with the DNS queue number): its faults are `dns-*` faults,
//! whose UDP queries it answers, drops or holds (see `engine`).

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use netfault_api::spec::Limits;
use netfault_api::{Action, FaultSpec, ProxyAction};
use serde_json::{json, Value};

use super::counters::{self, FaultCounters};
use super::engine::{self, Plan, Reinjector, Shared};
use super::error::DelayError;
use super::queue::NfQueue;

/// The hidden subcommand of `netfaultd` that runs a holder.
pub const SUBCOMMAND: &str = "delay-holder";

/// Descriptor numbers in the holder.
const FD_QUEUE: RawFd = 3;
const FD_RAW4: RawFd = 4;
const FD_RAW6: RawFd = 5;
const FD_COUNTERS: RawFd = 6;

/// One fault as sent to a holder.
pub struct HolderFault<'a> {
    pub spec: &'a FaultSpec,
    pub remaining: Duration,
    pub counters: &'a FaultCounters,
}

/// The agent's handle on one holder process.
pub struct Engine {
    child: Child,
    control: Option<ChildStdin>,
    /// The queue number the holder reads.
    queue: u16,
}

/// Moves `fds` to the descriptor numbers 3.. in a forked child (before exec).
fn place_fds(fds: &[RawFd]) -> std::io::Result<()> {
    // First out of the way (above every target), then into place: a source
    // may sit on another source's target number.
    let mut high = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: fcntl on an inherited descriptor; async-signal-safe.
        let h = unsafe { libc::fcntl(*fd, libc::F_DUPFD, 64) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high.push(h);
    }
    for (i, h) in high.iter().enumerate() {
        // SAFETY: dup2 is async-signal-safe; the result has no CLOEXEC.
        if unsafe { libc::dup2(*h, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Nothing else crosses into the holder: every descriptor above these
    // (the copies made above, and any without FD_CLOEXEC another thread
    // holds at this moment, such as libnftables' netlink socket, whose
    // netns the holder would keep alive) closes at exec. A kernel without
    // CLOSE_RANGE_CLOEXEC (before 5.11) leaves them, as before.
    let first = 3 + fds.len() as libc::c_uint;
    // SAFETY: a plain syscall on this process's descriptor table;
    // async-signal-safe.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    Ok(())
}

impl Engine {
    /// Starts a holder serving `queue` (bound inside the pod netns) and
    /// re-sending through `reinjector`. The agent keeps no copy of either.
    pub fn start(
        queue: NfQueue,
        reinjector: Reinjector,
        name: &str,
        queue_num: u16,
    ) -> Result<Engine, DelayError> {
        let thread = |e: std::io::Error| DelayError::Thread(format!("delay holder: {e}"));
        let region = counters::region_fd()
            .ok_or_else(|| DelayError::Thread("delay holder: no shared counter region".into()))?;
        let exe = std::env::current_exe().map_err(thread)?;
        let qfd = queue.into_fd();
        let (v4, v6) = reinjector.into_fds();
        let fds = [
            qfd.as_raw_fd(),
            v4.as_raw_fd(),
            v6.as_raw_fd(),
            region.as_raw_fd(),
        ];
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND)
            .arg(name)
            .arg(queue_num.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure only calls fcntl and dup2 (async-signal-safe).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || place_fds(&fds));
        }
        let mut child = cmd.spawn().map_err(thread)?;
        // Our copies close here; the holder owns the sockets now.
        drop((qfd, v4, v6));
        let control = child.stdin.take();
        Ok(Engine {
            child,
            control,
            queue: queue_num,
        })
    }

    /// The queue number the holder reads.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// How the holder ended, once it has: killed, or exited on an error.
    /// A running holder never exits on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends the sandbox's current faults to the holder.
    pub fn set_faults(&mut self, faults: &[HolderFault<'_>]) -> Result<(), DelayError> {
        let items: Vec<Value> = faults
            .iter()
            .map(|f| {
                let mut spec = f.spec.to_json();
                if let Some(m) = spec.as_object_mut() {
                    m.remove("target");
                }
                json!({
                    "spec": spec,
                    "remaining_ns": f.remaining.as_nanos() as u64,
                    "slot": f.counters.slot().unwrap_or(0),
                })
            })
            .collect();
        let mut line = json!({ "faults": items }).to_string();
        line.push('\n');
        let control = self
            .control
            .as_mut()
            .ok_or_else(|| DelayError::Thread("delay holder: control pipe closed".into()))?;
        control
            .write_all(line.as_bytes())
            .and_then(|_| control.flush())
            .map_err(|e| DelayError::Thread(format!("delay holder gone: {e}")))
    }
}

impl Engine {
    /// Hand-over to a new agent (which has switched the diversion to its
    /// own queue): the holder releases what it holds at the packets'
    /// release times, passes anything new, and exits once it holds nothing.
    /// The control pipe closes here; [`Engine::exited`] tells when it is done.
    pub fn drain(&mut self) {
        if let Some(mut control) = self.control.take() {
            let _ = control
                .write_all(DRAIN_LINE.as_bytes())
                .and_then(|_| control.flush());
        }
    }
}

impl Drop for Engine {
    /// Closes the control pipe: the holder releases every held packet at
    /// once and exits. Waits up to 2 s, then kills it.
    fn drop(&mut self) {
        drop(self.control.take());
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

/// The control line of a hand-over (`{"drain":true}`): see [`Engine::drain`].
const DRAIN_LINE: &str = "{\"drain\":true}\n";

fn is_drain(line: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["drain"] == Value::Bool(true))
}

/// Parses one control line into plans (the holder's side).
fn plans_from_line(line: &str, now: Instant) -> Result<Vec<Plan>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let limits = Limits::stored();
    let mut plans = Vec::new();
    for f in v["faults"].as_array().ok_or("no faults list")? {
        let spec = FaultSpec::parse(&f["spec"], &limits).map_err(|e| e.to_string())?;
        let remaining = Duration::from_nanos(f["remaining_ns"].as_u64().unwrap_or(0));
        let slot = f["slot"].as_u64().unwrap_or(0) as usize;
        let counters = std::sync::Arc::new(FaultCounters::view(slot));
        match &spec.action {
            Action::Delay(action) => plans.push(engine::plan_for(
                spec.direction,
                &spec.r#match,
                action,
                now + remaining,
                counters,
            )),
            Action::Proxy(ProxyAction::Dns(action)) => plans.push(engine::dns_plan(
                &spec.r#match,
                action,
                now + remaining,
                counters,
            )),
            // The agent sends this engine's faults only.
            other => tracing::warn!(
                action = other.type_name(),
                "not a delay or DNS action; ignored"
            ),
        }
    }
    Ok(plans)
}

/// `netfaultd delay-holder NAME QUEUE`: serves the inherited queue (number
/// `queue_num`) until the control pipe closes, then releases everything
/// held and returns.
pub fn holder_main(name: &str, queue_num: u16) -> Result<(), DelayError> {
    let fd = |n: RawFd| {
        // SAFETY: the agent placed these descriptors (see `place_fds`) and
        // nothing else in this process owns them.
        unsafe { OwnedFd::from_raw_fd(n) }
    };
    let counters = fd(FD_COUNTERS);
    counters::adopt_region(counters);
    let queue = NfQueue::from_fd(fd(FD_QUEUE), queue_num);
    let reinjector = Reinjector::from_fds(fd(FD_RAW4), fd(FD_RAW6));
    let shared = std::sync::Arc::new(Shared::default());
    let s = shared.clone();
    let name = name.to_string();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if is_drain(&line) {
                    s.drain();
                    continue;
                }
                match plans_from_line(&line, Instant::now()) {
                    Ok(plans) => s.set_plans(plans),
                    Err(e) => tracing::error!(holder = %name, error = %e, "bad control line"),
                }
            }
            // The agent is gone (or released the sandbox): stop holding.
            s.stop();
        })
        .map_err(|e| DelayError::Thread(e.to_string()))?;
    engine::run(queue, &reinjector, &shared);
    Ok(())
}
