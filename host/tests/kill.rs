//! Crash test on a real broker: 1,000 orders placed through the gateway
//! while the host is killed with SIGKILL at random moments and restarted,
//! and while an independent client delivers every record of the four
//! topics a second time. Then every order must be final, the payment
//! ledger must hold one capture (or capture + refund) per order, there must
//! be exactly one email per final state, and analytics must match the final
//! states. Every discrepancy is collected and reported, and there must be
//! none.

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
        Kind::SoldOut => ("sold-out", 999),
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

    // Orders go in from 8 concurrent clients while the host is killed.
    let placed = Arc::new(AtomicUsize::new(0));
    let placing = {
        let (client, gateway) = (client.clone(), gateway.clone());
        spawn_placing(8, ORDERS, placed.clone(), move |i| {
            let (client, gateway) = (client.clone(), gateway.clone());
            async move { place(&client, &gateway, i).await }
        })
    };

    // SIGKILL at pseudo-random moments (0.7 to 2.6 s apart), restart at
    // once; twice more once every order is accepted, while the saga runs.
    let mut kills = 0;
    let mut kills_after_placing = 0;
    let mut seed = 0x9e37_79b9_u64;
    while kills < MIN_KILLS || placed.load(Ordering::SeqCst) < ORDERS || kills_after_placing < 2 {
        if placed.load(Ordering::SeqCst) == ORDERS {
            kills_after_placing += 1;
        }
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        tokio::time::sleep(Duration::from_millis(700 + (seed >> 33) % 1900)).await;
        host.child.kill().unwrap();
        host.child.wait().unwrap();
        kills += 1;
        eprintln!("kill {kills} at {:?}, {} orders accepted so far", started.elapsed(), placed.load(Ordering::SeqCst));
        host = HostProcess::start(&manifest, Some(&brokers));
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
        loop {
            if let Some(order) = get_json(&client, &url).await
                && ["CONFIRMED", "REJECTED", "CANCELLED"].contains(&order["status"].as_str().unwrap_or(""))
                && order["compensation"]["done"] != false
            {
                finals.insert(id.clone(), (*i, *total, order));
                break;
            }
            assert!(Instant::now() < settle_deadline, "order {id} ({:?}) not final", kind(*i));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut discrepancies: Vec<String> = Vec::new();
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

        // The ledger: one capture, or capture + refund, or nothing.
        let ledger = get_json(&client, &format!("http://127.0.0.1:{}/payments/{id}", ports.payment)).await;
        let ops = |kind: &str| {
            ledger
                .as_ref()
                .and_then(|l| l["operations"].as_array())
                .map_or(0, |ops| ops.iter().filter(|op| op["kind"] == kind).count())
        };
        let field = |name: &str| ledger.as_ref().and_then(|l| l[name].as_u64()).unwrap_or(0);
        let (captured, refunded) = (field("captured_cents"), field("refunded_cents"));
        ledger_refunded += refunded;
        ledger_declines += u64::from(ops("decline") > 0);
        let ok = match status.as_str() {
            "CONFIRMED" => ops("capture") == 1 && ops("refund") == 0 && captured == *total && refunded == 0,
            "REJECTED" => ops("capture") == 0 && captured == 0,
            _ => ops("capture") <= 1 && ops("refund") == ops("capture") && captured == refunded,
        };
        if !ok {
            discrepancies.push(format!("ledger of {status} order {id} (total {total}): {ledger:?}"));
        }

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
    let analytics_deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let stats = get_json(&client, &stats_url).await.unwrap_or_default();
        let matches = expected_stats.as_object().unwrap().iter().all(|(k, v)| stats[k] == *v);
        if matches || Instant::now() > analytics_deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
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
        "kill test: {ORDERS} orders, {kills} SIGKILLs, {} duplicates injected, {dropped} records dropped as already \
         handled by the last host run (injected copies and redeliveries), final states {by_status:?}, {timeouts} \
         missed the payment deadline, compensations {compensations:?}, {ledger_refunded} cents refunded, \
         {lamps_sold} lamps sold, {} discrepancies, {:?}",
        duplicates.load(Ordering::SeqCst),
        discrepancies.len(),
        started.elapsed()
    );
    assert!(discrepancies.is_empty(), "{} discrepancies:\n{}", discrepancies.len(), discrepancies.join("\n"));
    assert!(duplicates.load(Ordering::SeqCst) >= ORDERS as u64, "the duplicator injected too little");
    assert!(kills >= MIN_KILLS);
}
