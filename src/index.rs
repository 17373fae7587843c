//! Cached manifests of real files, in SQLite: a file is re-chunked only when
//! its (size, mtime, inode) changed. STUB: contract only.

use crate::chunk::{ChunkError, ChunkParams, Manifest};
use rusqlite::Connection;
use std::path::Path;

/// Create the index table if missing. Called by `db::open`.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let _ = conn;
    todo!()
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("index database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stat {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The manifest of the file at `path` (absolute), reused from the cache
/// when size, mtime, inode and params are unchanged, else computed and
/// stored. Blocking. The lock is held only for the lookup and the store,
/// never while hashing.
pub fn manifest_for(db: &std::sync::Mutex<Connection>, path: &Path, params: &ChunkParams) -> Result<Manifest, IndexError> {
    let _ = (db, path, params);
    todo!()
}
