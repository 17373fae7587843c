//! Content-defined chunking (FastCDC v2020) and BLAKE3 hashing of files into
//! [`Manifest`]s.
//!
//! Design: one pass over the bytes. A reader fills a fixed buffer of
//! [`ChunkParams::buffer_len`] bytes (4 MiB by default, never less than two
//! maximum chunks); the [`Cutter`] finds the next cut point, the chunk is
//! hashed with BLAKE3 while it is still in cache, and the unconsumed tail is
//! moved to the front before the next refill. No allocation per chunk, no
//! copy but the tail.
//!
//! The cut points are those of `fastcdc::v2020::cut` (normalization level 1,
//! the crate's GEAR table, no seed), computed on four interleaved hash chains
//! instead of one; the tests hold the two to the same answers. The file
//! hash is not a second pass over the bytes: it is a BLAKE3 of the chunk
//! list ([`file_hash`]). A BLAKE3 of the whole content could not be derived
//! from the chunk hashes (a chunk starts anywhere, so the two hash trees
//! share no 1 KiB leaf) and cost a third of the time (see benches/chunk.rs).
//!
//! Invariants:
//! - memory never grows with file size: the buffer is bounded by the params;
//! - a cut is only taken when at least `max` bytes are buffered or the input
//!   has ended, so the cut points are exactly those of FastCDC over the whole
//!   content in one slice, whatever the reader's short reads: the same bytes
//!   and params always give the same chunks;
//! - every chunk is in `1..=max` bytes, only the last may be below `min`
//!   (for an odd `min`, `min - 1`: fastcdc steps two bytes at a time), and
//!   the chunks cover `[0, size)` contiguously;
//! - [`Manifest::decode`] never panics and returns only manifests whose
//!   chunks are non-empty, contiguous and cover `size`, and whose file hash
//!   is that of their chunk list.

use crate::hash::Hash;
use fastcdc::v2020;
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
    #[error(
        "invalid chunk sizes min={min} avg={avg} max={max}: need min <= avg <= max, \
         min in 64..=1 MiB, avg in 256..=4 MiB, max in 1 KiB..=16 MiB"
    )]
    BadParams { min: u32, avg: u32, max: u32 },
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Read buffer floor: large enough that the tail copied before each refill
/// (under one maximum chunk) is a small share of the bytes processed, small
/// enough to stay in the last-level cache.
const MIN_BUFFER: usize = 4 * 1024 * 1024;

impl ChunkParams {
    /// The bounds are fastcdc's own (it asserts them), plus the ordering.
    pub fn validate(&self) -> Result<(), ChunkError> {
        let ChunkParams { min, avg, max } = *self;
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max;
        if ok {
            Ok(())
        } else {
            Err(ChunkError::BadParams { min, avg, max })
        }
    }

    /// A stable text form naming the algorithm and the sizes, e.g.
    /// `fastcdc2020-l1:65536/262144/1048576`: two params strings are equal
    /// exactly when they cut the same bytes the same way (the index keys
    /// cached manifests on it).
    pub fn key(&self) -> String {
        format!("fastcdc2020-l1:{}/{}/{}", self.min, self.avg, self.max)
    }

    /// Bytes of read buffer used by [`chunk_reader`] with these params.
    pub fn buffer_len(&self) -> usize {
        MIN_BUFFER.max(2 * self.max as usize)
    }
}

/// One chunk of a file version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub offset: u64,
    pub len: u32,
    pub hash: Hash,
}

impl ChunkRef {
    /// One past the last byte of the chunk.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// A file version: ordered chunks covering [0, size) exactly, and the file
/// hash, which commits to all of them ([`file_hash`]).
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
    #[error("manifest file hash {got} does not match its chunk list (expected {expected})")]
    FileHash { got: Hash, expected: Hash },
    #[error("manifest encoding is corrupt")]
    Corrupt,
}

/// The key-derivation context of the file hash (docs/PROTOCOL.md, 1).
const FILE_HASH_CONTEXT: &str = "deft/1 file hash: size and chunk list";

/// The file hash of a version: BLAKE3 in key-derivation mode over its size
/// (u64 LE), then per chunk its length (u32 LE) and BLAKE3 hash. Every chunk
/// is checked against its hash when it is read or received, so this names
/// the content as surely as a hash of the bytes, and costs nothing to
/// compute from a manifest: no second pass over the file.
pub fn file_hash(size: u64, chunks: &[ChunkRef]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key(FILE_HASH_CONTEXT);
    h.update(&size.to_le_bytes());
    // Records are gathered and hashed many at a time: BLAKE3 hashes a long
    // input several 1 KiB chunks at once (SIMD), 36-byte updates one by
    // one, which made this most of the cost of checking a received manifest.
    let mut batch = Vec::with_capacity(RECORD_LEN * chunks.len().min(FILE_HASH_BATCH));
    for part in chunks.chunks(FILE_HASH_BATCH) {
        batch.clear();
        for c in part {
            batch.extend_from_slice(&c.len.to_le_bytes());
            batch.extend_from_slice(c.hash.as_bytes());
        }
        h.update(&batch);
    }
    h.finalize().into()
}

/// Chunk records hashed per BLAKE3 update by [`file_hash`] (36 KiB).
const FILE_HASH_BATCH: usize = 1024;

/// Encoded sizes: header (size u64 LE + file hash), then one record per chunk.
const HEADER_LEN: usize = 8 + 32;
const RECORD_LEN: usize = 4 + 32;

impl Manifest {
    /// The manifest of these chunks, with its file hash.
    pub fn new(size: u64, chunks: Vec<ChunkRef>) -> Manifest {
        Manifest { size, file_hash: file_hash(size, &chunks), chunks }
    }

    /// Check the chunks are contiguous from 0, non-empty, each at most
    /// `max_chunk` bytes, cover exactly `size`, and that the file hash is
    /// theirs.
    pub fn validate(&self, max_chunk: u32) -> Result<(), ManifestError> {
        let mut expected = 0u64;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.offset != expected {
                return Err(ManifestError::Gap { index, offset: c.offset, expected });
            }
            if c.len == 0 || c.len > max_chunk {
                return Err(ManifestError::BadLen { index, max: max_chunk });
            }
            // Only a hand-made manifest can overflow; it covers "too much".
            expected = expected.checked_add(u64::from(c.len)).ok_or(ManifestError::SizeMismatch { covered: u64::MAX, size: self.size })?;
        }
        if expected != self.size {
            return Err(ManifestError::SizeMismatch { covered: expected, size: self.size });
        }
        let want = file_hash(self.size, &self.chunks);
        if want != self.file_hash {
            return Err(ManifestError::FileHash { got: self.file_hash, expected: want });
        }
        Ok(())
    }

    /// Compact binary form for SQLite: size, file hash, then per chunk
    /// (len u32 LE, hash 32 bytes); offsets are implied.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + RECORD_LEN * self.chunks.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(self.file_hash.as_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(c.hash.as_bytes());
        }
        out
    }

    /// The inverse of [`encode`](Self::encode). Any input that is not the
    /// encoding of a manifest passing `validate(u32::MAX)` is
    /// [`ManifestError::Corrupt`]; callers check their own maximum chunk size.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < HEADER_LEN || (bytes.len() - HEADER_LEN) % RECORD_LEN != 0 {
            return Err(ManifestError::Corrupt);
        }
        let (header, records) = bytes.split_at(HEADER_LEN);
        let (size, file_hash) = header.split_at(8);
        let size = u64::from_le_bytes(size.try_into().map_err(|_| ManifestError::Corrupt)?);
        let file_hash = Hash(file_hash.try_into().map_err(|_| ManifestError::Corrupt)?);
        let mut chunks = Vec::with_capacity(records.len() / RECORD_LEN);
        let mut offset = 0u64;
        for record in records.chunks_exact(RECORD_LEN) {
            let (len, hash) = record.split_at(4);
            let len = u32::from_le_bytes(len.try_into().map_err(|_| ManifestError::Corrupt)?);
            let hash = Hash(hash.try_into().map_err(|_| ManifestError::Corrupt)?);
            chunks.push(ChunkRef { offset, len, hash });
            offset = offset.checked_add(u64::from(len)).ok_or(ManifestError::Corrupt)?;
        }
        let manifest = Manifest { size, file_hash, chunks };
        manifest.validate(u32::MAX).map_err(|_| ManifestError::Corrupt)?;
        Ok(manifest)
    }
}

