//! Which enrolled sandboxes a runtime poll releases: a pure function of
//! what is enrolled (and how), what the runtime lists, and what earlier
//! polls saw. No I/O: the caller measures the netns and lists the runtime.
//!
//! The rules, safest first:
//! - the runtime lists it READY: keep;
//! - its netns is gone (the path is missing or names another namespace):
//!   release, whatever enrolled it (a missed CNI DEL);
//! - the runtime lists it NOTREADY: release if it was adopted from the
//!   runtime, was seen READY by an earlier poll, or was enrolled longer
//!   than [`NOT_READY_GRACE`] ago. A sandbox whose CNI ADD runs right now
//!   was enrolled moments ago and never seen READY (ADD runs before the
//!   sandbox is READY; CRI-O lists it NOTREADY meanwhile): it is kept;
//! - the runtime does not list it: release only if it was adopted from the
//!   runtime. Anything else may belong to another runtime on the node, to
//!   a test, or to a CNI ADD that the runtime has not recorded yet.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use netfault_api::EnrolSource;

/// How long a sandbox enrolled through CNI (or a pending file) may be
/// listed NOTREADY without having been seen READY before it is released:
/// far longer than a runtime takes from the end of CNI ADD to READY.
pub const NOT_READY_GRACE: Duration = Duration::from_secs(30);

/// What opening the sandbox's netns path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The path still names the namespace that was enrolled.
    Alive,
    /// The path is missing or names another namespace.
    Gone,
    /// Opening it failed otherwise (permissions, ...): no decision on it.
    Unknown,
}

/// A sandbox's state as the runtime lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeState {
    Ready,
    NotReady,
}

/// An enrolled sandbox, as the poll sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub source: EnrolSource,
    pub enrolled_at_ms: u64,
    pub netns: Liveness,
}

/// Why a sandbox is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NetnsGone,
    NotReady,
    NotListed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NetnsGone => "its netns is gone",
            Reason::NotReady => "the runtime reports it NOTREADY",
            Reason::NotListed => "the runtime no longer lists it",
        }
    }
}

/// The sandboxes to release, in `enrolled` order. `runtime` is one complete
/// listing (every state); `seen_ready` holds the ids earlier polls saw
/// READY; `now_ms` is the wall clock of `enrolled_at_ms`.
pub fn releases(
    enrolled: &[Candidate],
    runtime: &HashMap<String, RuntimeState>,
    seen_ready: &HashSet<String>,
    now_ms: u64,
) -> Vec<(String, Reason)> {
    enrolled
        .iter()
        .filter_map(|c| decide(c, runtime.get(&c.id).copied(), seen_ready, now_ms))
        .map(|r| (r.0.to_string(), r.1))
        .collect()
}

