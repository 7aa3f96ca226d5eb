//! A host cut off from the shared PostgreSQL hands its partitions to the
//! host that reaches it, and takes them back once healed. Two hosts serve
//! every component on one database and the real broker; B reaches the
//! database through a proxy the test freezes for 30 s while orders come in
//! at a steady pace through A's gateway. At least 80 % of the orders
//! offered in that window must be final within it (without the hand-off,
//! every order with a step on B's partitions waits for the database), and
//! after healing every order is final exactly once: each saga step once on
//! the topics, each payment decided once, analytics adding up.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// The freeze.
const WINDOW: Duration = Duration::from_secs(30);
/// One order offered every 50 ms: 20 a second, 600 in the window.
const PACE: Duration = Duration::from_millis(50);
const COMPONENTS: [&str; 4] = ["order", "payment", "email", "analytics"];

fn declined(i: usize) -> bool {
    i.is_multiple_of(5)
}

fn body(i: usize) -> Value {
    let card = if declined(i) { "4000000000000002" } else { "4242424242424242" };
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": card }
    })
}

/// An order placed through A's gateway: its number, id, and when it was offered.
struct Offered {
    i: usize,
    id: String,
    at: Instant,
}

/// Offers order after order to `gateway`, one every [`PACE`] (each placed
/// on its own task, so that a slow answer never slows the pace), until
/// `stop`; resolves to all of them once each was accepted.
fn offer(client: reqwest::Client, gateway: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Offered>> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PACE);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut placing = Vec::new();
        for i in 0.. {
            ticks.tick().await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let (client, gateway) = (client.clone(), gateway.clone());
            placing.push(tokio::spawn(async move {
                let at = Instant::now();
                let accepted = place_until_accepted(&client, &gateway, &format!("handoff-{i}"), &body(i)).await;
                Offered { i, id: accepted["order_id"].as_str().unwrap().to_owned(), at }
            }));
        }
        let mut offered = Vec::new();
        for placed in placing {
            offered.push(placed.await.unwrap());
        }
        offered
    })
}

/// Each component's partitions in the manifest at `path` (3 per topic).
fn partitions(path: &Path) -> BTreeMap<String, usize> {
    let app: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let components = app["components"].as_table().unwrap();
    components.iter().map(|(name, c)| (name.clone(), 3 * c["topics"].as_array().unwrap().len())).collect()
}

/// `/health` of every component on `ports` (`None` if one does not answer).
async fn healths(client: &reqwest::Client, ports: &[u16; 4]) -> Option<Vec<Value>> {
    let mut bodies = Vec::new();
    for port in ports {
        let url = format!("http://127.0.0.1:{port}/health");
        let response = client.get(url).timeout(Duration::from_secs(10)).send().await.ok()?;
        bodies.push(response.json::<Value>().await.ok()?);
    }
    Some(bodies)
}

