//! Dead letters you can act on: read the dead-letter topic into
//! [`DeadLetter`]s (who set each aside, which version, from where, why, how
//! many attempts), and replay them to the topic they came from, so that the
//! normal consumer path handles them again and dedup by event id keeps
//! their effects once. Shared by `host dlq` and the admin API.
//!
//! A dead letter's id is its `partition/offset` on the dead-letter topic.
//! A replay is remembered by a small marker record appended to the same
//! topic (header `dlq-replay-of: ID`, no `dlq-reason`), written once the
//! replayed record is acknowledged: `list` shows it, and `replay --all`
//! skips it.
//!
//! A replay goes only to a topic of the app (one a component consumes or
//! is granted to publish to): the `dlq-source` and `dlq-target-topic`
//! headers are data anyone able to write the dead-letter topic controls,
//! so they cannot send a record anywhere else.

mod log;
mod time;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use crate::bus::{Outbound, Publisher};

pub use log::{DeadLetterLog, KafkaLog, MemoryLog};
pub use time::{format_rfc3339, parse_since};

/// Header of a replay marker: the id of the dead letter it replayed.
pub const REPLAY_OF: &str = "dlq-replay-of";
/// Header a replayed record carries: the dead letter it was replayed from
/// (`TOPIC/PARTITION/OFFSET` on the dead-letter topic). Not `dlq-` prefixed,
/// so that it stays on the record if it is dead-lettered again.
pub const REPLAYED_FROM: &str = "replayed-from";

/// Where a dead letter is on the dead-letter topic: its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeadLetterId {
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.partition, self.offset)
    }
}

impl std::str::FromStr for DeadLetterId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid dead-letter id {text:?}: expected PARTITION/OFFSET, e.g. 0/42");
        let (partition, offset) = text.trim().split_once('/').ok_or_else(invalid)?;
        let partition: i32 = partition.parse().map_err(|_| invalid())?;
        let offset: i64 = offset.parse().map_err(|_| invalid())?;
        if partition < 0 || offset < 0 {
            return Err(invalid());
        }
        Ok(Self { partition, offset })
    }
}

impl Serialize for DeadLetterId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A record as read from the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp (ms since the Unix epoch), if the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RawRecord {
    fn id(&self) -> DeadLetterId {
        DeadLetterId { partition: self.partition, offset: self.offset }
    }

    fn header(&self, name: &str) -> Option<String> {
        // The last one wins: a header added by the host follows any copy of
        // the same name the record brought along.
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Where a dead letter came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A record the component consumed (`dlq-source`); physical topic.
    Topic { topic: String, partition: i32, offset: i64 },
    /// An output the broker refused for good (`dlq-target-topic`).
    Output { target_topic: String, source_event: Option<String> },
    /// A due timer's event: the scheduler fires the timer again by itself.
    Timer,
    /// No header says where it came from.
    Unknown,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Topic { topic, partition, offset } => write!(f, "{topic}/{partition}/{offset}"),
            Self::Output { target_topic, .. } => write!(f, "output->{target_topic}"),
            Self::Timer => f.write_str("timer"),
            Self::Unknown => f.write_str("?"),
        }
    }
}

/// When and by which marker a dead letter was replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replay {
    /// Id of the marker record on the dead-letter topic.
    pub marker: DeadLetterId,
    pub timestamp_ms: Option<i64>,
}

/// One dead letter, with what its `dlq-*` headers say.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: DeadLetterId,
    /// When it was set aside (ms since the Unix epoch).
    pub timestamp_ms: Option<i64>,
    /// The component that set it aside.
    pub component: String,
    /// That component's version (sha256), when the host recorded it.
    pub version: Option<String>,
    pub origin: Origin,
    /// Attempts made before it was set aside.
    pub attempts: Option<u32>,
    pub reason: String,
    /// Id and type of the event in the record, if its value is an envelope.
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    /// Full length of a value cut to fit the dead-letter topic.
    pub truncated_from: Option<u64>,
    /// The dead letter this record was itself replayed from, if any.
    pub replayed_from: Option<String>,
    /// Set once it was replayed.
    pub replayed: Option<Replay>,
    #[serde(skip)]
    record: RawRecord,
}

