//! The in-memory twin of the durable store, for fast tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use super::{
    Commit, CorruptEntries, Durable, EntryKind, OutboxEntry, Quarantined, ReadSet, StateStore, StoreError, Timer,
    TimerChange, check_commits, check_id, check_key, check_prefix, decode_entry,
};

/// A timer or outbox entry as kept: decoded, or bytes written past the
/// encoding by a test (decoded when read, as the other adapters decode
/// theirs, so that a corrupt one takes the same path).
#[derive(Debug, Clone)]
enum Stored<T> {
    Decoded(T),
    #[cfg_attr(not(test), expect(dead_code, reason = "only tests write entries past the encoding"))]
    Raw(Vec<u8>),
}

impl<T: serde::de::DeserializeOwned + serde::Serialize + Clone> Stored<T> {
    fn decode(&self) -> Result<T, String> {
        match self {
            Stored::Decoded(value) => Ok(value.clone()),
            Stored::Raw(raw) => decode_entry(raw),
        }
    }

    fn raw(&self) -> Vec<u8> {
        match self {
            // Structs of strings and integers always serialize.
            Stored::Decoded(value) => serde_json::to_vec(value).unwrap_or_default(),
            Stored::Raw(raw) => raw.clone(),
        }
    }
}

/// The parts of a store, kept in plain maps by [`MemoryStore`] and in
/// tables by [`DurableStore`].
#[derive(Debug, Default)]
struct Maps {
    state: BTreeMap<String, Vec<u8>>,
    handled: BTreeMap<String, u64>,
    /// Sequence number → (source, entry); the sequence keeps commit order.
    outbox: BTreeMap<u64, (String, Stored<OutboxEntry>)>,
    outbox_by_source: BTreeMap<String, u64>,
    next_outbox: u64,
    /// Timer id → (due time, timer).
    timers: BTreeMap<String, (u64, Stored<Timer>)>,
    timers_due: std::collections::BTreeSet<(u64, String)>,
    /// Oldest first.
    quarantine: Vec<Quarantined>,
}

impl Maps {
    /// Refuses a batch that read something changed since, or whose event
    /// was handled already.
    fn check(&self, commits: &[Commit], reads: &ReadSet) -> Result<(), StoreError> {
        if let Some((id, nonce)) = commits.iter().find_map(|c| c.fired.as_ref())
            && self.timers.get(id).and_then(|(_, t)| t.decode().ok()).is_none_or(|t| t.nonce != *nonce)
        {
            return Err(StoreError::Conflict(format!("timer {id:?} was cancelled or set again since it fired")));
        }
        if let Some(id) = commits.iter().filter_map(|c| c.handled.as_ref()).find(|id| self.handled.contains_key(*id)) {
            return Err(StoreError::Conflict(format!("event {id} was handled meanwhile")));
        }
        let changed = reads.changed::<std::convert::Infallible>(
            |key| Ok(ReadSet::digest(self.state.get(key).map(Vec::as_slice))),
            |prefix, limit| Ok(self.keys(prefix, limit)),
        );
        match changed {
            Ok(None) => Ok(()),
            Ok(Some(conflict)) => Err(conflict),
            Err(never) => match never {},
        }
    }

