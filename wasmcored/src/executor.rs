//! One execution: a fresh `Store` with its limits, instantiation from the binary's
//! `InstancePre`, the ABI glue, and the result with its accounting. Also chains.
//!
//! Guests run as async calls on the caller's task: a short guest runs inline with no thread
//! hop; a long one yields to the runtime at every epoch tick, so runaway guests share the
//! workers instead of holding them. Each store has its own absolute deadline; the epoch is
//! never bumped to cancel one call.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use wasmcore_proto::{LimitsRequest, Stats};
use wasmtime::{
    Extern, Memory, PoolConcurrencyLimitError, ResourceLimiter, Store, Trap, TypedFunc,
    UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use crate::abi::{HostTrap, guest_range};
use crate::config::{Config, LimitsConfig, Live};
use crate::engine::WasmEngine;
use crate::error::{Error, ExecFailure, Result};
use crate::registry::{Binary, CheckedFunc};
use crate::state::{CommitError, Namespace, StateStore, StateTxn};
use wasmcore_proto::ModuleKind;

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

/// Log lines of one execution, capped in bytes.
#[derive(Debug, Default)]
pub(crate) struct Logs {
    lines: Vec<String>,
    bytes: usize,
    cap: usize,
    dropped: usize,
}

impl Logs {
    fn new(cap: usize) -> Self {
        Logs {
            cap,
            ..Logs::default()
        }
    }

    pub(crate) fn push(&mut self, line: &[u8]) {
        if self.bytes + line.len() > self.cap {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(String::from_utf8_lossy(line).into_owned());
    }

    fn push_text(&mut self, text: &[u8]) {
        for line in text.split(|b| *b == b'\n') {
            if !line.is_empty() {
                self.push(line);
            }
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines.push(format!(
                "[{} log lines dropped: over the {}-byte limit]",
                self.dropped, self.cap
            ));
        }
        self.lines
    }
}

/// Memory and table limits of one store; records the peak memory size.
#[derive(Debug)]
pub(crate) struct Limiter {
    max_memory: usize,
    max_table: usize,
    peak: usize,
    memory_refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_refused = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_table)
    }

    fn instances(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        1
    }
    fn memories(&self) -> usize {
        1
    }
}

/// The data of one execution's `Store`.
pub struct ExecCtx {
    pub(crate) limiter: Limiter,
    /// The guest's memory, cached after instantiation.
    pub(crate) memory: Option<Memory>,
    /// The guest's `alloc`, for `get_state` to hand values back.
    pub(crate) alloc: Option<TypedFunc<i32, i32>>,
    pub(crate) output: Vec<u8>,
    pub(crate) output_cap: usize,
    pub(crate) logs: Logs,
    pub(crate) state: StateTxn,
    pub(crate) max_key: usize,
    deadline: Instant,
    pub(crate) wasi: Option<WasiP1Ctx>,
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
}

