//! The app's topics read by a client of our own, never the host's: what
//! they held at a moment, and what each saga must look like on them, so
//! that a test sees a lost, doubled or garbled event the host would hide.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::message::Headers as _;

use super::eventually;

/// The app's topics under `prefix`: every topic a component of `app.toml`
/// consumes or may publish to, and the dead-letter topic.
pub fn app_topics(prefix: &str) -> Vec<String> {
    let app: toml::Table = std::fs::read_to_string(super::repo().join("app.toml")).unwrap().parse().unwrap();
    let mut topics = std::collections::BTreeSet::new();
    for settings in app["components"].as_table().unwrap().values() {
        let listed = |key: &str| settings.get(key).and_then(toml::Value::as_array).cloned().unwrap_or_default();
        topics.extend(listed("topics").iter().filter_map(|t| t.as_str().map(str::to_owned)));
        let granted = listed("publishes");
        topics.extend(granted.iter().filter_map(|g| Some(g.as_str()?.split_once(':')?.0.to_owned())));
    }
    let dead_letters = app.get("kafka").and_then(|k| k.get("dead_letter_topic")).and_then(toml::Value::as_str);
    topics.insert(dead_letters.unwrap_or("dead-letters").to_owned());
    topics.iter().map(|t| format!("{prefix}{t}")).collect()
}

/// Where a partition of a topic starts and ends at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    pub topic: String,
    pub partition: i32,
    /// The first offset still there.
    pub low: i64,
    /// The offset the next record will get.
    pub high: i64,
}

fn plain_consumer(brokers: &str) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Never joins it (partitions are assigned, not subscribed): only
        // there because some calls want one.
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// The watermarks of every partition of `topics` now.
pub fn watermarks(brokers: &str, topics: &[String]) -> Vec<Watermark> {
    use rdkafka::consumer::Consumer as _;
    let consumer = plain_consumer(brokers);
    let mut marks = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        for partition in metadata.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)).unwrap();
            marks.push(Watermark { topic: topic.clone(), partition: partition.id(), low, high });
        }
    }
    marks
}

/// Every event on the topics, read by a client of our own (not the host's).
#[derive(Debug, Default)]
pub struct Topics {
    /// Per order id, per event type, the distinct events by event id (the
    /// first copy's envelope).
    pub facts: BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>>,
    /// Records read, copies included.
    pub records: usize,
    /// The dead letters: reason and value.
    pub dead_letters: Vec<String>,
    /// Event ids seen with two different contents: one event id must
    /// always be the same event.
    pub conflicts: Vec<String>,
    /// Records that are not an envelope.
    pub undecodable: Vec<String>,
    /// Per order id, each record's event type and `traceparent` header,
    /// copies included.
    pub traceparents: BTreeMap<String, Vec<(String, Option<String>)>>,
}

impl Topics {
    /// The events of `order_id` of `event_type`, by event id.
    pub fn of(&self, order_id: &str, event_type: &str) -> BTreeMap<String, serde_json::Value> {
        self.facts.get(order_id).and_then(|f| f.get(event_type)).cloned().unwrap_or_default()
    }

    /// How many distinct events of `event_type` `order_id` has.
    pub fn count(&self, order_id: &str, event_type: &str) -> usize {
        self.facts.get(order_id).and_then(|f| f.get(event_type)).map_or(0, BTreeMap::len)
    }

    /// What is wrong beyond any one saga: events of an order that was not
    /// `placed`, an event id with two contents, a record that is not an
    /// envelope, and every dead letter.
    pub fn unexpected(&self, placed: impl Fn(&str) -> bool) -> Vec<String> {
        let strays = self.facts.iter().filter(|(id, _)| !placed(id));
        let mut wrong: Vec<String> =
            strays.map(|(id, facts)| format!("events of an order nobody placed: {id}: {:?}", facts.keys())).collect();
        wrong.extend(self.conflicts.iter().map(|c| format!("two contents for one event id: {c}")));
        wrong.extend(self.undecodable.iter().map(|u| format!("not an envelope: {u}")));
        wrong.extend(self.dead_letters.iter().map(|d| format!("dead letter: {d}")));
        wrong
    }

