//! The `host` binary's log lines when its stdout is a pipe: JSON lines with
//! `--log-format json` (each handled event's component, version, event and
//! order ids; the guest's own lines as fields), plain text without ANSI
//! escapes otherwise.

mod support;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// A host whose stdout is a pipe read to the end by a thread of its own.
struct Piped {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
}

impl Piped {
    fn start(manifest: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_host"))
            .args(["run", "--manifest"])
            .arg(manifest)
            .args(args)
            .env("KAFKA_BROKERS", brokers())
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("HOST_LOG_FORMAT")
            .env_remove("DATABASE_URL")
            .env_remove("HOST_COMPONENTS")
            .env_remove("HOST_INSTANCE_ID")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start the host binary");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (mut pipe, sink) = (child.stdout.take().unwrap(), stdout.clone());
        std::thread::spawn(move || {
            let mut buffer = [0; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                sink.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        Self { child, stdout }
    }

    fn output(&self) -> String {
        String::from_utf8(self.stdout.lock().unwrap().clone()).expect("stdout is UTF-8")
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "host exited with {status}");
        std::thread::sleep(Duration::from_millis(200));
        self.output()
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a host with `args`, places one order and waits until the payment
/// component has logged its decision; returns the order id and the host.
async fn one_order(tag: &str, args: &[&str]) -> (String, Piped) {
    let dir = temp_dir(tag);
    let ports = Ports::free();
    let (manifest, _) = write_manifest(&dir, ports);
    let host = Piped::start(&manifest, args);
    let client = reqwest::Client::new();
    wait_healthy(&client, ports).await;
    let body = json!({
        "customer": { "name": "Ada", "email": "ada@example.com" },
        "items": [ { "sku": "pen", "quantity": 1, "unit_price_cents": 199 } ],
        "payment": { "card_number": "4242 4242 4242 4242" }
    });
    let response = client.post(format!("http://127.0.0.1:{}/order", ports.gateway)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["order_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "the payment component's log line", || async {
        host.output().lines().any(|l| l.contains("payment decided") && l.contains(&id)).then_some(())
    })
    .await;
    (id, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_event_and_the_guests_fields() {
    let (id, host) = one_order("logs-json", &["--log-format", "json"]).await;
    let output = host.stop();
    let lines: Vec<Value> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect();
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string() && line["target"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l["message"] == "host ready"), "host-side lines too");
    let decided = lines
        .iter()
        .find(|l| l["message"] == "payment decided" && l["span"]["order_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no guest line for {id} in {output}"));
    assert_eq!(decided["target"], "component", "{decided}");
    assert_eq!(decided["component"], "payment", "{decided}");
    let fields = decided["fields"].as_str().unwrap();
    assert!(fields.contains(&format!("order_id={id:?}")) && fields.contains("outcome="), "{decided}");
    let span = &decided["span"];
    assert_eq!(span["name"], "event", "{decided}");
    assert_eq!(span["component"], "payment", "{decided}");
    assert_eq!(span["event_type"], "PaymentRequested", "{decided}");
    assert_eq!(span["version"].as_str().map(str::len), Some(64), "the serving version's sha256: {decided}");
    assert!(span["event_id"].as_str().is_some_and(|e| !e.is_empty()), "{decided}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_a_pipe_has_no_escape_codes() {
    let (id, host) = one_order("logs-text", &[]).await;
    let output = host.stop();
    assert!(!output.contains('\u{1b}'), "ANSI escapes in piped output:\n{output}");
    let decided = output.lines().find(|l| l.contains("payment decided")).unwrap();
    assert!(decided.contains("event{component=payment version="), "{decided}");
    assert!(decided.contains(&format!("order_id={id}")), "{decided}");
    assert!(output.contains("host ready"));
}
