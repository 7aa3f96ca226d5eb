//! The host's pipeline with in-memory adapters (no broker): the four real
//! components, the in-memory bus and store, a manual clock. Proves the saga,
//! the envelopes and dead-lettering without Kafka.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use shop_host::bus::{Inbound, MemoryBus, Outbound, Publisher};
use shop_host::clock::{Clock, ManualClock};
use shop_host::envelope::Envelope;
use shop_host::pipeline::{Disposition, Pipeline, RetryPolicy, Topics, Turn, settle};
use shop_host::runtime::{CanaryPolicy, Engine, Grants, Limits, LoadedComponent, Request, ServiceRuntime, ServiceSpec};
use shop_host::state::MemoryStore;
use shop_host::vault::{DEFAULT_TTL, Vault, VaultKey};
use tokio_util::sync::CancellationToken;

struct World {
    bus: Arc<MemoryBus>,
    clock: Arc<ManualClock>,
    /// Services whose pipelines receive nothing (as if they were down).
    paused: Vec<&'static str>,
    /// Pipelines and the logical topics each consumes.
    pipelines: Vec<(Arc<Pipeline>, Vec<&'static str>)>,
    /// How far each pipeline has read each physical topic.
    cursors: HashMap<(usize, String), usize>,
    topics: Topics,
    /// The card vault the payment service redeems from.
    vault: Arc<Vault>,
}

impl World {
    fn new() -> Self {
        Self::with_order_config(&[])
    }

