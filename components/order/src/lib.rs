//! Order service: the saga's orchestrator. Records each order, asks for its
//! payment with a deadline, reserves its stock once paid, and settles it:
//! CONFIRMED, REJECTED, or CANCELLED with a refund (out of stock) or a void
//! (no payment answer in time), retried on timers until confirmed. Asks for
//! the matching email once per final state.
//!
//! Consumes `orders` (`OrderPlaced`), `payments` (`PaymentAuthorized`,
//! `PaymentDeclined`, `PaymentRefunded`, `PaymentVoided`) and its own timers.
//! Routes: `GET /catalog` (what is sold, at what price, how many are left:
//! the gateway and the page read it there), `GET /orders/{id}`,
//! `GET /stock/{sku}`, `GET /idempotency/{key_digest}` (the request hash an
//! `Idempotency-Key` is bound to, for the gateway).

mod answer;
pub mod catalog;
mod config;
mod idempotency;
mod order;
mod saga;
mod stock;

pub use answer::{Answer, EarlyAnswer, early_key};
pub use config::{Config, DEFAULT_COMPENSATION_RETRY_MS, DEFAULT_PAYMENT_DEADLINE_MS, MAX_COMPENSATION_RETRY_MS};
pub use idempotency::{Bound, binding_key};
pub use order::{CardShown, Compensation, CompensationKind, Order, Reservation, Status, Step};
pub use saga::{COMPENSATION_RETRY, OrderTimer, PAYMENT_DEADLINE, compensation_timer, deadline_timer};
use shop_events::types;
use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service, TIMER_TOPIC};
pub use stock::stock_key;

use saga::Saga;

/// The order service.
pub struct OrderService;

/// The state key of an order.
pub fn order_key(order_id: &str) -> String {
    format!("order/{order_id}")
}

impl Service for OrderService {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        let now_ms = host.now_ms();
        if event.topic == TIMER_TOPIC {
            let timer = event.payload_json()?;
            return Saga { config: Config::load(host)?, host, now_ms }.timer(&event.id, &event.event_type, timer);
        }
        if event.event_type == types::ORDER_PLACED {
            let placed = event.payload_json()?;
            return Saga { config: Config::load(host)?, host, now_ms }.place(&event.id, placed);
        }
        match answer::Answer::from_event(event)? {
            Some(answer) => Saga { config: Config::load(host)?, host, now_ms }.answer(&event.id, answer),
            // Our own events and the commands we sent come back on the
            // topics we consume: nothing to do.
            None => Ok(Vec::new()),
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["orders", id]) => match host.get_json::<Order>(&order_key(id)) {
                Ok(Some(order)) => Response::json(200, &order),
                Ok(None) => Response::not_found(&format!("no order {id}")),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            ("GET", ["idempotency", key_digest]) => match host.get_json::<Bound>(&binding_key(key_digest)) {
                Ok(Some(bound)) => Response::json(200, &bound),
                Ok(None) => Response::not_found("no order with this key"),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            ("GET", ["catalog"]) => match Config::load(host).and_then(|config| catalog::listing(host, &config)) {
                Ok(items) => Response::json(200, &serde_json::json!({ "items": items })),
                Err(err) => Response::error(500, "catalog_unavailable", &err.to_string()),
            },
            ("GET", ["stock", sku]) => {
                let remaining = Config::load(host).and_then(|config| stock::remaining(host, &config.stock, sku));
                match remaining {
                    Ok(remaining) => Response::json(200, &serde_json::json!({ "sku": sku, "remaining": remaining })),
                    Err(err) => Response::error(500, "stock_unavailable", &err.to_string()),
                }
            }
            _ => Response::not_found(
                "unknown route; try GET /catalog, GET /orders/{id}, GET /stock/{sku} or GET /idempotency/{key_digest}",
            ),
        }
    }
}

shop_sdk::export_service!(OrderService);
shop_sdk::contract!();

#[cfg(test)]
mod tests;
