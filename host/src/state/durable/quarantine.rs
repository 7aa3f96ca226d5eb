//! The redb adapter's quarantine: timers and outbox entries that could not
//! be decoded, moved out of their tables by the read that found them.

use redb::ReadableTable as _;

use super::tables::{Tables, due_time};
use crate::state::{EntryKind, Quarantined};

// The quarantine table ([`Tables::quarantine`]): sequence → (kind, id, raw
// bytes, reason, when) of entries that could not be decoded. Plain columns,
// so that nothing in it needs decoding.

/// An undecodable entry a read found, to be quarantined.
pub(super) struct Found {
    pub place: Place,
    pub raw: Vec<u8>,
    pub reason: String,
}

/// Where a [`Found`] entry is stored.
pub(super) enum Place {
    /// Timer `id`, due at the time given when the read knew it.
    Timer(String, Option<u64>),
    /// Outbox sequence number.
    Outbox(u64),
}

/// Moves one found entry to the quarantine in `write`, if it still holds
/// the bytes found; the entry quarantined, if any.
pub(super) fn move_to(
    t: &Tables,
    write: &redb::WriteTransaction,
    found: Found,
) -> Result<Option<Quarantined>, redb::Error> {
    let (kind, id) = match found.place {
        Place::Timer(id, at_ms) => {
            let mut timers = write.open_table(t.timers())?;
            if timers.get(id.as_str())?.is_none_or(|v| v.value() != found.raw.as_slice()) {
                return Ok(None);
            }
            let mut due = write.open_table(t.timers_due())?;
            timers.remove(id.as_str())?;
            if let Some(at_ms) = at_ms.map_or_else(|| due_time(&due, &id), |at| Ok(Some(at)))? {
                due.remove((at_ms, id.as_str()))?;
            }
            (EntryKind::Timer, id)
        }
        Place::Outbox(seq) => {
            let mut outbox = write.open_table(t.outbox())?;
            if outbox.get(seq)?.is_none_or(|v| v.value() != found.raw.as_slice()) {
                return Ok(None);
            }
            outbox.remove(seq)?;
            // The outbox is short (entries leave it once published): its
            // source is found by a scan, taken only here.
            let mut by_source = write.open_table(t.outbox_by_source())?;
            let mut source = None;
            for entry in by_source.iter()? {
                let (key, value) = entry?;
                if value.value() == seq {
                    source = Some(key.value().to_owned());
                    break;
                }
            }
            let id = match source {
                Some(source) => {
                    by_source.remove(source.as_str())?;
                    source
                }
                None => format!("#{seq}"),
            };
            (EntryKind::Outbox, id)
        }
    };
    let entry = Quarantined {
        kind,
        id,
        raw: found.raw,
        reason: found.reason,
        at_ms: crate::clock::unix_ms(std::time::SystemTime::now()),
    };
    let mut quarantine = write.open_table(t.quarantine())?;
    let seq = quarantine.last()?.map_or(0, |(k, _)| k.value() + 1);
    quarantine.insert(
        seq,
        (entry.kind.as_str(), entry.id.as_str(), entry.raw.as_slice(), entry.reason.as_str(), entry.at_ms),
    )?;
    Ok(Some(entry))
}

/// The latest `limit` entries of `table`, latest first.
pub(super) fn latest(
    table: &impl redb::ReadableTable<u64, (&'static str, &'static str, &'static [u8], &'static str, u64)>,
    limit: usize,
) -> Result<Vec<Quarantined>, redb::Error> {
    let mut entries = Vec::new();
    for entry in table.iter()?.rev().take(limit) {
        let (_, value) = entry?;
        let (kind, id, raw, reason, at_ms) = value.value();
        let kind = EntryKind::parse(kind);
        entries.push(Quarantined { kind, id: id.to_owned(), raw: raw.to_vec(), reason: reason.to_owned(), at_ms });
    }
    Ok(entries)
}
