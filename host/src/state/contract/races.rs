//! Contract cases for races and hostile input: re-reads within a batch,
//! timer cancels and re-sets across two store handles, keys and ids no
//! store can hold, duplicate ids in a batch, pruning of handled ids. Run on
//! every adapter by the contract in the parent module.

use std::sync::Arc;

use super::{handled, timer};
use crate::state::*;

/// Reads `key` through `overlay` as a number (absent: 0).
pub(super) fn number(overlay: &Overlay, key: &str) -> u64 {
    overlay.get(key).unwrap().map_or(0, |v| std::str::from_utf8(&v).unwrap().parse().unwrap())
}

/// An event of a batch: recorded in `overlay`, returned for the commit.
pub(super) fn batched(overlay: &Overlay, commit: Commit) -> Commit {
    overlay.record(&commit);
    commit
}

/// A batch on host `a` reads what host `b` changes and changes back
/// meanwhile (A→B→A): every read of the batch must see one value, so that
/// the commit either conflicts or is what some serial order gives. A key
/// read again from the store would see B, pass the check against A, and
/// lose an update.
pub(super) fn a_batch_rereading_what_changed_and_changed_back_loses_nothing(
    a: &Arc<dyn StateStore>,
    b: &Arc<dyn StateStore>,
) {
    let outcome = |result: Result<Durable, StoreError>| match result {
        Ok(_) => true,
        Err(StoreError::Conflict(_)) => false,
        Err(err) => panic!("{err}"),
    };
    // A counter: 5 → (b: 6, then 5) while the batch reads it twice.
    a.commit(handled("seed", &[("count", "5")], &[], vec![])).unwrap();
    let overlay = Overlay::new(a.clone());
    let first = number(&overlay, "count");
    let e1 = batched(&overlay, handled("e1", &[], &[], vec![]));
    let reads = |n: u64| ReadSet {
        keys: [("count".to_owned(), ReadSet::digest(Some(n.to_string().as_bytes())))].into(),
        listings: vec![],
    };
    b.commit_batch(&[handled("b1", &[("count", "6")], &[], vec![])], &reads(5)).unwrap();
    let next = (number(&overlay, "count") + 1).to_string();
    let e2 = batched(&overlay, handled("e2", &[("count", &next)], &[], vec![]));
    b.commit_batch(&[handled("b2", &[("count", "5")], &[], vec![])], &reads(6)).unwrap();
    let committed = outcome(a.commit_batch(&[e1, e2], &overlay.reads()));
    let count = String::from_utf8(a.get("count").unwrap().unwrap()).unwrap();
    assert_eq!(first, 5);
    // Serially: b1, b2, then the batch (5 + 1); or the batch refused.
    assert_eq!(count, if committed { "6" } else { "5" }, "an update was lost");

    // A key absent, created and deleted again by `b` between two reads.
    let overlay = Overlay::new(a.clone());
    let e3 = batched(
        &overlay,
        handled(
            "e3",
            &[("seen-first", if overlay.get("flag").unwrap().is_some() { "yes" } else { "no" })],
            &[],
            vec![],
        ),
    );
    b.commit(handled("b3", &[("flag", "up")], &[], vec![])).unwrap();
    let again = if overlay.get("flag").unwrap().is_some() { "yes" } else { "no" };
    let e4 = batched(&overlay, handled("e4", &[("seen-again", again)], &[], vec![]));
    b.commit(Commit { writes: vec![("flag".into(), None)], handled: Some("b4".into()), ..Commit::default() }).unwrap();
    if outcome(a.commit_batch(&[e3, e4], &overlay.reads())) {
        assert_eq!(a.get("seen-first").unwrap(), a.get("seen-again").unwrap(), "the batch saw the flag both ways");
    }

    // A listing that grows and shrinks back between two listings.
    a.commit(handled("e5", &[("item/a", "1")], &[], vec![])).unwrap();
    let overlay = Overlay::new(a.clone());
    let first = overlay.keys("item/", 10).unwrap().len().to_string();
    let e6 = batched(&overlay, handled("e6", &[("listed-first", &first)], &[], vec![]));
    b.commit(handled("b5", &[("item/b", "1")], &[], vec![])).unwrap();
    let again = overlay.keys("item/", 10).unwrap().len().to_string();
    let e7 = batched(&overlay, handled("e7", &[("listed-again", &again)], &[], vec![]));
    b.commit(Commit { writes: vec![("item/b".into(), None)], handled: Some("b6".into()), ..Commit::default() })
        .unwrap();
    if outcome(a.commit_batch(&[e6, e7], &overlay.reads())) {
        assert_eq!(a.get("listed-first").unwrap(), a.get("listed-again").unwrap(), "the batch saw two listings");
    }
}

