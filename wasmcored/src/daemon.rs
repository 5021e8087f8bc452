//! The daemon's shared state, as every command sees it: configuration, registry,
//! executor, state directory, admission counters and quotas, the watchdog's probe.
//!
//! Commands ([`crate::cmd`]) and the connection layer use it; the service loops in
//! [`crate::server`] own it. It knows nothing of sockets or of any command.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Semaphore;
use wasmcore_proto::LimitsRequest;

use crate::config::{self, Config, Live};
use crate::engine::WasmEngine;
use crate::error::Error;
use crate::executor::Executor;
use crate::metrics::{Metrics, Refusal};
use crate::registry::{Binary, Registry};
use crate::state::{MapStateStore, StateStore};
use crate::store::{self, RestoreReport, StateDir};
use crate::tenant::Tenant;

/// Re-reads the config (file plus command-line overrides) on SIGHUP.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

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
    pub executions: AtomicU64,
    /// Executions running per tenant (the concurrency quota).
    running: PerTenant,
    /// Connections open per tenant (the connection quota).
    open: Arc<PerTenant>,
    /// Loads compiling per tenant (the load quota).
    loading: Arc<PerTenant>,
    /// Slots for compilations running at once (`registry.max_concurrent_loads`).
    pub loads: Arc<Semaphore>,
    /// Milliseconds since start of the last connection opened or closed (idle exit).
    last_activity_ms: AtomicU64,
    /// Execution failures logged in the current rate-limit window, and the window's start.
    failure_log: std::sync::Mutex<(Instant, u32)>,
    /// A minimal module run by the watchdog to prove the executor works; set up at the first
    /// probe (see [`Daemon::probe`]).
    probe: tokio::sync::OnceCell<Arc<Binary>>,
    loader: Option<ConfigLoader>,
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

const PROBE_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 0))
  (func (export "process") (param i32 i32) (result i32) (i32.const 0)))"#;

/// Counts per tenant with a cap each; entry-locked updates.
#[derive(Debug, Default)]
struct PerTenant(DashMap<u32, usize>);

