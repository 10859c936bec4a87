//! Scale: one node with 250 enrolled pods, half of them with one fault each,
//! spread over the backends; what that costs the agent and how fast it is,
//! side by side with an idle node.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench scale
//! ```
//!
//! `NETFAULT_SCALE_PODS` (default 250; at least 14, a fault of every kind; at most 252: the node's pod range is
//! a /24) pods are enrolled one after the other through the real CNI chain
//! (bridge + host-local + netfault). The first half get one fault each, in
//! turn: eBPF `loss`, `corrupt`, `rate`; `delay` (NFQUEUE, a thread of the
//! one holder process per pod); proxy `http-abort`, `tcp-bandwidth`;
//! `dns-error` (proxy and its DNS queue, a second holder thread per pod). It
//! prints:
//!
//! 1. enrolment: the whole time and p50/p99 per CNI ADD (the chain, and the
//!    netfault plugin alone); fault creation: p50/p99 per POST;
//! 2. memory and descriptors at each step: the agent's RSS (goal <= 64 MiB)
//!    and PSS, its open descriptors and `RLIMIT_NOFILE`, the holder
//!    processes (count, total RSS, total PSS);
//! 3. restart (SIGTERM, then SIGKILL), until every fault is back: ready
//!    (`/healthz`), every fault `active` in `GET /v1/faults`, and on the wire
//!    for one pod of each backend (loss seen by a receiver, delay in one-way
//!    times, the 503 seen by an HTTP client); holders after, orphans;
//! 4. time to effect (POST of a blackhole to the first dropped datagram of a
//!    live UDP stream, and DELETE to the first delivered again) on this
//!    loaded node against an idle node (its own agent, two pods), 120
//!    samples each, the order of the two alternating across 10 rounds; the
//!    per-round ratio loaded / idle of the effect p50.
//!
//! The wire checks of step 3 are first run before any fault exists, where
//! each must see no effect. The bench prints; it does not pass or fail on
//! the numbers (a check that cannot see its effect is an error). It takes
//! about 2-3 minutes.
//!
//! Bench honesty (issue 13), what applies here:
//! - rotation: only step 4 compares two configurations (loaded and idle
//!   node); their order alternates across rounds. Steps 1-3 measure this
//!   node alone, with nothing to rotate against;
//! - verification: every fault's effect is checked on the wire for one pod
//!   per backend after the POSTs (and after each restart, where a failure is
//!   reported in the restart's row); in step 4 every
//!   cycle's blackhole must have counted drops (its `dropped` counter, read
//!   before the DELETE). A failed check prints "NOT VERIFIED" and exits 1;
//! - paired medians: step 4 prints the per-round ratio loaded / idle of the
//!   effect p50 (both measured in the same round) as median [min..max];
//!   memory and enrolment have no baseline to pair with;
//! - every tail is "p99" only over at least 100 samples, else "max"
//!   (`testbed::summary_ms`; `NETFAULT_SCALE_TTE_ROUNDS`, default 10, sets
//!   step 4's rounds of 12 cycles per node).

use std::collections::BTreeMap;
use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use testbed::env_or as env;
use testbed::procstat::AgentMemory;
use testbed::{
    http_get, http_serve, in_netns, ms, procstat, quantile, summary_ms, udp_probe, Agent,
    AgentNode, NodeOptions, Pod,
};

/// The node's pod range is a /24: the gateway and 252 pods at most here.
const MAX_PODS: usize = 252;
/// Time to effect: rounds, and samples per configuration per round.
const TTE_ROUNDS: usize = 10;
const TTE_PER_ROUND: usize = 12;
/// Time to effect: stream pacing and the pauses after POST and DELETE.
const STREAM_INTERVAL: Duration = Duration::from_micros(50);
const TTE_PAUSE: Duration = Duration::from_millis(30);
/// How long a restarted agent may take to bring every fault back.
const GIVE_UP: Duration = Duration::from_secs(60);

