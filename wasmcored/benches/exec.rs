//! Per-execution cost in-process: `uppercase` with an 11-byte input through the executor
//! (fuel on and off) against bare Wasmtime (pooling allocator, sync call, no limits) in the
//! same run, and the cost of fuel metering on a CPU-bound guest. Also one row per other
//! kind against bare Wasmtime running the same binary: an Extism call (`count_vowels`, with
//! the least host glue that runs it) and a component command (`sort`, through
//! wasmtime-wasi's `CommandPre`).
//!
//! Run: `cargo bench -p wasmcored --bench exec` (after `make plugins`). Rounds alternate
//! between the variants and the median round is reported, so background noise hits all
//! variants alike. Only ratios are meaningful across machines.

use std::sync::Arc;
use std::time::Instant;

use wasmcore_proto::LimitsRequest;
use wasmcored::Tenant;
use wasmcored::config::Config;
use wasmcored::engine::WasmEngine;
use wasmcored::executor::Executor;
use wasmcored::registry::{Binary, LoadOptions, Registry};
use wasmcored::state::{MemoryStateStore, StateStore};
use wasmtime::{
    Engine, InstanceAllocationStrategy, Linker, Module, PoolingAllocationConfig, Store,
};

const INPUT: &[u8] = b"hello world";
const ROUNDS: usize = 7;

struct Daemonless {
    registry: Registry,
    exec: Executor,
}

/// `BENCH_POOL_INSTANCES`: a pool of that many slots for every engine of the bench, small
/// enough for valgrind (`BENCH_POOL_INSTANCES=4 valgrind --tool=callgrind`), whose address
/// space cannot hold the default pool's reservation.
fn small_pool() -> Option<u32> {
    std::env::var("BENCH_POOL_INSTANCES")
        .ok()
        .and_then(|n| n.parse().ok())
}

fn daemonless(fuel: bool) -> Daemonless {
    daemonless_with(|c| c.engine.fuel_metering = fuel)
}

fn daemonless_with(f: impl FnOnce(&mut Config)) -> Daemonless {
    let mut c = Config::default();
    if let Some(n) = small_pool() {
        c.engine.pool_instances = n;
        c.engine.max_unused_warm_slots = n;
    }
    f(&mut c);
    let engine = WasmEngine::new(&c.engine, &c.limits).expect("engine");
    let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
    let live = wasmcored::config::live(c.clone());
    let registry = Registry::new(engine.clone(), live.clone(), state.clone()).expect("registry");
    let exec = Executor::new(engine, state, live);
    Daemonless { registry, exec }
}

fn load(d: &Daemonless, bytes: &[u8]) -> Arc<Binary> {
    let owner = Tenant::new(1000, 1000, vec![], &[]);
    let compiled = d.registry.compile(bytes).expect("compile");
    d.registry
        .insert(&owner, compiled, LoadOptions::default())
        .expect("insert")
}

/// Nanoseconds per execution through the executor.
fn executor_ns(
    rt: &tokio::runtime::Runtime,
    d: &Daemonless,
    bin: &Binary,
    input: &[u8],
    iters: usize,
) -> f64 {
    executor_fn_ns(rt, d, bin, None, input, iters)
}

/// Nanoseconds per execution of `function` (an Extism plugin's; `None`: the only one)
/// through the executor.
fn executor_fn_ns(
    rt: &tokio::runtime::Runtime,
    d: &Daemonless,
    bin: &Binary,
    function: Option<&str>,
    input: &[u8],
    iters: usize,
) -> f64 {
    let limits = d
        .exec
        .resolve_limits(&LimitsRequest::default())
        .expect("limits");
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..iters {
            let out = d
                .exec
                .execute(bin, function, 1000, input.to_vec(), &limits)
                .await
                .expect("execute");
            std::hint::black_box(out);
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    })
}

