//! The saga's paths end to end on a real broker, through the gateway:
//! confirmation, rejection, compensation when stock runs out after payment,
//! cancellation when payment misses its deadline (and no late charge); then
//! every event delivered twice, and events of one order arriving out of
//! order.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use shop_host::envelope::Envelope;
use support::*;

fn order(sku: &str, card: &str) -> Value {
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": sku, "quantity": 2, "unit_price_cents": 1250 } ],
        "payment": { "card_number": card }
    })
}

async fn place(client: &reqwest::Client, ports: Ports, body: &Value) -> String {
    let response = client.post(format!("http://127.0.0.1:{}/order", ports.gateway)).json(body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned()
}

/// Waits until the order is in `status` with no compensation outstanding.
async fn settled(client: &reqwest::Client, ports: Ports, id: &str, status: &str) -> Value {
    let url = format!("http://127.0.0.1:{}/order/{id}", ports.gateway);
    eventually(Duration::from_secs(60), &format!("order {id} to be {status}"), || async {
        let o = get_json(client, &url).await?;
        (o["status"] == status && o["compensation"]["done"] != false).then_some(o)
    })
    .await
}

/// The statuses the order went through (a step that only adds a note keeps
/// the status, so repeats are collapsed).
fn steps(order: &Value) -> Vec<String> {
    let mut steps: Vec<String> =
        order["history"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap().to_owned()).collect();
    steps.dedup();
    steps
}

async fn ledger(client: &reqwest::Client, ports: Ports, id: &str) -> Value {
    get_json(client, &format!("http://127.0.0.1:{}/payments/{id}", ports.payment)).await.unwrap_or(Value::Null)
}

/// The kinds of the emails sent for order `id` once the app of `manifest`
/// has handled everything on its topics: a second email, if one were
/// coming, would be among them.
async fn email_kinds(client: &reqwest::Client, ports: Ports, manifest: &Path, id: &str) -> Vec<String> {
    let url = format!("http://127.0.0.1:{}/emails?order={id}", ports.email);
    eventually(Duration::from_secs(30), "an email", || async {
        let e = get_json(client, &url).await?;
        (!e.as_array()?.is_empty()).then_some(e)
    })
    .await;
    wait_caught_up(&brokers(), manifest).await;
    let emails = get_json(client, &url).await.unwrap();
    emails.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect()
}

fn ops(ledger: &Value, kind: &str) -> usize {
    ledger["operations"].as_array().map_or(0, |ops| ops.iter().filter(|op| op["kind"] == kind).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_rejection_and_compensation_through_the_gateway() {
    let dir = temp_dir("saga");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let _host = HostProcess::start(&manifest, Some(&brokers()));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;

    let good = place(&client, ports, &order("book", "4242424242424242")).await;
    let declined = place(&client, ports, &order("book", "4000000000000002")).await;
    let sold_out = place(&client, ports, &order("sold-out", "4242424242424242")).await;

    let confirmed = settled(&client, ports, &good, "CONFIRMED").await;
    assert_eq!(steps(&confirmed), ["PENDING", "STOCK_RESERVED", "CONFIRMED"], "{confirmed}");
    let notes: Vec<&str> =
        confirmed["history"].as_array().unwrap().iter().map(|s| s["note"].as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.contains("authorized")), "payment authorized is a step: {notes:?}");
    for step in confirmed["history"].as_array().unwrap() {
        assert!(step["at_ms"].as_u64().unwrap() > 1_700_000_000_000, "steps carry timestamps: {step}");
    }
    let paid = ledger(&client, ports, &good).await;
    assert_eq!((ops(&paid, "capture"), paid["captured_cents"].as_u64(), ops(&paid, "refund")), (1, Some(2500), 0));
    assert_eq!(email_kinds(&client, ports, &manifest, &good).await, ["order_confirmed"]);

    let rejected = settled(&client, ports, &declined, "REJECTED").await;
    assert_eq!(steps(&rejected), ["PENDING", "REJECTED"], "{rejected}");
    assert_eq!(ops(&ledger(&client, ports, &declined).await, "capture"), 0);
    assert_eq!(email_kinds(&client, ports, &manifest, &declined).await, ["order_rejected"]);

    // Paid, then no stock: the payment is refunded before the order is cancelled.
    let cancelled = settled(&client, ports, &sold_out, "CANCELLED").await;
    let path = steps(&cancelled);
    assert_eq!(path.first().map(String::as_str), Some("PENDING"));
    assert!(path.contains(&"COMPENSATING".to_owned()), "{cancelled}");
    assert_eq!(path.last().map(String::as_str), Some("CANCELLED"));
    assert_eq!(cancelled["compensation"]["kind"], "refund", "{cancelled}");
    let refunded = ledger(&client, ports, &sold_out).await;
    assert_eq!((ops(&refunded, "capture"), ops(&refunded, "refund")), (1, 1), "{refunded}");
    assert_eq!(refunded["captured_cents"], refunded["refunded_cents"], "{refunded}");
    assert_eq!(email_kinds(&client, ports, &manifest, &sold_out).await, ["order_cancelled"]);

    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    // Analytics reads four topics with no order between them: wait for all
    // the facts, then check nothing else was counted.
    let expected = json!({
        "emails_sent": 3, "payments_refunded": 1, "orders_confirmed": 1, "orders_rejected": 1,
        "orders_cancelled": 1, "revenue_cents": 2500,
    });
    let stats = eventually(Duration::from_secs(30), "analytics", || async {
        let s = get_json(&client, &stats_url).await?;
        expected.as_object().unwrap().iter().all(|(k, v)| s[k] == *v).then_some(s)
    })
    .await;
    assert_eq!(stats["orders_placed"], 3, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_payment_deadline_cancels_and_the_late_payment_is_never_charged() {
    let brokers = brokers();
    let dir = temp_dir("deadline");
    let ports = Ports::free();
    // First without the payment service: nobody answers.
    let mut options = Options {
        without: vec!["payment"],
        order_config: r#"payment_deadline_ms = "1500", compensation_retry_ms = "500""#.into(),
        ..Options::default()
    };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let mut host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_ports_healthy(&client, &ports.serving(&options)).await;
    let id = place(&client, ports, &order("book", "4242424242424242")).await;
    let url = format!("http://127.0.0.1:{}/order/{id}", ports.gateway);
    let cancelled = eventually(Duration::from_secs(30), "the deadline to cancel the order", || async {
        let o = get_json(&client, &url).await?;
        (o["status"] == "CANCELLED").then_some(o)
    })
    .await;
    assert_eq!(cancelled["compensation"]["kind"], "void", "{cancelled}");
    assert_eq!(cancelled["compensation"]["done"], false, "nobody confirmed the void yet: {cancelled}");

    // The void is sent again while nobody answers (500 ms, then 1 s later)...
    let retried = eventually(Duration::from_secs(20), "the void to be sent a third time", || async {
        let o = get_json(&client, &url).await?;
        (o["compensation"]["attempts"].as_u64()? >= 3).then_some(o)
    })
    .await;
    let notes =
        retried["history"].as_array().unwrap().iter().filter(|s| s["note"] == "void requested again (attempt 3)");
    assert_eq!(notes.count(), 1, "{retried}");
    assert_eq!(retried["compensation"]["done"], false, "{retried}");

    // ...then payment comes back (a restart with it), finds the request
    // past its deadline, charges nothing and confirms the void.
    host.terminate();
    assert!(host.wait(Duration::from_secs(40)).is_some_and(|s| s.success()), "{}", host.output());
    options.without.clear();
    options.prefix = Some(prefix);
    let (manifest, _) = write_manifest_with(&dir, ports, &options);
    let _host = HostProcess::start(&manifest, Some(&brokers));
    wait_healthy(&client, ports).await;
    let done = settled(&client, ports, &id, "CANCELLED").await;
    assert_eq!(done["compensation"]["done"], true, "{done}");
    let entry = ledger(&client, ports, &id).await;
    assert_eq!((ops(&entry, "capture"), entry["captured_cents"].as_u64()), (0, Some(0)), "{entry}");
    // The cancellation email goes once the void is confirmed, and says what
    // the void found: nothing was charged.
    assert_eq!(email_kinds(&client, ports, &manifest, &id).await, ["order_cancelled"], "exactly one email");
    let emails = get_json(&client, &format!("http://127.0.0.1:{}/emails?order={id}", ports.email)).await.unwrap();
    let body = emails[0]["body"].as_str().unwrap();
    assert!(body.contains("You have not been charged"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_delivered_twice_changes_nothing() {
    let brokers = brokers();
    let dir = temp_dir("twice");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let _host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let stop = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicU64::new(0));
    let topics = ["orders", "payments", "emails", "analytics"].iter().map(|t| format!("{prefix}{t}")).collect();
    let duplicator = {
        let (brokers, stop, injected) = (brokers.clone(), stop.clone(), injected.clone());
        std::thread::spawn(move || duplicate_everything(brokers, topics, stop, injected))
    };

    let kinds = [
        ("book", "4242424242424242", "CONFIRMED"),
        ("book", "4000000000000002", "REJECTED"),
        ("sold-out", "4242424242424242", "CANCELLED"),
    ];
    let mut orders = Vec::new();
    for i in 0..30 {
        let (sku, card, status) = kinds[i % 3];
        orders.push((place(&client, ports, &order(sku, card)).await, status));
    }
    for (id, status) in &orders {
        let settled = settled(&client, ports, id, status).await;
        let expected_steps: &[&str] = match *status {
            "CONFIRMED" => &["PENDING", "STOCK_RESERVED", "CONFIRMED"],
            "REJECTED" => &["PENDING", "REJECTED"],
            _ => &["PENDING", "COMPENSATING", "CANCELLED"],
        };
        let path: Vec<String> = steps(&settled);
        let path: Vec<&str> = path.iter().map(String::as_str).filter(|s| expected_steps.contains(s)).collect();
        let mut dedup = path.clone();
        dedup.dedup();
        assert_eq!(dedup, expected_steps, "order {id}: {settled}");
        assert_eq!(email_kinds(&client, ports, &manifest, id).await, [format!("order_{}", status.to_lowercase())]);
        let entry = ledger(&client, ports, id).await;
        assert!(ops(&entry, "capture") <= 1 && ops(&entry, "refund") <= 1, "{entry}");
    }
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let expected = json!({
        "orders_placed": 30, "orders_confirmed": 10, "orders_rejected": 10, "orders_cancelled": 10,
        "revenue_cents": 25_000, "emails_sent": 30, "payments_refunded": 10, "payment_declines": 10,
    });
    let stats = eventually(Duration::from_secs(30), "analytics to converge", || async {
        let s = get_json(&client, &stats_url).await?;
        expected.as_object().unwrap().iter().all(|(k, v)| s[k] == *v).then_some(s)
    })
    .await;
    // Every event was copied, and the copies were delivered and dropped by id.
    let dropped = eventually(Duration::from_secs(30), "the copies to be made and dropped", || async {
        let mut dropped = 0;
        for port in [ports.payment, ports.order, ports.email, ports.analytics] {
            dropped +=
                get_json(&client, &format!("http://127.0.0.1:{port}/health")).await?["duplicates_dropped"].as_u64()?;
        }
        // 200 originals: 6 events for each confirmed or rejected order, 8 for
        // each cancelled one (more when a re-publication or a retry adds
        // some). Analytics reads every topic, so each copy is dropped at
        // least once.
        let injected = injected.load(Ordering::SeqCst);
        (injected >= 10 * 6 + 10 * 6 + 10 * 8 && dropped >= injected).then_some(dropped)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    duplicator.join().unwrap();
    let injected = injected.load(Ordering::SeqCst);
    eprintln!("{injected} duplicates injected, {dropped} dropped by id; stats {stats}");
    let again = get_json(&client, &stats_url).await.unwrap();
    assert!(expected.as_object().unwrap().iter().all(|(k, v)| again[k] == *v), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_order_arriving_out_of_order_converge() {
    let brokers = brokers();
    let dir = temp_dir("reorder");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let _host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let send = |topic: &str, envelope: &Envelope| {
        let value = envelope.value();
        let topic = format!("{prefix}{topic}");
        let record = BaseRecord::to(&topic).key(&envelope.order_id).payload(&value).headers(ce_headers(envelope));
        producer.send(record).unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    let placed = |id: &str| {
        json!({
            "order_id": id, "customer": { "name": "Ada", "email": "ada@example.com" },
            "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
            "total_cents": 1250, "card": { "token": "tok_never_deposited", "brand": "visa", "last4": "4242" },
        })
    };

    // The payment's answer reaches the order service before the order. Its
    // payment id is one the payment service would never make, so the
    // confirmed order shows whether the buffered answer was applied.
    let early = format!("early-{}", uuid::Uuid::new_v4().simple());
    let payment_id = format!("pay_buffered_{early}");
    let authorized = json!({ "order_id": early, "payment_id": payment_id, "amount_cents": 1250, "card_last4": "4242" });
    send("payments", &Envelope::originate("PaymentAuthorized", &early, "test", 1, authorized));
    let order_health = format!("http://127.0.0.1:{}/health", ports.order);
    eventually(Duration::from_secs(30), "the order service to handle the early answer", || async {
        (get_json(&client, &order_health).await?["handled"].as_u64()? >= 1).then_some(())
    })
    .await;
    assert!(get_json(&client, &format!("http://127.0.0.1:{}/order/{early}", ports.gateway)).await.is_none());
    send("orders", &Envelope::originate("OrderPlaced", &early, "test", 2, placed(&early)));
    let confirmed = settled(&client, ports, &early, "CONFIRMED").await;
    assert_eq!(confirmed["payment_id"], json!(payment_id), "the buffered answer was applied: {confirmed}");
    assert_eq!(email_kinds(&client, ports, &manifest, &early).await, ["order_confirmed"], "{confirmed}");

    // A void reaches the payment service before the request it voids.
    let voided = format!("voided-{}", uuid::Uuid::new_v4().simple());
    let void = json!({ "order_id": voided, "reason": "deadline passed" });
    send("payments", &Envelope::originate("PaymentVoidRequested", &voided, "test", 1, void));
    let card = json!({ "token": "tok_never_deposited", "brand": "visa", "last4": "4242" });
    let request = json!({ "order_id": voided, "amount_cents": 1250, "card": card });
    send("payments", &Envelope::originate("PaymentRequested", &voided, "test", 2, request));
    let url = format!("http://127.0.0.1:{}/payments/{voided}", ports.payment);
    let entry = eventually(Duration::from_secs(30), "the request to be refused", || async {
        let e = get_json(&client, &url).await?;
        e["operations"].as_array()?.iter().any(|op| op["kind"] == "decline").then_some(e)
    })
    .await;
    assert_eq!((ops(&entry, "capture"), entry["captured_cents"].as_u64()), (0, Some(0)), "{entry}");

    // Analytics sees an order's outcome and email before the order itself.
    let late = format!("late-{}", uuid::Uuid::new_v4().simple());
    let sent = json!({ "order_id": late, "email_id": "x", "kind": "order_confirmed", "to": "a@b.c", "subject": "s" });
    send("analytics", &Envelope::originate("EmailSent", &late, "test", 1, sent));
    let outcome = json!({ "order_id": late, "total_cents": 1250, "payment_id": "p" });
    send("orders", &Envelope::originate("OrderConfirmed", &late, "test", 2, outcome));
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let before = eventually(Duration::from_secs(30), "analytics to count the early facts", || async {
        let s = get_json(&client, &stats_url).await?;
        (s["orders_confirmed"] == 2).then_some(s)
    })
    .await;
    // Its card token was never deposited (the order bypasses the gateway),
    // so its payment's authorization is injected, and handled, first.
    let authorized = json!({ "order_id": late, "payment_id": "p", "amount_cents": 1250, "card_last4": "4242" });
    send("payments", &Envelope::originate("PaymentAuthorized", &late, "test", 3, authorized));
    wait_caught_up(&brokers, &manifest).await;
    send("orders", &Envelope::originate("OrderPlaced", &late, "test", 4, placed(&late)));
    // The late OrderPlaced starts its own saga (the analytics facts above
    // were injected, not produced by it); once it settles, each fact counts once.
    settled(&client, ports, &late, "CONFIRMED").await;
    let stats = eventually(Duration::from_secs(30), "analytics to converge", || async {
        let s = get_json(&client, &stats_url).await?;
        (s["orders_placed"] == 2 && s["emails_sent"] == 2).then_some(s)
    })
    .await;
    assert_eq!(stats["orders_confirmed"], 2, "the late order's confirmation counted once: {before} then {stats}");
    assert_eq!(stats["revenue_cents"], 2500, "{stats}");
}
