//! Grants hold, proved with `misbehave`: an event type or topic not granted
//! is dead-lettered with the reason, a WASI import not granted refuses the
//! component at load and at reload.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::tests::wasm;
use super::*;
use crate::bus::Inbound;
use crate::clock::ManualClock;
use crate::envelope::Envelope;
use crate::pipeline::{Disposition, Pipeline, RetryPolicy, Topics};
use crate::state::MemoryStore;

fn misbehave(grants: Grants) -> ServiceRuntime {
    let engine = Engine::new().unwrap();
    super::tests::service("misbehave", engine, Limits::default(), grants, Arc::new(MemoryStore::default()))
}

/// Has `misbehave` emit `named` ("topic:EventType") through the pipeline.
async fn emit(pipeline: &Pipeline, offset: i64, named: &str) -> Disposition {
    // A key per event: the same key and time would be the same event id.
    let key = format!("k{offset}");
    let envelope = Envelope::originate("EmitAs", &key, "test", 1, serde_json::json!(named));
    let record = Inbound {
        topic: "in".into(),
        partition: 0,
        offset,
        key: Some(key.into_bytes()),
        value: Some(envelope.value()),
        headers: envelope.header_bytes(None),
    };
    pipeline.process(&record, &CancellationToken::new()).await.unwrap()
}

#[tokio::test]
async fn an_event_outside_the_grant_is_dead_lettered_with_the_reason() {
    let publishes = PublishGrants::parse(&["out:Echoed", "payments:*"]).unwrap();
    let service = Arc::new(misbehave(Grants { publishes, ..Grants::default() }));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));

    for (offset, named) in [(1, "out:Echoed"), (2, "payments:PaymentAuthorized")] {
        let disposition = emit(&pipeline, offset, named).await;
        let Disposition::Publish { records, .. } = disposition else { panic!("{named}: {disposition:?}") };
        assert_eq!(records.len(), 1, "{named} is granted and published");
    }
    for (offset, named) in [(3, "out:OrderConfirmed"), (4, "orders:Echoed")] {
        let disposition = emit(&pipeline, offset, named).await;
        let Disposition::DeadLetter { reason, record } = disposition else { panic!("{named}: {disposition:?}") };
        assert!(reason.contains(named) && reason.contains("out:Echoed"), "names the event and the grant: {reason}");
        let topics = Topics::default();
        assert_eq!(record.topic, topics.physical(&topics.dead_letter), "set aside on the dead-letter topic");
        assert!(record.headers.iter().any(|(k, v)| k == "dlq-reason" && v == reason.as_bytes()));
    }
}

/// A manifest block without `publishes` grants nothing: what the
/// component emits fails its event for good, the reason naming the key.
#[tokio::test]
async fn without_a_publishes_grant_nothing_may_be_published() {
    let publishes = PublishGrants::missing("components.misbehave.publishes");
    let service = Arc::new(misbehave(Grants { publishes, ..Grants::default() }));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    let disposition = emit(&pipeline, 1, "orders:OrderConfirmed").await;
    let Disposition::DeadLetter { reason, .. } = disposition else { panic!("{disposition:?}") };
    assert!(reason.contains("no publishes grant") && reason.contains("components.misbehave.publishes"), "{reason}");
    // Tests and benches may still grant everything, explicitly.
    let service = Arc::new(misbehave(Grants { publishes: PublishGrants::any(), ..Grants::default() }));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    let disposition = emit(&pipeline, 2, "orders:OrderConfirmed").await;
    assert!(matches!(disposition, Disposition::Publish { ref records, .. } if records.len() == 1), "{disposition:?}");
}

