//! The event on the wire: CloudEvents 1.0 in the Kafka protocol binding.
//!
//! The host writes binary mode: the value is the event's data, exactly the
//! JSON a component emitted, and the attributes are `ce_*` headers. A
//! consumer that knows nothing of CloudEvents (a Kafka Connect sink, a
//! stream processor, a Node.js service doing `JSON.parse(value)`) reads the
//! data as it is; a schema registry's schema for the topic's values is the
//! data's schema; and the host finds a record's type, id and order in its
//! headers without parsing the value.
//!
//! It reads binary mode, structured mode (`content-type:
//! application/cloudevents+json`, the whole event as the value) and the
//! version-1 envelope the host wrote before (`schema_version: 1`), so
//! records already on the topics and in the dead letters keep working.

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Envelope, EnvelopeError, id_problem};
use crate::manifest::WireFormat;
use crate::traces::TraceParent;

/// The CloudEvents version this host writes and reads.
pub const SPEC_VERSION: &str = "1.0";

/// The version of the host's own JSON envelope it still reads.
pub const LEGACY_VERSION: u32 = 1;

/// Binary mode's header for `datacontenttype`.
pub const CONTENT_TYPE: &str = "content-type";

const JSON: &str = "application/json";
/// Any CloudEvents format in structured mode (the binding's rule).
const STRUCTURED_PREFIX: &str = "application/cloudevents";
const BATCH: &str = "application/cloudevents-batch";

/// Longest `source`, in bytes.
pub const MAX_SOURCE_BYTES: usize = 1024;

/// How much of a value from the record a refusal repeats.
const ECHO_BYTES: usize = 128;

impl Envelope {
    /// The record's headers in binary mode: the attributes as `ce_*`, the
    /// content type, and `trace` both as the distributed-tracing extension
    /// (`ce_traceparent`) and as the plain `traceparent` that OpenTelemetry's
    /// Kafka instrumentations read.
    pub fn headers(&self, trace: Option<&TraceParent>) -> Vec<(String, String)> {
        let mut headers = vec![
            ("ce_specversion".to_owned(), SPEC_VERSION.to_owned()),
            ("ce_id".to_owned(), self.id.clone()),
            ("ce_source".to_owned(), self.source.clone()),
            ("ce_type".to_owned(), self.event_type.clone()),
            ("ce_subject".to_owned(), self.order_id.clone()),
            ("ce_time".to_owned(), rfc3339(self.timestamp_ms)),
            (CONTENT_TYPE.to_owned(), JSON.to_owned()),
            ("ce_correlationid".to_owned(), self.correlation_id.clone()),
        ];
        if let Some(cause) = &self.causation_id {
            headers.push(("ce_causationid".to_owned(), cause.clone()));
        }
        if let Some(trace) = trace {
            let text = trace.to_string();
            headers.push((format!("ce_{}", crate::traces::HEADER), text.clone()));
            headers.push((crate::traces::HEADER.to_owned(), text));
        }
        headers
    }

    /// The record's headers as bytes, as a record carries them.
    pub fn header_bytes(&self, trace: Option<&TraceParent>) -> Vec<(String, Vec<u8>)> {
        self.headers(trace).into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
    }

    /// The record's value in binary mode: the data.
    pub fn value(&self) -> Vec<u8> {
        self.data.get().as_bytes().to_vec()
    }

    /// The record's value and headers in `format`: binary mode, or the
    /// version-1 envelope with the headers hosts before CloudEvents wrote
    /// (`event-type`, `producer`, `traceparent`).
    pub fn encode(&self, format: WireFormat, trace: Option<&TraceParent>) -> (String, Vec<(String, String)>) {
        match format {
            WireFormat::CloudEvents => (self.data.get().to_owned(), self.headers(trace)),
            WireFormat::V1 => {
                let producer = self.producer();
                let old = LegacyRef {
                    id: &self.id,
                    event_type: &self.event_type,
                    order_id: &self.order_id,
                    correlation_id: &self.correlation_id,
                    causation_id: self.causation_id.as_deref(),
                    timestamp_ms: self.timestamp_ms,
                    schema_version: LEGACY_VERSION,
                    producer,
                    data: &self.data,
                };
                // Strings, integers and JSON text: serializing cannot fail.
                let value = serde_json::to_string(&old).unwrap_or_default();
                let mut headers = vec![
                    ("event-type".to_owned(), self.event_type.clone()),
                    ("producer".to_owned(), producer.to_owned()),
                ];
                headers.extend(trace.map(|t| (crate::traces::HEADER.to_owned(), t.to_string())));
                (value, headers)
            }
        }
    }

