//! `bench physical`: the physical limit of the shop's data path on this
//! broker. The saga's record flow is learned from the run's own topics,
//! then plain Kafka relays (no Wasm, no state) move the same records per
//! order through topics of the same shape; the suite's closed loops are
//! compared with what they achieve.

mod relay;
mod topology;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::report;
use topology::{PerOrder, Topology};

#[derive(Debug, Args)]
pub struct PhysicalArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The manifest the host ran (topics and groups of each component).
    #[arg(long, default_value = "app.toml")]
    manifest: PathBuf,
    /// The run's topic prefix, e.g. `bench-1a2b3c4d.`: the flow is learned
    /// from its topics, and the relays' topics and groups go under
    /// `PREFIX` + `raw.`.
    #[arg(long)]
    prefix: String,
    /// Records read from each of the run's topics to learn the flow.
    #[arg(long, default_value_t = 5_000)]
    sample: usize,
    /// Orders in flight, one run each: the suite's closed-loop concurrency
    /// for a like-for-like latency, and a large window for the limit.
    #[arg(long, value_delimiter = ',', default_value = "32,1024")]
    windows: Vec<usize>,
    /// Seconds of sending of each run.
    #[arg(long, default_value_t = 5)]
    duration_s: u64,
    /// Longest wait for the last orders after sending stopped, in seconds.
    #[arg(long, default_value_t = 10)]
    drain_s: u64,
    /// Directory of the JSON results; its `suite.json`, if any, is compared.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// What the suite measured, as read back from `suite.json`.
#[derive(Deserialize)]
struct Suite {
    phases: Vec<SuitePhase>,
}

#[derive(Deserialize)]
struct SuitePhase {
    scenario: String,
    kind: String,
    finished: u64,
    completed_per_s: f64,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    stages: Option<SuiteStages>,
}

#[derive(Deserialize)]
struct SuiteStages {
    events_handled: u64,
}

/// A closed loop of the suite next to the raw limit.
#[derive(Debug, Serialize)]
struct Comparison {
    scenario: String,
    completed_per_s: f64,
    /// `completed_per_s` as a share of the relays' orders/s.
    share_of_limit: f64,
    /// Orders in flight in that phase, and the relays' orders/s with as
    /// many in flight in this run (the figure that compares across days).
    concurrency: Option<usize>,
    relays_same_window: Option<f64>,
    /// Events the host's components handled per order in that phase.
    handled_per_order: Option<f64>,
}

#[derive(Serialize)]
struct PhysicalReport<'a> {
    topology: &'a Topology,
    per_order: PerOrder,
    runs: &'a [relay::Figures],
    /// The best run's orders/s.
    limit_orders_per_s: f64,
    compared: &'a [Comparison],
}

/// Runs the relays and prints the comparison.
///
/// # Errors
/// When the flow cannot be learned, the relays cannot run, or the results
/// cannot be written.
pub async fn run(args: PhysicalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.windows.is_empty() && args.windows.iter().all(|w| *w > 0) && args.duration_s > 0,
        "--windows and --duration-s must be positive"
    );
    let manifest = Manifest::load(&args.manifest)?;
    let (brokers, prefix, sample, learn_from) =
        (args.brokers.clone(), args.prefix.clone(), args.sample, manifest.clone());
    let topology = tokio::task::spawn_blocking(move || Topology::learn(&brokers, &prefix, &learn_from, sample))
        .await
        .context("the topic reader failed")??;
    let per_order = topology.per_order(&manifest)?;
    eprintln!(
        "bench: physical limit: {} records consumed and {} produced per order; relays with {:?} orders in flight, \
         {} s each ...",
        per_order.consumed, per_order.produced, args.windows, args.duration_s
    );
    let duration = Duration::from_secs(args.duration_s);
    let settings = relay::Settings {
        brokers: args.brokers.clone(),
        prefix: format!("{}raw.", args.prefix),
        runs: args.windows.iter().map(|w| (*w, duration)).collect(),
        drain: Duration::from_secs(args.drain_s),
        consumed_per_order: per_order.consumed,
    };
    let topology = Arc::new(topology);
    let runs = relay::run(&settings, &manifest, topology.clone()).await?;
    let limit = runs.iter().map(|r| r.orders_per_s).fold(0.0, f64::max);
    let compared = compare(&args.out_dir, limit, &runs);
    let report =
        PhysicalReport { topology: &topology, per_order, runs: &runs, limit_orders_per_s: limit, compared: &compared };
    report::write_json(&args.out_dir, "physical", &report)?;
    print!("{}", summary(&topology, per_order, &runs, limit, &compared));
    Ok(())
}

fn compare(out_dir: &std::path::Path, limit_per_s: f64, runs: &[relay::Figures]) -> Vec<Comparison> {
    let path = out_dir.join("suite.json");
    let Some(suite) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Suite>(&b).ok()) else {
        eprintln!("bench: no suite results in {path:?} to compare with");
        return Vec::new();
    };
    suite
        .phases
        .into_iter()
        .filter(|p| p.kind == "closed")
        .map(|p| Comparison {
            relays_same_window: p.concurrency.and_then(|c| runs.iter().find(|r| r.window == c)).map(|r| r.orders_per_s),
            concurrency: p.concurrency,
            share_of_limit: if limit_per_s > 0.0 { p.completed_per_s / limit_per_s } else { 0.0 },
            handled_per_order: p
                .stages
                .as_ref()
                .filter(|_| p.finished > 0)
                .map(|s| s.events_handled as f64 / p.finished as f64),
            completed_per_s: p.completed_per_s,
            scenario: p.scenario,
        })
        .collect()
}

