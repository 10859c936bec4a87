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
use testbed::{http_get, http_serve, udp_probe, Agent, Node, NodeOptions, Pod};

const PACKETS: u32 = 2000;
const GAP: Duration = Duration::from_micros(200);

struct Row {
    scenario: String,
    flow: String,
    sent: u64,
    received: u64,
    expected: String,
    /// Median one-way latency of the received datagrams, in ms.
    latency_ms: f64,
    counters: String,
}

fn v4(p: &Pod) -> Result<IpAddr> {
    p.ips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .context("pod has no IPv4 address")
}

/// Probes `from -> to:port` and records the result with the fault's counters
/// as the agent reports them right after.
fn measure(
    rows: &mut Vec<Row>,
    client: &netfault_api::Client,
    scenario: &str,
    (from, to, port): (&Pod, &Pod, u16),
    expected: &str,
    fault: Option<&str>,
) -> Result<()> {
    let p = udp_probe(from, to, v4(to)?, port, PACKETS, GAP)?;
    if p.send_errors > 0 {
        bail!("{scenario}: the sender saw {} send errors", p.send_errors);
    }
    let mut lat: Vec<Duration> = p.latencies.clone();
    lat.sort();
    let latency_ms = lat
        .get(lat.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    rows.push(Row {
        scenario: scenario.to_string(),
        flow: format!("{} -> {}:{port}/udp", from.name, to.name),
        sent: p.sent,
        received: p.received,
        expected: expected.to_string(),
        latency_ms,
        counters: fault.map_or_else(|| "-".to_string(), |id| counters(client, id)),
    });
    Ok(())
}

fn counters(client: &netfault_api::Client, id: &str) -> String {
    match client.call("GET", &format!("/v1/faults/{id}"), None) {
        Ok(f) if f["backend"] == "nfqueue" => format!(
            "matched {} delayed {}",
            f["counters"]["matched"], f["counters"]["affected"]
        ),
        Ok(f) if f["backend"] == "proxy" => format!(
            "matched {} affected {}",
            f["counters"]["matched"], f["counters"]["affected"]
        ),
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
    let c = &client;
    measure(
        &mut rows,
        c,
        "baseline",
        (&web, &api, 8080),
        "0% loss",
        None,
    )?;
    let birth = sandboxes
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == flaky.container_id.as_str()))
        .and_then(|s| s["birth_faults"][0].as_str())
        .unwrap_or_default()
        .to_string();
    let expected = "20% loss (from the pod's first packet)";
    measure(
        &mut rows,
        c,
        "birth-time annotation",
        (&flaky, &api, 8080),
        expected,
        Some(&birth),
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
        c,
        "30% egress loss on web",
        (&web, &api, 8080),
        "30% loss",
        Some(&loss_id),
    )?;
    client.call("DELETE", &format!("/v1/faults/{loss_id}"), None)?;

    // Delay without sch_netem: the NFQUEUE delay engine, composed with loss.
    let delay = client.call(
        "POST",
        "/v1/faults",
        Some(
            &json!({"target": {"sandbox": web.container_id}, "direction": "egress",
            "match": {"protocol": "udp", "ports": "8080"},
            "action": {"type": "delay", "latency": "50ms"}, "duration": "60s"}),
        ),
    )?;
    let delay_id = delay["id"].as_str().unwrap_or_default().to_string();
    measure(
        &mut rows,
        c,
        "50 ms egress delay on web",
        (&web, &api, 8080),
        "0% loss, latency +50 ms",
        Some(&delay_id),
    )?;
    let loss = client.call(
        "POST",
        "/v1/faults",
        Some(
            &json!({"target": {"sandbox": web.container_id}, "direction": "egress",
            "match": {"protocol": "udp", "ports": "8080"},
            "action": {"type": "loss", "percent": 10}, "duration": "60s"}),
        ),
    )?;
    let loss_id = loss["id"].as_str().unwrap_or_default().to_string();
    measure(
        &mut rows,
        c,
        "delay 50 ms + loss 10%",
        (&web, &api, 8080),
        "10% loss, latency +50 ms",
        Some(&loss_id),
    )?;
    client.call("DELETE", &format!("/v1/faults/{loss_id}"), None)?;
    client.call("DELETE", &format!("/v1/faults/{delay_id}"), None)?;

    let bh = client.call(
        "POST",
        "/v1/faults",
        Some(&json!({"target": {"sandbox": api.container_id}, "direction": "ingress",
            "match": {"protocol": "udp", "ports": "8080"}, "action": {"type": "blackhole"}, "duration": "60s"})),
    )?;
    let bh_id = bh["id"].as_str().unwrap_or_default().to_string();
    let bh = Some(bh_id.as_str());
    measure(
        &mut rows,
        c,
        "blackhole api port 8080",
        (&web, &api, 8080),
        "100% loss",
        bh,
    )?;
    measure(
        &mut rows,
        c,
        "blackhole api port 8080",
        (&web, &api, 9090),
        "0% (other port)",
        bh,
    )?;
    client.call("DELETE", &format!("/v1/faults/{bh_id}"), None)?;
    measure(
        &mut rows,
        c,
        "after removal",
        (&web, &api, 8080),
        "0% loss",
        None,
    )?;
    println!();
    println!(
        "{:<26} {:<22} {:>6} {:>8} {:>9} {:>10}  {:<36} AGENT COUNTERS",
        "SCENARIO", "FLOW", "SENT", "RECEIVED", "LOSS", "LATENCY", "EXPECTED"
    );
    for r in &rows {
        let loss = if r.sent == 0 {
            0.0
        } else {
            100.0 * (r.sent - r.received) as f64 / r.sent as f64
        };
        let latency = if r.latency_ms.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2} ms", r.latency_ms)
        };
        println!(
            "{:<26} {:<22} {:>6} {:>8} {:>8.1}% {:>10}  {:<36} {}",
            r.scenario, r.flow, r.sent, r.received, loss, latency, r.expected, r.counters
        );
    }
    println!();
    println!("Loss and latency (median one-way) were measured by the receiving pod's socket; the senders saw no errors (silent loss, as on a real network).");

    http_demo(&client, &web, &api)?;

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

