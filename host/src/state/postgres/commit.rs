//! A batch's commit: its changes collapsed into a few statements, applied
//! in one transaction once its reads are checked unchanged under locks.

use std::collections::BTreeMap;

use super::schema::Sql;
use super::{lock_key, ms, prefix_end};
use crate::state::{Commit, ReadSet, StoreError, Timer, TimerChange};

/// What one batch changes, collapsed: the last write of each key wins, as
/// applying the commits in order would make it.
pub(super) struct Changes {
    upserts: (Vec<String>, Vec<Vec<u8>>),
    deletes: Vec<String>,
    handled: (Vec<String>, Vec<i64>),
    outbox: (Vec<String>, Vec<i64>, Vec<String>),
    /// Timer statements in commit order: fired removals, sets, cancels.
    timers: Vec<TimerStep>,
    /// The fired timer `(id, nonce)` that must still be set.
    fired: Option<(String, u64)>,
    /// Advisory locks to take, ascending; and whether a listing was read.
    locks: Vec<i64>,
    writes: bool,
    listed: bool,
}

enum TimerStep {
    Fired(String),
    Set(Timer),
    Cancel(String),
}

impl Changes {
    pub(super) fn of(component: &str, commits: &[Commit], reads: &ReadSet) -> Self {
        let mut final_writes: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        let mut handled = (Vec::new(), Vec::new());
        let mut outbox = (Vec::new(), Vec::new(), Vec::new());
        let mut timers = Vec::new();
        for commit in commits {
            for (key, value) in &commit.writes {
                final_writes.insert(key, value.as_deref());
            }
            if let Some((id, _)) = &commit.fired {
                timers.push(TimerStep::Fired(id.clone()));
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
        let fired = commits.iter().find_map(|commit| commit.fired.clone());
        Self { upserts, deletes, handled, outbox, timers, fired, locks, writes, listed: !reads.listings.is_empty() }
    }
}

/// Commits `changes` if `reads` still hold; `Ok(Err(conflict))` when not.
///
/// Three steps in one transaction: [`lock`], [`validate`], [`write`]; a
/// conflict found by any of them rolls the transaction back.
pub(super) async fn commit(
    client: &mut deadpool_postgres::Object,
    sql: &Sql,
    component: &str,
    changes: &Changes,
    reads: &ReadSet,
    cleared: &[String],
) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if let Some(conflict) = lock(&tx, sql, component, changes).await? {
        return Ok(Err(conflict));
    }
    if let Some(conflict) = validate(&tx, sql, component, reads).await? {
        return Ok(Err(conflict));
    }
    if let Some(conflict) = write(&tx, sql, component, changes, cleared).await? {
        return Ok(Err(conflict));
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// Takes the batch's locks, in one order for every batch, and checks that
/// the timer it fired is still the instance that fired.
///
/// Returns the conflict when that timer was cancelled or set again since.
///
/// # Errors
///
/// Any error of PostgreSQL.
async fn lock(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &Sql,
    component: &str,
    changes: &Changes,
) -> Result<Option<StoreError>, tokio_postgres::Error> {
    let keyspace = lock_key(component, "keyspace", "");
    if changes.listed {
        tx.execute(&tx.prepare_cached(&sql.lock_keyspace).await?, &[&keyspace]).await?;
    } else if changes.writes {
        tx.execute(&tx.prepare_cached(&sql.lock_keyspace_shared).await?, &[&keyspace]).await?;
    }
    if !changes.locks.is_empty() {
        tx.execute(&tx.prepare_cached(&sql.lock).await?, &[&changes.locks]).await?;
    }
    // The fired timer must still be the instance that fired: its row locked
    // until the commit, so a concurrent cancel or re-set waits, then applies.
    if let Some((id, nonce)) = &changes.fired {
        let row = tx.query_opt(&tx.prepare_cached(&sql.timer_for_update).await?, &[&component, id]).await?;
        let still = row.and_then(|row| crate::state::decode_entry::<Timer>(row.get::<_, String>(0).as_bytes()).ok());
        if still.is_none_or(|timer| timer.nonce != *nonce) {
            return Ok(Some(StoreError::Conflict(format!("timer {id:?} was cancelled or set again since it fired"))));
        }
    }
    Ok(None)
}

/// Checks that what the batch read is what is there now: the keys in one
/// query, each listing again, then compared as every adapter does.
///
/// Returns the conflict when something changed.
///
/// # Errors
///
/// Any error of PostgreSQL.
async fn validate(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &Sql,
    component: &str,
    reads: &ReadSet,
) -> Result<Option<StoreError>, tokio_postgres::Error> {
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
        Ok(changed) => Ok(changed),
        Err(never) => match never {},
    }
}

/// Applies the batch's changes: its handled events, upserts, deletes, timer
/// steps and outbox records, then forgets the `cleared` outbox entries.
///
/// Returns the conflict when an event of the batch was handled meanwhile.
///
/// # Errors
///
/// Any error of PostgreSQL.
async fn write(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &Sql,
    component: &str,
    changes: &Changes,
    cleared: &[String],
) -> Result<Option<StoreError>, tokio_postgres::Error> {
    if !changes.handled.0.is_empty() {
        let inserted = tx
            .execute(
                &tx.prepare_cached(&sql.insert_handled).await?,
                &[&component, &changes.handled.0, &changes.handled.1],
            )
            .await?;
        if inserted != changes.handled.0.len() as u64 {
            return Ok(Some(StoreError::Conflict("an event of the batch was handled meanwhile".into())));
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
            TimerStep::Fired(id) => tx.execute(&tx.prepare_cached(&sql.cancel_timer).await?, &[&component, id]).await?,
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
    Ok(None)
}
