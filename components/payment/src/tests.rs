use super::*;
use shop_sdk::MemoryHost;

const GOOD: &str = "4242 4242 4242 4242";

/// Every card the tests pay with, in the host's vault twin.
const CARDS: [&str; 4] = [GOOD, "4000000000000002", "4242424242424242", "4000000000009995"];

/// The token the tests' vault holds `card` under.
fn token_of(card: &str) -> String {
    format!("tok_{}", shop_events::card::normalize(card))
}

/// A host at `now_ms` whose vault holds [`CARDS`].
fn at(now_ms: u64) -> MemoryHost {
    CARDS
        .iter()
        .fold(MemoryHost::at(now_ms), |host, card| host.with_card(&token_of(card), &shop_events::card::normalize(card)))
}

fn request(order_id: &str, card: &str, amount: u64) -> Event {
    request_until(order_id, card, amount, None)
}

fn request_until(order_id: &str, card: &str, amount: u64, deadline_ms: Option<u64>) -> Event {
    let digits = shop_events::card::normalize(card);
    let card = shop_events::CardToken {
        token: token_of(card),
        brand: shop_events::card::brand(&digits).into(),
        last4: shop_events::card::last4(&digits).into(),
    };
    let payload = PaymentRequested { order_id: order_id.into(), amount_cents: amount, card, deadline_ms };
    Event::json("e1", topics::PAYMENTS, types::PAYMENT_REQUESTED, order_id, &payload)
}

fn refund_request(order_id: &str) -> Event {
    let payload =
        PaymentRefundRequested { order_id: order_id.into(), amount_cents: 1999, reason: "out of stock".into() };
    Event::json("e2", topics::PAYMENTS, types::PAYMENT_REFUND_REQUESTED, order_id, &payload)
}

fn void_request(order_id: &str) -> Event {
    let payload = PaymentVoidRequested { order_id: order_id.into(), reason: "deadline passed".into() };
    Event::json("e3", topics::PAYMENTS, types::PAYMENT_VOID_REQUESTED, order_id, &payload)
}

fn entry(host: &MemoryHost, order_id: &str) -> LedgerEntry {
    let resp = Payment::query(host, &Request::get(&format!("/payments/{order_id}")));
    assert_eq!(resp.status, 200);
    resp.body_json().unwrap()
}

fn kinds(entry: &LedgerEntry) -> Vec<OperationKind> {
    entry.operations.iter().map(|op| op.kind).collect()
}

fn only<T: serde::de::DeserializeOwned>(out: &[Outgoing], event_type: &str) -> T {
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].topic.as_str(), out[0].event_type.as_str()), (topics::PAYMENTS, event_type));
    out[0].payload_json().unwrap()
}

#[test]
fn good_card_is_authorized_captured_and_recorded() {
    let mut host = at(1_000);
    let out = Payment::handle(&mut host, &request("o1", GOOD, 1999)).unwrap();
    assert_eq!(out[0].key, "o1");
    let paid: PaymentAuthorized = only(&out, types::PAYMENT_AUTHORIZED);
    assert_eq!((paid.amount_cents, paid.card_last4.as_str(), paid.payment_id.as_str()), (1999, "4242", "pay_o1"));
    let e = entry(&host, "o1");
    assert_eq!((e.decided_at_ms, e.captured_cents, e.refunded_cents, e.voided), (1_000, 1999, 0, false));
    assert_eq!(kinds(&e), [OperationKind::Capture]);
}

#[test]
fn declined_card_and_amount_limit() {
    let mut host = at(0).with_config("max_amount_cents", "1000");
    let out = Payment::handle(&mut host, &request("o1", "4000000000000002", 100)).unwrap();
    let declined: PaymentDeclined = only(&out, types::PAYMENT_DECLINED);
    assert_eq!(declined.code, "card_declined");
    let out = Payment::handle(&mut host, &request("o2", "4242424242424242", 1001)).unwrap();
    let declined: PaymentDeclined = only(&out, types::PAYMENT_DECLINED);
    assert_eq!(declined.code, "amount_limit_exceeded");
    let e = entry(&host, "o2");
    assert_eq!((e.captured_cents, kinds(&e)), (0, vec![OperationKind::Decline]));
}

