//! The harness's error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A CRI call failed (the call is named in the message).
    #[error(transparent)]
    Cri(#[from] netfault_cri::CriError),
    /// A helper process (`containerd`, `ctr`, `umoci`, `build-image.sh`, ...)
    /// failed; its output is in the message.
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// The DaemonSet manifest has something the translation cannot express.
    #[error("daemonset manifest: {0}")]
    Manifest(String),
    /// A request to the agent's socket failed.
    #[error("{context}: {source}")]
    Api {
        context: String,
        #[source]
        source: netfault_api::ClientError,
    },
    /// A workspace binary is missing.
    #[error("{path} not found: run `cargo build --workspace` first")]
    MissingBinary { path: PathBuf },
    #[error(transparent)]
    Testbed(#[from] testbed::Error),
    /// Something did not happen in time.
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
    #[error("{0}")]
    Other(String),
}

/// Adds context to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

impl<T> IoContext<T> for std::result::Result<T, nix::errno::Errno> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io {
            context: what(),
            source: std::io::Error::from(e),
        })
    }
}

/// Runs a command to completion; a non-zero exit is [`Error::Command`] with
/// its stdout and stderr.
pub(crate) fn run(cmd: &mut std::process::Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .ctx(|| format!("running {shown}"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
