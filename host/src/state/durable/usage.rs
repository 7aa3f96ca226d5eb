//! Where the bytes of a host's redb file go, table by table: for `bench
//! store` and for an operator asking why the file grew.

use redb::{ReadableDatabase as _, ReadableTableMetadata as _};

use super::{HostStore, StoreError, unavailable};

/// One table's share of the file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableUsage {
    /// The table's name (`order/state`, `payment/handled`, ...).
    pub name: String,
    /// Entries in it.
    pub entries: u64,
    /// Bytes of its keys and values.
    pub stored_bytes: u64,
    /// Pages its B-tree takes, leaves and branches.
    pub pages: u64,
    /// Bytes of those pages holding nothing.
    pub fragmented_bytes: u64,
}

/// What the file holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileUsage {
    /// The file's length.
    pub file_bytes: u64,
    /// Pages in use by the last committed version (the rest of the file is
    /// free or awaiting reuse).
    pub allocated_bytes: u64,
    /// Bytes of keys and values in every table.
    pub stored_bytes: u64,
    /// The tables, largest first.
    pub tables: Vec<TableUsage>,
}

impl HostStore {
    /// What the file holds, read in one read transaction (a walk of every
    /// table's pages: for benches and diagnostics, not a hot path).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be read.
    pub fn usage(&self) -> Result<FileUsage, StoreError> {
        let e = unavailable("cannot read", &self.path);
        let file_bytes = std::fs::metadata(&self.path).map_err(|x| e(&x))?.len();
        let (allocated_bytes, stored_bytes) = {
            // Database-wide figures come only from a write transaction; it
            // commits nothing.
            let write = self.db.begin_write().map_err(|x| e(&x))?;
            let stats = write.stats().map_err(|x| e(&x))?;
            write.abort().map_err(|x| e(&x))?;
            (stats.allocated_pages() * stats.page_size() as u64, stats.stored_bytes())
        };
        let read = self.db.begin_read().map_err(|x| e(&x))?;
        let mut tables = Vec::new();
        for handle in read.list_tables().map_err(|x| e(&x))? {
            let name = redb::TableHandle::name(&handle).to_owned();
            let table = read.open_untyped_table(handle).map_err(|x| e(&x))?;
            let stats = table.stats().map_err(|x| e(&x))?;
            tables.push(TableUsage {
                name,
                entries: table.len().map_err(|x| e(&x))?,
                stored_bytes: stats.stored_bytes(),
                pages: stats.leaf_pages() + stats.branch_pages(),
                fragmented_bytes: stats.fragmented_bytes(),
            });
        }
        tables.sort_by(|a, b| b.pages.cmp(&a.pages).then_with(|| a.name.cmp(&b.name)));
        Ok(FileUsage { file_bytes, allocated_bytes, stored_bytes, tables })
    }
}
