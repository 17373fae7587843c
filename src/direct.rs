//! Direct I/O for the big writes of a transfer and of a mount's staging
//! files: the blocks a write covers whole go to the disk without the page
//! cache (`O_DIRECT`), the partial blocks at its edges through it.
//!
//! Why: on a virtual machine, a fresh page-cache page is expensive (the
//! host takes free pages back and hands them out again), and a transfer
//! that writes 1 GiB through the page cache then fsyncs it pays for a
//! quarter of a million of them plus the write-out. Here (`dd`, 1 GiB, the
//! same disk) that is 3.8 to 4.6 s buffered then fsynced, against 0.64 to
//! 0.73 s direct. A receiver never reads the bytes it writes back (each
//! chunk is hashed before it is written), so the page cache buys it
//! nothing.
//!
//! How it stays correct:
//! - a direct write and a page-cache write of one call never share a
//!   block: the middle `[align_up(start), align_down(end))` goes direct,
//!   the head and the tail through the page cache, and the kernel keeps
//!   the two coherent (a direct write flushes and drops cached pages of
//!   its range first);
//! - a direct write may extend the file (a mount's staging file grows as
//!   it is written): Linux file systems move the size only once the data
//!   is on the disk, and a staging file's writes are serialised by its
//!   lock, so no read sees the new size before the bytes;
//! - a file system that refuses `O_DIRECT` (tmpfs on older kernels, some
//!   network file systems) at open or on the first write switches the file
//!   to plain writes, with the same result;
//! - durability is unchanged: the fsync at the end covers both kinds (the
//!   direct blocks' extents, and the cached edges).
//!
//! Reads of a file that is not in the page cache ([`read_uncached`]) go
//! direct too, for the same reason; one that is cached is read from there.
//! A chunk received from the network lands in a [`Landing`] buffer laid
//! out like the file's blocks, so its direct write needs no copy; a
//! sender reads its chunks with [`Landing::read`].

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// The alignment of direct I/O: offsets, lengths and memory. 4 KiB covers
/// the logical block size of every disk and file system in use.
pub const BLOCK: usize = 4096;

/// Writes whose aligned middle is shorter than this go through the page
/// cache: a direct write waits for the device, worth it only when large.
const DIRECT_MIN: usize = 64 * 1024;

fn align_down(x: u64) -> u64 {
    x & !(BLOCK as u64 - 1)
}

fn align_up(x: u64) -> u64 {
    align_down(x + BLOCK as u64 - 1)
}

/// A zeroed heap buffer whose start is [`BLOCK`]-aligned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: the buffer owns its allocation outright, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out shared slices.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `len` bytes (rounded up to whole blocks).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(BLOCK) * BLOCK;
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, cap }
    }

    fn layout(cap: usize) -> std::alloc::Layout {
        // A multiple of BLOCK (a power of two) far below isize::MAX for any
        // buffer this crate asks for: only a caller bug reaches the panic.
        std::alloc::Layout::from_size_align(cap, BLOCK).expect("aligned buffer size")
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Make the buffer at least `len` bytes long (its content is lost).
    pub fn reserve(&mut self, len: usize) {
        if len > self.cap {
            *self = AlignedBuf::new(len);
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `cap` initialised bytes (zeroed at allocation) live at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return; // the placeholder a pooled Landing leaves behind
        }
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

/// A buffer for `len` bytes bound for file offset `offset`, placed so that
/// each of their whole disk blocks starts on a block boundary in memory
/// too: a direct write of them needs no aligned copy first. What
/// [`crate::transfer`] receives a chunk into.
pub struct Landing {
    buf: AlignedBuf,
    skip: usize,
    len: usize,
}

impl Landing {
    pub fn new(offset: u64, len: usize) -> Landing {
        let skip = (offset % BLOCK as u64) as usize;
        Landing { buf: pool_take(align_up((skip + len) as u64) as usize), skip, len }
    }

    /// The `len` bytes of `file` at `offset`, read as [`read_uncached`]
    /// does; an `UnexpectedEof` error if the file is shorter.
    pub fn read(file: &File, direct: Option<&File>, offset: u64, len: usize) -> io::Result<Landing> {
        let mut landing = Landing::new(offset, len);
        let got = read_uncached(file, direct, &mut landing.buf, offset, len)?.len();
        if got != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{got} of {len} bytes at offset {offset}: the file is shorter"),
            ));
        }
        Ok(landing)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.skip..self.skip + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[self.skip..self.skip + self.len]
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        pool_give(std::mem::replace(&mut self.buf, AlignedBuf { ptr: NonNull::dangling(), cap: 0 }));
    }
}

