//! The agent's memory (RSS, `VmRSS` of /proc/PID/status) with and without
//! the Kubernetes watches, side by side:
//!
//! - `node-only`: no API server; then with the node's pods enrolled through CNI;
//! - `kube`: watching the scripted API server (`testbed::ApiServer`): an
//!   empty cluster; then the node's pods (CNI, and on the API server);
//!   then 10,000 pods of other nodes (the cluster-wide cache of the
//!   NetworkFault reconciler); then a NetworkFault selecting some pods
//!   here and elsewhere, applied and reported.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench kube_memory
//! ```
//!
//! `NETFAULT_KUBE_MEMORY_PODS` (default 250) pods on the node,
//! `NETFAULT_KUBE_MEMORY_CLUSTER` (default 10000) pods on other nodes,
//! `NETFAULT_KUBE_MEMORY_ROUNDS` (default 3, for a spread); the order of the two
//! configurations alternates across rounds. Each step waits until the agent
//! reports the pods (enrolled, cached) and 1 s of quiet, then reads RSS
//! three times 200 ms apart and keeps the median. The bench prints, it does
//! not pass or fail.
//!
//! Bench honesty (issue 13), what applies here:
//! - rotation: the two configurations swap order every round;
//! - verification: the node-only agent lists exactly the pods enrolled; the
//!   kube agent reports its watches synced and exactly the pods put on the
//!   API server cached, and after the NetworkFault lists one active fault
//!   from it (`source: resource`) per selected pod here. Otherwise "NOT
//!   VERIFIED" and exit 1;
//! - paired medians: what the watches cost (kube minus node-only, with no
//!   pods and with the node's pods) is taken per round, both measured in
//!   that round, and printed as the median [min..max] over the rounds; the
//!   other rows are the median of the rounds with their values listed;
//! - no latency here, so no p99.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::{json, Value};
use testbed::env_or as env;
use testbed::{Agent, AgentNode, ApiServer, Node, NodeOptions, Pod, TempDir};

const GIVE_UP: Duration = Duration::from_secs(120);

fn main() {
    testbed::bench_main("kube_memory", run);
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// The median of three readings after a second of quiet.
fn settled_rss(agent: &Agent) -> anyhow::Result<u64> {
    std::thread::sleep(Duration::from_secs(1));
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(rss_kib(agent.pid())?);
        std::thread::sleep(Duration::from_millis(200));
    }
    v.sort_unstable();
    Ok(v[1])
}

