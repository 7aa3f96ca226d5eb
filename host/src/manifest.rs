//! The app manifest: which components run, on which ports, reading which
//! topics. Parsed strictly (`deny_unknown_fields`) and validated before the
//! host binds a port or subscribes to a topic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod component;
mod grants;
mod properties;
mod shadow;
pub mod topology;
mod validate;

pub use component::ComponentSettings;
pub use grants::{Grants, PublishGrants, WasiGrant, WasiGrants};
pub use properties::{FORBIDDEN_PROPERTIES, RESERVED_PROPERTIES, check_properties};
pub use shadow::ShadowSettings;

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
    /// The event types' JSON Schemas.
    #[serde(default)]
    pub schemas: SchemaSettings,
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
    /// sets for its guarantees are refused ([`RESERVED_PROPERTIES`]).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// What the host writes: `cloudevents` (the default; binary mode) or
    /// `v1`, the JSON envelope of hosts before CloudEvents, for a rolling
    /// upgrade while older hosts still read the topics. Both are read.
    #[serde(default)]
    pub wire_format: WireFormat,
}

/// The format of the records the host writes (docs/events.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// CloudEvents 1.0, Kafka binding, binary mode.
    #[default]
    CloudEvents,
    /// The host's own JSON envelope, version 1 (before CloudEvents).
    V1,
}

fn default_max_record_bytes() -> usize {
    crate::limits::DEFAULT_MAX_RECORD_BYTES
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
            wire_format: WireFormat::default(),
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
    /// Connections each port (gateway, components, admin) keeps open at
    /// once; at the cap a new one replaces the longest idle.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest time a connection may stay open with no request in flight
    /// (its first byte included), and take to send a request's headers.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn default_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

fn default_max_connections() -> usize {
    gateway::ConnectionLimits::default().max_connections
}

fn default_idle_timeout_ms() -> u64 {
    gateway::ConnectionLimits::default().idle_timeout.as_millis() as u64
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            max_connections: default_max_connections(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

impl HttpSettings {
    /// The connection limits of every port.
    pub fn connection_limits(&self) -> gateway::ConnectionLimits {
        gateway::ConnectionLimits {
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
        }
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

/// The JSON Schemas every output's data is checked against.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaSettings {
    /// Check outputs against their event type's schema before the commit.
    pub validate: bool,
    /// A folder of `{EventType}.json` schemas (relative to the manifest);
    /// unset: the schemas of the shop's events the host was built with
    /// (the same as the repository's `schemas/`).
    pub dir: Option<PathBuf>,
    /// A schema registry's Confluent-compatible API (e.g.
    /// `http://127.0.0.1:8089/apis/ccompat/v7`): the host registers each
    /// schema there at start, subject `{kafka.topic_prefix}{EventType}`,
    /// and refuses to start if the registry finds one incompatible.
    pub registry: Option<String>,
}

impl Default for SchemaSettings {
    fn default() -> Self {
        Self { validate: true, dir: None, registry: None }
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
    /// PostgreSQL `lock_timeout` of every session, ms (default 2,000).
    #[serde(default = "default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` of every session, ms (default 5,000).
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// PostgreSQL `idle_in_transaction_session_timeout`, ms (default 5,000):
    /// a host frozen mid-commit holds its locks no longer.
    #[serde(default = "default_idle_in_transaction_timeout_ms")]
    pub idle_in_transaction_timeout_ms: u64,
    /// Deadline of one PostgreSQL commit, ms (default 10,000).
    #[serde(default = "default_commit_timeout_ms")]
    pub commit_timeout_ms: u64,
    /// How long the ids of handled events are kept to drop redeliveries,
    /// ms; older ones are pruned in the background. Default 8 days: Kafka's
    /// default topic retention (7 days: no record older is delivered) plus
    /// a day for the longest redelivery (a dead letter replayed, a host
    /// restored from a backup). Raise it with the topics' `retention.ms`.
    #[serde(default = "default_handled_horizon_ms")]
    pub handled_horizon_ms: u64,
}

/// Default of [`StateSettings::handled_horizon_ms`].
pub const DEFAULT_HANDLED_HORIZON_MS: u64 = (7 + 1) * 24 * 60 * 60 * 1000;

fn default_handled_horizon_ms() -> u64 {
    DEFAULT_HANDLED_HORIZON_MS
}

fn default_lock_timeout_ms() -> u64 {
    crate::limits::DEFAULT_PG_LOCK_TIMEOUT_MS
}

fn default_statement_timeout_ms() -> u64 {
    crate::limits::DEFAULT_PG_STATEMENT_TIMEOUT_MS
}

fn default_idle_in_transaction_timeout_ms() -> u64 {
    crate::limits::DEFAULT_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS
}

fn default_commit_timeout_ms() -> u64 {
    crate::limits::DEFAULT_PG_COMMIT_TIMEOUT_MS
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
        Self {
            backend: StateBackend::default(),
            url: None,
            schema: default_schema(),
            lock_timeout_ms: default_lock_timeout_ms(),
            statement_timeout_ms: default_statement_timeout_ms(),
            idle_in_transaction_timeout_ms: default_idle_in_transaction_timeout_ms(),
            commit_timeout_ms: default_commit_timeout_ms(),
            handled_horizon_ms: default_handled_horizon_ms(),
        }
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
    /// `POST /order` requests per second per client address (IPv6: per
    /// /64), with a burst of one second's worth; past it, `429`.
    #[serde(default = "default_orders_per_second")]
    pub orders_per_second_per_client: u32,
    /// Every other request per second per client, counted apart from orders.
    #[serde(default = "default_queries_per_second")]
    pub queries_per_second_per_client: u32,
}

fn default_orders_per_second() -> u32 {
    gateway::RateLimits::default().orders_per_second as u32
}

fn default_queries_per_second() -> u32 {
    gateway::RateLimits::default().queries_per_second as u32
}

fn default_publish_timeout_ms() -> u64 {
    2_000
}

fn default_order_component() -> String {
    "order".into()
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
        if let Some(dir) = manifest.schemas.dir.as_mut().filter(|d| d.is_relative()) {
            *dir = base.join(&*dir);
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

#[cfg(test)]
mod tests;
