//! Payment service: authorizes or declines the payment of an order with
//! deterministic rules on test card numbers and amount limits, and keeps a
//! ledger of its decisions.
//!
//! Consumes `payments` (`PaymentRequested`); answers on `payments`
//! (`PaymentAuthorized` or `PaymentDeclined`). Routes: `GET /payments/{order_id}`.

mod rules;

pub use rules::{Decision, decide};
use serde::{Deserialize, Serialize};
use shop_events::{PaymentAuthorized, PaymentDeclined, PaymentRequested, topics, types};
use shop_sdk::{Event, HandleError, Host, Level, Outgoing, Request, Response, Service};

/// Default for the `max_amount_cents` config value: 5,000.00.
pub const DEFAULT_MAX_AMOUNT_CENTS: u64 = 500_000;

/// One ledger entry: the decision taken for an order, taken once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: u64,
    pub decision: Decision,
    pub decided_at_ms: u64,
}

/// The payment service.
pub struct Payment;

fn ledger_key(order_id: &str) -> String {
    format!("payment/{order_id}")
}

impl Service for Payment {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        match event.event_type.as_str() {
            types::PAYMENT_REQUESTED => authorize(host, &event.payload_json()?),
            // Our own answers travel on the same topic: nothing to do.
            _ => Ok(Vec::new()),
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["payments", order_id]) => match host.get_json::<LedgerEntry>(&ledger_key(order_id)) {
                Ok(Some(entry)) => Response::json(200, &entry),
                Ok(None) => Response::not_found(&format!("no payment for order {order_id}")),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            _ => Response::not_found("unknown route; try GET /payments/{order_id}"),
        }
    }
}

/// Decides once per order; a redelivered request gets the recorded decision
/// again, so an order is never charged twice.
fn authorize(host: &mut impl Host, req: &PaymentRequested) -> Result<Vec<Outgoing>, HandleError> {
    if cfg!(feature = "trap") {
        panic!("test variant `trap`: refusing order {}", req.order_id);
    }
    let key = ledger_key(&req.order_id);
    let entry = match host.get_json::<LedgerEntry>(&key)? {
        Some(entry) => entry,
        None => {
            let max = host.config_or("max_amount_cents", DEFAULT_MAX_AMOUNT_CENTS)?;
            let entry = LedgerEntry {
                payment_id: format!("pay_{}", req.order_id),
                order_id: req.order_id.clone(),
                amount_cents: req.amount_cents,
                decision: decide(&req.card_number, req.amount_cents, max),
                decided_at_ms: host.now_ms(),
            };
            host.put_json(&key, &entry)?;
            let outcome = match &entry.decision {
                Decision::Authorized { .. } => "authorized",
                Decision::Declined { code, .. } => code,
            };
            host.log(Level::Info, "payment decided", &[("order_id", &req.order_id), ("outcome", outcome)]);
            entry
        }
    };
    let answer = match entry.decision {
        Decision::Authorized { card_last4 } => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_AUTHORIZED,
            &req.order_id,
            &PaymentAuthorized {
                order_id: req.order_id.clone(),
                payment_id: entry.payment_id,
                amount_cents: entry.amount_cents,
                card_last4,
            },
        )?,
        Decision::Declined { code, reason } => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_DECLINED,
            &req.order_id,
            &PaymentDeclined { order_id: req.order_id.clone(), amount_cents: entry.amount_cents, code, reason },
        )?,
    };
    Ok(vec![answer])
}

shop_sdk::export_service!(Payment);

#[cfg(test)]
mod tests {
    use super::*;
    use shop_sdk::MemoryHost;

    fn request(order_id: &str, card: &str, amount: u64) -> Event {
        let payload = PaymentRequested { order_id: order_id.into(), amount_cents: amount, card_number: card.into() };
        Event::json("e1", topics::PAYMENTS, types::PAYMENT_REQUESTED, order_id, &payload)
    }

    #[test]
    fn good_card_is_authorized_and_recorded() {
        let mut host = MemoryHost::at(1_000);
        let out = Payment::handle(&mut host, &request("o1", "4242 4242 4242 4242", 1999)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event_type, types::PAYMENT_AUTHORIZED);
        assert_eq!(out[0].key, "o1");
        let paid: PaymentAuthorized = out[0].payload_json().unwrap();
        assert_eq!((paid.amount_cents, paid.card_last4.as_str()), (1999, "4242"));
        let resp = Payment::query(&host, &Request::get("/payments/o1"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body_json::<LedgerEntry>().unwrap().decided_at_ms, 1_000);
    }

    #[test]
    fn declined_card_and_amount_limit() {
        let mut host = MemoryHost::at(0).with_config("max_amount_cents", "1000");
        let out = Payment::handle(&mut host, &request("o1", "4000000000000002", 100)).unwrap();
        let declined: PaymentDeclined = out[0].payload_json().unwrap();
        assert_eq!(declined.code, "card_declined");
        let out = Payment::handle(&mut host, &request("o2", "4242424242424242", 1001)).unwrap();
        let declined: PaymentDeclined = out[0].payload_json().unwrap();
        assert_eq!(declined.code, "amount_limit_exceeded");
    }

    #[test]
    fn redelivered_request_repeats_the_recorded_decision() {
        let mut host = MemoryHost::at(5);
        let first = Payment::handle(&mut host, &request("o1", "4242424242424242", 500)).unwrap();
        // Even if the rules would now decide otherwise, the ledger wins.
        host.config.insert("max_amount_cents".into(), "1".into());
        host.now_ms = 99;
        let again = Payment::handle(&mut host, &request("o1", "4242424242424242", 500)).unwrap();
        assert_eq!(first, again);
        assert_eq!(host.state.len(), 1);
    }

    #[test]
    fn malformed_request_is_permanent_and_other_types_are_ignored() {
        let mut host = MemoryHost::default();
        let mut bad = request("o1", "4242424242424242", 1);
        bad.payload = b"not json".to_vec();
        assert!(matches!(Payment::handle(&mut host, &bad), Err(HandleError::Permanent(_))));
        let mut other = request("o1", "4242424242424242", 1);
        other.event_type = types::PAYMENT_AUTHORIZED.into();
        assert_eq!(Payment::handle(&mut host, &other).unwrap(), vec![]);
    }

    #[test]
    fn bad_config_is_reported() {
        let mut host = MemoryHost::default().with_config("max_amount_cents", "lots");
        let err = Payment::handle(&mut host, &request("o1", "4242424242424242", 1)).unwrap_err();
        assert!(matches!(err, HandleError::Permanent(msg) if msg.contains("max_amount_cents")));
    }
}
