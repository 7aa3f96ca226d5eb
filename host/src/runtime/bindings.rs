//! Host side of the `shop:service` world: the generated bindings and the
//! per-store state that implements the world's imports (the outbound ports).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::clock::Clock;
use crate::state::{AccessError, Timer, TimerChange, Txn};

// Synchronous calls: guests run on the pipeline's executor threads (and
// queries on blocking threads), never on the async runtime, so no fiber
// stack is needed per call.
// The calls that buffer changes can end the call: see [`LimitExceeded`].
// The world with the vault: components of `service` (without it) load too,
// since the linker offers more than they import.
wasmtime::component::bindgen!({
    path: "../wit",
    world: "vault-service",
    imports: {
        "shop:service/state.set": trappable,
        "shop:service/state.delete": trappable,
        "shop:service/timers.schedule": trappable,
        "shop:service/timers.cancel": trappable,
    },
});

/// A guest asked for another change after one was refused for going past a
/// per-call cap: the call ends here (a permanent failure) instead of
/// burning its time budget on changes that cannot be kept.
#[derive(Debug, thiserror::Error)]
#[error("the call went past a limit: {0}")]
pub struct LimitExceeded(pub String);

impl HostState {
    /// Ends the call if a change was refused already ([`LimitExceeded`]).
    fn refused_before(&self) -> wasmtime::Result<()> {
        match self.txn.exceeded() {
            Some(reason) => Err(wasmtime::Error::new(LimitExceeded(reason.to_owned()))),
            None => Ok(()),
        }
    }
}

use shop::service::{clock, config, log, state, timers, vault};

/// The world's instance and pre-instance, by the name of the world every
/// component implements.
pub use {VaultService as Service, VaultServicePre as ServicePre};

/// WASI resources one instance may hold at once (wasmtime's default is a
/// million).
pub const MAX_RESOURCES: usize = 1_000;

/// Everything one store (one call) owns: WASI with no capabilities, the
/// state transaction, config, clock and resource limits.
pub struct HostState {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// Memory and table limits of the instance.
    pub limits: StoreLimits,
    /// The call's view of the component's state.
    pub txn: Txn,
    /// When the call in progress must end, waits in the host included.
    pub deadline: Instant,
    /// The component's throttle (set by the runtime for its calls).
    pub(super) throttle: Option<Arc<super::throttle::Throttle>>,
    /// The component's quotas (set by the runtime for its calls), and the
    /// lines logged by the call in progress (known by its deadline).
    pub(super) quotas: Option<Arc<super::Quotas>>,
    log_lines: (Instant, u32),
    /// The guest's stderr, if granted (else it is discarded).
    pub(super) stderr: Option<super::stderr::GuestStderr>,
    /// Held while the call in progress is past its burst.
    pub(super) over_burst: Option<super::throttle::OverBurst>,
    /// Time of the call in progress not spent running guest code: waits in
    /// the host and throttle sleeps.
    pub(super) idle: std::time::Duration,
    /// The card vault, for a component granted it.
    pub(super) vault: Option<Arc<crate::vault::Vault>>,
    /// The call's clock readings, recorded for a shadow run or replayed
    /// to its candidate.
    pub(super) tape: Option<super::shadow::Tape>,
    component: Arc<str>,
    config: Arc<HashMap<String, String>>,
    clock: Arc<dyn Clock>,
    deadlines: Arc<dyn Clock>,
}