fn main() {
    testbed::bench_main("scale", run);
}

// ---------------------------------------------------------------------------
// The faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Loss,
    Corrupt,
    Rate,
    Delay,
    HttpAbort,
    TcpBandwidth,
    DnsError,
}

const KINDS: [Kind; 7] = [
    Kind::Loss,
    Kind::Corrupt,
    Kind::Rate,
    Kind::Delay,
    Kind::HttpAbort,
    Kind::TcpBandwidth,
    Kind::DnsError,
];

/// The kinds checked on the wire after a restart: one per backend.
const WIRE: [Kind; 3] = [Kind::Loss, Kind::Delay, Kind::HttpAbort];

const HTTP_PORT: u16 = 8080;

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Loss => "loss (ebpf)",
            Kind::Corrupt => "corrupt (ebpf)",
            Kind::Rate => "rate (ebpf)",
            Kind::Delay => "delay (nfqueue)",
            Kind::HttpAbort => "http-abort (proxy)",
            Kind::TcpBandwidth => "tcp-bandwidth (proxy)",
            Kind::DnsError => "dns-error (proxy+dns)",
        }
    }

    /// The fault on `pod`: egress, on a port of its own (UDP 9001-9004, TCP
    /// 8080-8081; DNS on 53), so the faults never touch each other.
    fn body(self, pod: &Pod) -> Value {
        let udp = |port: u16| json!({"protocol": "udp", "ports": port.to_string()});
        let tcp = |port: u16| json!({"protocol": "tcp", "ports": port.to_string()});
        let (matcher, action) = match self {
            Kind::Loss => (udp(9001), json!({"type": "loss", "percent": 50})),
            Kind::Corrupt => (udp(9002), json!({"type": "corrupt", "percent": 50})),
            Kind::Rate => (udp(9003), json!({"type": "rate", "rate": "1mbit"})),
            Kind::Delay => (udp(9004), json!({"type": "delay", "latency": "20ms"})),
            Kind::HttpAbort => (tcp(HTTP_PORT), json!({"type": "http-abort", "status": 503})),
            Kind::TcpBandwidth => (tcp(8081), json!({"type": "tcp-bandwidth", "rate": "1mbit"})),
            Kind::DnsError => (json!({}), json!({"type": "dns-error"})),
        };
        json!({
            "target": {"sandbox": pod.container_id},
            "direction": "egress",
            "match": matcher,
            "action": action,
            "duration": "30m",
        })
    }

    /// Whether this kind's fault is in effect on `from`'s traffic to `srv`,
    /// as the wire shows it (only for the kinds of [`WIRE`]).
    fn in_effect(self, from: &Pod, srv: &Pod) -> anyhow::Result<bool> {
        let ip = srv.ipv4().context("the server pod has no IPv4")?;
        match self {
            // 200 datagrams, 50 % loss: fewer than 180 arrive (p < 1e-20
            // otherwise); with no fault all 200 do.
            Kind::Loss => {
                let p = udp_probe(from, srv, ip, 9001, 200, Duration::from_micros(100))?;
                Ok(p.unique_received() < 180)
            }
            // 20 ms added: the median one-way time over 20 datagrams.
            Kind::Delay => {
                let p = udp_probe(from, srv, ip, 9004, 20, Duration::from_millis(1))?;
                Ok(p.median_latency()
                    .is_some_and(|d| d >= Duration::from_millis(15)))
            }
            Kind::HttpAbort => Ok(http_get(from, ip, HTTP_PORT, "/")?.status == 503),
            other => Err(anyhow!("{} has no wire check", other.name())),
        }
    }
}

// ---------------------------------------------------------------------------
// Time to effect: a live UDP stream with sequence numbers

struct Stream {
    base: Instant,
    port: u16,
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    sender: JoinHandle<(Vec<u64>, Vec<bool>)>,
    receiver: JoinHandle<Vec<bool>>,
}

