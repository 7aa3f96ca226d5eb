//! The two background duties of a service besides consuming: delivering its
//! due timers, and relaying outbox entries whose first publication did not
//! complete (the host crashed, or the broker refused them).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Outbound, Publisher};
use crate::clock::Clock;
use crate::pipeline::{Disposition, Pipeline, Turn, settle};
use crate::runtime::ServiceRuntime;
use crate::state::{Durable, OutboxEntry};

/// Longest sleep between two looks at the timers. Each look is a store
/// read on the blocking pool (a few thread wake-ups), per component, even
/// on an idle host; timers are due by the deadline clock, which fires them
/// 1.3–1.9 s after their time by design (crate::deadlines), so looking every
/// 250 rather than 100 ms delays them little: it took the idle host's
/// wake-ups from ~190 to ~100 a second.
const POLL: Duration = Duration::from_millis(250);
/// Timers delivered per look.
const BATCH: usize = 64;
/// An outbox entry this old is relayed by the periodic pass; younger ones
/// are most likely being published by whoever committed them.
pub const STALE_OUTBOX_MS: u64 = 10_000;
/// How long a timer or an outbox entry claimed by this host is left to it
/// by the other hosts sharing its store: if this host dies, another
/// delivers them that much later.
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// How often the periodic relay runs.
const RELAY_EVERY: Duration = Duration::from_secs(5);
/// How often old handled ids are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Handled ids forgotten per store transaction: small, so that commits
/// never wait long behind a prune.
const PRUNE_BATCH: usize = 500;
/// Batches per pruning round, at most (the rest waits for the next round).
const PRUNE_ROUND: usize = 20;

/// Forgets the ids of events `service` handled more than `horizon` before
/// `now_ms`, in batches of [`PRUNE_BATCH`] (at most [`PRUNE_ROUND`] of
/// them, each its own short transaction run off the async workers). Returns
/// how many were forgotten. An id younger than the horizon stays: a
/// redelivery within it is still dropped.
///
/// # Errors
/// The store's; what was forgotten before it stays forgotten.
pub async fn prune_handled(service: &ServiceRuntime, now_ms: u64, horizon: Duration) -> anyhow::Result<usize> {
    let before_ms = now_ms.saturating_sub(u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX));
    let mut pruned = 0;
    for _ in 0..PRUNE_ROUND {
        let store = service.state_store().clone();
        let batch = blocking(move || store.prune_handled(before_ms, PRUNE_BATCH)).await?;
        pruned += batch;
        if batch < PRUNE_BATCH {
            break;
        }
    }
    Ok(pruned)
}

/// An outbox record goes out as it was committed. Here, in the core, rather
/// than in the bus or the store: neither port knows the other.
impl From<crate::state::OutboxRecord> for Outbound {
    fn from(record: crate::state::OutboxRecord) -> Self {
        Self {
            topic: record.topic,
            key: record.key,
            value: record.value.into_bytes(),
            headers: record.headers.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
        }
    }
}

/// Publishes every outbox entry committed at or before `committed_before_ms`
/// and clears each once acknowledged. Returns how many entries were relayed.
///
/// # Errors
/// A store or publish failure; the entries not yet cleared stay queued.
pub async fn relay(
    service: &ServiceRuntime,
    publisher: &dyn Publisher,
    committed_before_ms: u64,
    dead_letter_topic: &str,
) -> anyhow::Result<usize> {
    // Only what is on disk may go out.
    service.state_store().sync_point().wait().await?;
    let mut relayed = std::collections::HashSet::new();
    loop {
        // Claimed for this host (a store shared by several leases them);
        // an entry whose clearing failed comes back in the next batch, and
        // is published once per pass.
        let store = service.state_store().clone();
        let limit = relayed.len() + 256;
        let entries: Vec<OutboxEntry> =
            blocking(move || store.claim_stale_outbox(committed_before_ms, limit, CLAIM_LEASE)).await?;
        let entries: Vec<OutboxEntry> = entries.into_iter().filter(|e| !relayed.contains(&e.source)).collect();
        if entries.is_empty() {
            return Ok(relayed.len());
        }
        for entry in entries {
            // Settled like a redelivered event's outputs: published, or set
            // aside if the broker refuses them for good; then forgotten.
            let records = entry.records.into_iter().map(Outbound::from).collect();
            let disposition = Disposition::Publish {
                records,
                source: Some(entry.source.clone()),
                duplicate: true,
                durable: Durable::done(),
            };
            settle(service, publisher, disposition, Turn::default(), dead_letter_topic).await?;
            relayed.insert(entry.source);
        }
    }
}

/// Runs a store call off the async workers (a database round trip blocks).
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, crate::state::StoreError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(call).await??)
}