impl DeadLetter {
    /// Reads a dead letter from a record; `None` for a replay marker.
    fn parse(record: RawRecord) -> Option<Self> {
        if record.header("dlq-reason").is_none() && record.header(REPLAY_OF).is_some() {
            return None;
        }
        let origin = match (record.header("dlq-source"), record.header("dlq-target-topic")) {
            (Some(source), _) => parse_source(&source),
            (None, Some(target_topic)) => {
                Origin::Output { target_topic, source_event: record.header("dlq-source-event") }
            }
            (None, None) => Origin::Unknown,
        };
        // The event's id and type: binary mode's headers, else the value's
        // fields (structured mode, the version-1 envelope), else the
        // version-1 `event-type` header; a value cut to fit is not parsed.
        let envelope: Option<serde_json::Value> = match record.header("ce_id") {
            Some(_) => None,
            None => record.value.as_deref().and_then(|value| serde_json::from_slice(value).ok()),
        };
        let field = |name: &str| envelope.as_ref().and_then(|e| e.get(name)?.as_str().map(str::to_owned));
        Some(Self {
            id: record.id(),
            timestamp_ms: record.timestamp_ms,
            component: record.header("dlq-component").unwrap_or_default(),
            version: record.header("dlq-version"),
            origin,
            attempts: record.header("dlq-attempts").and_then(|a| a.parse().ok()),
            reason: record.header("dlq-reason").unwrap_or_default(),
            event_id: record.header("ce_id").or_else(|| field("id")),
            event_type: record.header("ce_type").or_else(|| field("type")).or_else(|| record.header("event-type")),
            truncated_from: record.header("dlq-truncated").and_then(|t| t.parse().ok()),
            replayed_from: record.header(REPLAYED_FROM),
            replayed: None,
            record,
        })
    }

    /// The record the component consumed and set aside, as it was (minus
    /// the dead-letter headers); `None` for an output or a timer, or a
    /// value cut to fit the dead-letter topic.
    pub fn original(&self) -> Option<crate::bus::Inbound> {
        let Origin::Topic { topic, partition, offset } = &self.origin else { return None };
        if self.truncated_from.is_some() {
            return None;
        }
        Some(crate::bus::Inbound {
            topic: topic.clone(),
            partition: *partition,
            offset: *offset,
            key: self.record.key.clone(),
            value: self.record.value.clone(),
            headers: self.record.headers.iter().filter(|(k, _)| !k.starts_with("dlq-")).cloned().collect(),
        })
    }

    /// The topic a replay goes to, or why it cannot be replayed.
    pub fn destination(&self) -> Result<&str, String> {
        if let Some(length) = self.truncated_from {
            return Err(format!(
                "its value was cut to fit the dead-letter topic ({} of {length} bytes kept, dlq-truncated): \
                 replaying it would feed a partial record; republish the original from {} instead",
                self.record.value.as_ref().map_or(0, Vec::len),
                self.origin
            ));
        }
        match &self.origin {
            Origin::Topic { topic, .. } => Ok(topic),
            Origin::Output { target_topic, .. } => Ok(target_topic),
            Origin::Timer => Err("a timer's event is not replayed: the scheduler fires a timer whose event was \
                 dead-lettered again a minute later, until it succeeds"
                .to_owned()),
            Origin::Unknown => Err("it names no source (no dlq-source or dlq-target-topic header)".to_owned()),
        }
    }

    /// The original record to publish again: key, value and headers, minus
    /// the dead-letter headers, plus [`REPLAYED_FROM`].
    fn replay_record(&self, topic: &str, dead_letter_topic: &str) -> Outbound {
        let mut headers: Vec<(String, Vec<u8>)> =
            self.record.headers.iter().filter(|(k, _)| !k.starts_with("dlq-") && k != REPLAYED_FROM).cloned().collect();
        headers.push((REPLAYED_FROM.to_owned(), format!("{dead_letter_topic}/{}", self.id).into_bytes()));
        let key = self.record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        Outbound { topic: topic.to_owned(), key, value: self.record.value.clone().unwrap_or_default(), headers }
    }

