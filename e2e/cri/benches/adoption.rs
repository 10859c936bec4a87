//! Adoption at agent start, through a real containerd: 100 pods run
//! without netfault in their CNI chain, then the agent starts (the
//! DaemonSet's agent container, with its `--cri-socket`) and adopts them.
//!
//! Prints (not pass/fail):
//! - the CRI part alone, from this process: `ListPodSandbox` + a verbose
//!   `PodSandboxStatus` per sandbox + parsing, as the agent's pass does it
//!   (statuses concurrent over one channel), and sequentially;
//! - agent process started (its container started) → `/healthz` answers,
//!   and → all 100 enrolled (`source: cri`);
//! - the agent's own pass (list + status + 100 enrolments), from its log;
//! - for comparison, one sandbox enrolled as the CNI plugin does it (`PUT
//!   /v1/sandboxes/{id}` on a released one), per sandbox.
//!
//! `cargo build --release --workspace && cargo bench -p netfault-e2e-cri --bench adoption`
//! (root; the agent image is built from this profile's binaries).

use std::time::{Duration, Instant};

use e2e_cri::{AgentPod, Error, Node, Probe, Result, Sandbox, AGENT_CONTAINER};
use netfault_cri::SandboxView;
use serde_json::{json, Value};

const PODS: usize = 100;
const CRI_ROUNDS: usize = 5;
const CNI_SAMPLES: usize = 20;

