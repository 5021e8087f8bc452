//! Plugin state behind `get_state` / `set_state`: a small trait, namespaced by
//! (owner UID, binary), with a byte quota per namespace.
//!
//! An execution reads through a [`StateTxn`] and buffers its writes there; the executor
//! commits them only when the execution succeeds, so a failed or timed-out execution leaves
//! no trace. [`MapStateStore`] keeps every namespace in memory; with a [`FilePersist`] it
//! also writes each committed namespace to one checksummed file under the state directory
//! (atomically, before the commit is visible), and reads them back at start.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::{StateDir, write_atomic};

/// Whose state: the owner of the data and the binary it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub owner: u32,
    pub binary: Uuid,
}

/// A write: `None` deletes the key.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// Why a commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The namespace would pass its quota.
    #[error("{0}")]
    Quota(String),
    /// Writing the state to disk failed.
    #[error("storing plugin state: {0}")]
    Io(String),
}

/// Storage for plugin state.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The value under `key`.
    fn get(&self, ns: &Namespace, key: &[u8]) -> Option<Vec<u8>>;
    /// Bytes (keys + values) held by `ns`.
    fn usage(&self, ns: &Namespace) -> u64;
    /// Bytes held by every namespace together.
    fn total_usage(&self) -> u64;
    /// Apply `writes` atomically, refusing them all if the namespace would exceed `quota`.
    fn commit(&self, ns: &Namespace, writes: Vec<Write>, quota: u64) -> Result<(), CommitError>;
    /// Drop the state of every owner for `binary` (it was unloaded).
    fn remove_binary(&self, binary: Uuid);
    /// Whether `commit` does blocking I/O (then the executor runs it off the async workers).
    fn blocks(&self) -> bool {
        false
    }
}

/// The keys and values of one namespace.
pub type Entries = HashMap<Vec<u8>, Vec<u8>>;

/// Where committed namespaces go besides memory.
pub trait Persist: Send + Sync + std::fmt::Debug {
    fn save(&self, ns: &Namespace, entries: &HashMap<Vec<u8>, Vec<u8>>) -> io::Result<()>;
}

/// Memory only.
#[derive(Debug, Default)]
pub struct NoPersist;

impl Persist for NoPersist {
    fn save(&self, _ns: &Namespace, _entries: &HashMap<Vec<u8>, Vec<u8>>) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct NsData {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    bytes: u64,
}

impl NsData {
    fn from_entries(entries: HashMap<Vec<u8>, Vec<u8>>) -> Self {
        let bytes = entries
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        NsData { entries, bytes }
    }
}

/// Plugin state in memory, optionally persisted. One mutex: a commit must see a consistent
/// namespace to check the quota, and state calls are rare next to executions.
#[derive(Debug, Default)]
pub struct MapStateStore<P: Persist = NoPersist> {
    data: Mutex<HashMap<Namespace, NsData>>,
    persist: P,
}

/// The in-memory store (tests, benchmarks).
pub type MemoryStateStore = MapStateStore<NoPersist>;

impl<P: Persist> MapStateStore<P> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Namespace, NsData>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<P: Persist> StateStore for MapStateStore<P> {
    fn get(&self, ns: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().get(ns)?.entries.get(key).cloned()
    }

    fn usage(&self, ns: &Namespace) -> u64 {
        self.lock().get(ns).map_or(0, |d| d.bytes)
    }

    fn total_usage(&self) -> u64 {
        self.lock().values().map(|d| d.bytes).sum()
    }

    fn commit(&self, ns: &Namespace, writes: Vec<Write>, quota: u64) -> Result<(), CommitError> {
        let mut data = self.lock();
        let mut next = data.get(ns).cloned().unwrap_or_default();
        for (k, v) in writes {
            if let Some(old) = next.entries.remove(&k) {
                next.bytes -= (k.len() + old.len()) as u64;
            }
            if let Some(v) = v {
                next.bytes += (k.len() + v.len()) as u64;
                next.entries.insert(k, v);
            }
        }
        if next.bytes > quota {
            return Err(CommitError::Quota(format!(
                "state would use {} bytes, quota is {quota}",
                next.bytes
            )));
        }
        // Durable before visible: a crash after this point finds the new state on disk.
        self.persist
            .save(ns, &next.entries)
            .map_err(|e| CommitError::Io(e.to_string()))?;
        data.insert(*ns, next);
        Ok(())
    }

