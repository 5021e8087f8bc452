//! Module kinds: the host glue of each kind of binary, behind one small interface.
//!
//! A binary is compiled once ([`Code`]), then [`prepare`] detects its kind and builds that
//! kind's [`Kind`]: everything an execution needs that can be resolved at load (the
//! `InstancePre`, checked exports, the functions an Extism plugin offers). An execution
//! then calls [`Kind::run`] on a fresh store the executor made; limits, accounting,
//! chains, persistence and restore are the same for every kind and live elsewhere.
//!
//! | kind | file | detected by |
//! |---|---|---|
//! | `component` | [`component`] | the component header layer |
//! | `extism` | [`extism`] | imports from `extism:host/env` |
//! | `process` | [`process`] | exports `process` (ABI v1) |
//! | `wasi` | [`wasi`] | exports `_start` |
//! | `extism` | [`extism`] | otherwise, exports `() -> i32` functions |
//!
//! A new kind is one new file with a `detect`/`prepare` pair and a [`Kind`] implementation,
//! and one line in [`prepare`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use wasmcore_proto::ModuleKind;
use wasmtime::component::Component;
use wasmtime::{Engine, Linker, Module, Store};

use crate::context::{ExecCtx, StoreShape};

pub mod component;
pub mod extism;
#[cfg(feature = "escape-probe")]
pub mod probe;
pub mod process;
pub mod wasi;

/// Why a module cannot be prepared: the message for `invalid_module`.
pub type PrepareError = String;

/// A compiled binary: a core module or a component.
#[derive(Clone, Debug)]
pub enum Code {
    Module(Module),
    Component(Component),
}

impl Code {
    /// Whether `bytes` are a component rather than a core module (the header's layer field).
    pub fn is_component(bytes: &[u8]) -> bool {
        bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
    }

    /// The precompiled artifact to store next to the original bytes.
    pub fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        match self {
            Code::Module(m) => m.serialize(),
            Code::Component(c) => c.serialize(),
        }
    }
}

/// How an execution's WASI context is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// No WASI at all.
    None,
    /// A WASI preview 1 context. `command`: the input is stdin and stdout is the output;
    /// otherwise stdin is empty and stdout goes to the logs.
    P1 { command: bool },
    /// A WASI preview 2 context: stdin is the input, stdout the output.
    P2,
}

/// What one execution asks of a kind.
#[derive(Debug)]
pub struct Call<'a> {
    pub input: Vec<u8>,
    /// The function to call (Extism plugins), already checked by [`Kind::function`].
    pub function: Option<&'a str>,
}

/// How a run ended without a trap. The output is in the store's `output`.
#[derive(Debug)]
pub enum Ended {
    Ok,
    /// A process-ABI plugin returned a non-zero code.
    Code(i32),
    /// A WASI command or component exited with a non-zero status.
    Exit(i32),
    /// An Extism call failed: the code it returned and the error it set, if any.
    Extism {
        code: i32,
        message: Option<String>,
    },
}

/// The future of one run.
pub type RunFuture<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<Ended>> + Send + 'a>>;

/// The glue of one kind, prepared for one binary.
pub trait Kind: Send + Sync {
    fn kind(&self) -> ModuleKind;

    /// How the store's WASI context is set up for this binary.
    fn stdio(&self) -> Stdio;

    /// How many instances, memories and tables a store of this binary needs.
    fn shape(&self) -> StoreShape {
        StoreShape::MODULE
    }

    /// The functions a caller may choose with `function` (Extism plugins; none otherwise).
    fn functions(&self) -> &[String] {
        &[]
    }

    /// Check the function a request asks for; `Ok(name)` is what [`Call::function`] gets.
    fn function<'a>(&'a self, asked: Option<&'a str>) -> Result<Option<&'a str>, String> {
        match asked {
            None => Ok(None),
            Some(_) => Err(format!(
                "a {} binary has no functions to choose; leave out `function`",
                self.kind()
            )),
        }
    }

    /// Whether the store gets the Extism block space.
    fn uses_blocks(&self) -> bool {
        false
    }

    /// Run one execution on a fresh store.
    fn run<'a>(&'a self, store: &'a mut Store<ExecCtx>, call: Call<'a>) -> RunFuture<'a>;
}

/// The linkers every kind instantiates through, built once per registry.
pub struct Linkers {
    /// Core modules: the `host` functions of ABI v1, `extism:host/env`, WASI preview 1.
    pub core: Linker<ExecCtx>,
    /// Core modules that run inline (on the calling thread, no fibre): the same functions
    /// without WASI, every one synchronous, so that their stores need no async calls.
    pub inline: Linker<ExecCtx>,
    /// Components: WASI preview 2.
    pub component: wasmtime::component::Linker<ExecCtx>,
}

