//! Issue 23, items 1 and 2, end to end on a real broker through the gateway:
//! the client's price is refused and the stock untouched; then, after orders
//! paid with several cards, an independent reader of every topic and the
//! dead-letter topic, the host's log and the state (redb files, PostgreSQL
//! tables) finds no card number, while payment still authorizes and declines.

mod support;

use std::path::Path;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use serde_json::{Value, json};
use support::*;

/// Three lamps in stock, as app.toml has them.
fn lamps() -> Options {
    Options { order_config: r#"stock = "lamp=3""#.into(), ..Options::default() }
}

/// The cards paid with, as typed, and the outcome each gets.
const CARDS: [(&str, &str); 5] = [
    ("4242 4242 4242 4242", "CONFIRMED"),
    ("4000-0000-0000-0002", "REJECTED"),
    ("4000000000009995", "REJECTED"),
    ("5555 5555 5555 4444", "CONFIRMED"),
    ("3782 822463 10005", "CONFIRMED"),
];

fn digits(card: &str) -> String {
    card.chars().filter(char::is_ascii_digit).collect()
}

fn order(sku: &str, quantity: u32, price: Option<u64>, card: &str) -> Value {
    let mut item = json!({ "sku": sku, "quantity": quantity });
    if let Some(price) = price {
        item["unit_price_cents"] = json!(price);
    }
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [item],
        "payment": { "card_number": card }
    })
}

async fn post(client: &reqwest::Client, ports: Ports, body: &Value) -> (u16, Value) {
    let response = client.post(format!("http://127.0.0.1:{}/order", ports.gateway)).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn settled(client: &reqwest::Client, ports: Ports, id: &str) -> Value {
    let url = format!("http://127.0.0.1:{}/order/{id}", ports.gateway);
    eventually(Duration::from_secs(60), &format!("order {id} to settle"), || async {
        let o = get_json(client, &url).await?;
        ["CONFIRMED", "REJECTED", "CANCELLED"].contains(&o["status"].as_str()?).then_some(o)
    })
    .await
}

async fn lamps_left(client: &reqwest::Client, ports: Ports) -> Value {
    get_json(client, &format!("http://127.0.0.1:{}/stock/lamp", ports.order)).await.unwrap()["remaining"].clone()
}

/// Places the issue's one-cent lamps (refused), then an order per card;
/// checks each outcome. Returns the ids.
async fn orders(client: &reqwest::Client, ports: Ports) -> Vec<String> {
    let catalog = get_json(client, &format!("http://127.0.0.1:{}/catalog", ports.gateway)).await.unwrap();
    let lamp = catalog["items"].as_array().unwrap().iter().find(|i| i["sku"] == "lamp").unwrap().clone();
    assert_eq!((lamp["unit_price_cents"].as_u64(), lamp["remaining"].as_u64()), (Some(3400), Some(3)), "{catalog}");

    // Three lamps at one cent each would have bought them all out.
    let (status, body) = post(client, ports, &order("lamp", 3, Some(1), "4242424242424242")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("price_mismatch")), "{body}");
    assert!(body["error"]["fields"][0]["message"].as_str().unwrap().contains("3400"), "{body}");
    assert_eq!(lamps_left(client, ports).await, json!(3), "stock untouched");

    let mut ids = Vec::new();
    for (card, outcome) in CARDS {
        let (status, body) = post(client, ports, &order("book", 1, None, card)).await;
        assert_eq!((status, body["total_cents"].as_u64()), (202, Some(1250)), "{body}");
        let id = body["order_id"].as_str().unwrap().to_owned();
        let settled = settled(client, ports, &id).await;
        assert_eq!(settled["status"], outcome, "{card}: {settled}");
        assert_eq!(settled["card"]["last4"].as_str(), Some(&digits(card)[digits(card).len() - 4..]), "{settled}");
        ids.push(id);
    }
    // A lamp at its price sells, and only then does the stock move.
    let (status, body) = post(client, ports, &order("lamp", 1, Some(3400), "4242424242424242")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(settled(client, ports, &id).await["status"], "CONFIRMED");
    assert_eq!(lamps_left(client, ports).await, json!(2));
    ids.push(id);
    ids
}

/// Every record of the app's topics and the dead-letter topic, read by a
/// consumer of our own: keys, headers and values, as bytes.
fn every_record(prefix: &str, expected: usize) -> Vec<Vec<u8>> {
    use rdkafka::consumer::Consumer as _;
    let names: Vec<String> =
        ["orders", "payments", "emails", "analytics", "dead-letters"].iter().map(|t| format!("{prefix}{t}")).collect();
    let topics: Vec<&str> = names.iter().map(String::as_str).collect();
    let reader = reader(&brokers(), &topics);
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut quiet_since = std::time::Instant::now();
    // Until at least `expected` records came and nothing more for 3 s.
    while std::time::Instant::now() < deadline
        && (records.len() < expected || quiet_since.elapsed() < Duration::from_secs(3))
    {
        let Some(Ok(message)) = reader.poll(Duration::from_millis(200)) else { continue };
        quiet_since = std::time::Instant::now();
        let mut bytes = message.key().unwrap_or_default().to_vec();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                bytes.extend_from_slice(header.key.as_bytes());
                bytes.extend_from_slice(header.value.unwrap_or_default());
            }
        }
        bytes.extend_from_slice(message.payload().unwrap_or_default());
        records.push(bytes);
    }
    reader.unsubscribe();
    assert!(records.len() >= expected, "read {} records, expected at least {expected}", records.len());
    records
}

