//! The execution engine in-process: registry, executor, plugin ABI, limits, example plugins.

mod support;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;
use wasmcore_proto::{ErrorCode, LimitsRequest, ModuleKind};
use wasmcored::Tenant;
use wasmcored::registry::{Access, LoadOptions};

fn limits(
    timeout_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
    fuel: Option<u64>,
) -> LimitsRequest {
    LimitsRequest {
        timeout_ms,
        memory_limit_mb,
        fuel,
    }
}

/// `n` tasks each running `bin` with no input and a timeout of `timeout_ms`.
fn spawn_runs(
    e: &std::sync::Arc<Env>,
    bin: &std::sync::Arc<wasmcored::registry::Binary>,
    n: usize,
    timeout_ms: u64,
) -> Vec<tokio::task::JoinHandle<Result<(), wasmcored::error::Error>>> {
    (0..n)
        .map(|_| {
            let (e, bin) = (e.clone(), bin.clone());
            tokio::spawn(async move {
                e.run_with(&bin, b"", limits(Some(timeout_ms), None, None))
                    .await
                    .map(|_| ())
            })
        })
        .collect()
}

both_ways! {
    #[tokio::test]
    async fn every_byte_value_round_trips_exactly() {
        let e = env();
        let bin = e.load(&fixture("echo.wat"));
        let input: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let out = e.run(&bin, &input).await.unwrap();
        assert_eq!(out.output, input);
        let out = e.run(&bin, b"").await.unwrap();
        assert!(out.output.is_empty());
    }
}

both_ways! {
    #[tokio::test]
    async fn results_carry_accounting() {
        let e = env();
        let bin = e.load(&fixture("upper.wat"));
        let out = e.run(&bin, b"hello world").await.unwrap();
        assert_eq!(out.output, b"HELLO WORLD");
        assert!(out.stats.fuel_used.unwrap() > 0);
        assert_eq!(out.stats.memory_peak_bytes, Some(65536));
        assert_eq!(bin.stats.started(), 1);
    }
}

both_ways! {
    #[tokio::test]
    async fn example_process_plugins_give_exact_outputs() {
        let e = env();
        let upper = e.load(&plugin("uppercase"));
        assert_eq!(upper.kind, ModuleKind::Process);
        assert_eq!(
            e.run(&upper, b"hello world").await.unwrap().output,
            b"HELLO WORLD"
        );
        let bytes: Vec<u8> = (0..=255u8).collect();
        let expect: Vec<u8> = bytes.to_ascii_uppercase();
        assert_eq!(e.run(&upper, &bytes).await.unwrap().output, expect);

        let slug = e.load(&plugin("transform"));
        assert_eq!(
            e.run(&slug, b"Hello, World! 2024 edition")
                .await
                .unwrap()
                .output,
            b"hello-world-2024-edition"
        );
        let (c, _) = code(e.run(&slug, b"\xff\xfe").await);
        assert_eq!(c, ErrorCode::PluginError);

        let hash = e.load(&plugin("hash"));
        for input in [&b""[..], b"abc", &[0u8; 100_000][..]] {
            let out = e.run(&hash, input).await.unwrap();
            assert_eq!(
                String::from_utf8(out.output).unwrap(),
                hex::encode(Sha256::digest(input))
            );
        }
    }
}

both_ways! {
    #[tokio::test]
    async fn counter_keeps_state_per_tenant_and_binary() {
        let e = env();
        let counter = e.load(&plugin("counter"));
        for expect in ["1", "2", "3"] {
            assert_eq!(
                e.run(&counter, b"visits").await.unwrap().output,
                expect.as_bytes()
            );
        }
        assert_eq!(e.run(&counter, b"other").await.unwrap().output, b"1");
        // Another tenant running the same binary has its own namespace.
        let limits = e.limits(LimitsRequest::default());
        let out = e
            .exec
            .execute(&counter, None, 2000, b"visits".to_vec(), &limits)
            .await
            .unwrap();
        assert_eq!(out.output, b"1");
        assert_eq!(e.run(&counter, b"reset:visits").await.unwrap().output, b"0");
        assert_eq!(e.run(&counter, b"visits").await.unwrap().output, b"1");
    }
}

