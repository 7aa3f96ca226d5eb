//! The shadow phase of `bench suite`: the same closed loop four times in a
//! row, first with no shadow run, then with a candidate build of one
//! component shadowing the serving one (a candidate that behaves the same,
//! one that traps, one that spins), to see what a candidate costs the
//! serving version's throughput and the host's CPU, beside the host's own
//! report of each run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hotswap::Admin;
use crate::load::{Driver, Load};
use crate::phase::{self, Observers};
use crate::report::{self, PhaseReport};

/// The shadow phase's options (the admin API's are the hot swap's).
#[derive(Debug, Args)]
pub struct ShadowArgs {
    /// Component the candidates shadow.
    #[arg(long, default_value = "payment")]
    shadow_component: String,
    /// A candidate that behaves like the serving build on the bench's
    /// orders (payment-v2 declines only a card the bench does not use).
    #[arg(long, default_value = "target/wasm32-wasip2/release/payment-v2.wasm")]
    shadow_v2_wasm: PathBuf,
    /// A candidate that traps on every payment request.
    #[arg(long, default_value = "target/wasm32-wasip2/release/payment-trap.wasm")]
    shadow_trap_wasm: PathBuf,
    /// A candidate that spins until its time budget on every payment request.
    #[arg(long, default_value = "target/wasm32-wasip2/release/payment-spin.wasm")]
    shadow_spin_wasm: PathBuf,
    /// Closed-loop concurrency of each run.
    #[arg(long, default_value_t = 32)]
    shadow_concurrency: usize,
    /// Sending time of each of the four runs, in seconds; 0 skips the phase.
    #[arg(long, default_value_t = 15)]
    shadow_duration_s: u64,
}

/// The phase's results file.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowFigures {
    /// The component shadowed.
    pub component: String,
    /// The runs in the order they ran; the first has no shadow.
    pub runs: Vec<Run>,
}

/// One closed loop, with or without a shadow run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `none`, `v2`, `trap` or `spin`.
    pub candidate: &'static str,
    /// The candidate's file.
    pub wasm: Option<PathBuf>,
    /// The loop's figures; none when the shadow run was refused.
    pub phase: Option<PhaseReport>,
    /// Completed orders/s over those of the run without a shadow.
    pub ratio_to_none: Option<f64>,
    /// The host's report of the shadow run, as its stop answered it.
    pub shadow: Option<Value>,
    /// Why the shadow run could not be started or read.
    pub error: Option<String>,
}

/// The part of the host's shadow report the table shows.
#[derive(Debug, Deserialize)]
struct Summary {
    state: String,
    events: Counts,
    cost: BTreeMap<String, Cost>,
}

#[derive(Debug, Deserialize)]
struct Counts {
    compared: u64,
    equal: u64,
    differing: u64,
    candidate_failed: u64,
    skipped: u64,
}

/// Calls and their total time and CPU, in microseconds.
#[derive(Debug, Deserialize)]
struct Cost {
    calls: u64,
    time: u64,
    cpu: u64,
}

impl Cost {
    fn mean(&self, total: u64) -> Option<f64> {
        (self.calls > 0).then(|| total as f64 / self.calls as f64)
    }
}

impl Run {
    fn summary(&self) -> Option<Summary> {
        serde_json::from_value(self.shadow.clone()?).ok()
    }
}

