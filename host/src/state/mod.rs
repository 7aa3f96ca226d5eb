//! The state port's adapters and the unit of atomicity of the whole host.
//!
//! A store holds, per component, four things that change together:
//! the component's key-value state, the ids of the events it handled, its
//! outbox (the records its handled events emitted, kept until the broker
//! acknowledged them) and its timers. [`StateStore::commit`] applies one
//! handled event's [`Commit`] to all four atomically: that is the
//! transactional outbox. Two adapters keep it: [`durable::DurableStore`]
//! (redb, one file per host for the components it serves, fsync on commit)
//! for one host, and
//! [`postgres::PostgresStore`] (one shared database) for several;
//! [`MemoryStore`] is their in-memory twin for tests.
//!
//! A timer or outbox entry that cannot be decoded is never an error of the
//! whole store: the read that meets it moves it to the component's
//! quarantine ([`Quarantined`]: raw bytes, reason, time) and goes on without
//! it, so one bad entry cannot stop a component's timers or relay.

pub mod durable;
mod memory;
pub mod postgres;
mod quota;
mod txn;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use durable::{DurableStore, HostStore};
pub use memory::MemoryStore;
pub use postgres::{PgStores, PgTimeouts, PostgresStore};
pub use quota::{Quota, StateLimits, StateQuota, Usage};
pub use txn::{AccessError, Overlay, ReadSet, StateRead, StoreReader, Txn, TxnLimits};

thread_local! {
    /// The deadline of the guest call reading on this thread, if any.
    static READ_DEADLINE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Runs `read` (a guest call's read of its state) so that a store that
/// waits, a database that does not answer, gives up at `deadline` with
/// [`StoreError::Unavailable`] instead of holding the call past it.
pub fn read_until<T>(deadline: std::time::Instant, read: impl FnOnce() -> T) -> T {
    /// Puts the outer deadline back, also if `read` panics.
    struct Restore(Option<std::time::Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            READ_DEADLINE.set(self.0);
        }
    }
    let _restore = Restore(READ_DEADLINE.replace(Some(deadline)));
    read()
}

/// The deadline [`read_until`] set on this thread.
fn read_deadline() -> Option<std::time::Instant> {
    READ_DEADLINE.get()
}

/// A commit's durability: what it queued in the outbox may be published only
/// once [`Durable::wait`] resolved.
///
/// Every adapter returns from [`StateStore::commit_batch`] once the commit
/// is on disk (redb fsyncs each batch, PostgreSQL its WAL on commit), so
/// theirs resolve at once; the type keeps the publish-after-durable step explicit in the
/// pipeline for an adapter that makes commits durable later.
#[derive(Debug, Clone, Default)]
pub struct Durable(());

impl Durable {
    /// Already durable.
    pub fn done() -> Self {
        Self(())
    }

    /// Waits until the commit is on disk.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it can no longer become durable;
    /// nothing it queued may then be published. (No adapter defers
    /// durability today, so none returns this.)
    pub async fn wait(self) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`Durable::wait`] for synchronous callers.
    ///
    /// # Errors
    /// As [`Durable::wait`].
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        futures::executor::block_on(self.wait())
    }
}

/// Largest key a component may write, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value a component may write, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// A state store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve the request now.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A commit lost a race: something it read changed since, or its event
    /// was handled meanwhile (by another host). Nothing was applied; the
    /// events must be handled again on fresh state.
    #[error("commit conflict: {0}")]
    Conflict(String),
    /// The store can never take this request, however often it is tried:
    /// a key or id it cannot hold (see [`hostile`]), or a database error
    /// that no retry passes. Nothing was applied; the event is dead-lettered.
    #[error("refused by the state store: {0}")]
    Refused(String),
}

/// Longest id the store keeps (a handled event id, a timer id), in bytes.
pub const MAX_ID_BYTES: usize = MAX_KEY_BYTES;

/// Why `text` (a key, of at most `max` bytes, or an id) can be stored by no
/// adapter: empty, too long, or holding NUL (PostgreSQL's text cannot).
/// Every adapter refuses the same texts, so a component behaves the same
/// on all three.
pub fn hostile(what: &str, text: &str, max: usize) -> Option<String> {
    if text.is_empty() || text.len() > max {
        return Some(format!("{what} length must be 1..={max} bytes, not {}", text.len()));
    }
    text.contains('\0').then(|| format!("{what} {text:?} contains NUL"))
}