/// FastCDC v2020 cut-point search for one [`ChunkParams`]: the cut points
/// of `fastcdc::v2020::cut` (normalization level 1, seed 0), found faster.
///
/// Why not call `v2020::cut`: its gear hash is one serial chain
/// (`h = (h << 1) + GEAR[byte]`, about 1.5 cycles a byte), the slowest step
/// of indexing. But `h` at a position depends only on the 64 bytes before it
/// (older terms are shifted out of the u64), so `LANES` stretches of the
/// search range can be hashed independently, each starting 64 bytes early,
/// and interleaved so the CPU runs the chains in parallel. The first hit in
/// the earliest stretch is fastcdc's cut; tests check the two agree.
#[derive(Debug, Clone)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    /// fastcdc's `GEAR_LS` (`GEAR` shifted left by one, for the first byte
    /// of a two-byte step) then `GEAR`: one table, so that the hot loop
    /// needs one base register.
    gear: Box<[u64; 512]>,
}

/// Independent hash chains run side by side (`round` spells out four):
/// enough to hide the chain's latency, few enough to stay in registers.
const LANES: usize = 4;
/// Bytes per lane and round. When a lane hits, the lanes before it are
/// finished on one chain (up to `LANES - 1` times `LANE_LEN` bytes at the
/// slow speed, once a chunk), and each round spends `WINDOW` bytes a lane on
/// warm-up: 4 KiB balances the two.
const LANE_LEN: usize = 4096;
/// Rounds for the tail of a search range shorter than a long round.
const SHORT_LANE_LEN: usize = 512;
/// Bytes of history that determine the gear hash: each byte shifts the
/// previous ones one bit left in a u64.
const WINDOW: usize = 64;

impl Cutter {
    /// A cutter for valid `params`, else [`ChunkError::BadParams`].
    pub fn new(params: &ChunkParams) -> Result<Cutter, ChunkError> {
        params.validate()?;
        // As `v2020::FastCDC::new` derives them.
        const NORMALIZATION: u32 = 1;
        let bits = v2020::logarithm2(params.avg);
        let (gear, gear_ls) = v2020::get_gear_with_seed(0);
        let mut tables = Box::new([0u64; 512]);
        tables[..256].copy_from_slice(&*gear_ls);
        tables[256..].copy_from_slice(&*gear);
        Ok(Cutter {
            min: params.min as usize,
            avg: params.avg as usize,
            max: params.max as usize,
            mask_s: v2020::MASKS[(bits + NORMALIZATION) as usize],
            mask_l: v2020::MASKS[(bits - NORMALIZATION) as usize],
            gear: tables,
        })
    }

    /// One step of the gear hash: `h` after byte `b`.
    #[inline(always)]
    fn roll(&self, h: u64, b: u8) -> u64 {
        (h << 1).wrapping_add(self.gear[256 + usize::from(b)])
    }

    /// The longest chunk this cutter returns: a cut is final only when at
    /// least this many bytes were offered, or the input ended.
    pub fn max_len(&self) -> usize {
        self.max
    }

    /// Length of the chunk starting at `data[0]`, in `1..=max` for non-empty
    /// data (0 for empty). Final only if `data` holds at least `max` bytes or
    /// ends the input: a shorter `data` is cut as if it were the end.
    pub fn next_len(&self, data: &[u8]) -> usize {
        // The structure of `v2020::cut_gear`: no cut before `min` (rounded
        // down to even: fastcdc steps two bytes at a time), the stricter mask
        // before `avg`, the looser one after, `max` if nothing matched.
        let len = data.len();
        if len <= self.min {
            return len;
        }
        let (end, center) = if len > self.max { (self.max, self.avg) } else { (len, self.avg.min(len)) };
        let origin = self.min / 2 * 2;
        let center = center / 2 * 2;
        let last = end / 2 * 2;
        if origin < center {
            if let Some(at) = self.first_hit(data, origin, origin, center, self.mask_s) {
                return at;
            }
        }
        let from = origin.max(center);
        if from < last {
            if let Some(at) = self.first_hit(data, origin, from, last, self.mask_l) {
                return at;
            }
        }
        end
    }

    /// The first position `i` in `from..to` where the gear hash of
    /// `data[origin..=i]` has no bit of `mask` set. `origin`, `from` and `to`
    /// are even.
    fn first_hit(&self, data: &[u8], origin: usize, from: usize, to: usize, mask: u64) -> Option<usize> {
        let mut pos = from;
        // Long rounds while the range allows, shorter ones for its tail.
        while to - pos >= LANES * LANE_LEN {
            if let Some(at) = self.round::<LANE_LEN>(data, origin, pos, mask) {
                return Some(at);
            }
            pos += LANES * LANE_LEN;
        }
        while to - pos >= LANES * SHORT_LANE_LEN {
            if let Some(at) = self.round::<SHORT_LANE_LEN>(data, origin, pos, mask) {
                return Some(at);
            }
            pos += LANES * SHORT_LANE_LEN;
        }
        self.scan(data, pos, to, self.warm(data, origin, pos), mask)
    }

    /// The gear hash just before `at`, from at most `WINDOW` bytes back
    /// (never before `origin`, where fastcdc starts hashing from 0).
    fn warm(&self, data: &[u8], origin: usize, at: usize) -> u64 {
        let start = origin.max(at.saturating_sub(WINDOW));
        data[start..at].iter().fold(0, |h, &b| self.roll(h, b))
    }

    /// One chain: the first hit in `from..to`, given `h`, the hash just
    /// before `from`.
    fn scan(&self, data: &[u8], from: usize, to: usize, mut h: u64, mask: u64) -> Option<usize> {
        for (i, &b) in data[from..to].iter().enumerate() {
            h = self.roll(h, b);
            if h & mask == 0 {
                return Some(from + i);
            }
        }
        None
    }

    /// One round: `LANES` consecutive stretches of `L` bytes from `pos`,
    /// hashed in lockstep two bytes a step, as fastcdc does (the first byte
    /// of a pair is tested as `2h` against `mask << 1`). Returns the first
    /// hit of the earliest stretch that has one.
    #[inline(always)]
    fn round<const L: usize>(&self, data: &[u8], origin: usize, pos: usize, mask: u64) -> Option<usize> {
        let t = &*self.gear;
        let gl = |b: u8| t[usize::from(b)];
        let g = |b: u8| t[256 + usize::from(b)];
        let mask_ls = mask << 1;
        let block = &data[pos..pos + LANES * L];
        let (s0, rest) = block.split_at(L);
        let (s1, rest) = rest.split_at(L);
        let (s2, s3) = rest.split_at(L);
        let [mut h0, mut h1, mut h2, mut h3] = std::array::from_fn(|k| self.warm(data, origin, pos + k * L));
        for (j, (((p0, p1), p2), p3)) in
            s0.chunks_exact(2).zip(s1.chunks_exact(2)).zip(s2.chunks_exact(2)).zip(s3.chunks_exact(2)).enumerate()
        {
            // A test that hits leaves the loop at once (rare: about once a
            // chunk); `resolve` then finds which stretch and where.
            macro_rules! step {
                ($h:ident, $p:ident) => {
                    let x = ($h << 2).wrapping_add(gl($p[0]));
                    if x & mask_ls == 0 {
                        return self.resolve::<L>(data, origin, pos, 2 * j, mask);
                    }
                    $h = x.wrapping_add(g($p[1]));
                    if $h & mask == 0 {
                        return self.resolve::<L>(data, origin, pos, 2 * j, mask);
                    }
                };
            }
            step!(h0, p0);
            step!(h1, p1);
            step!(h2, p2);
            step!(h3, p3);
        }
        None
    }

    /// After a round saw its first hit at byte `i` of some stretch (so no
    /// stretch hits before its byte `i`): in stretch order, the first hit at
    /// or after byte `i`.
    #[cold]
    fn resolve<const L: usize>(&self, data: &[u8], origin: usize, pos: usize, i: usize, mask: u64) -> Option<usize> {
        (0..LANES).find_map(|k| {
            let from = pos + k * L + i;
            self.scan(data, from, pos + (k + 1) * L, self.warm(data, origin, from), mask)
        })
    }
}

/// Accumulates chunks as bytes are consumed; `size` is where the next
/// chunk starts (0, or the start of a segment cut on its own thread).
#[derive(Debug, Clone)]
struct Builder {
    cutter: Cutter,
    size: u64,
    chunks: Vec<ChunkRef>,
}

impl Builder {
    fn new(cutter: Cutter) -> Builder {
        Builder { cutter, size: 0, chunks: Vec::new() }
    }

