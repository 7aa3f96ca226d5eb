//! The JSON Schemas of the event types: generated from the Rust types of
//! `components/events` into the checked-in `schemas/` folder (one
//! `{EventType}.json` each; `just schemas` writes them, a test fails when
//! they are stale), loaded by the host at start, and checked against every
//! output's data before its commit: an output that does not match fails its
//! event for good, the reason naming the field and the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Errors listed in a refusal, the first ones.
const MAX_ERRORS: usize = 3;

/// A schema folder that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read the schema folder {0:?}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("schema {0:?} is not a valid JSON Schema: {1}")]
    Invalid(PathBuf, String),
}

/// The compiled schema of each event type.
#[derive(Default)]
pub struct Schemas {
    validators: BTreeMap<String, jsonschema::Validator>,
    raw: BTreeMap<String, Value>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas").field("types", &self.raw.keys().collect::<Vec<_>>()).finish()
    }
}

impl Schemas {
    /// Loads and compiles every `{EventType}.json` in `dir`.
    ///
    /// # Errors
    /// [`SchemaError`] naming the folder or the file at fault.
    pub fn load(dir: &Path) -> Result<Self, SchemaError> {
        let entries = std::fs::read_dir(dir).map_err(|err| SchemaError::Read(dir.to_owned(), err))?;
        let mut schemas = Schemas::default();
        for entry in entries {
            let path = entry.map_err(|err| SchemaError::Read(dir.to_owned(), err))?.path();
            let Some(event_type) = path.file_stem().and_then(|s| s.to_str()).filter(|_| is_json(&path)) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|err| SchemaError::Read(path.clone(), err))?;
            let schema: Value =
                serde_json::from_str(&text).map_err(|err| SchemaError::Invalid(path.clone(), err.to_string()))?;
            schemas.insert(event_type, schema).map_err(|message| SchemaError::Invalid(path.clone(), message))?;
        }
        Ok(schemas)
    }

    /// The schemas generated from `components/events`, compiled.
    pub fn generated() -> Self {
        let mut schemas = Schemas::default();
        for (event_type, schema) in shop_events::schemas() {
            let _ = schemas.insert(event_type, schema.to_value());
        }
        schemas
    }

    fn insert(&mut self, event_type: &str, schema: Value) -> Result<(), String> {
        let validator = jsonschema::validator_for(&schema).map_err(|err| err.to_string())?;
        self.validators.insert(event_type.to_owned(), validator);
        self.raw.insert(event_type.to_owned(), schema);
        Ok(())
    }

    /// The event types with a schema.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.raw.keys().map(String::as_str)
    }

    /// The schema of `event_type`, if it has one.
    pub fn schema(&self, event_type: &str) -> Option<&Value> {
        self.raw.get(event_type)
    }

    /// Checks `data` against the schema of `event_type`; a type without a
    /// schema passes.
    ///
    /// # Errors
    /// What does not match: each failing field by its JSON pointer, with
    /// the rule it breaks (at most three).
    pub fn check(&self, event_type: &str, data: &Value) -> Result<(), String> {
        let Some(validator) = self.validators.get(event_type) else { return Ok(()) };
        if validator.is_valid(data) {
            return Ok(());
        }
        let errors: Vec<String> = validator
            .iter_errors(data)
            .take(MAX_ERRORS + 1)
            .map(|err| {
                let at = err.instance_path().to_string();
                let at = if at.is_empty() { "the data".to_owned() } else { format!("`{at}`") };
                // The message quotes the value at fault, which may be the
                // whole payload: cut, since it goes into a dead letter's header.
                let cut = |text: String| crate::limits::cut_text(text, MAX_PART_BYTES);
                format!("{}: {}", cut(at), cut(err.to_string()))
            })
            .collect();
        if errors.is_empty() {
            return Ok(());
        }
        let more = if errors.len() > MAX_ERRORS { "; …" } else { "" };
        let listed = errors.into_iter().take(MAX_ERRORS).collect::<Vec<_>>().join("; ");
        Err(format!("its data does not match the schema of {event_type}: {listed}{more}"))
    }
}