/// [`hostile`] as the store's answer.
fn refuse(what: &str, text: &str, max: usize) -> Result<(), StoreError> {
    hostile(what, text, max).map_or(Ok(()), |problem| Err(StoreError::Refused(problem)))
}

/// Refuses a read of `key` no adapter could hold (every adapter's first
/// step, so that all answer alike).
///
/// # Errors
/// [`StoreError::Refused`] naming the problem.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    refuse("key", key, MAX_KEY_BYTES)
}

/// Refuses a listing prefix holding NUL (an empty prefix lists all).
///
/// # Errors
/// [`StoreError::Refused`] naming the problem.
pub fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() { Ok(()) } else { refuse("key prefix", prefix, MAX_KEY_BYTES) }
}

/// Refuses an id (event or timer) no adapter could hold.
///
/// # Errors
/// [`StoreError::Refused`] naming the problem.
pub fn check_id(id: &str) -> Result<(), StoreError> {
    refuse("id", id, MAX_ID_BYTES)
}

/// Refuses a batch holding a key or id no adapter could store, before
/// anything of it is applied: every adapter's first step of a commit.
///
/// # Errors
/// [`StoreError::Refused`] naming the first such text;
/// [`StoreError::Conflict`] for an event id twice in the batch.
pub fn check_commits(commits: &[Commit]) -> Result<(), StoreError> {
    let mut ids = std::collections::HashSet::new();
    for commit in commits {
        // The second copy of an event is a duplicate of the first, as if
        // handled meanwhile: on every adapter (PostgreSQL's insert of the
        // handled ids finds it so), a conflict.
        if let Some(id) = &commit.handled
            && !ids.insert(id.as_str())
        {
            return Err(StoreError::Conflict(format!("event {id:?} appears twice in the batch")));
        }
        for (key, _) in &commit.writes {
            check_key(key)?;
        }
        for change in &commit.timers {
            match change {
                TimerChange::Set(timer) => {
                    check_id(&timer.id)?;
                    refuse("timer key", &timer.key, MAX_KEY_BYTES)?;
                    refuse("timer event type", &timer.event_type, MAX_KEY_BYTES)?;
                }
                TimerChange::Cancel(id) => check_id(id)?,
            }
        }
        if let Some(id) = &commit.handled {
            check_id(id)?;
        }
        if let Some((id, _)) = &commit.fired {
            check_id(id)?;
        }
    }
    Ok(())
}

/// A write: `Some(value)` sets, `None` deletes.
pub type Write = (String, Option<Vec<u8>>);

/// A record waiting in the outbox: exactly what will be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// Physical topic.
    pub topic: String,
    pub key: String,
    /// The record value (the event's data; the whole envelope for
    /// `kafka.wire_format = "v1"` and entries written before CloudEvents).
    pub value: String,
    pub headers: Vec<(String, String)>,
}

/// The outputs of one handled event, not yet acknowledged by the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Id of the event whose handling emitted the records.
    pub source: String,
    /// When the entry was committed, milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub records: Vec<OutboxRecord>,
}

/// A timer a component set: an event delivered back to it at `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// The component's name for the timer; setting it again replaces it.
    pub id: String,
    /// When it is due, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub event_type: String,
    /// Partition key of the delivered event (the order id).
    pub key: String,
    /// JSON payload of the delivered event.
    pub payload: String,
    /// Id of the event whose handling set the timer: part of the delivered
    /// event's id, so a timer set again for the same time is a new event.
    #[serde(default)]
    pub set_by: String,
    /// Correlation id of that event, carried on to the delivered one.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// W3C trace context of that event's handling: the delivered event
    /// continues its trace (see [`crate::traces`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// This setting of the timer: a fresh number ([`new_nonce`]) each time
    /// it is set, so that a fired timer's removal removes that instance
    /// only, never a re-set of the same id (even for the same millisecond).
    /// Timers stored before it existed read as 0.
    #[serde(default)]
    pub nonce: u64,
}

