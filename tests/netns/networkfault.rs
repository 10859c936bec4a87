//! The NetworkFault reconciler against the scripted API server: a real
//! agent (`--kubeconfig`, `--node-name`), real pods from the CNI node (and
//! scripted pods on other nodes), each resource's effect measured on the
//! wire: UDP from the selected pods, blackholed or not.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use netfault_k8s::{select, Mode, PodKey, Requirement, Selector};
use serde_json::{json, Value};
use testbed::Pod;

use crate::support::{blocked, passes, proto_port, wait_for, KubeNode, Pristine};

/// A NetworkFault spec: an egress blackhole of UDP `port` on the pods
/// labelled `app=<app>`.
fn spec(app: &str, port: u16, mode: &str, value: Option<Value>, duration: &str) -> Value {
    let mut s = json!({
        "action": {"type": "blackhole"},
        "direction": "egress",
        "match": proto_port("udp", port),
        "duration": duration,
        "selector": {"matchLabels": {"app": app}},
        "mode": mode,
    });
    if let Some(v) = value {
        s["value"] = v;
    }
    s
}

impl KubeNode {
    /// This node's entry in the resource's status.
    fn entry(&self, uid: &str) -> Option<Value> {
        let nf = self.server.networkfault(uid)?;
        nf["status"]["nodes"]
            .as_array()?
            .iter()
            .find(|e| e["node"] == self.node_name.as_str())
            .cloned()
    }

    /// Waits until this node's entry satisfies `f`; returns it.
    fn wait_entry(&self, uid: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || self.entry(uid).is_some_and(|e| f(&e)));
        self.entry(uid).unwrap_or(Value::Null)
    }

    fn resource_faults(&self, pod: &Pod) -> Vec<Value> {
        self.faults_of(pod, "resource")
    }

    fn active_resource_faults(&self, pod: &Pod) -> Vec<Value> {
        self.resource_faults(pod)
            .into_iter()
            .filter(|f| f["state"] == "active")
            .collect()
    }
}