/// Pipes of a WASI context, read after the run.
struct WasiPipes {
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

/// Runs binaries.
#[derive(Debug)]
pub struct Executor {
    engine: Arc<WasmEngine>,
    state: Arc<dyn StateStore>,
    live: Live,
}

impl Executor {
    pub fn new(engine: Arc<WasmEngine>, state: Arc<dyn StateStore>, live: Live) -> Self {
        Executor {
            engine,
            state,
            live,
        }
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

    /// Run `bin` once on `input` for `tenant_uid` (whose state namespace it uses).
    pub async fn execute(
        &self,
        bin: &Binary,
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
    ) -> Result<RunOutput> {
        let deadline = Instant::now() + limits.timeout;
        self.run(bin, tenant_uid, input, limits, limits.fuel, deadline)
            .await
    }

    /// Run `bins` in order, each stage's output the next one's input, under one deadline and
    /// one fuel budget. A failure names its stage.
    pub async fn chain(
        &self,
        bins: &[Arc<Binary>],
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
    ) -> Result<ChainOutput> {
        let start = Instant::now();
        let deadline = start + limits.timeout;
        let mut fuel_left = limits.fuel;
        let mut data = input;
        let mut out = ChainOutput::default();
        for (i, bin) in bins.iter().enumerate() {
            let r = self
                .run(bin, tenant_uid, data, limits, fuel_left, deadline)
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

    async fn run(
        &self,
        bin: &Binary,
        tenant_uid: u32,
        input: Vec<u8>,
        limits: &ExecLimits,
        fuel: Option<u64>,
        deadline: Instant,
    ) -> Result<RunOutput> {
        let _running = self.engine.running();
        let start = Instant::now();
        bin.executions.fetch_add(1, Relaxed);
        let timeout_ms = limits.timeout.as_millis() as u64;
        if start >= deadline {
            return Err(Error::exec(ExecFailure::Timeout { timeout_ms }, Vec::new()));
        }
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
        };
        let (mut store, input, pipes) = self.new_store(&job, input)?;
        // Boxed: Wasmtime's instantiation and call futures are large, and every async
        // caller above this one would otherwise copy them into its own state at each call
        // (docs/PERFORMANCE.md, "Small futures").
        let run = Box::pin(async {
            match bin.kind {
                ModuleKind::Wasi => self.run_wasi(bin, &mut store).await,
                ModuleKind::Process => self.run_process(bin, &mut store, &input).await,
            }
        });
        // A module that imports WASI may block in a host call (poll_oneoff sleeping), where
        // no epoch check runs: the deadline must also hold outside wasm code.
        let result = if bin.needs_wasi {
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(r) => r,
                Err(_) => Err(wasmtime::Error::new(HostTrap::TimedOut)),
            }
        } else {
            run.await
        };
        let (out, txn) = self.finish(&job, store, result, pipes)?;
        if let Some(txn) = txn {
            // A durable store writes a file: keep that off the async workers.
            let committed = if txn.blocks() {
                tokio::task::spawn_blocking(move || txn.commit())
                    .await
                    .unwrap_or_else(|e| Err(CommitError::Io(format!("commit task failed: {e}"))))
            } else {
                txn.commit()
            };
            match committed {
                Ok(()) => {}
                Err(CommitError::Quota(m)) => {
                    return Err(Error::exec(ExecFailure::StateQuota(m), out.logs));
                }
                Err(e @ CommitError::Io(_)) => return Err(Error::internal(e.to_string())),
            }
        }
        Ok(out)
    }

    /// A fresh store for one execution of `bin`, with its limits, fuel, deadline and (for
    /// a module that imports WASI) its WASI context; also the input for `alloc` (empty for
    /// a WASI command, which reads it from stdin) and the WASI pipes to read afterwards.
    fn new_store(
        &self,
        job: &Job<'_>,
        input: Vec<u8>,
    ) -> Result<(Store<ExecCtx>, Vec<u8>, Option<WasiPipes>)> {
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
        let mut ctx = ExecCtx {
            limiter: Limiter {
                max_memory: limits.memory_bytes,
                max_table: lim.max_table_elements,
                peak: 0,
                memory_refused: false,
            },
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
            wasi: None,
        };
        let (input, pipes) = if bin.needs_wasi {
            let stdout = MemoryOutputPipe::new(lim.max_output_bytes + 1);
            let stderr = MemoryOutputPipe::new(lim.max_log_bytes);
            let mut b = wasmtime_wasi::WasiCtxBuilder::new();
            // A WASI command reads its input from stdin; a process-mode module that happens
            // to import WASI gets its input through `alloc` and an empty stdin.
            let (stdin, input) = match bin.kind {
                ModuleKind::Wasi => (input, Vec::new()),
                ModuleKind::Process => (Vec::new(), input),
            };
            b.stdin(MemoryInputPipe::new(stdin))
                .stdout(stdout.clone())
                .stderr(stderr.clone())
                .args(&[bin.display_name()]);
            ctx.wasi = Some(b.build_p1());
            (input, Some(WasiPipes { stdout, stderr }))
        } else {
            (input, None)
        };

        let mut store = Store::new(self.engine.engine(), ctx);
        store.limiter(|c| &mut c.limiter);
        if self.engine.fuel_metering() {
            store
                .set_fuel(fuel.unwrap_or(u64::MAX))
                .map_err(|e| Error::internal(format!("setting fuel: {e}")))?;
        }
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|cx| {
            if Instant::now() >= cx.data().deadline {
                Err(wasmtime::Error::new(HostTrap::TimedOut))
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        Ok((store, input, pipes))
    }

    /// Take the store of a finished execution apart: its output, logs and accounting, or
    /// the failure it ended with; and the plugin-state changes to commit, if any.
    fn finish(
        &self,
        job: &Job<'_>,
        store: Store<ExecCtx>,
        result: wasmtime::Result<i32>,
        pipes: Option<WasiPipes>,
    ) -> Result<(RunOutput, Option<StateTxn>)> {
        let Job {
            bin,
            limits,
            fuel,
            start,
            cfg,
            ..
        } = *job;
        let lim = &cfg.limits;
        let timeout_ms = limits.timeout.as_millis() as u64;
        let fuel_used = if self.engine.fuel_metering() {
            let initial = fuel.unwrap_or(u64::MAX);
            Some(initial - store.get_fuel().unwrap_or(0))
        } else {
            None
        };
        let mut ctx = store.into_data();
        if let Some(p) = &pipes {
            let err = p.stderr.contents();
            ctx.logs.push_text(&err);
        }
        let stats = Stats {
            wall_us: start.elapsed().as_micros() as u64,
            fuel_used,
            memory_peak_bytes: Some(ctx.limiter.peak as u64),
        };
        let exit_code = match result {
            Ok(code) => code,
            Err(e) => {
                // An exit status is a normal end for a WASI command.
                if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                    *code
                } else {
                    let failure = classify(e, &ctx, limits, fuel, timeout_ms);
                    return Err(Error::exec(failure, ctx.logs.finish()));
                }
            }
        };
        let output = match &pipes {
            Some(p) if bin.kind == ModuleKind::Wasi => {
                let out = p.stdout.contents();
                if out.len() > lim.max_output_bytes {
                    let failure = ExecFailure::OutputTooLarge {
                        cap: lim.max_output_bytes,
                    };
                    return Err(Error::exec(failure, ctx.logs.finish()));
                }
                out.to_vec()
            }
            Some(p) => {
                // A process-mode module's WASI stdout is treated as log output.
                let out = p.stdout.contents();
                ctx.logs.push_text(&out);
                std::mem::take(&mut ctx.output)
            }
            None => std::mem::take(&mut ctx.output),
        };
        if exit_code != 0 {
            let failure = match bin.kind {
                ModuleKind::Wasi => ExecFailure::WasiExit { code: exit_code },
                ModuleKind::Process => ExecFailure::Plugin { code: exit_code },
            };
            return Err(Error::exec(failure, ctx.logs.finish()));
        }
        let out = RunOutput {
            output,
            logs: ctx.logs.finish(),
            stats,
        };
        let txn = (!ctx.state.is_empty()).then_some(ctx.state);
        Ok((out, txn))
    }

    /// Process ABI: `alloc(len)`, copy the input, `process(ptr, len)`; returns its code.
    async fn run_process(
        &self,
        bin: &Binary,
        store: &mut Store<ExecCtx>,
        input: &[u8],
    ) -> wasmtime::Result<i32> {
        let instance = bin.pre.instantiate_async(&mut *store).await?;
        let exports = &bin.exports;
        let memory = match exports
            .memory
            .as_ref()
            .and_then(|e| instance.get_module_export(&mut *store, e))
        {
            Some(Extern::Memory(m)) => m,
            _ => return Err(wasmtime::Error::msg("module has no `memory` export")),
        };
        let alloc = typed_export(store, &instance, exports.alloc.as_ref(), "alloc")?;
        let process = typed_export(store, &instance, exports.process.as_ref(), "process")?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc.clone());

        let len =
            i32::try_from(input.len()).map_err(|_| wasmtime::Error::msg("input too large"))?;
        let ptr = alloc.call_async(&mut *store, len).await?;
        let size = memory.data_size(&*store);
        let r = guest_range("alloc (returned pointer)", ptr, len, size)?;
        memory.data_mut(&mut *store)[r].copy_from_slice(input);
        process.call_async(&mut *store, (ptr, len)).await
    }

    /// WASI command: call `_start`; an `I32Exit` carries the status.
    async fn run_wasi(&self, bin: &Binary, store: &mut Store<ExecCtx>) -> wasmtime::Result<i32> {
        let instance = bin.pre.instantiate_async(&mut *store).await?;
        if let Some(Extern::Memory(m)) = bin
            .exports
            .memory
            .as_ref()
            .and_then(|e| instance.get_module_export(&mut *store, e))
        {
            store.data_mut().memory = Some(m);
        }
        if let Ok(alloc) = typed_export(store, &instance, bin.exports.alloc.as_ref(), "alloc") {
            store.data_mut().alloc = Some(alloc);
        }
        let start = typed_export(store, &instance, bin.exports.start.as_ref(), "_start")?;
        start.call_async(&mut *store, ()).await?;
        Ok(0)
    }
}

impl std::fmt::Debug for ExecCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecCtx").finish_non_exhaustive()
    }
}

fn typed_export<P, R>(
    store: &mut Store<ExecCtx>,
    instance: &wasmtime::Instance,
    export: Option<&CheckedFunc<P, R>>,
    name: &str,
) -> wasmtime::Result<TypedFunc<P, R>>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    export
        .and_then(|e| crate::sys::checked_typed_func(store, instance, e))
        .ok_or_else(|| wasmtime::Error::msg(format!("module has no `{name}` function export")))
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
        return ExecFailure::Trap {
            message: trap.to_string(),
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