    /// Cut and hash every chunk of `data` that is final: all of it when
    /// `at_end`, else as long as a full `max` bytes remain. Returns the
    /// number of bytes consumed; the rest must be offered again, followed by
    /// more input.
    fn consume(&mut self, data: &[u8], at_end: bool) -> usize {
        let mut pos = 0;
        while pos < data.len() && (at_end || data.len() - pos >= self.cutter.max_len()) {
            let rest = &data[pos..];
            let len = self.cutter.next_len(rest).clamp(1, rest.len());
            let chunk = &rest[..len];
            let hash = Hash::of(chunk);
            // `len <= max <= 16 MiB` (validated params), so it fits a u32.
            self.chunks.push(ChunkRef { offset: self.size, len: len as u32, hash });
            self.size += len as u64;
            pos += len;
        }
        pos
    }

    /// Cut and hash the chunks of `data` that are final whatever follows:
    /// those ended by a cut point (a cut depends only on the bytes before
    /// it) or by `max`. Returns the bytes consumed; the rest holds no cut.
    fn consume_final(&mut self, data: &[u8]) -> usize {
        let max = self.cutter.max_len();
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            let len = self.cutter.next_len(rest).clamp(1, rest.len());
            if len == rest.len() && rest.len() < max {
                break;
            }
            self.chunks.push(ChunkRef { offset: self.size, len: len as u32, hash: Hash::of(&rest[..len]) });
            self.size += len as u64;
            pos += len;
        }
        pos
    }

    fn finish(self) -> Manifest {
        Manifest::new(self.size, self.chunks)
    }
}

/// Cuts and hashes a file while it is written from start to end: bytes
/// are offered in order, and the manifest is ready when the last one is,
/// without reading the file back. The chunks are the ones [`chunk_slice`]
/// gives for the same bytes (a cut only depends on the `max` bytes after
/// the previous one).
#[derive(Debug, Clone)]
pub struct StreamChunker {
    params: ChunkParams,
    builder: Builder,
    /// The bytes after the last final cut: fewer than `max`, none a cut.
    pending: Vec<u8>,
}

impl StreamChunker {
    pub fn new(params: &ChunkParams) -> Result<StreamChunker, ChunkError> {
        Ok(StreamChunker { params: *params, builder: Builder::new(Cutter::new(params)?), pending: Vec::new() })
    }

    pub fn params(&self) -> &ChunkParams {
        &self.params
    }

    /// How many bytes were offered: where the next ones must start.
    pub fn position(&self) -> u64 {
        self.builder.size + self.pending.len() as u64
    }

    /// The next bytes of the file. Copies only the bytes after the last
    /// cut, and those of the next chunk that join them.
    pub fn push(&mut self, mut data: &[u8]) {
        let max = self.builder.cutter.max_len();
        let old = self.pending.len();
        if old > 0 {
            let take = (max - old).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            let n = self.builder.consume_final(&self.pending);
            if n < old {
                // Not reached past the old bytes (too few new ones): keep
                // everything after the cut for the next write.
                self.pending.extend_from_slice(&data[take..]);
                let m = n + self.builder.consume_final(&self.pending[n..]);
                self.pending.drain(..m);
                return;
            }
            data = &data[n - old..];
            self.pending.clear();
        }
        let n = self.builder.consume_final(data);
        self.pending.extend_from_slice(&data[n..]);
    }

    /// The chunks cut so far that are final whatever bytes follow.
    pub fn final_chunks(&self) -> &[ChunkRef] {
        &self.builder.chunks
    }

    /// The manifest of the bytes offered so far (the stream can go on).
    pub fn manifest(&self) -> Manifest {
        let mut tail = Builder { cutter: self.builder.cutter.clone(), size: self.builder.size, chunks: self.builder.chunks.clone() };
        tail.consume(&self.pending, true);
        tail.finish()
    }
}

/// Chunk and hash bytes already in memory.
pub fn chunk_slice(data: &[u8], params: &ChunkParams) -> Result<Manifest, ChunkError> {
    let mut builder = Builder::new(Cutter::new(params)?);
    builder.consume(data, true);
    Ok(builder.finish())
}

/// Chunk and hash a stream. Invalid params are an `InvalidInput` error
/// wrapping [`ChunkError::BadParams`].
pub fn chunk_reader<R: Read>(reader: R, params: &ChunkParams) -> io::Result<Manifest> {
    chunk_reader_buffered(reader, params, params.buffer_len())
}