struct StreamLog {
    sent_ns: Vec<u64>,
    /// Whether `send` failed, by sequence number.
    send_failed: Vec<bool>,
    received: Vec<bool>,
}

impl StreamLog {
    fn delivered(&self, seq: usize) -> bool {
        self.received.get(seq).copied().unwrap_or(false)
    }

    /// The first sequence number sent at or after `t`.
    fn seq_at(&self, t: u64) -> usize {
        self.sent_ns.partition_point(|&s| s < t)
    }
}

fn ns_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Stream {
    /// One datagram every [`STREAM_INTERVAL`] from `client` to `server`,
    /// each carrying its sequence number; the send time is taken just
    /// before `send`.
    fn start(client: &Pod, server: &Pod) -> anyhow::Result<Stream> {
        let sip = server.ipv4().context("the stream server has no IPv4")?;
        let rx = in_netns(server.netns_path(), move || UdpSocket::bind((sip, 0)))?
            .context("binding the stream receiver")?;
        rx.set_read_timeout(Some(Duration::from_millis(20)))?;
        // A large receive buffer, so the receiver never drops on its own.
        let size: libc::c_int = 32 << 20;
        // SAFETY: a valid socket fd and a c_int option value of the given length.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&rx),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "SO_RCVBUFFORCE on the stream receiver: {}",
                io::Error::last_os_error()
            );
        }
        let dest = rx.local_addr()?;
        let tx = in_netns(client.netns_path(), move || -> io::Result<UdpSocket> {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect(dest)?;
            Ok(s)
        })?
        .context("the stream sender")?;
        let base = Instant::now();
        let stop_recv = Arc::new(AtomicBool::new(false));
        let stop = stop_recv.clone();
        let receiver = thread::spawn(move || {
            let mut got = vec![false; 1 << 18];
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    if n >= 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&buf[..8]);
                        let seq = usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX);
                        if seq < 1 << 28 {
                            if seq >= got.len() {
                                got.resize((seq + 1).next_power_of_two(), false);
                            }
                            got[seq] = true;
                        }
                    }
                }
            }
            got
        });
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop = stop_send.clone();
        let sender = thread::spawn(move || {
            // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
            }
            let step = u64::try_from(STREAM_INTERVAL.as_nanos()).unwrap_or(50_000);
            let mut sent = Vec::with_capacity(1 << 18);
            let mut failed = Vec::with_capacity(1 << 18);
            let mut msg = [0u8; 64];
            let mut next = ns_since(base);
            while !stop.load(Ordering::Relaxed) {
                let now = ns_since(base);
                if now < next {
                    thread::sleep(Duration::from_nanos(next - now));
                }
                msg[..8].copy_from_slice(&(sent.len() as u64).to_be_bytes());
                let t = ns_since(base);
                sent.push(t);
                // A failed send is a datagram not delivered, counted apart.
                failed.push(tx.send(&msg).is_err());
                next += step;
                if t > next + 1_000_000 {
                    next = t + step;
                }
            }
            (sent, failed)
        });
        Ok(Stream {
            base,
            port: dest.port(),
            stop_send,
            stop_recv,
            sender,
            receiver,
        })
    }

    fn now(&self) -> u64 {
        ns_since(self.base)
    }

    fn finish(self) -> anyhow::Result<StreamLog> {
        self.stop_send.store(true, Ordering::Relaxed);
        let (sent_ns, send_failed) = self
            .sender
            .join()
            .map_err(|_| anyhow!("stream sender panicked"))?;
        thread::sleep(Duration::from_millis(100));
        self.stop_recv.store(true, Ordering::Relaxed);
        let received = self
            .receiver
            .join()
            .map_err(|_| anyhow!("stream receiver panicked"))?;
        Ok(StreamLog {
            sent_ns,
            send_failed,
            received,
        })
    }
}

