//! DNS fault benchmark: what a DNS fault costs the queries it does not pick,
//! how fast netfault answers the ones it does, and what query rate passes
//! without loss. Side by side in one run, with the order of the
//! configurations rotated every round; it prints numbers, it does not pass
//! or fail.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench dns
//! ```
//!
//! A real dnsmasq serves the test zone in pod `dns`; pod `client` sends
//! ready-made UDP queries for `web.example.test` A from one socket and times
//! each answer by the kernel's receive stamp. Configurations:
//! - `no fault`: the client's queries go straight to dnsmasq;
//! - `fault, other name`: a `dns-error` fault on the client for
//!   `nomatch.example.test`: every query is diverted to the DNS queue, parsed
//!   and passed on untouched (the cost the issue bounds at 50 µs p50);
//! - `fault, this name`: a `dns-error` for `web.example.test`: netfault
//!   answers NXDOMAIN itself, the server never sees the query.
//!
//! Sections: 1. latency at 2k queries/s (p50, p99, added over `no fault`);
//! 2. the highest rate (of 2k to 40k queries/s, 0.5 s each) with no query
//! lost. dnsmasq answers on one thread and logs every query, so `no fault`
//! is the server's limit, not netfault's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;
use testbed::dnsserver::{udp_queries, DnsServer};
use testbed::{quantile, AgentNode, NodeOptions, Pod};

const ROUNDS: usize = 3;
/// Queries per latency measurement, one every `LATENCY_GAP`.
const LATENCY_QUERIES: usize = 2000;
const LATENCY_GAP: Duration = Duration::from_micros(500);
const RATES: [u32; 5] = [2_000, 5_000, 10_000, 20_000, 40_000];
const RATE_WINDOW: Duration = Duration::from_millis(500);

fn main() {
    testbed::bench_main("dns", run);
}

#[derive(Clone, Copy, PartialEq)]
enum Config {
    NoFault,
    OtherName,
    ThisName,
}

impl Config {
    const ALL: [Config; 3] = [Config::NoFault, Config::OtherName, Config::ThisName];

    fn label(self) -> &'static str {
        match self {
            Config::NoFault => "no fault",
            Config::OtherName => "fault, other name (passed)",
            Config::ThisName => "fault, this name (answered)",
        }
    }

    /// The fault's name pattern, if the configuration has a fault.
    fn names(self) -> Option<&'static str> {
        match self {
            Config::NoFault => None,
            Config::OtherName => Some("nomatch.example.test"),
            Config::ThisName => Some("web.example.test"),
        }
    }
}

/// A standard query for `web.example.test` A with id `id`, RD set.
fn query(id: u16) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii("web.example.test.")?,
            RecordType::A,
        ));
    Ok(m.to_vec()?)
}

fn queries(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..n).map(|i| query(i as u16)).collect()
}

struct Bed {
    bed: AgentNode,
    client: Pod,
    server: SocketAddr,
    _dns: DnsServer,
    _dns_pod: Pod,
}

impl Bed {
    /// Runs `f` with `config`'s fault on the client (removed afterwards).
    fn with<T>(&self, config: Config, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let id = match config.names() {
            None => None,
            Some(name) => Some(self.bed.agent.post_fault(&json!({
                "target": {"sandbox": self.client.container_id},
                "direction": "egress",
                "action": {"type": "dns-error", "dns": {"names": [name]}},
                "duration": "10m"
            }))?),
        };
        let r = f();
        if let Some(id) = id {
            self.bed.agent.delete_fault(&id)?;
        }
        r
    }

    /// RTTs (µs) of `qs` sent one every `gap`, and how many got no answer.
    fn send(&self, qs: &[Vec<u8>], gap: Duration) -> anyhow::Result<(Vec<f64>, usize)> {
        let ex = udp_queries(
            &self.client,
            self.server,
            qs,
            gap,
            Duration::from_millis(300),
        )?;
        let rtts: Vec<f64> = ex
            .iter()
            .filter_map(|e| e.rtt)
            .map(|d| d.as_secs_f64() * 1e6)
            .collect();
        Ok((rtts.clone(), ex.len() - rtts.len()))
    }
}

