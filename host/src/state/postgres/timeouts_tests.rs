//! The PostgreSQL adapter against a real server: what a host frozen
//! mid-commit costs the others, and which database errors are for good.

use std::time::{Duration, Instant};

use super::{PgStores, PgTimeouts};
use crate::state::contract::{TestSchema, database_url};
use crate::state::{Commit, StateStore, StoreError};

fn write(id: &str, key: &str) -> Commit {
    Commit { writes: vec![(key.to_owned(), Some(b"v".to_vec()))], handled: Some(id.to_owned()), ..Commit::default() }
}

/// Every session runs with the configured timeouts.
#[test]
fn sessions_carry_the_timeouts() {
    let schema = TestSchema::new();
    let timeouts = PgTimeouts {
        lock: Duration::from_millis(1_234),
        statement: Duration::from_millis(4_321),
        idle_in_transaction: Duration::from_millis(2_468),
        commit: Duration::from_secs(9),
    };
    let stores = PgStores::connect_with(&database_url(), &schema.name, timeouts).unwrap();
    let store = stores.store("c");
    let settings: Vec<String> = ["lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout"]
        .iter()
        .map(|name| store.setting(name))
        .collect();
    assert_eq!(settings, ["1234ms", "4321ms", "2468ms"]);
    let defaults = TestSchema::new();
    assert_eq!(defaults.stores.store("c").setting("lock_timeout"), "2s", "the default");
}

/// Host A frozen mid-commit (its session holds a key's lock in an open
/// transaction and sends nothing): host B's commit of that key gives up
/// after `lock_timeout` instead of queueing, and goes through once the
/// server ended A's session after `idle_in_transaction_session_timeout`.
#[test]
fn a_host_frozen_mid_commit_holds_the_others_up_no_longer_than_the_timeouts() {
    let schema = TestSchema::new();
    let timeouts = PgTimeouts {
        lock: Duration::from_millis(300),
        statement: Duration::from_secs(5),
        idle_in_transaction: Duration::from_millis(1_500),
        commit: Duration::from_secs(10),
    };
    let host_a = PgStores::connect_with(&database_url(), &schema.name, timeouts).unwrap();
    let host_b = PgStores::connect_with(&database_url(), &schema.name, timeouts).unwrap();
    // Components of their own: advisory locks are the whole database's.
    let (a, b) = (host_a.store("frozen"), host_b.store("frozen"));
    let frozen_at = Instant::now();
    let frozen = a.freeze_holding("k");
    let started = Instant::now();
    let err = b.commit(write("e1", "k")).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("55P03")), "{err}");
    assert!(waited < Duration::from_millis(1_200), "waited {waited:?} for a lock_timeout of 300 ms");
    assert!(!b.was_handled("e1").unwrap(), "nothing applied");
    // Retried, as the executor does, until the server ends A's session.
    let mut tries = 1;
    while let Err(err) = b.commit(write("e1", "k")) {
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(frozen_at.elapsed() < Duration::from_secs(6), "still held after {:?}", frozen_at.elapsed());
        tries += 1;
    }
    let held = frozen_at.elapsed();
    assert!(held >= Duration::from_millis(1_400), "A's lock ended early: {held:?}");
    assert!(b.was_handled("e1").unwrap());
    assert!(tries > 1);
    eprintln!("B went through {held:?} after A froze, after {tries} tries");
    drop(frozen);
}

/// A commit that cannot finish within its deadline is given up (its
/// connection closed, releasing what it held), however long the server
/// would let it wait.
#[test]
fn a_commit_has_a_deadline() {
    let schema = TestSchema::new();
    let patient = PgTimeouts {
        lock: Duration::from_secs(30),
        statement: Duration::from_secs(30),
        idle_in_transaction: Duration::from_secs(30),
        commit: Duration::from_millis(400),
    };
    let host_a = PgStores::connect_with(&database_url(), &schema.name, patient).unwrap();
    let host_b = PgStores::connect_with(&database_url(), &schema.name, patient).unwrap();
    let frozen = host_a.store("deadline").freeze_holding("k");
    let b = host_b.store("deadline");
    let started = Instant::now();
    let err = b.commit(write("e1", "k")).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("deadline")), "{err}");
    assert!(waited < Duration::from_millis(1_500), "waited {waited:?} for a deadline of 400 ms");
    // The frozen host's connection closes (it died): its locks go with it.
    drop(deadpool_postgres::Object::take(frozen));
    let started = Instant::now();
    while b.commit(write("e1", "k")).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "B never recovered");
    }
}

/// Errors no retry passes are refused for good, not "unavailable".
#[test]
fn database_errors_that_never_pass_are_permanent() {
    let schema = TestSchema::new();
    let store = schema.stores.store("c");
    let nul = store.run_with("SELECT $1::text", "a\0b".to_owned()).unwrap_err();
    assert!(matches!(&nul, StoreError::Refused(m) if m.contains("22021")), "{nul}");
    let limit = store.run_with("SELECT array_fill(0, ARRAY[length($1) * 100000000])", "xx".to_owned()).unwrap_err();
    assert!(matches!(&limit, StoreError::Refused(m) if m.contains("54000")), "{limit}");
    let not_a_number = store.run_with("SELECT ($1::text)::int", "x".to_owned()).unwrap_err();
    assert!(matches!(&not_a_number, StoreError::Refused(m) if m.contains("22P02")), "{not_a_number}");
    // A statement cancelled for taking too long may pass next time.
    let quick = PgTimeouts { statement: Duration::from_millis(200), ..PgTimeouts::default() };
    let stores = PgStores::connect_with(&database_url(), &schema.name, quick).unwrap();
    let slow = stores.store("c").run_with("SELECT pg_sleep(length($1))", "x".to_owned()).unwrap_err();
    assert!(matches!(&slow, StoreError::Unavailable(m) if m.contains("57014")), "{slow}");
}

// The integration tests' proxy, one source for both.
#[path = "../../../tests/support/proxy.rs"]
mod proxy;

/// A host cut off from the database (connections open, nothing answering)
/// says so within its timeouts, for reads and commits alike, instead of
/// hanging until TCP keepalive notices; once healed it commits again.
#[test]
fn a_host_cut_off_from_the_database_gives_up_within_its_timeouts() {
    let schema = TestSchema::new();
    let (proxy, proxied) = proxy::Proxy::for_postgres(&database_url());
    let timeouts = PgTimeouts {
        lock: Duration::from_millis(300),
        statement: Duration::from_millis(500),
        idle_in_transaction: Duration::from_secs(1),
        commit: Duration::from_secs(1),
    };
    let host = PgStores::connect_with(&proxied, &schema.name, timeouts).unwrap();
    let store = host.store("cut");
    store.commit(write("e1", "k")).unwrap();
    proxy.freeze(true);
    for (what, started, result) in [
        ("read", Instant::now(), store.get("k").map(|_| ())),
        ("commit", Instant::now(), store.commit(write("e2", "k2")).map(|_| ())),
    ] {
        let waited = started.elapsed();
        assert!(matches!(&result, Err(StoreError::Unavailable(_))), "{what}: {result:?}");
        assert!(waited < Duration::from_secs(4), "{what} waited {waited:?}");
    }
    proxy.freeze(false);
    let healed = Instant::now();
    while store.commit(write("e2", "k2")).is_err() {
        assert!(healed.elapsed() < Duration::from_secs(15), "never healed");
    }
    assert_eq!(store.get("k2").unwrap(), Some(b"v".to_vec()));
}
