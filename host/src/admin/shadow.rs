//! The admin API's shadow runs (see [`crate::runtime::Shadow`]):
//!
//! - `POST /components/{name}/shadow`: body = the candidate's bytes; starts
//!   a run (ending the one on) and answers its report.
//! - `GET /components/{name}/shadow`: the report of the run on, or of the
//!   last one; 404 if none ran since the host started.
//! - `POST /components/{name}/shadow/promote`: serves the candidate (a
//!   reload, under the canary watch) and ends the run.
//! - `POST /components/{name}/shadow/stop`: ends the run.
//! - `POST /components/{name}/shadow/replay-dlq`: body = a candidate's
//!   bytes; runs it over the component's dead letters, nothing kept.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::Value;

use super::{Admin, Managed, error};
use crate::kafka::dlq::{Filter, Origin};
use crate::runtime::ShadowError;

/// The shadow routes.
pub(super) fn routes() -> Router<Admin> {
    use axum::routing::post;
    Router::new()
        .route("/components/{name}/shadow", post(start).get(status))
        .route("/components/{name}/shadow/promote", post(promote))
        .route("/components/{name}/shadow/stop", post(stop))
        .route("/components/{name}/shadow/replay-dlq", post(replay_dlq))
}

#[allow(clippy::result_large_err)] // a Response, answered at once
fn managed<'a>(admin: &'a Admin, name: &str) -> Result<&'a Managed, Response> {
    admin
        .services
        .get(name)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown_component", &format!("no component named {name:?}")))
}

fn refused(err: &ShadowError) -> Response {
    match err {
        ShadowError::None(_) => error(StatusCode::NOT_FOUND, "no_shadow_run", &err.to_string()),
        ShadowError::Load(_) => error(StatusCode::UNPROCESSABLE_ENTITY, "rejected", &err.to_string()),
        ShadowError::Promote(_) | ShadowError::Trial(_) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "failed", &err.to_string())
        }
    }
}

fn no_bytes() -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "no_candidate",
        "the request's body must be the candidate's component bytes",
    )
}

async fn start(State(admin): State<Admin>, Path(name): Path<String>, body: Bytes) -> Response {
    let managed = match managed(&admin, &name) {
        Ok(managed) => managed,
        Err(response) => return response,
    };
    if body.is_empty() {
        return no_bytes();
    }
    let service = managed.service.clone();
    match service.start_shadow("admin upload", body.to_vec()).await {
        Ok(shadow) => {
            // A run with a promotion policy promotes itself once earned.
            if service.shadow_settings().promote_after > 0 {
                let (service, run) = (service.clone(), shadow.clone());
                tokio::spawn(async move {
                    if run.promotion_asked().await
                        && let Err(err) = service.promote_shadow_of(&run).await
                    {
                        tracing::warn!(component = %service.name(), "shadow run's promotion failed: {err}");
                    }
                });
            }
            Json(shadow.status()).into_response()
        }
        Err(err) => refused(&err),
    }
}

async fn status(State(admin): State<Admin>, Path(name): Path<String>) -> Response {
    match managed(&admin, &name) {
        Ok(managed) => match managed.service.shadow() {
            Some(shadow) => Json(shadow.status()).into_response(),
            None => refused(&ShadowError::None(name)),
        },
        Err(response) => response,
    }
}

async fn promote(State(admin): State<Admin>, Path(name): Path<String>) -> Response {
    match managed(&admin, &name) {
        Ok(managed) => match managed.service.promote_shadow().await {
            Ok(status) => Json(status).into_response(),
            Err(err) => refused(&err),
        },
        Err(response) => response,
    }
}

async fn stop(State(admin): State<Admin>, Path(name): Path<String>) -> Response {
    match managed(&admin, &name) {
        Ok(managed) => match managed.service.stop_shadow() {
            Ok(status) => Json(status).into_response(),
            Err(err) => refused(&err),
        },
        Err(response) => response,
    }
}

