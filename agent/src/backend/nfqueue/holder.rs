//! The packet holder: one child process of the agent (`netfaultd
//! delay-holder`) runs every sandbox's queue engine, the delay engine's and
//! the DNS engine's, each on a thread of its own.
//!
//! Why a process: the engines hold packets (copies of delayed egress
//! packets, and verdicts for ingress packets the kernel keeps in the
//! queue). If the agent died while holding them, they would be lost: the
//! kernel drops the packets of a queue whose socket closes. The holder
//! notices the agent's death as end-of-file on its control socket, releases
//! every held packet at once (early, never lost), and exits; from then on
//! the queue rules' `bypass` passes traffic undelayed. A holder that dies
//! itself closes every queue, so traffic passes undelayed too, and the
//! agent starts a new one and attaches every sandbox again (see
//! `lost_sandboxes`).
//!
//! Why one process: a process per sandbox cost about 1.1 MiB of
//! proportional set size each (its own heap, stacks, page tables), over
//! 1 GiB for 250 pods with delay and DNS faults, and a fork, an exec and an
//! exit wait (10-20 ms) on the first and the last fault of a sandbox. A
//! sandbox is now a thread and a few buffers in the one holder, attached and
//! detached by a message.
//!
//! The control socket (`SOCK_SEQPACKET`, the holder's descriptor 3; the
//! shared counter region is 4) carries one JSON request per message, each
//! answered in order with `{"ok":true}` or `{"error":"..."}`:
//! - `{"op":"attach","key":K,"queue":N}` with the sandbox's NFQUEUE socket
//!   (bound by the agent inside the pod netns) and its two raw re-send
//!   sockets as `SCM_RIGHTS`: starts serving them;
//! - `{"op":"faults","key":K,"faults":[...]}`: the sandbox's faults (`spec`,
//!   time left, counter slot);
//! - `{"op":"detach","key":K}`: releases what is held at once, unbinds the
//!   queue and answers once nothing of the sandbox is held;
//! - `{"op":"drain"}`: a hand-over to a new agent; when the socket then
//!   closes, every engine releases what it holds at the packets' times.
//!
//! Counters live in the shared region: every fault has a slot of three
//! `u64` (matched, affected, dropped) that the holder increments and the
//! agent reads.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netfault_api::spec::Limits;
use netfault_api::{Action, FaultSpec, ProxyAction};
use serde_json::{json, Value};

use super::counters::{self, FaultCounters};
use super::engine::{self, Plan, Reinjector, Shared};
use super::error::DelayError;
use super::queue::NfQueue;

/// The hidden subcommand of `netfaultd` that runs the holder.
pub const SUBCOMMAND: &str = "delay-holder";

/// Descriptor numbers in the holder.
const FD_CONTROL: RawFd = 3;
const FD_COUNTERS: RawFd = 4;

/// How long the agent waits for the holder's answer before it counts the
/// holder as hung, kills it and starts over.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest control message (a sandbox's faults, as JSON).
const MAX_MESSAGE: usize = 1 << 20;
/// Stack of a sandbox's engine thread: its loop keeps its state on the
/// heap, so this is mostly never touched.
const ENGINE_STACK: usize = 256 << 10;

/// One fault as sent to the holder.
pub struct HolderFault<'a> {
    pub spec: &'a FaultSpec,
    pub remaining: Duration,
    pub counters: &'a FaultCounters,
}

/// The running holder process.
struct Process {
    child: Child,
    control: OwnedFd,
    generation: u64,
}

/// The agent's holder: the live one, if started, and what it knows of the
/// earlier ones.
#[derive(Default)]
struct Slot {
    live: Option<Process>,
    /// Generations of the holder started so far.
    generation: u64,
    /// Generations that died (killed, crashed, hung): their sandboxes are
    /// lost and must be attached again.
    dead: Vec<u64>,
    /// Holders handed over to a new agent, finishing their held packets.
    draining: Vec<Child>,
}

static SLOT: Mutex<Slot> = Mutex::new(Slot {
    live: None,
    generation: 0,
    dead: Vec::new(),
    draining: Vec::new(),
});

fn slot() -> std::sync::MutexGuard<'static, Slot> {
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

