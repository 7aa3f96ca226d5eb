//! `bench suite`: the standard scenarios in a row against one running
//! host (warm-up, closed loops, open loops, then a hot swap under load and
//! shadow runs under load), with each component's stage costs, printed as
//! tables and written as JSON.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::cli::Common;
use crate::host::{Process, Sample};
use crate::hotswap::{self, Admin, Plan, SwapFigures};
use crate::load::Load;
use crate::phase::{self, Observers};
use crate::report::{self, PhaseReport};
use crate::shadow::{self, ShadowArgs, ShadowFigures};

#[derive(Debug, Args)]
pub struct SuiteArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrency of each closed-loop run (`--closed` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "32,128")]
    closed: Vec<usize>,
    /// Orders of each closed-loop run (unless its time is up first).
    #[arg(long, default_value_t = 10_000)]
    closed_orders: usize,
    /// Longest sending time of each closed-loop run, in seconds.
    #[arg(long, default_value_t = 15)]
    closed_duration_s: u64,
    /// Rate of each open-loop run, in orders per second (`--rates` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,250")]
    rates: Vec<f64>,
    /// Sending time of each open-loop run, in seconds.
    #[arg(long, default_value_t = 15)]
    open_duration_s: u64,
    /// Orders placed (8 in flight) before measuring, not reported; 0 for none.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Time to healthy measured by `wait-healthy`, to include in the results.
    #[arg(long)]
    healthy_ms: Option<u64>,
    #[command(flatten)]
    swap: SwapArgs,
    #[command(flatten)]
    shadow: ShadowArgs,
}

/// The hot-swap phase.
#[derive(Debug, Args)]
struct SwapArgs {
    /// Base URL of the host's admin API.
    #[arg(long, default_value = "http://127.0.0.1:3090")]
    admin_url: String,
    /// The admin API's token; without it there is no hot-swap phase and no
    /// shadow phase.
    #[arg(long, env = "BENCH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Component reloaded twice under load.
    #[arg(long, default_value = "payment")]
    swap_component: String,
    /// Another build of it, uploaded by the first reload (the second reloads
    /// the manifest's file); if missing, both reload the manifest's file.
    #[arg(long)]
    swap_wasm: Option<PathBuf>,
    /// Closed-loop concurrency during the swaps.
    #[arg(long, default_value_t = 32)]
    swap_concurrency: usize,
    /// Length of the swap phase in seconds (the reloads at 1/3 and 2/3); 0 skips it.
    #[arg(long, default_value_t = 10)]
    swap_duration_s: u64,
}

/// The suite's results file.
#[derive(Serialize)]
struct SuiteReport<'a> {
    /// Host start to every `/health` answering 200.
    healthy_ms: Option<u64>,
    /// The host before any order.
    host_idle: Option<Sample>,
    /// CPU the idle host used, in cores (1.0 = one core busy), over `IDLE_WINDOW`.
    host_idle_cpu_cores: Option<f64>,
    phases: &'a [PhaseReport],
    hotswap: Option<&'a SwapFigures>,
    shadow: Option<&'a ShadowFigures>,
}

/// The hot-swap phase's results file.
#[derive(Serialize)]
struct HotswapReport<'a> {
    phase: &'a PhaseReport,
    #[serde(flatten)]
    figures: &'a SwapFigures,
}

/// Runs the suite.
///
/// # Errors
/// Invalid options, an unreachable system, or results that cannot be written.
pub async fn run(args: SuiteArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let closed_duration = Duration::from_secs(args.closed_duration_s);
    let open_duration = Duration::from_secs(args.open_duration_s);
    let loads: Vec<Load> = args
        .closed
        .iter()
        .map(|&concurrency| Load::Closed { concurrency, orders: args.closed_orders, duration: closed_duration })
        .chain(args.rates.iter().map(|&rate| Load::Open { rate, duration: open_duration }))
        .collect();
    for load in &loads {
        load.validate()?;
    }
    let driver = common.driver()?;
    let observers = common.observers().await?;
    let (host_idle, host_idle_cpu_cores) = match observers.host {
        Some(host) => {
            let (sample, cores) = idle(host).await?;
            (Some(sample), Some(cores))
        }
        None => (None, None),
    };
    if args.warmup > 0 {
        let warmup = Load::Closed { concurrency: 8, orders: args.warmup, duration: Duration::from_secs(30) };
        let phase = phase::run(&driver, warmup, &observers_without_topic(&observers)).await?;
        eprintln!("bench: warm-up: {} orders, {} final", phase.sent, phase.finished);
    }
    let mut phases = Vec::with_capacity(loads.len() + 1);
    for load in loads {
        eprintln!("bench: {} ...", load.name());
        let phase = phase::run(&driver, load, &observers).await?;
        report::write_json(&common.out_dir, &phase.scenario, &phase)?;
        eprintln!("bench: {}: {:.1} completed orders/s", phase.scenario, phase.completed_per_s);
        phases.push(phase);
    }
    let admin = match args.swap.admin_token.as_deref() {
        Some(token) => Some(Admin::new(&args.swap.admin_url, token)?),
        None => None,
    };
    let swapped = hot_swap(&args, admin.as_ref(), &driver, &observers).await?;
    if let Some((phase, _)) = &swapped {
        phases.push(phase.clone());
    }
    let shadowed = match &admin {
        Some(admin) => shadow::run(&args.shadow, admin, &driver, &observers, &common.out_dir).await?,
        None => None,
    };
    let figures = swapped.as_ref().map(|(_, figures)| figures);
    let suite = SuiteReport {
        healthy_ms: args.healthy_ms,
        host_idle,
        host_idle_cpu_cores,
        phases: &phases,
        hotswap: figures,
        shadow: shadowed.as_ref(),
    };
    report::write_json(&common.out_dir, "suite", &suite)?;
    summary(&args, &suite, swapped.as_ref())
}

