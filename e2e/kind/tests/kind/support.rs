//! What the scenarios share: the numbers report, polling, and the usual
//! workload (servers on every workload node and a client).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e_kind::{Cluster, Error, PodInfo, Result, TestNs};

/// The numbers measured, printed at the end, one line each.
#[derive(Default)]
pub struct Report {
    /// The scenario running now (the lines' prefix).
    pub scenario: String,
    lines: Vec<String>,
}

impl Report {
    /// A duration.
    pub fn number(&mut self, what: &str, meaning: &str, d: Duration) {
        self.note(what, &format!("{meaning}: {:.0} ms", d.as_secs_f64() * 1e3));
    }

    /// Any measured fact.
    pub fn note(&mut self, what: &str, text: &str) {
        let line = if self.scenario.is_empty() {
            format!("{what}: {text}")
        } else {
            format!("{} {what}: {text}", self.scenario)
        };
        println!("e2e/kind:   {line}");
        self.lines.push(line);
    }

    /// Prints every line again, as the summary.
    pub fn print(&self) {
        println!("e2e/kind: measured:");
        for l in &self.lines {
            println!("e2e/kind:   {l}");
        }
    }
}

/// Polls `f` every 500 ms until it says yes; how long that took, or an
/// error naming `what` with the last state `f` described.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<std::result::Result<(), String>>,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let last = match f()? {
            Ok(()) => return Ok(t0.elapsed()),
            Err(last) => last,
        };
        if t0.elapsed() > timeout {
            return Err(Error::Other(format!(
                "{what}: not after {timeout:?}; last: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The usual workload: `servers` HTTP servers spread over the workload
/// nodes in turn (`s0` on the first, `s1` on the second, ...), each with
/// `labels`, and a client `client` on the first node; all running.
pub struct Workload {
    pub pods: BTreeMap<String, PodInfo>,
    pub servers: Vec<String>,
}

impl Workload {
    pub fn start(ns: &TestNs, servers: usize, labels: &[(&str, &str)]) -> Result<Workload> {
        let c: &Cluster = ns.c;
        let names: Vec<String> = (0..servers).map(|i| format!("s{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            ns.server(n, &c.workers[i % c.workers.len()], labels)?;
        }
        ns.client("client", &c.workers[0])?;
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("client");
        let pods = ns.wait_running(&all)?;
        Ok(Workload {
            pods,
            servers: names,
        })
    }

    pub fn ip(&self, pod: &str) -> &str {
        self.pods
            .get(pod)
            .map(|p| p.ip.as_str())
            .unwrap_or_default()
    }

    /// `(name, ip)` of the servers.
    pub fn targets(&self) -> Vec<(&str, &str)> {
        self.servers
            .iter()
            .map(|s| (s.as_str(), self.ip(s)))
            .collect()
    }
}

/// The p-quantile of durations, in ms.
pub fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    testbed::quantile(&ms, q).unwrap_or(f64::NAN)
}