fn gone(e: impl std::fmt::Display) -> DelayError {
    DelayError::Thread(format!("delay holder: {e}"))
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

/// A `SOCK_SEQPACKET` pair, both ends close-on-exec (the child's end is
/// placed at its descriptor 3 without the flag, see `place_fds`).
fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Sends one message, with `fds` as `SCM_RIGHTS`.
fn send_msg(fd: &OwnedFd, msg: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [IoSlice::new(msg)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(drop)
        .map_err(std::io::Error::from)
}

/// Receives one message into `buf`: its length and the descriptors that
/// came with it; `None` at end-of-file.
fn recv_msg(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<(usize, Vec<OwnedFd>)>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::IoSliceMut;
    loop {
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        return Ok(Some((n, fds)));
    }
}

impl Process {
    fn start(generation: u64) -> Result<Process, DelayError> {
        let region = counters::region_fd().ok_or_else(|| gone("no shared counter region"))?;
        let exe = std::env::current_exe().map_err(gone)?;
        let (ours, theirs) = seqpacket_pair().map_err(gone)?;
        let timeout = nix::sys::time::TimeVal::new(
            ANSWER_TIMEOUT.as_secs() as _,
            ANSWER_TIMEOUT.subsec_micros() as _,
        );
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(gone)?;
        let fds = [theirs.as_raw_fd(), region.as_raw_fd()];
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure only calls fcntl, dup2 and close_range
        // (async-signal-safe).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || place_fds(&fds));
        }
        let child = cmd.spawn().map_err(gone)?;
        drop(theirs);
        Ok(Process {
            child,
            control: ours,
            generation,
        })
    }

    /// One request and its answer: `Err` when the holder did not answer,
    /// `Ok(Err(reason))` when it refused.
    fn ask(&mut self, request: &Value, fds: &[RawFd]) -> Result<Result<(), String>, DelayError> {
        send_msg(&self.control, request.to_string().as_bytes(), fds).map_err(gone)?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = recv_msg(&self.control, &mut buf)
            .map_err(gone)?
            .ok_or_else(|| gone("it closed its control socket"))?;
        let answer: Value = serde_json::from_slice(&buf[..n]).map_err(gone)?;
        Ok(match answer["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        })
    }
}

impl Slot {
    /// The live holder, started if there is none (or the last one died).
    /// Forgets the live holder as dead: its sandboxes are lost.
    fn bury(&mut self) {
        if let Some(p) = self.live.take() {
            self.dead.push(p.generation);
        }
    }

    /// Buries the live holder if its process has exited.
    fn reap(&mut self) {
        if let Some(Ok(Some(status))) = self.live.as_mut().map(|p| p.child.try_wait()) {
            tracing::warn!(%status, "the delay holder process died");
            self.bury();
        }
    }

    fn live(&mut self) -> Result<&mut Process, DelayError> {
        self.reap();
        if self.live.is_none() {
            self.generation += 1;
            self.live = Some(Process::start(self.generation)?);
        }
        self.live.as_mut().ok_or_else(|| gone("not started"))
    }

    /// Asks the live holder of `generation`; a holder that does not answer
    /// is killed (its sandboxes count as lost).
    fn ask(&mut self, generation: u64, request: &Value, fds: &[RawFd]) -> Result<(), DelayError> {
        let Some(p) = self.live.as_mut().filter(|p| p.generation == generation) else {
            return Err(gone("the holder serving this sandbox is gone"));
        };
        match p.ask(request, fds) {
            Ok(answer) => answer.map_err(gone),
            Err(e) => {
                let _ = p.child.kill();
                let _ = p.child.wait();
                self.bury();
                Err(e)
            }
        }
    }
}

/// The agent's handle on one sandbox's engine in the holder.
pub struct Engine {
    key: String,
    /// The queue number the engine reads.
    queue: u16,
    generation: u64,
}

impl Engine {
    /// Attaches a sandbox's `queue` (bound inside the pod netns) and
    /// `reinjector` to the holder, under `key` (unique per table and
    /// sandbox). The agent keeps no copy of either.
    pub fn start(
        queue: NfQueue,
        reinjector: Reinjector,
        key: &str,
        queue_num: u16,
    ) -> Result<Engine, DelayError> {
        let qfd = queue.into_fd();
        let (v4, v6) = reinjector.into_fds();
        let mut slot = slot();
        let generation = slot.live()?.generation;
        slot.ask(
            generation,
            &json!({"op": "attach", "key": key, "queue": queue_num}),
            &[qfd.as_raw_fd(), v4.as_raw_fd(), v6.as_raw_fd()],
        )?;
        Ok(Engine {
            key: key.to_string(),
            queue: queue_num,
            generation,
        })
    }

    /// The queue number the engine reads.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Whether the holder serving this engine died (killed, crashed, or
    /// hung and killed): then the sandbox must be attached again.
    pub fn exited(&mut self) -> Option<String> {
        let mut slot = slot();
        slot.reap();
        slot.dead
            .contains(&self.generation)
            .then(|| "its holder process died".to_string())
    }

    /// Sends the sandbox's current faults to its engine.
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
        slot().ask(
            self.generation,
            &json!({"op": "faults", "key": self.key, "faults": items}),
            &[],
        )
    }
}

impl Drop for Engine {
    /// Detaches the sandbox: its engine releases every held packet at once
    /// and unbinds the queue before the holder answers.
    fn drop(&mut self) {
        let mut slot = slot();
        if slot.live.as_ref().map(|p| p.generation) != Some(self.generation) {
            return;
        }
        if let Err(e) = slot.ask(
            self.generation,
            &json!({"op": "detach", "key": self.key}),
            &[],
        ) {
            tracing::warn!(sandbox = %self.key, error = %e, "detaching from the delay holder");
        }
    }
}

/// Hand-over to a new agent (which has switched every diversion to its own
/// queues): the holder releases what it holds at the packets' release
/// times, passes anything new, and exits once it holds nothing. Its
/// control socket closes here; [`drained`] tells when it is done.
pub fn drain() {
    let mut slot = slot();
    if let Some(mut p) = slot.live.take() {
        if !matches!(p.ask(&json!({"op": "drain"}), &[]), Ok(Ok(()))) {
            tracing::warn!("the delay holder did not take the drain: it releases at once");
        }
        slot.draining.push(p.child);
    }
}

/// Whether every drained holder has exited.
pub fn drained() -> bool {
    slot()
        .draining
        .iter_mut()
        .all(|c| !matches!(c.try_wait(), Ok(None)))
}

/// The live holder's process id, if one runs.
pub fn holder_pid() -> Option<u32> {
    slot().live.as_ref().map(|p| p.child.id())
}

/// Parses one control line into plans (the holder's side).
fn plans_from_line(v: &Value, now: Instant) -> Result<Vec<Plan>, String> {
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

/// A sandbox's engine in the holder.
struct Attached {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

impl Attached {
    /// Releases what is held at once (or, after a drain, at its time) and
    /// waits until the engine unbound its queue.
    fn stop(self) {
        self.shared.stop();
        let _ = self.thread.join();
    }
}

/// What the holder answers to one request.
fn serve(
    request: &[u8],
    mut fds: Vec<OwnedFd>,
    engines: &mut HashMap<String, Attached>,
) -> Result<(), String> {
    let v: Value = serde_json::from_slice(request).map_err(|e| e.to_string())?;
    let key = v["key"].as_str().unwrap_or_default().to_string();
    match v["op"].as_str() {
        Some("attach") => {
            let num = v["queue"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or("attach: no queue number")?;
            if fds.len() != 3 {
                return Err(format!("attach: {} descriptors, not 3", fds.len()));
            }
            let v6 = fds.pop().ok_or("attach: descriptors")?;
            let v4 = fds.pop().ok_or("attach: descriptors")?;
            let q = fds.pop().ok_or("attach: descriptors")?;
            if let Some(old) = engines.remove(&key) {
                old.stop();
            }
            let shared = Arc::new(Shared::with_wake());
            let s = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("q{num:x}"))
                .stack_size(ENGINE_STACK)
                .spawn(move || {
                    let mut queue = NfQueue::from_fd(q, num);
                    let reinjector = Reinjector::from_fds(v4, v6);
                    engine::run(&mut queue, &reinjector, &s);
                    // Nothing is queued now (length 0, all released): the
                    // number is free for the next attach at once; the
                    // socket closes off this path (an RCU grace period).
                    if let Err(e) = queue.unbind() {
                        tracing::warn!(queue = num, error = %e, "unbinding the queue");
                    }
                    netfault_sys::nfnetlink::close_later(queue.into_fd());
                })
                .map_err(|e| format!("attach: engine thread: {e}"))?;
            engines.insert(key, Attached { shared, thread });
            Ok(())
        }
        Some("faults") => {
            let plans = plans_from_line(&v, Instant::now())?;
            engines
                .get(&key)
                .ok_or_else(|| format!("faults: {key} is not attached"))?
                .shared
                .set_plans(plans);
            Ok(())
        }
        Some("detach") => {
            if let Some(a) = engines.remove(&key) {
                a.stop();
            }
            Ok(())
        }
        Some("drain") => {
            for a in engines.values() {
                a.shared.drain();
            }
            Ok(())
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

/// `netfaultd delay-holder AGENT_PID`: serves the agent's requests on the
/// inherited control socket until it closes, then releases everything
/// held (at once, or at its time after a drain) and returns.
pub fn holder_main() -> Result<(), DelayError> {
    let fd = |n: RawFd| {
        // SAFETY: the agent placed these descriptors (see `place_fds`) and
        // nothing else in this process owns them.
        unsafe { OwnedFd::from_raw_fd(n) }
    };
    counters::adopt_region(fd(FD_COUNTERS));
    let control = fd(FD_CONTROL);
    let mut engines: HashMap<String, Attached> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, fds) = match recv_msg(&control, &mut buf) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "delay holder: reading the control socket");
                break;
            }
        };
        let answer = match serve(&buf[..n], fds, &mut engines) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"error": e}),
        };
        if send_msg(&control, answer.to_string().as_bytes(), &[]).is_err() {
            break;
        }
    }
    // The agent is gone (or handed over): every engine stops together.
    for a in engines.values() {
        a.shared.stop();
    }
    for (_, a) in engines.drain() {
        let _ = a.thread.join();
    }
    Ok(())
}
