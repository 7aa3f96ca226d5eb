//! Crash test on a real broker: 1,000 orders placed through the gateway
//! while the host is killed with SIGKILL at random moments and restarted,
//! and while an independent client delivers every record of the four
//! topics a second time. Then every order must be final; a client of our
//! own reads every topic and finds each step of each saga exactly once
//! (one request, one answer to every command, one final event, one email
//! of the final state's kind), no event id with two contents and no dead
//! letter; the payment ledger holds one decision per order (a capture, or
//! capture + refund, or a decline) matching the answer on the topics; the
//! email service recorded one email per order, and analytics matches the
//! final states. Every discrepancy is collected and reported, and there
//! must be none. A kill must have landed while orders were in flight.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const ORDERS: usize = 1_000;
/// Kills while orders are still being placed or processed.
const MIN_KILLS: usize = 5;
/// Units of `lamp` in stock: more orders want one, so some are compensated.
const LAMPS: u64 = 30;
/// The order service's payment deadline in this test.
const DEADLINE_MS: u64 = 6_000;

/// What each order is, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    Declined,
    SoldOut,
    Lamp,
}

fn kind(i: usize) -> Kind {
    match i % 10 {
        0 => Kind::Declined,
        1 | 2 => Kind::Lamp,
        3 => Kind::SoldOut,
        _ => Kind::Good,
    }
}

fn order_body(kind: Kind) -> Value {
    let (sku, price) = match kind {
        Kind::Lamp => ("lamp", 3400),
        Kind::SoldOut => ("sold-out", 1250),
        _ => ("book", 1250),
    };
    let card = if kind == Kind::Declined { "4000000000000002" } else { "4242424242424242" };
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": sku, "quantity": 1, "unit_price_cents": price } ],
        "payment": { "card_number": card }
    })
}

