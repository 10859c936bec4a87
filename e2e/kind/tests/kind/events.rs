//! `events`: the agent's Events on the pod, listed as a user would
//! (`events.k8s.io/v1`, field selector `regarding.name`), each next to its
//! effect on the wire: `FaultApplied` and `FaultRemoved` (annotation added,
//! removed), `FaultExpired` (an 8 s fault ends), `InvalidFaultAnnotation`
//! (the note names `netfault.io/faults[0].action.percent`; the pod keeps
//! answering) and `FaultFailed` (a reorder with no delay to reorder against;
//! the note names `action.latency`). Every one is reported by
//! `netfault.io/netfaultd` from the pod's node, about the pod.

use std::time::Duration;

use e2e_kind::probe::reach;
use e2e_kind::workload::blackhole_annotation;
use e2e_kind::{Cluster, Error, Result, TestNs, HTTP_PORT};
use k8s_openapi::api::events::v1::Event;
use serde_json::json;

use crate::support::{wait_until, Report, Workload};

const POD: &str = "s0";

pub fn run(c: &Cluster, r: &mut Report) -> Result<()> {
    let ns = TestNs::create(c, "events")?;
    let w = Workload::start(&ns, 1, &[])?;
    let node = w.pods[POD].node.clone();
    let target = [(POD, w.ip(POD))];
    let answers = |want: bool| -> Result<std::result::Result<(), String>> {
        let got = reach(&ns, "client", &target, 2)?;
        let ok = if want {
            got[POD].passes()
        } else {
            got[POD].blocked()
        };
        Ok(if ok { Ok(()) } else { Err(format!("{got:?}")) })
    };

    ns.annotate(
        POD,
        &[("netfault.io/faults", Some(&blackhole_annotation("5m")))],
    )?;
    wait_until(
        "the annotation's blackhole acts",
        Duration::from_secs(30),
        || answers(false),
    )?;
    let (d, _) = wait_event(&ns, &node, "FaultApplied", "Normal", "annotation")?;
    r.number("FaultApplied", "effect seen to Event listed", d);

    ns.annotate(POD, &[("netfault.io/faults", None)])?;
    wait_until(
        "the removed fault is gone from the wire",
        Duration::from_secs(30),
        || answers(true),
    )?;
    wait_event(&ns, &node, "FaultRemoved", "Normal", "")?;

    ns.annotate(
        POD,
        &[("netfault.io/faults", Some(&blackhole_annotation("8s")))],
    )?;
    wait_until("the 8 s blackhole acts", Duration::from_secs(30), || {
        answers(false)
    })?;
    wait_until("the 8 s blackhole ends", Duration::from_secs(30), || {
        answers(true)
    })?;
    wait_event(&ns, &node, "FaultExpired", "Normal", "")?;

    let invalid = json!([{
        "direction": "ingress",
        "match": {"protocol": "tcp", "ports": HTTP_PORT.to_string()},
        "action": {"type": "loss", "percent": 150},
        "duration": "5m",
    }]);
    ns.annotate(POD, &[("netfault.io/faults", Some(&invalid.to_string()))])?;
    let (_, ev) = wait_event(
        &ns,
        &node,
        "InvalidFaultAnnotation",
        "Warning",
        "netfault.io/faults[0].action.percent",
    )?;
    r.note("InvalidFaultAnnotation", &event_note(&ev));
    wait_until(
        "an invalid annotation changes nothing on the wire",
        Duration::from_secs(5),
        || answers(true),
    )?;

    let failing = json!([{
        "direction": "egress",
        "match": {"protocol": "udp", "ports": "7139"},
        "action": {"type": "reorder", "percent": 50},
        "duration": "5m",
    }]);
    ns.annotate(POD, &[("netfault.io/faults", Some(&failing.to_string()))])?;
    let (_, ev) = wait_event(&ns, &node, "FaultFailed", "Warning", "action.latency")?;
    r.note("FaultFailed", &event_note(&ev));
    wait_until(
        "a failed fault changes nothing on the wire",
        Duration::from_secs(5),
        || answers(true),
    )?;
    Ok(())
}

fn event_note(ev: &Event) -> String {
    ev.note.clone().unwrap_or_default()
}

/// Waits (30 s) for an Event `reason` of `type_` on the pod whose note holds
/// `needle`, checks who reported it and about what, and returns how long it
/// took to be listed, and the Event.
fn wait_event(
    ns: &TestNs,
    node: &str,
    reason: &str,
    type_: &str,
    needle: &str,
) -> Result<(Duration, Event)> {
    let mut found: Option<Event> = None;
    let d = wait_until(
        &format!(
            "a {type_} Event {reason} on {}/{POD} whose note holds {needle:?}",
            ns.name
        ),
        Duration::from_secs(30),
        || {
            let evs = ns.events(POD)?;
            found = evs
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some(type_)
                        && e.note.as_deref().is_some_and(|n| n.contains(needle))
                })
                .cloned();
            Ok(if found.is_some() {
                Ok(())
            } else {
                Err(format!(
                    "events listed: {:?}",
                    evs.iter()
                        .map(|e| format!("{:?} {:?}: {:?}", e.type_, e.reason, e.note))
                        .collect::<Vec<_>>()
                ))
            })
        },
    )?;
    let ev = found.ok_or_else(|| Error::Other("the Event vanished".into()))?;
    let check = |what: &str, got: Option<&str>, want: &str| -> Result<()> {
        if got == Some(want) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "Event {reason}: {what} is {got:?}, want {want:?}: {ev:?}"
            )))
        }
    };
    check(
        "reportingController",
        ev.reporting_controller.as_deref(),
        "netfault.io/netfaultd",
    )?;
    check("reportingInstance", ev.reporting_instance.as_deref(), node)?;
    let regarding = ev.regarding.clone().unwrap_or_default();
    check("regarding.kind", regarding.kind.as_deref(), "Pod")?;
    check("regarding.name", regarding.name.as_deref(), POD)?;
    Ok((d, ev))
}
