//! The app manifest: which components run, on which ports, reading which
//! topics. Parsed strictly (`deny_unknown_fields`) and validated before the
//! host binds a port or subscribes to a topic.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::runtime::{Grants, PublishGrants, WasiGrants};

/// A manifest that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid manifest {path:?}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid manifest: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { key: key.into(), message: message.into() }
}

/// The whole app: Kafka settings, HTTP settings, the gateway and the components.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Kafka settings.
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// HTTP settings shared by every port.
    #[serde(default)]
    pub http: HttpSettings,
    /// The API gateway and web frontend.
    pub gateway: GatewaySettings,
    /// The admin API (loopback only).
    #[serde(default)]
    pub admin: AdminSettings,
    /// Wasm runtime settings.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// Where the components' state lives.
    #[serde(default)]
    pub state: StateSettings,
    /// The service components, by name.
    pub components: BTreeMap<String, ComponentSettings>,
}

/// Kafka settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers; `KAFKA_BROKERS` overrides it. Absent: the embedded
    /// in-process broker (keeps nothing across restarts).
    pub brokers: Option<String>,
    /// Partitions of the topics the host creates.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topics the host creates.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Prefix of every physical topic and consumer group name; components
    /// only ever see logical names (`orders`, ...).
    #[serde(default)]
    pub topic_prefix: String,
    /// Logical topic that receives events no component can handle.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Static group membership: when set, each component's consumer joins
    /// its group as `{instance_id}-{component}`, so a host restarted after a
    /// crash takes its partitions back at once instead of waiting for the
    /// broker to expire the dead member. Give every host its own id.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Largest record value a component is given, in bytes; a larger one
    /// is set aside on the dead-letter topic as too large.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// librdkafka properties given to every client (producers, consumers,
    /// admin): TLS (`security.protocol`, `ssl.*`), SASL (`sasl.*`) and the
    /// like. `HOST_KAFKA_PROPERTIES` adds to them and wins. Keys the host
    /// sets for its guarantees are refused (`crate::kafka::RESERVED_PROPERTIES`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_max_record_bytes() -> usize {
    crate::pipeline::DEFAULT_MAX_RECORD_BYTES
}

fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    1
}
fn default_dead_letter_topic() -> String {
    "dead-letters".into()
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            partitions: default_partitions(),
            replication_factor: default_replication(),
            topic_prefix: String::new(),
            dead_letter_topic: default_dead_letter_topic(),
            instance_id: None,
            max_record_bytes: default_max_record_bytes(),
            properties: BTreeMap::new(),
        }
    }
}

/// HTTP settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address every port but the admin API's binds to; `HOST_BIND`
    /// overrides it.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
}

fn default_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { bind: default_bind() }
    }
}

/// Wasm runtime settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Directory of compiled components, relative to the manifest; a known
    /// version is loaded from it instead of being compiled again.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Reload a component when its `.wasm` file changes.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Directory of the components' durable state (one redb file per
    /// component), relative to the manifest. One host at a time may use it.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// On SIGTERM, how long the host may take to finish the records in
    /// flight, in milliseconds; what is left then is abandoned (its offsets
    /// not stored, so it is delivered again) and the host exits non-zero.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Timers do not count time the broker was unreachable within this
    /// window, in milliseconds: keep it above the longest deadline (see
    /// `crate::deadlines`).
    #[serde(default = "default_outage_window_ms")]
    pub deadline_outage_window_ms: u64,
}

fn default_drain_timeout_ms() -> u64 {
    10_000
}

fn default_outage_window_ms() -> u64 {
    120_000
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".state")
}

fn default_watch() -> bool {
    true
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from(".component-cache")
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            watch: default_watch(),
            state_dir: default_state_dir(),
            drain_timeout_ms: default_drain_timeout_ms(),
            deadline_outage_window_ms: default_outage_window_ms(),
        }
    }
}

/// Where the components' state (data, handled ids, outbox, timers) lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// `redb` (the default): one embedded file per component under
    /// `runtime.state_dir`, for one host. `postgres`: one shared database,
    /// so that any number of hosts can serve a component.
    #[serde(default)]
    pub backend: StateBackend,
    /// PostgreSQL URL (`postgres://user:password@host:port/db`);
    /// `DATABASE_URL` overrides it. Required by the `postgres` backend.
    pub url: Option<String>,
    /// Schema of the tables in that database (created if missing).
    #[serde(default = "default_schema")]
    pub schema: String,
}

/// A state backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    #[default]
    Redb,
    Postgres,
}

impl std::str::FromStr for StateBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "postgres" => Ok(Self::Postgres),
            other => Err(format!("unknown state backend {other:?}: use \"redb\" or \"postgres\"")),
        }
    }
}

fn default_schema() -> String {
    "shop".into()
}

impl Default for StateSettings {
    fn default() -> Self {
        Self { backend: StateBackend::default(), url: None, schema: default_schema() }
    }
}

