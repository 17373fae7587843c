//! Assembling a file version from chunks into a temp file beside its target,
//! then moving it into place. Blocking: run on a blocking pool.
//!
//! The temp file is `.NAME.deftpart-<file hash prefix>` in the target's
//! directory, so an interrupted transfer of the same content finds it
//! again (resume), and so the final rename stays on one filesystem.
//!
//! Guarantees:
//! - a chunk is written only after its BLAKE3 matches the manifest;
//! - chunks are reused, verified, from a partial temp file (resume) and from
//!   the current version of the target (delta), so only the rest is needed;
//! - chunks go to the disk direct, around the page cache
//!   ([`crate::direct`]): nothing reads them back, and on a virtual machine
//!   fresh page-cache pages cost more than the disk; what does go through
//!   the page cache (the partial blocks at chunk edges) is written out as
//!   it accumulates ([`crate::flush`]), so the closing fsync has little
//!   left to write;
//! - `finish` fsyncs the temp file, renames it over the target and fsyncs
//!   the directory: a reader sees the old file or the new one, never a mix,
//!   and a crash never leaves a partial file under the final name. Every
//!   chunk was checked against the manifest, whose file hash commits to the
//!   chunk list ([`crate::chunk::file_hash`]): there is no second pass over
//!   the whole file;
//! - except on a serving node, for a large file whose new version keeps
//!   most chunks at their offsets ([`Patching`]): there the temp file holds
//!   only the changed ranges, and `finish` patches the target in place
//!   under a journal ([`super::patch`], which says what that guarantees).

use crate::chunk::{ChunkRef, Manifest};
use crate::direct::DirectWrites;
use crate::hash::Hash;
use crate::share::TEMP_MARKER;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("chunk {index} does not match its hash")]
    HashMismatch { index: u32 },
    #[error("chunk {index} is not part of this file (it has {count} chunks)")]
    NoSuchChunk { index: u32, count: usize },
    #[error("chunk {index} has {got} bytes, the manifest says {expected}")]
    WrongSize { index: u32, got: usize, expected: u32 },
    #[error("{path}: {missing} chunks are still missing; nothing was replaced")]
    Incomplete { path: PathBuf, missing: usize },
    #[error("{0}: target has no file name")]
    NoFileName(PathBuf),
    #[error("{0} changed here while the new version arrived; nothing was replaced")]
    Changed(PathBuf),
    #[error("chunks sent ahead: {0}")]
    Ahead(String),
}

impl AssembleError {
    /// A file or directory it works in is gone: the target's directory was
    /// removed or moved while the file was assembled.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AssembleError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The target is no longer the version a patch was prepared against.
    pub fn is_changed(&self) -> bool {
        matches!(self, AssembleError::Changed(_))
    }

    /// The file system cannot hold the path (past PATH_MAX or NAME_MAX).
    pub fn is_name_too_long(&self) -> bool {
        matches!(self, AssembleError::Io { source, .. } if source.raw_os_error() == Some(libc::ENAMETOOLONG))
    }

    /// The file system has no room for the file.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, AssembleError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// What writing a chunk achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored; more chunks are missing.
    Stored,
    /// Already present (a duplicate or a retransmission).
    Duplicate,
    /// Stored, and every chunk is now present.
    Complete,
}

pub struct Assembly {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    manifest: Manifest,
    have: Mutex<Vec<bool>>,
    missing: AtomicUsize,
    /// Indices of chunks sharing a hash: one arrival fills them all.
    same: HashMap<Hash, Vec<u32>>,
    /// Bytes reused from the temp file and the old version.
    pub reused_bytes: u64,
    /// The complete file's metadata, taken just before its rename.
    finished: std::sync::OnceLock<std::fs::Metadata>,
    /// Starts the disk writing the temp file while chunks arrive.
    writeback: crate::flush::EarlyWriteback,
    /// Chunks go to the disk direct, around the page cache.
    direct: DirectWrites,
    /// When replacing a file: its directory's mtime before and after the
    /// temp file was made (see [`Assembly::finish`]).
    dir_times: Option<(SystemTime, SystemTime)>,
    /// Set when the target is patched in place rather than replaced.
    patch: Option<Patch>,
    /// Chunks that would go into an empty temp file: all of them, or for a
    /// patch those not kept in place.
    fresh: usize,
}

/// Patch a large target in place rather than replace it, when its new
/// version keeps most of its chunks where they are ([`super::patch`]).
#[derive(Debug, Clone)]
pub struct Patching {
    /// Where the journals go (`<home>/patches`).
    pub journals: PathBuf,
    /// Smallest file, old and new, that is patched.
    pub min: u64,
    /// The size, mtime and inode `base` (the target's manifest) was found
    /// valid for: the kept chunks are trusted to be there only while the
    /// file still has them, as in the index's quick check.
    pub base_stamp: crate::index::Stamp,
    /// The mtime the new version gets (None: now).
    pub mtime_ns: Option<i64>,
}

/// Chunks a patch keeps: at least this share of the new version's bytes
/// (1 / KEEP_SHARE) must stay in place, or the file is replaced.
const KEEP_SHARE: u64 = 2;

/// A patch in place: the temp file holds `ranges` of the new version,
/// which are written into the target, found as `was` at prepare.
struct Patch {
    journals: PathBuf,
    ranges: Vec<(u64, u64)>,
    was: Seen,
}

/// What a patch checks is unchanged between prepare and finish: the
/// index's stamp, plus the ctime (which every write moves and nobody can
/// set) and the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    stamp: crate::index::Stamp,
    ctime_ns: i64,
    dev: u64,
}

impl Seen {
    fn of(meta: &std::fs::Metadata) -> Seen {
        use std::os::unix::fs::MetadataExt;
        Seen { stamp: crate::index::Stamp::of(meta), ctime_ns: crate::index::ctime_ns(meta), dev: meta.dev() }
    }
}

/// Patches are finished one at a time (a few milliseconds each), so that
/// two pushes to one target never interleave their ranges.
static FINISHING: Mutex<()> = Mutex::new(());

