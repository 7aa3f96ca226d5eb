//! The candidate's thread: runs each event (and query) the serving version
//! handled on the candidate, with the serving call's reads and clock
//! readings replayed, compares, and keeps the counts. Nothing it does
//! leaves the thread: its transaction is dropped, its outputs compared.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::super::call::{Checks, Warm, conclude, trap_error, with_stderr};
use super::super::{
    CALL_THREAD_STACK, CallError, CallKind, Called, Engine, Event, LoadedComponent, Quotas, Request, Response,
    ServiceRuntime, StoreParts, Throttle,
};
use super::{Cost, Difference, Failure, Reads, Replay, Shadow, Tape, diff, thread_cpu};
use crate::manifest::{Grants, ShadowSettings};
use crate::state::{StateRead, StoreReader, Txn};

/// What the serving version handled, for the candidate to handle again.
pub(super) enum Job {
    Handle(Box<Handled>),
    Query { request: Box<Request>, serving: Box<Response>, cost: Cost },
}

/// An event the serving version handled: what it read, the clock
/// readings it took, what it did and what that cost.
pub(super) struct Handled {
    pub event: Event,
    pub reads: Reads,
    pub tape: Tape,
    pub serving: Called,
    pub cost: Cost,
}

/// A candidate version and what its calls are made of: the serving
/// version's bounds and grants, a throttle and quotas of its own.
pub(in crate::runtime) struct Candidate {
    component: Arc<LoadedComponent>,
    engine: Engine,
    parts: StoreParts,
    store: Arc<dyn crate::state::StateStore>,
    grants: Grants,
    schemas: Option<Arc<crate::schemas::Schemas>>,
    timeout: Duration,
    throttle: Arc<Throttle>,
    /// The instance kept for the next event, if reused.
    warm: std::sync::Mutex<Option<Warm>>,
}

impl ServiceRuntime {
    /// `component` as a candidate of this service, its calls made of
    /// `parts` ([`ServiceRuntime::candidate_parts`]).
    pub(in crate::runtime) fn candidate_of(&self, component: Arc<LoadedComponent>, parts: StoreParts) -> Candidate {
        Candidate {
            component,
            engine: self.engine.clone(),
            throttle: parts.throttle.clone(),
            parts,
            store: self.store.clone(),
            grants: self.grants.clone(),
            schemas: self.schemas.get().cloned(),
            timeout: self.limits.timeout,
            warm: std::sync::Mutex::new(None),
        }
    }

    /// What a candidate's calls (its trial instantiation included) are made
    /// of: this service's bounds, a throttle capped as `settings` say and
    /// quotas of its own, its log lines named `{name}~shadow`.
    pub(in crate::runtime) fn candidate_parts(&self, settings: &ShadowSettings) -> StoreParts {
        let mut parts = self.parts(Arc::new(StoreReader(self.store.clone())), false);
        parts.name = format!("{}~shadow", self.name).into();
        parts.throttle = Arc::new(Throttle::new(settings.cpu_percent));
        parts.quotas = Arc::new(Quotas::new(self.store.clone(), self.limits.log, self.limits.state));
        parts
    }
}

impl Candidate {
    /// The candidate's sha256.
    pub(super) fn version(&self) -> &str {
        &self.component.sha256
    }

    /// Waits out the candidate's throttle after a fault.
    fn wait(&self, kind: CallKind) {
        if let Some(left) = self.throttle.wait_left(kind) {
            std::thread::sleep(left);
        }
    }

