//! Plugin state behind `get_state` / `set_state`: a small trait, namespaced by
//! (owner UID, binary), with a byte quota per namespace.
//!
//! An execution reads through a [`StateTxn`] and buffers its writes there; the executor
//! commits them only when the execution succeeds, so a failed or timed-out execution leaves
//! no trace.

use std::collections::{BTreeMap, HashMap};
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

/// Storage for plugin state.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The value under `key`.
    fn get(&self, ns: &Namespace, key: &[u8]) -> Option<Vec<u8>>;
    /// Bytes (keys + values) held by `ns`.
    fn usage(&self, ns: &Namespace) -> u64;
    /// Apply `writes` atomically, refusing them all if the namespace would exceed `quota`.
    fn commit(&self, ns: &Namespace, writes: Vec<Write>, quota: u64) -> Result<(), String>;
    /// Drop the state of every owner for `binary` (it was unloaded).
    fn remove_binary(&self, binary: Uuid);
}

#[derive(Debug, Default)]
struct NsData {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    bytes: u64,
}

/// In-memory [`StateStore`]. One mutex: state calls are rare next to executions, and a
/// commit must see a consistent namespace to check the quota.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    data: Mutex<HashMap<Namespace, NsData>>,
}

impl StateStore for MemoryStateStore {
    fn get(&self, ns: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        data.get(ns)?.entries.get(key).cloned()
    }

    fn usage(&self, ns: &Namespace) -> u64 {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        data.get(ns).map_or(0, |d| d.bytes)
    }

    fn commit(&self, ns: &Namespace, writes: Vec<Write>, quota: u64) -> Result<(), String> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let d = data.entry(*ns).or_default();
        let mut bytes = d.bytes as i64;
        for (k, v) in &writes {
            if let Some(old) = d.entries.get(k) {
                bytes -= (k.len() + old.len()) as i64;
            }
            if let Some(v) = v {
                bytes += (k.len() + v.len()) as i64;
            }
        }
        if bytes as u64 > quota {
            return Err(format!("state would use {bytes} bytes, quota is {quota}"));
        }
        for (k, v) in writes {
            match v {
                Some(v) => {
                    d.entries.insert(k, v);
                }
                None => {
                    d.entries.remove(&k);
                }
            }
        }
        d.bytes = bytes as u64;
        Ok(())
    }

    fn remove_binary(&self, binary: Uuid) {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        data.retain(|ns, _| ns.binary != binary);
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

    /// Apply the buffered writes.
    pub fn commit(self) -> Result<(), String> {
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
        store.remove_binary(Uuid::nil());
        assert_eq!(store.usage(&ns()), 0);
    }
}