/// Which chunks of `manifest` a patch of `target` (whose content is
/// `base`) would keep in place, and the patch; None when the target is to
/// be replaced instead.
fn patch_plan(target: &Path, manifest: &Manifest, base: &Manifest, patching: &Patching) -> Option<(Vec<bool>, Patch)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(target).ok()?;
    let seen = Seen::of(&meta);
    if !meta.is_file() || meta.len() != base.size || meta.len() < patching.min || manifest.size < patching.min {
        return None;
    }
    // The manifest must describe the file as it is now.
    if seen.stamp != patching.base_stamp {
        return None;
    }
    // A second name (a hard link, maybe outside the share) would see the
    // change too: a replacement leaves it alone.
    if meta.nlink() != 1 {
        return None;
    }
    // Setting the mode and mtime needs the owner (a rename does not).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && meta.uid() != euid {
        return None;
    }
    // The patched file must not keep the stamp of the old version, or the
    // index could take one for the other.
    if manifest.size == meta.len() && patching.mtime_ns == Some(seen.stamp.mtime_ns) {
        return None;
    }
    let at: HashMap<u64, &crate::chunk::ChunkRef> = base.chunks.iter().map(|c| (c.offset, c)).collect();
    let keep: Vec<bool> = manifest.chunks.iter().map(|c| at.get(&c.offset).is_some_and(|b| b.hash == c.hash && b.len == c.len)).collect();
    let kept: u64 = manifest.chunks.iter().zip(&keep).filter(|(_, k)| **k).map(|(c, _)| u64::from(c.len)).sum();
    if kept < manifest.size / KEEP_SHARE {
        return None;
    }
    // A file this node may not write is replaced (as the rename can).
    OpenOptions::new().write(true).open(target).ok()?;
    // What is written: the chunks not kept, in runs.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for c in manifest.chunks.iter().zip(&keep).filter(|(_, k)| !**k).map(|(c, _)| c) {
        match ranges.last_mut() {
            Some(r) if r.0 + r.1 == c.offset => r.1 += u64::from(c.len),
            _ => ranges.push((c.offset, u64::from(c.len))),
        }
    }
    Some((keep, Patch { journals: patching.journals.clone(), ranges, was: seen }))
}

/// Delta: copy into `file` the chunks of `wanted` (index, chunk) that the
/// file `base.0`, whose manifest is `base.1`, already has, in runs of
/// chunks that sit at the same distance in both files (all of them, for an
/// edit in place). Each is hashed in memory between the read and the
/// write, and one that does not match (the old file changed behind the
/// index) is left out: the sender sends it. Returns the indices copied.
/// `target` names the transfer in the log.
fn reuse_from(
    base: (&Path, &Manifest),
    wanted: &[(usize, ChunkRef)],
    file: &File,
    direct: &DirectWrites,
    target: &Path,
) -> std::io::Result<Vec<usize>> {
    let (path, base) = base;
    let Ok(old) = File::open(path) else { return Ok(Vec::new()) };
    let old_direct = crate::direct::open_direct_read(path);
    let old_len = old.metadata().map(|m| m.len()).unwrap_or(0);
    let by_hash: HashMap<Hash, (u64, u32)> = base.chunks.iter().map(|c| (c.hash, (c.offset, c.len))).collect();
    // The runs to copy, and the chunks they carry (with their index in the
    // new manifest).
    let mut runs: Vec<Run> = Vec::new();
    let mut copied: Vec<usize> = Vec::new();
    let mut chunks: Vec<ChunkRef> = Vec::new();
    for &(i, c) in wanted {
        let Some(&(offset, len)) = by_hash.get(&c.hash) else { continue };
        if len != c.len || offset + len as u64 > old_len {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.from + r.len == offset && r.to + r.len == c.offset => {
                r.len += len as u64;
                r.count += 1;
            }
            _ => runs.push(Run { from: offset, to: c.offset, len: len as u64, first: chunks.len(), count: 1 }),
        }
        copied.push(i);
        chunks.push(c);
    }
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    let (ok, cached) = copy_verified((&old, old_direct.as_ref()), &chunks, &runs, file, direct)?;
    if cached > 0 {
        // The cached edges are dirty pages the final fsync would write all
        // at once: start writing them now.
        crate::flush::start_writeback(file);
    }
    let stale = ok.iter().filter(|v| !**v).count();
    if stale > 0 {
        tracing::warn!(path = %target.display(), stale, "chunks of the old version no longer match its index; they are fetched instead");
    }
    Ok(copied.into_iter().zip(ok).filter(|(_, good)| *good).map(|(i, _)| i).collect())
}

/// A stretch of the old version that sits at one distance from its place
/// in the new one: `len` bytes from `from` go to `to`, carrying the reused
/// chunks `first..first + count` (indices into the list of copied chunks).
#[derive(Debug, Clone, Copy)]
struct Run {
    from: u64,
    to: u64,
    len: u64,
    first: usize,
    count: usize,
}

/// Bytes of the old version read, checked and written at a time.
const PIECE: u64 = 8 << 20;

/// Copy the reused chunks `chunks` from `old` into `file` along `runs`,
/// each checked against its hash first; true for each chunk copied, false
/// for one that no longer matches (the old file changed behind the index).
/// Reads the old version from the page cache when it is there and direct
/// otherwise, writes direct ([`crate::direct`]), and works on two threads
/// when there is much. Returns, beside, the bytes written through the page
/// cache.
fn copy_verified(
    old: (&File, Option<&File>),
    chunks: &[crate::chunk::ChunkRef],
    runs: &[Run],
    file: &File,
    direct: &DirectWrites,
) -> std::io::Result<(Vec<bool>, u64)> {
    // Cut the runs into pieces of whole chunks, at most PIECE bytes each
    // (or one chunk, if larger).
    let mut pieces: Vec<Run> = Vec::new();
    for run in runs {
        let mut piece = Run { from: run.from, to: run.to, len: 0, first: run.first, count: 0 };
        for (k, c) in chunks[run.first..run.first + run.count].iter().enumerate() {
            if piece.count > 0 && piece.len + u64::from(c.len) > PIECE {
                let next = Run { from: piece.from + piece.len, to: piece.to + piece.len, len: 0, first: run.first + k, count: 0 };
                pieces.push(std::mem::replace(&mut piece, next));
            }
            piece.len += u64::from(c.len);
            piece.count += 1;
        }
        if piece.count > 0 {
            pieces.push(piece);
        }
    }
    // One worker: every `step`-th piece from `start`; (chunk, ok) pairs.
    let work = |start: usize, step: usize| -> std::io::Result<(Vec<(usize, bool)>, u64)> {
        let mut buf = crate::direct::AlignedBuf::new(PIECE as usize + 2 * crate::direct::BLOCK);
        let mut out = Vec::new();
        let mut cached = 0;
        for piece in pieces.iter().skip(start).step_by(step) {
            let bytes = crate::direct::read_uncached(old.0, old.1, &mut buf, piece.from, piece.len as usize)?;
            // Check each chunk, then write each stretch of good ones.
            let mut good_from: Option<u64> = None;
            let mut at = 0u64;
            for (k, chunk) in chunks.iter().enumerate().skip(piece.first).take(piece.count) {
                let len = u64::from(chunk.len);
                let ok = at + len <= bytes.len() as u64 && Hash::of(&bytes[at as usize..(at + len) as usize]) == chunk.hash;
                out.push((k, ok));
                match (ok, good_from) {
                    (true, None) => good_from = Some(at),
                    (false, Some(s)) => {
                        cached += direct.write_at(file, &bytes[s as usize..at as usize], piece.to + s)?;
                        good_from = None;
                    }
                    _ => {}
                }
                at += len;
            }
            if let Some(s) = good_from {
                cached += direct.write_at(file, &bytes[s as usize..at as usize], piece.to + s)?;
            }
        }
        Ok((out, cached))
    };
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let parts = if total >= 2 * PIECE {
        let (a, b) = crate::chunk::on_two_threads(|| work(0, 2), || work(1, 2))?;
        vec![a?, b?]
    } else {
        vec![work(0, 1)?]
    };
    let mut ok = vec![false; chunks.len()];
    let mut cached = 0;
    for (pairs, c) in parts {
        cached += c;
        for (k, good) in pairs {
            ok[k] = good;
        }
    }
    Ok((ok, cached))
}

