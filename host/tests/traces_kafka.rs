//! Trace context on a real broker: every record of an order, on every
//! topic, carries a `traceparent` of the trace its `POST /order` started
//! (or continued: the caller's), across the payment deadline's timer.

mod support;

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
