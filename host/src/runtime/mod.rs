//! The Wasm runtime: one engine, each component compiled and pre-instantiated
//! once; an instance serves up to `instance_reuse` events (a fresh one per
//! event by default) and a trap always discards it, so that a trap never
//! leaks into the next event. It runs guests and returns what they asked
//! for ([`Called`]); the pipeline wraps, commits and publishes it.

mod bindings;
mod cache;
mod call;
mod canary;
mod component;
mod deadline;
mod engine;
mod grants;
mod guest_text;
mod outputs;
mod pool;
mod quotas;
mod shadow;
mod stderr;
mod throttle;
mod versions;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use wasmtime::component::Linker;
use wasmtime::{Store, StoreLimitsBuilder};

pub use crate::manifest::{Grants, PublishGrants, WasiGrant, WasiGrants};
pub use bindings::MAX_RESOURCES;
pub use bindings::{Event, HandleError, HostState, OutgoingEvent, Request, Response};
pub use cache::{CacheLocation, ComponentCache};
pub use canary::CanaryPolicy;
pub use component::{LoadError, LoadedComponent};
pub use deadline::DeadlineExceeded;
pub use engine::{CALL_THREAD_STACK, DEFAULT_STACK_BYTES, EPOCH_TICK, Engine, MAX_STACK_BYTES, MAX_TABLE_ELEMENTS};
pub use outputs::Output;
pub use quotas::{LogLimits, Quotas};
pub use shadow::{
    Change, Cost, Counts, Difference, Failure, Letter, Replayed, Shadow, ShadowError, ShadowStatus, TrialOutcome,
};
pub use throttle::{CallKind, MAX_PENALTY, Throttle};
pub use versions::{NoPrevious, VersionRecord};

pub use crate::limits::{DEFAULT_BURST, DEFAULT_CPU_PERCENT, DEFAULT_MAX_QUERIES};

use call::{Warm, past_burst};

use crate::clock::Clock;
use crate::state::{StateRead, StateStore, StoreError, TimerChange, Txn, TxnLimits, Write};

/// Why a call into a component failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The component returned a WIT-level error.
    #[error("component error: {0:?}")]
    Handle(HandleError),
    /// The instance trapped (panic, time budget, memory limit, ...); it was
    /// thrown away.
    #[error("component trapped: {0}")]
    Trap(String),
    /// A version under canary watch failed; the event is retried, on the
    /// previous version once the watch rolls back.
    #[error("new version failed during its canary: {0}")]
    Canary(String),
    /// This failure rolled the new version back: the event is retried on
    /// the restored version, and this try does not count as an attempt.
    #[error("new version {0}")]
    RolledBack(String),
    /// Committing the call's state writes failed; nothing was applied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The component's earlier faults hold its queries back for this long
    /// (see [`Throttle`]); nothing ran.
    #[error("throttled for {0:?} after its faults")]
    Throttled(std::time::Duration),
}

impl CallError {
    /// Whether retrying the same event may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CallError::Handle(HandleError::Permanent(_)) | CallError::Store(StoreError::Refused(_)))
    }
}

/// What a successful `handle` call produced, nothing of it committed yet.
#[derive(Debug, Clone)]
pub struct Called {
    /// The events it emitted, checked, in emission order.
    pub outputs: Vec<Output>,
    /// The state writes, in key order.
    pub writes: Vec<Write>,
    /// The timer changes, in call order (`set_by` not yet filled in).
    pub timers: Vec<TimerChange>,
    /// The version (sha256) that handled the event.
    pub version: String,
}

/// Resource bounds of every call into a component (its Wasm stack is its
/// engine's: [`Engine::with_stack`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget of one call, waits in the host included.
    pub timeout: std::time::Duration,
    /// Linear memory limit of one instance.
    pub memory_bytes: usize,
    /// Events one instance handles before a fresh one replaces it (1: a
    /// fresh instance per event).
    pub instance_reuse: u32,
    /// State writes and timers one `handle` call may make.
    pub txn: TxnLimits,
    /// Queries run at once; more wait their turn.
    pub max_queries: usize,
    /// How long a call runs at full speed before [`Limits::cpu_percent`]
    /// applies to it.
    pub burst: std::time::Duration,
    /// Share of one core (percent) that the component's calls past their
    /// burst, and its faulty calls, get ([`Throttle`]); 100: unthrottled.
    pub cpu_percent: u32,
    /// Log lines its calls may write ([`Quotas`]).
    pub log: LogLimits,
    /// What it may keep in total: state keys and bytes, timers, outbox.
    pub state: crate::state::StateLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_secs(1),
            memory_bytes: 64 << 20,
            instance_reuse: 1,
            txn: TxnLimits::default(),
            max_queries: DEFAULT_MAX_QUERIES,
            burst: DEFAULT_BURST,
            cpu_percent: DEFAULT_CPU_PERCENT,
            log: LogLimits::default(),
            state: crate::state::StateLimits::default(),
        }
    }
}

/// Wasm instances one store may create: a component's core modules and
/// the adapters between them.
const MAX_INSTANCES: usize = 16;

