//! The durable state adapter: one redb database file per component.
//!
//! redb is a copy-on-write B-tree with checksummed pages: a write
//! transaction becomes visible, and after `commit` returns durable (fsync),
//! as a whole or not at all, and a crash mid-commit leaves the previous
//! committed version. The component's writes, the handled id, the outbox
//! entry and the timer changes of an event go into one redb write
//! transaction over six tables, so they are atomic together. A seventh holds
//! the timers and outbox entries found undecodable, moved there (in a
//! transaction of their own) by the read that found them.
//!
//! Group commit: the pipeline hands over a batch of events' commits, which go
//! to disk in one fsynced transaction (under load a batch holds dozens of
//! events, so they share one fsync); when `commit_batch` returns they are
//! durable. Outbox entries published meanwhile are forgotten by the next
//! commit, or by a flusher thread when none comes within a second. (Handing
//! the fsync to a separate flusher thread, as before, cost an extra thread
//! hop per batch: 5.5–6.0 instead of 4.7–5.2 ms of host CPU per order at 100
//! orders/s in four runs each, and no more throughput under load.)

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use redb::{
    Database, Durability, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
};

#[cfg(test)]
use super::EntryKind;
use super::{
    Commit, CorruptEntries, Durable, OutboxEntry, Quarantined, ReadSet, StateStore, StoreError, Timer, TimerChange,
    decode_entry,
};
use quarantine::{Found, Place, QUARANTINE};

mod quarantine;

/// The component's own key-value state.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// Handled event id → when it was handled.
const HANDLED: TableDefinition<&str, u64> = TableDefinition::new("handled");
/// Commit sequence → JSON [`OutboxEntry`].
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Source event id → its outbox sequence.
const OUTBOX_BY_SOURCE: TableDefinition<&str, u64> = TableDefinition::new("outbox_by_source");
/// Timer id → JSON [`Timer`].
const TIMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("timers");
/// (due time, timer id): the timers in firing order.
const TIMERS_DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("timers_due");

/// redb's page cache per store (its default is 1 GiB): what is read often,
/// the handled ids of recent events and the component's hot keys, fits.
const CACHE_BYTES: usize = 32 << 20;

/// A component's store in a redb file.
pub struct DurableStore {
    db: Arc<Database>,
    path: PathBuf,
    /// What the store and its flusher share.
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, path: &Path) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    let context = format!("{what} {}", path.display());
    move |err| StoreError::Unavailable(format!("{context}: {err}"))
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Structs of strings and integers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