#[test]
fn a_component_importing_what_it_is_not_granted_is_refused_at_load() {
    let engine = Engine::new().unwrap();
    // Opens a TCP socket: sockets are granted to nobody.
    let sockets = LoadedComponent::from_file(&engine, &wasm("misbehave-sockets")).unwrap();
    let err = sockets.check_grants(&engine, WasiGrants::default()).unwrap_err().to_string();
    assert!(err.contains("wasi:sockets/") && err.contains("not grantable yet"), "{err}");

    // Sleeps, so imports the monotonic clock.
    let misbehave = LoadedComponent::from_file(&engine, &wasm("misbehave")).unwrap();
    let stderr_only = WasiGrants { stderr: true, ..WasiGrants::NONE };
    let err = misbehave.check_grants(&engine, stderr_only).unwrap_err().to_string();
    assert!(err.contains("wasi:clocks/monotonic-clock") && err.contains("\"clocks\""), "{err}");
    misbehave.check_grants(&engine, WasiGrants { clocks: true, ..stderr_only }).unwrap();

    // The Rust services app.toml serves (components/NAME/Cargo.toml) use no
    // WASI capability at all, and import the vault only where the manifest
    // grants it (wit-bindgen links only the imports a component calls).
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../app.toml");
    let manifest = crate::manifest::Manifest::load(&path).unwrap();
    let components = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../components");
    let stem = |c: &crate::manifest::ComponentSettings| Some(c.wasm.file_stem()?.to_str()?.to_owned());
    let rust: Vec<(String, bool)> = manifest
        .components
        .values()
        .filter_map(|c| Some((stem(c)?, c.vault)))
        .filter(|(stem, _)| components.join(stem).join("Cargo.toml").is_file())
        .collect();
    assert!(rust.len() >= 4 && rust.contains(&("payment".into(), true)), "{rust:?}");
    for (name, vault) in &rust {
        let component = LoadedComponent::from_file(&engine, &wasm(name)).unwrap();
        let grants = Grants { vault: *vault, ..Grants::from(WasiGrants::NONE) };
        component.check_grants(&engine, grants).unwrap_or_else(|err| panic!("{name}: {err}"));
    }
    // Without the vault grant, payment is refused.
    let payment = LoadedComponent::from_file(&engine, &wasm("payment")).unwrap();
    let err = payment.check_grants(&engine, WasiGrants::default()).unwrap_err().to_string();
    assert!(err.contains("shop:service/vault") && err.contains("vault grant"), "{err}");
}

#[tokio::test]
async fn a_reload_importing_what_it_is_not_granted_is_refused() {
    let rt = misbehave(Grants::default());
    let before = rt.current().sha256.clone();
    let bytes = std::fs::read(wasm("misbehave-sockets")).unwrap();
    let err = rt.reload("misbehave-sockets.wasm", bytes).await.err().unwrap();
    assert!(matches!(err, LoadError::Ungranted { .. }), "{err}");
    assert_eq!(rt.current().sha256, before, "the old version keeps serving");
}

#[test]
fn app_toml_grants_each_service_what_it_uses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../app.toml");
    let manifest = crate::manifest::Manifest::load(&path).unwrap();
    let engine = Engine::new().unwrap();
    for (name, settings) in &manifest.components {
        let grants = settings.grants(name).unwrap();
        let component = LoadedComponent::from_file(&engine, &settings.wasm).unwrap();
        assert_eq!(grants.vault, name == "payment", "{name}: only payment may redeem cards");
        component.check_grants(&engine, grants).unwrap_or_else(|err| panic!("{name}: {err}"));
    }
    let granted = |name: &str, event: &str| {
        let (topic, event_type) = event.split_once(':').unwrap();
        let out =
            OutgoingEvent { topic: topic.into(), event_type: event_type.into(), key: "k".into(), payload: vec![] };
        manifest.components[name].grants(name).unwrap().publishes.check(&[out]).is_ok()
    };
    assert!(granted("payment", "payments:PaymentAuthorized"));
    assert!(!granted("payment", "orders:OrderConfirmed"), "payment cannot confirm an order");
    assert!(granted("order", "orders:OrderConfirmed"));
    assert!(!granted("order", "payments:PaymentAuthorized"), "order cannot authorize a payment");
    assert!(!granted("analytics", "analytics:EmailSent"), "analytics publishes nothing");
    // The JavaScript email service may replace the Rust one while running.
    let email_js = LoadedComponent::from_file(&engine, &wasm("email-js")).unwrap();
    email_js.check_grants(&engine, manifest.components["email"].grants("email").unwrap()).unwrap();
}

