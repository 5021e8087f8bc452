//! Persistence under the state directory: binaries (metadata, original bytes, precompiled
//! artifacts) and the files behind plugin state.
//!
//! Layout (format 2, documented in wasmcored(8) and docs/PERSISTENCE.md): one subtree per
//! tenant, so that each tenant's worker can be given its own part and nothing else.
//!
//! ```text
//! STATE/FORMAT                                   "wasm-core-state 2"
//! STATE/tenants/<uid>/binaries/<uuid>/meta.json  a private binary of <uid>: metadata (versioned JSON)
//! STATE/tenants/<uid>/binaries/<uuid>/module.wasm            the original bytes
//! STATE/tenants/<uid>/binaries/<uuid>/<hash>.cwasm           precompiled for the engine whose compatibility hash is <hash>
//! STATE/tenants/<uid>/binaries/<uuid>/<hash>.cwasm.sha256
//! STATE/tenants/<uid>/state/<uuid>/<owner>.state plugin state kept by <uid>'s worker: namespace <owner> of binary <uuid>
//! STATE/tenants/<uid>/tmp/                       that worker's entries being written or removed
//! STATE/tenants/<uid>/quarantine/                what that worker could not read
//! STATE/public/binaries/<uuid>/…                 public binaries (owner in meta.json), stored once
//! STATE/public/tmp/, STATE/public/quarantine/
//! STATE/tmp/, STATE/quarantine/                  the daemon's own (start-up checks, upconvert)
//! ```
//!
//! Every write is: temp file, fsync, rename, fsync of the directory, with the temp file in
//! the `tmp/` of the same subtree. A binary's entry is built complete in `tmp/` and renamed
//! into `binaries/` in one step, so after a crash an entry is either all there or not there.
//! Removal renames the entry back into `tmp/` first. A format-1 directory (one `binaries/`
//! and one `state/` for everyone) is moved into this layout at start ([`StateDir::open`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use wasmcore_proto::ModuleKind;

use crate::kinds::Code;
use crate::registry::Artifact;
use crate::tenant::Scope;

mod state_files;
pub use state_files::FilePersist;

/// The layout of the state directory this daemon writes and reads (`STATE/FORMAT`).
pub const FORMAT: u32 = 2;
const FORMAT_LINE: &str = "wasm-core-state 2\n";
/// The layout this daemon moves into [`FORMAT`] at start.
const FORMAT_1_LINE: &str = "wasm-core-state 1\n";
/// The version of `meta.json` (unchanged by the move to layout 2).
pub const META_FORMAT: u32 = 1;
const META: &str = "meta.json";
const MODULE: &str = "module.wasm";

/// Metadata of a stored binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryMeta {
    pub format: u32,
    pub id: Uuid,
    pub name: Option<String>,
    pub owner: u32,
    pub sha256: String,
    pub size: u64,
    pub kind: ModuleKind,
    pub public: bool,
    pub loaded_at: u64,
    /// Extism plugins: the configuration `config_get` reads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// The order in which the versions of a name became current: of the binaries with this
    /// owner and name, the one with the highest is the name's current version (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub activation: u64,
    /// The OCI reference and manifest digest it was pulled by, as the client said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<wasmcore_proto::Source>,
    /// The provisioning file that declares it (and the limits it gives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned: Option<wasmcore_proto::Provisioned>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A stored binary found at start.
#[derive(Debug)]
pub struct StoredBinary {
    pub meta: BinaryMeta,
    pub dir: PathBuf,
}

impl StoredBinary {
    pub fn module_path(&self) -> PathBuf {
        self.dir.join(MODULE)
    }

    pub fn artifact_path(&self, engine_hash: &str) -> PathBuf {
        self.dir.join(artifact_name(engine_hash))
    }
}

/// An artifact's file name, `<engine_hash>.cwasm`; its checksum file adds `.sha256`.
fn artifact_name(engine_hash: &str) -> String {
    format!("{engine_hash}.cwasm")
}

/// The state directory.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    /// The tenant whose worker this is: its plugin state lives in its own subtree, and what
    /// it cannot read is quarantined there. `None`: the broker (or one process for all).
    holder: Option<u32>,
    /// Makes temp names unique within this process.
    seq: AtomicU64,
}

