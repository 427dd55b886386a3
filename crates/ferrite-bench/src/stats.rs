//! Percentiles and medians of measured samples.

use std::time::Duration;

use serde::Serialize;

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Summarizes `samples`; all fields are 0 when there are none.
    pub fn from_durations(samples: &[Duration]) -> Self {
        let mut millis: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        millis.sort_by(f64::total_cmp);
        Self {
            p50: round3(percentile(&millis, 50.0)),
            p99: round3(percentile(&millis, 99.0)),
            max: round3(millis.last().copied().unwrap_or(0.0)),
        }
    }
}

/// Returns the nearest-rank percentile `p` (0 to 100) of ascending `sorted`, or 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Returns the median of `values` (the mean of the middle two for an even
/// count), or `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        Some(sorted[middle])
    } else {
        Some((sorted[middle - 1] + sorted[middle]) / 2.0)
    }
}

/// Rounds to three decimals, enough for milliseconds and seconds in reports.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn median_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn latency_summary_in_milliseconds() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let summary = LatencySummary::from_durations(&samples);
        assert_eq!(summary.p50, 5.0);
        assert_eq!(summary.p99, 10.0);
        assert_eq!(summary.max, 10.0);
        assert_eq!(LatencySummary::from_durations(&[]).max, 0.0);
    }
}
