//! Scale-out on a real broker and a real PostgreSQL: three hosts of one
//! app, each serving a different subset of it, share the work through
//! Kafka's consumer groups and the state through PostgreSQL.
//!
//! - A: gateway, order, analytics
//! - B: gateway (without the order component: it reads the shared state),
//!   payment, email
//! - C: order, payment, analytics
//!
//! 2,000 orders go in through both gateways; C is SIGKILLed mid-stream, its
//! partitions move to A and B, and it is restarted later. Then every order
//! must be final once, both gateways must agree, an independent reader of
//! the topics must find each fact once (no double capture, no double email,
//! nothing lost, no dead letter), the lamps sold across two order hosts must
//! be exactly the stock, and analytics (on two hosts) must add up.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const ORDERS: usize = 2_000;
/// Units of `lamp` in stock; far more orders want one.
const LAMPS: u64 = 25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    Declined,
    Lamp,
}

fn kind(i: usize) -> Kind {
    match i % 10 {
        0 => Kind::Declined,
        1 | 2 => Kind::Lamp,
        _ => Kind::Good,
    }
}

fn order_body(kind: Kind) -> Value {
    let (sku, price) = if kind == Kind::Lamp { ("lamp", 3400) } else { ("book", 1250) };
    let card = if kind == Kind::Declined { "4000000000000002" } else { "4242424242424242" };
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": sku, "quantity": 1, "unit_price_cents": price } ],
        "payment": { "card_number": card }
    })
}

/// Places order `i` through `gateway` until accepted: its id.
async fn place(client: &reqwest::Client, gateway: &str, i: usize) -> String {
    let body = place_until_accepted(client, gateway, &format!("scale-{i}"), &order_body(kind(i))).await;
    body["order_id"].as_str().unwrap().to_owned()
}

/// One host: its manifest (its own ports and state directory, the app's
/// topics and schema) and what it serves.
struct Host {
    manifest: std::path::PathBuf,
    ports: Ports,
    args: Vec<&'static str>,
    /// Ports that answer `/health` when it is up.
    serving: Vec<u16>,
}

impl Host {
    fn new(dir: &std::path::Path, options: &Options, components: &[&str], gateway: bool) -> Self {
        let ports = Ports::free();
        let (manifest, _) = write_manifest_with(dir, ports, options);
        let mut serving: Vec<u16> = components
            .iter()
            .map(|c| match *c {
                "order" => ports.order,
                "payment" => ports.payment,
                "email" => ports.email,
                _ => ports.analytics,
            })
            .collect();
        if gateway {
            serving.push(ports.gateway);
        }
        let mut args = vec!["--components", Box::leak(components.join(",").into_boxed_str())];
        if !gateway {
            args.push("--no-gateway");
        }
        Self { manifest, ports, args, serving }
    }

