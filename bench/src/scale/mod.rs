//! `bench scale`: one hot component on several hosts. The email component
//! (it consumes only `emails`, so every record is one handled event) runs
//! on 1, 2 and 3 hosts sharing one PostgreSQL schema and the topic's
//! partitions, then on one host with redb; each run gets a burst of
//! `EmailRequested` events and reports events/s and the CPU per event of
//! the hosts, of PostgreSQL and of the broker, which share the machine.

mod fleet;
mod load;
mod table;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use crate::report;
use crate::stages::StageTotal;
use fleet::{Backend, BaseManifest, Fleet, FleetSpec, Launch, LogFindings};
use load::Reading;

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// PostgreSQL of the `postgres` runs (`scripts/postgres.sh url`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Base manifest: each host's is this one with its ports moved (see
    /// `--port-step`), so `bench.sh`'s copy carries `BENCH_PORT_OFFSET`.
    #[arg(long, default_value = "app.toml")]
    manifest: PathBuf,
    /// The run's prefix, e.g. `bench-1a2b3c4d.`: run N's topics and groups
    /// are `PREFIX` + `scaleN.` (`scale-redb.` for redb), its schema
    /// `bench_<id>_nN`.
    #[arg(long)]
    prefix: String,
    /// Events produced in each run.
    #[arg(long, default_value_t = 6_000)]
    events: usize,
    /// Hosts of each PostgreSQL run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    hosts: Vec<usize>,
    /// Leave out the run of one host on redb.
    #[arg(long)]
    no_redb: bool,
    /// Partitions of the runs' topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The `host` binary.
    #[arg(long, default_value = "target/debug/host")]
    host_bin: PathBuf,
    /// Host `i` (from 0) listens on the manifest's ports plus `(i + 1) * STEP`.
    #[arg(long, default_value_t = 100)]
    port_step: u16,
    /// Longest wait for the hosts to be healthy with the partitions spread, in seconds.
    #[arg(long, default_value_t = 90)]
    ready_timeout_s: u64,
    /// Longest wait for every event to be handled, in seconds.
    #[arg(long, default_value_t = 60)]
    drain_timeout_s: u64,
    /// Directory of the JSON results (`scale.json`) and of the hosts' logs (`scale/`).
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// How often `/health` is read while the events are handled.
const POLL: Duration = Duration::from_millis(50);
/// SIGTERM to SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// A stopped host's static member leaves its group when its session times
/// out (`session.timeout.ms` of the host's consumers, 10 s).
const GROUP_PATIENCE: Duration = Duration::from_secs(15);

/// One run: its hosts and backend.
#[derive(Debug, Clone)]
struct Setup {
    backend: Backend,
    hosts: usize,
}

impl Setup {
    fn label(&self) -> String {
        match self.backend {
            Backend::Postgres => format!("pg-n{}", self.hosts),
            Backend::Redb => format!("redb-n{}", self.hosts),
        }
    }

