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
    /// Those of them open for writing.
    pub writers: usize,
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
    /// Set while the kernel writes the staging file itself (FUSE
    /// passthrough handles are open on it): see [`Staged::absorb`].
    pub kernel: Option<KernelIo>,
    /// Changes of the kernel's seen so far ([`Staged::absorb`]).
    pub kernel_changes: u64,
}

impl StageState {
    /// `[offset, end)` now holds bytes written here (or zeroed).
    fn changed(&mut self, offset: u64, end: u64, now_ns: i64) {
        self.present.insert(offset, end);
        self.written.insert(offset, end);
        self.size = self.size.max(end);
        self.dirty = !self.gone;
        self.mtime_ns = now_ns;
    }

    /// The content, `len` bytes, all local, counts as written anew: the
    /// next push cuts it whole.
    fn rewritten_whole(&mut self, len: u64) {
        self.present = Ranges::default();
        self.present.insert(0, len);
        self.written = Ranges::default();
        self.written.insert(0, len);
        self.recut_base = None;
        self.stream = None;
        self.size = len;
        self.dirty = !self.gone;
    }
}

/// A staging file the kernel writes itself. Its writes do not reach
/// mountd, so what they changed is learned from the file: its size and
/// times ([`Staged::absorb`]).
///
/// A process may map the file and write it through the mapping: such a
/// write moves the mtime only when it makes a page writable again (the
/// first write to a page, or the first after the page went to the disk),
/// and the mapping outlives the descriptor. So a push made while a mapping
/// is there first sends the file's pages to the disk ([`Staged::protect`]),
/// and the kernel's mode lasts until the last mapping is gone too.
#[derive(Debug, Default)]
pub struct KernelIo {
    /// Passthrough write handles open on the staging.
    pub handles: u32,
    /// Size and mtime (ns) of the file when last looked at.
    seen: Option<(u64, i64)>,
    /// The processes that opened it for reading and writing (tgids):
    /// where to look for mappings that write it. A descriptor opened for
    /// writing only cannot be mapped for writing (`tar`, `cp`, `dd` and
    /// the shell open so): no look at the maps is needed for those.
    openers: Vec<u32>,
    /// A push found a mapping of it ([`Staged::protect`]).
    was_mapped: bool,
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
    /// Sends the chunks the kernel writes ahead of the first push
    /// ([`crate::mount::ahead`]); taken by that push.
    pub ahead: Mutex<Option<crate::mount::ahead::AheadSender>>,
}

