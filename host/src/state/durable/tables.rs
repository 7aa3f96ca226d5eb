//! One component's tables in the host's redb file, and what a commit does
//! to them. Every component has the same eight tables under names of its
//! own (`payment/state`, `payment/handled`, ...), so that the commits of all
//! the components a host serves can share one write transaction.

use redb::{ReadableTable as _, TableDefinition};

use super::super::{Commit, ReadSet, StoreError, Timer, TimerChange, decode_entry};

/// A stored key-value table: string keys, byte values.
pub(super) type Bytes<'a> = TableDefinition<'a, &'static str, &'static [u8]>;

/// The names of one component's tables.
#[derive(Debug)]
pub(super) struct Tables {
    /// The component's own key-value state.
    state: String,
    /// Handled event id → when it was handled.
    handled: String,
    /// (when handled, event id): the handled ids in the order they expire,
    /// for pruning. Ids handled before this index existed (files of
    /// 2026-12-06 and earlier) have no entry here.
    handled_at: String,
    /// Commit sequence → JSON [`super::super::OutboxEntry`].
    outbox: String,
    /// Source event id → its outbox sequence.
    outbox_by_source: String,
    /// Timer id → JSON [`Timer`].
    timers: String,
    /// (due time, timer id): the timers in firing order.
    timers_due: String,
    /// Quarantine sequence → (kind, id, raw bytes, reason, when).
    quarantine: String,
}

impl Tables {
    /// The tables of `component`, or the unprefixed ones of a store file of
    /// its own (the layout before one file held every component) when
    /// `component` is empty.
    pub(super) fn of(component: &str) -> Self {
        let name = |table: &str| if component.is_empty() { table.to_owned() } else { format!("{component}/{table}") };
        Self {
            state: name("state"),
            handled: name("handled"),
            handled_at: name("handled_at"),
            outbox: name("outbox"),
            outbox_by_source: name("outbox_by_source"),
            timers: name("timers"),
            timers_due: name("timers_due"),
            quarantine: name("quarantine"),
        }
    }

    pub(super) fn state(&self) -> Bytes<'_> {
        TableDefinition::new(&self.state)
    }

    pub(super) fn handled(&self) -> TableDefinition<'_, &'static str, u64> {
        TableDefinition::new(&self.handled)
    }

    pub(super) fn handled_at(&self) -> TableDefinition<'_, (u64, &'static str), ()> {
        TableDefinition::new(&self.handled_at)
    }

    pub(super) fn outbox(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.outbox)
    }

    pub(super) fn outbox_by_source(&self) -> TableDefinition<'_, &'static str, u64> {
        TableDefinition::new(&self.outbox_by_source)
    }

    pub(super) fn timers(&self) -> Bytes<'_> {
        TableDefinition::new(&self.timers)
    }

    pub(super) fn timers_due(&self) -> TableDefinition<'_, (u64, &'static str), ()> {
        TableDefinition::new(&self.timers_due)
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn quarantine(
        &self,
    ) -> TableDefinition<'_, u64, (&'static str, &'static str, &'static [u8], &'static str, u64)> {
        TableDefinition::new(&self.quarantine)
    }

    /// Creates every table in `write` (a no-op for those that exist).
    pub(super) fn create(&self, write: &redb::WriteTransaction) -> Result<(), redb::TableError> {
        write.open_table(self.state())?;
        write.open_table(self.handled())?;
        write.open_table(self.handled_at())?;
        write.open_table(self.outbox())?;
        write.open_table(self.outbox_by_source())?;
        write.open_table(self.timers())?;
        write.open_table(self.timers_due())?;
        write.open_table(self.quarantine())?;
        Ok(())
    }

    /// Copies every entry of `from`'s tables in `read` to this component's
    /// tables in `write`.
    pub(super) fn copy_from(
        &self,
        from: &Tables,
        read: &redb::ReadTransaction,
        write: &redb::WriteTransaction,
    ) -> Result<u64, redb::Error> {
        fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
            read: &redb::ReadTransaction,
            write: &redb::WriteTransaction,
            from: TableDefinition<'_, K, V>,
            to: TableDefinition<'_, K, V>,
        ) -> Result<u64, redb::Error> {
            let source = match read.open_table(from) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(err) => return Err(err.into()),
            };
            let mut target = write.open_table(to)?;
            let mut copied = 0;
            for entry in source.iter()? {
                let (key, value) = entry?;
                target.insert(key.value(), value.value())?;
                copied += 1;
            }
            Ok(copied)
        }
        Ok(copy(read, write, from.state(), self.state())?
            + copy(read, write, from.handled(), self.handled())?
            + copy(read, write, from.handled_at(), self.handled_at())?
            + copy(read, write, from.outbox(), self.outbox())?
            + copy(read, write, from.outbox_by_source(), self.outbox_by_source())?
            + copy(read, write, from.timers(), self.timers())?
            + copy(read, write, from.timers_due(), self.timers_due())?
            + copy(read, write, from.quarantine(), self.quarantine())?)
    }
}

