//! `GET /metrics` on a real Apache Kafka broker: every port of the `host`
//! binary answers Prometheus text, and its figures move with traffic:
//! orders placed, a duplicate and an undecodable record injected, a reload
//! that traps and is rolled back, a reload that is refused.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use support::*;

/// Every sample of a Prometheus text by `name{labels}`, as written; panics on
/// a line that is neither a `# HELP`/`# TYPE` comment nor `series value`, or
/// on a series written twice.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(_), _) => {}
                (Some("TYPE"), Some(name), Some("counter" | "gauge" | "histogram")) => {
                    assert!(typed.insert(name.to_owned()), "type given twice: {line}");
                }
                _ => panic!("bad comment: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(
            typed.iter().any(|t| name == t || name.strip_prefix(t.as_str()).is_some_and(|s| s.starts_with('_'))),
            "sample before its TYPE: {line}"
        );
        assert!(samples.insert(series.to_owned(), value).is_none(), "series written twice: {line}");
    }
    samples
}

async fn scrape(client: &reqwest::Client, port: u16) -> BTreeMap<String, f64> {
    let response = client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    parse(&response.text().await.unwrap())
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or_else(|| panic!("no {series} among {:#?}", samples.keys()))
}

fn order() -> Value {
    json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
        "payment": { "card_number": "4242 4242 4242 4242" }
    })
}

/// Places `n` orders and waits until each is confirmed.
async fn place_confirmed(client: &reqwest::Client, gateway: &str, n: usize) {
    let mut ids = Vec::new();
    for _ in 0..n {
        let response = client.post(format!("{gateway}/order")).json(&order()).send().await.unwrap();
        assert_eq!(response.status(), 202);
        ids.push(response.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned());
    }
    for id in ids {
        let url = format!("{gateway}/order/{id}");
        let status = eventually(Duration::from_secs(60), &format!("order {id} to be final"), || async {
            let o = get_json(client, &url).await?;
            let status = o["status"].as_str()?.to_owned();
            (status != "PENDING" && status != "STOCK_RESERVED").then_some(status)
        })
        .await;
        assert_eq!(status, "CONFIRMED", "order {id}");
    }
}