    fn keys(&self, prefix: &str, limit: usize) -> Vec<String> {
        self.state
            .range(prefix.to_owned()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect()
    }

    fn apply(&mut self, commit: Commit) {
        for (key, value) in commit.writes {
            match value {
                Some(value) => self.state.insert(key, value),
                None => self.state.remove(&key),
            };
        }
        if let Some((id, nonce)) = &commit.fired
            && self.timers.get(id).and_then(|(_, t)| t.decode().ok()).is_some_and(|t| t.nonce == *nonce)
        {
            self.remove_timer(id);
        }
        for change in commit.timers {
            match change {
                TimerChange::Set(timer) => {
                    self.remove_timer(&timer.id);
                    self.timers_due.insert((timer.at_ms, timer.id.clone()));
                    self.timers.insert(timer.id.clone(), (timer.at_ms, Stored::Decoded(timer)));
                }
                TimerChange::Cancel(id) => {
                    self.remove_timer(&id);
                }
            }
        }
        if let Some(source) = commit.handled {
            self.handled.insert(source.clone(), commit.now_ms);
            if !commit.outbox.is_empty() {
                let seq = self.next_outbox;
                self.next_outbox += 1;
                self.outbox_by_source.insert(source.clone(), seq);
                let entry = OutboxEntry { source: source.clone(), created_ms: commit.now_ms, records: commit.outbox };
                self.outbox.insert(seq, (source, Stored::Decoded(entry)));
            }
        }
    }

    fn remove_timer(&mut self, id: &str) -> Option<Stored<Timer>> {
        let (at_ms, old) = self.timers.remove(id)?;
        self.timers_due.remove(&(at_ms, id.to_owned()));
        Some(old)
    }

    /// Timer `id`, or `None` when there is none or it was just quarantined.
    fn timer(&mut self, id: &str) -> Option<Timer> {
        match self.timers.get(id)?.1.decode() {
            Ok(timer) => Some(timer),
            Err(reason) => {
                if let Some(old) = self.remove_timer(id) {
                    self.quarantine(EntryKind::Timer, id, old.raw(), reason);
                }
                None
            }
        }
    }

    /// The outbox entry of sequence `seq`, or `None` when there is none or
    /// it was just quarantined.
    fn entry(&mut self, seq: u64) -> Option<OutboxEntry> {
        match self.outbox.get(&seq)?.1.decode() {
            Ok(entry) => Some(entry),
            Err(reason) => {
                let (source, old) = self.outbox.remove(&seq)?;
                self.outbox_by_source.remove(&source);
                self.quarantine(EntryKind::Outbox, &source, old.raw(), reason);
                None
            }
        }
    }

    fn quarantine(&mut self, kind: EntryKind, id: &str, raw: Vec<u8>, reason: String) {
        let at_ms = crate::clock::unix_ms(std::time::SystemTime::now());
        let entry = Quarantined { kind, id: id.to_owned(), raw, reason, at_ms };
        super::report(&"memory store", &entry);
        self.quarantine.push(entry);
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

    /// Writes `raw` as the stored body of a timer due at `at_ms` or of the
    /// outbox entry of event `id` (committed at `at_ms`), as a corrupt entry
    /// would be found (tests).
    #[cfg(test)]
    pub(super) fn write_raw(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        let mut maps = self.maps();
        match kind {
            EntryKind::Timer => {
                maps.remove_timer(id);
                maps.timers_due.insert((at_ms, id.to_owned()));
                maps.timers.insert(id.to_owned(), (at_ms, Stored::Raw(raw.to_vec())));
            }
            EntryKind::Outbox => {
                let seq = maps.next_outbox;
                maps.next_outbox += 1;
                maps.outbox_by_source.insert(id.to_owned(), seq);
                maps.outbox.insert(seq, (id.to_owned(), Stored::Raw(raw.to_vec())));
            }
        }
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        Ok(self.maps().state.get(key).cloned())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        Ok(self.maps().keys(prefix, limit))
    }

    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        check_commits(commits)?;
        let mut maps = self.maps();
        maps.check(commits, reads)?;
        for commit in commits {
            maps.apply(commit.clone());
        }
        Ok(Durable::done())
    }

    fn sync_point(&self) -> Durable {
        Durable::done()
    }

    fn prune_handled(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut maps = self.maps();
        let old: Vec<String> =
            maps.handled.iter().filter(|(_, at)| **at < before_ms).take(limit).map(|(id, _)| id.clone()).collect();
        for id in &old {
            maps.handled.remove(id);
        }
        Ok(old.len())
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        check_id(id)?;
        Ok(self.maps().handled.contains_key(id))
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        check_id(source)?;
        let mut maps = self.maps();
        let Some(seq) = maps.outbox_by_source.get(source).copied() else { return Ok(None) };
        Ok(maps.entry(seq))
    }

    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut maps = self.maps();
        let seqs: Vec<u64> = maps.outbox.keys().take(limit).copied().collect();
        Ok(seqs.into_iter().filter_map(|seq| maps.entry(seq)).collect())
    }

    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        let mut maps = self.maps();
        if let Some(seq) = maps.outbox_by_source.remove(source) {
            maps.outbox.remove(&seq);
        }
        Ok(())
    }

    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        check_id(id)?;
        Ok(self.maps().timer(id))
    }

    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let mut maps = self.maps();
        let due: Vec<String> =
            maps.timers_due.iter().take_while(|(at, _)| *at <= now_ms).take(limit).map(|(_, id)| id.clone()).collect();
        Ok(due.iter().filter_map(|id| maps.timer(id)).collect())
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        Ok(self.maps().timers.len() as u64)
    }

    fn outbox_count(&self) -> Result<u64, StoreError> {
        Ok(self.maps().outbox.len() as u64)
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        Ok(self.maps().quarantine.iter().rev().take(limit).cloned().collect())
    }

    fn corrupt_entries(&self) -> Result<CorruptEntries, StoreError> {
        let maps = self.maps();
        Ok(CorruptEntries {
            count: maps.quarantine.len() as u64,
            last_reason: maps.quarantine.last().map(Quarantined::describe),
        })
    }
}
