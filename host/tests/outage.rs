//! Broker outage under load, on a broker of this test's own (killed with
//! SIGKILL, started again ~8 s later): while it is gone the gateway answers
//! every order with a quick `503` and `Retry-After`, and `/health` says
//! `degraded` with the reason; once it is back, an independent reader finds
//! every accepted order final exactly once, each order refused with `503`
//! and retried with its `Idempotency-Key` placed once under the same id,
//! and no order cancelled by its payment deadline (4 s here, shorter than
//! the outage): the outage is not the payment service's silence.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;
use serde_json::{Value, json};
use support::*;

/// Orders placed at once right before the broker is killed.
const BURST: usize = 200;

/// A single-node Kafka of this test's own, on ports of its own.
struct Broker {
    home: PathBuf,
    port: u16,
    controller_port: u16,
}

impl Broker {
    fn new() -> Self {
        Self { home: temp_dir("outage-kafka"), port: free_port(), controller_port: free_port() }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it answers.
    fn start(&self) {
        let status = Command::new(repo().join("scripts/kafka.sh"))
            .arg("start")
            .env("KAFKA_HOME_DIR", &self.home)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "the test's broker did not start: see {:?}", self.home.join("kafka.log"));
    }

    /// SIGKILL, as a crash or a lost machine would.
    fn kill(&self) {
        let Ok(pid) = std::fs::read_to_string(self.home.join("kafka.pid")) else { return };
        let pid = pid.trim();
        let quiet = |args: [&str; 2]| {
            Command::new("kill").args(args).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
        };
        quiet(["-9", pid]);
        while quiet(["-0", pid]) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// One `POST /order` of the load: its key, what it got and how fast.
#[derive(Debug, Clone)]
struct Answer {
    key: String,
    status: u16,
    code: Option<String>,
    order_id: Option<String>,
    took: Duration,
    retry_after: bool,
}

fn body(i: usize) -> Value {
    json!({
        "customer": { "name": format!("Ada {i}"), "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242424242424242" }
    })
}

async fn post(client: &reqwest::Client, gateway: &str, i: usize) -> Answer {
    let key = format!("outage-{i}");
    let started = Instant::now();
    let sent = client
        .post(format!("{gateway}/order"))
        .header("idempotency-key", &key)
        .json(&body(i))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    let Ok(response) = sent else {
        return Answer { key, status: 0, code: None, order_id: None, took: started.elapsed(), retry_after: false };
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let value: Value = response.json().await.unwrap_or(Value::Null);
    let order_id = value["order_id"].as_str().or(value["error"]["order_id"].as_str()).map(str::to_owned);
    let code = value["error"]["code"].as_str().map(str::to_owned);
    Answer { key, status, code, order_id, took: started.elapsed(), retry_after }
}

/// Reads `topic` from the start to its end as it is now.
fn read_all(brokers: &str, topic: &str) -> Vec<Value> {
    let consumer = reader(brokers, &[topic]);
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut ends = BTreeMap::new();
    for partition in metadata.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)).unwrap();
        ends.insert(partition.id(), high);
    }
    let mut next: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(Instant::now() < deadline, "could not read {topic} to its end: at {next:?} of {ends:?}");
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            next.insert(message.partition(), message.offset() + 1);
            values
                .push(event_json(&headers_of(&message), message.payload().unwrap_or_default()).unwrap_or(Value::Null));
        }
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_under_load_answers_503_fast_and_loses_or_cancels_nothing() {
    let broker = Broker::new();
    broker.start();
    let brokers = broker.address();
    let dir = temp_dir("outage");
    let ports = Ports::free();
    let options =
        Options { order_config: r#"stock = "sold-out=0", payment_deadline_ms = "4000""#.into(), ..Options::default() };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host).await;
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);

    // About 20 orders a second, each on its own task so that a slow answer
    // does not slow the load.
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (answers, stop, client, gateway) = (answers.clone(), stop.clone(), client.clone(), gateway.clone());
        tokio::spawn(async move {
            let mut requests = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            for i in 0.. {
                pace.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (answers, client, gateway) = (answers.clone(), client.clone(), gateway.clone());
                requests.push(tokio::spawn(async move {
                    let answer = post(&client, &gateway, i).await;
                    answers.lock().unwrap().push(answer);
                }));
            }
            for request in requests {
                request.await.unwrap();
            }
        })
    };
    let accepted = || answers.lock().unwrap().iter().filter(|a| a.status == 202).count();
    eventually(Duration::from_secs(30), "40 orders accepted before the outage", || async {
        (accepted() >= 40).then_some(())
    })
    .await;

    // A burst, and the broker killed as soon as it is accepted: its orders
    // are in the middle of their sagas when the broker goes away.
    let burst: Vec<_> = (0..BURST)
        .map(|j| {
            let (client, gateway) = (client.clone(), gateway.clone());
            tokio::spawn(async move { post(&client, &gateway, 1_000_000 + j).await })
        })
        .collect();
    for request in burst {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 202, "the burst is placed before the outage: {answer:?}");
        answers.lock().unwrap().push(answer);
    }
    broker.kill();
    let killed_ms = shop_host::clock::unix_ms(std::time::SystemTime::now());
    let killed_at = answers.lock().unwrap().len();
    let health = |port: u16| {
        let client = client.clone();
        async move {
            let response = client.get(format!("http://127.0.0.1:{port}/health")).send().await.ok()?;
            response.json::<Value>().await.ok()
        }
    };
    let degraded = eventually(Duration::from_secs(20), "the order service's health to say degraded", || async {
        health(ports.order).await.filter(|h| h["status"] == "degraded" && h["broker_unreachable"].is_object())
    })
    .await;
    assert!(degraded["broker_unreachable"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{degraded}");
    let gateway_health = health(ports.gateway).await.unwrap();
    assert_eq!(gateway_health["status"], "degraded", "{gateway_health}");
    eventually(Duration::from_secs(20), "20 orders answered during the outage", || async {
        (answers.lock().unwrap().len() >= killed_at + 20).then_some(())
    })
    .await;
    // The outage must outlast the payment deadline (4 s) by far: its length
    // is the point of this pause, not a stand-in for a condition.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during: Vec<Answer> = answers.lock().unwrap()[killed_at..].to_vec();

    let restart = tokio::task::spawn_blocking(move || {
        broker.start();
        broker
    });
    let broker = restart.await.unwrap();
    let back_ms = shop_host::clock::unix_ms(std::time::SystemTime::now());
    let before_recovery = accepted();
    eventually(Duration::from_secs(60), "orders accepted again after the outage", || async {
        (accepted() >= before_recovery + 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let answers = answers.lock().unwrap().clone();

    // Quick, truthful answers: 202, or 503 with Retry-After within the
    // publish timeout (2 s) and some slack; never a hang.
    let mut problems = Vec::new();
    for a in &answers {
        match a.status {
            202 => {}
            503 if a.retry_after && a.took < Duration::from_millis(4_000) => {}
            _ => problems.push(format!("{a:?}")),
        }
    }
    assert!(problems.is_empty(), "slow or wrong answers:\n{}", problems.join("\n"));
    assert!(
        during.iter().any(|a| a.status == 503 && a.code.as_deref() == Some("unavailable")),
        "orders were refused at once while the broker was known down: {during:?}"
    );
    let accepted: BTreeMap<String, String> =
        answers.iter().filter(|a| a.status == 202).map(|a| (a.key.clone(), a.order_id.clone().unwrap())).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(!refused.is_empty() && !accepted.is_empty());

    // Every refused order retried with its key: placed once, under the id
    // a `not_confirmed` answer named.
    let mut orders: BTreeSet<String> = accepted.values().cloned().collect();
    for a in &refused {
        let i: usize = a.key.trim_start_matches("outage-").parse().unwrap();
        let placed = place_until_accepted(&client, &gateway, &a.key, &body(i)).await;
        let id = placed["order_id"].as_str().unwrap().to_owned();
        if let Some(named) = &a.order_id {
            assert_eq!(&id, named, "the retry of {} finds the order its 503 named", a.key);
        }
        orders.insert(id);
    }

    // Read back independently: every order final exactly once, confirmed.
    let topic = format!("{prefix}orders");
    let finals = |values: &[Value]| -> BTreeMap<String, Vec<String>> {
        let mut finals: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in values {
            let kind = v["type"].as_str().unwrap_or_default();
            if ["OrderConfirmed", "OrderRejected", "OrderCancelled"].contains(&kind) {
                // One event published twice (same id) is one event: its
                // consumers drop the copy by id.
                let event = format!("{kind} {}", v["id"].as_str().unwrap_or_default());
                let seen = finals.entry(v["order_id"].as_str().unwrap_or_default().to_owned()).or_default();
                if !seen.contains(&event) {
                    seen.push(event);
                }
            }
        }
        finals
    };
    let brokers_for_reader = brokers.clone();
    let values = eventually(Duration::from_secs(120), "every order final on the orders topic", || {
        let (brokers, topic, orders) = (brokers_for_reader.clone(), topic.clone(), orders.clone());
        async move {
            let values = tokio::task::spawn_blocking(move || read_all(&brokers, &topic)).await.unwrap();
            orders.iter().all(|id| finals(&values).contains_key(id)).then_some(values)
        }
    })
    .await;
    let before_kill: BTreeSet<&str> =
        answers[..killed_at].iter().filter(|a| a.status == 202).filter_map(|a| a.order_id.as_deref()).collect();
    let finished_after_kill = values
        .iter()
        .filter(|v| v["type"] == "OrderConfirmed" && v["timestamp_ms"].as_u64().is_some_and(|t| t > killed_ms))
        .filter(|v| v["order_id"].as_str().is_some_and(|id| before_kill.contains(id)))
        .count();
    eprintln!("outage: {finished_after_kill} orders accepted before the kill were confirmed after it");
    assert!(finished_after_kill > 0, "the outage must catch orders in the middle of their sagas");
    let finals = finals(&values);
    let mut problems = Vec::new();
    for id in &orders {
        match finals.get(id).map(Vec::as_slice) {
            Some([event]) if event.starts_with("OrderConfirmed ") => {}
            other => problems.push(format!("order {id}: final events {other:?}")),
        }
    }
    for id in finals.keys().filter(|id| !orders.contains(*id)) {
        problems.push(format!("order {id} is on the topic but was never accepted"));
    }
    let cancelled: Vec<&Value> =
        values.iter().filter(|v| v["type"] == "OrderCancelled" || v["type"] == "OrderRejected").collect();
    if !problems.is_empty() {
        let log = dir.join("host.log");
        std::fs::write(&log, host.output()).unwrap();
        panic!(
            "{} of {} orders wrong after the outage (broker killed at {killed_ms}, back at {back_ms}; host log in {log:?}):\n{}\nnot confirmed: {cancelled:?}",
            problems.len(),
            orders.len(),
            problems.join("\n"),
        );
    }
    eprintln!(
        "outage: {} orders, {} accepted at once, {} refused with 503 during the outage and placed by their retry",
        orders.len(),
        accepted.len(),
        refused.len()
    );
    host.terminate();
    drop(broker);
}

/// A producer that failed for good (as librdkafka says when idempotence
/// can no longer be guaranteed) is replaced before the next send, and
/// sending works again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_failed_for_good_is_replaced() {
    use shop_host::bus::{Outbound, Publisher as _};
    use shop_host::kafka::KafkaPublisher;
    use shop_host::status::BrokerLink;

    let brokers = brokers();
    let topic = format!("t{}-fatal", uuid::Uuid::new_v4().simple());
    shop_host::kafka::ensure_topics(&brokers, std::slice::from_ref(&topic), 1, 1).await.unwrap();
    let publisher = KafkaPublisher::connect(&brokers, BrokerLink::default()).unwrap();
    let record =
        |value: &str| Outbound { topic: topic.clone(), key: "k".into(), value: value.into(), headers: Vec::new() };
    let send = |value: &'static str| {
        let (publisher, record) = (publisher.clone(), record(value));
        async move {
            match publisher.enqueue(vec![record]).await {
                Ok(acked) => acked.await.map_err(|e| eprintln!("not acknowledged: {e}")).is_ok(),
                Err(e) => {
                    eprintln!("not sent: {e}");
                    false
                }
            }
        }
    };
    assert!(send("before").await);
    publisher.inject_fatal_error();
    eventually(Duration::from_secs(20), "a send to succeed after the fatal error", || async {
        send("after").await.then_some(())
    })
    .await;
    assert_eq!(publisher.rebuilt(), 1, "replaced once");
    let records = tokio::task::spawn_blocking(move || read_all(&brokers, &topic)).await.unwrap();
    assert!(records.len() >= 2, "both sends are on the topic: {}", records.len());
}
