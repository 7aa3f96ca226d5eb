//! What `/health` and `/metrics` show about a component's consumer: the
//! Kafka adapter's consumer loop reports here, the readers take snapshots.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

/// What `/health` shows about a component's consumer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusSnapshot {
    /// Whether the consumer loop is running.
    pub consuming: bool,
    /// `topic/partition` currently assigned.
    pub assigned_partitions: Vec<String>,
    /// Last offset whose processing completed, per `topic/partition`.
    pub last_processed_offsets: BTreeMap<String, i64>,
    /// Records behind the end of each assigned partition (from librdkafka
    /// statistics, refreshed every second; -1 when unknown).
    pub lag: BTreeMap<String, i64>,
    /// Records handled successfully since start.
    pub handled: u64,
    /// Records set aside on the dead-letter topic since start.
    pub dead_lettered: u64,
    /// Records dropped since start because their event id was handled before.
    pub duplicates_dropped: u64,
    /// The last consumer error, if any.
    pub last_error: Option<String>,
    /// Whether the consumer has left its group because the shared state
    /// store stopped answering (its partitions went to the other hosts).
    pub handed_off: bool,
    /// Times since start the consumer left its group for that reason.
    pub handoffs: u64,
    /// Times since start it rejoined once the store answered again.
    pub rejoins: u64,
}

/// Shared, live status of one consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerStatus(Arc<Mutex<StatusSnapshot>>);

impl ConsumerStatus {
    /// Changes the status (the consumer reports through this).
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
