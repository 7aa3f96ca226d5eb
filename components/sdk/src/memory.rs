//! In-memory [`Host`] for native unit tests of service logic.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use crate::{Host, Level, StateError};

/// A [`Host`] whose state, clock, config and log live in memory.
#[derive(Debug, Default)]
pub struct MemoryHost {
    /// The service's key-value state.
    pub state: BTreeMap<String, Vec<u8>>,
    /// Config values as the manifest would give them.
    pub config: HashMap<String, String>,
    /// Current time returned by [`Host::now_ms`].
    pub now_ms: u64,
    /// Every line logged, in order.
    pub logs: RefCell<Vec<(Level, String)>>,
}

impl MemoryHost {
    /// An empty host at time `now_ms`.
    pub fn at(now_ms: u64) -> Self {
        Self { now_ms, ..Self::default() }
    }

    /// Sets a config value.
    pub fn with_config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }
}

impl Host for MemoryHost {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.state.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.state.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StateError> {
        self.state.remove(key);
        Ok(())
    }

    fn list_keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StateError> {
        Ok(self
            .state
            .range(prefix.to_owned()..)
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(prefix))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn config(&self, key: &str) -> Option<String> {
        self.config.get(key).cloned()
    }

    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.logs.borrow_mut().push((level, format!("{message} {}", fields.join(" "))));
    }
}
