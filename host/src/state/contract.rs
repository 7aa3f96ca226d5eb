use std::sync::Arc;

use super::*;
use races::*;

mod races;

fn timer(id: &str, at_ms: u64) -> Timer {
    Timer {
        id: id.into(),
        at_ms,
        event_type: "Due".into(),
        key: "o1".into(),
        payload: "{}".into(),
        set_by: "e0".into(),
        correlation_id: None,
        traceparent: None,
        nonce: at_ms,
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
    let among = store.handled_among(&["e1", "unknown", "e3"]).unwrap();
    assert_eq!(among, ["e1".to_owned(), "e3".to_owned()].into(), "one look for a batch");
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
    // A firing of an instance set again since (here: moved) is refused
    // whole: the delivery is void.
    let stale = Commit {
        fired: Some(("moved".into(), 10)),
        handled: Some("t2".into()),
        writes: vec![("w".into(), Some(b"1".to_vec()))],
        ..Commit::default()
    };
    assert!(matches!(store.commit(stale), Err(StoreError::Conflict(m)) if m.contains("moved")));
    assert_eq!((store.was_handled("t2").unwrap(), store.get("w").unwrap()), (false, None));
    // A fired timer the commit sets again stays, as set.
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

/// What a batch saw when it read `pairs` (`None`: absent) and listed `listings`.
fn seen(pairs: &[(&str, Option<&str>)], listings: &[(&str, usize, &[&str])]) -> ReadSet {
    ReadSet {
        keys: pairs.iter().map(|(k, v)| ((*k).to_owned(), ReadSet::digest(v.map(str::as_bytes)))).collect(),
        listings: listings
            .iter()
            .map(|(p, n, keys)| ((*p).to_owned(), *n, keys.iter().map(|k| (*k).to_owned()).collect()))
            .collect(),
    }
}

fn conflicting_commits_are_refused_whole(store: &dyn StateStore) {
    store.commit(handled("e1", &[("lamp", "1")], &[], vec![])).unwrap();
    // Read lamp=1, but another commit sold it meanwhile.
    store.commit(handled("e2", &[("lamp", "0")], &["sold"], vec![])).unwrap();
    let late = handled("e3", &[("lamp", "0"), ("other", "x")], &["sold again"], vec![TimerChange::Set(timer("t", 5))]);
    let err = store.commit_batch(std::slice::from_ref(&late), &seen(&[("lamp", Some("1"))], &[])).unwrap_err();
    assert!(matches!(&err, StoreError::Conflict(m) if m.contains("lamp")), "{err}");
    assert!(!store.was_handled("e3").unwrap(), "nothing of a conflicting commit is applied");
    assert_eq!((store.get("other").unwrap(), store.outbox("e3").unwrap()), (None, None));
    assert_eq!(store.timer_count().unwrap(), 0);
    // On fresh state it goes through.
    store.commit_batch(std::slice::from_ref(&late), &seen(&[("lamp", Some("0"))], &[])).unwrap();
    assert!(store.was_handled("e3").unwrap());
    // A key read as absent and created meanwhile, a listing that grew.
    store.commit(handled("e4", &[("new", "1")], &[], vec![])).unwrap();
    let c = handled("e5", &[("x", "1")], &[], vec![]);
    assert!(matches!(
        store.commit_batch(std::slice::from_ref(&c), &seen(&[("new", None)], &[])),
        Err(StoreError::Conflict(_))
    ));
    let listed: &[(&str, usize, &[&str])] = &[("ne", 10, &[])];
    assert!(matches!(store.commit_batch(std::slice::from_ref(&c), &seen(&[], listed)), Err(StoreError::Conflict(_))));
    let listed: &[(&str, usize, &[&str])] = &[("ne", 10, &["new"])];
    store.commit_batch(std::slice::from_ref(&c), &seen(&[("new", Some("1"))], listed)).unwrap();
    // An event handled meanwhile (by another host): the whole batch is refused.
    let batch = [handled("e6", &[("y", "1")], &[], vec![]), handled("e1", &[("lamp", "9")], &["twice"], vec![])];
    assert!(matches!(store.commit_batch(&batch, &ReadSet::default()), Err(StoreError::Conflict(_))));
    assert_eq!((store.get("y").unwrap(), store.was_handled("e6").unwrap()), (None, false));
    assert_eq!(store.get("lamp").unwrap(), Some(b"0".to_vec()));
}

/// Threads incrementing one counter through optimistic commits, each
/// retried on conflict, as executors on several hosts do: none is lost.
fn concurrent_increments_are_never_lost(store: Arc<dyn StateStore>) {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let conflicts = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (store, conflicts) = (store.clone(), &conflicts);
            scope.spawn(move || {
                for i in 0..EACH {
                    loop {
                        let now = store.get("count").unwrap();
                        let n: u64 = now.as_deref().map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                        let next = (n + 1).to_string();
                        let commit = handled(&format!("inc-{thread}-{i}"), &[("count", &next)], &[], vec![]);
                        let reads = ReadSet {
                            keys: [("count".to_owned(), ReadSet::digest(now.as_deref()))].into(),
                            listings: Vec::new(),
                        };
                        match store.commit_batch(std::slice::from_ref(&commit), &reads) {
                            Ok(_) => break,
                            Err(StoreError::Conflict(_)) => {
                                conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(err) => panic!("{err}"),
                        }
                    }
                }
            });
        }
    });
    let total = (THREADS * EACH).to_string();
    assert_eq!(store.get("count").unwrap(), Some(total.into_bytes()), "every increment counted once");
    eprintln!("{} conflicts retried", conflicts.into_inner());
}

