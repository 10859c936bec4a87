//! Small statistics shared by the tests, the benches and the demo.

use std::time::Duration;

/// The `q` quantile (0 to 1) of `samples`: the element at rank
/// round((n - 1) · q) of the sorted samples (so `q = 0.5` is the element at
/// n / 2); `None` when there are none.
pub fn quantile<T: Copy + PartialOrd>(samples: &[T], q: f64) -> Option<T> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let last = sorted.len().checked_sub(1)?;
    let rank = ((last as f64 * q).round() as usize).min(last);
    sorted.get(rank).copied()
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 (only over at least [`P99_MIN_SAMPLES`] samples) and max of
/// `v`, in ms.
pub fn summary_ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "n=0".into();
    }
    let q = |p| quantile(v, p).unwrap_or(f64::NAN);
    if v.len() >= P99_MIN_SAMPLES {
        format!(
            "n={:<5} p50 {:>8.2}  p99 {:>8.2}  max {:>8.2} ms",
            v.len(),
            q(0.5),
            q(0.99),
            q(1.0)
        )
    } else {
        format!(
            "n={:<5} p50 {:>8.2}  max {:>8.2} ms",
            v.len(),
            q(0.5),
            q(1.0)
        )
    }
}

/// The tail of a set of samples as a bench may print it: `p99` over at
/// least [`P99_MIN_SAMPLES`] samples, else the `max` (a "p99" of 40 samples
/// is only the slowest one under another name).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// `"p99"` or `"max"`.
    pub label: &'static str,
    /// The value (NaN when there are no samples).
    pub value: f64,
}

/// The fewest samples over which a bench prints a p99.
pub const P99_MIN_SAMPLES: usize = 100;

/// [`Tail`] of `samples`: p99 over at least 100 of them, else max.
pub fn tail(samples: &[f64]) -> Tail {
    if samples.len() >= P99_MIN_SAMPLES {
        Tail {
            label: "p99",
            value: quantile(samples, 0.99).unwrap_or(f64::NAN),
        }
    } else {
        Tail {
            label: "max",
            value: samples.iter().copied().fold(f64::NAN, f64::max),
        }
    }
}

/// The label for the tail of several sets of samples printed side by side
/// (a column header, a difference of two tails): `"p99"` only when every
/// set has at least 100 samples.
pub fn tail_label<'a>(sets: impl IntoIterator<Item = &'a [f64]>) -> &'static str {
    if sets.into_iter().all(|s| s.len() >= P99_MIN_SAMPLES) {
        "p99"
    } else {
        "max"
    }
}

/// The median of per-round values with their spread: min, max and the
/// quartiles (the elements at ranks round((n - 1) q), as [`quantile`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub q1: f64,
    pub q3: f64,
}

impl Spread {
    /// The spread of `values` (NaN everywhere when there are none; NaN
    /// values are left out).
    pub fn of(values: &[f64]) -> Spread {
        let v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        let q = |p| quantile(&v, p).unwrap_or(f64::NAN);
        Spread {
            n: v.len(),
            median: q(0.5),
            min: q(0.0),
            max: q(1.0),
            q1: q(0.25),
            q3: q(0.75),
        }
    }

