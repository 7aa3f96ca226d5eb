//! Calls into a component: `handle` on the executor's thread, queries on
//! their own threads, each bounded and judged by the canary watch.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Store, StoreContextMut, Trap, UpdateDeadline};

use super::bindings::{self, Event, HandleError, HostState, OutgoingEvent, Request, Response};
use super::{
    CallError, CallKind, Called, DeadlineExceeded, LoadedComponent, ServiceRuntime, StoreParts, canary, outputs, shadow,
};
use crate::state::{StateRead, StoreReader, Txn};
use crate::status::Stage;

/// Innermost guest frames named in a trap's message.
const MAX_TRAP_FRAMES: usize = 4;

/// How long past its deadline a query's caller waits for it before
/// answering that it timed out (the query's thread ends it soon after).
const QUERY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// An instance kept between `handle` calls ([`Limits::instance_reuse`]).
pub(super) struct Warm {
    pub(super) component: Arc<LoadedComponent>,
    pub(super) store: Store<HostState>,
    pub(super) instance: bindings::Service,
    pub(super) calls: u32,
}

/// What a query's thread sends back: the guest's answer and its last
/// stderr lines.
type QueryResult = (wasmtime::Result<Response>, Option<String>);

use tokio::sync::oneshot::error::RecvError;

/// What a query runs on: an instance an earlier query left, or a new one.
enum QueryStart {
    Kept(Warm),
    Fresh(StoreParts),
}

impl ServiceRuntime {
    /// Refuses an event whose outputs would go past the component's
    /// outbox quota (its entries wait there until the broker has them).
    fn outbox_room(&self, outgoing: &[OutgoingEvent]) -> Result<(), String> {
        match (outgoing.is_empty(), self.quotas.state.usage()) {
            (false, Some(usage)) => self.quotas.state.check(crate::state::Quota::Outbox, usage.outbox, 1),
            _ => Ok(()),
        }
    }

    /// What this service's outputs are checked against.
    pub(super) fn checks(&self) -> Checks<'_> {
        Checks { grants: &self.grants, schemas: self.schemas.get().map(|s| &**s), timeout: self.limits.timeout }
    }

    fn trap(&self, err: wasmtime::Error) -> CallError {
        trap_error(err, self.limits.timeout)
    }

    fn timed_out(&self) -> CallError {
        timed_out(self.limits.timeout)
    }

    /// Calls the component's `handle` on a fresh instance (or the one kept
    /// from the last call), reading `view`, and returns what it asked for:
    /// its outputs checked ([`outputs::check`]), its writes and timers.
    /// The call commits nothing: the pipeline owns deduplication, the
    /// envelopes, the commit and the outbox. The outcome feeds the canary
    /// watch of a freshly reloaded version. Runs the guest on the calling
    /// thread: call it from a thread outside the async runtime.
    ///
    /// # Errors
    /// [`CallError::Handle`] for the component's own error or an output
    /// the host cannot publish (permanent), [`CallError::Trap`] when the
    /// instance trapped, [`CallError::Canary`] for a failure of a version
    /// under watch.
    pub fn call(&self, event: &Event, view: Arc<dyn StateRead>) -> Result<Called, CallError> {
        let _busy = self.engine.busy();
        let component = self.current();
        let trial_view = view.clone();
        // Under a shadow run, what the call reads and the clock readings it
        // takes are kept for the candidate, which runs on the same input.
        let (view, taping) = shadow::Taping::begin(self.shadowing(), view);
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
        warm.store.data_mut().tape = taping.as_ref().map(|_| shadow::Tape::recording());
        let cpu = taping.as_ref().map(|_| shadow::thread_cpu()).unwrap_or_default();
        let result = self.stages.time(Stage::Call, || warm.instance.call_handle(&mut warm.store, event));
        let state = warm.store.data_mut();
        let idle = std::mem::take(&mut state.idle);
        let last_stderr = state.stderr.as_ref().and_then(|stderr| stderr.drain_to_log(&self.name));
        state.over_burst = None;
        let tape = state.tape.take();
        let (outcome, limited) = self.stages.time(Stage::Validate, || {
            conclude(result, &mut state.txn, &self.checks(), |outgoing| self.outbox_room(outgoing), &component.sha256)
        });
        if let (Some(taping), Ok(called)) = (taping, &outcome) {
            taping.submit(event, called, tape, started.elapsed(), shadow::thread_cpu().saturating_sub(cpu));
        }
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
                self.restore_contract(&previous);
                self.end_shadow_for(&previous.sha256);
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
        let asked = Instant::now();
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
        let asking = request.clone();
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
            let result = warm.instance.call_query(&mut warm.store, &asking);
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
            Ok::<_, RecvError>((result, last_stderr))
        };
        // The deadline ends the call on its thread; waiting a little longer
        // only covers a host wait that overran it, so that the caller
        // answers in bounded time whatever happens there.
        let outcome = tokio::time::timeout(self.limits.timeout + QUERY_GRACE, result).await;
        self.answered(outcome, request, asked)
    }

    /// A query's answer from what its thread sent back (or did not, in
    /// time); a successful one goes to the shadow run, if one is on.
    fn answered(
        &self,
        outcome: Result<Result<QueryResult, RecvError>, tokio::time::error::Elapsed>,
        request: &Request,
        asked: Instant,
    ) -> Result<Response, CallError> {
        match outcome {
            Ok(Ok((result, last_stderr))) => {
                let answer = result.map_err(|err| with_stderr(self.trap(err), last_stderr));
                if let Ok(response) = &answer {
                    self.shadow_query(request, response, asked.elapsed());
                }
                answer
            }
            Ok(Err(_)) => Err(CallError::Trap("the query thread failed".into())),
            Err(_) => Err(self.timed_out()),
        }
    }
}

