//! The operator's console on the admin port: `GET /console` serves a static
//! page, and `GET /overview` gives it, in one call, every component's
//! version, status, rate, lag, reload history and shadow run, the recent
//! orders with their saga timeline, and the dead letters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shop_events::OrderPlaced;

use super::{Admin, Managed};
use crate::kafka::dlq::{DeadLetters, Filter};
use crate::runtime::Request;
use crate::status::BrokerLink;

/// The page. It holds no data: everything comes from `/overview` with the token.
const PAGE: &str = include_str!("../../static/console.html");

/// Order ids remembered for the console.
const RECENT_ORDERS: usize = 12;

/// Dead letters shown, the newest.
const DEAD_LETTERS_SHOWN: usize = 50;

/// How long a reading of the dead-letter topic is reused: reading it means
/// reading the topic to its end, too much for every poll of every open page.
const DEAD_LETTERS_FRESH: Duration = Duration::from_secs(3);

/// Shortest interval a rate is measured over; polls closer together reuse
/// the last rate rather than divide a few events by a few milliseconds.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// The ids of the last orders the gateway had acknowledged, newest last.
/// Kept by this host only: with several gateway hosts each console shows
/// the orders its own gateway took.
#[derive(Debug, Clone, Default)]
pub struct RecentOrders(Arc<Mutex<VecDeque<String>>>);

impl RecentOrders {
    /// Remembers `order_id`, forgetting the oldest past [`RECENT_ORDERS`].
    pub fn push(&self, order_id: &str) {
        let mut ids = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ids.retain(|id| id != order_id);
        ids.push_back(order_id.to_owned());
        while ids.len() > RECENT_ORDERS {
            ids.pop_front();
        }
    }

    /// The remembered ids, newest first.
    pub fn newest_first(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().rev().cloned().collect()
    }
}

/// A gateway backend that remembers each order it got acknowledged, for
/// the console, and otherwise does what `inner` does.
pub struct Recording<B> {
    inner: B,
    recent: RecentOrders,
}

impl<B> Recording<B> {
    /// Wraps `inner`, remembering into `recent`.
    pub fn new(inner: B, recent: RecentOrders) -> Self {
        Self { inner, recent }
    }
}

impl<B: gateway::Backend> gateway::Backend for Recording<B> {
    fn place_order(&self, order: OrderPlaced) -> gateway::BoxFuture<'_, Result<(), gateway::PlaceError>> {
        Box::pin(async move {
            let order_id = order.order_id.clone();
            self.inner.place_order(order).await?;
            self.recent.push(&order_id);
            Ok(())
        })
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.unavailable()
    }

    fn idempotency(&self, key_digest: &str) -> gateway::BoxFuture<'_, Result<Option<String>, gateway::BackendError>> {
        self.inner.idempotency(key_digest)
    }

    fn order_status(
        &self,
        order_id: &str,
    ) -> gateway::BoxFuture<'_, Result<Option<serde_json::Value>, gateway::BackendError>> {
        self.inner.order_status(order_id)
    }

    fn catalog(&self) -> gateway::BoxFuture<'_, Result<Vec<shop_events::CatalogItem>, gateway::BackendError>> {
        self.inner.catalog()
    }

    fn vault_card(
        &self,
        order_id: &str,
        number: String,
    ) -> gateway::BoxFuture<'_, Result<shop_events::CardToken, gateway::BackendError>> {
        self.inner.vault_card(order_id, number)
    }
}

/// What the console is given by the host.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Orders taken by this host's gateway (empty without a gateway).
    pub recent: RecentOrders,
    /// The component asked `GET /orders/{id}` for an order's timeline.
    pub order_component: String,
    /// Whether Kafka can be reached, as `/health` reports it.
    pub link: BrokerLink,
    /// The app's topic names (a dead letter's event names its logical topic).
    pub topics: crate::pipeline::Topics,
    /// Who publishes and who consumes each event type on each topic.
    pub topology: Vec<crate::manifest::topology::Flow>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            recent: RecentOrders::default(),
            order_component: "order".into(),
            link: BrokerLink::default(),
            topics: crate::pipeline::Topics::default(),
            topology: Vec::new(),
        }
    }
}

