//! The daemon's command line: one clap definition (also the source of wasmcored(8)) and how
//! flags combine with the config file.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::config::{self, Config};

const AFTER_HELP: &str = "\
Processes:
  The daemon accepts connections, reads each peer's
  credentials and hands the connection to a worker
  process of that tenant (wasmcored --worker UID,
  started by the daemon), which serves it. A worker
  restores its tenant's binaries and the public ones,
  then confines itself (no_new_privs, Landlock on its
  own part of the state directory, seccomp) before it
  runs tenant code; it exits when idle
  (workers.idle_timeout_s) and is started again, with
  backoff after repeated failures, when it dies.
  Under systemd with Delegate= each worker runs in a
  cgroup of its own (tenant-UID/, the daemon in
  broker/) with cpu.weight, memory.max and pids.max
  from its quotas; the log says which mode is in force.

Signals:
  SIGHUP   reload the config file. Limits, quotas, access
           and log level change live; keys that need a
           restart are named in the log; an invalid file
           is refused and the running config kept. Then
           apply the provisioning files.
  SIGTERM  stop accepting, let in-flight requests finish
  SIGINT   (server.shutdown_grace_s), exit 0. A second
           signal exits at once.

systemd:
  Sockets come from socket activation (wasm-core.socket)
  and are never unlinked. READY=1 after the state
  directory is checked; STATUS= with counts; WATCHDOG=1
  while the daemon's loop runs (it also kills a worker
  that stops answering); RELOADING=1 and STOPPING=1.
  Under the journal, lines carry priorities.

Files:
  /etc/wasm-core/config.toml
      the config file, see wasm-core.toml(5)
  /etc/wasm-core/binaries.d/*.toml
      provisioning files, one binary each, applied at
      start and on SIGHUP (provisioning.dir); see
      wasm-core.toml(5)
  /var/lib/wasm-core
      the state directory (format 2): FORMAT,
      tenants/<uid>/ (binaries/<uuid>/, state/, tmp/,
      quarantine/), public/binaries/<uuid>/, tmp/,
      quarantine/; a format-1 directory is moved
      into it at start

See also: wasmcorectl(1), wasm-core.toml(5)";

/// The wasm-core daemon: keeps compiled WebAssembly modules in memory and runs them for
/// tenants connecting to its Unix socket.
///
/// Under systemd it takes its listening sockets from socket activation; without it, it binds
/// the `--listen` paths itself (dev mode). Flags override the config file.
#[derive(Debug, Clone, Parser)]
#[command(name = "wasmcored", version, about, long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// Config file [default: /etc/wasm-core/config.toml, used only if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the config file and exit. Stricter than a start or reload: a user or group
    /// that does not exist in allow_users, allow_groups or quotas.users is an error; a missing
    /// default file is reported as such (the defaults apply).
    #[arg(long)]
    pub check_config: bool,
    /// Socket path to bind when systemd passes no listener (repeatable) [default: /tmp/wasm-core.sock].
    #[arg(long = "listen", value_name = "PATH")]
    pub listen: Vec<PathBuf>,
    /// Directory for persistent state [default: $STATE_DIRECTORY, else /var/lib/wasm-core].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory of provisioning files, one binary each [default: /etc/wasm-core/binaries.d].
    #[arg(long, value_name = "DIR")]
    pub provisioning_dir: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug, trace [default: info].
    #[arg(long, value_name = "LEVEL", value_parser = log_level(), hide_possible_values = true)]
    pub log_level: Option<log::LevelFilter>,
    /// Most concurrent connections (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Concurrent instances in the pool (the cap on concurrent executions; at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_instances: Option<u32>,
    /// Disable fuel metering (faster loop-heavy guests; `fuel` requests are then refused).
    #[arg(long)]
    pub no_fuel: bool,
    /// Exit after this many seconds without connections (for socket activation).
    #[arg(long, value_name = "SECONDS")]
    pub exit_idle_after: Option<u64>,
    /// Run as the worker of tenant UID on the descriptors the daemon passes (started by the
    /// daemon itself, not for humans).
    #[arg(long, hide = true, value_name = "UID")]
    pub worker: Option<u32>,
}

impl Args {
    /// The config file in use.
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .unwrap_or(Path::new(config::DEFAULT_PATH))
    }

    /// What `--check-config` prints: the file checked strictly (a user or group that does
    /// not exist is an error), or that it is absent and the defaults apply.
    pub fn check_config(&self) -> Result<String, String> {
        let (c, present) = Config::load_strict(self.config_path(), self.config.is_none())?;
        self.with_flags(c)?;
        let path = self.config_path().display();
        Ok(if present {
            format!("{path}: configuration is valid")
        } else {
            format!(
                "{path}: no such file; the defaults apply (with the flags given), and they are valid"
            )
        })
    }

    /// The file (a missing default file means defaults) with the flags applied on top.
    pub fn load_config(&self) -> Result<Config, String> {
        self.with_flags(Config::load(self.config_path(), self.config.is_none())?)
    }

    /// `c` with the flags applied on top, checked.
    fn with_flags(&self, mut c: Config) -> Result<Config, String> {
        if !self.listen.is_empty() {
            c.server.listen = self.listen.clone();
        }
        if let Some(d) = &self.provisioning_dir {
            c.provisioning.dir = d.clone();
        }
        if let Some(d) = &self.state_dir {
            c.state_dir = d.clone();
        }
        if let Some(l) = self.log_level {
            c.server.log_level = l;
        }
        if let Some(n) = self.max_connections {
            c.server.max_connections = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = self.pool_instances {
            c.engine.pool_instances = n;
        }
        if self.no_fuel {
            c.engine.fuel_metering = false;
        }
        if let Some(s) = self.exit_idle_after {
            c.server.exit_idle_after = (s > 0).then(|| std::time::Duration::from_secs(s));
        }
        c.check()
            .map_err(|e| format!("{}: {e}", self.config_path().display()))?;
        Ok(c)
    }
}

/// A `--log-level` value, by name.
fn log_level() -> impl clap::builder::TypedValueParser<Value = log::LevelFilter> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"])
        .map(|s| s.parse().unwrap_or(log::LevelFilter::Info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("wasmcored-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "[server]\nmax_connections = 5\n[engine]\nfuel_metering = true\n",
        )
        .unwrap();
        let a = Args::parse_from([
            "wasmcored",
            "--config",
            f.to_str().unwrap(),
            "--max-connections",
            "9",
            "--no-fuel",
        ]);
        let c = a.load_config().unwrap();
        assert_eq!(c.server.max_connections, 9);
        assert!(!c.engine.fuel_metering);
        let a = Args::parse_from(["wasmcored", "--config", "/nonexistent.toml"]);
        assert!(a.load_config().unwrap_err().contains("/nonexistent.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