    fn remove_binary(&self, binary: Uuid) {
        self.lock().retain(|ns, _| ns.binary != binary);
    }

    fn blocks(&self) -> bool {
        std::mem::size_of::<P>() != 0
    }
}

/// Plugin state files under the state directory: `state/<binary>/<uid>.state`.
#[derive(Debug)]
pub struct FilePersist {
    dir: Arc<StateDir>,
}

const STATE_MAGIC: &[u8; 8] = b"WCSTATE1";

impl Persist for FilePersist {
    fn save(&self, ns: &Namespace, entries: &HashMap<Vec<u8>, Vec<u8>>) -> io::Result<()> {
        let dir = self.dir.state_dir_of(ns.binary);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            crate::store::fsync_dir(dir.parent().unwrap_or(&dir))?;
        }
        write_atomic(
            &self.dir,
            &dir,
            &format!("{}.state", ns.owner),
            &encode_state(entries),
        )
    }
}

impl MapStateStore<FilePersist> {
    /// Open the plugin state under `dir`, keeping only namespaces of `binaries`; files that
    /// cannot be read are quarantined (logged, never fatal).
    pub fn open(dir: Arc<StateDir>, binaries: &[Uuid]) -> io::Result<Self> {
        let root = dir.root().join("state");
        let mut data = HashMap::new();
        for entry in std::fs::read_dir(&root)? {
            let path = entry?.path();
            let Some(binary) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| Uuid::parse_str(n).ok())
            else {
                quarantine(&dir, &path, "not a binary's state directory");
                continue;
            };
            if !binaries.contains(&binary) {
                quarantine(&dir, &path, "state of a binary that is not registered");
                continue;
            }
            for f in std::fs::read_dir(&path)? {
                let file = f?.path();
                match read_state_file(&file) {
                    Ok((owner, entries)) => {
                        data.insert(Namespace { owner, binary }, NsData::from_entries(entries));
                    }
                    Err(e) => quarantine(&dir, &file, &e),
                }
            }
        }
        Ok(MapStateStore {
            data: Mutex::new(data),
            persist: FilePersist { dir },
        })
    }
}

fn quarantine(dir: &StateDir, path: &Path, why: &str) {
    match dir.quarantine(path, why) {
        Ok(dest) => log::warn!(
            "quarantined {} ({why}) to {}",
            path.display(),
            dest.display()
        ),
        Err(e) => log::error!("could not quarantine {} ({why}): {e}", path.display()),
    }
}

fn read_state_file(path: &Path) -> Result<(u32, Entries), String> {
    let owner = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".state"))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or("not a state file name")?;
    let bytes = std::fs::read(path).map_err(|e| format!("reading: {e}"))?;
    Ok((owner, decode_state(&bytes)?))
}

