//! Forgetting a redb store's old handled ids, in the background: a small
//! batch at a time, each its own short write transaction, walking the table
//! in key order from where the last batch stopped, so that no batch holds
//! the database's writer for long and commits go on between batches.

use std::ops::Bound;
use std::sync::{Mutex, PoisonError};

use redb::{Database, Durability, ReadableTable as _, TableDefinition};

/// Entries one batch looks at, per id it may forget: bounds a batch's work
/// when few ids are old.
const SCAN_PER_PRUNED: usize = 8;

/// Where the walk through a handled table stands.
#[derive(Debug, Default)]
pub(crate) struct Pruner {
    /// The last id looked at; `None`: start from the first.
    cursor: Mutex<Option<String>>,
}

impl Pruner {
    /// Forgets up to `limit` ids of `table` (id → when handled, ms) handled
    /// before `before_ms`, looking at no more than `limit` × 8 entries from
    /// where the last call stopped (wrapping around at the end). Returns how
    /// many were forgotten. Not fsynced: a prune lost in a crash is done
    /// again.
    ///
    /// # Errors
    /// redb's.
    pub(crate) fn prune(
        &self,
        db: &Database,
        table: TableDefinition<&str, u64>,
        before_ms: u64,
        limit: usize,
    ) -> Result<usize, redb::Error> {
        let mut cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
        let mut write = db.begin_write()?;
        write.set_durability(Durability::None).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
        let (mut old, mut last, mut ended) = (Vec::new(), None, true);
        {
            let handled = write.open_table(table)?;
            let from = cursor.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            for (scanned, entry) in handled.range::<&str>((from, Bound::Unbounded))?.enumerate() {
                if old.len() >= limit || scanned >= limit.saturating_mul(SCAN_PER_PRUNED) {
                    ended = false;
                    break;
                }
                let (id, at) = entry?;
                if at.value() < before_ms {
                    old.push(id.value().to_owned());
                }
                last = Some(id.value().to_owned());
            }
        }
        {
            let mut handled = write.open_table(table)?;
            for id in &old {
                handled.remove(id.as_str())?;
            }
        }
        write.commit()?;
        *cursor = if ended { None } else { last };
        Ok(old.len())
    }
}
