//! The chunk cache of a mount: content-addressed, verified, bounded.
//!
//! Layout under the cache directory:
//! - `packs/<id>.pack`: the chunks, appended one after another to pack
//!   files of about [`PACK_BYTES`] each (a few at a time). A record starts on a 4 KiB
//!   boundary: a [`HEADER`]-byte header (magic, length, last use, BLAKE3
//!   hash), then the chunk's bytes, then zeros up to the next boundary.
//!   Evicting a chunk punches its record out of the pack (the blocks go
//!   back to the filesystem); a pack with nothing left in it is deleted.
//!   One file per chunk, the layout before this one, made every fetched
//!   chunk an inode allocation, which on some filesystems (ext4 without a
//!   journal, after many deletions) cost more than the network did;
//! - `index.db` (SQLite): the pins, `pins(key, hash)`: what must never be
//!   evicted, by the key of what pinned it (a file of a mount).
//!
//! Invariants:
//! - a chunk is served only if its bytes hash to its name: `put` refuses
//!   others, `get` checks again what it reads from disk and drops a record
//!   that no longer matches (a torn write before a crash, a disk error), so
//!   it is fetched anew;
//! - identical chunks of different files are one record;
//! - `used_bytes` (the records' footprint on disk) `<= limit` after every
//!   `put`, except by the bytes of pinned chunks (which are never evicted)
//!   and of chunks held by open files when those alone exceed the limit;
//! - eviction order: least recently used chunks that nothing holds first;
//!   chunks of open files only when nothing else is left, oldest first
//!   (the open file then fetches them again if it reads them again);
//!   pinned chunks never.
//!
//! Recency survives a restart through each record's last-use time, which
//! `get` refreshes in place (at most once a minute per chunk). The chunks
//! stored last are also kept in memory ([`RECENT_BYTES`]), so a read that
//! follows the fetch of its chunk neither reads it back nor hashes it again.

use crate::direct::{DirectWrites, Landing};
use crate::hash::Hash;
use rusqlite::Connection;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// A pack file is closed for appends once it reaches this size.
pub const PACK_BYTES: u64 = 64 << 20;
/// Bytes of a record's header.
pub const HEADER: u64 = 64;
/// Records start on multiples of this, so an evicted one frees whole blocks.
const ALIGN: u64 = 4096;
const MAGIC: &[u8; 4] = b"DFTC";
const VERSION: u8 = 1;
/// No chunk is larger (the protocol's bound is 16 MiB); a header claiming
/// more is not a header.
const MAX_LEN: u64 = 64 << 20;
/// Packs appended to at once (see `put`).
const APPEND_SLOTS: usize = 4;
/// Chunks kept in memory after `put`.
pub const RECENT_BYTES: u64 = 16 << 20;

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
    /// Bytes of whole-file copies kept beside the chunks (see
    /// `crate::flat`), counted against the same limit.
    #[serde(default)]
    pub flat_bytes: u64,
}

/// Where a record is, and what it costs.
#[derive(Clone, Copy)]
struct Entry {
    pack: u32,
    /// The record's start in its pack (its header).
    offset: u64,
    /// The chunk's length.
    len: u64,
    /// The record's footprint: header, chunk and padding.
    size: u64,
    /// Recency: a counter, larger is more recent.
    used: u64,
    /// Wall time of the record's last recorded use, unix seconds.
    touched: u64,
    /// This process checked the record's bytes against the hash: it wrote
    /// them after checking them (`put`), or read them back whole (`get`).
    /// Parts of such a record are read without hashing it again
    /// ([`ChunkStore::get_range`]). Records found on disk at start are not.
    verified: bool,
}

/// A pack being appended to, and where its next record goes.
#[derive(Clone, Copy)]
struct Slot {
    pack: u32,
    end: u64,
}

struct Pack {
    file: Arc<File>,
    /// Direct writes to a pack being appended to ([`crate::direct`]): the
    /// records bypass the page cache, where fresh pages are what a cold
    /// read spent most on (copying into them: 31% of mountd's samples).
    /// Plain for the packs found at mount, which are only read.
    direct: Arc<DirectWrites>,
    path: PathBuf,
    /// Records in it still indexed.
    live: u64,
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
    packs: HashMap<u32, Pack>,
    /// The packs appended to (none until the first put into a slot), and
    /// the id the next new pack takes.
    slots: [Option<Slot>; APPEND_SLOTS],
    next_id: u32,
    /// The chunks put last, newest at the back, and their total bytes.
    recent: VecDeque<(Hash, Arc<Vec<u8>>)>,
    recent_bytes: u64,
    clock: u64,
    used_bytes: u64,
    limit: u64,
    /// Bytes the limit also covers outside the packs (whole-file copies).
    reserved: u64,
    hits: u64,
    misses: u64,
    evicted_bytes: u64,
}

