//! The gateway's view of the catalog the order service owns: read from it
//! ([`crate::Backend::catalog`]) and kept for [`CATALOG_TTL`], so that an
//! order or a page view costs no query most of the time. A stale copy is
//! safe: the order service prices every order again and rejects one whose
//! prices are not its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_events::CatalogItem;

use crate::{Backend, BackendError};

/// How long a catalog read from the order service is used before it is
/// read again.
pub const CATALOG_TTL: Duration = Duration::from_secs(1);

/// The catalog by SKU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog(pub BTreeMap<String, CatalogItem>);

impl Catalog {
    /// The product sold under `sku`, if any.
    pub fn get(&self, sku: &str) -> Option<&CatalogItem> {
        self.0.get(sku)
    }

    /// Every product, by SKU.
    pub fn items(&self) -> Vec<&CatalogItem> {
        self.0.values().collect()
    }
}

impl FromIterator<CatalogItem> for Catalog {
    fn from_iter<I: IntoIterator<Item = CatalogItem>>(items: I) -> Self {
        Self(items.into_iter().map(|item| (item.sku.clone(), item)).collect())
    }
}

/// The last catalog read and when.
#[derive(Default)]
pub struct CatalogCache(tokio::sync::Mutex<Option<(Instant, Arc<Catalog>)>>);

impl CatalogCache {
    /// The catalog, read again from `backend` when older than
    /// [`CATALOG_TTL`]. Requests arriving meanwhile wait for that one read.
    ///
    /// # Errors
    /// [`BackendError`] when the order service cannot answer and no catalog
    /// was ever read (a stale one is used rather than refusing orders).
    pub async fn get(&self, backend: &dyn Backend) -> Result<Arc<Catalog>, BackendError> {
        let mut cached = self.0.lock().await;
        if let Some((at, catalog)) = cached.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(catalog.clone());
        }
        match backend.catalog().await {
            Ok(items) => {
                let catalog = Arc::new(items.into_iter().collect::<Catalog>());
                *cached = Some((Instant::now(), catalog.clone()));
                Ok(catalog)
            }
            Err(err) => match cached.as_ref() {
                Some((_, stale)) => {
                    tracing::warn!("catalog not read, the last one is used: {err}");
                    Ok(stale.clone())
                }
                None => Err(err),
            },
        }
    }
}
