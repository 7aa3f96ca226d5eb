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
/// `dead_letter_topic` with the reason, the entry's other records are
/// published all the same (never dropped with them), the outbox entry is
/// forgotten, and the record counts as dead-lettered.
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
    let mut enqueued_turn = turn.enqueued;
    let (mut pending, mut set_aside_any) = (records, false);
    // The entry is published whole: a record the broker refuses for good is
    // replaced by its dead-letter copy and the entry sent again (its other
    // records, possibly a second time: consumers drop copies by event id),
    // until every record is acknowledged or set aside. Each round sets aside
    // one more topic, so this ends.
    loop {
        let enqueued = publisher.enqueue(pending.clone()).await;
        drop(enqueued_turn.take());
        let acked = match enqueued {
            Ok(acked) => acked.await,
            Err(err) => Err(err),
        };
        match acked {
            Ok(()) => break,
            Err(err)
                if err.permanent && err.topic != dead_letter_topic && pending.iter().any(|r| r.topic == err.topic) =>
            {
                let reason = format!("the broker refuses it for good: {err}");
                let aside = pending.iter().filter(|record| record.topic == err.topic).count();
                tracing::error!(component = service.name(), source = ?source, records = aside, "output set aside: {reason}");
                pending = pending
                    .iter()
                    .map(|record| {
                        if record.topic == err.topic {
                            set_aside(record, &reason, service, source.as_deref(), dead_letter_topic)
                        } else {
                            record.clone()
                        }
                    })
                    .collect();
                set_aside_any = true;
            }
            Err(err) if set_aside_any => return Err(err).context("set-aside output not acknowledged"),
            Err(err) => return Err(err).context("output not acknowledged"),
        }
    }
    service.stages().record(Stage::Publish, publishing.elapsed());
    if let Some(source) = &source {
        // Acknowledged: a failure to forget the entry only means its
        // records may be published again (consumers drop copies by id).
        if let Err(err) = service.state_store().clear_outbox(source) {
            tracing::warn!(component = service.name(), %source, "cannot clear the outbox entry: {err}");
        }
    }
    Ok(if set_aside_any { Settled::DeadLettered } else { settled })
}

/// The dead-letter copy of an output the broker refused: its key, headers
/// and (bounded) value, with why, who emitted it (and which version), for
/// which topic, and for which event.
fn set_aside(record: &Outbound, reason: &str, service: &ServiceRuntime, source: Option<&str>, topic: &str) -> Outbound {
    let (value, truncated) = super::records::bounded(&record.value);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    use super::*;
    use crate::kafka::{KafkaPublisher, ensure_topics};
    use crate::runtime::tests::runtime;
    use crate::state::Durable;
    use crate::status::BrokerLink;

    /// The values of `topic`'s partition 0, read until `count` came (or 30 s).
    fn values(brokers: &str, topic: &str, count: usize) -> Vec<(Vec<u8>, Vec<String>)> {
        let consumer: BaseConsumer = crate::kafka::client_config(brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
        consumer.assign(&assignment).unwrap();
        let (mut found, deadline) = (Vec::new(), std::time::Instant::now() + Duration::from_secs(30));
        while found.len() < count && std::time::Instant::now() < deadline {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
            let headers = message.headers().map_or_else(Vec::new, |headers| {
                rdkafka::message::Headers::iter(headers)
                    .map(|h| format!("{}={}", h.key, String::from_utf8_lossy(h.value.unwrap_or_default())))
                    .collect()
            });
            found.push((message.payload().unwrap_or_default().to_vec(), headers));
        }
        found
    }

    /// An outbox entry [r1 the broker refuses at once (too large), r2 to a
    /// good topic]: r1 is dead-lettered and r2 published, never dropped
    /// with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_record_does_not_drop_its_siblings() {
        let brokers = std::env::var("KAFKA_BROKERS").expect("this test needs a real broker: set KAFKA_BROKERS");
        let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
        let (big, good, dead) = (format!("{prefix}big"), format!("{prefix}good"), format!("{prefix}dead-letters"));
        ensure_topics(&brokers, &[big.clone(), good.clone(), dead.clone()], 1, 1).await.unwrap();
        let publisher = KafkaPublisher::connect(&brokers, BrokerLink::default()).unwrap();
        let service = runtime("misbehave", 1000);
        let record =
            |topic: &str, value: Vec<u8>| Outbound { topic: topic.to_owned(), key: "k".into(), value, headers: vec![] };
        let disposition = Disposition::Publish {
            records: vec![record(&big, vec![b'x'; 2 << 20]), record(&good, b"r2".to_vec())],
            source: Some("e1".into()),
            duplicate: false,
            durable: Durable::done(),
        };
        let settled = settle(&service, &publisher, disposition, Turn::default(), &dead).await.unwrap();
        assert_eq!(settled, Settled::DeadLettered);
        let published = tokio::task::spawn_blocking({
            let brokers = brokers.clone();
            move || values(&brokers, &good, 1)
        })
        .await
        .unwrap();
        assert_eq!(published.first().map(|(v, _)| v.as_slice()), Some(b"r2".as_slice()), "the sibling is published");
        let aside = tokio::task::spawn_blocking(move || values(&brokers, &dead, 1)).await.unwrap();
        assert_eq!(aside.len(), 1);
        assert!(aside[0].1.contains(&format!("dlq-target-topic={big}")), "{:?}", aside[0].1);
        assert_eq!(aside[0].0.len(), crate::pipeline::MAX_DEAD_LETTER_VALUE, "cut to the dead-letter bound");
    }
}
