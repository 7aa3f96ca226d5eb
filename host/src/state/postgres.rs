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

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Timeouts};
use tokio_postgres::error::SqlState;

use super::{
    Commit, CorruptEntries, Durable, EntryKind, OutboxEntry, OutboxRecord, Quarantined, ReadSet, StateStore,
    StoreError, Timer, TimerChange, decode_entry,
};

/// Connections per host, shared by its components.
const POOL_SIZE: usize = 16;
/// Longest wait for a connection (also bounds connecting): past it, the
/// store is reported unavailable and the caller retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often published outbox entries no commit carried are deleted.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// The schema, one statement per step; applied in order, each once.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.state (
    component text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (component, key)
);
CREATE TABLE {s}.handled (
    component text NOT NULL,
    event_id text NOT NULL,
    handled_ms bigint NOT NULL,
    PRIMARY KEY (component, event_id)
);
CREATE TABLE {s}.outbox (
    seq bigserial PRIMARY KEY,
    component text NOT NULL,
    source text NOT NULL,
    created_ms bigint NOT NULL,
    records text NOT NULL,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    UNIQUE (component, source)
);
CREATE INDEX outbox_by_component ON {s}.outbox (component, seq);
CREATE TABLE {s}.timers (
    component text NOT NULL,
    id text NOT NULL,
    at_ms bigint NOT NULL,
    timer text NOT NULL,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (component, id)
);
CREATE INDEX timers_due ON {s}.timers (component, at_ms, id);
"#,
    r#"
CREATE TABLE {s}.quarantine (
    seq bigserial PRIMARY KEY,
    component text NOT NULL,
    kind text NOT NULL,
    id text NOT NULL,
    raw bytea NOT NULL,
    reason text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX quarantine_by_component ON {s}.quarantine (component, seq);
"#,
];

/// The connection shared by every component of a host: a pool on a
/// runtime of its own.
pub struct PgStores {
    backend: Arc<Backend>,
}

struct Backend {
    pool: Pool,
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
        let task = runtime.spawn(work);
        let joined = match deadline {
            None => futures::executor::block_on(task),
            // A guest call's read: it gives up at the call's deadline (the
            // task finishes on its own; it only reads).
            Some(deadline) => {
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

/// Maps a driver error: lost races are conflicts, the rest unavailability.
fn classify(err: &tokio_postgres::Error) -> StoreError {
    let conflict =
        [&SqlState::T_R_SERIALIZATION_FAILURE, &SqlState::T_R_DEADLOCK_DETECTED, &SqlState::UNIQUE_VIOLATION];
    match err.code() {
        Some(code) if conflict.contains(&code) => StoreError::Conflict(db_error(err)),
        _ => StoreError::Unavailable(format!("PostgreSQL: {}", db_error(err))),
    }
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
        let timeouts =
            Timeouts { wait: Some(CONNECT_TIMEOUT), create: Some(CONNECT_TIMEOUT), recycle: Some(CONNECT_TIMEOUT) };
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .timeouts(timeouts)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|err| StoreError::Unavailable(format!("cannot build the PostgreSQL pool: {err}")))?
        };
        let backend = Arc::new(Backend { pool, runtime: Some(runtime), schema: schema.to_owned(), target });
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

async fn migrate(backend: &Backend) -> Result<(), StoreError> {
    let mut client = backend.client().await?;
    let failed = |err: tokio_postgres::Error| {
        StoreError::Unavailable(format!("cannot migrate the schema at {}: {}", backend.target, db_error(&err)))
    };
    let tx = client.transaction().await.map_err(failed)?;
    // One migrator at a time across hosts; released with the transaction.
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('shop-host migrations', 0))", &[])
        .await
        .map_err(failed)?;
    let s = &backend.schema;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .map_err(failed)?;
    let applied: i32 = tx
        .query_one(&format!("SELECT coalesce(max(version), 0) FROM {s}.migrations"), &[])
        .await
        .map_err(failed)?
        .get(0);
    for (index, migration) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        if version <= applied {
            continue;
        }
        tx.batch_execute(&migration.replace("{s}", s)).await.map_err(failed)?;
        tx.execute(&format!("INSERT INTO {s}.migrations (version) VALUES ($1)"), &[&version]).await.map_err(failed)?;
        tracing::info!(schema = %s, version, "applied a state schema migration");
    }
    tx.commit().await.map_err(failed)
}

