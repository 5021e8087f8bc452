//! Plugin state behind `get_state` / `set_state`: a small trait, namespaced by
//! (owner UID, binary), with a byte quota per namespace.
//!
//! An execution reads through a [`StateTxn`] and buffers its writes there; the executor
//! commits them only when the execution succeeds, so a failed or timed-out execution leaves
//! no trace. [`MapStateStore`] keeps every namespace in memory; with a [`Persist`] it also
//! saves each committed namespace before the commit is visible (`crate::store` keeps them
//! as files under the state directory and reads them back at start).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

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
    /// Bytes held per owner UID, over all of its namespaces.
    fn usage_by_owner(&self) -> BTreeMap<u32, u64>;
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
    /// A store holding `namespaces`, persisting commits with `persist`.
    pub fn from_parts(persist: P, namespaces: HashMap<Namespace, Entries>) -> Self {
        MapStateStore {
            data: Mutex::new(
                namespaces
                    .into_iter()
                    .map(|(ns, e)| (ns, NsData::from_entries(e)))
                    .collect(),
            ),
            persist,
        }
    }

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

    fn usage_by_owner(&self) -> BTreeMap<u32, u64> {
        let mut by = BTreeMap::new();
        for (ns, d) in self.lock().iter() {
            *by.entry(ns.owner).or_insert(0) += d.bytes;
        }
        by
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
}
