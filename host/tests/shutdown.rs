//! SIGTERM always ends the host, on a real broker: repeated start → reload
//! by file change → orders in flight → SIGTERM exits 0 within the drain
//! timeout; and a call that outlasts the drain timeout is abandoned (its
//! record delivered again later) with a non-zero exit, not waited for.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// The drain timeout of these tests' manifests, and the host's grace to close.
const DRAIN_MS: u64 = 2_000;
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Sets `runtime.drain_timeout_ms` and points payment at a copy of its
/// component in `dir` (which the test swaps); returns that copy's path.
fn prepare(manifest: &Path, dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("payment.wasm");
    std::fs::copy(component("payment"), &copy).unwrap();
    let mut app: toml::Table = std::fs::read_to_string(manifest).unwrap().parse().unwrap();
    app["runtime"].as_table_mut().unwrap().insert("drain_timeout_ms".into(), toml::Value::Integer(DRAIN_MS as i64));
    let payment = app["components"].as_table_mut().unwrap()["payment"].as_table_mut().unwrap();
    payment.insert("wasm".into(), toml::Value::String(copy.display().to_string()));
    std::fs::write(manifest, toml::to_string(&app).unwrap()).unwrap();
    copy
}

/// Replaces `path` by `source` in one rename, as a deploy would.
fn swap(source: &Path, path: &Path) {
    let staged = path.with_extension("staged");
    std::fs::copy(source, &staged).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_reloads_with_orders_in_flight_always_exits() {
    const TRIES: usize = 5;
    let brokers = brokers();
    let dir = temp_dir("shutdown");
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let wasm = prepare(&manifest, &dir);
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    for attempt in 0..TRIES {
        let mut host = HostProcess::start(&manifest, Some(&brokers));
        wait_healthy(&client, ports).await;
        // Reload payment to another version and back, as the issue's
        // reproduction did, then stop with orders in flight.
        swap(&component("payment-v2"), &wasm);
        let reloaded = format!("http://127.0.0.1:{}/health", ports.payment);
        let v2 = eventually(Duration::from_secs(20), "the watcher to load payment-v2", || async {
            let health = get_json(&client, &reloaded).await?;
            let version = health["version"].as_str()?.to_owned();
            (health["wasm"].as_str().is_some() && host.output().contains("reloaded")).then_some(version)
        })
        .await;
        swap(&component("payment"), &wasm);
        eventually(Duration::from_secs(20), "the watcher to load payment back", || async {
            let health = get_json(&client, &reloaded).await?;
            (health["version"].as_str()? != v2).then_some(())
        })
        .await;
        for i in 0..20 {
            let body = json!({
                "customer": { "name": "Ada", "email": "ada@example.com" },
                "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
                "payment": { "card_number": "4242424242424242" }
            });
            let sent = client
                .post(format!("{gateway}/order"))
                .header("idempotency-key", format!("shutdown-{attempt}-{i}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(sent.status(), 202);
        }
        host.terminate();
        let asked = Instant::now();
        let status = host.wait(Duration::from_millis(DRAIN_MS) + CLOSE_GRACE + Duration::from_secs(5));
        let Some(status) = status else {
            panic!("try {attempt}: the host did not exit after SIGTERM:\n{}", host.output());
        };
        assert!(status.success(), "try {attempt}: exit {status}:\n{}", host.output());
        eprintln!("shutdown try {attempt}: exited 0 in {:?}", asked.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlasts_the_drain_is_abandoned_with_a_failure_exit() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    let brokers = brokers();
    let dir = temp_dir("shutdown-stuck");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    prepare(&manifest, &dir);
    // A component whose call spins for up to a minute (its time budget).
    let misbehave_port = add_component(&manifest, "misbehave", "timeout_ms = 60000");
    let mut host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    wait_ports_healthy(&client, &[misbehave_port]).await;
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let envelope = json!({
        "id": "spin-1", "type": "Spin", "order_id": "o1", "correlation_id": "c1",
        "timestamp_ms": 1, "schema_version": 1, "producer": "test", "data": {}
    })
    .to_string();
    producer.send(BaseRecord::to(&format!("{prefix}misbehave")).key("o1").payload(&envelope)).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let health = format!("http://127.0.0.1:{misbehave_port}/health");
    eventually(Duration::from_secs(20), "the spinning call to start", || async {
        let stages = get_json(&client, &health).await?;
        (stages["stages"]["decode"]["count"].as_u64()? >= 1).then_some(())
    })
    .await;

    host.terminate();
    let asked = Instant::now();
    let status = host.wait(Duration::from_millis(DRAIN_MS) + CLOSE_GRACE + Duration::from_secs(5));
    let Some(status) = status else { panic!("the host waited for the spinning call:\n{}", host.output()) };
    assert!(!status.success(), "abandoning work is a failure exit:\n{}", host.output());
    assert!(host.output().contains("abandon"), "{}", host.output());
    eprintln!("stuck call: exited {status} in {:?}", asked.elapsed());
}
