//! The publisher: an idempotent producer with acks=all, so an
//! acknowledgement means every in-sync replica has the record, in order.
//! A producer that hits a fatal error (the idempotence guarantee broken,
//! e.g. a fenced epoch) is replaced by a new one before the next send.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::try_join_all;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use super::BrokerLink;
use crate::bus::{Acked, Outbound, PublishError, Publisher};

/// The producer's librdkafka context: reports the link, and notes a fatal
/// error so that the producer is rebuilt.
struct LinkContext {
    link: BrokerLink,
    fatal: Arc<AtomicBool>,
}

impl ClientContext for LinkContext {
    fn stats(&self, statistics: Statistics) {
        self.link.observe_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!("Kafka producer failed for good, it will be replaced: {reason}");
            self.fatal.store(true, Ordering::SeqCst);
        } else {
            tracing::debug!("Kafka producer: {error}: {reason}");
        }
        self.link.observe_error(&error, reason);
    }
}

/// Publishes to Kafka.
#[derive(Clone)]
pub struct KafkaPublisher {
    config: ClientConfig,
    link: BrokerLink,
    current: Arc<Mutex<FutureProducer<LinkContext>>>,
    fatal: Arc<AtomicBool>,
    rebuilt: Arc<AtomicU64>,
}

impl KafkaPublisher {
    /// Connects an idempotent producer to `brokers`, reporting to `link`.
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn connect(brokers: &str, link: BrokerLink) -> anyhow::Result<Self> {
        Self::with_config(super::producer_config(brokers), link)
    }

    /// Like [`KafkaPublisher::connect`], with records that fail if not
    /// acknowledged within `timeout` (the gateway's: an order that cannot be
    /// confirmed in time is answered `503`, and is then dropped by the
    /// producer instead of being sent much later).
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn connect_with_timeout(brokers: &str, link: BrokerLink, timeout: Duration) -> anyhow::Result<Self> {
        let mut config = super::producer_config(brokers);
        config.set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        Self::with_config(config, link)
    }

    fn with_config(mut config: ClientConfig, link: BrokerLink) -> anyhow::Result<Self> {
        config.set("statistics.interval.ms", "1000");
        let fatal = Arc::new(AtomicBool::new(false));
        let producer = create(&config, &link, &fatal)?;
        Ok(Self { config, link, current: Arc::new(Mutex::new(producer)), fatal, rebuilt: Arc::default() })
    }

    /// The producer to send with: a new one if the last failed for good.
    fn producer(&self) -> Result<FutureProducer<LinkContext>, PublishError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        // The error callback may not have run yet: librdkafka is asked too.
        let failed = current.client().fatal_error();
        if self.fatal.swap(false, Ordering::SeqCst) || failed.is_some() {
            let reason = failed.map(|(_, reason)| reason).unwrap_or_default();
            match create(&self.config, &self.link, &self.fatal) {
                Ok(producer) => {
                    tracing::warn!(%reason, "replaced the Kafka producer after a fatal error");
                    *current = producer;
                    self.rebuilt.fetch_add(1, Ordering::SeqCst);
                }
                Err(err) => {
                    self.fatal.store(true, Ordering::SeqCst);
                    return Err(PublishError {
                        topic: String::new(),
                        message: format!("cannot replace the failed Kafka producer: {err:#}"),
                        permanent: false,
                    });
                }
            }
        }
        Ok(current.clone())
    }

    /// How many times the producer was replaced after a fatal error.
    pub fn rebuilt(&self) -> u64 {
        self.rebuilt.load(Ordering::SeqCst)
    }

    /// Raises a fatal error in the current producer as librdkafka would
    /// after broken idempotence (fault-injection tests).
    pub fn inject_fatal_error(&self) {
        let producer = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let reason = c"injected fatal error";
        // SAFETY: the client pointer is valid while `producer` lives, and the
        // reason is a NUL-terminated string librdkafka copies.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    /// Asks the cluster for its metadata: marks the link up when it answers
    /// (a producer with nothing to send may otherwise stay disconnected).
    pub fn probe(&self, timeout: Duration) -> bool {
        let producer = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let answered = producer.client().fetch_metadata(None, timeout).is_ok();
        if answered {
            self.link.report_up(crate::clock::unix_ms(std::time::SystemTime::now()));
        }
        answered
    }

    /// Waits up to `timeout` for every enqueued record to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        let producer = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Err(err) = producer.flush(timeout) {
            tracing::warn!("producer flush: {err}");
        }
    }
}

fn create(
    config: &ClientConfig,
    link: &BrokerLink,
    fatal: &Arc<AtomicBool>,
) -> anyhow::Result<FutureProducer<LinkContext>> {
    config
        .create_with_context(LinkContext { link: link.clone(), fatal: fatal.clone() })
        .context("failed to create the Kafka producer")
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
            let producer = self.producer()?;
            let mut deliveries = Vec::with_capacity(records.len());
            for record in &records {
                let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
                for (key, value) in &record.headers {
                    headers = headers.insert(Header { key, value: Some(value) });
                }
                let mut pending =
                    FutureRecord::to(&record.topic).key(&record.key).payload(&record.value).headers(headers);
                let delivery = loop {
                    match producer.send_result(pending) {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rdkafka::ClientConfig;
    use rdkafka::producer::BaseProducer;

    /// CPU time of the calling thread so far (Linux's schedstat).
    fn thread_cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
    }

    /// rdkafka's poll loops (the producer's polling thread) used to spin
    /// for a timeout's last millisecond: vendor/rdkafka/PATCHED.md.
    #[test]
    fn polling_with_under_a_millisecond_left_waits_instead_of_spinning() {
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").create().unwrap();
        let (cpu, started) = (thread_cpu(), Instant::now());
        for _ in 0..200 {
            producer.poll(Duration::from_micros(900));
        }
        let (cpu, wall) = (thread_cpu() - cpu, started.elapsed());
        assert!(cpu < wall / 4, "polling took {cpu:?} of CPU in {wall:?}: it spins");
    }
}
