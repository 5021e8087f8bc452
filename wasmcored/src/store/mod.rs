//! Persistence under the state directory: binaries (metadata, original bytes, precompiled
//! artifacts) and the files behind plugin state.
//!
//! Layout (format 1, documented in wasmcored(8) and docs/PERSISTENCE.md):
//!
//! ```text
//! STATE/FORMAT                          "wasm-core-state 1"
//! STATE/binaries/<uuid>/meta.json       metadata (versioned JSON)
//! STATE/binaries/<uuid>/module.wasm     the original bytes
//! STATE/binaries/<uuid>/<hash>.cwasm    precompiled for the engine whose compatibility hash is <hash>
//! STATE/binaries/<uuid>/<hash>.cwasm.sha256
//! STATE/state/<uuid>/<uid>.state        plugin state of tenant <uid> for binary <uuid>
//! STATE/tmp/                            entries being written or removed; emptied at start
//! STATE/quarantine/                     entries that could not be read, with the reason
//! ```
//!
//! Every write is: temp file, fsync, rename, fsync of the directory. A binary's entry is
//! built complete in `tmp/` and renamed into `binaries/` in one step, so after a crash an
//! entry is either all there or not there. Removal renames the entry back into `tmp/` first.

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
use crate::tenant::Scope;

mod state_files;
pub use state_files::FilePersist;

/// The on-disk format this daemon writes and reads.
pub const FORMAT: u32 = 1;
const FORMAT_LINE: &str = "wasm-core-state 1\n";
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
    /// Makes temp names unique within this process.
    seq: AtomicU64,
}

