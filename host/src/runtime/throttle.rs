//! How much CPU a misbehaving component can take from the others.
//!
//! A deadline bounds how long one call runs, not how much of the machine a
//! component that keeps failing takes: a guest that spins until its
//! deadline, event after event, or one that burns through its write caps
//! and fails, keeps a core busy. Two rules bound it to a share of one core:
//!
//! - **In a call**: past its burst (`Limits::burst`) a call runs only a
//!   slice of every epoch tick and sleeps the rest, so that the component's
//!   calls past their burst together get `percent` of one core. The call's
//!   own deadline still ends it.
//! - **After a faulty call** (a trap, a timeout, a limit): the component's
//!   next call of the same kind (handling, or queries) waits until the CPU
//!   the faulty call took is `percent` of the time since it began. Events
//!   wait in their pipeline (nothing is lost or reordered); a query that
//!   would wait longer than its own timeout is refused at once with a time
//!   to come back.
//!
//! A call that returns within its burst, or fails cheaply (a component
//! error, bad input), is never slowed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::EPOCH_TICK;

/// Longest wait a component's faults can build up, whatever they cost.
pub const MAX_PENALTY: Duration = Duration::from_secs(30);

/// Which calls of a component a fault delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Handle,
    Query,
}

/// One component's throttle, shared by all its calls.
#[derive(Debug)]
pub struct Throttle {
    percent: u32,
    /// Calls of the component past their burst right now.
    over_burst: AtomicUsize,
    /// Time calls slept past their burst, in microseconds, ever.
    slept_us: AtomicU64,
    /// Faults' penalties paid (or being paid), in microseconds, ever.
    penalized_us: AtomicU64,
    handle_free_at: Mutex<Option<Instant>>,
    query_free_at: Mutex<Option<Instant>>,
}

impl Throttle {
    /// A throttle giving a failing or overlong component `percent` (1 to
    /// 100; 100 never slows it) of one core.
    pub fn new(percent: u32) -> Self {
        Self {
            percent: percent.clamp(1, 100),
            over_burst: AtomicUsize::new(0),
            slept_us: AtomicU64::new(0),
            penalized_us: AtomicU64::new(0),
            handle_free_at: Mutex::new(None),
            query_free_at: Mutex::new(None),
        }
    }

    /// Whether this throttle ever slows anything.
    pub fn enabled(&self) -> bool {
        self.percent < 100
    }

    /// Marks a call as past its burst until the guard is dropped.
    pub(super) fn over_burst(self: &Arc<Self>) -> OverBurst {
        self.over_burst.fetch_add(1, Ordering::Relaxed);
        OverBurst(self.clone())
    }

    /// How long a call past its burst sleeps after each epoch tick it ran:
    /// with `n` such calls, each gets `percent / n` of one core.
    pub(super) fn pause_per_tick(&self) -> Duration {
        if !self.enabled() {
            return Duration::ZERO;
        }
        let n = self.over_burst.load(Ordering::Relaxed).max(1) as u32;
        // ran one tick, sleeps (100 n / percent - 1) ticks
        (EPOCH_TICK * 100 * n / self.percent).saturating_sub(EPOCH_TICK)
    }

    /// Records a sleep of a call past its burst.
    pub(super) fn slept(&self, pause: Duration) {
        self.slept_us.fetch_add(pause.as_micros() as u64, Ordering::Relaxed);
    }

    /// Charges a faulty call begun at `started` that kept a core busy for
    /// `busy`: the next call of `kind` waits until that is `percent` of the
    /// time since the call began (after an earlier penalty still running,
    /// when calls overlapped).
    pub fn charge(&self, kind: CallKind, started: Instant, busy: Duration) {
        if !self.enabled() || busy.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut free_at = self.free_at(kind).lock().unwrap_or_else(PoisonError::into_inner);
        let from = free_at.filter(|at| *at > started).unwrap_or(started);
        let until = (from + busy * 100 / self.percent).min(now + MAX_PENALTY);
        let added = until.saturating_duration_since(free_at.unwrap_or(now).max(now));
        self.penalized_us.fetch_add(added.as_micros() as u64, Ordering::Relaxed);
        *free_at = Some(until.max(free_at.unwrap_or(until)));
    }