    fn topic_prefix(&self, prefix: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("{prefix}scale{}.", self.hosts),
            Backend::Redb => format!("{prefix}scale-redb."),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub label: String,
    pub backend: Backend,
    pub hosts: usize,
    pub topic_prefix: String,
    pub schema: Option<String>,
    /// Partitions each host held.
    pub partitions_per_host: Vec<usize>,
    /// Start of the hosts to every one healthy with the partitions spread.
    pub ready_s: f64,
    pub events: u64,
    /// Events the hosts handled during the run (sum of `handled`).
    pub handled: u64,
    pub duplicates_dropped: u64,
    pub dead_lettered: u64,
    /// Each host's share of the handled events.
    pub handled_per_host: Vec<u64>,
    /// First record produced to the poll that saw every event handled.
    pub elapsed_s: f64,
    /// First record produced to the last acknowledged.
    pub produce_s: f64,
    pub events_per_s: f64,
    pub hosts_cpu_s: f64,
    pub host_cpu_ms_per_event: f64,
    pub postgres_cpu_s: f64,
    pub postgres_cpu_ms_per_event: f64,
    pub broker_cpu_s: f64,
    pub broker_cpu_ms_per_event: f64,
    /// Hosts, PostgreSQL and broker together.
    pub total_cpu_ms_per_event: f64,
    pub driver_cpu_s: f64,
    /// Busy share of all the machine's cores over the run.
    pub machine_busy_share: Option<f64>,
    pub cores: usize,
    /// Mean µs per run of each stage over all hosts (commit: per batch).
    pub stage_mean_us: std::collections::BTreeMap<String, f64>,
    pub commit_us_per_event: Option<f64>,
    pub events_per_batch: Option<f64>,
    /// Time per event on the hosts' executor threads, which handle events
    /// one after the other: decode, dedup, instantiate, call and commit,
    /// summed over the hosts and divided by the events handled.
    pub executor_us_per_event: Option<f64>,
    /// Resident memory of the hosts together at the end, in MiB.
    pub hosts_rss_mib: f64,
    /// ERROR and WARN lines of the hosts' logs.
    pub logs: LogFindings,
}

#[derive(Serialize)]
struct ScaleReport<'a> {
    events: usize,
    partitions: i32,
    runs: &'a [RunFigures],
}

