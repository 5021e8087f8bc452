//! The service: shared daemon state, the accept loops, and the life cycle (ready, status,
//! watchdog, reload, idle exit, shutdown).
//!
//! One shutdown mechanism: a `watch` channel raced in every accept loop and every idle
//! connection. On SIGTERM/SIGINT the daemon tells systemd STOPPING=1, stops accepting, lets
//! in-flight requests finish within `shutdown_grace`, and returns; a second signal exits at
//! once. SIGHUP reloads the config file: what can change live changes, the rest is named in
//! the log, and an invalid file keeps the running config.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use wasmcore_proto::{ErrorBody, ErrorCode, LimitsRequest, Response, encode_line};

use crate::cmd::Reply;
use crate::config::{self, Config, Live};
use crate::engine::WasmEngine;
use crate::error::Error;
use crate::executor::Executor;
use crate::registry::{Binary, Registry};
use crate::state::{MapStateStore, StateStore};
use crate::store::{self, RestoreReport, StateDir};
use crate::systemd::{self, Listener};
use crate::tenant::Tenant;

/// Re-reads the config (file plus command-line overrides) on SIGHUP.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Shared state of a running daemon.
pub struct Daemon {
    live: Live,
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
        let registry = Registry::new(engine.clone(), live.clone(), state.clone())?;
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
        let executor = Executor::new(engine, state, live.clone());
        let config_loads = live.load().registry.max_concurrent_loads;
        Ok(Arc::new(Daemon {
            live,
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
            Error::Busy(format!(
                "you already have {n} loads compiling, your limit is {cap}; retry when one finishes"
            ))
        })
    }

