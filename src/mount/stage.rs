//! A file being written through a mount: its new content staged in a local
//! file, sparse, with a record of which byte ranges it holds.
//!
//! Opening an existing file for write downloads nothing: the staging file
//! starts with the base version's size and no content. A write stores its
//! bytes and marks them present; a read, or the push at close, first fills
//! the ranges still missing from the base version's chunks (cache or GET).
//! So the first write returns after touching only what it wrote.
//!
//! Invariants: `present` is sorted, merged, within `[0, size)`; a range
//! that is not present lies inside the base version (growing a file marks
//! the new bytes present: they are zeros); filling never overwrites a
//! present byte, because it checks under the same lock writes take.

use crate::chunk::{ChunkParams, Manifest, StreamChunker};
use crate::direct::DirectWrites;
use crate::proto::Base;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Sorted, disjoint, merged half-open byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b < s {
                out.push((a, b));
            } else if a > e {
                if !placed {
                    out.push((s, e));
                    placed = true;
                }
                out.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        if !placed {
            out.push((s, e));
        }
        self.0 = out;
    }

    /// Drop everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        self.0.retain(|&(a, _)| a < len);
        if let Some(last) = self.0.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    pub fn as_slice(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// The parts of `[start, end)` not covered.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(a, b) in &self.0 {
            if b <= at {
                continue;
            }
            if a >= end {
                break;
            }
            if a > at {
                out.push((at, a.min(end)));
            }
            at = at.max(b);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

pub struct StageState {
    pub size: u64,
    pub present: Ranges,
    /// The version missing ranges come from (None: a new file, or fully present).
    pub base: Option<Arc<Manifest>>,
    /// What the push asks the partner to still have.
    pub expect: Base,
    /// Changed since the last push.
    pub dirty: bool,
    /// Unlinked or renamed over through the mount while open: what the
    /// handles still write stays here, and nothing of it goes back (its
    /// name may be another file's by now).
    pub gone: bool,
    /// A change of this staging was left in the write-back queue (the
    /// partner unreachable, or refusing it) at least once: only then can
    /// an entry of it still be queued when its last handle closes.
    pub queued: bool,
    /// Open handles using this staging.
    pub handles: usize,
    pub mtime_ns: i64,
    /// The version this content equals outside `written` (None: unknown,
    /// the next push cuts the whole file).
    pub recut_base: Option<Arc<Manifest>>,
    /// Bytes written (or grown) since `recut_base`.
    pub written: Ranges,
    /// A chmod and a utimens made while the file was open with unpushed
    /// changes: sent (one SETATTR) right after the push that carries them,
    /// instead of forcing a push of half-written content first.
    pub due_mode: Option<u32>,
    pub due_mtime_ns: Option<i64>,
    /// While the file has only been written from start to end since it
    /// was empty: its chunks, cut and hashed as the bytes arrived, so the
    /// push needs no read of the file to know its manifest.
    pub stream: Option<StreamChunker>,
}

pub struct Staged {
    pub data: PathBuf,
    /// Unique to this staging: the write-back queue tags its entries with
    /// it, so that a later entry supersedes only earlier ones whose changes
    /// it holds (this staging, written on), never those of another staging
    /// of the same path.
    pub lineage: u64,
    pub file: File,
    pub state: Mutex<StageState>,
    /// Held by a push from fill to the end of the transfer, and by each
    /// write: a file is never pushed while a write is half done. Shared so
    /// that a push behind a close ([`crate::mount::vfs`]) can keep holding
    /// it after the close has returned.
    pub gate: Arc<tokio::sync::Mutex<()>>,
    /// Starts the disk writing a large staging file as it fills, so the
    /// fsync before it is queued has little left to write.
    pub writeback: crate::flush::EarlyWriteback,
    /// Large writes go to the disk without the page cache (see
    /// [`crate::direct`]): a write through a mount is read back only once,
    /// by the push, which reads it direct as well.
    direct: DirectWrites,
    params: ChunkParams,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Staged {
    /// A staging file for a version of `size` bytes whose content is
    /// `base` (nothing local yet), or for a new empty file (`base` None).
    /// `data` is a fresh name or a spare file of the write-back folder's.
    pub fn create(data: PathBuf, base: Option<Arc<Manifest>>, expect: Base, mtime_ns: i64, params: ChunkParams) -> std::io::Result<Staged> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&data)?;
        let size = base.as_ref().map_or(0, |m| m.size);
        // Opened truncated: a new file (a `tar x` makes thousands) is at
        // its size already.
        if size > 0 {
            file.set_len(size)?;
        }
        let state = StageState {
            size,
            present: Ranges::default(),
            recut_base: base.clone(),
            base,
            expect,
            dirty: false,
            gone: false,
            queued: false,
            handles: 0,
            mtime_ns,
            written: Ranges::default(),
            due_mode: None,
            due_mtime_ns: None,
            stream: None,
        };
        let staged = Staged::new(data, file, state, params);
        if size == 0 {
            staged.state().stream = StreamChunker::new(&params).ok();
        }
        Ok(staged)
    }

    /// A staging made of `data`, a complete local copy of version
    /// `manifest` (a file this node pushed earlier).
    pub fn adopt(data: PathBuf, manifest: Arc<Manifest>, mtime_ns: i64, params: ChunkParams) -> std::io::Result<Staged> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&data)?;
        if file.metadata()?.len() != manifest.size {
            return Err(std::io::Error::other(format!("{} is not the size of the version it should hold", data.display())));
        }
        let mut present = Ranges::default();
        present.insert(0, manifest.size);
        let state = StageState {
            size: manifest.size,
            present,
            base: None,
            expect: Base::Version(manifest.file_hash),
            dirty: false,
            gone: false,
            queued: false,
            handles: 0,
            mtime_ns,
            recut_base: Some(manifest),
            written: Ranges::default(),
            due_mode: None,
            due_mtime_ns: None,
            stream: None,
        };
        Ok(Staged::new(data, file, state, params))
    }

    fn new(data: PathBuf, file: File, state: StageState, params: ChunkParams) -> Staged {
        let direct = DirectWrites::open(&data);
        // Unique across restarts of mountd too (queue entries outlive it).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let lineage = (crate::time::Timestamp::now().0 as u64).wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        Staged { data, lineage, file, state: Mutex::new(state), gate: Default::default(), writeback: Default::default(), direct, params }
    }

    /// The manifest of the content, which must be all local (blocking).
    /// Only chunks near the bytes written since `recut_base` are cut and
    /// hashed again ([`crate::chunk::recut`]); when most of the file was
    /// written, or nothing is known of it, the whole file is cut. The file
    /// hash follows from the chunk list.
    pub fn manifest(&self, params: &ChunkParams) -> std::io::Result<Manifest> {
        let (size, base, written) = {
            let st = self.state();
            if let Some(stream) = st.stream.as_ref().filter(|s| s.position() == st.size && s.params() == params) {
                return Ok(stream.manifest());
            }
            (st.size, st.recut_base.clone(), st.written.clone())
        };
        let changed: u64 = written.as_slice().iter().map(|(a, b)| b - a).sum();
        let base = base.filter(|_| changed.saturating_mul(2) < size);
        let Some(base) = base else {
            return crate::chunk::chunk_open_file(&self.file, params);
        };
        let chunks = crate::chunk::recut(&base, size, written.as_slice(), params, |at, len| {
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, at)?;
            Ok(buf)
        })?;
        Ok(Manifest::new(size, chunks))
    }

    /// The staged content pushed as `manifest`: later pushes re-cut
    /// against it.
    pub fn pushed(&self, manifest: Arc<Manifest>) {
        let mut st = self.state();
        if st.size == manifest.size {
            st.recut_base = Some(manifest);
            st.written = Ranges::default();
        } else {
            st.recut_base = None;
        }
    }

    /// Whether every byte is local.
    pub fn complete(&self) -> bool {
        let st = self.state();
        st.present.missing(0, st.size).is_empty()
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, StageState> {
        lock(&self.state)
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    /// Store written bytes. Writing past the end leaves zeros in between.
    pub fn write(&self, offset: u64, data: &[u8], now_ns: i64) -> std::io::Result<()> {
        let mut st = self.state();
        let cached = self.direct.write_at(&self.file, data, offset)?;
        let end = offset + data.len() as u64;
        match st.stream.as_mut() {
            Some(stream) if stream.position() == offset => stream.push(data),
            _ => st.stream = None,
        }
        if offset > st.size {
            let size = st.size;
            st.present.insert(size, offset);
            st.written.insert(size, offset);
        }
        st.present.insert(offset, end);
        st.written.insert(offset, end);
        st.size = st.size.max(end);
        st.dirty = !st.gone;
        st.mtime_ns = now_ns;
        drop(st);
        self.writeback.wrote(&self.file, cached);
        Ok(())
    }

    /// Zeros over `offset..end` (`fallocate` punching a hole or zeroing a
    /// range): written like any bytes, so that they go back like any.
    pub fn zero(&self, offset: u64, end: u64, now_ns: i64) -> std::io::Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(end.saturating_sub(offset)) as usize];
        let mut at = offset;
        while at < end {
            let n = STEP.min(end - at) as usize;
            self.write(at, &zeros[..n], now_ns)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Truncate or extend.
    pub fn set_len(&self, len: u64, now_ns: i64) -> std::io::Result<()> {
        let mut st = self.state();
        self.file.set_len(len)?;
        if len == 0 {
            st.stream = StreamChunker::new(&self.params).ok();
        } else if st.stream.as_ref().is_some_and(|s| s.position() != len) {
            st.stream = None;
        }
        if len > st.size {
            let size = st.size;
            st.present.insert(size, len);
            st.written.insert(size, len);
        }
        st.present.truncate(len);
        st.written.truncate(len);
        st.size = len;
        st.dirty = !st.gone;
        st.mtime_ns = now_ns;
        Ok(())
    }

    /// Ranges of `[start, end)` still to come from the base version.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let st = self.state();
        st.present.missing(start, end.min(st.size))
    }

    /// Put base content `data`, which starts at `offset`, into the holes it
    /// covers (never over written bytes).
    pub fn fill(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.state();
        let end = offset + data.len() as u64;
        for (a, b) in st.present.missing(offset, end.min(st.size)) {
            self.file.write_all_at(&data[(a - offset) as usize..(b - offset) as usize], a)?;
        }
        let size = st.size;
        st.present.insert(offset, end.min(size));
        Ok(())
    }

    pub fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let size = self.size();
        let end = offset.saturating_add(len as u64).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        // A truncate between the size above and the read (one from another
        // thread, racing a read or the kernel's readahead) makes the read
        // short, as it would on a local disk, not an error.
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zeroed_ranges_are_written_and_a_read_cut_short_by_a_truncate_is_short() {
        let dir = crate::testutil::TestDir::new("stage-zero");
        let s = Staged::create(dir.path().join("a"), None, Base::Absent, 0, ChunkParams::default()).unwrap();
        s.write(0, &[7u8; 10_000], 1).unwrap();
        s.state().dirty = false;
        s.zero(100, 5_000, 2).unwrap();
        assert!(s.state().dirty);
        let back = s.read(0, 10_000).unwrap();
        assert!(back[..100].iter().all(|b| *b == 7) && back[100..5_000].iter().all(|b| *b == 0) && back[5_000..].iter().all(|b| *b == 7));
        // The file shrinks under a reader that already took the size.
        s.file.set_len(3_000).unwrap();
        assert_eq!(s.read(2_000, 8_000).unwrap().len(), 1_000);
    }

    #[test]
    fn ranges_merge_and_report_holes() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        r.insert(15, 35);
        assert_eq!(r, Ranges(vec![(10, 40)]));
        r.insert(40, 45);
        assert_eq!(r, Ranges(vec![(10, 45)]));
        r.truncate(12);
        assert_eq!(r, Ranges(vec![(10, 12)]));
        assert_eq!(r.missing(10, 12), vec![]);
    }

    #[test]
    fn writes_fill_and_truncate_keep_written_bytes() {
        let dir = crate::testutil::TestDir::new("stage");
        let dir = dir.path();
        let base = crate::chunk::chunk_slice(&[7u8; 100], &crate::chunk::ChunkParams::default()).unwrap();
        let s = Staged::create(dir.join("a"), Some(Arc::new(base)), Base::Absent, 0, ChunkParams::default()).unwrap();
        s.write(10, b"hello", 1).unwrap();
        assert_eq!(s.missing(0, 100), vec![(0, 10), (15, 100)]);
        s.fill(0, &[7u8; 100]).unwrap();
        assert_eq!(s.missing(0, 100), vec![]);
        let back = s.read(0, 100).unwrap();
        assert_eq!(&back[10..15], b"hello");
        assert_eq!(back[0], 7);
        s.set_len(12, 2).unwrap();
        s.set_len(20, 3).unwrap();
        assert_eq!(s.read(0, 100).unwrap()[12..], [0u8; 8]);
        assert!(s.state().dirty);
    }

    #[test]
    fn a_file_written_in_order_has_its_manifest_without_a_read_back() {
        let dir = crate::testutil::TestDir::new("stage-stream");
        let params = ChunkParams::default();
        let data = crate::testutil::random_bytes(5 << 20, 9);
        let s = Staged::create(dir.path().join("a"), None, Base::Absent, 0, params).unwrap();
        // 1 MiB writes (direct where the disk allows), then a short one
        // that leaves the file unaligned, then more.
        let mut at = 0;
        for n in [1 << 20, 1 << 20, 1000, (1 << 20) + 5, 3 << 20] {
            let n = n.min(data.len() - at);
            s.write(at as u64, &data[at..at + n], 1).unwrap();
            at += n;
        }
        assert_eq!(at, data.len());
        assert!(s.state().stream.is_some());
        let want = crate::chunk::chunk_slice(&data, &params).unwrap();
        assert_eq!(s.manifest(&params).unwrap(), want);
        assert_eq!(s.read(0, data.len() as u32).unwrap(), data);
        // A write elsewhere ends the stream; the manifest is cut from the
        // file again, and right.
        s.write(4096, b"changed", 2).unwrap();
        assert!(s.state().stream.is_none());
        let mut edited = data.clone();
        edited[4096..4103].copy_from_slice(b"changed");
        assert_eq!(s.manifest(&params).unwrap(), crate::chunk::chunk_slice(&edited, &params).unwrap());
        // Truncated to nothing, it streams again.
        s.set_len(0, 3).unwrap();
        s.write(0, &data[..3 << 20], 4).unwrap();
        assert_eq!(s.manifest(&params).unwrap(), crate::chunk::chunk_slice(&data[..3 << 20], &params).unwrap());
    }

    proptest! {
        #[test]
        fn missing_is_the_complement_of_inserted(ops in prop::collection::vec((0u64..200, 0u64..50), 0..20)) {
            let mut r = Ranges::default();
            let mut bits = [false; 250];
            for (s, l) in ops {
                r.insert(s, s + l);
                for b in bits.iter_mut().skip(s as usize).take(l as usize) { *b = true; }
            }
            let mut holes = [false; 250];
            for (a, b) in r.missing(0, 250) {
                for h in holes.iter_mut().take(b as usize).skip(a as usize) { *h = true; }
            }
            for i in 0..250 { prop_assert_eq!(bits[i], !holes[i]); }
        }
    }
}
