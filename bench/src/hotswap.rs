//! Hot swap under load: while a closed loop runs, reload one component
//! twice through the host's admin API (alternating two builds when a
//! second one exists), then read the pauses the host recorded in its
//! version history and what the orders around each swap saw.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::order::Outcome;
use crate::stats::Percentiles;

/// After a reload's answer, how long its effects count as "during the swap".
pub const AFTERMATH: Duration = Duration::from_secs(1);

/// The admin API of the host.
#[derive(Debug, Clone)]
pub struct Admin {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// The swaps to make: which component, and the files to alternate.
#[derive(Debug, Clone)]
pub struct Plan {
    pub component: String,
    /// Bytes uploaded for each reload, in turn; `None` reloads the
    /// manifest's file (identical bytes still swap the instance).
    pub files: Vec<Option<PathBuf>>,
    /// When each reload starts, from the start of the phase.
    pub at: Vec<Duration>,
}

/// One reload as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Swap {
    /// What was uploaded (`manifest file` for an empty body).
    pub source: String,
    /// Milliseconds from the phase start to the request.
    pub started_ms: f64,
    /// The request's duration (compiling the new version included).
    pub request_ms: f64,
    /// The version the host answered, or why it refused.
    pub result: Result<String, String>,
    /// The pause the host recorded for this switch.
    pub pause_ms: Option<f64>,
    #[serde(skip)]
    window: (Instant, Instant),
}

/// What the orders around the swaps saw, next to the whole phase.
#[derive(Debug, Clone, Serialize)]
pub struct SwapFigures {
    /// Each reload, in order.
    pub swaps: Vec<Swap>,
    /// Seconds covered by the windows: each request plus `AFTERMATH`.
    pub window_s: f64,
    /// Orders that became final inside the windows, per second.
    pub completed_per_s_in_windows: f64,
    /// POST→final of the orders sent inside the windows.
    pub final_in_windows: Option<Percentiles>,
}

#[derive(Deserialize)]
struct Listed {
    history: Vec<HistoryEntry>,
}

#[derive(Deserialize)]
struct HistoryEntry {
    sha256: String,
    at_ms: u64,
    #[serde(default)]
    pause_ms: Option<f64>,
}

#[derive(Deserialize)]
struct Reloaded {
    version: String,
}

impl Admin {
    /// A client of the admin API at `base` with `token`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self { client, base: base.trim_end_matches('/').to_owned(), token: token.to_owned() })
    }

    /// A request to `path` (from `/`) of the admin API, with the token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    async fn reload(&self, component: &str, body: Vec<u8>) -> Result<String, String> {
        let url = format!("{}/components/{component}/reload", self.base);
        let response =
            self.client.post(&url).bearer_auth(&self.token).body(body).send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("HTTP {}: {text}", status.as_u16()));
        }
        response.json::<Reloaded>().await.map(|r| r.version).map_err(|e| e.to_string())
    }

    async fn history(&self, component: &str) -> anyhow::Result<Vec<HistoryEntry>> {
        let url = format!("{}/components", self.base);
        let response = self.client.get(&url).bearer_auth(&self.token).send().await?.error_for_status()?;
        let mut listed: std::collections::BTreeMap<String, Listed> = response.json().await?;
        let entry = listed.remove(component).with_context(|| format!("the admin API does not list {component:?}"))?;
        Ok(entry.history)
    }

    /// Makes the reloads of `plan`, each at its time from `start`.
    pub async fn swap(&self, plan: &Plan, start: Instant) -> Vec<Swap> {
        let mut swaps = Vec::new();
        for (file, at) in plan.files.iter().zip(&plan.at) {
            tokio::time::sleep_until(start + *at).await;
            let (source, body) = match file {
                Some(path) => match tokio::fs::read(path).await {
                    Ok(bytes) => (path.display().to_string(), bytes),
                    Err(err) => {
                        eprintln!("bench: cannot read {path:?} ({err}); reloading the manifest's file");
                        ("manifest file".to_owned(), Vec::new())
                    }
                },
                None => ("manifest file".to_owned(), Vec::new()),
            };
            let started = Instant::now();
            let result = self.reload(&plan.component, body).await;
            let ended = Instant::now();
            if let Err(err) = &result {
                eprintln!("bench: reload of {} refused: {err}", plan.component);
            }
            swaps.push(Swap {
                source,
                started_ms: (started - start).as_secs_f64() * 1000.0,
                request_ms: (ended - started).as_secs_f64() * 1000.0,
                result,
                pause_ms: None,
                window: (started, ended + AFTERMATH),
            });
        }
        swaps
    }

    /// Fills in each swap's pause from the host's history: the entries
    /// recorded since `since_unix_ms`, matched in order by version.
    ///
    /// # Errors
    /// When the admin API cannot be read.
    pub async fn pauses(&self, component: &str, since_unix_ms: u64, swaps: &mut [Swap]) -> anyhow::Result<()> {
        let mut recent = self.history(component).await?.into_iter().filter(|e| e.at_ms >= since_unix_ms);
        for swap in swaps.iter_mut() {
            let Ok(version) = &swap.result else { continue };
            swap.pause_ms = recent.by_ref().find(|e| &e.sha256 == version).and_then(|e| e.pause_ms);
        }
        Ok(())
    }
}

/// The orders' figures inside the swaps' windows.
pub fn figures(swaps: Vec<Swap>, outcomes: &[Outcome]) -> SwapFigures {
    let inside = |at: Instant| swaps.iter().any(|s| s.window.0 <= at && at <= s.window.1);
    let window_s: f64 = swaps.iter().map(|s| (s.window.1 - s.window.0).as_secs_f64()).sum();
    let completed = outcomes.iter().filter(|o| o.finished.as_ref().is_some_and(|(at, _)| inside(*at))).count();
    let final_in_windows =
        Percentiles::of(outcomes.iter().filter(|o| inside(o.sent)).filter_map(Outcome::final_latency));
    SwapFigures {
        completed_per_s_in_windows: if window_s > 0.0 { completed as f64 / window_s } else { 0.0 },
        window_s,
        final_in_windows,
        swaps,
    }
}

/// The swaps as lines of text.
pub fn summary(scenario: &str, figures: &SwapFigures) -> String {
    let mut out = format!("\nhot swap during {scenario}:\n");
    for (i, swap) in figures.swaps.iter().enumerate() {
        let result = match &swap.result {
            Ok(version) => format!("now {}", version.chars().take(12).collect::<String>()),
            Err(err) => format!("refused: {err}"),
        };
        let pause = swap.pause_ms.map_or("-".into(), |ms| format!("{ms:.3} ms"));
        out.push_str(&format!(
            "  reload {} at {:.1} s ({}): request {:.0} ms, processing paused {pause}, {result}\n",
            i + 1,
            swap.started_ms / 1000.0,
            swap.source,
            swap.request_ms,
        ));
    }
    let latency = figures
        .final_in_windows
        .map_or("-".into(), |p| format!("p50 {:.1} / p99 {:.1} / max {:.1} ms", p.p50_ms, p.p99_ms, p.max_ms));
    out.push_str(&format!(
        "  within the reloads (+{} s after each, {:.1} s in all): {:.1} completed orders/s; POST→final {latency}\n",
        AFTERMATH.as_secs(),
        figures.window_s,
        figures.completed_per_s_in_windows,
    ));
    out
}
