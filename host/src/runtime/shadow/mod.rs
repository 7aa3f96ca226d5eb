//! Shadow runs: a candidate version handles the events (and queries) the
//! serving version handles, after it and on the same input, and the host
//! compares what both did before anyone promotes the candidate.
//!
//! The serving call is recorded while a run is on ([`Taping`]): the state
//! it read (and, for the keys it wrote without reading, what they held
//! before) and every reading it took of its clocks. The candidate runs on
//! a thread of its own ([`worker`]) with exactly those reads and readings
//! replayed, over a throw-away transaction: its outputs, writes and timers
//! are compared ([`diff`]) and dropped, never published, committed or
//! scheduled. A key the serving call neither read nor wrote is read from
//! the store when the candidate runs. The candidate's CPU is capped by a
//! throttle of its own; when it falls behind, events are skipped (counted),
//! never queued against the serving version.

mod diff;
mod replay;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use diff::{Change, Difference};
pub use replay::{Letter, Replayed, TrialOutcome};

use super::{Called, Event, LoadError, LoadedComponent, Request, Response, ServiceRuntime};
use crate::clock::Clock;
use crate::manifest::ShadowSettings;
use crate::state::{StateRead, StoreError, StoreReader};

/// Which clock a guest read.
#[derive(Debug, Clone, Copy)]
pub enum Reading {
    Clock,
    Deadlines,
}

/// The clock readings of one call: recorded from the serving call, then
/// replayed to the candidate in the same order (past the recorded ones,
/// the last reading again), so that a timestamp the versions derive from
/// "now" is the same in both.
#[derive(Debug, Default, Clone)]
pub struct Tape {
    readings: [Vec<u64>; 2],
    replaying: bool,
    next: [usize; 2],
}

impl Tape {
    /// A tape recording what the call reads.
    pub fn recording() -> Self {
        Self::default()
    }

    /// This tape, replayed from its first reading.
    pub fn replaying(self) -> Self {
        Self { readings: self.readings, replaying: true, next: [0, 0] }
    }

    /// A reading of `which`, taken from `clock` (and recorded) or replayed.
    pub fn read(&mut self, which: Reading, clock: &dyn Clock) -> u64 {
        let i = which as usize;
        if !self.replaying {
            let now = clock.now_ms();
            self.readings[i].push(now);
            return now;
        }
        let at = self.next[i];
        self.next[i] += 1;
        match self.readings[i].get(at).or_else(|| self.readings[i].last()) {
            Some(now) => *now,
            None => clock.now_ms(),
        }
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to fill in.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) } == 0;
    match ok {
        true => Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0)),
        false => Duration::ZERO,
    }
}

/// What the serving call read, as it read it.
#[derive(Debug, Default, Clone)]
struct Reads {
    values: BTreeMap<String, Option<Vec<u8>>>,
    listings: BTreeMap<(String, usize), Vec<String>>,
}

/// The serving call's view, recording each first read.
struct Recording {
    inner: Arc<dyn StateRead>,
    reads: Mutex<Reads>,
}

impl StateRead for Recording {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.inner.get(key)?;
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        reads.values.entry(key.to_owned()).or_insert_with(|| value.clone());
        Ok(value)
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let keys = self.inner.keys(prefix, limit)?;
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        reads.listings.entry((prefix.to_owned(), limit)).or_insert_with(|| keys.clone());
        Ok(keys)
    }
}

/// The candidate's view: what the serving call read, else the store now.
struct Replay {
    reads: Reads,
    store: StoreReader,
}

impl StateRead for Replay {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.reads.values.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.store.get(key),
        }
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        match self.reads.listings.get(&(prefix.to_owned(), limit)) {
            Some(keys) => Ok(keys.clone()),
            None => self.store.keys(prefix, limit),
        }
    }
}

/// One serving call under a shadow run.
pub(super) struct Taping {
    shadow: Arc<Shadow>,
    recording: Arc<Recording>,
}

