//! Canary watch after a reload: the first events on a new version decide
//! whether it stays. Too many failures among them and the host rolls back to
//! the version it replaced.

use std::sync::{Arc, Mutex, PoisonError};

use super::LoadedComponent;

/// How a new version is judged.
#[derive(Debug, Clone, Copy)]
pub struct CanaryPolicy {
    /// Events watched after a reload.
    pub events: u32,
    /// Failures (errors or traps) among them that trigger a rollback.
    pub max_failures: u32,
}

impl Default for CanaryPolicy {
    fn default() -> Self {
        Self { events: 20, max_failures: 3 }
    }
}

/// What one outcome says about the version that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Handled.
    Ok,
    /// The version's own fault: a trap, a timeout, a retryable error, or a
    /// permanent error on a record the previous version handles.
    Failed,
    /// Says nothing about the version (the store failed, or the record is
    /// refused by the previous version too): not counted at all.
    Ignored,
}

/// What the watch concluded from one outcome.
pub enum Verdict {
    /// No watch, or the event ran on another version.
    Unwatched,
    /// Still watching.
    Watching,
    /// The new version handled its quota of events: it stays.
    Passed,
    /// Too many failures: serve `previous` again.
    RollBack { previous: Arc<LoadedComponent>, failures: u32, seen: u32 },
}

struct Watch {
    candidate: String,
    previous: Arc<LoadedComponent>,
    seen: u32,
    failures: u32,
}

/// The watch over the latest reload, if any.
pub struct Canary {
    policy: CanaryPolicy,
    watch: Mutex<Option<Watch>>,
}

impl Canary {
    pub fn new(policy: CanaryPolicy) -> Self {
        Self { policy, watch: Mutex::new(None) }
    }

    /// Starts watching `candidate`, which replaced `previous`.
    pub fn start(&self, candidate: &str, previous: Arc<LoadedComponent>) {
        let watch = Watch { candidate: candidate.to_owned(), previous, seen: 0, failures: 0 };
        *self.watch.lock().unwrap_or_else(PoisonError::into_inner) = Some(watch);
    }

    /// Ends the watch, if any (an operator chose the version to serve).
    pub fn stop(&self) {
        *self.watch.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The version `version` replaced, if `version` is under watch.
    pub fn previous_of(&self, version: &str) -> Option<Arc<LoadedComponent>> {
        let guard = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().filter(|w| w.candidate == version).map(|w| w.previous.clone())
    }

    /// Records one outcome of `version`.
    pub fn observe(&self, version: &str, observation: Observation) -> Verdict {
        let mut guard = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(watch) = guard.as_mut().filter(|w| w.candidate == version) else { return Verdict::Unwatched };
        match observation {
            Observation::Ignored => return Verdict::Watching,
            Observation::Ok => watch.seen += 1,
            Observation::Failed => {
                watch.seen += 1;
                watch.failures += 1;
            }
        }
        if watch.failures >= self.policy.max_failures {
            let (failures, seen) = (watch.failures, watch.seen);
            let previous = watch.previous.clone();
            *guard = None;
            return Verdict::RollBack { previous, failures, seen };
        }
        if watch.seen - watch.failures >= self.policy.events {
            *guard = None;
            return Verdict::Passed;
        }
        Verdict::Watching
    }
}
