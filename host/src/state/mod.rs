//! The state port's adapters and the unit of atomicity of the whole host.
//!
//! A store holds, per component, four things that change together:
//! the component's key-value state, the ids of the events it handled, its
//! outbox (the records its handled events emitted, kept until the broker
//! acknowledged them) and its timers. [`StateStore::commit`] applies one
//! handled event's [`Commit`] to all four atomically: that is the
//! transactional outbox. [`durable::DurableStore`] (redb, fsync on commit)
//! is the real adapter; [`MemoryStore`] is its in-memory twin for tests.

pub mod durable;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

pub use durable::DurableStore;

/// The progress of a store's disk flushes: commits up to `seq` are durable.
#[derive(Debug, Clone, Default)]
struct Flushed {
    seq: u64,
    /// Why the last flush failed, if it did.
    error: Option<String>,
}

/// A commit's durability: resolves once the commit is on disk.
///
/// A commit is visible to readers (and to later `handle` calls) at once, but
/// what it queued in the outbox may be published only after [`Durable::wait`]:
/// a crash before that loses the commit, and the event is handled again.
#[derive(Debug, Clone)]
pub struct Durable {
    seq: u64,
    flushed: Option<tokio::sync::watch::Receiver<Flushed>>,
}

impl Durable {
    /// Already durable (the in-memory store, which has no disk to wait for).
    pub fn done() -> Self {
        Self { seq: 0, flushed: None }
    }

    /// Waits until the commit is on disk.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when flushing failed or the store closed
    /// first: the commit may be lost, and nothing it queued may be published.
    pub async fn wait(self) -> Result<(), StoreError> {
        let Some(mut flushed) = self.flushed else { return Ok(()) };
        loop {
            {
                let progress = flushed.borrow_and_update();
                if progress.seq >= self.seq {
                    return Ok(());
                }
                if let Some(err) = &progress.error {
                    return Err(StoreError::Unavailable(format!("commit not made durable: {err}")));
                }
            }
            if flushed.changed().await.is_err() {
                return Err(StoreError::Unavailable("the store closed before the commit was durable".into()));
            }
        }
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
}

/// A write: `Some(value)` sets, `None` deletes.
pub type Write = (String, Option<Vec<u8>>);

/// A record waiting in the outbox: exactly what will be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// Physical topic.
    pub topic: String,
    pub key: String,
    /// The record value (a JSON envelope).
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
    /// A fired timer `(id, at_ms)` to remove, unless this commit set it again.
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

    /// Keys starting with `prefix`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Applies a whole [`Commit`] atomically: readers see all of it at once,
    /// and after a crash either all of it is there or none of it. It is on
    /// disk once the returned [`Durable`] resolves (commits are flushed in
    /// groups, so many events share one fsync).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; then nothing was applied.
    fn commit(&self, commit: Commit) -> Result<Durable, StoreError>;

    /// Resolves once everything committed so far is on disk.
    fn sync_point(&self) -> Durable;

    /// Whether the event `id` was handled (committed) before.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn was_handled(&self, id: &str) -> Result<bool, StoreError>;

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
}

/// The parts of a store, kept in plain maps by [`MemoryStore`] and in
/// tables by [`DurableStore`].
#[derive(Debug, Default)]
struct Maps {
    state: BTreeMap<String, Vec<u8>>,
    handled: BTreeMap<String, u64>,
    /// Sequence number → entry; the sequence keeps commit order.
    outbox: BTreeMap<u64, OutboxEntry>,
    outbox_by_source: BTreeMap<String, u64>,
    next_outbox: u64,
    timers: BTreeMap<String, Timer>,
    timers_due: std::collections::BTreeSet<(u64, String)>,
}

impl Maps {
    fn apply(&mut self, commit: Commit) {
        for (key, value) in commit.writes {
            match value {
                Some(value) => self.state.insert(key, value),
                None => self.state.remove(&key),
            };
        }
        if let Some((id, at_ms)) = &commit.fired
            && self.timers.get(id).is_some_and(|t| t.at_ms == *at_ms)
        {
            self.remove_timer(id);
        }
        for change in commit.timers {
            match change {
                TimerChange::Set(timer) => {
                    self.remove_timer(&timer.id);
                    self.timers_due.insert((timer.at_ms, timer.id.clone()));
                    self.timers.insert(timer.id.clone(), timer);
                }
                TimerChange::Cancel(id) => self.remove_timer(&id),
            }
        }
        if let Some(source) = commit.handled {
            self.handled.insert(source.clone(), commit.now_ms);
            if !commit.outbox.is_empty() {
                let seq = self.next_outbox;
                self.next_outbox += 1;
                self.outbox_by_source.insert(source.clone(), seq);
                self.outbox.insert(seq, OutboxEntry { source, created_ms: commit.now_ms, records: commit.outbox });
            }
        }
    }