both_ways! {
    #[tokio::test]
    async fn wasi_commands_use_stdin_stdout_stderr_and_exit_status() {
        let e = env();
        let wc = e.load(&plugin("wc"));
        assert_eq!(wc.kind, ModuleKind::Wasi);
        let out = e.run(&wc, b"one two\nthree\n").await.unwrap();
        assert_eq!(out.output, b"2 3 14\n");
        let out = e.run(&wc, b"\xff\n").await.unwrap();
        assert_eq!(out.output, b"1 1 2\n");
        assert_eq!(
            out.logs,
            vec!["wc: input is not UTF-8; counting bytes".to_string()]
        );

        let linenum = e.load(&plugin("linenum"));
        let out = e.run(&linenum, b"a\nb\nc").await.unwrap();
        assert_eq!(out.output, b"     1\ta\n     2\tb\n     3\tc");
        assert_eq!(out.logs, vec!["linenum: 3 lines".to_string()]);
        let err = e.run(&linenum, b"fail").await.unwrap_err();
        let body = err.to_body();
        assert_eq!(body.code, ErrorCode::PluginError);
        assert_eq!(body.plugin_code, Some(3));
        assert_eq!(body.logs, vec!["linenum: asked to fail".to_string()]);
    }
}

both_ways! {
    #[tokio::test]
    async fn wasi_guests_get_no_environment_and_no_preopens() {
        let e = env();
        let bin = e.load(&fixture("wasi_env.wat"));
        let body = e.run(&bin, b"").await.unwrap_err().to_body();
        // 10 + 0 environment variables, and fd 3 is not a preopened directory.
        assert_eq!(body.plugin_code, Some(10));
    }
}

both_ways! {
    #[tokio::test]
    async fn infinite_loops_time_out_at_their_deadline() {
        let e = env();
        for fixture_name in ["loop.wat", "wasi_loop.wat"] {
            let bin = e.load(&fixture(fixture_name));
            let t = Instant::now();
            let (c, msg) = code(e.run_with(&bin, b"", limits(Some(200), None, None)).await);
            assert_eq!(c, ErrorCode::Timeout, "{fixture_name}: {msg}");
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(200),
                "{fixture_name} stopped early: {took:?}"
            );
            assert!(
                took < Duration::from_millis(1500),
                "{fixture_name} stopped late: {took:?}"
            );
        }
    }
}

both_ways! {
    #[tokio::test]
    async fn guests_blocked_in_wasi_calls_time_out_too() {
        let e = env();
        for fixture_name in ["sleep_process.wat", "sleep_command.wat"] {
            let bin = e.load(&fixture(fixture_name));
            let t = Instant::now();
            let (c, msg) = code(e.run_with(&bin, b"", limits(Some(200), None, None)).await);
            assert_eq!(c, ErrorCode::Timeout, "{fixture_name}: {msg}");
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_millis(1500),
                "{fixture_name}: {took:?}"
            );
        }
    }
}

both_ways! {
    #[tokio::test]
    async fn memory_is_capped() {
        let e = env();
        let bomb = e.load(&fixture("grow_bomb.wat"));
        let (c, msg) = code(e.run_with(&bomb, b"", limits(None, Some(8), None)).await);
        assert_eq!(c, ErrorCode::MemoryLimit, "{msg}");
        let big = e.load(&fixture("big_initial_memory.wat"));
        let (c, _) = code(e.run(&big, b"").await); // 128 MiB > the 64 MiB default
        assert_eq!(c, ErrorCode::MemoryLimit);
        let out = e
            .run_with(&big, b"", limits(None, Some(256), None))
            .await
            .unwrap();
        assert_eq!(out.stats.memory_peak_bytes, Some(128 << 20));
    }
}

both_ways! {
    /// With either bounds-checking mode, a memory's size is enforced exactly even in a pool slot
    /// an earlier execution grew: the bytes it wrote there are neither readable nor kept.
    #[tokio::test]
    async fn reads_past_memory_trap_in_a_slot_grown_before() {
        for guard_pages in [false, true] {
            let mut c = config();
            c.engine.guard_pages = guard_pages;
            c.engine.pool_instances = 1; // every execution reuses the one slot
            let e = env_with(c);
            let bin = e.load(&fixture("grow_and_read.wat"));
            for _ in 0..3 {
                let out = e.run(&bin, &[1]).await.unwrap();
                assert_eq!(out.output, [42], "guard_pages = {guard_pages}");
                let (c, msg) = code(e.run(&bin, &[0]).await);
                assert_eq!(c, ErrorCode::Trap, "guard_pages = {guard_pages}: {msg}");
                assert!(msg.contains("out of bounds"), "{msg}");
            }
        }
    }
}

