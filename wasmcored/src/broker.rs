//! The broker's tenant workers: one process per tenant (`wasmcored --worker`), started on
//! the tenant's first connection, handed each accepted connection of that tenant, asked
//! for what crosses tenants, stopped when idle, restarted (with backoff) when they fail.
//!
//! The broker holds no engine and runs no tenant code: after a handover the worker serves
//! the connection itself. What the broker answers (an admin's view of every tenant, a
//! request about another tenant's binary) it builds from the workers' answers over the
//! control channel ([`crate::control`]) and the stored metadata.
//!
//! Locks: `workers` and each worker's tables are `std::sync::Mutex`es held for map updates
//! only, never across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use wasmcore_proto::{
    ApplyResponse, BinaryInfo, BinaryMetrics, ErrorBody, ErrorCode, HistogramData, KindMetrics,
    ListResponse, MetricsResponse, ProvisionAction, ProvisionEntry, ReloadResponse, Response,
    StatusResponse, TenantMetrics, WorkerInfo, sketch_quantile,
};

use std::os::unix::process::CommandExt;

use crate::cgroup::{Cgroups, Limits};
use crate::config::{Config, ConfigLoader, Live, Quota};
use crate::control::{self, Ask, Call, FromWorker, Handover, TenantWire, ToWorker, WorkerCounts};
use crate::metrics::{Metrics, Refusal};
use crate::provision::{self, Step};
use crate::store::{BinaryMeta, StateDir};
use crate::sys;
use crate::tenant::{Scope, Tenant};

/// How long a call to a worker may take before the broker gives up on it (a forwarded
/// request runs as long as its own timeout allows instead).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker that fails this soon after it started counts towards its tenant's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The broker's view of the tenant workers.
pub struct Broker {
    live: Live,
    /// The state directory, read for the owners of stored binaries.
    pub store: Arc<StateDir>,
    /// The program to start workers from: this very binary.
    exe: PathBuf,
    workers: Mutex<HashMap<u32, Arc<Worker>>>,
    /// Consecutive failures per tenant and when its worker may start again.
    failures: Mutex<HashMap<u32, Backoff>>,
    /// Connection refusals and worker failures the broker counts.
    pub metrics: Metrics,
    /// Connections handed over and not yet closed, over all workers.
    pub connections: AtomicU64,
    next_conn: AtomicU64,
    pub started: Instant,
    /// Milliseconds since start of the last connection opened or closed (idle exit).
    last_activity_ms: AtomicU64,
    /// The delegated cgroup subtree the workers run in, if the service has one.
    cgroups: Option<Cgroups>,
    /// One provisioning run at a time (start, reload, `apply`).
    provisioning: tokio::sync::Mutex<()>,
    /// One reload at a time (SIGHUP, `reload`).
    reloading: tokio::sync::Mutex<()>,
    /// Reads the config file again for a reload; none: the daemon runs without one.
    loader: std::sync::OnceLock<ConfigLoader>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("workers", &self.live_workers().len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    total: u64,
    until: Instant,
}

/// One live worker process.
pub struct Worker {
    pub uid: u32,
    pub pid: u32,
    /// Started for an admin: the broker answers its asks across tenants, and it may store
    /// public binaries. Decided by the broker, never by what the worker says.
    admin: bool,
    started: Instant,
    started_at: u64,
    handover: OwnedFd,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    calls: Mutex<HashMap<u64, oneshot::Sender<serde_json::Value>>>,
    next_call: AtomicU64,
    /// Connections handed over and not yet closed, each holding its `max_connections` permit.
    conns: Mutex<HashMap<u64, OwnedSemaphorePermit>>,
    /// Milliseconds (since the worker started) when it last had no connection.
    idle_since_ms: AtomicU64,
    /// Told to stop (idle or shutdown): its end is not a failure.
    stopping: AtomicBool,
    /// A liveness ping is waiting for its answer.
    pinging: AtomicBool,
    /// Killed by the broker for resident memory over `quotas.memory_mb`.
    over_memory: AtomicBool,
    /// The OOM kills its cgroup had counted when it started.
    oom_kills_before: u64,
    /// Resident bytes and CPU microseconds the worker last reported of itself (for when
    /// the broker cannot read its /proc entry).
    reported: Mutex<(u64, u64)>,
}

impl Worker {
    pub fn connections(&self) -> u64 {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn send(&self, msg: &ToWorker) -> bool {
        self.tx.send(control::encode(msg)).is_ok()
    }

    /// Ask the worker something; `None` if it did not answer in time or went away.
    async fn call(&self, call: Call, timeout: Option<Duration>) -> Option<serde_json::Value> {
        let (id, answer) = self.expect();
        if !self.send(&ToWorker::Call { id, call }) {
            self.forget(id);
            return None;
        }
        self.wait(id, answer, timeout).await
    }

    /// [`Worker::call`] with a descriptor, which goes with the call over the handover
    /// channel. `Err`: the call could not be sent, and why.
    async fn call_with_file(
        &self,
        call: Call,
        file: &impl AsFd,
        timeout: Duration,
    ) -> Result<Option<serde_json::Value>, String> {
        let (id, answer) = self.expect();
        let what = Handover::Call { id, call };
        let size = control::encode(&what).len();
        if size > control::MAX_HANDOVER {
            self.forget(id);
            return Err(format!(
                "the request is {size} bytes of JSON, more than a worker takes with a descriptor ({} bytes): make its configuration smaller",
                control::MAX_HANDOVER
            ));
        }
        if let Err(e) = send_fd(&self.handover, &what, file) {
            self.forget(id);
            return Err(format!(
                "passing the module to the worker of uid {}: {e}",
                self.uid
            ));
        }
        Ok(self.wait(id, answer, Some(timeout)).await)
    }

    /// A call id, and where its answer arrives.
    fn expect(&self) -> (u64, oneshot::Receiver<serde_json::Value>) {
        let id = self.next_call.fetch_add(1, Relaxed);
        let (done, answer) = oneshot::channel();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, done);
        (id, answer)
    }

