//! Kind `extism`: plugins built with Extism's PDKs, run unmodified, with the
//! `extism:host/env` functions implemented natively (no Extism runtime, no kernel module).
//!
//! A call follows Extism's runtime (`raw_call` in extism/extism): the block space is reset,
//! the input copied into a block and set as the input; the guest's runtime initialiser
//! (`__wasm_call_ctors`, `_initialize`, or Haskell's `hs_init`) runs; then the chosen export,
//! `() -> i32` or `() -> ()`. Afterwards a set error fails the call with that block's
//! message (empty when the block was freed), even when the function returned 0; a non-zero
//! return code fails it with that code; otherwise the output block is the output.
//!
//! `var_get`/`var_set` use the plugin state of (tenant, binary) that `get_state`/`set_state`
//! use, persisted and under the same quota. `config_get` reads the binary's configuration.
//! `http_request` is refused as Extism refuses a host that no allowed host matches.
//! Every execution is a fresh instance: see docs/PLUGIN_ABI.md for what that means for a
//! plugin's globals.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmcore_proto::ModuleKind;
use wasmtime::{Caller, ExternType, InstancePre, Linker, Module, ModuleExport, Store, ValType};

use super::{Call, Ended, Kind, Linkers, PrepareError, RunFuture, Stdio};
use crate::blocks::{Blocks, Fault};
use crate::context::{ExecCtx, ExtismCtx, HostTrap, trap};
use crate::sys::CheckedFunc;

/// The import module of Extism's host functions and kernel.
pub const ENV_MODULE: &str = "extism:host/env";

/// Every function of [`ENV_MODULE`] that wasm-core defines.
pub const FUNCTIONS: &[&str] = &[
    "alloc",
    "free",
    "length",
    "length_unsafe",
    "load_u8",
    "load_u64",
    "store_u8",
    "store_u64",
    "input_length",
    "input_offset",
    "input_load_u8",
    "input_load_u64",
    "input_set",
    "output_set",
    "output_length",
    "output_offset",
    "error_set",
    "error_get",
    "memory_bytes",
    "reset",
    "config_get",
    "var_get",
    "var_set",
    "http_request",
    "http_status_code",
    "http_headers",
    "log_warn",
    "log_info",
    "log_debug",
    "log_error",
    "log_trace",
    "get_log_level",
];

/// Exports that initialise a guest's runtime: never called as plugin functions.
const INITIALISERS: &[&str] = &["_initialize", "__wasm_call_ctors", "hs_init", "_start"];

/// The log level `get_log_level` reports: info (Extism's numbering, trace = 0 … error = 4).
/// Lines logged at any level are kept; this only spares plugins formatting debug lines.
const LOG_LEVEL: i32 = 2;

/// Whether `module` imports anything from Extism's host module.
pub fn imports_kernel(module: &Module) -> bool {
    module.imports().any(|i| i.module() == ENV_MODULE)
}

/// Whether `module` exports a function `() -> i32`, the shape of every PDK's plugin
/// functions (how a plugin that imports nothing from Extism is recognised).
pub fn exports_plugin_function(module: &Module) -> bool {
    module.exports().any(|e| match e.ty() {
        ExternType::Func(f) => {
            f.params().len() == 0
                && f.results().len() == 1
                && matches!(f.results().next(), Some(ValType::I32))
        }
        _ => false,
    })
}

/// The exports a caller may call: functions `() -> i32` or `() -> ()`, less the runtime
/// initialisers.
pub fn callable_functions(module: &Module) -> Vec<String> {
    module
        .exports()
        .filter(|e| !INITIALISERS.contains(&e.name()))
        .filter(|e| match e.ty() {
            ExternType::Func(f) => {
                f.params().len() == 0
                    && (f.results().len() == 0
                        || (f.results().len() == 1
                            && matches!(f.results().next(), Some(ValType::I32))))
            }
            _ => false,
        })
        .map(|e| e.name().to_string())
        .collect()
}

/// One callable export.
enum Func {
    Code(CheckedFunc<(), i32>),
    Unit(CheckedFunc<(), ()>),
}

/// How a guest's runtime is initialised before each call (Extism's `detect_guest_runtime`).
enum Init {
    None,
    /// `__wasm_call_ctors` or `_initialize`.
    Wasi(CheckedFunc<(), ()>),
    /// Haskell: `_initialize` if present, then `hs_init(0, 0)`.
    Haskell(Option<CheckedFunc<(), ()>>, ModuleExport),
}