#[test]
fn redelivered_request_repeats_the_recorded_decision() {
    let mut host = at(5);
    let first = Payment::handle(&mut host, &request("o1", "4242424242424242", 500)).unwrap();
    // Even if the rules would now decide otherwise, the ledger wins.
    host.config.insert("max_amount_cents".into(), "1".into());
    host.now_ms = 99;
    let again = Payment::handle(&mut host, &request("o1", "4242424242424242", 500)).unwrap();
    assert_eq!(first, again);
    assert_eq!(host.state.len(), 1);
    assert_eq!(kinds(&entry(&host, "o1")), [OperationKind::Capture], "captured once");
}

#[test]
fn request_past_its_deadline_is_declined_without_capture() {
    let mut host = at(10_001);
    let out = Payment::handle(&mut host, &request_until("o1", GOOD, 500, Some(10_000))).unwrap();
    let declined: PaymentDeclined = only(&out, types::PAYMENT_DECLINED);
    assert_eq!(declined.code, DEADLINE_PASSED);
    let e = entry(&host, "o1");
    assert_eq!((e.captured_cents, kinds(&e)), (0, vec![OperationKind::Decline]));
    // At the deadline itself the payment may still be taken.
    host.now_ms = 10_000;
    let out = Payment::handle(&mut host, &request_until("o2", GOOD, 500, Some(10_000))).unwrap();
    let _: PaymentAuthorized = only(&out, types::PAYMENT_AUTHORIZED);
}

#[test]
fn lateness_is_measured_by_the_deadline_clock_not_the_wall_clock() {
    // 5 s past the deadline by the wall clock, but the host could not reach
    // the broker for 6 s meanwhile: not late.
    let mut host = MemoryHost { deadline_lag_ms: 6_000, ..at(15_000) };
    let out = Payment::handle(&mut host, &request_until("o1", GOOD, 500, Some(10_000))).unwrap();
    let _: PaymentAuthorized = only(&out, types::PAYMENT_AUTHORIZED);
}

#[test]
fn void_before_the_request_makes_it_decline_without_capture() {
    let mut host = at(7);
    let out = Payment::handle(&mut host, &void_request("o1")).unwrap();
    let voided: PaymentVoided = only(&out, types::PAYMENT_VOIDED);
    assert_eq!(voided.refunded_cents, 0);
    for _ in 0..2 {
        let out = Payment::handle(&mut host, &request("o1", GOOD, 500)).unwrap();
        let declined: PaymentDeclined = only(&out, types::PAYMENT_DECLINED);
        assert_eq!((declined.code.as_str(), declined.amount_cents), (VOIDED, 500));
    }
    let e = entry(&host, "o1");
    assert_eq!((e.captured_cents, e.voided), (0, true));
    assert_eq!(kinds(&e), [OperationKind::Void, OperationKind::Decline], "one decline however often it is asked");
    assert_eq!(Payment::handle(&mut host, &void_request("o1")).unwrap(), out_voided(&host, "o1"));
}

fn out_voided(host: &MemoryHost, order_id: &str) -> Vec<Outgoing> {
    let e = entry(host, order_id);
    let voided = PaymentVoided { order_id: order_id.into(), refunded_cents: e.refunded_cents, note: e.void_note() };
    vec![Outgoing::json(topics::PAYMENTS, types::PAYMENT_VOIDED, order_id, &voided).unwrap()]
}

