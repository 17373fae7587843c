//! The chunk cache of a mount: content-addressed, verified, bounded.
//!
//! Layout under the cache directory:
//! - `chunks/xx/<hex>`: one file per chunk, named by its BLAKE3 hash (`xx`
//!   is the first byte, so no directory grows past a few thousand entries);
//! - `index.db` (SQLite): the pins, `pins(key, hash)`: what must never be
//!   evicted, by the key of what pinned it (a file of a mount).
//!
//! Invariants:
//! - a chunk file holds exactly the bytes its name hashes to: `put` refuses
//!   others, `get` checks again and deletes a file that no longer matches
//!   (a torn write before a crash, a disk error), so it is fetched anew;
//! - identical chunks of different files are one file;
//! - `used_bytes <= limit` after every `put`, except by the bytes of pinned
//!   chunks (which are never evicted) and of chunks held by open files when
//!   those alone exceed the limit;
//! - eviction order: least recently used chunks that nothing holds first;
//!   chunks of open files only when nothing else is left, oldest first
//!   (the open file then fetches them again if it reads them again);
//!   pinned chunks never.
//!
//! Recency survives a restart through the files' modification times, which
//! `get` refreshes (at most once a minute per chunk).

use crate::hash::Hash;
use rusqlite::Connection;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk cache {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("chunk cache index {path}: {source}")]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("chunk {expected}: the data hashes to {actual}; refused")]
    Mismatch { expected: Hash, actual: Hash },
}

/// How full the cache is, and how useful.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub used_bytes: u64,
    pub limit_bytes: u64,
    pub chunks: u64,
    pub pinned_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evicted_bytes: u64,
}

struct Entry {
    len: u64,
    /// Recency: a counter, larger is more recent.
    used: u64,
    /// Wall time of the file's last mtime refresh, unix seconds.
    touched: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<Hash, Entry>,
    /// (used, hash) of every entry: the LRU order.
    order: BTreeSet<(u64, Hash)>,
    pins: HashMap<String, Vec<Hash>>,
    /// How many pin keys name each hash (cached or not yet).
    pinned: HashMap<Hash, u32>,
    /// How many open handles hold each hash (cached or not yet): a chunk
    /// that arrives for an open file is held as soon as it lands.
    held: HashMap<Hash, u32>,
    clock: u64,
    used_bytes: u64,
    limit: u64,
    hits: u64,
    misses: u64,
    evicted_bytes: u64,
}

pub struct ChunkStore {
    dir: PathBuf,
    db_path: PathBuf,
    db: Mutex<Connection>,
    state: Mutex<State>,
}

