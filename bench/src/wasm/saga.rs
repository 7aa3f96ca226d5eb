//! Realistic event sequences for each component: orders run through the
//! four components' native logic, each record delivered to every component
//! subscribed to its topic (as the manifest says), and each component's
//! deliveries kept in order. Ids, envelopes and headers are made the way
//! the host makes them.

use std::collections::{BTreeMap, VecDeque};
#[cfg(test)]
use std::path::Path;

use shop_events::{Customer, LineItem, OrderPlaced, topics, types};
use shop_host::envelope::{Envelope, raw, source_of};
use shop_sdk::{Event, HandleError, MemoryHost, Outgoing, Service};
use uuid::Uuid;

use crate::manifest::Manifest;

/// Namespace of the ids made here (uuid v5, as the host derives them).
const IDS: Uuid = Uuid::from_u128(0x1b6c_55f0_8e0d_4c3a_9f7e_2d4b_6a8c_0e13);

/// One event as a component receives it, with its envelope's fields.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// What the component's `handle` gets (topic: logical).
    pub event: Event,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    /// The envelope's `producer`.
    pub producer: String,
}

impl Delivered {
    fn new(
        topic: &str,
        event_type: &str,
        key: &str,
        payload: Vec<u8>,
        cause: Option<&Self>,
        producer: &str,
        now_ms: u64,
    ) -> Self {
        let (id, correlation_id) = match cause {
            Some(cause) => {
                let id = Uuid::new_v5(&IDS, format!("{}/{event_type}/{key}", cause.event.id).as_bytes()).to_string();
                (id, cause.correlation_id.clone())
            }
            None => {
                let id = Uuid::new_v5(&IDS, format!("{event_type}/{key}").as_bytes()).to_string();
                (id.clone(), id)
            }
        };
        let causation_id = cause.map(|c| c.event.id.clone());
        let mut delivered = Self {
            event: Event {
                id,
                event_type: event_type.to_owned(),
                topic: topic.to_owned(),
                key: Some(key.to_owned()),
                headers: Vec::new(),
                payload,
                timestamp_ms: now_ms,
            },
            correlation_id,
            causation_id,
            producer: producer.to_owned(),
        };
        // As the pipeline builds them: envelope fields, then the record's
        // headers (the CloudEvent's attributes).
        let mut headers = vec![
            ("correlation-id".to_owned(), delivered.correlation_id.clone()),
            ("producer".to_owned(), producer.to_owned()),
        ];
        if let Some(cause) = &delivered.causation_id {
            headers.push(("causation-id".to_owned(), cause.clone()));
        }
        headers.extend(delivered.envelope().headers(None));
        delivered.event.headers = headers;
        delivered
    }

    /// The event as the host reads it off its record.
    pub fn envelope(&self) -> Envelope {
        let data = std::str::from_utf8(&self.event.payload)
            .ok()
            .and_then(|text| serde_json::value::RawValue::from_string(text.to_owned()).ok())
            .unwrap_or_else(|| raw(&serde_json::Value::Null));
        Envelope {
            id: self.event.id.clone(),
            event_type: self.event.event_type.clone(),
            order_id: self.event.key.clone().unwrap_or_default(),
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            timestamp_ms: self.event.timestamp_ms,
            source: source_of(&self.producer),
            data,
        }
    }
}

/// A component's `handle`, built natively.
type Native = fn(&mut MemoryHost, &Event) -> Result<Vec<Outgoing>, HandleError>;

/// The native build of `component`, when the bench links one (its path
/// dependencies: the shop's four); another component of the manifest (one
/// `just new-service` added) has none and is left out of `bench wasm`.
pub fn native(component: &str) -> Option<Native> {
    match component {
        "payment" => Some(payment::Payment::handle),
        "order" => Some(order::OrderService::handle),
        "email" => Some(email::EmailService::handle),
        "analytics" => Some(analytics::Analytics::handle),
        _ => None,
    }
}

/// Calls `component`'s native `handle`.
///
/// # Errors
/// The component's, or a component with no native build.
pub fn handle(component: &str, host: &mut MemoryHost, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
    match native(component) {
        Some(handle) => handle(host, event),
        None => Err(HandleError::Permanent(format!("no native build of component {component:?}"))),
    }
}