/// The console's own state: its settings, the last sample of each
/// component's handled count, the last reading of the dead letters.
#[derive(Debug)]
pub(super) struct Console {
    settings: ConsoleSettings,
    samples: Mutex<HashMap<String, Sample>>,
    dead_letters: tokio::sync::Mutex<Option<(Instant, Value)>>,
}

impl Console {
    /// The app's topic names.
    pub(super) fn topics(&self) -> crate::pipeline::Topics {
        self.settings.topics.clone()
    }

    pub(super) fn new(settings: ConsoleSettings) -> Self {
        Self { settings, samples: Mutex::default(), dead_letters: tokio::sync::Mutex::default() }
    }
}

/// A component's handled count at a moment, and the rate last measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: Instant,
    pub(super) handled: u64,
    pub(super) rate: f64,
}

/// Events per second between `previous` and `handled` at `now`; the new
/// sample to keep. A count that went down (a restart) starts over.
pub(super) fn rate(previous: Option<Sample>, now: Instant, handled: u64) -> Sample {
    match previous {
        None => Sample { at: now, handled, rate: 0.0 },
        Some(previous) if handled < previous.handled => Sample { at: now, handled, rate: 0.0 },
        Some(previous) => {
            let elapsed = now.saturating_duration_since(previous.at);
            if elapsed < RATE_WINDOW {
                return previous;
            }
            let rate = (handled - previous.handled) as f64 / elapsed.as_secs_f64();
            Sample { at: now, handled, rate }
        }
    }
}

