//! netem's random numbers: correlated uniform draws and the delay
//! distributions, computed rather than read from iproute2's tables.
//!
//! netem draws a (correlated) 32-bit uniform `u` and returns
//! `latency + jitter * t(u)`, where `t` is the standard distribution's
//! inverse CDF (iproute2 stores it in `/usr/lib/tc/*.dist`, scaled by 8192).
//! Here `t` is evaluated directly:
//! - `uniform`: no table; netem returns a value uniform in
//!   `[latency - jitter, latency + jitter)`;
//! - `normal`: the standard normal quantile (Acklam's rational
//!   approximation, relative error below 1.2e-9), clipped to ±4 as the 16-bit
//!   table is;
//! - `pareto`: iproute2's `pareto.c`: `(4/3) * (u^(-1/3) - 1.5)`, shape 3,
//!   clipped at 32767/8192;
//! - `paretonormal`: iproute2's mix, a quarter normal and three quarters
//!   pareto of the same draw.

use netfault_api::spec::Distribution;

/// netem's `get_crandom`: a uniform 32-bit draw correlated with the last one
/// by `rho` (0–100 percent).
#[derive(Debug, Clone, Default)]
pub struct Correlated {
    rho: u32,
    last: u32,
}

impl Correlated {
    pub fn new(correlation_percent: f64) -> Correlated {
        let rho = (correlation_percent.clamp(0.0, 100.0) / 100.0 * u32::MAX as f64) as u32;
        Correlated { rho, last: 0 }
    }

    pub fn next_u32(&mut self) -> u32 {
        let rnd: u32 = rand::random();
        if self.rho == 0 {
            return rnd;
        }
        let rho = self.rho as u64 + 1;
        let v = (rho * self.last as u64 + ((1u64 << 32) - rho) * rnd as u64) >> 32;
        self.last = v as u32;
        self.last
    }

    /// A draw in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        self.next_u32() as f64 / (u32::MAX as f64 + 1.0)
    }

    /// True with probability `percent`/100 (netem: `p > get_crandom()`).
    pub fn chance(&mut self, percent: f64) -> bool {
        if percent >= 100.0 {
            // Still advance the state, as netem does.
            self.next_u32();
            return true;
        }
        let p = (percent.max(0.0) / 100.0 * u32::MAX as f64) as u32;
        p > self.next_u32()
    }
}

/// Standard normal quantile (Acklam).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239e0,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838e0,
        -2.549671058214902e0,
        4.374664141464968e0,
        2.938163982698783e0,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996e0,
        3.754408661907416e0,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let lo = 0.02425;
    if p < lo {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - lo {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// The largest table value netem can return (`32767 / NETEM_DIST_SCALE`).
const TABLE_MAX: f64 = 32767.0 / 8192.0;

fn pareto_t(u: f64) -> f64 {
    // iproute2 pareto.c walks i from 65536 down: x = (i/65536)^(-1/a) - 1.5.
    let v = (1.0 - u).max(1.0 / 65536.0);
    ((4.0 / 3.0) * (v.powf(-1.0 / 3.0) - 1.5)).min(TABLE_MAX)
}

/// netem's `t(u)` for `dist`: the standardised offset for a draw `u` in [0,1).
pub fn table_value(dist: Distribution, u: f64) -> f64 {
    match dist {
        Distribution::Uniform => 2.0 * u - 1.0,
        Distribution::Normal => normal_quantile(u).clamp(-TABLE_MAX, TABLE_MAX),
        Distribution::Pareto => pareto_t(u),
        Distribution::ParetoNormal => {
            (0.25 * normal_quantile(u) + 0.75 * pareto_t(u)).clamp(-TABLE_MAX, TABLE_MAX)
        }
    }
}

/// Samples netem delays: `latency + jitter * t(u)`, never below zero.
#[derive(Debug, Clone)]
pub struct DelaySampler {
    pub latency_ns: f64,
    pub jitter_ns: f64,
    pub dist: Distribution,
    rnd: Correlated,
}

impl DelaySampler {
    pub fn new(latency_ns: f64, jitter_ns: f64, correlation: f64, dist: Distribution) -> Self {
        DelaySampler {
            latency_ns,
            jitter_ns,
            dist,
            rnd: Correlated::new(correlation),
        }
    }

    pub fn sample_ns(&mut self) -> u64 {
        if self.jitter_ns <= 0.0 {
            return self.latency_ns.max(0.0) as u64;
        }
        let u = self.rnd.next_unit();
        (self.latency_ns + self.jitter_ns * table_value(self.dist, u)).max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(d: Distribution) -> (f64, f64) {
        let mut s = DelaySampler::new(0.0, 1.0e6, 0.0, d);
        // Allow negative results for the check: sample t directly.
        let _ = s.sample_ns();
        let n = 200_000;
        let mut r = Correlated::new(0.0);
        let xs: Vec<f64> = (0..n).map(|_| table_value(d, r.next_unit())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn distributions_have_netem_moments() {
        let (m, s) = stats(Distribution::Uniform);
        assert!(
            m.abs() < 0.01 && (s - 1.0 / 3f64.sqrt()).abs() < 0.01,
            "{m} {s}"
        );
        let (m, s) = stats(Distribution::Normal);
        assert!(m.abs() < 0.01 && (s - 1.0).abs() < 0.01, "{m} {s}");
        let (m, _) = stats(Distribution::Pareto);
        // Shape-3 pareto centred at its mean (1.5), clipped: mean slightly below 0.
        assert!(m.abs() < 0.05, "{m}");
    }

    #[test]
    fn normal_quantile_is_accurate() {
        assert!(normal_quantile(0.5).abs() < 1e-9);
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
        assert!((normal_quantile(0.025) + 1.959964).abs() < 1e-5);
    }

    #[test]
    fn correlation_makes_runs() {
        let mut a = Correlated::new(0.0);
        let mut b = Correlated::new(90.0);
        let diff = |r: &mut Correlated| {
            let mut last = r.next_unit();
            let mut t = 0.0;
            for _ in 0..10_000 {
                let x = r.next_unit();
                t += (x - last).abs();
                last = x;
            }
            t / 10_000.0
        };
        assert!(diff(&mut b) < diff(&mut a) / 3.0);
    }

    #[test]
    fn chance_matches_percent() {
        let mut r = Correlated::new(0.0);
        let hits = (0..100_000).filter(|_| r.chance(30.0)).count();
        assert!((hits as f64 / 100_000.0 - 0.3).abs() < 0.01);
    }
}
