//! Plain Kafka relays standing in for the four components: one consumer
//! group each, on the same topics, with the host's settings (offsets stored
//! only after the outputs were acknowledged; idempotent producer, acks=all,
//! linger.ms=1), emitting for each record what the real component emits.
//! No Wasm, no state, no envelope parsing: what the broker and librdkafka
//! alone cost. A driver keeps a window of orders in flight.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::topology::{Output, Topology};
use crate::manifest::Manifest;
use crate::stats::Percentiles;

/// Records in flight per relay, as the host's consumer allows.
const MAX_IN_FLIGHT: usize = 512;

/// How the relays are run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub brokers: String,
    /// Prefix of the relays' own topics and groups.
    pub prefix: String,
    /// One run per entry, in turn: orders in flight, and how long the
    /// driver keeps sending.
    pub runs: Vec<(usize, Duration)>,
    /// How long to wait for the last orders after sending stopped.
    pub drain: Duration,
    /// Records consumed per order, over every group: when an order is done.
    pub consumed_per_order: u32,
}

/// What the relays achieved in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Orders in flight.
    pub window: usize,
    pub orders_sent: u64,
    pub orders_completed: u64,
    /// First send to last completion.
    pub elapsed_s: f64,
    pub records_consumed: u64,
    pub records_produced: u64,
    pub orders_per_s: f64,
    pub records_consumed_per_s: f64,
    pub records_produced_per_s: f64,
    /// First record produced to the order's last record consumed.
    pub order_latency: Option<Percentiles>,
}

/// Orders in flight and what was counted.
struct Tracker {
    orders: Mutex<HashMap<String, (Instant, u32)>>,
    latencies: Mutex<Vec<Duration>>,
    last_done: Mutex<Option<Instant>>,
    expected: u32,
    window: Semaphore,
    completed: AtomicU64,
    consumed: AtomicU64,
    produced: AtomicU64,
}

