//! Fault actions: what a fault does to the packets it matches.
//!
//! Parsing and the canonical JSON form of every action in the contract.
//! Which backend serves an action (eBPF tc, the NFQUEUE delay engine, the
//! transparent proxy) is the agent's business; [`Action::backend`] only names
//! the one that owns it, so the agent can say when it is unavailable.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::FieldError;
use crate::spec::{parse_duration, parse_percent};

/// netem's delay distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Uniform,
    Normal,
    Pareto,
    ParetoNormal,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
            Distribution::ParetoNormal => "paretonormal",
        }
    }
}

/// netem's Gilbert-Elliott loss model (`loss gemodel p r 1-h 1-k`), all in
/// percent: `p` good→bad transition, `r` bad→good transition, `one_minus_h`
/// loss probability in the bad state, `one_minus_k` loss probability in the
/// good state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    pub p: f64,
    pub r: f64,
    pub one_minus_h: f64,
    pub one_minus_k: f64,
}

/// Which part of netfault serves an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The tc eBPF datapath.
    Ebpf,
    /// nft diversion to NFQUEUE and the agent's delay engine.
    DelayQueue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Drop `percent` of matching packets. `correlation` (0–100) has netem's
    /// meaning; `model` replaces both with a Gilbert-Elliott chain.
    Loss {
        percent: f64,
        correlation: f64,
        model: Option<GilbertElliott>,
    },
    /// Drop every matching packet.
    Blackhole,
    /// Hold matching packets for `latency` ± `jitter` drawn from
    /// `distribution`, with netem's `correlation`; `percent` of packets.
    Delay {
        latency: Duration,
        jitter: Duration,
        correlation: f64,
        distribution: Distribution,
        percent: f64,
    },
    /// netem reordering: `percent` of packets (or every `gap`-th) skip the
    /// delay that the others get (`latency`, or a composing delay fault's).
    Reorder {
        percent: f64,
        correlation: f64,
        gap: u32,
        latency: Option<Duration>,
    },
    /// Flip one random bit in `percent` of packets.
    Corrupt { percent: f64, correlation: f64 },
    /// Send `percent` of packets twice.
    Duplicate { percent: f64, correlation: f64 },
    /// Limit matching traffic to `bits_per_sec`, with a `burst_bytes` bucket.
    Rate {
        bits_per_sec: u64,
        burst_bytes: Option<u64>,
    },
}

/// L4/L7 action types in the contract that a later release implements.
const PLANNED_ACTIONS: &[&str] = &[
    "http-abort",
    "http-delay",
    "http-replace",
    "http-patch",
    "tcp-reset",
    "tcp-slow-close",
    "tcp-bandwidth",
];

const SUPPORTED: &str = "loss, blackhole, delay, reorder, corrupt, duplicate, rate";

