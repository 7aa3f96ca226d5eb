//! Wiring: from a validated manifest to a running host, and back down on
//! shutdown. Order matters: components are compiled and every port is bound
//! before anything touches Kafka, so a bad component or a taken port fails
//! fast and leaves nothing half-started.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::deadlines::{DeadlineClock, OutageClock, Watermark};
use crate::kafka::{self, ConsumerSettings, EmbeddedBroker, KafkaPublisher};
use crate::manifest::{Manifest, StateBackend};
use crate::pipeline::{Pipeline, RetryPolicy, Topics};
use crate::runtime::ServiceRuntime;
use crate::status::{BrokerLink, ConsumerStatus};

mod load;
mod serving;

use load::load_services;
pub use load::{cache_location, check, schema_set};
pub use serving::Serving;

/// Runs the host until `shutdown` is cancelled, then stops consuming,
/// finishes in-flight events, commits offsets and closes every port.
///
/// # Errors
/// A component that does not load, a port that is taken, or a Kafka
/// cluster that cannot be reached at start.
pub async fn run(
    manifest: Manifest,
    brokers: Option<String>,
    serving: Serving,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serving.validate(&manifest)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (services, vault) = load_services(&manifest, &serving, &clock).await?;
    register_schemas(&manifest).await?;
    let instance = crate::instance::resolve(&manifest, serving.instance_id.as_deref())?;
    tracing::info!(instance = %instance.id(), components = ?services.keys().filter(|n| serving.runs(n)).collect::<Vec<_>>(), gateway = serving.gateway, state = ?manifest.state.backend, "serving");
    let listeners = bind_listeners(&manifest, &serving).await?;

    let topics =
        Topics { prefix: manifest.kafka.topic_prefix.clone(), dead_letter: manifest.kafka.dead_letter_topic.clone() };
    let (_embedded, brokers) = connect(&manifest, brokers, &topics).await?;
    let link = BrokerLink::default();
    let publisher = Arc::new(KafkaPublisher::connect(&brokers, link.clone())?);
    relay_left_over(&manifest, &serving, &services, &topics, &publisher, &clock).await;

    let drain_timeout = Duration::from_millis(manifest.runtime.drain_timeout_ms);
    let abandoned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(probe_while_down(publisher.clone(), link.clone(), shutdown.clone()));
    let names = listeners.components.iter().map(|(name, _)| name.clone());
    let (watermarks, deadlines) = deadline_clocks(&manifest, &services, names, &clock, &link);
    let host = Host {
        brokers,
        topics,
        link,
        publisher,
        clock,
        deadlines,
        drain_timeout,
        instance_id: instance.id().to_owned(),
        vault,
        abandoned,
        shutdown,
    };
    let mut statuses = BTreeMap::new();
    let recent_orders = crate::admin::RecentOrders::default();
    for (name, listener) in listeners.components {
        let watermark = watermarks[&name].clone();
        let status =
            spawn_component(&host, &mut tasks, &manifest, services[&name].clone(), (name.clone(), listener), watermark);
        statuses.insert(name, status);
    }
    let gateway_publisher = match listeners.gateway {
        Some(listener) => Some(spawn_gateway(&host, &mut tasks, &manifest, &services, listener, &recent_orders)?),
        None => None,
    };
    if let (Some(listener), Some(token)) = (listeners.admin, &manifest.admin.token) {
        let admin = admin_app(&host, &manifest, &services, &statuses, token, recent_orders);
        let (connections, timeout) = (manifest.http.connection_limits(), crate::http::REQUEST_TIMEOUT);
        tasks.spawn(crate::http::serve("admin".into(), listener, admin, connections, timeout, host.shutdown.clone()));
    }
    let gateway_port = serving.gateway.then_some(manifest.gateway.port);
    tracing::info!(gateway = ?gateway_port, brokers = %host.brokers, "host ready");

    wait_for_tasks(tasks, &host).await;
    for service in services.values() {
        if let Some(shadow) = service.shadowing() {
            shadow.end("the host stopped (a shadow run is not kept across restarts: start it again)");
        }
    }
    host.publisher.flush(CLOSE_GRACE);
    if let Some(orders) = gateway_publisher {
        orders.flush(CLOSE_GRACE);
    }
    drop(instance);
    let abandoned = host.abandoned.load(std::sync::atomic::Ordering::SeqCst);
    anyhow::ensure!(
        abandoned == 0,
        "stopped, abandoning {abandoned} records or tasks in flight (they will be delivered again)"
    );
    tracing::info!("host stopped");
    Ok(())
}

