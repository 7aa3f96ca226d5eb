//! The command line and what each subcommand does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::gateway::{Gateway, OrderTemplate};
use crate::host::{Process, Sample};
use crate::load::{Driver, Load};
use crate::order::Polling;
use crate::phase::{self, Observers};
use crate::report::{self, PhaseReport};
use crate::topic::TopicReader;
use crate::{cleanup, health};

/// Load driver for the shop: places orders through the gateway and measures
/// them end to end, by polling and on the Kafka topic.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Wait until every port's /health answers 200; print the elapsed ms.
    WaitHealthy(HealthArgs),
    /// One closed-loop run: a fixed number of orders in flight.
    Closed {
        #[command(flatten)]
        common: Common,
        /// Orders in flight.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Orders to place in all.
        #[arg(long, default_value_t = 10_000)]
        orders: usize,
        /// Stop sending after this many seconds even if `orders` is not reached.
        #[arg(long, default_value_t = 15)]
        duration_s: u64,
    },
    /// One open-loop run: orders sent on a fixed schedule.
    Open {
        #[command(flatten)]
        common: Common,
        /// Orders per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 15)]
        duration_s: u64,
    },
    /// The standard scenarios in a row: warm-up, closed loops, open loops.
    Suite(SuiteArgs),
    /// Delete the topics and consumer groups of a finished benchmark host.
    DeleteTopics {
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// The run's topic prefix, e.g. `bench-1a2b3c4d.`.
        #[arg(long)]
        prefix: String,
    },
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// Health URLs that must all answer 200.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:3001/health,http://127.0.0.1:3002/health,\
                         http://127.0.0.1:3003/health,http://127.0.0.1:3004/health,http://127.0.0.1:3005/health"
    )]
    urls: Vec<String>,
    /// Start the clock when this process execs `--exe-name` (e.g. the pid of
    /// `cargo run -p host`); fail early if it exits.
    #[arg(long)]
    pid: Option<u32>,
    /// Executable name that marks the host's start.
    #[arg(long, default_value = "host")]
    exe_name: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

#[derive(Debug, Args)]
struct SuiteArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrency of each closed-loop run.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    closed: Vec<usize>,
    /// Orders of each closed-loop run (unless its time is up first).
    #[arg(long, default_value_t = 10_000)]
    closed_orders: usize,
    /// Longest sending time of each closed-loop run, in seconds.
    #[arg(long, default_value_t = 15)]
    closed_duration_s: u64,
    /// Rate of each open-loop run, in orders per second.
    #[arg(long, value_delimiter = ',', default_value = "100,250")]
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
}

/// Options every load subcommand shares.
#[derive(Debug, Args)]
struct Common {
    /// Base URL of the gateway.
    #[arg(long, env = "BENCH_GATEWAY", default_value = "http://127.0.0.1:3005")]
    gateway: String,
    /// Kafka bootstrap servers, for the topic reader.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Physical name of the orders topic (the host's `topic_prefix` + `orders`).
    #[arg(long, env = "BENCH_ORDERS_TOPIC", default_value = "orders")]
    orders_topic: String,
    /// Do not read the topic (no POST→final-event figures).
    #[arg(long)]
    no_topic: bool,
    /// Pid of the host, for its CPU time and memory.
    #[arg(long)]
    host_pid: Option<u32>,
    /// Pause after each status answer before polling again.
    #[arg(long, default_value_t = 10)]
    poll_interval_ms: u64,
    /// Timeout of each HTTP call.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Give up on an order this long after its send time, in seconds.
    #[arg(long, default_value_t = 60)]
    final_timeout_s: u64,
    /// After a phase, wait up to this long for final events still on their way, in seconds.
    #[arg(long, default_value_t = 10)]
    topic_grace_s: u64,
    /// SKU ordered; one the shop does not stock never runs out.
    #[arg(long, default_value = "bench-widget")]
    sku: String,
    /// Unit price in cents.
    #[arg(long, default_value_t = 1250)]
    unit_price_cents: u64,
    /// Card number (the accepted test card by default).
    #[arg(long, default_value = "4242 4242 4242 4242")]
    card: String,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

impl Common {
    fn driver(&self) -> anyhow::Result<Driver> {
        anyhow::ensure!(self.poll_interval_ms > 0, "--poll-interval-ms must be at least 1");
        anyhow::ensure!(self.request_timeout_ms > 0, "--request-timeout-ms must be at least 1");
        anyhow::ensure!(self.final_timeout_s > 0, "--final-timeout-s must be at least 1");
        Ok(Driver {
            gateway: Gateway::new(&self.gateway, Duration::from_millis(self.request_timeout_ms))?,
            template: Arc::new(OrderTemplate::new(&self.sku, self.unit_price_cents, &self.card)),
            polling: Polling {
                interval: Duration::from_millis(self.poll_interval_ms),
                final_timeout: Duration::from_secs(self.final_timeout_s),
            },
        })
    }

