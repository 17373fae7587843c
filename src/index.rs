//! Cached manifests of real files, in SQLite: a file is re-chunked only when
//! its size, mtime (ns), inode or chunk params changed.
//!
//! Design: [`manifest_for`] opens the file, stats the open handle, and looks
//! the path up in `file_index` under the connection's mutex. On a miss it
//! releases the mutex, chunks the same handle ([`crate::chunk`]), stats it
//! again, and stores the result under the mutex. Hashing a large file takes
//! seconds; no other index user waits for it.
//!
//! Invariants:
//! - a cached manifest is returned only if size, mtime_ns, inode and the
//!   params key all equal the file's current ones, and the stored bytes
//!   decode and validate against the params' `max`; any other row is
//!   recomputed and overwritten, never an error;
//! - a manifest is stored only if the file's size, mtime and ctime were the
//!   same before and after hashing, and its size equals the bytes hashed; a file
//!   still changing after [`MAX_TRIES`] attempts is an
//!   [`IndexError::KeepsChanging`];
//! - a write that keeps both size and mtime (a rewrite within the file
//!   system's timestamp granularity, or a forged mtime) is not detected: the
//!   same limit as rsync's quick check.

use crate::chunk::{self, ChunkError, ChunkParams, Manifest};
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{Connection, OptionalExtension, ToSql};
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Attempts at hashing a file that changes while it is read.
pub const MAX_TRIES: u32 = 3;

/// Create the index table if missing. Called by `db::open`.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS file_index (
            path TEXT PRIMARY KEY,
            size INTEGER,
            mtime_ns INTEGER,
            inode INTEGER,
            params TEXT,
            manifest BLOB
        );",
    )
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("index database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stat {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} kept changing while it was hashed ({tries} tries)")]
    KeepsChanging { path: String, tries: u32 },
}

