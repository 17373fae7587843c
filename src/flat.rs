//! Whole copies of file versions ("flats"), which the kernel reads itself.
//!
//! This kernel keeps a FUSE file's page cache in 4 KiB pages, and a re-read
//! through it runs well below what a local file gives (PERFORMANCE.md,
//! "re-reads"). With FUSE passthrough (Linux 6.9 and later), an open may
//! instead name a local "backing" file: the kernel then serves that
//! descriptor's reads and maps from the backing file and its page cache,
//! without asking the daemon. The chunk cache keeps chunks in packs, not
//! files, so once a version is all in the cache and its last reader has
//! closed it, a background thread writes it out as a whole copy under
//! `<cache>/flat/`; later opens of that version read the copy.
//!
//! - The copy is written from chunks this process checked against the
//!   version's manifest, after the read that fetched them: writing it
//!   while they are served took a third of a cold read's speed on a
//!   2-core machine (PERFORMANCE.md). A copy is used only once it is whole.
//! - Chunks of zeros (a sparse file's holes, [`crate::chunk::zero_chunks`])
//!   are not written: they stay holes in the copy.
//! - Copies count against the cache's limit ([`ChunkStore::set_reserved`]),
//!   at most a quarter of it; the least recently opened goes first. Files
//!   under [`FLAT_MIN`] get none: their re-reads are short anyway.
//! - Copies are derived data: those of an earlier run are dropped at start
//!   (nothing checked them since), and `deftfs cache clear` drops them. A
//!   copy dropped while open stays readable through the descriptors the
//!   kernel holds.

use crate::hash::Hash;
use crate::store::ChunkStore;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Files smaller than this get no whole copy. Tests lower it with
/// `DEFTFS_FLAT_MIN=<bytes>`, to give every file one.
pub const FLAT_MIN: u64 = 16 << 20;

/// [`FLAT_MIN`], or what `DEFTFS_FLAT_MIN` says.
fn flat_min() -> u64 {
    static V: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("DEFTFS_FLAT_MIN").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(FLAT_MIN))
}
/// A copy is written in pieces of about this size (small writes cost much
/// more CPU per byte).
const WRITE_BYTES: usize = 4 << 20;
/// Whole copies may take up to 1/SHARE of the cache's limit.
const SHARE: u64 = 4;

pub struct Flats {
    dir: PathBuf,
    store: Arc<ChunkStore>,
    state: Mutex<State>,
    next_part: AtomicU64,
}

#[derive(Default)]
struct State {
    done: HashMap<Hash, Done>,
    /// Versions whose copy a thread is writing.
    building: HashSet<Hash>,
    /// Bytes of the copies done and of those being made.
    bytes: u64,
    clock: u64,
}

impl State {
    fn wants(&self, hash: &Hash, size: u64) -> bool {
        size >= flat_min() && !self.done.contains_key(hash) && !self.building.contains(hash)
    }
}

struct Done {
    size: u64,
    /// Recency of the last open: larger is more recent.
    used: u64,
}

