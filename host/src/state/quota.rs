//! Quotas on what one component keeps in total: state keys, state bytes,
//! timers and outbox entries. The per-call caps ([`super::TxnLimits`])
//! bound one call; these bound the sum of all of them (a guest setting 100
//! due timers per call, each setting 100 more, would otherwise grow
//! geometrically).
//!
//! A call's changes are checked as it makes them ([`super::Txn`]) against
//! the component's usage, read from the store in the background at most
//! every [`REFRESH`], and less often as the state grows (counting keys and
//! bytes reads the whole of a component's state, too slow for every call:
//! see [`refresh_after`]). A change past a quota is
//! refused with a message naming the quota, and the call fails for good
//! with it; deletes and cancels are never refused. Between two readings a
//! component may overshoot by one interval's writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{StateStore, StoreError};

/// How often the usage is read again, at most.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Readings take at most this share of the time between them (one in 50:
/// 2 % of a core while a component writes).
const READING_SHARE: u32 = 50;

/// When the usage is read again after a reading that took `took`: every
/// [`REFRESH`], or later once a reading costs more than 1/[`READING_SHARE`]
/// of that, so that a large state (a reading is a pass over all of it) does
/// not take a growing share of the machine.
pub fn refresh_after(took: Duration) -> Duration {
    REFRESH.max(took.saturating_mul(READING_SHARE)).min(REFRESH_AT_LEAST)
}

/// The usage is read again at least this often, however long one reading
/// took (one slow reading on a stalled database must not leave the quotas
/// checked against stale totals for minutes).
const REFRESH_AT_LEAST: Duration = Duration::from_secs(30);

/// The totals one component may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Keys of its state.
    pub max_keys: u64,
    /// Bytes of its state, keys and values.
    pub max_bytes: u64,
    /// Pending timers.
    pub max_timers: u64,
    /// Outbox entries not yet published.
    pub max_outbox: u64,
}

impl Default for StateLimits {
    /// [`crate::limits`]'s.
    fn default() -> Self {
        use crate::limits::{
            DEFAULT_MAX_OUTBOX_ENTRIES, DEFAULT_MAX_STATE_BYTES, DEFAULT_MAX_STATE_KEYS, DEFAULT_MAX_TIMERS_SET,
        };
        Self {
            max_keys: DEFAULT_MAX_STATE_KEYS,
            max_bytes: DEFAULT_MAX_STATE_BYTES,
            max_timers: DEFAULT_MAX_TIMERS_SET,
            max_outbox: DEFAULT_MAX_OUTBOX_ENTRIES,
        }
    }
}

/// What a component keeps, as last read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Keys of its state.
    pub keys: u64,
    /// Bytes of its state, keys and values.
    pub bytes: u64,
    /// Pending timers.
    pub timers: u64,
    /// Unpublished outbox entries.
    pub outbox: u64,
}

/// Which quota a refusal was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `max_state_keys`.
    Keys,
    /// `max_state_bytes`.
    Bytes,
    /// `max_timers`.
    Timers,
    /// `max_outbox_entries`.
    Outbox,
}

impl Quota {
    /// Every quota, in the order of [`StateQuota::refusals`].
    pub const ALL: [Quota; 4] = [Quota::Keys, Quota::Bytes, Quota::Timers, Quota::Outbox];

    /// The manifest setting that raises it.
    pub fn setting(self) -> &'static str {
        match self {
            Quota::Keys => "max_state_keys",
            Quota::Bytes => "max_state_bytes",
            Quota::Timers => "max_timers",
            Quota::Outbox => "max_outbox_entries",
        }
    }
}

/// One component's quotas, its usage as last read and the refusals made.
pub struct StateQuota {
    limits: StateLimits,
    store: Arc<dyn StateStore>,
    /// The last reading: the usage, when it was made and how long it took.
    usage: Mutex<Option<(Usage, Instant, Duration)>>,
    reading: Arc<AtomicBool>,
    refused: [AtomicU64; 4],
}

