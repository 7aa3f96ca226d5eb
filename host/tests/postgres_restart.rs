//! PostgreSQL restarted under load, on a server of the test's own (started
//! with `scripts/postgres.sh` on a free port, so other tests keep theirs):
//! while it is down the components report it on `/health` and their events
//! wait, and the gateway refuses new orders (the card vault lives in the
//! database: 503, retried with the same Idempotency-Key); once it is back
//! every order settles, each fact once.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const ORDERS: usize = 600;

/// A PostgreSQL server of this test's own.
struct Server {
    home: std::path::PathBuf,
    port: u16,
}

impl Server {
    fn script(&self, action: &str) {
        let status = Command::new(repo().join("scripts/postgres.sh"))
            .arg(action)
            .env("PG_HOME_DIR", &self.home)
            .env("PG_PORT", self.port.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "scripts/postgres.sh {action} failed");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/shop", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn body(i: usize) -> Value {
    let card = if i.is_multiple_of(5) { "4000000000000002" } else { "4242424242424242" };
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": card }
    })
}

fn write_manifest_on(dir: &Path, ports: Ports, url: &str) -> (std::path::PathBuf, String) {
    let options = Options {
        postgres_schema: Some("shop".into()),
        order_config: r#"payment_deadline_ms = "120000""#.into(),
        ..Options::default()
    };
    let (manifest, prefix) = write_manifest_with(dir, ports, &options);
    // The test's own server instead of the shared one.
    let text = std::fs::read_to_string(&manifest).unwrap().replace(&database_url(), url);
    std::fs::write(&manifest, text).unwrap();
    (manifest, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_restarted_database_and_nothing_is_lost() {
    let brokers = brokers();
    let server = Server { home: std::env::temp_dir().join(format!("pg-restart-{}", free_port())), port: free_port() };
    server.script("start");
    let dir = temp_dir("pg-restart");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest_on(&dir, ports, &server.url());
    let _host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);

    let placed = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let placing = {
        let (client, gateway, refused) = (client.clone(), gateway.clone(), refused.clone());
        spawn_placing(4, ORDERS, placed.clone(), move |i| {
            let (client, gateway, refused) = (client.clone(), gateway.clone(), refused.clone());
            async move {
                // Until it is placed: while the database is down the vault
                // cannot keep the card, and the gateway says so (503
                // unavailable); the same key places the order once later.
                loop {
                    let response = client
                        .post(format!("{gateway}/order"))
                        .header("idempotency-key", format!("pg-restart-{i}"))
                        .json(&body(i))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let body: Value = response.json().await.unwrap();
                    if status == 202 {
                        // The point of this sleep: a steady load of about 60
                        // orders a second from the 4 clients.
                        tokio::time::sleep(Duration::from_millis(60)).await;
                        return body["order_id"].as_str().unwrap().to_owned();
                    }
                    assert_eq!(status, 503, "{body}");
                    assert!(
                        ["unavailable", "not_confirmed"].contains(&body["error"]["code"].as_str().unwrap()),
                        "{body}"
                    );
                    refused.fetch_add(1, Ordering::SeqCst);
                    // The pacing of a client told to come back later.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    };

    eventually(Duration::from_secs(60), "a quarter of the orders placed", || async {
        (placed.load(Ordering::SeqCst) >= ORDERS / 4).then_some(())
    })
    .await;
    server.script("stop");
    let stopped_at = placed.load(Ordering::SeqCst);
    // /health says why the component cannot go on.
    let health = format!("http://127.0.0.1:{}/health", ports.payment);
    let degraded = eventually(Duration::from_secs(30), "payment's /health to report the database", || async {
        let response = client.get(&health).send().await.ok()?;
        let code = response.status();
        let body: Value = response.json().await.ok()?;
        (code == 503 && body["status"] == "degraded" && body["state_error"].as_str()?.contains("PostgreSQL"))
            .then_some(body)
    })
    .await;
    eventually(Duration::from_secs(60), "the gateway to refuse orders while the database is down", || async {
        (refused.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .await;
    let restarted_at = placed.load(Ordering::SeqCst);
    server.script("start");
    let orders: Vec<String> = placing.await.unwrap().into_iter().map(|(_, id)| id).collect();
    eprintln!(
        "postgres restart: stopped after {stopped_at} orders, {} placed while down, {} refusals; health said {}",
        restarted_at - stopped_at,
        refused.load(Ordering::SeqCst),
        degraded["state_error"]
    );

    // Everything settles once the database is back.
    let mut finals = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &orders {
        let url = format!("{gateway}/order/{id}");
        let status =
            eventually(deadline.saturating_duration_since(Instant::now()), &format!("order {id} final"), || async {
                let order = get_json(&client, &url).await?;
                let status = order["status"].as_str()?;
                ["CONFIRMED", "REJECTED"].contains(&status).then(|| status.to_owned())
            })
            .await;
        finals.insert(id.clone(), status);
    }
    wait_healthy(&client, ports).await;

    // Each fact once on the topics, read by a client of our own (until
    // every saga's story is complete, or a minute has passed).
    let (topics, mut discrepancies) = converge(Duration::from_secs(60), || async {
        let topics = read_topics(&brokers, &prefix);
        let mut discrepancies: Vec<String> = finals
            .iter()
            .flat_map(|(id, status)| {
                saga_discrepancies(&topics, id, status).into_iter().map(move |d| format!("{status} order {id}: {d}"))
            })
            .collect();
        discrepancies.extend(topics.unexpected(|id| finals.contains_key(id)));
        (discrepancies.is_empty(), (topics, discrepancies))
    })
    .await;
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let stats = converge(Duration::from_secs(30), || async {
        let stats = get_json(&client, &stats_url).await.unwrap_or_default();
        (stats["orders_placed"] == json!(ORDERS) && stats["emails_sent"] == json!(ORDERS), stats)
    })
    .await;
    if stats["orders_placed"] != json!(ORDERS) || stats["emails_sent"] != json!(ORDERS) {
        discrepancies.push(format!("analytics: {stats}"));
    }
    eprintln!("postgres restart: {} records on the topics, {} discrepancies", topics.records, discrepancies.len());
    assert!(discrepancies.is_empty(), "{} discrepancies:\n{}", discrepancies.len(), discrepancies.join("\n"));
}
