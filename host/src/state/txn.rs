//! The view of the state one guest call gets, and the batch overlay under it.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use super::{
    Commit, MAX_ID_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, StateStore, StoreError, TimerChange, Write, hostile,
};
use crate::limits::{DEFAULT_MAX_TIMERS, DEFAULT_MAX_WRITE_BYTES, DEFAULT_MAX_WRITES};

/// What a guest call may read: a store, or a store under a batch's
/// uncommitted writes ([`Overlay`]).
pub trait StateRead: Send + Sync + 'static {
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

    /// Reads one key as [`StateRead::get`] does, but without taking part
    /// in what is checked at commit (a shadow run's look at the state).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    fn peek(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key)
    }
}

/// A store read directly (queries, and calls outside a batch).
pub struct StoreReader(pub Arc<dyn StateStore>);

impl StateRead for StoreReader {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.0.keys(prefix, limit)
    }
}

/// Keys of `base` with `prefix` under `writes` (sets added, deletes removed),
/// ascending, at most `limit`. `fetch` must list at least `limit` plus the
/// number of deletes in `writes`, so that deleted keys cannot starve the result.
fn merge_keys(
    writes: &BTreeMap<String, Option<Vec<u8>>>,
    prefix: &str,
    limit: usize,
    fetch: impl FnOnce(usize) -> Result<Vec<String>, StoreError>,
) -> Result<Vec<String>, StoreError> {
    let deletes = writes.values().filter(|v| v.is_none()).count();
    let mut keys: std::collections::BTreeSet<String> = fetch(limit.saturating_add(deletes))?.into_iter().collect();
    for (key, value) in writes.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)) {
        match value {
            Some(_) => keys.insert(key.clone()),
            None => keys.remove(key),
        };
    }
    Ok(keys.into_iter().take(limit).collect())
}

/// What a batch read from its store, to be checked unchanged at commit:
/// optimistic concurrency control. Each key is kept with a SHA-256 digest of
/// the value first read (`None`: absent); each listing with its result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadSet {
    pub keys: BTreeMap<String, Option<[u8; 32]>>,
    /// `(prefix, limit, keys listed)`.
    pub listings: Vec<(String, usize, Vec<String>)>,
}

impl ReadSet {
    /// The digest a read value is remembered by.
    pub fn digest(value: Option<&[u8]>) -> Option<[u8; 32]> {
        use sha2::Digest as _;
        value.map(|v| sha2::Sha256::digest(v).into())
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.listings.is_empty()
    }

    /// Checks the reads against the store as it is now, through `get` (a
    /// key's digest now) and `keys` (a listing now, asked for in the order
    /// of [`ReadSet::listings`]): `Ok(Some(conflict))` naming the first read
    /// that no longer holds, `Ok(None)` when all hold.
    ///
    /// # Errors
    /// What `get` or `keys` returned: the store could not be read.
    pub fn changed<E>(
        &self,
        mut get: impl FnMut(&str) -> Result<Option<[u8; 32]>, E>,
        mut keys: impl FnMut(&str, usize) -> Result<Vec<String>, E>,
    ) -> Result<Option<StoreError>, E> {
        for (key, seen) in &self.keys {
            if get(key)? != *seen {
                return Ok(Some(StoreError::Conflict(format!("key {key:?} changed since it was read"))));
            }
        }
        for (prefix, limit, seen) in &self.listings {
            if keys(prefix, *limit)? != *seen {
                return Ok(Some(StoreError::Conflict(format!("keys under {prefix:?} changed since they were listed"))));
            }
        }
        Ok(None)
    }
}

/// The state seen by the events of one batch: the store, under the changes
/// of the batch's earlier events, which are committed together at its end.
/// Only the executor of one service writes to it, between guest calls.
pub struct Overlay {
    store: Arc<dyn StateStore>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    writes: BTreeMap<String, Option<Vec<u8>>>,
    handled: HashSet<String>,
    /// What was read from the store itself (not from `writes`).
    reads: ReadSet,
    /// The values read, served again to every later read of the batch.
    values: BTreeMap<String, Option<Vec<u8>>>,
    /// The listings read, `(prefix, limit)` → keys, served again likewise.
    listed: BTreeMap<(String, usize), Vec<String>>,
}