/// Keys and ids no adapter can hold (NUL, 10 KB, empty) are refused for
/// good, alike on every adapter, before anything of their batch is applied;
/// bytes that are not UTF-8 are fine where bytes are allowed (values).
pub(super) fn hostile_keys_and_ids_are_refused_alike(store: &dyn StateStore) {
    fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
        assert!(matches!(result, Err(StoreError::Refused(_))), "{what}: {result:?}");
    }
    let long = "k".repeat(10 * 1024);
    for bad in ["a\0b", long.as_str(), ""] {
        refused("get", store.get(bad));
        refused("write", store.commit(handled("e1", &[("fine", "1"), (bad, "v")], &["r"], vec![])));
        refused("handled id", store.commit(handled(bad, &[("fine", "1")], &[], vec![])));
        refused("timer id", store.commit(handled("e1", &[], &[], vec![TimerChange::Set(timer(bad, 5))])));
        refused("cancel", store.commit(handled("e1", &[], &[], vec![TimerChange::Cancel(bad.into())])));
        refused("was_handled", store.was_handled(bad));
        refused("handled_among", store.handled_among(&["e0", bad]));
        refused("timer", store.timer(bad));
        refused("outbox", store.outbox(bad));
    }
    refused("keys", store.keys("a\0", 10));
    refused("keys", store.keys(&long, 10));
    let mut keyed = timer("t", 5);
    keyed.key = "o\0-1".into();
    refused("timer key", store.commit(handled("e1", &[], &[], vec![TimerChange::Set(keyed)])));
    // A read in a batch: the whole batch is refused, nothing applied.
    let reads = ReadSet { keys: [("a\0".to_owned(), None)].into(), listings: vec![] };
    let bad_batch = [handled("e1", &[("fine", "1")], &[], vec![]), handled("e2\0", &[], &[], vec![])];
    refused("batch", store.commit_batch(&bad_batch, &reads));
    assert_eq!((store.keys("", 10).unwrap(), store.was_handled("e1").unwrap()), (Vec::<String>::new(), false));
    assert_eq!((store.timer_count().unwrap(), store.outbox_count().unwrap()), (0, 0), "nothing applied");

    // The bounds themselves, and any bytes as a value, are stored.
    let (key, id) = ("é".repeat(MAX_KEY_BYTES / 2), "i".repeat(MAX_ID_BYTES));
    let bytes = vec![0xff, 0x00, 0xfe, 0xc3];
    let commit = Commit {
        writes: vec![(key.clone(), Some(bytes.clone()))],
        timers: vec![TimerChange::Set(timer(&id, 5))],
        handled: Some(id.clone()),
        ..Commit::default()
    };
    store.commit(commit).unwrap();
    assert_eq!(store.get(&key).unwrap(), Some(bytes));
    assert!(store.was_handled(&id).unwrap());
    assert_eq!(store.timer(&id).unwrap().map(|t| t.at_ms), Some(5));
}

/// The same event twice in one batch is a conflict on every adapter
/// (nothing applied), and a listing includes keys with U+10FFFF (the
/// highest character) right after the prefix.
pub(super) fn edge_cases_answer_alike(store: &dyn StateStore) {
    let twice = [handled("e1", &[("a", "1")], &["r"], vec![]), handled("e1", &[("b", "2")], &["r"], vec![])];
    let err = store.commit_batch(&twice, &ReadSet::default()).unwrap_err();
    assert!(matches!(&err, StoreError::Conflict(m) if m.contains("twice")), "{err}");
    assert_eq!((store.was_handled("e1").unwrap(), store.keys("", 10).unwrap().len()), (false, 0));
    let keys = ["p", "p\u{10FFFF}", "p\u{10FFFF}x", "p\u{10FFFF}\u{10FFFF}", "pa", "q"];
    let writes: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "v")).collect();
    store.commit(handled("e2", &writes, &[], vec![])).unwrap();
    assert_eq!(store.keys("p", 10).unwrap(), ["p", "pa", "p\u{10FFFF}", "p\u{10FFFF}x", "p\u{10FFFF}\u{10FFFF}"]);
    assert_eq!(store.keys("p\u{10FFFF}", 10).unwrap(), ["p\u{10FFFF}", "p\u{10FFFF}x", "p\u{10FFFF}\u{10FFFF}"]);
    assert_eq!(store.keys("", 10).unwrap().len(), 6);
    // A listing read in a batch is checked the same way.
    let listed = ReadSet {
        keys: Default::default(),
        listings: vec![("p\u{10FFFF}".into(), 10, store.keys("p\u{10FFFF}", 10).unwrap())],
    };
    store.commit_batch(&[handled("e3", &[], &[], vec![])], &listed).unwrap();
}

