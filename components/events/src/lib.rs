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
    /// On `orders`, from the order service: the order will not be fulfilled
    /// (out of stock, or no payment answer in time).
    pub const ORDER_CANCELLED: &str = "OrderCancelled";
    /// On `payments`, from the order service: a command to the payment service.
    pub const PAYMENT_REQUESTED: &str = "PaymentRequested";
    /// On `payments`, from the payment service.
    pub const PAYMENT_AUTHORIZED: &str = "PaymentAuthorized";
    /// On `payments`, from the payment service.
    pub const PAYMENT_DECLINED: &str = "PaymentDeclined";
    /// On `payments`, from the order service: a command to refund what was
    /// captured for an order.
    pub const PAYMENT_REFUND_REQUESTED: &str = "PaymentRefundRequested";
    /// On `payments`, from the payment service: the answer to a refund request.
    pub const PAYMENT_REFUNDED: &str = "PaymentRefunded";
    /// On `payments`, from the order service: a command to make sure an order
    /// is never charged (its payment deadline passed).
    pub const PAYMENT_VOID_REQUESTED: &str = "PaymentVoidRequested";
    /// On `payments`, from the payment service: the answer to a void request.
    pub const PAYMENT_VOIDED: &str = "PaymentVoided";
    /// On `emails`, from the order service: a command to the email service.
    pub const EMAIL_REQUESTED: &str = "EmailRequested";
    /// On `analytics`, from the email service.
    pub const EMAIL_SENT: &str = "EmailSent";
}

/// Decline codes with a meaning for the saga (`PaymentDeclined.code`).
pub mod codes {
    /// The request reached the payment service after its `deadline_ms`:
    /// nothing was charged, and the order's deadline has passed too.
    pub const DEADLINE_PASSED: &str = "deadline_passed";
    /// The order was voided before its request was seen: nothing charged.
    pub const VOIDED: &str = "voided";
}

/// Test card numbers: the checks the gateway and the payment service share.
pub mod card {
    /// A card redeemed from the host's vault: the host's answer and what a
    /// guest gets (WIT `vault.card`). Its `Debug` never shows the number.
    #[derive(Clone, PartialEq, Eq)]
    pub struct Card {
        /// The full number, digits only.
        pub number: String,
        pub brand: String,
        pub last4: String,
    }

    impl std::fmt::Debug for Card {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Card").field("brand", &self.brand).field("last4", &self.last4).finish_non_exhaustive()
        }
    }

    /// The card number without the spaces and dashes people type.
    pub fn normalize(raw: &str) -> String {
        raw.chars().filter(|c| !c.is_whitespace() && *c != '-').collect()
    }

    /// Whether `digits` is 12 to 19 ASCII digits passing the Luhn checksum.
    pub fn is_valid(digits: &str) -> bool {
        (12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && luhn_valid(digits)
    }

    /// The card network named by the number's prefix (`visa`,
    /// `mastercard`, `amex`, `discover`), or `unknown`.
    pub fn brand(digits: &str) -> &'static str {
        let prefix = |n: usize| digits.get(..n).and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
        match () {
            _ if digits.starts_with('4') => "visa",
            _ if (51..=55).contains(&prefix(2)) || (2221..=2720).contains(&prefix(4)) => "mastercard",
            _ if matches!(prefix(2), 34 | 37) => "amex",
            _ if prefix(4) == 6011 || prefix(2) == 65 || (644..=649).contains(&prefix(3)) => "discover",
            _ => "unknown",
        }
    }

    /// The last four digits (all of them if fewer).
    pub fn last4(digits: &str) -> &str {
        digits.get(digits.len().saturating_sub(4)..).unwrap_or("")
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Customer {
    pub name: String,
    pub email: String,
}

/// One line of an order. Money is always integer cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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

/// A card as events carry it: a vault token and what may be shown. The
/// number itself stays in the host's vault; only a component granted the
/// vault (payment) can redeem the token, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CardToken {
    /// Opaque, random; redeemable through the `vault` import.
    pub token: String,
    /// Card network, e.g. `visa` (see [`card::brand`]).
    pub brand: String,
    /// The number's last four digits.
    pub last4: String,
}

/// One product of the shop's catalog, as the order service owns it and
/// answers it on `GET /catalog` (the gateway and the page read it there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CatalogItem {
    pub sku: String,
    pub name: String,
    /// The price the shop charges per unit.
    pub unit_price_cents: u64,
    /// Units left; `None` when the SKU is not limited.
    pub remaining: Option<u64>,
}

