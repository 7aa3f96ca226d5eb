//! Prometheus metrics, one registry per port: each component's port answers
//! `GET /metrics` with that component's series, the gateway's port with the
//! gateway's request latencies; every port adds whether the broker answers.
//! Scrape every port of a host, as with `/health`: nothing is reported twice.
//!
//! Counts the host keeps anyway (the consumer's, the store's, the version
//! history) are read at scrape time by collectors; what happens only on the
//! data path (failures, traps, rollbacks, stage latencies, request
//! latencies) is recorded as it happens.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::runtime::{CallError, HandleError, ServiceRuntime};
use crate::status::{BrokerLink, ConsumerStatus, Fault, Faults, Stage, StageHistograms};

/// Bucket bounds of stage latencies, in seconds: stages take from
/// microseconds (decode) to tens of milliseconds (an fsync, a publish).
const STAGE_BUCKETS: [f64; 17] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
];

/// Bucket bounds of HTTP request latencies, in seconds.
const HTTP_BUCKETS: [f64; 13] = [0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every stage, in the order of [`Stage`]'s discriminants.
const STAGES: [(Stage, &str); 8] = [
    (Stage::Decode, "decode"),
    (Stage::Dedup, "dedup"),
    (Stage::Instantiate, "instantiate"),
    (Stage::Call, "call"),
    (Stage::Validate, "validate"),
    (Stage::Commit, "commit"),
    (Stage::DurableWait, "durable_wait"),
    (Stage::Publish, "publish"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    component: String,
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

/// The metrics of one component's port.
pub struct ComponentMetrics {
    registry: Registry,
    component: String,
    faults: Faults,
    stages: StageHistograms,
}

impl std::fmt::Debug for ComponentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentMetrics").field("component", &self.component).finish_non_exhaustive()
    }
}

impl ComponentMetrics {
    /// The metrics of `service`, whose consumer reports to `status`.
    pub fn new(service: Arc<ServiceRuntime>, status: ConsumerStatus, link: BrokerLink) -> Self {
        let component = service.name().to_owned();
        let mut registry = Registry::default();
        let faults = Faults::new(&component);
        registry.register(
            "shop_events_failed",
            "Failed attempts at handling an event (each retry counts), by error",
            faults.failed.clone(),
        );
        registry.register(
            "shop_guest_traps",
            "Guest instances that trapped (handle and query), by kind",
            faults.traps.clone(),
        );
        registry.register(
            "shop_canary_rollbacks",
            "New versions rolled back by their canary watch",
            faults.rollbacks.clone(),
        );
        let latencies = Family::<StageLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(STAGE_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "shop_stage_duration_seconds",
            "Time spent in each stage of the data path (commit: per batch)",
            latencies.clone(),
        );
        let stages = StageHistograms(
            STAGES
                .map(|(_, stage)| latencies.get_or_create_owned(&StageLabels { component: component.clone(), stage })),
        );
        let tally = ReloadTally::new(&service);
        registry.register_collector(Box::new(ComponentCollector { service, status, tally: Mutex::new(tally) }));
        registry.register_collector(Box::new(BrokerCollector(link)));
        Self { registry, component, faults, stages }
    }

    /// The histograms [`crate::status::Stages`] feeds.
    pub fn stage_histograms(&self) -> StageHistograms {
        self.stages.clone()
    }

    /// The fault counters served here: the pipeline and the port count
    /// into them.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The Prometheus text of this port. Reads the store: call it off the
    /// async workers.
    ///
    /// # Errors
    /// Formatting failed (a bug).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// The `/metrics` route of this port.
    pub fn router(self: &Arc<Self>) -> Router {
        let metrics = self.clone();
        Router::new().route("/metrics", get(move || scrape(metrics.clone(), ComponentMetrics::encode)))
    }
}

/// A failed call as `shop_events_failed` (its `error`), `shop_guest_traps`
/// (its `kind`) and `shop_canary_rollbacks` count it.
impl Fault for CallError {
    fn error(&self) -> &'static str {
        match self {
            CallError::Handle(HandleError::Retryable(_)) => "retryable",
            CallError::Handle(HandleError::Permanent(_)) => "permanent",
            CallError::Trap(_) => "trap",
            CallError::Canary(_) | CallError::RolledBack(_) => "canary",
            CallError::Store(_) => "store",
            CallError::Throttled(_) => "throttled",
        }
    }

    fn trap(&self) -> Option<&'static str> {
        const TRAPPED: &str = "component trapped: ";
        let message = match self {
            CallError::Trap(message) => message.as_str(),
            // The watch keeps the failure's text only.
            CallError::Canary(message) | CallError::RolledBack(message) => match message.find(TRAPPED) {
                Some(at) => &message[at + TRAPPED.len()..],
                None => return None,
            },
            CallError::Handle(_) | CallError::Store(_) | CallError::Throttled(_) => return None,
        };
        Some(trap_kind(message))
    }

    fn rolled_back(&self) -> bool {
        matches!(self, CallError::RolledBack(_))
    }
}