impl DurableStore {
    /// Opens (or creates) the store at `path`, creating its directory.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the file: it cannot be created,
    /// is not a redb database, or is open in another process (another host
    /// serving the same component from the same state directory).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::perms::create_private_dir(dir)
                .map_err(|e| unavailable("cannot create the directory of", path)(&e))?;
        }
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|err| match err {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "state file {} is already open in another process: is another host running with the same state_dir?",
                path.display()
            )),
            err => unavailable("cannot open state file", path)(&err),
        })?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared::default());
        let flusher = {
            let (db, shared) = (db.clone(), shared.clone());
            let name = format!("flush {}", path.file_name().unwrap_or_default().to_string_lossy());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || flush_loop(&db, &shared))
                .map_err(|e| unavailable("cannot start the flusher of", path)(&e))?
        };
        let store = Self { db, path: path.to_owned(), shared, flusher: Some(flusher) };
        let write = store.db.begin_write().map_err(|e| store.err("cannot write")(&e))?;
        {
            let e = store.err("cannot create tables in");
            write.open_table(STATE).map_err(|x| e(&x))?;
            write.open_table(HANDLED).map_err(|x| e(&x))?;
            write.open_table(OUTBOX).map_err(|x| e(&x))?;
            write.open_table(OUTBOX_BY_SOURCE).map_err(|x| e(&x))?;
            write.open_table(TIMERS).map_err(|x| e(&x))?;
            write.open_table(TIMERS_DUE).map_err(|x| e(&x))?;
            write.open_table(QUARANTINE).map_err(|x| e(&x))?;
        }
        write.commit().map_err(|e| store.err("cannot commit")(&e))?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
        unavailable(what, &self.path)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().map_err(|e| self.err("cannot read")(&e))
    }

    /// One durable transaction: `commits` in order if `reads` still hold,
    /// and forgetting the `cleared` outbox entries.
    fn apply(&self, commits: &[Commit], reads: &ReadSet, cleared: &[String]) -> Result<(), StoreError> {
        let e = self.err("cannot commit to");
        let mut write = self.db.begin_write().map_err(|x| e(&x))?;
        write.set_durability(Durability::Immediate).map_err(|x| e(&x))?;
        check(&write, commits, reads).map_err(|x| match x {
            Checked::Conflict(err) => err,
            Checked::Db(x) => e(&x),
        })?;
        self.apply_checked(write, commits, cleared).map_err(|x| e(&x))
    }

    /// Moves `found` to the quarantine, each only if it still holds the
    /// bytes found (a commit may have replaced it meanwhile), durably: the
    /// entry leaves its table in the same transaction.
    fn quarantine(&self, found: Vec<Found>) -> Result<(), StoreError> {
        if found.is_empty() {
            return Ok(());
        }
        let e = self.err("cannot quarantine a corrupt entry in");
        let mut write = self.db.begin_write().map_err(|x| e(&x))?;
        write.set_durability(Durability::Immediate).map_err(|x| e(&x))?;
        let mut moved = Vec::new();
        for found in found {
            if let Some(entry) = quarantine::move_to(&write, found).map_err(|x| e(&x))? {
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
        let write = self.db.begin_write().unwrap();
        match kind {
            EntryKind::Timer => {
                write.open_table(TIMERS).unwrap().insert(id, raw).unwrap();
                write.open_table(TIMERS_DUE).unwrap().insert((at_ms, id), ()).unwrap();
            }
            EntryKind::Outbox => {
                let mut outbox = write.open_table(OUTBOX).unwrap();
                let seq = outbox.last().unwrap().map_or(0, |(k, _)| k.value() + 1);
                outbox.insert(seq, raw).unwrap();
                write.open_table(OUTBOX_BY_SOURCE).unwrap().insert(id, seq).unwrap();
            }
        }
        write.commit().unwrap();
    }

    fn apply_checked(
        &self,
        write: redb::WriteTransaction,
        commits: &[Commit],
        cleared: &[String],
    ) -> Result<(), redb::Error> {
        for commit in commits {
            apply_one(&write, commit)?;
        }
        forget(&write, cleared)?;
        write.commit()?;
        Ok(())
    }
}

/// Why a batch's check failed.
enum Checked {
    Conflict(StoreError),
    Db(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for Checked {
    fn from(err: E) -> Self {
        Checked::Db(err.into())
    }
}

/// Refuses a batch that read something changed since, or whose event was
/// handled already. (One host writes a redb file, through one executor, so
/// this holds unless the store is shared in-process, as the contract tests do.)
fn check(write: &redb::WriteTransaction, commits: &[Commit], reads: &ReadSet) -> Result<(), Checked> {
    if commits.iter().any(|c| c.handled.is_some()) {
        let handled = write.open_table(HANDLED)?;
        for id in commits.iter().filter_map(|c| c.handled.as_deref()) {
            if handled.get(id)?.is_some() {
                return Err(Checked::Conflict(StoreError::Conflict(format!("event {id} was handled meanwhile"))));
            }
        }
    }
    if reads.is_empty() {
        return Ok(());
    }
    let state = write.open_table(STATE)?;
    let changed = reads.changed(
        |key| Ok::<_, redb::Error>(ReadSet::digest(state.get(key)?.as_ref().map(|v| v.value()))),
        |prefix, limit| list(&state, prefix, limit),
    )?;
    match changed {
        Some(conflict) => Err(Checked::Conflict(conflict)),
        None => Ok(()),
    }
}

/// Keys of `table` starting with `prefix`, ascending, at most `limit`.
fn list(
    table: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
    limit: usize,
) -> Result<Vec<String>, redb::Error> {
    let mut keys = Vec::new();
    for entry in table.range(prefix..)? {
        let (key, _) = entry?;
        let key = key.value();
        if !key.starts_with(prefix) || keys.len() >= limit {
            break;
        }
        keys.push(key.to_owned());
    }
    Ok(keys)
}

/// An [`OutboxEntry`] serialized without copying its records.
#[derive(serde::Serialize)]
struct EntryRef<'a> {
    source: &'a str,
    created_ms: u64,
    records: &'a [super::OutboxRecord],
}

/// Adds one event's changes to the write transaction `write`.
fn apply_one(write: &redb::WriteTransaction, commit: &Commit) -> Result<(), redb::Error> {
    // Tables are opened only when touched: each costs pages to rewrite.
    if !commit.writes.is_empty() {
        let mut state = write.open_table(STATE)?;
        for (key, value) in &commit.writes {
            match value {
                Some(value) => state.insert(key.as_str(), value.as_slice())?,
                None => state.remove(key.as_str())?,
            };
        }
    }
    if commit.fired.is_some() || !commit.timers.is_empty() {
        let mut timers = write.open_table(TIMERS)?;
        let mut due = write.open_table(TIMERS_DUE)?;
        if let Some((id, at_ms)) = &commit.fired {
            remove_timer(&mut timers, &mut due, id, Some(*at_ms))?;
        }
        for change in &commit.timers {
            match change {
                TimerChange::Set(timer) => {
                    remove_timer(&mut timers, &mut due, &timer.id, None)?;
                    timers.insert(timer.id.as_str(), json(timer).as_slice())?;
                    due.insert((timer.at_ms, timer.id.as_str()), ())?;
                }
                TimerChange::Cancel(id) => remove_timer(&mut timers, &mut due, id, None)?,
            }
        }
    }
    if let Some(source) = &commit.handled {
        write.open_table(HANDLED)?.insert(source.as_str(), commit.now_ms)?;
        if !commit.outbox.is_empty() {
            let mut outbox = write.open_table(OUTBOX)?;
            let seq = outbox.last()?.map_or(0, |(k, _)| k.value() + 1);
            let entry = EntryRef { source, created_ms: commit.now_ms, records: &commit.outbox };
            outbox.insert(seq, json(&entry).as_slice())?;
            write.open_table(OUTBOX_BY_SOURCE)?.insert(source.as_str(), seq)?;
        }
    }
    Ok(())
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        self.shared.wake(|work| work.stop = true);
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

/// State shared by a store and its flusher.
#[derive(Default)]
struct Shared {
    work: Mutex<Work>,
    wake: Condvar,
}

/// What the flusher is asked to do.
#[derive(Default)]
struct Work {
    /// Outbox entries published since the last write, to forget in the next.
    cleared: Vec<String>,
    /// Flush what is left and stop.
    stop: bool,
}

impl Shared {
    fn work(&self) -> std::sync::MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the work under the lock (ordering it with the flusher's
    /// check) and wakes the flusher.
    fn wake(&self, change: impl FnOnce(&mut Work)) {
        change(&mut self.work());
        self.wake.notify_one();
    }

    fn is_cleared(&self, source: &str) -> bool {
        self.work().cleared.iter().any(|s| s == source)
    }
}

/// The flusher: forgets outbox entries published while no commit came to
/// carry them (a commit takes them along), checking every [`FLUSH_IDLE`],
/// and flushes what is left when the store closes.
fn flush_loop(db: &Database, shared: &Shared) {
    loop {
        let (stopping, cleared) = {
            let mut work = shared.work();
            if !work.stop {
                work = shared.wake.wait_timeout(work, FLUSH_IDLE).unwrap_or_else(PoisonError::into_inner).0;
            }
            (work.stop, work.cleared.clone())
        };
        if !cleared.is_empty() {
            match forget_now(db, &cleared) {
                Ok(()) => shared.work().cleared.retain(|s| !cleared.contains(s)),
                // Harmless: the entries stay hidden and are tried again.
                Err(err) => tracing::warn!("cannot forget published outbox entries: {err}"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// How long published outbox entries may wait for a commit to carry them.
const FLUSH_IDLE: Duration = Duration::from_secs(1);

/// Forgets `cleared` in a transaction of its own, without an fsync: losing it
/// in a crash only publishes those entries again.
fn forget_now(db: &Database, cleared: &[String]) -> Result<(), redb::Error> {
    let mut write = db.begin_write()?;
    write.set_durability(Durability::None).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    forget(&write, cleared)?;
    write.commit()?;
    Ok(())
}

/// Forgets the outbox entries of `cleared` sources in `write`.
fn forget(write: &redb::WriteTransaction, cleared: &[String]) -> Result<(), redb::Error> {
    if cleared.is_empty() {
        return Ok(());
    }
    let mut by_source = write.open_table(OUTBOX_BY_SOURCE)?;
    let mut outbox = write.open_table(OUTBOX)?;
    for source in cleared {
        let seq = by_source.remove(source.as_str())?.map(|v| v.value());
        if let Some(seq) = seq {
            outbox.remove(seq)?;
        }
    }
    Ok(())
}

/// Removes timer `id` (only if due at `only_at`, when given) and its index
/// entry. A corrupt body is removed the same way: setting or cancelling a
/// timer replaces whatever was stored.
fn remove_timer(
    timers: &mut redb::Table<'_, &'static str, &'static [u8]>,
    due: &mut redb::Table<'_, (u64, &'static str), ()>,
    id: &str,
    only_at: Option<u64>,
) -> Result<(), redb::Error> {
    let old = timers.get(id)?.map(|v| v.value().to_vec());
    let Some(old) = old else { return Ok(()) };
    let at_ms = match decode_entry::<Timer>(&old) {
        Ok(old) => Some(old.at_ms),
        Err(_) => due_time(due, id)?,
    };
    if only_at.is_none_or(|at| Some(at) == at_ms) {
        timers.remove(id)?;
        if let Some(at_ms) = at_ms {
            due.remove((at_ms, id))?;
        }
    }
    Ok(())
}

/// The due time of timer `id` as indexed: the only record of it when its
/// body is corrupt. A scan, taken only then.
fn due_time(due: &impl redb::ReadableTable<(u64, &'static str), ()>, id: &str) -> Result<Option<u64>, redb::Error> {
    for entry in due.iter()? {
        let (key, _) = entry?;
        let (at_ms, indexed) = key.value();
        if indexed == id {
            return Ok(Some(at_ms));
        }
    }
    Ok(None)
}

impl StateStore for DurableStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let e = self.err("cannot read");
        let table = self.read()?.open_table(STATE).map_err(|x| e(&x))?;
        Ok(table.get(key).map_err(|x| e(&x))?.map(|v| v.value().to_vec()))
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let e = self.err("cannot read");
        let table = self.read()?.open_table(STATE).map_err(|x| e(&x))?;
        list(&table, prefix, limit).map_err(|x| e(&x))
    }

    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        // The batch is the group: one fsync covers all its events, and the
        // outbox entries published since the last write ride along.
        let cleared = self.shared.work().cleared.clone();
        self.apply(commits, reads, &cleared)?;
        self.shared.work().cleared.retain(|s| !cleared.contains(s));
        Ok(Durable::done())
    }

    fn sync_point(&self) -> Durable {
        // Every commit is durable when `commit_batch` returns.
        Durable::done()
    }

    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        let e = self.err("cannot read");
        let table = self.read()?.open_table(HANDLED).map_err(|x| e(&x))?;
        Ok(table.get(id).map_err(|x| e(&x))?.is_some())
    }

    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        if self.shared.is_cleared(source) {
            return Ok(None);
        }
        let e = self.err("cannot read");
        let read = self.read()?;
        let by_source = read.open_table(OUTBOX_BY_SOURCE).map_err(|x| e(&x))?;
        let Some(seq) = by_source.get(source).map_err(|x| e(&x))?.map(|v| v.value()) else { return Ok(None) };
        let outbox = read.open_table(OUTBOX).map_err(|x| e(&x))?;
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
        let outbox = self.read()?.open_table(OUTBOX).map_err(|x| e(&x))?;
        let cleared = self.shared.work().cleared.clone();
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
        self.shared.work().cleared.push(source.to_owned());
        Ok(())
    }

    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        let e = self.err("cannot read");
        let timers = self.read()?.open_table(TIMERS).map_err(|x| e(&x))?;
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
        let due = read.open_table(TIMERS_DUE).map_err(|x| e(&x))?;
        let timers = read.open_table(TIMERS).map_err(|x| e(&x))?;
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
        let table = self.read()?.open_table(STATE).map_err(|x| e(&x))?;
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
        self.read()?.open_table(TIMERS).map_err(|x| e(&x))?.len().map_err(|x| e(&x))
    }

    fn outbox_count(&self) -> Result<u64, StoreError> {
        // The outbox is short (entries leave it once published): counting
        // the ones not cleared since the last flush is cheap.
        let e = self.err("cannot read");
        let cleared = self.shared.work().cleared.clone();
        let by_source = self.read()?.open_table(OUTBOX_BY_SOURCE).map_err(|x| e(&x))?;
        let mut count = 0;
        for entry in by_source.iter().map_err(|x| e(&x))? {
            let (source, _) = entry.map_err(|x| e(&x))?;
            count += u64::from(!cleared.iter().any(|c| c == source.value()));
        }
        Ok(count)
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        let e = self.err("cannot read");
        let table = self.read()?.open_table(QUARANTINE).map_err(|x| e(&x))?;
        quarantine::latest(&table, limit).map_err(|x| e(&x))
    }

    fn corrupt_entries(&self) -> Result<CorruptEntries, StoreError> {
        let e = self.err("cannot read");
        let count = self.read()?.open_table(QUARANTINE).map_err(|x| e(&x))?.len().map_err(|x| e(&x))?;
        let last = if count == 0 { None } else { self.quarantined(1)?.first().map(Quarantined::describe) };
        Ok(CorruptEntries { count, last_reason: last })
    }
}
