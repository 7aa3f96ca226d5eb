//! The admin API, on loopback only and behind a bearer token: lists the
//! versions of each component and reloads one at runtime.
//!
//! - `GET /components`: current version, load time and history of each.
//! - `POST /components/{name}/reload`: body = new component bytes, or empty
//!   to reload the file named in the manifest.
//! - `POST /components/{name}/rollback`: serve again the version the last
//!   reload replaced (the host keeps the last four, compiled); 409 if none.
//! - `GET /dlq?component=&since=`: the dead letters (see [`crate::kafka::dlq`]).
//! - `POST /dlq/replay`: `{"ids": ["0/42"]}` or `{"all": true, "component":
//!   "email"}`; answers what was replayed and what was refused, and why.
//! - `/components/{name}/shadow…`: shadow runs (see [`shadow`]).
//! - `GET /overview`, and `GET /console` (the one route without a token: a
//!   page that asks for it and reads `/overview`): see [`console`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

mod shadow;

pub use console::{ConsoleSettings, RecentOrders, Recording};
pub use shadow::{render as render_shadow, render_trial};

use crate::kafka::dlq::{DeadLetters, Filter, Selection};
use crate::runtime::ServiceRuntime;
use crate::status::ConsumerStatus;

/// Largest component accepted by upload.
const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// A service the admin API can reload, with the file it was loaded from.
#[derive(Clone)]
pub struct Managed {
    pub service: Arc<ServiceRuntime>,
    pub wasm: PathBuf,
    /// Its consumer's status, if this host consumes for it (the console's
    /// status, rate and lag); `None` when it only answers the gateway.
    pub status: Option<ConsumerStatus>,
}

#[derive(Clone)]
struct Admin {
    services: Arc<BTreeMap<String, Managed>>,
    token: Arc<str>,
    dead_letters: Option<DeadLetters>,
    console: Arc<console::Console>,
}

/// The admin router. Every route but `/console` (a page without data)
/// requires `Authorization: Bearer {token}`,
/// checked before anything of the request's body is read. Without
/// `dead_letters`, the `/dlq` routes answer 404.
pub fn admin_app(services: BTreeMap<String, Managed>, token: &str, dead_letters: Option<DeadLetters>) -> Router {
    admin_app_with_console(services, token, dead_letters, ConsoleSettings::default())
}

