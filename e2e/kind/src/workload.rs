//! A scenario's namespace and its pods: HTTP servers and a client, all
//! from the busybox box image, pinned to nodes by `spec.nodeName`; pod
//! annotations; the pod's Events; NetworkFault objects.
//!
//! What it owns: one namespace per scenario with a unique name, deleted
//! when the [`TestNs`] is dropped (also when the scenario failed), and
//! everything in it.
//! What it must not do: touch other namespaces.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use netfault_k8s::NetworkFault;
use serde_json::{json, Value};

use crate::cluster::run;
use crate::{Cluster, Error, KubeContext, Result, BOX_IMAGE, HTTP_PORT};

/// Where a running pod is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub ip: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
}

/// A scenario's namespace, deleted on drop.
pub struct TestNs<'c> {
    pub c: &'c Cluster,
    pub name: String,
}

impl<'c> TestNs<'c> {
    /// Creates a namespace `nfe2e-<scenario>-<unique>`.
    pub fn create(c: &'c Cluster, scenario: &str) -> Result<TestNs<'c>> {
        let short: String = scenario
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let name = format!("nfe2e-{short}-{}", testbed::unique_name("k")).to_ascii_lowercase();
        let api: Api<Namespace> = Api::all(c.client());
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"netfault.io/e2e": "kind"}},
        }))
        .map_err(|e| Error::Other(format!("namespace object: {e}")))?;
        c.block_on(api.create(&PostParams::default(), &ns))
            .ctx(|| format!("create namespace {name}"))?;
        Ok(TestNs { c, name })
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.c.client(), &self.name)
    }

    /// A pod running `command` in the box image on `node`.
    fn pod(&self, name: &str, node: &str, labels: &[(&str, &str)], command: &[&str]) -> Result<()> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.name, "labels": labels},
            "spec": {
                // Pinned: the scenarios need pods on both workers, and a
                // pod with nodeName skips the scheduler (no taint questions).
                "nodeName": node,
                "terminationGracePeriodSeconds": 0,
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "box",
                    "image": BOX_IMAGE,
                    // Loaded by scripts/e2e-kind.sh; never pulled.
                    "imagePullPolicy": "Never",
                    "command": command,
                }],
            },
        }))
        .map_err(|e| Error::Other(format!("pod object: {e}")))?;
        self.c
            .block_on(self.pods().create(&PostParams::default(), &pod))
            .ctx(|| format!("create pod {}/{name} on {node}", self.name))?;
        Ok(())
    }

    /// A pod answering `GET /ok` with `200 ok` on [`HTTP_PORT`] (busybox httpd).
    pub fn server(&self, name: &str, node: &str, labels: &[(&str, &str)]) -> Result<()> {
        let script = format!("echo ok > /tmp/ok && exec httpd -f -p {HTTP_PORT} -h /tmp");
        self.pod(name, node, labels, &["sh", "-c", &script])
    }

    /// A pod that sleeps; probes run in it with `kubectl exec`.
    pub fn client(&self, name: &str, node: &str) -> Result<()> {
        self.pod(name, node, &[], &["sleep", "inf"])
    }

    /// Waits until every pod in `names` runs and is ready (its container
    /// started), and returns where each is.
    pub fn wait_running(&self, names: &[&str]) -> Result<BTreeMap<String, PodInfo>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut out = BTreeMap::new();
            let mut waiting = vec![];
            for n in names {
                let p = self
                    .c
                    .block_on(self.pods().get(n))
                    .ctx(|| format!("get pod {}/{n}", self.name))?;
                match pod_info(&p) {
                    Some(info) => {
                        out.insert(n.to_string(), info);
                    }
                    None => waiting.push(format!(
                        "{n} ({})",
                        p.status
                            .as_ref()
                            .and_then(|s| s.phase.clone())
                            .unwrap_or_else(|| "no status".into())
                    )),
                }
            }
            if waiting.is_empty() {
                return Ok(out);
            }
            if Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "pods not running in {} after 120 s: {}",
                    self.name,
                    waiting.join(", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sets (`Some`) or removes (`None`) annotations of `pod` with a JSON
    /// merge patch, as `kubectl annotate` does.
    pub fn annotate(&self, pod: &str, changes: &[(&str, Option<&str>)]) -> Result<()> {
        let ann: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.map_or(Value::Null, |v| Value::String(v.into())),
                )
            })
            .collect();
        let patch = json!({"metadata": {"annotations": ann}});
        self.c
            .block_on(
                self.pods()
                    .patch(pod, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .ctx(|| format!("annotate pod {}/{pod}", self.name))?;
        Ok(())
    }

    /// Deletes a pod (grace 0) without waiting.
    pub fn delete_pod(&self, pod: &str) -> Result<()> {
        self.c
            .block_on(
                self.pods()
                    .delete(pod, &DeleteParams::default().grace_period(0)),
            )
            .ctx(|| format!("delete pod {}/{pod}", self.name))?;
        Ok(())
    }

    /// The `events.k8s.io/v1` Events about `pod` (field selector
    /// `regarding.name`).
    pub fn events(&self, pod: &str) -> Result<Vec<Event>> {
        let api: Api<Event> = Api::namespaced(self.c.client(), &self.name);
        let lp = ListParams::default().fields(&format!("regarding.name={pod}"));
        Ok(self
            .c
            .block_on(api.list(&lp))
            .ctx(|| format!("list events of {}/{pod}", self.name))?
            .items)
    }

    /// `kubectl exec POD -- ARGV`: its stdout.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<String> {
        run(Command::new("kubectl")
            .args(["-n", &self.name, "exec", pod, "--"])
            .args(argv))
    }

    /// The NetworkFault API of this namespace.
    pub fn networkfaults(&self) -> Api<NetworkFault> {
        Api::namespaced(self.c.client(), &self.name)
    }

    /// Creates a NetworkFault from its JSON (`metadata.namespace` is set here).
    pub fn create_networkfault(&self, mut nf: Value) -> Result<NetworkFault> {
        nf["metadata"]["namespace"] = Value::String(self.name.clone());
        let name = nf["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let obj: NetworkFault = serde_json::from_value(nf)
            .map_err(|e| Error::Other(format!("NetworkFault {name}: {e}")))?;
        self.c
            .block_on(self.networkfaults().create(&PostParams::default(), &obj))
            .ctx(|| format!("create networkfault {}/{name}", self.name))
    }

    /// Reads a NetworkFault (with its status).
    pub fn get_networkfault(&self, name: &str) -> Result<NetworkFault> {
        self.c
            .block_on(self.networkfaults().get(name))
            .ctx(|| format!("get networkfault {}/{name}", self.name))
    }

    /// Deletes a NetworkFault.
    pub fn delete_networkfault(&self, name: &str) -> Result<()> {
        self.c
            .block_on(self.networkfaults().delete(name, &DeleteParams::default()))
            .ctx(|| format!("delete networkfault {}/{name}", self.name))?;
        Ok(())
    }
}

