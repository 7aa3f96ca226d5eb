//! The shop's HTTP API as a client sees it: place an order, read its
//! status, ask a port for its health. One pooled `reqwest::Client` serves
//! every worker, so connections are reused as a browser would reuse them.

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use serde::Deserialize;

/// Statuses after which an order never changes again.
pub const FINAL_STATUSES: [&str; 3] = ["CONFIRMED", "REJECTED", "CANCELLED"];

/// Why one call failed. `kind` is stable, so failures can be counted by it.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with an unexpected status.
    Status(StatusCode),
    /// No answer within the request timeout.
    Timeout,
    /// Connecting or talking to the server failed.
    Transport(String),
    /// The answer was not the JSON we expected.
    Body(String),
}

impl CallError {
    /// A short, stable label for counting, e.g. `HTTP 503` or `timeout`.
    pub fn kind(&self) -> String {
        match self {
            Self::Status(status) => format!("HTTP {}", status.as_u16()),
            Self::Timeout => "timeout".into(),
            Self::Transport(_) => "transport".into(),
            Self::Body(_) => "bad body".into(),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "unexpected status {status}"),
            Self::Timeout => write!(f, "no answer within the request timeout"),
            Self::Transport(message) => write!(f, "transport error: {message}"),
            Self::Body(message) => write!(f, "unexpected body: {message}"),
        }
    }
}

impl From<reqwest::Error> for CallError {
    fn from(err: reqwest::Error) -> Self {
        if err.is_timeout() {
            Self::Timeout
        } else if err.is_decode() {
            Self::Body(err.to_string())
        } else {
            Self::Transport(err.to_string())
        }
    }
}

/// What the driver orders: one line of a SKU whose stock the shop does not
/// limit, so it never runs out however many orders a run places.
#[derive(Debug, Clone)]
pub struct OrderTemplate {
    body: Vec<u8>,
}

impl OrderTemplate {
    /// One unit of `sku` at `unit_price_cents`, paid with `card_number`.
    pub fn new(sku: &str, unit_price_cents: u64, card_number: &str) -> Self {
        let body = serde_json::json!({
            "customer": { "name": "Bench", "email": "bench@example.com" },
            "items": [{ "sku": sku, "quantity": 1, "unit_price_cents": unit_price_cents }],
            "payment": { "card_number": card_number },
        });
        Self { body: body.to_string().into_bytes() }
    }
}

/// Client of the gateway and of every port's `/health`.
#[derive(Debug, Clone)]
pub struct Gateway {
    client: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct Accepted {
    order_id: String,
}

#[derive(Deserialize)]
struct OrderView {
    status: String,
}

impl Gateway {
    /// A client of the gateway at `base` (e.g. `http://127.0.0.1:3005`)
    /// whose every call gives up after `timeout`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self { client, base: base.trim_end_matches('/').to_owned() })
    }

    /// Places one order with a fresh `Idempotency-Key`; the order id on 202.
    ///
    /// # Errors
    /// Any answer but 202 with an `order_id`, or no answer.
    pub async fn place(&self, order: &OrderTemplate) -> Result<String, CallError> {
        let response = self
            .client
            .post(format!("{}/order", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .body(order.body.clone())
            .send()
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(CallError::Status(response.status()));
        }
        Ok(response.json::<Accepted>().await?.order_id)
    }

    /// The order's status, or `None` while the order service has not seen it.
    ///
    /// # Errors
    /// Any answer but 200 with a `status` or 404, or no answer.
    pub async fn status(&self, order_id: &str) -> Result<Option<String>, CallError> {
        let response = self.client.get(format!("{}/order/{order_id}", self.base)).send().await?;
        match response.status() {
            StatusCode::OK => Ok(Some(response.json::<OrderView>().await?.status)),
            StatusCode::NOT_FOUND => Ok(None),
            other => Err(CallError::Status(other)),
        }
    }

    /// Whether `url` answers 200.
    pub async fn healthy(&self, url: &str) -> bool {
        matches!(self.client.get(url).send().await, Ok(r) if r.status() == StatusCode::OK)
    }
}
