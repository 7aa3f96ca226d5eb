//! Hot reload under load on a real broker: a continuous stream of 2,000
//! orders while the payment component is swapped five times between two
//! versions with different decline rules, once through each trigger (file
//! change, admin endpoint, `host reload`), then offered a version that does
//! not compile, one with the wrong world and one that traps on every event.
//!
//! The stream is paced by the test's steps, never by the machine's speed:
//! it places orders only as the test lets it ([`STEP`] at a time), and each
//! switch waits until the orders let through so far were placed and half of
//! the step was paid, so every version serves a share of them on every
//! partition, however fast or loaded the machine is. The trapping version
//! is offered once nothing is in flight, and meets the rest of the stream.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::message::Message as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use support::*;

const ORDERS: usize = 2_000;
/// Orders let through before each switch (a multiple of the stream's chunk of 8).
const STEP: usize = 256;
/// Authorized by v1, declined by v2 (`card_not_supported`).
const CARD: &str = "5555555555554444";

fn sha(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn replace_file(path: &Path, from: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn payment_version(client: &reqwest::Client, port: u16) -> Option<String> {
    let health: Value = client.get(format!("http://127.0.0.1:{port}/health")).send().await.ok()?.json().await.ok()?;
    health["version"].as_str().map(str::to_owned)
}

/// Orders analytics counts as confirmed or rejected.
async fn settled(client: &reqwest::Client, stats_url: &str) -> Option<u64> {
    let s: Value = client.get(stats_url).send().await.ok()?.json().await.ok()?;
    Some(s["orders_confirmed"].as_u64()? + s["orders_rejected"].as_u64()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_is_swapped_five_times_under_a_stream_of_orders() {
    let brokers = brokers();
    let dir = temp_dir("reload-load");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    // The payment component runs from a file of its own, so that the test
    // can change it on disk.
    let live = dir.join("payment.wasm");
    std::fs::copy(component("payment"), &live).unwrap();
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace(&component("payment").display().to_string(), &live.display().to_string());
    std::fs::write(&manifest, text).unwrap();
    let (v1, v2, trap) = (component("payment"), component("payment-v2"), component("payment-trap"));
    let (v1_sha, v2_sha) = (sha(&v1), sha(&v2));

    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    wait_healthy(&client, ports).await;

    // A stream of orders in the background, placing as many as it is let.
    let placed = Arc::new(AtomicUsize::new(0));
    let allowed = Arc::new(tokio::sync::Semaphore::new(0));
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let stream = {
        let (client, gateway, placed, allowed) = (client.clone(), gateway.clone(), placed.clone(), allowed.clone());
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(ORDERS);
            let body = json!({
                "customer": { "name": "Load", "email": "load@example.com" },
                "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
                "payment": { "card_number": CARD }
            });
            for chunk in 0..ORDERS / 8 {
                allowed.acquire_many(8).await.unwrap().forget();
                // A gateway that cannot confirm an order in time under load
                // answers 503: placed again with the same key, the same order.
                let keys: Vec<String> = (0..8).map(|i| format!("load-{chunk}-{i}")).collect();
                let batch = keys.iter().map(|key| place_until_accepted(&client, &gateway, key, &body));
                for answer in futures::future::join_all(batch).await {
                    ids.push(answer["order_id"].as_str().unwrap().to_owned());
                    placed.fetch_add(1, Ordering::SeqCst);
                }
            }
            ids
        })
    };

    let upload = |bytes: Vec<u8>| {
        let (client, admin) = (client.clone(), admin.clone());
        async move {
            let r = client
                .post(format!("{admin}/components/payment/reload"))
                .bearer_auth(ADMIN_TOKEN)
                .body(bytes)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let cli = |path: &Path| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
            .args(["reload", "payment"])
            .arg(path)
            .env("HOST_ADMIN_URL", &admin)
            .env("HOST_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    let mut file_to_serving = Vec::new();
    let mut expected_sequence = vec![v1_sha.clone()];
    let mut released = 0;
    for step in 0..5 {
        // Let a step of orders through, placed and half paid, then switch
        // while the rest of the step is in flight.
        allowed.add_permits(STEP);
        released += STEP;
        let target = released;
        eventually(Duration::from_secs(120), &format!("{target} orders placed, half the last step paid"), || async {
            let paid = settled(&client, &stats_url).await? as usize;
            (placed.load(Ordering::SeqCst) >= target && paid >= target - STEP / 2).then_some(())
        })
        .await;
        let (next, next_sha) = if step % 2 == 0 { (&v2, &v2_sha) } else { (&v1, &v1_sha) };
        match step {
            0 | 3 => {
                let started = Instant::now();
                replace_file(&live, next);
                eventually(Duration::from_secs(20), "the file change to be served", || async {
                    (payment_version(&client, ports.payment).await.as_ref() == Some(next_sha)).then_some(())
                })
                .await;
                file_to_serving.push(started.elapsed());
            }
            1 | 4 => {
                let (status, body) = upload(std::fs::read(next).unwrap()).await;
                assert_eq!(status, 200, "{body}");
            }
            _ => cli(next),
        }
        assert_eq!(payment_version(&client, ports.payment).await.as_ref(), Some(next_sha));
        expected_sequence.push(next_sha.clone());
    }

    // Nothing in flight before the bad versions: the first events the
    // trapping one meets are new payment requests (payment answers, which it
    // handles fine, would pass its canary before any request failed it).
    let payment_health = format!("http://127.0.0.1:{}/health", ports.payment);
    eventually(Duration::from_secs(120), "the orders so far settled and payment caught up", || async {
        let paid = settled(&client, &stats_url).await? as usize;
        let lag: u64 =
            get_json(&client, &payment_health).await?["lag"].as_object()?.values().filter_map(Value::as_u64).sum();
        (paid >= released && lag == 0).then_some(())
    })
    .await;
    // Bad versions, still under load: refused, or rolled back by the canary.
    let (status, body) = upload(b"\0asm garbage".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = upload(std::fs::read(component("not-a-service")).unwrap()).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("does not implement the world"), "{body}");
    assert_eq!(placed.load(Ordering::SeqCst), released, "the stream waits for the test");
    let (status, body) = upload(std::fs::read(&trap).unwrap()).await;
    assert_eq!(status, 200, "a trapping version compiles and instantiates: {body}");
    // The rest of the stream meets the trapping version, then its rollback.
    allowed.add_permits(ORDERS - released);
    let serving_before_trap = expected_sequence.last().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while payment_version(&client, ports.payment).await.as_ref() != Some(&serving_before_trap) {
        assert!(!stream.is_finished() || placed.load(Ordering::SeqCst) == ORDERS, "the stream stopped early");
        if Instant::now() > deadline {
            let health = client.get(format!("http://127.0.0.1:{}/health", ports.payment)).send().await;
            let health = match health {
                Ok(answer) => answer.text().await.unwrap_or_default(),
                Err(err) => err.to_string(),
            };
            let output = host.output();
            let tail: Vec<&str> = output.lines().rev().take(80).collect();
            panic!(
                "the trapping version was not rolled back within 60 s ({} orders placed); payment health {health}; host log, latest first:\n{}",
                placed.load(Ordering::SeqCst),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ids = stream.await.unwrap();
    assert_eq!(ids.len(), ORDERS);

    // Every order reaches a final state, matching the version that paid it.
    let stats = eventually(Duration::from_secs(120), "every order to settle", || async {
        let s: Value = client.get(&stats_url).send().await.ok()?.json().await.ok()?;
        // Settled, and the last email reported back to analytics.
        let settled = s["orders_confirmed"].as_u64()? + s["orders_rejected"].as_u64()? == ORDERS as u64;
        (settled && s["emails_sent"] == ORDERS).then_some(s)
    })
    .await;
    assert_eq!(stats["orders_placed"], ORDERS, "{stats}");
    assert_eq!(stats["emails_sent"], ORDERS, "{stats}");

    // Read the payments topic back: one answer per order, from v1 or v2 only.
    let consumer = reader(&brokers, &[&format!("{prefix}payments")]);
    let mut answers: HashMap<String, (String, String)> = HashMap::new();
    let mut runs: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let mut idle = 0;
    while idle < 20 {
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
        assert!(version == v1_sha || version == v2_sha, "payment event from an unexpected version {version}");
        let order_id = envelope["order_id"].as_str().unwrap().to_owned();
        let previous = answers.insert(order_id.clone(), (event_type.to_owned(), version.clone()));
        assert!(previous.is_none(), "order {order_id} was paid twice");
        let run = runs.entry(message.partition()).or_default();
        if run.last() != Some(&version) {
            run.push(version);
        }
    }
    assert_eq!(answers.len(), ORDERS, "every order has exactly one payment answer");
    for (order_id, (event_type, version)) in &answers {
        let expected = if *version == v1_sha { "PaymentAuthorized" } else { "PaymentDeclined" };
        assert_eq!(event_type, expected, "order {order_id} paid by {version}");
    }
    // The switch is visible at the right place: in each partition the
    // versions form runs in the order the reloads happened.
    for (partition, versions) in &runs {
        let mut schedule = expected_sequence.iter();
        assert!(
            versions.iter().all(|v| schedule.any(|s| s == v)),
            "partition {partition}: {versions:?} vs {expected_sequence:?}"
        );
        assert!(versions.len() >= 4, "partition {partition} saw too few switches: {versions:?}");
    }

    let list: Value =
        client.get(format!("{admin}/components")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    let history = list["payment"]["history"].as_array().unwrap();
    let outcomes: Vec<&str> = history.iter().map(|h| h["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("rejected")).count(), 2, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("rolled back")).count(), 1, "{outcomes:?}");
    let mut pauses: Vec<f64> = history.iter().filter_map(|h| h["pause_ms"].as_f64()).collect();
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "RELOAD FIGURES: {} switches; pause of processing around a swap: median {:.3} ms, worst {:.3} ms; file change to new version serving: {:?}",
        pauses.len(),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        file_to_serving
    );
    drop(host);
}
