//! Settings: the TOML file (`/etc/wasm-core/config.toml`, see wasm-core.toml(5)) → validated
//! [`Config`].
//!
//! The file is parsed into raw structs that refuse unknown keys, then converted: user and
//! group names are resolved to ids, sizes and durations get their units, and
//! [`Config::check`] rejects inconsistent values naming the key. Flags in `main.rs` override
//! the file. On SIGHUP, [`Config::reload_from`] keeps the keys that need a restart and names
//! them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The default path of the config file.
pub const DEFAULT_PATH: &str = "/etc/wasm-core/config.toml";

/// The admin group used when the file names none.
pub const DEFAULT_ADMIN_GROUP: &str = "wasm-core-admin";

/// Execution limits: defaults applied when a request names none, and maxima a request may
/// not exceed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct LimitsConfig {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_mb: u64,
    /// Also sizes the instance pool: a change needs a restart.
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
    /// Most table elements an instance may have (sizes the pool: restart).
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct EngineConfig {
    /// Fuel metering instrumented into every compiled module (see docs/PERFORMANCE.md for
    /// its cost).
    pub fuel_metering: bool,
    /// Concurrent instances the pooling allocator holds (the hard cap on concurrent
    /// executions).
    pub pool_instances: u32,
    /// Bytes of each linear memory kept resident (not decommitted) between executions.
    pub memory_keep_resident: usize,
    /// Warm slots kept for reuse: a slot keeps the memory image and resident pages of the
    /// module that used it last, so that module's next execution there is cheap. The pool is
    /// sharded per CPU and a module gets a slot in each shard it runs from, so this should
    /// cover the hot binaries on every shard (docs/PERFORMANCE.md, "Many binaries").
    pub max_unused_warm_slots: u32,
    /// Wasm stack limit.
    pub max_wasm_stack: usize,
    /// Epoch tick: the granularity of timeouts and of time-slicing between guests.
    pub epoch_tick: Duration,
    /// Bounds-check linear memory with guard pages and signals instead of compiled-in
    /// checks. Faster memory-heavy guests, but every execution whose memory grew costs two
    /// `mprotect` calls, which stall every thread of the daemon on a multi-core host.
    pub guard_pages: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            fuel_metering: true,
            pool_instances: 512,
            memory_keep_resident: 2 << 20,
            max_unused_warm_slots: 512,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(1),
            guard_pages: false,
        }
    }
}

/// Registry settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RegistryConfig {
    /// Largest module accepted by `load`.
    pub max_module_bytes: usize,
    /// Longest state key.
    pub max_state_key_bytes: usize,
    /// Compilation time bound; a module that takes longer is refused.
    pub max_compile: Duration,
    /// Loads compiling at once, all tenants; beyond it, `busy`. 0: one per CPU.
    pub max_concurrent_loads: usize,
    /// Versions a name keeps, the current one included: a `replace` beyond it unloads the
    /// version that was current longest ago.
    pub keep_versions: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_module_bytes: 16 << 20,
            max_state_key_bytes: 1024,
            max_compile: Duration::from_secs(30),
            max_concurrent_loads: 0,
            keep_versions: 3,
        }
    }
}

/// The smallest `quotas.memory_mb` other than 0: what an idle worker takes, with room.
pub const MIN_WORKER_MEMORY_MB: u64 = 32;

/// What one tenant may hold and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Quota {
    /// Binaries loaded at once.
    pub binaries: usize,
    /// Total size of those binaries' modules.
    pub module_bytes: u64,
    /// Executions running at once; beyond it, `busy`.
    pub concurrent_executions: usize,
    /// Plugin state (keys + values) per binary.
    pub state_bytes: u64,
    /// Connections open at once; beyond it, `busy` and the connection is closed.
    pub connections: usize,
    /// Loads compiling at once; beyond it, `busy`.
    pub concurrent_loads: usize,
    /// Memory of the tenant's worker process, in MiB (its cgroup's `memory.max`, or watched
    /// by the broker); 0: no limit. Over it, the worker is killed.
    pub memory_mb: u64,
    /// The worker's share of the CPU against other workers that want it (`cpu.weight`,
    /// 1–10000).
    pub cpu_weight: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            binaries: 256,
            module_bytes: 256 << 20,
            concurrent_executions: 16,
            state_bytes: 1 << 20,
            connections: 64,
            concurrent_loads: 1,
            memory_mb: 2048,
            cpu_weight: 100,
        }
    }
}

