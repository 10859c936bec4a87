//! Transparent-proxy benchmark: what netfault's L7 proxy costs on a diverted
//! port when no rule matches, next to the same traffic sent direct and
//! through haproxy (a well-tuned reverse proxy, Debian package) on the same
//! path.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench proxy
//! ```
//!
//! Two pods wired by the CNI chain; an HTTP/1.1 keep-alive server (hyper) in
//! the server pod; a closed-loop load generator in the client pod (N
//! keep-alive connections, each sending its next request when the previous
//! answer is read). Configurations, measured in rounds whose order rotates
//! (each configuration runs first in turn):
//! - `direct`: client -> server:8080, no fault;
//! - `netfault`: the same, with an `http-abort` fault on the server's port
//!   8080 whose `http.path` never matches: every connection is diverted to
//!   the agent's proxy, parsed, and relayed;
//! - `haproxy`: client -> haproxy:8081 in the server pod -> 127.0.0.1:8080.
//!
//! Every round reads the proxy's open-connection gauge halfway through: all
//! N connections for `netfault` (they really were diverted), none for the
//! others; a wrong count ends the bench with "NOT VERIFIED" and exit 1, as
//! does a memory measurement where not all 1,000 connections answered their
//! warm-up request or the gauge does not read 1,000.
//!
//! `NETFAULT_PROXY_ROUNDS` (default 5) rounds per concurrency,
//! `NETFAULT_PROXY_SECS` (default 3) seconds per configuration per round.
//!
//! Prints req/s, latency p50 and p99 (max under 100 samples in a round) per concurrency
//! (1 and 64) as the median of rounds with their spread, the per-round
//! (paired) ratios against direct and haproxy as medians with spread, and
//! the agent's memory per open proxied connection. It does not pass or fail
//! on performance.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use serde_json::json;
use testbed::env_or as env;
use testbed::{in_netns, AgentNode, NodeOptions, Pod};

const SERVER_PORT: u16 = 8080;
const HAPROXY_PORT: u16 = 8081;
/// Rounds per concurrency (`NETFAULT_PROXY_ROUNDS`, default 5) and the
/// length of one configuration's run in a round (`NETFAULT_PROXY_SECS`,
/// default 3).
const DEFAULT_ROUNDS: usize = 5;
const DEFAULT_SECS: f64 = 3.0;

fn main() {
    testbed::bench_main("proxy", run);
}

/// Rounds and the length of a run, from the environment.
#[derive(Clone, Copy)]
struct Plan {
    rounds: usize,
    round: Duration,
}