/// A state directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("wasmcore-exec-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("state dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon in this process (as a tenant's worker has it, without the broker) with the
/// plugin loaded by tenant 1000, and the execute line that names it.
fn request_daemon(bytes: &[u8]) -> (Arc<wasmcored::Daemon>, Tenant, Vec<u8>, TempDir) {
    let dir = TempDir::new();
    let mut c = Config {
        state_dir: dir.0.clone(),
        ..Config::default()
    };
    if let Some(n) = small_pool() {
        c.engine.pool_instances = n;
        c.engine.max_unused_warm_slots = n;
    }
    // The state directory is made as the broker makes it; the worker attaches to it.
    wasmcored::store::StateDir::open(&c.state_dir)
        .and_then(|s| s.prepare_tenant(1000))
        .expect("state dir");
    let daemon =
        wasmcored::Daemon::new(c, wasmcored::tenant::Scope::Tenant(1000), None).expect("daemon");
    let tenant = Tenant::new(1000, 1000, vec![], &[]);
    let compiled = daemon.registry.compile(bytes).expect("compile");
    let bin = daemon
        .registry
        .insert(&tenant, compiled, LoadOptions::default())
        .expect("insert");
    let line = format!(
        r#"{{"op":"execute","binary":"{}","input":"{}"}}"#,
        bin.id,
        std::str::from_utf8(INPUT).expect("utf-8")
    );
    (daemon, tenant, line.into_bytes(), dir)
}

/// Nanoseconds per request line through the daemon's request path: decode, dispatch (the
/// name lookup, quotas, the executor, metrics), encode the response line. No socket.
fn request_ns(
    rt: &tokio::runtime::Runtime,
    d: &(Arc<wasmcored::Daemon>, Tenant, Vec<u8>, TempDir),
    iters: usize,
) -> f64 {
    use wasmcore_proto::{Response, decode_request, encode_line_into};
    let (daemon, tenant, line, _) = d;
    let mut out = Vec::with_capacity(4096);
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..iters {
            let mut req = decode_request(line).expect("decode");
            let tag = req.take_tag();
            let reply = wasmcored::cmd::dispatch(
                daemon,
                tenant,
                req,
                Vec::new(),
                wasmcored::cmd::Origin::Client,
            )
            .await
            .expect("execute");
            encode_line_into(&Response::success(tag, reply), &mut out);
            std::hint::black_box(&out);
            out.clear();
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    })
}

/// The bare embedding: pooling allocator, `InstancePre`, sync calls, output into a Vec.
struct Bare {
    engine: Engine,
    pre: wasmtime::InstancePre<Vec<u8>>,
    /// Each store gets an epoch deadline and a fuel budget (the engine meters both).
    limited: bool,
}

/// `tuned`: the daemon's memory settings (keep resident + PAGEMAP_SCAN, compiled-in bounds
/// checks), so the ratio isolates the executor's own work; otherwise Wasmtime's defaults.
fn bare(bytes: &[u8], tuned: bool) -> Bare {
    bare_with(bytes, tuned, false)
}

/// The floor of one execution: the daemon's pool tuning, and an epoch deadline and fuel
/// as every execution of the daemon has them; nothing else.
fn floor(bytes: &[u8]) -> Bare {
    bare_with(bytes, true, true)
}

fn bare_with(bytes: &[u8], tuned: bool, limited: bool) -> Bare {
    let mut c = wasmtime::Config::new();
    c.epoch_interruption(limited).consume_fuel(limited);
    let mut pool = PoolingAllocationConfig::default();
    if tuned {
        let d = Config::default();
        pool.linear_memory_keep_resident(d.engine.memory_keep_resident)
            .table_keep_resident(d.engine.memory_keep_resident)
            .pagemap_scan(wasmtime::Enabled::Auto)
            .max_memory_size((d.limits.max_memory_mb as usize) << 20);
        if let Some(n) = small_pool() {
            pool.total_memories(n)
                .total_core_instances(n)
                .total_tables(n)
                .max_unused_warm_slots(n);
        }
        c.signals_based_traps(false)
            .memory_guard_size(0)
            .memory_reservation(d.limits.max_memory_mb << 20);
    }
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&c).expect("engine");
    let module = Module::new(&engine, bytes).expect("module");
    let mut linker: Linker<Vec<u8>> = Linker::new(&engine);
    linker
        .func_wrap(
            "host",
            "output",
            |mut caller: wasmtime::Caller<'_, Vec<u8>>, ptr: i32, len: i32| {
                let mem = caller
                    .get_export("memory")
                    .and_then(|e| e.into_memory())
                    .expect("memory");
                let (data, out) = mem.data_and_store_mut(&mut caller);
                out.extend_from_slice(&data[ptr as usize..(ptr + len) as usize]);
            },
        )
        .expect("output");
    // uppercase imports only `output`; anything else would trap if called.
    linker
        .define_unknown_imports_as_traps(&module)
        .expect("stubs");
    let pre = linker.instantiate_pre(&module).expect("pre");
    Bare {
        engine,
        pre,
        limited,
    }
}