impl Taping {
    /// `view` recorded if `shadow` is on and samples this event.
    pub(super) fn begin(shadow: Option<Arc<Shadow>>, view: Arc<dyn StateRead>) -> (Arc<dyn StateRead>, Option<Self>) {
        let Some(shadow) = shadow.filter(|s| s.sample()) else { return (view, None) };
        let recording = Arc::new(Recording { inner: view, reads: Mutex::new(Reads::default()) });
        (recording.clone(), Some(Self { shadow, recording }))
    }

    /// Hands the serving call's input and outcome to the candidate.
    pub(super) fn submit(self, event: &Event, called: &Called, tape: Option<Tape>, took: Duration, cpu: Duration) {
        let mut reads = std::mem::take(&mut *self.recording.reads.lock().unwrap_or_else(PoisonError::into_inner));
        // A key written without being read: the candidate sees what it
        // held before, not the serving version's write.
        for (key, _) in &called.writes {
            if !reads.values.contains_key(key) {
                match self.recording.inner.peek(key) {
                    Ok(value) => reads.values.insert(key.clone(), value),
                    // Without it the candidate would read the serving
                    // version's own write: not compared, counted.
                    Err(_) => return self.shadow.skipped(false),
                };
            }
        }
        let serving = Called {
            outputs: called.outputs.clone(),
            writes: called.writes.clone(),
            timers: called.timers.clone(),
            version: called.version.clone(),
        };
        let job = worker::Job::Handle(Box::new(worker::Handled {
            event: event.clone(),
            reads,
            tape: tape.unwrap_or_default(),
            serving,
            cost: Cost::one(took, cpu),
        }));
        self.shadow.submit(job);
    }
}

/// Calls made and what they took.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Cost {
    pub calls: u64,
    #[serde(serialize_with = "micros")]
    pub time: Duration,
    #[serde(serialize_with = "micros")]
    pub cpu: Duration,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Cost {
    fn one(time: Duration, cpu: Duration) -> Self {
        Self { calls: 1, time, cpu }
    }

    fn add(&mut self, other: Cost) {
        self.calls += other.calls;
        self.time += other.time;
        self.cpu += other.cpu;
    }
}

/// The counts of a run.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counts {
    /// Compared: equal + differing + candidate_failed.
    pub compared: u64,
    pub equal: u64,
    pub differing: u64,
    pub candidate_failed: u64,
    /// Not compared: the candidate was behind (its queue full).
    pub skipped: u64,
}

/// A candidate's failure on an event (or query) the serving version handled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub event_id: String,
    pub event_type: String,
    pub key: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default)]
struct Stats {
    events: Counts,
    queries: Counts,
    serving: Cost,
    candidate: Cost,
    differences: Vec<Difference>,
    failures: Vec<Failure>,
}

/// A shadow run's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShadowStatus {
    pub component: String,
    /// The candidate: its sha256 and where its bytes came from.
    pub candidate: String,
    pub source: String,
    /// The version serving when the run began.
    pub serving: String,
    pub started_at_ms: u64,
    /// `running`, or why it ended.
    pub state: String,
    pub events: Counts,
    pub queries: Counts,
    /// Both versions' calls on the events compared: calls, total time and
    /// CPU in microseconds.
    pub cost: BTreeMap<&'static str, Cost>,
    /// The first differences (at most `settings.keep`).
    pub differences: Vec<Difference>,
    /// The candidate's first failures (at most `settings.keep`).
    pub failures: Vec<Failure>,
    pub settings: ShadowSettings,
}

