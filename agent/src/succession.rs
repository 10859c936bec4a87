//! Which agent serves the node: one `netfaultd` per state dir, and a new
//! one taking over from a running one without a gap (see
//! `registry::handover` for the running agent's side).
//!
//! The serving agent holds an exclusive `flock` on `STATE_DIR/agent.lock`
//! for its whole life. An agent that starts while the lock is held asks the
//! holder to freeze over the socket (`POST /v1/handover`), installs every
//! fault beside it, commits (`POST /v1/handover/commit`), and only then
//! binds the socket (which replaces the path atomically). It takes the lock
//! when the earlier agent exits. If the holder does not answer (it is
//! exiting), the new agent waits for the lock and starts as after a restart.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

/// How long a new agent waits for the lock of an agent that does not answer.
const LOCK_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SuccessionError {
    #[error("the state lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another netfaultd holds {path} and did not let go within {LOCK_WAIT:?}")]
    Held { path: PathBuf },
    #[error("the running netfaultd refused the hand-over: {0}")]
    Refused(String),
}

/// How this agent starts.
pub enum Start {
    /// No other agent runs: this one holds the lock.
    Alone(Flock<File>),
    /// Another agent runs and is frozen for this one.
    Successor(Successor),
}

/// A hand-over in progress (the running agent frozen for `id`).
pub struct Successor {
    id: u64,
    socket: PathBuf,
    lock: File,
    lock_path: PathBuf,
    successor_lock: Flock<File>,
}

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// The lock a new agent holds from before it freezes the running one until
/// it holds `agent.lock` itself: the frozen agent sees it go if the new one
/// dies, and serves again at once (see `registry::handover`).
pub fn successor_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("successor.lock")
}

/// Whether a new agent holds the successor lock (it is alive).
pub fn successor_alive(state_dir: &Path) -> bool {
    let Ok(file) = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(successor_lock_path(state_dir))
    else {
        // Cannot tell: the freeze limit decides.
        return true;
    };
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// Takes the lock, or freezes the agent that holds it.
pub fn begin(state_dir: &Path, socket: &Path) -> Result<Start, SuccessionError> {
    let path = lock_path(state_dir);
    let io = |source| SuccessionError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    // std opens with O_CLOEXEC: holder processes never inherit the lock.
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => return Ok(Start::Alone(held)),
        Err((file, Errno::EWOULDBLOCK)) => file,
        Err((_, e)) => return Err(io(e.into())),
    };
    // Held until this agent holds agent.lock: one new agent at a time, and
    // the frozen agent sees it if this one dies before committing.
    let succ_path = successor_lock_path(state_dir);
    let succ = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&succ_path)
        .map_err(|source| SuccessionError::Lock {
            path: succ_path.clone(),
            source,
        })?;
    let successor_lock = match Flock::lock(succ, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, Errno::EWOULDBLOCK)) => {
            return Err(SuccessionError::Refused(
                "another new agent is taking the node over".into(),
            ))
        }
        Err((_, e)) => {
            return Err(SuccessionError::Lock {
                path: succ_path,
                source: e.into(),
            })
        }
    };
    let id = rand::random::<u64>() >> 11;
    let client = netfault_api::Client::new(socket).with_timeout(Duration::from_secs(20));
    match client.call("POST", "/v1/handover", Some(&json!({ "successor": id }))) {
        Ok(_) => {
            tracing::info!(
                successor = id,
                "another netfaultd serves this node: it is frozen, taking over"
            );
            Ok(Start::Successor(Successor {
                id,
                socket: socket.to_path_buf(),
                lock: file,
                lock_path: path,
                successor_lock,
            }))
        }
        Err(netfault_api::ClientError::Api {
            status, message, ..
        }) if status != 404 => Err(SuccessionError::Refused(format!("{status}: {message}"))),
        Err(e) => {
            // It holds the lock but does not serve: it is exiting (or an
            // older agent without hand-over). Start once it is gone.
            tracing::info!(error = %e, "another netfaultd holds the state lock but does not hand over; waiting for it to exit");
            wait_for_lock(file, &path).map(Start::Alone)
        }
    }
}

fn wait_for_lock(mut file: File, path: &Path) -> Result<Flock<File>, SuccessionError> {
    let until = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(held),
            Err((f, Errno::EWOULDBLOCK)) if std::time::Instant::now() < until => {
                file = f;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(SuccessionError::Held {
                    path: path.to_path_buf(),
                })
            }
            Err((_, e)) => {
                return Err(SuccessionError::Lock {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    }
}

impl Successor {
    /// Everything is installed: the earlier agent retires. Then the lock
    /// is taken in the background when it exits, and kept for good.
    pub fn commit(self) -> Result<(), SuccessionError> {
        let client = netfault_api::Client::new(&self.socket).with_timeout(Duration::from_secs(20));
        match client.call(
            "POST",
            "/v1/handover/commit",
            Some(&json!({ "successor": self.id })),
        ) {
            Ok(_) => {
                tracing::info!(
                    successor = self.id,
                    "took the node over; the earlier agent retires"
                )
            }
            // A refusal: the freeze ended (this agent took too long) and
            // the earlier agent serves again; two agents must not both.
            Err(e @ netfault_api::ClientError::Api { .. }) => {
                return Err(SuccessionError::Refused(e.to_string()))
            }
            // It exited meanwhile (SIGTERM while frozen): the node is ours.
            Err(e) => tracing::warn!(error = %e, "the earlier agent is gone; serving the node"),
        }
        let Successor {
            lock,
            lock_path,
            successor_lock,
            ..
        } = self;
        std::thread::Builder::new()
            .name("state-lock".into())
            .spawn(move || match Flock::lock(lock, FlockArg::LockExclusive) {
                Ok(held) => {
                    tracing::info!(lock = %lock_path.display(), "the earlier agent exited; holding the state lock");
                    // Held until this process exits; the next new agent
                    // may take the successor lock now.
                    std::mem::forget(held);
                    drop(successor_lock);
                }
                Err((_, e)) => tracing::warn!(error = %e, "taking the state lock"),
            })
            .map_err(|e| SuccessionError::Lock {
                path: PathBuf::from("state-lock thread"),
                source: e,
            })?;
        Ok(())
    }
}
