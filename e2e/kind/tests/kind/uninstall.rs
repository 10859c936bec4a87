//! `uninstall`: `kubectl delete -k` of the kustomization, with one fault
//! removed beforehand and one still active. Then, on every node (Kind:
//! `docker exec`; k3s: this host; an existing cluster: not inspectable,
//! said so): no conflist chains `netfault`, the plugin binary is gone
//! (install-cni's SIGTERM promise), no `netfault*` nft table and no tc
//! filter with netfault's handle (0x4e46) in any pod netns, no bpffs pin
//! named netfault. The same checks run first while netfault is installed
//! (they must see the entry, the binary, the active fault's filter and a
//! delay fault's nft table), so they can fail. Where the node has no `nft`
//! (kind's node image may not), the nft checks are skipped and said so.
//!
//! On the wire: the fault left active ends at the uninstall, well before its
//! deadline (the agents see their DaemonSet deleted and release every
//! sandbox on SIGTERM: docs/design.md, "Uninstall"), and nothing of
//! netfault is left in any pod netns; a pod created after the uninstall
//! starts and answers.

use std::time::{Duration, Instant};

use e2e_kind::inspect::node_state;
use e2e_kind::probe::reach;
use e2e_kind::workload::blackhole_annotation;
use e2e_kind::{ensure, Cluster, Result, TestNs};

use crate::support::{wait_until, Report, Workload};

/// The fault left active across the uninstall.
const ACTIVE: Duration = Duration::from_secs(600);

pub fn run(c: &Cluster, r: &mut Report) -> Result<()> {
    let ns = TestNs::create(c, "uninstall")?;
    let w = Workload::start(&ns, 2, &[])?;
    let answers = |pod: &str, want: bool| -> Result<std::result::Result<(), String>> {
        let got = reach(&ns, "client", &[(pod, w.ip(pod))], 2)?;
        let ok = if want {
            got[pod].passes()
        } else {
            got[pod].blocked()
        };
        Ok(if ok { Ok(()) } else { Err(format!("{got:?}")) })
    };

    // A fault added and removed: its pod must end up clean.
    ns.annotate(
        "s0",
        &[("netfault.io/faults", Some(&blackhole_annotation("5m")))],
    )?;
    wait_until("s0's fault acts", Duration::from_secs(30), || {
        answers("s0", false)
    })?;
    ns.annotate("s0", &[("netfault.io/faults", None)])?;
    wait_until("s0's fault is removed", Duration::from_secs(30), || {
        answers("s0", true)
    })?;
    // A fault still active when netfault goes.
    let t_ann = Instant::now();
    let value = blackhole_annotation(&format!("{}s", ACTIVE.as_secs()));
    ns.annotate("s1", &[("netfault.io/faults", Some(&value))])?;
    wait_until("s1's fault acts", Duration::from_secs(30), || {
        answers("s1", false)
    })?;
    let s1_ip = w.ip("s1").to_string();

    // Positive control: the checks see netfault while it is installed.
    if c.can_inspect_nodes() {
        for node in &c.nodes {
            let s = node_state(c, node)?;
            ensure(!s.chained.is_empty(), || {
                format!("{node}: installed, but no conflist chains netfault ({s:?}): the check is broken")
            })?;
            ensure(s.plugin, || {
                format!("{node}: installed, but no plugin binary ({s:?}): the check is broken")
            })?;
        }
        let node = &w.pods["s1"].node;
        let s = node_state(c, node)?;
        let filters = s.netns.values().find(|n| n.ip == s1_ip).map(|n| n.filters);
        ensure(filters.is_some_and(|f| f > 0), || {
            format!("{node}: s1 ({s1_ip}) has an active fault but the check sees no netfault filter in its netns: {s:?}")
        })?;
    }

    let t0 = Instant::now();
    let dir = c.target.kustomize_dir.display().to_string();
    c.kubectl(&["delete", "-k", &dir, "--wait=true", "--timeout=180s"])?;
    wait_until("no agent pod is left", Duration::from_secs(120), || {
        let left = c.any_agent_pods()?;
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        })
    })?;
    r.number("delete -k", "to no agent pod left", t0.elapsed());

    // The active fault ended with the uninstall, long before its deadline.
    wait_until(
        "s1 answers once netfault is uninstalled",
        Duration::from_secs(30),
        || answers("s1", true),
    )?;
    let open_at = t_ann.elapsed();
    r.number(
        "active fault",
        "annotated to answering again, across the uninstall",
        open_at,
    );
    ensure(open_at + Duration::from_secs(10) < ACTIVE, || {
        format!("s1's fault lasted {open_at:?}, close to its {ACTIVE:?} deadline: the uninstall did not release it")
    })?;

    if c.can_inspect_nodes() {
        for node in &c.nodes {
            let s = node_state(c, node)?;
            ensure(s.chained.is_empty(), || {
                format!(
                    "{node}: a conflist still chains netfault after the uninstall: {:?}",
                    s.chained
                )
            })?;
            ensure(!s.plugin, || {
                format!(
                    "{node}: the netfault plugin binary is still in {}",
                    c.target.cni_bin_dir
                )
            })?;
            ensure(s.pins.is_empty(), || {
                format!("{node}: bpffs pins left: {:?}", s.pins)
            })?;
            r.note(
                &format!("{node} /run/netfault"),
                &format!(
                    "left: [{}] (the state dir is a hostPath; informational)",
                    s.state_dir
                ),
            );
        }
    } else {
        r.note(
            "nodes",
            "not inspected: an existing cluster's nodes are not reachable from the suite",
        );
    }

    // A pod born after the uninstall starts and answers (the CNI chain has
    // no netfault; nothing waits for an agent).
    ns.server("late", &c.workers[0], &[])?;
    let late_pod = ns.wait_running(&["late"])?;
    let got = reach(&ns, "client", &[("late", late_pod["late"].ip.as_str())], 2)?;
    ensure(got["late"].passes(), || {
        format!("a pod started after the uninstall answers: {got:?}")
    })?;

    // Nothing of netfault in any pod netns, s1's included.
    if c.can_inspect_nodes() {
        for node in &c.nodes {
            let s = node_state(c, node)?;
            for (path, n) in &s.netns {
                ensure(n.tables.is_empty(), || {
                    format!("{node}: nft tables left in {path}: {:?}", n.tables)
                })?;
                ensure(n.filters == 0, || {
                    format!(
                        "{node}: netfault tc filters left in {path} (pod {}): {}",
                        n.ip, n.filters
                    )
                })?;
            }
        }
    }
    Ok(())
}
