//! The Wasm runtime: one engine, each component compiled and pre-instantiated
//! once, and a fresh store and instance per call so that a trap never leaks
//! into the next event.

mod bindings;
mod cache;
mod canary;
mod engine;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Store, StoreLimitsBuilder, Trap};

pub use bindings::{Event, HandleError, HostState, OutgoingEvent, Request, Response};
pub use cache::ComponentCache;
pub use canary::CanaryPolicy;
pub use engine::{EPOCH_TICK, Engine};

use crate::clock::Clock;
use crate::state::{Commit, Durable, OutboxEntry, OutboxRecord, StateStore, StoreError, Txn};

/// A component that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read component {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path:?} is not a valid Wasm component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path:?} does not implement the world shop:service/service@0.2.0: {message}")]
    World { path: PathBuf, message: String },
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
    /// Committing the call's state writes failed; nothing was applied.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CallError {
    /// Whether retrying the same event may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CallError::Handle(HandleError::Permanent(_)))
    }
}

/// What a successful `handle` call produced.
#[derive(Debug)]
pub struct Handled {
    /// The records to publish now, committed in the outbox: this call's, or
    /// for a duplicate those still unpublished from the first handling.
    pub outbox: Option<OutboxEntry>,
    /// The version (sha256) that handled the event; `None` for a duplicate,
    /// which was not handed to the component again.
    pub version: Option<String>,
    /// Resolves once the commit (for a duplicate: everything committed so
    /// far) is on disk; `outbox` may be published only after that.
    pub durable: Durable,
}

impl Handled {
    /// Whether the event had been handled before and was dropped.
    pub fn is_duplicate(&self) -> bool {
        self.version.is_none()
    }
}

/// Resource bounds of every call into a component.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget of one call.
    pub timeout: std::time::Duration,
    /// Linear memory limit of one instance.
    pub memory_bytes: usize,
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

/// One service: its current component version, its state and its bounds.
pub struct ServiceRuntime {
    name: Arc<str>,
    engine: Engine,
    current: RwLock<Arc<LoadedComponent>>,
    history: std::sync::Mutex<Vec<VersionRecord>>,
    canary: canary::Canary,
    store: Arc<dyn StateStore>,
    config: Arc<HashMap<String, String>>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    /// Serializes `handle` calls: each reads and writes the shared state, so
    /// two concurrent calls could interleave a read-modify-write.
    handle_lock: tokio::sync::Mutex<()>,
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
}

impl ServiceRuntime {
    /// A runtime serving `spec.component`.
    pub fn new(engine: Engine, spec: ServiceSpec) -> Self {
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
            canary: canary::Canary::new(spec.canary),
            store: spec.store,
            config: Arc::new(spec.config),
            clock: spec.clock,
            limits: spec.limits,
            handle_lock: tokio::sync::Mutex::new(()),
        }
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
        let compiled = tokio::task::spawn_blocking(move || LoadedComponent::from_bytes(&engine, &path, &bytes))
            .await
            .unwrap_or_else(|err| Err(LoadError::Compile { path: source.into(), message: err.to_string() }));
        let checked = match compiled {
            Ok(component) => self.trial_instantiate(component).await,
            Err(err) => Err(err),
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
        self.canary.start(&sha256, previous);
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

    async fn trial_instantiate(&self, component: LoadedComponent) -> Result<LoadedComponent, LoadError> {
        let mut store = self.new_store(Txn::read_only(self.store.clone()));
        match component.pre.instantiate_async(&mut store).await {
            Ok(_) => Ok(component),
            Err(err) => Err(LoadError::World {
                path: component.path.clone(),
                message: format!("instantiation failed: {err:#}"),
            }),
        }
    }

    /// The service's state store (read by tests and tools).
    pub fn state_store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    fn new_store(&self, txn: Txn) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new().memory_size(self.limits.memory_bytes).instances(4).build();
        let state = HostState::new(self.name.clone(), txn, self.config.clone(), self.clock.clone(), limits);
        let mut store = Store::new(self.engine.wasmtime(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.engine.ticks_for(self.limits.timeout));
        store.epoch_deadline_trap();
        store
    }

    fn trap(&self, err: wasmtime::Error) -> CallError {
        let message = match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => {
                format!("exceeded its time budget of {:?}", self.limits.timeout)
            }
            _ => format!("{err:#}"),
        };
        CallError::Trap(message)
    }

