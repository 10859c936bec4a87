//! Which of a sandbox's DNS actions act on a query, and what comes of it.
//! It must stay cheap for the queries no action picks (the common case on a
//! pod with a narrow fault): no allocation, no answer built, no draw.

use std::time::Duration;

use rand::Rng;

use crate::answer::{self, Body};
use crate::{DnsAction, DnsFault, Event, Outcome, Query, Transport, Verdict};

/// What happens to `query` under the sandbox's DNS actions, in order.
/// `on(i, event)` reports to the caller's counters for `actions[i]`:
/// - every action whose selector matches the query and which applies to
///   `transport` reports Matched (dns-truncate applies to UDP only: over
///   TCP it neither matches nor acts);
/// - of those, the ones that act after their `percent` draw report
///   Affected: every firing dns-delay adds its delay; the FIRST firing
///   answer-type action (dns-error, dns-spoof, dns-truncate, dns-drop)
///   decides the outcome, and answer-type actions after it are not drawn
///   (Matched only).
///
/// No action fires: `Verdict { delay: 0, outcome: Pass }`.
pub fn decide<'a>(
    actions: impl IntoIterator<Item = &'a DnsAction>,
    query: &Query,
    transport: Transport,
    on: impl FnMut(usize, Event),
) -> Verdict {
    decide_with(actions, query, transport, on, &mut rand::rng())
}

/// [`decide`] with the caller's random numbers (seeded in tests).
pub(crate) fn decide_with<'a>(
    actions: impl IntoIterator<Item = &'a DnsAction>,
    query: &Query,
    transport: Transport,
    mut on: impl FnMut(usize, Event),
    rng: &mut impl Rng,
) -> Verdict {
    let mut delay = Duration::ZERO;
    // The first firing answer-type action.
    let mut decider: Option<&DnsAction> = None;
    for (i, action) in actions.into_iter().enumerate() {
        if matches!(action.fault, DnsFault::Truncate) && transport != Transport::Udp {
            continue;
        }
        if !action.selector.matches(query.name(), query.qtype()) {
            continue;
        }
        on(i, Event::Matched);
        let answers = !matches!(action.fault, DnsFault::Delay { .. });
        if answers && decider.is_some() {
            continue;
        }
        if !fires(action.percent, rng) {
            continue;
        }
        on(i, Event::Affected);
        match &action.fault {
            DnsFault::Delay { delay: d } => delay = delay.saturating_add(*d),
            _ => decider = Some(action),
        }
    }
    let outcome = match decider {
        None => Outcome::Pass,
        Some(action) => outcome(action, query, transport, rng),
    };
    Verdict { delay, outcome }
}

/// Whether an action with `percent` (0 to 100) acts this time.
fn fires(percent: f64, rng: &mut impl Rng) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 || percent.is_nan() {
        return false;
    }
    rng.random::<f64>() * 100.0 < percent
}

/// The outcome an answer-type action gives `query`.
fn outcome(action: &DnsAction, query: &Query, transport: Transport, rng: &mut impl Rng) -> Outcome {
    let body = match &action.fault {
        DnsFault::Drop => return Outcome::Drop,
        DnsFault::Delay { .. } => return Outcome::Pass,
        DnsFault::Error { rcode } => Body::Error(rcode.code()),
        DnsFault::Truncate => Body::Truncated,
        DnsFault::Spoof {
            ttl, random: true, ..
        } => Body::SpoofRandom { ttl: *ttl },
        DnsFault::Spoof { addresses, ttl, .. } => Body::Spoof {
            addresses,
            ttl: *ttl,
        },
    };
    match answer::build(query, &body, transport, rng) {
        Some(wire) => Outcome::Answer(wire),
        // Unreachable for a query hickory parsed; the query then goes on
        // untouched rather than unanswered.
        None => Outcome::Pass,
    }
}