    fn with_order_config(order_config: &[(&str, &str)]) -> Self {
        let engine = Engine::new().unwrap();
        let manual = Arc::new(ManualClock::at(1_000));
        let clock: Arc<dyn Clock> = manual.clone();
        let topics = Topics { prefix: "mem-".into(), dead_letter: "dead-letters".into() };
        let key = VaultKey::from_bytes([7; 32]);
        let vault = Arc::new(Vault::open(Arc::new(MemoryStore::default()), &key, clock.clone(), DEFAULT_TTL).unwrap());
        let specs: [(&str, Vec<&str>); 4] = [
            ("payment", vec!["payments"]),
            ("order", vec!["orders", "payments"]),
            ("email", vec!["emails"]),
            ("analytics", vec!["orders", "payments", "emails", "analytics"]),
        ];
        let pipelines = specs
            .into_iter()
            .map(|(name, consumes)| {
                let component = LoadedComponent::from_file(&engine, &support::component(name)).unwrap();
                let mut config = HashMap::from([("max_amount_cents".to_owned(), "10000".to_owned())]);
                if name == "order" {
                    config.insert("catalog".into(), "book | Book | 1250".into());
                    config.extend(order_config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
                }
                let service = Arc::new(ServiceRuntime::new(
                    engine.clone(),
                    ServiceSpec {
                        name: name.into(),
                        component,
                        store: Arc::new(MemoryStore::default()),
                        config,
                        clock: clock.clone(),
                        limits: Limits { timeout: Duration::from_secs(1), ..Limits::default() },
                        canary: CanaryPolicy::default(),
                        grants: Grants { vault: name == "payment", ..Grants::default() },
                    },
                ));
                service.set_vault(vault.clone());
                let retry =
                    RetryPolicy { max_attempts: 2, first_backoff: Duration::from_millis(1), ..RetryPolicy::default() };
                (Arc::new(Pipeline::new(service, topics.clone(), retry, clock.clone())), consumes)
            })
            .collect();
        Self {
            bus: Arc::new(MemoryBus::default()),
            clock: manual,
            paused: Vec::new(),
            pipelines,
            cursors: HashMap::new(),
            topics,
            vault,
        }
    }

    fn service(&self, name: &str) -> &Arc<ServiceRuntime> {
        self.pipelines.iter().map(|(p, _)| p.service()).find(|s| s.name() == name).unwrap()
    }

    fn place(&self, order_id: &str, card: &str, quantity: u32) {
        let data = json!({
            "order_id": order_id,
            "customer": { "name": "Ada", "email": "ada@example.com" },
            "items": [ { "sku": "book", "quantity": quantity, "unit_price_cents": 1250 } ],
            "total_cents": 1250 * quantity,
            "card": futures::executor::block_on(self.vault.deposit(card)).unwrap(),
        });
        let envelope = Envelope::originate("OrderPlaced", order_id, "test", 1, data);
        self.bus.push(Outbound {
            topic: "mem-orders".into(),
            key: order_id.into(),
            value: envelope.value(),
            headers: envelope.header_bytes(None),
        });
    }

    /// Delivers every record to every subscribed pipeline until nothing moves.
    async fn settle(&mut self) -> Vec<(String, String)> {
        let shutdown = CancellationToken::new();
        let mut dead = Vec::new();
        loop {
            let mut moved = false;
            for (index, (pipeline, consumes)) in self.pipelines.iter().enumerate() {
                if self.paused.contains(&pipeline.service().name()) {
                    continue;
                }
                for logical in consumes {
                    let topic = self.topics.physical(logical);
                    let records = self.bus.records(&topic);
                    let cursor = self.cursors.entry((index, topic.clone())).or_default();
                    while *cursor < records.len() {
                        let record = &records[*cursor];
                        let inbound = Inbound {
                            topic: topic.clone(),
                            partition: 0,
                            offset: *cursor as i64,
                            key: Some(record.key.clone().into_bytes()),
                            value: Some(record.value.clone()),
                            headers: record.headers.clone(),
                        };
                        let disposition = pipeline.process(&inbound, &shutdown).await.unwrap();
                        if let Disposition::DeadLetter { reason, .. } = &disposition {
                            dead.push((pipeline.service().name().to_owned(), reason.clone()));
                        }
                        settle(
                            pipeline.service(),
                            &*self.bus,
                            disposition,
                            Turn::default(),
                            &pipeline.dead_letter_topic(),
                        )
                        .await
                        .unwrap();
                        *cursor += 1;
                        moved = true;
                    }
                }
            }
            if !moved {
                return dead;
            }
        }
    }

    /// Moves the clock to `now_ms` and delivers every timer due by then.
    async fn advance_to(&mut self, now_ms: u64) {
        self.clock.set(now_ms);
        let shutdown = CancellationToken::new();
        for (pipeline, _) in &self.pipelines {
            if !self.paused.contains(&pipeline.service().name()) {
                let publisher: &dyn Publisher = &*self.bus;
                shop_host::scheduler::fire_due(pipeline, publisher, &*self.clock, &shutdown).await.unwrap();
            }
        }
    }

    async fn query(&self, service: &str, path_and_query: &str) -> Value {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let request = Request { method: "GET".into(), path: path.into(), query: query.into(), body: vec![] };
        let response = self.service(service).query(&request).await.unwrap();
        serde_json::from_slice(&response.body).unwrap()
    }
}

#[tokio::test]
async fn the_saga_runs_on_in_memory_adapters() {
    let mut world = World::new();
    world.place("o-ok", "4242424242424242", 2);
    world.place("o-declined", "4000000000000002", 1);
    world.place("o-limit", "4242424242424242", 9); // 112.50 > 100.00
    let dead = world.settle().await;
    assert!(dead.is_empty(), "{dead:?}");

    for (id, status) in [("o-ok", "CONFIRMED"), ("o-declined", "REJECTED"), ("o-limit", "REJECTED")] {
        let order = world.query("order", &format!("/orders/{id}")).await;
        assert_eq!(order["status"], status, "{order}");
        let emails = world.query("email", &format!("/emails?order={id}")).await;
        assert_eq!(emails.as_array().unwrap().len(), 1, "{emails}");
    }
    let stats = world.query("analytics", "/stats").await;
    assert_eq!(
        (
            &stats["orders_placed"],
            &stats["orders_confirmed"],
            &stats["orders_rejected"],
            &stats["revenue_cents"],
            &stats["emails_sent"]
        ),
        (&json!(3), &json!(1), &json!(2), &json!(2500), &json!(3)),
        "{stats}"
    );

    // Envelopes: causation chains back to the OrderPlaced, correlation is shared.
    let placed: Envelope = {
        let r = &world.bus.records("mem-orders")[0];
        Envelope::decode(&r.headers, None, Some(&r.value))
    }
    .unwrap();
    let requests: Vec<Envelope> = world
        .bus
        .records("mem-payments")
        .iter()
        .map(|r| Envelope::decode(&r.headers, None, Some(&r.value)).unwrap())
        .collect();
    let request = requests.iter().find(|e| e.order_id == "o-ok" && e.event_type == "PaymentRequested").unwrap();
    assert_eq!(request.causation_id.as_deref(), Some(placed.id.as_str()));
    assert_eq!(request.correlation_id, placed.correlation_id);
    assert!(request.producer().starts_with("order@"));
    assert!(!request.data.to_string().is_empty());
}

#[tokio::test]
async fn redelivered_events_change_nothing() {
    let mut world = World::new();
    world.place("o1", "4242424242424242", 1);
    world.settle().await;
    let before: BTreeMap<&str, Value> = BTreeMap::from([
        ("order", world.query("order", "/orders/o1").await),
        ("stats", world.query("analytics", "/stats").await),
        ("emails", world.query("email", "/emails?order=o1").await),
        ("ledger", world.query("payment", "/payments/o1").await),
    ]);
    assert!(before["stats"]["events_by_type"].as_object().is_some_and(|counts| !counts.is_empty()));
    // Every record of every topic is delivered a second time.
    world.cursors.clear();
    world.settle().await;
    let after: BTreeMap<&str, Value> = BTreeMap::from([
        ("order", world.query("order", "/orders/o1").await),
        ("stats", world.query("analytics", "/stats").await),
        ("emails", world.query("email", "/emails?order=o1").await),
        ("ledger", world.query("payment", "/payments/o1").await),
    ]);
    // Every counter, events_by_type and events_by_topic included: a
    // redelivery counted anywhere would show.
    assert_eq!(after, before);
}

#[tokio::test]
async fn undecodable_records_are_dead_lettered_with_the_reason() {
    let mut world = World::new();
    world.bus.push(Outbound {
        topic: "mem-orders".into(),
        key: "x".into(),
        value: b"not an envelope".to_vec(),
        headers: vec![],
    });
    let bad_payload = Envelope::originate("OrderPlaced", "o2", "test", 1, json!({"order_id": 7}));
    world.bus.push(Outbound {
        topic: "mem-orders".into(),
        key: "o2".into(),
        value: bad_payload.value(),
        headers: bad_payload.header_bytes(None),
    });
    let dead = world.settle().await;
    let dead_letters = world.bus.records("mem-dead-letters");
    assert!(dead.iter().any(|(c, r)| c == "order" && r.contains("not an event this host reads")), "{dead:?}");
    assert!(dead.iter().any(|(c, r)| c == "order" && r.contains("malformed OrderPlaced payload")), "{dead:?}");
    let first = &dead_letters[0];
    assert_eq!(first.value, b"not an envelope");
    let header = |name: &str| {
        first.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert!(header("dlq-reason").unwrap().contains("not an event this host reads"));
    assert_eq!(header("dlq-source").as_deref(), Some("mem-orders/0/0"));
}

#[tokio::test]
async fn a_payment_deadline_fires_from_a_durable_timer_and_nothing_is_charged() {
    let mut world = World::with_order_config(&[("payment_deadline_ms", "5000"), ("compensation_retry_ms", "1000")]);
    world.paused.push("payment");
    world.place("late", "4242424242424242", 1);
    world.settle().await;
    assert_eq!(world.query("order", "/orders/late").await["status"], "PENDING");
    let order_store = world.service("order").state_store().clone();
    assert_eq!(order_store.timer_count().unwrap(), 1, "the deadline is a stored timer");

    world.advance_to(6_000).await;
    world.settle().await;
    let cancelled = world.query("order", "/orders/late").await;
    assert_eq!((&cancelled["status"], &cancelled["compensation"]["kind"]), (&json!("CANCELLED"), &json!("void")));
    // Nobody answers the void: it is sent again, with growing delays.
    for now in [7_000, 9_000, 13_000] {
        world.advance_to(now).await;
        world.settle().await;
    }
    let voids = world
        .bus
        .records("mem-payments")
        .iter()
        .filter(|r| Envelope::decode(&r.headers, None, Some(&r.value)).unwrap().event_type == "PaymentVoidRequested")
        .count();
    assert!(voids >= 3, "the void was retried: {voids}");

    // Payment comes back: the request is past its deadline, nothing is charged.
    world.paused.clear();
    world.settle().await;
    world.advance_to(60_000).await;
    world.settle().await;
    let order = world.query("order", "/orders/late").await;
    assert_eq!(order["compensation"]["done"], true, "{order}");
    let ledger = world.query("payment", "/payments/late").await;
    assert_eq!(ledger["captured_cents"], 0, "{ledger}");
    let emails = world.query("email", "/emails?order=late").await;
    assert_eq!(emails.as_array().unwrap().len(), 1, "{emails}");
    assert_eq!(emails[0]["kind"], "order_cancelled");
    assert_eq!(order_store.timer_count().unwrap(), 0, "no timer left behind");
    assert_eq!(order_store.outbox_count().unwrap(), 0, "everything published");
}
