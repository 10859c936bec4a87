//! Hand-over to a new agent without a gap (a DaemonSet rollout with
//! `maxSurge`, or a second `netfaultd` started on the same state dir).
//!
//! The new agent asks this one to **freeze** (`POST /v1/handover`): from
//! then on every change is refused with 503 `unavailable` (the CNI plugin
//! records ADDs as pending, the new agent adopts them), the reaper rests,
//! and the state file is final. The new agent loads it and installs every
//! fault again beside ours: its own holders on the other queue number, its
//! own proxy listeners, each diversion switched in one kernel transaction
//! (see `nft::sync_here`, `divert::install_here`). Then it **commits**
//! (`POST /v1/handover/commit`): this agent retires, changing nothing in
//! the kernel on its own any more, while what is in flight here (packets
//! its holders hold, proxied connections) goes on. At SIGTERM a retired
//! agent lets its holders release what they hold at its time, waits for
//! its proxied connections (bounded), and exits, leaving the kernel to the
//! new agent. A freeze ends without a commit, and this agent reclaims the
//! kernel and serves again, as soon as the new agent dies (it holds
//! `successor.lock` while it installs) or at `Config::freeze_limit` (30 s).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::succession::successor_alive;

use netfault_api::FieldError;

use super::{AgentError, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    Serving,
    /// A new agent (`successor`, its id) is installing; no change here.
    Frozen {
        successor: u64,
        until: Instant,
    },
    /// The new agent serves the node; this one only finishes what it holds.
    Retired {
        successor: u64,
    },
}

impl Handover {
    /// Whether a change may run now (ending a freeze past its limit).
    /// `Ok(true)`: the freeze has just ended without a commit, so the
    /// caller reclaims the kernel first (see `Core::reclaim`).
    pub(crate) fn admit(&mut self, state_dir: &Path) -> Result<bool, AgentError> {
        match *self {
            Handover::Serving => Ok(false),
            Handover::Frozen { successor, until }
                if Instant::now() >= until || !successor_alive(state_dir) =>
            {
                tracing::warn!(
                    successor,
                    "the new agent died or did not take over in time: serving again"
                );
                *self = Handover::Serving;
                Ok(true)
            }
            Handover::Frozen { successor, .. } => Err(AgentError::Field(FieldError::unavailable(
                &format!("handing the node over to a new agent (id {successor}); try again"),
            ))),
            Handover::Retired { successor } => Err(AgentError::Field(FieldError::unavailable(
                &format!("this agent has handed the node over to a new agent (id {successor})"),
            ))),
        }
    }
}

impl Registry {
    fn handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.shared
            .handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this agent serves changes (not frozen for, nor retired by, a
    /// hand-over). The reaper, the pending adoption and the watches skip
    /// their work while it does not.
    pub fn serving(&self) -> bool {
        match *self.handover() {
            Handover::Serving => true,
            Handover::Frozen { until, .. } => {
                Instant::now() >= until || !successor_alive(&self.shared.cfg.state_dir)
            }
            Handover::Retired { .. } => false,
        }
    }

    /// Whether this agent has handed the node over.
    pub fn retired(&self) -> bool {
        matches!(*self.handover(), Handover::Retired { .. })
    }

    /// Freezes for the new agent `successor` (a random id it chose: its pid
    /// is not visible across pod pid namespaces): waits for the
    /// change in progress, refuses every later one, and saves the state.
    pub fn freeze(&self, successor: u64) -> Result<(), AgentError> {
        let sh = self.shared.clone();
        let limit = self.shared.cfg.freeze_limit;
        self.owner.run(move |_| {
            let mut h = sh.handover.lock().unwrap_or_else(|p| p.into_inner());
            match *h {
                Handover::Retired { .. } => h.admit(&sh.cfg.state_dir).map(drop),
                Handover::Frozen {
                    successor: other,
                    until,
                } if other != successor && Instant::now() < until => {
                    Err(AgentError::Field(FieldError::conflict(
                        "successor",
                        &format!("another agent (id {other}) is taking over"),
                    )))
                }
                // Only a live new agent freezes this one (it holds the
                // successor lock while it installs).
                _ if !successor_alive(&sh.cfg.state_dir) => {
                    Err(AgentError::Field(FieldError::conflict(
                        "successor",
                        "no new agent holds STATE_DIR/successor.lock: nothing would take over",
                    )))
                }
                _ => {
                    *h = Handover::Frozen {
                        successor,
                        until: Instant::now() + limit,
                    };
                    Ok(())
                }
            }
        })??;
        self.shared.persist()?;
        tracing::info!(
            successor,
            "frozen for a hand-over: the new agent is installing"
        );
        Ok(())
    }

    /// The new agent `successor` has installed everything: retire (see the
    /// module). Refused unless frozen for that agent.
    pub fn commit_handover(&self, successor: u64) -> Result<(), AgentError> {
        let sh = self.shared.clone();
        self.owner.run(move |b| {
            let mut h = sh.handover.lock().unwrap_or_else(|p| p.into_inner());
            match *h {
                Handover::Frozen { successor: s, .. } if s == successor => {
                    *h = Handover::Retired { successor };
                    drop(h);
                    b.retire();
                    Ok(())
                }
                Handover::Retired { successor: s } if s == successor => Ok(()),
                _ => Err(AgentError::Field(FieldError::conflict(
                    "successor",
                    &format!("no hand-over to agent {successor} is in progress"),
                ))),
            }
        })??;
        tracing::info!(successor, "handed the node over to the new agent");
        Ok(())
    }

    /// At exit after a hand-over: lets the holders release what they hold
    /// at its time and waits, at most `limit`, until nothing is held and
    /// no proxied connection is open. Returns whether everything finished.
    pub fn drain_for_exit(&self, limit: Duration) -> bool {
        let started = Instant::now();
        if self.owner.run(|b| b.drain()).is_err() {
            return false;
        }
        loop {
            if self.owner.run(|b| b.drained()).unwrap_or(true) {
                tracing::info!(took = ?started.elapsed(), "drained: nothing is held any more");
                return true;
            }
            if started.elapsed() >= limit {
                tracing::warn!(
                    ?limit,
                    "still holding packets or proxied connections; exiting anyway"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
