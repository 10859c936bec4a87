//! The cluster suite's runner (`harness = false`): without a cluster it
//! prints one skip line and passes; with one (`scripts/e2e-kind.sh` sets
//! `NETFAULT_E2E_CLUSTER`) it installs netfault, runs the scenarios in
//! order (each in its own namespace, independent of the others; `uninstall`
//! last), prints the measured numbers, and fails if any scenario failed.
//!
//! Arguments: `--focus NAME` runs one scenario (exact name); a bare word
//! runs the scenarios whose names contain it (as cargo's test filter);
//! `--list` lists them; libtest's other flags are ignored.

mod annotate;
mod ctl_kube;
mod events;
mod networkfault;
mod rollout;
mod support;
mod uninstall;

use std::process::ExitCode;
use std::time::Instant;

use e2e_kind::target::Skip;
use e2e_kind::Cluster;
use support::Report;

type Scenario = fn(&Cluster, &mut Report) -> e2e_kind::Result<()>;

/// Every scenario, in running order (`uninstall` removes netfault: last).
const SCENARIOS: &[(&str, Scenario)] = &[
    ("annotate", annotate::run),
    ("events", events::run),
    ("networkfault-all", networkfault::all),
    ("networkfault-one", networkfault::one),
    ("networkfault-fixed", networkfault::fixed),
    ("networkfault-fixed-percent", networkfault::fixed_percent),
    ("ctl-kube", ctl_kube::run),
    ("rollout-restart", rollout::run),
    ("uninstall", uninstall::run),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut focus: Option<String> = None;
    let mut filter: Option<String> = None;
    let mut list = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--focus" => match it.next() {
                Some(f) => focus = Some(f.clone()),
                None => {
                    eprintln!("e2e/kind: --focus needs a scenario name");
                    return ExitCode::from(2);
                }
            },
            "--list" => list = true,
            s if s.starts_with("--focus=") => focus = Some(s["--focus=".len()..].to_string()),
            // libtest's flags (--nocapture, --test-threads=N, --exact, ...).
            s if s.starts_with('-') => {}
            s => filter = Some(s.to_string()),
        }
    }
    if list {
        for (name, _) in SCENARIOS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(f) = &focus {
        if !SCENARIOS.iter().any(|(n, _)| n == f) {
            let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
            eprintln!(
                "e2e/kind: --focus {f}: no such scenario (one of: {})",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let target = match e2e_kind::target() {
        Ok(t) => t,
        Err(Skip::NotConfigured(why)) => {
            println!("e2e/kind: skipped: {why}");
            return ExitCode::SUCCESS;
        }
        Err(Skip::Invalid(why)) => {
            eprintln!("e2e/kind: error: {why}");
            return ExitCode::from(2);
        }
    };
    let chosen: Vec<&(&str, Scenario)> = SCENARIOS
        .iter()
        .filter(|(n, _)| match (&focus, &filter) {
            (Some(f), _) => n == f,
            (None, Some(f)) => n.contains(f.as_str()),
            (None, None) => true,
        })
        .collect();
    if chosen.is_empty() {
        println!("e2e/kind: no scenario matches {filter:?}");
        return ExitCode::SUCCESS;
    }

    let t0 = Instant::now();
    let cluster = match Cluster::connect(target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("e2e/kind: error: connecting to the cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "e2e/kind: cluster {:?}: nodes {:?}, workload nodes {:?}; kustomization {}",
        cluster.target.kind,
        cluster.nodes,
        cluster.workers,
        cluster.target.kustomize_dir.display()
    );
    let mut report = Report::default();
    match cluster.install() {
        Ok(d) => report.number("install", "apply -k to DaemonSet ready on every node", d),
        Err(e) => {
            eprintln!("e2e/kind: error: installing netfault: {e}");
            eprintln!("{}", cluster.agent_logs());
            return ExitCode::FAILURE;
        }
    }

    let mut failed = vec![];
    let ran = chosen.len();
    for (name, scenario) in chosen {
        println!("e2e/kind: {name} ...");
        let started = Instant::now();
        report.scenario = name.to_string();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            scenario(&cluster, &mut report)
        }));
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => println!("e2e/kind: {name} ok ({secs:.1} s)"),
            Ok(Err(e)) => {
                println!("e2e/kind: {name} FAILED ({secs:.1} s): {e}");
                failed.push(*name);
            }
            Err(_) => {
                println!("e2e/kind: {name} FAILED ({secs:.1} s): panicked (message above)");
                failed.push(*name);
            }
        }
        if failed.last() == Some(name) && *name != "uninstall" {
            println!(
                "e2e/kind: agent logs after {name}:\n{}",
                cluster.agent_logs()
            );
        }
    }

    report.print();
    println!(
        "e2e/kind: {} scenario(s), {} failed{} in {:.0} s",
        ran,
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", failed.join(", "))
        },
        t0.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
