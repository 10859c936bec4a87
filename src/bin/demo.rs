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
use testbed::dnsserver::{Dig, DnsServer};
use testbed::{http_get, http_serve, udp_probe, Agent, AgentNode, NodeOptions, Pod};

const PACKETS: u32 = 2000;
const GAP: Duration = Duration::from_micros(200);
/// HTTP requests per row of the HTTP table.
const REQUESTS: usize = 200;

fn main() -> Result<()> {
    if !testbed::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root (sudo bash scripts/demo.sh)");
    }
    let dir = testbed::TempDir::new("netfault-demo").context("temp dir")?;
    println!(
        "netfault demo: starting netfaultd in {}",
        dir.path().display()
    );
    let bed = AgentNode::start_in(dir, NodeOptions::default())
        .context("starting netfaultd and creating the node netns and CNI chain")?;
    let pods = Pods::create(&bed)?;

    let mut udp = Udp {
        agent: &bed.agent,
        pods: &pods,
        rows: Vec::new(),
    };
    udp_baseline_and_birth_annotation(&mut udp)?;
    udp_egress_loss(&mut udp)?;
    udp_delay_then_loss(&mut udp)?;
    udp_blackhole_one_port(&mut udp)?;
    udp.measure(
        "after removal",
        (&pods.web, &pods.api, 8080),
        "0% loss",
        None,
    )?;
    print_udp_table(&udp.rows);

    http_demo(&bed.agent, &pods.web, &pods.api)?;

    dns_demo(&bed.agent, &pods.web, &pods.api)?;

    pods.delete(&bed)?;
    println!(
        "CNI DEL released every pod: {} sandboxes left enrolled.",
        bed.agent.sandboxes()?.len()
    );
    Ok(())
}

/// The demo's pods: `web` and `api`, and `flaky`, born with a loss
/// annotation.
struct Pods {
    web: Pod,
    api: Pod,
    flaky: Pod,
    /// The sandboxes netfaultd listed once all three were enrolled.
    sandboxes: Vec<Value>,
}

impl Pods {
    fn create(bed: &AgentNode) -> Result<Pods> {
        let t = Instant::now();
        let web = bed.add_pod("web")?;
        let api = bed.add_pod("api")?;
        let mut ann = BTreeMap::new();
        ann.insert("netfault.io/loss".to_string(), "20%".to_string());
        ann.insert("netfault.io/duration".to_string(), "2m".to_string());
        let flaky = bed.node.add_pod("flaky", &ann)?;
        println!(
            "created 3 pods through CNI (bridge -> netfault) in {:.0?}: web {:?}, api {:?}, flaky {:?} (annotated netfault.io/loss: 20%)",
            t.elapsed(),
            web.ips,
            api.ips,
            flaky.ips
        );
        let sandboxes = bed.agent.sandboxes()?;
        println!("netfaultd enrolled {} sandboxes", sandboxes.len());
        Ok(Pods {
            web,
            api,
            flaky,
            sandboxes,
        })
    }

    /// CNI DEL of every pod.
    fn delete(&self, bed: &AgentNode) -> Result<()> {
        for pod in [&self.web, &self.api, &self.flaky] {
            bed.node.del_pod(pod)?;
        }
        Ok(())
    }
}

fn v4(p: &Pod) -> Result<IpAddr> {
    p.ipv4().context("pod has no IPv4 address")
}

