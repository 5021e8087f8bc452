//! The service: shared daemon state, the accept loops, and the shutdown sequence.
//!
//! One shutdown mechanism: a `watch` channel raced in every accept loop and every idle
//! connection. On SIGTERM/SIGINT the daemon tells systemd STOPPING=1, stops accepting, lets
//! in-flight requests finish within `shutdown_grace`, and returns; a second signal exits at
//! once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use wasmcore_proto::{ErrorBody, ErrorCode, Response, encode_line};

use crate::cmd::Reply;
use crate::config::Config;
use crate::engine::WasmEngine;
use crate::error::Error;
use crate::executor::Executor;
use crate::registry::Registry;
use crate::state::{MemoryStateStore, StateStore};
use crate::systemd::{self, Listener};
use crate::tenant::Tenant;

/// Shared state of a running daemon.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub registry: Registry,
    pub executor: Executor,
    pub started: Instant,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Executions finished or failed since start.
    pub executions: AtomicU64,
    /// Execution failures logged in the current rate-limit window, and the window's start.
    failure_log: std::sync::Mutex<(Instant, u32)>,
}

/// Failure lines logged per window; the rest are counted and summarised.
const FAILURE_LOG_BURST: u32 = 20;
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(60);

impl Daemon {
    /// Build the engine, registry and executor for `config`.
    pub fn new(config: Config) -> anyhow::Result<Arc<Daemon>> {
        config
            .check()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let engine = WasmEngine::new(&config.engine, &config.limits)?;
        let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let registry = Registry::new(engine.clone(), config.registry.clone(), state.clone())?;
        let executor = Executor::new(
            engine,
            state,
            config.limits.clone(),
            config.registry.max_state_bytes,
            config.registry.max_state_key_bytes,
        );
        Ok(Arc::new(Daemon {
            config,
            registry,
            executor,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            failure_log: std::sync::Mutex::new((Instant::now(), 0)),
        }))
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

    fn status_line(&self) -> String {
        format!(
            "{} binaries, {} executions, {} connections",
            self.registry.len(),
            self.executions.load(Relaxed),
            self.connections.load(Relaxed)
        )
    }
}

/// Serve `listeners` until SIGTERM/SIGINT or until `stop` turns true.
pub async fn run(
    daemon: Arc<Daemon>,
    listeners: Vec<Listener>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let conn_limit = Arc::new(Semaphore::new(daemon.config.server.max_connections));
    let mut accept_tasks = Vec::new();
    let mut bound = Vec::new();
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
    systemd::notify_ready(&daemon.status_line());
    log::info!("ready: {}", daemon.status_line());

    let status_daemon = daemon.clone();
    let mut status_rx = shutdown_rx.clone();
    let status_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => systemd::notify_status(&status_daemon.status_line()),
                _ = status_rx.changed() => return,
            }
        }
    });

    wait_for_stop(&mut stop).await;
    log::info!(
        "shutting down: no new connections; in-flight requests get {:?}",
        daemon.config.server.shutdown_grace
    );
    systemd::notify_stopping();
    let _ = shutdown_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    status_task.abort();
    // Every connection holds a permit: all permits back means all connections are done.
    let all = daemon.config.server.max_connections as u32;
    let drained = tokio::select! {
        r = conn_limit.acquire_many(all) => r.is_ok(),
        _ = tokio::time::sleep(daemon.config.server.shutdown_grace) => false,
        _ = second_signal() => { log::warn!("second signal: exiting at once"); false }
    };
    if !drained {
        log::warn!(
            "{} connections still open at exit",
            daemon.connections.load(Relaxed)
        );
    }
    for p in bound {
        let _ = std::fs::remove_file(&p);
    }
    log::info!("stopped");
    Ok(())
}

async fn wait_for_stop(stop: &mut watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
        _ = async { while !*stop.borrow() { if stop.changed().await.is_err() { std::future::pending::<()>().await } } } => {},
    }
}

async fn second_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
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
        let tenant = match Tenant::from_peer(&stream, &daemon.config.server.admin_gids) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("could not read peer credentials, closing connection: {e}");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // At the limit: refuse cleanly rather than queue.
            tokio::spawn(refuse(stream, daemon.config.server.max_connections));
            continue;
        };
        let d = daemon.clone();
        let rx = shutdown.clone();
        tokio::spawn(async move {
            d.connections.fetch_add(1, Relaxed);
            crate::connection::serve(d.clone(), stream, tenant, rx).await;
            d.connections.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

async fn refuse(mut stream: tokio::net::UnixStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = ErrorBody::new(
        ErrorCode::Busy,
        format!("the daemon is serving its maximum of {max} connections; retry later"),
    );
    let line = encode_line(&Response::<Reply>::failure(None, body));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
}
