//! Analytics service: receives every event of the four topics and keeps the
//! shop's aggregates (orders placed, confirmed, rejected, cancelled, revenue,
//! payment declines, refunds and voids, emails sent).
//!
//! Aggregates count *facts about orders*, each at most once per order, so a
//! redelivered event never counts twice; `events_by_topic` and
//! `events_by_type` count the events handed to the component (the host
//! already drops a redelivered event id, so these count distinct events). Every update is commutative (counts,
//! sums and per-order maxima), so the events of one order may arrive in any
//! order across topics and the totals converge. Routes: `GET /stats`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shop_events::{EmailSent, OrderConfirmed, PaymentRefunded, PaymentVoided, types};
use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service, TIMER_TOPIC};

/// The aggregates served at `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub orders_placed: u64,
    pub orders_confirmed: u64,
    pub orders_rejected: u64,
    #[serde(default)]
    pub orders_cancelled: u64,
    /// Sum of the confirmed orders' totals.
    pub revenue_cents: u64,
    pub payments_authorized: u64,
    pub payment_declines: u64,
    /// Orders with a `PaymentRefunded` answer.
    #[serde(default)]
    pub payments_refunded: u64,
    /// Money given back, by refund or by voiding a late capture, per order
    /// the largest amount reported.
    #[serde(default)]
    pub refunded_cents: u64,
    /// Orders with a `PaymentVoided` answer.
    #[serde(default)]
    pub payments_voided: u64,
    pub emails_sent: u64,
    /// Events handled per topic (each event id once: the host drops repeats).
    pub events_by_topic: BTreeMap<String, u64>,
    /// Events handled per event type (each event id once).
    pub events_by_type: BTreeMap<String, u64>,
}

/// Which facts about one order were already counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counted {
    facts: Vec<String>,
    /// The largest refund reported for the order, included in the stats.
    #[serde(default)]
    refunded_cents: u64,
}

/// The analytics service.
pub struct Analytics;

const STATS_KEY: &str = "stats";

impl Service for Analytics {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        if event.topic == TIMER_TOPIC {
            // Analytics sets no timers; nothing there is a fact about the shop.
            return Ok(Vec::new());
        }
        let mut stats: Stats = host.get_json(STATS_KEY)?.unwrap_or_default();
        *stats.events_by_topic.entry(event.topic.clone()).or_default() += 1;
        *stats.events_by_type.entry(event.event_type.clone()).or_default() += 1;
        if let Some(order_id) = event.key.as_deref().filter(|k| !k.is_empty()) {
            count_fact(host, &mut stats, order_id, event)?;
        }
        host.put_json(STATS_KEY, &stats)?;
        Ok(Vec::new())
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["stats"]) => match host.get_json::<Stats>(STATS_KEY) {
                Ok(stats) => Response::json(200, &stats.unwrap_or_default()),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            _ => Response::not_found("unknown route; try GET /stats"),
        }
    }
}

/// Counts the fact an event states about its order, once per order.
fn count_fact(host: &mut impl Host, stats: &mut Stats, order_id: &str, event: &Event) -> Result<(), HandleError> {
    let (fact, refunded_cents) = match event.event_type.as_str() {
        types::EMAIL_SENT => (format!("{}:{:?}", types::EMAIL_SENT, event.payload_json::<EmailSent>()?.kind), 0),
        types::PAYMENT_REFUNDED => (event.event_type.clone(), event.payload_json::<PaymentRefunded>()?.refunded_cents),
        types::PAYMENT_VOIDED => (event.event_type.clone(), event.payload_json::<PaymentVoided>()?.refunded_cents),
        types::ORDER_PLACED
        | types::ORDER_CONFIRMED
        | types::ORDER_REJECTED
        | types::ORDER_CANCELLED
        | types::PAYMENT_AUTHORIZED
        | types::PAYMENT_DECLINED => (event.event_type.clone(), 0),
        _ => return Ok(()),
    };
    let key = format!("order/{order_id}");
    let mut counted: Counted = host.get_json(&key)?.unwrap_or_default();
    // A refund and a void of one order may report the same money: count the
    // largest amount once (a maximum does not depend on arrival order).
    let mut changed = false;
    if refunded_cents > counted.refunded_cents {
        stats.refunded_cents += refunded_cents - counted.refunded_cents;
        counted.refunded_cents = refunded_cents;
        changed = true;
    }
    if !counted.facts.contains(&fact) {
        count(stats, event)?;
        counted.facts.push(fact);
        changed = true;
    }
    if changed { host.put_json(&key, &counted) } else { Ok(()) }
}