impl Drop for TestNs<'_> {
    fn drop(&mut self) {
        if std::env::var_os("NETFAULT_E2E_KEEP").is_some() {
            eprintln!(
                "e2e/kind: keeping namespace {} (NETFAULT_E2E_KEEP)",
                self.name
            );
            return;
        }
        let api: Api<Namespace> = Api::all(self.c.client());
        if let Err(e) = self
            .c
            .block_on(api.delete(&self.name, &DeleteParams::background()))
        {
            eprintln!("e2e/kind: deleting namespace {}: {e}", self.name);
        }
    }
}

/// Where a pod runs, once it runs and is ready with an IP.
pub fn pod_info(p: &Pod) -> Option<PodInfo> {
    let st = p.status.as_ref()?;
    if st.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = st
        .conditions
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return None;
    }
    Some(PodInfo {
        name: p.metadata.name.clone()?,
        uid: p.metadata.uid.clone()?,
        ip: st.pod_ip.clone().filter(|ip| !ip.is_empty())?,
        node: p.spec.as_ref()?.node_name.clone()?,
        labels: p.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A `netfault.io/faults` value: an ingress blackhole of TCP [`HTTP_PORT`]
/// for `duration` (the server pod's requests time out).
pub fn blackhole_annotation(duration: &str) -> String {
    json!([blackhole_fault(duration)]).to_string()
}

/// The fault body (no target) of an ingress blackhole of TCP [`HTTP_PORT`].
pub fn blackhole_fault(duration: &str) -> Value {
    json!({
        "direction": "ingress",
        "match": {"protocol": "tcp", "ports": HTTP_PORT.to_string()},
        "action": {"type": "blackhole"},
        "duration": duration,
    })
}