both_ways! {
    #[tokio::test]
    async fn deep_recursion_traps_with_a_clear_message() {
        let e = env();
        let bin = e.load(&fixture("recursion.wat"));
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::Trap);
        assert!(msg.contains("stack"), "{msg}");
    }
}

both_ways! {
    #[tokio::test]
    async fn traps_carry_a_short_backtrace() {
        let e = env();
        let bin = e.load(&fixture("trap.wat"));
        let body = e.run(&bin, b"").await.unwrap_err().to_body();
        assert_eq!(body.code, ErrorCode::Trap);
        assert!(body.message.contains("unreachable"), "{}", body.message);
        assert!(body.backtrace.len() >= 3, "{:?}", body.backtrace);
        assert!(body.backtrace[0].contains("inner"), "{:?}", body.backtrace);
    }
}

both_ways! {
    #[tokio::test]
    async fn non_zero_return_is_a_plugin_error_with_code_and_logs() {
        let e = env();
        let bin = e.load(&fixture("nonzero.wat"));
        let body = e.run(&bin, b"").await.unwrap_err().to_body();
        assert_eq!(body.code, ErrorCode::PluginError);
        assert_eq!(body.plugin_code, Some(42));
        assert_eq!(body.logs, vec!["about to fail".to_string()]);
    }
}

both_ways! {
    #[tokio::test]
    async fn bad_pointers_in_every_host_call_trap_only_that_execution() {
        let e = env();
        let bin = e.load(&fixture("bad_pointers.wat"));
        for (sel, what) in [
            ("l", "host.log"),
            ("o", "host.output"),
            ("g", "host.get_state"),
            ("s", "host.set_state"),
            ("k", "host.set_state"),
            ("d", "host.delete_state"),
            ("n", "host.log"),
            ("w", "host.output"),
        ] {
            let (c, msg) = code(e.run(&bin, sel.as_bytes()).await);
            assert_eq!(c, ErrorCode::Trap, "{sel}: {msg}");
            assert!(msg.contains(what), "{sel}: {msg}");
        }
        // The binary and the executor are fine afterwards.
        assert!(e.run(&bin, b"x").await.is_ok());
        let bad_alloc = e.load(&fixture("bad_alloc.wat"));
        let (c, msg) = code(e.run(&bad_alloc, b"0123456789").await);
        assert_eq!(c, ErrorCode::Trap);
        assert!(msg.contains("alloc"), "{msg}");
    }
}

both_ways! {
    #[tokio::test]
    async fn output_is_capped() {
        let mut c = config();
        c.limits.max_output_bytes = 1 << 20;
        let e = env_with(c);
        let bin = e.load(&fixture("huge_output.wat"));
        let (c, msg) = code(e.run(&bin, b"").await);
        assert_eq!(c, ErrorCode::TooLarge, "{msg}");
    }
}

both_ways! {
    #[tokio::test]
    async fn invalid_modules_are_refused_and_leave_nothing_behind() {
        let e = env();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "not a WebAssembly binary"),
            (
                "random bytes",
                b"hello, this is not wasm".to_vec(),
                "not a WebAssembly binary",
            ),
            (
                "bad body",
                b"\0asm\x01\0\0\0\x01\xff\xff".to_vec(),
                "invalid module",
            ),
            ("no alloc", fixture("no_alloc.wat"), "no `alloc`"),
            ("no memory", fixture("no_memory.wat"), "no `memory`"),
            (
                "wrong signature",
                fixture("wrong_signature.wat"),
                "(i32, i32) -> i32",
            ),
            (
                "no entry point",
                fixture("no_entry.wat"),
                "neither `process`",
            ),
            (
                "unknown import",
                fixture("unknown_import.wat"),
                "env::system",
            ),
        ];
        for (what, bytes, expect) in cases {
            let (c, msg) = code(e.load_as(&e.owner, &bytes, LoadOptions::default()));
            assert_eq!(c, ErrorCode::InvalidModule, "{what}: {msg}");
            assert!(msg.contains(expect), "{what}: {msg}");
        }
        assert!(e.registry.is_empty());
    }
}

