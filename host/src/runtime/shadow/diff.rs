//! What differs between what two versions did with one input: their
//! outputs (type, topic, key, data), state writes (key, value) and timers,
//! or their answers to one query, as a list of changes, each naming the
//! field by its path, e.g. `outputs[0].data.code` or
//! `state["ledger/o1"].status`. Values that are JSON are compared as JSON
//! (key order and spacing do not count).

use serde_json::{Map, Value};

use super::super::{Called, Response};
use crate::state::TimerChange;

/// Changes listed per difference, the first ones.
const MAX_CHANGES: usize = 16;

/// One field the versions disagree on; a side without it is absent.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Value>,
}

/// An input the versions handled differently, with the changes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    /// `event` or `query`.
    pub kind: &'static str,
    /// The event's id, or the query's method and path.
    pub id: String,
    pub event_type: String,
    /// The order it belongs to.
    pub key: Option<String>,
    /// The input: the event's payload (or the query's body), as JSON if it is.
    pub input: Value,
    pub changes: Vec<Change>,
    /// More changes than are listed.
    pub more: usize,
}

/// Longest value kept in a report, as JSON text; a longer one is cut.
const MAX_VALUE_BYTES: usize = 2048;

/// What a deleted key compares as.
const DELETED: &str = "(deleted)";

/// `value`, or its first [`MAX_VALUE_BYTES`] as text if it is longer: the
/// kept differences stay small whatever the payloads.
pub(super) fn bounded(value: Value) -> Value {
    let text = value.to_string();
    match text.len() <= MAX_VALUE_BYTES {
        true => value,
        false => Value::String(crate::limits::cut_text(text, MAX_VALUE_BYTES)),
    }
}

/// A payload as JSON, or as text if it is not.
pub(super) fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// What one `handle` call did, as one JSON document.
fn document(called: &Called) -> Value {
    let outputs = called
        .outputs
        .iter()
        .map(|o| {
            let data = serde_json::from_str(o.data.get()).unwrap_or(Value::Null);
            serde_json::json!({ "type": o.event_type, "topic": o.topic, "key": o.key, "data": data })
        })
        .collect();
    let state: Map<String, Value> = called
        .writes
        .iter()
        .map(|(key, value)| (key.clone(), value.as_deref().map_or_else(|| Value::String(DELETED.into()), as_json)))
        .collect();
    let timers = called
        .timers
        .iter()
        .map(|change| match change {
            TimerChange::Set(t) => serde_json::json!({ "set": {
                "id": t.id, "at_ms": t.at_ms, "type": t.event_type, "key": t.key, "payload": as_json(t.payload.as_bytes()),
            }}),
            TimerChange::Cancel(id) => serde_json::json!({ "cancel": id }),
        })
        .collect();
    serde_json::json!({ "outputs": Value::Array(outputs), "state": state, "timers": Value::Array(timers) })
}

/// A query's answer as one JSON document.
fn answer(response: &Response) -> Value {
    serde_json::json!({ "status": response.status, "content_type": response.content_type, "body": as_json(&response.body) })
}

/// The changes between two `handle` calls, outside the `ignore` rules.
pub fn calls(serving: &Called, candidate: &Called, ignore: &[String]) -> (Vec<Change>, usize) {
    changes(&document(serving), &document(candidate), ignore)
}

/// The changes between two answers to a query, outside the `ignore` rules.
pub fn answers(serving: &Response, candidate: &Response, ignore: &[String]) -> (Vec<Change>, usize) {
    changes(&answer(serving), &answer(candidate), ignore)
}

fn changes(serving: &Value, candidate: &Value, ignore: &[String]) -> (Vec<Change>, usize) {
    let rules: Vec<Vec<&str>> = ignore.iter().map(|rule| rule.split('.').collect()).collect();
    let mut found = Vec::new();
    walk(&mut Vec::new(), Some(serving), Some(candidate), &rules, &mut found);
    let more = found.len().saturating_sub(MAX_CHANGES);
    found.truncate(MAX_CHANGES);
    (found, more)
}