pub struct ChunkStore {
    dir: PathBuf,
    packs_dir: PathBuf,
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

/// Write one record (its header, then its data) at `offset`: where the pack
/// takes direct writes, laid out in an aligned buffer, padded to its
/// footprint and written direct; else plainly, without the copy.
fn write_record(file: &File, direct: &DirectWrites, offset: u64, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    if !direct.is_direct() {
        return file.write_all_at(head, offset).and_then(|()| file.write_all_at(data, offset + HEADER));
    }
    let size = footprint(data.len() as u64) as usize;
    // A pooled buffer, not one kept per thread: the blocking pool has many
    // threads, and a buffer each would hold a chunk's size per thread.
    let mut rec = Landing::new(offset, size);
    let (h, rest) = rec.bytes_mut().split_at_mut(HEADER as usize);
    h.copy_from_slice(head);
    rest[..data.len()].copy_from_slice(data);
    rest[data.len()..].fill(0);
    direct.write_at(file, rec.bytes(), offset).map(|_| ())
}

/// A record's footprint for a chunk of `len` bytes.
fn footprint(len: u64) -> u64 {
    (HEADER + len).div_ceil(ALIGN) * ALIGN
}

fn header(hash: &Hash, len: u64, used_secs: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h[16..24].copy_from_slice(&used_secs.to_le_bytes());
    h[24..56].copy_from_slice(&hash.0);
    h
}

/// The (hash, len, last use) a header records, if it is one.
fn parse_header(h: &[u8; HEADER as usize]) -> Option<(Hash, u64, u64)> {
    if &h[..4] != MAGIC || h[4] != VERSION {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
    let len = word(8);
    if len > MAX_LEN {
        return None;
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&h[24..56]);
    Some((Hash(hash), len, word(16)))
}

/// Give the blocks of `[offset, offset + len)` back to the filesystem; where
/// it cannot punch holes, zero the header so the record is not found again.
fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor we own, with plain integer
    // arguments; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    };
    if rc != 0 {
        let _ = file.write_all_at(&[0u8; HEADER as usize], offset);
    }
}

/// The next offset at or after `from` that holds data (skipping punched
/// holes), `None` past the end. Without SEEK_DATA support, `from` itself.
fn next_data(file: &File, from: u64) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at >= 0 {
        return Some(at as u64);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(from),
    }
}

