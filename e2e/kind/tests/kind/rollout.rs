//! `rollout-restart`: `kubectl rollout restart daemonset/netfault` while an
//! annotation fault (ingress blackhole, 120 s) is in effect. Requests run
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
