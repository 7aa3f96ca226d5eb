//! The shared wasmtime engine, its linker and the epoch ticker that bounds
//! every call's wall-clock time.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Linker;

use super::HostState;

/// How often the epoch advances; a call's budget is rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Largest linear memory a component may be granted (`memory_mib` ≤ 4096).
pub const MAX_MEMORY_BYTES: usize = 4096 << 20;

/// Deepest Wasm stack of a call. Guests run on the caller's native stack, so
/// the threads that call them have [`CALL_THREAD_STACK`] bytes.
pub const MAX_WASM_STACK: usize = 512 << 10;

/// Native stack of a thread that calls guests: the Wasm stack plus room for
/// the host functions it calls.
pub const CALL_THREAD_STACK: usize = 8 << 20;

/// Component instances alive at once across all services: one call per
/// service executor, the query pools and reload trials fit well within it.
const POOL_INSTANCES: u32 = 128;

/// The engine and linker shared by every component; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    cache: Option<super::ComponentCache>,
    ticker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine {
    /// Creates the engine, without a compile cache, and starts the epoch ticker.
    ///
    /// # Errors
    /// When wasmtime rejects the configuration or the linker cannot be built.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_cache(None)
    }

    /// Creates the engine with compiled components cached in `cache_dir`.
    ///
    /// # Errors
    /// As [`Engine::new`].
    pub fn with_cache(cache_dir: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        // A fresh instance per call comes from a pool of pre-reserved slots
        // whose memory is reset, not unmapped: no mmap/munmap per call.
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 4)
            .max_memory_size(MAX_MEMORY_BYTES)
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config).map_err(anyhow::Error::from)?;
        let linker = super::linker(&engine).map_err(anyhow::Error::from)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A plain thread rather than a tokio task: the ticker must keep
        // running even when every runtime worker is busy inside a guest.
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?
        };
        let cache = cache_dir.map(|dir| super::ComponentCache::new(dir, &engine));
        Ok(Self { inner: Arc::new(Inner { engine, linker, cache, ticker: std::sync::Mutex::new(Some(ticker)), stop }) })
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
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

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(ticker) = self.ticker.lock().ok().and_then(|mut t| t.take()) {
            let _ = ticker.join();
        }
    }
}
