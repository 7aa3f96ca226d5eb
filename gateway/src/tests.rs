use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt as _;

use super::*;

mod openapi;
mod ports;

/// In-memory twin of the host: records what was published and answers
/// status queries from it.
#[derive(Default)]
struct TwinBackend {
    placed: Mutex<Vec<OrderPlaced>>,
    fail: bool,
    /// The broker is known to be unreachable.
    down: AtomicBool,
    /// Sent, never acknowledged.
    hang: bool,
    /// The order service has not recorded what was placed yet.
    lagging: bool,
    /// The order service never answers.
    stuck: bool,
    /// The order service's state cannot be read.
    store_down: bool,
    /// The order service cannot answer its catalog.
    catalog_down: bool,
    /// Catalog reads answered.
    catalog_reads: std::sync::atomic::AtomicUsize,
    /// The vault cannot store a card.
    vault_down: bool,
    /// The card numbers deposited, by token.
    vault: Mutex<HashMap<String, String>>,
}

/// What the twin's order service sells.
fn twin_catalog() -> Vec<CatalogItem> {
    let item = |sku: &str, name: &str, price, remaining| CatalogItem {
        sku: sku.into(),
        name: name.into(),
        unit_price_cents: price,
        remaining,
    };
    vec![item("book", "Book", 1250, None), item("pen", "Pen", 199, None), item("lamp", "Lamp", 3400, Some(3))]
}

impl Backend for TwinBackend {
    fn place_order(&self, order: OrderPlaced) -> BoxFuture<'_, Result<(), PlaceError>> {
        Box::pin(async move {
            if self.fail {
                return Err(PlaceError::Unconfirmed("broker down".into()));
            }
            if self.hang {
                self.placed.lock().unwrap().push(order);
                return std::future::pending().await;
            }
            self.placed.lock().unwrap().push(order);
            Ok(())
        })
    }

    fn unavailable(&self) -> Option<String> {
        self.down.load(Ordering::SeqCst).then(|| "all broker connections are down".to_owned())
    }

    fn idempotency(&self, key_digest: &str) -> BoxFuture<'_, Result<Option<String>, BackendError>> {
        if self.stuck {
            return Box::pin(std::future::pending());
        }
        if self.store_down {
            return Box::pin(async { Err(BackendError("database down".into())) });
        }
        // Like the order service: the first order recorded under a key wins.
        let placed = self.placed.lock().unwrap();
        let bound = placed
            .iter()
            .filter_map(|o| o.idempotency.as_ref())
            .find(|b| b.key_digest == key_digest && !self.lagging)
            .map(|b| b.request_hash.clone());
        Box::pin(async move { Ok(bound) })
    }

    fn order_status(&self, order_id: &str) -> BoxFuture<'_, Result<Option<serde_json::Value>, BackendError>> {
        if self.stuck {
            return Box::pin(std::future::pending());
        }
        if self.fail {
            return Box::pin(async { Err(BackendError("order service down".into())) });
        }
        let found = self.placed.lock().unwrap().iter().find(|o| o.order_id == order_id).cloned();
        // What the order service answers: the order with its customer and
        // the card's brand and last four digits.
        let order = found.map(|o| {
            let mut order = json!({
                "order_id": o.order_id, "status": "PENDING", "customer": o.customer, "items": o.items,
                "total_cents": o.total_cents, "card": { "brand": o.card.brand, "last4": o.card.last4 },
                "history": [{ "status": "PENDING", "at_ms": 1, "event_id": "e1", "note": "order placed" }],
            });
            if let Some(binding) = o.idempotency {
                order["request_hash"] = json!(binding.request_hash);
            }
            order
        });
        Box::pin(async move { Ok(order) })
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogItem>, BackendError>> {
        Box::pin(async move {
            if self.catalog_down {
                return Err(BackendError("order service down".into()));
            }
            self.catalog_reads.fetch_add(1, Ordering::SeqCst);
            Ok(twin_catalog())
        })
    }

    fn vault_card(&self, order_id: &str, number: String) -> BoxFuture<'_, Result<CardToken, BackendError>> {
        // As the host's vault: one token per order, the first card kept.
        let token = format!("tok_{order_id}");
        Box::pin(async move {
            if self.vault_down {
                return Err(BackendError("vault store down".into()));
            }
            let mut vault = self.vault.lock().unwrap();
            let number = vault.entry(token.clone()).or_insert(number);
            Ok(CardToken {
                token,
                brand: shop_events::card::brand(number).into(),
                last4: shop_events::card::last4(number).into(),
            })
        })
    }
}