impl std::fmt::Debug for StateQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateQuota").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl StateQuota {
    /// Quotas `limits` on what `store` keeps.
    pub fn new(store: Arc<dyn StateStore>, limits: StateLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            store,
            usage: Mutex::new(None),
            reading: Arc::new(AtomicBool::new(false)),
            refused: Default::default(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> StateLimits {
        self.limits
    }

    /// Reads the usage from the store now.
    ///
    /// # Errors
    /// The store could not be read (the last reading stays).
    pub fn read_now(&self) -> Result<Usage, StoreError> {
        let started = Instant::now();
        let (keys, bytes) = self.store.data_usage()?;
        let usage = Usage { keys, bytes, timers: self.store.timer_count()?, outbox: self.store.outbox_count()? };
        let took = started.elapsed();
        *self.usage.lock().unwrap_or_else(PoisonError::into_inner) = Some((usage, Instant::now(), took));
        Ok(usage)
    }

    /// The usage as last read (`None` before the first reading), starting a
    /// reading in the background once that one is [`refresh_after`] old.
    pub fn usage(self: &Arc<Self>) -> Option<Usage> {
        let last = *self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let due = last.is_none_or(|(_, at, took)| at.elapsed() >= refresh_after(took));
        if due && !self.reading.swap(true, Ordering::SeqCst) {
            let quota = self.clone();
            let spawned = std::thread::Builder::new().name("state-usage".into()).spawn(move || {
                if let Err(err) = quota.read_now() {
                    tracing::warn!("cannot read the state's usage for its quotas: {err}");
                }
                quota.reading.store(false, Ordering::SeqCst);
            });
            if spawned.is_err() {
                self.reading.store(false, Ordering::SeqCst);
            }
        }
        last.map(|(usage, _, _)| usage)
    }

    /// Refusals made, per quota, in the order of [`Quota::ALL`].
    pub fn refusals(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.refused[i].load(Ordering::Relaxed))
    }

    /// Checks that `used` plus `adding` stays within `quota`; the refusal's
    /// message otherwise (counted).
    pub fn check(&self, quota: Quota, used: u64, adding: u64) -> Result<(), String> {
        let max = match quota {
            Quota::Keys => self.limits.max_keys,
            Quota::Bytes => self.limits.max_bytes,
            Quota::Timers => self.limits.max_timers,
            Quota::Outbox => self.limits.max_outbox,
        };
        if used.saturating_add(adding) <= max {
            return Ok(());
        }
        self.refused[Quota::ALL.iter().position(|q| *q == quota).unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
        let what = match quota {
            Quota::Keys => "state keys",
            Quota::Bytes => "bytes of state",
            Quota::Timers => "pending timers",
            Quota::Outbox => "unpublished outbox entries",
        };
        Err(format!(
            "quota {}: the component would keep {} {what}, more than its {max} (it keeps {used})",
            quota.setting(),
            used.saturating_add(adding)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small states are read every two seconds; a state whose reading
    /// takes 100 ms is read every 5 s, so readings stay at 2 % of a core.
    #[test]
    fn readings_space_out_as_they_grow_costly() {
        assert_eq!(refresh_after(Duration::ZERO), REFRESH);
        assert_eq!(refresh_after(Duration::from_millis(40)), REFRESH);
        assert_eq!(refresh_after(Duration::from_millis(100)), Duration::from_secs(5));
        assert_eq!(refresh_after(Duration::from_millis(500)), Duration::from_secs(25));
        assert_eq!(refresh_after(Duration::from_secs(10)), Duration::from_secs(30), "at least every 30 s");
    }
    use crate::state::{Commit, DurableStore, MemoryStore};

    /// Every adapter counts a component's keys and bytes (keys plus values),
    /// its own only.
    fn counts_keys_and_bytes(store: &dyn StateStore) {
        assert_eq!(store.data_usage().unwrap(), (0, 0));
        let writes = vec![("ab".to_owned(), Some(b"xyz".to_vec())), ("c".to_owned(), Some(vec![0u8; 100]))];
        store.commit(Commit { writes, now_ms: 1, ..Commit::default() }).unwrap().wait_blocking().unwrap();
        assert_eq!(store.data_usage().unwrap(), (2, 2 + 3 + 1 + 100));
        let writes = vec![("c".to_owned(), None)];
        store.commit(Commit { writes, now_ms: 2, ..Commit::default() }).unwrap().wait_blocking().unwrap();
        assert_eq!(store.data_usage().unwrap(), (1, 5));
    }

    #[test]
    fn usage_is_read_from_every_backend() {
        counts_keys_and_bytes(&MemoryStore::default());
        let dir = std::env::temp_dir().join(format!("quota-{}", uuid::Uuid::new_v4().simple()));
        counts_keys_and_bytes(&DurableStore::open(&dir.join("q.redb")).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        let schema = crate::state::contract::TestSchema::new();
        let other = schema.stores.store("other");
        let writes = vec![("elsewhere".to_owned(), Some(b"1".to_vec()))];
        other.commit(Commit { writes, now_ms: 1, ..Commit::default() }).unwrap().wait_blocking().unwrap();
        counts_keys_and_bytes(&schema.stores.store("mine"));
    }

    #[test]
    fn a_refusal_names_its_quota_and_is_counted() {
        let quota =
            StateQuota::new(Arc::new(MemoryStore::default()), StateLimits { max_timers: 2, ..StateLimits::default() });
        assert!(quota.check(Quota::Timers, 1, 1).is_ok());
        let reason = quota.check(Quota::Timers, 1, 2).unwrap_err();
        assert!(reason.contains("quota max_timers") && reason.contains("keep 3 pending timers"), "{reason}");
        assert_eq!(quota.refusals(), [0, 0, 1, 0]);
        assert!(quota.usage().is_none(), "nothing read yet");
        let read = quota.read_now().unwrap();
        assert_eq!(read, Usage::default());
    }
}
