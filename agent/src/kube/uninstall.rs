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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;

use super::{make_client, Source};

/// How long SIGTERM waits for the watch to report the DaemonSet's deletion
/// when the API server cannot be asked (its RBAC or service account may be
/// deleted in the same `kubectl delete -k`).
const WAIT_FOR_WATCH: Duration = Duration::from_secs(3);

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
    }
}

/// What the agent saw of its DaemonSet since it started: set once the
/// DaemonSet is deleted or being deleted (a watch on it, by name).
///
/// Why a watch and not only a GET at SIGTERM: `kubectl delete -k` deletes the
/// agent's RBAC and service account together with its DaemonSet, so by the
/// time the kubelet sends SIGTERM the agent's requests may get 401 or 403.
/// A watch opened earlier keeps streaming (authorization is checked when a
/// request starts) and sees the deletion first.
#[derive(Clone, Default)]
pub struct OwnerWatch {
    gone: Arc<AtomicBool>,
}

impl OwnerWatch {
    pub fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Finds the agent's DaemonSet and watches it until the process ends.
    pub async fn run(self, me: SelfRef) {
        let mut backoff = Duration::from_secs(1);
        let (client, name, uid) = loop {
            match owner_of(&me).await {
                Ok(Some((client, name, uid))) => break (client, name, uid),
                Ok(None) => {
                    tracing::info!(pod = %me.pod, "the agent's pod has no DaemonSet owner: SIGTERM never uninstalls");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "finding the agent's DaemonSet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        tracing::info!(daemonset = %name, "watching the agent's DaemonSet (an uninstall releases every sandbox)");
        let api: Api<DaemonSet> = Api::namespaced(client, &me.namespace);
        let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            let gone = match ev {
                Ok(Event::Init) => {
                    listed = false;
                    false
                }
                Ok(Event::InitApply(ds)) => {
                    listed |= ds.metadata.uid.as_deref() == Some(uid.as_str());
                    deleting(&ds, &uid)
                }
                // A re-list without it: it was deleted while the watch was down.
                Ok(Event::InitDone) => !listed,
                Ok(Event::Apply(ds)) => deleting(&ds, &uid),
                Ok(Event::Delete(ds)) => ds.metadata.uid.as_deref() == Some(uid.as_str()),
                Err(e) => {
                    tracing::debug!(error = %e, "the DaemonSet watch failed; it resumes with backoff");
                    false
                }
            };
            if gone && !self.gone.swap(true, Ordering::SeqCst) {
                tracing::info!(daemonset = %name, "the agent's DaemonSet is being deleted: SIGTERM will release every sandbox");
            }
        }
    }
}

/// The same DaemonSet (`uid`), with a `deletionTimestamp`.
fn deleting(ds: &DaemonSet, uid: &str) -> bool {
    ds.metadata.uid.as_deref() == Some(uid) && ds.metadata.deletion_timestamp.is_some()
}

/// A client and the DaemonSet that owns the agent's pod: (name, uid).
async fn owner_of(me: &SelfRef) -> Result<Option<(kube::Client, String, String)>, String> {
    let client = make_client(&me.source).await.map_err(|e| e.to_string())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &me.namespace);
    let pod = pods
        .get(&me.pod)
        .await
        .map_err(|e| format!("reading the agent's pod {}/{}: {e}", me.namespace, me.pod))?;
    Ok(owner_daemonset(&pod).map(|(name, uid)| (client, name, uid)))
}

/// Asks the API server, and if it cannot be asked, the watch (the caller
/// bounds the time; the watch is waited for at most [`WAIT_FOR_WATCH`]).
pub async fn on_terminate(me: &SelfRef, watch: &OwnerWatch) -> Shutdown {
    if watch.gone() {
        return Shutdown::Uninstall("the agent's DaemonSet was deleted (seen by the watch)".into());
    }
    let why = match ask(me).await {
        Ok(verdict) => return verdict,
        Err(why) => why,
    };
    // No answer (its RBAC may be going with it): a deletion may still be
    // on its way to the watch.
    let t = tokio::time::Instant::now();
    while t.elapsed() < WAIT_FOR_WATCH {
        if watch.gone() {
            return Shutdown::Uninstall(format!(
                "the agent's DaemonSet was deleted (seen by the watch; asking failed: {why})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Shutdown::Restart(why)
}

/// The GETs (the agent's pod, then its DaemonSet) and the decision; `Err`
/// when the API server could not be asked.
async fn ask(me: &SelfRef) -> Result<Shutdown, String> {
    let Some((client, name, uid)) = owner_of(me).await? else {
        return Ok(decide(None, &Lookup::NotFound));
    };
    let sets: Api<DaemonSet> = Api::namespaced(client, &me.namespace);
    let lookup = match sets.get_opt(&name).await {
        Ok(None) => Lookup::NotFound,
        Ok(Some(ds)) => Lookup::Found {
            uid: ds.metadata.uid.unwrap_or_default(),
            deleting: ds.metadata.deletion_timestamp.is_some(),
        },
        Err(e) => return Err(format!("looking up DaemonSet {name}: {e}")),
    };
    Ok(decide(Some((&name, &uid)), &lookup))
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