impl Linkers {
    pub fn new(engine: &Engine) -> wasmtime::Result<Linkers> {
        let mut core = Linker::new(engine);
        let mut inline = Linker::new(engine);
        process::add_to_linker(&mut core, false)?;
        process::add_to_linker(&mut inline, true)?;
        #[cfg(feature = "escape-probe")]
        {
            probe::add_to_linker(&mut core)?;
            probe::add_to_linker(&mut inline)?;
        }
        extism::add_to_linker(&mut core)?;
        extism::add_to_linker(&mut inline)?;
        wasmtime_wasi::p1::add_to_linker_async(&mut core, |c: &mut ExecCtx| {
            c.wasi
                .as_mut()
                .expect("a WASI context exists for every module that imports WASI")
        })?;
        let mut component = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        Ok(Linkers {
            core,
            inline,
            component,
        })
    }
}

/// The import modules the core linker serves, with the functions each defines.
const KNOWN_IMPORTS: &[(&str, Option<&[&str]>)] = &[
    (process::HOST_MODULE, Some(process::FUNCTIONS)),
    (extism::ENV_MODULE, Some(extism::FUNCTIONS)),
    (wasi::WASI_MODULE, Some(wasi::FUNCTIONS)),
    #[cfg(feature = "escape-probe")]
    (probe::PROBE_MODULE, Some(probe::FUNCTIONS)),
];

/// Every import of `module` that no linker provides, named `module::name`.
fn missing_imports(module: &Module) -> Vec<String> {
    module
        .imports()
        .filter(
            |i| match KNOWN_IMPORTS.iter().find(|(m, _)| *m == i.module()) {
                None => true,
                Some((_, None)) => false,
                Some((_, Some(names))) => !names.contains(&i.name()),
            },
        )
        .map(|i| format!("{}::{}", i.module(), i.name()))
        .collect()
}

/// Build the `InstancePre` of a core module, naming every import wasm-core does not
/// provide.
/// `inline`: through [`Linkers::inline`], for a kind that runs the module on the calling
/// thread (its module imports no WASI).
pub(crate) fn instantiate_pre(
    linkers: &Linkers,
    module: &Module,
    inline: bool,
) -> Result<wasmtime::InstancePre<ExecCtx>, PrepareError> {
    let missing = missing_imports(module);
    if !missing.is_empty() {
        return Err(format!(
            "the module imports what wasm-core does not provide: {}",
            missing.join(", ")
        ));
    }
    let linker = if inline {
        &linkers.inline
    } else {
        &linkers.core
    };
    linker
        .instantiate_pre(module)
        .map_err(|e| format!("the module's imports do not match what wasm-core provides: {e:#}"))
}

/// Detect the kind of `code` and prepare its glue.
pub fn prepare(linkers: &Linkers, code: &Code) -> Result<Arc<dyn Kind>, PrepareError> {
    let module = match code {
        Code::Component(c) => return component::prepare(linkers, c),
        Code::Module(m) => m,
    };
    if extism::imports_kernel(module) {
        return extism::prepare(linkers, module);
    }
    if module.get_export(process::PROCESS).is_some() {
        return process::prepare(linkers, module);
    }
    if module.get_export(wasi::START).is_some() {
        return wasi::prepare(linkers, module);
    }
    if extism::exports_plugin_function(module) {
        return extism::prepare(linkers, module);
    }
    Err("the module exports neither `process` (process ABI) nor `_start` (WASI command), imports nothing from `extism:host/env` and exports no `() -> i32` function (Extism plugin); see docs/PLUGIN_ABI.md".into())
}

/// The checked export `f` of `instance` as a typed function.
pub(crate) fn typed<P, R>(
    store: &mut Store<ExecCtx>,
    instance: &wasmtime::Instance,
    f: &crate::sys::CheckedFunc<P, R>,
    name: &str,
) -> wasmtime::Result<wasmtime::TypedFunc<P, R>>
where
    P: wasmtime::WasmParams + crate::sys::Sig,
    R: wasmtime::WasmResults + crate::sys::Sig,
{
    f.typed(store, instance)
        .ok_or_else(|| wasmtime::Error::msg(format!("module has no `{name}` function export")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name on the list of WASI functions is one the linker defines: a module that
    /// imports it (with a made-up signature) is refused for its type, not for its name.
    #[test]
    fn the_wasi_function_list_is_the_linkers() {
        let engine = Engine::default();
        let linkers = Linkers::new(&engine).unwrap();
        for f in wasi::FUNCTIONS {
            let wat = format!(
                "(module (import \"{}\" \"{f}\" (func (param i64 i64 i64 i64 i64 i64 i64 i64))))",
                wasi::WASI_MODULE
            );
            let module = Module::new(&engine, wat::parse_str(&wat).unwrap()).unwrap();
            assert!(missing_imports(&module).is_empty(), "{f}");
            let e = format!("{:#}", linkers.core.instantiate_pre(&module).err().unwrap());
            assert!(
                !e.contains("has not been defined") && !e.contains("unknown import"),
                "{f}: {e}"
            );
        }
        // A name that is not WASI's is named with the rest.
        let module = Module::new(
            &engine,
            wat::parse_str(format!(
                "(module (import \"{}\" \"bar\" (func)) (import \"host\" \"nope\" (func)))",
                wasi::WASI_MODULE
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            missing_imports(&module),
            vec![
                format!("{}::bar", wasi::WASI_MODULE),
                "host::nope".to_string()
            ]
        );
    }
}