impl Action {
    pub fn type_name(&self) -> &'static str {
        match self {
            Action::Loss { .. } => "loss",
            Action::Blackhole => "blackhole",
            Action::Delay { .. } => "delay",
            Action::Reorder { .. } => "reorder",
            Action::Corrupt { .. } => "corrupt",
            Action::Duplicate { .. } => "duplicate",
            Action::Rate { .. } => "rate",
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Action::Delay { .. } | Action::Reorder { .. } => Backend::DelayQueue,
            _ => Backend::Ebpf,
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Action::Loss {
                percent,
                correlation,
                model,
            } => {
                let mut v = json!({"type": "loss", "percent": percent, "correlation": correlation});
                if let Some(m) = model {
                    v["model"] = json!({"type": "gilbert-elliott", "p": m.p, "r": m.r,
                        "1-h": m.one_minus_h, "1-k": m.one_minus_k});
                }
                v
            }
            Action::Blackhole => json!({"type": "blackhole"}),
            Action::Delay {
                latency,
                jitter,
                correlation,
                distribution,
                percent,
            } => json!({"type": "delay", "latency": fmt_duration(*latency),
                "jitter": fmt_duration(*jitter), "correlation": correlation,
                "distribution": distribution.as_str(), "percent": percent}),
            Action::Reorder {
                percent,
                correlation,
                gap,
                latency,
            } => {
                let mut v = json!({"type": "reorder", "percent": percent,
                    "correlation": correlation, "gap": gap});
                if let Some(l) = latency {
                    v["latency"] = json!(fmt_duration(*l));
                }
                v
            }
            Action::Corrupt {
                percent,
                correlation,
            } => json!({"type": "corrupt", "percent": percent, "correlation": correlation}),
            Action::Duplicate {
                percent,
                correlation,
            } => json!({"type": "duplicate", "percent": percent, "correlation": correlation}),
            Action::Rate {
                bits_per_sec,
                burst_bytes,
            } => {
                let mut v = json!({"type": "rate", "rate": format!("{bits_per_sec}bit")});
                if let Some(b) = burst_bytes {
                    v["burst"] = json!(b);
                }
                v
            }
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn reject_unknown(m: &Map<String, Value>, known: &[&str]) -> Result<(), FieldError> {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            return Err(FieldError::invalid(
                &format!("action.{k}"),
                &format!("unknown field; expected one of: {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

fn opt_percent(m: &Map<String, Value>, key: &str, default: f64) -> Result<f64, FieldError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => parse_percent(v, &format!("action.{key}")),
    }
}

fn req_percent(m: &Map<String, Value>, key: &str) -> Result<f64, FieldError> {
    let field = format!("action.{key}");
    parse_percent(
        m.get(key).ok_or_else(|| FieldError::missing(&field))?,
        &field,
    )
}

fn opt_duration(m: &Map<String, Value>, key: &str) -> Result<Option<Duration>, FieldError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_duration(v, &format!("action.{key}")).map(Some),
    }
}

/// A number, or a string of a number and a unit that `unit` scales.
/// The error is the offending text.
fn scaled(v: &Value, unit: impl Fn(&str) -> Option<f64>) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| n.to_string()),
        Value::String(s) => {
            let t = s.trim().to_ascii_lowercase();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (num, u) = t.split_at(split);
            let num: f64 = num.parse().map_err(|_| s.clone())?;
            Ok(num * unit(u.trim()).ok_or_else(|| s.clone())?)
        }
        other => Err(other.to_string()),
    }
}

/// A rate such as `"20mbit"`, `"1.5gbit"`, `"500kbit"`, `"10mbps"` (bytes per
/// second, as in tc) or a bare number of bits per second. Units are SI.
pub fn parse_rate(v: &Value, field: &str) -> Result<u64, FieldError> {
    let bad = |s: &str| {
        FieldError::invalid(
            field,
            &format!("invalid rate {s:?}; expected e.g. \"20mbit\", \"500kbit\", \"10mbps\""),
        )
    };
    let bits = scaled(v, |unit| match unit {
        "" | "bit" => Some(1.0),
        "kbit" => Some(1e3),
        "mbit" => Some(1e6),
        "gbit" => Some(1e9),
        "bps" => Some(8.0),
        "kbps" => Some(8e3),
        "mbps" => Some(8e6),
        "gbps" => Some(8e9),
        _ => None,
    })
    .map_err(|s| bad(&s))?;
    if !bits.is_finite() || !(8_000.0..=400e9).contains(&bits) {
        return Err(FieldError::invalid(
            field,
            "must be between 8kbit and 400gbit",
        ));
    }
    Ok(bits.round() as u64)
}

/// A size in bytes: a bare number, or with `b`, `kb`/`k`/`kib` (1024),
/// `mb`/`m`/`mib` (1024²).
pub fn parse_size(v: &Value, field: &str) -> Result<u64, FieldError> {
    let bad = |s: &str| {
        FieldError::invalid(
            field,
            &format!("invalid size {s:?}; expected bytes, e.g. 32768 or \"32kb\""),
        )
    };
    let bytes = scaled(v, |unit| match unit {
        "" | "b" => Some(1.0),
        "k" | "kb" | "kib" => Some(1024.0),
        "m" | "mb" | "mib" => Some(1024.0 * 1024.0),
        _ => None,
    })
    .map_err(|s| bad(&s))?;
    if !bytes.is_finite() || !(1500.0..=(1u64 << 30) as f64).contains(&bytes) {
        return Err(FieldError::invalid(
            field,
            "must be between 1500 bytes and 1gb",
        ));
    }
    Ok(bytes.round() as u64)
}

