//! The publisher: an idempotent producer with acks=all, so an
//! acknowledgement means every in-sync replica has the record, in order.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::bus::{Acked, Outbound, PublishError, Publisher};

/// Publishes to Kafka.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl KafkaPublisher {
    /// Connects an idempotent producer to `brokers`.
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn connect(brokers: &str) -> anyhow::Result<Self> {
        let producer = super::producer_config(brokers).create().context("failed to create the Kafka producer")?;
        Ok(Self { producer })
    }

    /// Waits up to `timeout` for every enqueued record to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        if let Err(err) = self.producer.flush(timeout) {
            tracing::warn!("producer flush: {err}");
        }
    }
}

fn failed(topic: &str, err: &KafkaError) -> PublishError {
    PublishError { topic: topic.to_owned(), message: err.to_string(), permanent: is_permanent(err) }
}

/// Whether the broker will never take the record, however often it is
/// sent: the topic does not exist (topics are not auto-created), the record
/// is too large or invalid, or the producer is not authorised.
fn is_permanent(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        Code::UnknownTopic
            | Code::UnknownTopicOrPartition
            | Code::InvalidTopic
            | Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidMessage
            | Code::InvalidRecord
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
    )
}

impl Publisher for KafkaPublisher {
    fn enqueue(
        &self,
        records: Vec<Outbound>,
    ) -> Pin<Box<dyn Future<Output = Result<Acked, PublishError>> + Send + '_>> {
        Box::pin(async move {
            let mut deliveries = Vec::with_capacity(records.len());
            for record in &records {
                let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
                for (key, value) in &record.headers {
                    headers = headers.insert(Header { key, value: Some(value) });
                }
                let mut pending =
                    FutureRecord::to(&record.topic).key(&record.key).payload(&record.value).headers(headers);
                let delivery = loop {
                    match self.producer.send_result(pending) {
                        Ok(delivery) => break delivery,
                        // Backpressure: wait for librdkafka's queue to drain.
                        // Later calls wait behind this one, so order holds.
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            pending = back;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err((err, _)) => return Err(failed(&record.topic, &err)),
                    }
                };
                deliveries.push((record.topic.clone(), delivery));
            }
            let acked = async move {
                try_join_all(deliveries.into_iter().map(|(topic, delivery)| async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((err, _))) => Err(failed(&topic, &err)),
                        Err(_) => Err(PublishError {
                            topic,
                            message: "producer closed before acknowledging".into(),
                            permanent: false,
                        }),
                    }
                }))
                .await
                .map(|_| ())
            };
            Ok(Box::pin(acked) as Acked)
        })
    }
}