impl IndexError {
    /// The file was not there (removed or renamed while it was looked at).
    pub fn is_not_found(&self) -> bool {
        match self {
            IndexError::Io { source, .. } | IndexError::Chunk(ChunkError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// The manifest of the file at `path` (absolute), reused from the cache
/// when size, mtime, inode and params are unchanged, else computed and
/// stored. Blocking. The lock is held only for the lookup and the store,
/// never while hashing.
pub fn manifest_for(db: &Mutex<Connection>, path: &Path, params: &ChunkParams) -> Result<Manifest, IndexError> {
    manifest_with(db, path, params, |file| {
        chunk::chunk_open_file(file, params).map_err(|source| ChunkError::Io { path: path.display().to_string(), source })
    })
}

/// [`manifest_for`], answered from the few manifests this process looked up
/// last when the file's size, mtime and inode are those they were found
/// for: the serving side's DESCRIBE of a file and the GET that follows ask
/// for the same manifest, which decoding from SQLite each time took most of
/// a millisecond for a large file.
pub fn manifest_for_recent(db: &Mutex<Connection>, path: &Path, params: &ChunkParams) -> Result<Manifest, IndexError> {
    let io_err = |source| IndexError::Io { path: path.display().to_string(), source };
    let stamp = Stamp::of(&std::fs::metadata(path).map_err(io_err)?);
    let key = params.key();
    if let Some(m) = recent::get(path, &stamp, &key) {
        return Ok(m);
    }
    let manifest = manifest_for(db, path, params)?;
    recent::put(path, stamp, &key, &manifest);
    Ok(manifest)
}

/// Record `manifest` as the index entry of the file now at `path`, which
/// the caller just wrote with that content (a received transfer): the next
/// [`manifest_for`] of it needs no re-read. A manifest cut with other
/// parameters is still a true one; a chunk over `params.max` makes the
/// lookup miss and the file be cut again.
/// `meta` is the file's, taken before it was renamed into place, so that
/// a change made there since makes the entry miss.
pub fn record(db: &Mutex<Connection>, path: &Path, meta: &Metadata, params: &ChunkParams, manifest: &Manifest) -> Result<(), IndexError> {
    record_in(&lock(db), path, meta, params, manifest)
}

/// [`record`] on a connection the caller holds (in its transaction).
pub fn record_in(conn: &Connection, path: &Path, meta: &Metadata, params: &ChunkParams, manifest: &Manifest) -> Result<(), IndexError> {
    let stamp = Stamp::of(meta);
    if stamp.size != manifest.size {
        return Ok(());
    }
    store(conn, path, &stamp, &params.key(), manifest)
}

/// Drop the index entry of `path` (about to change in ways its size, mtime
/// and inode may not show). Errors are logged: a missing row is harmless.
pub fn forget(db: &Mutex<Connection>, path: &Path) {
    recent::forget(path);
    let conn = lock(db);
    if let Err(e) = conn.execute("DELETE FROM file_index WHERE path = ?1", [PathKey(path)]) {
        tracing::warn!(path = %path.display(), "dropping its index entry: {e}");
    }
}

/// [`manifest_for`], with the size, mtime and inode the file had when the
/// manifest was found valid for it: a caller about to trust the manifest
/// for the file's content later checks that the file still has them.
pub fn manifest_stamped(db: &Mutex<Connection>, path: &Path, params: &ChunkParams) -> Result<(Manifest, Stamp), IndexError> {
    stamped_with(db, path, params, |file| {
        chunk::chunk_open_file(file, params).map_err(|source| ChunkError::Io { path: path.display().to_string(), source })
    })
}

/// [`manifest_for`] with the chunking step as a parameter, so tests can
/// count it or change the file while it runs.
fn manifest_with(
    db: &Mutex<Connection>,
    path: &Path,
    params: &ChunkParams,
    chunk: impl FnMut(&File) -> Result<Manifest, ChunkError>,
) -> Result<Manifest, IndexError> {
    stamped_with(db, path, params, chunk).map(|(m, _)| m)
}

fn stamped_with(
    db: &Mutex<Connection>,
    path: &Path,
    params: &ChunkParams,
    mut chunk: impl FnMut(&File) -> Result<Manifest, ChunkError>,
) -> Result<(Manifest, Stamp), IndexError> {
    params.validate()?;
    let io_err = |source| IndexError::Io { path: path.display().to_string(), source };
    let key = params.key();
    for _ in 0..MAX_TRIES {
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let before = Stamp::of(&meta);
        if let Some(m) = lookup(&lock(db), path, &before, &key, params)? {
            return Ok((m, before));
        }
        let manifest = chunk(&file)?;
        let meta_after = file.metadata().map_err(io_err)?;
        let after = Stamp::of(&meta_after);
        // The ctime too (not stored: a rename moves it): a write during the
        // hashing within one mtime tick, or one that put the mtime back (a
        // patch in place sets the pushed mtime last), still shows there.
        if after == before && ctime_ns(&meta_after) == ctime_ns(&meta) && manifest.size == before.size {
            store(&lock(db), path, &before, &key, &manifest)?;
            return Ok((manifest, before));
        }
    }
    Err(IndexError::KeepsChanging { path: path.display().to_string(), tries: MAX_TRIES })
}

/// The manifests looked up last, in memory: the DESCRIBE that opens a file
/// through a mount and the GET of its first chunks right after ask for the
/// same one, and decoding a large manifest from SQLite each time took most
/// of a millisecond. An entry is used only for the same path, size, mtime,
/// inode and chunk parameters as in the index.
mod recent {
    use super::{Manifest, Stamp};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Entries kept, and the largest manifest kept (chunks): at most about
    /// 8 x 65,536 x 48 bytes.
    const ENTRIES: usize = 8;
    const MAX_CHUNKS: usize = 65_536;

    type Entry = (PathBuf, Stamp, String, Manifest);
    static RECENT: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    pub fn get(path: &Path, stamp: &Stamp, key: &str) -> Option<Manifest> {
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        let i = recent.iter().position(|(p, s, k, _)| p == path && s == stamp && k == key)?;
        let entry = recent.remove(i);
        let manifest = entry.3.clone();
        recent.push(entry);
        Some(manifest)
    }

    pub fn forget(path: &Path) {
        RECENT.lock().unwrap_or_else(|p| p.into_inner()).retain(|(p, _, _, _)| p != path);
    }

    pub fn put(path: &Path, stamp: Stamp, key: &str, manifest: &Manifest) {
        if manifest.chunks.len() > MAX_CHUNKS {
            return;
        }
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|(p, _, _, _)| p != path);
        if recent.len() >= ENTRIES {
            recent.remove(0);
        }
        recent.push((path.to_path_buf(), stamp, key.to_string(), manifest.clone()));
    }
}

/// What identifies a file version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Stamp {
        // i64 nanoseconds reach year 2262; saturate beyond rather than wrap.
        let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
        Stamp { size: meta.size(), mtime_ns, inode: meta.ino() }
    }
}

/// A file's ctime in nanoseconds: every change to it moves it, and nobody
/// can set it.
pub fn ctime_ns(meta: &Metadata) -> i64 {
    meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec())
}

