//! Order service: the saga's orchestrator. Records each order, asks for its
//! payment, and moves it to CONFIRMED or REJECTED when the payment service
//! answers, asking for the matching email.
//!
//! Consumes `orders` (`OrderPlaced`) and `payments` (`PaymentAuthorized`,
//! `PaymentDeclined`). Routes: `GET /orders/{id}`.

mod order;

pub use order::{Order, Status, Step};
use shop_events::{
    EmailKind, EmailRequested, OrderConfirmed, OrderPlaced, OrderRejected, PaymentAuthorized, PaymentDeclined,
    PaymentRequested, topics, types,
};
use shop_sdk::{Event, HandleError, Host, Level, Outgoing, Request, Response, Service};

/// The order service.
pub struct OrderService;

fn order_key(order_id: &str) -> String {
    format!("order/{order_id}")
}

impl Service for OrderService {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        match event.event_type.as_str() {
            types::ORDER_PLACED => placed(host, event, event.payload_json()?),
            types::PAYMENT_AUTHORIZED => authorized(host, event, event.payload_json()?),
            types::PAYMENT_DECLINED => declined(host, event, event.payload_json()?),
            // Our own events and the commands we sent come back on the
            // topics we consume: nothing to do.
            _ => Ok(Vec::new()),
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["orders", id]) => match host.get_json::<Order>(&order_key(id)) {
                Ok(Some(mut order)) => {
                    order.card_number.clear();
                    Response::json(200, &order)
                }
                Ok(None) => Response::not_found(&format!("no order {id}")),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            _ => Response::not_found("unknown route; try GET /orders/{id}"),
        }
    }
}

fn placed(host: &mut impl Host, event: &Event, placed: OrderPlaced) -> Result<Vec<Outgoing>, HandleError> {
    let key = order_key(&placed.order_id);
    if host.get(&key)?.is_some() {
        host.log(Level::Debug, "duplicate OrderPlaced ignored", &[("order_id", &placed.order_id)]);
        return Ok(Vec::new());
    }
    let order = Order::place(placed, &event.id, host.now_ms());
    host.put_json(&key, &order)?;
    let request = PaymentRequested {
        order_id: order.order_id.clone(),
        amount_cents: order.total_cents,
        card_number: order.card_number.clone(),
    };
    Ok(vec![Outgoing::json(topics::PAYMENTS, types::PAYMENT_REQUESTED, &order.order_id, &request)?])
}

/// Loads the order an answer refers to, or explains why the answer is dropped.
fn pending_order(host: &impl Host, order_id: &str, event: &Event) -> Result<Option<Order>, HandleError> {
    let Some(order) = host.get_json::<Order>(&order_key(order_id))? else {
        // An answer can only follow our own request, which we record first:
        // an unknown order means a foreign or corrupt event.
        return Err(HandleError::Permanent(format!("{} for unknown order {order_id}", event.event_type)));
    };
    if order.status != Status::Pending {
        host.log(
            Level::Debug,
            "answer for a settled order ignored",
            &[("order_id", order_id), ("event_type", &event.event_type)],
        );
        return Ok(None);
    }
    Ok(Some(order))
}

fn authorized(host: &mut impl Host, event: &Event, paid: PaymentAuthorized) -> Result<Vec<Outgoing>, HandleError> {
    let Some(mut order) = pending_order(host, &paid.order_id, event)? else {
        return Ok(Vec::new());
    };
    order.advance(Status::Confirmed, &event.id, host.now_ms(), format!("payment {} authorized", paid.payment_id));
    order.payment_id = Some(paid.payment_id.clone());
    let confirmed = OrderConfirmed {
        order_id: order.order_id.clone(),
        total_cents: order.total_cents,
        payment_id: paid.payment_id,
    };
    let outcome = Outgoing::json(topics::ORDERS, types::ORDER_CONFIRMED, &order.order_id, &confirmed)?;
    settle(host, &order, outcome, EmailKind::OrderConfirmed, None)
}

fn declined(host: &mut impl Host, event: &Event, declined: PaymentDeclined) -> Result<Vec<Outgoing>, HandleError> {
    let Some(mut order) = pending_order(host, &declined.order_id, event)? else {
        return Ok(Vec::new());
    };
    order.advance(Status::Rejected, &event.id, host.now_ms(), format!("payment declined: {}", declined.code));
    order.reason = Some(declined.reason.clone());
    let rejected = OrderRejected {
        order_id: order.order_id.clone(),
        total_cents: order.total_cents,
        reason: declined.reason.clone(),
    };
    let outcome = Outgoing::json(topics::ORDERS, types::ORDER_REJECTED, &order.order_id, &rejected)?;
    settle(host, &order, outcome, EmailKind::OrderRejected, Some(declined.reason))
}

/// Records a settled order and emits its outcome and the matching email request.
fn settle(
    host: &mut impl Host,
    order: &Order,
    outcome: Outgoing,
    kind: EmailKind,
    reason: Option<String>,
) -> Result<Vec<Outgoing>, HandleError> {
    host.put_json(&order_key(&order.order_id), order)?;
    let email = Outgoing::json(topics::EMAILS, types::EMAIL_REQUESTED, &order.order_id, &email(order, kind, reason))?;
    Ok(vec![outcome, email])
}

fn email(order: &Order, kind: EmailKind, reason: Option<String>) -> EmailRequested {
    EmailRequested {
        order_id: order.order_id.clone(),
        kind,
        to: order.customer.email.clone(),
        customer_name: order.customer.name.clone(),
        items: order.items.clone(),
        total_cents: order.total_cents,
        reason,
    }
}

shop_sdk::export_service!(OrderService);

#[cfg(test)]
mod tests;
