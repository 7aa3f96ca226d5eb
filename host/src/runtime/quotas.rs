//! A component's quotas, shared by all its calls: log lines per call and
//! per second (a guest logging in a loop would write gigabytes and hold the
//! stdout lock every component's lines need), and its state totals
//! ([`StateQuota`]: keys, bytes, timers, outbox entries). Lines past a
//! quota are dropped and counted (`shop_guest_log_lines_dropped_total`),
//! with one summary line per second at most.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::state::{StateLimits, StateQuota, StateStore};

/// Log lines a component may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Lines of one call (`handle` or `query`).
    pub per_call: u32,
    /// Lines of all its calls within one second.
    pub per_second: u32,
}

impl Default for LogLimits {
    /// [`crate::limits`]'s: far above what the shop's components write.
    fn default() -> Self {
        use crate::limits::{DEFAULT_MAX_LOG_LINES_PER_CALL, DEFAULT_MAX_LOG_LINES_PER_SECOND};
        Self { per_call: DEFAULT_MAX_LOG_LINES_PER_CALL, per_second: DEFAULT_MAX_LOG_LINES_PER_SECOND }
    }
}

/// The second being counted.
#[derive(Debug)]
struct Window {
    started: Instant,
    lines: u32,
    /// Whether this second's summary line was written.
    warned: bool,
}

/// One component's quotas.
#[derive(Debug)]
pub struct Quotas {
    /// Its state totals.
    pub state: Arc<StateQuota>,
    log: LogLimits,
    window: Mutex<Window>,
    dropped: AtomicU64,
}

impl Quotas {
    /// Quotas on the component keeping its state in `store`.
    pub fn new(store: Arc<dyn StateStore>, log: LogLimits, state: StateLimits) -> Self {
        let window = Window { started: Instant::now(), lines: 0, warned: false };
        Self { state: StateQuota::new(store, state), log, window: Mutex::new(window), dropped: AtomicU64::new(0) }
    }

    /// Whether the `call_line`th line of a call of `component` may be
    /// written; if not, it is counted, and the first line dropped in a
    /// second writes a summary.
    pub fn admit_log(&self, component: &str, call_line: u32) -> bool {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if window.started.elapsed() >= Duration::from_secs(1) {
            *window = Window { started: Instant::now(), lines: 0, warned: false };
        }
        let quota = match (call_line > self.log.per_call, window.lines >= self.log.per_second) {
            (false, false) => {
                window.lines += 1;
                return true;
            }
            (true, _) => format!("{} lines in one call (max_log_lines_per_call)", self.log.per_call),
            (false, true) => format!("{} lines a second (max_log_lines_per_second)", self.log.per_second),
        };
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if !std::mem::replace(&mut window.warned, true) {
            tracing::warn!(
                target: "component",
                component,
                "log lines past {quota} are dropped, for this second at least (counted in shop_guest_log_lines_dropped_total)"
            );
        }
        false
    }

    /// Log lines dropped, ever.
    pub fn log_lines_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::{event, handle, service};
    use crate::runtime::{CallError, Engine, Event, Grants, HandleError, Limits, ServiceRuntime};
    use crate::state::StateQuota;

    /// `misbehave` with these quotas, on a store of its own.
    fn misbehave(log: LogLimits, state: StateLimits) -> ServiceRuntime {
        let limits = Limits { log, state, ..Limits::default() };
        service(
            "misbehave",
            Engine::new().unwrap(),
            limits,
            Grants::default(),
            Arc::new(crate::state::MemoryStore::default()),
        )
    }

    /// An event of `event_type` with its own id, key `key` and `payload`.
    fn numbered(id: &str, event_type: &str, key: &str, payload: &str) -> Event {
        Event { id: id.into(), payload: payload.as_bytes().to_vec(), ..event(event_type, key) }
    }

    /// Handles `event` with the usage read just before (as the background
    /// reading would have, given time); the permanent error, if any.
    async fn run(rt: &ServiceRuntime, event: &Event) -> Result<(), String> {
        StateQuota::read_now(&rt.quotas().state).unwrap();
        match handle(rt, event).await {
            Ok(_) => Ok(()),
            Err(CallError::Handle(HandleError::Permanent(reason))) => Err(reason),
            Err(err) => panic!("{}: {err}", event.id),
        }
    }

    /// The component's `/metrics` text.
    fn metrics(rt: ServiceRuntime) -> String {
        use crate::status::{BrokerLink, ConsumerStatus};
        let metrics =
            crate::metrics::ComponentMetrics::new(Arc::new(rt), ConsumerStatus::default(), BrokerLink::default());
        metrics.encode().unwrap()
    }

