use axum::body::Body;
use axum::http::Request;
use sha2::{Digest as _, Sha256};
use tower::ServiceExt as _;

use super::*;
use crate::runtime::tests::{event, runtime, wasm};

const TOKEN: &str = "0123456789abcdef-token";

fn app_with(service: Arc<ServiceRuntime>) -> Router {
    let managed = Managed { service, wasm: wasm("misbehave"), status: None };
    admin_app(BTreeMap::from([("svc".to_owned(), managed)]), TOKEN, None)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn requests_without_the_token_are_refused() {
    let app = app_with(Arc::new(runtime("misbehave", 1000)));
    let order = std::fs::read(wasm("order")).unwrap();
    for token in [None, Some("wrong"), Some("0123456789abcdef-toke")] {
        assert_eq!(call(&app, "GET", "/components", token, vec![]).await.0, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&app, "POST", "/components/svc/reload", token, order.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn the_token_is_checked_before_any_of_the_body_is_read() {
    let app = app_with(Arc::new(runtime("misbehave", 1000)));
    // A body that never arrives: reading it first would hang.
    let endless = Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
    let request = Request::builder()
        .method("POST")
        .uri("/components/svc/reload")
        .header("authorization", "Bearer wrong")
        .header("content-length", "60000000")
        .body(endless)
        .unwrap();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(5), app.oneshot(request)).await;
    assert_eq!(answered.expect("answered without reading the body").unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_reload_swaps_versions_and_keeps_state() {
    let service = Arc::new(runtime("misbehave", 1000));
    let app = app_with(service.clone());
    crate::runtime::tests::handle(&service, &event("Echo", "kept")).await.unwrap();
    let misbehave = std::fs::read(wasm("misbehave")).unwrap();
    let order = std::fs::read(wasm("order")).unwrap();

    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), order.clone()).await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some(sha(&order).as_str())), "{body}");
    assert_eq!(service.current().sha256, sha(&order));
    // The order service ignores this event type: the new version is serving.
    let handled = crate::runtime::tests::handle(&service, &event("Echo", "x")).await.unwrap();
    assert!(crate::runtime::tests::emitted(&handled).is_empty());

    // An empty body reloads the manifest's file.
    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), vec![]).await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some(sha(&misbehave).as_str())), "{body}");
    assert_eq!(service.state_store().get("kept").unwrap(), Some(b"\"hello\"".to_vec()), "state carries over");

    let (status, list) = call(&app, "GET", "/components", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let outcomes: Vec<&str> =
        list["svc"]["history"].as_array().unwrap().iter().map(|h| h["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["replaced", "replaced", "serving"]);
    assert_eq!(list["svc"]["current"]["version"], sha(&misbehave));
}

#[tokio::test]
async fn an_operator_rolls_back_to_the_version_a_reload_replaced() {
    let service = Arc::new(runtime("misbehave", 1000));
    let app = app_with(service.clone());
    let misbehave = sha(&std::fs::read(wasm("misbehave")).unwrap());
    let (status, body) = call(&app, "POST", "/components/svc/rollback", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing replaced yet: {body}");
    assert_eq!(body["error"]["code"], "no_previous_version");

    let order = std::fs::read(wasm("order")).unwrap();
    assert_eq!(call(&app, "POST", "/components/svc/reload", Some(TOKEN), order.clone()).await.0, StatusCode::OK);
    assert_eq!(service.previous().map(|p| p.sha256.clone()), Some(misbehave.clone()));
    let (status, body) = call(&app, "POST", "/components/svc/rollback", Some(TOKEN), vec![]).await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some(misbehave.as_str())), "{body}");
    assert_eq!(service.current().sha256, misbehave);
    // misbehave echoes this event: the restored version is serving.
    let handled = crate::runtime::tests::handle(&service, &event("Echo", "x")).await.unwrap();
    assert_eq!(crate::runtime::tests::emitted(&handled), ["Echoed"]);
    let outcomes: Vec<(String, String)> =
        service.history().into_iter().map(|h| (h.sha256[..8].to_owned(), h.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (misbehave[..8].to_owned(), "replaced".to_owned()),
            (sha(&order)[..8].to_owned(), "rolled back by an operator".to_owned()),
            (misbehave[..8].to_owned(), "serving".to_owned()),
        ]
    );
    // The one kept is used up; the version rolled back from is not kept.
    assert!(service.previous().is_none());
    assert_eq!(call(&app, "POST", "/components/svc/rollback", Some(TOKEN), vec![]).await.0, StatusCode::CONFLICT);
    assert_eq!(call(&app, "POST", "/components/nope/rollback", Some(TOKEN), vec![]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, "POST", "/components/svc/rollback", None, vec![]).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_components_are_rejected_and_the_old_version_keeps_serving() {
    let service = Arc::new(runtime("misbehave", 1000));
    let app = app_with(service.clone());
    let before = service.current().sha256.clone();
    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), b"not a component".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("not a valid Wasm component"), "{body}");
    assert_eq!(service.current().sha256, before);
    assert!(crate::runtime::tests::handle(&service, &event("Echo", "k")).await.is_ok());
    let history = service.history();
    assert!(history.last().unwrap().outcome.starts_with("rejected"), "{history:?}");
    let (status, _) = call(&app, "POST", "/components/nope/reload", Some(TOKEN), vec![1]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_through_the_api() {
    use crate::bus::{MemoryBus, Outbound};
    use crate::kafka::dlq::{DeadLetters, MemoryLog};
    let bus = Arc::new(MemoryBus::default());
    let dead_letter = |component: &str, offset: u32| Outbound {
        topic: "dlq".into(),
        key: "o1".into(),
        value: b"{}".to_vec(),
        headers: [
            ("dlq-reason", "permanent: no"),
            ("dlq-component", component),
            ("dlq-source", &format!("emails/0/{offset}")),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .collect(),
    };
    bus.push(dead_letter("email", 3));
    bus.push(dead_letter("payment", 4));
    let managed = Managed { service: Arc::new(runtime("misbehave", 1000)), wasm: wasm("misbehave"), status: None };
    let dead_letters = DeadLetters::new(
        Arc::new(MemoryLog::new(bus.clone(), "dlq")),
        bus.clone(),
        std::collections::BTreeSet::from(["emails".to_owned()]),
    );
    let app = admin_app(BTreeMap::from([("svc".to_owned(), managed)]), TOKEN, Some(dead_letters));

    assert_eq!(call(&app, "GET", "/dlq", None, vec![]).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&app, "GET", "/dlq?component=email", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["topic"].as_str(), body["dead_letters"].as_array().map(Vec::len)), (Some("dlq"), Some(1)));
    assert_eq!(body["dead_letters"][0]["id"], "0/0");
    let (status, body) = call(&app, "GET", "/dlq?since=someday", Some(TOKEN), vec![]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_since")));

    for bad in [&b"{\"all\": true}"[..], b"{\"ids\": [\"x\"]}", b"{}", b"not json", b"{\"ids\": [], \"typo\": 1}"] {
        let (status, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), bad.to_vec()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_selection")));
    }
    let all = br#"{"all": true, "component": "email"}"#.to_vec();
    let (status, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), all.clone()).await;
    assert_eq!((status, body["replayed"][0]["id"].as_str()), (StatusCode::OK, Some("0/0")), "{body}");
    assert_eq!(bus.records("emails").len(), 1);
    let (_, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), all).await;
    assert_eq!(body["replayed"].as_array().map(Vec::len), Some(0), "{body}");
    let (_, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), br#"{"ids": ["0/0", "0/1"]}"#.to_vec()).await;
    assert_eq!(body["replayed"][0]["id"], "0/1", "{body}");
    assert!(body["refused"][0]["reason"].as_str().unwrap().contains("already replayed"), "{body}");

    let without = app_with(Arc::new(runtime("misbehave", 1000)));
    assert_eq!(call(&without, "GET", "/dlq", Some(TOKEN), vec![]).await.0, StatusCode::NOT_FOUND);
}

/// An admin app over an order component holding one placed order, with the
/// console remembering it and one id the order service never saw.
async fn console_app() -> (Router, Arc<ServiceRuntime>, RecentOrders) {
    let order = Arc::new(runtime("order", 5000));
    let placed = shop_events::OrderPlaced {
        order_id: "o-console".into(),
        customer: shop_events::Customer { name: "Ada".into(), email: "ada@example.com".into() },
        items: vec![shop_events::LineItem { sku: "<b>pen</b>".into(), quantity: 1, unit_price_cents: 199 }],
        total_cents: 199,
        card: shop_events::CardToken { token: "tok_1".into(), brand: "visa".into(), last4: "4242".into() },
        idempotency: None,
    };
    let mut placed_event = event("OrderPlaced", "o-console");
    placed_event.payload = serde_json::to_vec(&placed).unwrap();
    crate::runtime::tests::handle(&order, &placed_event).await.unwrap();
    let recent = RecentOrders::default();
    recent.push("o-console");
    recent.push("o-unseen");
    let services = BTreeMap::from([
        ("order".to_owned(), Managed { service: order.clone(), wasm: wasm("order"), status: None }),
        (
            "svc".to_owned(),
            Managed {
                service: Arc::new(runtime("misbehave", 1000)),
                wasm: wasm("misbehave"),
                status: Some(ConsumerStatus::default()),
            },
        ),
    ]);
    let settings = ConsoleSettings { recent: recent.clone(), ..ConsoleSettings::default() };
    (admin_app_with_console(services, TOKEN, None, settings), order, recent)
}

#[tokio::test]
async fn the_console_page_is_public_and_its_data_is_not() {
    let (app, _, _) = console_app().await;
    let response = app.clone().oneshot(Request::builder().uri("/console").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let page = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains("/overview") && !page.contains("innerHTML"), "the page reads /overview, never parses markup");
    for token in [None, Some("wrong")] {
        assert_eq!(call(&app, "GET", "/overview", token, vec![]).await.0, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn the_overview_shows_components_orders_with_their_timeline_and_reloads() {
    let (app, order, _) = console_app().await;
    let (status, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let components = body["components"].as_object().unwrap();
    assert_eq!(components.keys().collect::<Vec<_>>(), ["order", "svc"]);
    assert_eq!(components["order"]["version"], order.current().sha256);
    assert_eq!(components["order"]["status"], "not consuming here", "{body}");
    // A consumer that is not running is not healthy.
    let svc = &components["svc"];
    assert_eq!((svc["status"].as_str(), svc["handled"].as_u64()), (Some("degraded"), Some(0)), "{svc}");
    assert_eq!((svc["rate_per_s"].as_f64(), svc["lag"].is_null()), (Some(0.0), true), "{svc}");
    assert_eq!((svc["timers_pending"].as_u64(), svc["outbox_pending"].as_u64()), (Some(0), Some(0)), "{svc}");
    assert_eq!(svc["history"].as_array().map(Vec::len), Some(1));

    // Newest first; the order service's status and timeline, the event text as it was.
    let orders = body["orders"].as_array().unwrap();
    assert_eq!((orders[0]["order_id"].as_str(), orders[0]["status"].as_str()), (Some("o-unseen"), Some("SENT")));
    // The order service here has no catalog: it sells nothing.
    assert_eq!((orders[1]["order_id"].as_str(), orders[1]["status"].as_str()), (Some("o-console"), Some("REJECTED")));
    assert_eq!(orders[1]["history"][0]["status"], "PENDING", "{}", orders[1]);
    assert!(body["dead_letters"]["error"].is_string(), "no dead-letter topic here: {body}");

    let (status, _) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    let outcomes: Vec<&str> = body["components"]["svc"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["replaced", "serving"]);
}

#[tokio::test]
async fn the_overview_shows_a_components_shadow_run_and_how_it_ended() {
    let payment = Arc::new(runtime("payment", 1000));
    let services = BTreeMap::from([
        ("payment".to_owned(), Managed { service: payment.clone(), wasm: wasm("payment"), status: None }),
        (
            "svc".to_owned(),
            Managed { service: Arc::new(runtime("misbehave", 1000)), wasm: wasm("misbehave"), status: None },
        ),
    ]);
    let app = admin_app(services, TOKEN, None);
    let (_, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    assert!(body["components"]["payment"]["shadow"].is_null(), "no run yet: {body}");

    let candidate = std::fs::read(wasm("payment")).unwrap();
    payment.start_shadow("copy", candidate.clone()).await.unwrap();
    let (status, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let shadow = &body["components"]["payment"]["shadow"];
    assert_eq!(shadow["component"], "payment", "{body}");
    assert_eq!((shadow["state"].as_str(), shadow["source"].as_str()), (Some("running"), Some("copy")), "{shadow}");
    assert_eq!(shadow["candidate"], sha(&candidate));
    assert_eq!(shadow["serving"], payment.current().sha256);
    for side in ["serving", "candidate"] {
        assert_eq!(shadow["cost"][side]["calls"].as_u64(), Some(0), "{shadow}");
    }
    assert_eq!(shadow["events"]["compared"].as_u64(), Some(0), "{shadow}");
    assert!(shadow["differences"].as_array().is_some_and(Vec::is_empty), "{shadow}");
    assert!(body["components"]["svc"]["shadow"].is_null(), "only the component with a run has one: {body}");

    // Stopped from the console's button: the ended run stays in view.
    let (status, _) = call(&app, "POST", "/components/payment/shadow/stop", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    assert_eq!(body["components"]["payment"]["shadow"]["state"], "ended: stopped by an operator", "{body}");
}

#[test]
fn rates_come_from_handled_deltas_over_at_least_a_second() {
    let start = std::time::Instant::now();
    let first = console::rate(None, start, 100);
    assert_eq!(first.rate, 0.0);
    // Too soon: the last rate again, and the old sample kept.
    let soon = console::rate(Some(first), start + std::time::Duration::from_millis(300), 130);
    assert_eq!((soon.rate, soon.handled), (0.0, 100));
    let later = console::rate(Some(soon), start + std::time::Duration::from_secs(2), 150);
    assert_eq!(later.rate, 25.0);
    let restarted = console::rate(Some(later), start + std::time::Duration::from_secs(4), 3);
    assert_eq!((restarted.rate, restarted.handled), (0.0, 3));
}

#[tokio::test]
async fn recent_orders_are_the_last_acknowledged_newest_first() {
    struct Fails(bool);
    impl gateway::Backend for Fails {
        fn place_order(&self, _: shop_events::OrderPlaced) -> gateway::BoxFuture<'_, Result<(), gateway::PlaceError>> {
            let fails = self.0;
            Box::pin(async move { if fails { Err(gateway::PlaceError::NotSent("down".into())) } else { Ok(()) } })
        }
        fn idempotency(&self, _: &str) -> gateway::BoxFuture<'_, Result<Option<String>, gateway::BackendError>> {
            Box::pin(async { Ok(None) })
        }
        fn order_status(
            &self,
            _: &str,
        ) -> gateway::BoxFuture<'_, Result<Option<serde_json::Value>, gateway::BackendError>> {
            Box::pin(async { Ok(None) })
        }
        fn catalog(&self) -> gateway::BoxFuture<'_, Result<Vec<shop_events::CatalogItem>, gateway::BackendError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn vault_card(
            &self,
            _: &str,
            _: String,
        ) -> gateway::BoxFuture<'_, Result<shop_events::CardToken, gateway::BackendError>> {
            Box::pin(async { Err(gateway::BackendError("no vault".into())) })
        }
    }
    use gateway::Backend as _;
    let order = |id: &str| shop_events::OrderPlaced {
        order_id: id.into(),
        customer: shop_events::Customer { name: "A".into(), email: "a@example.com".into() },
        items: vec![],
        total_cents: 0,
        card: shop_events::CardToken { token: "tok_1".into(), brand: "visa".into(), last4: "4242".into() },
        idempotency: None,
    };
    let recent = RecentOrders::default();
    let (sent, refused) = (Recording::new(Fails(false), recent.clone()), Recording::new(Fails(true), recent.clone()));
    for i in 0..20 {
        sent.place_order(order(&format!("o{i}"))).await.unwrap();
    }
    assert!(refused.place_order(order("lost")).await.is_err());
    sent.place_order(order("o10")).await.unwrap();
    let ids = recent.newest_first();
    assert_eq!(ids.len(), 12);
    assert_eq!(&ids[..3], ["o10", "o19", "o18"], "not acknowledged: not shown; placed again: moved up");
}

#[tokio::test]
async fn the_overview_lists_dead_letters_and_a_replay_shows_at_once() {
    use crate::bus::{MemoryBus, Outbound};
    use crate::kafka::dlq::{DeadLetters, MemoryLog};
    let bus = Arc::new(MemoryBus::default());
    let headers = [("dlq-reason", "permanent: <i>no</i>"), ("dlq-component", "email"), ("dlq-source", "emails/0/3")];
    bus.push(Outbound {
        topic: "dlq".into(),
        key: "o1".into(),
        value: b"{}".to_vec(),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect(),
    });
    let managed = Managed { service: Arc::new(runtime("misbehave", 1000)), wasm: wasm("misbehave"), status: None };
    let dead_letters = DeadLetters::new(
        Arc::new(MemoryLog::new(bus.clone(), "dlq")),
        bus.clone(),
        std::collections::BTreeSet::from(["emails".to_owned()]),
    );
    let app = admin_app(BTreeMap::from([("svc".to_owned(), managed)]), TOKEN, Some(dead_letters));

    let (_, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    let dlq = &body["dead_letters"];
    assert_eq!((dlq["total"].as_u64(), dlq["not_replayed"].as_u64()), (Some(1), Some(1)), "{body}");
    assert_eq!(
        (dlq["items"][0]["id"].as_str(), dlq["items"][0]["reason"].as_str()),
        (Some("0/0"), Some("permanent: <i>no</i>"))
    );
    let (status, _) = call(&app, "POST", "/dlq/replay", Some(TOKEN), br#"{"ids": ["0/0"]}"#.to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    // Within the cache's lifetime, yet read again after the replay.
    let (_, body) = call(&app, "GET", "/overview", Some(TOKEN), vec![]).await;
    assert_eq!(body["dead_letters"]["not_replayed"].as_u64(), Some(0), "{body}");
    assert!(body["dead_letters"]["items"][0]["replayed"].is_object(), "{body}");
}

/// The token check compares digests, so a wrong length is refused by the
/// same 32-byte comparison as a wrong byte (no early answer by length).
#[test]
fn the_token_comparison_accepts_only_the_token() {
    assert!(same(TOKEN.as_bytes(), TOKEN.as_bytes()));
    let mut flipped = TOKEN.as_bytes().to_vec();
    flipped[TOKEN.len() - 1] ^= 1;
    let longer = format!("{TOKEN}x");
    for wrong in [&b""[..], &TOKEN.as_bytes()[..TOKEN.len() - 1], longer.as_bytes(), &flipped, &[0u8; 4096]] {
        assert!(!same(wrong, TOKEN.as_bytes()), "{wrong:?}");
    }
}

/// The command line takes the token from a file (or the environment),
/// never from an argument, which every user sees in `ps`.
#[test]
fn the_cli_token_comes_from_a_file_never_an_argument() {
    let err = read_token(true, None).unwrap_err().to_string();
    assert!(err.contains("not accepted as an argument") && err.contains("HOST_ADMIN_TOKEN"), "{err}");
    let dir = std::env::temp_dir().join(format!("admin-token-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    assert_eq!(read_token(false, Some(&file)).unwrap().as_deref(), Some(TOKEN));
    assert!(read_token(true, Some(&file)).is_err(), "an argument is refused even beside a file");
    std::fs::write(&file, "\n").unwrap();
    assert!(read_token(false, Some(&file)).unwrap_err().to_string().contains("is empty"));
    let missing = read_token(false, Some(&dir.join("missing"))).unwrap_err().to_string();
    assert!(missing.contains("cannot read the admin token file"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `promote_after`: a run started through the API promotes itself once
/// that many events compared equal (an ordinary reload, in the history).
#[tokio::test]
async fn a_shadow_run_with_a_promotion_policy_promotes_itself() {
    let service = Arc::new(runtime("misbehave", 1000));
    service.set_shadow_settings(crate::manifest::ShadowSettings { promote_after: 3, ..Default::default() });
    let app = app_with(service.clone());
    let bytes = std::fs::read(wasm("misbehave")).unwrap();
    let (status, body) = call(&app, "POST", "/components/svc/shadow", Some(TOKEN), bytes).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "running");
    for key in ["k1", "k2", "k3"] {
        crate::runtime::tests::handle(&service, &event("Echo", key)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, report) = call(&app, "GET", "/components/svc/shadow", Some(TOKEN), Vec::new()).await;
        if report["state"] == "ended: promoted" {
            assert_eq!(report["events"]["equal"], 3, "{report}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not promoted: {report}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let history = service.history();
    assert_eq!(history.last().map(|h| h.source.as_str()), Some("shadow run of admin upload"), "{history:?}");
    let (status, body) = call(&app, "POST", "/components/svc/shadow/stop", Some(TOKEN), Vec::new()).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::NOT_FOUND, &serde_json::json!("no_shadow_run")));
}