/// Runs every setup in turn, then removes what they left.
///
/// # Errors
/// Bad options, hosts that cannot start or become ready, events not all
/// handled in time, or results that cannot be written. Hosts are stopped,
/// schemas dropped and topics deleted in every case.
pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.partitions > 0, "--partitions must be at least 1");
    anyhow::ensure!(args.hosts.iter().all(|n| *n > 0), "--hosts takes counts of at least 1");
    anyhow::ensure!(args.port_step > 0, "--port-step must be at least 1");
    let base = BaseManifest::load(&args.manifest)?;
    anyhow::ensure!(
        args.hosts.is_empty() || args.database_url.as_deref().is_some_and(|u| !u.is_empty()),
        "the PostgreSQL runs need --database-url or DATABASE_URL (`scripts/postgres.sh url`)"
    );
    let id = run_id(&args.prefix);
    let work_dir = std::env::temp_dir().join(format!("shop-bench-scale-{id}-{}", std::process::id()));
    let mut setups: Vec<Setup> = args.hosts.iter().map(|n| Setup { backend: Backend::Postgres, hosts: *n }).collect();
    if !args.no_redb {
        setups.push(Setup { backend: Backend::Redb, hosts: 1 });
    }
    let mut runs = Vec::new();
    let mut schemas = Vec::new();
    let outcome = tokio::select! {
        result = run_all(&args, &base, &setups, &work_dir, &mut runs, &mut schemas) => result,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    // Whatever happened, the hosts are gone by now (the fleet's drop).
    for schema in &schemas {
        if let Err(err) = drop_schema(args.database_url.as_deref().unwrap_or_default(), schema).await {
            eprintln!("bench: schema {schema:?} not dropped: {err:#}");
        }
    }
    let topics = format!("{}scale", args.prefix);
    match crate::cleanup::delete_prefixed_within(&args.brokers, &topics, GROUP_PATIENCE).await {
        Ok((topics_deleted, groups)) => {
            eprintln!("bench: deleted {topics_deleted} topics and {groups} consumer groups named {topics:?}*");
        }
        Err(err) => eprintln!("bench: the topics {topics}* were not deleted: {err:#}"),
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    if !runs.is_empty() {
        let report = ScaleReport { events: args.events, partitions: args.partitions, runs: &runs };
        report::write_json(&args.out_dir, "scale", &report)?;
        print!("{}", table::render(&runs, args.partitions));
    }
    outcome
}

async fn run_all(
    args: &ScaleArgs,
    base: &BaseManifest,
    setups: &[Setup],
    work_dir: &std::path::Path,
    runs: &mut Vec<RunFigures>,
    schemas: &mut Vec<String>,
) -> anyhow::Result<()> {
    let launch = Launch {
        host_bin: std::path::absolute(&args.host_bin).context("failed to resolve --host-bin")?,
        brokers: args.brokers.clone(),
        database_url: args.database_url.clone(),
        port_step: args.port_step,
    };
    anyhow::ensure!(launch.host_bin.is_file(), "no host binary at {:?}: run `cargo build -p host`", launch.host_bin);
    let id = run_id(&args.prefix);
    for setup in setups {
        let schema = format!("bench_{id}_n{}", setup.hosts);
        let spec = FleetSpec {
            hosts: setup.hosts,
            backend: setup.backend,
            topic_prefix: setup.topic_prefix(&args.prefix),
            partitions: args.partitions,
            schema: schema.clone(),
            work_dir: work_dir.join(setup.label()),
            log_dir: args.out_dir.join("scale"),
            label: setup.label(),
        };
        if setup.backend == Backend::Postgres {
            // Dropped afterwards, whatever happens; a leftover of an
            // earlier run with this name would not be fresh.
            schemas.push(schema.clone());
            drop_schema(args.database_url.as_deref().unwrap_or_default(), &schema).await?;
        }
        eprintln!(
            "bench: scale {}: {} host(s) serving {} on {}, {} partitions, {} events ...",
            spec.label,
            spec.hosts,
            fleet::COMPONENT,
            setup.backend.name(),
            spec.partitions,
            args.events
        );
        let figures = one_run(args, base, &spec, &launch).await?;
        eprintln!(
            "bench: scale {}: {:.0} events/s, host CPU {:.3} ms/event, PostgreSQL {:.3} ms/event",
            figures.label, figures.events_per_s, figures.host_cpu_ms_per_event, figures.postgres_cpu_ms_per_event
        );
        runs.push(figures);
    }
    Ok(())
}

async fn one_run(
    args: &ScaleArgs,
    base: &BaseManifest,
    spec: &FleetSpec,
    launch: &Launch,
) -> anyhow::Result<RunFigures> {
    let records = load::email_requests(args.events)?;
    let topic = format!("{}{}", spec.topic_prefix, shop_events::topics::EMAILS);
    let started = Instant::now();
    let mut fleet = Fleet::start(spec, base, launch)?;
    let result = async {
        let partitions = usize::try_from(spec.partitions).unwrap_or(1);
        let per_host = fleet.wait_spread(partitions, Duration::from_secs(args.ready_timeout_s)).await?;
        let ready = started.elapsed();
        let producer = load::producer(&args.brokers)?;
        let before = Reading::take(&fleet, None).await?;
        let start = Instant::now();
        let producing = tokio::spawn(async move { load::produce(&producer, &topic, records).await });
        let events = args.events as u64;
        let drain = Duration::from_secs(args.drain_timeout_s);
        let (done, health) = load::wait_handled(&mut fleet, events, POLL, drain).await?;
        let after = Reading::take(&fleet, Some(health)).await?;
        let produce = producing.await.context("the producer task failed")??;
        let times = Times { ready, produce, elapsed: done.duration_since(start) };
        Ok::<_, anyhow::Error>(figures(spec, args.events, per_host, times, &before, &after))
    }
    .await;
    fleet.stop(STOP_GRACE).await;
    let mut figures = result?;
    figures.logs = fleet::scan_logs(&fleet.logs());
    for line in &figures.logs.first {
        eprintln!("bench: scale {}: host log: {line}", spec.label);
    }
    Ok(figures)
}

/// The clocks of one run.
struct Times {
    /// Start of the hosts to ready.
    ready: Duration,
    /// First record produced to the last acknowledged.
    produce: Duration,
    /// First record produced to every event seen handled.
    elapsed: Duration,
}

/// The figures of a run; the CPU counters are those of `before` and
/// `after`, read just before the first record and just after the last
/// event was seen handled.
fn figures(
    spec: &FleetSpec,
    events: usize,
    partitions_per_host: Vec<usize>,
    times: Times,
    before: &Reading,
    after: &Reading,
) -> RunFigures {
    let sum = |f: fn(&fleet::HostHealth) -> u64, r: &Reading| r.health.iter().map(f).sum::<u64>();
    let handled = sum(|h| h.handled, after) - sum(|h| h.handled, before);
    let per_event_ms = |cpu_s: f64| cpu_s * 1e3 / handled.max(1) as f64;
    let elapsed = times.elapsed.as_secs_f64();
    let hosts_cpu_s: f64 = after.hosts_cpu_s.iter().zip(&before.hosts_cpu_s).map(|(a, b)| a - b).sum();
    let postgres_cpu_s = after.postgres_cpu_s - before.postgres_cpu_s;
    let broker_cpu_s = after.broker_cpu_s - before.broker_cpu_s;
    let stage = |r: &Reading, name: &str| {
        r.health.iter().filter_map(|h| h.stages.get(name)).fold(StageTotal::default(), |acc, s| StageTotal {
            count: acc.count + s.count,
            total_us: acc.total_us + s.total_us,
        })
    };
    let delta = |name: &str| {
        let (a, b) = (stage(after, name), stage(before, name));
        (a.count.saturating_sub(b.count), a.total_us.saturating_sub(b.total_us))
    };
    let stage_mean_us = crate::stages::STAGES
        .iter()
        .map(|name| (*name, delta(name)))
        .filter(|(_, (count, _))| *count > 0)
        .map(|(name, (count, total))| (name.to_owned(), total as f64 / count as f64))
        .collect();
    let (batches, commit_us) = delta("commit");
    let executor_us: u64 = ["decode", "dedup", "instantiate", "call", "commit"].iter().map(|s| delta(s).1).sum();
    RunFigures {
        label: spec.label.clone(),
        backend: spec.backend,
        hosts: spec.hosts,
        topic_prefix: spec.topic_prefix.clone(),
        schema: (spec.backend == Backend::Postgres).then(|| spec.schema.clone()),
        partitions_per_host,
        ready_s: times.ready.as_secs_f64(),
        events: events as u64,
        handled,
        duplicates_dropped: sum(|h| h.duplicates_dropped, after) - sum(|h| h.duplicates_dropped, before),
        dead_lettered: sum(|h| h.dead_lettered, after) - sum(|h| h.dead_lettered, before),
        handled_per_host: after.health.iter().zip(&before.health).map(|(a, b)| a.handled - b.handled).collect(),
        elapsed_s: elapsed,
        produce_s: times.produce.as_secs_f64(),
        events_per_s: handled as f64 / elapsed.max(1e-9),
        hosts_cpu_s,
        host_cpu_ms_per_event: per_event_ms(hosts_cpu_s),
        postgres_cpu_s,
        postgres_cpu_ms_per_event: per_event_ms(postgres_cpu_s),
        broker_cpu_s,
        broker_cpu_ms_per_event: per_event_ms(broker_cpu_s),
        total_cpu_ms_per_event: per_event_ms(hosts_cpu_s + postgres_cpu_s + broker_cpu_s),
        driver_cpu_s: after.driver_cpu_s - before.driver_cpu_s,
        machine_busy_share: after.machine.busy_share_since(before.machine),
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        stage_mean_us,
        commit_us_per_event: (handled > 0 && batches > 0).then(|| commit_us as f64 / handled as f64),
        events_per_batch: (batches > 0).then(|| handled as f64 / batches as f64),
        executor_us_per_event: (handled > 0).then(|| executor_us as f64 / handled as f64),
        hosts_rss_mib: after.hosts_rss_mib.iter().sum(),
        logs: LogFindings::default(),
    }
}

/// The run's id in schema names: `bench-1A2b.` → `1a2b`.
fn run_id(prefix: &str) -> String {
    let id = prefix.strip_prefix("bench-").unwrap_or(prefix).trim_end_matches('.');
    let id: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(40).collect();
    if id.is_empty() { "run".into() } else { id }
}

/// Drops `schema` (and its tables) if it exists.
async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("failed to connect to PostgreSQL: is it running (`scripts/postgres.sh start`)?")?;
    let connection = tokio::spawn(connection);
    // The name is built from `run_id`: lowercase letters, digits and '_'.
    let result = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
    drop(client);
    let _ = connection.await;
    result.with_context(|| format!("failed to drop schema {schema:?}"))
}

