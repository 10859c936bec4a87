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
