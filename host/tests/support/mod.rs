//! Helpers shared by the integration tests: locating the built components,
//! writing a manifest with free ports and unique topics, and running the real
//! `host` binary.

#![allow(dead_code)]

mod proxy;
mod topics;
// Each test binary uses its own part of the support module.
#[allow(unused_imports)]
pub use proxy::Proxy;
#[allow(unused_imports)]
pub use topics::*;

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::Message as _;
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
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

/// The PostgreSQL server under test, or a panic saying how to start one.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()).expect(
        "PostgreSQL tests need a server: run `just postgres` and set DATABASE_URL=$(scripts/postgres.sh url) (`just test` does both)",
    )
}

/// A schema name of its own for one test's state.
pub fn fresh_schema() -> String {
    format!("test_{}", uuid::Uuid::new_v4().simple())
}

/// Drops a test's schema (best effort).
pub async fn drop_schema(schema: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
    }
}

/// A port nobody listens on right now.
///
/// Taken below the kernel's ephemeral range (32768 and up), never from it:
/// a port the kernel hands out for `bind(0)` may be handed out again to an
/// outgoing connection (a Kafka client's) before the host binds it, or
/// while a killed host is restarted on it. Each call in a process takes the
/// next port of a sequence that starts at a random offset.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ =
        NEXT.compare_exchange(0, 20_000 + (std::process::id() % 6_000) as u16 * 2, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + port.wrapping_sub(20_000) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

    /// The ports of the components in `options`, and the gateway's.
    pub fn serving(&self, options: &Options) -> Vec<u16> {
        let named =
            [("payment", self.payment), ("order", self.order), ("email", self.email), ("analytics", self.analytics)];
        let mut ports = vec![self.gateway];
        ports.extend(named.iter().filter(|(n, _)| !options.without.contains(n)).map(|(_, p)| *p));
        ports
    }
}

/// What varies between test manifests.
#[derive(Debug, Clone)]
pub struct Options {
    /// Topic and group prefix; a fresh one when `None`.
    pub prefix: Option<String>,
    /// Components left out (e.g. `payment`, to make the payment deadline pass).
    pub without: Vec<&'static str>,
    /// The order component's config table, TOML inline-table contents.
    pub order_config: String,
    /// Join consumer groups with static membership (fast restarts).
    pub static_membership: bool,
    /// Keep the state in this PostgreSQL schema (of `DATABASE_URL`)
    /// instead of redb files.
    pub postgres_schema: Option<String>,
    /// The manifest the test's one starts from (default: the repo's
    /// `app.toml`).
    pub app: Option<PathBuf>,
    /// `.wasm` files to serve instead of the built ones, by component name.
    pub wasm: Vec<(String, PathBuf)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            prefix: None,
            without: Vec::new(),
            order_config: r#"stock = "sold-out=0""#.into(),
            static_membership: false,
            postgres_schema: None,
            app: None,
            wasm: Vec::new(),
        }
    }
}

/// Writes the shipped `app.toml` with `ports`, a unique topic prefix and
/// state in `dir/state`; returns its path and the prefix.
pub fn write_manifest(dir: &Path, ports: Ports) -> (PathBuf, String) {
    write_manifest_with(dir, ports, &Options::default())
}