fn bare_ns(b: &Bare, input: &[u8], iters: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        let mut store = Store::new(&b.engine, Vec::new());
        if b.limited {
            store.set_fuel(u64::MAX / 2).expect("fuel");
            store.set_epoch_deadline(1_000_000);
        }
        let instance = b.pre.instantiate(&mut store).expect("instantiate");
        let memory = instance.get_memory(&mut store, "memory").expect("memory");
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "alloc")
            .expect("alloc");
        let process = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "process")
            .expect("process");
        let ptr = alloc
            .call(&mut store, input.len() as i32)
            .expect("alloc call");
        memory
            .write(&mut store, ptr as usize, input)
            .expect("write");
        let rc = process
            .call(&mut store, (ptr, input.len() as i32))
            .expect("process call");
        assert_eq!(rc, 0);
        std::hint::black_box(store.into_data());
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// The least host an Extism plugin that uses only these functions runs on: the input in a
/// Vec, blocks bump-allocated in another, the output range recorded.
#[derive(Default)]
struct MiniExtism {
    input: Vec<u8>,
    mem: Vec<u8>,
    output: (u64, u64),
}

fn bare_extism(bytes: &[u8]) -> (Engine, wasmtime::InstancePre<MiniExtism>) {
    let mut c = wasmtime::Config::new();
    tune(&mut c);
    let engine = Engine::new(&c).expect("engine");
    let module = Module::new(&engine, bytes).expect("module");
    let mut l: Linker<MiniExtism> = Linker::new(&engine);
    type C<'a> = wasmtime::Caller<'a, MiniExtism>;
    let m = "extism:host/env";
    l.func_wrap(m, "alloc", |mut c: C<'_>, n: i64| {
        let mem = &mut c.data_mut().mem;
        let h = mem.len() as i64 + 1;
        mem.resize(mem.len() + n as usize, 0);
        h
    })
    .expect("alloc");
    l.func_wrap(m, "input_length", |c: C<'_>| c.data().input.len() as i64)
        .expect("input_length");
    l.func_wrap(m, "input_load_u8", |c: C<'_>, o: i64| {
        c.data().input[o as usize] as i32
    })
    .expect("input_load_u8");
    l.func_wrap(m, "input_load_u64", |c: C<'_>, o: i64| {
        let i = &c.data().input[o as usize..o as usize + 8];
        i64::from_le_bytes(i.try_into().expect("8 bytes"))
    })
    .expect("input_load_u64");
    l.func_wrap(m, "store_u8", |mut c: C<'_>, p: i64, v: i32| {
        c.data_mut().mem[p as usize - 1] = v as u8;
    })
    .expect("store_u8");
    l.func_wrap(m, "store_u64", |mut c: C<'_>, p: i64, v: i64| {
        let at = p as usize - 1;
        c.data_mut().mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
    })
    .expect("store_u64");
    l.func_wrap(m, "output_set", |mut c: C<'_>, p: i64, n: i64| {
        c.data_mut().output = (p as u64, n as u64);
    })
    .expect("output_set");
    l.func_wrap(m, "error_set", |_: C<'_>, _: i64| {})
        .expect("error_set");
    let pre = l.instantiate_pre(&module).expect("pre");
    (engine, pre)
}

