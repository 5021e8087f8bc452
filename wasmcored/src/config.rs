//! Validated daemon settings.
//!
//! [`Config`] holds every tunable with the seed's defaults; [`Config::check`] rejects
//! inconsistent values with a message naming the key. Flags in `main.rs` override it.

use std::path::PathBuf;
use std::time::Duration;

/// Execution limits: defaults applied when a request names none, and maxima a request may
/// not exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    /// Fuel given to an execution that asks for none (`None`: unlimited).
    pub default_fuel: Option<u64>,
    /// Largest fuel budget a request may ask for (`None`: any).
    pub max_fuel: Option<u64>,
    /// Largest output of one execution (and of each chain stage).
    pub max_output_bytes: usize,
    /// Largest input of one execution.
    pub max_input_bytes: usize,
    /// Log bytes kept per execution; more is dropped with a note.
    pub max_log_bytes: usize,
    /// Most stages in one chain.
    pub max_chain_len: usize,
    /// Most table elements an instance may have.
    pub max_table_elements: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_timeout_ms: 5000,
            max_timeout_ms: 60_000,
            default_memory_mb: 64,
            max_memory_mb: 256,
            default_fuel: None,
            max_fuel: None,
            max_output_bytes: 8 << 20,
            max_input_bytes: 8 << 20,
            max_log_bytes: 64 << 10,
            max_chain_len: 16,
            max_table_elements: 100_000,
        }
    }
}

/// Engine settings: decided at start, a change needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Fuel metering instrumented into every compiled module (see docs/PERFORMANCE.md for
    /// its cost).
    pub fuel_metering: bool,
    /// Concurrent instances the pooling allocator holds (the hard cap on concurrent
    /// executions).
    pub pool_instances: u32,
    /// Bytes of each linear memory kept resident (not decommitted) between executions.
    pub memory_keep_resident: usize,
    /// Warm slots kept for reuse.
    pub max_unused_warm_slots: u32,
    /// Wasm stack limit.
    pub max_wasm_stack: usize,
    /// Epoch tick: the granularity of timeouts and of time-slicing between guests.
    pub epoch_tick: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            fuel_metering: true,
            pool_instances: 256,
            memory_keep_resident: 2 << 20,
            max_unused_warm_slots: 64,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(1),
        }
    }
}

/// Registry and tenant settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Largest module accepted by `load`.
    pub max_module_bytes: usize,
    /// Most binaries one owner may hold.
    pub max_binaries_per_owner: usize,
    /// Bytes of plugin state (keys + values) per (owner, binary).
    pub max_state_bytes: u64,
    /// Longest state key.
    pub max_state_key_bytes: usize,
    /// Compilation time bound; a module that takes longer is refused.
    pub max_compile: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_module_bytes: 16 << 20,
            max_binaries_per_owner: 256,
            max_state_bytes: 1 << 20,
            max_state_key_bytes: 1024,
            max_compile: Duration::from_secs(30),
        }
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Socket paths to bind when no listener is passed by systemd.
    pub listen: Vec<PathBuf>,
    /// Largest request line.
    pub max_request_bytes: usize,
    /// Most connections served at once; more are accepted and closed with `busy`.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Groups whose members are admins (root always is).
    pub admin_gids: Vec<u32>,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![PathBuf::from("/tmp/wasm-core.sock")],
            max_request_bytes: wasmcore_proto::DEFAULT_MAX_LINE,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            admin_gids: Vec::new(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// All settings of a daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub limits: LimitsConfig,
    pub engine: EngineConfig,
    pub registry: RegistryConfig,
    pub server: ServerConfig,
}

impl Config {
    /// Reject inconsistent settings, naming the offending key.
    pub fn check(&self) -> Result<(), String> {
        let l = &self.limits;
        let nonzero = [
            ("limits.default_timeout_ms", l.default_timeout_ms),
            ("limits.max_timeout_ms", l.max_timeout_ms),
            ("limits.default_memory_mb", l.default_memory_mb),
            ("limits.max_memory_mb", l.max_memory_mb),
            ("limits.max_output_bytes", l.max_output_bytes as u64),
            ("limits.max_chain_len", l.max_chain_len as u64),
            ("engine.pool_instances", self.engine.pool_instances as u64),
            ("engine.max_wasm_stack", self.engine.max_wasm_stack as u64),
            (
                "registry.max_module_bytes",
                self.registry.max_module_bytes as u64,
            ),
            (
                "server.max_request_bytes",
                self.server.max_request_bytes as u64,
            ),
            ("server.max_connections", self.server.max_connections as u64),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                return Err(format!("{key} must be greater than 0"));
            }
        }
        if l.default_timeout_ms > l.max_timeout_ms {
            return Err("limits.default_timeout_ms exceeds limits.max_timeout_ms".into());
        }
        if l.default_memory_mb > l.max_memory_mb {
            return Err("limits.default_memory_mb exceeds limits.max_memory_mb".into());
        }
        if l.max_memory_mb > 4096 {
            return Err("limits.max_memory_mb must be at most 4096 (32-bit linear memory)".into());
        }
        if let (Some(d), Some(m)) = (l.default_fuel, l.max_fuel)
            && d > m
        {
            return Err("limits.default_fuel exceeds limits.max_fuel".into());
        }
        if (l.default_fuel.is_some() || l.max_fuel.is_some()) && !self.engine.fuel_metering {
            return Err("limits.default_fuel/max_fuel need engine.fuel_metering = true".into());
        }
        if self.engine.epoch_tick.is_zero() || self.engine.epoch_tick > Duration::from_secs(1) {
            return Err("engine.epoch_tick_ms must be between 1 and 1000".into());
        }
        if self.server.listen.is_empty() {
            return Err("server.listen needs at least one socket path".into());
        }
        // A module must fit in a request line as base64 plus the JSON around it.
        let b64 = self.registry.max_module_bytes.div_ceil(3) * 4 + 4096;
        if b64 > self.server.max_request_bytes {
            return Err(format!(
                "server.max_request_bytes ({}) is too small for registry.max_module_bytes ({}) in base64 ({b64} bytes)",
                self.server.max_request_bytes, self.registry.max_module_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_follow_the_seed() {
        let c = Config::default();
        c.check().unwrap();
        assert_eq!(c.limits.default_timeout_ms, 5000);
        assert_eq!(c.limits.default_memory_mb, 64);
    }

    #[test]
    fn inconsistent_values_name_their_key() {
        let mut c = Config::default();
        c.limits.default_memory_mb = 512;
        assert!(c.check().unwrap_err().contains("default_memory_mb"));
        let mut c = Config::default();
        c.server.max_request_bytes = 1024;
        assert!(c.check().unwrap_err().contains("max_request_bytes"));
        let mut c = Config::default();
        c.engine.fuel_metering = false;
        c.limits.max_fuel = Some(5);
        assert!(c.check().unwrap_err().contains("fuel_metering"));
    }
}
