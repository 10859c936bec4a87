//! Load: fault create/delete operations at a target rate (1,000 per second)
//! for 60 s across 20 pods, with a mix of backends, from several client
//! threads over the unix socket; then, with every fault deleted, what the
//! agent holds compared with before.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench load
//! ```
//!
//! `NETFAULT_LOAD_SECONDS` (default 60), `NETFAULT_LOAD_RATE` (operations per
//! second over all threads, default 1000), `NETFAULT_LOAD_THREADS` (default
//! 8), `NETFAULT_LOAD_PODS` (default 20), `NETFAULT_LOAD_KINDS` (`all`,
//! `ebpf`, or a list such as `loss,delay`). The agent inherits the
//! environment: `NETFAULT_LIBNFTABLES=off` makes it run the `nft` binary
//! (the bench prints which path it used).
//!
//! Each thread paces itself to its share of the rate (when it falls behind
//! it goes as fast as the agent answers) and keeps at most two faults of its
//! own alive: POST, POST, then DELETE the oldest and POST, ... so every
//! operation is a POST or a DELETE (one request each, a new connection as
//! the CNI plugin makes). Kinds rotate: eBPF `loss`, `blackhole`, `rate`;
//! `delay` (NFQUEUE and its holder process); proxy `http-abort`,
//! `tcp-bandwidth`; `dns-error` (proxy and the DNS queue's holder). Pods are
//! picked at random.
//!
//! Leak check, at three points: the pods enrolled with no fault ever; after
//! a warm-up (every kind created and deleted on every pod, so caches and
//! allocator pools exist); after the load, all faults deleted and 2 s of
//! quiet. Compared: the agent's RSS and open descriptors, its eBPF maps'
//! entries (addresses bound in `nf_sandboxes`, rule slots in use in
//! `nf_rules`, read through the agent's own map fds: `/proc/PID/fdinfo`
//! names the map ids, aya opens them by id), nftables objects in every pod
//! netns, holder processes, and `GET /v1/faults` (must be empty). The bench
//! prints; a fault left over or a leak is printed as such, not an error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use aya::maps::{Array, HashMap, Map, MapData};
use netfault_ebpf::{AddrKey, RawRule};
use serde_json::{json, Value};
use testbed::env_or as env;
use testbed::{in_netns, procstat, summary_ms, AgentNode, NodeOptions, Pod};

fn main() {
    testbed::bench_main("load", run);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Loss,
    Blackhole,
    Rate,
    Delay,
    HttpAbort,
    TcpBandwidth,
    DnsError,
}

const KINDS: [Kind; 7] = [
    Kind::Loss,
    Kind::Blackhole,
    Kind::Rate,
    Kind::Delay,
    Kind::HttpAbort,
    Kind::TcpBandwidth,
    Kind::DnsError,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Loss => "loss (ebpf)",
            Kind::Blackhole => "blackhole (ebpf)",
            Kind::Rate => "rate (ebpf)",
            Kind::Delay => "delay (nfqueue)",
            Kind::HttpAbort => "http-abort (proxy)",
            Kind::TcpBandwidth => "tcp-bandwidth (proxy)",
            Kind::DnsError => "dns-error (proxy+dns)",
        }
    }

    /// The short name `NETFAULT_LOAD_KINDS` takes.
    fn short(self) -> &'static str {
        self.name().split(' ').next().unwrap_or("")
    }

    fn body(self, pod: &Pod) -> Value {
        let udp = |port: u16| json!({"protocol": "udp", "ports": port.to_string()});
        let tcp = |port: u16| json!({"protocol": "tcp", "ports": port.to_string()});
        let (matcher, action) = match self {
            Kind::Loss => (udp(9001), json!({"type": "loss", "percent": 50})),
            Kind::Blackhole => (udp(9002), json!({"type": "blackhole"})),
            Kind::Rate => (udp(9003), json!({"type": "rate", "rate": "1mbit"})),
            Kind::Delay => (udp(9004), json!({"type": "delay", "latency": "5ms"})),
            Kind::HttpAbort => (tcp(8080), json!({"type": "http-abort", "status": 503})),
            Kind::TcpBandwidth => (tcp(8081), json!({"type": "tcp-bandwidth", "rate": "1mbit"})),
            Kind::DnsError => (json!({}), json!({"type": "dns-error"})),
        };
        json!({
            "target": {"sandbox": pod.container_id},
            "direction": "egress",
            "match": matcher,
            "action": action,
            "duration": "10m",
        })
    }
}