/// The kind of a trap, from its message: a bounded label.
fn trap_kind(message: &str) -> &'static str {
    if message.contains("exceeded its time budget") {
        "timeout"
    } else if message.contains("call stack exhausted") {
        "stack_overflow"
    } else if message.contains("`unreachable` instruction") {
        // A guest panic or abort, including an allocation over its memory limit.
        "unreachable"
    } else if message.contains("out of bounds memory access") || message.contains("misaligned memory access") {
        "memory_access"
    } else {
        "other"
    }
}

/// Reloads counted from the version history, which keeps only its last
/// entries: those appended since the last scrape are found after the entry
/// seen last. More than the history keeps between two scrapes are missed.
#[derive(Debug, Default)]
struct ReloadTally {
    /// `(at_ms, sha256, source)` of the last entry counted.
    last: Option<(u64, String, String)>,
    accepted: u64,
    rejected: u64,
}

impl ReloadTally {
    /// Starts after the history `service` has now (its first load is no reload).
    fn new(service: &ServiceRuntime) -> Self {
        let mut tally = Self::default();
        tally.update(&service.history());
        tally.accepted = 0;
        tally.rejected = 0;
        tally
    }

    fn update(&mut self, history: &[crate::runtime::VersionRecord]) {
        let key = |r: &crate::runtime::VersionRecord| (r.at_ms, r.sha256.clone(), r.source.clone());
        let seen = self.last.as_ref().and_then(|last| history.iter().rposition(|r| key(r) == *last));
        let new = match seen {
            Some(at) => &history[at + 1..],
            None => history,
        };
        for record in new {
            match record.outcome.starts_with("rejected") {
                true => self.rejected += 1,
                false => self.accepted += 1,
            }
        }
        if let Some(last) = history.last() {
            self.last = Some(key(last));
        }
    }
}

/// What a component's port reads at scrape time.
struct ComponentCollector {
    service: Arc<ServiceRuntime>,
    status: ConsumerStatus,
    tally: Mutex<ReloadTally>,
}

impl std::fmt::Debug for ComponentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentCollector").field("component", &self.service.name()).finish_non_exhaustive()
    }
}

/// Encodes one series of a metric with only the `component` label.
fn one<M: prometheus_client::encoding::EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help): (&str, &str),
    component: &str,
    metric: &M,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(family.encode_family(&[("component", component)])?)
}

impl Collector for ComponentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let component = self.service.name();
        let consumer = self.status.snapshot();
        encode_consumer(&mut encoder, component, &consumer)?;
        self.encode_guest(&mut encoder, component)?;
        self.encode_state(&mut encoder, component)?;
        self.encode_versions(&mut encoder, component)
    }
}