/// An Extism plugin, prepared.
pub struct Plugin {
    pre: InstancePre<ExecCtx>,
    names: Vec<String>,
    funcs: BTreeMap<String, Func>,
    init: Init,
    wasi: bool,
}

pub fn prepare(linkers: &Linkers, module: &Module) -> Result<Arc<dyn Kind>, PrepareError> {
    let names = callable_functions(module);
    if names.is_empty() {
        return Err(
            "Extism plugin: it exports no function `() -> i32` or `() -> ()` to call".into(),
        );
    }
    let funcs = names
        .iter()
        .map(|n| {
            let f = match CheckedFunc::verified(module, n) {
                Some(f) => Func::Code(f),
                None => Func::Unit(
                    CheckedFunc::verified(module, n).expect("checked by callable_functions"),
                ),
            };
            (n.clone(), f)
        })
        .collect();
    let init = if let Some(ExternType::Func(_)) = module.get_export("hs_init") {
        let hs = module
            .get_export_index("hs_init")
            .expect("the export exists");
        Init::Haskell(CheckedFunc::verified(module, "_initialize"), hs)
    } else if let Some(f) = CheckedFunc::verified(module, "__wasm_call_ctors") {
        Init::Wasi(f)
    } else if let Some(f) = CheckedFunc::verified(module, "_initialize") {
        Init::Wasi(f)
    } else {
        Init::None
    };
    Ok(Arc::new(Plugin {
        pre: super::instantiate_pre(linkers, module, false)?,
        names,
        funcs,
        init,
        wasi: super::wasi::imports_wasi(module),
    }))
}

impl Kind for Plugin {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Extism
    }

    fn stdio(&self) -> Stdio {
        if self.wasi {
            Stdio::P1 { command: false }
        } else {
            Stdio::None
        }
    }

    fn functions(&self) -> &[String] {
        &self.names
    }

    fn uses_blocks(&self) -> bool {
        true
    }

    fn function<'a>(&'a self, asked: Option<&'a str>) -> Result<Option<&'a str>, String> {
        match asked {
            Some(f) if self.funcs.contains_key(f) => Ok(Some(f)),
            Some(f) => Err(format!(
                "the plugin has no function {f:?}; it has: {}",
                self.names.join(", ")
            )),
            None if self.names.len() == 1 => Ok(Some(&self.names[0])),
            None => Err(format!(
                "the plugin has several functions; choose one with `function` (CLI: --function, chains: BINARY:FUNCTION): {}",
                self.names.join(", ")
            )),
        }
    }

    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, call: Call<'a>) -> RunFuture<'a> {
        Box::pin(async move {
            let name = call
                .function
                .or_else(|| self.names.first().map(String::as_str))
                .unwrap_or_default();
            let func = self
                .funcs
                .get(name)
                .ok_or_else(|| wasmtime::Error::msg(format!("Function not found: {name}")))?;
            set_input(store.data_mut(), &call.input)?;
            let instance = self.pre.instantiate_async(&mut *store).await?;
            match &self.init {
                Init::None => {}
                Init::Wasi(f) => {
                    super::typed(store, &instance, f, "initialiser")?
                        .call_async(&mut *store, ())
                        .await?
                }
                Init::Haskell(reactor, hs) => {
                    if let Some(r) = reactor {
                        super::typed(store, &instance, r, "_initialize")?
                            .call_async(&mut *store, ())
                            .await?;
                    }
                    if let Some(wasmtime::Extern::Func(f)) =
                        instance.get_module_export(&mut *store, hs)
                    {
                        let ty = f.ty(&*store);
                        let mut results: Vec<wasmtime::Val> =
                            ty.results().map(|_| wasmtime::Val::I32(0)).collect();
                        let params: Vec<wasmtime::Val> =
                            ty.params().map(|_| wasmtime::Val::I32(0)).collect();
                        f.call_async(&mut *store, &params, &mut results).await?;
                    }
                }
            }
            let returned = match func {
                Func::Code(f) => {
                    let f = super::typed(store, &instance, f, name)?;
                    f.call_async(&mut *store, ()).await
                }
                Func::Unit(f) => {
                    let f = super::typed(store, &instance, f, name)?;
                    f.call_async(&mut *store, ()).await.map(|()| 0)
                }
            };
            // A WASI exit is a return with that code.
            let code = match returned {
                Ok(c) => c,
                Err(e) => super::wasi::exit_status(Err(e))?,
            };
            finish(store.data_mut(), code)
        })
    }
}

