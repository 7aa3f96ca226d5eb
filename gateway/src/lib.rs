//! The API gateway and web frontend: validates orders, publishes them
//! through a [`Backend`] and serves their status and the order page.
//!
//! Routes: `GET /` (frontend), `GET /health`, `GET /catalog`, `POST /order`,
//! `GET /order/{id}`, `GET /openapi.json` (the document of them all). Every
//! error is JSON: `{"error": {"code", "message"}}`. [`serve`] bounds every
//! connection; each client has a rate for orders and one for everything
//! else.
//!
//! Trust: prices come from the order service's catalog, never from the
//! client; the card number goes to the host's vault and only its token
//! leaves the gateway; `GET /order/{id}` answers an allowlist of the order's
//! fields (no customer, no request hash).

mod catalog;
mod error;
mod idempotency;
mod limits;
mod request;
mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use shop_events::{CardToken, CatalogItem, OrderPlaced};

pub use catalog::{CATALOG_TTL, Catalog, CatalogCache};
pub use error::ApiError;
pub use idempotency::{IdempotencyKey, InvalidKey, MAX_KEY_LEN};
pub use limits::RateLimits;
pub use request::{FieldError, OrderRequest, Refusal, ValidOrder};
pub use server::{ConnectionLimits, serve, serve_with};

/// A boxed future, as the [`Backend`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend failure; its message is logged, never shown to clients.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// Why an order was not placed; the message is logged, never shown.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// Not sent: the order is certainly not placed.
    #[error("not sent: {0}")]
    NotSent(String),
    /// Sent but not acknowledged: it may still be placed (a retry with the
    /// same `Idempotency-Key` then returns it, never a second order).
    #[error("not confirmed: {0}")]
    Unconfirmed(String),
}

/// What the gateway needs from the rest of the system (the host provides
/// Kafka and the order service; tests provide a twin).
pub trait Backend: Send + Sync + 'static {
    /// Publishes `OrderPlaced`; resolves only once the broker acknowledged it.
    ///
    /// # Errors
    /// [`PlaceError`] when it was not acknowledged.
    fn place_order(&self, order: OrderPlaced) -> BoxFuture<'_, Result<(), PlaceError>>;

    /// Why orders cannot be taken right now (the broker is unreachable), if
    /// so: they are refused at once, and `/health` says `degraded`.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// The request hash an `Idempotency-Key` is bound to (by its digest,
    /// see [`shop_events::IdempotencyBinding`]), `None` if the key is unused.
    ///
    /// # Errors
    /// [`BackendError`] when the order service cannot answer.
    fn idempotency(&self, key_digest: &str) -> BoxFuture<'_, Result<Option<String>, BackendError>>;

    /// The order's current state and history as JSON, `None` if unknown.
    ///
    /// # Errors
    /// [`BackendError`] when the order service cannot answer.
    fn order_status(&self, order_id: &str) -> BoxFuture<'_, Result<Option<serde_json::Value>, BackendError>>;

    /// What the shop sells: the order service's catalog.
    ///
    /// # Errors
    /// [`BackendError`] when the order service cannot answer.
    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogItem>, BackendError>>;

    /// Deposits a card number (digits only) in the host's vault and returns
    /// the token events carry instead; the number goes nowhere else.
    ///
    /// # Errors
    /// [`BackendError`] when the vault cannot store it (the order is then
    /// not sent).
    ///
    /// The card pays for `order_id`: a retry of the same order must get the
    /// same token (and the card first given), so that the `OrderPlaced` it
    /// publishes again is the same event.
    fn vault_card(&self, order_id: &str, number: String) -> BoxFuture<'_, Result<CardToken, BackendError>>;
}

/// Largest request body accepted (an order is a few KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long the gateway waits on its backend and on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Longest wait for the broker's acknowledgement of an order before
    /// answering `503`.
    pub publish_timeout: Duration,
    /// Longest time from the request's headers to its answer (reading the
    /// body included) before answering `408 request_timeout`. Above
    /// `publish_timeout`, so that an order's own `503` comes first.
    pub request_timeout: Duration,
    /// Connections open at once, how long one may stay idle (no request in
    /// flight, before its first byte included) and take to send a
    /// request's headers; see [`serve`].
    pub connections: ConnectionLimits,
    /// Requests per second per client, orders apart from the rest.
    pub rates: RateLimits,
    /// `GET /order/{id}` queries in flight at once; one more waits up to a
    /// second, then is answered `503 busy`. Below the order component's
    /// query slots, so that `POST /order`'s idempotency check always finds
    /// one free.
    pub status_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            publish_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            connections: ConnectionLimits::default(),
            rates: RateLimits::default(),
            status_concurrency: 3,
        }
    }
}

