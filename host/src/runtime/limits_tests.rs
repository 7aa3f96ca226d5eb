//! Guest limits that always hold, proved with `misbehave`: a sleep and a
//! spinning or sleeping query end at the deadline, a write or timer bomb is
//! refused and fails for good, recursion stops at the component's stack,
//! and queries run off the async runtime, a few at a time.

use std::time::{Duration, Instant};

use super::tests::{event, handle, runtime, wasm};
use super::*;
use crate::clock::ManualClock;
use crate::state::MemoryStore;

/// `misbehave` with `limits` on an engine with `stack_bytes` of Wasm stack.
fn misbehave(limits: Limits, stack_bytes: usize) -> ServiceRuntime {
    let engine = Engine::new().unwrap().with_stack(stack_bytes).unwrap();
    super::tests::service("misbehave", engine, limits, Grants::default(), Arc::new(MemoryStore::default()))
}

fn get(path: &str) -> Request {
    Request { method: "GET".into(), path: path.into(), query: String::new(), body: Vec::new() }
}

fn timed_out(err: &CallError) -> bool {
    matches!(err, CallError::Trap(m) if m.contains("time budget"))
}

#[tokio::test]
async fn a_sleeping_guest_is_ended_at_its_deadline() {
    let rt = runtime("misbehave", 200);
    let started = Instant::now();
    let err = handle(&rt, &event("Sleep", "k")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(timed_out(&err), "{err}");
    assert!(err.is_retryable(), "a timeout is retried like any trap");
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(handle(&rt, &event("Echo", "after")).await.is_ok(), "a fresh instance serves the next event");
}

#[tokio::test]
async fn a_sleeping_or_spinning_query_is_ended_at_its_deadline() {
    // Unthrottled: the sleep's charge would refuse the spin (tested below).
    let limits = Limits { timeout: Duration::from_millis(200), cpu_percent: 100, ..Limits::default() };
    let rt = misbehave(limits, DEFAULT_STACK_BYTES);
    for path in ["/sleep", "/spin"] {
        let started = Instant::now();
        let err = rt.query(&get(path)).await.unwrap_err();
        assert!(timed_out(&err), "{path}: {err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path}: {:?}", started.elapsed());
    }
    // Once the spin's CPU is paid for (see the throttle's tests below).
    if let Some(left) = rt.throttle().wait_left(CallKind::Query) {
        tokio::time::sleep(left).await;
    }
    let response = rt.query(&get("/state/none")).await.unwrap();
    assert_eq!(response.status, 404, "the service still answers");
}

/// The test runs on a single-threaded runtime: were queries run on it, its
/// timers could not fire while they spin.
#[tokio::test]
async fn spinning_queries_take_turns_off_the_async_runtime() {
    // Unthrottled: their faults would hold the third back (tested below).
    let limits = Limits { timeout: Duration::from_millis(300), max_queries: 2, cpu_percent: 100, ..Limits::default() };
    let rt = Arc::new(misbehave(limits, DEFAULT_STACK_BYTES));
    let started = Instant::now();
    let queries: Vec<_> = (0..3)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.query(&get("/spin")).await })
        })
        .collect();
    // Timers of the runtime fire while all of them spin.
    for _ in 0..5 {
        let tick = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tick.elapsed() < Duration::from_millis(250), "the runtime was blocked for {:?}", tick.elapsed());
    }
    for query in queries {
        assert!(timed_out(&query.await.unwrap().unwrap_err()));
    }
    // Two at a time: the third began when one of the first two ended.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test]
async fn a_write_bomb_is_refused_and_fails_for_good() {
    let rt = runtime("misbehave", 5000);
    let err = handle(&rt, &event("WriteBomb", "w")).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Handle(HandleError::Permanent(m)) if m.contains("max_write_bytes_per_call")),
        "{err}"
    );
    assert!(!err.is_retryable(), "dead-lettered, not retried");
    assert_eq!(rt.state_store().get("w-0").unwrap(), None, "nothing of the call is committed");

    let limits = Limits { txn: TxnLimits { max_writes: 3, ..TxnLimits::default() }, ..Limits::default() };
    let rt = misbehave(limits, DEFAULT_STACK_BYTES);
    let err = handle(&rt, &event("WriteBomb", "w")).await.unwrap_err();
    assert!(matches!(&err, CallError::Handle(HandleError::Permanent(m)) if m.contains("max_writes_per_call")), "{err}");

    let err = handle(&rt, &event("TimerBomb", "t")).await.unwrap_err();
    assert!(matches!(&err, CallError::Handle(HandleError::Permanent(m)) if m.contains("max_timers_per_call")), "{err}");
    assert!(rt.state_store().due_timers(u64::MAX, 10).unwrap().is_empty(), "no timer set");
    assert!(handle(&rt, &event("Echo", "after")).await.is_ok());
}

