//! The only `impl fuser::Filesystem`: a thin adapter that hands every call
//! to the [`Vfs`] on the tokio runtime and replies when it answers, so a
//! read waiting on the network never blocks `ls`, `stat` or a read of a
//! cached file. No policy lives here: attributes, errors and content all
//! come from the vfs.
//!
//! The calls of the write path ([`Fuse::run`]) are first tried on the FUSE
//! thread itself and go to the runtime only if they have to wait: a write
//! to a staged file, a cached lookup or a `utimens` kept for the push
//! answer without waking a worker (a `tar x` makes about six calls a file,
//! and on a busy machine each hand-off between threads costs more than
//! the call).

use super::vfs::{Attr, BackingToken, Inval, Io, Kind, OpenMode, Released, Vfs};
use fuser::{
    BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust an entry or attributes before asking
/// again. Remote changes are pushed to the kernel by invalidation, so this
/// only bounds staleness when a watch is down.
const TTL: Duration = Duration::from_secs(1);
/// What `stat` reports as the preferred I/O size: large reads keep the
/// chunk pipeline busy.
const BLKSIZE: u32 = 256 * 1024;

/// Directory listings snapshotted at opendir, by handle.
type DirHandles = Arc<Mutex<HashMap<u64, Vec<(String, Attr)>>>>;

pub struct Fuse {
    vfs: Arc<Vfs>,
    rt: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
    dirs: DirHandles,
    next_dir: AtomicU64,
}

impl Fuse {
    /// Poll `call` once here, on the FUSE thread, within the runtime's
    /// context; if it has to wait (the network, a lock, the blocking
    /// pool), the runtime polls it from then on. Every future polled with
    /// a waker keeps the latest one, so the first poll's no-op waker is
    /// never the one woken.
    fn run(&self, call: impl std::future::Future<Output = ()> + Send + 'static) {
        let _runtime = self.rt.enter();
        let mut call = Box::pin(call);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if call.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(call);
        }
    }
}