/// One shadow run of a component.
pub struct Shadow {
    component: String,
    candidate: Arc<LoadedComponent>,
    bytes: Vec<u8>,
    source: String,
    serving: String,
    started_at_ms: u64,
    settings: ShadowSettings,
    seen: AtomicU64,
    active: AtomicBool,
    ended: Mutex<Option<String>>,
    stats: Mutex<Stats>,
    jobs: Mutex<Option<std::sync::mpsc::SyncSender<worker::Job>>>,
    /// Told when the run asks to be promoted ([`ShadowSettings::promote_after`]).
    promote: tokio::sync::Notify,
}

impl Shadow {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the run is on.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether this event is one of the sampled ones.
    fn sample(&self) -> bool {
        self.seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(u64::from(self.settings.every))
    }

    fn submit(&self, job: worker::Job) {
        let sender = self.jobs.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let query = matches!(job, worker::Job::Query { .. });
        if sender.is_none_or(|jobs| jobs.try_send(job).is_err()) {
            self.skipped(query);
        }
    }

    /// Counts an event (or query) not compared.
    fn skipped(&self, query: bool) {
        let mut stats = self.stats();
        match query {
            true => stats.queries.skipped += 1,
            false => stats.events.skipped += 1,
        }
    }

    /// Ends the run (the first reason given stays); the worker stops.
    pub fn end(&self, reason: &str) {
        self.active.store(false, Ordering::Release);
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).take();
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if ended.is_none() {
            tracing::info!(component = %self.component, candidate = %self.candidate.sha256, "shadow run ended: {reason}");
            *ended = Some(reason.to_owned());
        }
        drop(ended);
        self.promote.notify_waiters();
    }

    /// Waits until the run asks to be promoted; `false` if it ended first.
    pub async fn promotion_asked(&self) -> bool {
        loop {
            let asked = self.promote.notified();
            if !self.active() {
                return false;
            }
            if self.ready_to_promote() {
                return true;
            }
            asked.await;
        }
    }

    fn ready_to_promote(&self) -> bool {
        let stats = self.stats();
        let n = self.settings.promote_after;
        let clean = |c: &Counts| c.differing == 0 && c.candidate_failed == 0;
        n > 0 && stats.events.equal >= n && clean(&stats.events) && clean(&stats.queries)
    }

    /// The run's report.
    pub fn status(&self) -> ShadowStatus {
        let stats = self.stats();
        let state = match &*self.ended.lock().unwrap_or_else(PoisonError::into_inner) {
            None => "running".to_owned(),
            Some(reason) => format!("ended: {reason}"),
        };
        ShadowStatus {
            component: self.component.clone(),
            candidate: self.candidate.sha256.clone(),
            source: self.source.clone(),
            serving: self.serving.clone(),
            started_at_ms: self.started_at_ms,
            state,
            events: stats.events,
            queries: stats.queries,
            cost: BTreeMap::from([("serving", stats.serving), ("candidate", stats.candidate)]),
            differences: stats.differences.clone(),
            failures: stats.failures.clone(),
            settings: self.settings.clone(),
        }
    }
}

/// Why a shadow command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("no shadow run of {0} is on (a host restart ends one: its state is not kept)")]
    None(String),
    #[error("promoting the candidate failed: {0}")]
    Promote(LoadError),
    #[error("{0}")]
    Trial(String),
}

impl ServiceRuntime {
    /// The shadow run on, if any.
    pub fn shadowing(&self) -> Option<Arc<Shadow>> {
        self.shadow.lock().unwrap_or_else(PoisonError::into_inner).clone().filter(|s| s.active())
    }