fn ctx(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl StateDir {
    /// Open (creating if needed) the state directory, check the format and that it is
    /// writable, and empty `tmp/`.
    pub fn open(root: &Path) -> io::Result<StateDir> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(root)
            .map_err(ctx(format!("creating state directory {}", root.display())))?;
        for sub in ["binaries", "state", "tmp", "quarantine"] {
            b.create(root.join(sub))
                .map_err(ctx(format!("creating {}", root.join(sub).display())))?;
        }
        let dir = StateDir {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
        };
        let format = root.join("FORMAT");
        match fs::read_to_string(&format) {
            Ok(s) if s == FORMAT_LINE => {}
            Ok(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} says {:?}; this wasmcored reads format {FORMAT} only (was the state written by a newer version?)",
                        format.display(),
                        s.trim()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&dir, root, "FORMAT", FORMAT_LINE.as_bytes())?;
            }
            Err(e) => return Err(ctx(format!("reading {}", format.display()))(e)),
        }
        // Proves the directory is writable now rather than at the first load.
        write_atomic(&dir, root, ".writable", b"")?;
        fs::remove_file(root.join(".writable")).map_err(ctx("removing the write probe"))?;
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(ctx(format!("reading {}", tmp.display())))? {
            let p = entry?.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(ctx(format!("removing stale {}", p.display())))?;
        }
        Ok(dir)
    }

    /// Use a state directory that the broker opened (and cleaned) at start, from a worker:
    /// only its format is checked; `tmp/` is shared with the other workers and left alone
    /// (temp names carry the process id).
    pub fn attach(root: &Path) -> io::Result<StateDir> {
        let format = root.join("FORMAT");
        match fs::read_to_string(&format) {
            Ok(s) if s == FORMAT_LINE => Ok(StateDir {
                root: root.to_path_buf(),
                seq: AtomicU64::new(0),
            }),
            Ok(s) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} says {:?}", format.display(), s.trim()),
            )),
            Err(e) => Err(ctx(format!("reading {}", format.display()))(e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata of stored binary `id`; `None` when it is not stored (or unreadable).
    pub fn read_meta(&self, id: Uuid) -> Option<BinaryMeta> {
        read_entry(&self.binary_dir(id)).ok().map(|b| b.meta)
    }

    fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Relaxed);
        self.root
            .join("tmp")
            .join(format!("{tag}.{}.{n}", std::process::id()))
    }

    fn binary_dir(&self, id: Uuid) -> PathBuf {
        self.root.join("binaries").join(id.to_string())
    }

    /// Store a binary durably: metadata, original bytes and artifact. Returns the bytes its
    /// entry takes (as [`StateDir::stored_bytes`] counts them).
    pub fn save_binary(
        &self,
        meta: &BinaryMeta,
        wasm: &[u8],
        engine_hash: &str,
        artifact: &[u8],
    ) -> io::Result<u64> {
        let staging = self.tmp_path(&meta.id.to_string());
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
            let dest = self.binary_dir(meta.id);
            fs::rename(&staging, &dest)
                .map_err(ctx(format!("moving {} into place", dest.display())))?;
            fsync_dir(&self.root.join("binaries"))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result.map(|()| self.stored_bytes(meta.id))
    }

    /// Replace the metadata of a stored binary (its configuration changed), atomically.
    pub fn update_meta(&self, meta: &BinaryMeta) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let dir = self.binary_dir(meta.id);
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

    /// Remove a binary and its plugin state durably. Absent: nothing to do.
    pub fn remove_binary(&self, id: Uuid) -> io::Result<()> {
        for (dir, parent) in [
            (self.binary_dir(id), "binaries"),
            (self.root.join("state").join(id.to_string()), "state"),
        ] {
            let doomed = self.tmp_path("removed");
            match fs::rename(&dir, &doomed) {
                Ok(()) => {
                    fsync_dir(&self.root.join(parent))?;
                    let _ = fs::remove_dir_all(&doomed);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ctx(format!("removing {}", dir.display()))(e)),
            }
        }
        Ok(())
    }

    /// Every stored binary, or why an entry could not be read.
    pub fn list_binaries(&self) -> io::Result<Vec<Result<StoredBinary, (PathBuf, String)>>> {
        let dir = self.root.join("binaries");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(ctx(format!("reading {}", dir.display())))? {
            let path = entry?.path();
            out.push(read_entry(&path).map_err(|e| (path, e)));
        }
        Ok(out)
    }

    /// Move an unreadable entry aside (never deleted: an admin may want it) and say why.
    pub fn quarantine(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dest = self
            .root
            .join("quarantine")
            .join(format!("{name}.{stamp}.{}", self.seq.fetch_add(1, Relaxed)));
        fs::rename(path, &dest).map_err(ctx(format!("quarantining {}", path.display())))?;
        let _ = fs::write(reason_path(&dest), reason);
        fsync_dir(&self.root.join("quarantine"))?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        Ok(dest)
    }

    /// The directory holding plugin state files of `binary`.
    pub fn state_dir_of(&self, binary: Uuid) -> PathBuf {
        self.root.join("state").join(binary.to_string())
    }

    /// Bytes under `binaries/<id>/`.
    pub fn stored_bytes(&self, id: Uuid) -> u64 {
        fs::read_dir(self.binary_dir(id))
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
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
            format: FORMAT,
            id: bin.id,
            name: bin.name.clone(),
            owner: bin.owner,
            sha256: bin.sha256.clone(),
            size: bin.size,
            kind: bin.kind,
            public: bin.public,
            loaded_at: bin.loaded_at,
            config: (**bin.config.load()).clone(),
        }
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
        }
    }
}

