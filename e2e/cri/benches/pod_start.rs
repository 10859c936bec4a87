//! Pod start latency through a real containerd: RunPodSandbox with netfault
//! in the CNI chain (the DaemonSet deployed, its agent up) and without (the
//! same conflist minus the netfault entry), side by side with the
//! difference. The goal (issue 9) is at most 5 ms added at p99; the bench
//! prints it and does not pass or fail on it.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench -p netfault-e2e-cri --bench pod_start
//! ```
//!
//! The agent image is built from the release binaries (`cargo bench` does
//! not build them; the first run builds the image, about a minute, then it
//! is cached). As non-root it prints one line and exits 0.
//! `NETFAULT_POD_START_PODS` sets the number of pods per configuration
//! (default 60, at least 30).
//!
//! Two nodes of the e2e-cri harness, each its own containerd + runc in its
//! own node netns, both with the DaemonSet deployed the same way (so both
//! run an agent). On one, install-cni keeps netfault appended to the pod
//! conflist (`bridge` + `host-local` + `netfault`); on the other its
//! install-cni container is stopped, and on SIGTERM it removes the entry:
//! that node's conflist is the same one minus netfault, with the agent still
//! up beside it. Pods are started alternately on the two (ABBA order, so
//! that drift and the machine's other work fall on both alike); each
//! RunPodSandbox call is timed alone, as the kubelet sees it (the sandbox
//! and pause container created, the CNI chain run). Each pod of the node
//! with netfault is then checked to be enrolled with its agent (so netfault
//! did run in the chain), and both pods are stopped (StopPodSandbox, timed: CNI DEL) and removed before
//! the next pair, so every start sees the same node.

use std::time::{Duration, Instant};

use e2e_cri::{api, AgentPod, Node, PodSpec, INSTALL_CNI_CONTAINER};
use testbed::{ms, quantile};

/// Pods per configuration, unless `NETFAULT_POD_START_PODS` says otherwise.
const DEFAULT_PODS: usize = 60;
/// The issue's minimum.
const MIN_PODS: usize = 30;
/// Unrecorded pods per node first (the pause image's snapshot, caches).
const WARMUP: usize = 3;

type R<T> = Result<T, String>;

fn main() {
    testbed::bench_main("pod_start", run);
}

fn pods() -> R<usize> {
    match std::env::var("NETFAULT_POD_START_PODS") {
        Ok(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= MIN_PODS)
            .ok_or_else(|| {
                format!("NETFAULT_POD_START_PODS: a number of at least {MIN_PODS}, got {s:?}")
            }),
        Err(_) => Ok(DEFAULT_PODS),
    }
}

/// One configuration: a node, its agent, and whether netfault is in its chain.
struct Config<'a> {
    label: &'static str,
    node: &'a Node,
    agent: &'a AgentPod,
    chained: bool,
    run: Vec<f64>,
    stop: Vec<f64>,
}

impl Config<'_> {
    /// Starts a pod (RunPodSandbox timed alone), checks its enrolment, then
    /// stops (timed) and removes it.
    fn pod(&mut self, name: &str, record: bool) -> R<()> {
        let config = self.node.sandbox_config(&PodSpec::new(name));
        std::fs::create_dir_all(&config.log_directory)
            .map_err(|e| format!("creating {}: {e}", config.log_directory))?;
        let mut cri = self.node.cri();
        let started = Instant::now();
        let id = self
            .node
            .block_on(cri.runtime.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .map_err(|e| format!("RunPodSandbox on the node {}: {e}", self.label))?
            .into_inner()
            .pod_sandbox_id;
        let run = started.elapsed();
        let enrolled = match self.agent.sandboxes() {
            _ if !self.chained => Ok(()),
            Ok(list) if list.iter().any(|s| s["id"] == id.as_str()) => Ok(()),
            Ok(_) => Err(format!(
                "pod {name} ({id}) started but netfault did not enrol it: is netfault in the chain?"
            )),
            Err(e) => Err(format!("listing the agent's sandboxes: {e}")),
        };
        let started = Instant::now();
        let stopped = self
            .node
            .stop_sandbox(&id)
            .map_err(|e| format!("StopPodSandbox on the node {}: {e}", self.label));
        let stop = started.elapsed();
        let removed = self
            .node
            .remove_sandbox(&id)
            .map_err(|e| format!("RemovePodSandbox on the node {}: {e}", self.label));
        enrolled.and(stopped).and(removed)?;
        if record {
            self.run.push(ms(run));
            self.stop.push(ms(stop));
        }
        Ok(())
    }
}