fn sha(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic() {
    let brokers = brokers();
    let dir = temp_dir("metrics");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    wait_healthy(&client, ports).await;

    let before: BTreeMap<u16, _> =
        futures::future::join_all(ports.all().map(|p| async move { (p, scrape(&reqwest::Client::new(), p).await) }))
            .await
            .into_iter()
            .collect();
    for (port, samples) in &before {
        assert_eq!(value(samples, "shop_broker_up"), 1.0, "port {port}");
    }
    let order_before = &before[&ports.order];
    assert_eq!(value(order_before, r#"shop_consumer_up{component="order"}"#), 1.0);
    let handled_before = value(order_before, r#"shop_events_handled_total{component="order"}"#);
    // librdkafka reports lags in its statistics, every second; a partition
    // no record ever reached has no commit, and is caught up all the same.
    let orders_topic = format!("{prefix}orders");
    let lag = format!(r#"shop_consumer_lag{{component="order",topic="{orders_topic}",partition="#);
    let lags = |s: &BTreeMap<String, f64>| -> Vec<f64> {
        s.iter().filter(|(k, _)| k.starts_with(&lag)).map(|(_, v)| *v).collect()
    };
    eventually(Duration::from_secs(20), "a lag of 0 on the three empty partitions", || async {
        (lags(&scrape(&client, ports.order).await) == [0.0; 3]).then_some(())
    })
    .await;

    // Traffic: orders, then a copy of one and a record that is no envelope.
    place_confirmed(&client, &gateway, 5).await;
    let placed = {
        let reader = reader(&brokers, &[&orders_topic]);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(std::time::Instant::now() < deadline, "no OrderPlaced read back");
            // None: nothing yet, or the poll served a rebalance.
            let Some(message) = reader.poll(Duration::from_millis(200)) else { continue };
            let message = message.unwrap();
            let value = event_json(&headers_of(&message), message.payload().unwrap()).expect("a CloudEvent");
            if value["type"] == "OrderPlaced" {
                break (message.key().unwrap().to_vec(), message.payload().unwrap().to_vec(), headers_of(&message));
            }
        }
    };
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let headers = placed.2.iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (key, value)| {
        h.insert(rdkafka::message::Header { key, value: Some(value) })
    });
    producer.send(BaseRecord::to(&orders_topic).key(&placed.0).payload(&placed.1).headers(headers)).unwrap();
    producer.send(BaseRecord::to(&orders_topic).key("garbage").payload("not an envelope")).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    // A version that traps on every payment, rolled back by its canary
    // watch; then bytes that are no component, refused.
    let admin = format!("http://127.0.0.1:{}/components/payment/reload", ports.admin);
    let reload = |bytes: Vec<u8>| client.post(&admin).bearer_auth(ADMIN_TOKEN).body(bytes).send();
    let trap = reload(std::fs::read(component("payment-trap")).unwrap()).await.unwrap();
    assert_eq!(trap.status(), 200, "{}", trap.text().await.unwrap());
    place_confirmed(&client, &gateway, 4).await;
    let refused = reload(b"not wasm".to_vec()).await.unwrap();
    assert!(refused.status().is_client_error(), "{}", refused.status());

    let order = eventually(Duration::from_secs(30), "the duplicate and the dead letter to be counted", || async {
        let s = scrape(&client, ports.order).await;
        (value(&s, r#"shop_events_duplicates_total{component="order"}"#) >= 1.0
            && value(&s, r#"shop_events_dead_lettered_total{component="order"}"#) >= 1.0)
            .then_some(s)
    })
    .await;
    // OrderPlaced and the payment's answer, for each of the 9 orders.
    let handled = value(&order, r#"shop_events_handled_total{component="order"}"#) - handled_before;
    assert!(handled >= 18.0, "order handled {handled} more");
    let stage = |s: &BTreeMap<String, f64>, component: &str, stage: &str| {
        value(s, &format!(r#"shop_stage_duration_seconds_count{{component="{component}",stage="{stage}"}}"#))
    };
    for name in ["decode", "dedup", "call", "commit", "durable_wait", "publish"] {
        assert!(stage(&order, "order", name) > stage(order_before, "order", name), "stage {name} did not move");
    }
    let call_sum = value(&order, r#"shop_stage_duration_seconds_sum{component="order",stage="call"}"#);
    assert!(call_sum > 0.0, "{call_sum}");
    eventually(Duration::from_secs(20), "the order consumer's lag per partition", || async {
        let partitions = lags(&scrape(&client, ports.order).await);
        (partitions.len() == 3 && partitions.iter().all(|v| *v >= 0.0)).then_some(())
    })
    .await;
    for gauge in ["shop_timers_pending", "shop_outbox_pending", "shop_state_corrupt_entries"] {
        assert!(value(&order, &format!(r#"{gauge}{{component="order"}}"#)) >= 0.0);
    }
    assert_eq!(value(&order, r#"shop_state_up{component="order"}"#), 1.0);

    let payment = scrape(&client, ports.payment).await;
    let payment_series = |series: &str| value(&payment, &format!("{series}{{component=\"payment\"{}", "}"));
    assert_eq!(payment_series("shop_canary_rollbacks_total"), 1.0);
    assert_eq!(value(&payment, r#"shop_reloads_total{component="payment",result="accepted"}"#), 1.0);
    assert_eq!(value(&payment, r#"shop_reloads_total{component="payment",result="rejected"}"#), 1.0);
    let traps = value(&payment, r#"shop_guest_traps_total{component="payment",kind="unreachable"}"#);
    assert!(traps >= 3.0, "the trapping version's panics: {traps}");
    assert!(value(&payment, r#"shop_events_failed_total{component="payment",error="canary"}"#) >= 3.0);
    let serving = format!(r#"shop_component_version{{component="payment",version="{}"}}"#, sha(&component("payment")));
    assert_eq!(value(&payment, &serving), 1.0, "the restored version serves");
    assert!(payment_series("shop_events_handled_total") >= 9.0);

    let gateway_samples = scrape(&client, ports.gateway).await;
    let requests = |route: &str, method: &str, status: u16| {
        let series = format!(
            r#"shop_http_request_duration_seconds_count{{route="{route}",method="{method}",status="{status}"}}"#
        );
        gateway_samples.get(&series).copied().unwrap_or(0.0)
    };
    assert_eq!(requests("/order", "POST", 202), 9.0);
    assert!(requests("/order/{id}", "GET", 200) >= 9.0, "{gateway_samples:#?}");
    let inf = r#"shop_http_request_duration_seconds_bucket{route="/order",method="POST",status="202",le="+Inf"}"#;
    assert_eq!(value(&gateway_samples, inf), 9.0);
    assert!(!gateway_samples.keys().any(|k| k.contains("/metrics")), "scrapes are not timed");
    drop(host);
}