impl Overlay {
    /// An empty overlay over `store`.
    pub fn new(store: Arc<dyn StateStore>) -> Arc<Self> {
        Arc::new(Self { store, pending: Mutex::new(Pending::default()) })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a commit of the batch: later reads see its writes and its id.
    pub fn record(&self, commit: &Commit) {
        let mut pending = self.pending();
        for (key, value) in &commit.writes {
            pending.writes.insert(key.clone(), value.clone());
        }
        if let Some(id) = &commit.handled {
            pending.handled.insert(id.clone());
        }
    }

    /// Whether event `id` was handled by an earlier event of the batch (not
    /// yet committed).
    pub fn handled_in_batch(&self, id: &str) -> bool {
        self.pending().handled.contains(id)
    }

    /// What the batch read from the store so far.
    pub fn reads(&self) -> ReadSet {
        self.pending().reads.clone()
    }

    /// Forgets the batch once it is committed (or abandoned).
    pub fn clear(&self) {
        *self.pending() = Pending::default();
    }
}

impl StateRead for Overlay {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        {
            let pending = self.pending();
            // The batch sees what it saw: a key read again is served from
            // what was read first, never from the store, so the one digest
            // checked at commit is the value every event of the batch used.
            // (Read again from the store, a key changed and changed back by
            // another host meanwhile, A→B→A, would pass the check while an
            // event acted on B: a lost update.)
            if let Some(value) = pending.writes.get(key).or_else(|| pending.values.get(key)) {
                return Ok(value.clone());
            }
        }
        let value = self.store.get(key)?;
        let mut pending = self.pending();
        pending.reads.keys.insert(key.to_owned(), ReadSet::digest(value.as_deref()));
        pending.values.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut pending = self.pending();
        let Pending { writes, reads, listed, .. } = &mut *pending;
        merge_keys(writes, prefix, limit, |n| {
            // A listing asked again is served as first read, as keys are.
            if let Some(keys) = listed.get(&(prefix.to_owned(), n)) {
                return Ok(keys.clone());
            }
            let keys = self.store.keys(prefix, n)?;
            reads.listings.push((prefix.to_owned(), n, keys.clone()));
            listed.insert((prefix.to_owned(), n), keys.clone());
            Ok(keys)
        })
    }

    fn peek(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        {
            let pending = self.pending();
            if let Some(value) = pending.writes.get(key).or_else(|| pending.values.get(key)) {
                return Ok(value.clone());
            }
        }
        self.store.get(key)
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

/// What one call may buffer: the host holds a call's changes in memory
/// until the call returns, so a guest must not be able to make them grow
/// without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnLimits {
    /// Distinct keys written (set or deleted).
    pub max_writes: usize,
    /// Bytes of those keys and values, plus timer ids, keys and payloads.
    pub max_bytes: usize,
    /// Timer changes (set or cancel).
    pub max_timers: usize,
}

impl Default for TxnLimits {
    fn default() -> Self {
        Self { max_writes: DEFAULT_MAX_WRITES, max_bytes: DEFAULT_MAX_WRITE_BYTES, max_timers: DEFAULT_MAX_TIMERS }
    }
}

/// The view of the store one call gets: reads see the call's own writes,
/// and nothing reaches the store until [`Txn::take_changes`] is committed.
pub struct Txn {
    store: Arc<dyn StateRead>,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    timers: Vec<TimerChange>,
    read_only: bool,
    limits: TxnLimits,
    /// Bytes buffered, as [`TxnLimits::max_bytes`] counts them.
    bytes: usize,
    /// The first cap the call ran into, if any.
    exceeded: Option<String>,
    /// The component's totals, and what this call adds to them (keys and
    /// bytes set, timers set).
    quota: Option<(Arc<super::StateQuota>, [u64; 3])>,
}

impl Txn {
    /// A transaction for a `handle` call, with the default [`TxnLimits`].
    pub fn new(store: Arc<dyn StateRead>) -> Self {
        Self::with_limits(store, TxnLimits::default())
    }

    /// A transaction for a `handle` call buffering at most `limits`.
    pub fn with_limits(store: Arc<dyn StateRead>, limits: TxnLimits) -> Self {
        let (writes, timers) = (BTreeMap::new(), Vec::new());
        Self { store, writes, timers, read_only: false, limits, bytes: 0, exceeded: None, quota: None }
    }

    /// Checks the call's changes against `quota` too, as they are made.
    pub fn with_quota(mut self, quota: Arc<super::StateQuota>) -> Self {
        self.quota = Some((quota, [0; 3]));
        self
    }