/// Runs the phase: the loop without a shadow, then with each candidate;
/// `None` when it is turned off or a candidate's file is missing.
///
/// # Errors
/// When the load cannot run, the host cannot be read or the results cannot
/// be written; a refused shadow run is recorded, not an error.
pub async fn run(
    args: &ShadowArgs,
    admin: &Admin,
    driver: &Driver,
    observers: &Observers,
    out_dir: &Path,
) -> anyhow::Result<Option<ShadowFigures>> {
    if args.shadow_duration_s == 0 {
        eprintln!("bench: no shadow phase (--shadow-duration-s 0)");
        return Ok(None);
    }
    let candidates = [("v2", &args.shadow_v2_wasm), ("trap", &args.shadow_trap_wasm), ("spin", &args.shadow_spin_wasm)];
    let missing: Vec<String> =
        candidates.iter().filter(|(_, path)| !path.is_file()).map(|(_, path)| format!("{path:?}")).collect();
    if !missing.is_empty() {
        eprintln!("bench: no shadow phase: {} missing (`just build-test-components`)", missing.join(", "));
        return Ok(None);
    }
    let duration = Duration::from_secs(args.shadow_duration_s);
    let load = Load::Closed { concurrency: args.shadow_concurrency, orders: usize::MAX, duration };
    load.validate()?;
    let component = args.shadow_component.as_str();
    let mut runs = vec![measure(admin, component, driver, observers, load, None).await?];
    for (name, path) in candidates {
        runs.push(measure(admin, component, driver, observers, load, Some((name, path))).await?);
    }
    // The loops run one after another on a growing state: a second run
    // without a candidate at the end brackets the drift, and the ratios
    // are to the mean of the two.
    let mut again = measure(admin, component, driver, observers, load, None).await?;
    again.candidate = "none-again";
    if let Some(phase) = &mut again.phase {
        phase.scenario = phase.scenario.replacen("shadow-none", "shadow-none-again", 1);
    }
    runs.push(again);
    let baselines: Vec<f64> =
        runs.iter().filter(|r| r.wasm.is_none()).filter_map(|r| Some(r.phase.as_ref()?.completed_per_s)).collect();
    let none = baselines.iter().sum::<f64>() / baselines.len().max(1) as f64;
    for run in &mut runs {
        run.ratio_to_none = run.phase.as_ref().filter(|_| none > 0.0).map(|p| p.completed_per_s / none);
    }
    let figures = ShadowFigures { component: component.to_owned(), runs };
    report::write_json(out_dir, "shadow", &figures)?;
    Ok(Some(figures))
}

/// One loop, shadowed by `candidate` (its name and file) if any: the run
/// starts before the loop and stops after it (the host gone quiet).
async fn measure(
    admin: &Admin,
    component: &str,
    driver: &Driver,
    observers: &Observers,
    load: Load,
    candidate: Option<(&'static str, &PathBuf)>,
) -> anyhow::Result<Run> {
    let name = candidate.map_or("none", |(name, _)| name);
    let mut run = Run {
        candidate: name,
        wasm: candidate.map(|(_, path)| path.clone()),
        phase: None,
        ratio_to_none: None,
        shadow: None,
        error: None,
    };
    if let Some((_, path)) = candidate {
        let bytes = tokio::fs::read(path).await.with_context(|| format!("failed to read {path:?}"))?;
        let started = call(admin.request(Method::POST, &format!("/components/{component}/shadow")).body(bytes)).await;
        if let Err(err) = started {
            eprintln!("bench: shadow run of {path:?} refused: {err:#}");
            run.error = Some(format!("start: {err:#}"));
            return Ok(run);
        }
    }
    eprintln!("bench: shadow {name}: {} ...", load.name());
    let mut phase = phase::run(driver, load, observers).await?;
    phase.scenario = format!("shadow-{name}-{}", phase.scenario);
    eprintln!("bench: {}: {:.1} completed orders/s", phase.scenario, phase.completed_per_s);
    run.phase = Some(phase);
    if candidate.is_some() {
        match stop(admin, component).await {
            Ok(report) => run.shadow = Some(report),
            Err(err) => run.error = Some(format!("stop: {err:#}")),
        }
    }
    Ok(run)
}

/// Ends the run on and answers its report; the report of the last run if
/// it already ended by itself (e.g. `stop_on_failure`).
async fn stop(admin: &Admin, component: &str) -> anyhow::Result<Value> {
    let path = format!("/components/{component}/shadow");
    match call(admin.request(Method::POST, &format!("{path}/stop"))).await {
        Ok(report) => Ok(report),
        Err(_) => call(admin.request(Method::GET, &path)).await,
    }
}

async fn call(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await.context("the admin API did not answer")?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("HTTP {}: {text}", status.as_u16());
    }
    response.json().await.context("failed to read the shadow report")
}

