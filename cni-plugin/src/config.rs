//! The plugin's network configuration (stdin), as the runtime hands it over:
//! the conflist entry with `name`, `cniVersion`, `prevResult` and
//! `runtimeConfig` injected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::{code, CniError};
use crate::version;

/// The capability through which containerd and CRI-O pass pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// The GC input key listing attachments that are still valid.
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// Default agent call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

pub use netfault_api::wire::FailurePolicy;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub socket: PathBuf,
    pub failure_policy: FailurePolicy,
    pub timeout: Duration,
    /// Pod annotations from `runtimeConfig` (empty when the runtime sent none).
    pub annotations: BTreeMap<String, String>,
    pub prev_result: Option<Value>,
    /// The whole input, for command-specific fields (GC's valid attachments).
    pub raw: Map<String, Value>,
}

/// Decodes and validates stdin. Errors: code 6 (not a JSON object), 1 (version), 7 (a field).
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("failed to decode network config from stdin: {e}"),
        )
    })?;
    let Value::Object(raw) = value else {
        return Err(CniError::new(
            code::DECODE,
            "failed to decode network config from stdin: expected a JSON object",
        ));
    };

    let cni_version = match raw.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion: missing; this plugin supports {}",
                    version::SUPPORTED.join(", ")
                ),
            ))
        }
        Some(_) => return Err(CniError::invalid_field("cniVersion", "must be a string")),
    };
    if !version::is_supported(&cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI versions; config is {cni_version:?}"),
        )
        .with_details(format!(
            "cniVersion: this plugin supports {}",
            version::SUPPORTED.join(", ")
        )));
    }

    if !matches!(
        raw.get("name"),
        None | Some(Value::Null) | Some(Value::String(_))
    ) {
        return Err(CniError::invalid_field("name", "must be a string"));
    }

    let socket = match raw.get("socket") {
        None | Some(Value::Null) => PathBuf::from(netfault_api::wire::DEFAULT_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => {
            return Err(CniError::invalid_field(
                "socket",
                "must be a non-empty path to netfaultd's unix socket",
            ))
        }
    };

    let failure_policy = match raw.get("failurePolicy") {
        None | Some(Value::Null) => FailurePolicy::Ignore,
        Some(Value::String(s)) if s == "ignore" => FailurePolicy::Ignore,
        Some(Value::String(s)) if s == "fail" => FailurePolicy::Fail,
        Some(other) => {
            return Err(CniError::invalid_field(
                "failurePolicy",
                format!("must be \"ignore\" or \"fail\", got {other}"),
            ))
        }
    };

    let timeout = match raw.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(Value::String(s)) => match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                return Err(CniError::invalid_field(
                    "timeout",
                    "must be greater than zero",
                ))
            }
            Err(e) => {
                return Err(CniError::invalid_field(
                    "timeout",
                    format!("must be a duration such as \"2s\" or \"500ms\", got {s:?}: {e}"),
                ))
            }
        },
        Some(other) => {
            return Err(CniError::invalid_field(
                "timeout",
                format!("must be a duration string such as \"2s\", got {other}"),
            ))
        }
    };

    let annotations = match raw.get("runtimeConfig") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(rc)) => annotations_from(rc)?,
        Some(_) => {
            return Err(CniError::invalid_field(
                "runtimeConfig",
                "must be an object",
            ))
        }
    };

    let prev_result = match raw.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(CniError::invalid_field("prevResult", "must be an object")),
    };

    Ok(NetConf {
        cni_version,
        socket,
        failure_policy,
        timeout,
        annotations,
        prev_result,
        raw,
    })
}

/// Annotation values are strings in Kubernetes; anything else is kept as its JSON text.
fn annotations_from(rc: &Map<String, Value>) -> Result<BTreeMap<String, String>, CniError> {
    match rc.get(ANNOTATIONS_CAPABILITY) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => Ok(m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()),
        Some(_) => Err(CniError::invalid_field(
            &format!("runtimeConfig.{ANNOTATIONS_CAPABILITY}"),
            "must be an object of annotation names to values",
        )),
    }
}