    /// The marker remembering that this dead letter was replayed to `topic`.
    fn marker(&self, topic: &str, dead_letter_topic: &str) -> Outbound {
        Outbound {
            topic: dead_letter_topic.to_owned(),
            key: self.id.to_string(),
            value: Vec::new(),
            headers: vec![
                (REPLAY_OF.to_owned(), self.id.to_string().into_bytes()),
                ("dlq-component".to_owned(), self.component.clone().into_bytes()),
                ("dlq-replayed-to".to_owned(), topic.as_bytes().to_vec()),
            ],
        }
    }
}

/// `TOPIC/PARTITION/OFFSET` (the topic itself never holds a `/`); a
/// negative partition is a timer's.
fn parse_source(source: &str) -> Origin {
    let mut parts = source.rsplitn(3, '/');
    let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
        return Origin::Unknown;
    };
    match (partition.parse::<i32>(), offset.parse::<i64>()) {
        (Ok(partition), _) if partition < 0 || topic == crate::pipeline::TIMER_TOPIC => Origin::Timer,
        (Ok(partition), Ok(offset)) => Origin::Topic { topic: topic.to_owned(), partition, offset },
        _ => Origin::Unknown,
    }
}

/// The dead letters of a topic's records, in id order, each marked with
/// its replay if a marker names it.
pub fn collate(records: Vec<RawRecord>) -> Vec<DeadLetter> {
    let mut replays: BTreeMap<DeadLetterId, Replay> = BTreeMap::new();
    let mut letters = Vec::new();
    for record in records {
        let marker = (record.id(), record.timestamp_ms, record.header(REPLAY_OF));
        match DeadLetter::parse(record) {
            Some(letter) => letters.push(letter),
            None => {
                let (id, timestamp_ms, of) = marker;
                if let Some(of) = of.and_then(|of| of.parse::<DeadLetterId>().ok()) {
                    // The first marker is the replay; a later one (two
                    // replays racing) changes nothing.
                    replays.entry(of).or_insert(Replay { marker: id, timestamp_ms });
                }
            }
        }
    }
    letters.sort_by_key(|l| l.id);
    for letter in &mut letters {
        letter.replayed = replays.remove(&letter.id);
    }
    letters
}

/// Which dead letters `list` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only those set aside by this component.
    pub component: Option<String>,
    /// Only those set aside at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
}

impl Filter {
    /// Whether `letter` passes.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.component.as_ref().is_none_or(|c| *c == letter.component)
            && self.since_ms.is_none_or(|since| letter.timestamp_ms.is_some_and(|t| t >= since))
    }
}

/// Which dead letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These, if each can be (and, with a component, is that component's).
    Ids { ids: Vec<DeadLetterId>, component: Option<String> },
    /// Every one of the component's not replayed yet.
    All { component: String },
}

impl Selection {
    /// From the options of `host dlq replay` and the admin API's body.
    ///
    /// # Errors
    /// Neither or both of ids and `all`, `all` without a component, or an
    /// id that does not parse.
    pub fn new(ids: &[String], all: bool, component: Option<String>) -> Result<Self, String> {
        let component = component.filter(|c| !c.is_empty());
        match (ids.is_empty(), all, component) {
            (true, false, _) => Err("name the dead letters to replay (ids) or all of a component's (all)".into()),
            (false, true, _) => Err("give either ids or all, not both".into()),
            (true, true, None) => {
                Err("replaying all needs a component: the one whose fixed version should see them again".into())
            }
            (true, true, Some(component)) => Ok(Self::All { component }),
            (false, false, component) => {
                let ids = ids.iter().map(|id| id.parse()).collect::<Result<_, _>>()?;
                Ok(Self::Ids { ids, component })
            }
        }
    }
}

/// A dead letter that was not replayed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub id: DeadLetterId,
    pub reason: String,
}