#[test]
fn void_after_capture_refunds_in_full_once() {
    let mut host = at(1);
    Payment::handle(&mut host, &request("o1", GOOD, 1999)).unwrap();
    host.now_ms = 2;
    let first = Payment::handle(&mut host, &void_request("o1")).unwrap();
    let voided: PaymentVoided = only(&first, types::PAYMENT_VOIDED);
    assert_eq!(voided.refunded_cents, 1999);
    assert!(voided.note.contains("late authorization voided"), "{}", voided.note);
    assert_eq!(Payment::handle(&mut host, &void_request("o1")).unwrap(), first, "repeated void, same answer");
    assert_eq!(Payment::handle(&mut host, &refund_request("o1")).unwrap().len(), 1);
    let e = entry(&host, "o1");
    assert_eq!((e.captured_cents, e.refunded_cents, e.voided), (1999, 1999, true));
    assert_eq!(kinds(&e), [OperationKind::Capture, OperationKind::Void, OperationKind::Refund]);
    // A redelivered request no longer says "authorized".
    let declined: PaymentDeclined =
        only(&Payment::handle(&mut host, &request("o1", GOOD, 1999)).unwrap(), types::PAYMENT_DECLINED);
    assert_eq!(declined.code, VOIDED);
}

#[test]
fn void_of_a_decline_changes_nothing() {
    let mut host = at(1);
    Payment::handle(&mut host, &request("o1", "4000000000000002", 100)).unwrap();
    let before = entry(&host, "o1");
    let voided: PaymentVoided = only(&Payment::handle(&mut host, &void_request("o1")).unwrap(), types::PAYMENT_VOIDED);
    assert_eq!(voided.refunded_cents, 0);
    assert_eq!(entry(&host, "o1"), before);
    let declined: PaymentDeclined =
        only(&Payment::handle(&mut host, &request("o1", "4000000000000002", 100)).unwrap(), types::PAYMENT_DECLINED);
    assert_eq!(declined.code, "card_declined");
}

#[test]
fn refund_happens_once_and_is_answered_every_time() {
    let mut host = at(1);
    Payment::handle(&mut host, &request("o1", GOOD, 1999)).unwrap();
    let first = Payment::handle(&mut host, &refund_request("o1")).unwrap();
    let refunded: PaymentRefunded = only(&first, types::PAYMENT_REFUNDED);
    assert_eq!((refunded.refunded_cents, refunded.payment_id.as_str()), (1999, "pay_o1"));
    host.now_ms = 50;
    assert_eq!(Payment::handle(&mut host, &refund_request("o1")).unwrap(), first);
    let e = entry(&host, "o1");
    assert_eq!((e.captured_cents, e.refunded_cents), (1999, 1999));
    assert_eq!(kinds(&e), [OperationKind::Capture, OperationKind::Refund]);
}

#[test]
fn refund_before_any_request_blocks_a_later_charge() {
    let mut host = at(1);
    let refunded: PaymentRefunded =
        only(&Payment::handle(&mut host, &refund_request("o1")).unwrap(), types::PAYMENT_REFUNDED);
    assert_eq!(refunded.refunded_cents, 0);
    let declined: PaymentDeclined =
        only(&Payment::handle(&mut host, &request("o1", GOOD, 500)).unwrap(), types::PAYMENT_DECLINED);
    assert_eq!(declined.code, VOIDED);
    assert_eq!(entry(&host, "o1").captured_cents, 0);
}

#[test]
fn refund_of_a_decline_refunds_nothing() {
    let mut host = at(1);
    Payment::handle(&mut host, &request("o1", "4000000000009995", 100)).unwrap();
    let refunded: PaymentRefunded =
        only(&Payment::handle(&mut host, &refund_request("o1")).unwrap(), types::PAYMENT_REFUNDED);
    assert_eq!(refunded.refunded_cents, 0);
    assert_eq!(kinds(&entry(&host, "o1")), [OperationKind::Decline]);
}

#[test]
fn entries_written_before_captures_were_recorded_read_as_captured() {
    let mut host = at(1);
    let old = serde_json::json!({
        "payment_id": "pay_o1", "order_id": "o1", "amount_cents": 700,
        "decision": {"status": "authorized", "card_last4": "4242"}, "decided_at_ms": 3
    });
    host.put_json("payment/o1", &old).unwrap();
    let e = entry(&host, "o1");
    assert_eq!((e.captured_cents, kinds(&e)), (700, vec![OperationKind::Capture]));
    let refunded: PaymentRefunded =
        only(&Payment::handle(&mut host, &refund_request("o1")).unwrap(), types::PAYMENT_REFUNDED);
    assert_eq!(refunded.refunded_cents, 700);
}