fn ctx(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The subdirectories of an area (a tenant's subtree, `public/`).
const AREA_DIRS: [&str; 3] = ["binaries", "tmp", "quarantine"];

fn mkdirs(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(ctx(format!("creating {}", path.display())))
}

/// The paths in `dir`; none when it does not exist (a tenant that never stored anything).
fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(d) => d.map(|e| e.map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(ctx(format!("reading {}", dir.display()))(e)),
    }
}

/// Empty a `tmp/` directory (what a crash left half-written).
fn empty_dir(dir: &Path) -> io::Result<()> {
    for p in entries(dir)? {
        let r = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(ctx(format!("removing stale {}", p.display())))?;
    }
    Ok(())
}

/// Bytes of the files in `dir` (a binary's entry).
pub fn stored_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl StateDir {
    /// Open (creating if needed) the state directory for the broker: check the format, move
    /// a format-1 directory into this layout, check that it is writable, and empty every
    /// `tmp/`. Only the broker opens it, before any worker starts.
    pub fn open(root: &Path) -> io::Result<StateDir> {
        mkdirs(root).map_err(ctx(format!("creating state directory {}", root.display())))?;
        let dir = StateDir {
            root: root.to_path_buf(),
            holder: None,
            seq: AtomicU64::new(0),
        };
        for sub in ["tmp", "quarantine", "tenants"] {
            mkdirs(&root.join(sub))?;
        }
        empty_dir(&root.join("tmp"))?;
        let format = root.join("FORMAT");
        match fs::read_to_string(&format) {
            Ok(s) if s == FORMAT_LINE => {}
            Ok(s) if s == FORMAT_1_LINE => {
                let moved = dir.upconvert(usize::MAX)?;
                log::info!(
                    "state directory {}: moved {moved} entries from format 1 into format {FORMAT} (one subtree per tenant)",
                    root.display()
                );
            }
            Ok(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} says {:?}; this wasmcored reads formats 1 and {FORMAT} only (was the state written by a newer version?)",
                        format.display(),
                        s.trim()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if root.join("binaries").is_dir() {
                    // A format-1 directory from before FORMAT existed is not a thing; an
                    // unmarked directory with entries is not ours to rearrange.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} has binaries/ but no FORMAT file", root.display()),
                    ));
                }
                write_atomic(&dir, root, "FORMAT", FORMAT_LINE.as_bytes())?;
            }
            Err(e) => return Err(ctx(format!("reading {}", format.display()))(e)),
        }
        // Proves the directory is writable now rather than at the first load.
        write_atomic(&dir, root, ".writable", b"")?;
        fs::remove_file(root.join(".writable")).map_err(ctx("removing the write probe"))?;
        for sub in AREA_DIRS {
            mkdirs(&dir.public_dir().join(sub))?;
        }
        empty_dir(&dir.public_dir().join("tmp"))?;
        for uid in dir.tenants()? {
            empty_dir(&dir.tenant_dir(uid).join("tmp"))?;
        }
        Ok(dir)
    }

    /// Use a state directory that the broker opened (and checked) at start, from the worker
    /// of `uid`: only its format is checked, and its subtree must exist
    /// ([`StateDir::prepare_tenant`]).
    pub fn attach(root: &Path, uid: u32) -> io::Result<StateDir> {
        let format = root.join("FORMAT");
        match fs::read_to_string(&format) {
            Ok(s) if s == FORMAT_LINE => {}
            Ok(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} says {:?}", format.display(), s.trim()),
                ));
            }
            Err(e) => return Err(ctx(format!("reading {}", format.display()))(e)),
        }
        let dir = StateDir {
            root: root.to_path_buf(),
            holder: Some(uid),
            seq: AtomicU64::new(0),
        };
        let mine = dir.tenant_dir(uid);
        if !mine.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist", mine.display()),
            ));
        }
        Ok(dir)
    }

    /// Create the subtree of `uid` (before its worker starts) and return it.
    pub fn prepare_tenant(&self, uid: u32) -> io::Result<PathBuf> {
        let dir = self.tenant_dir(uid);
        for sub in AREA_DIRS.iter().chain(&["state"]) {
            mkdirs(&dir.join(sub))?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The subtree of tenant `uid`.
    pub fn tenant_dir(&self, uid: u32) -> PathBuf {
        self.root.join("tenants").join(uid.to_string())
    }

    /// Where public binaries are stored.
    pub fn public_dir(&self) -> PathBuf {
        self.root.join("public")
    }

    /// The tenants that have a subtree.
    fn tenants(&self) -> io::Result<Vec<u32>> {
        let dir = self.root.join("tenants");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(ctx(format!("reading {}", dir.display())))? {
            if let Some(uid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(uid);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The subtree `path` lies in (a tenant's, `public/`), or the root.
    fn area_of(&self, path: &Path) -> PathBuf {
        let Ok(rel) = path.strip_prefix(&self.root) else {
            return self.root.clone();
        };
        let mut parts = rel.components();
        match parts.next().and_then(|c| c.as_os_str().to_str()) {
            Some("public") => self.public_dir(),
            Some("tenants") => match parts.next() {
                Some(uid) => self.root.join("tenants").join(uid.as_os_str()),
                None => self.root.clone(),
            },
            _ => self.root.clone(),
        }
    }

    /// A fresh temp name in the `tmp/` of `area`, so that the final rename stays within
    /// one subtree.
    fn tmp_path(&self, area: &Path, tag: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Relaxed);
        area.join("tmp")
            .join(format!("{tag}.{}.{n}", std::process::id()))
    }

    fn binary_dir(&self, owner: u32, public: bool, id: Uuid) -> PathBuf {
        let area = if public {
            self.public_dir()
        } else {
            self.tenant_dir(owner)
        };
        area.join("binaries").join(id.to_string())
    }

    /// The metadata of stored binary `id`, wherever it is; `None` when it is not stored (or
    /// unreadable).
    pub fn read_meta(&self, id: Uuid) -> Option<BinaryMeta> {
        let public = self.public_dir().join("binaries").join(id.to_string());
        if let Ok(b) = read_entry(&public) {
            return Some(b.meta);
        }
        self.tenants()
            .ok()?
            .into_iter()
            .find_map(|uid| read_entry(&self.binary_dir(uid, false, id)).ok())
            .map(|b| b.meta)
    }

    /// Store a binary durably: metadata, original bytes and artifact. Returns the bytes its
    /// entry takes.
    pub fn save_binary(
        &self,
        meta: &BinaryMeta,
        wasm: &[u8],
        engine_hash: &str,
        artifact: &[u8],
    ) -> io::Result<u64> {
        let dest = self.binary_dir(meta.owner, meta.public, meta.id);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        if !meta.public {
            self.prepare_tenant(meta.owner)?;
        }
        let staging = self.tmp_path(&self.area_of(&dest), &meta.id.to_string());
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(ctx(format!("creating {}", staging.display())))?;
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let result = (|| {
            write_file_synced(&staging.join(MODULE), wasm)?;
            write_artifact_files(&staging, engine_hash, artifact)?;
            write_file_synced(&staging.join(META), &json)?;
            fsync_dir(&staging)?;
            fs::rename(&staging, &dest)
                .map_err(ctx(format!("moving {} into place", dest.display())))?;
            fsync_dir(&parent)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result.map(|()| stored_bytes(&dest))
    }

    /// Replace the metadata of a stored binary (its configuration changed), atomically.
    pub fn update_meta(&self, meta: &BinaryMeta) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let dir = self.binary_dir(meta.owner, meta.public, meta.id);
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not stored", meta.id),
            ));
        }
        write_atomic(self, &dir, META, &json)
    }

    /// Replace the artifacts of a stored binary with one for `engine_hash`.
    pub fn replace_artifact(
        &self,
        stored: &StoredBinary,
        engine_hash: &str,
        artifact: &[u8],
    ) -> io::Result<()> {
        self.put_artifact(&stored.dir, engine_hash, artifact)
    }

    /// Store `artifact` as `dir/<engine_hash>.cwasm` with its checksum file, each replaced
    /// atomically (so a torn artifact a crash left behind is repaired, not kept), and drop
    /// the artifacts of other engines.
    fn put_artifact(&self, dir: &Path, engine_hash: &str, artifact: &[u8]) -> io::Result<()> {
        let name = artifact_name(engine_hash);
        write_atomic(self, dir, &name, artifact)?;
        write_atomic(self, dir, &format!("{name}.sha256"), &checksum(artifact))?;
        for entry in fs::read_dir(dir).map_err(ctx(format!("reading {}", dir.display())))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if (name.ends_with(".cwasm") || name.ends_with(".cwasm.sha256"))
                && !name.starts_with(engine_hash)
            {
                let _ = fs::remove_file(dir.join(&name));
            }
        }
        fsync_dir(dir)
    }

    /// Remove a binary of `owner` durably, with the plugin state this process keeps for it
    /// (a worker: its own subtree's; the broker or one process for all: every tenant's).
    /// Absent: nothing to do.
    pub fn remove_binary(&self, owner: u32, public: bool, id: Uuid) -> io::Result<()> {
        self.remove_dir(&self.binary_dir(owner, public, id))?;
        let holders = match self.holder {
            Some(uid) => vec![uid],
            None => self.tenants()?,
        };
        for uid in holders {
            self.remove_state(uid, id)?;
        }
        Ok(())
    }

    /// Remove the plugin state that tenant `holder`'s subtree keeps for binary `id` (it was
    /// unloaded, maybe by another worker).
    pub fn remove_state(&self, holder: u32, id: Uuid) -> io::Result<()> {
        self.remove_dir(&self.state_dir_of(holder, id))
    }

    /// Rename `dir` into its area's `tmp/`, make that durable, then delete it.
    fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        let doomed = self.tmp_path(&self.area_of(dir), "removed");
        match fs::rename(dir, &doomed) {
            Ok(()) => {
                fsync_dir(dir.parent().unwrap_or(&self.root))?;
                let _ = fs::remove_dir_all(&doomed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ctx(format!("removing {}", dir.display()))(e)),
        }
    }

    /// Every stored binary of `scope` (public ones included), or why an entry could not
    /// be read.
    pub fn list_binaries(
        &self,
        scope: Scope,
    ) -> io::Result<Vec<Result<StoredBinary, (PathBuf, String)>>> {
        let mut areas = vec![self.public_dir()];
        match scope {
            Scope::All => areas.extend(self.tenants()?.into_iter().map(|u| self.tenant_dir(u))),
            Scope::Tenant(uid) => areas.push(self.tenant_dir(uid)),
        }
        let mut out = Vec::new();
        for area in areas {
            for path in entries(&area.join("binaries"))? {
                out.push(read_entry(&path).map_err(|e| (path, e)));
            }
        }
        Ok(out)
    }

    /// Move an unreadable entry aside (never deleted: an admin may want it) and say why:
    /// into the `quarantine/` of its subtree in a worker, of the root in the broker.
    pub fn quarantine(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let area = match self.holder {
            Some(_) => self.area_of(path),
            None => self.root.clone(),
        };
        let quarantine = area.join("quarantine");
        mkdirs(&quarantine)?;
        let dest = quarantine.join(format!("{name}.{stamp}.{}", self.seq.fetch_add(1, Relaxed)));
        fs::rename(path, &dest).map_err(ctx(format!("quarantining {}", path.display())))?;
        let _ = fs::write(reason_path(&dest), reason);
        fsync_dir(&quarantine)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        Ok(dest)
    }

    /// The directory of plugin state files that `holder`'s subtree keeps for `binary`.
    pub fn state_dir_of(&self, holder: u32, binary: Uuid) -> PathBuf {
        self.tenant_dir(holder)
            .join("state")
            .join(binary.to_string())
    }

    /// Whose subtree keeps the plugin state of namespace `owner`: the worker's own, else
    /// (one process for all) the namespace owner's.
    pub fn state_holder(&self, owner: u32) -> u32 {
        self.holder.unwrap_or(owner)
    }

    /// The binaries this process holds: a worker's tenant's and the public ones, or all.
    pub fn scope(&self) -> Scope {
        self.holder.map_or(Scope::All, Scope::Tenant)
    }

    /// The `state/` directories this process reads: `(holder, directory)`.
    pub fn state_roots(&self) -> io::Result<Vec<(u32, PathBuf)>> {
        let holders = match self.holder {
            Some(uid) => vec![uid],
            None => self.tenants()?,
        };
        Ok(holders
            .into_iter()
            .map(|uid| (uid, self.tenant_dir(uid).join("state")))
            .collect())
    }

    /// Move a format-1 directory (`binaries/<uuid>/`, `state/<uuid>/<uid>.state`) into
    /// this layout, at most `limit` moves (tests stop it half-way, as a crash would), then,
    /// when nothing is left, write the new `FORMAT`. Every move is one rename made durable
    /// before the next, and `FORMAT` is written last: after a crash the next start finds
    /// each entry in its old or its new place, never lost, and goes on. Returns the moves.
    fn upconvert(&self, limit: usize) -> io::Result<usize> {
        let mut moved = 0;
        let old_binaries = self.root.join("binaries");
        if old_binaries.is_dir() {
            for entry in fs::read_dir(&old_binaries)
                .map_err(ctx(format!("reading {}", old_binaries.display())))?
            {
                if moved >= limit {
                    return Ok(moved);
                }
                let path = entry?.path();
                match read_entry(&path) {
                    Ok(b) => {
                        let dest = self.binary_dir(b.meta.owner, b.meta.public, b.meta.id);
                        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
                        if !b.meta.public {
                            self.prepare_tenant(b.meta.owner)?;
                        }
                        mkdirs(&parent)?;
                        fs::rename(&path, &dest).map_err(ctx(format!(
                            "moving {} to {}",
                            path.display(),
                            dest.display()
                        )))?;
                        fsync_dir(&parent)?;
                        fsync_dir(&old_binaries)?;
                    }
                    // What cannot be read cannot be placed: set aside, as at any start.
                    Err(why) => quarantine_logged(self, &path, &why, None),
                }
                moved += 1;
            }
        }
        let old_state = self.root.join("state");
        if old_state.is_dir() {
            for entry in
                fs::read_dir(&old_state).map_err(ctx(format!("reading {}", old_state.display())))?
            {
                let dir = entry?.path();
                let binary = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| Uuid::parse_str(n).ok());
                let Some(binary) = binary else {
                    quarantine_logged(self, &dir, "not a binary's state directory", None);
                    continue;
                };
                for f in fs::read_dir(&dir).map_err(ctx(format!("reading {}", dir.display())))? {
                    if moved >= limit {
                        return Ok(moved);
                    }
                    let file = f?.path();
                    let owner = file
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".state"))
                        .and_then(|n| n.parse::<u32>().ok());
                    let Some(owner) = owner else {
                        quarantine_logged(self, &file, "not a state file name", None);
                        continue;
                    };
                    self.prepare_tenant(owner)?;
                    let dest_dir = self.state_dir_of(owner, binary);
                    mkdirs(&dest_dir)?;
                    let dest = dest_dir.join(format!("{owner}.state"));
                    fs::rename(&file, &dest).map_err(ctx(format!(
                        "moving {} to {}",
                        file.display(),
                        dest.display()
                    )))?;
                    fsync_dir(&dest_dir)?;
                    fsync_dir(&dir)?;
                    moved += 1;
                }
                fs::remove_dir(&dir).map_err(ctx(format!("removing {}", dir.display())))?;
            }
        }
        // Nothing is left in the old places: the layout is the new one.
        write_atomic(self, &self.root, "FORMAT", FORMAT_LINE.as_bytes())?;
        for old in ["binaries", "state"] {
            let _ = fs::remove_dir(self.root.join(old));
        }
        // The watchdog's probe module of format 1: no tenant data.
        let _ = fs::remove_dir_all(self.root.join("probe"));
        fsync_dir(&self.root)?;
        Ok(moved)
    }
}

