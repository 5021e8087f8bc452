//! wasmcored: parse flags, take the listeners before any thread starts, build the runtime,
//! run the daemon.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = wasmcored::cli::Args::parse();
    wasmcored::logging::init(args.log_level.unwrap_or(log::LevelFilter::Info));
    match real_main(args) {
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
    let config = args.load_config().map_err(anyhow::Error::msg)?;
    if args.check_config {
        println!("{}: configuration is valid", args.config_path().display());
        return Ok(ExitCode::SUCCESS);
    }
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
    let loader: wasmcored::daemon::ConfigLoader = Box::new(move || reload_args.load_config());
    let daemon = wasmcored::Daemon::new(config, Some(loader))?;
    if listeners.is_empty() {
        for path in &daemon.config().server.listen {
            listeners.push(wasmcored::systemd::bind(path)?);
        }
    }
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.block_on(wasmcored::run(daemon, listeners, signals, stop_rx))?;
    // Guests still running past the grace period are abandoned with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(ExitCode::SUCCESS)
}
