//! The Kafka adapter: topic setup, the publisher (idempotent producer,
//! acks=all), one consumer group per component, and the dead-letter list
//! and replay ([`dlq`]).

mod consumer;
pub mod dlq;
mod embedded;
mod handoff;
mod link;
mod producer;

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::manifest::{FORBIDDEN_PROPERTIES, RESERVED_PROPERTIES};

pub use consumer::{Abandoned, ConsumerSettings, run_supervised};
pub use embedded::EmbeddedBroker;
pub use producer::KafkaPublisher;

/// The operator's librdkafka properties (`[kafka.properties]` and
/// `HOST_KAFKA_PROPERTIES`), given to every client [`client_config`] builds.
/// Process-wide rather than passed to every constructor: a host talks to one
/// cluster, and its clients are built in many places (pipelines, gateway,
/// dead letters, benches) that all start from [`client_config`].
static PROPERTIES: RwLock<BTreeMap<String, String>> = RwLock::new(BTreeMap::new());

/// Sets the properties every client built from now on is given.
pub fn set_properties(properties: &BTreeMap<String, String>) {
    let mut current = PROPERTIES.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    current.clone_from(properties);
}

/// Base client configuration for `brokers`: the host's settings, then the
/// operator's properties (TLS, SASL, client.id, ...), which may change any
/// of them but the reserved ones; producer and consumer settings come after.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "shop-host")
        // Back within a second of the broker's return, not ten (the default
        // backoff doubles up to 10 s during an outage).
        .set("reconnect.backoff.max.ms", "1000");
    let properties = PROPERTIES.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (key, value) in properties.iter() {
        // Checked at start (`Manifest::validate`); skipped here too, so that
        // a reserved key can never undo a guarantee.
        if !RESERVED_PROPERTIES.iter().any(|(reserved, _)| reserved == key)
            && !FORBIDDEN_PROPERTIES.contains(&key.as_str())
        {
            config.set(key, value);
        }
    }
    config
}

/// The producer's configuration for `brokers`: idempotent, acks=all, so an
/// acknowledgement means every in-sync replica has the record, in order.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000")
        // A topic missing from the metadata this long is taken as absent
        // (topics are never auto-created): its records fail as refused for
        // good within 5 s instead of 30, and are set aside.
        .set("topic.metadata.propagation.max.ms", "5000");
    config
}

/// A component consumer's configuration for `brokers` and `group`: offsets
/// stored by the host only once a record is done, committed every second.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    config
}

/// Creates the `topics` that do not exist yet.
///
/// # Errors
/// When the cluster cannot be reached or refuses to create a topic.
pub async fn ensure_topics(brokers: &str, topics: &[String], partitions: i32, replication: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(brokers).create().context("failed to create the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication))).collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(20)))
        .request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .with_context(|| format!("failed to create topics on {brokers:?}: is the broker running (`just kafka`)?"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("failed to create topic {topic:?}: {code}"),
        }
    }
    Ok(())
}
