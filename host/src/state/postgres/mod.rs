//! The shared state adapter: every component's state in one PostgreSQL
//! database, so that any number of hosts can serve a component.
//!
//! Tables (in the configured schema) hold all components' rows, each keyed
//! by the component's name: `state`, `handled`, `outbox`, `timers`, and
//! `quarantine` for timers and outbox entries found undecodable. One
//! batch of events is one transaction, committed at `READ COMMITTED` with
//! optimistic concurrency control checked under locks:
//!
//! 1. The batch takes a transaction-scoped advisory lock on every key it
//!    read or writes, in ascending order of their 64-bit hashes (so two
//!    batches never wait for each other in a cycle). A batch that listed
//!    keys takes the component's key-space lock exclusively; any batch that
//!    writes takes it shared, so a listing never misses a key inserted
//!    concurrently.
//! 2. Holding them, it re-reads what it read and compares (SHA-256 of each
//!    value, absent included; the keys of each listing). Any difference is
//!    a [`StoreError::Conflict`]: the transaction is rolled back and the
//!    executor handles the events again on fresh state.
//! 3. It inserts the handled ids (`ON CONFLICT DO NOTHING`): an id another
//!    host committed meanwhile inserts nothing, which is also a conflict (a
//!    concurrent insert of the same id waits for the other transaction and
//!    then sees it).
//! 4. It writes state, timers and outbox, forgets published outbox entries
//!    and commits.
//!
//! Two batches that touch a common key thus commit one after the other,
//! the second validating against what the first committed: the commits are
//! serializable with respect to the keys they share, and the others commute.
//! `SERIALIZABLE` would give the same guarantee, but its predicate locks on
//! index pages make concurrent hosts abort each other for unrelated keys
//! (every batch inserts into `handled`).
//!
//! Reads outside a commit (guest reads, dedup checks, queries) are single
//! statements on a pooled connection. Timers and stale outbox entries are
//! claimed with `FOR UPDATE SKIP LOCKED` and a lease, so each is delivered
//! by one live host and a dead host's are picked up once its lease expires.
//!
//! The state port is synchronous (it is called from executor threads and
//! blocking tasks): the adapter runs its own small tokio runtime for the
//! driver and the pool, and blocks the caller on a channel, never on the
//! caller's runtime.

mod commit;
mod reads;
mod schema;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Timeouts};
use tokio_postgres::error::SqlState;

use super::{EntryKind, Quarantined, StoreError};
use schema::{Sql, migrate};

/// Connections per host, shared by its components.
const POOL_SIZE: usize = 16;
/// Longest wait for a connection (also bounds connecting): past it, the
/// store is reported unavailable and the caller retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How much longer than its timeouts a call waits for a database that does
/// not answer at all before giving up.
const UNANSWERED_SLACK: Duration = Duration::from_secs(1);
/// How often published outbox entries no commit carried are deleted.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// How long a session may wait, so that a host frozen or cut off mid-commit
/// (holding its advisory locks) holds the other hosts up for no longer than
/// these: the server cancels a lock wait past `lock`, a statement past
/// `statement`, and ends a session idle inside a transaction past
/// `idle_in_transaction` (rolling it back and releasing its locks); the host
/// gives up a commit past `commit` and closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimeouts {
    /// `lock_timeout`: longest wait for a lock (a key's, the key space's).
    pub lock: Duration,
    /// `statement_timeout`: longest statement.
    pub statement: Duration,
    /// `idle_in_transaction_session_timeout`: longest pause inside a transaction.
    pub idle_in_transaction: Duration,
    /// The deadline of a whole commit, waiting for a connection included.
    pub commit: Duration,
}

impl Default for PgTimeouts {
    /// [`crate::limits`]'s: 2 s for a lock, 5 s for a statement or a pause
    /// in a transaction, 10 s for a commit.
    fn default() -> Self {
        use crate::limits::{
            DEFAULT_PG_COMMIT_TIMEOUT_MS, DEFAULT_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS, DEFAULT_PG_LOCK_TIMEOUT_MS,
            DEFAULT_PG_STATEMENT_TIMEOUT_MS,
        };
        let ms = Duration::from_millis;
        Self {
            lock: ms(DEFAULT_PG_LOCK_TIMEOUT_MS),
            statement: ms(DEFAULT_PG_STATEMENT_TIMEOUT_MS),
            idle_in_transaction: ms(DEFAULT_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS),
            commit: ms(DEFAULT_PG_COMMIT_TIMEOUT_MS),
        }
    }
}