both_ways! {
    #[tokio::test]
    async fn module_size_is_capped() {
        let mut c = config();
        c.registry.max_module_bytes = 1000;
        let e = env_with(c);
        let (c, _) = code(e.load_as(&e.owner, &plugin("uppercase"), LoadOptions::default()));
        assert_eq!(c, ErrorCode::TooLarge);
        assert!(e.registry.is_empty());
    }
}

both_ways! {
    #[tokio::test]
    async fn state_writes_are_kept_on_success_only_and_quota_is_enforced() {
        let mut c = config();
        c.quotas.default.state_bytes = 100;
        let e = env_with(c);
        let set = e.load(&fixture("state_set.wat"));
        let get = e.load(&fixture("state_get.wat"));
        let set_trap = e.load(&fixture("state_set_then_trap.wat"));
        // Each binary has its own namespace: `get` never sees `set`'s key.
        e.run(&set, b"v1").await.unwrap();
        assert_eq!(e.run(&get, b"").await.unwrap().output, b"absent");
        assert_eq!(
            e.registry.state().usage(&wasmcored::state::Namespace {
                owner: 1000,
                binary: set.id
            }),
            3
        );
        // A failed execution's writes are discarded.
        let (c, _) = code(e.run(&set_trap, b"zz").await);
        assert_eq!(c, ErrorCode::Trap);
        assert_eq!(
            e.registry.state().usage(&wasmcored::state::Namespace {
                owner: 1000,
                binary: set_trap.id
            }),
            0
        );
        // 1 key byte + 100 value bytes is over the 100-byte quota.
        let (c, msg) = code(e.run(&set, &[7u8; 100]).await);
        assert_eq!(c, ErrorCode::QuotaExceeded, "{msg}");
        // Unloading removes the state.
        e.registry.unload(&e.owner, &set.id.to_string()).unwrap();
        assert_eq!(
            e.registry.state().usage(&wasmcored::state::Namespace {
                owner: 1000,
                binary: set.id
            }),
            0
        );
    }
}

both_ways! {
    #[tokio::test]
    async fn fuel_is_metered_and_enforced() {
        let e = env();
        let spin = e.load(&fixture("spin.wat"));
        let small = e
            .run(&spin, &1000u32.to_le_bytes())
            .await
            .unwrap()
            .stats
            .fuel_used
            .unwrap();
        let large = e
            .run(&spin, &100_000u32.to_le_bytes())
            .await
            .unwrap()
            .stats
            .fuel_used
            .unwrap();
        assert!(
            large > small * 50,
            "fuel should grow with work: {small} vs {large}"
        );
        let (c, msg) = code(
            e.run_with(
                &spin,
                &100_000u32.to_le_bytes(),
                limits(None, None, Some(small)),
            )
            .await,
        );
        assert_eq!(c, ErrorCode::OutOfFuel, "{msg}");
        // Deterministic: the same work costs the same fuel.
        let again = e
            .run(&spin, &1000u32.to_le_bytes())
            .await
            .unwrap()
            .stats
            .fuel_used
            .unwrap();
        assert_eq!(small, again);
    }
}

both_ways! {
    #[tokio::test]
    async fn fuel_requests_are_refused_without_metering() {
        let mut c = config();
        c.engine.fuel_metering = false;
        let e = env_with(c);
        let bin = e.load(&fixture("upper.wat"));
        assert_eq!(e.run(&bin, b"x").await.unwrap().stats.fuel_used, None);
        let err = e
            .exec
            .resolve_limits(&limits(None, None, Some(10)))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }
}