    fn add(&mut self, topic: &str, headers: &[(String, Vec<u8>)], value: &[u8]) {
        self.records += 1;
        let header =
            |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        if topic.ends_with("dead-letters") {
            let value = String::from_utf8_lossy(&value[..value.len().min(500)]).into_owned();
            self.dead_letters.push(format!("{:?}: {value}", header("dlq-reason")));
            return;
        }
        let traceparent = header("traceparent");
        let Some(envelope) = event_json(headers, value) else {
            self.undecodable.push(format!("{topic}: {headers:?} {}", String::from_utf8_lossy(value)));
            return;
        };
        let (Some(order), Some(event_type), Some(id)) =
            (envelope["order_id"].as_str(), envelope["type"].as_str(), envelope["id"].as_str())
        else {
            self.undecodable.push(format!("{topic}: {envelope}"));
            return;
        };
        let (order, event_type, id) = (order.to_owned(), event_type.to_owned(), id.to_owned());
        self.traceparents.entry(order.clone()).or_default().push((event_type.clone(), traceparent));
        let events = self.facts.entry(order).or_default().entry(event_type).or_default();
        match events.get(&id) {
            None => {
                events.insert(id, envelope);
            }
            Some(first) if same_event(first, &envelope) => {}
            Some(first) => self.conflicts.push(format!("event {id} on {topic}: {first} and then {envelope}")),
        }
    }
}

/// A record's headers.
pub fn headers_of<M: rdkafka::Message>(message: &M) -> Vec<(String, Vec<u8>)> {
    message.headers().map_or_else(Vec::new, |headers| {
        headers.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect()
    })
}

/// The CloudEvent of a record the host wrote (binary mode: `ce_*`
/// headers, the data as the value), read by a client of our own as JSON
/// with the attributes under the names the tests use: `id`, `type`,
/// `order_id` (the subject), `correlation_id`, `causation_id` (null when
/// absent), `time` (and `timestamp_ms`), `source` (and `producer`, the
/// source without `/shop/`) and `data`. `None` if the record is not one:
/// no `ce_specversion` 1.0, a required attribute missing, a content type
/// other than JSON or a value that is not JSON.
pub fn event_json(headers: &[(String, Vec<u8>)], value: &[u8]) -> Option<serde_json::Value> {
    let header =
        |name: &str| headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| String::from_utf8(v.clone()).ok());
    if header("ce_specversion").as_deref() != Some("1.0")
        || header("content-type").as_deref() != Some("application/json")
    {
        return None;
    }
    let data: serde_json::Value = serde_json::from_slice(value).ok()?;
    let time = time::OffsetDateTime::parse(&header("ce_time")?, &time::format_description::well_known::Rfc3339).ok()?;
    Some(serde_json::json!({
        "id": header("ce_id")?,
        "type": header("ce_type")?,
        "source": header("ce_source")?,
        "producer": header("ce_source")?.strip_prefix("/shop/")?,
        "order_id": header("ce_subject")?,
        "time": header("ce_time")?,
        "timestamp_ms": time.unix_timestamp_nanos() / 1_000_000,
        "correlation_id": header("ce_correlationid")?,
        "causation_id": header("ce_causationid"),
        "data": data,
    }))
}

/// Whether two copies of one event id are the same event. Outputs of a
/// component are published again byte for byte (from its outbox); an event
/// the gateway originates is stamped again when a client retries it after a
/// crash, so its time may differ, and nothing else.
fn same_event(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    if a["causation_id"].is_null() && b["causation_id"].is_null() {
        let unstamped = |v: &serde_json::Value| {
            let mut v = v.clone();
            v.as_object_mut().map(|o| (o.remove("time"), o.remove("timestamp_ms")));
            v
        };
        unstamped(a) == unstamped(b)
    } else {
        a == b
    }
}

/// Reads every record below `marks` (from [`watermarks`]) with a client of
/// our own: records written since are left out, so this is the topics as
/// they were when the marks were taken.
pub fn read_until(brokers: &str, marks: &[Watermark]) -> Topics {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = plain_consumer(brokers);
    let mut assignment = TopicPartitionList::new();
    let mut remaining: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for mark in marks.iter().filter(|m| m.high > m.low) {
        assignment.add_partition_offset(&mark.topic, mark.partition, Offset::Offset(mark.low)).unwrap();
        remaining.insert((mark.topic.clone(), mark.partition), mark.high);
    }
    let mut topics = Topics::default();
    if remaining.is_empty() {
        return topics;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !remaining.is_empty() {
        assert!(Instant::now() < deadline, "read {} records in 120 s, still to read: {remaining:?}", topics.records);
        let message = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => message,
            Some(Err(err)) => panic!("reading the topics: {err}"),
            None => continue,
        };
        let key = (message.topic().to_owned(), message.partition());
        let Some(&high) = remaining.get(&key) else { continue };
        if message.offset() >= high {
            continue;
        }
        topics.add(message.topic(), &headers_of(&message), message.payload().unwrap_or_default());
        if message.offset() + 1 >= high {
            remaining.remove(&key);
        }
    }
    topics
}

