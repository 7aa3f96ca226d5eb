//! A due timer's way through the pipeline: delivered like a record of the
//! `timer` topic, settled, and then removed, or moved on if its event was
//! set aside (a timer is never dropped: a lost deadline would leave its
//! saga hanging).

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Settled, Turn, settle};
use crate::bus::Publisher;
use crate::clock::Clock;
use crate::state::{Commit, Durable, StoreError, Timer, TimerChange};

/// A timer whose event was dead-lettered fires again this much later.
pub const FAILED_TIMER_RETRY_MS: u64 = 60_000;

impl Pipeline {
    /// Delivers `timer` (claimed due by the caller) to the component and
    /// publishes what it emits. A timer handled already (or no longer due)
    /// is removed; one whose event is dead-lettered fires again
    /// [`FAILED_TIMER_RETRY_MS`] later on the `deadlines` clock, e.g. on a
    /// fixed version. `Ok(None)`:
    /// shutdown interrupted it, and it stays due.
    ///
    /// # Errors
    /// A store or publish failure; the timer stays due.
    pub async fn fire(
        &self,
        timer: &Timer,
        publisher: &dyn Publisher,
        deadlines: &dyn Clock,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Settled>> {
        let Some(disposition) = self.submit_timer(timer.clone(), shutdown).await else { return Ok(None) };
        let service = self.service();
        let settled = settle(service, publisher, disposition, Turn::default(), &self.dead_letter_topic()).await?;
        match settled {
            Settled::Handled => {}
            // Handled already (or no longer due): make sure this very timer is gone.
            Settled::Duplicate => self.settle_timer(timer, None).await?,
            Settled::DeadLettered => {
                tracing::error!(component = service.name(), timer = %timer.id, "timer set aside, next try in 60 s");
                self.settle_timer(timer, Some(deadlines.now_ms() + FAILED_TIMER_RETRY_MS)).await?;
            }
        }
        Ok(Some(settled))
    }

    /// Removes a timer that fired, or moves it to `retry_at_ms`, unless it
    /// was cancelled or set again meanwhile. Serialized with handling; one
    /// commit, conditional on that very instance still being set (checked
    /// by the store at commit, so a cancel on another host in between wins).
    async fn settle_timer(&self, timer: &Timer, retry_at_ms: Option<u64>) -> anyhow::Result<()> {
        let service = self.service();
        let _serial = service.serial().await;
        let fired = Some((timer.id.clone(), timer.nonce));
        let timers = match retry_at_ms {
            Some(at_ms) => vec![TimerChange::Set(Timer { at_ms, nonce: crate::state::new_nonce(), ..timer.clone() })],
            None => Vec::new(),
        };
        let commit = Commit { fired, timers, now_ms: self.core.clock.now_ms(), ..Commit::default() };
        // The store's calls block (a durable commit waits for its fsync, a
        // database for its round trips): not on an async worker.
        let store = service.state_store().clone();
        let committed = tokio::task::spawn_blocking(move || match store.commit(commit) {
            // Cancelled or set again meanwhile: nothing left to settle.
            Err(StoreError::Conflict(_)) => Ok(Durable::done()),
            committed => committed,
        })
        .await
        .context("the timer's commit thread failed")??;
        Ok(committed.wait().await?)
    }
}