both_ways! {
    #[tokio::test]
    async fn requests_may_lower_limits_but_not_raise_them() {
        let e = env();
        for req in [
            limits(Some(60_001), None, None),
            limits(None, Some(257), None),
            limits(Some(0), None, None),
            limits(None, Some(0), None),
            limits(None, None, Some(0)),
        ] {
            assert_eq!(
                e.exec.resolve_limits(&req).unwrap_err().code(),
                ErrorCode::BadRequest,
                "{req:?}"
            );
        }
        let l = e.limits(limits(Some(10), Some(1), Some(5)));
        assert_eq!(
            (l.timeout, l.memory_bytes, l.fuel),
            (Duration::from_millis(10), 1 << 20, Some(5))
        );
        let l = e.limits(LimitsRequest::default());
        assert_eq!(
            (l.timeout, l.memory_bytes),
            (Duration::from_secs(5), 64 << 20)
        );
    }
}

both_ways! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runaway_guests_do_not_block_others() {
        let e = std::sync::Arc::new(env());
        let looper = e.load(&fixture("loop.wat"));
        let upper = e.load(&fixture("upper.wat"));
        // 2 × cores infinite loops, each with its own deadline.
        let deadlines = [1000u64, 1300, 1600, 1900];
        let mut loops = Vec::new();
        for ms in deadlines {
            let (e, bin) = (e.clone(), looper.clone());
            loops.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = e.run_with(&bin, b"", limits(Some(ms), None, None)).await;
                (ms, t.elapsed(), r.map(|_| ()).map_err(|e| e.code()))
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // While all four spin, a trivial execution still answers long before any loop's deadline.
        let t = Instant::now();
        let out = e.run(&upper, b"still here").await.unwrap();
        let took = t.elapsed();
        assert_eq!(out.output, b"STILL HERE");
        assert!(
            took < Duration::from_millis(500),
            "trivial execution waited {took:?} behind runaway guests"
        );
        for l in loops {
            let (ms, took, r) = l.await.unwrap();
            assert_eq!(r, Err(ErrorCode::Timeout));
            assert!(
                took >= Duration::from_millis(ms),
                "loop with {ms} ms ended early: {took:?}"
            );
            assert!(
                took < Duration::from_millis(ms + 700),
                "loop with {ms} ms ended late: {took:?}"
            );
        }
    }
}

both_ways! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pool_answers_busy() {
        let mut c = config();
        c.engine.pool_instances = 2;
        let e = std::sync::Arc::new(env_with(c));
        let looper = e.load(&fixture("loop.wat"));
        let loops = spawn_runs(&e, &looper, 2, 700);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (c, msg) = code(e.run(&looper, b"").await);
        assert_eq!(c, ErrorCode::Busy, "{msg}");
        for l in loops {
            assert_eq!(code(l.await.unwrap()).0, ErrorCode::Timeout);
        }
    }
}

both_ways! {
    /// Guests that run long never hold the runtime's threads: with four loops running on a
    /// runtime of two threads, a timer fires and a short execution runs while every loop
    /// still runs (inline, each loop's thread hands its place in the runtime to another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_guests_leave_the_runtime_serving() {
        let mut c = config();
        c.engine.pool_instances = 8;
        let e = std::sync::Arc::new(env_with(c));
        let looper = e.load(&fixture("loop.wat"));
        let upper = e.load(&fixture("upper.wat"));
        let loops = spawn_runs(&e, &looper, 4, 3000);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = e.run(&upper, b"pear").await.unwrap();
        assert_eq!(out.output, b"PEAR");
        assert!(
            loops.iter().all(|l| !l.is_finished()),
            "the loops ended before the short execution ran"
        );
        for l in loops {
            assert_eq!(code(l.await.unwrap()).0, ErrorCode::Timeout);
        }
    }
}

