//! Annotation change on a running pod → effect on the wire, through the
//! scripted API server (`testbed::ApiServer`): the agent watches it with
//! `--kubeconfig`/`--node-name`, the bench sets or removes a
//! `netfault.io/faults` blackhole of one UDP port on pod `a` and measures,
//! from a 1 kHz UDP stream a → b, when the wire changed.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench kube
//! ```
//!
//! For an added fault the effect time is the send time of the last packet
//! that still arrived (after the change) minus the change's time; for a
//! removed one, the send time of the first packet that arrived again. Both
//! are within the stream's 1 ms period. `NETFAULT_KUBE_BENCH_CHANGES` sets
//! the number of changes (default 60, half adds, half removals). The goal
//! (issue 10) is p99 ≤ 100 ms at the node; the bench prints, it does not
//! pass or fail.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;
use testbed::{
    in_netns, ms, quantile, Agent, AgentNode, ApiServer, Node, NodeOptions, Pod, TempDir,
};

const PORT: u16 = 7201;
const PERIOD: Duration = Duration::from_millis(1);
/// Silence this long after a change means the blackhole is in place.
const SETTLED: Duration = Duration::from_millis(200);
const GIVE_UP: Duration = Duration::from_secs(10);

fn main() {
    testbed::bench_main("kube", run);
}

fn open_udp(pod: &Pod, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = in_netns(pod.netns_path(), || UdpSocket::bind(bind))?
        .with_context(|| format!("binding {bind} in {}", pod.name))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends one sequenced packet every [`PERIOD`] until `done` says so, and
/// returns the send times; `done` sees the send times and the highest
/// sequence received so far with the time it was read.
struct Stream {
    tx: UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
    sent: Vec<Instant>,
}

impl Stream {
    fn step(&mut self) -> anyhow::Result<Vec<u64>> {
        let seq = self.sent.len() as u64;
        self.tx.send_to(&seq.to_be_bytes(), self.to)?;
        self.sent.push(Instant::now());
        std::thread::sleep(PERIOD);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match self.rx.recv(&mut buf) {
                Ok(8) => got.push(u64::from_be_bytes(buf[..8].try_into()?)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After a change at `t0` that adds a blackhole: the send time of the
    /// last packet still received, minus `t0` (zero if none after `t0`).
    fn until_blocked(&mut self, t0: Instant) -> anyhow::Result<Duration> {
        let mut last: Option<Instant> = None;
        let mut quiet_since = Instant::now();
        loop {
            let got = self.step()?;
            if let Some(&s) = got.iter().max() {
                let at = self.sent[s as usize];
                if at >= t0 {
                    last = Some(last.map_or(at, |l: Instant| l.max(at)));
                }
                quiet_since = Instant::now();
            }
            if quiet_since.elapsed() >= SETTLED {
                return Ok(last.map_or(Duration::ZERO, |l| l - t0));
            }
            if t0.elapsed() > GIVE_UP {
                return Err(anyhow!("the blackhole never took effect"));
            }
        }
    }

    /// After a change at `t0` that removes it: the send time of the first
    /// packet received again, minus `t0`.
    fn until_open(&mut self, t0: Instant) -> anyhow::Result<Duration> {
        let first = self.sent.len();
        loop {
            let got = self.step()?;
            if let Some(&s) = got.iter().filter(|s| **s as usize >= first).min() {
                return Ok(self.sent[s as usize].saturating_duration_since(t0));
            }
            if t0.elapsed() > GIVE_UP {
                return Err(anyhow!("traffic never came back"));
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    let changes: usize = std::env::var("NETFAULT_KUBE_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let server = ApiServer::start()?;
    let node_name = testbed::unique_name("node");
    let dir = TempDir::new("netfault-kube-bench")?;
    let kubeconfig = server.kubeconfig().to_string_lossy().into_owned();
    let agent = Agent::start_with_args(
        dir.path(),
        &["--kubeconfig", &kubeconfig, "--node-name", &node_name],
    )?;
    let node = Node::new(NodeOptions {
        socket: agent.socket(),
        ..NodeOptions::default()
    })?;
    let bed = AgentNode { node, agent, dir };
    let a = bed.add_pod("a")?;
    let b = bed.add_pod("b")?;
    for p in [&a, &b] {
        server.add_pod(&p.namespace, &p.name, &p.uid, &node_name, &BTreeMap::new());
    }
    let t = Instant::now();
    while server.watches() == 0 {
        if t.elapsed() > GIVE_UP {
            return Err(anyhow!("the agent never watched"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let b_ip = b.ipv4().context("b has no IPv4")?;
    let to = SocketAddr::new(b_ip, PORT);
    let mut stream = Stream {
        tx: open_udp(&a, "0.0.0.0:0".parse()?)?,
        rx: open_udp(&b, to)?,
        to,
        sent: Vec::new(),
    };
    // Warm up: the stream flows.
    stream.until_open(Instant::now())?;
    let fault = json!([{
        "direction": "egress",
        "match": {"protocol": "udp", "ports": PORT.to_string()},
        "action": {"type": "blackhole"},
        "duration": "10m",
    }])
    .to_string();
    let on: BTreeMap<String, String> = [("netfault.io/faults".to_string(), fault)].into();
    let off = BTreeMap::new();
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let t0 = Instant::now();
        if i % 2 == 0 {
            server.set_annotations(&a.uid, &on);
            adds.push(stream.until_blocked(t0)?);
        } else {
            server.set_annotations(&a.uid, &off);
            removes.push(stream.until_open(t0)?);
        }
    }
    let mut all: Vec<Duration> = adds.iter().chain(&removes).copied().collect();
    all.sort();
    let show = |name: &str, v: &[Duration]| {
        let q = |p| quantile(v, p).map_or(f64::NAN, ms);
        println!(
            "{name:<28} n={:<4} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            v.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
    };
    adds.sort();
    removes.sort();
    println!("annotation change -> effect on the wire (scripted API server, 1 kHz UDP stream)");
    show("add blackhole", &adds);
    show("remove blackhole", &removes);
    show("all changes", &all);
    println!("goal: p99 <= 100 ms at the node");
    Ok(())
}