/// What [`restore`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: usize,
    /// Restored by compiling the original bytes (no artifact for this engine).
    pub recompiled: usize,
    pub quarantined: usize,
}

impl BinaryMeta {
    /// The metadata to store for `bin`.
    pub fn of(bin: &crate::registry::Binary) -> BinaryMeta {
        BinaryMeta {
            format: META_FORMAT,
            id: bin.id,
            name: bin.name.clone(),
            owner: bin.owner,
            sha256: bin.sha256.clone(),
            size: bin.size,
            kind: bin.kind,
            public: bin.public,
            loaded_at: bin.loaded_at,
            config: (**bin.config.load()).clone(),
            activation: bin.activation(),
            source: bin.source.clone(),
            provisioned: bin.provisioned(),
        }
    }

    /// Whether another of `metas` with this owner and name is the name's current version.
    pub fn superseded_in(&self, metas: &[BinaryMeta]) -> bool {
        self.name.as_deref().is_some_and(|name| {
            current_of(metas, |m| {
                m.owner == self.owner && m.name.as_deref() == Some(name)
            })
            .is_some_and(|m| m.id != self.id)
        })
    }

    /// The identity the registry restores the binary with.
    pub fn identity(&self) -> crate::registry::Identity {
        crate::registry::Identity {
            id: self.id,
            name: self.name.clone(),
            owner: self.owner,
            public: self.public,
            loaded_at: self.loaded_at,
            config: self.config.clone(),
            activation: self.activation,
            source: self.source.clone(),
            provisioned: self.provisioned.clone(),
        }
    }
}