/// What a reader requires that a writer's data may not give it, one
/// top-level field at a time (nested objects are compared by their `$ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gap {
    /// The reader requires it; the writer does not have it.
    Missing(String),
    /// The reader requires it; the writer may leave it out.
    Optional(String),
    /// Both have it, of different kinds: `(field, the writer's, the reader's)`.
    Retyped(String, String, String),
}

/// The gaps between data written to `writer`'s schema and what `reader`
/// requires: its required fields the writer may lack, or gives as another
/// kind (`type`, or the `$ref` of a nested object).
pub fn gaps(writer: &Value, reader: &Value) -> Vec<Gap> {
    let required = |schema: &Value| -> Vec<String> {
        schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let kind = |schema: &Value, field: &str| {
        let property = &schema["properties"][field];
        property.get("type").or_else(|| property.get("$ref")).map(Value::to_string)
    };
    let written = required(writer);
    let mut found = Vec::new();
    for field in required(reader) {
        if !written.contains(&field) {
            let has = writer["properties"].get(&field).is_some();
            found.push(if has { Gap::Optional(field.clone()) } else { Gap::Missing(field.clone()) });
        }
        if let (Some(was), Some(is)) = (kind(writer, &field), kind(reader, &field))
            && was != is
        {
            found.push(Gap::Retyped(field, was, is));
        }
    }
    found
}

/// Longest part of a refusal (a field's path, or what is wrong with it),
/// in bytes.
const MAX_PART_BYTES: usize = 200;

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
}

/// The files of `schemas/` as generated now: `(file name, text)`.
pub fn files() -> Vec<(String, String)> {
    shop_events::schemas()
        .into_iter()
        .map(|(event_type, schema)| {
            let text = serde_json::to_string_pretty(&schema.to_value()).unwrap_or_default();
            (format!("{event_type}.json"), text + "\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_schemas() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
    }

    /// The checked-in folder is what the Rust types generate now; with
    /// `UPDATE_SCHEMAS=1` (`just schemas`) it is rewritten instead.
    #[test]
    fn the_checked_in_schemas_are_the_generated_ones() {
        let dir = repo_schemas();
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in files() {
                std::fs::write(dir.join(name), text).unwrap();
            }
        }
        let mut stale = Vec::new();
        for (name, text) in files() {
            if std::fs::read_to_string(dir.join(&name)).ok().as_deref() != Some(text.as_str()) {
                stale.push(name);
            }
        }
        assert!(stale.is_empty(), "schemas/ is stale for {stale:?}: run `just schemas` and commit the folder");
        let loaded = Schemas::load(&dir).unwrap();
        assert_eq!(loaded.types().count(), shop_events::schemas().len(), "no file in schemas/ without a type");
    }

    #[test]
    fn a_payload_that_breaks_its_schema_is_refused_naming_the_field_and_rule() {
        let schemas = Schemas::generated();
        let good = serde_json::json!({
            "order_id": "o1", "payment_id": "p1", "amount_cents": 1250, "card_last4": "4242"
        });
        assert_eq!(schemas.check("PaymentAuthorized", &good), Ok(()));
        let bad = serde_json::json!({ "order_id": "o1", "payment_id": 7, "amount_cents": -5 });
        let err = schemas.check("PaymentAuthorized", &bad).unwrap_err();
        assert!(err.contains("`/payment_id`") && err.contains("not of type \"string\""), "{err}");
        assert!(err.contains("`/amount_cents`") && err.contains("minimum"), "{err}");
        assert!(err.contains("card_last4") && err.contains("required"), "{err}");
        assert_eq!(schemas.check("NotAType", &bad), Ok(()), "a type without a schema passes");
        // A whole payload in the wrong place is not quoted whole.
        let huge = serde_json::json!(["x".repeat(100_000)]);
        let err = schemas.check("PaymentAuthorized", &huge).unwrap_err();
        assert!(err.len() < 1_000, "{} bytes", err.len());
    }
}