/// A step of a path: an object's key or an array's index.
enum Step {
    Key(String),
    Index(usize),
}

fn walk(path: &mut Vec<Step>, a: Option<&Value>, b: Option<&Value>, rules: &[Vec<&str>], found: &mut Vec<Change>) {
    match (a, b) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
            keys.sort();
            for key in keys {
                path.push(Step::Key(key.clone()));
                walk(path, a.get(key), b.get(key), rules, found);
                path.pop();
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            for i in 0..a.len().max(b.len()) {
                path.push(Step::Index(i));
                walk(path, a.get(i), b.get(i), rules, found);
                path.pop();
            }
        }
        (a, b) if a == b => {}
        (a, b) => {
            if !ignored(path, rules) {
                let (serving, candidate) = (a.cloned().map(bounded), b.cloned().map(bounded));
                found.push(Change { path: render(path), serving, candidate });
            }
        }
    }
}

/// Where the fields a rule names begin: inside an output's data, a state
/// value, a timer's payload or a query's body.
fn inner(path: &[Step]) -> Option<&[Step]> {
    let key = |i: usize| match path.get(i) {
        Some(Step::Key(k)) => Some(k.as_str()),
        _ => None,
    };
    let from = match key(0)? {
        "outputs" if key(2) == Some("data") => 3,
        "state" => 2,
        "timers" if key(2) == Some("set") && key(3) == Some("payload") => 4,
        "body" => 1,
        _ => return None,
    };
    path.get(from..)
}

/// Whether a rule covers `path` (the rule names it, or a field it is in).
fn ignored(path: &[Step], rules: &[Vec<&str>]) -> bool {
    let Some(inner) = inner(path) else { return false };
    rules.iter().any(|rule| {
        rule.len() <= inner.len()
            && rule.iter().zip(inner).all(|(want, step)| match step {
                _ if *want == "*" => true,
                Step::Key(key) => key == want,
                Step::Index(i) => want.parse::<usize>().is_ok_and(|w| w == *i),
            })
    })
}

fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for (i, step) in path.iter().enumerate() {
        match step {
            Step::Index(n) => out.push_str(&format!("[{n}]")),
            // A state key is any text: quoted.
            Step::Key(key) if i == 1 && matches!(path.first(), Some(Step::Key(k)) if k == "state") => {
                out.push_str(&format!("[{}]", Value::String(key.clone())));
            }
            Step::Key(key) if i == 0 => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Output;

    fn output(event_type: &str, data: &str) -> Output {
        Output {
            event_type: event_type.into(),
            topic: "payments".into(),
            key: "o1".into(),
            data: serde_json::value::RawValue::from_string(data.into()).unwrap(),
        }
    }

    fn called(outputs: Vec<Output>, writes: Vec<(&str, &str)>) -> Called {
        Called {
            outputs,
            writes: writes.into_iter().map(|(k, v)| (k.to_owned(), Some(v.as_bytes().to_vec()))).collect(),
            timers: Vec::new(),
            version: "v".into(),
        }
    }

    #[test]
    fn equal_calls_have_no_changes_whatever_the_key_order() {
        let a = called(vec![output("PaymentProcessed", r#"{"a":1,"b":[1,2]}"#)], vec![("k", r#"{"x":1,"y":2}"#)]);
        let b = called(vec![output("PaymentProcessed", r#"{ "b":[1,2], "a":1 }"#)], vec![("k", r#"{"y":2,"x":1}"#)]);
        assert_eq!(calls(&a, &b, &[]), (Vec::new(), 0));
    }

    #[test]
    fn a_changed_event_names_the_fields_and_both_values() {
        let a = called(vec![output("PaymentProcessed", r#"{"order_id":"o1","amount":5}"#)], vec![("ledger/o1", "{}")]);
        let b = called(
            vec![output("PaymentDeclined", r#"{"order_id":"o1","code":"card_not_supported"}"#)],
            vec![("ledger/o1", r#"{"declined":true}"#)],
        );
        let (changes, more) = calls(&a, &b, &[]);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["outputs[0].data.amount", "outputs[0].data.code", "outputs[0].type", r#"state["ledger/o1"].declined"#]
        );
        assert_eq!(more, 0);
        assert_eq!(changes[0].serving, Some(serde_json::json!(5)));
        assert_eq!(changes[0].candidate, None, "absent on the candidate's side");
        assert_eq!(changes[1].candidate, Some(serde_json::json!("card_not_supported")));
    }

    #[test]
    fn a_missing_output_or_write_is_a_change() {
        let a = called(vec![output("A", "{}"), output("B", "{}")], vec![("k", "1")]);
        let b = called(vec![output("A", "{}")], Vec::new());
        let (changes, _) = calls(&a, &b, &[]);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["outputs[1]", r#"state["k"]"#]);
    }

    #[test]
    fn ignore_rules_cover_fields_inside_data_and_values_only() {
        let a = called(
            vec![output("A", r#"{"id":"x1","at":1,"lines":[{"sku":"a","n":1}]}"#)],
            vec![("k", r#"{"id":"x1"}"#)],
        );
        let b = called(
            vec![output("A", r#"{"id":"x2","at":2,"lines":[{"sku":"b","n":1}]}"#)],
            vec![("k", r#"{"id":"x2"}"#)],
        );
        let rules = ["id".to_owned(), "lines.*.sku".to_owned()];
        let (changes, _) = calls(&a, &b, &rules);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["outputs[0].data.at"]);
        // A rule names fields of the data, not the output's own type.
        let c = called(
            vec![output("B", r#"{"id":"x1","at":1,"lines":[{"sku":"a","n":1}]}"#)],
            vec![("k", r#"{"id":"x1"}"#)],
        );
        let (changes, _) = calls(&a, &c, &["type".to_owned()]);
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn a_delete_is_not_a_null_and_long_values_are_cut() {
        let mut a = called(Vec::new(), vec![("k", "null")]);
        let mut b = called(Vec::new(), Vec::new());
        b.writes.push(("k".into(), None));
        let (changes, _) = calls(&a, &b, &[]);
        assert_eq!(changes[0].candidate, Some(Value::String(DELETED.into())), "{changes:?}");
        a.writes[0].1 = Some(format!("\"{}\"", "x".repeat(10_000)).into_bytes());
        let (changes, _) = calls(&a, &b, &[]);
        let kept = changes[0].serving.as_ref().unwrap().as_str().unwrap();
        assert!(kept.len() < MAX_VALUE_BYTES + 40 && kept.ends_with("[cut: 10002 bytes]"), "{}", kept.len());
    }

    #[test]
    fn many_changes_are_cut_and_counted() {
        let many = |v: u32| (0..40).map(|i| format!("\"f{i:02}\":{v}")).collect::<Vec<_>>().join(",");
        let a = called(vec![output("A", &format!("{{{}}}", many(1)))], Vec::new());
        let b = called(vec![output("A", &format!("{{{}}}", many(2)))], Vec::new());
        let (changes, more) = calls(&a, &b, &[]);
        assert_eq!((changes.len(), more), (MAX_CHANGES, 40 - MAX_CHANGES));
    }

    #[test]
    fn answers_compare_status_and_json_body() {
        let r = |status: u16, body: &str| Response {
            status,
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
        };
        assert!(answers(&r(200, r#"{"a":1}"#), &r(200, r#"{"a": 1}"#), &[]).0.is_empty());
        let (changes, _) = answers(&r(200, r#"{"a":1,"t":5}"#), &r(404, r#"{"a":2,"t":6}"#), &["t".to_owned()]);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["body.a", "status"]);
    }
}
