//! The binary registry: UUID → compiled binary, with owner-scoped names.
//!
//! Loading validates, compiles once and prepares the kind's glue once ([`crate::kinds`]).
//! Every lookup takes the caller's [`Tenant`]: the registry alone decides who may see, run
//! or unload a binary. A binary belongs to the UID that loaded it; an admin may load it
//! as public (everyone may run it, only admins unload it).
//!
//! A name has versions: loading with `replace` under a name the owner has makes the new
//! binary the name's current version in one step, and keeps the old one (executable by
//! UUID, for `rollback`) until it falls out of `registry.keep_versions`. Of the binaries
//! with one owner and name, the one with the highest `activation` is current; that number
//! is stored with each binary, so a crash at any point leaves the name on one version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use wasmcore_proto::{
    BinaryInfo, ExternInfo, LimitsRequest, ModuleKind, Owner, Provisioned, Source,
};
use wasmtime::component::Component;
use wasmtime::{ExternType, Module};

use crate::config::Live;
use crate::engine::WasmEngine;
use crate::error::{Error, Result};
use crate::kinds::{Code, Kind, Linkers};
use crate::metrics::{BinaryStats, Metrics, Refusal};
use crate::state::StateStore;
use crate::sys;
use crate::tenant::Tenant;

const MAX_NAME_LEN: usize = 64;
/// Caps on an Extism plugin's configuration: entries, bytes of one key, bytes in all.
const MAX_CONFIG_ENTRIES: usize = 256;
const MAX_CONFIG_KEY: usize = 256;
const MAX_CONFIG_BYTES: usize = 64 << 10;

/// An Extism plugin's configuration (`config_get`).
pub type PluginConfig = BTreeMap<String, String>;

/// A loaded binary.
pub struct Binary {
    pub id: Uuid,
    pub name: Option<String>,
    pub owner: u32,
    pub sha256: String,
    pub size: u64,
    pub kind: ModuleKind,
    pub public: bool,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    /// Load order within this daemon's life (for stable listings).
    seq: u64,
    /// Of the binaries with this owner and name, the highest is the name's current version.
    activation: AtomicU64,
    /// The OCI reference it was pulled by, as the client said.
    pub source: Option<Source>,
    /// Declared by a provisioning file (which may change its configuration and limits).
    pub provisioned: ArcSwapOption<Provisioned>,
    /// Bytes it takes in the state directory (module + precompiled code), set when stored
    /// or restored so `info` and `status` need no disk access.
    pub stored_bytes: AtomicU64,
    /// The compiled code, kept for `info` (imports and exports).
    pub code: Code,
    /// The kind's glue, prepared at load for each engine (indexed as
    /// [`WasmEngine::engines`]).
    glues: Box<[Arc<dyn Kind>]>,
    /// Extism plugins: what `config_get` reads; replaced whole by `configure`, and each
    /// execution takes the map as it was when it started.
    pub config: ArcSwap<PluginConfig>,
    /// Executions started, errors, time, fuel, memory and a latency sketch of its executions.
    pub stats: BinaryStats,
}

impl std::fmt::Debug for Binary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binary")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Binary {
    /// The kind's glue (as prepared on the first engine: the same on all).
    pub fn glue(&self) -> &dyn Kind {
        &*self.glues[0]
    }

    /// The kind's glue for a store of engine `engine` (of [`WasmEngine::pick`]).
    pub fn glue_on(&self, engine: usize) -> &dyn Kind {
        &*self.glues[engine]
    }

    /// The name if any, else the UUID.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.to_string())
    }

    /// The order in which the versions of its name became current.
    pub fn activation(&self) -> u64 {
        self.activation.load(Relaxed)
    }

    /// Its entry in `list` and `info`; `superseded` when it is a version of its name that
    /// is not the current one ([`Registry::is_superseded`]).
    pub fn info(&self, superseded: bool) -> BinaryInfo {
        BinaryInfo {
            binary: self.id.to_string(),
            name: self.name.clone(),
            owner_uid: self.owner,
            size: self.size,
            sha256: self.sha256.clone(),
            kind: self.kind,
            public: self.public,
            loaded_at: self.loaded_at,
            executions: self.stats.started(),
            superseded,
            source: self.source.clone(),
            provisioned: self.provisioned(),
        }
    }

    /// The provisioning file that declares it, and the limits it gives.
    pub fn provisioned(&self) -> Option<Provisioned> {
        self.provisioned.load().as_deref().cloned()
    }

    /// `limits` of an execution, each one not given taken from what its provisioning file
    /// declares; `None` when that adds nothing.
    pub fn default_limits(&self, limits: &LimitsRequest) -> Option<LimitsRequest> {
        let declared = self.provisioned.load();
        let declared = &declared.as_ref()?.limits;
        let merged = limits.or(declared);
        (merged != *limits).then_some(merged)
    }

    /// Its imports, sorted by module and name.
    pub fn imports(&self) -> Vec<ExternInfo> {
        sorted(match &self.code {
            Code::Module(m) => m
                .imports()
                .map(|i| ExternInfo {
                    module: Some(i.module().to_string()),
                    name: i.name().to_string(),
                    ty: describe(&i.ty()),
                })
                .collect(),
            Code::Component(c) => {
                let ty = c.component_type();
                ty.imports(c.engine())
                    .map(|(name, item)| ExternInfo {
                        module: None,
                        name: name.to_string(),
                        ty: describe_item(&item.ty),
                    })
                    .collect()
            }
        })
    }

    /// Its exports, sorted by name.
    pub fn exports_info(&self) -> Vec<ExternInfo> {
        sorted(match &self.code {
            Code::Module(m) => m
                .exports()
                .map(|e| ExternInfo {
                    module: None,
                    name: e.name().to_string(),
                    ty: describe(&e.ty()),
                })
                .collect(),
            Code::Component(c) => {
                let ty = c.component_type();
                ty.exports(c.engine())
                    .map(|(name, item)| ExternInfo {
                        module: None,
                        name: name.to_string(),
                        ty: describe_item(&item.ty),
                    })
                    .collect()
            }
        })
    }
}