/// Chunks kept from eviction while an open file may read them; released on
/// drop.
pub struct Hold {
    store: Arc<ChunkStore>,
    hashes: Vec<Hash>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut st = lock(&self.store.state);
        for h in &self.hashes {
            dec(&mut st.held, h);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn dec(counts: &mut HashMap<Hash, u32>, h: &Hash) {
    if let Some(n) = counts.get_mut(h) {
        *n -= 1;
        if *n == 0 {
            counts.remove(h);
        }
    }
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl ChunkStore {
    /// Open (or create) the cache in `dir`, bounded by `limit` bytes. What
    /// a previous run left is kept, oldest first in the eviction order.
    pub fn open(dir: &Path, limit: u64) -> Result<Arc<ChunkStore>, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(io(&chunks))?;
        let db_path = dir.join("index.db");
        let dbe = |source| StoreError::Db { path: db_path.clone(), source };
        let db = Connection::open(&db_path).map_err(dbe)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS pins (key TEXT NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (key, hash));",
        )
        .map_err(dbe)?;

        // What is on disk: (mtime, hash, len).
        let mut found = Vec::new();
        for sub in fs::read_dir(&chunks).map_err(io(&chunks))? {
            let sub = sub.map_err(io(&chunks))?;
            if !sub.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            for f in fs::read_dir(sub.path()).map_err(io(&sub.path()))? {
                let f = f.map_err(io(&sub.path()))?;
                let name = f.file_name();
                let parsed = name.to_str().filter(|n| n.len() == 64).and_then(|n| {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(n, &mut out).ok().map(|_| Hash(out))
                });
                let Some(hash) = parsed else {
                    // A temp file of an interrupted put, or a stranger: not ours to keep.
                    let _ = fs::remove_file(f.path());
                    continue;
                };
                let Ok(md) = f.metadata() else { continue };
                let mtime = md.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
                found.push((mtime, hash, md.len()));
            }
        }
        found.sort();
        let mut st = State { limit, ..Default::default() };
        for (mtime, hash, len) in found {
            let used = st.tick();
            st.entries.insert(hash, Entry { len, used, touched: mtime });
            st.order.insert((used, hash));
            st.used_bytes += len;
        }
        {
            let mut q = db.prepare("SELECT key, hash FROM pins").map_err(dbe)?;
            let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).map_err(dbe)?;
            for row in rows {
                let (key, bytes) = row.map_err(dbe)?;
                let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) else { continue };
                st.pins.entry(key).or_default().push(Hash(arr));
                *st.pinned.entry(Hash(arr)).or_default() += 1;
            }
        }
        let store = Arc::new(ChunkStore { dir: dir.to_path_buf(), db_path, db: Mutex::new(db), state: Mutex::new(st) });
        store.evict();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, hash: &Hash) -> PathBuf {
        let hex = hex::encode(hash.0);
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        lock(&self.state).entries.contains_key(hash)
    }

    /// Store a chunk after checking that `data` is what `hash` names.
    pub fn put(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        let actual = Hash::of(data);
        if actual != *hash {
            return Err(StoreError::Mismatch { expected: *hash, actual });
        }
        if self.contains(hash) {
            return Ok(());
        }
        let path = self.path_of(hash);
        let io = |source| StoreError::Io { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        // Write beside, then rename: a reader never sees a partial chunk
        // under its name. No fsync: `get` verifies, so a chunk torn by a
        // crash is only a miss.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::File::create(&tmp).and_then(|mut f| f.write_all(data)).and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        {
            let mut st = lock(&self.state);
            if !st.entries.contains_key(hash) {
                let used = st.tick();
                let len = data.len() as u64;
                st.entries.insert(*hash, Entry { len, used, touched: now_secs() });
                st.order.insert((used, *hash));
                st.used_bytes += len;
            }
        }
        self.evict();
        Ok(())
    }

    /// A chunk's bytes, verified; `None` if it is not cached (or was, but
    /// its file no longer matches its hash: then it is dropped).
    pub fn get(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let touch = {
            let mut st = lock(&self.state);
            let used = st.tick();
            match st.entries.get_mut(hash) {
                None => {
                    st.misses += 1;
                    return Ok(None);
                }
                Some(e) => {
                    let old = e.used;
                    e.used = used;
                    let now = now_secs();
                    let touch = now.saturating_sub(e.touched) >= 60;
                    if touch {
                        e.touched = now;
                    }
                    st.order.remove(&(old, *hash));
                    st.order.insert((used, *hash));
                    touch
                }
            }
        };
        let path = self.path_of(hash);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(hash);
                lock(&self.state).misses += 1;
                return Ok(None);
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        if Hash::of(&data) != *hash {
            tracing::warn!(chunk = %hash, file = %path.display(), "cached chunk is corrupt; dropped, it will be fetched again");
            let _ = fs::remove_file(&path);
            self.forget(hash);
            lock(&self.state).misses += 1;
            return Ok(None);
        }
        if touch {
            if let Ok(f) = fs::File::options().write(true).open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        lock(&self.state).hits += 1;
        Ok(Some(data))
    }

    /// Drop the index entry of a chunk whose file is gone.
    fn forget(&self, hash: &Hash) {
        let mut st = lock(&self.state);
        if let Some(e) = st.entries.remove(hash) {
            st.order.remove(&(e.used, *hash));
            st.used_bytes -= e.len;
        }
    }

    /// Keep `hashes` (those cached now) from eviction while the returned
    /// [`Hold`] lives, unless nothing else is left to evict.
    pub fn hold(self: &Arc<Self>, hashes: impl IntoIterator<Item = Hash>) -> Hold {
        let mut seen = HashSet::new();
        let hashes: Vec<Hash> = hashes.into_iter().filter(|h| seen.insert(*h)).collect();
        let mut st = lock(&self.state);
        for h in &hashes {
            *st.held.entry(*h).or_default() += 1;
        }
        drop(st);
        Hold { store: self.clone(), hashes }
    }

    /// Pin `hashes` under `key` (replacing what `key` pinned before):
    /// they are never evicted, and chunks fetched later for them stay too.
    pub fn pin(&self, key: &str, hashes: &[Hash]) -> Result<(), StoreError> {
        let dbe = |source| StoreError::Db { path: self.db_path.clone(), source };
        {
            let mut db = lock(&self.db);
            let tx = db.transaction().map_err(dbe)?;
            tx.execute("DELETE FROM pins WHERE key = ?1", [key]).map_err(dbe)?;
            {
                let mut ins = tx.prepare("INSERT OR IGNORE INTO pins (key, hash) VALUES (?1, ?2)").map_err(dbe)?;
                for h in hashes {
                    ins.execute(rusqlite::params![key, &h.0[..]]).map_err(dbe)?;
                }
            }
            tx.commit().map_err(dbe)?;
        }
        let mut st = lock(&self.state);
        let mut unique: Vec<Hash> = hashes.to_vec();
        unique.sort();
        unique.dedup();
        for h in &unique {
            *st.pinned.entry(*h).or_default() += 1;
        }
        let old = st.pins.insert(key.to_string(), unique).unwrap_or_default();
        for h in &old {
            dec(&mut st.pinned, h);
        }
        drop(st);
        self.evict();
        Ok(())
    }

    pub fn unpin(&self, key: &str) -> Result<(), StoreError> {
        let dbe = |source| StoreError::Db { path: self.db_path.clone(), source };
        lock(&self.db).execute("DELETE FROM pins WHERE key = ?1", [key]).map_err(dbe)?;
        let mut st = lock(&self.state);
        for h in st.pins.remove(key).unwrap_or_default() {
            dec(&mut st.pinned, &h);
        }
        drop(st);
        self.evict();
        Ok(())
    }

    pub fn set_limit(&self, limit: u64) {
        lock(&self.state).limit = limit;
        self.evict();
    }

    /// Evict everything that may be evicted: what no open file holds and
    /// nothing pins. Returns the bytes freed.
    pub fn clear(&self) -> u64 {
        let victims: Vec<Hash> = {
            let st = lock(&self.state);
            st.order.iter().filter(|(_, h)| !st.held.contains_key(h) && !st.pinned.contains_key(h)).map(|(_, h)| *h).collect()
        };
        self.remove(&victims)
    }

    pub fn stats(&self) -> CacheStats {
        let st = lock(&self.state);
        CacheStats {
            used_bytes: st.used_bytes,
            limit_bytes: st.limit,
            chunks: st.entries.len() as u64,
            pinned_bytes: st.pinned.keys().filter_map(|h| st.entries.get(h)).map(|e| e.len).sum(),
            hits: st.hits,
            misses: st.misses,
            evicted_bytes: st.evicted_bytes,
        }
    }

    /// How many bytes of these chunks are cached.
    pub fn bytes_present(&self, chunks: &[(Hash, u32)]) -> u64 {
        let st = lock(&self.state);
        chunks.iter().filter(|(h, _)| st.entries.contains_key(h)).map(|(_, len)| *len as u64).sum()
    }

    /// Bring the cache back under its limit.
    fn evict(&self) {
        let victims: Vec<Hash> = {
            let st = lock(&self.state);
            if st.used_bytes <= st.limit {
                return;
            }
            let mut over = st.used_bytes - st.limit;
            let mut victims = Vec::new();
            // First pass: nothing holds it; second: open files' chunks.
            for pass in 0..2 {
                for (_, h) in st.order.iter() {
                    if over == 0 {
                        break;
                    }
                    let Some(e) = st.entries.get(h) else { continue };
                    let held = st.held.contains_key(h);
                    let eligible = !st.pinned.contains_key(h) && if pass == 0 { !held } else { held };
                    if eligible {
                        victims.push(*h);
                        over = over.saturating_sub(e.len);
                    }
                }
            }
            victims
        };
        self.remove(&victims);
    }

    fn remove(&self, victims: &[Hash]) -> u64 {
        let mut freed = 0;
        for h in victims {
            let removed = {
                let mut st = lock(&self.state);
                match st.entries.remove(h) {
                    Some(e) => {
                        st.order.remove(&(e.used, *h));
                        st.used_bytes -= e.len;
                        st.evicted_bytes += e.len;
                        freed += e.len;
                        true
                    }
                    None => false,
                }
            };
            if removed {
                let _ = fs::remove_file(self.path_of(h));
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("deftfs-store-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst) ^ (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    fn chunk(i: u32, len: usize) -> (Hash, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8).collect();
        (Hash::of(&data), data)
    }

    #[test]
    fn put_refuses_data_that_does_not_match_and_get_verifies() {
        let dir = tmp();
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        let (h, d) = chunk(1, 1000);
        assert!(matches!(s.put(&h, b"other"), Err(StoreError::Mismatch { .. })));
        s.put(&h, &d).unwrap();
        assert_eq!(s.get(&h).unwrap().as_deref(), Some(&d[..]));
        // Corrupt the file behind the store's back: a miss, not bad data.
        fs::write(s.path_of(&h), b"garbage").unwrap();
        assert_eq!(s.get(&h).unwrap(), None);
        assert!(!s.contains(&h));
        let st = s.stats();
        assert_eq!((st.hits, st.misses, st.chunks), (1, 1, 0));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn eviction_is_lru_keeps_pins_and_prefers_unheld_chunks() {
        let dir = tmp();
        let s = ChunkStore::open(&dir, 4000).unwrap();
        let c: Vec<_> = (0..6).map(|i| chunk(i, 1000)).collect();
        s.pin("f", &[c[0].0]).unwrap();
        for (h, d) in &c[..4] {
            s.put(h, d).unwrap();
        }
        let _hold = s.hold([c[1].0]);
        s.get(&c[2].0).unwrap(); // 3 is now the least recently used unheld one
        s.put(&c[4].0, &c[4].1).unwrap();
        assert!(s.contains(&c[0].0) && s.contains(&c[1].0) && s.contains(&c[2].0));
        assert!(!s.contains(&c[3].0));
        s.put(&c[5].0, &c[5].1).unwrap();
        assert!(!s.contains(&c[2].0), "oldest unheld goes next");
        assert!(s.stats().used_bytes <= 4000);
        // Only the pinned and the held chunk are left past that: the held
        // one goes before the limit is exceeded, the pinned one never.
        s.set_limit(1000);
        assert!(s.contains(&c[0].0), "pinned survives");
        assert!(!s.contains(&c[1].0));
        assert_eq!(s.stats().used_bytes, 1000);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn contents_and_pins_survive_a_reopen_and_clear_spares_pins() {
        let dir = tmp();
        let (a, b) = (chunk(1, 500), chunk(2, 700));
        {
            let s = ChunkStore::open(&dir, 1 << 20).unwrap();
            s.put(&a.0, &a.1).unwrap();
            s.put(&b.0, &b.1).unwrap();
            s.pin("k", &[a.0]).unwrap();
        }
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        let st = s.stats();
        assert_eq!((st.chunks, st.used_bytes, st.pinned_bytes), (2, 1200, 500));
        assert_eq!(s.clear(), 700);
        assert!(s.contains(&a.0) && !s.contains(&b.0));
        s.unpin("k").unwrap();
        assert_eq!(s.clear(), 500);
        fs::remove_dir_all(dir).unwrap();
    }
}
