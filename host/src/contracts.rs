//! Contracts between components: what each publishes and consumes, with the
//! schema of every payload, checked at load and at every reload.
//!
//! A component carries its contract in a `shop:contract` custom section
//! (JSON: `{"publishes": {"topic:Type": schema}, "consumes": {…}}`; Rust
//! components write it from `shop-events` in their `build.rs` and embed it
//! with `shop_sdk::contract!()`; `host contract --set` adds one to any
//! component). A component without one is taken at its manifest block's
//! word: it publishes what `publishes` grants and consumes what `consumes`
//! lists, each to the host's schema of the type.
//!
//! A component is refused when what it publishes lacks, or gives as another
//! kind, a field that one of its consumers requires (or that the host's own
//! schema of the type requires), when it publishes what it is not granted,
//! or consumes from a topic it is not subscribed to; the refusal names the
//! field and the consumer.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::manifest::{ComponentSettings, Manifest};
use crate::schemas::{Gap, Schemas};

/// The custom section a component's contract is in.
pub const SECTION: &str = "shop:contract";

/// Largest contract section read, in bytes.
pub const MAX_CONTRACT_BYTES: usize = 1 << 20;

/// What a component says it publishes and consumes: `"topic:Type"` to the
/// JSON Schema of the payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    #[serde(default)]
    pub publishes: BTreeMap<String, Value>,
    #[serde(default)]
    pub consumes: BTreeMap<String, Value>,
}

impl Contract {
    /// The contract in `bytes`' `shop:contract` section, if it has one (the
    /// last, when there are several: a section added to a built component
    /// comes after the one its core module carries).
    ///
    /// # Errors
    /// Bytes that do not parse as Wasm, or a section that is too large, not
    /// JSON of this shape, or names an entry other than `topic:Type`.
    pub fn from_wasm(bytes: &[u8]) -> Result<Option<Self>, String> {
        let mut found = None;
        for payload in wasmparser::Parser::new(0).parse_all(bytes) {
            let payload = payload.map_err(|err| format!("cannot read its sections: {err}"))?;
            if let wasmparser::Payload::CustomSection(section) = payload
                && section.name() == SECTION
            {
                found = Some(section.data());
            }
        }
        found.map(Self::parse).transpose()
    }

    /// Parses a contract's JSON.
    ///
    /// # Errors
    /// As [`Contract::from_wasm`].
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        if json.len() > MAX_CONTRACT_BYTES {
            return Err(format!("its {SECTION} section is {} bytes, past {MAX_CONTRACT_BYTES}", json.len()));
        }
        let contract: Self =
            serde_json::from_slice(json).map_err(|err| format!("its {SECTION} section is not a contract: {err}"))?;
        for entry in contract.publishes.keys().chain(contract.consumes.keys()) {
            let ok = entry.split_once(':').is_some_and(|(topic, t)| !topic.is_empty() && !t.is_empty() && t != "*");
            if !ok {
                let shown = crate::limits::cut_text(entry.clone(), 128);
                return Err(format!("its {SECTION} section names {shown:?}, not \"topic:EventType\""));
            }
        }
        Ok(contract)
    }

    /// `bytes` with `self` added as a `shop:contract` custom section at the
    /// end (which [`Contract::from_wasm`] then reads).
    pub fn embed(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out.extend(custom_section(SECTION, &serde_json::to_vec(self).unwrap_or_default()));
        out
    }
}