impl NetConf {
    /// GC input: the container ids of attachments that are still valid.
    pub fn valid_container_ids(&self) -> Result<BTreeSet<String>, CniError> {
        let field = VALID_ATTACHMENTS;
        let list = match self.raw.get(field) {
            None | Some(Value::Null) => return Ok(BTreeSet::new()),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(CniError::invalid_field(field, "must be a list")),
        };
        let mut ids = BTreeSet::new();
        for (i, a) in list.iter().enumerate() {
            match a.get("containerID") {
                Some(Value::String(id)) => {
                    ids.insert(id.clone());
                }
                _ => {
                    return Err(CniError::invalid_field(
                        &format!("{field}[{i}].containerID"),
                        "must be a string",
                    ))
                }
            }
        }
        Ok(ids)
    }

    /// `prevResult` with `cniVersion` set to this config's version.
    pub fn output_result(&self) -> Option<Value> {
        let mut r = self.prev_result.clone()?;
        if let Value::Object(m) = &mut r {
            m.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<NetConf, CniError> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn defaults() {
        let c = p(json!({"cniVersion":"1.0.0","name":"n","type":"netfault"})).expect("valid");
        assert_eq!(c.socket, PathBuf::from("/run/netfault/netfaultd.sock"));
        assert_eq!(c.failure_policy, FailurePolicy::Ignore);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert!(c.annotations.is_empty());
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn full_config() {
        let c = p(json!({
            "cniVersion":"0.4.0","name":"n","type":"netfault",
            "socket":"/tmp/x.sock","failurePolicy":"fail","timeout":"150ms",
            "capabilities":{"io.kubernetes.cri.pod-annotations":true},
            "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":"1","b":2}},
            "prevResult":{"cniVersion":"0.4.0","ips":[]}
        }))
        .expect("valid");
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.failure_policy, FailurePolicy::Fail);
        assert_eq!(c.timeout, Duration::from_millis(150));
        assert_eq!(c.annotations.get("a").map(String::as_str), Some("1"));
        assert_eq!(c.annotations.get("b").map(String::as_str), Some("2"));
        assert_eq!(c.output_result().expect("prev")["cniVersion"], "0.4.0");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(b"{not json").expect_err("bad json");
        assert_eq!(e.code, code::DECODE);
        let e = parse(b"[1]").expect_err("not an object");
        assert_eq!(e.code, code::DECODE);
        let e = p(json!({"cniVersion":"9.9.9"})).expect_err("version");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = p(json!({"name":"x"})).expect_err("no version");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = p(json!({"cniVersion":"1.0.0","failurePolicy":"maybe"})).expect_err("policy");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("failurePolicy"), "{}", e.msg);
        assert!(e.msg.contains("maybe"), "{}", e.msg);
        let e = p(json!({"cniVersion":"1.0.0","timeout":"soon"})).expect_err("timeout");
        assert!(e.msg.starts_with("timeout:"), "{}", e.msg);
        let e = p(json!({"cniVersion":"1.0.0","timeout":"0s"})).expect_err("zero timeout");
        assert!(e.msg.starts_with("timeout:"), "{}", e.msg);
        let e = p(json!({"cniVersion":"1.0.0","socket":""})).expect_err("socket");
        assert!(e.msg.starts_with("socket:"), "{}", e.msg);
        let e = p(json!({"cniVersion":"1.0.0","prevResult":[]})).expect_err("prevResult");
        assert!(e.msg.starts_with("prevResult:"), "{}", e.msg);
        let e = p(
            json!({"cniVersion":"1.0.0","runtimeConfig":{"io.kubernetes.cri.pod-annotations":"x"}}),
        )
        .expect_err("annotations");
        assert!(e.msg.contains("pod-annotations"), "{}", e.msg);
    }

    #[test]
    fn gc_attachments() {
        let c = p(json!({"cniVersion":"1.1.0","cni.dev/valid-attachments":[
            {"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]}))
        .expect("valid");
        let ids = c.valid_container_ids().expect("ids");
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec!["a", "b"]);
        let c = p(json!({"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}))
            .expect("valid");
        let e = c.valid_container_ids().expect_err("no id");
        assert!(e.msg.contains("[0].containerID"), "{}", e.msg);
    }
}