/// A fresh native host for `component`, configured as the manifest says.
pub fn host(manifest: &Manifest, component: &str, now_ms: u64) -> MemoryHost {
    let mut host = MemoryHost::at(now_ms).with_card(BENCH_TOKEN, BENCH_CARD);
    if let Some(settings) = manifest.components.get(component) {
        host.config = settings.config.clone();
    }
    host
}

/// The card token of the benchmark's orders; whatever vault the payment
/// service redeems from holds [`BENCH_CARD`] under it.
pub const BENCH_TOKEN: &str = "tok_bench";
/// The accepted test card.
pub const BENCH_CARD: &str = "4242424242424242";

/// The first record of an order, as the gateway publishes it for the
/// benchmark's standard order (one pen, which the shop does not limit, at
/// its catalog price; the accepted card).
fn placed(order_id: &str, now_ms: u64) -> Delivered {
    let item = LineItem { sku: "pen".into(), quantity: 1, unit_price_cents: 199 };
    let payload = OrderPlaced {
        order_id: order_id.to_owned(),
        customer: Customer { name: "Bench".into(), email: "bench@example.com".into() },
        total_cents: item.subtotal_cents(),
        items: vec![item],
        card: shop_events::CardToken { token: BENCH_TOKEN.into(), brand: "visa".into(), last4: "4242".into() },
        idempotency: None,
    };
    let payload = serde_json::to_vec(&payload).unwrap_or_default();
    Delivered::new(topics::ORDERS, types::ORDER_PLACED, order_id, payload, None, "gateway", now_ms)
}

/// Runs `orders` orders through the native components; returns each
/// component's deliveries, in order (none for a component without a
/// native build, which neither sees nor answers the events).
///
/// # Errors
/// When a component fails to handle an event, or an order never ends.
pub fn sequences(manifest: &Manifest, orders: usize, now_ms: u64) -> anyhow::Result<BTreeMap<String, Vec<Delivered>>> {
    let mut hosts: BTreeMap<String, MemoryHost> =
        manifest.components.keys().map(|name| (name.clone(), host(manifest, name, now_ms))).collect();
    let mut delivered: BTreeMap<String, Vec<Delivered>> = BTreeMap::new();
    for n in 0..orders {
        let order_id = Uuid::new_v5(&IDS, format!("order-{n}").as_bytes()).to_string();
        let mut queue = VecDeque::from([placed(&order_id, now_ms)]);
        let mut steps = 0;
        while let Some(record) = queue.pop_front() {
            steps += 1;
            anyhow::ensure!(steps < 1_000, "order {order_id} never ends");
            for component in manifest.subscribers(&record.event.topic) {
                let (Some(host), Some(handle)) = (hosts.get_mut(component), native(component)) else { continue };
                let outgoing = handle(host, &record.event)
                    .map_err(|err| anyhow::anyhow!("{component} failed on {}: {err}", record.event.event_type))?;
                let producer = format!("{component}@native");
                for out in outgoing {
                    let next = Delivered::new(
                        &out.topic,
                        &out.event_type,
                        &out.key,
                        out.payload,
                        Some(&record),
                        &producer,
                        now_ms,
                    );
                    queue.push_back(next);
                }
                delivered.entry(component.to_owned()).or_default().push(record.clone());
            }
        }
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_without_a_native_build_is_left_out() {
        let dir = std::env::temp_dir().join(format!("bench-saga-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml")).unwrap();
        let extra = "[components.audit]\nwasm = \"audit.wasm\"\ntopics = [\"orders\"]\ngroup = \"audit\"\n";
        std::fs::write(dir.join("app.toml"), format!("{shipped}\n{extra}")).unwrap();
        let manifest = Manifest::load(&dir.join("app.toml")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let delivered = sequences(&manifest, 2, 1_764_100_000_000).unwrap();
        assert!(!delivered.contains_key("audit"), "audit has no native build");
        assert_eq!(delivered.keys().collect::<Vec<_>>(), ["analytics", "email", "order", "payment"]);
        assert!(handle("audit", &mut MemoryHost::default(), &delivered["order"][0].event).is_err());
    }
}
