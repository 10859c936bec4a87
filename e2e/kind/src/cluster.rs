//! The cluster: the kube client, `kubectl` for what it is the natural tool
//! for (`apply -k`, `delete -k`, `rollout`, `exec`, `logs`), the install of
//! the DaemonSet with its token Secret, and shell access to the nodes for
//! leftover checks.
//!
//! What it owns: the suite's tokio runtime and client; the `netfault`
//! namespace's Secret `netfault-api-token` (created when absent).
//! What it must not do: change anything on the nodes: [`Cluster::node_sh`]
//! is for reading (nft, tc, files).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::target::{ClusterKind, Target};
use crate::{Error, KubeContext, Result};

/// The agent's namespace, DaemonSet and pod labels (daemonset/daemonset.yaml).
pub const AGENT_NAMESPACE: &str = "netfault";
pub const AGENT_DAEMONSET: &str = "netfault";
pub const AGENT_SELECTOR: &str =
    "app.kubernetes.io/name=netfault,app.kubernetes.io/component=agent";
/// The API token Secret and its key (the DaemonSet mounts it optionally).
pub const TOKEN_SECRET: &str = "netfault-api-token";

/// A connected cluster.
pub struct Cluster {
    pub target: Target,
    rt: tokio::runtime::Runtime,
    client: Client,
    /// Every node's name, sorted.
    pub nodes: Vec<String>,
    /// The nodes a workload pod may run on (no NoSchedule/NoExecute
    /// taint), sorted: Kind's two workers, k3s's one node.
    pub workers: Vec<String>,
}