/// Linear memories one store may create.
const MAX_MEMORIES: usize = 4;

/// Wasm tables one store may create.
const MAX_TABLES: usize = 16;

/// One service: its current component version, its state and its bounds.
pub struct ServiceRuntime {
    name: Arc<str>,
    engine: Engine,
    current: RwLock<Arc<LoadedComponent>>,
    /// The versions reloads replaced, newest last, at most [`MAX_PREVIOUS`].
    previous: std::sync::Mutex<Vec<Arc<LoadedComponent>>>,
    history: std::sync::Mutex<Vec<VersionRecord>>,
    canary: canary::Canary,
    store: Arc<dyn StateStore>,
    config: Arc<HashMap<String, String>>,
    clock: Arc<dyn Clock>,
    /// What guests measure deadlines by (the wall clock until set).
    deadlines: RwLock<Arc<dyn Clock>>,
    limits: Limits,
    /// What the component may publish and which WASI capabilities it gets.
    grants: Grants,
    /// Serializes handling (a batch of the pipeline's executor), timer
    /// settling and version switches: each reads and writes the shared
    /// state, so two at once could interleave a read-modify-write.
    handle_lock: tokio::sync::Mutex<()>,
    /// Queries running at once, at most [`Limits::max_queries`]; a permit
    /// is held until the query's thread is done with it.
    queries: Arc<tokio::sync::Semaphore>,
    /// The threads queries run on, one per permit.
    query_threads: pool::GuestPool,
    /// The share of a core the component gets past its burst or failing.
    throttle: Arc<Throttle>,
    /// Its log and state quotas.
    quotas: Arc<Quotas>,
    /// The instance kept for the next `handle` call, if reused.
    warm: std::sync::Mutex<Option<Warm>>,
    /// Instances kept for the next queries, if reused: one per query
    /// thread at most (each query takes one out while it runs).
    warm_queries: std::sync::Mutex<Vec<Warm>>,
    /// Time spent in each stage of the data path.
    stages: crate::status::Stages,
    /// The card vault, for a component granted it.
    vault: std::sync::OnceLock<Arc<crate::vault::Vault>>,
    /// The event types' schemas its outputs are checked against.
    schemas: std::sync::OnceLock<Arc<crate::schemas::Schemas>>,
    /// The contracts between the components, which a reload must keep.
    contracts: std::sync::OnceLock<Arc<crate::contracts::ContractBook>>,
    /// The shadow run on, or the last one.
    shadow: std::sync::Mutex<Option<Arc<Shadow>>>,
    /// How its shadow runs go.
    shadow_settings: RwLock<crate::manifest::ShadowSettings>,
}

/// What a [`ServiceRuntime`] is built from.
pub struct ServiceSpec {
    pub name: String,
    pub component: LoadedComponent,
    pub store: Arc<dyn StateStore>,
    pub config: HashMap<String, String>,
    pub clock: Arc<dyn Clock>,
    pub limits: Limits,
    pub canary: CanaryPolicy,
    /// Checked by [`ServiceRuntime::reload`]; the caller checks the first
    /// version ([`LoadedComponent::check_grants`]).
    pub grants: Grants,
}

impl ServiceRuntime {
    /// A runtime serving `spec.component`.
    pub fn new(engine: Engine, spec: ServiceSpec) -> Self {
        let query_threads = pool::GuestPool::new(&spec.name, spec.limits.max_queries);
        Self {
            name: spec.name.into(),
            engine,
            history: std::sync::Mutex::new(vec![VersionRecord {
                sha256: spec.component.sha256.clone(),
                source: spec.component.path.display().to_string(),
                at_ms: spec.clock.now_ms(),
                outcome: "serving".into(),
                pause_ms: None,
            }]),
            current: RwLock::new(Arc::new(spec.component)),
            previous: std::sync::Mutex::new(Vec::new()),
            canary: canary::Canary::new(spec.canary),
            store: spec.store.clone(),
            config: Arc::new(spec.config),
            deadlines: RwLock::new(spec.clock.clone()),
            clock: spec.clock,
            limits: spec.limits,
            grants: spec.grants,
            handle_lock: tokio::sync::Mutex::new(()),
            queries: Arc::new(tokio::sync::Semaphore::new(spec.limits.max_queries)),
            query_threads,
            throttle: Arc::new(Throttle::new(spec.limits.cpu_percent)),
            quotas: Arc::new(Quotas::new(spec.store.clone(), spec.limits.log, spec.limits.state)),
            warm: std::sync::Mutex::new(None),
            warm_queries: std::sync::Mutex::new(Vec::new()),
            stages: crate::status::Stages::default(),
            vault: std::sync::OnceLock::new(),
            schemas: std::sync::OnceLock::new(),
            contracts: std::sync::OnceLock::new(),
            shadow: std::sync::Mutex::new(None),
            shadow_settings: RwLock::new(crate::manifest::ShadowSettings::default()),
        }
    }