impl HostState {
    /// A fresh state for one call.
    #[allow(clippy::too_many_arguments)] // one per part of the store, all distinct
    pub fn new(
        component: Arc<str>,
        txn: Txn,
        config: Arc<HashMap<String, String>>,
        clock: Arc<dyn Clock>,
        deadlines: Arc<dyn Clock>,
        limits: StoreLimits,
        deadline: Instant,
        grants: super::WasiGrants,
    ) -> Self {
        // No preopened directory, no environment, no arguments, no stdin, no
        // sockets: Rust's std on wasip2 links these interfaces, but a service
        // gets no capability through them (a component importing sockets is
        // refused at load, see `grants`). Stderr carries guest panic
        // messages, if granted; otherwise it is discarded.
        let mut builder = WasiCtx::builder();
        builder.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        let stderr = grants.stderr.then(super::stderr::GuestStderr::default);
        if let Some(stderr) = &stderr {
            builder.stderr(stderr.clone());
        }
        let wasi = builder.build();
        // Resources (pollables, streams) are host memory a guest can ask for
        // in a loop: a few per call is all a service needs.
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            wasi,
            table,
            limits,
            txn,
            deadline,
            throttle: None,
            quotas: None,
            log_lines: (deadline, 0),
            stderr,
            over_burst: None,
            idle: std::time::Duration::ZERO,
            vault: None,
            tape: None,
            component,
            config,
            clock,
            deadlines,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl shop::service::types::Host for HostState {}

fn to_wit(err: AccessError) -> state::StateError {
    match err {
        AccessError::Unavailable(msg) => state::StateError::Unavailable(msg),
        AccessError::Invalid(msg) => state::StateError::Invalid(msg),
    }
}

impl HostState {
    /// A guest's read of its state: bounded by the call's deadline, and
    /// counted as a wait for the store, not the guest's CPU (see `throttle`).
    fn read<T>(&mut self, read: impl FnOnce(&Txn) -> Result<T, AccessError>) -> Result<T, state::StateError> {
        let (txn, reading) = (&self.txn, Instant::now());
        let value = crate::state::read_until(self.deadline, || read(txn));
        self.idle += reading.elapsed();
        value.map_err(to_wit)
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, state::StateError> {
        self.read(|txn| txn.get(&key))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), state::StateError>> {
        self.refused_before()?;
        Ok(self.txn.put(&key, Some(value)).map_err(to_wit))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), state::StateError>> {
        self.refused_before()?;
        Ok(self.txn.put(&key, None).map_err(to_wit))
    }

    fn list_keys(&mut self, prefix: String, limit: u32) -> Result<Vec<String>, state::StateError> {
        self.read(|txn| txn.keys(&prefix, limit.min(10_000) as usize))
    }
}

impl timers::Host for HostState {
    fn schedule(
        &mut self,
        id: String,
        at_ms: u64,
        event_type: String,
        key: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), state::StateError>> {
        self.refused_before()?;
        let Ok(payload) = String::from_utf8(payload) else {
            return Ok(Err(state::StateError::Invalid("timer payload is not UTF-8 JSON".into())));
        };
        // `set_by` and `correlation_id` are filled in from the event at commit.
        let timer = Timer {
            id,
            at_ms,
            event_type,
            key,
            payload,
            set_by: String::new(),
            correlation_id: None,
            traceparent: None,
            nonce: 0,
        };
        Ok(self.txn.timer(TimerChange::Set(timer)).map_err(to_wit))
    }

    fn cancel(&mut self, id: String) -> wasmtime::Result<Result<(), state::StateError>> {
        self.refused_before()?;
        Ok(self.txn.timer(TimerChange::Cancel(id)).map_err(to_wit))
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        // Escaped and bounded: a guest cannot forge or flood log lines.
        if !self.log_admitted() {
            return;
        }
        let (message, fields) = (super::guest_text::guest_message(&message), super::guest_text::guest_fields(&fields));
        let component = &*self.component;
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "component", component, %fields, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "component", component, %fields, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "component", component, %fields, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "component", component, %fields, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "component", component, %fields, "{message}")
            }
        }
    }
}

impl HostState {
    /// Whether a line is written: not past the component's log quotas
    /// (counted, see [`super::Quotas`]), whatever its level.
    fn log_admitted(&mut self) -> bool {
        // A new deadline is a new call (a reused instance keeps its state).
        if self.log_lines.0 != self.deadline {
            self.log_lines = (self.deadline, 0);
        }
        self.log_lines.1 += 1;
        self.quotas.as_ref().is_none_or(|quotas| quotas.admit_log(&self.component, self.log_lines.1))
    }
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> u64 {
        match &mut self.tape {
            Some(tape) => tape.read(super::shadow::Reading::Clock, &*self.clock),
            None => self.clock.now_ms(),
        }
    }

    fn deadline_now_ms(&mut self) -> u64 {
        match &mut self.tape {
            Some(tape) => tape.read(super::shadow::Reading::Deadlines, &*self.deadlines),
            None => self.deadlines.now_ms(),
        }
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

impl vault::Host for HostState {
    /// Only a component granted the vault imports this (the others are
    /// refused at load); the read is bounded by the call's deadline and
    /// counted as a wait, like a state read.
    fn redeem(&mut self, token: String) -> Result<vault::Card, vault::VaultError> {
        let Some(vault) = self.vault.clone() else {
            return Err(vault::VaultError::Unavailable("this host has no vault for this component".into()));
        };
        let reading = Instant::now();
        let card = crate::state::read_until(self.deadline, || vault.redeem(&token));
        self.idle += reading.elapsed();
        match card {
            Ok(card) => Ok(vault::Card { number: card.number, brand: card.brand, last4: card.last4 }),
            Err(crate::vault::VaultError::Unknown) => Err(vault::VaultError::Unknown),
            Err(crate::vault::VaultError::Expired) => Err(vault::VaultError::Expired),
            Err(crate::vault::VaultError::Unavailable(why)) => Err(vault::VaultError::Unavailable(why)),
        }
    }
}
