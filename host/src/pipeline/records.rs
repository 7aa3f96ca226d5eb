//! A record's way in and out of the pipeline: the WIT event made from an
//! inbound record, the envelopes of what the component emitted, and the
//! dead-letter copy of a record that cannot be handled.

use std::time::Duration;

use super::{Core, Disposition, MAX_DEAD_LETTER_VALUE, Topics};
use crate::bus::{Inbound, Outbound};
use crate::envelope::Envelope;
use crate::limits::MAX_RECORD_BYTES;
use crate::runtime::{Event, Output};
use crate::state::OutboxRecord;

/// `value` cut to [`MAX_DEAD_LETTER_VALUE`], and the header saying so if it was.
pub(super) fn bounded(value: &[u8]) -> (Vec<u8>, Option<(String, Vec<u8>)>) {
    if value.len() <= MAX_DEAD_LETTER_VALUE {
        return (value.to_vec(), None);
    }
    (value[..MAX_DEAD_LETTER_VALUE].to_vec(), Some(("dlq-truncated".to_owned(), value.len().to_string().into_bytes())))
}

/// The WIT event of `record` (an envelope), as a component is given it.
///
/// # Errors
/// Why the record's value is not an envelope.
pub fn event_of(topics: &Topics, record: &Inbound) -> Result<Event, String> {
    Ok(event_from(topics, record, &decode(record)?))
}

/// The event `record` carries (a CloudEvent, or a version-1 envelope).
///
/// # Errors
/// Why it carries none this host can read.
pub(super) fn decode(record: &Inbound) -> Result<Envelope, String> {
    Envelope::decode(&record.headers, record.key.as_deref(), record.value.as_deref())
        .map_err(|err| format!("not an event this host reads: {err}"))
}

/// The WIT event for an envelope; envelope metadata goes in the headers,
/// beside the record's own (the `ce_*` attributes among them).
fn event_from(topics: &Topics, record: &Inbound, envelope: &Envelope) -> Event {
    let mut headers = vec![
        ("correlation-id".to_owned(), envelope.correlation_id.clone()),
        ("producer".to_owned(), envelope.producer().to_owned()),
    ];
    if let Some(cause) = &envelope.causation_id {
        headers.push(("causation-id".to_owned(), cause.clone()));
    }
    headers.extend(record.headers.iter().filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.clone()).ok()?))));
    Event {
        id: envelope.id.clone(),
        event_type: envelope.event_type.clone(),
        topic: topics.logical(&record.topic).to_owned(),
        key: Some(envelope.order_id.clone()),
        headers,
        payload: envelope.data.get().as_bytes().to_vec(),
        timestamp_ms: envelope.timestamp_ms,
    }
}

impl Core {
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.retry.first_backoff.saturating_mul(factor).min(self.retry.max_backoff)
    }

    /// The span of handling one event: every log line within it (the
    /// host's and the guest's) carries the component, the version serving,
    /// the event and its order.
    pub(super) fn span(&self, envelope: &Envelope) -> tracing::Span {
        tracing::info_span!(
            "event",
            component = %self.service.name(),
            version = %self.service.current().sha256,
            event_id = %envelope.id,
            event_type = %envelope.event_type,
            order_id = %envelope.order_id,
        )
    }

    /// The WIT event for an envelope; envelope metadata goes in the headers.
    pub(super) fn event(&self, record: &Inbound, envelope: &Envelope) -> Event {
        event_from(&self.topics, record, envelope)
    }

    /// Wraps what the component emitted in envelopes caused by `cause`,
    /// each carrying `trace`, the context of the span handling `cause`.
    /// The runtime checked each output, so that its record fits
    /// [`MAX_RECORD_BYTES`] (see [`crate::limits::MAX_PAYLOAD_BYTES`]).
    pub(super) fn wrap(
        &self,
        cause: &Envelope,
        outputs: Vec<Output>,
        producer: &str,
        trace: crate::traces::TraceParent,
    ) -> Vec<OutboxRecord> {
        let now = self.clock.now_ms();
        outputs
            .into_iter()
            .enumerate()
            .map(|(index, out)| {
                let envelope = cause.caused(index, &out.event_type, &out.key, producer, now, out.data);
                let format = self.wire_format.get().copied().unwrap_or_default();
                let (value, headers) = envelope.encode(format, Some(&trace));
                let size = value.len() + headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
                debug_assert!(size <= MAX_RECORD_BYTES, "an output's record outgrew its bound");
                OutboxRecord { topic: self.topics.physical(&out.topic), key: out.key, value, headers }
            })
            .collect()
    }

    pub(super) fn dead_letter(&self, record: &Inbound, reason: String, attempts: u32) -> Disposition {
        tracing::error!(
            component = self.service.name(),
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            attempts,
            "dead-lettering record: {reason}"
        );
        let mut headers = record.headers.clone();
        headers.extend([
            ("dlq-reason".to_owned(), reason.clone().into_bytes()),
            ("dlq-component".to_owned(), self.service.name().as_bytes().to_vec()),
            ("dlq-version".to_owned(), self.service.current().sha256.clone().into_bytes()),
            ("dlq-source".to_owned(), format!("{}/{}/{}", record.topic, record.partition, record.offset).into_bytes()),
            ("dlq-attempts".to_owned(), attempts.to_string().into_bytes()),
        ]);
        let key = record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let (value, truncated) = bounded(record.value.as_deref().unwrap_or_default());
        headers.extend(truncated);
        Disposition::DeadLetter {
            record: Outbound { topic: self.topics.physical(&self.topics.dead_letter), key, value, headers },
            reason,
        }
    }
}