/// The ids of the readable binary entries in `scope` (before restoring them).
pub fn stored_ids(dir: &StateDir, scope: Scope) -> io::Result<Vec<Uuid>> {
    Ok(dir
        .list_binaries()?
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
    for entry in dir.list_binaries()? {
        match entry {
            Ok(stored) => scan.binaries.push(stored.meta),
            Err((path, why)) => {
                scan.quarantined += 1;
                quarantine_logged(dir, &path, &why, None);
            }
        }
    }
    let state = dir.root.join("state");
    for entry in fs::read_dir(&state).map_err(ctx(format!("reading {}", state.display())))? {
        let path = entry?.path();
        let binary = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| Uuid::parse_str(n).ok());
        let why = match binary {
            None => "not a binary's state directory",
            Some(id) if !scan.binaries.iter().any(|m| m.id == id) => {
                "state of a binary that is not stored"
            }
            Some(_) => continue,
        };
        quarantine_logged(dir, &path, why, None);
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
/// worker loaded, configured or unloaded one: register the new ones, forget the removed
/// ones, take changed configurations. Returns how many changed.
pub fn sync_public(dir: &StateDir, registry: &crate::registry::Registry) -> io::Result<usize> {
    let hash = registry.engine().compat_hash();
    let stored: Vec<StoredBinary> = dir
        .list_binaries()?
        .into_iter()
        .filter_map(Result::ok)
        .filter(|b| b.meta.public)
        .collect();
    let mut changed = 0;
    for bin in registry.all() {
        if !bin.public {
            continue;
        }
        match stored.iter().find(|s| s.meta.id == bin.id) {
            None => {
                registry.forget(bin.id);
                changed += 1;
            }
            Some(s) if **bin.config.load() != s.meta.config => {
                bin.config.store(std::sync::Arc::new(s.meta.config.clone()));
                changed += 1;
            }
            Some(_) => {}
        }
    }
    for s in &stored {
        if registry.get(s.meta.id).is_none() {
            match restore_one(dir, registry, s, &hash) {
                Ok(_) => changed += 1,
                Err(why) => log::warn!("public binary {} could not be read: {why}", s.meta.id),
            }
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
    for entry in dir.list_binaries()? {
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
    let module = match from_artifact {
        Some(m) => m,
        None => {
            let bytes =
                fs::read(stored.module_path()).map_err(|e| format!("reading {MODULE}: {e}"))?;
            if hex::encode(Sha256::digest(&bytes)) != stored.meta.sha256 {
                return Err(format!("{MODULE} does not match the SHA-256 in {META}"));
            }
            let m = if Code::is_component(&bytes) {
                wasmtime::component::Component::from_binary(engine, &bytes).map(Code::Component)
            } else {
                wasmtime::Module::from_binary(engine, &bytes).map(Code::Module)
            }
            .map_err(|e| format!("compiling {MODULE}: {e:#}"))?;
            match m.serialize() {
                Ok(a) => {
                    if let Err(e) = dir.replace_artifact(stored, hash, &a) {
                        log::warn!(
                            "binary {}: could not store the new artifact: {e}",
                            stored.meta.id
                        );
                    }
                }
                Err(e) => log::warn!("binary {}: could not serialize: {e}", stored.meta.id),
            }
            m
        }
    };
    let compiled = registry
        .prepare(module, stored.meta.sha256.clone(), stored.meta.size)
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
    bin.stored_bytes
        .store(dir.stored_bytes(stored.meta.id), Relaxed);
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
    if meta.format != FORMAT {
        return Err(format!(
            "{META} has format {}, expected {FORMAT}",
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
    let tmp = state.tmp_path(name);
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
            format: FORMAT,
            id,
            name: Some("n".into()),
            owner: 7,
            sha256: "00".into(),
            size: 3,
            kind: ModuleKind::Process,
            config: BTreeMap::new(),
            public: false,
            loaded_at: 1,
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
        let b = s.list_binaries().unwrap().pop().unwrap().unwrap();
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
        assert_eq!(stored, s.stored_bytes(id));
        assert!(stored > 11, "module, artifact, checksum and metadata");
        let list = s.list_binaries().unwrap();
        assert_eq!(list.len(), 1);
        let b = list.into_iter().next().unwrap().unwrap();
        assert_eq!(b.meta, meta(id));
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
        s.remove_binary(id).unwrap();
        assert!(s.list_binaries().unwrap().is_empty());
        s.remove_binary(id).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn open_cleans_tmp_and_rejects_other_formats() {
        let root = tmpdir("open");
        let s = StateDir::open(&root).unwrap();
        fs::write(root.join("tmp/leftover"), b"x").unwrap();
        fs::create_dir(root.join("tmp/half-entry")).unwrap();
        drop(s);
        StateDir::open(&root).unwrap();
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        fs::write(root.join("FORMAT"), "wasm-core-state 2\n").unwrap();
        let e = StateDir::open(&root).unwrap_err();
        assert!(e.to_string().contains("format 1"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_entries_are_reported_and_quarantined() {
        let root = tmpdir("bad");
        let s = StateDir::open(&root).unwrap();
        let bad = root.join("binaries").join(Uuid::new_v4().to_string());
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join(META), b"{not json").unwrap();
        let list = s.list_binaries().unwrap();
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
            root.join("binaries").join(id.to_string()).join("h.cwasm"),
            b"b",
        )
        .unwrap();
        let b = s
            .list_binaries()
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
