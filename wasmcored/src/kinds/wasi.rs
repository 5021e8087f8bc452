//! Kind `wasi`: a WASI preview 1 command. `_start` runs with the input as stdin; stdout is
//! the output and stderr lines are logs; an exit status other than 0 is `plugin_error`. No
//! preopened directories, no environment, no sockets. It may also import the `host`
//! functions (and export `alloc` for `get_state`).

use std::sync::Arc;

use wasmcore_proto::ModuleKind;
use wasmtime::{Extern, InstancePre, Module, ModuleExport, Store};
use wasmtime_wasi::I32Exit;

use super::{Call, Ended, Kind, Linkers, PrepareError, RunFuture, Stdio};
use crate::context::ExecCtx;
use crate::sys::CheckedFunc;

/// The import module of WASI preview 1.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// The functions of `wasi_snapshot_preview1` (the WASI 0.1 specification, all of which the
/// linker defines): an import of any other name is named with the rest of a module's
/// missing imports. A test checks the linker against this list.
pub const FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];
/// A command's entry point.
pub const START: &str = "_start";

/// Whether `module` imports anything from WASI preview 1.
pub fn imports_wasi(module: &Module) -> bool {
    module.imports().any(|i| i.module() == WASI_MODULE)
}

/// A WASI command, prepared.
pub struct Command {
    pre: InstancePre<ExecCtx>,
    memory: Option<ModuleExport>,
    alloc: Option<CheckedFunc<i32, i32>>,
    start: CheckedFunc<(), ()>,
}

pub fn prepare(linkers: &Linkers, module: &Module) -> Result<Arc<dyn Kind>, PrepareError> {
    let Some(start) = CheckedFunc::verified(module, START) else {
        return Err("WASI command: `_start` must be a function () -> ()".into());
    };
    let memory = match module.get_export("memory") {
        Some(wasmtime::ExternType::Memory(_)) => module.get_export_index("memory"),
        _ => None,
    };
    Ok(Arc::new(Command {
        pre: super::instantiate_pre(linkers, module, false)?,
        memory,
        // A WASI command may export `alloc` for `get_state`; any other signature is ignored.
        alloc: CheckedFunc::verified(module, "alloc"),
        start,
    }))
}

impl Kind for Command {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Wasi
    }

    fn stdio(&self) -> Stdio {
        Stdio::P1 { command: true }
    }

    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, _call: Call<'a>) -> RunFuture<'a> {
        Box::pin(async move {
            let instance = self.pre.instantiate_async(&mut *store).await?;
            if let Some(Extern::Memory(m)) = self
                .memory
                .as_ref()
                .and_then(|e| instance.get_module_export(&mut *store, e))
            {
                store.data_mut().memory = Some(m);
            }
            if let Some(alloc) = self.alloc.as_ref().and_then(|a| a.typed(store, &instance)) {
                store.data_mut().alloc = Some(alloc);
            }
            let start = super::typed(store, &instance, &self.start, START)?;
            let status = exit_status(start.call_async(&mut *store, ()).await)?;
            store.data_mut().take_stdout_as_output()?;
            Ok(match status {
                0 => Ended::Ok,
                code => Ended::Exit(code),
            })
        })
    }
}

/// A command's exit status: 0 when it returned, the status when it called `exit`.
pub(crate) fn exit_status(r: wasmtime::Result<()>) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(code)) => Ok(*code),
            None => Err(e),
        },
    }
}
