//! `annotate`: a fault annotation on a running pod acts on the wire, seen
//! from a client pod on another node, and its removal restores the pod; the
//! time from the annotation's PATCH to the effect is measured over several
//! changes (p50, max). The `netfault.io/loss` shorthand too. The other
//! server pod is never touched.

use std::time::{Duration, Instant};

use e2e_kind::probe::reach;
use e2e_kind::workload::blackhole_annotation;
use e2e_kind::{ensure, Cluster, Result, Stream, TestNs};

use crate::support::{quantile_ms, Report, Workload};

/// Annotate/remove rounds timed.
const ROUNDS: usize = 5;

pub fn run(c: &Cluster, r: &mut Report) -> Result<()> {
    let ns = TestNs::create(c, "annotate")?;
    let w = Workload::start(&ns, 2, &[])?;
    // The target is on the second worker when there is one, the client on
    // the first: the requests cross nodes.
    let (target, other) = ("s1", "s0");
    let before = reach(&ns, "client", &w.targets(), 3)?;
    ensure(before.values().all(|r| r.passes()), || {
        format!("before any fault, every server answers: {before:?}")
    })?;

    let mut stream = Stream::start(&ns, "client", w.ip(target))?;
    stream.until(true, Instant::now(), Duration::from_secs(30))?;
    let mut onsets = vec![];
    let mut restores = vec![];
    for round in 0..ROUNDS {
        let t = Instant::now();
        // A different duration each round: a new annotation value.
        let value = blackhole_annotation(&format!("{}m", 5 + round));
        ns.annotate(target, &[("netfault.io/faults", Some(&value))])?;
        let on = stream.until(false, t, Duration::from_secs(30))?;
        onsets.push(on - t);
        if round == 0 {
            let o = reach(&ns, "client", &[(other, w.ip(other))], 3)?;
            ensure(o[other].passes(), || {
                format!("the pod without the annotation still answers: {o:?}")
            })?;
        }
        let t = Instant::now();
        ns.annotate(target, &[("netfault.io/faults", None)])?;
        let off = stream.until(true, t, Duration::from_secs(30))?;
        restores.push(off - t);
    }
    r.note(
        "annotate to effect",
        &format!(
            "p50 {:.0} ms, max {:.0} ms over {ROUNDS} changes (PATCH sent to the first unanswered request's start; requests 50 ms apart)",
            quantile_ms(&onsets, 0.5),
            quantile_ms(&onsets, 1.0)
        ),
    );
    r.note(
        "annotation removed to restored",
        &format!(
            "p50 {:.0} ms, max {:.0} ms (resolution 1 s: an unanswered request waits out its 1 s connect timeout)",
            quantile_ms(&restores, 0.5),
            quantile_ms(&restores, 1.0)
        ),
    );

    // The shorthand: 100% loss in both directions, with its duration.
    let t = Instant::now();
    ns.annotate(
        target,
        &[
            ("netfault.io/loss", Some("100%")),
            ("netfault.io/duration", Some("2m")),
        ],
    )?;
    let on = stream.until(false, t, Duration::from_secs(30))?;
    r.number("netfault.io/loss: 100%", "annotate to effect", on - t);
    let t = Instant::now();
    ns.annotate(
        target,
        &[("netfault.io/loss", None), ("netfault.io/duration", None)],
    )?;
    stream.until(true, t, Duration::from_secs(30))?;
    let after = reach(&ns, "client", &w.targets(), 3)?;
    ensure(after.values().all(|r| r.passes()), || {
        format!("with no annotation left every server answers: {after:?}")
    })
}
