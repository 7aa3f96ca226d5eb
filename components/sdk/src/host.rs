//! The outbound ports a service sees: state, timers, logging, clock and
//! configuration.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandleError;

/// Log severity, mirroring the WIT `log.level` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Failure of the state port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The store is unavailable right now; retrying may help.
    Unavailable(String),
    /// The request itself was invalid (e.g. a write during a query).
    Invalid(String),
}

impl From<StateError> for HandleError {
    fn from(err: StateError) -> Self {
        match err {
            StateError::Unavailable(msg) => HandleError::Retryable(format!("state unavailable: {msg}")),
            StateError::Invalid(msg) => HandleError::Permanent(format!("invalid state access: {msg}")),
        }
    }
}

/// A card redeemed from the host's vault (WIT `vault.card`).
pub use shop_events::card::Card;

/// Why a vault token could not be redeemed (WIT `vault.vault-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultError {
    /// No such token (never issued, or expired and removed).
    Unknown,
    /// The token expired.
    Expired,
    /// The vault cannot be read now (or is not granted): retrying may help.
    Unavailable(String),
}

/// What the host offers a service. Implemented by the WIT imports in a
/// component and by [`crate::MemoryHost`] in native tests.
pub trait Host {
    /// Reads a key of the service's private state.
    ///
    /// # Errors
    /// [`StateError::Unavailable`] when the store cannot be read.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError>;

    /// Writes a key. During `handle`, visible to later events only if the
    /// call succeeds.
    ///
    /// # Errors
    /// [`StateError::Invalid`] during a query (state is read-only there) or
    /// for oversized entries; [`StateError::Unavailable`] on store failure.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StateError>;

    /// Deletes a key; deleting a missing key is not an error.
    ///
    /// # Errors
    /// As for [`Host::set`].
    fn delete(&mut self, key: &str) -> Result<(), StateError>;

    /// Keys starting with `prefix`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`StateError::Unavailable`] when the store cannot be read.
    fn list_keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StateError>;

    /// Sets timer `id` (replacing a pending one with the same id) to deliver,
    /// at `at_ms`, an event on [`crate::TIMER_TOPIC`] with this type, key and
    /// JSON payload back to this service. Like state writes, the change takes
    /// effect only if the current `handle` call succeeds.
    ///
    /// # Errors
    /// [`StateError::Invalid`] during a query or for an invalid timer;
    /// [`StateError::Unavailable`] on store failure.
    fn schedule(&mut self, id: &str, at_ms: u64, event_type: &str, key: &str, payload: &[u8])
    -> Result<(), StateError>;

    /// Cancels timer `id`; cancelling an unknown timer is not an error.
    ///
    /// # Errors
    /// As for [`Host::schedule`].
    fn cancel(&mut self, id: &str) -> Result<(), StateError>;

    /// Milliseconds since the Unix epoch, from the host's clock.
    fn now_ms(&self) -> u64;

    /// The time deadlines carried in events are measured by: the wall clock
    /// less the time the host could not reach the broker lately, so that a
    /// deadline measures the other side's silence, not the host's outage.
    fn deadline_now_ms(&self) -> u64 {
        self.now_ms()
    }

    /// A value of the service's `[components.NAME.config]` table.
    fn config(&self, key: &str) -> Option<String>;

    /// Emits a structured log line through the host's logger.
    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]);

    /// The card a vault token stands for. Only a component granted the
    /// vault may call it (the host refuses to load any other that does).
    ///
    /// # Errors
    /// [`VaultError::Unknown`] or [`VaultError::Expired`] for a token that
    /// cannot be redeemed; [`VaultError::Unavailable`] when the vault cannot
    /// be read now.
    fn redeem_card(&self, token: &str) -> Result<Card, VaultError> {
        let _ = token;
        Err(VaultError::Unavailable("this host offers no vault".into()))
    }

    /// Reads and decodes a JSON value.
    ///
    /// # Errors
    /// Retryable if the store is unavailable, permanent if the stored bytes
    /// are not the expected JSON.
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, HandleError> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|err| HandleError::Permanent(format!("corrupt state at {key:?}: {err}"))),
        }
    }

    /// Encodes and writes a JSON value.
    ///
    /// # Errors
    /// As for [`Host::set`].
    fn put_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), HandleError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|err| HandleError::Permanent(format!("cannot encode state at {key:?}: {err}")))?;
        Ok(self.set(key, &bytes)?)
    }

    /// Schedules a timer whose payload is `payload` encoded as JSON.
    ///
    /// # Errors
    /// As for [`Host::schedule`]; permanent if `payload` cannot be encoded.
    fn schedule_json<T: Serialize>(
        &mut self,
        id: &str,
        at_ms: u64,
        event_type: &str,
        key: &str,
        payload: &T,
    ) -> Result<(), HandleError> {
        let bytes = serde_json::to_vec(payload)
            .map_err(|err| HandleError::Permanent(format!("cannot encode timer {id:?}: {err}")))?;
        Ok(self.schedule(id, at_ms, event_type, key, &bytes)?)
    }

    /// A config value parsed as `T`, or `default` when absent.
    ///
    /// # Errors
    /// Permanent when the value is present but does not parse.
    fn config_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, HandleError> {
        match self.config(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| HandleError::Permanent(format!("config {key:?} has an invalid value {raw:?}"))),
        }
    }
}
