//! Saga tests: a [`Shop`] drives the order service on a [`MemoryHost`],
//! firing its timers as the clock moves, and keeps every input and output.

use super::*;
use shop_events::{
    CardToken, Customer, EmailKind, EmailRequested, IdempotencyBinding, LineItem, OrderCancelled, OrderPlaced,
    OrderRejected, PaymentAuthorized, PaymentDeclined, PaymentRefundRequested, PaymentRefunded, PaymentRequested,
    PaymentVoidRequested, PaymentVoided, topics,
};
use shop_sdk::{Level, MemoryHost};

struct Shop {
    host: MemoryHost,
    inputs: Vec<Event>,
    out: Vec<Outgoing>,
}

impl Shop {
    fn new(config: &[(&str, &str)]) -> Self {
        let mut host = MemoryHost::at(1_000).with_config("catalog", CATALOG);
        for (key, value) in config {
            host = host.with_config(key, value);
        }
        Self { host, inputs: Vec::new(), out: Vec::new() }
    }

    fn send(&mut self, event: Event) -> Vec<Outgoing> {
        let out = OrderService::handle(&mut self.host, &event).unwrap();
        self.inputs.push(event);
        self.out.extend(out.clone());
        out
    }

    /// Moves the clock to `now_ms` and delivers the timers due by then.
    fn tick(&mut self, now_ms: u64) -> Vec<Outgoing> {
        self.host.now_ms = now_ms;
        let mut out = Vec::new();
        for event in self.host.take_due() {
            out.extend(self.send(event));
        }
        out
    }

    fn order(&self, id: &str) -> Order {
        self.host.get_json(&order_key(id)).unwrap().unwrap()
    }

    fn emails(&self, order_id: &str) -> Vec<EmailRequested> {
        self.out
            .iter()
            .filter(|o| o.event_type == types::EMAIL_REQUESTED)
            .map(|o| o.payload_json::<EmailRequested>().unwrap())
            .filter(|e| e.order_id == order_id)
            .collect()
    }

    fn timer_at(&self, id: &str) -> Option<u64> {
        self.host.timers.get(id).map(|t| t.at_ms)
    }
}

/// What the tests' shop sells.
const CATALOG: &str = "book | Book | 1250; sold-out | Sold out | 1250; mug | Mug | 1250; lamp | Lamp | 3400";

fn card() -> CardToken {
    CardToken { token: "tok_1".into(), brand: "visa".into(), last4: "4242".into() }
}

fn placed(order_id: &str, items: &[(&str, u32)]) -> Event {
    let items: Vec<LineItem> = items
        .iter()
        .map(|(sku, quantity)| LineItem { sku: (*sku).into(), quantity: *quantity, unit_price_cents: 1250 })
        .collect();
    let placed = OrderPlaced {
        order_id: order_id.into(),
        customer: Customer { name: "Ada".into(), email: "ada@example.com".into() },
        total_cents: shop_events::total_cents(&items),
        items,
        card: card(),
        idempotency: None,
    };
    Event::json(&format!("placed-{order_id}"), topics::ORDERS, types::ORDER_PLACED, order_id, &placed)
}

fn book(order_id: &str) -> Event {
    placed(order_id, &[("book", 2)])
}

fn authorized(order_id: &str) -> Event {
    let paid = PaymentAuthorized {
        order_id: order_id.into(),
        payment_id: format!("pay_{order_id}"),
        amount_cents: 2500,
        card_last4: "4242".into(),
    };
    Event::json(&format!("auth-{order_id}"), topics::PAYMENTS, types::PAYMENT_AUTHORIZED, order_id, &paid)
}

fn declined(order_id: &str) -> Event {
    let declined = PaymentDeclined {
        order_id: order_id.into(),
        amount_cents: 2500,
        code: "card_declined".into(),
        reason: "the card was declined".into(),
    };
    Event::json(&format!("decl-{order_id}"), topics::PAYMENTS, types::PAYMENT_DECLINED, order_id, &declined)
}

fn refunded(order_id: &str) -> Event {
    let refunded =
        PaymentRefunded { order_id: order_id.into(), payment_id: format!("pay_{order_id}"), refunded_cents: 2500 };
    Event::json(&format!("refunded-{order_id}"), topics::PAYMENTS, types::PAYMENT_REFUNDED, order_id, &refunded)
}

