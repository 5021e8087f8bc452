//! Hostile modules, in-process: table and element bombs, thousands of imports and functions,
//! huge data segments, guests hammering host calls, state floods, WASI guests reaching for
//! files, sockets and clocks. Each ends with a clear error code (or a correct result) and
//! the engine still running other modules.

mod support;

use std::time::{Duration, Instant};

use support::*;
use wasmcore_proto::{ErrorCode, LimitsRequest};

/// The ABI exports every process-mode module here shares.
const ABI: &str = r#"(memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))"#;

fn module(body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {body})")).unwrap_or_else(|e| panic!("{e}"))
}

/// After each hostile case the same engine still runs a normal plugin correctly.
async fn still_serving(e: &Env) {
    for bytes in [plugin("uppercase"), fixture("upper.wat")] {
        let up = e.load(&bytes);
        assert_eq!(e.run(&up, b"ok").await.unwrap().output, b"OK");
    }
}

both_ways! {
    #[tokio::test]
    async fn table_bombs_are_refused_at_load_or_capped() {
        let e = env();
        // A table larger than the daemon allows (limits.max_table_elements = 100 000).
        let big = module(&format!(
            r#"(table 10000000 funcref) {ABI}
            (func (export "process") (param i32 i32) (result i32) (i32.const 0))"#
        ));
        let (c, msg) = code(e.load_as(&e.owner, &big, Default::default()));
        assert_eq!(c, ErrorCode::InvalidModule, "{msg}");
        assert!(msg.contains("table"), "{msg}");
        // Growing a table past the cap fails inside the guest (table.grow returns -1).
        let grow = module(&format!(
            r#"(table 1 funcref) {ABI}
            (func (export "process") (param i32 i32) (result i32)
              (table.grow (ref.null func) (i32.const 5000000)))"#
        ));
        let bin = e.load(&grow);
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::PluginError, "{msg}");
        assert!(msg.contains("-1"), "the refused grow returned -1: {msg}");
        // A full element segment at the cap is fine.
        let elems = " $f".repeat(100_000);
        let full = module(&format!(
            r#"(table 100000 funcref) {ABI}
            (func $f)
            (elem (i32.const 0) func{elems})
            (func (export "process") (param i32 i32) (result i32) (i32.const 0))"#
        ));
        let bin = e.load(&full);
        e.run(&bin, b"").await.unwrap();
        still_serving(&e).await;
    }
}

both_ways! {
    #[tokio::test]
    async fn thousands_of_imports_and_functions_compile_and_run() {
        let e = env();
        let imports: String = (0..5000)
            .map(|i| format!(r#"(import "host" "log" (func $l{i} (param i32 i32)))"#))
            .collect();
        let funcs: String = (0..20_000)
            .map(|i| format!("(func $f{i} (result i32) (i32.const {i}))"))
            .collect();
        let m = module(&format!(
            r#"{imports} {ABI} {funcs}
            (func (export "process") (param i32 i32) (result i32)
              (call $l4999 (i32.const 0) (i32.const 0))
              (i32.sub (call $f19999) (i32.const 19999)))"#
        ));
        let t = Instant::now();
        let bin = e.load(&m);
        eprintln!(
            "5000 imports, 20000 functions ({} KiB): loaded in {:?}",
            m.len() / 1024,
            t.elapsed()
        );
        e.run(&bin, b"").await.unwrap();
        still_serving(&e).await;
    }
}

both_ways! {
    #[tokio::test]
    async fn huge_data_segments_within_and_beyond_the_memory_cap() {
        let e = env();
        let seg = |pages: u32, bytes: usize| {
            module(&format!(
                r#"(import "host" "output" (func $out (param i32 i32)))
                (memory (export "memory") {pages})
                (func (export "alloc") (param i32) (result i32) (i32.const 0))
                (data (i32.const 0) "{}")
                (func (export "process") (param i32 i32) (result i32)
                  (call $out (i32.sub (i32.const {bytes}) (i32.const 4)) (i32.const 4))
                  (i32.const 0))"#,
                "\\41".repeat(bytes)
            ))
        };
        // 4 MiB of data in a 4 MiB + 1 page memory: runs, and reads its own data back.
        let bin = e.load(&seg(65, 4 << 20));
        assert_eq!(e.run(&bin, b"").await.unwrap().output, b"AAAA");
        // The same data in a memory whose initial size is over the 64 MiB default cap.
        let bin = e.load(&seg(1100, 4 << 20));
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::MemoryLimit, "{msg}");
        still_serving(&e).await;
    }
}

both_ways! {
    #[tokio::test]
    async fn guests_hammering_host_calls_hit_their_caps() {
        let e = env();
        // A million log lines: the log is capped (with a note) and the run ends.
        let logs = module(&format!(
            r#"(import "host" "log" (func $log (param i32 i32))) {ABI}
            (data (i32.const 0) "0123456789")
            (func (export "process") (param i32 i32) (result i32)
              (local $i i32)
              (loop $l
                (call $log (i32.const 0) (i32.const 10))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000))))
              (i32.const 0))"#
        ));
        let bin = e.load(&logs);
        let out = e.run(&bin, b"").await.unwrap();
        let total: usize = out.logs.iter().map(|l| l.len()).sum();
        assert!(total <= 64 * 1024 + 200, "logs kept: {total} bytes");
        assert!(
            out.logs.last().unwrap().contains("dropped"),
            "{:?}",
            out.logs.last()
        );
        // Output in 100-byte calls until past the 8 MiB cap: output_too_large, not memory growth.
        let outs = module(&format!(
            r#"(import "host" "output" (func $out (param i32 i32))) {ABI}
            (func (export "process") (param i32 i32) (result i32)
              (loop $l
                (call $out (i32.const 0) (i32.const 100))
                (br $l))
              (i32.const 0))"#
        ));
        let bin = e.load(&outs);
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c.as_str(), "too_large", "{msg}");
        // Host calls with bad pointers in a tight loop: the first one traps.
        let bad = module(&format!(
            r#"(import "host" "log" (func $log (param i32 i32))) {ABI}
            (func (export "process") (param i32 i32) (result i32)
              (loop $l
                (call $log (i32.const 65530) (i32.const 100))
                (br $l))
              (i32.const 0))"#
        ));
        let bin = e.load(&bad);
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::Trap, "{msg}");
        still_serving(&e).await;
    }
}