fn run() -> anyhow::Result<()> {
    let bed = AgentNode::start("netfault-bench-dns", NodeOptions::default())?;
    let client = bed.add_pod("client")?;
    let dns_pod = bed.add_pod("dns")?;
    let dns = DnsServer::start(&dns_pod)?;
    let ip: IpAddr = dns.v4().ok_or_else(|| anyhow::anyhow!("no IPv4 server"))?;
    let b = Bed {
        bed,
        client,
        server: SocketAddr::new(ip, 53),
        _dns: dns,
        _dns_pod: dns_pod,
    };
    // Warm-up: the first fault on a pod starts its holder.
    b.with(Config::OtherName, || b.send(&queries(200)?, LATENCY_GAP))?;

    println!("1. latency, {LATENCY_QUERIES} queries at {:.0} queries/s, {ROUNDS} rounds (configuration order rotated each round)", 1.0 / LATENCY_GAP.as_secs_f64());
    let qs = queries(LATENCY_QUERIES)?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    let mut lost = [0usize; 3];
    for round in 0..ROUNDS {
        for k in 0..Config::ALL.len() {
            let i = (k + round) % Config::ALL.len();
            let (rtts, l) = b.with(Config::ALL[i], || b.send(&qs, LATENCY_GAP))?;
            samples[i].extend(rtts);
            lost[i] += l;
        }
    }
    let p = |i: usize, q: f64| quantile(&samples[i], q).unwrap_or(f64::NAN);
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>14} {:>14}",
        "configuration", "p50 µs", "p99 µs", "lost", "added p50 µs", "added p99 µs"
    );
    for (i, c) in Config::ALL.iter().enumerate() {
        println!(
            "{:<30} {:>10.1} {:>10.1} {:>8} {:>14.1} {:>14.1}",
            c.label(),
            p(i, 0.5),
            p(i, 0.99),
            lost[i],
            p(i, 0.5) - p(0, 0.5),
            p(i, 0.99) - p(0, 0.99)
        );
    }
    println!(
        "   goal: a fault that does not pick a query adds <= 50 µs at p50: added {:.1} µs; netfault's own answer vs the real server's: {:.2}x the time (p50)",
        p(1, 0.5) - p(0, 0.5),
        p(2, 0.5) / p(0, 0.5)
    );

    println!("\n2. highest rate with no query lost ({:.1} s per rate, rates {RATES:?} queries/s, configuration order rotated per rate)", RATE_WINDOW.as_secs_f64());
    println!(
        "{:<30} {:>22} {:>30}",
        "configuration", "no loss up to (q/s)", "first lossy rate (lost/sent)"
    );
    let mut best = [0u32; 3];
    let mut first_loss: [Option<(u32, usize, usize)>; 3] = [None; 3];
    for (r, rate) in RATES.iter().enumerate() {
        let n = (*rate as f64 * RATE_WINDOW.as_secs_f64()) as usize;
        let qs = queries(n)?;
        let gap = Duration::from_secs_f64(1.0 / *rate as f64);
        for k in 0..Config::ALL.len() {
            let i = (k + r) % Config::ALL.len();
            if first_loss[i].is_some() {
                continue;
            }
            let (_, l) = b.with(Config::ALL[i], || b.send(&qs, gap))?;
            if l == 0 {
                best[i] = *rate;
            } else {
                first_loss[i] = Some((*rate, l, n));
            }
        }
    }
    for (i, c) in Config::ALL.iter().enumerate() {
        let fl = first_loss[i]
            .map(|(r, l, n)| format!("{r} ({l}/{n})"))
            .unwrap_or_else(|| "none".into());
        println!("{:<30} {:>22} {:>30}", c.label(), best[i], fl);
    }
    Ok(())
}