    fn remove_timer(&mut self, id: &str) {
        if let Some(old) = self.timers.remove(id) {
            self.timers_due.remove(&(old.at_ms, old.id));
        }
    }
}

/// In-memory store: the twin of [`DurableStore`] for tests.
///
/// A `std::sync::Mutex` is right here: every critical section is a map
/// operation that never awaits.
#[derive(Debug, Default)]
pub struct MemoryStore {
    maps: Mutex<Maps>,
}

impl MemoryStore {
    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (each commit is applied by infallible inserts), so poison is harmless.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies plain state writes (test setup).
    pub fn with(pairs: &[(&str, &str)]) -> Self {
        let store = Self::default();
        store.maps().apply(Commit {
            writes: pairs.iter().map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec()))).collect(),
            ..Commit::default()
        });
        store
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.maps().state.get(key).cloned())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .maps()
            .state
            .range(prefix.to_owned()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    fn commit(&self, commit: Commit) -> Result<Durable, StoreError> {
        self.maps().apply(commit);
        Ok(Durable::done())
    }

    fn sync_point(&self) -> Durable {
        Durable::done()
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.maps().handled.contains_key(id))
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        let maps = self.maps();
        Ok(maps.outbox_by_source.get(source).and_then(|seq| maps.outbox.get(seq)).cloned())
    }

    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self.maps().outbox.values().take(limit).cloned().collect())
    }

    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        let mut maps = self.maps();
        if let Some(seq) = maps.outbox_by_source.remove(source) {
            maps.outbox.remove(&seq);
        }
        Ok(())
    }

    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        Ok(self.maps().timers.get(id).cloned())
    }

    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let maps = self.maps();
        Ok(maps
            .timers_due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .filter_map(|(_, id)| maps.timers.get(id).cloned())
            .collect())
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        Ok(self.maps().timers.len() as u64)
    }

    fn outbox_count(&self) -> Result<u64, StoreError> {
        Ok(self.maps().outbox.len() as u64)
    }
}

/// Why a component's state access was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessError {
    /// The store failed; retrying may help.
    Unavailable(String),
    /// The access itself is wrong (read-only call, oversized entry).
    Invalid(String),
}

impl From<StoreError> for AccessError {
    fn from(err: StoreError) -> Self {
        AccessError::Unavailable(err.to_string())
    }
}

/// The view of the store one call gets: reads see the call's own writes,
/// and nothing reaches the store until [`Txn::into_writes`] is committed.
pub struct Txn {
    store: Arc<dyn StateStore>,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    timers: Vec<TimerChange>,
    read_only: bool,
}