/// Whether the file system of `probe` (a free name there) shows every
/// write in a file's mtime, even one made right after a look at the file
/// (multigrain timestamps: Linux 6.13 and later on ext4, XFS, Btrfs,
/// tmpfs). [`Staged::absorb`] needs it to see the kernel's writes; without
/// it, the kernel does not write stagings itself.
pub fn writes_show_in_mtime(probe: &std::path::Path) -> bool {
    let test = || -> std::io::Result<bool> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(probe)?;
        file.write_all_at(&[0u8; 64], 0)?;
        for i in 0..200u8 {
            let before = stat_of(&file);
            file.write_all_at(&[i], 7)?;
            if before.is_none() || stat_of(&file) == before {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let shown = test();
    let _ = std::fs::remove_file(probe);
    shown.unwrap_or(false)
}

/// Size and mtime (ns) of a file. Not its ctime: mountd's own link of
/// the file into the queue moves that.
fn stat_of(file: &File) -> Option<(u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    Some((m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()))
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
            writers: 0,
            mtime_ns,
            written: Ranges::default(),
            due_mode: None,
            due_mtime_ns: None,
            stream: None,
            kernel: None,
            kernel_changes: 0,
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
            writers: 0,
            mtime_ns,
            recut_base: Some(manifest),
            written: Ranges::default(),
            due_mode: None,
            due_mtime_ns: None,
            stream: None,
            kernel: None,
            kernel_changes: 0,
        };
        Ok(Staged::new(data, file, state, params))
    }

    fn new(data: PathBuf, file: File, state: StageState, params: ChunkParams) -> Staged {
        let direct = DirectWrites::open(&data);
        // Unique across restarts of mountd too (queue entries outlive it).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let lineage = (crate::time::Timestamp::now().0 as u64).wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        Staged {
            data,
            lineage,
            file,
            state: Mutex::new(state),
            gate: Default::default(),
            writeback: Default::default(),
            direct,
            params,
            ahead: Mutex::new(None),
        }
    }

    /// The manifest of the content, which must be all local (blocking).
    /// Only chunks near the bytes written since `recut_base` are cut and
    /// hashed again ([`crate::chunk::recut`]); when most of the file was
    /// written, or nothing is known of it, the whole file is cut. The file
    /// hash follows from the chunk list.
    pub fn manifest(&self, params: &ChunkParams) -> std::io::Result<Manifest> {
        let (size, base, written) = {
            let st = self.current();
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
        let holes = crate::chunk::file_holes(&self.file, 0, size, params.max as usize)?;
        let chunks = crate::chunk::recut(&base, size, written.as_slice(), &holes, params, |at, len| {
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, at)?;
            Ok(buf)
        })?;
        Ok(Manifest::new(size, chunks))
    }

    /// The manifest of the content, like [`Staged::manifest`], given
    /// `prefix`: chunks cut from the start of the file before (while it was
    /// written, [`crate::mount::ahead`]). Those are checked against their
    /// hashes rather than cut again, and only the bytes after them are
    /// cut; if one no longer matches (the bytes were written again since),
    /// the whole file is cut. Blocking.
    pub fn manifest_after(&self, params: &ChunkParams, prefix: &[crate::chunk::ChunkRef]) -> std::io::Result<Manifest> {
        let size = self.current().size;
        let end = prefix.last().map_or(0, |c| c.end());
        if prefix.is_empty() || end > size {
            return self.manifest(params);
        }
        if !crate::chunk::verify_chunks(&self.file, prefix)?.into_iter().all(|ok| ok) {
            return self.manifest(params);
        }
        let mut chunks = prefix.to_vec();
        chunks.extend(crate::chunk::chunk_open_file_from(&self.file, end, params)?);
        // The file as read (the kernel may have written since the size was
        // taken), as `manifest` takes it.
        let read = chunks.last().map_or(0, |c| c.end());
        Ok(Manifest::new(read, chunks))
    }

    /// The staged content pushed as `manifest`, cut when the kernel's
    /// changes taken in numbered `kernel_gen`: later pushes re-cut against
    /// it.
    pub fn pushed(&self, manifest: Arc<Manifest>, kernel_gen: u64) {
        let mut st = self.current();
        if st.kernel_changes != kernel_gen {
            // The kernel wrote it since (or while) the push cut it: the
            // next push cuts it whole.
            return;
        }
        if st.size == manifest.size {
            st.recut_base = Some(manifest);
            st.written = Ranges::default();
        } else {
            st.recut_base = None;
        }
    }

    /// The kernel is to write this staging itself (a passthrough handle
    /// opens on it, in process `opener`; `may_map`: for reading too): which
    /// needs every byte local, as after a truncating open. Returns false
    /// (nothing changed) when it is not.
    pub fn kernel_open(&self, opener: u32, may_map: bool) -> bool {
        let mut st = self.state();
        if st.kernel.is_none() && !st.present.missing(0, st.size).is_empty() {
            return false;
        }
        self.absorb(&mut st);
        // Its writes are not seen as they come: no cutting as they arrive.
        st.stream = None;
        let k = st.kernel.get_or_insert_with(KernelIo::default);
        k.handles += 1;
        if may_map && !k.openers.contains(&opener) {
            k.openers.push(opener);
        }
        if k.seen.is_none() {
            k.seen = stat_of(&self.file);
        }
        true
    }

    /// A passthrough write handle on the staging closed: what the kernel
    /// wrote is taken in. Returns whether it was the last one; the caller
    /// then ends the kernel's mode once no mapping is left
    /// ([`Staged::kernel_done`]).
    pub fn kernel_close(&self) -> bool {
        let mut st = self.current();
        match st.kernel.as_mut() {
            Some(k) => {
                k.handles = k.handles.saturating_sub(1);
                k.handles == 0
            }
            None => false,
        }
    }

    /// No passthrough write handle and no mapping is left: mountd alone
    /// writes the staging again. `mapped`: a mapping was there after the
    /// last push, whose writes the mtime may not show, so the content
    /// counts as changed; so it does if a push found a mapping (a page
    /// being written to the disk when the push protected the others may
    /// have stayed writable). Does nothing if a handle opened meanwhile.
    pub fn kernel_done(&self, mapped: bool) {
        let mut st = self.current();
        if let Some(k) = st.kernel.as_ref().filter(|k| k.handles == 0) {
            let mapped = mapped || k.was_mapped;
            st.kernel = None;
            if mapped {
                let size = st.size;
                st.rewritten_whole(size);
            }
        }
    }

    /// Whether a process that opened the staging for reading and writing
    /// through the kernel maps it now: its `/proc/PID/maps` names the file, by the
    /// staging's device and inode or by those of the mount's file,
    /// `shown` (a mapping of a passthrough file maps the staging, but the
    /// kernel shows the file it was made through). Only those processes
    /// are looked at: a mapping inherited by a child they forked is not
    /// seen.
    pub fn mapped(&self, shown: Option<(u64, u64)>) -> bool {
        use std::os::unix::fs::MetadataExt;
        let openers = match self.state().kernel.as_ref() {
            Some(k) if !k.openers.is_empty() => k.openers.clone(),
            _ => return false,
        };
        let Ok(meta) = self.file.metadata() else { return false };
        // As the kernel writes them in the maps: "%02x:%02x %lu".
        let name = |dev: u64, ino: u64| (format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev)), ino.to_string());
        let names: Vec<(String, String)> = std::iter::once((meta.dev(), meta.ino())).chain(shown).map(|(d, i)| name(d, i)).collect();
        openers.iter().any(|pid| match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(maps) => maps.lines().any(|l| {
                let mut f = l.split_ascii_whitespace().skip(3);
                let (dev, ino) = (f.next(), f.next());
                names.iter().any(|(d, i)| dev == Some(d.as_str()) && ino == Some(i.as_str()))
            }),
            // The process is gone, and its mappings with it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            // Its maps cannot be read here: it may map the file.
            Err(_) => true,
        })
    }

    /// Send the file's dirty pages to the disk, which makes them read-only
    /// in every mapping: a write through a mapping after this moves the
    /// file's mtime ([`KernelIo`]). Started, not waited for.
    pub fn protect(&self) {
        use std::os::fd::AsRawFd;
        if let Some(k) = self.state().kernel.as_mut() {
            k.was_mapped = true;
        }
        // SAFETY: a plain syscall on an open descriptor of ours.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if r != 0 {
            tracing::debug!(file = %self.data.display(), "sync_file_range: {}", std::io::Error::last_os_error());
        }
    }

    /// Take in what the kernel wrote to the file since last looked at
    /// (passthrough handles): its size, its mtime, and that it changed.
    /// The content then counts as written anew, whole: the next push cuts
    /// the whole file. Returns whether anything changed.
    ///
    /// A write is seen by the file's mtime, which every write moves (the
    /// kernel gives a fine-grained time to a change that follows a look
    /// at the file's times, on file systems with multigrain timestamps;
    /// on others a write in the same clock tick as the last look is seen
    /// at the next change or the last close, whose push cuts the file).
    fn absorb(&self, st: &mut StageState) -> bool {
        let Some(k) = st.kernel.as_mut() else { return false };
        let now = stat_of(&self.file);
        if now.is_none() || now == k.seen {
            return false;
        }
        k.seen = now;
        let Some((len, mtime_ns)) = now else { return false };
        st.rewritten_whole(len);
        st.mtime_ns = mtime_ns;
        st.kernel_changes += 1;
        true
    }

    /// Give the file the mtime `mtime_ns` (a push carries the file's). While
    /// the kernel writes it, the stamp is not a change of the kernel's: it
    /// is skipped when the file has that mtime already (the kernel's last
    /// write set it, the common case), and else what the file is after it
    /// is taken as seen. A kernel write between the last look and the
    /// stamp then shows only if it changed the size (its mtime is the
    /// stamp's): that takes a utimens on the file while another descriptor
    /// writes it, and the written bytes still go with the next change.
    pub fn stamp_mtime(&self, mtime_ns: i64) -> std::io::Result<()> {
        let mut st = self.current();
        if st.kernel.as_ref().is_some_and(|k| k.seen.is_some_and(|(_, m)| m == mtime_ns)) {
            return Ok(());
        }
        let stamped = self.file.set_modified(crate::time::Timestamp(mtime_ns).to_system());
        if st.kernel.is_some() {
            let now = stat_of(&self.file);
            if let Some(k) = st.kernel.as_mut() {
                k.seen = now;
            }
            if let Some((len, _)) = now.filter(|(len, _)| *len != st.size) {
                st.rewritten_whole(len);
                st.kernel_changes += 1;
            }
        }
        stamped
    }

    /// Whether the kernel writes the file itself now.
    pub fn kernel_writes(&self) -> bool {
        self.state().kernel.is_some()
    }

    /// The state, with what the kernel wrote taken in.
    pub fn current(&self) -> std::sync::MutexGuard<'_, StageState> {
        let mut st = self.state();
        self.absorb(&mut st);
        st
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
        self.current().size
    }

    /// Store written bytes. Writing past the end leaves zeros in between.
    pub fn write(&self, offset: u64, data: &[u8], now_ns: i64) -> std::io::Result<()> {
        let mut st = self.current();
        let cached = self.direct.write_at(&self.file, data, offset)?;
        let end = offset + data.len() as u64;
        let kernel = st.kernel.is_some();
        match st.stream.as_mut() {
            Some(stream) if stream.position() == offset && !kernel => stream.push(data),
            _ => st.stream = None,
        }
        if offset > st.size {
            let size = st.size;
            st.present.insert(size, offset);
            st.written.insert(size, offset);
        }
        st.changed(offset, end, now_ns);
        drop(st);
        self.writeback.wrote(&self.file, cached);
        Ok(())
    }

    /// Zeros over `offset..end` (`fallocate` punching a hole or zeroing a
    /// range): changed bytes like any written ones, so that they go back
    /// like any, but made a hole in the staging where the file system can,
    /// which the push's cut does not read (see [`crate::chunk`]'s holes).
    pub fn zero(&self, offset: u64, end: u64, now_ns: i64) -> std::io::Result<()> {
        if end <= offset {
            return Ok(());
        }
        {
            let mut st = self.current();
            if crate::direct::punch_hole(&self.file, offset, end).is_ok() {
                st.stream = None;
                st.changed(offset, end, now_ns);
                return Ok(());
            }
        }
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
        let mut st = self.current();
        self.file.set_len(len)?;
        if len == 0 && st.kernel.is_none() {
            st.stream = StreamChunker::new(&self.params).ok();
        } else if st.kernel.is_some() || st.stream.as_ref().is_some_and(|s| s.position() != len) {
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

    /// Base content known to be zeros over `[offset, end)` (a chunk of
    /// zeros: a hole of the partner's file): left a hole here, not written.
    pub fn fill_zero(&self, offset: u64, end: u64) -> std::io::Result<()> {
        let mut st = self.state();
        let end = end.min(st.size);
        for (a, b) in st.present.missing(offset, end) {
            if crate::direct::punch_hole(&self.file, a, b).is_err() {
                self.file.write_all_at(&vec![0u8; (b - a) as usize], a)?;
            }
        }
        st.present.insert(offset, end);
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
    fn chunks_cut_while_the_file_was_written_are_checked_not_trusted() {
        let dir = crate::testutil::TestDir::new("stage-prefix");
        let params = ChunkParams::default();
        let data = crate::testutil::random_bytes(6 << 20, 19);
        let s = Staged::create(dir.path().join("a"), None, Base::Absent, 0, params).unwrap();
        s.write(0, &data, 1).unwrap();
        // Cut as the sender cuts the first 4 MiB written.
        let mut early = crate::chunk::StreamChunker::new(&params).unwrap();
        early.push(&data[..4 << 20]);
        let prefix = early.final_chunks().to_vec();
        assert!(prefix.len() > 1);
        let want = crate::chunk::chunk_slice(&data, &params).unwrap();
        assert_eq!(s.manifest_after(&params, &prefix).unwrap(), want);
        // Bytes of the prefix written again since: the file is cut whole.
        s.write(10, b"again", 2).unwrap();
        let mut edited = data.clone();
        edited[10..15].copy_from_slice(b"again");
        assert_eq!(s.manifest_after(&params, &prefix).unwrap(), crate::chunk::chunk_slice(&edited, &params).unwrap());
        // Truncated below the prefix: likewise.
        s.set_len(1 << 20, 3).unwrap();
        assert_eq!(s.manifest_after(&params, &prefix).unwrap(), crate::chunk::chunk_slice(&edited[..1 << 20], &params).unwrap());
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

    #[test]
    fn writes_the_kernel_makes_to_the_file_are_taken_in_whole_and_a_push_racing_them_keeps_them_dirty() {
        let dir = crate::testutil::TestDir::new("stage-kernel");
        let params = ChunkParams::default();
        if !writes_show_in_mtime(&dir.path().join("probe")) {
            // No multigrain timestamps here: mountd does not hand stagings
            // to the kernel, and nothing below would be used.
            eprintln!("skipped: this file system does not show every write in the mtime");
            return;
        }
        let s = Staged::create(dir.path().join("a"), None, Base::Absent, 0, params).unwrap();
        assert!(s.kernel_open(std::process::id(), true));
        // Not through `write`: straight to the file, as the kernel does.
        let data = crate::testutil::random_bytes(3 << 20, 5);
        s.file.write_all_at(&data, 0).unwrap();
        assert_eq!(s.size(), data.len() as u64, "the size is taken from the file");
        {
            let st = s.state();
            assert!(st.dirty && st.stream.is_none() && st.kernel_changes == 1);
            assert_eq!(st.written.as_slice(), &[(0, data.len() as u64)]);
        }
        assert_eq!(s.manifest(&params).unwrap(), crate::chunk::chunk_slice(&data, &params).unwrap());
        // A push cut it (generation 1), then the kernel wrote again, same
        // size: its end does not make the file clean or forget the write.
        let mtime = s.state().mtime_ns;
        s.stamp_mtime(mtime).unwrap();
        let gen = s.state().kernel_changes;
        s.state().dirty = false;
        let cut = Arc::new(s.manifest(&params).unwrap());
        s.file.write_all_at(b"again", 10).unwrap();
        s.pushed(cut.clone(), gen);
        assert!(s.state().dirty && s.state().recut_base.is_none(), "a write during the push was forgotten");
        let mut now = data.clone();
        now[10..15].copy_from_slice(b"again");
        assert_eq!(s.manifest(&params).unwrap(), crate::chunk::chunk_slice(&now, &params).unwrap());
        // A push with nothing written meanwhile leaves it clean, with the
        // pushed manifest to re-cut against.
        let mtime = s.state().mtime_ns;
        s.stamp_mtime(mtime).unwrap();
        let gen = s.state().kernel_changes;
        s.state().dirty = false;
        s.pushed(Arc::new(s.manifest(&params).unwrap()), gen);
        assert!(!s.state().dirty && s.state().recut_base.is_some());
        // The last handle closes; no mapping was left: mountd alone writes
        // it again, and a write of its own streams as before.
        assert!(s.kernel_close());
        s.kernel_done(false);
        assert!(!s.kernel_writes() && !s.state().dirty);
        // After a mapping, the content counts as changed whole.
        assert!(s.kernel_open(std::process::id(), true));
        assert!(s.kernel_close());
        s.kernel_done(true);
        let st = s.state();
        assert!(st.dirty && st.kernel.is_none());
        assert_eq!(st.written.as_slice(), &[(0, data.len() as u64)]);
    }

    #[test]
    fn a_staging_that_lacks_base_bytes_is_not_handed_to_the_kernel() {
        let dir = crate::testutil::TestDir::new("stage-kernel-partial");
        let s = Staged::create(dir.path().join("a"), None, Base::Absent, 0, ChunkParams::default()).unwrap();
        s.set_len(1 << 20, 1).unwrap();
        // Extended by mountd: the zeros are its own, present.
        assert!(s.complete());
        s.state().present = Ranges::default();
        assert!(!s.kernel_open(1, false), "a staging with bytes still to fetch went to the kernel");
        assert!(!s.kernel_writes());
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