/// Quotas: the default and per-user overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct QuotaConfig {
    pub default: Quota,
    pub users: HashMap<u32, Quota>,
}

impl QuotaConfig {
    /// The quota of `uid`.
    pub fn for_uid(&self, uid: u32) -> Quota {
        self.users.get(&uid).copied().unwrap_or(self.default)
    }
}

/// Who may connect, and who is an admin.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct AccessConfig {
    /// Groups whose members are admins (root always is).
    pub admin_gids: Vec<u32>,
    /// `Some`: only these users (and admins, and members of `allow_gids`) may connect.
    pub allow_uids: Option<Vec<u32>>,
    /// `Some`: only members of these groups (and admins, and `allow_uids`) may connect.
    pub allow_gids: Option<Vec<u32>>,
}

impl AccessConfig {
    /// Whether `tenant` may use the daemon at all.
    pub fn admits(&self, tenant: &crate::tenant::Tenant) -> bool {
        if tenant.is_admin() || (self.allow_uids.is_none() && self.allow_gids.is_none()) {
            return true;
        }
        let by_user = self
            .allow_uids
            .as_ref()
            .is_some_and(|u| u.contains(&tenant.uid));
        let by_group = self.allow_gids.as_ref().is_some_and(|g| {
            g.iter()
                .any(|g| *g == tenant.gid || tenant.groups.contains(g))
        });
        by_user || by_group
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ServerConfig {
    /// Socket paths to bind when no listener is passed by systemd.
    pub listen: Vec<PathBuf>,
    /// Largest request line.
    pub max_request_bytes: usize,
    /// Most connections served at once; more are accepted and closed with `busy`.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Exit after this long with no connection (socket activation starts us again).
    pub exit_idle_after: Option<Duration>,
    pub log_level: log::LevelFilter,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![PathBuf::from("/tmp/wasm-core.sock")],
            max_request_bytes: wasmcore_proto::DEFAULT_MAX_LINE,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
            exit_idle_after: None,
            log_level: log::LevelFilter::Info,
        }
    }
}

/// Tenant workers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct WorkersConfig {
    /// A worker with no connection for this long exits (it starts again on its tenant's
    /// next connection).
    pub idle_timeout: Duration,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Declarative provisioning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ProvisioningConfig {
    /// The directory of `*.toml` files, one binary each, that the daemon applies at start
    /// and on every reload (a missing directory declares nothing).
    pub dir: PathBuf,
    /// Where the `oci://` sources of those files are read from, as `wasmcorectl apply`
    /// pulled them: the daemon itself never reaches a registry.
    pub oci_cache: PathBuf,
}

/// Where the provisioning files are unless the config says otherwise.
pub const DEFAULT_PROVISIONING_DIR: &str = "/etc/wasm-core/binaries.d";
/// Where pulled `oci://` sources are unless the config says otherwise.
pub const DEFAULT_OCI_CACHE: &str = "/var/cache/wasm-core/oci";

impl Default for ProvisioningConfig {
    fn default() -> Self {
        ProvisioningConfig {
            dir: PathBuf::from(DEFAULT_PROVISIONING_DIR),
            oci_cache: PathBuf::from(DEFAULT_OCI_CACHE),
        }
    }
}

/// Reads the config again (the file plus the command-line flags) for a reload.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// The running configuration, swapped whole on reload; readers take a snapshot per use.
pub type Live = std::sync::Arc<arc_swap::ArcSwap<Config>>;

/// A [`Live`] handle holding `c`.
pub fn live(c: Config) -> Live {
    std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(c))
}