    fn forget(&self, id: u64) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The answer to call `id`, or `None` when none came in time.
    async fn wait(
        &self,
        id: u64,
        answer: oneshot::Receiver<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Option<serde_json::Value> {
        let r = match timeout {
            Some(t) => tokio::time::timeout(t, answer).await.ok()?.ok(),
            None => answer.await.ok(),
        };
        if r.is_none() {
            self.forget(id);
        }
        r
    }

    /// Resident bytes and CPU microseconds: from /proc if the broker may read it there,
    /// else as the worker last reported them.
    fn usage(&self) -> (u64, u64) {
        match proc_usage(self.pid) {
            (0, _) => *self.reported.lock().unwrap_or_else(|p| p.into_inner()),
            read => read,
        }
    }

    /// Keep what the worker said of itself in answer to `Call::Counts`.
    fn counted(&self, answer: &serde_json::Value) -> Option<WorkerCounts> {
        let c = <WorkerCounts as serde::Deserialize>::deserialize(answer).ok()?;
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = (c.rss_bytes, c.cpu_us);
        Some(c)
    }

    fn info(&self) -> WorkerInfo {
        let (rss_bytes, cpu_us) = self.usage();
        WorkerInfo {
            uid: self.uid,
            pid: self.pid,
            connections: self.connections(),
            rss_bytes,
            cpu_us,
            started_at: self.started_at,
        }
    }
}

/// Why a connection could not be handed to its tenant's worker.
#[derive(Debug)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Broker {
    /// The broker over the state directory of `live`'s config, which the caller opened
    /// (and checked) as `store`.
    pub fn new(live: Live, store: Arc<StateDir>) -> anyhow::Result<Arc<Broker>> {
        // /proc/self/exe: the binary this process runs, also after a package upgrade
        // replaced the file on disk, so broker and workers are always the same version.
        let exe = PathBuf::from("/proc/self/exe");
        let threads = crate::worker::threads();
        let cgroups = match Cgroups::setup() {
            Ok(cg) => {
                log::info!("{}", cg.describe());
                Some(cg)
            }
            Err(why) => {
                log::info!(
                    "cgroups: none for the workers ({why}); the CPU is shared by the scheduler between workers of {threads} threads each, and the broker keeps quotas.memory_mb by watching each worker's resident memory"
                );
                None
            }
        };
        Ok(Arc::new(Broker {
            cgroups,
            live,
            store,
            exe,
            workers: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            connections: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            provisioning: tokio::sync::Mutex::new(()),
            reloading: tokio::sync::Mutex::new(()),
            loader: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// Put `config` in force for the connections accepted from now on.
    pub fn apply(&self, config: Config) {
        self.live.store(Arc::new(config));
    }

    /// Every live worker.
    pub fn live_workers(&self) -> Vec<Arc<Worker>> {
        let mut v: Vec<_> = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|w| w.uid);
        v
    }

    fn live_worker(&self, uid: u32) -> Option<Arc<Worker>> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .cloned()
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
            "{} workers, {} connections",
            self.live_workers().len(),
            self.connections.load(Relaxed)
        )
    }

    /// Hand `stream`, accepted from `tenant`, to the tenant's worker (started if it has
    /// none). `permit` is the connection's place under `server.max_connections`.
    pub fn hand_over(
        self: &Arc<Self>,
        stream: &impl AsFd,
        tenant: &Tenant,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), Refused> {
        let quota = self.live.load().quotas.for_uid(tenant.uid).connections;
        let conn = self.next_conn.fetch_add(1, Relaxed);
        let mut permit = Some(permit);
        // A worker told to stop (idle) between the look-up and here takes no connection:
        // the next look-up starts a new one.
        let worker = loop {
            let worker = self.worker_for(tenant.uid, tenant.is_admin())?;
            let mut conns = worker.conns.lock().unwrap_or_else(|p| p.into_inner());
            if worker.stopping.load(Relaxed) {
                continue;
            }
            if conns.len() >= quota {
                self.metrics.refused(tenant.uid, Refusal::Connections);
                return Err(Refused {
                    code: ErrorCode::Busy,
                    message: format!(
                        "you already have {} connections open, your limit is {quota}; close one and retry",
                        conns.len()
                    ),
                });
            }
            conns.extend(permit.take().map(|p| (conn, p)));
            // Counted with the entry, under its lock: `worker_gone` subtracts what it finds.
            self.connections.fetch_add(1, Relaxed);
            drop(conns);
            break worker;
        };
        self.metrics
            .tenant(tenant.uid)
            .connections_opened
            .fetch_add(1, Relaxed);
        let handover = Handover::Connection {
            conn,
            tenant: TenantWire::from(tenant),
        };
        let sent = send_fd(&worker.handover, &handover, stream);
        if let Err(e) = sent {
            let removed = worker
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&conn);
            if removed.is_some() {
                self.connections.fetch_sub(1, Relaxed);
            }
            return Err(Refused {
                code: ErrorCode::Busy,
                message: format!(
                    "your worker (uid {}) is not taking connections now ({e}); retry later",
                    tenant.uid
                ),
            });
        }
        self.touch();
        Ok(())
    }

    /// The live worker of `uid`, or a new one (for an admin: one that may store public
    /// binaries).
    fn worker_for(self: &Arc<Self>, uid: u32, admin: bool) -> Result<Arc<Worker>, Refused> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = workers.get(&uid) {
            return Ok(w.clone());
        }
        if let Some(b) = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            && b.until > Instant::now()
        {
            let wait = b.until - Instant::now();
            return Err(Refused {
                code: ErrorCode::Busy,
                message: format!(
                    "the worker of uid {uid} failed {} times in a row; the next start is in {} ms",
                    b.failures,
                    wait.as_millis() + 1
                ),
            });
        }
        let w = self.spawn(uid, admin).map_err(|e| {
            log::error!(tenant_uid = uid; "starting the worker of uid {uid}: {e}");
            Refused {
                code: ErrorCode::Internal,
                message: format!("the daemon could not start a worker for uid {uid}: {e}"),
            }
        })?;
        workers.insert(uid, w.clone());
        Ok(w)
    }

