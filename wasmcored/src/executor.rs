//! One execution: a fresh `Store` with its limits, instantiation from the binary's
//! `InstancePre`, the ABI glue, and the result with its accounting. Also chains.
//!
//! Guests run on the caller's task with no thread hop. A core module without WASI runs
//! inline: synchronous calls on the runtime thread's own stack, no fibre
//! ([`crate::engine::inline_here`]); when it has run a whole epoch tick, the thread hands
//! its place in the runtime to another thread and goes on running the guest, so runaway
//! guests never hold the runtime's workers. Other kinds run as async calls on a fibre and
//! yield to the runtime at every epoch tick. Each store has its own absolute deadline; the epoch is
//! never bumped to cancel one call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmcore_proto::{LimitsRequest, Stats};
use wasmtime::component::ResourceTable;
use wasmtime::{PoolConcurrencyLimitError, Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use crate::blocks::Blocks;
use crate::config::{Config, LimitsConfig, Live};
use crate::context::{ExecCtx, ExtismCtx, HostTrap, Limiter, Logs, P2, Pipes};
use crate::engine::WasmEngine;
use crate::error::{Error, ExecFailure, Result};
use crate::kinds::{Call, Ended, Stdio};
use crate::metrics::{Execution, Metrics};
use crate::registry::Binary;
use crate::state::{CommitError, Namespace, StateStore, StateTxn};

/// Backtrace frames kept in a trap error.
const MAX_BACKTRACE_FRAMES: usize = 8;

/// Limits of one execution after applying defaults and maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
    /// `None`: unlimited (or metering off).
    pub fuel: Option<u64>,
}

impl ExecLimits {
    /// Apply the request's limits to the configured defaults; a request may lower a limit,
    /// never raise it past the maximum.
    pub fn resolve(
        req: &LimitsRequest,
        cfg: &LimitsConfig,
        fuel_metering: bool,
    ) -> Result<ExecLimits> {
        let timeout_ms = pick(
            "timeout_ms",
            req.timeout_ms,
            cfg.default_timeout_ms,
            cfg.max_timeout_ms,
        )?;
        let memory_mb = pick(
            "memory_limit_mb",
            req.memory_limit_mb,
            cfg.default_memory_mb,
            cfg.max_memory_mb,
        )?;
        let fuel = match req.fuel {
            Some(_) if !fuel_metering => {
                return Err(Error::bad_request(
                    "fuel was requested but this daemon runs with engine.fuel_metering = false",
                ));
            }
            Some(0) => return Err(Error::bad_request("fuel must be greater than 0")),
            Some(f) => match cfg.max_fuel {
                Some(m) if f > m => {
                    return Err(Error::bad_request(format!(
                        "fuel {f} exceeds the maximum {m}"
                    )));
                }
                _ => Some(f),
            },
            None => cfg.default_fuel,
        };
        Ok(ExecLimits {
            timeout: Duration::from_millis(timeout_ms),
            memory_bytes: (memory_mb as usize) << 20,
            fuel,
        })
    }
}

fn pick(name: &str, asked: Option<u64>, default: u64, max: u64) -> Result<u64> {
    match asked {
        None => Ok(default),
        Some(0) => Err(Error::bad_request(format!("{name} must be greater than 0"))),
        Some(v) if v > max => Err(Error::bad_request(format!(
            "{name} {v} exceeds the maximum {max} allowed by this daemon"
        ))),
        Some(v) => Ok(v),
    }
}

/// What an execution produced.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub output: Vec<u8>,
    pub logs: Vec<String>,
    pub stats: Stats,
}

/// What a chain produced.
#[derive(Debug, Default)]
pub struct ChainOutput {
    pub output: Vec<u8>,
    pub logs: Vec<String>,
    pub stats: Stats,
    pub stages: Vec<Stats>,
}

/// One stage of a chain: a binary and, for an Extism plugin, the function to call.
#[derive(Debug, Clone)]
pub struct Stage {
    pub bin: Arc<Binary>,
    pub function: Option<String>,
}

impl From<Arc<Binary>> for Stage {
    /// A stage that calls the binary's only function (or is not an Extism plugin).
    fn from(bin: Arc<Binary>) -> Stage {
        Stage {
            bin,
            function: None,
        }
    }
}

