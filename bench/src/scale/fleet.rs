//! The hosts of one scale-out run: a manifest of its own per host (ports,
//! state directory, topic prefix, partitions, state backend), the `host`
//! processes serving only the hot component, their `/health`, and their
//! end. Every host is killed when the fleet is dropped, and with the
//! driver itself if it dies first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::stages::StageTotal;

/// The component every host serves.
pub const COMPONENT: &str = "email";

/// Where a run keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One shared PostgreSQL schema.
    Postgres,
    /// One redb file in the host's own state directory.
    Redb,
}

impl Backend {
    /// The name `host run --state-backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redb => "redb",
        }
    }
}

/// What the hosts of one run share.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Hosts to start.
    pub hosts: usize,
    pub backend: Backend,
    /// Topic and group prefix of the run.
    pub topic_prefix: String,
    /// Partitions of every topic.
    pub partitions: i32,
    /// PostgreSQL schema (postgres backend).
    pub schema: String,
    /// Directory of the hosts' manifests and state.
    pub work_dir: PathBuf,
    /// Directory of the hosts' logs, named `{label}-host{i}.log`.
    pub log_dir: PathBuf,
    /// Name of the run in file names.
    pub label: String,
}

/// How hosts are started.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `host` binary.
    pub host_bin: PathBuf,
    pub brokers: String,
    /// PostgreSQL URL, passed in `DATABASE_URL` (kept off the command line).
    pub database_url: Option<String>,
    /// Host `i` (from 0) has every port of the base manifest plus `(i + 1) * port_step`.
    pub port_step: u16,
}

/// The manifest every host's own is derived from.
#[derive(Debug, Clone)]
pub struct BaseManifest {
    table: toml::Table,
    /// Its directory, against which its relative paths are resolved.
    dir: PathBuf,
}

impl BaseManifest {
    /// Reads `path`.
    ///
    /// # Errors
    /// When the file cannot be read, is not TOML, or has no `email` component with a port.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("failed to read the manifest {path:?}"))?;
        let table: toml::Table = toml::from_str(&text).with_context(|| format!("failed to parse {path:?}"))?;
        let path = std::path::absolute(path).with_context(|| format!("failed to resolve {path:?}"))?;
        let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
        let manifest = Self { table, dir };
        manifest.port(&["components", COMPONENT, "port"])?;
        Ok(manifest)
    }

    fn port(&self, keys: &[&str]) -> anyhow::Result<u16> {
        let mut value = self.table.get(keys[0]);
        for key in &keys[1..] {
            value = value.and_then(|v| v.get(key));
        }
        let port = value.and_then(toml::Value::as_integer).with_context(|| format!("the manifest has no {keys:?}"))?;
        u16::try_from(port).with_context(|| format!("{keys:?} = {port} is not a port"))
    }

    fn absolute(&self, path: &str) -> String {
        self.dir.join(path).to_string_lossy().into_owned()
    }

    /// The manifest of host `index`: its ports moved by `shift`, the run's
    /// prefix, partitions and backend, `state_dir` its own, no admin token
    /// (the admin API stays off), paths absolute, the watcher off.
    fn for_host(&self, spec: &FleetSpec, shift: u16, state_dir: &Path) -> anyhow::Result<toml::Table> {
        let mut table = self.table.clone();
        let kafka = section(&mut table, "kafka")?;
        kafka.insert("topic_prefix".into(), spec.topic_prefix.clone().into());
        kafka.insert("partitions".into(), i64::from(spec.partitions).into());
        // Each host takes an id of its own from its own state_dir.
        kafka.remove("instance_id");
        let runtime = section(&mut table, "runtime")?;
        runtime.insert("state_dir".into(), state_dir.to_string_lossy().into_owned().into());
        let cache = runtime.get("cache_dir").and_then(toml::Value::as_str).unwrap_or(".component-cache").to_owned();
        runtime.insert("cache_dir".into(), self.absolute(&cache).into());
        runtime.insert("watch".into(), false.into());
        let state = section(&mut table, "state")?;
        state.insert("backend".into(), spec.backend.name().into());
        state.insert("schema".into(), spec.schema.clone().into());
        state.remove("url");
        let admin = section(&mut table, "admin")?;
        admin.remove("token");
        let admin_port = admin.get("port").and_then(toml::Value::as_integer).unwrap_or(3090);
        admin.insert("port".into(), (admin_port + i64::from(shift)).into());
        let gateway = section(&mut table, "gateway")?;
        if let Some(port) = gateway.get("port").and_then(toml::Value::as_integer) {
            gateway.insert("port".into(), (port + i64::from(shift)).into());
        }
        let components = section(&mut table, "components")?;
        for (name, component) in components.iter_mut() {
            let component = component.as_table_mut().with_context(|| format!("[components.{name}] is not a table"))?;
            if let Some(port) = component.get("port").and_then(toml::Value::as_integer) {
                component.insert("port".into(), (port + i64::from(shift)).into());
            }
            if let Some(wasm) = component.get("wasm").and_then(toml::Value::as_str) {
                let wasm = self.absolute(wasm);
                component.insert("wasm".into(), wasm.into());
            }
        }
        Ok(table)
    }
}

