//! The runtime against real components: the shop's and `misbehave`, which
//! traps, spins and hogs memory on demand.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use sha2::{Digest, Sha256};

use crate::clock::ManualClock;
use crate::state::{Commit, MemoryStore, OutboxEntry, StoreReader};

pub(crate) fn wasm(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/wasm32-wasip2/release/{name}.wasm"));
    assert!(path.is_file(), "{path:?} missing: run `just build-components build-test-components`");
    path
}

pub(crate) fn runtime(name: &str, timeout_ms: u64) -> ServiceRuntime {
    runtime_reusing(name, timeout_ms, 1)
}

/// [`runtime`] whose instances serve up to `instance_reuse` events.
pub(crate) fn runtime_reusing(name: &str, timeout_ms: u64, instance_reuse: u32) -> ServiceRuntime {
    runtime_on(name, timeout_ms, instance_reuse, Arc::new(MemoryStore::default()))
}

/// [`runtime_reusing`] on `store`.
pub(crate) fn runtime_on(
    name: &str,
    timeout_ms: u64,
    instance_reuse: u32,
    store: Arc<dyn StateStore>,
) -> ServiceRuntime {
    let limits = Limits { timeout: Duration::from_millis(timeout_ms), instance_reuse, ..Limits::default() };
    // Payment (and its test builds) redeems card tokens: granted, as in app.toml.
    let grants = Grants { vault: name.starts_with("payment"), ..Grants::default() };
    service(name, Engine::new().unwrap(), limits, grants, store)
}

/// The component `name` on `engine`, with `limits` and `grants`, its state
/// in `store`, its clock at 42 and a canary of 5 events and 2 failures.
pub(crate) fn service(
    name: &str,
    engine: Engine,
    limits: Limits,
    grants: Grants,
    store: Arc<dyn StateStore>,
) -> ServiceRuntime {
    let component = LoadedComponent::from_file(&engine, &wasm(name)).unwrap();
    ServiceRuntime::new(
        engine,
        ServiceSpec {
            name: name.into(),
            component,
            store,
            config: HashMap::new(),
            clock: Arc::new(ManualClock::at(42)),
            limits,
            canary: CanaryPolicy { events: 5, max_failures: 2 },
            grants,
        },
    )
}

pub(crate) fn event(event_type: &str, key: &str) -> Event {
    Event {
        id: format!("id-{event_type}-{key}"),
        event_type: event_type.into(),
        topic: "in".into(),
        key: Some(key.into()),
        headers: Vec::new(),
        payload: b"\"hello\"".to_vec(),
        timestamp_ms: 1,
    }
}

/// What [`handle`] produced: the outbox entry committed, and the version.
#[derive(Debug)]
pub(crate) struct Handled {
    pub outbox: Option<OutboxEntry>,
    pub version: Option<String>,
}

/// Handles `event` as the pipeline would, on a thread of its own (guests
/// never run on the async runtime), putting what the component emitted in
/// the outbox as records of its logical topic with the payload as value.
/// An event handled before is not handled again (`version` is `None`).
pub(crate) async fn handle(rt: &ServiceRuntime, event: &Event) -> Result<Handled, CallError> {
    let store = rt.state_store().clone();
    if store.was_handled(&event.id)? {
        return Ok(Handled { outbox: store.outbox(&event.id)?, version: None });
    }
    let view: Arc<dyn StateRead> = Arc::new(StoreReader(store.clone()));
    let called = std::thread::scope(|s| {
        let thread = std::thread::Builder::new().stack_size(CALL_THREAD_STACK);
        thread.spawn_scoped(s, || rt.call(event, view)).unwrap().join().unwrap()
    })?;
    let commit = Commit {
        writes: called.writes,
        timers: called.timers,
        handled: Some(event.id.clone()),
        outbox: called.outputs.into_iter().map(Output::bare_record).collect(),
        ..Commit::default()
    };
    store.commit(commit)?.wait().await?;
    Ok(Handled { outbox: store.outbox(&event.id)?, version: Some(called.version) })
}

/// The event types of the records `handled` put in the outbox.
pub(crate) fn emitted(handled: &Handled) -> Vec<&str> {
    let records = handled.outbox.iter().flat_map(|entry| &entry.records);
    records.flat_map(|record| &record.headers).filter(|(k, _)| k == "ce_type").map(|(_, v)| v.as_str()).collect()
}