/// A copy being made, by one thread: dropped unfinished, it is removed.
struct Builder {
    flats: Arc<Flats>,
    hash: Hash,
    size: u64,
    file: File,
    part: PathBuf,
    done: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flats {
    /// Whole copies in `dir` (emptied: see the module's documentation),
    /// counted against `store`'s limit.
    pub fn open(dir: &Path, store: Arc<ChunkStore>) -> std::io::Result<Arc<Flats>> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        store.set_reserved(0);
        Ok(Arc::new(Flats { dir: dir.to_path_buf(), store, state: Mutex::default(), next_part: AtomicU64::new(1) }))
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_string())
    }

    /// The whole copy of version `hash`, opened for reading, if there is one.
    pub fn open_copy(&self, hash: &Hash) -> Option<File> {
        let mut st = lock(&self.state);
        st.clock += 1;
        let clock = st.clock;
        let d = st.done.get_mut(hash)?;
        d.used = clock;
        match File::open(self.path(hash)) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(%hash, "whole copy gone: {e}");
                if let Some(d) = st.done.remove(hash) {
                    st.bytes -= d.size;
                }
                None
            }
        }
    }

    /// Whether a version of `size` bytes, `hash`, would get a copy it
    /// has not got (one being made counts as got).
    pub fn wants(&self, hash: &Hash, size: u64) -> bool {
        lock(&self.state).wants(hash, size)
    }

    /// Write a whole copy of `manifest`'s version from the cache, on a
    /// thread of its own at low priority, unless [`Flats::wants`] says no
    /// or the copies' share of the cache cannot hold it. `hold` keeps its
    /// chunks meanwhile. A chunk missing from the cache gives the copy up.
    /// `ready` is called once the copy is whole, before any open can use it.
    pub fn make(self: &Arc<Self>, manifest: Arc<crate::chunk::Manifest>, hold: crate::store::Hold, ready: impl FnOnce() + Send + 'static) {
        let Some(b) = self.builder(manifest.file_hash, manifest.size) else { return };
        let store = self.store.clone();
        let spawned = std::thread::Builder::new().name("flat-copy".into()).spawn(move || {
            // SAFETY: setpriority on this thread (who = 0) touches no memory.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
            let _hold = hold;
            // Runs of zeros (a sparse file's holes) stay holes: the copy is
            // sized first, and its chunks of zeros are not written.
            let zero = crate::chunk::zero_chunks(&manifest.chunks);
            if let Err(e) = b.file.set_len(manifest.size) {
                tracing::debug!(path = %b.part.display(), "whole copy given up: {e}");
                return;
            }
            let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BYTES + (1 << 20));
            // Where `buf` goes in the copy.
            let mut at = 0;
            let write = |buf: &mut Vec<u8>, at: &mut u64| {
                b.file.write_all_at(buf, *at).inspect_err(|e| tracing::debug!(path = %b.part.display(), "whole copy given up: {e}"))?;
                *at += buf.len() as u64;
                buf.clear();
                Ok::<(), std::io::Error>(())
            };
            for (c, zero) in manifest.chunks.iter().zip(zero) {
                if zero {
                    if write(&mut buf, &mut at).is_err() {
                        return;
                    }
                    at += u64::from(c.len);
                    continue;
                }
                let Ok(Some(d)) = store.get_range(&c.hash, 0, u64::from(c.len)) else {
                    tracing::debug!(hash = %manifest.file_hash, "whole copy given up: a chunk left the cache");
                    return;
                };
                buf.extend_from_slice(&d);
                if buf.len() >= WRITE_BYTES && write(&mut buf, &mut at).is_err() {
                    return;
                }
            }
            if write(&mut buf, &mut at).is_err() {
                return;
            }
            if at == b.size {
                b.finish(ready);
            }
        });
        if let Err(e) = spawned {
            tracing::debug!("cannot start a whole copy: {e}");
        }
    }

    /// A copy of version `hash` (`size` bytes) to write, unless there is
    /// one (or one being made), the file is small, or the copies' share of
    /// the cache cannot hold it.
    fn builder(self: &Arc<Self>, hash: Hash, size: u64) -> Option<Builder> {
        let budget = self.store.limit() / SHARE;
        let (builder, bytes) = {
            let mut st = lock(&self.state);
            if !st.wants(&hash, size) || size > budget {
                return None;
            }
            while st.bytes + size > budget {
                // Only copies being made are left: no room now.
                let victim = st.done.iter().min_by_key(|(_, d)| d.used).map(|(h, _)| *h)?;
                self.drop_copy(&mut st, &victim);
            }
            let part = self.dir.join(format!("{hash}.{}.part", self.next_part.fetch_add(1, Ordering::Relaxed)));
            let file = match File::options().read(true).write(true).create_new(true).open(&part) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(path = %part.display(), "cannot start a whole copy: {e}");
                    return None;
                }
            };
            st.bytes += size;
            st.building.insert(hash);
            (Builder { flats: self.clone(), hash, size, file, part, done: false }, st.bytes)
        };
        self.store.set_reserved(bytes);
        Some(builder)
    }

    fn drop_copy(&self, st: &mut State, hash: &Hash) {
        if let Some(d) = st.done.remove(hash) {
            st.bytes -= d.size;
            if let Err(e) = std::fs::remove_file(self.path(hash)) {
                tracing::debug!(%hash, "cannot remove a whole copy: {e}");
            }
        }
    }

    /// Drop every whole copy (open descriptors keep theirs); returns the
    /// bytes freed.
    pub fn clear(&self) -> u64 {
        let (freed, bytes) = {
            let mut st = lock(&self.state);
            let before = st.bytes;
            let all: Vec<Hash> = st.done.keys().copied().collect();
            for h in all {
                self.drop_copy(&mut st, &h);
            }
            (before - st.bytes, st.bytes)
        };
        self.store.set_reserved(bytes);
        freed
    }

    /// (copies, bytes) of the whole copies ready.
    pub fn stats(&self) -> (usize, u64) {
        let st = lock(&self.state);
        (st.done.len(), st.done.values().map(|d| d.size).sum())
    }
}

