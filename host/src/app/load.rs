//! Loading: the components this host runs compiled (through the sealed
//! compile cache) and checked against their grants, each on its own store,
//! with the card vault where it is needed; and `host check`, which compiles
//! them without serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::Serving;
use crate::clock::Clock;
use crate::contracts::{Contract, ContractBook};
use crate::manifest::{ComponentSettings, Manifest, StateBackend};
use crate::runtime::{CanaryPolicy, Engine, Grants, Limits, LoadedComponent, ServiceRuntime, ServiceSpec};
use crate::state::{HostStore, PgStores, StateStore, TxnLimits};

/// Opens the store of each component in `names`.
fn open_stores(manifest: &Manifest, names: &[String]) -> anyhow::Result<BTreeMap<String, Arc<dyn StateStore>>> {
    let mut stores: BTreeMap<String, Arc<dyn StateStore>> = BTreeMap::new();
    match manifest.state.backend {
        StateBackend::Redb => {
            // One file for every component of the host: their commits share
            // its fsyncs. A component's file of an earlier version is taken over.
            let dir = &manifest.runtime.state_dir;
            let host = HostStore::open(&dir.join("host.redb")).context("state_dir")?;
            for name in names {
                host.adopt(name, &dir.join(format!("{name}.redb"))).with_context(|| format!("component {name:?}"))?;
                let store = host.component(name).with_context(|| format!("component {name:?}"))?;
                stores.insert(name.clone(), Arc::new(store));
            }
        }
        StateBackend::Postgres => {
            let Some(url) = manifest.state.url.as_deref().filter(|u| !u.is_empty()) else {
                anyhow::bail!(
                    "state.backend = \"postgres\" needs a database URL: set state.url or DATABASE_URL (`just postgres` starts one)"
                );
            };
            let shared = PgStores::connect_with(url, &manifest.state.schema, (&manifest.state).into())
                .context("state.backend = \"postgres\" (state.url or DATABASE_URL)")?;
            for name in names {
                stores.insert(name.clone(), Arc::new(shared.store(name)));
            }
        }
    }
    Ok(stores)
}

/// The host's card vault, in its store from `stores` (taken out of it).
fn open_vault(
    manifest: &Manifest,
    stores: &mut BTreeMap<String, Arc<dyn StateStore>>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<crate::vault::Vault>> {
    let store = stores.remove(crate::vault::VAULT_STORE).context("the vault's store is opened with the others")?;
    let key = crate::vault::VaultKey::load(&manifest.runtime.state_dir).context("the card vault's key")?;
    let vault = crate::vault::Vault::open(store, &key, clock, crate::vault::DEFAULT_TTL).context("the card vault")?;
    tracing::info!(key = %key.fingerprint(), backend = ?manifest.state.backend, "card vault open");
    Ok(Arc::new(vault))
}

/// Compiles every component of the manifest against the world, serving
/// nothing, without the manifest's compile cache (neither read nor
/// written) and without any Kafka client.
///
/// # Errors
/// The first component that does not load, by name.
pub fn check(manifest: &Manifest) -> anyhow::Result<()> {
    // No cache: the manifest checked may be anyone's, and its cache_dir
    // could hold native code (and a key) of their making.
    let engine = Engine::new()?;
    let mut contracts = BTreeMap::new();
    for (name, settings) in &manifest.components {
        let engine = engine.with_stack(settings.stack_kib << 10)?;
        let component =
            LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
        component.check_grants(&engine, settings.grants(name)?).with_context(|| format!("component {name:?}"))?;
        contracts.insert(name.clone(), component.contract);
    }
    contract_book(manifest, Arc::new(schema_set(manifest)?), contracts)?;
    Ok(())
}

/// The compile cache of `manifest`: entries in `runtime.cache_dir`, the
/// seal key in `runtime.state_dir` (0700), out of reach of whoever can
/// write the cache.
pub fn cache_location(manifest: &Manifest) -> crate::runtime::CacheLocation {
    let key = manifest.runtime.state_dir.join("component-cache.key");
    crate::runtime::CacheLocation::new(manifest.runtime.cache_dir.clone(), key)
}

/// What `ServiceRuntime::new` needs to run component `name`: its loaded
/// `component`, its `store`, its config, its bounds and quotas from
/// `settings`, and its `grants`.
fn service_spec(
    name: &str,
    settings: &ComponentSettings,
    component: LoadedComponent,
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
    grants: Grants,
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        component,
        store,
        config: settings.config.clone(),
        clock,
        limits: Limits {
            timeout: Duration::from_millis(settings.timeout_ms),
            memory_bytes: settings.memory_mib * 1024 * 1024,
            instance_reuse: settings.instance_reuse,
            txn: TxnLimits {
                max_writes: settings.max_writes_per_call,
                max_bytes: settings.max_write_bytes_per_call,
                max_timers: settings.max_timers_per_call,
            },
            max_queries: settings.max_concurrent_queries,
            burst: Duration::from_millis(settings.cpu_burst_ms),
            cpu_percent: settings.cpu_percent,
            log: crate::runtime::LogLimits {
                per_call: settings.max_log_lines_per_call,
                per_second: settings.max_log_lines_per_second,
            },
            state: crate::state::StateLimits {
                max_keys: settings.max_state_keys,
                max_bytes: settings.max_state_bytes,
                max_timers: settings.max_timers,
                max_outbox: settings.max_outbox_entries,
            },
        },
        canary: CanaryPolicy { events: settings.canary_events, max_failures: settings.canary_max_failures },
        grants,
    }
}

