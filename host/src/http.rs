//! Each component's HTTP port: `GET /health` and `GET /metrics` from the
//! host, every other route answered by the component's `query` export; and
//! [`serve`], which serves it and the admin API with every connection
//! bounded (see [`gateway::serve_with`]) and every request timed.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::metrics::ComponentMetrics;
use crate::runtime::{CallError, Request, ServiceRuntime};
use crate::status::{BrokerLink, ConsumerStatus};

/// Largest request body forwarded to a component.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest time a request to a component's or the admin port may take,
/// its body (an admin upload of up to 64 MiB) included: past it, `408`.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves `router` on `listener` until `shutdown`, within `limits`, each
/// request answered `408` after `request_timeout`.
pub async fn serve(
    name: String,
    listener: tokio::net::TcpListener,
    router: Router,
    limits: gateway::ConnectionLimits,
    request_timeout: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let router = router.layer(axum::middleware::from_fn_with_state(request_timeout, time_limit));
    gateway::serve_with(name, listener, router, limits, shutdown.cancelled_owned()).await;
}

async fn time_limit(
    State(limit): State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let message = format!("not answered within {limit:?}");
            let body = json!({ "error": { "code": "request_timeout", "message": message } });
            (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response()
        }
    }
}

#[derive(Clone)]
struct Port {
    service: Arc<ServiceRuntime>,
    status: ConsumerStatus,
    link: BrokerLink,
    metrics: Arc<ComponentMetrics>,
}

/// The router of one component's port; `metrics` are the component's
/// (see [`crate::metrics`]).
pub fn component_app(
    service: Arc<ServiceRuntime>,
    status: ConsumerStatus,
    link: BrokerLink,
    metrics: Arc<ComponentMetrics>,
) -> Router {
    let scrape = metrics.router();
    Router::new()
        .route("/health", get(health))
        .fallback(query)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Port { service, status, link, metrics })
        .merge(scrape)
}

async fn health(State(port): State<Port>) -> Response {
    let current = port.service.current();
    let consumer = port.status.snapshot();
    let loaded_at_ms = crate::clock::unix_ms(current.loaded_at);
    let store = port.service.state_store().clone();
    // A database round trip blocks: off the async workers.
    let counts = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::state::StoreError>((store.timer_count()?, store.outbox_count()?, store.corrupt_entries()?))
    })
    .await
    .unwrap_or_else(|err| Err(crate::state::StoreError::Unavailable(err.to_string())));
    // -1: the store could not be read.
    let (timers_pending, outbox_pending, corrupt, state_error) = match counts {
        Ok((timers, outbox, corrupt)) => (timers as i64, outbox as i64, Some(corrupt), None),
        Err(err) => (-1, -1, None, Some(err.to_string())),
    };
    let broker_down = port.link.down();
    let (code, status) = if consumer.consuming && state_error.is_none() && broker_down.is_none() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    // Entries quarantined as corrupt: reported, yet still 200, since the
    // component goes on without them, a restart would not mend them, and
    // on a shared store every host of the component reports the same.
    let status = match &corrupt {
        Some(corrupt) if corrupt.count > 0 => "degraded",
        _ => status,
    };
    let body = json!({
        "status": status,
        "component": port.service.name(),
        "version": current.sha256,
        "wasm": current.path,
        "loaded_at_ms": loaded_at_ms,
        "assigned_partitions": consumer.assigned_partitions,
        "last_processed_offsets": consumer.last_processed_offsets,
        "lag": consumer.lag,
        "handled": consumer.handled,
        "dead_lettered": consumer.dead_lettered,
        "duplicates_dropped": consumer.duplicates_dropped,
        "timers_pending": timers_pending,
        "outbox_pending": outbox_pending,
        "last_error": consumer.last_error,
        "handed_off": consumer.handed_off,
        "handoffs": consumer.handoffs,
        "rejoins": consumer.rejoins,
        "state_error": state_error,
        "corrupt_entries": corrupt.map(|c| json!({ "count": c.count, "last_reason": c.last_reason })),
        "broker_unreachable": broker_down,
        "stages": port.service.stages().totals(),
    });
    (code, axum::Json(body)).into_response()
}