/// A trap's error: a timeout, or the trap with its innermost guest frames.
pub(super) fn trap_error(err: wasmtime::Error, timeout: std::time::Duration) -> CallError {
    let timed_out_now =
        matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) || err.downcast_ref::<DeadlineExceeded>().is_some();
    if timed_out_now {
        return timed_out(timeout);
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

fn timed_out(timeout: std::time::Duration) -> CallError {
    CallError::Trap(format!("exceeded its time budget of {timeout:?}"))
}

/// What a call's outputs are checked against.
#[derive(Clone, Copy)]
pub(super) struct Checks<'a> {
    pub grants: &'a crate::manifest::Grants,
    /// The event types' schemas, if the host has them.
    pub schemas: Option<&'a crate::schemas::Schemas>,
    /// The call's time budget (a trap past it is a timeout).
    pub timeout: std::time::Duration,
}

/// What a `handle` call's `result` and its `txn` amount to: its outputs
/// checked against `grants` and `room` (the outbox quota), its writes and
/// timers; and whether it ended at a per-call limit (then its instance is
/// not entered again). A guest that went on after a cap refused it must
/// not commit the part it was allowed: the event fails for good.
pub(super) fn conclude(
    result: wasmtime::Result<Result<Vec<OutgoingEvent>, HandleError>>,
    txn: &mut Txn,
    checks: &Checks<'_>,
    room: impl FnOnce(&[OutgoingEvent]) -> Result<(), String>,
    version: &str,
) -> (Result<Called, CallError>, bool) {
    let Checks { grants, schemas, timeout } = *checks;
    let exceeded = txn.exceeded().map(|reason| format!("the call went past a limit: {reason}"));
    let limited = exceeded.is_some();
    let changes = txn.take_changes();
    let result = match (result, exceeded) {
        (Ok(Ok(_)), Some(reason)) => Ok(Err(HandleError::Permanent(reason))),
        (result, _) => result,
    };
    let outcome = match result {
        // An event the component may not publish fails it for good.
        Ok(Ok(outgoing)) => match grants
            .publishes
            .check(&outgoing)
            .and_then(|()| room(&outgoing))
            .and_then(|()| outputs::check(outgoing))
            .and_then(|outputs| match schemas {
                Some(schemas) => outputs::check_schemas(&outputs, schemas).map(|()| outputs),
                None => Ok(outputs),
            }) {
            Ok(outputs) => {
                let (writes, timers) = changes;
                Ok(Called { outputs, writes, timers, version: version.to_owned() })
            }
            Err(reason) => Err(CallError::Handle(HandleError::Permanent(reason))),
        },
        Ok(Err(err)) => Err(CallError::Handle(err)),
        Err(err) => match err.downcast::<bindings::LimitExceeded>() {
            Ok(limit) => Err(CallError::Handle(HandleError::Permanent(limit.to_string()))),
            Err(err) => Err(trap_error(err, timeout)),
        },
    };
    (outcome, limited)
}

/// A trap's message with the last lines of the call's stderr: a Rust
/// guest's panic message, what the trap alone does not say.
pub(super) fn with_stderr(err: CallError, last_stderr: Option<String>) -> CallError {
    match (err, last_stderr) {
        (CallError::Trap(message), Some(lines)) => CallError::Trap(format!("{message}; its stderr: {lines}")),
        (err, _) => err,
    }
}

/// The epoch check of a call past its burst: ends it at its deadline, and
/// until then lets it run one tick in every few (see [`Throttle`]).
pub(super) fn past_burst(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
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