/// Reset the block space and put the input in a block, as Extism's `set_input` does.
fn set_input(ctx: &mut ExecCtx, input: &[u8]) -> wasmtime::Result<()> {
    let (x, limiter) = extism_and_limiter(ctx, "input")?;
    x.blocks.reset();
    let h = x
        .blocks
        .put_block(input, |bytes| limiter.charge(bytes as usize))
        .map_err(|f| fault("input", f))?;
    x.blocks.input_set(h, input.len() as u64);
    Ok(())
}

/// Read the error and output of a finished call (Extism's `get_output_after_call`).
fn finish(ctx: &mut ExecCtx, code: i32) -> wasmtime::Result<Ended> {
    let cap = ctx.output_cap;
    let (x, _) = extism_and_limiter(ctx, "output")?;
    let b = &x.blocks;
    let err = b.error_get();
    // Any error handle fails the call, also one whose block was freed since (Extism's
    // runtime then reports an empty message).
    if err != 0 {
        let err_len = b.length(err).map_err(|f| fault("error_get", f))?;
        let bytes = b.bytes(err, err_len).map_err(|f| fault("error_get", f))?;
        // Extism hands the bytes over as they are; JSON needs text, so bytes that are not
        // UTF-8 become replacement characters.
        let message = String::from_utf8_lossy(&bytes).into_owned();
        return Ok(Ended::Extism {
            code,
            message: Some(message),
        });
    }
    if code != 0 {
        return Ok(Ended::Extism {
            code,
            message: None,
        });
    }
    let len = b.output_length();
    if len > cap as u64 {
        return Err(trap(HostTrap::OutputTooLarge(cap)));
    }
    let output = b
        .bytes(b.output_offset(), len)
        .map_err(|f| fault("output", f))?
        .into_owned();
    ctx.output = output;
    Ok(Ended::Ok)
}

fn extism_and_limiter<'a>(
    ctx: &'a mut ExecCtx,
    func: &str,
) -> wasmtime::Result<(&'a mut ExtismCtx, &'a mut crate::context::Limiter)> {
    match ctx.extism.as_mut() {
        Some(x) => Ok((x, &mut ctx.limiter)),
        None => Err(trap(HostTrap::BadPointer(format!(
            "{ENV_MODULE}.{func}: no Extism block space in this execution"
        )))),
    }
}

fn fault(func: &str, f: Fault) -> wasmtime::Error {
    match f {
        Fault::NoMemory => trap(HostTrap::MemoryLimit),
        Fault::OutOfBounds => trap(HostTrap::BadPointer(format!(
            "{ENV_MODULE}.{func}: out of bounds memory access"
        ))),
    }
}

/// An Extism host call's own error: the call fails with this message, as under Extism.
fn refused(msg: String) -> wasmtime::Error {
    trap(HostTrap::Refused(msg))
}

type C<'a> = Caller<'a, ExecCtx>;

fn blocks<'a>(c: &'a mut C<'_>, func: &str) -> wasmtime::Result<&'a mut Blocks> {
    Ok(&mut extism_and_limiter(c.data_mut(), func)?.0.blocks)
}

/// Run a kernel function `func` on the block space; a fault becomes its trap.
fn kernel<T>(
    c: &mut C<'_>,
    func: &str,
    f: impl FnOnce(&mut Blocks) -> Result<T, Fault>,
) -> wasmtime::Result<T> {
    f(blocks(c, func)?).map_err(|e| fault(func, e))
}

/// The block behind handle `h` as a string, as Extism's `memory_handle` + `memory_str`
/// read a key or a message: 0 is the empty string; an unknown handle is `what`'s error.
fn handle_str(c: &mut C<'_>, func: &str, h: i64, what: &str) -> wasmtime::Result<String> {
    let b = blocks(c, func)?;
    let bytes = b
        .block(h as u64)
        .map_err(|f| fault(func, f))?
        .ok_or_else(|| refused(format!("invalid handle offset for {what}: {}", h as u64)))?;
    std::str::from_utf8(&bytes)
        .map(str::to_string)
        .map_err(|e| refused(e.to_string()))
}

