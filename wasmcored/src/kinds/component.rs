//! Kind `component`: a `wasi:cli/command` component (what `cargo build --target
//! wasm32-wasip2` makes of a `fn main`), run through `wasmtime-wasi`'s preview 2.
//!
//! stdin is the input, stdout the output, stderr lines are logs; a failed `run` or a
//! non-zero exit is `plugin_error`. The context has no preopened directories, no
//! environment, no arguments but the binary's name and no network; clocks and random are
//! allowed. A full stdout pipe ends the execution with `too_large`.

use std::sync::Arc;

use wasmcore_proto::ModuleKind;
use wasmtime::Store;
use wasmtime::component::Component;
use wasmtime_wasi::p2::bindings::CommandPre;

use super::{Call, Ended, Kind, Linkers, PrepareError, RunFuture, Stdio};
use crate::context::{ExecCtx, StoreShape};

/// A command component, prepared.
pub struct Command {
    pre: CommandPre<ExecCtx>,
}

pub fn prepare(linkers: &Linkers, component: &Component) -> Result<Arc<dyn Kind>, PrepareError> {
    let pre = linkers
        .component
        .instantiate_pre(component)
        .map_err(|e| format!("the component imports what wasm-core does not provide: {e:#}"))?;
    let pre = CommandPre::new(pre).map_err(|e| {
        format!("the component is not a `wasi:cli/command` (it must export `wasi:cli/run`): {e:#}")
    })?;
    Ok(Arc::new(Command { pre }))
}

impl Kind for Command {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Component
    }

    fn stdio(&self) -> Stdio {
        Stdio::P2
    }

    fn shape(&self) -> StoreShape {
        StoreShape::COMPONENT
    }

    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, _call: Call<'a>) -> RunFuture<'a> {
        Box::pin(async move {
            let command = self.pre.instantiate_async(&mut *store).await?;
            let status = match command.wasi_cli_run().call_run(&mut *store).await {
                Ok(Ok(())) => 0,
                // `run` returning `err` is exit status 1, as `wasmtime run` reports it.
                Ok(Err(())) => 1,
                Err(e) => super::wasi::exit_status(Err(e))?,
            };
            store.data_mut().take_stdout_as_output()?;
            Ok(match status {
                0 => Ended::Ok,
                code => Ended::Exit(code),
            })
        })
    }
}