/// What the agent counted for a fault, by its backend.
fn counters(agent: &Agent, id: &str) -> String {
    match agent.get_fault(id) {
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

// ---------------------------------------------------------------------------
// UDP: loss, delay and blackhole, measured by the receiving pod

/// One row of the UDP table.
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

/// The UDP scenarios' state: the agent, the pods and the rows so far.
struct Udp<'a> {
    agent: &'a Agent,
    pods: &'a Pods,
    rows: Vec<Row>,
}

impl Udp<'_> {
    /// Probes `from -> to:port` and records the result with the fault's
    /// counters as the agent reports them right after.
    fn measure(
        &mut self,
        scenario: &str,
        (from, to, port): (&Pod, &Pod, u16),
        expected: &str,
        fault: Option<&str>,
    ) -> Result<()> {
        let p = udp_probe(from, to, v4(to)?, port, PACKETS, GAP)?;
        if p.send_errors > 0 {
            bail!("{scenario}: the sender saw {} send errors", p.send_errors);
        }
        self.rows.push(Row {
            scenario: scenario.to_string(),
            flow: format!("{} -> {}:{port}/udp", from.name, to.name),
            sent: p.sent,
            received: p.received,
            expected: expected.to_string(),
            latency_ms: p.median_latency().map_or(f64::NAN, testbed::ms),
            counters: fault.map_or_else(|| "-".to_string(), |id| counters(self.agent, id)),
        });
        Ok(())
    }

    /// A fault on web's egress UDP port 8080 for 60 s.
    fn web_udp_egress(&self, action: Value) -> Result<String> {
        Ok(self.agent.post_fault(
            &json!({"target": {"sandbox": self.pods.web.container_id}, "direction": "egress",
            "match": {"protocol": "udp", "ports": "8080"}, "action": action, "duration": "60s"}),
        )?)
    }
}

/// No fault between web and api; then flaky, whose annotation gave it 20%
/// loss from its first packet.
fn udp_baseline_and_birth_annotation(udp: &mut Udp) -> Result<()> {
    let Pods {
        web,
        api,
        flaky,
        sandboxes,
    } = udp.pods;
    udp.measure("baseline", (web, api, 8080), "0% loss", None)?;
    let birth = sandboxes
        .iter()
        .find(|s| s["id"] == flaky.container_id.as_str())
        .and_then(|s| s["birth_faults"][0].as_str())
        .unwrap_or_default()
        .to_string();
    udp.measure(
        "birth-time annotation",
        (flaky, api, 8080),
        "20% loss (from the pod's first packet)",
        Some(&birth),
    )
}

/// 30% loss on web's egress, targeted by pod name.
fn udp_egress_loss(udp: &mut Udp) -> Result<()> {
    let (web, api) = (&udp.pods.web, &udp.pods.api);
    let id = udp.agent.post_fault(
        &json!({"target": {"pod": {"namespace": "default", "name": "web"}},
        "direction": "egress", "action": {"type": "loss", "percent": 30}, "duration": "60s"}),
    )?;
    udp.measure(
        "30% egress loss on web",
        (web, api, 8080),
        "30% loss",
        Some(&id),
    )?;
    Ok(udp.agent.delete_fault(&id)?)
}

/// Delay without sch_netem (the NFQUEUE delay engine), then composed with
/// loss.
fn udp_delay_then_loss(udp: &mut Udp) -> Result<()> {
    let flow = (&udp.pods.web, &udp.pods.api, 8080);
    let delay = udp.web_udp_egress(json!({"type": "delay", "latency": "50ms"}))?;
    udp.measure(
        "50 ms egress delay on web",
        flow,
        "0% loss, latency +50 ms",
        Some(&delay),
    )?;
    let loss = udp.web_udp_egress(json!({"type": "loss", "percent": 10}))?;
    udp.measure(
        "delay 50 ms + loss 10%",
        flow,
        "10% loss, latency +50 ms",
        Some(&loss),
    )?;
    udp.agent.delete_fault(&loss)?;
    Ok(udp.agent.delete_fault(&delay)?)
}

/// A blackhole on api's ingress UDP port 8080 leaves its other ports alone.
fn udp_blackhole_one_port(udp: &mut Udp) -> Result<()> {
    let (web, api) = (&udp.pods.web, &udp.pods.api);
    let id = udp.agent.post_fault(
        &json!({"target": {"sandbox": api.container_id}, "direction": "ingress",
            "match": {"protocol": "udp", "ports": "8080"}, "action": {"type": "blackhole"}, "duration": "60s"}),
    )?;
    let scenario = "blackhole api port 8080";
    udp.measure(scenario, (web, api, 8080), "100% loss", Some(&id))?;
    udp.measure(scenario, (web, api, 9090), "0% (other port)", Some(&id))?;
    Ok(udp.agent.delete_fault(&id)?)
}

