//! Reading the dead-letter topic to its end: a plain Kafka consumer without
//! a group (partitions assigned, read up to their high watermark, nothing
//! committed), and an in-memory twin over [`MemoryBus`] for tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;
use rdkafka::{Offset, TopicPartitionList};

use super::RawRecord;
use crate::bus::MemoryBus;

/// Longest a read of the whole topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The dead-letter topic, read whole.
pub trait DeadLetterLog: Send + Sync + 'static {
    /// The physical topic name.
    fn topic(&self) -> &str;

    /// Every record of the topic, from the beginning to what was there when
    /// the read started. Blocks.
    ///
    /// # Errors
    /// The topic could not be read to its end.
    fn read(&self) -> anyhow::Result<Vec<RawRecord>>;
}

/// The dead-letter topic on a Kafka cluster.
#[derive(Debug, Clone)]
pub struct KafkaLog {
    brokers: String,
    topic: String,
}

impl KafkaLog {
    /// Reads physical `topic` on `brokers`.
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self { brokers: brokers.to_owned(), topic: topic.to_owned() }
    }
}

impl DeadLetterLog for KafkaLog {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn read(&self) -> anyhow::Result<Vec<RawRecord>> {
        let topic = self.topic.as_str();
        let deadline = Instant::now() + READ_TIMEOUT;
        // Partitions assigned, not subscribed: no member joins (or
        // rebalances) any group, and nothing is committed. librdkafka
        // wants a group id to assign at all, so it gets a throwaway one.
        let consumer: BaseConsumer = crate::kafka::client_config(&self.brokers)
            .set("client.id", "shop-host-dlq")
            .set("group.id", format!("shop-dlq-reader-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .context("failed to create a Kafka consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), READ_TIMEOUT)
            .with_context(|| format!("cannot read the metadata of {topic:?} on {:?}", self.brokers))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        anyhow::ensure!(!partitions.is_empty(), "the dead-letter topic {topic:?} does not exist on {:?}", self.brokers);
        // Where each partition ends now: the read stops there.
        let mut ends = std::collections::BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, READ_TIMEOUT)
                .with_context(|| format!("cannot read the offsets of {topic:?} partition {partition}"))?;
            if high > low {
                ends.insert(partition, high);
                assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
            }
        }
        let mut records = Vec::new();
        if ends.is_empty() {
            return Ok(records);
        }
        consumer.assign(&assignment).context("cannot assign the dead-letter partitions")?;
        while !ends.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "could not read {topic:?} to its end within {READ_TIMEOUT:?} (partitions left: {:?})",
                ends.keys().collect::<Vec<_>>()
            );
            let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = message.with_context(|| format!("reading {topic:?}"))?;
            let (partition, offset) = (message.partition(), message.offset());
            // A partition read to its end: what was appended since is not ours.
            let Some(end) = ends.get(&partition).copied() else { continue };
            if offset < end {
                let headers = message
                    .headers()
                    .map(|hs| hs.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default();
                records.push(RawRecord {
                    partition,
                    offset,
                    timestamp_ms: message.timestamp().to_millis(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            if offset + 1 >= end {
                ends.remove(&partition);
            }
        }
        Ok(records)
    }
}

/// The dead-letter topic of a [`MemoryBus`]: one partition, offsets by
/// position, no timestamps.
#[derive(Debug, Clone)]
pub struct MemoryLog {
    bus: Arc<MemoryBus>,
    topic: String,
}

impl MemoryLog {
    /// Reads `topic` of `bus`.
    pub fn new(bus: Arc<MemoryBus>, topic: &str) -> Self {
        Self { bus, topic: topic.to_owned() }
    }
}

impl DeadLetterLog for MemoryLog {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn read(&self) -> anyhow::Result<Vec<RawRecord>> {
        let records = self.bus.records(&self.topic).into_iter().enumerate().map(|(offset, record)| RawRecord {
            partition: 0,
            offset: offset as i64,
            timestamp_ms: None,
            key: Some(record.key.into_bytes()),
            value: Some(record.value),
            headers: record.headers,
        });
        Ok(records.collect())
    }
}
