//! netfault-demo: the README's first command.
//!
//! Starts a private netfaultd, creates pods through a real CNI chain
//! (reference bridge + host-local, then netfault) in network namespaces,
//! injects faults through the agent's socket and prints what the receiver
//! measured before, during and after each fault. Needs root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use testbed::{udp_probe, Agent, Node, NodeOptions, Pod};

const PACKETS: u32 = 2000;
const GAP: Duration = Duration::from_micros(200);

struct Row {
    scenario: String,
    flow: String,
    sent: u64,
    received: u64,
    expected: String,
    counters: String,
}

fn v4(p: &Pod) -> Result<IpAddr> {
    p.ips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .context("pod has no IPv4 address")
}

fn measure(
    rows: &mut Vec<Row>,
    scenario: &str,
    from: &Pod,
    to: &Pod,
    port: u16,
    expected: &str,
    counters: String,
) -> Result<()> {
    let p = udp_probe(from, to, v4(to)?, port, PACKETS, GAP)?;
    if p.send_errors > 0 {
        bail!("{scenario}: the sender saw {} send errors", p.send_errors);
    }
    rows.push(Row {
        scenario: scenario.to_string(),
        flow: format!("{} -> {}:{port}/udp", from.name, to.name),
        sent: p.sent,
        received: p.received,
        expected: expected.to_string(),
        counters,
    });
    Ok(())
}

fn counters(client: &netfault_api::Client, id: &str) -> String {
    match client.call("GET", &format!("/v1/faults/{id}"), None) {
        Ok(f) => format!(
            "matched {} dropped {}",
            f["counters"]["matched"], f["counters"]["dropped"]
        ),
        Err(e) => format!("({e})"),
    }
}

fn main() -> Result<()> {
    if !testbed::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root (sudo bash scripts/demo.sh)");
    }
    let dir = testbed::TempDir::new("netfault-demo").context("temp dir")?;
    println!(
        "netfault demo: starting netfaultd in {}",
        dir.path().display()
    );
    let agent = Agent::start(dir.path()).context("starting netfaultd")?;
    let client = agent.client();
    let node = Node::new(NodeOptions {
        socket: agent.socket(),
        ..NodeOptions::default()
    })
    .context("creating the node netns and CNI chain")?;

    let t = Instant::now();
    let web = node.add_pod("web", &BTreeMap::new())?;
    let api = node.add_pod("api", &BTreeMap::new())?;
    let mut ann = BTreeMap::new();
    ann.insert("netfault.io/loss".to_string(), "20%".to_string());
    ann.insert("netfault.io/duration".to_string(), "2m".to_string());
    let flaky = node.add_pod("flaky", &ann)?;
    println!(
        "created 3 pods through CNI (bridge -> netfault) in {:.0?}: web {:?}, api {:?}, flaky {:?} (annotated netfault.io/loss: 20%)",
        t.elapsed(),
        web.ips,
        api.ips,
        flaky.ips
    );
    let sandboxes: Value = client.call("GET", "/v1/sandboxes", None)?;
    println!(
        "netfaultd enrolled {} sandboxes",
        sandboxes.as_array().map_or(0, Vec::len)
    );

    let mut rows = Vec::new();
    measure(
        &mut rows,
        "baseline",
        &web,
        &api,
        8080,
        "0% loss",
        "-".into(),
    )?;
    let birth = sandboxes
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == flaky.container_id.as_str()))
        .and_then(|s| s["birth_faults"][0].as_str())
        .unwrap_or_default()
        .to_string();
    measure(
        &mut rows,
        "birth-time annotation",
        &flaky,
        &api,
        8080,
        "20% loss (from the pod's first packet)",
        counters(&client, &birth),
    )?;

    let loss = client.call(
        "POST",
        "/v1/faults",
        Some(
            &json!({"target": {"pod": {"namespace": "default", "name": "web"}},
            "direction": "egress", "action": {"type": "loss", "percent": 30}, "duration": "60s"}),
        ),
    )?;
    let loss_id = loss["id"].as_str().unwrap_or_default().to_string();
    measure(
        &mut rows,
        "30% egress loss on web",
        &web,
        &api,
        8080,
        "30% loss",
        counters(&client, &loss_id),
    )?;
    if let Some(r) = rows.last_mut() {
        r.counters = counters(&client, &loss_id);
    }
    client.call("DELETE", &format!("/v1/faults/{loss_id}"), None)?;

    let bh = client.call(
        "POST",
        "/v1/faults",
        Some(&json!({"target": {"sandbox": api.container_id}, "direction": "ingress",
            "match": {"protocol": "udp", "ports": "8080"}, "action": {"type": "blackhole"}, "duration": "60s"})),
    )?;
    let bh_id = bh["id"].as_str().unwrap_or_default().to_string();
    measure(
        &mut rows,
        "blackhole api port 8080",
        &web,
        &api,
        8080,
        "100% loss",
        String::new(),
    )?;
    measure(
        &mut rows,
        "blackhole api port 8080",
        &web,
        &api,
        9090,
        "0% (other port)",
        String::new(),
    )?;
    let c = counters(&client, &bh_id);
    for r in rows.iter_mut().rev().take(2) {
        r.counters = c.clone();
    }
    client.call("DELETE", &format!("/v1/faults/{bh_id}"), None)?;
    measure(
        &mut rows,
        "after removal",
        &web,
        &api,
        8080,
        "0% loss",
        "-".into(),
    )?;

    println!();
    println!(
        "{:<26} {:<22} {:>6} {:>8} {:>9}  {:<36} {}",
        "SCENARIO", "FLOW", "SENT", "RECEIVED", "LOSS", "EXPECTED", "AGENT COUNTERS"
    );
    for r in &rows {
        let loss = if r.sent == 0 {
            0.0
        } else {
            100.0 * (r.sent - r.received) as f64 / r.sent as f64
        };
        println!(
            "{:<26} {:<22} {:>6} {:>8} {:>8.1}%  {:<36} {}",
            r.scenario, r.flow, r.sent, r.received, loss, r.expected, r.counters
        );
    }
    println!();
    println!("Loss was measured by the receiving pod's socket; the senders saw no errors (silent loss, as on a real network).");

    for pod in [&web, &api, &flaky] {
        node.del_pod(pod)?;
    }
    let left: Value = client.call("GET", "/v1/sandboxes", None)?;
    println!(
        "CNI DEL released every pod: {} sandboxes left enrolled.",
        left.as_array().map_or(0, Vec::len)
    );
    Ok(())
}