/// Why a batch's check failed.
pub(super) enum Checked {
    Conflict(StoreError),
    Db(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for Checked {
    fn from(err: E) -> Self {
        Checked::Db(err.into())
    }
}

/// Refuses a batch that read something changed since, or whose event was
/// handled already. (One host writes a redb file, through one executor per
/// component, so this holds unless the store is shared in-process, as the
/// contract tests do.)
pub(super) fn check(
    t: &Tables,
    write: &redb::WriteTransaction,
    commits: &[Commit],
    reads: &ReadSet,
) -> Result<(), Checked> {
    if commits.iter().any(|c| c.handled.is_some()) {
        let handled = write.open_table(t.handled())?;
        for id in commits.iter().filter_map(|c| c.handled.as_deref()) {
            if handled.get(id)?.is_some() {
                return Err(Checked::Conflict(StoreError::Conflict(format!("event {id} was handled meanwhile"))));
            }
        }
    }
    if let Some((id, nonce)) = commits.iter().find_map(|c| c.fired.as_ref()) {
        let timer = write.open_table(t.timers())?.get(id.as_str())?.and_then(|t| decode_entry::<Timer>(t.value()).ok());
        if timer.is_none_or(|t| t.nonce != *nonce) {
            let conflict = format!("timer {id:?} was cancelled or set again since it fired");
            return Err(Checked::Conflict(StoreError::Conflict(conflict)));
        }
    }
    if reads.is_empty() {
        return Ok(());
    }
    let state = write.open_table(t.state())?;
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
pub(super) fn list(
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

/// An [`super::super::OutboxEntry`] serialized without copying its records.
#[derive(serde::Serialize)]
struct EntryRef<'a> {
    source: &'a str,
    created_ms: u64,
    records: &'a [super::super::OutboxRecord],
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Structs of strings and integers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Adds a batch's changes to the write transaction `write`, then forgets the
/// outbox entries of `cleared` sources.
pub(super) fn apply(
    t: &Tables,
    write: &redb::WriteTransaction,
    commits: &[Commit],
    cleared: &[String],
) -> Result<(), redb::Error> {
    let mut open = Opened::new(t, write);
    for commit in commits {
        open.apply_one(commit)?;
    }
    open.forget(cleared)
}

/// A table of a batch, opened on first use.
type Slot<'w, K, V> = Option<redb::Table<'w, K, V>>;

/// The tables a batch writes, each opened once, when first touched, and
/// kept open for the rest of the batch: an open is a look-up in the table
/// tree, and a table never touched keeps its pages.
struct Opened<'w> {
    t: &'w Tables,
    write: &'w redb::WriteTransaction,
    state: Slot<'w, &'static str, &'static [u8]>,
    timers: Slot<'w, &'static str, &'static [u8]>,
    timers_due: Slot<'w, (u64, &'static str), ()>,
    handled: Slot<'w, &'static str, u64>,
    handled_at: Slot<'w, (u64, &'static str), ()>,
    outbox: Slot<'w, u64, &'static [u8]>,
    outbox_by_source: Slot<'w, &'static str, u64>,
}

/// The table in `slot`, opening it in `write` first if it is not yet.
fn opened<'s, 'w, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'s mut Slot<'w, K, V>,
    write: &'w redb::WriteTransaction,
    definition: TableDefinition<'_, K, V>,
) -> Result<&'s mut redb::Table<'w, K, V>, redb::Error> {
    match slot {
        Some(table) => Ok(table),
        None => Ok(slot.insert(write.open_table(definition)?)),
    }
}

impl<'w> Opened<'w> {
    fn new(t: &'w Tables, write: &'w redb::WriteTransaction) -> Self {
        Self {
            t,
            write,
            state: None,
            timers: None,
            timers_due: None,
            handled: None,
            handled_at: None,
            outbox: None,
            outbox_by_source: None,
        }
    }