    /// Handles `event` reading `view`, the clock readings of `tape`
    /// replayed, on the instance the last event left (as the serving
    /// version reuses its own, up to `instance_reuse`) or a fresh one;
    /// nothing it does is kept.
    pub(super) fn handle(
        &self,
        event: &Event,
        view: Arc<dyn StateRead>,
        tape: Option<Tape>,
    ) -> (Result<Called, CallError>, Cost) {
        self.wait(CallKind::Handle);
        let _busy = self.engine.busy();
        let started = Instant::now();
        let mut warm = match self.instance(view) {
            Ok(warm) => warm,
            Err(err) => {
                self.throttle.charge(CallKind::Handle, started, started.elapsed());
                return (Err(trap_error(err, self.timeout)), Cost::one(started.elapsed(), Duration::ZERO));
            }
        };
        warm.calls += 1;
        warm.store.data_mut().tape = tape.map(Tape::replaying);
        // CPU from the call on, as the serving call's is measured.
        let cpu = thread_cpu();
        let result = warm.instance.call_handle(&mut warm.store, event);
        let state = warm.store.data_mut();
        let idle = std::mem::take(&mut state.idle);
        state.over_burst = None;
        let last_stderr = state.stderr.as_ref().and_then(|stderr| stderr.drain_to_log(&self.parts.name));
        let checks = Checks { grants: &self.grants, schemas: self.schemas.as_deref(), timeout: self.timeout };
        let (outcome, limited) = conclude(result, &mut state.txn, &checks, |_| Ok(()), &self.component.sha256);
        let trapped = limited || matches!(outcome, Err(CallError::Trap(_)));
        if trapped {
            drop(warm);
            self.throttle.charge(CallKind::Handle, started, started.elapsed().saturating_sub(idle));
        } else if warm.calls < self.parts.limits.instance_reuse {
            *self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(warm);
        }
        let cost = Cost::one(started.elapsed(), thread_cpu().saturating_sub(cpu));
        (outcome.map_err(|err| with_stderr(err, last_stderr)), cost)
    }

    /// The instance the last call left, reading `view` now, or a fresh one.
    fn instance(&self, view: Arc<dyn StateRead>) -> wasmtime::Result<Warm> {
        let limits = self.parts.limits;
        if let Some(mut warm) = self.warm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let state = warm.store.data_mut();
            state.txn = Txn::with_limits(view, limits.txn).with_quota(self.parts.quotas.state.clone());
            state.deadline = Instant::now() + limits.timeout;
            warm.store.set_epoch_deadline(self.engine.ticks_for(limits.burst.min(limits.timeout)));
            return Ok(warm);
        }
        let mut parts = self.parts.clone();
        parts.view = view;
        let mut store = parts.store(&self.engine);
        let instance = self.component.pre.instantiate(&mut store)?;
        Ok(Warm { component: self.component.clone(), store, instance, calls: 0 })
    }

    /// Answers `request` on a fresh instance with a read-only view of the
    /// state as it is now.
    fn query(&self, request: &Request) -> (Result<Response, CallError>, Cost) {
        self.wait(CallKind::Query);
        let _busy = self.engine.busy();
        let (started, cpu) = (Instant::now(), thread_cpu());
        let mut parts = self.parts.clone();
        parts.read_only = true;
        let mut store = parts.store(&self.engine);
        store.data_mut().txn = Txn::read_only(Arc::new(StoreReader(self.store.clone())));
        let instance = self.component.pre.instantiate(&mut store);
        let result = instance.and_then(|instance| instance.call_query(&mut store, request));
        let idle = std::mem::take(&mut store.data_mut().idle);
        drop(store);
        let outcome = result.map_err(|err| trap_error(err, self.timeout));
        if outcome.is_err() {
            self.throttle.charge(CallKind::Query, started, started.elapsed().saturating_sub(idle));
        }
        (outcome, Cost::one(started.elapsed(), thread_cpu().saturating_sub(cpu)))
    }
}

/// Starts the candidate's thread; it ends with the run.
///
/// # Errors
/// The thread could not be started.
pub(super) fn start(candidate: Candidate, shadow: Arc<Shadow>, queue: Receiver<Job>) -> std::io::Result<()> {
    let name = format!("shadow-{}", shadow.component);
    std::thread::Builder::new()
        .name(name)
        .stack_size(CALL_THREAD_STACK)
        .spawn(move || run(&candidate, &shadow, &queue))
        .map(|_| ())
}