// ---------------------------------------------------------------------------
// What the agent holds

/// The agent's eBPF maps, found through its own descriptors:
/// `/proc/PID/fdinfo/N` has a `map_id:` line for a map fd.
fn agent_map_ids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// (addresses bound in `nf_sandboxes`, rule slots in use in `nf_rules`).
fn bpf_entries(pid: u32) -> anyhow::Result<(usize, usize)> {
    let (mut addrs, mut rules) = (None, None);
    for id in agent_map_ids(pid) {
        let data = MapData::from_id(id).with_context(|| format!("opening eBPF map {id}"))?;
        let info = data.info().with_context(|| format!("eBPF map {id}"))?;
        match info.name_as_str() {
            Some("nf_sandboxes") => {
                let m: HashMap<MapData, AddrKey, u32> = HashMap::try_from(Map::HashMap(data))?;
                addrs = Some(m.keys().filter(Result::is_ok).count());
            }
            Some("nf_rules") => {
                let m: Array<MapData, RawRule> = Array::try_from(Map::Array(data))?;
                let empty = RawRule::default();
                let mut used = 0;
                for i in 0..m.len() {
                    if m.get(&i, 0).with_context(|| format!("nf_rules[{i}]"))? != empty {
                        used += 1;
                    }
                }
                rules = Some(used);
            }
            _ => {}
        }
    }
    match (addrs, rules) {
        (Some(a), Some(r)) => Ok((a, r)),
        _ => bail!("the agent (pid {pid}) holds no nf_sandboxes/nf_rules map"),
    }
}

