//! The wasmtime engines, their linker and the epoch ticker that bounds every
//! call's time in guest code.
//!
//! wasmtime sets the deepest Wasm stack per engine, not per store, so each
//! distinct `stack_kib` of the manifest gets an engine of its own
//! ([`Engine::with_stack`]); they share the compile cache directory and one
//! ticker. A component runs on the engine it was compiled by.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
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
    cache_dir: Option<std::path::PathBuf>,
    ticking: Arc<Ticking>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
    by_stack: Mutex<HashMap<usize, Weak<Inner>>>,
}

/// What the ticker thread sees: the engines to tick (weakly, so that an
/// engine nobody uses goes away), whether any guest code runs, and when to
/// stop.
#[derive(Default)]
struct Ticking {
    engines: Mutex<Vec<wasmtime::EngineWeak>>,
    stop: AtomicBool,
    /// Calls into guest code under way ([`Engine::busy`]).
    busy: AtomicUsize,
    /// Where the ticker sleeps while no guest code runs.
    idle: Mutex<()>,
    wake: Condvar,
    /// Ticks so far.
    ticks: std::sync::atomic::AtomicU64,
}

/// How often the ticker ticks while no guest code runs: never needed (a
/// call's deadline counts from the epoch at its start), kept as a safety
/// net should guest code ever run outside [`Engine::busy`].
const IDLE_TICK: Duration = Duration::from_secs(1);

impl Ticking {
    /// The ticker: a tick every [`EPOCH_TICK`] while guest code runs, asleep
    /// otherwise (an idle host wakes it no more than once a second).
    fn run(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let busy = {
                let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                if self.busy.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::Relaxed) {
                    drop(self.wake.wait_timeout(idle, IDLE_TICK).unwrap_or_else(PoisonError::into_inner));
                }
                self.busy.load(Ordering::SeqCst) > 0
            };
            if busy {
                std::thread::sleep(EPOCH_TICK);
            }
            self.ticks.fetch_add(1, Ordering::Relaxed);
            let mut engines = self.engines.lock().unwrap_or_else(PoisonError::into_inner);
            engines.retain(|weak| match weak.upgrade() {
                Some(engine) => {
                    engine.increment_epoch();
                    true
                }
                None => false,
            });
        }
    }
}

/// Guest code runs while this lives: the epoch ticks ([`Engine::busy`]).
pub struct Busy(Arc<Ticking>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
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
    /// cached in `cache_dir`.
    ///
    /// # Errors
    /// As [`Engine::new`].
    pub fn with_cache(cache_dir: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        let ticking = Arc::new(Ticking::default());
        // A plain thread rather than a tokio task: the ticker must keep
        // running even when every runtime worker is busy.
        let ticker = {
            let ticking = ticking.clone();
            std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || ticking.run())?
        };
        let family = Arc::new(Family {
            cache_dir,
            ticking,
            ticker: Mutex::new(Some(ticker)),
            by_stack: Mutex::new(HashMap::new()),
        });
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
        let cache = family.cache_dir.clone().map(|dir| super::ComponentCache::new(dir, &engine));
        family.ticking.engines.lock().unwrap_or_else(PoisonError::into_inner).push(engine.weak());
        let inner = Arc::new(Inner { engine, linker, cache, stack_bytes, family: family.clone() });
        family.by_stack.lock().unwrap_or_else(PoisonError::into_inner).insert(stack_bytes, Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// Marks guest code as running until the guard drops: the epoch, which
    /// ends calls at their deadline, ticks only then. Every instantiation
    /// and call of a component holds one.
    pub fn busy(&self) -> Busy {
        let ticking = &self.inner.family.ticking;
        if ticking.busy.fetch_add(1, Ordering::SeqCst) == 0 {
            // Under the ticker's lock: it cannot miss this between its
            // check and its wait.
            let _idle = ticking.idle.lock().unwrap_or_else(PoisonError::into_inner);
            ticking.wake.notify_one();
        }
        Busy(ticking.clone())
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
        drop(self.ticking.idle.lock().unwrap_or_else(PoisonError::into_inner));
        self.ticking.wake.notify_one();
        if let Some(ticker) = self.ticker.lock().ok().and_then(|mut t| t.take()) {
            let _ = ticker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks of `engine`'s ticker during `wait`.
    fn ticks_during(engine: &Engine, wait: Duration) -> u64 {
        let ticks = || engine.inner.family.ticking.ticks.load(Ordering::Relaxed);
        let before = ticks();
        std::thread::sleep(wait);
        ticks() - before
    }

    #[test]
    fn the_epoch_ticks_only_while_guest_code_runs() {
        let engine = Engine::new().unwrap();
        let wait = Duration::from_millis(400);
        assert!(ticks_during(&engine, wait) <= 1, "an idle host's ticker sleeps (one safety tick a second)");
        let busy = engine.busy();
        let ticks = ticks_during(&engine, wait);
        assert!(ticks >= 10, "a tick every 10 ms while a call runs, {ticks} in {wait:?}");
        drop(busy);
        std::thread::sleep(EPOCH_TICK * 3);
        assert!(ticks_during(&engine, wait) <= 1, "asleep again once the call is over");
    }
}
