//! A tenant's worker: the process that runs one tenant's code (`wasmcored --worker`, started
//! by the broker, never by hand).
//!
//! It reads its tenant and the configuration from the control channel
//! ([`crate::control`]), restores that tenant's binaries and the public ones into a
//! [`Daemon`] of its own (engine, pool, registry, executor, metrics), confines itself, and
//! then serves every connection the broker hands over with the same connection and command
//! code as always: the broker is off the request path. It answers the broker's calls (an
//! admin's request about its binaries, its figures, a refresh of the public binaries) and
//! asks the broker for what crosses tenants ([`crate::daemon::Upstream`]).
//!
//! It exits when the broker says so (idle, shutdown), and at once when the broker is gone
//! (end of the control channel; the kernel's parent-death signal covers a broker killed
//! before that is seen).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::sync::{mpsc, oneshot, watch};
use wasmcore_proto::{BinaryInfo, Response};

use crate::cmd::{self, Origin};
use crate::config::Config;
use crate::confine;
use crate::control::{
    self, Ask, Call, FromWorker, Handover, MAX_HANDOVER, TenantWire, ToWorker, WorkerCounts,
};
use crate::daemon::{Daemon, Pending, Upstream};
use crate::engine::WasmEngine;
use crate::error::Error;
use crate::store::StateDir;
use crate::sys;
use crate::tenant::{Scope, Tenant};

/// Threads of a worker's blocking pool (compiles, state commits): beyond it such work waits.
pub const MAX_BLOCKING_THREADS: usize = 64;

/// The async threads of every worker: one per CPU, the same number in every worker, so that
/// the kernel's scheduler shares the CPU between tenants, not between connections.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The most tasks (threads) a worker needs: its async threads, the blocking pool, the
/// compiler's threads (one per CPU), the epoch ticker, and room. Its cgroup's `pids.max`.
pub fn max_tasks() -> usize {
    2 * threads() + MAX_BLOCKING_THREADS + 16
}

/// The pool of `uid`'s worker (of each of its engines, so that any thread can start them
/// all): what its quota lets it run at once, each execution (or load) a component of the
/// largest shape, and no more than `engine.pool_instances`.
pub fn pool_instances(config: &Config, uid: u32) -> u32 {
    let q = config.quotas.for_uid(uid);
    let need = (q.concurrent_executions + q.concurrent_loads)
        .saturating_mul(crate::context::StoreShape::COMPONENT.instances);
    config
        .engine
        .pool_instances
        .min(u32::try_from(need).unwrap_or(u32::MAX))
}

/// Resident bytes and user+system CPU microseconds from the texts of a process's
/// `/proc/PID/statm` and `/proc/PID/stat` (zeros for what does not parse).
pub fn parse_usage(statm: &str, stat: &str) -> (u64, u64) {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let rss = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    // Fields after the command name (which may hold spaces) start after its ')'.
    let cpu = (|| {
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    })()
    .map_or(0, |ticks| ticks * 1_000_000 / tick.max(1));
    (rss, cpu)
}

/// This process's /proc/self/statm and /proc/self/stat, opened before the confinement
/// (which leaves /proc out) and read again at each question.
struct OwnUsage {
    statm: std::fs::File,
    stat: std::fs::File,
}

impl OwnUsage {
    fn open() -> std::io::Result<OwnUsage> {
        Ok(OwnUsage {
            statm: std::fs::File::open("/proc/self/statm")?,
            stat: std::fs::File::open("/proc/self/stat")?,
        })
    }