/// `WCSTATE1`, u32 count, then per entry u32 key length, key, u32 value length, value;
/// then the SHA-256 of everything before it. Integers little-endian.
fn encode_state(entries: &HashMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort();
    let mut out = Vec::with_capacity(
        64 + entries
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
    for (k, v) in sorted {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn decode_state(bytes: &[u8]) -> Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    if bytes.len() < STATE_MAGIC.len() + 4 + 32 || &bytes[..8] != STATE_MAGIC {
        return Err("not a wasm-core state file".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch".into());
    }
    let mut rest = &body[8..];
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = u32_at(take(4)?);
    let mut entries = HashMap::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let klen = u32_at(take(4)?);
        let k = take(klen)?.to_vec();
        let vlen = u32_at(take(4)?);
        let v = take(vlen)?.to_vec();
        entries.insert(k, v);
    }
    Ok(entries)
}

/// The state view of one execution: reads fall through to the store, writes stay here
/// until [`StateTxn::commit`].
#[derive(Debug)]
pub struct StateTxn {
    store: Arc<dyn StateStore>,
    ns: Namespace,
    quota: u64,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes the namespace would hold if committed now (known once first needed).
    projected: Option<i64>,
}

impl StateTxn {
    pub fn new(store: Arc<dyn StateStore>, ns: Namespace, quota: u64) -> Self {
        StateTxn {
            store,
            ns,
            quota,
            pending: BTreeMap::new(),
            projected: None,
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.pending.get(key) {
            Some(v) => v.clone(),
            None => self.store.get(&self.ns, key),
        }
    }

    fn old_len(&self, key: &[u8]) -> i64 {
        self.get(key).map_or(0, |v| (key.len() + v.len()) as i64)
    }

    /// Buffer a write (`None` deletes), refusing it if the namespace would pass its quota.
    pub fn set(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let base = match self.projected {
            Some(p) => p,
            None => self.store.usage(&self.ns) as i64,
        };
        let new = base - self.old_len(key) + value.map_or(0, |v| (key.len() + v.len()) as i64);
        if new as u64 > self.quota {
            return Err(format!(
                "setting a {}-byte value would bring this binary's state to {new} bytes; the quota is {}",
                value.map_or(0, <[u8]>::len),
                self.quota
            ));
        }
        self.projected = Some(new);
        self.pending.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    /// Whether there is anything to commit.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether committing does blocking I/O.
    pub fn blocks(&self) -> bool {
        self.store.blocks()
    }

    /// Apply the buffered writes.
    pub fn commit(self) -> Result<(), CommitError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.store
            .commit(&self.ns, self.pending.into_iter().collect(), self.quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace {
            owner: 1,
            binary: Uuid::nil(),
        }
    }

    #[test]
    fn writes_are_invisible_until_commit_and_dropped_without_it() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let mut t = StateTxn::new(store.clone(), ns(), 100);
        t.set(b"k", Some(b"v")).unwrap();
        assert_eq!(t.get(b"k").as_deref(), Some(&b"v"[..]));
        assert_eq!(store.get(&ns(), b"k"), None);
        drop(t);
        assert_eq!(store.get(&ns(), b"k"), None);
        let mut t = StateTxn::new(store.clone(), ns(), 100);
        t.set(b"k", Some(b"v")).unwrap();
        t.commit().unwrap();
        assert_eq!(store.get(&ns(), b"k").as_deref(), Some(&b"v"[..]));
        assert_eq!(store.usage(&ns()), 2);
    }

    #[test]
    fn quota_counts_keys_and_values_and_replacements() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let mut t = StateTxn::new(store.clone(), ns(), 10);
        t.set(b"ab", Some(b"12345678")).unwrap(); // 10 bytes: at quota
        assert!(t.set(b"c", Some(b"")).is_err());
        t.set(b"ab", Some(b"1")).unwrap(); // replaced: 3 bytes
        t.set(b"c", Some(b"123456")).unwrap(); // 10
        t.set(b"ab", None).unwrap(); // 7
        t.commit().unwrap();
        assert_eq!(store.usage(&ns()), 7);
        assert_eq!(store.total_usage(), 7);
        store.remove_binary(Uuid::nil());
        assert_eq!(store.usage(&ns()), 0);
    }

    #[test]
    fn state_files_round_trip_and_detect_damage() {
        let mut m = HashMap::new();
        m.insert(b"k".to_vec(), vec![0u8, 255, 7]);
        m.insert(Vec::new(), Vec::new());
        let bytes = encode_state(&m);
        assert_eq!(decode_state(&bytes).unwrap(), m);
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(decode_state(&bad).unwrap_err().contains("checksum"));
        assert!(decode_state(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_state(b"short").is_err());
    }

    #[test]
    fn persisted_state_survives_a_reopen_and_bad_files_are_quarantined() {
        let root = std::env::temp_dir().join(format!("wasmcored-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = Arc::new(StateDir::open(&root).unwrap());
        let id = Uuid::new_v4();
        let n = Namespace {
            owner: 5,
            binary: id,
        };
        let store = MapStateStore::open(dir.clone(), &[id]).unwrap();
        assert!(store.blocks());
        store
            .commit(&n, vec![(b"a".to_vec(), Some(b"1".to_vec()))], 100)
            .unwrap();
        drop(store);
        std::fs::write(dir.state_dir_of(id).join("6.state"), b"garbage").unwrap();
        let store = MapStateStore::open(dir.clone(), &[id]).unwrap();
        assert_eq!(store.get(&n, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            std::fs::read_dir(root.join("quarantine")).unwrap().count(),
            2,
            "file + reason"
        );
        // State of a binary that is gone is moved aside, not loaded.
        let store = MapStateStore::open(dir, &[]).unwrap();
        assert_eq!(store.total_usage(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