/// Adds a first-seen fact to the aggregates.
fn count(stats: &mut Stats, event: &Event) -> Result<(), HandleError> {
    match event.event_type.as_str() {
        types::ORDER_PLACED => stats.orders_placed += 1,
        types::ORDER_CONFIRMED => {
            stats.orders_confirmed += 1;
            stats.revenue_cents += event.payload_json::<OrderConfirmed>()?.total_cents;
        }
        types::ORDER_REJECTED => stats.orders_rejected += 1,
        types::ORDER_CANCELLED => stats.orders_cancelled += 1,
        types::PAYMENT_AUTHORIZED => stats.payments_authorized += 1,
        types::PAYMENT_DECLINED => stats.payment_declines += 1,
        types::PAYMENT_REFUNDED => stats.payments_refunded += 1,
        types::PAYMENT_VOIDED => stats.payments_voided += 1,
        _ => stats.emails_sent += 1,
    }
    Ok(())
}

shop_sdk::export_service!(Analytics);
shop_sdk::contract!();

#[cfg(test)]
mod tests {
    use super::*;
    use shop_events::{EmailKind, topics};
    use shop_sdk::MemoryHost;

    fn stats(host: &MemoryHost) -> Stats {
        Analytics::query(host, &Request::get("/stats")).body_json().unwrap()
    }

    fn confirmed(order_id: &str, total: u64) -> Event {
        let payload = OrderConfirmed { order_id: order_id.into(), total_cents: total, payment_id: "p".into() };
        Event::json("e", topics::ORDERS, types::ORDER_CONFIRMED, order_id, &payload)
    }

    #[test]
    fn counts_each_fact_once_per_order() {
        let mut host = MemoryHost::default();
        for event in [confirmed("o1", 100), confirmed("o1", 100), confirmed("o2", 50)] {
            Analytics::handle(&mut host, &event).unwrap();
        }
        let s = stats(&host);
        assert_eq!((s.orders_confirmed, s.revenue_cents), (2, 150));
        assert_eq!(s.events_by_topic[topics::ORDERS], 3, "deliveries are all counted");
    }

    #[test]
    fn counts_emails_by_kind_and_ignores_unknown_types() {
        let mut host = MemoryHost::default();
        let sent = |kind| EmailSent {
            order_id: "o1".into(),
            email_id: "x".into(),
            kind,
            to: "a@b.c".into(),
            subject: "s".into(),
        };
        for kind in [EmailKind::OrderConfirmed, EmailKind::OrderRejected, EmailKind::OrderConfirmed] {
            Analytics::handle(&mut host, &Event::json("e", topics::ANALYTICS, types::EMAIL_SENT, "o1", &sent(kind)))
                .unwrap();
        }
        Analytics::handle(&mut host, &Event::json("e", topics::PAYMENTS, "PaymentRequested", "o1", &())).unwrap();
        let s = stats(&host);
        assert_eq!(s.emails_sent, 2);
        assert_eq!(s.events_by_type["PaymentRequested"], 1);
        assert_eq!(s.orders_placed, 0);
    }

