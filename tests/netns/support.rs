//! Shared pieces of the netns tests: a node with an agent, leftover
//! inspection, and statistics for loss measured on the wire.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{Agent, Node, NodeOptions, Pod};

/// Tests that measure sub-millisecond timing run alone; every other test
/// that builds a `Cluster` runs beside the others. On a 2-core machine a
/// neighbouring TCP flow at full speed moves a delay's p99 by milliseconds.
static GATE: RwLock<()> = RwLock::new(());

/// A test's hold on `GATE`.
pub enum Gate {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// One simulated node: a private agent and a CNI chain with netfault.
pub struct Cluster {
    // Field order is drop order: pods' node first, then the agent, then its
    // dir, and last the gate (so the next test starts on a clean machine).
    pub node: Node,
    pub agent: Agent,
    pub _dir: testbed::TempDir,
    pub _gate: Gate,
}

impl Cluster {
    /// A cluster for a test that may run beside others.
    pub fn new(ipv6: bool) -> Cluster {
        let gate = Gate::Shared(GATE.read().unwrap_or_else(|p| p.into_inner()));
        Cluster::with_gate(ipv6, gate)
    }

    /// A cluster for a timing test: waits until no other cluster test runs,
    /// and keeps others out until it is dropped.
    pub fn exclusive(ipv6: bool) -> Cluster {
        let gate = Gate::Exclusive(GATE.write().unwrap_or_else(|p| p.into_inner()));
        Cluster::with_gate(ipv6, gate)
    }

    fn with_gate(ipv6: bool, gate: Gate) -> Cluster {
        let dir = testbed::TempDir::new("netfault-test").expect("temp dir");
        let agent = Agent::start(dir.path()).expect("netfaultd starts");
        let node = Node::new(NodeOptions {
            socket: agent.socket(),
            ipv6,
            ..NodeOptions::default()
        })
        .expect("node netns and CNI chain");
        Cluster {
            node,
            agent,
            _dir: dir,
            _gate: gate,
        }
    }

    pub fn pod(&self, name: &str) -> Pod {
        self.node
            .add_pod(name, &BTreeMap::new())
            .expect("CNI ADD through bridge + netfault")
    }

    /// POSTs a fault and returns its id; panics with the agent's answer otherwise.
    pub fn fault(&self, body: Value) -> String {
        let f = self
            .agent
            .client()
            .call("POST", "/v1/faults", Some(&body))
            .unwrap_or_else(|e| panic!("POST /v1/faults {body}: {e}"));
        f["id"].as_str().expect("fault id").to_string()
    }

    pub fn get_fault(&self, id: &str) -> Value {
        self.agent
            .client()
            .call("GET", &format!("/v1/faults/{id}"), None)
            .expect("GET fault")
    }

    pub fn delete_fault(&self, id: &str) {
        self.agent
            .client()
            .call("DELETE", &format!("/v1/faults/{id}"), None)
            .expect("DELETE fault");
    }
}

pub fn v4(pod: &Pod) -> IpAddr {
    *pod.ips
        .iter()
        .find(|i| i.is_ipv4())
        .expect("pod has an IPv4 address")
}

pub fn v6(pod: &Pod) -> IpAddr {
    *pod.ips
        .iter()
        .find(|i| i.is_ipv6())
        .expect("pod has an IPv6 address")
}

pub fn fault_on(
    pod: &Pod,
    direction: &str,
    matcher: Value,
    action: Value,
    duration: &str,
) -> Value {
    json!({
        "target": {"sandbox": pod.container_id},
        "direction": direction,
        "match": matcher,
        "action": action,
        "duration": duration,
    })
}

/// Everything in a netns that netfault could have left behind.
#[derive(Debug, PartialEq, Eq)]
pub struct NetnsState {
    pub qdiscs: Vec<String>,
    pub filters: Vec<String>,
    pub tcx: Vec<String>,
    pub nft_tables: Vec<String>,
    pub routes: Vec<String>,
    pub rules: Vec<String>,
}

/// Enumerates tc qdiscs and filters on `ifname`, tcx programs, nft tables,
/// routes and policy rules inside the pod's netns.
pub fn netns_state(netns: &Path, ifname: &str) -> NetnsState {
    let ifname = ifname.to_string();
    testbed::in_netns(netns, move || {
        let (qdiscs, filters) = netfault_ebpf::tc_state_here(&ifname).expect("tc state");
        let mut tcx = Vec::new();
        for t in [
            aya::programs::TcAttachType::Ingress,
            aya::programs::TcAttachType::Egress,
        ] {
            match aya::programs::SchedClassifier::query_tcx(&ifname, t) {
                Ok((_, progs)) => {
                    tcx.extend(progs.iter().map(|p| format!("{t:?} {:?}", p.name_as_str())))
                }
                Err(e) => tcx.push(format!("query failed: {e}")),
            }
        }
        // Raw JSON: the typed schema does not know every expression (tproxy).
        let raw = nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            ["list", "tables"],
        )
        .expect("nft -j list tables");
        let listed: Value = serde_json::from_str(&raw).expect("nft JSON");
        let nft_tables = listed["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("table"))
            .map(|t| format!("{} {}", t["family"], t["name"]))
            .collect();
        let mut sock = netfault_sys::rtnetlink::RtSocket::open().expect("netlink");
        NetnsState {
            qdiscs: qdiscs
                .iter()
                .map(|q| format!("{} {:x} {:x}", q.kind, q.handle, q.parent))
                .collect(),
            filters: filters.iter().map(|f| format!("{f:?}")).collect(),
            tcx,
            nft_tables,
            routes: sock.route_summary().expect("routes"),
            rules: sock.rule_summary().expect("rules"),
        }
    })
    .expect("enter pod netns")
}

/// netfault's entries in bpffs (it pins nothing; any entry is a leak).
pub fn bpffs_pins() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = p.to_string_lossy().to_string();
            if name.contains("netfault") || name.contains("nf_") {
                out.push(name.clone());
            }
            if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out
}