impl Txn {
    /// A transaction for a `handle` call.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store, writes: BTreeMap::new(), timers: Vec::new(), read_only: false }
    }

    /// A read-only view for a `query` call.
    pub fn read_only(store: Arc<dyn StateStore>) -> Self {
        Self { store, writes: BTreeMap::new(), timers: Vec::new(), read_only: true }
    }

    /// Reads through the pending writes.
    ///
    /// # Errors
    /// [`AccessError::Unavailable`] when the store fails.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AccessError> {
        match self.writes.get(key) {
            Some(pending) => Ok(pending.clone()),
            None => Ok(self.store.get(key)?),
        }
    }

    /// Records a write (`None` deletes).
    ///
    /// # Errors
    /// [`AccessError::Invalid`] in a read-only view or for oversized entries.
    pub fn put(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<(), AccessError> {
        if self.read_only {
            return Err(AccessError::Invalid("state is read-only during a query".into()));
        }
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(AccessError::Invalid(format!("key length must be 1..={MAX_KEY_BYTES} bytes")));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
            return Err(AccessError::Invalid(format!("value larger than {MAX_VALUE_BYTES} bytes")));
        }
        self.writes.insert(key.to_owned(), value);
        Ok(())
    }

    /// Keys with `prefix`, merging pending writes and deletes.
    ///
    /// # Errors
    /// [`AccessError::Unavailable`] when the store fails.
    pub fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, AccessError> {
        // Over-fetch by the number of pending deletes so that deleted keys
        // cannot starve the result.
        let deletes = self.writes.values().filter(|v| v.is_none()).count();
        let mut keys: std::collections::BTreeSet<String> =
            self.store.keys(prefix, limit.saturating_add(deletes))?.into_iter().collect();
        for (key, value) in self.writes.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)) {
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    /// Records a timer change.
    ///
    /// # Errors
    /// [`AccessError::Invalid`] in a read-only view, for an empty or
    /// oversized id, or a payload that is not JSON.
    pub fn timer(&mut self, change: TimerChange) -> Result<(), AccessError> {
        if self.read_only {
            return Err(AccessError::Invalid("timers cannot be changed during a query".into()));
        }
        let id = match &change {
            TimerChange::Set(timer) => &timer.id,
            TimerChange::Cancel(id) => id,
        };
        if id.is_empty() || id.len() > MAX_KEY_BYTES {
            return Err(AccessError::Invalid(format!("timer id length must be 1..={MAX_KEY_BYTES} bytes")));
        }
        if let TimerChange::Set(timer) = &change {
            if timer.key.is_empty() || timer.event_type.is_empty() {
                return Err(AccessError::Invalid("a timer needs an event type and a key".into()));
            }
            if timer.payload.len() > MAX_VALUE_BYTES {
                return Err(AccessError::Invalid(format!("timer payload larger than {MAX_VALUE_BYTES} bytes")));
            }
            if let Err(err) = serde_json::from_str::<serde_json::Value>(&timer.payload) {
                return Err(AccessError::Invalid(format!("timer payload is not JSON: {err}")));
            }
        }
        self.timers.push(change);
        Ok(())
    }

    /// The call's state writes (in key order) and timer changes (in call order).
    pub fn into_changes(self) -> (Vec<Write>, Vec<TimerChange>) {
        (self.writes.into_iter().collect(), self.timers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(pairs: &[(&str, &str)]) -> Arc<dyn StateStore> {
        Arc::new(MemoryStore::with(pairs))
    }

    #[test]
    fn txn_reads_its_own_writes_and_commits_nothing_until_asked() {
        let store = store_with(&[("a", "1"), ("b", "2")]);
        let mut txn = Txn::new(store.clone());
        txn.put("a", Some(b"9".to_vec())).unwrap();
        txn.put("b", None).unwrap();
        txn.put("c", Some(b"3".to_vec())).unwrap();
        assert_eq!(txn.get("a").unwrap(), Some(b"9".to_vec()));
        assert_eq!(txn.get("b").unwrap(), None);
        assert_eq!(txn.keys("", 10).unwrap(), ["a", "c"]);
        assert_eq!(store.get("a").unwrap(), Some(b"1".to_vec()), "uncommitted writes are invisible");
        let (writes, _) = txn.into_changes();
        store.commit(Commit { writes, ..Commit::default() }).unwrap();
        assert_eq!(store.keys("", 10).unwrap(), ["a", "c"]);
    }

    #[test]
    fn deletes_do_not_starve_listing() {
        let store = store_with(&[("k1", "1"), ("k2", "2"), ("k3", "3")]);
        let mut txn = Txn::new(store);
        txn.put("k1", None).unwrap();
        assert_eq!(txn.keys("k", 2).unwrap(), ["k2", "k3"]);
    }

    #[test]
    fn read_only_and_oversized_writes_are_refused() {
        let store = store_with(&[]);
        let mut ro = Txn::read_only(store.clone());
        assert!(matches!(ro.put("a", None), Err(AccessError::Invalid(m)) if m.contains("read-only")));
        let mut txn = Txn::new(store);
        assert!(matches!(txn.put("", None), Err(AccessError::Invalid(_))));
        assert!(matches!(txn.put("a", Some(vec![0; MAX_VALUE_BYTES + 1])), Err(AccessError::Invalid(_))));
    }
}

/// The behaviour both adapters share, run against each.
#[cfg(test)]
mod contract {
    use super::*;

    fn timer(id: &str, at_ms: u64) -> Timer {
        Timer {
            id: id.into(),
            at_ms,
            event_type: "Due".into(),
            key: "o1".into(),
            payload: "{}".into(),
            set_by: "e0".into(),
            correlation_id: None,
        }
    }

    fn record(value: &str) -> OutboxRecord {
        OutboxRecord {
            topic: "t".into(),
            key: "k".into(),
            value: value.into(),
            headers: vec![("h".into(), "v".into())],
        }
    }

    fn handled(id: &str, writes: &[(&str, &str)], outbox: &[&str], timers: Vec<TimerChange>) -> Commit {
        Commit {
            writes: writes.iter().map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec()))).collect(),
            timers,
            handled: Some(id.into()),
            fired: None,
            outbox: outbox.iter().map(|v| record(v)).collect(),
            now_ms: 7,
        }
    }

    fn state_handled_and_outbox_commit_together(store: &dyn StateStore) {
        assert!(!store.was_handled("e1").unwrap());
        store.commit(handled("e1", &[("a", "1"), ("b", "2")], &["r1", "r2"], vec![])).unwrap();
        store.commit(handled("e2", &[("a", "3")], &[], vec![])).unwrap();
        store.commit(handled("e3", &[], &["r3"], vec![])).unwrap();
        assert!(store.was_handled("e1").unwrap() && store.was_handled("e2").unwrap());
        assert_eq!(store.get("a").unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.keys("", 10).unwrap(), ["a", "b"]);
        let entry = store.outbox("e1").unwrap().unwrap();
        assert_eq!((entry.source.as_str(), entry.created_ms, entry.records.len()), ("e1", 7, 2));
        assert_eq!(entry.records[1], record("r2"));
        assert_eq!(store.outbox("e2").unwrap(), None, "nothing emitted, nothing queued");
        let pending: Vec<String> = store.pending_outbox(10).unwrap().into_iter().map(|e| e.source).collect();
        assert_eq!(pending, ["e1", "e3"], "commit order");
        store.clear_outbox("e1").unwrap();
        store.clear_outbox("unknown").unwrap();
        assert_eq!(store.outbox("e1").unwrap(), None);
        assert_eq!(store.outbox_count().unwrap(), 1);
        store.commit(Commit { writes: vec![("b".into(), None)], ..Commit::default() }).unwrap();
        assert_eq!(store.keys("", 10).unwrap(), ["a"]);
    }

    fn timers_fire_in_order_and_are_replaced_cancelled_and_removed(store: &dyn StateStore) {
        let set = |t| TimerChange::Set(t);
        store.commit(handled("e1", &[], &[], vec![set(timer("late", 300)), set(timer("early", 100))])).unwrap();
        store
            .commit(handled("e2", &[], &[], vec![set(timer("gone", 50)), TimerChange::Cancel("gone".into())]))
            .unwrap();
        store.commit(handled("e3", &[], &[], vec![set(timer("moved", 10)), set(timer("moved", 200))])).unwrap();
        let ids = |now| -> Vec<String> { store.due_timers(now, 10).unwrap().into_iter().map(|t| t.id).collect() };
        assert_eq!(ids(99), Vec::<String>::new());
        assert_eq!(ids(250), ["early", "moved"]);
        assert_eq!(store.timer_count().unwrap(), 3);
        // A fired timer goes away with the commit of its handling...
        store
            .commit(Commit { fired: Some(("early".into(), 100)), handled: Some("t1".into()), ..Commit::default() })
            .unwrap();
        // ...unless that commit set it again, or it was moved meanwhile.
        store
            .commit(Commit { fired: Some(("moved".into(), 10)), handled: Some("t2".into()), ..Commit::default() })
            .unwrap();
        store
            .commit(Commit {
                fired: Some(("late".into(), 300)),
                timers: vec![set(timer("late", 400))],
                handled: Some("t3".into()),
                ..Commit::default()
            })
            .unwrap();
        assert_eq!(ids(1000), ["moved", "late"]);
        assert_eq!(store.due_timers(1000, 10).unwrap()[1], timer("late", 400));
        assert_eq!(store.due_timers(1000, 1).unwrap().len(), 1, "limit");
    }

    #[test]
    fn memory_store() {
        state_handled_and_outbox_commit_together(&MemoryStore::default());
        timers_fire_in_order_and_are_replaced_cancelled_and_removed(&MemoryStore::default());
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("store-{}", uuid::Uuid::new_v4().simple())).join(name)
    }

    #[test]
    fn durable_store() {
        let path = temp_file("a.redb");
        state_handled_and_outbox_commit_together(&DurableStore::open(&path).unwrap());
        timers_fire_in_order_and_are_replaced_cancelled_and_removed(&DurableStore::open(&temp_file("b.redb")).unwrap());
        // Everything survives a reopen.
        let store = DurableStore::open(&path).unwrap();
        assert_eq!(store.get("a").unwrap(), Some(b"3".to_vec()));
        assert!(store.was_handled("e3").unwrap());
        assert_eq!(store.pending_outbox(10).unwrap().len(), 1);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_store_in_use_or_not_a_database_is_refused_clearly() {
        let path = temp_file("c.redb");
        let _open = DurableStore::open(&path).unwrap();
        let err = DurableStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("already open") && err.contains("c.redb"), "{err}");
        let garbage = path.with_file_name("garbage.redb");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let err = DurableStore::open(&garbage).unwrap_err().to_string();
        assert!(err.contains("garbage.redb"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn timers_are_validated() {
        let mut txn = Txn::new(Arc::new(MemoryStore::default()));
        assert!(txn.timer(TimerChange::Set(timer("t", 1))).is_ok());
        let mut bad = timer("t", 1);
        bad.payload = "not json".into();
        assert!(matches!(txn.timer(TimerChange::Set(bad)), Err(AccessError::Invalid(m)) if m.contains("JSON")));
        assert!(matches!(txn.timer(TimerChange::Cancel(String::new())), Err(AccessError::Invalid(_))));
        let mut ro = Txn::read_only(Arc::new(MemoryStore::default()));
        assert!(
            matches!(ro.timer(TimerChange::Cancel("t".into())), Err(AccessError::Invalid(m)) if m.contains("query"))
        );
        let (_, timers) = txn.into_changes();
        assert_eq!(timers.len(), 1);
    }
}
