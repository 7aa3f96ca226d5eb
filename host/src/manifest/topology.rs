//! Who publishes and who consumes each event type on each topic, as the
//! manifest says: the gateway publishes `OrderPlaced` on `orders`, each
//! component publishes what its `publishes` grants name, and every event of
//! a topic reaches each component subscribed to it. `host topology` prints
//! it; the admin API's `/overview` carries it (`topology`) and the console
//! draws it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::Manifest;

/// Who makes it: the gateway, for the orders it accepts.
pub const GATEWAY: &str = "gateway";

/// One event type on one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// The logical topic.
    pub topic: String,
    /// The event type; `*` for a grant of any type on the topic.
    pub event_type: String,
    /// Who may publish it.
    pub publishers: Vec<String>,
    /// Who receives it: every component subscribed to the topic.
    pub consumers: Vec<String>,
    /// Whether the host has a JSON Schema for it.
    pub schema: bool,
    /// The version of the schema each party that declares it (a contract,
    /// or a manifest block's word) publishes or consumes it by: the first
    /// 12 hex digits of the schema's SHA-256.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
}

/// Every flow of `manifest`, by topic then type; `has_schema` says which
/// types have a schema. A topic consumed with no publisher granted shows
/// as one flow of type `*` without publishers (fed from outside the host).
pub fn flows(manifest: &Manifest, has_schema: impl Fn(&str) -> bool) -> Vec<Flow> {
    let mut published: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    published
        .entry((shop_events::topics::ORDERS.to_owned(), shop_events::types::ORDER_PLACED.to_owned()))
        .or_default()
        .insert(GATEWAY.to_owned());
    let mut consumers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, settings) in &manifest.components {
        for entry in settings.publishes.iter().flatten() {
            if let Some((topic, event_type)) = entry.split_once(':') {
                published.entry((topic.to_owned(), event_type.to_owned())).or_default().insert(name.clone());
            }
        }
        for topic in &settings.topics {
            consumers.entry(topic.clone()).or_default().insert(name.clone());
        }
    }
    for topic in consumers.keys() {
        if !published.keys().any(|(t, _)| t == topic) {
            published.insert((topic.clone(), "*".to_owned()), BTreeSet::new());
        }
    }
    published
        .into_iter()
        .map(|((topic, event_type), publishers)| Flow {
            consumers: consumers.get(&topic).map(|c| c.iter().cloned().collect()).unwrap_or_default(),
            schema: event_type != "*" && has_schema(&event_type),
            versions: BTreeMap::new(),
            publishers: publishers.into_iter().collect(),
            topic,
            event_type,
        })
        .collect()
}

/// `flows` as text, one topic after the other:
///
/// ```text
/// payments
///   PaymentAuthorized     payment  ->  order, analytics
/// ```
pub fn render(flows: &[Flow]) -> String {
    let width = flows.iter().map(|f| f.event_type.len()).max().unwrap_or(0);
    let who = flows.iter().map(|f| f.publishers.join(", ").len()).max().unwrap_or(0).max(1);
    let mut out = String::new();
    let mut topic = None;
    for flow in flows {
        if topic != Some(&flow.topic) {
            let _ = writeln!(out, "{}", flow.topic);
            topic = Some(&flow.topic);
        }
        let publishers = if flow.publishers.is_empty() { "(outside)".to_owned() } else { flow.publishers.join(", ") };
        let consumers = if flow.consumers.is_empty() { "(nobody here)".to_owned() } else { flow.consumers.join(", ") };
        let schema = if flow.schema || flow.event_type == "*" { "" } else { "  (no schema)" };
        let mut distinct: Vec<&String> = flow.versions.values().collect();
        distinct.sort();
        distinct.dedup();
        let versions = match distinct[..] {
            [] => String::new(),
            [one] => format!("  schema {one}"),
            _ => {
                let each: Vec<String> = flow.versions.iter().map(|(who, v)| format!("{who} {v}")).collect();
                format!("  schemas {}", each.join(", "))
            }
        };
        let _ = writeln!(out, "  {:width$}  {publishers:who$}  ->  {consumers}{schema}{versions}", flow.event_type);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shop_s_flows() {
        let manifest = Manifest::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml")).unwrap();
        let flows = flows(&manifest, |t| t != "PaymentVoided");
        let find = |topic: &str, event_type: &str| {
            flows.iter().find(|f| f.topic == topic && f.event_type == event_type).cloned().unwrap()
        };
        let placed = find("orders", "OrderPlaced");
        assert_eq!(
            (placed.publishers, placed.consumers),
            (vec!["gateway".to_owned()], vec!["analytics".to_owned(), "order".to_owned()])
        );
        let authorized = find("payments", "PaymentAuthorized");
        assert_eq!(authorized.publishers, ["payment"]);
        assert!(authorized.consumers.contains(&"order".to_owned()) && authorized.schema);
        assert!(!find("payments", "PaymentVoided").schema);
        let text = render(&flows);
        assert!(text.starts_with("analytics\n"), "{text}");
        assert!(text.contains("  (no schema)"), "{text}");
        let line = text.lines().find(|l| l.trim_start().starts_with("OrderPlaced")).unwrap();
        assert!(line.contains("gateway") && line.ends_with("->  analytics, order"), "{line}");
    }
}
