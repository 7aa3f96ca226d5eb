//! The load of a scale-out run: `EmailRequested` envelopes, one per
//! distinct order id (the Kafka key), produced as fast as the producer
//! takes them; and the counters read around it (the hosts' CPU and
//! `/health`, PostgreSQL's and the broker's CPU, the machine's).

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use shop_events::{EmailKind, EmailRequested, LineItem, types};
use shop_host::envelope::Envelope;
use tokio::time::Instant;

use super::fleet::{Fleet, HostHealth};
use crate::host::{MachineSample, Process, Processes};

/// Who the envelopes say produced them.
const PRODUCER: &str = "bench";

/// `count` `EmailRequested` events, as the order service emits them when
/// an order is confirmed.
///
/// # Errors
/// When an envelope cannot be serialized.
pub fn email_requests(count: usize) -> anyhow::Result<Vec<Envelope>> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    (0..count)
        .map(|_| {
            let order_id = uuid::Uuid::new_v4().to_string();
            let request = EmailRequested {
                order_id: order_id.clone(),
                kind: EmailKind::OrderConfirmed,
                to: "bench@example.com".into(),
                customer_name: "Bench".into(),
                items: vec![LineItem { sku: "bench-widget".into(), quantity: 1, unit_price_cents: 1250 }],
                total_cents: 1250,
                reason: None,
            };
            let data = serde_json::to_value(&request).context("failed to serialize an EmailRequested")?;
            Ok(Envelope::originate(types::EMAIL_REQUESTED, &order_id, PRODUCER, now_ms, data))
        })
        .collect()
}

/// A producer with the host's settings (idempotent, acks=all, linger 1 ms).
///
/// # Errors
/// When the client cannot be made.
pub fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    shop_host::kafka::producer_config(brokers)
        .set("client.id", "shop-bench-scale")
        .create()
        .context("failed to create the Kafka producer")
}

/// Produces `records` to `topic` as fast as the producer takes them and
/// returns how long until the last was acknowledged.
///
/// # Errors
/// When a record is refused or not delivered.
pub async fn produce(producer: &FutureProducer, topic: &str, records: Vec<Envelope>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut deliveries = FuturesUnordered::new();
    for event in &records {
        // A CloudEvent in binary mode, as the host writes it.
        let headers = event.headers(None).into_iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header { key: &key, value: Some(value.as_str()) })
        });
        let value = event.data.get();
        let mut record = FutureRecord::to(topic).key(&event.order_id).payload(value).headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((err, _)) => return Err(err).context("failed to produce a record"),
            }
        }
    }
    while let Some(delivery) = deliveries.next().await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(err).context("a record was not delivered"),
            Err(_) => anyhow::bail!("the producer went away before a delivery report"),
        }
    }
    Ok(start.elapsed())
}

/// Every counter at one moment.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Each host's CPU seconds.
    pub hosts_cpu_s: Vec<f64>,
    /// Each host's resident memory, in MiB.
    pub hosts_rss_mib: Vec<f64>,
    /// Every `postgres` process's CPU seconds (server, backends, reaped ones).
    pub postgres_cpu_s: f64,
    /// The Kafka broker's CPU seconds.
    pub broker_cpu_s: f64,
    /// The driver's own CPU seconds.
    pub driver_cpu_s: f64,
    pub machine: MachineSample,
    /// Each host's `/health`.
    pub health: Vec<HostHealth>,
}

impl Reading {
    /// Reads every counter now; `health` is read first, if not given.
    ///
    /// # Errors
    /// When a host is gone or `/proc` cannot be read.
    pub async fn take(fleet: &Fleet, health: Option<Vec<HostHealth>>) -> anyhow::Result<Self> {
        let health = match health {
            Some(health) => health,
            None => fleet.health().await?.into_iter().map(|(_, h)| h).collect(),
        };
        let hosts = fleet.pids().into_iter().map(|pid| Process::Pid(pid).sample()).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            hosts_cpu_s: hosts.iter().map(|s| s.cpu_s).collect(),
            hosts_rss_mib: hosts.iter().map(|s| s.rss_mib).collect(),
            postgres_cpu_s: Processes::Named("postgres").cpu_s()?,
            broker_cpu_s: Processes::CommandLine("kafka.Kafka").cpu_s()?,
            driver_cpu_s: Process::Myself.sample()?.cpu_s,
            machine: MachineSample::now()?,
            health,
        })
    }
}

/// Polls the hosts' `/health` every `every` until their `handled` adds up
/// to `events`; returns when the answers were in, and the health that did.
///
/// # Errors
/// When a host exits or `timeout` passes first.
pub async fn wait_handled(
    fleet: &mut Fleet,
    events: u64,
    every: Duration,
    timeout: Duration,
) -> anyhow::Result<(Instant, Vec<HostHealth>)> {
    let give_up = Instant::now() + timeout;
    let mut handled = 0;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        fleet.ensure_running()?;
        if let Ok(health) = fleet.health().await {
            handled = health.iter().map(|(_, h)| h.handled).sum::<u64>();
            if handled >= events {
                return Ok((Instant::now(), health.into_iter().map(|(_, h)| h).collect()));
            }
        }
        anyhow::ensure!(Instant::now() < give_up, "only {handled} of {events} events handled within {timeout:?}");
    }
}