/// Buffers of dropped [`Landing`]s, for the next ones: a fresh aligned
/// allocation is zeroed and, above the allocator's mmap threshold, faulted
/// in page by page, which cost a receiving daemon 8% of its samples. Holds
/// at most [`POOL_BYTES`].
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());
const POOL_BYTES: usize = 8 << 20;

/// A buffer of at least `cap` bytes, from the pool when one there is no
/// more than twice as big.
fn pool_take(cap: usize) -> AlignedBuf {
    if let Ok(mut pool) = POOL.lock() {
        let best = pool.iter().enumerate().filter(|(_, b)| b.cap >= cap && b.cap <= cap.saturating_mul(2)).min_by_key(|(_, b)| b.cap);
        if let Some((i, _)) = best {
            return pool.swap_remove(i);
        }
    }
    AlignedBuf::new(cap)
}

fn pool_give(buf: AlignedBuf) {
    if let Ok(mut pool) = POOL.lock() {
        let held: usize = pool.iter().map(|b| b.cap).sum();
        if held + buf.cap <= POOL_BYTES {
            pool.push(buf);
        }
    }
}

impl AsRef<[u8]> for Landing {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

thread_local! {
    /// Where a write whose bytes are not aligned in memory is copied first.
    static SCRATCH: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Open `path` for direct I/O, or `None` where the file system refuses it.
fn open_direct(path: &Path, write: bool) -> Option<File> {
    std::fs::OpenOptions::new().read(!write).write(write).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// The direct side of one file: a second descriptor opened with `O_DIRECT`,
/// used beside the plain one the caller writes the edges with.
#[derive(Debug)]
pub struct DirectWrites {
    direct: Option<File>,
    /// Set when the file system refused a direct write: plain from then on.
    refused: AtomicBool,
}

impl DirectWrites {
    /// Direct writes to `path` where its file system allows them.
    pub fn open(path: &Path) -> DirectWrites {
        DirectWrites { direct: open_direct(path, true), refused: AtomicBool::new(false) }
    }

    /// Plain writes only.
    pub fn plain() -> DirectWrites {
        DirectWrites { direct: None, refused: AtomicBool::new(false) }
    }

    /// Whether writes still go direct (the file system took `O_DIRECT`
    /// and has not refused a write since).
    pub fn is_direct(&self) -> bool {
        self.direct().is_some()
    }

    fn direct(&self) -> Option<&File> {
        self.direct.as_ref().filter(|_| !self.refused.load(Ordering::Relaxed))
    }

    /// Write `data` at `offset`: the whole blocks direct, the edges through
    /// `file` (a plain descriptor of the same file). Returns the bytes that
    /// went through the page cache.
    pub fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
        let end = offset + data.len() as u64;
        let (a, b) = (align_up(offset), align_down(end));
        let Some(direct) = self.direct().filter(|_| b > a && (b - a) as usize >= DIRECT_MIN) else {
            file.write_all_at(data, offset)?;
            return Ok(data.len() as u64);
        };
        let (head, rest) = data.split_at((a - offset) as usize);
        let (middle, tail) = rest.split_at((b - a) as usize);
        file.write_all_at(head, offset)?;
        file.write_all_at(tail, b)?;
        match write_direct(direct, middle, a) {
            Ok(()) => Ok((head.len() + tail.len()) as u64),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "direct writes refused; writing through the page cache");
                self.refused.store(true, Ordering::Relaxed);
                file.write_all_at(middle, a)?;
                Ok(data.len() as u64)
            }
            Err(e) => Err(e),
        }
    }
}

