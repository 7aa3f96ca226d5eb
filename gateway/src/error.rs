//! The gateway's one error type: a status, a stable code and a message.

use axum::Json;
use axum::http::StatusCode;
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
    /// No such resource.
    NotFound(String),
    /// Kafka or the order service failed.
    Backend(BackendError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, fields) = match self {
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
