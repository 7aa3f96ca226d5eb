//! `bench wasm`: what running a component as Wasm costs per event. Each
//! component's logic handles the same realistic event sequence natively
//! (its `Service` impl on the SDK's `MemoryHost`) and through the host
//! library: `ServiceRuntime::call` with a reused or a fresh instance on an
//! in-memory store, and `Pipeline::process` on a durable store. No broker.

pub(crate) mod measure;
pub(crate) mod saga;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use shop_host::runtime::{CALL_THREAD_STACK, Engine};

use crate::manifest::Manifest;
use crate::report;
use measure::Measured;

#[derive(Debug, Args)]
pub struct WasmArgs {
    /// The manifest: components, their .wasm files, config and compile cache.
    #[arg(long, default_value = "app.toml")]
    manifest: PathBuf,
    /// Orders whose events make the sequences.
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
    /// Longest timing of one component in one mode, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    budget_ms: u64,
    /// Instance reuse of the "reused instance" mode.
    #[arg(long, default_value_t = 1_000)]
    reuse: u32,
    /// Skip the durable pipeline mode (one fsync per event).
    #[arg(long)]
    no_pipeline: bool,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// Fixed time of every clock: deadlines never pass during a measurement.
const NOW_MS: u64 = 1_764_000_000_000;

/// One component's figures.
#[derive(Debug, Serialize)]
struct Row {
    component: String,
    events_per_order: f64,
    native: Measured,
    reused: Measured,
    fresh: Measured,
    pipeline: Option<Measured>,
}

impl Row {
    fn ratio(&self, of: &Measured) -> f64 {
        of.us_per_event / self.native.us_per_event.max(1e-3)
    }
}

#[derive(Serialize)]
struct WasmReport<'a> {
    orders: usize,
    reuse: u32,
    components: &'a [Row],
}

/// Measures every component and prints the table.
///
/// # Errors
/// When a component cannot be loaded or fails, or the results cannot be written.
pub async fn run(args: WasmArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.orders >= 10 && args.budget_ms > 0, "--orders must be at least 10, --budget-ms positive");
    let manifest = Manifest::load(&args.manifest)?;
    let sequences = saga::sequences(&manifest, args.orders, NOW_MS)?;
    let engine = Engine::with_cache(manifest.runtime.cache_dir.clone())?;
    let budget = Duration::from_millis(args.budget_ms);
    eprintln!("bench: wasm vs native: {} orders' events per component ...", args.orders);
    // Guests run on the calling thread, which needs the host's call stack.
    let synchronous = {
        let (engine, manifest, sequences, reuse) = (engine.clone(), manifest.clone(), sequences.clone(), args.reuse);
        let thread = std::thread::Builder::new()
            .name("bench-wasm".into())
            .stack_size(CALL_THREAD_STACK)
            .spawn(move || -> anyhow::Result<Vec<(String, Measured, Measured, Measured)>> {
                let mut rows = Vec::new();
                for (name, events) in &sequences {
                    let native = measure::native(&manifest, name, events, NOW_MS, budget)?;
                    let reused = measure::runtime(&engine, &manifest, name, events, NOW_MS, reuse, budget)?;
                    let fresh = measure::runtime(&engine, &manifest, name, events, NOW_MS, 1, budget)?;
                    rows.push((name.clone(), native, reused, fresh));
                }
                Ok(rows)
            })
            .context("failed to start the measuring thread")?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("the measuring thread failed")?
            .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??
    };
    let dir = std::env::temp_dir().join(format!("shop-bench-wasm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {dir:?}"))?;
    let mut rows = Vec::new();
    for (name, native, reused, fresh) in synchronous {
        let events = &sequences[&name];
        let pipeline = if args.no_pipeline {
            None
        } else {
            Some(measure::pipeline(&engine, &manifest, &name, events, NOW_MS, &dir, budget).await?)
        };
        let events_per_order = events.len() as f64 / args.orders as f64;
        rows.push(Row { component: name, events_per_order, native, reused, fresh, pipeline });
    }
    let _ = std::fs::remove_dir_all(&dir);
    report::write_json(
        &args.out_dir,
        "wasm",
        &WasmReport { orders: args.orders, reuse: args.reuse, components: &rows },
    )?;
    print!("{}", table(&rows, args.reuse));
    let (checked, us) = schema_cost(&sequences, budget);
    println!(
        "schema check per output (parse the data, validate against its type's JSON Schema): {us:.2} µs, mean of {checked}"
    );
    let wire = wire_cost(&sequences, budget);
    println!(
        "wire format per event, mean of {}: write a CloudEvent's headers {:.2} µs; read it (binary mode) {:.2} µs; \
         read the version-1 JSON envelope (the format before) {:.2} µs",
        wire.events, wire.write_us, wire.read_us, wire.read_v1_us
    );
    Ok(())
}

/// What the wire format costs per event, over the saga's events.
struct WireCost {
    events: usize,
    write_us: f64,
    read_us: f64,
    read_v1_us: f64,
}

/// Runs `each` over `0..n` until `budget` has passed (at least once):
/// calls made and mean µs per call.
fn timed(n: usize, budget: Duration, each: impl Fn(usize)) -> (usize, f64) {
    let started = std::time::Instant::now();
    let mut done = 0;
    while n > 0 && (done == 0 || started.elapsed() < budget) {
        (0..n).for_each(&each);
        done += n;
    }
    (done, started.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64)
}