    fn refusals(rt: &ServiceRuntime, quota: crate::state::Quota) -> u64 {
        let at = crate::state::Quota::ALL.iter().position(|q| *q == quota).unwrap();
        rt.quotas().state.refusals()[at]
    }

    #[tokio::test]
    async fn a_guest_past_its_key_quota_fails_for_good_and_may_still_rewrite() {
        let rt = misbehave(LogLimits::default(), StateLimits { max_keys: 5, ..StateLimits::default() });
        run(&rt, &numbered("e1", "FillKeys", "a", "3")).await.unwrap();
        let reason = run(&rt, &numbered("e2", "FillKeys", "b", "3")).await.unwrap_err();
        assert!(reason.contains("quota max_state_keys") && reason.contains("keeps 3"), "{reason}");
        assert_eq!(rt.state_store().get("b-0").unwrap(), None, "nothing of the call is kept");
        assert_eq!(refusals(&rt, crate::state::Quota::Keys), 1);
        run(&rt, &numbered("e3", "FillKeys", "a", "3")).await.expect("keys it has may be written again");
        run(&rt, &numbered("e4", "FillKeys", "c", "2")).await.expect("up to the quota");
    }

    #[tokio::test]
    async fn a_guest_past_its_byte_timer_or_outbox_quota_fails_for_good() {
        let rt = misbehave(LogLimits::default(), StateLimits { max_bytes: 100_000, ..StateLimits::default() });
        let reason = run(&rt, &numbered("w", "WriteBomb", "w", "")).await.unwrap_err();
        assert!(reason.contains("quota max_state_bytes"), "{reason}");

        let rt = misbehave(LogLimits::default(), StateLimits { max_timers: 3, ..StateLimits::default() });
        let reason = run(&rt, &numbered("t", "TimerBomb", "t", "")).await.unwrap_err();
        assert!(reason.contains("quota max_timers:"), "{reason}");
        assert_eq!(rt.state_store().timer_count().unwrap(), 0, "no timer of the call is kept");

        let rt = misbehave(LogLimits::default(), StateLimits { max_outbox: 2, ..StateLimits::default() });
        for id in ["o1", "o2"] {
            run(&rt, &numbered(id, "Echo", id, "{}")).await.unwrap();
        }
        let reason = run(&rt, &numbered("o3", "Echo", "o3", "{}")).await.unwrap_err();
        assert!(reason.contains("quota max_outbox_entries") && reason.contains("keeps 2"), "{reason}");
        assert_eq!(refusals(&rt, crate::state::Quota::Outbox), 1);
        let scraped = metrics(rt);
        assert!(
            scraped.contains(r#"shop_guest_quota_refusals_total{component="misbehave",quota="max_outbox_entries"} 1"#),
            "{scraped}"
        );
        assert!(
            scraped.contains(r#"shop_guest_quota_refusals_total{component="misbehave",quota="max_state_keys"} 0"#),
            "{scraped}"
        );
    }

    #[tokio::test]
    async fn a_guest_flooding_its_log_is_cut_off_and_counted() {
        let rt = misbehave(LogLimits { per_call: 10, per_second: 10_000 }, StateLimits::default());
        run(&rt, &numbered("l1", "LogBomb", "l", "1000")).await.unwrap();
        assert_eq!(rt.quotas().log_lines_dropped(), 990, "ten lines a call");
        run(&rt, &numbered("l2", "LogBomb", "l", "10")).await.unwrap();
        assert_eq!(rt.quotas().log_lines_dropped(), 990, "a new call, ten more");
        let scraped = metrics(rt);
        assert!(scraped.contains(r#"shop_guest_log_lines_dropped_total{component="misbehave"} 990"#), "{scraped}");

        let rt = misbehave(LogLimits { per_call: 1_000, per_second: 20 }, StateLimits::default());
        run(&rt, &numbered("l3", "LogBomb", "l", "100")).await.unwrap();
        // Twenty a second: even if the call spans the turn of a second.
        assert!(rt.quotas().log_lines_dropped() >= 60, "{}", rt.quotas().log_lines_dropped());
    }

    fn quotas(per_call: u32, per_second: u32) -> Quotas {
        let store = Arc::new(crate::state::MemoryStore::default());
        Quotas::new(store, LogLimits { per_call, per_second }, StateLimits::default())
    }

    #[test]
    fn lines_past_a_call_or_a_second_are_dropped_and_counted() {
        let q = quotas(3, 5);
        let admitted = (1..=10).filter(|&line| q.admit_log("c", line)).count();
        assert_eq!((admitted, q.log_lines_dropped()), (3, 7), "three a call");
        let admitted = (0..10).filter(|_| q.admit_log("c", 1)).count();
        assert_eq!((admitted, q.log_lines_dropped()), (2, 15), "five a second, three gone already");
    }
}
