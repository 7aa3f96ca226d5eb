//! One consumer group per component, at-least-once: a record's offset is
//! stored only after the component handled it *and* everything it emitted
//! was acknowledged. Records are submitted to the service's pipeline in
//! arrival order (which keeps per-partition order) and handled on its
//! executor thread while this loop keeps reading; publishing is pipelined,
//! and offsets are stored strictly in arrival order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::statistics::Statistics;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bus::{Inbound, Outbound, Publisher};
use crate::pipeline::{Disposition, Pipeline};
use crate::stages::Stage;
use crate::state::{Durable, StoreError};

/// Records handled but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 512;

/// Where and how a component consumes.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub brokers: String,
    /// Physical consumer group.
    pub group: String,
    /// Physical topics.
    pub topics: Vec<String>,
    /// `group.instance.id` for static membership, if any.
    pub instance_id: Option<String>,
}

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
}

/// Shared, live status of one consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerStatus(Arc<Mutex<StatusSnapshot>>);

impl ConsumerStatus {
    fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn tp(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

struct Context {
    status: ConsumerStatus,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let lag: BTreeMap<String, i64> = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions.iter().filter(|(p, _)| **p >= 0).map(move |(p, s)| (tp(topic, *p), s.consumer_lag))
            })
            .collect();
        self.status.update(|s| s.lag = lag);
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let assigned = match consumer.assignment() {
            Ok(list) => list.elements().iter().map(|e| tp(e.topic(), e.partition())).collect(),
            Err(err) => {
                tracing::warn!("cannot read assignment: {err}");
                Vec::new()
            }
        };
        tracing::info!(
            ?assigned,
            "rebalance: {}",
            match rebalance {
                Rebalance::Assign(_) => "assigned",
                Rebalance::Revoke(_) => "revoked",
                Rebalance::Error(_) => "error",
            }
        );
        self.status.update(|s| s.assigned_partitions = assigned);
    }
}

/// Runs a component's consumer until `shutdown`, restarting it after a
/// failure so that one failing service never stops the others.
pub async fn run_supervised(
    pipeline: Arc<Pipeline>,
    publisher: Arc<dyn Publisher>,
    settings: ConsumerSettings,
    status: ConsumerStatus,
    shutdown: CancellationToken,
) {
    let name = pipeline.service().name().to_owned();
    loop {
        match run(&pipeline, &*publisher, &settings, &status, &shutdown).await {
            Ok(()) => break,
            Err(err) => {
                let message = format!("{err:#}");
                tracing::error!(component = %name, "consumer failed, restarting in 1 s: {message}");
                status.update(|s| {
                    s.consuming = false;
                    s.last_error = Some(message);
                });
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    status.update(|s| s.consuming = false);
    tracing::info!(component = %name, "consumer stopped");
}

fn inbound(message: &rdkafka::message::BorrowedMessage<'_>) -> Inbound {
    let headers = message
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
        .unwrap_or_default();
    Inbound {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

async fn run(
    pipeline: &Pipeline,
    publisher: &dyn Publisher,
    settings: &ConsumerSettings,
    status: &ConsumerStatus,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut config = super::client_config(&settings.brokers);
    if let Some(instance) = &settings.instance_id {
        config.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer<Context> = config
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "1000")
        .create_with_context(Context { status: status.clone() })
        .context("failed to create the Kafka consumer")?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).with_context(|| format!("failed to subscribe to {topics:?}"))?;
    status.update(|s| {
        s.consuming = true;
        s.last_error = None;
    });

    // Two stages, each in arrival order: a record's commit must be on disk
    // before its outputs are published, and they must be acknowledged before
    // its offset is stored.
    let mut committing: FuturesOrdered<BoxFuture<'static, Option<Committed>>> = FuturesOrdered::new();
    let mut in_flight: FuturesOrdered<BoxFuture<'static, Done>> = FuturesOrdered::new();
    // Set when shutdown interrupted a record's retries: it and every later
    // record stay unstored.
    let mut interrupted = false;
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(err) = store(&consumer, pipeline, status, done) {
                    break Err(err);
                }
            }
            Some(committed) = committing.next(), if !committing.is_empty() => {
                let Some(committed) = committed else {
                    interrupted = true;
                    break Ok(());
                };
                if let Err(err) = publish(publisher, pipeline, &mut in_flight, committed).await {
                    break Err(err);
                }
            }
            received = consumer.recv(), if in_flight.len() + committing.len() < MAX_IN_FLIGHT => {
                let message = match received {
                    Ok(message) => message,
                    Err(err) => {
                        // Transport errors and unknown topics are transient:
                        // librdkafka reconnects by itself.
                        tracing::warn!(group = %settings.group, "consume error: {err}");
                        status.update(|s| s.last_error = Some(err.to_string()));
                        continue;
                    }
                };
                let record = inbound(&message);
                drop(message);
                let (topic, partition, offset) = (record.topic.clone(), record.partition, record.offset);
                let handled = pipeline.submit(record, shutdown);
                let service = pipeline.service().clone();
                committing.push_back(Box::pin(async move {
                    let (records, durable, outcome) = match handled.await? {
                        Disposition::Publish { records, source, duplicate, durable } => {
                            (records, durable, Outcome { topic, partition, offset, dead: false, duplicate, source })
                        }
                        Disposition::DeadLetter { record, .. } => {
                            let outcome = Outcome { topic, partition, offset, dead: true, duplicate: false, source: None };
                            (vec![record], Durable::done(), outcome)
                        }
                    };
                    let waiting = std::time::Instant::now();
                    let durable = durable.wait().await;
                    service.stages().record(Stage::DurableWait, waiting.elapsed());
                    Some(durable.map(|()| (records, outcome)))
                }));
            }
        }
    };
    // On a clean stop, finish what is in flight: its effects happened, so
    // store its offsets. After a failure, store nothing more: later records
    // must not be marked done ahead of the one that failed.
    if result.is_ok() {
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            while !interrupted && let Some(committed) = committing.next().await {
                let Some(committed) = committed else { break };
                publish(publisher, pipeline, &mut in_flight, committed).await?;
            }
            while let Some(done) = in_flight.next().await {
                store(&consumer, pipeline, status, done)?;
            }
            anyhow::Ok(())
        })
        .await;
        match drained {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(group = %settings.group, "while draining: {err:#}"),
            Err(_) => {
                tracing::error!(group = %settings.group, "in-flight records not acknowledged within 30 s")
            }
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing was stored since the last commit.
        Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(err) => tracing::warn!(group = %settings.group, "final commit failed: {err}"),
    }
    result
}