    async fn observers(&self) -> anyhow::Result<Observers> {
        let topic =
            if self.no_topic { None } else { Some(TopicReader::start(&self.brokers, &self.orders_topic).await?) };
        Ok(Observers {
            topic,
            topic_grace: Duration::from_secs(self.topic_grace_s),
            host: self.host_pid.map(Process::Pid),
        })
    }
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
}

/// Runs the subcommand.
///
/// # Errors
/// Invalid options, an unreachable system, or results that cannot be written.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::WaitHealthy(args) => wait_healthy(args).await,
        Command::Closed { common, concurrency, orders, duration_s } => {
            let load = Load::Closed { concurrency, orders, duration: Duration::from_secs(duration_s) };
            single(&common, load).await
        }
        Command::Open { common, rate, duration_s } => {
            single(&common, Load::Open { rate, duration: Duration::from_secs(duration_s) }).await
        }
        Command::Suite(args) => suite(args).await,
        Command::DeleteTopics { brokers, prefix } => {
            let (topics, groups) = cleanup::delete_prefixed(&brokers, &prefix).await?;
            eprintln!("bench: deleted {topics} topics and {groups} consumer groups named {prefix:?}*");
            Ok(())
        }
    }
}

async fn wait_healthy(args: HealthArgs) -> anyhow::Result<()> {
    let gateway = Gateway::new("http://127.0.0.1", Duration::from_secs(1))?;
    let timeout = Duration::from_secs(args.timeout_s);
    let elapsed = health::wait(&gateway, &args.urls, args.pid, &args.exe_name, timeout).await?;
    let ms = elapsed.as_millis() as u64;
    report::write_json(&args.out_dir, "healthy", &serde_json::json!({ "healthy_ms": ms, "urls": args.urls }))?;
    eprintln!("bench: all {} ports healthy after {ms} ms", args.urls.len());
    // Bare number on stdout, for scripts.
    println!("{ms}");
    Ok(())
}

async fn single(common: &Common, load: Load) -> anyhow::Result<()> {
    load.validate()?;
    let driver = common.driver()?;
    let observers = common.observers().await?;
    eprintln!("bench: {} ...", load.name());
    let phase = phase::run(&driver, load, &observers).await?;
    report::write_json(&common.out_dir, &phase.scenario, &phase)?;
    print!("{}", report::table(std::slice::from_ref(&phase)));
    Ok(())
}

async fn suite(args: SuiteArgs) -> anyhow::Result<()> {
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
    let mut phases = Vec::with_capacity(loads.len());
    for load in loads {
        eprintln!("bench: {} ...", load.name());
        let phase = phase::run(&driver, load, &observers).await?;
        report::write_json(&common.out_dir, &phase.scenario, &phase)?;
        eprintln!("bench: {}: {:.1} completed orders/s", phase.scenario, phase.completed_per_s);
        phases.push(phase);
    }
    let suite = SuiteReport { healthy_ms: args.healthy_ms, host_idle, host_idle_cpu_cores, phases: &phases };
    report::write_json(&common.out_dir, "suite", &suite)?;
    println!();
    if let Some(ms) = args.healthy_ms {
        println!("time to healthy (all 5 ports): {ms} ms");
    }
    if let (Some(idle), Some(cores)) = (host_idle, host_idle_cpu_cores) {
        println!("host idle: RSS {:.0} MiB, CPU {:.1} % of a core", idle.rss_mib, cores * 100.0);
    }
    print!("{}", report::table(&phases));
    println!("JSON: {}/{{suite,<scenario>}}.json", common.out_dir.display());
    Ok(())
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
    Observers { topic: None, topic_grace: observers.topic_grace, host: observers.host }
}