/// Of the `metas` that `named` picks (the versions of one name), the current one: the
/// highest activation.
pub fn current_of(
    metas: &[BinaryMeta],
    named: impl Fn(&BinaryMeta) -> bool,
) -> Option<&BinaryMeta> {
    metas
        .iter()
        .filter(|m| named(m))
        .max_by_key(|m| m.activation)
}

/// The ids of the readable binary entries in `scope` (before restoring them).
pub fn stored_ids(dir: &StateDir, scope: Scope) -> io::Result<Vec<Uuid>> {
    Ok(dir
        .list_binaries(scope)?
        .into_iter()
        .filter_map(|e| e.ok().map(|b| b.meta))
        .filter(|m| scope.holds(m.owner, m.public))
        .map(|m| m.id)
        .collect())
}

/// What the broker found in the state directory at start.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every readable binary entry.
    pub binaries: Vec<BinaryMeta>,
    /// Entries and state directories moved to `quarantine/`.
    pub quarantined: usize,
}

/// The broker's check of the state directory at start, before any worker reads it: every
/// binary entry whose metadata cannot be read, and every plugin-state directory of a binary
/// that is not stored, is quarantined (never fatal), so that workers find only entries they
/// can restore and no state without its binary.
pub fn scan(dir: &StateDir) -> io::Result<Scan> {
    let mut scan = Scan::default();
    for entry in dir.list_binaries(Scope::All)? {
        match entry {
            Ok(stored) => scan.binaries.push(stored.meta),
            Err((path, why)) => {
                scan.quarantined += 1;
                quarantine_logged(dir, &path, &why, None);
            }
        }
    }
    for (holder, state) in dir.state_roots()? {
        for path in entries(&state)? {
            let binary = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| Uuid::parse_str(n).ok());
            let why = match binary {
                None => "not a binary's state directory",
                // Unloaded while this tenant's worker was not running: the state goes with
                // its binary, as on unload.
                Some(id) if !scan.binaries.iter().any(|m| m.id == id) => {
                    dir.remove_state(holder, id)?;
                    continue;
                }
                Some(_) => continue,
            };
            scan.quarantined += 1;
            quarantine_logged(dir, &path, why, Some(holder));
        }
    }
    Ok(scan)
}