impl From<&crate::manifest::StateSettings> for PgTimeouts {
    /// The timeouts the manifest's `[state]` settings give.
    fn from(settings: &crate::manifest::StateSettings) -> Self {
        let ms = Duration::from_millis;
        Self {
            lock: ms(settings.lock_timeout_ms),
            statement: ms(settings.statement_timeout_ms),
            idle_in_transaction: ms(settings.idle_in_transaction_timeout_ms),
            commit: ms(settings.commit_timeout_ms),
        }
    }
}

impl PgTimeouts {
    /// The session settings, as startup options.
    fn options(&self) -> String {
        let ms = |d: Duration| d.as_millis().max(1);
        format!(
            "-c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            ms(self.lock),
            ms(self.statement),
            ms(self.idle_in_transaction)
        )
    }
}

/// The connection shared by every component of a host: a pool on a
/// runtime of its own.
pub struct PgStores {
    backend: Arc<Backend>,
}

struct Backend {
    pool: Pool,
    /// The sessions' timeouts and the commit's deadline.
    timeouts: PgTimeouts,
    runtime: Option<tokio::runtime::Runtime>,
    /// The schema's name, checked to be a plain identifier.
    schema: String,
    /// Where the database is, without the password: for error messages.
    target: String,
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused on an async worker.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Backend {
    /// Runs `work` on the adapter's runtime and waits for it here.
    fn block<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let runtime = self.runtime.as_ref().ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        let deadline = super::read_deadline();
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            // Nothing is started for a guest reading past its deadline: at
            // most one read per call outlives it.
            return Err(StoreError::Unavailable("the call's deadline passed".into()));
        }
        let joined = match deadline {
            // Any other call gives up too, when the database does not
            // answer within the timeouts (a network partition: the server's
            // own timeouts cannot reach us), so that the caller says so
            // (a failed commit is logged and retried, `/health` reports the
            // store) instead of hanging until TCP keepalive notices.
            None => {
                let limit = self.timeouts.statement.max(self.timeouts.commit) + UNANSWERED_SLACK;
                let target = self.target.clone();
                futures::executor::block_on(runtime.spawn(async move {
                    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                        Err(StoreError::Unavailable(format!("{target} did not answer within {limit:?}")))
                    })
                }))
            }
            // A guest call's read: it gives up at the call's deadline (the
            // task finishes on its own; it only reads).
            Some(deadline) => {
                let task = runtime.spawn(work);
                runtime.handle().block_on(async move { tokio::time::timeout_at(deadline.into(), task).await }).map_err(
                    |_| StoreError::Unavailable(format!("{} did not answer before the call's deadline", self.target)),
                )?
            }
        };
        joined.map_err(|err| StoreError::Unavailable(format!("PostgreSQL task failed: {err}")))?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|err| {
            StoreError::Unavailable(format!("cannot reach PostgreSQL at {}: {}", self.target, pool_error(&err)))
        })
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }
}

fn pool_error(err: &deadpool_postgres::PoolError) -> String {
    match err {
        deadpool_postgres::PoolError::Backend(err) => db_error(err),
        deadpool_postgres::PoolError::Timeout(_) => "timed out waiting for a connection".into(),
        err => err.to_string(),
    }
}

/// The server's own message when there is one (the driver's display is
/// only "db error").
fn db_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Maps a driver error: lost races are conflicts; what no retry can pass
/// (a data exception, SQLSTATE class 22: NUL in text 22021, an
/// untranslatable character 22P05, a value too long 22001; or a program
/// limit, class 54: an index entry over ~2.7 KB 54000) is refused for good;
/// the rest (timeouts, lost connections, a server shutting down) is
/// unavailability, retried.
fn classify(err: &tokio_postgres::Error) -> StoreError {
    let conflict =
        [&SqlState::T_R_SERIALIZATION_FAILURE, &SqlState::T_R_DEADLOCK_DETECTED, &SqlState::UNIQUE_VIOLATION];
    match err.code() {
        Some(code) if conflict.contains(&code) => StoreError::Conflict(db_error(err)),
        Some(code) if is_permanent(code) => StoreError::Refused(format!("PostgreSQL: {}", db_error(err))),
        _ => StoreError::Unavailable(format!("PostgreSQL: {}", db_error(err))),
    }
}

