//! The event: what every Kafka record the host reads or writes carries,
//! and how it is written on the wire (a CloudEvent 1.0 in the Kafka
//! protocol binding's binary mode, [`wire`]).
//!
//! The Kafka key is the order id; the value is the event's data (JSON);
//! the attributes travel as `ce_*` headers:
//!
//! ```text
//! ce_specversion: 1.0            ce_id: 0193…          ce_type: PaymentAuthorized
//! ce_source: /shop/payment@3fa2… ce_subject: <order>   ce_time: 2026-12-07T18:00:00.123Z
//! content-type: application/json ce_correlationid: …   ce_causationid: …
//! ce_traceparent / traceparent: 00-<trace>-<span>-01
//! ```

use serde_json::value::RawValue;
use uuid::Uuid;

mod wire;
#[cfg(test)]
mod wire_tests;

pub use wire::{LEGACY_VERSION, SPEC_VERSION};

/// Where the events this host makes say they come from: `/shop/` and the
/// producer (`gateway`, `payment@SHA256`, `timer@payment`).
pub const SOURCE_PREFIX: &str = "/shop/";

/// Namespace of derived event ids (uuid v5).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2c7e_4b1a_4f0e_9a53_8d2e_1c0b_7a11);

/// The id derived from `name` at `at_ms`: laid out as a UUIDv7, the time in
/// its first 48 bits and 74 bits of `name`'s uuid v5 hash after, so that it
/// is the same whenever it is derived again and ids derived near one time
/// sort together. The stores index handled ids by id: ids that sort by time
/// land at the B-tree's growing edge, whose pages stay cached and are
/// rewritten together, instead of one random page each (docs/performance.md).
fn derived_id(at_ms: u64, name: &str) -> String {
    let hash = Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes()).into_bytes();
    let mut rest = [0; 10];
    rest.copy_from_slice(&hash[6..]);
    uuid::Builder::from_unix_timestamp_millis(at_ms, &rest).into_uuid().to_string()
}

/// A record that is not an event this host can read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record has no value (the event's data)")]
    Empty,
    #[error("value is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0} must not be empty")]
    EmptyField(&'static str),
    #[error("unsupported CloudEvents specversion {0:?} (this host reads {SPEC_VERSION})")]
    SpecVersion(String),
    #[error(
        "unsupported envelope schema_version {0} (this host reads CloudEvents and envelope version {LEGACY_VERSION})"
    )]
    Version(u32),
    #[error("{field} {problem}")]
    BadField { field: &'static str, problem: String },
    #[error("datacontenttype {0:?} is not JSON: this host's components take JSON data")]
    NotJson(String),
    #[error("CloudEvents batches (application/cloudevents-batch+json) are not read: send one event per record")]
    Batch,
    #[error(
        "neither a CloudEvent (no ce_* headers, no content-type application/cloudevents+json, no specversion) nor a version-1 envelope (no schema_version)"
    )]
    Unknown,
}

/// Longest id an envelope may carry (`id`, `type`, `order_id`,
/// `correlation_id`, `causation_id`), in bytes. Ids are keys of the store
/// (a handled id, a timer's key, an outbox entry's source): a bound well
/// inside every adapter's limits (PostgreSQL refuses an index entry over
/// ~2.7 KB) means an id that decodes can always be stored. The ids this host
/// makes are 36-byte UUIDs.
pub const MAX_ID_BYTES: usize = 256;

/// Why `text` cannot be an id: too long, or holding a control character
/// (NUL above all: PostgreSQL's text cannot hold it).
pub fn id_problem(text: &str) -> Option<String> {
    if text.len() > MAX_ID_BYTES {
        return Some(format!("is {} bytes long, over the limit of {MAX_ID_BYTES}", text.len()));
    }
    text.chars().find(|c| c.is_control()).map(|c| format!("contains the control character {c:?}"))
}

/// One event, whatever format it came in.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Unique event id (`ce_id`); redeliveries and re-emissions keep it.
    pub id: String,
    /// Event type (`ce_type`), e.g. `OrderPlaced`.
    pub event_type: String,
    /// The order this event belongs to (`ce_subject`); also the Kafka key.
    pub order_id: String,
    /// Id shared by every event of one saga (the first event's id;
    /// extension `correlationid`).
    pub correlation_id: String,
    /// Id of the event that caused this one (extension `causationid`).
    pub causation_id: Option<String>,
    /// Creation time (`ce_time`), milliseconds since the Unix epoch; 0 if
    /// a producer of another kind left it out.
    pub timestamp_ms: u64,
    /// Who produced it (`ce_source`, a URI reference): [`SOURCE_PREFIX`]
    /// and the producer for the events this host makes.
    pub source: String,
    /// The domain payload, kept as the JSON text it came in: the host
    /// passes it on without building it into a tree and writing it again.
    pub data: Box<RawValue>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        (&self.id, &self.event_type, &self.order_id, &self.correlation_id, &self.causation_id)
            == (&other.id, &other.event_type, &other.order_id, &other.correlation_id, &other.causation_id)
            && self.timestamp_ms == other.timestamp_ms
            && self.source == other.source
            && self.data.get() == other.data.get()
    }
}

/// The `ce_source` of what `producer` makes.
pub fn source_of(producer: &str) -> String {
    format!("{SOURCE_PREFIX}{producer}")
}