/// The statements of a store, with the schema filled in.
struct Sql {
    get: String,
    keys: String,
    was_handled: String,
    handled_among: String,
    outbox: String,
    pending_outbox: String,
    forget: String,
    timer: String,
    due_timers: String,
    claim_timers: String,
    claim_outbox: String,
    timer_count: String,
    data_usage: String,
    outbox_count: String,
    lock: String,
    lock_keyspace_shared: String,
    lock_keyspace: String,
    validate: String,
    insert_handled: String,
    upsert: String,
    delete: String,
    delete_fired: String,
    set_timer: String,
    cancel_timer: String,
    insert_outbox: String,
    quarantine_timer: String,
    quarantine_outbox: String,
    quarantined: String,
    corrupt_entries: String,
}

impl Sql {
    fn new(backend: &Backend) -> Self {
        let state = backend.table("state");
        let handled = backend.table("handled");
        let outbox = backend.table("outbox");
        let timers = backend.table("timers");
        let quarantine = backend.table("quarantine");
        // Moves a row only if it still holds the body found: a commit may
        // have replaced it meanwhile, and another host may have moved it.
        let quarantine_from = |table: &str, id: &str, body: &str| {
            format!(
                "WITH moved AS (DELETE FROM {table} WHERE component = $1 AND {id} = $2 AND {body} = $3 RETURNING {id}, {body})
                 INSERT INTO {quarantine} (component, kind, id, raw, reason, at_ms)
                 SELECT $1, $4, {id}, convert_to({body}, 'UTF8'), $5, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                 FROM moved RETURNING at_ms"
            )
        };
        Self {
            quarantine_timer: quarantine_from(&timers, "id", "timer"),
            quarantine_outbox: quarantine_from(&outbox, "source", "records"),
            quarantined: format!(
                "SELECT kind, id, raw, reason, at_ms FROM {quarantine} WHERE component = $1 ORDER BY seq DESC LIMIT $2"
            ),
            corrupt_entries: format!(
                "SELECT count(*) OVER (), kind, id, reason FROM {quarantine} WHERE component = $1 ORDER BY seq DESC LIMIT 1"
            ),
            get: format!("SELECT value FROM {state} WHERE component = $1 AND key = $2"),
            keys: format!(
                "SELECT key FROM {state} WHERE component = $1 AND key >= $2 AND key < $3 AND starts_with(key, $2) ORDER BY key LIMIT $4"
            ),
            was_handled: format!("SELECT 1 FROM {handled} WHERE component = $1 AND event_id = $2"),
            handled_among: format!("SELECT event_id FROM {handled} WHERE component = $1 AND event_id = ANY($2)"),
            outbox: format!("SELECT created_ms, records FROM {outbox} WHERE component = $1 AND source = $2"),
            pending_outbox: format!(
                "SELECT source, created_ms, records FROM {outbox} WHERE component = $1 ORDER BY seq LIMIT $2"
            ),
            forget: format!("DELETE FROM {outbox} WHERE component = $1 AND source = ANY($2)"),
            timer: format!("SELECT timer FROM {timers} WHERE component = $1 AND id = $2"),
            due_timers: format!(
                "SELECT id, timer FROM {timers} WHERE component = $1 AND at_ms <= $2 ORDER BY at_ms, id LIMIT $3"
            ),
            claim_timers: format!(
                "UPDATE {timers} t SET lease_until = clock_timestamp() + $4 * interval '1 millisecond'
                 FROM (SELECT id FROM {timers} WHERE component = $1 AND at_ms <= $2 AND lease_until < clock_timestamp()
                       ORDER BY at_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED) due
                 WHERE t.component = $1 AND t.id = due.id RETURNING t.id, t.timer"
            ),
            claim_outbox: format!(
                "UPDATE {outbox} o SET lease_until = clock_timestamp() + $4 * interval '1 millisecond'
                 FROM (SELECT seq FROM {outbox} WHERE component = $1 AND created_ms <= $2 AND lease_until < clock_timestamp()
                       ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) stale
                 WHERE o.seq = stale.seq RETURNING o.seq, o.source, o.created_ms, o.records"
            ),
            timer_count: format!("SELECT count(*) FROM {timers} WHERE component = $1"),
            data_usage: format!(
                "SELECT count(*), coalesce(sum(octet_length(key) + octet_length(value)), 0)::bigint FROM {state} WHERE component = $1"
            ),
            outbox_count: format!(
                "SELECT count(*) FROM {outbox} WHERE component = $1 AND NOT (source = ANY($2))"
            ),
            // In the array's (ascending) order: volatile functions of the
            // select list are evaluated after the ORDER BY.
            lock: "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, n) ORDER BY n".into(),
            lock_keyspace_shared: "SELECT pg_advisory_xact_lock_shared($1)".into(),
            lock_keyspace: "SELECT pg_advisory_xact_lock($1)".into(),
            validate: format!("SELECT key, value FROM {state} WHERE component = $1 AND key = ANY($2)"),
            insert_handled: format!(
                "INSERT INTO {handled} (component, event_id, handled_ms)
                 SELECT $1, id, at FROM unnest($2::text[], $3::int8[]) AS h(id, at) ON CONFLICT DO NOTHING"
            ),
            upsert: format!(
                "INSERT INTO {state} (component, key, value) SELECT $1, k, v FROM unnest($2::text[], $3::bytea[]) AS w(k, v)
                 ON CONFLICT (component, key) DO UPDATE SET value = EXCLUDED.value"
            ),
            delete: format!("DELETE FROM {state} WHERE component = $1 AND key = ANY($2)"),
            delete_fired: format!("DELETE FROM {timers} WHERE component = $1 AND id = $2 AND at_ms = $3"),
            set_timer: format!(
                "INSERT INTO {timers} (component, id, at_ms, timer) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (component, id) DO UPDATE SET at_ms = EXCLUDED.at_ms, timer = EXCLUDED.timer, lease_until = '-infinity'"
            ),
            cancel_timer: format!("DELETE FROM {timers} WHERE component = $1 AND id = $2"),
            insert_outbox: format!(
                "INSERT INTO {outbox} (component, source, created_ms, records)
                 SELECT $1, s, c, r FROM unnest($2::text[], $3::int8[], $4::text[]) WITH ORDINALITY AS e(s, c, r, n) ORDER BY n"
            ),
        }
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

/// Timers stored as `(id, body)`, decoded: the good ones, and the
/// undecodable ones as `(id, body, reason)`.
fn timers(rows: Vec<(String, String)>) -> (Vec<Timer>, Vec<(String, String, String)>) {
    let (mut good, mut corrupt) = (Vec::new(), Vec::new());
    for (id, body) in rows {
        match decode_entry(body.as_bytes()) {
            Ok(timer) => good.push(timer),
            Err(reason) => corrupt.push((id, body, reason)),
        }
    }
    (good, corrupt)
}

/// Outbox entries stored as `(source, created_ms, records)`, decoded as
/// [`timers`] are.
fn entries(rows: Vec<(String, i64, String)>) -> (Vec<OutboxEntry>, Vec<(String, String, String)>) {
    let (mut good, mut corrupt) = (Vec::new(), Vec::new());
    for (source, created_ms, records) in rows {
        match decode_entry::<Vec<OutboxRecord>>(records.as_bytes()) {
            Ok(records) => {
                good.push(OutboxEntry { source, created_ms: u64::try_from(created_ms).unwrap_or(0), records })
            }
            Err(reason) => corrupt.push((source, records, reason)),
        }
    }
    (good, corrupt)
}

/// The exclusive upper bound of keys starting with `prefix` (in byte order).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
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

/// What one batch changes, collapsed: the last write of each key wins, as
/// applying the commits in order would make it.
struct Changes {
    upserts: (Vec<String>, Vec<Vec<u8>>),
    deletes: Vec<String>,
    handled: (Vec<String>, Vec<i64>),
    outbox: (Vec<String>, Vec<i64>, Vec<String>),
    /// Timer statements in commit order: fired removals, sets, cancels.
    timers: Vec<TimerStep>,
    /// Advisory locks to take, ascending; and whether a listing was read.
    locks: Vec<i64>,
    writes: bool,
    listed: bool,
}

enum TimerStep {
    Fired(String, i64),
    Set(Timer),
    Cancel(String),
}

impl Changes {
    fn of(component: &str, commits: &[Commit], reads: &ReadSet) -> Self {
        let mut final_writes: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        let mut handled = (Vec::new(), Vec::new());
        let mut outbox = (Vec::new(), Vec::new(), Vec::new());
        let mut timers = Vec::new();
        for commit in commits {
            for (key, value) in &commit.writes {
                final_writes.insert(key, value.as_deref());
            }
            if let Some((id, at_ms)) = &commit.fired {
                timers.push(TimerStep::Fired(id.clone(), ms(*at_ms)));
            }
            for change in &commit.timers {
                timers.push(match change {
                    TimerChange::Set(timer) => TimerStep::Set(timer.clone()),
                    TimerChange::Cancel(id) => TimerStep::Cancel(id.clone()),
                });
            }
            if let Some(source) = &commit.handled {
                handled.0.push(source.clone());
                handled.1.push(ms(commit.now_ms));
                if !commit.outbox.is_empty() {
                    outbox.0.push(source.clone());
                    outbox.1.push(ms(commit.now_ms));
                    // Records of strings always serialize.
                    outbox.2.push(serde_json::to_string(&commit.outbox).unwrap_or_default());
                }
            }
        }
        let mut locks: Vec<i64> = final_writes
            .keys()
            .copied()
            .chain(reads.keys.keys().map(String::as_str))
            .map(|key| lock_key(component, "key", key))
            .collect();
        locks.sort_unstable();
        locks.dedup();
        let mut upserts = (Vec::new(), Vec::new());
        let mut deletes = Vec::new();
        for (key, value) in final_writes {
            match value {
                Some(value) => {
                    upserts.0.push(key.to_owned());
                    upserts.1.push(value.to_vec());
                }
                None => deletes.push(key.to_owned()),
            }
        }
        let writes = !upserts.0.is_empty() || !deletes.is_empty();
        Self { upserts, deletes, handled, outbox, timers, locks, writes, listed: !reads.listings.is_empty() }
    }
}

/// Commits `changes` if `reads` still hold; `Ok(Err(conflict))` when not.
async fn commit(
    client: &mut deadpool_postgres::Object,
    sql: &Sql,
    component: &str,
    changes: &Changes,
    reads: &ReadSet,
    cleared: &[String],
) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Locks first, in one order for every batch.
    let keyspace = lock_key(component, "keyspace", "");
    if changes.listed {
        tx.execute(&tx.prepare_cached(&sql.lock_keyspace).await?, &[&keyspace]).await?;
    } else if changes.writes {
        tx.execute(&tx.prepare_cached(&sql.lock_keyspace_shared).await?, &[&keyspace]).await?;
    }
    if !changes.locks.is_empty() {
        tx.execute(&tx.prepare_cached(&sql.lock).await?, &[&changes.locks]).await?;
    }
    // What was read must be what is there now: the keys in one query, each
    // listing again, then compared as every adapter does.
    let mut now: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if !reads.keys.is_empty() {
        let keys: Vec<&str> = reads.keys.keys().map(String::as_str).collect();
        let rows = tx.query(&tx.prepare_cached(&sql.validate).await?, &[&component, &keys]).await?;
        now = rows.into_iter().map(|row| (row.get(0), row.get(1))).collect();
    }
    let mut listed = Vec::with_capacity(reads.listings.len());
    for (prefix, limit, _) in &reads.listings {
        let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
        let rows =
            tx.query(&tx.prepare_cached(&sql.keys).await?, &[&component, prefix, &prefix_end(prefix), &limit]).await?;
        listed.push(rows.into_iter().map(|row| row.get(0)).collect::<Vec<String>>());
    }
    let mut listed = listed.into_iter();
    let changed = reads.changed::<std::convert::Infallible>(
        |key| Ok(ReadSet::digest(now.get(key).map(Vec::as_slice))),
        |_, _| Ok(listed.next().unwrap_or_default()),
    );
    match changed {
        Ok(None) => {}
        Ok(Some(conflict)) => return Ok(Err(conflict)),
        Err(never) => match never {},
    }
    if !changes.handled.0.is_empty() {
        let inserted = tx
            .execute(
                &tx.prepare_cached(&sql.insert_handled).await?,
                &[&component, &changes.handled.0, &changes.handled.1],
            )
            .await?;
        if inserted != changes.handled.0.len() as u64 {
            return Ok(Err(StoreError::Conflict("an event of the batch was handled meanwhile".into())));
        }
    }
    if !changes.upserts.0.is_empty() {
        tx.execute(&tx.prepare_cached(&sql.upsert).await?, &[&component, &changes.upserts.0, &changes.upserts.1])
            .await?;
    }
    if !changes.deletes.is_empty() {
        tx.execute(&tx.prepare_cached(&sql.delete).await?, &[&component, &changes.deletes]).await?;
    }
    for step in &changes.timers {
        match step {
            TimerStep::Fired(id, at_ms) => {
                tx.execute(&tx.prepare_cached(&sql.delete_fired).await?, &[&component, id, at_ms]).await?
            }
            TimerStep::Set(timer) => {
                let body = serde_json::to_string(timer).unwrap_or_default();
                tx.execute(&tx.prepare_cached(&sql.set_timer).await?, &[&component, &timer.id, &ms(timer.at_ms), &body])
                    .await?
            }
            TimerStep::Cancel(id) => {
                tx.execute(&tx.prepare_cached(&sql.cancel_timer).await?, &[&component, id]).await?
            }
        };
    }
    if !changes.outbox.0.is_empty() {
        let (sources, created, records) = &changes.outbox;
        tx.execute(&tx.prepare_cached(&sql.insert_outbox).await?, &[&component, sources, created, records]).await?;
    }
    if !cleared.is_empty() {
        tx.execute(&tx.prepare_cached(&sql.forget).await?, &[&component, &cleared]).await?;
    }
    tx.commit().await?;
    Ok(Ok(()))
}

impl StateStore for PostgresStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.with(move |client, sql, component| async move {
            Ok(client
                .query_opt(&client.prepare_cached(&sql.get).await?, &[&component, &key])
                .await?
                .map(|row| row.get(0)))
        })
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let prefix = prefix.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |client, sql, component| async move {
            let rows = client
                .query(&client.prepare_cached(&sql.keys).await?, &[&component, &prefix, &prefix_end(&prefix), &limit])
                .await?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        let changes = Changes::of(&self.component, commits, reads);
        let reads = reads.clone();
        let cleared = self.cleared().clone();
        let (backend, sql, component) = (self.backend.clone(), self.sql.clone(), self.component.clone());
        let forgotten = cleared.clone();
        self.backend.block(async move {
            let mut client = backend.client().await?;
            match commit(&mut client, &sql, &component, &changes, &reads, &cleared).await {
                Ok(outcome) => outcome,
                Err(err) => Err(classify(&err)),
            }
        })?;
        self.cleared().retain(|s| !forgotten.contains(s));
        Ok(Durable::done())
    }

