//! One component's event sequence handled four ways, each timed per event:
//! natively, through the host's runtime on a reused or a fresh instance
//! (with an in-memory store), and through the host's pipeline on a durable
//! store (one event per batch, each waiting for its fsync).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use shop_host::bus::Inbound;
use shop_host::clock::{Clock, ManualClock};
use shop_host::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};
use shop_host::runtime::{CanaryPolicy, Engine, Event, Limits, LoadedComponent, Output, ServiceRuntime, ServiceSpec};
use shop_host::state::{Commit, DurableStore, MemoryStore, StateRead, StateStore, StoreReader};
use tokio_util::sync::CancellationToken;

use super::saga::{self, Delivered};
use crate::manifest::{Component, Manifest};
use crate::stats::Percentiles;

/// Events handled untimed first (per mode), for warm caches and instances.
const WARMUP_EVENTS: usize = 50;

/// One mode's result.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    /// Events timed.
    pub events: usize,
    /// Wall time per event of the median order, in µs: each fully timed
    /// order's events' time over their number, the median of those. An
    /// order mixes cheap and costly events (a component ignores its own
    /// echoes), so the median of single events would say little; and on a
    /// shared machine a preempted event weighs on the mean, not on this.
    pub us_per_event: f64,
    /// Mean wall time of an event, in µs.
    pub mean_us: f64,
    /// Orders fully timed.
    pub orders: usize,
    /// Of which in the guest's `handle` (host calls included), per event.
    pub call_us: Option<f64>,
    /// Of which making fresh instances, per event.
    pub instantiate_us: Option<f64>,
}

/// Times `f` over `items` after a warm-up (`warmed` runs between the two),
/// until `budget` is spent.
fn timed<T>(
    items: &[T],
    budget: Duration,
    warmed: impl FnOnce(),
    mut f: impl FnMut(&T) -> anyhow::Result<()>,
) -> anyhow::Result<Timed> {
    let warmup = WARMUP_EVENTS.min(items.len() / 10);
    for item in &items[..warmup] {
        f(item)?;
    }
    warmed();
    let started = Instant::now();
    let mut samples = Vec::with_capacity(items.len() - warmup);
    for item in &items[warmup..] {
        let at = Instant::now();
        f(item)?;
        samples.push(at.elapsed());
        if started.elapsed() >= budget {
            break;
        }
    }
    Ok(Timed { first: warmup, samples })
}

/// Per-event times of a run from the `first` event of the sequence on.
struct Timed {
    first: usize,
    samples: Vec<Duration>,
}

/// The order (0, 1, ...) of each event of a sequence: one order's events
/// are consecutive.
pub fn orders_of(events: &[Delivered]) -> Vec<usize> {
    let mut order = 0;
    events
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i > 0 && events[i - 1].event.key != d.event.key {
                order += 1;
            }
            order
        })
        .collect()
}

/// The figures of a run (stage columns filled in by the caller).
fn measured(orders: &[usize], timed: Timed) -> anyhow::Result<Measured> {
    let events = timed.samples.len();
    anyhow::ensure!(events > 0, "no event left to time after the warm-up");
    let mean_us = timed.samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / events as f64;
    let mut sizes = vec![0usize; orders.last().map_or(0, |last| last + 1)];
    for order in orders {
        sizes[*order] += 1;
    }
    let mut per_order: Vec<(usize, Duration, usize)> = Vec::new();
    for (i, sample) in timed.samples.iter().enumerate() {
        let order = orders[timed.first + i];
        match per_order.last_mut() {
            Some((o, total, n)) if *o == order => {
                *total += *sample;
                *n += 1;
            }
            _ => per_order.push((order, *sample, 1)),
        }
    }
    // Only orders whose every event was timed (not cut by the warm-up or the budget).
    let per_event: Vec<Duration> =
        per_order.iter().filter(|(o, _, n)| *n == sizes[*o]).map(|(_, total, n)| *total / *n as u32).collect();
    let orders = per_event.len();
    let median = Percentiles::of(per_event).map_or(mean_us, |p| p.p50_ms * 1000.0);
    Ok(Measured { events, us_per_event: median, mean_us, orders, call_us: None, instantiate_us: None })
}