fn parse_model(v: &Value) -> Result<GilbertElliott, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid("action.model", "must be an object"))?;
    for k in m.keys() {
        if !["type", "p", "r", "1-h", "1-k"].contains(&k.as_str()) {
            return Err(FieldError::invalid(
                &format!("action.model.{k}"),
                "unknown field; expected type, p, r, 1-h, 1-k",
            ));
        }
    }
    match m.get("type").and_then(Value::as_str) {
        Some("gilbert-elliott") | None => {}
        Some(other) => {
            return Err(FieldError::invalid(
                "action.model.type",
                &format!("unknown model {other:?}; expected gilbert-elliott"),
            ))
        }
    }
    let get = |k: &str, default: Option<f64>| -> Result<f64, FieldError> {
        let field = format!("action.model.{k}");
        match (m.get(k), default) {
            (Some(v), _) => parse_percent(v, &field),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(FieldError::missing(&field)),
        }
    };
    let p = get("p", None)?;
    // netem's defaults: r = 1 - p, 1-h = 100%, 1-k = 0%.
    let r = get("r", Some(100.0 - p))?;
    Ok(GilbertElliott {
        p,
        r,
        one_minus_h: get("1-h", Some(100.0))?,
        one_minus_k: get("1-k", Some(0.0))?,
    })
}

