//! The binary registry: UUID → compiled binary, with owner-scoped names.
//!
//! Loading validates, compiles once, builds the `InstancePre` and resolves the ABI exports
//! once. Every lookup takes the caller's [`Tenant`]: the registry alone decides who may see,
//! run or unload a binary. A binary belongs to the UID that loaded it; an admin may load it
//! as public (everyone may run it, only admins unload it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use wasmcore_proto::{BinaryInfo, ExternInfo, ModuleKind};
use wasmtime::{ExternType, InstancePre, Linker, Module, ModuleExport};

use crate::config::Live;
use crate::engine::WasmEngine;
use crate::error::{Error, Result};
use crate::executor::ExecCtx;
use crate::state::StateStore;
use crate::tenant::Tenant;

const WASI_MODULE: &str = "wasi_snapshot_preview1";
const MAX_NAME_LEN: usize = 64;

/// ABI exports resolved once at load.
#[derive(Default)]
pub struct Exports {
    pub memory: Option<ModuleExport>,
    pub alloc: Option<CheckedFunc<i32, i32>>,
    pub process: Option<CheckedFunc<(i32, i32), i32>>,
    pub start: Option<CheckedFunc<(), ()>>,
}

/// A function export whose signature was checked to be `P -> R` when its module was
/// loaded; only [`check_abi`] makes one. Executions then skip the per-call type check,
/// which takes a lock in the engine's type registry (docs/PERFORMANCE.md).
pub struct CheckedFunc<P, R> {
    export: ModuleExport,
    _sig: std::marker::PhantomData<fn(P) -> R>,
}

impl<P, R> CheckedFunc<P, R> {
    fn verified(export: ModuleExport) -> Self {
        CheckedFunc {
            export,
            _sig: std::marker::PhantomData,
        }
    }

    /// The export, of the module this was checked on.
    pub fn export(&self) -> &ModuleExport {
        &self.export
    }
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").finish_non_exhaustive()
    }
}

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
    pub executions: AtomicU64,
    /// Bytes it takes in the state directory (module + precompiled code), set when stored
    /// or restored so `info` and `status` need no disk access.
    pub stored_bytes: AtomicU64,
    pub needs_wasi: bool,
    pub module: Module,
    pub pre: InstancePre<ExecCtx>,
    pub exports: Exports,
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
    /// The name if any, else the UUID.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.to_string())
    }

    pub fn info(&self) -> BinaryInfo {
        BinaryInfo {
            binary: self.id.to_string(),
            name: self.name.clone(),
            owner_uid: self.owner,
            size: self.size,
            sha256: self.sha256.clone(),
            kind: self.kind,
            public: self.public,
            loaded_at: self.loaded_at,
            executions: self.executions.load(Relaxed),
        }
    }

    pub fn imports(&self) -> Vec<ExternInfo> {
        self.module
            .imports()
            .map(|i| ExternInfo {
                module: Some(i.module().to_string()),
                name: i.name().to_string(),
                ty: describe(&i.ty()),
            })
            .collect()
    }

    pub fn exports_info(&self) -> Vec<ExternInfo> {
        self.module
            .exports()
            .map(|e| ExternInfo {
                module: None,
                name: e.name().to_string(),
                ty: describe(&e.ty()),
            })
            .collect()
    }
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

/// A compiled module, ready to be registered.
pub struct Compiled {
    module: Module,
    pre: InstancePre<ExecCtx>,
    exports: Exports,
    kind: ModuleKind,
    needs_wasi: bool,
    sha256: String,
    size: u64,
    pub compile_ms: f64,
}

impl Compiled {
    pub fn kind(&self) -> ModuleKind {
        self.kind
    }

