//! The event envelope on the wire: every Kafka record's value is one JSON
//! envelope around the domain payload.
//!
//! ```json
//! {"id":"…","type":"OrderPlaced","order_id":"…","correlation_id":"…",
//!  "causation_id":null,"timestamp_ms":1764100000000,"schema_version":1,
//!  "producer":"gateway","data":{…}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The envelope version this host writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

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

/// A record value that is not a valid envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record has no value")]
    Empty,
    #[error("value is not a JSON event envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("envelope field `{0}` must not be empty")]
    EmptyField(&'static str),
    #[error("unsupported schema_version {0} (this host understands {SCHEMA_VERSION})")]
    Version(u32),
    #[error("envelope field `{field}` {problem}")]
    BadField { field: &'static str, problem: String },
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

/// The envelope around every event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique event id; redeliveries and re-emissions keep it.
    pub id: String,
    /// Event type, e.g. `OrderPlaced`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The order this event belongs to; also the Kafka key.
    pub order_id: String,
    /// Id shared by every event of one saga (the first event's id).
    pub correlation_id: String,
    /// Id of the event that caused this one.
    #[serde(default)]
    pub causation_id: Option<String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Envelope version.
    pub schema_version: u32,
    /// Who produced it: `gateway` or `NAME@SHA256`.
    pub producer: String,
    /// The domain payload, kept as the JSON text it came in: the host
    /// passes it on without building it into a tree and writing it again.
    pub data: Box<RawValue>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        (&self.id, &self.event_type, &self.order_id, &self.correlation_id, &self.causation_id)
            == (&other.id, &other.event_type, &other.order_id, &other.correlation_id, &other.causation_id)
            && (self.timestamp_ms, self.schema_version) == (other.timestamp_ms, other.schema_version)
            && self.producer == other.producer
            && self.data.get() == other.data.get()
    }
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
    /// Decodes and checks a record value.
    ///
    /// # Errors
    /// [`EnvelopeError`] saying what is wrong with the value.
    pub fn decode(value: Option<&[u8]>) -> Result<Self, EnvelopeError> {
        let value = value.filter(|v| !v.is_empty()).ok_or(EnvelopeError::Empty)?;
        let envelope: Envelope = serde_json::from_slice(value)?;
        for (field, text) in [
            ("id", &envelope.id),
            ("type", &envelope.event_type),
            ("order_id", &envelope.order_id),
            ("correlation_id", &envelope.correlation_id),
        ] {
            if text.is_empty() {
                return Err(EnvelopeError::EmptyField(field));
            }
        }
        let ids = [
            ("id", Some(&envelope.id)),
            ("type", Some(&envelope.event_type)),
            ("order_id", Some(&envelope.order_id)),
            ("correlation_id", Some(&envelope.correlation_id)),
            ("causation_id", envelope.causation_id.as_ref()),
        ];
        for (field, text) in ids {
            if let Some(problem) = text.and_then(|text| id_problem(text)) {
                return Err(EnvelopeError::BadField { field, problem });
            }
        }
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(EnvelopeError::Version(envelope.schema_version));
        }
        Ok(envelope)
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
            schema_version: SCHEMA_VERSION,
            producer: producer.to_owned(),
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
            schema_version: SCHEMA_VERSION,
            producer: producer.to_owned(),
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
            schema_version: SCHEMA_VERSION,
            producer: format!("timer@{component}"),
            data,
        }
    }

    /// The JSON bytes of the envelope.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and JSON text cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
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
        let decoded = Envelope::decode(Some(&first.encode())).unwrap();
        assert_eq!(decoded, first);
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

    #[test]
    fn bad_values_say_why() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "no value"),
            (b"{\"id\":1}", "not a JSON event envelope"),
            (br#"{"id":"","type":"T","order_id":"o","correlation_id":"c","timestamp_ms":1,"schema_version":1,"producer":"p","data":{}}"#, "`id`"),
            (br#"{"id":"i","type":"T","order_id":"o","correlation_id":"c","timestamp_ms":1,"schema_version":9,"producer":"p","data":{}}"#, "schema_version 9"),
        ];
        for (value, needle) in cases {
            let err = Envelope::decode(Some(value)).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn ids_that_no_store_can_keep_are_refused() {
        let with = |field: &str, value: &str| {
            let mut envelope = serde_json::to_value(Envelope::originate("T", "o1", "p", 1, json!({}))).unwrap();
            envelope[field] = json!(value);
            Envelope::decode(Some(&serde_json::to_vec(&envelope).unwrap()))
        };
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let cases = [
            ("id", "a\u{0}b", "`id` contains the control character '\\0'"),
            ("id", long.as_str(), "`id` is 257 bytes long, over the limit of 256"),
            ("order_id", "o\n1", "`order_id` contains the control character '\\n'"),
            ("correlation_id", long.as_str(), "`correlation_id` is 257 bytes"),
            ("causation_id", "c\u{7f}", "`causation_id` contains"),
            ("type", "T\u{1b}", "`type` contains"),
        ];
        for (field, value, needle) in cases {
            let err = with(field, value).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        let longest = "x".repeat(MAX_ID_BYTES);
        assert!(with("id", &longest).is_ok(), "the bound itself is allowed");
        assert!(with("order_id", "ordre-é-✓").is_ok(), "any printable text is an id");
    }
}