    /// "median [min..max]" with `decimals` decimals.
    pub fn range(&self, decimals: usize) -> String {
        format!(
            "{:.d$} [{:.d$}..{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }

    /// "median [q1..q3] IQR" with `decimals` decimals (for many rounds).
    pub fn iqr(&self, decimals: usize) -> String {
        format!(
            "{:.d$} [IQR {:.d$}..{:.d$}]",
            self.median,
            self.q1,
            self.q3,
            d = decimals
        )
    }
}

/// Per-round ratios `a[i] / b[i]` of two configurations measured back to
/// back in each round (paired), for [`Spread::of`]; rounds missing from
/// either side are left out.
pub fn paired_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Per-round differences `a[i] - b[i]` of paired rounds.
pub fn paired_diffs(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// "median [min..max] (n paired rounds)" of the per-round ratios `a / b`,
/// as a percentage with one decimal.
pub fn paired_percent(a: &[f64], b: &[f64]) -> String {
    let s = Spread::of(
        &paired_ratios(a, b)
            .iter()
            .map(|r| r * 100.0)
            .collect::<Vec<_>>(),
    );
    format!("{}% ({} paired rounds)", s.range(1), s.n)
}

/// The order of `n` configurations in round `round`: rotated by one each
/// round, so every configuration runs first (and last) in turn.
pub fn rotation(round: usize, n: usize) -> Vec<usize> {
    (0..n).map(|k| (k + round) % n).collect()
}

/// A bench's check that the traffic it labels "netfault" went through
/// netfault failed; it reads "NOT VERIFIED: ...", and a bench returns it
/// from its run function so [`crate::bench_main`] exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("NOT VERIFIED: {0}")]
pub struct NotVerified(pub String);

/// `Ok` when `ok`, else [`NotVerified`] with `what` (what was expected and
/// what was seen).
pub fn verify(ok: bool, what: impl FnOnce() -> String) -> Result<(), NotVerified> {
    if ok {
        Ok(())
    } else {
        Err(NotVerified(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert_eq!(quantile::<u32>(&[], 0.5), None);
        assert_eq!(quantile(&[3, 1, 2], 0.5), Some(2));
        // Even counts: the upper middle, as `v[n / 2]`.
        assert_eq!(quantile(&[4, 1, 3, 2], 0.5), Some(3));
        assert_eq!(quantile(&[1.0, 5.0, 2.0], 1.0), Some(5.0));
        assert_eq!(quantile(&[1.0, 5.0, 2.0], 0.0), Some(1.0));
        let v: Vec<u32> = (0..100).collect();
        assert_eq!(quantile(&v, 0.99), Some(98));
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }

    #[test]
    fn tail_is_p99_only_over_100_samples() {
        let few: Vec<f64> = (1..=99).map(f64::from).collect();
        assert_eq!(
            tail(&few),
            Tail {
                label: "max",
                value: 99.0
            }
        );
        let many: Vec<f64> = (0..100).map(f64::from).collect();
        assert_eq!(
            tail(&many),
            Tail {
                label: "p99",
                value: 98.0
            }
        );
        assert!(tail(&[]).value.is_nan());
        assert_eq!(tail(&[]).label, "max");
        assert_eq!(tail_label([many.as_slice(), many.as_slice()]), "p99");
        assert_eq!(tail_label([many.as_slice(), few.as_slice()]), "max");
        assert!(summary_ms(&few).contains("max") && !summary_ms(&few).contains("p99"));
        assert!(summary_ms(&many).contains("p99"));
    }

    #[test]
    fn paired_ratio_spread() {
        // Round 2 was slow for both: its ratio is as good as the others.
        let netfault = [90.0, 45.0, 88.0, 92.0, 80.0];
        let baseline = [100.0, 50.0, 100.0, 100.0, 100.0];
        let r = paired_ratios(&netfault, &baseline);
        assert_eq!(r, vec![0.9, 0.9, 0.88, 0.92, 0.8]);
        let s = Spread::of(&r);
        assert_eq!((s.n, s.median, s.min, s.max), (5, 0.9, 0.8, 0.92));
        assert_eq!((s.q1, s.q3), (0.88, 0.9));
        assert_eq!(s.range(2), "0.90 [0.80..0.92]");
        assert_eq!(s.iqr(2), "0.90 [IQR 0.88..0.90]");
        assert_eq!(
            paired_percent(&netfault, &baseline),
            "90.0 [80.0..92.0]% (5 paired rounds)"
        );
        // Unpaired extra rounds and NaN are left out.
        assert_eq!(paired_diffs(&[3.0, 5.0, 7.0], &[1.0, 1.0]), vec![2.0, 4.0]);
        assert_eq!(Spread::of(&[f64::NAN, 2.0]).n, 1);
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn rotation_puts_each_configuration_first_in_turn() {
        assert_eq!(rotation(0, 3), vec![0, 1, 2]);
        assert_eq!(rotation(1, 3), vec![1, 2, 0]);
        assert_eq!(rotation(2, 3), vec![2, 0, 1]);
        assert_eq!(rotation(3, 3), vec![0, 1, 2]);
        assert_eq!(rotation(1, 2), vec![1, 0]);
    }

    #[test]
    fn not_verified_says_so() {
        assert!(verify(true, || unreachable!()).is_ok());
        let e = verify(false, || "0 of 10 packets queued".into()).err();
        assert_eq!(
            e.map(|e| e.to_string()),
            Some("NOT VERIFIED: 0 of 10 packets queued".into())
        );
    }
}
