//! A CRI v1 (`runtime.v1`) client over a unix socket, as a kubelet talks to
//! containerd or CRI-O, and the parsing of what a pod sandbox's verbose
//! status says about its network namespace.
//!
//! The agent uses it to adopt pods that existed before it (`--cri-socket`);
//! the CRI test level (`e2e/cri`) uses it to drive a real containerd.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1 as api;
/// A gRPC status, as a failed CRI call carries it.
pub use tonic::Status;

/// containerd's CRI socket, the default of `netfaultd --cri-socket`.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI socket {path}: {}", chain(source))]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call}: {status}")]
    Call {
        call: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
}

/// An error with its sources ("transport error: No such file or directory").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        next = s.source();
    }
    out
}

impl CriError {
    /// Wraps a failed call's status, naming the call.
    pub fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
        move |status| CriError::Call {
            call,
            status: Box::new(status),
        }
    }

    /// The runtime answered NotFound (the sandbox or container is gone).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    /// The gRPC code of a failed call (`None` for connection errors).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Call { status, .. } => Some(status.code()),
            CriError::Connect { .. } => None,
        }
    }
}

/// A connection to a CRI runtime: the runtime and image services share one
/// HTTP/2 channel over the unix socket.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the runtime's unix socket. `timeout` bounds the connect
    /// and every call made through this client.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Cri, CriError> {
        let path = socket.to_path_buf();
        // The URI is unused: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .timeout(timeout);
        let dial = path.clone();
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let dial = dial.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(dial).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| CriError::Connect { path, source })?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (`Version`), e.g. ("containerd", "1.6.20~ds1").
    pub async fn version(&mut self) -> Result<(String, String), CriError> {
        let v = self
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(CriError::call("Version"))?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// The pod sandboxes in state SANDBOX_READY.
    pub async fn ready_sandboxes(&mut self) -> Result<Vec<api::PodSandbox>, CriError> {
        let filter = api::PodSandboxFilter {
            state: Some(api::PodSandboxStateValue {
                state: api::PodSandboxState::SandboxReady as i32,
            }),
            ..Default::default()
        };
        Ok(self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await
            .map_err(CriError::call("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// Every pod sandbox the runtime knows, READY or NOTREADY (an
    /// unfiltered `ListPodSandbox`).
    pub async fn sandboxes(&mut self) -> Result<Vec<api::PodSandbox>, CriError> {
        Ok(self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(CriError::call("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// `PodSandboxStatus` with `verbose: true`: the status and the runtime's
    /// info map (which holds the sandbox's OCI runtime spec).
    pub async fn sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<(api::PodSandboxStatus, HashMap<String, String>), CriError> {
        let r = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await
            .map_err(CriError::call("PodSandboxStatus"))?
            .into_inner();
        let status = r.status.unwrap_or_default();
        Ok((status, r.info))
    }
}

/// Whether a listed sandbox is in state SANDBOX_READY.
pub fn is_ready(sandbox: &api::PodSandbox) -> bool {
    sandbox.state == api::PodSandboxState::SandboxReady as i32
}

/// What a pod sandbox's verbose status says about the pod and its network:
/// all an agent needs to enrol it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxView {
    pub id: String,
    pub ready: bool,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    /// Primary first.
    pub ips: Vec<IpAddr>,
    /// The network namespace's path; `None` for a hostNetwork sandbox or
    /// when the runtime's info has no spec.
    pub netns: Option<PathBuf>,
    pub host_network: bool,
    /// The runtime says it already closed the netns (containerd's
    /// `netNamespaceClosed`, once the sandbox is stopped).
    pub netns_closed: bool,
    /// The pod's interface from the runtime's CNI result (containerd's
    /// `cniResult`), when it says so.
    pub ifname: Option<String>,
}

impl SandboxView {
    /// Reads a `PodSandboxStatus` response's status and info map.
    pub fn new(status: &api::PodSandboxStatus, info: &HashMap<String, String>) -> SandboxView {
        let meta = status.metadata.clone().unwrap_or_default();
        let doc: Option<serde_json::Value> =
            info.get("info").and_then(|i| serde_json::from_str(i).ok());
        let host_network = host_network(status);
        let netns = if host_network { None } else { netns_path(info) };
        SandboxView {
            id: status.id.clone(),
            ready: status.state == api::PodSandboxState::SandboxReady as i32,
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            annotations: status
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ips: sandbox_ips(status),
            netns_closed: doc
                .as_ref()
                .and_then(|d| d.get("netNamespaceClosed"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            ifname: netns
                .as_deref()
                .and_then(|ns| doc.as_ref().and_then(|d| cni_interface(d, ns))),
            netns,
            host_network,
        }
    }
}

/// The pod's interface in containerd's `cniResult`: of the interfaces
/// whose `Sandbox` is the pod's netns, `eth0` if there, else the only one
/// that is not `lo`.
fn cni_interface(doc: &serde_json::Value, netns: &Path) -> Option<String> {
    let ifaces = doc.pointer("/cniResult/Interfaces")?.as_object()?;
    let inside: Vec<&String> = ifaces
        .iter()
        .filter(|(name, i)| {
            name.as_str() != "lo" && i.get("Sandbox").and_then(|s| s.as_str()) == netns.to_str()
        })
        .map(|(name, _)| name)
        .collect();
    match inside.as_slice() {
        _ if inside.iter().any(|n| n.as_str() == "eth0") => Some("eth0".into()),
        [only] => Some((*only).clone()),
        _ => None,
    }
}

/// The pod's IPs from a sandbox status (primary first); unparsable entries
/// are skipped.
pub fn sandbox_ips(status: &api::PodSandboxStatus) -> Vec<IpAddr> {
    let Some(net) = &status.network else {
        return Vec::new();
    };
    std::iter::once(net.ip.as_str())
        .chain(net.additional_ips.iter().map(|i| i.ip.as_str()))
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The network namespace path of a sandbox, from the verbose status info.
///
/// containerd puts a JSON document under `info` whose `runtimeSpec` is the
/// sandbox's OCI spec; CRI-O's `info` holds the same `runtimeSpec`. The
/// network namespace is the `linux.namespaces` entry of type `network`.
/// `None` when the sandbox shares the host's network (no path) or the info
/// has no spec.
pub fn netns_path(info: &HashMap<String, String>) -> Option<PathBuf> {
    let doc: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let spec = doc.get("runtimeSpec")?;
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))
        .and_then(|ns| ns.get("path"))
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Whether the sandbox runs in the node's network namespace (hostNetwork).
pub fn host_network(status: &api::PodSandboxStatus) -> bool {
    status
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == api::NamespaceMode::Node as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(doc: serde_json::Value) -> HashMap<String, String> {
        HashMap::from([("info".to_string(), doc.to_string())])
    }

    #[test]
    fn netns_path_reads_the_network_namespace_of_the_runtime_spec() {
        let i = info(serde_json::json!({
            "pid": 42,
            "runtimeSpec": {"linux": {"namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "network", "path": "/var/run/netns/cni-0d7c"}
            ]}}
        }));
        assert_eq!(
            netns_path(&i),
            Some(PathBuf::from("/var/run/netns/cni-0d7c"))
        );
    }

    #[test]
    fn netns_path_is_none_without_a_path_or_a_spec() {
        let host = info(serde_json::json!({
            "runtimeSpec": {"linux": {"namespaces": [{"type": "pid"}]}}
        }));
        assert_eq!(netns_path(&host), None);
        let no_path = info(serde_json::json!({
            "runtimeSpec": {"linux": {"namespaces": [{"type": "network"}]}}
        }));
        assert_eq!(netns_path(&no_path), None);
        assert_eq!(netns_path(&HashMap::new()), None);
        let garbage = HashMap::from([("info".to_string(), "{not json".to_string())]);
        assert_eq!(netns_path(&garbage), None);
    }

    #[test]
    fn sandbox_ips_lists_the_primary_first_and_skips_garbage() {
        let status = api::PodSandboxStatus {
            network: Some(api::PodSandboxNetworkStatus {
                ip: "198.18.0.5".into(),
                additional_ips: vec![
                    api::PodIp {
                        ip: "fd00::5".into(),
                    },
                    api::PodIp { ip: "nope".into() },
                ],
            }),
            ..Default::default()
        };
        let ips: Vec<String> = sandbox_ips(&status).iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["198.18.0.5", "fd00::5"]);
        assert!(sandbox_ips(&api::PodSandboxStatus::default()).is_empty());
    }
}

#[cfg(test)]
mod fixtures {
    //! Real responses of containerd 1.6.20 (see testdata/containerd-1.6.20/README.md).
    use super::*;
    use prost::Message;

    fn fixture<M: Message + Default>(name: &str) -> M {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/containerd-1.6.20")
            .join(name);
        let bytes = std::fs::read(&path).expect("fixture file");
        M::decode(bytes.as_slice()).expect("fixture decodes")
    }

    fn view(name: &str) -> SandboxView {
        let r: api::PodSandboxStatusResponse = fixture(name);
        SandboxView::new(&r.status.unwrap_or_default(), &r.info)
    }

    #[test]
    fn a_ready_pod_sandbox_gives_its_pod_netns_ips_annotations_and_interface() {
        let v = view("status-web-0-ready.pb");
        assert!(v.ready);
        assert_eq!(
            v.id,
            "1c6925367820d495a55b3ad911b7e52db964e55cbca305401174aee0d937c4e9"
        );
        assert_eq!(
            (v.namespace.as_str(), v.name.as_str(), v.uid.as_str()),
            ("fixture-ns", "web-0", "uid-web-0-1234")
        );
        assert_eq!(
            v.netns,
            Some(PathBuf::from(
                "/var/run/netns/cni-78b97e58-0117-dfe1-adb1-fadb083cf197"
            ))
        );
        assert_eq!(v.ips, ["198.18.77.3".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            v.annotations,
            BTreeMap::from([
                ("example.com/x".to_string(), "y".to_string()),
                ("netfault.io/loss".to_string(), "10%".to_string()),
            ])
        );
        assert!(!v.host_network);
        assert!(!v.netns_closed);
        assert_eq!(v.ifname.as_deref(), Some("eth0"));
    }

    #[test]
    fn a_stopped_sandbox_is_not_ready_and_its_netns_is_closed() {
        let v = view("status-web-0-notready.pb");
        assert!(!v.ready);
        assert!(v.netns_closed);
        assert_eq!(v.name, "web-0");
    }

    #[test]
    fn a_host_network_sandbox_has_no_netns() {
        let v = view("status-hostnet-0-ready.pb");
        assert!(v.ready);
        assert!(v.host_network);
        assert_eq!(v.netns, None);
        assert_eq!(v.ifname, None);
        assert!(v.ips.is_empty(), "{:?}", v.ips);
    }

    #[test]
    fn the_unfiltered_list_reports_ready_and_not_ready_sandboxes() {
        let states = |name: &str| {
            let r: api::ListPodSandboxResponse = fixture(name);
            let mut s: Vec<(String, bool)> = r
                .items
                .iter()
                .map(|sb| {
                    let m = sb.metadata.clone().unwrap_or_default();
                    (m.name, is_ready(sb))
                })
                .collect();
            s.sort();
            s
        };
        assert_eq!(
            states("list-ready.pb"),
            [("hostnet-0".to_string(), true), ("web-0".to_string(), true)]
        );
        assert_eq!(
            states("list-one-stopped.pb"),
            [
                ("hostnet-0".to_string(), true),
                ("web-0".to_string(), false)
            ]
        );
    }

    #[test]
    fn the_cni_interface_is_eth0_or_the_only_one_in_the_netns() {
        let ns = Path::new("/var/run/netns/cni-1");
        let doc =
            |ifaces: serde_json::Value| serde_json::json!({"cniResult": {"Interfaces": ifaces}});
        let inside = serde_json::json!({"Sandbox": "/var/run/netns/cni-1"});
        let outside = serde_json::json!({"Sandbox": ""});
        assert_eq!(
            cni_interface(
                &doc(serde_json::json!({"lo": inside, "net1": inside, "br0": outside})),
                ns
            ),
            Some("net1".into())
        );
        assert_eq!(
            cni_interface(
                &doc(serde_json::json!({"net1": inside, "eth0": inside})),
                ns
            ),
            Some("eth0".into())
        );
        assert_eq!(
            cni_interface(
                &doc(serde_json::json!({"net1": inside, "net2": inside})),
                ns
            ),
            None,
            "ambiguous"
        );
        assert_eq!(cni_interface(&serde_json::json!({}), ns), None);
    }
}