/// One execution as [`Executor::run`] hands it to the functions that set up and take apart
/// its store.
#[derive(Clone, Copy)]
struct Job<'a> {
    bin: &'a Binary,
    tenant_uid: u32,
    limits: &'a ExecLimits,
    fuel: Option<u64>,
    deadline: Instant,
    start: Instant,
    /// The configuration snapshot the whole execution uses.
    cfg: &'a Config,
    /// The engine its store is made on ([`WasmEngine::pick`]).
    engine: usize,
}

/// Runs binaries.
#[derive(Debug)]
pub struct Executor {
    engine: Arc<WasmEngine>,
    state: Arc<dyn StateStore>,
    live: Live,
    /// Where every execution is counted.
    metrics: Arc<Metrics>,
}

impl Executor {
    pub fn new(engine: Arc<WasmEngine>, state: Arc<dyn StateStore>, live: Live) -> Self {
        Executor {
            engine,
            state,
            live,
            metrics: Arc::default(),
        }
    }

    /// Count executions in `metrics` (the daemon's), not in a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The limits in force now.
    pub fn limits_config(&self) -> LimitsConfig {
        self.live.load().limits.clone()
    }

    pub fn engine(&self) -> &Arc<WasmEngine> {
        &self.engine
    }

    /// Resolve a request's limits against this executor's configuration.
    pub fn resolve_limits(&self, req: &LimitsRequest) -> Result<ExecLimits> {
        ExecLimits::resolve(req, &self.live.load().limits, self.engine.fuel_metering())
    }

    /// Check an input against the input cap.
    pub fn check_input(&self, input: &[u8]) -> Result<()> {
        let max = self.live.load().limits.max_input_bytes;
        if input.len() > max {
            return Err(Error::TooLarge(format!(
                "input of {} bytes exceeds the limit of {max}",
                input.len()
            )));
        }
        Ok(())
    }

