//! The gateway's adapter to the rest of the host: `POST /order` deposits the
//! card in the vault and publishes `OrderPlaced` (with the card's token)
//! through the publisher; `GET /order/{id}`, `GET /catalog` and the
//! `Idempotency-Key` check ask the order component.

use std::sync::Arc;

use shop_events::{CardToken, CatalogItem, OrderPlaced};

use crate::bus::{Outbound, Publisher};
use crate::clock::Clock;
use crate::envelope::Envelope;
use crate::runtime::{Request, ServiceRuntime};
use crate::status::BrokerLink;
use crate::traces;

/// The gateway's backend: Kafka for publishing, the order component for status.
pub struct GatewayBackend {
    /// Where `OrderPlaced` goes.
    pub publisher: Arc<dyn Publisher>,
    /// Physical name of the orders topic.
    pub orders_topic: String,
    /// The order component, asked for an order's status.
    pub orders: Arc<ServiceRuntime>,
    /// Stamps the envelopes.
    pub clock: Arc<dyn Clock>,
    /// Whether the broker can be reached: if not, orders are refused at once.
    pub link: BrokerLink,
    /// Where card numbers go.
    pub vault: Arc<crate::vault::Vault>,
    /// What the orders are written as (`kafka.wire_format`).
    pub wire_format: crate::manifest::WireFormat,
}

impl gateway::Backend for GatewayBackend {
    fn place_order(&self, order: OrderPlaced) -> gateway::BoxFuture<'_, Result<(), gateway::PlaceError>> {
        Box::pin(async move {
            let data = serde_json::to_value(&order).map_err(|e| gateway::PlaceError::NotSent(e.to_string()))?;
            let envelope = Envelope::originate(
                shop_events::types::ORDER_PLACED,
                &order.order_id,
                "gateway",
                self.clock.now_ms(),
                data,
            );
            // The order's trace starts here, or continues the caller's.
            let span = traces::stage("place_order", "gateway", "", traces::request_parent());
            let trace = traces::begin(&span, traces::request_parent());
            let (value, headers) = envelope.encode(self.wire_format, Some(&trace));
            let record = Outbound {
                topic: self.orders_topic.clone(),
                key: order.order_id.clone(),
                value: value.into_bytes(),
                headers: headers.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
            };
            let acked =
                self.publisher.enqueue(vec![record]).await.map_err(|e| gateway::PlaceError::NotSent(e.to_string()))?;
            let acked = acked.await.map_err(|e| gateway::PlaceError::Unconfirmed(e.to_string()));
            drop(span);
            acked
        })
    }

    fn unavailable(&self) -> Option<String> {
        self.link.down().map(|down| down.reason)
    }

    fn idempotency(&self, key_digest: &str) -> gateway::BoxFuture<'_, Result<Option<String>, gateway::BackendError>> {
        let path = format!("/idempotency/{key_digest}");
        Box::pin(async move {
            let bound = self.ask_orders(path).await?;
            Ok(bound.and_then(|bound| bound["request_hash"].as_str().map(str::to_owned)))
        })
    }

    fn order_status(
        &self,
        order_id: &str,
    ) -> gateway::BoxFuture<'_, Result<Option<serde_json::Value>, gateway::BackendError>> {
        Box::pin(self.ask_orders(format!("/orders/{order_id}")))
    }

    fn catalog(&self) -> gateway::BoxFuture<'_, Result<Vec<CatalogItem>, gateway::BackendError>> {
        Box::pin(async move {
            let answer = self.ask_orders("/catalog".into()).await?.unwrap_or_default();
            serde_json::from_value(answer["items"].clone())
                .map_err(|e| gateway::BackendError(format!("order service answered an invalid catalog: {e}")))
        })
    }

    fn vault_card(
        &self,
        order_id: &str,
        number: String,
    ) -> gateway::BoxFuture<'_, Result<CardToken, gateway::BackendError>> {
        let order_id = order_id.to_owned();
        Box::pin(async move {
            self.vault.deposit_for(&order_id, &number).await.map_err(|e| gateway::BackendError(e.to_string()))
        })
    }
}

impl GatewayBackend {
    /// `GET path` on the order component: its JSON, `None` on 404.
    async fn ask_orders(&self, path: String) -> Result<Option<serde_json::Value>, gateway::BackendError> {
        let request = Request { method: "GET".into(), path, query: String::new(), body: Vec::new() };
        let response = self.orders.query(&request).await.map_err(|e| gateway::BackendError(e.to_string()))?;
        match response.status {
            200 => serde_json::from_slice(&response.body)
                .map(Some)
                .map_err(|e| gateway::BackendError(format!("order service answered invalid JSON: {e}"))),
            404 => Ok(None),
            status => Err(gateway::BackendError(format!("order service answered {status}"))),
        }
    }
}