/// Timers are due once every consumer here has caught up, not counting
/// the broker's outages: one watermark per component consuming here, and
/// the clock timers are due by. Guests compare deadlines with the outage
/// clock.
fn deadline_clocks(
    manifest: &Manifest,
    services: &BTreeMap<String, Arc<ServiceRuntime>>,
    consuming: impl Iterator<Item = String>,
    clock: &Arc<dyn Clock>,
    link: &BrokerLink,
) -> (BTreeMap<String, Watermark>, Arc<dyn Clock>) {
    let watermarks: BTreeMap<String, Watermark> = consuming.map(|name| (name, Watermark::default())).collect();
    let outage_window = Duration::from_millis(manifest.runtime.deadline_outage_window_ms);
    let outage = Arc::new(OutageClock::new(clock.clone(), link.clone(), outage_window));
    let deadlines: Arc<dyn Clock> =
        Arc::new(DeadlineClock::new(outage.clone(), watermarks.values().cloned().collect()));
    for service in services.values() {
        service.set_deadline_clock(outage.clone());
    }
    (watermarks, deadlines)
}

/// What every part the host starts shares.
struct Host {
    brokers: String,
    topics: Topics,
    link: BrokerLink,
    publisher: Arc<KafkaPublisher>,
    clock: Arc<dyn Clock>,
    /// The clock timers are due by.
    deadlines: Arc<dyn Clock>,
    drain_timeout: Duration,
    instance_id: String,
    /// The card vault, if this host deposits or redeems cards.
    vault: Option<Arc<crate::vault::Vault>>,
    /// Records or tasks abandoned at shutdown.
    abandoned: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
}

/// The ports this host serves, bound before anything touches Kafka.
struct Listeners {
    gateway: Option<TcpListener>,
    admin: Option<TcpListener>,
    /// Each component's port, by name.
    components: Vec<(String, TcpListener)>,
}

/// Binds `port`, naming its owner if it is taken.
async fn bind(manifest: &Manifest, port: u16, owner: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(manifest.http.bind, port);
    TcpListener::bind(addr).await.map_err(|err| match err.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "port {port} for {owner} is already in use on {}: stop the process holding it (`lsof -ti:{port}`) or change the port in the manifest",
            manifest.http.bind
        ),
        _ => anyhow::anyhow!("cannot bind {addr} for {owner}: {err}"),
    })
}

/// Binds every port this host serves.
async fn bind_listeners(manifest: &Manifest, serving: &Serving) -> anyhow::Result<Listeners> {
    let gateway_listener = match serving.gateway {
        true => Some(bind(manifest, manifest.gateway.port, "the gateway").await?),
        false => None,
    };
    let admin_listener = match &manifest.admin.token {
        Some(_) => {
            let addr = SocketAddr::new(manifest.admin.bind, manifest.admin.port);
            Some(TcpListener::bind(addr).await.with_context(|| format!("cannot bind {addr} for the admin API"))?)
        }
        None => {
            tracing::info!("admin API off: set HOST_ADMIN_TOKEN (or admin.token) to enable reloads");
            None
        }
    };
    let mut listeners = Vec::new();
    for (name, settings) in manifest.components.iter().filter(|(name, _)| serving.runs(name)) {
        listeners.push((name.clone(), bind(manifest, settings.port, &format!("component {name:?}")).await?));
    }
    Ok(Listeners { gateway: gateway_listener, admin: admin_listener, components: listeners })
}

