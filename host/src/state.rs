//! The state port's adapters: a store per component, and the per-call
//! transaction that makes one `handle` call's writes all-or-nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

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

/// A component's key-value store.
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

    /// Applies all `writes` atomically: readers see all of them or none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; then nothing was applied.
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;
}

/// In-memory store: the embedded default and the twin for tests.
///
/// A `std::sync::Mutex` is right here: every critical section is a map
/// operation that never awaits.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (each commit is applied by infallible inserts), so poison is harmless.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map().get(key).cloned())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .map()
            .range(prefix.to_owned()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut map = self.map();
        for (key, value) in writes {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
        Ok(())
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
    read_only: bool,
}

impl Txn {
    /// A transaction for a `handle` call.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store, writes: BTreeMap::new(), read_only: false }
    }

    /// A read-only view for a `query` call.
    pub fn read_only(store: Arc<dyn StateStore>) -> Self {
        Self { store, writes: BTreeMap::new(), read_only: true }
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

    /// The writes to commit, in key order.
    pub fn into_writes(self) -> Vec<Write> {
        self.writes.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(pairs: &[(&str, &str)]) -> Arc<dyn StateStore> {
        let store = MemoryStore::default();
        store.commit(pairs.iter().map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec()))).collect()).unwrap();
        Arc::new(store)
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
        store.commit(txn.into_writes()).unwrap();
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
