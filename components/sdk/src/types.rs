//! Native mirrors of the WIT types, with JSON helpers.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One event delivered to the service (WIT `types.event`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub topic: String,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub timestamp_ms: u64,
}

impl Event {
    /// Builds an event with a JSON payload (for tests and tools).
    pub fn json<T: Serialize>(id: &str, topic: &str, event_type: &str, key: &str, payload: &T) -> Self {
        Self {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            topic: topic.to_owned(),
            key: Some(key.to_owned()),
            headers: Vec::new(),
            payload: serde_json::to_vec(payload).unwrap_or_default(),
            timestamp_ms: 0,
        }
    }

    /// Decodes the JSON payload.
    ///
    /// # Errors
    /// [`HandleError::Permanent`] naming the event type when the payload does
    /// not match `T`: no retry can fix a malformed event.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, HandleError> {
        serde_json::from_slice(&self.payload).map_err(|err| {
            HandleError::Permanent(format!("malformed {} payload in event {}: {err}", self.event_type, self.id))
        })
    }

    /// The value of an envelope or Kafka header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// An event to publish (WIT `types.outgoing-event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub event_type: String,
    pub key: String,
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// An event with a JSON payload.
    ///
    /// # Errors
    /// [`HandleError::Permanent`] if `payload` cannot be encoded.
    pub fn json<T: Serialize>(topic: &str, event_type: &str, key: &str, payload: &T) -> Result<Self, HandleError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|err| HandleError::Permanent(format!("cannot encode {event_type}: {err}")))?;
        Ok(Self { topic: topic.to_owned(), event_type: event_type.to_owned(), key: key.to_owned(), payload })
    }

    /// Decodes the payload (for tests).
    ///
    /// # Errors
    /// When the payload is not a JSON `T`.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Why an event could not be handled (WIT `types.handle-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError {
    /// A later attempt may succeed.
    Retryable(String),
    /// No attempt will succeed; the host dead-letters the event.
    Permanent(String),
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Retryable(msg) => write!(f, "retryable: {msg}"),
            Self::Permanent(msg) => write!(f, "permanent: {msg}"),
        }
    }
}

/// A read-only HTTP request (WIT `types.request`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
}

impl Request {
    /// A `GET` request for `path_and_query` (for tests).
    pub fn get(path_and_query: &str) -> Self {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        Self { method: "GET".into(), path: path.into(), query: query.into(), body: Vec::new() }
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    }

    /// The path split into non-empty segments.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }
}

fn percent_decode(raw: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'+' => Some((b' ', 1)),
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])).map(|(h, l)| (h * 16 + l, 3)),
            _ => None,
        };
        let (byte, width) = decoded.unwrap_or((bytes[i], 1));
        out.push(byte);
        i += width;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP response (WIT `types.response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json<T: Serialize>(status: u16, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(body) => Self { status, content_type: "application/json".into(), body },
            Err(err) => Self::error(500, "encoding_failed", &err.to_string()),
        }
    }

    /// A JSON error body `{"error": {"code", "message"}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        Self { status, content_type: "application/json".into(), body: body.to_string().into_bytes() }
    }

    /// 404 with a JSON error body.
    pub fn not_found(message: &str) -> Self {
        Self::error(404, "not_found", message)
    }

    /// Decodes the JSON body (for tests).
    ///
    /// # Errors
    /// When the body is not a JSON `T`.
    pub fn body_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let req = Request::get("/emails?order=a%2Db&x=1+2&flag");
        assert_eq!(req.query_param("order").as_deref(), Some("a-b"));
        assert_eq!(req.query_param("x").as_deref(), Some("1 2"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(Request::get("/a?bad=%zz%4").query_param("bad").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn malformed_payload_is_a_permanent_error() {
        let event = Event { event_type: "OrderPlaced".into(), payload: b"{".to_vec(), ..Event::default() };
        let err = event.payload_json::<serde_json::Value>().unwrap_err();
        assert!(matches!(err, HandleError::Permanent(msg) if msg.contains("OrderPlaced")));
    }
}