fn decide<'a>(
    c: &'a Candidate,
    listed: Option<RuntimeState>,
    seen_ready: &HashSet<String>,
    now_ms: u64,
) -> Option<(&'a str, Reason)> {
    let adopted = c.source == EnrolSource::Cri;
    let reason = match (listed, c.netns) {
        (Some(RuntimeState::Ready), _) => return None,
        (_, Liveness::Gone) => Reason::NetnsGone,
        (Some(RuntimeState::NotReady), _) => {
            let old = now_ms.saturating_sub(c.enrolled_at_ms) >= NOT_READY_GRACE.as_millis() as u64;
            if adopted || seen_ready.contains(&c.id) || old {
                Reason::NotReady
            } else {
                return None;
            }
        }
        (None, _) if adopted => Reason::NotListed,
        (None, _) => return None,
    };
    Some((&c.id, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000_000;

    fn cand(id: &str, source: EnrolSource, age: Duration, netns: Liveness) -> Candidate {
        Candidate {
            id: id.into(),
            source,
            enrolled_at_ms: NOW - age.as_millis() as u64,
            netns,
        }
    }

    fn run(
        enrolled: &[Candidate],
        runtime: &[(&str, RuntimeState)],
        seen: &[&str],
    ) -> Vec<(String, Reason)> {
        let runtime = runtime.iter().map(|(i, s)| (i.to_string(), *s)).collect();
        let seen = seen.iter().map(|s| s.to_string()).collect();
        releases(enrolled, &runtime, &seen, NOW)
    }

    const SEC: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    use EnrolSource::{Cni, Cri, Netns, Pending};
    use Liveness::{Alive, Gone, Unknown};
    use RuntimeState::{NotReady, Ready};

    #[test]
    fn a_ready_sandbox_is_kept_whatever_enrolled_it() {
        for source in [Cni, Pending, Cri, Netns] {
            for netns in [Alive, Gone, Unknown] {
                let c = [cand("a", source, HOUR, netns)];
                assert_eq!(run(&c, &[("a", Ready)], &["a"]), [], "{source:?} {netns:?}");
            }
        }
    }

    #[test]
    fn an_adopted_sandbox_goes_when_not_ready_or_no_longer_listed() {
        let c = [cand("a", Cri, SEC, Alive)];
        assert_eq!(
            run(&c, &[("a", NotReady)], &[]),
            [("a".to_string(), Reason::NotReady)]
        );
        assert_eq!(run(&c, &[], &["a"]), [("a".to_string(), Reason::NotListed)]);
    }

    #[test]
    fn a_sandbox_whose_cni_add_runs_now_is_never_released() {
        // ADD enrolled it a moment ago; the runtime has not recorded it yet,
        // or lists it NOTREADY until ADD returns (CRI-O).
        for source in [Cni, Pending] {
            let c = [cand("new", source, Duration::from_millis(50), Alive)];
            assert_eq!(run(&c, &[], &[]), [], "{source:?} not listed");
            assert_eq!(
                run(&c, &[("new", NotReady)], &[]),
                [],
                "{source:?} NOTREADY"
            );
            let slow = [cand("new", source, NOT_READY_GRACE - SEC, Alive)];
            assert_eq!(
                run(&slow, &[("new", NotReady)], &[]),
                [],
                "{source:?} slow start"
            );
        }
    }

    #[test]
    fn a_cni_sandbox_not_ready_goes_once_it_was_seen_ready_or_is_old() {
        let c = [cand("a", Cni, SEC, Alive)];
        assert_eq!(
            run(&c, &[("a", NotReady)], &["a"]),
            [("a".to_string(), Reason::NotReady)],
            "missed DEL after READY"
        );
        let old = [cand("a", Pending, NOT_READY_GRACE, Alive)];
        assert_eq!(
            run(&old, &[("a", NotReady)], &[]),
            [("a".to_string(), Reason::NotReady)],
            "NOTREADY long after enrolment (the agent was down at stop)"
        );
    }

    #[test]
    fn a_sandbox_the_runtime_never_listed_stays_unless_its_netns_is_gone() {
        // Another runtime's pod, a test's namespace, a bare netns target.
        for source in [Cni, Pending, Netns] {
            let c = [cand("other", source, HOUR, Alive)];
            assert_eq!(run(&c, &[("x", Ready)], &["other"]), [], "{source:?}");
            let unknown = [cand("other", source, HOUR, Unknown)];
            assert_eq!(run(&unknown, &[], &[]), [], "{source:?} unknown netns");
            let gone = [cand("other", source, HOUR, Gone)];
            assert_eq!(
                run(&gone, &[], &[]),
                [("other".to_string(), Reason::NetnsGone)],
                "{source:?} gone"
            );
        }
    }

    #[test]
    fn decisions_are_per_sandbox_and_in_order() {
        let c = [
            cand("keep", Cni, SEC, Alive),
            cand("stopped", Cri, HOUR, Alive),
            cand("deleted", Cri, HOUR, Gone),
            cand("ready", Cri, HOUR, Alive),
        ];
        assert_eq!(
            run(
                &c,
                &[("stopped", NotReady), ("ready", Ready), ("keep", NotReady)],
                &["stopped", "ready"]
            ),
            [
                ("stopped".to_string(), Reason::NotReady),
                ("deleted".to_string(), Reason::NetnsGone),
            ]
        );
    }
}
