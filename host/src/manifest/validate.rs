//! The manifest's cross-field rules, checked before the host binds a port
//! or subscribes to a topic: the first violation names its key.

use std::collections::HashMap;

use super::{ComponentSettings, KafkaSettings, Manifest, ManifestError, check_properties, invalid};

impl Manifest {
    /// Checks every cross-field rule; the first violation names its key.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_kafka(&self.kafka)?;
        if self.components.is_empty() {
            return Err(invalid("components", "at least one component is required"));
        }
        self.check_timeouts_and_schema()?;
        self.check_connections_and_rates()?;
        let mut ports: HashMap<u16, String> = HashMap::new();
        let mut claim = |port: u16, owner: String, key: String| {
            if port == 0 {
                return Err(invalid(key, "port 0 is not allowed: name the port to serve on"));
            }
            match ports.insert(port, owner.clone()) {
                Some(other) => Err(invalid(key, format!("port {port} is already used by {other}"))),
                None => Ok(()),
            }
        };
        claim(self.gateway.port, "the gateway".into(), "gateway.port".into())?;
        if let Some(token) = &self.admin.token {
            if token.chars().count() < 16 {
                return Err(invalid("admin.token", "must be at least 16 characters"));
            }
            claim(self.admin.port, "the admin API".into(), "admin.port".into())?;
        }
        if !self.components.contains_key(&self.gateway.order_component) {
            return Err(invalid(
                "gateway.order_component",
                format!("no component named {:?}", self.gateway.order_component),
            ));
        }
        for (name, c) in &self.components {
            check_component(name, c, &mut claim)?;
        }
        Ok(())
    }

    /// The ports' connection bounds and the gateway's per-client rates.
    fn check_connections_and_rates(&self) -> Result<(), ManifestError> {
        for (key, rate) in [
            ("gateway.orders_per_second_per_client", self.gateway.orders_per_second_per_client),
            ("gateway.queries_per_second_per_client", self.gateway.queries_per_second_per_client),
        ] {
            if !(1..=1_000_000).contains(&rate) {
                return Err(invalid(key, "must be between 1 and 1000000"));
            }
        }
        if !(1..=100_000).contains(&self.http.max_connections) {
            return Err(invalid("http.max_connections", "must be between 1 and 100000"));
        }
        if !(100..=300_000).contains(&self.http.idle_timeout_ms) {
            return Err(invalid("http.idle_timeout_ms", "must be between 100 and 300000"));
        }
        Ok(())
    }

    /// The shutdown, deadline and publish timeouts, and the schema's name.
    fn check_timeouts_and_schema(&self) -> Result<(), ManifestError> {
        if !(100..=300_000).contains(&self.runtime.drain_timeout_ms) {
            return Err(invalid("runtime.drain_timeout_ms", "must be between 100 and 300000"));
        }
        if !(1_000..=86_400_000).contains(&self.runtime.deadline_outage_window_ms) {
            return Err(invalid("runtime.deadline_outage_window_ms", "must be between 1000 and 86400000"));
        }
        if !(100..=60_000).contains(&self.gateway.publish_timeout_ms) {
            return Err(invalid("gateway.publish_timeout_ms", "must be between 100 and 60000"));
        }
        let schema = &self.state.schema;
        if schema.is_empty()
            || schema.len() > 63
            || schema.starts_with(|c: char| c.is_ascii_digit())
            || !schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(invalid("state.schema", format!("{schema:?}: use 1 to 63 lowercase letters, digits or '_'")));
        }
        Ok(())
    }
}

/// The Kafka settings on their own.
fn check_kafka(k: &KafkaSettings) -> Result<(), ManifestError> {
    if !(1..=1000).contains(&k.partitions) {
        return Err(invalid("kafka.partitions", format!("must be between 1 and 1000, got {}", k.partitions)));
    }
    if !(1..=32).contains(&k.replication_factor) {
        return Err(invalid("kafka.replication_factor", "must be between 1 and 32"));
    }
    check_name("kafka.topic_prefix", &k.topic_prefix, true)?;
    if !(1024..=16 << 20).contains(&k.max_record_bytes) {
        return Err(invalid("kafka.max_record_bytes", "must be between 1024 and 16777216"));
    }
    check_name("kafka.dead_letter_topic", &k.dead_letter_topic, false)?;
    if let Some(id) = &k.instance_id {
        check_name("kafka.instance_id", id, false)?;
    }
    check_properties(&k.properties).map_err(|(key, message)| invalid(format!("kafka.properties.{key:?}"), message))?;
    Ok(())
}

