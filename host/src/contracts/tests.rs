use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::runtime::tests::{runtime, wasm};

fn shop() -> Arc<Manifest> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../app.toml");
    Arc::new(Manifest::load(&path).unwrap())
}

fn built(name: &str) -> Contract {
    Contract::from_wasm(&std::fs::read(wasm(name)).unwrap()).unwrap().expect("a contract embedded by its build")
}

/// The shop's components as built, checked together.
fn book() -> ContractBook {
    let manifest = shop();
    ContractBook::new(manifest, Arc::new(Schemas::generated()), |name| Some(built(name))).unwrap()
}

/// `contract` with `edit` applied to the schema of `entry`, on `side`.
fn edited(mut contract: Contract, side: &str, entry: &str, edit: impl FnOnce(&mut Value)) -> Contract {
    let map = if side == "publishes" { &mut contract.publishes } else { &mut contract.consumes };
    edit(map.get_mut(entry).unwrap());
    contract
}

fn drop_field(schema: &mut Value, field: &str) {
    schema["properties"].as_object_mut().unwrap().remove(field);
    schema["required"].as_array_mut().unwrap().retain(|f| f != field);
}

#[test]
fn each_component_carries_the_contract_its_build_wrote() {
    let schemas = Schemas::generated();
    let payment = built("payment");
    let published: Vec<&str> = payment.publishes.keys().map(String::as_str).collect();
    assert_eq!(
        published,
        [
            "payments:PaymentAuthorized",
            "payments:PaymentDeclined",
            "payments:PaymentRefunded",
            "payments:PaymentVoided"
        ]
    );
    assert_eq!(payment.publishes["payments:PaymentAuthorized"], *schemas.schema("PaymentAuthorized").unwrap());
    assert!(payment.consumes.contains_key("payments:PaymentRequested"));
    assert!(built("analytics").publishes.is_empty());
    assert!(built("order").consumes.contains_key("orders:OrderPlaced"));
    // The shop's components keep their contracts with each other.
    let parties = book().parties();
    assert!(parties.values().filter(|p| p.embedded).count() == 4, "{:?}", parties.keys());
    assert!(parties[GATEWAY].contract.publishes.contains_key("orders:OrderPlaced"));
}

#[test]
fn a_contract_added_to_a_built_component_is_the_one_read_and_the_component_still_loads() {
    let bytes = std::fs::read(wasm("payment")).unwrap();
    let mut contract = built("payment");
    contract.consumes.clear();
    let with = contract.embed(&bytes);
    assert_eq!(Contract::from_wasm(&with).unwrap(), Some(contract));
    let engine = crate::runtime::Engine::new().unwrap();
    let loaded = crate::runtime::LoadedComponent::from_bytes(&engine, "p".as_ref(), &with).unwrap();
    assert!(loaded.contract.unwrap().consumes.is_empty());
    // A component without a section has no contract.
    assert_eq!(Contract::from_wasm(&std::fs::read(wasm("misbehave")).unwrap()).unwrap(), None);
}