    /// Reads and checks the event of a record, its mode chosen as the Kafka
    /// binding says: structured if its content type is
    /// `application/cloudevents…`, else binary if it has a `ce_*` header;
    /// a record with neither is structured if its value has a
    /// `specversion`, the version-1 envelope otherwise. A header given
    /// twice counts by its last value.
    ///
    /// # Errors
    /// [`EnvelopeError`] saying what is wrong with the record.
    pub fn decode(
        headers: &[(String, Vec<u8>)],
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Self, EnvelopeError> {
        let kind = header(headers, CONTENT_TYPE)?.map(str::to_ascii_lowercase);
        let envelope = match kind {
            Some(kind) if kind.starts_with(BATCH) => return Err(EnvelopeError::Batch),
            Some(kind) if kind.starts_with(STRUCTURED_PREFIX) => structured(non_empty(value)?, key)?,
            _ if headers.iter().any(|(name, _)| name.starts_with("ce_")) => binary(headers, key, value)?,
            _ => {
                let value = non_empty(value)?;
                match serde_json::from_slice::<Probe>(value)? {
                    Probe { specversion: Some(_), .. } => structured(value, key)?,
                    Probe { schema_version: Some(_), .. } => legacy(value)?,
                    Probe { .. } => return Err(EnvelopeError::Unknown),
                }
            }
        };
        envelope.check()
    }

    /// The checks every format shares: ids present, bounded, printable.
    fn check(self) -> Result<Self, EnvelopeError> {
        for (field, text) in [
            ("id", &self.id),
            ("type", &self.event_type),
            ("subject (the order id)", &self.order_id),
            ("correlation id", &self.correlation_id),
            ("source", &self.source),
        ] {
            if text.is_empty() {
                return Err(EnvelopeError::EmptyField(field));
            }
        }
        let ids = [
            ("id", Some(&self.id)),
            ("type", Some(&self.event_type)),
            ("subject (the order id)", Some(&self.order_id)),
            ("correlation id", Some(&self.correlation_id)),
            ("causation id", self.causation_id.as_ref()),
        ];
        for (field, text) in ids {
            if let Some(problem) = text.and_then(|text| id_problem(text)) {
                return Err(EnvelopeError::BadField { field, problem });
            }
        }
        // Not a key of any store, and the host's own are up to 271 bytes
        // (`/shop/`, a name of up to 200, `@`, a SHA-256): a bound of its own.
        if self.source.len() > MAX_SOURCE_BYTES {
            let problem = format!("is {} bytes long, over the limit of {MAX_SOURCE_BYTES}", self.source.len());
            return Err(EnvelopeError::BadField { field: "source", problem });
        }
        if let Some(c) = self.source.chars().find(|c| c.is_control()) {
            let problem = format!("contains the control character {c:?}");
            return Err(EnvelopeError::BadField { field: "source", problem });
        }
        Ok(self)
    }
}

/// Which format a value without CloudEvents headers is in.
#[derive(Deserialize)]
struct Probe {
    specversion: Option<serde::de::IgnoredAny>,
    schema_version: Option<serde::de::IgnoredAny>,
}

fn non_empty(value: Option<&[u8]>) -> Result<&[u8], EnvelopeError> {
    value.filter(|v| !v.is_empty()).ok_or(EnvelopeError::Empty)
}

/// `text` as a refusal repeats it: cut to [`ECHO_BYTES`].
fn echo(text: &str) -> String {
    crate::limits::cut_text(text.to_owned(), ECHO_BYTES)
}

/// `name`'s value, if the record has that header (its last, if twice:
/// as Kafka's Java clients read `lastHeader`).
fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &'static str) -> Result<Option<&'a str>, EnvelopeError> {
    let Some((_, value)) = headers.iter().rev().find(|(key, _)| key == name) else { return Ok(None) };
    std::str::from_utf8(value)
        .map(Some)
        .map_err(|_| EnvelopeError::BadField { field: name, problem: "is not UTF-8".to_owned() })
}

fn required<'a>(headers: &'a [(String, Vec<u8>)], name: &'static str) -> Result<&'a str, EnvelopeError> {
    header(headers, name)?.ok_or(EnvelopeError::Missing(name))
}

fn binary(headers: &[(String, Vec<u8>)], key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Envelope, EnvelopeError> {
    spec_version(required(headers, "ce_specversion")?)?;
    json_content(header(headers, CONTENT_TYPE)?)?;
    let value = non_empty(value)?;
    let data: Box<RawValue> = serde_json::from_slice(value)?;
    let id = required(headers, "ce_id")?.to_owned();
    let key = key.and_then(|key| std::str::from_utf8(key).ok());
    Ok(Envelope {
        event_type: required(headers, "ce_type")?.to_owned(),
        order_id: header(headers, "ce_subject")?.or(key).ok_or(EnvelopeError::Missing("ce_subject"))?.to_owned(),
        correlation_id: header(headers, "ce_correlationid")?.unwrap_or(&id).to_owned(),
        causation_id: header(headers, "ce_causationid")?.map(str::to_owned),
        timestamp_ms: header(headers, "ce_time")?.map(|time| millis("ce_time", time)).transpose()?.unwrap_or(0),
        source: required(headers, "ce_source")?.to_owned(),
        id,
        data,
    })
}

/// A CloudEvent in the JSON event format (structured mode); unknown
/// extensions are ignored.
#[derive(Deserialize)]
struct Structured {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    data: Option<Box<RawValue>>,
    data_base64: Option<serde::de::IgnoredAny>,
    correlationid: Option<String>,
    causationid: Option<String>,
}

fn structured(value: &[u8], key: Option<&[u8]>) -> Result<Envelope, EnvelopeError> {
    let event: Structured = serde_json::from_slice(value)?;
    spec_version(&event.specversion)?;
    json_content(event.datacontenttype.as_deref())?;
    if event.data_base64.is_some() {
        return Err(EnvelopeError::NotJson("data_base64".to_owned()));
    }
    let key = key.and_then(|key| std::str::from_utf8(key).ok());
    Ok(Envelope {
        order_id: event.subject.as_deref().or(key).ok_or(EnvelopeError::Missing("subject"))?.to_owned(),
        correlation_id: event.correlationid.unwrap_or_else(|| event.id.clone()),
        causation_id: event.causationid,
        timestamp_ms: event.time.map(|time| millis("time", &time)).transpose()?.unwrap_or(0),
        data: event.data.ok_or(EnvelopeError::Missing("data"))?,
        id: event.id,
        source: event.source,
        event_type: event.event_type,
    })
}

/// The host's own envelope, version 1 (before CloudEvents).
#[derive(Deserialize)]
struct Legacy {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    order_id: String,
    correlation_id: String,
    #[serde(default)]
    causation_id: Option<String>,
    timestamp_ms: u64,
    schema_version: u32,
    producer: String,
    data: Box<RawValue>,
}

/// [`Legacy`] as hosts before CloudEvents wrote it, field for field.
#[derive(serde::Serialize)]
struct LegacyRef<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    order_id: &'a str,
    correlation_id: &'a str,
    causation_id: Option<&'a str>,
    timestamp_ms: u64,
    schema_version: u32,
    producer: &'a str,
    data: &'a RawValue,
}

fn legacy(value: &[u8]) -> Result<Envelope, EnvelopeError> {
    let old: Legacy = serde_json::from_slice(value)?;
    if old.schema_version != LEGACY_VERSION {
        return Err(EnvelopeError::Version(old.schema_version));
    }
    Ok(Envelope {
        id: old.id,
        event_type: old.event_type,
        order_id: old.order_id,
        correlation_id: old.correlation_id,
        causation_id: old.causation_id,
        timestamp_ms: old.timestamp_ms,
        source: super::source_of(&old.producer),
        data: old.data,
    })
}

fn spec_version(version: &str) -> Result<(), EnvelopeError> {
    if version == SPEC_VERSION { Ok(()) } else { Err(EnvelopeError::SpecVersion(echo(version))) }
}

/// Refuses a content type that is not JSON (`application/json`, or any
/// `…/…+json`, parameters such as `charset` allowed); none means JSON.
fn json_content(kind: Option<&str>) -> Result<(), EnvelopeError> {
    let Some(kind) = kind else { return Ok(()) };
    let media = kind.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let json = media == JSON || media.ends_with("+json") || media == "text/json";
    if json && !media.starts_with(STRUCTURED_PREFIX) { Ok(()) } else { Err(EnvelopeError::NotJson(echo(kind))) }
}

/// `ms` since the Unix epoch as an RFC 3339 time in UTC.
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// An RFC 3339 time as milliseconds since the Unix epoch.
fn millis(field: &'static str, text: &str) -> Result<u64, EnvelopeError> {
    let bad = |problem: String| EnvelopeError::BadField { field, problem };
    let shown = echo(text);
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|err| bad(format!("{shown:?} is not an RFC 3339 time: {err}")))?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad(format!("{shown:?} is before 1970")))
}