async fn replay_dlq(State(admin): State<Admin>, Path(name): Path<String>, body: Bytes) -> Response {
    let managed = match managed(&admin, &name) {
        Ok(managed) => managed,
        Err(response) => return response,
    };
    if body.is_empty() {
        return no_bytes();
    }
    let Some(dead_letters) = &admin.dead_letters else { return super::no_dead_letters() };
    let listed = dead_letters.list(&Filter { component: Some(name.clone()), since_ms: None }).await;
    let letters = match listed {
        Ok(letters) => letters,
        Err(err) => return super::unavailable(&err),
    };
    // The records the component consumed and set aside (not its outputs
    // the broker refused, nor timers, which fire again by themselves).
    let letters = letters
        .iter()
        .filter(|letter| matches!(letter.origin, Origin::Topic { .. }) && letter.replayed.is_none())
        .filter_map(|letter| {
            let record = letter.original()?;
            let event = crate::pipeline::event_of(&admin.console.topics(), &record).ok()?;
            Some((letter.id.to_string(), letter.reason.clone(), event))
        })
        .collect();
    match managed.service.trial("admin upload", body.to_vec(), letters).await {
        Ok(report) => Json(report).into_response(),
        Err(err) => refused(&err),
    }
}

/// A shadow report (the JSON of `GET /components/{name}/shadow`) for a
/// terminal.
pub fn render(report: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let short = |v: &Value| text(v).chars().take(12).collect::<String>();
    let _ = writeln!(out, "shadow run of {}: {}", text(&report["component"]), text(&report["state"]));
    let _ = writeln!(
        out,
        "  candidate {} ({}), serving {}",
        short(&report["candidate"]),
        text(&report["source"]),
        short(&report["serving"])
    );
    for kind in ["events", "queries"] {
        let c = &report[kind];
        let _ = writeln!(
            out,
            "  {kind}: {} compared: {} equal, {} differing, {} candidate failed; {} skipped",
            c["compared"], c["equal"], c["differing"], c["candidate_failed"], c["skipped"]
        );
    }
    let per = |side: &str, what: &str| {
        let cost = &report["cost"][side];
        let calls = cost["calls"].as_u64().unwrap_or(0).max(1);
        cost[what].as_u64().unwrap_or(0) / calls
    };
    let _ = writeln!(
        out,
        "  per event: serving {} µs (CPU {} µs), candidate {} µs (CPU {} µs)",
        per("serving", "time"),
        per("serving", "cpu"),
        per("candidate", "time"),
        per("candidate", "cpu")
    );
    for d in report["differences"].as_array().into_iter().flatten() {
        let key = d["key"].as_str().map(|k| format!(" of order {k}")).unwrap_or_default();
        let _ = writeln!(out, "  differs: {} {} {}{key}", text(&d["kind"]), text(&d["event_type"]), text(&d["id"]));
        for c in d["changes"].as_array().into_iter().flatten() {
            let side = |v: Option<&Value>| v.map_or_else(|| "(absent)".to_owned(), Value::to_string);
            let _ =
                writeln!(out, "    {}: {} → {}", text(&c["path"]), side(c.get("serving")), side(c.get("candidate")));
        }
    }
    for f in report["failures"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  failed: {} {}: {}", text(&f["event_type"]), text(&f["event_id"]), text(&f["reason"]));
    }
    out
}

/// A candidate's run over dead letters (the JSON of `replay-dlq`) for a
/// terminal.
pub fn render_trial(report: &Value) -> String {
    let mut out = String::new();
    for letter in report["letters"].as_array().into_iter().flatten() {
        let id = letter["id"].as_str().unwrap_or("?");
        let event =
            format!("{} {}", letter["event_type"].as_str().unwrap_or("?"), letter["event_id"].as_str().unwrap_or("?"));
        match letter["handled"].as_bool() {
            Some(true) => {
                let emits: Vec<String> = letter["outputs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| format!("{} to {}", o["type"].as_str().unwrap_or("?"), o["topic"].as_str().unwrap_or("?")))
                    .collect();
                let emits = if emits.is_empty() { "nothing".to_owned() } else { emits.join(", ") };
                let _ = writeln!(out, "handled {id} {event}: would emit {emits}");
            }
            _ => {
                let _ = writeln!(out, "fails   {id} {event}: {}", letter["error"].as_str().unwrap_or("?"));
            }
        }
    }
    let _ = writeln!(
        out,
        "candidate {}: {} handled, {} still fail, {} not tried; nothing was published or committed",
        report["candidate"].as_str().unwrap_or("?").chars().take(12).collect::<String>(),
        report["handled"],
        report["failed"],
        report["not_tried"]
    );
    out
}
