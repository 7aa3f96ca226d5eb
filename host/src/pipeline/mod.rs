//! The processing core: from inbound records (and due timers) to the records
//! to publish. Decode the envelope, drop what was handled before, call the
//! component (retrying what may succeed later), wrap what it emitted in
//! envelopes and commit it with the state changes, or set the record aside
//! on the dead-letter topic.
//!
//! Each service has one executor thread ([`executor`]) that handles
//! records in submission order, in batches committed as one store
//! transaction; guests and commits never run on the async runtime.
//! Adapter-neutral: the Kafka consumer, the scheduler and the in-memory
//! tests all drive it through [`Pipeline::submit`].

mod executor;
mod records;
mod settle;
mod timers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Inbound, Outbound, Publisher};
use crate::clock::Clock;
use crate::limits::DEFAULT_MAX_RECORD_BYTES;
use crate::runtime::ServiceRuntime;
use crate::state::Timer;

pub use records::event_of;
pub use settle::{Settled, Turn, settle};
pub use timers::FAILED_TIMER_RETRY_MS;

pub use crate::limits::MAX_RECORD_BYTES;

/// Largest value a dead-letter record carries; a longer one is cut there
/// (its full length in a `dlq-truncated` header), so that the dead-letter
/// topic always takes it.
pub const MAX_DEAD_LETTER_VALUE: usize = 64 * 1024;

/// Logical topic of the events timers deliver.
pub const TIMER_TOPIC: &str = "timer";

/// Maps logical topic names (what components see) to physical ones.
#[derive(Debug, Clone, Default)]
pub struct Topics {
    /// Prefix of every physical topic.
    pub prefix: String,
    /// Logical name of the dead-letter topic.
    pub dead_letter: String,
}

impl Topics {
    /// The physical name of a logical topic.
    pub fn physical(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// The logical name of a physical topic.
    pub fn logical<'a>(&self, physical: &'a str) -> &'a str {
        physical.strip_prefix(self.prefix.as_str()).unwrap_or(physical)
    }
}

/// How retryable failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before the record is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Backoff after the first failure; doubles each time.
    pub first_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }
}

/// What to do with a processed record.
#[derive(Debug)]
pub enum Disposition {
    /// The component handled it, now or before: publish `records`, then
    /// clear the outbox entry of `source` (if any), then store the offset.
    Publish {
        records: Vec<Outbound>,
        /// The event whose outbox entry `records` are.
        source: Option<String>,
        /// The event had been handled before and was dropped.
        duplicate: bool,
        /// Publish only once this resolves.
        durable: crate::state::Durable,
    },
    /// It can never be handled: publish it to the dead-letter topic, then
    /// store the offset.
    DeadLetter { record: Outbound, reason: String },
}

/// One component's processing pipeline: a handle on its executor thread.
pub struct Pipeline {
    core: Arc<Core>,
    jobs: std::sync::mpsc::Sender<executor::Job>,
}

/// What the executor needs to handle a record.
struct Core {
    service: Arc<ServiceRuntime>,
    topics: Topics,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    /// Largest record value handled; a larger one is dead-lettered as such.
    max_record_bytes: std::sync::atomic::AtomicUsize,
    /// Where failed attempts are counted, once set.
    metrics: std::sync::OnceLock<crate::status::Faults>,
    /// What outputs are written as, once set (default CloudEvents).
    wire_format: std::sync::OnceLock<crate::manifest::WireFormat>,
}

impl Pipeline {
    /// A pipeline feeding `service`, with its executor thread.
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn new(service: Arc<ServiceRuntime>, topics: Topics, retry: RetryPolicy, clock: Arc<dyn Clock>) -> Self {
        let max_record_bytes = std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_RECORD_BYTES);
        let metrics = std::sync::OnceLock::new();
        let wire_format = std::sync::OnceLock::new();
        let core = Arc::new(Core { service, topics, retry, clock, max_record_bytes, metrics, wire_format });
        let jobs = executor::start(core.clone());
        Self { core, jobs }
    }

    /// Records whose value is larger than `bytes` are not handled but
    /// dead-lettered as too large (a copy cut to [`MAX_DEAD_LETTER_VALUE`]).
    pub fn set_max_record_bytes(&self, bytes: usize) {
        self.core.max_record_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts failed attempts (errors, traps, rollbacks) in `metrics`; the
    /// first call wins.
    pub fn set_metrics(&self, metrics: crate::status::Faults) {
        let _ = self.core.metrics.set(metrics);
    }

    /// Writes outputs in `format` (`kafka.wire_format`); the first call wins.
    pub fn set_wire_format(&self, format: crate::manifest::WireFormat) {
        let _ = self.core.wire_format.set(format);
    }

    /// The physical dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.core.topics.physical(&self.core.topics.dead_letter)
    }

    /// The service behind this pipeline.
    pub fn service(&self) -> &Arc<ServiceRuntime> {
        &self.core.service
    }

    /// Queues one record behind those submitted before it and returns its
    /// outcome. `None` means shutdown interrupted a retry: the record was
    /// not handled and neither its offset nor any later one may be stored.
    pub fn submit(
        &self,
        record: Inbound,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Option<Disposition>> + Send + 'static {
        self.send(executor::Input::Record(record), shutdown)
    }

    /// Queues a due timer, delivered to the component like a record of the
    /// `timer` topic. A dead-lettered timer must then be kept by the caller.
    pub fn submit_timer(
        &self,
        timer: Timer,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Option<Disposition>> + Send + 'static {
        self.send(executor::Input::Timer(timer), shutdown)
    }

    fn send(
        &self,
        input: executor::Input,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Option<Disposition>> + Send + 'static {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let job = executor::Job { input, shutdown: shutdown.clone(), reply };
        // The executor lives as long as this pipeline's sender: a failed
        // send is an executor that died (a bug), which reads as "not handled".
        let sent = self.jobs.send(job).is_ok();
        async move { if sent { outcome.await.ok().flatten() } else { None } }
    }

    /// Handles one record and settles it in its `turn` ([`settle`]): the
    /// one call a consumer makes per record, which then only acknowledges
    /// it. `Ok(None)`: shutdown left it unhandled, so neither its offset nor
    /// any later one may be stored.
    ///
    /// # Errors
    /// As [`settle`]: its effects are not done, and it must come again.
    pub fn deliver(
        &self,
        record: Inbound,
        publisher: Arc<dyn Publisher>,
        turn: Turn,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<Option<Settled>>> + Send + 'static {
        let handled = self.submit(record, shutdown);
        let (service, dead_letters) = (self.core.service.clone(), self.dead_letter_topic());
        async move {
            match handled.await {
                Some(disposition) => settle(&service, &*publisher, disposition, turn, &dead_letters).await.map(Some),
                None => Ok(None),
            }
        }
    }

    /// Processes one record: [`Pipeline::submit`], awaited.
    pub async fn process(&self, record: &Inbound, shutdown: &CancellationToken) -> Option<Disposition> {
        self.submit(record.clone(), shutdown).await
    }

    /// Delivers a due timer: [`Pipeline::submit_timer`], awaited.
    pub async fn process_timer(&self, timer: &Timer, shutdown: &CancellationToken) -> Option<Disposition> {
        self.submit_timer(timer.clone(), shutdown).await
    }
}

#[cfg(test)]
mod tests;
