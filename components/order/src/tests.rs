use super::*;
use shop_events::{Customer, LineItem};
use shop_sdk::MemoryHost;

fn placed_event(order_id: &str) -> Event {
    let placed = OrderPlaced {
        order_id: order_id.into(),
        customer: Customer { name: "Ada".into(), email: "ada@example.com".into() },
        items: vec![LineItem { sku: "book".into(), quantity: 2, unit_price_cents: 1250 }],
        total_cents: 2500,
        card_number: "4242424242424242".into(),
    };
    Event::json("evt-placed", topics::ORDERS, types::ORDER_PLACED, order_id, &placed)
}

fn authorized_event(order_id: &str) -> Event {
    let paid = PaymentAuthorized {
        order_id: order_id.into(),
        payment_id: "pay_1".into(),
        amount_cents: 2500,
        card_last4: "4242".into(),
    };
    Event::json("evt-auth", topics::PAYMENTS, types::PAYMENT_AUTHORIZED, order_id, &paid)
}

fn declined_event(order_id: &str) -> Event {
    let declined = PaymentDeclined {
        order_id: order_id.into(),
        amount_cents: 2500,
        code: "card_declined".into(),
        reason: "the card was declined".into(),
    };
    Event::json("evt-decl", topics::PAYMENTS, types::PAYMENT_DECLINED, order_id, &declined)
}

fn order(host: &MemoryHost, id: &str) -> Order {
    host.get_json(&order_key(id)).unwrap().unwrap()
}

#[test]
fn placed_order_is_pending_and_requests_payment() {
    let mut host = MemoryHost::at(10);
    let out = OrderService::handle(&mut host, &placed_event("o1")).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].topic.as_str(), out[0].event_type.as_str()), (topics::PAYMENTS, types::PAYMENT_REQUESTED));
    let req: PaymentRequested = out[0].payload_json().unwrap();
    assert_eq!((req.amount_cents, req.card_number.as_str()), (2500, "4242424242424242"));
    assert_eq!(order(&host, "o1").status, Status::Pending);
}

#[test]
fn authorization_confirms_and_requests_the_confirmation_email() {
    let mut host = MemoryHost::at(10);
    OrderService::handle(&mut host, &placed_event("o1")).unwrap();
    host.now_ms = 20;
    let out = OrderService::handle(&mut host, &authorized_event("o1")).unwrap();
    let kinds: Vec<_> = out.iter().map(|o| (o.topic.as_str(), o.event_type.as_str())).collect();
    assert_eq!(kinds, [(topics::ORDERS, types::ORDER_CONFIRMED), (topics::EMAILS, types::EMAIL_REQUESTED)]);
    let email: EmailRequested = out[1].payload_json().unwrap();
    assert_eq!((email.kind, email.to.as_str()), (EmailKind::OrderConfirmed, "ada@example.com"));
    let o = order(&host, "o1");
    assert_eq!(o.status, Status::Confirmed);
    assert_eq!(
        o.history.iter().map(|s| (s.status, s.at_ms)).collect::<Vec<_>>(),
        [(Status::Pending, 10), (Status::Confirmed, 20)]
    );
    assert!(o.card_number.is_empty(), "card number dropped once final");
}

#[test]
fn decline_rejects_and_requests_the_rejection_email() {
    let mut host = MemoryHost::default();
    OrderService::handle(&mut host, &placed_event("o1")).unwrap();
    let out = OrderService::handle(&mut host, &declined_event("o1")).unwrap();
    assert_eq!(out[0].event_type, types::ORDER_REJECTED);
    let email: EmailRequested = out[1].payload_json().unwrap();
    assert_eq!((email.kind, email.reason.as_deref()), (EmailKind::OrderRejected, Some("the card was declined")));
    assert_eq!(order(&host, "o1").status, Status::Rejected);
}

#[test]
fn duplicates_and_late_answers_change_nothing() {
    let mut host = MemoryHost::default();
    OrderService::handle(&mut host, &placed_event("o1")).unwrap();
    assert_eq!(OrderService::handle(&mut host, &placed_event("o1")).unwrap(), vec![]);
    OrderService::handle(&mut host, &authorized_event("o1")).unwrap();
    let settled = order(&host, "o1");
    assert_eq!(OrderService::handle(&mut host, &authorized_event("o1")).unwrap(), vec![]);
    assert_eq!(OrderService::handle(&mut host, &declined_event("o1")).unwrap(), vec![]);
    assert_eq!(order(&host, "o1"), settled);
}

#[test]
fn answer_for_unknown_order_is_permanent() {
    let mut host = MemoryHost::default();
    let err = OrderService::handle(&mut host, &authorized_event("nope")).unwrap_err();
    assert!(matches!(err, HandleError::Permanent(msg) if msg.contains("unknown order nope")));
}

#[test]
fn query_shows_order_without_card_number() {
    let mut host = MemoryHost::default();
    OrderService::handle(&mut host, &placed_event("o1")).unwrap();
    OrderService::handle(&mut host, &authorized_event("o1")).unwrap();
    let resp = OrderService::query(&host, &Request::get("/orders/o1"));
    assert_eq!(resp.status, 200);
    let body: serde_json::Value = resp.body_json().unwrap();
    assert_eq!(body["status"], "CONFIRMED");
    assert!(body.get("card_number").is_none());
    assert_eq!(OrderService::query(&host, &Request::get("/orders/zzz")).status, 404);
    assert_eq!(OrderService::query(&host, &Request::get("/nope")).status, 404);
}