    /// The precompiled artifact to store next to the original bytes.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        self.module
            .serialize()
            .map_err(|e| Error::internal(format!("serializing the compiled module: {e:#}")))
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// How to register a compiled module.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub name: Option<String>,
    pub public: bool,
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
    linker: Linker<ExecCtx>,
    live: Live,
    state: Arc<dyn StateStore>,
    /// Lock-free reads on the execute path; an entry is never held across `.await`.
    binaries: DashMap<Uuid, Arc<Binary>>,
    /// (owner, name) → UUID: names are unique per owner.
    names: DashMap<(u32, String), Uuid>,
    /// Public binaries by name, so tenants can run an admin's public binary by name.
    public_names: DashMap<String, Uuid>,
    /// (binaries, module bytes) per owner; updated under the entry lock so the quota cannot
    /// be raced.
    per_owner: DashMap<u32, (usize, u64)>,
    seq: AtomicU64,
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
        let mut linker = Linker::new(engine.engine());
        crate::abi::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("defining host functions: {e:#}"))?;
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |c: &mut ExecCtx| {
            c.wasi
                .as_mut()
                .expect("a WASI context exists for every module that imports WASI")
        })
        .map_err(|e| anyhow::anyhow!("defining WASI functions: {e:#}"))?;
        Ok(Registry {
            engine,
            linker,
            live,
            state,
            binaries: DashMap::new(),
            names: DashMap::new(),
            public_names: DashMap::new(),
            per_owner: DashMap::new(),
            seq: AtomicU64::new(0),
        })
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

    /// Validate and compile `bytes` (CPU-heavy: run it off the async workers).
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled> {
        self.check_size(bytes.len())?;
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(Error::InvalidModule(
                "not a WebAssembly binary (missing the \\0asm header)".into(),
            ));
        }
        let start = Instant::now();
        let module = Module::from_binary(self.engine.engine(), bytes)
            .map_err(|e| Error::InvalidModule(format!("invalid module: {e:#}")))?;
        let compile_ms = start.elapsed().as_secs_f64() * 1000.0;
        let mut c = self.prepare(
            module,
            hex::encode(Sha256::digest(bytes)),
            bytes.len() as u64,
        )?;
        c.compile_ms = compile_ms;
        Ok(c)
    }

    /// Check the ABI of a compiled (or deserialized) module and build its `InstancePre`.
    pub fn prepare(&self, module: Module, sha256: String, size: u64) -> Result<Compiled> {
        let (kind, exports) = check_abi(&module)?;
        let needs_wasi = module.imports().any(|i| i.module() == WASI_MODULE);
        let pre = self.linker.instantiate_pre(&module).map_err(|e| {
            Error::InvalidModule(format!(
                "module imports something wasm-core does not provide: {e:#}"
            ))
        })?;
        Ok(Compiled {
            module,
            pre,
            exports,
            kind,
            needs_wasi,
            sha256,
            size,
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
        self.insert_with(owner, compiled, opts, |_| Ok(()))
    }

    /// Register a compiled module for `owner`: check quotas and reserve the name, then run
    /// `persist` (store it durably), and only then make it visible. If `persist` fails
    /// nothing is registered.
    pub fn insert_with(
        &self,
        owner: &Tenant,
        compiled: Compiled,
        opts: LoadOptions,
        persist: impl FnOnce(&Binary) -> Result<()>,
    ) -> Result<Arc<Binary>> {
        if opts.public && !owner.is_admin() {
            return Err(Error::Forbidden(
                "only admins may load public binaries".into(),
            ));
        }
        if let Some(name) = &opts.name {
            validate_name(name)?;
        }
        let bin = Arc::new(self.make_binary(owner.uid, compiled, opts));
        self.reserve_slot(owner.uid, bin.size)?;
        if let Err(e) = self.reserve_names(&bin).and_then(|()| persist(&bin)) {
            self.release_names(&bin);
            self.release_slot(owner.uid, bin.size);
            return Err(e);
        }
        self.binaries.insert(bin.id, bin.clone());
        Ok(bin)
    }

    /// Register a binary restored from the state directory, with its stored identity.
    /// Quotas are not checked (it was admitted when loaded); a name clash is an error.
    pub fn restore(
        &self,
        meta: &crate::store::BinaryMeta,
        compiled: Compiled,
    ) -> Result<Arc<Binary>> {
        let mut bin = self.make_binary(
            meta.owner,
            compiled,
            LoadOptions {
                name: meta.name.clone(),
                public: meta.public,
            },
        );
        bin.id = meta.id;
        bin.loaded_at = meta.loaded_at;
        if self.binaries.contains_key(&bin.id) {
            return Err(Error::AlreadyExists(format!(
                "binary {} is already registered",
                bin.id
            )));
        }
        self.reserve_names(&bin)?;
        let mut held = self.per_owner.entry(bin.owner).or_insert((0, 0));
        held.0 += 1;
        held.1 += bin.size;
        drop(held);
        let bin = Arc::new(bin);
        self.binaries.insert(bin.id, bin.clone());
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

    /// A binary that is not registered: nobody can look it up (the watchdog's probe).
    pub fn detached(&self, owner: u32, compiled: Compiled) -> Result<Arc<Binary>> {
        Ok(Arc::new(self.make_binary(
            owner,
            compiled,
            LoadOptions::default(),
        )))
    }

    fn make_binary(&self, owner: u32, compiled: Compiled, opts: LoadOptions) -> Binary {
        Binary {
            id: Uuid::new_v4(),
            name: opts.name,
            owner,
            sha256: compiled.sha256,
            size: compiled.size,
            kind: compiled.kind,
            public: opts.public,
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seq: self.seq.fetch_add(1, Relaxed),
            executions: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            needs_wasi: compiled.needs_wasi,
            module: compiled.module,
            pre: compiled.pre,
            exports: compiled.exports,
        }
    }

    fn reserve_slot(&self, uid: u32, size: u64) -> Result<()> {
        let quota = self.live.load().quotas.for_uid(uid);
        let mut held = self.per_owner.entry(uid).or_insert((0, 0));
        let (n, bytes) = *held;
        if n >= quota.binaries {
            return Err(Error::QuotaExceeded(format!(
                "you already have {n} binaries loaded, your quota is {}; unload one first",
                quota.binaries
            )));
        }
        if bytes + size > quota.module_bytes {
            return Err(Error::QuotaExceeded(format!(
                "your binaries would use {} bytes of modules, your quota is {}; unload one first",
                bytes + size,
                quota.module_bytes
            )));
        }
        *held = (n + 1, bytes + size);
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

    /// Find a binary by UUID or name as `tenant` sees it. Binaries the tenant may not see
    /// are reported as not found, so their existence does not leak.
    pub fn resolve(&self, tenant: &Tenant, reference: &str, access: Access) -> Result<Arc<Binary>> {
        let not_found = || {
            Error::NotFound(format!(
                "no binary {reference:?} is visible to you (uid {})",
                tenant.uid
            ))
        };
        let bin = match Uuid::parse_str(reference) {
            Ok(id) => self.binaries.get(&id).map(|b| b.clone()),
            Err(_) => {
                let id = self
                    .names
                    .get(&(tenant.uid, reference.to_string()))
                    .map(|e| *e)
                    .or_else(|| self.public_names.get(reference).map(|e| *e));
                id.and_then(|id| self.binaries.get(&id).map(|b| b.clone()))
            }
        }
        .ok_or_else(not_found)?;
        let owns = tenant.is(bin.owner);
        let visible = owns || bin.public || tenant.is_admin();
        if !visible {
            return Err(not_found());
        }
        if access == Access::Manage && !tenant.is_admin() && (!owns || bin.public) {
            return Err(Error::Forbidden(format!(
                "binary {reference:?} is public; only an admin may unload it"
            )));
        }
        Ok(bin)
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

    /// Remove a binary. Running executions keep their `Arc` and finish; new lookups fail.
    pub fn unload(&self, tenant: &Tenant, reference: &str) -> Result<Arc<Binary>> {
        let bin = self.resolve(tenant, reference, Access::Manage)?;
        let Some((_, bin)) = self.binaries.remove(&bin.id) else {
            return Err(Error::NotFound(format!(
                "binary {reference:?} was already unloaded"
            )));
        };
        self.release_names(&bin);
        self.release_slot(bin.owner, bin.size);
        // State belongs to the binary: every tenant's namespace for it goes.
        self.state.remove_binary(bin.id);
        Ok(bin)
    }
}

/// Decide the ABI mode and resolve its exports, or explain what is missing.
fn check_abi(module: &Module) -> Result<(ModuleKind, Exports)> {
    use wasmtime::ValType;
    let func_sig = |name: &str| -> Option<(Vec<ValType>, Vec<ValType>)> {
        match module.get_export(name)? {
            ExternType::Func(f) => Some((f.params().collect(), f.results().collect())),
            _ => None,
        }
    };
    let is_i32 = |v: &[ValType]| v.iter().all(|t| matches!(t, ValType::I32));
    let is_alloc = |s: &(Vec<ValType>, Vec<ValType>)| {
        s.0.len() == 1 && s.1.len() == 1 && is_i32(&s.0) && is_i32(&s.1)
    };
    let mut exports = Exports {
        memory: module.get_export_index("memory"),
        ..Exports::default()
    };
    if !matches!(
        module.get_export("memory"),
        Some(ExternType::Memory(_)) | None
    ) {
        exports.memory = None;
    }
    if module.get_export("process").is_some() {
        let bad = |m: &str| Err(Error::InvalidModule(format!("process ABI: {m}")));
        match func_sig("process") {
            Some((p, r)) if p.len() == 2 && r.len() == 1 && is_i32(&p) && is_i32(&r) => {}
            _ => return bad("`process` must be a function (i32, i32) -> i32"),
        }
        match func_sig("alloc") {
            Some(s) if is_alloc(&s) => {}
            Some(_) => return bad("`alloc` must be a function (i32) -> i32"),
            None => return bad("the module exports `process` but no `alloc` function"),
        }
        if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
            return bad("the module exports no `memory`");
        }
        exports.process = checked(module, "process");
        exports.alloc = checked(module, "alloc");
        return Ok((ModuleKind::Process, exports));
    }
    if module.get_export("_start").is_some() {
        match func_sig("_start") {
            Some((p, r)) if p.is_empty() && r.is_empty() => {}
            _ => {
                return Err(Error::InvalidModule(
                    "WASI command: `_start` must be a function () -> ()".into(),
                ));
            }
        }
        exports.start = checked(module, "_start");
        // A WASI command may export `alloc` for `get_state`; any other signature is ignored.
        if func_sig("alloc").is_some_and(|s| is_alloc(&s)) {
            exports.alloc = checked(module, "alloc");
        }
        return Ok((ModuleKind::Wasi, exports));
    }
    Err(Error::InvalidModule(
        "the module exports neither `process` (process ABI) nor `_start` (WASI command); see docs/PLUGIN_ABI.md".into(),
    ))
}

/// `name` as a checked function export; call only once its signature is verified.
fn checked<P, R>(module: &Module, name: &str) -> Option<CheckedFunc<P, R>> {
    module.get_export_index(name).map(CheckedFunc::verified)
}

fn validate_name(name: &str) -> Result<()> {
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
