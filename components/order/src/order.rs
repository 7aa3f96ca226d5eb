//! The order aggregate and its state machine.

use serde::{Deserialize, Serialize};
use shop_events::{Customer, LineItem, OrderPlaced};

/// Where an order stands in the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Waiting for the payment answer.
    Pending,
    /// Paid and its stock reserved; passed through on the way to CONFIRMED.
    StockReserved,
    Confirmed,
    Rejected,
    /// Paid but not fulfillable: waiting for the refund.
    Compensating,
    Cancelled,
}

impl Status {
    /// Final states never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Confirmed | Status::Rejected | Status::Cancelled)
    }
}

/// One transition or notable event in the order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The status after the step.
    pub status: Status,
    pub at_ms: u64,
    /// The event that caused the step.
    pub event_id: String,
    pub note: String,
}

/// How the money of a cancelled order is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationKind {
    /// The payment was captured: refund it.
    Refund,
    /// The payment never answered: make sure it is not charged.
    Void,
}

/// The compensating action of an order that cannot complete, retried on a
/// timer until the payment service confirms it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    pub kind: CompensationKind,
    /// Whether the payment service confirmed it.
    pub done: bool,
    /// How many times the command was sent (1 for the first request).
    pub attempts: u32,
}

/// Stock held for one SKU of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub sku: String,
    pub quantity: u64,
}

/// The card of an order as it is recorded and shown: never the number,
/// nor the vault token (only the payment service needs that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardShown {
    pub brand: String,
    pub last4: String,
}

/// An order as the order service records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub status: Status,
    pub customer: Customer,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// Brand and last four digits of the card it is paid with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<CardShown>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Why the order was rejected or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// After this time (ms since the epoch) the payment is given up on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Stock taken for this order, by SKU; empty until reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<Reservation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Compensation>,
    /// The hash of the request its `Idempotency-Key` is bound to, if it was
    /// placed with one: a digest of the key, the customer and the items; the
    /// card is not part of it (the gateway's `idempotency::bind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
    pub history: Vec<Step>,
}

impl Order {
    /// A new PENDING order whose payment is due by `deadline_ms`.
    pub fn place(placed: OrderPlaced, event_id: &str, now_ms: u64, deadline_ms: u64) -> Self {
        Self {
            order_id: placed.order_id,
            status: Status::Pending,
            customer: placed.customer,
            items: placed.items,
            total_cents: placed.total_cents,
            card: Some(CardShown { brand: placed.card.brand, last4: placed.card.last4 }),
            payment_id: None,
            reason: None,
            deadline_ms: Some(deadline_ms),
            reserved: Vec::new(),
            compensation: None,
            request_hash: placed.idempotency.map(|binding| binding.request_hash),
            history: vec![Step {
                status: Status::Pending,
                at_ms: now_ms,
                event_id: event_id.to_owned(),
                note: "order placed, payment requested".to_owned(),
            }],
        }
    }

    /// Moves to `status` and records the step.
    pub fn advance(&mut self, status: Status, event_id: &str, now_ms: u64, note: impl Into<String>) {
        self.status = status;
        self.history.push(Step { status, at_ms: now_ms, event_id: event_id.to_owned(), note: note.into() });
    }

    /// Records a notable event without changing the status.
    pub fn note(&mut self, event_id: &str, now_ms: u64, note: impl Into<String>) {
        self.advance(self.status, event_id, now_ms, note);
    }

    /// Records a note unless the same note is already there, so that
    /// repeated answers under new event ids do not grow the history.
    pub fn note_once(&mut self, event_id: &str, now_ms: u64, note: impl Into<String>) {
        let note = note.into();
        if !self.history.iter().any(|step| step.note == note) {
            self.note(event_id, now_ms, note);
        }
    }

    /// Whether the event was already applied to this order (defence against
    /// redeliveries the host did not catch).
    pub fn has_seen(&self, event_id: &str) -> bool {
        self.history.iter().any(|step| step.event_id == event_id)
    }

    /// When the order was placed.
    pub fn placed_at_ms(&self) -> u64 {
        self.history.first().map_or(0, |step| step.at_ms)
    }

    /// Whether the order was cancelled by voiding its payment.
    pub fn was_voided(&self) -> bool {
        self.compensation.as_ref().is_some_and(|c| c.kind == CompensationKind::Void)
    }

    /// The compensation still waiting for the payment service's answer.
    pub fn open_compensation(&self) -> Option<CompensationKind> {
        self.compensation.as_ref().filter(|c| !c.done).map(|c| c.kind)
    }
}