async fn stored(rt: &ServiceRuntime, key: &str) -> Option<Vec<u8>> {
    rt.state_store().get(key).unwrap()
}

#[tokio::test]
async fn handle_commits_state_and_reports_the_version() {
    let rt = runtime("misbehave", 1000);
    let handled = handle(&rt, &event("Echo", "k1")).await.unwrap();
    assert_eq!(emitted(&handled), ["Echoed"]);
    let expected = hex::encode(Sha256::digest(std::fs::read(wasm("misbehave")).unwrap()));
    assert_eq!(handled.version, Some(expected));
    assert_eq!(stored(&rt, "k1").await, Some(b"\"hello\"".to_vec()));
    let response = rt
        .query(&Request { method: "GET".into(), path: "/state/k1".into(), query: String::new(), body: Vec::new() })
        .await
        .unwrap();
    assert_eq!((response.status, response.body.as_slice()), (200, b"\"hello\"".as_slice()));
}

fn get(path: &str) -> Request {
    Request { method: "GET".into(), path: path.into(), query: String::new(), body: Vec::new() }
}

/// The `calls` count each of `n` queries in a row answered.
async fn query_counts(rt: &ServiceRuntime, n: usize) -> Vec<String> {
    let mut counts = Vec::new();
    for _ in 0..n {
        let response = rt.query(&get("/calls")).await.unwrap();
        counts.push(String::from_utf8(response.body).unwrap());
    }
    counts
}

#[tokio::test]
async fn queries_reuse_an_instance_as_often_as_events_do() {
    assert_eq!(query_counts(&runtime_reusing("misbehave", 1000, 1), 3).await, ["1", "1", "1"], "a fresh instance each");
    // Unthrottled: a trapping query would otherwise hold back the next.
    let limits =
        Limits { timeout: Duration::from_millis(200), instance_reuse: 3, cpu_percent: 100, ..Limits::default() };
    let rt = service("misbehave", Engine::new().unwrap(), limits, Grants::default(), Arc::new(MemoryStore::default()));
    assert_eq!(query_counts(&rt, 4).await, ["1", "2", "3", "1"], "three queries an instance, then a new one");
    // A query that traps (here: past its deadline) takes the kept instance
    // down with it: the next query starts on a new one.
    assert!(rt.query(&get("/spin")).await.is_err());
    assert_eq!(query_counts(&rt, 2).await, ["1", "2"], "the trapped instance was dropped");
}

#[tokio::test]
async fn an_error_discards_the_calls_writes() {
    let rt = runtime("misbehave", 1000);
    let err = handle(&rt, &event("WriteThenFail", "k2")).await.unwrap_err();
    assert!(matches!(err, CallError::Handle(HandleError::Retryable(_))), "{err}");
    assert!(err.is_retryable());
    assert_eq!(stored(&rt, "k2").await, None, "writes of a failed call are discarded");
}

#[tokio::test]
async fn a_panic_is_contained_and_the_next_event_runs() {
    let rt = runtime("misbehave", 1000);
    let err = handle(&rt, &event("Panic", "k")).await.unwrap_err();
    assert!(matches!(&err, CallError::Trap(_)), "{err}");
    assert!(handle(&rt, &event("Echo", "after")).await.is_ok(), "a fresh instance serves the next event");
}

