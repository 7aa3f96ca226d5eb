//! The order aggregate and its state machine.

use serde::{Deserialize, Serialize};
use shop_events::{Customer, LineItem, OrderPlaced};

/// Where an order stands in the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Confirmed,
    Rejected,
}

impl Status {
    /// Final states never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Pending)
    }
}

/// One transition in the order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub status: Status,
    pub at_ms: u64,
    /// The event that caused the transition.
    pub event_id: String,
    pub note: String,
}

/// An order as the order service records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub status: Status,
    pub customer: Customer,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// Needed to request the payment; never shown by the query route.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub card_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub history: Vec<Step>,
}

impl Order {
    /// A new PENDING order.
    pub fn place(placed: OrderPlaced, event_id: &str, now_ms: u64) -> Self {
        Self {
            order_id: placed.order_id,
            status: Status::Pending,
            customer: placed.customer,
            items: placed.items,
            total_cents: placed.total_cents,
            card_number: placed.card_number,
            payment_id: None,
            reason: None,
            history: vec![Step {
                status: Status::Pending,
                at_ms: now_ms,
                event_id: event_id.to_owned(),
                note: "order placed, payment requested".to_owned(),
            }],
        }
    }

    /// Moves to `status` and records the step. Reaching a final state drops
    /// the card number: it is no longer needed.
    pub fn advance(&mut self, status: Status, event_id: &str, now_ms: u64, note: String) {
        self.status = status;
        self.history.push(Step { status, at_ms: now_ms, event_id: event_id.to_owned(), note });
        if status.is_final() {
            self.card_number.clear();
        }
    }
}