    /// Handles one event, effectively once.
    ///
    /// An event id already handled is not handed to the component again: the
    /// result is a duplicate carrying whatever of its outputs is still
    /// unpublished. Otherwise `handle` runs on a fresh instance and, if it
    /// returns `ok`, `wrap` turns its events into the records to publish,
    /// and one [`Commit`] stores together the state writes, the timer
    /// changes, the event id (and removal of the `fired` timer that caused
    /// it) and the records in the outbox. Wait for [`Handled::durable`],
    /// publish them, then call [`ServiceRuntime::published`].
    ///
    /// # Errors
    /// [`CallError`]; in every case nothing was committed. A `wrap` failure
    /// (the component emitted something unpublishable) is a permanent
    /// component error.
    pub async fn handle(
        &self,
        event: &Event,
        fired: Option<(String, u64)>,
        wrap: impl FnOnce(&[OutgoingEvent], &str) -> Result<Vec<OutboxRecord>, String>,
    ) -> Result<Handled, CallError> {
        let _serial = self.handle_lock.lock().await;
        if let Some((id, at_ms)) = &fired
            && self.store.timer(id)?.is_none_or(|t| t.at_ms != *at_ms)
        {
            // Cancelled or moved since it was found due: nothing to deliver.
            tracing::debug!(component = %self.name, timer = %id, "timer no longer due, skipped");
            return Ok(Handled { outbox: None, version: None, durable: Durable::done() });
        }
        if self.store.was_handled(&event.id)? {
            tracing::debug!(component = %self.name, event_id = %event.id, "duplicate event dropped");
            return Ok(Handled {
                outbox: self.store.outbox(&event.id)?,
                version: None,
                durable: self.store.sync_point(),
            });
        }
        let component = self.current();
        let mut store = self.new_store(Txn::new(self.store.clone()));
        let started = Instant::now();
        let result = async {
            let instance = component.pre.instantiate_async(&mut store).await?;
            instance.call_handle(&mut store, event).await
        }
        .await;
        tracing::trace!(component = %self.name, elapsed = ?started.elapsed(), "handle call");
        let outcome = match result {
            Ok(Ok(outgoing)) => match wrap(&outgoing, &component.sha256) {
                Ok(records) => {
                    let (writes, mut timers) = store.into_data().txn.into_changes();
                    let correlation = event.headers.iter().find(|(k, _)| k == "correlation-id").map(|(_, v)| v);
                    for change in &mut timers {
                        if let crate::state::TimerChange::Set(timer) = change {
                            timer.set_by.clone_from(&event.id);
                            timer.correlation_id = correlation.cloned();
                        }
                    }
                    let now_ms = self.clock.now_ms();
                    let handled = Some(event.id.clone());
                    let commit = Commit { writes, timers, handled, fired, outbox: records.clone(), now_ms };
                    self.store.commit(commit).map(|durable| {
                        let outbox = (!records.is_empty()).then(|| OutboxEntry {
                            source: event.id.clone(),
                            created_ms: now_ms,
                            records,
                        });
                        Handled { outbox, version: Some(component.sha256.clone()), durable }
                    })
                }
                .map_err(CallError::Store),
                Err(reason) => Err(CallError::Handle(HandleError::Permanent(reason))),
            },
            Ok(Err(err)) => Err(CallError::Handle(err)),
            Err(err) => Err(self.trap(err)),
        };
        self.judge(&component, outcome)
    }

    /// Removes a timer that fired, or moves it to `retry_at_ms`, unless it
    /// was cancelled or set again meanwhile. Serialized with `handle`.
    ///
    /// # Errors
    /// The store's.
    pub async fn settle_timer(&self, timer: &crate::state::Timer, retry_at_ms: Option<u64>) -> Result<(), StoreError> {
        let _serial = self.handle_lock.lock().await;
        if self.store.timer(&timer.id)?.as_ref() != Some(timer) {
            return Ok(());
        }
        let now_ms = self.clock.now_ms();
        let commit = match retry_at_ms {
            Some(at_ms) => Commit {
                timers: vec![crate::state::TimerChange::Set(crate::state::Timer { at_ms, ..timer.clone() })],
                now_ms,
                ..Commit::default()
            },
            None => Commit { fired: Some((timer.id.clone(), timer.at_ms)), now_ms, ..Commit::default() },
        };
        self.store.commit(commit)?.wait().await
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
    fn judge(&self, component: &LoadedComponent, outcome: Result<Handled, CallError>) -> Result<Handled, CallError> {
        match self.canary.observe(&component.sha256, outcome.is_ok()) {
            canary::Verdict::Unwatched | canary::Verdict::Watching if outcome.is_ok() => outcome,
            canary::Verdict::Unwatched => outcome,
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
                let mut history = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for entry in history.iter_mut().rev() {
                    if entry.sha256 == component.sha256 && entry.outcome == "serving" {
                        entry.outcome = reason.clone();
                    } else if entry.sha256 == previous.sha256 && entry.outcome == "replaced" {
                        entry.outcome = "serving".into();
                        break;
                    }
                }
                Err(CallError::Canary(reason))
            }
        }
    }

    /// Runs `query` on a fresh instance with a read-only view of the state.
    ///
    /// # Errors
    /// [`CallError::Trap`] when the instance traps.
    pub async fn query(&self, request: &Request) -> Result<Response, CallError> {
        let component = self.current();
        let mut store = self.new_store(Txn::read_only(self.store.clone()));
        let result = async {
            let instance = component.pre.instantiate_async(&mut store).await?;
            instance.call_query(&mut store, request).await
        }
        .await;
        result.map_err(|err| self.trap(err))
    }
}

/// Builds the linker every component is checked against.
fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::Service::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

#[cfg(test)]
pub(crate) mod tests;