both_ways! {
    /// A pool of 128 slots or more runs on one engine per CPU, each with such a pool: every
    /// engine runs every kind of binary, and the engines together hold exactly their pools'
    /// stores (a thread whose engine is full starts its store on another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engines_share_the_pool_and_run_every_binary() {
        let mut c = config();
        c.engine.pool_instances = 128;
        let e = std::sync::Arc::new(env_with(c));
        let engines = e.exec.engine().engines().len();
        assert_eq!(engines, wasmcored::engine::engines_for(128));
        assert_eq!(engines, wasmcored::engine::engines_wanted());
        assert_eq!(wasmcored::engine::engines_for(127), 1);
        let capacity = 128 * engines as u64;
        assert_eq!(e.exec.engine().pool().unwrap().capacity, capacity);
        // Each binary runs on each engine, from both runtime threads.
        let bins = [
            (e.load(&plugin("uppercase")), &b"PEAR\nAPPLE\n"[..]),
            (e.load(&plugin("wc")), b"2 2 11\n"),
            (e.load(&plugin("sort")), b"apple\npear\n"),
        ];
        assert_eq!(bins[2].0.kind, ModuleKind::Component);
        let mut runs = Vec::new();
        for i in 0..60 {
            let (e, bin) = (e.clone(), bins[i % 3].0.clone());
            runs.push(tokio::spawn(async move {
                e.run(&bin, b"pear\napple\n").await.map(|o| o.output)
            }));
        }
        for (i, r) in runs.into_iter().enumerate() {
            assert_eq!(r.await.unwrap().unwrap(), bins[i % 3].1, "run {i}");
        }
        // Fill every pool, one store at a time, from both threads: the next one is refused.
        // Executions that sleep in a host call: they hold their slots without the CPU.
        let looper = e.load(&fixture("sleep_process.wat"));
        let mut loops = Vec::new();
        let in_use = || e.exec.engine().pool().unwrap().core_instances;
        for n in 1..=capacity {
            let (e, bin) = (e.clone(), looper.clone());
            loops.push(tokio::spawn(async move {
                e.run_with(&bin, b"", limits(Some(3000), None, None))
                    .await
                    .map(|_| ())
            }));
            // Each one running before the next starts, wherever the runtime put it.
            let t = std::time::Instant::now();
            while in_use() < n && t.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(in_use(), n);
        }
        let (c, msg) = code(e.run(&looper, b"").await);
        assert_eq!(c, ErrorCode::Busy, "{msg}");
        for l in loops {
            assert_eq!(code(l.await.unwrap()).0, ErrorCode::Timeout);
        }
    }
}