    /// Take one of `tenant`'s connection slots, or `busy` when all are in use.
    pub fn open_connection(&self, tenant: &Tenant) -> Result<TenantSlot, Error> {
        let cap = self.live.load().quotas.for_uid(tenant.uid).connections;
        self.open.take_owned(tenant.uid, cap).map_err(|n| {
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
            .execute(probe, 0, Vec::new(), &limits)
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

    /// Log an execution failure, at most FAILURE_LOG_BURST lines a minute.
    pub fn note_failure(&self, tenant: &Tenant, what: &str, e: &Error) {
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
        if w.1 <= FAILURE_LOG_BURST {
            log::info!(
                "execution of {what} for uid {} failed: {} ({e})",
                tenant.uid,
                e.code()
            );
        }
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn status_line(&self) -> String {
        format!(
            "{} binaries, {} executions, {} connections",
            self.registry.len(),
            self.executions.load(Relaxed),
            self.connections.load(Relaxed)
        )
    }
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Signal,
    Idle,
    Requested,
}

/// The signals the daemon acts on. Installed before the daemon restores its binaries and
/// binds its socket: a SIGTERM, SIGINT or SIGHUP that arrives as soon as a client can connect
/// is kept for `run`, never left to the default action (which would kill the daemon and leave
/// its socket behind).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers; call within the runtime (`Runtime::enter`).
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Serve `listeners` until SIGTERM/SIGINT, idle exit, or until `stop` turns true.
pub async fn run(
    daemon: Arc<Daemon>,
    listeners: Vec<Listener>,
    signals: Signals,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Stopped> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let max_conn = daemon.config().server.max_connections;
    let conn_limit = Arc::new(Semaphore::new(max_conn));
    let mut accept_tasks = Vec::new();
    let mut bound: Vec<PathBuf> = Vec::new();
    for l in listeners {
        l.listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(l.listener)?;
        log::info!("listening on {}", l.describe);
        bound.extend(l.bound_path);
        accept_tasks.push(tokio::spawn(accept_loop(
            daemon.clone(),
            listener,
            conn_limit.clone(),
            shutdown_rx.clone(),
        )));
    }
    daemon.touch();
    systemd::notify_ready(&daemon.status_line());
    log::info!("ready: {}", daemon.status_line());

    let background = tokio::spawn(background(daemon.clone(), shutdown_rx.clone()));
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM received"); break Stopped::Signal; }
            _ = int.recv() => { log::info!("SIGINT received"); break Stopped::Signal; }
            _ = hup.recv() => {
                log::info!("SIGHUP received: reloading the configuration");
                systemd::notify_reloading();
                daemon.reload();
                systemd::notify_ready(&daemon.status_line());
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() { break Stopped::Requested; }
            }
            _ = idle_check.tick() => {
                if let Some(after) = daemon.config().server.exit_idle_after
                    && daemon.connections.load(Relaxed) == 0
                    && daemon.executor.engine().running_count() == 0
                    && daemon.idle_for() >= after
                {
                    log::info!("no connection for {after:?}: exiting (socket activation starts the daemon again)");
                    break Stopped::Idle;
                }
            }
        }
    };

    let grace = daemon.config().server.shutdown_grace;
    log::info!("shutting down: no new connections; in-flight requests get {grace:?}");
    systemd::notify_stopping();
    let _ = shutdown_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    background.abort();
    // Every connection holds a permit: all permits back means all connections are done.
    let drained = tokio::select! {
        r = conn_limit.acquire_many(max_conn as u32) => r.is_ok(),
        _ = tokio::time::sleep(grace) => false,
        _ = term.recv() => { log::warn!("second signal: exiting at once"); false }
        _ = int.recv() => { log::warn!("second signal: exiting at once"); false }
    };
    if !drained {
        log::warn!(
            "{} connections still open at exit",
            daemon.connections.load(Relaxed)
        );
    }
    // Only sockets this process bound; never one systemd handed over.
    for p in bound {
        let _ = std::fs::remove_file(&p);
    }
    log::info!("stopped");
    Ok(reason)
}

/// Periodic STATUS= and, when systemd asks for it, WATCHDOG=1 after a successful probe.
async fn background(daemon: Arc<Daemon>, mut shutdown: watch::Receiver<bool>) {
    let watchdog = systemd::watchdog_interval().map(|d| d / 2);
    if let Some(every) = watchdog {
        log::info!("watchdog enabled: probing the executor every {every:?}");
    }
    let every = watchdog
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if watchdog.is_some() {
            if daemon.probe().await {
                systemd::notify_watchdog();
            } else {
                log::error!("watchdog probe failed: not petting the watchdog");
            }
        }
        systemd::notify_status(&daemon.status_line());
    }
}

async fn accept_loop(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                match e.raw_os_error() {
                    // The peer went away before we took it, or a signal: go on.
                    Some(
                        nix::libc::ECONNABORTED
                        | nix::libc::EINTR
                        | nix::libc::EAGAIN
                        | nix::libc::EPROTO,
                    ) => {}
                    // Out of descriptors or memory: back off so we do not spin.
                    Some(
                        nix::libc::EMFILE
                        | nix::libc::ENFILE
                        | nix::libc::ENOBUFS
                        | nix::libc::ENOMEM,
                    ) => {
                        log::warn!("accept: {e}; backing off for 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        log::error!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
        };
        let tenant = match Tenant::from_peer(&stream, &daemon.config().access.admin_gids) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("could not read peer credentials, closing connection: {e}");
                continue;
            }
        };
        if !daemon.may_connect(&tenant) {
            log::info!(
                "refused a connection from uid {}: not in access.allow_users/allow_groups",
                tenant.uid
            );
            let msg = format!(
                "uid {} is not allowed to use this daemon (access.allow_users / allow_groups)",
                tenant.uid
            );
            tokio::spawn(refuse(stream, ErrorCode::Forbidden, msg));
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // At the limit: refuse cleanly rather than queue.
            let msg = format!(
                "the daemon is serving its maximum of {} connections; retry later",
                daemon.config().server.max_connections
            );
            tokio::spawn(refuse(stream, ErrorCode::Busy, msg));
            continue;
        };
        let slot = match daemon.open_connection(&tenant) {
            Ok(s) => s,
            Err(e) => {
                log::info!("refused a connection from uid {}: {e}", tenant.uid);
                tokio::spawn(refuse(stream, ErrorCode::Busy, e.to_string()));
                continue;
            }
        };
        let d = daemon.clone();
        let rx = shutdown.clone();
        tokio::spawn(async move {
            d.connections.fetch_add(1, Relaxed);
            d.touch();
            crate::connection::serve(d.clone(), stream, tenant, rx).await;
            d.connections.fetch_sub(1, Relaxed);
            d.touch();
            drop(slot);
            drop(permit);
        });
    }
}

async fn refuse(mut stream: tokio::net::UnixStream, code: ErrorCode, message: String) {
    use tokio::io::AsyncWriteExt;
    let line = encode_line(&Response::<Reply>::failure(
        None,
        ErrorBody::new(code, message),
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
}
