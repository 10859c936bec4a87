//! `netfaultctl --kube`: reaching a node agent's API from outside the
//! cluster, through the Kubernetes API server only.
//!
//! What it owns: the Kubernetes client (kubeconfig, context, in-cluster),
//! the way from a fault's pod target to its node (`spec.nodeName`), from a
//! node to the agent pod on it (the DaemonSet's labels, Running and Ready),
//! the API token from the Secret `netfault-api-token`, and the bridge: a
//! listener on `127.0.0.1:0` inside netfaultctl whose every connection is
//! carried by one `pods/portforward` to the agent pod's TCP listener, so the
//! agent's API is then spoken by the ordinary [`netfault_api::Client`] over
//! `http://127.0.0.1:PORT`.
//!
//! What it must not do: speak the agent's API itself, or ask the API server
//! for anything beyond what daemonset/test-suite-rbac.yaml grants: `get`
//! pods (targets), `list` pods in the agent namespace, `create`
//! `pods/portforward` on agent pods, `get` the one Secret.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::kube::api::{Api, ListParams};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::{Client, Config};
use k8s_openapi::api::core::v1::{Pod, Secret};
use tokio::net::{TcpListener, TcpStream};

/// The DaemonSet's namespace and the TCP listener's port in it
/// (daemonset/daemonset.yaml).
pub const AGENT_NAMESPACE: &str = "netfault";
pub const AGENT_PORT: u16 = 7979;
/// The labels of the DaemonSet's agent pods.
pub const AGENT_SELECTOR: &str =
    "app.kubernetes.io/name=netfault,app.kubernetes.io/component=agent";
const AGENT_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "netfault"),
    ("app.kubernetes.io/component", "agent"),
];
/// The Secret holding the API token, and its key.
pub const TOKEN_SECRET: &str = "netfault-api-token";
pub const TOKEN_KEY: &str = "token";

/// Bounds every call to the API server, the port-forward's upgrade included.
const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the cluster is and where the agents are.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kubeconfig`; `None`: KUBECONFIG, ~/.kube/config, or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`; `None`: the kubeconfig's current context.
    pub context: Option<String>,
    /// `--agent-namespace`.
    pub agent_namespace: String,
    /// `--agent-port`.
    pub agent_port: u16,
}

/// Why `--kube` could not reach an agent. Each names what is missing.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {detail}")]
    Api { what: String, detail: String },
    #[error("pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error("pod {namespace}/{name} is not scheduled on a node yet (no spec.nodeName)")]
    NotScheduled { namespace: String, name: String },
    #[error("no netfault agent on node {node}: no pod in namespace {namespace} with labels {AGENT_SELECTOR} and spec.nodeName={node} (is the DaemonSet installed, in that namespace (--agent-namespace), and does it tolerate the node's taints?)")]
    NoAgent { node: String, namespace: String },
    #[error("the netfault agent on node {node} is not ready: {detail}")]
    AgentNotReady { node: String, detail: String },
    #[error("{0}")]
    Token(String),
    #[error("port-forward to {pod}:{port} failed: {detail}")]
    PortForward {
        pod: String,
        port: u16,
        detail: String,
    },
}

/// An agent pod chosen to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

impl AgentPod {
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `--pod NS/NAME` (or `NAME`, in `default`, as a fault's pod target).
pub fn parse_pod_ref(value: &str) -> Result<(String, String), String> {
    let (ns, name) = match value.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => ("default", value),
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !ok(ns) || !ok(name) || name.contains('/') {
        return Err(format!(
            "{value:?} is not NAMESPACE/NAME (or NAME, in namespace default) of a pod"
        ));
    }
    Ok((ns.to_string(), name.to_string()))
}

/// The node a pod runs on.
pub fn node_of(pod: &Pod, namespace: &str, name: &str) -> Result<String, KubeError> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| KubeError::NotScheduled {
            namespace: namespace.into(),
            name: name.into(),
        })
}