/// Write whole blocks `data` at the aligned `offset` through a direct
/// descriptor, from `data` itself when it is aligned in memory, else from a
/// per-thread aligned copy.
fn write_direct(direct: &File, data: &[u8], offset: u64) -> io::Result<()> {
    if (data.as_ptr() as usize) % BLOCK == 0 {
        return pwrite_all(direct, data, offset);
    }
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        let buf = slot.get_or_insert_with(|| AlignedBuf::new(data.len()));
        buf.reserve(data.len());
        let copy = &mut buf.as_mut_slice()[..data.len()];
        copy.copy_from_slice(data);
        pwrite_all(direct, copy, offset)
    })
}

/// Set `file`'s length to `len` and allocate its blocks (`fallocate`),
/// where the file system can. Why: ext4 runs an aligned direct write under
/// the shared inode lock only when every block it covers is allocated; into
/// a hole (a file only `set_len` grew) it takes the lock exclusive for the
/// whole device wait, and the plain writes of the edges, on other threads,
/// spin on that lock (half of a receiving daemon's samples before this).
/// Running out of space is an error here, before anything is sent; a file
/// system without `fallocate` just gets the length.
///
/// A length the file system cannot hold is refused (`StorageFull`) before
/// anything is allocated: ext4 keeps the blocks a failed `fallocate` did
/// get, so a peer announcing a 1 TiB file would otherwise leave the disk
/// full. If `fallocate` runs out of space anyway (a race with other
/// writers), the file is truncated to nothing, which gives the blocks back.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    fits(file, len)?;
    file.set_len(len)?;
    if len == 0 {
        return Ok(());
    }
    match fallocate(file, 0, 0, len) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            let _ = file.set_len(0);
            Err(e)
        }
        _ => Ok(()),
    }
}

/// `fallocate(2)` with `mode` over `len` bytes from `offset`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on a descriptor we own, with plain integer
    // arguments; it touches no memory of ours.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, at, n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make `[offset, end)` of `file` a hole (it reads as zeros and holds no
/// blocks), its size unchanged. Fails where the file system cannot.
pub fn punch_hole(file: &File, offset: u64, end: u64) -> io::Result<()> {
    if end <= offset {
        return Ok(());
    }
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, end - offset)
}

/// Size `file` to `len` bytes as a sparse file for a new version with
/// holes: only `data` (sorted, disjoint byte ranges) is to be written, and
/// is allocated as [`preallocate`] does (direct writes into holes would
/// take ext4's inode lock exclusively), the rest left as holes. Refused
/// (StorageFull) when the data does not fit.
pub fn sparse(file: &File, len: u64, data: &[(u64, u64)]) -> io::Result<()> {
    fits(file, data.iter().map(|(a, b)| b - a).sum())?;
    file.set_len(0)?;
    file.set_len(len)?;
    for &(start, end) in data {
        match fallocate(file, 0, start, end - start) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let _ = file.set_len(0);
                return Err(e);
            }
            // Not supported here: the writes allocate as they go.
            Err(_) => break,
        }
    }
    Ok(())
}

/// A StorageFull error unless `file`, grown to `len` bytes, fits on its
/// file system beside what it already holds.
fn fits(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let need = len.saturating_sub(file.metadata()?.blocks().saturating_mul(512));
    match available_space(file) {
        Some(free) if need > free => {
            Err(io::Error::new(io::ErrorKind::StorageFull, format!("{len} bytes do not fit: {free} bytes are free on this file system")))
        }
        _ => Ok(()),
    }
}