    /// The function of `bin` a request's `function` calls (only Extism plugins have
    /// functions to choose, and one with several needs a choice). Commands call it before
    /// anything runs, so a chain with a bad stage runs nothing.
    pub fn check_function<'a>(
        bin: &'a Binary,
        function: Option<&'a str>,
    ) -> Result<Option<&'a str>> {
        bin.glue()
            .function(function)
            .map_err(|m| Error::bad_request(format!("{}: {m}", bin.display_name())))
    }

    /// Run `bin` once on `input` for `tenant_uid` (whose state namespace it uses); `function`
    /// chooses an Extism plugin's export.
    pub async fn execute(
        &self,
        bin: &Binary,
        function: Option<&str>,
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
    ) -> Result<RunOutput> {
        let deadline = Instant::now() + limits.timeout;
        self.run(
            bin,
            function,
            tenant_uid,
            input,
            limits,
            limits.fuel,
            deadline,
        )
        .await
    }

    /// Run `stages` in order, each stage's output the next one's input, under one deadline
    /// and one fuel budget. A failure names its stage.
    pub async fn chain(
        &self,
        stages: &[Stage],
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
    ) -> Result<ChainOutput> {
        let start = Instant::now();
        let deadline = start + limits.timeout;
        let mut fuel_left = limits.fuel;
        let mut data = input;
        let mut out = ChainOutput::default();
        for (i, stage) in stages.iter().enumerate() {
            let r = self
                .run(
                    &stage.bin,
                    stage.function.as_deref(),
                    tenant_uid,
                    data,
                    limits,
                    fuel_left,
                    deadline,
                )
                .await
                .map_err(|e| with_stage(e, i, &mut out.logs))?;
            if let (Some(left), Some(used)) = (fuel_left.as_mut(), r.stats.fuel_used) {
                *left = left.saturating_sub(used).max(1);
            }
            out.logs.extend(r.logs);
            out.stages.push(r.stats);
            data = r.output;
        }
        out.output = data;
        out.stats = Stats {
            wall_us: start.elapsed().as_micros() as u64,
            fuel_used: sum_opt(out.stages.iter().map(|s| s.fuel_used)),
            memory_peak_bytes: out.stages.iter().filter_map(|s| s.memory_peak_bytes).max(),
        };
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        bin: &Binary,
        function: Option<&str>,
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
        fuel: Option<u64>,
        deadline: Instant,
    ) -> Result<RunOutput> {
        let _running = self.engine.running();
        let start = Instant::now();
        bin.stats.start();
        let timeout_ms = limits.timeout.as_millis() as u64;
        if start >= deadline {
            return Err(Error::exec(ExecFailure::Timeout { timeout_ms }, Vec::new()));
        }
        let function = Self::check_function(bin, function)?;
        // A snapshot for the whole run: a reload mid-execution does not change its limits.
        let cfg = self.live.load_full();
        // The store is set up and taken apart in plain functions: an async function keeps
        // every local whose scope spans an `.await` in its state, and each caller copies
        // that state, so the 700-byte context must never be a local here.
        let job = Job {
            bin,
            tenant_uid,
            limits,
            fuel,
            deadline,
            start,
            cfg: &cfg,
            engine: self.engine.pick(bin.glue().shape()),
        };
        let (mut store, input) = match self.new_store(&job, input) {
            Ok(s) => s,
            Err(e) => {
                self.count(&job, &Stats::default(), Some(e.code()));
                return Err(e);
            }
        };
        // Boxed by the kind: Wasmtime's instantiation and call futures are large, and every
        // async caller above this one would otherwise copy them into its own state at each
        // call (docs/PERFORMANCE.md, "Small futures").
        let run = bin
            .glue_on(job.engine)
            .run(&mut store, Call { input, function });
        // A module that uses WASI may block in a host call (poll_oneoff sleeping), where no
        // epoch check runs: the deadline must also hold outside wasm code.
        let result = if bin.glue().stdio() != Stdio::None {
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(r) => r,
                Err(_) => Err(wasmtime::Error::new(HostTrap::TimedOut)),
            }
        } else {
            run.await
        };
        let (stats, finished) = self.finish(&job, store, result);
        let r = match finished {
            Ok((out, Some(txn))) => commit(out, txn).await,
            Ok((out, None)) => Ok(out),
            Err(e) => Err(e),
        };
        self.count(&job, &stats, r.as_ref().err().map(Error::code));
        r
    }

    /// Count one execution that ran (or failed setting up) in the metrics.
    fn count(&self, job: &Job<'_>, stats: &Stats, outcome: Option<wasmcore_proto::ErrorCode>) {
        let e = Execution {
            kind: job.bin.kind,
            outcome,
            wall: job.start.elapsed(),
            fuel: stats.fuel_used.unwrap_or(0),
            memory_peak: stats.memory_peak_bytes.unwrap_or(0),
        };
        self.metrics.execution(job.tenant_uid, &job.bin.stats, &e);
    }

    /// A fresh store for one execution of `bin`, with its limits, fuel, deadline, and what
    /// its kind needs: a WASI context (stdin holds the input of a command; other kinds get
    /// theirs from the kind's glue) and the Extism block space. Also the input the glue
    /// gets (empty for a command, which reads it from stdin).
    fn new_store(&self, job: &Job<'_>, input: Vec<u8>) -> Result<(Store<ExecCtx>, Vec<u8>)> {
        let Job {
            bin,
            tenant_uid,
            limits,
            fuel,
            deadline,
            cfg,
            ..
        } = *job;
        let ns = Namespace {
            owner: tenant_uid,
            binary: bin.id,
        };
        let lim = &cfg.limits;
        let glue = bin.glue();
        let mut ctx = ExecCtx {
            limiter: Limiter::new(limits.memory_bytes, lim.max_table_elements, glue.shape()),
            memory: None,
            alloc: None,
            output: Vec::new(),
            output_cap: lim.max_output_bytes,
            logs: Logs::new(lim.max_log_bytes),
            state: StateTxn::new(
                self.state.clone(),
                ns,
                cfg.quotas.for_uid(tenant_uid).state_bytes,
            ),
            max_key: cfg.registry.max_state_key_bytes,
            deadline,
            inline: false,
            ticks: 0,
            pipes: None,
            wasi: None,
            p2: None,
            extism: None,
        };
        if glue.uses_blocks() {
            let blocks = Blocks::new();
            if !ctx.limiter.charge(blocks.size() as usize) {
                return Err(Error::exec(
                    ExecFailure::MemoryLimit {
                        limit_mb: (limits.memory_bytes >> 20) as u64,
                    },
                    Vec::new(),
                ));
            }
            ctx.extism = Some(ExtismCtx {
                blocks,
                config: bin.config.load_full(),
            });
        }
        let input = match glue.stdio() {
            Stdio::None => input,
            stdio => {
                let stdout = MemoryOutputPipe::new(lim.max_output_bytes + 1);
                let stderr = MemoryOutputPipe::new(lim.max_log_bytes);
                let mut b = wasmtime_wasi::WasiCtxBuilder::new();
                // A command reads its input from stdin; other kinds get theirs from the
                // glue and an empty stdin.
                let (stdin, input) = match stdio {
                    Stdio::P1 { command: false } => (Vec::new(), input),
                    _ => (input, Vec::new()),
                };
                b.stdin(MemoryInputPipe::new(stdin))
                    .stdout(stdout.clone())
                    .stderr(stderr.clone())
                    .args(&[bin.display_name()]);
                if stdio == Stdio::P2 {
                    ctx.p2 = Some(P2 {
                        ctx: b.build(),
                        table: ResourceTable::new(),
                    });
                } else {
                    ctx.wasi = Some(b.build_p1());
                }
                ctx.pipes = Some(Pipes { stdout, stderr });
                input
            }
        };

        let mut store = Store::new(&self.engine.engines()[job.engine], ctx);
        store.limiter(|c| &mut c.limiter);
        if self.engine.fuel_metering() {
            store
                .set_fuel(fuel.unwrap_or(u64::MAX))
                .map_err(|e| Error::internal(format!("setting fuel: {e}")))?;
        }
        store.set_epoch_deadline(1);
        let tick = self.engine.tick();
        store.epoch_deadline_callback(move |mut cx| {
            let ctx = cx.data_mut();
            if Instant::now() >= ctx.deadline {
                return Err(wasmtime::Error::new(HostTrap::TimedOut));
            }
            if !ctx.inline {
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ));
            }
            // A guest that has run a whole tick holds this thread: the thread's place in
            // the runtime goes to another one.
            ctx.ticks += 1;
            if crate::engine::hand_off_due(ctx.ticks) {
                crate::engine::hand_off_thread(tick);
            }
            Ok(UpdateDeadline::Continue(1))
        });
        Ok((store, input))
    }

    /// Take the store of a finished execution apart: its accounting, and its output and
    /// logs or the failure it ended with, with the plugin-state changes to commit, if any.
    fn finish(
        &self,
        job: &Job<'_>,
        store: Store<ExecCtx>,
        result: wasmtime::Result<Ended>,
    ) -> (Stats, Result<(RunOutput, Option<StateTxn>)>) {
        let Job {
            limits,
            fuel,
            start,
            ..
        } = *job;
        let timeout_ms = limits.timeout.as_millis() as u64;
        let fuel_used = if self.engine.fuel_metering() {
            let initial = fuel.unwrap_or(u64::MAX);
            Some(initial - store.get_fuel().unwrap_or(0))
        } else {
            None
        };
        let mut ctx = store.into_data();
        if let Some(p) = ctx.pipes.take() {
            ctx.logs.push_text(&p.stderr.contents());
            // Where stdout is not the output (a process or Extism plugin that imports
            // WASI), what it printed is logged.
            if job.bin.glue().stdio() == (Stdio::P1 { command: false }) {
                ctx.logs.push_text(&p.stdout.contents());
            }
        }
        let stats = Stats {
            wall_us: start.elapsed().as_micros() as u64,
            fuel_used,
            memory_peak_bytes: Some(ctx.limiter.peak as u64),
        };
        let failure = match result {
            Ok(Ended::Ok) => None,
            Ok(Ended::Code(code)) => Some(ExecFailure::Plugin { code }),
            Ok(Ended::Exit(code)) => Some(ExecFailure::WasiExit { code }),
            Ok(Ended::Extism { code, message }) => Some(ExecFailure::Extism { code, message }),
            Err(e) => Some(classify(e, &ctx, limits, fuel, timeout_ms)),
        };
        if let Some(failure) = failure {
            return (stats, Err(Error::exec(failure, ctx.logs.finish())));
        }
        let out = RunOutput {
            output: std::mem::take(&mut ctx.output),
            logs: ctx.logs.finish(),
            stats,
        };
        let txn = (!ctx.state.is_empty()).then_some(ctx.state);
        (stats, Ok((out, txn)))
    }
}