    /// Refuses a set past the component's key, byte or timer quota. Near
    /// the key quota only, whether the key is new is read from the store.
    fn within_quota(&mut self, key: Option<(&str, usize, bool)>) -> Result<(), AccessError> {
        use super::Quota;
        let Some((quota, added)) = &self.quota else { return Ok(()) };
        let Some(usage) = quota.usage() else { return Ok(()) };
        let (quota, mut added) = (quota.clone(), *added);
        let checked = match key {
            Some((key, size, pending)) => {
                added[0] += u64::from(!pending);
                added[1] += size as u64;
                let near = usage.keys + added[0] > quota.limits().max_keys;
                let new = near && !pending && self.store.get(key)?.is_none();
                (if new { quota.check(Quota::Keys, usage.keys, added[0]) } else { Ok(()) })
                    .and_then(|()| quota.check(Quota::Bytes, usage.bytes, added[1]))
            }
            None => {
                added[2] += 1;
                quota.check(Quota::Timers, usage.timers, added[2])
            }
        };
        match checked {
            Ok(()) => {
                self.quota = Some((quota, added));
                Ok(())
            }
            Err(reason) => Err(self.refuse(reason)),
        }
    }

    /// A read-only view for a `query` call.
    pub fn read_only(store: Arc<dyn StateRead>) -> Self {
        Self { read_only: true, ..Self::new(store) }
    }

    /// Why the call was refused a change for going past a cap (the first
    /// such refusal), if it was. The call must then not commit: a guest
    /// that ignored the refusal would commit part of what it meant to.
    pub fn exceeded(&self) -> Option<&str> {
        self.exceeded.as_deref()
    }

    /// Refuses a change that goes past a cap, remembering the first.
    fn refuse(&mut self, message: String) -> AccessError {
        self.exceeded.get_or_insert_with(|| message.clone());
        AccessError::Invalid(message)
    }

    /// Reads through the pending writes.
    ///
    /// # Errors
    /// [`AccessError::Unavailable`] when the store fails;
    /// [`AccessError::Invalid`] for a key no store can hold (see [`hostile`]).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AccessError> {
        if let Some(problem) = hostile("key", key, MAX_KEY_BYTES) {
            return Err(AccessError::Invalid(problem));
        }
        match self.writes.get(key) {
            Some(pending) => Ok(pending.clone()),
            None => Ok(self.store.get(key)?),
        }
    }