    fn sync_point(&self) -> Durable {
        // A commit is durable (the server fsynced its WAL) when it returns.
        Durable::done()
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.with(move |client, sql, component| async move {
            Ok(client.query_opt(&client.prepare_cached(&sql.was_handled).await?, &[&component, &id]).await?.is_some())
        })
    }

    fn handled_among(&self, ids: &[&str]) -> Result<std::collections::HashSet<String>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        self.with(move |client, sql, component| async move {
            let rows = client.query(&client.prepare_cached(&sql.handled_among).await?, &[&component, &ids]).await?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        if self.cleared().iter().any(|s| s == source) {
            return Ok(None);
        }
        let source = source.to_owned();
        let row = self.with(move |client, sql, component| async move {
            let row = client.query_opt(&client.prepare_cached(&sql.outbox).await?, &[&component, &source]).await?;
            Ok(row.map(|row| (source, row.get::<_, i64>(0), row.get::<_, String>(1))))
        })?;
        let (mut good, corrupt) = entries(row.into_iter().collect());
        self.quarantine(EntryKind::Outbox, corrupt)?;
        Ok(good.pop())
    }

    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let cleared = self.cleared().clone();
        let fetch = i64::try_from(limit.saturating_add(cleared.len())).unwrap_or(i64::MAX);
        let rows = self.with(move |client, sql, component| async move {
            let rows = client.query(&client.prepare_cached(&sql.pending_outbox).await?, &[&component, &fetch]).await?;
            Ok(rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect::<Vec<(String, i64, String)>>())
        })?;
        let (good, corrupt) =
            entries(rows.into_iter().filter(|(source, _, _)| !cleared.contains(source)).take(limit).collect());
        self.quarantine(EntryKind::Outbox, corrupt)?;
        Ok(good)
    }

    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        self.cleared().push(source.to_owned());
        Ok(())
    }

    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        let id = id.to_owned();
        let row = self.with(move |client, sql, component| async move {
            Ok(client
                .query_opt(&client.prepare_cached(&sql.timer).await?, &[&component, &id])
                .await?
                .map(|row| (id, row.get::<_, String>(0))))
        })?;
        let (mut good, corrupt) = timers(row.into_iter().collect());
        self.quarantine(EntryKind::Timer, corrupt)?;
        Ok(good.pop())
    }

    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.with(move |client, sql, component| async move {
            let rows = client
                .query(&client.prepare_cached(&sql.due_timers).await?, &[&component, &ms(now_ms), &limit])
                .await?;
            Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
        })?;
        let (good, corrupt) = timers(rows);
        self.quarantine(EntryKind::Timer, corrupt)?;
        Ok(good)
    }

    fn claim_due_timers(&self, now_ms: u64, limit: usize, lease: Duration) -> Result<Vec<Timer>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease_ms = f64::from(u32::try_from(lease.as_millis()).unwrap_or(u32::MAX));
        let rows = self.with(move |client, sql, component| async move {
            let rows = client
                .query(&client.prepare_cached(&sql.claim_timers).await?, &[&component, &ms(now_ms), &limit, &lease_ms])
                .await?;
            Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
        })?;
        let (mut good, corrupt) = timers(rows);
        self.quarantine(EntryKind::Timer, corrupt)?;
        good.sort_by(|a, b| (a.at_ms, &a.id).cmp(&(b.at_ms, &b.id)));
        Ok(good)
    }

    fn claim_stale_outbox(
        &self,
        committed_before_ms: u64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let cleared = self.cleared().clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease_ms = f64::from(u32::try_from(lease.as_millis()).unwrap_or(u32::MAX));
        let mut rows = self.with(move |client, sql, component| async move {
            let rows = client
                .query(
                    &client.prepare_cached(&sql.claim_outbox).await?,
                    &[&component, &ms(committed_before_ms), &limit, &lease_ms],
                )
                .await?;
            Ok(rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))).collect::<Vec<(
                i64,
                String,
                i64,
                String,
            )>>())
        })?;
        rows.sort_by_key(|(seq, ..)| *seq);
        let rows = rows
            .into_iter()
            .filter(|(_, source, ..)| !cleared.contains(source))
            .map(|(_, source, created_ms, records)| (source, created_ms, records))
            .collect();
        let (good, corrupt) = entries(rows);
        self.quarantine(EntryKind::Outbox, corrupt)?;
        Ok(good)
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        self.with(move |client, sql, component| async move {
            let count: i64 =
                client.query_one(&client.prepare_cached(&sql.timer_count).await?, &[&component]).await?.get(0);
            Ok(u64::try_from(count).unwrap_or(0))
        })
    }

    fn data_usage(&self) -> Result<(u64, u64), StoreError> {
        self.with(move |client, sql, component| async move {
            let row = client.query_one(&client.prepare_cached(&sql.data_usage).await?, &[&component]).await?;
            let (keys, bytes): (i64, i64) = (row.get(0), row.get(1));
            Ok((u64::try_from(keys).unwrap_or(0), u64::try_from(bytes).unwrap_or(0)))
        })
    }

    fn outbox_count(&self) -> Result<u64, StoreError> {
        let cleared = self.cleared().clone();
        self.with(move |client, sql, component| async move {
            let count: i64 = client
                .query_one(&client.prepare_cached(&sql.outbox_count).await?, &[&component, &cleared])
                .await?
                .get(0);
            Ok(u64::try_from(count).unwrap_or(0))
        })
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |client, sql, component| async move {
            let rows = client.query(&client.prepare_cached(&sql.quarantined).await?, &[&component, &limit]).await?;
            Ok(rows
                .into_iter()
                .map(|row| Quarantined {
                    kind: EntryKind::parse(row.get(0)),
                    id: row.get(1),
                    raw: row.get(2),
                    reason: row.get(3),
                    at_ms: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
                })
                .collect())
        })
    }

    fn corrupt_entries(&self) -> Result<CorruptEntries, StoreError> {
        self.with(move |client, sql, component| async move {
            let row = client.query_opt(&client.prepare_cached(&sql.corrupt_entries).await?, &[&component]).await?;
            Ok(row.map_or_else(CorruptEntries::default, |row| {
                let last = Quarantined {
                    kind: EntryKind::parse(row.get(1)),
                    id: row.get(2),
                    raw: Vec::new(),
                    reason: row.get(3),
                    at_ms: 0,
                };
                CorruptEntries {
                    count: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    last_reason: Some(last.describe()),
                }
            }))
        })
    }
}

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
    fn a_bad_schema_name_is_refused_before_connecting() {
        let err = PgStores::connect("postgres://nobody@127.0.0.1:1/x", "drop table;").err().unwrap().to_string();
        assert!(err.contains("invalid schema name"), "{err}");
    }
}