/// A write past an adapter's encoding: how a test plants the undecodable
/// body of a timer due at `at_ms` or of the outbox entry of event `id`
/// (committed at `at_ms`), as disk rot or a bad migration would leave it.
trait Plant {
    fn plant(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]);
}

impl Plant for MemoryStore {
    fn plant(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        self.write_raw(kind, id, at_ms, raw);
    }
}

impl Plant for DurableStore {
    fn plant(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        self.write_raw(kind, id, at_ms, raw);
    }
}

impl Plant for PostgresStore {
    fn plant(&self, kind: EntryKind, id: &str, at_ms: u64, raw: &[u8]) {
        self.write_raw(kind, id, at_ms, raw);
    }
}

/// Undecodable timers and outbox entries are skipped by every read (claims,
/// listings, one by id) and moved once to the quarantine with their bytes
/// and reason; the good ones go on, and commits never trip over them.
fn corrupt_entries_are_quarantined_and_skipped(store: &(impl StateStore + Plant)) {
    use EntryKind::{Outbox, Timer as T};
    let lease = std::time::Duration::from_secs(60);
    let set = |t| TimerChange::Set(t);
    store.commit(handled("e1", &[], &["r1"], vec![set(timer("t1", 10)), set(timer("t3", 30))])).unwrap();
    let (bad_timer, bad_records): (&[u8], &[u8]) = (b"{\"id\": \"bad\", \"at_ms\": ", b"[{\"topic\": 5}]");
    store.plant(T, "bad", 20, bad_timer);
    store.plant(Outbox, "e2", 7, bad_records);
    store.commit(handled("e3", &[], &["r3"], vec![])).unwrap();
    assert_eq!(store.corrupt_entries().unwrap(), CorruptEntries::default());

    let timers: Vec<String> = store.claim_due_timers(100, 10, lease).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(timers, ["t1", "t3"], "the good timers still fire");
    let sources: Vec<String> =
        store.claim_stale_outbox(100, 10, lease).unwrap().into_iter().map(|e| e.source).collect();
    assert_eq!(sources, ["e1", "e3"], "the good entries are still relayed");
    let quarantined = store.quarantined(10).unwrap();
    let found: Vec<(EntryKind, &str, &[u8])> =
        quarantined.iter().map(|q| (q.kind, q.id.as_str(), q.raw.as_slice())).collect();
    assert_eq!(found, [(Outbox, "e2", bad_records), (T, "bad", bad_timer)], "kept as found, latest first");
    assert!(quarantined.iter().all(|q| q.reason.contains("cannot be decoded") && q.at_ms > 0), "{quarantined:?}");
    let reported = store.corrupt_entries().unwrap();
    assert_eq!(reported.count, 2);
    assert!(reported.last_reason.as_deref().is_some_and(|r| r.starts_with("outbox \"e2\": cannot be decoded")));

    // Out of the way: not met again, not reported again.
    assert_eq!((store.timer_count().unwrap(), store.outbox_count().unwrap()), (2, 2));
    let due: Vec<String> = store.due_timers(100, 10).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(due, ["t1", "t3"]);
    let pending: Vec<String> = store.pending_outbox(10).unwrap().into_iter().map(|e| e.source).collect();
    assert_eq!(pending, ["e1", "e3"]);
    assert_eq!(store.corrupt_entries().unwrap(), reported, "nothing new");

    // A read by id meets one the same way.
    store.plant(T, "bad2", 40, b"nope");
    store.plant(Outbox, "e4", 8, b"nope");
    assert_eq!((store.timer("bad2").unwrap(), store.outbox("e4").unwrap()), (None, None));
    assert_eq!(store.corrupt_entries().unwrap().count, 4);
    assert_eq!(store.quarantined(1).unwrap()[0].id, "e4");

    // A commit replaces or cancels a corrupt timer without decoding it.
    store.plant(T, "bad3", 50, b"nope");
    store.plant(T, "bad4", 60, b"nope");
    store.commit(handled("e5", &[], &[], vec![set(timer("bad3", 70)), TimerChange::Cancel("bad4".into())])).unwrap();
    let due: Vec<String> = store.due_timers(100, 10).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(due, ["t1", "t3", "bad3"]);
    assert_eq!(store.corrupt_entries().unwrap().count, 4, "replaced, not quarantined");
}

