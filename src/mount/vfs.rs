//! The filesystem a mount shows, without FUSE: inodes, listings, opens and
//! reads through the chunk cache. [`super::fuse`] is the only code that
//! knows the kernel; everything here is plain async Rust returning
//! [`Errno`] on failure, so it is testable without a mount.
//!
//! Invariants:
//! - an inode number names one (share, path) for the life of the mount;
//! - an open handle reads one file version (the manifest it opened with):
//!   its bytes come from chunks named by that manifest's hashes, verified,
//!   so a file that changes remotely never serves a mix of versions. A
//!   chunk of the old version that is no longer cached and no longer served
//!   fails the read with `ESTALE`; opening again gives the new version;
//! - metadata (listings, manifests) is refreshed from the partner when the
//!   watch says it changed or after [`ATTR_TTL`] without a watch, and is
//!   saved in [`Meta`], from which it is served while the partner is
//!   offline;
//! - content is fetched only for the chunks a read touches, plus a bounded
//!   readahead when reads are sequential.
//!
//! - writes stage locally ([`super::stage`]) and go back on close and
//!   fsync through the write-back queue ([`crate::writeback`]); see
//!   [`write`] and docs/SEMANTICS.md.
//!
//! Lock order: `inodes`, then `handles`, then a staging's state; none is
//! held across an await (a staging's `gate` is an async lock, taken before
//! any of them).

mod partial;
mod write;

pub use write::{OpenMode, Released};

use super::errno::Errno;
use super::leases::Leases;
use super::meta::{KnownFile, Meta, ROOT_SHARE};
use super::remote::{Remote, RemoteError};
use super::stage::Staged;
use crate::chunk::Manifest;
use crate::flat::Flats;
use crate::hash::Hash;
use crate::proto::{Entry, EntryKind, Name, SharePath};
use crate::store::{ChunkStore, Hold};
use crate::writeback::Writeback;
use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// How long attributes and listings are trusted without a watch.
pub const ATTR_TTL: Duration = Duration::from_secs(1);
/// Decoded chunks kept in memory for reads smaller than a chunk.
const HOT_CHUNKS: usize = 16;
/// Readahead of a read that starts a sequential run (offset 0 of a new
/// handle included): the chunks of the next MiB are asked for at once, in
/// parallel, rather than one or two at a time while the window grows.
const FIRST_AHEAD: u64 = 1 << 20;
/// The kernel's first read of a file read from its start: FUSE asks for
/// 128 KiB at most per read (its readahead window).
const FIRST_READ: u64 = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    /// The access time set through this mount (utimens), else the mtime:
    /// the mount keeps no time of reads (as `noatime`) and the partner no
    /// access time.
    pub atime_ns: i64,
    pub mtime_ns: i64,
    /// The last change of the inode: its mtime, or later a chmod, utimens,
    /// rename or change of a directory's entries made through this mount.
    pub ctime_ns: i64,
    /// Permission bits as shown: write bits cleared on a read-only mount.
    pub perm: u16,
    /// Links: 0 for a file unlinked or replaced while open; for a
    /// directory, 2 plus its subdirectories when its listing here is
    /// fresh, 1 (the Linux convention for "not counted") when it is not.
    pub nlink: u32,
}

/// What the mount shows at its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// Every share the partner grants, one entry each (DISCOVER); with a
    /// filter, only that share (a single-file share mounted on its own).
    Shares(Option<Name>),
    /// One directory share's tree.
    Share(Name),
}

pub struct VfsConfig {
    pub root: Root,
    /// `--read-only`: no writes even to shares granted `write`.
    pub read_only: bool,
    /// This node's name: leases it holds show no `.NAME.lock` entry here.
    pub me: Name,
    /// Bytes read ahead of a sequential reader.
    pub readahead: u64,
    /// `[mount] send_ahead`: chunks of large files the kernel writes go
    /// to the partner while they are written ([`crate::mount::ahead`]).
    pub send_ahead: bool,
}

/// How the kernel is to do the I/O of an open file.
pub enum Io {
    /// Through its page cache and this process.
    Cached,
    /// From a backing file the kernel reads itself (FUSE passthrough):
    /// what [`MakeBacking`] made of a whole copy of the version.
    Passthrough(BackingToken),
}

/// A whole copy's registration with the kernel, made by the FUSE adapter;
/// the kernel drops it when the last clone goes.
pub type BackingToken = Arc<dyn Any + Send + Sync>;

/// Registers a file with the kernel as a backing file.
pub type MakeBacking<'a> = &'a (dyn Fn(&std::fs::File) -> std::io::Result<BackingToken> + Sync);

/// For opens made here, not by the kernel: they get no backing file.
pub fn no_backing(_: &std::fs::File) -> std::io::Result<BackingToken> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// How long a look at a process's `/proc` files that an exec of it may
/// hold up is waited for ([`Vfs::staging_mapped`]).
pub(super) const PROC_WAIT: Duration = Duration::from_millis(200);

/// The backing file of an inode's passthrough opens. While such opens
/// last, the kernel wants every open of the inode to use this one backing
/// file. A whole copy of a version serves reads only: an open that cannot
/// use it (for write, or of another version) goes to a new inode for the
/// name instead ([`Vfs::leave_backed`]). The inode's staging serves every
/// open of the inode while it is the backing file.
struct Backing {
    token: BackingToken,
    /// File hash of the version it holds; None for the inode's staging.
    version: Option<Hash>,
    /// Passthrough handles open with it.
    handles: u32,
}

/// A kernel cache entry to drop: set by the FUSE adapter.
#[derive(Debug)]
pub enum Inval {
    Inode(Ino),
    Entry(Ino, String),
    /// The inode's attributes only; `done` is told once the kernel has
    /// dropped them.
    Attrs(Ino, tokio::sync::oneshot::Sender<()>),
    /// The inode's attributes and pages; `done` is told once the kernel
    /// has dropped them.
    Pages(Ino, std::sync::mpsc::Sender<()>),
}

struct Inode {
    /// None for the root in [`Root::Shares`] mode.
    share: Option<Name>,
    path: SharePath,
    parent: Ino,
    kind: Kind,
    size: u64,
    mtime_ns: i64,
    mode: u32,
    attr_at: Option<Instant>,
    /// Child names and inodes, when listed.
    children: Option<(Vec<(String, Ino)>, Instant)>,
    manifest: Option<Arc<Manifest>>,
    /// The manifest of the last whole version known here (described, or
    /// pushed from here), kept when `manifest` is dropped: while the
    /// partner's file still has its hash, it is that file's manifest again
    /// ([`Vfs::manifest`] asks for the hash alone).
    known: Option<Arc<Manifest>>,
    /// File hash of the version the kernel may have cached pages of.
    cached_version: Option<Hash>,
    /// Content being written here, not yet (all) on the partner.
    staged: Option<Arc<Staged>>,
    /// A `.NAME.lock` entry: its JSON content.
    virtual_data: Option<Arc<Vec<u8>>>,
    /// A directory: bumped by every change to its entries made here or
    /// announced by the partner (WATCH), so a listing asked for before the
    /// change is known to be stale.
    local_seq: u64,
    /// When a change made here last dropped these attributes: a listing
    /// of the parent asked for before then does not bring them back.
    dropped_at: Option<Instant>,
    /// The size last handed to the kernel ([`NOT_SHOWN`] if none since
    /// the kernel last dropped its attributes). The kernel ends reads at
    /// the size it holds, which a listing that reached only this table
    /// does not move.
    shown_size: AtomicU64,
    /// Read handles open on this inode.
    readers: u32,
    /// A version replaced on the partner while read handles were open on
    /// it: the name now leads to a new inode, and this one stays as it was
    /// (size, pages) for those handles. See [`Vfs::detach`].
    detached: bool,
    /// Set while passthrough handles are open on this inode.
    backing: Option<Backing>,
    /// The last status change made through this mount (chmod, utimens,
    /// truncate, rename, entries of a directory), 0 if none: `ctime`.
    changed_ns: i64,
    /// A directory whose entries changed here, 0 if none or since a
    /// utimens: its mtime shows at least this until the partner's does.
    entries_ns: i64,
    /// An access time set through this mount (utimens), kept here only.
    atime_ns: Option<i64>,
    /// Unlinked, or renamed over, through this mount: `nlink` 0 for the
    /// handles still open on it.
    unlinked: bool,
}

/// [`Inode::shown_size`] when the kernel holds no size of ours.
const NOT_SHOWN: u64 = u64::MAX;

impl Inode {
    /// Take the attributes the partner answered for this entry (a file
    /// being written here keeps its own size).
    fn take_attrs(&mut self, e: &Entry) {
        self.mode = e.mode;
        self.mtime_ns = e.mtime_ns;
        if self.staged.is_none() {
            self.size = e.size;
        }
        self.attr_at = Some(Instant::now());
    }
}

/// An open file.
enum Handle {
    Read(ReadHandle),
    /// Through a staging (open for write, or open while written here).
    Staged(StagedHandle),
    /// A `.NAME.lock` entry.
    Virtual(Arc<Vec<u8>>),
}

