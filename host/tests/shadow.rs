//! Shadow runs on a real broker, through `host shadow`: a candidate
//! payment handles live orders beside the serving one and nothing of it
//! leaves the host (read back by an independent consumer); promoted under
//! a stream of orders, no payment is lost or doubled; and a fixed build is
//! tried on the dead letters of a broken one without publishing anything.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rdkafka::message::Message as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use support::*;

/// Accepted by both v1 and v2.
const VISA: &str = "4242424242424242";
/// Authorized by v1, declined by v2 (`card_not_supported`).
const MASTERCARD: &str = "5555555555554444";

fn sha(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn order(card: &str) -> Value {
    json!({
        "customer": { "name": "Shadow", "email": "shadow@example.com" },
        "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
        "payment": { "card_number": card }
    })
}

/// `host shadow ARGS` against the host's admin API: its stdout.
fn shadow_cli(admin: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .arg("shadow")
        .args(args)
        .env("HOST_ADMIN_URL", admin)
        .env("HOST_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(output.status.success(), "host shadow {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn report(admin: &str) -> Value {
    serde_json::from_str(&shadow_cli(admin, &["status", "payment", "--json"])).unwrap()
}

/// Places `total` orders paid with `card`, `workers` at a time.
async fn place(gateway: &str, prefix: &str, card: &'static str, total: usize) -> Vec<String> {
    let (client, gateway, prefix) = (reqwest::Client::new(), gateway.to_owned(), prefix.to_owned());
    let placed = Arc::new(AtomicUsize::new(0));
    let orders = spawn_placing(16, total, placed, move |i| {
        let (client, gateway, key) = (client.clone(), gateway.clone(), format!("{prefix}-{i}"));
        async move {
            place_until_accepted(&client, &gateway, &key, &order(card)).await["order_id"].as_str().unwrap().to_owned()
        }
    });
    orders.await.unwrap().into_iter().map(|(_, id)| id).collect()
}

/// Every payment answer on the topic: order id → (type, producing version).
fn payment_answers(brokers: &str, topic: &str, expected: usize) -> HashMap<String, (String, String)> {
    let consumer = reader(brokers, &[topic]);
    let mut answers = HashMap::new();
    let mut idle = 0;
    while idle < 20 || answers.len() < expected && idle < 240 {
        let Some(message) = consumer.poll(Duration::from_millis(250)) else {
            idle += 1;
            continue;
        };
        idle = 0;
        let message = message.unwrap();
        let envelope = event_json(&headers_of(&message), message.payload().unwrap()).expect("a CloudEvent");
        let event_type = envelope["type"].as_str().unwrap();
        if event_type == "PaymentRequested" {
            continue;
        }
        let version = envelope["producer"].as_str().unwrap().strip_prefix("payment@").unwrap().to_owned();
        let order_id = envelope["order_id"].as_str().unwrap().to_owned();
        let previous = answers.insert(order_id.clone(), (event_type.to_owned(), version));
        assert!(previous.is_none(), "order {order_id} was paid twice");
    }
    answers
}

async fn settled(client: &reqwest::Client, stats_url: &str, total: u64) -> Value {
    eventually(Duration::from_secs(180), &format!("{total} orders settled and emailed"), || async {
        let s = get_json(client, stats_url).await?;
        let settled = s["orders_confirmed"].as_u64()? + s["orders_rejected"].as_u64()?;
        (settled == total && s["emails_sent"] == total).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_shadows_live_orders_keeps_its_effects_and_is_promoted_under_load() {
    let brokers = brokers();
    let dir = temp_dir("shadow");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let (v1, v2) = (sha(&component("payment")), sha(&component("payment-v2")));
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host).await;
    let (gateway, admin) = (format!("http://127.0.0.1:{}", ports.gateway), format!("http://127.0.0.1:{}", ports.admin));
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);

    let started = shadow_cli(&admin, &["start", "payment", component("payment-v2").to_str().unwrap()]);
    assert!(started.contains("shadow run of payment: running"), "{started}");
    // 2,000 orders both versions handle alike: no difference.
    let mut before = place(&gateway, "same", VISA, 2_000).await;
    settled(&client, &stats_url, 2_000).await;
    let same = eventually(Duration::from_secs(60), "the candidate to catch up", || async {
        let r = report(&admin);
        (r["events"]["compared"].as_u64()? + r["events"]["skipped"].as_u64()? >= 2_000).then_some(r)
    })
    .await;
    assert_eq!(same["events"]["differing"], 0, "{same:#}");
    assert_eq!(same["events"]["candidate_failed"], 0, "{same:#}");
    assert!(same["events"]["equal"].as_u64().unwrap() >= 1_900, "most were compared, few skipped: {same:#}");

    // Orders the candidate would decline: each difference names the field.
    before.extend(place(&gateway, "differ", MASTERCARD, 20).await);
    settled(&client, &stats_url, 2_020).await;
    let differ = eventually(Duration::from_secs(60), "20 differences", || async {
        let r = report(&admin);
        (r["events"]["differing"].as_u64()? + r["events"]["skipped"].as_u64()? >= 20).then_some(r)
    })
    .await;
    let first = &differ["differences"][0];
    assert_eq!(first["event_type"], "PaymentRequested", "{first:#}");
    let changes = first["changes"].as_array().unwrap();
    let change = |path: &str| changes.iter().find(|c| c["path"] == path).unwrap_or_else(|| panic!("{path}: {first:#}"));
    assert_eq!(
        (&change("outputs[0].type")["serving"], &change("outputs[0].type")["candidate"]),
        (&json!("PaymentAuthorized"), &json!("PaymentDeclined"))
    );
    assert_eq!(change("outputs[0].data.code")["candidate"], "card_not_supported");
    let text = shadow_cli(&admin, &["status", "payment"]);
    assert!(text.contains("outputs[0].type: \"PaymentAuthorized\" → \"PaymentDeclined\""), "{text}");

    // Promoted while orders stream in: every order is paid exactly once,
    // by v1 (authorized) before the switch, by v2 (declined) after.
    let stream = {
        let (gateway, prefix) = (gateway.clone(), prefix.clone());
        tokio::spawn(async move { place(&gateway, &format!("{prefix}-promote"), MASTERCARD, 400).await })
    };
    eventually(Duration::from_secs(60), "the stream under way", || async {
        let s = get_json(&client, &stats_url).await?;
        (s["orders_placed"].as_u64()? >= 2_120).then_some(())
    })
    .await;
    let promoted = shadow_cli(&admin, &["promote", "payment"]);
    assert!(promoted.contains("ended: promoted"), "{promoted}");
    stream.await.unwrap();
    settled(&client, &stats_url, 2_420).await;
    let answers = payment_answers(&brokers, &format!("{prefix}payments"), 2_420);
    assert_eq!(answers.len(), 2_420, "every order has exactly one payment answer");
    let mut by_version: HashMap<&str, usize> = HashMap::new();
    for (order_id, (event_type, version)) in &answers {
        assert!(*version == v1 || *version == v2, "order {order_id} answered by an unknown version {version}");
        let expected = if *version == v1 { "PaymentAuthorized" } else { "PaymentDeclined" };
        assert_eq!(event_type, expected, "order {order_id}");
        *by_version.entry(if *version == v1 { "v1" } else { "v2" }).or_default() += 1;
    }
    // The orders settled before the promotion were all answered by v1:
    // nothing of the candidate reached the topic while it was shadowing.
    for order_id in &before {
        assert_eq!(answers[order_id].1, v1, "order {order_id}, settled before the promotion");
    }
    assert!(by_version.get("v2").copied().unwrap_or(0) >= 1, "the promoted version served the rest: {by_version:?}");
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_build_handles_the_dead_letters_of_a_broken_one_and_publishes_nothing() {
    let brokers = brokers();
    let dir = temp_dir("shadow-dlq");
    let ports = Ports::free();
    let options = Options { wasm: vec![("payment".into(), component("payment-trap"))], ..Options::default() };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host).await;
    let (gateway, admin) = (format!("http://127.0.0.1:{}", ports.gateway), format!("http://127.0.0.1:{}", ports.admin));
    place(&gateway, "poison", VISA, 3).await;
    eventually(Duration::from_secs(120), "3 payment requests dead-lettered", || async {
        let listed: Value = client
            .get(format!("{admin}/dlq?component=payment"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (listed["dead_letters"].as_array()?.len() >= 3).then_some(())
    })
    .await;

    let tried = shadow_cli(&admin, &["replay-dlq", "payment", component("payment").to_str().unwrap(), "--json"]);
    let tried: Value = serde_json::from_str(&tried).unwrap();
    assert_eq!((tried["handled"].as_u64(), tried["failed"].as_u64()), (Some(3), Some(0)), "{tried:#}");
    for letter in tried["letters"].as_array().unwrap() {
        assert!(letter["reason"].as_str().unwrap().contains("trap"), "{letter:#}");
        assert_eq!(letter["outputs"][0]["type"], "PaymentAuthorized", "{letter:#}");
    }
    let text = shadow_cli(&admin, &["replay-dlq", "payment", component("payment").to_str().unwrap()]);
    assert!(text.contains("3 handled, 0 still fail, 0 not tried"), "{text}");
    // Nothing was published: no payment answer on the topic, and the dead
    // letters are not marked replayed.
    let answers = payment_answers(&brokers, &format!("{prefix}payments"), 0);
    assert!(answers.is_empty(), "the trial published {answers:?}");
    let listed: Value = client
        .get(format!("{admin}/dlq?component=payment"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let letters = listed["dead_letters"].as_array().unwrap();
    assert!(letters.iter().all(|l| l["replayed"].is_null()), "{listed:#}");
    drop(host);
}