fn is_agent_on(pod: &Pod, node: &str) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let labelled = AGENT_LABELS
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(*k)).is_some_and(|x| x == v));
    let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    labelled && on
}

/// Why an agent pod cannot be used, or `None` when it can: Running, Ready,
/// not being deleted.
fn not_ready(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("terminating".into());
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return Some(format!("phase {phase}"));
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    match ready {
        Some("True") => None,
        other => Some(format!(
            "Running but not Ready ({})",
            other.unwrap_or("no Ready condition")
        )),
    }
}

/// Picks the agent pod on `node` among `pods` (a list that should already be
/// filtered by labels and node; this checks both again): a ready one, by
/// name for a stable choice during a rolling update.
pub fn choose_agent(pods: &[Pod], node: &str, namespace: &str) -> Result<AgentPod, KubeError> {
    let mut ready: Vec<String> = Vec::new();
    let mut unready: Vec<String> = Vec::new();
    for p in pods.iter().filter(|p| is_agent_on(p, node)) {
        let name = p.metadata.name.clone().unwrap_or_default();
        match not_ready(p) {
            None => ready.push(name),
            Some(why) => unready.push(format!("{namespace}/{name}: {why}")),
        }
    }
    ready.sort();
    match ready.into_iter().next() {
        Some(name) => Ok(AgentPod {
            namespace: namespace.into(),
            name,
            node: node.into(),
        }),
        None if unready.is_empty() => Err(KubeError::NoAgent {
            node: node.into(),
            namespace: namespace.into(),
        }),
        None => Err(KubeError::AgentNotReady {
            node: node.into(),
            detail: unready.join("; "),
        }),
    }
}

/// A Kubernetes API error as one line, with what RBAC to check on 403.
fn describe(e: &::kube::Error) -> String {
    match e {
        ::kube::Error::Api(s) if s.is_forbidden() => format!(
            "forbidden: {} (see daemonset/test-suite-rbac.yaml for what --kube needs)",
            s.message
        ),
        ::kube::Error::Api(s) if s.message.is_empty() => format!("HTTP {} {}", s.code, s.reason),
        ::kube::Error::Api(s) => format!("{} (HTTP {})", s.message, s.code),
        other => other.to_string(),
    }
}

fn is_not_found(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.is_not_found())
}

/// A connected session with the cluster; its runtime also drives the
/// bridges.
pub struct Kube {
    rt: tokio::runtime::Runtime,
    client: Client,
    opts: KubeOptions,
}

