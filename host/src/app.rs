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
use crate::kafka::{self, BrokerLink, ConsumerSettings, ConsumerStatus, EmbeddedBroker, KafkaPublisher};
use crate::manifest::{ComponentSettings, Manifest, StateBackend};
use crate::pipeline::{Pipeline, RetryPolicy, Topics};
use crate::runtime::{CanaryPolicy, Engine, Grants, Limits, LoadedComponent, ServiceRuntime, ServiceSpec};
use crate::state::{HostStore, PgStores, StateStore, TxnLimits};

/// What one host serves of the manifest: several hosts, each serving a
/// subset, share the work of one app through Kafka's consumer groups and
/// one PostgreSQL.
#[derive(Debug, Clone)]
pub struct Serving {
    /// Components this host runs (consumes for, serves the port of);
    /// `None`: all of the manifest's.
    pub components: Option<std::collections::BTreeSet<String>>,
    /// Whether this host serves the gateway.
    pub gateway: bool,
    /// Static group member id of this host; `None`: `kafka.instance_id`,
    /// else one of its own (see [`crate::instance`]).
    pub instance_id: Option<String>,
}

impl Default for Serving {
    fn default() -> Self {
        Self { components: None, gateway: true, instance_id: None }
    }
}

impl Serving {
    /// Whether this host runs component `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.components.as_ref().is_none_or(|c| c.contains(name))
    }

    /// Checks the selection against the manifest.
    ///
    /// # Errors
    /// An unknown component, nothing to serve, or a gateway that could not
    /// read the order component's state.
    pub fn validate(&self, manifest: &Manifest) -> anyhow::Result<()> {
        if let Some(components) = &self.components {
            if let Some(unknown) = components.iter().find(|c| !manifest.components.contains_key(*c)) {
                let known: Vec<&String> = manifest.components.keys().collect();
                anyhow::bail!("--components: no component named {unknown:?} in the manifest (it has {known:?})");
            }
            anyhow::ensure!(
                self.gateway || !components.is_empty(),
                "nothing to serve: --no-gateway and no --components"
            );
        }
        let order = &manifest.gateway.order_component;
        anyhow::ensure!(
            !self.gateway || self.runs(order) || manifest.state.backend == StateBackend::Postgres,
            "the gateway answers GET /order/{{id}} from the state of component {order:?}, which this host does not run: \
             with the redb backend that state is local to the host running {order:?}; serve it here (--components) or \
             use the postgres backend ([state] backend = \"postgres\")"
        );
        Ok(())
    }
}

/// Opens the store of each component in `names`.
fn open_stores(manifest: &Manifest, names: &[String]) -> anyhow::Result<BTreeMap<String, Arc<dyn StateStore>>> {
    let mut stores: BTreeMap<String, Arc<dyn StateStore>> = BTreeMap::new();
    match manifest.state.backend {
        StateBackend::Redb => {
            // One file for every component of the host: their commits share
            // its fsyncs. A component's file of an earlier version is taken over.
            let dir = &manifest.runtime.state_dir;
            let host = HostStore::open(&dir.join("host.redb")).context("state_dir")?;
            for name in names {
                host.adopt(name, &dir.join(format!("{name}.redb"))).with_context(|| format!("component {name:?}"))?;
                let store = host.component(name).with_context(|| format!("component {name:?}"))?;
                stores.insert(name.clone(), Arc::new(store));
            }
        }
        StateBackend::Postgres => {
            let Some(url) = manifest.state.url.as_deref().filter(|u| !u.is_empty()) else {
                anyhow::bail!(
                    "state.backend = \"postgres\" needs a database URL: set state.url or DATABASE_URL (`just postgres` starts one)"
                );
            };
            let shared = PgStores::connect(url, &manifest.state.schema)
                .context("state.backend = \"postgres\" (state.url or DATABASE_URL)")?;
            for name in names {
                stores.insert(name.clone(), Arc::new(shared.store(name)));
            }
        }
    }
    Ok(stores)
}

