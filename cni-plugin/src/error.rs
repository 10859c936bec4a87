//! CNI error codes and the error JSON the plugin prints on stdout.

use serde_json::{json, Value};

/// CNI spec error codes (SPEC.md, "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables, like CNI_COMMAND or CNI_CONTAINERID.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure, for example reading stdin.
    pub const IO: u32 = 5;
    /// Failed to decode content (stdin is not JSON, or has the wrong shape).
    pub const DECODE: u32 = 6;
    /// Invalid network config: a field has a value the plugin rejects.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (here, the agent is unavailable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The plugin is not available (STATUS).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: CHECK found the sandbox not enrolled with the agent.
    pub const NOT_ENROLLED: u32 = 999;
}

/// A CNI error: printed as `{"cniVersion","code","msg","details"}` with exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// An invalid-config error (code 7) that names the offending field.
    pub fn invalid_field(field: &str, problem: impl std::fmt::Display) -> Self {
        CniError::new(code::INVALID_CONFIG, format!("{field}: {problem}"))
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_shape() {
        let e = CniError::invalid_field("failurePolicy", "bad").with_details("more");
        let v = e.to_json("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "failurePolicy: bad");
        assert_eq!(v["details"], "more");
        let v = CniError::new(code::DECODE, "x").to_json("0.4.0");
        assert!(v.get("details").is_none());
    }
}