#[tokio::test]
async fn a_reused_instance_serves_many_events_and_is_replaced_after_a_trap() {
    let rt = runtime_reusing("misbehave", 200, 100);
    for i in 0..5 {
        let handled = handle(&rt, &event("Echo", &format!("k{i}"))).await.unwrap();
        assert_eq!(emitted(&handled), ["Echoed"]);
    }
    let err = handle(&rt, &event("WriteThenFail", "w")).await.unwrap_err();
    assert!(matches!(err, CallError::Handle(HandleError::Retryable(_))), "{err}");
    let handled = handle(&rt, &event("Echo", "after-error")).await.unwrap();
    assert_eq!(emitted(&handled), ["Echoed"], "an error leaves the instance usable");
    assert_eq!(stored(&rt, "w").await, None, "the failed call's writes did not leak into the next one");
    assert!(matches!(handle(&rt, &event("Panic", "p")).await.unwrap_err(), CallError::Trap(_)));
    assert!(handle(&rt, &event("Echo", "after-panic")).await.is_ok(), "a trapped instance is replaced");
    let started = Instant::now();
    let err = handle(&rt, &event("Spin", "s")).await.unwrap_err();
    assert!(matches!(&err, CallError::Trap(m) if m.contains("time budget")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "the budget holds on a reused instance too");
    assert!(handle(&rt, &event("Echo", "after-spin")).await.is_ok());
}

#[tokio::test]
async fn an_endless_loop_trips_the_time_budget() {
    let rt = runtime("misbehave", 200);
    let started = Instant::now();
    let err = handle(&rt, &event("Spin", "k")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(&err, CallError::Trap(m) if m.contains("time budget")), "{err}");
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(handle(&rt, &event("Echo", "after")).await.is_ok());
}

#[tokio::test]
async fn memory_beyond_the_limit_traps() {
    let rt = runtime("misbehave", 5000);
    let err = handle(&rt, &event("Hog", "k")).await.unwrap_err();
    assert!(matches!(&err, CallError::Trap(_)), "{err}");
    assert!(handle(&rt, &event("Echo", "after")).await.is_ok());
}

#[tokio::test]
async fn bytes_that_are_not_a_component_are_refused() {
    let engine = Engine::new().unwrap();
    let path = std::path::Path::new("bad.wasm");
    let err = LoadedComponent::from_bytes(&engine, path, b"definitely not wasm").err().unwrap();
    assert!(matches!(err, LoadError::Compile { .. }), "{err}");
    // A core module is valid Wasm but not a component.
    let core_module = b"\0asm\x01\0\0\0";
    let err = LoadedComponent::from_bytes(&engine, path, core_module).err().unwrap();
    assert!(matches!(err, LoadError::Compile { .. }), "{err}");
    assert!(err.to_string().contains("bad.wasm"), "{err}");
}

/// An event every version of `misbehave` handles and the order component
/// refuses (its payload is not an `OrderPlaced`).
fn poison() -> Event {
    event("OrderPlaced", "canary")
}

#[tokio::test]
async fn a_new_version_failing_its_canary_is_rolled_back() {
    let rt = runtime("misbehave", 1000);
    let original = rt.current().sha256.clone();
    rt.reload("order.wasm", std::fs::read(wasm("order")).unwrap()).await.unwrap();
    assert_ne!(rt.current().sha256, original);

    let first = handle(&rt, &poison()).await.unwrap_err();
    assert!(matches!(&first, CallError::Canary(m) if m.contains("malformed OrderPlaced")), "{first}");
    assert!(first.is_retryable(), "a canary failure is retried, not dead-lettered");
    let second = handle(&rt, &poison()).await.unwrap_err();
    assert!(matches!(&second, CallError::RolledBack(m) if m.contains("rolled back after 2 failures")), "{second}");
    assert!(second.is_retryable());
    assert_eq!(rt.current().sha256, original, "the previous version serves again");
    assert!(handle(&rt, &poison()).await.is_ok(), "the retried event succeeds on the restored version");

    let outcomes: Vec<String> = rt.history().into_iter().map(|h| h.outcome).collect();
    assert_eq!(outcomes[0], "serving");
    assert!(outcomes[1].starts_with("rolled back after 2 failures"), "{outcomes:?}");
}

#[tokio::test]
async fn records_every_version_refuses_do_not_roll_a_good_version_back() {
    let rt = runtime("payment", 1000);
    let v2 = hex::encode(Sha256::digest(std::fs::read(wasm("payment-v2")).unwrap()));
    rt.reload("payment-v2.wasm", std::fs::read(wasm("payment-v2")).unwrap()).await.unwrap();
    // Malformed requests: the previous version refuses them as well, so
    // they are bad input, not the new version's fault.
    for i in 0..4 {
        let err = handle(&rt, &event("PaymentRequested", &i.to_string())).await.unwrap_err();
        assert!(matches!(err, CallError::Handle(HandleError::Permanent(_))), "{err}");
    }
    assert_eq!(rt.current().sha256, v2, "still serving the new version");
}

#[tokio::test]
async fn a_new_version_passing_its_canary_stays() {
    let rt = runtime("misbehave", 1000);
    let order = hex::encode(Sha256::digest(std::fs::read(wasm("order")).unwrap()));
    rt.reload("order.wasm", std::fs::read(wasm("order")).unwrap()).await.unwrap();
    for i in 0..5 {
        handle(&rt, &event("Unrelated", &i.to_string())).await.unwrap();
    }
    for _ in 0..3 {
        let err = handle(&rt, &poison()).await.unwrap_err();
        assert!(matches!(err, CallError::Handle(HandleError::Permanent(_))), "{err}");
    }
    assert_eq!(rt.current().sha256, order, "failures after the canary do not roll back");
}

#[tokio::test]
async fn the_pipeline_retries_a_canary_failure_on_the_restored_version() {
    use crate::bus::Inbound;
    use crate::envelope::Envelope;
    use crate::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};

    let rt = Arc::new(runtime("misbehave", 1000));
    rt.reload("order.wasm", std::fs::read(wasm("order")).unwrap()).await.unwrap();
    // As many attempts as canary failures: the attempt that rolls the
    // version back does not count, so the event is not dead-lettered.
    let retry = RetryPolicy { max_attempts: 2, first_backoff: Duration::from_millis(1), ..RetryPolicy::default() };
    let pipeline = Pipeline::new(rt.clone(), Topics::default(), retry, Arc::new(ManualClock::at(5)));
    let envelope = Envelope::originate("OrderPlaced", "canary", "test", 1, serde_json::json!("hello"));
    let record = Inbound {
        topic: "orders".into(),
        partition: 0,
        offset: 7,
        key: None,
        value: Some(envelope.value()),
        headers: envelope.header_bytes(None),
    };
    let disposition = pipeline.process(&record, &tokio_util::sync::CancellationToken::new()).await.unwrap();
    let Disposition::Publish { records: out, .. } = disposition else {
        panic!("expected the event to be handled: {disposition:?}")
    };
    assert_eq!(out.len(), 1);
    let echoed = Envelope::decode(&out[0].headers, None, Some(&out[0].value)).unwrap();
    assert_eq!(echoed.producer(), format!("misbehave@{}", rt.current().sha256));
}

