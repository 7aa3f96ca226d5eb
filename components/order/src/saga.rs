//! The saga's steps: what each input does to an order and which commands,
//! outcomes, emails and timers follow.
//!
//! Every step is idempotent by domain state (an answer only moves an order
//! from the status that expects it), so duplicates under any event id change
//! nothing; the event ids in the history are a second line of defence.

use serde::{Deserialize, Serialize};
use shop_events::{
    EmailKind, EmailRequested, OrderCancelled, OrderConfirmed, OrderPlaced, OrderRejected, PaymentAuthorized,
    PaymentDeclined, PaymentRefundRequested, PaymentRefunded, PaymentRequested, PaymentVoidRequested, PaymentVoided,
    codes, topics, types,
};
use shop_sdk::{HandleError, Host, Level, Outgoing};

use crate::answer::{ANSWER_TYPES, Answer, EarlyAnswer, early_key};
use crate::order::{Compensation, CompensationKind, Order, Status};
use crate::{Config, catalog, idempotency, order_key, stock};

/// Timer event type: the payment answer is overdue.
pub const PAYMENT_DEADLINE: &str = "PaymentDeadline";
/// Timer event type: send the refund or void request again.
pub const COMPENSATION_RETRY: &str = "CompensationRetry";

/// The payload of the order service's timers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTimer {
    /// The order the timer is about (also the timer event's key).
    pub order_id: String,
}

/// The id of an order's payment deadline timer.
pub fn deadline_timer(order_id: &str) -> String {
    format!("deadline/{order_id}")
}

/// The id of an order's compensation retry timer.
pub fn compensation_timer(order_id: &str) -> String {
    format!("compensate/{order_id}")
}

/// One `handle` call of the order service.
pub struct Saga<'h, H> {
    /// The host the call runs on.
    pub host: &'h mut H,
    /// The configuration, read once per call.
    pub config: Config,
    /// The time of the call, for history steps and timers.
    pub now_ms: u64,
}

type Outputs = Result<Vec<Outgoing>, HandleError>;

