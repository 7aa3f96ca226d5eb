//! Hot reload under load on a real broker: a continuous stream of 2,000
//! orders while the payment component is swapped five times between two
//! versions with different decline rules, once through each trigger (file
//! change, admin endpoint, `host reload`), then offered a version that does
//! not compile, one with the wrong world and one that traps on every event.

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

    // A steady stream of orders in the background.
    let placed = Arc::new(AtomicUsize::new(0));
    let stream = {
        let (client, gateway, placed) = (client.clone(), gateway.clone(), placed.clone());
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(ORDERS);
            let body = json!({
                "customer": { "name": "Load", "email": "load@example.com" },
                "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
                "payment": { "card_number": CARD }
            });
            for chunk in 0..ORDERS / 8 {
                let batch = (0..8).map(|_| client.post(format!("{gateway}/order")).json(&body).send());
                for response in futures::future::join_all(batch).await {
                    let response = response.unwrap();
                    assert_eq!(response.status(), 202, "chunk {chunk}");
                    ids.push(response.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned());
                    placed.fetch_add(1, Ordering::SeqCst);
                }
                // The point of this sleep: pacing, so that the stream goes on
                // for the whole reload schedule.
                tokio::time::sleep(Duration::from_millis(20)).await;
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
    for step in 0..5 {
        // Let some orders through between switches.
        let target = (placed.load(Ordering::SeqCst) + 250).min(ORDERS - 100);
        eventually(Duration::from_secs(60), &format!("{target} orders placed"), || async {
            (placed.load(Ordering::SeqCst) >= target).then_some(())
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

    // Bad versions, still under load: refused, or rolled back by the canary.
    let (status, body) = upload(b"\0asm garbage".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = upload(std::fs::read(component("not-a-service")).unwrap()).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("does not implement the world"), "{body}");
    assert!(placed.load(Ordering::SeqCst) < ORDERS - 50, "the stream ended before the trapping version was offered");
    let (status, body) = upload(std::fs::read(&trap).unwrap()).await;
    assert_eq!(status, 200, "a trapping version compiles and instantiates: {body}");
    let serving_before_trap = expected_sequence.last().unwrap().clone();
    eventually(Duration::from_secs(60), "the trapping version to be rolled back", || async {
        (payment_version(&client, ports.payment).await? == serving_before_trap).then_some(())
    })
    .await;

    let ids = stream.await.unwrap();
    assert_eq!(ids.len(), ORDERS);

    // Every order reaches a final state, matching the version that paid it.
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
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
        let envelope: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
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
