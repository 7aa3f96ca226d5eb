//! The host's file: components' commits sharing transactions, and the
//! take-over of the files of earlier versions.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::state::{OutboxRecord, TimerChange};

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("host-store-{}", uuid::Uuid::new_v4().simple()))
}

fn handled(id: &str, key: &str, value: &str) -> Commit {
    Commit {
        writes: vec![(key.to_owned(), Some(value.as_bytes().to_vec()))],
        handled: Some(id.to_owned()),
        outbox: vec![OutboxRecord { topic: "t".into(), key: key.into(), value: value.into(), headers: Vec::new() }],
        now_ms: 7,
        ..Commit::default()
    }
}

#[test]
fn components_committing_at_once_share_fsyncs_and_every_batch_is_durable() {
    let dir = temp_dir();
    let path = dir.join("host.redb");
    let host = HostStore::open(&path).unwrap();
    let names = ["payment", "order", "email", "analytics"];
    let stores: Vec<Arc<DurableStore>> = names.iter().map(|n| Arc::new(host.component(n).unwrap())).collect();
    let threads: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let store = store.clone();
            std::thread::spawn(move || {
                for n in 0..100 {
                    let commit = handled(&format!("e{i}-{n}"), &format!("k{n}"), &format!("{i}:{n}"));
                    store.commit_batch(&[commit], &ReadSet::default()).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let (commits, batches) = host.group_commits();
    assert_eq!(batches, 400, "every batch was committed once");
    assert!(commits < batches, "batches arriving during a commit share the next one ({commits} commits)");
    drop(stores);
    drop(host);
    // Each component sees its own tables only, all of them durable.
    let host = HostStore::open(&path).unwrap();
    for (i, name) in names.iter().enumerate() {
        let store = host.component(name).unwrap();
        assert_eq!(store.get("k99").unwrap(), Some(format!("{i}:99").into_bytes()));
        assert!(store.was_handled(&format!("e{i}-0")).unwrap());
        assert!(!store.was_handled(&format!("e{}-0", (i + 1) % 4)).unwrap(), "another component's id");
        assert_eq!(store.pending_outbox(1_000).unwrap().len(), 100);
    }
    drop(host);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_conflicting_batch_is_refused_without_touching_the_others() {
    let dir = temp_dir();
    let host = HostStore::open(&dir.join("host.redb")).unwrap();
    let (a, b) = (host.component("a").unwrap(), host.component("b").unwrap());
    a.commit_batch(&[handled("e1", "k", "1")], &ReadSet::default()).unwrap();
    let again = a.commit_batch(&[handled("e1", "k", "2")], &ReadSet::default()).unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "{again}");
    b.commit_batch(&[handled("e1", "k", "3")], &ReadSet::default()).unwrap();
    assert_eq!(a.get("k").unwrap(), Some(b"1".to_vec()));
    assert_eq!(b.get("k").unwrap(), Some(b"3".to_vec()));
    drop((a, b, host));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A file as an earlier version wrote it: one component, unprefixed tables.
fn legacy_file(path: &std::path::Path) {
    let db = Database::create(path).unwrap();
    let t = Tables::of("");
    let write = db.begin_write().unwrap();
    t.create(&write).unwrap();
    let mut commit = handled("e1", "balance", "42");
    let timer = Timer {
        id: "t1".into(),
        at_ms: 99,
        event_type: "Due".into(),
        key: "o1".into(),
        payload: "{}".into(),
        set_by: "e1".into(),
        correlation_id: None,
        traceparent: None,
        nonce: 0,
    };
    commit.timers = vec![TimerChange::Set(timer)];
    tables::apply(&t, &write, std::slice::from_ref(&commit), &[]).unwrap();
    write.commit().unwrap();
}

#[test]
fn the_file_of_an_earlier_version_is_taken_over_once() {
    let dir = temp_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let legacy = dir.join("payment.redb");
    legacy_file(&legacy);
    let host = HostStore::open(&dir.join("host.redb")).unwrap();
    assert!(host.adopt("payment", &legacy).unwrap());
    let store = host.component("payment").unwrap();
    assert_eq!(store.get("balance").unwrap(), Some(b"42".to_vec()));
    assert!(store.was_handled("e1").unwrap());
    assert_eq!(store.timer("t1").unwrap().map(|t| t.at_ms), Some(99));
    assert_eq!(store.pending_outbox(10).unwrap().len(), 1);
    assert!(!legacy.exists() && dir.join("payment.redb.migrated").exists(), "kept aside, renamed");
    assert!(!host.adopt("payment", &legacy).unwrap(), "nothing left to take over");
    // A crash after the copy, before the rename: the copy is not made again
    // (it would undo what the host did since).
    store.commit_batch(&[handled("e2", "balance", "43")], &ReadSet::default()).unwrap();
    std::fs::rename(dir.join("payment.redb.migrated"), &legacy).unwrap();
    assert!(host.adopt("payment", &legacy).unwrap());
    assert_eq!(store.get("balance").unwrap(), Some(b"43".to_vec()));
    assert!(!legacy.exists());
    drop((store, host));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A file written before handled ids were indexed by time: its ids still
/// make redeliveries duplicates, and are forgotten past the horizon beside
/// the indexed ones.
#[test]
fn handled_ids_from_before_the_index_are_kept_and_pruned_like_the_others() {
    let dir = temp_dir();
    let path = dir.join("host.redb");
    std::fs::create_dir_all(&dir).unwrap();
    {
        let db = Database::create(&path).unwrap();
        let write = db.begin_write().unwrap();
        let mut handled = write.open_table(Tables::of("c").handled()).unwrap();
        for (id, at) in [("old-1", 1_000), ("young-1", 5_000), ("old-2", 2_500)] {
            handled.insert(id, at).unwrap();
        }
        drop(handled);
        write.commit().unwrap();
    }
    let host = HostStore::open(&path).unwrap();
    let store = host.component("c").unwrap();
    let again = store.commit(handled("young-1", "k", "v")).unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "a redelivery is a duplicate: {again}");
    for (id, at) in [("new-old", 2_000), ("new-young", 6_000)] {
        store.commit(Commit { handled: Some(id.into()), now_ms: at, ..Commit::default() }).unwrap();
    }
    let mut pruned = Vec::new();
    loop {
        let n = store.prune_handled(3_000, 2).unwrap();
        assert!(n <= 2, "a batch is at most its limit");
        pruned.push(n);
        if n == 0 {
            break;
        }
        assert!(pruned.len() < 10, "{pruned:?}");
    }
    assert_eq!(pruned.iter().sum::<usize>(), 3, "old-1, old-2 and new-old: {pruned:?}");
    let ids = ["old-1", "old-2", "new-old", "young-1", "new-young"];
    let left = store.handled_among(&ids).unwrap();
    assert_eq!(left, ["young-1".to_owned(), "new-young".to_owned()].into());
    drop((store, host));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Pruning takes the oldest ids from the index, however their ids sort.
#[test]
fn pruning_finds_old_ids_by_time_not_by_id() {
    let dir = temp_dir();
    let host = HostStore::open(&dir.join("host.redb")).unwrap();
    let store = host.component("c").unwrap();
    // Ids in key order are young first: a walk by id would meet the
    // young ones before the old.
    for n in 0..100u64 {
        let (id, at) = if n < 90 { (format!("a{n:03}"), 10_000 + n) } else { (format!("z{n:03}"), n) };
        store.commit(Commit { handled: Some(id), now_ms: at, ..Commit::default() }).unwrap();
    }
    assert_eq!(store.prune_handled(1_000, 5).unwrap(), 5, "a batch finds as many old ones as it may take");
    assert_eq!(store.prune_handled(1_000, 5).unwrap(), 5);
    assert_eq!(store.prune_handled(1_000, 5).unwrap(), 0);
    assert!(store.was_handled("a000").unwrap() && !store.was_handled("z090").unwrap());
    drop((store, host));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_batch_of_several_events_keeps_each_outbox_entry_and_forgets_the_published_ones() {
    let dir = temp_dir();
    let host = HostStore::open(&dir.join("host.redb")).unwrap();
    let store = host.component("c").unwrap();
    let sources = |store: &DurableStore| {
        store.pending_outbox(10).unwrap().into_iter().map(|entry| entry.source).collect::<Vec<_>>()
    };
    // One batch, each table opened once: every event gets an entry of its own.
    let batch: Vec<Commit> = (0..3).map(|n| handled(&format!("e{n}"), &format!("k{n}"), "v")).collect();
    store.commit_batch(&batch, &ReadSet::default()).unwrap();
    assert_eq!(sources(&store), ["e0", "e1", "e2"]);
    // A published entry goes with the next batch.
    store.clear_outbox("e1").unwrap();
    store.commit_batch(&[handled("e3", "k3", "v")], &ReadSet::default()).unwrap();
    assert_eq!(sources(&store), ["e0", "e2", "e3"]);
    assert!((0..4).all(|n| store.was_handled(&format!("e{n}")).unwrap()));
    let (commits, batches) = host.group_commits();
    assert_eq!((commits, batches), (2, 2));
    assert!(host.group.committing_for() > std::time::Duration::ZERO, "the time commits took is kept");
    drop(store);
    drop(host);
    std::fs::remove_dir_all(&dir).unwrap();
}