/// Grow `file` from `from` to `to` bytes, its new blocks allocated
/// (unwritten), so that writes into that range stay within the file: on
/// ext4, a direct write past the end takes the inode's lock exclusively
/// and two threads writing such chunks wait on each other. Refused
/// (StorageFull) when the disk cannot hold it, as [`preallocate`] is.
/// Where the file system cannot allocate ahead, the size alone is set.
pub fn extend(file: &File, from: u64, to: u64) -> io::Result<()> {
    if to <= from {
        return Ok(());
    }
    fits(file, to)?;
    match fallocate(file, 0, from, to - from) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(e),
        Err(_) => file.set_len(to),
    }
}

/// Bytes an unprivileged writer may still allocate on the file system
/// holding `file`; None when it cannot tell or reports no size at all (some
/// FUSE file systems), so that those are not refused everything.
fn available_space(file: &File) -> Option<u64> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs on a descriptor we own, writing into `st` only.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 || st.f_blocks == 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// pwrite until done. A short direct write ends on a block boundary (the
/// device wrote whole blocks), so the rest stays aligned.
fn pwrite_all(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match file.write_at(data, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the disk took no bytes")),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read `len` bytes of `file` at `offset` into `buf`, and return where in
/// `buf` they start. From the page cache when they are all there
/// ([`all_cached`]), else direct through `direct` (whole blocks around the
/// range), else plain. Fewer than `len` bytes only at the end of the file:
/// the slice returned is what exists.
pub fn read_uncached<'b>(file: &File, direct: Option<&File>, buf: &'b mut AlignedBuf, offset: u64, len: usize) -> io::Result<&'b [u8]> {
    let (a, b) = (align_down(offset), align_up(offset + len as u64));
    buf.reserve((b - a) as usize);
    let skip = (offset - a) as usize;
    let direct = direct.filter(|_| all_cached(file, offset, len as u64) == Some(false));
    if let Some(direct) = direct {
        let span = (b - a) as usize;
        match pread_full(direct, &mut buf.as_mut_slice()[..span], a) {
            Ok(got) => {
                let have = got.saturating_sub(skip).min(len);
                return Ok(&buf.as_slice()[skip..skip + have]);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let got = pread_full(file, &mut buf.as_mut_slice()[skip..skip + len], offset)?;
    Ok(&buf.as_slice()[skip..skip + got])
}

/// Whether every page of `[offset, offset + len)` of `file` is in the page
/// cache (the `cachestat` system call, Linux 6.5); `None` where the kernel
/// cannot tell. A probe that reads (`preadv2` with `RWF_NOWAIT`) would not
/// do: a miss starts readahead, which fills the cache this module avoids.
pub fn all_cached(file: &File, offset: u64, len: u64) -> Option<bool> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// The same number on every architecture (the unified syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    static MISSING: AtomicBool = AtomicBool::new(false);
    if len == 0 || MISSING.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => BLOCK as u64,
    };
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live values of the kernel's layout
    // (struct cachestat_range, struct cachestat); the descriptor is open.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range as *const Range, &mut stat as *mut Stat, 0u32) };
    if rc != 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, Ordering::Relaxed);
        }
        return None;
    }
    let pages = (offset + len).div_ceil(page) - offset / page;
    Some(stat.nr_cache >= pages)
}