#[test]
fn a_section_that_is_not_a_contract_is_refused_with_the_reason() {
    let bytes = std::fs::read(wasm("misbehave")).unwrap();
    let raw = |json: &[u8]| {
        let mut with = bytes.clone();
        with.extend(custom_section(SECTION, json));
        Contract::from_wasm(&with)
    };
    assert!(raw(b"{\"publishes\":{}}").unwrap().is_some(), "the helper writes a readable section");
    let err = raw(b"not json").unwrap_err();
    assert!(err.contains("shop:contract section is not a contract"), "{err}");
    let err = raw(br#"{"publishes":{"PaymentAuthorized":{}}}"#).unwrap_err();
    assert!(err.contains("\"PaymentAuthorized\", not \"topic:EventType\""), "{err}");
    let err = raw(br#"{"publishes":{},"extra":1}"#).unwrap_err();
    assert!(err.contains("unknown field `extra`"), "{err}");
    let big = format!(r#"{{"publishes":{{"a:B":"{}"}}}}"#, "x".repeat(MAX_CONTRACT_BYTES));
    assert!(raw(big.as_bytes()).unwrap_err().contains("past 1048576"));
    assert!(Contract::from_wasm(b"\0asm\x01\0\0\0\x05").unwrap_err().contains("cannot read its sections"));
}

#[test]
fn a_publisher_that_drops_or_retypes_what_a_consumer_requires_is_refused_naming_both() {
    let book = book();
    let dropped = edited(built("payment"), "publishes", "payments:PaymentAuthorized", |s| drop_field(s, "payment_id"));
    let err = book.admit("payment", Some(dropped)).unwrap_err();
    assert!(err.contains("payment publishes payments:PaymentAuthorized"), "{err}");
    assert!(err.contains("without field `payment_id`, which order consumes"), "{err}");
    assert!(err.contains("the host's schema of PaymentAuthorized"), "the host's own schema too: {err}");
    let retyped = edited(built("payment"), "publishes", "payments:PaymentRefunded", |s| {
        s["properties"]["refunded_cents"] = json!({ "type": "string" });
    });
    let err = book.admit("payment", Some(retyped)).unwrap_err();
    assert!(err.contains("with field `refunded_cents` as \"string\", not \"integer\""), "{err}");
    // Both consumers of PaymentRefunded are named, each on a line.
    assert!(err.lines().any(|l| l.contains("which order consumes")), "{err}");
    assert!(err.lines().any(|l| l.contains("which analytics consumes")), "{err}");
    let optional = edited(built("email"), "publishes", "analytics:EmailSent", |s| {
        s["required"].as_array_mut().unwrap().retain(|f| f != "kind");
    });
    let err = book.admit("email", Some(optional)).unwrap_err();
    assert!(err.contains("with field `kind` optional, which analytics consumes"), "{err}");
    // Adding an optional field breaks nothing.
    let added = edited(built("payment"), "publishes", "payments:PaymentAuthorized", |s| {
        s["properties"]["note"] = json!({ "type": "string" });
    });
    assert!(book.admit("payment", Some(added)).is_ok());
}

#[test]
fn a_consumer_that_requires_what_its_publishers_do_not_send_is_refused_naming_the_publisher() {
    let book = book();
    let stricter = edited(built("order"), "consumes", "orders:OrderPlaced", |s| {
        s["properties"]["coupon"] = json!({ "type": "string" });
        s["required"].as_array_mut().unwrap().push(json!("coupon"));
    });
    let err = book.admit("order", Some(stricter)).unwrap_err();
    assert!(err.contains("gateway publishes orders:OrderPlaced"), "{err}");
    assert!(err.contains("without field `coupon`, which order consumes"), "{err}");
}

#[test]
fn a_contract_must_keep_to_its_manifest_block() {
    let book = book();
    let mut ungranted = built("email");
    ungranted.publishes.insert("orders:OrderConfirmed".into(), json!(true));
    let err = book.admit("email", Some(ungranted)).unwrap_err();
    assert!(err.contains("publishes orders:OrderConfirmed, which components.email.publishes does not grant"), "{err}");
    let mut elsewhere = built("email");
    elsewhere.consumes.insert("payments:PaymentAuthorized".into(), json!(true));
    let err = book.admit("email", Some(elsewhere)).unwrap_err();
    assert!(err.contains("not subscribed to \"payments\""), "{err}");
    let mut unlisted = built("analytics");
    unlisted.consumes.insert("orders:OrderPlaced".into(), json!(true));
    let err = book.admit("analytics", Some(unlisted)).unwrap_err();
    assert!(err.contains("which components.analytics.consumes does not list"), "{err}");
}

#[test]
fn a_component_without_a_contract_is_taken_at_its_manifest_block_s_word() {
    let book = book();
    let party = book.admit("email", None).unwrap();
    assert!(!party.embedded);
    assert_eq!(party.contract.consumes.keys().collect::<Vec<_>>(), ["emails:EmailRequested"]);
    let schemas = Schemas::generated();
    assert_eq!(party.contract.publishes["analytics:EmailSent"], *schemas.schema("EmailSent").unwrap());
    // So a consumer requiring more than the host's schema is refused.
    book.serve("email", party);
    let stricter = edited(built("analytics"), "consumes", "analytics:EmailSent", |s| {
        s["required"].as_array_mut().unwrap().push(json!("opened"));
        s["properties"]["opened"] = json!({ "type": "boolean" });
    });
    let err = book.admit("analytics", Some(stricter)).unwrap_err();
    assert!(err.contains("email publishes analytics:EmailSent") && err.contains("`opened`"), "{err}");
}

#[test]
fn versions_tell_schemas_apart() {
    let schemas = Schemas::generated();
    let placed = schemas.schema("OrderPlaced").unwrap();
    assert_eq!(version(placed), version(&placed.clone()));
    assert_eq!(version(placed).len(), 12);
    assert_ne!(version(placed), version(schemas.schema("OrderConfirmed").unwrap()));
}

#[tokio::test]
async fn a_reload_that_breaks_a_contract_is_refused_and_the_old_version_keeps_serving() {
    let book = Arc::new(book());
    let rt = runtime("payment", 1_000);
    rt.set_contracts(book.clone());
    let before = rt.current().sha256.clone();
    let bytes = std::fs::read(wasm("payment")).unwrap();
    let dropped = edited(built("payment"), "publishes", "payments:PaymentAuthorized", |s| drop_field(s, "payment_id"));
    let err = rt.reload("payment without payment_id", dropped.embed(&bytes)).await.err().unwrap();
    let said = err.to_string();
    assert!(said.contains("refused by the contracts") && said.contains("`payment_id`, which order consumes"), "{said}");
    assert_eq!(rt.current().sha256, before, "the old version serves");
    assert!(rt.history().last().unwrap().outcome.starts_with("rejected: "));
    // A compatible one serves, and the book knows it until a rollback.
    let added = edited(built("payment"), "publishes", "payments:PaymentAuthorized", |s| {
        s["properties"]["note"] = json!({ "type": "string" });
    });
    rt.reload("payment with a note", added.embed(&bytes)).await.unwrap();
    let note = |book: &ContractBook| {
        book.parties()["payment"].contract.publishes["payments:PaymentAuthorized"]["properties"].get("note").is_some()
    };
    assert!(note(&book));
    rt.roll_back().await.unwrap();
    assert!(!note(&book), "the restored version's contract is back");
}

#[test]
fn without_output_validation_the_hosts_schemas_do_not_judge_a_publisher() {
    let mut manifest = (*shop()).clone();
    manifest.schemas.validate = false;
    let book = ContractBook::new(Arc::new(manifest), Arc::new(Schemas::generated()), |name| Some(built(name))).unwrap();
    let dropped = edited(built("payment"), "publishes", "payments:PaymentAuthorized", |s| drop_field(s, "payment_id"));
    let err = book.admit("payment", Some(dropped)).unwrap_err();
    // Its consumer still refuses it; the host, which checks no output, does not.
    assert!(err.contains("without field `payment_id`, which order consumes"), "{err}");
    assert!(!err.contains("the host's schema"), "{err}");
}