struct StagedHandle {
    ino: Ino,
    /// The kernel does its I/O on the staging file itself (FUSE
    /// passthrough): see [`Vfs::staged_io`].
    passthrough: bool,
    staged: Arc<Staged>,
    write: bool,
    append: bool,
    /// The lease need this handle holds (write handles).
    lease: Option<(Name, SharePath)>,
    /// Writes or resizes through it (1 for a new file). A close pushes only
    /// if some came after the last push a close of it waited for: the
    /// shell's `cmd > file` closes a dup of the O_TRUNC descriptor before
    /// `cmd` writes a byte, and pushing that empty version would leave the
    /// partner nothing to take a delta from.
    changes: u64,
    /// Threads (FUSE request tids) that wrote through it, the first few:
    /// see [`Vfs::flush`].
    writers: Vec<u32>,
    /// `changes` as the last completed close push found it. Counted, not a
    /// flag cleared when a push starts: a forked child's exec closes its
    /// copy of the descriptor (a FLUSH of the same handle) while the owner
    /// writes, and the owner's own close must still wait for a push.
    flushed: u64,
}

struct ReadHandle {
    /// Counted in its [`Inode::readers`].
    ino: Ino,
    share: Name,
    path: SharePath,
    /// While `rest` is pending, only the start of the version's manifest
    /// (its first chunks; size and file hash are the whole version's).
    manifest: Arc<Manifest>,
    /// The whole manifest, when the handle was opened on its start.
    rest: Option<Arc<partial::Rest>>,
    _hold: Hold,
    /// End of the last read, to detect sequential reading.
    last_end: u64,
    /// Bytes read sequentially up to `last_end`: the readahead window grows
    /// with it, so a reader that stops after a few reads fetched little.
    run: u64,
    /// Readahead has been asked up to here.
    ahead_until: u64,
    /// Opened with the inode's [`Backing`]: the kernel reads it alone.
    passthrough: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FileStatus {
    /// "file" or "dir".
    pub kind: String,
    pub size: u64,
    pub local_bytes: u64,
    pub pinned: bool,
    pub chunks: usize,
    /// Changes to this path (or under it) queued and not yet on the partner.
    #[serde(default)]
    pub pending_writebacks: Vec<String>,
    /// Conflict copies made for this path (or under it): "path -> copy".
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// A file written here, described from this node's copy (open for
    /// writing, or its change queued) rather than from the partner's
    /// version: `chunks` is not known.
    #[serde(default)]
    pub written_here: bool,
}

/// What the partner says about a share's leases, with when it said it.
struct ShareLeases {
    lockable: Vec<crate::glob::Glob>,
    leases: Vec<crate::proto::LeaseRow>,
    at: Instant,
}

pub struct Vfs {
    pub remote: Arc<Remote>,
    pub store: Arc<ChunkStore>,
    pub writeback: Arc<Writeback>,
    pub leases: Arc<Leases>,
    /// Shares the partner grants us `write` on (from DISCOVER).
    writable: Mutex<HashSet<Name>>,
    share_leases: Mutex<HashMap<Name, ShareLeases>>,
    /// Bumped whenever `share_leases` is dropped for a change: a view asked
    /// for before is not kept (it may predate a LOCK elsewhere).
    leases_epoch: AtomicU64,
    meta: Meta,
    config: VfsConfig,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    hot: Mutex<VecDeque<(Hash, Arc<Vec<u8>>)>>,
    /// Set while a watch connection is up: listings are then trusted until
    /// it says they changed.
    watching: std::sync::atomic::AtomicBool,
    invalidate: OnceLock<Arc<dyn Fn(Inval) + Send + Sync>>,
    /// READ requests the kernel sent, and the bytes they asked for: a read
    /// served from the kernel's page cache counts in neither.
    kernel_reads: AtomicU64,
    kernel_read_bytes: AtomicU64,
    /// Pushes behind a close (see [`write`]): one permit each while it is
    /// in flight, so at most [`WRITE_BEHIND`] run at once and taking them
    /// all waits for every one of them.
    behind: Arc<tokio::sync::Semaphore>,
    next_behind: AtomicU64,
    /// Whole copies of versions read here, for passthrough opens; None
    /// when the mount makes none.
    flats: Option<Arc<Flats>>,
    /// The kernel accepted passthrough and registering a backing file has
    /// not failed.
    passthrough: AtomicBool,
    /// Passthrough for writes too: the kernel writes stagings itself
    /// ([`Vfs::staged_io`]).
    write_passthrough: AtomicBool,
    passthrough_opens: AtomicU64,
    /// The mount's device number, once known ([`Vfs::set_mount_dev`]): a
    /// process's maps name a mapped file of the mount by it.
    mount_dev: std::sync::OnceLock<u64>,
}

/// Pushes a close may leave in flight at once. A close past the bound waits
/// for a permit. Enough that the serving node's fsyncs overlap while a
/// `tar x` goes on: a small push takes 1 to 2 ms, a file of `tar x` about
/// 0.7 ms of the mount's own work (PERFORMANCE.md, "Session of 2026-12-06,
/// night"). Each push in flight is a QUIC connection of its own.
pub const WRITE_BEHIND: u32 = 8;

struct Inodes {
    by_ino: HashMap<Ino, Inode>,
    by_key: HashMap<(String, SharePath), Ino>,
    next: Ino,
    /// Files created here and not on the partner yet: a close or fsync
    /// pushes them first, and nothing but this node knows them.
    /// A directory's cached listing may be dropped at any time (a change
    /// announced by the partner, a lease view gone stale); these are what a
    /// fresh listing lacks and must keep showing.
    local: std::collections::HashSet<Ino>,
    /// Names whose kernel entry must go: they lead to a new inode since
    /// their old one was detached (sent once the table is unlocked).
    stale_entries: Vec<(Ino, String)>,
}

impl Inodes {
    /// Leave file `ino` to the read handles open on it, if there are any,
    /// when its name now stands for another version: the kernel keeps one
    /// size per inode and ends reads there, so a descriptor reading the old
    /// version would stop at the new one's size. The name is unbound (the
    /// next lookup makes a new inode for it), the inode keeps the size,
    /// attributes and kernel pages of the version its handles read, and
    /// anything else asked of it by name fails with `ESTALE` (an `open`
    /// through a stale kernel entry is then retried by the kernel with a
    /// fresh lookup). Returns whether it was detached.
    fn detach(&mut self, ino: Ino) -> bool {
        let Some(n) = self.by_ino.get_mut(&ino) else { return false };
        if n.kind != Kind::File || n.readers == 0 || n.staged.is_some() || n.virtual_data.is_some() || n.detached {
            return false;
        }
        let Some(name) = n.path.file_name().map(str::to_string) else { return false };
        n.detached = true;
        let key = (share_key(&n.share), n.path.clone());
        let parent = n.parent;
        if self.by_key.get(&key) == Some(&ino) {
            self.by_key.remove(&key);
        }
        self.local.remove(&ino);
        if let Some(p) = self.by_ino.get_mut(&parent) {
            p.children = None;
        }
        self.stale_entries.push((parent, name));
        true
    }

    /// Mark `ino` as created here and not pushed yet, or no longer so.
    fn set_local_only(&mut self, ino: Ino, on: bool) {
        if on {
            self.local.insert(ino);
        } else {
            self.local.remove(&ino);
        }
    }

    fn is_local_only(&self, ino: Ino) -> bool {
        self.local.contains(&ino)
    }

