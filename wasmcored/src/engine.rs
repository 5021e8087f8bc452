//! The Wasmtime engine: pooling allocator, copy-on-write memory images, epoch interruption,
//! fuel, and the epoch ticker thread.
//!
//! One [`WasmEngine`] per daemon. The registry compiles with it; the executor makes one
//! `Store` per execution on it. The ticker bumps the epoch every `epoch_tick` while any
//! execution runs and parks when none has run for a while, so an idle daemon never wakes.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, PoolingAllocatorMetrics,
};

use crate::config::{EngineConfig, LimitsConfig};
use crate::context::StoreShape;
use crate::shard::{self, SHARDS, Sharded};

/// The Wasmtime release the daemon is built with (pinned in the workspace's Cargo.toml).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Idle ticks before the ticker parks.
const IDLE_TICKS_BEFORE_PARK: u32 = 200;

/// The engines plus their ticker.
///
/// One Wasmtime engine per CPU (up to [`SHARDS`]), each with a pool of its own: a store is
/// made on the engine of the thread that starts it. Every instantiation writes
/// engine-wide state (the type registry's reference counts and lock, the pool's slot
/// allocator); with one engine for both cores, those cache lines and locks were shared by
/// every execution, and bare Wasmtime alone cost 1.5-1.8x more per execution with both
/// cores busy than on one (docs/PERFORMANCE.md, "Per-request overhead"). Binaries are
/// compiled once, on the first engine, and deserialized into the others.
pub struct WasmEngine {
    engines: Box<[Engine]>,
    /// Each engine's pool figures (slots in use), read to place a store.
    pools: Box<[PoolingAllocatorMetrics]>,
    /// Core instance slots of each engine's pool.
    per_engine: u64,
    ticker: Ticker,
    fuel_metering: bool,
    tick: Duration,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("fuel_metering", &self.fuel_metering)
            .finish_non_exhaustive()
    }
}

/// The calling thread's engine number (modulo the engines): threads that start stores take
/// one in turn, the first time they start one, so the runtime's threads, the only ones that
/// run executions, each have an engine of their own.
fn home() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static HOME: Cell<usize> = const { Cell::new(usize::MAX) });
    HOME.with(|h| match h.get() {
        usize::MAX => {
            let i = NEXT.fetch_add(1, Relaxed);
            h.set(i);
            i
        }
        i => i,
    })
}

thread_local! {
    /// This thread's stack holds a guest's ([`guest_threads`]).
    static GUEST_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Room on a thread's stack beyond the guest's own `engine.max_wasm_stack`: the host
/// functions it calls (a fibre gives them 1 MiB) and the runtime's frames below the call.
const HOST_STACK: usize = 2 << 20;

/// Make `builder`'s threads ones that run guests inline: stacks of `cfg.max_wasm_stack`
/// plus room for the host, marked for [`inline_here`].
pub fn guest_threads<'a>(
    builder: &'a mut tokio::runtime::Builder,
    cfg: &EngineConfig,
) -> &'a mut tokio::runtime::Builder {
    builder
        .thread_stack_size(cfg.max_wasm_stack + HOST_STACK)
        .on_thread_start(|| GUEST_STACK.set(true))
}

/// Run `f` on a thread of its own with the stack of a [`guest_threads`] thread, where
/// guests run inline: for tools and benchmarks that drive an executor from a
/// single-threaded runtime, as a worker's runtime threads drive it.
pub fn on_guest_thread<R: Send>(cfg: &EngineConfig, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("guest".into())
            .stack_size(cfg.max_wasm_stack + HOST_STACK)
            .spawn_scoped(s, || {
                GUEST_STACK.set(true);
                f()
            })
            .expect("starting a guest thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether a guest may run inline on this thread: synchronous calls on the thread's own
/// stack, which only a thread of a [`guest_threads`] runtime is sure to have room on.
/// Elsewhere guests run on fibres of their own.
pub fn inline_here() -> bool {
    GUEST_STACK.get()
}

/// A guest running inline has run for a while: give this thread's place in the runtime
/// (its Tokio worker core, with the tasks queued on it) to another thread, so the runtime
/// goes on serving the other connections while the guest runs on here.
///
/// Tokio's `block_in_place` sends the core to a new thread and takes it back when its
/// closure returns, if that thread has not picked it up yet: so the closure waits (at most
/// `wait`) until a task spawned just before has run, which the thread that took the core
/// runs first. Another worker may steal that task before: then the core may have come
/// back, and the caller tries again later ([`hand_off_due`]). Where this thread holds no
/// core any more, this costs the task's trip through the runtime's queue. Nothing happens
/// where no multi-threaded runtime runs the caller.
pub(crate) fn hand_off_thread(wait: Duration) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if !Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread) {
        return;
    }
    let (ran, runs) = std::sync::mpsc::sync_channel::<()>(1);
    tokio::spawn(async move {
        let _ = ran.send(());
    });
    tokio::task::block_in_place(|| {
        let _ = runs.recv_timeout(wait);
    });
}

