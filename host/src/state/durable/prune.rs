//! Forgetting a redb store's old handled ids, in the background: a small
//! batch at a time, each its own short write transaction, so that no batch
//! holds the database's writer for long and commits go on between batches.
//!
//! A batch takes the oldest ids from the index by time (`handled_at`): a
//! range at its front, read only as far as the old ones go. Ids handled
//! before that index existed have no entry in it; while there are any (the
//! by-id table holds more entries than the index), a batch with room left
//! also walks the by-id table in key order from where the last one stopped,
//! looking at no more than 8 entries per id it may forget, so that those
//! are forgotten too once past the horizon.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::{Mutex, PoisonError};

use redb::{Database, Durability, ReadableTable as _, ReadableTableMetadata as _, WriteTransaction};

use super::tables::Tables;

/// Entries one batch of the walk looks at, per id it may forget: bounds a
/// batch's work when few ids are old.
const SCAN_PER_PRUNED: usize = 8;

/// Where the walk through the ids handled before the index stands.
#[derive(Debug, Default)]
pub(crate) struct Pruner {
    /// The last id looked at; `None`: start from the first.
    cursor: Mutex<Option<String>>,
}

impl Pruner {
    /// Forgets up to `limit` ids of `t`'s handled tables handled before
    /// `before_ms`. Returns how many were forgotten. Not fsynced: a prune
    /// lost in a crash is done again.
    ///
    /// # Errors
    /// redb's.
    pub(crate) fn prune(&self, db: &Database, t: &Tables, before_ms: u64, limit: usize) -> Result<usize, redb::Error> {
        let mut write = db.begin_write()?;
        write.set_durability(Durability::None).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        let mut old = oldest(&write, t, before_ms, limit)?;
        let unindexed = {
            let (handled, at) = (write.open_table(t.handled())?, write.open_table(t.handled_at())?);
            handled.len()?.saturating_sub(at.len()?)
        };
        let walked = if old.len() < limit && unindexed > 0 {
            let cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
            let (found, next) = walk(&write, t, cursor.as_deref(), before_ms, limit - old.len())?;
            // The walk meets indexed ids too: those old are taken already.
            let taken: HashSet<Handled> = old.iter().cloned().collect();
            old.extend(found.into_iter().filter(|entry| !taken.contains(entry)));
            Some((cursor, next))
        } else {
            None
        };
        {
            let mut handled = write.open_table(t.handled())?;
            let mut at = write.open_table(t.handled_at())?;
            for (ms, id) in &old {
                handled.remove(id.as_str())?;
                at.remove((*ms, id.as_str()))?;
            }
        }
        write.commit()?;
        if let Some((mut cursor, next)) = walked {
            *cursor = next;
        }
        Ok(old.len())
    }
}

/// Up to `limit` (when handled, id) from the front of the index, all handled
/// before `before_ms`.
fn oldest(write: &WriteTransaction, t: &Tables, before_ms: u64, limit: usize) -> Result<Vec<Handled>, redb::Error> {
    let at = write.open_table(t.handled_at())?;
    let mut old = Vec::new();
    for entry in at.range((0, "")..(before_ms, ""))?.take(limit) {
        let (key, _) = entry?;
        let (ms, id) = key.value();
        old.push((ms, id.to_owned()));
    }
    Ok(old)
}

/// A handled id and when it was handled.
type Handled = (u64, String);

/// The walk through the by-id table: up to `limit` entries handled before
/// `before_ms` among at most `limit` × 8 after `cursor`, and where the next
/// walk starts (`None`: over again, this one reached the end).
fn walk(
    write: &WriteTransaction,
    t: &Tables,
    cursor: Option<&str>,
    before_ms: u64,
    limit: usize,
) -> Result<(Vec<Handled>, Option<String>), redb::Error> {
    let handled = write.open_table(t.handled())?;
    let from = cursor.map_or(Bound::Unbounded, Bound::Excluded);
    let (mut old, mut last) = (Vec::new(), None);
    for (scanned, entry) in handled.range::<&str>((from, Bound::Unbounded))?.enumerate() {
        if old.len() >= limit || scanned >= limit.saturating_mul(SCAN_PER_PRUNED) {
            return Ok((old, last));
        }
        let (id, at) = entry?;
        if at.value() < before_ms {
            old.push((at.value(), id.value().to_owned()));
        }
        last = Some(id.value().to_owned());
    }
    Ok((old, None))
}