    /// Start the worker of `uid`: two socketpairs, the process, the hello, the reader.
    fn spawn(self: &Arc<Self>, uid: u32, admin: bool) -> std::io::Result<Arc<Worker>> {
        self.store.prepare_tenant(uid)?;
        let (handover, their_handover) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let (control, their_control) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let quota = self.config().quotas.for_uid(uid);
        let slot = self.cgroups.as_ref().and_then(|cg| {
            cg.prepare(uid, limits(&quota))
                .map_err(|e| log::warn!(tenant_uid = uid; "the cgroup of uid {uid}'s worker: {e}; it runs in the broker's"))
                .ok()
        });
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("--worker")
            .arg(uid.to_string())
            .arg0("wasmcored-worker")
            .stdin(std::process::Stdio::null());
        sys::map_fds_and_die_with_parent(
            &mut cmd,
            [
                (their_handover.as_raw_fd(), control::HANDOVER_FD),
                (their_control.as_raw_fd(), control::CONTROL_FD),
            ],
            slot.as_ref().map(|s| s.procs_fd()),
        );
        let mut child = cmd.spawn()?;
        drop((their_handover, their_control));
        let pid = child.id();
        let mut oom_kills_before = 0;
        if let (Some(cg), Some(slot)) = (&self.cgroups, &slot) {
            if !cg.holds(slot, pid)
                && let Err(e) = cg.admit(slot, pid)
            {
                log::warn!(tenant_uid = uid; "moving the worker of uid {uid} into its cgroup: {e}");
            }
            oom_kills_before = cg.oom_kills(uid);
        }
        let control = std::os::unix::net::UnixStream::from(control);
        control.set_nonblocking(true)?;
        let (rd, mut wr) = tokio::net::UnixStream::from_std(control)?.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let worker = Arc::new(Worker {
            uid,
            pid,
            admin,
            started: Instant::now(),
            started_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            handover,
            tx,
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            idle_since_ms: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            pinging: AtomicBool::new(false),
            over_memory: AtomicBool::new(false),
            oom_kills_before,
            reported: Mutex::new((0, 0)),
        });
        worker.send(&ToWorker::Hello {
            uid,
            admin,
            config: Box::new((*self.config()).clone()),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        });
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if wr.write_all(&msg).await.is_err() {
                    return;
                }
            }
        });
        let (broker, w) = (self.clone(), worker.clone());
        tokio::spawn(async move {
            broker.read_worker(&w, rd).await;
            broker.worker_gone(&w, &mut child).await;
        });
        log::info!(tenant_uid = uid; "started the worker of uid {uid} (pid {pid})");
        Ok(worker)
    }

    /// Read what worker `w` says until its channel ends.
    async fn read_worker(self: &Arc<Self>, w: &Arc<Worker>, rd: tokio::net::unix::OwnedReadHalf) {
        let mut reader = BufReader::new(rd);
        let mut line = Vec::new();
        loop {
            match control::read_line(&mut reader, &mut line).await {
                Ok(true) => {}
                Ok(false) => return,
                // The worker exited with bytes unread on its side.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => {
                    log::error!(tenant_uid = w.uid; "the worker of uid {} sent an unreadable message ({e}); stopping it", w.uid);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(w.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
            }
            let msg = match serde_json::from_slice::<FromWorker>(&line) {
                Ok(m) => m,
                Err(e) => {
                    log::error!(tenant_uid = w.uid; "the worker of uid {} sent an unknown message: {e}", w.uid);
                    continue;
                }
            };
            match msg {
                FromWorker::Ready => {
                    log::debug!("the worker of uid {} is ready", w.uid);
                }
                FromWorker::Closed { conn } => {
                    let mut conns = w.conns.lock().unwrap_or_else(|p| p.into_inner());
                    if conns.remove(&conn).is_some() {
                        self.connections.fetch_sub(1, Relaxed);
                    }
                    if conns.is_empty() {
                        w.idle_since_ms
                            .store(w.started.elapsed().as_millis() as u64, Relaxed);
                    }
                    drop(conns);
                    self.touch();
                }
                FromWorker::Reply { id, response } => {
                    let waiting = w
                        .calls
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(done) = waiting {
                        let _ = done.send(response);
                    }
                }
                FromWorker::Ask { id, tenant, ask } => {
                    let (broker, w) = (self.clone(), w.clone());
                    tokio::spawn(async move {
                        if let Some(response) = broker.answer(&w, id, tenant, ask).await {
                            w.send(&ToWorker::Answer { id, response });
                        }
                    });
                }
            }
        }
    }

    /// Worker `w` ended: forget it, free its connections, reap it, and count a failure
    /// unless it was told to stop.
    async fn worker_gone(&self, w: &Arc<Worker>, child: &mut std::process::Child) {
        {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            if workers.get(&w.uid).is_some_and(|x| Arc::ptr_eq(x, w)) {
                workers.remove(&w.uid);
            }
        }
        let lost = {
            let mut conns = w.conns.lock().unwrap_or_else(|p| p.into_inner());
            let n = conns.len() as u64;
            conns.clear();
            n
        };
        self.connections.fetch_sub(lost, Relaxed);
        w.calls.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.touch();
        // The control channel closes as the process exits: the wait is short.
        let pid = w.pid;
        let status = {
            let mut status = None;
            for _ in 0..200 {
                match child.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(_) => break,
                }
            }
            if status.is_none() {
                let _ = child.kill();
                status = child.wait().ok();
            }
            status
        };
        // Its cgroup goes with it, unless the tenant's next worker already runs there: under
        // the workers' lock, which a worker's start holds too.
        let oom_killed = self.cgroups.as_ref().is_some_and(|cg| {
            let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            let killed = cg.oom_kills(w.uid) > w.oom_kills_before;
            if !workers.contains_key(&w.uid) {
                cg.remove(w.uid);
            }
            killed
        });
        let clean = w.stopping.load(Relaxed) && status.is_some_and(|s| s.success());
        if clean {
            log::info!(tenant_uid = w.uid; "the worker of uid {} (pid {pid}) exited", w.uid);
            return;
        }
        let mut how = status.map_or("could not be waited for".to_string(), |s| s.to_string());
        let memory_mb = self.config().quotas.for_uid(w.uid).memory_mb;
        if w.over_memory.load(Relaxed) {
            how = format!(
                "killed by the broker: its resident memory went over quotas.memory_mb ({memory_mb} MiB)"
            );
        } else if oom_killed {
            how = format!(
                "killed by the kernel: out of memory in its cgroup (quotas.memory_mb: {memory_mb} MiB)"
            );
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let b = failures.entry(w.uid).or_insert(Backoff {
            failures: 0,
            total: 0,
            until: Instant::now(),
        });
        if w.started.elapsed() >= STABLE_AFTER {
            b.failures = 0;
        }
        b.failures += 1;
        b.total += 1;
        // The first failure restarts at the next connection; repeated ones wait longer.
        let delay = match b.failures {
            1 => Duration::ZERO,
            n => Duration::from_millis(250u64 << (n - 2).min(7)).min(Duration::from_secs(30)),
        };
        b.until = Instant::now() + delay;
        log::warn!(
            tenant_uid = w.uid, error_code = "internal";
            "the worker of uid {} (pid {pid}) ended: {how}; {lost} connections closed; {} failures in a row, next start {}",
            w.uid,
            b.failures,
            if delay.is_zero() { "at the next connection".to_string() } else { format!("in {} ms at the earliest", delay.as_millis()) }
        );
    }

    /// Stop workers without a connection for `workers.idle_timeout_s`; kill workers that no
    /// longer answer (they are restarted at their tenant's next connection).
    pub fn tend(self: &Arc<Self>) {
        let config = self.live.load_full();
        let idle = config.workers.idle_timeout;
        let kernel_keeps_memory = self
            .cgroups
            .as_ref()
            .is_some_and(|cg| cg.controllers.memory);
        for w in self.live_workers() {
            // Without a memory controller the broker keeps the memory quota itself, as often
            // as this loop runs (every second or so).
            let memory_mb = config.quotas.for_uid(w.uid).memory_mb;
            if !kernel_keeps_memory
                && memory_mb > 0
                && !w.over_memory.load(Relaxed)
                && w.usage().0 > memory_mb << 20
            {
                w.over_memory.store(true, Relaxed);
                log::warn!(tenant_uid = w.uid; "the worker of uid {} (pid {}) holds more than quotas.memory_mb ({memory_mb} MiB) resident: killing it", w.uid, w.pid);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                continue;
            }
            let now_ms = w.started.elapsed().as_millis() as u64;
            let idle_for =
                Duration::from_millis(now_ms.saturating_sub(w.idle_since_ms.load(Relaxed)));
            if idle_for >= idle
                && w.calls.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
                && self.stop_if_idle(&w)
            {
                log::info!(tenant_uid = w.uid; "the worker of uid {} had no connection for {idle:?}: stopping it", w.uid);
                continue;
            }
            // One ping in flight per worker, awaited off this loop: the loop also tells
            // systemd the daemon is alive, and a hung worker must not delay that.
            if w.pinging.swap(true, Relaxed) {
                continue;
            }
            tokio::spawn(async move {
                let answered = match w.call(Call::Counts, Some(CALL_TIMEOUT)).await {
                    Some(v) => {
                        w.counted(&v);
                        true
                    }
                    None => false,
                };
                w.pinging.store(false, Relaxed);
                if !answered && !w.stopping.load(Relaxed) {
                    log::error!(tenant_uid = w.uid; "the worker of uid {} (pid {}) did not answer for {CALL_TIMEOUT:?}: killing it", w.uid, w.pid);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(w.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            });
        }
    }

    /// Stop `w` if it has no connection; decided under its connections' lock, so a
    /// connection being handed over either lands before (and `w` stays) or finds `w`
    /// stopping (and goes to a new worker).
    fn stop_if_idle(&self, w: &Arc<Worker>) -> bool {
        {
            let conns = w.conns.lock().unwrap_or_else(|p| p.into_inner());
            if !conns.is_empty() {
                return false;
            }
            w.stopping.store(true, Relaxed);
        }
        self.stop(w);
        true
    }

    /// Take `w` out of service and tell it to finish.
    fn stop(&self, w: &Arc<Worker>) {
        w.stopping.store(true, Relaxed);
        {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            if workers.get(&w.uid).is_some_and(|x| Arc::ptr_eq(x, w)) {
                workers.remove(&w.uid);
            }
        }
        w.send(&ToWorker::Shutdown);
    }

    /// Tell every worker to finish its connections' requests and exit; wait up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let all = self.live_workers();
        for w in &all {
            self.stop(w);
        }
        let deadline = Instant::now() + grace + Duration::from_millis(500);
        while all.iter().any(|w| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid as i32), None).is_ok()
                && !w.tx.is_closed()
        }) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How a reload reads the config file again (set once, by the server).
    pub fn set_loader(&self, loader: ConfigLoader) {
        let _ = self.loader.set(loader);
    }

    /// A reload (SIGHUP, or an admin's `reload`): read the config file again and put it in
    /// force here and in every worker (an invalid file keeps the running config), then
    /// apply the provisioning files. systemd hears RELOADING=1 at the start and READY=1
    /// once both are done.
    pub async fn reload_all(self: &Arc<Self>) -> ReloadResponse {
        let _one = self.reloading.lock().await;
        crate::systemd::notify_reloading();
        let mut r = ReloadResponse {
            config_applied: false,
            config_error: None,
            restart_needed: Vec::new(),
            provisioning: None,
            provisioning_error: None,
        };
        match self.loader.get() {
            None => log::info!("reload: no config file in use; the configuration stays"),
            Some(loader) => match loader() {
                Ok(new) => {
                    let (applied, restart) = self.config().reload_from(new);
                    log::set_max_level(applied.server.log_level);
                    self.reload(&applied);
                    self.apply(applied);
                    if restart.is_empty() {
                        log::info!("reload: configuration applied");
                    } else {
                        log::warn!(
                            "reload: applied; these keys changed but need a restart: {}",
                            restart.join(", ")
                        );
                    }
                    r.config_applied = true;
                    r.restart_needed = restart.into_iter().map(String::from).collect();
                }
                Err(e) => {
                    log::error!("reload: keeping the running configuration: {e}");
                    r.config_error = Some(e);
                }
            },
        }
        match self.provision_logged("reload").await {
            Ok(report) => r.provisioning = Some(report),
            Err(e) => r.provisioning_error = Some(e.message),
        }
        crate::systemd::notify_ready(&self.status_line());
        r
    }

    /// [`Broker::provision`] with a summary in the log (at `when`: start or reload).
    pub async fn provision_logged(
        self: &Arc<Self>,
        when: &str,
    ) -> Result<ApplyResponse, ErrorBody> {
        let report = self.provision(false).await?;
        let changed = report
            .entries
            .iter()
            .filter(|e| e.error.is_none() && e.action != ProvisionAction::Unchanged)
            .count();
        let failed = report.failed();
        if report.entries.is_empty() {
            log::debug!("provisioning ({when}): {} declares nothing", report.dir);
        } else if failed > 0 {
            log::warn!(
                "provisioning ({when}): {} entries in {}, {changed} changes made, {failed} refused or failed (see above)",
                report.entries.len(),
                report.dir
            );
        } else {
            log::info!(
                "provisioning ({when}): {} entries in {}, {changed} changes made",
                report.entries.len(),
                report.dir
            );
        }
        Ok(report)
    }

    /// Pass a reloaded configuration to every worker, and its quotas to their cgroups.
    pub fn reload(&self, config: &Config) {
        for w in self.live_workers() {
            if let Some(cg) = &self.cgroups
                && let Err(e) = cg.apply(w.uid, limits(&config.quotas.for_uid(w.uid)))
            {
                log::warn!(tenant_uid = w.uid; "the cgroup of uid {}'s worker keeps its limits: {e}", w.uid);
            }
            w.send(&ToWorker::Reload {
                config: Box::new(config.clone()),
            });
        }
    }

    /// Bring the stored binaries to what the provisioning files declare ([`provision`]),
    /// each change made in the worker of the binary's owner; with `dry_run`, only say what
    /// would change. Every entry and every failure is logged.
    pub async fn provision(self: &Arc<Self>, dry_run: bool) -> Result<ApplyResponse, ErrorBody> {
        let _one = self.provisioning.lock().await;
        let config = self.config();
        let dir = config.provisioning.dir.clone();
        let cache = config.provisioning.oci_cache.clone();
        let max = config.registry.max_module_bytes as u64;
        let (store, d, c) = (self.store.clone(), dir.clone(), cache.clone());
        let steps = tokio::task::spawn_blocking(move || {
            let uid_of = |user: &str| crate::tenant::uid_of_user(user).map_err(|e| e.to_string());
            let (declared, invalid) = provision::read_dir(&d, &c, &uid_of, max)?;
            let metas: Vec<BinaryMeta> = store
                .list_binaries(Scope::All)?
                .into_iter()
                .filter_map(Result::ok)
                .map(|b| b.meta)
                .collect();
            Ok::<_, std::io::Error>(provision::plan(declared, invalid, &metas))
        })
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| {
            log::error!("provisioning from {}: {e}; nothing changed", dir.display());
            ErrorBody::new(
                ErrorCode::Internal,
                format!("provisioning from {}: {e}; nothing changed", dir.display()),
            )
        })?;
        let mut entries = Vec::with_capacity(steps.len());
        let mut public_changed = false;
        for step in steps {
            let mut entry = step.entry();
            if !dry_run {
                let public = matches!(&step, Step::Load(d) | Step::Replace(d) | Step::Configure(d, _) if d.public);
                match self.provision_step(step).await {
                    Ok(Some(binary)) => entry.binary = Some(binary),
                    Ok(None) => {}
                    Err(e) => entry.error = Some(e),
                }
                // An unload's visibility is not known here: any unload refreshes.
                public_changed |=
                    entry.error.is_none() && (public || entry.action == ProvisionAction::Unload);
            }
            log_entry(&entry, dry_run);
            entries.push(entry);
        }
        if public_changed {
            for w in self.live_workers() {
                if w.call(Call::Refresh, Some(CALL_TIMEOUT)).await.is_none() {
                    log::warn!(tenant_uid = w.uid; "the worker of uid {} did not take the public binaries' change", w.uid);
                }
            }
        }
        Ok(ApplyResponse {
            dir: dir.display().to_string(),
            oci_cache: cache.display().to_string(),
            dry_run,
            entries,
        })
    }

    /// Run one step of a provisioning plan in the owner's worker: the binary the name is on
    /// afterwards (for a load or replace), or why it failed.
    async fn provision_step(self: &Arc<Self>, step: Step) -> Result<Option<String>, String> {
        use wasmcore_proto::{BinaryRequest, ConfigureRequest, LoadRequest, Request};
        let owner = match &step {
            Step::Load(d) | Step::Replace(d) | Step::Configure(d, _) => d.owner,
            Step::Unload { owner, .. } => *owner,
            Step::Unchanged(..) | Step::Invalid(_) => return Ok(None),
        };
        let admin = admin_by_database(owner, &self.live.load().access.admin_gids);
        let worker = self.worker_for(owner, admin).map_err(|r| r.message)?;
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
            .ok()
            .flatten()
            .map_or(owner, |u| u.gid.as_raw());
        let tenant = TenantWire {
            uid: owner,
            gid,
            groups: Vec::new(),
            admin,
        };
        let timeout = self.config().registry.max_compile + CALL_TIMEOUT;
        let answer = match step {
            Step::Load(d) | Step::Replace(d) => {
                let request = Request::Load(LoadRequest {
                    fd: true,
                    name: Some(d.name.clone()),
                    public: d.public,
                    config: Some(d.config.clone()),
                    source: d.oci.clone(),
                    // A name taken meanwhile is then replaced only if a file declared it.
                    replace: true,
                    ..LoadRequest::default()
                });
                let call = Call::Provision {
                    tenant,
                    request: Box::new(request),
                    provisioned: Some(d.provisioned()),
                };
                worker.call_with_file(call, &d.module, timeout).await?
            }
            Step::Configure(d, _) => {
                let request = Request::Configure(ConfigureRequest {
                    binary: d.name.clone(),
                    config: d.config.clone(),
                    ..ConfigureRequest::default()
                });
                let call = Call::Provision {
                    tenant,
                    request: Box::new(request),
                    provisioned: Some(d.provisioned()),
                };
                worker.call(call, Some(timeout)).await
            }
            Step::Unload { name, .. } => {
                // By name: every version of it goes.
                let request = Request::Unload(BinaryRequest {
                    binary: format!("{owner}/{name}"),
                    ..BinaryRequest::default()
                });
                let call = Call::Provision {
                    tenant,
                    request: Box::new(request),
                    provisioned: None,
                };
                worker.call(call, Some(timeout)).await
            }
            Step::Unchanged(..) | Step::Invalid(_) => return Ok(None),
        };
        let answer = answer.ok_or_else(|| {
            format!("the worker of uid {owner} did not answer within {timeout:?}")
        })?;
        if answer.get("ok") != Some(&serde_json::Value::Bool(true)) {
            return Err(answer
                .get("error")
                .and_then(|e| e.get("message"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("the worker answered a malformed failure")
                .to_string());
        }
        Ok(answer
            .get("binary")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string))
    }

    /// Answer ask `id` of worker `from`: a wire response, or `None` when the answer went
    /// as a descriptor over the handover channel.
    ///
    /// Nothing the worker says about identity is believed: the ask is made by the worker's
    /// own tenant, an admin only if this broker started the worker as an admin's. What
    /// crosses tenants is for admins only, whatever the worker claims (a worker that an
    /// escaped guest controls gains nothing by asking).
    async fn answer(
        self: &Arc<Self>,
        from: &Arc<Worker>,
        id: u64,
        claimed: TenantWire,
        ask: Ask,
    ) -> Option<serde_json::Value> {
        let tenant = TenantWire {
            uid: from.uid,
            gid: claimed.gid,
            groups: claimed.groups,
            admin: claimed.admin && from.admin && claimed.uid == from.uid,
        };
        if let Ask::Uid { user } = &ask {
            let user = user.clone();
            let uid = tokio::task::spawn_blocking(move || crate::tenant::uid_of_user(&user))
                .await
                .unwrap_or_else(|e| Err(crate::error::Error::internal(e.to_string())));
            return Some(match uid {
                Ok(uid) => serde_json::json!({"ok": true, "uid": uid}),
                Err(e) => serde_json::to_value(Response::<wasmcore_proto::Empty>::failure(
                    None,
                    e.to_body(),
                ))
                .unwrap_or_default(),
            });
        }
        let result = if !tenant.admin {
            Err(ErrorBody::new(
                ErrorCode::Forbidden,
                if claimed.admin {
                    format!(
                        "the worker of uid {} was started without admin rights (the user was not an admin then); admin requests work once it has restarted",
                        from.uid
                    )
                } else {
                    "only admins may act on other tenants' binaries".to_string()
                },
            ))
        } else {
            match ask {
                Ask::Open { path } => match self.open_for(from, id, &path) {
                    Ok(()) => return None,
                    Err(e) => Err(e),
                },
                ask => self.answer_admin(from, tenant, ask).await,
            }
        };
        Some(result.unwrap_or_else(|e| {
            serde_json::to_value(Response::<wasmcore_proto::Empty>::failure(None, e))
                .unwrap_or_default()
        }))
    }

    /// Open `path` for an admin's `load` and hand it to worker `w` as the answer to ask `id`.
    fn open_for(&self, w: &Worker, id: u64, path: &str) -> Result<(), ErrorBody> {
        let file = std::fs::File::open(path)
            .map_err(|e| ErrorBody::new(ErrorCode::NotFound, format!("opening {path}: {e}")))?;
        send_fd(&w.handover, &Handover::File { id }, &file)
            .map(|_| ())
            .map_err(|e| {
                ErrorBody::new(
                    ErrorCode::Internal,
                    format!("passing {path} to the worker: {e}"),
                )
            })
    }

    /// What only an admin may ask: views across tenants, another tenant's binary, telling
    /// the other workers of a change to the public binaries.
    async fn answer_admin(
        self: &Arc<Self>,
        from: &Arc<Worker>,
        tenant: TenantWire,
        ask: Ask,
    ) -> Result<serde_json::Value, ErrorBody> {
        match ask {
            Ask::Forward { request } => self.forward(from, tenant, request).await,
            Ask::ListAll => self.list_all().await,
            Ask::Metrics => self.metrics_all().await,
            Ask::Status { own } => self.status_all(*own).await,
            Ask::PublicChanged => {
                for w in self.live_workers() {
                    if !Arc::ptr_eq(&w, from)
                        && w.call(Call::Refresh, Some(CALL_TIMEOUT)).await.is_none()
                    {
                        log::warn!(tenant_uid = w.uid; "the worker of uid {} did not take the public binaries' change", w.uid);
                    }
                }
                Ok(serde_json::json!({"ok": true}))
            }
            Ask::Reload => serde_json::to_value(Response::success(None, self.reload_all().await))
                .map_err(|e| {
                    ErrorBody::new(ErrorCode::Internal, format!("the reload report: {e}"))
                }),
            Ask::Apply { dry_run } => {
                serde_json::to_value(Response::success(None, self.provision(dry_run).await?))
                    .map_err(|e| {
                        ErrorBody::new(ErrorCode::Internal, format!("the apply report: {e}"))
                    })
            }
            Ask::Open { .. } | Ask::Uid { .. } => {
                Err(ErrorBody::new(ErrorCode::Internal, "answered above"))
            }
        }
    }

    /// An admin's request naming a binary its worker does not hold, run in the worker of
    /// the binary's owner with its references made UUIDs.
    async fn forward(
        self: &Arc<Self>,
        from: &Arc<Worker>,
        tenant: TenantWire,
        mut request: Box<wasmcore_proto::Request>,
    ) -> Result<serde_json::Value, ErrorBody> {
        use wasmcore_proto::Request as R;
        if !matches!(
            *request,
            R::Execute(_)
                | R::Chain(_)
                | R::Info(_)
                | R::Unload(_)
                | R::Configure(_)
                | R::Rollback(_)
                | R::Versions(_)
        ) {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!(
                    "a {} request is not passed to another tenant's worker",
                    request.op()
                ),
            ));
        }
        let store = self.store.clone();
        let admin = from.uid;
        let (request, owner) = tokio::task::spawn_blocking(move || {
            let by_id: Vec<uuid::Uuid> = request
                .references()
                .iter()
                .filter_map(|r| uuid::Uuid::parse_str(wasmcore_proto::split_stage(r).0).ok())
                .collect();
            // UUIDs alone are read one by one; a name needs every binary's metadata.
            let metas: Vec<BinaryMeta> = if by_id.len() == request.references().len() {
                by_id
                    .into_iter()
                    .filter_map(|id| store.read_meta(id))
                    .collect()
            } else {
                store
                    .list_binaries(Scope::All)
                    .map_err(|e| {
                        ErrorBody::new(
                            ErrorCode::Internal,
                            format!("reading the stored binaries: {e}"),
                        )
                    })?
                    .into_iter()
                    .filter_map(Result::ok)
                    .map(|b| b.meta)
                    .collect()
            };
            let owner = route(admin, &mut request, &metas, &crate::tenant::user_name_of)?;
            Ok::<_, ErrorBody>((request, owner))
        })
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))??;
        let worker = self
            .worker_for(
                owner,
                admin_by_database(owner, &self.live.load().access.admin_gids),
            )
            .map_err(|r| ErrorBody::new(r.code, r.message))?;
        worker
            .call(Call::Request { tenant, request }, None)
            .await
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::Internal,
                    format!("the worker of uid {owner} ended before it answered"),
                )
            })
    }

    /// Every stored binary: as its owner's live worker reports it (with its executions),
    /// else from its stored metadata.
    async fn list_all(self: &Arc<Self>) -> Result<serde_json::Value, ErrorBody> {
        let store = self.store.clone();
        let metas = tokio::task::spawn_blocking(move || {
            store.list_binaries(Scope::All).map(|v| {
                v.into_iter()
                    .filter_map(Result::ok)
                    .map(|b| b.meta)
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("reading the stored binaries: {e}"),
            )
        })?;
        let mut reported: HashMap<String, BinaryInfo> = HashMap::new();
        for w in self.live_workers() {
            if let Some(v) = w.call(Call::Owned, Some(CALL_TIMEOUT)).await
                && let Ok(owned) = serde_json::from_value::<Vec<BinaryInfo>>(v)
            {
                reported.extend(owned.into_iter().map(|b| (b.binary.clone(), b)));
            }
        }
        let mut binaries: Vec<BinaryInfo> = metas
            .iter()
            .map(|m| {
                reported.remove(&m.id.to_string()).unwrap_or(BinaryInfo {
                    binary: m.id.to_string(),
                    name: m.name.clone(),
                    owner_uid: m.owner,
                    size: m.size,
                    sha256: m.sha256.clone(),
                    kind: m.kind,
                    public: m.public,
                    loaded_at: m.loaded_at,
                    executions: 0,
                    superseded: m.superseded_in(&metas),
                    source: m.source.clone(),
                    provisioned: m.provisioned.clone(),
                })
            })
            .collect();
        binaries.sort_by(|a, b| {
            a.loaded_at
                .cmp(&b.loaded_at)
                .then_with(|| a.binary.cmp(&b.binary))
        });
        Ok(
            serde_json::to_value(Response::success(None, ListResponse { binaries }))
                .unwrap_or_default(),
        )
    }

    /// Every live worker's figures, merged, with the broker's own.
    async fn metrics_all(self: &Arc<Self>) -> Result<serde_json::Value, ErrorBody> {
        let mut parts = Vec::new();
        for w in self.live_workers() {
            if let Some(v) = w.call(Call::Metrics, Some(CALL_TIMEOUT)).await
                && let Ok(m) = serde_json::from_value::<MetricsResponse>(v)
            {
                parts.push(m);
            }
        }
        let mut merged = merge_metrics(parts);
        merged.uptime_seconds = self.started.elapsed().as_secs_f64();
        merged.connections_open = Some(self.connections.load(Relaxed));
        // What only the broker saw: connection refusals, connections opened, failures.
        for (uid, stats) in self.metrics.tenants() {
            let t = tenant_entry(&mut merged.tenants, uid);
            t.connections_opened = t
                .connections_opened
                .max(stats.connections_opened.load(Relaxed));
            for (why, n) in stats.refusals() {
                *t.refusals.entry(why.to_string()).or_default() += n;
            }
        }
        for (uid, b) in self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            tenant_entry(&mut merged.tenants, *uid).worker_failures = b.total;
        }
        for w in self.live_workers() {
            tenant_entry(&mut merged.tenants, w.uid).worker = Some(w.info());
        }
        for t in &mut merged.tenants {
            t.connections_open = self.live_worker(t.uid).map_or(0, |w| w.connections());
        }
        merged.tenants.sort_by_key(|t| t.uid);
        Ok(serde_json::to_value(Response::success(None, merged)).unwrap_or_default())
    }

    /// An admin's `status`: the asking worker's answer with the daemon-wide counts.
    async fn status_all(
        self: &Arc<Self>,
        mut own: StatusResponse,
    ) -> Result<serde_json::Value, ErrorBody> {
        let dir = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let metas: Vec<_> = dir
                .list_binaries(Scope::All)
                .ok()?
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            let bytes = metas
                .iter()
                .map(|b| crate::store::stored_bytes(&b.dir))
                .sum::<u64>();
            Some((metas.len() as u64, bytes))
        })
        .await
        .ok()
        .flatten();
        let (binaries, stored_bytes) = stored.unwrap_or((own.binaries, own.stored_bytes));
        let mut counts = WorkerCounts::default();
        let workers = self.live_workers();
        for w in &workers {
            if let Some(v) = w.call(Call::Counts, Some(CALL_TIMEOUT)).await
                && let Some(c) = w.counted(&v)
            {
                counts.executions += c.executions;
                counts.executions_running += c.executions_running;
                counts.state_bytes += c.state_bytes;
            }
        }
        own.uptime_s = self.started.elapsed().as_secs();
        own.binaries = binaries;
        own.stored_bytes = stored_bytes;
        own.executions = counts.executions;
        own.executions_running = counts.executions_running;
        own.state_bytes = counts.state_bytes;
        own.connections = self.connections.load(Relaxed);
        own.workers = Some(workers.iter().map(|w| w.info()).collect());
        Ok(serde_json::to_value(Response::success(None, own)).unwrap_or_default())
    }

    /// The tenant workers as `status` lists them.
    pub fn worker_infos(&self) -> Vec<WorkerInfo> {
        self.live_workers().iter().map(|w| w.info()).collect()
    }
}