fn wait(what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f()? {
        if t.elapsed() > GIVE_UP {
            return Err(anyhow!("timed out: {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn capabilities(agent: &Agent) -> anyhow::Result<Value> {
    agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .map_err(|e| anyhow!("GET /v1/capabilities: {e}"))
}

/// One measurement: its step name and RSS.
type Steps = Vec<(String, u64)>;

struct Sizes {
    pods: usize,
    cluster: usize,
}

fn node(agent: &Agent) -> anyhow::Result<Node> {
    Ok(Node::new(NodeOptions {
        socket: agent.socket(),
        ..NodeOptions::default()
    })?)
}

fn add_pods(bed: &AgentNode, n: usize) -> anyhow::Result<Vec<Pod>> {
    let t = Instant::now();
    let pods = (0..n)
        .map(|i| bed.add_pod(&format!("p{i}")))
        .collect::<testbed::Result<Vec<Pod>>>()?;
    eprintln!(
        "  {n} pods through CNI in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(pods)
}

fn node_only(sizes: &Sizes) -> anyhow::Result<Steps> {
    let dir = TempDir::new("netfault-mem-node")?;
    let agent = Agent::start(dir.path())?;
    let node = node(&agent)?;
    let bed = AgentNode { node, agent, dir };
    let mut steps = vec![("node-only: no pods".to_string(), settled_rss(&bed.agent)?)];
    let pods = add_pods(&bed, sizes.pods)?;
    let enrolled = || -> anyhow::Result<usize> {
        Ok(bed.agent.sandboxes().map_err(|e| anyhow!("{e}"))?.len())
    };
    let _ = wait("pods enrolled", || Ok(enrolled()? >= pods.len()));
    let n = enrolled()?;
    testbed::verify(n == pods.len(), || {
        format!(
            "node-only: the agent lists {n} sandboxes after {} CNI ADDs",
            pods.len()
        )
    })?;
    steps.push((
        format!("node-only: {} pods here", sizes.pods),
        settled_rss(&bed.agent)?,
    ));
    Ok(steps)
}

fn kube(sizes: &Sizes) -> anyhow::Result<Steps> {
    let server = ApiServer::start()?;
    let node_name = testbed::unique_name("node");
    let dir = TempDir::new("netfault-mem-kube")?;
    let kubeconfig = server.kubeconfig().to_string_lossy().into_owned();
    let agent = Agent::start_with_args(
        dir.path(),
        &["--kubeconfig", &kubeconfig, "--node-name", &node_name],
    )?;
    let node = node(&agent)?;
    let bed = AgentNode { node, agent, dir };
    let cached = |n: usize| {
        move |agent: &Agent| -> anyhow::Result<bool> {
            let caps = capabilities(agent)?;
            let nf = &caps["kubernetes"]["networkfaults"];
            Ok(nf["synced"] == true && nf["cluster_pods_cached"].as_u64() == Some(n as u64))
        }
    };
    let agent = &bed.agent;
    // A timed-out wait is reported by the check after it.
    let cached_now = |n: usize, what: &str| -> anyhow::Result<()> {
        let _ = wait(what, || cached(n)(agent));
        let caps = capabilities(agent)?;
        testbed::verify(cached(n)(agent)?, || {
            format!(
                "kube: {what}: expected the watches synced with {n} pods cached, the agent reports {}",
                caps["kubernetes"]["networkfaults"]
            )
        })?;
        Ok(())
    };
    cached_now(0, "the watches synced")?;
    let mut steps = vec![("kube: empty cluster".to_string(), settled_rss(agent)?)];

    let pods = add_pods(&bed, sizes.pods)?;
    let none = BTreeMap::new();
    for (i, p) in pods.iter().enumerate() {
        // Every fifth pod here is a chaos target.
        let app = if i % 5 == 0 { "chaos" } else { "web" };
        let labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        server.add_pod_with_labels(&p.namespace, &p.name, &p.uid, &node_name, &labels, &none);
    }
    cached_now(pods.len(), "the node's pods cached")?;
    steps.push((
        format!("kube: {} pods here", sizes.pods),
        settled_rss(agent)?,
    ));

    let t = Instant::now();
    for i in 0..sizes.cluster {
        // Every fiftieth pod elsewhere is a chaos target.
        let app = if i % 50 == 0 { "chaos" } else { "web" };
        let labels = BTreeMap::from([
            ("app".to_string(), app.to_string()),
            ("pod-template-hash".to_string(), format!("{:010x}", i / 10)),
        ]);
        server.add_pod_with_labels(
            "default",
            &format!("remote-{i}"),
            &testbed::random_uuid(),
            &format!("node-{}", i % 100),
            &labels,
            &none,
        );
    }
    cached_now(pods.len() + sizes.cluster, "the cluster's pods cached")?;
    eprintln!(
        "  {} cluster pods added and cached in {:.1} s",
        sizes.cluster,
        t.elapsed().as_secs_f64()
    );
    steps.push((
        format!("kube: + {} pods elsewhere", sizes.cluster),
        settled_rss(agent)?,
    ));

    let local_targets = pods.len().div_ceil(5);
    let uid = server.create_networkfault(
        "default",
        "chaos",
        json!({
            "action": {"type": "blackhole"}, "direction": "egress",
            "match": {"protocol": "udp", "ports": "9"},
            "duration": "10m", "selector": {"matchLabels": {"app": "chaos"}}, "mode": "all",
        }),
    );
    let applied = wait("the NetworkFault applied here", || {
        let nf = server.networkfault(&uid).unwrap_or(Value::Null);
        Ok(nf["status"]["nodes"].as_array().is_some_and(|n| {
            n.iter().any(|e| {
                e["node"] == node_name.as_str()
                    && e["state"] == "Applied"
                    && e["pods"].as_array().map(Vec::len) == Some(local_targets)
            })
        }))
    });
    if let Err(e) = applied {
        let nf = server.networkfault(&uid).unwrap_or(Value::Null);
        return Err(e.context(format!(
            "status: {}\nagent log:\n{}",
            nf["status"],
            agent.log_tail(30)
        )));
    }
    let list = agent
        .client()
        .call("GET", "/v1/faults", None)
        .map_err(|e| anyhow!("GET /v1/faults: {e}"))?;
    let from_resource = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["source"] == "resource" && f["state"] == "active")
        .count();
    testbed::verify(from_resource == local_targets, || {
        format!("kube: the NetworkFault selects {local_targets} pods here, the agent lists {from_resource} active faults from a resource")
    })?;
    steps.push((
        format!("kube: + NetworkFault on {local_targets} pods here"),
        settled_rss(agent)?,
    ));
    Ok(steps)
}

fn run() -> anyhow::Result<()> {
    let sizes = Sizes {
        pods: env("NETFAULT_KUBE_MEMORY_PODS", 250),
        cluster: env("NETFAULT_KUBE_MEMORY_CLUSTER", 10_000),
    };
    let rounds = env("NETFAULT_KUBE_MEMORY_ROUNDS", 3usize).max(1);
    let mut results: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for round in 0..rounds {
        let kube_first = round % 2 == 1;
        eprintln!(
            "round {}: {}",
            round + 1,
            if kube_first {
                "kube, node-only"
            } else {
                "node-only, kube"
            }
        );
        let mut steps = Vec::new();
        for kube_now in [kube_first, !kube_first] {
            if kube_now {
                steps.extend(kube(&sizes)?);
            } else {
                steps.extend(node_only(&sizes)?);
            }
        }
        for (name, kib) in steps {
            if !order.contains(&name) {
                order.push(name.clone());
            }
            results.entry(name).or_default().push(kib);
        }
    }
    order.sort_by_key(|n| !n.starts_with("node-only"));
    let median = |name: &str| -> u64 {
        let mut v = results.get(name).cloned().unwrap_or_default();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    println!(
        "agent RSS (VmRSS, median of {rounds} round(s)); {} pods here, {} elsewhere",
        sizes.pods, sizes.cluster
    );
    let mut prev: Option<u64> = None;
    for name in &order {
        let kib = median(name);
        let delta = prev.map_or(String::new(), |p| {
            format!("{:+8.1} MiB", (kib as f64 - p as f64) / 1024.0)
        });
        println!(
            "  {name:<44} {:>8.1} MiB {delta}  rounds: {:?}",
            kib as f64 / 1024.0,
            results[name]
        );
        prev = Some(kib);
        if name.starts_with("node-only") && name.ends_with("here") {
            prev = None;
        }
    }
    let per = |a: &str, b: &str, n: usize| -> f64 {
        (median(b) as f64 - median(a) as f64) * 1024.0 / n.max(1) as f64
    };
    let names = |prefix: &str| {
        order
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (node, kube) = (names("node-only"), names("kube"));
    if let ([n0, n1], [k0, k1, ..]) = (node.as_slice(), kube.as_slice()) {
        let kib = |name: &String| -> Vec<f64> {
            results
                .get(name)
                .map(|v| v.iter().map(|k| *k as f64 / 1024.0).collect())
                .unwrap_or_default()
        };
        for (what, k, n) in [("no pods", k0, n0), ("the node's pods", k1, n1)] {
            println!(
                "the watches, kube - node-only, {what:<15}: {} MiB (median [min..max] of {rounds} paired round(s))",
                testbed::Spread::of(&testbed::paired_diffs(&kib(k), &kib(n))).range(1)
            );
        }
    }
    if let ([n0, n1], [k0, k1, k2, ..]) = (node.as_slice(), kube.as_slice()) {
        println!(
            "per pod on the node, node-only:      {:>8.0} bytes",
            per(n0, n1, sizes.pods)
        );
        println!(
            "per pod on the node, with the watch: {:>8.0} bytes",
            per(k0, k1, sizes.pods)
        );
        println!(
            "per pod elsewhere (cluster cache):   {:>8.0} bytes",
            per(k1, k2, sizes.cluster)
        );
        println!(
            "the watches on an empty cluster:     {:>8.1} MiB",
            (median(k0) as f64 - median(n0) as f64) / 1024.0
        );
    }
    Ok(())
}