/// A customer placed an order; published by the gateway once validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: Customer,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// The card, deposited in the host's vault by the gateway.
    pub card: CardToken,
    /// The `Idempotency-Key` the order was placed with, bound to its body;
    /// absent for an order placed without a key (and in older events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyBinding>,
}

/// An `Idempotency-Key` bound to the order it was first used for. Only
/// digests travel: the key itself never leaves the gateway. The order service
/// keeps the first body seen for a key and ignores an order with another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IdempotencyBinding {
    /// SHA-256 (hex) of the key, under the gateway's own prefix.
    pub key_digest: String,
    /// SHA-256 (hex) of the key and the validated order (customer and
    /// items; whitespace does not change it, the card is not part of it):
    /// "the same request".
    pub request_hash: String,
}

/// The order service asks the payment service to authorize an amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentRequested {
    pub order_id: String,
    pub amount_cents: u64,
    /// The order's card: the payment service redeems the token.
    pub card: CardToken,
    /// Milliseconds since the Unix epoch after which the payment service must
    /// not charge: by then the order service has given up on the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// The payment was authorized and captured (a sale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentAuthorized {
    pub order_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    pub card_last4: String,
}

/// The payment was declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentDeclined {
    pub order_id: String,
    pub amount_cents: u64,
    /// Stable machine-readable reason, e.g. `card_declined`.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
}

/// The order service asks for a refund of what was captured for an order
/// (e.g. it was paid but is out of stock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentRefundRequested {
    pub order_id: String,
    pub amount_cents: u64,
    pub reason: String,
}

/// The payment service's answer to [`PaymentRefundRequested`], repeated for a
/// repeated request; an order is refunded at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentRefunded {
    pub order_id: String,
    pub payment_id: String,
    /// What was given back; 0 if nothing had been captured.
    pub refunded_cents: u64,
}

/// The order service gave up waiting for the payment answer: the payment
/// service must make sure the order is not charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentVoidRequested {
    pub order_id: String,
    pub reason: String,
}

/// The payment service's answer to [`PaymentVoidRequested`]: the order is not
/// charged, and any later payment request for it is declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PaymentVoided {
    pub order_id: String,
    /// What a capture that had already happened was refunded; 0 if none had.
    pub refunded_cents: u64,
    pub note: String,
}

/// The order is confirmed (payment authorized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderConfirmed {
    pub order_id: String,
    pub total_cents: u64,
    pub payment_id: String,
}

/// The order is rejected (payment declined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderRejected {
    pub order_id: String,
    pub total_cents: u64,
    pub reason: String,
}

/// The order is cancelled: it was out of stock (the payment is refunded) or
/// the payment did not answer in time (the payment is voided).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderCancelled {
    pub order_id: String,
    pub total_cents: u64,
    pub reason: String,
}

/// Which email to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    OrderConfirmed,
    OrderRejected,
    OrderCancelled,
}

/// The order service asks the email service to send an email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EmailRequested {
    pub order_id: String,
    pub kind: EmailKind,
    pub to: String,
    pub customer_name: String,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    /// Why the order was rejected or cancelled, for those emails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The email service rendered and sent an email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EmailSent {
    pub order_id: String,
    pub email_id: String,
    pub kind: EmailKind,
    pub to: String,
    pub subject: String,
}

/// The JSON Schema of every event type's payload, generated from these
/// types (the checked-in `schemas/` folder holds them; a host test fails
/// when it is stale): `(event type, schema)`.
#[cfg(feature = "schema")]
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    use schemars::schema_for;
    vec![
        (types::ORDER_PLACED, schema_for!(OrderPlaced)),
        (types::ORDER_CONFIRMED, schema_for!(OrderConfirmed)),
        (types::ORDER_REJECTED, schema_for!(OrderRejected)),
        (types::ORDER_CANCELLED, schema_for!(OrderCancelled)),
        (types::PAYMENT_REQUESTED, schema_for!(PaymentRequested)),
        (types::PAYMENT_AUTHORIZED, schema_for!(PaymentAuthorized)),
        (types::PAYMENT_DECLINED, schema_for!(PaymentDeclined)),
        (types::PAYMENT_REFUND_REQUESTED, schema_for!(PaymentRefundRequested)),
        (types::PAYMENT_REFUNDED, schema_for!(PaymentRefunded)),
        (types::PAYMENT_VOID_REQUESTED, schema_for!(PaymentVoidRequested)),
        (types::PAYMENT_VOIDED, schema_for!(PaymentVoided)),
        (types::EMAIL_REQUESTED, schema_for!(EmailRequested)),
        (types::EMAIL_SENT, schema_for!(EmailSent)),
    ]
}