#[test]
fn grant_names_in_the_manifest_are_checked() {
    let component = |extra: &str| {
        let text = format!(
            "[gateway]\nport = 3005\n[components.order]\nwasm = {:?}\nport = 3002\ntopics = [\"orders\"]\ngroup = \"g\"\n{extra}",
            wasm("order")
        );
        let manifest = crate::manifest::Manifest::parse(&text).unwrap();
        manifest.validate().map(|()| manifest).map_err(|err| err.to_string())
    };
    let defaults = component("").unwrap().components["order"].grants("order").unwrap();
    let absent = Grants { publishes: PublishGrants::missing("components.order.publishes"), ..Grants::default() };
    assert_eq!(defaults, absent, "absent: publishes nothing; clocks, random and stderr");
    let m = component("publishes = [\"orders:OrderConfirmed\"]\nwasi = []").unwrap();
    assert_eq!(m.components["order"].grants("order").unwrap().wasi, WasiGrants::NONE);
    for (extra, needle) in [
        ("wasi = [\"sockets\"]", "`components.order.wasi`: \"sockets\" is not grantable yet"),
        ("wasi = [\"files\"]", "not grantable yet"),
        ("wasi = [\"environment\"]", "not grantable yet"),
        ("wasi = [\"clock\"]", "`components.order.wasi`: unknown WASI grant \"clock\""),
        ("publishes = [\"orders\"]", "`components.order.publishes`"),
        ("publishes = [\"or ders:X\"]", "`components.order.publishes`"),
    ] {
        let err = component(extra).unwrap_err();
        assert!(err.contains(needle), "{extra}: expected {needle:?} in {err}");
    }
}

#[tokio::test]
async fn a_fired_timer_emitting_outside_the_grant_is_dead_lettered() {
    let publishes = PublishGrants::parse(&["out:Echoed"]).unwrap();
    let service = Arc::new(misbehave(Grants { publishes, ..Grants::default() }));
    let store = service.state_store().clone();
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    let timer = crate::state::Timer {
        id: "t1".into(),
        at_ms: 1,
        event_type: "EmitAs".into(),
        key: "k".into(),
        payload: "\"orders:OrderCancelled\"".into(),
        set_by: "e0".into(),
        correlation_id: None,
        traceparent: None,
        nonce: 0,
    };
    let set = crate::state::Commit { timers: vec![TimerChange::Set(timer.clone())], ..Default::default() };
    store.commit_batch(&[set], &crate::state::ReadSet::default()).unwrap();
    let disposition = pipeline.process_timer(&timer, &CancellationToken::new()).await.unwrap();
    let Disposition::DeadLetter { reason, .. } = disposition else { panic!("{disposition:?}") };
    assert!(reason.contains("orders:OrderCancelled") && reason.contains("out:Echoed"), "{reason}");
}

/// Granted, a guest's stderr goes to the host's log and names a trap's
/// cause (a Rust guest's panic message); not granted, it goes nowhere.
#[tokio::test]
async fn stderr_reaches_the_trap_only_when_granted() {
    let granted = misbehave(Grants::default());
    let err = super::tests::handle(&granted, &super::tests::event("Panic", "p")).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Trap(m) if m.contains("its stderr: ") && m.contains(" / asked to panic / ")),
        "{err}"
    );

    let wasi = WasiGrants::parse(&["clocks".to_owned(), "random".to_owned()]).unwrap();
    let silent = misbehave(Grants { wasi, ..Grants::default() });
    let err = super::tests::handle(&silent, &super::tests::event("Panic", "p")).await.unwrap_err();
    assert!(matches!(&err, CallError::Trap(m) if !m.contains("stderr") && !m.contains("asked to panic")), "{err}");
}

/// An output whose data breaks its event type's schema is dead-lettered
/// before anything is committed, the reason naming the output, the field
/// and the rule; a type without a schema passes as before.
#[tokio::test]
async fn an_output_breaking_its_schema_is_dead_lettered_naming_the_field() {
    let service = Arc::new(misbehave(Grants { publishes: PublishGrants::any(), ..Grants::default() }));
    service.set_schemas(Arc::new(crate::schemas::Schemas::generated()));
    let pipeline =
        Pipeline::new(service.clone(), Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    // misbehave emits `{}`: PaymentAuthorized requires order_id and more.
    let disposition = emit(&pipeline, 1, "payments:PaymentAuthorized").await;
    let Disposition::DeadLetter { reason, .. } = disposition else { panic!("{disposition:?}") };
    assert!(reason.contains("output 0 (PaymentAuthorized to payments)"), "{reason}");
    assert!(reason.contains("order_id") && reason.contains("is a required property"), "{reason}");
    assert!(service.state_store().pending_outbox(10).unwrap().is_empty(), "nothing was committed");
    let disposition = emit(&pipeline, 2, "out:Echoed").await;
    assert!(matches!(disposition, Disposition::Publish { .. }), "no schema, no check: {disposition:?}");
    assert_eq!(service.stages().totals().validate.count, 2, "the check is timed as a stage");
}