/// Ctrl-C or SIGTERM, by name.
async fn interrupted() -> &'static str {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::MachineSample;
    use fleet::HostHealth;

    fn health(handled: u64, call: (u64, u64), commit: (u64, u64)) -> HostHealth {
        let stages = std::collections::BTreeMap::from([
            ("call".to_owned(), StageTotal { count: call.0, total_us: call.1 }),
            ("commit".to_owned(), StageTotal { count: commit.0, total_us: commit.1 }),
        ]);
        HostHealth { handled, stages, ..HostHealth::default() }
    }

    fn reading(hosts_cpu_s: Vec<f64>, postgres_cpu_s: f64, health: Vec<HostHealth>) -> Reading {
        Reading {
            hosts_rss_mib: vec![10.0; hosts_cpu_s.len()],
            hosts_cpu_s,
            postgres_cpu_s,
            broker_cpu_s: 0.0,
            driver_cpu_s: 0.0,
            machine: MachineSample::default(),
            health,
        }
    }

    #[test]
    fn figures_add_up_over_the_hosts() {
        let spec = FleetSpec {
            hosts: 2,
            backend: Backend::Postgres,
            topic_prefix: "bench-1a2b.scale2.".into(),
            partitions: 6,
            schema: "bench_1a2b_n2".into(),
            work_dir: "/tmp".into(),
            log_dir: "/tmp".into(),
            label: "pg-n2".into(),
        };
        let before = reading(vec![1.0, 2.0], 10.0, vec![health(5, (5, 50), (1, 10)), health(0, (0, 0), (0, 0))]);
        // 1,000 events in 0.5 s: 600 + 400, 100 µs per call, 10 batches of 2 ms.
        let after = reading(
            vec![1.3, 2.2],
            10.4,
            vec![health(605, (605, 60_050), (7, 12_010)), health(400, (400, 40_000), (4, 8_000))],
        );
        let times =
            Times { ready: Duration::from_secs(1), produce: Duration::ZERO, elapsed: Duration::from_millis(500) };
        let f = figures(&spec, 1_000, vec![3, 3], times, &before, &after);
        assert_eq!((f.handled, f.handled_per_host.clone()), (1_000, vec![600, 400]));
        assert!((f.events_per_s - 2_000.0).abs() < 1e-6);
        assert!((f.host_cpu_ms_per_event - 0.5).abs() < 1e-9, "{}", f.host_cpu_ms_per_event);
        assert!((f.postgres_cpu_ms_per_event - 0.4).abs() < 1e-9);
        assert_eq!((f.stage_mean_us["call"], f.stage_mean_us["commit"]), (100.0, 2_000.0));
        assert_eq!((f.events_per_batch, f.commit_us_per_event), (Some(100.0), Some(20.0)));
        assert_eq!(f.executor_us_per_event, Some(120.0));
        assert!(table::render(&[f], 6).contains("2000"));
    }

    #[test]
    fn names_come_from_the_run_prefix() {
        assert_eq!(run_id("bench-1A2b3c4d."), "1a2b3c4d");
        let setup = Setup { backend: Backend::Postgres, hosts: 3 };
        assert_eq!((setup.label(), setup.topic_prefix("bench-1a2b.")), ("pg-n3".into(), "bench-1a2b.scale3.".into()));
        let setup = Setup { backend: Backend::Redb, hosts: 1 };
        assert_eq!(setup.topic_prefix("bench-1a2b."), "bench-1a2b.scale-redb.");
    }
}
