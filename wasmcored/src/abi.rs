//! Host side of plugin ABI v1 (docs/PLUGIN_ABI.md): the `host` import module.
//!
//! `log`, `output`, `get_state`, `set_state` with the seed's signatures, plus `delete_state`.
//! Every pointer and length from the guest is checked against its linear memory; a bad one
//! traps that execution with a [`HostTrap`] and never touches the host.

use std::ops::Range;

use wasmtime::{Caller, Extern, Linker, Memory};

use crate::executor::ExecCtx;

/// The import module name of the host functions.
pub const HOST_MODULE: &str = "host";

/// Why a host function stopped the guest. The executor turns these into error codes.
#[derive(Debug, thiserror::Error)]
pub enum HostTrap {
    #[error("{0}")]
    BadPointer(String),
    #[error("output exceeds the limit of {0} bytes")]
    OutputTooLarge(usize),
    #[error("{0}")]
    StateQuota(String),
    #[error("execution deadline passed")]
    TimedOut,
}

fn trap(t: HostTrap) -> wasmtime::Error {
    wasmtime::Error::new(t)
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

/// Check that `[ptr, ptr+len)` lies inside a memory of `size` bytes.
pub(crate) fn guest_range(
    func: &str,
    ptr: i32,
    len: i32,
    size: usize,
) -> wasmtime::Result<Range<usize>> {
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    if ptr < 0 || len < 0 {
        return Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: negative pointer or length (ptr={ptr}, len={len})"
        ))));
    }
    match p.checked_add(l) {
        Some(end) if end <= size => Ok(p..end),
        _ => Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: range {p}+{l} is outside linear memory ({size} bytes)"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(guest_range("f", 0, 0, 0).unwrap(), 0..0);
        assert_eq!(guest_range("f", 10, 5, 15).unwrap(), 10..15);
        assert!(guest_range("f", 10, 6, 15).is_err());
        assert!(guest_range("f", -1, 1, 100).is_err());
        assert!(guest_range("f", 1, -1, 100).is_err());
        assert!(guest_range("f", i32::MAX, i32::MAX, usize::MAX >> 1).is_ok());
        assert!(guest_range("f", i32::MAX, 2, i32::MAX as usize).is_err());
    }
}
