//! The plugin ABI's host functions driven by arbitrary call sequences. One fixed guest reads
//! its input as 20-byte records (op, a, b, c, d) and calls `log`, `output`, `get_state`,
//! `set_state`, `delete_state` or `memory.grow` with those raw values: arbitrary pointers,
//! lengths, keys and values. Properties: nothing panics, and every execution ends with a
//! result or one of the error codes a guest may cause, never `internal`.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use wasmcore_proto::{ErrorCode, LimitsRequest};
use wasmcored::Tenant;
use wasmcored::config::Config;
use wasmcored::engine::WasmEngine;
use wasmcored::executor::Executor;
use wasmcored::registry::{Binary, LoadOptions, Registry};
use wasmcored::state::{MemoryStateStore, StateStore};

const GUEST: &str = r#"(module
  (import "host" "log" (func $log (param i32 i32)))
  (import "host" "output" (func $out (param i32 i32)))
  (import "host" "get_state" (func $get (param i32 i32) (result i32)))
  (import "host" "set_state" (func $set (param i32 i32 i32 i32)))
  (import "host" "delete_state" (func $del (param i32 i32)))
  (memory (export "memory") 2)
  (func (export "alloc") (param $n i32) (result i32)
    ;; Inputs land at 64 KiB; values from get_state wherever the input's first word says.
    (if (result i32) (i32.gt_u (local.get $n) (i32.const 65536))
      (then (i32.load (i32.const 65536)))
      (else (i32.const 65536))))
  (func (export "process") (param $p i32) (param $len i32) (result i32)
    (local $end i32) (local $a i32) (local $b i32) (local $c i32) (local $d i32)
    (local.set $end (i32.add (local.get $p) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.gt_u (i32.add (local.get $p) (i32.const 20)) (local.get $end)))
        (local.set $a (i32.load offset=4 (local.get $p)))
        (local.set $b (i32.load offset=8 (local.get $p)))
        (local.set $c (i32.load offset=12 (local.get $p)))
        (local.set $d (i32.load offset=16 (local.get $p)))
        (block $op5 (block $op4 (block $op3 (block $op2 (block $op1 (block $op0
          (br_table $op0 $op1 $op2 $op3 $op4 $op5
            (i32.rem_u (i32.load8_u (local.get $p)) (i32.const 6))))
          (call $log (local.get $a) (local.get $b)) (br $op5))
          (call $out (local.get $a) (local.get $b)) (br $op5))
          (drop (call $get (local.get $a) (local.get $b))) (br $op5))
          (call $set (local.get $a) (local.get $b) (local.get $c) (local.get $d)) (br $op5))
          (call $del (local.get $a) (local.get $b)) (br $op5))
        (local.set $p (i32.add (local.get $p) (i32.const 20)))
        (br $next)))
    (i32.const 0)))"#;

struct Fixture {
    rt: tokio::runtime::Runtime,
    exec: Executor,
    bin: Arc<Binary>,
    _registry: Registry,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut c = Config::default();
        c.engine.pool_instances = 4;
        c.limits.max_output_bytes = 64 << 10;
        let engine = WasmEngine::new(&c.engine, &c.limits).expect("engine");
        let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let live = wasmcored::config::live(c);
        let registry =
            Registry::new(engine.clone(), live.clone(), state.clone()).expect("registry");
        let owner = Tenant::new(1000, 1000, vec![], &[]);
        let wasm = wat::parse_str(GUEST).expect("guest");
        let compiled = registry.compile(&wasm).expect("compile");
        let bin = registry
            .insert(&owner, compiled, LoadOptions::default())
            .expect("insert");
        let exec = Executor::new(engine, state, live);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture {
            rt,
            exec,
            bin,
            _registry: registry,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 60_000 {
        return;
    }
    let f = fixture();
    let limits = f
        .exec
        .resolve_limits(&LimitsRequest {
            timeout_ms: Some(2000),
            ..LimitsRequest::default()
        })
        .expect("limits");
    let r =
        f.rt.block_on(f.exec.execute(&f.bin, None, 1000, data.to_vec(), &limits));
    if let Err(e) = r {
        let code = e.code();
        assert!(
            matches!(
                code,
                ErrorCode::Trap
                    | ErrorCode::TooLarge
                    | ErrorCode::QuotaExceeded
                    | ErrorCode::MemoryLimit
                    | ErrorCode::Timeout
                    | ErrorCode::OutOfFuel
                    | ErrorCode::PluginError
            ),
            "unexpected {code:?}: {e}"
        );
    }
});
