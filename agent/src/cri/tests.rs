//! The adopter's passes against a fake runtime and a registry over fake
//! backends (no root): what is adopted, what is released, how passes are
//! shared, and how an unreachable runtime is handled.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netfault_api::{DelayAction, EnrolRequest, EnrolSource, PacketAction, PodRef, ProxyAction};
use netfault_cri::api;
use netfault_sys::netns::{Netns, NetnsError};

use super::*;
use crate::backend::fake::FakeBackend;
use crate::backend::Backends;
use crate::registry::{Config, Host};

const OWN_NETNS: &str = "/proc/self/ns/net";

/// Every netns has `eth0`, with a fresh address each time it is asked.
struct FakeHost(AtomicU8);

impl Host for FakeHost {
    fn addresses(&self, _: &Netns, _: &str) -> Result<Result<Vec<IpAddr>, String>, NetnsError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Ok(vec![IpAddr::V4(Ipv4Addr::new(198, 18, 1, n))]))
    }

    fn sole_interface(&self, _: &Netns) -> Result<Result<String, String>, NetnsError> {
        Ok(Ok("eth0".into()))
    }
}

#[derive(Clone)]
struct Pod {
    id: String,
    name: String,
    ready: bool,
    host_network: bool,
    netns: &'static str,
}

/// The runtime's sandboxes, what it was asked, and whether it answers.
#[derive(Default)]
struct World {
    pods: Mutex<Vec<Pod>>,
    up: std::sync::atomic::AtomicBool,
    connects: AtomicUsize,
    lists: AtomicUsize,
    statuses: AtomicUsize,
    /// How long a listing takes (ms).
    list_ms: std::sync::atomic::AtomicU64,
}

impl World {
    fn add(&self, id: &str, ready: bool, host_network: bool) {
        self.add_in(id, ready, host_network, OWN_NETNS);
    }

    fn add_in(&self, id: &str, ready: bool, host_network: bool, netns: &'static str) {
        let mut pods = self.pods.lock().expect("pods");
        pods.retain(|p| p.id != id);
        pods.push(Pod {
            id: id.into(),
            name: format!("pod-{id}"),
            ready,
            host_network,
            netns,
        });
    }

    fn remove(&self, id: &str) {
        self.pods.lock().expect("pods").retain(|p| p.id != id);
    }

    fn unavailable(call: &'static str) -> CriError {
        CriError::Call {
            call,
            status: Box::new(tonic_status_unavailable()),
        }
    }
}

fn tonic_status_unavailable() -> netfault_cri::Status {
    netfault_cri::Status::unavailable("the runtime is down")
}

struct FakeRuntime(Arc<World>);

impl Runtime for FakeRuntime {
    fn version(&self) -> BoxFut<Result<(String, String), CriError>> {
        Box::pin(async { Ok(("fake".to_string(), "1.0".to_string())) })
    }

    fn sandboxes(&self) -> BoxFut<Result<Vec<api::PodSandbox>, CriError>> {
        let w = self.0.clone();
        Box::pin(async move {
            w.lists.fetch_add(1, Ordering::SeqCst);
            let ms = w.list_ms.load(Ordering::SeqCst);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if !w.up.load(Ordering::SeqCst) {
                return Err(World::unavailable("ListPodSandbox"));
            }
            let pods = w.pods.lock().expect("pods").clone();
            Ok(pods
                .iter()
                .map(|p| api::PodSandbox {
                    id: p.id.clone(),
                    state: if p.ready {
                        api::PodSandboxState::SandboxReady as i32
                    } else {
                        api::PodSandboxState::SandboxNotready as i32
                    },
                    ..Default::default()
                })
                .collect())
        })
    }

