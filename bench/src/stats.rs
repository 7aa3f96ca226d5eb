//! Latency percentiles over a run's samples. A run holds at most tens of
//! thousands of samples, so a sorted `Vec` is exact and cheap enough; no
//! histogram is needed.

use std::time::Duration;

use serde::Serialize;

/// Summary of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
}

impl Percentiles {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Option<Self> {
        let mut ms: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let mean_ms = ms.iter().sum::<f64>() / ms.len() as f64;
        Some(Self {
            count: ms.len(),
            p50_ms: nearest_rank(&ms, 50.0),
            p95_ms: nearest_rank(&ms, 95.0),
            p99_ms: nearest_rank(&ms, 99.0),
            max_ms: ms[ms.len() - 1],
            mean_ms,
        })
    }
}

/// The nearest-rank percentile of sorted, non-empty `sorted`: the smallest
/// sample with at least `p` % of the samples at or below it.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_hundred_ms() {
        let p = Percentiles::of((1..=100).rev().map(Duration::from_millis)).unwrap();
        assert_eq!(p.count, 100);
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p95_ms, 95.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.max_ms, 100.0);
        assert_eq!(p.mean_ms, 50.5);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let p = Percentiles::of([Duration::from_millis(7)]).unwrap();
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (7.0, 7.0, 7.0));
    }

    #[test]
    fn no_samples_no_summary() {
        assert_eq!(Percentiles::of([]), None);
    }
}