/// The brokers to use, with every topic of the app created: `brokers`, else
/// the manifest's, else an embedded broker (returned: it lives as long as
/// it is held).
async fn connect(
    manifest: &Manifest,
    brokers: Option<String>,
    topics: &Topics,
) -> anyhow::Result<(Option<EmbeddedBroker>, String)> {
    let physical: Vec<String> = manifest.logical_topics().iter().map(|t| topics.physical(t)).collect();
    let brokers = brokers.or_else(|| manifest.kafka.brokers.clone());
    Ok(match brokers {
        Some(brokers) => {
            kafka::ensure_topics(&brokers, &physical, manifest.kafka.partitions, manifest.kafka.replication_factor)
                .await?;
            (None, brokers)
        }
        None => {
            let embedded = EmbeddedBroker::start(&physical, manifest.kafka.partitions)?;
            let address = embedded.bootstrap_servers();
            tracing::warn!(
                bootstrap = %address,
                "no KAFKA_BROKERS set: using an embedded in-process Kafka broker at {address}; it keeps nothing across restarts (`just kafka` starts a real one)"
            );
            (Some(embedded), address)
        }
    })
}

/// Publishes what was committed but not acknowledged before the last stop,
/// before anything new is handled.
async fn relay_left_over(
    manifest: &Manifest,
    serving: &Serving,
    services: &BTreeMap<String, Arc<ServiceRuntime>>,
    topics: &Topics,
    publisher: &Arc<KafkaPublisher>,
    clock: &Arc<dyn Clock>,
) {
    // On a shared store, younger entries may be another live host's, being
    // published right now: the periodic relay takes them if they stay.
    let started_ms = match manifest.state.backend {
        StateBackend::Redb => clock.now_ms(),
        StateBackend::Postgres => clock.now_ms().saturating_sub(crate::scheduler::STALE_OUTBOX_MS),
    };
    for (name, service) in services.iter().filter(|(name, _)| serving.runs(name)) {
        let dead_letters = topics.physical(&topics.dead_letter);
        match crate::scheduler::relay(service, &**publisher, started_ms, &dead_letters).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(component = %name, entries = n, "published the outbox left by the last run"),
            // Kept: the periodic relay tries again.
            Err(err) => tracing::error!(component = %name, "cannot publish the outbox left by the last run: {err:#}"),
        }
    }
}

