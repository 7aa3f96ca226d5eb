//! Bad records never stall a stream, on a real broker: an output the broker
//! refuses for good (its topic does not exist; topics are never
//! auto-created) and an incoming record of about 1 MB are both set aside on
//! the dead-letter topic with the reason, and the component goes on.

mod support;

use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use support::*;

fn envelope(id: &str, event_type: &str, order_id: &str) -> String {
    json!({
        "id": id, "type": event_type, "order_id": order_id, "correlation_id": id,
        "timestamp_ms": 1, "schema_version": 1, "producer": "test", "data": "hello"
    })
    .to_string()
}

/// Dead letters so far: (headers by name, value length).
fn dead_letters(
    brokers: &str,
    topic: &str,
    at_least: usize,
) -> Vec<(std::collections::BTreeMap<String, String>, usize)> {
    let consumer = reader(brokers, &[topic]);
    let mut found = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while found.len() < at_least && std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        found.push((headers, message.payload().map_or(0, <[u8]>::len)));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_outputs_and_oversized_records_are_set_aside_and_the_stream_goes_on() {
    let brokers = brokers();
    let dir = temp_dir("bad-records");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    // A component whose every output goes to `out`, a topic that does not exist.
    let misbehave_port = add_component(&manifest, "misbehave", "publishes = [\"out:*\"]");
    let _host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    wait_ports_healthy(&client, &[misbehave_port]).await;

    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    for id in ["echo-1", "echo-2"] {
        let value = envelope(id, "Echo", id);
        producer.send(BaseRecord::to(&format!("{prefix}misbehave")).key(id).payload(&value)).unwrap();
    }
    // About 1 MB: below the broker's limit, above the host's (512 KiB).
    let big = "x".repeat(1_000_000);
    producer.send(BaseRecord::to(&format!("{prefix}orders")).key("big").payload(&big)).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    let dead_letter_topic = format!("{prefix}dead-letters");
    let found = tokio::task::spawn_blocking(move || dead_letters(&brokers, &dead_letter_topic, 4)).await.unwrap();
    let refused: Vec<_> =
        found.iter().filter(|(h, _)| h.get("dlq-target-topic") == Some(&format!("{prefix}out"))).collect();
    assert_eq!(refused.len(), 2, "both outputs to the missing topic set aside: {found:?}");
    for (headers, _) in &refused {
        assert!(headers["dlq-reason"].contains("refuses it for good"), "{headers:?}");
        assert_eq!(headers["dlq-component"], "misbehave");
    }
    // Order and analytics both read `orders`: each sets the record aside.
    let too_large: Vec<_> = found.iter().filter(|(h, _)| h.contains_key("dlq-truncated")).collect();
    let mut components: Vec<&str> = too_large.iter().map(|(h, _)| h["dlq-component"].as_str()).collect();
    components.sort_unstable();
    assert_eq!(components, ["analytics", "order"], "{found:?}");
    for (headers, length) in too_large {
        assert!(headers["dlq-reason"].contains("larger than the limit"), "{headers:?}");
        assert_eq!((headers["dlq-truncated"].as_str(), *length), ("1000000", 64 * 1024));
    }

    // Both consumers go on: a new order is confirmed, and misbehave reports
    // what it set aside while still consuming.
    let order = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242424242424242" }
    });
    let placed: Value = client
        .post(format!("http://127.0.0.1:{}/order", ports.gateway))
        .json(&order)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{}/order/{id}", ports.gateway);
    eventually(Duration::from_secs(30), "the next order to be confirmed", || async {
        (get_json(&client, &url).await?["status"] == "CONFIRMED").then_some(())
    })
    .await;
    let health = get_json(&client, &format!("http://127.0.0.1:{misbehave_port}/health")).await.unwrap();
    assert_eq!((health["dead_lettered"].as_u64(), health["status"].as_str()), (Some(2), Some("ok")), "{health}");
    let orders = get_json(&client, &format!("http://127.0.0.1:{}/health", ports.order)).await.unwrap();
    assert!(orders["dead_lettered"].as_u64() >= Some(1), "{orders}");
}