/// The component's logic called natively, on a [`shop_sdk::MemoryHost`].
///
/// # Errors
/// When the component fails on an event.
pub fn native(
    manifest: &Manifest,
    name: &str,
    events: &[Delivered],
    now_ms: u64,
    budget: Duration,
) -> anyhow::Result<Measured> {
    let mut host = saga::host(manifest, name, now_ms);
    let orders = orders_of(events);
    let samples = timed(
        events,
        budget,
        || (),
        |d| saga::handle(name, &mut host, &d.event).map(drop).map_err(|e| anyhow::anyhow!("{name}: {e}")),
    )?;
    measured(&orders, samples)
}

pub(crate) fn service(
    engine: &Engine,
    name: &str,
    settings: &Component,
    store: Arc<dyn StateStore>,
    now_ms: u64,
    reuse: u32,
) -> anyhow::Result<Arc<ServiceRuntime>> {
    let component = LoadedComponent::from_file(engine, &settings.wasm)
        .with_context(|| format!("failed to load {:?}", settings.wasm))?;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(now_ms));
    let vault = name == "payment";
    let service = Arc::new(ServiceRuntime::new(
        engine.clone(),
        ServiceSpec {
            name: name.to_owned(),
            component,
            store,
            config: settings.config.clone().into_iter().collect::<HashMap<_, _>>(),
            clock: clock.clone(),
            limits: Limits {
                timeout: Duration::from_millis(settings.timeout_ms),
                memory_bytes: settings.memory_mib << 20,
                instance_reuse: reuse,
                ..Limits::default()
            },
            canary: CanaryPolicy::default(),
            grants: shop_host::runtime::Grants { vault, ..Default::default() },
        },
    ));
    if vault {
        // The vault the host gives payment, holding the benchmark's card.
        let key = shop_host::vault::VaultKey::random()?;
        let vault = shop_host::vault::Vault::open(
            Arc::new(shop_host::state::MemoryStore::default()),
            &key,
            clock,
            shop_host::vault::DEFAULT_TTL,
        )?;
        futures::executor::block_on(vault.deposit_as(saga::BENCH_TOKEN, saga::BENCH_CARD))?;
        service.set_vault(Arc::new(vault));
    }
    Ok(service)
}

fn wit_event(event: &shop_sdk::Event) -> Event {
    Event {
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        topic: event.topic.clone(),
        key: event.key.clone(),
        headers: event.headers.clone(),
        payload: event.payload.clone(),
        timestamp_ms: event.timestamp_ms,
    }
}

/// `ServiceRuntime::call` on an in-memory store, each call's changes
/// committed (and its outbox entry cleared) before the next; instances serve
/// `reuse` events. Run it on a thread with `CALL_THREAD_STACK`.
///
/// # Errors
/// When the component cannot be loaded or fails on an event.
#[allow(clippy::too_many_arguments)]
pub fn runtime(
    engine: &Engine,
    manifest: &Manifest,
    name: &str,
    events: &[Delivered],
    now_ms: u64,
    reuse: u32,
    budget: Duration,
) -> anyhow::Result<Measured> {
    let settings = manifest.components.get(name).with_context(|| format!("no component {name:?}"))?;
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let rt = service(engine, name, settings, store.clone(), now_ms, reuse)?;
    let orders = orders_of(events);
    let events: Vec<Event> = events.iter().map(|d| wit_event(&d.event)).collect();
    let mut totals = None;
    let samples = timed(
        &events,
        budget,
        || totals = Some(rt.stages().totals()),
        |event| {
            let view: Arc<dyn StateRead> = Arc::new(StoreReader(store.clone()));
            let called = rt.call(event, view).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let commit = Commit {
                writes: called.writes,
                timers: called.timers,
                handled: Some(event.id.clone()),
                outbox: called.outputs.into_iter().map(Output::bare_record).collect(),
                now_ms,
                ..Commit::default()
            };
            store.commit(commit)?.wait_blocking()?;
            store.clear_outbox(&event.id)?;
            Ok(())
        },
    )?;
    let (before, after) = (totals.context("nothing timed")?, rt.stages().totals());
    let mut measured = measured(&orders, samples)?;
    let us = |b: u64, a: u64| Some(a.saturating_sub(b) as f64 / measured.events as f64);
    measured.call_us = us(before.call.total_us, after.call.total_us);
    measured.instantiate_us = us(before.instantiate.total_us, after.instantiate.total_us);
    Ok(measured)
}