/// Runs of zeros in a new version (a sparse file's holes, [`crate::chunk::zero_chunks`]):
/// when they add up to [`HOLES_MIN`], a new temp file is made sparse and
/// they are left as holes, neither sent nor written.
struct Holes {
    zero: Vec<bool>,
    kept: bool,
}

/// Bytes of zero chunks from which a new version is written sparse rather
/// than preallocated.
const HOLES_MIN: u64 = 16 << 20;

impl Holes {
    fn of(manifest: &Manifest) -> Holes {
        let zero = crate::chunk::zero_chunks(&manifest.chunks);
        let bytes: u64 = manifest.chunks.iter().zip(&zero).filter(|(_, z)| **z).map(|(c, _)| u64::from(c.len)).sum();
        Holes { zero, kept: bytes >= HOLES_MIN }
    }

    fn count(&self) -> usize {
        self.zero.iter().filter(|z| **z).count()
    }

    /// The byte ranges of the other chunks, runs of neighbours merged.
    fn data_runs(&self, manifest: &Manifest) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (c, _) in manifest.chunks.iter().zip(&self.zero).filter(|(_, z)| !**z) {
            match runs.last_mut() {
                Some(last) if last.1 == c.offset => last.1 = c.end(),
                _ => runs.push((c.offset, c.end())),
            }
        }
        runs
    }

    /// Mark as there the chunks of zeros that lie in holes of `file` (a
    /// hole reads as zeros, whoever made it); returns their bytes.
    fn keep_in(&self, file: &File, manifest: &Manifest, have: &mut [bool]) -> std::io::Result<u64> {
        let gaps = crate::chunk::hole_ranges(file, 0, manifest.size)?;
        let mut kept = 0;
        for (i, c) in manifest.chunks.iter().enumerate() {
            let k = gaps.partition_point(|&(_, end)| end <= c.offset);
            if self.zero[i] && !have[i] && gaps.get(k).is_some_and(|&(start, end)| start <= c.offset && c.end() <= end) {
                have[i] = true;
                kept += u64::from(c.len);
            }
        }
        Ok(kept)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io { path: path.to_path_buf(), source }
}

/// The directory `path` is in.
fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Set the directory `d` (at `dir`) back to mtime `t`, if given: a new
/// version of a file changes the file, not its directory.
fn put_back_dir_time(d: &File, dir: &Path, t: Option<SystemTime>) {
    if let Some(Err(e)) = t.map(|t| d.set_modified(t)) {
        tracing::debug!(dir = %dir.display(), "directory mtime not restored: {e}");
    }
}

/// The mtime of the directory `path` is in.
fn dir_mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir_of(path)).and_then(|m| m.modified()).ok()
}

/// The name every temp file of a transfer to a file named `name` starts with.
/// A temp name must fit NAME_MAX (255 bytes) as the file's does: past
/// [`TEMP_NAME_ROOM`] bytes, the name is cut at a character boundary and
/// followed by a hash of the whole, so two long names sharing a start
/// still get distinct temp files.
fn temp_prefix(name: &str) -> String {
    if name.len() <= TEMP_NAME_ROOM {
        return format!(".{name}{TEMP_MARKER}");
    }
    let tag = crate::hash::Hash::of(name.as_bytes()).short();
    let mut cut = TEMP_NAME_ROOM - tag.len() - 1;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}~{tag}{TEMP_MARKER}", &name[..cut])
}

/// The most bytes of a file's name its temp name holds whole: 255, less
/// the leading dot, the marker and the 16 hex digits of the version.
const TEMP_NAME_ROOM: usize = 255 - 1 - TEMP_MARKER.len() - 16;

/// The temp file of a transfer of `file_hash` to `target`.
pub fn temp_path(target: &Path, file_hash: &Hash) -> Result<PathBuf, AssembleError> {
    let name = target.file_name().and_then(|n| n.to_str()).ok_or_else(|| AssembleError::NoFileName(target.to_path_buf()))?;
    Ok(target.with_file_name(format!("{}{}", temp_prefix(name), file_hash.short())))
}

/// Chunks of a file still being written, sent before its push (AHEAD,
/// PROTOCOL.md 8.6): each is verified against its hash and written at its
/// offset into a temp file beside the target (`.NAME.deftpart-ahead-…`),
/// or copied there from the target's current version when that has it.
/// The push that names them takes the file over as its own temp file and
/// keeps the chunks its manifest has at the same place; the rest of the
/// file is written as for any push. Dropped untaken, the file is deleted.
pub struct Ahead {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    direct: DirectWrites,
    writeback: crate::flush::EarlyWriteback,
    /// The chunks declared, by index, and whether each is in the file,
    /// verified.
    chunks: Mutex<Vec<(ChunkRef, bool)>>,
    /// Held (shared) by every write into the file; taken (exclusive) when
    /// a push takes the file over, which no write may follow.
    taken: std::sync::RwLock<bool>,
}

impl Ahead {
    /// A new, empty file of chunks sent ahead for `target`, named after `id`.
    pub fn create(target: &Path, id: &str) -> Result<Ahead, AssembleError> {
        let name = target.file_name().and_then(|n| n.to_str()).ok_or_else(|| AssembleError::NoFileName(target.to_path_buf()))?;
        let temp = target.with_file_name(format!("{}ahead-{}", temp_prefix(name), Hash::of(id.as_bytes()).short()));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&temp).map_err(io(&temp))?;
        Ok(Ahead {
            target: target.to_path_buf(),
            direct: DirectWrites::open(&temp),
            temp,
            file,
            writeback: Default::default(),
            chunks: Mutex::new(Vec::new()),
            taken: std::sync::RwLock::new(false),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Declare the next chunks, `first..`: they must follow the chunks
    /// declared before, index after index and byte after byte. Those the
    /// file `base` (its path and manifest) has are copied from it, checked,
    /// or left where they are when it has them at the same place; the
    /// indices of the others, which the sender is to send, are returned.
    /// Blocking.
    pub fn declare(&self, first: u32, new: &[ChunkRef], base: Option<(&Path, &Manifest)>) -> Result<Vec<u32>, AssembleError> {
        let taken = self.taken.read().unwrap_or_else(|p| p.into_inner());
        if *taken {
            return Err(AssembleError::Ahead("already taken by a push".into()));
        }
        let wanted: Vec<(usize, ChunkRef)> = {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            if first as usize != chunks.len() {
                return Err(AssembleError::Ahead(format!("FROM:{first}, but {} chunks were declared before", chunks.len())));
            }
            let mut end = chunks.last().map_or(0, |(c, _)| c.end());
            for c in new {
                if c.offset != end || c.len == 0 {
                    return Err(AssembleError::Ahead(format!("a chunk at offset {}, where the chunks before end at {end}", c.offset)));
                }
                end = c.end();
            }
            // Refused if the disk cannot hold them, as a push's temp file is.
            let before = chunks.last().map_or(0, |(c, _)| c.end());
            crate::direct::extend(&self.file, before, end).map_err(io(&self.temp))?;
            let from = chunks.len();
            chunks.extend(new.iter().map(|c| (*c, false)));
            new.iter().enumerate().map(|(k, c)| (from + k, *c)).collect()
        };
        // A chunk the base has at the same place is not copied: if the
        // push turns out to be an edit in place, the target is patched and
        // keeps it where it is; if not, the push copies it then.
        let in_place: std::collections::HashSet<usize> = match base {
            Some((_, m)) => {
                let at: HashMap<u64, &ChunkRef> = m.chunks.iter().map(|c| (c.offset, c)).collect();
                wanted.iter().filter(|(_, c)| at.get(&c.offset).is_some_and(|b| *b == c)).map(|(i, _)| *i).collect()
            }
            None => Default::default(),
        };
        let moved: Vec<(usize, ChunkRef)> = wanted.iter().filter(|(i, _)| !in_place.contains(i)).copied().collect();
        let copied = match base {
            Some(base) if !moved.is_empty() => reuse_from(base, &moved, &self.file, &self.direct, &self.target).map_err(io(&self.temp))?,
            _ => Vec::new(),
        };
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        for &i in &copied {
            chunks[i].1 = true;
        }
        Ok(moved.iter().map(|(i, _)| *i).filter(|&i| !chunks[i].1).map(|i| i as u32).collect())
    }

    /// The chunk declared at `index`.
    pub fn chunk(&self, index: u32) -> Option<ChunkRef> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).get(index as usize).map(|(c, _)| *c)
    }

