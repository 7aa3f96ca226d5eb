//! The two shapes of load. A closed loop keeps a fixed number of orders in
//! flight, like that many patient users; an open loop sends at a fixed rate
//! whatever the system does, like an unbounded crowd, and measures from the
//! intended send time so a stall is not hidden (no coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::{Gateway, OrderTemplate};
use crate::order::{self, Outcome, Polling};

/// What one run sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `concurrency` workers, each placing one order and waiting until it
    /// is final before the next; stops after `orders` or `duration`.
    Closed { concurrency: usize, orders: usize, duration: Duration },
    /// `rate` orders per second for `duration`, sent on schedule.
    Open { rate: f64, duration: Duration },
}

impl Load {
    /// The scenario's name, used for its JSON file: `closed-c32`, `open-r100`.
    pub fn name(&self) -> String {
        match self {
            Self::Closed { concurrency, .. } => format!("closed-c{concurrency}"),
            Self::Open { rate, .. } => format!("open-r{rate}"),
        }
    }

    /// Checks the numbers make a bounded, non-empty run.
    ///
    /// # Errors
    /// A zero or non-finite count, rate or duration.
    pub fn validate(&self) -> anyhow::Result<()> {
        match *self {
            Self::Closed { concurrency, orders, duration } => {
                anyhow::ensure!(concurrency > 0, "concurrency must be at least 1");
                anyhow::ensure!(orders > 0, "orders must be at least 1");
                anyhow::ensure!(!duration.is_zero(), "duration must be positive");
            }
            Self::Open { rate, duration } => {
                anyhow::ensure!(rate.is_finite() && rate > 0.0, "rate must be positive, not {rate}");
                anyhow::ensure!(!duration.is_zero(), "duration must be positive");
                anyhow::ensure!(open_total(rate, duration) > 0, "rate × duration must be at least one order");
                anyhow::ensure!(
                    open_total(rate, duration) <= 1_000_000,
                    "rate × duration must be at most 1,000,000 orders"
                );
            }
        }
        Ok(())
    }
}

/// Everything a worker needs to drive orders; cheap to clone.
#[derive(Debug, Clone)]
pub struct Driver {
    /// The gateway client (pooled; clones share the pool).
    pub gateway: Gateway,
    /// The order sent each time.
    pub template: Arc<OrderTemplate>,
    /// How orders are polled until final.
    pub polling: Polling,
}

/// Runs `load` to the end; every order is given up at most
/// `polling.final_timeout` after the load stops sending.
pub async fn run(driver: &Driver, load: Load) -> Vec<Outcome> {
    match load {
        Load::Closed { concurrency, orders, duration } => closed(driver, concurrency, orders, duration).await,
        Load::Open { rate, duration } => open(driver, rate, duration).await,
    }
}

async fn closed(driver: &Driver, concurrency: usize, orders: usize, duration: Duration) -> Vec<Outcome> {
    let start = Instant::now();
    let stop_sending = start + duration;
    let deadline = stop_sending + driver.polling.final_timeout;
    let taken = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (driver, taken) = (driver.clone(), Arc::clone(&taken));
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            while Instant::now() < stop_sending && taken.fetch_add(1, Ordering::Relaxed) < orders {
                let now = Instant::now();
                outcomes.push(order::drive(&driver.gateway, &driver.template, driver.polling, now, deadline).await);
            }
            outcomes
        });
    }
    // `orders` may be a mere bound (a run limited by its duration).
    let mut outcomes = Vec::with_capacity(orders.min(1 << 16));
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(done) => outcomes.extend(done),
            Err(err) => eprintln!("bench: a closed-loop worker failed: {err}"),
        }
    }
    outcomes
}

async fn open(driver: &Driver, rate: f64, duration: Duration) -> Vec<Outcome> {
    let total = open_total(rate, duration);
    // Start a little ahead so the first send is on schedule too.
    let start = Instant::now() + Duration::from_millis(10);
    let deadline = start + duration + driver.polling.final_timeout;
    let mut orders = JoinSet::new();
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended).await;
        let driver = driver.clone();
        orders.spawn(async move {
            order::drive(&driver.gateway, &driver.template, driver.polling, intended, deadline).await
        });
    }
    let mut outcomes = Vec::with_capacity(total);
    while let Some(joined) = orders.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(err) => eprintln!("bench: an open-loop order task failed: {err}"),
        }
    }
    outcomes
}

fn open_total(rate: f64, duration: Duration) -> usize {
    (rate * duration.as_secs_f64()).round() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_the_shape_and_its_number() {
        let closed = Load::Closed { concurrency: 32, orders: 10, duration: Duration::from_secs(1) };
        assert_eq!(closed.name(), "closed-c32");
        assert_eq!(Load::Open { rate: 250.0, duration: Duration::from_secs(1) }.name(), "open-r250");
        assert_eq!(Load::Open { rate: 2.5, duration: Duration::from_secs(4) }.name(), "open-r2.5");
    }

    #[test]
    fn empty_or_unbounded_loads_are_refused() {
        let second = Duration::from_secs(1);
        assert!(Load::Closed { concurrency: 0, orders: 10, duration: second }.validate().is_err());
        assert!(Load::Closed { concurrency: 4, orders: 10, duration: Duration::ZERO }.validate().is_err());
        assert!(Load::Open { rate: 0.1, duration: second }.validate().is_err());
        assert!(Load::Open { rate: f64::INFINITY, duration: second }.validate().is_err());
        assert!(Load::Open { rate: 100.0, duration: second }.validate().is_ok());
    }
}
