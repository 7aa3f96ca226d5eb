//! Traces with the OpenTelemetry SDK's in-memory exporter and in-memory
//! adapters: an order placed through the gateway with a caller's
//! `traceparent` is one trace from the HTTP request to the email, across
//! every component and a timer (the payment deadline), and every record on
//! the bus carries it.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use shop_host::bus::{Inbound, MemoryBus, Publisher};
use shop_host::clock::{Clock, ManualClock};
use shop_host::envelope::Envelope;
use shop_host::pipeline::{Pipeline, RetryPolicy, Topics, Turn, settle};
use shop_host::runtime::{CanaryPolicy, Engine, Limits, LoadedComponent, ServiceRuntime, ServiceSpec};
use shop_host::state::MemoryStore;
use shop_host::traces::TraceParent;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// The caller's trace: the order must continue it.
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The components on the in-memory bus, each reading its topics.
struct World {
    bus: Arc<MemoryBus>,
    clock: Arc<ManualClock>,
    pipelines: Vec<(Arc<Pipeline>, Vec<&'static str>)>,
    cursors: HashMap<(usize, String), usize>,
    topics: Topics,
    /// Services that receive nothing (as if down).
    paused: Vec<&'static str>,
    /// Where the gateway deposits cards and payment redeems them.
    vault: Arc<shop_host::vault::Vault>,
}

impl World {
    fn new() -> Self {
        let engine = Engine::new().unwrap();
        let clock = Arc::new(ManualClock::at(1_000));
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let topics = Topics { prefix: "mem-".into(), dead_letter: "dead-letters".into() };
        let key = shop_host::vault::VaultKey::from_bytes([7; 32]);
        let store = Arc::new(MemoryStore::default());
        let vault = shop_host::vault::Vault::open(store, &key, dyn_clock.clone(), shop_host::vault::DEFAULT_TTL);
        let vault = Arc::new(vault.unwrap());
        let specs: [(&str, Vec<&str>); 3] =
            [("payment", vec!["payments"]), ("order", vec!["orders", "payments"]), ("email", vec!["emails"])];
        let pipelines = specs
            .into_iter()
            .map(|(name, consumes)| {
                let component = LoadedComponent::from_file(&engine, &support::component(name)).unwrap();
                let mut config = HashMap::from([("max_amount_cents".to_owned(), "10000".to_owned())]);
                if name == "order" {
                    config.insert("payment_deadline_ms".into(), "5000".into());
                    config.insert("catalog".into(), "book | Book | 1250".into());
                }
                let spec = ServiceSpec {
                    name: name.into(),
                    component,
                    store: Arc::new(MemoryStore::default()),
                    config,
                    clock: dyn_clock.clone(),
                    limits: Limits { timeout: Duration::from_secs(1), ..Limits::default() },
                    canary: CanaryPolicy::default(),
                    grants: shop_host::runtime::Grants { vault: name == "payment", ..Default::default() },
                };
                let service = Arc::new(ServiceRuntime::new(engine.clone(), spec));
                service.set_vault(vault.clone());
                let pipeline = Pipeline::new(service, topics.clone(), RetryPolicy::default(), dyn_clock.clone());
                (Arc::new(pipeline), consumes)
            })
            .collect();
        let bus = Arc::new(MemoryBus::default());
        Self { bus, clock, pipelines, cursors: HashMap::new(), topics, paused: vec![], vault }
    }

    fn service(&self, name: &str) -> Arc<ServiceRuntime> {
        self.pipelines.iter().map(|(p, _)| p.service()).find(|s| s.name() == name).unwrap().clone()
    }

