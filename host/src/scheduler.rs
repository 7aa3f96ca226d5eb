//! The two background duties of a service besides consuming: delivering its
//! due timers, and relaying outbox entries whose first publication did not
//! complete (the host crashed, or the broker refused them).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Outbound, Publisher};
use crate::clock::Clock;
use crate::pipeline::{Disposition, Pipeline};
use crate::runtime::ServiceRuntime;
use crate::state::{Commit, OutboxEntry};

/// Longest sleep between two looks at the timers.
const POLL: Duration = Duration::from_millis(100);
/// Timers delivered per look.
const BATCH: usize = 64;
/// An outbox entry this old is relayed by the periodic pass; younger ones
/// are most likely being published by whoever committed them.
pub const STALE_OUTBOX_MS: u64 = 10_000;
/// How often the periodic relay runs.
const RELAY_EVERY: Duration = Duration::from_secs(5);

/// Publishes the records and waits for the broker's acknowledgement.
///
/// # Errors
/// The publish error; nothing may be assumed delivered.
pub async fn publish(publisher: &dyn Publisher, records: Vec<Outbound>) -> Result<(), crate::bus::PublishError> {
    if records.is_empty() {
        return Ok(());
    }
    publisher.enqueue(records).await?.await
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
) -> anyhow::Result<usize> {
    let mut relayed = 0;
    loop {
        let entries: Vec<OutboxEntry> = service
            .state_store()
            .pending_outbox(256)?
            .into_iter()
            .filter(|e| e.created_ms <= committed_before_ms)
            .collect();
        if entries.is_empty() {
            return Ok(relayed);
        }
        for entry in entries {
            publish(publisher, entry.records.into_iter().map(Outbound::from).collect()).await?;
            service.published(&entry.source);
            relayed += 1;
        }
    }
}

/// Delivers the service's due timers until `shutdown`, and every few
/// seconds relays stale outbox entries.
pub async fn run(
    pipeline: Arc<Pipeline>,
    publisher: Arc<dyn Publisher>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    let service = pipeline.service().clone();
    let mut last_relay = tokio::time::Instant::now();
    loop {
        if let Err(err) = fire_due(&pipeline, &*publisher, &*clock, &shutdown).await {
            tracing::warn!(component = service.name(), "timer delivery failed, will retry: {err:#}");
        }
        if last_relay.elapsed() >= RELAY_EVERY {
            last_relay = tokio::time::Instant::now();
            let before = clock.now_ms().saturating_sub(STALE_OUTBOX_MS);
            match relay(&service, &*publisher, before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(component = service.name(), entries = n, "relayed stale outbox entries"),
                Err(err) => tracing::warn!(component = service.name(), "outbox relay failed, will retry: {err:#}"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Delivers every timer due now, publishing what each emits.
///
/// # Errors
/// A store or publish failure; undelivered timers stay due.
pub async fn fire_due(
    pipeline: &Pipeline,
    publisher: &dyn Publisher,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let service = pipeline.service();
    loop {
        let due = service.state_store().due_timers(clock.now_ms(), BATCH)?;
        if due.is_empty() {
            return Ok(());
        }
        for timer in due {
            let Some(disposition) = pipeline.process_timer(&timer, shutdown).await else { return Ok(()) };
            match disposition {
                Disposition::Publish { records, source, duplicate } => {
                    publish(publisher, records).await?;
                    if let Some(source) = source {
                        service.published(&source);
                    }
                    if duplicate {
                        // Handled already; still here only because the
                        // component set it again for the very same time.
                        let fired = Some((timer.id.clone(), timer.at_ms));
                        service.state_store().commit(Commit { fired, now_ms: clock.now_ms(), ..Commit::default() })?;
                    }
                }
                Disposition::DeadLetter { record, .. } => {
                    publish(publisher, vec![record]).await?;
                    // Set aside: the timer must not fire again.
                    let fired = Some((timer.id.clone(), timer.at_ms));
                    service.state_store().commit(Commit { fired, now_ms: clock.now_ms(), ..Commit::default() })?;
                }
            }
        }
    }
}