/// [`admin_app`] with what the console shows beyond the components.
pub fn admin_app_with_console(
    services: BTreeMap<String, Managed>,
    token: &str,
    dead_letters: Option<DeadLetters>,
    console: ConsoleSettings,
) -> Router {
    let console = Arc::new(console::Console::new(console));
    let admin = Admin { services: Arc::new(services), token: token.into(), dead_letters, console };
    Router::new()
        .route("/components", get(list))
        .route("/overview", get(console::overview))
        .route("/components/{name}/reload", post(reload))
        .route("/components/{name}/rollback", post(roll_back))
        .route("/dlq", get(dlq_list))
        .route("/dlq/replay", post(dlq_replay))
        .merge(shadow::routes())
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .route_layer(axum::middleware::from_fn_with_state(admin.clone(), require_token))
        // After the token layer: the page is public, its data is not.
        .route("/console", get(console::page))
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

/// Whether `presented` is the token, in time independent of both its
/// length and where the first difference is: both are hashed to 32 bytes
/// first, and the digests are compared without an early exit. (Comparing
/// the raw bytes would answer a wrong length at once, and so tell a
/// caller timing the answers how long the token is.)
fn same(presented: &[u8], token: &[u8]) -> bool {
    use sha2::Digest as _;
    let (a, b) = (sha2::Sha256::digest(presented), sha2::Sha256::digest(token));
    // black_box: the optimizer must not turn the fold into an early exit.
    std::hint::black_box(a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// The admin token for the command line: from `file` if given (its first
/// line, without the line end), else from the variable `HOST_ADMIN_TOKEN`;
/// `None` if neither gives one. `given_as_argument`: a token was passed as
/// `--token`/`--admin-token`, which is refused, since every user of the
/// machine sees a process's arguments (`ps`, `/proc/PID/cmdline`).
///
/// # Errors
/// A token given as an argument, or a file that cannot be read or is empty.
pub fn read_token(given_as_argument: bool, file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    anyhow::ensure!(
        !given_as_argument,
        "the admin token is not accepted as an argument (every user sees arguments in `ps`): \
         set HOST_ADMIN_TOKEN, or HOST_ADMIN_TOKEN_FILE (--token-file / --admin-token-file) to a file holding it"
    );
    let Some(file) = file else {
        return Ok(std::env::var("HOST_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|err| anyhow::anyhow!("cannot read the admin token file {file:?}: {err}"))?;
    let token = text.lines().next().unwrap_or_default().trim_end_matches('\r');
    anyhow::ensure!(!token.is_empty(), "the admin token file {file:?} is empty");
    Ok(Some(token.to_owned()))
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

async fn roll_back(State(admin): State<Admin>, Path(name): Path<String>) -> Response {
    let Some(managed) = admin.services.get(&name) else {
        return error(StatusCode::NOT_FOUND, "unknown_component", &format!("no component named {name:?}"));
    };
    match managed.service.roll_back().await {
        Ok(restored) => Json(json!({ "component": name, "version": restored.sha256 })).into_response(),
        Err(err) => error(StatusCode::CONFLICT, "no_previous_version", &err.to_string()),
    }
}

/// Query of `GET /dlq`.
#[derive(Debug, serde::Deserialize)]
struct DlqQuery {
    component: Option<String>,
    since: Option<String>,
}

/// Body of `POST /dlq/replay`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
    component: Option<String>,
}

/// The answer of a `/dlq` route on a host that reads no dead-letter topic.
fn no_dead_letters() -> Response {
    error(StatusCode::NOT_FOUND, "no_dlq", "this host reads no dead-letter topic")
}

/// Logs what the broker said once, and answers without it.
fn unavailable(err: &anyhow::Error) -> Response {
    tracing::error!("dead-letter topic: {err:#}");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "dlq_unavailable",
        "the dead-letter topic cannot be read or written now; see the host's log",
    )
}

async fn dlq_list(State(admin): State<Admin>, Query(query): Query<DlqQuery>) -> Response {
    let Some(dead_letters) = admin.dead_letters.as_ref() else { return no_dead_letters() };
    let now_ms = i64::try_from(crate::clock::unix_ms(std::time::SystemTime::now())).unwrap_or(i64::MAX);
    let since_ms =
        match query.since.as_deref().filter(|s| !s.is_empty()).map(|s| crate::kafka::dlq::parse_since(s, now_ms)) {
            Some(Err(message)) => return error(StatusCode::BAD_REQUEST, "invalid_since", &message),
            Some(Ok(ms)) => Some(ms),
            None => None,
        };
    let filter = Filter { component: query.component.filter(|c| !c.is_empty()), since_ms };
    match dead_letters.list(&filter).await {
        Ok(letters) => Json(json!({ "topic": dead_letters.topic(), "dead_letters": letters })).into_response(),
        Err(err) => unavailable(&err),
    }
}

async fn dlq_replay(State(admin): State<Admin>, body: Bytes) -> Response {
    let Some(dead_letters) = admin.dead_letters.as_ref() else { return no_dead_letters() };
    let selection = serde_json::from_slice::<ReplayBody>(&body)
        .map_err(|err| {
            format!(
                "expected {{\"ids\": [\"PARTITION/OFFSET\", ...]}} or {{\"all\": true, \"component\": NAME}}: {err}"
            )
        })
        .and_then(|body| Selection::new(&body.ids, body.all, body.component));
    let selection = match selection {
        Ok(selection) => selection,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_selection", &message),
    };
    match dead_letters.replay(&selection).await {
        Ok(report) => {
            console::forget_dead_letters(&admin.console).await;
            Json(report).into_response()
        }
        Err(err) => unavailable(&err),
    }
}

mod console;
#[cfg(test)]
mod tests;