impl ComponentCollector {
    /// The guest's series: the time its calls were held back, the log lines
    /// it had dropped and the changes its state quotas refused.
    fn encode_guest(&self, encoder: &mut DescriptorEncoder<'_>, component: &str) -> Result<(), std::fmt::Error> {
        let (slept, penalized) = self.service.throttle().totals();
        let throttled = [
            (
                "shop_guest_throttled_seconds",
                "Time calls past their burst were held back, to keep the component to its share of a core.",
                slept,
            ),
            (
                "shop_guest_fault_penalty_seconds",
                "Time the component's calls were held back to pay for the CPU of its faulty calls.",
                penalized,
            ),
        ];
        for (name, help, value) in throttled {
            one(encoder, (name, help), component, &ConstCounter::new(value.as_secs_f64()))?;
        }
        let quotas = self.service.quotas();
        let (name, help) = ("shop_guest_log_lines_dropped", "Log lines of the component dropped past its log quotas.");
        one(encoder, (name, help), component, &ConstCounter::new(quotas.log_lines_dropped()))?;
        let help = "Changes and events refused for going past one of the component's state quotas.";
        let mut family = encoder.encode_descriptor(
            "shop_guest_quota_refusals",
            help,
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (quota, refused) in crate::state::Quota::ALL.iter().zip(quotas.state.refusals()) {
            let labels = [("component", component), ("quota", quota.setting())];
            ConstCounter::new(refused).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The state store's series: whether it answered this scrape and, when
    /// it did, its pending timers, pending outbox entries and quarantined
    /// entries.
    fn encode_state(&self, encoder: &mut DescriptorEncoder<'_>, component: &str) -> Result<(), std::fmt::Error> {
        let store = self.service.state_store();
        let counts = (|| {
            Ok::<_, crate::state::StoreError>((store.timer_count()?, store.outbox_count()?, store.corrupt_entries()?))
        })();
        let readable = ("shop_state_up", "Whether the component's state store answered this scrape (1) or not (0).");
        one(encoder, readable, component, &ConstGauge::new(i64::from(counts.is_ok())))?;
        match counts {
            Ok((timers, outbox, corrupt)) => {
                let gauges = [
                    ("shop_timers_pending", "Timers set and not yet delivered.", timers),
                    ("shop_outbox_pending", "Committed outputs not yet acknowledged by the broker.", outbox),
                    (
                        "shop_state_corrupt_entries",
                        "Timer or outbox entries quarantined as undecodable.",
                        corrupt.count,
                    ),
                ];
                for (name, help, value) in gauges {
                    one(encoder, (name, help), component, &ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)))?;
                }
            }
            Err(err) => tracing::debug!(component, "metrics: state store not read: {err}"),
        }
        Ok(())
    }

    /// The versions' series: the reloads offered since start, by result, and
    /// the version serving.
    fn encode_versions(&self, encoder: &mut DescriptorEncoder<'_>, component: &str) -> Result<(), std::fmt::Error> {
        let (accepted, rejected) = {
            let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
            tally.update(&self.service.history());
            (tally.accepted, tally.rejected)
        };
        {
            let help = "Reloads offered since start, by result (accepted: it served; rejected: it did not load).";
            let mut family =
                encoder.encode_descriptor("shop_reloads", help, None, ConstCounter::new(0u64).metric_type())?;
            for (result, value) in [("accepted", accepted), ("rejected", rejected)] {
                ConstCounter::new(value)
                    .encode(family.encode_family(&[("component", component), ("result", result)])?)?;
            }
        }
        let version = self.service.current().sha256.clone();
        let help = "The version (wasm sha256) serving: always 1.";
        let mut family =
            encoder.encode_descriptor("shop_component_version", help, None, ConstGauge::new(0).metric_type())?;
        ConstGauge::new(1).encode(family.encode_family(&[("component", component), ("version", version.as_str())])?)
    }
}

/// The consumer's series: records by outcome, whether it runs, its lag,
/// and its hand-offs.
fn encode_consumer(
    encoder: &mut DescriptorEncoder<'_>,
    component: &str,
    consumer: &crate::status::StatusSnapshot,
) -> Result<(), std::fmt::Error> {
    let counters = [
        ("shop_events_handled", "Records handled by the component.", consumer.handled),
        ("shop_events_dead_lettered", "Records set aside on the dead-letter topic.", consumer.dead_lettered),
        ("shop_events_duplicates", "Records dropped as handled before (by event id).", consumer.duplicates_dropped),
    ];
    for (name, help, value) in counters {
        one(encoder, (name, help), component, &ConstCounter::new(value))?;
    }
    let consuming = ("shop_consumer_up", "Whether the component's consumer is running (1) or not (0).");
    one(encoder, consuming, component, &ConstGauge::new(i64::from(consumer.consuming)))?;
    {
        let help = "Records behind the end of each assigned partition (librdkafka statistics, every second).";
        let mut family =
            encoder.encode_descriptor("shop_consumer_lag", help, None, ConstGauge::new(0).metric_type())?;
        // -1: not known yet; left out rather than reported as a lag.
        for (tp, lag) in consumer.lag.iter().filter(|(_, lag)| **lag >= 0) {
            let (topic, partition) = tp.rsplit_once('/').unwrap_or((tp.as_str(), ""));
            let labels = [("component", component), ("topic", topic), ("partition", partition)];
            ConstGauge::new(*lag).encode(family.encode_family(&labels)?)?;
        }
    }
    let help = "Times the consumer left its group because the state store did not answer (left), and joined it again once it did (rejoined).";
    let mut family =
        encoder.encode_descriptor("shop_consumer_handoffs", help, None, ConstCounter::new(0u64).metric_type())?;
    for (transition, value) in [("left", consumer.handoffs), ("rejoined", consumer.rejoins)] {
        ConstCounter::new(value)
            .encode(family.encode_family(&[("component", component), ("transition", transition)])?)?;
    }
    Ok(())
}

/// Whether the broker answers, as every `/health` reports it.
#[derive(Debug)]
struct BrokerCollector(BrokerLink);

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let up = ConstGauge::new(i64::from(self.0.down().is_none()));
        let help = "Whether the host reaches the Kafka broker (1) or every client lost it (0).";
        up.encode(encoder.encode_descriptor("shop_broker_up", help, None, up.metric_type())?)
    }
}