/// The cgroup limits of a worker whose tenant has `quota`.
/// Log one entry of a provisioning run.
fn log_entry(e: &ProvisionEntry, dry_run: bool) {
    let what = format!(
        "{}{}",
        e.name.as_deref().unwrap_or("-"),
        e.owner_uid
            .map(|u| format!(" of uid {u}"))
            .unwrap_or_default()
    );
    let line = e.line.map(|l| format!(":{l}")).unwrap_or_default();
    let action = format!("{:?}", e.action).to_lowercase();
    match (&e.error, e.action) {
        (Some(err), ProvisionAction::Invalid) => {
            log::error!(
                "provisioning: {}{line}: refused, nothing it declares changes: {err}",
                e.file
            )
        }
        (Some(err), _) => log::error!("provisioning: {}: {action} {what} failed: {err}", e.file),
        (None, ProvisionAction::Unchanged) => {
            log::debug!("provisioning: {}: {what} is as declared", e.file)
        }
        (None, _) if dry_run => {
            log::info!("provisioning (dry run): {}: would {action} {what}", e.file)
        }
        (None, _) => log::info!(
            "provisioning: {}: {action} {what}{}",
            e.file,
            e.binary
                .as_deref()
                .map(|b| format!(" ({b})"))
                .unwrap_or_default()
        ),
    }
}

