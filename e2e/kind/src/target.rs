//! Which cluster the suite runs against, from the environment that
//! `scripts/e2e-kind.sh` sets, or why it is skipped.
//!
//! What it owns: reading `NETFAULT_E2E_*` and looking at the `PATH` and the
//! kubeconfig's file for the skip line.
//! What it must not do: reach the network or start processes: without a
//! cluster the suite must decide in well under a second.

use std::path::{Path, PathBuf};

/// `kind`, `k3s` or `existing`: how the script got its cluster. Required for
/// the suite to run; without it the suite is skipped.
pub const ENV_CLUSTER: &str = "NETFAULT_E2E_CLUSTER";
/// The Kind cluster's name (nodes are `docker exec`ed by their names).
pub const ENV_KIND_NAME: &str = "NETFAULT_E2E_KIND_NAME";
/// The kustomization to install (default `daemonset/`; the k3s overlay).
pub const ENV_KUSTOMIZE: &str = "NETFAULT_E2E_KUSTOMIZE";
/// The netfaultctl binary for the `ctl-kube` scenario.
pub const ENV_NETFAULTCTL: &str = "NETFAULT_E2E_NETFAULTCTL";
/// The nodes' CNI config and binary dirs (host paths).
pub const ENV_CNI_CONF_DIR: &str = "NETFAULT_E2E_CNI_CONF_DIR";
pub const ENV_CNI_BIN_DIR: &str = "NETFAULT_E2E_CNI_BIN_DIR";

/// The default Kind cluster name of `scripts/e2e-kind.sh`.
pub const DEFAULT_KIND_NAME: &str = "netfault-e2e";

/// How the cluster was made, which decides how its nodes are inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Kind: nodes are docker containers named after the nodes.
    Kind,
    /// k3s on this machine: the node is this host.
    K3s,
    /// The current kubeconfig's cluster: nodes cannot be inspected.
    Existing,
}

/// Everything the suite needs to know about its cluster.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: ClusterKind,
    /// The Kind cluster name (only for [`ClusterKind::Kind`]).
    pub kind_name: String,
    /// The kustomization directory installed and uninstalled.
    pub kustomize_dir: PathBuf,
    /// netfaultctl, run from this machine (outside the cluster).
    pub netfaultctl: PathBuf,
    /// The CNI config dir on the nodes.
    pub cni_conf_dir: String,
    /// The CNI binary dir on the nodes.
    pub cni_bin_dir: String,
}

/// The repository's root (where `daemonset/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cluster to run against, or why the suite does not run:
/// [`Skip::NotConfigured`] (print the one skip line, pass) or
/// [`Skip::Invalid`] (a `NETFAULT_E2E_*` variable set wrong: fail, naming it).
pub fn target() -> Result<Target, Skip> {
    let Some(kind) = std::env::var_os(ENV_CLUSTER) else {
        return Err(Skip::NotConfigured(why_not_configured()));
    };
    let kind = match kind.to_str() {
        Some("kind") => ClusterKind::Kind,
        Some("k3s") => ClusterKind::K3s,
        Some("existing") => ClusterKind::Existing,
        other => {
            return Err(Skip::Invalid(format!(
                "{ENV_CLUSTER}={}: must be kind, k3s or existing",
                other.unwrap_or("<not UTF-8>")
            )))
        }
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let kustomize_dir = var(ENV_KUSTOMIZE)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("daemonset"));
    if !kustomize_dir.join("kustomization.yaml").is_file() {
        return Err(Skip::Invalid(format!(
            "{ENV_KUSTOMIZE}={}: no kustomization.yaml there",
            kustomize_dir.display()
        )));
    }
    Ok(Target {
        kind,
        kind_name: var(ENV_KIND_NAME).unwrap_or_else(|| DEFAULT_KIND_NAME.into()),
        kustomize_dir,
        netfaultctl: var(ENV_NETFAULTCTL)
            .map(PathBuf::from)
            .unwrap_or_else(|| testbed::workspace_bin("netfaultctl")),
        cni_conf_dir: var(ENV_CNI_CONF_DIR).unwrap_or_else(|| "/etc/cni/net.d".into()),
        cni_bin_dir: var(ENV_CNI_BIN_DIR).unwrap_or_else(|| "/opt/cni/bin".into()),
    })
}

/// Why the suite does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No cluster configured: print the reason, pass.
    NotConfigured(String),
    /// A variable is set wrong: print it, fail.
    Invalid(String),
}

/// The skip line's reason when `NETFAULT_E2E_CLUSTER` is unset: what is
/// missing, or, when a cluster could be had, how to run the suite.
fn why_not_configured() -> String {
    let kind = on_path("kind");
    let k3s = on_path("k3s");
    let kubeconfig = kubeconfig_file();
    let docker = on_path("docker");
    let how = "scripts/e2e-kind.sh --cluster kind|k3s|existing runs it (see e2e/kind/README.md)";
    match (kind, k3s, kubeconfig) {
        (None, None, None) => {
            "no kind binary, no k3s binary and no reachable cluster (no kubeconfig); see e2e/kind/README.md".into()
        }
        (Some(_), _, _) if docker.is_none() => {
            format!("kind found but no docker; {ENV_CLUSTER} is not set; {how}")
        }
        (_, _, Some(k)) => format!(
            "{ENV_CLUSTER} is not set (a kubeconfig exists at {}, but the suite only runs where it was asked to); {how}",
            k.display()
        ),
        _ => format!("{ENV_CLUSTER} is not set; {how}"),
    }
}

/// `name` on the `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The kubeconfig file kubectl would read, if one exists.
fn kubeconfig_file() -> Option<PathBuf> {
    if let Some(list) = std::env::var_os("KUBECONFIG") {
        return std::env::split_paths(&list).find(|p| p.is_file());
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".kube/config");
    p.is_file().then_some(p)
}
