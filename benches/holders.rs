//! Delay holders at scale (issue 13): 250 pods on one node, each with a
//! delay fault, served by the agent's one holder process. What that costs
//! in memory, and what the first and the last delay fault of a pod cost in
//! API time.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench holders
//! ```
//!
//! `NETFAULT_HOLDERS_PODS` (default 250, at most 251: the node's pod range
//! is a /24 and one more pod is the server) pods are enrolled through the
//! real CNI chain. Then, for every pod: a POST of a 20 ms egress delay on
//! UDP 9004 (the pod's first queue fault: its queue is bound and attached
//! to the holder), a POST of a second one on UDP 9005 (the holder is told
//! the new fault list only), then, after the measurements, the DELETE of
//! the second (the list again) and of the first (the last: the queue is
//! detached and unbound, the table removed). It prints:
//!
//! 1. memory: the agent's RSS and PSS, its descriptors, the holder
//!    processes (count, total RSS, total PSS; goal: PSS <= 32 MiB), before
//!    the faults, with them, and after their removal;
//! 2. API time per operation, p50 / p99 over the pods: the first fault
//!    against the second, paired pod by pod (the ratio per pod, median and
//!    IQR), and the two removals the same way.
//!
//! Bench honesty (issue 13), what applies here:
//! - rotation: the two POSTs (and the two DELETEs) of a pod run back to
//!   back, first then second: the order is the point of the comparison (a
//!   first fault attaches, a second does not), so it is not rotated;
//! - verification: with the faults in place, the kernel's
//!   `nfnetlink_queue` table in every pod's netns lists exactly one bound
//!   queue (the holder's); three pods (first, middle, last) see the delay
//!   in one-way times (median >= 15 ms) and their fault's `affected`
//!   counter grew; after the removal no pod has a bound queue and those
//!   pods see no delay. A failed check prints "NOT VERIFIED" and exits 1;
//! - paired medians: the first/second ratio is taken per pod, then its
//!   median and IQR printed;
//! - tails: "p99" over the pods (250 samples), else "max".

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use testbed::env_or as env;
use testbed::procstat::AgentMemory;
use testbed::{
    ms, paired_ratios, procstat, summary_ms, udp_probe, verify, AgentNode, NodeOptions, Pod, Spread,
};

const MAX_PODS: usize = 251;
const FIRST_PORT: u16 = 9004;
const SECOND_PORT: u16 = 9005;
const GOAL_PSS_MIB: f64 = 32.0;

fn main() {
    testbed::bench_main("holders", run);
}

fn delay_on(pod: &Pod, port: u16) -> Value {
    json!({
        "target": {"sandbox": pod.container_id},
        "direction": "egress",
        "match": {"protocol": "udp", "ports": port.to_string()},
        "action": {"type": "delay", "latency": "20ms"},
        "duration": "30m",
    })
}

/// The median one-way time of 20 datagrams from `from` to `srv` on the
/// delayed port.
fn one_way(from: &Pod, srv: &Pod) -> anyhow::Result<Duration> {
    let ip = srv.ipv4().context("the server pod has no IPv4")?;
    let p = udp_probe(from, srv, ip, FIRST_PORT, 20, Duration::from_millis(1))?;
    p.median_latency()
        .with_context(|| format!("{}: no datagram arrived", from.name))
}

/// Per pod, `a[i] / b[i]`: median and interquartile range.
fn ratio_spread(a: &[f64], b: &[f64]) -> String {
    format!("{}x", Spread::of(&paired_ratios(a, b)).iqr(2))
}

