//! `host`: run the shop from an app manifest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shop_host::manifest::Manifest;
use tokio_util::sync::CancellationToken;

/// Runs the shop's services as Wasm components on Kafka.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` (ANSI colours only on a terminal) or `json` (one
    /// object per line, with the handled event's component, version, event
    /// and order ids).
    #[arg(long, global = true, env = "HOST_LOG_FORMAT", value_enum, default_value_t)]
    log_format: shop_host::logs::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gateway and every component of the manifest.
    Run {
        /// App manifest (TOML).
        #[arg(long, short, env = "HOST_MANIFEST", default_value = "app.toml")]
        manifest: PathBuf,
        /// Kafka bootstrap servers; overrides `kafka.brokers`. Unset in both
        /// places: an embedded in-process broker that keeps nothing.
        #[arg(long, env = "KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
        /// File holding the admin API's token (loopback only); overrides
        /// `admin.token`. Without it, the variable HOST_ADMIN_TOKEN is read.
        /// Never an argument: every user sees arguments in `ps`.
        #[arg(long, env = "HOST_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// Refused with an error saying where the token goes instead.
        #[arg(long, hide = true)]
        admin_token: Option<String>,
        /// Components this host runs, comma-separated (`order,payment`);
        /// `none` for a gateway-only host. Default: all of the manifest's.
        #[arg(long, env = "HOST_COMPONENTS", value_delimiter = ',')]
        components: Option<Vec<String>>,
        /// Do not serve the gateway on this host.
        #[arg(long, env = "HOST_NO_GATEWAY")]
        no_gateway: bool,
        /// This host's static consumer-group member id; overrides
        /// `kafka.instance_id`. Default: one of its own, kept across restarts
        /// in the state directory.
        #[arg(long, env = "HOST_INSTANCE_ID")]
        instance_id: Option<String>,
        /// Added to every port of the manifest (gateway, components, admin),
        /// to run several hosts of one app on one machine.
        #[arg(long, env = "HOST_PORT_OFFSET", default_value_t = 0)]
        port_offset: u16,
        /// State backend, `redb` or `postgres`; overrides `state.backend`.
        #[arg(long, env = "HOST_STATE_BACKEND")]
        state_backend: Option<shop_host::manifest::StateBackend>,
        /// PostgreSQL URL of the `postgres` backend; overrides `state.url`.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Address the gateway's and components' ports bind to; overrides
        /// `http.bind` (`0.0.0.0` in a container).
        #[arg(long, env = "HOST_BIND")]
        bind: Option<std::net::IpAddr>,
        /// Address the admin API binds to; overrides `admin.bind` (default
        /// 127.0.0.1).
        #[arg(long, env = "HOST_ADMIN_BIND")]
        admin_bind: Option<std::net::IpAddr>,
        #[command(flatten)]
        kafka_properties: KafkaProperties,
    },
    /// Reload one component of a running host through its admin API.
    Reload {
        /// Component name, e.g. `payment`.
        name: String,
        /// New component file; default: the file named in the host's manifest.
        path: Option<PathBuf>,
        /// Admin API of the running host.
        #[arg(long, env = "HOST_ADMIN_URL", default_value = "http://127.0.0.1:3090")]
        admin_url: String,
        /// File holding the admin token; without it, the variable
        /// HOST_ADMIN_TOKEN is read. Never an argument: every user sees
        /// arguments in `ps`.
        #[arg(long, env = "HOST_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Refused with an error saying where the token goes instead.
        #[arg(long, hide = true)]
        token: Option<String>,
    },
    /// Shadow runs: a candidate version handles the events the serving one
    /// handles, its effects held back, and the host reports the differences.
    Shadow {
        #[command(subcommand)]
        command: ShadowCommand,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// Validate a manifest and its components without serving anything.
    Check {
        /// App manifest (TOML).
        #[arg(long, short, env = "HOST_MANIFEST", default_value = "app.toml")]
        manifest: PathBuf,
    },
    /// Print who publishes and who consumes each event type on each topic.
    Topology {
        /// App manifest (TOML).
        #[arg(long, short, env = "HOST_MANIFEST", default_value = "app.toml")]
        manifest: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show the contract a component carries (what it publishes and
    /// consumes, each with its schema's version), or add one to it.
    Contract {
        /// Component file (`.wasm`).
        wasm: PathBuf,
        /// Add the contract in this JSON file to the component, in place
        /// (`{"publishes": {"topic:Type": schema}, "consumes": {…}}`); it
        /// takes the place of any the component carried.
        #[arg(long)]
        set: Option<PathBuf>,
        /// The whole contract as JSON, schemas included.
        #[arg(long)]
        json: bool,
    },
    /// List the dead letters, or replay them to the topics they came from.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        target: DlqTarget,
    },
}

/// What `host shadow` does.
#[derive(Debug, Subcommand)]
enum ShadowCommand {
    /// Start a shadow run of a candidate (ends the one on, if any).
    Start { name: String, path: PathBuf },
    /// The run's counts, differences and failures.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve the candidate (an ordinary hot reload) and end the run.
    Promote { name: String },
    /// End the run.
    Stop { name: String },
    /// Run a candidate over the component's dead letters: which it now
    /// handles and what it would emit; nothing is published or committed.
    ReplayDlq {
        name: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A running host's admin API.
#[derive(Debug, clap::Args)]
struct AdminTarget {
    /// Admin API of the running host.
    #[arg(long, env = "HOST_ADMIN_URL", default_value = "http://127.0.0.1:3090", global = true)]
    admin_url: String,
    /// File holding the admin token; without it, the variable
    /// HOST_ADMIN_TOKEN is read.
    #[arg(long, env = "HOST_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Refused with an error saying where the token goes instead.
    #[arg(long, hide = true, global = true)]
    token: Option<String>,
}

/// librdkafka properties from the command line and the environment.
#[derive(Debug, clap::Args)]
struct KafkaProperties {
    /// A librdkafka property for every Kafka client, `KEY=VALUE` (repeat the
    /// flag; in the variable, one per line), added to `[kafka.properties]`
    /// and winning over it: `security.protocol=SASL_SSL`, `sasl.password=...`.
    #[arg(
        long = "kafka-property",
        global = true,
        env = "HOST_KAFKA_PROPERTIES",
        hide_env_values = true,
        value_delimiter = '\n',
        value_parser = parse_property
    )]
    entries: Vec<Property>,
}

/// One `KEY=VALUE` entry; `None` for a blank line.
#[derive(Debug, Clone)]
struct Property(Option<(String, String)>);

impl KafkaProperties {
    /// Adds these entries to the manifest's `[kafka.properties]`.
    fn apply(self, manifest: &mut Manifest) {
        manifest.kafka.properties.extend(self.entries.into_iter().filter_map(|p| p.0));
    }
}

/// `KEY=VALUE`; a blank line is skipped (the variable may end with a newline).
/// Only the key is quoted back in an error: the value may be a secret.
fn parse_property(entry: &str) -> Result<Property, String> {
    let entry = entry.trim_end_matches('\r');
    if entry.trim().is_empty() {
        return Ok(Property(None));
    }
    let Some((key, value)) = entry.split_once('=') else {
        return Err("a Kafka property is KEY=VALUE, and this entry has no '='".into());
    };
    let key = key.trim();
    if key.is_empty() {
        return Err("a Kafka property needs a key before '='".into());
    }
    Ok(Property(Some((key.to_owned(), value.to_owned()))))
}

/// Where the dead-letter topic is.
#[derive(Debug, clap::Args)]
struct DlqTarget {
    /// App manifest (TOML): its topic prefix, dead-letter topic and brokers.
    #[arg(long, short, global = true, env = "HOST_MANIFEST", default_value = "app.toml")]
    manifest: PathBuf,
    /// Kafka bootstrap servers; overrides `kafka.brokers`.
    #[arg(long, global = true, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    kafka_properties: KafkaProperties,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter: id, time, component, version, source,
    /// attempts, replay state, reason.
    List {
        /// Only those set aside by this component.
        #[arg(long)]
        component: Option<String>,
        /// Only those set aside since: a duration ago (`30m`, `2h`, `7d`),
        /// an RFC 3339 time or Unix ms.
        #[arg(long)]
        since: Option<String>,
    },
    /// Publish dead letters again to the topics they came from; each is
    /// replayed once (`--all` skips those replayed before).
    Replay {
        /// Ids (`PARTITION/OFFSET`, as `list` shows them).
        ids: Vec<String>,
        /// Every dead letter of `--component` not replayed yet.
        #[arg(long, requires = "component")]
        all: bool,
        /// The component whose dead letters to replay.
        #[arg(long)]
        component: Option<String>,
    },
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async_main());
    // A blocking call still running (a store or broker that does not
    // answer) must not keep the process alive: it was abandoned already.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    // `dlq` and `shadow` print what they answer (JSON with --json): logs go aside.
    shop_host::logs::init(cli.log_format, matches!(cli.command, Command::Dlq { .. } | Command::Shadow { .. }));
    let result = match cli.command {
        Command::Run {
            manifest,
            kafka_brokers,
            admin_token_file,
            admin_token,
            components,
            no_gateway,
            instance_id,
            port_offset,
            state_backend,
            database_url,
            bind,
            admin_bind,
            kafka_properties,
        } => {
            let serving = shop_host::app::Serving {
                components: components.map(|names| {
                    names.into_iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty() && n != "none").collect()
                }),
                gateway: !no_gateway,
                instance_id,
            };
            let overrides = |admin_token| Overrides {
                admin_token,
                port_offset,
                state_backend,
                database_url: database_url.filter(|u| !u.is_empty()),
                bind,
                admin_bind,
                kafka_properties,
            };
            match shop_host::admin::read_token(admin_token.is_some(), admin_token_file.as_deref()) {
                Ok(token) => run(manifest, kafka_brokers, overrides(token), serving).await,
                Err(err) => Err(err),
            }
        }
        Command::Reload { name, path, admin_url, token_file, token } => {
            match shop_host::admin::read_token(token.is_some(), token_file.as_deref()) {
                Ok(Some(token)) => reload(&name, path, &admin_url, &token).await,
                Ok(None) => Err(anyhow::anyhow!(
                    "no admin token: set HOST_ADMIN_TOKEN, or HOST_ADMIN_TOKEN_FILE (--token-file) to a file holding it"
                )),
                Err(err) => Err(err),
            }
        }
        Command::Shadow { command, admin } => shadow(command, admin).await,
        Command::Check { manifest } => check(manifest).await,
        Command::Topology { manifest, json } => topology(&manifest, json),
        Command::Contract { wasm, set, json } => contract(&wasm, set.as_deref(), json),
        Command::Dlq { command, target } => dlq(command, target).await,
    };
    // Spans not yet exported go before the process ends.
    shop_host::traces::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line and the environment change in the manifest.