impl PerTenant {
    /// Count one more for `uid` unless it already has `cap`; `Err` holds the count.
    fn take(&self, uid: u32, cap: usize) -> Result<(), usize> {
        let mut n = self.0.entry(uid).or_insert(0);
        if *n >= cap {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    /// The count of `uid`.
    fn of(&self, uid: u32) -> usize {
        self.0.get(&uid).map_or(0, |n| *n)
    }

    /// [`PerTenant::take`] as a slot that gives itself back on drop.
    fn take_owned(self: &Arc<Self>, uid: u32, cap: usize) -> Result<TenantSlot, usize> {
        self.take(uid, cap)?;
        Ok(TenantSlot {
            counts: self.clone(),
            uid,
        })
    }

    fn give(&self, uid: u32) {
        if let Entry::Occupied(mut e) = self.0.entry(uid) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
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
    /// Build the engine, registry and executor for `config`. `loader` re-reads the config
    /// on SIGHUP (`None`: reload keeps the running config).
    pub fn new(config: Config, loader: Option<ConfigLoader>) -> anyhow::Result<Arc<Daemon>> {
        config
            .check()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let start = Instant::now();
        let store = Arc::new(
            StateDir::open(&config.state_dir)
                .map_err(|e| anyhow::anyhow!("state directory: {e}"))?,
        );
        let engine = WasmEngine::new(&config.engine, &config.limits)?;
        let live = config::live(config);
        let ids = store::stored_ids(&store)
            .map_err(|e| anyhow::anyhow!("reading stored binaries: {e}"))?;
        let file_state = MapStateStore::open(store.clone(), &ids)
            .map_err(|e| anyhow::anyhow!("reading plugin state: {e}"))?;
        let state: Arc<dyn StateStore> = Arc::new(file_state);
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(engine.clone(), live.clone(), state.clone())?
            .with_metrics(metrics.clone());
        let report = store::restore(&store, &registry)
            .map_err(|e| anyhow::anyhow!("restoring binaries: {e}"))?;
        // State of an entry that was quarantined has no binary any more.
        for id in ids {
            if registry.get(id).is_none() {
                state.remove_binary(id);
                let _ = store.remove_binary(id);
            }
        }
        log::info!(
            "restored {} binaries from {} in {} ms ({} recompiled, {} quarantined)",
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
            started: Instant::now(),
            connections: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            loads: Arc::new(Semaphore::new(match config_loads {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n,
            })),
            running: PerTenant::default(),
            open: Arc::default(),
            loading: Arc::default(),
            last_activity_ms: AtomicU64::new(0),
            failure_log: std::sync::Mutex::new((Instant::now(), 0)),
            probe: tokio::sync::OnceCell::new(),
            loader,
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

    /// Whether `tenant` may use the daemon at all.
    pub fn may_connect(&self, tenant: &Tenant) -> bool {
        let access = &self.live.load().access;
        if tenant.is_admin() || (access.allow_uids.is_none() && access.allow_gids.is_none()) {
            return true;
        }
        let by_user = access
            .allow_uids
            .as_ref()
            .is_some_and(|u| u.contains(&tenant.uid));
        let by_group = access.allow_gids.as_ref().is_some_and(|g| {
            g.iter()
                .any(|g| *g == tenant.gid || tenant.groups.contains(g))
        });
        by_user || by_group
    }

    /// Apply a new config; returns the keys that need a restart to change.
    pub fn apply(&self, new: Config) -> Vec<&'static str> {
        let (applied, restart) = self.config().reload_from(new);
        log::set_max_level(applied.server.log_level);
        self.live.store(Arc::new(applied));
        restart
    }

    /// Re-read the config and apply it; an invalid file keeps the running config.
    pub fn reload(&self) {
        let Some(loader) = &self.loader else {
            log::info!("reload: no config file in use; nothing to do");
            return;
        };
        match loader() {
            Ok(new) => {
                let restart = self.apply(new);
                if restart.is_empty() {
                    log::info!("reload: configuration applied");
                } else {
                    log::warn!(
                        "reload: applied; these keys changed but need a restart: {}",
                        restart.join(", ")
                    );
                }
            }
            Err(e) => log::error!("reload: keeping the running configuration: {e}"),
        }
    }

    /// Run the probe module: proves the engine, pool and executor still work.
    pub async fn probe(self: &Arc<Self>) -> bool {
        let probe = self
            .probe
            .get_or_try_init(|| {
                let d = Arc::clone(self);
                async move {
                    tokio::task::spawn_blocking(move || d.prepare_probe())
                        .await
                        .map_err(|e| Error::internal(format!("preparing the probe: {e}")))?
                }
            })
            .await;
        let probe = match probe {
            Ok(p) => p,
            Err(e) => {
                log::error!("watchdog probe: {e}");
                return false;
            }
        };
        let req = LimitsRequest {
            timeout_ms: Some(1000),
            ..LimitsRequest::default()
        };
        let Ok(limits) = self.executor.resolve_limits(&req) else {
            return false;
        };
        self.executor
            .execute(probe, None, 0, Vec::new(), &limits)
            .await
            .is_ok()
    }

    /// The probe module, from its artifact in the state directory when one matches this
    /// engine, else compiled (and its artifact stored for the next start). Not done at start:
    /// a daemon that compiles nothing until the first load keeps Cranelift's code (~6 MiB
    /// of the binary) out of memory (docs/PERFORMANCE.md, "Restart and memory").
    fn prepare_probe(&self) -> Result<Arc<Binary>, Error> {
        let engine = self.executor.engine();
        let hash = engine.compat_hash();
        let stored = self
            .store
            .load_probe(engine.engine(), &hash)
            .unwrap_or_else(|e| {
                log::warn!("watchdog probe: stored artifact unusable ({e}); compiling it again");
                None
            });
        let compiled = match stored {
            Some(module) => self.registry.prepare(module, String::new(), 0)?,
            None => {
                let bytes = wat::parse_str(PROBE_WAT)
                    .map_err(|e| Error::internal(format!("watchdog probe: {e}")))?;
                let compiled = self.registry.compile(&bytes)?;
                if let Err(e) = compiled.serialize().and_then(|a| {
                    self.store
                        .save_probe(&hash, &a)
                        .map_err(|e| Error::internal(e.to_string()))
                }) {
                    log::warn!("watchdog probe: could not store its artifact: {e}");
                }
                compiled
            }
        };
        self.registry.detached(0, compiled)
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

    pub(crate) fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub(crate) fn status_line(&self) -> String {
        format!(
            "{} binaries, {} executions, {} connections",
            self.registry.len(),
            self.executions.load(Relaxed),
            self.connections.load(Relaxed)
        )
    }
}