fn run() -> R<()> {
    let pods = pods()?;
    println!(
        "== pod start through containerd: RunPodSandbox with and without netfault, {pods} pods each, alternating"
    );
    // Drop order (reverse of declaration): each node's teardown stops its
    // pods, the DaemonSet's included.
    let with = Node::start().map_err(|e| format!("starting the node with netfault: {e}"))?;
    let without = Node::start().map_err(|e| format!("starting the node without netfault: {e}"))?;
    eprintln!("deploying the DaemonSet on both (builds the agent image on the first run) ...");
    let agent = with
        .deploy_daemonset()
        .map_err(|e| format!("deploying the DaemonSet: {e}"))?;
    let other = without
        .deploy_daemonset()
        .map_err(|e| format!("deploying the DaemonSet: {e}"))?;
    let install_cni = other
        .container_id(INSTALL_CNI_CONTAINER)
        .map_err(|e| e.to_string())?
        .to_string();
    without
        .stop_container(&install_cni, Duration::from_secs(10))
        .map_err(|e| format!("stopping install-cni: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while without.conflist_has_netfault() {
        if Instant::now() > deadline {
            return Err("install-cni stopped but netfault is still in the conflist".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !with.conflist_has_netfault() {
        return Err("install-cni did not append netfault to the conflist".into());
    }
    let mut configs = [
        Config {
            label: "with netfault",
            node: &with,
            agent: &agent,
            chained: true,
            run: Vec::new(),
            stop: Vec::new(),
        },
        Config {
            label: "without netfault",
            node: &without,
            agent: &other,
            chained: false,
            run: Vec::new(),
            stop: Vec::new(),
        },
    ];
    eprintln!("warming up ...");
    for i in 0..WARMUP {
        for c in configs.iter_mut() {
            c.pod(&format!("warm-{i}"), false)?;
        }
    }
    eprintln!("measuring ...");
    for i in 0..pods {
        // ABBA: with, without, without, with, ...
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            configs[k].pod(&format!("bench-{i}"), true)?;
        }
    }
    let left = agent
        .sandboxes()
        .map_err(|e| format!("listing the agent's sandboxes: {e}"))?
        .into_iter()
        .filter(|s| s["id"] != agent.sandbox.id.as_str())
        .count();
    if left != 0 {
        return Err(format!(
            "{left} sandboxes still enrolled after every StopPodSandbox"
        ));
    }
    report(&configs, pods);
    Ok(())
}

fn p(v: &[f64], q: f64) -> f64 {
    quantile(v, q).unwrap_or(f64::NAN)
}

fn report(configs: &[Config], pods: usize) {
    let [with, without] = configs else {
        return;
    };
    println!("\n   {:<40} {:>8} {:>8} {:>8}", "ms", "p50", "p99", "max");
    let row = |label: &str, v: &[f64]| {
        println!(
            "   {label:<40} {:>8.2} {:>8.2} {:>8.2}",
            p(v, 0.5),
            p(v, 0.99),
            v.iter().copied().fold(f64::NAN, f64::max)
        );
    };
    row("RunPodSandbox, without netfault", &without.run);
    row("RunPodSandbox, with netfault", &with.run);
    let (d50, d99) = (
        p(&with.run, 0.5) - p(&without.run, 0.5),
        p(&with.run, 0.99) - p(&without.run, 0.99),
    );
    println!(
        "   {:<40} {d50:>8.2} {d99:>8.2}          goal: added p99 <= 5 ms ({})",
        "  added by netfault",
        if d99 <= 5.0 { "met" } else { "NOT met" }
    );
    // Pods i of the two configurations ran next to each other: the
    // distribution of their differences is less noisy than a difference
    // of two distributions' tails.
    let paired: Vec<f64> = with
        .run
        .iter()
        .zip(&without.run)
        .map(|(a, b)| a - b)
        .collect();
    let iqr = p(&paired, 0.75) - p(&paired, 0.25);
    println!(
        "   {:<40} {:>8.2}          (p25 {:.2}, p75 {:.2})",
        "  paired difference, median",
        p(&paired, 0.5),
        p(&paired, 0.25),
        p(&paired, 0.75)
    );
    if iqr > 5.0 {
        println!(
            "   note: the paired differences spread over {iqr:.1} ms (p25 to p75), more than the 5 ms goal: \
             at this machine's load the difference is noise; NETFAULT_POD_START_PODS raises the count"
        );
    }
    row("StopPodSandbox, without netfault", &without.stop);
    row("StopPodSandbox, with netfault", &with.stop);
    println!(
        "   {:<40} {:>8.2} {:>8.2}",
        "  added by netfault",
        p(&with.stop, 0.5) - p(&without.stop, 0.5),
        p(&with.stop, 0.99) - p(&without.stop, 0.99)
    );
    println!(
        "   ({pods} pods per configuration; p99 is the value at rank round(0.99 (n - 1)), with {pods} samples the slowest or next to it)"
    );
}
