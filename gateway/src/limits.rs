//! What keeps one client, or a flood of status queries, from crowding out
//! everyone's orders: a token bucket per client address and class (`POST
//! /order` apart from every other request), and a cap on status queries
//! in flight, so that the order service always has a query slot left for
//! `POST /order`'s `Idempotency-Key` check.
//!
//! Own code rather than `tower_governor` (0.8): the gateway needs two
//! classes keyed by one address, JSON errors, and a bounded table of
//! clients without a cleaning thread; that is the sixty lines below, where
//! the crate would bring `governor`, `dashmap` and `quanta` (and `tonic` by
//! default) to build on every machine.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Requests per second each client (IP address; IPv6 by /64) may make,
/// with a burst of one second's worth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// `POST /order`.
    pub orders_per_second: f64,
    /// Every other request (`GET /order/{id}`, the page, `/health`).
    pub queries_per_second: f64,
}

impl Default for RateLimits {
    /// Sized so that one load generator on the same machine (`just bench`:
    /// ~800 orders/s, polling each every 10 ms) is not throttled; an
    /// operator facing the internet sets lower ones (`[gateway]`).
    fn default() -> Self {
        Self { orders_per_second: 2_000.0, queries_per_second: 20_000.0 }
    }
}

/// Clients remembered at once; past it, those whose bucket has refilled
/// (and so equals a new one) are forgotten.
const MAX_CLIENTS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    Order,
    Query,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The token buckets of every client.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limits: RateLimits,
    buckets: Mutex<HashMap<(IpAddr, Class), Bucket>>,
}

impl RateLimiter {
    pub(crate) fn new(limits: RateLimits) -> Self {
        Self { limits, buckets: Mutex::default() }
    }

    /// Takes a token for `client` and the class of `method path`, or says
    /// how long until one is there.
    fn take(&self, client: IpAddr, method: &Method, path: &str) -> Result<(), Duration> {
        let (class, rate) = match (method, path) {
            (&Method::POST, "/order") => (Class::Order, self.limits.orders_per_second),
            _ => (Class::Query, self.limits.queries_per_second),
        };
        let rate = rate.max(0.001);
        let burst = rate.max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&(client, class)) {
            let full_after = Duration::from_secs_f64(burst / rate);
            buckets.retain(|_, b| now.duration_since(b.at) < full_after);
        }
        let bucket = buckets.entry((client, class)).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
    }
}

/// The key of a client: its address, an IPv6 one cut to its /64 (what one
/// customer's line is given).
fn client_key(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mask = u128::MAX << 64;
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
        ip => ip,
    }
}

/// Middleware: `429 rate_limited` with `Retry-After` for a client past its
/// rate. A request without a peer address (served in-process, as in tests)
/// counts as one client.
pub(crate) async fn rate_limit(
    axum::extract::State(limiter): axum::extract::State<std::sync::Arc<RateLimiter>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let client = peer.map_or(IpAddr::from([0, 0, 0, 0]), client_key);
    match limiter.take(client, request.method(), request.uri().path()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let message = format!("too many requests from this address: try again in {seconds} s");
            let body = json!({ "error": { "code": "rate_limited", "message": message } });
            let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
    }
}

/// Answer to a status query refused because the order service's query
/// slots are taken: `503 busy`, try again in a second.
pub(crate) fn busy() -> Response {
    let message = "too many status queries in flight: try again in 1 s";
    let body = json!({ "error": { "code": "busy", "message": message } });
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_and_class_has_its_own_bucket() {
        let limiter = RateLimiter::new(RateLimits { orders_per_second: 2.0, queries_per_second: 3.0 });
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(limiter.take(a, &Method::GET, "/order/x").is_ok());
        }
        let wait = limiter.take(a, &Method::GET, "/order/x").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(334), "{wait:?}");
        assert!(limiter.take(a, &Method::POST, "/order").is_ok(), "orders are not held back by queries");
        assert!(limiter.take(b, &Method::GET, "/order/x").is_ok(), "another client has its own");
        assert!(limiter.take(a, &Method::POST, "/order").is_ok());
        assert!(limiter.take(a, &Method::POST, "/order").is_err());
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let one: SocketAddr = "[2001:db8:1:2:aaaa::1]:5000".parse().unwrap();
        let same: SocketAddr = "[2001:db8:1:2:bbbb::9]:6000".parse().unwrap();
        let other: SocketAddr = "[2001:db8:1:3::1]:5000".parse().unwrap();
        assert_eq!(client_key(one), client_key(same));
        assert_ne!(client_key(one), client_key(other));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }
}