impl<H: Host> Saga<'_, H> {
    /// A new order: price it by the catalog, record it, request its payment
    /// with a deadline, then apply any answers that arrived before it. A
    /// known order is a duplicate; an order whose `Idempotency-Key` is bound
    /// to another request is ignored; one the catalog does not price as
    /// placed is rejected without a payment request.
    pub fn place(&mut self, event_id: &str, mut placed: OrderPlaced) -> Outputs {
        let key = order_key(&placed.order_id);
        if let Some(binding) = &placed.idempotency
            && !idempotency::admits(self.host, &placed.order_id, binding)?
        {
            return Ok(Vec::new());
        }
        if self.host.get(&key)?.is_some() {
            self.host.log(Level::Debug, "duplicate OrderPlaced ignored", &[("order_id", &placed.order_id)]);
            return Ok(Vec::new());
        }
        if let Some(binding) = &placed.idempotency {
            idempotency::bind(self.host, binding)?;
        }
        let priced = catalog::price(&self.config.catalog, &placed.items);
        let deadline_ms = self.now_ms.saturating_add(self.config.payment_deadline_ms);
        let card = placed.card.clone();
        let items = match priced {
            Ok(items) => items,
            Err(reason) => return self.refuse(event_id, placed, deadline_ms, reason),
        };
        placed.total_cents = shop_events::total_cents(&items);
        placed.items = items;
        let mut order = Order::place(placed, event_id, self.now_ms, deadline_ms);
        let request = PaymentRequested {
            order_id: order.order_id.clone(),
            amount_cents: order.total_cents,
            card,
            deadline_ms: Some(deadline_ms),
        };
        let mut out = vec![Outgoing::json(topics::PAYMENTS, types::PAYMENT_REQUESTED, &order.order_id, &request)?];
        for event_type in ANSWER_TYPES {
            let early_key = early_key(&order.order_id, event_type);
            if let Some(early) = self.host.get_json::<EarlyAnswer>(&early_key)? {
                out.extend(self.apply(&mut order, &early.event_id, early.answer)?);
                self.host.delete(&early_key)?;
            }
        }
        if order.status == Status::Pending {
            self.set_timer(&deadline_timer(&order.order_id), deadline_ms, PAYMENT_DEADLINE, &order.order_id)?;
        }
        self.host.put_json(&key, &order)?;
        Ok(out)
    }

    /// An order the catalog does not price as placed: recorded REJECTED with
    /// the reason, its outcome and email sent; no payment is requested.
    fn refuse(&mut self, event_id: &str, placed: OrderPlaced, deadline_ms: u64, reason: String) -> Outputs {
        let mut order = Order::place(placed, event_id, self.now_ms, deadline_ms);
        order.deadline_ms = None;
        if let Some(placed_step) = order.history.first_mut() {
            placed_step.note = "order placed".to_owned();
        }
        order.advance(Status::Rejected, event_id, self.now_ms, format!("not priced as placed: {reason}"));
        order.reason = Some(reason.clone());
        let fields = [("order_id", order.order_id.as_str()), ("reason", reason.as_str())];
        self.host.log(Level::Warn, "OrderPlaced rejected by the catalog", &fields);
        let rejected =
            OrderRejected { order_id: order.order_id.clone(), total_cents: order.total_cents, reason: reason.clone() };
        let out = vec![
            Outgoing::json(topics::ORDERS, types::ORDER_REJECTED, &order.order_id, &rejected)?,
            email(&order, EmailKind::OrderRejected, Some(reason))?,
        ];
        self.host.put_json(&order_key(&order.order_id), &order)?;
        Ok(out)
    }

    /// A payment answer: applied to its order, or kept until the order arrives.
    pub fn answer(&mut self, event_id: &str, answer: Answer) -> Outputs {
        let order_id = answer.order_id().to_owned();
        let Some(mut order) = self.host.get_json::<Order>(&order_key(&order_id))? else {
            let key = early_key(&order_id, answer.event_type());
            if self.host.get(&key)?.is_none() {
                self.host.log(Level::Info, "answer before its order kept", &[("order_id", &order_id)]);
                self.host.put_json(&key, &EarlyAnswer { event_id: event_id.to_owned(), answer })?;
            }
            return Ok(Vec::new());
        };
        if order.has_seen(event_id) {
            return Ok(Vec::new());
        }
        let before = order.clone();
        let out = self.apply(&mut order, event_id, answer)?;
        self.save_if_changed(&before, &order)?;
        Ok(out)
    }

    /// A timer of ours fired; timers of unknown or settled orders do nothing.
    pub fn timer(&mut self, event_id: &str, event_type: &str, timer: OrderTimer) -> Outputs {
        let Some(mut order) = self.host.get_json::<Order>(&order_key(&timer.order_id))? else {
            return Ok(Vec::new());
        };
        if order.has_seen(event_id) {
            return Ok(Vec::new());
        }
        let before = order.clone();
        let out = match event_type {
            PAYMENT_DEADLINE if order.status == Status::Pending => self.deadline_passed(&mut order, event_id)?,
            COMPENSATION_RETRY if order.open_compensation().is_some() => self.retry(&mut order, event_id)?,
            _ => Vec::new(),
        };
        self.save_if_changed(&before, &order)?;
        Ok(out)
    }

    fn apply(&mut self, order: &mut Order, event_id: &str, answer: Answer) -> Outputs {
        match (order.status, answer) {
            (Status::Pending, Answer::Authorized(paid)) => self.authorized(order, event_id, paid),
            // Payment refused the request as too late: that is the deadline
            // passing, whichever of the two noticed it first.
            (Status::Pending, Answer::Declined(declined)) if declined.code == codes::DEADLINE_PASSED => {
                self.host.cancel(&deadline_timer(&order.order_id))?;
                self.deadline_passed(order, event_id)
            }
            (Status::Pending, Answer::Declined(declined)) => self.declined(order, event_id, declined),
            (Status::Compensating, Answer::Refunded(refunded)) => self.refunded(order, event_id, refunded),
            (Status::Cancelled, Answer::Voided(voided)) => Ok(self.voided(order, event_id, voided)?),
            // Only a void can race with the payment; after a refund these are duplicates.
            (Status::Cancelled, Answer::Authorized(paid)) if order.was_voided() => {
                order.note_once(
                    event_id,
                    self.now_ms,
                    format!("late authorization of {}, void requested", paid.payment_id),
                );
                Ok(Vec::new())
            }
            // A lateness decline says nothing the history does not already say.
            (Status::Cancelled, Answer::Declined(declined))
                if order.was_voided() && declined.code != codes::DEADLINE_PASSED =>
            {
                order.note_once(event_id, self.now_ms, format!("late decline ({}), nothing charged", declined.code));
                Ok(Vec::new())
            }
            (status, answer) => {
                let status = format!("{status:?}");
                let fields =
                    [("order_id", order.order_id.as_str()), ("event_type", answer.event_type()), ("status", &status)];
                self.host.log(Level::Debug, "answer ignored in this status", &fields);
                Ok(Vec::new())
            }
        }
    }

    fn authorized(&mut self, order: &mut Order, event_id: &str, paid: PaymentAuthorized) -> Outputs {
        self.host.cancel(&deadline_timer(&order.order_id))?;
        order.payment_id = Some(paid.payment_id.clone());
        order.note(event_id, self.now_ms, format!("payment {} authorized", paid.payment_id));
        match stock::reserve(self.host, &self.config.stock, &order.items)? {
            Ok(reserved) => {
                order.reserved = reserved;
                order.advance(Status::StockReserved, event_id, self.now_ms, "stock reserved");
                order.advance(Status::Confirmed, event_id, self.now_ms, "order confirmed");
                let confirmed = OrderConfirmed {
                    order_id: order.order_id.clone(),
                    total_cents: order.total_cents,
                    payment_id: paid.payment_id,
                };
                let outcome = Outgoing::json(topics::ORDERS, types::ORDER_CONFIRMED, &order.order_id, &confirmed)?;
                Ok(vec![outcome, email(order, EmailKind::OrderConfirmed, None)?])
            }
            Err(short) => {
                let reason = format!("out of stock: {}", short.join(", "));
                order.note(event_id, self.now_ms, reason.clone());
                order.reason = Some(reason);
                order.compensation = Some(Compensation { kind: CompensationKind::Refund, done: false, attempts: 1 });
                order.advance(Status::Compensating, event_id, self.now_ms, "refund requested");
                self.schedule_retry(order)?;
                Ok(vec![compensation_command(order)?])
            }
        }
    }

    fn declined(&mut self, order: &mut Order, event_id: &str, declined: PaymentDeclined) -> Outputs {
        self.host.cancel(&deadline_timer(&order.order_id))?;
        order.advance(Status::Rejected, event_id, self.now_ms, format!("payment declined: {}", declined.code));
        order.reason = Some(declined.reason.clone());
        let rejected = OrderRejected {
            order_id: order.order_id.clone(),
            total_cents: order.total_cents,
            reason: declined.reason.clone(),
        };
        let outcome = Outgoing::json(topics::ORDERS, types::ORDER_REJECTED, &order.order_id, &rejected)?;
        Ok(vec![outcome, email(order, EmailKind::OrderRejected, Some(declined.reason))?])
    }

    fn refunded(&mut self, order: &mut Order, event_id: &str, refunded: PaymentRefunded) -> Outputs {
        self.finish_compensation(order)?;
        order.note(event_id, self.now_ms, format!("refund done: {} cents", refunded.refunded_cents));
        cancel(order, event_id, self.now_ms)
    }

    fn voided(
        &mut self,
        order: &mut Order,
        event_id: &str,
        voided: PaymentVoided,
    ) -> Result<Vec<Outgoing>, HandleError> {
        if order.open_compensation() != Some(CompensationKind::Void) {
            return Ok(Vec::new());
        }
        self.finish_compensation(order)?;
        let note = format!("void confirmed, {} cents refunded ({})", voided.refunded_cents, voided.note);
        order.note(event_id, self.now_ms, note);
        // Only now is it known whether money was taken (a capture that beat
        // the deadline is refunded by the void): the email says which.
        let mut reason = order.reason.clone().unwrap_or_default();
        if voided.refunded_cents > 0 {
            reason.push_str("; the payment taken meanwhile was refunded in full");
        }
        Ok(vec![email(order, EmailKind::OrderCancelled, Some(reason))?])
    }

    /// No answer in time: cancel the order and make sure it is not charged.
    fn deadline_passed(&mut self, order: &mut Order, event_id: &str) -> Outputs {
        let waited = order.deadline_ms.unwrap_or(self.now_ms).saturating_sub(order.placed_at_ms());
        order.note(event_id, self.now_ms, "payment deadline passed");
        order.reason = Some(format!("no answer from payment within {waited} ms"));
        order.compensation = Some(Compensation { kind: CompensationKind::Void, done: false, attempts: 1 });
        order.note(event_id, self.now_ms, "void requested");
        self.schedule_retry(order)?;
        // The email waits for the void's answer, which says whether a late
        // capture had to be refunded.
        Ok(vec![compensation_command(order)?, cancelled(order, event_id, self.now_ms)?])
    }

    /// The refund or void is still unconfirmed: ask again, later next time.
    fn retry(&mut self, order: &mut Order, event_id: &str) -> Outputs {
        let Some(compensation) = order.compensation.as_mut() else {
            return Ok(Vec::new());
        };
        compensation.attempts += 1;
        let note = format!("{:?} requested again (attempt {})", compensation.kind, compensation.attempts);
        order.note(event_id, self.now_ms, note.to_lowercase());
        self.schedule_retry(order)?;
        Ok(vec![compensation_command(order)?])
    }

    fn schedule_retry(&mut self, order: &Order) -> Result<(), HandleError> {
        let sent = order.compensation.as_ref().map_or(1, |c| c.attempts);
        let at_ms = self.now_ms.saturating_add(self.config.retry_delay_ms(sent.saturating_sub(1)));
        self.set_timer(&compensation_timer(&order.order_id), at_ms, COMPENSATION_RETRY, &order.order_id)
    }

    fn finish_compensation(&mut self, order: &mut Order) -> Result<(), HandleError> {
        if let Some(compensation) = order.compensation.as_mut() {
            compensation.done = true;
        }
        Ok(self.host.cancel(&compensation_timer(&order.order_id))?)
    }

    fn set_timer(&mut self, id: &str, at_ms: u64, event_type: &str, order_id: &str) -> Result<(), HandleError> {
        self.host.schedule_json(id, at_ms, event_type, order_id, &OrderTimer { order_id: order_id.to_owned() })
    }

    fn save_if_changed(&mut self, before: &Order, order: &Order) -> Result<(), HandleError> {
        if before == order { Ok(()) } else { self.host.put_json(&order_key(&order.order_id), order) }
    }
}

