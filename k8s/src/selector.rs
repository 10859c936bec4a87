//! Label selectors, checked and matched as Kubernetes does
//! (apimachinery's `LabelSelectorAsSelector` and label validation).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use netfault_api::FieldError;

/// One `matchExpressions` entry (or a `matchLabels` pair, as `In` of one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Something that holds a pod's labels: a map, or the compact [`Labels`].
pub trait LabelSet {
    /// The value of label `key`, if the pod has it.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSet for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A pod's labels as selection keeps them for every pod of a cluster: the
/// pairs sorted by key in one boxed slice (a `BTreeMap` allocates a node of
/// eleven slots even for two labels: about 540 bytes more per pod).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl LabelSet for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Labels {
        let mut v: Vec<(String, String)> = iter.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        // As in a map: the last value of a repeated key wins.
        v.reverse();
        v.dedup_by(|a, b| a.0 == b.0);
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Labels(v.into_boxed_slice())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(m: BTreeMap<String, String>) -> Labels {
        Labels(m.into_iter().collect::<Vec<_>>().into_boxed_slice())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Labels {
        pairs.into_iter().collect()
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = String;
    /// Panics when the label is absent, as a map's index does.
    fn index(&self, key: &str) -> &String {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            Ok(i) => &self.0[i].1,
            Err(_) => panic!("no label {key:?}"),
        }
    }
}

impl Requirement {
    fn matches(&self, labels: &impl LabelSet) -> bool {
        match self {
            Requirement::In(k, vs) => labels.label(k).is_some_and(|v| vs.contains(v)),
            // As in Kubernetes: a pod without the label is not in the set.
            Requirement::NotIn(k, vs) => labels.label(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.label(k).is_some(),
            Requirement::DoesNotExist(k) => labels.label(k).is_none(),
        }
    }
}

/// A validated label selector. An empty selector matches every pod (of the
/// resource's namespace), as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Checks `s` (at `field`, e.g. `spec.selector`): label keys and values,
    /// operators, and values present exactly for `In` and `NotIn`.
    pub fn parse(s: &LabelSelector, field: &str) -> Result<Selector, FieldError> {
        let mut requirements = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            let at = format!("{field}.matchLabels[{k:?}]");
            check_key(k, &at)?;
            check_value(v, &at)?;
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            check_key(&e.key, &format!("{at}.key"))?;
            let values = e.values.as_deref().unwrap_or_default();
            let vat = format!("{at}.values");
            let need_values = |values: &[String]| -> Result<BTreeSet<String>, FieldError> {
                if values.is_empty() {
                    return Err(FieldError::invalid(
                        &vat,
                        &format!("must be non-empty for operator {}", e.operator),
                    ));
                }
                for (j, v) in values.iter().enumerate() {
                    check_value(v, &format!("{vat}[{j}]"))?;
                }
                Ok(values.iter().cloned().collect())
            };
            let no_values = |values: &[String]| -> Result<(), FieldError> {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(FieldError::invalid(
                        &vat,
                        &format!("must be empty for operator {}", e.operator),
                    ))
                }
            };
            let key = e.key.clone();
            requirements.push(match e.operator.as_str() {
                "In" => Requirement::In(key, need_values(values)?),
                "NotIn" => Requirement::NotIn(key, need_values(values)?),
                "Exists" => {
                    no_values(values)?;
                    Requirement::Exists(key)
                }
                "DoesNotExist" => {
                    no_values(values)?;
                    Requirement::DoesNotExist(key)
                }
                other => {
                    return Err(FieldError::invalid(
                        &format!("{at}.operator"),
                        &format!(
                            "unknown operator {other:?}; expected In, NotIn, Exists or DoesNotExist"
                        ),
                    ))
                }
            });
        }
        Ok(Selector { requirements })
    }

    /// Whether a pod with these labels is selected (every requirement holds).
    pub fn matches(&self, labels: &impl LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// A label name: alphanumerics at both ends, `-`, `_`, `.` inside, at most 63.
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain: lowercase labels joined by dots, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn check_key(k: &str, field: &str) -> Result<(), FieldError> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name(name),
        None => is_name(k),
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::invalid(
            field,
            &format!(
                "invalid label key {k:?}: an optional DNS subdomain prefix and '/', then at most \
                 63 characters, alphanumeric at both ends, with '-', '_' or '.' inside"
            ),
        ))
    }
}

