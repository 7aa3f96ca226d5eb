//! Settling a handled record: the one path from a [`Disposition`] to
//! "done", shared by the Kafka consumer, the timer scheduler and the
//! in-memory tests. Its commit must be durable before what it emitted is
//! published; once the broker acknowledged that, its outbox entry goes.

use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::oneshot;

use super::Disposition;
use crate::bus::{Outbound, Publisher};
use crate::runtime::ServiceRuntime;
use crate::status::Stage;

/// What a settled record was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Handled now: its outputs were published.
    Handled,
    /// Handled before (or a timer no longer due): dropped, with whatever of
    /// its first handling's outputs was still unpublished published again.
    Duplicate,
    /// Set aside on the dead-letter topic.
    DeadLettered,
}

/// A record's turn among the records of its key: it publishes only after
/// the previous one enqueued, and tells the next one when it has. The
/// default waits for nobody.
#[derive(Debug, Default)]
pub struct Turn {
    /// Resolves (sent or dropped) once the previous record of the key enqueued.
    pub previous: Option<oneshot::Receiver<()>>,
    /// Dropped once this record enqueued.
    pub enqueued: Option<oneshot::Sender<()>>,
}

/// Settles `disposition`: waits for its commit to be durable, publishes its
/// records in its `turn`, waits for their acknowledgement, then forgets its
/// outbox entry.
///
/// Records the broker refuses for good (unknown topic, too large, not
/// authorised) never stall the stream: they are set aside on
/// `dead_letter_topic` with the reason, the outbox entry is forgotten, and
/// the record counts as dead-lettered.
///
/// # Errors
/// The commit did not become durable, or publishing failed in a way that
/// may pass. Nothing may then be treated as done: the record must be handled
/// again (its outbox entry, if any, stays queued for a redelivery or the
/// relay).
pub async fn settle(
    service: &ServiceRuntime,
    publisher: &dyn Publisher,
    disposition: Disposition,
    turn: Turn,
    dead_letter_topic: &str,
) -> anyhow::Result<Settled> {
    let (records, durable, source, settled) = match disposition {
        Disposition::Publish { records, source, duplicate, durable } => {
            let settled = if duplicate { Settled::Duplicate } else { Settled::Handled };
            (records, Some(durable), source, settled)
        }
        Disposition::DeadLetter { record, .. } => (vec![record], None, None, Settled::DeadLettered),
    };
    if let Some(durable) = durable {
        let waiting = Instant::now();
        let durable = durable.wait().await;
        service.stages().record(Stage::DurableWait, waiting.elapsed());
        durable.context("state commit not durable")?;
    }
    if let Some(previous) = turn.previous {
        // Sent or dropped: either way the previous record is past enqueueing.
        let _ = previous.await;
    }
    if records.is_empty() {
        return Ok(settled);
    }
    let publishing = Instant::now();
    // A child of the span that emitted them, whose context they carry; it
    // lasts until they are acknowledged (not entered: it would span awaits).
    let caused_by = records.first().and_then(|record| crate::traces::TraceParent::from_headers(&record.headers));
    let _span = crate::traces::stage("publish", service.name(), &service.current().sha256, caused_by);
    let kept = records.clone();
    let enqueued = publisher.enqueue(records).await;
    drop(turn.enqueued);
    let acked = match enqueued {
        Ok(acked) => acked.await,
        Err(err) => Err(err),
    };
    match acked {
        Ok(()) => {}
        Err(err) if err.permanent && err.topic != dead_letter_topic => {
            let reason = format!("the broker refuses it for good: {err}");
            let aside: Vec<Outbound> = kept
                .iter()
                .filter(|record| record.topic == err.topic)
                .map(|record| set_aside(record, &reason, service, source.as_deref(), dead_letter_topic))
                .collect();
            tracing::error!(component = service.name(), source = ?source, records = aside.len(), "output set aside: {reason}");
            publisher.enqueue(aside).await?.await.context("set-aside output not acknowledged")?;
            if let Some(source) = &source {
                service.published(source);
            }
            return Ok(Settled::DeadLettered);
        }
        Err(err) => return Err(err).context("output not acknowledged"),
    }
    service.stages().record(Stage::Publish, publishing.elapsed());
    if let Some(source) = &source {
        service.published(source);
    }
    Ok(settled)
}

/// The dead-letter copy of an output the broker refused: its key, headers
/// and (bounded) value, with why, who emitted it (and which version), for
/// which topic, and for which event.
fn set_aside(record: &Outbound, reason: &str, service: &ServiceRuntime, source: Option<&str>, topic: &str) -> Outbound {
    let (value, truncated) = super::bounded(&record.value);
    let mut headers = record.headers.clone();
    headers.extend([
        ("dlq-reason".to_owned(), reason.as_bytes().to_vec()),
        ("dlq-component".to_owned(), service.name().as_bytes().to_vec()),
        ("dlq-version".to_owned(), service.current().sha256.clone().into_bytes()),
        ("dlq-target-topic".to_owned(), record.topic.as_bytes().to_vec()),
    ]);
    if let Some(source) = source {
        headers.push(("dlq-source-event".to_owned(), source.as_bytes().to_vec()));
    }
    headers.extend(truncated);
    Outbound { topic: topic.to_owned(), key: record.key.clone(), value, headers }
}