/// Imports and exports in a stable order (module, then name), whatever order the binary
/// declares them in.
fn sorted(mut v: Vec<ExternInfo>) -> Vec<ExternInfo> {
    v.sort_by(|a, b| (&a.module, &a.name).cmp(&(&b.module, &b.name)));
    v
}

fn describe_item(item: &wasmtime::component::types::ComponentItem) -> String {
    use wasmtime::component::types::ComponentItem as I;
    match item {
        I::ComponentFunc(_) => "func",
        I::CoreFunc(_) => "core func",
        I::Module(_) => "module",
        I::Component(_) => "component",
        I::ComponentInstance(_) => "instance",
        I::Type(_) => "type",
        I::Resource(_) => "resource",
    }
    .into()
}

fn describe(t: &ExternType) -> String {
    match t {
        ExternType::Func(f) => {
            let p: Vec<String> = f.params().map(|v| v.to_string()).collect();
            let r: Vec<String> = f.results().map(|v| v.to_string()).collect();
            format!("func({}) -> ({})", p.join(", "), r.join(", "))
        }
        ExternType::Memory(_) => "memory".into(),
        ExternType::Table(_) => "table".into(),
        ExternType::Global(_) => "global".into(),
        ExternType::Tag(_) => "tag".into(),
    }
}

/// A compiled binary with its kind's glue, ready to be registered.
pub struct Compiled {
    code: Code,
    glues: Box<[Arc<dyn Kind>]>,
    sha256: String,
    size: u64,
    /// The serialized code, when [`Registry::compile`] made it (empty otherwise).
    artifact: Vec<u8>,
    pub compile_ms: f64,
}

impl Compiled {
    pub fn kind(&self) -> ModuleKind {
        self.glues[0].kind()
    }

    /// The precompiled artifact to store next to the original bytes, made once by
    /// [`Registry::compile`] (the other engines were loaded from it); empty after the
    /// first call, and for code that came from a stored artifact.
    pub fn take_artifact(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.artifact)
    }
}

/// Where the other engines of a worker load a binary's code from: the first engine's
/// serialized code, made by its compile, or the stored artifact file it was read from.
#[derive(Debug, Clone, Copy)]
pub enum Artifact<'a> {
    Bytes(&'a [u8]),
    File(&'a std::path::Path),
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

/// The identity of a stored binary, restored as it was.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: Uuid,
    pub name: Option<String>,
    pub owner: u32,
    pub public: bool,
    pub loaded_at: u64,
    pub config: PluginConfig,
    pub activation: u64,
    pub source: Option<Source>,
    pub provisioned: Option<Provisioned>,
}

/// How to register a compiled module.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub name: Option<String>,
    pub public: bool,
    /// Extism plugins only. `None` on a replace: the current version's configuration.
    pub config: Option<PluginConfig>,
    /// With a name the owner already has: make this the name's current version.
    pub replace: bool,
    /// Where the client got the module.
    pub source: Option<Source>,
    /// Declared by this provisioning file (only a provisioning tenant loads such a binary).
    pub provisioned: Option<Provisioned>,
}

/// What a load did.
#[derive(Debug)]
pub enum Loaded {
    /// A new binary. For a replace, `replaced` is the version that was current before, and
    /// `dropped` the versions that fell out of `registry.keep_versions`: gone from the
    /// registry (running executions finish), still on disk for the caller to remove.
    New {
        bin: Arc<Binary>,
        replaced: Option<Arc<Binary>>,
        dropped: Vec<Arc<Binary>>,
    },
    /// A replace with the bytes of the current version: nothing changed.
    Unchanged(Arc<Binary>),
}

/// What a caller wants to do with a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Run it or read its info: owner, admins, and anyone if it is public.
    Use,
    /// Unload it: the owner (unless public) and admins.
    Manage,
}