/// Moves an order to CANCELLED for its recorded reason; emits the outcome
/// and the cancellation email.
fn cancel(order: &mut Order, event_id: &str, now_ms: u64) -> Outputs {
    let outcome = cancelled(order, event_id, now_ms)?;
    Ok(vec![outcome, email(order, EmailKind::OrderCancelled, order.reason.clone())?])
}

/// Moves an order to CANCELLED for its recorded reason; returns the outcome.
fn cancelled(order: &mut Order, event_id: &str, now_ms: u64) -> Result<Outgoing, HandleError> {
    let reason = order.reason.clone().unwrap_or_default();
    order.advance(Status::Cancelled, event_id, now_ms, format!("cancelled: {reason}"));
    let cancelled = OrderCancelled { order_id: order.order_id.clone(), total_cents: order.total_cents, reason };
    Outgoing::json(topics::ORDERS, types::ORDER_CANCELLED, &order.order_id, &cancelled)
}

/// The refund or void request of an order's compensation: the same payload
/// every time it is sent.
fn compensation_command(order: &Order) -> Result<Outgoing, HandleError> {
    let reason = order.reason.clone().unwrap_or_default();
    let order_id = order.order_id.clone();
    match order.compensation.as_ref().map(|c| c.kind) {
        Some(CompensationKind::Void) => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_VOID_REQUESTED,
            &order.order_id,
            &PaymentVoidRequested { order_id, reason },
        ),
        _ => Outgoing::json(
            topics::PAYMENTS,
            types::PAYMENT_REFUND_REQUESTED,
            &order.order_id,
            &PaymentRefundRequested { order_id, amount_cents: order.total_cents, reason },
        ),
    }
}

fn email(order: &Order, kind: EmailKind, reason: Option<String>) -> Result<Outgoing, HandleError> {
    let email = EmailRequested {
        order_id: order.order_id.clone(),
        kind,
        to: order.customer.email.clone(),
        customer_name: order.customer.name.clone(),
        items: order.items.clone(),
        total_cents: order.total_cents,
        reason,
    };
    Outgoing::json(topics::EMAILS, types::EMAIL_REQUESTED, &order.order_id, &email)
}