#[tokio::test]
async fn compiled_components_are_cached_on_disk() {
    let dir = std::env::temp_dir().join(format!("cache-test-{}", uuid::Uuid::new_v4().simple()));
    let bytes = std::fs::read(wasm("payment")).unwrap();
    let first =
        LoadedComponent::from_bytes(&Engine::with_cache(Some(dir.clone())).unwrap(), &wasm("payment"), &bytes).unwrap();
    assert!(!first.from_cache);
    let cwasm = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect();
        entries.sort();
        entries
    };
    let entries = cwasm(&dir);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].file_name().unwrap().to_string_lossy().starts_with(&first.sha256));

    let again =
        LoadedComponent::from_bytes(&Engine::with_cache(Some(dir.clone())).unwrap(), &wasm("payment"), &bytes).unwrap();
    assert!(again.from_cache, "a restart loads the known version without compiling");

    // A damaged entry is ignored and replaced.
    std::fs::write(&entries[0], b"damaged").unwrap();
    let engine = Engine::with_cache(Some(dir.clone())).unwrap();
    let rebuilt = LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap();
    assert!(!rebuilt.from_cache);
    assert!(LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache);

    // Native code this cache did not write is never loaded, however valid:
    // another component's entry under payment's name...
    let email = std::fs::read(wasm("email")).unwrap();
    let email_entry = LoadedComponent::from_bytes(&engine, &wasm("email"), &email).unwrap();
    let email_path = cwasm(&dir).into_iter().find(|p| p.to_string_lossy().contains(&email_entry.sha256)).unwrap();
    std::fs::copy(&email_path, &entries[0]).unwrap();
    assert!(!LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache, "renamed entry");
    // ...payment's own entry sealed by another cache (another key)...
    let other = std::env::temp_dir().join(format!("cache-test-{}", uuid::Uuid::new_v4().simple()));
    LoadedComponent::from_bytes(&Engine::with_cache(Some(other.clone())).unwrap(), &wasm("payment"), &bytes).unwrap();
    std::fs::copy(&cwasm(&other)[0], &entries[0]).unwrap();
    assert!(!LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache, "foreign seal");
    // ...or a serialized component without a seal (as written before seals).
    let bare = wasmtime::component::Component::new(engine.wasmtime(), &bytes).unwrap().serialize().unwrap();
    std::fs::write(&entries[0], bare).unwrap();
    assert!(!LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache, "no seal");
    assert!(LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache, "replaced, sealed");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}

