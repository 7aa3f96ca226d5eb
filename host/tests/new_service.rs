//! `just new-service`: a Rust and a JavaScript service scaffolded into a
//! temporary copy of the repository build (the Rust one passes its own unit
//! tests) and are served beside the shop from the manifest blocks they were
//! given, on a real broker: each handles an event of its topic and answers
//! its query. The repository itself is never touched.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{Value, json};
use support::*;

/// The scaffolded services' names (in the copy only).
const NAME: &str = "scaffolded";
const JS_NAME: &str = "scaffolded-js";

/// A copy of the repository's sources (tracked and untracked, not ignored:
/// no target/, no node_modules), removed on drop.
struct Copy(PathBuf);

impl Copy {
    fn of_repo() -> Self {
        let dir = temp_dir("new-service");
        let listed = Command::new("git")
            .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
            .current_dir(repo())
            .output()
            .expect("git lists the repository's files");
        assert!(listed.status.success(), "git ls-files: {}", String::from_utf8_lossy(&listed.stderr));
        for file in listed.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
            let file = Path::new(std::str::from_utf8(file).unwrap());
            let from = repo().join(file);
            if !from.is_file() {
                continue; // deleted in the working tree
            }
            let to = dir.join(file);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap_or_else(|err| panic!("copying {from:?}: {err}"));
        }
        Self(dir)
    }

    /// Runs `program args` in the copy; its output, or a panic with it.
    fn run(&self, program: &str, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
        Command::new(program)
            .args(args)
            .current_dir(&self.0)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .output()
            .unwrap_or_else(|err| panic!("failed to run {program}: {err}"))
    }

    fn run_ok(&self, program: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
        let output = self.run(program, args, env);
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{program} {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One envelope as the host reads it, for the scaffolded service's topic.
fn envelope(id: &str, event_type: &str) -> Vec<u8> {
    let envelope = json!({
        "id": id, "type": event_type, "order_id": "k-1", "correlation_id": id, "causation_id": null,
        "timestamp_ms": 1_764_100_000_000_u64, "schema_version": 1, "producer": "test", "data": { "hello": "world" },
    });
    serde_json::to_vec(&envelope).unwrap()
}

#[test]
fn new_service_refuses_bad_and_taken_names_and_writes_nothing() {
    let copy = Copy::of_repo();
    let before = std::fs::read_to_string(copy.0.join("app.toml")).unwrap();
    for (name, says) in [
        ("Bad_Name", "is not a service name"),
        ("payment", "exists already"),
        ("timer", "taken by the host"),
        ("--lang", "usage"),
    ] {
        let output = copy.run("bash", &["scripts/new-service.sh", name], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "{name}: {stderr}");
    }
    let output = copy.run("bash", &["scripts/new-service.sh", "fine", "--lang", "cobol"], &[]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown language"), "{output:?}");
    assert_eq!(std::fs::read_to_string(copy.0.join("app.toml")).unwrap(), before, "app.toml untouched");
    assert!(!copy.0.join("components/fine").exists() && !copy.0.join("components/Bad_Name").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffolded_services_build_and_are_served_beside_the_shop() {
    let brokers = brokers();
    let copy = Copy::of_repo();
    let said = copy.run_ok("bash", &["scripts/new-service.sh", NAME], &[]);
    assert!(said.contains(&format!("[components.{NAME}]")), "{said}");
    copy.run_ok("bash", &["scripts/new-service.sh", JS_NAME, "--lang", "js"], &[]);

    // One folder each, one workspace member (Rust), one manifest block each
    // on the next free ports.
    assert!(copy.0.join(format!("components/{NAME}/src/lib.rs")).is_file());
    assert!(copy.0.join(format!("components/{JS_NAME}/src/index.js")).is_file());
    let workspace = std::fs::read_to_string(copy.0.join("Cargo.toml")).unwrap();
    assert!(workspace.contains(&format!("\"components/{NAME}\",")), "not a workspace member");
    assert!(!workspace.contains(&format!("\"components/{JS_NAME}\"")), "JavaScript is no crate");
    let blocks = manifest_ports(&copy.0.join("app.toml"));
    let highest = manifest_ports(&repo().join("app.toml")).into_values().chain([3005]).max().unwrap();
    assert_eq!((blocks[NAME], blocks[JS_NAME]), (highest + 1, highest + 2), "the next free ports");
    let image = std::fs::read_to_string(copy.0.join("deploy/app.container.toml")).unwrap();
    assert!(image.contains(&format!("[components.{NAME}]")), "the image's manifest serves it too");
    // `just build-components` builds what this lists.
    let builds = copy.run_ok("bash", &["scripts/services.sh", "builds"], &[]);
    let listed = [format!("rust {NAME}"), format!("js components/{JS_NAME}")];
    assert!(listed.iter().all(|l| builds.lines().any(|b| b == l)), "{builds}");

    // The Rust one's unit tests (MemoryHost) pass, and both build as
    // components. A target directory of their own, kept between runs so
    // that only the new crate compiles again.
    let target = repo().join("target/new-service");
    let env = [("CARGO_TARGET_DIR", target.as_path())];
    let tested = copy.run_ok("cargo", &["test", "-q", "-p", NAME], &env);
    assert!(tested.contains("2 passed"), "{tested}");
    copy.run_ok("cargo", &["build", "-q", "--release", "--target", "wasm32-wasip2", "-p", NAME], &env);
    copy.run_ok("bash", &[&format!("components/{JS_NAME}/build.sh")], &env);
    let wasm = |name: &str| target.join(format!("wasm32-wasip2/release/{name}.wasm"));

    // Served beside the shop, from the copy's app.toml as it stands.
    let dir = temp_dir("new-service-host");
    let ports = Ports::free();
    let built = vec![(NAME.into(), wasm(NAME)), (JS_NAME.into(), wasm(JS_NAME))];
    let options = Options { app: Some(copy.0.join("app.toml")), wasm: built, ..Options::default() };
    let (manifest, prefix) = write_manifest_with(&dir, ports, &options);
    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    wait_host_healthy(&client, ports, &host).await;
    let served = manifest_ports(&manifest);
    wait_ports_healthy(&client, &[served[NAME], served[JS_NAME]]).await;

    // An event on each one's topic is handled, and its query answers for it.
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for name in [NAME, JS_NAME] {
        let id = uuid::Uuid::new_v4().to_string();
        let value = envelope(&id, "Greeted");
        producer.send(BaseRecord::to(&format!("{prefix}{name}")).key("k-1").payload(&value)).unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
        let url = format!("http://127.0.0.1:{}/events", served[name]);
        let counts: Value = eventually(Duration::from_secs(60), &format!("{name} to handle the event"), || async {
            let counts = get_json(&client, &url).await?;
            (counts["handled"] == 1).then_some(counts)
        })
        .await;
        assert_eq!(counts["by_type"], json!({ "Greeted": 1 }), "{name}: {counts}");
        assert_eq!(counts["last_event_id"], id, "{name}: {counts}");
    }

    // The shop beside them still runs an order to its end.
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let order = json!({
        "customer": { "name": "Grace Hopper", "email": "grace@example.com" },
        "items": [ { "sku": "book", "quantity": 1, "unit_price_cents": 1250 } ],
        "payment": { "card_number": "4242424242424242" }
    });
    let placed = place_until_accepted(&client, &gateway, &uuid::Uuid::new_v4().to_string(), &order).await;
    let order_url = format!("{gateway}/order/{}", placed["order_id"].as_str().unwrap());
    let status = eventually(Duration::from_secs(30), "the order to end", || async {
        let order = get_json(&client, &order_url).await?;
        (order["status"] != "PENDING" && order["status"] != "STOCK_RESERVED").then_some(order["status"].clone())
    })
    .await;
    assert_eq!(status, "CONFIRMED");
    drop(host);
    let _ = std::fs::remove_dir_all(&dir);
}