impl Cluster {
    /// Connects with the usual kubeconfig inference (`KUBECONFIG`,
    /// `~/.kube/config`) and lists the nodes.
    pub fn connect(target: Target) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("starting the tokio runtime: {e}")))?;
        let client = rt
            .block_on(Client::try_default())
            .ctx(|| "a Kubernetes client from the kubeconfig".into())?;
        let mut c = Cluster {
            target,
            rt,
            client,
            nodes: vec![],
            workers: vec![],
        };
        let nodes: Api<Node> = Api::all(c.client());
        let list = c
            .block_on(nodes.list(&ListParams::default()))
            .ctx(|| "list nodes".into())?;
        for n in list.items {
            let Some(name) = n.metadata.name.clone() else {
                continue;
            };
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| {
                    t.iter()
                        .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                });
            if !tainted {
                c.workers.push(name.clone());
            }
            c.nodes.push(name);
        }
        c.nodes.sort();
        c.workers.sort();
        if c.workers.is_empty() {
            return Err(Error::Other(format!(
                "no schedulable node among {:?} (all tainted NoSchedule/NoExecute)",
                c.nodes
            )));
        }
        Ok(c)
    }

    /// A client (cheap clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on the suite's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `kubectl ARGS` (the kubeconfig from the environment); its stdout, or
    /// an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(Command::new("kubectl").args(args))
    }

    /// Installs netfault: the `netfault` namespace and a random token
    /// Secret first (so the agent's optional Secret volume has it from the
    /// start), then `kubectl apply -k`, then waits until the DaemonSet is
    /// ready on every node. Idempotent.
    pub fn install(&self) -> Result<Duration> {
        let t0 = Instant::now();
        self.ensure_namespace(AGENT_NAMESPACE)?;
        self.ensure_token_secret()?;
        let dir = self.target.kustomize_dir.display().to_string();
        self.kubectl(&["apply", "-k", &dir])?;
        self.wait_agents_ready(Duration::from_secs(240))?;
        Ok(t0.elapsed())
    }

    /// Creates namespace `name` (labelled as daemonset/namespace.yaml labels
    /// `netfault`) unless it exists.
    fn ensure_namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client());
        if self
            .block_on(api.get_opt(name))
            .ctx(|| format!("get namespace {name}"))?
            .is_some()
        {
            return Ok(());
        }
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "netfault"}},
        }))
        .map_err(|e| Error::Other(format!("namespace object: {e}")))?;
        match self.block_on(api.create(&PostParams::default(), &ns)) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e).ctx(|| format!("create namespace {name}")),
        }
    }

    /// The Secret `netfault/netfault-api-token` with a random `token`
    /// (created unless it exists).
    pub fn ensure_token_secret(&self) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client(), AGENT_NAMESPACE);
        if self
            .block_on(api.get_opt(TOKEN_SECRET))
            .ctx(|| format!("get secret {AGENT_NAMESPACE}/{TOKEN_SECRET}"))?
            .is_some()
        {
            return Ok(());
        }
        let token: String = (0..40)
            .map(|_| {
                let i = rand::random::<u8>() % 62;
                char::from(match i {
                    0..=9 => b'0' + i,
                    10..=35 => b'a' + i - 10,
                    _ => b'A' + i - 36,
                })
            })
            .collect();
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": TOKEN_SECRET, "namespace": AGENT_NAMESPACE},
            "type": "Opaque",
            "stringData": {"token": token},
        }))
        .map_err(|e| Error::Other(format!("secret object: {e}")))?;
        match self.block_on(api.create(&PostParams::default(), &secret)) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e).ctx(|| format!("create secret {AGENT_NAMESPACE}/{TOKEN_SECRET}")),
        }
    }

    /// Waits until the DaemonSet has rolled out its current generation and
    /// every pod is ready on every node; returns the agent pods by node.
    pub fn wait_agents_ready(&self, timeout: Duration) -> Result<Vec<(String, String)>> {
        let ds_api: Api<DaemonSet> = Api::namespaced(self.client(), AGENT_NAMESPACE);
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not seen yet");
        loop {
            if let Some(ds) = self
                .block_on(ds_api.get_opt(AGENT_DAEMONSET))
                .ctx(|| format!("get daemonset {AGENT_NAMESPACE}/{AGENT_DAEMONSET}"))?
            {
                let gen = ds.metadata.generation.unwrap_or(0);
                if let Some(st) = ds.status {
                    let want = self.nodes.len() as i32;
                    last = format!(
                        "generation {gen} observed {:?}, desired {}, updated {:?}, ready {}, available {:?} (nodes {want})",
                        st.observed_generation,
                        st.desired_number_scheduled,
                        st.updated_number_scheduled,
                        st.number_ready,
                        st.number_available
                    );
                    let done = st.observed_generation.unwrap_or(0) >= gen
                        && st.desired_number_scheduled == want
                        && st.updated_number_scheduled == Some(want)
                        && st.number_ready == want
                        && st.number_available == Some(want);
                    if done {
                        let pods = self.agent_pods()?;
                        if pods.len() == self.nodes.len() {
                            return Ok(pods);
                        }
                        last = format!("{last}; agent pods {pods:?}");
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "the DaemonSet {AGENT_NAMESPACE}/{AGENT_DAEMONSET} is not ready on every node after {timeout:?}: {last}"
                )));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The running, ready, not terminating agent pods: (node, pod name).
    pub fn agent_pods(&self) -> Result<Vec<(String, String)>> {
        let api: Api<Pod> = Api::namespaced(self.client(), AGENT_NAMESPACE);
        let list = self
            .block_on(api.list(&ListParams::default().labels(AGENT_SELECTOR)))
            .ctx(|| format!("list agent pods ({AGENT_SELECTOR})"))?;
        let mut out = vec![];
        for p in list.items {
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            if let (true, Some(node), Some(name)) = (ready, node, p.metadata.name) {
                out.push((node, name));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every agent pod that still exists (any phase), for the uninstall.
    pub fn any_agent_pods(&self) -> Result<Vec<String>> {
        let api: Api<Pod> = Api::namespaced(self.client(), AGENT_NAMESPACE);
        let list = self
            .block_on(api.list(&ListParams::default().labels(AGENT_SELECTOR)))
            .ctx(|| format!("list agent pods ({AGENT_SELECTOR})"))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect())
    }

    /// Whether [`Cluster::node_sh`] can reach the nodes.
    pub fn can_inspect_nodes(&self) -> bool {
        self.target.kind != ClusterKind::Existing
    }

    /// Runs `sh -c SCRIPT` as root on `node`: `docker exec` into a Kind
    /// node, a local shell on the k3s host; not possible on an existing
    /// cluster. For reading the node's state only.
    pub fn node_sh(&self, node: &str, script: &str) -> Result<String> {
        match self.target.kind {
            ClusterKind::Kind => {
                run(Command::new("docker").args(["exec", node, "sh", "-c", script]))
            }
            ClusterKind::K3s => run(Command::new("sh").args(["-c", script])),
            ClusterKind::Existing => Err(Error::Other(format!(
                "cannot inspect node {node} of an existing cluster"
            ))),
        }
    }

    /// The agents' logs (both containers, last lines), for a failure report.
    pub fn agent_logs(&self) -> String {
        match self.kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "logs",
            "-l",
            AGENT_SELECTOR,
            "--all-containers",
            "--prefix",
            "--tail",
            "80",
        ]) {
            Ok(s) => s,
            Err(e) => format!("(no agent logs: {e})"),
        }
    }
}

/// Runs a command; its stdout, or an error with its exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            cmd: shown.clone(),
            msg: format!("cannot start: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: shown,
            msg: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if out.stdout.is_empty() {
                    String::new()
                } else {
                    format!(" (stdout: {})", String::from_utf8_lossy(&out.stdout).trim())
                }
            ),
        })
    }
}

/// A command line for messages (long scripts shortened).
pub fn show(cmd: &Command) -> String {
    let mut s = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.len() > 80 {
            s.push_str(&a[..a.floor_char_boundary(77)]);
            s.push_str("...");
        } else {
            s.push_str(&a);
        }
    }
    s
}
