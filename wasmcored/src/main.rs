//! wasmcored: parse flags, take the listeners before any thread starts, build the runtime,
//! run the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The wasm-core daemon: keeps compiled WebAssembly modules in memory and runs them for
/// tenants connecting to its Unix socket.
#[derive(Debug, Parser)]
#[command(name = "wasmcored", version, about, long_about = None)]
struct Args {
    /// Socket path to bind when systemd passes no listener (repeatable).
    #[arg(long = "listen", value_name = "PATH")]
    listen: Vec<PathBuf>,
    /// Directory for persistent state.
    #[arg(long, value_name = "DIR", env = "STATE_DIRECTORY")]
    state_dir: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
    /// Most concurrent connections.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Concurrent instances in the pool (the cap on concurrent executions).
    #[arg(long, value_name = "N")]
    pool_instances: Option<u32>,
    /// Disable fuel metering (faster guests; `fuel` requests are then refused).
    #[arg(long)]
    no_fuel: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    wasmcored::logging::init(args.log_level);
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let mut config = wasmcored::Config::default();
    // Take systemd's listeners first: listenfd reads and clears the environment, which is
    // only sound while this is the only thread.
    let mut listeners = wasmcored::systemd::take_activated()?;
    if !args.listen.is_empty() {
        config.server.listen = args.listen.clone();
    }
    config.state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/wasm-core"));
    if let Some(n) = args.max_connections {
        config.server.max_connections = n;
    }
    if let Some(n) = args.pool_instances {
        config.engine.pool_instances = n;
    }
    if args.no_fuel {
        config.engine.fuel_metering = false;
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        anyhow::anyhow!(
            "creating state directory {}: {e}",
            config.state_dir.display()
        )
    })?;
    let daemon = wasmcored::Daemon::new(config)?;
    if listeners.is_empty() {
        for path in &daemon.config.server.listen {
            listeners.push(wasmcored::systemd::bind(path)?);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmcored")
        .build()?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.block_on(wasmcored::run(daemon, listeners, stop_rx))?;
    // Guests still running past the grace period are abandoned with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
