//! The Wasm runtime: one engine, each component compiled and pre-instantiated
//! once, and a fresh store and instance per call so that a trap never leaks
//! into the next event.

mod bindings;
mod cache;
mod canary;
mod deadline;
mod engine;
mod grants;
mod guest_text;
mod pool;
mod quotas;
mod stderr;
mod throttle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Store, StoreContextMut, StoreLimitsBuilder, Trap, UpdateDeadline};

pub use crate::manifest::{Grants, PublishGrants, WasiGrant, WasiGrants};
pub use bindings::MAX_RESOURCES;
pub use bindings::{Event, HandleError, HostState, OutgoingEvent, Request, Response};
pub use cache::{CacheLocation, ComponentCache};
pub use canary::CanaryPolicy;
pub use deadline::DeadlineExceeded;
pub use engine::{CALL_THREAD_STACK, DEFAULT_STACK_BYTES, EPOCH_TICK, Engine, MAX_STACK_BYTES, MAX_TABLE_ELEMENTS};
pub use quotas::{LogLimits, Quotas};
pub use throttle::{CallKind, MAX_PENALTY, Throttle};

pub use crate::limits::{DEFAULT_BURST, DEFAULT_CPU_PERCENT, DEFAULT_MAX_QUERIES};

use crate::clock::Clock;
use crate::state::{
    Commit, OutboxRecord, StateRead, StateStore, StoreError, StoreReader, TimerChange, Txn, TxnLimits, Write,
};
use crate::status::Stage;

/// A component that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read component {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path:?} is not a valid Wasm component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path:?} does not implement the world shop:service/service@0.2.0: {message}")]
    World { path: PathBuf, message: String },
    #[error("{path:?} is refused by its grants: {message}")]
    Ungranted { path: PathBuf, message: String },
}

/// A compiled, pre-instantiated version of a component.
pub struct LoadedComponent {
    pre: bindings::ServicePre<HostState>,
    /// Hex sha256 of the component bytes: the version shown everywhere.
    pub sha256: String,
    /// Where the bytes came from.
    pub path: PathBuf,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
}

impl LoadedComponent {
    /// Compiles `bytes` and checks them against the world.
    ///
    /// # Errors
    /// [`LoadError::Compile`] for bytes that are not a component,
    /// [`LoadError::World`] for a component with the wrong imports or exports.
    pub fn from_bytes(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let cached = engine.cache().and_then(|cache| cache.get(engine.wasmtime(), &sha256));
        let from_cache = cached.is_some();
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(engine.wasmtime(), bytes)
                    .map_err(|err| LoadError::Compile { path: path.to_owned(), message: format!("{err:#}") })?;
                if let Some(cache) = engine.cache() {
                    cache.put(&sha256, &component);
                }
                component
            }
        };
        let world = |err: wasmtime::Error| LoadError::World { path: path.to_owned(), message: format!("{err:#}") };
        let pre = engine.linker().instantiate_pre(&component).map_err(world)?;
        let pre = bindings::ServicePre::new(pre).map_err(world)?;
        Ok(Self { pre, sha256, path: path.to_owned(), loaded_at: SystemTime::now(), from_cache })
    }

    /// Checks the component's imports against `grants` (its WASI
    /// capabilities and the vault).
    ///
    /// # Errors
    /// [`LoadError::Ungranted`] naming the first import that needs a
    /// capability not granted, or one the host does not offer.
    pub fn check_grants(&self, engine: &Engine, grants: impl Into<Grants>) -> Result<(), LoadError> {
        let grants: Grants = grants.into();
        grants
            .check_imports(self.pre.instance_pre().component(), engine.wasmtime())
            .map_err(|message| LoadError::Ungranted { path: self.path.clone(), message })
    }

    /// Reads and loads a component file.
    ///
    /// # Errors
    /// As [`LoadedComponent::from_bytes`], plus [`LoadError::Read`].
    pub fn from_file(engine: &Engine, path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        Self::from_bytes(engine, path, &bytes)
    }
}

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
#[derive(Debug)]
pub struct Called {
    /// The records to publish, as `wrap` made them from the emitted events.
    pub records: Vec<OutboxRecord>,
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

/// Innermost guest frames named in a trap's message.
const MAX_TRAP_FRAMES: usize = 4;

/// How long past its deadline a query's caller waits for it before
/// answering that it timed out (the query's thread ends it soon after).
const QUERY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// An instance kept between `handle` calls ([`Limits::instance_reuse`]).
struct Warm {
    component: Arc<LoadedComponent>,
    store: Store<HostState>,
    instance: bindings::Service,
    calls: u32,
}

/// What a query runs on: an instance an earlier query left, or a new one.
enum QueryStart {
    Kept(Warm),
    Fresh(StoreParts),
}

/// One entry of a service's version history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionRecord {
    /// Hex sha256 of the bytes offered.
    pub sha256: String,
    /// Where the bytes came from (a path, or `admin upload`).
    pub source: String,
    /// When the load was attempted, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `serving`, `replaced`, or why it was rejected or rolled back.
    pub outcome: String,
    /// For a switch: how long event processing paused (waiting for the
    /// event in flight, then swapping), in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
}

