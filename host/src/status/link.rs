//! Whether this host can reach the Kafka cluster, as its own clients see
//! it: the gateway answers `503` at once while it cannot, `/health` says
//! `degraded` with the reason, and deadlines do not count the time (see
//! `crate::deadlines`). The Kafka adapter reports it (`crate::kafka`'s
//! `observe_error` and `observe_stats`); nothing here knows Kafka.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

/// Outages remembered, at most (older ones are forgotten first).
const OUTAGES_KEPT: usize = 256;

/// Since when, and why, the cluster cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Down {
    /// Milliseconds since the Unix epoch.
    pub since_ms: u64,
    pub reason: String,
}

#[derive(Debug, Default)]
struct State {
    down: Option<Down>,
    /// Past outages, `(start_ms, end_ms)`, oldest first.
    outages: VecDeque<(u64, u64)>,
}

/// The host's view of its connection to the cluster; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BrokerLink(Arc<Mutex<State>>);

impl BrokerLink {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cluster cannot be reached since `now_ms` (kept if already down).
    pub fn report_down(&self, now_ms: u64, reason: &str) {
        let mut state = self.state();
        if state.down.is_none() {
            tracing::warn!(reason, "Kafka unreachable");
            state.down = Some(Down { since_ms: now_ms, reason: reason.to_owned() });
        }
    }

    /// The cluster answers again at `now_ms`.
    pub fn report_up(&self, now_ms: u64) {
        let mut state = self.state();
        if let Some(down) = state.down.take() {
            let end = now_ms.max(down.since_ms);
            tracing::info!(outage_ms = end - down.since_ms, "Kafka reachable again");
            if state.outages.len() == OUTAGES_KEPT {
                state.outages.pop_front();
            }
            state.outages.push_back((down.since_ms, end));
        }
    }

    /// `None` while the cluster is reachable.
    pub fn down(&self) -> Option<Down> {
        self.state().down.clone()
    }

    /// Milliseconds within `[from_ms, to_ms]` during which the cluster could
    /// not be reached, the current outage included.
    pub fn down_within(&self, from_ms: u64, to_ms: u64) -> u64 {
        let state = self.state();
        let current = state.down.as_ref().map(|d| (d.since_ms, to_ms));
        state
            .outages
            .iter()
            .copied()
            .chain(current)
            .map(|(start, end)| end.min(to_ms).saturating_sub(start.max(from_ms)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_measured_within_a_window() {
        let link = BrokerLink::default();
        assert_eq!((link.down(), link.down_within(0, 1_000)), (None, 0));
        link.report_down(100, "gone");
        link.report_down(150, "still gone");
        assert_eq!(link.down(), Some(Down { since_ms: 100, reason: "gone".into() }), "the first report counts");
        assert_eq!(link.down_within(0, 400), 300, "the current outage counts up to now");
        link.report_up(500);
        assert_eq!(link.down(), None);
        link.report_up(600);
        link.report_down(1_000, "again");
        link.report_up(1_100);
        assert_eq!(link.down_within(0, 2_000), 500);
        assert_eq!(link.down_within(300, 1_050), 250, "clipped to the window");
        assert_eq!(link.down_within(1_200, 2_000), 0);
    }
}