fn bare_extism_ns(
    b: &(Engine, wasmtime::InstancePre<MiniExtism>),
    func: &str,
    input: &[u8],
    iters: usize,
) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        let mut store = Store::new(
            &b.0,
            MiniExtism {
                input: input.to_vec(),
                ..MiniExtism::default()
            },
        );
        let instance = b.1.instantiate(&mut store).expect("instantiate");
        let f = instance
            .get_typed_func::<(), i32>(&mut store, func)
            .expect("function");
        assert_eq!(f.call(&mut store, ()).expect("call"), 0);
        let d = store.into_data();
        let (off, len) = (d.output.0 as usize - 1, d.output.1 as usize);
        std::hint::black_box(d.mem[off..off + len].to_vec());
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// A component command's store in the bare embedding.
struct P2State {
    ctx: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for P2State {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

fn bare_component(bytes: &[u8]) -> (Engine, wasmtime_wasi::p2::bindings::CommandPre<P2State>) {
    let mut c = wasmtime::Config::new();
    tune(&mut c);
    let engine = Engine::new(&c).expect("engine");
    let component = wasmtime::component::Component::new(&engine, bytes).expect("component");
    let mut l = wasmtime::component::Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut l).expect("wasi");
    let pre =
        wasmtime_wasi::p2::bindings::CommandPre::new(l.instantiate_pre(&component).expect("pre"))
            .expect("command");
    (engine, pre)
}

fn bare_component_ns(
    rt: &tokio::runtime::Runtime,
    b: &(Engine, wasmtime_wasi::p2::bindings::CommandPre<P2State>),
    input: &[u8],
    iters: usize,
) -> f64 {
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..iters {
            let stdout = MemoryOutputPipe::new(1 << 20);
            let mut w = wasmtime_wasi::WasiCtxBuilder::new();
            w.stdin(MemoryInputPipe::new(input.to_vec()))
                .stdout(stdout.clone());
            let mut store = Store::new(
                &b.0,
                P2State {
                    ctx: w.build(),
                    table: wasmtime::component::ResourceTable::new(),
                },
            );
            let cmd =
                b.1.instantiate_async(&mut store)
                    .await
                    .expect("instantiate");
            let r = cmd.wasi_cli_run().call_run(&mut store).await.expect("run");
            assert!(r.is_ok());
            std::hint::black_box(stdout.contents());
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    })
}

/// The daemon's memory settings on a bare engine (as `bare(.., true)` sets them).
fn tune(c: &mut wasmtime::Config) {
    let d = Config::default();
    let mut pool = PoolingAllocationConfig::default();
    pool.linear_memory_keep_resident(d.engine.memory_keep_resident)
        .table_keep_resident(d.engine.memory_keep_resident)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .max_memory_size((d.limits.max_memory_mb as usize) << 20);
    c.signals_based_traps(false)
        .memory_guard_size(0)
        .memory_reservation(d.limits.max_memory_mb << 20)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
}

