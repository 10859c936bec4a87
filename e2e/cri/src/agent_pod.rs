//! The DaemonSet's pod on a [`Node`]: netfaultd and install-cni started
//! from the manifest's own pod spec, with its probes run through ExecSync.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::daemonset::{self, NodeInfo, PodPlan};
use crate::error::{Error, Result};
use crate::images;
use crate::node::{ExecResult, Node, Sandbox};

/// The DaemonSet's agent container.
pub const AGENT_CONTAINER: &str = "netfaultd";
/// The DaemonSet's installer container.
pub const INSTALL_CNI_CONTAINER: &str = "install-cni";

/// Which probe of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Readiness,
    Liveness,
}

/// A running DaemonSet pod.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub sandbox: Sandbox,
    pub plan: PodPlan,
    /// Container name → container id.
    pub containers: BTreeMap<String, String>,
    /// The agent's socket as the host sees it (netfaultd's `--socket`
    /// through its mounts).
    pub socket: PathBuf,
}

impl AgentPod {
    /// The id of a container by name.
    pub fn container_id(&self, name: &str) -> Result<&str> {
        self.containers
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::Other(format!("the agent pod has no container {name}")))
    }

    /// A client of the agent's socket (10 s timeout).
    pub fn client(&self) -> netfault_api::Client {
        netfault_api::Client::new(&self.socket)
    }

    /// `GET /healthz` on the socket: the status code.
    pub fn healthz(&self) -> Result<u16> {
        self.client()
            .with_timeout(Duration::from_secs(2))
            .raw("GET", "/healthz", None)
            .map(|r| r.status)
            .map_err(|source| Error::Api {
                context: format!("GET /healthz on {}", self.socket.display()),
                source,
            })
    }

    /// `GET /v1/sandboxes`.
    pub fn sandboxes(&self) -> Result<Vec<serde_json::Value>> {
        self.get_list("/v1/sandboxes")
    }

    /// `GET /v1/faults`.
    pub fn faults(&self) -> Result<Vec<serde_json::Value>> {
        self.get_list("/v1/faults")
    }

    fn get_list(&self, path: &str) -> Result<Vec<serde_json::Value>> {
        match self.client().call("GET", path, None) {
            Ok(serde_json::Value::Array(l)) => Ok(l),
            Ok(other) => Err(Error::Other(format!(
                "GET {path} answered {other}, not a list"
            ))),
            Err(source) => Err(Error::Api {
                context: format!("GET {path}"),
                source,
            }),
        }
    }

    /// `POST /v1/faults`: the created fault.
    pub fn post_fault(&self, body: &serde_json::Value) -> Result<serde_json::Value> {
        self.client()
            .call("POST", "/v1/faults", Some(body))
            .map_err(|source| Error::Api {
                context: format!("POST /v1/faults {body}"),
                source,
            })
    }

    /// `DELETE /v1/faults/ID`.
    pub fn delete_fault(&self, id: &str) -> Result<()> {
        let path = format!("/v1/faults/{id}");
        self.client()
            .call("DELETE", &path, None)
            .map(drop)
            .map_err(|source| Error::Api {
                context: format!("DELETE {path}"),
                source,
            })
    }
}

impl Node {
    /// The DaemonSet's pod, translated for this node (renders
    /// `kubectl kustomize daemonset/`). Changes nothing yet.
    pub fn daemonset_plan(&self) -> Result<PodPlan> {
        let rendered = daemonset::render(&daemonset::manifest_dir())?;
        let ds = daemonset::parse_daemonset(&rendered)?;
        daemonset::translate(
            &ds,
            &NodeInfo {
                name: self.name(),
                layout: self.layout(),
                cgroup_parent: self.cgroup_parent(),
            },
        )
    }

    /// Builds (or reuses) and imports the agent image, starts the
    /// DaemonSet's pod and waits until it is ready ([`Node::wait_agent_ready`]).
    pub fn deploy_daemonset(&self) -> Result<AgentPod> {
        let plan = self.daemonset_plan()?;
        let pod = self.start_plan(plan)?;
        self.wait_agent_ready(&pod, Duration::from_secs(30))?;
        Ok(pod)
    }