/// The admin API: on 127.0.0.1 unless `admin.bind` says otherwise, whatever
/// `http.bind` says (a container binds its ports on 0.0.0.0 and may still
/// keep the admin API on its own loopback).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address the admin API binds to; `HOST_ADMIN_BIND` overrides it.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// Port on `bind`.
    #[serde(default = "default_admin_port")]
    pub port: u16,
    /// Bearer token (at least 16 characters); `HOST_ADMIN_TOKEN` overrides
    /// it. Without a token the admin API is not served.
    pub token: Option<String>,
}

fn default_admin_port() -> u16 {
    3090
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { bind: default_bind(), port: default_admin_port(), token: None }
    }
}

/// The API gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// HTTP port of the gateway and the frontend.
    pub port: u16,
    /// Component that answers `GET /order/{id}` (through its `/orders/{id}` route).
    #[serde(default = "default_order_component")]
    pub order_component: String,
    /// Longest wait for the broker to acknowledge an order, in milliseconds,
    /// before answering `503` (and dropping it: it is not sent later).
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
}

fn default_publish_timeout_ms() -> u64 {
    2_000
}

fn default_order_component() -> String {
    "order".into()
}

/// One service component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSettings {
    /// Path of the `.wasm` component, relative to the manifest.
    pub wasm: PathBuf,
    /// HTTP port of `/health` and the component's own routes.
    pub port: u16,
    /// Logical topics consumed.
    pub topics: Vec<String>,
    /// Consumer group (prefixed by `kafka.topic_prefix`).
    pub group: String,
    /// Wall-clock budget of one call into the component, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory limit of one instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// Attempts of a retryable failure (error or trap) before dead-lettering.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Events watched after a reload before the new version is trusted.
    #[serde(default = "default_canary_events")]
    pub canary_events: u32,
    /// Failures among those events that roll the reload back (at most
    /// `max_attempts`, so a failing event is retried on the restored version).
    #[serde(default = "default_canary_max_failures")]
    pub canary_max_failures: u32,
    /// Events one instance handles (and queries one instance answers)
    /// before it is replaced by a fresh one. 1 (the default) gives every
    /// event and query a fresh instance. More is for components that keep
    /// nothing in memory between calls (all their state goes through the
    /// `state` import): the instance's memory then carries nothing from one
    /// call to the next that the component could see, and instantiation
    /// stops dominating the cost of a call. A trap always discards the
    /// instance. Queries run on instances of their own, never on the one
    /// handling events.
    #[serde(default = "default_instance_reuse")]
    pub instance_reuse: u32,
    /// Wasm stack of a call, in KiB: how deep the component may recurse
    /// before it traps (stack overflow).
    #[serde(default = "default_stack_kib")]
    pub stack_kib: usize,
    /// Distinct keys one call may write (set or delete); past it the write
    /// is refused (`state-error.invalid`) and the event fails for good.
    #[serde(default = "default_max_writes_per_call")]
    pub max_writes_per_call: usize,
    /// Bytes one call may write: keys and values, plus timer ids, keys and
    /// payloads; past it as `max_writes_per_call`.
    #[serde(default = "default_max_write_bytes_per_call")]
    pub max_write_bytes_per_call: usize,
    /// Timers one call may set or cancel; past it as `max_writes_per_call`.
    #[serde(default = "default_max_timers_per_call")]
    pub max_timers_per_call: usize,
    /// Queries (HTTP routes) answered at once, each on a thread of the
    /// component's own; more wait their turn.
    #[serde(default = "default_max_concurrent_queries")]
    pub max_concurrent_queries: usize,
    /// How long one call runs at full speed, in milliseconds; past it the
    /// call gets `cpu_percent` of a core until its deadline.
    #[serde(default = "default_cpu_burst_ms")]
    pub cpu_burst_ms: u64,
    /// Share of one core, in percent, that the component's calls past their
    /// burst get together, and that its faulty calls (traps, timeouts,
    /// limits) may take: after one, its next call waits until the fault's
    /// CPU is this share of the time since. 100 never slows it.
    #[serde(default = "default_cpu_percent")]
    pub cpu_percent: u32,
    /// Values the component reads through its `config` import.
    #[serde(default)]
    pub config: HashMap<String, String>,
    /// What the component may publish: `"topic:EventType"` entries
    /// (`"topic:*"` for every type on a topic). Anything else it emits fails
    /// its event for good (dead-lettered with the reason). Absent: anything.
    #[serde(default)]
    pub publishes: Option<Vec<String>>,
    /// WASI capabilities granted: `"clocks"`, `"random"`, `"stderr"`.
    /// Absent: all three. A component importing an interface it is not
    /// granted is refused at load; files, environment and sockets are not
    /// grantable yet.
    #[serde(default)]
    pub wasi: Option<Vec<String>>,
}