fn section<'a>(table: &'a mut toml::Table, name: &str) -> anyhow::Result<&'a mut toml::Table> {
    table
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .with_context(|| format!("[{name}] of the manifest is not a table"))
}

/// What the driver reads of a host's `/health`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostHealth {
    #[serde(default)]
    pub handled: u64,
    #[serde(default)]
    pub duplicates_dropped: u64,
    #[serde(default)]
    pub dead_lettered: u64,
    #[serde(default)]
    pub assigned_partitions: Vec<String>,
    #[serde(default)]
    pub stages: BTreeMap<String, StageTotal>,
}

struct Host {
    child: Child,
    health_url: String,
    log: PathBuf,
}

/// The running hosts of one run.
pub struct Fleet {
    hosts: Vec<Host>,
    client: reqwest::Client,
}

impl Fleet {
    /// Writes each host's manifest and starts the hosts.
    ///
    /// # Errors
    /// A port already taken, a manifest that cannot be written, or a host that cannot be started.
    pub fn start(spec: &FleetSpec, base: &BaseManifest, launch: &Launch) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("failed to build the HTTP client")?;
        std::fs::create_dir_all(&spec.log_dir).with_context(|| format!("failed to create {:?}", spec.log_dir))?;
        // Hosts already started are killed by the fleet's drop if a later one fails.
        let mut fleet = Self { hosts: Vec::with_capacity(spec.hosts), client };
        for index in 0..spec.hosts {
            let shift = u16::try_from(index + 1)
                .ok()
                .and_then(|i| i.checked_mul(launch.port_step))
                .context("--port-step times the hosts is past the last port")?;
            let dir = spec.work_dir.join(format!("host{index}"));
            let manifest = base.for_host(spec, shift, &dir.join("state"))?;
            let port = base.port(&["components", COMPONENT, "port"])?.checked_add(shift).context("port past 65535")?;
            let admin = base.port(&["admin", "port"]).unwrap_or(3090).checked_add(shift).context("port past 65535")?;
            for port in [port, admin] {
                anyhow::ensure!(
                    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
                    "port {port} (host {index} of {}) is taken: stop what uses it, or change --port-step",
                    spec.label
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {dir:?}"))?;
            let manifest_path = dir.join("app.toml");
            let text = toml::to_string(&manifest).context("failed to write a host's manifest")?;
            std::fs::write(&manifest_path, text).with_context(|| format!("failed to write {manifest_path:?}"))?;
            let log = spec.log_dir.join(format!("{}-host{index}.log", spec.label));
            let child = spawn(launch, spec.backend, &manifest_path, &log)?;
            fleet.hosts.push(Host { child, health_url: format!("http://127.0.0.1:{port}/health"), log });
        }
        Ok(fleet)
    }

    /// The hosts' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.hosts.iter().map(|h| h.child.id()).collect()
    }