/// Compiles and loads the components this host runs, and the gateway's
/// order component, which it may only query, each on its own store.
pub(super) async fn load_services(
    manifest: &Manifest,
    serving: &Serving,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<(BTreeMap<String, Arc<ServiceRuntime>>, Option<Arc<crate::vault::Vault>>)> {
    let engine = Engine::with_cache_at(Some(cache_location(manifest)))?;
    // The components this host runs, and the gateway's order component,
    // which it may only query.
    let order = &manifest.gateway.order_component;
    let loaded: Vec<&String> =
        manifest.components.keys().filter(|name| serving.runs(name) || (serving.gateway && *name == order)).collect();
    // The card vault, where the gateway deposits and a granted component
    // redeems; a host doing neither has none.
    let needs_vault = serving.gateway || manifest.components.iter().any(|(n, s)| s.vault && serving.runs(n));
    let (mut stores, vault) = {
        let manifest = manifest.clone();
        let mut names: Vec<String> = loaded.iter().map(|n| (*n).clone()).collect();
        if needs_vault {
            names.push(crate::vault::VAULT_STORE.to_owned());
        }
        let clock = clock.clone();
        // Connecting blocks (a database may take seconds to answer).
        tokio::task::spawn_blocking(move || {
            let mut stores = open_stores(&manifest, &names)?;
            let vault = needs_vault.then(|| open_vault(&manifest, &mut stores, clock)).transpose()?;
            anyhow::Ok((stores, vault))
        })
        .await??
    };
    let mut services = BTreeMap::new();
    for name in loaded {
        let settings = &manifest.components[name];
        // The Wasm stack is an engine setting: one engine per stack size.
        let engine = engine.with_stack(settings.stack_kib << 10)?;
        let component =
            LoadedComponent::from_file(&engine, &settings.wasm).with_context(|| format!("component {name:?}"))?;
        let grants = settings.grants(name)?;
        component.check_grants(&engine, grants.clone()).with_context(|| format!("component {name:?}"))?;
        tracing::info!(component = %name, version = %component.sha256, wasm = ?settings.wasm, from_cache = component.from_cache, "loaded");
        let store = stores.remove(name).context("store opened for every loaded component")?;
        let vault_granted = grants.vault;
        let spec = service_spec(name, settings, component, store, clock.clone(), grants);
        let service = Arc::new(ServiceRuntime::new(engine.clone(), spec));
        service.set_shadow_settings(settings.shadow.clone());
        if let Some(vault) = vault.as_ref().filter(|_| vault_granted) {
            service.set_vault(vault.clone());
        }
        services.insert(name.clone(), service);
    }
    let schemas = Arc::new(schema_set(manifest)?);
    for service in services.values().filter(|_| manifest.schemas.validate) {
        service.set_schemas(schemas.clone());
    }
    let served: BTreeMap<String, _> =
        services.iter().map(|(name, service)| (name.clone(), service.current().contract.clone())).collect();
    let book = Arc::new(contract_book(manifest, schemas, served)?);
    for service in services.values() {
        service.set_contracts(book.clone());
    }
    Ok((services, vault))
}

/// The contracts between the components of `manifest`: those `served`
/// here as loaded, the others as their files say.
///
/// # Errors
/// Every contract broken, one line each; a file that cannot be read.
fn contract_book(
    manifest: &Manifest,
    schemas: Arc<crate::schemas::Schemas>,
    mut served: BTreeMap<String, Option<Contract>>,
) -> anyhow::Result<ContractBook> {
    for (name, settings) in &manifest.components {
        if !served.contains_key(name) {
            let bytes =
                std::fs::read(&settings.wasm).with_context(|| format!("component {name:?}: {:?}", settings.wasm))?;
            let contract = Contract::from_wasm(&bytes).map_err(|err| anyhow::anyhow!("component {name:?}: {err}"))?;
            served.insert(name.clone(), contract);
        }
    }
    ContractBook::new(Arc::new(manifest.clone()), schemas, |name| served.get(name).cloned().flatten())
        .map_err(|problems| anyhow::anyhow!("the components break their contracts:\n{problems}"))
}

/// The event schemas of `manifest`: its folder's, else the ones the host
/// was built with.
///
/// # Errors
/// A folder that cannot be read, or a schema that is not valid.
pub fn schema_set(manifest: &Manifest) -> anyhow::Result<crate::schemas::Schemas> {
    Ok(match &manifest.schemas.dir {
        Some(dir) => crate::schemas::Schemas::load(dir).context("schemas.dir")?,
        None => crate::schemas::Schemas::generated(),
    })
}