    fn start(&self, brokers: &str) -> HostProcess {
        HostProcess::start_with(&self.manifest, Some(brokers), &self.args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_share_the_work_and_the_state_across_a_sigkill() {
    let brokers = brokers();
    let schema = fresh_schema();
    let dir = temp_dir("scale");
    let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
    let options = Options {
        prefix: Some(prefix.clone()),
        // Long enough that no order is cancelled while C's partitions wait
        // for its session to expire.
        order_config: format!(r#"stock = "lamp={LAMPS}", payment_deadline_ms = "90000""#),
        postgres_schema: Some(schema.clone()),
        ..Options::default()
    };
    let a = Host::new(&dir.join("a"), &options, &["order", "analytics"], true);
    let b = Host::new(&dir.join("b"), &options, &["payment", "email"], true);
    let c = Host::new(&dir.join("c"), &options, &["order", "payment", "analytics"], false);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let _host_a = a.start(&brokers);
    let _host_b = b.start(&brokers);
    let mut host_c = c.start(&brokers);
    for host in [&a, &b, &c] {
        wait_ports_healthy(&client, &host.serving).await;
    }
    let gateways = [format!("http://127.0.0.1:{}", a.ports.gateway), format!("http://127.0.0.1:{}", b.ports.gateway)];

    // 8 clients, alternating between the two gateways.
    let placed = Arc::new(AtomicUsize::new(0));
    let placing = {
        let (client, gateways) = (client.clone(), gateways.clone());
        spawn_placing(8, ORDERS, placed.clone(), move |i| {
            let (client, gateway) = (client.clone(), gateways[i % 2].clone());
            async move { place(&client, &gateway, i).await }
        })
    };

    // SIGKILL C a third of the way in; its partitions move to A and B
    // (once its session expires), and it comes back later.
    eventually(Duration::from_secs(120), "a third of the orders accepted", || async {
        (placed.load(Ordering::SeqCst) >= ORDERS / 3).then_some(())
    })
    .await;
    host_c.child.kill().unwrap();
    host_c.child.wait().unwrap();
    let killed_at = placed.load(Ordering::SeqCst);
    let health = format!("http://127.0.0.1:{}/health", a.ports.order);
    eventually(Duration::from_secs(60), "A's order component to take over all partitions", || async {
        let health = get_json(&client, &health).await?;
        (health["assigned_partitions"].as_array()?.len() == 6).then_some(())
    })
    .await;
    let moved_at = placed.load(Ordering::SeqCst);
    let host_c = c.start(&brokers);
    wait_ports_healthy(&client, &c.serving).await;
    let orders = placing.await.unwrap();
    assert_eq!(orders.len(), ORDERS);
    eprintln!(
        "scale-out: C killed after {killed_at} orders, its partitions moved by {moved_at}, all {ORDERS} accepted after {:?}",
        started.elapsed()
    );

    // Every order final, and both gateways (B's has no order component)
    // say the same.
    let mut finals: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    for (i, id) in &orders {
        let url = format!("{}/order/{id}", gateways[0]);
        let what = format!("order {id} ({:?}) to be final", kind(*i));
        let status = eventually(deadline.saturating_duration_since(Instant::now()), &what, || async {
            let order = get_json(&client, &url).await?;
            let status = order["status"].as_str()?;
            let done = order["compensation"]["done"] != false;
            (done && FINAL_EVENTS.iter().any(|(_, s)| *s == status)).then(|| status.to_owned())
        })
        .await;
        finals.insert(id.clone(), (*i, status));
    }
    let settled = started.elapsed();
    let mut discrepancies = Vec::new();
    for (id, (_, status)) in finals.iter().step_by(10) {
        let other = get_json(&client, &format!("{}/order/{id}", gateways[1])).await;
        if other.as_ref().and_then(|o| o["status"].as_str()) != Some(status.as_str()) {
            discrepancies.push(format!("gateway B says {other:?} for {status} order {id}"));
        }
    }

    // An independent reader: each fact once per order (a repeated refund
    // request may still be on its way to its answer: read until every
    // saga's story is complete, or a minute has passed).
    let topics = converge(Duration::from_secs(60), || async {
        let topics = read_topics(&brokers, &prefix);
        let complete = finals.iter().all(|(id, (_, status))| saga_discrepancies(&topics, id, status).is_empty());
        (complete, topics)
    })
    .await;
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let (mut revenue, mut lamps_sold, mut refunds) = (0u64, 0u64, 0u64);
    for (id, (i, status)) in &finals {
        *by_status.entry(status.clone()).or_default() += 1;
        let mut wrong = saga_discrepancies(&topics, id, status);
        // No deadline passes here: a lamp is cancelled for want of stock.
        let fits = matches!(
            (kind(*i), status.as_str()),
            (Kind::Good, "CONFIRMED") | (Kind::Declined, "REJECTED") | (Kind::Lamp, "CONFIRMED" | "CANCELLED")
        );
        if !fits {
            wrong.push("final state does not fit the order".to_owned());
        }
        if !wrong.is_empty() {
            discrepancies.push(format!("order {id} ({:?}, {status}): {wrong:?}", kind(*i)));
        }
        let total = if kind(*i) == Kind::Lamp { 3400 } else { 1250 };
        if status == "CONFIRMED" {
            revenue += total;
            lamps_sold += u64::from(kind(*i) == Kind::Lamp);
        }
        refunds += u64::from(topics.count(id, "PaymentRefunded") > 0);

        // The ledger, read through B: decided once, refunded at most once.
        let ledger = get_json(&client, &format!("http://127.0.0.1:{}/payments/{id}", b.ports.payment)).await;
        for wrong in ledger_discrepancies(ledger.as_ref(), status, total, payment_answer(&topics, id)) {
            discrepancies.push(format!("order {id}: {wrong}"));
        }
    }
    if lamps_sold != LAMPS {
        discrepancies.push(format!("{lamps_sold} lamps sold by two order hosts, {LAMPS} in stock"));
    }
    discrepancies.extend(topics.unexpected(|id| finals.contains_key(id)));

    // Analytics, served by two hosts, adds up to the final states.
    let count = |s: &str| by_status.get(s).copied().unwrap_or(0);
    let expected_stats = json!({
        "orders_placed": ORDERS,
        "orders_confirmed": count("CONFIRMED"),
        "orders_rejected": count("REJECTED"),
        "orders_cancelled": count("CANCELLED"),
        "revenue_cents": revenue,
        "emails_sent": ORDERS,
        "payments_refunded": refunds,
        "refunded_cents": refunds * 3400,
    });
    let mut stats = Value::Null;
    for port in [a.ports.analytics, c.ports.analytics] {
        let url = format!("http://127.0.0.1:{port}/stats");
        stats = converge(Duration::from_secs(60), || async {
            let stats = get_json(&client, &url).await.unwrap_or_default();
            (expected_stats.as_object().unwrap().iter().all(|(k, v)| stats[k] == *v), stats)
        })
        .await;
        for (key, want) in expected_stats.as_object().unwrap() {
            if stats[key] != *want {
                discrepancies.push(format!("analytics on :{port}: {key} = {} but the orders say {want}", stats[key]));
            }
        }
    }
    eprintln!(
        "scale-out: {ORDERS} orders final after {settled:?}, {by_status:?}, {lamps_sold} lamps sold, {} records read, \
         stats {stats}, {} discrepancies",
        topics.records,
        discrepancies.len()
    );
    drop(host_c);
    drop_schema(&schema).await;
    assert!(discrepancies.is_empty(), "{} discrepancies:\n{}", discrepancies.len(), discrepancies.join("\n"));
}

/// A rebalance while sagas are half-way: the only order host dies after
/// asking for payments; a payment host answers them meanwhile; a new order
/// host takes the partitions over and finishes every saga from the shared
/// state, each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_host_finishes_sagas_left_half_way() {
    const HALF: usize = 60;
    let brokers = brokers();
    let schema = fresh_schema();
    let dir = temp_dir("half-way");
    let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
    let options = Options {
        prefix: Some(prefix.clone()),
        order_config: r#"payment_deadline_ms = "90000""#.into(),
        postgres_schema: Some(schema.clone()),
        ..Options::default()
    };
    let first = Host::new(&dir.join("first"), &options, &["order", "email", "analytics"], true);
    let payment = Host::new(&dir.join("payment"), &options, &["payment"], false);
    let second = Host::new(&dir.join("second"), &options, &["order"], false);
    let client = reqwest::Client::new();
    let mut first_host = first.start(&brokers);
    wait_ports_healthy(&client, &first.serving).await;
    // The first host is killed once it has asked for every payment (no
    // payment host runs yet).
    let gateway = format!("http://127.0.0.1:{}", first.ports.gateway);
    let mut ids = Vec::new();
    for i in 0..HALF {
        ids.push(place(&client, &gateway, 10_000 + i * 10 + 3).await);
    }
    let requested = |topics: &Topics| {
        ids.iter().filter(|id| topics.facts.get(*id).is_some_and(|f| f.contains_key("PaymentRequested"))).count()
    };
    eventually(Duration::from_secs(30), "every payment requested", || async {
        (requested(&read_topics(&brokers, &prefix)) == HALF).then_some(())
    })
    .await;
    first_host.child.kill().unwrap();
    first_host.child.wait().unwrap();
    // Payments are answered while no order host runs.
    let _payment_host = payment.start(&brokers);
    wait_ports_healthy(&client, &payment.serving).await;
    let topics = eventually(Duration::from_secs(30), "every payment answered", || async {
        let topics = read_topics(&brokers, &prefix);
        let answered =
            ids.iter().filter(|id| topics.facts.get(*id).is_some_and(|f| f.contains_key("PaymentAuthorized"))).count();
        (answered == HALF).then_some(topics)
    })
    .await;
    let half_way =
        ids.iter().filter(|id| topics.facts.get(*id).is_some_and(|f| !f.contains_key("OrderConfirmed"))).count();
    assert_eq!(half_way, HALF, "every saga is half-way: paid, not confirmed");

    // Another host takes the order partitions over (once the dead member's
    // session expires) and finishes the sagas.
    let _second_host = second.start(&brokers);
    wait_ports_healthy(&client, &second.serving).await;
    let order_port = second.ports.order;
    for id in &ids {
        eventually(Duration::from_secs(60), &format!("order {id} confirmed"), || async {
            let order = get_json(&client, &format!("http://127.0.0.1:{order_port}/orders/{id}")).await?;
            (order["status"] == "CONFIRMED").then_some(())
        })
        .await;
    }
    let topics = read_topics(&brokers, &prefix);
    let mut discrepancies = Vec::new();
    for id in &ids {
        let facts = topics.facts.get(id).cloned().unwrap_or_default();
        for event_type in ["OrderPlaced", "PaymentRequested", "PaymentAuthorized", "OrderConfirmed", "EmailRequested"] {
            let n = facts.get(event_type).map_or(0, BTreeMap::len);
            if n != 1 {
                discrepancies.push(format!("order {id}: {n} × {event_type}"));
            }
        }
    }
    eprintln!("half-way: {half_way} of {HALF} sagas were half-way when the second host took over");
    drop_schema(&schema).await;
    assert!(discrepancies.is_empty(), "{}", discrepancies.join("\n"));
}
