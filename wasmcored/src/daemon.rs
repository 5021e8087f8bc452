//! The shared state of one tenant's worker, as every command sees it: configuration,
//! registry, executor, state directory, admission counters and quotas, and the way up to
//! the broker for what crosses tenants ([`Upstream`]).
//!
//! Commands ([`crate::cmd`]) and the connection layer use it; the worker's loops in
//! [`crate::worker`] own it. It knows nothing of sockets or of any command.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::{self, Config, Live};
use crate::control::Ask;
use crate::engine::WasmEngine;
use crate::error::Error;
use crate::executor::Executor;
use crate::metrics::{Metrics, Refusal};
use crate::registry::{Binary, Registry};
use crate::shard::Counter;
use crate::state::{MapStateStore, StateStore};
use crate::store::{self, RestoreReport, StateDir};
use crate::tenant::{Scope, Tenant};

/// The way from a worker to the broker: what only the broker can answer (an admin's view
/// of every tenant, a request about another tenant's binary, telling the other workers
/// that public binaries changed). The answer is a wire response, relayed as it is.
pub trait Upstream: Send + Sync {
    fn ask(&self, tenant: &Tenant, ask: Ask) -> Pending<serde_json::Value>;
    /// An admin's `load` by path: the file, opened by the broker.
    fn open(&self, tenant: &Tenant, path: &str) -> Pending<std::os::fd::OwnedFd>;
}

/// An answer of the broker, to be awaited.
pub type Pending<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send>>;

/// Shared state of a running daemon.
pub struct Daemon {
    live: Live,
    /// Counters of executions, refusals, connections and loads (shared with the registry
    /// and the executor, which count what they see).
    pub metrics: Arc<Metrics>,
    /// The state directory: binaries and plugin state persist here.
    pub store: Arc<StateDir>,
    /// What start-up restored.
    pub restore_report: RestoreReport,
    pub registry: Registry,
    pub executor: Executor,
    pub started: Instant,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Executions started since start.
    pub executions: Counter,
    /// Executions running per tenant (the concurrency quota).
    running: PerTenant,
    /// Connections open per tenant (the connection quota).
    open: Arc<PerTenant>,
    /// Loads compiling per tenant (the load quota).
    loading: Arc<PerTenant>,
    /// Slots for compilations running at once (`registry.max_concurrent_loads`).
    pub loads: Arc<Semaphore>,
    /// Execution failures logged in the current rate-limit window, and the window's start.
    failure_log: std::sync::Mutex<(Instant, u32)>,
    /// Whose binaries this process holds.
    pub scope: Scope,
    /// The broker, for a tenant's worker; `None` in one process for all (tests).
    upstream: Option<Box<dyn Upstream>>,
    /// Held while a binary's configuration is stored and swapped (`configure`), so that
    /// concurrent changes land on disk and in memory in the same order.
    pub(crate) configuring: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Failure lines logged per window; the rest are counted and summarised.
const FAILURE_LOG_BURST: u32 = 20;
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Counts per tenant with a cap each. A tenant's counter is made the first time it is
/// counted and then kept, one per UID seen (as the metrics keep theirs): taking and giving
/// back a slot reads a snapshot of the map and changes one atomic, so the executions of one
/// tenant on two cores share that counter's cache line and nothing else (no lock, no entry
/// made and removed per execution; docs/PERFORMANCE.md).
#[derive(Debug, Default)]
struct PerTenant(ArcSwap<HashMap<u32, Arc<AtomicUsize>>>);

impl PerTenant {
    /// `f` on the counter of `uid`, made at 0 if there is none yet.
    fn with<R>(&self, uid: u32, f: impl FnOnce(&AtomicUsize) -> R) -> R {
        if let Some(n) = self.0.load().get(&uid) {
            return f(n);
        }
        self.0.rcu(|counts| {
            let mut counts = HashMap::clone(counts);
            counts.entry(uid).or_default();
            counts
        });
        f(&self.0.load()[&uid])
    }

    /// Count one more for `uid` unless it already has `cap`; `Err` holds the count.
    fn take(&self, uid: u32, cap: usize) -> Result<(), usize> {
        self.with(uid, |n| {
            n.fetch_update(AcqRel, Acquire, |n| (n < cap).then_some(n + 1))
                .map(drop)
        })
    }

