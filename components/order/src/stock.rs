//! The stock table: remaining quantity per limited SKU at `stock/{sku}`,
//! seeded from the `stock` config the first time a SKU is touched.

use std::collections::BTreeMap;

use shop_events::LineItem;
use shop_sdk::{HandleError, Host};

use crate::Reservation;

/// The state key of a SKU's remaining quantity.
pub fn stock_key(sku: &str) -> String {
    format!("stock/{sku}")
}

/// The remaining quantity of `sku`, `None` when unlimited.
///
/// # Errors
/// Retryable if the store is unavailable, permanent on corrupt state.
pub fn remaining(host: &impl Host, initial: &BTreeMap<String, u64>, sku: &str) -> Result<Option<u64>, HandleError> {
    match host.get_json::<u64>(&stock_key(sku))? {
        Some(left) => Ok(Some(left)),
        None => Ok(initial.get(sku).copied()),
    }
}

/// Reserves every line of an order or nothing: on success the limited SKUs
/// are decremented and the reservations returned; otherwise the SKUs short
/// of stock are returned and nothing is written.
///
/// # Errors
/// As for [`remaining`].
pub fn reserve(
    host: &mut impl Host,
    initial: &BTreeMap<String, u64>,
    items: &[LineItem],
) -> Result<Result<Vec<Reservation>, Vec<String>>, HandleError> {
    let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
    for item in items {
        let quantity = wanted.entry(&item.sku).or_default();
        *quantity = quantity.saturating_add(u64::from(item.quantity));
    }
    let mut short = Vec::new();
    let mut updates = Vec::new();
    for (&sku, &quantity) in &wanted {
        match remaining(host, initial, sku)? {
            Some(left) if left < quantity => short.push(sku.to_owned()),
            Some(left) => updates.push((sku, left - quantity)),
            None => {}
        }
    }
    if !short.is_empty() {
        return Ok(Err(short));
    }
    for (sku, left) in updates {
        host.put_json(&stock_key(sku), &left)?;
    }
    Ok(Ok(wanted.into_iter().map(|(sku, quantity)| Reservation { sku: sku.to_owned(), quantity }).collect()))
}
