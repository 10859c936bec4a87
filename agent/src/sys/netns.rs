//! Entering a sandbox's network namespace.
//!
//! The one place netfault calls `setns`. Work is run on a fresh OS thread that
//! joins the target netns and then exits, so no tokio worker (and no other
//! code) ever finds itself in a pod's namespace (KERNEL-NOTES: netlink sockets
//! and tc attachment bind to the caller's netns). A namespace is identified
//! by the (device, inode) of its nsfs file, not by its path, because a path can
//! be reused by a new namespace (ztunnel does the same).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist")]
    Gone { path: PathBuf },
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("thread working in network namespace {path} panicked")]
    Panicked { path: PathBuf },
    #[error("starting a thread: {0}")]
    Spawn(std::io::Error),
}

/// Stable identity of a network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

fn open_error(path: &Path, source: std::io::Error) -> NetnsError {
    let path = path.to_path_buf();
    if source.kind() == std::io::ErrorKind::NotFound {
        NetnsError::Gone { path }
    } else {
        NetnsError::Open { path, source }
    }
}

/// Identity of the namespace at `path`. Also checks that it is a netns by
/// comparing with the nsfs device of our own.
pub fn identify(path: &Path) -> Result<NetnsId, NetnsError> {
    let md = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
    let own = std::fs::metadata("/proc/self/ns/net").map_err(|source| NetnsError::Open {
        path: "/proc/self/ns/net".into(),
        source,
    })?;
    if md.dev() != own.dev() {
        return Err(NetnsError::NotNetns {
            path: path.to_path_buf(),
        });
    }
    Ok(NetnsId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// Runs `f` on a new thread inside the network namespace at `path`.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = File::open(path).map_err(|e| open_error(path, e))?;
    let owned = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: owned,
                source,
            })?;
            Ok(f())
        })
        .map_err(NetnsError::Spawn)?;
    handle.join().map_err(|_| NetnsError::Panicked {
        path: path.to_path_buf(),
    })?
}

/// The single non-loopback interface of the calling thread's netns, for
/// `{"netns": path}` targets that were never enrolled through CNI.
pub fn sole_interface_here() -> Result<String, String> {
    let names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(|e| format!("listing interfaces: {e}"))?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("has no interface besides lo".into()),
        many => Err(format!(
            "has several interfaces ({}); enrol it with PUT /v1/sandboxes to choose one",
            many.join(", ")
        )),
    }
}

/// Starts a long-lived thread named `name` inside the network namespace at
/// `path` and runs `f` there (for work that must stay in the pod's netns,
/// such as creating sockets on demand). Returns once the thread is inside.
pub fn spawn_in<F>(path: &Path, name: &str, f: F) -> Result<std::thread::JoinHandle<()>, NetnsError>
where
    F: FnOnce() + Send + 'static,
{
    let file = File::open(path).map_err(|e| open_error(path, e))?;
    let owned = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let entered =
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: owned,
                    source,
                });
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if ok {
                f();
            }
        })
        .map_err(NetnsError::Spawn)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(NetnsError::Panicked {
            path: path.to_path_buf(),
        }),
    }
}
