//! The messaging port: records in and out, and the publisher that the Kafka
//! adapter and its in-memory twin implement.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};

/// A record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Physical topic name.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Physical topic name.
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl From<crate::state::OutboxRecord> for Outbound {
    fn from(record: crate::state::OutboxRecord) -> Self {
        Self {
            topic: record.topic,
            key: record.key,
            value: record.value.into_bytes(),
            headers: record.headers.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
        }
    }
}

/// Publishing failed; nothing may be assumed delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("publishing to {topic:?} failed: {message}")]
pub struct PublishError {
    pub topic: String,
    pub message: String,
}

/// Resolves once every record of one `enqueue` call is acknowledged.
pub type Acked = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// The outbound side of the bus.
pub trait Publisher: Send + Sync + 'static {
    /// Enqueues `records` in order, before any later call's records, and
    /// returns the future of their acknowledgement.
    ///
    /// # Errors
    /// [`PublishError`] if a record cannot even be enqueued.
    fn enqueue(&self, records: Vec<Outbound>)
    -> Pin<Box<dyn Future<Output = Result<Acked, PublishError>> + Send + '_>>;
}

/// In-memory bus for tests: every topic is one ordered log.
#[derive(Debug, Default)]
pub struct MemoryBus {
    topics: Mutex<BTreeMap<String, Vec<Outbound>>>,
}

impl MemoryBus {
    /// The records published to `topic` so far.
    pub fn records(&self, topic: &str) -> Vec<Outbound> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner).get(topic).cloned().unwrap_or_default()
    }

    /// Publishes one record directly (as an external producer would).
    pub fn push(&self, record: Outbound) {
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(record.topic.clone())
            .or_default()
            .push(record);
    }
}

impl Publisher for MemoryBus {
    fn enqueue(
        &self,
        records: Vec<Outbound>,
    ) -> Pin<Box<dyn Future<Output = Result<Acked, PublishError>> + Send + '_>> {
        for record in records {
            self.push(record);
        }
        Box::pin(async { Ok(Box::pin(async { Ok(()) }) as Acked) })
    }
}
