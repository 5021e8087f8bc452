//! Kind `process`: plugin ABI v1 (docs/PLUGIN_ABI.md), and the `host` import module that
//! every core module may use.
//!
//! The module exports `memory`, `alloc(len) -> ptr` and `process(ptr, len) -> code`; the
//! input is copied into what `alloc` returned. Host functions: `log`, `output`,
//! `get_state`, `set_state` with the seed's signatures, plus `delete_state`. Every pointer
//! and length from the guest is checked against its linear memory; a bad one traps that
//! execution with a [`HostTrap`] and never touches the host.

use std::sync::Arc;

use wasmcore_proto::ModuleKind;
use wasmtime::{Caller, Extern, InstancePre, Linker, Memory, Module, ModuleExport, Store};

use super::{Call, Ended, Kind, Linkers, PrepareError, RunFuture, Stdio};
use crate::context::{ExecCtx, HostTrap, guest_range, trap};
use crate::sys::CheckedFunc;

/// The import module name of the host functions.
pub const HOST_MODULE: &str = "host";
/// The functions of [`HOST_MODULE`].
pub const FUNCTIONS: &[&str] = &["log", "output", "get_state", "set_state", "delete_state"];
/// The export that makes a module a process-ABI plugin.
pub const PROCESS: &str = "process";

/// A process-ABI plugin, prepared.
pub struct Process {
    pre: InstancePre<ExecCtx>,
    memory: ModuleExport,
    alloc: CheckedFunc<i32, i32>,
    process: CheckedFunc<(i32, i32), i32>,
    wasi: bool,
}

pub fn prepare(linkers: &Linkers, module: &Module) -> Result<Arc<dyn Kind>, PrepareError> {
    let bad = |m: &str| Err(format!("process ABI: {m}"));
    let Some(process) = CheckedFunc::verified(module, PROCESS) else {
        return bad("`process` must be a function (i32, i32) -> i32");
    };
    let Some(alloc) = CheckedFunc::verified(module, "alloc") else {
        return match module.get_export("alloc") {
            Some(_) => bad("`alloc` must be a function (i32) -> i32"),
            None => bad("the module exports `process` but no `alloc` function"),
        };
    };
    let memory = match module.get_export("memory") {
        Some(wasmtime::ExternType::Memory(_)) => module.get_export_index("memory"),
        _ => None,
    };
    let Some(memory) = memory else {
        return bad("the module exports no `memory`");
    };
    Ok(Arc::new(Process {
        pre: super::instantiate_pre(linkers, module)?,
        memory,
        alloc,
        process,
        wasi: super::wasi::imports_wasi(module),
    }))
}

impl Kind for Process {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Process
    }

    fn stdio(&self) -> Stdio {
        if self.wasi {
            Stdio::P1 { command: false }
        } else {
            Stdio::None
        }
    }

    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, call: Call<'a>) -> RunFuture<'a> {
        Box::pin(async move {
            let instance = self.pre.instantiate_async(&mut *store).await?;
            let Some(Extern::Memory(memory)) =
                instance.get_module_export(&mut *store, &self.memory)
            else {
                return Err(wasmtime::Error::msg("module has no `memory` export"));
            };
            let alloc = super::typed(store, &instance, &self.alloc, "alloc")?;
            let process = super::typed(store, &instance, &self.process, PROCESS)?;
            store.data_mut().memory = Some(memory);
            store.data_mut().alloc = Some(alloc.clone());
            let input = &call.input;
            let len =
                i32::try_from(input.len()).map_err(|_| wasmtime::Error::msg("input too large"))?;
            let ptr = alloc.call_async(&mut *store, len).await?;
            let size = memory.data_size(&*store);
            let r = guest_range("alloc (returned pointer)", ptr, len, size)?;
            memory.data_mut(&mut *store)[r].copy_from_slice(input);
            match process.call_async(&mut *store, (ptr, len)).await? {
                0 => Ok(Ended::Ok),
                code => Ok(Ended::Code(code)),
            }
        })
    }
}

