//! The broker's service: the accept loops, the handover of each connection to its tenant's
//! worker ([`crate::broker`]), and the life cycle (ready, status, watchdog, reload, idle
//! exit, shutdown).
//!
//! At accept the broker reads the peer's credentials (SO_PEERCRED, SO_PEERGROUPS) into a
//! [`Tenant`], applies the access rules and the connection limits, and passes the
//! connection to the tenant's worker, which serves it from then on.
//!
//! One shutdown mechanism: a `watch` channel raced in every accept loop. On SIGTERM/SIGINT
//! the daemon tells systemd STOPPING=1, stops accepting, tells every worker to let
//! in-flight requests finish within `shutdown_grace`, and returns; a second signal exits at
//! once. SIGHUP reloads the config file: what can change live changes (in the workers too),
//! the rest is named in the log, and an invalid file keeps the running config.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use wasmcore_proto::{ErrorBody, ErrorCode, Response, encode_line};

use crate::broker::Broker;
use crate::metrics::Refusal;
use crate::systemd::{self, Listener};
use crate::tenant::Tenant;

pub use crate::config::ConfigLoader;

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
/// `loader` re-reads the config on SIGHUP (`None`: reload keeps the running config).
pub async fn run(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    signals: Signals,
    loader: Option<ConfigLoader>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Stopped> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let max_conn = broker.config().server.max_connections;
    let conn_limit = Arc::new(Semaphore::new(max_conn));
    let mut accept_tasks = Vec::new();
    let mut bound: Vec<PathBuf> = Vec::new();
    for l in listeners {
        l.listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(l.listener)?;
        log::info!("listening on {}", l.describe);
        bound.extend(l.bound_path);
        accept_tasks.push(tokio::spawn(accept_loop(
            broker.clone(),
            listener,
            conn_limit.clone(),
            shutdown_rx.clone(),
        )));
    }
    broker.touch();
    if let Some(loader) = loader {
        broker.set_loader(loader);
    }
    // Connections are served meanwhile; readiness waits for the declared binaries.
    systemd::notify_status("applying the provisioning files");
    let _ = broker.provision_logged("start").await;
    systemd::notify_ready(&broker.status_line());
    log::info!("ready: {}", broker.status_line());

    let background = tokio::spawn(background(broker.clone(), shutdown_rx.clone()));
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM received"); break Stopped::Signal; }
            _ = int.recv() => { log::info!("SIGINT received"); break Stopped::Signal; }
            _ = hup.recv() => {
                log::info!("SIGHUP received: reloading the configuration");
                broker.reload_all().await;
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() { break Stopped::Requested; }
            }
            _ = idle_check.tick() => {
                if let Some(after) = broker.config().server.exit_idle_after
                    && broker.connections.load(Relaxed) == 0
                    && broker.idle_for() >= after
                {
                    log::info!("no connection for {after:?}: exiting (socket activation starts the daemon again)");
                    break Stopped::Idle;
                }
            }
        }
    };

    let grace = broker.config().server.shutdown_grace;
    log::info!("shutting down: no new connections; in-flight requests get {grace:?}");
    systemd::notify_stopping();
    let _ = shutdown_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    background.abort();
    let drained = tokio::select! {
        () = broker.shutdown(grace) => true,
        _ = term.recv() => { log::warn!("second signal: exiting at once"); false }
        _ = int.recv() => { log::warn!("second signal: exiting at once"); false }
    };
    if !drained || broker.connections.load(Relaxed) > 0 {
        log::warn!(
            "{} connections still open at exit",
            broker.connections.load(Relaxed)
        );
    }
    // Only sockets this process bound; never one systemd handed over.
    for p in bound {
        let _ = std::fs::remove_file(&p);
    }
    log::info!("stopped");
    Ok(reason)
}

/// Periodic STATUS=, the workers' upkeep (idle stop, hung workers), and, when systemd asks
/// for it, WATCHDOG=1 while this loop runs.
async fn background(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let watchdog = systemd::watchdog_interval().map(|d| d / 2);
    if let Some(every) = watchdog {
        log::info!("watchdog enabled: notifying every {every:?}");
    }
    let every = watchdog
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if watchdog.is_some() {
            systemd::notify_watchdog();
        }
        broker.tend();
        systemd::notify_status(&broker.status_line());
    }
}

async fn accept_loop(
    broker: Arc<Broker>,
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
        let config = broker.config();
        let tenant = match Tenant::from_peer(&stream, &config.access.admin_gids) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("could not read peer credentials, closing connection: {e}");
                continue;
            }
        };
        if !config.access.admits(&tenant) {
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
            broker.metrics.refused(tenant.uid, Refusal::MaxConnections);
            let msg = format!(
                "the daemon is serving its maximum of {} connections; retry later",
                config.server.max_connections
            );
            tokio::spawn(refuse(stream, ErrorCode::Busy, msg));
            continue;
        };
        // The worker owns the connection from here; this process closes its copy.
        if let Err(r) = broker.hand_over(&stream, &tenant, permit) {
            log::info!(
                tenant_uid = tenant.uid, error_code = r.code.as_str();
                "refused a connection from uid {}: {}",
                tenant.uid, r.message
            );
            tokio::spawn(refuse(stream, r.code, r.message));
        }
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