struct Overrides {
    admin_token: Option<String>,
    port_offset: u16,
    state_backend: Option<shop_host::manifest::StateBackend>,
    database_url: Option<String>,
    bind: Option<std::net::IpAddr>,
    admin_bind: Option<std::net::IpAddr>,
    kafka_properties: KafkaProperties,
}

async fn run(
    path: PathBuf,
    brokers: Option<String>,
    overrides: Overrides,
    serving: shop_host::app::Serving,
) -> anyhow::Result<()> {
    let mut manifest = Manifest::load(&path)?;
    if let Some(token) = overrides.admin_token {
        manifest.admin.token = Some(token);
    }
    if let Some(backend) = overrides.state_backend {
        manifest.state.backend = backend;
    }
    if let Some(url) = overrides.database_url {
        manifest.state.url = Some(url);
    }
    if let Some(bind) = overrides.bind {
        manifest.http.bind = bind;
    }
    if let Some(bind) = overrides.admin_bind {
        manifest.admin.bind = bind;
    }
    overrides.kafka_properties.apply(&mut manifest);
    manifest.offset_ports(overrides.port_offset)?;
    manifest.validate()?;
    shop_host::kafka::set_properties(&manifest.kafka.properties);
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    shop_host::app::run(manifest, brokers.filter(|b| !b.trim().is_empty()), serving, shutdown).await
}