/// pread until `dst` is full or the file ends; the bytes read.
fn pread_full(file: &File, dst: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < dst.len() {
        match file.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A direct read descriptor for `path`, where its file system allows one.
pub fn open_direct_read(path: &Path) -> Option<File> {
    open_direct(path, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_bytes, TestDir};

    #[test]
    fn mixed_writes_at_any_offset_give_the_same_bytes_as_plain_ones() {
        let dir = TestDir::new("direct");
        let path = dir.path().join("f");
        let size = 3 << 20;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(size).unwrap();
        let dw = DirectWrites::open(&path);
        let src = random_bytes(size as usize, 3);
        // Pieces of awkward sizes, written out of order, some from an
        // unaligned slice and some tiny.
        let mut cuts = vec![0u64, 1, 4097, 70_000, 200_001, 1 << 20, (1 << 20) + 100, 2_500_000, size];
        cuts.dedup();
        let mut pieces: Vec<(u64, u64)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        pieces.reverse();
        let mut cached = 0;
        for (s, e) in pieces {
            cached += dw.write_at(&file, &src[s as usize..e as usize], s).unwrap();
        }
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), src);
        if dw.direct().is_some() {
            assert!(cached < size / 4, "{cached} of {size} bytes went through the page cache");
        }
    }

    #[test]
    fn landings_from_reused_buffers_hold_exactly_the_bytes_read() {
        let dir = TestDir::new("direct-landing");
        let src = random_bytes(600_000, 9);
        let path = dir.file("f", &src);
        let file = File::open(&path).unwrap();
        // Dirty buffers go back to the pool; the next landings of the same
        // and of smaller sizes reuse them and must show only their range.
        for _ in 0..3 {
            let mut l = Landing::new(100, 300_000);
            l.bytes_mut().fill(0xAB);
        }
        for (off, len) in [(100usize, 300_000usize), (4096, 250_000), (7, 160_001), (599_000, 1000)] {
            let l = Landing::read(&file, None, off as u64, len).unwrap();
            assert_eq!(l.bytes(), &src[off..off + len], "landing at {off} of {len}");
        }
        assert!(Landing::read(&file, None, 599_000, 1001).is_err(), "a range past the end is an error");
    }

    #[test]
    fn preallocate_sets_the_length_and_allocates_where_it_can() {
        use std::os::unix::fs::MetadataExt;
        let dir = TestDir::new("direct-prealloc");
        let path = dir.file("f", b"");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        preallocate(&file, 3 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 3 << 20);
        // ext4, xfs, btrfs and tmpfs allocate; others only get the length.
        let probe = std::fs::OpenOptions::new().write(true).open(dir.file("probe", b"")).unwrap();
        // SAFETY: fallocate on an open descriptor, integer arguments.
        if unsafe { libc::fallocate(probe.as_raw_fd(), 0, 0, 4096) } == 0 {
            assert!(meta.blocks() * 512 >= 3 << 20, "{} blocks allocated", meta.blocks());
        }
        preallocate(&file, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 0);
    }

    #[test]
    fn uncached_reads_return_the_range_and_stop_at_the_end() {
        let dir = TestDir::new("direct-read");
        let src = random_bytes(1_000_003, 4);
        let path = dir.file("f", &src);
        let file = File::open(&path).unwrap();
        // Out of the page cache, so that the direct path is the one taken.
        file.sync_all().unwrap();
        // SAFETY: an open descriptor; advice only.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // Where the kernel can tell, it now says the file is not cached.
        assert_ne!(all_cached(&file, 0, src.len() as u64), Some(true));
        let direct = open_direct_read(&path);
        let mut buf = AlignedBuf::new(BLOCK);
        for (off, len) in [(0usize, 10usize), (4095, 300_000), (999_000, 1003), (999_000, 5000), (12_345, 987_658)] {
            let got = read_uncached(&file, direct.as_ref(), &mut buf, off as u64, len).unwrap();
            let want = &src[off..(off + len).min(src.len())];
            assert_eq!(got, want, "read at {off} of {len}");
        }
        // Read through the page cache, it is cached (where the kernel can
        // tell), and a range past its end never counts as cached.
        std::fs::read(&path).unwrap();
        assert_ne!(all_cached(&file, 0, src.len() as u64), Some(false));
        assert_ne!(all_cached(&file, 0, 2 * src.len() as u64), Some(true));
    }
}
