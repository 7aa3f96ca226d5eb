//! The figures of a run: built from the orders' outcomes, printed as a
//! table (one column per scenario) and written as JSON.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::host::Sample;
use crate::load::Load;
use crate::order::Outcome;
use crate::stages::StageReport;
use crate::stats::Percentiles;
use crate::topic::TopicReader;

/// Host CPU and memory over one phase.
#[derive(Debug, Clone, Serialize)]
pub struct HostFigures {
    /// Reading before the phase.
    pub before: Sample,
    /// Reading after the phase, once the host went quiet again.
    pub after: Sample,
    /// CPU seconds the host spent during the phase.
    pub cpu_s: f64,
    /// `cpu_s` per 1,000 orders that became final.
    pub cpu_s_per_1000_orders: Option<f64>,
    /// The host's context switches (thread wake-ups, mostly) per order
    /// that became final.
    pub switches_per_order: Option<f64>,
    /// How long the host took to go quiet after the last order was final.
    pub settle_s: f64,
}

/// What the topic reader saw during one phase.
#[derive(Debug, Clone, Serialize)]
pub struct TopicFigures {
    /// POST (intended send time) to the order's first final event on the topic.
    pub final_event: Option<Percentiles>,
    /// Accepted orders whose final event did not show up within the grace period.
    pub missing: usize,
    /// Final events seen again for an order (since the reader started).
    pub duplicates_so_far: u64,
}

/// Everything measured in one phase; one JSON file per scenario.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// Scenario name, e.g. `closed-c32`.
    pub scenario: String,
    /// `closed` or `open`.
    pub kind: &'static str,
    /// Orders in flight (closed loop).
    pub concurrency: Option<usize>,
    /// Orders per second asked for (open loop).
    pub target_rate_per_s: Option<f64>,
    /// From the first send to the last order's end.
    pub elapsed_s: f64,
    /// Orders sent.
    pub sent: usize,
    /// Orders the gateway accepted (202).
    pub accepted: usize,
    /// Orders seen final by polling.
    pub finished: usize,
    /// `accepted / elapsed_s`.
    pub accepted_per_s: f64,
    /// `finished / elapsed_s`: completed orders per second.
    pub completed_per_s: f64,
    /// POST latency (open loop: from the intended send time).
    pub post: Option<Percentiles>,
    /// POST to final status seen by polling.
    pub final_by_polling: Option<Percentiles>,
    /// Actual minus intended send time (open loop): the driver's own lag.
    pub send_lag: Option<Percentiles>,
    /// The topic reader's view, unless it was off.
    pub topic: Option<TopicFigures>,
    /// Final orders by status.
    pub statuses: BTreeMap<String, usize>,
    /// Failed orders by reason.
    pub errors: BTreeMap<String, usize>,
    /// Polls that failed and were retried.
    pub poll_errors: u64,
    /// The host's CPU and memory, with `--host-pid`.
    pub host: Option<HostFigures>,
    /// CPU seconds the driver itself spent (it shares the machine).
    pub driver_cpu_s: f64,
    /// Each component's stage costs, with `--components`.
    pub stages: Option<StageReport>,
}

impl PhaseReport {
    /// The figures of `outcomes` of `load`, which took `elapsed`.
    pub fn new(load: Load, outcomes: &[Outcome], elapsed: Duration, topic: Option<&TopicReader>) -> Self {
        let mut statuses = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for outcome in outcomes {
            if let Some((_, status)) = &outcome.finished {
                *statuses.entry(status.clone()).or_insert(0) += 1;
            }
            if let Some(error) = &outcome.error {
                *errors.entry(error.clone()).or_insert(0) += 1;
            }
        }
        let accepted = outcomes.iter().filter(|o| o.accepted.is_some()).count();
        let finished = outcomes.iter().filter(|o| o.finished.is_some()).count();
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let (kind, concurrency, target_rate_per_s) = match load {
            Load::Closed { concurrency, .. } => ("closed", Some(concurrency), None),
            Load::Open { rate, .. } => ("open", None, Some(rate)),
        };
        Self {
            scenario: load.name(),
            kind,
            concurrency,
            target_rate_per_s,
            elapsed_s: elapsed.as_secs_f64(),
            sent: outcomes.len(),
            accepted,
            finished,
            accepted_per_s: accepted as f64 / seconds,
            completed_per_s: finished as f64 / seconds,
            post: Percentiles::of(outcomes.iter().filter_map(Outcome::post_latency)),
            final_by_polling: Percentiles::of(outcomes.iter().filter_map(Outcome::final_latency)),
            send_lag: (kind == "open")
                .then(|| Percentiles::of(outcomes.iter().map(|o| o.sent.saturating_duration_since(o.intended))))
                .flatten(),
            topic: topic.map(|reader| topic_figures(reader, outcomes)),
            statuses,
            errors,
            poll_errors: outcomes.iter().map(|o| u64::from(o.poll_errors)).sum(),
            host: None,
            driver_cpu_s: 0.0,
            stages: None,
        }
    }
}

fn topic_figures(reader: &TopicReader, outcomes: &[Outcome]) -> TopicFigures {
    let mut latencies = Vec::new();
    let mut missing = 0;
    for outcome in outcomes {
        let Some(id) = &outcome.order_id else { continue };
        match reader.arrival(id) {
            Some(at) => latencies.push(at.saturating_duration_since(outcome.intended)),
            None => missing += 1,
        }
    }
    TopicFigures { final_event: Percentiles::of(latencies), missing, duplicates_so_far: reader.duplicates() }
}