/// Every file under `dir`, as bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    found
}

/// Whether `haystack` holds any card number, as typed or as digits.
fn card_in(haystack: &[u8]) -> Option<&'static str> {
    CARDS.iter().map(|(card, _)| *card).find(|card| {
        [digits(card), (*card).to_owned()].iter().any(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
    })
}

fn assert_no_card(what: &str, bytes: &[u8]) {
    if let Some(card) = card_in(bytes) {
        panic!("card {card} found in {what}: {}", String::from_utf8_lossy(bytes));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_are_the_shops_and_no_card_number_rests_anywhere_redb() {
    let dir = temp_dir("trust");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest_with(&dir, ports, &lamps());
    // The key from the state directory (created 0600 at first start), as on
    // one host; debug logs, so that more of what the host does is logged.
    let env = [("HOST_VAULT_KEY", ""), ("RUST_LOG", "info,shop_host=debug,gateway=debug,component=trace")];
    let host = HostProcess::start_env(&manifest, Some(&brokers()), &[], &env);
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let ids = orders(&client, ports).await;
    wait_caught_up(&brokers(), &manifest).await;

    // Every order: OrderPlaced, a payment request and answer, outcome, email...
    let records = every_record(&prefix, ids.len() * 5);
    let tokens = records.iter().filter(|r| r.windows(4).any(|w| w == b"tok_")).count();
    assert!(tokens >= ids.len() * 2, "OrderPlaced and PaymentRequested carry tokens: {tokens}");
    for record in records {
        assert_no_card("a record", &record);
    }
    let output = host.output();
    assert!(output.contains("card vault open"), "the vault is opened");
    assert_no_card("the host's log", output.as_bytes());
    let state = files(&dir.join("state"));
    let tables = state.iter().filter(|(path, _)| path.ends_with(".redb")).map(|(_, bytes)| bytes).collect::<Vec<_>>();
    assert!(tables.iter().any(|b| b.windows(6).any(|w| w == b"@vault")), "the vault's tables are in the state");
    for (path, bytes) in &state {
        assert_no_card(path, bytes);
    }
    let key = std::fs::metadata(dir.join("state").join("vault.key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600);
    // The order component's port: no token; the public view: no customer.
    let mine = get_json(&client, &format!("http://127.0.0.1:{}/order/{}", ports.gateway, ids[0])).await.unwrap();
    assert!(mine.get("customer").is_none() && mine.get("request_hash").is_none(), "{mine}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_card_number_rests_in_the_postgres_tables() {
    let schema = fresh_schema();
    let dir = temp_dir("trust-pg");
    let ports = Ports::free();
    let options = Options { postgres_schema: Some(schema.clone()), ..lamps() };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let host = HostProcess::start_env(&manifest, Some(&brokers()), &[], &[]);
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let ids = orders(&client, ports).await;
    wait_caught_up(&brokers(), &manifest).await;
    for record in every_record(&prefix, ids.len() * 5) {
        assert_no_card("a record", &record);
    }
    assert_no_card("the host's log", host.output().as_bytes());

    let (db, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let tables = db
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1", &[&schema])
        .await
        .unwrap();
    assert!(!tables.is_empty());
    let mut vault_rows = 0;
    for table in tables {
        let name: String = table.get(0);
        for row in db.query(&format!("SELECT t::text FROM {schema}.{name} t"), &[]).await.unwrap() {
            let text: String = row.get(0);
            vault_rows += usize::from(text.contains("@vault"));
            assert_no_card(&format!("table {name}"), text.as_bytes());
        }
    }
    assert!(vault_rows >= ids.len(), "the vault's entries are in the shared tables ({vault_rows} rows)");
    drop(host);
    drop_schema(&schema).await;
    let _ = std::fs::remove_dir_all(dir);
}