/// A dead letter replayed, and where to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replayed {
    pub id: DeadLetterId,
    pub topic: String,
    pub event_id: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub replayed: Vec<Replayed>,
    /// Dead letters selected that cannot be replayed (with `all`, those
    /// already replayed are left out silently).
    pub refused: Vec<Refusal>,
}

/// Whether `letter` may be replayed: `Ok`, `Err` with why not, or `None`
/// to leave it out silently (replayed before, and not named explicitly).
fn check(letter: &DeadLetter, explicit: bool) -> Option<Result<(), String>> {
    match (&letter.replayed, letter.destination()) {
        (Some(replay), _) if explicit => Some(Err(format!(
            "already replayed (marker {}{})",
            replay.marker,
            replay.timestamp_ms.map(|t| format!(" at {}", format_rfc3339(t))).unwrap_or_default()
        ))),
        (Some(_), _) => None,
        (None, Err(why)) => Some(Err(why)),
        (None, Ok(_)) => Some(Ok(())),
    }
}

/// The dead letters `selection` replays, in dead-letter order, and those
/// it refuses.
pub fn plan<'a>(letters: &'a [DeadLetter], selection: &Selection) -> (Vec<&'a DeadLetter>, Vec<Refusal>) {
    let mut chosen = Vec::new();
    let mut refused = Vec::new();
    let candidates: Vec<(DeadLetterId, Option<&DeadLetter>, bool)> = match selection {
        Selection::All { component } => {
            letters.iter().filter(|l| l.component == *component).map(|l| (l.id, Some(l), false)).collect()
        }
        Selection::Ids { ids, .. } => {
            let unique: std::collections::BTreeSet<DeadLetterId> = ids.iter().copied().collect();
            unique.into_iter().map(|id| (id, letters.iter().find(|l| l.id == id), true)).collect()
        }
    };
    let wanted = match selection {
        Selection::Ids { component: Some(component), .. } => Some(component),
        _ => None,
    };
    for (id, letter, explicit) in candidates {
        let verdict = match letter {
            None => Some(Err("no dead letter with this id".to_owned())),
            Some(l) if wanted.is_some_and(|c| *c != l.component) => {
                Some(Err(format!("set aside by {:?}, not {:?}", l.component, wanted.map_or("", String::as_str))))
            }
            Some(l) => check(l, explicit),
        };
        match (verdict, letter) {
            (Some(Ok(())), Some(l)) => chosen.push(l),
            (Some(Err(reason)), _) => refused.push(Refusal { id, reason }),
            _ => {}
        }
    }
    (chosen, refused)
}

/// The physical topics a replay may go to: those the manifest's components
/// consume or are granted to publish to (`publishes`), never the
/// dead-letter topic itself.
pub fn replay_topics(manifest: &crate::manifest::Manifest) -> BTreeSet<String> {
    let prefix = &manifest.kafka.topic_prefix;
    let consumed = manifest.components.values().flat_map(|c| c.topics.iter().map(String::as_str));
    let published = manifest
        .components
        .values()
        .flat_map(|c| c.publishes.iter().flatten())
        .filter_map(|entry| entry.split_once(':').map(|(topic, _)| topic));
    consumed
        .chain(published)
        .filter(|topic| *topic != manifest.kafka.dead_letter_topic)
        .map(|topic| format!("{prefix}{topic}"))
        .collect()
}

/// Lists and replays the dead letters of one dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    log: Arc<dyn DeadLetterLog>,
    publisher: Arc<dyn Publisher>,
    allowed: Arc<BTreeSet<String>>,
}

impl DeadLetters {
    /// Reads from `log`; replays through `publisher` (the host's
    /// idempotent producer) to the physical topics in `allowed` only (see
    /// [`replay_topics`]).
    pub fn new(log: Arc<dyn DeadLetterLog>, publisher: Arc<dyn Publisher>, allowed: BTreeSet<String>) -> Self {
        Self { log, publisher, allowed: Arc::new(allowed) }
    }

