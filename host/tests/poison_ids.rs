//! Ids no store can keep never stall a partition, on a real broker and the
//! shared PostgreSQL store: a record whose event id holds a NUL and one
//! whose id is 10 KB long are dead-lettered with the reason, and the next
//! record of the same partition (same key) is handled.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::json;
use support::*;

fn envelope(id: &str, order_id: &str, data: &str) -> String {
    json!({
        "id": id, "type": "Echo", "order_id": order_id, "correlation_id": "c",
        "timestamp_ms": 1, "schema_version": 1, "producer": "test", "data": data
    })
    .to_string()
}

/// The headers of the first `count` dead letters of `topic`.
fn dead_letters(brokers: &str, topic: &str, count: usize) -> Vec<BTreeMap<String, String>> {
    let consumer = reader(brokers, &[topic]);
    let mut found = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while found.len() < count && std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let headers = message.headers().map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                .collect()
        });
        found.push(headers.unwrap_or_default());
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_ids_no_store_can_keep_are_dead_lettered_and_the_partition_goes_on() {
    let brokers = brokers();
    let dir = temp_dir("poison-ids");
    let ports = Ports::free();
    let schema = fresh_schema();
    let options = Options { postgres_schema: Some(schema.clone()), ..Options::default() };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let port = add_component(&manifest, "misbehave", "publishes = [\"out:*\"]");
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_ports_healthy(&client, &[port]).await;

    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let long = "i".repeat(10 * 1024);
    // One key, so one partition, in this order.
    for (id, data) in [("echo\u{0}nul", "nul"), (long.as_str(), "long"), ("echo-after", "after")] {
        let value = envelope(id, "k", data);
        producer.send(BaseRecord::to(&format!("{prefix}misbehave")).key("k").payload(&value)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    // The record after them is handled: the component wrote its payload.
    let url = format!("http://127.0.0.1:{port}/state/k");
    eventually(Duration::from_secs(40), "the record after the bad ids to be handled", || async {
        let body = client.get(&url).send().await.ok()?.text().await.ok()?;
        (body == "\"after\"").then_some(())
    })
    .await;
    let topic = format!("{prefix}dead-letters");
    let found = tokio::task::spawn_blocking(move || dead_letters(&brokers, &topic, 3)).await.unwrap();
    let reasons: Vec<&str> = found
        .iter()
        .filter(|h| h.get("dlq-component").is_some_and(|c| c == "misbehave"))
        .map(|h| h["dlq-reason"].as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not an event this host reads: id contains the control character '\\0'")),
        "{reasons:?}\n{}",
        host.output()
    );
    assert!(reasons.iter().any(|r| r.contains("id is 10240 bytes long, over the limit of 256")), "{reasons:?}");
    drop(host);
    drop_schema(&schema).await;
}
