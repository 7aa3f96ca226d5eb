//! One consumer group per component, at-least-once: a record's offset is
//! stored only after the component handled it *and* everything it emitted
//! was acknowledged. Records are submitted to the service's pipeline in
//! arrival order and handled on its executor thread, one key's records in
//! order, while this loop keeps reading; each record then settles on its own
//! (durable commit, publish after the previous record of its key, ack), and
//! a partition's stored offset is the lowest one not yet done.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::statistics::Statistics;
use tokio_util::sync::CancellationToken;

use super::handoff::{self, CutOff};
use crate::bus::{Inbound, Publisher};
use crate::deadlines::Watermark;
use crate::pipeline::{Pipeline, Settled, Turn};
use crate::status::{BrokerLink, ConsumerStatus};
use tokio::sync::oneshot;

/// Records handled but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 512;
/// First and longest wait before a failed consumer is started again.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(16);

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
    /// On shutdown, how long the records in flight may take to settle.
    pub drain_timeout: Duration,
    /// Where the consumer reports whether the broker answers.
    pub link: BrokerLink,
    /// Where it reports how far it has caught up.
    pub watermark: Watermark,
    /// How long the state store may go unanswered before the consumer
    /// leaves its group for the hosts that reach it (see [`handoff`]);
    /// `None` for a store no other host shares.
    pub handoff_after: Option<Duration>,
}

fn tp(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The group's lag on one partition, -1 while unknown. librdkafka says -1
/// as long as the group has committed nothing there, which on a partition
/// that never received a record is forever; with `auto.offset.reset =
/// earliest` the group then owes every record the log still holds (0 on an
/// empty partition), once a fetch has told the log's bounds.
fn lag(partition: &rdkafka::statistics::Partition) -> i64 {
    let (committed, lo, hi) = (partition.committed_offset, partition.lo_offset, partition.hi_offset);
    if partition.consumer_lag >= 0 || committed >= 0 || lo < 0 || hi < lo { partition.consumer_lag } else { hi - lo }
}

struct Context {
    status: ConsumerStatus,
    link: BrokerLink,
    watermark: Watermark,
}

impl ClientContext for Context {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!("Kafka consumer: {error}: {reason}");
        self.link.observe_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.link.observe_stats(&statistics);
        let now = crate::clock::unix_ms(std::time::SystemTime::now());
        self.watermark.observe_stats(now, &statistics, self.link.down().is_none());
        let lag: BTreeMap<String, i64> = statistics
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions.iter().filter(|(p, _)| **p >= 0).map(move |(p, s)| (tp(topic, *p), lag(s)))
            })
            .collect();
        self.status.update(|s| s.lag = lag);
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // From the callback's own argument: asking the consumer for its
        // assignment here blocks forever when the rebalance is the one that
        // closing the consumer (shutdown) triggers. With the eager protocol
        // (the default), an assignment is the whole new set and a
        // revocation takes everything.
        let assigned: Vec<String> = match rebalance {
            Rebalance::Assign(list) => list.elements().iter().map(|e| tp(e.topic(), e.partition())).collect(),
            Rebalance::Revoke(_) => Vec::new(),
            Rebalance::Error(err) => {
                tracing::warn!("rebalance error: {err}");
                return;
            }
        };
        tracing::info!(
            ?assigned,
            "rebalance: {}",
            if matches!(rebalance, Rebalance::Assign(_)) { "assigned" } else { "revoked" }
        );
        self.status.update(|s| s.assigned_partitions = assigned);
    }
}

/// Records in flight left unsettled at shutdown.
#[derive(Debug, thiserror::Error)]
#[error("{0} records in flight abandoned at shutdown")]
pub struct Abandoned(pub usize);

