//! The saga's record flow, learned from a real run: which records each
//! component emits for each record it consumes, and how big they are. Read
//! back from the run's own topics (each envelope names its producer and its
//! cause), so the raw relays move what a real order moves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::manifest::Manifest;

/// One record to produce: where, what, and how big its value is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Output {
    /// Logical topic.
    pub topic: String,
    pub event_type: String,
    /// Mean value size seen, in bytes.
    pub bytes: usize,
}

/// What an order sets moving.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    /// The record that starts an order (the gateway's `OrderPlaced`).
    pub origin: Output,
    /// `component → consumed event type → records it emits`.
    pub routes: BTreeMap<String, BTreeMap<String, Vec<Output>>>,
}

/// Records consumed and produced per order.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerOrder {
    /// Records consumed, summed over every consumer group.
    pub consumed: u32,
    /// Records produced, the origin included.
    pub produced: u32,
}

struct Seen {
    topic: String,
    envelope: shop_host::envelope::Envelope,
    bytes: usize,
}

/// What one handling emitted: `(logical topic, event type)` of each record.
type Emission = Vec<(String, String)>;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

impl Topology {
    /// Learns the flow from the first `sample` records of each of the run's
    /// topics (`prefix` + each logical topic of `manifest`).
    ///
    /// # Errors
    /// When the topics cannot be read, or hold no order to learn from.
    pub fn learn(brokers: &str, prefix: &str, manifest: &Manifest, sample: usize) -> anyhow::Result<Self> {
        let seen = read(brokers, prefix, &manifest.topics(), sample)?;
        let types: HashMap<&str, &str> =
            seen.iter().map(|s| (s.envelope.id.as_str(), s.envelope.event_type.as_str())).collect();
        let mut sizes: HashMap<(String, String), (usize, usize)> = HashMap::new();
        for s in &seen {
            let entry = sizes.entry((s.topic.clone(), s.envelope.event_type.clone())).or_default();
            *entry = (entry.0 + s.bytes, entry.1 + 1);
        }
        let mean = |topic: &str, event_type: &str| {
            sizes.get(&(topic.to_owned(), event_type.to_owned())).map_or(0, |(sum, n)| sum / (*n).max(1))
        };
        // What each handling emitted: (component, cause id) → outputs.
        let mut emitted: BTreeMap<(String, String), Emission> = BTreeMap::new();
        let mut origins: BTreeMap<(String, String), usize> = BTreeMap::new();
        for s in &seen {
            let producer = s.envelope.producer();
            let (component, hash) = producer.split_once('@').unwrap_or((producer, ""));
            match &s.envelope.causation_id {
                None if hash.is_empty() => {
                    *origins.entry((s.topic.clone(), s.envelope.event_type.clone())).or_default() += 1;
                }
                Some(cause) if types.contains_key(cause.as_str()) && component != "timer" => {
                    let outputs = emitted.entry((component.to_owned(), cause.clone())).or_default();
                    outputs.push((s.topic.clone(), s.envelope.event_type.clone()));
                }
                _ => {}
            }
        }
        let ((topic, event_type), _) =
            origins.into_iter().max_by_key(|(_, n)| *n).context("no order's first record found on the run's topics")?;
        let origin = Output { bytes: mean(&topic, &event_type), topic, event_type };
        // The most common emission per (component, consumed type).
        let mut patterns: BTreeMap<(String, String), BTreeMap<Emission, usize>> = BTreeMap::new();
        for ((component, cause), mut outputs) in emitted {
            outputs.sort();
            let cause_type = types.get(cause.as_str()).copied().unwrap_or_default().to_owned();
            *patterns.entry((component, cause_type)).or_default().entry(outputs).or_default() += 1;
        }
        let mut routes: BTreeMap<String, BTreeMap<String, Vec<Output>>> = BTreeMap::new();
        for ((component, cause_type), counts) in patterns {
            let Some((outputs, _)) = counts.into_iter().max_by_key(|(_, n)| *n) else { continue };
            let outputs = outputs.into_iter().map(|(topic, event_type)| Output {
                bytes: mean(&topic, &event_type),
                topic,
                event_type,
            });
            routes.entry(component).or_default().insert(cause_type, outputs.collect());
        }
        Ok(Self { origin, routes })
    }

    /// What `component` emits for a record of `event_type`.
    pub fn outputs(&self, component: &str, event_type: &str) -> &[Output] {
        self.routes.get(component).and_then(|r| r.get(event_type)).map_or(&[], Vec::as_slice)
    }