/// `value` as a payload.
pub fn raw(value: &serde_json::Value) -> Box<RawValue> {
    // A `Value` always serializes to valid JSON.
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| null())
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("`null` is JSON"))
}

impl Envelope {
    /// Who produced it: the source without [`SOURCE_PREFIX`] for the
    /// events this host makes, the whole source for others.
    pub fn producer(&self) -> &str {
        self.source.strip_prefix(SOURCE_PREFIX).unwrap_or(&self.source)
    }

    /// The first event of a saga: its own correlation id.
    ///
    /// Its id is derived from the type and the order id, so the same order
    /// published again (a client retrying with its `Idempotency-Key`) is
    /// recognised as a duplicate by every consumer.
    pub fn originate(
        event_type: &str,
        order_id: &str,
        producer: &str,
        timestamp_ms: u64,
        data: serde_json::Value,
    ) -> Self {
        let data = raw(&data);
        let id = Uuid::new_v5(&EVENT_ID_NAMESPACE, format!("{event_type}/{order_id}").as_bytes()).to_string();
        Self {
            correlation_id: id.clone(),
            id,
            event_type: event_type.to_owned(),
            order_id: order_id.to_owned(),
            causation_id: None,
            timestamp_ms,
            source: source_of(producer),
            data,
        }
    }

    /// The `index`-th event emitted while handling `self`.
    ///
    /// Its id is derived from the cause's id and time, so handling the same
    /// event again emits events with the same ids, which consumers can
    /// recognise; it sorts by the cause's time.
    pub fn caused(
        &self,
        index: usize,
        event_type: &str,
        order_id: &str,
        producer: &str,
        timestamp_ms: u64,
        data: Box<RawValue>,
    ) -> Self {
        let name = format!("{}/{index}/{event_type}", self.id);
        Self {
            id: derived_id(self.timestamp_ms, &name),
            event_type: event_type.to_owned(),
            order_id: order_id.to_owned(),
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(self.id.clone()),
            timestamp_ms,
            source: source_of(producer),
            data,
        }
    }

    /// The event a due timer delivers to `component`.
    ///
    /// Its id is derived from the component, the timer id, the due time and
    /// the event that set it, so a timer delivered again after a crash is
    /// recognised as handled; it sorts by the due time. It continues the
    /// setter's saga: same correlation id, caused by the setter.
    pub fn timer(component: &str, timer: &crate::state::Timer, timestamp_ms: u64) -> Self {
        let name = format!("timer/{component}/{}/{}/{}", timer.id, timer.at_ms, timer.set_by);
        let id = derived_id(timer.at_ms, &name);
        // Checked to be JSON when the timer was set.
        let data = RawValue::from_string(timer.payload.clone())
            .unwrap_or_else(|_| raw(&serde_json::Value::String(timer.payload.clone())));
        Self {
            correlation_id: timer.correlation_id.clone().unwrap_or_else(|| id.clone()),
            id,
            event_type: timer.event_type.clone(),
            order_id: timer.key.clone(),
            causation_id: (!timer.set_by.is_empty()).then(|| timer.set_by.clone()),
            timestamp_ms,
            source: source_of(&format!("timer@{component}")),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_derived_ids() {
        let first = Envelope::originate("OrderPlaced", "o1", "gateway", 5, json!({"a": 1}));
        assert_eq!(first.id, first.correlation_id);
        let decoded = Envelope::decode(&first.header_bytes(None), None, Some(&first.value())).unwrap();
        assert_eq!(decoded, first);
        assert_eq!((first.source.as_str(), first.producer()), ("/shop/gateway", "gateway"));
        let again = Envelope::originate("OrderPlaced", "o1", "gateway", 9, json!({"a": 1}));
        assert_eq!(again.id, first.id, "the same order placed again is the same event");
        assert_ne!(Envelope::originate("OrderPlaced", "o2", "gateway", 5, json!({})).id, first.id);
        let a = first.caused(0, "PaymentRequested", "o1", "order@x", 6, raw(&json!({})));
        let b = first.caused(0, "PaymentRequested", "o1", "order@y", 7, raw(&json!({})));
        let c = first.caused(1, "PaymentRequested", "o1", "order@x", 6, raw(&json!({})));
        assert_eq!(a.id, b.id, "same cause and position give the same id");
        assert_ne!(a.id, c.id);
        // Derived ids sort by their cause's time.
        let later = Envelope { timestamp_ms: 1_000, ..first.clone() };
        let d = later.caused(0, "PaymentRequested", "o1", "order@x", 6, raw(&json!({})));
        assert_ne!(d.id, a.id, "another cause, another id");
        let (a_id, d_id) = (Uuid::parse_str(&a.id).unwrap(), Uuid::parse_str(&d.id).unwrap());
        assert_eq!((a_id.get_version_num(), a_id.get_timestamp().map(|t| t.to_unix())), (7, Some((0, 5_000_000))));
        assert!(a.id < d.id && d_id.get_version_num() == 7, "{} < {}", a.id, d.id);
        assert_eq!(
            (a.correlation_id.as_str(), a.causation_id.as_deref()),
            (first.id.as_str(), Some(first.id.as_str()))
        );
    }
}