    fn read(&self) -> (u64, u64) {
        use std::os::unix::fs::FileExt;
        let text = |f: &std::fs::File| {
            let mut buf = [0u8; 1024];
            let n = f.read_at(&mut buf, 0).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        parse_usage(&text(&self.statm), &text(&self.stat))
    }
}

static OWN_USAGE: std::sync::OnceLock<OwnUsage> = std::sync::OnceLock::new();

/// Run the worker of tenant `uid` on the descriptors the broker passed; returns when told
/// to stop or when the broker is gone.
pub fn main(uid: u32) -> anyhow::Result<()> {
    sys::ignore_stop_signals()?;
    let handover = sys::inherited_fd(control::HANDOVER_FD)?;
    let control = std::os::unix::net::UnixStream::from(sys::inherited_fd(control::CONTROL_FD)?);
    // Before any thread exists: the hello, the engine (Wasmtime opens what it needs), the
    // state directory, then the confinement every later thread inherits.
    let mut reader = std::io::BufReader::new(control);
    let mut line = Vec::new();
    std::io::BufRead::read_until(&mut reader, b'\n', &mut line)?;
    let (admin, config, uptime_ms) = match serde_json::from_slice(&line)? {
        ToWorker::Hello {
            uid: u,
            admin,
            config,
            uptime_ms,
        } if u == uid => (admin, *config, uptime_ms),
        other => anyhow::bail!("expected the broker's hello for uid {uid}, got {other:?}"),
    };
    let early = reader.buffer().to_vec();
    let control = reader.into_inner();
    if let Ok(u) = OwnUsage::open() {
        let _ = OWN_USAGE.set(u);
    }
    log::set_max_level(config.server.log_level);
    let mut config = config;
    config.engine.pool_instances = pool_instances(&config, uid);
    let engine = WasmEngine::configure(&config.engine, &config.limits)?;
    let store = StateDir::attach(&config.state_dir, uid)
        .map_err(|e| anyhow::anyhow!("state directory: {e}"))?;
    let confined = confine::restrict_files(&store.tenant_dir(uid), &store.public_dir(), admin)?;
    let public = if admin { "read-write" } else { "read-only" };
    if confined.landlock_full {
        log::info!(
            "worker of uid {uid} confined: no new privileges, not dumpable, Landlock ABI {} (its own subtree read-write, public binaries {public}, nothing else; no TCP; signals and abstract sockets scoped)",
            confined.landlock_abi
        );
    } else {
        log::warn!(
            tenant_uid = uid;
            "worker of uid {uid}: this kernel's Landlock (ABI {}) cannot enforce: {}; seccomp and the rest still apply",
            confined.landlock_abi,
            confined.missing.join(", ")
        );
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let runtime = crate::engine::guest_threads(&mut builder, &config.engine)
        .worker_threads(threads())
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .thread_name("wasmcored-worker")
        .build()?;
    let parts = Parts {
        uid,
        config,
        engine,
        store,
        early,
        daemon_started: std::time::Instant::now()
            .checked_sub(Duration::from_millis(uptime_ms))
            .unwrap_or_else(std::time::Instant::now),
    };
    let r = runtime.block_on(run(parts, handover, control));
    // Guests still running past the grace period are abandoned with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    r
}

/// What the worker made before its runtime started.
struct Parts {
    uid: u32,
    config: Config,
    engine: crate::engine::Engines,
    store: StateDir,
    /// Control bytes read past the hello.
    early: Vec<u8>,
    /// When the daemon (the broker) started.
    daemon_started: std::time::Instant,
}

/// Asks to the broker waiting for their answer.
#[derive(Default)]
struct Waiting {
    next: AtomicU64,
    answers: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
}

/// What the broker answers an ask with.
enum Answer {
    /// A wire response (control channel).
    Response(serde_json::Value),
    /// A descriptor (handover channel).
    File(OwnedFd),
}

impl Waiting {
    fn take(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }
}

/// The worker's end of the control channel, as the commands' [`Upstream`].
struct Link {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Arc<Waiting>,
}

impl Link {
    /// Send `ask` and wait for the broker's answer.
    fn send(&self, tenant: &Tenant, ask: Ask) -> Pending<Answer> {
        let id = self.waiting.next.fetch_add(1, Relaxed);
        let (done, answer) = oneshot::channel();
        self.waiting
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, done);
        let sent = self.tx.send(control::encode(&FromWorker::Ask {
            id,
            tenant: TenantWire::from(tenant),
            ask,
        }));
        Box::pin(async move {
            sent.map_err(|_| Error::internal("the broker is gone"))?;
            answer
                .await
                .map_err(|_| Error::internal("the broker did not answer"))
        })
    }
}

impl Upstream for Link {
    fn ask(&self, tenant: &Tenant, ask: Ask) -> Pending<serde_json::Value> {
        let answer = self.send(tenant, ask);
        Box::pin(async move {
            match answer.await? {
                Answer::Response(v) => Ok(v),
                Answer::File(_) => Err(Error::internal("the broker answered with a file")),
            }
        })
    }