/// The objects `nft -j list ruleset` lists in a pod's netns (metainfo
/// excluded): tables, chains, rules, sets, elements' sets...
fn nft_objects(pod: &Pod) -> anyhow::Result<usize> {
    let raw = in_netns(pod.netns_path(), || {
        nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            nftables::helper::DEFAULT_ARGS,
        )
    })?
    .map_err(|e| anyhow!("nft list ruleset in {}: {e}", pod.name))?;
    let v: Value = serde_json::from_str(&raw).context("nft JSON")?;
    Ok(v["nftables"].as_array().map_or(0, |a| {
        a.iter().filter(|o| o.get("metainfo").is_none()).count()
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    rss_kib: u64,
    fds: usize,
    bpf_addrs: usize,
    bpf_rules: usize,
    nft: usize,
    holders: usize,
    queues: usize,
    holder_threads: usize,
    faults: usize,
}

/// What the agent holds; after 2 s of quiet when `settle`.
fn held(bed: &AgentNode, pods: &[Pod], settle: bool) -> anyhow::Result<Held> {
    if settle {
        thread::sleep(Duration::from_secs(2));
    }
    let pid = bed.agent.pid();
    let mut rss = Vec::new();
    for _ in 0..3 {
        rss.push(testbed::rss_kib(pid));
        thread::sleep(Duration::from_millis(200));
    }
    rss.sort_unstable();
    let (bpf_addrs, bpf_rules) = bpf_entries(pid)?;
    let (mut nft, mut queues) = (0, 0);
    for p in pods {
        nft += nft_objects(p)?;
        queues += procstat::queues_in_netns(p.netns_path()).len();
    }
    let holders = procstat::holders_of_agent(pid);
    let faults = bed
        .agent
        .client()
        .call("GET", "/v1/faults", None)
        .map_err(|e| anyhow!("GET /v1/faults: {e}"))?
        .as_array()
        .map_or(0, Vec::len);
    Ok(Held {
        rss_kib: rss[1],
        fds: procstat::fd_count(pid).unwrap_or(0),
        bpf_addrs,
        bpf_rules,
        nft,
        holders: holders.len(),
        queues,
        holder_threads: holders.iter().map(|&h| procstat::thread_count(h)).sum(),
        faults,
    })
}

// ---------------------------------------------------------------------------
// The load

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Post,
    Delete,
}

/// One operation: what, which kind, when it ended (since the start), how
/// long it took, and whether it failed.
struct Sample {
    op: Op,
    kind: Kind,
    end: Duration,
    took: Duration,
    ok: bool,
}

struct Worker {
    samples: Vec<Sample>,
    errors: Vec<String>,
}

/// One client thread: its share of `rate` for `seconds`, then deletes what
/// it still holds (not counted).
#[allow(clippy::too_many_arguments)]
fn worker(
    socket: std::path::PathBuf,
    kinds: Vec<Kind>,
    bodies: Arc<Vec<Vec<Value>>>,
    index: usize,
    threads: usize,
    rate: f64,
    seconds: f64,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Worker {
    let client = netfault_api::Client::new(socket);
    let interval = Duration::from_secs_f64(threads as f64 / rate);
    let mut next = start + interval.mul_f64(index as f64 / threads as f64);
    let mut live: std::collections::VecDeque<(String, Kind)> = Default::default();
    let mut out = Worker {
        samples: Vec::new(),
        errors: Vec::new(),
    };
    let mut turn = index;
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0x2545_f491);
    let mut random = move || {
        // xorshift64*
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        rng_state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let deadline = start + Duration::from_secs_f64(seconds);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now < next {
            thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            // Far behind: no burst to catch up, go at the agent's pace.
            next = now;
        }
        next += interval;
        let t = Instant::now();
        let (op, kind, ok) = if live.len() < 2 {
            let kind = kinds[turn % kinds.len()];
            turn += 1;
            let pods = &bodies[kind as usize];
            let body = &pods[(random() % pods.len() as u64) as usize];
            match client.call("POST", "/v1/faults", Some(body)) {
                Ok(f) => match f["id"].as_str() {
                    Some(id) => {
                        live.push_back((id.to_string(), kind));
                        (Op::Post, kind, true)
                    }
                    None => {
                        out.errors.push(format!("POST answered without an id: {f}"));
                        (Op::Post, kind, false)
                    }
                },
                Err(e) => {
                    out.errors.push(format!("POST {}: {e}", kind.name()));
                    (Op::Post, kind, false)
                }
            }
        } else {
            let Some((id, kind)) = live.pop_front() else {
                continue;
            };
            match client.call("DELETE", &format!("/v1/faults/{id}"), None) {
                Ok(_) => (Op::Delete, kind, true),
                Err(e) => {
                    out.errors.push(format!("DELETE {}: {e}", kind.name()));
                    (Op::Delete, kind, false)
                }
            }
        };
        let end = Instant::now();
        out.samples.push(Sample {
            op,
            kind,
            end: end - start,
            took: end - t,
            ok,
        });
    }
    for (id, kind) in live {
        if let Err(e) = client.call("DELETE", &format!("/v1/faults/{id}"), None) {
            out.errors
                .push(format!("final DELETE {}: {e}", kind.name()));
        }
    }
    out
}

fn run() -> anyhow::Result<()> {
    let seconds = env("NETFAULT_LOAD_SECONDS", 60usize).max(1) as f64;
    let rate = env("NETFAULT_LOAD_RATE", 1000usize).max(1) as f64;
    let threads = env("NETFAULT_LOAD_THREADS", 8usize).max(1);
    let npods = env("NETFAULT_LOAD_PODS", 20usize).max(1);
    let kinds: Vec<Kind> = match std::env::var("NETFAULT_LOAD_KINDS") {
        Ok(list) if !list.is_empty() && list != "all" => {
            let picked: Vec<Kind> = KINDS
                .iter()
                .copied()
                .filter(|k| {
                    list.split(',')
                        .any(|w| w == k.short() || (w == "ebpf" && k.name().contains("(ebpf)")))
                })
                .collect();
            if picked.is_empty() {
                bail!(
                    "NETFAULT_LOAD_KINDS={list}: none of all, ebpf, {}",
                    KINDS.map(Kind::short).join(", ")
                );
            }
            picked
        }
        _ => KINDS.to_vec(),
    };

    let bed = AgentNode::start("nf-load", NodeOptions::default())?;
    let pods: Vec<Pod> = (0..npods)
        .map(|i| bed.add_pod(&format!("l{i}")))
        .collect::<testbed::Result<_>>()?;
    let fresh = held(&bed, &pods, true)?;
    // How the agent runs nft commands (libnftables in process, or the binary).
    let nft_path = bed
        .agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .map(|c| c["nft"].as_str().unwrap_or("(not said)").to_string())
        .map_err(|e| anyhow!("GET /v1/capabilities: {e}"))?;

    // Warm-up: every kind created and deleted on every pod.
    for kind in KINDS {
        for p in &pods {
            let id = bed.agent.post_fault(&kind.body(p))?;
            bed.agent.delete_fault(&id)?;
        }
    }
    let warm = held(&bed, &pods, true)?;

    eprintln!("load: {rate} ops/s for {seconds} s, {threads} threads, {npods} pods ...");
    let bodies: Arc<Vec<Vec<Value>>> = Arc::new(
        KINDS
            .iter()
            .map(|k| pods.iter().map(|p| k.body(p)).collect())
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (socket, bodies, stop) = (bed.agent.socket(), bodies.clone(), stop.clone());
            let kinds = kinds.clone();
            thread::spawn(move || {
                worker(
                    socket, kinds, bodies, i, threads, rate, seconds, start, stop,
                )
            })
        })
        .collect();
    // Halfway: the same readings while faults come and go (so the readers
    // are seen to count something).
    thread::sleep(Duration::from_secs_f64(seconds / 2.0));
    let during = held(&bed, &pods, false);
    let errors = Mutex::new(Vec::new());
    let mut samples = Vec::new();
    for h in handles {
        let w = h.join().map_err(|_| anyhow!("a client thread panicked"))?;
        samples.extend(w.samples);
        if let Ok(mut e) = errors.lock() {
            e.extend(w.errors);
        }
    }
    let elapsed = samples
        .iter()
        .map(|s| s.end)
        .max()
        .unwrap_or_default()
        .max(Duration::from_millis(1));
    let during = during?;
    let after = held(&bed, &pods, true)?;

    // Report.
    let ok = samples.iter().filter(|s| s.ok).count();
    let failed = samples.len() - ok;
    println!(
        "netfault load bench: target {rate:.0} ops/s for {seconds:.0} s, {threads} client threads, {npods} pods"
    );
    println!("  nft commands: {nft_path}");
    println!(
        "  kinds, in turn: {}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  reached: {:.0} ops/s ({} operations in {:.1} s: {} POST, {} DELETE; {failed} failed)",
        samples.len() as f64 / elapsed.as_secs_f64(),
        samples.len(),
        elapsed.as_secs_f64(),
        samples.iter().filter(|s| s.op == Op::Post).count(),
        samples.iter().filter(|s| s.op == Op::Delete).count(),
    );
    let mut per_second = vec![0usize; elapsed.as_secs() as usize + 1];
    for s in &samples {
        if let Some(c) = per_second.get_mut(s.end.as_secs() as usize) {
            *c += 1;
        }
    }
    per_second.pop(); // the last, partial second
    if !per_second.is_empty() {
        let mut sorted = per_second.clone();
        sorted.sort_unstable();
        println!(
            "  ops per whole second: min {}, median {}, max {}",
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
    let lat = |f: &dyn Fn(&Sample) -> bool| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| f(s))
            .map(|s| s.took.as_secs_f64() * 1e3)
            .collect()
    };
    println!("  latency per operation (client side: connect, request, answer)");
    println!("    POST   {}", summary_ms(&lat(&|s| s.op == Op::Post)));
    println!("    DELETE {}", summary_ms(&lat(&|s| s.op == Op::Delete)));
    for &k in &kinds {
        println!(
            "    {:<22} POST {}   DELETE {}",
            k.name(),
            summary_ms(&lat(&|s| s.op == Op::Post && s.kind == k)),
            summary_ms(&lat(&|s| s.op == Op::Delete && s.kind == k))
        );
    }
    let errors = errors.into_inner().unwrap_or_default();
    if !errors.is_empty() {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in &errors {
            *counts.entry(e.chars().take(160).collect()).or_default() += 1;
        }
        println!("  errors ({}):", errors.len());
        for (e, c) in counts.iter().take(10) {
            println!("    {c} x {e}");
        }
    }

    println!(
        "\n  what the agent holds        no fault yet  after warm-up  during the load  after the load  grew (vs warm-up)"
    );
    type Row = (&'static str, fn(&Held) -> u64);
    let rows: [Row; 9] = [
        ("agent RSS (KiB)", |h| h.rss_kib),
        ("agent open fds", |h| h.fds as u64),
        ("eBPF nf_sandboxes entries", |h| h.bpf_addrs as u64),
        ("eBPF nf_rules slots in use", |h| h.bpf_rules as u64),
        ("nft objects, all pod netns", |h| h.nft as u64),
        ("holder processes", |h| h.holders as u64),
        ("holder threads", |h| h.holder_threads as u64),
        ("queues bound, all pod netns", |h| h.queues as u64),
        ("faults listed (GET)", |h| h.faults as u64),
    ];
    for (name, f) in rows {
        let (a, b, d, c) = (f(&fresh), f(&warm), f(&during), f(&after));
        println!(
            "  {name:<28} {a:>12} {b:>14} {d:>16} {c:>15}  {}",
            if c > b {
                format!("+{}", c - b)
            } else {
                "no".into()
            }
        );
    }
    if after.faults != 0 {
        println!("  STUCK: {} faults are still listed", after.faults);
    }
    Ok(())
}