/// Places order `i` until the gateway accepts it: its id and total.
async fn place(client: &reqwest::Client, gateway: &str, i: usize) -> (String, u64) {
    let body = place_until_accepted(client, gateway, &format!("kill-test-{i}"), &order_body(kind(i))).await;
    (body["order_id"].as_str().unwrap().to_owned(), body["total_cents"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_settles_exactly_once_across_sigkills_and_duplicates() {
    let brokers = brokers();
    let dir = temp_dir("kill");
    let ports = Ports::free();
    let options = Options {
        // Short enough that orders caught in a kill's backlog miss it: the
        // deadline, void and late-payment paths run under the kills too.
        order_config: format!(
            r#"stock = "lamp={LAMPS},sold-out=0", payment_deadline_ms = "{DEADLINE_MS}", compensation_retry_ms = "1000""#
        ),
        static_membership: true,
        ..Options::default()
    };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let started = Instant::now();

    let mut host = HostProcess::start(&manifest, Some(&brokers));
    wait_host_healthy(&client, ports, &host).await;

    let stop = Arc::new(AtomicBool::new(false));
    let duplicates = Arc::new(AtomicU64::new(0));
    let topics: Vec<String> =
        ["orders", "payments", "emails", "analytics"].iter().map(|t| format!("{prefix}{t}")).collect();
    let duplicator = {
        let (brokers, stop, duplicates) = (brokers.clone(), stop.clone(), duplicates.clone());
        std::thread::spawn(move || duplicate_everything(brokers, topics, stop, duplicates))
    };

    // Orders go in from 8 concurrent clients while the host is killed, at
    // most about 100 a second: the point of the sleep is that placing
    // lasts through several kills even on a fast machine.
    let placed = Arc::new(AtomicUsize::new(0));
    let placing = {
        let (client, gateway) = (client.clone(), gateway.clone());
        spawn_placing(8, ORDERS, placed.clone(), move |i| {
            let (client, gateway) = (client.clone(), gateway.clone());
            async move {
                let accepted = place(&client, &gateway, i).await;
                tokio::time::sleep(Duration::from_millis(80)).await;
                accepted
            }
        })
    };

    // SIGKILL at pseudo-random moments (0.7 to 2.6 s apart), restart at
    // once; twice more once every order is accepted, while the saga runs.
    // What the orders topic held at each kill says how many orders were
    // accepted but not final then (read in the background, not to hold up
    // the restart).
    let orders_topic = vec![format!("{prefix}orders")];
    let mut kills = 0;
    let mut kills_after_placing = 0;
    let mut in_flight_at_kills = Vec::new();
    let mut seed = 0x9e37_79b9_u64;
    while kills < MIN_KILLS || placed.load(Ordering::SeqCst) < ORDERS || kills_after_placing < 2 {
        if placed.load(Ordering::SeqCst) == ORDERS {
            kills_after_placing += 1;
        }
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        // The point of this sleep: the kill lands at a moment nobody chose.
        tokio::time::sleep(Duration::from_millis(700 + (seed >> 33) % 1900)).await;
        host.child.kill().unwrap();
        host.child.wait().unwrap();
        kills += 1;
        let marks = watermarks(&brokers, &orders_topic);
        eprintln!("kill {kills} at {:?}, {} orders accepted so far", started.elapsed(), placed.load(Ordering::SeqCst));
        host = HostProcess::start(&manifest, Some(&brokers));
        let brokers = brokers.clone();
        in_flight_at_kills.push(tokio::task::spawn_blocking(move || in_flight(&read_until(&brokers, &marks))));
        assert!(started.elapsed() < Duration::from_secs(600), "the run took too long");
    }
    let orders: Vec<(usize, String, u64)> =
        placing.await.unwrap().into_iter().map(|(i, (id, total))| (i, id, total)).collect();
    assert_eq!(orders.len(), ORDERS);
    wait_host_healthy(&client, ports, &host).await;

    // Every order reaches a final state.
    let mut finals: BTreeMap<String, (usize, u64, Value)> = BTreeMap::new();
    let settle_deadline = Instant::now() + Duration::from_secs(240);
    for (i, id, total) in &orders {
        let url = format!("{gateway}/order/{id}");
        let what = format!("order {id} ({:?}) to be final", kind(*i));
        let order = eventually(settle_deadline.saturating_duration_since(Instant::now()), &what, || async {
            let order = get_json(&client, &url).await?;
            let done = order["compensation"]["done"] != false;
            (done && FINAL_EVENTS.iter().any(|(_, status)| order["status"] == *status)).then_some(order)
        })
        .await;
        finals.insert(id.clone(), (*i, *total, order));
    }

    // The topics, read by a client of our own, tell each saga's story; a
    // repeated compensation may still be on its way to its answer, so
    // read until the story is complete (or a minute has passed).
    let (topics, mut discrepancies) = converge(Duration::from_secs(60), || async {
        let topics = read_topics(&brokers, &prefix);
        let discrepancies = topic_discrepancies(&topics, &finals);
        (discrepancies.is_empty(), (topics, discrepancies))
    })
    .await;
    let mut in_flight_counts = Vec::new();
    for counted in in_flight_at_kills {
        in_flight_counts.push(counted.await.unwrap());
    }

    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut revenue = 0;
    let mut lamps_sold = 0;
    let mut timeouts = 0;
    let mut compensations: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ledger_refunded, mut ledger_declines) = (0, 0);
    for (id, (i, total, order)) in &finals {
        let status = order["status"].as_str().unwrap().to_owned();
        *by_status.entry(status.clone()).or_default() += 1;
        // Any order may miss its payment deadline in a kill's backlog and
        // be CANCELLED (with its payment voided); otherwise its kind decides.
        let expected: &[&str] = match kind(*i) {
            Kind::Good => &["CONFIRMED", "CANCELLED"],
            Kind::Declined => &["REJECTED", "CANCELLED"],
            Kind::SoldOut => &["CANCELLED"],
            Kind::Lamp => &["CONFIRMED", "CANCELLED"],
        };
        let reason = order["reason"].as_str().unwrap_or("");
        let timed_out = reason.starts_with("no answer from payment");
        let compensation = order["compensation"]["kind"].as_str().unwrap_or("none").to_owned();
        *compensations.entry(compensation.clone()).or_default() += 1;
        timeouts += u64::from(timed_out);
        let explained = match (kind(*i), status.as_str()) {
            (Kind::SoldOut | Kind::Lamp, "CANCELLED") => timed_out || reason.starts_with("out of stock"),
            (_, "CANCELLED") => timed_out,
            _ => true,
        };
        if !expected.contains(&status.as_str()) || !explained {
            discrepancies.push(format!("order {id} ({:?}) is {status}: {order}", kind(*i)));
        }
        if status == "CONFIRMED" {
            revenue += total;
            lamps_sold += u64::from(kind(*i) == Kind::Lamp);
        }

        // The ledger: decided once, as the topics say, and the money
        // matches the outcome.
        let ledger = get_json(&client, &format!("http://127.0.0.1:{}/payments/{id}", ports.payment)).await;
        let field = |name: &str| ledger.as_ref().and_then(|l| l[name].as_u64()).unwrap_or(0);
        ledger_refunded += field("refunded_cents");
        let declined = ledger
            .as_ref()
            .and_then(|l| l["operations"].as_array())
            .is_some_and(|ops| ops.iter().any(|op| op["kind"] == "decline"));
        ledger_declines += u64::from(declined);
        discrepancies.extend(
            ledger_discrepancies(ledger.as_ref(), &status, *total, payment_answer(&topics, id))
                .into_iter()
                .map(|d| format!("order {id}: {d}")),
        );

        // Exactly one email, of the final state's kind.
        let emails = get_json(&client, &format!("http://127.0.0.1:{}/emails?order={id}", ports.email)).await;
        let kinds: Vec<String> = emails
            .as_ref()
            .and_then(Value::as_array)
            .map(|e| e.iter().map(|m| m["kind"].as_str().unwrap_or("").to_owned()).collect())
            .unwrap_or_default();
        if kinds != [format!("order_{}", status.to_lowercase())] {
            discrepancies.push(format!("emails of {status} order {id}: {kinds:?}"));
        }
    }
    if lamps_sold > LAMPS {
        discrepancies.push(format!("{lamps_sold} lamps sold, only {LAMPS} in stock"));
    }

    // Analytics converges to the final states, duplicates notwithstanding.
    let count = |s: &str| by_status.get(s).copied().unwrap_or(0);
    let expected_stats = json!({
        "orders_placed": ORDERS,
        "orders_confirmed": count("CONFIRMED"),
        "orders_rejected": count("REJECTED"),
        "orders_cancelled": count("CANCELLED"),
        "revenue_cents": revenue,
        "emails_sent": ORDERS,
        "refunded_cents": ledger_refunded,
        "payment_declines": ledger_declines,
        "payments_refunded": compensations.get("refund").copied().unwrap_or(0),
        "payments_voided": compensations.get("void").copied().unwrap_or(0),
    });
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let stats = converge(Duration::from_secs(60), || async {
        let stats = get_json(&client, &stats_url).await.unwrap_or_default();
        (expected_stats.as_object().unwrap().iter().all(|(k, v)| stats[k] == *v), stats)
    })
    .await;
    for (key, want) in expected_stats.as_object().unwrap() {
        if stats[key] != *want {
            discrepancies.push(format!("analytics {key} = {} but the orders say {want}", stats[key]));
        }
    }

    stop.store(true, Ordering::SeqCst);
    duplicator.join().unwrap();
    let mut dropped = 0;
    for port in [ports.payment, ports.order, ports.email, ports.analytics] {
        let health = get_json(&client, &format!("http://127.0.0.1:{port}/health")).await.unwrap_or_default();
        dropped += health["duplicates_dropped"].as_u64().unwrap_or(0);
    }
    eprintln!(
        "kill test: {ORDERS} orders, {kills} SIGKILLs with {in_flight_counts:?} orders accepted but not final at \
         each, {} records on the topics, {} duplicates injected, {dropped} records dropped as already \
         handled by the last host run (injected copies and redeliveries), final states {by_status:?}, {timeouts} \
         missed the payment deadline, compensations {compensations:?}, {ledger_refunded} cents refunded, \
         {lamps_sold} lamps sold, {} discrepancies, {:?}",
        topics.records,
        duplicates.load(Ordering::SeqCst),
        discrepancies.len(),
        started.elapsed()
    );
    assert!(discrepancies.is_empty(), "{} discrepancies:\n{}", discrepancies.len(), discrepancies.join("\n"));
    assert!(duplicates.load(Ordering::SeqCst) >= ORDERS as u64, "the duplicator injected too little");
    assert!(kills >= MIN_KILLS);
    // Each kill finds only the few orders of the last tens of milliseconds
    // unfinished, and some find none: one is what can be asked for without
    // making the test flaky (three to five of a run's kills find some).
    assert!(
        in_flight_counts.iter().any(|&n| n > 0),
        "no kill landed while orders were in flight: {in_flight_counts:?}"
    );
}

/// Orders accepted (placed on the topic) but without a final event.
fn in_flight(topics: &Topics) -> usize {
    let placed = topics.facts.iter().filter(|(_, facts)| facts.contains_key("OrderPlaced"));
    placed.filter(|(_, facts)| !FINAL_EVENTS.iter().any(|(t, _)| facts.contains_key(*t))).count()
}

/// What the topics say is wrong with any saga of `finals`, or beyond them.
fn topic_discrepancies(topics: &Topics, finals: &BTreeMap<String, (usize, u64, Value)>) -> Vec<String> {
    let mut discrepancies = Vec::new();
    for (id, (i, _, order)) in finals {
        let status = order["status"].as_str().unwrap_or("");
        for wrong in saga_discrepancies(topics, id, status) {
            discrepancies.push(format!("order {id} ({:?}, {status}) on the topics: {wrong}", kind(*i)));
        }
    }
    discrepancies.extend(topics.unexpected(|id| finals.contains_key(id)));
    discrepancies
}
