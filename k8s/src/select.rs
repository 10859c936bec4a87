//! Which pods a NetworkFault applies to: one choice that every node makes
//! alike, with no controller and no coordination.
//!
//! Every node agent watches the pods of the resource's namespace cluster-wide,
//! keeps the [`eligible`] ones as [`PodKey`]s, and calls [`select`]: the pods
//! the selector matches, ordered by [`stable_hash`] of the resource's uid and
//! the pod's uid (rendezvous hashing), first N. The order depends only on the
//! uids, so two nodes with the same candidates choose the same pods whatever
//! order their caches list them in; a pod that appears or goes away moves at
//! most one pod in or out of a `fixed` choice. Each node then applies the
//! fault to the chosen pods whose `node` is its own.
//!
//! The hash is FNV-1a (64 bit) over `resource_uid`, a zero byte and
//! `pod_uid`, finished with MurmurHash3's 64-bit mixer: fixed, portable and
//! independent of std's randomized hasher. Changing it changes which pods
//! agents of different versions choose, so it must not change within
//! `v1alpha1`.

use k8s_openapi::api::core::v1::Pod;

use crate::selector::{Labels, Selector};

/// How many of the matching pods a resource affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every matching pod.
    All,
    /// One matching pod.
    One,
    /// `min(N, matching)` pods; N ≥ 1.
    Fixed(u32),
    /// `ceil(matching × p / 100)` pods; p in 1..=100.
    FixedPercent(u8),
}

impl Mode {
    /// How many pods of `matching` this mode takes.
    pub fn count(self, matching: usize) -> usize {
        match self {
            Mode::All => matching,
            Mode::One => matching.min(1),
            Mode::Fixed(n) => matching.min(n as usize),
            Mode::FixedPercent(p) => (matching * p as usize).div_ceil(100),
        }
    }
}

/// What selection needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodKey {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The node it is scheduled on (not part of the choice: each node uses it
    /// to find its own share).
    pub node: String,
    pub labels: Labels,
}

/// The pod as a selection candidate, or `None` when no fault can apply to
/// it: not scheduled, being deleted, finished (`Succeeded`/`Failed`), on the
/// host's network, or without a uid. Every node must filter alike, so the
/// agent uses exactly this.
pub fn eligible(pod: &Pod) -> Option<PodKey> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodKey {
        uid: meta.uid.clone().filter(|u| !u.is_empty())?,
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        node: spec.node_name.clone().filter(|n| !n.is_empty())?,
        labels: meta.labels.clone().map(Labels::from).unwrap_or_default(),
    })
}

/// FNV-1a 64 of `resource_uid`, 0, `pod_uid`, then MurmurHash3's fmix64.
pub fn stable_hash(resource_uid: &str, pod_uid: &str) -> u64 {
    let bytes = resource_uid
        .as_bytes()
        .iter()
        .chain(&[0u8])
        .chain(pod_uid.as_bytes());
    fmix64(fnv1a64(bytes.copied()))
}

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .into_iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// MurmurHash3's 64-bit finalizer: every input bit flips about half the
/// output bits (FNV alone mixes the last bytes into the high bits poorly).
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The uids of the pods the resource `resource_uid` (in `namespace`) applies
/// to: the candidates in `namespace` that `selector` matches, ordered by
/// [`stable_hash`] (then uid), the first [`Mode::count`]. Duplicated uids
/// count once.
pub fn select(
    resource_uid: &str,
    namespace: &str,
    selector: &Selector,
    mode: Mode,
    candidates: &[PodKey],
) -> Vec<String> {
    let mut matching: Vec<(u64, &str)> = candidates
        .iter()
        .filter(|p| p.namespace == namespace && selector.matches(&p.labels))
        .map(|p| (stable_hash(resource_uid, &p.uid), p.uid.as_str()))
        .collect();
    matching.sort_unstable();
    matching.dedup_by(|a, b| a.1 == b.1);
    let n = mode.count(matching.len());
    matching
        .into_iter()
        .take(n)
        .map(|(_, uid)| uid.to_string())
        .collect()
}

