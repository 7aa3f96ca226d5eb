//! The durable state adapter: one redb database file per host, holding the
//! tables of every component the host serves ([`HostStore`]), and a
//! [`DurableStore`] view of it per component.
//!
//! redb is a copy-on-write B-tree with checksummed pages: a write
//! transaction becomes visible, and after `commit` returns durable (fsync),
//! as a whole or not at all, and a crash mid-commit leaves the previous
//! committed version. The component's writes, the handled id, the outbox
//! entry and the timer changes of an event go into one write transaction
//! over the component's tables, so they are atomic together. One more
//! table holds the timers and outbox entries found undecodable, moved there
//! (in a transaction of their own) by the read that found them.
//!
//! Group commit: the pipeline hands over a batch of events' commits, and
//! the batches of all the host's components share write transactions
//! ([`group`]): one fsync carries every batch that arrived while the one
//! before was being written. When `commit_batch` returns the batch is
//! durable. Outbox entries published meanwhile are forgotten by the
//! component's next commit, or by the host's flusher thread when none comes
//! within a second.
//!
//! A state directory written by earlier versions (one file per component,
//! `payment.redb`, ...) is taken over at start ([`HostStore::adopt`]): each
//! file's tables are copied into the host's file, then the old file is
//! renamed `*.redb.migrated`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
};

#[cfg(test)]
use super::EntryKind;
use super::{
    Commit, CorruptEntries, Durable, OutboxEntry, Quarantined, ReadSet, StateStore, StoreError, Timer, check_commits,
    check_id, check_key, check_prefix, decode_entry,
};
use group::{Applied, Group};
use quarantine::{Found, Place};
use tables::{Checked, Tables};

mod group;
mod prune;
mod quarantine;
mod tables;
#[cfg(test)]
mod tests;
mod usage;

pub use usage::{FileUsage, TableUsage};

/// redb's page cache per host (its default is 1 GiB): what is read often,
/// the handled ids of recent events and the components' hot keys, fits.
const CACHE_BYTES: usize = 48 << 20;

/// How long published outbox entries may wait for a commit to carry them.
const FLUSH_IDLE: Duration = Duration::from_secs(1);

/// Components whose files were taken over: name → (old file, when).
const MIGRATIONS: TableDefinition<&str, (&str, u64)> = TableDefinition::new("migrations");

/// The redb file of one host, shared by its components' stores.
pub struct HostStore {
    db: Arc<Database>,
    path: PathBuf,
    group: Group,
    flush: Arc<Flush>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, path: &Path) -> impl Fn(&dyn std::fmt::Display) -> StoreError + use<> {
    let context = format!("{what} {}", path.display());
    move |err| StoreError::Unavailable(format!("{context}: {err}"))
}