fn quarantine_logged(dir: &StateDir, path: &Path, why: &str, owner: Option<u32>) {
    let binary = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match dir.quarantine(path, why) {
        Ok(dest) => match owner {
            Some(uid) => log::warn!(
                tenant_uid = uid, binary = binary.as_str();
                "quarantined {} ({why}) to {}",
                path.display(),
                dest.display()
            ),
            None => log::warn!(
                binary = binary.as_str();
                "quarantined {} ({why}) to {}",
                path.display(),
                dest.display()
            ),
        },
        Err(e) => log::error!(
            "cannot restore {} ({why}) nor quarantine it: {e}",
            path.display()
        ),
    }
}

/// Bring the public binaries of `registry` in line with the state directory after another
/// worker loaded, replaced, rolled back, configured or unloaded one: register the new ones,
/// move names to the versions now current, take changed configurations (and a provisioning
/// file's changed limits), forget the removed
/// ones (in that order, so that a replaced name never goes missing on the way). Returns how
/// many changed.
pub fn sync_public(dir: &StateDir, registry: &crate::registry::Registry) -> io::Result<usize> {
    let hash = registry.engine().compat_hash();
    let stored: Vec<StoredBinary> = dir
        .list_binaries(dir.scope())?
        .into_iter()
        .filter_map(Result::ok)
        .filter(|b| b.meta.public)
        .collect();
    let mut changed = 0;
    for s in &stored {
        if registry.get(s.meta.id).is_none() {
            match restore_one(dir, registry, s, &hash) {
                Ok(_) => changed += 1,
                Err(why) => log::warn!("public binary {} could not be read: {why}", s.meta.id),
            }
        }
    }
    for bin in registry.all() {
        if !bin.public {
            continue;
        }
        let Some(s) = stored.iter().find(|s| s.meta.id == bin.id) else {
            continue;
        };
        if bin.activation() != s.meta.activation {
            registry.set_activation(bin.id, s.meta.activation);
            changed += 1;
        }
        if **bin.config.load() != s.meta.config {
            bin.config.store(std::sync::Arc::new(s.meta.config.clone()));
            changed += 1;
        }
        if bin.provisioned() != s.meta.provisioned {
            bin.provisioned
                .store(s.meta.provisioned.clone().map(std::sync::Arc::new));
            changed += 1;
        }
    }
    for bin in registry.all() {
        if bin.public && !stored.iter().any(|s| s.meta.id == bin.id) {
            registry.forget(bin.id);
            if let Err(e) = dir.remove_state(dir.state_holder(bin.owner), bin.id) {
                log::warn!(
                    "removing the plugin state of unloaded binary {}: {e}",
                    bin.id
                );
            }
            changed += 1;
        }
    }
    Ok(changed)
}

