//! netfaultctl against a real agent: what it applies changes the wire, what it
//! deletes stops, and a bad file is refused naming the field, changing nothing.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use testbed::udp_probe;

use crate::support::{v4, Cluster};

fn ctl(c: &Cluster, args: &[&str], stdin_file: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(testbed::workspace_bin("netfaultctl"));
    cmd.arg("--socket").arg(c.agent.socket()).args(args);
    if let Some(f) = stdin_file {
        cmd.stdin(std::fs::File::open(f).expect("open stdin file"));
    }
    cmd.output().expect("run netfaultctl")
}

#[test]
fn ctl_apply_list_delete_changes_the_wire() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let dir = testbed::TempDir::new("nfctl").expect("temp dir");

    // A bad file: refused before anything is sent.
    let bad = dir.path().join("bad.json");
    let faults = json!([
        {"target": {"sandbox": a.container_id}, "action": {"type": "blackhole"}, "duration": "30s"},
        {"target": {"sandbox": a.container_id}, "action": {"type": "loss", "percent": 101}, "duration": "30s"}
    ]);
    std::fs::write(&bad, faults.to_string()).expect("write");
    let out = ctl(
        &c,
        &["apply", "-f", bad.to_str().expect("utf-8 path")],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("faults[1].action.percent"),
        "error names the field: {err}"
    );
    let listed = c
        .agent
        .client()
        .call("GET", "/v1/faults", None)
        .expect("list");
    assert_eq!(listed, json!([]), "a refused file applied something");

    // A good file from stdin.
    let good = dir.path().join("good.json");
    let fault = json!({"target": {"pod": {"namespace": "default", "name": "a"}}, "direction": "egress",
        "match": {"protocol": "udp"}, "action": {"type": "blackhole"}, "duration": "30s"});
    std::fs::write(&good, fault.to_string()).expect("write");
    let out = ctl(&c, &["-o", "json", "apply", "-f", "-"], Some(&good));
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).expect("apply -o json prints JSON");
    let id = created
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or(&created)["id"]
        .as_str()
        .expect("created fault id")
        .to_string();

    let p = udp_probe(&a, &b, v4(&b), 7401, 300, Duration::from_micros(200)).expect("probe");
    assert_eq!(
        (p.received, p.send_errors),
        (0, 0),
        "applied blackhole drops silently"
    );

    let out = ctl(&c, &["list"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains(&id),
        "list shows the fault: {table}"
    );
    assert!(table.contains("blackhole"), "{table}");
    let out = ctl(&c, &["-o", "json", "get", &id], None);
    let got: Value = serde_json::from_slice(&out.stdout).expect("get -o json");
    assert_eq!(
        got["counters"]["dropped"], 300,
        "get reports the drops the wire saw: {got}"
    );

    let out = ctl(&c, &["delete", &id], None);
    assert!(out.status.success());
    let p = udp_probe(&a, &b, v4(&b), 7401, 300, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "deleted fault no longer drops");
    let out = ctl(&c, &["delete", &id], None);
    assert!(out.status.success(), "delete is idempotent");

    let out = ctl(&c, &["sandboxes"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&a.container_id[..12]) && table.contains("default/a"),
        "{table}"
    );
}
