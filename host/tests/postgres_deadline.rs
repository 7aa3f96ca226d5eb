//! A guest's read of its state on a real PostgreSQL ends at the call's
//! deadline: with the state table locked by another session, a query that
//! reads a key ends at its deadline instead of holding its thread, and its
//! permit, until the lock goes.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_host::clock::ManualClock;
use shop_host::runtime::{CanaryPolicy, Engine, Limits, LoadedComponent, Request, ServiceRuntime, ServiceSpec};
use shop_host::state::{PgStores, StateStore};
use support::*;

fn get(path: &str) -> Request {
    Request { method: "GET".into(), path: path.into(), query: String::new(), body: Vec::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_locked_state_ends_at_the_calls_deadline() {
    let schema = fresh_schema();
    let url = database_url();
    let stores = {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::task::spawn_blocking(move || PgStores::connect(&url, &schema)).await.unwrap().unwrap()
    };
    let store: Arc<dyn StateStore> = Arc::new(stores.store("misbehave"));
    let engine = Engine::new().unwrap();
    let timeout = Duration::from_millis(400);
    let rt = ServiceRuntime::new(
        engine.clone(),
        ServiceSpec {
            name: "misbehave".into(),
            component: LoadedComponent::from_file(&engine, &component("misbehave")).unwrap(),
            store,
            config: HashMap::new(),
            clock: Arc::new(ManualClock::at(42)),
            // One query thread: were it held by the read, the second query
            // below could not run.
            // (Unthrottled: the first attempt's charge is not the point.)
            limits: Limits { timeout, max_queries: 1, cpu_percent: 100, ..Limits::default() },
            canary: CanaryPolicy::default(),
            grants: Default::default(),
        },
    );
    assert_eq!(rt.query(&get("/state/k")).await.unwrap().status, 404, "the table is readable");

    // Another session takes the table, as a long migration or a stuck
    // transaction would.
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.batch_execute(&format!("BEGIN; LOCK TABLE {schema}.state IN ACCESS EXCLUSIVE MODE")).await.unwrap();

    // Without the bound, the first query's caller gave up at its deadline
    // plus grace while its thread stayed in the read, and the second one
    // never got the thread.
    for attempt in 0..2 {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), rt.query(&get("/state/k"))).await;
        let elapsed = started.elapsed();
        let err = answer.unwrap_or_else(|_| panic!("attempt {attempt}: no answer in 5 s")).unwrap_err();
        assert!(err.to_string().contains("time budget"), "attempt {attempt}: {err}");
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_millis(300), "attempt {attempt}: {elapsed:?}");
    }

    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rt.query(&get("/state/k")).await.unwrap().status, 404, "readable again");
    drop(rt);
    drop_schema(&schema).await;
}
