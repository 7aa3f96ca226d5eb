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

/// Publishing failed; nothing may be assumed delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("publishing to {topic:?} failed: {message}")]
pub struct PublishError {
    pub topic: String,
    pub message: String,
    /// The broker will never take the record (unknown topic, record too
    /// large, not authorised): retrying cannot help.
    pub permanent: bool,
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
    /// Topics whose records are refused for good, with the reason.
    refused: Mutex<BTreeMap<String, String>>,
}

impl MemoryBus {
    /// The records published to `topic` so far.
    pub fn records(&self, topic: &str) -> Vec<Outbound> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner).get(topic).cloned().unwrap_or_default()
    }

    /// Refuses every record to `topic` from now on, permanently, as a broker
    /// refuses a topic that does not exist.
    pub fn refuse(&self, topic: &str, message: &str) {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.to_owned(), message.to_owned());
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
        let mut failure = None;
        for record in records {
            let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner).get(&record.topic).cloned();
            match refused {
                Some(message) => {
                    failure.get_or_insert(PublishError { topic: record.topic, message, permanent: true });
                }
                None => self.push(record),
            }
        }
        Box::pin(async move {
            Ok(Box::pin(async move {
                match failure {
                    Some(err) => Err(err),
                    None => Ok(()),
                }
            }) as Acked)
        })
    }
}