/// The metrics of the gateway's port: request latency by route, method and
/// status.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram>,
}

impl GatewayMetrics {
    /// Empty metrics, reporting `link`.
    pub fn new(link: BrokerLink) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(HTTP_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "shop_http_request_duration_seconds",
            "Gateway requests until the response head, by matched route, method and status",
            requests.clone(),
        );
        registry.register_collector(Box::new(BrokerCollector(link)));
        Self { registry, requests }
    }

    /// Records one request.
    fn observe(&self, route: String, method: &Method, status: u16, elapsed: Duration) {
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            Method::PATCH => "PATCH",
            _ => "other",
        };
        self.requests.get_or_create(&RequestLabels { route, method, status }).observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text of the gateway's port.
    ///
    /// # Errors
    /// Formatting failed (a bug).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// `router` timed by route (its matched path pattern: `/order/{id}`,
    /// never the id; `unmatched` for the fallback), plus `GET /metrics`,
    /// which is not timed.
    pub fn instrument(self: &Arc<Self>, router: Router) -> Router {
        let timed = router.layer(axum::middleware::from_fn_with_state(self.clone(), time_request));
        let metrics = self.clone();
        timed.route("/metrics", get(move || scrape(metrics.clone(), GatewayMetrics::encode)))
    }
}

async fn time_request(State(metrics): State<Arc<GatewayMetrics>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe(route, &method, response.status().as_u16(), started.elapsed());
    response
}

/// Answers a scrape with `encode(metrics)`, run on a blocking thread (a
/// collector may wait for a database).
async fn scrape<M: Send + Sync + 'static>(
    metrics: Arc<M>,
    encode: fn(&M) -> Result<String, std::fmt::Error>,
) -> Response {
    let content_type = [(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)];
    match tokio::task::spawn_blocking(move || encode(&metrics)).await {
        Ok(Ok(text)) => (content_type, text).into_response(),
        Ok(Err(_)) | Err(_) => {
            tracing::error!("metrics could not be encoded");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests;
