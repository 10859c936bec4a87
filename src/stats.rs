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

/// p50, p99 (only over at least 100 samples) and max of `v`, in ms.
pub fn summary_ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "n=0".into();
    }
    let q = |p| quantile(v, p).unwrap_or(f64::NAN);
    if v.len() >= 100 {
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
}