/// Every record now on the app's topics under `prefix` (up to their high
/// watermarks), read by a client of our own.
pub fn read_topics(brokers: &str, prefix: &str) -> Topics {
    read_until(brokers, &watermarks(brokers, &app_topics(prefix)))
}

/// The event types that end an order, and the status each one means.
pub const FINAL_EVENTS: [(&str, &str); 3] =
    [("OrderConfirmed", "CONFIRMED"), ("OrderRejected", "REJECTED"), ("OrderCancelled", "CANCELLED")];

/// What is wrong, on the topics, with the saga of `order_id`, whose order
/// service says it ended `status`: each step must be there exactly once,
/// each command must have exactly one answer, and the outcome, the email
/// and the payment's answer must agree with `status`.
pub fn saga_discrepancies(topics: &Topics, order_id: &str, status: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    let count = |t: &str| topics.count(order_id, t);
    for once in ["OrderPlaced", "PaymentRequested", "EmailRequested", "EmailSent"] {
        if count(once) != 1 {
            wrong.push(format!("{} × {once}", count(once)));
        }
    }
    let finals: Vec<&str> = FINAL_EVENTS.iter().flat_map(|(t, _)| std::iter::repeat_n(*t, count(t))).collect();
    let expected_final = FINAL_EVENTS.iter().find(|(_, s)| *s == status).map_or("?", |(t, _)| *t);
    if finals != [expected_final] {
        wrong.push(format!("final events {finals:?} for a {status} order"));
    }
    // Every command answered exactly once (answers name their command as
    // their cause), and no answer without its command.
    for (command, answers) in [
        ("PaymentRequested", &["PaymentAuthorized", "PaymentDeclined"][..]),
        ("PaymentRefundRequested", &["PaymentRefunded"][..]),
        ("PaymentVoidRequested", &["PaymentVoided"][..]),
    ] {
        let commands = topics.of(order_id, command);
        let answered: Vec<(String, serde_json::Value)> = answers.iter().flat_map(|a| topics.of(order_id, a)).collect();
        for id in commands.keys() {
            let n = answered.iter().filter(|(_, a)| a["causation_id"] == id.as_str()).count();
            if n != 1 {
                wrong.push(format!("{command} {id} has {n} answers"));
            }
        }
        let orphans = answered.iter().filter(|(_, a)| !commands.contains_key(a["causation_id"].as_str().unwrap_or("")));
        for (id, answer) in orphans {
            wrong.push(format!("answer {id} ({}) to no {command} of this order", answer["type"]));
        }
    }
    let (authorized, refunds, voids) =
        (count("PaymentAuthorized"), count("PaymentRefundRequested"), count("PaymentVoidRequested"));
    let fits = match status {
        "CONFIRMED" => authorized == 1 && refunds == 0 && voids == 0,
        "REJECTED" => count("PaymentDeclined") == 1 && refunds == 0 && voids == 0,
        // Out of stock after payment: refunded; no answer in time: voided.
        "CANCELLED" => (refunds > 0 && authorized == 1 && voids == 0) || (voids > 0 && refunds == 0),
        _ => false,
    };
    if !fits {
        wrong.push(format!("payment answers and compensations do not fit a {status} order"));
    }
    let kind = format!("order_{}", status.to_lowercase());
    let requested = topics.of(order_id, "EmailRequested");
    let sent = topics.of(order_id, "EmailSent");
    if requested.values().any(|e| e["data"]["kind"] != kind.as_str())
        || sent.values().any(|e| e["data"]["kind"] != kind.as_str())
    {
        wrong.push(format!("an email of another kind than {kind}"));
    }
    if sent.values().any(|e| !requested.contains_key(e["causation_id"].as_str().unwrap_or(""))) {
        wrong.push("an email sent that nobody requested".to_owned());
    }
    if !wrong.is_empty() {
        let facts: BTreeMap<&String, usize> =
            topics.facts.get(order_id).map(|f| f.iter().map(|(t, ids)| (t, ids.len())).collect()).unwrap_or_default();
        wrong.push(format!("events: {facts:?}"));
    }
    wrong
}