fn print_udp_table(rows: &[Row]) {
    println!();
    println!(
        "{:<26} {:<22} {:>6} {:>8} {:>9} {:>10}  {:<36} AGENT COUNTERS",
        "SCENARIO", "FLOW", "SENT", "RECEIVED", "LOSS", "LATENCY", "EXPECTED"
    );
    for r in rows {
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
}

// ---------------------------------------------------------------------------
// HTTP: faults through the agent's transparent proxy

/// The HTTP scenarios' state: web is the client, api the server.
struct Http<'a> {
    agent: &'a Agent,
    web: &'a Pod,
    api: &'a Pod,
    rows: Vec<String>,
}

impl Http<'_> {
    /// What web saw for `REQUESTS` requests of `path` to api: status counts
    /// and the median time to the whole reply.
    fn row(
        &mut self,
        scenario: &str,
        path: &str,
        expected: &str,
        fault: Option<&str>,
    ) -> Result<()> {
        let ip = v4(self.api)?;
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let mut times = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let r = http_get(self.web, ip, 8080, path)?;
            *statuses.entry(r.status).or_default() += 1;
            times.push(r.elapsed);
        }
        let median = testbed::quantile(&times, 0.5).unwrap_or_default();
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
        let counters = fault.map(|id| counters(self.agent, id)).unwrap_or_default();
        self.rows.push(format!(
            "{:<37} {:<14} {:<20} {:>10.2} ms  {:<18} {}",
            scenario,
            path,
            seen.join(", "),
            median.as_secs_f64() * 1000.0,
            expected,
            counters
        ));
        Ok(())
    }

    /// A 60 s fault on port 8080 of `pod` in `direction`.
    fn fault(&self, pod: &Pod, direction: &str, action: Value) -> Result<String> {
        Ok(self.agent.post_fault(
            &json!({"target": {"sandbox": pod.container_id}, "direction": direction,
            "match": {"ports": "8080"}, "action": action, "duration": "60s"}),
        )?)
    }
}

/// HTTP faults through the agent's transparent proxy: server side (api's
/// ingress) and client side (web's egress).
fn http_demo(agent: &Agent, web: &Pod, api: &Pod) -> Result<()> {
    let _server = http_serve(api, 8080)?;
    let mut http = Http {
        agent,
        web,
        api,
        rows: Vec::new(),
    };
    http.row("baseline", "/home", "200", None)?;
    http_abort_share(&mut http)?;
    http_abort_by_path(&mut http)?;
    let peer = http_response_delay(&mut http)?;
    http.row("after removal", "/home", "200", None)?;
    println!();
    println!(
        "HTTP through netfaultd's transparent proxy ({REQUESTS} requests each, web -> api:8080, a new connection per request):"
    );
    println!(
        "{:<37} {:<14} {:<20} {:>13}  {:<18} AGENT COUNTERS",
        "SCENARIO", "PATH", "STATUS SEEN", "MEDIAN TIME", "EXPECTED"
    );
    for r in &http.rows {
        println!("{r}");
    }
    println!(
        "Through the server-side proxy, api saw web's own address ({}): {}",
        v4(web)?,
        peer
    );
    Ok(())
}

/// 503 for 30% of the requests, on api's side.
fn http_abort_share(http: &mut Http) -> Result<()> {
    let id = http.fault(
        http.api,
        "ingress",
        json!({"type": "http-abort", "status": 503, "percent": 30}),
    )?;
    http.row(
        "api: abort 503 on 30% (server side)",
        "/home",
        "~30% 503",
        Some(&id),
    )?;
    Ok(http.agent.delete_fault(&id)?)
}

/// 503 for `/checkout*` only, on web's side.
fn http_abort_by_path(http: &mut Http) -> Result<()> {
    let id = http.fault(
        http.web,
        "egress",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/checkout*"}}),
    )?;
    for path in ["/checkout/42", "/home"] {
        let expected = if path == "/home" {
            "200 (other path)"
        } else {
            "100% 503"
        };
        http.row(
            "web: abort /checkout* (client side)",
            path,
            expected,
            Some(&id),
        )?;
    }
    Ok(http.agent.delete_fault(&id)?)
}