    /// The count of `uid`.
    fn of(&self, uid: u32) -> usize {
        self.0.load().get(&uid).map_or(0, |n| n.load(Acquire))
    }

    /// [`PerTenant::take`] as a slot that gives itself back on drop.
    fn take_owned(self: &Arc<Self>, uid: u32, cap: usize) -> Result<TenantSlot, usize> {
        self.take(uid, cap)?;
        Ok(TenantSlot {
            counts: self.clone(),
            uid,
        })
    }

    /// Give back one taken with [`PerTenant::take`].
    fn give(&self, uid: u32) {
        self.with(uid, |n| n.fetch_sub(1, AcqRel));
    }
}

/// A running execution of one tenant; frees its slot on drop.
#[derive(Debug)]
pub struct ExecSlot<'a> {
    daemon: &'a Daemon,
    uid: u32,
}

impl Drop for ExecSlot<'_> {
    fn drop(&mut self) {
        self.daemon.running.give(self.uid);
    }
}

/// One of a tenant's slots (an open connection, a compiling load) that outlives the
/// borrow of the daemon; frees itself on drop.
#[derive(Debug)]
pub struct TenantSlot {
    counts: Arc<PerTenant>,
    uid: u32,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.counts.give(self.uid);
    }
}

impl Daemon {
    /// Build the engine, registry and executor for `config`, restoring the binaries of
    /// `scope` from the state directory. A tenant's worker gets `upstream`, the broker; with
    /// [`Scope::All`] this process opens (and cleans) the state directory itself.
    pub fn new(
        config: Config,
        scope: Scope,
        upstream: Option<Box<dyn Upstream>>,
    ) -> anyhow::Result<Arc<Daemon>> {
        let opened = match scope {
            Scope::All => StateDir::open(&config.state_dir),
            Scope::Tenant(uid) => StateDir::attach(&config.state_dir, uid),
        };
        let store = opened.map_err(|e| anyhow::anyhow!("state directory: {e}"))?;
        let engine = WasmEngine::configure(&config.engine, &config.limits)?;
        Daemon::build(config, engine, store, scope, upstream, Instant::now())
    }

    /// [`Daemon::new`] from an engine and a state directory made beforehand (a worker makes
    /// them before it confines itself).
    pub fn build(
        config: Config,
        engine: crate::engine::Engines,
        store: StateDir,
        scope: Scope,
        upstream: Option<Box<dyn Upstream>>,
        started: Instant,
    ) -> anyhow::Result<Arc<Daemon>> {
        config
            .check()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let start = Instant::now();
        let store = Arc::new(store);
        let engine = WasmEngine::start(engine, &config.engine)?;
        let live = config::live(config);
        let ids = store::stored_ids(&store, scope)
            .map_err(|e| anyhow::anyhow!("reading stored binaries: {e}"))?;
        let file_state = MapStateStore::open(store.clone(), &ids)
            .map_err(|e| anyhow::anyhow!("reading plugin state: {e}"))?;
        let state: Arc<dyn StateStore> = Arc::new(file_state);
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(engine.clone(), live.clone(), state.clone())?
            .with_metrics(metrics.clone());
        let report = store::restore(&store, &registry, scope)
            .map_err(|e| anyhow::anyhow!("restoring binaries: {e}"))?;
        // State of an entry that was quarantined has no binary any more.
        for id in ids {
            if registry.get(id).is_none() {
                state.remove_binary(id);
                for (holder, _) in store.state_roots().unwrap_or_default() {
                    let _ = store.remove_state(holder, id);
                }
            }
        }
        let whose = match scope {
            Scope::All => String::new(),
            Scope::Tenant(uid) => format!(" (uid {uid}'s and the public ones)"),
        };
        log::info!(
            "restored {} binaries{whose} from {} in {} ms ({} recompiled, {} quarantined)",
            report.restored,
            store.root().display(),
            start.elapsed().as_millis(),
            report.recompiled,
            report.quarantined
        );
        let executor = Executor::new(engine, state, live.clone()).with_metrics(metrics.clone());
        let config_loads = live.load().registry.max_concurrent_loads;
        Ok(Arc::new(Daemon {
            live,
            metrics,
            store,
            restore_report: report,
            registry,
            executor,
            started,
            connections: AtomicU64::new(0),
            executions: Counter::default(),
            loads: Arc::new(Semaphore::new(match config_loads {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n,
            })),
            running: PerTenant::default(),
            open: Arc::default(),
            loading: Arc::default(),
            failure_log: std::sync::Mutex::new((Instant::now(), 0)),
            scope,
            upstream,
            configuring: std::sync::Mutex::new(()),
        }))
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// Take one of `tenant`'s execution slots, or `busy` at once when all are in use.
    pub fn admit(&self, tenant: &Tenant) -> Result<ExecSlot<'_>, Error> {
        let cap = self
            .live
            .load()
            .quotas
            .for_uid(tenant.uid)
            .concurrent_executions;
        self.running.take(tenant.uid, cap).map_err(|n| {
            self.metrics
                .refused(tenant.uid, Refusal::ConcurrentExecutions);
            Error::Busy(format!(
                "you already have {n} executions running, your limit is {cap}; retry when one finishes"
            ))
        })?;
        Ok(ExecSlot {
            daemon: self,
            uid: tenant.uid,
        })
    }