    /// Follows one order through the components subscribed to each topic.
    ///
    /// # Errors
    /// When the flow does not end (a cycle).
    pub fn per_order(&self, manifest: &Manifest) -> anyhow::Result<PerOrder> {
        let mut queue = VecDeque::from([&self.origin]);
        let mut per_order = PerOrder { consumed: 0, produced: 1 };
        while let Some(record) = queue.pop_front() {
            for component in manifest.subscribers(&record.topic) {
                per_order.consumed += 1;
                for output in self.outputs(component, &record.event_type) {
                    per_order.produced += 1;
                    queue.push_back(output);
                }
            }
            anyhow::ensure!(per_order.consumed < 10_000, "the learned flow never ends: {self:?}");
        }
        Ok(per_order)
    }
}

/// Reads up to `sample` records of each topic from its beginning.
fn read(brokers: &str, prefix: &str, topics: &[String], sample: usize) -> anyhow::Result<Vec<Seen>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "shop-bench")
        .set("group.id", format!("{prefix}bench-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create the Kafka consumer")?;
    // Each partition is read up to its end as of now, or until its topic
    // gave `sample` records.
    let mut assignment = TopicPartitionList::new();
    let mut open: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let physical = format!("{prefix}{topic}");
        let metadata = consumer
            .fetch_metadata(Some(&physical), METADATA_TIMEOUT)
            .with_context(|| format!("failed to read the metadata of {physical:?}"))?;
        for partition in metadata.topics().iter().filter(|t| t.error().is_none()).flat_map(|t| t.partitions()) {
            let (low, high) = consumer
                .fetch_watermarks(&physical, partition.id(), METADATA_TIMEOUT)
                .with_context(|| format!("failed to read the offsets of {physical:?}/{}", partition.id()))?;
            if high > low {
                assignment.add_partition_offset(&physical, partition.id(), Offset::Offset(low))?;
                open.insert((physical.clone(), partition.id()), high);
            }
        }
    }
    anyhow::ensure!(!open.is_empty(), "the run's topics ({prefix}*) hold no records");
    consumer.assign(&assignment).context("failed to assign the run's topics")?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut seen = Vec::new();
    let give_up = Instant::now() + READ_TIMEOUT;
    while !open.is_empty() && Instant::now() < give_up {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let physical = message.topic().to_owned();
                let count = counts.entry(physical.clone()).or_default();
                *count += 1;
                if *count >= sample {
                    open.retain(|(t, _), _| *t != physical);
                }
                let key = (physical.clone(), message.partition());
                if open.get(&key).is_some_and(|high| message.offset() + 1 >= *high) {
                    open.remove(&key);
                }
                let Some(envelope) = crate::topic::event_of(&message) else { continue };
                // What the record carries: its value and its headers (the
                // relays copy records of this size).
                let headers = envelope.headers(None).iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
                let value = message.payload().unwrap_or_default().len() + headers;
                let topic = physical.strip_prefix(prefix).unwrap_or(&physical).to_owned();
                seen.push(Seen { topic, envelope, bytes: value });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(err)) => eprintln!("bench: reading the run's topics: {err}"),
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(topic: &str, event_type: &str) -> Output {
        Output { topic: topic.into(), event_type: event_type.into(), bytes: 500 }
    }

    #[test]
    fn one_accepted_order_moves_thirteen_consumed_and_six_produced_records() {
        let manifest = Manifest::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml")).unwrap();
        let route = |pairs: &[(&str, Vec<Output>)]| -> BTreeMap<String, Vec<Output>> {
            pairs.iter().map(|(t, o)| ((*t).to_owned(), o.clone())).collect()
        };
        let routes = BTreeMap::from([
            (
                "order".to_owned(),
                route(&[
                    ("OrderPlaced", vec![output("payments", "PaymentRequested")]),
                    ("PaymentAuthorized", vec![output("emails", "EmailRequested"), output("orders", "OrderConfirmed")]),
                ]),
            ),
            ("payment".to_owned(), route(&[("PaymentRequested", vec![output("payments", "PaymentAuthorized")])])),
            ("email".to_owned(), route(&[("EmailRequested", vec![output("analytics", "EmailSent")])])),
        ]);
        let topology = Topology { origin: output("orders", "OrderPlaced"), routes };
        let per_order = topology.per_order(&manifest).unwrap();
        assert_eq!((per_order.consumed, per_order.produced), (13, 6));
        assert!(topology.outputs("analytics", "OrderPlaced").is_empty());
    }

    #[test]
    fn a_flow_that_never_ends_is_refused() {
        let manifest = Manifest::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml")).unwrap();
        let echo = BTreeMap::from([("OrderPlaced".to_owned(), vec![output("orders", "OrderPlaced")])]);
        let topology =
            Topology { origin: output("orders", "OrderPlaced"), routes: BTreeMap::from([("order".to_owned(), echo)]) };
        assert!(topology.per_order(&manifest).is_err());
    }
}
