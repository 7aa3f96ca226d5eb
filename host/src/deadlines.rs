//! The clocks deadlines are measured by: they measure the other side's
//! silence, not this host's outage.
//!
//! A saga's deadline (the order service waits 30 s for the payment answer)
//! is a timer. Fired by the wall clock alone, it would cancel orders whose
//! answer was on its way while the broker was unreachable, or waiting in a
//! backlog this host was still catching up on. So timers are due by the
//! *deadline clock*, which is the wall clock held back two ways:
//! - **outages do not count**: time during which this host could not reach
//!   the broker (see [`BrokerLink`]) within the last `outage_window` is
//!   subtracted, so a deadline that spanned a 10 s outage fires 10 s later;
//! - **caught up first, twice**: the host's *watermark* is the latest
//!   moment `t` such that every consumer of this host has handled every
//!   record that was on its partitions at `t`; a record counts as handled
//!   only once its outputs are acknowledged. A timer due at `d` fires once
//!   the watermark has passed the moment `p` at which it passed `d`: by `p`
//!   every request on the topics at `d` was handled and its answer written
//!   (a second hop: payment answers the order service's request), and by
//!   the time the watermark passes `p`, those answers were handled too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::statistics::Statistics;

use crate::clock::Clock;
use crate::status::BrokerLink;

/// Snapshots kept waiting to be passed, at most (one a second: ten
/// minutes of backlog; older ones are dropped, which only holds the
/// watermark back).
const SNAPSHOTS_KEPT: usize = 600;

/// Where one assigned partition stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// `topic/partition`.
    pub partition: String,
    /// Offset the next record written will get (the high watermark).
    pub end: i64,
    /// Next offset the consumer has yet to finish (everything below is done).
    pub next: i64,
}

#[derive(Debug, Default)]
struct Marks {
    /// `(taken_at_ms, end per partition)`, oldest first, not yet passed.
    pending: VecDeque<(u64, BTreeMap<String, i64>)>,
    /// The watermark: every record on the partitions at this time is done.
    reached_ms: u64,
}

/// One consumer's watermark, fed with its statistics (every second).
#[derive(Debug, Clone, Default)]
pub struct Watermark(Arc<Mutex<Marks>>);

impl Watermark {
    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest time at which every record on this consumer's partitions
    /// has since been handled; 0 until it first caught up.
    pub fn reached_ms(&self) -> u64 {
        self.marks().reached_ms
    }

    /// Takes the consumer's positions at `now_ms`. `settled` says they can
    /// be trusted as a snapshot: the group is stable and the broker answers
    /// (otherwise they only count to pass earlier snapshots).
    pub fn observe(&self, now_ms: u64, positions: &[Position], settled: bool) {
        let mut marks = self.marks();
        if settled {
            if marks.pending.len() == SNAPSHOTS_KEPT {
                marks.pending.pop_front();
            }
            marks.pending.push_back((now_ms, positions.iter().map(|p| (p.partition.clone(), p.end)).collect()));
        }
        let next: BTreeMap<&str, i64> = positions.iter().map(|p| (p.partition.as_str(), p.next)).collect();
        // A partition no longer assigned is some other consumer's to finish.
        let passed = |ends: &BTreeMap<String, i64>| {
            ends.iter().all(|(partition, end)| next.get(partition.as_str()).is_none_or(|n| n >= end))
        };
        while let Some((taken_at, ends)) = marks.pending.front() {
            if !passed(ends) {
                break;
            }
            marks.reached_ms = marks.reached_ms.max(*taken_at);
            marks.pending.pop_front();
        }
    }

    /// Takes a consumer's librdkafka statistics at `now_ms`.
    pub fn observe_stats(&self, now_ms: u64, statistics: &Statistics, link_up: bool) {
        let (positions, complete) = positions(statistics);
        let stable = statistics.cgrp.as_ref().is_some_and(|g| g.state == "up" && g.join_state == "steady");
        self.observe(now_ms, &positions, complete && stable && link_up);
    }
}

/// The assigned partitions' positions, and whether every one is known
/// (fetching, with a high watermark).
fn positions(statistics: &Statistics) -> (Vec<Position>, bool) {
    let mut complete = true;
    let mut positions = Vec::new();
    for (topic, t) in &statistics.topics {
        for (partition, p) in t.partitions.iter().filter(|(p, s)| **p >= 0 && s.desired) {
            if p.fetch_state != "active" || p.hi_offset < 0 {
                complete = false;
                continue;
            }
            // Stored: handled here; committed: handled by whoever held the
            // partition before. Neither: nothing handled yet, from the start.
            let next = p.stored_offset.max(p.committed_offset);
            let next = if next < 0 { p.lo_offset.max(0) } else { next };
            positions.push(Position { partition: format!("{topic}/{partition}"), end: p.hi_offset, next });
        }
    }
    let assigned = statistics.cgrp.as_ref().map_or(0, |g| g.assignment_size);
    let all_there = usize::try_from(assigned).is_ok_and(|n| n == positions.len());
    (positions, complete && all_there)
}

/// The wall clock less the time the broker could not be reached within a
/// window: what guests compare deadlines carried in events with
/// (`clock.deadline-now-ms`). It does not wait for catch-ups: a guest
/// handling a backlog cannot tell whether its counterpart still waits, and
/// the counterpart's own timer, on the [`DeadlineClock`], decides that.
pub struct OutageClock {
    wall: Arc<dyn Clock>,
    link: BrokerLink,
    window_ms: u64,
}

