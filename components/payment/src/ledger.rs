//! The payment ledger: one entry per order recording the decision, the money
//! captured and refunded, and every operation on it. Pure data and rules; the
//! service in `lib.rs` loads, applies and answers.

use serde::{Deserialize, Serialize};

use crate::Decision;

/// Decline code of a request arriving after its `deadline_ms`.
pub const DEADLINE_PASSED: &str = shop_events::codes::DEADLINE_PASSED;
/// Decline code of an order whose payment was voided or refunded before any
/// request: it must never be charged.
pub const VOIDED: &str = shop_events::codes::VOIDED;

/// What happened to the money of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Capture,
    Refund,
    Decline,
    Void,
}

/// One operation on a ledger entry, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub kind: OperationKind,
    pub amount_cents: u64,
    pub at_ms: u64,
    pub note: String,
}

/// One ledger entry: the decision taken for an order, taken once, and the
/// money movements that followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: u64,
    pub decision: Decision,
    pub decided_at_ms: u64,
    /// Charged to the card (an authorization is a sale).
    #[serde(default)]
    pub captured_cents: u64,
    /// Given back; at most `captured_cents`, refunded at most once.
    #[serde(default)]
    pub refunded_cents: u64,
    /// The order must never be charged (again): later requests are declined.
    #[serde(default)]
    pub voided: bool,
    #[serde(default)]
    pub operations: Vec<Operation>,
}

/// The payment id of an order: one payment per order.
pub fn payment_id(order_id: &str) -> String {
    format!("pay_{order_id}")
}

impl LedgerEntry {
    /// A decided payment; an authorization is captured at once.
    pub fn decided(order_id: &str, amount_cents: u64, decision: Decision, now_ms: u64) -> Self {
        let (kind, captured_cents, note) = match &decision {
            Decision::Authorized { card_last4 } => (OperationKind::Capture, amount_cents, format!("card {card_last4}")),
            Decision::Declined { code, reason } => (OperationKind::Decline, 0, format!("{code}: {reason}")),
        };
        Self {
            payment_id: payment_id(order_id),
            order_id: order_id.to_owned(),
            amount_cents,
            decision,
            decided_at_ms: now_ms,
            captured_cents,
            refunded_cents: 0,
            voided: false,
            operations: vec![Operation { kind, amount_cents: captured_cents, at_ms: now_ms, note }],
        }
    }

    /// A tombstone for an order voided (or refunded) before any request: a
    /// later request is declined with code [`VOIDED`] and nothing is charged.
    pub fn tombstone(order_id: &str, now_ms: u64, note: String) -> Self {
        let decision = Decision::Declined {
            code: VOIDED.to_owned(),
            reason: "the payment was cancelled before it was requested".to_owned(),
        };
        Self {
            payment_id: payment_id(order_id),
            order_id: order_id.to_owned(),
            amount_cents: 0,
            decision,
            decided_at_ms: now_ms,
            captured_cents: 0,
            refunded_cents: 0,
            voided: true,
            operations: vec![Operation { kind: OperationKind::Void, amount_cents: 0, at_ms: now_ms, note }],
        }
    }

    /// Entries written before captures were recorded: an authorization then
    /// was a capture too.
    pub fn upgrade(mut self) -> Self {
        if self.operations.is_empty()
            && let Decision::Authorized { card_last4 } = &self.decision
        {
            self.captured_cents = self.amount_cents;
            self.operations.push(Operation {
                kind: OperationKind::Capture,
                amount_cents: self.amount_cents,
                at_ms: self.decided_at_ms,
                note: format!("card {card_last4}"),
            });
        }
        self
    }

    /// Refunds what was captured, once. Returns whether anything changed.
    pub fn refund(&mut self, now_ms: u64, note: &str) -> bool {
        if self.captured_cents == 0 || self.refunded_cents > 0 {
            return false;
        }
        self.refunded_cents = self.captured_cents;
        self.push(OperationKind::Refund, self.refunded_cents, now_ms, note);
        true
    }

    /// Voids the payment: an undecided order can no longer be charged, a
    /// capture not yet refunded is refunded in full, a decline stays as it
    /// is. Returns whether anything changed.
    pub fn void(&mut self, now_ms: u64, reason: &str) -> bool {
        if self.voided || !self.is_captured() {
            return false;
        }
        self.voided = true;
        self.push(OperationKind::Void, 0, now_ms, reason);
        self.refund(now_ms, "late authorization voided");
        true
    }

    /// Records, once, that a payment request met a tombstone.
    pub fn decline_after_void(&mut self, amount_cents: u64, now_ms: u64) -> bool {
        if !self.voided || self.operations.iter().any(|op| op.kind == OperationKind::Decline) {
            return false;
        }
        if self.amount_cents == 0 {
            self.amount_cents = amount_cents;
        }
        self.push(OperationKind::Decline, 0, now_ms, "requested after the payment was voided");
        true
    }

    /// Whether the decision was an authorization (and so a capture).
    pub fn is_captured(&self) -> bool {
        matches!(self.decision, Decision::Authorized { .. })
    }

    /// A stable description of the entry for `PaymentVoided`, the same for
    /// every repeated void request.
    pub fn void_note(&self) -> String {
        match (&self.decision, self.refunded_cents) {
            (Decision::Authorized { .. }, 0) => "captured; not refunded".to_owned(),
            (Decision::Authorized { .. }, cents) => format!("late authorization voided, {cents} cents refunded"),
            (Decision::Declined { code, .. }, _) if code == VOIDED => "voided before any charge".to_owned(),
            (Decision::Declined { code, .. }, _) => format!("declined ({code}); nothing was charged"),
        }
    }

    fn push(&mut self, kind: OperationKind, amount_cents: u64, at_ms: u64, note: &str) {
        self.operations.push(Operation { kind, amount_cents, at_ms, note: note.to_owned() });
    }
}
