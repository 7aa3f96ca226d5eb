//! The in-memory twin of the durable store, for fast tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use super::{Commit, Durable, OutboxEntry, ReadSet, StateStore, StoreError, Timer, TimerChange};

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
    /// Refuses a batch that read something changed since, or whose event
    /// was handled already.
    fn check(&self, commits: &[Commit], reads: &ReadSet) -> Result<(), StoreError> {
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
        Ok(self.maps().keys(prefix, limit))
    }

    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
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
