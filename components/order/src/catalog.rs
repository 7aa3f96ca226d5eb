//! The shop's catalog: what the order service sells and at what price, from
//! the `catalog` config value. The service prices every order here; the
//! prices a client or the gateway quoted are only checked against it.

use std::collections::BTreeMap;

use shop_events::{CatalogItem, LineItem};
use shop_sdk::{HandleError, Host};

use crate::{Config, stock};

/// Highest unit price a catalog may set: 100,000.00.
pub const MAX_UNIT_PRICE_CENTS: u64 = 10_000_000;
/// Longest SKU.
pub const MAX_SKU_LEN: usize = 64;

/// One product of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// What the page shows.
    pub name: String,
    /// What one unit costs.
    pub unit_price_cents: u64,
}

/// Parses `sku | name | price in cents` entries, one per line or separated
/// by `;`; blank lines and lines starting with `#` are skipped.
///
/// # Errors
/// Why the first malformed entry is refused.
pub fn parse(raw: &str) -> Result<BTreeMap<String, Product>, String> {
    let mut catalog = BTreeMap::new();
    for entry in raw.split(['\n', ';']).map(str::trim).filter(|e| !e.is_empty() && !e.starts_with('#')) {
        let fields: Vec<&str> = entry.split('|').map(str::trim).collect();
        let [sku, name, price] = fields.as_slice() else {
            return Err(format!("{entry:?} is not \"sku | name | price in cents\""));
        };
        if sku.is_empty() || sku.len() > MAX_SKU_LEN || sku.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{entry:?}: a SKU is 1 to {MAX_SKU_LEN} characters without spaces"));
        }
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(format!("{entry:?} has no name"));
        }
        let unit_price_cents = price
            .parse::<u64>()
            .ok()
            .filter(|p| (1..=MAX_UNIT_PRICE_CENTS).contains(p))
            .ok_or_else(|| format!("{entry:?}: the price must be 1 to {MAX_UNIT_PRICE_CENTS} cents"))?;
        let product = Product { name: (*name).to_owned(), unit_price_cents };
        if catalog.insert((*sku).to_owned(), product).is_some() {
            return Err(format!("SKU {sku:?} is listed twice"));
        }
    }
    Ok(catalog)
}

/// Money as the messages show it: `34.00`.
fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// The lines of an order at the catalog's prices.
///
/// # Errors
/// Why the order cannot be sold as placed: a SKU the catalog does not list,
/// or a quoted price that is not the catalog's (the catalog changed after the
/// customer saw it: they never agreed to the new price).
pub fn price(catalog: &BTreeMap<String, Product>, items: &[LineItem]) -> Result<Vec<LineItem>, String> {
    items
        .iter()
        .map(|item| {
            let product = catalog.get(&item.sku).ok_or_else(|| format!("{} is not sold here", item.sku))?;
            if item.unit_price_cents != product.unit_price_cents {
                return Err(format!(
                    "the price of {} is {}, not the {} the order was placed at",
                    item.sku,
                    money(product.unit_price_cents),
                    money(item.unit_price_cents)
                ));
            }
            Ok(LineItem { unit_price_cents: product.unit_price_cents, ..item.clone() })
        })
        .collect()
}

/// The catalog with what is left of each product (`GET /catalog`).
///
/// # Errors
/// Retryable if the store is unavailable, permanent on corrupt state.
pub fn listing(host: &impl Host, config: &Config) -> Result<Vec<CatalogItem>, HandleError> {
    config
        .catalog
        .iter()
        .map(|(sku, product)| {
            Ok(CatalogItem {
                sku: sku.clone(),
                name: product.name.clone(),
                unit_price_cents: product.unit_price_cents,
                remaining: stock::remaining(host, &config.stock, sku)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_lines_and_comments() {
        let catalog = parse("# the shop\n book | Book | 1250 ;pen|Pen, blue|199\n\n").unwrap();
        assert_eq!(catalog.len(), 2);
        assert_eq!(catalog["pen"], Product { name: "Pen, blue".into(), unit_price_cents: 199 });
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn malformed_entries_are_refused_with_the_entry() {
        for (raw, why) in [
            ("book|Book", "is not"),
            ("book|Book|12.50", "price must be"),
            ("book|Book|0", "price must be"),
            ("book|Book|10000001", "price must be"),
            ("a b|Book|1", "without spaces"),
            ("|Book|1", "without spaces"),
            ("book||1", "no name"),
            ("book|A|1;book|B|2", "listed twice"),
        ] {
            let err = parse(raw).unwrap_err();
            assert!(err.contains(why), "{raw}: {err}");
        }
    }

    #[test]
    fn orders_are_priced_by_the_catalog() {
        let catalog = parse("lamp|Lamp|3400;pen|Pen|199").unwrap();
        let line = |sku: &str, price| LineItem { sku: sku.into(), quantity: 2, unit_price_cents: price };
        assert_eq!(price(&catalog, &[line("lamp", 3400)]).unwrap(), vec![line("lamp", 3400)]);
        let err = price(&catalog, &[line("pen", 199), line("lamp", 1)]).unwrap_err();
        assert_eq!(err, "the price of lamp is 34.00, not the 0.01 the order was placed at");
        assert_eq!(price(&catalog, &[line("mug", 199)]).unwrap_err(), "mug is not sold here");
    }
}