    fn open(&self, tenant: &Tenant, path: &str) -> Pending<OwnedFd> {
        let answer = self.send(
            tenant,
            Ask::Open {
                path: path.to_string(),
            },
        );
        Box::pin(async move {
            match answer.await? {
                Answer::File(fd) => Ok(fd),
                Answer::Response(v) => match cmd::relayed(v) {
                    Err(e) => Err(e),
                    Ok(_) => Err(Error::internal("the broker opened no file")),
                },
            }
        })
    }
}

async fn run(
    parts: Parts,
    handover: OwnedFd,
    control: std::os::unix::net::UnixStream,
) -> anyhow::Result<()> {
    let Parts {
        uid,
        config,
        engine,
        store,
        early,
        daemon_started,
    } = parts;
    control.set_nonblocking(true)?;
    let (rd, mut wr) = tokio::net::UnixStream::from_std(control)?.into_split();
    let mut reader = BufReader::new(std::io::Cursor::new(early).chain(rd));
    let mut line = Vec::new();

    // One writer: every message to the broker is a whole line.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if wr.write_all(&msg).await.is_err() {
                return;
            }
        }
    });
    let waiting = Arc::new(Waiting::default());
    let link = Link {
        tx: tx.clone(),
        waiting: waiting.clone(),
    };
    let grace = config.server.shutdown_grace;
    // Restoring may compile (a changed engine): off the async threads.
    let daemon = tokio::task::spawn_blocking(move || {
        Daemon::build(
            config,
            engine,
            store,
            Scope::Tenant(uid),
            Some(Box::new(link)),
            daemon_started,
        )
    })
    .await??;
    // Every thread exists now (the runtime's, the epoch ticker): the seccomp filter goes on
    // all of them, and threads started later inherit it.
    confine::restrict_syscalls()?;
    let _ = tx.send(control::encode(&FromWorker::Ready));

    // A SOCK_SEQPACKET socket: message boundaries, read like datagrams.
    let handover = std::os::unix::net::UnixDatagram::from(handover);
    handover.set_nonblocking(true)?;
    let handover = tokio::net::UnixDatagram::from_std(handover)?;
    let mut buf = vec![0u8; MAX_HANDOVER];
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    loop {
        tokio::select! {
            r = handover.readable() => {
                r?;
                let fd = handover.as_raw_fd();
                match handover.try_io(Interest::READABLE, || sys::recv_with_fds(fd, &mut buf)) {
                    Ok(got) if got.bytes == 0 && got.fds.is_empty() => {
                        log::debug!("worker of uid {uid}: the broker closed the handover channel");
                        break;
                    }
                    Ok(got) => take_handover(&daemon, &tx, &waiting, &shutdown_rx, &buf[..got.bytes], got),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => anyhow::bail!("receiving a connection from the broker: {e}"),
                }
            }
            r = control::read_line(&mut reader, &mut line) => {
                if !r? {
                    log::debug!("worker of uid {uid}: the broker is gone");
                    return Ok(());
                }
                match serde_json::from_slice::<ToWorker>(&line)? {
                    ToWorker::Call { id, call } => {
                        let (d, tx) = (daemon.clone(), tx.clone());
                        tokio::spawn(async move {
                            let response = answer(&d, uid, call, None).await;
                            let _ = tx.send(control::encode(&FromWorker::Reply { id, response }));
                        });
                    }
                    ToWorker::Answer { id, response } => {
                        if let Some(w) = waiting.take(id) {
                            let _ = w.send(Answer::Response(response));
                        }
                    }
                    ToWorker::Reload { config } => {
                        let _ = daemon.apply(*config);
                    }
                    ToWorker::Shutdown => break,
                    ToWorker::Hello { .. } => anyhow::bail!("a second hello from the broker"),
                }
            }
        }
    }
    // Stop: connections finish the request they are in, then close.
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    while daemon.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A descriptor from the broker: a connection to serve (the broker is told when it ends),
/// or a file an ask is waiting for.
fn take_handover(
    daemon: &Arc<Daemon>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    waiting: &Waiting,
    shutdown: &watch::Receiver<bool>,
    msg: &[u8],
    got: sys::Received,
) {
    let handover: Handover = match serde_json::from_slice(msg) {
        Ok(h) => h,
        Err(e) => {
            log::error!("a handover from the broker could not be read ({e}); dropped");
            return;
        }
    };
    let mut fds = got.fds;
    let fd = match (fds.pop(), fds.is_empty(), got.truncated) {
        (Some(fd), true, false) => Some(fd),
        _ => None,
    };
    let (conn, tenant) = match handover {
        Handover::Call { id, call } => {
            let (d, tx) = (daemon.clone(), tx.clone());
            let uid = match d.scope {
                Scope::Tenant(uid) => uid,
                Scope::All => 0,
            };
            tokio::spawn(async move {
                let response = answer(&d, uid, call, fd).await;
                let _ = tx.send(control::encode(&FromWorker::Reply { id, response }));
            });
            return;
        }
        Handover::File { id } => {
            match (waiting.take(id), fd) {
                (Some(w), Some(fd)) => {
                    let _ = w.send(Answer::File(fd));
                }
                _ => log::error!(
                    "file {id} from the broker did not come as one descriptor for an open ask"
                ),
            }
            return;
        }
        Handover::Connection { conn, tenant } => (conn, tenant.tenant()),
    };
    let Some(fd) = fd else {
        log::error!("handover {conn} did not carry exactly one descriptor; dropped");
        let _ = tx.send(control::encode(&FromWorker::Closed { conn }));
        return;
    };
    let stream = std::os::unix::net::UnixStream::from(fd);
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            log::error!("handover {conn}: {e}");
            let _ = tx.send(control::encode(&FromWorker::Closed { conn }));
            return;
        }
    };
    let (d, tx, rx) = (daemon.clone(), tx.clone(), shutdown.clone());
    tokio::spawn(async move {
        // Counted here for the tenant's own figures; the broker enforces the quota.
        let slot = d.open_connection(&tenant);
        d.connections.fetch_add(1, Relaxed);
        crate::connection::serve(d.clone(), stream, tenant, rx).await;
        d.connections.fetch_sub(1, Relaxed);
        drop(slot);
        let _ = tx.send(control::encode(&FromWorker::Closed { conn }));
    });
}