impl ComponentSettings {
    /// The component's grants, parsed from `publishes` and `wasi`.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming `components.{name}.publishes` or
    /// `.wasi` and the entry at fault.
    pub fn grants(&self, name: &str) -> Result<Grants, ManifestError> {
        let key = |field: &str| format!("components.{name}.{field}");
        let publishes = match &self.publishes {
            None => PublishGrants::any(),
            Some(entries) => {
                for entry in entries {
                    if let Some((topic, _)) = entry.split_once(':') {
                        check_name(&key("publishes"), topic, false)?;
                    }
                }
                PublishGrants::parse(entries).map_err(|message| invalid(key("publishes"), message))?
            }
        };
        let wasi = match &self.wasi {
            None => WasiGrants::default(),
            Some(names) => WasiGrants::parse(names).map_err(|message| invalid(key("wasi"), message))?,
        };
        Ok(Grants { publishes, wasi })
    }
}

fn default_timeout_ms() -> u64 {
    1_000
}
fn default_memory_mib() -> usize {
    64
}
fn default_max_attempts() -> u32 {
    5
}
fn default_canary_events() -> u32 {
    20
}
fn default_canary_max_failures() -> u32 {
    3
}
fn default_instance_reuse() -> u32 {
    1
}
fn default_stack_kib() -> usize {
    crate::runtime::DEFAULT_STACK_BYTES >> 10
}
fn default_max_writes_per_call() -> usize {
    crate::state::TxnLimits::default().max_writes
}
fn default_max_write_bytes_per_call() -> usize {
    crate::state::TxnLimits::default().max_bytes
}
fn default_max_timers_per_call() -> usize {
    crate::state::TxnLimits::default().max_timers
}
fn default_cpu_burst_ms() -> u64 {
    crate::runtime::DEFAULT_BURST.as_millis() as u64
}
fn default_cpu_percent() -> u32 {
    crate::runtime::DEFAULT_CPU_PERCENT
}
fn default_max_concurrent_queries() -> usize {
    crate::runtime::DEFAULT_MAX_QUERIES
}

impl Manifest {
    /// Reads, parses and validates a manifest; relative wasm paths are
    /// resolved against the manifest's directory.
    ///
    /// # Errors
    /// [`ManifestError`] naming the file or the key at fault.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        let mut manifest =
            Self::parse(&text).map_err(|message| ManifestError::Parse { path: path.to_owned(), message })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if manifest.runtime.cache_dir.is_relative() {
            manifest.runtime.cache_dir = base.join(&manifest.runtime.cache_dir);
        }
        if manifest.runtime.state_dir.is_relative() {
            manifest.runtime.state_dir = base.join(&manifest.runtime.state_dir);
        }
        for component in manifest.components.values_mut() {
            if component.wasm.is_relative() {
                component.wasm = base.join(&component.wasm);
            }
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses TOML text without validating it.
    ///
    /// # Errors
    /// The TOML error, which names the line and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.to_string())
    }

    /// Checks every cross-field rule; the first violation names its key.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        let k = &self.kafka;
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
        crate::kafka::check_properties(&k.properties)
            .map_err(|(key, message)| invalid(format!("kafka.properties.{key:?}"), message))?;
        if self.components.is_empty() {
            return Err(invalid("components", "at least one component is required"));
        }
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
            let max_stack_kib = crate::runtime::MAX_STACK_BYTES >> 10;
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
            if !c.wasm.is_file() {
                return Err(invalid(
                    key("wasm"),
                    format!("{:?} is not a file (run `just build-components` first)", c.wasm),
                ));
            }
        }
        Ok(())
    }

    /// Adds `offset` to every port (gateway, admin, components), so that
    /// several hosts of one app can run on one machine.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] for a port pushed past 65535.
    pub fn offset_ports(&mut self, offset: u16) -> Result<(), ManifestError> {
        let shift = |key: String, port: &mut u16| match port.checked_add(offset) {
            Some(shifted) => {
                *port = shifted;
                Ok(())
            }
            None => Err(invalid(key, format!("port {port} + offset {offset} is past 65535"))),
        };
        shift("gateway.port".into(), &mut self.gateway.port)?;
        shift("admin.port".into(), &mut self.admin.port)?;
        for (name, component) in &mut self.components {
            shift(format!("components.{name}.port"), &mut component.port)?;
        }
        Ok(())
    }

    /// Every logical topic the app uses: consumed ones and the dead-letter topic.
    pub fn logical_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.components.values().flat_map(|c| c.topics.iter().cloned()).collect();
        topics.push(self.kafka.dead_letter_topic.clone());
        topics.sort();
        topics.dedup();
        topics
    }
}

/// Kafka topic and group names: letters, digits, `.`, `_`, `-`.
fn check_name(key: &str, value: &str, allow_empty: bool) -> Result<(), ManifestError> {
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

#[cfg(test)]
mod tests;
