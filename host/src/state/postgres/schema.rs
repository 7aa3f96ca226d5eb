//! The schema of the shared store: its versioned migrations, applied at
//! start, and the statements a store runs, with the schema filled in.

use super::{Backend, StoreError, db_error};

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
    // Pruning old handled ids finds them by time.
    r#"
CREATE INDEX handled_by_time ON {s}.handled (component, handled_ms);
"#,
];

pub(super) async fn migrate(backend: &Backend) -> Result<(), StoreError> {
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
pub(super) struct Sql {
    pub(super) get: String,
    pub(super) keys: String,
    pub(super) was_handled: String,
    pub(super) handled_among: String,
    pub(super) outbox: String,
    pub(super) pending_outbox: String,
    pub(super) forget: String,
    pub(super) timer: String,
    pub(super) due_timers: String,
    pub(super) claim_timers: String,
    pub(super) claim_outbox: String,
    pub(super) timer_count: String,
    pub(super) data_usage: String,
    pub(super) outbox_count: String,
    pub(super) lock: String,
    pub(super) lock_keyspace_shared: String,
    pub(super) lock_keyspace: String,
    pub(super) validate: String,
    pub(super) insert_handled: String,
    pub(super) upsert: String,
    pub(super) delete: String,
    pub(super) timer_for_update: String,
    pub(super) prune_handled: String,
    pub(super) set_timer: String,
    pub(super) cancel_timer: String,
    pub(super) insert_outbox: String,
    pub(super) quarantine_timer: String,
    pub(super) quarantine_outbox: String,
    pub(super) quarantined: String,
    pub(super) corrupt_entries: String,
}

impl Sql {
    /// The statements of `backend`'s store, in its schema.
    pub(super) fn new(backend: &Backend) -> Self {
        let state = backend.table("state");
        let handled = backend.table("handled");
        let outbox = backend.table("outbox");
        let timers = backend.table("timers");
        let quarantine = backend.table("quarantine");
        Self {
            quarantine_timer: quarantine_from(&quarantine, &timers, "id", "timer"),
            quarantine_outbox: quarantine_from(&quarantine, &outbox, "source", "records"),
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
            claim_timers: claim_timers(&timers),
            claim_outbox: claim_outbox(&outbox),
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
            prune_handled: format!(
                "DELETE FROM {handled} WHERE component = $1 AND event_id IN
                 (SELECT event_id FROM {handled} WHERE component = $1 AND handled_ms < $2 ORDER BY handled_ms LIMIT $3)"
            ),
            timer_for_update: format!("SELECT timer FROM {timers} WHERE component = $1 AND id = $2 FOR UPDATE"),
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

/// The statement that moves a row of `table` (its key column `id`, its body
/// column `body`) into the `quarantine` table, returning when it was moved.
///
/// Moves a row only if it still holds the body found: a commit may have
/// replaced it meanwhile, and another host may have moved it.
fn quarantine_from(quarantine: &str, table: &str, id: &str, body: &str) -> String {
    format!(
        "WITH moved AS (DELETE FROM {table} WHERE component = $1 AND {id} = $2 AND {body} = $3 RETURNING {id}, {body})
                 INSERT INTO {quarantine} (component, kind, id, raw, reason, at_ms)
                 SELECT $1, $4, {id}, convert_to({body}, 'UTF8'), $5, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                 FROM moved RETURNING at_ms"
    )
}

/// The statement that leases the due timers of the `timers` table that no
/// other host holds (the `FOR UPDATE SKIP LOCKED` queue pattern), returning
/// their ids and bodies.
fn claim_timers(timers: &str) -> String {
    format!(
        "UPDATE {timers} t SET lease_until = clock_timestamp() + $4 * interval '1 millisecond'
                 FROM (SELECT id FROM {timers} WHERE component = $1 AND at_ms <= $2 AND lease_until < clock_timestamp()
                       ORDER BY at_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED) due
                 WHERE t.component = $1 AND t.id = due.id RETURNING t.id, t.timer"
    )
}

/// The statement that leases the stale entries of the `outbox` table that no
/// other host holds (the `FOR UPDATE SKIP LOCKED` queue pattern), returning
/// them in the order they were written.
fn claim_outbox(outbox: &str) -> String {
    format!(
        "UPDATE {outbox} o SET lease_until = clock_timestamp() + $4 * interval '1 millisecond'
                 FROM (SELECT seq FROM {outbox} WHERE component = $1 AND created_ms <= $2 AND lease_until < clock_timestamp()
                       ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) stale
                 WHERE o.seq = stale.seq RETURNING o.seq, o.source, o.created_ms, o.records"
    )
}
