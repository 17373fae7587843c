//! Content-defined chunking (FastCDC v2020) and BLAKE3 hashing of files into
//! [`Manifest`]s. STUB: contract only, the chunk helper implements it.
//!
//! Invariants: memory never grows with file size (a bounded read buffer);
//! the same bytes and params always give the same chunks.

use crate::hash::Hash;
use std::io::{self, Read};
use std::path::Path;

/// FastCDC sizes in bytes. Default 64 KiB / 256 KiB / 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams { min: 64 * 1024, avg: 256 * 1024, max: 1024 * 1024 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk sizes min={min} avg={avg} max={max}: need 64 <= min <= avg <= max <= 16 MiB")]
    BadParams { min: u32, avg: u32, max: u32 },
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl ChunkParams {
    pub fn validate(&self) -> Result<(), ChunkError> {
        todo!()
    }
}

/// One chunk of a file version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub offset: u64,
    pub len: u32,
    pub hash: Hash,
}

/// A file version: ordered chunks covering [0, size) exactly, and the
/// BLAKE3 of the whole content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub file_hash: Hash,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest chunk {index} starts at {offset}, expected {expected}")]
    Gap { index: usize, offset: u64, expected: u64 },
    #[error("manifest chunk {index} is empty or longer than {max} bytes")]
    BadLen { index: usize, max: u32 },
    #[error("manifest chunks cover {covered} bytes but the file has {size}")]
    SizeMismatch { covered: u64, size: u64 },
    #[error("manifest encoding is corrupt")]
    Corrupt,
}

impl Manifest {
    /// Check the chunks are contiguous from 0, non-empty, each at most
    /// `max_chunk` bytes, and cover exactly `size`.
    pub fn validate(&self, max_chunk: u32) -> Result<(), ManifestError> {
        todo!("{max_chunk}")
    }

    /// Compact binary form for SQLite: size, file hash, then per chunk
    /// (len u32 LE, hash 32 bytes); offsets are implied.
    pub fn encode(&self) -> Vec<u8> {
        todo!()
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        todo!("{}", bytes.len())
    }
}

/// Chunk and hash a stream.
pub fn chunk_reader<R: Read>(reader: R, params: &ChunkParams) -> io::Result<Manifest> {
    let _ = (reader, params);
    todo!()
}

/// Chunk and hash a file (blocking: call from a blocking pool).
pub fn chunk_file(path: &Path, params: &ChunkParams) -> Result<Manifest, ChunkError> {
    let _ = (path, params);
    todo!()
}
