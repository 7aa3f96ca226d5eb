//! The email service in JavaScript (components/email-js) against the Rust
//! one (components/email): what a component in another language costs.
//!
//! `bench email-js` (no broker): each build's size, compile time (Cranelift,
//! no cache), store and load time of the compile cache, and the per-event
//! cost on the email's realistic event sequence through the host's runtime,
//! with a reused and with a fresh instance per event (with the time spent
//! instantiating). `bench email-js-e2e` (the running host of `just bench`):
//! the same closed loop with the Rust build serving email, then the
//! JavaScript build swapped in through the admin API, then back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use shop_host::runtime::{CALL_THREAD_STACK, Engine, LoadedComponent};

use crate::cli::Common;
use crate::load::Load;
use crate::manifest::Manifest;
use crate::report::{self, PhaseReport};
use crate::wasm::measure::{self, Measured};
use crate::wasm::saga;

/// Fixed time of every clock: deadlines never pass during a measurement.
const NOW_MS: u64 = 1_764_000_000_000;
/// The component both builds stand in for.
const EMAIL: &str = "email";

#[derive(Debug, Args)]
pub struct EmailJsArgs {
    /// The manifest: the email component's settings and config.
    #[arg(long, default_value = "app.toml")]
    manifest: PathBuf,
    /// The Rust build.
    #[arg(long, default_value = "target/wasm32-wasip2/release/email.wasm")]
    rust: PathBuf,
    /// The JavaScript build.
    #[arg(long, default_value = "target/wasm32-wasip2/release/email-js.wasm")]
    js: PathBuf,
    /// Orders whose email events make the sequence.
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
    /// Longest timing of one build in one mode, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    budget_ms: u64,
    /// Times the compile cache is loaded (the median is reported).
    #[arg(long, default_value_t = 5)]
    cache_loads: usize,
    /// Directory of the JSON results.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// One build's figures.
#[derive(Debug, Serialize)]
struct Build {
    build: &'static str,
    bytes: u64,
    /// `Component::new` and the world check, no cache, in ms.
    compile_ms: f64,
    /// Compiling plus sealing and writing the cache entry, in ms.
    compile_and_store_ms: f64,
    /// Reading, checking the seal and deserializing the cache entry, median, in ms.
    cache_load_ms: f64,
    /// The cache entry's size.
    cached_bytes: u64,
    reused: Measured,
    fresh: Measured,
}

#[derive(Serialize)]
struct EmailJsReport<'a> {
    orders: usize,
    reuse: u32,
    native: Measured,
    builds: &'a [Build],
}