/// All settings of a daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Config {
    pub state_dir: PathBuf,
    pub limits: LimitsConfig,
    pub engine: EngineConfig,
    pub registry: RegistryConfig,
    pub quotas: QuotaConfig,
    pub access: AccessConfig,
    pub server: ServerConfig,
    pub workers: WorkersConfig,
    pub provisioning: ProvisioningConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            limits: LimitsConfig::default(),
            engine: EngineConfig::default(),
            registry: RegistryConfig::default(),
            quotas: QuotaConfig::default(),
            access: AccessConfig {
                admin_gids: group_ids(
                    "access.admin_groups",
                    &[NameOrId::Name(DEFAULT_ADMIN_GROUP.into())],
                    true,
                    Names::Lenient,
                )
                .unwrap_or_default(),
                ..AccessConfig::default()
            },
            server: ServerConfig::default(),
            workers: WorkersConfig::default(),
            provisioning: ProvisioningConfig::default(),
        }
    }
}

/// `$STATE_DIRECTORY` when systemd sets it, else /var/lib/wasm-core.
fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .map(|v| {
            // systemd may pass several, colon-separated: ours is the first.
            let s = v.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or_default())
        })
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/var/lib/wasm-core"))
}

impl Config {
    /// Read `path`. A missing file is an error unless `missing_ok` (the default path).
    pub fn load(path: &Path, missing_ok: bool) -> Result<Config, String> {
        Config::load_with(path, missing_ok, Names::Lenient)
    }

    /// As [`Config::load`] with [`Config::from_toml_strict`]; also says whether the file
    /// was there (`false`: a missing default file, the defaults apply).
    pub fn load_strict(path: &Path, missing_ok: bool) -> Result<(Config, bool), String> {
        let present = path.exists();
        Config::load_with(path, missing_ok, Names::Strict).map(|c| (c, present))
    }

    fn load_with(path: &Path, missing_ok: bool, names: Names) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, names).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => {
                Ok(Config::default())
            }
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Parse and validate a config file's text. A user or group that does not exist is
    /// ignored with a warning (it may be created later; a reload must not fail for it).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        Config::parse(text, Names::Lenient)
    }

    /// As [`Config::from_toml`], but a user or group that does not exist is an error: what
    /// `wasmcored --check-config` applies, since such a name in `allow_users` would refuse
    /// everyone it was meant to admit.
    pub fn from_toml_strict(text: &str) -> Result<Config, String> {
        Config::parse(text, Names::Strict)
    }

    fn parse(text: &str, names: Names) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let c = raw.into_config(names)?;
        c.check()?;
        Ok(c)
    }

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
            ("registry.keep_versions", self.registry.keep_versions as u64),
            (
                "quotas.concurrent_executions",
                self.quotas.default.concurrent_executions as u64,
            ),
            ("quotas.connections", self.quotas.default.connections as u64),
            (
                "quotas.concurrent_loads",
                self.quotas.default.concurrent_loads as u64,
            ),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                return Err(format!("{key} must be greater than 0"));
            }
        }
        if self
            .quotas
            .users
            .values()
            .any(|q| q.concurrent_executions == 0)
        {
            return Err("quotas.users.*.concurrent_executions must be greater than 0".into());
        }
        if self.quotas.users.values().any(|q| q.connections == 0) {
            return Err("quotas.users.*.connections must be greater than 0".into());
        }
        if self.quotas.users.values().any(|q| q.concurrent_loads == 0) {
            return Err("quotas.users.*.concurrent_loads must be greater than 0".into());
        }
        let quotas = std::iter::once(("quotas", &self.quotas.default))
            .chain(self.quotas.users.values().map(|q| ("quotas.users.*", q)));
        for (at, q) in quotas {
            if !(1..=10_000).contains(&q.cpu_weight) {
                return Err(format!(
                    "{at}.cpu_weight must be between 1 and 10000 (cgroup cpu.weight), not {}",
                    q.cpu_weight
                ));
            }
            if q.memory_mb != 0 && q.memory_mb < MIN_WORKER_MEMORY_MB {
                return Err(format!(
                    "{at}.memory_mb must be 0 (no limit) or at least {MIN_WORKER_MEMORY_MB} (a worker's own engine and runtime need that much), not {}",
                    q.memory_mb
                ));
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
        for (key, dir) in [
            ("provisioning.dir", &self.provisioning.dir),
            ("provisioning.oci_cache", &self.provisioning.oci_cache),
        ] {
            if !dir.is_absolute() {
                return Err(format!("{key} {dir:?} must be an absolute path"));
            }
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

    /// The config to run after a reload to `new`: keys that cannot change while running keep
    /// their current value. Returns it with the names of the keys that need a restart.
    pub fn reload_from(&self, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut restart = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $name:literal) => {
                if new.$($field).+ != self.$($field).+ {
                    restart.push($name);
                    new.$($field).+ = self.$($field).+.clone();
                }
            };
        }
        keep!(state_dir, "server.state_dir");
        keep!(server.listen, "server.listen");
        keep!(server.max_connections, "server.max_connections");
        keep!(engine.fuel_metering, "engine.fuel_metering");
        keep!(engine.pool_instances, "engine.pool_instances");
        keep!(engine.memory_keep_resident, "engine.memory_keep_resident");
        keep!(engine.max_unused_warm_slots, "engine.max_unused_warm_slots");
        keep!(engine.max_wasm_stack, "engine.max_wasm_stack");
        keep!(engine.epoch_tick, "engine.epoch_tick_ms");
        keep!(engine.guard_pages, "engine.guard_pages");
        // A field added to EngineConfig and not named above is still kept.
        keep!(engine, "engine.*");
        keep!(limits.max_memory_mb, "limits.max_memory_mb");
        keep!(limits.max_table_elements, "limits.max_table_elements");
        keep!(
            registry.max_concurrent_loads,
            "registry.max_concurrent_loads"
        );
        // Keep the defaults consistent with a kept maximum.
        if new.limits.default_memory_mb > new.limits.max_memory_mb {
            new.limits.default_memory_mb = new.limits.max_memory_mb;
        }
        (new, restart)
    }
}

