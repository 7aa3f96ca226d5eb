//! One order's life as a browser drives it: POST it, then poll its status
//! until it is final, and note when each step happened.

use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::{FINAL_STATUSES, Gateway, OrderTemplate};

/// How the status is polled.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    /// Pause after each answer before asking again.
    pub interval: Duration,
    /// Give up on an order this long after its intended send time.
    pub final_timeout: Duration,
}

/// What happened to one order. Times are `Instant`s so that the topic
/// reader's arrival times can be compared with them.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the order was meant to be sent; latencies are measured from
    /// here (in a closed loop it is when it was sent).
    pub intended: Instant,
    /// When the POST was sent.
    pub sent: Instant,
    /// When the 202 arrived.
    pub accepted: Option<Instant>,
    /// The id the gateway gave it.
    pub order_id: Option<String>,
    /// When polling first saw a final status, and that status.
    pub finished: Option<(Instant, String)>,
    /// Why the order failed, as a stable label; `None` if it became final.
    pub error: Option<String>,
    /// Polls that failed (the order was polled again after them).
    pub poll_errors: u32,
}

impl Outcome {
    /// POST latency from the intended send time.
    pub fn post_latency(&self) -> Option<Duration> {
        self.accepted.map(|at| at - self.intended)
    }

    /// POST to final status seen by polling, from the intended send time.
    pub fn final_latency(&self) -> Option<Duration> {
        self.finished.as_ref().map(|(at, _)| *at - self.intended)
    }
}

/// Places one order and polls it until final, never past `deadline` nor
/// past `polling.final_timeout` after `intended` (plus one request timeout).
pub async fn drive(
    gateway: &Gateway,
    template: &OrderTemplate,
    polling: Polling,
    intended: Instant,
    deadline: Instant,
) -> Outcome {
    let sent = Instant::now();
    let mut outcome =
        Outcome { intended, sent, accepted: None, order_id: None, finished: None, error: None, poll_errors: 0 };
    let order_id = match gateway.place(template).await {
        Ok(id) => id,
        Err(err) => {
            outcome.error = Some(format!("POST {}", err.kind()));
            return outcome;
        }
    };
    outcome.accepted = Some(Instant::now());
    outcome.order_id = Some(order_id.clone());
    let give_up = deadline.min(intended + polling.final_timeout);
    loop {
        match gateway.status(&order_id).await {
            Ok(Some(status)) if FINAL_STATUSES.contains(&status.as_str()) => {
                outcome.finished = Some((Instant::now(), status));
                return outcome;
            }
            Ok(_) => {}
            Err(_) => outcome.poll_errors += 1,
        }
        if Instant::now() + polling.interval >= give_up {
            outcome.error = Some("no final status in time".into());
            return outcome;
        }
        tokio::time::sleep(polling.interval).await;
    }
}