/// The whole contract, on fresh stores from `open`.
fn contract(mut open: impl FnMut() -> Arc<dyn StateStore>) {
    state_handled_and_outbox_commit_together(&*open());
    timers_fire_in_order_and_are_replaced_cancelled_and_removed(&*open());
    conflicting_commits_are_refused_whole(&*open());
    concurrent_increments_are_never_lost(open());
    let store = open();
    a_batch_rereading_what_changed_and_changed_back_loses_nothing(&store, &store);
    hostile_keys_and_ids_are_refused_alike(&*open());
    edge_cases_answer_alike(&*open());
    let store = open();
    timer_races_across_two_handles(&store, &store);
    handled_ids_are_pruned_in_small_batches(&*open());
}

#[test]
fn memory_store() {
    contract(|| Arc::new(MemoryStore::default()));
    corrupt_entries_are_quarantined_and_skipped(&MemoryStore::default());
}

/// The database of the PostgreSQL tests, or a panic saying how to start one.
pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()).expect(
        "PostgreSQL tests need a server: run `just postgres` and set DATABASE_URL=$(scripts/postgres.sh url) (`just test` does both)",
    )
}

/// A fresh schema of its own, dropped at the end.
pub(crate) struct TestSchema {
    pub stores: PgStores,
    pub name: String,
}

impl TestSchema {
    pub(crate) fn new() -> Self {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let stores = PgStores::connect(&database_url(), &name).unwrap();
        Self { stores, name }
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (database_url(), self.name.clone());
        // Best effort, off any async runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client.batch_execute(&format!("DROP SCHEMA {name} CASCADE")).await.ok()
            })
        })
        .join();
    }
}

