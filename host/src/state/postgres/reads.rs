//! The store's reads: keys, dedup look-ups, the outbox and timers (one,
//! listed, or claimed under a lease), and the quarantine.

use std::time::Duration;

use super::commit::{Changes, commit};
use super::{PostgresStore, classify, ms, prefix_end};
use crate::state::{
    Commit, CorruptEntries, Durable, EntryKind, OutboxEntry, OutboxRecord, Quarantined, ReadSet, StateStore,
    StoreError, Timer, check_commits, check_id, check_key, check_prefix, decode_entry,
};

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

impl StateStore for PostgresStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.with(move |client, sql, component| async move {
            Ok(client
                .query_opt(&client.prepare_cached(&sql.get).await?, &[&component, &key])
                .await?
                .map(|row| row.get(0)))
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with(|client, _, _| async move { client.simple_query("SELECT 1").await.map(|_| ()) })
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
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
        check_commits(commits)?;
        let changes = Changes::of(&self.component, commits, reads);
        let reads = reads.clone();
        let cleared = self.cleared().clone();
        let (backend, sql, component) = (self.backend.clone(), self.sql.clone(), self.component.clone());
        let forgotten = cleared.clone();
        self.backend.block(async move {
            let deadline = tokio::time::Instant::now() + backend.timeouts.commit;
            let late = || {
                StoreError::Unavailable(format!("commit not done within its deadline of {:?}", backend.timeouts.commit))
            };
            let mut client = tokio::time::timeout_at(deadline, backend.client()).await.map_err(|_| late())??;
            let outcome =
                tokio::time::timeout_at(deadline, commit(&mut client, &sql, &component, &changes, &reads, &cleared))
                    .await;
            match outcome {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(err)) => Err(classify(&err)),
                Err(_) => {
                    // Closed, not pooled: the server rolls the transaction
                    // back and releases its locks at once.
                    drop(deadpool_postgres::Object::take(client));
                    Err(late())
                }
            }
        })?;
        self.cleared().retain(|s| !forgotten.contains(s));
        Ok(Durable::done())
    }

    fn prune_handled(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |client, sql, component| async move {
            let pruned = client
                .execute(&client.prepare_cached(&sql.prune_handled).await?, &[&component, &ms(before_ms), &limit])
                .await?;
            Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
        })
    }

    fn sync_point(&self) -> Durable {
        // A commit is durable (the server fsynced its WAL) when it returns.
        Durable::done()
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        check_id(id)?;
        let id = id.to_owned();
        self.with(move |client, sql, component| async move {
            Ok(client.query_opt(&client.prepare_cached(&sql.was_handled).await?, &[&component, &id]).await?.is_some())
        })
    }

    fn handled_among(&self, ids: &[&str]) -> Result<std::collections::HashSet<String>, StoreError> {
        ids.iter().try_for_each(|id| check_id(id))?;
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        self.with(move |client, sql, component| async move {
            let rows = client.query(&client.prepare_cached(&sql.handled_among).await?, &[&component, &ids]).await?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        check_id(source)?;
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
        check_id(id)?;
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

    fn data_usage(&self) -> Result<(u64, u64), StoreError> {
        self.with(move |client, sql, component| async move {
            let row = client.query_one(&client.prepare_cached(&sql.data_usage).await?, &[&component]).await?;
            let (keys, bytes): (i64, i64) = (row.get(0), row.get(1));
            Ok((u64::try_from(keys).unwrap_or(0), u64::try_from(bytes).unwrap_or(0)))
        })
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        self.with(move |client, sql, component| async move {
            let count: i64 =
                client.query_one(&client.prepare_cached(&sql.timer_count).await?, &[&component]).await?.get(0);
            Ok(u64::try_from(count).unwrap_or(0))
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