/// Writes the stage costs and prints every table.
fn summary(
    args: &SuiteArgs,
    suite: &SuiteReport<'_>,
    swapped: Option<&(PhaseReport, SwapFigures)>,
) -> anyhow::Result<()> {
    let common = &args.common;
    let stages: Vec<(&str, &crate::stages::StageReport)> =
        suite.phases.iter().filter_map(|p| Some((p.scenario.as_str(), p.stages.as_ref()?))).collect();
    if !stages.is_empty() {
        let json: Vec<_> = stages.iter().map(|(s, r)| serde_json::json!({ "scenario": s, "stages": r })).collect();
        report::write_json(&common.out_dir, "stages", &json)?;
    }
    println!();
    if let Some(ms) = args.healthy_ms {
        println!("time to healthy (all 5 ports): {ms} ms");
    }
    if let (Some(idle), Some(cores)) = (suite.host_idle, suite.host_idle_cpu_cores) {
        println!("host idle: RSS {:.0} MiB, CPU {:.1} % of a core", idle.rss_mib, cores * 100.0);
    }
    if !suite.phases.is_empty() {
        print!("{}", report::table(suite.phases));
        print!("{}", crate::stages::table(&stages));
    }
    if let Some((phase, figures)) = swapped {
        print!("{}", hotswap::summary(&phase.scenario, figures));
    }
    if let Some(figures) = suite.shadow {
        print!("{}", shadow::table(figures));
    }
    println!("JSON: {}/{{suite,stages,hotswap,shadow,<scenario>}}.json", common.out_dir.display());
    Ok(())
}

/// The hot-swap phase: a closed loop with two reloads in it.
async fn hot_swap(
    args: &SuiteArgs,
    admin: Option<&Admin>,
    driver: &crate::load::Driver,
    observers: &Observers,
) -> anyhow::Result<Option<(PhaseReport, SwapFigures)>> {
    let swap = &args.swap;
    let Some(admin) = admin else {
        eprintln!("bench: no hot-swap phase and no shadow phase (they need --admin-token or BENCH_ADMIN_TOKEN)");
        return Ok(None);
    };
    if swap.swap_duration_s == 0 {
        eprintln!("bench: no hot-swap phase (--swap-duration-s 0)");
        return Ok(None);
    }
    let duration = Duration::from_secs(swap.swap_duration_s);
    let load = Load::Closed { concurrency: swap.swap_concurrency, orders: usize::MAX, duration };
    load.validate()?;
    let alternate = swap.swap_wasm.clone().filter(|path| path.is_file());
    if alternate.is_none() {
        eprintln!("bench: no second build to swap in; both reloads reload the manifest's file");
    }
    let plan = Plan {
        component: swap.swap_component.clone(),
        files: vec![alternate, None],
        at: vec![duration / 3, duration * 2 / 3],
    };
    eprintln!("bench: hot swap of {} under {} ...", plan.component, load.name());
    let since_unix_ms = unix_ms_now().saturating_sub(1_000);
    let start = tokio::time::Instant::now();
    let (mut phase, outcomes, mut swaps) = phase::run_with(driver, load, observers, admin.swap(&plan, start)).await?;
    phase.scenario = format!("hotswap-c{}", swap.swap_concurrency);
    admin.pauses(&plan.component, since_unix_ms, &mut swaps).await?;
    let figures = hotswap::figures(swaps, &outcomes);
    report::write_json(&args.common.out_dir, "hotswap", &HotswapReport { phase: &phase, figures: &figures })?;
    Ok(Some((phase, figures)))
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long the idle host is watched before any order.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

/// The idle host's memory, and the CPU it uses doing nothing (consumer
/// polls, timers), which every phase's CPU figure includes.
async fn idle(host: Process) -> anyhow::Result<(Sample, f64)> {
    let before = host.sample()?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = host.sample()?;
    Ok((after, (after.cpu_s - before.cpu_s) / IDLE_WINDOW.as_secs_f64()))
}

fn observers_without_topic(observers: &Observers) -> Observers {
    Observers { topic: None, topic_grace: observers.topic_grace, host: observers.host, health: None }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        suite: SuiteArgs,
    }

    #[test]
    fn rates_alone_runs_no_open_loop_and_the_defaults_stay() {
        let cli = Cli::try_parse_from(["suite", "--closed", "32", "--rates", "--swap-duration-s", "0"]).unwrap();
        assert_eq!(cli.suite.closed, [32]);
        assert!(cli.suite.rates.is_empty());
        assert_eq!(cli.suite.swap.swap_duration_s, 0);
        let cli = Cli::try_parse_from(["suite"]).unwrap();
        assert_eq!(cli.suite.closed, [32, 128]);
        assert_eq!(cli.suite.rates, [100.0, 250.0]);
    }
}