async fn query(State(port): State<Port>, method: Method, uri: Uri, body: Bytes) -> Response {
    let request = Request {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: body.to_vec(),
    };
    match port.service.query(&request).await {
        Ok(response) => {
            let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = HeaderValue::from_str(&response.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            (status, [(header::CONTENT_TYPE, content_type)], response.body).into_response()
        }
        Err(CallError::Throttled(left)) => {
            tracing::warn!(component = port.service.name(), path = %request.path, "query refused: throttled for {left:?}");
            let retry_after = (left.as_secs_f64().ceil() as u64).max(1).to_string();
            let body = json!({ "error": { "code": "throttled", "message": format!(
                "the component's last queries failed; it answers again in {} s", retry_after
            ) } });
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, retry_after)], axum::Json(body)).into_response()
        }
        Err(err) => {
            port.metrics.faults().trapped(&err);
            tracing::error!(component = port.service.name(), path = %request.path, "query failed: {err}");
            let body = json!({ "error": { "code": "component_failed", "message": "the component could not answer" } });
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tower::ServiceExt as _;

    use super::*;
    use crate::runtime::CallKind;

    /// A component's port and the admin port close a client that sends
    /// nothing (they had no timer at all), and answer one that asks.
    #[tokio::test]
    async fn component_and_admin_ports_close_silent_clients() {
        let service = Arc::new(crate::runtime::tests::runtime("misbehave", 300));
        let metrics =
            Arc::new(ComponentMetrics::new(service.clone(), ConsumerStatus::default(), BrokerLink::default()));
        let component = component_app(service.clone(), ConsumerStatus::default(), BrokerLink::default(), metrics);
        let managed = crate::admin::Managed { service, wasm: crate::runtime::tests::wasm("misbehave"), status: None };
        let admin = crate::admin::admin_app(
            std::collections::BTreeMap::from([("svc".to_owned(), managed)]),
            "0123456789abcdef-token",
            None,
        );
        let limits = gateway::ConnectionLimits { idle_timeout: Duration::from_millis(300), max_connections: 16 };
        let shutdown = tokio_util::sync::CancellationToken::new();
        for (name, router) in [("component", component), ("admin", admin)] {
            let name = name.to_owned();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(name.clone(), listener, router, limits, REQUEST_TIMEOUT, shutdown.clone()));
            let mut asking = tokio::net::TcpStream::connect(addr).await.unwrap();
            asking.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            asking.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 "), "{name}: {answer}");

            let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut Vec::new())).await;
            assert!(read.is_ok(), "{name}: a silent client still connected after 5 s");
            assert!(started.elapsed() < Duration::from_secs(2), "{name}: closed after {:?}", started.elapsed());
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_request_past_the_time_limit_is_408() {
        let slow = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let limits = gateway::ConnectionLimits::default();
        tokio::spawn(serve("slow".into(), listener, slow, limits, Duration::from_millis(200), shutdown.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        shutdown.cancel();
    }

    /// A component paying for its failed queries answers 503 with
    /// Retry-After, in JSON, without running the guest.
    #[tokio::test]
    async fn a_throttled_query_is_answered_503_with_retry_after() {
        let service = Arc::new(crate::runtime::tests::runtime("misbehave", 300));
        let metrics =
            Arc::new(ComponentMetrics::new(service.clone(), ConsumerStatus::default(), BrokerLink::default()));
        let app = component_app(service.clone(), ConsumerStatus::default(), BrokerLink::default(), metrics);
        let get = |path: &str| axum::http::Request::get(path).body(Body::empty()).unwrap();
        let spun = app.clone().oneshot(get("/spin")).await.unwrap();
        assert_eq!(spun.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let left = service.throttle().wait_left(CallKind::Query).expect("the spin was charged");
        assert!(left > std::time::Duration::from_millis(300), "{left:?}");

        let refused = app.oneshot(get("/state/k")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry_after: u64 = refused.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        // Whole seconds, rounded up, of what the throttle had left: how much
        // depends on how long the spin really ran on a loaded machine.
        let most = left.as_secs() + 1;
        assert!((1..=most).contains(&retry_after), "{retry_after} s, {left:?} left");
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "throttled", "{body}");
    }
}