    /// Take one of `tenant`'s load slots, or `busy` when all are in use.
    pub fn admit_load(&self, tenant: &Tenant) -> Result<TenantSlot, Error> {
        let cap = self.live.load().quotas.for_uid(tenant.uid).concurrent_loads;
        self.loading.take_owned(tenant.uid, cap).map_err(|n| {
            self.metrics.refused(tenant.uid, Refusal::ConcurrentLoads);
            Error::Busy(format!(
                "you already have {n} loads compiling, your limit is {cap}; retry when one finishes"
            ))
        })
    }

    /// `uid`'s executions running and connections open now.
    pub fn tenant_load(&self, uid: u32) -> (u64, u64) {
        (self.running.of(uid) as u64, self.open.of(uid) as u64)
    }

    /// Take one of `tenant`'s connection slots, or `busy` when all are in use.
    pub fn open_connection(&self, tenant: &Tenant) -> Result<TenantSlot, Error> {
        let cap = self.live.load().quotas.for_uid(tenant.uid).connections;
        let t = self.metrics.tenant(tenant.uid);
        t.connections_opened.fetch_add(1, Relaxed);
        self.open.take_owned(tenant.uid, cap).map_err(|n| {
            self.metrics.refused(tenant.uid, Refusal::Connections);
            Error::Busy(format!(
                "you already have {n} connections open, your limit is {cap}; close one and retry"
            ))
        })
    }

    /// Apply a new config; returns the keys that need a restart to change.
    pub fn apply(&self, new: Config) -> Vec<&'static str> {
        let (applied, restart) = self.config().reload_from(new);
        log::set_max_level(applied.server.log_level);
        self.live.store(Arc::new(applied));
        restart
    }

    /// The broker, in a tenant's worker.
    pub fn upstream(&self) -> Option<&dyn Upstream> {
        self.upstream.as_deref()
    }

    /// Log an execution failure of `bin` (`None`: a chain), at most FAILURE_LOG_BURST lines
    /// a minute.
    pub fn note_failure(&self, tenant: &Tenant, bin: Option<&Binary>, e: &Error) {
        let mut w = self.failure_log.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed() > FAILURE_LOG_WINDOW {
            if w.1 > FAILURE_LOG_BURST {
                log::info!(
                    "{} more execution failures in the last minute were not logged",
                    w.1 - FAILURE_LOG_BURST
                );
            }
            *w = (Instant::now(), 0);
        }
        w.1 += 1;
        if w.1 > FAILURE_LOG_BURST {
            return;
        }
        let code = e.code().as_str();
        match bin {
            Some(b) => {
                let name = b.display_name();
                log::info!(
                    tenant_uid = tenant.uid, binary:% = b.id, binary_name = name.as_str(), error_code = code;
                    "execution of {name} for uid {} failed: {code} ({e})",
                    tenant.uid
                );
            }
            None => log::info!(
                tenant_uid = tenant.uid, error_code = code;
                "execution of a chain for uid {} failed: {code} ({e})",
                tenant.uid
            ),
        }
    }
}