    /// Imports the images the plan's containers use, prepares the host
    /// ([`daemonset::prepare`]: dirs, tmpfs), then RunPodSandbox and
    /// CreateContainer + StartContainer for each container in order, as
    /// the kubelet does. Does not wait for readiness.
    pub fn start_plan(&self, plan: PodPlan) -> Result<AgentPod> {
        let archive = images::agent_image()?;
        let mut imported = Vec::new();
        for c in &plan.containers {
            let image = c
                .config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default();
            if imported.contains(&image) {
                continue;
            }
            if image != images::AGENT_IMAGE {
                return Err(Error::Manifest(format!(
                    "container {} uses image {image}; only {} is built here",
                    c.name,
                    images::AGENT_IMAGE
                )));
            }
            self.import_image(&archive, &image)?;
            imported.push(image);
        }
        let agent = plan.container(AGENT_CONTAINER)?;
        let sock_in_container = agent.flag("--socket").ok_or_else(|| {
            Error::Manifest(format!(
                "container {AGENT_CONTAINER} has no --socket argument"
            ))
        })?;
        let socket = agent.host_path_of(&sock_in_container).ok_or_else(|| {
            Error::Manifest(format!(
                "container {AGENT_CONTAINER}: --socket {sock_in_container} is not on a volume, the host cannot reach it"
            ))
        })?;
        if let Ok(mut t) = self.tmpfs.lock() {
            t.extend(plan.tmpfs.iter().cloned());
        }
        daemonset::prepare(&plan)?;
        let sandbox = self.run_sandbox_config(plan.sandbox.clone())?;
        let mut containers = BTreeMap::new();
        for c in &plan.containers {
            let id = self.run_container(&sandbox, c.config.clone())?;
            containers.insert(c.name.clone(), id);
        }
        Ok(AgentPod {
            sandbox,
            plan,
            containers,
            socket,
        })
    }

    /// Runs a container's probe command with ExecSync (its own timeout).
    pub fn probe(&self, pod: &AgentPod, container: &str, which: Probe) -> Result<ExecResult> {
        let c = pod.plan.container(container)?;
        let probe = match which {
            Probe::Readiness => &c.readiness,
            Probe::Liveness => &c.liveness,
        };
        let probe = probe.as_ref().ok_or_else(|| {
            Error::Manifest(format!("container {container} has no {which:?} probe"))
        })?;
        self.exec_sync(pod.container_id(container)?, &probe.command, probe.timeout)
    }

    /// Waits until the agent's readiness probe (ExecSync) exits 0, its
    /// socket answers `/healthz` with 200, and install-cni has put the
    /// netfault entry into the pod conflist.
    pub fn wait_agent_ready(&self, pod: &AgentPod, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let probe = self.probe(pod, AGENT_CONTAINER, Probe::Readiness);
            let health = pod.healthz();
            let chained = self.conflist_has_netfault();
            let last = match (&probe, &health) {
                (Ok(p), Ok(200)) if p.exit_code == 0 && chained => return Ok(()),
                _ => format!(
                    "readiness probe {:?}, /healthz {:?}, netfault in the conflist: {chained}",
                    probe.map(|p| (p.exit_code, p.stdout, p.stderr)),
                    health
                ),
            };
            if Instant::now() > deadline {
                let log = self.agent_log(pod).unwrap_or_default();
                let icni = self
                    .container_log(&pod.sandbox, INSTALL_CNI_CONTAINER)
                    .unwrap_or_default();
                return Err(Error::Other(format!(
                    "the agent pod did not become ready in {timeout:?}: {last}\nnetfaultd log:\n{log}\ninstall-cni log:\n{icni}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the pod conflist's last plugin is netfault.
    pub fn conflist_has_netfault(&self) -> bool {
        std::fs::read(self.conflist_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["plugins"].as_array().and_then(|p| p.last().cloned()))
            .is_some_and(|last| last["type"] == "netfault")
    }

    /// The netfaultd container's log.
    pub fn agent_log(&self, pod: &AgentPod) -> Result<String> {
        self.container_log(&pod.sandbox, AGENT_CONTAINER)
    }

    /// Deletes the agent pod as the kubelet does (StopContainer with the
    /// manifest's grace period for all containers, then StopPodSandbox).
    pub fn stop_agent(&self, pod: &AgentPod) -> Result<()> {
        self.stop_pod(&pod.sandbox, pod.plan.grace)
    }
}
