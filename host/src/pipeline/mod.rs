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
mod settle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Inbound, Outbound};
use crate::clock::Clock;
use crate::envelope::Envelope;
use crate::limits::DEFAULT_MAX_RECORD_BYTES;
use crate::runtime::{Event, OutgoingEvent, ServiceRuntime};
use crate::state::{OutboxRecord, Timer};

pub use settle::{Settled, Turn, settle};

/// Largest record a component may emit: below the broker's default
/// `message.max.bytes` (1 MiB), so that a committed record can always be
/// published.
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// Largest value a dead-letter record carries; a longer one is cut there
/// (its full length in a `dlq-truncated` header), so that the dead-letter
/// topic always takes it.
pub const MAX_DEAD_LETTER_VALUE: usize = 64 * 1024;

/// `value` cut to [`MAX_DEAD_LETTER_VALUE`], and the header saying so if it was.
fn bounded(value: &[u8]) -> (Vec<u8>, Option<(String, Vec<u8>)>) {
    if value.len() <= MAX_DEAD_LETTER_VALUE {
        return (value.to_vec(), None);
    }
    (value[..MAX_DEAD_LETTER_VALUE].to_vec(), Some(("dlq-truncated".to_owned(), value.len().to_string().into_bytes())))
}

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
}

impl Pipeline {
    /// A pipeline feeding `service`, with its executor thread.
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn new(service: Arc<ServiceRuntime>, topics: Topics, retry: RetryPolicy, clock: Arc<dyn Clock>) -> Self {
        let max_record_bytes = std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_RECORD_BYTES);
        let metrics = std::sync::OnceLock::new();
        let core = Arc::new(Core { service, topics, retry, clock, max_record_bytes, metrics });
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

    /// Processes one record: [`Pipeline::submit`], awaited.
    pub async fn process(&self, record: &Inbound, shutdown: &CancellationToken) -> Option<Disposition> {
        self.submit(record.clone(), shutdown).await
    }

    /// Delivers a due timer: [`Pipeline::submit_timer`], awaited.
    pub async fn process_timer(&self, timer: &Timer, shutdown: &CancellationToken) -> Option<Disposition> {
        self.submit_timer(timer.clone(), shutdown).await
    }
}

impl Core {
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.retry.first_backoff.saturating_mul(factor).min(self.retry.max_backoff)
    }

    /// The span of handling one event: every log line within it (the
    /// host's and the guest's) carries the component, the version serving,
    /// the event and its order.
    fn span(&self, envelope: &Envelope) -> tracing::Span {
        tracing::info_span!(
            "event",
            component = %self.service.name(),
            version = %self.service.current().sha256,
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            order_id = %envelope.order_id,
        )
    }

    /// The WIT event for an envelope; envelope metadata goes in the headers.
    fn event(&self, record: &Inbound, envelope: &Envelope) -> Event {
        let mut headers = vec![
            ("correlation-id".to_owned(), envelope.correlation_id.clone()),
            ("schema-version".to_owned(), envelope.schema_version.to_string()),
            ("producer".to_owned(), envelope.producer.clone()),
        ];
        if let Some(cause) = &envelope.causation_id {
            headers.push(("causation-id".to_owned(), cause.clone()));
        }
        headers
            .extend(record.headers.iter().filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.clone()).ok()?))));
        Event {
            id: envelope.id.clone(),
            event_type: envelope.event_type.clone(),
            topic: self.topics.logical(&record.topic).to_owned(),
            key: Some(envelope.order_id.clone()),
            headers,
            payload: envelope.data.get().as_bytes().to_vec(),
            timestamp_ms: envelope.timestamp_ms,
        }
    }

    /// Wraps what the component emitted in envelopes caused by `cause`.
    /// Each carries `trace`, the context of the span handling `cause`.
    fn wrap(
        &self,
        cause: &Envelope,
        outgoing: &[OutgoingEvent],
        producer: &str,
        trace: crate::traces::TraceParent,
    ) -> Result<Vec<OutboxRecord>, String> {
        let now = self.clock.now_ms();
        outgoing
            .iter()
            .enumerate()
            .map(|(index, out)| {
                let not_json = |err: &dyn std::fmt::Display| {
                    format!("component emitted a {} whose payload is not JSON: {err}", out.event_type)
                };
                let text = String::from_utf8(out.payload.clone()).map_err(|e| not_json(&e))?;
                let data = serde_json::value::RawValue::from_string(text).map_err(|e| not_json(&e))?;
                if out.key.is_empty() || out.topic.is_empty() {
                    return Err(format!("component emitted a {} without topic or key", out.event_type));
                }
                let envelope = cause.caused(index, &out.event_type, &out.key, producer, now, data);
                let value = envelope.encode();
                if value.len() > MAX_RECORD_BYTES {
                    return Err(format!(
                        "component emitted a {} of {} bytes, over the {MAX_RECORD_BYTES}-byte record limit",
                        out.event_type,
                        value.len()
                    ));
                }
                Ok(OutboxRecord {
                    topic: self.topics.physical(&out.topic),
                    key: out.key.clone(),
                    value: String::from_utf8_lossy(&value).into_owned(),
                    headers: vec![
                        ("event-type".to_owned(), out.event_type.clone()),
                        ("producer".to_owned(), producer.to_owned()),
                        trace.header(),
                    ],
                })
            })
            .collect()
    }

    fn dead_letter(&self, record: &Inbound, reason: String, attempts: u32) -> Disposition {
        tracing::error!(
            component = self.service.name(),
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            attempts,
            "dead-lettering record: {reason}"
        );
        let mut headers = record.headers.clone();
        headers.extend([
            ("dlq-reason".to_owned(), reason.clone().into_bytes()),
            ("dlq-component".to_owned(), self.service.name().as_bytes().to_vec()),
            ("dlq-version".to_owned(), self.service.current().sha256.clone().into_bytes()),
            ("dlq-source".to_owned(), format!("{}/{}/{}", record.topic, record.partition, record.offset).into_bytes()),
            ("dlq-attempts".to_owned(), attempts.to_string().into_bytes()),
        ]);
        let key = record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let (value, truncated) = bounded(record.value.as_deref().unwrap_or_default());
        headers.extend(truncated);
        Disposition::DeadLetter {
            record: Outbound { topic: self.topics.physical(&self.topics.dead_letter), key, value, headers },
            reason,
        }
    }
}

#[cfg(test)]
mod tests;
