//! Payment service: charges (authorizes and captures) or declines the payment
//! of an order with deterministic rules on test card numbers and amount
//! limits, refunds and voids on request, and keeps a ledger of all of it.
//!
//! The card number comes from the host's vault: requests carry a token,
//! redeemed through the `vault` import (this component's grant); the number
//! is used for the decision and never stored, logged or sent on.
//!
//! Consumes `payments` (`PaymentRequested`, `PaymentRefundRequested`,
//! `PaymentVoidRequested`); answers on `payments` (`PaymentAuthorized` or
//! `PaymentDeclined`, `PaymentRefunded`, `PaymentVoided`). Every command is
//! idempotent per order: a repeated one gets the recorded answer again.
//! Routes: `GET /payments/{order_id}`.

mod ledger;
mod rules;

pub use ledger::{DEADLINE_PASSED, LedgerEntry, Operation, OperationKind, VOIDED};
pub use rules::{Decision, decide};
use shop_events::{
    PaymentAuthorized, PaymentDeclined, PaymentRefundRequested, PaymentRefunded, PaymentRequested,
    PaymentVoidRequested, PaymentVoided, topics, types,
};
use shop_sdk::{Event, HandleError, Host, Level, Outgoing, Request, Response, Service, VaultError};

/// Decline code of a request whose card token the vault no longer holds
/// (expired, or never issued): nothing was charged.
pub const CARD_UNAVAILABLE: &str = "card_unavailable";

/// Default for the `max_amount_cents` config value: 5,000.00.
pub const DEFAULT_MAX_AMOUNT_CENTS: u64 = 500_000;

/// The payment service.
pub struct Payment;

fn ledger_key(order_id: &str) -> String {
    format!("payment/{order_id}")
}

impl Service for Payment {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        match event.event_type.as_str() {
            types::PAYMENT_REQUESTED => authorize(host, &event.payload_json()?),
            types::PAYMENT_REFUND_REQUESTED => refund(host, &event.payload_json()?),
            types::PAYMENT_VOID_REQUESTED => void(host, &event.payload_json()?),
            // Our own answers travel on the same topic: nothing to do.
            _ => Ok(Vec::new()),
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["payments", order_id]) => match load(host, order_id) {
                Ok(Some(entry)) => Response::json(200, &entry),
                Ok(None) => Response::not_found(&format!("no payment for order {order_id}")),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            _ => Response::not_found("unknown route; try GET /payments/{order_id}"),
        }
    }
}

fn load(host: &impl Host, order_id: &str) -> Result<Option<LedgerEntry>, HandleError> {
    Ok(host.get_json::<LedgerEntry>(&ledger_key(order_id))?.map(LedgerEntry::upgrade))
}

fn store(host: &mut impl Host, entry: &LedgerEntry) -> Result<(), HandleError> {
    host.put_json(&ledger_key(&entry.order_id), entry)
}

