//! Where an event's time goes: cumulative counts and durations of each stage
//! of the data path, per service, shown on `/health` and read by
//! `just bench` to print the cost of each stage per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

/// A stage of the data path.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Envelope parsed and the component's event built.
    Decode,
    /// Handled-id lookup (and, for a duplicate, its outbox).
    Dedup,
    /// A fresh instance made (not counted when an instance is reused).
    Instantiate,
    /// The component's `handle` export, with the host calls it makes.
    Call,
    /// Its outputs checked: grants, bounds, the outbox quota and each
    /// event type's JSON Schema.
    Validate,
    /// One batch written to the store (counted per batch).
    Commit,
    /// From the commit to its fsync covering it.
    DurableWait,
    /// From enqueueing the outputs to the broker's acknowledgement.
    Publish,
}

const STAGES: usize = 8;

/// Cumulative per-stage counters of one service; cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Stages {
    counts: [AtomicU64; STAGES],
    nanos: [AtomicU64; STAGES],
    /// The latency histograms of `/metrics`, once attached.
    histograms: std::sync::OnceLock<StageHistograms>,
}

/// One stage's totals.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StageTotal {
    /// Times the stage ran.
    pub count: u64,
    /// Total time spent in it, in microseconds.
    pub total_us: u64,
}

/// Every stage's totals, as `/health` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct StageTotals {
    pub decode: StageTotal,
    pub dedup: StageTotal,
    pub instantiate: StageTotal,
    pub call: StageTotal,
    pub validate: StageTotal,
    pub commit: StageTotal,
    pub durable_wait: StageTotal,
    pub publish: StageTotal,
}

impl Stages {
    /// Adds one run of `stage` that took `elapsed`.
    pub fn record(&self, stage: Stage, elapsed: Duration) {
        let i = stage as usize;
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.nanos[i].fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if let Some(histograms) = self.histograms.get() {
            histograms.observe(stage, elapsed);
        }
    }

    /// Also observes every later run in `histograms`; the first call wins.
    pub fn attach(&self, histograms: StageHistograms) {
        let _ = self.histograms.set(histograms);
    }

    /// Runs `f`, recording its duration under `stage`.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let value = f();
        self.record(stage, started.elapsed());
        value
    }

    /// The totals so far.
    pub fn totals(&self) -> StageTotals {
        let total = |stage: Stage| {
            let i = stage as usize;
            StageTotal {
                count: self.counts[i].load(Ordering::Relaxed),
                total_us: self.nanos[i].load(Ordering::Relaxed) / 1_000,
            }
        };
        StageTotals {
            decode: total(Stage::Decode),
            dedup: total(Stage::Dedup),
            instantiate: total(Stage::Instantiate),
            call: total(Stage::Call),
            validate: total(Stage::Validate),
            commit: total(Stage::Commit),
            durable_wait: total(Stage::DurableWait),
            publish: total(Stage::Publish),
        }
    }
}

/// One histogram per stage of one component, in [`Stage`]'s order, fed by
/// [`Stages`]; `crate::metrics` makes them and serves them on `/metrics`.
#[derive(Debug, Clone)]
pub struct StageHistograms(pub [Histogram; STAGES]);

impl StageHistograms {
    /// Adds one run of `stage` that took `elapsed`.
    pub fn observe(&self, stage: Stage, elapsed: Duration) {
        self.0[stage as usize].observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up() {
        let stages = Stages::default();
        stages.record(Stage::Call, Duration::from_micros(30));
        stages.record(Stage::Call, Duration::from_micros(12));
        assert_eq!(stages.time(Stage::Decode, || 7), 7);
        let totals = stages.totals();
        assert_eq!((totals.call.count, totals.call.total_us), (2, 42));
        assert_eq!(totals.decode.count, 1);
        assert_eq!(totals.commit.count, 0);
    }
}