/// Time-to-effect samples of one configuration.
#[derive(Default)]
struct Tte {
    post_ms: Vec<f64>,
    effect_ms: Vec<f64>,
    delete_ms: Vec<f64>,
    removal_ms: Vec<f64>,
    /// Delivered though sent after POST returned; lost though sent after
    /// DELETE returned (both must be 0); cycles with no effect seen.
    leaked: usize,
    lost_after: usize,
    /// Of `lost_after`: those whose `send` failed.
    lost_after_send_failed: usize,
    missed: usize,
    /// The effect p50 of each round (paired with the other node's).
    round_effect_p50: Vec<f64>,
}

/// `n` cycles of: t0 POST t1, pause, t2 DELETE t3, pause; an egress
/// blackhole of the stream's port on `client`.
fn tte_block(
    agent: &Agent,
    client: &Pod,
    server: &Pod,
    n: usize,
    out: &mut Tte,
) -> anyhow::Result<()> {
    let stream = Stream::start(client, server)?;
    let body = json!({
        "target": {"sandbox": client.container_id},
        "direction": "egress",
        "match": {"protocol": "udp", "ports": stream.port.to_string()},
        "action": {"type": "blackhole"},
        "duration": "60s",
    });
    thread::sleep(Duration::from_millis(100));
    let mut cycles = Vec::with_capacity(n);
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..n {
            let t0 = stream.now();
            let id = agent.post_fault(&body)?;
            let t1 = stream.now();
            thread::sleep(TTE_PAUSE);
            // The stream's datagrams were dropped by this fault.
            let f = agent.get_fault(&id)?;
            let dropped = f["counters"]["dropped"].as_u64().unwrap_or(0);
            testbed::verify(dropped > 0, || {
                format!(
                    "the blackhole on the stream's port counted no drop {} ms after its POST: {f}",
                    TTE_PAUSE.as_millis()
                )
            })?;
            let t2 = stream.now();
            agent.delete_fault(&id)?;
            let t3 = stream.now();
            thread::sleep(TTE_PAUSE);
            cycles.push([t0, t1, t2, t3]);
        }
        Ok(())
    })();
    let log = stream.finish()?;
    result?;
    let end = log.sent_ns.last().map_or(0, |t| t + 1);
    let first_effect = out.effect_ms.len();
    for (i, &[t0, t1, t2, t3]) in cycles.iter().enumerate() {
        let next = cycles.get(i + 1).map_or(end, |c| c[0]);
        let (s0, s1, s2, s3, se) = (
            log.seq_at(t0),
            log.seq_at(t1),
            log.seq_at(t2),
            log.seq_at(t3),
            log.seq_at(next),
        );
        out.post_ms.push((t1 - t0) as f64 / 1e6);
        out.delete_ms.push((t3 - t2) as f64 / 1e6);
        match (s0..s2).find(|&s| !log.delivered(s)) {
            Some(s) => out.effect_ms.push((log.sent_ns[s] - t0) as f64 / 1e6),
            None => out.missed += 1,
        }
        out.leaked += (s1..s2).filter(|&s| log.delivered(s)).count();
        match (s2..se).find(|&s| log.delivered(s)) {
            Some(s) => out.removal_ms.push((log.sent_ns[s] - t2) as f64 / 1e6),
            None => out.missed += 1,
        }
        let lost: Vec<usize> = (s3..se).filter(|&s| !log.delivered(s)).collect();
        out.lost_after += lost.len();
        out.lost_after_send_failed += lost
            .iter()
            .filter(|&&s| log.send_failed.get(s).copied().unwrap_or(false))
            .count();
    }
    out.round_effect_p50
        .push(quantile(&out.effect_ms[first_effect..], 0.5).unwrap_or(f64::NAN));
    Ok(())
}

// ---------------------------------------------------------------------------
// Restart