    /// Records a write (`None` deletes).
    ///
    /// # Errors
    /// [`AccessError::Invalid`] in a read-only view, for oversized entries
    /// or a key no store can hold (empty, over [`MAX_KEY_BYTES`], NUL).
    pub fn put(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<(), AccessError> {
        if self.read_only {
            return Err(AccessError::Invalid("state is read-only during a query".into()));
        }
        if let Some(problem) = hostile("key", key, MAX_KEY_BYTES) {
            return Err(AccessError::Invalid(problem));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
            return Err(AccessError::Invalid(format!("value larger than {MAX_VALUE_BYTES} bytes")));
        }
        let size = |value: &Option<Vec<u8>>| key.len() + value.as_ref().map_or(0, Vec::len);
        let replaced = self.writes.get(key).map(size);
        if replaced.is_none() && self.writes.len() >= self.limits.max_writes {
            let max = self.limits.max_writes;
            return Err(self.refuse(format!("more than {max} keys written in one call (max_writes_per_call)")));
        }
        let bytes = self.bytes - replaced.unwrap_or(0) + size(&value);
        if bytes > self.limits.max_bytes {
            let max = self.limits.max_bytes;
            return Err(self.refuse(format!("more than {max} bytes written in one call (max_write_bytes_per_call)")));
        }
        if let Some(set) = &value {
            self.within_quota(Some((key, key.len() + set.len(), replaced.is_some())))?;
        }
        self.bytes = bytes;
        self.writes.insert(key.to_owned(), value);
        Ok(())
    }

    /// Keys with `prefix`, merging pending writes and deletes.
    ///
    /// # Errors
    /// [`AccessError::Unavailable`] when the store fails;
    /// [`AccessError::Invalid`] for a prefix holding NUL or over [`MAX_KEY_BYTES`].
    pub fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, AccessError> {
        if let Some(problem) = hostile("key prefix", prefix, MAX_KEY_BYTES).filter(|_| !prefix.is_empty()) {
            return Err(AccessError::Invalid(problem));
        }
        Ok(merge_keys(&self.writes, prefix, limit, |n| self.store.keys(prefix, n))?)
    }

    /// Records a timer change.
    ///
    /// # Errors
    /// [`AccessError::Invalid`] in a read-only view, for an empty or
    /// oversized id, or a payload that is not JSON.
    pub fn timer(&mut self, mut change: TimerChange) -> Result<(), AccessError> {
        if self.read_only {
            return Err(AccessError::Invalid("timers cannot be changed during a query".into()));
        }
        let id = match &change {
            TimerChange::Set(timer) => &timer.id,
            TimerChange::Cancel(id) => id,
        };
        if let Some(problem) = hostile("timer id", id, MAX_ID_BYTES) {
            return Err(AccessError::Invalid(problem));
        }
        if let TimerChange::Set(timer) = &change {
            if timer.key.is_empty() || timer.event_type.is_empty() {
                return Err(AccessError::Invalid("a timer needs an event type and a key".into()));
            }
            let problem = hostile("timer key", &timer.key, MAX_KEY_BYTES)
                .or_else(|| hostile("timer event type", &timer.event_type, MAX_KEY_BYTES));
            if let Some(problem) = problem {
                return Err(AccessError::Invalid(problem));
            }
            if timer.payload.len() > MAX_VALUE_BYTES {
                return Err(AccessError::Invalid(format!("timer payload larger than {MAX_VALUE_BYTES} bytes")));
            }
            if let Err(err) = serde_json::from_str::<serde_json::Value>(&timer.payload) {
                return Err(AccessError::Invalid(format!("timer payload is not JSON: {err}")));
            }
        }
        if self.timers.len() >= self.limits.max_timers {
            let max = self.limits.max_timers;
            return Err(self.refuse(format!("more than {max} timer changes in one call (max_timers_per_call)")));
        }
        let size = match &change {
            TimerChange::Set(timer) => timer.id.len() + timer.key.len() + timer.event_type.len() + timer.payload.len(),
            TimerChange::Cancel(id) => id.len(),
        };
        if self.bytes + size > self.limits.max_bytes {
            let max = self.limits.max_bytes;
            return Err(self.refuse(format!("more than {max} bytes written in one call (max_write_bytes_per_call)")));
        }
        if matches!(change, TimerChange::Set(_)) {
            self.within_quota(None)?;
        }
        self.bytes += size;
        if let TimerChange::Set(timer) = &mut change {
            timer.nonce = super::new_nonce();
        }
        self.timers.push(change);
        Ok(())
    }

    /// The call's state writes (in key order) and timer changes (in call
    /// order), leaving the transaction empty.
    pub fn take_changes(&mut self) -> (Vec<Write>, Vec<TimerChange>) {
        self.bytes = 0;
        self.exceeded = None;
        if let Some((_, added)) = &mut self.quota {
            *added = [0; 3];
        }
        (std::mem::take(&mut self.writes).into_iter().collect(), std::mem::take(&mut self.timers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemoryStore, Timer};

    fn txn(limits: TxnLimits) -> Txn {
        Txn::with_limits(Arc::new(StoreReader(Arc::new(MemoryStore::default()))), limits)
    }

    fn timer(id: &str) -> TimerChange {
        let payload = "{}".to_owned();
        TimerChange::Set(Timer {
            id: id.into(),
            at_ms: 1,
            event_type: "T".into(),
            key: "k".into(),
            payload,
            set_by: String::new(),
            correlation_id: None,
            traceparent: None,
            nonce: 0,
        })
    }

    #[test]
    fn a_call_buffers_at_most_its_limits() {
        let mut t = txn(TxnLimits { max_writes: 2, max_bytes: 100, max_timers: 1 });
        t.put("a", Some(vec![0; 40])).unwrap();
        // Writing a key again replaces its bytes and is not another key.
        t.put("a", Some(vec![0; 40])).unwrap();
        t.put("b", None).unwrap();
        assert_eq!(t.exceeded(), None);
        let err = t.put("c", None).unwrap_err();
        assert!(matches!(&err, AccessError::Invalid(m) if m.contains("max_writes_per_call")), "{err:?}");
        let err = t.put("b", Some(vec![0; 80])).unwrap_err();
        assert!(matches!(&err, AccessError::Invalid(m) if m.contains("max_write_bytes_per_call")), "{err:?}");
        t.put("b", Some(vec![0; 50])).unwrap();
        assert!(t.exceeded().unwrap().contains("max_writes_per_call"), "the first refusal is kept");
        // 92 bytes so far; a timer's id, key, type and payload count too.
        t.timer(timer("t1")).unwrap();
        let err = t.timer(TimerChange::Cancel("t2".into())).unwrap_err();
        assert!(matches!(&err, AccessError::Invalid(m) if m.contains("max_timers_per_call")), "{err:?}");
        let (writes, timers) = t.take_changes();
        assert_eq!((writes.len(), timers.len()), (2, 1));
        assert_eq!(t.exceeded(), None, "the next call starts afresh");

        t.put("a", Some(vec![0; 95])).unwrap();
        let err = t.timer(timer("t3")).unwrap_err();
        assert!(matches!(&err, AccessError::Invalid(m) if m.contains("max_write_bytes_per_call")), "{err:?}");
    }
}