#[tokio::test]
async fn recursion_stops_at_the_components_stack() {
    let shallow = misbehave(Limits::default(), DEFAULT_STACK_BYTES);
    // A key per depth: the same event id would be dropped as a duplicate.
    let recurse =
        |depth: u32| Event { payload: depth.to_string().into_bytes(), ..event("Recurse", &depth.to_string()) };
    assert!(handle(&shallow, &recurse(100)).await.is_ok());
    // Some 30 bytes a frame: 50,000 frames need over 1 MiB.
    let err = handle(&shallow, &recurse(50_000)).await.unwrap_err();
    assert!(matches!(&err, CallError::Trap(m) if m.contains("call stack exhausted")), "{err}");
    assert!(handle(&shallow, &Event { id: "again".into(), ..recurse(100) }).await.is_ok(), "the next call runs");

    let deep = misbehave(Limits::default(), MAX_STACK_BYTES);
    assert_eq!(deep.engine.stack_bytes(), MAX_STACK_BYTES);
    let handled = handle(&deep, &recurse(50_000)).await.unwrap();
    assert_eq!(super::tests::emitted(&handled), ["Recursed"], "a component granted 4 MiB goes deeper");
}

#[tokio::test]
async fn the_pipeline_retries_a_sleeper_and_dead_letters_a_bomb() {
    use crate::bus::Inbound;
    use crate::envelope::Envelope;
    use crate::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};

    let rt = Arc::new(runtime("misbehave", 200));
    let retry = RetryPolicy { max_attempts: 2, first_backoff: Duration::from_millis(1), ..RetryPolicy::default() };
    let pipeline = Pipeline::new(rt.clone(), Topics::default(), retry, Arc::new(ManualClock::at(5)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let record = |event_type: &str, key: &str| {
        let envelope = Envelope::originate(event_type, key, "test", 1, serde_json::json!("x"));
        Inbound {
            topic: "in".into(),
            partition: 0,
            offset: 1,
            key: None,
            value: Some(envelope.value()),
            headers: envelope.header_bytes(None),
        }
    };
    let started = Instant::now();
    let slept = pipeline.process(&record("Sleep", "s"), &shutdown).await;
    let elapsed = started.elapsed();
    let Some(Disposition::DeadLetter { reason, .. }) = slept else { panic!("{slept:?}") };
    assert!(reason.contains("time budget"), "{reason}");
    assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(4), "two attempts: {elapsed:?}");

    let started = Instant::now();
    let bombed = pipeline.process(&record("WriteBomb", "b"), &shutdown).await;
    let Some(Disposition::DeadLetter { reason, .. }) = bombed else { panic!("{bombed:?}") };
    assert!(reason.contains("max_write_bytes_per_call"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(2), "not retried: {:?}", started.elapsed());

    // The bomb's CPU is paid for before the next event runs.
    let penalty = rt.throttle().wait_left(CallKind::Handle).expect("the bomb was charged");
    let started = Instant::now();
    let echoed = pipeline.process(&record("Echo", "e"), &shutdown).await;
    assert!(matches!(echoed, Some(Disposition::Publish { .. })), "{echoed:?}");
    assert!(started.elapsed() >= penalty, "handled after {:?}, before its penalty of {penalty:?}", started.elapsed());

    // Also within one batch: an event submitted with a bomb runs after it
    // is paid for.
    let bomb_then_left = async {
        let bombed = pipeline.process(&record("WriteBomb", "b2"), &shutdown).await;
        (bombed, Instant::now(), rt.throttle().wait_left(CallKind::Handle))
    };
    let echo_at = async {
        let echoed = pipeline.process(&record("Echo", "e2"), &shutdown).await;
        (echoed, Instant::now())
    };
    let ((bombed, bombed_at, left), (echoed, echoed_at)) = tokio::join!(bomb_then_left, echo_at);
    assert!(matches!(bombed, Some(Disposition::DeadLetter { .. })), "{bombed:?}");
    assert!(matches!(echoed, Some(Disposition::Publish { .. })), "{echoed:?}");
    let left = left.expect("the second bomb was charged");
    assert!(echoed_at >= bombed_at + left, "echo {:?} after the bomb, its penalty {left:?}", echoed_at - bombed_at);
}

/// A guest spinning past its burst runs one tick in twenty: most of its
/// deadline is spent asleep, not on a core another component needs.
#[tokio::test]
async fn a_spinning_guest_gets_its_share_of_a_core_past_its_burst() {
    let limits = Limits { timeout: Duration::from_millis(1000), burst: Duration::from_millis(50), ..Limits::default() };
    let rt = misbehave(limits, DEFAULT_STACK_BYTES);
    let err = handle(&rt, &event("Spin", "s")).await.unwrap_err();
    assert!(timed_out(&err), "{err}");
    let (slept, _) = rt.throttle().totals();
    // Some 95 % of the 950 ms past the burst; a loaded machine delays the
    // ticks after which it sleeps, hence the margin. Unthrottled it is 0.
    assert!(slept >= Duration::from_millis(400), "slept {slept:?} of 1 s");
    // Its CPU (some 50 + 48 ms) is paid for before it handles again: twenty
    // times that from the call's start, some 1 s after its end.
    assert!(rt.throttle().wait_left(CallKind::Handle).is_some(), "a penalty");
    assert_eq!(rt.throttle().wait_left(CallKind::Query), None);

    let unthrottled = Limits { cpu_percent: 100, ..limits };
    let rt = misbehave(unthrottled, DEFAULT_STACK_BYTES);
    assert!(timed_out(&handle(&rt, &event("Spin", "s")).await.unwrap_err()));
    assert_eq!(rt.throttle().totals(), (Duration::ZERO, Duration::ZERO));
    assert_eq!(rt.throttle().wait_left(CallKind::Handle), None);
}

/// A reload or a rollback forgets the faults of the version it replaced.
#[tokio::test]
async fn a_new_version_does_not_pay_for_the_old_ones_faults() {
    let rt = misbehave(Limits::default(), DEFAULT_STACK_BYTES);
    assert!(handle(&rt, &event("WriteBomb", "w")).await.is_err());
    assert!(rt.throttle().wait_left(CallKind::Handle).is_some());
    rt.reload("misbehave again", std::fs::read(wasm("misbehave")).unwrap()).await.unwrap();
    assert_eq!(rt.throttle().wait_left(CallKind::Handle), None, "forgiven at the reload");
    assert!(handle(&rt, &event("WriteBomb", "w2")).await.is_err());
    rt.roll_back().await.unwrap();
    assert_eq!(rt.throttle().wait_left(CallKind::Handle), None, "forgiven at the rollback");
}

/// Cheap failures and successes cost nothing; a write bomb pays for its CPU.
#[tokio::test]
async fn only_faults_are_charged() {
    let rt = misbehave(Limits::default(), DEFAULT_STACK_BYTES);
    assert!(handle(&rt, &event("Echo", "e")).await.is_ok());
    assert!(handle(&rt, &event("WriteThenFail", "f")).await.is_err());
    assert_eq!(rt.throttle().wait_left(CallKind::Handle), None, "an answer, even an error, is no fault");
    assert!(handle(&rt, &event("WriteBomb", "w")).await.is_err());
    assert!(rt.throttle().wait_left(CallKind::Handle).is_some(), "a call ended at a limit is");
}

/// After a spinning query, the next ones wait for the penalty, or are
/// refused at once with the time left when it is longer than their timeout.
#[tokio::test]
async fn a_failing_query_holds_the_next_ones_back() {
    let limits = Limits { timeout: Duration::from_millis(300), burst: Duration::from_millis(100), ..Limits::default() };
    let rt = misbehave(limits, DEFAULT_STACK_BYTES);
    assert!(timed_out(&rt.query(&get("/spin")).await.unwrap_err()));
    let started = Instant::now();
    let err = rt.query(&get("/state/none")).await.unwrap_err();
    let CallError::Throttled(left) = err else { panic!("{err}") };
    // Some 100 + 20 ms of CPU: nine times that to wait, well over 300 ms.
    assert!(left > limits.timeout, "{left:?}");
    assert!(started.elapsed() < Duration::from_millis(100), "refused at once");
    assert_eq!(rt.throttle().wait_left(CallKind::Handle), None, "events are not held back by queries");
    tokio::time::sleep(left).await;
    assert_eq!(rt.query(&get("/state/none")).await.unwrap().status, 404, "it answers once paid for");
}