/// [`write_manifest`] with [`Options`]. The services, their topics, groups
/// and settings come from `app.toml`, so the tests run what users run:
/// every component it has, the shop's four on `ports`, any other on a free
/// port of its own ([`manifest_ports`] reads them back).
pub fn write_manifest_with(dir: &Path, ports: Ports, options: &Options) -> (PathBuf, String) {
    use toml::{Table, Value};

    let prefix = options.prefix.clone().unwrap_or_else(|| format!("t{}-", uuid::Uuid::new_v4().simple()));
    let source = options.app.clone().unwrap_or_else(|| repo().join("app.toml"));
    let mut app: Table = std::fs::read_to_string(&source).unwrap().parse().unwrap();
    let section = |app: &mut Table, name: &str| -> Table {
        app.remove(name).and_then(|v| v.as_table().cloned()).unwrap_or_default()
    };
    let mut kafka = section(&mut app, "kafka");
    kafka.remove("brokers");
    kafka.remove("instance_id");
    kafka.insert("partitions".into(), Value::Integer(3));
    kafka.insert("topic_prefix".into(), Value::String(prefix.clone()));
    if options.static_membership {
        kafka.insert("instance_id".into(), Value::String(format!("{prefix}host")));
    }
    let mut runtime = section(&mut app, "runtime");
    runtime.insert("state_dir".into(), Value::String(dir.join("state").display().to_string()));
    runtime.insert("cache_dir".into(), Value::String(repo().join(".component-cache").display().to_string()));
    let mut gateway = section(&mut app, "gateway");
    gateway.insert("port".into(), Value::Integer(ports.gateway.into()));
    let mut admin = Table::new();
    admin.insert("port".into(), Value::Integer(ports.admin.into()));
    admin.insert("token".into(), Value::String(ADMIN_TOKEN.into()));
    let mut components = section(&mut app, "components");
    let port_of =
        [("payment", ports.payment), ("order", ports.order), ("email", ports.email), ("analytics", ports.analytics)];
    components.retain(|name, _| !options.without.contains(&name));
    for (name, settings) in components.iter_mut() {
        let settings = settings.as_table_mut().unwrap();
        let port = port_of.iter().find(|(n, _)| n == name).map_or_else(free_port, |(_, port)| *port);
        settings.insert("port".into(), Value::Integer(port.into()));
        let wasm = match options.wasm.iter().find(|(n, _)| n == name) {
            Some((_, path)) => path.clone(),
            None => component(&wasm_stem(settings)),
        };
        settings.insert("wasm".into(), Value::String(wasm.display().to_string()));
        if name == "order" {
            let wrapped: Table = format!("config = {{ {} }}", options.order_config).parse().unwrap();
            let mut config = wrapped["config"].as_table().cloned().unwrap();
            // The shipped catalog, and `sold-out`, which the tests stock 0 of.
            if !config.contains_key("catalog") {
                let shipped = settings["config"]["catalog"].as_str().unwrap();
                config.insert("catalog".into(), Value::String(format!("{shipped}; sold-out | Sold out | 1250")));
            }
            settings.insert("config".into(), Value::Table(config));
        }
    }
    let mut state = section(&mut app, "state");
    if let Some(schema) = &options.postgres_schema {
        state.insert("backend".into(), Value::String("postgres".into()));
        state.insert("url".into(), Value::String(database_url()));
        state.insert("schema".into(), Value::String(schema.clone()));
    }
    for (name, table) in [
        ("kafka", kafka),
        ("runtime", runtime),
        ("state", state),
        ("gateway", gateway),
        ("admin", admin),
        ("components", components),
    ] {
        app.insert(name.into(), Value::Table(table));
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("app.toml");
    std::fs::write(&path, toml::to_string(&app).unwrap()).unwrap();
    (path, prefix)
}

/// The card vault key of every test host (`HOST_VAULT_KEY`).
pub const TEST_VAULT_KEY: &str = "5e57c0de5e57c0de5e57c0de5e57c0de5e57c0de5e57c0de5e57c0de5e57c0de";

/// The name of the `.wasm` file a manifest block serves, without `.wasm`
/// (`target/wasm32-wasip2/release/email-js.wasm`: `email-js`).
fn wasm_stem(settings: &toml::Table) -> String {
    let wasm = settings.get("wasm").and_then(toml::Value::as_str).expect("a component without `wasm`");
    Path::new(wasm).file_stem().and_then(|s| s.to_str()).expect("a `wasm` path without a file name").to_owned()
}

/// Each component's port in the manifest at `path`, by name.
pub fn manifest_ports(path: &Path) -> std::collections::BTreeMap<String, u16> {
    let app: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let components = app["components"].as_table().unwrap();
    let port = |settings: &toml::Value| u16::try_from(settings["port"].as_integer().unwrap()).unwrap();
    components.iter().map(|(name, settings)| (name.clone(), port(settings))).collect()
}

/// A running `host` process; killed on drop if still running.
pub struct HostProcess {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl HostProcess {
    /// Starts `host run` on `manifest` against `brokers` (`None`: embedded).
    pub fn start(manifest: &Path, brokers: Option<&str>) -> Self {
        Self::start_with(manifest, brokers, &[])
    }

    /// [`HostProcess::start`] with more arguments of `host run`.
    pub fn start_with(manifest: &Path, brokers: Option<&str>, args: &[&str]) -> Self {
        Self::start_env(manifest, brokers, args, &[])
    }

    /// [`HostProcess::start_with`] with more environment variables.
    pub fn start_env(manifest: &Path, brokers: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_host"));
        command
            .args(["run", "--manifest"])
            .arg(manifest)
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("HOST_COMPONENTS")
            .env_remove("HOST_INSTANCE_ID")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // Hosts sharing a PostgreSQL schema share the vault key, as
            // operators must (docs/guarantees.md, "Trust").
            .env("HOST_VAULT_KEY", TEST_VAULT_KEY)
            .envs(env.iter().copied())
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

/// GETs `url` and decodes its JSON body; `None` on any failure or a
/// non-2xx status (10 s timeout, so a killed host does not hang a test).
pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let response = client.get(url).timeout(Duration::from_secs(10)).send().await.ok()?;
    response.status().is_success().then_some(())?;
    response.json().await.ok()
}

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shop-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until every port answers `/health` with 200; returns the bodies.
pub async fn wait_healthy(client: &reqwest::Client, ports: Ports) -> Vec<serde_json::Value> {
    wait_ports_healthy(client, &ports.all()).await
}

/// Waits until each of `ports` answers `/health` with 200; returns the bodies.
pub async fn wait_ports_healthy(client: &reqwest::Client, ports: &[u16]) -> Vec<serde_json::Value> {
    let mut bodies = Vec::new();
    for &port in ports {
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

/// Header marking the copies [`duplicate_everything`] injects.
pub const DUPLICATE_HEADER: &str = "test-duplicate";

/// Re-publishes every record of `topics` once more (same key, value and
/// headers), as an independent client, until `stop`; counts the copies in
/// `count`. Copies are marked so that they are not copied again.
pub fn duplicate_everything(brokers: String, topics: Vec<String>, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let consumer = reader(&brokers, &names);
    let producer: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).set("acks", "all").create().unwrap();
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let mut headers = OwnedHeaders::new();
                let mut is_copy = false;
                if let Some(original) = message.headers() {
                    for h in original.iter() {
                        is_copy |= h.key == DUPLICATE_HEADER;
                        headers = headers.insert(Header { key: h.key, value: h.value });
                    }
                }
                if is_copy {
                    continue;
                }
                headers = headers.insert(Header { key: DUPLICATE_HEADER, value: Some("1") });
                let key = message.key().unwrap_or_default().to_vec();
                let payload = message.payload().unwrap_or_default().to_vec();
                let mut record = BaseRecord::to(message.topic()).key(&key).payload(&payload).headers(headers);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(50));
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
            Some(Err(err)) => eprintln!("duplicator: {err}"),
            None => {}
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Runs `place(i)` for every `i` below `total` on `workers` concurrent
/// tasks, counting each finished call in `placed`; resolves to `(i, result)`
/// for all of them.
pub fn spawn_placing<T, F, Fut>(
    workers: usize,
    total: usize,
    placed: Arc<std::sync::atomic::AtomicUsize>,
    place: F,
) -> tokio::task::JoinHandle<Vec<(usize, T)>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let place = Arc::new(place);
    tokio::spawn(async move {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (next, placed, place) = (next.clone(), placed.clone(), place.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= total {
                            return mine;
                        }
                        let result = place(i).await;
                        placed.fetch_add(1, Ordering::SeqCst);
                        mine.push((i, result));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    })
}

/// Adds component `name` (the test build of the same name) to `manifest`
/// on a free port, consuming the topic `name`, with extra `fields` (TOML
/// lines); returns its port.
pub fn add_component(manifest: &Path, name: &str, fields: &str) -> u16 {
    let port = free_port();
    let mut app: toml::Table = std::fs::read_to_string(manifest).unwrap().parse().unwrap();
    let settings: toml::Table = format!(
        "wasm = {:?}\nport = {port}\ntopics = [{name:?}]\ngroup = {name:?}\n{fields}\n",
        component(name).display().to_string()
    )
    .parse()
    .unwrap();
    app["components"].as_table_mut().unwrap().insert(name.into(), toml::Value::Table(settings));
    std::fs::write(manifest, toml::to_string(&app).unwrap()).unwrap();
    port
}

/// Posts `body` to `gateway` until it is accepted (202), with the same
/// `Idempotency-Key` on every try, so that a retry after a crash is the
/// same order; returns the gateway's answer. A refusal (4xx) fails the test.
pub async fn place_until_accepted(
    client: &reqwest::Client,
    gateway: &str,
    key: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let sent = client
            .post(format!("{gateway}/order"))
            .header("idempotency-key", key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = sent {
            if response.status() == 202 {
                return response.json().await.unwrap();
            }
            assert!(response.status().is_server_error(), "order {key} refused: {}", response.status());
        }
        assert!(Instant::now() < deadline, "order {key} not accepted within 180 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`wait_healthy`] for `host`, failing with what every port answered and
/// the host's last log lines (not only which port timed out).
pub async fn wait_host_healthy(client: &reqwest::Client, ports: Ports, host: &HostProcess) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut answers = Vec::new();
        for port in ports.all() {
            let answer = match client.get(format!("http://127.0.0.1:{port}/health")).send().await {
                Ok(response) => (response.status().as_u16(), response.text().await.unwrap_or_default()),
                Err(err) => (0, err.to_string()),
            };
            answers.push((port, answer));
        }
        if answers.iter().all(|(_, (status, _))| *status == 200) {
            return;
        }
        if Instant::now() > deadline {
            let output = host.output();
            let tail: Vec<&str> = output.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("not healthy within 60 s: {answers:?}\n--- host log (tail) ---\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every 100 ms until it says the value is right, at most
/// `timeout`; returns the last value either way, for the caller to report
/// what is still wrong (where [`eventually`] would only say it timed out).
pub async fn converge<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, T)>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let (done, value) = f().await;
        if done || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
