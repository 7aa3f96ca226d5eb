//! The shop's published language: logical topic names, event types and the
//! JSON payload of every event. Producers and consumers share these types so
//! that a schema change is a compile error, not a runtime surprise.
//!
//! Every payload carries the order id; it is also the Kafka key, so all the
//! events of one order stay in one partition of each topic.

use serde::{Deserialize, Serialize};

/// Logical topic names. The host maps them to physical topics (see the
/// manifest's `kafka.topic_prefix`).
pub mod topics {
    pub const ORDERS: &str = "orders";
    pub const PAYMENTS: &str = "payments";
    pub const EMAILS: &str = "emails";
    pub const ANALYTICS: &str = "analytics";
    /// Every topic of the shop, in a stable order.
    pub const ALL: [&str; 4] = [ORDERS, PAYMENTS, EMAILS, ANALYTICS];
}

/// Event type names, as they appear in the envelope.
pub mod types {
    /// On `orders`, from the gateway.
    pub const ORDER_PLACED: &str = "OrderPlaced";
    /// On `orders`, from the order service.
    pub const ORDER_CONFIRMED: &str = "OrderConfirmed";
    /// On `orders`, from the order service.
    pub const ORDER_REJECTED: &str = "OrderRejected";
    /// On `payments`, from the order service: a command to the payment service.
    pub const PAYMENT_REQUESTED: &str = "PaymentRequested";
    /// On `payments`, from the payment service.
    pub const PAYMENT_AUTHORIZED: &str = "PaymentAuthorized";
    /// On `payments`, from the payment service.
    pub const PAYMENT_DECLINED: &str = "PaymentDeclined";
    /// On `emails`, from the order service: a command to the email service.
    pub const EMAIL_REQUESTED: &str = "EmailRequested";
    /// On `analytics`, from the email service.
    pub const EMAIL_SENT: &str = "EmailSent";
}

/// Test card numbers: the checks the gateway and the payment service share.
pub mod card {
    /// The card number without the spaces and dashes people type.
    pub fn normalize(raw: &str) -> String {
        raw.chars().filter(|c| !c.is_whitespace() && *c != '-').collect()
    }

    /// Whether `digits` is 12 to 19 ASCII digits passing the Luhn checksum.
    pub fn is_valid(digits: &str) -> bool {
        (12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && luhn_valid(digits)
    }

    /// The Luhn checksum over ASCII digits.
    pub fn luhn_valid(digits: &str) -> bool {
        let sum: u32 = digits
            .bytes()
            .rev()
            .enumerate()
            .map(|(i, b)| {
                let d = u32::from(b.wrapping_sub(b'0')) * if i % 2 == 1 { 2 } else { 1 };
                if d > 9 { d - 9 } else { d }
            })
            .sum();
        sum.is_multiple_of(10)
    }
}

/// Who placed the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub name: String,
    pub email: String,
}

/// One line of an order. Money is always integer cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

impl LineItem {
    /// `quantity × unit price`, saturating rather than wrapping.
    pub fn subtotal_cents(&self) -> u64 {
        self.unit_price_cents.saturating_mul(u64::from(self.quantity))
    }
}

/// Sum of the lines' subtotals.
pub fn total_cents(items: &[LineItem]) -> u64 {
    items.iter().map(LineItem::subtotal_cents).fold(0, u64::saturating_add)
}

/// A customer placed an order; published by the gateway once validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: Customer,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// Test card number only: this demo shop never sees real cards.
    pub card_number: String,
}

/// The order service asks the payment service to authorize an amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequested {
    pub order_id: String,
    pub amount_cents: u64,
    pub card_number: String,
}

/// The payment was authorized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub card_last4: String,
}

/// The payment was declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: String,
    pub amount_cents: u64,
    /// Stable machine-readable reason, e.g. `card_declined`.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
}

/// The order is confirmed (payment authorized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: String,
    pub total_cents: u64,
    pub payment_id: String,
}

/// The order is rejected (payment declined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    pub order_id: String,
    pub total_cents: u64,
    pub reason: String,
}

/// Which email to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    OrderConfirmed,
    OrderRejected,
}

/// The order service asks the email service to send an email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailRequested {
    pub order_id: String,
    pub kind: EmailKind,
    pub to: String,
    pub customer_name: String,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// Why the order was rejected, for rejection emails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The email service rendered and sent an email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailSent {
    pub order_id: String,
    pub email_id: String,
    pub kind: EmailKind,
    pub to: String,
    pub subject: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_checks() {
        assert_eq!(card::normalize("4242 4242-4242 4242"), "4242424242424242");
        assert!(card::is_valid("4242424242424242"));
        assert!(card::is_valid("4000000000000002"));
        assert!(!card::is_valid("4242424242424241"), "checksum");
        assert!(!card::is_valid("42"), "length");
        assert!(!card::is_valid("4242x42424242424"), "digits only");
    }

    #[test]
    fn totals_saturate_instead_of_wrapping() {
        let items = vec![
            LineItem { sku: "a".into(), quantity: 2, unit_price_cents: 150 },
            LineItem { sku: "b".into(), quantity: 1, unit_price_cents: 99 },
        ];
        assert_eq!(total_cents(&items), 399);
        let huge = vec![LineItem { sku: "x".into(), quantity: u32::MAX, unit_price_cents: u64::MAX }];
        assert_eq!(total_cents(&huge), u64::MAX);
    }
}