fn run() -> anyhow::Result<()> {
    let n = env("NETFAULT_HOLDERS_PODS", 250usize);
    if !(3..=MAX_PODS).contains(&n) {
        bail!("NETFAULT_HOLDERS_PODS={n}: from 3 to {MAX_PODS} (the node's pod range is a /24, and one more pod serves)");
    }
    let bed = AgentNode::start("nf-holders", NodeOptions::default())?;
    eprintln!("enrolling {n} pods and a server ...");
    let mut pods = Vec::with_capacity(n);
    for i in 0..n {
        pods.push(
            bed.add_pod(&format!("h{i}"))
                .with_context(|| format!("this machine created {i} of {n} pods"))?,
        );
    }
    let srv = bed.add_pod("hsrv")?;
    let samples = [0, n / 2, n - 1];
    for &i in &samples {
        let d = one_way(&pods[i], &srv)?;
        if d >= Duration::from_millis(15) {
            bail!("{}: {d:?} one way with no fault", pods[i].name);
        }
    }
    let mut snaps = vec![AgentMemory::read("no fault", bed.agent.pid())];

    eprintln!("a first and a second delay fault on each ...");
    let (mut first, mut second) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut ids = Vec::with_capacity(n);
    for pod in &pods {
        let t = Instant::now();
        let a = bed.agent.post_fault(&delay_on(pod, FIRST_PORT))?;
        first.push(ms(t.elapsed()));
        let t = Instant::now();
        let b = bed.agent.post_fault(&delay_on(pod, SECOND_PORT))?;
        second.push(ms(t.elapsed()));
        ids.push((a, b));
    }
    let bound: Vec<usize> = pods
        .iter()
        .map(|p| procstat::queues_in_netns(p.netns_path()).len())
        .collect();
    let wrong: Vec<String> = pods
        .iter()
        .zip(&bound)
        .filter(|(_, b)| **b != 1)
        .map(|(p, b)| format!("{}: {b}", p.name))
        .collect();
    verify(wrong.is_empty(), || {
        format!("pods without exactly one bound queue: {wrong:?}")
    })?;
    let mut delays = Vec::new();
    for &i in &samples {
        let d = one_way(&pods[i], &srv)?;
        verify(d >= Duration::from_millis(15), || {
            format!("{}: {d:?} one way with a 20 ms delay", pods[i].name)
        })?;
        let f = bed.agent.get_fault(&ids[i].0)?;
        let affected = f["counters"]["affected"].as_u64().unwrap_or(0);
        verify(affected >= 20, || {
            format!(
                "{}: the fault counted {affected} delayed datagrams: {f}",
                pods[i].name
            )
        })?;
        delays.push(format!("{} {:.1} ms", pods[i].name, ms(d)));
    }
    snaps.push(AgentMemory::read("a delay fault on each", bed.agent.pid()));

    eprintln!("removing them ...");
    let (mut del_second, mut del_last) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (a, b) in &ids {
        let t = Instant::now();
        bed.agent.delete_fault(b)?;
        del_second.push(ms(t.elapsed()));
        let t = Instant::now();
        bed.agent.delete_fault(a)?;
        del_last.push(ms(t.elapsed()));
    }
    let left: usize = pods
        .iter()
        .map(|p| procstat::queues_in_netns(p.netns_path()).len())
        .sum();
    verify(left == 0, || {
        format!("{left} queues still bound after the removal")
    })?;
    for &i in &samples {
        let d = one_way(&pods[i], &srv)?;
        verify(d < Duration::from_millis(15), || {
            format!("{}: {d:?} one way after the removal", pods[i].name)
        })?;
    }
    snaps.push(AgentMemory::read("after the removal", bed.agent.pid()));

    println!("netfault holders bench: {n} pods on one node, each with a delay fault (one holder process)");
    println!("  verified: one bound queue in each of the {n} pods' netns; one way on UDP {FIRST_PORT}: {}", delays.join(", "));
    println!("\n== 1. Memory (goal: holders' PSS <= {GOAL_PSS_MIB} MiB, agent RSS <= 64 MiB)");
    AgentMemory::print_table(&snaps);
    if let (Some(before), Some(with)) = (snaps.first(), snaps.get(1)) {
        println!(
            "  per pod with a delay fault: holders' PSS {:.1} KiB, agent RSS {:.1} KiB",
            (with.holders_pss as f64 - before.holders_pss as f64) / n as f64,
            (with.agent_rss as f64 - before.agent_rss as f64) / n as f64
        );
    }
    println!("\n== 2. API time per operation over the {n} pods (ms)");
    println!(
        "  POST, a pod's first delay fault (attach): {}",
        summary_ms(&first)
    );
    println!(
        "  POST, its second (fault list only):       {}",
        summary_ms(&second)
    );
    println!(
        "    first / second, per pod: {}",
        ratio_spread(&first, &second)
    );
    println!(
        "  DELETE, not the last (fault list only):   {}",
        summary_ms(&del_second)
    );
    println!(
        "  DELETE, the last (detach, table removed): {}",
        summary_ms(&del_last)
    );
    println!(
        "    last / not the last, per pod: {}",
        ratio_spread(&del_last, &del_second)
    );
    Ok(())
}
