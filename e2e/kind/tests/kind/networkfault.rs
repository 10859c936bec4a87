//! `networkfault-<mode>`: six labelled server pods spread over the workload
//! nodes and one unlabelled decoy; a NetworkFault (ingress blackhole of the
//! HTTP port) selecting the label in mode `all`, `one`, `fixed` (2) or
//! `fixed-percent` (50). The pods that stop answering on the wire must be
//! exactly the ones the status names, exactly the ones
//! `netfault_k8s::select` picks for the resource's uid (the agents' shared
//! choice), and as many as the mode says; the decoy never; each node's
//! status entry names only pods on that node. Deleting the resource makes
//! every pod answer again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e_kind::probe::reach;
use e2e_kind::workload::blackhole_fault;
use e2e_kind::{ensure, Cluster, Error, Result, TestNs};
use netfault_k8s::{NodeState, PodKey};
use serde_json::{json, Value};

use crate::support::{wait_until, Report};

const TARGETS: usize = 6;
const LABEL: (&str, &str) = ("app", "nf-target");

pub fn all(c: &Cluster, r: &mut Report) -> Result<()> {
    scenario(c, r, "all", None, TARGETS)
}

pub fn one(c: &Cluster, r: &mut Report) -> Result<()> {
    scenario(c, r, "one", None, 1)
}

pub fn fixed(c: &Cluster, r: &mut Report) -> Result<()> {
    scenario(c, r, "fixed", Some(json!(2)), 2)
}

pub fn fixed_percent(c: &Cluster, r: &mut Report) -> Result<()> {
    // ceil(6 × 50 / 100) = 3.
    scenario(c, r, "fixed-percent", Some(json!("50%")), 3)
}

fn scenario(
    c: &Cluster,
    r: &mut Report,
    mode: &str,
    value: Option<Value>,
    want: usize,
) -> Result<()> {
    let ns = TestNs::create(c, &format!("nf{mode}"))?;
    let mut names: Vec<String> = (0..TARGETS).map(|i| format!("t{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        ns.server(n, &c.workers[i % c.workers.len()], &[LABEL])?;
    }
    ns.server(
        "decoy",
        &c.workers[c.workers.len() - 1],
        &[("app", "other")],
    )?;
    ns.client("client", &c.workers[0])?;
    names.push("decoy".into());
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("client");
    let pods = ns.wait_running(&all)?;
    let targets: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), pods[n].ip.as_str()))
        .collect();
    let before = reach(&ns, "client", &targets, 2)?;
    ensure(before.values().all(|r| r.passes()), || {
        format!("before the NetworkFault every pod answers: {before:?}")
    })?;

    let name = format!("nf-{mode}");
    let mut spec = blackhole_fault("5m");
    spec["selector"] = json!({"matchLabels": {LABEL.0: LABEL.1}});
    spec["mode"] = json!(mode);
    if let Some(v) = value {
        spec["value"] = v;
    }
    let t0 = Instant::now();
    let created = ns.create_networkfault(json!({
        "apiVersion": "netfault.io/v1alpha1",
        "kind": "NetworkFault",
        "metadata": {"name": name},
        "spec": spec,
    }))?;

    // What every agent must choose: the shared selection over the pods.
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let valid = netfault_k8s::validate(&created)
        .map_err(|e| Error::Other(format!("the suite's own NetworkFault is invalid: {e}")))?;
    let keys: Vec<PodKey> = pods
        .values()
        .filter(|p| p.name != "client")
        .map(|p| PodKey {
            uid: p.uid.clone(),
            namespace: ns.name.clone(),
            name: p.name.clone(),
            node: p.node.clone(),
            labels: p.labels.clone().into(),
        })
        .collect();
    let by_uid: BTreeMap<&str, &str> = keys
        .iter()
        .map(|k| (k.uid.as_str(), k.name.as_str()))
        .collect();
    let expected: BTreeSet<String> = valid
        .select(&uid, &keys)
        .iter()
        .filter_map(|u| by_uid.get(u.as_str()).map(|n| n.to_string()))
        .collect();
    ensure(expected.len() == want, || {
        format!("mode {mode} selects {want} of {TARGETS}, the shared selection gives {expected:?}")
    })?;

    // The status: every node's entry, Applied, with fault ids; together
    // exactly the expected pods, each listed by its own node.
    let mut status_pods = BTreeSet::new();
    let to_status = wait_until(
        &format!("the status of {name} names the selected pods"),
        Duration::from_secs(60),
        || {
            let nf = ns.get_networkfault(&name)?;
            let Some(st) = nf.status else {
                return Ok(Err("no status".into()));
            };
            let mut seen = BTreeSet::new();
            for entry in &st.nodes {
                if entry.state != NodeState::Applied {
                    return Ok(Err(format!(
                        "node {} is {:?}: {:?}",
                        entry.node, entry.state, entry.message
                    )));
                }
                for p in &entry.pods {
                    let on = pods.get(&p.name).map(|i| i.node.as_str());
                    if on != Some(entry.node.as_str()) {
                        return Ok(Err(format!(
                            "node {} lists pod {} which runs on {on:?}",
                            entry.node, p.name
                        )));
                    }
                    if p.fault_id.is_none() {
                        return Ok(Err(format!("pod {} has no fault id yet", p.name)));
                    }
                    seen.insert(p.name.clone());
                }
            }
            if seen == expected && st.selected_pods == Some(want as i64) {
                status_pods = seen;
                Ok(Ok(()))
            } else {
                Ok(Err(format!(
                    "status pods {seen:?}, selectedPods {:?}; expected {expected:?}",
                    st.selected_pods
                )))
            }
        },
    )?;

    // The wire: exactly those pods stop answering.
    let to_wire = wait_until(
        &format!("exactly the selected pods of {name} stop answering"),
        Duration::from_secs(30),
        || {
            let got = reach(&ns, "client", &targets, 2)?;
            let blocked: BTreeSet<String> = got
                .iter()
                .filter(|(_, r)| r.blocked())
                .map(|(n, _)| n.clone())
                .collect();
            let clean = got.values().all(|r| r.blocked() || r.passes());
            Ok(if clean && blocked == status_pods {
                Ok(())
            } else {
                Err(format!("probes {got:?}, status {status_pods:?}"))
            })
        },
    )?;
    let nodes: BTreeSet<&str> = status_pods.iter().map(|p| pods[p].node.as_str()).collect();
    if mode == "all" && c.workers.len() > 1 {
        ensure(nodes.len() == c.workers.len(), || {
            format!("mode all covers pods on every workload node, got {nodes:?}")
        })?;
    }
    r.note(
        "selected",
        &format!("{status_pods:?} on nodes {nodes:?} (status = wire = shared selection, {want} of {TARGETS})"),
    );
    r.number("create to status", "complete status entries", to_status);
    r.number(
        "create to wire",
        "status complete to every selected pod blackholed",
        to_wire,
    );
    r.number("create to effect", "total", t0.elapsed());

    ns.delete_networkfault(&name)?;
    let restored = wait_until(
        &format!("every pod answers after {name} is deleted"),
        Duration::from_secs(60),
        || {
            let got = reach(&ns, "client", &targets, 2)?;
            Ok(if got.values().all(|r| r.passes()) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        },
    )?;
    r.number("delete to restored", "every pod answers", restored);
    Ok(())
}