fn voided(order_id: &str, refunded_cents: u64) -> Event {
    let voided = PaymentVoided { order_id: order_id.into(), refunded_cents, note: "n".into() };
    Event::json(&format!("voided-{order_id}"), topics::PAYMENTS, types::PAYMENT_VOIDED, order_id, &voided)
}

fn kinds(out: &[Outgoing]) -> Vec<&str> {
    out.iter().map(|o| o.event_type.as_str()).collect()
}

fn statuses(order: &Order) -> Vec<Status> {
    order.history.iter().map(|s| s.status).collect()
}

fn notes(order: &Order) -> Vec<&str> {
    order.history.iter().map(|s| s.note.as_str()).collect()
}

/// Every input again, first with the same ids, then as new messages with
/// new ids: nothing is emitted and no state or timer changes.
fn assert_duplicates_change_nothing(shop: &mut Shop) {
    let state = |host: &MemoryHost| -> Vec<(String, String)> {
        host.state.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect()
    };
    let (before, timers) = (state(&shop.host), shop.host.timers.clone());
    for mut event in shop.inputs.clone() {
        assert_eq!(OrderService::handle(&mut shop.host, &event).unwrap(), vec![], "redelivered {}", event.id);
        event.id = format!("retry-{}", event.id);
        assert_eq!(OrderService::handle(&mut shop.host, &event).unwrap(), vec![], "re-sent {}", event.id);
    }
    assert_eq!(state(&shop.host), before);
    assert_eq!(shop.host.timers, timers);
}

#[test]
fn placed_order_is_pending_requests_payment_and_sets_its_deadline() {
    let mut shop = Shop::new(&[("payment_deadline_ms", "5000")]);
    let out = shop.send(book("o1"));
    assert_eq!((out[0].topic.as_str(), kinds(&out)), (topics::PAYMENTS, vec![types::PAYMENT_REQUESTED]));
    let req: PaymentRequested = out[0].payload_json().unwrap();
    assert_eq!((req.amount_cents, &req.card, req.deadline_ms), (2500, &card(), Some(6_000)));
    let order = shop.order("o1");
    assert_eq!((order.status, order.deadline_ms), (Status::Pending, Some(6_000)));
    let timer = &shop.host.timers[&deadline_timer("o1")];
    assert_eq!((timer.at_ms, timer.event_type.as_str(), timer.key.as_str()), (6_000, PAYMENT_DEADLINE, "o1"));
    assert_eq!(shop.host.timers.len(), 1);
}

