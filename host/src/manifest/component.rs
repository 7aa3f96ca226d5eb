//! One component's entry in the manifest (`[components.NAME]`): its wasm,
//! port, topics and group, the bounds and quotas of its calls, its config
//! and what it is granted; with the defaults of each.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::validate::check_name;
use super::{Grants, ManifestError, PublishGrants, WasiGrants, invalid};

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
    /// Log lines one call may write; past it they are dropped (counted in
    /// `shop_guest_log_lines_dropped_total`, one summary line a second).
    #[serde(default = "default_log_lines_per_call")]
    pub max_log_lines_per_call: u32,
    /// Log lines all the component's calls may write in one second.
    #[serde(default = "default_log_lines_per_second")]
    pub max_log_lines_per_second: u32,
    /// Keys its state may hold in total; a call setting one more fails for
    /// good, the reason naming the quota (deletes are always allowed).
    #[serde(default = "default_max_state_keys")]
    pub max_state_keys: u64,
    /// Bytes (keys and values) its state may hold in total; as `max_state_keys`.
    #[serde(default = "default_max_state_bytes")]
    pub max_state_bytes: u64,
    /// Timers it may have pending; a call setting one more fails for good.
    #[serde(default = "default_max_timers")]
    pub max_timers: u64,
    /// Outbox entries (outputs not yet acknowledged by the broker) it may
    /// have; an event emitting more fails for good.
    #[serde(default = "default_max_outbox_entries")]
    pub max_outbox_entries: u64,
    /// Values the component reads through its `config` import.
    #[serde(default)]
    pub config: HashMap<String, String>,
    /// What the component may publish: `"topic:EventType"` entries
    /// (`"topic:*"` for every type on a topic). Anything else it emits fails
    /// its event for good (dead-lettered with the reason). Absent: nothing
    /// (the reason names the missing grant).
    #[serde(default)]
    pub publishes: Option<Vec<String>>,
    /// What it consumes: `"topic:EventType"` entries, each on one of its
    /// `topics`. The host checks at load and at every reload that what
    /// each publisher of those types sends has every field the component
    /// requires (by the schema its contract carries, or the host's schema
    /// of the type for a component without a contract); a contract that
    /// consumes a type not listed here is refused. Absent: whatever the
    /// component's contract says (nothing, without one).
    #[serde(default)]
    pub consumes: Option<Vec<String>>,
    /// WASI capabilities granted: `"clocks"`, `"random"`, `"stderr"`.
    /// Absent: all three. A component importing an interface it is not
    /// granted is refused at load; files, environment and sockets are not
    /// grantable yet.
    #[serde(default)]
    pub wasi: Option<Vec<String>>,
    /// May redeem card tokens from the host's vault (the `vault` import).
    /// Absent: not granted, and a component importing it is refused at load.
    #[serde(default)]
    pub vault: bool,
    /// How its shadow runs go (`host shadow`).
    #[serde(default)]
    pub shadow: super::ShadowSettings,
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
            None => PublishGrants::missing(&key("publishes")),
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
        Ok(Grants { publishes, wasi, vault: self.vault })
    }
}

fn default_log_lines_per_call() -> u32 {
    crate::limits::DEFAULT_MAX_LOG_LINES_PER_CALL
}
fn default_log_lines_per_second() -> u32 {
    crate::limits::DEFAULT_MAX_LOG_LINES_PER_SECOND
}
fn default_max_state_keys() -> u64 {
    crate::limits::DEFAULT_MAX_STATE_KEYS
}
fn default_max_state_bytes() -> u64 {
    crate::limits::DEFAULT_MAX_STATE_BYTES
}
fn default_max_timers() -> u64 {
    crate::limits::DEFAULT_MAX_TIMERS_SET
}
fn default_max_outbox_entries() -> u64 {
    crate::limits::DEFAULT_MAX_OUTBOX_ENTRIES
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
    crate::limits::DEFAULT_STACK_BYTES >> 10
}
fn default_max_writes_per_call() -> usize {
    crate::limits::DEFAULT_MAX_WRITES
}
fn default_max_write_bytes_per_call() -> usize {
    crate::limits::DEFAULT_MAX_WRITE_BYTES
}
fn default_max_timers_per_call() -> usize {
    crate::limits::DEFAULT_MAX_TIMERS
}
fn default_cpu_burst_ms() -> u64 {
    crate::limits::DEFAULT_BURST.as_millis() as u64
}
fn default_cpu_percent() -> u32 {
    crate::limits::DEFAULT_CPU_PERCENT
}
fn default_max_concurrent_queries() -> usize {
    crate::limits::DEFAULT_MAX_QUERIES
}
