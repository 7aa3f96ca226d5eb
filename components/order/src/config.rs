//! The order service's configuration, from `[components.order.config]`.

use std::collections::BTreeMap;

use shop_sdk::{HandleError, Host};

use crate::catalog::{self, Product};

/// Default for `payment_deadline_ms`: how long to wait for the payment answer.
pub const DEFAULT_PAYMENT_DEADLINE_MS: u64 = 30_000;
/// Default for `compensation_retry_ms`: the first delay before a refund or
/// void request is sent again.
pub const DEFAULT_COMPENSATION_RETRY_MS: u64 = 2_000;
/// The retry delay doubles per attempt up to this (unless the first delay is
/// already longer).
pub const MAX_COMPENSATION_RETRY_MS: u64 = 60_000;

/// Typed configuration; every value is a string in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// What the shop sells, by SKU (`catalog`, see [`catalog::parse`]);
    /// without it nothing is sold.
    pub catalog: BTreeMap<String, Product>,
    /// Initial stock of the limited SKUs (`stock = "sku-a=10,sold-out=0"`);
    /// SKUs not listed are unlimited.
    pub stock: BTreeMap<String, u64>,
    /// `payment_deadline_ms`.
    pub payment_deadline_ms: u64,
    /// `compensation_retry_ms`.
    pub compensation_retry_ms: u64,
}

impl Config {
    /// Reads and validates the configuration.
    ///
    /// # Errors
    /// [`HandleError::Permanent`] naming the key of a malformed value.
    pub fn load(host: &impl Host) -> Result<Self, HandleError> {
        let stock = match host.config("stock") {
            None => BTreeMap::new(),
            Some(raw) => parse_stock(&raw).map_err(|why| {
                HandleError::Permanent(format!("config \"stock\" has an invalid value {raw:?}: {why}"))
            })?,
        };
        let catalog = match host.config("catalog") {
            None => BTreeMap::new(),
            Some(raw) => catalog::parse(&raw)
                .map_err(|why| HandleError::Permanent(format!("config \"catalog\" has an invalid value: {why}")))?,
        };
        Ok(Self {
            catalog,
            stock,
            payment_deadline_ms: positive(host, "payment_deadline_ms", DEFAULT_PAYMENT_DEADLINE_MS)?,
            compensation_retry_ms: positive(host, "compensation_retry_ms", DEFAULT_COMPENSATION_RETRY_MS)?,
        })
    }

    /// The delay before the next compensation attempt: the configured delay
    /// doubled per retry already made, capped.
    pub fn retry_delay_ms(&self, retries: u32) -> u64 {
        let cap = MAX_COMPENSATION_RETRY_MS.max(self.compensation_retry_ms);
        self.compensation_retry_ms.saturating_mul(1u64 << retries.min(32)).min(cap)
    }
}

/// A duration in milliseconds that must not be 0 (a zero deadline would
/// cancel every order, a zero retry delay would spin).
fn positive(host: &impl Host, key: &str, default: u64) -> Result<u64, HandleError> {
    match host.config_or(key, default)? {
        0 => Err(HandleError::Permanent(format!("config {key:?} must be greater than 0"))),
        value => Ok(value),
    }
}

/// Parses `sku=quantity` pairs separated by commas; blanks are allowed.
fn parse_stock(raw: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut stock = BTreeMap::new();
    for pair in raw.split(',').map(str::trim).filter(|pair| !pair.is_empty()) {
        let (sku, quantity) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not sku=quantity"))?;
        let sku = sku.trim();
        if sku.is_empty() {
            return Err(format!("{pair:?} has no SKU"));
        }
        let quantity = quantity.trim().parse().map_err(|_| format!("{pair:?} has no valid quantity"))?;
        if stock.insert(sku.to_owned(), quantity).is_some() {
            return Err(format!("SKU {sku:?} is listed twice"));
        }
    }
    Ok(stock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_sdk::MemoryHost;

    #[test]
    fn defaults_and_values() {
        let config = Config::load(&MemoryHost::default()).unwrap();
        assert!(config.catalog.is_empty(), "nothing is sold without a catalog");
        assert_eq!((config.stock.len(), config.payment_deadline_ms, config.compensation_retry_ms), (0, 30_000, 2_000));
        let host = MemoryHost::default()
            .with_config("stock", " sku-a = 10, sold-out=0 ,")
            .with_config("payment_deadline_ms", "500")
            .with_config("compensation_retry_ms", "100");
        let config = Config::load(&host).unwrap();
        assert_eq!(config.stock, BTreeMap::from([("sku-a".into(), 10), ("sold-out".into(), 0)]));
        assert_eq!(config.payment_deadline_ms, 500);
        assert_eq!((0..4).map(|a| config.retry_delay_ms(a)).collect::<Vec<_>>(), [100, 200, 400, 800]);
        assert_eq!(config.retry_delay_ms(10), 60_000, "capped");
        assert_eq!(config.retry_delay_ms(u32::MAX), 60_000, "no overflow");
    }

    #[test]
    fn malformed_values_name_their_key() {
        for (key, value) in [
            ("stock", "sku-a"),
            ("stock", "sku-a=lots"),
            ("stock", "=3"),
            ("stock", "a=1,a=2"),
            ("stock", "a=-1"),
            ("payment_deadline_ms", "soon"),
            ("compensation_retry_ms", "-5"),
            ("catalog", "book|Book|free"),
        ] {
            let err = Config::load(&MemoryHost::default().with_config(key, value)).unwrap_err();
            assert!(matches!(&err, HandleError::Permanent(msg) if msg.contains(key)), "{key}={value}: {err}");
        }
    }
}
