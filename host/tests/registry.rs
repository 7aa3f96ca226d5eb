//! A real schema registry (Apicurio Registry's Confluent-compatible API,
//! `scripts/registry.sh`): a host with `[schemas] registry` registers every
//! event type's schema at start, under `{topic_prefix}{EventType}`, and
//! `host check` finds them compatible; a registry whose latest version of
//! one subject lacks a field the host's schema requires (under BACKWARD)
//! makes `host check` fail and the host refuse to start, naming the type,
//! the subject and the field, with nothing registered.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// The registry under test, or a panic saying how to start one.
fn registry_url() -> String {
    std::env::var("SCHEMA_REGISTRY_URL").ok().filter(|u| !u.is_empty()).expect(
        "registry tests need a schema registry: run `scripts/registry.sh start` and set SCHEMA_REGISTRY_URL=$(scripts/registry.sh url) (`just test` does both)",
    )
}

/// The manifest with `[schemas] registry` set.
fn with_registry(manifest: &Path, url: &str) {
    let mut text = std::fs::read_to_string(manifest).unwrap();
    text.push_str(&format!("\n[schemas]\nregistry = \"{url}\"\n"));
    std::fs::write(manifest, text).unwrap();
}

/// `host check` on `manifest`: success and what it printed.
fn host_check(manifest: &Path) -> (bool, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_host")).arg("check").arg("--manifest").arg(manifest).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

async fn subjects(client: &reqwest::Client, url: &str, prefix: &str) -> Vec<String> {
    let all: Vec<String> = client.get(format!("{url}/subjects")).send().await.unwrap().json().await.unwrap();
    let mut mine: Vec<String> = all.into_iter().filter(|s| s.starts_with(prefix)).collect();
    mine.sort();
    mine
}

fn generated_types() -> Vec<String> {
    let mut types: Vec<String> = std::fs::read_dir(repo().join("schemas"))
        .unwrap()
        .filter_map(|e| e.unwrap().path().file_stem()?.to_str().map(str::to_owned))
        .collect();
    types.sort();
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_registers_its_schemas_and_check_finds_them_compatible() {
    let url = registry_url();
    let brokers = brokers();
    let dir = temp_dir("registry");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    with_registry(&manifest, &url);
    let client = reqwest::Client::new();

    // Before the host: every subject is new.
    let (ok, said) = host_check(&manifest);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("schema OrderPlaced (subject {prefix}OrderPlaced): ")), "{said}");
    assert!(subjects(&client, &url, &prefix).await.is_empty(), "checking registers nothing");

    let host = HostProcess::start(&manifest, Some(&brokers));
    wait_healthy(&client, ports).await;
    let types = generated_types();
    let expected: Vec<String> = types.iter().map(|t| format!("{prefix}{t}")).collect();
    assert_eq!(subjects(&client, &url, &prefix).await, expected, "one subject per event type");
    let latest = get_json(&client, &format!("{url}/subjects/{prefix}PaymentAuthorized/versions/latest")).await.unwrap();
    let schema: Value = serde_json::from_str(latest["schema"].as_str().unwrap()).unwrap();
    let checked_in: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/PaymentAuthorized.json")).unwrap()).unwrap();
    assert_eq!(schema["required"], checked_in["required"], "the checked-in schema was registered: {schema}");
    drop(host);

    // Started again: the same schemas, the same versions, no new one.
    let (ok, said) = host_check(&manifest);
    assert!(ok, "{said}");
    assert_eq!(said.matches("compatible with the latest version").count(), types.len(), "{said}");
    let again = HostProcess::start(&manifest, Some(&brokers));
    wait_healthy(&client, ports).await;
    let versions = get_json(&client, &format!("{url}/subjects/{prefix}OrderPlaced/versions")).await.unwrap();
    assert_eq!(versions.as_array().map(Vec::len), Some(1), "registered once: {versions}");
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_the_registry_finds_incompatible_stops_the_host_and_names_the_field() {
    let url = registry_url();
    let brokers = brokers();
    let dir = temp_dir("registry-refused");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    with_registry(&manifest, &url);
    let client = reqwest::Client::new();
    // Someone registered a PaymentAuthorized with only `order_id`, and the
    // subject is BACKWARD: a reader of its data cannot count on the fields
    // the host's schema requires.
    let subject = format!("{prefix}PaymentAuthorized");
    let media = "application/vnd.schemaregistry.v1+json";
    let config = client
        .put(format!("{url}/config/{subject}"))
        .header("content-type", media)
        .body(json!({ "compatibility": "BACKWARD" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), 200, "{}", config.text().await.unwrap());
    let old = json!({ "type": "object", "properties": { "order_id": { "type": "string" } }, "required": ["order_id"] });
    let registered = client
        .post(format!("{url}/subjects/{subject}/versions"))
        .header("content-type", media)
        .body(json!({ "schemaType": "JSON", "schema": old.to_string() }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 200, "{}", registered.text().await.unwrap());

    let (ok, said) = host_check(&manifest);
    assert!(!ok, "{said}");
    assert!(said.contains(&format!("schema PaymentAuthorized (subject {subject}): INCOMPATIBLE")), "{said}");
    assert!(said.contains("required field `payment_id` added"), "the field is named: {said}");
    assert!(said.contains("1 schema(s) incompatible"), "{said}");

    let mut host = HostProcess::start(&manifest, Some(&brokers));
    let status = host.wait(Duration::from_secs(60)).expect("the host refuses to start");
    assert!(!status.success());
    // Its last lines may still be on their way from the pipe.
    let named = format!("PaymentAuthorized (subject {subject})");
    let output = eventually(Duration::from_secs(10), "the refusal in the host's output", || async {
        let output = host.output();
        output.contains(&named).then_some(output)
    })
    .await;
    assert!(output.contains("required field `payment_id` added"), "{output}");
    assert_eq!(subjects(&client, &url, &prefix).await, [subject], "nothing registered");
}