impl Builder {
    /// The copy is whole: call `ready`, then put it in place for opens.
    fn finish(mut self, ready: impl FnOnce()) {
        ready();
        let path = self.flats.path(&self.hash);
        if let Err(e) = std::fs::rename(&self.part, &path) {
            tracing::debug!(path = %path.display(), "cannot finish a whole copy: {e}");
            return;
        }
        self.done = true;
        let mut st = lock(&self.flats.state);
        st.clock += 1;
        let used = st.clock;
        st.done.insert(self.hash, Done { size: self.size, used });
        tracing::debug!(hash = %self.hash, size = self.size, "whole copy made");
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        let bytes = {
            let mut st = lock(&self.flats.state);
            st.building.remove(&self.hash);
            if self.done {
                return;
            }
            st.bytes -= self.size;
            st.bytes
        };
        let _ = std::fs::remove_file(&self.part);
        self.flats.store.set_reserved(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    fn hash_of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Write `data` as the whole copy `b` stands for, and finish it.
    fn fill(b: Builder, data: &[u8]) {
        b.file.write_all_at(data, 0).unwrap();
        b.finish(|| ());
    }

    #[test]
    fn a_copy_is_used_only_once_whole_and_counts_against_the_cache() {
        let dir = TestDir::new("flat");
        let store = ChunkStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
        let flats = Flats::open(&dir.path().join("flat"), store.clone()).unwrap();
        let data: Vec<u8> = (0..FLAT_MIN as usize).map(|i| (i * 7 % 251) as u8).collect();
        let h = hash_of(&data);
        let b = flats.builder(h, data.len() as u64).expect("a builder");
        assert_eq!(store.stats().flat_bytes, FLAT_MIN);
        // One copy of a version at a time.
        assert!(flats.builder(h, data.len() as u64).is_none());
        assert!(!flats.wants(&h, data.len() as u64));
        let half = data.len() / 2;
        b.file.write_all_at(&data[..half], 0).unwrap();
        assert!(flats.open_copy(&h).is_none(), "half a copy is not used");
        b.file.write_all_at(&data[half..], half as u64).unwrap();
        b.finish(|| ());
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut flats.open_copy(&h).expect("whole"), &mut back).unwrap();
        assert!(back == data);
        assert_eq!(flats.stats(), (1, FLAT_MIN));
        assert_eq!(flats.clear(), FLAT_MIN);
        assert_eq!(store.stats().flat_bytes, 0);
        assert!(flats.open_copy(&h).is_none());
    }

    /// `data` put in `store` in chunks of 1 MiB, and its whole copy, made
    /// and checked against it.
    fn copy_of(flats: &Arc<Flats>, store: &Arc<ChunkStore>, data: &[u8]) -> (Arc<crate::chunk::Manifest>, File) {
        use crate::chunk::{ChunkRef, Manifest};
        let mut chunks = Vec::new();
        for (i, part) in data.chunks(1 << 20).enumerate() {
            let h = hash_of(part);
            store.put(&h, part.to_vec()).unwrap();
            chunks.push(ChunkRef { offset: (i as u64) << 20, len: part.len() as u32, hash: h });
        }
        let m = Arc::new(Manifest { size: data.len() as u64, file_hash: hash_of(data), chunks });
        let (tx, rx) = std::sync::mpsc::channel();
        flats.make(m.clone(), store.hold(m.chunks.iter().map(|c| c.hash)), move || tx.send(()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(20)).expect("told when made");
        let start = std::time::Instant::now();
        let copy = loop {
            if let Some(f) = flats.open_copy(&m.file_hash) {
                break f;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(20), "no copy made");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut &copy, &mut back).unwrap();
        assert!(back == data, "the copy differs from the version");
        (m, copy)
    }

    #[test]
    fn make_writes_a_version_out_of_the_cache_and_gives_up_on_a_missing_chunk() {
        let dir = TestDir::new("flat");
        let store = ChunkStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
        let flats = Flats::open(&dir.path().join("flat"), store.clone()).unwrap();
        let data: Vec<u8> = (0..FLAT_MIN as usize + 12_345).map(|i| (i * 31 % 253) as u8).collect();
        let (m, _) = copy_of(&flats, &store, &data);

        // A version one of whose chunks is not cached gets no copy.
        let mut other = (*m).clone();
        other.file_hash = hash_of(b"other");
        other.chunks[3].hash = hash_of(b"not cached");
        let other = Arc::new(other);
        flats.make(other.clone(), store.hold(other.chunks.iter().map(|c| c.hash)), || panic!("made a copy of a version not all cached"));
        let start = std::time::Instant::now();
        while !flats.wants(&other.file_hash, other.size) {
            assert!(start.elapsed() < std::time::Duration::from_secs(20), "the copy was never given up");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(flats.open_copy(&other.file_hash).is_none());
        assert_eq!(store.stats().flat_bytes, m.size, "the given-up copy still counts");
    }

    #[test]
    fn runs_of_zeros_stay_holes_in_a_copy() {
        use std::os::unix::fs::MetadataExt;
        let dir = TestDir::new("flat-holes");
        let store = ChunkStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
        let flats = Flats::open(&dir.path().join("flat"), store.clone()).unwrap();
        // 1 MiB of data, 30 MiB of zeros, 1 MiB of data.
        let mut data = vec![0u8; 32 << 20];
        data[..1 << 20].fill(7);
        data[31 << 20..].fill(9);
        let (_, copy) = copy_of(&flats, &store, &data);
        let allocated = copy.metadata().unwrap().blocks() * 512;
        assert!(allocated < 8 << 20, "the copy holds {allocated} bytes for 2 MiB of data");
    }

    #[test]
    fn an_unfinished_copy_is_removed_and_small_files_or_a_small_cache_get_none() {
        let dir = TestDir::new("flat");
        let store = ChunkStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
        let flats = Flats::open(&dir.path().join("flat"), store.clone()).unwrap();
        assert!(flats.builder(hash_of(b"small"), FLAT_MIN - 1).is_none());
        let b = flats.builder(hash_of(b"big"), FLAT_MIN).unwrap();
        b.file.write_all_at(&[1; 4096], 0).unwrap();
        drop(b);
        assert_eq!(store.stats().flat_bytes, 0);
        assert_eq!(std::fs::read_dir(dir.path().join("flat")).unwrap().count(), 0, "the part file is gone");
        store.set_limit(3 * FLAT_MIN);
        assert!(flats.builder(hash_of(b"big"), FLAT_MIN).is_none(), "over a quarter of the cache");
    }

    #[test]
    fn the_least_recently_opened_copy_makes_room() {
        let dir = TestDir::new("flat");
        let store = ChunkStore::open(&dir.path().join("cache"), 8 * FLAT_MIN).unwrap();
        let flats = Flats::open(&dir.path().join("flat"), store.clone()).unwrap();
        let data = vec![9u8; FLAT_MIN as usize];
        let (a, b, c) = (hash_of(b"a"), hash_of(b"b"), hash_of(b"c"));
        for h in [a, b] {
            fill(flats.builder(h, FLAT_MIN).unwrap(), &data);
        }
        assert!(flats.open_copy(&a).is_some());
        // The budget (2 copies) is full: b, opened last before a, goes.
        fill(flats.builder(c, FLAT_MIN).unwrap(), &data);
        assert!(flats.open_copy(&a).is_some());
        assert!(flats.open_copy(&b).is_none());
        assert!(flats.open_copy(&c).is_some());
        assert_eq!(store.stats().flat_bytes, 2 * FLAT_MIN);
    }
}