/// One component's settings; `claim` takes its port.
fn check_component(
    name: &str,
    c: &ComponentSettings,
    claim: &mut impl FnMut(u16, String, String) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    let key = |field: &str| format!("components.{name}.{field}");
    check_name(&format!("components.{name}"), name, false)?;
    claim(c.port, format!("component {name:?}"), key("port"))?;
    if c.topics.is_empty() {
        return Err(invalid(key("topics"), "at least one topic is required"));
    }
    for topic in &c.topics {
        check_name(&key("topics"), topic, false)?;
    }
    check_name(&key("group"), &c.group, false)?;
    if !(1..=60_000).contains(&c.timeout_ms) {
        return Err(invalid(key("timeout_ms"), "must be between 1 and 60000"));
    }
    if !(1..=4096).contains(&c.memory_mib) {
        return Err(invalid(key("memory_mib"), "must be between 1 and 4096"));
    }
    if !(1..=100_000).contains(&c.instance_reuse) {
        return Err(invalid(key("instance_reuse"), "must be between 1 and 100000"));
    }
    let max_stack_kib = crate::limits::MAX_STACK_BYTES >> 10;
    if !(64..=max_stack_kib).contains(&c.stack_kib) {
        return Err(invalid(key("stack_kib"), format!("must be between 64 and {max_stack_kib}")));
    }
    if !(1..=100_000).contains(&c.max_writes_per_call) {
        return Err(invalid(key("max_writes_per_call"), "must be between 1 and 100000"));
    }
    if !(1024..=256 << 20).contains(&c.max_write_bytes_per_call) {
        return Err(invalid(key("max_write_bytes_per_call"), "must be between 1024 and 268435456"));
    }
    if c.max_timers_per_call > 10_000 {
        return Err(invalid(key("max_timers_per_call"), "must be at most 10000"));
    }
    if !(1..=64).contains(&c.max_concurrent_queries) {
        return Err(invalid(key("max_concurrent_queries"), "must be between 1 and 64"));
    }
    for (field, value) in [
        ("max_log_lines_per_call", u64::from(c.max_log_lines_per_call)),
        ("max_log_lines_per_second", u64::from(c.max_log_lines_per_second)),
        ("max_state_keys", c.max_state_keys),
        ("max_state_bytes", c.max_state_bytes),
        ("max_timers", c.max_timers),
        ("max_outbox_entries", c.max_outbox_entries),
    ] {
        if value == 0 {
            return Err(invalid(key(field), "must be at least 1"));
        }
    }
    if !(1..=60_000).contains(&c.cpu_burst_ms) {
        return Err(invalid(key("cpu_burst_ms"), "must be between 1 and 60000"));
    }
    if !(1..=100).contains(&c.cpu_percent) {
        return Err(invalid(key("cpu_percent"), "must be between 1 and 100"));
    }
    if !(1..=100).contains(&c.max_attempts) {
        return Err(invalid(key("max_attempts"), "must be between 1 and 100"));
    }
    if !(1..=100_000).contains(&c.canary_events) {
        return Err(invalid(key("canary_events"), "must be between 1 and 100000"));
    }
    if c.canary_max_failures == 0 || c.canary_max_failures > c.max_attempts {
        return Err(invalid(
            key("canary_max_failures"),
            format!("must be between 1 and max_attempts ({})", c.max_attempts),
        ));
    }
    c.grants(name)?;
    check_consumes(name, c)?;
    c.shadow.validate(name)?;
    if !c.wasm.is_file() {
        return Err(invalid(key("wasm"), format!("{:?} is not a file (run `just build-components` first)", c.wasm)));
    }
    Ok(())
}

/// `consumes` entries: `topic:EventType`, each on one of its topics.
fn check_consumes(name: &str, c: &ComponentSettings) -> Result<(), ManifestError> {
    let key = format!("components.{name}.consumes");
    for entry in c.consumes.iter().flatten() {
        let Some((topic, event_type)) = entry.split_once(':').filter(|(t, e)| !t.is_empty() && !e.is_empty()) else {
            return Err(invalid(&key, format!("{entry:?}: write \"topic:EventType\"")));
        };
        if event_type == "*" || event_type.contains(':') {
            return Err(invalid(&key, format!("{entry:?}: name one event type")));
        }
        if !c.topics.iter().any(|t| t == topic) {
            return Err(invalid(&key, format!("{entry:?}: {topic:?} is not one of its topics {:?}", c.topics)));
        }
    }
    Ok(())
}

/// Kafka topic and group names: letters, digits, `.`, `_`, `-`.
pub(super) fn check_name(key: &str, value: &str, allow_empty: bool) -> Result<(), ManifestError> {
    if value.is_empty() && !allow_empty {
        return Err(invalid(key, "must not be empty"));
    }
    if value.len() > 200 {
        return Err(invalid(key, "must be at most 200 characters"));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(invalid(key, format!("{value:?} contains {bad:?}; use letters, digits, '.', '_' or '-'")));
    }
    Ok(())
}