/// Whether an error of SQLSTATE `code` comes again however often the same
/// statement is retried.
fn is_permanent(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("22") || code.starts_with("54")
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl PgStores {
    /// Connects to the database at `url`, creates `schema` and applies the
    /// migrations it lacks (hosts starting together take turns).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the database: an invalid URL or
    /// schema name, a server that cannot be reached, or a failed migration.
    pub fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, schema, PgTimeouts::default())
    }

    /// [`PgStores::connect`] with the sessions' `timeouts`.
    ///
    /// # Errors
    /// As [`PgStores::connect`].
    pub fn connect_with(url: &str, schema: &str, timeouts: PgTimeouts) -> Result<Self, StoreError> {
        let target = redact(url);
        if schema.is_empty()
            || schema.len() > 63
            || !schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            || !schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(StoreError::Unavailable(format!(
                "invalid schema name {schema:?}: lowercase letters, digits and _ only"
            )));
        }
        let config: tokio_postgres::Config =
            url.parse().map_err(|err| StoreError::Unavailable(format!("invalid PostgreSQL URL {target}: {err}")))?;
        let mut config = config;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("shop-host");
        config.options(timeouts.options());
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|err| StoreError::Unavailable(format!("cannot start the PostgreSQL runtime: {err}")))?;
        let pool_timeouts =
            Timeouts { wait: Some(CONNECT_TIMEOUT), create: Some(CONNECT_TIMEOUT), recycle: Some(CONNECT_TIMEOUT) };
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .timeouts(pool_timeouts)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|err| StoreError::Unavailable(format!("cannot build the PostgreSQL pool: {err}")))?
        };
        let backend = Arc::new(Backend { pool, timeouts, runtime: Some(runtime), schema: schema.to_owned(), target });
        let migrating = backend.clone();
        backend.block(async move { migrate(&migrating).await })?;
        Ok(Self { backend })
    }

    /// The store of `component`.
    pub fn store(&self, component: &str) -> PostgresStore {
        let store = PostgresStore {
            backend: self.backend.clone(),
            component: component.to_owned(),
            cleared: Arc::new(Mutex::new(Vec::new())),
            sql: Arc::new(Sql::new(&self.backend)),
        };
        store.start_forgetting();
        store
    }
}

/// A component's store in the shared database.
pub struct PostgresStore {
    backend: Arc<Backend>,
    component: String,
    /// Outbox entries published since the last commit, deleted by the next
    /// (or by the forgetter within a second); hidden from readers meanwhile.
    cleared: Arc<Mutex<Vec<String>>>,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("component", &self.component).finish_non_exhaustive()
    }
}

/// Milliseconds as PostgreSQL's `bigint`.
fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Hash of a lock name as PostgreSQL's advisory lock key. FNV-1a: stable
/// across hosts and versions, which the std hasher does not promise.
fn lock_key(component: &str, kind: &str, name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in component.bytes().chain([0]).chain(kind.bytes()).chain([0]).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The exclusive upper bound of keys starting with `prefix` in byte order
/// (the `"C"` collation's, which is UTF-8's code point order): the prefix
/// with its last character that has a successor moved to it, the
/// characters after it (U+10FFFF) dropped. (`prefix` followed by U+10FFFF
/// would leave out keys with U+10FFFF right after the prefix.) A prefix of
/// U+10FFFF only, or none, is bounded by a text above every storable key.
fn prefix_end(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            last => char::from_u32(u32::from(last) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return chars.into_iter().collect();
        }
    }
    "\u{10FFFF}".repeat(super::MAX_KEY_BYTES / 4 + 1)
}

impl PostgresStore {
    /// Runs `work` with a pooled connection, on the adapter's runtime.
    fn with<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object, Arc<Sql>, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let (backend, sql, component) = (self.backend.clone(), self.sql.clone(), self.component.clone());
        self.backend.block(async move {
            let client = backend.client().await?;
            work(client, sql, component).await.map_err(|err| classify(&err))
        })
    }

    /// Moves the undecodable entries `found` (`(id, body, reason)`) of `kind`
    /// to the quarantine; logs those this host moved.
    fn quarantine(&self, kind: EntryKind, found: Vec<(String, String, String)>) -> Result<(), StoreError> {
        if found.is_empty() {
            return Ok(());
        }
        let moved = self.with(move |client, sql, component| async move {
            let statement = match kind {
                EntryKind::Timer => &sql.quarantine_timer,
                EntryKind::Outbox => &sql.quarantine_outbox,
            };
            let statement = client.prepare_cached(statement).await?;
            let mut moved = Vec::new();
            for (id, body, reason) in found {
                let row = client.query_opt(&statement, &[&component, &id, &body, &kind.as_str(), &reason]).await?;
                if let Some(row) = row {
                    let at_ms = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
                    moved.push(Quarantined { kind, id, raw: body.into_bytes(), reason, at_ms });
                }
            }
            Ok(moved)
        })?;
        for entry in &moved {
            super::report(self, entry);
        }
        Ok(())
    }

    /// Writes `raw` as the stored body of a timer due at `at_ms` or of the
    /// outbox records of event `id` (committed at `at_ms`), as a corrupt entry
    /// would be found (tests).
    #[cfg(test)]
    pub(super) fn write_raw(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        let (id, body) = (id.to_owned(), String::from_utf8(raw.to_vec()).unwrap());
        let (timers, outbox) = (self.backend.table("timers"), self.backend.table("outbox"));
        self.with(move |client, _, component| async move {
            let statement = match kind {
                EntryKind::Timer => {
                    format!("INSERT INTO {timers} (component, id, at_ms, timer) VALUES ($1, $2, $3, $4)")
                }
                EntryKind::Outbox => {
                    format!("INSERT INTO {outbox} (component, source, created_ms, records) VALUES ($1, $2, $3, $4)")
                }
            };
            client.execute(&statement, &[&component, &id, &ms(at_ms), &body]).await
        })
        .unwrap();
    }

    fn cleared(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.cleared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes published outbox entries no commit carried, every second,
    /// until the store is dropped.
    fn start_forgetting(&self) {
        let Some(runtime) = self.backend.runtime.as_ref() else { return };
        let cleared = Arc::downgrade(&self.cleared);
        let (backend, sql, component) = (Arc::downgrade(&self.backend), self.sql.clone(), self.component.clone());
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(FORGET_EVERY).await;
                let (Some(cleared), Some(backend)) = (cleared.upgrade(), backend.upgrade()) else { return };
                let sources = cleared.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if sources.is_empty() {
                    continue;
                }
                let forgotten = async {
                    let client = backend.client().await?;
                    async {
                        let forget = client.prepare_cached(&sql.forget).await?;
                        client.execute(&forget, &[&component, &sources]).await
                    }
                    .await
                    .map_err(|err| classify(&err))
                };
                match forgotten.await {
                    Ok(_) => cleared.lock().unwrap_or_else(PoisonError::into_inner).retain(|s| !sources.contains(s)),
                    // Harmless: hidden meanwhile, tried again.
                    Err(err) => tracing::debug!(%component, "cannot forget published outbox entries yet: {err}"),
                }
            }
        });
    }
}

