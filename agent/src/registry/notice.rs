//! What happens to the faults of Kubernetes pods, told to whoever reports
//! it (the `kube` module turns each notice into an Event on the pod).
//!
//! What it owns: the notice type, its one-line description, and the
//! bounded hand-off from the registry's owner thread to the async side.
//! What it must not do: block the owner thread (a full queue drops the
//! notice and counts it), or speak to the API server itself.
//!
//! Only faults of sandboxes that belong to a pod (`PodRef` with a name)
//! produce notices: a bare netns has nothing to show them on. A released
//! sandbox (CNI DEL, the runtime stopped the pod) produces none: the pod is
//! going away with its faults.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use netfault_api::{FaultSource, FaultSpec, PodRef};
use serde_json::Value;
use tokio::sync::mpsc;

/// How many notices may wait for the reporter before new ones are dropped.
pub const QUEUE: usize = 1024;

/// A fault's step, as the Event's reason names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// `FaultApplied` (Normal).
    Applied,
    /// `FaultRemoved` (Normal): deleted, or replaced by a change of its
    /// annotation or resource.
    Removed,
    /// `FaultExpired` (Normal): its duration ended.
    Expired,
    /// `FaultFailed` (Warning): it could not be installed.
    Failed,
}

impl NoticeKind {
    pub fn reason(self) -> &'static str {
        match self {
            NoticeKind::Applied => "FaultApplied",
            NoticeKind::Removed => "FaultRemoved",
            NoticeKind::Expired => "FaultExpired",
            NoticeKind::Failed => "FaultFailed",
        }
    }

    pub fn is_warning(self) -> bool {
        self == NoticeKind::Failed
    }
}

/// One step of one fault on one pod.
#[derive(Debug, Clone)]
pub struct FaultNotice {
    pub kind: NoticeKind,
    pub pod: PodRef,
    /// The fault's id (none for a fault that failed before it had one).
    pub fault: Option<String>,
    pub source: FaultSource,
    /// The Event's note: what the fault does, and for a failure, why.
    pub note: String,
}

impl FaultNotice {
    pub fn new(
        kind: NoticeKind,
        pod: &PodRef,
        fault: Option<&str>,
        spec: &FaultSpec,
        source: FaultSource,
        error: Option<&str>,
    ) -> FaultNotice {
        let what = describe(&spec.to_json());
        let verb = match kind {
            NoticeKind::Applied => "applied",
            NoticeKind::Removed => "removed",
            NoticeKind::Expired => "expired",
            NoticeKind::Failed => "failed",
        };
        let id = fault.map(|f| format!(" {f}")).unwrap_or_default();
        let mut note = format!("fault{id} {verb} ({} source): {what}", source.as_str());
        if let Some(e) = error {
            note.push_str(": ");
            note.push_str(e);
        }
        FaultNotice {
            kind,
            pod: pod.clone(),
            fault: fault.map(str::to_string),
            source,
            note,
        }
    }
}

/// A fault in one line: `loss percent=30 egress for 5m`.
pub fn describe(spec: &Value) -> String {
    let action = &spec["action"];
    let mut out = action["type"].as_str().unwrap_or("fault").to_string();
    if let Value::Object(fields) = action {
        for (k, v) in fields.iter().filter(|(k, _)| k.as_str() != "type") {
            let v = match v {
                Value::String(s) => s.clone(),
                // Defaults that change nothing are noise in one line.
                Value::Number(n) if n.as_f64() == Some(0.0) && k != "percent" => continue,
                Value::Number(n) => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            out.push_str(&format!(" {k}={v}"));
        }
    }
    if let Some(d) = spec["direction"].as_str() {
        out.push_str(&format!(" {d}"));
    }
    if let Value::Object(m) = &spec["match"] {
        if !m.is_empty() {
            out.push_str(&format!(" match={}", spec["match"]));
        }
    }
    if let Some(d) = spec["duration"].as_str() {
        out.push_str(&format!(" for {d}"));
    }
    out
}

/// The registry's end of the hand-off: set once a reporter subscribes.
#[derive(Default)]
pub struct Notices {
    tx: Mutex<Option<mpsc::Sender<FaultNotice>>>,
    dropped: AtomicU64,
}

impl Notices {
    /// Starts a fresh queue (a later subscriber replaces an earlier one).
    pub fn subscribe(&self) -> mpsc::Receiver<FaultNotice> {
        let (tx, rx) = mpsc::channel(QUEUE);
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Hands `n` over without waiting; without a subscriber it is dropped
    /// silently, with a full queue it is counted.
    pub fn send(&self, n: FaultNotice) {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else {
            return;
        };
        if tx.try_send(n).is_err() {
            let before = self.dropped.fetch_add(1, Ordering::Relaxed);
            if before == 0 {
                tracing::warn!(
                    "the Event queue is full or closed; fault notices are being dropped"
                );
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netfault_api::Limits;
    use serde_json::json;

    fn spec() -> FaultSpec {
        FaultSpec::parse(
            &json!({
                "direction": "egress",
                "match": {"protocol": "udp", "ports": [7000]},
                "action": {"type": "loss", "percent": 30},
                "duration": "5m",
            }),
            &Limits {
                target_required: false,
                ..Limits::default()
            },
        )
        .expect("a valid spec")
    }

    fn pod() -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: "cart".into(),
            uid: "u-1".into(),
        }
    }

    #[test]
    fn note_names_fault_source_and_action() {
        let n = FaultNotice::new(
            NoticeKind::Applied,
            &pod(),
            Some("f-1"),
            &spec(),
            FaultSource::Annotation,
            None,
        );
        assert!(
            n.note.starts_with(
                "fault f-1 applied (annotation source): loss percent=30 egress match="
            ),
            "{}",
            n.note
        );
        assert!(n.note.ends_with("for 5m"), "{}", n.note);
        assert_eq!(n.kind.reason(), "FaultApplied");
        assert!(!n.kind.is_warning());
    }

    #[test]
    fn failure_carries_the_error_and_is_a_warning() {
        let n = FaultNotice::new(
            NoticeKind::Failed,
            &pod(),
            None,
            &spec(),
            FaultSource::Resource,
            Some("action.latency: reorder needs a latency"),
        );
        assert!(n.note.starts_with("fault failed (resource source)"));
        assert!(n
            .note
            .ends_with(": action.latency: reorder needs a latency"));
        assert!(n.kind.is_warning());
    }

    #[test]
    fn queue_drops_and_counts_when_full_and_is_silent_without_subscriber() {
        let q = Notices::default();
        let n = FaultNotice::new(
            NoticeKind::Expired,
            &pod(),
            Some("f-2"),
            &spec(),
            FaultSource::Api,
            None,
        );
        q.send(n.clone());
        assert_eq!(q.dropped(), 0, "no subscriber: nothing to count");
        let mut rx = q.subscribe();
        for _ in 0..QUEUE + 3 {
            q.send(n.clone());
        }
        assert_eq!(q.dropped(), 3);
        let got = rx.try_recv().expect("a queued notice");
        assert_eq!(got.fault.as_deref(), Some("f-2"));
    }
}
