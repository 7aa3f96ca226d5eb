//! The Kafka adapter: topic setup, the publisher (idempotent producer,
//! acks=all) and one consumer group per component.

mod consumer;
mod embedded;
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

pub use consumer::{Abandoned, ConsumerSettings, ConsumerStatus, StatusSnapshot, run_supervised};
pub use embedded::EmbeddedBroker;
pub use link::{BrokerLink, Down};
pub use producer::KafkaPublisher;

/// The operator's librdkafka properties (`[kafka.properties]` and
/// `HOST_KAFKA_PROPERTIES`), given to every client [`client_config`] builds.
/// Process-wide rather than passed to every constructor: a host talks to one
/// cluster, and its clients are built in many places (pipelines, gateway,
/// dead letters, benches) that all start from [`client_config`].
static PROPERTIES: RwLock<BTreeMap<String, String>> = RwLock::new(BTreeMap::new());

/// Properties the host sets itself, because its guarantees depend on their
/// values, with where to change what they control instead.
pub const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers or KAFKA_BROKERS"),
    ("metadata.broker.list", "set kafka.brokers or KAFKA_BROKERS"),
    ("group.id", "each component's group is components.NAME.group"),
    ("group.instance.id", "set kafka.instance_id or HOST_INSTANCE_ID"),
    ("enable.auto.commit", "the host commits offsets of finished records only"),
    ("enable.auto.offset.store", "the host stores an offset once its record is done (at-least-once)"),
    ("auto.offset.reset", "a new group must read its topics from the start"),
    ("enable.idempotence", "the producer must be idempotent (no duplicates, no reordering)"),
    ("acks", "an acknowledgement must mean every in-sync replica has the record"),
    ("request.required.acks", "an acknowledgement must mean every in-sync replica has the record"),
    ("transactional.id", "the host does not use transactions"),
    ("message.timeout.ms", "set gateway.publish_timeout_ms for the gateway's producer"),
    ("statistics.interval.ms", "the host reads consumer lag from these statistics"),
];

/// Properties that make librdkafka load native code or run a program: a
/// plugin (`dlopen` of any path), an OpenSSL engine or provider, the
/// Kerberos `kinit` command. Refused wherever they come from, before
/// librdkafka sees them (it acts on them as soon as they are set): `host
/// check` on a manifest someone else wrote must not run their code, and a
/// host needs none of them (an OpenSSL provider is configured system-wide,
/// with `OPENSSL_CONF`).
pub const FORBIDDEN_PROPERTIES: &[&str] =
    &["plugin.library.paths", "ssl.engine.location", "ssl.providers", "sasl.kerberos.kinit.cmd"];

/// Checks `properties` without connecting anywhere: none is reserved (see
/// [`RESERVED_PROPERTIES`]), and librdkafka knows every key and accepts every
/// value (so a TLS or SASL setting this build cannot honour is refused here).
///
/// # Errors
/// The first key at fault and why.
pub fn check_properties(properties: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    for (key, value) in properties {
        if FORBIDDEN_PROPERTIES.contains(&key.trim()) {
            return Err((key.clone(), "loads native code or runs a program: never accepted by the host".into()));
        }
        if let Some((_, instead)) = RESERVED_PROPERTIES.iter().find(|(reserved, _)| reserved == key) {
            return Err((key.clone(), format!("is set by the host and cannot be overridden: {instead}")));
        }
        let mut config = ClientConfig::new();
        config.set(key, value);
        match config.create_native_config() {
            Ok(_) => {}
            // librdkafka's own words only: rdkafka's Display of this error
            // appends the value, which may be a password under a misspelt key.
            Err(rdkafka::error::KafkaError::ClientConfig(_, description, _, _)) => {
                return Err((key.clone(), description));
            }
            Err(_) => return Err((key.clone(), "refused by librdkafka".into())),
        }
    }
    Ok(())
}

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
