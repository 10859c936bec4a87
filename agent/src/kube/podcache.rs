//! The cluster-wide pod cache that NetworkFault selection reads.
//!
//! What it owns: one compact [`PodKey`] per eligible pod of the cluster
//! (uid, namespace, name, node, labels: what `netfault_k8s::select` needs),
//! in a vector that selection reads as a slice, with an index by uid.
//! Pods arrive as [`SlimPod`]s: the pod type the watch deserializes, which
//! keeps only metadata, `spec.nodeName`, `spec.hostNetwork` and
//! `status.phase`, so containers, volumes and conditions are skipped while
//! parsing and never allocated. Each is turned into its key at once
//! (through `netfault_k8s::eligible`, so every node filters alike) and
//! dropped.
//! What it must not do: keep whole objects, or decide anything about
//! faults.

use std::borrow::Cow;
use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use netfault_k8s::{eligible, PodKey};
use serde::Deserialize;

/// A pod as the cluster-wide watch reads it: only what eligibility and
/// selection use.
#[derive(Debug, Clone, Deserialize)]
pub struct SlimPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimSpec>,
    #[serde(default)]
    pub status: Option<SlimStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

impl Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SlimPod {
    /// The pod's selection key, or `None` when no fault can apply to it
    /// (exactly `netfault_k8s::eligible`). Consumes the pod.
    pub fn into_key(self) -> Option<PodKey> {
        let SlimPod {
            mut metadata,
            spec,
            status,
        } = self;
        // Only what eligibility reads: drop the rest before the copy.
        metadata.annotations = None;
        metadata.managed_fields = None;
        metadata.owner_references = None;
        let spec = spec?;
        let pod = Pod {
            metadata,
            spec: Some(PodSpec {
                node_name: spec.node_name,
                host_network: spec.host_network,
                ..PodSpec::default()
            }),
            status: status.map(|s| PodStatus {
                phase: s.phase,
                ..PodStatus::default()
            }),
        };
        eligible(&pod)
    }
}

/// The eligible pods of the cluster, by uid.
#[derive(Debug, Default)]
pub struct PodCache {
    pods: Vec<PodKey>,
    index: HashMap<String, usize>,
}

impl PodCache {
    /// The candidates, for `netfault_k8s::select`.
    pub fn candidates(&self) -> &[PodKey] {
        &self.pods
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Records the pod `uid` as `key` (`None`: not eligible, so removed).
    /// Returns the namespaces whose candidates changed (none when the key
    /// is the one already cached: a status update changes nothing).
    pub fn update(&mut self, uid: &str, key: Option<PodKey>) -> Vec<String> {
        match (self.index.get(uid).copied(), key) {
            (Some(i), Some(k)) => {
                if self.pods[i] == k {
                    return Vec::new();
                }
                let old = std::mem::replace(&mut self.pods[i], k);
                let mut ns = vec![old.namespace];
                if self.pods[i].namespace != ns[0] {
                    ns.push(self.pods[i].namespace.clone());
                }
                ns
            }
            (None, Some(k)) => {
                let ns = k.namespace.clone();
                self.index.insert(uid.to_string(), self.pods.len());
                self.pods.push(k);
                vec![ns]
            }
            (Some(_), None) => self.remove(uid).into_iter().collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Forgets the pod; returns its namespace if it was cached.
    pub fn remove(&mut self, uid: &str) -> Option<String> {
        let i = self.index.remove(uid)?;
        let gone = self.pods.swap_remove(i);
        if let Some(moved) = self.pods.get(i) {
            self.index.insert(moved.uid.clone(), i);
        }
        Some(gone.namespace)
    }

    /// Replaces everything (a completed list).
    pub fn replace(&mut self, keys: Vec<PodKey>) {
        self.pods.clear();
        self.index.clear();
        for k in keys {
            self.update(&k.uid.clone(), Some(k));
        }
        self.pods.shrink_to_fit();
        self.index.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slim(v: serde_json::Value) -> SlimPod {
        serde_json::from_value(v).expect("a pod")
    }

    #[test]
    fn a_slim_pod_is_eligible_exactly_as_a_full_one() {
        let cases = [
            serde_json::json!({"metadata": {"name": "a", "namespace": "s", "uid": "u", "labels": {"app": "web"}},
                "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i"}]},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            serde_json::json!({"metadata": {"name": "a", "namespace": "s", "uid": "u"},
                "spec": {"nodeName": "n", "hostNetwork": true, "containers": []}}),
            serde_json::json!({"metadata": {"name": "a", "namespace": "s", "uid": "u"},
                "spec": {"containers": []}, "status": {"phase": "Pending"}}),
            serde_json::json!({"metadata": {"name": "a", "namespace": "s", "uid": "u"},
                "spec": {"nodeName": "n", "containers": []}, "status": {"phase": "Succeeded"}}),
            serde_json::json!({"metadata": {"name": "a", "namespace": "s", "uid": "u",
                "deletionTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "n", "containers": []}}),
        ];
        for c in cases {
            let full: Pod = serde_json::from_value(c.clone()).expect("a full pod");
            assert_eq!(slim(c.clone()).into_key(), eligible(&full), "{c}");
        }
    }

    fn key(uid: &str, ns: &str, app: &str) -> PodKey {
        PodKey {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("p-{uid}"),
            node: "n".into(),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[test]
    fn updates_report_only_real_changes() {
        let mut c = PodCache::default();
        assert_eq!(c.update("1", Some(key("1", "a", "web"))), vec!["a"]);
        assert_eq!(c.update("2", Some(key("2", "b", "web"))), vec!["b"]);
        assert!(c.update("1", Some(key("1", "a", "web"))).is_empty());
        assert_eq!(c.update("1", Some(key("1", "a", "db"))), vec!["a"]);
        assert_eq!(c.remove("1").as_deref(), Some("a"));
        assert_eq!(c.candidates(), &[key("2", "b", "web")]);
        assert_eq!(c.update("2", None), vec!["b"]);
        assert!(c.is_empty());
        c.replace(vec![key("3", "a", "x"), key("4", "a", "y")]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.remove("3").as_deref(), Some("a"));
        assert_eq!(c.update("4", None), vec!["a"], "index follows swap_remove");
    }
}