#[test]
fn postgres_store() {
    let schema = TestSchema::new();
    let mut n = 0;
    contract(|| {
        // Each check gets a component of its own in the one schema.
        n += 1;
        Arc::new(schema.stores.store(&format!("c{n}")))
    });
    corrupt_entries_are_quarantined_and_skipped(&schema.stores.store("corrupt"));
    // Two hosts' stores of one component share everything.
    let a = schema.stores.store("shared");
    let other =
        TestSchema { stores: PgStores::connect(&database_url(), &schema.name).unwrap(), name: schema.name.clone() };
    let b = other.stores.store("shared");
    let (a2, b2): (Arc<dyn StateStore>, Arc<dyn StateStore>) =
        (Arc::new(schema.stores.store("aba")), Arc::new(other.stores.store("aba")));
    a_batch_rereading_what_changed_and_changed_back_loses_nothing(&a2, &b2);
    let (a3, b3): (Arc<dyn StateStore>, Arc<dyn StateStore>) =
        (Arc::new(schema.stores.store("timers")), Arc::new(other.stores.store("timers")));
    timer_races_across_two_handles(&a3, &b3);
    a.commit(handled("e1", &[("k", "v")], &["r"], vec![TimerChange::Set(timer("t", 5))])).unwrap();
    assert!(b.was_handled("e1").unwrap());
    assert_eq!(b.get("k").unwrap(), Some(b"v".to_vec()));
    std::mem::forget(other); // its schema is the first one's
}

#[test]
fn postgres_claims_lease_timers_and_stale_outbox_to_one_host() {
    let schema = TestSchema::new();
    let host_a = schema.stores.store("c");
    let host_b = schema.stores.store("c");
    host_a
        .commit(handled("e1", &[], &["r1"], vec![TimerChange::Set(timer("t1", 10)), TimerChange::Set(timer("t2", 20))]))
        .unwrap();
    let lease = std::time::Duration::from_secs(60);
    let a: Vec<String> = host_a.claim_due_timers(15, 10, lease).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(a, ["t1"]);
    let b: Vec<String> = host_b.claim_due_timers(100, 10, lease).unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(b, ["t2"], "a claimed timer is not handed to another host");
    assert!(host_a.claim_due_timers(100, 10, lease).unwrap().is_empty());
    assert_eq!(host_b.due_timers(100, 10).unwrap().len(), 2, "still pending until handled");
    // A lease that ran out (its host died) hands the timer to a live host.
    let short = std::time::Duration::from_millis(1);
    host_a.commit(handled("e2", &[], &[], vec![TimerChange::Set(timer("t3", 30))])).unwrap();
    assert_eq!(host_a.claim_due_timers(100, 10, short).unwrap().len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(host_b.claim_due_timers(100, 10, lease).unwrap()[0].id, "t3");
    // Setting a timer again releases its lease.
    host_a.commit(handled("e3", &[], &[], vec![TimerChange::Set(timer("t1", 40))])).unwrap();
    assert_eq!(host_b.claim_due_timers(100, 10, lease).unwrap()[0], timer("t1", 40));
    // The outbox: one relayer per entry.
    assert_eq!(host_a.claim_stale_outbox(7, 10, lease).unwrap()[0].source, "e1");
    assert!(host_b.claim_stale_outbox(7, 10, lease).unwrap().is_empty());
    assert!(host_b.claim_stale_outbox(6, 10, lease).unwrap().is_empty(), "younger than asked");
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("store-{}", uuid::Uuid::new_v4().simple())).join(name)
}

#[test]
fn durable_store() {
    contract(|| Arc::new(DurableStore::open(&temp_file("x.redb")).unwrap()));
    let corrupt = temp_file("q.redb");
    corrupt_entries_are_quarantined_and_skipped(&DurableStore::open(&corrupt).unwrap());
    let reopened = DurableStore::open(&corrupt).unwrap();
    assert_eq!(reopened.corrupt_entries().unwrap().count, 4, "the quarantine is durable");
    assert_eq!(reopened.timer_count().unwrap(), 3);
    drop(reopened);
    std::fs::remove_dir_all(corrupt.parent().unwrap()).unwrap();
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
