//! Handing a component's partitions to the hosts that reach the shared
//! store: a probe asks the store every second whether it answers; once it
//! has not answered for as long as a commit may take, the component's
//! consumer leaves its group (its partitions move to the other members),
//! and once the store answers again the consumer rejoins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::runtime::ServiceRuntime;
use crate::state::StoreError;

/// How long the probe rests between two questions.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the consumer is to do after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transition {
    /// Leave the group: the store has not answered for too long.
    HandOff,
    /// Join it again: the store answers.
    Rejoin,
}

/// Whether a store is cut off, from the probes' outcomes: cut off once no
/// probe was answered for `after`, counted from the start of the first
/// unanswered one; back as soon as one is answered.
#[derive(Debug)]
pub(super) struct StoreWatch {
    after: Duration,
    /// Start of the first unanswered probe since the last answer.
    unanswered_since: Option<Instant>,
    cut_off: bool,
}

impl StoreWatch {
    /// A watch that finds the store cut off after `after` without an answer.
    pub(super) fn new(after: Duration) -> Self {
        Self { after, unanswered_since: None, cut_off: false }
    }

    /// Takes in a probe that started at `started` and ended at `now`,
    /// `answered` or not; says what changes, if anything.
    pub(super) fn observe(&mut self, started: Instant, now: Instant, answered: bool) -> Option<Transition> {
        if answered {
            self.unanswered_since = None;
            return std::mem::take(&mut self.cut_off).then_some(Transition::Rejoin);
        }
        let since = *self.unanswered_since.get_or_insert(started);
        if self.cut_off || now.saturating_duration_since(since) < self.after {
            return None;
        }
        self.cut_off = true;
        Some(Transition::HandOff)
    }
}

/// `true` while the store is cut off, as the probe last found it.
pub(super) type CutOff = watch::Receiver<bool>;

/// Probes `service`'s store until `shutdown`, finding it cut off after
/// `after` without an answer; the consumer follows the returned flag.
pub(super) fn watch_store(service: Arc<ServiceRuntime>, after: Duration, shutdown: CancellationToken) -> CutOff {
    let (flag, cut_off) = watch::channel(false);
    tokio::spawn(probe(service, StoreWatch::new(after), flag, shutdown));
    cut_off
}

async fn probe(
    service: Arc<ServiceRuntime>,
    mut store_watch: StoreWatch,
    flag: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let name = service.name().to_owned();
    loop {
        let started = Instant::now();
        let store = service.state_store().clone();
        // A round trip that blocks, up to the store's timeouts when the
        // database does not answer: off the async workers.
        let asked = tokio::task::spawn_blocking(move || store.ping());
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            answer = asked => answer.unwrap_or_else(|err| Err(StoreError::Unavailable(err.to_string()))),
        };
        match (store_watch.observe(started, Instant::now(), answer.is_ok()), answer) {
            (Some(Transition::HandOff), Err(err)) => {
                tracing::warn!(
                    component = %name,
                    "state store unanswered for {:?} (its timeouts): handing the partitions to hosts that reach it: {err}",
                    store_watch.after
                );
                flag.send_replace(true);
            }
            (Some(Transition::Rejoin), _) => {
                tracing::info!(component = %name, "state store answers again: taking partitions back");
                flag.send_replace(false);
            }
            _ => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

/// Resolves once `cut_off` reads `value`; never when there is no watch (a
/// store no other host shares: nobody to hand the partitions to).
pub(super) async fn until(cut_off: Option<&mut CutOff>, value: bool) {
    if let Some(cut_off) = cut_off
        && cut_off.wait_for(|cut| *cut == value).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_millis(10_000);

    #[test]
    fn hands_off_after_the_timeouts_without_an_answer_and_rejoins_on_the_next_answer() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = StoreWatch::new(AFTER);
        assert_eq!(watch.observe(at(0), at(5), true), None, "up");
        // Cut off from 1 s on: probes give up one after the other.
        assert_eq!(watch.observe(at(1_000), at(4_000), false), None);
        assert_eq!(watch.observe(at(5_000), at(8_000), false), None);
        assert_eq!(watch.observe(at(9_000), at(10_999), false), None, "9.999 s without an answer");
        assert_eq!(watch.observe(at(11_000), at(11_000), false), Some(Transition::HandOff), "10 s");
        assert_eq!(watch.observe(at(12_000), at(15_000), false), None, "once");
        assert_eq!(watch.observe(at(16_000), at(16_010), true), Some(Transition::Rejoin));
        assert_eq!(watch.observe(at(17_000), at(17_010), true), None, "once");
        // A new outage counts from its own first unanswered probe.
        assert_eq!(watch.observe(at(18_000), at(21_000), false), None);
        assert_eq!(watch.observe(at(28_000), at(28_001), false), Some(Transition::HandOff));
    }

    #[test]
    fn a_short_outage_hands_nothing_off() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = StoreWatch::new(AFTER);
        assert_eq!(watch.observe(at(0), at(9_000), false), None);
        assert_eq!(watch.observe(at(9_500), at(9_510), true), None, "answered before 10 s: no rejoin either");
        assert_eq!(watch.observe(at(10_000), at(19_000), false), None, "counted from 10 s, not from 0");
    }

    #[tokio::test]
    async fn until_follows_the_flag_and_waits_forever_without_a_watch() {
        let (flag, mut cut_off) = watch::channel(false);
        until(Some(&mut cut_off), false).await;
        let waiting = tokio::spawn(async move { until(Some(&mut cut_off), true).await });
        flag.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        let never = tokio::time::timeout(Duration::from_millis(50), until(None, false)).await;
        assert!(never.is_err(), "no watch: never");
    }
}