    /// Verify chunk `index` and write it at its offset. Blocking.
    pub fn write_chunk(&self, index: u32, data: &[u8]) -> Result<(), AssembleError> {
        let declared = self.chunks.lock().unwrap_or_else(|p| p.into_inner()).len();
        let chunk = self.chunk(index).ok_or(AssembleError::NoSuchChunk { index, count: declared })?;
        if data.len() != chunk.len as usize {
            return Err(AssembleError::WrongSize { index, got: data.len(), expected: chunk.len });
        }
        if Hash::of(data) != chunk.hash {
            return Err(AssembleError::HashMismatch { index });
        }
        let taken = self.taken.read().unwrap_or_else(|p| p.into_inner());
        if *taken {
            return Err(AssembleError::Ahead("already taken by a push".into()));
        }
        let cached = self.direct.write_at(&self.file, data, chunk.offset).map_err(io(&self.temp))?;
        self.writeback.wrote(&self.file, cached);
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())[index as usize].1 = true;
        Ok(())
    }

    /// Delete the file now (its target was removed, or moved away), and
    /// refuse writes from here on.
    pub fn discard(&self) {
        let mut taken = self.taken.write().unwrap_or_else(|p| p.into_inner());
        if !*taken {
            *taken = true;
            let _ = std::fs::remove_file(&self.temp);
        }
    }

    /// Move the file to `temp` for a push, once: the chunks verified in it.
    fn take_into(&self, temp: &Path) -> Option<Vec<ChunkRef>> {
        let mut taken = self.taken.write().unwrap_or_else(|p| p.into_inner());
        if *taken {
            return None;
        }
        *taken = true;
        if let Err(e) = std::fs::rename(&self.temp, temp) {
            tracing::debug!(path = %self.temp.display(), "chunks sent ahead not used: {e}");
            let _ = std::fs::remove_file(&self.temp);
            return None;
        }
        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        Some(chunks.iter().filter(|(_, ok)| *ok).map(|(c, _)| *c).collect())
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if !*self.taken.read().unwrap_or_else(|p| p.into_inner()) {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Whether `temp` is a temp file of a transfer to `target` (of any version).
pub fn is_temp_of(temp: &Path, target: &Path) -> bool {
    let (Some(t), Some(name)) = (temp.file_name().and_then(|n| n.to_str()), target.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    temp.parent() == target.parent() && t.starts_with(&temp_prefix(name))
}

impl Assembly {
    /// Open (or resume) the temp file for `manifest` and reuse what is
    /// already local: valid chunks of the temp file, then chunks of `base`
    /// (the manifest of the target's current content) copied from the target.
    pub fn prepare(target: &Path, manifest: Manifest, base: Option<&Manifest>) -> Result<Assembly, AssembleError> {
        Self::prepare_from(target, manifest, base.map(|m| (target, m)), None, None)
    }

    /// Like [`Assembly::prepare`], with chunks reused from another file
    /// (`base`: its path and manifest), e.g. the file a temp name is saved
    /// beside (`x.blend` for `x.blend@`), and with `patching`, the target
    /// patched in place when its new version allows, and with `ahead`, the
    /// chunks sent before the push ([`Ahead`]): its temp file becomes this
    /// one, unless the target is patched or an earlier attempt's temp file
    /// is there to resume.
    pub fn prepare_from(
        target: &Path,
        manifest: Manifest,
        base: Option<(&Path, &Manifest)>,
        patching: Option<&Patching>,
        ahead: Option<&Ahead>,
    ) -> Result<Assembly, AssembleError> {
        let temp = temp_path(target, &manifest.file_hash)?;
        let holes = Holes::of(&manifest);
        let plan = match (base, patching) {
            (Some((path, base)), Some(p)) if path == target => patch_plan(target, &manifest, base, p),
            _ => None,
        };
        // A patch writes every chunk that is not in place, zeros too: when
        // runs of zeros moved (a hole punched before them shifts their
        // cuts), a new sparse file is made instead.
        let plan = plan.filter(|(keep, _)| {
            let moved: u64 = manifest
                .chunks
                .iter()
                .zip(keep)
                .zip(&holes.zero)
                .filter(|((_, k), z)| !**k && **z)
                .map(|((c, _), _)| u64::from(c.len))
                .sum();
            moved < HOLES_MIN
        });
        let ahead = match ahead {
            Some(a) if plan.is_none() && a.target == target && std::fs::symlink_metadata(&temp).is_err() => a.take_into(&temp),
            _ => None,
        };
        let replacing = std::fs::symlink_metadata(target).is_ok_and(|m| m.is_file());
        let before = replacing.then(|| dir_mtime(target)).flatten();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&temp).map_err(io(&temp))?;
        let dir_times = before.zip(dir_mtime(target));
        let existing = file.metadata().map_err(io(&temp))?.len();
        let mut have = vec![false; manifest.chunks.len()];
        let mut reused = 0u64;
        let mut same: HashMap<Hash, Vec<u32>> = HashMap::new();
        for (i, c) in manifest.chunks.iter().enumerate() {
            same.entry(c.hash).or_default().push(i as u32);
        }
        // A patch keeps the target's chunks that stay in place: the temp
        // file holds the others only.
        if let Some((keep, _)) = &plan {
            for (i, c) in manifest.chunks.iter().enumerate() {
                if keep[i] {
                    have[i] = true;
                    reused += u64::from(c.len);
                }
            }
        }
        if let Some(sent) = &ahead {
            // Chunks sent ahead, each verified as it was written: those the
            // manifest has at the same place are there.
            let at: HashMap<u64, &ChunkRef> = sent.iter().map(|c| (c.offset, c)).collect();
            for (i, c) in manifest.chunks.iter().enumerate() {
                if at.get(&c.offset).is_some_and(|a| a.len == c.len && a.hash == c.hash) {
                    have[i] = true;
                    reused += u64::from(c.len);
                }
            }
            if existing != manifest.size {
                file.set_len(manifest.size).map_err(io(&temp))?;
            }
            // The runs of zeros past what was sent (a file made large by a
            // truncate after it was written) stay holes.
            if holes.kept {
                reused += holes.keep_in(&file, &manifest, &mut have).map_err(io(&temp))?;
            }
        } else if existing == manifest.size && existing > 0 {
            // Resume: keep the chunks an earlier attempt already wrote, and
            // the runs of zeros it left as holes.
            if holes.kept {
                reused += holes.keep_in(&file, &manifest, &mut have).map_err(io(&temp))?;
            }
            let todo: Vec<usize> = (0..manifest.chunks.len()).filter(|&i| !have[i]).collect();
            let chunks: Vec<crate::chunk::ChunkRef> = todo.iter().map(|&i| manifest.chunks[i]).collect();
            let ok = crate::chunk::verify_chunks(&file, &chunks).map_err(io(&temp))?;
            for (&i, good) in todo.iter().zip(ok) {
                if good {
                    have[i] = true;
                    reused += u64::from(manifest.chunks[i].len);
                }
            }
        } else if plan.is_some() {
            // Sparse: only the changed ranges will hold data.
            file.set_len(0).and_then(|()| file.set_len(manifest.size)).map_err(io(&temp))?;
        } else if holes.kept {
            if let Err(e) = crate::direct::sparse(&file, manifest.size, &holes.data_runs(&manifest)) {
                let _ = std::fs::remove_file(&temp);
                return Err(io(&temp)(e));
            }
            for (i, c) in manifest.chunks.iter().enumerate() {
                if holes.zero[i] {
                    have[i] = true;
                    reused += u64::from(c.len);
                }
            }
        } else if let Err(e) = crate::direct::preallocate(&file, manifest.size) {
            // Nothing in it can be resumed (its size is not the file's).
            let _ = std::fs::remove_file(&temp);
            return Err(io(&temp)(e));
        }
        // Delta: copy the chunks the current version already has, in runs
        // of chunks that sit at the same distance in both files (all of
        // them, for an edit in place). Each is hashed in memory between the
        // read and the write, and one that does not match (the old file
        // changed behind the index) is simply needed from the sender.
        let direct = DirectWrites::open(&temp);
        if let Some(base) = base {
            let wanted: Vec<(usize, ChunkRef)> =
                (0..manifest.chunks.len()).filter(|&i| !have[i]).map(|i| (i, manifest.chunks[i])).collect();
            for i in reuse_from(base, &wanted, &file, &direct, target).map_err(io(&temp))? {
                have[i] = true;
                reused += u64::from(manifest.chunks[i].len);
            }
        }
        let missing = have.iter().filter(|h| !**h).count();
        let fresh = plan.as_ref().map_or(manifest.chunks.len(), |(keep, _)| keep.iter().filter(|k| !**k).count());
        // Chunks of zeros left as holes hold nothing to resume.
        let fresh = if holes.kept && plan.is_none() && ahead.is_none() { fresh - holes.count() } else { fresh };
        let patch = plan.map(|(_, patch)| patch);
        Ok(Assembly {
            target: target.to_path_buf(),
            temp,
            file,
            manifest,
            have: Mutex::new(have),
            missing: AtomicUsize::new(missing),
            same,
            reused_bytes: reused,
            dir_times,
            patch,
            fresh,
            finished: Default::default(),
            writeback: Default::default(),
            direct,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The file's metadata as [`Assembly::finish`] renamed it into place.
    pub fn finished_meta(&self) -> Option<&std::fs::Metadata> {
        self.finished.get()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Indices still missing, ascending. A chunk whose hash repeats is
    /// listed once (the first index): its twins are filled on arrival.
    pub fn needed(&self) -> Vec<u32> {
        let have = self.have.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        self.manifest.chunks.iter().enumerate().filter(|(i, c)| !have[*i] && seen.insert(c.hash)).map(|(i, _)| i as u32).collect()
    }

    /// The temp file holds no chunk: none was received, reused or kept
    /// from an earlier attempt, so there is nothing in it to resume.
    pub fn is_untouched(&self) -> bool {
        self.fresh > 0 && self.missing.load(Ordering::SeqCst) == self.fresh
    }

    /// Delete the temp file (of a transfer given up while untouched).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.temp);
    }

    pub fn is_complete(&self) -> bool {
        self.missing.load(Ordering::SeqCst) == 0
    }

    /// Verify and store one chunk (and its twins).
    pub fn write_chunk(&self, index: u32, data: &[u8]) -> Result<Written, AssembleError> {
        let count = self.manifest.chunks.len();
        let chunk = self.manifest.chunks.get(index as usize).ok_or(AssembleError::NoSuchChunk { index, count })?;
        if data.len() != chunk.len as usize {
            return Err(AssembleError::WrongSize { index, got: data.len(), expected: chunk.len });
        }
        if Hash::of(data) != chunk.hash {
            return Err(AssembleError::HashMismatch { index });
        }
        let twins = self.same.get(&chunk.hash).map(Vec::as_slice).unwrap_or(&[]);
        let todo: Vec<u32> = {
            let have = self.have.lock().unwrap_or_else(|p| p.into_inner());
            twins.iter().copied().filter(|&i| !have[i as usize]).collect()
        };
        if todo.is_empty() {
            return Ok(Written::Duplicate);
        }
        for &i in &todo {
            let offset = self.manifest.chunks[i as usize].offset;
            let cached = self.direct.write_at(&self.file, data, offset).map_err(io(&self.temp))?;
            self.writeback.wrote(&self.file, cached);
        }
        let mut have = self.have.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = 0;
        for &i in &todo {
            if !have[i as usize] {
                have[i as usize] = true;
                newly += 1;
            }
        }
        let before = self.missing.fetch_sub(newly, Ordering::SeqCst);
        Ok(if before == newly && newly > 0 { Written::Complete } else { Written::Stored })
    }

    /// Make the new version durable and visible. `mode` sets permissions
    /// (default: keep the old file's, else 0644), `mtime_ns` the
    /// modification time (default: now).
    pub fn finish(&self, mode: Option<u32>, mtime_ns: Option<i64>) -> Result<PathBuf, AssembleError> {
        let missing = self.missing.load(Ordering::SeqCst);
        if missing > 0 {
            return Err(AssembleError::Incomplete { path: self.target.clone(), missing });
        }
        // Mode and mtime first: the one fsync then makes them durable with
        // the content (set after it, they could be lost with the power).
        let mode = mode.or_else(|| std::fs::metadata(&self.target).ok().map(|m| m.permissions().mode() & 0o7777)).unwrap_or(0o644);
        if let Some(patch) = &self.patch {
            return self.finish_patch(patch, mode, mtime_ns);
        }
        self.file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io(&self.temp))?;
        if let Some(ns) = mtime_ns {
            self.file.set_modified(crate::time::Timestamp(ns).to_system()).map_err(io(&self.temp))?;
        }
        self.file.sync_all().map_err(io(&self.temp))?;
        if let Ok(meta) = self.file.metadata() {
            let _ = self.finished.set(meta);
        }
        let dir = dir_of(&self.target);
        // A new version of an existing file changes the file, not its
        // directory, as a write in place would. Making the temp file and
        // renaming it moved the directory's mtime: it is put back, unless
        // something else changed the directory meanwhile.
        let restore = self.dir_time_to_restore();
        std::fs::rename(&self.temp, &self.target).map_err(io(&self.target))?;
        let d = File::open(dir).map_err(io(dir))?;
        put_back_dir_time(&d, dir, restore);
        d.sync_all().map_err(io(dir))?;
        Ok(self.target.clone())
    }

    /// The directory's mtime from before the temp file was made, unless
    /// something other than this assembly changed the directory since.
    fn dir_time_to_restore(&self) -> Option<SystemTime> {
        self.dir_times.filter(|(_, after)| dir_mtime(&self.target) == Some(*after)).map(|(before, _)| before)
    }

    /// Whether [`Assembly::finish`] patches the target in place.
    pub fn patches(&self) -> bool {
        self.patch.is_some()
    }

    /// [`Assembly::finish`] of a patch: the temp file made durable, the
    /// target checked unchanged, then journalled, patched and fsynced.
    fn finish_patch(&self, patch: &Patch, mode: u32, mtime_ns: Option<i64>) -> Result<PathBuf, AssembleError> {
        let _one_at_a_time = FINISHING.lock().unwrap_or_else(|p| p.into_inner());
        // The temp file and its name are durable before a journal names it.
        self.file.sync_data().map_err(io(&self.temp))?;
        let dir = dir_of(&self.target);
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        let meta = std::fs::symlink_metadata(&self.target).map_err(io(&self.target))?;
        if Seen::of(&meta) != patch.was {
            return Err(AssembleError::Changed(self.target.clone()));
        }
        super::patch::reserve(&self.target, self.manifest.size).map_err(io(&self.target))?;
        let journals = patch.journals.as_path();
        let mut journal = super::patch::Journal {
            target: self.target.clone(),
            inode: patch.was.stamp.inode,
            dev: patch.was.dev,
            old_size: patch.was.stamp.size,
            data: self.temp.clone(),
            ranges: patch.ranges.clone(),
            size: self.manifest.size,
            mode,
            mtime_ns,
            failed: None,
        };
        let written = journal.write(journals).map_err(io(journals))?;
        // Once more if the first attempt fails (an interrupted write, a
        // passing error of the disk): the file is half-patched until one
        // succeeds.
        match journal.apply().or_else(|_| journal.apply()) {
            Ok(meta) => {
                let _ = self.finished.set(meta);
            }
            Err(e) => {
                // The journal stays, marked with what the file looks like
                // now: the next start applies it again only if nothing
                // changed the file since.
                journal.failed = std::fs::symlink_metadata(&self.target).ok().map(|m| crate::index::Stamp::of(&m));
                if let Err(e) = journal.write(journals) {
                    tracing::error!(journal = %written.display(), "marking the failed patch: {e}");
                }
                tracing::error!(target = %self.target.display(), journal = %written.display(), "patching failed ({e}): the file holds part of its new version; the journal is applied again at the next start unless the file changes first");
                return Err(io(&self.target)(e));
            }
        }
        // The temp file came and goes: the directory's mtime is put back,
        // as for a replacement.
        let restore = self.dir_time_to_restore();
        super::patch::done(&written, &self.temp).map_err(io(&written))?;
        if let Ok(d) = File::open(dir) {
            put_back_dir_time(&d, dir, restore);
        }
        Ok(self.target.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_of_the_longest_names_fit_name_max_and_stay_distinct() {
        let h = Hash::of(b"version");
        let a = format!("d/{}a", "é".repeat(127));
        let b = format!("d/{}b", "é".repeat(127));
        let (ta, tb) = (temp_path(Path::new(&a), &h).unwrap(), temp_path(Path::new(&b), &h).unwrap());
        for (t, target) in [(&ta, &a), (&tb, &b)] {
            let n = t.file_name().unwrap().len();
            assert!(n <= 255, "{} has {n} bytes", t.display());
            assert!(is_temp_of(t, Path::new(target)));
        }
        assert_ne!(ta, tb);
        assert!(!is_temp_of(&ta, Path::new(&b)));
        // Short names keep the form partial files already on disk have.
        let short = temp_path(Path::new("d/x.bin"), &h).unwrap();
        assert_eq!(short.file_name().unwrap().to_str().unwrap(), format!(".x.bin{TEMP_MARKER}{}", h.short()));
    }
    use crate::chunk::{chunk_slice, ChunkParams};
    use crate::testutil::{random_bytes, TestDir};

    const SMALL: ChunkParams = ChunkParams { min: 1024, avg: 4096, max: 16 * 1024 };

    /// Send what `asm` still needs, from `data`.
    fn complete(asm: &Assembly, data: &[u8]) -> usize {
        let need = asm.needed();
        for &i in &need {
            let c = asm.manifest().chunks[i as usize];
            asm.write_chunk(i, &data[c.offset as usize..c.end() as usize]).unwrap();
        }
        need.len()
    }

    #[test]
    fn runs_of_zeros_are_neither_needed_nor_written_and_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = TestDir::new("asm-holes");
        let target = dir.path().join("disk.img");
        // 40 MiB: 1 MiB of data, 32 MiB of zeros, 7 MiB of data.
        let mut data = vec![0u8; 40 << 20];
        data[..1 << 20].copy_from_slice(&random_bytes(1 << 20, 1));
        data[33 << 20..].copy_from_slice(&random_bytes(7 << 20, 2));
        let m = chunk_slice(&data, &ChunkParams::default()).unwrap();
        let asm = Assembly::prepare(&target, m.clone(), None).unwrap();
        let need = asm.needed();
        let needed_bytes: u64 = need.iter().map(|&i| u64::from(m.chunks[i as usize].len)).sum();
        assert!(needed_bytes < 10 << 20, "{needed_bytes} bytes needed for 8 MiB of data");
        assert!(!asm.is_untouched() || !need.is_empty());
        complete(&asm, &data);
        asm.finish(None, None).unwrap();
        assert!(std::fs::read(&target).unwrap() == data, "the content differs");
        let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
        assert!(allocated < 12 << 20, "{allocated} bytes allocated for 8 MiB of data");
        // An interrupted attempt resumes with its holes, reading none of them.
        let again = dir.path().join("again.img");
        let first = Assembly::prepare(&again, m.clone(), None).unwrap();
        let half = &first.needed()[..need.len() / 2];
        for &i in half {
            let c = m.chunks[i as usize];
            first.write_chunk(i, &data[c.offset as usize..c.end() as usize]).unwrap();
        }
        drop(first);
        let resumed = Assembly::prepare(&again, m.clone(), None).unwrap();
        assert_eq!(resumed.needed().len(), need.len() - half.len());
        complete(&resumed, &data);
        resumed.finish(None, None).unwrap();
        assert!(std::fs::read(&again).unwrap() == data, "the resumed content differs");
    }

    #[test]
    fn an_edit_in_place_reuses_the_old_version_and_needs_only_the_new_chunks() {
        let (_dir, target, old, base) = old_file("edit", 300_000, 1);
        let mut new = old.clone();
        new[150_000..151_000].fill(9);
        let m = chunk_slice(&new, &SMALL).unwrap();
        let asm = Assembly::prepare(&target, m.clone(), Some(&base)).unwrap();
        let sent = complete(&asm, &new);
        assert!(sent <= 4, "{sent} chunks sent for a 1000-byte edit");
        asm.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
    }

    #[test]
    fn temp_files_are_known_by_their_target() {
        let target = Path::new("/s/d/f.bin");
        let temp = temp_path(target, &Hash::of(b"v1")).unwrap();
        assert!(is_temp_of(&temp, target));
        assert!(!is_temp_of(&temp, Path::new("/s/d/f")), "a name that is a prefix of another");
        assert!(!is_temp_of(&temp, Path::new("/s/e/f.bin")), "another directory");
        assert!(!is_temp_of(target, target));
    }

    #[test]
    fn a_directory_moved_away_during_assembly_is_reported_as_not_found() {
        let dir = TestDir::new("moved");
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let target = dir.path().join("d/f");
        let data = random_bytes(50_000, 4);
        let asm = Assembly::prepare(&target, chunk_slice(&data, &SMALL).unwrap(), None).unwrap();
        complete(&asm, &data);
        std::fs::rename(dir.path().join("d"), dir.path().join("e")).unwrap();
        let e = asm.finish(None, None).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(!target.exists() && !dir.path().join("e/f").exists(), "nothing placed under either name");
    }

    #[test]
    fn finish_gives_the_mode_and_mtime_asked_for_and_leaves_the_directory_time() {
        let dir = TestDir::new("times");
        let target = dir.path().join("f");
        std::fs::write(&target, b"old").unwrap();
        let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
        File::open(dir.path()).unwrap().set_modified(past).unwrap();
        let data = random_bytes(50_000, 3);
        let asm = Assembly::prepare(&target, chunk_slice(&data, &SMALL).unwrap(), None).unwrap();
        complete(&asm, &data);
        asm.finish(Some(0o600), Some(1_600_000_000_123_456_789)).unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(crate::share::mtime_ns(&meta), 1_600_000_000_123_456_789);
        assert_eq!(std::fs::metadata(dir.path()).unwrap().modified().unwrap(), past, "a replacement moved the directory's mtime");
        // Times no file system keeps are an error, not a panic.
        for extreme in [i64::MIN, i64::MAX] {
            let asm = Assembly::prepare(&target, chunk_slice(&data, &SMALL).unwrap(), None).unwrap();
            complete(&asm, &data);
            let _ = asm.finish(None, Some(extreme));
        }
    }

    #[test]
    fn a_base_that_changed_behind_the_index_is_caught_and_its_chunk_fetched() {
        let dir = TestDir::new("stale");
        let target = dir.path().join("f");
        let old = random_bytes(300_000, 2);
        let base = chunk_slice(&old, &SMALL).unwrap();
        // The file changed behind the index's back: same size, other bytes.
        let mut behind = old.clone();
        behind[10..20].fill(0);
        std::fs::write(&target, &behind).unwrap();
        let mut new = old.clone();
        new[200_000..200_100].fill(7);
        let m = chunk_slice(&new, &SMALL).unwrap();

        let asm = Assembly::prepare(&target, m.clone(), Some(&base)).unwrap();
        assert!(asm.needed().contains(&0), "the changed first chunk must be asked for: {:?}", asm.needed());
        assert!(matches!(asm.finish(None, None), Err(AssembleError::Incomplete { .. })));
        assert_eq!(std::fs::read(&target).unwrap(), behind, "nothing replaced the target");
        assert!(complete(&asm, &new) <= 6);
        asm.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
    }

    /// A test dir holding a file `f` of `len` random bytes, and its manifest.
    fn old_file(tag: &str, len: usize, seed: u64) -> (TestDir, PathBuf, Vec<u8>, Manifest) {
        let dir = TestDir::new(tag);
        let target = dir.path().join("f");
        let old = random_bytes(len, seed);
        std::fs::write(&target, &old).unwrap();
        let base = chunk_slice(&old, &SMALL).unwrap();
        (dir, target, old, base)
    }

    /// Patching of the file `f` of `dir` as it is now, journals in `dir`.
    fn patching(dir: &TestDir) -> Patching {
        Patching { journals: dir.path().join("patches"), min: 0, base_stamp: base_stamp(&dir.path().join("f")), mtime_ns: None }
    }

    fn base_stamp(p: &Path) -> crate::index::Stamp {
        crate::index::Stamp::of(&std::fs::metadata(p).unwrap())
    }

    fn inode(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn an_edit_in_place_is_patched_into_the_file_itself() {
        let (dir, target, old, base) = old_file("patch-edit", 400_000, 5);
        let ino = inode(&target);
        let mut new = old.clone();
        new[200_000..201_000].fill(3);
        new.extend_from_slice(&random_bytes(5_000, 6));
        let m = chunk_slice(&new, &SMALL).unwrap();
        let p = patching(&dir);
        let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
        std::fs::create_dir_all(&p.journals).unwrap(); // in the node home, not the share, outside tests
        File::open(dir.path()).unwrap().set_modified(past).unwrap();
        let asm = Assembly::prepare_from(&target, m.clone(), Some((&target, &base)), Some(&p), None).unwrap();
        assert!(asm.patches());
        let temp = temp_path(&target, &m.file_hash).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&temp).unwrap().blocks() * 512 < 100_000, "the temp file is sparse");
        assert!(complete(&asm, &new) <= 5);
        asm.finish(Some(0o600), Some(1_600_000_000_000_000_000)).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
        assert_eq!(inode(&target), ino, "patched, not replaced");
        assert_eq!(asm.finished_meta().unwrap().len(), new.len() as u64);
        assert!(!temp.exists(), "temp file left");
        assert_eq!(std::fs::read_dir(&p.journals).unwrap().count(), 0, "journal left");
        assert_eq!(std::fs::metadata(dir.path()).unwrap().modified().unwrap(), past, "a patch moved the directory's mtime");
        // Shorter again: the tail goes.
        let shorter = &new[..300_000];
        let m2 = chunk_slice(shorter, &SMALL).unwrap();
        let p = patching(&dir);
        let asm = Assembly::prepare_from(&target, m2, Some((&target, &m)), Some(&p), None).unwrap();
        assert!(asm.patches());
        complete(&asm, shorter);
        asm.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), shorter);
    }

    #[test]
    fn a_shifted_new_version_or_a_small_file_is_replaced_not_patched() {
        let (dir, target, old, base) = old_file("patch-shift", 300_000, 7);
        let mut new = b"100 bytes inserted".to_vec();
        new.extend_from_slice(&old);
        let m = chunk_slice(&new, &SMALL).unwrap();
        let p = patching(&dir);
        let asm = Assembly::prepare_from(&target, m.clone(), Some((&target, &base)), Some(&p), None).unwrap();
        assert!(!asm.patches(), "nothing stays in place");
        assert!(complete(&asm, &new) <= 3, "still a delta");
        asm.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
        let mut edit = new.clone();
        edit[5] ^= 1;
        let edited = chunk_slice(&edit, &SMALL).unwrap();
        let prepare = |p: &Patching| Assembly::prepare_from(&target, edited.clone(), Some((&target, &m)), Some(p), None).unwrap().patches();
        assert!(prepare(&patching(&dir)), "an edit in place is patched");
        assert!(!prepare(&Patching { min: 1 << 20, ..patching(&dir) }), "under the minimum size");
        let stale = Patching { base_stamp: crate::index::Stamp { size: 1, ..patching(&dir).base_stamp }, ..patching(&dir) };
        assert!(!prepare(&stale), "the manifest was valid for another state of the file");
        let same_mtime = Patching { mtime_ns: Some(patching(&dir).base_stamp.mtime_ns), ..patching(&dir) };
        assert!(!prepare(&same_mtime), "the patched file would keep the old version's stamp");
        std::fs::hard_link(&target, dir.path().join("second name")).unwrap();
        assert!(!prepare(&patching(&dir)), "a hard link would see the change");
    }

    #[test]
    fn a_patch_whose_target_changed_meanwhile_replaces_nothing() {
        let (dir, target, old, base) = old_file("patch-changed", 300_000, 8);
        let mut new = old.clone();
        new[100..200].fill(1);
        let p = patching(&dir);
        let asm = Assembly::prepare_from(&target, chunk_slice(&new, &SMALL).unwrap(), Some((&target, &base)), Some(&p), None).unwrap();
        complete(&asm, &new);
        let local = random_bytes(300_000, 9);
        std::fs::write(&target, &local).unwrap();
        let e = asm.finish(None, None).unwrap_err();
        assert!(e.is_changed(), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), local, "the local edit is kept");
    }

    #[test]
    fn an_interrupted_patch_resumes_with_the_chunks_it_had() {
        let (dir, target, old, base) = old_file("patch-resume", 400_000, 10);
        let mut new = old.clone();
        new[50_000..60_000].fill(4);
        new[300_000..310_000].fill(5);
        let m = chunk_slice(&new, &SMALL).unwrap();
        let p = patching(&dir);
        let first = Assembly::prepare_from(&target, m.clone(), Some((&target, &base)), Some(&p), None).unwrap();
        let need = first.needed();
        assert!(need.len() >= 2);
        let c = m.chunks[need[0] as usize];
        first.write_chunk(need[0], &new[c.offset as usize..c.end() as usize]).unwrap();
        drop(first);
        let again = Assembly::prepare_from(&target, m.clone(), Some((&target, &base)), Some(&p), None).unwrap();
        assert_eq!(again.needed(), need[1..].to_vec(), "the chunk received before is kept");
        complete(&again, &new);
        again.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), new);
    }

    #[test]
    fn chunks_sent_ahead_are_kept_where_the_push_has_them_and_only_if_checked() {
        let (dir, target, old, base) = old_file("ahead", 200_000, 3);
        // The new version: 100 bytes inserted at the start of the old one,
        // then new bytes. Written as it would be sent ahead: a prefix.
        let mut new = vec![7u8; 100];
        new.extend_from_slice(&old);
        new.extend_from_slice(&random_bytes(100_000, 4));
        let m = chunk_slice(&new, &SMALL).unwrap();
        let ahead = Ahead::create(&target, "a-1").unwrap();
        let temp_of = |a: &Ahead| a.temp.clone();
        assert!(temp_of(&ahead).exists());
        let split = m.chunks.len() / 2;
        // Chunks of the old version are copied, not needed.
        let need = ahead.declare(0, &m.chunks[..split], Some((&target, &base))).unwrap();
        assert!(need.len() < split / 2, "{} of {split} needed", need.len());
        for &i in &need {
            let c = m.chunks[i as usize];
            ahead.write_chunk(i, &new[c.offset as usize..c.end() as usize]).unwrap();
        }
        // The next declaration must follow the last; a lie is refused.
        assert!(matches!(ahead.declare(0, &m.chunks[..1], None), Err(AssembleError::Ahead(_))));
        assert!(matches!(ahead.declare(split as u32 + 1, &m.chunks[split + 1..], None), Err(AssembleError::Ahead(_))));
        let need = ahead.declare(split as u32, &m.chunks[split..], None).unwrap();
        assert_eq!(need.len(), m.chunks.len() - split);
        // The last chunk arrives with bytes that are not its own: refused,
        // not kept; the one before it is never sent.
        let last = m.chunks.len() - 1;
        let c = m.chunks[last];
        assert!(matches!(ahead.write_chunk(last as u32, &vec![0u8; c.len as usize]), Err(AssembleError::HashMismatch { .. })));
        for &i in &need[..need.len() - 2] {
            let c = m.chunks[i as usize];
            ahead.write_chunk(i, &new[c.offset as usize..c.end() as usize]).unwrap();
        }
        // The file as pushed differs from what went ahead in one chunk.
        let mut pushed = new.clone();
        pushed[1000] ^= 0xff;
        let pm = chunk_slice(&pushed, &SMALL).unwrap();
        let asm = Assembly::prepare_from(&target, pm.clone(), Some((&target, &base)), None, Some(&ahead)).unwrap();
        assert!(!temp_of(&ahead).exists(), "the push took the file over");
        let needed: Vec<u32> = asm.needed();
        let changed: Vec<u32> = (0..pm.chunks.len() as u32).filter(|&i| !m.chunks.contains(&pm.chunks[i as usize])).collect();
        // Never checked: the chunk refused and the one never sent.
        let unchecked: Vec<u32> =
            (0..pm.chunks.len() as u32).filter(|&i| [m.chunks[last], m.chunks[last - 1]].contains(&pm.chunks[i as usize])).collect();
        assert_eq!(unchecked.len(), 2);
        for i in changed.iter().chain(&unchecked) {
            assert!(needed.contains(i), "chunk {i} must be sent: needed {needed:?}");
        }
        assert!(needed.len() <= changed.len() + 2, "needed {needed:?}");
        complete(&asm, &pushed);
        asm.finish(None, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), pushed);
        // Taken once: a second push gets nothing from it. And one dropped
        // untaken leaves no file.
        assert!(ahead.take_into(&dir.path().join("other")).is_none());
        let unused = Ahead::create(&target, "a-2").unwrap();
        let path = temp_of(&unused);
        drop(unused);
        assert!(!path.exists());
        assert!(Ahead::create(&dir.path().join("sub/none"), "a-3").is_err(), "no directory to hold it");
    }
}