/// Put `data` in a new block and return its handle (0 for no data).
fn new_block(c: &mut C<'_>, func: &str, data: &[u8]) -> wasmtime::Result<i64> {
    let (x, limiter) = extism_and_limiter(c.data_mut(), func)?;
    x.blocks
        .put_block(data, |bytes| limiter.charge(bytes as usize))
        .map(|h| h as i64)
        .map_err(|f| fault(func, f))
}

fn free(c: &mut C<'_>, func: &str, h: i64) -> wasmtime::Result<()> {
    blocks(c, func)?.free(h as u64).map_err(|f| fault(func, f))
}

fn log_line(c: &mut C<'_>, func: &str, level: &str, h: i64) -> wasmtime::Result<()> {
    let b = blocks(c, func)?;
    let bytes = b
        .block(h as u64)
        .map_err(|f| fault(func, f))?
        .ok_or_else(|| {
            refused(format!(
                "invalid handle offset for log message: {}",
                h as u64
            ))
        })?;
    let mut line = Vec::with_capacity(level.len() + 2 + bytes.len());
    line.extend_from_slice(level.as_bytes());
    line.extend_from_slice(b": ");
    line.extend_from_slice(&bytes);
    c.data_mut().logs.push(&line);
    free(c, func, h)
}

/// Define the `extism:host/env` functions in `linker`.
pub fn add_to_linker(linker: &mut Linker<ExecCtx>) -> wasmtime::Result<()> {
    let m = ENV_MODULE;
    linker.func_wrap(
        m,
        "alloc",
        |mut c: C<'_>, n: i64| -> wasmtime::Result<i64> {
            let (x, limiter) = extism_and_limiter(c.data_mut(), "alloc")?;
            x.blocks
                .alloc(n as u64, |bytes| limiter.charge(bytes as usize))
                .map(|h| h as i64)
                .map_err(|f| fault("alloc", f))
        },
    )?;
    linker.func_wrap(m, "free", |mut c: C<'_>, h: i64| free(&mut c, "free", h))?;
    linker.func_wrap(m, "length", |mut c: C<'_>, h: i64| {
        kernel(&mut c, "length", |b| b.length(h as u64)).map(|n| n as i64)
    })?;
    linker.func_wrap(m, "length_unsafe", |mut c: C<'_>, h: i64| {
        kernel(&mut c, "length_unsafe", |b| b.length_unsafe(h as u64)).map(|n| n as i64)
    })?;
    linker.func_wrap(m, "load_u8", |mut c: C<'_>, p: i64| {
        kernel(&mut c, "load_u8", |b| b.load_u8(p as u64)).map(i32::from)
    })?;
    linker.func_wrap(m, "load_u64", |mut c: C<'_>, p: i64| {
        kernel(&mut c, "load_u64", |b| b.load_u64(p as u64)).map(|v| v as i64)
    })?;
    linker.func_wrap(m, "store_u8", |mut c: C<'_>, p: i64, v: i32| {
        kernel(&mut c, "store_u8", |b| b.store_u8(p as u64, v as u8))
    })?;
    linker.func_wrap(m, "store_u64", |mut c: C<'_>, p: i64, v: i64| {
        kernel(&mut c, "store_u64", |b| b.store_u64(p as u64, v as u64))
    })?;
    linker.func_wrap(m, "input_length", |mut c: C<'_>| {
        kernel(&mut c, "input_length", |b| Ok(b.input_length() as i64))
    })?;
    linker.func_wrap(m, "input_offset", |mut c: C<'_>| {
        kernel(&mut c, "input_offset", |b| Ok(b.input_offset() as i64))
    })?;
    linker.func_wrap(m, "input_load_u8", |mut c: C<'_>, o: i64| {
        kernel(&mut c, "input_load_u8", |b| b.input_load_u8(o as u64)).map(i32::from)
    })?;
    linker.func_wrap(m, "input_load_u64", |mut c: C<'_>, o: i64| {
        kernel(&mut c, "input_load_u64", |b| b.input_load_u64(o as u64)).map(|v| v as i64)
    })?;
    linker.func_wrap(m, "input_set", |mut c: C<'_>, h: i64, n: i64| {
        blocks(&mut c, "input_set")?.input_set(h as u64, n as u64);
        Ok(())
    })?;
    linker.func_wrap(m, "output_set", |mut c: C<'_>, h: i64, n: i64| {
        blocks(&mut c, "output_set")?.output_set(h as u64, n as u64);
        Ok(())
    })?;
    linker.func_wrap(m, "output_length", |mut c: C<'_>| {
        kernel(&mut c, "output_length", |b| Ok(b.output_length() as i64))
    })?;
    linker.func_wrap(m, "output_offset", |mut c: C<'_>| {
        kernel(&mut c, "output_offset", |b| Ok(b.output_offset() as i64))
    })?;
    linker.func_wrap(m, "error_set", |mut c: C<'_>, h: i64| {
        blocks(&mut c, "error_set")?.error_set(h as u64);
        Ok(())
    })?;
    linker.func_wrap(m, "error_get", |mut c: C<'_>| {
        kernel(&mut c, "error_get", |b| Ok(b.error_get() as i64))
    })?;
    linker.func_wrap(m, "memory_bytes", |mut c: C<'_>| {
        kernel(&mut c, "memory_bytes", |b| Ok(b.memory_bytes() as i64))
    })?;
    linker.func_wrap(m, "reset", |mut c: C<'_>| {
        blocks(&mut c, "reset")?.reset();
        Ok(())
    })?;
    linker.func_wrap(m, "config_get", |mut c: C<'_>, k: i64| {
        let key = handle_str(&mut c, "config_get", k, "config key")?;
        free(&mut c, "config_get", k)?;
        let config = extism_and_limiter(c.data_mut(), "config_get")?
            .0
            .config
            .clone();
        match config.get(&key) {
            Some(v) => new_block(&mut c, "config_get", v.as_bytes()),
            None => Ok(0),
        }
    })?;
    linker.func_wrap(m, "var_get", |mut c: C<'_>, k: i64| {
        let key = handle_str(&mut c, "var_get", k, "var key")?;
        crate::kinds::process::check_key("var_get", key.as_bytes(), c.data().max_key)?;
        let value = c.data().state.get(key.as_bytes());
        free(&mut c, "var_get", k)?;
        match value {
            Some(v) => new_block(&mut c, "var_get", &v),
            None => Ok(0),
        }
    })?;
    linker.func_wrap(m, "var_set", |mut c: C<'_>, k: i64, v: i64| {
        let key = handle_str(&mut c, "var_set", k, "var key")?;
        crate::kinds::process::check_key("var_set", key.as_bytes(), c.data().max_key)?;
        // A zero value handle deletes the var.
        let value = if v == 0 {
            None
        } else {
            let b = blocks(&mut c, "var_set")?;
            let bytes = b
                .block(v as u64)
                .map_err(|f| fault("var_set", f))?
                .ok_or_else(|| {
                    refused(format!("invalid handle offset for var value: {}", v as u64))
                })?;
            Some(bytes.to_vec())
        };
        c.data_mut()
            .state
            .set(key.as_bytes(), value.as_deref())
            .map_err(|m| trap(HostTrap::StateQuota(m)))?;
        if v != 0 {
            free(&mut c, "var_set", v)?;
        }
        free(&mut c, "var_set", k)
    })?;
    linker.func_wrap(
        m,
        "http_request",
        |mut c: C<'_>, req: i64, _body: i64| -> wasmtime::Result<i64> {
            let b = blocks(&mut c, "http_request")?;
            let bytes = b
                .block(req as u64)
                .map_err(|f| fault("http_request", f))?
                .ok_or_else(|| {
                    refused(format!(
                        "invalid handle offset for http request: {}",
                        req as u64
                    ))
                })?;
            #[derive(serde::Deserialize)]
            struct HttpRequest {
                url: String,
            }
            let r: HttpRequest =
                serde_json::from_slice(&bytes).map_err(|e| refused(e.to_string()))?;
            free(&mut c, "http_request", req)?;
            // Plugins have no network: every host is outside the allowed ones.
            Err(refused(format!("HTTP request to {} is not allowed", r.url)))
        },
    )?;
    linker.func_wrap(m, "http_status_code", |_: C<'_>| -> i32 { 0 })?;
    linker.func_wrap(m, "http_headers", |_: C<'_>| -> i64 { 0 })?;
    for (name, level) in [
        ("log_warn", "warn"),
        ("log_info", "info"),
        ("log_debug", "debug"),
        ("log_error", "error"),
        ("log_trace", "trace"),
    ] {
        linker.func_wrap(m, name, move |mut c: C<'_>, h: i64| {
            log_line(&mut c, name, level, h)
        })?;
    }
    linker.func_wrap(m, "get_log_level", |_: C<'_>| -> i32 { LOG_LEVEL })?;
    Ok(())
}