#[tokio::test]
async fn a_changed_file_is_reloaded_after_it_settles() {
    use crate::watch::{WatchTiming, watch};
    let dir = std::env::temp_dir().join(format!("watch-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("svc.wasm");
    std::fs::copy(wasm("misbehave"), &path).unwrap();
    let rt = Arc::new(runtime("misbehave", 1000));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let timing = WatchTiming { poll: Duration::from_millis(20), settle: Duration::from_millis(50) };
    // Polled once here, the watcher has taken its first look at the file
    // (and is waiting for its next) before the file changes below.
    let mut watcher = Box::pin(watch(rt.clone(), path.clone(), timing, shutdown.clone()));
    assert!(futures::poll!(watcher.as_mut()).is_pending());
    let watcher = tokio::spawn(watcher);

    let order = std::fs::read(wasm("order")).unwrap();
    let changed = Instant::now();
    std::fs::write(dir.join("tmp"), &order).unwrap();
    std::fs::rename(dir.join("tmp"), &path).unwrap();
    let expected = hex::encode(Sha256::digest(&order));
    while rt.current().sha256 != expected {
        assert!(changed.elapsed() < Duration::from_secs(10), "not reloaded within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("file change to new version serving: {:?}", changed.elapsed());

    // Another version uploaded by hand (the admin API), then the file set
    // back to bytes the watcher had offered before: offered again.
    rt.reload("upload", std::fs::read(wasm("misbehave")).unwrap()).await.unwrap();
    std::fs::write(dir.join("tmp"), &order).unwrap();
    std::fs::rename(dir.join("tmp"), &path).unwrap();
    let back = Instant::now();
    while rt.current().sha256 != expected {
        assert!(back.elapsed() < Duration::from_secs(10), "the earlier file not reloaded within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A broken file is rejected once and the serving version stays.
    std::fs::write(&path, b"broken").unwrap();
    let rejected = || rt.history().iter().filter(|h| h.outcome.starts_with("rejected")).count();
    let broken = Instant::now();
    while rejected() == 0 {
        assert!(broken.elapsed() < Duration::from_secs(10), "the broken file not considered within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Not offered again and again: nothing can be awaited to show that, so
    // the watcher gets some 20 polls in which it must not try again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rt.current().sha256, expected);
    assert_eq!(rejected(), 1, "{:?}", rt.history());

    shutdown.cancel();
    watcher.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_key_waiting_to_retry_holds_up_only_its_own_later_events() {
    use futures::StreamExt as _;

    use crate::bus::Inbound;
    use crate::envelope::Envelope;
    use crate::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};

    let rt = Arc::new(runtime("misbehave", 1000));
    let retry = RetryPolicy { max_attempts: 3, first_backoff: Duration::from_millis(100), ..RetryPolicy::default() };
    let pipeline = Pipeline::new(rt, Topics::default(), retry, Arc::new(ManualClock::at(5)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let record = |event_type: &str, key: &str, offset: i64| {
        let envelope = Envelope::originate(event_type, key, "test", 1, serde_json::json!("hello"));
        let (value, headers) = (Some(envelope.value()), envelope.header_bytes(None));
        Inbound { topic: "in".into(), partition: 0, offset, key: Some(key.into()), value, headers }
    };
    let mut done: futures::stream::FuturesUnordered<_> =
        [record("WriteThenFail", "a", 0), record("Echo", "a", 1), record("Echo", "b", 2)]
            .into_iter()
            .map(|r| {
                let offset = r.offset;
                let handled = pipeline.submit(r, &shutdown);
                async move { (offset, handled.await) }
            })
            .collect();
    let mut order = Vec::new();
    while let Some((offset, disposition)) = done.next().await {
        let dead = matches!(disposition, Some(Disposition::DeadLetter { .. }));
        order.push((offset, dead));
    }
    assert_eq!(
        order,
        [(2, false), (0, true), (1, false)],
        "key b goes on while key a retries; a's second event waits for its first"
    );
}