/// Commit an execution's plugin-state changes; its output only once they are stored.
async fn commit(out: RunOutput, txn: StateTxn) -> Result<RunOutput> {
    // A durable store writes a file: keep that off the async workers.
    let committed = if txn.blocks() {
        tokio::task::spawn_blocking(move || txn.commit())
            .await
            .unwrap_or_else(|e| Err(CommitError::Io(format!("commit task failed: {e}"))))
    } else {
        txn.commit()
    };
    match committed {
        Ok(()) => Ok(out),
        Err(CommitError::Quota(m)) => Err(Error::exec(ExecFailure::StateQuota(m), out.logs)),
        Err(e @ CommitError::Io(_)) => Err(Error::internal(e.to_string())),
    }
}

fn with_stage(e: Error, stage: usize, earlier_logs: &mut Vec<String>) -> Error {
    match e {
        Error::Execution(mut x) => {
            x.stage = Some(stage);
            let mut logs = std::mem::take(earlier_logs);
            logs.append(&mut x.logs);
            x.logs = logs;
            Error::Execution(x)
        }
        other => other,
    }
}

fn sum_opt(it: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    let mut total: Option<u64> = None;
    for v in it.flatten() {
        total = Some(total.unwrap_or(0).saturating_add(v));
    }
    total
}

