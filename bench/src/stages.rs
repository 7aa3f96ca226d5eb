//! Where the host's time goes, per component and phase: the cumulative
//! stage counters of each component's `/health` (decode, dedup,
//! instantiate, call, validate, commit, durable wait, publish), read before and after
//! a phase and turned into mean microseconds per run of each stage, per
//! handled event, and a share of the host's CPU.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The stages `/health` reports, in data-path order.
pub const STAGES: [&str; 8] =
    ["decode", "dedup", "instantiate", "call", "validate", "commit", "durable_wait", "publish"];

/// One stage's cumulative totals.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct StageTotal {
    /// Times it ran (`commit`: batches; the others: events).
    pub count: u64,
    /// Time spent in it, in microseconds.
    pub total_us: u64,
}

/// What the benchmark reads of one component's `/health`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Health {
    #[serde(default)]
    handled: u64,
    #[serde(default)]
    duplicates_dropped: u64,
    #[serde(default)]
    stages: BTreeMap<String, StageTotal>,
}

/// Reads the components' `/health`.
#[derive(Debug, Clone)]
pub struct Probe {
    client: reqwest::Client,
    /// `(component, health URL)`, in the order they are reported.
    components: Vec<(String, String)>,
}

/// Every component's counters at one moment.
pub type Snapshot = Vec<(String, Health)>;

impl Probe {
    /// A probe of `components`: `(name, URL of its /health)`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(components: Vec<(String, String)>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self { client, components })
    }

    /// Reads every component's counters now.
    ///
    /// # Errors
    /// When a component does not answer with its health JSON (a degraded
    /// component answers 503 with the same body, which is read too).
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut snapshot = Vec::with_capacity(self.components.len());
        for (name, url) in &self.components {
            let health = async { self.client.get(url).send().await?.json::<Health>().await }
                .await
                .with_context(|| format!("failed to read the health of {name} at {url}"))?;
            snapshot.push((name.clone(), health));
        }
        Ok(snapshot)
    }
}

/// One component's stage costs over a phase.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentStages {
    pub component: String,
    /// Events handled during the phase.
    pub handled: u64,
    /// Events dropped as duplicates during the phase.
    pub duplicates_dropped: u64,
    /// Store transactions (batches) committed.
    pub batches: u64,
    /// `handled / batches`.
    pub events_per_batch: Option<f64>,
    /// Fresh instances made.
    pub instantiations: u64,
    /// Each stage's mean time per run, in µs: per event for all but
    /// `commit` (per batch) and `instantiate` (per fresh instance).
    pub mean_us: BTreeMap<String, f64>,
    /// The commits' time divided by the events handled, in µs.
    pub commit_us_per_event: Option<f64>,
    /// `call + instantiate` time divided by the events handled, in µs.
    pub guest_us_per_event: Option<f64>,
    /// `call + instantiate` per event as a share of the host's CPU per event.
    pub guest_share_of_host_cpu: Option<f64>,
}

/// Every component's stage costs over a phase.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Events handled by the four components together.
    pub events_handled: u64,
    /// Host CPU of the phase divided by `events_handled`, in µs.
    pub host_cpu_us_per_event: Option<f64>,
    /// All components' `call + instantiate` as a share of the host's CPU.
    pub guest_share_of_host_cpu: Option<f64>,
    pub components: Vec<ComponentStages>,
}

impl StageReport {
    /// The costs between `before` and `after`; `host_cpu_s` is the host's
    /// CPU over the same span, if known.
    pub fn new(before: &Snapshot, after: &Snapshot, host_cpu_s: Option<f64>) -> Self {
        let mut components = Vec::new();
        let mut guest_us_total = 0.0;
        for (name, after) in after {
            let before = before.iter().find(|(n, _)| n == name).map(|(_, h)| h.clone()).unwrap_or_default();
            let delta = |stage: &str| {
                let a = after.stages.get(stage).copied().unwrap_or_default();
                let b = before.stages.get(stage).copied().unwrap_or_default();
                StageTotal { count: a.count.saturating_sub(b.count), total_us: a.total_us.saturating_sub(b.total_us) }
            };
            let handled = after.handled.saturating_sub(before.handled);
            let per_event = |us: u64| (handled > 0).then(|| us as f64 / handled as f64);
            let mean_us: BTreeMap<String, f64> = STAGES
                .iter()
                .map(|s| (*s, delta(s)))
                .filter(|(_, d)| d.count > 0)
                .map(|(s, d)| (s.to_owned(), d.total_us as f64 / d.count as f64))
                .collect();
            let commit = delta("commit");
            let guest_us = delta("call").total_us + delta("instantiate").total_us;
            guest_us_total += guest_us as f64;
            components.push(ComponentStages {
                component: name.clone(),
                handled,
                duplicates_dropped: after.duplicates_dropped.saturating_sub(before.duplicates_dropped),
                batches: commit.count,
                events_per_batch: (commit.count > 0).then(|| handled as f64 / commit.count as f64),
                instantiations: delta("instantiate").count,
                mean_us,
                commit_us_per_event: per_event(commit.total_us),
                guest_us_per_event: per_event(guest_us),
                guest_share_of_host_cpu: None,
            });
        }
        let events_handled: u64 = components.iter().map(|c| c.handled).sum();
        let host_cpu_us_per_event = host_cpu_s.filter(|_| events_handled > 0).map(|s| s * 1e6 / events_handled as f64);
        if let Some(cpu_per_event) = host_cpu_us_per_event {
            for c in &mut components {
                c.guest_share_of_host_cpu = c.guest_us_per_event.map(|guest| guest / cpu_per_event);
            }
        }
        let guest_share_of_host_cpu = host_cpu_s.filter(|s| *s > 0.0).map(|s| guest_us_total / (s * 1e6));
        Self { events_handled, host_cpu_us_per_event, guest_share_of_host_cpu, components }
    }
}