    /// Forgets the penalties of earlier faults: another version serves now.
    pub fn forgive(&self) {
        for kind in [CallKind::Handle, CallKind::Query] {
            *self.free_at(kind).lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// How long calls of `kind` must still wait for earlier faults.
    pub fn wait_left(&self, kind: CallKind) -> Option<Duration> {
        let free_at = *self.free_at(kind).lock().unwrap_or_else(PoisonError::into_inner);
        free_at.map(|at| at.saturating_duration_since(Instant::now())).filter(|left| !left.is_zero())
    }

    /// Time calls slept past their burst, and time calls waited for earlier
    /// faults, since the component started (for metrics).
    pub fn totals(&self) -> (Duration, Duration) {
        (
            Duration::from_micros(self.slept_us.load(Ordering::Relaxed)),
            Duration::from_micros(self.penalized_us.load(Ordering::Relaxed)),
        )
    }

    fn free_at(&self, kind: CallKind) -> &Mutex<Option<Instant>> {
        match kind {
            CallKind::Handle => &self.handle_free_at,
            CallKind::Query => &self.query_free_at,
        }
    }
}

/// A call counted as past its burst (see [`Throttle::over_burst`]).
#[derive(Debug)]
pub(super) struct OverBurst(Arc<Throttle>);

impl Drop for OverBurst {
    fn drop(&mut self) {
        self.0.over_burst.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_past_its_burst_runs_its_share_of_each_tick() {
        let throttle = Arc::new(Throttle::new(10));
        let one = throttle.over_burst();
        assert_eq!(throttle.pause_per_tick(), EPOCH_TICK * 9);
        let two = throttle.over_burst();
        // Two calls past their burst share the 10 %.
        assert_eq!(throttle.pause_per_tick(), EPOCH_TICK * 19);
        drop((one, two));
        assert_eq!(throttle.over_burst.load(Ordering::Relaxed), 0);
        assert_eq!(Throttle::new(100).pause_per_tick(), Duration::ZERO);
    }

    #[test]
    fn a_fault_delays_the_next_call_of_its_kind_until_it_is_paid_for() {
        let throttle = Throttle::new(10);
        assert_eq!(throttle.wait_left(CallKind::Handle), None);
        // 100 ms of CPU in a call that began 100 ms ago: free 1 s after it began.
        let started = Instant::now() - Duration::from_millis(100);
        throttle.charge(CallKind::Handle, started, Duration::from_millis(100));
        let left = throttle.wait_left(CallKind::Handle).unwrap();
        assert!(left > Duration::from_millis(800) && left <= Duration::from_millis(900), "{left:?}");
        assert_eq!(throttle.wait_left(CallKind::Query), None, "queries are not delayed by handling's faults");
        // Faults add up, to at most MAX_PENALTY.
        throttle.charge(CallKind::Handle, Instant::now(), Duration::from_secs(60));
        let left = throttle.wait_left(CallKind::Handle).unwrap();
        assert!(left > MAX_PENALTY - Duration::from_secs(1) && left <= MAX_PENALTY, "{left:?}");
        let (_, penalized) = throttle.totals();
        assert!(penalized > MAX_PENALTY - Duration::from_secs(1) && penalized <= MAX_PENALTY, "{penalized:?}");
        // A new version does not pay for the old one's faults.
        throttle.forgive();
        assert_eq!(throttle.wait_left(CallKind::Handle), None);
        let never = Throttle::new(100);
        never.charge(CallKind::Query, Instant::now(), Duration::from_secs(1));
        assert_eq!(never.wait_left(CallKind::Query), None);
    }
}