/// [`chunk_reader`] with a chosen buffer length (at least `2 * max`), so
/// tests can force many refills on small inputs.
fn chunk_reader_buffered<R: Read>(mut reader: R, params: &ChunkParams, buf_len: usize) -> io::Result<Manifest> {
    let cutter = Cutter::new(params).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut builder = Builder::new(cutter);
    let mut buf = vec![0u8; buf_len.max(2 * params.max as usize)];
    let mut filled = 0;
    loop {
        let at_end = fill(&mut reader, &mut buf, &mut filled)?;
        let consumed = builder.consume(&buf[..filled], at_end);
        if at_end {
            return Ok(builder.finish());
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

/// Read into `buf[*filled..]` until it is full or the reader is exhausted;
/// returns whether the reader is exhausted.
fn fill<R: Read>(reader: &mut R, buf: &mut [u8], filled: &mut usize) -> io::Result<bool> {
    while *filled < buf.len() {
        match reader.read(&mut buf[*filled..]) {
            Ok(0) => return Ok(true),
            Ok(n) => *filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Chunk and hash a file (blocking: call from a blocking pool).
pub fn chunk_file(path: &Path, params: &ChunkParams) -> Result<Manifest, ChunkError> {
    params.validate()?;
    let io_err = |source| ChunkError::Io { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    chunk_reader(file, params).map_err(io_err)
}

/// Files at least this large are cut and hashed by two threads.
const PARALLEL_MIN: u64 = 16 << 20;

/// Bytes each of those threads reads at a time (at least two maximum
/// chunks).
const SEGMENT_STEP: usize = 8 << 20;

/// Chunk and hash an open file (blocking), on two threads when it is large:
/// each cuts and hashes one half; the cuts are stitched where the first
/// half's cutting, carried on past the middle, meets a cut of the second
/// half (content-defined cuts resynchronize within a chunk or two). The
/// result equals [`chunk_reader`]'s (tests check it).
pub fn chunk_open_file(file: &std::fs::File, params: &ChunkParams) -> io::Result<Manifest> {
    use std::os::unix::fs::FileExt;
    let bad = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    let cutter = Cutter::new(params).map_err(bad)?;
    let size = file.metadata()?.len();
    if size < 2 * u64::from(params.max) {
        // Small (most files a `tar x` makes): read it whole rather than
        // into a zeroed buffer of `buffer_len` (4 MiB by default).
        let mut data = Vec::with_capacity(size as usize + 1);
        PositionalReader { file, at: 0 }.read_to_end(&mut data)?;
        return chunk_slice(&data, params).map_err(bad);
    }
    let holes = file_holes(file, 0, size, cutter.max_len())?;
    if !holes.is_empty() {
        return Ok(Manifest::new(size, cut_sparse(file, 0, size, &holes, &cutter)?));
    }
    if size < PARALLEL_MIN {
        return chunk_reader(PositionalReader { file, at: 0 }, params);
    }
    let middle = size / 2;
    let (left, right) = on_two_threads(|| cut_segment(file, 0, middle, false, &cutter), || cut_segment(file, middle, size, true, &cutter))?;
    let (mut chunks, mut pos) = left?;
    let (right_chunks, _) = right?;
    // Carry the first half's cutting on until it meets a cut of the second.
    let mut next = right_chunks.partition_point(|c| c.offset < pos);
    while pos < size && right_chunks.get(next).is_none_or(|c| c.offset != pos) {
        let want = (size - pos).min(cutter.max_len() as u64) as usize;
        let mut buf = vec![0u8; want];
        file.read_exact_at(&mut buf, pos)?;
        let len = cutter.next_len(&buf).clamp(1, want);
        chunks.push(ChunkRef { offset: pos, len: len as u32, hash: Hash::of(&buf[..len]) });
        pos += len as u64;
        next = right_chunks.partition_point(|c| c.offset < pos);
    }
    chunks.extend_from_slice(&right_chunks[next.min(right_chunks.len())..]);
    Ok(Manifest::new(size, chunks))
}

/// The chunks of an open file from `from` (a cut point: the end of a chunk
/// cut before, or 0) to its end, as [`chunk_open_file`] cuts them there
/// (blocking). A chunk's cut depends only on the bytes after the cut
/// before it, so these are the whole file's chunks past `from`.
pub fn chunk_open_file_from(file: &std::fs::File, from: u64, params: &ChunkParams) -> io::Result<Vec<ChunkRef>> {
    let size = file.metadata()?.len();
    if size > from {
        let holes = file_holes(file, from, size, params.max as usize)?;
        if !holes.is_empty() {
            let cutter = Cutter::new(params).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            return cut_sparse(file, from, size, &holes, &cutter);
        }
    }
    let mut chunks = chunk_reader(PositionalReader { file, at: from }, params)?.chunks;
    for c in &mut chunks {
        c.offset += from;
    }
    Ok(chunks)
}

/// The holes of `file` within `[from, to)` (ranges it stores no data for,
/// which read as zeros: a sparse file's), as `SEEK_HOLE` and `SEEK_DATA`
/// find them, sorted: those at least `2 * max` long (a shorter one spares
/// no read, see [`cut_sparse`]). Empty where the file system does not
/// tell.
pub fn file_holes(file: &std::fs::File, from: u64, to: u64, max: usize) -> io::Result<Vec<(u64, u64)>> {
    // Shorter holes are cut as data, in bulk: cutting across them one
    // chunk at a time would read more than they spare.
    Ok(hole_ranges(file, from, to)?.into_iter().filter(|&(start, end)| end - start >= 2 * max as u64).collect())
}

/// Every hole of `file` within `[from, to)`, sorted (empty where the file
/// system does not tell).
pub fn hole_ranges(file: &std::fs::File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let Ok(at) = libc::off_t::try_from(at) else { return Ok(None) };
        // SAFETY: lseek on a descriptor we hold open, with integer
        // arguments; it touches no memory of ours. (It moves the shared
        // file offset, which nothing here uses: every read is positional.)
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            // Past the end: no more data (SEEK_DATA) or holes (SEEK_HOLE).
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut holes = Vec::new();
    let mut at = from;
    while at < to {
        let start = match seek(at, libc::SEEK_HOLE) {
            Ok(Some(start)) if start < to => start,
            Ok(_) => break,
            // No SEEK_HOLE here: the file reads as all data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_DATA)?.unwrap_or(to).min(to);
        if end <= start {
            break;
        }
        holes.push((start, end));
        at = end;
    }
    Ok(holes)
}

/// How many repeated chunks [`zero_chunks`] hashes zeros for, at most.
const ZERO_CANDIDATES: usize = 4;

/// Which of `chunks` are all zeros (a sparse file's holes, cut by
/// [`cut_sparse`]), so that a file can be written back with holes there.
/// A run of zeros is cut into chunks of one length and hash, so only the
/// [`ZERO_CANDIDATES`] most repeated chunks are looked at: whatever a
/// manifest says, this hashes at most that many runs of zeros.
pub fn zero_chunks(chunks: &[ChunkRef]) -> Vec<bool> {
    let mut count: std::collections::HashMap<(Hash, u32), usize> = std::collections::HashMap::new();
    for c in chunks {
        *count.entry((c.hash, c.len)).or_default() += 1;
    }
    let mut repeated: Vec<((Hash, u32), usize)> = count.into_iter().filter(|&(_, n)| n > 1).collect();
    repeated.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    repeated.truncate(ZERO_CANDIDATES);
    let longest = repeated.iter().map(|((_, len), _)| *len as usize).max().unwrap_or(0);
    let zeros = vec![0u8; longest];
    // By hash and length: a line that names the hash of 4 KiB of zeros
    // with another length is not a chunk of zeros.
    let zero: Vec<(Hash, u32)> =
        repeated.iter().map(|(key, _)| *key).filter(|&(hash, len)| Hash::of(&zeros[..len as usize]) == hash).collect();
    chunks.iter().map(|c| zero.contains(&(c.hash, c.len))).collect()
}

/// The chunk a cut starting in a run of zeros at least `max` long gives
/// (its offset left 0).
fn zero_chunk(cutter: &Cutter) -> ChunkRef {
    let zeros = vec![0u8; cutter.max_len()];
    let len = cutter.next_len(&zeros).clamp(1, zeros.len());
    // `max <= 16 MiB` (validated params): it fits a u32.
    ChunkRef { offset: 0, len: len as u32, hash: Hash::of(&zeros[..len]) }
}

/// The chunks of `[from, size)` of a file with `holes` (from [`file_holes`]),
/// cut as [`chunk_open_file_from`] cuts them, without reading the holes: a
/// chunk that starts at least `max` bytes before a hole's end sees only
/// zeros, so it is the chunk of `max` zeros, the same length and hash each
/// time. A `truncate -s 1T` costs a hash of one chunk, not of a terabyte.
fn cut_sparse(file: &std::fs::File, from: u64, size: u64, holes: &[(u64, u64)], cutter: &Cutter) -> io::Result<Vec<ChunkRef>> {
    use std::os::unix::fs::FileExt;
    let max = cutter.max_len();
    let mut buf = vec![0u8; max];
    let zero = zero_chunk(cutter);
    let (max, zero_len) = (max as u64, u64::from(zero.len));
    let mut chunks = Vec::new();
    let (mut pos, mut next) = (from, 0);
    while pos < size {
        while holes.get(next).is_some_and(|&(_, end)| end <= pos) {
            next += 1;
        }
        match holes.get(next).copied() {
            Some((start, end)) if start <= pos && pos + max <= end => {
                let n = (end - max - pos) / zero_len + 1;
                for _ in 0..n {
                    chunks.push(ChunkRef { offset: pos, ..zero });
                    pos += zero_len;
                }
            }
            // Data up to the next hole (or the end), long enough to cut in bulk.
            Some((start, _)) if start >= pos + 2 * max => {
                let (cut, end) = cut_segment(file, pos, start, false, cutter)?;
                chunks.extend(cut);
                pos = end;
            }
            None if size - pos >= 2 * max => {
                chunks.extend(cut_segment(file, pos, size, true, cutter)?.0);
                pos = size;
            }
            // One chunk at a hole's edge, or near the end.
            _ => {
                let want = (size - pos).min(max) as usize;
                file.read_exact_at(&mut buf[..want], pos)?;
                let len = cutter.next_len(&buf[..want]).clamp(1, want);
                chunks.push(ChunkRef { offset: pos, len: len as u32, hash: Hash::of(&buf[..len]) });
                pos += len as u64;
            }
        }
    }
    Ok(chunks)
}

/// Which of `chunks` an open file holds: for each, whether the bytes at its
/// offset have its hash (blocking; two threads when there is much to read).
pub fn verify_chunks(file: &std::fs::File, chunks: &[ChunkRef]) -> io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let check = |part: &[ChunkRef]| -> io::Result<Vec<bool>> {
        let mut buf = Vec::new();
        part.iter()
            .map(|c| {
                buf.resize(c.len as usize, 0);
                match file.read_exact_at(&mut buf, c.offset) {
                    Ok(()) => Ok(Hash::of(&buf) == c.hash),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .collect()
    };
    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    if total < PARALLEL_MIN {
        return check(chunks);
    }
    // Split by bytes, not by count: chunk sizes vary.
    let mut acc = 0u64;
    let split = chunks
        .iter()
        .position(|c| {
            acc += u64::from(c.len);
            acc > total / 2
        })
        .unwrap_or(chunks.len());
    let (left, right) = chunks.split_at(split);
    let (left, right) = on_two_threads(|| check(left), || check(right))?;
    let mut ok = left?;
    ok.extend(right?);
    Ok(ok)
}

/// `left()` on this thread and `right()` on another, at the same time.
pub(crate) fn on_two_threads<L, R: Send>(left: impl FnOnce() -> L, right: impl FnOnce() -> R + Send) -> io::Result<(L, R)> {
    std::thread::scope(|s| {
        let right = s.spawn(right);
        let left = left();
        Ok((left, right.join().map_err(|_| io::Error::other("the hashing thread panicked"))?))
    })
}

/// A [`Read`] at a position of a shared file handle (pread).
struct PositionalReader<'a> {
    file: &'a std::fs::File,
    at: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Cut and hash `[from, to)` of `file` starting a chunk at `from`. Returns
/// the final chunks (the last one ends before `to` unless `to` is the end of
/// the file, `at_eof`) and where they end.
fn cut_segment(file: &std::fs::File, from: u64, to: u64, at_eof: bool, cutter: &Cutter) -> io::Result<(Vec<ChunkRef>, u64)> {
    use std::os::unix::fs::FileExt;
    let step = SEGMENT_STEP.max(2 * cutter.max_len());
    // Zeroed once: growing a Vec for each read zeroed every byte before the
    // read overwrote it, a second pass over the file in memory.
    let mut buf = vec![0u8; step + cutter.max_len()];
    let mut builder = Builder { cutter: cutter.clone(), size: from, chunks: Vec::new() };
    let (mut filled, mut read_to) = (0usize, from);
    loop {
        // What `consume` leaves is under `max`, so at least `step` is free.
        let n = (to - read_to).min((buf.len() - filled) as u64) as usize;
        file.read_exact_at(&mut buf[filled..filled + n], read_to)?;
        filled += n;
        read_to += n as u64;
        let end = read_to == to;
        let used = builder.consume(&buf[..filled], end && at_eof);
        if end {
            return Ok((builder.chunks, builder.size));
        }
        buf.copy_within(used..filled, 0);
        filled -= used;
    }
}

/// The chunks of a file that was `base` and has since changed in place:
/// only inside `dirty` (sorted, disjoint byte ranges of the new content),
/// and in size (now `size`). Every other byte is where `base` had it. The
/// result is the same as cutting the whole new content (tests check it),
/// but only the chunks that touch a dirty range are cut and hashed again:
/// cutting restarts at the boundary before each dirty range and stops as
/// soon as a cut falls on a boundary of `base` past it. `read(offset, len)`
/// reads the new content; `zeros` (sorted, disjoint) are ranges of it known
/// to be zeros (a sparse file's holes, [`file_holes`]), cut without being
/// read: a run of zeros whose start moved never meets `base`'s cuts again
/// before it ends. [`Manifest::new`] gives the file hash.
pub fn recut(
    base: &Manifest,
    size: u64,
    dirty: &[(u64, u64)],
    zeros: &[(u64, u64)],
    params: &ChunkParams,
    mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Vec<ChunkRef>> {
    let cutter = Cutter::new(params).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let max = cutter.max_len() as u64;
    let zero = (!zeros.is_empty()).then(|| zero_chunk(&cutter));
    let mut in_zeros = 0usize;
    // A base chunk stands as it is when none of its bytes changed, nor the
    // byte after it (the cut at its end was decided with that byte in the
    // gear hash, see `Cutter::next_len`), and it was cut by content (not by
    // the end of a file that has grown since).
    let reusable = |c: &ChunkRef| {
        let touched = dirty.iter().any(|&(a, b)| a <= c.end() && b > c.offset);
        let cut_by_end = c.end() == base.size && size > base.size;
        !touched && !cut_by_end && c.end() <= size
    };
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut next = 0usize;
    // New content from `buf_at`, read ahead in `max`-sized steps.
    let (mut buf, mut buf_at) = (Vec::new(), 0u64);
    while pos < size {
        while next < base.chunks.len() && base.chunks[next].offset < pos {
            next += 1;
        }
        if let Some(c) = base.chunks.get(next).filter(|c| c.offset == pos && reusable(c)) {
            out.push(*c);
            pos = c.end();
            next += 1;
            continue;
        }
        while zeros.get(in_zeros).is_some_and(|&(_, end)| end <= pos) {
            in_zeros += 1;
        }
        if let (Some(zero), Some(&(start, end))) = (zero, zeros.get(in_zeros)) {
            if start <= pos && pos + max <= end {
                out.push(ChunkRef { offset: pos, ..zero });
                pos += u64::from(zero.len);
                continue;
            }
        }
        let want = (size - pos).min(cutter.max_len() as u64) as usize;
        if pos < buf_at || pos > buf_at + buf.len() as u64 {
            buf.clear();
        } else {
            buf.drain(..(pos - buf_at) as usize);
        }
        buf_at = pos;
        if buf.len() < want {
            let from = pos + buf.len() as u64;
            let step = (want - buf.len()).max(4 * cutter.max_len()).min((size - from) as usize);
            let more = read(from, step)?;
            if more.len() != step {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the staged file is shorter than its size"));
            }
            buf.extend_from_slice(&more);
        }
        let data = &buf[..want];
        let len = cutter.next_len(data).clamp(1, want);
        out.push(ChunkRef { offset: pos, len: len as u32, hash: Hash::of(&data[..len]) });
        pos += len as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_bytes, TestDir};
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Small sizes so unit tests see many chunks in little data.
    const SMALL: ChunkParams = ChunkParams { min: 1024, avg: 4096, max: 16 * 1024 };

    /// A reader that returns at most the next of `sizes` bytes per call
    /// (cycling), and sometimes `Interrupted`.
    struct ShortReads<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        call: usize,
    }

    impl Read for ShortReads<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.call += 1;
            if self.call % 7 == 0 {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let want = self.sizes[self.call % self.sizes.len()].max(1);
            let n = want.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn short_reads(data: &[u8], sizes: Vec<usize>) -> ShortReads<'_> {
        ShortReads { data, sizes, call: 0 }
    }

    /// Every property a manifest of `data` must have.
    fn check_manifest(m: &Manifest, data: &[u8], params: &ChunkParams) {
        m.validate(params.max).unwrap();
        assert_eq!(m.size, data.len() as u64);
        let last = m.chunks.len().saturating_sub(1);
        for (i, c) in m.chunks.iter().enumerate() {
            assert!(c.len <= params.max, "chunk {i} is {} bytes", c.len);
            if i != last {
                // fastcdc steps two bytes at a time from `min` rounded down.
                assert!(c.len >= params.min & !1, "chunk {i} is {} bytes", c.len);
            }
            let bytes = &data[c.offset as usize..c.end() as usize];
            assert_eq!(c.hash, Hash::of(bytes), "chunk {i}");
        }
    }

    /// Bytes of `new`'s chunks whose hash `old` lacks: what a delta sends.
    fn changed_bytes(old: &Manifest, new: &Manifest) -> u64 {
        let have: HashSet<Hash> = old.chunks.iter().map(|c| c.hash).collect();
        new.chunks.iter().filter(|c| !have.contains(&c.hash)).map(|c| u64::from(c.len)).sum()
    }

    #[test]
    fn params_bounds_are_fastcdcs() {
        ChunkParams::default().validate().unwrap();
        SMALL.validate().unwrap();
        ChunkParams { min: 64, avg: 256, max: 1024 }.validate().unwrap();
        ChunkParams { min: 1 << 20, avg: 4 << 20, max: 16 << 20 }.validate().unwrap();
        for (min, avg, max) in [
            (63, 256, 1024),
            (64, 255, 1024),
            (64, 256, 1023),
            (2048, 1024, 4096),
            (1024, 8192, 4096),
            ((1 << 20) + 1, 2 << 20, 4 << 20),
            (1024, (4 << 20) + 1, 8 << 20),
            (1024, 4096, (16 << 20) + 1),
            (0, 0, 0),
        ] {
            let p = ChunkParams { min, avg, max };
            assert!(matches!(p.validate(), Err(ChunkError::BadParams { .. })), "{p:?}");
            // Never a panic from fastcdc's asserts.
            let err = chunk_reader(&b"abc"[..], &p).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(chunk_slice(b"abc", &p).is_err());
        }
    }

    #[test]
    fn params_key_names_algorithm_and_sizes() {
        assert_eq!(ChunkParams::default().key(), "fastcdc2020-l1:65536/262144/1048576");
    }

    #[test]
    fn empty_input_has_no_chunks() {
        let m = chunk_reader(io::empty(), &SMALL).unwrap();
        assert_eq!(m, Manifest::new(0, vec![]));
        assert_eq!(chunk_slice(b"", &SMALL).unwrap(), m);
    }

    #[test]
    fn input_below_min_is_one_chunk() {
        let data = random_bytes(100, 1);
        let m = chunk_slice(&data, &SMALL).unwrap();
        assert_eq!(m.chunks.len(), 1);
        check_manifest(&m, &data, &SMALL);
    }

    #[test]
    fn chunks_are_deterministic_bounded_and_cover_the_input() {
        let data = random_bytes(3 << 20, 2);
        let a = chunk_slice(&data, &SMALL).unwrap();
        let b = chunk_reader(&data[..], &SMALL).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, chunk_slice(&data, &SMALL).unwrap());
        check_manifest(&a, &data, &SMALL);
        // Random data: cuts are content-defined, near the average.
        let avg = data.len() / a.chunks.len();
        assert!((SMALL.avg as usize..2 * SMALL.avg as usize).contains(&avg), "average {avg}");
    }

    #[test]
    fn cuts_match_fastcdc_over_the_whole_slice() {
        let data = random_bytes(2 << 20, 3);
        let ours: Vec<(u64, u32)> = chunk_reader_buffered(&data[..], &SMALL, 0).unwrap().chunks.iter().map(|c| (c.offset, c.len)).collect();
        let theirs: Vec<(u64, u32)> =
            v2020::FastCDC::new(&data, SMALL.min, SMALL.avg, SMALL.max).map(|c| (c.offset as u64, c.length as u32)).collect();
        assert_eq!(ours, theirs);
    }

    /// fastcdc's own cut, the reference for [`Cutter::next_len`].
    fn reference_cut(data: &[u8], p: &ChunkParams) -> usize {
        let c = Cutter::new(p).unwrap();
        v2020::cut(data, c.min, c.avg, c.max, c.mask_s, c.mask_l, c.mask_s << 1, c.mask_l << 1).1
    }

    /// Random bytes with runs of zeros, which have no cut points: hits then
    /// land in any lane, at any distance from a round's start.
    fn patchy_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut data = random_bytes(len, seed);
        let lens = random_bytes(len / 1000 + 1, seed ^ 0xff);
        let mut at = 0;
        for &l in &lens {
            let run = usize::from(l) * 37;
            if at + run < len {
                data[at..at + run].fill(0);
            }
            at += run * 2 + 500;
        }
        data
    }

    #[test]
    fn cutter_agrees_with_fastcdc_at_every_offset() {
        for (p, seed) in [
            (SMALL, 12),
            (ChunkParams { min: 65, avg: 256, max: 1024 }, 13),
            (ChunkParams { min: 777, avg: 1000, max: 70_000 }, 14),
            (ChunkParams { min: 64, avg: 16_384, max: 16_384 }, 15),
            (ChunkParams { min: 1024, avg: 1024, max: 1024 }, 16),
            (ChunkParams::default(), 17),
        ] {
            let data = patchy_bytes(3 * p.max as usize + 5000, seed);
            let cutter = Cutter::new(&p).unwrap();
            // Every start offset of a short stretch, and every end near the
            // size limits, with the whole-data cuts in between.
            let mut starts: Vec<usize> = (0..300).collect();
            let mut at = 0;
            while at < data.len() {
                starts.push(at);
                at += reference_cut(&data[at..], &p).max(1);
            }
            for start in starts {
                let rest = &data[start..];
                assert_eq!(cutter.next_len(rest), reference_cut(rest, &p), "{p:?} at {start}");
                for end in [p.min, p.avg, p.max].map(|x| x as usize) {
                    for len in end.saturating_sub(3)..end + 3 {
                        let d = &rest[..len.min(rest.len())];
                        assert_eq!(cutter.next_len(d), reference_cut(d, &p), "{p:?} at {start}+{len}");
                    }
                }
            }
        }
    }

    #[test]
    fn lanes_find_the_first_hit_of_one_chain() {
        let cutter = Cutter::new(&ChunkParams::default()).unwrap();
        let (gear, gear_ls) = v2020::get_gear_with_seed(0);
        assert!(gear.iter().zip(gear_ls.iter()).all(|(&g, &gl)| gl == g << 1));
        let data = patchy_bytes(120_000, 21);
        // One chain from `origin`, tested from `from`: the definition.
        let reference = |origin: usize, from: usize, to: usize, mask: u64| {
            let mut h = 0u64;
            (origin..to).find(|&i| {
                h = (h << 1).wrapping_add(gear[usize::from(data[i])]);
                i >= from && h & mask == 0
            })
        };
        // From rare hits to one every ~128 bytes, so that zero runs leave
        // early stretches without hits while later ones have some.
        for bits in [18, 14, 10, 6] {
            let mask = v2020::MASKS[bits];
            for origin in [0, 2, 4000] {
                for from in (origin..origin + 40_000).step_by(2 * 1999) {
                    for to in [from, from + 2, from + 4 * 512 + 6, from + 4 * 4096, 120_000] {
                        assert_eq!(
                            cutter.first_hit(&data, origin, from, to, mask),
                            reference(origin, from, to, mask),
                            "mask bits {bits}, origin {origin}, {from}..{to}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn short_reads_and_small_buffers_give_the_same_manifest() {
        let data = random_bytes(1 << 20, 4);
        let whole = chunk_slice(&data, &SMALL).unwrap();
        for sizes in [vec![1, 2, 3, 4093], vec![17], vec![65536, 1], vec![usize::MAX]] {
            for buf_len in [0, 40_000, 100_000, 4 << 20] {
                let m = chunk_reader_buffered(short_reads(&data, sizes.clone()), &SMALL, buf_len).unwrap();
                assert_eq!(m, whole, "reads {sizes:?}, buffer {buf_len}");
            }
        }
    }

    #[test]
    fn a_stream_of_writes_of_any_size_gives_the_same_manifest() {
        let data = random_bytes(1 << 20, 5);
        let whole = chunk_slice(&data, &SMALL).unwrap();
        // Writes that end just before, at and past cuts, tiny and larger
        // than `max`; and uniform data, cut at `max` only.
        for sizes in [
            vec![1, 2, 3, 4093],
            vec![SMALL.max as usize],
            vec![SMALL.max as usize - 1],
            vec![65536, 1],
            vec![1 << 20],
            vec![7777, 300_001, 5],
        ] {
            let mut stream = StreamChunker::new(&SMALL).unwrap();
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                stream.push(&data[at..at + n]);
                at += n;
                i += 1;
                assert_eq!(stream.position(), at as u64);
                if i == 7 {
                    // A manifest midway leaves the stream as it was.
                    assert_eq!(stream.manifest(), chunk_slice(&data[..at], &SMALL).unwrap());
                }
            }
            assert_eq!(stream.manifest(), whole, "writes of {sizes:?}");
        }
        let zeros = vec![0u8; 3 * SMALL.max as usize + 5];
        let mut stream = StreamChunker::new(&SMALL).unwrap();
        zeros.chunks(1000).for_each(|w| stream.push(w));
        assert_eq!(stream.manifest(), chunk_slice(&zeros, &SMALL).unwrap());
    }

    #[test]
    fn uniform_data_is_cut_at_max() {
        let data = vec![0u8; 5 * SMALL.max as usize + 10];
        let m = chunk_reader_buffered(&data[..], &SMALL, 0).unwrap();
        check_manifest(&m, &data, &SMALL);
        let lens: Vec<u32> = m.chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, [SMALL.max, SMALL.max, SMALL.max, SMALL.max, SMALL.max, 10]);
    }

    #[test]
    fn read_errors_are_returned() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert_eq!(chunk_reader(Failing, &SMALL).unwrap_err().to_string(), "disk on fire");
        let missing = Path::new("/nonexistent/deftfs/chunk-test");
        let err = chunk_file(missing, &SMALL).unwrap_err();
        assert!(matches!(err, ChunkError::Io { .. }), "{err}");
        assert!(err.to_string().starts_with("reading /nonexistent/deftfs/chunk-test: "), "{err}");
    }

    #[test]
    fn chunk_file_matches_chunk_slice() {
        let data = random_bytes(600_000, 5);
        let path = std::env::temp_dir().join(format!("deftfs-chunk-test-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let m = chunk_file(&path, &SMALL);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(m.unwrap(), chunk_slice(&data, &SMALL).unwrap());
    }

    #[test]
    fn an_edit_in_the_middle_changes_few_chunks() {
        let params = ChunkParams::default();
        let data = random_bytes(64 << 20, 6);
        let old = chunk_slice(&data, &params).unwrap();

        let mut edited = data.clone();
        let mid = edited.len() / 2;
        edited[mid..mid + (1 << 20)].copy_from_slice(&random_bytes(1 << 20, 7));
        let new = chunk_slice(&edited, &params).unwrap();
        check_manifest(&new, &edited, &params);
        let changed = changed_bytes(&old, &new);
        assert!(changed >= 1 << 20, "{changed}");
        assert!(changed <= 4 << 20, "an edit of 1 MiB changed {changed} bytes of chunks");

        let mut inserted = random_bytes(100, 8);
        inserted.extend_from_slice(&data);
        let new = chunk_slice(&inserted, &params).unwrap();
        let changed = changed_bytes(&old, &new);
        assert!(changed <= 4 << 20, "inserting 100 bytes changed {changed} bytes of chunks");
    }

    #[test]
    fn encode_decode_round_trip() {
        let data = random_bytes(200_000, 9);
        let m = chunk_slice(&data, &SMALL).unwrap();
        let bytes = m.encode();
        assert_eq!(bytes.len(), HEADER_LEN + RECORD_LEN * m.chunks.len());
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        let empty = chunk_slice(b"", &SMALL).unwrap();
        assert_eq!(Manifest::decode(&empty.encode()).unwrap(), empty);
    }

    /// Apply in-place edits to `data` and resize it; the dirty ranges.
    fn edit(data: &mut Vec<u8>, edits: &[(usize, usize, u8)], new_len: usize) -> Vec<(u64, u64)> {
        let mut dirty = crate::mount::stage::Ranges::default();
        for &(at, len, byte) in edits {
            let at = at % (data.len() + 1);
            let end = (at + len).min(data.len());
            data[at..end].iter_mut().for_each(|b| *b ^= byte | 1);
            dirty.insert(at as u64, end as u64);
        }
        if new_len > data.len() {
            dirty.insert(data.len() as u64, new_len as u64);
        }
        data.resize(new_len, 7);
        dirty.truncate(new_len as u64);
        dirty.as_slice().to_vec()
    }

    #[test]
    fn two_threads_cut_and_hash_like_one() {
        let dir = TestDir::new("chunk-par");
        let params = ChunkParams::default();
        // Read whole, read through the buffer, cut on two threads.
        for (i, len) in [0, 1000, (3 << 19) + 7, 5 << 20, (PARALLEL_MIN as usize), 40 << 20, (33 << 20) + 12345].into_iter().enumerate() {
            let data = random_bytes(len, 30 + i as u64);
            let path = dir.file(&format!("f{i}"), &data);
            let file = std::fs::File::open(&path).unwrap();
            assert_eq!(chunk_open_file(&file, &params).unwrap(), chunk_slice(&data, &params).unwrap(), "{len} bytes");
        }
    }

    /// A file with holes: islands of data `(offset, len)` in a file of
    /// `size` bytes, written with pwrite (the rest is holes).
    fn sparse_file(dir: &TestDir, name: &str, size: u64, islands: &[(u64, usize)], seed: u64) -> (std::fs::File, Vec<u8>) {
        use std::os::unix::fs::FileExt;
        let path = dir.path().join(name);
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(size).unwrap();
        let mut content = vec![0u8; size as usize];
        for (i, &(at, len)) in islands.iter().enumerate() {
            let data = random_bytes(len, seed + i as u64);
            file.write_all_at(&data, at).unwrap();
            content[at as usize..at as usize + len].copy_from_slice(&data);
        }
        (file, content)
    }

    #[test]
    fn holes_are_cut_like_the_zeros_they_read_as_without_reading_them() {
        let dir = TestDir::new("chunk-sparse");
        const M: u64 = 1 << 20;
        let params = ChunkParams::default();
        let layouts: Vec<(u64, Vec<(u64, usize)>)> = vec![
            // A hole at the end (truncate -s), at the start, between islands,
            // one just over the length that spares a read, and data ending
            // right at a hole's edge.
            (24 * M, vec![(0, 300_000)]),
            (24 * M, vec![(20 * M, 3 * M as usize)]),
            (40 * M, vec![(0, 5 * M as usize), (9 * M + 4096, 700_000), (30 * M, 10 * M as usize)]),
            (12 * M, vec![(0, 4 * M as usize), (6 * M + 8192, 100)]),
            (64 * M, vec![(3 * M, 4096), (20 * M, 20 * M as usize)]),
        ];
        for (i, (size, islands)) in layouts.iter().enumerate() {
            let (file, content) = sparse_file(&dir, &format!("f{i}"), *size, islands, 70 + 10 * i as u64);
            assert!(!file_holes(&file, 0, *size, params.max as usize).unwrap().is_empty(), "layout {i}: no holes seen (file system?)");
            let whole = chunk_slice(&content, &params).unwrap();
            assert_eq!(chunk_open_file(&file, &params).unwrap(), whole, "layout {i}");
            // From a cut point, as the push after chunks sent ahead does.
            for c in [1, whole.chunks.len() / 2, whole.chunks.len() - 1] {
                let from = whole.chunks[c].offset;
                assert_eq!(chunk_open_file_from(&file, from, &params).unwrap(), whole.chunks[c..], "layout {i} from chunk {c}");
            }
        }
        // A terabyte of hole is one hash, and a few million lines.
        let big = dir.path().join("tera");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&big).unwrap();
        file.set_len(1 << 40).unwrap();
        let m = chunk_open_file(&file, &params).unwrap();
        assert_eq!(m.size, 1 << 40);
        assert_eq!(m.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(), 1 << 40);
        assert!(m.chunks.iter().all(|c| c.hash == m.chunks[0].hash || c.len != m.chunks[0].len));
    }

    #[test]
    fn verify_chunks_finds_the_changed_chunk_on_one_thread_and_on_two() {
        let dir = TestDir::new("chunk-verify");
        for (i, len) in [300_000usize, 40 << 20].into_iter().enumerate() {
            let mut data = random_bytes(len, 40 + i as u64);
            let m = chunk_slice(&data, &ChunkParams::default()).unwrap();
            let bad = m.chunks.len() - 1;
            data[m.chunks[bad].offset as usize] ^= 1;
            let path = dir.file(&format!("f{i}"), &data);
            let file = std::fs::File::open(&path).unwrap();
            let ok = verify_chunks(&file, &m.chunks).unwrap();
            assert_eq!(ok.len(), m.chunks.len());
            assert!(ok.iter().enumerate().all(|(j, &v)| v == (j != bad)), "{len} bytes: {:?}", ok.iter().filter(|v| !**v).count());
            // Repaired, then one byte short: only the last chunk, which
            // can't be read whole, fails.
            data[m.chunks[bad].offset as usize] ^= 1;
            std::fs::write(&path, &data[..data.len() - 1]).unwrap();
            let ok = verify_chunks(&file, &m.chunks).unwrap();
            assert!(ok.iter().enumerate().all(|(j, &v)| v == (j != bad)), "{len} bytes, short: {:?}", ok.iter().filter(|v| !**v).count());
        }
    }

    #[test]
    fn the_file_hash_commits_to_every_chunk_and_the_size() {
        let data = random_bytes(200_000, 5);
        let m = chunk_slice(&data, &SMALL).unwrap();
        let mut other = m.clone();
        other.chunks[1].hash = Hash::of(b"x");
        assert_ne!(file_hash(other.size, &other.chunks), m.file_hash);
        assert!(matches!(other.validate(SMALL.max), Err(ManifestError::FileHash { .. })));
        assert_ne!(file_hash(m.size + 1, &m.chunks), m.file_hash);
        // Not the BLAKE3 of the bytes.
        assert_ne!(m.file_hash, Hash::of(&data));
        assert_eq!(m.file_hash, file_hash(m.size, &m.chunks));
    }

    /// The file hash as PROTOCOL.md section 1 defines it, one field at a
    /// time: [`file_hash`] batches its updates and must equal this.
    fn file_hash_by_the_spec(size: u64, chunks: &[ChunkRef]) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(FILE_HASH_CONTEXT);
        h.update(&size.to_le_bytes());
        for c in chunks {
            h.update(&c.len.to_le_bytes());
            h.update(c.hash.as_bytes());
        }
        h.finalize().into()
    }

    #[test]
    fn the_file_hash_is_the_specified_one_across_batches() {
        for n in [0, 1, FILE_HASH_BATCH - 1, FILE_HASH_BATCH, FILE_HASH_BATCH + 1, 3 * FILE_HASH_BATCH + 7] {
            let chunks: Vec<ChunkRef> =
                (0..n).map(|i| ChunkRef { offset: i as u64 * 10, len: 10 + i as u32, hash: Hash::of(&i.to_le_bytes()) }).collect();
            assert_eq!(file_hash(n as u64 * 7, &chunks), file_hash_by_the_spec(n as u64 * 7, &chunks), "{n} chunks");
        }
    }

    #[test]
    fn recut_of_an_in_place_edit_cuts_only_near_it() {
        let mut data = random_bytes(2_000_000, 21);
        let base = chunk_slice(&data, &SMALL).unwrap();
        let n = data.len();
        let dirty = edit(&mut data, &[(1_000_000, 5000, 0xff)], n);
        let mut read_bytes = 0;
        let chunks = recut(&base, data.len() as u64, &dirty, &[], &SMALL, |at, len| {
            read_bytes += len;
            Ok(data[at as usize..at as usize + len].to_vec())
        })
        .unwrap();
        assert_eq!(chunks, chunk_slice(&data, &SMALL).unwrap().chunks);
        assert!(read_bytes < 200_000, "read {read_bytes} bytes to re-cut a 5000-byte edit");
    }

    #[test]
    fn chunks_of_zeros_are_found_among_the_most_repeated_only() {
        let zero = |len: u32, offset: u64| ChunkRef { offset, len, hash: Hash::of(&vec![0u8; len as usize]) };
        let data = |seed: u64, offset: u64| {
            let b = random_bytes(1000, seed);
            ChunkRef { offset, len: 1000, hash: Hash::of(&b) }
        };
        // Zeros three times, a data chunk twice, a lone chunk of zeros.
        let chunks =
            vec![data(1, 0), zero(4096, 1000), zero(4096, 5096), data(2, 9192), zero(4096, 10192), data(2, 14288), zero(777, 15288)];
        assert_eq!(zero_chunks(&chunks), [false, true, true, false, true, false, false]);
        // The hash of 4 KiB of zeros given with another length is not zeros.
        let mut lie = chunks.clone();
        lie.push(ChunkRef { len: 1 << 20, ..zero(4096, 16065) });
        assert!(!zero_chunks(&lie)[7]);
        // A manifest that names many repeated lengths of zeros: only the
        // most repeated few are hashed, the rest count as data.
        let mut hostile = Vec::new();
        for len in 1..=(ZERO_CANDIDATES as u32 + 3) {
            for _ in 0..(100 - len) {
                hostile.push(zero(len * 1024, 0));
            }
        }
        let found = zero_chunks(&hostile);
        let lens: std::collections::BTreeSet<u32> = hostile.iter().zip(&found).filter(|(_, z)| **z).map(|(c, _)| c.len).collect();
        assert_eq!(lens, (1..=ZERO_CANDIDATES as u32).map(|l| l * 1024).collect());
    }

    #[test]
    fn recut_cuts_known_zeros_without_reading_them() {
        // Data, a long run of zeros, data; then the first data is zeroed
        // (a punched hole): the run now starts at 0, its cuts all move.
        let mut data = random_bytes(20_000, 23);
        data.extend(vec![0u8; 400_000]);
        data.extend(random_bytes(30_000, 24));
        let base = chunk_slice(&data, &SMALL).unwrap();
        data[..20_000].fill(0);
        let zeros = [(0u64, 420_000u64)];
        let mut reads = 0usize;
        let chunks = recut(&base, data.len() as u64, &[(0, 20_000)], &zeros, &SMALL, |at, len| {
            reads += len;
            Ok(data[at as usize..at as usize + len].to_vec())
        })
        .unwrap();
        assert_eq!(chunks, chunk_slice(&data, &SMALL).unwrap().chunks);
        assert!(reads < 100_000, "read {reads} bytes of a run of zeros");
    }

    #[test]
    fn recut_of_an_edit_right_after_a_chunk_cuts_that_chunk_again() {
        // The cut at a chunk's end hashes the byte after it: changing that
        // byte alone may move the cut (found by the property below).
        let mut data = random_bytes(300_000, 22);
        let base = chunk_slice(&data, &SMALL).unwrap();
        for c in base.chunks.iter().take(base.chunks.len() - 1).step_by(5) {
            let n = data.len();
            let dirty = edit(&mut data, &[(c.end() as usize, 1, 0)], n);
            let chunks = recut(&base, n as u64, &dirty, &[], &SMALL, |at, len| Ok(data[at as usize..at as usize + len].to_vec())).unwrap();
            assert_eq!(chunks, chunk_slice(&data, &SMALL).unwrap().chunks, "edit at {}", c.end());
            // The same edit again undoes it (it flips the byte's low bit).
            edit(&mut data, &[(c.end() as usize, 1, 0)], n);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn recut_equals_cutting_the_whole_new_content(
            seed in any::<u64>(),
            len in 0usize..400_000,
            edits in proptest::collection::vec((any::<usize>(), 0usize..40_000, any::<u8>()), 0..4),
            resize in prop_oneof![Just(None), (0usize..450_000).prop_map(Some)],
        ) {
            let mut data = random_bytes(len, seed);
            let base = chunk_slice(&data, &SMALL).unwrap();
            let new_len = resize.unwrap_or(len);
            let dirty = edit(&mut data, &edits, new_len);
            let chunks = recut(&base, data.len() as u64, &dirty, &[], &SMALL, |at, n| Ok(data[at as usize..at as usize + n].to_vec())).unwrap();
            prop_assert_eq!(chunks, chunk_slice(&data, &SMALL).unwrap().chunks);
        }
    }

    #[test]
    fn decode_refuses_truncated_and_garbage() {
        let data = random_bytes(100_000, 10);
        let bytes = chunk_slice(&data, &SMALL).unwrap().encode();
        // Every proper prefix fails, including whole-record ones: their
        // chunks no longer cover the size.
        for len in 0..bytes.len() {
            assert_eq!(Manifest::decode(&bytes[..len]), Err(ManifestError::Corrupt), "prefix {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Manifest::decode(&longer), Err(ManifestError::Corrupt));
        // A zero-length chunk record.
        let mut zero = bytes.clone();
        zero[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Manifest::decode(&zero), Err(ManifestError::Corrupt));
        // Lengths summing past u64::MAX.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 32]);
        for _ in 0..(1 << 10) {
            huge.extend_from_slice(&u32::MAX.to_le_bytes());
            huge.extend_from_slice(&[0; 32]);
        }
        assert_eq!(Manifest::decode(&huge), Err(ManifestError::Corrupt));
        for len in [0, 1, 39, 40, 41, 76, 1000] {
            let _ = Manifest::decode(&random_bytes(len, len as u64));
        }
    }

    #[test]
    fn validate_names_the_fault() {
        let m = chunk_slice(&random_bytes(100_000, 11), &SMALL).unwrap();
        assert!(m.chunks.len() > 3);
        assert_eq!(m.validate(SMALL.max), Ok(()));

        let mut gap = m.clone();
        gap.chunks[2].offset += 1;
        assert_eq!(
            gap.validate(SMALL.max),
            Err(ManifestError::Gap { index: 2, offset: m.chunks[2].offset + 1, expected: m.chunks[2].offset })
        );
        let mut long = m.clone();
        long.chunks[1].len = SMALL.max + 1;
        assert_eq!(long.validate(SMALL.max), Err(ManifestError::BadLen { index: 1, max: SMALL.max }));
        let mut empty = m.clone();
        empty.chunks.last_mut().unwrap().len = 0;
        let last = empty.chunks.len() - 1;
        assert_eq!(empty.validate(SMALL.max), Err(ManifestError::BadLen { index: last, max: SMALL.max }));
        let mut short = m.clone();
        short.size += 1;
        assert_eq!(short.validate(SMALL.max), Err(ManifestError::SizeMismatch { covered: m.size, size: m.size + 1 }));
        assert!(m.validate(SMALL.min - 1).is_err());
    }

    fn small_params() -> impl Strategy<Value = ChunkParams> {
        (64u32..=2048, 0u32..=3, 0u32..=3).prop_map(|(min, avg_shift, max_shift)| {
            let avg = min.next_power_of_two().max(256) << avg_shift;
            let max = (avg << max_shift).max(1024);
            ChunkParams { min, avg, max }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_streaming_equals_slice_and_round_trips(
            data in proptest::collection::vec(any::<u8>(), 0..40_000),
            params in small_params(),
            sizes in proptest::collection::vec(1usize..5000, 1..5),
        ) {
            params.validate().unwrap();
            let whole = chunk_slice(&data, &params).unwrap();
            check_manifest(&whole, &data, &params);
            let streamed = chunk_reader_buffered(short_reads(&data, sizes), &params, 0).unwrap();
            prop_assert_eq!(&streamed, &whole);
            prop_assert_eq!(Manifest::decode(&whole.encode()).unwrap(), whole);
        }

        #[test]
        fn prop_cutter_equals_fastcdc(
            seed in any::<u64>(),
            len in 0usize..200_000,
            zeros in 0usize..100_000,
            params in small_params(),
        ) {
            let mut data = patchy_bytes(len, seed);
            let z = zeros.min(len);
            data[len - z..].fill(0);
            let cutter = Cutter::new(&params).unwrap();
            let mut at = 0;
            while at < data.len() {
                let n = cutter.next_len(&data[at..]);
                prop_assert_eq!(n, reference_cut(&data[at..], &params), "at {}", at);
                at += n;
            }
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = Manifest::decode(&bytes) {
                prop_assert_eq!(m.encode(), bytes);
            }
        }

        #[test]
        fn prop_decode_of_mutated_encoding_never_panics(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = chunk_slice(&data, &SMALL).unwrap().encode();
            for (at, x) in flips {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
            if let Ok(m) = Manifest::decode(&bytes) {
                prop_assert_eq!(m.encode(), bytes);
            }
        }
    }
}