fn run(candidate: &Candidate, shadow: &Shadow, queue: &Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        if !shadow.active() {
            break;
        }
        match job {
            Job::Handle(handled) => {
                let Handled { event, reads, tape, serving, cost } = *handled;
                let view = Arc::new(Replay { reads, store: StoreReader(candidate.store.clone()) });
                let (outcome, spent) = candidate.handle(&event, view, Some(tape));
                let verdict = match outcome {
                    Ok(called) => {
                        let (changes, more) = diff::calls(&serving, &called, &shadow.settings.ignore);
                        Verdict::of(changes, more, || event_difference(&event))
                    }
                    Err(err) => Verdict::Failed(failure(&event, &err)),
                };
                shadow.record(false, verdict, cost, spent);
            }
            Job::Query { request, serving, cost } => {
                let (outcome, spent) = candidate.query(&request);
                let verdict = match outcome {
                    Ok(answer) => {
                        let (changes, more) = diff::answers(&serving, &answer, &shadow.settings.ignore);
                        Verdict::of(changes, more, || query_difference(&request))
                    }
                    Err(err) => Verdict::Failed(Failure {
                        event_id: format!("{} {}", request.method, request.path),
                        event_type: "query".into(),
                        key: None,
                        reason: err.to_string(),
                    }),
                };
                shadow.record(true, verdict, cost, spent);
            }
        }
    }
    tracing::debug!(component = %shadow.component, candidate = candidate.version(), "shadow thread ended");
}

/// How the candidate's try compared.
pub(super) enum Verdict {
    Equal,
    Differs(Difference),
    Failed(Failure),
}

impl Verdict {
    fn of(changes: Vec<diff::Change>, more: usize, input: impl FnOnce() -> Difference) -> Self {
        if changes.is_empty() {
            return Verdict::Equal;
        }
        Verdict::Differs(Difference { changes, more, ..input() })
    }
}

fn event_difference(event: &Event) -> Difference {
    Difference {
        kind: "event",
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        key: event.key.clone(),
        input: diff::bounded(diff::as_json(&event.payload)),
        changes: Vec::new(),
        more: 0,
    }
}

fn query_difference(request: &Request) -> Difference {
    Difference {
        kind: "query",
        id: format!("{} {}", request.method, request.path),
        event_type: "query".into(),
        key: None,
        input: diff::bounded(diff::as_json(&request.body)),
        changes: Vec::new(),
        more: 0,
    }
}

pub(super) fn failure(event: &Event, err: &CallError) -> Failure {
    Failure {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        key: event.key.clone(),
        reason: err.to_string(),
    }
}

impl Shadow {
    /// Counts one comparison; ends the run on a failure or difference if
    /// told to, and asks for promotion once it has earned it.
    fn record(&self, query: bool, verdict: Verdict, serving: Cost, candidate: Cost) {
        let keep = self.settings.keep;
        let mut stats = self.stats();
        if !query {
            stats.serving.add(serving);
            stats.candidate.add(candidate);
        }
        let bad = !matches!(verdict, Verdict::Equal);
        let counts = if query { &mut stats.queries } else { &mut stats.events };
        counts.compared += 1;
        match verdict {
            Verdict::Equal => counts.equal += 1,
            Verdict::Differs(difference) => {
                counts.differing += 1;
                if stats.differences.len() < keep {
                    stats.differences.push(difference);
                }
            }
            Verdict::Failed(failure) => {
                counts.candidate_failed += 1;
                if stats.failures.len() < keep {
                    stats.failures.push(failure);
                }
            }
        }
        drop(stats);
        if bad && self.settings.stop_on_failure {
            self.end("the candidate failed or differed (stop_on_failure)");
        } else if self.ready_to_promote() {
            self.promote.notify_waiters();
        }
    }
}
