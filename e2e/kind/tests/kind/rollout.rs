//! `rollout-restart`: `kubectl rollout restart daemonset/netfault` while an
//! annotation fault (ingress blackhole, 120 s) is in effect, and a delay
//! (`netfault.io/delay: 300ms`, held by a holder process, not the kernel)
//! on another pod. The DaemonSet surges, so each node's new agent takes
//! the node over from the old one (hand-over): every request to the delayed
//! pod across the rollout must take at least 250 ms. Requests run
//! back to back the whole time: none may be answered between the fault's
//! onset and its deadline (the longest gap is reported: the kernel keeps
//! the fault while the agents restart, and the new agents re-adopt it
//! without restarting its duration), and the pod answers again at the
//! deadline, not before and not much later; the expired fault is not
//! re-applied from the annotation that is still there.

use std::time::{Duration, Instant};

use e2e_kind::cluster::{AGENT_DAEMONSET, AGENT_NAMESPACE};
use e2e_kind::workload::blackhole_annotation;
use e2e_kind::{ensure, Cluster, Error, Result, Stream, TestNs};

use crate::support::{Report, Workload};

const DURATION: Duration = Duration::from_secs(120);
/// How long a request to the 300 ms-delayed pod takes at least (the
/// margin covers the timing of `kubectl exec`'s output lines).
const SLOW: Duration = Duration::from_millis(250);

pub fn run(c: &Cluster, r: &mut Report) -> Result<()> {
    let ns = TestNs::create(c, "rollout")?;
    let w = Workload::start(&ns, 2, &[])?;
    let target = "s1";
    let mut stream = Stream::start(&ns, "client", w.ip(target))?;
    stream.until(true, Instant::now(), Duration::from_secs(30))?;

    let t_ann = Instant::now();
    let value = blackhole_annotation(&format!("{}s", DURATION.as_secs()));
    ns.annotate(target, &[("netfault.io/faults", Some(&value))])?;
    let onset = stream.until(false, t_ann, Duration::from_secs(30))?;

    // The delayed pod: every answer at least 250 ms late from now on.
    let delayed = "s0";
    let mut slow = Stream::start(&ns, "client", w.ip(delayed))?;
    slow.until(true, Instant::now(), Duration::from_secs(30))?;
    ns.annotate(delayed, &[("netfault.io/delay", Some("300ms"))])?;
    let t_d = Instant::now();
    let delay_onset = loop {
        slow.pump(Instant::now() + Duration::from_millis(200))?;
        let late = slow
            .samples
            .iter()
            .rev()
            .find(|s| s.start >= t_d && s.ok && s.end - s.start >= SLOW);
        if let Some(s) = late {
            break s.end;
        }
        ensure(t_d.elapsed() < Duration::from_secs(30), || {
            "the delay annotation did not act within 30 s".to_string()
        })?;
    };

    let ds = format!("daemonset/{AGENT_DAEMONSET}");
    let t_r0 = Instant::now();
    c.kubectl(&["-n", AGENT_NAMESPACE, "rollout", "restart", &ds])?;
    c.kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "rollout",
        "status",
        &ds,
        "--timeout=240s",
    ])?;
    c.wait_agents_ready(Duration::from_secs(120))?;
    let rolled = t_r0.elapsed();
    r.number("rollout", "rollout restart to every agent ready", rolled);
    ensure(
        Instant::now() + Duration::from_secs(5) < t_ann + DURATION,
        || {
            format!("the rollout ({rolled:?}) outlasted most of the fault's {DURATION:?}: nothing left to measure")
        },
    )?;

    // Across the rollout, every request to the delayed pod was delayed.
    slow.pump(Instant::now() + Duration::from_secs(2))?;
    let across: Vec<_> = slow
        .samples
        .iter()
        .filter(|s| s.start > delay_onset)
        .collect();
    let fast = across
        .iter()
        .filter(|s| !s.ok || s.end - s.start < SLOW)
        .count();
    let quickest = across.iter().map(|s| s.end - s.start).min();
    r.note(
        "delay across the rollout",
        &format!(
            "{} requests to the 300 ms-delayed pod, {fast} answered faster than {SLOW:?} or not at all (quickest {quickest:?})",
            across.len()
        ),
    );
    ensure(fast == 0 && across.len() >= 10, || {
        format!(
            "the delay lapsed during the rollout: {fast} of {} requests",
            across.len()
        )
    })?;

    let restored = stream.until(true, onset, DURATION + Duration::from_secs(30))?;
    let window_end = t_ann + DURATION - Duration::from_secs(1);
    let (gap, n) = stream.longest_run(true, onset, window_end);
    r.note(
        "longest gap",
        &format!(
            "{:.0} ms of answered requests between the onset and the deadline, across the restart ({n} requests)",
            gap.as_secs_f64() * 1e3
        ),
    );
    ensure(gap.is_zero(), || {
        format!("the fault lapsed during the restart: {gap:?} of answered requests")
    })?;
    let early = (t_ann + DURATION).checked_duration_since(restored);
    let late = restored.checked_duration_since(onset + DURATION);
    r.note(
        "expiry",
        &format!(
            "answered again {} the deadline (bounds: annotate + {}s .. onset + {}s)",
            match (early, late) {
                (Some(e), _) if !e.is_zero() => format!("{:.0} ms before", e.as_secs_f64() * 1e3),
                (_, Some(l)) => format!("{:.0} ms after", l.as_secs_f64() * 1e3),
                _ => "at".into(),
            },
            DURATION.as_secs(),
            DURATION.as_secs()
        ),
    );
    ensure(early.is_none_or(|e| e <= Duration::from_secs(1)), || {
        format!("the fault ended {early:?} before its deadline")
    })?;
    // An unanswered request waits 1 s; the agent reaps within a second or so.
    ensure(late.is_none_or(|l| l <= Duration::from_secs(5)), || {
        format!("the fault ended {late:?} after its deadline")
    })?;

    // The annotation is still on the pod: the expired fault stays expired.
    let t = Instant::now();
    stream.pump(t + Duration::from_secs(6))?;
    let (relapse, m) = stream.longest_run(false, restored + Duration::from_secs(1), Instant::now());
    if !relapse.is_zero() {
        return Err(Error::Other(format!(
            "the expired annotation fault came back: {relapse:?} unanswered in {m} requests"
        )));
    }
    Ok(())
}
