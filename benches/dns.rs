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
//! Sections: 1. latency at 2k queries/s (p50, p99 over all rounds, and the
//! added p50 and the p50 ratio against `no fault` as the median [min..max] of
//! the per-round, paired values: each round runs the three configurations
//! back to back); 2. the highest rate (of 2k to 40k queries/s, 0.5 s each)
//! with no query lost. dnsmasq answers on one thread and logs every query, so
//! `no fault` is the server's limit, not netfault's.
//!
//! Verified on every run of a faulted configuration, before its fault is
//! deleted (else the bench prints "NOT VERIFIED" and exits 1): `this name`:
//! the fault's `affected` counter grew by at least every query answered;
//! `other name`: its counters stayed at 0 during the run (nothing picked),
//! then 5 probe queries for `nomatch.example.test` from the same pod must
//! be picked and answered (`affected` +5), so the DNS queue was diverting
//! the pod's queries while the run's went by untouched.
//!
//! `NETFAULT_DNS_ROUNDS` (default 3) rounds and `NETFAULT_DNS_QUERIES`
//! (default 2000) queries per latency run.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;
use testbed::dnsserver::{udp_queries, DnsServer};
use testbed::env_or as env;
use testbed::{quantile, AgentNode, NodeOptions, Pod};

/// Rounds of section 1 (`NETFAULT_DNS_ROUNDS`).
const ROUNDS: usize = 3;
/// Queries per latency measurement (`NETFAULT_DNS_QUERIES`), one every `LATENCY_GAP`.
const LATENCY_QUERIES: usize = 2000;
/// Probe queries for the `other name` fault's name, after each of its runs.
const PROBES: usize = 5;
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
    query_for("web.example.test.", id)
}

/// A standard query for `name` A with id `id`, RD set.
fn query_for(name: &str, id: u16) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
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
    /// Sends `qs` one every `gap` with `config`'s fault on the client
    /// (removed afterwards), and verifies that the fault saw them as the
    /// configuration says (see the top of the file).
    fn with(
        &self,
        config: Config,
        qs: &[Vec<u8>],
        gap: Duration,
    ) -> anyhow::Result<(Vec<f64>, usize)> {
        let Some(name) = config.names() else {
            return self.send(qs, gap);
        };
        let agent = &self.bed.agent;
        let id = agent.post_fault(&json!({
            "target": {"sandbox": self.client.container_id},
            "direction": "egress",
            "action": {"type": "dns-error", "dns": {"names": [name]}},
            "duration": "10m"
        }))?;
        let r = self.send(qs, gap).and_then(|(rtts, lost)| {
            self.verify(config, &id, rtts.len())?;
            Ok((rtts, lost))
        });
        agent.delete_fault(&id)?;
        r
    }

    /// The fault's `matched` and `affected` counters.
    fn counters(&self, id: &str) -> anyhow::Result<(u64, u64)> {
        let f = self.bed.agent.get_fault(id)?;
        let c = &f["counters"];
        match (c["matched"].as_u64(), c["affected"].as_u64()) {
            (Some(m), Some(a)) => Ok((m, a)),
            _ => Err(anyhow::anyhow!(
                "fault {id} has no matched/affected counters: {f}"
            )),
        }
    }

    fn verify(&self, config: Config, id: &str, answered: usize) -> anyhow::Result<()> {
        let (matched, affected) = self.counters(id)?;
        let label = config.label();
        if config == Config::ThisName {
            testbed::verify(affected >= answered as u64, || {
                format!("{label}: {answered} queries answered but the fault's affected counter is {affected}: not all went through netfault")
            })?;
            return Ok(());
        }
        testbed::verify(matched == 0 && affected == 0, || {
            format!("{label}: the fault picked {matched} queries of the run, expected none")
        })?;
        let probes = (0..PROBES)
            .map(|i| query_for("nomatch.example.test.", 60_000 + i as u16))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (answers, _) = self.send(&probes, Duration::from_millis(1))?;
        let (_, after) = self.counters(id)?;
        testbed::verify(after >= PROBES as u64 && answers.len() == PROBES, || {
            format!("{label}: of {PROBES} probe queries for the fault's own name, {} were answered and the fault's affected counter reads {after}: the DNS queue was not diverting this pod's queries", answers.len())
        })?;
        Ok(())
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
    b.with(Config::OtherName, &queries(200)?, LATENCY_GAP)?;

    let rounds = env("NETFAULT_DNS_ROUNDS", ROUNDS).max(1);
    let n_queries = env("NETFAULT_DNS_QUERIES", LATENCY_QUERIES).clamp(1, 50_000);
    println!("1. latency, {n_queries} queries at {:.0} queries/s, {rounds} rounds (configuration order rotated each round; every faulted run verified)", 1.0 / LATENCY_GAP.as_secs_f64());
    let qs = queries(n_queries)?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    // Per configuration, the p50 of each round (paired across configurations).
    let mut round_p50: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    let mut lost = [0usize; 3];
    for round in 0..rounds {
        for i in testbed::rotation(round, Config::ALL.len()) {
            let (rtts, l) = b.with(Config::ALL[i], &qs, LATENCY_GAP)?;
            round_p50[i].push(quantile(&rtts, 0.5).unwrap_or(f64::NAN));
            samples[i].extend(rtts);
            lost[i] += l;
        }
    }
    let p = |i: usize, q: f64| quantile(&samples[i], q).unwrap_or(f64::NAN);
    let tail_label = testbed::tail_label(samples.iter().map(Vec::as_slice));
    let t = |i: usize| testbed::tail(&samples[i]).value;
    println!(
        "{:<30} {:>10} {:>10} {:>8} {:>14} {:>14}   paired rounds: added p50 µs, p50 ratio, median [min..max]",
        "configuration",
        "p50 µs",
        format!("{tail_label} µs"),
        "lost",
        "added p50 µs",
        format!("added {tail_label} µs"),
    );
    for (i, c) in Config::ALL.iter().enumerate() {
        let paired = if i == 0 {
            String::new()
        } else {
            format!(
                "   {}, {}x",
                testbed::Spread::of(&testbed::paired_diffs(&round_p50[i], &round_p50[0])).range(1),
                testbed::Spread::of(&testbed::paired_ratios(&round_p50[i], &round_p50[0])).range(2)
            )
        };
        println!(
            "{:<30} {:>10.1} {:>10.1} {:>8} {:>14.1} {:>14.1}{paired}",
            c.label(),
            p(i, 0.5),
            t(i),
            lost[i],
            p(i, 0.5) - p(0, 0.5),
            t(i) - t(0)
        );
    }
    let added = testbed::Spread::of(&testbed::paired_diffs(&round_p50[1], &round_p50[0]));
    let own = testbed::Spread::of(&testbed::paired_ratios(&round_p50[2], &round_p50[0]));
    println!(
        "   goal: a fault that does not pick a query adds <= 50 µs at p50: added {} µs; netfault's own answer vs the real server's: {}x the time (p50); median [min..max] of {} paired rounds",
        added.range(1),
        own.range(2),
        added.n
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
        for i in testbed::rotation(r, Config::ALL.len()) {
            if first_loss[i].is_some() {
                continue;
            }
            let (_, l) = b.with(Config::ALL[i], &qs, gap)?;
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
