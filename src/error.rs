//! The harness's error type.

use serde_json::Value;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::errno::Errno,
    },
    /// A CNI plugin exited non-zero.
    #[error("{0}")]
    Plugin(Box<PluginError>),
    #[error("netfaultd: {0}")]
    Agent(String),
    /// A request to the agent's API failed (or it refused it).
    #[error("{context}: {source}")]
    Api {
        context: String,
        #[source]
        source: netfault_api::ClientError,
    },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The plugin failure, when this is one.
    pub fn plugin(&self) -> Option<&PluginError> {
        match self {
            Error::Plugin(p) => Some(p),
            _ => None,
        }
    }
}

/// A CNI plugin that failed: its command, exit code, stdout (a CNI error JSON
/// when the plugin follows the spec) and stderr.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CNI plugin {plugin} {command} failed (exit {exit_code:?}): {stdout} {stderr}")]
pub struct PluginError {
    /// The plugin `type`.
    pub plugin: String,
    /// `ADD`, `DEL`, `CHECK`, ...
    pub command: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// `stdout` parsed as JSON, if it is JSON.
    pub cni_error: Option<Value>,
}

impl PluginError {
    /// The CNI error `code`, if stdout carried one.
    pub fn code(&self) -> Option<u64> {
        self.cni_error.as_ref()?.get("code")?.as_u64()
    }

    /// The CNI error `msg`, or empty.
    pub fn msg(&self) -> &str {
        self.cni_error
            .as_ref()
            .and_then(|e| e.get("msg"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Adds context to I/O and syscall errors.
pub(crate) trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, netfault_api::ClientError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Api {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            context: context(),
            source,
        })
    }
}
