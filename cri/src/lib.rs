//! A CRI v1 (`runtime.v1`) client over a unix socket, as a kubelet talks to
//! containerd or CRI-O, and the parsing of what a pod sandbox's verbose
//! status says about its network namespace.
//!
//! The agent uses it to adopt pods that existed before it (`--cri-socket`);
//! the CRI test level (`e2e/cri`) uses it to drive a real containerd.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1 as api;

/// containerd's CRI socket, the default of `netfaultd --cri-socket`.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI socket {path}: {source}")]
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

impl CriError {
    /// Wraps a failed call's status, naming the call.
    pub fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
        move |status| CriError::Call {
            call,
            status: Box::new(status),
        }
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