/// The other kinds against bare Wasmtime running the same binary, rounds alternating.
fn kinds(rt: &tokio::runtime::Runtime, d: &Daemonless, iters: usize) {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
    let vowels = std::fs::read(dist.join("count_vowels.wasm")).expect("count_vowels.wasm");
    let sort = std::fs::read(dist.join("sort.wasm")).expect("sort.wasm");
    let sort_input = b"pear\napple\nfig\n";
    let (xb, xd) = (bare_extism(&vowels), load(d, &vowels));
    let (cb, cd) = (bare_component(&sort), load(d, &sort));
    let citers = (iters / 10).max(100);
    bare_extism_ns(&xb, "count_vowels", INPUT, 200);
    executor_fn_ns(rt, d, &xd, Some("count_vowels"), INPUT, 200);
    bare_component_ns(rt, &cb, sort_input, 50);
    executor_ns(rt, d, &cd, sort_input, 50);
    let (mut xbr, mut xdr, mut cbr, mut cdr) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        xbr.push(bare_extism_ns(&xb, "count_vowels", INPUT, iters));
        xdr.push(executor_fn_ns(
            rt,
            d,
            &xd,
            Some("count_vowels"),
            INPUT,
            iters,
        ));
        cbr.push(bare_component_ns(rt, &cb, sort_input, citers));
        cdr.push(executor_ns(rt, d, &cd, sort_input, citers));
    }
    println!("the other kinds, each against bare Wasmtime on the same binary (median round)");
    for (label, bare, ours) in [
        ("extism: count_vowels, 11 bytes", median(xbr), median(xdr)),
        ("component: sort, 3 lines", median(cbr), median(cdr)),
    ] {
        println!("  {label}");
        println!(
            "    bare wasmtime                      {:>8.2} us",
            bare / 1000.0
        );
        println!(
            "    executor                           {:>8.2} us   {:.2}x bare",
            ours / 1000.0,
            ours / bare
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    // Guests run inline on the bench's thread, as on a worker's runtime threads.
    wasmcored::engine::on_guest_thread(&Config::default().engine, bench);
}

fn bench() {
    let plugin =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/uppercase.wasm");
    let bytes = std::fs::read(&plugin)
        .unwrap_or_else(|e| panic!("{}: {e} (run make plugins first)", plugin.display()));
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let with_fuel = daemonless(true);
    let bin_fuel = load(&with_fuel, &bytes);
    // `--executor-us`: only the executor's cost with the daemon's defaults, as a bare
    // number of µs, for the socket bench to compare the daemon's CPU per request with.
    if std::env::args().any(|a| a == "--executor-us") {
        executor_ns(&rt, &with_fuel, &bin_fuel, INPUT, 1000);
        let runs = (0..ROUNDS).map(|_| executor_ns(&rt, &with_fuel, &bin_fuel, INPUT, iters));
        println!("{:.2}", median(runs.collect()) / 1000.0);
        return;
    }
    // `--floor-us`: only the bare-Wasmtime floor of one execution, in µs, the unit in which
    // the socket bench reports the daemon's CPU per request.
    if std::env::args().any(|a| a == "--floor-us") {
        let fl = floor(&bytes);
        bare_ns(&fl, INPUT, 1000);
        let runs = (0..ROUNDS).map(|_| bare_ns(&fl, INPUT, iters));
        println!("{:.2}", median(runs.collect()) / 1000.0);
        return;
    }
    // `--floor-parallel-us`: the floor with every CPU running executions at once (one
    // thread each, each with an engine and module of its own, as a worker's threads have
    // them): process CPU time per execution, in µs. What the floor costs when the cores
    // share the address space, the caches and the kernel, as under a socket load.
    if std::env::args().any(|a| a == "--floor-parallel-us") {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let floors: Vec<Bare> = (0..threads).map(|_| floor(&bytes)).collect();
        for fl in &floors {
            bare_ns(fl, INPUT, 1000);
        }
        let runs = (0..ROUNDS).map(|_| {
            let cpu = || {
                use nix::sys::resource::{UsageWho, getrusage};
                let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
                let ns =
                    |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e9 + t.tv_usec() as f64 * 1e3;
                ns(u.user_time()) + ns(u.system_time())
            };
            let before = cpu();
            std::thread::scope(|s| {
                for fl in &floors {
                    s.spawn(move || bare_ns(fl, INPUT, iters));
                }
            });
            (cpu() - before) / (iters * threads) as f64
        });
        println!("{:.2}", median(runs.collect()) / 1000.0);
        return;
    }
    // `--request-us`: only the request path's cost (decode, dispatch, encode), in µs.
    if std::env::args().any(|a| a == "--request-us") {
        let d = request_daemon(&bytes);
        request_ns(&rt, &d, 1000);
        let runs = (0..ROUNDS).map(|_| request_ns(&rt, &d, iters));
        println!("{:.2}", median(runs.collect()) / 1000.0);
        return;
    }
    // `--kinds`: only the rows of the other kinds.
    if std::env::args().any(|a| a == "--kinds") {
        kinds(&rt, &with_fuel, iters);
        return;
    }
    let without_fuel = daemonless(false);
    let bin_nofuel = load(&without_fuel, &bytes);
    let b = bare(&bytes, false);
    let bt = bare(&bytes, true);
    let fl = floor(&bytes);
    let rd = request_daemon(&bytes);
    // Warm up every variant (pool slots, code, caches).
    bare_ns(&b, INPUT, 1000);
    bare_ns(&bt, INPUT, 1000);
    bare_ns(&fl, INPUT, 1000);
    executor_ns(&rt, &with_fuel, &bin_fuel, INPUT, 1000);
    executor_ns(&rt, &without_fuel, &bin_nofuel, INPUT, 1000);
    request_ns(&rt, &rd, 1000);

    let (mut bare_r, mut tuned_r, mut floor_r, mut fuel_r, mut nofuel_r, mut req_r) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..ROUNDS {
        bare_r.push(bare_ns(&b, INPUT, iters));
        tuned_r.push(bare_ns(&bt, INPUT, iters));
        floor_r.push(bare_ns(&fl, INPUT, iters));
        fuel_r.push(executor_ns(&rt, &with_fuel, &bin_fuel, INPUT, iters));
        nofuel_r.push(executor_ns(&rt, &without_fuel, &bin_nofuel, INPUT, iters));
        req_r.push(request_ns(&rt, &rd, iters));
    }
    let (bare_m, tuned_m, floor_m) = (median(bare_r), median(tuned_r), median(floor_r));
    let (fuel_m, nofuel_m, req_m) = (median(fuel_r), median(nofuel_r), median(req_r));
    println!(
        "per-execution cost, uppercase, 11-byte input ({ROUNDS} rounds x {iters}, median round)"
    );
    println!(
        "  bare wasmtime, default pooling       {:>8.2} us",
        bare_m / 1000.0
    );
    println!(
        "  bare wasmtime, daemon's pool tuning  {:>8.2} us   (baseline)",
        tuned_m / 1000.0
    );
    let row = |what: &str, v: f64| {
        println!(
            "  {what:<36} {:>8.2} us   {:.2}x baseline",
            v / 1000.0,
            v / tuned_m
        )
    };
    row("bare wasmtime floor (+ epoch, fuel)", floor_m);
    row("executor, fuel metering on", fuel_m);
    row("executor, fuel metering off", nofuel_m);
    row("request line: decode, dispatch, encode", req_m);
    println!(
        "  executor, fuel metering on / floor   {:>8.2}x   (the executor's overhead in floors: {:.2})",
        fuel_m / floor_m,
        fuel_m / floor_m - 1.0
    );
    println!(
        "  request line / floor                 {:>8.2}x   (decode, dispatch, encode: {:.2} floors beyond the executor)",
        req_m / floor_m,
        (req_m - fuel_m) / floor_m
    );
    kinds(&rt, &with_fuel, iters);

    // Inline on a runtime worker (what the daemon does) vs a hop to the blocking pool per
    // execution, on a 2-worker multi-threaded runtime like the daemon's.
    let mut mt = tokio::runtime::Builder::new_multi_thread();
    let mt = wasmcored::engine::guest_threads(&mut mt, &Config::default().engine)
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shared = Arc::new(daemonless(true));
    let sbin = load(&shared, &bytes);
    let (mut inline_r, mut hop_r) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (d, b) = (shared.clone(), sbin.clone());
        inline_r.push(mt.block_on(async move {
            tokio::spawn(async move {
                let limits = d
                    .exec
                    .resolve_limits(&LimitsRequest::default())
                    .expect("limits");
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(
                        d.exec
                            .execute(&b, None, 1000, INPUT.to_vec(), &limits)
                            .await
                            .expect("execute"),
                    );
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .await
            .expect("task")
        }));
        let (d, b) = (shared.clone(), sbin.clone());
        hop_r.push(mt.block_on(async move {
            tokio::spawn(async move {
                let t = Instant::now();
                for _ in 0..iters {
                    let (d, b) = (d.clone(), b.clone());
                    let out = tokio::task::spawn_blocking(move || {
                        let limits = d
                            .exec
                            .resolve_limits(&LimitsRequest::default())
                            .expect("limits");
                        tokio::runtime::Handle::current().block_on(d.exec.execute(
                            &b,
                            None,
                            1000,
                            INPUT.to_vec(),
                            &limits,
                        ))
                    })
                    .await
                    .expect("blocking task");
                    std::hint::black_box(out.expect("execute"));
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .await
            .expect("task")
        }));
    }
    let (inline_m, hop_m) = (median(inline_r), median(hop_r));
    println!("the same on a 2-worker multi-threaded runtime");
    println!(
        "  inline on a worker (the daemon)      {:>8.2} us",
        inline_m / 1000.0
    );
    println!(
        "  spawn_blocking hop per execution     {:>8.2} us   +{:.2} us per hop",
        hop_m / 1000.0,
        (hop_m - inline_m) / 1000.0
    );

    // What fuel costs on guests that do real work.
    let spin = wat::parse_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spin.wat"),
    )
    .expect("spin.wat");
    let hash = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/hash.wasm"),
    )
    .expect("hash.wasm");
    let fuel_pair = Pair {
        rt: &rt,
        a: ("fuel metering off", &without_fuel),
        b: ("fuel metering on", &with_fuel),
    };
    let spin_input = 20_000_000u32.to_le_bytes();
    let hash_input = vec![0x5au8; 1 << 20];
    fuel_pair.measure(
        "CPU-bound guest (20M-iteration loop)",
        &spin,
        &spin_input,
        3,
    );
    fuel_pair.measure("hash plugin, SHA-256 of 1 MiB", &hash, &hash_input, 10);

    // Compiled-in bounds checks (the default) against guard pages and signals.
    let guarded = daemonless_with(|c| c.engine.guard_pages = true);
    let guard_pair = Pair {
        rt: &rt,
        a: ("compiled-in bounds checks", &with_fuel),
        b: ("guard pages", &guarded),
    };
    guard_pair.measure("hash plugin, SHA-256 of 1 MiB", &hash, &hash_input, 10);
    guard_pair.measure(
        "CPU-bound guest (20M-iteration loop)",
        &spin,
        &spin_input,
        3,
    );
    guard_pair.measure("uppercase, one thread", &bytes, INPUT, iters);
    guard_pair.measure_parallel("uppercase, two threads at once", &bytes, INPUT, iters);
}

/// The same module run by two differently configured executors, rounds alternating.
struct Pair<'a> {
    rt: &'a tokio::runtime::Runtime,
    a: (&'static str, &'a Daemonless),
    b: (&'static str, &'a Daemonless),
}

impl Pair<'_> {
    fn measure(&self, label: &str, module: &[u8], input: &[u8], iters: usize) {
        let (bin_a, bin_b) = (load(self.a.1, module), load(self.b.1, module));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            a.push(executor_ns(self.rt, self.a.1, &bin_a, input, iters));
            b.push(executor_ns(self.rt, self.b.1, &bin_b, input, iters));
        }
        self.report(label, median(a), median(b));
    }

    /// Two threads executing at once, each on its own single-threaded runtime (as the
    /// daemon's workers do); the mean time per execution of the two.
    fn measure_parallel(&self, label: &str, module: &[u8], input: &[u8], iters: usize) {
        let (bin_a, bin_b) = (load(self.a.1, module), load(self.b.1, module));
        let run = |d: &Daemonless, bin: &Binary| {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("runtime");
                            executor_ns(&rt, d, bin, input, iters)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .sum::<f64>()
                    / 2.0
            })
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            a.push(run(self.a.1, &bin_a));
            b.push(run(self.b.1, &bin_b));
        }
        self.report(label, median(a), median(b));
    }

    fn report(&self, label: &str, a: f64, b: f64) {
        println!("{label}, median of 5");
        let unit = |v: f64| {
            if a >= 1e6 {
                format!("{:>8.2} ms", v / 1e6)
            } else {
                format!("{:>8.2} us", v / 1e3)
            }
        };
        println!("  {:<36} {}", self.a.0, unit(a));
        println!("  {:<36} {}   {:.2}x", self.b.0, unit(b), b / a);
    }
}