/// Measures both builds and prints the table.
///
/// # Errors
/// When a build cannot be read, compiled or run, or the results cannot be written.
pub async fn run(args: EmailJsArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.manifest)?;
    let settings = manifest.components.get(EMAIL).context("the manifest has no email component")?.clone();
    let reuse = settings.instance_reuse.max(2);
    let sequences = saga::sequences(&manifest, args.orders, NOW_MS)?;
    let events = sequences.get(EMAIL).context("no email events")?.clone();
    eprintln!("bench: email in Rust vs JavaScript: {} email events ...", events.len());
    let budget = Duration::from_millis(args.budget_ms);
    let thread = std::thread::Builder::new()
        .name("bench-email-js".into())
        .stack_size(CALL_THREAD_STACK)
        .spawn(move || -> anyhow::Result<(Measured, Vec<Build>)> {
            let native = measure::native(&manifest, EMAIL, &events, NOW_MS, budget)?;
            let mut builds = Vec::new();
            for (build, path) in [("rust", &args.rust), ("javascript", &args.js)] {
                let bytes = std::fs::read(path).with_context(|| format!("failed to read {path:?}"))?;
                let compile_ms = compile(path, &bytes)?;
                let cache_dir = std::env::temp_dir().join(format!("shop-bench-email-js-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&cache_dir);
                let engine = Engine::with_cache(Some(cache_dir.clone()))?;
                let (compile_and_store_ms, cache_load_ms) = cache(&engine, path, &bytes, args.cache_loads)?;
                let cached_bytes = dir_bytes(&cache_dir);
                // The runtime modes load from this engine's cache.
                let mut manifest = manifest.clone();
                if let Some(email) = manifest.components.get_mut(EMAIL) {
                    email.wasm = path.clone();
                }
                let reused = measure::runtime(&engine, &manifest, EMAIL, &events, NOW_MS, reuse, budget)?;
                let fresh = measure::runtime(&engine, &manifest, EMAIL, &events, NOW_MS, 1, budget)?;
                let _ = std::fs::remove_dir_all(&cache_dir);
                builds.push(Build {
                    build,
                    bytes: bytes.len() as u64,
                    compile_ms,
                    compile_and_store_ms,
                    cache_load_ms,
                    cached_bytes,
                    reused,
                    fresh,
                });
            }
            Ok((native, builds))
        })
        .context("failed to start the measuring thread")?;
    let (native, builds) = tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("the measuring thread failed")?
        .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;
    report::write_json(
        &args.out_dir,
        "email-js",
        &EmailJsReport { orders: args.orders, reuse, native, builds: &builds },
    )?;
    print!("{}", table(&builds, &native, reuse));
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Compiles on an engine without a cache.
fn compile(path: &Path, bytes: &[u8]) -> anyhow::Result<f64> {
    let engine = Engine::new()?;
    let started = Instant::now();
    LoadedComponent::from_bytes(&engine, path, bytes)?;
    Ok(ms(started))
}

/// The first load compiles and stores; the later ones come from the cache.
fn cache(engine: &Engine, path: &Path, bytes: &[u8], loads: usize) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    LoadedComponent::from_bytes(engine, path, bytes)?;
    let stored = ms(started);
    let mut times = Vec::new();
    for _ in 0..loads.max(1) {
        let started = Instant::now();
        let loaded = LoadedComponent::from_bytes(engine, path, bytes)?;
        times.push(ms(started));
        anyhow::ensure!(loaded.from_cache, "{path:?} was compiled again instead of loaded from the cache");
    }
    times.sort_by(f64::total_cmp);
    Ok((stored, times[times.len() / 2]))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn table(builds: &[Build], native: &Measured, reuse: u32) -> String {
    let header: Vec<String> = [
        "size",
        "compile",
        "cache store",
        "cache load",
        "cached size",
        &format!("reuse {reuse}"),
        "(call)",
        "fresh",
        "(inst)",
        "(call)",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / f64::from(1 << 20));
    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} µs"));
    let rows: Vec<(String, Vec<String>)> = builds
        .iter()
        .map(|b| {
            let cells = vec![
                mib(b.bytes),
                format!("{:.0} ms", b.compile_ms),
                format!("{:.0} ms", b.compile_and_store_ms),
                format!("{:.1} ms", b.cache_load_ms),
                mib(b.cached_bytes),
                us(Some(b.reused.us_per_event)),
                us(b.reused.call_us),
                us(Some(b.fresh.us_per_event)),
                us(b.fresh.instantiate_us),
                us(b.fresh.call_us),
            ];
            (b.build.to_owned(), cells)
        })
        .collect();
    let mut out = format!(
        "\nThe email service in Rust and in JavaScript (componentize-js): size, compile (no cache), compile + cache \
         store, cache load (median), per email event of the median order through ServiceRuntime::call on an \
         in-memory store (reused instance / fresh instance per event; (inst), (call): the host's mean \
         instantiation and guest handle time per event). Native Rust logic: {:.1} µs per event\n",
        native.us_per_event
    );
    out.push_str(&report::render(&header, &rows));
    if let [rust, js] = builds {
        out.push_str(&format!(
            "  JavaScript / Rust: size {:.0}×, compile {:.0}×, cache load {:.0}×, per event reused {:.1}×, fresh {:.1}×\n",
            js.bytes as f64 / rust.bytes.max(1) as f64,
            js.compile_ms / rust.compile_ms.max(1e-3),
            js.cache_load_ms / rust.cache_load_ms.max(1e-3),
            js.reused.us_per_event / rust.reused.us_per_event.max(1e-3),
            js.fresh.us_per_event / rust.fresh.us_per_event.max(1e-3),
        ));
    }
    out
}

#[derive(Debug, Args)]
pub struct EmailJsE2eArgs {
    #[command(flatten)]
    common: Common,
    /// Base URL of the running host's admin API.
    #[arg(long)]
    admin_url: String,
    /// Its token.
    #[arg(long, env = "BENCH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The Rust build (serving at the start and again at the end).
    #[arg(long, default_value = "target/wasm32-wasip2/release/email.wasm")]
    rust: PathBuf,
    /// The JavaScript build.
    #[arg(long, default_value = "target/wasm32-wasip2/release/email-js.wasm")]
    js: PathBuf,
    /// Orders in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of each closed loop.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
}

#[derive(Serialize)]
struct E2eReport<'a> {
    /// The closed loop with the Rust build serving email, then the JavaScript one.
    phases: &'a [PhaseReport],
    /// The admin API's answer time of the swap to JavaScript, in ms (compiled or from the cache).
    swap_to_js_ms: f64,
}

/// Runs the closed loop with each build serving email.
///
/// # Errors
/// When the admin API refuses a swap, the load cannot run, or the results cannot be written.
pub async fn e2e(args: EmailJsE2eArgs) -> anyhow::Result<()> {
    let driver = args.common.driver()?;
    let observers = args.common.observers().await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let reload = |path: PathBuf| {
        let (client, url, token) = (
            client.clone(),
            format!("{}/components/email/reload", args.admin_url.trim_end_matches('/')),
            &args.admin_token,
        );
        async move {
            let bytes = std::fs::read(&path).with_context(|| format!("failed to read {path:?}"))?;
            let started = Instant::now();
            let response = client.post(&url).bearer_auth(token).body(bytes).send().await?;
            let status = response.status();
            anyhow::ensure!(status.is_success(), "reload of {path:?}: HTTP {status}: {}", response.text().await?);
            Ok::<f64, anyhow::Error>(ms(started))
        }
    };
    let load = || Load::Closed {
        concurrency: args.concurrency,
        orders: 1_000_000,
        duration: Duration::from_secs(args.duration_s),
    };
    reload(args.rust.clone()).await?;
    eprintln!("bench: email in Rust, closed loop ...");
    let mut rust = crate::phase::run(&driver, load(), &observers).await?;
    rust.scenario = format!("email-rust-{}", rust.scenario);
    let swap_to_js_ms = reload(args.js.clone()).await?;
    eprintln!("bench: email in JavaScript (swapped in after {swap_to_js_ms:.0} ms), closed loop ...");
    let js = crate::phase::run(&driver, load(), &observers).await;
    // Rust serves again whatever happened.
    reload(args.rust.clone()).await?;
    let mut js = js?;
    js.scenario = format!("email-js-{}", js.scenario);
    let phases = [rust, js];
    report::write_json(&args.common.out_dir, "email-js-e2e", &E2eReport { phases: &phases, swap_to_js_ms })?;
    println!("\nEnd to end with each build serving email (closed loop, swapped through the admin API):");
    print!("{}", report::table(&phases));
    let stages: Vec<(&str, &crate::stages::StageReport)> =
        phases.iter().filter_map(|p| p.stages.as_ref().map(|s| (p.scenario.as_str(), s))).collect();
    print!("{}", crate::stages::table(&stages));
    Ok(())
}
