//! End to end on a real Apache Kafka broker: the `host` binary with the four
//! components, orders placed over HTTP through the gateway, final states,
//! emails and analytics checked, the events read back by an independent
//! consumer, and a clean shutdown.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::message::Message as _;
use serde_json::{Value, json};
use support::*;

fn order(card: &str, quantity: u32) -> Value {
    json!({
        "customer": { "name": "Grace Hopper", "email": "grace@example.com" },
        "items": [ { "sku": "book", "quantity": quantity, "unit_price_cents": 1250 },
                   { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
        "payment": { "card_number": card }
    })
}

/// Reads every record of `topics` from the beginning with a consumer of our
/// own, independent of the host.
fn read_topics(brokers: &str, topics: &[String]) -> Vec<(String, Value)> {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let consumer = reader(brokers, &names);
    let mut records = Vec::new();
    let mut idle = 0;
    while idle < 20 {
        match consumer.poll(Duration::from_millis(250)) {
            Some(Ok(message)) => {
                idle = 0;
                let value = event_json(&headers_of(&message), message.payload().unwrap()).expect("a CloudEvent");
                records.push((message.topic().to_owned(), value));
            }
            Some(Err(err)) => panic!("reader failed: {err}"),
            None => idle += 1,
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_through_the_saga_on_real_kafka() {
    let brokers = brokers();
    let dir = temp_dir("e2e");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let mut host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);

    // Every port answers /health with 200 once its consumer has joined.
    for health in wait_healthy(&client, ports).await {
        assert_eq!(health["status"], "ok", "{health}");
    }
    let health = get_json(&client, &format!("http://127.0.0.1:{}/health", ports.payment)).await.unwrap();
    let wasm = std::fs::read(component("payment")).unwrap();
    assert_eq!(health["version"], hex_sha256(&wasm), "health shows the wasm sha256");
    assert_eq!(health["component"], "payment");

    // A bad order is refused with the fields named.
    let bad = client.post(format!("{gateway}/order")).json(&json!({"customer": {"name": "x"}})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    let fields: Vec<&str> =
        bad["error"]["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert!(
        fields.contains(&"customer.email") && fields.contains(&"items") && fields.contains(&"payment.card_number"),
        "{fields:?}"
    );

    // Accepted and declined cards.
    let cases = [
        ("4242 4242 4242 4242", 2, "CONFIRMED"),
        ("4000 0000 0000 0002", 1, "REJECTED"),
        ("4000000000009995", 3, "REJECTED"),
        ("5555555555554444", 1, "CONFIRMED"),
        ("4242424242424242", 500, "REJECTED"), // 6,251.99 is over the 5,000.00 limit
    ];
    let mut expected = HashMap::new();
    for (card, quantity, outcome) in cases {
        let response = client.post(format!("{gateway}/order")).json(&order(card, quantity)).send().await.unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        let total = 1250 * u64::from(quantity) + 199;
        assert_eq!(body["total_cents"], total);
        expected.insert(body["order_id"].as_str().unwrap().to_owned(), (outcome, total));
    }

    for (id, (outcome, _)) in &expected {
        let url = format!("{gateway}/order/{id}");
        let state = eventually(Duration::from_secs(30), &format!("order {id} to be {outcome}"), || async {
            let o = get_json(&client, &url).await?;
            (o["status"] != "PENDING").then_some(o)
        })
        .await;
        assert_eq!(state["status"], *outcome, "{state}");
        let mut steps: Vec<&str> =
            state["history"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
        steps.dedup();
        let expected_steps: &[&str] =
            if *outcome == "CONFIRMED" { &["PENDING", "STOCK_RESERVED", "CONFIRMED"] } else { &["PENDING", outcome] };
        assert_eq!(steps, expected_steps);
        assert!(state.get("card_number").is_none(), "the card number is never served");

        let emails_url = format!("http://127.0.0.1:{}/emails?order={id}", ports.email);
        let emails = eventually(Duration::from_secs(30), "the email", || async {
            let e = get_json(&client, &emails_url).await?;
            (!e.as_array()?.is_empty()).then_some(e)
        })
        .await;
        let emails = emails.as_array().unwrap();
        assert_eq!(emails.len(), 1, "exactly one email per order: {emails:?}");
        let kind = if *outcome == "CONFIRMED" { "order_confirmed" } else { "order_rejected" };
        assert_eq!((emails[0]["kind"].as_str(), emails[0]["to"].as_str()), (Some(kind), Some("grace@example.com")));
    }

    let confirmed: Vec<u64> = expected.values().filter(|(o, _)| *o == "CONFIRMED").map(|(_, t)| *t).collect();
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    // Analytics reads four topics with no order between them: wait for
    // every fact, each counted once.
    let expected_stats = json!({
        "emails_sent": 5, "orders_placed": 5, "orders_confirmed": confirmed.len(),
        "orders_rejected": 5 - confirmed.len(), "revenue_cents": confirmed.iter().sum::<u64>(), "payment_declines": 3,
    });
    eventually(Duration::from_secs(30), "analytics to count every fact", || async {
        let s = get_json(&client, &stats_url).await?;
        expected_stats.as_object().unwrap().iter().all(|(k, v)| s[k] == *v).then_some(s)
    })
    .await;

    // An independent client sees the saga on the four topics, each record
    // a CloudEvent in binary mode (`event_json` refuses anything else).
    let topics: Vec<String> =
        ["orders", "payments", "emails", "analytics"].iter().map(|t| format!("{prefix}{t}")).collect();
    let records = read_topics(&brokers, &topics);
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for (topic, envelope) in &records {
        assert!(envelope["source"].as_str().unwrap().starts_with("/shop/"), "{envelope}");
        assert!(expected.contains_key(envelope["order_id"].as_str().unwrap()), "{envelope}");
        assert!(topic.starts_with(&prefix));
        *by_type.entry(envelope["type"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for (event_type, count) in [
        ("OrderPlaced", 5),
        ("PaymentRequested", 5),
        ("PaymentAuthorized", 2),
        ("PaymentDeclined", 3),
        ("OrderConfirmed", 2),
        ("OrderRejected", 3),
        ("EmailRequested", 5),
        ("EmailSent", 5),
    ] {
        assert_eq!(by_type.get(event_type).copied().unwrap_or(0), count, "{event_type} in {by_type:?}");
    }
    let payment_events = records.iter().filter(|(_, e)| e["type"] == "PaymentAuthorized");
    for (_, e) in payment_events {
        assert_eq!(e["producer"], format!("payment@{}", hex_sha256(&wasm)), "events name the producing version");
        assert!(e["causation_id"].is_string() && e["correlation_id"].is_string());
    }

    // Graceful shutdown: exit 0, every port released.
    host.terminate();
    let status = host.wait(Duration::from_secs(40)).expect("host did not stop within 40 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}\n{}", host.output());
    for port in ports.all() {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} still bound after shutdown");
    }
    assert!(host.output().contains("host stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_named_and_fails_the_start() {
    let dir = temp_dir("port");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", ports.email)).unwrap();
    let mut host = HostProcess::start(&manifest, Some(&brokers()));
    let status = host.wait(Duration::from_secs(30)).expect("host should exit when a port is taken");
    assert!(!status.success());
    let output = host.output();
    assert!(output.contains(&format!("port {} for component \"email\" is already in use", ports.email)), "{output}");
    for port in [ports.gateway, ports.payment, ports.order] {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} left bound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_manifest_names_the_key_before_binding() {
    let dir = temp_dir("manifest");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let text = std::fs::read_to_string(&manifest).unwrap().replace("partitions = 3", "partitions = 3\npartition = 2");
    std::fs::write(&manifest, text).unwrap();
    let mut host = HostProcess::start(&manifest, Some(&brokers()));
    let status = host.wait(Duration::from_secs(20)).expect("host should exit on a bad manifest");
    assert!(!status.success());
    assert!(host.output().contains("unknown field `partition`"), "{}", host.output());
    assert!(std::net::TcpListener::bind(("127.0.0.1", ports.gateway)).is_ok());
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The first address of this machine that is not loopback, if any.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let output = std::process::Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|word| word.parse::<std::net::IpAddr>().ok())
        .find(|ip| !ip.is_loopback())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reload_swaps_a_component_while_orders_flow() {
    let brokers = brokers();
    let dir = temp_dir("reload");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let _host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    wait_healthy(&client, ports).await;

    // The admin API refuses a missing token and is bound to loopback only.
    let anonymous = client.get(format!("{admin}/components")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    if let Some(ip) = non_loopback_ip() {
        eprintln!("checking that the admin API is not reachable on {ip}");
        assert!(std::net::TcpStream::connect((ip, ports.admin)).is_err(), "admin API reachable on {ip}");
    }

    let reload = |args: Vec<String>| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
            .arg("reload")
            .args(args)
            .env("HOST_ADMIN_URL", &admin)
            .env("HOST_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let mut ids = Vec::new();
    let payment = component("payment");
    for round in 0..3 {
        for _ in 0..5 {
            let r = client.post(format!("{gateway}/order")).json(&order("4242424242424242", 1)).send().await.unwrap();
            assert_eq!(r.status(), 202);
            ids.push(r.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned());
        }
        let args =
            if round % 2 == 0 { vec!["payment".into()] } else { vec!["payment".into(), payment.display().to_string()] };
        let (ok, output) = reload(args);
        assert!(ok, "{output}");
        assert!(output.contains(&hex_sha256(&std::fs::read(&payment).unwrap())), "{output}");
    }
    let (ok, output) = reload(vec!["payment".into(), component("analytics").display().to_string() + ".missing"]);
    assert!(!ok && output.contains("cannot read"), "{output}");
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"garbage").unwrap();
    let (ok, output) = reload(vec!["payment".into(), garbage.display().to_string()]);
    assert!(!ok && output.contains("not a valid Wasm component"), "{output}");

    for id in &ids {
        let url = format!("{gateway}/order/{id}");
        let state = eventually(Duration::from_secs(30), "final state", || async {
            let o = get_json(&client, &url).await?;
            (o["status"] != "PENDING").then_some(o)
        })
        .await;
        assert_eq!(state["status"], "CONFIRMED");
    }
    let list: Value =
        client.get(format!("{admin}/components")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    let outcomes: Vec<&str> =
        list["payment"]["history"].as_array().unwrap().iter().map(|h| h["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "serving").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.len(), 5, "initial + 3 reloads + 1 rejected: {outcomes:?}");
    assert!(outcomes.last().unwrap().starts_with("rejected"), "{outcomes:?}");
}
