//! Watches the orders topic for final events (`OrderConfirmed`,
//! `OrderRejected`, `OrderCancelled`) and notes when each order's first one
//! arrived. This times the system without the polling clients' view of it:
//! the event is what every other consumer reacts to.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use shop_host::envelope::Envelope;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Event types that end an order (see `shop_events::types`).
pub const FINAL_EVENT_TYPES: [&str; 3] = ["OrderConfirmed", "OrderRejected", "OrderCancelled"];

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The event `message` carries, read as the host reads it.
pub fn event_of<M: Message>(message: &M) -> Option<Envelope> {
    use rdkafka::message::Headers as _;
    let headers: Vec<(String, Vec<u8>)> = message.headers().map_or_else(Vec::new, |headers| {
        headers.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect()
    });
    Envelope::decode(&headers, message.key(), message.payload()).ok()
}

#[derive(Default)]
struct Seen {
    first: HashMap<String, Instant>,
    duplicates: u64,
}

/// A background reader of one topic, from its end at start.
pub struct TopicReader {
    // A std mutex: it is held for a map lookup or insert, never across an await.
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl TopicReader {
    /// Assigns every partition of `topic` at its current end (so only
    /// events produced from now on are read) and starts reading.
    ///
    /// # Errors
    /// When the broker cannot be reached or the topic does not exist.
    pub async fn start(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        // Metadata and watermark calls block: keep them off the async workers.
        let consumer = tokio::task::spawn_blocking(move || assign_at_end(&brokers, &topic))
            .await
            .context("the topic setup task failed")??;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(read(consumer, Arc::clone(&seen)));
        Ok(Self { seen, task })
    }

    /// When the first final event of `order_id` arrived.
    pub fn arrival(&self, order_id: &str) -> Option<Instant> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).first.get(order_id).copied()
    }

    /// Final events seen again for an order that already had one.
    pub fn duplicates(&self) -> u64 {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).duplicates
    }

    /// Waits until every one of `order_ids` has had its final event, or
    /// `grace` has passed.
    pub async fn wait_for(&self, order_ids: &[&str], grace: Duration) {
        let give_up = Instant::now() + grace;
        loop {
            let missing = {
                let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                order_ids.iter().any(|id| !seen.first.contains_key(*id))
            };
            if !missing || Instant::now() >= give_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TopicReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn assign_at_end(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    // A fresh group that never commits: the reader leaves no trace a later
    // run could resume from.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "shop-bench")
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("failed to create the Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("failed to read the metadata of topic {topic:?} from {brokers:?}"))?;
    let partitions: Vec<i32> =
        metadata.topics().iter().filter(|t| t.error().is_none()).flat_map(|t| t.partitions()).map(|p| p.id()).collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic:?} does not exist on {brokers:?}: is the host running?");
    // Explicit end offsets rather than `auto.offset.reset=latest`: "latest"
    // is resolved whenever the fetcher starts, and events produced before
    // that would be missed.
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let high = end_offset(&consumer, topic, partition)?;
        assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
    }
    consumer.assign(&assignment).with_context(|| format!("failed to assign the partitions of {topic:?}"))?;
    Ok(consumer)
}

/// The end offset of `topic`/`partition`. A topic the host has just created
/// may not have elected its leaders yet (`NotLeaderForPartition`): asked
/// again until [`METADATA_TIMEOUT`] passed.
fn end_offset(consumer: &StreamConsumer, topic: &str, partition: i32) -> anyhow::Result<i64> {
    let give_up = Instant::now() + METADATA_TIMEOUT;
    loop {
        match consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT) {
            Ok((_, high)) => return Ok(high),
            Err(err) if Instant::now() < give_up && is_leader_election(&err) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(err) => {
                return Err(err).with_context(|| format!("failed to read the end offset of {topic:?}/{partition}"));
            }
        }
    }
}

fn is_leader_election(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{LeaderNotAvailable, NotLeaderForPartition};
    matches!(err.rdkafka_error_code(), Some(NotLeaderForPartition | LeaderNotAvailable))
}

async fn read(consumer: StreamConsumer, seen: Arc<Mutex<Seen>>) {
    loop {
        match consumer.recv().await {
            Ok(message) => {
                let at = Instant::now();
                let Some(envelope) = event_of(&message) else { continue };
                if FINAL_EVENT_TYPES.contains(&envelope.event_type.as_str()) {
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    match seen.first.entry(envelope.order_id) {
                        Entry::Occupied(_) => seen.duplicates += 1,
                        Entry::Vacant(entry) => {
                            entry.insert(at);
                        }
                    }
                }
            }
            Err(err) => {
                eprintln!("bench: topic reader: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