    /// Delivers every record to every running pipeline until nothing moves.
    async fn settle(&mut self) {
        let shutdown = CancellationToken::new();
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
                    while let Some(record) = records.get(*cursor) {
                        let inbound = Inbound {
                            topic: topic.clone(),
                            partition: 0,
                            offset: i64::try_from(*cursor).unwrap(),
                            key: Some(record.key.clone().into_bytes()),
                            value: Some(record.value.clone()),
                            headers: record.headers.clone(),
                        };
                        let disposition = pipeline.process(&inbound, &shutdown).await.unwrap();
                        let dead_letters = pipeline.dead_letter_topic();
                        settle(pipeline.service(), &*self.bus, disposition, Turn::default(), &dead_letters)
                            .await
                            .unwrap();
                        *cursor += 1;
                        moved = true;
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Moves the clock to `now_ms` and delivers the timers due by then.
    async fn advance_to(&mut self, now_ms: u64) {
        self.clock.set(now_ms);
        for (pipeline, _) in &self.pipelines {
            let publisher: &dyn Publisher = &*self.bus;
            shop_host::scheduler::fire_due(pipeline, publisher, &*self.clock, &CancellationToken::new()).await.unwrap();
        }
    }

    /// The gateway's router on this world's bus, as the host serves it.
    fn gateway(&self) -> axum::Router {
        let backend = shop_host::gateway_backend::GatewayBackend {
            publisher: self.bus.clone(),
            orders_topic: self.topics.physical("orders"),
            orders: self.service("order"),
            clock: self.clock.clone(),
            link: shop_host::status::BrokerLink::default(),
            vault: self.vault.clone(),
            wire_format: shop_host::manifest::WireFormat::CloudEvents,
        };
        gateway::app(Arc::new(backend)).layer(axum::middleware::from_fn(shop_host::traces::from_request))
    }
}

/// The exported spans' attribute `key`, if set.
fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn an_order_is_one_trace_from_the_request_to_the_email_across_a_timer() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry().with(shop_host::traces::layer(&provider));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut world = World::new();
    // Payment is down: the deadline (a timer) cancels the order and the
    // cancellation email goes out; then payment comes back.
    world.paused.push("payment");
    let body = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242 4242 4242 4242" }
    });
    let request = HttpRequest::post("/order")
        .header("content-type", "application/json")
        .header("traceparent", CALLER)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = world.gateway().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let order_id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["order_id"].as_str().unwrap().to_owned();
    world.settle().await;
    world.advance_to(7_000).await;
    world.settle().await;
    world.paused.clear();
    world.settle().await;
    world.advance_to(60_000).await;
    world.settle().await;

    // Every record of the order carries the caller's trace.
    let caller = TraceParent::parse(CALLER).unwrap();
    let mut types = BTreeSet::new();
    for topic in ["orders", "payments", "emails"] {
        for record in world.bus.records(&world.topics.physical(topic)) {
            let event = Envelope::decode(&record.headers, None, Some(&record.value)).unwrap();
            let trace = TraceParent::from_headers(&record.headers);
            assert_eq!(trace.map(|t| t.trace_id), Some(caller.trace_id), "{} on {topic}", event.event_type);
            types.insert(event.event_type);
        }
    }
    for expected in ["OrderPlaced", "PaymentRequested", "OrderCancelled", "EmailRequested"] {
        assert!(types.contains(expected), "{expected} missing from {types:?}");
    }
    let emails = world.service("email");
    let request = shop_host::runtime::Request {
        method: "GET".into(),
        path: "/emails".into(),
        query: format!("order={order_id}"),
        body: vec![],
    };
    let sent: serde_json::Value = serde_json::from_slice(&emails.query(&request).await.unwrap().body).unwrap();
    assert_eq!(sent.as_array().map(Vec::len), Some(1), "the cancellation email: {sent}");

    // The exported spans: one trace, every stage of every component in it,
    // each a child of a span of that trace (or of the caller's).
    let spans = exporter.get_finished_spans().unwrap();
    let trace_ids: BTreeSet<String> = spans.iter().map(|s| s.span_context.trace_id().to_string()).collect();
    assert_eq!(trace_ids, BTreeSet::from([caller.trace_hex()]), "one trace");
    let ids: BTreeSet<[u8; 8]> = spans.iter().map(|s| s.span_context.span_id().to_bytes()).collect();
    for span in &spans {
        let parent = span.parent_span_id;
        assert!(
            ids.contains(&parent.to_bytes()) || parent.to_bytes() == caller.span_id,
            "{} has a parent outside the trace",
            span.name
        );
    }
    let stages: BTreeSet<(String, String)> = spans
        .iter()
        .filter_map(|s| Some((attribute(s, "component")?, s.name.to_string())))
        .filter(|(_, name)| name != "event")
        .collect();
    for component in ["order", "payment", "email"] {
        for stage in ["handle", "commit", "publish"] {
            if component == "email" && stage == "publish" {
                continue; // the email component emits nothing
            }
            assert!(stages.contains(&(component.into(), stage.into())), "{component}/{stage} missing: {stages:?}");
        }
    }
    assert!(stages.contains(&("gateway".into(), "place_order".into())), "{stages:?}");
    let versioned = spans.iter().filter(|s| attribute(s, "version").is_some_and(|v| v.len() == 64)).count();
    assert!(versioned > 5, "stages carry the component's version");
    let timer_events = spans
        .iter()
        .filter(|s| s.name == "event" && attribute(s, "event_type").is_some_and(|t| t == "PaymentDeadline"))
        .count();
    let handled: Vec<String> =
        spans.iter().filter(|s| s.name == "event").filter_map(|s| attribute(s, "event_type")).collect();
    assert!(timer_events >= 1, "the deadline's delivery is in the trace: {handled:?}");
}
