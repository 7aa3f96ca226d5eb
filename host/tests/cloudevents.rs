//! The formats the host reads, on a real broker: an `OrderPlaced` in the
//! version-1 envelope the host wrote before CloudEvents (as records already
//! on the topics are) and one in CloudEvents structured mode both run the
//! saga to its end, every event the host writes for them is a CloudEvent in
//! binary mode continuing their saga, and a record in neither format is
//! dead-lettered saying why.

mod support;

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use support::*;

fn order_placed(order_id: &str) -> Value {
    json!({
        "order_id": order_id,
        "customer": { "name": "Old", "email": "old@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "total_cents": 1250,
        // No card the vault holds: payment declines, the order is rejected.
        "card": { "token": "tok_not_in_the_vault", "brand": "visa", "last4": "4242" },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_envelopes_and_structured_cloudevents_run_the_saga() {
    let brokers = brokers();
    let dir = temp_dir("cloudevents");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let (old, structured) = (format!("v1-{run}"), format!("structured-{run}"));
    let old_value = json!({
        "id": format!("id-{old}"), "type": "OrderPlaced", "order_id": old, "correlation_id": format!("id-{old}"),
        "causation_id": null, "timestamp_ms": 1_764_100_000_000_u64, "schema_version": 1, "producer": "gateway",
        "data": order_placed(&old),
    });
    let structured_value = json!({
        "specversion": "1.0", "id": format!("id-{structured}"), "source": "/elsewhere/orders",
        "type": "OrderPlaced", "subject": structured, "time": "2026-12-07T18:00:00Z",
        "datacontenttype": "application/json", "data": order_placed(&structured),
    });
    let unknown = json!({ "id": "x", "type": "OrderPlaced", "order_id": "x" });
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let topic = format!("{prefix}orders");
    let old_headers = OwnedHeaders::new().insert(Header { key: "event-type", value: Some("OrderPlaced") });
    let old_text = old_value.to_string();
    producer.send(BaseRecord::to(&topic).key(&old).payload(&old_text).headers(old_headers)).unwrap();
    let content_type =
        OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/cloudevents+json") });
    let structured_text = structured_value.to_string();
    producer.send(BaseRecord::to(&topic).key(&structured).payload(&structured_text).headers(content_type)).unwrap();
    producer.send(BaseRecord::to(&topic).key("unknown").payload(&unknown.to_string())).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    for order in [&old, &structured] {
        let url = format!("http://127.0.0.1:{}/order/{order}", ports.gateway);
        eventually(Duration::from_secs(60), &format!("order {order} to be rejected"), || async {
            (get_json(&client, &url).await?["status"] == "REJECTED").then_some(())
        })
        .await;
    }
    let emails = format!("http://127.0.0.1:{}/stats", ports.analytics);
    eventually(Duration::from_secs(60), "both rejection emails sent", || async {
        (get_json(&client, &emails).await?["emails_sent"].as_u64()? >= 2).then_some(())
    })
    .await;

    let topics = read_topics(&brokers, &prefix);
    for (order, first) in [(&old, format!("id-{old}")), (&structured, format!("id-{structured}"))] {
        for event_type in ["PaymentRequested", "PaymentDeclined", "OrderRejected", "EmailRequested", "EmailSent"] {
            let events = topics.of(order, event_type);
            assert_eq!(events.len(), 1, "{order}: {event_type} {events:?}");
            for event in events.values() {
                assert_eq!(event["correlation_id"], first.as_str(), "{order}: the saga goes on: {event}");
                let maker = match event_type {
                    "PaymentDeclined" => "payment@",
                    "EmailSent" => "email@",
                    _ => "order@",
                };
                assert!(event["producer"].as_str().unwrap().starts_with(maker), "made by {maker}: {event}");
            }
        }
        let requested = topics.of(order, "PaymentRequested");
        assert_eq!(requested.values().next().unwrap()["causation_id"], first.as_str(), "caused by the order");
    }
    // Only the records produced here are not CloudEvents in binary mode.
    assert_eq!(topics.undecodable.len(), 3, "{:?}", topics.undecodable);
    let reasons: Vec<&String> = topics.dead_letters.iter().filter(|d| d.contains("neither a CloudEvent")).collect();
    assert_eq!(reasons.len(), 2, "order and analytics each set the unknown record aside: {:?}", topics.dead_letters);
    drop(host);
}