impl PostgresStore {
    /// Takes the advisory lock of `key`, as a commit does, in a transaction
    /// left open: a host frozen mid-commit, as the other hosts meet it
    /// (tests). The transaction lasts until the returned session is dropped
    /// or the server ends it.
    #[cfg(test)]
    pub(super) fn freeze_holding(&self, key: &str) -> deadpool_postgres::Object {
        let lock = lock_key(&self.component, "key", key);
        let backend = self.backend.clone();
        self.backend
            .block(async move {
                let client = backend.client().await?;
                client.batch_execute("BEGIN").await.map_err(|err| classify(&err))?;
                client.execute("SELECT pg_advisory_xact_lock($1)", &[&lock]).await.map_err(|err| classify(&err))?;
                Ok(client)
            })
            .unwrap()
    }

    /// The value of a session setting on a pooled connection (tests).
    #[cfg(test)]
    pub(super) fn setting(&self, name: &str) -> String {
        let statement = format!("SELECT current_setting('{name}')");
        self.with(move |client, _, _| async move { Ok(client.query_one(&statement, &[]).await?.get(0)) }).unwrap()
    }

    /// Runs `statement` with `text` bound as its one parameter (tests).
    #[cfg(test)]
    pub(super) fn run_with(&self, statement: &'static str, text: String) -> Result<(), StoreError> {
        self.with(move |client, _, _| async move { client.execute(statement, &[&text]).await.map(|_| ()) })
    }
}

#[cfg(test)]
mod timeouts_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/shop"), "postgres://app:***@db:5432/shop");
        assert_eq!(redact("postgres://app@db/shop"), "postgres://app@db/shop");
        assert_eq!(redact("host=db user=app"), "host=db user=app");
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("order", "key", "stock/lamp"), lock_key("order", "key", "stock/lamp"));
        assert_ne!(lock_key("order", "key", "stock/lamp"), lock_key("payment", "key", "stock/lamp"));
        assert_ne!(lock_key("a", "key", "bc"), lock_key("ab", "key", "c"));
    }

    #[test]
    fn prefix_ends_bound_exactly_the_keys_with_the_prefix() {
        assert_eq!(prefix_end("ab"), "ac");
        assert_eq!(prefix_end("a\u{10FFFF}"), "b");
        assert_eq!(prefix_end("a\u{D7FF}"), "a\u{E000}");
        assert_eq!(prefix_end(""), "\u{10FFFF}".repeat(257));
        for key in ["a\u{10FFFF}", "a\u{10FFFF}x", "a\u{10FFFF}\u{10FFFF}"] {
            assert!(key.as_bytes() < prefix_end("a").as_bytes(), "{key:?}");
        }
        assert!("\u{10FFFF}".repeat(256).as_bytes() < prefix_end("").as_bytes());
    }

    #[test]
    fn a_bad_schema_name_is_refused_before_connecting() {
        let err = PgStores::connect("postgres://nobody@127.0.0.1:1/x", "drop table;").err().unwrap().to_string();
        assert!(err.contains("invalid schema name"), "{err}");
    }
}
