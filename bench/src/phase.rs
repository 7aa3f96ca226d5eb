//! One measured phase: sample the host, run a load, wait for the topic to
//! catch up and the host to go quiet, sample again, and report.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::host::{Process, Sample};
use crate::load::{self, Driver, Load};
use crate::order::Outcome;
use crate::report::{HostFigures, PhaseReport};
use crate::stages::{Probe, StageReport};
use crate::topic::TopicReader;

/// What observes a phase besides the orders' own outcomes.
pub struct Observers {
    /// The final-event reader, unless turned off.
    pub topic: Option<TopicReader>,
    /// How long to wait after a phase for final events still on their way.
    pub topic_grace: Duration,
    /// The host process, with `--host-pid`.
    pub host: Option<Process>,
    /// The components' `/health`, for their stage costs.
    pub health: Option<Probe>,
}

/// After a phase, the host counts as quiet once it used less than this
/// share of one core over `SETTLE_STEP`: emails and analytics still run
/// after the orders are final, and their CPU belongs to the phase.
const QUIET_CORE_SHARE: f64 = 0.05;
const SETTLE_STEP: Duration = Duration::from_millis(250);
const SETTLE_MAX: Duration = Duration::from_secs(15);

/// Runs `load` and measures it.
///
/// # Errors
/// When the host process or a component's `/health` cannot be read.
pub async fn run(driver: &Driver, load: Load, observers: &Observers) -> anyhow::Result<PhaseReport> {
    let (report, _, ()) = run_with(driver, load, observers, async {}).await?;
    Ok(report)
}

/// Runs `load` with `beside` running alongside (e.g. reloads under load),
/// and measures it; also returns the orders' outcomes and what `beside` gave.
///
/// # Errors
/// As [`run`].
pub async fn run_with<T>(
    driver: &Driver,
    load: Load,
    observers: &Observers,
    beside: impl Future<Output = T>,
) -> anyhow::Result<(PhaseReport, Vec<Outcome>, T)> {
    let host_before = observers.host.map(Process::sample).transpose()?;
    let stages_before = match &observers.health {
        Some(probe) => Some(probe.snapshot().await?),
        None => None,
    };
    let driver_before = Process::Myself.sample()?;
    let start = Instant::now();
    let (outcomes, beside) = tokio::join!(load::run(driver, load), beside);
    let elapsed = start.elapsed();
    if let Some(reader) = &observers.topic {
        let ids: Vec<&str> = outcomes.iter().filter_map(|o| o.order_id.as_deref()).collect();
        reader.wait_for(&ids, observers.topic_grace).await;
    }
    let mut report = PhaseReport::new(load, &outcomes, elapsed, observers.topic.as_ref());
    if let (Some(host), Some(before)) = (observers.host, host_before) {
        let quiet_since = Instant::now();
        let after = settle(host).await?;
        let cpu_s = after.cpu_s - before.cpu_s;
        report.host = Some(HostFigures {
            before,
            after,
            cpu_s,
            cpu_s_per_1000_orders: (report.finished > 0).then(|| cpu_s * 1000.0 / report.finished as f64),
            switches_per_order: (report.finished > 0)
                .then(|| after.switches.saturating_sub(before.switches) as f64 / report.finished as f64),
            settle_s: quiet_since.elapsed().as_secs_f64(),
        });
    }
    // After the host went quiet: every event the phase caused is counted.
    if let (Some(probe), Some(before)) = (&observers.health, stages_before) {
        let after = probe.snapshot().await?;
        report.stages = Some(StageReport::new(&before, &after, report.host.as_ref().map(|h| h.cpu_s)));
    }
    report.driver_cpu_s = Process::Myself.sample()?.cpu_s - driver_before.cpu_s;
    Ok((report, outcomes, beside))
}

/// Samples `host` until it is quiet (or `SETTLE_MAX` passed); the last sample.
async fn settle(host: Process) -> anyhow::Result<Sample> {
    let give_up = Instant::now() + SETTLE_MAX;
    let mut last = host.sample()?;
    loop {
        tokio::time::sleep(SETTLE_STEP).await;
        let now = host.sample()?;
        let busy = (now.cpu_s - last.cpu_s) / SETTLE_STEP.as_secs_f64();
        last = now;
        if busy < QUIET_CORE_SHARE || Instant::now() >= give_up {
            return Ok(last);
        }
    }
}