/// A tokio listener bound inside `pod`'s netns (a socket keeps its netns).
fn listen_in(pod: &Pod, port: u16) -> anyhow::Result<std::net::TcpListener> {
    let l = in_netns(pod.netns.path(), move || {
        std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
    })??;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A connected stream from inside `pod`'s netns.
fn connect_from(pod: &Pod, to: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
    let s = in_netns(pod.netns.path(), move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })??;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

async fn serve(listener: std::net::TcpListener) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                    b"hello from the server pod\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct Load {
    requests: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

/// `conns` keep-alive connections from `client` to `to`, closed loop, for `dur`.
async fn load(client: &Pod, to: SocketAddr, conns: usize, dur: Duration) -> anyhow::Result<Load> {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..conns {
        let std = connect_from(client, to)?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let stream = match tokio::net::TcpStream::from_std(std) {
                Ok(s) => s,
                Err(_) => return (lat, 1),
            };
            let (mut tx, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            {
                Ok(p) => p,
                Err(_) => return (lat, 1),
            };
            tokio::spawn(conn);
            while start.elapsed() < dur {
                let req = hyper::Request::get("/bench")
                    .header("host", "server")
                    .body(Empty::<Bytes>::new());
                let Ok(req) = req else { break };
                let t = Instant::now();
                match tx.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        if resp.into_body().collect().await.is_err() {
                            errors += 1;
                            break;
                        }
                        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok(Load {
        requests: all.len() as u64,
        errors,
        secs,
        latencies_us: all,
    })
}

/// The `q` quantile of `samples`; NaN when there are none.
fn pct(samples: &[u32], q: f64) -> f64 {
    testbed::quantile(samples, q).map_or(f64::NAN, f64::from)
}

/// [`load`], checking the proxy's open-connection gauge halfway through
/// the round: `proxied` connections (all of them for the `netfault`
/// configuration, none otherwise), or the round is not what it claims.
fn measured(
    agent: &testbed::Agent,
    rt: &tokio::runtime::Runtime,
    plan: Plan,
    client: &Pod,
    to: SocketAddr,
    conns: usize,
    proxied: usize,
) -> anyhow::Result<Load> {
    std::thread::scope(|s| {
        let gauge = s.spawn(|| {
            std::thread::sleep(plan.round / 2);
            agent.metric("netfault_proxy_open_connections")
        });
        let r = rt.block_on(load(client, to, conns, plan.round))?;
        let seen = gauge
            .join()
            .map_err(|_| anyhow::anyhow!("gauge thread panicked"))?;
        testbed::verify(seen == Some(proxied as f64), || {
            format!(
                "{conns} connections to {to}: the proxy's open-connection gauge read {seen:?} halfway through the round, expected {proxied}"
            )
        })?;
        Ok(r)
    })
}

/// Requests per second of a round.
fn rate(l: &Load) -> f64 {
    l.requests as f64 / l.secs
}

/// The tail of `samples` ([`testbed::tail`]: "p99" over at least 100
/// samples, else "max").
fn tail(samples: &[u32]) -> (&'static str, f64) {
    let v: Vec<f64> = samples.iter().copied().map(f64::from).collect();
    let t = testbed::tail(&v);
    (t.label, t.value)
}

/// The median of `v`, and its spread as "[min..max]".
fn median_spread(v: &[f64], decimals: usize) -> String {
    testbed::Spread::of(v).range(decimals)
}

/// Prints each configuration's median round (req/s, p50 and tail latency
/// with their spread over rounds), then each configuration against
/// `direct` and `haproxy` as medians of the per-round (paired) ratios and
/// differences.
fn report(conns: usize, rounds: usize, results: &BTreeMap<&str, Vec<Load>>) {
    println!(
        "   {:<9} {:>24} {:>22} {:>26} {:>7}   (median [min..max] of {rounds} rounds)",
        "config", "req/s", "p50 µs", "tail µs", "errors"
    );
    for (name, runs) in results {
        let rates: Vec<f64> = runs.iter().map(rate).collect();
        let p50s: Vec<f64> = runs.iter().map(|r| pct(&r.latencies_us, 0.5)).collect();
        let tails: Vec<(&str, f64)> = runs.iter().map(|r| tail(&r.latencies_us)).collect();
        let label = if tails.iter().all(|(l, _)| *l == "p99") {
            "p99"
        } else {
            "max"
        };
        let tail_v: Vec<f64> = tails.iter().map(|(_, v)| *v).collect();
        let samples: usize = runs.iter().map(|r| r.latencies_us.len()).sum();
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        println!(
            "   {name:<9} {:>24} {:>22} {label} {:>22} {errors:>7}   ({samples} requests)",
            median_spread(&rates, 0),
            median_spread(&p50s, 0),
            median_spread(&tail_v, 0),
        );
    }
    let Some(n) = results.get("netfault") else {
        return;
    };
    for (other, goal) in [
        ("direct", "goal >= 70% of req/s, p99 <= +300 µs"),
        ("haproxy", "goal >= 100% of req/s"),
    ] {
        let Some(o) = results.get(other) else {
            continue;
        };
        let pairs: Vec<(&Load, &Load)> = n.iter().zip(o).collect();
        let ratio: Vec<f64> = pairs
            .iter()
            .map(|(n, o)| 100.0 * rate(n) / rate(o))
            .collect();
        let d50: Vec<f64> = pairs
            .iter()
            .map(|(n, o)| pct(&n.latencies_us, 0.5) - pct(&o.latencies_us, 0.5))
            .collect();
        type Tails<'a> = Vec<((&'a str, f64), (&'a str, f64))>;
        let tails: Tails = pairs
            .iter()
            .map(|(n, o)| (tail(&n.latencies_us), tail(&o.latencies_us)))
            .collect();
        let label = if tails
            .iter()
            .all(|((a, _), (b, _))| *a == "p99" && *b == "p99")
        {
            "p99"
        } else {
            "max"
        };
        let dtail: Vec<f64> = tails.iter().map(|((_, a), (_, b))| a - b).collect();
        println!(
            "   netfault vs {other} (paired rounds, c={conns}): req/s {}%, p50 {} µs, {label} {} µs ({goal})",
            median_spread(&ratio, 1),
            median_spread(&d50, 0),
            median_spread(&dtail, 0)
        );
    }
}

fn start_haproxy(server: &Pod, dir: &Path) -> anyhow::Result<Child> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4000\n  nbthread 2\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  option http-no-delay\nfrontend f\n  bind 0.0.0.0:{HAPROXY_PORT}\n  default_backend b\nbackend b\n  server s 127.0.0.1:{SERVER_PORT}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?);
    let mut child = testbed::spawn_in_netns(server.netns.path(), &mut cmd, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = child.try_wait()? {
        let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
        anyhow::bail!("haproxy exited ({status}): {}", log.trim());
    }
    Ok(child)
}

fn run() -> anyhow::Result<()> {
    let bed = AgentNode::start("nf-proxy-bench", NodeOptions::default())?;
    let (agent, dir) = (&bed.agent, &bed.dir);
    let client = bed.add_pod("client")?;
    let server = bed.add_pod("server")?;
    let server_ip = server
        .ipv4()
        .ok_or_else(|| anyhow::anyhow!("server pod has no IPv4 address"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = listen_in(&server, SERVER_PORT)?;
    rt.spawn(async move {
        if let Err(e) = serve(listener).await {
            eprintln!("server: {e}");
        }
    });
    let plan = Plan {
        rounds: env("NETFAULT_PROXY_ROUNDS", DEFAULT_ROUNDS).max(1),
        round: Duration::from_secs_f64(env("NETFAULT_PROXY_SECS", DEFAULT_SECS).max(0.2)),
    };
    let haproxy = match start_haproxy(&server, dir.path()) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("haproxy unavailable: {e}");
            None
        }
    };
    struct HaproxyGuard(Option<Child>);
    impl Drop for HaproxyGuard {
        fn drop(&mut self) {
            if let Some(c) = &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let _hg = HaproxyGuard(haproxy);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "netfault proxy bench (kernel {}, {} CPUs); closed loop, keep-alive, {} rounds of {:?} per configuration, in rotating order; every round checks the proxy's open-connection gauge (all connections proxied for netfault, none otherwise)",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        plan.rounds,
        plan.round
    );
    let direct = SocketAddr::new(server_ip, SERVER_PORT);
    let via_haproxy = SocketAddr::new(server_ip, HAPROXY_PORT);
    let fault_body = json!({
        "target": {"sandbox": server.container_id},
        "direction": "ingress",
        "match": {"ports": SERVER_PORT.to_string()},
        "action": {"type": "http-abort", "status": 503, "http": {"path": "/never-matches"}},
        "duration": "30m"
    });
    const CONFIGS: [&str; 3] = ["direct", "netfault", "haproxy"];
    for conns in [1usize, 64] {
        println!("\n== concurrency {conns}");
        // Per configuration, one Load per round (None: not run that round).
        let mut results: BTreeMap<&str, Vec<Load>> = BTreeMap::new();
        for round in 0..plan.rounds {
            // Rotate the order each round so no configuration always runs
            // first (or right after the fault's install).
            for k in testbed::rotation(round, CONFIGS.len()) {
                let name = CONFIGS[k];
                let r = match name {
                    "direct" => measured(agent, &rt, plan, &client, direct, conns, 0)
                        .context("direct load")?,
                    "haproxy" if _hg.0.is_some() => {
                        measured(agent, &rt, plan, &client, via_haproxy, conns, 0)
                            .context("load through haproxy")?
                    }
                    "haproxy" => continue,
                    _ => match agent.post_fault(&fault_body) {
                        Ok(id) => {
                            let r = measured(agent, &rt, plan, &client, direct, conns, conns);
                            agent.delete_fault(&id)?;
                            r.context("load through netfault")?
                        }
                        Err(e) => {
                            println!("   netfault proxy fault refused: {e}");
                            continue;
                        }
                    },
                };
                results.entry(name).or_default().push(r);
            }
        }
        report(conns, plan.rounds, &results);
    }

    // Memory per open proxied connection.
    println!("\n== memory per open proxied connection");
    let id = match agent.post_fault(&fault_body) {
        Ok(id) => id,
        Err(e) => {
            println!("   skipped: the proxy fault was refused: {e}");
            return Ok(());
        }
    };
    let before = testbed::rss_kib(agent.pid());
    let n = 1000usize;
    // Only connections whose warm-up request was answered are kept; a
    // failed one is closed and replaced (at most 100 times).
    let (kept, failures) = rt.block_on(async {
        let mut kept = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        while kept.len() < n && failures.len() <= 100 {
            let std = match connect_from(&client, direct) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("connect: {e}"));
                    continue;
                }
            };
            let stream = match tokio::net::TcpStream::from_std(std) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("tokio stream: {e}"));
                    continue;
                }
            };
            let (mut tx, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("handshake: {e}"));
                    continue;
                }
            };
            tokio::spawn(conn);
            let Ok(req) = hyper::Request::get("/warm").body(Empty::<Bytes>::new()) else {
                failures.push("building the request".into());
                continue;
            };
            match tx.send_request(req).await {
                Ok(resp) if resp.status() == 200 => match resp.into_body().collect().await {
                    Ok(_) => kept.push(tx),
                    Err(e) => failures.push(format!("body: {e}")),
                },
                Ok(resp) => failures.push(format!("status {}", resp.status())),
                Err(e) => failures.push(format!("request: {e}")),
            }
        }
        (kept, failures)
    });
    let answered = kept.len();
    // Let the replaced connections close on the proxy's side too.
    std::thread::sleep(Duration::from_millis(300));
    let after = testbed::rss_kib(agent.pid());
    let gauge = agent
        .metric("netfault_proxy_open_connections")
        .unwrap_or(0.0);
    testbed::verify(answered == n && gauge == n as f64, || {
        format!(
            "{answered} of {n} connections answered their warm-up request and were kept open ({} failed: {:?}), and the proxy's open-connection gauge reads {gauge}: expected {n} of both",
            failures.len(),
            failures.iter().take(3).collect::<Vec<_>>()
        )
    })?;
    println!(
        "   {} idle keep-alive connections through the proxy, each answered its warm-up request ({} failed and were replaced; the open-connection gauge reads {gauge}): agent RSS {} -> {} KiB, {:.1} KiB per connection",
        kept.len(),
        failures.len(),
        before,
        after,
        (after.saturating_sub(before)) as f64 / kept.len().max(1) as f64
    );
    drop(kept);
    let _ = agent.delete_fault(&id);
    Ok(())
}