/// `shop_consumer_handoffs_total` of `component` for `transition`, from its `/metrics`.
async fn handoffs(client: &reqwest::Client, port: u16, component: &str, transition: &str) -> Option<u64> {
    let text = client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?.text().await.ok()?;
    let series = format!("shop_consumer_handoffs_total{{component=\"{component}\",transition=\"{transition}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&series)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_database_hands_its_partitions_over_and_takes_them_back() {
    let brokers = brokers();
    let schema = fresh_schema();
    let dir = temp_dir("handoff");
    let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
    let options = Options {
        prefix: Some(prefix.clone()),
        // No order may be cancelled for a late payment while it waits.
        order_config: r#"payment_deadline_ms = "120000""#.into(),
        postgres_schema: Some(schema.clone()),
        ..Options::default()
    };
    let (a, b) = (Ports::free(), Ports::free());
    let (a_manifest, _) = write_manifest_with(&dir.join("a"), a, &options);
    let (b_manifest, _) = write_manifest_with(&dir.join("b"), b, &options);
    let (proxy, proxied) = Proxy::for_postgres(&database_url());
    let text = std::fs::read_to_string(&b_manifest).unwrap().replace(&database_url(), &proxied);
    std::fs::write(&b_manifest, text).unwrap();
    let _host_a = HostProcess::start(&a_manifest, Some(&brokers));
    let host_b = HostProcess::start_with(&b_manifest, Some(&brokers), &["--no-gateway"]);
    let client = reqwest::Client::new();
    let (a_ports, b_ports) = ([a.order, a.payment, a.email, a.analytics], [b.order, b.payment, b.email, b.analytics]);
    wait_ports_healthy(&client, &a.all()).await;
    wait_ports_healthy(&client, &b_ports).await;
    let gateway = format!("http://127.0.0.1:{}", a.gateway);
    let stop = Arc::new(AtomicBool::new(false));
    let offering = offer(client.clone(), gateway.clone(), stop.clone());

    // B takes its share before it is cut off: each of its components has
    // partitions and has handled records.
    eventually(Duration::from_secs(60), "each of B's components to handle records", || async {
        let bodies = healths(&client, &b_ports).await?;
        bodies.iter().all(|h| h["handled"].as_u64() > Some(0) && h["assigned_partitions"] != json!([])).then_some(())
    })
    .await;

    // Frozen: B's connections stay open and nothing answers.
    proxy.freeze(true);
    let frozen = Instant::now();
    let window_end = frozen + WINDOW;
    let owned = partitions(&a_manifest);
    eventually(WINDOW, "A to own every partition of its components", || async {
        let bodies = healths(&client, &a_ports).await?;
        let all = COMPONENTS
            .iter()
            .zip(&bodies)
            .all(|(name, h)| h["assigned_partitions"].as_array().map(Vec::len) == Some(owned[*name]));
        all.then_some(())
    })
    .await;
    let handed_over = frozen.elapsed();
    // The window is the experiment's 30 s; what stood on the topics at its
    // end is read later, up to these marks.
    tokio::time::sleep_until(window_end.into()).await;
    let (marks_brokers, topics) = (brokers.clone(), app_topics(&prefix));
    let marks = tokio::task::spawn_blocking(move || watermarks(&marks_brokers, &topics)).await.unwrap();
    proxy.freeze(false);

    // B takes partitions back once its store answers.
    eventually(Duration::from_secs(60), "each of B's components to rejoin", || async {
        let bodies = healths(&client, &b_ports).await?;
        let back = |h: &Value| h["handed_off"] == false && h["rejoins"].as_u64() >= Some(1);
        bodies.iter().all(|h| back(h) && h["assigned_partitions"] != json!([])).then_some(())
    })
    .await;
    let rejoined = frozen.elapsed();
    stop.store(true, Ordering::SeqCst);
    let offered = offering.await.unwrap();

    // The window: orders offered while B was frozen, final on the topics
    // at its end.
    let at_end = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || read_until(&brokers, &marks)).await.unwrap()
    };
    let in_window: Vec<&Offered> = offered.iter().filter(|o| o.at >= frozen && o.at < window_end).collect();
    let final_in_window =
        in_window.iter().filter(|o| FINAL_EVENTS.iter().any(|(event, _)| at_end.count(&o.id, event) > 0)).count();
    let share = final_in_window as f64 / in_window.len().max(1) as f64;

    // After healing, every order final once.
    let mut finals: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for o in &offered {
        let url = format!("{gateway}/order/{}", o.id);
        let left = deadline.saturating_duration_since(Instant::now());
        let status = eventually(left, &format!("order {} final", o.id), || async {
            let status = get_json(&client, &url).await?["status"].as_str()?.to_owned();
            ["CONFIRMED", "REJECTED"].contains(&status.as_str()).then_some(status)
        })
        .await;
        finals.insert(o.id.clone(), (o.i, status));
    }
    let (topics, mut discrepancies) = converge(Duration::from_secs(60), || async {
        let topics = read_topics(&brokers, &prefix);
        let mut wrong: Vec<String> = finals
            .iter()
            .flat_map(|(id, (_, status))| {
                saga_discrepancies(&topics, id, status).into_iter().map(move |d| format!("{status} order {id}: {d}"))
            })
            .collect();
        wrong.extend(topics.unexpected(|id| finals.contains_key(id)));
        (wrong.is_empty(), (topics, wrong))
    })
    .await;
    for (id, (i, status)) in &finals {
        let expected = if declined(*i) { "REJECTED" } else { "CONFIRMED" };
        if status != expected {
            discrepancies.push(format!("order {id}: {status}, expected {expected}"));
        }
        let ledger = get_json(&client, &format!("http://127.0.0.1:{}/payments/{id}", a.payment)).await;
        for wrong in ledger_discrepancies(ledger.as_ref(), status, 1250, payment_answer(&topics, id)) {
            discrepancies.push(format!("order {id}: {wrong}"));
        }
    }
    let total = json!(offered.len());
    let stats_url = format!("http://127.0.0.1:{}/stats", a.analytics);
    let stats = converge(Duration::from_secs(30), || async {
        let stats = get_json(&client, &stats_url).await.unwrap_or_default();
        (stats["orders_placed"] == total && stats["emails_sent"] == total, stats)
    })
    .await;
    if stats["orders_placed"] != total || stats["emails_sent"] != total {
        discrepancies.push(format!("analytics counted {stats} for {total} orders"));
    }

    // What B says about it: each component left once and came back once.
    for (name, port) in COMPONENTS.iter().zip(b_ports) {
        for transition in ["left", "rejoined"] {
            let counted = handoffs(&client, port, name, transition).await;
            if counted != Some(1) {
                discrepancies.push(format!("B's {name}: shop_consumer_handoffs_total {transition} = {counted:?}"));
            }
        }
    }
    for (name, port) in COMPONENTS.iter().zip(a_ports) {
        if handoffs(&client, port, name, "left").await != Some(0) {
            discrepancies.push(format!("A's {name} handed its partitions off"));
        }
    }
    if !host_b.output().contains("left the consumer group") {
        discrepancies.push("B's log does not say it left the consumer group".into());
    }
    eprintln!(
        "handoff: A owned every partition {handed_over:?} after the freeze, B rejoined {rejoined:?} after it; \
         {final_in_window} of {} orders offered in the {WINDOW:?} window final within it ({:.1} %); \
         {} orders in all, {} records on the topics, {} discrepancies",
        in_window.len(),
        share * 100.0,
        offered.len(),
        topics.records,
        discrepancies.len()
    );
    drop_schema(&schema).await;
    assert!(discrepancies.is_empty(), "{} discrepancies:\n{}", discrepancies.len(), discrepancies.join("\n"));
    assert!(share >= 0.8, "{final_in_window} of {} orders offered in the window final within it", in_window.len());
}
