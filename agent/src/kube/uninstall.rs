//! Uninstall or restart? The decision the agent makes on SIGTERM.
//!
//! A rollout restart, an upgrade or a node reboot must leave faults in
//! place (the next agent re-adopts them; the kernel ends them at their
//! deadlines meanwhile). An uninstall (`kubectl delete -k daemonset/`)
//! must leave nothing behind. What tells them apart is the agent's
//! DaemonSet: its own pod names it (`ownerReferences`); if that DaemonSet
//! is gone (404), is being deleted (`deletionTimestamp`), the agent is
//! being uninstalled and releases every sandbox before it exits.
//!
//! What it owns: the two GETs (its pod, its DaemonSet) and the pure
//! decision ([`decide`]). What it must not do: decide "uninstall" on
//! anything short of the API server's word. Every error, timeout, a pod
//! without a DaemonSet owner, or a DaemonSet recreated under the same name
//! (another uid: the new one's agents take the faults over) means
//! "restart": tearing faults down by mistake mid-experiment is worse than
//! leaving them to their deadlines.
//!
//! RBAC: `get` on pods (the ClusterRole has it) and `get` on daemonsets in
//! the agent's namespace (a Role in `daemonset/rbac.yaml`).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::{make_client, Source};

/// Who the agent is: its pod, from the downward API (`POD_NAME`,
/// `POD_NAMESPACE`).
#[derive(Debug, Clone)]
pub struct SelfRef {
    pub source: Source,
    pub namespace: String,
    pub pod: String,
}

/// What SIGTERM means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// Release every sandbox: the DaemonSet is gone or going.
    Uninstall(String),
    /// Leave the faults to the next agent and their deadlines.
    Restart(String),
}

/// The DaemonSet as the API server answered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    Found { uid: String, deleting: bool },
    Failed(String),
}

/// The owner DaemonSet named in a pod's `ownerReferences`: (name, uid).
pub fn owner_daemonset(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "DaemonSet" && o.api_version.starts_with("apps/"))
        .map(|o| (o.name.clone(), o.uid.clone()))
}

/// The decision from the owner (`None`: the pod names no DaemonSet) and
/// the DaemonSet's lookup.
pub fn decide(owner: Option<(&str, &str)>, ds: &Lookup) -> Shutdown {
    let Some((name, uid)) = owner else {
        return Shutdown::Restart("the agent's pod has no DaemonSet owner".into());
    };
    match ds {
        Lookup::NotFound => Shutdown::Uninstall(format!("DaemonSet {name} is gone")),
        Lookup::Found { uid: now, deleting } if now == uid && *deleting => {
            Shutdown::Uninstall(format!("DaemonSet {name} is being deleted"))
        }
        Lookup::Found { uid: now, .. } if now != uid => Shutdown::Restart(format!(
            "DaemonSet {name} was recreated; its new agents take the faults over"
        )),
        Lookup::Found { .. } => Shutdown::Restart(format!("DaemonSet {name} stays")),
        Lookup::Failed(e) => Shutdown::Restart(format!("looking up DaemonSet {name}: {e}")),
    }
}

/// Asks the API server (the caller bounds the time).
pub async fn on_terminate(me: &SelfRef) -> Shutdown {
    let client = match make_client(&me.source).await {
        Ok(c) => c,
        Err(e) => return Shutdown::Restart(format!("no Kubernetes client: {e}")),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &me.namespace);
    let pod = match pods.get(&me.pod).await {
        Ok(p) => p,
        Err(e) => {
            return Shutdown::Restart(format!(
                "reading the agent's pod {}/{}: {e}",
                me.namespace, me.pod
            ))
        }
    };
    let Some((name, uid)) = owner_daemonset(&pod) else {
        return decide(None, &Lookup::NotFound);
    };
    let sets: Api<DaemonSet> = Api::namespaced(client, &me.namespace);
    let lookup = match sets.get_opt(&name).await {
        Ok(None) => Lookup::NotFound,
        Ok(Some(ds)) => Lookup::Found {
            uid: ds.metadata.uid.unwrap_or_default(),
            deleting: ds.metadata.deletion_timestamp.is_some(),
        },
        Err(e) => Lookup::Failed(e.to_string()),
    };
    decide(Some((&name, &uid)), &lookup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn found(uid: &str, deleting: bool) -> Lookup {
        Lookup::Found {
            uid: uid.into(),
            deleting,
        }
    }

    #[test]
    fn only_the_api_servers_word_uninstalls() {
        let owner = Some(("netfault", "u1"));
        assert!(matches!(
            decide(owner, &Lookup::NotFound),
            Shutdown::Uninstall(_)
        ));
        assert!(matches!(
            decide(owner, &found("u1", true)),
            Shutdown::Uninstall(_)
        ));
        assert!(matches!(
            decide(owner, &found("u1", false)),
            Shutdown::Restart(_)
        ));
        assert!(matches!(
            decide(owner, &found("u2", true)),
            Shutdown::Restart(_)
        ));
        assert!(matches!(
            decide(owner, &Lookup::Failed("timeout".into())),
            Shutdown::Restart(_)
        ));
        assert!(matches!(
            decide(None, &Lookup::NotFound),
            Shutdown::Restart(_)
        ));
    }

    #[test]
    fn owner_is_the_apps_daemonset() {
        let mut pod = Pod::default();
        assert_eq!(owner_daemonset(&pod), None);
        pod.metadata.owner_references = Some(vec![
            OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: "n1".into(),
                uid: "x".into(),
                ..Default::default()
            },
            OwnerReference {
                api_version: "apps/v1".into(),
                kind: "DaemonSet".into(),
                name: "netfault".into(),
                uid: "u1".into(),
                ..Default::default()
            },
        ]);
        assert_eq!(
            owner_daemonset(&pod),
            Some(("netfault".to_string(), "u1".to_string()))
        );
    }
}
