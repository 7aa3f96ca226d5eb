//! The admin API, on loopback only and behind a bearer token: lists the
//! versions of each component and reloads one at runtime.
//!
//! - `GET /components`: current version, load time and history of each.
//! - `POST /components/{name}/reload`: body = new component bytes, or empty
//!   to reload the file named in the manifest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::runtime::ServiceRuntime;

/// Largest component accepted by upload.
const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// A service the admin API can reload, with the file it was loaded from.
#[derive(Clone)]
pub struct Managed {
    pub service: Arc<ServiceRuntime>,
    pub wasm: PathBuf,
}

#[derive(Clone)]
struct Admin {
    services: Arc<BTreeMap<String, Managed>>,
    token: Arc<str>,
}

/// The admin router. Every route requires `Authorization: Bearer {token}`,
/// checked before anything of the request's body is read.
pub fn admin_app(services: BTreeMap<String, Managed>, token: &str) -> Router {
    let admin = Admin { services: Arc::new(services), token: token.into() };
    Router::new()
        .route("/components", get(list))
        .route("/components/{name}/reload", post(reload))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .route_layer(axum::middleware::from_fn_with_state(admin.clone(), require_token))
        .with_state(admin)
}

/// Refuses a request without the token before its handler (and the body
/// extractor) runs: an unauthenticated client cannot make the host read,
/// let alone buffer, an upload.
async fn require_token(
    State(admin): State<Admin>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !authorized(&admin, request.headers()) {
        return unauthorized();
    }
    next.run(request).await
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The refusal of a request without the right token.
fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, "unauthorized", "a valid `Authorization: Bearer TOKEN` is required")
}

fn authorized(admin: &Admin, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    same(presented.as_bytes(), admin.token.as_bytes())
}

async fn list(State(admin): State<Admin>) -> Response {
    let components: BTreeMap<&String, serde_json::Value> = admin
        .services
        .iter()
        .map(|(name, managed)| {
            let current = managed.service.current();
            let loaded_at_ms = crate::clock::unix_ms(current.loaded_at);
            let value = json!({
                "current": { "version": current.sha256, "source": current.path, "loaded_at_ms": loaded_at_ms },
                "history": managed.service.history(),
            });
            (name, value)
        })
        .collect();
    Json(components).into_response()
}

async fn reload(State(admin): State<Admin>, Path(name): Path<String>, body: Bytes) -> Response {
    let Some(managed) = admin.services.get(&name) else {
        return error(StatusCode::NOT_FOUND, "unknown_component", &format!("no component named {name:?}"));
    };
    let (source, bytes) = if body.is_empty() {
        match tokio::fs::read(&managed.wasm).await {
            Ok(bytes) => (managed.wasm.display().to_string(), bytes),
            Err(err) => {
                let message = format!("cannot read {:?}: {err}", managed.wasm);
                return error(StatusCode::UNPROCESSABLE_ENTITY, "unreadable", &message);
            }
        }
    } else {
        ("admin upload".to_owned(), body.to_vec())
    };
    match managed.service.reload(&source, bytes).await {
        Ok(component) => {
            Json(json!({ "component": name, "version": component.sha256, "source": source })).into_response()
        }
        Err(err) => error(StatusCode::UNPROCESSABLE_ENTITY, "rejected", &err.to_string()),
    }
}

#[cfg(test)]
mod tests;