impl Tracker {
    fn start(&self, key: &str) {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner).insert(key.to_owned(), (Instant::now(), 0));
    }

    /// One record of order `key` consumed and settled.
    fn consumed(&self, key: &str) {
        self.consumed.fetch_add(1, Ordering::Relaxed);
        let mut orders = self.orders.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((started, count)) = orders.get_mut(key) else { return };
        *count += 1;
        if *count >= self.expected {
            let latency = started.elapsed();
            orders.remove(key);
            drop(orders);
            self.latencies.lock().unwrap_or_else(PoisonError::into_inner).push(latency);
            *self.last_done.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            self.completed.fetch_add(1, Ordering::Relaxed);
            self.window.add_permits(1);
        }
    }

    fn in_flight(&self) -> usize {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Runs the relays and, for each of `settings.runs`, the driver; returns
/// what each run moved.
///
/// # Errors
/// When the topics cannot be created or a client cannot be made.
pub async fn run(settings: &Settings, manifest: &Manifest, topology: Arc<Topology>) -> anyhow::Result<Vec<Figures>> {
    let topics: Vec<String> = manifest.topics().iter().map(|t| format!("{}{t}", settings.prefix)).collect();
    shop_host::kafka::ensure_topics(&settings.brokers, &topics, manifest.kafka.partitions, 1).await?;
    // The host's own producer settings, so that the relay measures the same path.
    let producer: FutureProducer = shop_host::kafka::producer_config(&settings.brokers)
        .set("client.id", "shop-bench-relay")
        .create()
        .context("failed to create the Kafka producer")?;
    let tracker = Arc::new(Tracker {
        orders: Mutex::default(),
        latencies: Mutex::default(),
        last_done: Mutex::default(),
        expected: settings.consumed_per_order,
        window: Semaphore::new(0),
        completed: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        produced: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    let mut relays = tokio::task::JoinSet::new();
    let mut consumers = Vec::new();
    for (name, component) in &manifest.components {
        let consumer = Arc::new(consumer(settings, &component.group)?);
        let subscribed: Vec<String> = component.topics.iter().map(|t| format!("{}{t}", settings.prefix)).collect();
        let subscribed: Vec<&str> = subscribed.iter().map(String::as_str).collect();
        consumer.subscribe(&subscribed).with_context(|| format!("failed to subscribe to {subscribed:?}"))?;
        let partitions = component.topics.len() * usize::try_from(manifest.kafka.partitions).unwrap_or(1);
        consumers.push((consumer.clone(), partitions));
        let relay = Relay {
            name: name.clone(),
            prefix: settings.prefix.clone(),
            consumer,
            producer: producer.clone(),
            topology: topology.clone(),
            tracker: tracker.clone(),
        };
        relays.spawn(relay.run(stop.clone()));
    }
    wait_assigned(&consumers).await?;
    let mut figures = Vec::new();
    let mut first_key = 0;
    for &(window, duration) in &settings.runs {
        let run = measure(settings, &producer, &topology, &tracker, (window, duration), first_key).await;
        first_key += run.orders_sent;
        figures.push(run);
    }
    stop.cancel();
    while relays.join_next().await.is_some() {}
    Ok(figures)
}

/// One run: keeps `window` orders in flight for `duration`, numbering them
/// from `first_key`, waits up to `settings.drain` for the last ones, and
/// returns what moved meanwhile.
async fn measure(
    settings: &Settings,
    producer: &FutureProducer,
    topology: &Topology,
    tracker: &Tracker,
    (window, duration): (usize, Duration),
    first_key: u64,
) -> Figures {
    let before = (
        tracker.completed.load(Ordering::Relaxed),
        tracker.consumed.load(Ordering::Relaxed),
        tracker.produced.load(Ordering::Relaxed),
    );
    *tracker.last_done.lock().unwrap_or_else(PoisonError::into_inner) = None;
    tracker.window.add_permits(window);
    let start = Instant::now();
    let sent = drive(settings, producer, &topology.origin, tracker, first_key, start + duration).await;
    let give_up = Instant::now() + settings.drain;
    while tracker.in_flight() > 0 && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Orders left over (if any) keep their permits: the next run starts with fewer.
    tracker.window.forget_permits(window);
    let last = tracker.last_done.lock().unwrap_or_else(PoisonError::into_inner).unwrap_or(start);
    let elapsed = (last - start).as_secs_f64().max(1e-9);
    let completed = tracker.completed.load(Ordering::Relaxed) - before.0;
    let consumed = tracker.consumed.load(Ordering::Relaxed) - before.1;
    let produced = tracker.produced.load(Ordering::Relaxed) - before.2;
    let latencies = std::mem::take(&mut *tracker.latencies.lock().unwrap_or_else(PoisonError::into_inner));
    Figures {
        window,
        orders_sent: sent,
        orders_completed: completed,
        elapsed_s: elapsed,
        records_consumed: consumed,
        records_produced: produced,
        orders_per_s: completed as f64 / elapsed,
        records_consumed_per_s: consumed as f64 / elapsed,
        records_produced_per_s: produced as f64 / elapsed,
        order_latency: Percentiles::of(latencies),
    }
}

fn consumer(settings: &Settings, group: &str) -> anyhow::Result<StreamConsumer> {
    // The host's own consumer and offset settings.
    shop_host::kafka::consumer_config(&settings.brokers, &format!("{}{group}", settings.prefix))
        .set("client.id", "shop-bench-relay")
        .create()
        .context("failed to create the Kafka consumer")
}

/// Waits until every relay has all its partitions (a new group's first
/// rebalance takes seconds, which must not count against the relays).
async fn wait_assigned(consumers: &[(Arc<StreamConsumer>, usize)]) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let assigned = consumers.iter().all(|(c, want)| c.assignment().is_ok_and(|a| a.count() >= *want));
        if assigned {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < give_up, "the relays' consumer groups were not assigned within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Produces orders' first records while the window allows, until `until`.
async fn drive(
    settings: &Settings,
    producer: &FutureProducer,
    origin: &Output,
    tracker: &Tracker,
    first_key: u64,
    until: Instant,
) -> u64 {
    let topic = format!("{}{}", settings.prefix, origin.topic);
    let value = vec![b'x'; origin.bytes];
    let mut sent = 0u64;
    while Instant::now() < until {
        let Ok(Ok(permit)) = tokio::time::timeout_at(until, tracker.window.acquire()).await else { break };
        permit.forget();
        let key = format!("raw-{}", first_key + sent);
        tracker.start(&key);
        let headers = OwnedHeaders::new().insert(Header { key: "ce_type", value: Some(origin.event_type.as_str()) });
        let mut record = FutureRecord::to(&topic).key(&key).payload(&value).headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    drop(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => {
                    eprintln!("bench: driver: {err}");
                    return sent;
                }
            }
        }
        tracker.produced.fetch_add(1, Ordering::Relaxed);
        sent += 1;
    }
    sent
}

/// One component's stand-in.
struct Relay {
    name: String,
    prefix: String,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    topology: Arc<Topology>,
    tracker: Arc<Tracker>,
}

/// A consumed record whose outputs were acknowledged: where it was, its key.
type Settled = (String, i32, i64, String);

/// What a relay keeps of a consumed record.
struct Consumed {
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    /// From the `ce_type` header, as the host sets it.
    event_type: String,
}

impl Consumed {
    fn of(message: &BorrowedMessage<'_>) -> Self {
        let event_type = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_type").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            event_type,
        }
    }
}

impl Relay {
    async fn run(self, stop: CancellationToken) {
        let largest = self.topology.routes.values().flat_map(|r| r.values().flatten()).map(|o| o.bytes).max();
        let fill = vec![b'x'; largest.unwrap_or(0)];
        let mut pending: FuturesUnordered<BoxFuture<'static, Settled>> = FuturesUnordered::new();
        let mut progress = Progress::default();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some((topic, partition, offset, key)) = pending.next(), if !pending.is_empty() => {
                    if let Some(done) = progress.finish(&topic, partition, offset)
                        && let Err(err) = self.consumer.store_offset(&topic, partition, done)
                    {
                        eprintln!("bench: relay {}: offset not stored: {err}", self.name);
                    }
                    self.tracker.consumed(&key);
                }
                received = self.consumer.recv(), if pending.len() < MAX_IN_FLIGHT => match received {
                    Ok(message) => {
                        let consumed = Consumed::of(&message);
                        drop(message);
                        progress.start(&consumed.topic, consumed.partition, consumed.offset);
                        let forwarded = self.forward(consumed, &fill).await;
                        pending.push(forwarded);
                    }
                    Err(err) => eprintln!("bench: relay {}: {err}", self.name),
                },
            }
        }
    }

    /// Sends what the component emits for `consumed`; the future resolves
    /// once the broker acknowledged it all.
    async fn forward(&self, consumed: Consumed, fill: &[u8]) -> BoxFuture<'static, Settled> {
        let mut deliveries = Vec::new();
        for output in self.topology.outputs(&self.name, &consumed.event_type) {
            if let Some(delivery) = self.send(output, &consumed.key, &fill[..output.bytes]).await {
                deliveries.push(delivery);
            }
        }
        let tracker = self.tracker.clone();
        Box::pin(async move {
            for delivery in deliveries {
                if matches!(delivery.await, Ok(Ok(_))) {
                    tracker.produced.fetch_add(1, Ordering::Relaxed);
                }
            }
            (consumed.topic, consumed.partition, consumed.offset, consumed.key)
        })
    }

    async fn send(&self, output: &Output, key: &str, value: &[u8]) -> Option<rdkafka::producer::DeliveryFuture> {
        let topic = format!("{}{}", self.prefix, output.topic);
        let producer_name = format!("relay@{}", self.name);
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: "ce_type", value: Some(output.event_type.as_str()) })
            .insert(Header { key: "producer", value: Some(producer_name.as_str()) });
        let mut record = FutureRecord::to(&topic).key(key).payload(value).headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Some(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => {
                    eprintln!("bench: relay {}: {err}", self.name);
                    return None;
                }
            }
        }
    }
}

/// Offsets in flight per partition: what is below the lowest is done.
#[derive(Default)]
struct Progress {
    partitions: HashMap<(String, i32), (BTreeSet<i64>, i64)>,
}

impl Progress {
    fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let (in_flight, highest) = self.partitions.entry((topic.to_owned(), partition)).or_default();
        in_flight.insert(offset);
        *highest = (*highest).max(offset);
    }

    /// The offset to store once `offset` is done, if it moved.
    fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let (in_flight, highest) = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        let was_lowest = in_flight.first() == Some(&offset);
        in_flight.remove(&offset);
        was_lowest.then(|| in_flight.first().map_or(*highest, |lowest| lowest - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_waits_for_the_lowest_in_flight() {
        let mut progress = Progress::default();
        for offset in [5, 6, 7] {
            progress.start("t", 0, offset);
        }
        assert_eq!(progress.finish("t", 0, 6), None, "5 is not done");
        assert_eq!(progress.finish("t", 0, 5), Some(6));
        assert_eq!(progress.finish("t", 0, 7), Some(7));
        assert_eq!(progress.finish("t", 1, 7), None, "an unknown partition moves nothing");
    }
}