    /// The hosts' logs.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(|h| h.log.clone()).collect()
    }

    /// Fails if a host has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for (index, host) in self.hosts.iter_mut().enumerate() {
            if let Some(status) = host.child.try_wait().context("failed to check a host")? {
                anyhow::bail!("host {index} exited ({status}); see {:?}", host.log);
            }
        }
        Ok(())
    }

    /// Every host's `/health`, with whether it answered 200.
    ///
    /// # Errors
    /// When a host does not answer with its health JSON.
    pub async fn health(&self) -> anyhow::Result<Vec<(bool, HostHealth)>> {
        let mut all = Vec::with_capacity(self.hosts.len());
        for host in &self.hosts {
            let read = async {
                let response = self.client.get(&host.health_url).send().await?;
                let ok = response.status() == reqwest::StatusCode::OK;
                Ok::<_, reqwest::Error>((ok, response.json::<HostHealth>().await?))
            };
            all.push(read.await.with_context(|| format!("failed to read {}", host.health_url))?);
        }
        Ok(all)
    }

    /// Waits until every host answers 200 and the `partitions` of the
    /// component's topic are spread: each assigned once, every host holding
    /// some (when there are enough). Returns the partitions per host.
    ///
    /// # Errors
    /// When a host exits or `timeout` passes first.
    pub async fn wait_spread(&mut self, partitions: usize, timeout: Duration) -> anyhow::Result<Vec<usize>> {
        let give_up = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            self.ensure_running()?;
            if let Ok(health) = self.health().await {
                let counts: Vec<usize> = health.iter().map(|(_, h)| h.assigned_partitions.len()).collect();
                let distinct: BTreeSet<&String> = health.iter().flat_map(|(_, h)| &h.assigned_partitions).collect();
                let everyone = partitions < counts.len() || counts.iter().all(|c| *c > 0);
                if health.iter().all(|(ok, _)| *ok)
                    && counts.iter().sum::<usize>() == partitions
                    && distinct.len() == partitions
                    && everyone
                {
                    return Ok(counts);
                }
                last = format!("partitions per host {counts:?}, healthy {:?}", health.iter().map(|(ok, _)| *ok));
            }
            anyhow::ensure!(Instant::now() < give_up, "the hosts were not ready within {timeout:?}: {last}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every host with SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        for host in &mut self.hosts {
            if matches!(host.child.try_wait(), Ok(None)) {
                signal(&host.child, libc::SIGTERM);
            }
        }
        let give_up = Instant::now() + grace;
        while Instant::now() < give_up && self.hosts.iter_mut().any(|h| matches!(h.child.try_wait(), Ok(None))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (index, host) in self.hosts.iter_mut().enumerate() {
            if matches!(host.child.try_wait(), Ok(None)) {
                eprintln!("bench: host {index} did not stop within {grace:?} of SIGTERM; killing it");
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        for host in &mut self.hosts {
            if matches!(host.child.try_wait(), Ok(None)) {
                let _ = host.child.kill();
                let _ = host.child.wait();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal to our own child, not yet reaped.
        unsafe { libc::kill(pid, signal) };
    }
}

fn spawn(launch: &Launch, backend: Backend, manifest: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = File::create(log).with_context(|| format!("failed to create {log:?}"))?;
    let err = out.try_clone().with_context(|| format!("failed to open {log:?}"))?;
    let mut command = Command::new(&launch.host_bin);
    command
        .arg("run")
        .arg("--manifest")
        .arg(manifest)
        .args(["--components", COMPONENT, "--no-gateway", "--state-backend", backend.name()])
        .args(["--kafka-brokers", &launch.brokers])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // The command line says what each host does; the environment must not add to it.
    for var in [
        "HOST_MANIFEST",
        "HOST_ADMIN_TOKEN",
        "HOST_COMPONENTS",
        "HOST_NO_GATEWAY",
        "HOST_INSTANCE_ID",
        "HOST_STATE_BACKEND",
        "DATABASE_URL",
    ] {
        command.env_remove(var);
    }
    if let (Backend::Postgres, Some(url)) = (backend, &launch.database_url) {
        command.env("DATABASE_URL", url);
    }
    // SAFETY: prctl is async-signal-safe. It kills the host when the thread
    // that started it ends: the driver's main thread, which runs the whole
    // subcommand, so no host outlives a driver killed before its cleanup.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command.spawn().with_context(|| format!("failed to start {:?}", launch.host_bin))
}

/// ERROR and WARN lines of a host's log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogFindings {
    pub errors: usize,
    pub warnings: usize,
    /// The first few of them, colours stripped.
    pub first: Vec<String>,
}

/// Counts the ERROR and WARN lines of `logs`.
pub fn scan_logs(logs: &[PathBuf]) -> LogFindings {
    let mut findings = LogFindings::default();
    for log in logs {
        let Ok(text) = std::fs::read_to_string(log) else { continue };
        for line in text.lines() {
            let line = strip_ansi(line);
            // `tracing`'s format: timestamp, level, target: message.
            let level = line.split_whitespace().nth(1).unwrap_or("");
            match level {
                "ERROR" => findings.errors += 1,
                "WARN" => findings.warnings += 1,
                _ => continue,
            }
            if findings.first.len() < 5 {
                findings.first.push(line.chars().take(300).collect());
            }
        }
    }
    findings
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FleetSpec {
        FleetSpec {
            hosts: 2,
            backend: Backend::Postgres,
            topic_prefix: "bench-12345678.scale2.".into(),
            partitions: 6,
            schema: "bench_12345678_n2".into(),
            work_dir: "/tmp/w".into(),
            log_dir: "/tmp/l".into(),
            label: "pg-n2".into(),
        }
    }

    #[test]
    fn a_host_manifest_moves_ports_and_owns_its_state() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml");
        let base = BaseManifest::load(&path).unwrap();
        let table = base.for_host(&spec(), 200, Path::new("/tmp/w/host1/state")).unwrap();
        let get = |keys: &[&str]| {
            let mut value = table.get(keys[0]).cloned();
            for key in &keys[1..] {
                value = value.and_then(|v| v.get(key).cloned());
            }
            value.unwrap()
        };
        assert_eq!(get(&["components", "email", "port"]).as_integer(), Some(3203));
        assert_eq!(get(&["admin", "port"]).as_integer(), Some(3290));
        assert_eq!(get(&["kafka", "partitions"]).as_integer(), Some(6));
        assert_eq!(get(&["kafka", "topic_prefix"]).as_str(), Some("bench-12345678.scale2."));
        assert_eq!(get(&["state", "backend"]).as_str(), Some("postgres"));
        assert_eq!(get(&["runtime", "state_dir"]).as_str(), Some("/tmp/w/host1/state"));
        assert!(Path::new(get(&["components", "email", "wasm"]).as_str().unwrap()).is_absolute());
        // The host itself accepts what was written.
        let text = toml::to_string(&table).unwrap();
        let manifest = shop_host::manifest::Manifest::parse(&text).unwrap();
        assert_eq!(manifest.components["email"].port, 3203);
        manifest.validate().unwrap();
    }

    #[test]
    fn log_levels_are_read_through_colours() {
        let dir = std::env::temp_dir().join(format!("bench-scale-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("host.log");
        let text = "2026-01-01T00:00:00Z \u{1b}[31mERROR\u{1b}[0m \u{1b}[2mshop_host\u{1b}[0m: boom\n\
                    2026-01-01T00:00:00Z \u{1b}[32m INFO\u{1b}[0m shop_host: email sent ERROR\n\
                    2026-01-01T00:00:00Z \u{1b}[33m WARN\u{1b}[0m shop_host: slow\n";
        std::fs::write(&log, text).unwrap();
        let findings = scan_logs(&[log]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((findings.errors, findings.warnings), (1, 1));
        assert_eq!(findings.first[0], "2026-01-01T00:00:00Z ERROR shop_host: boom");
    }
}
