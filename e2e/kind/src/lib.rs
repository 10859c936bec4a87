//! netfault's cluster test level: a real Kubernetes cluster (Kind with one
//! control plane and two workers, or k3s, or the current kubeconfig's
//! cluster) with the DaemonSet of `daemonset/` installed, driven as a user
//! drives it: `kubectl apply -k`, pod annotations, `NetworkFault`
//! resources, `netfaultctl --kube`, `kubectl rollout restart`, `kubectl
//! delete -k`. Every effect is measured on the wire between pods: a client
//! pod makes HTTP requests (busybox `nc`) to server pods and counts the
//! answers ([`probe`]).
//!
//! What it owns: the suite's side of the cluster: its test namespaces
//! ([`workload::TestNs`], deleted on drop), the agent's token Secret, the
//! install and uninstall of the kustomization it is given, and read-only
//! inspection of the nodes (`docker exec` into Kind nodes, a local shell on
//! a k3s node) for what netfault leaves behind.
//! What it must not do: create or delete clusters or build images
//! (`scripts/e2e-kind.sh` does, with kind, k3s and `daemonset/build-image.sh`),
//! download anything, or touch namespaces it did not create (other than
//! `netfault`, which the kustomization owns).
//!
//! Without a cluster the suite is skipped with one line ([`target`]); the
//! test binary (`tests/kind/main.rs`) never tries to reach anything then.
//! See `e2e/kind/README.md` for the scenarios, the environment the script
//! passes, and the Kubernetes calls with their node-level counterparts.

pub mod cluster;
pub mod inspect;
pub mod probe;
pub mod target;
pub mod workload;

pub use cluster::Cluster;
pub use probe::{Reach, Stream};
pub use target::{target, ClusterKind, Target};
pub use workload::{PodInfo, TestNs};

/// What went wrong, with what was being attempted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A process (kubectl, docker, netfaultctl) failed or could not start.
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
    /// Anything else: a wait that timed out, an unexpected answer.
    #[error("{0}")]
    Other(String),
}

/// The suite's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being attempted to a kube error.
pub trait KubeContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KubeContext<T> for std::result::Result<T, kube::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Kube {
            what: what(),
            source: Box::new(source),
        })
    }
}

/// Fails with `msg` unless `cond` holds.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Other(msg()))
    }
}

/// The workload image: busybox-static, built without a registry by
/// `e2e_cri::box_image` and loaded into the cluster by the script
/// (its `Cmd` sleeps forever; `sh`, `nc`, `httpd`, `sleep` are linked).
pub const BOX_IMAGE: &str = e2e_cri::BOX_IMAGE;

/// The port the server pods answer HTTP on.
pub const HTTP_PORT: u16 = 8080;