    /// Time spent in each stage of this service's data path.
    pub fn stages(&self) -> &crate::status::Stages {
        &self.stages
    }

    /// What holds the component back while it misbehaves.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// The component's log and state quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Takes the handling lock from a thread outside the async runtime (the
    /// pipeline's executor).
    pub fn serial_blocking(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.handle_lock.blocking_lock()
    }

    /// Takes the handling lock: what changes the state outside a batch
    /// (a timer's settlement) waits for the batch in flight, and a version
    /// switch for both.
    pub async fn serial(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.handle_lock.lock().await
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version currently serving.
    pub fn current(&self) -> Arc<LoadedComponent> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The service's state store (read by tests and tools).
    pub fn state_store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Gives the component the host's card vault, if it is granted it (see
    /// [`Grants::vault`]); a granted component without one finds the vault
    /// unavailable. Set once, before it serves.
    pub fn set_vault(&self, vault: Arc<crate::vault::Vault>) {
        let _ = self.vault.set(vault);
    }

    /// Checks every output's data against its event type's schema in
    /// `schemas` before the commit (an output that does not match fails its
    /// event for good). Set once, before it serves.
    pub fn set_schemas(&self, schemas: Arc<crate::schemas::Schemas>) {
        let _ = self.schemas.set(schemas);
    }

    /// Checks every reload against the contracts of `book` (and keeps it
    /// up to date with the version serving).
    pub fn set_contracts(&self, book: Arc<crate::contracts::ContractBook>) {
        let _ = self.contracts.set(book);
    }

    /// Sets how its shadow runs go (the manifest's `shadow` block).
    pub fn set_shadow_settings(&self, settings: crate::manifest::ShadowSettings) {
        *self.shadow_settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    /// How its shadow runs go.
    pub fn shadow_settings(&self) -> crate::manifest::ShadowSettings {
        self.shadow_settings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Gives guests `deadlines` as the clock their deadlines are measured
    /// by (see [`crate::deadlines`]).
    pub fn set_deadline_clock(&self, deadlines: Arc<dyn Clock>) {
        *self.deadlines.write().unwrap_or_else(std::sync::PoisonError::into_inner) = deadlines;
    }

    fn parts(&self, view: Arc<dyn StateRead>, read_only: bool) -> StoreParts {
        StoreParts {
            name: self.name.clone(),
            view,
            config: self.config.clone(),
            clock: self.clock.clone(),
            deadlines: self.deadlines.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            limits: self.limits,
            wasi: self.grants.wasi,
            vault: if self.grants.vault { self.vault.get().cloned() } else { None },
            throttle: self.throttle.clone(),
            quotas: self.quotas.clone(),
            read_only,
        }
    }
}

/// What a call's store is made from; sendable to the thread that runs it.
#[derive(Clone)]
struct StoreParts {
    name: Arc<str>,
    view: Arc<dyn StateRead>,
    config: Arc<HashMap<String, String>>,
    clock: Arc<dyn Clock>,
    deadlines: Arc<dyn Clock>,
    limits: Limits,
    wasi: WasiGrants,
    /// The vault, for a component granted it.
    vault: Option<Arc<crate::vault::Vault>>,
    throttle: Arc<Throttle>,
    quotas: Arc<Quotas>,
    read_only: bool,
}

impl StoreParts {
    fn store(self, engine: &Engine) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .memories(MAX_MEMORIES)
            .tables(MAX_TABLES)
            .build();
        let txn = match self.read_only {
            true => Txn::read_only(self.view),
            false => Txn::with_limits(self.view, self.limits.txn).with_quota(self.quotas.state.clone()),
        };
        let deadline = Instant::now() + self.limits.timeout;
        let mut state =
            HostState::new(self.name, txn, self.config, self.clock, self.deadlines, limits, deadline, self.wasi);
        state.throttle = Some(self.throttle);
        state.quotas = Some(self.quotas);
        state.vault = self.vault;
        let mut store = Store::new(engine.wasmtime(), state);
        store.limiter(|s| &mut s.limits);
        // The first epoch check comes at the end of the burst; from then on,
        // one every tick ends the call at its deadline and throttles it.
        store.set_epoch_deadline(engine.ticks_for(self.limits.burst.min(self.limits.timeout)));
        store.epoch_deadline_callback(past_burst);
        store
    }

    /// Instantiates `component` once, to refuse a version that cannot start.
    fn instantiate(self, engine: &Engine, component: LoadedComponent) -> Result<LoadedComponent, LoadError> {
        let _busy = engine.busy();
        let mut store = self.store(engine);
        match component.pre.instantiate(&mut store) {
            Ok(_) => Ok(component),
            Err(err) => Err(LoadError::World {
                path: component.path.clone(),
                message: format!("instantiation failed: {err:#}"),
            }),
        }
    }
}

/// Builds the linker every component is checked against.
fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    deadline::bound_waits(&mut linker)?;
    bindings::Service::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

#[cfg(test)]
mod grants_tests;
#[cfg(test)]
mod limits_tests;
#[cfg(test)]
pub(crate) mod tests;