struct Restart {
    mode: &'static str,
    ready: Duration,
    api: Duration,
    wire: Vec<(Kind, Duration)>,
    holders: usize,
    orphans: usize,
}

/// Every fault of `ids` is listed and `active`.
fn all_active(agent: &Agent, ids: &[String]) -> anyhow::Result<bool> {
    let list = agent
        .client()
        .call("GET", "/v1/faults", None)
        .map_err(|e| anyhow!("GET /v1/faults: {e}"))?;
    let active: std::collections::BTreeSet<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["state"] == "active")
        .filter_map(|f| f["id"].as_str())
        .collect();
    Ok(ids.iter().all(|id| active.contains(id.as_str())))
}

fn restart(
    bed: &mut AgentNode,
    graceful: bool,
    ids: &[String],
    samples: &[(Kind, &Pod)],
    srv: &Pod,
) -> anyhow::Result<Restart> {
    let t0 = Instant::now();
    if graceful {
        bed.agent.stop(Duration::from_secs(10))?;
    }
    // Kills the agent if it still runs, starts it, waits for /healthz.
    bed.agent.restart_within(GIVE_UP)?;
    let ready = t0.elapsed();
    while !all_active(&bed.agent, ids)? {
        if t0.elapsed() > GIVE_UP {
            bail!("not every fault is active again after {GIVE_UP:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let api = t0.elapsed();
    let mut wire = Vec::new();
    for &(kind, pod) in samples {
        while !kind.in_effect(pod, srv)? {
            if t0.elapsed() > GIVE_UP {
                bail!("{} is not in effect on the wire again", kind.name());
            }
        }
        wire.push((kind, t0.elapsed()));
    }
    thread::sleep(Duration::from_millis(500));
    let holders = procstat::holders_of_agent(bed.agent.pid()).len();
    let orphans = procstat::holders_not_of(bed.agent.pid()).len();
    Ok(Restart {
        mode: if graceful { "SIGTERM" } else { "SIGKILL" },
        ready,
        api,
        wire,
        holders,
        orphans,
    })
}

// ---------------------------------------------------------------------------

fn run() -> anyhow::Result<()> {
    let n = env("NETFAULT_SCALE_PODS", 250usize);
    // Half the pods get a fault, in turn over the kinds: every kind needs one.
    let min = 2 * KINDS.len();
    if !(min..=MAX_PODS).contains(&n) {
        bail!("NETFAULT_SCALE_PODS={n}: from {min} (a fault of every kind on half the pods) to {MAX_PODS} (the node's pod range is a /24)");
    }
    let mut bed = AgentNode::start("nf-scale", NodeOptions::default())?;
    let idle = AgentNode::start("nf-scale-idle", NodeOptions::default())?;
    let idle_pods = [idle.add_pod("idle-c")?, idle.add_pod("idle-s")?];
    let mut snaps = vec![AgentMemory::read("no pods", bed.agent.pid())];

    // 1. Enrolment, sequential.
    eprintln!("enrolling {n} pods ...");
    let none = BTreeMap::new();
    let mut pods = Vec::with_capacity(n);
    let (mut chain, mut plugin) = (Vec::new(), Vec::new());
    let t = Instant::now();
    for i in 0..n {
        let (pod, timing) = bed
            .node
            .add_pod_timed(&format!("s{i}"), &none)
            .with_context(|| {
                format!("this machine created {i} of {n} pods; CNI ADD of the next")
            })?;
        chain.push(ms(timing.total));
        plugin.push(timing.plugin("netfault").map_or(f64::NAN, ms));
        pods.push(pod);
    }
    let enrol_total = t.elapsed();
    let enrolled = bed.agent.sandboxes()?.len();
    if enrolled != n {
        bail!("{enrolled} sandboxes enrolled after {n} ADDs");
    }
    snaps.push(AgentMemory::read(
        &format!("{n} pods enrolled"),
        bed.agent.pid(),
    ));

    // The wire checks see nothing before any fault.
    let srv = &pods[n - 1];
    let _http = http_serve(srv, HTTP_PORT)?;
    let faulted = n / 2;
    let sample_of = |kind: Kind| {
        let i = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        &pods[i]
    };
    let samples: Vec<(Kind, &Pod)> = WIRE.iter().map(|&k| (k, sample_of(k))).collect();
    for &(kind, pod) in &samples {
        if kind.in_effect(pod, srv)? {
            bail!(
                "{}: the wire check sees an effect with no fault",
                kind.name()
            );
        }
    }

    // 2. Faults on the first half, in turn over the kinds.
    eprintln!("creating {faulted} faults ...");
    let mut ids = Vec::with_capacity(faulted);
    let mut post_ms: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
    let mut all_post = Vec::new();
    let t = Instant::now();
    for (i, pod) in pods[..faulted].iter().enumerate() {
        let kind = KINDS[i % KINDS.len()];
        let t1 = Instant::now();
        ids.push(bed.agent.post_fault(&kind.body(pod))?);
        let d = ms(t1.elapsed());
        post_ms.entry(kind).or_default().push(d);
        all_post.push(d);
    }
    let post_total = t.elapsed();
    for &(kind, pod) in &samples {
        testbed::verify(kind.in_effect(pod, srv)?, || {
            format!("{}: no effect on the wire after the POST", kind.name())
        })?;
    }
    snaps.push(AgentMemory::read(
        &format!("+ {faulted} faults"),
        bed.agent.pid(),
    ));
    let nofile = procstat::nofile_limit(bed.agent.pid());

    // 4. Time to effect, loaded node vs idle node, alternating.
    eprintln!("time to effect ...");
    let (mut loaded, mut quiet) = (Tte::default(), Tte::default());
    let tte_rounds = env("NETFAULT_SCALE_TTE_ROUNDS", TTE_ROUNDS).max(1);
    for round in 0..tte_rounds {
        let loaded_first = round % 2 == 0;
        for is_loaded in [loaded_first, !loaded_first] {
            if is_loaded {
                tte_block(&bed.agent, &pods[n - 2], srv, TTE_PER_ROUND, &mut loaded)?;
            } else {
                let [c, s] = &idle_pods;
                tte_block(&idle.agent, c, s, TTE_PER_ROUND, &mut quiet)?;
            }
        }
    }

    // 3. Restarts.
    eprintln!("restarts ...");
    let mut restarts = Vec::new();
    for graceful in [true, false] {
        let mode = if graceful { "SIGTERM" } else { "SIGKILL" };
        // A failed restart is reported in its row; the agent is started
        // again for the next.
        let r =
            restart(&mut bed, graceful, &ids, &samples, srv).map_err(|e| format!("{mode}: {e:#}"));
        if r.is_err() && !bed.agent.is_running() {
            bed.agent.restart_within(GIVE_UP)?;
        }
        restarts.push(r);
        snaps.push(AgentMemory::read(
            &format!("after {mode} restart"),
            bed.agent.pid(),
        ));
    }

    // Report.
    let per_kind: Vec<String> = KINDS
        .iter()
        .map(|k| format!("{} {}", post_ms.get(k).map_or(0, Vec::len), k.name()))
        .collect();
    println!("netfault scale bench: {n} pods on one node, {faulted} with one fault each");
    println!("  faults: {}", per_kind.join(", "));
    println!("\n== 1. Enrolment (CNI ADD through bridge + host-local + netfault, sequential)");
    println!(
        "  {n} pods in {:.1} s ({:.1} pods/s, netns creation included)",
        enrol_total.as_secs_f64(),
        n as f64 / enrol_total.as_secs_f64()
    );
    println!("  per ADD, whole chain:        {}", summary_ms(&chain));
    println!("  per ADD, the netfault plugin: {}", summary_ms(&plugin));
    println!(
        "  fault creation: {faulted} POSTs in {:.2} s; per POST {}",
        post_total.as_secs_f64(),
        summary_ms(&all_post)
    );
    for k in KINDS {
        if let Some(v) = post_ms.get(&k) {
            println!("    {:<24} {}", k.name(), summary_ms(v));
        }
    }

    println!("\n== 2. Memory and descriptors (agent RSS goal <= 64 MiB)");
    AgentMemory::print_table(&snaps);
    if let Some((soft, hard)) = nofile {
        println!("  the agent's RLIMIT_NOFILE: soft {soft}, hard {hard}");
    }

    println!("\n== 3. Restart: from the signal until every fault is back (ms)");
    let wire_names: Vec<&str> = WIRE
        .iter()
        .map(|k| k.name().split(' ').next().unwrap_or(""))
        .collect();
    println!(
        "  {:<8} {:>8} {:>10} {}  holders orphans",
        "signal",
        "ready",
        "API active",
        wire_names
            .iter()
            .map(|w| format!("{:>17}", format!("wire: {w}")))
            .collect::<String>()
    );
    for r in &restarts {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                println!("  failed: {e}");
                continue;
            }
        };
        println!(
            "  {:<8} {:>8.0} {:>10.0} {}  {:>7} {:>7}",
            r.mode,
            ms(r.ready),
            ms(r.api),
            r.wire
                .iter()
                .map(|(_, d)| format!("{:>17.0}", ms(*d)))
                .collect::<String>(),
            r.holders,
            r.orphans
        );
    }
    println!("  (ready: /healthz answers, the reconcile done; the wire checks run one after the other, each time is from the signal)");

    println!(
        "\n== 4. Time to effect of an egress blackhole on a live UDP stream (1 datagram / {} µs),",
        STREAM_INTERVAL.as_micros()
    );
    println!(
        "   {tte_rounds} rounds x {TTE_PER_ROUND} cycles per node, order alternating, every cycle's drops counted by the fault; POST, {} ms, DELETE, {} ms",
        TTE_PAUSE.as_millis(),
        TTE_PAUSE.as_millis()
    );
    for (name, t) in [
        (format!("loaded ({n} pods)"), &loaded),
        ("idle (2 pods)".to_string(), &quiet),
    ] {
        println!("  {name}");
        println!("    POST call            {}", summary_ms(&t.post_ms));
        println!("    effect (first drop)  {}", summary_ms(&t.effect_ms));
        println!("    DELETE call          {}", summary_ms(&t.delete_ms));
        println!("    removal effect       {}", summary_ms(&t.removal_ms));
        println!(
            "    leaks: delivered after POST returned {}, lost after DELETE returned {} (send() failed for {}), cycles without an effect {}",
            t.leaked, t.lost_after, t.lost_after_send_failed, t.missed
        );
    }
    let t = |v: &[f64]| testbed::tail(v).value;
    let label = testbed::tail_label([
        loaded.effect_ms.as_slice(),
        quiet.effect_ms.as_slice(),
        loaded.removal_ms.as_slice(),
        quiet.removal_ms.as_slice(),
    ]);
    println!(
        "  effect {label} loaded / idle: {:.2} / {:.2} ms (x{:.2}); removal {label} {:.2} / {:.2} ms",
        t(&loaded.effect_ms),
        t(&quiet.effect_ms),
        t(&loaded.effect_ms) / t(&quiet.effect_ms),
        t(&loaded.removal_ms),
        t(&quiet.removal_ms)
    );
    println!(
        "  effect p50 loaded / idle, paired rounds: x{} (median [min..max] of {} rounds)",
        testbed::Spread::of(&testbed::paired_ratios(
            &loaded.round_effect_p50,
            &quiet.round_effect_p50
        ))
        .range(2),
        loaded
            .round_effect_p50
            .len()
            .min(quiet.round_effect_p50.len())
    );
    eprintln!("tearing down {n} pods ...");
    Ok(())
}