impl Kube {
    pub fn connect(opts: KubeOptions) -> Result<Kube, KubeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| KubeError::Config(format!("cannot start the async runtime: {e}")))?;
        let config = rt.block_on(config_of(&opts))?;
        let client = {
            let _guard = rt.enter();
            Client::try_from(config).map_err(|e| {
                KubeError::Config(format!("cannot build the Kubernetes client: {e}"))
            })?
        };
        Ok(Kube { rt, client, opts })
    }

    /// Runs one API call, bounded by [`API_TIMEOUT`] (`what` names it in
    /// the timeout's error); the API's own error is the caller's to map.
    fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, ::kube::Error>>,
    ) -> Result<Result<T, ::kube::Error>, KubeError> {
        self.rt
            .block_on(async move { tokio::time::timeout(API_TIMEOUT, f).await })
            .map_err(|_| KubeError::Api {
                what: what.into(),
                detail: format!("no answer from the API server within {API_TIMEOUT:?}"),
            })
    }

    /// The node pod `namespace/name` runs on.
    pub fn node_of_pod(&self, namespace: &str, name: &str) -> Result<String, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("getting pod {namespace}/{name}");
        let pod = match self.call(&what, api.get(name))? {
            Ok(p) => p,
            Err(e) if is_not_found(&e) => {
                return Err(KubeError::PodNotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            Err(e) => {
                return Err(KubeError::Api {
                    what,
                    detail: describe(&e),
                })
            }
        };
        node_of(&pod, namespace, name)
    }

    fn list_agents(&self, node: Option<&str>) -> Result<Vec<Pod>, KubeError> {
        let ns = &self.opts.agent_namespace;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut lp = ListParams::default().labels(AGENT_SELECTOR);
        let selector;
        if let Some(n) = node {
            selector = format!("spec.nodeName={n}");
            lp = lp.fields(&selector);
        }
        let what = format!("listing the netfault agent pods in namespace {ns}");
        match self.call(&what, api.list(&lp))? {
            Ok(list) => Ok(list.items),
            Err(e) => Err(KubeError::Api {
                what,
                detail: describe(&e),
            }),
        }
    }

    /// The agent pod on `node`.
    pub fn agent_on(&self, node: &str) -> Result<AgentPod, KubeError> {
        let pods = self.list_agents(Some(node))?;
        choose_agent(&pods, node, &self.opts.agent_namespace)
    }

    /// Every node's agent: the ready ones, and why the others cannot be used.
    pub fn all_agents(&self) -> Result<(Vec<AgentPod>, Vec<KubeError>), KubeError> {
        let pods = self.list_agents(None)?;
        let nodes: BTreeMap<String, ()> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .map(|n| (n, ()))
            .collect();
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for node in nodes.keys() {
            match choose_agent(&pods, node, &self.opts.agent_namespace) {
                Ok(a) => ok.push(a),
                Err(e) => bad.push(e),
            }
        }
        if ok.is_empty() && bad.is_empty() {
            return Err(KubeError::Config(format!(
                "no netfault agent pods in namespace {} (labels {AGENT_SELECTOR}): is the DaemonSet installed there (--agent-namespace)?",
                self.opts.agent_namespace
            )));
        }
        Ok((ok, bad))
    }

    /// The API token from the Secret `netfault-api-token` (key `token`).
    pub fn token(&self) -> Result<String, KubeError> {
        let ns = &self.opts.agent_namespace;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let create = format!(
            "kubectl -n {ns} create secret generic {TOKEN_SECRET} --from-literal={TOKEN_KEY}=\"$(head -c 32 /dev/urandom | base64 | tr -d '/+=')\""
        );
        let what = format!("reading Secret {ns}/{TOKEN_SECRET}");
        let secret = match self.call(&what, api.get(TOKEN_SECRET))? {
            Ok(s) => s,
            Err(e) if is_not_found(&e) => {
                return Err(KubeError::Token(format!(
                    "no API token: Secret {ns}/{TOKEN_SECRET} not found. Create it ({create}) or pass --token-file"
                )))
            }
            Err(e) => {
                return Err(KubeError::Token(format!(
                    "cannot read the API token from Secret {ns}/{TOKEN_SECRET}: {}; pass --token-file instead",
                    describe(&e)
                )))
            }
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(TOKEN_KEY))
            .map(|b| b.0.clone())
            .ok_or_else(|| {
                KubeError::Token(format!(
                    "Secret {ns}/{TOKEN_SECRET} has no key {TOKEN_KEY:?}; recreate it ({create})"
                ))
            })?;
        let token = bytes.trim_ascii();
        if token.is_empty() || !token.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(KubeError::Token(format!(
                "Secret {ns}/{TOKEN_SECRET} key {TOKEN_KEY:?}: the token must be non-empty printable ASCII without spaces"
            )));
        }
        Ok(String::from_utf8_lossy(token).into_owned())
    }

    /// A local listener whose connections are port-forwarded to `agent`'s
    /// TCP listener (one `pods/portforward` per connection).
    pub fn bridge(&self, agent: &AgentPod) -> Result<Bridge, KubeError> {
        let port = self.opts.agent_port;
        let listener = self
            .rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .and_then(|l| Ok((l.local_addr()?, l)));
        let (addr, listener) = listener.map_err(|e| KubeError::PortForward {
            pod: agent.label(),
            port,
            detail: format!("cannot listen on 127.0.0.1: {e}"),
        })?;
        let state = Arc::new(BridgeState::default());
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &agent.namespace);
        self.rt.spawn(accept_loop(
            listener,
            api,
            agent.name.clone(),
            port,
            state.clone(),
        ));
        Ok(Bridge {
            url: format!("http://{addr}"),
            agent: agent.clone(),
            port,
            state,
        })
    }
}