fn limits(quota: &Quota) -> Limits {
    Limits {
        cpu_weight: quota.cpu_weight,
        memory_bytes: quota.memory_mb << 20,
        pids: crate::worker::max_tasks() as u64,
    }
}

/// Send `what` with descriptor `fd` over a handover socket, without waiting: a worker that
/// does not take its messages makes this fail (`EAGAIN`) rather than stall the broker.
fn send_fd(sock: &OwnedFd, what: &Handover, fd: &impl AsFd) -> nix::Result<usize> {
    let msg = control::encode(what);
    let fds = [fd.as_fd().as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(&msg)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// Whether the user database makes `uid` an admin (root, or a member of an admin group): for
/// a worker started without a connection of its own (an admin's request about a binary of
/// `uid`).
/// Find the binaries an admin's `request` names among `metas` (every stored binary, or
/// those named by UUID), make its references UUIDs, and say whose worker runs it: the one
/// that holds every binary named (another tenant's private binaries and the public ones).
/// `admin` is the admin's uid; `user_name` names uids in the errors.
fn route(
    admin: u32,
    request: &mut wasmcore_proto::Request,
    metas: &[BinaryMeta],
    user_name: &dyn Fn(u32) -> Option<String>,
) -> Result<u32, ErrorBody> {
    let chain = matches!(request, wasmcore_proto::Request::Chain(_));
    let staged = |stage: usize, reference: &str, mut e: ErrorBody| {
        if chain {
            e.message = format!("stage {stage} ({reference}): {}", e.message);
            e.stage = Some(stage);
        }
        e
    };
    let who = |uid: u32| match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    // The tenant whose private binary the request names, and at which stage.
    let mut runs_in: Option<(u32, usize)> = None;
    for (stage, r) in request.references_mut().iter_mut().enumerate() {
        let (reference, function) = wasmcore_proto::split_stage(r);
        let found = match uuid::Uuid::parse_str(reference) {
            Ok(id) => metas.iter().find(|m| m.id == id),
            Err(_) => match wasmcore_proto::split_owner(reference) {
                Some(Ok((wasmcore_proto::Owner::Uid(uid), name))) => {
                    crate::store::current_of(metas, |m| {
                        m.owner == uid && m.name.as_deref() == Some(name)
                    })
                }
                Some(_) => {
                    return Err(staged(
                        stage,
                        r,
                        ErrorBody::new(
                            ErrorCode::BadRequest,
                            format!("invalid binary reference {reference:?}"),
                        ),
                    ));
                }
                // The admin's own binary of that name first, else the public one.
                None => crate::store::current_of(metas, |m| {
                    m.name.as_deref() == Some(reference) && m.owner == admin
                })
                .or_else(|| {
                    crate::store::current_of(metas, |m| {
                        m.name.as_deref() == Some(reference) && m.public
                    })
                }),
            },
        };
        let Some(meta) = found else {
            // One entry per owner, however many versions of the name it keeps.
            let holders: Vec<u32> = metas
                .iter()
                .filter(|m| m.name.as_deref() == Some(reference))
                .map(|m| m.owner)
                .collect::<std::collections::BTreeSet<u32>>()
                .into_iter()
                .collect();
            let message = crate::registry::missing_for_admin(admin, reference, &holders, user_name);
            return Err(staged(
                stage,
                r,
                ErrorBody::new(ErrorCode::NotFound, message),
            ));
        };
        if !meta.public {
            match runs_in {
                Some((owner, first)) if owner != meta.owner => {
                    return Err(ErrorBody::new(
                        ErrorCode::BadRequest,
                        format!(
                            "a chain runs in one tenant's worker: stage {first} is a binary of {}, stage {stage} one of {}; use public binaries or one tenant's",
                            who(owner),
                            who(meta.owner)
                        ),
                    ));
                }
                None => runs_in = Some((meta.owner, stage)),
                _ => {}
            }
        }
        let mut id = meta.id.to_string();
        if let Some(function) = function {
            id.push(':');
            id.push_str(function);
        }
        *r = id;
    }
    Ok(runs_in.map_or(admin, |(owner, _)| owner))
}

fn admin_by_database(uid: u32, admin_gids: &[u32]) -> bool {
    if uid == 0 {
        return true;
    }
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|groups| groups.iter().any(|g| admin_gids.contains(&g.as_raw())))
        .unwrap_or(false)
}

/// Resident bytes and user+system CPU microseconds of process `pid` (zeros if unreadable:
/// under `ProtectProc=invisible` a worker, not dumpable, is hidden from the broker).
fn proc_usage(pid: u32) -> (u64, u64) {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    crate::worker::parse_usage(&read("statm"), &read("stat"))
}

fn tenant_entry(tenants: &mut Vec<TenantMetrics>, uid: u32) -> &mut TenantMetrics {
    if let Some(i) = tenants.iter().position(|t| t.uid == uid) {
        return &mut tenants[i];
    }
    tenants.push(TenantMetrics {
        uid,
        connections_open: 0,
        connections_opened: 0,
        executions_running: 0,
        binaries: 0,
        binary_bytes: 0,
        state_bytes: 0,
        loads_ok: 0,
        loads_failed: 0,
        compile_seconds: HistogramData::default(),
        refusals: BTreeMap::new(),
        kinds: Vec::new(),
        worker_failures: 0,
        worker: None,
    });
    tenants.last_mut().expect("just pushed")
}

/// Workers' admin views merged into one: counters added; a tenant's binaries, bytes and
/// state taken from the largest report (its own worker's: others hold only its public
/// binaries); a public binary's figures added over the workers that ran it.
fn merge_metrics(parts: Vec<MetricsResponse>) -> MetricsResponse {
    let mut out = MetricsResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        wasmtime_version: String::new(),
        protocol: wasmcore_proto::PROTOCOL_VERSION,
        uptime_seconds: 0.0,
        all_tenants: true,
        connections_open: Some(0),
        executions_running: Some(0),
        pool: None,
        restore: None,
        tenants: Vec::new(),
        binaries: Vec::new(),
    };
    for part in parts {
        out.wasmtime_version = part.wasmtime_version;
        *out.executions_running.get_or_insert(0) += part.executions_running.unwrap_or(0);
        if let Some(p) = part.pool {
            let o = out.pool.get_or_insert(wasmcore_proto::PoolMetrics {
                capacity: 0,
                core_instances: 0,
                component_instances: 0,
                memories: 0,
                tables: 0,
                unused_warm_memories: 0,
            });
            o.capacity += p.capacity;
            o.core_instances += p.core_instances;
            o.component_instances += p.component_instances;
            o.memories += p.memories;
            o.tables += p.tables;
            o.unused_warm_memories += p.unused_warm_memories;
        }
        if let Some(r) = part.restore {
            let o = out.restore.get_or_insert(wasmcore_proto::RestoreMetrics {
                restored: 0,
                recompiled: 0,
                quarantined: 0,
            });
            o.restored += r.restored;
            o.recompiled += r.recompiled;
            o.quarantined += r.quarantined;
        }
        for t in part.tenants {
            let o = tenant_entry(&mut out.tenants, t.uid);
            o.connections_opened += t.connections_opened;
            o.executions_running += t.executions_running;
            o.binaries = o.binaries.max(t.binaries);
            o.binary_bytes = o.binary_bytes.max(t.binary_bytes);
            o.state_bytes = o.state_bytes.max(t.state_bytes);
            o.loads_ok += t.loads_ok;
            o.loads_failed += t.loads_failed;
            add_histogram(&mut o.compile_seconds, &t.compile_seconds);
            for (why, n) in t.refusals {
                *o.refusals.entry(why).or_default() += n;
            }
            for k in t.kinds {
                match o.kinds.iter_mut().find(|x| x.kind == k.kind) {
                    None => o.kinds.push(k),
                    Some(x) => add_kind(x, &k),
                }
            }
        }
        for b in part.binaries {
            match out.binaries.iter_mut().find(|x| x.binary == b.binary) {
                None => out.binaries.push(b),
                Some(x) => add_binary(x, &b),
            }
        }
    }
    out
}

