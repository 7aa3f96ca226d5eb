//! What a component emitted, checked before anything of it is kept: each
//! event granted, with a topic, a key and a JSON payload, small enough that
//! its record fits the broker, and room for it in the outbox quota. The
//! pipeline wraps what passes into records; a call that emits anything
//! else fails for good, and the canary watch of a new version counts it.

use serde_json::value::RawValue;

use super::bindings::OutgoingEvent;
use crate::limits::{MAX_OUTPUT_NAME_BYTES, MAX_PAYLOAD_BYTES};
use crate::state::OutboxRecord;

/// One event a call emitted, checked.
#[derive(Debug, Clone)]
pub struct Output {
    /// Its event type (at most [`MAX_OUTPUT_NAME_BYTES`]).
    pub event_type: String,
    /// The logical topic it goes to (set, at most [`MAX_OUTPUT_NAME_BYTES`]).
    pub topic: String,
    /// Its key, the order it belongs to (set, at most [`MAX_OUTPUT_NAME_BYTES`]).
    pub key: String,
    /// Its payload, valid JSON of at most [`MAX_PAYLOAD_BYTES`].
    pub data: Box<RawValue>,
}

/// `outgoing` checked, in order; the reason naming the first event that
/// is not an output the host can publish.
///
/// # Errors
/// An event without topic or key, with a name or key over
/// [`MAX_OUTPUT_NAME_BYTES`], a payload over [`MAX_PAYLOAD_BYTES`] or not
/// JSON (UTF-8 text included).
pub fn check(outgoing: Vec<OutgoingEvent>) -> Result<Vec<Output>, String> {
    outgoing.into_iter().map(one).collect()
}

impl Output {
    /// The output as a record of its logical topic, its payload as the
    /// value and no envelope: what tests and benches that measure a guest
    /// alone keep of it.
    pub fn bare_record(self) -> OutboxRecord {
        OutboxRecord {
            topic: self.topic,
            key: self.key,
            value: self.data.get().to_owned(),
            headers: vec![("ce_type".to_owned(), self.event_type)],
        }
    }
}

fn one(out: OutgoingEvent) -> Result<Output, String> {
    let OutgoingEvent { event_type, topic, key, payload } = out;
    if key.is_empty() || topic.is_empty() {
        return Err(format!("component emitted a {event_type} without topic or key"));
    }
    for (what, text) in [("event type", &event_type), ("topic", &topic), ("key", &key)] {
        if text.len() > MAX_OUTPUT_NAME_BYTES {
            return Err(format!(
                "component emitted an event whose {what} is {} bytes long, over the limit of {MAX_OUTPUT_NAME_BYTES}",
                text.len()
            ));
        }
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "component emitted a {event_type} of {} bytes, over the {MAX_PAYLOAD_BYTES}-byte payload limit",
            payload.len()
        ));
    }
    let not_json =
        |err: &dyn std::fmt::Display| format!("component emitted a {event_type} whose payload is not JSON: {err}");
    let text = String::from_utf8(payload).map_err(|err| not_json(&err))?;
    let data = RawValue::from_string(text).map_err(|err| not_json(&err))?;
    Ok(Output { event_type, topic, key, data })
}

/// Checks each output's data against its event type's schema.
///
/// # Errors
/// The first output that does not match: its index, type and what breaks
/// the schema (the field and the rule).
pub(super) fn check_schemas(outputs: &[Output], schemas: &crate::schemas::Schemas) -> Result<(), String> {
    for (index, output) in outputs.iter().enumerate() {
        if schemas.schema(&output.event_type).is_none() {
            continue;
        }
        let data: serde_json::Value = serde_json::from_str(output.data.get()).map_err(|err| err.to_string())?;
        schemas
            .check(&output.event_type, &data)
            .map_err(|reason| format!("output {index} ({} to {}): {reason}", output.event_type, output.topic))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(topic: &str, key: &str, payload: &[u8]) -> OutgoingEvent {
        OutgoingEvent {
            event_type: "PaymentAuthorized".into(),
            topic: topic.into(),
            key: key.into(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn a_granted_json_event_passes_untouched() {
        let checked = check(vec![out("payments", "o1", br#"{"amount": 5}"#)]).unwrap();
        assert_eq!(checked.len(), 1);
        assert_eq!((checked[0].topic.as_str(), checked[0].key.as_str()), ("payments", "o1"));
        assert_eq!(checked[0].data.get(), r#"{"amount": 5}"#);
    }

    #[test]
    fn each_refusal_names_its_rule() {
        let refused = |event: OutgoingEvent| check(vec![event]).unwrap_err();
        assert!(refused(out("", "o1", b"{}")).contains("without topic or key"));
        assert!(refused(out("payments", "", b"{}")).contains("without topic or key"));
        assert!(refused(out("payments", "o1", b"{nope")).contains("not JSON"));
        assert!(refused(out("payments", "o1", &[0xff, 0xfe])).contains("not JSON"));
        let long = "k".repeat(MAX_OUTPUT_NAME_BYTES + 1);
        assert!(refused(out("payments", &long, b"{}")).contains("key is 257 bytes long"));
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD_BYTES));
        assert!(refused(out("payments", "o1", big.as_bytes())).contains("payload limit"));
    }

    #[test]
    fn the_first_bad_event_fails_the_call() {
        let err = check(vec![out("payments", "o1", b"{}"), out("payments", "o1", b"nope")]).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
    }
}
