//! Named crash points, for the tests that kill the agent between every two
//! externally visible steps (`tests/netns/crash.rs`).
//!
//! Off unless the agent starts with `NETFAULT_CRASH_FILE=PATH` in its
//! environment. Then every [`point`] reads PATH: when it holds the point's
//! name, the agent removes the file (so the next agent runs through) and
//! sends itself SIGKILL, exactly as if the node had killed it there. Without
//! the variable a point costs one load of an initialized `OnceLock`.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable that arms the crash points.
pub const ENV: &str = "NETFAULT_CRASH_FILE";

fn armed() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
        .as_ref()
}

/// A crash point: SIGKILL here if the crash file names `name`.
pub fn point(name: &str) {
    let Some(file) = armed() else {
        return;
    };
    let Ok(wanted) = std::fs::read_to_string(file) else {
        return;
    };
    if wanted.trim() != name {
        return;
    }
    let _ = std::fs::remove_file(file);
    tracing::warn!(point = name, "crash point reached: SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

/// [`point`] for a step of one backend: `STEP.BACKEND`.
pub fn backend_point(step: &str, kind: netfault_api::BackendKind) {
    point_of(step, kind.as_str());
}

/// [`point`] named `FIRST.SECOND` (built only when armed).
pub fn point_of(first: &str, second: &str) {
    if armed().is_some() {
        point(&format!("{first}.{second}"));
    }
}