/// Most entries kept in a service's version history.
const MAX_HISTORY: usize = 32;

/// Versions kept, compiled, to roll back to (the ones the last reloads
/// replaced, newest last).
const MAX_PREVIOUS: usize = 4;

/// No earlier version is kept to roll back to.
#[derive(Debug, thiserror::Error)]
#[error("no earlier version of {0} is kept to roll back to (only the versions replaced by reloads since start are)")]
pub struct NoPrevious(pub String);

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

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version currently serving.
    pub fn current(&self) -> Arc<LoadedComponent> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Every version loaded or refused, oldest first (at most 32).
    pub fn history(&self) -> Vec<VersionRecord> {
        self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn record(&self, record: VersionRecord) {
        let mut history = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if record.outcome == "serving" {
            for entry in history.iter_mut().filter(|e| e.outcome == "serving") {
                entry.outcome = "replaced".into();
            }
        }
        history.push(record);
        let excess = history.len().saturating_sub(MAX_HISTORY);
        history.drain(..excess);
    }

    /// Replaces the serving version with `bytes`.
    ///
    /// The new version is compiled on a blocking thread, checked against the
    /// world and instantiated once before anything changes. The switch waits
    /// for the event in flight, which finishes on the old version; every
    /// later event runs on the new one. State carries over untouched.
    ///
    /// # Errors
    /// [`LoadError`] when the bytes do not compile, do not implement the
    /// world, or do not instantiate; the old version keeps serving.
    pub async fn reload(&self, source: &str, bytes: Vec<u8>) -> Result<Arc<LoadedComponent>, LoadError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let at_ms = self.clock.now_ms();
        let path = PathBuf::from(source);
        let engine = self.engine.clone();
        let trial = self.parts(Arc::new(StoreReader(self.store.clone())), true);
        let grants = self.grants.clone();
        // Compiled and tried on a thread of its own: the trial instantiation
        // runs guest code (with the stack a guest gets), and compiling takes
        // a core for a while.
        let (reply, checked) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("reload-{}", self.name))
            .stack_size(CALL_THREAD_STACK)
            .spawn(move || {
                let checked = LoadedComponent::from_bytes(&engine, &path, &bytes)
                    .and_then(|component| component.check_grants(&engine, grants).map(|()| component))
                    .and_then(|component| trial.instantiate(&engine, component));
                let _ = reply.send(checked);
            });
        let checked = match spawned {
            Ok(_) => checked.await.unwrap_or_else(|_| {
                Err(LoadError::Compile { path: source.into(), message: "the reload thread failed".into() })
            }),
            Err(err) => Err(LoadError::Compile { path: source.into(), message: format!("no reload thread: {err}") }),
        };
        let component = match checked {
            Ok(component) => Arc::new(component),
            Err(err) => {
                tracing::warn!(component = %self.name, %sha256, "reload rejected: {err}");
                self.record(VersionRecord {
                    sha256,
                    source: source.into(),
                    at_ms,
                    outcome: format!("rejected: {err}"),
                    pause_ms: None,
                });
                return Err(err);
            }
        };
        let pause = Instant::now();
        let _serial = self.handle_lock.lock().await;
        let previous = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            component.clone(),
        );
        self.canary.start(&sha256, previous.clone());
        // The new version does not pay for the old one's faults.
        self.throttle.forgive();
        let mut kept = self.previous.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.push(previous);
        let excess = kept.len().saturating_sub(MAX_PREVIOUS);
        kept.drain(..excess);
        drop(kept);
        let pause_ms = Some(pause.elapsed().as_secs_f64() * 1000.0);
        self.record(VersionRecord {
            sha256: sha256.clone(),
            source: source.into(),
            at_ms,
            outcome: "serving".into(),
            pause_ms,
        });
        tracing::info!(component = %self.name, version = %sha256, "reloaded");
        Ok(component)
    }

    /// The version a rollback would restore, if one is kept.
    pub fn previous(&self) -> Option<Arc<LoadedComponent>> {
        self.previous.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last().cloned()
    }

    /// Serves again the version the last reload replaced (an operator's
    /// rollback), once the event in flight is done; the version serving
    /// until then is dropped, and a canary watch ends. State carries over.
    ///
    /// # Errors
    /// [`NoPrevious`] when no reload replaced a version since start (or
    /// every version kept was rolled back to already).
    pub async fn roll_back(&self) -> Result<Arc<LoadedComponent>, NoPrevious> {
        let at_ms = self.clock.now_ms();
        let pause = Instant::now();
        let _serial = self.handle_lock.lock().await;
        let restored = self
            .previous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .ok_or_else(|| NoPrevious(self.name.to_string()))?;
        let replaced = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            restored.clone(),
        );
        self.canary.stop();
        self.throttle.forgive();
        {
            let mut history = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(entry) =
                history.iter_mut().rev().find(|e| e.sha256 == replaced.sha256 && e.outcome == "serving")
            {
                entry.outcome = "rolled back by an operator".into();
            }
        }
        self.record(VersionRecord {
            sha256: restored.sha256.clone(),
            source: format!("rollback from {}", replaced.sha256),
            at_ms,
            outcome: "serving".into(),
            pause_ms: Some(pause.elapsed().as_secs_f64() * 1000.0),
        });
        tracing::warn!(component = %self.name, version = %restored.sha256, replaced = %replaced.sha256, "rolled back by an operator");
        Ok(restored)
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

    /// Refuses an event whose outputs would go past the component's
    /// outbox quota (its entries wait there until the broker has them).
    fn outbox_room(&self, outgoing: &[OutgoingEvent]) -> Result<(), String> {
        match (outgoing.is_empty(), self.quotas.state.usage()) {
            (false, Some(usage)) => self.quotas.state.check(crate::state::Quota::Outbox, usage.outbox, 1),
            _ => Ok(()),
        }
    }

    fn trap(&self, err: wasmtime::Error) -> CallError {
        let timed_out = matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt))
            || err.downcast_ref::<DeadlineExceeded>().is_some();
        if timed_out {
            return self.timed_out();
        }
        let Some(trap) = err.downcast_ref::<Trap>() else {
            return CallError::Trap(format!("{err:#}"));
        };
        // The trap and the innermost frames, not the whole backtrace: a
        // stack overflow has thousands, and the reason goes into logs and
        // dead-letter headers.
        let mut message = trap.to_string();
        if let Some(backtrace) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
            let frames: Vec<&str> =
                backtrace.frames().iter().take(MAX_TRAP_FRAMES).map(|f| f.func_name().unwrap_or("?")).collect();
            if !frames.is_empty() {
                let more = if backtrace.frames().len() > MAX_TRAP_FRAMES { " …" } else { "" };
                message.push_str(&format!(" (in {}{more})", frames.join(" ← ")));
            }
        }
        CallError::Trap(message)
    }

    fn timed_out(&self) -> CallError {
        CallError::Trap(format!("exceeded its time budget of {:?}", self.limits.timeout))
    }

    /// Calls the component's `handle` on a fresh instance, reading `view`,
    /// and lets `wrap` turn what it emitted into records (given the events
    /// and the version). The call commits nothing: the pipeline owns
    /// deduplication, the commit and the outbox (the runtime writes to the
    /// store only after the fact, in [`Self::settle_timer`] and
    /// [`Self::published`]). The outcome feeds the
    /// canary watch of a freshly reloaded version. Runs the guest on the
    /// calling thread: call it from a thread outside the async runtime.
    ///
    /// # Errors
    /// [`CallError::Handle`] for the component's own error or a `wrap`
    /// failure (permanent), [`CallError::Trap`] when the instance trapped,
    /// [`CallError::Canary`] for a failure of a version under watch.
    pub fn call(
        &self,
        event: &Event,
        view: Arc<dyn StateRead>,
        wrap: impl FnOnce(&[OutgoingEvent], &str) -> Result<Vec<OutboxRecord>, String>,
    ) -> Result<Called, CallError> {
        let _busy = self.engine.busy();
        let component = self.current();
        let trial_view = view.clone();
        let started = Instant::now();
        let kept = self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let mut warm = match kept.filter(|w| Arc::ptr_eq(&w.component, &component)) {
            Some(mut warm) => {
                let state = warm.store.data_mut();
                state.txn = Txn::with_limits(view, self.limits.txn).with_quota(self.quotas.state.clone());
                state.deadline = Instant::now() + self.limits.timeout;
                warm.store.set_epoch_deadline(self.engine.ticks_for(self.limits.burst.min(self.limits.timeout)));
                warm
            }
            None => {
                let mut store = self.parts(view, false).store(&self.engine);
                let instance = self.stages.time(Stage::Instantiate, || component.pre.instantiate(&mut store));
                match instance {
                    Ok(instance) => Warm { component: component.clone(), store, instance, calls: 0 },
                    Err(err) => {
                        let busy = started.elapsed().saturating_sub(store.data().idle);
                        drop(store);
                        self.throttle.charge(CallKind::Handle, started, busy);
                        return self.judge(&component, canary::Observation::Failed, Err(self.trap(err)));
                    }
                }
            }
        };
        warm.calls += 1;
        let result = self.stages.time(Stage::Call, || warm.instance.call_handle(&mut warm.store, event));
        let state = warm.store.data_mut();
        let idle = std::mem::take(&mut state.idle);
        let last_stderr = state.stderr.as_ref().and_then(|stderr| stderr.drain_to_log(&self.name));
        state.over_burst = None;
        let txn = &mut state.txn;
        // A guest that went on after a cap refused it must not commit the
        // part it was allowed: the event fails for good, with the reason.
        let exceeded = txn.exceeded().map(|reason| format!("the call went past a limit: {reason}"));
        let limited = exceeded.is_some();
        let changes = txn.take_changes();
        let result = match (result, exceeded) {
            (Ok(Ok(_)), Some(reason)) => Ok(Err(HandleError::Permanent(reason))),
            (result, _) => result,
        };
        let outcome = match result {
            // An event the component may not publish fails it for good.
            Ok(Ok(outgoing)) => {
                let checked = self.grants.publishes.check(&outgoing).and_then(|()| self.outbox_room(&outgoing));
                match checked.and_then(|()| wrap(&outgoing, &component.sha256)) {
                    Ok(records) => {
                        let (writes, timers) = changes;
                        Ok(Called { records, writes, timers, version: component.sha256.clone() })
                    }
                    Err(reason) => Err(CallError::Handle(HandleError::Permanent(reason))),
                }
            }
            Ok(Err(err)) => Err(CallError::Handle(err)),
            Err(err) => match err.downcast::<bindings::LimitExceeded>() {
                Ok(limit) => Err(CallError::Handle(HandleError::Permanent(limit.to_string()))),
                Err(err) => Err(self.trap(err)),
            },
        };
        // A trapped instance cannot be entered again; one that returned,
        // ok or error, serves the next event if reuse allows.
        // (Ended for a limit, it did not return either.)
        let trapped = matches!(outcome, Err(CallError::Trap(_))) || limited;
        let outcome = outcome.map_err(|err| with_stderr(err, last_stderr));
        if !trapped && warm.calls < self.limits.instance_reuse {
            *self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(warm);
        } else if trapped {
            // Freeing what the call made (its memory, its refused writes)
            // is part of what it cost.
            drop(warm);
            self.throttle.charge(CallKind::Handle, started, started.elapsed().saturating_sub(idle));
        }
        let observation = self.observe(&component, &outcome, event, &trial_view);
        self.judge(&component, observation, outcome)
    }

    /// What `outcome` says about `component` under canary watch. A
    /// permanent error is the new version's fault only if the version it
    /// replaced handles the same event on the same state (a trial call whose
    /// writes and outputs are discarded); a record both refuse is bad input.
    fn observe<T>(
        &self,
        component: &LoadedComponent,
        outcome: &Result<T, CallError>,
        event: &Event,
        view: &Arc<dyn StateRead>,
    ) -> canary::Observation {
        match outcome {
            Ok(_) => canary::Observation::Ok,
            Err(CallError::Store(_)) => canary::Observation::Ignored,
            Err(CallError::Handle(HandleError::Permanent(_))) => {
                let Some(previous) = self.canary.previous_of(&component.sha256) else {
                    return canary::Observation::Ignored;
                };
                let _busy = self.engine.busy();
                let mut store = self.parts(view.clone(), false).store(&self.engine);
                let handled = previous
                    .pre
                    .instantiate(&mut store)
                    .and_then(|instance| instance.call_handle(&mut store, event))
                    .is_ok_and(|result| result.is_ok());
                if handled { canary::Observation::Failed } else { canary::Observation::Ignored }
            }
            Err(_) => canary::Observation::Failed,
        }
    }

    /// Removes a timer that fired, or moves it to `retry_at_ms`, unless it
    /// was cancelled or set again meanwhile. Serialized with `handle`; one
    /// commit, conditional on that very instance still being set (checked by
    /// the store at commit, so a cancel on another host in between wins).
    ///
    /// # Errors
    /// The store's.
    pub async fn settle_timer(&self, timer: &crate::state::Timer, retry_at_ms: Option<u64>) -> Result<(), StoreError> {
        let _serial = self.handle_lock.lock().await;
        let now_ms = self.clock.now_ms();
        let fired = Some((timer.id.clone(), timer.nonce));
        let timers = match retry_at_ms {
            Some(at_ms) => {
                let moved = crate::state::Timer { at_ms, nonce: crate::state::new_nonce(), ..timer.clone() };
                vec![crate::state::TimerChange::Set(moved)]
            }
            None => Vec::new(),
        };
        let commit = Commit { fired, timers, now_ms, ..Commit::default() };
        // The store's calls block (a durable commit waits for its fsync, a
        // database for its round trips): not on an async worker.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || match store.commit(commit) {
            // Cancelled or set again meanwhile: nothing left to settle.
            Err(StoreError::Conflict(_)) => Ok(crate::state::Durable::done()),
            committed => committed,
        })
        .await
        .map_err(|err| StoreError::Unavailable(format!("commit thread failed: {err}")))??
        .wait()
        .await
    }

    /// Forgets the outbox entry of `source` once its records were
    /// acknowledged. A failure only means they may be published again.
    pub fn published(&self, source: &str) {
        if let Err(err) = self.store.clear_outbox(source) {
            tracing::warn!(component = %self.name, %source, "cannot clear the outbox entry: {err}");
        }
    }

    /// Feeds an outcome to the canary watch, rolling back if it says so.
    /// Failures of a watched version are made retryable so that the event
    /// is tried again, on the restored version after a rollback.
    fn judge<T>(
        &self,
        component: &LoadedComponent,
        observation: canary::Observation,
        outcome: Result<T, CallError>,
    ) -> Result<T, CallError> {
        match self.canary.observe(&component.sha256, observation) {
            canary::Verdict::Unwatched => outcome,
            // Only the version's own faults become canary failures (retried).
            canary::Verdict::Watching if observation != canary::Observation::Failed => outcome,
            canary::Verdict::Watching => outcome.map_err(|err| CallError::Canary(err.to_string())),
            canary::Verdict::Passed => {
                tracing::info!(component = %self.name, version = %component.sha256, "new version passed its canary");
                outcome
            }
            canary::Verdict::RollBack { previous, failures, seen } => {
                let err = outcome.err().map(|e| e.to_string()).unwrap_or_default();
                let reason = format!("rolled back after {failures} failures in its first {seen} events; last: {err}");
                tracing::warn!(component = %self.name, version = %component.sha256, restored = %previous.sha256, "{reason}");
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = previous.clone();
                self.throttle.forgive();
                // The restored version is no longer one to roll back to.
                let mut kept = self.previous.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if kept.last().is_some_and(|last| Arc::ptr_eq(last, &previous)) {
                    kept.pop();
                }
                drop(kept);
                let mut history = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for entry in history.iter_mut().rev() {
                    if entry.sha256 == component.sha256 && entry.outcome == "serving" {
                        entry.outcome = reason.clone();
                    } else if entry.sha256 == previous.sha256 && entry.outcome == "replaced" {
                        entry.outcome = "serving".into();
                        break;
                    }
                }
                Err(CallError::RolledBack(reason))
            }
        }
    }

    /// Runs `query` on a fresh instance with a read-only view of the state,
    /// on one of the service's query threads, at most
    /// [`Limits::max_queries`] at once.
    ///
    /// # Errors
    /// [`CallError::Trap`] when the instance traps or runs out of time.
    pub async fn query(&self, request: &Request) -> Result<Response, CallError> {
        let permit = self.queries.clone().acquire_owned().await.map_err(|e| CallError::Trap(e.to_string()))?;
        if let Some(left) = self.throttle.wait_left(CallKind::Query) {
            if left > self.limits.timeout {
                return Err(CallError::Throttled(left));
            }
            tokio::time::sleep(left).await;
        }
        let component = self.current();
        let view: Arc<dyn StateRead> = Arc::new(StoreReader(self.store.clone()));
        // A query is read-only, so an instance that answered one may answer
        // the next as `handle`'s does (`instance_reuse`): a fresh instance
        // per query cost the order service's query threads a fifth of the
        // host's CPU while the page polled (instantiating, then zeroing and
        // unmapping its memory).
        let kept = self.warm_queries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let start = match kept.filter(|w| Arc::ptr_eq(&w.component, &component)) {
            Some(mut warm) => {
                let state = warm.store.data_mut();
                state.txn = Txn::read_only(view);
                state.deadline = Instant::now() + self.limits.timeout;
                warm.store.set_epoch_deadline(self.engine.ticks_for(self.limits.burst.min(self.limits.timeout)));
                QueryStart::Kept(warm)
            }
            None => QueryStart::Fresh(self.parts(view, true)),
        };
        let engine = self.engine.clone();
        let request = request.clone();
        let (throttle, name, reuse) = (self.throttle.clone(), self.name.clone(), self.limits.instance_reuse);
        let result = self.query_threads.run(move || {
            let _permit = permit;
            let _busy = engine.busy();
            let started = Instant::now();
            let mut warm = match start {
                QueryStart::Kept(warm) => warm,
                QueryStart::Fresh(parts) => {
                    let mut store = parts.store(&engine);
                    match component.pre.instantiate(&mut store) {
                        Ok(instance) => Warm { component, store, instance, calls: 0 },
                        Err(err) => {
                            let idle = store.data().idle;
                            drop(store);
                            throttle.charge(CallKind::Query, started, started.elapsed().saturating_sub(idle));
                            return (Err(err), None, None);
                        }
                    }
                }
            };
            warm.calls += 1;
            let result = warm.instance.call_query(&mut warm.store, &request);
            let state = warm.store.data_mut();
            let idle = std::mem::take(&mut state.idle);
            state.over_burst = None;
            let last_stderr = state.stderr.as_ref().and_then(|stderr| stderr.drain_to_log(&name));
            // A trapped instance cannot be entered again; freeing it is
            // part of what the failed query cost.
            let keep = result.is_ok() && warm.calls < reuse;
            if result.is_err() {
                drop(warm);
                throttle.charge(CallKind::Query, started, started.elapsed().saturating_sub(idle));
                return (result, last_stderr, None);
            }
            (result, last_stderr, keep.then_some(warm))
        });
        let result = async {
            let (result, last_stderr, warm) = result.await?;
            if let Some(warm) = warm {
                self.warm_queries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(warm);
            }
            Ok::<_, tokio::sync::oneshot::error::RecvError>((result, last_stderr))
        };
        // The deadline ends the call on its thread; waiting a little longer
        // only covers a host wait that overran it, so that the caller
        // answers in bounded time whatever happens there.
        match tokio::time::timeout(self.limits.timeout + QUERY_GRACE, result).await {
            Ok(Ok((result, last_stderr))) => result.map_err(|err| with_stderr(self.trap(err), last_stderr)),
            Ok(Err(_)) => Err(CallError::Trap("the query thread failed".into())),
            Err(_) => Err(self.timed_out()),
        }
    }
}

/// What a call's store is made from; sendable to the thread that runs it.
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

/// A trap's message with the last lines of the call's stderr: a Rust
/// guest's panic message, what the trap alone does not say.
fn with_stderr(err: CallError, last_stderr: Option<String>) -> CallError {
    match (err, last_stderr) {
        (CallError::Trap(message), Some(lines)) => CallError::Trap(format!("{message}; its stderr: {lines}")),
        (err, _) => err,
    }
}

/// The epoch check of a call past its burst: ends it at its deadline, and
/// until then lets it run one tick in every few (see [`Throttle`]).
fn past_burst(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = ctx.data_mut();
    let now = Instant::now();
    if now >= state.deadline {
        return Ok(UpdateDeadline::Interrupt);
    }
    if let Some(throttle) = &state.throttle {
        if state.over_burst.is_none() {
            state.over_burst = Some(throttle.over_burst());
        }
        let pause = throttle.pause_per_tick().min(state.deadline - now);
        if !pause.is_zero() {
            std::thread::sleep(pause);
            throttle.slept(pause);
            state.idle += pause;
        }
    }
    Ok(UpdateDeadline::Continue(1))
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
