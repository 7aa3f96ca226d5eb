//! A service's executor: one thread that handles submitted records in
//! submission order, in batches. The events of a batch see each other's
//! state changes through an [`Overlay`] and are committed together, in one
//! store transaction; each one's outcome is answered once that commit is
//! applied. Guest calls and commits run here, never on the async runtime.
//!
//! An event that fails in a way that may pass is parked with the events of
//! its key that come after it (a lane), and retried after its backoff;
//! events of other keys go on meanwhile. Records of one key stay in order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Core, Disposition, TIMER_TOPIC};
use crate::bus::{Inbound, Outbound};
use crate::envelope::Envelope;
use crate::runtime::{CALL_THREAD_STACK, CallError, Event};
use crate::state::{Commit, Durable, Overlay, StoreError, Timer, TimerChange};
use crate::status::Stage;
use crate::traces::{self, TraceParent};

/// Most events committed in one store transaction. A batch is whatever
/// was queued when the executor got to it, so under light load each event
/// is its own batch and waits for nobody.
const MAX_BATCH: usize = 64;

/// How often a pause checks for shutdown.
const PAUSE_SLICE: Duration = Duration::from_millis(10);

/// Longest wait for new work while events are parked, so that shutdown is
/// noticed and retries come due on time.
const PARKED_POLL: Duration = Duration::from_millis(50);

/// What to handle.
pub(super) enum Input {
    Record(Inbound),
    Timer(Timer),
}

/// One submitted input and where its outcome goes.
pub(super) struct Job {
    pub input: Input,
    pub shutdown: CancellationToken,
    pub reply: oneshot::Sender<Option<Disposition>>,
}

/// Starts the executor thread of `core`'s service; it ends when every
/// sender is dropped.
pub(super) fn start(core: Arc<Core>) -> Sender<Job> {
    let (jobs, queue) = std::sync::mpsc::channel();
    let name = core.service.name().to_owned();
    std::thread::Builder::new()
        .name(format!("exec-{name}"))
        .stack_size(CALL_THREAD_STACK)
        .spawn(move || run(&core, &queue))
        .unwrap_or_else(|err| panic!("cannot start the executor thread of {name}: {err}"));
    jobs
}

fn run(core: &Core, queue: &Receiver<Job>) {
    let mut parked: HashMap<String, Lane> = HashMap::new();
    loop {
        // Wait for a job, or for the next parked retry to come due.
        let first = if parked.is_empty() {
            match queue.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            let next = parked.values().map(|lane| lane.retry_at).min().unwrap_or_else(Instant::now);
            match queue.recv_timeout(next.saturating_duration_since(Instant::now()).min(PARKED_POLL)) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                // Dropping the parked jobs answers them "not handled".
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut jobs: Vec<Job> = first.into_iter().collect();
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut batch = Batch::new(core);
        // Parked lanes first: their retries come due, or shutdown ends them.
        let now = Instant::now();
        let resumable: Vec<String> = parked
            .iter()
            .filter(|(_, lane)| lane.retry_at <= now || lane.jobs.front().is_some_and(|j| j.shutdown.is_cancelled()))
            .map(|(key, _)| key.clone())
            .collect();
        let resumable: Vec<(String, Lane)> =
            resumable.into_iter().filter_map(|key| parked.remove(&key).map(|lane| (key, lane))).collect();
        let ready: Vec<Ready> = jobs.into_iter().filter_map(|job| batch.prepare(job)).collect();
        batch.look_up(resumable.iter().flat_map(|(_, lane)| lane.jobs.iter()).chain(&ready));
        for (key, lane) in resumable {
            batch.resume(key, lane, &mut parked);
        }
        for ready in ready {
            let key = lane_key(&ready.event);
            match parked.get_mut(&key) {
                // Its key waits for an earlier event: it queues behind it.
                Some(lane) => lane.jobs.push_back(ready),
                None => batch.resume(key, Lane::of(ready), &mut parked),
            }
        }
        batch.flush();
    }
}

/// The events of one key waiting for the first of them to be retried:
/// records of one key stay in order, other keys go on meanwhile.
struct Lane {
    retry_at: Instant,
    jobs: VecDeque<Ready>,
}

impl Lane {
    fn of(ready: Ready) -> Self {
        Self { retry_at: Instant::now(), jobs: VecDeque::from([ready]) }
    }
}

/// A decoded input, with its attempts so far.
struct Ready {
    record: Inbound,
    envelope: Envelope,
    event: Event,
    fired: Option<(String, u64)>,
    /// The trace context it arrived with (its record's header, or the one
    /// its timer kept).
    parent: Option<TraceParent>,
    /// The context of its current attempt's span: what it emits carries it.
    trace: TraceParent,
    attempt: u32,
    shutdown: CancellationToken,
    reply: oneshot::Sender<Option<Disposition>>,
}

/// The key whose events stay in order: the order id.
fn lane_key(event: &Event) -> String {
    event.key.clone().unwrap_or_default()
}

/// What became of one input before the batch's commit.
enum Outcome {
    /// Known now: a dead letter or a duplicate.
    Now(Disposition),
    /// Handled: this commit joins the batch's.
    Commit(Commit),
}

/// How a batch's commit ended.
enum Committed {
    Done(Durable),
    /// Shutdown came while the store was unavailable.
    Abandoned,
    /// Lost a race: nothing was applied.
    Conflict(String),
    /// The store refuses it for good: nothing was applied.
    Refused(String),
}

/// An open batch: the events handled so far, committed by [`Batch::flush`].
struct Batch<'a> {
    core: &'a Core,
    /// The service's handling lock, released only while pausing.
    serial: Option<tokio::sync::MutexGuard<'a, ()>>,
    overlay: Arc<Overlay>,
    /// Each handled event's commit, with the event (handled again if the
    /// batch's commit loses a race).
    entries: Vec<(Commit, Ready)>,
    /// Shutdown of the pending events, which interrupts a failing commit.
    shutdown: Option<CancellationToken>,
    /// Which of the batch's events the store had handled when the batch
    /// began, looked up at once ([`Batch::look_up`]); `None` after a
    /// conflict, when another host may have handled any of them since.
    seen: Option<Seen>,
}