/// The pack id of a file name `<8 hex digits>.pack`.
fn pack_id(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".pack")?;
    if stem.len() != 8 {
        return None;
    }
    u32::from_str_radix(stem, 16).ok()
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Mark `hash`'s record as used now: (the record, whether its last-use
    /// stamp on disk is due for a rewrite, which is then counted as done).
    fn use_entry(&mut self, hash: &Hash) -> Option<(Entry, bool)> {
        let used = self.tick();
        let e = self.entries.get_mut(hash)?;
        let old = e.used;
        e.used = used;
        let now = now_secs();
        let touch = now.saturating_sub(e.touched) >= 60;
        if touch {
            e.touched = now;
        }
        let e = *e;
        self.order.remove(&(old, *hash));
        self.order.insert((used, *hash));
        Some((e, touch))
    }

    fn insert(&mut self, hash: Hash, e: Entry) {
        self.entries.insert(hash, e);
        self.order.insert((e.used, hash));
        self.used_bytes += e.size;
        if let Some(p) = self.packs.get_mut(&e.pack) {
            p.live += 1;
        }
    }

    /// Unindex `hash`; returns the record to punch and, when its pack is
    /// left empty (and is not the one appended to), the pack to delete.
    fn take(&mut self, hash: &Hash) -> Option<(Entry, Arc<File>, Option<PathBuf>)> {
        let e = self.entries.remove(hash)?;
        self.order.remove(&(e.used, *hash));
        self.used_bytes -= e.size;
        if let Some(i) = self.recent.iter().position(|(h, _)| h == hash) {
            if let Some((_, d)) = self.recent.remove(i) {
                self.recent_bytes -= d.len() as u64;
            }
        }
        let p = self.packs.get_mut(&e.pack)?;
        p.live -= 1;
        let file = p.file.clone();
        let appending = self.slots.iter().flatten().any(|s| s.pack == e.pack);
        let empty = p.live == 0 && !appending;
        let gone = if empty { self.packs.remove(&e.pack).map(|p| p.path) } else { None };
        Some((e, file, gone))
    }

    fn remember(&mut self, hash: Hash, data: Arc<Vec<u8>>) {
        self.recent_bytes += data.len() as u64;
        self.recent.push_back((hash, data));
        while self.recent_bytes > RECENT_BYTES {
            let Some((_, d)) = self.recent.pop_front() else { break };
            self.recent_bytes -= d.len() as u64;
        }
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
        // The layout before packs, one file per chunk: only a cache, so it
        // is dropped rather than converted.
        let old = dir.join("chunks");
        if old.is_dir() {
            tracing::info!(dir = %old.display(), "removing a chunk cache of the older layout; its chunks will be fetched again");
            fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        let packs_dir = dir.join("packs");
        fs::create_dir_all(&packs_dir).map_err(io(&packs_dir))?;
        let db_path = dir.join("index.db");
        let dbe = |source| StoreError::Db { path: db_path.clone(), source };
        let db = Connection::open(&db_path).map_err(dbe)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS pins (key TEXT NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (key, hash));",
        )
        .map_err(dbe)?;

        let mut st = State { limit, ..Default::default() };
        // What is on disk: (last use, pack, offset, hash, len).
        let mut found = Vec::new();
        for f in fs::read_dir(&packs_dir).map_err(io(&packs_dir))? {
            let f = f.map_err(io(&packs_dir))?;
            let path = f.path();
            let Some(id) = f.file_name().to_str().and_then(pack_id) else {
                // Not ours to keep.
                let _ = fs::remove_file(&path);
                continue;
            };
            let file = File::options().read(true).write(true).open(&path).map_err(io(&path))?;
            let size = file.metadata().map_err(io(&path))?.len();
            scan_pack(&file, size, |offset, hash, len, used| found.push((used, id, offset, hash, len)));
            st.next_id = st.next_id.max(id.wrapping_add(1));
            st.packs.insert(id, Pack { file: Arc::new(file), direct: Arc::new(DirectWrites::plain()), path, live: 0 });
        }
        found.sort();
        for (touched, pack, offset, hash, len) in found {
            if st.entries.contains_key(&hash) {
                // A second record of one chunk (two puts raced): drop it.
                if let Some(p) = st.packs.get(&pack) {
                    punch(&p.file, offset, footprint(len));
                }
                continue;
            }
            let used = st.tick();
            st.insert(hash, Entry { pack, offset, len, size: footprint(len), used, touched, verified: false });
        }
        let empty: Vec<u32> = st.packs.iter().filter(|(_, p)| p.live == 0).map(|(id, _)| *id).collect();
        for id in empty {
            if let Some(p) = st.packs.remove(&id) {
                let _ = fs::remove_file(&p.path);
            }
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
        let store = Arc::new(ChunkStore { dir: dir.to_path_buf(), packs_dir, db_path, db: Mutex::new(db), state: Mutex::new(st) });
        store.evict();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        lock(&self.state).entries.contains_key(hash)
    }

    /// Store a chunk after checking that `data` is what `hash` names.
    pub fn put(&self, hash: &Hash, data: Vec<u8>) -> Result<(), StoreError> {
        let actual = Hash::of(&data);
        if actual != *hash {
            return Err(StoreError::Mismatch { expected: *hash, actual });
        }
        let len = data.len() as u64;
        let size = footprint(len);
        let (pack, offset, file, direct) = {
            let mut st = lock(&self.state);
            if st.entries.contains_key(hash) {
                return Ok(());
            }
            // Chunks go to one of a few packs by their first byte: a
            // buffered write holds the file's lock, so puts on several
            // threads would otherwise queue on one file.
            let slot = usize::from(hash.0[0]) % APPEND_SLOTS;
            let (pack, offset) = match st.slots[slot] {
                Some(s) if s.end == 0 || s.end + size <= PACK_BYTES => (s.pack, s.end),
                _ => (self.new_pack(&mut st, slot)?, 0),
            };
            st.slots[slot] = Some(Slot { pack, end: offset + size });
            let Some((file, direct)) = st.packs.get(&pack).map(|p| (p.file.clone(), p.direct.clone())) else {
                return Err(StoreError::Io { path: self.pack_path(pack), source: std::io::Error::other("pack not open") });
            };
            (pack, offset, file, direct)
        };
        // Written outside the lock. No fsync: `get` verifies, so a record
        // torn by a crash is only a miss.
        let written = write_record(&file, &direct, offset, &header(hash, len, now_secs()), &data);
        if let Err(source) = written {
            punch(&file, offset, size);
            return Err(StoreError::Io { path: self.pack_path(pack), source });
        }
        let mut st = lock(&self.state);
        if st.entries.contains_key(hash) {
            // Another put of the same chunk came first.
            drop(st);
            punch(&file, offset, size);
            return Ok(());
        }
        let used = st.tick();
        st.insert(*hash, Entry { pack, offset, len, size, used, touched: now_secs(), verified: true });
        st.remember(*hash, Arc::new(data));
        drop(st);
        self.evict();
        Ok(())
    }

    fn pack_path(&self, id: u32) -> PathBuf {
        self.packs_dir.join(format!("{id:08x}.pack"))
    }

    /// Start a new pack to append to in `slot`; the one before it goes if
    /// nothing in it is left.
    fn new_pack(&self, st: &mut State, slot: usize) -> Result<u32, StoreError> {
        let id = st.next_id;
        let path = self.pack_path(id);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        st.next_id = id.wrapping_add(1);
        if let Some(old) = st.slots[slot].replace(Slot { pack: id, end: 0 }) {
            if st.packs.get(&old.pack).is_some_and(|p| p.live == 0) {
                if let Some(p) = st.packs.remove(&old.pack) {
                    let _ = fs::remove_file(&p.path);
                }
            }
        }
        let direct = Arc::new(DirectWrites::open(&path));
        st.packs.insert(id, Pack { file: Arc::new(file), direct, path, live: 0 });
        Ok(id)
    }

    /// A chunk's bytes, verified; `None` if it is not cached (or was, but
    /// its record no longer matches its hash: then it is dropped).
    pub fn get(&self, hash: &Hash) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        let (e, file, touch) = {
            let mut st = lock(&self.state);
            let Some((e, touch)) = st.use_entry(hash) else {
                st.misses += 1;
                return Ok(None);
            };
            if let Some(d) = st.recent.iter().rev().find(|(h, _)| h == hash).map(|(_, d)| d.clone()) {
                st.hits += 1;
                return Ok(Some(d));
            }
            (e, st.packs.get(&e.pack).map(|p| p.file.clone()), touch)
        };
        let mut data = vec![0u8; e.len as usize];
        let read = match &file {
            Some(f) => f.read_exact_at(&mut data, e.offset + HEADER),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        let good = match read {
            Ok(()) => Hash::of(&data) == *hash,
            Err(err) if matches!(err.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound) => false,
            Err(source) => return Err(StoreError::Io { path: self.pack_path(e.pack), source }),
        };
        if !good {
            // Evicted while it was read (its blocks punched), or damaged.
            let same = lock(&self.state).entries.get(hash).is_some_and(|x| x.pack == e.pack && x.offset == e.offset);
            if same {
                tracing::warn!(chunk = %hash, pack = %self.pack_path(e.pack).display(), "cached chunk is corrupt; dropped, it will be fetched again");
                self.drop_records(&[*hash]);
            }
            lock(&self.state).misses += 1;
            return Ok(None);
        }
        if let (true, Some(f)) = (touch, &file) {
            let _ = f.write_all_at(&now_secs().to_le_bytes(), e.offset + 16);
        }
        let mut st = lock(&self.state);
        st.hits += 1;
        if let Some(x) = st.entries.get_mut(hash).filter(|x| x.pack == e.pack && x.offset == e.offset) {
            x.verified = true;
        }
        Ok(Some(Arc::new(data)))
    }

    /// Bytes `from..to` of a chunk (`None` if it is not cached, or `to` is
    /// past its end). A record this process has checked against its hash
    /// ([`Entry::verified`]) is read in part and not hashed again: a re-read
    /// that finds a few pages missing from the kernel's page cache asks for
    /// each one alone, and reading and hashing its whole chunk each time
    /// cost more than the rest of the re-read. Any other record is read
    /// whole and checked, as [`ChunkStore::get`] does.
    pub fn get_range(&self, hash: &Hash, from: u64, to: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let whole = |s: &Self| s.get(hash).map(|d| d.and_then(|d| d.get(from as usize..to as usize).map(<[u8]>::to_vec)));
        let (e, file, touch) = {
            let mut st = lock(&self.state);
            match st.entries.get(hash) {
                Some(e) if e.verified && from <= to && to <= e.len => {}
                _ => {
                    drop(st);
                    return whole(self);
                }
            }
            let Some((e, touch)) = st.use_entry(hash) else { return Ok(None) };
            if let Some(d) = st.recent.iter().rev().find(|(h, _)| h == hash).map(|(_, d)| d.clone()) {
                st.hits += 1;
                return Ok(d.get(from as usize..to as usize).map(<[u8]>::to_vec));
            }
            let Some(file) = st.packs.get(&e.pack).map(|p| p.file.clone()) else {
                drop(st);
                return whole(self);
            };
            (e, file, touch)
        };
        let mut data = vec![0u8; (to - from) as usize];
        match file.read_exact_at(&mut data, e.offset + HEADER + from) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return whole(self),
            Err(source) => return Err(StoreError::Io { path: self.pack_path(e.pack), source }),
        }
        if touch {
            let _ = file.write_all_at(&now_secs().to_le_bytes(), e.offset + 16);
        }
        let mut st = lock(&self.state);
        // An evicted record is dropped from the table before its blocks
        // are punched: still listed now, it was whole while it was read.
        if !st.entries.get(hash).is_some_and(|x| x.pack == e.pack && x.offset == e.offset) {
            drop(st);
            return whole(self);
        }
        st.hits += 1;
        Ok(Some(data))
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

    pub fn limit(&self) -> u64 {
        lock(&self.state).limit
    }

    /// Count `bytes` kept outside the packs against the limit, and evict
    /// chunks to make room for them.
    pub fn set_reserved(&self, bytes: u64) {
        lock(&self.state).reserved = bytes;
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
            pinned_bytes: st.pinned.keys().filter_map(|h| st.entries.get(h)).map(|e| e.size).sum(),
            hits: st.hits,
            misses: st.misses,
            evicted_bytes: st.evicted_bytes,
            flat_bytes: st.reserved,
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
            let used = st.used_bytes + st.reserved;
            if used <= st.limit {
                return;
            }
            let mut over = used - st.limit;
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
                        over = over.saturating_sub(e.size);
                    }
                }
            }
            victims
        };
        self.remove(&victims);
    }

    /// Evict `victims`; returns the bytes freed.
    fn remove(&self, victims: &[Hash]) -> u64 {
        let freed = self.drop_records(victims);
        lock(&self.state).evicted_bytes += freed;
        freed
    }

    /// Unindex `hashes` and give their records' blocks back.
    fn drop_records(&self, hashes: &[Hash]) -> u64 {
        let mut freed = 0;
        for h in hashes {
            let Some((e, file, gone)) = lock(&self.state).take(h) else { continue };
            freed += e.size;
            match gone {
                Some(path) => {
                    let _ = fs::remove_file(path);
                }
                None => punch(&file, e.offset, e.size),
            }
        }
        freed
    }
}

