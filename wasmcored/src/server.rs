//! The service: the accept loops and the life cycle (ready, status,
//! watchdog, reload, idle exit, shutdown).
//!
//! One shutdown mechanism: a `watch` channel raced in every accept loop and every idle
//! connection. On SIGTERM/SIGINT the daemon tells systemd STOPPING=1, stops accepting, lets
//! in-flight requests finish within `shutdown_grace`, and returns; a second signal exits at
//! once. SIGHUP reloads the config file: what can change live changes, the rest is named in
//! the log, and an invalid file keeps the running config.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use wasmcore_proto::{ErrorBody, ErrorCode, Response, encode_line};

use crate::daemon::Daemon;
use crate::metrics::Refusal;
use crate::systemd::{self, Listener};
use crate::tenant::Tenant;

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
                tenant_uid = tenant.uid, error_code = "forbidden";
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
            daemon.metrics.refused(tenant.uid, Refusal::MaxConnections);
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
                log::info!(
                    tenant_uid = tenant.uid, error_code = "busy";
                    "refused a connection from uid {}: {e}",
                    tenant.uid
                );
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
    let line = encode_line(&Response::<wasmcore_proto::Empty>::failure(
        None,
        ErrorBody::new(code, message),
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
}