async fn config_of(opts: &KubeOptions) -> Result<Config, KubeError> {
    let options = KubeConfigOptions {
        context: opts.context.clone(),
        ..KubeConfigOptions::default()
    };
    match (&opts.kubeconfig, &opts.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                KubeError::Config(format!("--kubeconfig {}: {e}", path.display()))
            })?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| KubeError::Config(format!("--kubeconfig {}: {e}", path.display())))
        }
        (None, Some(ctx)) => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| KubeError::Config(format!("--context {ctx}: {e}"))),
        (None, None) => Config::infer().await.map_err(|e| {
            KubeError::Config(format!(
                "no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster): {e}; use --kubeconfig"
            ))
        }),
    }
}

#[derive(Default)]
struct BridgeState {
    /// Connections accepted and not finished.
    in_flight: Mutex<usize>,
    /// Why port-forwards failed, oldest first.
    errors: Mutex<Vec<String>>,
}

impl BridgeState {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A local URL that reaches one agent's TCP listener.
pub struct Bridge {
    pub url: String,
    pub agent: AgentPod,
    pub port: u16,
    state: Arc<BridgeState>,
}

impl Bridge {
    /// The port-forward error behind a failed request, if there was one:
    /// waits (up to 5 s) for the connections in flight to finish, so the
    /// reason the API server or kubelet gave is not lost to a race.
    pub fn failure(&self) -> Option<KubeError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while *BridgeState::lock(&self.state.in_flight) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let errors = std::mem::take(&mut *BridgeState::lock(&self.state.errors));
        errors
            .into_iter()
            .last()
            .map(|detail| KubeError::PortForward {
                pod: self.agent.label(),
                port: self.port,
                detail,
            })
    }
}