/// The host's writing and reading of each of the saga's events as a
/// CloudEvent in binary mode, and its reading of the same event as the
/// version-1 envelope, each repeated until `budget`.
fn wire_cost(sequences: &BTreeMap<String, Vec<saga::Delivered>>, budget: Duration) -> WireCost {
    use shop_host::envelope::Envelope;
    let trace = shop_host::traces::TraceParent::random();
    let events: Vec<Envelope> = sequences.values().flatten().map(saga::Delivered::envelope).collect();
    // Each event's record: its headers and its value.
    type Record = (Vec<(String, Vec<u8>)>, Vec<u8>);
    let records: Vec<Record> = events.iter().map(|e| (e.header_bytes(Some(&trace)), e.value())).collect();
    let legacy: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(e.data.get()).unwrap_or_default();
            let envelope = serde_json::json!({
                "id": e.id, "type": e.event_type, "order_id": e.order_id, "correlation_id": e.correlation_id,
                "causation_id": e.causation_id, "timestamp_ms": e.timestamp_ms, "schema_version": 1,
                "producer": e.producer(), "data": data,
            });
            serde_json::to_vec(&envelope).unwrap_or_default()
        })
        .collect();
    let (done, write_us) = timed(events.len(), budget, |i| {
        std::hint::black_box((events[i].headers(Some(&trace)), events[i].value()));
    });
    let (_, read_us) = timed(events.len(), budget, |i| {
        std::hint::black_box(Envelope::decode(&records[i].0, None, Some(&records[i].1)).is_ok());
    });
    let (_, read_v1_us) = timed(events.len(), budget, |i| {
        std::hint::black_box(Envelope::decode(&[], None, Some(&legacy[i])).is_ok());
    });
    WireCost { events: done, write_us, read_us, read_v1_us }
}

/// The host's check of an output's data against its event type's schema
/// (`shop_host::schemas`), over every event of the saga (each is some
/// component's output), repeated until `budget`: outputs checked and mean µs.
fn schema_cost(sequences: &BTreeMap<String, Vec<saga::Delivered>>, budget: Duration) -> (usize, f64) {
    let schemas = shop_host::schemas::Schemas::generated();
    let outputs: Vec<(&str, &[u8])> = sequences
        .values()
        .flatten()
        .map(|d| (d.event.event_type.as_str(), d.event.payload.as_slice()))
        .filter(|(event_type, _)| schemas.schema(event_type).is_some())
        .collect();
    let started = std::time::Instant::now();
    let mut checked = 0;
    while checked == 0 || started.elapsed() < budget {
        for (event_type, payload) in &outputs {
            let data: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
            let ok = schemas.check(event_type, &data).is_ok();
            std::hint::black_box(ok);
        }
        checked += outputs.len();
        if outputs.is_empty() {
            break;
        }
    }
    (checked, started.elapsed().as_secs_f64() * 1e6 / checked.max(1) as f64)
}

fn table(rows: &[Row], reuse: u32) -> String {
    let header: Vec<String> = [
        "ev/order",
        "native",
        &format!("reuse {reuse}"),
        "(call)",
        "fresh",
        "(inst)",
        "(call)",
        "pipeline+redb",
        "reuse/nat",
        "fresh/nat",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let us = |v: f64| format!("{v:.1}");
    let opt = |v: Option<f64>| v.map_or("-".into(), us);
    let mut lines: Vec<(String, Vec<String>)> = rows
        .iter()
        .map(|r| {
            let cells = vec![
                format!("{:.2}", r.events_per_order),
                us(r.native.us_per_event),
                us(r.reused.us_per_event),
                opt(r.reused.call_us),
                us(r.fresh.us_per_event),
                opt(r.fresh.instantiate_us),
                opt(r.fresh.call_us),
                opt(r.pipeline.map(|p| p.us_per_event)),
                format!("{:.1}×", r.ratio(&r.reused)),
                format!("{:.1}×", r.ratio(&r.fresh)),
            ];
            (r.component.clone(), cells)
        })
        .collect();
    // One order: every component's events at its cost.
    let per_order = |f: &dyn Fn(&Row) -> Option<f64>| -> Option<f64> {
        rows.iter().map(|r| f(r).map(|us| us * r.events_per_order)).sum()
    };
    let native = per_order(&|r| Some(r.native.us_per_event)).unwrap_or(0.0);
    let reused = per_order(&|r| Some(r.reused.us_per_event)).unwrap_or(0.0);
    let fresh = per_order(&|r| Some(r.fresh.us_per_event)).unwrap_or(0.0);
    lines.push((
        "per order".into(),
        vec![
            format!("{:.2}", rows.iter().map(|r| r.events_per_order).sum::<f64>()),
            us(native),
            us(reused),
            opt(per_order(&|r| r.reused.call_us)),
            us(fresh),
            opt(per_order(&|r| r.fresh.instantiate_us)),
            opt(per_order(&|r| r.fresh.call_us)),
            opt(per_order(&|r| r.pipeline.map(|p| p.us_per_event))),
            format!("{:.1}×", reused / native.max(1e-3)),
            format!("{:.1}×", fresh / native.max(1e-3)),
        ],
    ));
    let mut out = String::from(
        "\nWasm vs native, µs per event of the median order (the same event sequences each way)\n  \
         native: the Service impls on MemoryHost, built at the .wasm's opt-level; reuse/fresh: ServiceRuntime::call \
         + in-memory store commit, one instance for many events / one per event; (call), (inst): the host's mean \
         guest handle and instantiation time per event; pipeline+redb: Pipeline::process on a DurableStore, one \
         event per batch, each waiting for its fsync\n",
    );
    out.push_str(&report::render(&header, &lines));
    out
}