/// `Pipeline::process` on a durable store in `dir`, one event at a time:
/// each is its own batch, waits for its commit's fsync, then has its outbox
/// entry cleared, as after an acknowledged publish.
///
/// # Errors
/// When the store or the component fails, or an event is dead-lettered.
pub async fn pipeline(
    engine: &Engine,
    manifest: &Manifest,
    name: &str,
    events: &[Delivered],
    now_ms: u64,
    dir: &Path,
    budget: Duration,
) -> anyhow::Result<Measured> {
    let settings = manifest.components.get(name).with_context(|| format!("no component {name:?}"))?;
    let store: Arc<dyn StateStore> = Arc::new(DurableStore::open(&dir.join(format!("{name}.redb")))?);
    let rt = service(engine, name, settings, store, now_ms, settings.instance_reuse)?;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(now_ms));
    let topics = Topics { prefix: String::new(), dead_letter: "dead-letters".into() };
    let pipeline = Pipeline::new(rt.clone(), topics, RetryPolicy::default(), clock);
    let shutdown = CancellationToken::new();
    let records: Vec<Inbound> = events
        .iter()
        .enumerate()
        .map(|(offset, d)| Inbound {
            topic: d.event.topic.clone(),
            partition: 0,
            offset: offset as i64,
            key: d.event.key.clone().map(String::into_bytes),
            value: Some(d.envelope().value()),
            headers: d.envelope().header_bytes(None),
        })
        .collect();
    let warmup = WARMUP_EVENTS.min(records.len() / 10);
    let mut samples = Vec::with_capacity(records.len());
    let started = Instant::now();
    for (i, record) in records.iter().enumerate() {
        let at = Instant::now();
        match pipeline.process(record, &shutdown).await {
            Some(Disposition::Publish { durable, source, .. }) => {
                durable.wait().await?;
                if let Some(source) = source {
                    rt.state_store().clear_outbox(&source)?;
                }
            }
            Some(Disposition::DeadLetter { reason, .. }) => anyhow::bail!("{name} dead-lettered an event: {reason}"),
            None => anyhow::bail!("{name}'s pipeline stopped"),
        }
        if i >= warmup {
            samples.push(at.elapsed());
            if started.elapsed() >= budget {
                break;
            }
        }
    }
    measured(&orders_of(events), Timed { first: warmup, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(key: &str) -> Delivered {
        let event = shop_sdk::Event { key: Some(key.into()), ..shop_sdk::Event::default() };
        Delivered { event, correlation_id: String::new(), causation_id: None, producer: String::new() }
    }

    #[test]
    fn the_figure_is_the_median_orders_time_per_event() {
        let events: Vec<Delivered> = ["a", "a", "b", "b", "c", "c", "d", "d"].iter().map(|k| delivered(k)).collect();
        let orders = orders_of(&events);
        assert_eq!(orders, [0, 0, 1, 1, 2, 2, 3, 3]);
        // Timed from the second event: order 0 is cut short and left out.
        let us = Duration::from_micros;
        let samples = vec![us(100), us(1), us(9), us(2), us(4), us(500), us(10)];
        let measured = measured(&orders, Timed { first: 1, samples }).unwrap();
        assert_eq!((measured.events, measured.orders), (7, 3));
        // Orders b, c, d: 5, 3 and 255 µs per event.
        assert_eq!(measured.us_per_event, 5.0);
        assert!((measured.mean_us - 626.0 / 7.0).abs() < 1e-9);
    }
}