#[derive(Clone)]
struct Gateway {
    backend: Arc<dyn Backend>,
    settings: Settings,
    claims: Arc<idempotency::Claims>,
    status_slots: Arc<tokio::sync::Semaphore>,
    catalog: Arc<CatalogCache>,
}

/// The gateway's router with the default [`Settings`].
pub fn app(backend: Arc<dyn Backend>) -> Router {
    app_with(backend, Settings::default())
}

/// The gateway's router. Every error it answers is JSON
/// (`{"error": {"code", "message"}}`), its own and axum's alike.
pub fn app_with(backend: Arc<dyn Backend>, settings: Settings) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/catalog", get(catalog))
        .route("/order", post(place_order))
        .route("/order/{id}", get(order_status))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(settings.request_timeout, time_limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(limits::RateLimiter::new(settings.rates)),
            limits::rate_limit,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(Gateway {
            backend,
            settings,
            claims: Arc::default(),
            status_slots: Arc::new(tokio::sync::Semaphore::new(settings.status_concurrency.max(1))),
            catalog: Arc::default(),
        })
}

/// Answers `408` when a request (its body included) is not answered within
/// `limit`; the handler is dropped.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}

/// The OpenAPI document of every route and answer, checked against the
/// router by the tests.
pub const OPENAPI_JSON: &str = include_str!("../static/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}: try POST /order or GET /order/{{id}}", uri.path()))
}

/// Re-shapes the errors axum answers by itself as plain text (a wrong
/// method, a body over [`MAX_BODY_BYTES`], a path it cannot parse) into the
/// gateway's JSON error, keeping their status and headers (e.g. `Allow`).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let message = text.ok().filter(|t| !t.is_empty()).unwrap_or_else(|| status.to_string());
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    };
    let mut reshaped = (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            reshaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    reshaped
}

const INDEX_HTML: &str = include_str!("../static/index.html");

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn health(State(gateway): State<Gateway>) -> Response {
    let (code, status, reason) = match gateway.backend.unavailable() {
        None => (StatusCode::OK, "ok", None),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, "degraded", Some(reason)),
    };
    let body =
        json!({ "status": status, "component": "gateway", "version": env!("CARGO_PKG_VERSION"), "reason": reason });
    (code, Json(body)).into_response()
}

/// `GET /catalog`: what the shop sells, at its prices, with what is left
/// (read from the order service at most once per [`CATALOG_TTL`]).
async fn catalog(State(gateway): State<Gateway>) -> Result<Response, ApiError> {
    let catalog = gateway.catalog.get(&*gateway.backend).await.map_err(ApiError::Backend)?;
    Ok(Json(json!({ "items": catalog.items() })).into_response())
}

