//! Dead letters you can act on, on a real broker: an email component that
//! refuses every `EmailRequested` dead-letters them; `host dlq list` and
//! the admin API show each with its component, version, source and reason;
//! after the real email component is reloaded, `host dlq replay --all`
//! sends each email exactly once (an independent reader of the topics
//! counts them), the list shows them replayed, analytics drops the replayed
//! requests as duplicates, and replaying again replays nothing.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use sha2::Digest as _;
use support::*;

fn sha(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Runs `host dlq ARGS --json` on `manifest`; returns its exit success and
/// its JSON output (or its stderr as a string when it printed none).
fn dlq_cli(manifest: &Path, brokers: &str, args: &[&str]) -> (bool, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_host"))
        .arg("dlq")
        .args(args)
        .args(["--json", "--manifest"])
        .arg(manifest)
        .env("KAFKA_BROKERS", brokers)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::String(stderr));
    (output.status.success(), value)
}

/// Every record of `topic` up to its current end, by a consumer of our own.
fn read_to_end(brokers: &str, topic: &str) -> Vec<(Option<String>, Value)> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    for partition in metadata.topics()[0].partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)).unwrap();
        if high > low {
            ends.insert(partition.id(), high);
            assignment.add_partition_offset(topic, partition.id(), Offset::Offset(low)).unwrap();
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return records;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ends.is_empty() {
        assert!(std::time::Instant::now() < deadline, "{topic} not read to its end within 30 s");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.unwrap();
        let Some(end) = ends.get(&message.partition()).copied() else { continue };
        if message.offset() < end {
            let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
            records.push((
                key,
                event_json(&headers_of(&message), message.payload().unwrap_or_default()).unwrap_or(Value::Null),
            ));
        }
        if message.offset() + 1 >= end {
            ends.remove(&message.partition());
        }
    }
    records
}

/// (order id, email kind) of every `EmailSent` on the analytics topic.
fn emails_sent(brokers: &str, prefix: &str) -> Vec<(String, String)> {
    let mut sent: Vec<(String, String)> = read_to_end(brokers, &format!("{prefix}analytics"))
        .into_iter()
        .filter(|(_, envelope)| envelope["type"] == "EmailSent")
        .map(|(_, envelope)| {
            let data = &envelope["data"];
            (data["order_id"].as_str().unwrap().to_owned(), data["kind"].as_str().unwrap().to_owned())
        })
        .collect();
    sent.sort();
    sent
}