/// A user or group given by name or by numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum NameOrId {
    Id(u32),
    Name(String),
}

/// What to do with a user or group name that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    Lenient,
    Strict,
}

fn group_ids(key: &str, names: &[NameOrId], quiet: bool, mode: Names) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for n in names {
        match n {
            NameOrId::Id(id) => out.push(*id),
            NameOrId::Name(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => out.push(g.gid.as_raw()),
                // A group that does not exist yet has no members: nobody gains anything.
                Ok(None) if quiet => {}
                Ok(None) if mode == Names::Strict => {
                    return Err(format!("{key}: group {name:?} does not exist"));
                }
                Ok(None) => log::warn!("config: {key}: group {name:?} does not exist; ignored"),
                Err(e) => return Err(format!("{key}: looking up group {name:?}: {e}")),
            },
        }
    }
    Ok(out)
}

fn user_id(key: &str, n: &str, mode: Names) -> Result<Option<u32>, String> {
    if let Ok(id) = n.parse::<u32>() {
        return Ok(Some(id));
    }
    match nix::unistd::User::from_name(n) {
        Ok(Some(u)) => Ok(Some(u.uid.as_raw())),
        Ok(None) if mode == Names::Strict => Err(format!("{key}: user {n:?} does not exist")),
        Ok(None) => {
            log::warn!("config: {key}: user {n:?} does not exist; ignored");
            Ok(None)
        }
        Err(e) => Err(format!("{key}: looking up user {n:?}: {e}")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default)]
    quotas: RawQuotas,
    #[serde(default)]
    workers: RawWorkers,
    #[serde(default)]
    provisioning: RawProvisioning,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    dir: Option<PathBuf>,
    oci_cache: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    idle_timeout_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Vec<PathBuf>>,
    state_dir: Option<PathBuf>,
    max_connections: Option<usize>,
    max_request_bytes: Option<usize>,
    idle_timeout_s: Option<u64>,
    shutdown_grace_s: Option<u64>,
    exit_idle_after_s: Option<u64>,
    log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    admin_groups: Option<Vec<NameOrId>>,
    allow_users: Option<Vec<NameOrId>>,
    allow_groups: Option<Vec<NameOrId>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    default_timeout_ms: Option<u64>,
    max_timeout_ms: Option<u64>,
    default_memory_mb: Option<u64>,
    max_memory_mb: Option<u64>,
    default_fuel: Option<u64>,
    max_fuel: Option<u64>,
    max_output_bytes: Option<usize>,
    max_input_bytes: Option<usize>,
    max_log_bytes: Option<usize>,
    max_chain_len: Option<usize>,
    max_table_elements: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    fuel_metering: Option<bool>,
    pool_instances: Option<u32>,
    memory_keep_resident: Option<usize>,
    max_unused_warm_slots: Option<u32>,
    max_wasm_stack: Option<usize>,
    epoch_tick_ms: Option<u64>,
    guard_pages: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    max_module_bytes: Option<usize>,
    max_state_key_bytes: Option<usize>,
    max_compile_s: Option<u64>,
    max_concurrent_loads: Option<usize>,
    keep_versions: Option<usize>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    binaries: Option<usize>,
    module_bytes: Option<u64>,
    concurrent_executions: Option<usize>,
    state_bytes: Option<u64>,
    connections: Option<usize>,
    concurrent_loads: Option<usize>,
    memory_mb: Option<u64>,
    cpu_weight: Option<u64>,
}

