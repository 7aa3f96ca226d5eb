//! `bench isolation`: one component's throughput while another misbehaves
//! in the same process. The victim (payment by default) handles its saga
//! events through the host library's pipeline on an in-memory store, as
//! fast as it can (64 in flight), first alone, then beside `misbehave`
//! handling a stream of sleeping, spinning, write-bombing or deeply
//! recursing events (each retried and dead-lettered as the default policy
//! says), or answering spinning queries as fast as its query cap and its
//! throttle allow (a refused query comes back after the time it was told).
//! No broker, no fsync: the victim is CPU-bound, the harshest case.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use serde::Serialize;
use shop_host::bus::Inbound;
use shop_host::clock::{Clock, ManualClock};
use shop_host::envelope::Envelope;
use shop_host::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};
use shop_host::runtime::{CanaryPolicy, Engine, Limits, LoadedComponent, Request, ServiceRuntime, ServiceSpec};
use shop_host::state::{MemoryStore, StateStore};
use tokio_util::sync::CancellationToken;

use crate::manifest::Manifest;
use crate::report;
use crate::wasm::saga::{self, Delivered};

#[derive(Debug, Args)]
pub struct IsolationArgs {
    /// The manifest: the victim's .wasm, config and compile cache.
    #[arg(long, default_value = "app.toml")]
    manifest: PathBuf,
    /// The misbehaving component (`just build-test-components`).
    #[arg(long, default_value = "target/wasm32-wasip2/release/misbehave.wasm")]
    misbehave: PathBuf,
    /// The component whose throughput is measured.
    #[arg(long, default_value = "payment")]
    victim: String,
    /// Orders whose events the victim handles in each run.
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Runs of each scenario (taking turns); the median is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// Fixed time of every clock: deadlines never pass during a measurement.
const NOW_MS: u64 = 1_764_000_000_000;

/// Victim events in flight.
const IN_FLIGHT: usize = 64;

/// What misbehaves meanwhile.
#[derive(Debug, Clone, Copy)]
enum Trouble {
    Nothing,
    /// Events of this type, four in flight.
    Events(&'static str, &'static str),
    /// Queries to `/spin` at the component's cap.
    SpinningQueries,
}

const SCENARIOS: &[(&str, Trouble)] = &[
    ("alone", Trouble::Nothing),
    ("beside a sleeping guest", Trouble::Events("Sleep", "\"x\"")),
    ("beside a spinning guest", Trouble::Events("Spin", "\"x\"")),
    ("beside a write bomb", Trouble::Events("WriteBomb", "\"x\"")),
    ("beside deep recursion", Trouble::Events("Recurse", "50000")),
    ("beside spinning queries", Trouble::SpinningQueries),
];

#[derive(Debug, Serialize)]
struct Row {
    scenario: &'static str,
    events_per_s: f64,
    /// Median over rounds of the change from the run alone just before.
    change_percent: f64,
    /// CPU of misbehave's threads (executor and query threads) during the
    /// victim's run, in percent of one core (median).
    misbehave_cpu_percent: f64,
    /// Misbehaving events dead-lettered, or queries ended at their
    /// deadline, in all runs (a sleeping or spinning event takes five
    /// attempts of 1 s: few or none end within a run).
    misbehaved: u64,
}

/// Runs every scenario and prints the table.
///
/// # Errors
/// When a component cannot be loaded, the victim fails, or the results
/// cannot be written.
pub async fn run(args: IsolationArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1 && args.orders >= 10, "--runs must be at least 1, --orders at least 10");
    let manifest = Manifest::load(&args.manifest)?;
    let mut sequences = saga::sequences(&manifest, args.orders, NOW_MS)?;
    let events = sequences.remove(&args.victim).with_context(|| format!("no component {:?}", args.victim))?;
    let engine = Engine::with_cache(manifest.runtime.cache_dir.clone())?;
    LoadedComponent::from_file(&engine, &args.misbehave)
        .with_context(|| format!("{:?} (run `just build-test-components`)", args.misbehave))?;
    eprintln!("bench: isolation: {} events of {} beside misbehave ...", events.len(), args.victim);
    // A first run warms the engine, the allocator and the cache. Then, in
    // each round, every scenario runs right after a run alone: the change
    // is the median over rounds of each pair's ratio, so that load from
    // outside (a shared VM) drifting between rounds cancels out.
    victim(&engine, &manifest, &args.victim, &events).await?;
    let mut rates = vec![Vec::new(); SCENARIOS.len()];
    let mut ratios = vec![Vec::new(); SCENARIOS.len()];
    let mut shares = vec![Vec::new(); SCENARIOS.len()];
    let mut misbehaved = vec![0; SCENARIOS.len()];
    for _ in 0..args.runs {
        for (i, &(_, trouble)) in SCENARIOS.iter().enumerate().skip(1) {
            let alone = victim(&engine, &manifest, &args.victim, &events).await?;
            rates[0].push(alone);
            let stop = CancellationToken::new();
            let troublemaker = start(&engine, &args.misbehave, trouble, &stop)?;
            // Let it get going (a spinning guest spins from its first event).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (cpu_before, started) = (misbehave_cpu(), Instant::now());
            let rate = victim(&engine, &manifest, &args.victim, &events).await?;
            shares[i].push(misbehave_cpu().saturating_sub(cpu_before).as_secs_f64() / started.elapsed().as_secs_f64());
            stop.cancel();
            misbehaved[i] += troublemaker.await.unwrap_or(0);
            rates[i].push(rate);
            ratios[i].push(rate / alone);
        }
    }
    let rows: Vec<Row> = SCENARIOS
        .iter()
        .enumerate()
        .map(|(i, &(scenario, _))| Row {
            scenario,
            events_per_s: median(&mut rates[i]),
            change_percent: if i == 0 { 0.0 } else { (median(&mut ratios[i]) - 1.0) * 100.0 },
            misbehave_cpu_percent: if i == 0 { 0.0 } else { median(&mut shares[i]) * 100.0 },
            misbehaved: misbehaved[i],
        })
        .collect();
    report::write_json(&args.out_dir, "isolation", &rows)?;
    println!("{}", table(&args.victim, &rows));
    Ok(())
}