/// `GET /console`: the page (no data in it, so no token needed to load it).
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Everything the page runs is in it; it talks to its own origin only.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /overview`: components, recent orders and dead letters in one answer.
pub(super) async fn overview(State(admin): State<Admin>) -> Response {
    let console = &admin.console;
    let mut components = serde_json::Map::new();
    for (name, managed) in admin.services.iter() {
        components.insert(name.clone(), component(console, name, managed).await);
    }
    let orders = orders(&admin).await;
    let dead_letters = match admin.dead_letters.as_ref() {
        Some(dead_letters) => dead_letters_cached(console, dead_letters).await,
        None => json!({ "error": "this host reads no dead-letter topic" }),
    };
    let broker_down = console.settings.link.down();
    Json(json!({
        "now_ms": crate::clock::unix_ms(std::time::SystemTime::now()),
        "broker_unreachable": broker_down.map(|d| d.reason),
        "components": components,
        "orders": orders,
        "dead_letters": dead_letters,
        "topology": console.settings.topology,
    }))
    .into_response()
}

/// One component's line: what `/health` would say of it, its rate, its
/// history, and the report of its shadow run (the run on or the last one;
/// null if none ran).
async fn component(console: &Console, name: &str, managed: &Managed) -> Value {
    let current = managed.service.current();
    let mut value = json!({
        "version": current.sha256,
        "source": current.path,
        "loaded_at_ms": crate::clock::unix_ms(current.loaded_at),
        "history": managed.service.history(),
        "previous_version": managed.service.previous().map(|previous| previous.sha256.clone()),
        // The run on, or the last one, so that its outcome stays in view.
        "shadow": managed.service.shadow().map(|shadow| shadow.status()),
    });
    let Some(status) = managed.status.as_ref() else {
        // Loaded only to answer the gateway's queries: no consumer here.
        value["status"] = json!("not consuming here");
        return value;
    };
    let consumer = status.snapshot();
    let store = managed.service.state_store().clone();
    let counts = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::state::StoreError>((store.timer_count()?, store.outbox_count()?, store.corrupt_entries()?))
    })
    .await
    .unwrap_or_else(|err| Err(crate::state::StoreError::Unavailable(err.to_string())));
    let sample = {
        let mut samples = console.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let sample = rate(samples.get(name).copied(), Instant::now(), consumer.handled);
        samples.insert(name.to_owned(), sample);
        sample
    };
    let known: Vec<i64> = consumer.lag.values().copied().filter(|lag| *lag >= 0).collect();
    let healthy = consumer.consuming && console.settings.link.down().is_none();
    let (status, timers, outbox, corrupt, state_error) = match counts {
        Ok((timers, outbox, corrupt)) => {
            let status = if healthy && corrupt.count == 0 { "ok" } else { "degraded" };
            (status, json!(timers), json!(outbox), json!(corrupt.count), None)
        }
        Err(err) => ("degraded", Value::Null, Value::Null, Value::Null, Some(err.to_string())),
    };
    for (key, field) in [
        ("status", json!(status)),
        ("rate_per_s", json!((sample.rate * 10.0).round() / 10.0)),
        ("lag", if known.is_empty() { Value::Null } else { json!(known.iter().sum::<i64>()) }),
        ("lag_by_partition", json!(consumer.lag)),
        ("handled", json!(consumer.handled)),
        ("dead_lettered", json!(consumer.dead_lettered)),
        ("duplicates_dropped", json!(consumer.duplicates_dropped)),
        ("timers_pending", timers),
        ("outbox_pending", outbox),
        ("corrupt_entries", corrupt),
        ("last_error", json!(consumer.last_error)),
        ("state_error", json!(state_error)),
    ] {
        value[key] = field;
    }
    value
}

/// The recent orders, newest first, each with what the order component
/// says of it now (status and timeline), or why it could not say.
async fn orders(admin: &Admin) -> Vec<Value> {
    let ids = admin.console.settings.recent.newest_first();
    let Some(order) = admin.services.get(&admin.console.settings.order_component) else {
        return ids.into_iter().map(|id| json!({ "order_id": id, "error": "no order component here" })).collect();
    };
    let mut orders = Vec::with_capacity(ids.len());
    for id in ids {
        let request =
            Request { method: "GET".into(), path: format!("/orders/{id}"), query: String::new(), body: Vec::new() };
        let value = match order.service.query(&request).await {
            Ok(response) if response.status == 200 => serde_json::from_slice::<Value>(&response.body)
                .unwrap_or_else(|err| json!({ "error": format!("the order service answered invalid JSON: {err}") })),
            // Taken by the gateway, not yet handled by the order service.
            Ok(response) if response.status == 404 => json!({ "status": "SENT", "history": [] }),
            Ok(response) => json!({ "error": format!("the order service answered {}", response.status) }),
            Err(err) => json!({ "error": err.to_string() }),
        };
        let mut value = if value.is_object() { value } else { json!({ "error": "not an object" }) };
        value["order_id"] = json!(id);
        orders.push(value);
    }
    orders
}

/// The newest dead letters, read again at most every [`DEAD_LETTERS_FRESH`].
async fn dead_letters_cached(console: &Console, dead_letters: &DeadLetters) -> Value {
    // Held while reading: concurrent polls wait for one reading, not make more.
    let mut cached = console.dead_letters.lock().await;
    if let Some((at, value)) = cached.as_ref()
        && at.elapsed() < DEAD_LETTERS_FRESH
    {
        return value.clone();
    }
    let value = match dead_letters.list(&Filter { component: None, since_ms: None }).await {
        Ok(letters) => {
            let total = letters.len();
            let newest: Vec<_> = letters.iter().rev().take(DEAD_LETTERS_SHOWN).collect();
            let pending = letters.iter().filter(|l| l.replayed.is_none()).count();
            json!({ "topic": dead_letters.topic(), "total": total, "not_replayed": pending, "items": newest })
        }
        Err(err) => {
            tracing::error!("dead-letter topic: {err:#}");
            json!({ "topic": dead_letters.topic(), "error": "the dead-letter topic cannot be read now; see the host's log" })
        }
    };
    *cached = Some((Instant::now(), value.clone()));
    value
}

/// Forgets the cached dead letters, so that a replay shows at the next poll.
pub(super) async fn forget_dead_letters(console: &Console) {
    *console.dead_letters.lock().await = None;
}
