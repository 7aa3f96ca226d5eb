//! Analytics service: receives every event of the four topics and keeps the
//! shop's aggregates (orders placed, confirmed, rejected, revenue, payment
//! declines, emails sent).
//!
//! Aggregates count *facts about orders*, each at most once per order, so a
//! redelivered event never counts twice; `events_by_topic` and
//! `events_by_type` count deliveries. Routes: `GET /stats`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shop_events::{EmailSent, OrderConfirmed, types};
use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service};

/// The aggregates served at `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub orders_placed: u64,
    pub orders_confirmed: u64,
    pub orders_rejected: u64,
    pub revenue_cents: u64,
    pub payments_authorized: u64,
    pub payment_declines: u64,
    pub emails_sent: u64,
    /// Deliveries per topic, duplicates included.
    pub events_by_topic: BTreeMap<String, u64>,
    /// Deliveries per event type, duplicates included.
    pub events_by_type: BTreeMap<String, u64>,
}

/// Which facts about one order were already counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counted {
    facts: Vec<String>,
}

/// The analytics service.
pub struct Analytics;

const STATS_KEY: &str = "stats";

impl Service for Analytics {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
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
    let fact = match event.event_type.as_str() {
        types::EMAIL_SENT => format!("{}:{:?}", types::EMAIL_SENT, event.payload_json::<EmailSent>()?.kind),
        types::ORDER_PLACED
        | types::ORDER_CONFIRMED
        | types::ORDER_REJECTED
        | types::PAYMENT_AUTHORIZED
        | types::PAYMENT_DECLINED => event.event_type.clone(),
        _ => return Ok(()),
    };
    let key = format!("order/{order_id}");
    let mut counted: Counted = host.get_json(&key)?.unwrap_or_default();
    if counted.facts.contains(&fact) {
        return Ok(());
    }
    match event.event_type.as_str() {
        types::ORDER_PLACED => stats.orders_placed += 1,
        types::ORDER_CONFIRMED => {
            stats.orders_confirmed += 1;
            stats.revenue_cents += event.payload_json::<OrderConfirmed>()?.total_cents;
        }
        types::ORDER_REJECTED => stats.orders_rejected += 1,
        types::PAYMENT_AUTHORIZED => stats.payments_authorized += 1,
        types::PAYMENT_DECLINED => stats.payment_declines += 1,
        _ => stats.emails_sent += 1,
    }
    counted.facts.push(fact);
    host.put_json(&key, &counted)
}

shop_sdk::export_service!(Analytics);

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

    #[test]
    fn empty_stats_are_served() {
        let host = MemoryHost::default();
        assert_eq!(stats(&host), Stats::default());
        assert_eq!(Analytics::query(&host, &Request::get("/other")).status, 404);
    }
}