fn main() {
    testbed::bench_main("adoption", run);
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

/// List + verbose status of every READY sandbox + parsing, statuses
/// concurrent (`concurrent`) or one after the other.
fn cri_pass(node: &Node, concurrent: bool) -> Result<(Duration, usize)> {
    let mut cri = node.cri();
    node.block_on(async move {
        let t = Instant::now();
        let listed = cri.sandboxes().await?;
        let ready: Vec<String> = listed
            .iter()
            .filter(|s| netfault_cri::is_ready(s))
            .map(|s| s.id.clone())
            .collect();
        let mut views = Vec::with_capacity(ready.len());
        if concurrent {
            let mut calls = tokio::task::JoinSet::new();
            for id in ready {
                let mut c = cri.clone();
                calls.spawn(async move { c.sandbox_status(&id).await });
            }
            while let Some(r) = calls.join_next().await {
                let (status, info) = r.map_err(|e| Error::Other(e.to_string()))??;
                views.push(SandboxView::new(&status, &info));
            }
        } else {
            for id in ready {
                let (status, info) = cri.sandbox_status(&id).await?;
                views.push(SandboxView::new(&status, &info));
            }
        }
        let with_netns = views.iter().filter(|v| v.netns.is_some()).count();
        Ok((t.elapsed(), with_netns))
    })
}

/// The DaemonSet's agent container alone (no install-cni: netfault stays
/// out of the chain), started now.
fn start_agent(node: &Node) -> Result<AgentPod> {
    let mut plan = node.daemonset_plan()?;
    plan.containers.retain(|c| c.name == AGENT_CONTAINER);
    node.start_plan(plan)
}

fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            return Err(Error::Other(format!("not done in {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t.elapsed())
}

fn adopted(agent: &AgentPod, pods: &[Sandbox]) -> usize {
    let listed = agent.sandboxes().unwrap_or_default();
    pods.iter()
        .filter(|p| {
            listed
                .iter()
                .any(|s| s["id"] == p.id.as_str() && s["source"] == "cri")
        })
        .count()
}

/// The `elapsed_ms` of the agent's first pass that adopted something.
fn pass_ms(log: &str) -> Option<(f64, String)> {
    let line = log
        .lines()
        .find(|l| l.contains("container runtime pass") && l.contains("adopted="))?;
    let v = line.split("elapsed_ms=").nth(1)?;
    let n: f64 = v
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()?;
    let adopted = line
        .split("adopted=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .to_string();
    Some((n, adopted))
}

/// Release a sandbox (`DELETE`) and enrol it again as the CNI plugin does
/// (`PUT`), timing the PUT. `None` when the poll adopted it in between.
fn cni_enrolment(agent: &AgentPod, pod: &Sandbox) -> Result<Option<Duration>> {
    let path = format!("/v1/sandboxes/{}", pod.id);
    let api_err = |what: &str| {
        let context = format!("{what} {path}");
        move |source| Error::Api { context, source }
    };
    agent
        .client()
        .call("DELETE", &path, None)
        .map_err(api_err("DELETE"))?;
    let netns = pod
        .netns
        .as_ref()
        .ok_or_else(|| Error::Other(format!("{} has no netns", pod.name)))?;
    let body = json!({
        "netns": netns.display().to_string(),
        "ifname": "eth0",
        "ips": pod.ips.iter().map(|i| format!("{i}/24")).collect::<Vec<_>>(),
        "pod": {"namespace": "default", "name": pod.name, "uid": format!("uid-{}", pod.id)},
        "annotations": {},
    });
    let t = Instant::now();
    let r: Value = agent
        .client()
        .call("PUT", &path, Some(&body))
        .map_err(api_err("PUT"))?;
    let took = t.elapsed();
    Ok((r["source"] == "cni").then_some(took))
}

fn run() -> Result<()> {
    let node = Node::start()?;
    println!("netfault adoption bench: {PODS} pods started before the agent, through containerd");
    println!(
        "agent image from {} binaries",
        testbed::workspace_bin("netfaultd")
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let t = Instant::now();
    let mut pods = Vec::with_capacity(PODS);
    for i in 0..PODS {
        pods.push(node.pod(&format!("old-{i}"), &[])?);
    }
    let started = t.elapsed();
    println!(
        "{PODS} pods running (RunPodSandbox, bridge + host-local, no netfault): {} ({} each)",
        ms(started),
        ms(started / PODS as u32)
    );

    let mut conc = Vec::new();
    let mut seq = Vec::new();
    let mut seen = 0;
    for _ in 0..CRI_ROUNDS {
        let (d, n) = cri_pass(&node, true)?;
        conc.push(d);
        seen = n;
        seq.push(cri_pass(&node, false)?.0);
    }
    if seen != PODS {
        return Err(Error::Other(format!(
            "the CRI pass saw {seen} sandboxes with a netns, not {PODS}"
        )));
    }

    // The agent image is built outside the timing (start_plan imports it).
    e2e_cri::agent_image()?;
    let t0 = Instant::now();
    let agent = start_agent(&node)?;
    let container_started = t0.elapsed();
    let t1 = Instant::now();
    wait(Duration::from_secs(30), || {
        agent.healthz().is_ok_and(|s| s == 200)
    })?;
    let healthy = t1.elapsed();
    wait(Duration::from_secs(60), || adopted(&agent, &pods) == PODS)?;
    let all = t1.elapsed();
    let ready = node.probe(&agent, AGENT_CONTAINER, Probe::Readiness)?;
    let log = node.agent_log(&agent)?;
    let pass = pass_ms(&log);

    let mut cni = Vec::new();
    for pod in pods.iter().take(CNI_SAMPLES) {
        if let Some(d) = cni_enrolment(&agent, pod)? {
            cni.push(d);
        }
    }

    println!();
    println!("{:<58} {:>12} {:>12}", "", "median", "max");
    println!(
        "{:<58} {:>12} {:>12}",
        format!("CRI list + {PODS} verbose statuses + parse, concurrent"),
        ms(median(conc.clone())),
        ms(percentile(conc, 1.0))
    );
    println!(
        "{:<58} {:>12} {:>12}",
        format!("CRI list + {PODS} verbose statuses + parse, sequential"),
        ms(median(seq.clone())),
        ms(percentile(seq, 1.0))
    );
    println!();
    println!(
        "agent pod started (image import + RunPodSandbox + containers): {}",
        ms(container_started)
    );
    println!("agent process started -> /healthz 200: {}", ms(healthy));
    println!(
        "agent process started -> all {PODS} adopted (GET /v1/sandboxes): {} (readiness probe then exits {})",
        ms(all),
        ready.exit_code
    );
    println!(
        "  of which /healthz 200 -> all {PODS} adopted: {}",
        ms(all.saturating_sub(healthy))
    );
    match pass {
        Some((p, n)) => println!(
            "the agent's first pass (list + status + {n} enrolments): {p:.1} ms, {:.2} ms per sandbox",
            p / PODS as f64
        ),
        None => println!("the agent's pass: not in its log"),
    }
    if cni.is_empty() {
        println!("CNI-style enrolment (PUT): no sample (the poll re-adopted each first)");
    } else {
        println!(
            "CNI-style enrolment (PUT /v1/sandboxes/ID, as at ADD), per sandbox: median {}, p90 {} ({} samples)",
            ms(median(cni.clone())),
            ms(percentile(cni.clone(), 0.9)),
            cni.len()
        );
    }
    Ok(())
}