/// All loaded binaries.
pub struct Registry {
    engine: Arc<WasmEngine>,
    /// The host functions, for each engine.
    linkers: Box<[Linkers]>,
    live: Live,
    state: Arc<dyn StateStore>,
    /// Lock-free reads on the execute path; an entry is never held across `.await`.
    binaries: DashMap<Uuid, Arc<Binary>>,
    /// (owner, name) → UUID of the name's current version: names are unique per owner.
    names: DashMap<(u32, String), Uuid>,
    /// Held while a name changes (a load with a name, a replace, a rollback, an unload, a
    /// restore), so that each sees the versions of a name as the last one left them;
    /// lookups never take it. May be held across a write to disk.
    naming: Mutex<()>,
    /// Public binaries by name, so tenants can run an admin's public binary by name.
    public_names: DashMap<String, Uuid>,
    /// (binaries, module bytes) per owner; updated under the entry lock so the quota cannot
    /// be raced.
    per_owner: DashMap<u32, (usize, u64)>,
    seq: AtomicU64,
    /// Where quota refusals are counted.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("binaries", &self.binaries.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(
        engine: Arc<WasmEngine>,
        live: Live,
        state: Arc<dyn StateStore>,
    ) -> anyhow::Result<Self> {
        let linkers = engine
            .engines()
            .iter()
            .map(Linkers::new)
            .collect::<wasmtime::Result<Box<[_]>>>()
            .map_err(|e| anyhow::anyhow!("defining host functions: {e:#}"))?;
        Ok(Registry {
            engine,
            linkers,
            live,
            state,
            binaries: DashMap::new(),
            names: DashMap::new(),
            naming: Mutex::new(()),
            public_names: DashMap::new(),
            per_owner: DashMap::new(),
            seq: AtomicU64::new(0),
            metrics: Arc::default(),
        })
    }

    /// Count quota refusals in `metrics` (the daemon's), not in a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Binaries and module bytes per owner UID.
    pub fn usage_by_owner(&self) -> Vec<(u32, usize, u64)> {
        self.per_owner
            .iter()
            .map(|e| (*e.key(), e.value().0, e.value().1))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.binaries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.binaries.is_empty()
    }

    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    /// A registered binary by UUID, with no access check (daemon-internal use).
    pub fn get(&self, id: Uuid) -> Option<Arc<Binary>> {
        self.binaries.get(&id).map(|b| b.clone())
    }

    /// Check the module size cap before any work is done.
    pub fn check_size(&self, size: usize) -> Result<()> {
        let max = self.live.load().registry.max_module_bytes;
        if size > max {
            return Err(Error::TooLarge(format!(
                "module of {size} bytes exceeds the limit of {max} bytes"
            )));
        }
        Ok(())
    }

    /// Validate and compile `bytes`, a core module or a component (CPU-heavy: run it off
    /// the async workers).
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled> {
        self.check_size(bytes.len())?;
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(Error::InvalidModule(
                "not a WebAssembly binary (missing the \\0asm header)".into(),
            ));
        }
        self.compile_stored(bytes, hex::encode(Sha256::digest(bytes)))
    }

    /// Compile the bytes of a binary already stored, whose SHA-256 was checked: no size
    /// cap (a cap lowered since must not drop what is stored). Also serializes the code,
    /// for the artifact to store and for the other engines ([`Compiled::take_artifact`]).
    pub fn compile_stored(&self, bytes: &[u8], sha256: String) -> Result<Compiled> {
        let start = Instant::now();
        let engine = self.engine.engine();
        let code = if Code::is_component(bytes) {
            Component::from_binary(engine, bytes).map(Code::Component)
        } else {
            Module::from_binary(engine, bytes).map(Code::Module)
        }
        .map_err(|e| Error::InvalidModule(format!("invalid module: {e:#}")))?;
        let compile_ms = start.elapsed().as_secs_f64() * 1000.0;
        let artifact = code
            .serialize()
            .map_err(|e| Error::internal(format!("serializing the compiled binary: {e:#}")))?;
        let mut c = self.prepare(code, Artifact::Bytes(&artifact), sha256, bytes.len() as u64)?;
        c.compile_ms = compile_ms;
        c.artifact = artifact;
        Ok(c)
    }

    /// Detect the kind of compiled (or deserialized) code (of the first engine) and prepare
    /// its glue, on every engine: the other engines load `artifact`, the serialized form
    /// of `code`.
    pub fn prepare(
        &self,
        code: Code,
        artifact: Artifact<'_>,
        sha256: String,
        size: u64,
    ) -> Result<Compiled> {
        let mut glues =
            vec![crate::kinds::prepare(&self.linkers[0], &code).map_err(Error::InvalidModule)?];
        let engines = self
            .engine
            .engines()
            .iter()
            .zip(self.linkers.iter())
            .skip(1);
        for (engine, linkers) in engines {
            let copy = match (&code, artifact) {
                (Code::Module(_), Artifact::Bytes(b)) => {
                    sys::deserialize_module_bytes(engine, b).map(Code::Module)
                }
                (Code::Module(_), Artifact::File(f)) => {
                    sys::deserialize_module(engine, f).map(Code::Module)
                }
                (Code::Component(_), Artifact::Bytes(b)) => {
                    sys::deserialize_component_bytes(engine, b).map(Code::Component)
                }
                (Code::Component(_), Artifact::File(f)) => {
                    sys::deserialize_component(engine, f).map(Code::Component)
                }
            }
            .map_err(|e| {
                Error::internal(format!(
                    "loading the compiled binary into another engine: {e:#}"
                ))
            })?;
            glues.push(crate::kinds::prepare(linkers, &copy).map_err(Error::InvalidModule)?);
        }
        Ok(Compiled {
            code,
            glues: glues.into(),
            sha256,
            size,
            artifact: Vec::new(),
            compile_ms: 0.0,
        })
    }

    /// The engine this registry compiles with.
    pub fn engine(&self) -> &Arc<WasmEngine> {
        &self.engine
    }

    /// Register a compiled module for `owner` (memory only).
    pub fn insert(
        &self,
        owner: &Tenant,
        compiled: Compiled,
        opts: LoadOptions,
    ) -> Result<Arc<Binary>> {
        match self.insert_with(owner, compiled, opts, |_| Ok(()))? {
            Loaded::New { bin, .. } | Loaded::Unchanged(bin) => Ok(bin),
        }
    }

    /// Register a compiled module for `owner`: check quotas and the name, then run
    /// `persist` (store it durably), and only then make it visible. If `persist` fails
    /// nothing is registered. With `replace` and a name the owner has, the name moves to
    /// the new binary in one step once it is stored; the versions beyond
    /// `registry.keep_versions` leave the registry (see [`Loaded`]).
    pub fn insert_with(
        &self,
        owner: &Tenant,
        compiled: Compiled,
        opts: LoadOptions,
        persist: impl FnOnce(&Binary) -> Result<()>,
    ) -> Result<Loaded> {
        if opts.public && !owner.is_admin() {
            return Err(Error::Forbidden(
                "only admins may load public binaries".into(),
            ));
        }
        if let Some(name) = &opts.name {
            validate_name(name)?;
        } else if opts.replace {
            return Err(Error::bad_request(
                "`replace` needs a `name`: it makes the new module that name's current version",
            ));
        }
        if let Some(config) = &opts.config {
            validate_config(compiled.kind(), config)?;
        }
        if let Some(source) = &opts.source {
            validate_source(source)?;
        }
        if opts.provisioned.is_some() != owner.is_provisioning() {
            return Err(Error::internal(
                "a provisioned binary is loaded by the daemon's provisioning only",
            ));
        }
        let (replace, inherit) = (opts.replace, opts.config.is_none());
        let mut bin = self.make_binary(owner.uid, compiled, opts);
        let _naming = bin.name.is_some().then(|| self.lock_naming());
        let current = bin.name.as_ref().and_then(|name| {
            let id = *self.names.get(&(owner.uid, name.clone()))?;
            self.get(id)
        });
        let Some(current) = current else {
            // A new name (or none).
            self.reserve_slot(owner.uid, bin.size, &[])?;
            if let Err(e) = self.reserve_names(&bin).and_then(|()| persist(&bin)) {
                self.release_names(&bin);
                self.release_slot(owner.uid, bin.size);
                return Err(e);
            }
            let bin = Arc::new(bin);
            self.binaries.insert(bin.id, bin.clone());
            return Ok(Loaded::New {
                bin,
                replaced: None,
                dropped: Vec::new(),
            });
        };
        let name = current.name.clone().unwrap_or_default();
        match (current.provisioned(), owner.is_provisioning()) {
            (Some(p), false) => return Err(declared_by(&name, &p)),
            (None, true) => {
                return Err(Error::AlreadyExists(format!(
                    "uid {} already has a binary named {name:?} that no provisioning file declares ({}); unload it or declare another name",
                    owner.uid, current.id
                )));
            }
            _ => {}
        }
        if !replace {
            return Err(Error::AlreadyExists(format!(
                "you already have a binary named {name:?}; load with --replace (\"replace\": true) to make this its new version, unload it, or choose another name"
            )));
        }
        if bin.public && !current.public {
            return Err(Error::bad_request(format!(
                "{name:?} is a private binary and a replace keeps its visibility; load without --public, or unload {name:?} first"
            )));
        }
        bin.public = current.public;
        if bin.sha256 == current.sha256 {
            if !inherit && **bin.config.load() != **current.config.load() {
                return Err(Error::bad_request(format!(
                    "the module is {name:?}'s current version ({}); change its configuration with `configure`",
                    current.id
                )));
            }
            return Ok(Loaded::Unchanged(current));
        }
        if inherit {
            let config = current.config.load_full();
            validate_config(bin.kind, &config).map_err(|e| {
                Error::bad_request(format!(
                    "the new version would keep the configuration of {name:?}'s current version, but: {e}; give the new version its own (--config)"
                ))
            })?;
            bin.config = ArcSwap::new(config);
        }
        let versions = self.versions_of(owner.uid, &name);
        let keep = self.live.load().registry.keep_versions.max(1);
        // The new version counts: those that became current longest ago go.
        let dropped: Vec<Arc<Binary>> = versions
            .iter()
            .take((versions.len() + 1).saturating_sub(keep))
            .cloned()
            .collect();
        let top = versions.last().map_or(0, |b| b.activation());
        bin.activation = AtomicU64::new(top + 1);
        self.reserve_slot(owner.uid, bin.size, &dropped)?;
        if let Err(e) = persist(&bin) {
            self.release_slot(owner.uid, bin.size);
            return Err(e);
        }
        let bin = Arc::new(bin);
        self.binaries.insert(bin.id, bin.clone());
        // The step that moves the name: a lookup sees the old version or the new one.
        self.settle(owner.uid, &name);
        for old in &dropped {
            self.remove(old);
        }
        Ok(Loaded::New {
            bin,
            replaced: Some(current),
            dropped,
        })
    }

    fn lock_naming(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data of its own: a panic elsewhere leaves nothing torn.
        self.naming.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The binaries of `owner` named `name`, in the order they became current (the current
    /// version last).
    fn versions_of(&self, owner: u32, name: &str) -> Vec<Arc<Binary>> {
        let mut v: Vec<Arc<Binary>> = self
            .binaries
            .iter()
            .filter(|b| b.owner == owner && b.name.as_deref() == Some(name))
            .map(|b| b.clone())
            .collect();
        v.sort_by_key(|b| (b.activation(), b.seq));
        v
    }

    /// Point the name at its current version (the highest activation), or drop it when no
    /// version is left.
    fn settle(&self, owner: u32, name: &str) {
        let key = (owner, name.to_string());
        match self.versions_of(owner, name).last() {
            Some(top) => {
                self.names.insert(key, top.id);
                if top.public {
                    self.public_names.insert(name.to_string(), top.id);
                }
            }
            None => {
                self.names.remove(&key);
                self.public_names
                    .remove_if(name, |_, id| !self.binaries.contains_key(id));
            }
        }
    }

    /// Whether `bin` is a version of its name other than the current one.
    pub fn is_superseded(&self, bin: &Binary) -> bool {
        bin.name.as_ref().is_some_and(|name| {
            self.names
                .get(&(bin.owner, name.clone()))
                .is_some_and(|id| *id != bin.id)
        })
    }

    /// Register a binary restored from the state directory, with its stored identity.
    /// Quotas are not checked (it was admitted when loaded); a name clash is an error,
    /// unless it is another version of the same owner's name.
    pub fn restore(&self, meta: Identity, compiled: Compiled) -> Result<Arc<Binary>> {
        let mut bin = self.make_binary(
            meta.owner,
            compiled,
            LoadOptions {
                name: meta.name,
                public: meta.public,
                config: Some(meta.config),
                replace: false,
                source: meta.source,
                provisioned: meta.provisioned,
            },
        );
        bin.id = meta.id;
        bin.loaded_at = meta.loaded_at;
        bin.activation = AtomicU64::new(meta.activation);
        let _naming = self.lock_naming();
        if self.binaries.contains_key(&bin.id) {
            return Err(Error::AlreadyExists(format!(
                "binary {} is already registered",
                bin.id
            )));
        }
        let version_of = bin.name.as_ref().and_then(|name| {
            let id = *self.names.get(&(bin.owner, name.clone()))?;
            self.get(id).filter(|b| b.public == bin.public)
        });
        if version_of.is_none() {
            self.reserve_names(&bin)?;
        }
        let mut held = self.per_owner.entry(bin.owner).or_insert((0, 0));
        held.0 += 1;
        held.1 += bin.size;
        drop(held);
        let bin = Arc::new(bin);
        self.binaries.insert(bin.id, bin.clone());
        // A name seen first was reserved for this binary above; only a second version has
        // to be weighed against the others (a scan of every binary: not once per restore).
        if let (Some(name), Some(_)) = (&bin.name, version_of) {
            self.settle(bin.owner, name);
        }
        Ok(bin)
    }

    fn release_names(&self, bin: &Binary) {
        if let Some(name) = &bin.name {
            self.names
                .remove_if(&(bin.owner, name.clone()), |_, id| *id == bin.id);
            if bin.public {
                self.public_names.remove_if(name, |_, id| *id == bin.id);
            }
        }
    }

    /// Take `bin` out of the registry: its name moves to the version that was current
    /// before it (or goes), its quota is freed, its plugin state goes. Running executions
    /// keep their `Arc` and finish. Call with the naming lock held.
    fn remove(&self, bin: &Binary) -> Option<Arc<Binary>> {
        let (_, bin) = self.binaries.remove(&bin.id)?;
        if let Some(name) = &bin.name {
            self.settle(bin.owner, name);
        }
        self.release_slot(bin.owner, bin.size);
        self.state.remove_binary(bin.id);
        Some(bin)
    }

    /// Drop a binary that another process removed from the state directory (a public
    /// binary unloaded in another tenant's worker): no access check, nothing on disk.
    /// Running executions keep their `Arc` and finish.
    pub fn forget(&self, id: Uuid) -> Option<Arc<Binary>> {
        let _naming = self.lock_naming();
        let bin = self.get(id)?;
        self.remove(&bin)
    }

    /// Take the activation another process stored for binary `id` (a public binary rolled
    /// back or replaced in another tenant's worker), moving its name accordingly.
    pub fn set_activation(&self, id: Uuid, activation: u64) {
        let _naming = self.lock_naming();
        if let Some(bin) = self.get(id) {
            bin.activation.store(activation, Relaxed);
            if let Some(name) = &bin.name {
                self.settle(bin.owner, name);
            }
        }
    }

    /// Every registered binary, in load order.
    pub fn all(&self) -> Vec<Arc<Binary>> {
        let mut v: Vec<Arc<Binary>> = self.binaries.iter().map(|b| b.clone()).collect();
        v.sort_by_key(|b| b.seq);
        v
    }

    fn make_binary(&self, owner: u32, compiled: Compiled, opts: LoadOptions) -> Binary {
        Binary {
            id: Uuid::new_v4(),
            name: opts.name,
            owner,
            sha256: compiled.sha256,
            size: compiled.size,
            kind: compiled.glues[0].kind(),
            public: opts.public,
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seq: self.seq.fetch_add(1, Relaxed),
            activation: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            code: compiled.code,
            glues: compiled.glues,
            config: ArcSwap::from_pointee(opts.config.unwrap_or_default()),
            stats: BinaryStats::default(),
            source: opts.source,
            provisioned: ArcSwapOption::from_pointee(opts.provisioned),
        }
    }

    /// Count a binary of `size` bytes for `uid`, if its quota allows it once the binaries
    /// in `leaving` (versions a replace drops) are gone.
    fn reserve_slot(&self, uid: u32, size: u64, leaving: &[Arc<Binary>]) -> Result<()> {
        let quota = self.live.load().quotas.for_uid(uid);
        let mut held = self.per_owner.entry(uid).or_insert((0, 0));
        let (n, bytes) = *held;
        let (n, bytes) = (
            n.saturating_sub(leaving.len()),
            bytes.saturating_sub(leaving.iter().map(|b| b.size).sum()),
        );
        if n >= quota.binaries {
            self.metrics.refused(uid, Refusal::Binaries);
            return Err(Error::QuotaExceeded(format!(
                "you already have {n} binaries loaded (every kept version counts), your quota is {}; unload one first",
                quota.binaries
            )));
        }
        if bytes + size > quota.module_bytes {
            self.metrics.refused(uid, Refusal::ModuleBytes);
            return Err(Error::QuotaExceeded(format!(
                "your binaries would use {} bytes of modules, your quota is {}; unload one first",
                bytes + size,
                quota.module_bytes
            )));
        }
        *held = (held.0 + 1, held.1 + size);
        Ok(())
    }

    fn release_slot(&self, uid: u32, size: u64) {
        if let Entry::Occupied(mut e) = self.per_owner.entry(uid) {
            let (n, bytes) = *e.get();
            if n <= 1 {
                e.remove();
            } else {
                *e.get_mut() = (n - 1, bytes.saturating_sub(size));
            }
        }
    }

    fn reserve_names(&self, bin: &Binary) -> Result<()> {
        let Some(name) = &bin.name else {
            return Ok(());
        };
        match self.names.entry((bin.owner, name.clone())) {
            Entry::Occupied(_) => {
                return Err(Error::AlreadyExists(format!(
                    "you already have a binary named {name:?}; unload it or choose another name"
                )));
            }
            Entry::Vacant(v) => {
                v.insert(bin.id);
            }
        }
        if bin.public {
            match self.public_names.entry(name.clone()) {
                Entry::Occupied(_) => {
                    self.names.remove(&(bin.owner, name.clone()));
                    return Err(Error::AlreadyExists(format!(
                        "a public binary named {name:?} already exists"
                    )));
                }
                Entry::Vacant(v) => {
                    v.insert(bin.id);
                }
            }
        }
        Ok(())
    }

    /// Find a binary as `tenant` sees it, by UUID, by name (the tenant's own binary of that
    /// name, else the public one) or by `UID/NAME` (the binary named NAME of uid UID: the
    /// dispatcher has put uids for user names). Binaries the tenant may not see are reported
    /// as not found, so their existence does not leak.
    pub fn resolve(&self, tenant: &Tenant, reference: &str, access: Access) -> Result<Arc<Binary>> {
        let Some(bin) = self.find(tenant, reference)? else {
            return Err(self.missing(tenant, reference));
        };
        let owns = tenant.is(bin.owner);
        let visible = owns || bin.public || tenant.is_admin();
        if !visible {
            return Err(self.missing(tenant, reference));
        }
        if access == Access::Manage && !tenant.is_admin() && (!owns || bin.public) {
            return Err(Error::Forbidden(format!(
                "binary {reference:?} is public; only an admin may change or unload it"
            )));
        }
        if access == Access::Manage
            && !tenant.is_provisioning()
            && let Some(p) = bin.provisioned()
        {
            return Err(declared_by(reference, &p));
        }
        Ok(bin)
    }

    fn find(&self, tenant: &Tenant, reference: &str) -> Result<Option<Arc<Binary>>> {
        let id = if let Ok(id) = Uuid::parse_str(reference) {
            Some(id)
        } else {
            match wasmcore_proto::split_owner(reference) {
                None => self
                    .names
                    .get(&(tenant.uid, reference.to_string()))
                    .map(|e| *e)
                    .or_else(|| self.public_names.get(reference).map(|e| *e)),
                Some(Err(e)) => return Err(Error::bad_request(e)),
                Some(Ok((Owner::Uid(uid), name))) => {
                    self.names.get(&(uid, name.to_string())).map(|e| *e)
                }
                Some(Ok((Owner::User(user), _))) => {
                    return Err(Error::internal(format!(
                        "the user {user:?} of {reference:?} was not looked up"
                    )));
                }
            }
        };
        Ok(id.and_then(|id| self.binaries.get(&id).map(|b| b.clone())))
    }

    /// The error for a reference that names nothing `tenant` may see.
    fn missing(&self, tenant: &Tenant, reference: &str) -> Error {
        if !tenant.is_admin() {
            return Error::NotFound(format!(
                "no binary {reference:?} is visible to you (uid {})",
                tenant.uid
            ));
        }
        // Who has a binary of this name matters only for a bare name.
        let bare = Uuid::parse_str(reference).is_err() && !reference.contains('/');
        let holders: Vec<u32> = if bare {
            self.names
                .iter()
                .filter(|e| e.key().1 == reference)
                .map(|e| e.key().0)
                .collect()
        } else {
            Vec::new()
        };
        Error::NotFound(missing_for_admin(tenant.uid, reference, &holders, &|_| {
            None
        }))
    }

    /// Binaries visible to `tenant`: its own and public ones; with `all`, every binary
    /// (admins only).
    pub fn list(&self, tenant: &Tenant, all: bool) -> Result<Vec<Arc<Binary>>> {
        if all && !tenant.is_admin() {
            return Err(Error::Forbidden(
                "only admins may list every tenant's binaries (--all)".into(),
            ));
        }
        let mut v: Vec<Arc<Binary>> = self
            .binaries
            .iter()
            .filter(|b| all || tenant.is(b.owner) || b.public)
            .map(|b| b.clone())
            .collect();
        v.sort_by_key(|b| b.seq);
        Ok(v)
    }

    /// Replace the configuration of a binary the caller may manage: validate it, run
    /// `persist` with it (store it durably), then make it visible to new executions.
    pub fn configure(
        &self,
        tenant: &Tenant,
        reference: &str,
        config: PluginConfig,
        persist: impl FnOnce(&Binary, &PluginConfig) -> Result<()>,
    ) -> Result<Arc<Binary>> {
        let bin = self.resolve(tenant, reference, Access::Manage)?;
        validate_config(bin.kind, &config)?;
        persist(&bin, &config)?;
        bin.config.store(Arc::new(config));
        Ok(bin)
    }

    /// Give the binary `reference` names the configuration and the provisioning its file now
    /// declares (for the daemon's provisioning only), once `persist` has stored them.
    pub fn redeclare(
        &self,
        tenant: &Tenant,
        reference: &str,
        config: PluginConfig,
        provisioned: Provisioned,
        persist: impl FnOnce(&Binary, &PluginConfig, &Provisioned) -> Result<()>,
    ) -> Result<Arc<Binary>> {
        if !tenant.is_provisioning() {
            return Err(Error::internal(
                "only the daemon's provisioning redeclares a binary",
            ));
        }
        let bin = self.resolve(tenant, reference, Access::Manage)?;
        validate_config(bin.kind, &config)?;
        persist(&bin, &config, &provisioned)?;
        bin.config.store(Arc::new(config));
        bin.provisioned.store(Some(Arc::new(provisioned)));
        Ok(bin)
    }

    /// What `unload` of `reference` removes, in the order to remove it: by name, every
    /// version of the name, the current one last (so that a crash half-way leaves the name
    /// on its current version); by UUID, that binary alone (when it was its name's current
    /// version, the name moves to the version that was current before it).
    pub fn unload_plan(&self, tenant: &Tenant, reference: &str) -> Result<Vec<Arc<Binary>>> {
        let bin = self.resolve(tenant, reference, Access::Manage)?;
        match &bin.name {
            Some(name) if Uuid::parse_str(reference).is_err() => {
                Ok(self.versions_of(bin.owner, name))
            }
            _ => Ok(vec![bin]),
        }
    }

    /// Remove binary `bin` (one of an [`Registry::unload_plan`], already gone from disk).
    /// Running executions keep their `Arc` and finish; new lookups fail.
    pub fn unload_one(&self, bin: &Binary) -> Option<Arc<Binary>> {
        let _naming = self.lock_naming();
        self.remove(bin)
    }

    /// [`Registry::unload_plan`] carried out in memory only (nothing stored to remove).
    pub fn unload(&self, tenant: &Tenant, reference: &str) -> Result<Vec<Arc<Binary>>> {
        let plan = self.unload_plan(tenant, reference)?;
        Ok(plan.iter().filter_map(|b| self.unload_one(b)).collect())
    }

    /// Move the name `reference` names (by name or by one of its versions' UUIDs) back to
    /// the version that was current before its current one: `persist` stores that
    /// version's new activation, then the name moves. A second rollback undoes the first.
    /// Returns (the new current version, the one it replaces).
    pub fn rollback(
        &self,
        tenant: &Tenant,
        reference: &str,
        persist: impl FnOnce(&Binary, u64) -> Result<()>,
    ) -> Result<(Arc<Binary>, Arc<Binary>)> {
        let _naming = self.lock_naming();
        let bin = self.resolve(tenant, reference, Access::Manage)?;
        let Some(name) = bin.name.clone() else {
            return Err(Error::bad_request(format!(
                "binary {reference:?} has no name; versions belong to a name"
            )));
        };
        let versions = self.versions_of(bin.owner, &name);
        let (Some(current), Some(before)) = (versions.last(), versions.iter().rev().nth(1)) else {
            return Err(Error::NotFound(format!(
                "{name:?} has no previous version to roll back to (it has one version; registry.keep_versions keeps {})",
                self.live.load().registry.keep_versions
            )));
        };
        let activation = current.activation() + 1;
        persist(before, activation)?;
        before.activation.store(activation, Relaxed);
        self.settle(bin.owner, &name);
        Ok((before.clone(), current.clone()))
    }

    /// The versions of the name `reference` names, in the order they became current (the
    /// current one last).
    pub fn versions(&self, tenant: &Tenant, reference: &str) -> Result<Vec<Arc<Binary>>> {
        let bin = self.resolve(tenant, reference, Access::Use)?;
        let Some(name) = &bin.name else {
            return Err(Error::bad_request(format!(
                "binary {reference:?} has no name; versions belong to a name"
            )));
        };
        Ok(self.versions_of(bin.owner, name))
    }
}

/// What an admin is told when a reference names no binary. Admins see every binary, so
/// this says what is not there, never that it is hidden. `holders` are the tenants with a
/// binary of that name (for a bare name, which means the admin's own or a public one);
/// `user_name` gives a uid's user name where it can be looked up.
pub fn missing_for_admin(
    admin: u32,
    reference: &str,
    holders: &[u32],
    user_name: &dyn Fn(u32) -> Option<String>,
) -> String {
    let who = |uid: u32| match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    if Uuid::parse_str(reference).is_ok() {
        return format!("no binary {reference} is loaded");
    }
    match wasmcore_proto::split_owner(reference) {
        Some(Ok((Owner::Uid(uid), name))) if uid == admin => {
            format!("you (uid {uid}) have no binary named {name:?}")
        }
        Some(Ok((Owner::Uid(uid), name))) => {
            format!("{} has no binary named {name:?}", who(uid))
        }
        _ => {
            let mut msg = format!(
                "you (uid {admin}) have no binary named {reference:?} and no public binary has that name"
            );
            if holders.is_empty() {
                msg.push_str("; no tenant has one");
            } else {
                let named: Vec<String> = holders
                    .iter()
                    .map(|&uid| {
                        format!("{}/{reference}", user_name(uid).unwrap_or(uid.to_string()))
                    })
                    .collect();
                msg.push_str(&format!(
                    "; another tenant's binary is named OWNER/NAME: {}",
                    named.join(", ")
                ));
            }
            msg
        }
    }
}

/// A binary name: 1 to [`MAX_NAME_LEN`] characters of A-Z a-z 0-9 . _ -, starting with a
/// letter or digit, not a UUID.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(Error::bad_request(format!(
            "invalid name {name:?}: use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(Error::bad_request("a name must not look like a UUID"));
    }
    Ok(())
}

