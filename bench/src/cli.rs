//! The command line and what each subcommand does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::gateway::{Gateway, OrderTemplate};
use crate::host::Process;
use crate::load::{Driver, Load};
use crate::order::Polling;
use crate::phase::{self, Observers};
use crate::report;
use crate::stages::Probe;
use crate::suite::SuiteArgs;
use crate::topic::TopicReader;
use crate::{cleanup, email_js, health, isolation, physical, scale, store, suite, wasm};

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
    /// The standard scenarios in a row: warm-up, closed loops, open loops,
    /// a hot swap under load; stage costs from each component's /health.
    Suite(Box<SuiteArgs>),
    /// The physical limit: the saga's records moved by plain Kafka relays
    /// (no Wasm, no state) on the broker, compared with the suite's results.
    Physical(physical::PhysicalArgs),
    /// Each component's logic per event: native, and through the host's
    /// runtime and pipeline (no broker).
    Wasm(wasm::WasmArgs),
    /// One component's throughput while a misbehaving one (sleeping,
    /// spinning, write-bombing, recursing, spinning queries) runs beside it
    /// in the same host; no broker.
    Isolation(isolation::IsolationArgs),
    /// The email service in JavaScript vs Rust: size, compile and cache-load
    /// time, instantiation and per-event cost through the host's runtime.
    EmailJs(email_js::EmailJsArgs),
    /// End to end on the running host: a closed loop with the Rust email
    /// build serving, then with the JavaScript one swapped in (admin API).
    EmailJsE2e(email_js::EmailJsE2eArgs),
    /// One hot component (email) on 1, 2 and 3 hosts sharing PostgreSQL,
    /// and on one host with redb: events/s and CPU per event of the hosts,
    /// the database and the broker.
    Scale(scale::ScaleArgs),
    /// Where a stopped host's redb file spends its bytes, table by table.
    StoreUsage(store::UsageArgs),
    /// The host's redb store alone filling up with 100,000 orders' worth of
    /// commits, handled ids pruned on a short horizon: size and commit rate.
    Store(store::growth::GrowthArgs),
    /// Delete the topics and consumer groups of a finished benchmark host.
    DeleteTopics {
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// The run's topic prefix, e.g. `bench-1a2b3c4d.`.
        #[arg(long)]
        prefix: String,
        /// How long to keep trying a group that still has members (a host
        /// stopped just now may still be in its groups until its session
        /// times out), in seconds.
        #[arg(long, default_value_t = 0)]
        patience_s: u64,
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

/// Options every load subcommand shares.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Base URL of the gateway.
    #[arg(long, env = "BENCH_GATEWAY", default_value = "http://127.0.0.1:3005")]
    pub(crate) gateway: String,
    /// Kafka bootstrap servers, for the topic reader.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub(crate) brokers: String,
    /// Physical name of the orders topic (the host's `topic_prefix` + `orders`).
    #[arg(long, env = "BENCH_ORDERS_TOPIC", default_value = "orders")]
    pub(crate) orders_topic: String,
    /// Do not read the topic (no POST→final-event figures).
    #[arg(long)]
    pub(crate) no_topic: bool,
    /// Pid of the host, for its CPU time and memory.
    #[arg(long)]
    pub(crate) host_pid: Option<u32>,
    /// Components whose /health stage counters are read around each phase,
    /// as `NAME=HEALTH_URL`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) components: Vec<String>,
    /// Pause after each status answer before polling again.
    #[arg(long, default_value_t = 10)]
    pub(crate) poll_interval_ms: u64,
    /// Timeout of each HTTP call.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) request_timeout_ms: u64,
    /// Give up on an order this long after its send time, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) final_timeout_s: u64,
    /// After a phase, wait up to this long for final events still on their way, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) topic_grace_s: u64,
    /// SKU ordered, from the shop's catalog; one it does not limit (app.toml
    /// stocks no `pen` limit) never runs out.
    #[arg(long, default_value = "pen")]
    pub(crate) sku: String,
    /// Unit price in cents: the catalog's (another is refused with 422).
    #[arg(long, default_value_t = 199)]
    pub(crate) unit_price_cents: u64,
    /// Card number (the accepted test card by default).
    #[arg(long, default_value = "4242 4242 4242 4242")]
    pub(crate) card: String,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    pub(crate) out_dir: PathBuf,
}

impl Common {
    pub(crate) fn driver(&self) -> anyhow::Result<Driver> {
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

    pub(crate) async fn observers(&self) -> anyhow::Result<Observers> {
        let topic =
            if self.no_topic { None } else { Some(TopicReader::start(&self.brokers, &self.orders_topic).await?) };
        Ok(Observers {
            topic,
            topic_grace: Duration::from_secs(self.topic_grace_s),
            host: self.host_pid.map(Process::Pid),
            health: self.probe()?,
        })
    }

    fn probe(&self) -> anyhow::Result<Option<Probe>> {
        if self.components.is_empty() {
            return Ok(None);
        }
        let components = self
            .components
            .iter()
            .map(|pair| match pair.split_once('=') {
                Some((name, url)) if !name.is_empty() && !url.is_empty() => Ok((name.to_owned(), url.to_owned())),
                _ => anyhow::bail!("--components takes NAME=HEALTH_URL pairs, not {pair:?}"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Probe::new(components).map(Some)
    }
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
        Command::Suite(args) => suite::run(*args).await,
        Command::Physical(args) => physical::run(args).await,
        Command::Wasm(args) => wasm::run(args).await,
        Command::Isolation(args) => isolation::run(args).await,
        Command::EmailJs(args) => email_js::run(args).await,
        Command::EmailJsE2e(args) => email_js::e2e(args).await,
        Command::Scale(args) => scale::run(args).await,
        Command::StoreUsage(args) => store::usage(&args),
        Command::Store(args) => tokio::task::spawn_blocking(move || store::growth::run(&args)).await?,
        Command::DeleteTopics { brokers, prefix, patience_s } => {
            let patience = Duration::from_secs(patience_s);
            let (topics, groups) = cleanup::delete_prefixed_within(&brokers, &prefix, patience).await?;
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
    if let Some(stages) = &phase.stages {
        print!("{}", crate::stages::table(&[(&phase.scenario, stages)]));
    }
    Ok(())
}