/// Whether an inline guest that has seen `ticks` epoch ticks hands its thread off now: at
/// the second tick (the first may come right after it started, the second means it has run
/// a whole tick), then at ticks 3, 5, 9, 17, … in case an attempt left the core here.
pub(crate) fn hand_off_due(ticks: u32) -> bool {
    ticks >= 2 && (ticks - 1).is_power_of_two()
}

/// Engines wanted: one per CPU, at most [`SHARDS`].
pub fn engines_wanted() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(SHARDS)
}

/// Engines for pools of `pool_instances` slots: [`engines_wanted`] from 128 slots, one
/// below. Wasmtime shards a pool of 128 slots or more between the threads that use it
/// (each thread allocates from a home share first, and keeps its warm slots there); a
/// smaller pool it keeps whole, and so do we.
pub fn engines_for(pool_instances: u32) -> usize {
    if pool_instances >= 128 {
        engines_wanted()
    } else {
        1
    }
}

impl WasmEngine {
    /// Build the engines for these settings.
    pub fn new(cfg: &EngineConfig, limits: &LimitsConfig) -> anyhow::Result<Arc<WasmEngine>> {
        WasmEngine::start(WasmEngine::configure(cfg, limits)?, cfg)
    }

    /// The Wasmtime engines for these settings ([`engines_for`] them, each with a pool of
    /// `engine.pool_instances` slots and `engine.max_unused_warm_slots` warm ones: each
    /// engine serves one thread mostly, and that thread keeps, in its engine, the share of
    /// the pool it had of the one pool before), without the ticker: no thread is started,
    /// so a worker makes them (and Wasmtime opens what it opens, `/proc/self/pagemap`)
    /// before it confines itself.
    pub fn configure(cfg: &EngineConfig, limits: &LimitsConfig) -> anyhow::Result<Engines> {
        let n = engines_for(cfg.pool_instances);
        let config = wasmtime_config(cfg, limits)?;
        let engines = (0..n)
            .map(|_| {
                Engine::new(&config)
                    .map_err(|e| anyhow::anyhow!("configuring the wasm engine: {e:#}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Engines {
            engines,
            per_engine: u64::from(cfg.pool_instances),
        })
    }

    /// `engines` (made by [`WasmEngine::configure`] with `cfg`) with their ticker started.
    pub fn start(engines: Engines, cfg: &EngineConfig) -> anyhow::Result<Arc<WasmEngine>> {
        let Engines {
            engines,
            per_engine,
        } = engines;
        let pools = engines
            .iter()
            .map(|e| {
                e.pooling_allocator_metrics()
                    .ok_or_else(|| anyhow::anyhow!("the wasm engine has no pooling allocator"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ticker = Ticker::start(engines.clone(), cfg.epoch_tick)?;
        Ok(Arc::new(WasmEngine {
            engines: engines.into(),
            pools: pools.into(),
            per_engine,
            ticker,
            fuel_metering: cfg.fuel_metering,
            tick: cfg.epoch_tick,
        }))
    }

    /// The first engine: binaries are compiled on it, and its compatibility hash names
    /// their stored code.
    pub fn engine(&self) -> &Engine {
        &self.engines[0]
    }

    /// Every engine; index them with [`WasmEngine::pick`].
    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// The engine for a new store of `shape`: the calling thread's, unless its pool has no
    /// room for the store (then the one with the most room), so that a thread whose
    /// engine is full still starts stores while another has room.
    pub fn pick(&self, shape: StoreShape) -> usize {
        let mine = home() % self.engines.len();
        let free = |i: usize| {
            self.per_engine
                .saturating_sub(self.pools[i].core_instances())
        };
        if self.engines.len() == 1 || free(mine) >= shape.instances as u64 {
            return mine;
        }
        (0..self.engines.len())
            .max_by_key(|i| free(*i))
            .unwrap_or(mine)
    }

    /// A stable name for this engine's compatibility: precompiled artifacts are stored under
    /// it, so a Wasmtime upgrade or a changed engine setting recompiles from the original
    /// bytes instead of loading incompatible code.
    pub fn compat_hash(&self) -> String {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same engine gives the same name in every process.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        self.engine().precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    pub fn fuel_metering(&self) -> bool {
        self.fuel_metering
    }

    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Mark an execution as running for as long as the guard lives (keeps the ticker going).
    pub fn running(&self) -> RunningGuard<'_> {
        self.ticker.enter()
    }

    /// Slots of the pooling allocators in use now (all engines), and their capacity
    /// (`engine.pool_instances` for each engine).
    pub fn pool(&self) -> Option<wasmcore_proto::PoolMetrics> {
        let sum = |f: &dyn Fn(&PoolingAllocatorMetrics) -> u64| self.pools.iter().map(f).sum();
        Some(wasmcore_proto::PoolMetrics {
            capacity: self.per_engine * self.engines.len() as u64,
            core_instances: sum(&|m| m.core_instances()),
            component_instances: sum(&|m| m.component_instances()),
            memories: sum(&|m| m.memories() as u64),
            tables: sum(&|m| m.tables() as u64),
            unused_warm_memories: sum(&|m| u64::from(m.unused_warm_memories())),
        })
    }

    /// Executions running now.
    pub fn running_count(&self) -> usize {
        self.ticker.shared.active()
    }
}

fn wasmtime_config(cfg: &EngineConfig, limits: &LimitsConfig) -> anyhow::Result<wasmtime::Config> {
    let mut c = wasmtime::Config::new();
    c.epoch_interruption(true);
    c.consume_fuel(cfg.fuel_metering);
    c.max_wasm_stack(cfg.max_wasm_stack);
    // Host calls (WASI, state) run on the same fiber stack as the guest: give them room.
    c.async_stack_size(cfg.max_wasm_stack + (1 << 20));
    c.memory_init_cow(true);
    // Pool slots are reserved at the maximum memory size, so a memory never moves: saying
    // so lets Cranelift keep the base pointer in a register across loops (and compiles a
    // large module ~3 % faster; docs/PERFORMANCE.md).
    c.memory_may_move(false);
    if !cfg.guard_pages {
        // Compiled-in bounds checks (and explicit checks for the other traps): a memory's
        // accessible size then never has to shrink back with `mprotect` when its slot is
        // reused. That `mprotect` takes the address-space lock for writing and flushes
        // the TLB of every core running a daemon thread; with two executions in parallel
        // it made each one about 9x slower (docs/PERFORMANCE.md).
        c.signals_based_traps(false);
        c.memory_guard_size(0);
        c.memory_reservation(limits.max_memory_mb << 20);
    }
    c.parallel_compilation(true);
    // Only the features plugins need; the rest stay off to shrink the attack surface.
    c.wasm_memory64(false);
    c.wasm_multi_memory(false);
    // Components (kind `component`): `wasi:cli/command` through wasmtime-wasi.
    c.wasm_component_model(true);
    c.wasm_stack_switching(false);
    c.wasm_simd(true);
    c.wasm_bulk_memory(true);

    let mut pool = PoolingAllocationConfig::default();
    let n = cfg.pool_instances;
    pool.total_core_instances(n)
        .total_memories(n)
        .total_tables(n)
        .total_stacks(n)
        // A component takes several core instances, memories and tables of the pool (as
        // many as its store may create: `StoreShape::COMPONENT`), so a pool full of
        // components runs fewer executions at once than one of modules.
        .total_component_instances(n)
        .max_core_instances_per_component(StoreShape::COMPONENT.instances as u32)
        .max_memories_per_component(StoreShape::COMPONENT.memories as u32)
        .max_tables_per_component(StoreShape::COMPONENT.tables as u32)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .table_elements(limits.max_table_elements)
        .max_memory_size((limits.max_memory_mb as usize) << 20)
        .linear_memory_keep_resident(cfg.memory_keep_resident)
        .table_keep_resident(cfg.memory_keep_resident)
        .max_unused_warm_slots(cfg.max_unused_warm_slots)
        // Reset only the pages an execution dirtied (Linux >= 6.7), so a plugin with a
        // large memory (a Rust plugin's 1 MiB stack) pays for what it touched, neither a
        // memset of everything kept resident nor page faults on every execution.
        .pagemap_scan(Enabled::Auto);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(c)
}

struct TickShared {
    /// Executions running and started, per shard: every execution counts itself in its
    /// thread's copy, and the ticker sums them (no cache line shared by two cores' executions).
    counts: Sharded<TickCounts>,
    parked: AtomicBool,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct TickCounts {
    /// Executions running (an execution's guard gives back to the copy it took from,
    /// whatever thread the execution ends on).
    active: AtomicUsize,
    /// Executions started; lets the ticker see activity between two of its looks.
    started: AtomicUsize,
}

impl TickShared {
    fn active(&self) -> usize {
        self.counts.all().map(|c| c.active.load(SeqCst)).sum()
    }

    fn started(&self) -> usize {
        let n = self.counts.all().map(|c| c.started.load(SeqCst));
        // Wraps after 2^64 executions, as one counter would; only changes are compared.
        n.fold(0, usize::wrapping_add)
    }
}

/// The engines [`WasmEngine::configure`] makes, before their ticker starts.
pub struct Engines {
    engines: Vec<Engine>,
    per_engine: u64,
}

/// The epoch ticker thread; joined on drop.
struct Ticker {
    shared: Arc<TickShared>,
    handle: Option<JoinHandle<()>>,
}

/// Keeps the ticker running while an execution is in progress.
#[derive(Debug)]
pub struct RunningGuard<'a> {
    shared: &'a TickShared,
    shard: usize,
}

impl std::fmt::Debug for TickShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickShared").finish_non_exhaustive()
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let c = self.shared.counts.get(self.shard);
        c.active.fetch_sub(1, SeqCst);
    }
}

impl Ticker {
    fn start(engines: Vec<Engine>, tick: Duration) -> anyhow::Result<Ticker> {
        let shared = Arc::new(TickShared {
            counts: Sharded::default(),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut idle = 0u32;
                let mut last_started = 0usize;
                while !s.stop.load(SeqCst) {
                    std::thread::sleep(tick);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                    let started = s.started();
                    if s.active() > 0 || started != last_started {
                        idle = 0;
                        last_started = started;
                        continue;
                    }
                    idle += 1;
                    if idle < IDLE_TICKS_BEFORE_PARK {
                        continue;
                    }
                    // Park, unless an execution started after our last look: `enter` bumps
                    // `started` before it reads `parked`, and we set `parked` before we
                    // re-read `started`, so one of the two always sees the other.
                    s.parked.store(true, SeqCst);
                    if s.started() == last_started && !s.stop.load(SeqCst) {
                        std::thread::park();
                    }
                    s.parked.store(false, SeqCst);
                    idle = 0;
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the epoch ticker thread: {e}"))?;
        Ok(Ticker {
            shared,
            handle: Some(handle),
        })
    }

    fn enter(&self) -> RunningGuard<'_> {
        let shard = shard::shard();
        let c = self.shared.counts.get(shard);
        c.active.fetch_add(1, SeqCst);
        c.started.fetch_add(1, SeqCst);
        if self.shared.parked.load(SeqCst)
            && let Some(h) = &self.handle
        {
            h.thread().unpark();
        }
        RunningGuard {
            shared: &self.shared,
            shard,
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_wasmtime_version_is_the_pinned_one() {
        let manifest = include_str!("../../Cargo.toml");
        assert!(
            manifest.contains(&format!("wasmtime = {{ version = \"={WASMTIME_VERSION}\"")),
            "WASMTIME_VERSION does not match the workspace's pin"
        );
    }

    #[test]
    fn ticker_advances_while_running_and_joins_on_drop() {
        let cfg = EngineConfig {
            pool_instances: 4,
            ..EngineConfig::default()
        };
        let e = WasmEngine::new(&cfg, &LimitsConfig::default()).unwrap();
        let guard = e.running();
        assert_eq!(e.running_count(), 1);
        drop(guard);
        assert_eq!(e.running_count(), 0);
        drop(e); // joins the thread; a hang here fails the test by timeout
    }
}
