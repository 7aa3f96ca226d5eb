//! Contracts between components, with the real binary on a real broker:
//! `host contract` shows what a built component carries and adds a contract
//! to a copy; a payment whose `PaymentAuthorized` lacks `payment_id` (which
//! the order service requires) is refused by `host check`, by `host run`,
//! and by every reload of a running host (admin upload, `host reload`, the
//! file watch), each refusal naming the field and the consumer, while the
//! version serving goes on and the saga still completes.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn host(args: &[&str], path: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_host")).args(args).arg(path).envs(env.iter().copied()).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// A copy of the built payment in `dir` whose contract's
/// `PaymentAuthorized` has no `payment_id`.
fn payment_without_payment_id(dir: &Path) -> std::path::PathBuf {
    let (ok, said) = host(&["contract", "--json"], &component("payment"), &[]);
    assert!(ok, "{said}");
    let mut contract: Value = serde_json::from_str(&said).unwrap();
    let authorized = &mut contract["publishes"]["payments:PaymentAuthorized"];
    authorized["properties"].as_object_mut().unwrap().remove("payment_id");
    authorized["required"].as_array_mut().unwrap().retain(|f| f != "payment_id");
    let file = dir.join("contract.json");
    std::fs::write(&file, contract.to_string()).unwrap();
    let bad = dir.join("payment-bad.wasm");
    std::fs::copy(component("payment"), &bad).unwrap();
    let (ok, said) = host(&["contract", "--set", file.to_str().unwrap()], &bad, &[]);
    assert!(ok, "{said}");
    bad
}

fn names_field_and_consumer(said: &str) {
    assert!(
        said.contains("payment publishes payments:PaymentAuthorized")
            && said.contains("without field `payment_id`, which order consumes"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_drops_a_field_order_requires_is_refused_at_check_start_and_every_reload() {
    let brokers = brokers();
    let dir = temp_dir("contracts");
    let (ok, said) = host(&["contract"], &component("payment"), &[]);
    assert!(ok, "{said}");
    let line = said.lines().find(|l| l.contains("payments:PaymentAuthorized")).unwrap_or_default();
    assert!(line.starts_with("publishes") && line.split_whitespace().last().unwrap().len() == 12, "{said}");
    let (_, said) = host(&["contract"], &component("misbehave"), &[]);
    assert!(said.contains("carries no contract"), "{said}");
    let bad = payment_without_payment_id(&dir);

    // Checked and started with it: refused, nothing served.
    let options = Options { wasm: vec![("payment".into(), bad.clone())], ..Options::default() };
    let (refused, _) = write_manifest_with(&dir.join("bad"), Ports::free(), &options);
    let (ok, said) = host(&["check", "--manifest"], &refused, &[]);
    assert!(!ok);
    names_field_and_consumer(&said);
    let mut start = HostProcess::start(&refused, Some(&brokers));
    let status = start.wait(Duration::from_secs(60)).expect("a host with a broken contract exits");
    assert!(!status.success());
    names_field_and_consumer(&start.output());

    // A host serving payment from a file of its own.
    let live = dir.join("payment.wasm");
    std::fs::copy(component("payment"), &live).unwrap();
    let ports = Ports::free();
    let options = Options { wasm: vec![("payment".into(), live.clone())], ..Options::default() };
    let (manifest, _) = write_manifest_with(&dir, ports, &options);
    let host_process = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host_process).await;
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    let serving =
        get_json(&client, &format!("http://127.0.0.1:{}/health", ports.payment)).await.unwrap()["version"].clone();

    // Admin upload.
    let answer = client
        .post(format!("{admin}/components/payment/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .body(std::fs::read(&bad).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 422);
    names_field_and_consumer(&answer.text().await.unwrap());
    // `host reload`.
    let env = [("HOST_ADMIN_URL", admin.as_str()), ("HOST_ADMIN_TOKEN", ADMIN_TOKEN)];
    let (ok, said) = host(&["reload", "payment"], &bad, &env);
    assert!(!ok);
    names_field_and_consumer(&said);
    // The file watch.
    let tmp = live.with_extension("tmp");
    std::fs::copy(&bad, &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    let refusals = eventually(Duration::from_secs(30), "the watch's reload refused", || async {
        let listed = client.get(format!("{admin}/components")).bearer_auth(ADMIN_TOKEN).send().await.ok()?;
        let listed: Value = listed.json().await.ok()?;
        let history = listed["payment"]["history"].as_array()?.clone();
        let refused: Vec<String> = history
            .iter()
            .filter_map(|h| h["outcome"].as_str().filter(|o| o.starts_with("rejected")).map(str::to_owned))
            .collect();
        (refused.len() >= 3).then_some(refused)
    })
    .await;
    for refusal in &refusals {
        names_field_and_consumer(refusal);
    }
    let now =
        get_json(&client, &format!("http://127.0.0.1:{}/health", ports.payment)).await.unwrap()["version"].clone();
    assert_eq!(now, serving, "the version serving goes on");

    // And it still serves: an order goes through to its confirmation.
    let body = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
        "payment": { "card_number": "4242424242424242" }
    });
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let placed = place_until_accepted(&client, &gateway, "contracts-1", &body).await;
    let id = placed["order_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(60), "the order confirmed", || async {
        (get_json(&client, &format!("{gateway}/order/{id}")).await?["status"] == "CONFIRMED").then_some(())
    })
    .await;
    drop(host_process);
}