async fn admin(client: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client.request(method.parse().unwrap(), url).bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.timeout(Duration::from_secs(60)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_emails_are_replayed_once_after_a_fix() {
    let brokers = brokers();
    let dir = temp_dir("dlq");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    // The email component runs from a file of its own: first the variant
    // that refuses every request.
    let live = dir.join("email.wasm");
    let (failing, fixed) = (component("email-fail"), component("email"));
    std::fs::copy(&failing, &live).unwrap();
    let text =
        std::fs::read_to_string(&manifest).unwrap().replace(&fixed.display().to_string(), &live.display().to_string());
    std::fs::write(&manifest, text).unwrap();

    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host).await;
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let admin_url = format!("http://127.0.0.1:{}", ports.admin);

    // Three orders confirmed, one declined: four emails of two kinds.
    let cards = ["4242424242424242", "4242424242424242", "4000000000000002", "4242424242424242"];
    let mut expected = Vec::new();
    for (i, card) in cards.iter().enumerate() {
        let body = json!({
            "customer": { "name": "Ada", "email": "ada@example.com" },
            "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
            "payment": { "card_number": card }
        });
        let placed = place_until_accepted(&client, &gateway, &format!("{prefix}dlq-{i}"), &body).await;
        let kind = if *card == "4000000000000002" { "order_rejected" } else { "order_confirmed" };
        expected.push((placed["order_id"].as_str().unwrap().to_owned(), kind.to_owned()));
    }
    expected.sort();

    // Every request is dead-lettered, and the list says by whom and why.
    let listed = eventually(Duration::from_secs(60), "four email dead letters", || async {
        let (ok, list) = dlq_cli(&manifest, &brokers, &["list", "--component", "email"]);
        (ok && list.as_array().is_some_and(|l| l.len() == cards.len())).then_some(list)
    })
    .await;
    let failing_sha = sha(&failing);
    for letter in listed.as_array().unwrap() {
        assert_eq!(letter["component"], "email", "{letter}");
        assert_eq!(letter["version"], failing_sha.as_str(), "{letter}");
        assert_eq!(letter["origin"]["topic"], format!("{prefix}emails"), "{letter}");
        assert_eq!(letter["attempts"], 1, "{letter}");
        assert!(letter["reason"].as_str().unwrap().contains("test variant `fail`"), "{letter}");
        assert_eq!(letter["event_type"], "EmailRequested", "{letter}");
        assert!(letter["replayed"].is_null(), "{letter}");
    }
    let (status, body) = admin(&client, "GET", &format!("{admin_url}/dlq?component=email&since=1h"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dead_letters"].as_array().unwrap().len(), cards.len(), "{body}");
    let (status, body) = admin(&client, "GET", &format!("{admin_url}/dlq?component=payment"), None).await;
    assert_eq!((status, body["dead_letters"].as_array().map(Vec::len)), (200, Some(0)), "{body}");
    assert!(emails_sent(&brokers, &prefix).is_empty(), "no email went out");

    // The fix: the real email component, through the admin API.
    let response = client
        .post(format!("{admin_url}/components/email/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .body(std::fs::read(&fixed).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let version: Value = response.json().await.unwrap();
    assert_eq!(version["version"], sha(&fixed).as_str());

    // Replay all of email's: each request goes back to the emails topic.
    let (ok, report) = dlq_cli(&manifest, &brokers, &["replay", "--all", "--component", "email"]);
    assert!(ok, "{report}");
    assert_eq!(report["replayed"].as_array().unwrap().len(), cards.len(), "{report}");
    assert!(report["refused"].as_array().unwrap().is_empty(), "{report}");

    // Each order gets exactly one email of its kind.
    eventually(Duration::from_secs(60), "an EmailSent for every order", || async {
        (emails_sent(&brokers, &prefix).len() >= expected.len()).then_some(())
    })
    .await;
    for (order_id, kind) in &expected {
        let url = format!("http://127.0.0.1:{}/emails?order={order_id}", ports.email);
        let emails = get_json(&client, &url).await.unwrap();
        let kinds: Vec<&str> = emails.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, [kind.as_str()], "order {order_id}");
    }

    // The list shows them replayed; replaying again replays nothing, by
    // the CLI and the admin API alike; an id named again is refused.
    let (ok, listed) = dlq_cli(&manifest, &brokers, &["list", "--component", "email"]);
    assert!(ok, "{listed}");
    assert!(listed.as_array().unwrap().iter().all(|l| l["replayed"].is_object()), "{listed}");
    let (ok, again) = dlq_cli(&manifest, &brokers, &["replay", "--all", "--component", "email"]);
    assert!(ok && again["replayed"].as_array().unwrap().is_empty(), "{again}");
    let body = json!({ "all": true, "component": "email" });
    let (status, again) = admin(&client, "POST", &format!("{admin_url}/dlq/replay"), Some(body)).await;
    assert_eq!((status, again["replayed"].as_array().map(Vec::len)), (200, Some(0)), "{again}");
    let first = listed[0]["id"].as_str().unwrap();
    let (ok, refused) = dlq_cli(&manifest, &brokers, &["replay", first]);
    assert!(!ok, "a refused id fails the command: {refused}");
    assert!(refused["refused"][0]["reason"].as_str().unwrap().contains("already replayed"), "{refused}");
    let (status, body) = admin(&client, "POST", &format!("{admin_url}/dlq/replay"), Some(json!({ "all": true }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_selection")), "{body}");

    // Analytics, which also reads the emails topic, dropped the replayed
    // requests as duplicates and counted each email once.
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let stats = eventually(Duration::from_secs(30), "analytics to count every email", || async {
        let stats = get_json(&client, &stats_url).await?;
        (stats["emails_sent"].as_u64() == Some(expected.len() as u64)).then_some(stats)
    })
    .await;
    assert_eq!(stats["events_by_type"]["EmailRequested"], cards.len(), "{stats}");
    // The topic, read to its end after all of that: one email per order.
    assert_eq!(emails_sent(&brokers, &prefix), expected);
}
