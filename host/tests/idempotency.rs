//! `Idempotency-Key` on a real Apache Kafka broker: the key is bound to the
//! order it was first used for. The same order again is the same id and is
//! not published twice; another order under the key is 409 and names no
//! order; a bad key is 400; and a second body that reaches the order service
//! under a bound key (as through a second gateway) is ignored and logged.

mod support;

use std::time::Duration;

use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use shop_host::envelope::Envelope;
use support::*;

fn order(quantity: u32) -> Value {
    json!({
        "customer": { "name": "Grace Hopper", "email": "grace@example.com" },
        "items": [ { "sku": "book", "quantity": quantity, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242 4242 4242 4242" }
    })
}

/// Every `OrderPlaced` on the orders topic, read by a consumer of our own.
fn orders_placed(brokers: &str, topic: &str) -> Vec<Value> {
    let consumer = reader(brokers, &[topic]);
    let (mut placed, mut idle) = (Vec::new(), 0);
    while idle < 12 {
        match consumer.poll(Duration::from_millis(250)) {
            Some(Ok(message)) => {
                idle = 0;
                let envelope =
                    event_json(&headers_of(&message), message.payload().unwrap_or_default()).expect("a CloudEvent");
                if envelope["type"] == "OrderPlaced" {
                    placed.push(envelope["data"].clone());
                }
            }
            Some(Err(err)) => panic!("reader failed: {err}"),
            None => idle += 1,
        }
    }
    placed
}

async fn place(client: &reqwest::Client, gateway: &str, key: &str, body: String) -> (u16, Value) {
    let response = client
        .post(format!("{gateway}/order"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_bound_to_its_order_on_real_kafka() {
    let brokers = brokers();
    let dir = temp_dir("idempotency");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    wait_healthy(&client, ports).await;
    let key = format!("key-{}", std::process::id());

    let (status, first) = place(&client, &gateway, &key, order(2).to_string()).await;
    assert_eq!(status, 202, "{first}");
    let id = first["order_id"].as_str().unwrap().to_owned();
    let recorded = eventually(Duration::from_secs(30), "the order service records the order", || {
        let url = format!("{gateway}/order/{id}");
        let client = client.clone();
        async move { get_json(&client, &url).await }
    })
    .await;
    // The public view: no card, no customer, no request hash.
    for hidden in ["card_number", "customer", "request_hash"] {
        assert!(recorded.get(hidden).is_none(), "{hidden}: {recorded}");
    }

    // The same order, written differently: the same id, not published again.
    let same = r#"{"payment":{"card_number":"4242424242424242"},"items":[{"sku":"book","unit_price_cents":1250,"quantity":2}],
                   "customer":{"email":"grace@example.com","name":"  Grace Hopper "}}"#;
    let (status, again) = place(&client, &gateway, &key, same.to_owned()).await;
    assert_eq!((status, again["order_id"].as_str()), (202, Some(id.as_str())), "{again}");

    // Another order under the key, by this client or another: 409, no id.
    let (status, reused) = place(&client, &gateway, &key, order(3).to_string()).await;
    assert_eq!((status, reused["error"]["code"].as_str()), (409, Some("idempotency_key_reused")), "{reused}");
    assert!(!reused.to_string().contains(&id), "{reused}");
    // Keys that cannot be bound.
    for bad in [String::new(), "k".repeat(129), "two words".to_owned()] {
        let (status, body) = place(&client, &gateway, &bad, order(1).to_string()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_idempotency_key")), "{bad:?}");
    }

    // A different body under the bound key that reaches the order service
    // anyway (as through a second gateway host, racing the first): ignored.
    let orders_topic = format!("{prefix}orders");
    let placed = orders_placed(&brokers, &orders_topic);
    let ours: Vec<&Value> = placed.iter().filter(|p| p["order_id"] == id.as_str()).collect();
    assert_eq!(ours.len(), 1, "the repeat was not published: {ours:?}");
    assert_eq!(placed.len(), 1, "neither the 409 nor the 400s were published: {placed:?}");
    let mut racing = ours[0].clone();
    let racing_id = uuid::Uuid::new_v4().to_string();
    racing["order_id"] = json!(racing_id);
    racing["items"][0]["quantity"] = json!(7);
    racing["idempotency"]["request_hash"] = json!("another-request");
    let envelope = Envelope::originate("OrderPlaced", &racing_id, "gateway", 1, racing);
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    producer
        .send(BaseRecord::to(&orders_topic).key(&racing_id).payload(&envelope.value()).headers(ce_headers(&envelope)))
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    eventually(Duration::from_secs(30), "the order service logs the ignored order", || {
        let output = host.output();
        let logged = output
            .lines()
            .any(|line| line.contains("Idempotency-Key is bound to another request") && line.contains(&racing_id));
        async move { logged.then_some(()) }
    })
    .await;
    let missing = client.get(format!("{gateway}/order/{racing_id}")).send().await.unwrap();
    assert_eq!(missing.status(), 404, "the racing order is never placed");
    let (status, still) = place(&client, &gateway, &key, order(2).to_string()).await;
    assert_eq!((status, still["order_id"].as_str()), (202, Some(id.as_str())), "the first order keeps the key");
}