async fn place_order(
    State(Gateway { backend, settings, claims, catalog, .. }): State<Gateway>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if !headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
    {
        return Err(ApiError::UnsupportedMediaType);
    }
    let key = idempotency::key_of(&headers).map_err(|err| ApiError::InvalidIdempotencyKey(err.0.to_owned()))?;
    let request: OrderRequest =
        serde_json::from_slice(&body).map_err(|err| ApiError::MalformedJson(err.to_string()))?;
    let catalog = catalog.get(&*backend).await.map_err(ApiError::Backend)?;
    let placed = request.validate(key.as_ref(), &catalog).map_err(|refusal| match refusal {
        Refusal::Invalid(fields) => ApiError::Validation(fields),
        Refusal::PriceMismatch(fields) => ApiError::PriceMismatch(fields),
    })?;
    let order_id = placed.order_id.clone();
    let total_cents = placed.total_cents;
    let binding = placed.idempotency.clone();
    if let Some(binding) = &binding {
        // A retry of a recorded order is answered without sending it again
        // (even while the broker is unreachable); another order under a
        // bound key is refused without naming the order the key is bound to.
        // If the order service's state cannot be read, the order goes on
        // all the same: the order service still ignores another body under
        // a bound key, just the early 409 is lost meanwhile. (Whether it is
        // placed then depends on the vault, below: where the vault shares
        // that store, as on PostgreSQL, it is refused 503 until it is back.)
        let bound = backend.idempotency(&binding.key_digest).await.unwrap_or_else(|err| {
            tracing::warn!("Idempotency-Key lookup failed, the order is sent anyway: {err}");
            None
        });
        match bound {
            Some(hash) if hash == binding.request_hash => {
                let status = match backend.order_status(&order_id).await {
                    Ok(Some(order)) => order["status"].as_str().unwrap_or("PENDING").to_owned(),
                    _ => "PENDING".to_owned(),
                };
                return Ok(accepted(&order_id, &status, total_cents));
            }
            Some(_) => return Err(ApiError::IdempotencyKeyReused),
            None if !claims.claim(binding) => return Err(ApiError::IdempotencyKeyReused),
            None => {}
        }
    }
    // Refused at once while the broker is unreachable: certainly not placed.
    if let Some(reason) = backend.unavailable() {
        binding.iter().for_each(|binding| claims.release(binding));
        return Err(ApiError::Unavailable(reason));
    }
    // The number goes to the vault; the event carries its token.
    let card = match backend.vault_card(&order_id, placed.card_number.clone()).await {
        Ok(card) => card,
        Err(err) => {
            binding.iter().for_each(|binding| claims.release(binding));
            return Err(ApiError::Backend(BackendError(format!("the vault did not take the card: {err}"))));
        }
    };
    let placed = placed.placed(card);
    let unconfirmed = |reason: String| ApiError::Unconfirmed { order_id: order_id.clone(), reason };
    match tokio::time::timeout(settings.publish_timeout, backend.place_order(placed)).await {
        Ok(Ok(())) => {}
        Ok(Err(PlaceError::NotSent(reason))) => {
            binding.iter().for_each(|binding| claims.release(binding));
            return Err(ApiError::Unavailable(reason));
        }
        // It may be placed: the key stays claimed for this order.
        Ok(Err(PlaceError::Unconfirmed(reason))) => return Err(unconfirmed(reason)),
        Err(_) => return Err(unconfirmed(format!("no acknowledgement within {:?}", settings.publish_timeout))),
    }
    Ok(accepted(&order_id, "PENDING", total_cents))
}

/// `202 Accepted` for an order the broker acknowledged (now or before).
fn accepted(order_id: &str, status: &str, total_cents: u64) -> Response {
    let body = json!({
        "order_id": order_id,
        "status": status,
        "total_cents": total_cents,
        "status_url": format!("/order/{order_id}"),
    });
    (StatusCode::ACCEPTED, [(header::LOCATION, format!("/order/{order_id}"))], Json(body)).into_response()
}

async fn order_status(
    State(Gateway { backend, status_slots, .. }): State<Gateway>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::NotFound(format!("no order {id:?}")));
    }
    // Bounded apart from orders: a flood of these never takes the order
    // service's last query slot, which `POST /order` needs.
    let Ok(Ok(_slot)) = tokio::time::timeout(Duration::from_secs(1), status_slots.acquire()).await else {
        return Ok(limits::busy());
    };
    match backend.order_status(&id).await.map_err(ApiError::Backend)? {
        Some(order) => Ok(Json(public_view(order)).into_response()),
        None => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

/// The fields of an order `GET /order/{id}` answers: its progress, lines,
/// money and card brand and last four digits. Not the customer's name or
/// email (whoever placed it knows them; anyone else holding the id should
/// not learn them), nor the idempotency request hash, nor anything the
/// order service adds later until it is listed here.
pub const PUBLIC_ORDER_FIELDS: [&str; 11] = [
    "order_id",
    "status",
    "items",
    "total_cents",
    "card",
    "payment_id",
    "reason",
    "deadline_ms",
    "reserved",
    "compensation",
    "history",
];

/// The fields of a history step answered (not the internal event id).
const PUBLIC_STEP_FIELDS: [&str; 3] = ["status", "at_ms", "note"];

fn public_view(order: serde_json::Value) -> serde_json::Value {
    let keep = |value: &serde_json::Value, fields: &[&str]| -> serde_json::Map<String, serde_json::Value> {
        fields.iter().filter_map(|f| value.get(*f).map(|v| ((*f).to_owned(), v.clone()))).collect()
    };
    let mut view = keep(&order, &PUBLIC_ORDER_FIELDS);
    if let Some(history) = view.get_mut("history").and_then(|h| h.as_array_mut()) {
        for step in history.iter_mut() {
            *step = serde_json::Value::Object(keep(step, &PUBLIC_STEP_FIELDS));
        }
    }
    serde_json::Value::Object(view)
}

#[cfg(test)]
mod tests;
