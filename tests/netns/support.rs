//! Shared pieces of the netns tests: a node with an agent, fault bodies,
//! sockets in pods, leftover inspection, and statistics for loss measured
//! on the wire.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{udp_probe, Agent, AgentNode, ApiServer, Node, NodeOptions, Pod, TempDir};

/// Tests that measure sub-millisecond timing run alone; every other test
/// that builds a `Cluster` runs beside the others. On a 2-core machine a
/// neighbouring TCP flow at full speed moves a delay's p99 by milliseconds.
static GATE: RwLock<()> = RwLock::new(());

/// A test's hold on `GATE`.
pub enum Gate {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Whether a timing test holds `GATE` alone (then it is the only gated
/// test running, so its retries may wait for a quiet machine).
static EXCLUSIVE_HELD: AtomicBool = AtomicBool::new(false);

impl Gate {
    /// For a test that starts agents or traffic without a [`Cluster`]: it
    /// may run beside other such tests, never beside a timing test.
    pub fn shared() -> Gate {
        Gate::Shared(GATE.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// For a timing test: no other gated test runs while it is held.
    pub fn exclusive() -> Gate {
        let g = Gate::Exclusive(GATE.write().unwrap_or_else(|p| p.into_inner()));
        EXCLUSIVE_HELD.store(true, Ordering::SeqCst);
        g
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if matches!(self, Gate::Exclusive(_)) {
            // Still held here: the guard drops after this.
            EXCLUSIVE_HELD.store(false, Ordering::SeqCst);
        }
    }
}

/// One simulated node: a private agent and a CNI chain with netfault
/// (`c.node`, `c.agent` and `c.dir` through [`AgentNode`]).
pub struct Cluster {
    // Field order is drop order: the node, the agent and its dir first, and
    // last the gate (so the next test starts on a clean machine).
    bed: AgentNode,
    _gate: Gate,
}

impl Deref for Cluster {
    type Target = AgentNode;

    fn deref(&self) -> &AgentNode {
        &self.bed
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut AgentNode {
        &mut self.bed
    }
}

impl Cluster {
    /// A cluster for a test that may run beside others.
    pub fn new(ipv6: bool) -> Cluster {
        Cluster::with_options(NodeOptions {
            ipv6,
            ..NodeOptions::default()
        })
    }

    /// [`Cluster::new`] with a node built from `opts` (its socket is the
    /// agent's).
    pub fn with_options(opts: NodeOptions) -> Cluster {
        Cluster::with_gate(opts, Gate::shared())
    }

    /// A cluster for a timing test: waits until no other cluster test runs,
    /// keeps others out until it is dropped, and starts once the machine
    /// is quiet (see [`wait_for_quiet_cpu`]).
    pub fn exclusive(ipv6: bool) -> Cluster {
        let opts = NodeOptions {
            ipv6,
            ..NodeOptions::default()
        };
        Cluster::exclusive_with(opts)
    }

    /// [`Cluster::exclusive`] with a node built from `opts`.
    pub fn exclusive_with(opts: NodeOptions) -> Cluster {
        let gate = Gate::exclusive();
        wait_for_quiet_cpu();
        Cluster::with_gate(opts, gate)
    }

    /// A cluster whose pods have the address families of `stack`.
    pub fn on(stack: Stack) -> Cluster {
        Cluster::with_options(stack.options())
    }

    fn with_gate(opts: NodeOptions, gate: Gate) -> Cluster {
        let bed = AgentNode::start("netfault-test", opts)
            .unwrap_or_else(|e| panic!("netfaultd, node netns and CNI chain: {e}"));
        Cluster { bed, _gate: gate }
    }

    /// [`Cluster::new`] (IPv4 only) whose agent runs with `agent_args`.
    pub fn with_agent_args(agent_args: &[&str]) -> Cluster {
        let gate = Gate::shared();
        let dir = TempDir::new("netfault-test").expect("temp dir");
        let bed = AgentNode::start_in_with_args(dir, NodeOptions::default(), agent_args)
            .unwrap_or_else(|e| panic!("netfaultd {agent_args:?}, node netns and CNI chain: {e}"));
        Cluster { bed, _gate: gate }
    }

    pub fn pod(&self, name: &str) -> Pod {
        self.add_pod(name)
            .expect("CNI ADD through bridge + netfault")
    }

    /// One pod per name, in order.
    pub fn pods<const N: usize>(&self, names: [&str; N]) -> [Pod; N] {
        names.map(|n| self.pod(n))
    }

    /// POSTs a fault and returns its id; panics with the agent's answer otherwise.
    pub fn fault(&self, body: Value) -> String {
        self.agent
            .post_fault(&body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Cluster::fault`] of [`fault_on`]`(pod, ...)`.
    pub fn fault_on(
        &self,
        pod: &Pod,
        direction: &str,
        matcher: Value,
        action: Value,
        duration: &str,
    ) -> String {
        self.fault(fault_on(pod, direction, matcher, action, duration))
    }

    pub fn get_fault(&self, id: &str) -> Value {
        self.agent.get_fault(id).expect("GET fault")
    }

    /// A counter of a fault; panics when the fault has no such counter.
    pub fn counter(&self, id: &str, name: &str) -> u64 {
        let f = self.get_fault(id);
        f["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("counter {name} in {f}"))
    }

    pub fn delete_fault(&self, id: &str) {
        self.agent.delete_fault(id).expect("DELETE fault");
    }

    /// `GET /v1/capabilities`.
    pub fn capabilities(&self) -> Value {
        self.agent
            .client()
            .call("GET", "/v1/capabilities", None)
            .expect("GET /v1/capabilities")
    }

    /// `GET /v1/faults`: every fault the agent lists.
    pub fn all_faults(&self) -> Vec<Value> {
        let all = self
            .agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("GET /v1/faults");
        all.as_array().cloned().unwrap_or_default()
    }

    /// Whether the agent lists `id` (`GET /v1/faults/ID` answers).
    pub fn has_fault(&self, id: &str) -> bool {
        self.agent.get_fault(id).is_ok()
    }

    /// Whether `pod`'s sandbox id appears in the agent's sandbox list.
    pub fn enrolled(&self, pod: &Pod) -> bool {
        let list = self.agent.sandboxes().expect("GET /v1/sandboxes");
        Value::from(list).to_string().contains(&pod.container_id)
    }
}

/// The address families a cluster's pods get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only (the default node).
    V4,
    /// IPv6 only: every pod has one address, in a random `fd00::/64`.
    V6Only,
}

impl Stack {
    pub fn options(self) -> NodeOptions {
        NodeOptions {
            ipv4: self == Stack::V4,
            ipv6: self == Stack::V6Only,
            ..NodeOptions::default()
        }
    }

    /// The address traffic goes to: the pod's only one.
    pub fn ip(self, pod: &Pod) -> IpAddr {
        match self {
            Stack::V4 => v4(pod),
            Stack::V6Only => v6(pod),
        }
    }

    /// `ip` as a one-address CIDR (`/32` or `/128`).
    pub fn host_cidr(self, pod: &Pod) -> String {
        match self.ip(pod) {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        }
    }

    /// For messages: "v4" or "v6-only".
    pub fn name(self) -> &'static str {
        match self {
            Stack::V4 => "v4",
            Stack::V6Only => "v6-only",
        }
    }
}

pub fn v4(pod: &Pod) -> IpAddr {
    pod.ipv4().expect("pod has an IPv4 address")
}

pub fn v6(pod: &Pod) -> IpAddr {
    pod.ipv6().expect("pod has an IPv6 address")
}

/// `(from, to)` for traffic that crosses `pod`'s `direction`: `pod` sends
/// on egress and receives on ingress; `peer` is the other end.
pub fn ends<'p>(direction: &str, pod: &'p Pod, peer: &'p Pod) -> (&'p Pod, &'p Pod) {
    if direction == "egress" {
        (pod, peer)
    } else {
        (peer, pod)
    }
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

/// `protocol` traffic to or from `port`: a `match`.
pub fn proto_port(protocol: &str, port: u16) -> Value {
    json!({"protocol": protocol, "ports": port.to_string()})
}

/// Drops `percent` of the packets.
pub fn loss(percent: impl serde::Serialize) -> Value {
    json!({"type": "loss", "percent": percent})
}

pub fn blackhole() -> Value {
    json!({"type": "blackhole"})
}

/// A fixed delay.
pub fn delay(latency: &str) -> Value {
    json!({"type": "delay", "latency": latency})
}

/// Runs `f` inside `pod`'s netns (a socket opened there stays there).
pub fn in_pod<T: Send>(
    pod: &Pod,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    testbed::in_netns(pod.netns.path(), f).map_err(|e| std::io::Error::other(e.to_string()))?
}

/// A UDP socket bound to `addr` in `pod`.
pub fn udp_bind(pod: &Pod, addr: SocketAddr) -> UdpSocket {
    in_pod(pod, move || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind UDP {addr} in pod {}: {e}", pod.name))
}

/// A TCP connection opened from inside `from`'s netns.
pub fn connect(from: &Pod, to: SocketAddr) -> std::io::Result<TcpStream> {
    in_pod(from, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
}

/// A thread that calls `step` again and again until stopped (by
/// [`Repeat::finish`], which returns the state `step` built, or by drop).
pub struct Repeat<T: Send + 'static> {
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<T>>,
}

impl<T: Send + 'static> Repeat<T> {
    /// Calls `step(&mut state)` on a thread of its own until stopped.
    pub fn spawn(mut state: T, mut step: impl FnMut(&mut T) + Send + 'static) -> Repeat<T> {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                step(&mut state);
            }
            state
        });
        Repeat {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; what it collected.
    pub fn finish(mut self) -> T {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("running");
        thread.join().expect("the thread panicked")
    }
}

impl<T: Send + 'static> Drop for Repeat<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod's netns as it was before a test's faults.
pub struct Pristine<'p> {
    pod: &'p Pod,
    pub state: NetnsState,
}

impl<'p> Pristine<'p> {
    /// The state of `pod`'s netns (`eth0`) now.
    pub fn of(pod: &'p Pod) -> Pristine<'p> {
        Pristine {
            pod,
            state: pod_state(pod),
        }
    }

    /// Asserts the netns is as it was.
    pub fn assert_unchanged(&self, what: &str) {
        assert_eq!(pod_state(self.pod), self.state, "{what}");
    }

    /// Polls until the netns is as it was (a removed proxy fault drains its
    /// connections first) or 3 s pass; asserts it is.
    pub fn assert_restored(&self, when: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now = pod_state(self.pod);
            if now == self.state {
                return;
            }
            if Instant::now() > deadline {
                assert_eq!(now, self.state, "{when}: the pod netns must be as before");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// [`netns_state`] of a pod's `eth0`.
pub fn pod_state(pod: &Pod) -> NetnsState {
    netns_state(pod.netns.path(), "eth0")
}

/// The pod netns's nftables ruleset (`nft -j list ruleset`), as raw JSON:
/// the `nftables` crate's schema has no variant for some expressions
/// netfault uses (tproxy, the NFQUEUE divert).
pub fn nft_ruleset(pod: &Pod) -> Value {
    testbed::in_netns(pod.netns.path(), || {
        let raw = nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            nftables::helper::DEFAULT_ARGS,
        )
        .expect("nft -j list ruleset");
        serde_json::from_str::<Value>(&raw).expect("nft JSON")
    })
    .expect("enter netns")
}

/// How many objects (metainfo, tables, chains, rules, sets...) the pod
/// netns's ruleset lists.
pub fn nft_objects(pod: &Pod) -> usize {
    nft_ruleset(pod)["nftables"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

/// Every object of an `nft -j list ruleset` answer except its `metainfo`,
/// by identity (kind, family, table, name or chain and handle): volatile
/// parts such as counters and set elements' expiry are left out.
fn nft_identities(ruleset: &Value) -> Vec<String> {
    ruleset["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|o| o.iter())
        .filter(|(kind, _)| *kind != "metainfo")
        .map(|(kind, v)| {
            let field = |k: &str| v.get(k).map(Value::to_string).unwrap_or_default();
            match kind.as_str() {
                "table" => format!("table {} {}", field("family"), field("name")),
                "rule" => format!(
                    "rule {} {} {} handle {}",
                    field("family"),
                    field("table"),
                    field("chain"),
                    field("handle")
                ),
                other => format!(
                    "{other} {} {} {}",
                    field("family"),
                    field("table"),
                    field("name")
                ),
            }
        })
        .collect()
}

/// What is left of nftables in `pod`'s netns: every table, chain, rule, set,
/// map... (the netns is the test's own, so all of it is netfault's). A
/// leftover check requires this to be empty.
pub fn nft_leftovers(pod: &Pod) -> Vec<String> {
    nft_identities(&nft_ruleset(pod))
}

/// Asserts that `pod`'s netns holds no nftables object at all.
pub fn assert_no_nft_leftovers(pod: &Pod, when: &str) {
    let left = nft_leftovers(pod);
    assert!(left.is_empty(), "{when}: nft objects left: {left:?}");
}

/// Everything in a netns that netfault could have left behind.
#[derive(Debug, PartialEq, Eq)]
pub struct NetnsState {
    pub qdiscs: Vec<String>,
    pub filters: Vec<String>,
    pub tcx: Vec<String>,
    pub nft_tables: Vec<String>,
    /// Every nft object (tables, chains, rules, sets) by identity.
    pub nft: Vec<String>,
    pub routes: Vec<String>,
    pub rules: Vec<String>,
}

/// Enumerates tc qdiscs and filters on `ifname`, tcx programs, nft tables,
/// routes and policy rules inside the pod's netns.
pub fn netns_state(netns: &Path, ifname: &str) -> NetnsState {
    let ifname = ifname.to_string();
    let ns = netfault_sys::netns::Netns::open(netns).expect("the pod's netns");
    ns.run(move |inside| {
        let (qdiscs, filters) = netfault_ebpf::tc_state_here(inside, &ifname).expect("tc state");
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
            nftables::helper::DEFAULT_ARGS,
        )
        .expect("nft -j list ruleset");
        let listed: Value = serde_json::from_str(&raw).expect("nft JSON");
        let nft_tables = listed["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("table"))
            .map(|t| format!("{} {}", t["family"], t["name"]))
            .collect();
        let nft = nft_identities(&listed);
        let mut sock = netfault_sys::rtnetlink::RtSocket::open().expect("netlink");
        NetnsState {
            qdiscs: qdiscs
                .iter()
                .map(|q| format!("{} {:x} {:x}", q.kind, q.handle, q.parent))
                .collect(),
            filters: filters.iter().map(|f| format!("{f:?}")).collect(),
            tcx,
            nft_tables,
            nft,
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
/// samples; so the check is decided by a majority of [`MAJORITY_OF`] fresh
/// samples ([`by_majority`]: two outliers of three, p ≈ 2e-5, fail). A send
/// error fails at once. Returns every sample taken, for counter checks.
pub fn assert_binomial_loss(
    mut probe: impl FnMut() -> testbed::UdpProbe,
    loss: f64,
    what: &str,
) -> Vec<testbed::UdpProbe> {
    by_majority(what, MAJORITY_OF, Duration::ZERO, |_| {
        let p = probe();
        assert_eq!(
            p.send_errors, 0,
            "{what}: the sender saw errors; loss must be silent"
        );
        let verdict = within_3_sigma(p.sent, p.received, loss);
        (p, verdict)
    })
}

/// UDP datagrams that the sockets of `pod`'s netns dropped because their
/// receive buffer was full (`RcvbufErrors` of IPv4 and IPv6): a receiver
/// thread starved by a loaded machine loses datagrams no fault dropped.
pub fn udp_rcvbuf_errors(pod: &Pod) -> u64 {
    testbed::in_netns(pod.netns.path(), || {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}"));
        let mut n = 0;
        if let Ok(snmp) = read("snmp") {
            let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
            if let [names, values] = udp[..] {
                let i = names.split_whitespace().position(|k| k == "RcvbufErrors");
                n += i
                    .and_then(|i| values.split_whitespace().nth(i)?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        if let Ok(snmp6) = read("snmp6") {
            n += snmp6
                .lines()
                .find_map(|l| l.strip_prefix("Udp6RcvbufErrors"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        n
    })
    .expect("enter netns")
}

/// How many attempts a retried timing or statistical check has at most
/// (see [`by_majority`]).
pub const MAJORITY_OF: usize = 3;

/// Runs a retried check: `attempt(i)` measures afresh and returns what it
/// measured and whether that passed (`Err`: why not). The check passes once
/// a majority of `of` attempts passed and fails once a majority failed, so
/// a check that fails half the time fails about half the time, and a lone
/// miss (a neighbour's load burst) does not. After a failed attempt it
/// waits `pause`. It prints how many attempts it needed, and returns
/// everything measured.
pub fn by_majority<T>(
    what: &str,
    of: usize,
    pause: Duration,
    mut attempt: impl FnMut(usize) -> (T, Result<(), String>),
) -> Vec<T> {
    assert!(of % 2 == 1, "{what}: an odd number of attempts");
    let need = of / 2 + 1;
    let mut samples = Vec::new();
    let mut passed = 0;
    let mut failures = Vec::new();
    for i in 0..of {
        let (sample, verdict) = attempt(i);
        samples.push(sample);
        let failed = verdict.is_err();
        match verdict {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("{what}: attempt {} of at most {of} failed: {e}", i + 1);
                failures.push(e);
            }
        }
        if passed >= need {
            eprintln!(
                "{what}: passed {passed} of {} attempts (needs {need} of {of})",
                i + 1
            );
            return samples;
        }
        if failures.len() >= need {
            panic!(
                "{what}: failed {} of {} attempts (a majority of {of}): {}",
                failures.len(),
                i + 1,
                failures.join("; ")
            );
        }
        if failed {
            std::thread::sleep(pause);
            // A timing test alone on the machine retries once the kernel's
            // background work (the teardown of earlier tests' namespaces,
            // which comes in bursts) has let go of the CPUs again.
            if EXCLUSIVE_HELD.load(Ordering::SeqCst) {
                wait_for_quiet_cpu();
            }
        }
    }
    unreachable!("{what}: {of} attempts decide a majority")
}

/// A UDP stream whose packets carry their send time, to locate on the wire
/// the moment a fault starts or ends.
pub struct TimedStream {
    pub sent_at: Vec<Instant>,
    pub received: Vec<bool>,
}

impl TimedStream {
    /// Send time of the first packet that arrived.
    pub fn first_received_sent_at(&self) -> Option<Instant> {
        self.received
            .iter()
            .position(|r| *r)
            .map(|i| self.sent_at[i])
    }

    /// Packets sent at or after `t` that never arrived.
    pub fn lost_after(&self, t: Instant) -> usize {
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
    until: Instant,
    gap: Duration,
) -> TimedStream {
    let any = testbed::unspecified(to_ip);
    let rx = udp_bind(to, SocketAddr::new(any, port));
    let tx = udp_bind(from, SocketAddr::new(any, 0));
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let receiver = Repeat::spawn(Vec::new(), move |got: &mut Vec<u32>| {
        let mut buf = [0u8; 64];
        if let Ok(n) = rx.recv(&mut buf) {
            if n >= 4 {
                got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
    });
    let mut sent_at = Vec::new();
    let dst = SocketAddr::new(to_ip, port);
    let mut seq: u32 = 0;
    while Instant::now() < until {
        sent_at.push(Instant::now());
        tx.send_to(&seq.to_be_bytes(), dst)
            .expect("send must not fail under loss");
        seq += 1;
        std::thread::sleep(gap);
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = receiver.finish();
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
    let any = SocketAddr::new(testbed::unspecified(to_ip), port);
    let listener = in_pod(to, move || TcpListener::bind(any)).expect("listen");
    let tx = connect(from, SocketAddr::new(to_ip, port)).expect("connect");
    let (rx, _) = listener.accept().expect("accept");
    (tx, rx)
}

// --- A node whose agent watches the scripted API server (kube, networkfault).

/// How long an annotation change may take to show on the wire here (the
/// agent polls nothing: this bounds a slow, busy test machine).
pub const EFFECT_WITHIN: Duration = Duration::from_secs(10);

/// A node whose agent watches the scripted API server.
pub struct KubeNode {
    // Field order is drop order: node and agent, then the server, then the gate.
    pub bed: AgentNode,
    pub server: ApiServer,
    pub node_name: String,
    _gate: Gate,
}

impl KubeNode {
    /// An API fault blackholing `pod`'s egress UDP `port` for 5 minutes: its id.
    pub fn api_blackhole(&self, pod: &Pod, port: u16) -> String {
        self.bed
            .agent
            .post_fault(&fault_on(
                pod,
                "egress",
                proto_port("udp", port),
                blackhole(),
                "5m",
            ))
            .unwrap_or_else(|e| panic!("API fault on {}: {e}", pod.name))
    }

    pub fn start() -> KubeNode {
        KubeNode::start_with(&[])
    }

    /// With more agent arguments.
    pub fn start_with(extra: &[&str]) -> KubeNode {
        let gate = Gate::shared();
        let server = ApiServer::start().expect("scripted API server");
        let node_name = testbed::unique_name("node");
        let dir = TempDir::new("netfault-kube").expect("temp dir");
        let kubeconfig = server.kubeconfig().to_string_lossy().into_owned();
        let mut args = vec!["--kubeconfig", &kubeconfig, "--node-name", &node_name];
        args.extend_from_slice(extra);
        let agent = Agent::start_with_args(dir.path(), &args)
            .unwrap_or_else(|e| panic!("netfaultd with --kubeconfig: {e}"));
        let node = Node::new(NodeOptions {
            socket: agent.socket(),
            ..NodeOptions::default()
        })
        .unwrap_or_else(|e| panic!("node netns and CNI chain: {e}"));
        let k = KubeNode {
            bed: AgentNode { node, agent, dir },
            server,
            node_name,
            _gate: gate,
        };
        k.wait_watching(0);
        k
    }

    /// Waits until more than `before` watches were opened.
    pub fn wait_watching(&self, before: u64) {
        wait_for("the agent watches the pods", || {
            self.server.watches() > before
        });
    }

    /// A pod through CNI ADD, and the same pod on the API server, on this node.
    pub fn pod(&self, name: &str) -> Pod {
        self.pod_labelled(name, &[])
    }

    /// [`KubeNode::pod`] with labels on the API server's pod.
    pub fn pod_labelled(&self, name: &str, labels: &[(&str, &str)]) -> Pod {
        let pod = self
            .bed
            .add_pod(name)
            .expect("CNI ADD through bridge + netfault");
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.server.add_pod_with_labels(
            &pod.namespace,
            &pod.name,
            &pod.uid,
            &self.node_name,
            &labels,
            &BTreeMap::new(),
        );
        pod
    }

    pub fn annotate(&self, pod: &Pod, annotations: &[(&str, String)]) {
        let map: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.server.set_annotations(&pod.uid, &map);
    }

    /// The pod's faults as the agent lists them, with `source`.
    pub fn faults_of(&self, pod: &Pod, source: &str) -> Vec<Value> {
        let all = self
            .bed
            .agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("GET /v1/faults");
        all.as_array()
            .expect("fault list")
            .iter()
            .filter(|f| f["sandbox"] == pod.container_id.as_str() && f["source"] == source)
            .cloned()
            .collect()
    }

    pub fn sandbox_of(&self, pod: &Pod) -> Value {
        self.bed
            .agent
            .sandboxes()
            .expect("GET /v1/sandboxes")
            .into_iter()
            .find(|s| s["id"] == pod.container_id.as_str())
            .expect("the pod's sandbox is enrolled")
    }
}

/// Polls `f` every 20 ms until it holds; panics after [`EFFECT_WITHIN`].
/// Returns how long it took.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < EFFECT_WITHIN, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// Whether UDP to `to`'s `port` from `from` gets through (all of 50), is
/// blackholed (none), or something else (panics: a fault is half there).
pub fn passes(from: &Pod, to: &Pod, port: u16) -> bool {
    let p = udp_probe(from, to, v4(to), port, 50, Duration::from_micros(200))
        .unwrap_or_else(|e| panic!("udp probe {} -> {}:{port}: {e}", from.name, to.name));
    assert_eq!(p.send_errors, 0, "loss on a network is silent");
    p.received == p.sent
}

pub fn blocked(from: &Pod, to: &Pod, port: u16) -> bool {
    let p = udp_probe(from, to, v4(to), port, 50, Duration::from_micros(200))
        .unwrap_or_else(|e| panic!("udp probe {} -> {}:{port}: {e}", from.name, to.name));
    p.received == 0
}

/// (busy, total) jiffies over all CPUs, from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle + iowait
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Waits (at most 20 s) until the CPUs were at least 85% idle over 300 ms.
/// The kernel tears the network namespaces of finished tests down in the
/// background (kworkers), which can take a core for seconds after a test
/// with many pods; a timing test measured during that measures the
/// teardown. Says how long it waited when it had to.
pub fn wait_for_quiet_cpu() {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        let Some((b0, t0)) = cpu_jiffies() else {
            return;
        };
        std::thread::sleep(Duration::from_millis(300));
        let Some((b1, t1)) = cpu_jiffies() else {
            return;
        };
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy <= 0.15 {
            if t.elapsed() > Duration::from_secs(1) {
                eprintln!("timing test: waited {:?} for a quiet machine", t.elapsed());
            }
            return;
        }
    }
    eprintln!("timing test: the machine stayed busy for 20 s; measuring anyway");
}

/// The queues a holder serves in `pod`'s netns, as the kernel lists them
/// there: (queue number, the holder's socket). One for delay faults, one
/// for DNS faults; none once both are removed.
pub fn holders_of(pod: &Pod) -> Vec<(u16, u32)> {
    testbed::procstat::queues_in_netns(pod.netns_path())
}

/// Every datagram of a 300-datagram probe from `from` to `to` arrives,
/// without send errors.
pub fn assert_whole(from: &Pod, to: &Pod, port: u16, what: &str) {
    let p = udp_probe(from, to, v4(to), port, 300, Duration::from_micros(200)).expect("udp probe");
    assert_eq!(
        (p.received, p.send_errors),
        (p.sent, 0),
        "{what}: every datagram arrives"
    );
}
