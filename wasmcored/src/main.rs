//! wasmcored: parse flags, take the listeners before any thread starts, build the runtime,
//! run the broker (or, with `--worker`, a tenant's worker, which the broker starts).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

// mimalloc: glibc's malloc and free were 5 % of a worker's CPU under pipelined load, and
// with mimalloc the socket bench spends less CPU per request (docs/PERFORMANCE.md,
// "Per-request overhead"). Built without transparent huge pages for its heap (`no_thp`): with
// them, each process's first arena was backed by 2 MiB pages, 6-9 MiB more resident per
// process ("Restart and memory").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = wasmcored::cli::Args::parse();
    wasmcored::logging::init(
        args.log_level.unwrap_or(log::LevelFilter::Info),
        args.worker,
    );
    let result = match args.worker {
        Some(uid) => wasmcored::worker::main(uid).map(|()| ExitCode::SUCCESS),
        None => real_main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(args: wasmcored::cli::Args) -> anyhow::Result<ExitCode> {
    // Take systemd's listeners first: listenfd reads and clears the environment, which is
    // only sound while this is the only thread.
    let mut listeners = wasmcored::systemd::take_activated()?;
    if args.check_config {
        println!("{}", args.check_config().map_err(anyhow::Error::msg)?);
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.load_config().map_err(anyhow::Error::msg)?;
    log::set_max_level(config.server.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmcored")
        .build()?;
    // Before the socket exists: a stop asked for as soon as a client can connect is kept
    // for `run`, which then shuts down cleanly.
    let signals = {
        let _in_runtime = runtime.enter();
        wasmcored::Signals::install()?
    };
    let reload_args = args.clone();
    let loader: wasmcored::ConfigLoader = Box::new(move || reload_args.load_config());
    // The state directory is checked once, here, before any worker reads it.
    let store = wasmcored::store::StateDir::open(&config.state_dir)
        .map_err(|e| anyhow::anyhow!("state directory: {e}"))?;
    let scan = wasmcored::store::scan(&store)
        .map_err(|e| anyhow::anyhow!("reading stored binaries: {e}"))?;
    let mut owners: Vec<u32> = scan.binaries.iter().map(|m| m.owner).collect();
    owners.sort_unstable();
    owners.dedup();
    log::info!(
        "found {} stored binaries of {} tenants in {} ({} quarantined); each tenant's worker restores its own",
        scan.binaries.len(),
        owners.len(),
        store.root().display(),
        scan.quarantined
    );
    if listeners.is_empty() {
        for path in &config.server.listen {
            listeners.push(wasmcored::systemd::bind(path)?);
        }
    }
    let broker = {
        let _in_runtime = runtime.enter();
        wasmcored::broker::Broker::new(wasmcored::config::live(config), Arc::new(store))?
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.block_on(wasmcored::run(
        broker,
        listeners,
        signals,
        Some(loader),
        stop_rx,
    ))?;
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(ExitCode::SUCCESS)
}
