//! A schema registry, when a user runs one: the host's event schemas
//! registered through the Confluent-compatible REST API (Confluent Schema
//! Registry, Apicurio Registry's `/apis/ccompat/v7`, Karapace), one subject
//! per event type, `{kafka.topic_prefix}{EventType}`.
//!
//! At start the host asks the registry whether each schema is compatible
//! with the latest version of its subject (under the subject's
//! compatibility level, the registry's to set) and refuses to start,
//! naming every type at fault, if one is not; then it registers them all
//! (a schema registered before keeps its id). `host check` asks without
//! registering.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::schemas::Schemas;

/// The media type of the API's requests.
const MEDIA: &str = "application/vnd.schemaregistry.v1+json";

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the registry says of a schema against its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The subject has no version yet.
    New,
    /// Compatible with the subject's latest version.
    Compatible,
    /// Not compatible, and what the registry said of it.
    Incompatible(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::New => f.write_str("new subject"),
            Verdict::Compatible => f.write_str("compatible with the latest version"),
            Verdict::Incompatible(why) => write!(f, "INCOMPATIBLE with the latest version: {why}"),
        }
    }
}

/// A registry's Confluent-compatible API.
#[derive(Debug, Clone)]
pub struct Registry {
    base: reqwest::Url,
    prefix: String,
    client: reqwest::Client,
}

impl Registry {
    /// The API at `base` (e.g. `http://127.0.0.1:8089/apis/ccompat/v7`),
    /// subjects named `{prefix}{EventType}`.
    ///
    /// # Errors
    /// A base that is not an http(s) URL.
    pub fn new(base: &str, prefix: &str) -> anyhow::Result<Self> {
        let base =
            reqwest::Url::parse(base.trim_end_matches('/')).with_context(|| format!("schemas.registry {base:?}"))?;
        anyhow::ensure!(
            matches!(base.scheme(), "http" | "https") && !base.cannot_be_a_base(),
            "schemas.registry {base} is not an http(s) URL"
        );
        let client = reqwest::Client::builder().timeout(TIMEOUT).build().context("HTTP client for the registry")?;
        Ok(Self { base, prefix: prefix.to_owned(), client })
    }

    /// The base URL as logs and errors show it: without credentials.
    pub fn shown(&self) -> String {
        let mut url = self.base.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.to_string()
    }

    /// The subject of `event_type`.
    pub fn subject(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.prefix)
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn post(&self, url: reqwest::Url, schema: &Value) -> anyhow::Result<(u16, Value)> {
        let body = json!({ "schemaType": "JSON", "schema": sent(schema).to_string() });
        let response = self
            .client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, MEDIA)
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("schema registry {}", self.shown()))?;
        let status = response.status().as_u16();
        let text = response.text().await.with_context(|| format!("schema registry {}", self.shown()))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// What the registry says of `schema` against `subject`'s latest version.
    ///
    /// # Errors
    /// The registry cannot be reached or answers something else.
    pub async fn verdict(&self, subject: &str, schema: &Value) -> anyhow::Result<Verdict> {
        let mut url = self.url(&["compatibility", "subjects", subject, "versions", "latest"]);
        url.set_query(Some("verbose=true"));
        match self.post(url, schema).await? {
            (200, answer) if answer["is_compatible"] == true => Ok(Verdict::Compatible),
            (200, answer) if answer["is_compatible"] == false => {
                let messages: Vec<String> = answer["messages"]
                    .as_array()
                    .map(|m| m.iter().map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned)).collect())
                    .unwrap_or_default();
                if !messages.is_empty() {
                    return Ok(Verdict::Incompatible(messages.join("; ")));
                }
                // No details (Apicurio gives none): what changed, read
                // against the latest version.
                let latest = self.latest(subject).await.unwrap_or(Value::Null);
                Ok(Verdict::Incompatible(changes(&latest, schema).unwrap_or_else(|| {
                    "the registry gives no details (the subject's compatibility level applies)".to_owned()
                })))
            }
            // 40401: no such subject; 40402: no such version.
            (404, answer) if matches!(answer["error_code"].as_u64(), Some(40401 | 40402)) => Ok(Verdict::New),
            (404, answer) => anyhow::bail!(
                "schema registry {}: HTTP 404 checking subject {subject} ({answer}): is it the base of a \
                 Confluent-compatible API (Apicurio: …/apis/ccompat/v7)?",
                self.shown()
            ),
            (status, answer) => anyhow::bail!("schema registry: checking subject {subject}: HTTP {status}: {answer}"),
        }
    }

    /// The latest version's schema of `subject`.
    async fn latest(&self, subject: &str) -> anyhow::Result<Value> {
        let url = self.url(&["subjects", subject, "versions", "latest"]);
        let answer: Value = self.client.get(url).send().await?.error_for_status()?.json().await?;
        Ok(serde_json::from_str(answer["schema"].as_str().unwrap_or("null"))?)
    }

    /// Registers `schema` under `subject`: its id (the same id for a
    /// schema registered before).
    ///
    /// # Errors
    /// Refused (409: incompatible; 422: not a schema it takes), or the
    /// registry cannot be reached.
    pub async fn register(&self, subject: &str, schema: &Value) -> anyhow::Result<u64> {
        match self.post(self.url(&["subjects", subject, "versions"]), schema).await? {
            (200, answer) => answer["id"].as_u64().with_context(|| format!("schema registry: no id in {answer}")),
            (status, answer) => {
                let message = answer["message"].as_str().map_or_else(|| answer.to_string(), str::to_owned);
                anyhow::bail!("schema registry refused subject {subject}: HTTP {status}: {message}")
            }
        }
    }

    /// Each schema's verdict, by event type.
    ///
    /// # Errors
    /// The registry cannot be reached or answers something else.
    pub async fn check(&self, schemas: &Schemas) -> anyhow::Result<Vec<(String, Verdict)>> {
        let mut verdicts = Vec::new();
        for event_type in schemas.types() {
            let Some(schema) = schemas.schema(event_type) else { continue };
            verdicts.push((event_type.to_owned(), self.verdict(&self.subject(event_type), schema).await?));
        }
        Ok(verdicts)
    }

    /// Checks every schema, then registers them all: each event type's id.
    ///
    /// # Errors
    /// Every schema the registry finds incompatible, by type and subject
    /// (nothing is registered then); a registration refused; the registry
    /// cannot be reached.
    pub async fn sync(&self, schemas: &Schemas) -> anyhow::Result<Vec<(String, u64)>> {
        let refused: Vec<String> = self
            .check(schemas)
            .await?
            .into_iter()
            .filter_map(|(event_type, verdict)| match verdict {
                Verdict::Incompatible(why) => {
                    Some(format!("{event_type} (subject {}): {why}", self.subject(&event_type)))
                }
                _ => None,
            })
            .collect();
        anyhow::ensure!(
            refused.is_empty(),
            "schema registry {}: {} schema(s) incompatible with the latest version registered: {}",
            self.shown(),
            refused.len(),
            refused.join("; ")
        );
        let mut ids = Vec::new();
        for event_type in schemas.types() {
            let Some(schema) = schemas.schema(event_type) else { continue };
            ids.push((event_type.to_owned(), self.register(&self.subject(event_type), schema).await?));
        }
        Ok(ids)
    }
}

