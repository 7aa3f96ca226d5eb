//! The metrics' figures move with what happens, and the text they make is
//! Prometheus' format.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::StatusCode;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::*;
use crate::bus::Inbound;
use crate::clock::ManualClock;
use crate::envelope::Envelope;
use crate::pipeline::{Pipeline, RetryPolicy, Topics};
use crate::runtime::VersionRecord;
use crate::runtime::tests::runtime;

/// Every sample of a Prometheus text, by `name{labels}` as written; panics
/// on a line that is neither a comment nor `series value`.
pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(comment.starts_with("HELP ") || comment.starts_with("TYPE "), "bad comment: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        assert!(series.starts_with("shop_"), "unexpected series: {line}");
        assert!(samples.insert(series.to_owned(), value).is_none(), "duplicate series: {line}");
    }
    samples
}

fn record(event_type: &str, key: &str, offset: i64) -> Inbound {
    let envelope = Envelope::originate(event_type, key, "test", 1, serde_json::json!("x"));
    Inbound {
        topic: "in".into(),
        partition: 0,
        offset,
        key: Some(key.as_bytes().to_vec()),
        value: Some(envelope.value()),
        headers: envelope.header_bytes(None),
    }
}

#[tokio::test]
async fn failures_traps_and_stage_latencies_are_counted() {
    let service = Arc::new(runtime("misbehave", 200));
    let metrics = Arc::new(ComponentMetrics::new(service.clone(), ConsumerStatus::default(), BrokerLink::default()));
    service.stages().attach(metrics.stage_histograms());
    let retry = RetryPolicy { max_attempts: 2, first_backoff: Duration::from_millis(1), ..RetryPolicy::default() };
    let pipeline = Pipeline::new(service.clone(), Topics::default(), retry, Arc::new(ManualClock::at(5)));
    pipeline.set_metrics(metrics.faults().clone());
    let shutdown = CancellationToken::new();
    let before = parse(&metrics.encode().unwrap());
    assert_eq!(before.get(r#"shop_stage_duration_seconds_count{component="misbehave",stage="call"}"#), Some(&0.0));
    assert_eq!(before.get(r#"shop_timers_pending{component="misbehave"}"#), Some(&0.0));
    assert_eq!(before.get(r#"shop_broker_up"#), Some(&1.0));
    assert_eq!(before.get(r#"shop_guest_throttled_seconds_total{component="misbehave"}"#), Some(&0.0));
    assert_eq!(before.get(r#"shop_reloads_total{component="misbehave",result="accepted"}"#), Some(&0.0));

    for (offset, event_type) in [(1, "Echo"), (2, "Panic"), (3, "Spin")] {
        pipeline.process(&record(event_type, "k", offset), &shutdown).await.unwrap();
    }
    let after = parse(&metrics.encode().unwrap());
    let get = |series: &str| after.get(series).copied().unwrap_or_else(|| panic!("no {series} in {after:#?}"));
    assert_eq!(get(r#"shop_events_failed_total{component="misbehave",error="trap"}"#), 4.0, "two tries each");
    assert_eq!(get(r#"shop_guest_traps_total{component="misbehave",kind="unreachable"}"#), 2.0, "the panics");
    assert_eq!(get(r#"shop_guest_traps_total{component="misbehave",kind="timeout"}"#), 2.0, "the spins");
    // Past their burst the spins were held back, and their CPU charged.
    assert!(get(r#"shop_guest_throttled_seconds_total{component="misbehave"}"#) > 0.0);
    assert!(get(r#"shop_guest_fault_penalty_seconds_total{component="misbehave"}"#) > 0.5);
    assert!(get(r#"shop_stage_duration_seconds_count{component="misbehave",stage="call"}"#) >= 5.0);
    assert_eq!(get(r#"shop_stage_duration_seconds_count{component="misbehave",stage="commit"}"#), 1.0, "the echo");
    let slow = get(r#"shop_stage_duration_seconds_bucket{component="misbehave",stage="call",le="0.1"}"#);
    assert_eq!(
        get(r#"shop_stage_duration_seconds_count{component="misbehave",stage="call"}"#) - slow,
        2.0,
        "the spins took over 100 ms"
    );
}

#[test]
fn reloads_are_counted_from_the_history_once_each() {
    let entry = |at_ms, sha: &str, outcome: &str| VersionRecord {
        sha256: sha.into(),
        source: "p.wasm".into(),
        at_ms,
        outcome: outcome.into(),
        pause_ms: None,
    };
    let mut history = vec![entry(1, "a", "serving")];
    let mut tally = ReloadTally::default();
    tally.update(&history);
    (tally.accepted, tally.rejected) = (0, 0);
    history.push(entry(2, "b", "serving"));
    history.push(entry(3, "c", "rejected: not a component"));
    tally.update(&history);
    tally.update(&history);
    assert_eq!((tally.accepted, tally.rejected), (1, 1), "each entry once, however often scraped");
    // The history drops its oldest entries; a rollback rewrites an outcome.
    history.remove(0);
    history[0].outcome = "rolled back after 3 failures".into();
    history.push(entry(4, "d", "serving"));
    tally.update(&history);
    assert_eq!((tally.accepted, tally.rejected), (2, 1));
}

#[test]
fn traps_are_told_apart_by_kind() {
    assert_eq!(trap_kind("exceeded its time budget of 200ms"), "timeout");
    assert_eq!(
        trap_kind("error while executing at wasm backtrace: ...: wasm trap: wasm `unreachable` instruction executed"),
        "unreachable"
    );
    assert_eq!(trap_kind("wasm trap: call stack exhausted"), "stack_overflow");
    assert_eq!(trap_kind("wasm trap: out of bounds memory access"), "memory_access");
    assert_eq!(trap_kind("instantiation failed"), "other");
}

#[tokio::test]
async fn gateway_requests_are_timed_by_matched_route_and_status() {
    let metrics = Arc::new(GatewayMetrics::new(BrokerLink::default()));
    let router =
        Router::new().route("/order/{id}", get(|| async { "ok" })).fallback(|| async { StatusCode::NOT_FOUND });
    let app = metrics.instrument(router);
    for uri in ["/order/a", "/order/b", "/nowhere/c"] {
        let response = app.clone().oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        assert!(response.status() == 200 || response.status() == 404);
    }
    let response = app.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let samples = parse(std::str::from_utf8(&body).unwrap());
    let count = |series: &str| samples.get(series).copied();
    assert_eq!(
        count(r#"shop_http_request_duration_seconds_count{route="/order/{id}",method="GET",status="200"}"#),
        Some(2.0),
        "{samples:#?}"
    );
    assert_eq!(
        count(r#"shop_http_request_duration_seconds_count{route="unmatched",method="GET",status="404"}"#),
        Some(1.0)
    );
    assert!(
        !samples.keys().any(|k| k.contains("/order/a") || k.contains("/metrics")),
        "ids and scrapes are not labels"
    );
}
