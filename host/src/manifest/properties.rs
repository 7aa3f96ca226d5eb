//! The librdkafka properties an operator may give every client
//! (`[kafka.properties]`), checked with librdkafka itself but without
//! connecting anywhere: the manifest refuses a bad one before the host
//! starts, and the Kafka adapter skips the reserved ones.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

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