impl RawQuota {
    fn over(self, base: Quota) -> Quota {
        Quota {
            binaries: self.binaries.unwrap_or(base.binaries),
            module_bytes: self.module_bytes.unwrap_or(base.module_bytes),
            concurrent_executions: self
                .concurrent_executions
                .unwrap_or(base.concurrent_executions),
            state_bytes: self.state_bytes.unwrap_or(base.state_bytes),
            connections: self.connections.unwrap_or(base.connections),
            concurrent_loads: self.concurrent_loads.unwrap_or(base.concurrent_loads),
            memory_mb: self.memory_mb.unwrap_or(base.memory_mb),
            cpu_weight: self.cpu_weight.unwrap_or(base.cpu_weight),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    binaries: Option<usize>,
    module_bytes: Option<u64>,
    concurrent_executions: Option<usize>,
    state_bytes: Option<u64>,
    connections: Option<usize>,
    concurrent_loads: Option<usize>,
    memory_mb: Option<u64>,
    cpu_weight: Option<u64>,
    #[serde(default)]
    users: HashMap<String, RawQuota>,
}

impl RawConfig {
    fn into_config(self, names: Names) -> Result<Config, String> {
        let d = Config::default();
        let s = self.server;
        let log_level = match s.log_level {
            None => d.server.log_level,
            Some(l) => l.parse().map_err(|_| {
                format!(
                    "server.log_level: {l:?} is not one of off, error, warn, info, debug, trace"
                )
            })?,
        };
        let server = ServerConfig {
            listen: s.listen.unwrap_or(d.server.listen),
            max_request_bytes: s.max_request_bytes.unwrap_or(d.server.max_request_bytes),
            max_connections: s.max_connections.unwrap_or(d.server.max_connections),
            idle_timeout: s
                .idle_timeout_s
                .map_or(d.server.idle_timeout, Duration::from_secs),
            shutdown_grace: s
                .shutdown_grace_s
                .map_or(d.server.shutdown_grace, Duration::from_secs),
            exit_idle_after: s
                .exit_idle_after_s
                .filter(|v| *v > 0)
                .map(Duration::from_secs),
            log_level,
        };
        let a = self.access;
        let access = AccessConfig {
            // An admin group that does not exist has no members: it grants nothing, so it
            // is only warned about, also by --check-config.
            admin_gids: match a.admin_groups {
                Some(g) => group_ids("access.admin_groups", &g, false, Names::Lenient)?,
                None => d.access.admin_gids,
            },
            allow_uids: match a.allow_users {
                None => None,
                Some(list) => {
                    let mut ids = Vec::new();
                    for n in list {
                        let id = match n {
                            NameOrId::Id(id) => Some(id),
                            NameOrId::Name(name) => user_id("access.allow_users", &name, names)?,
                        };
                        ids.extend(id);
                    }
                    Some(ids)
                }
            },
            allow_gids: a
                .allow_groups
                .map(|g| group_ids("access.allow_groups", &g, false, names))
                .transpose()?,
        };
        let l = self.limits;
        let dl = d.limits;
        let limits = LimitsConfig {
            default_timeout_ms: l.default_timeout_ms.unwrap_or(dl.default_timeout_ms),
            max_timeout_ms: l.max_timeout_ms.unwrap_or(dl.max_timeout_ms),
            default_memory_mb: l.default_memory_mb.unwrap_or(dl.default_memory_mb),
            max_memory_mb: l.max_memory_mb.unwrap_or(dl.max_memory_mb),
            default_fuel: l.default_fuel.or(dl.default_fuel),
            max_fuel: l.max_fuel.or(dl.max_fuel),
            max_output_bytes: l.max_output_bytes.unwrap_or(dl.max_output_bytes),
            max_input_bytes: l.max_input_bytes.unwrap_or(dl.max_input_bytes),
            max_log_bytes: l.max_log_bytes.unwrap_or(dl.max_log_bytes),
            max_chain_len: l.max_chain_len.unwrap_or(dl.max_chain_len),
            max_table_elements: l.max_table_elements.unwrap_or(dl.max_table_elements),
        };
        let e = self.engine;
        let de = d.engine;
        let engine = EngineConfig {
            fuel_metering: e.fuel_metering.unwrap_or(de.fuel_metering),
            pool_instances: e.pool_instances.unwrap_or(de.pool_instances),
            memory_keep_resident: e.memory_keep_resident.unwrap_or(de.memory_keep_resident),
            max_unused_warm_slots: e.max_unused_warm_slots.unwrap_or(de.max_unused_warm_slots),
            max_wasm_stack: e.max_wasm_stack.unwrap_or(de.max_wasm_stack),
            epoch_tick: e.epoch_tick_ms.map_or(de.epoch_tick, Duration::from_millis),
            guard_pages: e.guard_pages.unwrap_or(de.guard_pages),
        };
        let r = self.registry;
        let registry = RegistryConfig {
            max_module_bytes: r.max_module_bytes.unwrap_or(d.registry.max_module_bytes),
            max_state_key_bytes: r
                .max_state_key_bytes
                .unwrap_or(d.registry.max_state_key_bytes),
            max_compile: r
                .max_compile_s
                .map_or(d.registry.max_compile, Duration::from_secs),
            max_concurrent_loads: r
                .max_concurrent_loads
                .unwrap_or(d.registry.max_concurrent_loads),
            keep_versions: r.keep_versions.unwrap_or(d.registry.keep_versions),
        };
        let q = &self.quotas;
        let default_quota = RawQuota {
            binaries: q.binaries,
            module_bytes: q.module_bytes,
            concurrent_executions: q.concurrent_executions,
            state_bytes: q.state_bytes,
            connections: q.connections,
            concurrent_loads: q.concurrent_loads,
            memory_mb: q.memory_mb,
            cpu_weight: q.cpu_weight,
        }
        .over(d.quotas.default);
        let mut users = HashMap::new();
        for (name, q) in self.quotas.users {
            if let Some(uid) = user_id(&format!("quotas.users.{name}"), &name, names)? {
                users.insert(uid, q.over(default_quota));
            }
        }
        Ok(Config {
            state_dir: s.state_dir.unwrap_or(d.state_dir),
            limits,
            engine,
            registry,
            quotas: QuotaConfig {
                default: default_quota,
                users,
            },
            access,
            server,
            workers: WorkersConfig {
                idle_timeout: self
                    .workers
                    .idle_timeout_s
                    .map_or(d.workers.idle_timeout, Duration::from_secs),
            },
            provisioning: ProvisioningConfig {
                dir: self.provisioning.dir.unwrap_or(d.provisioning.dir),
                oci_cache: self
                    .provisioning
                    .oci_cache
                    .unwrap_or(d.provisioning.oci_cache),
            },
        })
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
        assert_eq!(Config::from_toml("").unwrap(), c);
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

    #[test]
    fn every_section_parses_and_unknown_keys_are_errors() {
        let c = Config::from_toml(
            r#"
            [server]
            listen = ["/run/x.sock"]
            state_dir = "/tmp/s"
            idle_timeout_s = 7
            exit_idle_after_s = 30
            log_level = "debug"
            [access]
            admin_groups = [0]
            allow_users = ["root", 4242]
            [limits]
            default_timeout_ms = 100
            max_fuel = 1000
            [engine]
            pool_instances = 8
            [registry]
            max_module_bytes = 1000
            [quotas]
            binaries = 3
            [quotas.users.root]
            concurrent_executions = 99
            "#,
        )
        .unwrap();
        assert_eq!(c.server.listen, vec![PathBuf::from("/run/x.sock")]);
        assert_eq!(c.server.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.server.exit_idle_after, Some(Duration::from_secs(30)));
        assert_eq!(c.server.log_level, log::LevelFilter::Debug);
        assert_eq!(c.access.admin_gids, vec![0]);
        assert_eq!(c.access.allow_uids, Some(vec![0, 4242]));
        assert_eq!(c.limits.default_timeout_ms, 100);
        assert_eq!(c.limits.max_fuel, Some(1000));
        assert_eq!(c.engine.pool_instances, 8);
        assert_eq!(c.registry.max_module_bytes, 1000);
        assert_eq!(c.quotas.for_uid(0).concurrent_executions, 99);
        assert_eq!(
            c.quotas.for_uid(0).binaries,
            3,
            "overrides inherit the default quota"
        );
        assert_eq!(c.quotas.for_uid(1).binaries, 3);

        let e = Config::from_toml("[limits]\ndefault_timout_ms = 5\n").unwrap_err();
        assert!(e.contains("default_timout_ms"), "{e}");
        let e = Config::from_toml("[limts]\n").unwrap_err();
        assert!(e.contains("limts"), "{e}");
        let e = Config::from_toml("[quotas]\nbinaries = 1\nbogus = 2\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml("[quotas.users.root]\nbogus = 2\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::from_toml("[server]\nlog_level = \"loud\"\n").unwrap_err();
        assert!(e.contains("log_level"), "{e}");
        let e = Config::from_toml("[limits]\ndefault_memory_mb = 300\n").unwrap_err();
        assert!(e.contains("default_memory_mb"), "{e}");
    }

    #[test]
    fn reload_keeps_restart_only_keys_and_names_them() {
        let old = Config::default();
        let mut new = Config::from_toml("[limits]\ndefault_timeout_ms = 100\nmax_memory_mb = 512\n[engine]\npool_instances = 8\n").unwrap();
        new.server.listen = vec![PathBuf::from("/elsewhere.sock")];
        let (applied, restart) = old.reload_from(new);
        assert_eq!(applied.limits.default_timeout_ms, 100);
        assert_eq!(applied.limits.max_memory_mb, old.limits.max_memory_mb);
        assert_eq!(applied.engine, old.engine);
        assert_eq!(applied.server.listen, old.server.listen);
        assert_eq!(
            restart,
            vec![
                "server.listen",
                "engine.pool_instances",
                "limits.max_memory_mb"
            ]
        );
    }

    const SHIPPED: &str = include_str!("../../systemd/config.toml");

    #[test]
    fn the_shipped_file_is_valid_and_holds_the_defaults() {
        let c = Config::from_toml(SHIPPED).unwrap();
        let d = Config::default();
        assert_eq!(
            (c.limits, c.engine, c.registry, c.quotas),
            (d.limits, d.engine, d.registry, d.quotas)
        );
        assert_eq!(c.server.max_request_bytes, d.server.max_request_bytes);
    }

    #[test]
    fn the_shipped_files_commented_examples_are_real_keys() {
        // Uncomment `# key = value` lines (and `# [table]` headers): the result must parse.
        let uncommented: String = SHIPPED
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") || rest.starts_with('[') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&uncommented).unwrap();
        assert_eq!(c.limits.max_fuel, Some(10_000_000_000));
        assert_eq!(c.quotas.for_uid(1001).binaries, 1000);
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_named_one_is_required() {
        let p = Path::new("/nonexistent/wasm-core.toml");
        assert_eq!(Config::load(p, true).unwrap(), Config::default());
        assert!(Config::load(p, false).unwrap_err().contains("/nonexistent"));
    }
}
