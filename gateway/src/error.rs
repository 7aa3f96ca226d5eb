//! The gateway's one error type: a status, a stable code and a message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::{BackendError, FieldError};

/// Every error the gateway answers with.
#[derive(Debug)]
pub enum ApiError {
    /// The body is not JSON of the expected shape.
    MalformedJson(String),
    /// `Content-Type` is not `application/json`.
    UnsupportedMediaType,
    /// Fields failed validation.
    Validation(Vec<FieldError>),
    /// Valid, but prices the client sent are not the catalog's.
    PriceMismatch(Vec<FieldError>),
    /// The `Idempotency-Key` header is empty, too long, not visible ASCII,
    /// or sent more than once.
    InvalidIdempotencyKey(String),
    /// The `Idempotency-Key` was already used for a different order.
    IdempotencyKeyReused,
    /// The request was not read and answered within this time.
    Timeout(std::time::Duration),
    /// No such resource.
    NotFound(String),
    /// Kafka or the order service failed.
    Backend(BackendError),
    /// The order was not sent (the broker is unreachable): not placed.
    Unavailable(String),
    /// The order was sent but not acknowledged in time: it may still be
    /// placed, under `order_id`.
    Unconfirmed { order_id: String, reason: String },
}

/// Seconds a client is asked to wait before retrying a `503`.
pub const RETRY_AFTER_SECS: u64 = 2;

impl IntoResponse for ApiError {
    /// The error's answer; every `503` asks the client to come back after
    /// [`RETRY_AFTER_SECS`].
    fn into_response(self) -> Response {
        let mut response = self.answer();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl ApiError {
    /// The error's response, before [`IntoResponse`] adds `Retry-After`: a
    /// status and a JSON body `{"error": {"code", "message", ...}}`, with the
    /// invalid `fields` when there are some; a backend failure is logged.
    fn answer(self) -> Response {
        let (status, code, message, fields) = match self {
            ApiError::Unavailable(reason) => return not_placed(&reason),
            ApiError::Unconfirmed { order_id, reason } => return not_confirmed(&order_id, &reason),
            ApiError::MalformedJson(detail) => (
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("request body is not a valid order: {detail}"),
                None,
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the order as application/json".to_owned(),
                None,
            ),
            ApiError::Validation(fields) => {
                (StatusCode::BAD_REQUEST, "invalid_order", "some fields are invalid".to_owned(), Some(fields))
            }
            // Refused rather than charged at the catalog's price: the client
            // showed its customer another price, which they agreed to; they
            // must see the real one (GET /catalog) and order again.
            ApiError::PriceMismatch(fields) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "price_mismatch",
                "the order's prices are not the shop's: read GET /catalog and order again at its prices \
                 (or send no unit_price_cents)"
                    .to_owned(),
                Some(fields),
            ),
            ApiError::InvalidIdempotencyKey(message) => {
                (StatusCode::BAD_REQUEST, "invalid_idempotency_key", message, None)
            }
            ApiError::IdempotencyKeyReused => (
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different order; send a new key for a new order \
                 (a retry must repeat the same order exactly)"
                    .to_owned(),
                None,
            ),
            ApiError::Timeout(limit) => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request was not read and answered within {limit:?}; an order may still be placed: \
                     retry it with the same Idempotency-Key"
                ),
                None,
            ),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message, None),
            ApiError::Backend(err) => {
                // Logged once here; the client gets no internals.
                tracing::error!("gateway backend failure: {err}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the order could not be processed now; please retry".to_owned(),
                    None,
                )
            }
        };
        let mut body = json!({ "error": { "code": code, "message": message } });
        if let Some(fields) = fields {
            body["error"]["fields"] = json!(fields);
        }
        (status, Json(body)).into_response()
    }
}

/// The `503` of an order not sent because the broker is unreachable: it is
/// not placed. Logs `reason`.
fn not_placed(reason: &str) -> Response {
    tracing::warn!("order refused: {reason}");
    let message = "the order was not placed: the message broker is unreachable; please retry";
    let body = json!({ "error": { "code": "unavailable", "message": message } });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// The `503` of an order sent but not acknowledged in time: it may still be
/// placed, so the body names `order_id` and where to look it up. Logs
/// `reason`.
fn not_confirmed(order_id: &str, reason: &str) -> Response {
    tracing::warn!(%order_id, "order not confirmed: {reason}");
    let body = json!({ "error": {
        "code": "not_confirmed",
        "message": "the broker did not confirm the order in time: it is most likely not placed, but may be; \
                    retry with the same Idempotency-Key, which never places it twice",
        "order_id": order_id,
        "status_url": format!("/order/{order_id}"),
    } });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