/// Decides once per order; a redelivered request gets the recorded decision
/// again, so an order is never charged twice, and a voided order or a
/// request past its deadline is never charged at all.
fn authorize(host: &mut impl Host, req: &PaymentRequested) -> Result<Vec<Outgoing>, HandleError> {
    if cfg!(feature = "trap") {
        panic!("test variant `trap`: refusing order {}", req.order_id);
    }
    if cfg!(feature = "spin") {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    let now = host.now_ms();
    let entry = match load(host, &req.order_id)? {
        Some(mut entry) => {
            if entry.decline_after_void(req.amount_cents, now) {
                store(host, &entry)?;
            }
            entry
        }
        None => {
            // Late by the deadline clock: the host's outage does not count.
            let decision = match req.deadline_ms {
                Some(deadline) if host.deadline_now_ms() > deadline => Decision::Declined {
                    code: DEADLINE_PASSED.to_owned(),
                    reason: "the payment request arrived after its deadline".to_owned(),
                },
                _ => match host.redeem_card(&req.card.token) {
                    Ok(card) => decide(
                        &card.number,
                        req.amount_cents,
                        host.config_or("max_amount_cents", DEFAULT_MAX_AMOUNT_CENTS)?,
                    ),
                    Err(VaultError::Unknown | VaultError::Expired) => Decision::Declined {
                        code: CARD_UNAVAILABLE.to_owned(),
                        reason: "the card details are no longer held; please enter the card again".to_owned(),
                    },
                    Err(VaultError::Unavailable(why)) => {
                        return Err(HandleError::Retryable(format!("the vault cannot be read: {why}")));
                    }
                },
            };
            let entry = LedgerEntry::decided(&req.order_id, req.amount_cents, decision, now);
            store(host, &entry)?;
            let outcome = match &entry.decision {
                Decision::Authorized { .. } => "authorized",
                Decision::Declined { code, .. } => code,
            };
            host.log(Level::Info, "payment decided", &[("order_id", &req.order_id), ("outcome", outcome)]);
            entry
        }
    };
    Ok(vec![decision_answer(entry)?])
}

/// The answer a ledger entry gives to a payment request.
fn decision_answer(entry: LedgerEntry) -> Result<Outgoing, HandleError> {
    let order_id = entry.order_id.clone();
    let declined = |code: String, reason: String| PaymentDeclined {
        order_id: order_id.clone(),
        amount_cents: entry.amount_cents,
        code,
        reason,
    };
    match entry.decision {
        _ if entry.voided => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_DECLINED,
            &order_id,
            &declined(VOIDED.to_owned(), "the payment was voided".to_owned()),
        ),
        Decision::Authorized { card_last4 } => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_AUTHORIZED,
            &order_id,
            &PaymentAuthorized {
                order_id: order_id.clone(),
                payment_id: entry.payment_id,
                amount_cents: entry.amount_cents,
                card_last4,
            },
        ),
        Decision::Declined { code, reason } => {
            Outgoing::json(topics::PAYMENTS, types::PAYMENT_DECLINED, &order_id, &declined(code, reason))
        }
    }
}

/// Refunds what was captured for the order, once; an order with no payment
/// yet gets a tombstone so that a late request is not charged. Always
/// answers with the refund recorded.
fn refund(host: &mut impl Host, req: &PaymentRefundRequested) -> Result<Vec<Outgoing>, HandleError> {
    let tombstone_note = format!("refund requested first: {}", req.reason);
    let entry = compensate(host, &req.order_id, tombstone_note, "payment refunded", |entry, now| {
        entry.refund(now, &req.reason)
    })?;
    let refunded = PaymentRefunded {
        order_id: entry.order_id,
        payment_id: entry.payment_id,
        refunded_cents: entry.refunded_cents,
    };
    Ok(vec![Outgoing::json(topics::PAYMENTS, types::PAYMENT_REFUNDED, &req.order_id, &refunded)?])
}

/// Makes sure the order is not charged: a tombstone if nothing was decided
/// yet, a full refund of a capture. Always answers with the outcome.
fn void(host: &mut impl Host, req: &PaymentVoidRequested) -> Result<Vec<Outgoing>, HandleError> {
    let entry = compensate(host, &req.order_id, req.reason.clone(), "captured payment voided", |entry, now| {
        entry.void(now, &req.reason)
    })?;
    let voided =
        PaymentVoided { order_id: req.order_id.clone(), refunded_cents: entry.refunded_cents, note: entry.void_note() };
    Ok(vec![Outgoing::json(topics::PAYMENTS, types::PAYMENT_VOIDED, &req.order_id, &voided)?])
}

/// Applies a compensation to the order's ledger entry (`apply` says whether
/// it changed anything: each happens once), or records a tombstone with
/// `tombstone_note` when no payment was decided yet, so that a late request
/// is never charged. Returns the entry as it now stands.
fn compensate(
    host: &mut impl Host,
    order_id: &str,
    tombstone_note: String,
    done: &str,
    apply: impl FnOnce(&mut LedgerEntry, u64) -> bool,
) -> Result<LedgerEntry, HandleError> {
    let now = host.now_ms();
    let entry = match load(host, order_id)? {
        Some(mut entry) => {
            if apply(&mut entry, now) {
                store(host, &entry)?;
                host.log(Level::Info, done, &[("order_id", order_id)]);
            }
            entry
        }
        None => {
            let entry = LedgerEntry::tombstone(order_id, now, tombstone_note);
            store(host, &entry)?;
            entry
        }
    };
    Ok(entry)
}

shop_sdk::export_service!(Payment);
shop_sdk::contract!();

#[cfg(test)]
mod tests;
