//! The actions of the tc eBPF datapath: loss, blackhole, corrupt, duplicate,
//! rate.

use serde_json::{json, Map, Value};

use crate::error::FieldError;
use crate::parse::ACTION;
use crate::parse::{
    obj, opt, opt_percent, parse_percent, parse_rate, parse_size, reject_unknown, req, req_percent,
};

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

/// The actions served by the tc eBPF datapath.
#[derive(Debug, Clone, PartialEq)]
pub enum PacketAction {
    /// Drop `percent` of matching packets. `correlation` (0–100) has netem's
    /// meaning; `model` replaces both with a Gilbert-Elliott chain.
    Loss {
        percent: f64,
        correlation: f64,
        model: Option<GilbertElliott>,
    },
    /// Drop every matching packet.
    Blackhole,
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

impl PacketAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            PacketAction::Loss { .. } => "loss",
            PacketAction::Blackhole => "blackhole",
            PacketAction::Corrupt { .. } => "corrupt",
            PacketAction::Duplicate { .. } => "duplicate",
            PacketAction::Rate { .. } => "rate",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            PacketAction::Loss {
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
            PacketAction::Blackhole => json!({"type": "blackhole"}),
            PacketAction::Corrupt {
                percent,
                correlation,
            }
            | PacketAction::Duplicate {
                percent,
                correlation,
            } => json!({"type": self.type_name(), "percent": percent, "correlation": correlation}),
            PacketAction::Rate {
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

/// `loss`: a percentage, or a Gilbert-Elliott `model`.
pub(super) fn loss(m: &Map<String, Value>) -> Result<PacketAction, FieldError> {
    reject_unknown(m, ACTION, &["type", "percent", "correlation", "model"])?;
    let model = opt(m, ACTION, "model", parse_model)?;
    let percent = match model {
        Some(_) => opt_percent(m, ACTION, "percent", 0.0)?,
        None => req_percent(m, ACTION, "percent")?,
    };
    Ok(PacketAction::Loss {
        percent,
        correlation: opt_percent(m, ACTION, "correlation", 0.0)?,
        model,
    })
}

/// `action.model`, with netem's defaults: r = 1 - p, 1-h = 100%, 1-k = 0%.
fn parse_model(v: &Value, field: &str) -> Result<GilbertElliott, FieldError> {
    const KNOWN: &[&str] = &["type", "p", "r", "1-h", "1-k"];
    let m = obj(v, field)?;
    if let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(FieldError::invalid(
            &format!("{field}.{k}"),
            "unknown field; expected type, p, r, 1-h, 1-k",
        ));
    }
    match m.get("type").and_then(Value::as_str) {
        Some("gilbert-elliott") | None => {}
        Some(other) => {
            return Err(FieldError::invalid(
                &format!("{field}.type"),
                &format!("unknown model {other:?}; expected gilbert-elliott"),
            ))
        }
    }
    let get = |k: &str, default: Option<f64>| -> Result<f64, FieldError> {
        match (m.contains_key(k), default) {
            (false, Some(d)) => Ok(d),
            _ => req(m, field, k, parse_percent),
        }
    };
    let p = get("p", None)?;
    let r = get("r", Some(100.0 - p))?;
    Ok(GilbertElliott {
        p,
        r,
        one_minus_h: get("1-h", Some(100.0))?,
        one_minus_k: get("1-k", Some(0.0))?,
    })
}

pub(super) fn blackhole(m: &Map<String, Value>) -> Result<PacketAction, FieldError> {
    reject_unknown(m, ACTION, &["type"])?;
    Ok(PacketAction::Blackhole)
}

/// The `percent` and `correlation` of `corrupt` and `duplicate`.
fn percent_correlation(m: &Map<String, Value>) -> Result<(f64, f64), FieldError> {
    reject_unknown(m, ACTION, &["type", "percent", "correlation"])?;
    Ok((
        req_percent(m, ACTION, "percent")?,
        opt_percent(m, ACTION, "correlation", 0.0)?,
    ))
}

pub(super) fn corrupt(m: &Map<String, Value>) -> Result<PacketAction, FieldError> {
    let (percent, correlation) = percent_correlation(m)?;
    Ok(PacketAction::Corrupt {
        percent,
        correlation,
    })
}

pub(super) fn duplicate(m: &Map<String, Value>) -> Result<PacketAction, FieldError> {
    let (percent, correlation) = percent_correlation(m)?;
    Ok(PacketAction::Duplicate {
        percent,
        correlation,
    })
}

pub(super) fn rate(m: &Map<String, Value>) -> Result<PacketAction, FieldError> {
    reject_unknown(m, ACTION, &["type", "rate", "burst"])?;
    Ok(PacketAction::Rate {
        bits_per_sec: req(m, ACTION, "rate", parse_rate)?,
        burst_bytes: opt(m, ACTION, "burst", parse_size)?,
    })
}
