use std::sync::Arc;

use super::*;

fn timer(id: &str, at_ms: u64) -> Timer {
    Timer {
        id: id.into(),
        at_ms,
        event_type: "Due".into(),
        key: "o1".into(),
        payload: "{}".into(),
        set_by: "e0".into(),
        correlation_id: None,
    }
}

fn record(value: &str) -> OutboxRecord {
    OutboxRecord { topic: "t".into(), key: "k".into(), value: value.into(), headers: vec![("h".into(), "v".into())] }
}

fn handled(id: &str, writes: &[(&str, &str)], outbox: &[&str], timers: Vec<TimerChange>) -> Commit {
    Commit {
        writes: writes.iter().map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec()))).collect(),
        timers,
        handled: Some(id.into()),
        fired: None,
        outbox: outbox.iter().map(|v| record(v)).collect(),
        now_ms: 7,
    }
}

fn state_handled_and_outbox_commit_together(store: &dyn StateStore) {
    assert!(!store.was_handled("e1").unwrap());
    store.commit(handled("e1", &[("a", "1"), ("b", "2")], &["r1", "r2"], vec![])).unwrap();
    store.commit(handled("e2", &[("a", "3")], &[], vec![])).unwrap();
    store.commit(handled("e3", &[], &["r3"], vec![])).unwrap();
    assert!(store.was_handled("e1").unwrap() && store.was_handled("e2").unwrap());
    assert_eq!(store.get("a").unwrap(), Some(b"3".to_vec()));
    assert_eq!(store.keys("", 10).unwrap(), ["a", "b"]);
    let entry = store.outbox("e1").unwrap().unwrap();
    assert_eq!((entry.source.as_str(), entry.created_ms, entry.records.len()), ("e1", 7, 2));
    assert_eq!(entry.records[1], record("r2"));
    assert_eq!(store.outbox("e2").unwrap(), None, "nothing emitted, nothing queued");
    let pending: Vec<String> = store.pending_outbox(10).unwrap().into_iter().map(|e| e.source).collect();
    assert_eq!(pending, ["e1", "e3"], "commit order");
    store.clear_outbox("e1").unwrap();
    store.clear_outbox("unknown").unwrap();
    assert_eq!(store.outbox("e1").unwrap(), None);
    assert_eq!(store.outbox_count().unwrap(), 1);
    store.commit(Commit { writes: vec![("b".into(), None)], ..Commit::default() }).unwrap();
    assert_eq!(store.keys("", 10).unwrap(), ["a"]);
}

fn timers_fire_in_order_and_are_replaced_cancelled_and_removed(store: &dyn StateStore) {
    let set = |t| TimerChange::Set(t);
    store.commit(handled("e1", &[], &[], vec![set(timer("late", 300)), set(timer("early", 100))])).unwrap();
    store.commit(handled("e2", &[], &[], vec![set(timer("gone", 50)), TimerChange::Cancel("gone".into())])).unwrap();
    store.commit(handled("e3", &[], &[], vec![set(timer("moved", 10)), set(timer("moved", 200))])).unwrap();
    let ids = |now| -> Vec<String> { store.due_timers(now, 10).unwrap().into_iter().map(|t| t.id).collect() };
    assert_eq!(ids(99), Vec::<String>::new());
    assert_eq!(ids(250), ["early", "moved"]);
    assert_eq!(store.timer_count().unwrap(), 3);
    // A fired timer goes away with the commit of its handling...
    store
        .commit(Commit { fired: Some(("early".into(), 100)), handled: Some("t1".into()), ..Commit::default() })
        .unwrap();
    // ...unless that commit set it again, or it was moved meanwhile.
    store
        .commit(Commit { fired: Some(("moved".into(), 10)), handled: Some("t2".into()), ..Commit::default() })
        .unwrap();
    store
        .commit(Commit {
            fired: Some(("late".into(), 300)),
            timers: vec![set(timer("late", 400))],
            handled: Some("t3".into()),
            ..Commit::default()
        })
        .unwrap();
    assert_eq!(ids(1000), ["moved", "late"]);
    assert_eq!(store.due_timers(1000, 10).unwrap()[1], timer("late", 400));
    assert_eq!(store.due_timers(1000, 1).unwrap().len(), 1, "limit");
}

#[test]
fn memory_store() {
    state_handled_and_outbox_commit_together(&MemoryStore::default());
    timers_fire_in_order_and_are_replaced_cancelled_and_removed(&MemoryStore::default());
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("store-{}", uuid::Uuid::new_v4().simple())).join(name)
}

#[test]
fn durable_store() {
    let path = temp_file("a.redb");
    state_handled_and_outbox_commit_together(&DurableStore::open(&path).unwrap());
    timers_fire_in_order_and_are_replaced_cancelled_and_removed(&DurableStore::open(&temp_file("b.redb")).unwrap());
    // Everything survives a reopen.
    let store = DurableStore::open(&path).unwrap();
    assert_eq!(store.get("a").unwrap(), Some(b"3".to_vec()));
    assert!(store.was_handled("e3").unwrap());
    assert_eq!(store.pending_outbox(10).unwrap().len(), 1);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn a_store_in_use_or_not_a_database_is_refused_clearly() {
    let path = temp_file("c.redb");
    let _open = DurableStore::open(&path).unwrap();
    let err = DurableStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("already open") && err.contains("c.redb"), "{err}");
    let garbage = path.with_file_name("garbage.redb");
    std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
    let err = DurableStore::open(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.redb"), "{err}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn timers_are_validated() {
    let mut txn = Txn::new(Arc::new(StoreReader(Arc::new(MemoryStore::default()))));
    assert!(txn.timer(TimerChange::Set(timer("t", 1))).is_ok());
    let mut bad = timer("t", 1);
    bad.payload = "not json".into();
    assert!(matches!(txn.timer(TimerChange::Set(bad)), Err(AccessError::Invalid(m)) if m.contains("JSON")));
    assert!(matches!(txn.timer(TimerChange::Cancel(String::new())), Err(AccessError::Invalid(_))));
    let mut ro = Txn::read_only(Arc::new(StoreReader(Arc::new(MemoryStore::default()))));
    assert!(matches!(ro.timer(TimerChange::Cancel("t".into())), Err(AccessError::Invalid(m)) if m.contains("query")));
    let (_, timers) = txn.take_changes();
    assert_eq!(timers.len(), 1);
}
