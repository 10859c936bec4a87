//! `ctl-kube`: `netfaultctl --kube` from this machine, outside the cluster
//! (the kubeconfig's user; the agent's token from its Secret; the API
//! through `pods/portforward` to the agent on the target pod's node):
//! `apply` a blackhole on a pod → the pod stops answering, its neighbour
//! does not; `list` and `get` show the fault active with source `api`;
//! `delete` → the pod answers again. A pod that does not exist is an error
//! naming it, and changes nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_kind::cluster::run as run_cmd;
use e2e_kind::probe::reach;
use e2e_kind::workload::blackhole_fault;
use e2e_kind::{ensure, Cluster, Error, Result, TestNs};
use serde_json::{json, Value};

use crate::support::{wait_until, Report, Workload};

pub fn run(c: &Cluster, r: &mut Report) -> Result<()> {
    let ns = TestNs::create(c, "ctlkube")?;
    let w = Workload::start(&ns, 2, &[])?;
    let (target, other) = ("s1", "s0");
    let pod_ref = format!("{}/{target}", ns.name);
    let ctl = |args: &[&str]| -> Result<(Value, Duration)> {
        let t = Instant::now();
        let out = run_cmd(
            Command::new(&c.target.netfaultctl)
                .args(["--kube", "-o", "json"])
                .args(args),
        )?;
        let v = serde_json::from_str(&out).map_err(|e| {
            Error::Other(format!(
                "netfaultctl {args:?}: output is not JSON ({e}): {out}"
            ))
        })?;
        Ok((v, t.elapsed()))
    };

    let mut fault = blackhole_fault("5m");
    fault["target"] = json!({"pod": {"namespace": ns.name, "name": target}});
    let dir =
        testbed::TempDir::new("nfe2e-ctl").map_err(|e| Error::Other(format!("a temp dir: {e}")))?;
    let file = dir.path().join("fault.json");
    std::fs::write(&file, fault.to_string())
        .map_err(|e| Error::Other(format!("writing {}: {e}", file.display())))?;
    let path = file.display().to_string();

    let (applied, d_apply) = ctl(&["apply", "-f", &path])?;
    let id = first_id(&applied)
        .ok_or_else(|| Error::Other(format!("apply printed no fault id: {applied}")))?;
    r.number(
        "apply",
        "netfaultctl --kube apply (port-forward included)",
        d_apply,
    );
    let targets = w.targets();
    wait_until(
        "the applied fault acts on the target only",
        Duration::from_secs(20),
        || {
            let got = reach(&ns, "client", &targets, 2)?;
            Ok(if got[target].blocked() && got[other].passes() {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        },
    )?;

    let (listed, d_list) = ctl(&["list", "--pod", &pod_ref])?;
    let f = find_fault(&listed, &id)
        .ok_or_else(|| Error::Other(format!("list --pod {pod_ref} lacks fault {id}: {listed}")))?;
    ensure(f["state"] == "active" && f["source"] == "api", || {
        format!("listed fault {id}: want state active, source api: {f}")
    })?;
    r.number("list", "netfaultctl --kube list --pod", d_list);
    let (got, d_get) = ctl(&["get", &id, "--pod", &pod_ref])?;
    let f = find_fault(&got, &id).ok_or_else(|| Error::Other(format!("get {id}: {got}")))?;
    ensure(f["state"] == "active", || format!("get {id}: {f}"))?;
    r.number("get", "netfaultctl --kube get --pod", d_get);

    // A pod that does not exist: an error naming it; nothing changes.
    let missing = format!("{}/no-such-pod", ns.name);
    match run_cmd(Command::new(&c.target.netfaultctl).args(["--kube", "list", "--pod", &missing])) {
        Ok(out) => {
            return Err(Error::Other(format!(
                "list --pod {missing} succeeded: {out}"
            )))
        }
        Err(e) => ensure(e.to_string().contains("no-such-pod"), || {
            format!("the error for a missing pod names it: {e}")
        })?,
    }

    let t = Instant::now();
    run_cmd(
        Command::new(&c.target.netfaultctl).args(["--kube", "delete", &id, "--pod", &pod_ref]),
    )?;
    r.number("delete", "netfaultctl --kube delete --pod", t.elapsed());
    wait_until(
        "the deleted fault is gone from the wire",
        Duration::from_secs(20),
        || {
            let got = reach(&ns, "client", &targets, 2)?;
            Ok(if got.values().all(|r| r.passes()) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        },
    )?;
    Ok(())
}

/// The first `id` in `apply`'s output (one fault object or a list of them).
fn first_id(v: &Value) -> Option<String> {
    match v {
        Value::Array(a) => a.iter().find_map(first_id),
        Value::Object(o) => match o.get("id").and_then(Value::as_str) {
            Some(id) => Some(id.to_string()),
            None => o.values().find_map(first_id),
        },
        _ => None,
    }
}

/// The fault object with `id`, anywhere in `v`.
fn find_fault<'a>(v: &'a Value, id: &str) -> Option<&'a Value> {
    match v {
        Value::Array(a) => a.iter().find_map(|x| find_fault(x, id)),
        Value::Object(o) => {
            if o.get("id").and_then(Value::as_str) == Some(id) {
                Some(v)
            } else {
                o.values().find_map(|x| find_fault(x, id))
            }
        }
        _ => None,
    }
}
