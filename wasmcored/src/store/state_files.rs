//! Plugin state on disk: one checksummed file per namespace,
//! `STATE/tenants/<holder>/state/<binary>/<uid>.state` (the holder: the tenant whose worker
//! ran the executions), written atomically before a commit is visible and read back at
//! start into a [`MapStateStore`].

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{StateDir, write_atomic};
use crate::state::{Entries, MapStateStore, Namespace, Persist};

/// Plugin state files under the state directory.
#[derive(Debug)]
pub struct FilePersist {
    dir: Arc<StateDir>,
}

const STATE_MAGIC: &[u8; 8] = b"WCSTATE1";

impl Persist for FilePersist {
    fn save(&self, ns: &Namespace, entries: &HashMap<Vec<u8>, Vec<u8>>) -> io::Result<()> {
        let holder = self.dir.state_holder(ns.owner);
        let dir = self.dir.state_dir_of(holder, ns.binary);
        if !dir.exists() {
            self.dir.prepare_tenant(holder)?;
            std::fs::create_dir_all(&dir)?;
            super::fsync_dir(dir.parent().unwrap_or(&dir))?;
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
    /// Open the plugin state this process keeps (a worker: its subtree's), keeping only
    /// namespaces of `binaries`. The state of a binary that is no longer stored (unloaded
    /// while this worker did not run) is removed with it; files that cannot be read are
    /// quarantined (logged, never fatal).
    pub fn open(dir: Arc<StateDir>, binaries: &[Uuid]) -> io::Result<Self> {
        let mut data = HashMap::new();
        for (holder, root) in dir.state_roots()? {
            let entries = match std::fs::read_dir(&root) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
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
                    dir.remove_state(holder, binary)?;
                    continue;
                }
                for f in std::fs::read_dir(&path)? {
                    let file = f?.path();
                    match read_state_file(&file) {
                        Ok((owner, entries)) => {
                            data.insert(Namespace { owner, binary }, entries);
                        }
                        Err(e) => quarantine(&dir, &file, &e),
                    }
                }
            }
        }
        Ok(MapStateStore::from_parts(FilePersist { dir }, data))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateStore;

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
        let kept = dir.state_dir_of(5, id);
        assert!(kept.join("5.state").exists(), "in the tenant's own subtree");
        std::fs::write(kept.join("6.state"), b"garbage").unwrap();
        let store = MapStateStore::open(dir.clone(), &[id]).unwrap();
        assert_eq!(store.get(&n, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            std::fs::read_dir(root.join("quarantine")).unwrap().count(),
            2,
            "file + reason"
        );
        // A worker keeps every namespace its executions wrote (an admin's too) in its own
        // subtree, and reads nothing of another's.
        let five = Arc::new(StateDir::attach(&root, 5).unwrap());
        let admin = Namespace {
            owner: 0,
            binary: id,
        };
        let mine = MapStateStore::open(five.clone(), &[id]).unwrap();
        assert_eq!(mine.get(&n, b"a").as_deref(), Some(&b"1"[..]));
        mine.commit(&admin, vec![(b"b".to_vec(), Some(b"2".to_vec()))], 100)
            .unwrap();
        assert!(kept.join("0.state").exists());
        dir.prepare_tenant(7).unwrap();
        let seven = Arc::new(StateDir::attach(&root, 7).unwrap());
        let theirs = MapStateStore::open(seven, &[]).unwrap();
        assert_eq!(theirs.total_usage(), 0);
        assert!(kept.join("0.state").exists(), "left in place");
        // State of a binary that is gone (unloaded while the worker was down) goes with it.
        let store = MapStateStore::open(five, &[]).unwrap();
        assert_eq!(store.total_usage(), 0);
        assert!(!kept.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