/// Parses `action`. Errors name the field (`action.latency`).
pub fn parse_action(v: &Value) -> Result<Action, FieldError> {
    let m = v
        .as_object()
        .ok_or_else(|| FieldError::invalid("action", "must be an object"))?;
    let ty = match m.get("type") {
        None => return Err(FieldError::missing("action.type")),
        Some(t) => t
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FieldError::invalid("action.type", "must be a string"))?,
    };
    match ty {
        "loss" => {
            reject_unknown(m, &["type", "percent", "correlation", "model"])?;
            let model = match m.get("model") {
                None | Some(Value::Null) => None,
                Some(v) => Some(parse_model(v)?),
            };
            let percent = match model {
                Some(_) => opt_percent(m, "percent", 0.0)?,
                None => req_percent(m, "percent")?,
            };
            Ok(Action::Loss {
                percent,
                correlation: opt_percent(m, "correlation", 0.0)?,
                model,
            })
        }
        "blackhole" => {
            reject_unknown(m, &["type"])?;
            Ok(Action::Blackhole)
        }
        "delay" => {
            reject_unknown(
                m,
                &[
                    "type",
                    "latency",
                    "jitter",
                    "correlation",
                    "distribution",
                    "percent",
                ],
            )?;
            let latency =
                opt_duration(m, "latency")?.ok_or_else(|| FieldError::missing("action.latency"))?;
            let jitter = opt_duration(m, "jitter")?.unwrap_or_default();
            let distribution = match m.get("distribution") {
                None | Some(Value::Null) => Distribution::Uniform,
                Some(d) => match d.as_str() {
                    Some("uniform") => Distribution::Uniform,
                    Some("normal") => Distribution::Normal,
                    Some("pareto") => Distribution::Pareto,
                    Some("paretonormal") => Distribution::ParetoNormal,
                    _ => {
                        return Err(FieldError::invalid(
                            "action.distribution",
                            "expected uniform, normal, pareto or paretonormal",
                        ))
                    }
                },
            };
            if latency > Duration::from_secs(60) || jitter > Duration::from_secs(60) {
                return Err(FieldError::invalid(
                    if latency > Duration::from_secs(60) {
                        "action.latency"
                    } else {
                        "action.jitter"
                    },
                    "must be at most 60s",
                ));
            }
            if latency.is_zero() && jitter.is_zero() {
                return Err(FieldError::invalid(
                    "action.latency",
                    "a delay needs a latency or a jitter above zero",
                ));
            }
            Ok(Action::Delay {
                latency,
                jitter,
                correlation: opt_percent(m, "correlation", 0.0)?,
                distribution,
                percent: opt_percent(m, "percent", 100.0)?,
            })
        }
        "reorder" => {
            reject_unknown(m, &["type", "percent", "correlation", "gap", "latency"])?;
            let gap = match m.get("gap") {
                None | Some(Value::Null) => 0,
                Some(g) => g.as_u64().filter(|g| *g <= 1_000_000).ok_or_else(|| {
                    FieldError::invalid("action.gap", "must be a whole number from 0 to 1000000")
                })? as u32,
            };
            Ok(Action::Reorder {
                percent: req_percent(m, "percent")?,
                correlation: opt_percent(m, "correlation", 0.0)?,
                gap,
                latency: opt_duration(m, "latency")?,
            })
        }
        "corrupt" | "duplicate" => {
            reject_unknown(m, &["type", "percent", "correlation"])?;
            let percent = req_percent(m, "percent")?;
            let correlation = opt_percent(m, "correlation", 0.0)?;
            Ok(if ty == "corrupt" {
                Action::Corrupt {
                    percent,
                    correlation,
                }
            } else {
                Action::Duplicate {
                    percent,
                    correlation,
                }
            })
        }
        "rate" => {
            reject_unknown(m, &["type", "rate", "burst"])?;
            let bits_per_sec = parse_rate(
                m.get("rate")
                    .ok_or_else(|| FieldError::missing("action.rate"))?,
                "action.rate",
            )?;
            let burst_bytes = match m.get("burst") {
                None | Some(Value::Null) => None,
                Some(b) => Some(parse_size(b, "action.burst")?),
            };
            Ok(Action::Rate {
                bits_per_sec,
                burst_bytes,
            })
        }
        t if PLANNED_ACTIONS.contains(&t) => Err(FieldError::unsupported(
            "action.type",
            &format!("action {t:?} is not supported by this agent yet; supported: {SUPPORTED}"),
        )),
        t => Err(FieldError::invalid(
            "action.type",
            &format!("unknown action {t:?}; supported: {SUPPORTED}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(v: Value) -> String {
        match parse_action(&v) {
            Ok(a) => panic!("expected an error, parsed {a:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn every_packet_action_round_trips() {
        for v in [
            json!({"type": "loss", "percent": 5, "correlation": 25}),
            json!({"type": "loss", "model": {"type": "gilbert-elliott", "p": 1, "r": 20, "1-h": 90, "1-k": 0.5}}),
            json!({"type": "blackhole"}),
            json!({"type": "delay", "latency": "20ms", "jitter": "5ms", "correlation": 25, "distribution": "pareto"}),
            json!({"type": "reorder", "percent": 25, "gap": 5, "latency": "10ms"}),
            json!({"type": "corrupt", "percent": 40}),
            json!({"type": "duplicate", "percent": 50, "correlation": 10}),
            json!({"type": "rate", "rate": "20mbit", "burst": "32kb"}),
        ] {
            let a = parse_action(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
            let again = parse_action(&a.to_json()).expect("canonical form parses");
            assert_eq!(again, a, "{v}");
        }
    }

    #[test]
    fn units_and_defaults() {
        assert_eq!(parse_rate(&json!("20mbit"), "r"), Ok(20_000_000));
        assert_eq!(parse_rate(&json!("1.5gbit"), "r"), Ok(1_500_000_000));
        assert_eq!(parse_rate(&json!("10mbps"), "r"), Ok(80_000_000));
        assert_eq!(parse_size(&json!("32kb"), "b"), Ok(32768));
        assert_eq!(parse_size(&json!(3000), "b"), Ok(3000));
        let Ok(Action::Loss { model: Some(m), .. }) =
            parse_action(&json!({"type": "loss", "model": {"p": 5}}))
        else {
            panic!("gemodel with defaults");
        };
        assert_eq!((m.r, m.one_minus_h, m.one_minus_k), (95.0, 100.0, 0.0));
        let Ok(Action::Delay {
            distribution,
            percent,
            ..
        }) = parse_action(&json!({"type": "delay", "latency": "1ms"}))
        else {
            panic!("delay defaults");
        };
        assert_eq!((distribution, percent), (Distribution::Uniform, 100.0));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(json!({"type": "delay"})), "action.latency");
        assert_eq!(
            field(json!({"type": "delay", "latency": "fast"})),
            "action.latency"
        );
        assert_eq!(
            field(json!({"type": "delay", "latency": "1ms", "distribution": "poisson"})),
            "action.distribution"
        );
        assert_eq!(
            field(json!({"type": "delay", "latency": "0ms"})),
            "action.latency"
        );
        assert_eq!(field(json!({"type": "rate"})), "action.rate");
        assert_eq!(
            field(json!({"type": "rate", "rate": "fast"})),
            "action.rate"
        );
        assert_eq!(
            field(json!({"type": "rate", "rate": "1bit"})),
            "action.rate"
        );
        assert_eq!(
            field(json!({"type": "rate", "rate": "1mbit", "burst": "huge"})),
            "action.burst"
        );
        assert_eq!(
            field(json!({"type": "reorder", "gap": 5})),
            "action.percent"
        );
        assert_eq!(
            field(json!({"type": "reorder", "percent": 5, "gap": -1})),
            "action.gap"
        );
        assert_eq!(
            field(json!({"type": "corrupt", "percent": 400})),
            "action.percent"
        );
        assert_eq!(
            field(json!({"type": "loss", "model": {"p": 5, "q": 1}})),
            "action.model.q"
        );
        assert_eq!(
            field(json!({"type": "loss", "model": {"r": 5}})),
            "action.model.p"
        );
        assert_eq!(field(json!({"type": "http-abort"})), "action.type");
    }
}