fn valid_order() -> serde_json::Value {
    json!({
        "customer": { "name": "Ada Lovelace", "email": "ada@example.com" },
        "items": [ { "sku": "book", "quantity": 2, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242 4242 4242 4242" }
    })
}

async fn send(app: Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

fn post(body: &serde_json::Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::post("/order").header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test]
async fn valid_order_is_published_then_accepted() {
    let backend = Arc::new(TwinBackend::default());
    let (status, body) = send(app(backend.clone()), post(&valid_order(), &[])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let placed = backend.placed.lock().unwrap().clone();
    assert_eq!(placed.len(), 1);
    assert_eq!(body["order_id"], placed[0].order_id.as_str());
    assert_eq!((placed[0].total_cents, placed[0].card.last4.as_str()), (2500, "4242"));
    // Only the token travels; the vault holds the number under it.
    let published = serde_json::to_string(&placed[0]).unwrap();
    assert!(!published.contains("4242424242424242"), "{published}");
    assert_eq!(backend.vault.lock().unwrap()[&placed[0].card.token], "4242424242424242");
    let (status, body) =
        send(app(backend.clone()), Request::get(format!("/order/{}", placed[0].order_id)).body(Body::empty()).unwrap())
            .await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("PENDING")));
    assert_eq!(body["card"], json!({ "brand": "visa", "last4": "4242" }));
}

#[tokio::test]
async fn every_bad_field_is_named_and_nothing_is_published() {
    let backend = Arc::new(TwinBackend::default());
    let bad = json!({
        "customer": { "name": " ", "email": "not-an-email" },
        "items": [ { "sku": "book", "quantity": 0, "unit_price_cents": 100 }, { "quantity": 1 } ],
        "payment": { "card_number": "4242424242424241" }
    });
    let (status, body) = send(app(backend.clone()), post(&bad, &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fields: HashMap<String, String> = body["error"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["field"].as_str().unwrap().to_owned(), f["message"].as_str().unwrap().to_owned()))
        .collect();
    for field in ["customer.name", "customer.email", "items[0].quantity", "items[1].sku", "payment.card_number"] {
        assert!(fields.contains_key(field), "{field} missing from {fields:?}");
    }
    assert_eq!(fields.len(), 5, "{fields:?}");
    assert!(backend.placed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn malformed_bodies_are_rejected_clearly() {
    let backend = Arc::new(TwinBackend::default());
    let raw = Request::post("/order").header("content-type", "application/json").body(Body::from("{")).unwrap();
    let (status, body) = send(app(backend.clone()), raw).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let (status, body) = send(app(backend.clone()), post(&json!({"customer": {}, "extra": 1}), &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("extra"), "{body}");
    let text = Request::post("/order").body(Body::from(valid_order().to_string())).unwrap();
    assert_eq!(send(app(backend.clone()), text).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(backend.placed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn broker_failure_is_503_without_internals() {
    let backend = Arc::new(TwinBackend { fail: true, ..TwinBackend::default() });
    let (status, body) = send(app(backend), post(&valid_order(), &[])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!body.to_string().contains("broker down"));
}

#[tokio::test]
async fn while_the_broker_is_unreachable_orders_are_refused_at_once() {
    let backend = Arc::new(TwinBackend { down: AtomicBool::new(true), ..TwinBackend::default() });
    let response = app(backend.clone()).oneshot(post(&valid_order(), &[])).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "2");
    let body: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(backend.placed.lock().unwrap().is_empty(), "not even tried");
    let (status, body) = send(app(backend), Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("degraded")));
    assert!(body["reason"].as_str().unwrap().contains("broker"), "{body}");
}

#[tokio::test]
async fn an_order_not_acknowledged_in_time_is_503_with_its_id() {
    let backend = Arc::new(TwinBackend { hang: true, ..TwinBackend::default() });
    let settings = Settings { publish_timeout: Duration::from_millis(50), ..Settings::default() };
    let request = post(&valid_order(), &[("idempotency-key", "k1")]);
    let response = app_with(backend.clone(), settings).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "not_confirmed");
    let sent = backend.placed.lock().unwrap()[0].order_id.clone();
    assert_eq!(body["error"]["order_id"], sent.as_str(), "the client learns which order may exist");
    assert_eq!(body["error"]["status_url"], format!("/order/{sent}"));
}

#[tokio::test]
async fn the_same_key_and_order_is_the_same_order_published_once() {
    let backend = Arc::new(TwinBackend::default());
    let (status, a) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // The same order written differently: other whitespace, key order and
    // card spacing, padded text.
    let same = r#"{ "payment": {"card_number": "4242424242424242"},
        "items": [{"unit_price_cents": 1250, "quantity": 2, "sku": " book "}],
        "customer": {"email": "ada@example.com", "name": "Ada Lovelace"} }"#;
    let request = Request::post("/order")
        .header("content-type", "application/json")
        .header("idempotency-key", "k1")
        .body(Body::from(same))
        .unwrap();
    let (status, b) = send(app(backend.clone()), request).await;
    assert_eq!((status, &b["order_id"], b["total_cents"].as_u64()), (StatusCode::ACCEPTED, &a["order_id"], Some(2500)));
    assert_eq!(backend.placed.lock().unwrap().len(), 1, "a recorded order is not published again");
    let (_, c) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k2")])).await;
    assert_ne!(a["order_id"], c["order_id"]);
    assert_eq!(backend.placed.lock().unwrap().len(), 2);
    // A retry of a recorded order is answered even while the broker is down.
    backend.down.store(true, Ordering::SeqCst);
    let (status, d) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    assert_eq!((status, &d["order_id"]), (StatusCode::ACCEPTED, &a["order_id"]));
}

#[tokio::test]
async fn a_key_reused_for_another_order_is_409_and_names_no_order() {
    let backend = Arc::new(TwinBackend::default());
    let (_, first) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    let mut other = valid_order();
    other["items"][0]["quantity"] = json!(3);
    let (status, body) = send(app(backend.clone()), post(&other, &[("idempotency-key", "k1")])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("idempotency_key_reused")));
    let first_id = first["order_id"].as_str().unwrap();
    assert!(!body.to_string().contains(first_id), "the 409 must not reveal the bound order: {body}");
    assert_eq!(backend.placed.lock().unwrap().len(), 1);
    // Another customer guessing the key with their own order gets another
    // id, or a 409: never the first order's id.
    let mut guesser = valid_order();
    guesser["customer"] = json!({ "name": "Eve", "email": "eve@example.com" });
    let (status, _) = send(app(backend.clone()), post(&guesser, &[("idempotency-key", "k1")])).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, elsewhere) = send(app(backend.clone()), post(&guesser, &[("idempotency-key", "k9")])).await;
    let (_, first_body_k9) =
        send(app(Arc::new(TwinBackend::default())), post(&valid_order(), &[("idempotency-key", "k9")])).await;
    assert_ne!(elsewhere["order_id"], first_body_k9["order_id"], "the id depends on the order, not only the key");
}

#[tokio::test]
async fn a_second_order_racing_the_first_under_one_key_is_refused_by_this_gateway() {
    // The order service has not recorded the first order yet.
    let backend = Arc::new(TwinBackend { lagging: true, ..TwinBackend::default() });
    let gateway = app(backend.clone());
    let key = [("idempotency-key", "race")];
    assert_eq!(send(gateway.clone(), post(&valid_order(), &key)).await.0, StatusCode::ACCEPTED);
    let mut other = valid_order();
    other["items"][0] = json!({ "sku": "lamp", "quantity": 1 });
    assert_eq!(send(gateway.clone(), post(&other, &key)).await.0, StatusCode::CONFLICT);
    assert_eq!(send(gateway.clone(), post(&valid_order(), &key)).await.0, StatusCode::ACCEPTED, "a retry");
    let placed = backend.placed.lock().unwrap().clone();
    assert_eq!(placed.len(), 2, "the retry is published again (the order service drops it by id)");
    assert_eq!(placed[0].order_id, placed[1].order_id);
    assert_eq!(placed[0].card, placed[1].card, "the retry's card token is the first's: the same event");
}

#[tokio::test]
async fn a_key_whose_order_was_not_sent_is_free_again() {
    let backend = Arc::new(TwinBackend { down: AtomicBool::new(true), lagging: true, ..TwinBackend::default() });
    let gateway = app(backend.clone());
    let key = [("idempotency-key", "k1")];
    assert_eq!(send(gateway.clone(), post(&valid_order(), &key)).await.0, StatusCode::SERVICE_UNAVAILABLE);
    backend.down.store(false, Ordering::SeqCst);
    let mut other = valid_order();
    other["items"][0]["quantity"] = json!(1);
    assert_eq!(send(gateway.clone(), post(&other, &key)).await.0, StatusCode::ACCEPTED, "never placed, so not bound");
}

#[tokio::test]
async fn empty_long_or_invisible_keys_are_400() {
    let backend = Arc::new(TwinBackend::default());
    let long = "k".repeat(MAX_KEY_LEN + 1);
    for key in [&b""[..], long.as_bytes(), b"has space", b"tab\tkey", "caf\u{e9}".as_bytes()] {
        let mut request = post(&valid_order(), &[]);
        request.headers_mut().insert("idempotency-key", axum::http::HeaderValue::from_bytes(key).unwrap());
        let (status, body) = send(app(backend.clone()), request).await;
        let label = String::from_utf8_lossy(key);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_idempotency_key")),
            "{label:?}: {body}"
        );
    }
    let two = post(&valid_order(), &[("idempotency-key", "a"), ("idempotency-key", "b")]);
    assert_eq!(send(app(backend.clone()), two).await.0, StatusCode::BAD_REQUEST);
    assert!(backend.placed.lock().unwrap().is_empty());
    let longest = "k".repeat(MAX_KEY_LEN);
    let (status, _) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", &longest)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{MAX_KEY_LEN} visible characters are fine");
}

#[tokio::test]
async fn unknown_order_health_and_page() {
    let backend = Arc::new(TwinBackend::default());
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    assert_eq!(send(app(backend.clone()), get("/order/nope")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(send(app(backend.clone()), get("/order/bad%20id")).await.0, StatusCode::NOT_FOUND);
    let (status, body) = send(app(backend.clone()), get("/health")).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let page = app(backend).oneshot(get("/")).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = axum::body::to_bytes(page.into_body(), 1 << 20).await.unwrap();
    assert!(String::from_utf8_lossy(&html).contains("<form"));
}

#[tokio::test]
async fn every_error_is_json_with_a_code() {
    let app = || app(Arc::new(TwinBackend::default()));
    let too_large = json!({ "customer": { "name": "x".repeat(MAX_BODY_BYTES) } });
    let cases = [
        (Request::get("/nowhere").body(Body::empty()).unwrap(), StatusCode::NOT_FOUND, "not_found"),
        (Request::get("/order").body(Body::empty()).unwrap(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (post(&too_large, &[]), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        (
            Request::post("/order").header("content-type", "text/plain").body(Body::from("{}")).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Request::post("/order").header("content-type", "application/json").body(Body::from("{")).unwrap(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (Request::get("/order/%FF").body(Body::empty()).unwrap(), StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (request, status, code) in cases {
        let uri = request.uri().clone();
        let (got, body) = send(app(), request).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{uri}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{uri}: {body}");
    }
    let response = app().oneshot(Request::get("/order").body(Body::empty()).unwrap()).await.unwrap();
    assert!(response.headers().contains_key("allow"), "405 keeps its Allow header");
}

#[tokio::test]
async fn a_request_not_answered_in_time_is_408_and_nothing_is_published() {
    let backend = Arc::new(TwinBackend { stuck: true, ..TwinBackend::default() });
    let settings = Settings { request_timeout: Duration::from_millis(100), ..Settings::default() };
    let started = std::time::Instant::now();
    let (status, body) =
        send(app_with(backend.clone(), settings), Request::get("/order/o1").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::REQUEST_TIMEOUT, Some("request_timeout")));
    let (status, _) =
        send(app_with(backend.clone(), settings), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(backend.placed.lock().unwrap().is_empty());
}

/// A real server on a free port, its address and its shutdown switch.
async fn serve_on_a_port(settings: Settings) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = app_with(Arc::new(TwinBackend::default()), settings);
    tokio::spawn(serve(listener, router, settings, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let connections = ConnectionLimits { idle_timeout: Duration::from_millis(300), ..ConnectionLimits::default() };
    let settings = Settings { connections, ..Settings::default() };
    let (addr, _stop) = serve_on_a_port(settings).await;
    // A whole request is answered.
    let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
    whole.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    whole.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Headers that never end: the server closes the connection.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open after 5 s");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2), "closed after {elapsed:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"), "no answer to a request never finished");
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let (addr, stop) = serve_on_a_port(Settings::default()).await;
    stop.send(()).unwrap();
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the port is released after shutdown");
}

#[tokio::test]
async fn orders_are_taken_while_the_order_services_state_cannot_be_read() {
    let backend = Arc::new(TwinBackend { store_down: true, ..TwinBackend::default() });
    let (status, body) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "taking orders needs the broker, not the database: {body}");
    assert_eq!(backend.placed.lock().unwrap().len(), 1);
}

fn line(sku: &str, quantity: u32, price: Option<u64>) -> serde_json::Value {
    let mut order = valid_order();
    order["items"] = json!([{ "sku": sku, "quantity": quantity }]);
    if let Some(price) = price {
        order["items"][0]["unit_price_cents"] = json!(price);
    }
    order
}

#[tokio::test]
async fn a_price_that_is_not_the_catalogs_is_422_and_nothing_is_published() {
    let backend = Arc::new(TwinBackend::default());
    // The issue's order: a lamp at one cent.
    let (status, body) = send(app(backend.clone()), post(&line("lamp", 3, Some(1)), &[])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("price_mismatch")));
    assert_eq!(
        body["error"]["fields"],
        json!([{ "field": "items[0].unit_price_cents", "message": "the price of lamp is 3400 cents, not 1" }])
    );
    assert!(backend.placed.lock().unwrap().is_empty() && backend.vault.lock().unwrap().is_empty());
    // Without a price, or at the catalog's, the shop prices it.
    for order in [line("lamp", 2, None), line("lamp", 2, Some(3400))] {
        let (status, body) = send(app(backend.clone()), post(&order, &[])).await;
        assert_eq!((status, body["total_cents"].as_u64()), (StatusCode::ACCEPTED, Some(6800)));
    }
    let placed = backend.placed.lock().unwrap().clone();
    assert!(placed.iter().all(|o| o.items[0].unit_price_cents == 3400 && o.total_cents == 6800));
}

#[tokio::test]
async fn unknown_skus_are_invalid_fields_and_a_catalog_that_cannot_be_read_is_503() {
    let backend = Arc::new(TwinBackend::default());
    let (status, body) = send(app(backend.clone()), post(&line("unicorn", 1, Some(1250)), &[])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_order")));
    assert_eq!(body["error"]["fields"][0]["field"], "items[0].sku");
    let down = Arc::new(TwinBackend { catalog_down: true, ..TwinBackend::default() });
    let (status, body) = send(app(down.clone()), post(&valid_order(), &[])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")));
    assert!(down.placed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_catalog_is_the_order_services_read_once_per_ttl() {
    let backend = Arc::new(TwinBackend::default());
    let gateway = app(backend.clone());
    let (status, body) = send(gateway.clone(), Request::get("/catalog").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"].as_array().unwrap().len(), 3);
    let lamp = body["items"].as_array().unwrap().iter().find(|i| i["sku"] == "lamp").unwrap().clone();
    assert_eq!(lamp, json!({ "sku": "lamp", "name": "Lamp", "unit_price_cents": 3400, "remaining": 3 }));
    for _ in 0..5 {
        send(gateway.clone(), post(&valid_order(), &[])).await;
    }
    assert_eq!(backend.catalog_reads.load(Ordering::SeqCst), 1, "one read for the page and five orders");
}

#[tokio::test]
async fn a_vault_that_cannot_take_the_card_is_503_and_nothing_is_published() {
    let backend = Arc::new(TwinBackend { vault_down: true, ..TwinBackend::default() });
    let key = [("idempotency-key", "k1")];
    let (status, body) = send(app(backend.clone()), post(&valid_order(), &key)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")));
    assert!(!body.to_string().contains("vault store down"), "no internals: {body}");
    assert!(backend.placed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_card_is_not_part_of_the_request_hash_nor_the_order_id() {
    let backend = Arc::new(TwinBackend::default());
    let key = [("idempotency-key", "k1")];
    let (_, first) = send(app(backend.clone()), post(&valid_order(), &key)).await;
    let mut other_card = valid_order();
    other_card["payment"]["card_number"] = json!("4000 0000 0000 0002");
    let (status, again) = send(app(backend.clone()), post(&other_card, &key)).await;
    assert_eq!((status, &again["order_id"]), (StatusCode::ACCEPTED, &first["order_id"]), "the same request");
    assert_eq!(backend.placed.lock().unwrap().len(), 1);
    let binding = backend.placed.lock().unwrap()[0].idempotency.clone().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("idempotency-key", "k1".parse().unwrap());
    let (expected_id, expected) = idempotency::bind(
        &idempotency::key_of(&headers).unwrap().unwrap(),
        &shop_events::Customer { name: "Ada Lovelace".into(), email: "ada@example.com".into() },
        &[shop_events::LineItem { sku: "book".into(), quantity: 2, unit_price_cents: 1250 }],
    );
    assert_eq!((first["order_id"].as_str(), &binding), (Some(expected_id.to_string().as_str()), &expected));
}

#[tokio::test]
async fn order_status_answers_no_customer_and_no_request_hash() {
    let backend = Arc::new(TwinBackend::default());
    let (_, accepted) = send(app(backend.clone()), post(&valid_order(), &[("idempotency-key", "k1")])).await;
    let uri = format!("/order/{}", accepted["order_id"].as_str().unwrap());
    let (status, body) = send(app(backend.clone()), Request::get(uri).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let text = body.to_string();
    for hidden in ["customer", "Ada", "ada@example.com", "request_hash", "event_id", "tok_"] {
        assert!(!text.contains(hidden), "{hidden} in {text}");
    }
    assert_eq!(body["history"][0], json!({ "status": "PENDING", "at_ms": 1, "note": "order placed" }));
    assert_eq!(body["total_cents"], 2500);
}