/// The pod names in a status entry, sorted.
fn entry_pods(e: &Value) -> Vec<String> {
    let mut v: Vec<String> = e["pods"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Mode `all` by label: the matching pods here are blackholed, a pod that
/// does not match is not; the status lists them; a newly matching pod gets
/// the fault and a pod that goes away from the API loses it; an API fault
/// on a selected pod stays throughout; deleting the resource lifts it all
/// and leaves the pods' netns as they were.
#[test]
fn mode_all_selects_by_label_and_delete_removes() {
    testbed::require_root!();
    let k = KubeNode::start();
    let a = k.pod_labelled("a", &[("app", "web")]);
    let b = k.pod_labelled("b", &[("app", "web")]);
    let c = k.pod_labelled("c", &[("app", "db")]);
    let peer = k.pod("peer");
    let (p, p_api) = (7301, 7302);
    let pristine_b = Pristine::of(&b);
    let pristine_c = Pristine::of(&c);
    assert!(passes(&a, &peer, p) && passes(&b, &peer, p) && passes(&c, &peer, p));
    let api = k.api_blackhole(&a, p_api);
    assert!(blocked(&a, &peer, p_api));

    let uid =
        k.server
            .create_networkfault("default", "web-down", spec("web", p, "all", None, "5m"));
    let took = wait_for("the web pods are blackholed", || {
        blocked(&a, &peer, p) && blocked(&b, &peer, p)
    });
    eprintln!("NetworkFault created -> effect on the wire: {took:?}");
    assert!(passes(&c, &peer, p), "a pod the selector does not match");
    pristine_c.assert_unchanged("a pod the selector does not match");
    let e = k.wait_entry(&uid, "this node's status entry", |e| {
        e["state"] == "Applied" && entry_pods(e) == ["a", "b"]
    });
    let ids: BTreeSet<String> = k
        .resource_faults(&a)
        .iter()
        .chain(k.resource_faults(&b).iter())
        .filter_map(|f| f["id"].as_str().map(str::to_string))
        .collect();
    let listed: BTreeSet<String> = e["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["faultId"].as_str().map(str::to_string))
        .collect();
    assert_eq!(listed, ids, "the status names the faults: {e}");
    assert_eq!(e["observedGeneration"], 1);
    let nf = k.server.networkfault(&uid).expect("stored");
    assert_eq!(nf["status"]["selectedPods"], 2, "{nf}");
    // The registry's lifecycle notices cover resource faults: pod Events.
    for pod in [&a, &b] {
        wait_for("FaultApplied (resource source) on the pod", || {
            k.server.events().iter().any(|ev| {
                ev["reason"] == "FaultApplied"
                    && ev["regarding"]["uid"] == pod.uid.as_str()
                    && ev["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("(resource source)"))
            })
        });
    }
    let caps = k
        .bed
        .agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    let nfc = &caps["kubernetes"]["networkfaults"];
    assert_eq!(nfc["watched"], 1, "{caps}");
    assert_eq!(nfc["cluster_pods_cached"], 4, "{caps}");
    assert_eq!(nfc["synced"], true, "{caps}");

    // No write storm: an idle second and a re-list write nothing.
    let patches = k.server.status_patches().len();
    let lists = k.server.lists();
    k.server.expire_watches();
    wait_for("re-lists after 410", || k.server.lists() >= lists + 2);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        k.server.status_patches().len(),
        patches,
        "nothing changed, nothing written: {:?}",
        k.server.status_patches()
    );
    assert!(blocked(&a, &peer, p) && blocked(&b, &peer, p));

    // A new matching pod gets the fault; b leaving the API loses it.
    let d = k.pod_labelled("d", &[("app", "web")]);
    wait_for("a newly matching pod is blackholed", || {
        blocked(&d, &peer, p)
    });
    k.server.delete_pod(&b.uid);
    wait_for("a pod no longer selected is released", || {
        passes(&b, &peer, p)
    });
    pristine_b.assert_restored("b after its pod left the selection");
    k.wait_entry(&uid, "the entry follows", |e| entry_pods(e) == ["a", "d"]);
    assert!(blocked(&a, &peer, p_api), "the API fault stays");

    // Delete: every resource fault goes, the API fault stays.
    k.server.delete_networkfault(&uid);
    let took = wait_for("deleting the resource lifts its faults", || {
        passes(&a, &peer, p) && passes(&d, &peer, p)
    });
    eprintln!("NetworkFault deleted -> effect on the wire: {took:?}");
    assert!(k.resource_faults(&a).is_empty() && k.resource_faults(&d).is_empty());
    assert!(blocked(&a, &peer, p_api), "the API fault stays");
    let f = k.bed.agent.get_fault(&api).expect("API fault");
    assert_eq!(
        (f["source"].as_str(), f["state"].as_str()),
        (Some("api"), Some("active"))
    );
    pristine_c.assert_unchanged("c after the delete");
    k.server.assert_all_scripted();
}

/// `one`, `fixed` and `fixed-percent` with pods here and on two other
/// (scripted) nodes: exactly the pods `netfault_k8s::select` picks on this
/// node are blackholed, and the status counts the cluster-wide choice.
#[test]
fn partial_modes_affect_exactly_the_chosen_local_pods() {
    testbed::require_root!();
    let k = KubeNode::start();
    let local: Vec<Pod> = (0..4)
        .map(|i| k.pod_labelled(&format!("w{i}"), &[("app", "web")]))
        .collect();
    let peer = k.pod("peer");
    let mut candidates: Vec<PodKey> = local
        .iter()
        .map(|p| PodKey {
            uid: p.uid.clone(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: k.node_name.clone(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]).into(),
        })
        .collect();
    for i in 0..6 {
        let uid = testbed::random_uuid();
        let node = if i % 2 == 0 { "node-x" } else { "node-y" };
        let name = format!("remote-{i}");
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        k.server
            .add_pod_with_labels("default", &name, &uid, node, &labels, &BTreeMap::new());
        candidates.push(PodKey {
            uid,
            namespace: "default".into(),
            name,
            node: node.into(),
            labels: labels.into(),
        });
    }
    let web = Selector {
        requirements: vec![Requirement::In(
            "app".into(),
            BTreeSet::from(["web".to_string()]),
        )],
    };
    let cases = [
        ("one", None, Mode::One, 7311),
        ("fixed", Some(json!(3)), Mode::Fixed(3), 7312),
        (
            "fixed-percent",
            Some(json!("50%")),
            Mode::FixedPercent(50),
            7313,
        ),
    ];
    let (mut hit, mut missed) = (0, 0);
    for (mode, value, m, port) in cases {
        // Until the choice has a local pod (so the test can fail), at most 20 tries.
        let mut attempt = 0;
        let (uid, chosen) = loop {
            let name = format!("nf-{mode}-{attempt}");
            let uid = k.server.create_networkfault(
                "default",
                &name,
                spec("web", port, mode, value.clone(), "5m"),
            );
            let chosen = select(&uid, "default", &web, m, &candidates);
            let local_hit = local.iter().any(|p| chosen.contains(&p.uid));
            if local_hit || attempt == 20 {
                break (uid, chosen);
            }
            k.server.delete_networkfault(&uid);
            attempt += 1;
        };
        assert_eq!(chosen.len(), m.count(10));
        let mine: Vec<String> = {
            let mut v: Vec<String> = local
                .iter()
                .filter(|p| chosen.contains(&p.uid))
                .map(|p| p.name.clone())
                .collect();
            v.sort();
            v
        };
        let e = k.wait_entry(&uid, &format!("{mode}: this node's entry"), |e| {
            e["state"] == "Applied" && entry_pods(e) == mine
        });
        let nf = k.server.networkfault(&uid).expect("stored");
        assert_eq!(nf["status"]["selectedPods"], chosen.len(), "{mode}: {nf}");
        for p in &local {
            let want = chosen.contains(&p.uid);
            assert_eq!(
                blocked(p, &peer, port),
                want,
                "{mode}: {} chosen={want}, entry {e}",
                p.name
            );
            if want {
                hit += 1;
            } else {
                missed += 1;
                assert!(passes(p, &peer, port), "{mode}: {} untouched", p.name);
            }
        }
        eprintln!("{mode}: chosen {} of 10, here {mine:?}", chosen.len());
    }
    assert!(
        hit > 0 && missed > 0,
        "the cases must include chosen and unchosen local pods"
    );
}

/// A spec edit (a new generation) replaces the fault; a re-list and an
/// agent restart with the same generation keep the same fault and deadline.
#[test]
fn spec_edit_replaces_and_relist_or_restart_keep_the_duration() {
    testbed::require_root!();
    let mut k = KubeNode::start();
    let a = k.pod_labelled("a", &[("app", "web")]);
    let peer = k.pod("peer");
    let (p1, p2) = (7321, 7322);
    let uid =
        k.server
            .create_networkfault("default", "web-slow", spec("web", p1, "all", None, "5m"));
    wait_for("p1 blackholed", || blocked(&a, &peer, p1));
    let before = k.active_resource_faults(&a);
    assert_eq!(before.len(), 1, "{before:?}");
    let key = |f: &Value| (f["id"].clone(), f["expires_at_ms"].clone());

    let (lists, watches) = (k.server.lists(), k.server.watches());
    k.server.expire_watches();
    wait_for("re-lists after 410", || k.server.lists() >= lists + 3);
    k.wait_watching(watches);
    std::thread::sleep(Duration::from_millis(700));
    let after = k.resource_faults(&a);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        key(&after[0]),
        key(&before[0]),
        "a re-list restarts nothing"
    );
    assert!(blocked(&a, &peer, p1));

    let watches = k.server.watches();
    let patches = k.server.status_patches().len();
    k.bed.agent.restart().expect("agent restart");
    k.wait_watching(watches + 2);
    std::thread::sleep(Duration::from_millis(1000));
    let after = k.resource_faults(&a);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        key(&after[0]),
        key(&before[0]),
        "a restart restarts nothing"
    );
    assert!(blocked(&a, &peer, p1));
    assert_eq!(
        k.server.status_patches().len(),
        patches,
        "a restarted agent finds its entry right and writes nothing"
    );

    k.server
        .update_networkfault(&uid, spec("web", p2, "all", None, "5m"));
    let took = wait_for("the edit moves the blackhole to p2", || {
        blocked(&a, &peer, p2) && passes(&a, &peer, p1)
    });
    eprintln!("NetworkFault edited -> effect on the wire: {took:?}");
    let now = k.resource_faults(&a);
    assert_eq!(now.len(), 1, "the old generation's fault is gone: {now:?}");
    assert_ne!(now[0]["id"], before[0]["id"]);
    k.wait_entry(&uid, "the entry reflects generation 2", |e| {
        e["observedGeneration"] == 2 && e["pods"][0]["faultId"] == now[0]["id"]
    });
}

/// A resource's faults end with its duration: a re-list or a restart does
/// not re-apply them, a pod selected after the end gets nothing, the
/// status says `Expired`; a spec edit starts a new duration.
#[test]
fn an_expired_resource_fault_is_not_reapplied() {
    testbed::require_root!();
    let mut k = KubeNode::start();
    let a = k.pod_labelled("a", &[("app", "web")]);
    let peer = k.pod("peer");
    let p = 7331;
    let uid = k
        .server
        .create_networkfault("default", "short", spec("web", p, "all", None, "3s"));
    wait_for("blackholed", || blocked(&a, &peer, p));
    let e = k.wait_entry(&uid, "the entry says Expired", |e| e["state"] == "Expired");
    assert!(passes(&a, &peer, p), "the fault ended: {e}");

    let lists = k.server.lists();
    k.server.expire_watches();
    wait_for("re-lists after 410", || k.server.lists() >= lists + 2);
    let watches = k.server.watches();
    k.bed.agent.restart().expect("agent restart");
    k.wait_watching(watches + 2);
    let late = k.pod_labelled("late", &[("app", "web")]);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(passes(&a, &peer, p), "an expired fault stays expired");
    assert!(passes(&late, &peer, p), "nothing applied past the end");
    assert!(k.active_resource_faults(&a).is_empty());
    assert!(k.active_resource_faults(&late).is_empty());

    k.server
        .update_networkfault(&uid, spec("web", p, "all", None, "4s"));
    wait_for("a new generation applies again", || {
        blocked(&a, &peer, p) && blocked(&late, &peer, p)
    });
}

/// An invalid spec: no fault, a Warning Event on the NetworkFault naming
/// the field (once, not on every re-list), the error in the status.
#[test]
fn an_invalid_spec_applies_nothing_and_says_why() {
    testbed::require_root!();
    let k = KubeNode::start();
    let a = k.pod_labelled("a", &[("app", "web")]);
    let peer = k.pod("peer");
    let p = 7341;
    let pristine = Pristine::of(&a);
    let mut bad = spec("web", p, "all", None, "5m");
    bad["action"] = json!({"type": "loss", "percent": 150});
    let uid = k.server.create_networkfault("default", "bad", bad);
    let e = k.wait_entry(&uid, "the status says Invalid", |e| e["state"] == "Invalid");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.action.percent")),
        "{e}"
    );
    let warned = |k: &KubeNode| -> usize {
        k.server
            .events()
            .iter()
            .filter(|ev| {
                ev["reason"] == "InvalidNetworkFault"
                    && ev["type"] == "Warning"
                    && ev["regarding"]["kind"] == "NetworkFault"
                    && ev["regarding"]["uid"] == uid.as_str()
                    && ev["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("spec.action.percent"))
            })
            .count()
    };
    wait_for("a Warning Event naming the field", || warned(&k) > 0);
    assert!(passes(&a, &peer, p) && passes(&a, &peer, p + 1));
    assert!(k.resource_faults(&a).is_empty());
    pristine.assert_unchanged("an invalid resource changes nothing");
    let lists = k.server.lists();
    k.server.expire_watches();
    wait_for("re-lists after 410", || k.server.lists() >= lists + 2);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(warned(&k), 1, "one Event, not one per re-list");
}