/// Starts one component: its pipeline, timers and relay, consumer, file
/// watch and port. Returns the status its consumer reports to.
fn spawn_component(
    host: &Host,
    tasks: &mut tokio::task::JoinSet<()>,
    manifest: &Manifest,
    service: Arc<ServiceRuntime>,
    (name, listener): (String, TcpListener),
    watermark: Watermark,
) -> ConsumerStatus {
    let (topics, link, shutdown) = (&host.topics, &host.link, &host.shutdown);
    let settings = &manifest.components[&name];
    let status = ConsumerStatus::default();
    let retry = RetryPolicy { max_attempts: settings.max_attempts, ..RetryPolicy::default() };
    let pipeline = Arc::new(Pipeline::new(service.clone(), topics.clone(), retry, host.clock.clone()));
    pipeline.set_max_record_bytes(manifest.kafka.max_record_bytes);
    pipeline.set_wire_format(manifest.kafka.wire_format);
    let metrics = Arc::new(crate::metrics::ComponentMetrics::new(service.clone(), status.clone(), link.clone()));
    pipeline.set_metrics(metrics.faults().clone());
    service.stages().attach(metrics.stage_histograms());
    let consumer = ConsumerSettings {
        brokers: host.brokers.clone(),
        group: format!("{}{}", topics.prefix, settings.group),
        topics: settings.topics.iter().map(|t| topics.physical(t)).collect(),
        instance_id: Some(format!("{}-{name}", host.instance_id)),
        drain_timeout: host.drain_timeout,
        link: link.clone(),
        watermark,
        // Other hosts may take over only partitions whose state they share.
        handoff_after: (manifest.state.backend == StateBackend::Postgres)
            .then(|| Duration::from_millis(manifest.state.commit_timeout_ms)),
    };
    tasks.spawn(crate::scheduler::run(
        pipeline.clone(),
        host.publisher.clone(),
        host.clock.clone(),
        host.deadlines.clone(),
        Duration::from_millis(manifest.state.handled_horizon_ms),
        shutdown.clone(),
    ));
    let consuming = kafka::run_supervised(pipeline, host.publisher.clone(), consumer, status.clone(), shutdown.clone());
    let abandoned = host.abandoned.clone();
    tasks.spawn(async move {
        if let Err(kafka::Abandoned(n)) = consuming.await {
            abandoned.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
    });
    if manifest.runtime.watch {
        let timing = crate::watch::WatchTiming::default();
        tasks.spawn(crate::watch::watch(service.clone(), settings.wasm.clone(), timing, shutdown.clone()));
    }
    let router = crate::http::component_app(service, status.clone(), link.clone(), metrics);
    let (connections, timeout) = (manifest.http.connection_limits(), crate::http::REQUEST_TIMEOUT);
    let port = format!("component {name}");
    tasks.spawn(crate::http::serve(port, listener, router, connections, timeout, shutdown.clone()));
    status
}

/// Starts the gateway on `listener`. Returns its producer, to flush at the end.
fn spawn_gateway(
    host: &Host,
    tasks: &mut tokio::task::JoinSet<()>,
    manifest: &Manifest,
    services: &BTreeMap<String, Arc<ServiceRuntime>>,
    listener: TcpListener,
    recent_orders: &crate::admin::RecentOrders,
) -> anyhow::Result<Arc<KafkaPublisher>> {
    let (topics, link) = (&host.topics, &host.link);
    // Its own producer: an order not acknowledged in time is answered
    // 503 and dropped, not sent later behind the client's back.
    let publish_timeout = Duration::from_millis(manifest.gateway.publish_timeout_ms);
    let orders = Arc::new(KafkaPublisher::connect_with_timeout(&host.brokers, link.clone(), publish_timeout)?);
    let gateway_publisher = orders.clone();
    let backend = crate::gateway_backend::GatewayBackend {
        publisher: orders,
        orders_topic: topics.physical(shop_events::topics::ORDERS),
        orders: services[&manifest.gateway.order_component].clone(),
        clock: host.clock.clone(),
        link: link.clone(),
        vault: host.vault.clone().context("a host serving the gateway opens the card vault")?,
        wire_format: manifest.kafka.wire_format,
    };
    // Remembers the orders it takes, for the admin console.
    let backend = Arc::new(crate::admin::Recording::new(backend, recent_orders.clone()));
    let rates = gateway::RateLimits {
        orders_per_second: f64::from(manifest.gateway.orders_per_second_per_client),
        queries_per_second: f64::from(manifest.gateway.queries_per_second_per_client),
    };
    // One of the order component's query slots stays free for the
    // Idempotency-Key check of POST /order, whatever GET /order/{id} does.
    let order_slots = manifest.components[&manifest.gateway.order_component].max_concurrent_queries;
    let settings = gateway::Settings {
        publish_timeout,
        connections: manifest.http.connection_limits(),
        rates,
        status_concurrency: order_slots.saturating_sub(1).max(1),
        ..gateway::Settings::default()
    };
    let router = gateway::app_with(backend, settings);
    // A caller's trace context reaches the order it places.
    let router = router.layer(axum::middleware::from_fn(crate::traces::from_request));
    // Timed by matched route, and `/metrics` beside the gateway's own routes.
    let router = Arc::new(crate::metrics::GatewayMetrics::new(link.clone())).instrument(router);
    // With a header read timeout, which axum::serve cannot set.
    tasks.spawn(gateway::serve(listener, router, settings, host.shutdown.clone().cancelled_owned()));
    Ok(gateway_publisher)
}

/// The admin API over every service loaded here, the dead letters and the
/// console.
fn admin_app(
    host: &Host,
    manifest: &Manifest,
    services: &BTreeMap<String, Arc<ServiceRuntime>>,
    statuses: &BTreeMap<String, ConsumerStatus>,
    token: &str,
    recent_orders: crate::admin::RecentOrders,
) -> axum::Router {
    let (brokers, topics, publisher) = (&host.brokers, &host.topics, &host.publisher);
    let managed = services
        .iter()
        .map(|(name, service)| {
            let wasm = manifest.components[name].wasm.clone();
            let status = statuses.get(name).cloned();
            (name.clone(), crate::admin::Managed { service: service.clone(), wasm, status })
        })
        .collect();
    let log = crate::kafka::dlq::KafkaLog::new(brokers, &topics.physical(&topics.dead_letter));
    let allowed = crate::kafka::dlq::replay_topics(manifest);
    let dead_letters = crate::kafka::dlq::DeadLetters::new(Arc::new(log), publisher.clone(), allowed);
    let console = crate::admin::ConsoleSettings {
        recent: recent_orders,
        order_component: manifest.gateway.order_component.clone(),
        link: host.link.clone(),
        topics: topics.clone(),
        topology: topology(manifest),
    };
    crate::admin::admin_app_with_console(managed, token, Some(dead_letters), console)
}

/// With `[schemas] registry`: every event schema checked against the
/// registry and registered there, or the start refused.
async fn register_schemas(manifest: &Manifest) -> anyhow::Result<()> {
    let Some(base) = &manifest.schemas.registry else { return Ok(()) };
    let registry = crate::registry::Registry::new(base, &manifest.kafka.topic_prefix)?;
    let ids = registry.sync(&schema_set(manifest)?).await?;
    tracing::info!(registry = %registry.shown(), schemas = ids.len(), "event schemas registered");
    Ok(())
}

/// Who publishes and who consumes each event type on each topic, and
/// which types have a schema.
pub fn topology(manifest: &Manifest) -> Vec<crate::manifest::topology::Flow> {
    let schemas = schema_set(manifest).unwrap_or_default();
    let mut flows = crate::manifest::topology::flows(manifest, |t| schemas.schema(t).is_some());
    // The versions each party gives a flow, from the contracts their files
    // carry (a file that cannot be read or carries a broken contract counts
    // as carrying none: `host check` says what is wrong with it).
    let mut parties = BTreeMap::from([(crate::contracts::GATEWAY.to_owned(), crate::contracts::gateway(&schemas))]);
    for (name, settings) in &manifest.components {
        let contract =
            std::fs::read(&settings.wasm).ok().and_then(|b| crate::contracts::Contract::from_wasm(&b).ok().flatten());
        parties.insert(name.clone(), crate::contracts::party_of(settings, contract, &schemas));
    }
    crate::contracts::annotate(&mut flows, &parties);
    flows
}

/// Until shutdown, a task that fails stops the host. From shutdown on,
/// every task has the drain timeout (and a few seconds to close) to end;
/// whatever is left then is abandoned.
async fn wait_for_tasks(mut tasks: tokio::task::JoinSet<()>, host: &Host) {
    let (shutdown, drain_timeout, abandoned) = (&host.shutdown, host.drain_timeout, &host.abandoned);
    let mut deadline = None;
    loop {
        let stop_by = deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Err(err)) if !err.is_cancelled() => {
                    tracing::error!("task failed: {err}");
                    shutdown.cancel();
                }
                Some(_) => {}
            },
            () = shutdown.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain_timeout + CLOSE_GRACE);
            }
            () = tokio::time::sleep_until(stop_by), if deadline.is_some() => {
                tracing::error!(tasks = tasks.len(), "shutdown: tasks still running after the drain timeout, abandoned");
                abandoned.fetch_add(tasks.len(), std::sync::atomic::Ordering::SeqCst);
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// After the drain timeout, how long consumers and the producer get to
/// close.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// While the broker is unreachable, asks it for metadata every second, so
/// that the link is seen up again even by a host with nothing to send.
async fn probe_while_down(publisher: Arc<KafkaPublisher>, link: BrokerLink, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if link.down().is_some() {
            let publisher = publisher.clone();
            let _ = tokio::task::spawn_blocking(move || publisher.probe(Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `host check` compiles without the manifest's cache: a cache_dir
    /// named by a manifest being checked is neither read nor created.
    #[test]
    fn check_never_touches_the_manifests_cache() {
        let root = std::env::temp_dir().join(format!("check-cache-{}", uuid::Uuid::new_v4().simple()));
        let wasm = crate::runtime::tests::wasm("payment");
        let text = format!(
            "[runtime]\ncache_dir = {cache:?}\nstate_dir = {state:?}\n[gateway]\nport = 1\norder_component = \"payment\"\n\
             [components.payment]\nwasm = {wasm:?}\nport = 2\ntopics = [\"payments\"]\ngroup = \"g\"\nvault = true\n\
             publishes = [\"payments:*\"]\n",
            cache = root.join("cache"),
            state = root.join("state"),
        );
        let manifest = Manifest::parse(&text).unwrap();
        check(&manifest).unwrap();
        assert!(!root.exists(), "check wrote {root:?}");
    }
}