both_ways! {
    #[tokio::test]
    async fn state_floods_stop_at_the_quota_and_keep_nothing() {
        let e = env();
        // 100 000 distinct 8-byte keys with 64-byte values: far over the 1 MiB quota.
        let flood = module(&format!(
            r#"(import "host" "set_state" (func $set (param i32 i32 i32 i32))) {ABI}
            (func (export "process") (param i32 i32) (result i32)
              (local $i i32)
              (loop $l
                (i64.store (i32.const 0) (i64.extend_i32_u (local.get $i)))
                (call $set (i32.const 0) (i32.const 8) (i32.const 64) (i32.const 64))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
              (i32.const 0))"#
        ));
        let bin = e.load(&flood);
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::QuotaExceeded, "{msg}");
        assert_eq!(
            e.registry.state().total_usage(),
            0,
            "a failed execution's writes are discarded"
        );
        still_serving(&e).await;
    }
}

both_ways! {
    /// A WASI command probing what it can reach. Exit code: a bit per refusal seen, so the
    /// test can tell which probe failed: 1 path_open on fd 3, 2 sock_accept on fd 3, 4 reading
    /// fd 3, 8 environ (must be empty); the clock and random must work (else exit 100/101).
    #[tokio::test]
    async fn wasi_guests_reach_no_files_sockets_or_environment() {
        let e = env();
        let m = module(
            r#"(import "wasi_snapshot_preview1" "path_open"
                (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
              (import "wasi_snapshot_preview1" "random_get" (func $rand (param i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 100) "/etc/passwd")
              (func (export "_start")
                (local $seen i32)
                (if (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 11)
                      (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 200))
                  (then (local.set $seen (i32.or (local.get $seen) (i32.const 1)))))
                (if (call $accept (i32.const 3) (i32.const 0) (i32.const 200))
                  (then (local.set $seen (i32.or (local.get $seen) (i32.const 2)))))
                (i32.store (i32.const 300) (i32.const 400))
                (i32.store (i32.const 304) (i32.const 16))
                (if (call $read (i32.const 3) (i32.const 300) (i32.const 1) (i32.const 200))
                  (then (local.set $seen (i32.or (local.get $seen) (i32.const 4)))))
                (drop (call $env (i32.const 500) (i32.const 504)))
                (if (i32.eqz (i32.load (i32.const 500)))
                  (then (local.set $seen (i32.or (local.get $seen) (i32.const 8)))))
                (if (call $clock (i32.const 0) (i64.const 1) (i32.const 600))
                  (then (call $exit (i32.const 100))))
                (if (call $rand (i32.const 700) (i32.const 32))
                  (then (call $exit (i32.const 101))))
                (call $exit (local.get $seen)))"#,
        );
        let bin = e.load(&m);
        let body = e.run(&bin, b"").await.unwrap_err().to_body();
        assert_eq!(body.plugin_code, Some(15), "{body:?}");
        // Rights no WASI implementation knows (all 64 bits set) trap that execution only.
        let rights = module(
            r#"(import "wasi_snapshot_preview1" "path_open"
                (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (func (export "_start")
                (drop (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 11)
                      (i32.const 0) (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 200))))"#,
        );
        let bin = e.load(&rights);
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::Trap, "{msg}");
        still_serving(&e).await;
    }
}

both_ways! {
    #[tokio::test]
    async fn a_busy_loop_calling_the_host_still_meets_its_deadline() {
        let e = env();
        let m = module(&format!(
            r#"(import "host" "log" (func $log (param i32 i32))) {ABI}
            (func (export "process") (param i32 i32) (result i32)
              (loop $l
                (call $log (i32.const 0) (i32.const 0))
                (br $l))
              (i32.const 0))"#
        ));
        let bin = e.load(&m);
        let t = Instant::now();
        let req = LimitsRequest {
            timeout_ms: Some(200),
            ..LimitsRequest::default()
        };
        let (c, msg) = code(e.run_with(&bin, b"", req).await);
        assert_eq!(c, ErrorCode::Timeout, "{msg}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        still_serving(&e).await;
    }
}