/// A Wasm custom section: id 0, size, name, data.
fn custom_section(name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    leb128(&mut body, name.len());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = vec![0];
    leb128(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The version of a schema: the first 12 hex digits of the SHA-256 of its
/// JSON. Two parties agree on a type's schema exactly when they show the
/// same version.
pub fn version(schema: &Value) -> String {
    hex::encode(Sha256::digest(schema.to_string().as_bytes()))[..12].to_owned()
}

/// One party to the contracts, as checked: a component, or the gateway.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Party {
    /// What it publishes and consumes (with schemas).
    #[serde(flatten)]
    pub contract: Contract,
    /// Whether its component carries the contract (or the manifest says it).
    pub embedded: bool,
}

/// The parties to the contracts of one host's manifest, as they serve:
/// updated at every reload and rollback, and asked before a reload.
#[derive(Debug)]
pub struct ContractBook {
    manifest: Arc<Manifest>,
    schemas: Arc<Schemas>,
    parties: RwLock<BTreeMap<String, Party>>,
    /// Held from a reload's check to its switch.
    admissions: tokio::sync::Mutex<()>,
}

/// The gateway, which publishes the orders it accepts.
pub const GATEWAY: &str = crate::manifest::topology::GATEWAY;

impl ContractBook {
    /// Every party of `manifest`, each component with the contract
    /// `contract_of` gives for it (`None`: none embedded).
    ///
    /// # Errors
    /// Every contract broken, one line each.
    pub fn new(
        manifest: Arc<Manifest>,
        schemas: Arc<Schemas>,
        contract_of: impl Fn(&str) -> Option<Contract>,
    ) -> Result<Self, String> {
        let mut parties = BTreeMap::from([(GATEWAY.to_owned(), gateway(&schemas))]);
        let mut problems = Vec::new();
        for (name, settings) in &manifest.components {
            let (party, own) = party(name, settings, contract_of(name), &schemas, manifest.schemas.validate);
            parties.insert(name.clone(), party);
            problems.extend(own);
        }
        problems.extend(crossings(&parties, None));
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Self { manifest, schemas, parties: RwLock::new(parties), admissions: tokio::sync::Mutex::new(()) })
    }

    /// Whether component `name` may serve with `contract` beside the
    /// parties serving now; the party it would be.
    ///
    /// # Errors
    /// Every contract it would break, one line each.
    pub fn admit(&self, name: &str, contract: Option<Contract>) -> Result<Party, String> {
        let settings = self.manifest.components.get(name).ok_or_else(|| format!("no component {name:?}"))?;
        let (candidate, mut problems) = party(name, settings, contract, &self.schemas, self.manifest.schemas.validate);
        let mut parties = self.parties.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        parties.insert(name.to_owned(), candidate.clone());
        problems.extend(crossings(&parties, Some(name)));
        if problems.is_empty() { Ok(candidate) } else { Err(problems.join("\n")) }
    }

    /// Held by a reload from its check ([`ContractBook::admit`]) to its
    /// switch ([`ContractBook::serve`]).
    pub async fn admission(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.admissions.lock().await
    }

    /// Component `name` now serves as `party`.
    pub fn serve(&self, name: &str, party: Party) {
        self.parties.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_owned(), party);
    }

    /// Component `name` serves again with `contract` (a rollback: it was
    /// admitted before).
    pub fn restore(&self, name: &str, contract: Option<Contract>) {
        if let Some(settings) = self.manifest.components.get(name) {
            self.serve(name, party_of(settings, contract, &self.schemas));
        }
    }

    /// The parties as they serve now.
    pub fn parties(&self) -> BTreeMap<String, Party> {
        self.parties.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Component `name`'s party: its embedded `contract`, or what its block
/// says; and what in its contract the block does not allow, or (when the
/// host is `validating` outputs) the host's schemas would refuse.
fn party(
    name: &str,
    settings: &ComponentSettings,
    contract: Option<Contract>,
    schemas: &Schemas,
    validating: bool,
) -> (Party, Vec<String>) {
    let host_schemas = validating.then_some(schemas);
    let problems = contract.as_ref().map(|c| own_problems(name, settings, c, host_schemas)).unwrap_or_default();
    (party_of(settings, contract, schemas), problems)
}

/// The party of a component with `settings`: its embedded `contract`, or
/// what its block says (`publishes` and `consumes`, each to the host's
/// schema of the type), unchecked.
pub fn party_of(settings: &ComponentSettings, contract: Option<Contract>, schemas: &Schemas) -> Party {
    if let Some(contract) = contract {
        return Party { contract, embedded: true };
    }
    let with_schema = |entry: &String| {
        let (_, event_type) = entry.split_once(':')?;
        Some((entry.clone(), schemas.schema(event_type).cloned().unwrap_or(Value::Bool(true))))
    };
    let publishes = settings.publishes.iter().flatten().filter(|e| !e.ends_with(":*")).filter_map(with_schema);
    let consumes = settings.consumes.iter().flatten().filter_map(with_schema);
    Party { contract: Contract { publishes: publishes.collect(), consumes: consumes.collect() }, embedded: false }
}

/// The gateway's party: it publishes `OrderPlaced` to the host's schema.
pub fn gateway(schemas: &Schemas) -> Party {
    let placed = format!("{}:{}", shop_events::topics::ORDERS, shop_events::types::ORDER_PLACED);
    let schema = schemas.schema(shop_events::types::ORDER_PLACED).cloned().unwrap_or(Value::Bool(true));
    Party {
        contract: Contract { publishes: BTreeMap::from([(placed, schema)]), consumes: BTreeMap::new() },
        embedded: false,
    }
}

/// The schema version each party gives each flow it publishes or consumes.
pub fn annotate(flows: &mut [crate::manifest::topology::Flow], parties: &BTreeMap<String, Party>) {
    for flow in flows {
        let entry = format!("{}:{}", flow.topic, flow.event_type);
        for (name, party) in parties {
            let schema = party.contract.publishes.get(&entry).or_else(|| party.contract.consumes.get(&entry));
            if let Some(schema) = schema {
                flow.versions.insert(name.clone(), version(schema));
            }
        }
    }
}

/// What in `contract` component `name`'s block does not allow, and what it
/// publishes that the host's schema of the type would refuse (`schemas`:
/// those outputs are checked against; `None` when they are not).
fn own_problems(
    name: &str,
    settings: &ComponentSettings,
    contract: &Contract,
    schemas: Option<&Schemas>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let granted = settings.publishes.as_deref().unwrap_or_default();
    for (entry, schema) in &contract.publishes {
        let (topic, event_type) = entry.split_once(':').unwrap_or_default();
        if !granted.iter().any(|g| g == entry || *g == format!("{topic}:*")) {
            problems.push(format!(
                "component {name:?} declares it publishes {entry}, which components.{name}.publishes does not grant"
            ));
        }
        if let Some(host) = schemas.and_then(|schemas| schemas.schema(event_type)) {
            for gap in crate::schemas::gaps(schema, host) {
                problems.push(format!(
                    "component {name:?} publishes {entry} {}, which the host's schema of {event_type} \
                     requires: every such output would be refused",
                    said(&gap)
                ));
            }
        }
    }
    for entry in contract.consumes.keys() {
        let (topic, _) = entry.split_once(':').unwrap_or_default();
        if !settings.topics.iter().any(|t| t == topic) {
            problems.push(format!(
                "component {name:?} declares it consumes {entry}, but it is not subscribed to {topic:?} \
                 (components.{name}.topics)"
            ));
        }
        if let Some(listed) = &settings.consumes
            && !listed.contains(entry)
        {
            problems.push(format!(
                "component {name:?} declares it consumes {entry}, which components.{name}.consumes does not list"
            ));
        }
    }
    problems
}

/// Every gap between a publisher and a consumer of the same `topic:Type`;
/// with `only`, those where it is one of the two.
fn crossings(parties: &BTreeMap<String, Party>, only: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    for (publisher, from) in parties {
        for (entry, written) in &from.contract.publishes {
            for (consumer, to) in parties {
                if only.is_some_and(|name| name != publisher && name != consumer) {
                    continue;
                }
                let Some(read) = to.contract.consumes.get(entry) else { continue };
                for gap in crate::schemas::gaps(written, read) {
                    problems.push(format!(
                        "{publisher} publishes {entry} (schema {}) {}, which {consumer} consumes \
                         (schema {}) and requires",
                        version(written),
                        said(&gap),
                        version(read)
                    ));
                }
            }
        }
    }
    problems
}

/// A gap as a refusal says it of the publisher's data.
fn said(gap: &Gap) -> String {
    match gap {
        Gap::Missing(field) => format!("without field `{field}`"),
        Gap::Optional(field) => format!("with field `{field}` optional"),
        Gap::Retyped(field, was, is) => format!("with field `{field}` as {was}, not {is}"),
    }
}

#[cfg(test)]
mod tests;