async fn accept_loop(
    listener: TcpListener,
    api: Api<Pod>,
    pod: String,
    port: u16,
    state: Arc<BridgeState>,
) {
    loop {
        let Ok((local, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        *BridgeState::lock(&state.in_flight) += 1;
        let (api, pod, state) = (api.clone(), pod.clone(), state.clone());
        tokio::spawn(async move {
            if let Err(e) = forward(&api, &pod, port, local).await {
                BridgeState::lock(&state.errors).push(e);
            }
            let mut n = BridgeState::lock(&state.in_flight);
            *n = n.saturating_sub(1);
        });
    }
}

/// Carries one local connection over one port-forward. The error is what
/// the API server or the kubelet said (a refused upgrade, or a message on
/// the port's error channel).
async fn forward(api: &Api<Pod>, pod: &str, port: u16, mut local: TcpStream) -> Result<(), String> {
    let mut pf = match tokio::time::timeout(API_TIMEOUT, api.portforward(pod, &[port])).await {
        Err(_) => {
            return Err(format!(
                "no answer from the API server within {API_TIMEOUT:?}"
            ))
        }
        Ok(Err(e)) => return Err(describe(&e)),
        Ok(Ok(pf)) => pf,
    };
    let (Some(mut remote), Some(error)) = (pf.take_stream(port), pf.take_error(port)) else {
        pf.abort();
        return Err("the port-forward has no stream for the port".into());
    };
    let failure = {
        let copy = tokio::io::copy_bidirectional(&mut local, &mut remote);
        tokio::pin!(copy);
        tokio::pin!(error);
        // The error channel is checked first: its message arrives before the
        // stream closes, and must be recorded before the client sees the
        // close (the caller waits for this task before reading errors).
        tokio::select! {
            biased;
            msg = &mut error => {
                if msg.is_none() {
                    // The error channel closed without a message: the data goes on.
                    let _ = copy.await;
                }
                msg
            }
            // A message racing the close is still taken.
            _ = &mut copy => tokio::time::timeout(Duration::from_millis(200), &mut error)
                .await
                .ok()
                .flatten(),
        }
    };
    drop(local);
    drop(remote);
    // The websocket's end; one the API server does not close is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), pf.join()).await;
    match failure {
        Some(m) => Err(m),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, node: &str, labels: &[(&str, &str)], phase: &str, ready: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("netfault".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn agent(name: &str, node: &str, phase: &str, ready: &str) -> Pod {
        pod(name, node, &AGENT_LABELS, phase, ready)
    }

    #[test]
    fn the_ready_agent_on_the_node_is_chosen() {
        let pods = vec![
            agent("netfault-b", "node-2", "Running", "True"),
            // Not an agent: the labels differ.
            pod(
                "web",
                "node-1",
                &[("app.kubernetes.io/name", "netfault")],
                "Running",
                "True",
            ),
            agent("netfault-z", "node-1", "Pending", "False"),
            agent("netfault-a", "node-1", "Running", "True"),
        ];
        let a = choose_agent(&pods, "node-1", "netfault").expect("an agent");
        assert_eq!(
            a,
            AgentPod {
                namespace: "netfault".into(),
                name: "netfault-a".into(),
                node: "node-1".into()
            }
        );
        assert_eq!(a.label(), "netfault/netfault-a");
        let b = choose_agent(&pods, "node-2", "netfault").expect("an agent");
        assert_eq!(b.name, "netfault-b");
    }

    #[test]
    fn a_node_without_a_ready_agent_is_named() {
        let pods = vec![
            agent("netfault-a", "node-1", "Running", "True"),
            agent("netfault-p", "node-3", "Pending", "False"),
            agent("netfault-r", "node-4", "Running", "False"),
        ];
        let e = choose_agent(&pods, "node-2", "netfault").expect_err("none on node-2");
        assert!(matches!(e, KubeError::NoAgent { .. }), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with("no netfault agent on node node-2"),
            "{shown}"
        );
        assert!(shown.contains(AGENT_SELECTOR), "{shown}");
        let e = choose_agent(&pods, "node-3", "netfault").expect_err("pending");
        assert_eq!(
            e.to_string(),
            "the netfault agent on node node-3 is not ready: netfault/netfault-p: phase Pending"
        );
        let e = choose_agent(&pods, "node-4", "netfault").expect_err("not ready");
        assert!(
            e.to_string().contains("Running but not Ready (False)"),
            "{e}"
        );
        let mut dying = agent("netfault-d", "node-5", "Running", "True");
        dying.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let e = choose_agent(&[dying], "node-5", "netfault").expect_err("terminating");
        assert!(e.to_string().contains("terminating"), "{e}");
    }

    #[test]
    fn the_target_pods_node_comes_from_its_spec() {
        let p = pod("web", "node-7", &[], "Running", "True");
        assert_eq!(node_of(&p, "default", "web").expect("scheduled"), "node-7");
        let mut pending = p.clone();
        pending.spec = Some(PodSpec::default());
        let e = node_of(&pending, "default", "web").expect_err("not scheduled");
        assert_eq!(
            e.to_string(),
            "pod default/web is not scheduled on a node yet (no spec.nodeName)"
        );
    }

    #[test]
    fn pod_references() {
        assert_eq!(
            parse_pod_ref("shop/web-0").expect("valid"),
            ("shop".to_string(), "web-0".to_string())
        );
        assert_eq!(
            parse_pod_ref("web").expect("valid"),
            ("default".to_string(), "web".to_string())
        );
        for bad in ["", "/web", "shop/", "a/b/c", "Shop/web", "shop/we b"] {
            assert!(parse_pod_ref(bad).is_err(), "{bad:?}");
        }
    }
}