    /// The run on, or else the last one (ended), if any.
    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Starts a shadow run of `bytes` (compiled, checked against the world
    /// and the grants, instantiated once, as a reload would) under the
    /// service's shadow settings, ending the one on, if any.
    ///
    /// # Errors
    /// [`ShadowError::Load`] when the candidate would not load.
    pub async fn start_shadow(&self, source: &str, bytes: Vec<u8>) -> Result<Arc<Shadow>, ShadowError> {
        let settings = self.shadow_settings();
        let parts = self.candidate_parts(&settings);
        let candidate = Arc::new(self.compile(source, bytes.clone(), parts.clone()).await?);
        let (jobs, queue) = std::sync::mpsc::sync_channel(settings.queue);
        let shadow = Arc::new(Shadow {
            component: self.name.to_string(),
            candidate: candidate.clone(),
            bytes,
            source: source.to_owned(),
            serving: self.current().sha256.clone(),
            started_at_ms: self.clock.now_ms(),
            settings,
            seen: AtomicU64::new(0),
            active: AtomicBool::new(true),
            ended: Mutex::new(None),
            stats: Mutex::new(Stats::default()),
            jobs: Mutex::new(Some(jobs)),
            promote: tokio::sync::Notify::new(),
        });
        worker::start(self.candidate_of(candidate, parts), shadow.clone(), queue)
            .map_err(|err| ShadowError::Trial(format!("cannot start the candidate's thread: {err}")))?;
        let previous = self.shadow.lock().unwrap_or_else(PoisonError::into_inner).replace(shadow.clone());
        if let Some(previous) = previous {
            previous.end("replaced by another shadow run");
        }
        tracing::info!(component = %self.name, candidate = %shadow.candidate.sha256, %source, "shadow run started");
        Ok(shadow)
    }

    /// Ends the run on, and returns its report.
    ///
    /// # Errors
    /// [`ShadowError::None`] when no run is on.
    pub fn stop_shadow(&self) -> Result<ShadowStatus, ShadowError> {
        let shadow = self.shadowing().ok_or_else(|| ShadowError::None(self.name.to_string()))?;
        shadow.end("stopped by an operator");
        Ok(shadow.status())
    }

    /// Serves the candidate of the run on (an ordinary reload, under the
    /// canary watch), and ends the run.
    ///
    /// # Errors
    /// [`ShadowError::None`] when no run is on, [`ShadowError::Promote`]
    /// when the reload fails (the run goes on).
    pub async fn promote_shadow(&self) -> Result<ShadowStatus, ShadowError> {
        let shadow = self.shadowing().ok_or_else(|| ShadowError::None(self.name.to_string()))?;
        self.promote_shadow_of(&shadow).await
    }

    /// Promotes `shadow`'s candidate if that run is still the one on (a
    /// run's own promotion policy must not promote a later run).
    ///
    /// # Errors
    /// As [`ServiceRuntime::promote_shadow`]; [`ShadowError::None`] when
    /// `shadow` is no longer the run on.
    pub async fn promote_shadow_of(&self, shadow: &Arc<Shadow>) -> Result<ShadowStatus, ShadowError> {
        if !self.shadowing().is_some_and(|on| Arc::ptr_eq(&on, shadow)) {
            return Err(ShadowError::None(self.name.to_string()));
        }
        let source = format!("shadow run of {}", shadow.source);
        self.reload(&source, shadow.bytes.clone()).await.map_err(ShadowError::Promote)?;
        Ok(shadow.status())
    }

    /// Ends the run on when `serving` starts serving: promoted if it is the
    /// candidate, else compared with a version no longer serving.
    pub(super) fn end_shadow_for(&self, serving: &str) {
        if let Some(shadow) = self.shadowing() {
            match shadow.candidate.sha256 == serving {
                true => shadow.end("promoted"),
                false => shadow.end("the serving version changed (reload or rollback): start the run again"),
            }
        }
    }

    /// Hands the serving answer of a query to the candidate of the run on.
    pub(super) fn shadow_query(&self, request: &Request, answer: &Response, took: Duration) {
        let Some(shadow) = self.shadowing().filter(|s| s.settings.queries && s.sample()) else { return };
        let job = worker::Job::Query {
            request: Box::new(request.clone()),
            serving: Box::new(answer.clone()),
            cost: Cost::one(took, Duration::ZERO),
        };
        shadow.submit(job);
    }
}

#[cfg(test)]
mod tests;