/// The guest's linear memory: the cached export, or (during instantiation, before the
/// executor cached it) a lookup by name.
fn memory(caller: &mut Caller<'_, ExecCtx>, func: &str) -> wasmtime::Result<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: the module exports no `memory`"
        )))),
    }
}

fn read_guest(
    caller: &mut Caller<'_, ExecCtx>,
    func: &str,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller, func)?;
    let data = mem.data(&*caller);
    let r = guest_range(func, ptr, len, data.len())?;
    Ok(data[r].to_vec())
}

/// Longest state key a guest may use; longer keys trap.
pub(crate) fn check_key(func: &str, key: &[u8], max: usize) -> wasmtime::Result<()> {
    if key.len() > max {
        return Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: key of {} bytes exceeds the limit of {max}",
            key.len()
        ))));
    }
    Ok(())
}

/// Define the `host` functions in `linker`.
pub fn add_to_linker(linker: &mut Linker<ExecCtx>) -> wasmtime::Result<()> {
    linker.func_wrap(
        HOST_MODULE,
        "log",
        |mut caller: Caller<'_, ExecCtx>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller, "log")?;
            let (data, ctx) = mem.data_and_store_mut(&mut caller);
            let r = guest_range("log", ptr, len, data.len())?;
            ctx.logs.push(&data[r]);
            Ok(())
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "output",
        |mut caller: Caller<'_, ExecCtx>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller, "output")?;
            let (data, ctx) = mem.data_and_store_mut(&mut caller);
            let r = guest_range("output", ptr, len, data.len())?;
            if ctx.output.len() + r.len() > ctx.output_cap {
                return Err(trap(HostTrap::OutputTooLarge(ctx.output_cap)));
            }
            ctx.output.extend_from_slice(&data[r]);
            Ok(())
        },
    )?;
    linker.func_wrap_async(
        HOST_MODULE,
        "get_state",
        |mut caller: Caller<'_, ExecCtx>, (kptr, klen): (i32, i32)| {
            Box::new(async move {
                let key = read_guest(&mut caller, "get_state", kptr, klen)?;
                check_key("get_state", &key, caller.data().max_key)?;
                let Some(value) = caller.data().state.get(&key) else {
                    return Ok(-1);
                };
                let total = i32::try_from(4 + value.len()).map_err(|_| {
                    trap(HostTrap::BadPointer(
                        "host.get_state: value too large".into(),
                    ))
                })?;
                let Some(alloc) = caller.data().alloc.clone() else {
                    return Err(trap(HostTrap::BadPointer(
                        "host.get_state: the module exports no `alloc` to receive the value".into(),
                    )));
                };
                let ptr = alloc.call_async(&mut caller, total).await?;
                let mem = memory(&mut caller, "get_state")?;
                let data = mem.data_mut(&mut caller);
                let r = guest_range(
                    "get_state (pointer returned by alloc)",
                    ptr,
                    total,
                    data.len(),
                )?;
                let dst = &mut data[r];
                dst[..4].copy_from_slice(&(value.len() as u32).to_le_bytes());
                dst[4..].copy_from_slice(&value);
                Ok(ptr)
            })
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "set_state",
        |mut caller: Caller<'_, ExecCtx>,
         kptr: i32,
         klen: i32,
         vptr: i32,
         vlen: i32|
         -> wasmtime::Result<()> {
            let key = read_guest(&mut caller, "set_state", kptr, klen)?;
            check_key("set_state", &key, caller.data().max_key)?;
            let value = read_guest(&mut caller, "set_state", vptr, vlen)?;
            caller
                .data_mut()
                .state
                .set(&key, Some(&value))
                .map_err(|m| trap(HostTrap::StateQuota(m)))
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "delete_state",
        |mut caller: Caller<'_, ExecCtx>, kptr: i32, klen: i32| -> wasmtime::Result<()> {
            let key = read_guest(&mut caller, "delete_state", kptr, klen)?;
            check_key("delete_state", &key, caller.data().max_key)?;
            caller
                .data_mut()
                .state
                .set(&key, None)
                .map_err(|m| trap(HostTrap::StateQuota(m)))
        },
    )?;
    Ok(())
}