fn errno(e: super::errno::Errno) -> Errno {
    Errno::from_i32(e.0)
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A name the kernel sent, as the VFS takes it. A name longer than
/// NAME_MAX is `ENAMETOOLONG` whatever the operation; one that is not
/// UTF-8 (which no share path can hold) is `not_utf8`: `ENOENT` where the
/// name is looked for, `EINVAL` where it would be made.
fn entry_name(name: &OsStr, not_utf8: Errno) -> Result<String, Errno> {
    if name.len() > crate::proto::SharePath::MAX_COMPONENT {
        return Err(Errno::ENAMETOOLONG);
    }
    name.to_str().map(str::to_string).ok_or(not_utf8)
}

impl Fuse {
    /// The attributes shown for `.` and `..` of directory `ino`.
    fn dots(&self, ino: u64) -> [Attr; 2] {
        let me = Attr { ino, kind: Kind::Dir, size: 0, atime_ns: 0, mtime_ns: 0, ctime_ns: 0, perm: 0o555, nlink: 2 };
        [me, Attr { ino: self.vfs.parent_of(ino), ..me }]
    }

    pub fn new(vfs: Arc<Vfs>, rt: tokio::runtime::Handle) -> Fuse {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Fuse { vfs, rt, uid, gid, dirs: Default::default(), next_dir: AtomicU64::new(1) }
    }

    fn file_attr(uid: u32, gid: u32, a: &Attr) -> FileAttr {
        let t = time(a.mtime_ns);
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: time(a.atime_ns),
            mtime: t,
            ctime: time(a.ctime_ns),
            crtime: t,
            kind: match a.kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
            },
            perm: a.perm,
            nlink: a.nlink,
            uid,
            gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_BIG_WRITES,
        ];
        for flag in wanted {
            // Older kernels lack some: run without them.
            let _ = config.add_capabilities(flag);
        }
        // Reads of whole local copies by the kernel itself. A depth of 2
        // lets the copies sit on a stacked filesystem (a container's
        // overlayfs); the mount then cannot be a lower layer of one.
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(2).is_ok() {
            self.vfs.enable_passthrough();
        }
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (vfs, uid, gid) = (self.vfs.clone(), self.uid, self.gid);
        let name = match entry_name(name, Errno::ENOENT) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(async move {
            match vfs.lookup(parent.0, &name).await {
                Ok(a) => {
                    vfs.shown(a.ino, a.size);
                    reply.entry(&TTL, &Fuse::file_attr(uid, gid, &a), Generation(0))
                }
                Err(e) => {
                    tracing::trace!(parent = parent.0, name, "lookup: {e:?}");
                    reply.error(errno(e))
                }
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (vfs, uid, gid) = (self.vfs.clone(), self.uid, self.gid);
        self.run(async move {
            match vfs.getattr(ino.0).await {
                Ok(a) => {
                    vfs.shown(a.ino, a.size);
                    reply.attr(&TTL, &Fuse::file_attr(uid, gid, &a))
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = open_mode(req, flags.0, flags.acc_mode() != OpenAccMode::O_RDONLY);
        let (vfs, write) = (self.vfs.clone(), mode.write);
        let call = async move {
            let backing = |f: &std::fs::File| -> std::io::Result<BackingToken> { Ok(Arc::new(reply.open_backing(f)?)) };
            match vfs.open(ino.0, mode, &backing).await {
                Ok((fh, keep, io)) => opened(reply, fh, keep, io),
                Err(e) => reply.error(errno(e)),
            }
        };
        // An open for reading of a version already here answers at once
        // (no hand-off to a worker: a re-read's `cat` opens and waits);
        // one for writing may stage the file first, on the runtime.
        if write {
            self.rt.spawn(call);
        } else {
            self.run(call);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let vfs = self.vfs.clone();
        // A read of chunks in the cache answers here, without waking a
        // worker: after the kernel dropped a few pages of a file it keeps
        // (memory reclaim), a re-read asks for each missing page alone and
        // waits for it, so every hand-off shows in the re-read's time. A
        // read that waits on the network goes on on the runtime.
        self.run(async move {
            match vfs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.vfs.release(fh.0) {
            Some((ino, Released::Push)) => {
                // Changes no close pushed (a truncating open, nothing written).
                let vfs = self.vfs.clone();
                self.run(async move {
                    // close() has returned: make it durable before it goes.
                    if let Err(e) = vfs.push_durable(ino).await {
                        tracing::warn!(ino, "write-back at release failed: {e:?}");
                    }
                    vfs.retire_idle(ino);
                });
            }
            Some((ino, Released::Kernel)) => {
                let vfs = self.vfs.clone();
                self.run(async move { vfs.kernel_released(ino).await });
            }
            None => {}
        }
        reply.ok();
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let (vfs, tid) = (self.vfs.clone(), req.pid());
        self.run(async move { empty(reply, vfs.flush(fh.0, tid).await) });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let vfs = self.vfs.clone();
        self.run(async move { empty(reply, vfs.fsync(fh.0).await) });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (vfs, tid) = (self.vfs.clone(), req.pid());
        let data = data.to_vec();
        self.run(async move {
            match vfs.write(fh.0, offset, &data, tid).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let vfs = self.vfs.clone();
        self.run(async move { empty(reply, vfs.fallocate(fh.0, offset, length, mode).await) });
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let (vfs, uid, gid) = (self.vfs.clone(), self.uid, self.gid);
        let name = match entry_name(name, Errno::EINVAL) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let open = open_mode(req, flags, true);
        self.run(async move {
            let backing = |f: &std::fs::File| -> std::io::Result<BackingToken> { Ok(Arc::new(reply.open_backing(f)?)) };
            match vfs.create(parent.0, &name, mode & !umask, open, &backing).await {
                Ok((a, fh, io)) => {
                    vfs.shown(a.ino, a.size);
                    let attr = Fuse::file_attr(uid, gid, &a);
                    match io {
                        Io::Cached => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
                        Io::Passthrough(token) => match token.downcast_ref::<BackingId>() {
                            Some(id) => reply.created_passthrough(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty(), id),
                            // Only this adapter makes tokens, always of this type.
                            None => reply.error(Errno::EIO),
                        },
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (vfs, uid, gid) = (self.vfs.clone(), self.uid, self.gid);
        let name = match entry_name(name, Errno::EINVAL) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(async move {
            match vfs.mkdir(parent.0, &name, mode & !umask).await {
                Ok(a) => {
                    vfs.shown(a.ino, a.size);
                    reply.entry(&TTL, &Fuse::file_attr(uid, gid, &a), Generation(0))
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let vfs = self.vfs.clone();
        let name = match entry_name(name, Errno::ENOENT) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(async move { empty(reply, vfs.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let vfs = self.vfs.clone();
        let name = match entry_name(name, Errno::ENOENT) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(async move { empty(reply, vfs.rmdir(parent.0, &name).await) });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let vfs = self.vfs.clone();
        let (name, newname) = match (entry_name(name, Errno::ENOENT), entry_name(newname, Errno::EINVAL)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let tid = req.pid();
        self.run(async move { empty(reply, vfs.rename(parent.0, &name, newparent.0, &newname, noreplace, tid).await) });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (vfs, uid, gid) = (self.vfs.clone(), self.uid, self.gid);
        let ns = |t: TimeOrNow| {
            let t = match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            crate::time::Timestamp::from_system(t).0
        };
        let (atime_ns, mtime_ns) = (atime.map(ns), mtime.map(ns));
        let tid = req.pid();
        self.run(async move {
            match vfs.setattr(ino.0, mode.map(|m| m & 0o7777), size, (atime_ns, mtime_ns), fh.map(|f| f.0), tid).await {
                Ok(a) => {
                    vfs.shown(a.ino, a.size);
                    reply.attr(&TTL, &Fuse::file_attr(uid, gid, &a))
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (vfs, dirs) = (self.vfs.clone(), self.dirs.clone());
        let fh = self.next_dir.fetch_add(1, Ordering::SeqCst);
        self.rt.spawn(async move {
            match vfs.readdir(ino.0).await {
                Ok(entries) => {
                    dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, entries);
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entries) = dirs.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let dots = self.dots(ino.0);
        for i in offset as usize..entries.len() + 2 {
            let (name, a) = listing_entry(entries, &dots, i);
            let kind = if a.kind == Kind::Dir { FileType::Directory } else { FileType::RegularFile };
            if reply.add(INodeNo(a.ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entries) = dirs.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let dots = self.dots(ino.0);
        let mut shown = Vec::new();
        for i in offset as usize..entries.len() + 2 {
            let (name, a) = listing_entry(entries, &dots, i);
            if reply.add(INodeNo(a.ino), i as u64 + 1, name, &TTL, &Fuse::file_attr(self.uid, self.gid, &a), Generation(0)) {
                break;
            }
            if a.kind == Kind::File {
                shown.push((a.ino, a.size));
            }
        }
        self.vfs.shown_all(&shown);
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = self.vfs.store.stats();
        let bsize = 4096u64;
        let blocks = stats.limit_bytes / bsize;
        let free = stats.limit_bytes.saturating_sub(stats.used_bytes) / bsize;
        reply.statfs(blocks, free, free, 0, 0, bsize as u32, 255, bsize as u32);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if !mask.contains(fuser::AccessFlags::W_OK) {
            return reply.ok();
        }
        if self.vfs.read_only() {
            return reply.error(Errno::EROFS);
        }
        let vfs = self.vfs.clone();
        self.run(async move { empty(reply, vfs.may_write(ino.0).await) });
    }
}

/// Entry `i` of a directory listing: the dots, then the snapshot.
/// Indexed, so a call that starts at the kernel's offset walks nothing
/// before it (the kernel lists a large directory in many calls).
fn listing_entry<'a>(entries: &'a [(String, Attr)], dots: &[Attr; 2], i: usize) -> (&'a str, Attr) {
    match i {
        0 => (".", dots[0]),
        1 => ("..", dots[1]),
        _ => {
            let (n, a) = &entries[i - 2];
            (n.as_str(), *a)
        }
    }
}

/// Answer an open as the vfs decided.
fn opened(reply: ReplyOpen, fh: u64, keep: bool, io: Io) {
    match io {
        Io::Cached => reply.opened(FileHandle(fh), if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() }),
        // The kernel refuses FOPEN_KEEP_CACHE here (EINVAL): it drops the
        // pages it cached of the file at a passthrough open, which the
        // vfs had it do as soon as the copy was made.
        Io::Passthrough(token) => match token.downcast_ref::<BackingId>() {
            Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id),
            // Only this adapter makes tokens, always of this type.
            None => reply.error(Errno::EIO),
        },
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), super::errno::Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// How an open or create asks for the file.
fn open_mode(req: &Request, flags: i32, write: bool) -> OpenMode {
    OpenMode {
        write: write || flags & libc::O_TRUNC != 0,
        truncate: flags & libc::O_TRUNC != 0,
        append: flags & libc::O_APPEND != 0,
        read_write: flags & libc::O_ACCMODE == libc::O_RDWR,
        tid: req.pid(),
        internal: false,
    }
}

/// Forward the vfs's invalidations to the kernel.
/// Tell the kernel to drop cached pages and entries. The kernel may block
/// an invalidation until reads in flight on the same file finish, and those
/// reads are answered by the runtime's workers: so invalidations never run
/// on a worker, but on their own thread, fed through a channel. The thread
/// ends when the mount's vfs (which owns the sender) is dropped.
pub fn invalidator(notifier: fuser::Notifier) -> Box<dyn Fn(Inval) + Send + Sync> {
    let (tx, rx) = std::sync::mpsc::channel::<Inval>();
    let spawned = std::thread::Builder::new().name("fuse-inval".into()).spawn(move || {
        for inval in rx {
            tracing::trace!("invalidate {inval:?}");
            let r = match inval {
                Inval::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, 0),
                Inval::Entry(parent, name) => notifier.inval_entry(INodeNo(parent), OsStr::new(&name)),
                Inval::Pages(ino, done) => {
                    let r = notifier.inval_inode(INodeNo(ino), 0, 0);
                    let _ = done.send(());
                    r
                }
                // A negative offset: the attributes, not the pages.
                Inval::Attrs(ino, done) => {
                    let r = notifier.inval_inode(INodeNo(ino), -1, 0);
                    let _ = done.send(());
                    r
                }
            };
            if let Err(e) = r {
                tracing::debug!("kernel cache invalidation: {e}");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the invalidation thread ({e}): remote changes show only after the attribute timeout");
    }
    let tx = std::sync::Mutex::new(tx);
    Box::new(move |inval| {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(inval);
    })
}