    /// Adds one event's changes.
    fn apply_one(&mut self, commit: &Commit) -> Result<(), redb::Error> {
        let (t, write) = (self.t, self.write);
        if !commit.writes.is_empty() {
            let state = opened(&mut self.state, write, t.state())?;
            for (key, value) in &commit.writes {
                match value {
                    Some(value) => state.insert(key.as_str(), value.as_slice())?,
                    None => state.remove(key.as_str())?,
                };
            }
        }
        if commit.fired.is_some() || !commit.timers.is_empty() {
            let timers = opened(&mut self.timers, write, t.timers())?;
            let due = opened(&mut self.timers_due, write, t.timers_due())?;
            if let Some((id, nonce)) = &commit.fired {
                remove_timer(timers, due, id, Some(*nonce))?;
            }
            for change in &commit.timers {
                match change {
                    TimerChange::Set(timer) => {
                        remove_timer(timers, due, &timer.id, None)?;
                        timers.insert(timer.id.as_str(), json(timer).as_slice())?;
                        due.insert((timer.at_ms, timer.id.as_str()), ())?;
                    }
                    TimerChange::Cancel(id) => remove_timer(timers, due, id, None)?,
                }
            }
        }
        if let Some(source) = &commit.handled {
            let handled = opened(&mut self.handled, write, t.handled())?;
            let earlier = handled.insert(source.as_str(), commit.now_ms)?.map(|at| at.value());
            let at = opened(&mut self.handled_at, write, t.handled_at())?;
            if let Some(earlier) = earlier {
                at.remove((earlier, source.as_str()))?;
            }
            at.insert((commit.now_ms, source.as_str()), ())?;
            if !commit.outbox.is_empty() {
                let outbox = opened(&mut self.outbox, write, t.outbox())?;
                let seq = outbox.last()?.map_or(0, |(k, _)| k.value() + 1);
                let entry = EntryRef { source, created_ms: commit.now_ms, records: &commit.outbox };
                outbox.insert(seq, json(&entry).as_slice())?;
                opened(&mut self.outbox_by_source, write, t.outbox_by_source())?.insert(source.as_str(), seq)?;
            }
        }
        Ok(())
    }

    /// Forgets the outbox entries of `cleared` sources.
    fn forget(&mut self, cleared: &[String]) -> Result<(), redb::Error> {
        let (t, write) = (self.t, self.write);
        for source in cleared {
            let seq = opened(&mut self.outbox_by_source, write, t.outbox_by_source())?.remove(source.as_str())?;
            if let Some(seq) = seq.map(|v| v.value()) {
                opened(&mut self.outbox, write, t.outbox())?.remove(seq)?;
            }
        }
        Ok(())
    }
}

/// Removes timer `id` (only the instance `only_nonce`, when given) and its
/// index entry. A corrupt body is removed the same way: setting or cancelling a
/// timer replaces whatever was stored.
fn remove_timer(
    timers: &mut redb::Table<'_, &'static str, &'static [u8]>,
    due: &mut redb::Table<'_, (u64, &'static str), ()>,
    id: &str,
    only_nonce: Option<u64>,
) -> Result<(), redb::Error> {
    let old = timers.get(id)?.map(|v| v.value().to_vec());
    let Some(old) = old else { return Ok(()) };
    let (at_ms, nonce) = match decode_entry::<Timer>(&old) {
        Ok(old) => (Some(old.at_ms), Some(old.nonce)),
        Err(_) => (due_time(due, id)?, None),
    };
    if only_nonce.is_none_or(|n| Some(n) == nonce) {
        timers.remove(id)?;
        if let Some(at_ms) = at_ms {
            due.remove((at_ms, id))?;
        }
    }
    Ok(())
}

/// The due time of timer `id` as indexed: the only record of it when its
/// body is corrupt. A scan, taken only then.
pub(super) fn due_time(
    due: &impl redb::ReadableTable<(u64, &'static str), ()>,
    id: &str,
) -> Result<Option<u64>, redb::Error> {
    for entry in due.iter()? {
        let (key, _) = entry?;
        let (at_ms, indexed) = key.value();
        if indexed == id {
            return Ok(Some(at_ms));
        }
    }
    Ok(None)
}