/// A poisoned mutex only means another thread panicked while holding it;
/// SQLite statements are atomic, so the connection is still consistent.
fn lock(db: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The path as stored: TEXT when it is UTF-8, else its raw bytes as a BLOB
/// (SQLite keeps a BLOB as is in a TEXT column), so that distinct paths
/// never share a row.
struct PathKey<'a>(&'a Path);

impl ToSql for PathKey<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0.to_str() {
            Some(s) => ToSqlOutput::from(s),
            None => ToSqlOutput::from(self.0.as_os_str().as_bytes()),
        })
    }
}

/// SQLite integers are i64: u64 sizes and inodes are stored as their bit
/// pattern, so any value round-trips and compares exactly.
fn int(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn lookup(conn: &Connection, path: &Path, stamp: &Stamp, key: &str, params: &ChunkParams) -> Result<Option<Manifest>, IndexError> {
    let row = conn
        .prepare_cached("SELECT size, mtime_ns, inode, params, manifest FROM file_index WHERE path = ?1")?
        .query_row([PathKey(path)], |row| {
            Ok((
                row.get::<_, Value>(0)?,
                row.get::<_, Value>(1)?,
                row.get::<_, Value>(2)?,
                row.get::<_, Value>(3)?,
                row.get::<_, Value>(4)?,
            ))
        })
        .optional()?;
    // Values are compared as stored, whatever their type: a row of another
    // shape simply misses, and is overwritten.
    let Some((size, mtime_ns, inode, row_params, Value::Blob(bytes))) = row else {
        return Ok(None);
    };
    let fresh = size == Value::Integer(int(stamp.size))
        && mtime_ns == Value::Integer(stamp.mtime_ns)
        && inode == Value::Integer(int(stamp.inode))
        && row_params == Value::Text(key.to_string());
    if !fresh {
        return Ok(None);
    }
    Ok(Manifest::decode(&bytes).ok().filter(|m| m.size == stamp.size && m.validate(params.max).is_ok()))
}

fn store(conn: &Connection, path: &Path, stamp: &Stamp, key: &str, manifest: &Manifest) -> Result<(), IndexError> {
    conn.prepare_cached(
        "INSERT INTO file_index (path, size, mtime_ns, inode, params, manifest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (path) DO UPDATE SET
            size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode,
            params = excluded.params, manifest = excluded.manifest",
    )?
    .execute(rusqlite::params![PathKey(path), int(stamp.size), stamp.mtime_ns, int(stamp.inode), key, manifest.encode()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::testutil::TestDir;
    use std::cell::Cell;
    use std::fs::{FileTimes, OpenOptions};
    use std::io::Write;
    use std::time::{Duration, SystemTime};

    const SMALL: ChunkParams = ChunkParams { min: 1024, avg: 4096, max: 16 * 1024 };

    fn db() -> Mutex<Connection> {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        Mutex::new(conn)
    }

    fn content(len: usize, seed: u8) -> Vec<u8> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn mtime(path: &Path) -> SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    /// Rewrite the file in place (same inode), then set its mtime.
    fn rewrite(path: &Path, data: &[u8], mtime: SystemTime) {
        let mut f = OpenOptions::new().write(true).truncate(true).open(path).unwrap();
        f.write_all(data).unwrap();
        f.set_times(FileTimes::new().set_modified(mtime)).unwrap();
    }

    /// `manifest_with` that counts real chunking.
    fn counted(db: &Mutex<Connection>, path: &Path, params: &ChunkParams, calls: &Cell<u32>) -> Result<Manifest, IndexError> {
        manifest_with(db, path, params, |file| {
            calls.set(calls.get() + 1);
            chunk::chunk_reader(file, params).map_err(|source| ChunkError::Io { path: path.display().to_string(), source })
        })
    }

    #[test]
    fn migrate_is_idempotent() {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        migrate(&conn).unwrap();
    }

    #[test]
    fn unchanged_file_reuses_the_cached_manifest() {
        let dir = TestDir::new("reuse");
        let data = content(100_000, 1);
        let path = dir.file("a.bin", &data);
        let db = db();
        let calls = Cell::new(0);
        let first = counted(&db, &path, &SMALL, &calls).unwrap();
        assert_eq!(first, chunk::chunk_slice(&data, &SMALL).unwrap());
        assert_eq!(counted(&db, &path, &SMALL, &calls).unwrap(), first);
        assert_eq!(calls.get(), 1);

        // Same size, mtime and inode, other bytes: the cache cannot tell, and
        // answers the old manifest. That proves it was not recomputed.
        rewrite(&path, &content(100_000, 2), mtime(&path));
        assert_eq!(manifest_for(&db, &path, &SMALL).unwrap(), first);
    }

    #[test]
    fn a_recorded_manifest_is_used_until_the_file_changes() {
        let dir = TestDir::new("record");
        let data = content(80_000, 5);
        let path = dir.file("a.bin", &data);
        let db = db();
        let m = chunk::chunk_slice(&data, &SMALL).unwrap();
        record(&db, &path, &std::fs::metadata(&path).unwrap(), &SMALL, &m).unwrap();
        let calls = Cell::new(0);
        assert_eq!(counted(&db, &path, &SMALL, &calls).unwrap(), m);
        assert_eq!(calls.get(), 0, "a recorded file was cut again");
        // Changed since (another mtime): cut again.
        rewrite(&path, &content(80_000, 6), mtime(&path) + Duration::from_secs(1));
        assert_ne!(counted(&db, &path, &SMALL, &calls).unwrap(), m);
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn size_change_recomputes() {
        let dir = TestDir::new("size");
        let path = dir.file("a.bin", &content(50_000, 3));
        let db = db();
        let old = manifest_for(&db, &path, &SMALL).unwrap();
        let when = mtime(&path);
        let mut longer = content(50_000, 3);
        longer.extend_from_slice(b"more");
        rewrite(&path, &longer, when);
        let new = manifest_for(&db, &path, &SMALL).unwrap();
        assert_ne!(new, old);
        assert_eq!(new, chunk::chunk_slice(&longer, &SMALL).unwrap());
    }

    #[test]
    fn mtime_change_recomputes() {
        let dir = TestDir::new("mtime");
        let path = dir.file("a.bin", &content(50_000, 4));
        let db = db();
        let calls = Cell::new(0);
        counted(&db, &path, &SMALL, &calls).unwrap();
        let other = content(50_000, 5);
        rewrite(&path, &other, mtime(&path) + Duration::from_nanos(1));
        let new = counted(&db, &path, &SMALL, &calls).unwrap();
        assert_eq!(new, chunk::chunk_slice(&other, &SMALL).unwrap());
        assert_eq!(calls.get(), 2);
        // And the new manifest is cached in turn.
        counted(&db, &path, &SMALL, &calls).unwrap();
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn inode_change_recomputes() {
        let dir = TestDir::new("inode");
        let path = dir.file("a.bin", &content(50_000, 6));
        let db = db();
        manifest_for(&db, &path, &SMALL).unwrap();
        let when = mtime(&path);
        // Replace by rename: same size and mtime, another inode.
        let other = content(50_000, 7);
        let tmp = dir.file("a.bin.tmp", &other);
        File::open(&tmp).unwrap().set_times(FileTimes::new().set_modified(when)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(manifest_for(&db, &path, &SMALL).unwrap(), chunk::chunk_slice(&other, &SMALL).unwrap());
    }

    #[test]
    fn params_change_recomputes() {
        let dir = TestDir::new("params");
        let data = content(200_000, 8);
        let path = dir.file("a.bin", &data);
        let db = db();
        let calls = Cell::new(0);
        let small = counted(&db, &path, &SMALL, &calls).unwrap();
        let other = ChunkParams { min: 2048, ..SMALL };
        let new = counted(&db, &path, &other, &calls).unwrap();
        assert_eq!(calls.get(), 2);
        assert_ne!(new.chunks, small.chunks);
        assert_eq!(new, chunk::chunk_slice(&data, &other).unwrap());
    }

    #[test]
    fn recent_manifests_are_used_only_for_the_same_file_version() {
        let dir = TestDir::new("recent");
        let path = dir.file("r.bin", &content(40_000, 3));
        let db = db();
        let first = manifest_for_recent(&db, &path, &SMALL).unwrap();
        assert_eq!(manifest_for_recent(&db, &path, &SMALL).unwrap(), first);
        // Same size, other bytes, later mtime: the new version's manifest.
        let other = content(40_000, 4);
        std::fs::write(&path, &other).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(manifest_for_recent(&db, &path, &SMALL).unwrap(), chunk::chunk_slice(&other, &SMALL).unwrap());
    }

    #[test]
    fn corrupt_rows_are_recomputed_not_errors() {
        let dir = TestDir::new("corrupt");
        let data = content(30_000, 9);
        let path = dir.file("a.bin", &data);
        let db = db();
        let good = manifest_for(&db, &path, &SMALL).unwrap();
        let calls = Cell::new(0);
        for bad in [
            "UPDATE file_index SET manifest = x'00'",
            "UPDATE file_index SET manifest = 'text, not a blob'",
            "UPDATE file_index SET manifest = NULL",
            "UPDATE file_index SET size = 'big'",
            "UPDATE file_index SET inode = NULL",
        ] {
            lock(&db).execute_batch(bad).unwrap();
            assert_eq!(counted(&db, &path, &SMALL, &calls).unwrap(), good, "{bad}");
        }
        assert_eq!(calls.get(), 5);
        // A manifest valid in itself but for other content is refused too:
        // chunks longer than the params allow.
        let long = Manifest::new(good.size, vec![chunk::ChunkRef { offset: 0, len: data.len() as u32, hash: Hash::of(&data) }]);
        lock(&db).execute("UPDATE file_index SET manifest = ?1", [long.encode()]).unwrap();
        assert_eq!(counted(&db, &path, &SMALL, &calls).unwrap(), good);
        assert_eq!(calls.get(), 6);
    }

    #[test]
    fn lock_is_free_while_hashing() {
        let dir = TestDir::new("lock");
        let path = dir.file("a.bin", &content(10_000, 10));
        let db = db();
        manifest_with(&db, &path, &SMALL, |file| {
            assert!(db.try_lock().is_ok(), "index locked while hashing");
            Ok(chunk::chunk_reader(file, &SMALL).unwrap())
        })
        .unwrap();
    }

    /// Index `path` with `change` made to it during the first hashing;
    /// returns the hashings done and the manifest kept.
    fn indexed_with_a_change_during_the_first_hashing(db: &Mutex<Connection>, path: &Path, change: impl Fn()) -> (u32, Manifest) {
        let calls = Cell::new(0);
        let m = manifest_with(db, path, &SMALL, |file| {
            calls.set(calls.get() + 1);
            let m = chunk::chunk_reader(file, &SMALL).unwrap();
            if calls.get() == 1 {
                change();
            }
            Ok(m)
        })
        .unwrap();
        (calls.get(), m)
    }

    #[test]
    fn a_file_changed_during_hashing_is_hashed_again() {
        let dir = TestDir::new("changing");
        let path = dir.file("a.bin", &content(20_000, 11));
        let db = db();
        let (calls, m) = indexed_with_a_change_during_the_first_hashing(&db, &path, || {
            OpenOptions::new().append(true).open(&path).unwrap().write_all(b"late").unwrap();
        });
        assert_eq!(calls, 2);
        let mut now = content(20_000, 11);
        now.extend_from_slice(b"late");
        assert_eq!(m, chunk::chunk_slice(&now, &SMALL).unwrap());
        assert_eq!(manifest_for(&db, &path, &SMALL).unwrap(), m);
    }

    #[test]
    fn a_write_during_hashing_that_puts_the_mtime_back_is_seen() {
        let dir = TestDir::new("mtime-back");
        let path = dir.file("a.bin", &content(20_000, 13));
        let db = db();
        let (calls, m) = indexed_with_a_change_during_the_first_hashing(&db, &path, || {
            // Same size, other bytes, the old mtime put back.
            let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 0).unwrap();
            f.set_modified(mtime).unwrap();
        });
        assert_eq!(calls, 2, "the first manifest, of the old bytes, must not be kept");
        assert_eq!(m, chunk::chunk_file(&path, &SMALL).unwrap());
    }

    #[test]
    fn a_file_that_keeps_changing_is_an_error() {
        let dir = TestDir::new("unstable");
        let path = dir.file("a.bin", &content(20_000, 12));
        let db = db();
        let calls = Cell::new(0);
        let err = manifest_with(&db, &path, &SMALL, |file| {
            calls.set(calls.get() + 1);
            let m = chunk::chunk_reader(file, &SMALL).unwrap();
            OpenOptions::new().append(true).open(&path).unwrap().write_all(b"x").unwrap();
            Ok(m)
        })
        .unwrap_err();
        assert_eq!(calls.get(), MAX_TRIES);
        assert!(matches!(err, IndexError::KeepsChanging { tries: MAX_TRIES, .. }), "{err}");
        assert!(err.to_string().ends_with("a.bin kept changing while it was hashed (3 tries)"), "{err}");
        // Nothing was cached.
        let rows: i64 = lock(&db).query_row("SELECT count(*) FROM file_index", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn missing_file_and_bad_params_are_errors() {
        let dir = TestDir::new("missing");
        let db = db();
        let err = manifest_for(&db, &dir.path().join("nope"), &SMALL).unwrap_err();
        assert!(matches!(err, IndexError::Io { .. }), "{err}");
        assert!(err.to_string().starts_with("stat "), "{err}");
        assert!(err.is_not_found(), "a missing file is NOT_FOUND to the partner, not INTERNAL");
        let path = dir.file("a.bin", b"abc");
        let bad = ChunkParams { min: 10, avg: 20, max: 30 };
        let err = manifest_for(&db, &path, &bad).unwrap_err();
        assert!(matches!(err, IndexError::Chunk(ChunkError::BadParams { .. })), "{err}");
        assert!(!err.is_not_found());
    }

    #[test]
    fn non_utf8_paths_are_cached_apart() {
        use std::ffi::OsStr;
        let dir = TestDir::new("bytes");
        let raw = dir.path().join(OsStr::from_bytes(b"caf\xe9"));
        std::fs::write(&raw, content(5000, 13)).unwrap();
        let lossy = dir.file(&raw.file_name().unwrap().to_string_lossy(), &content(5000, 14));
        assert_ne!(raw, lossy);
        let db = db();
        let calls = Cell::new(0);
        let a = counted(&db, &raw, &SMALL, &calls).unwrap();
        let b = counted(&db, &lossy, &SMALL, &calls).unwrap();
        assert_ne!(a, b);
        assert_eq!(counted(&db, &raw, &SMALL, &calls).unwrap(), a);
        assert_eq!(counted(&db, &lossy, &SMALL, &calls).unwrap(), b);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn empty_file_is_cached() {
        let dir = TestDir::new("empty");
        let path = dir.file("empty", b"");
        let db = db();
        let calls = Cell::new(0);
        let m = counted(&db, &path, &SMALL, &calls).unwrap();
        assert_eq!(m.size, 0);
        assert!(m.chunks.is_empty());
        assert_eq!(counted(&db, &path, &SMALL, &calls).unwrap(), m);
        assert_eq!(calls.get(), 1);
    }
}
