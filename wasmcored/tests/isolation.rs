//! Isolation between executions stays exact under every reset setting the daemon offers:
//! an execution leaves secrets in linear memory (in a data segment's bytes, beyond them and
//! in a page it grew), in a mutable global and in table slots (and a grown table); every
//! later execution of the same binary must see only the module's initial data, whether
//! it runs right after on the same worker (the same pool slot, warm) or concurrently with
//! others on a multi-threaded runtime.

#[allow(dead_code)] // each test binary uses a part of the shared helpers
mod support;

use std::sync::Arc;

use support::{config, env_with, fixture};
use wasmcored::config::Config;

/// What `leave_secrets.wat` reports when it finds the module's initial state.
fn initial_report() -> Vec<u8> {
    let mut r = b"INIT".to_vec();
    for v in [0i32, 7, 1, 1, 2, 4] {
        r.extend(v.to_le_bytes());
    }
    r
}

/// Every engine setting that changes how a pool slot is reset between executions.
fn variants() -> Vec<(String, Config)> {
    let mut out = Vec::new();
    for guard_pages in [false, true] {
        for keep in [0usize, 64 << 10, 2 << 20, 64 << 20] {
            for warm in [0u32, 64] {
                let mut c = config();
                c.engine.guard_pages = guard_pages;
                c.engine.memory_keep_resident = keep;
                c.engine.max_unused_warm_slots = warm;
                c.engine.pool_instances = 8;
                out.push((
                    format!("guard_pages={guard_pages} keep_resident={keep} warm_slots={warm}"),
                    c,
                ));
            }
        }
    }
    out
}

both_ways! {
    #[tokio::test]
    async fn one_after_another_each_execution_sees_only_the_initial_data() {
        let want = initial_report();
        for (what, c) in variants() {
            let env = env_with(c);
            let bin = env.load(&fixture("leave_secrets.wat"));
            for i in 0..20 {
                let r = env.run(&bin, b"").await.expect("execute");
                assert_eq!(
                    r.output, want,
                    "{what}: execution {i} saw an earlier one's data"
                );
            }
            // A different binary in between takes the slot, then the first comes back.
            let other = env.load(&fixture("upper.wat"));
            env.run(&other, b"x").await.expect("other binary");
            let r = env.run(&bin, b"").await.expect("execute");
            assert_eq!(r.output, want, "{what}: after another binary used the slot");
        }
    }
}

#[test]
fn concurrent_executions_each_see_only_the_initial_data() {
    let want = Arc::new(initial_report());
    // Guests on fibres (a plain runtime), then inline (a runtime built as a worker's).
    let plain = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let inline = support::inline_runtime(2);
    for ((what, c), (how, rt)) in variants()
        .into_iter()
        .flat_map(|v| [(v.clone(), ("fibres", &plain)), (v, ("inline", &inline))])
    {
        let env = Arc::new(env_with(c));
        let bin = env.load(&fixture("leave_secrets.wat"));
        rt.block_on(async {
            let tasks: Vec<_> = (0..6)
                .map(|_| {
                    let (env, bin, want) = (env.clone(), bin.clone(), want.clone());
                    tokio::spawn(async move {
                        for _ in 0..50 {
                            let r = env.run(&bin, b"").await.expect("execute");
                            assert_eq!(r.output, *want);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await
                    .unwrap_or_else(|_| panic!("{what}, {how}: an execution saw another's data"));
            }
        });
    }
}