/// Register every stored binary with its UUID, name and owner: from the precompiled
/// artifact when it matches this engine, else by compiling the original bytes (and storing
/// a new artifact). An entry that cannot be restored is quarantined, never fatal.
///
/// A tenant's worker (`scope` of one tenant) restores that tenant's and the public binaries
/// and passes over unreadable entries: the broker's [`scan`] quarantined those at start.
pub fn restore(
    dir: &StateDir,
    registry: &crate::registry::Registry,
    scope: Scope,
) -> io::Result<RestoreReport> {
    let hash = registry.engine().compat_hash();
    let mut report = RestoreReport::default();
    for entry in dir.list_binaries(scope)? {
        // The owner, when the entry's metadata could be read.
        let result = match entry {
            Err(_) if scope != Scope::All => continue,
            Err((path, why)) => Err((path, why, None)),
            Ok(stored) if !scope.holds(stored.meta.owner, stored.meta.public) => continue,
            Ok(stored) => restore_one(dir, registry, &stored, &hash)
                .map_err(|why| (stored.dir.clone(), why, Some(stored.meta.owner))),
        };
        match result {
            Ok(recompiled) => {
                report.restored += 1;
                report.recompiled += usize::from(recompiled);
            }
            Err((path, why, owner)) => {
                report.quarantined += 1;
                quarantine_logged(dir, &path, &why, owner);
            }
        }
    }
    Ok(report)
}

/// Restore one entry; `Ok(true)` when it had to be recompiled.
fn restore_one(
    dir: &StateDir,
    registry: &crate::registry::Registry,
    stored: &StoredBinary,
    hash: &str,
) -> Result<bool, String> {
    let engine = registry.engine().engine();
    let artifact = stored.artifact_path(hash);
    let component = stored.meta.kind == ModuleKind::Component;
    let from_artifact = open_artifact(engine, &artifact, component).unwrap_or_else(|e| {
        log::warn!(
            "binary {}: precompiled artifact unusable ({e}); recompiling",
            stored.meta.id
        );
        None
    });
    let recompiled = from_artifact.is_none();
    let compiled = match from_artifact {
        Some(m) => registry.prepare(
            m,
            Artifact::File(&artifact),
            stored.meta.sha256.clone(),
            stored.meta.size,
        ),
        None => {
            let bytes =
                fs::read(stored.module_path()).map_err(|e| format!("reading {MODULE}: {e}"))?;
            if hex::encode(Sha256::digest(&bytes)) != stored.meta.sha256 {
                return Err(format!("{MODULE} does not match the SHA-256 in {META}"));
            }
            let mut compiled = registry
                .compile_stored(&bytes, stored.meta.sha256.clone())
                .map_err(|e| format!("compiling {MODULE}: {e}"))?;
            if let Err(e) = dir.replace_artifact(stored, hash, &compiled.take_artifact()) {
                log::warn!(
                    "binary {}: could not store the new artifact: {e}",
                    stored.meta.id
                );
            }
            Ok(compiled)
        }
    }
    .map_err(|e| e.to_string())?;
    if compiled.kind() != stored.meta.kind {
        return Err(format!(
            "stored as {} but the module is {}",
            stored.meta.kind,
            compiled.kind()
        ));
    }
    let bin = registry
        .restore(stored.meta.identity(), compiled)
        .map_err(|e| e.to_string())?;
    bin.stored_bytes.store(stored_bytes(&stored.dir), Relaxed);
    Ok(recompiled)
}

/// Where [`StateDir::quarantine`] writes why it moved `dest` aside.
pub fn reason_path(dest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.reason", dest.display()))
}

fn read_entry(dir: &Path) -> Result<StoredBinary, String> {
    let text = fs::read(dir.join(META)).map_err(|e| format!("reading {META}: {e}"))?;
    let meta: BinaryMeta =
        serde_json::from_slice(&text).map_err(|e| format!("parsing {META}: {e}"))?;
    if meta.format != META_FORMAT {
        return Err(format!(
            "{META} has format {}, expected {META_FORMAT}",
            meta.format
        ));
    }
    if dir.file_name().and_then(|n| n.to_str()) != Some(meta.id.to_string().as_str()) {
        return Err(format!(
            "{META} names binary {} but sits in {}",
            meta.id,
            dir.display()
        ));
    }
    Ok(StoredBinary {
        meta,
        dir: dir.to_path_buf(),
    })
}

fn write_artifact_files(dir: &Path, engine_hash: &str, artifact: &[u8]) -> io::Result<()> {
    let name = artifact_name(engine_hash);
    write_file_synced(&dir.join(&name), artifact)?;
    write_file_synced(&dir.join(format!("{name}.sha256")), &checksum(artifact))
}

/// The contents of an artifact's checksum file.
fn checksum(artifact: &[u8]) -> Vec<u8> {
    hex::encode(Sha256::digest(artifact)).into_bytes()
}

/// The code in the artifact at `path` (a component's or a module's), checked against its
/// checksum file before Wasmtime sees it; `None` when there is no artifact.
fn open_artifact(
    engine: &wasmtime::Engine,
    path: &Path,
    component: bool,
) -> Result<Option<Code>, String> {
    if !path.exists() {
        return Ok(None);
    }
    verify_artifact(path)?;
    if component {
        crate::sys::deserialize_component(engine, path).map(Code::Component)
    } else {
        crate::sys::deserialize_module(engine, path).map(Code::Module)
    }
    .map(Some)
    .map_err(|e| e.to_string())
}

/// Check an artifact against its checksum file before it is trusted.
pub fn verify_artifact(path: &Path) -> Result<(), String> {
    let expected = fs::read_to_string(path.with_extension("cwasm.sha256"))
        .map_err(|e| format!("checksum file: {e}"))?;
    let bytes = fs::read(path).map_err(|e| format!("artifact: {e}"))?;
    if hex::encode(Sha256::digest(&bytes)) != expected.trim() {
        return Err("artifact checksum mismatch".into());
    }
    Ok(())
}

