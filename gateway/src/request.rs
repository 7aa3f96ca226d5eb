//! The `POST /order` body and its validation against the catalog. Every bad
//! field is reported, not just the first. Prices are the catalog's: a client
//! may repeat the price it showed, and is refused if it is not the price.

use serde::{Deserialize, Serialize};
use shop_events::{CardToken, Customer, IdempotencyBinding, LineItem, OrderPlaced, card, total_cents};
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::idempotency::{self, IdempotencyKey};

/// Most lines in one order.
pub const MAX_ITEMS: usize = 50;
/// Most units of one line.
pub const MAX_QUANTITY: u32 = 1_000;

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
    /// The price the client showed, if it says: it must be the catalog's.
    pub unit_price_cents: Option<i64>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    pub card_number: Option<String>,
}

impl std::fmt::Debug for PaymentRequest {
    /// Never prints the number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentRequest").finish_non_exhaustive()
    }
}

/// Why an order was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Fields are missing or malformed, or name SKUs the shop does not sell.
    Invalid(Vec<FieldError>),
    /// Every field is valid, but prices the client sent are not the
    /// catalog's (each field error gives the real price).
    PriceMismatch(Vec<FieldError>),
}

/// A validated order, priced by the catalog, whose card is not yet in the
/// vault: [`ValidOrder::placed`] makes the event once it is.
#[derive(Clone)]
pub struct ValidOrder {
    pub order_id: String,
    pub customer: Customer,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    pub idempotency: Option<IdempotencyBinding>,
    /// Digits only; goes to the vault, never into an event.
    pub card_number: String,
}

impl std::fmt::Debug for ValidOrder {
    /// Never prints the card number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidOrder")
            .field("order_id", &self.order_id)
            .field("items", &self.items)
            .field("total_cents", &self.total_cents)
            .finish_non_exhaustive()
    }
}

impl ValidOrder {
    /// The `OrderPlaced` event, with the vault's token for the card.
    pub fn placed(self, card: CardToken) -> OrderPlaced {
        OrderPlaced {
            order_id: self.order_id,
            customer: self.customer,
            items: self.items,
            total_cents: self.total_cents,
            card,
            idempotency: self.idempotency,
        }
    }
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
    /// Validates every field against `catalog` and prices the lines at its
    /// prices.
    ///
    /// The order id is random, or derived from `idempotency_key` and the
    /// validated order (customer and lines, not the card), which the key is
    /// then bound to (see [`idempotency::bind`]): a client retrying the same
    /// request places the same order.
    ///
    /// # Errors
    /// [`Refusal::Invalid`] with every invalid field and its path, else
    /// [`Refusal::PriceMismatch`] with every price that is not the catalog's.
    pub fn validate(self, idempotency_key: Option<&IdempotencyKey>, catalog: &Catalog) -> Result<ValidOrder, Refusal> {
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
        let mut mismatches = Errors::default();
        let mut items = Vec::new();
        match self.items.as_deref() {
            None | Some([]) => errors.add("items", "at least one item is required"),
            Some(list) if list.len() > MAX_ITEMS => errors.add("items", format!("at most {MAX_ITEMS} items")),
            Some(list) => {
                for (i, item) in list.iter().enumerate() {
                    items.extend(line(i, item, catalog, &mut errors, &mut mismatches));
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
            return Err(Refusal::Invalid(errors.0));
        }
        if !mismatches.0.is_empty() {
            return Err(Refusal::PriceMismatch(mismatches.0));
        }
        let customer = Customer { name, email };
        let (order_id, binding) = match idempotency_key {
            Some(key) => {
                let (order_id, binding) = idempotency::bind(key, &customer, &items);
                (order_id, Some(binding))
            }
            None => (Uuid::new_v4(), None),
        };
        Ok(ValidOrder {
            order_id: order_id.to_string(),
            total_cents: total_cents(&items),
            customer,
            items,
            card_number: digits,
            idempotency: binding,
        })
    }
}

/// Validates line `i` and prices it by the catalog: `None` if invalid
/// (recorded in `errors`); a price the client sent that is not the
/// catalog's goes to `mismatches`.
fn line(
    i: usize,
    item: &ItemRequest,
    catalog: &Catalog,
    errors: &mut Errors,
    mismatches: &mut Errors,
) -> Option<LineItem> {
    let field = format!("items[{i}].sku");
    let sku = errors.text(&field, item.sku.as_ref(), 64);
    let product = catalog.get(&sku);
    if !sku.is_empty() && product.is_none() {
        errors.add(&field, format!("{sku:?} is not sold here (see GET /catalog)"));
    }
    let quantity = errors.number(&format!("items[{i}].quantity"), item.quantity, 1, i64::from(MAX_QUANTITY));
    let product = product?;
    if let Some(sent) = item.unit_price_cents
        && u64::try_from(sent).ok() != Some(product.unit_price_cents)
    {
        mismatches.add(
            format!("items[{i}].unit_price_cents"),
            format!("the price of {sku} is {} cents, not {sent}", product.unit_price_cents),
        );
    }
    (quantity > 0).then_some(LineItem { sku, quantity: quantity as u32, unit_price_cents: product.unit_price_cents })
}