both_ways! {
    /// Binaries stored by a worker with an engine per CPU come back on every engine: from
    /// the stored artifact (each engine loads the file), and, when the artifact is gone, from
    /// the original bytes (compiled once, the others load that code).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_binaries_are_restored_onto_every_engine() {
        use wasmcored::store::{BinaryMeta, RestoreReport, StateDir, restore};
        use wasmcored::tenant::Scope;
        // Unique to this run of the test (it runs in two ways at once: `both_ways!`).
        let root = std::env::temp_dir().join(format!(
            "wasmcore-engines-{}-{}",
            std::process::id(),
            std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let dir = StateDir::open(&root).unwrap();
        let mut c = config();
        c.engine.pool_instances = 128;
        let first = env_with(c.clone());
        assert_eq!(
            first.exec.engine().engines().len(),
            wasmcored::engine::engines_wanted()
        );
        let hash = first.registry.engine().compat_hash();
        let names = ["uppercase", "wc", "sort"];
        for name in names {
            let bytes = plugin(name);
            let mut compiled = first.registry.compile(&bytes).unwrap();
            let artifact = compiled.take_artifact();
            assert!(!artifact.is_empty());
            assert!(
                compiled.take_artifact().is_empty(),
                "the artifact is handed out once"
            );
            let opts = LoadOptions {
                name: Some(name.into()),
                ..LoadOptions::default()
            };
            first
                .registry
                .insert_with(&first.owner, compiled, opts, |bin| {
                    dir.save_binary(&BinaryMeta::of(bin), &bytes, &hash, &artifact)
                        .map(|_| ())
                        .map_err(|e| wasmcored::Error::internal(e.to_string()))
                })
                .unwrap();
        }
        let runs_everywhere = |e: std::sync::Arc<Env>| async move {
            // Many at once from both runtime threads: every engine runs every binary.
            let mut runs = Vec::new();
            for i in 0..60 {
                let (e, name) = (e.clone(), names[i % 3]);
                runs.push(tokio::spawn(async move {
                    let bin = e.registry.resolve(&e.owner, name, Access::Use).unwrap();
                    let got = e.run(&bin, b"pear\napple\n").await.map(|o| o.output);
                    assert_eq!(got.unwrap(), wanted(name), "{name}");
                }));
            }
            for r in runs {
                r.await.unwrap();
            }
        };
        fn wanted(name: &str) -> &'static [u8] {
            match name {
                "uppercase" => b"PEAR\nAPPLE\n",
                "wc" => b"2 2 11\n",
                _ => b"apple\npear\n",
            }
        }
        let from_artifacts = std::sync::Arc::new(env_with(c.clone()));
        let report = restore(&dir, &from_artifacts.registry, Scope::All).unwrap();
        assert_eq!(
            report,
            RestoreReport {
                restored: 3,
                recompiled: 0,
                quarantined: 0
            }
        );
        runs_everywhere(from_artifacts).await;
        // Without the artifacts: compiled from the stored bytes, and the artifacts written back.
        for entry in std::fs::read_dir(&root).unwrap() {
            remove_artifacts(&entry.unwrap().path());
        }
        fn remove_artifacts(p: &std::path::Path) {
            if p.is_dir() {
                for entry in std::fs::read_dir(p).unwrap() {
                    remove_artifacts(&entry.unwrap().path());
                }
            } else if p.to_string_lossy().contains(".cwasm") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let recompiled = std::sync::Arc::new(env_with(c.clone()));
        let report = restore(&dir, &recompiled.registry, Scope::All).unwrap();
        assert_eq!((report.restored, report.recompiled), (3, 3));
        runs_everywhere(recompiled).await;
        let again = std::sync::Arc::new(env_with(c));
        let report = restore(&dir, &again.registry, Scope::All).unwrap();
        assert_eq!((report.restored, report.recompiled), (3, 0));
        runs_everywhere(again).await;
        std::fs::remove_dir_all(&root).unwrap();
    }
}

both_ways! {
    #[tokio::test]
    async fn chains_pass_output_along_and_name_the_failing_stage() {
        let e = env();
        let upper = e.load(&plugin("uppercase"));
        let slug = e.load(&plugin("transform"));
        let hash = e.load(&plugin("hash"));
        let trap = e.load(&fixture("trap.wat"));
        let l = e.limits(LimitsRequest::default());
        let out = e
            .exec
            .chain(
                &stages([slug.clone(), upper.clone(), hash.clone()]),
                1000,
                b"Hi there!".to_vec(),
                &l,
            )
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8(out.output).unwrap(),
            hex::encode(Sha256::digest(b"HI-THERE"))
        );
        assert_eq!(out.stages.len(), 3);
        assert!(
            out.stats.fuel_used.unwrap()
                >= out.stages.iter().map(|s| s.fuel_used.unwrap()).sum::<u64>()
        );
        let body = e
            .exec
            .chain(&stages([upper, trap, hash]), 1000, b"x".to_vec(), &l)
            .await
            .unwrap_err()
            .to_body();
        assert_eq!(body.code, ErrorCode::Trap);
        assert_eq!(body.stage, Some(1));
        assert!(body.message.starts_with("stage 1:"), "{}", body.message);
    }
}

both_ways! {
    #[tokio::test]
    async fn chains_share_one_deadline() {
        let e = env();
        let looper = e.load(&fixture("loop.wat"));
        let upper = e.load(&fixture("upper.wat"));
        let l = e.limits(limits(Some(300), None, None));
        let t = Instant::now();
        let body = e
            .exec
            .chain(
                &stages([upper, looper.clone(), looper]),
                1000,
                b"x".to_vec(),
                &l,
            )
            .await
            .unwrap_err()
            .to_body();
        assert_eq!((body.code, body.stage), (ErrorCode::Timeout, Some(1)));
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
    }
}