/// Runs a component's consumer until `shutdown`, restarting it after a
/// failure so that one failing service never stops the others.
///
/// # Errors
/// [`Abandoned`]: shutdown left records in flight unsettled (they will be
/// delivered again).
pub async fn run_supervised(
    pipeline: Arc<Pipeline>,
    publisher: Arc<dyn Publisher>,
    settings: ConsumerSettings,
    status: ConsumerStatus,
    shutdown: CancellationToken,
) -> Result<(), Abandoned> {
    let name = pipeline.service().name().to_owned();
    let mut outcome = Ok(());
    let mut backoff = RESTART_BACKOFF_MIN;
    let mut cut_off =
        settings.handoff_after.map(|after| handoff::watch_store(pipeline.service().clone(), after, shutdown.clone()));
    loop {
        let started = tokio::time::Instant::now();
        match run(&pipeline, &publisher, &settings, &status, &shutdown, cut_off.as_mut()).await {
            Ok(()) => break,
            Err(err) if err.is::<Abandoned>() => {
                outcome = Err(err.downcast::<Abandoned>().unwrap_or(Abandoned(0)));
                break;
            }
            Err(err) => {
                // A failure after a good run starts the backoff over; one
                // that keeps coming (e.g. the broker stays away) waits longer
                // each time. What was in flight is delivered again, in order.
                if started.elapsed() > RESTART_BACKOFF_MAX * 2 {
                    backoff = RESTART_BACKOFF_MIN;
                }
                let message = format!("{err:#}");
                tracing::error!(component = %name, "consumer failed, restarting in {backoff:?}: {message}");
                status.update(|s| {
                    s.consuming = false;
                    s.last_error = Some(message);
                });
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
    }
    status.update(|s| s.consuming = false);
    tracing::info!(component = %name, "consumer stopped");
    outcome
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

/// Why a spell of consuming ended without an error.
enum Served {
    /// Shutdown, after what was in flight settled.
    Stopped,
    /// The state store stopped answering: the partitions are to be handed off.
    CutOff,
}

async fn run(
    pipeline: &Pipeline,
    publisher: &Arc<dyn Publisher>,
    settings: &ConsumerSettings,
    status: &ConsumerStatus,
    shutdown: &CancellationToken,
    mut cut_off: Option<&mut CutOff>,
) -> anyhow::Result<()> {
    let mut config = super::consumer_config(&settings.brokers, &settings.group);
    if let Some(instance) = &settings.instance_id {
        config.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer<Context> = config
        .set("statistics.interval.ms", "1000")
        .create_with_context(Context {
            status: status.clone(),
            link: settings.link.clone(),
            watermark: settings.watermark.clone(),
        })
        .context("failed to create the Kafka consumer")?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    let result = loop {
        if let Err(err) = consumer.subscribe(&topics).with_context(|| format!("failed to subscribe to {topics:?}")) {
            break Err(err);
        }
        status.update(|s| {
            s.consuming = true;
            s.last_error = None;
        });
        // Cancelled when the partitions are handed off: the executor then
        // gives up retrying this spell's records (their new owner has them).
        let spell = shutdown.child_token();
        let served = serve(&consumer, pipeline, publisher, settings, status, &spell, cut_off.as_deref_mut()).await;
        match served {
            Ok(Served::CutOff) => {
                spell.cancel();
                if !hand_off(&consumer, settings, status, shutdown, cut_off.as_deref_mut()).await {
                    break Ok(());
                }
            }
            Ok(Served::Stopped) => break Ok(()),
            Err(err) => break Err(err),
        }
    };
    close(consumer, settings).await;
    result
}

/// Consumes until shutdown (`spell` is cancelled with it), an error, or
/// the store is found cut off. On a clean stop, finishes what is in flight:
/// its effects happened, so its offsets are stored. After a failure or a
/// cut-off, stores nothing more: later records must not be marked done
/// ahead of one that did not settle, which is delivered again (and dropped
/// by id if it was handled).
async fn serve(
    consumer: &StreamConsumer<Context>,
    pipeline: &Pipeline,
    publisher: &Arc<dyn Publisher>,
    settings: &ConsumerSettings,
    status: &ConsumerStatus,
    spell: &CancellationToken,
    mut cut_off: Option<&mut CutOff>,
) -> anyhow::Result<Served> {
    // Each record goes to the pipeline at once (its executor keeps one key's
    // records in order) and then settles on its own: its commit must be on
    // disk before its outputs are published (after those of the previous
    // record of its key), and they must be acknowledged before its offset
    // counts as done. A partition's stored offset is the lowest not yet done.
    let mut pending: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    let mut progress = Progress::default();
    let mut chains = PublishChains::default();
    loop {
        tokio::select! {
            biased;
            () = spell.cancelled() => break,
            () = handoff::until(cut_off.as_deref_mut(), true) => return Ok(Served::CutOff),
            Some(settled) = pending.next(), if !pending.is_empty() => done(consumer, status, &mut progress, settled)?,
            received = consumer.recv(), if pending.len() < MAX_IN_FLIGHT => {
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
                progress.start(&record.topic, record.partition, record.offset);
                let turn = chains.next(record.key.as_deref().unwrap_or_default());
                pending.push(Box::pin(handle(pipeline, publisher.clone(), record, spell, turn)));
            }
        }
    }
    drain(consumer, settings, status, &mut progress, pending).await?;
    Ok(Served::Stopped)
}

/// Gives the records in flight the drain timeout to settle, storing their
/// offsets as they do.
///
/// # Errors
/// [`Abandoned`]: some did not settle in time (their offsets are not
/// stored, so they are delivered again, and dropped by id if handled).
async fn drain(
    consumer: &StreamConsumer<Context>,
    settings: &ConsumerSettings,
    status: &ConsumerStatus,
    progress: &mut Progress,
    mut pending: FuturesUnordered<BoxFuture<'static, Outcome>>,
) -> anyhow::Result<()> {
    let drained = tokio::time::timeout(settings.drain_timeout, async {
        while let Some(settled) = pending.next().await {
            done(consumer, status, progress, settled)?;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => {
            tracing::error!(group = %settings.group, "while draining: {err:#}");
            Ok(())
        }
        Err(_) => {
            tracing::error!(
                group = %settings.group,
                abandoned = pending.len(),
                "records in flight not settled within the drain timeout ({:?}): abandoned, to be delivered again",
                settings.drain_timeout
            );
            Err(Abandoned(pending.len()).into())
        }
    }
}

/// Leaves the group, so that its other members (hosts that reach the
/// store) take the partitions over from the last committed offsets, and
/// waits for the store to answer again. `false`: shutdown came first.
///
/// Unsubscribing, not closing: a static member that closes keeps its
/// partitions until its session expires, whereas one that unsubscribes
/// sends the broker a LeaveGroup at once. The consumer is kept and polled
/// meanwhile (the revocation and the leave are served by its poll).
async fn hand_off(
    consumer: &StreamConsumer<Context>,
    settings: &ConsumerSettings,
    status: &ConsumerStatus,
    shutdown: &CancellationToken,
    mut cut_off: Option<&mut CutOff>,
) -> bool {
    // The offsets of what settled before go along.
    if let Err(err) = consumer.commit_consumer_state(CommitMode::Async)
        && !matches!(err, rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset))
    {
        tracing::warn!(group = %settings.group, "commit before the hand-off failed: {err}");
    }
    consumer.unsubscribe();
    status.update(|s| {
        s.consuming = false;
        s.handed_off = true;
        s.handoffs += 1;
    });
    tracing::warn!(group = %settings.group, "left the consumer group: the state store does not answer");
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return false,
            () = handoff::until(cut_off.as_deref_mut(), false) => break,
            // Nothing is assigned; a record fetched before the leave is its
            // new owner's to handle.
            _ = consumer.recv() => {}
        }
    }
    status.update(|s| {
        s.handed_off = false;
        s.rejoins += 1;
    });
    tracing::info!(group = %settings.group, "rejoining the consumer group: the state store answers again");
    true
}

/// Commits the stored offsets and closes the consumer (leaving the group,
/// its rebalance callbacks), both of which block: off the async workers.
async fn close(consumer: StreamConsumer<Context>, settings: &ConsumerSettings) {
    let group = settings.group.clone();
    let closed = tokio::task::spawn_blocking(move || {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            // Nothing was stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => tracing::warn!(%group, "final commit failed: {err}"),
        }
        drop(consumer);
    });
    if let Err(err) = closed.await {
        tracing::error!(group = %settings.group, "closing the consumer failed: {err}");
    }
}

/// What became of a record: where it was and how it settled (`None`: left
/// unhandled by shutdown); an error stops the loop and the record comes back.
type Outcome = (String, i32, i64, anyhow::Result<Option<Settled>>);

/// Hands one record to the pipeline, which handles and settles it in its
/// turn; what comes back says where it was and how it settled.
fn handle(
    pipeline: &Pipeline,
    publisher: Arc<dyn Publisher>,
    record: Inbound,
    shutdown: &CancellationToken,
    turn: Turn,
) -> impl Future<Output = Outcome> + Send + 'static {
    let (topic, partition, offset) = (record.topic.clone(), record.partition, record.offset);
    let delivered = pipeline.deliver(record, publisher, turn, shutdown);
    async move { (topic, partition, offset, delivered.await) }
}

/// Per key, the signal that the last record submitted has enqueued its
/// outputs: the next record of that key publishes only after it, so one
/// key's outputs keep their order.
#[derive(Default)]
struct PublishChains {
    last: HashMap<Vec<u8>, oneshot::Receiver<()>>,
}

impl PublishChains {
    /// The turn of the next record of `key`.
    fn next(&mut self, key: &[u8]) -> Turn {
        if self.last.len() >= MAX_IN_FLIGHT * 4 {
            // Forget keys whose last record already enqueued.
            self.last.retain(|_, signal| matches!(signal.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        let (enqueued, signal) = oneshot::channel();
        Turn { previous: self.last.insert(key.to_vec(), signal), enqueued: Some(enqueued) }
    }
}

/// Offsets in flight per partition. Everything below the lowest offset in
/// flight is done, so that is what may be stored.
#[derive(Default)]
struct Progress {
    partitions: HashMap<(String, i32), PartitionProgress>,
}

#[derive(Default)]
struct PartitionProgress {
    in_flight: BTreeSet<i64>,
    highest: i64,
}

impl Progress {
    fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.partitions.entry((topic.to_owned(), partition)).or_default();
        p.in_flight.insert(offset);
        p.highest = p.highest.max(offset);
    }

    /// Marks `offset` done; the last offset of an unbroken run of done
    /// records from the start, if this moved it.
    fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        let was_lowest = p.in_flight.first() == Some(&offset);
        p.in_flight.remove(&offset);
        if !was_lowest {
            return None;
        }
        Some(p.in_flight.first().map_or(p.highest, |lowest| lowest - 1))
    }
}

/// Counts a settled record and stores its partition's offset if it moved.
fn done(
    consumer: &StreamConsumer<Context>,
    status: &ConsumerStatus,
    progress: &mut Progress,
    (topic, partition, offset, settled): Outcome,
) -> anyhow::Result<()> {
    let Some(settled) = settled? else { return Ok(()) };
    if let Some(done) = progress.finish(&topic, partition, offset) {
        // Fails for a partition revoked meanwhile: its new owner starts from
        // the last committed offset and drops what was handled here by id.
        match consumer.store_offset(&topic, partition, done) {
            Ok(()) => status.update(|s| {
                s.last_processed_offsets.insert(tp(&topic, partition), done);
            }),
            Err(err) => tracing::warn!(%topic, partition, offset = done, "offset not stored: {err}"),
        }
    }
    status.update(|s| match settled {
        Settled::DeadLettered => s.dead_lettered += 1,
        Settled::Duplicate => s.duplicates_dropped += 1,
        Settled::Handled => s.handled += 1,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_is_the_last_before_the_lowest_in_flight() {
        let mut progress = Progress::default();
        for offset in [10, 11, 12, 13] {
            progress.start("t", 0, offset);
        }
        progress.start("t", 1, 5);
        assert_eq!(progress.finish("t", 0, 12), None, "11 and 10 are not done");
        assert_eq!(progress.finish("t", 0, 10), Some(10));
        assert_eq!(progress.finish("t", 1, 5), Some(5), "partitions are independent");
        assert_eq!(progress.finish("t", 0, 11), Some(12), "12 was done already");
        assert_eq!(progress.finish("t", 0, 13), Some(13));
        assert_eq!(progress.finish("t", 0, 99), None, "unknown offsets change nothing");
    }

    #[test]
    fn a_partition_without_a_commit_owes_what_its_log_holds() {
        let partition = |consumer_lag, committed_offset, lo_offset, hi_offset| rdkafka::statistics::Partition {
            consumer_lag,
            committed_offset,
            lo_offset,
            hi_offset,
            ..Default::default()
        };
        assert_eq!(lag(&partition(3, 7, 0, 10)), 3, "librdkafka's figure when it has one");
        assert_eq!(lag(&partition(-1, -1001, 0, 0)), 0, "an empty partition is caught up");
        assert_eq!(lag(&partition(-1, -1001, 4, 9)), 5, "nothing committed: the whole log is owed");
        assert_eq!(lag(&partition(-1, -1001, -1001, -1001)), -1, "bounds not fetched yet");
        assert_eq!(lag(&partition(-1, 12, 0, 10)), -1, "a commit past the end stays unknown");
    }

    #[tokio::test]
    async fn one_keys_outputs_are_enqueued_in_order() {
        let mut chains = PublishChains::default();
        let first = chains.next(b"k");
        assert!(first.previous.is_none());
        let second = chains.next(b"k");
        assert!(chains.next(b"other").previous.is_none(), "another key waits for nobody");
        let mut second_wait = second.previous.unwrap();
        assert!(matches!(second_wait.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        drop(first.enqueued);
        assert!(second_wait.await.is_err(), "released once the first enqueued");
    }
}