/// The refusal of a change to a binary that a provisioning file declares.
fn declared_by(reference: &str, p: &Provisioned) -> Error {
    Error::Forbidden(format!(
        "binary {reference:?} is declared by the provisioning file {}; change or remove that file and reload the daemon (systemctl reload wasm-core)",
        p.file
    ))
}

/// Longest `source.reference` kept.
const MAX_SOURCE_REFERENCE: usize = 1024;

/// A source is an `oci://` reference and a `sha256:` manifest digest. The daemon cannot
/// check either against the registry (it never fetches anything); it keeps them as the
/// client's account of where the bytes came from.
fn validate_source(source: &Source) -> Result<()> {
    let r = &source.reference;
    if !r.starts_with("oci://")
        || r.len() > MAX_SOURCE_REFERENCE
        || r.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::bad_request(format!(
            "source.reference {r:?}: an oci:// reference of at most {MAX_SOURCE_REFERENCE} bytes, without spaces"
        )));
    }
    let d = &source.digest;
    let hex = d.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::bad_request(format!(
            "source.digest {d:?}: sha256: and 64 lowercase hex digits"
        )));
    }
    Ok(())
}

/// A configuration is for Extism plugins, and capped in size.
fn validate_config(kind: ModuleKind, config: &PluginConfig) -> Result<()> {
    if config.is_empty() {
        return Ok(());
    }
    if kind != ModuleKind::Extism {
        return Err(Error::bad_request(format!(
            "a configuration is read by Extism plugins only; this binary is of kind {kind}"
        )));
    }
    if config.len() > MAX_CONFIG_ENTRIES {
        return Err(Error::bad_request(format!(
            "a configuration may have at most {MAX_CONFIG_ENTRIES} entries, this one has {}",
            config.len()
        )));
    }
    if let Some(k) = config
        .keys()
        .find(|k| k.is_empty() || k.len() > MAX_CONFIG_KEY)
    {
        return Err(Error::bad_request(format!(
            "configuration key {k:?}: a key has 1-{MAX_CONFIG_KEY} bytes"
        )));
    }
    let bytes: usize = config.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge(format!(
            "a configuration may hold at most {MAX_CONFIG_BYTES} bytes of keys and values, this one {bytes}"
        )));
    }
    Ok(())
}