both_ways! {
    #[tokio::test]
    async fn binaries_are_scoped_to_their_owner() {
        let e = env();
        let alice = e.owner.clone();
        let bob = Tenant::new(2000, 2000, vec![], &[]);
        let admin = Tenant::new(0, 0, vec![], &[]);
        let opts = |name: &str| LoadOptions {
            name: Some(name.into()),
            ..LoadOptions::default()
        };
        let a = e
            .load_as(&alice, &fixture("upper.wat"), opts("up"))
            .unwrap();
        // Names are unique per owner, not globally.
        assert_eq!(
            code(e.load_as(&alice, &fixture("upper.wat"), opts("up"))).0,
            ErrorCode::AlreadyExists
        );
        let b = e.load_as(&bob, &fixture("upper.wat"), opts("up")).unwrap();
        assert_eq!(
            e.registry.resolve(&alice, "up", Access::Use).unwrap().id,
            a.id
        );
        assert_eq!(
            e.registry.resolve(&bob, "up", Access::Use).unwrap().id,
            b.id
        );
        // Bob cannot see, run or unload Alice's binary; it looks absent to him.
        let a_id = a.id.to_string();
        assert_eq!(
            code(e.registry.resolve(&bob, &a_id, Access::Use)).0,
            ErrorCode::NotFound
        );
        assert_eq!(code(e.registry.unload(&bob, &a_id)).0, ErrorCode::NotFound);
        assert_eq!(e.registry.list(&bob, false).unwrap().len(), 1);
        assert_eq!(code(e.registry.list(&bob, true)).0, ErrorCode::Forbidden);
        // Admins see everything.
        assert_eq!(e.registry.list(&admin, true).unwrap().len(), 2);
        assert!(e.registry.resolve(&admin, &a_id, Access::Manage).is_ok());
        // Public binaries: only admins load them; everyone runs them; only admins unload them.
        let public = LoadOptions {
            name: Some("shared".into()),
            public: true,
            ..LoadOptions::default()
        };
        assert_eq!(
            code(e.load_as(&alice, &fixture("upper.wat"), public.clone())).0,
            ErrorCode::Forbidden
        );
        let p = e.load_as(&admin, &fixture("upper.wat"), public).unwrap();
        assert_eq!(
            e.registry.resolve(&bob, "shared", Access::Use).unwrap().id,
            p.id
        );
        assert_eq!(
            code(e.registry.unload(&bob, "shared")).0,
            ErrorCode::Forbidden
        );
        e.registry.unload(&admin, &p.id.to_string()).unwrap();
        e.registry.unload(&alice, "up").unwrap();
        assert_eq!(
            code(e.registry.resolve(&alice, "up", Access::Use)).0,
            ErrorCode::NotFound
        );
        // The name is free again.
        e.load_as(&alice, &fixture("upper.wat"), opts("up"))
            .unwrap();
    }
}

both_ways! {
    #[tokio::test]
    async fn binaries_per_owner_are_capped() {
        let mut c = config();
        c.quotas.default.binaries = 2;
        let e = env_with(c);
        let a = e.load(&fixture("upper.wat"));
        e.load(&fixture("upper.wat"));
        assert_eq!(
            code(e.load_as(&e.owner, &fixture("upper.wat"), LoadOptions::default())).0,
            ErrorCode::QuotaExceeded
        );
        e.registry.unload(&e.owner, &a.id.to_string()).unwrap();
        e.load(&fixture("upper.wat"));
    }
}

both_ways! {
    #[tokio::test]
    async fn names_are_validated() {
        let e = env();
        for bad in [
            "",
            "-x",
            "a b",
            "x/y",
            &"n".repeat(65),
            "0c3f8a4e-1b2d-4c5e-8f9a-0b1c2d3e4f50",
        ] {
            let opts = LoadOptions {
                name: Some(bad.to_string()),
                ..LoadOptions::default()
            };
            assert_eq!(
                code(e.load_as(&e.owner, &fixture("upper.wat"), opts)).0,
                ErrorCode::BadRequest,
                "{bad:?}"
            );
        }
    }
}

both_ways! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unload_lets_running_executions_finish() {
        let e = std::sync::Arc::new(env());
        let spin = e.load(&fixture("spin.wat"));
        let (e2, bin) = (e.clone(), spin.clone());
        let running = tokio::spawn(async move {
            e2.run(&bin, &300_000_000u32.to_le_bytes())
                .await
                .map(|r| r.output)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        e.registry.unload(&e.owner, &spin.id.to_string()).unwrap();
        assert_eq!(
            code(
                e.registry
                    .resolve(&e.owner, &spin.id.to_string(), Access::Use)
            )
            .0,
            ErrorCode::NotFound
        );
        assert!(
            running.await.unwrap().is_ok(),
            "the execution in progress finishes normally"
        );
    }
}