/// Create `path` (mode 0600) with `bytes`, fsynced. For files inside a staging directory
/// that is itself renamed into place.
fn write_file_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ctx(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .map_err(ctx(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(ctx(format!("syncing {}", path.display())))
}

/// Replace `dir/name` with `bytes` atomically and durably: temp file, fsync, rename, fsync
/// of the directory.
pub fn write_atomic(state: &StateDir, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = state.tmp_path(&state.area_of(dir), name);
    let r = write_file_synced(&tmp, bytes)
        .and_then(|()| {
            fs::rename(&tmp, dir.join(name))
                .map_err(ctx(format!("renaming into {}", dir.join(name).display())))
        })
        .and_then(|()| fsync_dir(dir));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// fsync a directory so renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ctx(format!("syncing directory {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wasmcored-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn meta(id: Uuid) -> BinaryMeta {
        BinaryMeta {
            format: META_FORMAT,
            id,
            name: Some("n".into()),
            owner: 7,
            sha256: "00".into(),
            size: 3,
            kind: ModuleKind::Process,
            config: BTreeMap::new(),
            public: false,
            loaded_at: 1,
            activation: 0,
            source: None,
            provisioned: None,
        }
    }

    #[test]
    fn artifact_round_trip_checksum_and_other_engines() {
        let root = tmpdir("artifact");
        let s = StateDir::open(&root).unwrap();
        let engine = wasmtime::Engine::default();
        let wasm = wat::parse_str("(module (func (export \"f\")))").unwrap();
        let module = wasmtime::Module::new(&engine, &wasm).unwrap();
        let artifact = module.serialize().unwrap();
        let id = Uuid::new_v4();
        s.save_binary(&meta(id), &wasm, "h0", &artifact).unwrap();
        let b = s.list_binaries(Scope::All).unwrap().pop().unwrap().unwrap();
        s.replace_artifact(&b, "h1", &artifact).unwrap();
        // The artifact of another engine is gone; this one's loads.
        assert!(!b.artifact_path("h0").exists());
        assert!(!b.dir.join("h0.cwasm.sha256").exists());
        let Some(Code::Module(m)) = open_artifact(&engine, &b.artifact_path("h1"), false).unwrap()
        else {
            panic!("the artifact is a module");
        };
        assert!(m.get_export("f").is_some());
        // (The module maps its file: written in place below, it must be gone first.)
        drop(m);
        // A torn artifact is refused by its checksum, never handed to Wasmtime.
        fs::write(b.artifact_path("h1"), &artifact[..artifact.len() / 2]).unwrap();
        let e = open_artifact(&engine, &b.artifact_path("h1"), false).unwrap_err();
        assert!(e.contains("checksum mismatch"), "{e}");
        // Saving again repairs it.
        s.replace_artifact(&b, "h1", &artifact).unwrap();
        assert!(
            open_artifact(&engine, &b.artifact_path("h1"), false)
                .unwrap()
                .is_some()
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn save_list_remove_round_trip() {
        let root = tmpdir("rt");
        let s = StateDir::open(&root).unwrap();
        let id = Uuid::new_v4();
        let stored = s.save_binary(&meta(id), b"abc", "h1", b"artifact").unwrap();
        let entry = root.join("tenants/7/binaries").join(id.to_string());
        assert_eq!(stored, stored_bytes(&entry), "in its owner's subtree");
        assert!(stored > 11, "module, artifact, checksum and metadata");
        let list = s.list_binaries(Scope::All).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(s.list_binaries(Scope::Tenant(7)).unwrap().len(), 1);
        assert!(s.list_binaries(Scope::Tenant(8)).unwrap().is_empty());
        let b = list.into_iter().next().unwrap().unwrap();
        assert_eq!(b.meta, meta(id));
        assert_eq!(s.read_meta(id), Some(meta(id)));
        assert_eq!(fs::read(b.module_path()).unwrap(), b"abc");
        verify_artifact(&b.artifact_path("h1")).unwrap();
        s.replace_artifact(&b, "h2", b"other").unwrap();
        assert!(!b.artifact_path("h1").exists());
        verify_artifact(&b.artifact_path("h2")).unwrap();
        // A torn artifact of the same engine (a crash mid-write) is replaced, not kept.
        fs::write(b.artifact_path("h2"), b"oth").unwrap();
        assert!(verify_artifact(&b.artifact_path("h2")).is_err());
        s.replace_artifact(&b, "h2", b"other").unwrap();
        verify_artifact(&b.artifact_path("h2")).unwrap();
        assert_eq!(fs::read(b.artifact_path("h2")).unwrap(), b"other");
        // A public binary is stored once, outside every tenant's subtree.
        let p = Uuid::new_v4();
        let public = BinaryMeta {
            public: true,
            ..meta(p)
        };
        s.save_binary(&public, b"abc", "h1", b"artifact").unwrap();
        assert!(root.join("public/binaries").join(p.to_string()).is_dir());
        assert_eq!(s.list_binaries(Scope::Tenant(8)).unwrap().len(), 1);
        s.remove_binary(7, false, id).unwrap();
        s.remove_binary(7, true, p).unwrap();
        assert!(s.list_binaries(Scope::All).unwrap().is_empty());
        s.remove_binary(7, false, id).unwrap();
        assert_eq!(fs::read_dir(root.join("tenants/7/tmp")).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn open_cleans_tmp_and_rejects_other_formats() {
        let root = tmpdir("open");
        let s = StateDir::open(&root).unwrap();
        s.prepare_tenant(5).unwrap();
        fs::write(root.join("tmp/leftover"), b"x").unwrap();
        fs::create_dir(root.join("tenants/5/tmp/half-entry")).unwrap();
        fs::write(root.join("public/tmp/leftover"), b"x").unwrap();
        drop(s);
        StateDir::open(&root).unwrap();
        for tmp in ["tmp", "tenants/5/tmp", "public/tmp"] {
            assert_eq!(fs::read_dir(root.join(tmp)).unwrap().count(), 0, "{tmp}");
        }
        assert!(StateDir::attach(&root, 5).is_ok());
        assert!(StateDir::attach(&root, 6).is_err(), "no subtree prepared");
        fs::write(root.join("FORMAT"), "wasm-core-state 3\n").unwrap();
        let e = StateDir::open(&root).unwrap_err();
        assert!(e.to_string().contains("formats 1 and 2"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    /// A format-1 directory: `binaries/<id>/` with meta.json, `state/<id>/<uid>.state`.
    fn format_1(root: &Path, binaries: &[(Uuid, u32, bool)], states: &[(Uuid, u32)]) {
        fs::create_dir_all(root.join("probe")).unwrap();
        fs::write(root.join("FORMAT"), FORMAT_1_LINE).unwrap();
        for (id, owner, public) in binaries {
            let dir = root.join("binaries").join(id.to_string());
            fs::create_dir_all(&dir).unwrap();
            let m = BinaryMeta {
                owner: *owner,
                public: *public,
                ..meta(*id)
            };
            fs::write(dir.join(META), serde_json::to_vec(&m).unwrap()).unwrap();
            fs::write(dir.join(MODULE), b"abc").unwrap();
        }
        for (id, uid) in states {
            let dir = root.join("state").join(id.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(format!("{uid}.state")), format!("{id}/{uid}")).unwrap();
        }
    }

    #[test]
    fn a_format_1_directory_is_moved_into_subtrees_even_after_a_crash_half_way() {
        let (a, b, p) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let binaries = [(a, 1001, false), (b, 1002, false), (p, 0, true)];
        let states = [(a, 1001), (p, 1001), (p, 1002), (b, 1002)];
        let check = |root: &Path| {
            assert_eq!(
                fs::read_to_string(root.join("FORMAT")).unwrap(),
                FORMAT_LINE
            );
            for (dir, id) in [
                ("tenants/1001/binaries", a),
                ("tenants/1002/binaries", b),
                ("public/binaries", p),
            ] {
                let m = read_entry(&root.join(dir).join(id.to_string()))
                    .unwrap()
                    .meta;
                assert_eq!(m.id, id);
            }
            for (id, uid) in states {
                let f = root
                    .join(format!("tenants/{uid}/state/{id}"))
                    .join(format!("{uid}.state"));
                assert_eq!(fs::read_to_string(&f).unwrap(), format!("{id}/{uid}"));
            }
            for gone in ["binaries", "state", "probe"] {
                assert!(!root.join(gone).exists(), "{gone}");
            }
        };
        // Whole, at start.
        let root = tmpdir("up-whole");
        format_1(&root, &binaries, &states);
        let s = StateDir::open(&root).unwrap();
        check(&root);
        assert_eq!(s.list_binaries(Scope::All).unwrap().len(), 3);
        fs::remove_dir_all(&root).unwrap();
        // Stopped after every possible number of moves, as a kill -9 would leave it: the
        // next start finishes the move and nothing is lost.
        for stop_after in 0..binaries.len() + states.len() {
            let root = tmpdir(&format!("up-crash-{stop_after}"));
            format_1(&root, &binaries, &states);
            let s = StateDir {
                root: root.clone(),
                holder: None,
                seq: AtomicU64::new(0),
            };
            fs::create_dir_all(root.join("tenants")).unwrap();
            assert_eq!(s.upconvert(stop_after).unwrap(), stop_after);
            assert_eq!(
                fs::read_to_string(root.join("FORMAT")).unwrap(),
                FORMAT_1_LINE,
                "not marked before every entry moved"
            );
            StateDir::open(&root).unwrap();
            check(&root);
            fs::remove_dir_all(&root).unwrap();
        }
    }

    #[test]
    fn bad_entries_are_reported_and_quarantined() {
        let root = tmpdir("bad");
        let s = StateDir::open(&root).unwrap();
        let bad = s
            .prepare_tenant(7)
            .unwrap()
            .join("binaries")
            .join(Uuid::new_v4().to_string());
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join(META), b"{not json").unwrap();
        let list = s.list_binaries(Scope::All).unwrap();
        let (path, why) = list.into_iter().next().unwrap().unwrap_err();
        assert!(why.contains("parsing"), "{why}");
        let q = s.quarantine(&path, &why).unwrap();
        assert!(q.exists() && !bad.exists());
        assert!(
            fs::read_to_string(reason_path(&q))
                .unwrap()
                .contains("parsing")
        );
        let id = Uuid::new_v4();
        s.save_binary(&meta(id), b"abc", "h", b"a").unwrap();
        fs::write(
            root.join("tenants/7/binaries")
                .join(id.to_string())
                .join("h.cwasm"),
            b"b",
        )
        .unwrap();
        let b = s
            .list_binaries(Scope::All)
            .unwrap()
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        assert!(
            verify_artifact(&b.artifact_path("h"))
                .unwrap_err()
                .contains("checksum")
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