fn summary(
    topology: &Topology,
    per_order: PerOrder,
    runs: &[relay::Figures],
    limit: f64,
    compared: &[Comparison],
) -> String {
    let mut out =
        String::from("\nphysical limit: plain Kafka relays (no Wasm, no state) moving the run's record flow\n");
    out.push_str(&format!(
        "  per order: {} on {} ({} B);",
        topology.origin.event_type, topology.origin.topic, topology.origin.bytes
    ));
    for (component, routes) in &topology.routes {
        for (consumed, outputs) in routes {
            let outputs: Vec<String> = outputs.iter().map(|o| format!("{} ({} B)", o.event_type, o.bytes)).collect();
            out.push_str(&format!(" {component}: {consumed} → {};", outputs.join(" + ")));
        }
    }
    out.push_str(&format!(
        "\n  {} records consumed (over all groups) and {} produced per order\n",
        per_order.consumed, per_order.produced
    ));
    let header: Vec<String> = ["orders", "s", "orders/s", "consumed/s", "produced/s", "p50 ms", "p99 ms"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let rows: Vec<(String, Vec<String>)> = runs
        .iter()
        .map(|r| {
            let latency = |f: fn(&crate::stats::Percentiles) -> f64| {
                r.order_latency.as_ref().map_or("-".into(), |p| format!("{:.1}", f(p)))
            };
            let cells = vec![
                format!("{}/{}", r.orders_completed, r.orders_sent),
                format!("{:.1}", r.elapsed_s),
                format!("{:.0}", r.orders_per_s),
                format!("{:.0}", r.records_consumed_per_s),
                format!("{:.0}", r.records_produced_per_s),
                latency(|p| p.p50_ms),
                latency(|p| p.p99_ms),
            ];
            (format!("{} in flight", r.window), cells)
        })
        .collect();
    out.push_str(&report::render(&header, &rows));
    for c in compared {
        out.push_str(&compared_line(c, limit, per_order.consumed));
    }
    out
}

/// A closed loop of the suite beside the relays with as many orders in
/// flight (the ratio that compares across days) and beside the limit.
fn compared_line(c: &Comparison, limit: f64, relays_consumed: u32) -> String {
    let handled = c.handled_per_order.map_or("-".into(), |h| format!("{h:.2}"));
    let same = match (c.concurrency, c.relays_same_window) {
        (Some(window), Some(relays)) if relays > 0.0 => format!(
            "{:.1} % of the relays with {window} in flight ({relays:.0} orders/s), ",
            100.0 * c.completed_per_s / relays
        ),
        _ => String::new(),
    };
    format!(
        "  {}: {:.1} orders/s = {same}{:.1} % of the limit ({limit:.0} orders/s); host handled {handled} events per \
         order, relays {relays_consumed}\n",
        c.scenario,
        c.completed_per_s,
        c.share_of_limit * 100.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(window: usize, orders_per_s: f64) -> relay::Figures {
        relay::Figures {
            window,
            orders_sent: 0,
            orders_completed: 0,
            elapsed_s: 0.0,
            records_consumed: 0,
            records_produced: 0,
            orders_per_s,
            records_consumed_per_s: 0.0,
            records_produced_per_s: 0.0,
            order_latency: None,
        }
    }

    #[test]
    fn a_closed_loop_is_compared_with_the_relays_of_its_own_window() {
        let dir = std::env::temp_dir().join(format!("physical-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let phase = |name: &str, window: usize, per_s: f64| {
            serde_json::json!({ "scenario": name, "kind": "closed", "finished": 100, "completed_per_s": per_s,
                "concurrency": window, "stages": { "events_handled": 1300 } })
        };
        let suite = serde_json::json!({ "phases": [phase("closed-c32", 32, 200.0), phase("closed-c128", 128, 300.0),
            { "scenario": "open-r100", "kind": "open", "finished": 100, "completed_per_s": 99.0 }] });
        std::fs::write(dir.join("suite.json"), suite.to_string()).unwrap();
        let compared = compare(&dir, 10_000.0, &[relays(32, 800.0), relays(1024, 10_000.0)]);
        assert_eq!(compared.len(), 2, "closed loops only");
        let line = compared_line(&compared[0], 10_000.0, 13);
        assert!(
            line.contains("200.0 orders/s = 25.0 % of the relays with 32 in flight (800 orders/s), 2.0 % of the limit"),
            "{line}"
        );
        assert!(line.contains("host handled 13.00 events per order"), "{line}");
        // No relays ran with 128 in flight: the limit alone.
        let line = compared_line(&compared[1], 10_000.0, 13);
        assert!(line.contains("300.0 orders/s = 3.0 % of the limit"), "{line}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