impl OutageClock {
    /// The wall clock less `link`'s outages within the last `window`.
    pub fn new(wall: Arc<dyn Clock>, link: BrokerLink, window: Duration) -> Self {
        Self { wall, link, window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX) }
    }
}

impl Clock for OutageClock {
    fn now_ms(&self) -> u64 {
        let now = self.wall.now_ms();
        now.saturating_sub(self.link.down_within(now.saturating_sub(self.window_ms), now))
    }
}

/// The clock timers are due by (see the module's documentation).
pub struct DeadlineClock {
    outage: Arc<OutageClock>,
    watermarks: Vec<Watermark>,
    /// `(wall_ms, watermark_ms)` as seen, oldest first; only the last one at
    /// or before the current watermark is kept of those behind it.
    seen: Mutex<VecDeque<(u64, u64)>>,
}

impl DeadlineClock {
    /// `outage` held back by `watermarks`.
    pub fn new(outage: Arc<OutageClock>, watermarks: Vec<Watermark>) -> Self {
        Self { outage, watermarks, seen: Mutex::default() }
    }

    /// The watermark as it was when it was the current watermark's time:
    /// everything on the topics then, and what handling it wrote, is handled.
    fn caught_up_twice(&self, now: u64) -> u64 {
        let Some(watermark) = self.watermarks.iter().map(Watermark::reached_ms).min() else { return now };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.back().is_none_or(|(_, last)| *last != watermark) {
            if seen.len() == SAMPLES_KEPT {
                seen.pop_front();
            }
            seen.push_back((now, watermark));
        }
        while seen.get(1).is_some_and(|(wall, _)| *wall <= watermark) {
            seen.pop_front();
        }
        match seen.front() {
            Some((wall, then)) if *wall <= watermark => *then,
            _ => 0,
        }
    }
}

/// Watermark changes remembered (a few per second while it moves).
const SAMPLES_KEPT: usize = 10_000;

impl Clock for DeadlineClock {
    fn now_ms(&self) -> u64 {
        let wall = self.outage.wall.now_ms();
        self.outage.now_ms().min(self.caught_up_twice(wall))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn at(partition: &str, end: i64, next: i64) -> Position {
        Position { partition: partition.into(), end, next }
    }

    #[test]
    fn the_watermark_moves_once_what_was_there_is_done() {
        let mark = Watermark::default();
        assert_eq!(mark.reached_ms(), 0, "nothing is known before the first snapshot");
        mark.observe(1_000, &[at("t/0", 10, 4), at("t/1", 5, 5)], true);
        assert_eq!(mark.reached_ms(), 0, "t/0 is behind");
        mark.observe(2_000, &[at("t/0", 20, 9), at("t/1", 6, 5)], true);
        assert_eq!(mark.reached_ms(), 0);
        mark.observe(3_000, &[at("t/0", 25, 12), at("t/1", 6, 6)], false);
        assert_eq!(mark.reached_ms(), 1_000, "t/0 passed 10 (an unsettled look still counts as progress)");
        mark.observe(4_000, &[at("t/0", 30, 30), at("t/1", 6, 6)], true);
        assert_eq!(mark.reached_ms(), 4_000, "caught up with everything");
        // Under steady load it trails by the time records take.
        mark.observe(5_000, &[at("t/0", 40, 35), at("t/1", 6, 6)], true);
        mark.observe(6_000, &[at("t/0", 50, 41), at("t/1", 6, 6)], true);
        assert_eq!(mark.reached_ms(), 5_000);
        // A partition taken away no longer holds it back.
        mark.observe(7_000, &[at("t/1", 6, 6)], true);
        assert_eq!(mark.reached_ms(), 7_000);
    }

    #[test]
    fn deadlines_skip_outages_and_wait_for_every_consumer() {
        let wall = Arc::new(ManualClock::at(100_000));
        let link = BrokerLink::default();
        let (a, b) = (Watermark::default(), Watermark::default());
        let outage = Arc::new(OutageClock::new(wall.clone(), link.clone(), Duration::from_secs(60)));
        let clock = DeadlineClock::new(outage.clone(), vec![a.clone(), b.clone()]);
        // Each looks at `at` with `end` records on its partition, `next` done.
        let both = |at: u64, end: i64, next: i64| {
            wall.set(at);
            a.observe(at, &[Position { partition: "t/0".into(), end, next }], true);
            b.observe(at, &[], true);
        };
        b.observe(99_000, &[], true);
        assert_eq!(clock.now_ms(), 0, "a has not caught up yet");
        both(100_000, 1, 0);
        both(101_000, 2, 1);
        assert_eq!((a.reached_ms(), clock.now_ms()), (100_000, 0), "caught up once: what was written since may not be");
        both(102_000, 3, 2);
        assert_eq!(clock.now_ms(), 100_000, "the watermark passed 101 s, when it had reached 100 s");
        link.report_down(102_000, "gone");
        wall.set(112_000);
        assert_eq!(clock.now_ms(), 100_000, "stopped during the outage (no snapshot passes either)");
        assert_eq!(outage.now_ms(), 102_000, "guests' deadline clock: stopped at the outage's start");
        link.report_up(112_000);
        both(113_000, 3, 3);
        both(114_000, 3, 3);
        assert_eq!(clock.now_ms(), 104_000, "caught up, but the outage's 10 s do not count");
        both(200_000, 3, 3);
        assert_eq!(clock.now_ms(), 200_000, "an outage out of the window is forgotten");
        let alone = DeadlineClock::new(
            Arc::new(OutageClock::new(wall, BrokerLink::default(), Duration::from_secs(60))),
            Vec::new(),
        );
        assert_eq!(alone.now_ms(), 200_000, "no consumer: the wall clock");
    }
}