impl HostStore {
    /// Opens (or creates) the host's store at `path`, creating its directory.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the file: it cannot be created,
    /// is not a redb database, or is open in another process (another host
    /// running from the same state directory).
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let db = open_db(path)?;
        let write = db.begin_write().map_err(|e| unavailable("cannot write", path)(&e))?;
        write.open_table(MIGRATIONS).map_err(|e| unavailable("cannot create tables in", path)(&e))?;
        write.commit().map_err(|e| unavailable("cannot commit", path)(&e))?;
        let db = Arc::new(db);
        let flush = Arc::new(Flush::default());
        let flusher = {
            let (db, flush) = (db.clone(), flush.clone());
            std::thread::Builder::new()
                .name("flush-state".into())
                .spawn(move || flush_loop(&db, &flush))
                .map_err(|e| unavailable("cannot start the flusher of", path)(&e))?
        };
        Ok(Arc::new(Self {
            db,
            path: path.to_owned(),
            group: Group::default(),
            flush,
            flusher: Mutex::new(Some(flusher)),
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed, and the batches they carried, since start.
    pub fn group_commits(&self) -> (u64, u64) {
        self.group.counts()
    }

    /// The store of `component`, its tables created if missing.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when its tables cannot be created.
    pub fn component(self: &Arc<Self>, component: &str) -> Result<DurableStore, StoreError> {
        let tables = Tables::of(component);
        let e = unavailable("cannot create tables in", &self.path);
        let write = self.db.begin_write().map_err(|x| e(&x))?;
        tables.create(&write).map_err(|x| e(&x))?;
        write.commit().map_err(|x| e(&x))?;
        let component =
            Arc::new(Component { tables, cleared: Mutex::new(Vec::new()), pruner: prune::Pruner::default() });
        self.flush.lock().components.push(Arc::downgrade(&component));
        Ok(DurableStore { host: self.clone(), component })
    }

    /// Takes over `legacy`, the file in which an earlier version kept
    /// `component`'s state alone, if it exists: its tables are copied into
    /// this file (durably, once: a copy already made is not made again),
    /// then it is renamed `*.migrated`. Whether there was one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the file that cannot be read,
    /// written or renamed.
    pub fn adopt(&self, component: &str, legacy: &Path) -> Result<bool, StoreError> {
        if !legacy.exists() {
            return Ok(false);
        }
        let e = unavailable("cannot take over", legacy);
        let write = self.db.begin_write().map_err(|x| e(&x))?;
        let copied = {
            let mut migrations = write.open_table(MIGRATIONS).map_err(|x| e(&x))?;
            if migrations.get(component).map_err(|x| e(&x))?.is_some() {
                None
            } else {
                let old = open_db(legacy)?;
                let read = old.begin_read().map_err(|x| e(&x))?;
                let entries = Tables::of(component).copy_from(&Tables::of(""), &read, &write).map_err(|x| e(&x))?;
                let from = legacy.display().to_string();
                let now = crate::clock::unix_ms(std::time::SystemTime::now());
                migrations.insert(component, (from.as_str(), now)).map_err(|x| e(&x))?;
                Some(entries)
            }
        };
        write.commit().map_err(|x| e(&x))?;
        let mut renamed = legacy.as_os_str().to_owned();
        renamed.push(".migrated");
        std::fs::rename(legacy, &renamed).map_err(|x| e(&x))?;
        match copied {
            Some(entries) => {
                tracing::info!(%component, from = %legacy.display(), to = %self.path.display(), entries, "state taken over from the file of an earlier version (kept as *.migrated)")
            }
            None => {
                tracing::info!(%component, from = %legacy.display(), "state was taken over before; the old file is now renamed *.migrated")
            }
        }
        Ok(true)
    }
}

impl Drop for HostStore {
    fn drop(&mut self) {
        let (commits, batches) = self.group.counts();
        let committing_ms = self.group.committing_for().as_millis();
        tracing::info!(path = %self.path.display(), commits, batches, committing_ms, "host store closed: its group commits since start, the batches they carried and the time they took");
        self.group.close();
        self.flush.wake(|work| work.stop = true);
        if let Some(flusher) = self.flusher.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = flusher.join();
        }
    }
}

fn open_db(path: &Path) -> Result<Database, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // 0700: the state directory also holds the compile cache's seal key.
        crate::perms::create_private_dir(dir).map_err(|e| unavailable("cannot create the directory of", path)(&e))?;
    }
    Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|err| match err {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
            "state file {} is already open in another process: is another host running with the same state_dir?",
            path.display()
        )),
        err => unavailable("cannot open state file", path)(&err),
    })
}

/// One component's tables, and its published outbox entries not yet
/// forgotten.
#[derive(Debug)]
struct Component {
    tables: Tables,
    /// Outbox entries published since the component's last write, to forget
    /// in the next (hidden from readers until then).
    cleared: Mutex<Vec<String>>,
    /// Where pruning its handled ids stands.
    pruner: prune::Pruner,
}

/// A component's store: its tables in the host's file.
pub struct DurableStore {
    host: Arc<HostStore>,
    component: Arc<Component>,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore").field("path", &self.host.path).field("tables", &self.component.tables).finish()
    }
}

