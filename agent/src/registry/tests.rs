//! The registry's rules, without root: fake backends record what they are
//! told, a fake host answers for the netns (this process's own, which any
//! user may open).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netfault_api::{
    BackendKind, DelayAction, EnrolRequest, EnrolSource, PacketAction, PodRef, ProxyAction,
};
use netfault_sys::netns::NetnsError;
use serde_json::json;

use super::*;
use crate::backend::fake::{Call, FakeBackend, Log, COUNTED};

const OWN_NETNS: &str = "/proc/self/ns/net";

/// A netns with one interface, `sole`, which has a fresh address each time
/// it is asked.
struct FakeHost {
    next: AtomicU8,
    sole: &'static str,
}

impl Host for FakeHost {
    fn addresses(
        &self,
        _: &Netns,
        ifname: &str,
    ) -> Result<Result<Vec<IpAddr>, String>, NetnsError> {
        if ifname != self.sole {
            return Ok(Err(format!("interface {ifname:?} does not exist")));
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        Ok(Ok(vec![IpAddr::V4(Ipv4Addr::new(198, 18, 0, n))]))
    }

    fn sole_interface(&self, _: &Netns) -> Result<Result<String, String>, NetnsError> {
        Ok(Ok(self.sole.into()))
    }
}

/// A state dir of the test's own, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let r: u64 = rand::random();
        let p = std::env::temp_dir().join(format!("netfault-registry-{name}-{r:x}"));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Fixture {
    reg: Registry,
    log: Log,
    fail: Vec<(BackendKind, Arc<std::sync::atomic::AtomicBool>)>,
    dir: TempDir,
}

fn open_in(dir: TempDir) -> Fixture {
    open_with(dir, "eth0")
}

/// A registry whose netns has the one interface `sole`.
fn open_with(dir: TempDir, sole: &'static str) -> Fixture {
    // The tests' netns is the host's: that rule is tested on its own.
    let policy = crate::policy::Policy {
        max_duration: Duration::from_secs(3600),
        host_netns: Vec::new(),
        ..crate::policy::Policy::default()
    };
    open_with_policy(dir, sole, policy)
}

fn open_with_policy(dir: TempDir, sole: &'static str, policy: crate::policy::Policy) -> Fixture {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let ebpf = FakeBackend::<PacketAction>::new(&log);
    let nfqueue = FakeBackend::<DelayAction>::new(&log);
    let proxy = FakeBackend::<ProxyAction>::new(&log);
    let fail = vec![
        (BackendKind::Ebpf, ebpf.fail_next_sync.clone()),
        (BackendKind::Nfqueue, nfqueue.fail_next_sync.clone()),
        (BackendKind::Proxy, proxy.fail_next_sync.clone()),
    ];
    let backends = Backends {
        ebpf: Box::new(ebpf),
        nfqueue: Box::new(nfqueue),
        proxy: Box::new(proxy),
    };
    let cfg = Config {
        state_dir: dir.0.clone(),
        policy,
        retain_expired: Duration::from_secs(600),
        freeze_limit: Duration::from_secs(30),
    };
    let host = FakeHost {
        next: AtomicU8::new(2),
        sole,
    };
    let reg = match Registry::with_parts(cfg, backends, Box::new(host)) {
        Ok(r) => r,
        Err(e) => panic!("opening the registry: {e}"),
    };
    Fixture {
        reg,
        log,
        fail,
        dir,
    }
}

fn fixture(name: &str) -> Fixture {
    open_in(TempDir::new(name))
}

impl Fixture {
    fn enrol(&self, id: &str) {
        let req = EnrolRequest {
            netns: OWN_NETNS.into(),
            ifname: "eth0".into(),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: id.into(),
                uid: String::new(),
            }),
            ..Default::default()
        };
        if let Err(e) = self.reg.enrol(id, req) {
            panic!("enrolling {id}: {e}");
        }
    }

    fn create(&self, sandbox: &str, action: serde_json::Value, duration: &str) -> String {
        let body = json!({"target": {"sandbox": sandbox}, "action": action, "duration": duration});
        match self.reg.create_fault(&body) {
            Ok(f) => f.id,
            Err(e) => panic!("creating {body}: {e}"),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The calls that change something (the views read counters too).
    fn changes(&self) -> Vec<Call> {
        let mut calls = self.calls();
        calls.retain(|c| !matches!(c, Call::ReadCounters(_)));
        calls
    }

    fn clear(&self) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn fail_next(&self, kind: BackendKind) {
        for (k, flag) in &self.fail {
            if *k == kind {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

fn loss() -> serde_json::Value {
    json!({"type": "loss", "percent": 10})
}

fn sync_of(kind: BackendKind, sandbox: &str, faults: &[&str]) -> Call {
    Call::Sync {
        kind,
        sandbox: SandboxId::from(sandbox),
        faults: faults.iter().map(|f| FaultId::from(*f)).collect(),
    }
}

#[test]
fn each_change_syncs_only_its_backend_with_the_full_list() {
    let fx = fixture("sync");
    fx.enrol("sb1");
    fx.clear();
    let f1 = fx.create("sb1", loss(), "5m");
    let f2 = fx.create("sb1", json!({"type": "delay", "latency": "10ms"}), "5m");
    let f3 = fx.create("sb1", loss(), "5m");
    assert_eq!(
        fx.changes(),
        vec![
            sync_of(BackendKind::Ebpf, "sb1", &[&f1]),
            sync_of(BackendKind::Nfqueue, "sb1", &[&f2]),
            // In creation order (the order DNS faults compose in).
            sync_of(BackendKind::Ebpf, "sb1", &[&f1, &f3]),
        ]
    );
}

#[test]
fn the_last_ebpf_fault_removed_leaves_the_backend_an_empty_list() {
    let fx = fixture("detach");
    fx.enrol("sb1");
    let f1 = fx.create("sb1", loss(), "5m");
    let f2 = fx.create("sb1", loss(), "5m");
    fx.clear();
    fx.reg.delete_fault(&f1).expect("delete f1");
    fx.reg.delete_fault(&f2).expect("delete f2");
    // Deleting again is fine and touches nothing.
    fx.reg.delete_fault(&f2).expect("delete f2 again");
    assert_eq!(
        fx.calls(),
        vec![
            sync_of(BackendKind::Ebpf, "sb1", &[&f2]),
            Call::ForgetFault(BackendKind::Ebpf, FaultId::from(f1.as_str())),
            sync_of(BackendKind::Ebpf, "sb1", &[]),
            Call::ForgetFault(BackendKind::Ebpf, FaultId::from(f2.as_str())),
        ]
    );
    let st = fx.reg.shared.lock();
    let sb = st
        .sandboxes
        .get(&SandboxId::from("sb1"))
        .expect("still enrolled");
    assert_eq!(sb.memo.attachment, None, "the backend's memo is recorded");
}

#[test]
fn reap_takes_the_counters_before_the_backend_forgets() {
    let fx = fixture("reap");
    fx.enrol("sb1");
    let f = fx.create("sb1", loss(), "30ms");
    let keep = fx.create("sb1", loss(), "5m");
    std::thread::sleep(Duration::from_millis(60));
    fx.clear();
    let next = fx.reg.reap().expect("reap");
    let calls = fx.calls();
    let read = calls
        .iter()
        .position(|c| *c == Call::ReadCounters(FaultId::from(f.as_str())));
    let sync = calls
        .iter()
        .position(|c| *c == sync_of(BackendKind::Ebpf, "sb1", &[&keep]));
    let forget = calls
        .iter()
        .position(|c| *c == Call::ForgetFault(BackendKind::Ebpf, FaultId::from(f.as_str())));
    assert!(
        matches!((read, sync, forget), (Some(r), Some(s), Some(g)) if r < s && s < g),
        "read, sync, forget in that order: {calls:?}"
    );
    let view = fx.reg.fault(&f).expect("expired faults stay listed");
    assert_eq!(view.state, "expired");
    assert_eq!(view.counters, COUNTED, "final counters are the snapshot");
    assert!(
        next.is_some_and(|d| d > Duration::from_secs(60)),
        "{next:?}"
    );
    // A second reap finds nothing due and changes nothing.
    fx.clear();
    fx.reg.reap().expect("reap again");
    assert_eq!(fx.calls(), vec![]);
}

#[test]
fn an_implicit_sandbox_goes_with_its_last_fault() {
    let fx = fixture("implicit");
    let body = json!({"target": {"netns": OWN_NETNS}, "action": loss(), "duration": "5m"});
    let f = fx.reg.create_fault(&body).expect("fault on a bare netns");
    assert_eq!(fx.reg.sandboxes().len(), 1, "enrolled implicitly");
    let again = fx
        .reg
        .create_fault(&body)
        .expect("second fault, same netns");
    assert_eq!(
        fx.reg.sandboxes().len(),
        1,
        "the same sandbox is found again"
    );
    fx.reg.delete_fault(&f.id).expect("delete");
    assert_eq!(fx.reg.sandboxes().len(), 1, "one fault is left");
    fx.reg.delete_fault(&again.id).expect("delete");
    assert!(
        fx.reg.sandboxes().is_empty(),
        "released with its last fault"
    );
}

#[test]
fn a_failed_sync_leaves_the_sandbox_as_it_was() {
    let fx = fixture("rollback");
    fx.enrol("sb1");
    let f1 = fx.create("sb1", loss(), "5m");
    fx.clear();
    fx.fail_next(BackendKind::Ebpf);
    let body = json!({"target": {"sandbox": "sb1"}, "action": loss(), "duration": "5m"});
    let err = fx.reg.create_fault(&body).expect_err("the backend failed");
    assert!(matches!(err, AgentError::Internal(_)), "{err:?}");
    let ids: Vec<String> = fx.reg.faults().into_iter().map(|f| f.id).collect();
    assert_eq!(ids, vec![f1.clone()], "nothing new is listed");
    let calls = fx.changes();
    assert_eq!(
        calls.last(),
        Some(&sync_of(BackendKind::Ebpf, "sb1", &[&f1])),
        "{calls:?}"
    );
}

#[test]
fn admission_errors_change_nothing() {
    let fx = fixture("admit");
    fx.enrol("sb1");
    fx.create("sb1", loss(), "5m");
    fx.create("sb1", loss(), "5m");
    fx.clear();
    let body = json!({"target": {"sandbox": "sb1"}, "action": loss(), "duration": "5m"});
    match fx.reg.create_fault(&body) {
        Err(AgentError::Field(e)) => {
            assert_eq!((e.code.as_str(), e.field.as_str()), ("conflict", "target"))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(fx.calls(), vec![]);
    assert_eq!(fx.reg.faults().len(), 2);
}

#[test]
fn release_reaches_the_backends_that_served_the_sandbox_and_removes_every_fault() {
    let fx = fixture("release");
    fx.enrol("sb1");
    fx.enrol("sb2");
    fx.create("sb1", loss(), "5m");
    fx.create("sb1", json!({"type": "delay", "latency": "10ms"}), "5m");
    let other = fx.create("sb2", loss(), "5m");
    fx.clear();
    fx.reg.release("sb1").expect("release");
    fx.reg.release("sb1").expect("release is idempotent");
    let calls = fx.calls();
    for kind in [BackendKind::Ebpf, BackendKind::Nfqueue] {
        assert!(
            calls.contains(&Call::ForgetSandbox(kind, SandboxId::from("sb1"))),
            "{calls:?}"
        );
    }
    // A backend that never served the sandbox is not asked (an `nft` run
    // on every CNI DEL costs milliseconds).
    let proxy = Call::ForgetSandbox(BackendKind::Proxy, SandboxId::from("sb1"));
    assert!(!calls.contains(&proxy), "{calls:?}");
    let ids: Vec<String> = fx.reg.faults().into_iter().map(|f| f.id).collect();
    assert_eq!(ids, vec![other]);
    let names: Vec<String> = fx.reg.sandboxes().into_iter().map(|s| s.id).collect();
    assert_eq!(names, vec!["sb2".to_string()]);
}

#[test]
fn a_restart_re_syncs_live_faults_with_their_memos() {
    let fx = fixture("restart");
    fx.enrol("sb1");
    let f = fx.create("sb1", loss(), "5m");
    let Fixture { reg, dir, .. } = fx;
    drop(reg);
    let fx = open_in(dir);
    let calls = fx.calls();
    assert_eq!(
        calls.first(),
        Some(&sync_of(BackendKind::Ebpf, "sb1", &[&f])),
        "{calls:?}"
    );
    assert!(
        calls.contains(&sync_of(BackendKind::Nfqueue, "sb1", &[])),
        "leftovers are removed: {calls:?}"
    );
    let st = fx.reg.shared.lock();
    let rec = st
        .faults
        .get(&FaultId::from(f.as_str()))
        .expect("persisted");
    assert_eq!(rec.memo, Some(0), "the rule index survives");
}

#[test]
fn an_older_agents_state_file_is_read() {
    let dir = TempDir::new("legacy");
    std::fs::create_dir_all(&dir.0).expect("state dir");
    let nid = netfault_sys::netns::identify(std::path::Path::new(OWN_NETNS)).expect("own netns");
    let deadline = netfault_ebpf::boottime_ns() + 300_000_000_000;
    let old = json!({
        "sandboxes": {"sb1": {
            "id": "sb1", "netns": OWN_NETNS, "netns_id": {"dev": nid.dev, "ino": nid.ino},
            "ifname": "eth0", "ips": [], "pod": null, "annotations": {}, "enrolled_at_ms": 1,
            "birth_faults": [], "annotation_error": null, "slot": 0,
            "addresses": ["198.18.0.9"], "implicit": false, "attachment": {"created_clsact": true}
        }},
        "faults": {"f-0000000000000001": {
            "id": "f-0000000000000001", "sandbox": "sb1",
            "spec": {"target": {"sandbox": "sb1"}, "direction": "both", "match": {},
                     "action": {"type": "delay", "latency": "10ms"}, "duration": "5m"},
            "created_at_ms": 1, "expires_at_ms": 300001, "deadline_boot_ns": deadline,
            "rule": u32::MAX, "expired": false,
            "final_counters": {"matched": 0, "dropped": 0}, "nfqueue": true
        }}
    });
    std::fs::write(dir.0.join("state.json"), old.to_string()).expect("write");
    let fx = open_in(dir);
    let f = fx.reg.fault("f-0000000000000001").expect("listed");
    assert_eq!(f.backend, "nfqueue");
    assert_eq!(f.state, "active");
    let calls = fx.calls();
    assert!(
        calls.contains(&sync_of(
            BackendKind::Nfqueue,
            "sb1",
            &["f-0000000000000001"]
        )),
        "{calls:?}"
    );
    let written = std::fs::read_to_string(fx.dir.0.join("state.json")).expect("rewritten");
    let v: serde_json::Value = serde_json::from_str(&written).expect("json");
    assert_eq!(
        v["faults"]["f-0000000000000001"]["nfqueue"], true,
        "legacy flags stay"
    );
    assert_eq!(v["sandboxes"]["sb1"]["slot"], 0);
    assert_eq!(
        fx.reg.sandboxes()[0].source,
        EnrolSource::Cni,
        "no source in an older file: enrolled through the API"
    );
}

/// An older file: the API fault reads as `api`, the birth fault as
/// `annotation`; the annotations enrolled with are those applied, so seeing
/// them again changes nothing; a change replaces only the annotation fault;
/// an invalid set changes nothing and says which field.
#[test]
fn annotation_faults_are_reconciled_apart_from_api_faults() {
    let dir = TempDir::new("annotations");
    std::fs::create_dir_all(&dir.0).expect("state dir");
    let nid = netfault_sys::netns::identify(std::path::Path::new(OWN_NETNS)).expect("own netns");
    let deadline = netfault_ebpf::boottime_ns() + 300_000_000_000;
    let fault = |id: &str, action: serde_json::Value| {
        json!({
            "id": id, "sandbox": "sb1",
            "spec": {"target": {"sandbox": "sb1"}, "direction": "both", "match": {},
                     "action": action, "duration": "5m"},
            "created_at_ms": 1, "expires_at_ms": 300001, "deadline_boot_ns": deadline,
            "rule": u32::MAX, "expired": false,
            "final_counters": {"matched": 0, "dropped": 0}
        })
    };
    let old = json!({
        "sandboxes": {"sb1": {
            "id": "sb1", "netns": OWN_NETNS, "netns_id": {"dev": nid.dev, "ino": nid.ino},
            "ifname": "eth0", "ips": [],
            "pod": {"namespace": "default", "name": "web", "uid": "u1"},
            "annotations": {"netfault.io/loss": "50", "other": "x"}, "enrolled_at_ms": 1,
            "birth_faults": ["f-0000000000000002"], "annotation_error": null, "slot": 0,
            "addresses": ["198.18.0.9"], "implicit": false, "attachment": {"created_clsact": true}
        }},
        "faults": {
            "f-0000000000000001": fault("f-0000000000000001", json!({"type": "blackhole"})),
            "f-0000000000000002": fault("f-0000000000000002", json!({"type": "loss", "percent": 50})),
        }
    });
    std::fs::write(dir.0.join("state.json"), old.to_string()).expect("write");
    let fx = open_in(dir);
    let api = "f-0000000000000001";
    let birth = "f-0000000000000002";
    assert_eq!(fx.reg.fault(api).expect("api").source, FaultSource::Api);
    assert_eq!(
        fx.reg.fault(birth).expect("birth").source,
        FaultSource::Annotation
    );
    let pod = PodRef {
        namespace: "default".into(),
        name: "web".into(),
        uid: "u1".into(),
    };
    let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // Seen again (other annotations do not count): nothing changes.
    let out = fx
        .reg
        .apply_pod_annotations(&pod, ann(&[("netfault.io/loss", "50")]))
        .expect("apply");
    assert_eq!(out, AnnotationOutcome::Unchanged);
    assert!(fx.reg.fault(birth).is_ok());
    // Invalid: nothing changes, the error names the field.
    let out = fx
        .reg
        .apply_pod_annotations(&pod, ann(&[("netfault.io/loss", "150")]))
        .expect("apply");
    let AnnotationOutcome::Invalid { error, .. } = out else {
        panic!("{out:?}")
    };
    assert!(error.contains("netfault.io/loss"), "{error}");
    assert!(fx.reg.fault(birth).is_ok() && fx.reg.fault(api).is_ok());
    assert_eq!(
        fx.reg.sandboxes()[0].annotation_error.as_deref(),
        Some(error.as_str())
    );
    // Changed: only the annotation fault is replaced.
    let out = fx
        .reg
        .apply_pod_annotations(&pod, ann(&[("netfault.io/loss", "20")]))
        .expect("apply");
    let AnnotationOutcome::Applied {
        removed, installed, ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(removed, vec![birth.to_string()]);
    assert_eq!(installed.len(), 1);
    assert!(fx.reg.fault(birth).is_err());
    assert!(fx.reg.fault(api).is_ok(), "the API fault stays");
    assert_eq!(
        fx.reg.fault(&installed[0]).expect("new").source,
        FaultSource::Annotation
    );
    assert!(fx.reg.sandboxes()[0].annotation_error.is_none());
    let now = &fx.reg.sandboxes()[0].annotations;
    assert_eq!(now.get("other").map(String::as_str), Some("x"), "{now:?}");
    assert_eq!(now.get("netfault.io/loss").map(String::as_str), Some("20"));
    // A restart reads the digest back: the same annotations change nothing.
    let dir = fx.dir;
    drop(fx.reg);
    let fx2 = open_in(dir);
    let out = fx2
        .reg
        .apply_pod_annotations(&pod, ann(&[("netfault.io/loss", "20")]))
        .expect("apply");
    assert_eq!(out, AnnotationOutcome::Unchanged);
    // Removed: the annotation fault goes.
    let out = fx2
        .reg
        .apply_pod_annotations(&pod, BTreeMap::new())
        .expect("apply");
    assert!(
        matches!(out, AnnotationOutcome::Applied { ref installed, .. } if installed.is_empty()),
        "{out:?}"
    );
    assert!(fx2.reg.fault(&installed[0]).is_err());
    let other = PodRef {
        uid: "u2".into(),
        ..pod
    };
    assert_eq!(
        fx2.reg
            .apply_pod_annotations(&other, BTreeMap::new())
            .expect("apply"),
        AnnotationOutcome::NotEnrolled
    );
}

fn adoption(name: &str, ifname: &str) -> EnrolRequest {
    EnrolRequest {
        netns: OWN_NETNS.into(),
        ifname: ifname.into(),
        ips: vec!["198.18.0.200".into()],
        pod: Some(PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }),
        annotations: Default::default(),
    }
}

#[test]
fn an_adopted_sandbox_is_enrolled_on_eth0_or_the_sole_interface_and_says_so() {
    let fx = fixture("adopt-eth0");
    let sb = fx.reg.adopt("sb-a", adoption("a", "")).expect("adopt");
    assert_eq!(sb.ifname, "eth0");
    assert_eq!(sb.source, EnrolSource::Cri);
    assert_eq!(sb.pod.as_ref().map(|p| p.uid.as_str()), Some("uid-a"));

    let other = open_with(TempDir::new("adopt-net1"), "net1");
    let sb = other.reg.adopt("sb-b", adoption("b", "")).expect("adopt");
    assert_eq!(sb.ifname, "net1", "no eth0: the sole interface");
    let named = open_with(TempDir::new("adopt-named"), "net1");
    let sb = named
        .reg
        .adopt("sb-c", adoption("c", "net1"))
        .expect("adopt on the runtime's interface");
    assert_eq!(sb.ifname, "net1");
}

#[test]
fn adopting_an_enrolled_sandbox_changes_nothing_and_keeps_its_source() {
    let fx = fixture("adopt-twice");
    fx.enrol("sb1");
    fx.clear();
    let sb = fx.reg.adopt("sb1", adoption("sb1", "")).expect("adopt");
    assert_eq!(sb.source, EnrolSource::Cni, "CNI enrolled it first");
    assert_eq!(fx.calls(), vec![], "no backend was touched");
}

#[test]
fn an_adopted_pod_is_found_by_name_and_its_source_survives_a_restart() {
    let fx = fixture("adopt-persist");
    fx.reg.adopt("sb-a", adoption("web", "")).expect("adopt");
    let body = json!({"target": {"pod": {"namespace": "default", "name": "web"}},
                      "action": loss(), "duration": "5m"});
    let f = fx
        .reg
        .create_fault(&body)
        .expect("fault on the adopted pod");
    assert_eq!(f.sandbox, "sb-a");
    let written = std::fs::read_to_string(fx.dir.0.join("state.json")).expect("state file");
    let v: serde_json::Value = serde_json::from_str(&written).expect("json");
    assert_eq!(v["sandboxes"]["sb-a"]["source"], "cri");
    let Fixture { reg, dir, .. } = fx;
    drop(reg);
    let again = open_in(dir);
    let listed = again.reg.sandboxes();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].source, EnrolSource::Cri);
    let enrolled = again.reg.enrolled();
    assert_eq!(enrolled[0].source, EnrolSource::Cri);
}

#[test]
fn pending_and_implicit_enrolments_say_how_they_came() {
    let fx = fixture("sources");
    let body = json!({"target": {"netns": OWN_NETNS}, "action": loss(), "duration": "5m"});
    fx.reg.create_fault(&body).expect("fault on a bare netns");
    let listed = fx.reg.sandboxes();
    assert_eq!(listed[0].source, EnrolSource::Netns);

    let pending = TempDir::new("pending");
    std::fs::create_dir_all(&pending.0).expect("pending dir");
    let other = fixture("sources-pending");
    let req = serde_json::to_vec(&adoption("p", "eth0")).expect("json");
    std::fs::write(pending.0.join("sb-p.json"), req).expect("pending file");
    assert_eq!(other.reg.adopt_pending(&pending.0), 1);
    assert_eq!(other.reg.sandboxes()[0].source, EnrolSource::Pending);
}

fn resource_want(generation: i64, pods: &[&str], duration: &str) -> ResourceFaults {
    let spec = FaultSpec::parse(
        &json!({"action": loss(), "duration": duration}),
        &Limits {
            max_duration: Duration::from_secs(3600),
            target_required: false,
        },
    )
    .expect("a valid spec");
    ResourceFaults {
        uid: "r-1".into(),
        namespace: "default".into(),
        name: "nf".into(),
        generation,
        created_ms: None,
        spec,
        pods: pods
            .iter()
            .map(|p| PodRef {
                namespace: "default".into(),
                name: (*p).into(),
                uid: format!("uid-{p}"),
            })
            .collect(),
    }
}

fn resource_ids(fx: &Fixture) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = fx
        .reg
        .faults()
        .into_iter()
        .filter(|f| f.source == FaultSource::Resource && f.state == "active")
        .map(|f| (f.sandbox, f.expires_at_ms))
        .collect();
    v.sort();
    v
}

/// The NetworkFault rules: the same generation (again, or after a restart)
/// changes nothing; pods in and out of the selection; a new generation
/// replaces; an API fault is untouched; removal removes all.
#[test]
fn resource_faults_follow_generation_and_selection() {
    let fx = fixture("resource");
    for sb in ["a", "b", "c"] {
        fx.enrol(sb);
    }
    let api = fx.create("a", loss(), "5m");
    let out = fx
        .reg
        .apply_resource_faults(resource_want(1, &["a", "b", "x"], "5m"))
        .expect("applied");
    assert_eq!(out.installed.len(), 2);
    assert_eq!(out.pods[2].1, PodOutcome::Pending, "x is not enrolled");
    let first = resource_ids(&fx);
    assert_eq!(first.len(), 2, "{first:?}");
    let again = fx
        .reg
        .apply_resource_faults(resource_want(1, &["a", "b", "x"], "5m"))
        .expect("again");
    assert!(again.installed.is_empty() && again.removed.is_empty());
    assert_eq!(resource_ids(&fx), first, "same generation: same faults");

    let Fixture { reg, dir, .. } = fx;
    drop(reg);
    let fx = open_in(dir);
    let out = fx
        .reg
        .apply_resource_faults(resource_want(1, &["a", "b"], "5m"))
        .expect("after a restart");
    assert!(out.installed.is_empty(), "{out:?}");
    assert_eq!(resource_ids(&fx), first, "a restart restarts nothing");

    // b leaves, c joins.
    let out = fx
        .reg
        .apply_resource_faults(resource_want(1, &["a", "c"], "5m"))
        .expect("selection changed");
    assert_eq!((out.removed.len(), out.installed.len()), (1, 1));
    let sbs: Vec<String> = resource_ids(&fx).into_iter().map(|(s, _)| s).collect();
    assert_eq!(sbs, ["a", "c"]);
    // A fault deleted through the API is not re-applied for this generation.
    let on_c = fx
        .reg
        .faults()
        .into_iter()
        .find(|f| f.sandbox == "c" && f.source == FaultSource::Resource)
        .expect("c's fault");
    fx.reg.delete_fault(&on_c.id).expect("deleted");
    let out = fx
        .reg
        .apply_resource_faults(resource_want(1, &["a", "c"], "5m"))
        .expect("again");
    assert!(out.installed.is_empty(), "{out:?}");
    assert_eq!(
        out.pods[1].1,
        PodOutcome::Expired { fault_id: None },
        "already given"
    );

    // Generation 2 replaces.
    let out = fx
        .reg
        .apply_resource_faults(resource_want(2, &["a", "c"], "5m"))
        .expect("generation 2");
    assert_eq!((out.removed.len(), out.installed.len()), (1, 2), "{out:?}");
    assert_eq!(fx.reg.fault(&api).expect("api fault").state, "active");

    let removed = fx.reg.remove_resource_faults("r-1").expect("removed");
    assert_eq!(removed.len(), 2);
    assert!(resource_ids(&fx).is_empty());
    assert!(fx.reg.resource_uids().is_empty());
    assert_eq!(fx.reg.fault(&api).expect("api fault").state, "active");
}

/// Past the resource's end nothing is applied; a pod selected later gets
/// only the remainder of the duration.
#[test]
fn resource_faults_share_one_deadline() {
    let fx = fixture("resource-deadline");
    fx.enrol("a");
    fx.enrol("b");
    let mut want = resource_want(1, &["a"], "10m");
    want.created_ms = Some(state::now_ms() - 5 * 60_000);
    let out = fx.reg.apply_resource_faults(want.clone()).expect("applied");
    let end = out.end_ms;
    want.pods = resource_want(1, &["a", "b"], "10m").pods;
    fx.reg.apply_resource_faults(want.clone()).expect("b joins");
    for (_, expires) in resource_ids(&fx) {
        assert!(expires.abs_diff(end) < 50, "{expires} vs {end}");
    }
    let mut over = resource_want(1, &["a"], "1m");
    over.uid = "r-2".into();
    over.created_ms = Some(state::now_ms() - 2 * 60_000);
    let out = fx.reg.apply_resource_faults(over).expect("applied");
    assert!(out.installed.is_empty());
    assert_eq!(out.pods[0].1, PodOutcome::Expired { fault_id: None });
}

/// A policy refusal: its code, field and rule.
fn assert_denied(r: Result<Fault, AgentError>, field: &str, rule: &str) {
    match r {
        Err(AgentError::Field(fe)) => {
            assert_eq!(fe.code, netfault_api::ErrorCode::PolicyDenied, "{fe}");
            assert_eq!(fe.field, field, "{fe}");
            assert!(fe.message.contains(rule), "{fe} names {rule}");
        }
        other => panic!("expected a refusal by {rule}, got {other:?}"),
    }
}

fn capped_policy() -> crate::policy::Policy {
    crate::policy::Policy {
        max_duration: Duration::from_secs(600),
        max_faults_per_pod: 2,
        max_loss_percent: 50.0,
        deny_namespaces: ["kube-system".to_string()].into(),
        host_netns: Vec::new(),
    }
}

#[test]
fn every_policy_cap_refuses_by_name_and_changes_nothing() {
    let fx = open_with_policy(TempDir::new("policy-caps"), "eth0", capped_policy());
    fx.enrol("sb1");
    fx.clear();
    let on = |action: serde_json::Value, duration: &str| json!({"target": {"sandbox": "sb1"}, "action": action, "duration": duration});
    let cases = [
        (on(loss(), "11m"), "duration", "--max-duration 10m"),
        (
            on(json!({"type": "loss", "percent": 80}), "5m"),
            "action.percent",
            "--max-loss-percent 50",
        ),
        (
            on(json!({"type": "blackhole"}), "5m"),
            "action.type",
            "--max-loss-percent 50",
        ),
        (
            // Long-run loss: 50/(50+10) of the time in the bad state, which
            // drops all: 83 %.
            on(
                json!({"type": "loss", "model": {"type": "gilbert-elliott",
                       "p": 50, "r": 10, "1-h": 100, "1-k": 0}}),
                "5m",
            ),
            "action.model",
            "--max-loss-percent 50",
        ),
    ];
    for (body, field, rule) in cases {
        assert_denied(fx.reg.create_fault(&body), field, rule);
    }
    assert!(fx.reg.faults().is_empty(), "nothing was installed");
    assert_eq!(fx.calls(), vec![], "no backend was touched");
    // At the caps: allowed.
    fx.reg
        .create_fault(&on(json!({"type": "loss", "percent": 50}), "10m"))
        .expect("50 % for 10m is within the caps");
    fx.reg
        .create_fault(&on(json!({"type": "corrupt", "percent": 100}), "5m"))
        .expect("corruption is not loss");
    // A third live fault on the pod is over --max-faults-per-pod 2.
    assert_denied(
        fx.reg.create_fault(&on(loss(), "5m")),
        "target",
        "--max-faults-per-pod 2",
    );
    assert_eq!(fx.reg.faults().len(), 2);
}

#[test]
fn a_denied_namespace_gets_no_faults_from_any_source() {
    let fx = open_with_policy(TempDir::new("policy-ns"), "eth0", capped_policy());
    let annotations: BTreeMap<String, String> =
        [("netfault.io/loss".to_string(), "10%".to_string())].into();
    let req = EnrolRequest {
        netns: OWN_NETNS.into(),
        ifname: "eth0".into(),
        pod: Some(PodRef {
            namespace: "kube-system".into(),
            name: "dns".into(),
            uid: "u1".into(),
        }),
        annotations: annotations.clone(),
        ..Default::default()
    };
    // Enrolment succeeds (the pod must start); the birth fault is refused.
    let sb = fx.reg.enrol("sb1", req).expect("enrolment of a denied pod");
    let why = sb.annotation_error.clone().unwrap_or_default();
    assert!(why.contains("--deny-namespace kube-system"), "{sb:?}");
    let body = json!({"target": {"pod": {"namespace": "kube-system", "name": "dns"}},
                      "action": loss(), "duration": "5m"});
    assert_denied(
        fx.reg.create_fault(&body),
        "target.pod.namespace",
        "--deny-namespace kube-system",
    );
    let body = json!({"target": {"sandbox": "sb1"}, "action": loss(), "duration": "5m"});
    assert_denied(
        fx.reg.create_fault(&body),
        "target",
        "--deny-namespace kube-system",
    );
    let pod = PodRef {
        namespace: "kube-system".into(),
        name: "dns".into(),
        uid: "u1".into(),
    };
    let mut changed = annotations;
    changed.insert("netfault.io/loss".into(), "20%".into());
    fx.reg
        .apply_pod_annotations(&pod, changed)
        .expect("annotation change");
    let mut want = resource_want(1, &["dns"], "5m");
    want.pods[0].namespace = "kube-system".into();
    want.pods[0].uid = "u1".into();
    let out = fx.reg.apply_resource_faults(want).expect("resource");
    assert!(
        matches!(&out.pods[0].1, PodOutcome::Failed { error } if error.contains("--deny-namespace")),
        "{out:?}"
    );
    assert!(fx.reg.faults().is_empty(), "no source got a fault in");
}

#[test]
fn the_host_netns_is_never_enrolled_nor_targeted() {
    let own = netfault_sys::netns::identify(std::path::Path::new(OWN_NETNS)).expect("own netns");
    let policy = crate::policy::Policy {
        host_netns: vec![(OWN_NETNS.into(), own)],
        ..crate::policy::Policy::default()
    };
    let fx = open_with_policy(TempDir::new("policy-host"), "eth0", policy);
    let req = EnrolRequest {
        netns: OWN_NETNS.into(),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let r = fx.reg.enrol("sb1", req.clone()).map(|_| ());
    assert!(
        matches!(&r, Err(AgentError::Field(fe)) if fe.code == netfault_api::ErrorCode::PolicyDenied && fe.field == "netns"),
        "{r:?}"
    );
    let r = fx.reg.adopt("sb2", req).map(|_| ());
    assert!(
        matches!(&r, Err(AgentError::Field(fe)) if fe.field == "netns"),
        "{r:?}"
    );
    let body = json!({"target": {"netns": OWN_NETNS}, "action": loss(), "duration": "5m"});
    assert_denied(
        fx.reg.create_fault(&body),
        "target.netns",
        "host network namespace",
    );
    assert!(fx.reg.sandboxes().is_empty());
    assert_eq!(fx.calls(), vec![], "no backend was touched");
}