fn table(victim: &str, rows: &[Row]) -> String {
    let mut out = format!(
        "Isolation: {victim}'s throughput (pipeline, in-memory store) while misbehave runs in the same host\n\
         {:<26} {:>10} {:>8} {:>15} {:>12}\n",
        "scenario", "events/s", "change", "misbehave CPU", "dead/ended"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<26} {:>10.0} {:>7.1}% {:>14.1}% {:>12}\n",
            r.scenario, r.events_per_s, r.change_percent, r.misbehave_cpu_percent, r.misbehaved
        ));
    }
    out
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time of this process's threads that run misbehave's guest code
/// (`exec-misbehave`, `guest-misbehave-N`, names cut to 15 bytes), from
/// the scheduler's statistics (Linux; zero elsewhere).
fn misbehave_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !(name.starts_with("exec-misbehave") || name.starts_with("guest-misbehave")) {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .unwrap_or(0);
        total += Duration::from_nanos(ns);
    }
    total
}

/// The victim's events per second through its pipeline, on a fresh store.
async fn victim(engine: &Engine, manifest: &Manifest, name: &str, events: &[Delivered]) -> anyhow::Result<f64> {
    let settings = manifest.components.get(name).with_context(|| format!("no component {name:?}"))?;
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let rt = crate::wasm::measure::service(engine, name, settings, store, NOW_MS, settings.instance_reuse)?;
    let pipeline = Pipeline::new(rt.clone(), topics(), RetryPolicy::default(), clock());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut done = futures::stream::iter(events.iter().enumerate().map(|(offset, d)| {
        let record = Inbound {
            topic: d.event.topic.clone(),
            partition: 0,
            offset: offset as i64,
            key: d.event.key.clone().map(String::into_bytes),
            value: Some(d.envelope().value()),
            headers: d.envelope().header_bytes(None),
        };
        pipeline.submit(record, &shutdown)
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some(disposition) = done.next().await {
        match disposition {
            Some(Disposition::Publish { source, .. }) => {
                if let Some(source) = source {
                    rt.state_store().clear_outbox(&source)?;
                }
            }
            Some(Disposition::DeadLetter { reason, .. }) => anyhow::bail!("{name} dead-lettered an event: {reason}"),
            None => anyhow::bail!("{name}'s pipeline stopped"),
        }
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64())
}

/// Starts `trouble` on a fresh `misbehave` service; the task ends at `stop`
/// with how many dead letters or timed-out queries it saw.
///
/// # Errors
/// When `misbehave` cannot be loaded (from the compile cache).
fn start(
    engine: &Engine,
    misbehave: &std::path::Path,
    trouble: Trouble,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<u64>> {
    let component = LoadedComponent::from_file(engine, misbehave)?;
    let (stop, engine) = (stop.clone(), engine.clone());
    Ok(tokio::spawn(async move {
        let rt = Arc::new(ServiceRuntime::new(
            engine,
            ServiceSpec {
                name: "misbehave".into(),
                component,
                store: Arc::new(MemoryStore::default()),
                config: Default::default(),
                clock: clock(),
                limits: Limits::default(),
                canary: CanaryPolicy::default(),
                grants: Default::default(),
            },
        ));
        match trouble {
            Trouble::Nothing => 0,
            Trouble::Events(event_type, payload) => events(rt, event_type, payload, &stop).await,
            Trouble::SpinningQueries => queries(rt, &stop).await,
        }
    }))
}

/// Feeds `misbehave` events of `event_type`, four in flight, until `stop`.
async fn events(rt: Arc<ServiceRuntime>, event_type: &str, payload: &str, stop: &CancellationToken) -> u64 {
    let pipeline = Pipeline::new(rt, topics(), RetryPolicy::default(), clock());
    let payload: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    let mut next = 0i64;
    let mut record = || {
        next += 1;
        let envelope = Envelope::originate(event_type, &format!("k{next}"), "bench", NOW_MS, payload.clone());
        let key = Some(format!("k{next}").into_bytes());
        Inbound {
            topic: "misbehave".into(),
            partition: 0,
            offset: next,
            key,
            value: Some(envelope.value()),
            headers: envelope.header_bytes(None),
        }
    };
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut dead = 0;
    for _ in 0..4 {
        in_flight.push(pipeline.submit(record(), stop));
    }
    while let Some(disposition) = in_flight.next().await {
        dead += u64::from(matches!(disposition, Some(Disposition::DeadLetter { .. })));
        if !stop.is_cancelled() {
            in_flight.push(pipeline.submit(record(), stop));
        }
    }
    dead
}

/// Asks `misbehave` for `/spin` at its query cap until `stop`.
async fn queries(rt: Arc<ServiceRuntime>, stop: &CancellationToken) -> u64 {
    let request = Request { method: "GET".into(), path: "/spin".into(), query: String::new(), body: Vec::new() };
    let askers = (0..shop_host::runtime::DEFAULT_MAX_QUERIES).map(|_| {
        let (rt, request, stop) = (rt.clone(), request.clone(), stop.clone());
        tokio::spawn(async move {
            let mut timed_out = 0;
            while !stop.is_cancelled() {
                match rt.query(&request).await {
                    // Refused at once while it pays for its last faults: a
                    // client honouring Retry-After comes back then.
                    Err(shop_host::runtime::CallError::Throttled(left)) => {
                        tokio::select! {
                            () = tokio::time::sleep(left) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                    answer => timed_out += u64::from(answer.is_err()),
                }
            }
            timed_out
        })
    });
    futures::future::join_all(askers).await.into_iter().map(|r| r.unwrap_or(0)).sum()
}

fn topics() -> Topics {
    Topics { prefix: String::new(), dead_letter: "dead-letters".into() }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::at(NOW_MS))
}
