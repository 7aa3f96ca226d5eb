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
use crate::kafka::{self, ConsumerSettings, ConsumerStatus, EmbeddedBroker, KafkaPublisher};
use crate::manifest::{ComponentSettings, Manifest};
use crate::pipeline::{Pipeline, RetryPolicy, Topics};
use crate::runtime::{CanaryPolicy, Engine, Limits, LoadedComponent, ServiceRuntime, ServiceSpec};
use crate::state::{DurableStore, StateStore};

/// Compiles every component of the manifest against the world, serving nothing.
///
/// # Errors
/// The first component that does not load, by name.
pub fn check(manifest: &Manifest) -> anyhow::Result<()> {
    let engine = Engine::with_cache(Some(manifest.runtime.cache_dir.clone()))?;
    for (name, settings) in &manifest.components {
        LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
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
        },
        canary: CanaryPolicy { events: settings.canary_events, max_failures: settings.canary_max_failures },
    }
}

/// Runs the host until `shutdown` is cancelled, then stops consuming,
/// finishes in-flight events, commits offsets and closes every port.
///
/// # Errors
/// A component that does not load, a port that is taken, or a Kafka
/// cluster that cannot be reached at start.
pub async fn run(manifest: Manifest, brokers: Option<String>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = Engine::with_cache(Some(manifest.runtime.cache_dir.clone()))?;
    let mut services = BTreeMap::new();
    for (name, settings) in &manifest.components {
        let component =
            LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
        tracing::info!(component = %name, version = %component.sha256, wasm = ?settings.wasm, from_cache = component.from_cache, "loaded");
        let path = manifest.runtime.state_dir.join(format!("{name}.redb"));
        let store = DurableStore::open(&path).with_context(|| format!("component {name:?}"))?;
        let spec = service_spec(name, settings, component, Arc::new(store), clock.clone());
        services.insert(name.clone(), Arc::new(ServiceRuntime::new(engine.clone(), spec)));
    }

    let gateway_listener = bind(&manifest, manifest.gateway.port, "the gateway").await?;
    let admin_listener = match &manifest.admin.token {
        Some(_) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], manifest.admin.port));
            Some(TcpListener::bind(addr).await.with_context(|| format!("cannot bind {addr} for the admin API"))?)
        }
        None => {
            tracing::info!("admin API off: set HOST_ADMIN_TOKEN (or admin.token) to enable reloads");
            None
        }
    };
    let mut listeners = Vec::new();
    for (name, settings) in &manifest.components {
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
    let publisher = Arc::new(KafkaPublisher::connect(&brokers)?);

    // What was committed but not acknowledged before the last stop goes out
    // first, before anything new is handled.
    for (name, service) in &services {
        match crate::scheduler::relay(service, &*publisher, u64::MAX).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(component = %name, entries = n, "published the outbox left by the last run"),
            // Kept: the periodic relay tries again.
            Err(err) => tracing::error!(component = %name, "cannot publish the outbox left by the last run: {err:#}"),
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    for (name, listener) in listeners {
        let settings = &manifest.components[&name];
        let service = services[&name].clone();
        let status = ConsumerStatus::default();
        let retry = RetryPolicy { max_attempts: settings.max_attempts, ..RetryPolicy::default() };
        let pipeline = Arc::new(Pipeline::new(service.clone(), topics.clone(), retry, clock.clone()));
        let consumer = ConsumerSettings {
            brokers: brokers.clone(),
            group: format!("{}{}", topics.prefix, settings.group),
            topics: settings.topics.iter().map(|t| topics.physical(t)).collect(),
            instance_id: manifest.kafka.instance_id.as_ref().map(|id| format!("{id}-{name}")),
        };
        tasks.spawn(crate::scheduler::run(pipeline.clone(), publisher.clone(), clock.clone(), shutdown.clone()));
        tasks.spawn(kafka::run_supervised(pipeline, publisher.clone(), consumer, status.clone(), shutdown.clone()));
        if manifest.runtime.watch {
            let timing = crate::watch::WatchTiming::default();
            tasks.spawn(crate::watch::watch(service.clone(), settings.wasm.clone(), timing, shutdown.clone()));
        }
        let router = crate::http::component_app(service, status);
        tasks.spawn(serve(listener, router, shutdown.clone(), name));
    }
    let backend = Arc::new(crate::gateway_backend::GatewayBackend {
        publisher: publisher.clone(),
        orders_topic: topics.physical(shop_events::topics::ORDERS),
        orders: services[&manifest.gateway.order_component].clone(),
        clock,
    });
    tasks.spawn(serve(gateway_listener, gateway::app(backend), shutdown.clone(), "gateway".into()));
    if let (Some(listener), Some(token)) = (admin_listener, &manifest.admin.token) {
        let managed = services
            .iter()
            .map(|(name, service)| {
                let wasm = manifest.components[name].wasm.clone();
                (name.clone(), crate::admin::Managed { service: service.clone(), wasm })
            })
            .collect();
        tasks.spawn(serve(listener, crate::admin::admin_app(managed, token), shutdown.clone(), "admin".into()));
    }
    tracing::info!(gateway = manifest.gateway.port, brokers = %brokers, "host ready");

    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined {
            tracing::error!("task failed: {err}");
            shutdown.cancel();
        }
    }
    publisher.flush(Duration::from_secs(10));
    tracing::info!("host stopped");
    Ok(())
}

async fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken, name: String) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%name, %addr, "listening");
    if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(%name, "HTTP server failed: {err}");
    }
}