    /// (name, inode) of the files created here in directory `dir` and not
    /// on the partner yet.
    fn local_children(&self, dir: Ino) -> Vec<(String, Ino)> {
        self.local
            .iter()
            .filter_map(|&i| {
                let n = self.by_ino.get(&i).filter(|n| n.parent == dir)?;
                // Still the inode its name leads to (not unlinked or renamed over).
                (self.by_key.get(&(share_key(&n.share), n.path.clone())) == Some(&i)).then_some(())?;
                Some((n.path.file_name()?.to_string(), i))
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn share_key(share: &Option<Name>) -> String {
    share.as_ref().map(|s| s.to_string()).unwrap_or_default()
}

/// The root listing of an all-shares mount, from DISCOVER rows: one entry
/// per share, the share's name standing in the path column. This is also
/// how it is saved for offline browsing.
///
/// The write bits say whether we may write the share: kept with the
/// listing, they let a mount made while the partner is unreachable know it
/// ([`Vfs::set_access_from_listing`]).
pub fn root_entries(rows: &[crate::proto::ShareRow]) -> Vec<Entry> {
    rows.iter()
        .filter_map(|r| {
            let dir = r.kind == EntryKind::Dir;
            let write = if r.access.can_write() { 0o200 } else { 0 };
            Some(Entry {
                kind: r.kind,
                size: if dir { 0 } else { r.size },
                mtime_ns: r.mtime_ns,
                mode: if dir { 0o555 | write } else { 0o444 | write },
                path: SharePath::parse(r.name.as_str()).ok()?,
            })
        })
        .collect()
}

impl Vfs {
    pub fn new(
        remote: Arc<Remote>,
        store: Arc<ChunkStore>,
        meta: Meta,
        config: VfsConfig,
        writeback: Arc<Writeback>,
        leases: Arc<Leases>,
        flats: Option<Arc<Flats>>,
    ) -> Vfs {
        let (share, path) = match &config.root {
            Root::Shares(_) => (None, SharePath::root()),
            Root::Share(s) => (Some(s.clone()), SharePath::root()),
        };
        let mut inodes = Inodes {
            by_ino: HashMap::new(),
            by_key: HashMap::new(),
            next: ROOT_INO + 1,
            local: Default::default(),
            stale_entries: Vec::new(),
        };
        inodes.by_key.insert((share_key(&share), path.clone()), ROOT_INO);
        inodes.by_ino.insert(
            ROOT_INO,
            Inode {
                share,
                path,
                parent: ROOT_INO,
                kind: Kind::Dir,
                size: 0,
                mtime_ns: 0,
                mode: 0o755,
                attr_at: None,
                children: None,
                manifest: None,
                known: None,
                cached_version: None,
                staged: None,
                virtual_data: None,
                local_seq: 0,
                dropped_at: None,
                shown_size: AtomicU64::new(NOT_SHOWN),
                readers: 0,
                detached: false,
                changed_ns: 0,
                entries_ns: 0,
                atime_ns: None,
                unlinked: false,
                backing: None,
            },
        );
        Vfs {
            remote,
            store,
            writeback,
            leases,
            writable: Default::default(),
            share_leases: Default::default(),
            leases_epoch: AtomicU64::new(0),
            meta,
            config,
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            hot: Mutex::new(VecDeque::new()),
            watching: Default::default(),
            invalidate: OnceLock::new(),
            kernel_reads: AtomicU64::new(0),
            kernel_read_bytes: AtomicU64::new(0),
            behind: Arc::new(tokio::sync::Semaphore::new(WRITE_BEHIND as usize)),
            next_behind: AtomicU64::new(1),
            flats,
            passthrough: AtomicBool::new(false),
            write_passthrough: AtomicBool::new(false),
            passthrough_opens: AtomicU64::new(0),
            mount_dev: std::sync::OnceLock::new(),
        }
    }

    /// The mount's device number (its root's `st_dev`).
    pub fn set_mount_dev(&self, dev: u64) {
        let _ = self.mount_dev.set(dev);
    }

    /// Whether a process that writes `ino`'s staging through the kernel
    /// maps it ([`Staged::mapped`]). Reading a process's maps waits while
    /// it execs, and an exec waits for the FLUSH of each descriptor it
    /// closes, which may be waiting here: so the look runs on a blocking
    /// thread and is given up after [`PROC_WAIT`], the answer then "it may
    /// map it" (the look ends once the exec has).
    pub(super) async fn staging_mapped(&self, ino: Ino, staged: &Arc<Staged>) -> bool {
        let (staged, shown) = (staged.clone(), self.mount_dev.get().map(|&dev| (dev, ino)));
        let look = tokio::task::spawn_blocking(move || staged.mapped(shown));
        !matches!(tokio::time::timeout(PROC_WAIT, look).await, Ok(Ok(false)))
    }

    /// The kernel accepted passthrough (FUSE_PASSTHROUGH at init): opens of
    /// versions with a whole copy may use it, and so may writes of fresh
    /// stagings if the write-back folder shows every write in the mtime.
    pub fn enable_passthrough(&self) {
        if self.flats.is_some() {
            self.passthrough.store(true, Ordering::SeqCst);
            let shown = crate::mount::stage::writes_show_in_mtime(&self.writeback.fresh_path(""));
            if !shown {
                tracing::info!("the write-back folder's file system does not show every write in a file's mtime: writes go through mountd");
            }
            self.write_passthrough.store(shown, Ordering::SeqCst);
        }
    }

    /// Opens answered with a backing file, and the whole copies ready
    /// (count, bytes).
    pub fn passthrough_stats(&self) -> (u64, usize, u64) {
        let (copies, bytes) = self.flats.as_ref().map_or((0, 0), |f| f.stats());
        (self.passthrough_opens.load(Ordering::Relaxed), copies, bytes)
    }

    /// Drop the whole copies; returns the bytes freed.
    pub fn clear_flats(&self) -> u64 {
        self.flats.as_ref().map_or(0, |f| f.clear())
    }

    /// (READ requests, bytes they asked for) since the mount: what the
    /// kernel's page cache did not answer.
    pub fn kernel_reads(&self) -> (u64, u64) {
        (self.kernel_reads.load(Ordering::Relaxed), self.kernel_read_bytes.load(Ordering::Relaxed))
    }

    pub fn set_invalidator(&self, f: Box<dyn Fn(Inval) + Send + Sync>) {
        let _ = self.invalidate.set(Arc::from(f));
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    pub fn is_watching(&self) -> bool {
        self.watching.load(Ordering::SeqCst)
    }

    pub fn set_watching(&self, on: bool) {
        self.watching.store(on, Ordering::SeqCst);
    }

    fn fresh(&self, at: Option<Instant>) -> bool {
        match at {
            Some(t) => self.watching.load(Ordering::SeqCst) || t.elapsed() < ATTR_TTL,
            None => false,
        }
    }

    fn attr_of(&self, inodes: &Inodes, ino: Ino, n: &Inode) -> Attr {
        let mut perm = (n.mode & 0o7777) as u16;
        let writable = n.virtual_data.is_none() && n.share.as_ref().is_some_and(|s| self.share_writable(s));
        if !writable {
            // What a partner shares without write is readable whatever its
            // mode there: the mounting user could not chmod it.
            perm &= !0o222;
            perm |= if n.kind == Kind::Dir { 0o500 } else { 0o400 };
        }
        let (size, mtime_ns) = match &n.staged {
            Some(st) => {
                let st = st.current();
                (st.size, st.mtime_ns)
            }
            None => (n.size, n.mtime_ns),
        };
        let mtime_ns = mtime_ns.max(n.entries_ns);
        let nlink = match n.kind {
            Kind::File if n.unlinked || n.detached => 0,
            Kind::File => 1,
            // A count from a listing that may be stale could be too low,
            // and `fts` takes 2 for "no subdirectories".
            Kind::Dir => match &n.children {
                Some((c, at)) if self.fresh(Some(*at)) => {
                    2 + c.iter().filter(|(_, i)| inodes.by_ino.get(i).is_some_and(|c| c.kind == Kind::Dir)).count() as u32
                }
                _ => 1,
            },
        };
        Attr {
            ino,
            kind: n.kind,
            size,
            atime_ns: n.atime_ns.unwrap_or(mtime_ns),
            mtime_ns,
            ctime_ns: mtime_ns.max(n.changed_ns),
            perm,
            nlink,
        }
    }

    /// Whether writes to `share` may go back: granted `write`, and the
    /// mount is not `--read-only`.
    pub fn share_writable(&self, share: &Name) -> bool {
        !self.config.read_only && lock(&self.writable).contains(share)
    }

    /// The shares the mount has seen a name of.
    pub fn known_shares(&self) -> Vec<Name> {
        let inodes = lock(&self.inodes);
        let mut shares: Vec<Name> = inodes.by_ino.values().filter_map(|n| n.share.clone()).collect();
        shares.sort();
        shares.dedup();
        shares
    }

    /// Offline, from the last known listing of the partner's shares
    /// ([`root_entries`]): which of them we may write. Nothing is changed
    /// once the partner has said it.
    pub fn set_access_from_listing(&self, entries: &[Entry]) {
        let mut writable = lock(&self.writable);
        if writable.is_empty() {
            *writable = entries.iter().filter(|e| e.mode & 0o200 != 0).filter_map(|e| Name::new(e.path.as_str()).ok()).collect();
        }
    }

    /// Record which shares the partner lets us write (from DISCOVER rows).
    pub fn set_access(&self, rows: &[crate::proto::ShareRow]) {
        *lock(&self.writable) = rows.iter().filter(|r| r.access.can_write()).map(|r| r.name.clone()).collect();
    }

    fn node_key(&self, ino: Ino) -> Result<(Option<Name>, SharePath, Kind), Errno> {
        let inodes = lock(&self.inodes);
        let n = inodes.by_ino.get(&ino).ok_or(Errno::ENOENT)?;
        if n.detached {
            return Err(Errno::ESTALE);
        }
        Ok((n.share.clone(), n.path.clone(), n.kind))
    }

    /// Whether file `ino` is missing from its directory's listing while
    /// that listing is trusted: the partner removed or renamed the name
    /// (or it became another file's) and the change is not announced yet.
    /// The kernel may still hold an entry for the name, for up to
    /// [`crate::mount::fuse`]'s entry timeout; an open through it must
    /// not find this inode's content, but fail with `ESTALE`, which the
    /// kernel retries with a fresh lookup (`ENOENT`, or the new file).
    /// Not for a file created here and not pushed yet, nor one unlinked
    /// while open (reopened through `/proc/PID/fd`), which no listing has.
    fn unlisted(&self, inodes: &Inodes, ino: Ino) -> bool {
        let Some(n) = inodes.by_ino.get(&ino) else { return false };
        if n.kind != Kind::File || n.unlinked || n.virtual_data.is_some() || inodes.is_local_only(ino) {
            return false;
        }
        // Judged by its directory's listing only while that directory is
        // still the one its path leads to.
        let Some(dir) = n.path.parent() else { return false };
        if inodes.by_key.get(&(share_key(&n.share), dir)) != Some(&n.parent) {
            return false;
        }
        match inodes.by_ino.get(&n.parent).and_then(|p| p.children.as_ref()) {
            // Listed (or its attributes had from the partner) since that
            // listing was made: no need to look through it.
            Some((c, at)) if self.fresh(Some(*at)) => n.attr_at.is_none_or(|t| t < *at) && !c.iter().any(|(_, i)| *i == ino),
            _ => false,
        }
    }

    /// The inode for a child entry, created or updated from a listing row
    /// asked for at `asked`.
    fn upsert(inodes: &mut Inodes, parent: Ino, share: Option<Name>, e: &Entry, asked: Instant) -> Ino {
        let now = Instant::now();
        let key = (share_key(&share), e.path.clone());
        let kind = match e.kind {
            EntryKind::File => Kind::File,
            EntryKind::Dir => Kind::Dir,
        };
        if let Some(&ino) = inodes.by_key.get(&key) {
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                if n.dropped_at.is_some_and(|d| d > asked) && n.kind == kind {
                    // Older than a change made here since: keep asking.
                    return ino;
                }
                let moved = n.size != e.size || n.mtime_ns != e.mtime_ns || n.kind != kind;
                if moved && inodes.detach(ino) {
                    return Self::upsert(inodes, parent, share, e, asked);
                }
                let Some(n) = inodes.by_ino.get_mut(&ino) else { return ino };
                if moved {
                    n.manifest = None;
                }
                // Listed in `parent`: that is its directory now, even if it
                // was first seen under another inode of the same path (a
                // directory removed here, then made again).
                n.parent = parent;
                n.kind = kind;
                n.size = e.size;
                n.mtime_ns = e.mtime_ns;
                n.mode = e.mode;
                n.attr_at = Some(now);
                inodes.set_local_only(ino, false);
                return ino;
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes.by_key.insert(key, ino);
        inodes.by_ino.insert(
            ino,
            Inode {
                share,
                path: e.path.clone(),
                parent,
                kind,
                size: e.size,
                mtime_ns: e.mtime_ns,
                mode: e.mode,
                attr_at: Some(now),
                children: None,
                manifest: None,
                known: None,
                cached_version: None,
                staged: None,
                virtual_data: None,
                local_seq: 0,
                dropped_at: None,
                shown_size: AtomicU64::new(NOT_SHOWN),
                readers: 0,
                detached: false,
                changed_ns: 0,
                entries_ns: 0,
                atime_ns: None,
                unlinked: false,
                backing: None,
            },
        );
        ino
    }

    /// The entries of a directory inode, from the partner or, offline, from
    /// the last known state.
    async fn fetch_listing(&self, share: &Option<Name>, path: &SharePath) -> Result<Vec<(String, Option<Name>, Entry)>, Errno> {
        match share {
            None => {
                let filter = match &self.config.root {
                    Root::Shares(f) => f.clone(),
                    Root::Share(_) => None,
                };
                let rows = match self.remote.discover().await {
                    Ok(rows) => {
                        self.set_access(&rows);
                        let entries = root_entries(&rows);
                        self.save_listing(ROOT_SHARE, path, &entries);
                        entries
                    }
                    Err(e) => {
                        let entries = self.offline_listing(ROOT_SHARE, path, e)?;
                        self.set_access_from_listing(&entries);
                        entries
                    }
                };
                Ok(rows
                    .into_iter()
                    .filter(|e| filter.as_ref().is_none_or(|f| f.as_str() == e.path.as_str()))
                    .filter_map(|e| {
                        let name = Name::new(e.path.as_str()).ok()?;
                        let entry = Entry { path: SharePath::root(), ..e };
                        Some((name.to_string(), Some(name), entry))
                    })
                    .collect())
            }
            Some(s) => {
                let entries = match self.remote.list(s, path).await {
                    Ok(entries) => {
                        self.save_listing(s.as_str(), path, &entries);
                        entries
                    }
                    Err(e) => self.offline_listing(s.as_str(), path, e)?,
                };
                Ok(entries
                    .into_iter()
                    .filter(|e| !e.path.is_root())
                    .filter_map(|e| Some((e.path.file_name()?.to_string(), Some(s.clone()), e)))
                    .collect())
            }
        }
    }

    fn save_listing(&self, share: &str, path: &SharePath, entries: &[Entry]) {
        if let Err(e) = self.meta.save_listing(share, path, entries) {
            tracing::warn!("{e}");
        }
    }

    fn offline_listing(&self, share: &str, path: &SharePath, e: RemoteError) -> Result<Vec<Entry>, Errno> {
        if let RemoteError::Offline { .. } = e {
            if let Some(entries) = self.meta.listing(share, path) {
                return Ok(entries);
            }
        }
        Err(Errno::from_remote(&e))
    }

    /// The children of directory `ino`: (name, inode).
    async fn children(&self, ino: Ino) -> Result<Vec<(String, Ino)>, Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        if kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        {
            let inodes = lock(&self.inodes);
            if let Some((c, at)) = inodes.by_ino.get(&ino).and_then(|n| n.children.as_ref()) {
                if self.fresh(Some(*at)) {
                    return Ok(c.clone());
                }
            }
        }
        // Files created here whose push is neither under way nor queued
        // (it ended as a conflict copy): once a listing asked for after
        // now lacks them, they are gone. Judged before asking, so a push
        // that completes meanwhile is in the listing.
        let orphans = self.orphans(ino);
        // A change made here while the listing was on its way (a create
        // pushed, a rename), or one the partner announced meanwhile (a
        // lease taken, which the listing's `.NAME.lock` entries may lack),
        // may be missing from it: ask again.
        let mut tries = 0;
        let (rows, locks, mut inodes, asked_at) = loop {
            let asked_at = Instant::now();
            let asked = self.local_seq(ino);
            let rows = self.fetch_listing(&share, &path).await?;
            let locks = match &share {
                Some(s) => self.lock_entries(s, &path).await,
                None => Vec::new(),
            };
            let inodes = lock(&self.inodes);
            let seq = inodes.by_ino.get(&ino).map_or(0, |n| n.local_seq);
            tries += 1;
            if seq == asked || tries == 3 {
                break (rows, locks, inodes, asked_at);
            }
        };
        let now = Instant::now();
        let mut children: Vec<(String, Ino)> =
            rows.iter().map(|(name, s, e)| (name.clone(), Self::upsert(&mut inodes, ino, s.clone(), e, asked_at))).collect();
        // Files created here and not pushed yet are ours to show, whether
        // or not the listing we had still names them.
        for (name, child) in inodes.local_children(ino) {
            if children.iter().any(|(n, _)| *n == name) {
                continue;
            }
            if orphans.contains(&child) {
                inodes.set_local_only(child, false);
                continue;
            }
            children.push((name, child));
        }
        for (name, entry, json) in locks {
            if children.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let child = Self::upsert(&mut inodes, ino, share.clone(), &entry, asked_at);
            if let Some(n) = inodes.by_ino.get_mut(&child) {
                n.virtual_data = Some(Arc::new(json));
            }
            children.push((name, child));
        }
        if let Some(n) = inodes.by_ino.get_mut(&ino) {
            n.children = Some((children.clone(), now));
        }
        drop(inodes);
        self.drop_stale_entries();
        Ok(children)
    }

    /// The files of directory `dir` created here that nothing will push
    /// any more: no staging, no queue entry.
    fn orphans(&self, dir: Ino) -> HashSet<Ino> {
        let candidates: Vec<(Ino, Option<Name>, SharePath)> = {
            let inodes = lock(&self.inodes);
            inodes
                .local_children(dir)
                .into_iter()
                .filter_map(|(_, i)| inodes.by_ino.get(&i).filter(|n| n.staged.is_none()).map(|n| (i, n.share.clone(), n.path.clone())))
                .collect()
        };
        let partner = self.remote.partner().to_string();
        candidates
            .into_iter()
            .filter(|(_, share, path)| share.as_ref().is_some_and(|s| !self.writeback.pending(&partner, s, path)))
            .map(|(i, _, _)| i)
            .collect()
    }

    /// Make the kernel forget inode `ino`'s attributes, and wait (a
    /// moment at most) until it has.
    async fn drop_kernel_attrs(&self, ino: Ino) {
        let Some(f) = self.invalidate.get() else { return };
        let (tx, rx) = tokio::sync::oneshot::channel();
        f(Inval::Attrs(ino, tx));
        if tokio::time::timeout(Duration::from_secs(1), rx).await.is_err() {
            tracing::debug!(ino, "the kernel's attributes were not dropped within 1 s");
        }
    }

    /// Make the kernel drop the entries of names whose inode was detached
    /// ([`Inodes::detach`]).
    fn drop_stale_entries(&self) {
        let stale = std::mem::take(&mut lock(&self.inodes).stale_entries);
        if let Some(f) = self.invalidate.get() {
            for (parent, name) in stale {
                f(Inval::Entry(parent, name));
            }
        }
    }

    fn local_seq(&self, dir: Ino) -> u64 {
        lock(&self.inodes).by_ino.get(&dir).map_or(0, |n| n.local_seq)
    }

    /// Record a change made here to the entries of directory `dir`. The
    /// change moved the directory's mtime on the partner too, and the
    /// watch does not echo our own changes: its attributes are asked for
    /// again (rsync sets a directory's time after its last rename, then
    /// stats it to check, and must see the partner's value).
    fn touched(inodes: &mut Inodes, dir: Ino) {
        if let Some(n) = inodes.by_ino.get_mut(&dir) {
            n.local_seq += 1;
            n.attr_at = None;
            n.dropped_at = Some(Instant::now());
        }
    }

    /// Directory `dir` gained, lost or renamed an entry through this mount:
    /// as on a local disk, its mtime and ctime move now, before the
    /// partner's do (a file created here reaches the partner at its close).
    fn entries_changed(inodes: &mut Inodes, dir: Ino) {
        Self::touched(inodes, dir);
        if let Some(n) = inodes.by_ino.get_mut(&dir) {
            let now = write::now_ns();
            n.entries_ns = now;
            n.changed_ns = now;
        }
    }

    pub async fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, Errno> {
        let children = self.children(parent).await?;
        let ino = children.iter().find(|(n, _)| n == name).map(|(_, i)| *i).ok_or(Errno::ENOENT)?;
        self.cached_attr(ino)
    }

    fn cached_attr(&self, ino: Ino) -> Result<Attr, Errno> {
        let inodes = lock(&self.inodes);
        let n = inodes.by_ino.get(&ino).ok_or(Errno::ENOENT)?;
        Ok(self.attr_of(&inodes, ino, n))
    }

    /// The kernel was handed `size` for `ino` (the FUSE adapter tells,
    /// for every reply that carries attributes): see [`Inode::shown_size`].
    pub fn shown(&self, ino: Ino, size: u64) {
        self.shown_all(&[(ino, size)]);
    }

    /// [`Vfs::shown`] of many (inode, size): a listing's, under one lock.
    pub fn shown_all(&self, shown: &[(Ino, u64)]) {
        let inodes = lock(&self.inodes);
        for (ino, size) in shown {
            if let Some(n) = inodes.by_ino.get(ino) {
                n.shown_size.store(*size, Ordering::SeqCst);
            }
        }
    }

    pub async fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let (fresh, parent, parent_listed, share, path) = {
            let inodes = lock(&self.inodes);
            let n = inodes.by_ino.get(&ino).ok_or(Errno::ENOENT)?;
            if n.detached {
                // The version its open handles read.
                return Ok(self.attr_of(&inodes, ino, n));
            }
            let listed = inodes.by_ino.get(&n.parent).and_then(|p| p.children.as_ref()).is_some_and(|(_, at)| self.fresh(Some(*at)));
            // The root of an all-shares mount is made up here.
            let fresh = self.fresh(n.attr_at) || (ino == ROOT_INO && n.share.is_none());
            (fresh, n.parent, listed || ino == ROOT_INO, n.share.clone(), n.path.clone())
        };
        if !fresh && parent_listed {
            // Dropped by a change made here while the parent's listing is
            // still trusted, or a share's root: ask for this entry alone.
            if let Some(share) = share.filter(|_| !lock(&self.inodes).is_local_only(ino)) {
                let asked = Instant::now();
                match self.remote.stat(&share, &path).await {
                    Ok(e) => {
                        let mut inodes = lock(&self.inodes);
                        // A file being written here keeps what it has, and
                        // an answer older than a change made here is dropped.
                        let current = |n: &&mut Inode| n.staged.is_none() && n.dropped_at.is_none_or(|d| d <= asked);
                        let moved = inodes.by_ino.get(&ino).is_some_and(|n| n.size != e.size || n.mtime_ns != e.mtime_ns);
                        if !(moved && inodes.detach(ino)) {
                            if let Some(n) = inodes.by_ino.get_mut(&ino).filter(current) {
                                n.take_attrs(&e);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(ino, "attributes from the last known state: {e:?}"),
                }
            }
        } else if !fresh {
            // Refresh through the parent's listing: one request answers for
            // every sibling `ls -l` will ask about next.
            match self.children(parent).await {
                Ok(c) if c.iter().any(|(_, i)| *i == ino) => {}
                Ok(_) => return Err(Errno::ENOENT),
                Err(e) => tracing::debug!(ino, "attributes from the last known state: {e:?}"),
            }
        }
        self.drop_stale_entries();
        self.cached_attr(ino)
    }

    /// List the root now, so that the first lookup through the mount finds
    /// it listed (see the watch loop in [`super`]).
    pub async fn warm_root(&self) {
        if let Err(e) = self.children(ROOT_INO).await {
            tracing::debug!(partner = %self.remote.partner(), "root not listed ahead of use: {e:?}");
        }
    }

    /// (name, attr) of every child, for readdir.
    pub async fn readdir(&self, ino: Ino) -> Result<Vec<(String, Attr)>, Errno> {
        let children = self.children(ino).await?;
        let inodes = lock(&self.inodes);
        Ok(children.into_iter().filter_map(|(name, i)| Some((name, self.attr_of(&inodes, i, inodes.by_ino.get(&i)?)))).collect())
    }

    /// The share and path an inode names (None for an all-shares root).
    pub fn share_path(&self, ino: Ino) -> Option<(Name, SharePath)> {
        let (share, path, _) = self.node_key(ino).ok()?;
        Some((share?, path))
    }

    pub fn parent_of(&self, ino: Ino) -> Ino {
        lock(&self.inodes).by_ino.get(&ino).map_or(ROOT_INO, |n| n.parent)
    }

    /// The manifest of file `ino`: the one we have while it is current,
    /// else the last one known here if the partner's file still has its
    /// hash, else a fresh DESCRIBE, else (offline) the last saved one.
    async fn manifest(&self, ino: Ino) -> Result<(Name, SharePath, Arc<Manifest>), Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        if kind != Kind::File {
            return Err(Errno::EISDIR);
        }
        let share = share.ok_or(Errno::EISDIR)?;
        let known = {
            let inodes = lock(&self.inodes);
            let n = inodes.by_ino.get(&ino);
            if let Some(m) = n.and_then(|n| n.manifest.clone()) {
                if self.watching.load(Ordering::SeqCst) {
                    return Ok((share, path, m));
                }
            }
            n.and_then(|n| n.known.clone())
        };
        // A DESCRIBE_PART of no bytes is FILE_PART's head alone: the current
        // version's size and file hash, which commits to its chunk list. A
        // file re-saved here and not changed since is described without
        // its manifest (about 90 bytes a chunk, 0.34 MB for 1 GiB).
        if let Some(known) = known.filter(|k| k.size > 0) {
            match self.remote.describe_start(&share, &path, 0).await {
                Ok(Some(s)) if s.described.manifest.file_hash == known.file_hash && s.described.manifest.size == known.size => {
                    self.take_version(ino, &known, s.described.mtime_ns, s.described.mode, true).await?;
                    return Ok((share, path, known));
                }
                // Changed, offline, or no PART: as if nothing were known.
                Ok(_) | Err(RemoteError::Offline { .. }) => {}
                Err(e) => return Err(Errno::from_remote(&e)),
            }
        }
        let (manifest, mtime_ns, mode) = match self.remote.describe(&share, &path).await {
            Ok(d) => {
                let known = KnownFile { manifest: (*d.manifest).clone(), mtime_ns: d.mtime_ns, mode: d.mode };
                self.meta.save_manifest_later(&share, &path, known);
                (d.manifest, d.mtime_ns, d.mode)
            }
            Err(e @ RemoteError::Offline { .. }) => match self.meta.manifest(&share, &path) {
                Some(k) => (Arc::new(k.manifest), k.mtime_ns, k.mode),
                None => {
                    tracing::warn!(partner = %self.remote.partner(), %path, "cannot open: {e}");
                    return Err(Errno::EIO);
                }
            },
            Err(e) => return Err(Errno::from_remote(&e)),
        };
        self.take_version(ino, &manifest, mtime_ns, mode, true).await?;
        Ok((share, path, manifest))
    }

    /// Show the version `manifest` names as file `ino`'s; keep the manifest
    /// as the inode's if it is `whole` (not only its start). Fails with
    /// `ESTALE` if read handles open on `ino` read another version: the
    /// inode stays theirs ([`Inodes::detach`]), and the kernel retries the
    /// open with a fresh lookup, which finds a new inode.
    async fn take_version(&self, ino: Ino, manifest: &Arc<Manifest>, mtime_ns: i64, mode: u32, whole: bool) -> Result<(), Errno> {
        let moved = {
            let mut inodes = lock(&self.inodes);
            let other = inodes.by_ino.get(&ino).is_some_and(|n| n.size != manifest.size || n.mtime_ns != mtime_ns);
            if other && inodes.detach(ino) {
                drop(inodes);
                self.drop_stale_entries();
                return Err(Errno::ESTALE);
            }
            let n = inodes.by_ino.get_mut(&ino);
            // Against what the kernel was shown, too: a listing since may
            // have brought the new size into this table alone.
            let moved = n.as_ref().is_some_and(|n| {
                let shown = n.shown_size.load(Ordering::SeqCst);
                n.staged.is_none() && (n.size != manifest.size || n.mtime_ns != mtime_ns || (shown != NOT_SHOWN && shown != manifest.size))
            });
            if let Some(n) = n {
                n.size = manifest.size;
                n.mtime_ns = mtime_ns;
                n.mode = mode;
                n.manifest = whole.then(|| manifest.clone());
                if whole {
                    n.known = Some(manifest.clone());
                }
            }
            moved
        };
        if moved {
            // The kernel may hold the size we showed before this version
            // (a stat just before the change reached us), and it ends
            // reads there: a read of the new version would stop short.
            // Its attributes are dropped before the open returns, so the
            // first read asks for them again.
            self.drop_kernel_attrs(ino).await;
            if let Some(n) = lock(&self.inodes).by_ino.get(&ino) {
                let _ = n.shown_size.compare_exchange(manifest.size, NOT_SHOWN, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Open file `ino` for reading. Returns the handle, whether the kernel
    /// may keep the pages it cached of this file (same version as last
    /// time), and how the kernel is to read it: `backing` registers a whole
    /// copy of the version for passthrough ([`crate::flat`]).
    async fn open_read(&self, ino: Ino, backing: MakeBacking<'_>) -> Result<(u64, bool, Io), Errno> {
        let (virtual_data, staged) = {
            let inodes = lock(&self.inodes);
            let n = inodes.by_ino.get(&ino).ok_or(Errno::ENOENT)?;
            // Written here since the kernel started reading it from a copy.
            if n.backing.as_ref().is_some_and(|b| b.version.is_some()) && n.staged.is_some() {
                drop(inodes);
                return self.leave_backed(ino);
            }
            // The handle is counted while the table is locked, so that a
            // release elsewhere cannot retire the staging under us.
            let staged = n.staged.clone().filter(|_| n.virtual_data.is_none());
            if let Some(s) = &staged {
                s.state().handles += 1;
            }
            (n.virtual_data.clone(), staged)
        };
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        if let Some(data) = virtual_data {
            lock(&self.handles).insert(fh, Handle::Virtual(data));
            return Ok((fh, false, Io::Cached));
        }
        if let Some(staged) = staged {
            let io = self.staged_io(ino, &staged, false, None, backing);
            lock(&self.handles).insert(
                fh,
                Handle::Staged(StagedHandle {
                    ino,
                    passthrough: matches!(io, Io::Passthrough(_)),
                    staged,
                    write: false,
                    append: false,
                    lease: None,
                    changes: 0,
                    writers: Vec::new(),
                    flushed: 0,
                }),
            );
            return Ok((fh, false, io));
        }
        let (share, path, manifest, rest) = self.manifest_to_open(ino).await?;
        let hold = self.store.hold(manifest.chunks.iter().map(|c| c.hash));
        let pass = self.passthrough.load(Ordering::SeqCst);
        let copy = self.flats.as_ref().filter(|_| pass && rest.is_none()).and_then(|f| f.open_copy(&manifest.file_hash));
        let (keep, io) = {
            let mut inodes = lock(&self.inodes);
            match inodes.by_ino.get_mut(&ino) {
                // Detached while this open asked: its name is another inode's.
                Some(n) if n.detached => return Err(Errno::ESTALE),
                // Read from a copy of another version (the open raced a
                // change): the name goes to a new inode.
                Some(n) if n.backing.as_ref().is_some_and(|b| b.version != Some(manifest.file_hash)) => {
                    drop(inodes);
                    return self.leave_backed(ino);
                }
                Some(n) => {
                    n.readers += 1;
                    let io = self.read_io(n, manifest.file_hash, copy, backing);
                    (n.cached_version.replace(manifest.file_hash) == Some(manifest.file_hash), io)
                }
                None => (false, Io::Cached),
            }
        };
        let passthrough = matches!(io, Io::Passthrough(_));
        if passthrough {
            self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        }

        if !keep {
            // A fresh open is most often followed by a read at offset 0
            // (`cat`, `cp`, `head`, `file`): ask for the chunk(s) of the
            // kernel's first read now, a round trip before that read
            // reaches us, which then waits on this fetch instead of asking.
            // Only those: a random reader fetches one chunk it may not touch,
            // not the first read's whole readahead.
            let first: Vec<u32> = Self::covering(&manifest, 0, FIRST_READ.min(manifest.size)).map(|i| i as u32).collect();
            if !first.is_empty() {
                self.remote.prefetch(share.clone(), path.clone(), manifest.clone(), first);
            }
        }
        let handle = ReadHandle { ino, share, path, manifest, rest, _hold: hold, last_end: 0, run: 0, ahead_until: 0, passthrough };
        lock(&self.handles).insert(fh, Handle::Read(handle));
        Ok((fh, keep, io))
    }

    /// How the kernel is to do the I/O of a new handle of `ino` on its
    /// staging `staged` (already counted in the staging's handles): on the
    /// staging file itself (FUSE passthrough: no write or read of it
    /// reaches mountd) while other handles of the inode do, or, for a
    /// `fresh` staging (a new file, a truncating open) that nothing else
    /// has open, from now on; else through mountd. What the kernel writes
    /// there is taken in from the file ([`Staged::absorb`]).
    /// `writer`: for a handle that writes, the opening thread and whether
    /// it may also read (and so map the file for writing).
    pub(super) fn staged_io(
        &self,
        ino: Ino,
        staged: &Arc<Staged>,
        fresh: bool,
        writer: Option<(u32, bool)>,
        backing: MakeBacking<'_>,
    ) -> Io {
        // Its process, looked up before the inodes are locked (a read of
        // `/proc`).
        let writer = writer.map(|(tid, may_map)| (crate::mount::leases::process_of(tid) as u32, may_map));
        let mut inodes = lock(&self.inodes);
        let Some(n) = inodes.by_ino.get_mut(&ino).filter(|n| n.staged.as_ref().is_some_and(|s| Arc::ptr_eq(s, staged))) else {
            return Io::Cached;
        };
        if let Some(b) = &mut n.backing {
            if b.version.is_some() {
                // A whole copy: the caller left it for a new inode.
                return Io::Cached;
            }
            if let Some((opener, may_map)) = writer {
                if !staged.kernel_open(opener, may_map) {
                    // Bytes still to fetch (cannot be while the kernel has
                    // it): mountd writes it, beside the kernel's readers.
                    return Io::Cached;
                }
            }
            b.handles += 1;
            self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            return Io::Passthrough(b.token.clone());
        }
        let alone = n.readers == 0 && staged.state().handles == 1;
        let enabled = self.passthrough.load(Ordering::SeqCst) && self.write_passthrough.load(Ordering::SeqCst);
        if !fresh || !alone || !enabled || !staged.complete() {
            return Io::Cached;
        }
        match backing(&staged.file) {
            Ok(token) => {
                n.backing = Some(Backing { token: token.clone(), version: None, handles: 1 });
                if let Some((opener, may_map)) = writer {
                    staged.kernel_open(opener, may_map);
                }
                tracing::debug!(path = %n.path, "the kernel writes this file's staging itself (passthrough)");
                self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                let key = n.share.clone().map(|s| (s, n.path.clone()));
                drop(inodes);
                if let Some((share, path)) = key {
                    self.send_ahead(staged, share, path);
                }
                Io::Passthrough(token)
            }
            // An open made here, not by the kernel.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Io::Cached,
            Err(e) => {
                if self.passthrough.swap(false, Ordering::SeqCst) {
                    tracing::info!(partner = %self.remote.partner(), "passthrough unavailable ({e}): reads and writes go through mountd");
                }
                Io::Cached
            }
        }
    }

    /// Send the chunks the kernel writes into `staged` ahead of its first
    /// push ([`crate::mount::ahead`]), for a new file, unless that is
    /// turned off. A file rewritten whole over a version the partner has
    /// is not: its push is a delta of a few lines (SAME) and the chunks the
    /// partner lacks, where chunks sent ahead would be declared one line
    /// each, and cut twice here, for chunks the partner mostly has.
    fn send_ahead(&self, staged: &Arc<Staged>, share: Name, path: SharePath) {
        if !self.config.send_ahead || !matches!(staged.state().expect, crate::proto::Base::Absent) {
            return;
        }
        let Ok(file) = staged.file.try_clone() else { return };
        let target =
            crate::mount::ahead::Target { writeback: self.writeback.clone(), partner: self.remote.partner().to_string(), share, path };
        let sender = crate::mount::ahead::AheadSender::start(target, staged.data.clone(), file, self.writeback.chunk_params());
        *staged.ahead.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }

    /// A passthrough handle of `ino` on its staging is gone. Returns
    /// whether it was the last that wrote.
    pub(super) fn staged_io_closed(&self, ino: Ino, staged: &Arc<Staged>, write: bool) -> bool {
        if let Some(n) = lock(&self.inodes).by_ino.get_mut(&ino) {
            if let Some(b) = n.backing.as_mut().filter(|b| b.version.is_none()) {
                b.handles = b.handles.saturating_sub(1);
                if b.handles == 0 {
                    n.backing = None;
                }
            }
        }
        let last = write && staged.kernel_close();
        if last {
            // Nothing more to follow: a sender that sent nothing ends
            // here; one that did waits for the push that names it.
            let mut slot = staged.ahead.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(s) if s.has_sent() => s.stop(),
                _ => drop(slot.take()),
            }
        }
        last
    }

    /// How the kernel is to read a new read handle of inode `n` (already
    /// counted in its readers) on version `version`, given a whole `copy`
    /// of it if there is one.
    fn read_io(&self, n: &mut Inode, version: Hash, copy: Option<std::fs::File>, backing: MakeBacking<'_>) -> Io {
        if let Some(b) = &mut n.backing {
            b.handles += 1;
            return Io::Passthrough(b.token.clone());
        }
        // A cached open is still there (the kernel would refuse), or no copy.
        let Some(copy) = copy.filter(|_| n.readers == 1 && n.staged.is_none()) else { return Io::Cached };
        match backing(&copy) {
            Ok(token) => {
                tracing::debug!(path = %n.path, "reads of this version go to its whole copy (passthrough)");
                n.backing = Some(Backing { token: token.clone(), version: Some(version), handles: 1 });
                Io::Passthrough(token)
            }
            Err(e) => {
                if self.passthrough.swap(false, Ordering::SeqCst) {
                    tracing::info!(partner = %self.remote.partner(), "passthrough unavailable ({e}): re-reads go through the page cache");
                }
                Io::Cached
            }
        }
    }

    /// A read handle of `manifest`'s version closed: have a whole copy of
    /// the version made if it is all in the cache ([`crate::flat`]).
    pub(crate) fn make_flat(&self, ino: Ino, manifest: &Arc<Manifest>) {
        let Some(flats) = self.flats.as_ref().filter(|_| self.passthrough.load(Ordering::SeqCst)) else { return };
        if !flats.wants(&manifest.file_hash, manifest.size) {
            return;
        }
        let chunks: Vec<(Hash, u32)> = manifest.chunks.iter().map(|c| (c.hash, c.len)).collect();
        if self.store.bytes_present(&chunks) < manifest.size {
            return;
        }
        // The kernel drops the pages it cached of the file at the first
        // passthrough open (it refuses to keep them then): for a GiB of
        // them, that open took 0.1 s, a re-read's whole time. So they go
        // here, in the background, before the copy can be used.
        let invalidate = self.invalidate.get().cloned();
        flats.make(manifest.clone(), self.store.hold(manifest.chunks.iter().map(|c| c.hash)), move || {
            if let Some(f) = invalidate {
                let (tx, rx) = std::sync::mpsc::channel();
                f(Inval::Pages(ino, tx));
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
        });
    }

    /// Fail an open of `ino` that cannot share the backing file the kernel
    /// reads it from (an open for write, or of another version), if it has
    /// one: the inode is left to its passthrough handles ([`Inodes::detach`],
    /// as for a change on the partner) and the open fails with `ESTALE`,
    /// which the kernel retries with a fresh lookup, on a new inode.
    pub(crate) fn leave_backed<T>(&self, ino: Ino) -> Result<T, Errno> {
        tracing::debug!(ino, "an open the kernel cannot serve beside a passthrough one: to a new inode");
        let detached = lock(&self.inodes).detach(ino);
        if detached {
            self.drop_stale_entries();
        }
        Err(Errno::ESTALE)
    }

    /// Whether the kernel reads `ino` from a whole copy of a version.
    fn is_backed_by_copy(&self, ino: Ino) -> bool {
        lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.backing.as_ref().is_some_and(|b| b.version.is_some()))
    }

    /// Indices of the chunks covering [start, end).
    fn covering(m: &Manifest, start: u64, end: u64) -> std::ops::Range<usize> {
        if start >= end || m.chunks.is_empty() {
            return 0..0;
        }
        let first = m.chunks.partition_point(|c| c.end() <= start);
        let last = m.chunks.partition_point(|c| c.offset < end);
        first..last.max(first)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.kernel_reads.fetch_add(1, Ordering::Relaxed);
        self.kernel_read_bytes.fetch_add(u64::from(size), Ordering::Relaxed);
        let staged = match lock(&self.handles).get(&fh).ok_or(Errno::EBADF)? {
            Handle::Virtual(data) => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                return Ok(data[start..end].to_vec());
            }
            Handle::Staged(h) => Some((h.ino, h.staged.clone())),
            Handle::Read(_) => None,
        };
        if let Some((ino, staged)) = staged {
            return self.read_staged(ino, &staged, offset, size).await;
        }
        // Opened on the start of its manifest: past it, wait for the whole.
        let rest = match lock(&self.handles).get(&fh) {
            Some(Handle::Read(h)) => h.rest.clone().map(|r| {
                let past = offset.saturating_add(size as u64).min(h.manifest.size) > r.known_end();
                (r, past)
            }),
            _ => None,
        };
        if let Some((rest, past)) = rest {
            if rest.is_poisoned() {
                return Err(Errno::EIO);
            }
            self.take_rest(fh, &rest, past).await?;
        }
        let (share, path, manifest, ahead, rest) = {
            let mut handles = lock(&self.handles);
            let Some(Handle::Read(h)) = handles.get_mut(&fh) else { return Err(Errno::EBADF) };
            let end = offset.saturating_add(size as u64).min(h.manifest.size);
            let sequential = offset == h.last_end;
            h.run = if sequential { h.run + end.saturating_sub(offset) } else { 0 };
            if !sequential {
                h.ahead_until = 0;
            }
            h.last_end = end;
            // Read ahead as far as the reader has read sequentially (at
            // least FIRST_AHEAD, up to the configured window), asking for
            // the next stretch when it has used half of what was asked.
            let window = if sequential { h.run.max(FIRST_AHEAD).min(self.config.readahead) } else { 0 };
            // Not past the chunks known yet: the rest is read ahead once
            // the whole manifest is here.
            let known = h.rest.as_ref().map_or(u64::MAX, |r| r.known_end().max(end));
            let ahead = if window > 0 && end.saturating_add(window / 2) > h.ahead_until {
                let from = h.ahead_until.max(end);
                h.ahead_until = end.saturating_add(window).min(known);
                Some((from, h.ahead_until))
            } else {
                None
            };
            (h.share.clone(), h.path.clone(), h.manifest.clone(), ahead, h.rest.clone())
        };
        let end = offset.saturating_add(size as u64).min(manifest.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let range = Self::covering(&manifest, offset, end);
        if let Some((from, to)) = ahead {
            let next: Vec<u32> =
                Self::covering(&manifest, from, to.min(manifest.size)).filter(|i| *i >= range.end).map(|i| i as u32).collect();
            if !next.is_empty() {
                self.remote.prefetch(share.clone(), path.clone(), manifest.clone(), next);
            }
        }
        let indices: Vec<u32> = range.clone().map(|i| i as u32).collect();
        let mut out = Vec::with_capacity((end - offset) as usize);
        for attempt in 0..2 {
            out.clear();
            if let Err(e) = self.remote.fetch(&share, &path, &manifest, &indices).await {
                tracing::warn!(partner = %self.remote.partner(), %path, "read failed: {e}");
                return Err(match e {
                    RemoteError::Stale { .. } => Errno::ESTALE,
                    other => Errno::from_remote(&other),
                });
            }
            // Past half the start, a sequential reader will soon need the
            // rest: ask for it while the second half is read. Earlier, it
            // would slow the first reads, which most often are all there is
            // (`file`, `head`, a thumbnailer).
            if let Some(rest) = rest.as_ref().filter(|r| end > r.known_end() / 2) {
                rest.start();
            }
            let mut missing = false;
            for c in &manifest.chunks[range.clone()] {
                let from = offset.max(c.offset) - c.offset;
                let to = end.min(c.end()) - c.offset;
                let hot = self.hot(&c.hash);
                // Part of a chunk not in the hot set: read only that part
                // (a page the kernel dropped and a re-read asks for alone).
                if hot.is_none() && (from > 0 || to < u64::from(c.len)) {
                    let Ok(Some(part)) = self.store.get_range(&c.hash, from, to) else {
                        missing = true;
                        break;
                    };
                    out.extend_from_slice(&part);
                    continue;
                }
                let Some(data) = hot.or_else(|| self.chunk(&c.hash)) else {
                    missing = true;
                    break;
                };
                out.extend_from_slice(data.get(from as usize..to as usize).ok_or(Errno::EIO)?);
            }
            if !missing {
                return Ok(out);
            }
            // Evicted between fetch and read (a tiny cache under pressure):
            // fetch once more.
            if attempt == 1 {
                return Err(Errno::EIO);
            }
        }
        Err(Errno::EIO)
    }

    /// A chunk's bytes if it is in the hot set.
    fn hot(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        lock(&self.hot).iter().find(|(h, _)| h == hash).map(|(_, d)| d.clone())
    }

    /// A chunk's bytes, from the hot set or the store.
    fn chunk(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        if let Some(d) = self.hot(hash) {
            return Some(d);
        }
        let data = self.store.get(hash).ok().flatten()?;
        let mut hot = lock(&self.hot);
        if hot.len() >= HOT_CHUNKS {
            hot.pop_front();
        }
        hot.push_back((*hash, data.clone()));
        Some(data)
    }

    /// The partner says `path` of `share` changed: forget what we knew and
    /// tell the kernel.
    pub fn changed(self: &Arc<Self>, share: &Name, path: &SharePath) {
        tracing::debug!(%share, %path, "changed remotely");
        let mut drops = Vec::new();
        {
            let mut inodes = lock(&self.inodes);
            let key = share.to_string();
            let under = format!("{}/", path.as_str());
            // A file (or a name never seen): only it and its directory are
            // touched, found by key. Scanning every inode for each change
            // made a 10,000-file `tar x` quadratic. A directory, or the
            // root, still takes the scan for what lies under it.
            let known = inodes.by_key.get(&(key.clone(), path.clone())).copied();
            let is_dir = known.and_then(|i| inodes.by_ino.get(&i)).is_some_and(|n| n.kind == Kind::Dir);
            // A file read by open handles stays theirs; its name gets a new inode.
            if let Some(ino) = known.filter(|_| !is_dir) {
                inodes.detach(ino);
            }
            let candidates: Vec<Ino> = if !path.is_root() && !is_dir {
                let parent = path.parent().unwrap_or_else(SharePath::root);
                let mut c: Vec<Ino> = known.into_iter().chain(inodes.by_key.get(&(key.clone(), parent)).copied()).collect();
                if inodes.by_ino.get(&ROOT_INO).is_some_and(|r| r.share.is_none()) {
                    c.push(ROOT_INO);
                }
                c
            } else {
                inodes.by_ino.keys().copied().collect()
            };
            for ino in candidates {
                let Some(n) = inodes.by_ino.get_mut(&ino) else { continue };
                if n.detached {
                    continue;
                }
                let same_share = n.share.as_ref() == Some(share) || (n.share.is_none() && ino == ROOT_INO);
                if !same_share {
                    continue;
                }
                let hit =
                    path.is_root() || n.path == *path || path.parent().as_ref() == Some(&n.path) || n.path.as_str().starts_with(&under);
                if hit {
                    n.attr_at = None;
                    n.children = None;
                    n.manifest = None;
                    // A listing on its way now may predate the change: it
                    // is asked again rather than kept (see `children`).
                    n.local_seq += 1;
                    drops.push(Inval::Inode(ino));
                }
            }
            // A directory's entry stays: invalidating it would unhash the
            // dentry, and a process whose working directory it is would
            // get ENOENT from getcwd (git does). Its attributes and listing
            // are dropped above; were it removed, the next lookup says so.
            if let (Some(name), false) = (path.file_name(), is_dir) {
                let parent = path.parent().unwrap_or_else(SharePath::root);
                if let Some(&p) = inodes.by_key.get(&(key.clone(), parent)) {
                    drops.push(Inval::Entry(p, name.to_string()));
                }
            }
            // In all-shares mode the share itself sits in the root listing.
            if let Some(root) = inodes.by_ino.get_mut(&ROOT_INO) {
                if root.share.is_none() {
                    root.children = None;
                }
            }
        }
        self.drop_stale_entries();
        lock(&self.hot).clear();
        self.leases_epoch.fetch_add(1, Ordering::SeqCst);
        lock(&self.share_leases).remove(share);
        if let Some(f) = self.invalidate.get() {
            for d in drops {
                f(d);
            }
        }
        if self.is_pinned(share, path) {
            self.repin(share.clone(), path.clone());
        }
    }

    /// Fetch the new version of pinned content that changed remotely, and
    /// pin it in place of the old.
    fn repin(self: &Arc<Self>, share: Name, path: SharePath) {
        let me = self.clone();
        tokio::spawn(async move {
            let rel: std::path::PathBuf = match &me.config.root {
                Root::Share(_) => path.as_str().into(),
                Root::Shares(_) => std::path::Path::new(share.as_str()).join(path.as_str()),
            };
            let pinned = match me.resolve(&rel).await {
                Ok(ino) => me.pin(ino).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match pinned {
                Ok(()) => tracing::info!(%share, %path, "pinned content changed remotely: new version fetched"),
                Err(e) => tracing::warn!(%share, %path, "pinned content changed remotely; fetching the new version failed: {e:?}"),
            }
        });
    }

    fn is_pinned(&self, share: &Name, path: &SharePath) -> bool {
        self.meta
            .pinned()
            .iter()
            .any(|(s, p)| s == share && (p.is_root() || p == path || path.as_str().starts_with(&format!("{}/", p.as_str()))))
    }

    /// Resolve a path relative to the mount root to an inode.
    pub async fn resolve(&self, rel: &std::path::Path) -> Result<Ino, Errno> {
        let mut ino = ROOT_INO;
        for c in rel.components() {
            match c {
                std::path::Component::Normal(name) => {
                    let name = name.to_str().ok_or(Errno::ENOENT)?;
                    ino = self.lookup(ino, name).await?.ino;
                }
                std::path::Component::CurDir => {}
                _ => return Err(Errno::EINVAL),
            }
        }
        Ok(ino)
    }

    /// Every file under `ino` (itself if it is a file).
    async fn files_under(&self, ino: Ino) -> Result<Vec<Ino>, Errno> {
        let mut out = Vec::new();
        let mut todo = vec![ino];
        while let Some(i) = todo.pop() {
            match self.node_key(i)?.2 {
                Kind::File => out.push(i),
                Kind::Dir => todo.extend(self.children(i).await?.into_iter().map(|(_, c)| c)),
            }
        }
        Ok(out)
    }

    fn pin_key(share: &Name, path: &SharePath) -> String {
        format!("{share}/{}", path.as_str())
    }

    /// Pin `ino` (a file or a directory): fetch all its content now and
    /// keep it. Returns (files, bytes).
    pub async fn pin(&self, ino: Ino) -> Result<(usize, u64), Errno> {
        let (share, path, _) = self.node_key(ino)?;
        let share = share.ok_or(Errno::EINVAL)?;
        self.meta.set_pinned(&share, &path, true).map_err(|e| {
            tracing::error!("{e}");
            Errno::EIO
        })?;
        let files = self.files_under(ino).await?;
        let mut bytes = 0;
        for f in &files {
            let (s, p, m) = self.manifest(*f).await?;
            let hashes: Vec<Hash> = m.chunks.iter().map(|c| c.hash).collect();
            self.store.pin(&Self::pin_key(&s, &p), &hashes).map_err(|e| {
                tracing::error!("{e}");
                Errno::EIO
            })?;
            let all: Vec<u32> = (0..m.chunks.len() as u32).collect();
            for batch in all.chunks(64) {
                self.remote.fetch(&s, &p, &m, batch).await.map_err(|e| Errno::from_remote(&e))?;
            }
            bytes += m.size;
        }
        Ok((files.len(), bytes))
    }

    pub async fn unpin(&self, ino: Ino) -> Result<usize, Errno> {
        let (share, path, _) = self.node_key(ino)?;
        let share = share.ok_or(Errno::EINVAL)?;
        let _ = self.meta.set_pinned(&share, &path, false);
        let files = self.files_under(ino).await?;
        for f in &files {
            let (s, p, _) = self.node_key(*f)?;
            if let Some(s) = s {
                let _ = self.store.unpin(&Self::pin_key(&s, &p));
            }
        }
        Ok(files.len())
    }

    pub async fn status(&self, ino: Ino) -> Result<FileStatus, Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        match (kind, share) {
            (Kind::File, Some(share)) => {
                // Being written here: what this node holds of it, whether
                // or not the partner (reachable or not) has a version.
                let staged = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone());
                if let Some(staged) = staged {
                    let st = staged.current();
                    let missing: u64 = st.present.missing(0, st.size).iter().map(|(a, b)| b - a).sum();
                    return Ok(FileStatus {
                        kind: "file".into(),
                        size: st.size,
                        local_bytes: st.size.saturating_sub(missing),
                        pinned: self.is_pinned(&share, &path),
                        written_here: true,
                        ..Default::default()
                    });
                }
                let (_, _, m) = self.manifest(ino).await?;
                let chunks: Vec<(Hash, u32)> = m.chunks.iter().map(|c| (c.hash, c.len)).collect();
                Ok(FileStatus {
                    kind: "file".into(),
                    size: m.size,
                    local_bytes: self.store.bytes_present(&chunks),
                    pinned: self.is_pinned(&share, &path),
                    chunks: m.chunks.len(),
                    ..Default::default()
                })
            }
            (_, share) => {
                let pinned = share.as_ref().is_some_and(|s| self.is_pinned(s, &path));
                let mut st = FileStatus { kind: "dir".into(), pinned, ..Default::default() };
                for f in self.files_under(ino).await? {
                    let (_, _, m) = self.manifest(f).await?;
                    let chunks: Vec<(Hash, u32)> = m.chunks.iter().map(|c| (c.hash, c.len)).collect();
                    st.size += m.size;
                    st.local_bytes += self.store.bytes_present(&chunks);
                    st.chunks += m.chunks.len();
                }
                Ok(st)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkRef;

    fn manifest(lens: &[u32]) -> Manifest {
        let mut chunks = Vec::new();
        let mut offset = 0;
        for &len in lens {
            chunks.push(ChunkRef { offset, len, hash: Hash::of(&offset.to_le_bytes()) });
            offset += len as u64;
        }
        Manifest { size: offset, file_hash: Hash::of(b"f"), chunks }
    }

    #[test]
    fn covering_finds_exactly_the_chunks_a_range_touches() {
        let m = manifest(&[10, 10, 10]);
        assert_eq!(Vfs::covering(&m, 0, 1), 0..1);
        assert_eq!(Vfs::covering(&m, 9, 11), 0..2);
        assert_eq!(Vfs::covering(&m, 10, 20), 1..2);
        assert_eq!(Vfs::covering(&m, 25, 30), 2..3);
        assert_eq!(Vfs::covering(&m, 0, 30), 0..3);
        assert_eq!(Vfs::covering(&m, 30, 30), 0..0);
        assert_eq!(Vfs::covering(&manifest(&[]), 0, 5), 0..0);
    }
}