    /// Reads physical `topic` on `brokers` and replays through an
    /// idempotent producer of the host's configuration, to `allowed` only.
    ///
    /// # Errors
    /// When librdkafka rejects the configuration.
    pub fn connect(brokers: &str, topic: &str, allowed: BTreeSet<String>) -> anyhow::Result<Self> {
        let publisher = crate::kafka::KafkaPublisher::connect(brokers, crate::status::BrokerLink::default())?;
        Ok(Self::new(Arc::new(KafkaLog::new(brokers, topic)), Arc::new(publisher), allowed))
    }

    /// The physical dead-letter topic.
    pub fn topic(&self) -> &str {
        self.log.topic()
    }

    async fn read(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let log = self.log.clone();
        // Reading blocks (a consumer polling to the end of the topic).
        let records = tokio::task::spawn_blocking(move || log.read()).await??;
        Ok(collate(records))
    }

    /// The dead letters that pass `filter`, in id order.
    ///
    /// # Errors
    /// The dead-letter topic could not be read to its end.
    pub async fn list(&self, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(self.read().await?.into_iter().filter(|l| filter.matches(l)).collect())
    }

    /// Publishes the selected dead letters' records to the topics they came
    /// from, in dead-letter order; once the broker acknowledged them,
    /// appends a marker for each. A failure before the markers leaves them
    /// unmarked: replaying them again is safe, since consumers drop an event
    /// id they handled.
    ///
    /// # Errors
    /// The dead-letter topic could not be read, or the broker did not
    /// acknowledge the replayed records or their markers.
    pub async fn replay(&self, selection: &Selection) -> anyhow::Result<ReplayReport> {
        use anyhow::Context as _;
        let letters = self.read().await?;
        let (chosen, mut refused) = plan(&letters, selection);
        let (chosen, foreign): (Vec<_>, Vec<_>) =
            chosen.into_iter().partition(|letter| letter.destination().is_ok_and(|topic| self.allowed.contains(topic)));
        for letter in foreign {
            let topic = letter.destination().unwrap_or_default();
            refused.push(Refusal {
                id: letter.id,
                reason: format!(
                    "its headers name topic {topic:?}, which no component of this app consumes or publishes to: \
                     a replay goes only to the app's topics"
                ),
            });
        }
        refused.sort_by_key(|r| r.id);
        let topic = self.topic();
        let mut records = Vec::with_capacity(chosen.len());
        let mut markers = Vec::with_capacity(chosen.len());
        let mut replayed = Vec::with_capacity(chosen.len());
        for letter in chosen {
            let destination = letter.destination().map_err(anyhow::Error::msg)?;
            records.push(letter.replay_record(destination, topic));
            markers.push(letter.marker(destination, topic));
            replayed.push(Replayed { id: letter.id, topic: destination.to_owned(), event_id: letter.event_id.clone() });
        }
        if !records.is_empty() {
            self.publisher.enqueue(records).await?.await.context("replayed records not acknowledged")?;
            self.publisher.enqueue(markers).await?.await.context("replay markers not acknowledged")?;
            for r in &replayed {
                tracing::info!(id = %r.id, topic = %r.topic, event_id = ?r.event_id, "replayed dead letter");
            }
        }
        Ok(ReplayReport { replayed, refused })
    }
}

/// One line per dead letter: id, time, component, version, source,
/// attempts, replay state, reason.
pub fn render_lines(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    for l in letters {
        let time = l.timestamp_ms.map(format_rfc3339).unwrap_or_else(|| "-".into());
        let version = l.version.as_deref().map(|v| &v[..v.len().min(12)]).unwrap_or("-");
        let attempts = l.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let state = match (&l.replayed, l.destination()) {
            (Some(r), _) => format!("replayed({})", r.marker),
            (None, Ok(_)) => "pending".to_owned(),
            (None, Err(_)) if l.truncated_from.is_some() => "truncated".to_owned(),
            (None, Err(_)) => "not-replayable".to_owned(),
        };
        let reason = l.reason.replace('\n', " ");
        out.push_str(&format!(
            "{:<8} {time} {:<10} {version:<12} {:<28} attempts={attempts:<2} {state:<16} {reason}\n",
            l.id.to_string(),
            l.component,
            l.origin.to_string(),
        ));
    }
    out
}

#[cfg(test)]
mod tests;