#[test]
fn malformed_request_is_permanent_and_other_types_are_ignored() {
    let mut host = at(0);
    for event_type in [types::PAYMENT_REQUESTED, types::PAYMENT_REFUND_REQUESTED, types::PAYMENT_VOID_REQUESTED] {
        let mut bad = request("o1", "4242424242424242", 1);
        bad.event_type = event_type.into();
        bad.payload = b"not json".to_vec();
        assert!(matches!(Payment::handle(&mut host, &bad), Err(HandleError::Permanent(_))), "{event_type}");
    }
    for event_type in [types::PAYMENT_AUTHORIZED, types::PAYMENT_REFUNDED, types::PAYMENT_VOIDED] {
        let mut other = request("o1", "4242424242424242", 1);
        other.event_type = event_type.into();
        assert_eq!(Payment::handle(&mut host, &other).unwrap(), vec![]);
    }
    assert!(host.state.is_empty());
}

#[test]
fn bad_config_is_reported() {
    let mut host = at(0).with_config("max_amount_cents", "lots");
    let err = Payment::handle(&mut host, &request("o1", "4242424242424242", 1)).unwrap_err();
    assert!(matches!(err, HandleError::Permanent(msg) if msg.contains("max_amount_cents")));
}

#[test]
fn unknown_payment_and_route_are_404() {
    let host = at(0);
    assert_eq!(Payment::query(&host, &Request::get("/payments/none")).status, 404);
    assert_eq!(Payment::query(&host, &Request::get("/other")).status, 404);
}

#[test]
fn the_card_comes_from_the_vault_and_an_unknown_token_declines() {
    let mut host = at(1_000);
    // The token names the good card; the event's last4 is not what decides.
    let out = Payment::handle(&mut host, &request("o1", GOOD, 1999)).unwrap();
    assert_eq!(only::<PaymentAuthorized>(&out, types::PAYMENT_AUTHORIZED).card_last4, "4242");
    // A token the vault does not hold (expired and removed, or forged).
    let mut forged = request("o2", GOOD, 1999);
    let mut payload: PaymentRequested = forged.payload_json().unwrap();
    payload.card.token = "tok_forged".into();
    forged.payload = serde_json::to_vec(&payload).unwrap();
    let declined: PaymentDeclined = only(&Payment::handle(&mut host, &forged).unwrap(), types::PAYMENT_DECLINED);
    assert_eq!(declined.code, CARD_UNAVAILABLE);
    // Expired: declined the same way, nothing captured.
    let token = host.deposit_card("4242424242424242", 1_500);
    host.now_ms = 1_500;
    let mut late = request("o3", GOOD, 1999);
    let mut payload: PaymentRequested = late.payload_json().unwrap();
    payload.card = token;
    late.payload = serde_json::to_vec(&payload).unwrap();
    let declined: PaymentDeclined = only(&Payment::handle(&mut host, &late).unwrap(), types::PAYMENT_DECLINED);
    assert_eq!(declined.code, CARD_UNAVAILABLE);
    assert_eq!(entry(&host, "o3").captured_cents, 0);
    // A vault that cannot be read: retried, nothing decided.
    let mut bare = MemoryHost { vault_down: true, ..at(1_000) };
    let err = Payment::handle(&mut bare, &request("o4", GOOD, 1999)).unwrap_err();
    assert!(matches!(err, HandleError::Retryable(msg) if msg.contains("vault")));
    assert_eq!(Payment::query(&bare, &Request::get("/payments/o4")).status, 404);
    // The number is in no log line and no state entry.
    let logged = host.logs.borrow().iter().map(|(_, line)| line.clone()).collect::<Vec<_>>().join("\n");
    let stored: String = host.state.values().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    assert!(!logged.contains("4242424242424242") && !stored.contains("4242424242424242"));
}