/// Call `found(offset, hash, len, last_use)` for every record of a pack of
/// `size` bytes. What is not a record (a hole, a torn header) is skipped
/// a block at a time; a torn record's bytes fail `get`'s check later.
fn scan_pack(file: &File, size: u64, mut found: impl FnMut(u64, Hash, u64, u64)) {
    let mut pos = 0;
    while pos + HEADER <= size {
        let Some(at) = next_data(file, pos) else { break };
        let at = (at / ALIGN * ALIGN).max(pos);
        if at + HEADER > size {
            break;
        }
        let mut h = [0u8; HEADER as usize];
        if file.read_exact_at(&mut h, at).is_err() {
            break;
        }
        match parse_header(&h) {
            Some((hash, len, used)) if at + HEADER + len <= size => {
                found(at, hash, len, used);
                pos = at + footprint(len);
            }
            _ => pos = at + ALIGN,
        }
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

    fn only_pack(dir: &Path) -> PathBuf {
        let packs: Vec<PathBuf> = fs::read_dir(dir.join("packs")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(packs.len(), 1, "{packs:?}");
        packs[0].clone()
    }

    /// Blocks allocated to the cache's packs.
    fn allocated(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::read_dir(dir.join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()
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
        assert!(matches!(s.put(&h, b"other".to_vec()), Err(StoreError::Mismatch { .. })));
        s.put(&h, d.clone()).unwrap();
        assert_eq!(s.get(&h).unwrap().as_deref(), Some(&d));
        // Corrupt the record behind the store's back (after a reopen, so
        // the copy in memory is gone): a miss, not bad data.
        drop(s);
        let pack = only_pack(&dir);
        let f = fs::File::options().write(true).open(&pack).unwrap();
        f.write_all_at(b"garbage", HEADER + 10).unwrap();
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        assert!(s.contains(&h));
        assert_eq!(s.get(&h).unwrap(), None);
        assert!(!s.contains(&h));
        let st = s.stats();
        assert_eq!((st.hits, st.misses, st.chunks, st.used_bytes), (0, 1, 0, 0));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn get_range_reads_parts_and_checks_records_this_process_did_not() {
        let dir = tmp();
        let (h, d) = chunk(3, 10_000);
        // Unlike `chunk`'s, whose bytes one of another `chunk` repeats.
        let e: Vec<u8> = (0..10_000u32).map(|j| (j * 7 % 251) as u8).collect();
        let g = Hash::of(&e);
        {
            let s = ChunkStore::open(&dir, 1 << 20).unwrap();
            s.put(&h, d.clone()).unwrap();
            s.put(&g, e.clone()).unwrap();
            assert_eq!(s.get_range(&h, 100, 5000).unwrap().as_deref(), Some(&d[100..5000]));
        }
        // Found on disk at start: checked whole on the first part asked
        // for, then read in part.
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        for (from, to) in [(0, 4096), (4096, 8192), (9000, 10_000), (0, 10_000), (7, 7)] {
            assert_eq!(s.get_range(&h, from, to).unwrap().as_deref(), Some(&d[from as usize..to as usize]), "{from}..{to}");
        }
        assert_eq!(s.get_range(&h, 9000, 10_001).unwrap(), None, "past the end");
        // A record damaged before this process checked it is a miss.
        drop(s);
        let (pack, at) = fs::read_dir(dir.join("packs"))
            .unwrap()
            .map(|p| p.unwrap().path())
            .find_map(|p| fs::read(&p).unwrap().windows(64).position(|w| w == &e[..64]).map(|at| (p, at as u64)))
            .unwrap();
        fs::File::options().write(true).open(&pack).unwrap().write_all_at(b"garbage", at + 5000).unwrap();
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.get_range(&g, 0, 4096).unwrap(), None);
        assert!(!s.contains(&g));
        assert_eq!(s.get_range(&h, 0, 4096).unwrap().as_deref(), Some(&d[..4096]));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn eviction_is_lru_keeps_pins_and_prefers_unheld_chunks() {
        let dir = tmp();
        // Each chunk's record takes one block.
        let s = ChunkStore::open(&dir, 4 * ALIGN).unwrap();
        let c: Vec<_> = (0..6).map(|i| chunk(i, 1000)).collect();
        s.pin("f", &[c[0].0]).unwrap();
        for (h, d) in &c[..4] {
            s.put(h, d.clone()).unwrap();
        }
        let _hold = s.hold([c[1].0]);
        s.get(&c[2].0).unwrap(); // 3 is now the least recently used unheld one
        s.put(&c[4].0, c[4].1.clone()).unwrap();
        assert!(s.contains(&c[0].0) && s.contains(&c[1].0) && s.contains(&c[2].0));
        assert!(!s.contains(&c[3].0));
        s.put(&c[5].0, c[5].1.clone()).unwrap();
        assert!(!s.contains(&c[2].0), "oldest unheld goes next");
        assert!(s.stats().used_bytes <= 4 * ALIGN);
        // Only the pinned and the held chunk are left past that: the held
        // one goes before the limit is exceeded, the pinned one never.
        s.set_limit(ALIGN);
        assert!(s.contains(&c[0].0), "pinned survives");
        assert!(!s.contains(&c[1].0));
        assert_eq!(s.stats().used_bytes, ALIGN);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn contents_and_pins_survive_a_reopen_and_clear_spares_pins() {
        let dir = tmp();
        let (a, b) = (chunk(1, 500), chunk(2, 700));
        {
            let s = ChunkStore::open(&dir, 1 << 20).unwrap();
            s.put(&a.0, a.1.clone()).unwrap();
            s.put(&b.0, b.1.clone()).unwrap();
            s.pin("k", &[a.0]).unwrap();
        }
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        let st = s.stats();
        assert_eq!((st.chunks, st.used_bytes, st.pinned_bytes), (2, 2 * ALIGN, ALIGN));
        assert_eq!(s.clear(), ALIGN);
        assert!(s.contains(&a.0) && !s.contains(&b.0));
        s.unpin("k").unwrap();
        assert_eq!(s.clear(), ALIGN);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn evicted_records_give_their_blocks_back_and_empty_packs_go() {
        let dir = tmp();
        let big = 256 << 10;
        let s = ChunkStore::open(&dir, 4 * footprint(big)).unwrap();
        let c: Vec<_> = (0..12).map(|i| chunk(i, big as usize)).collect();
        for (h, d) in &c {
            s.put(h, d.clone()).unwrap();
        }
        assert_eq!(s.stats().chunks, 4);
        assert!(allocated(&dir) <= 4 * footprint(big) + ALIGN, "{} bytes allocated", allocated(&dir));
        for (h, d) in &c[8..] {
            assert_eq!(s.get(h).unwrap().as_deref(), Some(d));
        }
        assert_eq!(s.clear(), 4 * footprint(big));
        assert_eq!(allocated(&dir), 0);
        drop(s);
        // Reopened: nothing indexed, and the pack with nothing in it is gone.
        let s = ChunkStore::open(&dir, 1 << 30).unwrap();
        assert_eq!(s.stats().chunks, 0);
        assert_eq!(fs::read_dir(dir.join("packs")).unwrap().count(), 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reopen_finds_records_across_packs_and_holes_and_skips_a_torn_tail() {
        let dir = tmp();
        let len = 3 << 20;
        let c: Vec<_> = (0..30).map(|i| chunk(i, len)).collect();
        {
            let s = ChunkStore::open(&dir, 1 << 40).unwrap();
            for (h, d) in &c {
                s.put(h, d.clone()).unwrap();
            }
            // Over 64 MiB: more than one pack.
            assert!(fs::read_dir(dir.join("packs")).unwrap().count() >= 2);
            // A hole in the middle of a pack.
            s.remove(&[c[3].0, c[4].0]);
        }
        // A crash mid-append: a header and part of its chunk.
        let last = fs::read_dir(dir.join("packs")).unwrap().map(|e| e.unwrap().path()).max().unwrap();
        let f = fs::File::options().write(true).open(&last).unwrap();
        let end = f.metadata().unwrap().len().div_ceil(ALIGN) * ALIGN;
        let (th, td) = chunk(99, 1 << 20);
        f.write_all_at(&header(&th, td.len() as u64, 0), end).unwrap();
        f.write_all_at(&td[..1000], end + HEADER).unwrap();
        drop(f);
        let s = ChunkStore::open(&dir, 1 << 40).unwrap();
        assert_eq!(s.stats().chunks, 28);
        for (i, (h, d)) in c.iter().enumerate() {
            let got = s.get(h).unwrap();
            if i == 3 || i == 4 {
                assert_eq!(got, None);
            } else {
                assert_eq!(got.as_deref(), Some(d), "chunk {i}");
            }
        }
        assert!(!s.contains(&th), "a torn record was indexed");
        // Nothing points past what was written: new puts land after it.
        s.put(&c[3].0, c[3].1.clone()).unwrap();
        assert_eq!(s.get(&c[3].0).unwrap().as_deref(), Some(&c[3].1));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_older_one_file_per_chunk_layout_is_dropped() {
        let dir = tmp();
        fs::create_dir_all(dir.join("chunks/ab")).unwrap();
        fs::write(dir.join("chunks/ab").join("ab".repeat(32)), b"x").unwrap();
        let s = ChunkStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.stats().chunks, 0);
        assert!(!dir.join("chunks").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