fn within_3_sigma(sent: u64, received: u64, loss: f64) -> Result<(), String> {
    let n = sent as f64;
    let p = 1.0 - loss;
    let mean = n * p;
    let sigma = (n * p * (1.0 - p)).sqrt();
    let (lo, hi) = (mean - 3.0 * sigma, mean + 3.0 * sigma);
    if (received as f64) >= lo.floor() && (received as f64) <= hi.ceil() {
        Ok(())
    } else {
        Err(format!(
            "received {received}/{sent}, expected {mean:.0} ± {:.0} (3σ) for {:.0}% loss",
            3.0 * sigma,
            loss * 100.0
        ))
    }
}

/// Measures with `probe` and asserts the delivered count is within 3 sigma
/// of a binomial with delivery probability `1 - loss`, and that the sender
/// saw no error. A correct datapath still lands outside 3σ in 0.27% of
/// samples; so that CI does not flake on that, one outlier is re-measured
/// with a fresh sample (two outliers in a row: p ≈ 7e-6). Returns every
/// sample taken, for counter checks.
pub fn assert_binomial_loss(
    mut probe: impl FnMut() -> testbed::UdpProbe,
    loss: f64,
    what: &str,
) -> Vec<testbed::UdpProbe> {
    let mut samples = Vec::new();
    for attempt in 0..2 {
        let p = probe();
        assert_eq!(
            p.send_errors, 0,
            "{what}: the sender saw errors; loss must be silent"
        );
        let verdict = within_3_sigma(p.sent, p.received, loss);
        samples.push(p);
        match verdict {
            Ok(()) => return samples,
            Err(e) if attempt == 0 => eprintln!("{what}: outlier, measuring again: {e}"),
            Err(e) => panic!("{what}: {e} (twice in a row)"),
        }
    }
    samples
}

/// A UDP stream whose packets carry their send time, to locate on the wire
/// the moment a fault starts or ends.
pub struct TimedStream {
    pub sent_at: Vec<std::time::Instant>,
    pub received: Vec<bool>,
}

impl TimedStream {
    /// Send time of the first packet that arrived.
    pub fn first_received_sent_at(&self) -> Option<std::time::Instant> {
        self.received
            .iter()
            .position(|r| *r)
            .map(|i| self.sent_at[i])
    }

    /// Packets sent at or after `t` that never arrived.
    pub fn lost_after(&self, t: std::time::Instant) -> usize {
        self.sent_at
            .iter()
            .zip(&self.received)
            .filter(|(s, r)| **s >= t && !**r)
            .count()
    }
}

/// Sends sequence-numbered datagrams from `from` to `to_ip:port` (a socket in
/// `to`) every `gap` until `until`, and records which arrived.
pub fn timed_stream(
    from: &Pod,
    to: &Pod,
    to_ip: IpAddr,
    port: u16,
    until: std::time::Instant,
    gap: std::time::Duration,
) -> TimedStream {
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let bind: SocketAddr = if to_ip.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal");
    let rx_addr = SocketAddr::new(bind.ip(), port);
    // Sockets keep the netns they were created in; drive them from here.
    let rx = testbed::in_netns(to.netns.path(), move || UdpSocket::bind(rx_addr))
        .expect("enter receiver netns")
        .expect("bind receiver");
    let tx = testbed::in_netns(from.netns.path(), move || UdpSocket::bind(bind))
        .expect("enter sender netns")
        .expect("bind sender");
    rx.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !stop_rx.load(Ordering::Relaxed) {
            if let Ok(n) = rx.recv(&mut buf) {
                if n >= 4 {
                    got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
        }
        got
    });
    let mut sent_at = Vec::new();
    let dst = SocketAddr::new(to_ip, port);
    let mut seq: u32 = 0;
    while std::time::Instant::now() < until {
        sent_at.push(std::time::Instant::now());
        tx.send_to(&seq.to_be_bytes(), dst)
            .expect("send must not fail under loss");
        seq += 1;
        std::thread::sleep(gap);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let got = receiver.join().expect("receiver thread");
    let mut received = vec![false; sent_at.len()];
    for s in got {
        if let Some(r) = received.get_mut(s as usize) {
            *r = true;
        }
    }
    TimedStream { sent_at, received }
}

/// One TCP connection from `from` to `to_ip:port` (a listener in `to`):
/// the sending and the receiving end.
pub fn tcp_pair(from: &Pod, to: &Pod, to_ip: IpAddr, port: u16) -> (TcpStream, TcpStream) {
    let any: IpAddr = if to_ip.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let listener = testbed::in_netns(to.netns.path(), move || {
        TcpListener::bind(SocketAddr::new(any, port))
    })
    .expect("enter netns")
    .expect("listen");
    let dest = SocketAddr::new(to_ip, port);
    let tx = testbed::in_netns(from.netns.path(), move || {
        TcpStream::connect_timeout(&dest, Duration::from_secs(2))
    })
    .expect("enter netns")
    .expect("connect");
    let (rx, _) = listener.accept().expect("accept");
    (tx, rx)
}
