//! The wasmtime engines, their linker and the epoch ticker that bounds every
//! call's time in guest code.
//!
//! wasmtime sets the deepest Wasm stack per engine, not per store, so each
//! distinct `stack_kib` of the manifest gets an engine of its own
//! ([`Engine::with_stack`]); they share the compile cache directory and one
//! ticker. A component runs on the engine it was compiled by.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use wasmtime::component::Linker;

use super::HostState;

/// How often the epoch advances; a call's budget is rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Largest linear memory a component may be granted (`memory_mib` ≤ 4096).
pub const MAX_MEMORY_BYTES: usize = 4096 << 20;

/// Wasm stack of a call unless the manifest says otherwise (`stack_kib`).
pub const DEFAULT_STACK_BYTES: usize = 512 << 10;

/// Deepest Wasm stack a component may be granted (`stack_kib` ≤ 4096).
pub const MAX_STACK_BYTES: usize = 4 << 20;

/// Native stack of a thread that calls guests: guests run on the caller's
/// native stack, so it holds the deepest Wasm stack plus room for the host
/// functions they call.
pub const CALL_THREAD_STACK: usize = MAX_STACK_BYTES + (4 << 20);

/// Elements of one Wasm table (function references): what a compiled Rust,
/// JavaScript or Python component declares, with room to spare. A table
/// that would grow past it stays as it is (`table.grow` returns -1).
pub const MAX_TABLE_ELEMENTS: usize = 20_000;

/// Component instances alive at once across all services of one engine: one
/// call per service executor, the query pools and reload trials fit well
/// within it.
const POOL_INSTANCES: u32 = 128;

/// One engine and linker for components granted one stack size; cheap to
/// clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    cache: Option<super::ComponentCache>,
    stack_bytes: usize,
    family: Arc<Family>,
}

/// The engines of one host: the ticker that advances their epochs, and the
/// one engine per stack size.
struct Family {
    cache: Option<super::CacheLocation>,
    ticking: Arc<Ticking>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
    by_stack: Mutex<HashMap<usize, Weak<Inner>>>,
}

/// What the ticker thread sees: the engines to tick (weakly, so that an
/// engine nobody uses goes away) and when to stop.
#[derive(Default)]
struct Ticking {
    engines: Mutex<Vec<wasmtime::EngineWeak>>,
    stop: AtomicBool,
}

impl Engine {
    /// Creates the engine, without a compile cache, and starts the epoch ticker.
    ///
    /// # Errors
    /// When wasmtime rejects the configuration or the linker cannot be built.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_cache(None)
    }

    /// Creates the engine (with the default stack) with compiled components
    /// cached in `cache_dir`, sealed by a key beside it (`{cache_dir}.key`;
    /// the host keeps it in its state directory, [`Engine::with_cache_at`]).
    ///
    /// # Errors
    /// As [`Engine::with_cache_at`].
    pub fn with_cache(cache_dir: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        Self::with_cache_at(cache_dir.map(super::CacheLocation::beside))
    }

    /// Creates the engine (with the default stack) with compiled components
    /// cached at `cache`.
    ///
    /// # Errors
    /// As [`Engine::new`], or a cache directory or key that others could
    /// write or read ([`super::CacheLocation::check`]).
    pub fn with_cache_at(cache: Option<super::CacheLocation>) -> anyhow::Result<Self> {
        if let Some(location) = &cache {
            location.check()?;
        }
        let ticking = Arc::new(Ticking::default());
        // A plain thread rather than a tokio task: the ticker must keep
        // running even when every runtime worker is busy.
        let ticker = {
            let ticking = ticking.clone();
            std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || {
                while !ticking.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    let mut engines = ticking.engines.lock().unwrap_or_else(PoisonError::into_inner);
                    engines.retain(|weak| match weak.upgrade() {
                        Some(engine) => {
                            engine.increment_epoch();
                            true
                        }
                        None => false,
                    });
                }
            })?
        };
        let family =
            Arc::new(Family { cache, ticking, ticker: Mutex::new(Some(ticker)), by_stack: Mutex::new(HashMap::new()) });
        Self::build(family, DEFAULT_STACK_BYTES)
    }

    /// The engine of this host whose calls get `stack_bytes` of Wasm stack:
    /// this one if it has that size, else the one made before for it, else
    /// a new one (sharing the cache directory and the ticker).
    ///
    /// # Errors
    /// A size of 0 or above [`MAX_STACK_BYTES`], or as [`Engine::new`].
    pub fn with_stack(&self, stack_bytes: usize) -> anyhow::Result<Self> {
        if stack_bytes == self.inner.stack_bytes {
            return Ok(self.clone());
        }
        anyhow::ensure!(
            (1..=MAX_STACK_BYTES).contains(&stack_bytes),
            "a Wasm stack of {stack_bytes} bytes is outside 1..={MAX_STACK_BYTES}"
        );
        let family = &self.inner.family;
        let by_stack = family.by_stack.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(inner) = by_stack.get(&stack_bytes).and_then(Weak::upgrade) {
            return Ok(Self { inner });
        }
        drop(by_stack);
        Self::build(family.clone(), stack_bytes)
    }

    fn build(family: Arc<Family>, stack_bytes: usize) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(stack_bytes);
        // Calls are synchronous (no fibers), but wasmtime still checks the
        // Wasm stack against the async one it would use.
        config.async_stack_size(stack_bytes.max(2 << 20));
        // A fresh instance per call comes from a pool of pre-reserved slots
        // whose memory is reset, not unmapped: no mmap/munmap per call.
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 4)
            .max_memory_size(MAX_MEMORY_BYTES)
            .table_elements(MAX_TABLE_ELEMENTS)
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config).map_err(anyhow::Error::from)?;
        let linker = super::linker(&engine).map_err(anyhow::Error::from)?;
        let cache = family.cache.clone().map(|location| super::ComponentCache::new(location, &engine));
        family.ticking.engines.lock().unwrap_or_else(PoisonError::into_inner).push(engine.weak());
        let inner = Arc::new(Inner { engine, linker, cache, stack_bytes, family: family.clone() });
        family.by_stack.lock().unwrap_or_else(PoisonError::into_inner).insert(stack_bytes, Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }

    /// The Wasm stack of this engine's calls, in bytes.
    pub fn stack_bytes(&self) -> usize {
        self.inner.stack_bytes
    }

    /// The compile cache, if any.
    pub fn cache(&self) -> Option<&super::ComponentCache> {
        self.inner.cache.as_ref()
    }

    /// The linker with WASI (no capabilities) and the shop imports.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.inner.linker
    }

    /// Epoch ticks covering `budget`, plus one for the tick in progress.
    pub fn ticks_for(&self, budget: Duration) -> u64 {
        (budget.as_millis() as u64).div_ceil(EPOCH_TICK.as_millis() as u64) + 1
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        self.ticking.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.lock().ok().and_then(|mut t| t.take()) {
            let _ = ticker.join();
        }
    }
}