    fn status(&self, id: String) -> BoxFut<Result<StatusReply, CriError>> {
        let w = self.0.clone();
        Box::pin(async move {
            w.statuses.fetch_add(1, Ordering::SeqCst);
            let pod = w
                .pods
                .lock()
                .expect("pods")
                .iter()
                .find(|p| p.id == id)
                .cloned();
            let Some(p) = pod else {
                return Err(CriError::Call {
                    call: "PodSandboxStatus",
                    status: Box::new(netfault_cri::Status::not_found("no such sandbox")),
                });
            };
            let mode = if p.host_network {
                api::NamespaceMode::Node
            } else {
                api::NamespaceMode::Pod
            };
            let namespaces = if p.host_network {
                serde_json::json!([{"type": "pid"}])
            } else {
                serde_json::json!([{"type": "network", "path": p.netns}])
            };
            let status = api::PodSandboxStatus {
                id: p.id.clone(),
                metadata: Some(api::PodSandboxMetadata {
                    name: p.name.clone(),
                    uid: format!("uid-{}", p.id),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                state: api::PodSandboxState::SandboxReady as i32,
                linux: Some(api::LinuxPodSandboxStatus {
                    namespaces: Some(api::Namespace {
                        options: Some(api::NamespaceOption {
                            network: mode as i32,
                            ..Default::default()
                        }),
                    }),
                }),
                ..Default::default()
            };
            let info = serde_json::json!({"runtimeSpec": {"linux": {"namespaces": namespaces}}});
            Ok((
                status,
                HashMap::from([("info".to_string(), info.to_string())]),
            ))
        })
    }
}

struct FakeConnect(Arc<World>);

impl Connect for FakeConnect {
    fn connect(&self) -> BoxFut<Result<Arc<dyn Runtime>, CriError>> {
        let w = self.0.clone();
        Box::pin(async move {
            w.connects.fetch_add(1, Ordering::SeqCst);
            if !w.up.load(Ordering::SeqCst) {
                return Err(World::unavailable("Version"));
            }
            Ok(Arc::new(FakeRuntime(w)) as Arc<dyn Runtime>)
        })
    }
}

struct Fixture {
    world: Arc<World>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    adopter: Arc<Adopter>,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(name: &str) -> Fixture {
    let r: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!("netfault-cri-{name}-{r:x}"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let backends = Backends {
        ebpf: Box::new(FakeBackend::<PacketAction>::new(&log)),
        nfqueue: Box::new(FakeBackend::<DelayAction>::new(&log)),
        proxy: Box::new(FakeBackend::<ProxyAction>::new(&log)),
    };
    let cfg = Config {
        state_dir: dir.clone(),
        // The tests' netns is the host's: that rule is tested on its own.
        policy: crate::policy::Policy {
            max_duration: Duration::from_secs(3600),
            host_netns: Vec::new(),
            ..crate::policy::Policy::default()
        },
        retain_expired: Duration::from_secs(600),
        freeze_limit: Duration::from_secs(30),
    };
    let registry = Arc::new(
        Registry::with_parts(cfg, backends, Box::new(FakeHost(AtomicU8::new(2))))
            .expect("registry"),
    );
    let world = Arc::new(World::default());
    world.up.store(true, Ordering::SeqCst);
    let metrics = Arc::new(Metrics::default());
    let adopter = Adopter::with_connector(
        CriConfig {
            socket: PathBuf::from("/fake/cri.sock"),
            poll: Duration::from_millis(50),
            call_timeout: Duration::from_secs(1),
        },
        Box::new(FakeConnect(world.clone())),
        registry.clone(),
        metrics.clone(),
    );
    Fixture {
        world,
        registry,
        metrics,
        adopter,
        dir,
    }
}

impl Fixture {
    /// (id, source) of every enrolled sandbox, sorted.
    fn enrolled(&self) -> Vec<(String, EnrolSource)> {
        let mut v: Vec<_> = self
            .registry
            .sandboxes()
            .into_iter()
            .map(|s| (s.id, s.source))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    async fn pass(&self) -> PassOutcome {
        self.adopter.refresh().await.expect("pass")
    }
}

#[tokio::test]
async fn a_pass_adopts_ready_pod_sandboxes_with_their_pod_but_not_host_network_or_not_ready_ones() {
    let fx = fixture("adopt");
    fx.world.add("a", true, false);
    fx.world.add("stopped", false, false);
    fx.world.add("host", true, true);
    assert_eq!(
        fx.pass().await,
        PassOutcome {
            adopted: 1,
            released: 0
        }
    );
    assert_eq!(fx.enrolled(), [("a".to_string(), EnrolSource::Cri)]);
    let sb = &fx.registry.sandboxes()[0];
    assert_eq!(
        sb.pod,
        Some(PodRef {
            namespace: "default".into(),
            name: "pod-a".into(),
            uid: "uid-a".into()
        })
    );
    assert_eq!(sb.ifname, "eth0");
    // Nothing new: the next pass asks no status (not even the host-network
    // sandbox's again) and adopts nothing.
    let asked = fx.world.statuses.load(Ordering::SeqCst);
    assert_eq!(asked, 2, "a and host were asked once");
    assert_eq!(fx.pass().await, PassOutcome::default());
    assert_eq!(fx.world.statuses.load(Ordering::SeqCst), asked);
    assert_eq!(fx.metrics.cri.adopted.load(Ordering::SeqCst), 1);
    let caps = fx.adopter.capabilities();
    assert_eq!(caps["connected"], true);
    assert_eq!(caps["adopted"], 1);
    assert_eq!(caps["runtime"]["name"], "fake");
}

#[tokio::test]
async fn sandboxes_the_runtime_stops_or_forgets_are_released_but_not_a_cni_one_it_never_listed() {
    let fx = fixture("release");
    let cni = EnrolRequest {
        netns: OWN_NETNS.into(),
        ifname: "eth0".into(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: "elsewhere".into(),
            uid: String::new(),
        }),
        ..Default::default()
    };
    fx.registry.enrol("cni-other", cni).expect("CNI enrolment");
    fx.world.add("a", true, false);
    fx.world.add("b", true, false);
    fx.pass().await;
    assert_eq!(fx.enrolled().len(), 3);

    fx.world.add("a", false, false); // StopPodSandbox
    fx.world.remove("b"); // RemovePodSandbox
    assert_eq!(
        fx.pass().await,
        PassOutcome {
            adopted: 0,
            released: 2
        }
    );
    assert_eq!(fx.enrolled(), [("cni-other".to_string(), EnrolSource::Cni)]);
    assert_eq!(fx.metrics.cri.released.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refresh_asked_during_a_pass_is_served_by_a_pass_that_lists_after_it() {
    let fx = fixture("after");
    fx.world.list_ms.store(300, Ordering::SeqCst);
    let a = fx.adopter.clone();
    let running = tokio::spawn(async move { a.refresh().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The running pass has listed already; the pod appears now.
    fx.world.add("late", true, false);
    fx.adopter.refresh().await.expect("refresh");
    assert_eq!(fx.enrolled(), [("late".to_string(), EnrolSource::Cri)]);
    running.await.expect("join").expect("first pass");
}

#[tokio::test]
async fn concurrent_refreshes_share_passes() {
    let fx = fixture("coalesce");
    fx.world.add("a", true, false);
    fx.world.list_ms.store(200, Ordering::SeqCst);
    let a = fx.adopter.clone();
    let first = tokio::spawn(async move { a.refresh().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let a = fx.adopter.clone();
            tokio::spawn(async move { a.refresh().await })
        })
        .collect();
    for w in waiting {
        w.await.expect("join").expect("refresh");
    }
    first.await.expect("join").expect("refresh");
    assert_eq!(
        fx.world.lists.load(Ordering::SeqCst),
        2,
        "the 20 that asked during the first pass share the second"
    );
    assert_eq!(fx.enrolled().len(), 1);
}

#[tokio::test]
async fn a_refresh_within_a_budget_gives_up_but_the_pass_finishes() {
    let fx = fixture("budget");
    fx.world.add("slow", true, false);
    fx.world.list_ms.store(400, Ordering::SeqCst);
    assert!(
        !fx.adopter.refresh_within(Duration::from_millis(100)).await,
        "over budget"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(fx.enrolled().len(), 1, "the pass ran to its end");
    fx.world.list_ms.store(0, Ordering::SeqCst);
    assert!(fx.adopter.refresh_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn an_unreachable_runtime_is_reported_retried_and_adopted_from_once_up() {
    let fx = fixture("down");
    fx.world.up.store(false, Ordering::SeqCst);
    fx.world.add("a", true, false);
    assert!(fx.adopter.refresh().await.is_err());
    assert!(fx.adopter.refresh().await.is_err());
    let caps = fx.adopter.capabilities();
    assert_eq!(caps["connected"], false);
    assert!(
        caps["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("down")),
        "{caps}"
    );
    assert_eq!(fx.metrics.cri.errors.load(Ordering::SeqCst), 2);
    assert_eq!(fx.world.connects.load(Ordering::SeqCst), 2, "retried");
    assert!(fx.enrolled().is_empty());

    fx.world.up.store(true, Ordering::SeqCst);
    fx.pass().await;
    assert_eq!(fx.enrolled().len(), 1);
    let caps = fx.adopter.capabilities();
    assert_eq!(caps["connected"], true);
    assert!(caps["last_error"].is_null());

    // A listing that fails releases nothing, and the connection is redone.
    fx.world.up.store(false, Ordering::SeqCst);
    assert!(fx.adopter.refresh().await.is_err());
    assert_eq!(fx.enrolled().len(), 1, "no release on a failed listing");
    fx.world.up.store(true, Ordering::SeqCst);
    let connects = fx.world.connects.load(Ordering::SeqCst);
    fx.pass().await;
    assert_eq!(fx.world.connects.load(Ordering::SeqCst), connects + 1);
}

#[tokio::test]
async fn the_poll_loop_backs_off_while_the_runtime_is_down() {
    let fx = fixture("backoff");
    fx.world.up.store(false, Ordering::SeqCst);
    let run = tokio::spawn(fx.adopter.clone().run());
    // poll 50 ms: tries at 0, +100, +300, +700 ms (the wait doubles), not 20 times.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let tries = fx.world.connects.load(Ordering::SeqCst);
    assert!((3..=6).contains(&tries), "{tries} connects in 1 s");
    fx.world.up.store(true, Ordering::SeqCst);
    fx.world.add("a", true, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fx.enrolled().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.abort();
    assert_eq!(fx.enrolled().len(), 1, "adopted once the runtime is up");
}

fn view() -> SandboxView {
    SandboxView {
        id: "sb".into(),
        ready: true,
        namespace: "ns".into(),
        name: "web".into(),
        uid: "u1".into(),
        annotations: BTreeMap::from([("netfault.io/loss".into(), "10%".into())]),
        ips: vec!["198.18.0.7".parse().expect("ip")],
        netns: Some("/var/run/netns/cni-1".into()),
        host_network: false,
        netns_closed: false,
        ifname: Some("eth0".into()),
    }
}

#[test]
fn a_pod_sandbox_becomes_an_enrolment_with_its_pod_and_annotations() {
    let req = enrol_request(&view()).expect("enrolment");
    assert_eq!(req.netns, "/var/run/netns/cni-1");
    assert_eq!(req.ifname, "eth0");
    assert_eq!(req.ips, ["198.18.0.7"]);
    assert_eq!(
        req.pod,
        Some(PodRef {
            namespace: "ns".into(),
            name: "web".into(),
            uid: "u1".into()
        })
    );
    assert_eq!(req.annotations["netfault.io/loss"], "10%");
    let unnamed = SandboxView {
        ifname: None,
        ..view()
    };
    assert_eq!(
        enrol_request(&unnamed).expect("enrolment").ifname,
        "",
        "the registry picks the interface"
    );
}

#[test]
fn host_network_and_netns_less_sandboxes_are_not_adopted() {
    let host = SandboxView {
        host_network: true,
        netns: None,
        ..view()
    };
    assert!(enrol_request(&host)
        .expect_err("host")
        .contains("hostNetwork"));
    let none = SandboxView {
        netns: None,
        ..view()
    };
    assert!(enrol_request(&none).is_err());
    let closed = SandboxView {
        netns_closed: true,
        ..view()
    };
    assert!(enrol_request(&closed).is_err());
}

#[tokio::test]
async fn a_refused_adoption_is_retried_on_every_pass() {
    let fx = fixture("refused");
    fx.world
        .add_in("gone", true, false, "/nonexistent/netfault-netns");
    assert_eq!(fx.pass().await, PassOutcome::default());
    assert_eq!(fx.metrics.cri.errors.load(Ordering::SeqCst), 1);
    fx.pass().await;
    assert_eq!(fx.world.statuses.load(Ordering::SeqCst), 2, "asked again");
    assert_eq!(fx.metrics.cri.errors.load(Ordering::SeqCst), 2);
    // Fixed on the runtime's side: adopted.
    fx.world.add("gone", true, false);
    assert_eq!(fx.pass().await.adopted, 1);
}

#[tokio::test]
async fn callers_that_share_a_failed_pass_get_its_error() {
    let fx = fixture("shared-error");
    fx.pass().await;
    fx.world.up.store(false, Ordering::SeqCst);
    fx.world.list_ms.store(200, Ordering::SeqCst);
    let a = fx.adopter.clone();
    let first = tokio::spawn(async move { a.refresh().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let a = fx.adopter.clone();
            tokio::spawn(async move { a.refresh().await })
        })
        .collect();
    assert!(first.await.expect("join").is_err());
    for w in waiting {
        let r = w.await.expect("join");
        assert!(
            r.as_ref().is_err_and(|e| e.to_string().contains("down")),
            "{r:?}"
        );
    }
    assert!(
        !fx.adopter.refresh_within(Duration::from_secs(1)).await,
        "a failed pass is not a refresh"
    );
}