/// Compiles every component of the manifest against the world, serving nothing.
///
/// # Errors
/// The first component that does not load, by name.
pub fn check(manifest: &Manifest) -> anyhow::Result<()> {
    let engine = Engine::with_cache(Some(manifest.runtime.cache_dir.clone()))?;
    for (name, settings) in &manifest.components {
        let engine = engine.with_stack(settings.stack_kib << 10)?;
        let component =
            LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
        component.check_grants(&engine, settings.grants(name)?.wasi).with_context(|| format!("component {name:?}"))?;
    }
    Ok(())
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

fn service_spec(
    name: &str,
    settings: &ComponentSettings,
    component: LoadedComponent,
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    grants: Grants,
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        component,
        store,
        config: settings.config.clone(),
        clock,
        limits: Limits {
            timeout: Duration::from_millis(settings.timeout_ms),
            memory_bytes: settings.memory_mib * 1024 * 1024,
            instance_reuse: settings.instance_reuse,
            txn: TxnLimits {
                max_writes: settings.max_writes_per_call,
                max_bytes: settings.max_write_bytes_per_call,
                max_timers: settings.max_timers_per_call,
            },
            max_queries: settings.max_concurrent_queries,
            burst: Duration::from_millis(settings.cpu_burst_ms),
            cpu_percent: settings.cpu_percent,
        },
        canary: CanaryPolicy { events: settings.canary_events, max_failures: settings.canary_max_failures },
        grants,
    }
}

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
    let engine = Engine::with_cache(Some(manifest.runtime.cache_dir.clone()))?;
    // The components this host runs, and the gateway's order component,
    // which it may only query.
    let order = &manifest.gateway.order_component;
    let loaded: Vec<&String> =
        manifest.components.keys().filter(|name| serving.runs(name) || (serving.gateway && *name == order)).collect();
    let mut stores = {
        let manifest = manifest.clone();
        let names: Vec<String> = loaded.iter().map(|n| (*n).clone()).collect();
        // Connecting blocks (a database may take seconds to answer).
        tokio::task::spawn_blocking(move || open_stores(&manifest, &names)).await??
    };
    let mut services = BTreeMap::new();
    for name in loaded {
        let settings = &manifest.components[name];
        // The Wasm stack is an engine setting: one engine per stack size.
        let engine = engine.with_stack(settings.stack_kib << 10)?;
        let component =
            LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
        let grants = settings.grants(name)?;
        component.check_grants(&engine, grants.wasi).with_context(|| format!("component {name:?}"))?;
        tracing::info!(component = %name, version = %component.sha256, wasm = ?settings.wasm, from_cache = component.from_cache, "loaded");
        let store = stores.remove(name).context("store opened for every loaded component")?;
        let spec = service_spec(name, settings, component, store, clock.clone(), grants);
        services.insert(name.clone(), Arc::new(ServiceRuntime::new(engine.clone(), spec)));
    }
    let instance = crate::instance::resolve(&manifest, serving.instance_id.as_deref())?;
    tracing::info!(instance = %instance.id(), components = ?services.keys().filter(|n| serving.runs(n)).collect::<Vec<_>>(), gateway = serving.gateway, state = ?manifest.state.backend, "serving");

    let gateway_listener = match serving.gateway {
        true => Some(bind(&manifest, manifest.gateway.port, "the gateway").await?),
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
        listeners.push((name.clone(), bind(&manifest, settings.port, &format!("component {name:?}")).await?));
    }

    let topics =
        Topics { prefix: manifest.kafka.topic_prefix.clone(), dead_letter: manifest.kafka.dead_letter_topic.clone() };
    let physical: Vec<String> = manifest.logical_topics().iter().map(|t| topics.physical(t)).collect();
    let brokers = brokers.or_else(|| manifest.kafka.brokers.clone());
    let (_embedded, brokers) = match brokers {
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
    };
    let link = BrokerLink::default();
    let publisher = Arc::new(KafkaPublisher::connect(&brokers, link.clone())?);

    // What was committed but not acknowledged before the last stop goes out
    // first, before anything new is handled.
    // On a shared store, younger entries may be another live host's, being
    // published right now: the periodic relay takes them if they stay.
    let started_ms = match manifest.state.backend {
        StateBackend::Redb => clock.now_ms(),
        StateBackend::Postgres => clock.now_ms().saturating_sub(crate::scheduler::STALE_OUTBOX_MS),
    };
    for (name, service) in services.iter().filter(|(name, _)| serving.runs(name)) {
        let dead_letters = topics.physical(&topics.dead_letter);
        match crate::scheduler::relay(service, &*publisher, started_ms, &dead_letters).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(component = %name, entries = n, "published the outbox left by the last run"),
            // Kept: the periodic relay tries again.
            Err(err) => tracing::error!(component = %name, "cannot publish the outbox left by the last run: {err:#}"),
        }
    }

    let drain_timeout = Duration::from_millis(manifest.runtime.drain_timeout_ms);
    let abandoned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(probe_while_down(publisher.clone(), link.clone(), shutdown.clone()));
    // Timers are due once every consumer here has caught up, not counting
    // the broker's outages.
    let watermarks: BTreeMap<String, Watermark> =
        listeners.iter().map(|(name, _)| (name.clone(), Watermark::default())).collect();
    let outage_window = Duration::from_millis(manifest.runtime.deadline_outage_window_ms);
    let outage = Arc::new(OutageClock::new(clock.clone(), link.clone(), outage_window));
    let deadlines: Arc<dyn Clock> =
        Arc::new(DeadlineClock::new(outage.clone(), watermarks.values().cloned().collect()));
    for service in services.values() {
        service.set_deadline_clock(outage.clone());
    }
    let mut statuses = BTreeMap::new();
    let recent_orders = crate::admin::RecentOrders::default();
    for (name, listener) in listeners {
        let settings = &manifest.components[&name];
        let service = services[&name].clone();
        let status = ConsumerStatus::default();
        statuses.insert(name.clone(), status.clone());
        let retry = RetryPolicy { max_attempts: settings.max_attempts, ..RetryPolicy::default() };
        let pipeline = Arc::new(Pipeline::new(service.clone(), topics.clone(), retry, clock.clone()));
        pipeline.set_max_record_bytes(manifest.kafka.max_record_bytes);
        let metrics = Arc::new(crate::metrics::ComponentMetrics::new(service.clone(), status.clone(), link.clone()));
        pipeline.set_metrics(metrics.clone());
        service.stages().attach(metrics.stage_histograms());
        let consumer = ConsumerSettings {
            brokers: brokers.clone(),
            group: format!("{}{}", topics.prefix, settings.group),
            topics: settings.topics.iter().map(|t| topics.physical(t)).collect(),
            instance_id: Some(format!("{}-{name}", instance.id())),
            drain_timeout,
            link: link.clone(),
            watermark: watermarks[&name].clone(),
        };
        tasks.spawn(crate::scheduler::run(
            pipeline.clone(),
            publisher.clone(),
            clock.clone(),
            deadlines.clone(),
            shutdown.clone(),
        ));
        let consuming = kafka::run_supervised(pipeline, publisher.clone(), consumer, status.clone(), shutdown.clone());
        let abandoned = abandoned.clone();
        tasks.spawn(async move {
            if let Err(kafka::Abandoned(n)) = consuming.await {
                abandoned.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        });
        if manifest.runtime.watch {
            let timing = crate::watch::WatchTiming::default();
            tasks.spawn(crate::watch::watch(service.clone(), settings.wasm.clone(), timing, shutdown.clone()));
        }
        let router = crate::http::component_app(service, status, link.clone(), metrics);
        tasks.spawn(serve(listener, router, shutdown.clone(), name));
    }
    let mut gateway_publisher = None;
    if let Some(listener) = gateway_listener {
        // Its own producer: an order not acknowledged in time is answered
        // 503 and dropped, not sent later behind the client's back.
        let publish_timeout = Duration::from_millis(manifest.gateway.publish_timeout_ms);
        let orders = Arc::new(KafkaPublisher::connect_with_timeout(&brokers, link.clone(), publish_timeout)?);
        gateway_publisher = Some(orders.clone());
        let backend = crate::gateway_backend::GatewayBackend {
            publisher: orders,
            orders_topic: topics.physical(shop_events::topics::ORDERS),
            orders: services[&manifest.gateway.order_component].clone(),
            clock,
            link: link.clone(),
        };
        // Remembers the orders it takes, for the admin console.
        let backend = Arc::new(crate::admin::Recording::new(backend, recent_orders.clone()));
        let settings = gateway::Settings { publish_timeout, ..gateway::Settings::default() };
        let router = gateway::app_with(backend, settings);
        // A caller's trace context reaches the order it places.
        let router = router.layer(axum::middleware::from_fn(crate::traces::from_request));
        // Timed by matched route, and `/metrics` beside the gateway's own routes.
        let router = Arc::new(crate::metrics::GatewayMetrics::new(link.clone())).instrument(router);
        // With a header read timeout, which axum::serve cannot set.
        tasks.spawn(gateway::serve(listener, router, settings, shutdown.clone().cancelled_owned()));
    }
    if let (Some(listener), Some(token)) = (admin_listener, &manifest.admin.token) {
        let managed = services
            .iter()
            .map(|(name, service)| {
                let wasm = manifest.components[name].wasm.clone();
                let status = statuses.get(name).cloned();
                (name.clone(), crate::admin::Managed { service: service.clone(), wasm, status })
            })
            .collect();
        let log = crate::dlq::KafkaLog::new(&brokers, &topics.physical(&topics.dead_letter));
        let dead_letters = crate::dlq::DeadLetters::new(Arc::new(log), publisher.clone());
        let console = crate::admin::ConsoleSettings {
            recent: recent_orders,
            order_component: manifest.gateway.order_component.clone(),
            link: link.clone(),
        };
        let admin = crate::admin::admin_app_with_console(managed, token, Some(dead_letters), console);
        tasks.spawn(serve(listener, admin, shutdown.clone(), "admin".into()));
    }
    let gateway_port = serving.gateway.then_some(manifest.gateway.port);
    tracing::info!(gateway = ?gateway_port, brokers = %brokers, "host ready");

    // Until shutdown, a task that fails stops the host. From shutdown on,
    // every task has the drain timeout (and a few seconds to close) to end;
    // whatever is left then is abandoned.
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
    publisher.flush(CLOSE_GRACE);
    if let Some(orders) = gateway_publisher {
        orders.flush(CLOSE_GRACE);
    }
    drop(instance);
    let abandoned = abandoned.load(std::sync::atomic::Ordering::SeqCst);
    anyhow::ensure!(
        abandoned == 0,
        "stopped, abandoning {abandoned} records or tasks in flight (they will be delivered again)"
    );
    tracing::info!("host stopped");
    Ok(())
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

async fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken, name: String) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%name, %addr, "listening");
    if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(%name, "HTTP server failed: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(backend: &str) -> Manifest {
        let component = |name: &str, port: u16| {
            format!(
                "[components.{name}]\nwasm = \"{name}.wasm\"\nport = {port}\ntopics = [\"t\"]\ngroup = \"{name}\"\n"
            )
        };
        let text = format!(
            "[gateway]\nport = 1\n[state]\nbackend = \"{backend}\"\n{}{}",
            component("order", 2),
            component("payment", 3)
        );
        Manifest::parse(&text).unwrap()
    }

    fn serving(components: Option<&[&str]>, gateway: bool) -> Serving {
        let components = components.map(|c| c.iter().map(|n| (*n).to_owned()).collect());
        Serving { components, gateway, instance_id: None }
    }

    #[test]
    fn a_host_serves_a_subset_it_can_serve() {
        let redb = manifest("redb");
        assert!(serving(None, true).validate(&redb).is_ok());
        assert!(serving(Some(&["order"]), true).validate(&redb).is_ok());
        assert!(serving(Some(&["payment"]), false).validate(&redb).is_ok());
        let err = serving(Some(&["paymnet"]), true).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("no component named \"paymnet\""), "{err}");
        let err = serving(Some(&[]), false).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("nothing to serve"), "{err}");
        // A gateway without the order component needs the shared store.
        let err = serving(Some(&["payment"]), true).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("postgres"), "{err}");
        assert!(serving(Some(&[]), true).validate(&manifest("postgres")).is_ok(), "a gateway-only host");
        assert!(serving(Some(&["payment"]), true).runs("payment") && !serving(Some(&["payment"]), true).runs("order"));
    }
}
