//! Shadow runs against real components: payment v1 serving, v2 (which
//! declines a card v1 accepts), a trapping build and an identical copy as
//! candidates; what the candidate does never reaches the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::tests::{handle, runtime_on, wasm};
use super::super::{Request, ServiceRuntime};
use super::ShadowStatus;
use crate::clock::ManualClock;
use crate::state::{MemoryStore, StateStore};
use crate::vault::{Vault, VaultKey};

/// Authorized by v1, declined by v2 (`card_not_supported`).
const MASTERCARD: &str = "5555555555554444";
const VISA: &str = "4242424242424242";

fn payment() -> (Arc<ServiceRuntime>, Arc<MemoryStore>, Arc<Vault>) {
    let store = Arc::new(MemoryStore::default());
    let rt = Arc::new(runtime_on("payment", 1000, 1, store.clone()));
    let vault_store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let vault = Arc::new(
        Vault::open(vault_store, &VaultKey::from_bytes([3; 32]), Arc::new(ManualClock::at(0)), Duration::from_secs(60))
            .unwrap(),
    );
    rt.set_vault(vault.clone());
    (rt, store, vault)
}

async fn request(vault: &Vault, order: &str, card: &str) -> crate::runtime::Event {
    let token = vault.deposit(card).await.unwrap();
    let payload = serde_json::json!({
        "order_id": order,
        "amount_cents": 1250,
        "card": { "token": token.token, "brand": token.brand, "last4": token.last4 },
    });
    crate::runtime::Event {
        id: format!("ev-{order}"),
        event_type: "PaymentRequested".into(),
        topic: "payments".into(),
        key: Some(order.into()),
        headers: Vec::new(),
        payload: payload.to_string().into_bytes(),
        timestamp_ms: 1,
    }
}

/// The report once `n` events (and `q` queries) were compared.
async fn compared(rt: &ServiceRuntime, n: u64, q: u64) -> ShadowStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = rt.shadow().unwrap().status();
        if status.events.compared + status.events.skipped >= n && status.queries.compared >= q {
            return status;
        }
        assert!(Instant::now() < deadline, "not compared in 30 s: {status:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_identical_candidate_differs_nowhere_and_keeps_nothing() {
    let (rt, store, vault) = payment();
    rt.start_shadow("copy", std::fs::read(wasm("payment")).unwrap()).await.unwrap();
    for i in 0..20 {
        handle(&rt, &request(&vault, &format!("o{i}"), VISA).await).await.unwrap();
    }
    let status = compared(&rt, 20, 0).await;
    assert_eq!((status.events.equal, status.events.differing, status.events.candidate_failed), (20, 0, 0));
    assert_eq!(status.cost["candidate"].calls, 20);
    // Every ledger entry is the serving version's, written once.
    assert_eq!(store.keys("", 1000).unwrap().len(), 20, "only the serving version's 20 ledger entries");
}

#[tokio::test]
async fn a_candidate_declining_a_card_is_caught_naming_the_fields() {
    let (rt, store, vault) = payment();
    rt.start_shadow("v2", std::fs::read(wasm("payment-v2")).unwrap()).await.unwrap();
    for i in 0..6 {
        let card = if i % 2 == 0 { MASTERCARD } else { VISA };
        let handled = handle(&rt, &request(&vault, &format!("o{i}"), card).await).await.unwrap();
        assert_eq!(super::super::tests::emitted(&handled), ["PaymentAuthorized"], "the serving version decides");
    }
    let status = compared(&rt, 6, 0).await;
    assert_eq!((status.events.equal, status.events.differing), (3, 3), "{status:#?}");
    let first = &status.differences[0];
    assert_eq!((first.id.as_str(), first.key.as_deref()), ("ev-o0", Some("o0")));
    let change =
        |path: &str| first.changes.iter().find(|c| c.path == path).unwrap_or_else(|| panic!("{path}: {first:#?}"));
    assert_eq!(change("outputs[0].type").serving, Some("PaymentAuthorized".into()));
    assert_eq!(change("outputs[0].type").candidate, Some("PaymentDeclined".into()));
    assert_eq!(change("outputs[0].data.code").candidate, Some("card_not_supported".into()));
    // The ledger holds v1's decisions only.
    for i in (0..6).step_by(2) {
        let entry = store.get(&format!("payment/o{i}")).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&entry).contains("card_not_supported"), "the candidate's write leaked");
    }
}

