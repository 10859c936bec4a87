//! Entering a sandbox's network namespace: the [`Netns`] handle.
//!
//! The one place netfault calls `setns`. Work is run on a fresh OS thread that
//! joins the target netns and then exits, so no tokio worker (and no other
//! code) ever finds itself in a pod's namespace (docs/design.md, kernel facts: netlink sockets
//! and tc attachment bind to the caller's netns). A namespace is identified
//! by the (device, inode) of its nsfs file, not by its path, because a path can
//! be reused by a new namespace (ztunnel does the same).
//!
//! What it must not do: move a thread it did not start into a namespace
//! (callers' threads, tokio's workers), or know what the work it runs is.

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Identity of the namespace at `path` (checked to be a netns, as
/// [`Netns::open`] does).
pub fn identify(path: &Path) -> Result<NetnsId, NetnsError> {
    Netns::open(path).map(|ns| ns.id())
}

/// An open network namespace: the file is opened once and its identity
/// fixed then, so every later entry goes to that namespace even if its
/// path is reused. Cheap to clone (the file is shared). Holding one keeps
/// the namespace alive, so handles live only as long as the work that
/// needs them.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    id: NetnsId,
    file: Arc<File>,
}

/// Proof that the current thread is inside a [`Netns`]: only
/// [`Netns::run`] and [`Netns::spawn`] make one, and it cannot leave the
/// thread (`!Send`). Functions that must run inside a pod's netns (they
/// open netlink or netfilter sockets, which bind to the caller's netns)
/// take it.
pub struct InNetns {
    _thread_bound: PhantomData<*const ()>,
}

impl InNetns {
    fn new() -> InNetns {
        InNetns {
            _thread_bound: PhantomData,
        }
    }
}

impl Netns {
    /// Opens the namespace at `path` and fixes its identity.
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|e| open_error(path, e))?;
        let md = file.metadata().map_err(|e| open_error(path, e))?;
        let own = own_nsfs_dev()?;
        if md.dev() != own {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        Ok(Netns {
            path: path.to_path_buf(),
            id: NetnsId {
                dev: md.dev(),
                ino: md.ino(),
            },
            file: Arc::new(file),
        })
    }

    /// Opens the namespace at `path` if it is still the one identified by
    /// `id`; `None` when it is gone or the path now names another one.
    pub fn open_if_same(path: &Path, id: NetnsId) -> Result<Option<Netns>, NetnsError> {
        match Netns::open(path) {
            Ok(ns) if ns.id == id => Ok(Some(ns)),
            Ok(_) | Err(NetnsError::Gone { .. }) | Err(NetnsError::NotNetns { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread inside this namespace, and waits for it.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce(&InNetns) -> T + Send,
    {
        let file = &*self.file;
        let path = &self.path;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, move || -> Result<T, NetnsError> {
                    setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(f(&InNetns::new()))
                })
                .map_err(NetnsError::Spawn)?;
            handle
                .join()
                .map_err(|_| NetnsError::Panicked { path: path.clone() })?
        })
    }

    /// Starts a long-lived thread named `name` inside this namespace and
    /// runs `f` there (work that must stay in the pod's netns, such as
    /// creating sockets on demand). Returns once the thread is inside.
    pub fn spawn<F>(&self, name: &str, f: F) -> Result<std::thread::JoinHandle<()>, NetnsError>
    where
        F: FnOnce(&InNetns) + Send + 'static,
    {
        let file = self.file.clone();
        let owned = self.path.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let entered =
                    setns(&*file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                        path: owned,
                        source,
                    });
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                if ok {
                    f(&InNetns::new());
                }
            })
            .map_err(NetnsError::Spawn)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::Panicked {
                path: self.path.clone(),
            }),
        }
    }
}

fn own_nsfs_dev() -> Result<u64, NetnsError> {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.dev())
        .map_err(|source| NetnsError::Open {
            path: "/proc/self/ns/net".into(),
            source,
        })
}

/// The single non-loopback interface of the calling thread's netns, for
/// `{"netns": path}` targets that were never enrolled through CNI.
pub fn sole_interface_here(_inside: &InNetns) -> Result<String, String> {
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