impl DurableStore {
    /// Opens (or creates) a host store at `path` holding this one store.
    ///
    /// # Errors
    /// As [`HostStore::open`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        HostStore::open(path)?.component("state")
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.host.path
    }

    fn t(&self) -> &Tables {
        &self.component.tables
    }

    fn err(&self, what: &str) -> impl Fn(&dyn std::fmt::Display) -> StoreError + use<> {
        unavailable(what, &self.host.path)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.host.db.begin_read().map_err(|e| self.err("cannot read")(&e))
    }

    fn cleared(&self) -> MutexGuard<'_, Vec<String>> {
        self.component.cleared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets `source`'s outbox entry with the next commit, or the
    /// flusher's next round when no commit comes within [`FLUSH_IDLE`].
    fn clear_later(&self, source: &str) {
        self.cleared().push(source.to_owned());
        self.host.flush.wake(|work| work.pending = true);
    }

    /// Moves `found` to the quarantine, each only if it still holds the
    /// bytes found (a commit may have replaced it meanwhile), durably: the
    /// entry leaves its table in the same transaction.
    fn quarantine(&self, found: Vec<Found>) -> Result<(), StoreError> {
        if found.is_empty() {
            return Ok(());
        }
        let e = self.err("cannot quarantine a corrupt entry in");
        let mut write = self.host.db.begin_write().map_err(|x| e(&x))?;
        write.set_durability(Durability::Immediate).map_err(|x| e(&x))?;
        let mut moved = Vec::new();
        for found in found {
            if let Some(entry) = quarantine::move_to(self.t(), &write, found).map_err(|x| e(&x))? {
                moved.push(entry);
            }
        }
        write.commit().map_err(|x| e(&x))?;
        for entry in &moved {
            super::report(self, entry);
        }
        Ok(())
    }

    /// Writes `raw` as the stored body of a timer due at `at_ms` or of the
    /// outbox entry of event `id`, as a corrupt entry would be found (tests).
    #[cfg(test)]
    pub(super) fn write_raw(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        let write = self.host.db.begin_write().unwrap();
        match kind {
            EntryKind::Timer => {
                write.open_table(self.t().timers()).unwrap().insert(id, raw).unwrap();
                write.open_table(self.t().timers_due()).unwrap().insert((at_ms, id), ()).unwrap();
            }
            EntryKind::Outbox => {
                let mut outbox = write.open_table(self.t().outbox()).unwrap();
                let seq = outbox.last().unwrap().map_or(0, |(k, _)| k.value() + 1);
                outbox.insert(seq, raw).unwrap();
                write.open_table(self.t().outbox_by_source()).unwrap().insert(id, seq).unwrap();
            }
        }
        write.commit().unwrap();
    }
}

/// What the flusher is asked to do, and the components it looks after.
#[derive(Default)]
struct Flush {
    work: Mutex<FlushWork>,
    wake: Condvar,
}

#[derive(Default)]
struct FlushWork {
    components: Vec<Weak<Component>>,
    /// Some component has published outbox entries to forget.
    pending: bool,
    /// Flush what is left and stop.
    stop: bool,
}

impl Flush {
    fn lock(&self) -> MutexGuard<'_, FlushWork> {
        self.work.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the work under the lock and wakes the flusher if that made
    /// it pending or stopping (it sleeps until then: nothing to do, no
    /// wake-ups).
    fn wake(&self, change: impl FnOnce(&mut FlushWork)) {
        let mut work = self.lock();
        let before = (work.pending, work.stop);
        change(&mut work);
        if (work.pending, work.stop) != before {
            self.wake.notify_one();
        }
    }
}