/// `schema` as the registry is sent it: without its `$schema` (draft
/// 2020-12), which Apicurio's compatibility checker cannot read ("could not
/// determine version"); the rules are the same.
fn sent(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.remove("$schema");
    }
    schema
}

/// What changed from `before` to `after` at the top level that a reader
/// of the old data would trip on: required fields added, required fields
/// retyped; `None` if nothing of that kind.
fn changes(before: &Value, after: &Value) -> Option<String> {
    use crate::schemas::Gap;
    let found: Vec<String> = crate::schemas::gaps(before, after)
        .into_iter()
        .map(|gap| match gap {
            Gap::Missing(field) | Gap::Optional(field) => {
                format!("required field `{field}` added (data of the latest version may lack it)")
            }
            Gap::Retyped(field, was, is) => format!("field `{field}` retyped from {was} to {is}"),
        })
        .collect();
    (!found.is_empty()).then(|| found.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_urls() {
        let registry = Registry::new("http://127.0.0.1:8089/apis/ccompat/v7/", "t1.").unwrap();
        assert_eq!(registry.subject("OrderPlaced"), "t1.OrderPlaced");
        let url = registry.url(&["subjects", "t1.OrderPlaced", "versions"]);
        assert_eq!(url.as_str(), "http://127.0.0.1:8089/apis/ccompat/v7/subjects/t1.OrderPlaced/versions");
        let odd = registry.url(&["subjects", "a/b c", "versions"]);
        assert!(odd.as_str().ends_with("/subjects/a%2Fb%20c/versions"), "{odd}");
        assert!(Registry::new("ftp://x", "").unwrap_err().to_string().contains("not an http(s) URL"));
        assert!(Registry::new("not a url", "").is_err());
        let secret = Registry::new("https://user:pw@registry.example/apis/ccompat/v7", "").unwrap();
        assert_eq!(secret.shown(), "https://registry.example/apis/ccompat/v7");
    }

    #[test]
    fn what_changed_names_the_field() {
        let before = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a", "b"]});
        let after = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "string"}}, "required": ["a", "b", "c"]});
        let said = changes(&before, &after).unwrap();
        assert!(said.contains("required field `c` added"), "{said}");
        assert!(said.contains(r#"field `a` retyped from "string" to "integer""#), "{said}");
        assert_eq!(changes(&before, &before), None);
        let sent = sent(&json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}));
        assert_eq!(sent, json!({"type": "object"}));
    }
}