/// A component's contract: what it publishes and what it consumes, each
/// `"topic:EventType"` with the JSON Schema of its payload, as JSON:
/// `{"publishes": {"payments:PaymentAuthorized": {…}}, "consumes": {…}}`.
/// The host reads it from the component's `shop:contract` custom section
/// and refuses, at load and at every reload, a component whose published
/// schemas do not give its consumers the fields they require.
///
/// # Errors
/// An entry that is not `topic:EventType`, or a type without a schema here.
#[cfg(feature = "schema")]
pub fn contract_json(publishes: &[&str], consumes: &[&str]) -> Result<String, String> {
    let all = schemas();
    let side = |entries: &[&str]| -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let mut out = serde_json::Map::new();
        for entry in entries {
            let Some((topic, event_type)) = entry.split_once(':') else {
                return Err(format!("contract entry {entry:?} is not \"topic:EventType\""));
            };
            if !topics::ALL.contains(&topic) {
                return Err(format!("contract entry {entry:?}: no topic {topic:?} in the shop"));
            }
            let Some((_, schema)) = all.iter().find(|(t, _)| *t == event_type) else {
                return Err(format!("contract entry {entry:?}: no event type {event_type:?} in shop-events"));
            };
            out.insert((*entry).to_owned(), schema.clone().to_value());
        }
        Ok(out)
    };
    let contract = serde_json::json!({ "publishes": side(publishes)?, "consumes": side(consumes)? });
    serde_json::to_string(&contract).map_err(|err| err.to_string())
}

/// For a component's `build.rs`: writes its contract (see
/// [`contract_json`]) to `$OUT_DIR/shop-contract.json`, which
/// `shop_sdk::contract!()` embeds as the `shop:contract` custom section.
///
/// # Panics
/// On a bad entry or when `OUT_DIR` cannot be written: the build fails
/// with the reason.
#[cfg(feature = "schema")]
pub fn write_contract(publishes: &[&str], consumes: &[&str]) {
    let json = contract_json(publishes, consumes).unwrap_or_else(|err| panic!("{err}"));
    let out = std::env::var_os("OUT_DIR").expect("OUT_DIR is set for build scripts");
    let path = std::path::Path::new(&out).join("shop-contract.json");
    std::fs::write(&path, json).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    println!("cargo::rerun-if-changed=build.rs");
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
        assert_eq!(card::brand("4242424242424242"), "visa");
        assert_eq!(card::brand("5555555555554444"), "mastercard");
        assert_eq!(card::brand("2223003122003222"), "mastercard");
        assert_eq!(card::brand("378282246310005"), "amex");
        assert_eq!(card::brand("6011111111111117"), "discover");
        assert_eq!(card::brand("3056930009020004"), "unknown");
        assert_eq!((card::last4("4242424242424242"), card::last4("12")), ("4242", "12"));
    }

    fn token() -> CardToken {
        CardToken { token: "tok_1".into(), brand: "visa".into(), last4: "4242".into() }
    }

    #[test]
    fn payment_request_deadline_is_optional_on_the_wire() {
        let old = r#"{"order_id":"o1","amount_cents":5,"card":{"token":"tok_1","brand":"visa","last4":"4242"}}"#;
        let req: PaymentRequested = serde_json::from_str(old).unwrap();
        assert_eq!(req.deadline_ms, None);
        assert_eq!(serde_json::to_string(&req).unwrap(), old, "no deadline field when absent");
        let req = PaymentRequested { deadline_ms: Some(9), ..req };
        assert!(serde_json::to_string(&req).unwrap().contains(r#""deadline_ms":9"#));
        assert_eq!(serde_json::to_string(&EmailKind::OrderCancelled).unwrap(), r#""order_cancelled""#);
    }

    #[test]
    fn order_placed_idempotency_is_optional_on_the_wire() {
        let old = r#"{"order_id":"o1","customer":{"name":"A","email":"a@b.c"},"items":[],"total_cents":0,"card":{"token":"tok_1","brand":"visa","last4":"4242"}}"#;
        let placed: OrderPlaced = serde_json::from_str(old).unwrap();
        assert_eq!((&placed.idempotency, &placed.card), (&None, &token()));
        assert_eq!(serde_json::to_string(&placed).unwrap(), old, "no idempotency field when absent");
        let binding = IdempotencyBinding { key_digest: "k".into(), request_hash: "h".into() };
        let placed = OrderPlaced { idempotency: Some(binding.clone()), ..placed };
        let decoded: OrderPlaced = serde_json::from_str(&serde_json::to_string(&placed).unwrap()).unwrap();
        assert_eq!(decoded.idempotency, Some(binding));
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