/// Timer races between two hosts (`a` fires, `b` cancels or sets again):
/// the firing's commit applies only if the very instance that fired is
/// still set, so a cancelled timer's handling, or the removal of a re-set
/// for the same millisecond, or a "retry later" move, never lands.
pub(super) fn timer_races_across_two_handles(a: &Arc<dyn StateStore>, b: &Arc<dyn StateStore>) {
    let with_nonce = |nonce| TimerChange::Set(Timer { nonce, ..timer("t", 100) });
    let firing = |nonce: u64, id: &str| Commit {
        fired: Some(("t".into(), nonce)),
        handled: Some(id.into()),
        writes: vec![(format!("effect-{id}"), Some(b"1".to_vec()))],
        ..Commit::default()
    };
    let conflict = |result: Result<Durable, StoreError>| matches!(result, Err(StoreError::Conflict(_)));
    // Cancelled on b after a found it due.
    a.commit(handled("s1", &[], &[], vec![with_nonce(1)])).unwrap();
    assert_eq!(a.due_timers(100, 10).unwrap()[0].nonce, 1);
    b.commit(handled("c1", &[], &[], vec![TimerChange::Cancel("t".into())])).unwrap();
    assert!(conflict(a.commit(firing(1, "f1"))), "a cancelled timer's handling must not land");
    assert_eq!((a.get("effect-f1").unwrap(), a.was_handled("f1").unwrap()), (None, false));
    // Set again for the same millisecond on b: the old firing removes nothing.
    a.commit(handled("s2", &[], &[], vec![with_nonce(2)])).unwrap();
    b.commit(handled("s3", &[], &[], vec![with_nonce(3)])).unwrap();
    assert!(conflict(a.commit(firing(2, "f2"))));
    assert_eq!(a.timer("t").unwrap().map(|t| t.nonce), Some(3), "the re-set stays");
    // A move to later (a dead-lettered timer's retry) after a cancel on b.
    b.commit(handled("c2", &[], &[], vec![TimerChange::Cancel("t".into())])).unwrap();
    let moved = Commit { fired: Some(("t".into(), 3)), timers: vec![with_nonce(4)], ..Commit::default() };
    assert!(conflict(a.commit(moved)));
    assert_eq!(a.timer("t").unwrap(), None, "a cancelled timer is not brought back");
    // The instance still set: its handling lands and removes it.
    b.commit(handled("s4", &[], &[], vec![with_nonce(5)])).unwrap();
    a.commit(firing(5, "f3")).unwrap();
    assert_eq!((b.timer("t").unwrap(), b.get("effect-f3").unwrap()), (None, Some(b"1".to_vec())));
}

/// Handled ids older than asked are forgotten, a small batch at a time;
/// younger ones stay.
pub(super) fn handled_ids_are_pruned_in_small_batches(store: &dyn StateStore) {
    for (id, at) in [("old-1", 1_000), ("new", 5_000), ("old-2", 2_000), ("old-3", 2_999)] {
        store.commit(Commit { handled: Some(id.into()), now_ms: at, ..Commit::default() }).unwrap();
    }
    let mut batches = Vec::new();
    loop {
        let pruned = store.prune_handled(3_000, 2).unwrap();
        assert!(pruned <= 2, "a batch is at most its limit");
        if pruned == 0 && !batches.is_empty() {
            break;
        }
        batches.push(pruned);
        assert!(batches.len() < 10, "{batches:?}");
    }
    assert_eq!(batches.iter().sum::<usize>(), 3, "{batches:?}");
    let handled = store.handled_among(&["old-1", "old-2", "old-3", "new"]).unwrap();
    assert_eq!(handled, ["new".to_owned()].into());
}