async fn reload(name: &str, path: Option<PathBuf>, admin_url: &str, token: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let body = match &path {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path:?}"))?,
        None => Vec::new(),
    };
    let url = format!("{}/components/{name}/reload", admin_url.trim_end_matches('/'));
    let response =
        reqwest::Client::new().post(&url).bearer_auth(token).body(body).send().await.with_context(|| {
            format!("cannot reach the admin API at {url}: is the host running with HOST_ADMIN_TOKEN?")
        })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        // The admin API's error, as it says it (a refusal may run over lines).
        let said = serde_json::from_str::<serde_json::Value>(&text).ok();
        let message = said.as_ref().and_then(|v| v["error"]["message"].as_str()).unwrap_or(&text);
        anyhow::bail!("reload refused ({status}): {message}");
    }
    println!("{text}");
    Ok(())
}

async fn shadow(command: ShadowCommand, admin: AdminTarget) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let Some(token) = shop_host::admin::read_token(admin.token.is_some(), admin.token_file.as_deref())? else {
        anyhow::bail!(
            "no admin token: set HOST_ADMIN_TOKEN, or HOST_ADMIN_TOKEN_FILE (--token-file) to a file holding it"
        );
    };
    let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {path:?}"));
    let (route, name, body, json, replay) = match &command {
        ShadowCommand::Start { name, path } => ("", name, Some(read(path)?), false, false),
        ShadowCommand::Status { name, json } => ("", name, None, *json, false),
        ShadowCommand::Promote { name } => ("/promote", name, Some(Vec::new()), false, false),
        ShadowCommand::Stop { name } => ("/stop", name, Some(Vec::new()), false, false),
        ShadowCommand::ReplayDlq { name, path, json } => ("/replay-dlq", name, Some(read(path)?), *json, true),
    };
    let url = format!("{}/components/{name}/shadow{route}", admin.admin_url.trim_end_matches('/'));
    // A trial over dead letters runs for two minutes at most.
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(180)).build()?;
    let request = match body {
        Some(body) => client.post(&url).body(body),
        None => client.get(&url),
    };
    let response =
        request.bearer_auth(token).send().await.with_context(|| format!("cannot reach the admin API at {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "refused ({status}): {text}");
    let report: serde_json::Value = serde_json::from_str(&text).context("the admin API answered no JSON")?;
    match (json, replay) {
        (true, _) => println!("{}", serde_json::to_string_pretty(&report)?),
        (false, false) => print!("{}", shop_host::admin::render_shadow(&report)),
        (false, true) => print!("{}", shop_host::admin::render_trial(&report)),
    }
    Ok(())
}

async fn dlq(command: DlqCommand, target: DlqTarget) -> anyhow::Result<()> {
    use shop_host::kafka::dlq;
    let mut manifest = Manifest::load(&target.manifest)?;
    if !target.kafka_properties.entries.is_empty() {
        target.kafka_properties.apply(&mut manifest);
        manifest.validate()?;
    }
    shop_host::kafka::set_properties(&manifest.kafka.properties);
    let brokers = target.kafka_brokers.filter(|b| !b.trim().is_empty()).or(manifest.kafka.brokers.clone());
    let Some(brokers) = brokers else {
        anyhow::bail!(
            "`host dlq` reads a real broker: set KAFKA_BROKERS or kafka.brokers (the embedded one keeps nothing)"
        );
    };
    let topic = format!("{}{}", manifest.kafka.topic_prefix, manifest.kafka.dead_letter_topic);
    let dead_letters = dlq::DeadLetters::connect(&brokers, &topic, dlq::replay_topics(&manifest))?;
    match command {
        DlqCommand::List { component, since } => {
            let now_ms = i64::try_from(shop_host::clock::unix_ms(std::time::SystemTime::now())).unwrap_or(i64::MAX);
            let since_ms = since.map(|s| dlq::parse_since(&s, now_ms)).transpose().map_err(anyhow::Error::msg)?;
            let letters = dead_letters.list(&dlq::Filter { component, since_ms }).await?;
            match target.json {
                true => println!("{}", serde_json::to_string_pretty(&letters)?),
                false => print!("{}", dlq::render_lines(&letters)),
            }
        }
        DlqCommand::Replay { ids, all, component } => {
            let selection = dlq::Selection::new(&ids, all, component).map_err(anyhow::Error::msg)?;
            let report = dead_letters.replay(&selection).await?;
            match target.json {
                true => println!("{}", serde_json::to_string_pretty(&report)?),
                false => {
                    for r in &report.replayed {
                        println!("replayed {} to {} (event {})", r.id, r.topic, r.event_id.as_deref().unwrap_or("?"));
                    }
                    for r in &report.refused {
                        println!("refused  {}: {}", r.id, r.reason);
                    }
                    println!("{} replayed, {} refused", report.replayed.len(), report.refused.len());
                }
            }
            // Ids named one by one must all go; `--all` leaves out what it cannot replay.
            anyhow::ensure!(
                all || report.refused.is_empty(),
                "{} of the dead letters named were not replayed",
                report.refused.len()
            );
        }
    }
    Ok(())
}

fn topology(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let flows = shop_host::app::topology(&Manifest::load(path)?);
    if json {
        println!("{}", serde_json::to_string_pretty(&flows)?);
    } else {
        print!("{}", shop_host::manifest::topology::render(&flows));
    }
    Ok(())
}

fn contract(wasm: &std::path::Path, set: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    use shop_host::contracts::{Contract, version};
    let bytes = std::fs::read(wasm).map_err(|err| anyhow::anyhow!("{wasm:?}: {err}"))?;
    if let Some(file) = set {
        let text = std::fs::read(file).map_err(|err| anyhow::anyhow!("{file:?}: {err}"))?;
        let contract = Contract::parse(&text).map_err(|err| anyhow::anyhow!("{file:?}: {err}"))?;
        let partial = wasm.with_extension("wasm.partial");
        std::fs::write(&partial, contract.embed(&bytes))?;
        std::fs::rename(&partial, wasm)?;
        println!("{wasm:?} carries the contract of {file:?}");
        return Ok(());
    }
    match Contract::from_wasm(&bytes).map_err(|err| anyhow::anyhow!("{wasm:?}: {err}"))? {
        None => println!("{wasm:?} carries no contract: the host takes its manifest block's publishes and consumes"),
        Some(contract) if json => println!("{}", serde_json::to_string_pretty(&contract)?),
        Some(contract) => {
            for (side, entries) in [("publishes", &contract.publishes), ("consumes", &contract.consumes)] {
                for (entry, schema) in entries {
                    println!("{side:9}  {entry:40}  schema {}", version(schema));
                }
            }
        }
    }
    Ok(())
}

async fn check(path: PathBuf) -> anyhow::Result<()> {
    let manifest = Manifest::load(&path)?;
    shop_host::app::check(&manifest)?;
    if let Some(base) = &manifest.schemas.registry {
        // Asked, not registered: checking changes nothing anywhere.
        let registry = shop_host::registry::Registry::new(base, &manifest.kafka.topic_prefix)?;
        let verdicts = registry.check(&shop_host::app::schema_set(&manifest)?).await?;
        let mut incompatible = 0;
        for (event_type, verdict) in &verdicts {
            incompatible += usize::from(matches!(verdict, shop_host::registry::Verdict::Incompatible(_)));
            println!("schema {event_type} (subject {}): {verdict}", registry.subject(event_type));
        }
        anyhow::ensure!(
            incompatible == 0,
            "{incompatible} schema(s) incompatible with the registry at {}",
            registry.shown()
        );
    }
    println!("{}: ok ({} components)", path.display(), manifest.components.len());
    Ok(())
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!("cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested: finishing in-flight events");
    shutdown.cancel();
}