#[test]
fn authorization_reserves_stock_confirms_and_requests_one_email() {
    let mut shop = Shop::new(&[("stock", "book=5,pen=0")]);
    shop.send(book("o1"));
    shop.host.now_ms = 2_000;
    let out = shop.send(authorized("o1"));
    assert_eq!(kinds(&out), [types::ORDER_CONFIRMED, types::EMAIL_REQUESTED]);
    let email: EmailRequested = out[1].payload_json().unwrap();
    assert_eq!((email.kind, email.to.as_str()), (EmailKind::OrderConfirmed, "ada@example.com"));
    let order = shop.order("o1");
    assert_eq!(statuses(&order), [Status::Pending, Status::Pending, Status::StockReserved, Status::Confirmed]);
    assert_eq!(notes(&order)[1], "payment pay_o1 authorized");
    assert_eq!(order.history[3].at_ms, 2_000);
    assert_eq!(order.reserved, [Reservation { sku: "book".into(), quantity: 2 }]);
    assert_eq!(order.card, Some(CardShown { brand: "visa".into(), last4: "4242".into() }), "never the token");
    assert_eq!(shop.host.get_json::<u64>(&stock_key("book")).unwrap(), Some(3));
    assert!(shop.host.timers.is_empty(), "deadline cancelled");
    assert_eq!(shop.tick(100_000), vec![]);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.host.get_json::<u64>(&stock_key("book")).unwrap(), Some(3), "reserved once");
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn decline_rejects_and_requests_the_rejection_email() {
    let mut shop = Shop::new(&[]);
    shop.send(book("o1"));
    let out = shop.send(declined("o1"));
    assert_eq!(kinds(&out), [types::ORDER_REJECTED, types::EMAIL_REQUESTED]);
    let email: EmailRequested = out[1].payload_json().unwrap();
    assert_eq!((email.kind, email.reason.as_deref()), (EmailKind::OrderRejected, Some("the card was declined")));
    assert_eq!(shop.order("o1").status, Status::Rejected);
    assert!(shop.host.timers.is_empty(), "deadline cancelled");
    assert_eq!(shop.tick(100_000), vec![]);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn out_of_stock_after_payment_refunds_then_cancels() {
    let mut shop = Shop::new(&[("stock", "book=1"), ("compensation_retry_ms", "500")]);
    shop.send(book("o1"));
    let out = shop.send(authorized("o1"));
    assert_eq!(kinds(&out), [types::PAYMENT_REFUND_REQUESTED]);
    let refund: PaymentRefundRequested = out[0].payload_json().unwrap();
    assert_eq!((refund.amount_cents, refund.reason.as_str()), (2500, "out of stock: book"));
    let order = shop.order("o1");
    assert_eq!(order.status, Status::Compensating);
    assert_eq!(order.compensation, Some(Compensation { kind: CompensationKind::Refund, done: false, attempts: 1 }));
    assert!(order.reserved.is_empty());
    assert_eq!(shop.host.get_json::<u64>(&stock_key("book")).unwrap(), None, "stock untouched");
    assert_eq!(shop.timer_at(&compensation_timer("o1")), Some(1_500));
    assert_eq!(shop.timer_at(&deadline_timer("o1")), None);

    let out = shop.send(refunded("o1"));
    assert_eq!(kinds(&out), [types::ORDER_CANCELLED, types::EMAIL_REQUESTED]);
    let cancelled: OrderCancelled = out[0].payload_json().unwrap();
    assert_eq!((cancelled.total_cents, cancelled.reason.as_str()), (2500, "out of stock: book"));
    let email: EmailRequested = out[1].payload_json().unwrap();
    assert_eq!((email.kind, email.reason.as_deref()), (EmailKind::OrderCancelled, Some("out of stock: book")));
    let order = shop.order("o1");
    assert_eq!(order.status, Status::Cancelled);
    assert_eq!(order.reason.as_deref(), Some("out of stock: book"));
    assert!(order.compensation.as_ref().is_some_and(|c| c.done));
    assert!(notes(&order).contains(&"refund requested") && notes(&order).contains(&"refund done: 2500 cents"));
    assert!(shop.host.timers.is_empty(), "retry cancelled");
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn reservation_is_all_or_nothing_and_unlisted_skus_are_unlimited() {
    let mut shop = Shop::new(&[("stock", "book=3,sold-out=0")]);
    shop.send(placed("o1", &[("book", 1), ("sold-out", 1), ("mug", 100)]));
    assert_eq!(kinds(&shop.send(authorized("o1"))), [types::PAYMENT_REFUND_REQUESTED]);
    assert_eq!(shop.order("o1").reason.as_deref(), Some("out of stock: sold-out"));
    assert_eq!(shop.host.get_json::<u64>(&stock_key("book")).unwrap(), None, "book not taken");
    // Two lines of one SKU count together: 2 + 2 > 3.
    shop.send(placed("o2", &[("book", 2), ("book", 2)]));
    assert_eq!(kinds(&shop.send(authorized("o2"))), [types::PAYMENT_REFUND_REQUESTED]);
    shop.send(placed("o3", &[("book", 2), ("book", 1), ("mug", 1_000)]));
    assert_eq!(kinds(&shop.send(authorized("o3"))), [types::ORDER_CONFIRMED, types::EMAIL_REQUESTED]);
    assert_eq!(shop.host.get_json::<u64>(&stock_key("book")).unwrap(), Some(0));
    assert_eq!(shop.host.get_json::<u64>(&stock_key("mug")).unwrap(), None);
    let stock: serde_json::Value = OrderService::query(&shop.host, &Request::get("/stock/book")).body_json().unwrap();
    assert_eq!(stock, serde_json::json!({"sku": "book", "remaining": 0}));
    let stock: serde_json::Value = OrderService::query(&shop.host, &Request::get("/stock/mug")).body_json().unwrap();
    assert_eq!(stock["remaining"], serde_json::Value::Null, "unlimited");
}

#[test]
fn no_answer_by_the_deadline_cancels_and_voids() {
    let mut shop = Shop::new(&[("payment_deadline_ms", "3000"), ("compensation_retry_ms", "500")]);
    shop.send(book("o1"));
    assert_eq!(shop.tick(3_999), vec![], "not yet");
    let out = shop.tick(4_000);
    assert_eq!(kinds(&out), [types::PAYMENT_VOID_REQUESTED, types::ORDER_CANCELLED], "the email waits for the void");
    let void: PaymentVoidRequested = out[0].payload_json().unwrap();
    assert_eq!(void.reason, "no answer from payment within 3000 ms");
    let order = shop.order("o1");
    assert_eq!(order.status, Status::Cancelled);
    assert_eq!(order.compensation, Some(Compensation { kind: CompensationKind::Void, done: false, attempts: 1 }));
    assert!(notes(&order).contains(&"payment deadline passed"));
    assert_eq!(shop.timer_at(&compensation_timer("o1")), Some(4_500));

    // The payment service captured before it saw the void: a note only.
    assert_eq!(shop.send(authorized("o1")), vec![]);
    assert_eq!(shop.send(declined("o1")), vec![]);
    let order = shop.order("o1");
    assert_eq!(order.status, Status::Cancelled);
    assert!(notes(&order).contains(&"late authorization of pay_o1, void requested"), "{:?}", notes(&order));
    // The void refunded a capture that beat the deadline: the email says so.
    let out = shop.send(voided("o1", 2500));
    assert_eq!(kinds(&out), [types::EMAIL_REQUESTED]);
    let email: EmailRequested = out[0].payload_json().unwrap();
    let expected = "no answer from payment within 3000 ms; the payment taken meanwhile was refunded in full";
    assert_eq!((email.kind, email.reason.as_deref()), (EmailKind::OrderCancelled, Some(expected)));
    assert_eq!(shop.send(voided("o1", 2500)), vec![], "once");
    let order = shop.order("o1");
    assert!(order.compensation.as_ref().is_some_and(|c| c.done));
    assert!(notes(&order).iter().any(|n| n.starts_with("void confirmed, 2500 cents refunded")));
    assert!(shop.host.timers.is_empty(), "retry cancelled");
    assert_eq!(shop.tick(1_000_000), vec![]);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn a_decline_for_lateness_is_the_deadline_passing() {
    // Payment saw the request after its deadline before the order's own
    // deadline timer fired (the host was down, or the timer is a poll late).
    let mut shop = Shop::new(&[("payment_deadline_ms", "3000"), ("compensation_retry_ms", "500")]);
    shop.send(book("o1"));
    let mut late = declined("o1");
    let payload = PaymentDeclined {
        order_id: "o1".into(),
        amount_cents: 2500,
        code: shop_events::codes::DEADLINE_PASSED.into(),
        reason: "the payment request arrived after its deadline".into(),
    };
    late.payload = serde_json::to_vec(&payload).unwrap();
    let out = shop.send(late);
    assert_eq!(kinds(&out), [types::PAYMENT_VOID_REQUESTED, types::ORDER_CANCELLED]);
    let order = shop.order("o1");
    assert_eq!(order.status, Status::Cancelled);
    assert_eq!(order.reason.as_deref(), Some("no answer from payment within 3000 ms"));
    assert_eq!(shop.timer_at(&deadline_timer("o1")), None, "the deadline timer is cancelled");
    assert_eq!(kinds(&shop.tick(4_000)), [types::PAYMENT_VOID_REQUESTED], "only the void retry is left");
    let email: EmailRequested = shop.send(voided("o1", 0))[0].payload_json().unwrap();
    assert_eq!(email.kind, EmailKind::OrderCancelled);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn unconfirmed_refund_is_requested_again_with_doubling_delays() {
    let mut shop = Shop::new(&[("stock", "book=0"), ("compensation_retry_ms", "1000")]);
    shop.send(book("o1"));
    let first = shop.send(authorized("o1"));
    let mut fired_at = Vec::new();
    for now in [2_000, 4_000, 8_000, 16_000] {
        assert_eq!(shop.tick(now - 1), vec![], "too early at {now}");
        let out = shop.tick(now);
        assert_eq!(out, first, "same request again at {now}");
        fired_at.push(now);
    }
    assert_eq!(shop.timer_at(&compensation_timer("o1")), Some(32_000));
    assert_eq!(shop.order("o1").compensation.map(|c| c.attempts), Some(5));
    assert_eq!(kinds(&shop.send(refunded("o1"))), [types::ORDER_CANCELLED, types::EMAIL_REQUESTED]);
    assert_eq!(shop.tick(1_000_000), vec![], "no more retries once refunded");
    // A retry event still in flight when the refund arrived does nothing.
    let late = Event::json("late", TIMER_TOPIC, COMPENSATION_RETRY, "o1", &OrderTimer { order_id: "o1".into() });
    assert_eq!(shop.send(late), vec![]);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn unconfirmed_void_is_requested_again_until_answered() {
    let mut shop = Shop::new(&[("payment_deadline_ms", "1000"), ("compensation_retry_ms", "40000")]);
    shop.send(book("o1"));
    let void = shop.tick(2_000).remove(0);
    assert_eq!(void.event_type, types::PAYMENT_VOID_REQUESTED);
    assert_eq!(shop.tick(42_000), vec![void.clone()]);
    assert_eq!(shop.timer_at(&compensation_timer("o1")), Some(42_000 + 60_000), "capped");
    let email: EmailRequested = shop.send(voided("o1", 0))[0].payload_json().unwrap();
    assert_eq!(email.reason.as_deref(), Some("no answer from payment within 1000 ms"), "nothing was taken");
    assert_eq!(shop.tick(1_000_000), vec![]);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn answers_before_their_order_are_kept_and_applied_when_it_arrives() {
    let mut early = Shop::new(&[]);
    assert_eq!(early.send(authorized("o1")), vec![]);
    assert!(early.host.get(&early_key("o1", types::PAYMENT_AUTHORIZED)).unwrap().is_some());
    let out = early.send(book("o1"));
    assert_eq!(kinds(&out), [types::PAYMENT_REQUESTED, types::ORDER_CONFIRMED, types::EMAIL_REQUESTED]);
    assert!(early.host.list_keys("early/", 10).unwrap().is_empty(), "kept answers are deleted");
    assert!(early.host.timers.is_empty(), "no deadline for a settled order");

    let mut in_order = Shop::new(&[]);
    in_order.send(book("o1"));
    in_order.send(authorized("o1"));
    assert_eq!(early.out, in_order.out);
    assert_eq!(statuses(&early.order("o1")), statuses(&in_order.order("o1")));
    assert_eq!(early.host.timers, in_order.host.timers);
    assert_duplicates_change_nothing(&mut early);
}

#[test]
fn early_decline_and_early_refund_converge() {
    let mut shop = Shop::new(&[("stock", "book=0")]);
    shop.send(declined("o1"));
    assert_eq!(
        kinds(&shop.send(book("o1"))),
        [types::PAYMENT_REQUESTED, types::ORDER_REJECTED, types::EMAIL_REQUESTED]
    );
    assert_eq!(shop.order("o1").status, Status::Rejected);

    // Refund answer first, then the authorization, then the order.
    shop.send(refunded("o2"));
    shop.send(authorized("o2"));
    let out = shop.send(book("o2"));
    assert_eq!(
        kinds(&out),
        [types::PAYMENT_REQUESTED, types::PAYMENT_REFUND_REQUESTED, types::ORDER_CANCELLED, types::EMAIL_REQUESTED]
    );
    let order = shop.order("o2");
    assert_eq!(order.status, Status::Cancelled);
    assert!(order.compensation.is_some_and(|c| c.done));
    assert!(shop.host.timers.is_empty());
    assert!(shop.host.list_keys("early/", 10).unwrap().is_empty());
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!((shop.emails("o1").len(), shop.emails("o2").len()), (1, 1));
}

#[test]
fn duplicate_order_placed_under_a_new_id_is_ignored() {
    let mut shop = Shop::new(&[]);
    shop.send(book("o1"));
    let mut again = book("o1");
    again.id = "gateway-retry".into();
    assert_eq!(shop.send(again), vec![]);
    assert_eq!(shop.order("o1").history.len(), 1);
}

#[test]
fn timers_of_unknown_orders_and_unknown_events_are_ignored() {
    let mut shop = Shop::new(&[]);
    for event_type in [PAYMENT_DEADLINE, COMPENSATION_RETRY, "Other"] {
        let timer = Event::json("t", TIMER_TOPIC, event_type, "nope", &OrderTimer { order_id: "nope".into() });
        assert_eq!(shop.send(timer), vec![]);
    }
    let own = Event::json("x", topics::PAYMENTS, types::PAYMENT_REQUESTED, "o1", &serde_json::json!({}));
    assert_eq!(shop.send(own), vec![]);
    assert!(shop.host.state.is_empty());
}

#[test]
fn malformed_config_and_payloads_are_permanent() {
    let mut host = MemoryHost::default().with_config("stock", "book");
    let err = OrderService::handle(&mut host, &book("o1")).unwrap_err();
    assert!(matches!(&err, HandleError::Permanent(msg) if msg.contains("\"stock\"")), "{err}");
    for key in ["payment_deadline_ms", "compensation_retry_ms"] {
        let mut host = MemoryHost::default().with_config(key, "0");
        let err = OrderService::handle(&mut host, &book("o1")).unwrap_err();
        assert!(matches!(&err, HandleError::Permanent(msg) if msg.contains(key) && msg.contains("greater than 0")));
    }
    let mut host = MemoryHost::default();
    let mut bad = authorized("o1");
    bad.payload = b"{}".to_vec();
    assert!(matches!(OrderService::handle(&mut host, &bad), Err(HandleError::Permanent(_))));
}

#[test]
fn query_shows_order_without_card_token() {
    let mut shop = Shop::new(&[("stock", "book=0")]);
    shop.send(book("o1"));
    let pending: serde_json::Value = OrderService::query(&shop.host, &Request::get("/orders/o1")).body_json().unwrap();
    assert_eq!(pending["card"], serde_json::json!({"brand": "visa", "last4": "4242"}));
    assert!(!pending.to_string().contains("tok_1"), "{pending}");
    shop.send(authorized("o1"));
    let resp = OrderService::query(&shop.host, &Request::get("/orders/o1"));
    assert_eq!(resp.status, 200);
    let body: serde_json::Value = resp.body_json().unwrap();
    assert_eq!(body["status"], "COMPENSATING");
    assert_eq!(body["compensation"], serde_json::json!({"kind": "refund", "done": false, "attempts": 1}));
    assert_eq!(body["reason"], "out of stock: book");
    assert_eq!(body["history"][0]["at_ms"], 1_000);
    assert!(!body.to_string().contains("tok_1"), "{body}");
    assert_eq!(OrderService::query(&shop.host, &Request::get("/orders/zzz")).status, 404);
    assert_eq!(OrderService::query(&shop.host, &Request::get("/nope")).status, 404);
}

fn keyed(order_id: &str, event_id: &str, key_digest: &str, request_hash: &str) -> Event {
    let mut placed: OrderPlaced = book(order_id).payload_json().unwrap();
    placed.idempotency = Some(IdempotencyBinding { key_digest: key_digest.into(), request_hash: request_hash.into() });
    Event::json(event_id, topics::ORDERS, types::ORDER_PLACED, order_id, &placed)
}

#[test]
fn a_key_is_bound_to_its_first_request_and_another_body_is_ignored() {
    let mut shop = Shop::new(&[]);
    assert_eq!(kinds(&shop.send(keyed("o1", "e1", "k1", "h1"))), [types::PAYMENT_REQUESTED]);
    assert_eq!(shop.order("o1").request_hash.as_deref(), Some("h1"));
    let bound: serde_json::Value =
        OrderService::query(&shop.host, &Request::get("/idempotency/k1")).body_json().unwrap();
    assert_eq!(bound, serde_json::json!({ "request_hash": "h1" }), "only the hash, never the order id");
    assert_eq!(OrderService::query(&shop.host, &Request::get("/idempotency/k2")).status, 404);

    // A different body under the same key has another id (the gateway
    // derives it from both): it raced the first, and is never placed.
    assert!(shop.send(keyed("o2", "e2", "k1", "h2")).is_empty());
    assert_eq!(OrderService::query(&shop.host, &Request::get("/orders/o2")).status, 404);
    assert!(
        shop.host.logs.borrow().iter().any(|(level, line)| *level == Level::Warn && line.contains("order_id=o2")),
        "the ignored order is logged"
    );
    // The same request again is the same order: a duplicate.
    assert!(shop.send(keyed("o1", "e3", "k1", "h1")).is_empty());
    let bound: serde_json::Value =
        OrderService::query(&shop.host, &Request::get("/idempotency/k1")).body_json().unwrap();
    assert_eq!(bound["request_hash"], "h1");
    // An order placed without a key binds nothing.
    shop.send(book("o3"));
    assert_eq!(shop.order("o3").request_hash, None);
}

fn priced(order_id: &str, sku: &str, quantity: u32, unit_price_cents: u64) -> Event {
    let items = vec![LineItem { sku: sku.into(), quantity, unit_price_cents }];
    let placed = OrderPlaced {
        order_id: order_id.into(),
        customer: Customer { name: "Ada".into(), email: "ada@example.com".into() },
        total_cents: shop_events::total_cents(&items),
        items,
        card: card(),
        idempotency: None,
    };
    Event::json(&format!("placed-{order_id}"), topics::ORDERS, types::ORDER_PLACED, order_id, &placed)
}

#[test]
fn an_order_not_at_the_catalog_price_is_rejected_without_payment_or_stock() {
    let mut shop = Shop::new(&[("stock", "lamp=3")]);
    // The order: a lamp at one cent.
    let out = shop.send(priced("o1", "lamp", 3, 1));
    assert_eq!(kinds(&out), [types::ORDER_REJECTED, types::EMAIL_REQUESTED], "no PaymentRequested");
    let rejected: OrderRejected = out[0].payload_json().unwrap();
    assert_eq!(rejected.reason, "the price of lamp is 34.00, not the 0.01 the order was placed at");
    let order = shop.order("o1");
    assert_eq!((order.status, order.deadline_ms), (Status::Rejected, None));
    assert!(shop.host.timers.is_empty(), "no payment deadline");
    let lamp: serde_json::Value = OrderService::query(&shop.host, &Request::get("/stock/lamp")).body_json().unwrap();
    assert_eq!(lamp["remaining"], 3, "stock untouched");
    // A SKU the catalog does not list is rejected the same way.
    let out = shop.send(priced("o2", "unicorn", 1, 1250));
    let rejected: OrderRejected = out[0].payload_json().unwrap();
    assert_eq!(rejected.reason, "unicorn is not sold here");
    // At the catalog's price it sells, charged what the catalog says.
    let out = shop.send(priced("o3", "lamp", 2, 3400));
    let request: PaymentRequested = out[0].payload_json().unwrap();
    assert_eq!(request.amount_cents, 6800);
    assert_duplicates_change_nothing(&mut shop);
    assert_eq!(shop.emails("o1").len(), 1);
}

#[test]
fn the_event_total_is_not_trusted() {
    let mut shop = Shop::new(&[]);
    let mut event = priced("o1", "book", 2, 1250);
    let mut placed: OrderPlaced = event.payload_json().unwrap();
    placed.total_cents = 1;
    event.payload = serde_json::to_vec(&placed).unwrap();
    let request: PaymentRequested = shop.send(event)[0].payload_json().unwrap();
    assert_eq!(request.amount_cents, 2500);
    assert_eq!(shop.order("o1").total_cents, 2500);
}

#[test]
fn catalog_route_lists_prices_and_what_is_left() {
    let mut shop = Shop::new(&[("stock", "book=5")]);
    shop.send(book("o1"));
    shop.send(authorized("o1"));
    let resp = OrderService::query(&shop.host, &Request::get("/catalog"));
    assert_eq!(resp.status, 200);
    let body: serde_json::Value = resp.body_json().unwrap();
    let book = body["items"].as_array().unwrap().iter().find(|i| i["sku"] == "book").unwrap().clone();
    assert_eq!(book, serde_json::json!({"sku": "book", "name": "Book", "unit_price_cents": 1250, "remaining": 3}));
    let lamp = body["items"].as_array().unwrap().iter().find(|i| i["sku"] == "lamp").unwrap().clone();
    assert_eq!(lamp["remaining"], serde_json::Value::Null, "unlimited");
    let broken = MemoryHost::default().with_config("catalog", "book");
    assert_eq!(OrderService::query(&broken, &Request::get("/catalog")).status, 500);
}