    /// A few orders' events on every topic, duplicates included: a confirmed
    /// order, a cancelled one refunded (and voided too, reporting the same
    /// money), a voided one, a rejected one.
    fn saga_events() -> Vec<Event> {
        let ev = |topic, event_type, order_id: &str, payload: serde_json::Value| {
            Event::json(&format!("{event_type}-{order_id}"), topic, event_type, order_id, &payload)
        };
        let refunded = |o: &str, cents: u64| {
            serde_json::json!(PaymentRefunded { order_id: o.into(), payment_id: "p".into(), refunded_cents: cents })
        };
        let voided = |o: &str, cents: u64| {
            serde_json::json!(PaymentVoided { order_id: o.into(), refunded_cents: cents, note: "n".into() })
        };
        let sent = |o: &str, kind| {
            serde_json::json!(EmailSent {
                order_id: o.into(),
                email_id: "x".into(),
                kind,
                to: "t".into(),
                subject: "s".into()
            })
        };
        let order =
            |o: &str| serde_json::json!({ "order_id": o, "total_cents": 700, "payment_id": "p", "reason": "r" });
        let any = serde_json::json!({});
        let mut events = Vec::new();
        for o in ["ok", "refund", "void", "no"] {
            events.push(ev(topics::ORDERS, types::ORDER_PLACED, o, any.clone()));
        }
        events.extend([
            ev(topics::PAYMENTS, types::PAYMENT_AUTHORIZED, "ok", any.clone()),
            ev(topics::ORDERS, types::ORDER_CONFIRMED, "ok", order("ok")),
            ev(topics::ANALYTICS, types::EMAIL_SENT, "ok", sent("ok", EmailKind::OrderConfirmed)),
            ev(topics::PAYMENTS, types::PAYMENT_AUTHORIZED, "refund", any.clone()),
            ev(topics::PAYMENTS, types::PAYMENT_REFUNDED, "refund", refunded("refund", 700)),
            ev(topics::PAYMENTS, types::PAYMENT_VOIDED, "refund", voided("refund", 700)),
            ev(topics::ORDERS, types::ORDER_CANCELLED, "refund", order("refund")),
            ev(topics::ANALYTICS, types::EMAIL_SENT, "refund", sent("refund", EmailKind::OrderCancelled)),
            ev(topics::ORDERS, types::ORDER_CANCELLED, "void", order("void")),
            ev(topics::PAYMENTS, types::PAYMENT_VOIDED, "void", voided("void", 300)),
            ev(topics::PAYMENTS, types::PAYMENT_DECLINED, "no", any.clone()),
            ev(topics::ORDERS, types::ORDER_REJECTED, "no", order("no")),
            ev(TIMER_TOPIC, "PaymentDeadline", "void", any.clone()),
        ]);
        let again: Vec<Event> = events.iter().step_by(2).cloned().collect();
        events.extend(again);
        events
    }

    fn stats_after(events: impl IntoIterator<Item = Event>) -> Stats {
        let mut host = MemoryHost::default();
        for event in events {
            Analytics::handle(&mut host, &event).unwrap();
        }
        stats(&host)
    }

    #[test]
    fn saga_facts_are_counted_once_whatever_the_arrival_order() {
        let events = saga_events();
        let forward = stats_after(events.clone());
        assert_eq!(
            (forward.orders_placed, forward.orders_confirmed, forward.orders_rejected, forward.orders_cancelled),
            (4, 1, 1, 2)
        );
        assert_eq!((forward.payments_refunded, forward.payments_voided, forward.refunded_cents), (1, 2, 1_000));
        assert_eq!((forward.revenue_cents, forward.emails_sent, forward.payment_declines), (700, 2, 1));
        assert!(!forward.events_by_topic.contains_key(TIMER_TOPIC), "timer events are not counted");
        assert_eq!(stats_after(events.iter().rev().cloned()), forward);
        // Interleave by a fixed stride: another arrival order of the same multiset.
        let n = events.len();
        assert_eq!(stats_after((0..n).map(|i| events[(i * 7) % n].clone())), forward, "7 and {n} coprime");
    }

    #[test]
    fn empty_stats_are_served() {
        let host = MemoryHost::default();
        assert_eq!(stats(&host), Stats::default());
        assert_eq!(Analytics::query(&host, &Request::get("/other")).status, 404);
    }
}