/// Writes `value` as pretty JSON to `dir/name.json`, creating `dir`.
///
/// # Errors
/// When the directory or the file cannot be written.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {dir:?}"))?;
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).context("failed to serialize the results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("failed to write {path:?}"))
}

/// The phases as a table: one row per figure, one column per scenario.
pub fn table(phases: &[PhaseReport]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, cell: &dyn Fn(&PhaseReport) -> String| {
        rows.push((label.to_owned(), phases.iter().map(cell).collect()));
    };
    row("orders sent", &|p| p.sent.to_string());
    row("accepted (202)", &|p| p.accepted.to_string());
    row("final (by polling)", &|p| p.finished.to_string());
    row("completed orders/s", &|p| format!("{:.1}", p.completed_per_s));
    percentile_rows(&mut row, "POST", &|p| p.post);
    percentile_rows(&mut row, "POST→final, polling", &|p| p.final_by_polling);
    percentile_rows(&mut row, "POST→final, topic", &|p| p.topic.as_ref().and_then(|t| t.final_event));
    row("topic: missing / dup", &|p| {
        p.topic.as_ref().map_or("-".into(), |t| format!("{} / {}", t.missing, t.duplicates_so_far))
    });
    row("send lag p99 ms", &|p| p.send_lag.map_or("-".into(), |s| format!("{:.1}", s.p99_ms)));
    row("statuses", &|p| counts(&p.statuses));
    row("errors", &|p| counts(&p.errors));
    row("poll errors", &|p| p.poll_errors.to_string());
    row("host CPU s", &|p| host_cell(p, |h| Some(format!("{:.2}", h.cpu_s))));
    row("host CPU s / 1k orders", &|p| host_cell(p, |h| h.cpu_s_per_1000_orders.map(|c| format!("{c:.2}"))));
    row("host context switches / order", &|p| host_cell(p, |h| h.switches_per_order.map(|c| format!("{c:.0}"))));
    row("events handled / order", &|p| {
        p.stages
            .as_ref()
            .filter(|_| p.finished > 0)
            .map_or("-".into(), |s| format!("{:.2}", s.events_handled as f64 / p.finished as f64))
    });
    row("host CPU µs / event", &|p| {
        p.stages.as_ref().and_then(|s| s.host_cpu_us_per_event).map_or("-".into(), |us| format!("{us:.0}"))
    });
    row("guest share of host CPU", &|p| {
        p.stages.as_ref().and_then(|s| s.guest_share_of_host_cpu).map_or("-".into(), |s| format!("{:.1} %", s * 100.0))
    });
    row("host RSS before MiB", &|p| host_cell(p, |h| Some(format!("{:.0}", h.before.rss_mib))));
    row("host RSS after MiB", &|p| host_cell(p, |h| Some(format!("{:.0}", h.after.rss_mib))));
    row("host RSS peak MiB", &|p| host_cell(p, |h| Some(format!("{:.0}", h.after.peak_rss_mib))));
    row("driver CPU s", &|p| format!("{:.1}", p.driver_cpu_s));
    let header: Vec<String> = phases.iter().map(|p| p.scenario.clone()).collect();
    render(&header, &rows)
}

type Row<'a> = dyn FnMut(&str, &dyn Fn(&PhaseReport) -> String) + 'a;

fn percentile_rows(row: &mut Row<'_>, what: &str, pick: &dyn Fn(&PhaseReport) -> Option<Percentiles>) {
    let cell = |p: &PhaseReport, f: fn(&Percentiles) -> f64| pick(p).map_or("-".into(), |s| format!("{:.1}", f(&s)));
    row(&format!("{what} p50 ms"), &|p| cell(p, |s| s.p50_ms));
    row(&format!("{what} p95 ms"), &|p| cell(p, |s| s.p95_ms));
    row(&format!("{what} p99 ms"), &|p| cell(p, |s| s.p99_ms));
    row(&format!("{what} max ms"), &|p| cell(p, |s| s.max_ms));
}

fn host_cell(phase: &PhaseReport, f: impl Fn(&HostFigures) -> Option<String>) -> String {
    phase.host.as_ref().and_then(f).unwrap_or_else(|| "-".into())
}

fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "0".into();
    }
    map.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// Renders `rows` under `header`, labels left, cells right-aligned.
pub fn render(header: &[String], rows: &[(String, Vec<String>)]) -> String {
    let label_width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter().map(|(_, cells)| cells[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0)
        })
        .collect();
    let line = |label: &str, cells: &[String]| {
        let mut out = format!("{label:<label_width$}");
        for (cell, width) in cells.iter().zip(&widths) {
            out.push_str(&format!("  {cell:>width$}"));
        }
        out.push('\n');
        out
    };
    let mut out = line("", header);
    out.push_str(&format!("{}\n", "-".repeat(label_width + widths.iter().map(|w| w + 2).sum::<usize>())));
    for (label, cells) in rows {
        out.push_str(&line(label, cells));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_column_per_scenario_and_aligned_rows() {
        let load = Load::Closed { concurrency: 4, orders: 1, duration: Duration::from_secs(1) };
        let phase = PhaseReport::new(load, &[], Duration::from_secs(1), None);
        let text = table(&[phase.clone(), phase]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].matches("closed-c4").count(), 2);
        assert!(lines.iter().any(|l| l.starts_with("completed orders/s") && l.ends_with("0.0")));
        let width = lines[0].chars().count();
        assert!(lines.iter().skip(2).all(|l| l.chars().count() == width), "{text}");
    }
}