/// A label value: empty, or a label name.
fn check_value(v: &str, field: &str) -> Result<(), FieldError> {
    if v.is_empty() || is_name(v) {
        Ok(())
    } else {
        Err(FieldError::invalid(
            field,
            &format!(
                "invalid label value {v:?}: at most 63 characters, alphanumeric at both ends, \
                 with '-', '_' or '.' inside"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: (!ml.is_empty()).then(|| labels(ml)),
            match_expressions: (!me.is_empty()).then_some(me),
        }
    }

    fn parse(s: LabelSelector) -> Result<Selector, FieldError> {
        Selector::parse(&s, "spec.selector")
    }

    #[test]
    fn operators_match_as_in_kubernetes() {
        let s = parse(sel(
            &[("app", "web")],
            vec![
                expr("tier", "In", Some(&["front", "edge"])),
                expr("canary", "NotIn", Some(&["true"])),
                expr("team", "Exists", None),
                expr("skip", "DoesNotExist", Some(&[])),
            ],
        ))
        .expect("valid");
        let base = [("app", "web"), ("tier", "front"), ("team", "a")];
        assert!(s.matches(&labels(&base)));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "edge"), ("team", "")])));
        // Each requirement, broken alone, deselects.
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "front"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("tier", "front"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("team", "a")])));
        let mut canary = labels(&base);
        canary.insert("canary".into(), "true".into());
        assert!(!s.matches(&canary));
        canary.insert("canary".into(), "false".into());
        assert!(s.matches(&canary), "NotIn lets other values through");
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        let mut skip = labels(&base);
        skip.insert("skip".into(), "".into());
        assert!(!s.matches(&skip));
    }

    #[test]
    fn compact_labels_match_as_the_map() {
        let s = parse(sel(
            &[("app", "web")],
            vec![
                expr("tier", "In", Some(&["front"])),
                expr("skip", "DoesNotExist", None),
            ],
        ))
        .expect("valid");
        for pairs in [
            &[("app", "web"), ("tier", "front")][..],
            &[("tier", "front"), ("app", "web"), ("z", "1")],
            &[("app", "web"), ("tier", "front"), ("skip", "")],
            &[("app", "db"), ("tier", "front")],
            &[],
        ] {
            let map = labels(pairs);
            let compact = Labels::from(map.clone());
            assert_eq!(s.matches(&compact), s.matches(&map), "{pairs:?}");
            let collected: Labels = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(collected, compact);
        }
        let l: Labels = [
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!((l.len(), l.get("a")), (1, Some("2")), "the last value wins");
    }

    #[test]
    fn an_empty_selector_matches_every_pod() {
        let s = parse(LabelSelector::default()).expect("valid");
        assert!(s.matches(&BTreeMap::new()));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    fn field_of(s: LabelSelector) -> String {
        match parse(s) {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(sel(&[], vec![expr("a", "Equals", Some(&["x"]))])),
            "spec.selector.matchExpressions[0].operator"
        );
        assert_eq!(
            field_of(sel(
                &[],
                vec![expr("a", "Exists", None), expr("b", "In", Some(&[]))]
            )),
            "spec.selector.matchExpressions[1].values"
        );
        assert_eq!(
            field_of(sel(&[], vec![expr("b", "NotIn", None)])),
            "spec.selector.matchExpressions[0].values"
        );
        assert_eq!(
            field_of(sel(&[], vec![expr("b", "Exists", Some(&["x"]))])),
            "spec.selector.matchExpressions[0].values"
        );
        assert_eq!(
            field_of(sel(&[], vec![expr("b", "In", Some(&["ok", "-bad"]))])),
            "spec.selector.matchExpressions[0].values[1]"
        );
        assert_eq!(
            field_of(sel(&[], vec![expr("", "Exists", None)])),
            "spec.selector.matchExpressions[0].key"
        );
        assert_eq!(
            field_of(sel(&[("bad key", "x")], vec![])),
            "spec.selector.matchLabels[\"bad key\"]"
        );
        assert_eq!(
            field_of(sel(&[("app", &"x".repeat(64))], vec![])),
            "spec.selector.matchLabels[\"app\"]"
        );
        assert_eq!(
            field_of(sel(&[("Example.com/app", "x")], vec![])),
            "spec.selector.matchLabels[\"Example.com/app\"]"
        );
        parse(sel(
            &[("app.kubernetes.io/name", "web"), ("empty", "")],
            vec![expr("example.com/tier", "In", Some(&["a.b_c-d"]))],
        ))
        .expect("prefixed keys, empty values and inner punctuation are valid");
    }
}
