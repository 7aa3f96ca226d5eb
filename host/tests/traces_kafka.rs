//! Trace context on a real broker: every record of an order, on every
//! topic, carries a `traceparent` of the trace its `POST /order` started
//! (or continued: the caller's), across the payment deadline's timer.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use shop_host::traces::TraceParent;
use support::*;

/// The caller's trace: the order must continue it.
const CALLER: &str = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_an_order_carries_its_trace() {
    let dir = temp_dir("traces");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let _host = HostProcess::start(&manifest, Some(&brokers()));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;

    let body = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242424242424242" }
    });
    let url = format!("http://127.0.0.1:{}/order", ports.gateway);
    let with_caller = client.post(&url).header("traceparent", CALLER).json(&body).send().await.unwrap();
    assert_eq!(with_caller.status(), 202);
    let continued = with_caller.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned();
    let fresh = client.post(&url).json(&body).send().await.unwrap().json::<Value>().await.unwrap();
    let fresh = fresh["order_id"].as_str().unwrap().to_owned();

    for id in [&continued, &fresh] {
        let emails = format!("http://127.0.0.1:{}/emails?order={id}", ports.email);
        eventually(Duration::from_secs(60), "an email", || async {
            let e = get_json(&client, &emails).await?;
            (!e.as_array()?.is_empty()).then_some(e)
        })
        .await;
    }
    wait_caught_up(&brokers(), &manifest).await;
    let topics = read_topics(&brokers(), &prefix);

    let trace_of = |id: &str| {
        let records = &topics.traceparents[id];
        assert!(records.len() >= 5, "placed, requested, answered, confirmed, emailed: {records:?}");
        let traces: Vec<Option<String>> = records
            .iter()
            .map(|(_, header)| header.as_deref().and_then(TraceParent::parse).map(|t| t.trace_hex()))
            .collect();
        assert!(traces.iter().all(|t| t.is_some() && *t == traces[0]), "one trace for order {id}: {records:?}");
        traces[0].clone().unwrap()
    };
    assert_eq!(trace_of(&continued), TraceParent::parse(CALLER).unwrap().trace_hex(), "the caller's trace");
    let started = trace_of(&fresh);
    assert_ne!(started, trace_of(&continued), "another order, another trace");
}

/// An OTLP/HTTP receiver on a free port: the bodies posted to `/v1/traces`.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            kept.lock().unwrap().push(body.to_vec());
            // An empty ExportTraceServiceResponse: everything accepted.
            ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (endpoint, bodies)
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let (endpoint, bodies) = otlp_receiver().await;
    let dir = temp_dir("traces-otlp");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let host = HostProcess::start_env(&manifest, Some(&brokers()), &["--log-format", "json"], &env);
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;

    let body = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242424242424242" }
    });
    let url = format!("http://127.0.0.1:{}/order", ports.gateway);
    let placed = client.post(&url).header("traceparent", CALLER).json(&body).send().await.unwrap();
    assert_eq!(placed.status(), 202);

    // The protobuf carries the trace id as 16 raw bytes and names as
    // plain strings: every stage of the saga's components, in the caller's
    // trace.
    let trace_id = TraceParent::parse(CALLER).unwrap().trace_id;
    let wanted: [&[u8]; 8] =
        [b"place_order", b"event", b"handle", b"commit", b"publish", b"payment", b"email", b"shop-host"];
    eventually(Duration::from_secs(60), "the saga's spans exported", || async {
        let all: Vec<u8> = bodies.lock().unwrap().concat();
        (contains(&all, &trace_id) && wanted.iter().all(|w| contains(&all, w))).then_some(())
    })
    .await;
    let output = host.output();
    assert!(!output.contains("traces are not exported"), "{output}");
    // Stage spans stay out of the logs: a line's span is still the event's.
    let spans: Vec<serde_json::Value> = output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| line.get("span").cloned())
        .collect();
    assert!(spans.iter().any(|span| span["name"] == "event"), "{output}");
    assert!(spans.iter().all(|span| span["name"] == "event"), "{spans:?}");
}
