//! The actions of the NFQUEUE delay engine: delay and reorder.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::FieldError;
use crate::parse::ACTION;
use crate::parse::{fmt_duration, opt, opt_duration, opt_percent, reject_unknown, req_percent};

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

    fn parse(v: &Value, field: &str) -> Result<Distribution, FieldError> {
        match v.as_str() {
            Some("uniform") => Ok(Distribution::Uniform),
            Some("normal") => Ok(Distribution::Normal),
            Some("pareto") => Ok(Distribution::Pareto),
            Some("paretonormal") => Ok(Distribution::ParetoNormal),
            _ => Err(FieldError::invalid(
                field,
                "expected uniform, normal, pareto or paretonormal",
            )),
        }
    }
}

/// The actions served by the NFQUEUE delay engine.
#[derive(Debug, Clone, PartialEq)]
pub enum DelayAction {
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
}

impl DelayAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            DelayAction::Delay { .. } => "delay",
            DelayAction::Reorder { .. } => "reorder",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            DelayAction::Delay {
                latency,
                jitter,
                correlation,
                distribution,
                percent,
            } => json!({"type": "delay", "latency": fmt_duration(*latency),
                "jitter": fmt_duration(*jitter), "correlation": correlation,
                "distribution": distribution.as_str(), "percent": percent}),
            DelayAction::Reorder {
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
        }
    }
}

/// Longest `latency` or `jitter` of a delay.
const MAX_DELAY: Duration = Duration::from_secs(60);

pub(super) fn delay(m: &Map<String, Value>) -> Result<DelayAction, FieldError> {
    reject_unknown(
        m,
        ACTION,
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
        opt_duration(m, ACTION, "latency")?.ok_or_else(|| FieldError::missing("action.latency"))?;
    let jitter = opt_duration(m, ACTION, "jitter")?.unwrap_or_default();
    let distribution =
        opt(m, ACTION, "distribution", Distribution::parse)?.unwrap_or(Distribution::Uniform);
    if latency > MAX_DELAY {
        return Err(FieldError::invalid("action.latency", "must be at most 60s"));
    }
    if jitter > MAX_DELAY {
        return Err(FieldError::invalid("action.jitter", "must be at most 60s"));
    }
    if latency.is_zero() && jitter.is_zero() {
        return Err(FieldError::invalid(
            "action.latency",
            "a delay needs a latency or a jitter above zero",
        ));
    }
    Ok(DelayAction::Delay {
        latency,
        jitter,
        correlation: opt_percent(m, ACTION, "correlation", 0.0)?,
        distribution,
        percent: opt_percent(m, ACTION, "percent", 100.0)?,
    })
}

pub(super) fn reorder(m: &Map<String, Value>) -> Result<DelayAction, FieldError> {
    reject_unknown(
        m,
        ACTION,
        &["type", "percent", "correlation", "gap", "latency"],
    )?;
    let gap = opt(m, ACTION, "gap", |g, field| {
        g.as_u64()
            .filter(|g| *g <= 1_000_000)
            .map(|g| g as u32)
            .ok_or_else(|| FieldError::invalid(field, "must be a whole number from 0 to 1000000"))
    })?
    .unwrap_or(0);
    Ok(DelayAction::Reorder {
        percent: req_percent(m, ACTION, "percent")?,
        correlation: opt_percent(m, ACTION, "correlation", 0.0)?,
        gap,
        latency: opt_duration(m, ACTION, "latency")?,
    })
}