/// Turn a wasmtime error into the failure the caller sees.
fn classify(
    e: wasmtime::Error,
    ctx: &ExecCtx,
    limits: &ExecLimits,
    fuel: Option<u64>,
    timeout_ms: u64,
) -> ExecFailure {
    if let Some(t) = e.downcast_ref::<HostTrap>() {
        return match t {
            HostTrap::TimedOut => ExecFailure::Timeout { timeout_ms },
            HostTrap::OutputTooLarge(cap) => ExecFailure::OutputTooLarge { cap: *cap },
            HostTrap::StateQuota(m) => ExecFailure::StateQuota(m.clone()),
            HostTrap::BadPointer(m) => ExecFailure::Trap {
                message: m.clone(),
                backtrace: backtrace(&e),
            },
            HostTrap::MemoryLimit => ExecFailure::MemoryLimit {
                limit_mb: (limits.memory_bytes >> 20) as u64,
            },
            // Extism fails a call whose host call errs with that error and code -1.
            HostTrap::Refused(m) => ExecFailure::Extism {
                code: -1,
                message: Some(m.clone()),
            },
        };
    }
    if e.is::<PoolConcurrencyLimitError>() {
        return ExecFailure::PoolExhausted;
    }
    if ctx.limiter.memory_refused {
        return ExecFailure::MemoryLimit {
            limit_mb: (limits.memory_bytes >> 20) as u64,
        };
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        match trap {
            Trap::OutOfFuel => {
                return ExecFailure::OutOfFuel {
                    fuel: fuel.unwrap_or(u64::MAX),
                };
            }
            Trap::Interrupt => return ExecFailure::Timeout { timeout_ms },
            _ => {}
        }
        // Wasmtime's text starts with the "wasm trap: " that our message puts first.
        let text = trap.to_string();
        return ExecFailure::Trap {
            message: text
                .strip_prefix("wasm trap: ")
                .unwrap_or(&text)
                .to_string(),
            backtrace: backtrace(&e),
        };
    }
    // WASI output overflow surfaces as a stream error from the pipe.
    let text = format!("{e:#}");
    if text.contains("beyond capacity of MemoryOutputPipe") {
        return ExecFailure::OutputTooLarge {
            cap: ctx.output_cap,
        };
    }
    ExecFailure::Trap {
        message: text,
        backtrace: backtrace(&e),
    }
}

fn backtrace(e: &wasmtime::Error) -> Vec<String> {
    let Some(bt) = e.downcast_ref::<WasmBacktrace>() else {
        return Vec::new();
    };
    bt.frames()
        .iter()
        .take(MAX_BACKTRACE_FRAMES)
        .map(|f| {
            let name = f
                .func_name()
                .map(str::to_string)
                .unwrap_or_else(|| format!("func[{}]", f.func_index()));
            match f.module_offset() {
                Some(off) => format!("{name} @ 0x{off:x}"),
                None => name,
            }
        })
        .collect()
}
