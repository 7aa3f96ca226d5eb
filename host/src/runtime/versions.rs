//! The versions of a service: hot reload, rollback and their history.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{LoadError, LoadedComponent, ServiceRuntime};
use crate::state::StoreReader;

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

impl ServiceRuntime {
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
        let trial = self.parts(Arc::new(StoreReader(self.store.clone())), true);
        let checked = self.compile(source, bytes, trial).await;
        // Checked and switched under the contracts' lock: of two reloads at
        // once, the second is checked against the first's outcome.
        let _admission = match self.contracts.get() {
            Some(book) => Some(book.admission().await),
            None => None,
        };
        let checked = checked.and_then(|component| self.admit(&component).map(|party| (component, party)));
        let (component, party) = match checked {
            Ok((component, party)) => (Arc::new(component), party),
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
        if let (Some(book), Some(party)) = (self.contracts.get(), party) {
            book.serve(&self.name, party);
        }
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
        self.end_shadow_for(&sha256);
        tracing::info!(component = %self.name, version = %sha256, "reloaded");
        Ok(component)
    }

    /// Compiles `bytes` on a thread of its own, checks the component
    /// against the world and the grants, and instantiates it once: a
    /// version that would fail to serve is refused before anything changes.
    ///
    /// # Errors
    /// [`LoadError`] naming what failed.
    /// `trial` is what its trial instantiation runs with (a candidate's
    /// own throttle and quotas, for a shadow run).
    pub(super) async fn compile(
        &self,
        source: &str,
        bytes: Vec<u8>,
        trial: super::StoreParts,
    ) -> Result<LoadedComponent, LoadError> {
        let path = PathBuf::from(source);
        let engine = self.engine.clone();
        let grants = self.grants.clone();
        // Compiled and tried on a thread of its own: the trial instantiation
        // runs guest code (with the stack a guest gets), and compiling takes
        // a core for a while.
        let checked = super::pool::on_own_thread(format!("reload-{}", self.name), move || {
            LoadedComponent::from_bytes(&engine, &path, &bytes)
                .and_then(|component| component.check_grants(&engine, grants).map(|()| component))
                .and_then(|component| trial.instantiate(&engine, component))
        });
        checked.await.unwrap_or_else(|message| Err(LoadError::Compile { path: source.into(), message }))
    }

    /// The party `component` would be to the contracts between the
    /// components, if they are kept.
    ///
    /// # Errors
    /// [`LoadError::Contract`] naming every contract it would break: each
    /// field a consumer requires that it does not publish, and the consumer.
    fn admit(&self, component: &LoadedComponent) -> Result<Option<crate::contracts::Party>, LoadError> {
        let Some(book) = self.contracts.get() else { return Ok(None) };
        book.admit(&self.name, component.contract.clone())
            .map(Some)
            .map_err(|message| LoadError::Contract { path: component.path.clone(), message })
    }

    /// `component` serves again (a rollback): the contracts say so.
    pub(super) fn restore_contract(&self, component: &LoadedComponent) {
        if let Some(book) = self.contracts.get() {
            book.restore(&self.name, component.contract.clone());
        }
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
        self.restore_contract(&restored);
        self.end_shadow_for(&restored.sha256);
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
}