/// What is wrong with the payment ledger of an order of `total_cents`
/// (`GET /payments/{id}`) that ended `status`, whose request was answered
/// with `answer` on the topics: the request must have been decided exactly
/// once (a capture or a decline: a ledger holding only a void means the
/// request was never seen), and the money must match the outcome.
pub fn ledger_discrepancies(
    ledger: Option<&serde_json::Value>,
    status: &str,
    total_cents: u64,
    answer: Option<&str>,
) -> Vec<String> {
    let ops = |kind: &str| {
        ledger
            .and_then(|l| l["operations"].as_array())
            .map_or(0, |ops| ops.iter().filter(|op| op["kind"] == kind).count())
    };
    let field = |name: &str| ledger.and_then(|l| l[name].as_u64()).unwrap_or(0);
    let (captured, refunded) = (field("captured_cents"), field("refunded_cents"));
    let mut wrong = Vec::new();
    if ops("capture") + ops("decline") != 1 {
        wrong.push("not decided exactly once (no capture or decline, or more than one)");
    }
    let answered = match answer {
        Some("PaymentAuthorized") => ops("capture") == 1,
        Some("PaymentDeclined") => ops("decline") == 1,
        _ => false,
    };
    if !answered {
        wrong.push("does not match the payment's answer on the topics");
    }
    let money = match status {
        "CONFIRMED" => ops("refund") == 0 && captured == total_cents && refunded == 0,
        "REJECTED" => ops("capture") == 0 && captured == 0,
        "CANCELLED" => ops("refund") == ops("capture") && captured == refunded,
        _ => false,
    };
    if !money {
        wrong.push("the money does not match the outcome");
    }
    if wrong.is_empty() {
        Vec::new()
    } else {
        vec![format!("ledger of {status} order (total {total_cents}, answered {answer:?}): {wrong:?}: {ledger:?}")]
    }
}

/// The payment service's answer to an order's request on the topics.
pub fn payment_answer(topics: &Topics, order_id: &str) -> Option<&'static str> {
    ["PaymentAuthorized", "PaymentDeclined"].into_iter().find(|t| topics.count(order_id, t) > 0)
}

/// Waits until the app of `manifest` has handled everything on its topics:
/// every consumer group has committed the end of every partition it reads,
/// and the topics did not grow meanwhile (so no output of those records is
/// still on its way). Timers may still fire later; nothing else is coming.
pub async fn wait_caught_up(brokers: &str, manifest: &Path) {
    let app: toml::Table = std::fs::read_to_string(manifest).unwrap().parse().unwrap();
    let prefix = app["kafka"].get("topic_prefix").and_then(toml::Value::as_str).unwrap_or("").to_owned();
    let groups: Vec<(String, Vec<String>)> = app["components"]
        .as_table()
        .unwrap()
        .values()
        .map(|c| {
            let topics = c["topics"].as_array().unwrap().iter().map(|t| format!("{prefix}{}", t.as_str().unwrap()));
            (format!("{prefix}{}", c["group"].as_str().unwrap()), topics.collect())
        })
        .collect();
    let mut all: Vec<String> = groups.iter().flat_map(|(_, topics)| topics.clone()).collect();
    all.sort();
    all.dedup();
    eventually(Duration::from_secs(60), "every component to handle everything on its topics", || async {
        let before = watermarks(brokers, &all);
        for (group, topics) in &groups {
            let committed = committed_offsets(brokers, group, &before);
            let behind = before.iter().filter(|m| topics.contains(&m.topic)).any(|m| {
                let at = committed.get(&(m.topic.clone(), m.partition)).copied().flatten();
                m.high > m.low && at.is_none_or(|at| at < m.high)
            });
            if behind {
                return None;
            }
        }
        (watermarks(brokers, &all) == before).then_some(())
    })
    .await;
}

/// The offsets `group` has committed on the partitions of `marks` (`None`:
/// nothing committed there).
fn committed_offsets(brokers: &str, group: &str, marks: &[Watermark]) -> BTreeMap<(String, i32), Option<i64>> {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Only asks for the group's offsets: never subscribes, so never joins.
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for mark in marks {
        partitions.add_partition(&mark.topic, mark.partition);
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            (
                (e.topic().to_owned(), e.partition()),
                if let rdkafka::Offset::Offset(at) = e.offset() { Some(at) } else { None },
            )
        })
        .collect()
}

/// The headers of `event` in binary mode, as the host writes them.
pub fn ce_headers(event: &shop_host::envelope::Envelope) -> rdkafka::message::OwnedHeaders {
    event.header_bytes(None).into_iter().fold(rdkafka::message::OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(rdkafka::message::Header { key: &key, value: Some(&value) })
    })
}