/// The one node that reports on a resource whose spec is invalid (so that
/// not every node writes a status entry and an Event): the node of the
/// namespace's candidate with the lowest [`stable_hash`]. `None` when the
/// namespace has no candidate (then no pod could be affected either).
pub fn reporter_node<'a>(
    resource_uid: &str,
    namespace: &str,
    candidates: &'a [PodKey],
) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|p| p.namespace == namespace)
        .min_by_key(|p| (stable_hash(resource_uid, &p.uid), p.uid.as_str()))
        .map(|p| p.node.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Requirement;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    fn uuid(rng: &mut StdRng) -> String {
        let b: [u8; 16] = rng.random();
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn pod(rng: &mut StdRng, ns: &str, app: &str, node: usize) -> PodKey {
        let uid = uuid(rng);
        PodKey {
            name: format!("{app}-{}", &uid[..5]),
            uid,
            namespace: ns.into(),
            node: format!("node-{node}"),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]).into(),
        }
    }

    fn web() -> Selector {
        Selector {
            requirements: vec![Requirement::In(
                "app".into(),
                BTreeSet::from(["web".to_string()]),
            )],
        }
    }

    /// 30 web pods and 10 db pods in "shop", 10 web pods in "other", on 5 nodes.
    fn cluster(rng: &mut StdRng) -> Vec<PodKey> {
        let mut v = Vec::new();
        for i in 0..30 {
            v.push(pod(rng, "shop", "web", i % 5));
        }
        for i in 0..10 {
            v.push(pod(rng, "shop", "db", i % 5));
            v.push(pod(rng, "other", "web", i % 5));
        }
        v
    }

    const MODES: [Mode; 7] = [
        Mode::All,
        Mode::One,
        Mode::Fixed(1),
        Mode::Fixed(7),
        Mode::Fixed(100),
        Mode::FixedPercent(1),
        Mode::FixedPercent(33),
    ];

    #[test]
    fn counts_follow_the_mode() {
        assert_eq!(Mode::All.count(30), 30);
        assert_eq!(Mode::One.count(30), 1);
        assert_eq!(Mode::One.count(0), 0);
        assert_eq!(Mode::Fixed(7).count(30), 7);
        assert_eq!(Mode::Fixed(100).count(30), 30);
        assert_eq!(Mode::FixedPercent(1).count(30), 1, "rounded up");
        assert_eq!(Mode::FixedPercent(33).count(30), 10);
        assert_eq!(Mode::FixedPercent(34).count(30), 11);
        assert_eq!(Mode::FixedPercent(100).count(30), 30);
        assert_eq!(Mode::FixedPercent(50).count(0), 0);
        let mut rng = StdRng::seed_from_u64(1);
        let pods = cluster(&mut rng);
        for mode in MODES {
            let chosen = select("r", "shop", &web(), mode, &pods);
            assert_eq!(chosen.len(), mode.count(30), "{mode:?}");
            let web_shop: BTreeSet<&str> = pods
                .iter()
                .filter(|p| p.namespace == "shop" && p.labels["app"] == "web")
                .map(|p| p.uid.as_str())
                .collect();
            assert!(
                chosen.iter().all(|u| web_shop.contains(u.as_str())),
                "{mode:?}: only matching pods of the namespace"
            );
            let unique: BTreeSet<&String> = chosen.iter().collect();
            assert_eq!(unique.len(), chosen.len(), "{mode:?}: no pod twice");
        }
    }

    #[test]
    fn the_choice_does_not_depend_on_the_input_order() {
        let mut rng = StdRng::seed_from_u64(2);
        for round in 0..200 {
            let mut pods = cluster(&mut rng);
            let rid = uuid(&mut rng);
            for mode in MODES {
                let first = select(&rid, "shop", &web(), mode, &pods);
                pods.shuffle(&mut rng);
                assert_eq!(
                    select(&rid, "shop", &web(), mode, &pods),
                    first,
                    "round {round}, {mode:?}"
                );
                let mut doubled = pods.clone();
                doubled.extend(pods.iter().take(5).cloned());
                doubled.shuffle(&mut rng);
                assert_eq!(select(&rid, "shop", &web(), mode, &doubled), first);
            }
        }
    }

    /// Two nodes with the same pods (each from its own cache, in its own
    /// order) choose the same pods; together their shares are the choice,
    /// with no pod taken twice or left out.
    #[test]
    fn every_node_sees_the_same_choice() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let pods = cluster(&mut rng);
            let rid = uuid(&mut rng);
            for mode in MODES {
                let mut shares = Vec::new();
                let mut reference = None;
                for node in 0..5 {
                    let mut view = pods.clone();
                    view.shuffle(&mut rng);
                    let chosen = select(&rid, "shop", &web(), mode, &view);
                    let name = format!("node-{node}");
                    let mine: Vec<&PodKey> = view
                        .iter()
                        .filter(|p| p.node == name && chosen.contains(&p.uid))
                        .collect();
                    shares.extend(mine.iter().map(|p| p.uid.clone()));
                    assert_eq!(reference.get_or_insert(chosen.clone()), &chosen);
                }
                shares.sort();
                let mut all = reference.expect("five nodes");
                all.sort();
                assert_eq!(shares, all, "{mode:?}");
            }
        }
    }

    #[test]
    fn pods_that_do_not_match_change_nothing() {
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..100 {
            let mut pods = cluster(&mut rng);
            let rid = uuid(&mut rng);
            let before: Vec<_> = MODES
                .iter()
                .map(|m| select(&rid, "shop", &web(), *m, &pods))
                .collect();
            for _ in 0..10 {
                let n = rng.random_range(0..5);
                pods.push(pod(&mut rng, "shop", "cache", n));
                pods.push(pod(&mut rng, "elsewhere", "web", n));
            }
            pods.shuffle(&mut rng);
            let after: Vec<_> = MODES
                .iter()
                .map(|m| select(&rid, "shop", &web(), *m, &pods))
                .collect();
            assert_eq!(before, after);
        }
    }

    /// Rendezvous hashing: one more matching pod moves at most one pod in or
    /// out of a fixed choice; one fewer (not chosen) moves none.
    #[test]
    fn churn_moves_at_most_one_pod() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let mut pods = cluster(&mut rng);
            let rid = uuid(&mut rng);
            let before: BTreeSet<String> = select(&rid, "shop", &web(), Mode::Fixed(7), &pods)
                .into_iter()
                .collect();
            pods.push(pod(&mut rng, "shop", "web", 0));
            let after: BTreeSet<String> = select(&rid, "shop", &web(), Mode::Fixed(7), &pods)
                .into_iter()
                .collect();
            assert!(before.difference(&after).count() <= 1);
            // Remove a pod that was not chosen: nothing moves.
            let i = pods
                .iter()
                .position(|p| p.labels["app"] == "web" && !after.contains(&p.uid))
                .expect("an unchosen web pod");
            pods.remove(i);
            let again: BTreeSet<String> = select(&rid, "shop", &web(), Mode::Fixed(7), &pods)
                .into_iter()
                .collect();
            assert_eq!(again, after);
        }
    }

    /// Over many resources, `one` picks each of 10 pods about equally often,
    /// and the pair choice of `fixed 2` is not biased to neighbours.
    #[test]
    fn choices_are_spread_evenly_over_resources() {
        let mut rng = StdRng::seed_from_u64(6);
        let pods: Vec<PodKey> = (0..10).map(|i| pod(&mut rng, "shop", "web", i)).collect();
        let rounds = 20_000;
        let mut hits: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..rounds {
            let rid = uuid(&mut rng);
            for uid in select(&rid, "shop", &web(), Mode::One, &pods) {
                *hits.entry(uid).or_default() += 1;
            }
        }
        assert_eq!(hits.len(), 10, "every pod is chosen sometimes");
        // Chi-square with 9 degrees of freedom: 27.9 is the 0.1% tail.
        let expected = f64::from(rounds) / 10.0;
        let chi2: f64 = hits
            .values()
            .map(|h| (f64::from(*h) - expected).powi(2) / expected)
            .sum();
        println!("one of 10 pods over {rounds} resource uids: chi-square {chi2:.1}");
        assert!(chi2 < 27.9, "chi-square {chi2:.1}: {hits:?}");
        // Sequential uids (as a test or a generator might make) spread too.
        let seq: Vec<PodKey> = (0..10)
            .map(|i| PodKey {
                uid: format!("00000000-0000-0000-0000-00000000000{i}"),
                ..pods[i].clone()
            })
            .collect();
        let mut hits = [0u32; 10];
        for r in 0..rounds {
            let rid = format!("11111111-0000-0000-0000-{r:012}");
            let chosen = select(&rid, "shop", &web(), Mode::One, &seq);
            let i = seq.iter().position(|p| p.uid == chosen[0]).expect("chosen");
            hits[i] += 1;
        }
        let chi2: f64 = hits
            .iter()
            .map(|h| (f64::from(*h) - expected).powi(2) / expected)
            .sum();
        println!("sequential uids: chi-square {chi2:.1}, hits {hits:?}");
        assert!(
            chi2 < 27.9,
            "sequential uids: chi-square {chi2:.1}: {hits:?}"
        );
    }

    #[test]
    fn the_hash_is_fixed() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(*b"foobar"), 0x8594_4171_f739_67e8);
        // MurmurHash3 fmix64 fixes 0 and is a bijection (spot check).
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), fmix64(2));
        // The separator keeps ("a", "b") apart from ("ab", "") and ("b", "a").
        assert_ne!(stable_hash("a", "b"), stable_hash("ab", ""));
        assert_ne!(stable_hash("a", "b"), stable_hash("b", "a"));
        // Agents of different builds must agree: pin the composition.
        assert_eq!(
            stable_hash("r", "p"),
            fmix64(fnv1a64(*b"r\0p")),
            "resource uid, a zero byte, pod uid"
        );
        assert_eq!(
            [
                stable_hash("", ""),
                stable_hash("r", "p"),
                stable_hash(
                    "5f0b6a2e-1c55-4d6e-9a3b-0c7d8e9f1a2b",
                    "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
                ),
            ],
            [
                13331581593930102267,
                10818361873191071024,
                5593478580061787672
            ]
        );
    }

    #[test]
    fn the_reporter_is_one_node_all_agree_on() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut pods = cluster(&mut rng);
        let first = reporter_node("r", "shop", &pods).map(str::to_string);
        assert!(first.is_some());
        pods.shuffle(&mut rng);
        assert_eq!(reporter_node("r", "shop", &pods).map(str::to_string), first);
        assert_eq!(reporter_node("r", "empty", &pods), None);
    }

    fn k8s_pod(phase: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
            "status": {"phase": phase}
        }))
        .expect("a pod")
    }

    #[test]
    fn only_running_scheduled_pod_network_pods_are_candidates() {
        let k = eligible(&k8s_pod(Some("Running"))).expect("a candidate");
        assert_eq!(
            (
                k.uid.as_str(),
                k.namespace.as_str(),
                k.name.as_str(),
                k.node.as_str()
            ),
            ("u-1", "shop", "web-1", "node-a")
        );
        assert_eq!(k.labels["app"], "web");
        assert!(eligible(&k8s_pod(Some("Pending"))).is_some());
        assert!(eligible(&k8s_pod(None)).is_some());
        assert!(eligible(&k8s_pod(Some("Succeeded"))).is_none());
        assert!(eligible(&k8s_pod(Some("Failed"))).is_none());
        let mut p = k8s_pod(Some("Running"));
        p.spec.as_mut().expect("spec").host_network = Some(true);
        assert!(eligible(&p).is_none(), "host network");
        let mut p = k8s_pod(Some("Running"));
        p.spec.as_mut().expect("spec").node_name = None;
        assert!(eligible(&p).is_none(), "not scheduled");
        let mut p = k8s_pod(Some("Running"));
        p.metadata.deletion_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).expect("time"));
        assert!(eligible(&p).is_none(), "being deleted");
    }
}
