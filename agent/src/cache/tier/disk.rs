//! The disk tier of one policy: one file per URI under the policy's folder, named by a
//! stable hash of the key, behind an in-memory index bounded by bytes (LRU, the existing
//! [`evict`](crate::cache::evict) policies) so a memory miss that the index does not know
//! costs no disk access at all.
//!
//! Hand-written over files rather than foyer (a large hybrid-cache framework with its own
//! I/O engine, far more than one folder of objects needs) or cacache (content-addressed,
//! with integrity hashing of every read and no size bound or eviction). Writes go to a
//! temporary file renamed into place, so a reader or a crash never sees half a file; the
//! index is rebuilt from the folder when the agent starts, so the tier survives restarts.

use super::codec;
use crate::cache::entry::{Entry, Key, KeyRef};
use crate::cache::evict::{AnyEvictor, EvictionPolicy, Evictor};
use bytes::Bytes;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};

/// Stable 64-bit FNV-1a of a key, the file name (std's hasher may change between Rust
/// releases, and the files outlive the binary). Collisions are caught by the key stored in
/// the file.
pub(crate) fn key_id(key: &KeyRef<'_>) -> u64 {
    fnv1a(
        key.host()
            .bytes()
            .chain(std::iter::once(0xff))
            .chain(key.path_and_query().bytes()),
    )
}

/// 64-bit FNV-1a.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One policy's disk tier.
pub(crate) struct DiskTier {
    dir: PathBuf,
    /// Makes temporary file names unique: two workers may write one key at once.
    tmp_seq: std::sync::atomic::AtomicU64,
    /// File id → key (for purges by host or prefix); weighted by file size.
    index: Mutex<AnyEvictor<u64, Key>>,
}

impl DiskTier {
    /// Opens (creating) `dir` and indexes the files already there. Files that do not decode
    /// are found out on first read and removed then.
    pub(crate) fn open(dir: PathBuf, max_size: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut index = AnyEvictor::new(EvictionPolicy::Lru, max_size);
        let mut garbage = Vec::new();
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name();
            let Some(id) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                // A temporary file of a write cut short.
                let _ = std::fs::remove_file(item.path());
                continue;
            };
            let Ok(meta) = item.metadata() else { continue };
            // Only the key is read now (for purges by host or prefix); a file that does
            // not even have one is not ours any more.
            match read_key(&item.path()) {
                Some(key) => {
                    let _ = index.insert(id, key, meta.len(), &mut garbage);
                }
                None => {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        let tier = Self {
            dir,
            tmp_seq: std::sync::atomic::AtomicU64::new(0),
            index: Mutex::new(index),
        };
        tier.delete(garbage.into_iter().map(|(id, _)| id));
        Ok(tier)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}"))
    }
}

/// The key at the start of a tier file.
fn read_key(path: &Path) -> Option<Key> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 8];
    f.read_exact(&mut head).ok()?;
    let (host_len, pq_len) = codec::key_lengths(&head)?;
    let mut key = vec![0u8; host_len + pq_len];
    f.read_exact(&mut key).ok()?;
    let (host, pq) = key.split_at(host_len);
    let (host, pq) = (
        std::str::from_utf8(host).ok()?,
        std::str::from_utf8(pq).ok()?,
    );
    Some(KeyRef::new(host, pq)?.to_key())
}

impl DiskTier {
    /// Whether the index holds `key` (no disk access).
    pub(crate) fn contains(&self, key: &KeyRef<'_>) -> bool {
        self.index.lock().peek(&key_id(key)).is_some()
    }

    /// Reads `key`'s entry (blocking file I/O: call it from a blocking thread).
    pub(crate) fn read(&self, key: &KeyRef<'_>) -> Option<Entry> {
        let id = key_id(key);
        self.index.lock().get(&id)?;
        let bytes = match std::fs::read(self.path(id)) {
            Ok(b) => b,
            Err(_) => {
                self.index.lock().remove(&id);
                return None;
            }
        };
        match codec::decode(key, Bytes::from(bytes)) {
            Some(e) => Some(e),
            None => {
                // Foreign, truncated or another key's: drop it.
                if self.index.lock().remove(&id).is_some() {
                    let _ = std::fs::remove_file(self.path(id));
                }
                None
            }
        }
    }

    /// Writes `entry` for `key` (blocking file I/O) and evicts what no longer fits.
    pub(crate) fn write(&self, key: &Key, entry: &Entry) -> std::io::Result<()> {
        let id = key_id(&key.as_key_ref());
        let bytes = codec::encode(key, entry);
        let seq = self
            .tmp_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!("{id:016x}.{seq}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, self.path(id))?;
        let mut garbage = Vec::new();
        let refused = self
            .index
            .lock()
            .insert(id, key.clone(), bytes.len() as u64, &mut garbage)
            .is_err();
        if refused {
            garbage.push((id, key.clone()));
        }
        self.delete(garbage.into_iter().map(|(id, _)| id));
        Ok(())
    }

    /// Removes `key` (index now, file with it).
    pub(crate) fn remove(&self, key: &KeyRef<'_>) -> bool {
        let id = key_id(key);
        let removed = self.index.lock().remove(&id).is_some();
        if removed {
            let _ = std::fs::remove_file(self.path(id));
        }
        removed
    }

    /// Removes every file whose key fails `keep`.
    pub(crate) fn retain(&self, keep: &mut dyn FnMut(&Key) -> bool) -> u64 {
        let mut garbage = Vec::new();
        let n = self.index.lock().retain(|_, k| keep(k), &mut garbage);
        self.delete(garbage.into_iter().map(|(id, _)| id));
        n as u64
    }

    fn delete(&self, ids: impl Iterator<Item = u64>) {
        for id in ids {
            let _ = std::fs::remove_file(self.path(id));
        }
    }

    /// Bytes and files held.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let ix = self.index.lock();
        (ix.weight(), ix.len() as u64)
    }

    /// The folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}