/// The runs as a table, one row per run, and any run that ended otherwise
/// than by the bench's stop.
pub fn table(figures: &ShadowFigures) -> String {
    let header: Vec<String> = [
        "orders/s",
        "vs none (mean)",
        "host CPU ms/order",
        "compared",
        "equal",
        "differing",
        "failed",
        "skipped",
        "serving µs/call",
        "candidate µs/call",
        "candidate CPU µs/call",
    ]
    .map(str::to_owned)
    .to_vec();
    let rows: Vec<(String, Vec<String>)> = figures.runs.iter().map(|run| (label(run), cells(run))).collect();
    let mut out = format!("\nshadow runs of {} (closed loops, one after another):\n", figures.component);
    out.push_str(&report::render(&header, &rows));
    for run in &figures.runs {
        let state = run.summary().map(|s| s.state).filter(|s| s != "ended: stopped by an operator");
        if let Some(note) = run.error.as_ref().or(state.as_ref()) {
            out.push_str(&format!("  {}: {note}\n", label(run)));
        }
    }
    out
}

fn label(run: &Run) -> String {
    run.phase.as_ref().map_or_else(|| format!("shadow-{}", run.candidate), |p| p.scenario.clone())
}

fn cells(run: &Run) -> Vec<String> {
    let dash = || "-".to_owned();
    let phase = run.phase.as_ref();
    let mut cells = vec![
        phase.map_or_else(dash, |p| format!("{:.1}", p.completed_per_s)),
        run.ratio_to_none.map_or_else(dash, |r| format!("{r:.3}")),
        phase.and_then(|p| p.host.as_ref()?.cpu_s_per_1000_orders).map_or_else(dash, |ms| format!("{ms:.2}")),
    ];
    let Some(summary) = run.summary() else {
        cells.extend(std::iter::repeat_with(dash).take(8));
        return cells;
    };
    let e = &summary.events;
    cells.extend([e.compared, e.equal, e.differing, e.candidate_failed, e.skipped].map(|n| n.to_string()));
    let mean = |side: &str, pick: fn(&Cost) -> u64| {
        summary.cost.get(side).and_then(|c| c.mean(pick(c))).map_or_else(dash, |us| format!("{us:.0}"))
    };
    cells.extend([mean("serving", |c| c.time), mean("candidate", |c| c.time), mean("candidate", |c| c.cpu)]);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(candidate: &'static str, completed: usize, shadow: Option<Value>) -> Run {
        let load = Load::Closed { concurrency: 32, orders: usize::MAX, duration: Duration::from_secs(1) };
        let mut phase = PhaseReport::new(load, &[], Duration::from_secs(1), None);
        phase.scenario = format!("shadow-{candidate}-closed-c32");
        phase.completed_per_s = completed as f64;
        Run { candidate, wasm: None, phase: Some(phase), ratio_to_none: None, shadow, error: None }
    }

    #[test]
    fn the_table_shows_each_runs_counts_and_the_candidates_mean_cost() {
        let report = serde_json::json!({
            "state": "ended: the candidate is spinning",
            "events": {"compared": 40, "equal": 0, "differing": 0, "candidate_failed": 40, "skipped": 7},
            "cost": {"serving": {"calls": 40, "time": 4000, "cpu": 3000},
                     "candidate": {"calls": 40, "time": 40_000_000, "cpu": 2_000_000}},
        });
        let mut spin = run("spin", 360, Some(report));
        spin.ratio_to_none = Some(0.9);
        let figures = ShadowFigures { component: "payment".into(), runs: vec![run("none", 400, None), spin] };
        let text = table(&figures);
        let row = text.lines().find(|l| l.starts_with("shadow-spin-closed-c32")).expect(&text);
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1..], ["360.0", "0.900", "-", "40", "0", "0", "40", "7", "100", "1000000", "50000"], "{text}");
        let none = text.lines().find(|l| l.starts_with("shadow-none-closed-c32")).expect(&text);
        assert!(none.ends_with('-'), "{text}");
        assert!(text.contains("shadow-spin-closed-c32: ended: the candidate is spinning"), "{text}");
    }
}