const REQUESTS: usize = 200;

/// What a client pod saw for `REQUESTS` requests: status counts and the
/// median time to the whole reply.
fn http_row(
    client: &netfault_api::Client,
    scenario: &str,
    (from, to): (&Pod, &Pod),
    path: &str,
    expected: &str,
    fault: Option<&str>,
) -> Result<String> {
    let ip = v4(to)?;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let r = http_get(from, ip, 8080, path)?;
        *statuses.entry(r.status).or_default() += 1;
        times.push(r.elapsed);
    }
    times.sort();
    let median = times[times.len() / 2];
    let seen: Vec<String> = statuses
        .iter()
        .map(|(s, n)| {
            if *s == 0 {
                format!("reset x{n}")
            } else {
                format!("{s} x{n}")
            }
        })
        .collect();
    let counters = fault.map(|id| counters(client, id)).unwrap_or_default();
    Ok(format!(
        "{:<37} {:<14} {:<20} {:>10.2} ms  {:<18} {}",
        scenario,
        path,
        seen.join(", "),
        median.as_secs_f64() * 1000.0,
        expected,
        counters
    ))
}

fn post(client: &netfault_api::Client, body: Value) -> Result<String> {
    let f = client.call("POST", "/v1/faults", Some(&body))?;
    Ok(f["id"].as_str().unwrap_or_default().to_string())
}

/// HTTP faults through the agent's transparent proxy: server side (api's
/// ingress) and client side (web's egress).
fn http_demo(client: &netfault_api::Client, web: &Pod, api: &Pod) -> Result<()> {
    let _server = http_serve(api, 8080)?;
    let pair = (web, api);
    let mut rows = vec![http_row(client, "baseline", pair, "/home", "200", None)?];
    let abort = post(
        client,
        json!({"target": {"sandbox": api.container_id}, "direction": "ingress",
            "match": {"ports": "8080"},
            "action": {"type": "http-abort", "status": 503, "percent": 30}, "duration": "60s"}),
    )?;
    rows.push(http_row(
        client,
        "api: abort 503 on 30% (server side)",
        pair,
        "/home",
        "~30% 503",
        Some(&abort),
    )?);
    client.call("DELETE", &format!("/v1/faults/{abort}"), None)?;
    let by_path = post(
        client,
        json!({"target": {"sandbox": web.container_id}, "direction": "egress",
            "match": {"ports": "8080"},
            "action": {"type": "http-abort", "status": 503, "http": {"path": "/checkout*"}},
            "duration": "60s"}),
    )?;
    for path in ["/checkout/42", "/home"] {
        let expected = if path == "/home" {
            "200 (other path)"
        } else {
            "100% 503"
        };
        rows.push(http_row(
            client,
            "web: abort /checkout* (client side)",
            pair,
            path,
            expected,
            Some(&by_path),
        )?);
    }
    client.call("DELETE", &format!("/v1/faults/{by_path}"), None)?;
    let delay = post(
        client,
        json!({"target": {"sandbox": api.container_id}, "direction": "ingress",
            "match": {"ports": "8080"},
            "action": {"type": "http-delay", "delay": "100ms", "phase": "response"},
            "duration": "60s"}),
    )?;
    rows.push(http_row(
        client,
        "api: response delay 100 ms",
        pair,
        "/home",
        "200, +100 ms",
        Some(&delay),
    )?);
    // Through the server-side proxy, the server still sees the client.
    let peer = http_get(web, v4(api)?, 8080, "/whoami")?;
    client.call("DELETE", &format!("/v1/faults/{delay}"), None)?;
    rows.push(http_row(
        client,
        "after removal",
        pair,
        "/home",
        "200",
        None,
    )?);
    println!();
    println!(
        "HTTP through netfaultd's transparent proxy ({REQUESTS} requests each, web -> api:8080, a new connection per request):"
    );
    println!(
        "{:<37} {:<14} {:<20} {:>13}  {:<18} AGENT COUNTERS",
        "SCENARIO", "PATH", "STATUS SEEN", "MEDIAN TIME", "EXPECTED"
    );
    for r in rows {
        println!("{r}");
    }
    println!(
        "Through the server-side proxy, api saw web's own address ({}): {}",
        v4(web)?,
        peer.body
    );
    Ok(())
}
