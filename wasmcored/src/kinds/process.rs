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
use wasmtime::{
    Caller, Extern, Instance, InstancePre, Linker, Memory, Module, ModuleExport, Store, TypedFunc,
};

use super::{Call, Ended, Kind, Linkers, PrepareError, RunFuture, Stdio};
use crate::context::{ExecCtx, HostTrap, guest_range, trap};
use crate::sys::CheckedFunc;

/// The import module name of the host functions.
pub const HOST_MODULE: &str = "host";
/// The functions of [`HOST_MODULE`].
pub const FUNCTIONS: &[&str] = &["log", "output", "get_state", "set_state", "delete_state"];
/// The export that makes a module a process-ABI plugin.
pub const PROCESS: &str = "process";

/// A guest's `alloc` export.
type Alloc = TypedFunc<i32, i32>;
/// A guest's `process` export.
type Entry = TypedFunc<(i32, i32), i32>;

/// A process-ABI plugin, prepared.
pub struct Process {
    /// Through the core linker: for async calls on a fibre.
    pre: InstancePre<ExecCtx>,
    /// Through the inline linker, whose host functions are all synchronous: for a module
    /// without WASI (`None`: it imports WASI), run on the calling thread
    /// ([`crate::engine::inline_here`]).
    inline: Option<InstancePre<ExecCtx>>,
    memory: ModuleExport,
    alloc: CheckedFunc<i32, i32>,
    process: CheckedFunc<(i32, i32), i32>,
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
    let pre = super::instantiate_pre(linkers, module, false)?;
    // A module without WASI has only synchronous host functions: it runs inline.
    let inline = match super::wasi::imports_wasi(module) {
        true => None,
        false => Some(super::instantiate_pre(linkers, module, true)?),
    };
    Ok(Arc::new(Process {
        pre,
        inline,
        memory,
        alloc,
        process,
    }))
}

impl Kind for Process {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Process
    }

    fn stdio(&self) -> Stdio {
        if self.inline.is_none() {
            Stdio::P1 { command: false }
        } else {
            Stdio::None
        }
    }

    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, call: Call<'a>) -> RunFuture<'a> {
        if let Some(pre) = self
            .inline
            .as_ref()
            .filter(|_| crate::engine::inline_here())
        {
            return Box::pin(std::future::ready(self.run_inline(pre, store, call)));
        }
        Box::pin(async move {
            let instance = self.pre.instantiate_async(&mut *store).await?;
            let (memory, alloc, process) = self.exports(store, &instance)?;
            let len = input_len(&call.input)?;
            let ptr = alloc.call_async(&mut *store, len).await?;
            write_input(store, memory, ptr, &call.input)?;
            ended(process.call_async(&mut *store, (ptr, len)).await?)
        })
    }
}

impl Process {
    /// [`Kind::run`] on the calling thread from `pre`, [`Process::inline`]: no fibre, no
    /// awaits ([`crate::engine::inline_here`]).
    fn run_inline(
        &self,
        pre: &InstancePre<ExecCtx>,
        store: &mut Store<ExecCtx>,
        call: Call<'_>,
    ) -> wasmtime::Result<Ended> {
        store.data_mut().inline = true;
        let instance = pre.instantiate(&mut *store)?;
        let (memory, alloc, process) = self.exports(store, &instance)?;
        let len = input_len(&call.input)?;
        let ptr = alloc.call(&mut *store, len)?;
        write_input(store, memory, ptr, &call.input)?;
        ended(process.call(&mut *store, (ptr, len))?)
    }

    /// The instance's memory, `alloc` and `process`; the first two kept in the store for
    /// the host functions.
    fn exports(
        &self,
        store: &mut Store<ExecCtx>,
        instance: &Instance,
    ) -> wasmtime::Result<(Memory, Alloc, Entry)> {
        let Some(Extern::Memory(memory)) = instance.get_module_export(&mut *store, &self.memory)
        else {
            return Err(wasmtime::Error::msg("module has no `memory` export"));
        };
        let alloc = super::typed(store, instance, &self.alloc, "alloc")?;
        let process = super::typed(store, instance, &self.process, PROCESS)?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc.clone());
        Ok((memory, alloc, process))
    }
}

fn input_len(input: &[u8]) -> wasmtime::Result<i32> {
    i32::try_from(input.len()).map_err(|_| wasmtime::Error::msg("input too large"))
}

/// Copy the input to where the guest's `alloc` put it.
fn write_input(
    store: &mut Store<ExecCtx>,
    memory: Memory,
    ptr: i32,
    input: &[u8],
) -> wasmtime::Result<()> {
    let size = memory.data_size(&*store);
    let r = guest_range("alloc (returned pointer)", ptr, input.len() as i32, size)?;
    memory.data_mut(&mut *store)[r].copy_from_slice(input);
    Ok(())
}

fn ended(code: i32) -> wasmtime::Result<Ended> {
    Ok(match code {
        0 => Ended::Ok,
        code => Ended::Code(code),
    })
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

/// `get_state` up to the guest's `alloc`: the value, the bytes to allocate for it (with
/// its 4-byte length), and `alloc`; `None` when the key has no value.
fn state_value(
    caller: &mut Caller<'_, ExecCtx>,
    kptr: i32,
    klen: i32,
) -> wasmtime::Result<Option<(Vec<u8>, i32, Alloc)>> {
    let key = read_guest(caller, "get_state", kptr, klen)?;
    check_key("get_state", &key, caller.data().max_key)?;
    let Some(value) = caller.data().state.get(&key) else {
        return Ok(None);
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
    Ok(Some((value, total, alloc)))
}

/// `get_state` after the guest's `alloc` returned `ptr`: the length and the value there.
fn place_value(
    caller: &mut Caller<'_, ExecCtx>,
    ptr: i32,
    total: i32,
    value: &[u8],
) -> wasmtime::Result<i32> {
    let mem = memory(caller, "get_state")?;
    let data = mem.data_mut(caller);
    let r = guest_range(
        "get_state (pointer returned by alloc)",
        ptr,
        total,
        data.len(),
    )?;
    let dst = &mut data[r];
    dst[..4].copy_from_slice(&(value.len() as u32).to_le_bytes());
    dst[4..].copy_from_slice(value);
    Ok(ptr)
}

/// Define the `host` functions in `linker`; `inline`: for stores that run on the calling
/// thread (`get_state` calls the guest's `alloc` synchronously), else for async stores.
pub fn add_to_linker(linker: &mut Linker<ExecCtx>, inline: bool) -> wasmtime::Result<()> {
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
    if inline {
        linker.func_wrap(
            HOST_MODULE,
            "get_state",
            |mut caller: Caller<'_, ExecCtx>, kptr: i32, klen: i32| -> wasmtime::Result<i32> {
                let Some((value, total, alloc)) = state_value(&mut caller, kptr, klen)? else {
                    return Ok(-1);
                };
                let ptr = alloc.call(&mut caller, total)?;
                place_value(&mut caller, ptr, total, &value)
            },
        )?;
    } else {
        linker.func_wrap_async(
            HOST_MODULE,
            "get_state",
            |mut caller: Caller<'_, ExecCtx>, (kptr, klen): (i32, i32)| {
                Box::new(async move {
                    let Some((value, total, alloc)) = state_value(&mut caller, kptr, klen)? else {
                        return Ok(-1);
                    };
                    let ptr = alloc.call_async(&mut caller, total).await?;
                    place_value(&mut caller, ptr, total, &value)
                })
            },
        )?;
    }
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