/// Delivers the service's due timers until `shutdown`, and every few
/// seconds relays stale outbox entries. Timers are due by `deadlines`
/// (see [`crate::deadlines`]); outbox entries are old by `clock`.
pub async fn run(
    pipeline: Arc<Pipeline>,
    publisher: Arc<dyn Publisher>,
    clock: Arc<dyn Clock>,
    deadlines: Arc<dyn Clock>,
    horizon: Duration,
    shutdown: CancellationToken,
) {
    let service = pipeline.service().clone();
    let mut last_relay = tokio::time::Instant::now();
    let mut last_prune = tokio::time::Instant::now();
    loop {
        if let Err(err) = fire_due(&pipeline, &*publisher, &*deadlines, &shutdown).await {
            tracing::warn!(component = service.name(), "timer delivery failed, will retry: {err:#}");
        }
        if last_relay.elapsed() >= RELAY_EVERY {
            last_relay = tokio::time::Instant::now();
            let before = clock.now_ms().saturating_sub(STALE_OUTBOX_MS);
            match relay(&service, &*publisher, before, &pipeline.dead_letter_topic()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(component = service.name(), entries = n, "relayed stale outbox entries"),
                Err(err) => tracing::warn!(component = service.name(), "outbox relay failed, will retry: {err:#}"),
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            match prune_handled(&service, clock.now_ms(), horizon).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(component = service.name(), ids = n, "pruned handled ids past the horizon"),
                Err(err) => {
                    tracing::warn!(component = service.name(), "pruning handled ids failed, will retry: {err:#}")
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Delivers every timer due now, publishing what each emits
/// ([`Pipeline::fire`]).
///
/// # Errors
/// A store or publish failure; undelivered timers stay due.
pub async fn fire_due(
    pipeline: &Pipeline,
    publisher: &dyn Publisher,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let (store, now_ms) = (pipeline.service().state_store().clone(), clock.now_ms());
        let due = blocking(move || store.claim_due_timers(now_ms, BATCH, CLAIM_LEASE)).await?;
        if due.is_empty() {
            return Ok(());
        }
        for timer in due {
            if pipeline.fire(&timer, publisher, clock, shutdown).await?.is_none() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::MemoryBus;
    use crate::clock::ManualClock;
    use crate::envelope::Envelope;
    use crate::pipeline::{FAILED_TIMER_RETRY_MS, RetryPolicy, Topics};
    use crate::runtime::tests::runtime;
    use crate::state::{Commit, Timer, TimerChange};

    fn set(service: &ServiceRuntime, id: &str, at_ms: u64, event_type: &str) {
        set_by(service, id, at_ms, event_type, "setter");
    }

    fn set_by(service: &ServiceRuntime, id: &str, at_ms: u64, event_type: &str, setter: &str) {
        let timer = Timer {
            id: id.into(),
            at_ms,
            event_type: event_type.into(),
            key: "k".into(),
            payload: "\"hi\"".into(),
            set_by: setter.into(),
            correlation_id: Some("c1".into()),
            traceparent: None,
            nonce: crate::state::new_nonce(),
        };
        let commit = Commit { timers: vec![TimerChange::Set(timer)], ..Commit::default() };
        service.state_store().commit(commit).unwrap();
    }

    #[tokio::test]
    async fn due_timers_are_delivered_once_and_failing_ones_are_kept() {
        let service = Arc::new(runtime("misbehave", 1000));
        let clock = Arc::new(ManualClock::at(1_000));
        let topics = Topics { prefix: "p-".into(), dead_letter: "dlq".into() };
        let retry = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
        let pipeline = Pipeline::new(service.clone(), topics, retry, clock.clone());
        let bus = MemoryBus::default();
        let shutdown = CancellationToken::new();
        set(&service, "echo", 1_500, "Echo");
        set(&service, "poison", 1_200, "Panic");
        set(&service, "later", 9_000, "Echo");

        fire_due(&pipeline, &bus, &*clock, &shutdown).await.unwrap();
        assert!(bus.records("p-out").is_empty() && bus.records("p-dlq").is_empty(), "nothing is due yet");

        clock.set(2_000);
        fire_due(&pipeline, &bus, &*clock, &shutdown).await.unwrap();
        let echoed = bus.records("p-out");
        assert_eq!(echoed.len(), 1);
        let envelope = Envelope::decode(&echoed[0].headers, None, Some(&echoed[0].value)).unwrap();
        assert_eq!((envelope.event_type.as_str(), envelope.order_id.as_str()), ("Echoed", "k"));
        assert_eq!(envelope.correlation_id, "c1", "the timer continues its setter's saga");
        assert_eq!(service.state_store().get("k").unwrap(), Some(b"\"hi\"".to_vec()), "handled with its payload");
        assert_eq!(bus.records("p-dlq").len(), 1, "the failing timer is reported");
        let left = service.state_store().due_timers(u64::MAX, 10).unwrap();
        let left: Vec<(&str, u64)> = left.iter().map(|t| (t.id.as_str(), t.at_ms)).collect();
        assert_eq!(left, [("later", 9_000), ("poison", 2_000 + FAILED_TIMER_RETRY_MS)], "kept, not lost");
        assert_eq!(service.state_store().outbox_count().unwrap(), 0, "published and cleared");

        // Delivered again (a crash before its removal was committed): dropped by id.
        set(&service, "echo", 1_500, "Echo");
        fire_due(&pipeline, &bus, &*clock, &shutdown).await.unwrap();
        assert_eq!(bus.records("p-out").len(), 1, "no second effect");
        assert_eq!(service.state_store().timer_count().unwrap(), 2);
        // Set again for the same time by another event: a new delivery.
        set_by(&service, "echo", 1_500, "Echo", "another setter");
        fire_due(&pipeline, &bus, &*clock, &shutdown).await.unwrap();
        assert_eq!(bus.records("p-out").len(), 2);
    }

    #[tokio::test]
    async fn handled_ids_are_kept_within_the_horizon_and_pruned_past_it() {
        let service = Arc::new(runtime("misbehave", 1000));
        let clock = Arc::new(ManualClock::at(1_000));
        let pipeline = Pipeline::new(service.clone(), Topics::default(), RetryPolicy::default(), clock.clone());
        let shutdown = CancellationToken::new();
        let envelope = Envelope::originate("Echo", "k", "test", 1, serde_json::json!("x"));
        let record = crate::bus::Inbound {
            topic: "in".into(),
            partition: 0,
            offset: 1,
            key: Some(b"k".to_vec()),
            value: Some(envelope.value()),
            headers: envelope.header_bytes(None),
        };
        let first = pipeline.process(&record, &shutdown).await.unwrap();
        assert!(matches!(first, Disposition::Publish { duplicate: false, .. }), "{first:?}");
        let horizon = Duration::from_secs(60);
        clock.set(1_000 + 59_000);
        assert_eq!(prune_handled(&service, clock.now_ms(), horizon).await.unwrap(), 0);
        let again = pipeline.process(&record, &shutdown).await.unwrap();
        assert!(matches!(again, Disposition::Publish { duplicate: true, .. }), "within the horizon: dropped");
        clock.set(1_000 + 61_000);
        assert_eq!(prune_handled(&service, clock.now_ms(), horizon).await.unwrap(), 1);
        assert!(!service.state_store().was_handled(&envelope.id).unwrap(), "past the horizon: pruned");
    }

    #[tokio::test]
    async fn the_relay_publishes_what_a_crash_left_in_the_outbox() {
        let service = runtime("misbehave", 1000);
        let record = |v: &str| crate::state::OutboxRecord {
            topic: "t".into(),
            key: "k".into(),
            value: v.into(),
            headers: vec![],
        };
        for (id, at) in [("a", 10), ("b", 20), ("c", 30)] {
            let commit = Commit { handled: Some(id.into()), outbox: vec![record(id)], now_ms: at, ..Commit::default() };
            service.state_store().commit(commit).unwrap();
        }
        let bus = MemoryBus::default();
        assert_eq!(relay(&service, &bus, 20, "dlq").await.unwrap(), 2, "only entries old enough");
        assert_eq!(relay(&service, &bus, u64::MAX, "dlq").await.unwrap(), 1);
        let values: Vec<Vec<u8>> = bus.records("t").into_iter().map(|r| r.value).collect();
        assert_eq!(values, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], "in commit order");
        assert_eq!(service.state_store().outbox_count().unwrap(), 0);
    }

    #[tokio::test]
    async fn an_outbox_entry_the_broker_refuses_for_good_is_set_aside_not_retried_forever() {
        let service = runtime("misbehave", 1000);
        let record = crate::state::OutboxRecord {
            topic: "gone".into(),
            key: "k".into(),
            value: "x".repeat(100_000),
            headers: vec![("h".into(), "v".into())],
        };
        let commit = Commit { handled: Some("e1".into()), outbox: vec![record], now_ms: 1, ..Commit::default() };
        service.state_store().commit(commit).unwrap();
        let bus = MemoryBus::default();
        bus.refuse("gone", "Broker: Unknown topic or partition");
        assert_eq!(relay(&service, &bus, u64::MAX, "dlq").await.unwrap(), 1);
        assert_eq!(service.state_store().outbox_count().unwrap(), 0, "forgotten, not relayed again");
        let aside = bus.records("dlq");
        assert_eq!(aside.len(), 1);
        let header = |name: &str| {
            aside[0].headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert!(header("dlq-reason").unwrap().contains("Unknown topic"), "{:?}", aside[0].headers);
        assert_eq!(header("dlq-target-topic").as_deref(), Some("gone"));
        assert_eq!(header("dlq-source-event").as_deref(), Some("e1"));
        assert_eq!(header("dlq-truncated").as_deref(), Some("100000"), "a dead letter stays small enough");
        assert_eq!(aside[0].value.len(), crate::pipeline::MAX_DEAD_LETTER_VALUE);
        assert_eq!(header("h").as_deref(), Some("v"), "its own headers kept");
    }
}
