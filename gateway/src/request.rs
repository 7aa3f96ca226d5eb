//! The `POST /order` body and its validation. Every bad field is reported,
//! not just the first.

use serde::{Deserialize, Serialize};
use shop_events::{Customer, LineItem, OrderPlaced, card, total_cents};
use uuid::Uuid;

use crate::idempotency::{self, IdempotencyKey};

/// Most lines in one order.
pub const MAX_ITEMS: usize = 50;
/// Most units of one line.
pub const MAX_QUANTITY: u32 = 1_000;
/// Highest unit price: 100,000.00.
pub const MAX_UNIT_PRICE_CENTS: u64 = 10_000_000;

/// The order as a client sends it. Every field is optional here so that a
/// missing one is reported with the others instead of failing the parse.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer: Option<CustomerRequest>,
    pub items: Option<Vec<ItemRequest>>,
    pub payment: Option<PaymentRequest>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerRequest {
    pub name: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub sku: Option<String>,
    pub quantity: Option<i64>,
    pub unit_price_cents: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    pub card_number: Option<String>,
}

/// One invalid field: its path (e.g. `items[1].quantity`) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }

    fn text(&mut self, field: &str, value: Option<&String>, max: usize) -> String {
        match value.map(|v| v.trim()) {
            None | Some("") => {
                self.add(field, "is required");
                String::new()
            }
            Some(v) if v.chars().count() > max => {
                self.add(field, format!("must be at most {max} characters"));
                String::new()
            }
            Some(v) if v.chars().any(char::is_control) => {
                self.add(field, "must not contain control characters");
                String::new()
            }
            Some(v) => v.to_owned(),
        }
    }

    fn number(&mut self, field: &str, value: Option<i64>, min: i64, max: i64) -> i64 {
        match value {
            None => {
                self.add(field, "is required");
                0
            }
            Some(v) if !(min..=max).contains(&v) => {
                self.add(field, format!("must be between {min} and {max}"));
                0
            }
            Some(v) => v,
        }
    }
}

fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
        && !domain.contains('@')
}

impl OrderRequest {
    /// Validates every field and builds the `OrderPlaced` event.
    ///
    /// The order id is random, or derived from `idempotency_key` and the
    /// validated order, which the key is then bound to (see
    /// [`idempotency::bind`]): a client retrying the same request places the
    /// same order.
    ///
    /// # Errors
    /// Every invalid field, with its path.
    pub fn validate(self, idempotency_key: Option<&IdempotencyKey>) -> Result<OrderPlaced, Vec<FieldError>> {
        let mut errors = Errors::default();
        if self.customer.is_none() {
            errors.add("customer", "is required");
        }
        let customer = self.customer.unwrap_or_default();
        let name = errors.text("customer.name", customer.name.as_ref(), 100);
        let email = errors.text("customer.email", customer.email.as_ref(), 254);
        if !email.is_empty() && !plausible_email(&email) {
            errors.add("customer.email", "must be an email address like name@example.com");
        }
        let mut items = Vec::new();
        match self.items.as_deref() {
            None | Some([]) => errors.add("items", "at least one item is required"),
            Some(list) if list.len() > MAX_ITEMS => errors.add("items", format!("at most {MAX_ITEMS} items")),
            Some(list) => {
                for (i, item) in list.iter().enumerate() {
                    let sku = errors.text(&format!("items[{i}].sku"), item.sku.as_ref(), 64);
                    let quantity =
                        errors.number(&format!("items[{i}].quantity"), item.quantity, 1, i64::from(MAX_QUANTITY));
                    let price = errors.number(
                        &format!("items[{i}].unit_price_cents"),
                        item.unit_price_cents,
                        1,
                        MAX_UNIT_PRICE_CENTS as i64,
                    );
                    items.push(LineItem { sku, quantity: quantity as u32, unit_price_cents: price as u64 });
                }
            }
        }
        let raw_card = self.payment.and_then(|p| p.card_number).unwrap_or_default();
        let digits = card::normalize(&raw_card);
        if digits.is_empty() {
            errors.add("payment.card_number", "is required");
        } else if !(12..=19).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            errors.add("payment.card_number", "must be 12 to 19 digits");
        } else if !card::luhn_valid(&digits) {
            errors.add("payment.card_number", "is not a valid card number (checksum)");
        }
        if !errors.0.is_empty() {
            return Err(errors.0);
        }
        let customer = Customer { name, email };
        let (order_id, binding) = match idempotency_key {
            Some(key) => {
                let (order_id, binding) = idempotency::bind(key, &customer, &items, &digits);
                (order_id, Some(binding))
            }
            None => (Uuid::new_v4(), None),
        };
        Ok(OrderPlaced {
            order_id: order_id.to_string(),
            total_cents: total_cents(&items),
            customer,
            items,
            card_number: digits,
            idempotency: binding,
        })
    }
}
