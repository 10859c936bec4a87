//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`.

use crate::error::{code, CniError};

/// The environment variables the plugin reads. Empty values count as unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }

    /// An `Env` from literal `(name, value)` pairs (tests, fuzzing).
    pub fn from_pairs(vars: &[(&str, &str)]) -> Self {
        Env::from_lookup(|k| {
            vars.iter()
                .rev()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_string())
        })
    }

    /// The process environment (used by the C entry point, not in unit tests).
    #[cfg_attr(test, allow(dead_code))]
    pub fn from_process() -> Self {
        Env::from_lookup(|k| std::env::var(k).ok())
    }

    /// Checks the variables `command` needs (as the reference `skel` does).
    pub fn require_for(&self, command: &str) -> Result<(), CniError> {
        let mut missing = Vec::new();
        let per_attachment = matches!(command, "ADD" | "DEL" | "CHECK");
        if per_attachment {
            if self.container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if self.ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
            if command != "DEL" && self.netns.is_none() {
                missing.push("CNI_NETNS");
            }
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(", ")),
            ));
        }
        if let Some(id) = &self.container_id {
            validate_container_id(id)?;
        }
        if let Some(ifname) = &self.ifname {
            validate_ifname(ifname)?;
        }
        Ok(())
    }
}

/// Container ids end up in the agent's URL path, so only the characters the
/// reference plugins accept are allowed: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID: invalid characters in container id {id:?}"),
        ))
    }
}

/// Linux interface names: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.len() > 15 {
        Some("is longer than 15 characters")
    } else if name == "." || name == ".." {
        Some("cannot be '.' or '..'")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME: interface name {name:?} {p}"),
        )),
    }
}

/// The Kubernetes fields of `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub infra_container_id: String,
}

impl PodArgs {
    pub fn is_empty(&self) -> bool {
        self.namespace.is_empty() && self.name.is_empty() && self.uid.is_empty()
    }
}

/// Parses `K1=V1;K2=V2`. Unknown keys are ignored, as are pairs without `=`
/// (returned as warnings): a malformed `CNI_ARGS` must not stop a pod.
pub fn parse_cni_args(s: &str) -> (PodArgs, Vec<String>) {
    let mut pod = PodArgs::default();
    let mut warnings = Vec::new();
    for pair in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            warnings.push(format!("CNI_ARGS: ignoring {pair:?}: not KEY=VALUE"));
            continue;
        };
        let v = v.to_string();
        match k.trim() {
            "K8S_POD_NAMESPACE" => pod.namespace = v,
            "K8S_POD_NAME" => pod.name = v,
            "K8S_POD_UID" => pod.uid = v,
            "K8S_POD_INFRA_CONTAINER_ID" => pod.infra_container_id = v,
            _ => {}
        }
    }
    (pod, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_pairs(vars)
    }

    #[test]
    fn cni_args_as_containerd_sends_them() {
        let (pod, warnings) = parse_cni_args(
            "K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1-2-3;IgnoreUnknown=1;K8S_POD_NAMESPACE=default",
        );
        assert!(warnings.is_empty());
        assert_eq!(
            pod,
            PodArgs {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "1-2-3".into(),
                infra_container_id: "abc123".into(),
            }
        );
    }

    #[test]
    fn cni_args_tolerates_junk() {
        let (pod, warnings) = parse_cni_args(";;K8S_POD_NAME=a=b; junk ;FOO=bar;");
        assert_eq!(pod.name, "a=b");
        assert!(pod.namespace.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(parse_cni_args("").0.is_empty());
    }

    #[test]
    fn required_env() {
        let e = env(&[("CNI_COMMAND", "ADD")]);
        let err = e.require_for("ADD").expect_err("missing");
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("CNI_CONTAINERID"), "{}", err.msg);
        assert!(err.msg.contains("CNI_NETNS"), "{}", err.msg);

        let e = env(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]);
        assert!(e.require_for("DEL").is_ok(), "DEL needs no netns");
        assert!(
            e.require_for("ADD").is_err(),
            "empty CNI_NETNS counts as unset"
        );
        assert!(e.require_for("STATUS").is_ok());

        let e = env(&[("CNI_CONTAINERID", "../etc"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(
            e.require_for("DEL").expect_err("bad id").code,
            code::INVALID_ENV
        );
        let e = env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "a/b")]);
        assert_eq!(
            e.require_for("DEL").expect_err("bad ifname").code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn container_ids() {
        assert!(validate_container_id("0123abcdef").is_ok());
        assert!(validate_container_id("a_b.c-d").is_ok());
        for bad in ["", "-a", "a/b", "a b", "a?b", "a%2f"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("0123456789abcdef").is_err());
        assert!(validate_ifname("..").is_err());
    }
}