/// A fresh [`Timer::nonce`].
pub fn new_nonce() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// What kind of stored entry was quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A timer ([`Timer`]), by its id.
    Timer,
    /// An outbox entry ([`OutboxEntry`]), by its source event id.
    Outbox,
}

impl EntryKind {
    /// The stored name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Timer => "timer",
            EntryKind::Outbox => "outbox",
        }
    }

    /// The kind of a stored name (an unknown one reads as an outbox entry:
    /// only the two are ever written).
    fn parse(name: &str) -> Self {
        if name == "timer" { EntryKind::Timer } else { EntryKind::Outbox }
    }
}

/// A timer or outbox entry that could not be decoded, moved out of the
/// host's way: never read by the host again, kept as found for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub kind: EntryKind,
    /// The timer's id or the outbox entry's source event id.
    pub id: String,
    /// The stored bytes, as found.
    pub raw: Vec<u8>,
    /// Why they could not be decoded.
    pub reason: String,
    /// When the entry was quarantined, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Quarantined {
    /// One line naming the entry and the reason.
    pub fn describe(&self) -> String {
        format!("{} {:?}: {}", self.kind.as_str(), self.id, self.reason)
    }
}

/// A component's quarantine in short, for its health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorruptEntries {
    /// How many entries are quarantined.
    pub count: u64,
    /// [`Quarantined::describe`] of the latest.
    pub last_reason: Option<String>,
}

/// Decodes a stored timer or outbox entry; `Err(reason)` when it cannot be.
fn decode_entry<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    serde_json::from_slice(raw).map_err(|err| format!("cannot be decoded: {err}"))
}

/// Logs an entry just quarantined (once: by the store that moved it).
fn report(store: &dyn std::fmt::Debug, entry: &Quarantined) {
    tracing::warn!(?store, "quarantined a corrupt state entry, skipped from now on: {}", entry.describe());
}

/// A change to a component's timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    Set(Timer),
    Cancel(String),
}

/// Everything one handled event changes, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// The component's state writes.
    pub writes: Vec<Write>,
    /// The component's timer changes, in call order.
    pub timers: Vec<TimerChange>,
    /// The id of the handled event, recorded so a redelivery is recognised.
    pub handled: Option<String>,
    /// A fired timer `(id, nonce)`: the commit applies only if that very
    /// instance ([`Timer::nonce`]) is still set, else it is a
    /// [`StoreError::Conflict`] (cancelled or set again meanwhile, on any
    /// host); it is removed, unless this commit set it again.
    pub fired: Option<(String, u64)>,
    /// What the event emitted, queued under [`Commit::handled`] until
    /// published. Ignored when `handled` is `None`.
    pub outbox: Vec<OutboxRecord>,
    /// Time of the commit, milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A component's store: state, handled ids, outbox and timers.