#[tokio::test]
async fn a_trapping_candidate_is_counted_and_the_serving_version_is_untouched() {
    let (rt, _store, vault) = payment();
    rt.start_shadow("trap", std::fs::read(wasm("payment-trap")).unwrap()).await.unwrap();
    for i in 0..5 {
        handle(&rt, &request(&vault, &format!("o{i}"), VISA).await).await.unwrap();
    }
    let status = compared(&rt, 5, 0).await;
    assert_eq!(status.events.candidate_failed + status.events.skipped, 5, "{status:#?}");
    assert!(status.failures[0].reason.contains("trap"), "{:?}", status.failures[0]);
    assert_eq!(rt.current().sha256, status.serving, "still serving v1");
}

#[tokio::test]
async fn queries_are_shadowed_and_a_run_stops_and_promotes() {
    let (rt, _store, vault) = payment();
    rt.start_shadow("v2", std::fs::read(wasm("payment-v2")).unwrap()).await.unwrap();
    handle(&rt, &request(&vault, "o1", VISA).await).await.unwrap();
    let ask = Request { method: "GET".into(), path: "/payments/o1".into(), query: String::new(), body: Vec::new() };
    let answer = rt.query(&ask).await.unwrap();
    let status = compared(&rt, 1, 1).await;
    assert_eq!((status.queries.equal, status.queries.differing), (1, 0), "{status:#?} {answer:?}");
    let promoted = rt.promote_shadow().await.unwrap();
    assert_eq!(promoted.state, "ended: promoted");
    assert_eq!(rt.current().sha256, promoted.candidate, "the candidate serves");
    assert!(rt.shadowing().is_none());
    assert!(matches!(rt.stop_shadow(), Err(super::ShadowError::None(_))));
}

#[test]
fn a_tape_replays_the_readings_in_order_then_the_last() {
    let clock = ManualClock::at(5);
    let mut tape = super::Tape::recording();
    assert_eq!(tape.read(super::Reading::Clock, &clock), 5);
    clock.set(9);
    assert_eq!(tape.read(super::Reading::Clock, &clock), 9);
    clock.set(100);
    let mut replay = tape.replaying();
    let read = |replay: &mut super::Tape| replay.read(super::Reading::Clock, &clock);
    assert_eq!([read(&mut replay), read(&mut replay), read(&mut replay)], [5, 9, 9]);
    // Nothing recorded of a clock: the clock itself.
    assert_eq!(replay.read(super::Reading::Deadlines, &clock), 100);
}

#[tokio::test]
async fn a_reload_of_another_version_ends_the_run_and_a_reload_of_the_candidate_promotes_it() {
    let (rt, _store, _vault) = payment();
    let v2 = std::fs::read(wasm("payment-v2")).unwrap();
    let run = rt.start_shadow("v2", v2.clone()).await.unwrap();
    rt.reload("trap", std::fs::read(wasm("payment-trap")).unwrap()).await.unwrap();
    assert!(run.status().state.contains("the serving version changed"), "{}", run.status().state);
    assert!(rt.shadowing().is_none());
    // A reload of the candidate's very bytes (by file or admin) is its promotion.
    let run = rt.start_shadow("v2", v2.clone()).await.unwrap();
    rt.reload("v2 by hand", v2).await.unwrap();
    assert_eq!(run.status().state, "ended: promoted");
}

#[tokio::test]
async fn stop_on_failure_ends_the_run_at_the_first_failure() {
    let (rt, _store, vault) = payment();
    rt.set_shadow_settings(crate::manifest::ShadowSettings { stop_on_failure: true, ..Default::default() });
    let run = rt.start_shadow("trap", std::fs::read(wasm("payment-trap")).unwrap()).await.unwrap();
    handle(&rt, &request(&vault, "o1", VISA).await).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while run.active() {
        assert!(Instant::now() < deadline, "still running: {:#?}", run.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = run.status();
    assert_eq!(status.state, "ended: the candidate failed or differed (stop_on_failure)");
    assert_eq!(status.events.candidate_failed, 1);
    // Later events are not shadowed.
    handle(&rt, &request(&vault, "o2", VISA).await).await.unwrap();
    assert_eq!(run.status().events.compared, 1);
}