fn add_histogram(into: &mut HistogramData, h: &HistogramData) {
    if into.buckets.is_empty() {
        *into = h.clone();
        return;
    }
    for (o, b) in into.buckets.iter_mut().zip(&h.buckets) {
        o.1 += b.1;
    }
    into.count += h.count;
    into.sum += h.sum;
}

fn add_kind(into: &mut KindMetrics, k: &KindMetrics) {
    for (outcome, n) in &k.executions {
        *into.executions.entry(outcome.clone()).or_default() += n;
    }
    into.fuel_total += k.fuel_total;
    into.memory_peak_bytes = into.memory_peak_bytes.max(k.memory_peak_bytes);
    add_histogram(&mut into.latency_seconds, &k.latency_seconds);
}

fn add_binary(into: &mut BinaryMetrics, b: &BinaryMetrics) {
    into.executions += b.executions;
    into.errors += b.errors;
    into.wall_seconds_total += b.wall_seconds_total;
    into.fuel_total += b.fuel_total;
    into.memory_peak_bytes = into.memory_peak_bytes.max(b.memory_peak_bytes);
    let mut sketch: BTreeMap<u32, u64> = into.sketch.iter().copied().collect();
    for (i, n) in &b.sketch {
        *sketch.entry(*i).or_default() += n;
    }
    into.sketch = sketch.into_iter().collect();
    into.p50_seconds = sketch_quantile(&into.sketch, 0.5);
    into.p99_seconds = sketch_quantile(&into.sketch, 0.99);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admins_request_goes_to_the_worker_holding_what_it_names() {
        let meta = |n: u128, owner: u32, name: &str, public: bool| BinaryMeta {
            format: 1,
            id: uuid::Uuid::from_u128(n),
            name: Some(name.to_string()),
            owner,
            sha256: String::new(),
            size: 1,
            kind: wasmcore_proto::ModuleKind::Process,
            public,
            loaded_at: 0,
            config: BTreeMap::new(),
            activation: 0,
            source: None,
            provisioned: None,
        };
        let metas = [
            meta(1, 984, "a1", false),
            meta(2, 985, "a1", false),
            meta(3, 985, "shared", true),
            meta(4, 0, "mine", false),
        ];
        let names = |uid: u32| (uid == 984).then(|| "alice".to_string());
        let chain = |stages: &[&str]| {
            wasmcore_proto::Request::Chain(wasmcore_proto::ChainRequest {
                binaries: stages.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
        };
        let mut req = chain(&[
            "984/a1:run",
            "shared",
            &uuid::Uuid::from_u128(3).to_string(),
        ]);
        assert_eq!(route(0, &mut req, &metas, &names), Ok(984));
        let one = uuid::Uuid::from_u128(1).to_string();
        let three = uuid::Uuid::from_u128(3).to_string();
        assert_eq!(
            req.references(),
            [format!("{one}:run"), three.clone(), three]
        );
        // Public binaries alone run in the admin's own worker, as do its own.
        assert_eq!(
            route(0, &mut chain(&["shared", "mine"]), &metas, &names),
            Ok(0)
        );
        let err = route(0, &mut chain(&["984/a1", "985/a1"]), &metas, &names).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(
            err.message
                .contains("stage 0 is a binary of alice (uid 984), stage 1 one of uid 985"),
            "{}",
            err.message
        );
        // Wrong names say what is not there, never that it is hidden.
        let err = route(0, &mut chain(&["shared", "984/a2"]), &metas, &names).unwrap_err();
        assert_eq!(
            (err.code, err.stage, err.message.as_str()),
            (
                ErrorCode::NotFound,
                Some(1),
                "stage 1 (984/a2): alice (uid 984) has no binary named \"a2\""
            )
        );
        let mut info = wasmcore_proto::Request::Info(wasmcore_proto::BinaryRequest {
            tag: None,
            binary: "a1".into(),
        });
        let err = route(0, &mut info, &metas, &names).unwrap_err();
        assert_eq!(
            err.message,
            "you (uid 0) have no binary named \"a1\" and no public binary has that name; another tenant's binary is named OWNER/NAME: alice/a1, 985/a1"
        );
        assert!(!err.message.contains("visible"));
        let missing = uuid::Uuid::from_u128(9).to_string();
        let mut info = wasmcore_proto::Request::Info(wasmcore_proto::BinaryRequest {
            tag: None,
            binary: missing.clone(),
        });
        let err = route(0, &mut info, &metas, &names).unwrap_err();
        assert_eq!(err.message, format!("no binary {missing} is loaded"));
        // A name with versions routes to its current one (the highest activation), and
        // its owner is listed once among the holders.
        let mut versioned = metas.to_vec();
        versioned.push(BinaryMeta {
            activation: 2,
            ..meta(5, 984, "a1", false)
        });
        versioned.push(BinaryMeta {
            activation: 1,
            ..meta(6, 984, "a1", false)
        });
        let mut req = chain(&["984/a1"]);
        assert_eq!(route(0, &mut req, &versioned, &names), Ok(984));
        assert_eq!(req.references(), [uuid::Uuid::from_u128(5).to_string()]);
        assert!(versioned[5].superseded_in(&versioned) && !versioned[4].superseded_in(&versioned));
        let mut info = wasmcore_proto::Request::Info(wasmcore_proto::BinaryRequest {
            tag: None,
            binary: "a1".into(),
        });
        let err = route(0, &mut info, &versioned, &names).unwrap_err();
        assert!(err.message.ends_with("alice/a1, 985/a1"), "{}", err.message);
    }

    fn hist(counts: &[u64]) -> HistogramData {
        HistogramData {
            buckets: counts
                .iter()
                .enumerate()
                .map(|(i, c)| (i as f64, *c))
                .collect(),
            count: *counts.last().unwrap_or(&0),
            sum: 1.0,
        }
    }

    #[test]
    fn metrics_of_workers_add_up_and_public_binaries_merge() {
        let part = |uid: u32, binaries: u64, execs: u64| MetricsResponse {
            version: "v".into(),
            wasmtime_version: "w".into(),
            protocol: 1,
            uptime_seconds: 1.0,
            all_tenants: true,
            connections_open: Some(1),
            executions_running: Some(1),
            pool: None,
            restore: None,
            tenants: vec![{
                let mut t = tenant_entry(&mut Vec::new(), uid).clone();
                t.binaries = binaries;
                t.kinds = vec![KindMetrics {
                    kind: wasmcore_proto::ModuleKind::Process,
                    executions: BTreeMap::from([("ok".to_string(), execs)]),
                    fuel_total: 10,
                    memory_peak_bytes: 100 * execs,
                    latency_seconds: hist(&[execs, execs]),
                }];
                t
            }],
            binaries: vec![BinaryMetrics {
                binary: "p".into(),
                name: None,
                owner_uid: 0,
                kind: wasmcore_proto::ModuleKind::Process,
                executions: execs,
                errors: 0,
                wall_seconds_total: 0.5,
                fuel_total: 1,
                memory_peak_bytes: 7,
                p50_seconds: None,
                p99_seconds: None,
                sketch: vec![(3, execs)],
            }],
        };
        // Two workers report uid 0 (its own worker: 3 binaries; another: its 1 public one).
        let m = merge_metrics(vec![part(0, 3, 2), part(0, 1, 5), part(7, 1, 1)]);
        assert_eq!(m.executions_running, Some(3));
        let root = m.tenants.iter().find(|t| t.uid == 0).unwrap();
        assert_eq!(root.binaries, 3);
        assert_eq!(root.kinds[0].executions["ok"], 7);
        assert_eq!(root.kinds[0].latency_seconds.count, 7);
        assert_eq!(root.kinds[0].memory_peak_bytes, 500);
        assert_eq!(m.binaries.len(), 1);
        assert_eq!(m.binaries[0].executions, 8);
        assert_eq!(m.binaries[0].sketch, vec![(3, 8)]);
        assert!(m.binaries[0].p50_seconds.is_some());
    }

    #[test]
    fn proc_usage_reads_this_process() {
        let (rss, _cpu) = proc_usage(std::process::id());
        assert!(rss > 0);
    }
}
