//! Helpers shared by the integration tests: locating the built components,
//! writing a manifest with free ports and unique topics, and running the real
//! `host` binary.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A built component, or a panic saying how to build it.
pub fn component(name: &str) -> PathBuf {
    let path = repo().join(format!("target/wasm32-wasip2/release/{name}.wasm"));
    assert!(path.is_file(), "{path:?} is missing: run `just build-components` first");
    path
}

/// The broker under test, or a panic saying how to start one.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .expect("integration tests need a real broker: run `just kafka` and set KAFKA_BROKERS=127.0.0.1:9092 (`just test` does both)")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Ports of one test app.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub gateway: u16,
    pub payment: u16,
    pub order: u16,
    pub email: u16,
    pub analytics: u16,
    pub admin: u16,
}

/// The admin token of test manifests.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl Ports {
    pub fn free() -> Self {
        Self {
            gateway: free_port(),
            payment: free_port(),
            order: free_port(),
            email: free_port(),
            analytics: free_port(),
            admin: free_port(),
        }
    }

    pub fn all(&self) -> [u16; 5] {
        [self.gateway, self.payment, self.order, self.email, self.analytics]
    }
}

/// Writes a manifest of the four components with `ports` and a unique
/// topic prefix; returns its path and the prefix.
pub fn write_manifest(dir: &Path, ports: Ports) -> (PathBuf, String) {
    let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
    let text = format!(
        r#"
[kafka]
partitions = 3
topic_prefix = "{prefix}"

[gateway]
port = {gateway}

[admin]
port = {admin}
token = "{token}"

[components.payment]
wasm = "{payment_wasm}"
port = {payment}
topics = ["payments"]
group = "payment-service"
config = {{ max_amount_cents = "500000" }}

[components.order]
wasm = "{order_wasm}"
port = {order}
topics = ["orders", "payments"]
group = "order-service"

[components.email]
wasm = "{email_wasm}"
port = {email}
topics = ["emails"]
group = "email-service"

[components.analytics]
wasm = "{analytics_wasm}"
port = {analytics}
topics = ["orders", "payments", "emails", "analytics"]
group = "analytics-service"
"#,
        gateway = ports.gateway,
        admin = ports.admin,
        token = ADMIN_TOKEN,
        payment = ports.payment,
        order = ports.order,
        email = ports.email,
        analytics = ports.analytics,
        payment_wasm = component("payment").display(),
        order_wasm = component("order").display(),
        email_wasm = component("email").display(),
        analytics_wasm = component("analytics").display(),
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("app.toml");
    std::fs::write(&path, text).unwrap();
    (path, prefix)
}

/// A running `host` process; killed on drop if still running.
pub struct HostProcess {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl HostProcess {
    /// Starts `host run` on `manifest` against `brokers` (`None`: embedded).
    pub fn start(manifest: &Path, brokers: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_host"));
        command
            .args(["run", "--manifest"])
            .arg(manifest)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match brokers {
            Some(b) => command.env("KAFKA_BROKERS", b),
            None => command.env_remove("KAFKA_BROKERS"),
        };
        let mut child = command.spawn().expect("failed to start the host binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Self { child, log }
    }

    /// The output so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns `Some`, at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shop-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until every port answers `/health` with 200; returns the bodies.
pub async fn wait_healthy(client: &reqwest::Client, ports: Ports) -> Vec<serde_json::Value> {
    let mut bodies = Vec::new();
    for port in ports.all() {
        let url = format!("http://127.0.0.1:{port}/health");
        let body = eventually(Duration::from_secs(60), &format!("{url} to be healthy"), || async {
            let r = client.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())?;
            r.json::<serde_json::Value>().await.ok()
        })
        .await;
        bodies.push(body);
    }
    bodies
}

/// A consumer of our own, independent of the host, reading `topics` from
/// the beginning.
pub fn reader(brokers: &str, topics: &[&str]) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
    consumer
}