/// The batch's dedup look-up.
struct Seen {
    /// Ids looked up.
    checked: HashSet<String>,
    /// Those handled before, and those the batch committed since.
    handled: HashSet<String>,
    /// The look-up's time, shared among its events.
    per_event: Duration,
}

impl<'a> Batch<'a> {
    fn new(core: &'a Core) -> Self {
        Self {
            core,
            serial: Some(core.service.serial_blocking()),
            overlay: Overlay::new(core.service.state_store().clone()),
            entries: Vec::new(),
            shutdown: None,
            seen: None,
        }
    }

    /// Looks up at once which of `events` were handled before: one round
    /// trip for the batch instead of one per event on a database. Events
    /// committed later by this batch are added as it commits them; another
    /// host committing one meanwhile is caught by the commit (a conflict).
    fn look_up<'r>(&mut self, events: impl Iterator<Item = &'r Ready>) {
        let ids: Vec<&str> = events.map(|ready| ready.event.id.as_str()).collect();
        if ids.is_empty() {
            return;
        }
        let started = Instant::now();
        // On failure each event looks for itself (and waits for the store).
        self.seen = self.core.service.state_store().handled_among(&ids).ok().map(|handled| Seen {
            checked: ids.iter().map(|id| (*id).to_owned()).collect(),
            handled,
            per_event: started.elapsed() / u32::try_from(ids.len()).unwrap_or(u32::MAX),
        });
    }

    /// Decodes a job; an undecodable record is answered at once (dead letter).
    fn prepare(&mut self, job: Job) -> Option<Ready> {
        let core = self.core;
        let Job { input, shutdown, reply } = job;
        let decoding = Instant::now();
        let (record, envelope, fired) = match input {
            Input::Record(record)
                if record.value.as_ref().map_or(0, Vec::len)
                    > core.max_record_bytes.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                let limit = core.max_record_bytes.load(std::sync::atomic::Ordering::Relaxed);
                let size = record.value.as_ref().map_or(0, Vec::len);
                let reason =
                    format!("record of {size} bytes is larger than the limit of {limit} (kafka.max_record_bytes)");
                let _ = reply.send(Some(core.dead_letter(&record, reason, 0)));
                return None;
            }
            Input::Record(record) => match super::records::decode(&record) {
                Ok(envelope) => (record, envelope, None),
                Err(err) => {
                    let _ = reply.send(Some(core.dead_letter(&record, err, 0)));
                    return None;
                }
            },
            Input::Timer(timer) => {
                let envelope = Envelope::timer(core.service.name(), &timer, core.clock.now_ms());
                let trace = timer.traceparent.as_deref().and_then(TraceParent::parse);
                let mut headers = envelope.header_bytes(trace.as_ref());
                headers.push(("timer-id".to_owned(), timer.id.clone().into_bytes()));
                let record = Inbound {
                    topic: TIMER_TOPIC.to_owned(),
                    partition: -1,
                    offset: -1,
                    key: Some(timer.key.clone().into_bytes()),
                    value: Some(envelope.value()),
                    headers,
                };
                (record, envelope, Some((timer.id, timer.nonce)))
            }
        };
        let event = core.event(&record, &envelope);
        let parent = TraceParent::from_headers(&record.headers);
        core.service.stages().record(Stage::Decode, decoding.elapsed());
        let trace = parent.unwrap_or_else(TraceParent::random);
        Some(Ready { record, envelope, event, fired, parent, trace, attempt: 0, shutdown, reply })
    }

    /// Runs a lane's events in order until one must wait for a retry; the
    /// lane is then parked under `key` with that event first.
    fn resume(&mut self, key: String, mut lane: Lane, parked: &mut HashMap<String, Lane>) {
        while let Some(ready) = lane.jobs.pop_front() {
            if ready.shutdown.is_cancelled() && ready.attempt > 0 {
                // Interrupted while waiting to retry: it and the events
                // behind it are not handled, and no offset moves past them.
                let _ = ready.reply.send(None);
                for waiting in lane.jobs.drain(..) {
                    let _ = waiting.reply.send(None);
                }
                return;
            }
            if let Some((ready, retry_at)) = self.run(ready) {
                lane.jobs.push_front(ready);
                lane.retry_at = retry_at;
                parked.insert(key, lane);
                return;
            }
        }
    }

    /// One attempt at an input; `Some` with the time to try again if it
    /// failed in a way that may pass.
    fn run(&mut self, mut ready: Ready) -> Option<(Ready, Instant)> {
        let core = self.core;
        let span = core.span(&ready.envelope);
        ready.trace = traces::begin(&span, ready.parent);
        let _span = span.entered();
        // A fault (in this batch or before) is paid for before the next
        // call ([`crate::runtime::Throttle`]): what the batch handled so far
        // is committed, then the wait, without the handling lock.
        if let Some(left) = core.service.throttle().wait_left(crate::runtime::CallKind::Handle) {
            self.flush();
            if !self.pause(left, &ready.shutdown) {
                // Shutdown: parked as tried, so that it and the events of
                // its key behind it are answered "not handled" in order.
                ready.attempt += 1;
                return Some((ready, Instant::now()));
            }
        }
        ready.attempt += 1;
        let err = match self.attempt(&ready.event, &ready.envelope, ready.fired.as_ref(), ready.trace) {
            Ok(Outcome::Now(disposition)) => {
                let _ = ready.reply.send(Some(disposition));
                return None;
            }
            Ok(Outcome::Commit(commit)) => {
                self.overlay.record(&commit);
                self.shutdown.get_or_insert_with(|| ready.shutdown.clone());
                self.entries.push((commit, ready));
                return None;
            }
            Err(err) => err,
        };
        if let Some(metrics) = core.metrics.get() {
            metrics.failed(&err);
        }
        let reason = err.to_string();
        if matches!(err, CallError::RolledBack(_)) {
            // The try that rolled the new version back is not the event's:
            // it goes again at once, on the restored version.
            ready.attempt -= 1;
            tracing::warn!(component = core.service.name(), event_id = %ready.event.id, "{reason}; retrying on the restored version");
            return Some((ready, Instant::now()));
        }
        // The store failing says nothing about the event: it waits for
        // the store, however long, rather than being set aside.
        let store_failed = matches!(err, CallError::Store(_));
        if !err.is_retryable() || (ready.attempt >= core.retry.max_attempts && !store_failed) {
            let _ = ready.reply.send(Some(core.dead_letter(&ready.record, reason, ready.attempt)));
            return None;
        }
        let backoff = core.backoff(ready.attempt);
        tracing::warn!(component = core.service.name(), event_id = %ready.event.id, attempt = ready.attempt, ?backoff, "{reason}; retrying");
        Some((ready, Instant::now() + backoff))
    }

    /// One try: drop a duplicate or a timer no longer due, else call the
    /// component and make its commit.
    fn attempt(
        &mut self,
        event: &Event,
        envelope: &Envelope,
        fired: Option<&(String, u64)>,
        trace: TraceParent,
    ) -> Result<Outcome, CallError> {
        let core = self.core;
        let store = core.service.state_store().clone();
        if let Some((id, nonce)) = fired {
            // Timers are not in the overlay: the check must see the batch.
            self.flush();
            if store.timer(id)?.is_none_or(|t| t.nonce != *nonce) {
                // Cancelled or moved since it was found due: nothing to deliver.
                tracing::debug!(component = core.service.name(), timer = %id, "timer no longer due, skipped");
                let skipped = Disposition::Publish {
                    records: Vec::new(),
                    source: None,
                    duplicate: true,
                    durable: Durable::done(),
                };
                return Ok(Outcome::Now(skipped));
            }
        }
        if self.overlay.handled_in_batch(&event.id) {
            // A copy within the batch: its original's outbox is in the store
            // once the batch is.
            self.flush();
        }
        let handled_before = match &self.seen {
            Some(seen) if seen.checked.contains(&event.id) => {
                core.service.stages().record(Stage::Dedup, seen.per_event);
                Ok(seen.handled.contains(&event.id))
            }
            _ => {
                let dedup = Instant::now();
                let handled_before = store.was_handled(&event.id);
                core.service.stages().record(Stage::Dedup, dedup.elapsed());
                handled_before
            }
        };
        if handled_before? {
            tracing::debug!(component = core.service.name(), event_id = %event.id, "duplicate event dropped");
            let entry = store.outbox(&event.id)?;
            let (records, source) = match entry {
                Some(entry) => (entry.records.into_iter().map(Outbound::from).collect(), Some(entry.source)),
                None => (Vec::new(), None),
            };
            let durable = store.sync_point();
            return Ok(Outcome::Now(Disposition::Publish { records, source, duplicate: true, durable }));
        }
        let name = core.service.name();
        let handling = traces::stage("handle", name, &core.service.current().sha256, Some(trace)).entered();
        let called = core.service.call(event, self.overlay.clone())?;
        let outbox = core.wrap(envelope, called.outputs, &format!("{name}@{}", called.version), trace);
        drop(handling);
        let correlation = event.headers.iter().find(|(k, _)| k == "correlation-id").map(|(_, v)| v);
        let mut timers = called.timers;
        for change in &mut timers {
            if let TimerChange::Set(timer) = change {
                timer.set_by.clone_from(&event.id);
                timer.correlation_id = correlation.cloned();
                timer.traceparent = Some(trace.to_string());
            }
        }
        Ok(Outcome::Commit(Commit {
            writes: called.writes,
            timers,
            handled: Some(event.id.clone()),
            fired: fired.cloned(),
            outbox,
            now_ms: core.clock.now_ms(),
        }))
    }

    /// Commits the batch's events in one transaction and answers each.
    /// A store failure is retried until it works or shutdown; then the
    /// events are answered `None` (not handled). A conflict (something the
    /// batch read changed, or one of its events was handled elsewhere)
    /// handles the events again on fresh state, then commits that.
    fn flush(&mut self) {
        while !self.entries.is_empty() {
            match self.commit() {
                Committed::Done(durable) => {
                    self.answer(Some(&durable));
                    return;
                }
                Committed::Abandoned => {
                    self.answer(None);
                    return;
                }
                Committed::Refused(reason) => {
                    self.refused(&reason);
                    return;
                }
                Committed::Conflict(reason) => {
                    let entries = std::mem::take(&mut self.entries);
                    self.seen = None;
                    tracing::debug!(
                        component = self.core.service.name(),
                        events = entries.len(),
                        "{reason}; handling the batch again"
                    );
                    self.overlay.clear();
                    self.shutdown = None;
                    self.all_again(entries, false);
                }
            }
        }
    }

    /// One commit of the batch, retrying while the store is unavailable.
    fn commit(&mut self) -> Committed {
        let started = Instant::now();
        let reads = self.overlay.reads();
        let commits: Vec<Commit> = self.entries.iter().map(|(commit, _)| commit.clone()).collect();
        // One commit for the batch, a `commit` span for each of its events.
        let version = &self.core.service.current().sha256;
        let _spans: Vec<tracing::Span> = self
            .entries
            .iter()
            .map(|(_, ready)| traces::stage("commit", self.core.service.name(), version, Some(ready.trace)))
            .collect();
        let mut attempt = 0;
        loop {
            let commit = Instant::now();
            let committed = self.core.service.state_store().commit_batch(&commits, &reads);
            self.core.service.stages().record(Stage::Commit, commit.elapsed());
            match committed {
                Ok(durable) => {
                    tracing::trace!(component = self.core.service.name(), events = commits.len(), elapsed = ?started.elapsed(), "batch committed");
                    return Committed::Done(durable);
                }
                Err(StoreError::Conflict(reason)) => return Committed::Conflict(reason),
                Err(StoreError::Refused(reason)) => return Committed::Refused(reason),
                Err(StoreError::Unavailable(reason)) => {
                    attempt += 1;
                    let backoff = self.core.backoff(attempt);
                    tracing::error!(
                        component = self.core.service.name(),
                        events = commits.len(),
                        ?backoff,
                        "commit failed, retrying: {reason}"
                    );
                    let shutdown = self.shutdown.clone().unwrap_or_default();
                    if !self.pause(backoff, &shutdown) {
                        return Committed::Abandoned;
                    }
                }
            }
        }
    }

    /// A batch the store refuses for good (a key or id it cannot hold): its
    /// one event is dead-lettered with the reason; several are each handled
    /// again and committed alone, so that only the one at fault is set aside
    /// and no input stalls its partition.
    fn refused(&mut self, reason: &str) {
        let mut entries = std::mem::take(&mut self.entries);
        self.overlay.clear();
        self.shutdown = None;
        if entries.len() == 1
            && let Some((_, ready)) = entries.pop()
        {
            let reason = format!("the state store refuses its commit: {reason}");
            let _ = ready.reply.send(Some(self.core.dead_letter(&ready.record, reason, ready.attempt)));
            return;
        }
        self.seen = None;
        self.all_again(entries, true);
    }

    /// Handles a batch's events again, in order (each committed on its own
    /// if `alone`). An event interrupted by shutdown is answered "not
    /// handled", and so is every later event of its key: none of them may
    /// commit before it, or a redelivery would see its key out of order.
    fn all_again(&mut self, entries: Vec<(Commit, Ready)>, alone: bool) {
        let mut interrupted: HashSet<String> = HashSet::new();
        for (_, ready) in entries {
            let key = lane_key(&ready.event);
            if interrupted.contains(&key) {
                let _ = ready.reply.send(None);
                continue;
            }
            if !self.again(ready) {
                interrupted.insert(key);
            }
            if alone {
                self.flush();
            }
        }
    }

    /// Answers every event of the batch: handled if `durable`, else not.
    fn answer(&mut self, durable: Option<&Durable>) {
        if let (Some(seen), Some(_)) = (&mut self.seen, durable) {
            seen.handled.extend(self.entries.iter().filter_map(|(commit, _)| commit.handled.clone()));
        }
        for (commit, ready) in self.entries.drain(..) {
            let disposition = durable.map(|durable| {
                let source = commit.handled.filter(|_| !commit.outbox.is_empty());
                let records = commit.outbox.into_iter().map(Outbound::from).collect();
                Disposition::Publish { records, source, duplicate: false, durable: durable.clone() }
            });
            let _ = ready.reply.send(disposition);
        }
        self.overlay.clear();
        self.shutdown = None;
    }

    /// Handles an event of a conflicting batch again. Its first try did not
    /// count; if this one fails in a way that may pass, it waits here for
    /// its retry (it cannot be parked: the events after it in the batch
    /// come next). `false` if shutdown interrupted it (answered "not handled").
    fn again(&mut self, mut ready: Ready) -> bool {
        ready.attempt = ready.attempt.saturating_sub(1);
        while let Some((waiting, retry_at)) = self.run(ready) {
            let shutdown = waiting.shutdown.clone();
            if !self.pause(retry_at.saturating_duration_since(Instant::now()), &shutdown) {
                let _ = waiting.reply.send(None);
                return false;
            }
            ready = waiting;
        }
        true
    }

    /// Waits `duration` without holding the handling lock, so that a reload
    /// or a timer settlement can go meanwhile. `false` if `shutdown` came
    /// first.
    fn pause(&mut self, duration: Duration, shutdown: &CancellationToken) -> bool {
        self.serial = None;
        let until = Instant::now() + duration;
        let mut interrupted = false;
        while Instant::now() < until {
            if shutdown.is_cancelled() {
                interrupted = true;
                break;
            }
            std::thread::sleep(PAUSE_SLICE.min(until.saturating_duration_since(Instant::now())));
        }
        self.serial = Some(self.core.service.serial_blocking());
        !interrupted
    }
}
