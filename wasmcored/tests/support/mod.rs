//! Shared helpers for the in-process engine tests: an engine/registry/executor set built
//! from a config, fixtures (.wat files here) and the built example plugins.

use std::path::PathBuf;
use std::sync::Arc;

use wasmcore_proto::{ErrorCode, LimitsRequest};
use wasmcored::config::Config;
use wasmcored::engine::WasmEngine;
use wasmcored::executor::{ExecLimits, Executor, RunOutput};
use wasmcored::registry::{Binary, LoadOptions, Registry};
use wasmcored::state::{MemoryStateStore, StateStore};
use wasmcored::{Error, Tenant};

pub struct Env {
    pub registry: Registry,
    pub exec: Executor,
    pub owner: Tenant,
}

pub fn config() -> Config {
    let mut c = Config::default();
    // Small pools: many test engines live at once.
    c.engine.pool_instances = 16;
    c
}

pub fn env() -> Env {
    env_with(config())
}

pub fn env_with(c: Config) -> Env {
    c.check().expect("valid test config");
    let engine = WasmEngine::new(&c.engine, &c.limits).expect("engine");
    let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
    let live = wasmcored::config::live(c.clone());
    let registry = Registry::new(engine.clone(), live.clone(), state.clone()).expect("registry");
    let exec = Executor::new(engine, state, live);
    Env {
        registry,
        exec,
        owner: Tenant::new(1000, 1000, vec![], &[]),
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A built example plugin; the test command builds them first (`make plugins`).
pub fn plugin(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the plugins first: make plugins)",
            path.display()
        )
    })
}

impl Env {
    pub fn load(&self, bytes: &[u8]) -> Arc<Binary> {
        self.load_as(&self.owner, bytes, LoadOptions::default())
            .expect("load")
    }

    pub fn load_as(
        &self,
        who: &Tenant,
        bytes: &[u8],
        opts: LoadOptions,
    ) -> Result<Arc<Binary>, Error> {
        let compiled = self.registry.compile(bytes)?;
        self.registry.insert(who, compiled, opts)
    }

    pub fn limits(&self, req: LimitsRequest) -> ExecLimits {
        self.exec.resolve_limits(&req).expect("limits")
    }

    pub async fn run(&self, bin: &Binary, input: &[u8]) -> Result<RunOutput, Error> {
        self.run_with(bin, input, LimitsRequest::default()).await
    }

    pub async fn run_with(
        &self,
        bin: &Binary,
        input: &[u8],
        req: LimitsRequest,
    ) -> Result<RunOutput, Error> {
        let limits = self.limits(req);
        self.exec
            .execute(bin, None, self.owner.uid, input.to_vec(), &limits)
            .await
    }
}

/// The wire code of a failed result, with the message for assertions.
pub fn code<T: std::fmt::Debug>(r: Result<T, Error>) -> (ErrorCode, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => (e.code(), e.to_string()),
    }
}

/// Chain stages that each call their binary's only function.
#[allow(dead_code)]
pub fn stages<const N: usize>(bins: [Arc<Binary>; N]) -> Vec<wasmcored::executor::Stage> {
    bins.into_iter().map(Into::into).collect()
}

/// A runtime built as a worker's ([`wasmcored::engine::guest_threads`]): its threads run
/// the guests of modules without WASI inline, on their own stacks.
pub fn inline_runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    wasmcored::engine::guest_threads(&mut b, &config().engine)
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Each test twice: `NAME::on_fibres` under its own `#[tokio::test]` attribute, where
/// guests run on fibres, and `NAME::inline` as a task of an [`inline_runtime`] of two
/// threads, where guests without WASI run inline.
#[macro_export]
macro_rules! both_ways {
    ($($(#[$attr:meta])* async fn $name:ident() $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn on_fibres() $body

            #[test]
            fn inline() {
                $crate::support::inline_runtime(2).block_on(async {
                    tokio::spawn(async move {
                        assert!(wasmcored::engine::inline_here(), "not on a guest thread");
                        $body
                    })
                    .await
                    .expect("test task")
                })
            }
        }
    )*};
}