pub trait StateStore: Send + Sync + 'static {
    /// Reads one key.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether the store answers now: one round trip to a database, given
    /// up within the store's timeouts like any other call. (The default,
    /// for stores in the host's own process and files, always answers.)
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store does not answer.
    fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Keys starting with `prefix`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Applies a whole [`Commit`] atomically: readers see all of it at once,
    /// and after a crash either all of it is there or none of it. It is on
    /// disk once the returned [`Durable`] resolves. (A batch of one with
    /// nothing read.)
    ///
    /// # Errors
    /// As [`StateStore::commit_batch`].
    fn commit(&self, commit: Commit) -> Result<Durable, StoreError> {
        self.commit_batch(std::slice::from_ref(&commit), &ReadSet::default())
    }

    /// Applies several events' commits, in order, as one transaction: each
    /// is all-or-nothing as [`StateStore::commit`] promises, and so is the
    /// whole batch (a crash keeps all of them or none). One transaction
    /// instead of one per event is what makes a batch cheap.
    ///
    /// Optimistic concurrency: the batch applies only if everything in
    /// `reads` is still as it was read and none of its events was handled
    /// already; otherwise nothing is applied and the answer is
    /// [`StoreError::Conflict`]. A commit thus never overwrites a change it
    /// did not see (two hosts selling the last lamp) and an event is never
    /// applied twice (two hosts handling it during a rebalance).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] or [`StoreError::Unavailable`]; then nothing
    /// was applied.
    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError>;

    /// Resolves once everything committed so far is on disk.
    fn sync_point(&self) -> Durable;

    /// Forgets the ids of events handled before `before_ms`, at most `limit`
    /// of them (a small batch, so that commits are not held up), and says
    /// how many it forgot. An event redelivered after its id is forgotten
    /// is handled again: callers pass a horizon no redelivery can reach
    /// (see [`crate::scheduler::prune_handled`]). (The default, for test
    /// doubles, forgets nothing.)
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be written.
    fn prune_handled(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let _ = (before_ms, limit);
        Ok(0)
    }

    /// Whether the event `id` was handled (committed) before.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn was_handled(&self, id: &str) -> Result<bool, StoreError>;

    /// Which of `ids` were handled (committed) before: one look for a whole
    /// batch (one round trip on a database).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn handled_among(&self, ids: &[&str]) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut handled = std::collections::HashSet::new();
        for id in ids {
            if self.was_handled(id)? {
                handled.insert((*id).to_owned());
            }
        }
        Ok(handled)
    }

    /// The unpublished outputs of event `source`, if any.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError>;

    /// Unpublished outputs, oldest commit first, at most `limit` entries.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Forgets the outputs of `source` once the broker acknowledged them.
    /// Need not be durable: an entry that reappears after a crash is
    /// published again, and consumers drop the duplicate by event id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be written.
    fn clear_outbox(&self, source: &str) -> Result<(), StoreError>;

    /// The pending timer `id`, if any.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError>;

    /// Timers due at `now_ms`, earliest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError>;

    /// Timers due at `now_ms` for this host to deliver: [`StateStore::due_timers`]
    /// minus those another host claimed. A store shared by several hosts
    /// leases the returned timers to the caller for `lease`, so that each
    /// fires on one host, and one whose host died fires elsewhere once the
    /// lease ran out. (Delivering one twice would still change nothing: the
    /// delivered event has an id, dropped the second time.)
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn claim_due_timers(&self, now_ms: u64, limit: usize, lease: Duration) -> Result<Vec<Timer>, StoreError> {
        let _ = lease;
        self.due_timers(now_ms, limit)
    }

    /// Outbox entries committed at or before `committed_before_ms`, for this
    /// host to relay, leased as [`StateStore::claim_due_timers`] does.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn claim_stale_outbox(
        &self,
        committed_before_ms: u64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let _ = lease;
        let mut entries = self.pending_outbox(limit)?;
        entries.retain(|e| e.created_ms <= committed_before_ms);
        Ok(entries)
    }

    /// How many keys the component's state holds, and their bytes (keys
    /// plus values), for its quotas. The default reads every entry.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn data_usage(&self) -> Result<(u64, u64), StoreError> {
        let keys = self.keys("", usize::MAX)?;
        let mut bytes = 0u64;
        for key in &keys {
            bytes += (key.len() + self.get(key)?.map_or(0, |v| v.len())) as u64;
        }
        Ok((keys.len() as u64, bytes))
    }

    /// How many timers are pending.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn timer_count(&self) -> Result<u64, StoreError>;

    /// How many outbox entries are unpublished.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn outbox_count(&self) -> Result<u64, StoreError>;

    /// Entries quarantined because they could not be decoded, latest first,
    /// at most `limit`.
    ///
    /// Every read of timers or outbox entries (one, a listing or a claim)
    /// that meets such an entry moves it here, with its raw bytes and the
    /// reason, and answers without it: it is not read again, not lost, and
    /// the other entries go on. Setting or cancelling a timer whose stored
    /// body is corrupt replaces or removes it like any other. (The default
    /// is for a store that cannot hold undecodable entries.)
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// How many entries are quarantined, and the latest one's reason.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn corrupt_entries(&self) -> Result<CorruptEntries, StoreError> {
        let all = self.quarantined(usize::MAX)?;
        Ok(CorruptEntries { count: all.len() as u64, last_reason: all.first().map(Quarantined::describe) })
    }
}

#[cfg(test)]
mod contract;
#[cfg(test)]
mod interleavings;
#[cfg(test)]
mod tests;
