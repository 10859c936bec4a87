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

/// The one-line verbs: `netfaultctl loss 50% --pod default/a ...` creates
/// the fault the flags say (seen on the wire, counted by the agent); a bad
/// flag is refused naming the flag and the API's field, changing nothing.
#[test]
fn ctl_verbs_make_faults_from_flags_and_name_bad_flags() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let faults = || {
        c.agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("list")
    };

    // Refused before anything is sent, naming the flag.
    for (args, flag, field) in [
        (
            vec!["loss", "150%", "--pod", "default/a"],
            "--percent",
            "action.percent",
        ),
        (
            vec!["delay", "10ms", "--pod", "default/a", "--for", "soon"],
            "--for",
            "duration",
        ),
        (
            vec!["blackhole", "--pod", "default/a", "--to", "198.18.0.0/40"],
            "--to",
            "match.cidr",
        ),
    ] {
        let out = ctl(&c, &args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with(&format!("error: {flag}: "))
                && err.contains(&format!("(field {field})")),
            "{args:?}: {err}"
        );
    }
    assert_eq!(faults(), json!([]), "a refused verb created something");

    // 50% loss on UDP port 7402, egress, by the pod's name.
    let out = ctl(
        &c,
        &[
            "-o",
            "json",
            "loss",
            "50%",
            "--pod",
            "default/a",
            "--direction",
            "egress",
            "--protocol",
            "udp",
            "--port",
            "7402",
            "--for",
            "1m",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "loss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).expect("-o json prints the fault");
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["spec"]["action"]["type"], "loss");
    // `watch`: a frame before the traffic and one after it, 2 s apart.
    let watch = Command::new(testbed::workspace_bin("netfaultctl"))
        .arg("--socket")
        .arg(c.agent.socket())
        .args(["watch", "--count", "2", "--interval", "2s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run netfaultctl watch");
    std::thread::sleep(Duration::from_millis(500));
    let n = 2000;
    let p = udp_probe(&a, &b, v4(&b), 7402, n, Duration::from_micros(100)).expect("probe");
    let shown = watch.wait_with_output().expect("watch ends after 2 frames");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    // Per frame, the fault's row: ... MATCHED DROPPED AFFECTED MATCHED/S DROPPED/S AFFECTED/S.
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with(id.as_str()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "two frames: {text}");
    let col = |r: &Vec<&str>, from_end: usize| r[r.len() - from_end].to_string();
    let dropped = |r: &Vec<&str>| col(r, 5).parse::<u64>().expect("DROPPED");
    assert_eq!(col(&rows[0], 2), "-", "no rate in the first frame: {text}");
    assert_eq!(
        dropped(&rows[1]) - dropped(&rows[0]),
        u64::from(n) - p.received,
        "watch shows the drops the wire saw: {text}"
    );
    let rate: f64 = col(&rows[1], 2).parse().expect("DROPPED/S");
    assert!(rate > 0.0, "a drop rate: {text}");
    // Binomial(2000, 0.5): sd 22.4; 5 sd either side.
    assert!(
        (888..=1112).contains(&p.received),
        "50% loss delivered {} of {n}",
        p.received
    );
    let got = c
        .agent
        .client()
        .call("GET", &format!("/v1/faults/{id}"), None)
        .expect("get");
    assert_eq!(
        got["counters"]["dropped"].as_u64(),
        Some(u64::from(n) - p.received),
        "the agent counted what the wire lost: {got}"
    );
    // Another port is untouched.
    let p = udp_probe(&a, &b, v4(&b), 7403, 300, Duration::from_micros(100)).expect("probe");
    assert_eq!(p.received, p.sent);

    // The table output names the fault and what it does.
    let out = ctl(
        &c,
        &[
            "blackhole",
            "--sandbox",
            &a.container_id,
            "--protocol",
            "udp",
            "--port",
            "7404",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("created "),
        "{text}"
    );
    assert!(text.contains("blackhole"), "{text}");
    let p = udp_probe(&a, &b, v4(&b), 7404, 300, Duration::from_micros(100)).expect("probe");
    assert_eq!(p.received, 0, "the blackhole verb drops");
    let out = ctl(&c, &["delete", &id], None);
    assert!(out.status.success());
}