/// The flusher: once outbox entries are published, gives commits
/// [`FLUSH_IDLE`] to carry them, then forgets what is left in a transaction
/// of its own; flushes what is left when the store closes.
fn flush_loop(db: &Database, flush: &Flush) {
    loop {
        let mut work = flush.lock();
        while !work.pending && !work.stop {
            work = flush.wake.wait(work).unwrap_or_else(PoisonError::into_inner);
        }
        let until = Instant::now() + FLUSH_IDLE;
        while !work.stop && Instant::now() < until {
            work = flush.wake.wait_timeout(work, until - Instant::now()).unwrap_or_else(PoisonError::into_inner).0;
        }
        work.pending = false;
        work.components.retain(|c| c.strong_count() > 0);
        let (stopping, components) = (work.stop, work.components.clone());
        drop(work);
        for component in components.iter().filter_map(Weak::upgrade) {
            let cleared = component.cleared.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if cleared.is_empty() {
                continue;
            }
            match forget_now(db, &component.tables, &cleared) {
                Ok(()) => {
                    component.cleared.lock().unwrap_or_else(PoisonError::into_inner).retain(|s| !cleared.contains(s))
                }
                // Harmless: the entries stay hidden and are tried again.
                Err(err) => tracing::warn!("cannot forget published outbox entries: {err}"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// Forgets `cleared` in a transaction of its own, without an fsync: losing it
/// in a crash only publishes those entries again.
fn forget_now(db: &Database, tables: &Tables, cleared: &[String]) -> Result<(), redb::Error> {
    let mut write = db.begin_write()?;
    write.set_durability(Durability::None).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    tables::apply(tables, &write, &[], cleared)?;
    write.commit()?;
    Ok(())
}

impl StateStore for DurableStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        let e = self.err("cannot read");
        let table = self.read()?.open_table(self.t().state()).map_err(|x| e(&x))?;
        Ok(table.get(key).map_err(|x| e(&x))?.map(|v| v.value().to_vec()))
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        let e = self.err("cannot read");
        let table = self.read()?.open_table(self.t().state()).map_err(|x| e(&x))?;
        tables::list(&table, prefix, limit).map_err(|x| e(&x))
    }

    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        // The batch joins the host's group commit: one fsync covers it and
        // whatever the other components committed meanwhile; the outbox
        // entries published since this component's last write ride along.
        check_commits(commits)?;
        let cleared = self.cleared().clone();
        let t = self.t();
        let err = self.err("cannot commit to");
        let apply = |write: &redb::WriteTransaction| {
            match tables::check(t, write, commits, reads) {
                Ok(()) => {}
                Err(Checked::Conflict(conflict)) => return Applied::Refused(conflict),
                Err(Checked::Db(x)) => return Applied::Refused(err(&x)),
            }
            match tables::apply(t, write, commits, &cleared) {
                Ok(()) => Applied::Joined,
                Err(x) => Applied::Broken(err(&x)),
            }
        };
        self.host.group.commit(&self.host.db, apply, self.err("cannot commit to"))?;
        self.cleared().retain(|s| !cleared.contains(s));
        Ok(Durable::done())
    }

    fn sync_point(&self) -> Durable {
        // Every commit is durable when `commit_batch` returns.
        Durable::done()
    }

    fn prune_handled(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let pruned = self.component.pruner.prune(&self.host.db, self.t(), before_ms, limit);
        pruned.map_err(|e| self.err("cannot prune handled ids in")(&e))
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        check_id(id)?;
        let e = self.err("cannot read");
        let table = self.read()?.open_table(self.t().handled()).map_err(|x| e(&x))?;
        Ok(table.get(id).map_err(|x| e(&x))?.is_some())
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        check_id(source)?;
        if self.cleared().iter().any(|s| s == source) {
            return Ok(None);
        }
        let e = self.err("cannot read");
        let read = self.read()?;
        let by_source = read.open_table(self.t().outbox_by_source()).map_err(|x| e(&x))?;
        let Some(seq) = by_source.get(source).map_err(|x| e(&x))?.map(|v| v.value()) else { return Ok(None) };
        let outbox = read.open_table(self.t().outbox()).map_err(|x| e(&x))?;
        let Some(raw) = outbox.get(seq).map_err(|x| e(&x))?.map(|v| v.value().to_vec()) else { return Ok(None) };
        match decode_entry(&raw) {
            Ok(entry) => Ok(Some(entry)),
            Err(reason) => {
                self.quarantine(vec![Found { place: Place::Outbox(seq), raw, reason }])?;
                Ok(None)
            }
        }
    }

    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let e = self.err("cannot read");
        let outbox = self.read()?.open_table(self.t().outbox()).map_err(|x| e(&x))?;
        let cleared = self.cleared().clone();
        let (mut entries, mut corrupt) = (Vec::new(), Vec::new());
        for entry in outbox.iter().map_err(|x| e(&x))? {
            if entries.len() >= limit {
                break;
            }
            let (seq, bytes) = entry.map_err(|x| e(&x))?;
            match decode_entry::<OutboxEntry>(bytes.value()) {
                Ok(entry) if cleared.contains(&entry.source) => {}
                Ok(entry) => entries.push(entry),
                Err(reason) => {
                    corrupt.push(Found { place: Place::Outbox(seq.value()), raw: bytes.value().to_vec(), reason })
                }
            }
        }
        drop(outbox);
        self.quarantine(corrupt)?;
        Ok(entries)
    }

    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        // Forgotten by the next commit (or the flusher's next round when no
        // commit comes); until then hidden from readers. Lost in a crash, it
        // is only published again.
        self.clear_later(source);
        Ok(())
    }

    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        check_id(id)?;
        let e = self.err("cannot read");
        let timers = self.read()?.open_table(self.t().timers()).map_err(|x| e(&x))?;
        let Some(raw) = timers.get(id).map_err(|x| e(&x))?.map(|v| v.value().to_vec()) else { return Ok(None) };
        match decode_entry(&raw) {
            Ok(timer) => Ok(Some(timer)),
            Err(reason) => {
                self.quarantine(vec![Found { place: Place::Timer(id.to_owned(), None), raw, reason }])?;
                Ok(None)
            }
        }
    }

    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError> {
        let e = self.err("cannot read");
        let read = self.read()?;
        let due = read.open_table(self.t().timers_due()).map_err(|x| e(&x))?;
        let timers = read.open_table(self.t().timers()).map_err(|x| e(&x))?;
        let (mut fired, mut corrupt) = (Vec::new(), Vec::new());
        for entry in due.range((0, "")..(now_ms.saturating_add(1), "")).map_err(|x| e(&x))?.take(limit) {
            let (key, _) = entry.map_err(|x| e(&x))?;
            let (at_ms, id) = key.value();
            if let Some(bytes) = timers.get(id).map_err(|x| e(&x))? {
                match decode_entry(bytes.value()) {
                    Ok(timer) => fired.push(timer),
                    Err(reason) => corrupt.push(Found {
                        place: Place::Timer(id.to_owned(), Some(at_ms)),
                        raw: bytes.value().to_vec(),
                        reason,
                    }),
                }
            }
        }
        drop((due, timers));
        self.quarantine(corrupt)?;
        Ok(fired)
    }

    fn data_usage(&self) -> Result<(u64, u64), StoreError> {
        // One read transaction over the state table, no copies.
        let e = self.err("cannot read");
        let table = self.read()?.open_table(self.t().state()).map_err(|x| e(&x))?;
        let (mut keys, mut bytes) = (0u64, 0u64);
        for entry in table.iter().map_err(|x| e(&x))? {
            let (key, value) = entry.map_err(|x| e(&x))?;
            keys += 1;
            bytes += (key.value().len() + value.value().len()) as u64;
        }
        Ok((keys, bytes))
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        let e = self.err("cannot read");
        self.read()?.open_table(self.t().timers()).map_err(|x| e(&x))?.len().map_err(|x| e(&x))
    }

    fn outbox_count(&self) -> Result<u64, StoreError> {
        // The outbox is short (entries leave it once published): counting
        // the ones not cleared since the last flush is cheap.
        let e = self.err("cannot read");
        let cleared = self.cleared().clone();
        let by_source = self.read()?.open_table(self.t().outbox_by_source()).map_err(|x| e(&x))?;
        let mut count = 0;
        for entry in by_source.iter().map_err(|x| e(&x))? {
            let (source, _) = entry.map_err(|x| e(&x))?;
            count += u64::from(!cleared.iter().any(|c| c == source.value()));
        }
        Ok(count)
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let e = self.err("cannot read");
        let table = self.read()?.open_table(self.t().quarantine()).map_err(|x| e(&x))?;
        quarantine::latest(&table, limit).map_err(|x| e(&x))
    }

    fn corrupt_entries(&self) -> Result<CorruptEntries, StoreError> {
        let e = self.err("cannot read");
        let count = self.read()?.open_table(self.t().quarantine()).map_err(|x| e(&x))?.len().map_err(|x| e(&x))?;
        let last = if count == 0 { None } else { self.quarantined(1)?.first().map(Quarantined::describe) };
        Ok(CorruptEntries { count, last_reason: last })
    }
}