/// One small table per phase: a row per component, a column per stage.
pub fn table(phases: &[(&str, &StageReport)]) -> String {
    let mut out = String::new();
    for (scenario, report) in phases {
        let cpu = report.host_cpu_us_per_event.map_or("-".into(), |us| format!("{us:.0} µs"));
        let share = report.guest_share_of_host_cpu.map_or("-".into(), percent);
        out.push_str(&format!(
            "\nstages, {scenario}: mean µs per run of each stage (commit: per batch, and ÷ events handled; \
             valid: outputs checked, schemas included; inst: per fresh instance, n made); host CPU {cpu} per event, guest call+instantiate {share} of it\n"
        ));
        let header: Vec<String> = [
            "handled",
            "dup",
            "decode",
            "dedup",
            "call",
            "valid",
            "inst",
            "inst n",
            "commit/b",
            "commit/ev",
            "ev/b",
            "durable",
            "publish",
            "guest/CPU",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let rows: Vec<(String, Vec<String>)> = report
            .components
            .iter()
            .map(|c| {
                let us = |stage: &str| c.mean_us.get(stage).map_or("-".into(), |v| format!("{v:.1}"));
                let cells = vec![
                    c.handled.to_string(),
                    c.duplicates_dropped.to_string(),
                    us("decode"),
                    us("dedup"),
                    us("call"),
                    us("validate"),
                    us("instantiate"),
                    c.instantiations.to_string(),
                    us("commit"),
                    c.commit_us_per_event.map_or("-".into(), |v| format!("{v:.1}")),
                    c.events_per_batch.map_or("-".into(), |v| format!("{v:.1}")),
                    us("durable_wait"),
                    us("publish"),
                    c.guest_share_of_host_cpu.map_or("-".into(), percent),
                ];
                (c.component.clone(), cells)
            })
            .collect();
        out.push_str(&crate::report::render(&header, &rows));
    }
    out
}

fn percent(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(handled: u64, call: (u64, u64), commit: (u64, u64)) -> Health {
        let stages = BTreeMap::from([
            ("call".to_owned(), StageTotal { count: call.0, total_us: call.1 }),
            ("commit".to_owned(), StageTotal { count: commit.0, total_us: commit.1 }),
        ]);
        Health { handled, duplicates_dropped: 0, stages }
    }

    #[test]
    fn costs_are_the_phase_deltas_per_handled_event() {
        let before = vec![("payment".to_owned(), health(10, (10, 1_000), (5, 500)))];
        let after = vec![("payment".to_owned(), health(110, (110, 3_000), (15, 2_500)))];
        // 100 events, 1 s of host CPU: 10,000 µs per event.
        let report = StageReport::new(&before, &after, Some(1.0));
        let c = &report.components[0];
        assert_eq!((c.handled, c.batches), (100, 10));
        assert_eq!(c.mean_us["call"], 20.0);
        assert_eq!(c.mean_us["commit"], 200.0);
        assert_eq!(c.commit_us_per_event, Some(20.0));
        assert_eq!(c.events_per_batch, Some(10.0));
        assert_eq!(report.host_cpu_us_per_event, Some(10_000.0));
        assert_eq!(c.guest_share_of_host_cpu, Some(0.002));
        assert!(table(&[("closed-c1", &report)]).contains("payment"));
    }

    #[test]
    fn health_json_is_read_with_its_stages() {
        let json = r#"{"status":"ok","handled":7,"duplicates_dropped":1,
            "stages":{"call":{"count":7,"total_us":70},"commit":{"count":2,"total_us":9}}}"#;
        let health: Health = serde_json::from_str(json).unwrap();
        assert_eq!((health.handled, health.stages["call"].total_us), (7, 70));
    }
}