/// Every response of api held 100 ms; what api says web's address is,
/// seen through the server-side proxy.
fn http_response_delay(http: &mut Http) -> Result<String> {
    let id = http.fault(
        http.api,
        "ingress",
        json!({"type": "http-delay", "delay": "100ms", "phase": "response"}),
    )?;
    http.row(
        "api: response delay 100 ms",
        "/home",
        "200, +100 ms",
        Some(&id),
    )?;
    let peer = http_get(http.web, v4(http.api)?, 8080, "/whoami")?;
    http.agent.delete_fault(&id)?;
    Ok(peer.body)
}

// ---------------------------------------------------------------------------
// DNS: faults on web's own queries, answered on the wire in web's netns

/// DNS faults on web's queries to a real dnsmasq in api (zone
/// `example.test`), each seen by dig in web: what came back, and when.
fn dns_demo(agent: &Agent, web: &Pod, api: &Pod) -> Result<()> {
    let server = DnsServer::start(api).context("starting dnsmasq in pod api")?;
    let ip = server.ip();
    let dig = |name: &str| -> Result<String> {
        let r = Dig::new(ip, name, "A").time(2).run(web)?;
        let answer = match &r.status {
            None => "no answer (timed out)".to_string(),
            Some(status) => {
                let addrs: Vec<String> = r.addresses().iter().map(|a| a.to_string()).collect();
                let ttl = r
                    .answers
                    .first()
                    .map(|a| format!(" ttl {}", a.ttl))
                    .unwrap_or_default();
                format!("{status} {}{ttl}", addrs.join(" "))
            }
        };
        let time = r
            .query_time
            .map(|t| format!("{} ms", t.as_millis()))
            .unwrap_or_else(|| format!("{:.1} s", r.elapsed.as_secs_f64()));
        Ok(format!("{name:<20} {answer:<34} {time:>8}"))
    };
    let fault = |action: Value| -> Result<String> {
        Ok(
            agent.post_fault(&json!({"target": {"sandbox": web.container_id},
            "direction": "egress", "action": action, "duration": "60s"}))?,
        )
    };
    let mut rows: Vec<String> = Vec::new();
    let mut row = |scenario: &str, line: String, expected: &str, counters: String| {
        rows.push(format!("{scenario:<34} {line}  {expected:<26} {counters}"));
    };
    row(
        "no fault",
        dig("api.example.test")?,
        "NOERROR 198.18.100.10",
        String::new(),
    );
    for (scenario, action, expected) in [
        (
            "dns-error nxdomain, *.example.test",
            json!({"type": "dns-error", "dns": {"names": ["*.example.test"]}}),
            "NXDOMAIN",
        ),
        (
            "dns-spoof api.example.test",
            json!({"type": "dns-spoof", "addresses": ["198.18.0.99"], "dns": {"names": ["api.example.test"]}}),
            "NOERROR 198.18.0.99 ttl 0",
        ),
        (
            "dns-delay 300 ms",
            json!({"type": "dns-delay", "delay": "300ms"}),
            "real answer, +300 ms",
        ),
        (
            "dns-drop api.example.test",
            json!({"type": "dns-drop", "dns": {"names": ["api.example.test"]}}),
            "timeout",
        ),
    ] {
        let id = fault(action)?;
        row(
            scenario,
            dig("api.example.test")?,
            expected,
            counters(agent, &id),
        );
        agent.delete_fault(&id)?;
    }
    row(
        "after removal",
        dig("api.example.test")?,
        "NOERROR 198.18.100.10",
        String::new(),
    );
    println!();
    println!(
        "DNS faults on web's own queries (dig in web -> dnsmasq in api at {ip}; nothing in web changed):"
    );
    println!(
        "{:<34} {:<20} {:<34} {:>8}  {:<26} AGENT COUNTERS",
        "SCENARIO", "QUERY (A)", "ANSWER SEEN", "TIME", "EXPECTED"
    );
    for r in &rows {
        println!("{r}");
    }
    Ok(())
}