/// What became of a record whose outputs are being published.
struct Outcome {
    topic: String,
    partition: i32,
    offset: i64,
    dead: bool,
    duplicate: bool,
    /// The outbox entry to clear once published.
    source: Option<String>,
}

/// A record whose commit is durable (or failed to become so), with its outputs.
type Committed = Result<(Vec<Outbound>, Outcome), StoreError>;
/// A record whose outputs were acknowledged (or not).
type Done = Result<Outcome, crate::bus::PublishError>;

/// Enqueues a durable record's outputs behind those of earlier records.
async fn publish(
    publisher: &dyn Publisher,
    pipeline: &Pipeline,
    in_flight: &mut FuturesOrdered<BoxFuture<'static, Done>>,
    committed: Committed,
) -> anyhow::Result<()> {
    // A commit that did not reach the disk aborts the loop: the record and
    // the later ones are consumed again and handled anew.
    let (records, outcome) = committed.context("state commit not durable")?;
    let publishing = (!records.is_empty()).then(std::time::Instant::now);
    let acked = publisher.enqueue(records).await.context("failed to enqueue output")?;
    let service = pipeline.service().clone();
    in_flight.push_back(Box::pin(async move {
        let acked = acked.await;
        if let Some(started) = publishing {
            service.stages().record(Stage::Publish, started.elapsed());
        }
        acked.map(|()| outcome)
    }));
    Ok(())
}

fn store(
    consumer: &StreamConsumer<Context>,
    pipeline: &Pipeline,
    status: &ConsumerStatus,
    done: Done,
) -> anyhow::Result<()> {
    // A failed publish aborts the loop without storing: the record and all
    // later ones are consumed again from the last committed offset, and the
    // outbox entry stays queued until a redelivery or the relay publishes it.
    let outcome = done.context("output not acknowledged")?;
    let (topic, partition, offset) = (&outcome.topic, outcome.partition, outcome.offset);
    if let Some(source) = &outcome.source {
        pipeline.service().published(source);
    }
    consumer.store_offset(topic, partition, offset).context("failed to store offset")?;
    status.update(|s| {
        s.last_processed_offsets.insert(tp(topic, partition), offset);
        match (outcome.dead, outcome.duplicate) {
            (true, _) => s.dead_lettered += 1,
            (false, true) => s.duplicates_dropped += 1,
            (false, false) => s.handled += 1,
        }
    });
    Ok(())
}