/// Answer a call of the broker; `fd` came with it over the handover channel.
async fn answer(
    daemon: &Arc<Daemon>,
    uid: u32,
    call: Call,
    fd: Option<OwnedFd>,
) -> serde_json::Value {
    let value = match call {
        Call::Provision {
            tenant,
            request,
            provisioned,
        } => {
            let tenant = tenant.tenant().provisioning();
            let fds = fd.into_iter().collect();
            let response = match cmd::provision(daemon, &tenant, *request, fds, provisioned).await {
                Ok(reply) => Response::success(None, reply),
                Err(e) => Response::failure(None, e.to_body()),
            };
            return serde_json::to_value(response).unwrap_or_default();
        }
        Call::Request { tenant, request } => {
            let tenant = tenant.tenant();
            let response =
                match cmd::dispatch(daemon, &tenant, *request, Vec::new(), Origin::Broker).await {
                    Ok(reply) => Response::success(None, reply),
                    Err(e) => Response::failure(None, e.to_body()),
                };
            return serde_json::to_value(response).unwrap_or_default();
        }
        Call::Owned => {
            let owned: Vec<BinaryInfo> = daemon
                .registry
                .all()
                .iter()
                .filter(|b| b.owner == uid)
                .map(|b| b.info(daemon.registry.is_superseded(b)))
                .collect();
            serde_json::to_value(owned)
        }
        Call::Metrics => serde_json::to_value(cmd::metrics_of_all(daemon)),
        Call::Counts => {
            let (rss_bytes, cpu_us) = OWN_USAGE.get().map_or((0, 0), OwnUsage::read);
            serde_json::to_value(WorkerCounts {
                executions: daemon.executions.total(),
                executions_running: daemon.executor.engine().running_count() as u64,
                state_bytes: daemon.registry.state().total_usage(),
                rss_bytes,
                cpu_us,
            })
        }
        Call::Refresh => {
            let d = daemon.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::store::sync_public(&d.store, &d.registry)
            })
            .await;
            match r {
                Ok(Ok(_)) => Ok(serde_json::Value::Null),
                Ok(Err(e)) => {
                    log::error!("worker of uid {uid}: reading the public binaries: {e}");
                    Ok(serde_json::Value::Null)
                }
                Err(e) => {
                    log::error!("worker of uid {uid}: refresh failed: {e}");
                    Ok(serde_json::Value::Null)
                }
            }
        }
    };
    value.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_the_tenants_concurrency_quota() {
        let mut c = Config::from_toml(
            "[quotas]\nconcurrent_executions = 2\n[quotas.users.\"4242\"]\nconcurrent_executions = 100\n",
        )
        .unwrap();
        // (2 executions + 1 load) × a component's 32 core instances.
        assert_eq!(pool_instances(&c, 1000), 96);
        // Never more than engine.pool_instances.
        assert_eq!(pool_instances(&c, 4242), 512);
        c.engine.pool_instances = 50;
        assert_eq!(pool_instances(&c, 1000), 50);
    }

    #[test]
    fn usage_parses_statm_and_stat() {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .unwrap()
            .unwrap() as u64;
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as u64;
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        let (rss, cpu) = parse_usage("1000 300 20 1 0 50 0", stat);
        assert_eq!(rss, 300 * page);
        assert_eq!(cpu, 300 * 1_000_000 / tick);
        assert_eq!(parse_usage("", "garbage"), (0, 0));
    }
}
