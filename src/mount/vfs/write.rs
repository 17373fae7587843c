//! The write half of the vfs: opening for write, staging, pushing on close
//! and fsync, namespace changes, and the leases that protect them.
//!
//! - Opening a file of a share granted `write` for write takes a lease on
//!   it for the handle's life; opening a *lockable* file in any mode, or
//!   renaming a file to a lockable name, takes one for the process's life.
//!   A lease held by another node makes the open fail with `EBUSY` (reads
//!   are not refused).
//! - Writes go to a [`Staged`] file. `fsync` pushes it: the base chunks
//!   still missing are filled in and it is pushed as a delta; the call
//!   returns when the partner has it, when it was saved as a conflict
//!   copy, or, partner unreachable, once it is durably queued.
//! - `flush` (every close) does the same behind the close
//!   ([`Vfs::push_behind`]): filled, cut and committed to the queue
//!   unsynced before it returns, pushed by a task that keeps the file's
//!   staging gate and lease until the receipt is in. Namespace changes and
//!   unmount wait for those pushes ([`Vfs::drain_behind`]), so the partner
//!   sees changes in the order they were made.
//! - Namespace changes (mkdir, unlink, rmdir, rename, chmod, utimens) are
//!   made on the partner at once; a file not pushed yet is pushed first,
//!   so the partner never sees a rename of something it does not have.

use super::*;
use crate::chunk::Manifest;
use crate::mount::leases::{process_name, process_of, process_start, tgid_of, Need};
use crate::proto::{Base, Request};
use crate::transfer::client::PushOptions;
use crate::writeback::{Commit, Entry as QueueEntry, Outcome};

/// How often a file whose last passthrough write handle closed is looked
/// at while a process still maps it ([`Vfs::kernel_released`]).
const MAPPED_POLL: Duration = Duration::from_millis(500);

/// What a release leaves to do ([`Vfs::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Push the change durably (the caller's close has returned).
    Push,
    /// The last handle through which the kernel wrote the staging closed.
    Kernel,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
    /// Opened for reading and writing: the only kind of descriptor a
    /// shared mapping that writes the file can be made from.
    pub read_write: bool,
    /// The calling thread (FUSE request pid).
    pub tid: u32,
    /// An open mountd makes itself (a truncate by path): its I/O goes
    /// through mountd, never the kernel's passthrough.
    pub internal: bool,
}

/// A push decided under its staging's gate ([`Vfs::prepare`]).
struct Prepared {
    share: Name,
    path: SharePath,
    /// The version the change was made on (BASE).
    expect: Base,
    /// The lease token it was made under (FENCE).
    fence: Option<u64>,
    /// A chmod (or a new file's mode) the push carries.
    mode: Option<u32>,
    mtime_ns: i64,
    manifest: Arc<Manifest>,
    /// The replaced version's manifest, when at hand.
    base_manifest: Option<Arc<Manifest>>,
    /// An earlier change of the file waits in the queue: go after it.
    queue_first: bool,
    /// The kernel's changes of the staging taken in when it was cut
    /// ([`Staged::pushed`]).
    kernel_gen: u64,
    /// The id the file's chunks were sent ahead under, if they were
    /// ([`crate::mount::ahead`]).
    ahead: Option<Name>,
}

pub(super) fn now_ns() -> i64 {
    crate::time::Timestamp::now().0
}

fn io_errno(e: std::io::Error) -> Errno {
    tracing::error!("staging: {e}");
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// How many writing threads a handle remembers; past them, any close
/// pushes (as when none is known).
const MAX_WRITERS: usize = 16;

/// Whether thread `tid` belongs to the process of one of `writers`. When
/// a process cannot be told (a thread gone, a full list), it counts as
/// the same: a push too many is safe, a missing one is not.
fn wrote_from_same_process(tid: u32, writers: &[u32]) -> bool {
    if writers.len() >= MAX_WRITERS {
        return true;
    }
    let Some(closer) = tgid_of(tid) else { return true };
    writers.iter().any(|&w| tgid_of(w).is_none_or(|g| g == closer))
}

/// Whether thread `tid` is exiting (`PF_EXITING` in its flags): its
/// process's descriptors close as it ends. Its `/proc/TID/stat` cannot be
/// read while the process execs (which may wait for the FLUSH asking
/// this): after [`super::PROC_WAIT`] it counts as not exiting.
async fn exiting(tid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let look = tokio::task::spawn_blocking(move || crate::mount::leases::proc_stat_field::<u64>(tid, 9));
    matches!(tokio::time::timeout(super::PROC_WAIT, look).await, Ok(Ok(Some(f))) if f & PF_EXITING != 0)
}

/// Chunks to fill from which the base's chunks of zeros are looked for
/// ([`crate::chunk::zero_chunks`]).
const ZERO_LOOKUP_MIN: usize = 64;

impl Vfs {
    fn file_key(&self, ino: Ino) -> Result<(Name, SharePath), Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        if kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        Ok((share.ok_or(Errno::EISDIR)?, path))
    }

    fn check_writable(&self, share: &Option<Name>) -> Result<Name, Errno> {
        match share {
            Some(s) if self.share_writable(s) => Ok(s.clone()),
            _ => Err(Errno::EROFS),
        }
    }

    /// access(2) with W_OK: whether a write open of `ino` could succeed
    /// now. EROFS on a share we may not write, EACCES on a `.NAME.lock`
    /// entry or a path another node holds a lease on (applications check
    /// this before they save, and say so, rather than fail midway).
    pub async fn may_write(&self, ino: Ino) -> Result<(), Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        let share = match (share, kind) {
            // An all-shares root: nothing can be made in it.
            (None, _) => return Err(Errno::EACCES),
            (s, _) => self.check_writable(&s)?,
        };
        if lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.virtual_data.is_some()) {
            return Err(Errno::EACCES);
        }
        if kind == Kind::Dir {
            return Ok(());
        }
        let held_elsewhere = match self.share_leases(&share).await {
            Some((_, leases)) => self.leased_elsewhere(&leases, &path),
            None => false,
        };
        if held_elsewhere {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    /// Whether one of `leases` is another node's on `path` or on a name
    /// whose lease covers it.
    fn leased_elsewhere(&self, leases: &[crate::proto::LeaseRow], path: &SharePath) -> bool {
        let names = crate::lease::covering_names(path);
        leases.iter().any(|l| l.holder != self.config.me && names.contains(&l.path))
    }

    /// Whether this mount's view of the share's leases vouches that no
    /// other node holds `path` now: a view the watch keeps current (a LOCK
    /// elsewhere announces a change, which drops it), so it lags the
    /// partner by the watch's latency at most. Not without a watch, nor
    /// without a view ([`Vfs::share_leases`] asks for one).
    fn free_here(&self, share: &Name, path: &SharePath) -> bool {
        self.is_watching() && lock(&self.share_leases).get(share).is_some_and(|sl| !self.leased_elsewhere(&sl.leases, path))
    }

    /// The share's leases and lockable patterns, refreshed like listings.
    async fn share_leases(&self, share: &Name) -> Option<(Vec<crate::glob::Glob>, Vec<crate::proto::LeaseRow>)> {
        if let Some(sl) = lock(&self.share_leases).get(share) {
            if self.fresh(Some(sl.at)) {
                return Some((sl.lockable.clone(), sl.leases.clone()));
            }
        }
        let epoch = self.leases_epoch.load(Ordering::SeqCst);
        match self.remote.locks(share).await {
            Ok((patterns, leases)) => {
                let lockable: Vec<crate::glob::Glob> = patterns.iter().filter_map(|p| crate::glob::Glob::new(p).ok()).collect();
                let out = (lockable.clone(), leases.clone());
                // Kept only if no change was announced while it was asked
                // for: it may not show a lease taken meanwhile.
                let mut cached = lock(&self.share_leases);
                if self.leases_epoch.load(Ordering::SeqCst) == epoch {
                    cached.insert(share.clone(), ShareLeases { lockable, leases, at: Instant::now() });
                }
                Some(out)
            }
            Err(e) => {
                tracing::debug!(%share, "leases unknown: {e}");
                lock(&self.share_leases).get(share).map(|sl| (sl.lockable.clone(), sl.leases.clone()))
            }
        }
    }

    /// Whether the partner's share makes `path` lockable. Unknown (partner
    /// offline, never asked): the default patterns.
    async fn lockable(&self, share: &Name, path: &SharePath) -> bool {
        let Some(name) = path.file_name() else { return false };
        let lower = name.to_ascii_lowercase();
        match self.share_leases(share).await {
            Some((patterns, _)) => patterns.iter().any(|g| g.matches(name) || g.matches(&lower)),
            None => crate::config::DEFAULT_LOCKABLE.iter().filter_map(|p| crate::glob::Glob::new(p).ok()).any(|g| g.matches(&lower)),
        }
    }

    /// `.NAME.lock` entries of directory `dir`: leases other nodes hold.
    pub(super) async fn lock_entries(&self, share: &Name, dir: &SharePath) -> Vec<(String, Entry, Vec<u8>)> {
        let Some((_, leases)) = self.share_leases(share).await else { return Vec::new() };
        let mut out = Vec::new();
        for l in leases {
            if l.holder == self.config.me || l.path.parent().unwrap_or_else(SharePath::root) != *dir {
                continue;
            }
            let Some(name) = l.path.file_name() else { continue };
            let lock_name = format!(".{name}.lock");
            let Ok(path) = dir.join(&lock_name) else { continue };
            let json = serde_json::json!({
                "path": l.path.as_str(),
                "holder": l.holder.as_str(),
                "process": l.owner.as_str(),
                "since": crate::time::Timestamp(l.since_ns).rfc3339(),
                "expires": crate::time::Timestamp(l.expires_ns).rfc3339(),
                "token": l.token,
            });
            let mut bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
            bytes.push(b'\n');
            let entry = Entry { kind: EntryKind::File, size: bytes.len() as u64, mtime_ns: l.since_ns, mode: 0o444, path };
            out.push((lock_name, entry, bytes));
        }
        out
    }

    /// Take the leases an open needs: the process's (lockable file, any
    /// mode) and the handle's (write). Returns the token and the handle
    /// lease to drop at release.
    async fn open_leases(&self, share: &Name, path: &SharePath, mode: OpenMode, fh: u64) -> Result<Option<u64>, Errno> {
        let lockable = self.lockable(share, path).await;
        if !lockable && !mode.write {
            return Ok(None);
        }
        let pid = process_of(mode.tid);
        let owner = crate::lease::owner_name(&process_name(pid));
        let mut token = None;
        if lockable {
            match process_start(pid) {
                Some(start) => match self.leases.take(share, path, &owner, Need::Process { pid, start }).await {
                    Ok(t) => {
                        self.took_lease(share, path);
                        token = Some(t)
                    }
                    Err(e) if mode.write => return Err(self.lease_errno(path, &e)),
                    // Read-only: reading a file leased elsewhere is allowed.
                    Err(e) => tracing::debug!(%path, "no lease for a read-only open: {e}"),
                },
                None => tracing::debug!(pid, "opening process already gone"),
            }
        }
        if mode.write {
            match self.leases.take(share, path, &owner, Need::Handle(fh)).await {
                Ok(t) => {
                    self.took_lease(share, path);
                    token = Some(t)
                }
                Err(RemoteError::Offline { .. }) if !lockable => {
                    // Not lockable: written offline, reconciled by the base
                    // check when it goes back (a conflict copy at worst).
                    tracing::info!(%path, "partner offline: writing without a lease");
                }
                Err(e) => return Err(self.lease_errno(path, &e)),
            }
        }
        Ok(token)
    }

    /// Write handle `fh`'s lease on the new file `path`, asked for without
    /// waiting ([`Leases::take_behind`]). While in flight the LOCK holds a
    /// permit of the pushes behind closes, so what waits for those
    /// (namespace changes, unmount, daemon shutdown) waits for it too; a
    /// push of the file waits for its answer ([`Leases::answered`]).
    async fn lease_behind(&self, share: &Name, path: &SharePath, tid: u32, fh: u64) -> Result<(), Errno> {
        let permit = self.behind.clone().acquire_owned().await.map_err(|_| Errno::EIO)?;
        let owner = crate::lease::owner_name(&process_name(process_of(tid)));
        if let Some(lock) = self.leases.take_behind(share, path, &owner, Need::Handle(fh)) {
            tokio::spawn(async move {
                if let Some(ms) = crate::fault::lock_behind_delay_ms() {
                    tokio::time::sleep(Duration::from_millis(ms.into())).await;
                }
                lock.await;
                drop(permit);
            });
        }
        Ok(())
    }

    /// Lease `path` for the life of the process of thread `tid`, as its
    /// open of a lockable file would. Returns the need when this call added
    /// it (to undo it if what it was for fails); None when that process
    /// held it already or is gone.
    async fn process_lease(&self, share: &Name, path: &SharePath, tid: u32) -> Result<Option<Need>, Errno> {
        let pid = process_of(tid);
        let Some(start) = process_start(pid) else { return Ok(None) };
        let need = Need::Process { pid, start };
        if self.leases.holds(share, path, &need) {
            return Ok(None);
        }
        let owner = crate::lease::owner_name(&process_name(pid));
        self.leases.take(share, path, &owner, need.clone()).await.map_err(|e| self.lease_errno(path, &e))?;
        self.took_lease(share, path);
        Ok(Some(need))
    }

    /// We now hold `path`: a lease another node held on it in our cached
    /// view has ended (the partner does not tell us about our own grants),
    /// so forget that view and its `.NAME.lock` entry.
    fn took_lease(&self, share: &Name, path: &SharePath) {
        let stale =
            lock(&self.share_leases).get(share).is_some_and(|sl| sl.leases.iter().any(|l| l.path == *path && l.holder != self.config.me));
        if !stale {
            return;
        }
        lock(&self.share_leases).remove(share);
        let (Some(name), parent) = (path.file_name(), path.parent().unwrap_or_else(SharePath::root)) else { return };
        let dir = {
            let mut inodes = lock(&self.inodes);
            let dir = inodes.by_key.get(&(share_key(&Some(share.clone())), parent)).copied();
            if let Some(n) = dir.and_then(|d| inodes.by_ino.get_mut(&d)) {
                n.children = None;
            }
            dir
        };
        if let (Some(dir), Some(f)) = (dir, self.invalidate.get()) {
            f(Inval::Entry(dir, format!(".{name}.lock")));
        }
    }

    fn lease_errno(&self, path: &SharePath, e: &RemoteError) -> Errno {
        match e {
            RemoteError::Refused { code: "BUSY", message, .. } => {
                tracing::info!(%path, "{message}");
                Errno::EBUSY
            }
            RemoteError::Offline { .. } => {
                tracing::warn!(partner = %self.remote.partner(), %path, "cannot lock: {e}; lockable files are not written while the partner is unreachable");
                Errno::EIO
            }
            other => Errno::from_remote(other),
        }
    }

    /// The staging of `ino`, created from its current version if needed.
    /// `hold`: count a write handle on it, taken in the same step as the
    /// staging itself, so that the release of another handle cannot retire
    /// it in between (see [`Vfs::retire`]).
    async fn stage(&self, ino: Ino, truncate: bool, hold: bool) -> Result<Arc<Staged>, Errno> {
        let held = |staged: &Arc<Staged>| {
            if hold {
                let mut st = staged.state();
                st.handles += 1;
                st.writers += 1;
            }
        };
        {
            let inodes = lock(&self.inodes);
            if let Some(st) = inodes.by_ino.get(&ino).and_then(|n| n.staged.clone()) {
                held(&st);
                return Ok(st);
            }
        }
        let manifest = match self.manifest(ino).await {
            Ok((_, _, m)) => Some(m),
            // A share we may write but not read (a drop box): replacing a
            // file needs none of its content, and there is no base to check.
            Err(Errno::EACCES) if truncate => None,
            Err(e) => return Err(e),
        };
        let data = self.writeback.staging_path();
        let expect = manifest.as_ref().map_or(Base::Any, |m| Base::Version(m.file_hash));
        let mtime = lock(&self.inodes).by_ino.get(&ino).map_or(0, |n| n.mtime_ns);
        // A version this node pushed itself may still be here, whole.
        let adopted = match manifest.as_ref().and_then(|m| self.writeback.take_kept(&m.file_hash, &data)) {
            Some(m) => Staged::adopt(data.clone(), m, mtime, self.writeback.chunk_params())
                .map_err(|e| {
                    tracing::debug!("kept copy unusable: {e}");
                    let _ = std::fs::remove_file(&data);
                })
                .ok(),
            None => None,
        };
        let staged = match adopted {
            Some(s) => Arc::new(s),
            None => Arc::new(Staged::create(data, manifest, expect, mtime, self.writeback.chunk_params()).map_err(io_errno)?),
        };
        if truncate {
            staged.set_len(0, now_ns()).map_err(io_errno)?;
        }
        let mut inodes = lock(&self.inodes);
        let n = inodes.by_ino.get_mut(&ino).ok_or(Errno::ENOENT)?;
        // Another open may have staged it meanwhile: use that one.
        let staged = n.staged.get_or_insert(staged).clone();
        held(&staged);
        Ok(staged)
    }

    /// Open `ino` as `mode` says. Returns the handle, whether the kernel
    /// may keep its cached pages, and how it is to do the I/O (`backing`
    /// registers a backing file for passthrough: see [`Vfs::open_read`]).
    pub async fn open(&self, ino: Ino, mode: OpenMode, backing: MakeBacking<'_>) -> Result<(u64, bool, Io), Errno> {
        let (share, path) = self.file_key(ino)?;
        if self.unlisted(&lock(&self.inodes), ino) {
            tracing::debug!(ino, %path, "open through a stale kernel entry: the listing lacks the name");
            return Err(Errno::ESTALE);
        }
        if !mode.write {
            let (rfh, keep, io) = self.open_read(ino, backing).await?;
            // A lockable file is leased for the opening process's life.
            let is_virtual = lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.virtual_data.is_some());
            if !is_virtual && self.share_writable(&share) {
                let _ = self.open_leases(&share, &path, mode, rfh).await;
            }
            return Ok((rfh, keep, io));
        }
        self.check_writable(&Some(share.clone()))?;
        if lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.virtual_data.is_some()) {
            return Err(Errno::EACCES);
        }
        if self.is_backed_by_copy(ino) {
            return self.leave_backed(ino);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        self.open_leases(&share, &path, mode, fh).await?;
        let staged = match self.stage(ino, mode.truncate, true).await {
            Ok(s) => s,
            Err(e) => {
                self.leases.done(&share, &path, &Need::Handle(fh));
                return Err(e);
            }
        };
        if mode.truncate && staged.size() > 0 {
            let _gate = staged.gate.lock().await;
            if let Err(e) = staged.set_len(0, now_ns()) {
                let mut st = staged.state();
                st.handles -= 1;
                st.writers -= 1;
                drop(st);
                self.leases.done(&share, &path, &Need::Handle(fh));
                return Err(io_errno(e));
            }
        }
        let io = if mode.internal {
            Io::Cached
        } else {
            self.staged_io(ino, &staged, mode.truncate, Some((mode.tid, mode.read_write)), backing)
        };
        let passthrough = matches!(io, Io::Passthrough(_));
        let handle = StagedHandle {
            ino,
            passthrough,
            staged,
            write: true,
            append: mode.append,
            lease: Some((share, path)),
            changes: 0,
            // The kernel writes a passthrough handle's file without telling
            // which thread: count the opener as its writer (see `flush`).
            writers: if passthrough { vec![mode.tid] } else { Vec::new() },
            flushed: 0,
        };
        lock(&self.handles).insert(fh, Handle::Staged(handle));
        Ok((fh, false, io))
    }

    /// Create and open a new file.
    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        open: OpenMode,
        backing: MakeBacking<'_>,
    ) -> Result<(Attr, u64, Io), Errno> {
        let (pshare, ppath, kind) = self.node_key(parent)?;
        if kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let share = self.check_writable(&pshare)?;
        let path = ppath.join(name).map_err(|e| Errno::for_path(&e))?;
        if path.components().any(|c| c.contains(crate::share::TEMP_MARKER)) {
            return Err(Errno::EINVAL);
        }
        // Offline and never listed: the kernel's lookup already found no such name.
        let children = self.children(parent).await.unwrap_or_default();
        if let Some((_, existing)) = children.iter().find(|(n, _)| n == name) {
            // O_CREAT without O_EXCL on an existing name: open it.
            let (fh, _, io) = self.open(*existing, OpenMode { write: true, ..open }, backing).await?;
            return self.opened_attr(*existing, fh, io);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        let open = OpenMode { write: true, ..open };
        // A new name that no other node holds, as far as the watch says:
        // the create does not wait for its LOCK. Should another node take
        // the name in the watch's latency, the LOCK is refused and this
        // file's push then becomes a conflict copy (docs/SEMANTICS.md).
        if !self.lockable(&share, &path).await && self.free_here(&share, &path) {
            self.lease_behind(&share, &path, open.tid, fh).await?;
        } else {
            self.open_leases(&share, &path, open, fh).await?;
        }
        let staged =
            Staged::create(self.writeback.staging_path(), None, Base::Absent, now_ns(), self.writeback.chunk_params()).map_err(|e| {
                self.leases.done(&share, &path, &Need::Handle(fh));
                io_errno(e)
            });
        let staged = Arc::new(staged?);
        {
            let mut st = staged.state();
            st.dirty = true;
            st.handles += 1;
            st.writers += 1;
            // The partner's copy gets the mode asked for, not its default.
            st.due_mode = Some(mode & 0o7777);
        }
        let ino = {
            let mut inodes = lock(&self.inodes);
            let entry = Entry { kind: EntryKind::File, size: 0, mtime_ns: now_ns(), mode: mode & 0o7777, path: path.clone() };
            let ino = Self::upsert(&mut inodes, parent, Some(share.clone()), &entry, Instant::now());
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                n.staged = Some(staged.clone());
                n.manifest = None;
            }
            inodes.set_local_only(ino, true);
            if let Some((c, _)) = inodes.by_ino.get_mut(&parent).and_then(|p| p.children.as_mut()) {
                if !c.iter().any(|(n, _)| n == name) {
                    c.push((name.to_string(), ino));
                }
            }
            Self::entries_changed(&mut inodes, parent);
            ino
        };
        let io = self.staged_io(ino, &staged, true, Some((open.tid, open.read_write)), backing);
        let passthrough = matches!(io, Io::Passthrough(_));
        let handle = StagedHandle {
            ino,
            passthrough,
            staged,
            write: true,
            append: open.append,
            lease: Some((share, path)),
            changes: 1,
            writers: if passthrough { vec![open.tid] } else { Vec::new() },
            flushed: 0,
        };
        lock(&self.handles).insert(fh, Handle::Staged(handle));
        self.opened_attr(ino, fh, io)
    }

    /// The attributes of `ino`, just opened as `fh`. If they are gone (the
    /// inode forgotten meanwhile), the handle is released, not left
    /// counted on the staging (its writers keep a release from pushing).
    fn opened_attr(&self, ino: Ino, fh: u64, io: Io) -> Result<(Attr, u64, Io), Errno> {
        match self.cached_attr(ino) {
            Ok(attr) => Ok((attr, fh, io)),
            Err(e) => {
                let _ = self.release(fh);
                Err(e)
            }
        }
    }

    /// Write through handle `fh`, for thread `tid` of the writing process.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8], tid: u32) -> Result<u32, Errno> {
        let (staged, append) = match lock(&self.handles).get_mut(&fh) {
            Some(Handle::Staged(h)) if h.write => {
                h.changes += 1;
                if h.writers.len() < MAX_WRITERS && !h.writers.contains(&tid) {
                    h.writers.push(tid);
                }
                (h.staged.clone(), h.append)
            }
            Some(_) => return Err(Errno::EBADF),
            None => return Err(Errno::EBADF),
        };
        let _gate = staged.gate.lock().await;
        let offset = if append { staged.size() } else { offset };
        staged.write(offset, data, now_ns()).map_err(io_errno)?;
        Ok(data.len() as u32)
    }

    /// fallocate(2) through write handle `fh`. Space is the partner's to
    /// find when the file goes back, so a plain allocation only sets the
    /// size it asks for (`KEEP_SIZE`: nothing); punching a hole and zeroing
    /// a range write zeros. Collapsing and inserting ranges are
    /// `EOPNOTSUPP`, as on file systems without them.
    pub async fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let (staged, ino) = match lock(&self.handles).get(&fh) {
            Some(Handle::Staged(h)) if h.write => (h.staged.clone(), h.ino),
            _ => return Err(Errno::EBADF),
        };
        let end = offset.checked_add(len).filter(|e| *e <= i64::MAX as u64).ok_or(Errno(libc::EFBIG))?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let _gate = staged.gate.lock().await;
        let size = staged.size();
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 if keep || end <= size => return Ok(()),
            0 => staged.set_len(end, now_ns()).map_err(io_errno)?,
            libc::FALLOC_FL_PUNCH_HOLE if keep => staged.zero(offset, end.min(size), now_ns()).map_err(io_errno)?,
            libc::FALLOC_FL_ZERO_RANGE => {
                staged.zero(offset, end.min(size), now_ns()).map_err(io_errno)?;
                if !keep && end > size {
                    staged.set_len(end, now_ns()).map_err(io_errno)?;
                }
            }
            // PUNCH_HOLE needs KEEP_SIZE (the kernel checks it too).
            libc::FALLOC_FL_PUNCH_HOLE => return Err(Errno::EINVAL),
            _ => return Err(Errno(libc::EOPNOTSUPP)),
        }
        self.touch_handles(ino);
        Ok(())
    }

    pub(super) async fn read_staged(&self, ino: Ino, staged: &Arc<Staged>, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let end = offset.saturating_add(size as u64);
        if !staged.missing(offset, end).is_empty() {
            self.fill(ino, staged, offset, end).await?;
        }
        staged.read(offset, size).map_err(io_errno)
    }

    /// Bring the base version's bytes of `[start, end)` into the staging.
    async fn fill(&self, ino: Ino, staged: &Arc<Staged>, start: u64, end: u64) -> Result<(), Errno> {
        let holes = staged.missing(start, end);
        if holes.is_empty() {
            return Ok(());
        }
        let Some(base) = staged.state().base.clone() else {
            // Nothing to fill from: the holes are zeros (a new file).
            return Ok(());
        };
        let (share, path) = self.file_key(ino)?;
        let mut indices: Vec<u32> = Vec::new();
        for (a, b) in &holes {
            for i in Self::covering(&base, *a, *b) {
                if indices.last() != Some(&(i as u32)) {
                    indices.push(i as u32);
                }
            }
        }
        // Much to fill (a push's): the base's runs of zeros (a sparse
        // file's holes) stay holes, neither fetched nor written.
        if indices.len() > ZERO_LOOKUP_MIN {
            let zero = crate::chunk::zero_chunks(&base.chunks);
            let mut kept = Vec::with_capacity(indices.len());
            for i in indices {
                match base.chunks.get(i as usize) {
                    Some(c) if zero[i as usize] => staged.fill_zero(c.offset, c.end()).map_err(io_errno)?,
                    _ => kept.push(i),
                }
            }
            indices = kept;
        }
        for batch in indices.chunks(64) {
            self.remote.fetch(&share, &path, &base, batch).await.map_err(|e| match e {
                RemoteError::Stale { .. } => Errno::ESTALE,
                other => Errno::from_remote(&other),
            })?;
            for &i in batch {
                let Some(c) = base.chunks.get(i as usize) else { continue };
                let data = self.chunk(&c.hash).ok_or(Errno::EIO)?;
                staged.fill(c.offset, &data).map_err(io_errno)?;
            }
        }
        Ok(())
    }

    /// Push `ino`'s staged content if it changed, for a close or fsync:
    /// straight to the partner, the caller waiting. Only if that fails for
    /// now (the partner unreachable) is the change made durable here and
    /// queued. Either way it is durable when this returns Ok; a crash
    /// before that breaks no promise (close or fsync had not returned).
    pub async fn push(&self, ino: Ino) -> Result<(), Errno> {
        self.push_as(ino, false).await
    }

    /// Push a change whose close has already returned (the last release):
    /// it is made durable here (fsynced, committed to the queue) before it
    /// goes, so a crash during the push loses nothing.
    /// Not while a write handle is open on the file again: its own close
    /// pushes what the file holds then. What the file holds now may be a
    /// state between the two (the truncation of an `O_TRUNC` open that
    /// came after this release), which nobody closed or fsynced.
    pub async fn push_durable(&self, ino: Ino) -> Result<(), Errno> {
        if let Some(ms) = crate::fault::release_push_delay_ms() {
            tokio::time::sleep(Duration::from_millis(ms.into())).await;
        }
        self.push_as(ino, true).await
    }

    async fn push_as(&self, ino: Ino, durable: bool) -> Result<(), Errno> {
        let pushed = self.push_locked(ino, durable).await;
        // A release that came while this push held the staging could not
        // retire it (see `retire`): do it now if nothing uses it.
        self.retire_idle(ino);
        pushed
    }

    async fn push_locked(&self, ino: Ino, durable: bool) -> Result<(), Errno> {
        let Some(staged) = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()) else { return Ok(()) };
        let _gate = staged.gate.lock().await;
        if durable && staged.current().writers > 0 {
            return Ok(());
        }
        // A new file's LOCK still in flight: the push goes under its answer.
        let (share, path) = self.file_key(ino)?;
        self.leases.answered(&share, &path).await;
        let Some(p) = self.prepare(ino, &staged, durable).await? else { return Ok(()) };
        let outcome = if p.queue_first {
            let id = self.enqueue(&staged, &p.share, &p.path, p.expect, p.fence, Commit::Durable).await?;
            self.writeback.flush(id, Some(p.manifest.clone()), p.mode, p.base_manifest.clone(), p.ahead.clone()).await
        } else {
            let options = PushOptions {
                base: p.expect,
                fence: p.fence,
                manifest: Some(p.manifest.clone()),
                mode: p.mode,
                base_manifest: p.base_manifest.clone(),
                ahead: p.ahead.clone(),
            };
            match self.writeback.push_direct(self.remote.partner(), &p.share, &p.path, &staged.data, options).await {
                o @ (Outcome::Queued(_) | Outcome::Failed { .. }) => {
                    let id = self.enqueue(&staged, &p.share, &p.path, p.expect, p.fence, Commit::Durable).await?;
                    if let Outcome::Failed { code, message } = &o {
                        self.writeback.fail(id, code, message);
                    }
                    // The retry loop takes it from here.
                    self.writeback.unhold(id);
                    o
                }
                o => o,
            }
        };
        self.take_outcome(ino, &staged, &p, outcome).await
    }

    /// A close: the push of `ino`'s change goes on behind it. The change is
    /// filled in, cut and committed to the write-back queue (not synced:
    /// it survives a `kill -9` of mountd, not a power loss, as a closed
    /// file on a local disk does until its fsync), then pushed by a task
    /// that keeps holding the staging's gate (a later write, push, or
    /// fsync of the file waits for it, but not the writes the kernel makes
    /// itself, [`Vfs::staged_io`]; reads and `stat` here see the staged
    /// content meanwhile) and the file's lease (other nodes still
    /// get `EBUSY`, and the partner refuses their writes, until the new
    /// version is there). At most [`WRITE_BEHIND`] such pushes run at
    /// once: a close past that waits for one to end. A refusal found
    /// behind a close is logged and kept in the queue (`deftfs status`),
    /// a conflict becomes a conflict copy as it would have at the close.
    async fn push_behind(self: &Arc<Self>, ino: Ino) -> Result<(), Errno> {
        let Some(staged) = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()) else { return Ok(()) };
        let permit = self.behind.clone().acquire_owned().await.map_err(|_| Errno::EIO)?;
        let gate = staged.gate.clone().lock_owned().await;
        let Some(p) = self.prepare(ino, &staged, false).await? else { return Ok(()) };
        if p.queue_first {
            // An earlier change of the file waits (the partner was
            // unreachable): this one goes after it, at once, as before.
            drop(gate);
            drop(permit);
            staged.state().dirty = true;
            return self.push(ino).await;
        }
        let id = self.enqueue(&staged, &p.share, &p.path, p.expect, p.fence, Commit::Lazy).await?;
        let need = Need::Push(self.next_behind.fetch_add(1, Ordering::SeqCst));
        let leased = self.leases.extend(&p.share, &p.path, need.clone());
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(ms) = crate::fault::push_behind_delay_ms() {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
            }
            // A new file's LOCK still in flight (the close above found no
            // token to fence with; a new file's push needs none: its BASE
            // absent is refused once another node has written the name, and
            // the partner refuses it while another node holds the name):
            // the push goes after the answer, under the lease if granted.
            me.leases.answered(&p.share, &p.path).await;
            let outcome = me.writeback.flush(id, Some(p.manifest.clone()), p.mode, p.base_manifest.clone(), p.ahead.clone()).await;
            if let Err(e) = me.take_outcome(ino, &staged, &p, outcome).await {
                tracing::warn!(partner = %me.remote.partner(), share = %p.share, path = %p.path, "write-back behind a close: {e:?}");
            }
            drop(gate);
            me.retire_idle(ino);
            if leased {
                me.leases.done(&p.share, &p.path, &need);
            }
            drop(permit);
        });
        Ok(())
    }

    /// Wait until no push behind a close is in flight: a namespace change
    /// (rename, unlink, rmdir, a directory's SETATTR) must reach the
    /// partner after the pushes the closes before it started, as it did
    /// when each close waited for its push.
    pub async fn drain_behind(&self) {
        if let Ok(all) = self.behind.acquire_many(WRITE_BEHIND).await {
            drop(all);
        }
    }

    /// Decide what a push of `ino` sends: fill the missing base ranges, cut
    /// the manifest. None when nothing changed. The caller holds the gate.
    async fn prepare(&self, ino: Ino, staged: &Arc<Staged>, durable: bool) -> Result<Option<Prepared>, Errno> {
        {
            let st = staged.current();
            if !st.dirty || st.gone {
                return Ok(None);
            }
        }
        let size = staged.size();
        self.fill(ino, staged, 0, size).await?;
        let (share, path) = self.file_key(ino)?;
        let expect = staged.state().expect;
        let fence = self.leases.token(&share, &path);
        // The new version carries the mtime this mount shows (the push
        // takes it from the file) and, for a new file or after a chmod, the
        // mode: the partner's copy then matches without a SETATTR, and a
        // stat here does not change once the staging is gone.
        let (mode, mtime_ns) = {
            let st = staged.state();
            (st.due_mode, st.mtime_ns)
        };
        if staged.kernel_writes() && self.staging_mapped(ino, staged).await {
            staged.protect();
        }
        if let Err(e) = staged.stamp_mtime(mtime_ns) {
            tracing::debug!(%path, "staging mtime not set: {e}");
        }
        // The push takes what is there now: a write the kernel makes from
        // here on (passthrough) is seen after it, and leaves the file
        // dirty ([`Staged::pushed`]).
        let kernel_gen = {
            let mut st = staged.state();
            st.dirty = false;
            st.kernel_changes
        };
        // Chunks sent ahead while the kernel wrote: the sending ends with
        // a last round of what is left, while the push cuts the file.
        let sender = {
            let mut slot = staged.ahead.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|s| s.has_sent()) {
                slot.take()
            } else {
                None
            }
        };
        let partner = self.remote.partner().to_string();
        // An earlier change of the file waits in the queue: this one goes
        // after it.
        let queue_first = durable || self.writeback.pending(&partner, &share, &path);
        let st = staged.clone();
        let params = self.writeback.chunk_params();
        // Chunks the sender cut already are checked, not cut again.
        let prefix = sender.as_ref().map(|s| s.cut_so_far()).unwrap_or_default();
        let cut = crate::transfer::blocking_io(size, move || st.manifest_after(&params, &prefix).map(Arc::new));
        let last_round = async {
            match &sender {
                Some(s) => s.finish().await,
                None => None,
            }
        };
        let (manifest, ahead) = tokio::join!(cut, last_round);
        let manifest = manifest.map_err(|_| Errno::EIO).and_then(|r| r.map_err(io_errno)).inspect_err(|_| staged.state().dirty = true)?;
        // The manifest of the version this push replaces, if at hand: the
        // push then describes its own relative to it (a few lines for a
        // re-save, instead of one per chunk).
        let shown = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.manifest.clone());
        let base_manifest = {
            let mut st = staged.state();
            let base_manifest = match expect {
                Base::Version(h) => [st.recut_base.clone(), st.base.clone(), shown].into_iter().flatten().find(|m| m.file_hash == h),
                Base::Any | Base::Absent => None,
            };
            // Everything is local now: later reads need no base.
            st.base = None;
            base_manifest
        };
        Ok(Some(Prepared { share, path, expect, fence, mode, mtime_ns, manifest, base_manifest, queue_first, kernel_gen, ahead }))
    }

    /// What a push's outcome means for the inode and its staging.
    async fn take_outcome(&self, ino: Ino, staged: &Arc<Staged>, p: &Prepared, outcome: Outcome) -> Result<(), Errno> {
        let (share, path, mode, mtime_ns, manifest) = (&p.share, &p.path, p.mode, p.mtime_ns, p.manifest.clone());
        let pushed = matches!(outcome, Outcome::Pushed(_));
        let result = {
            let mut st = staged.state();
            match outcome {
                Outcome::Pushed(report) => {
                    if let Ok(h) = report.file_hash.parse() {
                        st.expect = Base::Version(h);
                    }
                    // What the push carried needs no SETATTR after it.
                    if st.due_mtime_ns == Some(mtime_ns) {
                        st.due_mtime_ns = None;
                    }
                    if st.due_mode == mode {
                        st.due_mode = None;
                    }
                    drop(st);
                    staged.pushed(manifest.clone(), p.kernel_gen);
                    // The partner's version is now the one we pushed: its
                    // manifest is known, and the next open needs no DESCRIBE.
                    let known = (report.file_hash == manifest.file_hash.to_string()).then_some(manifest);
                    let mut inodes = lock(&self.inodes);
                    let mut parent = None;
                    inodes.set_local_only(ino, false);
                    if let Some(n) = inodes.by_ino.get_mut(&ino) {
                        n.size = report.bytes_total;
                        n.mtime_ns = mtime_ns;
                        n.known = known.clone().or(n.known.take());
                        n.manifest = known;
                        n.cached_version = None;
                        parent = Some(n.parent);
                    }
                    if let Some(p) = parent {
                        Self::touched(&mut inodes, p);
                    }
                    Ok(())
                }
                Outcome::Conflict { copy, .. } => {
                    tracing::warn!(partner = %self.remote.partner(), %share, %path, %copy, "the partner's version changed meanwhile: this change was saved as {copy}");
                    // This staging's content is the conflict copy's now,
                    // not a change of the partner's version: a later push
                    // of it (a handle still open, or an open that comes
                    // before this handle's release is done) must not
                    // replace the partner's version either, so its base is
                    // what it holds, which the partner's file is not.
                    st.expect = Base::Version(manifest.file_hash);
                    drop(st);
                    // A file created here is no longer ours to show: the
                    // partner's listing says whether the name exists.
                    let mut inodes = lock(&self.inodes);
                    inodes.set_local_only(ino, false);
                    let mut parent = None;
                    if let Some(n) = inodes.by_ino.get_mut(&ino) {
                        n.manifest = None;
                        n.attr_at = None;
                        parent = Some(n.parent);
                    }
                    if let Some(p) = parent {
                        Self::touched(&mut inodes, p);
                        if let Some(d) = inodes.by_ino.get_mut(&p) {
                            d.children = None;
                        }
                    }
                    Ok(())
                }
                Outcome::Queued(why) => {
                    // Durable in the queue; it goes back when the partner is
                    // reachable. Later pushes of this file follow it in order.
                    st.expect = Base::Any;
                    st.queued = true;
                    tracing::info!(partner = %self.remote.partner(), %share, %path, "write-back queued: {why}");
                    Ok(())
                }
                Outcome::Failed { code, message } => {
                    st.queued = true;
                    tracing::error!(partner = %self.remote.partner(), %share, %path, code, "write-back refused: {message}");
                    Err(Errno::from_remote(&RemoteError::Refused { partner: String::new(), code, message }))
                }
            }
        };
        result?;
        if pushed {
            self.send_due_attrs(ino, staged, share, path).await?;
        }
        Ok(())
    }

    /// The chmod and utimens kept for after the push (see
    /// [`StageState::due_mode`]), in one SETATTR.
    async fn send_due_attrs(&self, ino: Ino, staged: &Arc<Staged>, share: &Name, path: &SharePath) -> Result<(), Errno> {
        let (mode, mtime_ns) = {
            let mut st = staged.state();
            (st.due_mode.take(), st.due_mtime_ns.take())
        };
        if mode.is_none() && mtime_ns.is_none() {
            return Ok(());
        }
        self.set_attr_remote(ino, share.clone(), path, mode, mtime_ns).await.inspect_err(|_| {
            // Kept for the next push of the file.
            let mut st = staged.state();
            st.due_mode = st.due_mode.or(mode);
            st.due_mtime_ns = st.due_mtime_ns.or(mtime_ns);
        })
    }

    /// SETATTR on the partner, and the inode takes what it answers.
    async fn set_attr_remote(
        &self,
        ino: Ino,
        share: Name,
        path: &SharePath,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
    ) -> Result<(), Errno> {
        let entry = self
            .remote
            .call_stat(Request::SetAttr { share, path: path.clone(), mode, mtime_ns })
            .await
            .map_err(|e| self.remote_errno("setattr", path, e))?;
        let mut inodes = lock(&self.inodes);
        if let Some(n) = inodes.by_ino.get_mut(&ino) {
            n.take_attrs(&entry);
        }
        if let (Some(t), Some(st)) = (mtime_ns, inodes.by_ino.get(&ino).and_then(|n| n.staged.clone())) {
            st.state().mtime_ns = t;
        }
        Ok(())
    }

    /// Every close: push what this handle's file has staged.
    /// Make the staged content durable and commit it to the write-back
    /// queue, under its own name (a hard link: the staging may live on
    /// under this inode after the push). On failure the change is marked
    /// dirty again.
    async fn enqueue(
        &self,
        staged: &Arc<Staged>,
        share: &Name,
        path: &SharePath,
        expect: Base,
        fence: Option<u64>,
        commit: Commit,
    ) -> Result<i64, Errno> {
        let queued = self.writeback.fresh_path("");
        let linked = match commit {
            Commit::Durable => {
                let (st, q) = (staged.clone(), queued.clone());
                tokio::task::spawn_blocking(move || {
                    st.file.sync_all()?;
                    std::fs::hard_link(&st.data, &q)
                })
                .await
                .map_err(|_| std::io::Error::other("the fsync task failed"))
                .and_then(|r| r)
            }
            // No fsync: a link is one directory entry, done here.
            Commit::Lazy => std::fs::hard_link(&staged.data, &queued),
        };
        let id = linked.map_err(|e| e.to_string()).and_then(|()| {
            self.writeback
                .enqueue(self.remote.partner(), share, path, &queued, expect, fence, staged.lineage, commit)
                .map_err(|e| e.to_string())
        });
        id.map_err(|e| {
            tracing::error!(%path, "the change could not be queued: {e}");
            let _ = std::fs::remove_file(&queued);
            staged.state().dirty = true;
            Errno::EIO
        })
    }

    /// A close of a descriptor of `fh` by thread `tid`: push what this
    /// handle wrote (see [`StagedHandle::changes`]) behind the close; the
    /// last release pushes the rest. Not when the closing process wrote
    /// nothing through the handle while others did: every child a process
    /// forks inherits its descriptors, and its exec closes them (a FLUSH
    /// each), which would push the file half-written. The writer's own
    /// close, and the release after the last one, push it.
    pub async fn flush(self: &Arc<Self>, fh: u64, tid: u32) -> Result<(), Errno> {
        let (ino, changes, flushed, writers, kernel) = match lock(&self.handles).get(&fh) {
            Some(Handle::Staged(h)) if h.write => (h.ino, h.changes, h.flushed, h.writers.clone(), h.passthrough.then(|| h.staged.clone())),
            _ => return Ok(()),
        };
        // The kernel writes a passthrough handle's file itself: its changes
        // are seen in the file.
        let changes = changes + kernel.as_ref().map_or(0, |s| s.current().kernel_changes);
        if changes <= flushed {
            return Ok(());
        }
        // A passthrough handle's writes do not say who made them: a process
        // that exits (`cmd >&3` in a shell holding 3) may have, and it is
        // done with the descriptor, so its close pushes what is there. An
        // exec's close of an inherited descriptor still does not.
        let exiting = kernel.is_some() && exiting(tid).await;
        if !writers.is_empty() && !writers.contains(&tid) && !wrote_from_same_process(tid, &writers) && !exiting {
            tracing::debug!(ino, tid, "close by a process that did not write through the handle: no push");
            return Ok(());
        }
        self.push_behind(ino).await?;
        if let Some(Handle::Staged(h)) = lock(&self.handles).get_mut(&fh) {
            h.flushed = h.flushed.max(changes);
        }
        Ok(())
    }

    /// fsync: like a close, the change is durable when this returns: on
    /// the partner if the push went through (it fsyncs before renaming),
    /// else here, fsynced and queued.
    /// On a descriptor that does not write (`sync FILE`), it waits for a
    /// push a close of the file left in flight.
    pub async fn fsync(&self, fh: u64) -> Result<(), Errno> {
        let (ino, write) = match lock(&self.handles).get(&fh) {
            Some(Handle::Staged(h)) => (h.ino, h.write),
            _ => return Ok(()),
        };
        let kernel_dirty = || {
            let staged = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone());
            staged.is_some_and(|s| s.kernel_writes() && s.current().dirty)
        };
        if write || kernel_dirty() {
            // A push in flight holds the gate: this one waits for it, then
            // sends what was written since, if anything. (On a descriptor
            // that does not write, what passthrough handles wrote: no
            // close of theirs pushed it.)
            return self.push(ino).await;
        }
        self.wait_pushed(ino).await;
        Ok(())
    }

    /// Wait for a push of `ino` in flight (it holds the staging's gate).
    async fn wait_pushed(&self, ino: Ino) {
        let staged = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone());
        if let Some(st) = staged {
            drop(st.gate.lock().await);
        }
    }

    /// Mark the write handles of `ino` as having changed it.
    fn touch_handles(&self, ino: Ino) {
        for h in lock(&self.handles).values_mut() {
            if let Handle::Staged(h) = h {
                if h.ino == ino && h.write {
                    h.changes += 1;
                }
            }
        }
    }

    /// The last reference to `fh` is gone. Returns the inode when its
    /// changes are still to push, and how: [`Released::Push`] (nothing
    /// wrote since a truncating open): the caller pushes them, then calls
    /// [`Vfs::retire_idle`]; [`Released::Kernel`]: see
    /// [`Vfs::kernel_released`].
    pub fn release(&self, fh: u64) -> Option<(Ino, Released)> {
        let handle = lock(&self.handles).remove(&fh)?;
        let h = match handle {
            Handle::Staged(h) => h,
            Handle::Read(r) => {
                if let Some(n) = lock(&self.inodes).by_ino.get_mut(&r.ino) {
                    n.readers = n.readers.saturating_sub(1);
                    if r.passthrough {
                        if let Some(b) = &mut n.backing {
                            b.handles = b.handles.saturating_sub(1);
                            if b.handles == 0 {
                                n.backing = None;
                            }
                        }
                    }
                }
                if !r.passthrough && r.rest.is_none() {
                    self.make_flat(r.ino, &r.manifest);
                }
                return None;
            }
            Handle::Virtual(_) => return None,
        };
        if let Some((share, path)) = &h.lease {
            self.leases.done(share, path, &Need::Handle(fh));
        }
        let kernel_last = h.passthrough && self.staged_io_closed(h.ino, &h.staged, h.write);
        let (last, last_writer, dirty) = {
            let mut st = h.staged.state();
            st.handles = st.handles.saturating_sub(1);
            if h.write {
                st.writers = st.writers.saturating_sub(1);
            }
            (st.handles == 0, h.write && st.writers == 0, st.dirty)
        };
        if kernel_last {
            return Some((h.ino, Released::Kernel));
        }
        // The last writer, even with readers left: a release push that
        // gave way to this handle (see `push_durable`) is made now.
        if last_writer && dirty {
            return Some((h.ino, Released::Push));
        }
        if last && !dirty {
            self.retire(h.ino, &h.staged);
        }
        None
    }

    /// The last passthrough write handle of `ino` was released: what no
    /// close pushed is made durable and pushed, as at any last release
    /// ([`Vfs::push_durable`]), once no process that opened it for reading
    /// and writing maps the file any more. (A shared mapping keeps the
    /// kernel's file, so the release comes after the last one made through
    /// it is gone; this guards against one made otherwise.) Until then, the
    /// file is looked at every [`MAPPED_POLL`], and the staging stays.
    pub async fn kernel_released(self: &Arc<Self>, ino: Ino) {
        let Some(staged) = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()) else { return };
        if !self.staging_mapped(ino, &staged).await {
            staged.kernel_done(false);
            return self.push_after_kernel(ino).await;
        }
        tracing::debug!(ino, "the file is still mapped: its push waits for the mapping to go");
        let me = self.clone();
        tokio::spawn(async move {
            while me.staging_mapped(ino, &staged).await {
                tokio::time::sleep(MAPPED_POLL).await;
            }
            staged.kernel_done(true);
            me.push_after_kernel(ino).await;
        });
    }

    async fn push_after_kernel(self: &Arc<Self>, ino: Ino) {
        // The close has returned: durable before it goes, as any change
        // the last release pushes.
        if let Err(e) = self.push_durable(ino).await {
            tracing::warn!(ino, "write-back at release failed: {e:?}");
        }
        self.retire_idle(ino);
    }

    /// Drop `ino`'s staging if no handle uses it and nothing in it is left
    /// to push.
    pub fn retire_idle(&self, ino: Ino) {
        let Some(staged) = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()) else { return };
        let idle = {
            let st = staged.state();
            st.handles == 0 && !st.dirty && st.kernel.is_none()
        };
        if idle {
            self.retire(ino, &staged);
        }
    }

    fn retire(&self, ino: Ino, staged: &Arc<Staged>) {
        // A push in progress reads the staging file by its path: leave it
        // (the push retires it when done).
        let Ok(_pushing) = staged.gate.try_lock() else { return };
        // A change of it still queued (the partner was unreachable, or
        // refused it): the staging is the file's content here until that
        // change is in. Retired, the mount would show the partner's older
        // version, and a later change would start from it.
        let maybe_queued = {
            let st = staged.state();
            st.queued && !st.gone
        };
        if maybe_queued && self.writeback.pending_lineage(staged.lineage) {
            return;
        }
        {
            // Decided again under the inode table's lock, where an open
            // takes a staging and counts its handle in one step: an open
            // that got in since the caller looked keeps the file.
            let mut inodes = lock(&self.inodes);
            let idle = {
                let st = staged.state();
                st.handles == 0 && !st.dirty && st.kernel.is_none()
            };
            if !idle {
                return;
            }
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                if n.staged.as_ref().is_some_and(|s| Arc::ptr_eq(s, staged)) {
                    n.staged = None;
                }
            }
        }
        // What was pushed stays at hand for the next edit of it.
        let keep = {
            let st = staged.state();
            // Not a file unlinked while open: its handles may have written
            // it since, and nothing of that went back.
            st.recut_base.clone().filter(|m| !st.gone && st.expect == Base::Version(m.file_hash) && st.size == m.size)
        };
        match keep {
            Some(m) if staged.complete() => self.writeback.keep(&staged.data, m),
            _ => self.writeback.recycle(&staged.data),
        }
    }

    /// Push first if `ino` holds changes the partner lacks.
    async fn settle(&self, ino: Ino) -> Result<(), Errno> {
        let pending = {
            let inodes = lock(&self.inodes);
            inodes.is_local_only(ino) || inodes.by_ino.get(&ino).is_some_and(|n| n.staged.as_ref().is_some_and(|s| s.state().dirty))
        };
        if pending {
            self.push(ino).await?;
        } else {
            // A push behind a close still in flight would land after what
            // the caller sends (a utimens by path right after the close,
            // as `rsync --inplace` does, would lose its time).
            self.wait_pushed(ino).await;
        }
        Ok(())
    }

    fn remote_errno(&self, what: &str, path: &SharePath, e: RemoteError) -> Errno {
        let errno = Errno::from_remote(&e);
        if errno == Errno::EIO {
            tracing::warn!(partner = %self.remote.partner(), %path, "{what} failed: {e}");
        } else {
            tracing::debug!(%path, "{what}: {e}");
        }
        errno
    }

    pub async fn mkdir(&self, parent: Ino, name: &str, mode: u32) -> Result<Attr, Errno> {
        let (pshare, ppath, kind) = self.node_key(parent)?;
        if kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let share = self.check_writable(&pshare)?;
        let path = ppath.join(name).map_err(|e| Errno::for_path(&e))?;
        let entry = self
            .remote
            .call_stat(Request::Mkdir { share: share.clone(), path: path.clone(), mode })
            .await
            .map_err(|e| self.remote_errno("mkdir", &path, e))?;
        let mut inodes = lock(&self.inodes);
        let ino = Self::upsert(&mut inodes, parent, Some(share), &entry, Instant::now());
        if let Some(n) = inodes.by_ino.get_mut(&ino) {
            n.children = Some((Vec::new(), Instant::now()));
        }
        if let Some((c, _)) = inodes.by_ino.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.retain(|(n, _)| n != name);
            c.push((name.to_string(), ino));
        }
        Self::entries_changed(&mut inodes, parent);
        let n = inodes.by_ino.get(&ino).ok_or(Errno::EIO)?;
        Ok(self.attr_of(&inodes, ino, n))
    }

    /// Forget `name` in `parent` (and the inode's key).
    fn forget(&self, parent: Ino, name: &str) {
        let mut inodes = lock(&self.inodes);
        Self::entries_changed(&mut inodes, parent);
        let mut gone = None;
        if let Some((c, _)) = inodes.by_ino.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            if let Some(i) = c.iter().position(|(n, _)| n == name) {
                gone = Some(c.remove(i).1);
            }
        }
        if gone.is_none() {
            // The parent's listing was dropped meanwhile: the inode the
            // name led to, by its key.
            let key = inodes.by_ino.get(&parent).and_then(|p| Some((share_key(&p.share), p.path.join(name).ok()?)));
            gone = key.and_then(|k| inodes.by_key.get(&k).copied());
        }
        if let Some(ino) = gone {
            if let Some(n) = inodes.by_ino.get(&ino) {
                let key = (share_key(&n.share), n.path.clone());
                inodes.by_key.remove(&key);
            }
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                n.attr_at = None;
                n.unlinked = true;
                n.changed_ns = now_ns();
                if let Some(st) = &n.staged {
                    // Open handles keep writing to it; nothing goes back.
                    let mut st = st.state();
                    st.gone = true;
                    st.dirty = false;
                }
            }
            inodes.set_local_only(ino, false);
        }
    }

    /// File `ino` (at `path`) is about to be unlinked or renamed over.
    /// Its staging's gate, held until it is forgotten (and so `gone`): a
    /// push of it that started before (a close whose release came after)
    /// finishes first, and one that would start after finds it gone. And
    /// its changes still queued (made while the partner was unreachable),
    /// held: they go with it ([`Writeback::supersede`] once it is gone),
    /// rather than come back as a conflict copy.
    async fn going(&self, ino: Ino, share: &Name, path: &SharePath) -> (Option<tokio::sync::OwnedMutexGuard<()>>, Vec<QueueEntry>) {
        let Some(staged) = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()) else { return (None, Vec::new()) };
        let gate = staged.gate.clone().lock_owned().await;
        (Some(gate), self.writeback.hold_pending(self.remote.partner(), share, path, staged.lineage, None).await)
    }

    pub async fn unlink(&self, parent: Ino, name: &str) -> Result<(), Errno> {
        self.remove(parent, name, EntryKind::File).await
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> Result<(), Errno> {
        self.remove(parent, name, EntryKind::Dir).await
    }

    async fn remove(&self, parent: Ino, name: &str, kind: EntryKind) -> Result<(), Errno> {
        let ino = self.lookup(parent, name).await?.ino;
        let (share, path, k) = self.node_key(ino)?;
        let share = self.check_writable(&share)?;
        match (kind, k) {
            (EntryKind::File, Kind::Dir) => return Err(Errno::EISDIR),
            (EntryKind::Dir, Kind::File) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        if lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.virtual_data.is_some()) {
            return Err(Errno::EACCES);
        }
        // A file whose push is in flight is on the partner once that ends
        // (and a directory's files once theirs do): remove it after.
        self.drain_behind().await;
        // A push of this file that started since (a close whose release
        // came after the unlink) finishes first; one that would start
        // after waits for the removal, and then finds it gone.
        let (_gate, held) = self.going(ino, &share, &path).await;
        let local_only = lock(&self.inodes).is_local_only(ino);
        if !local_only {
            let removed = self.remote.call_done(Request::Remove { share, path: path.clone(), kind }).await;
            if let Err(e) = removed {
                if matches!(e, RemoteError::Refused { code: "NOT_FOUND", .. }) {
                    // Removed on the partner already: what was asked for.
                    self.writeback.supersede(&held);
                } else {
                    self.writeback.release(&held);
                }
                return Err(self.remote_errno("remove", &path, e));
            }
        }
        self.writeback.supersede(&held);
        self.forget(parent, name);
        Ok(())
    }

    /// Rename `name` to `newname`. `tid`: the calling thread; a file given
    /// a lockable name is leased for its process's life, as if that process
    /// had opened it.
    pub async fn rename(&self, parent: Ino, name: &str, newparent: Ino, newname: &str, noreplace: bool, tid: u32) -> Result<(), Errno> {
        let ino = self.lookup(parent, name).await?.ino;
        let (share, from, kind) = self.node_key(ino)?;
        let share = self.check_writable(&share)?;
        let (nshare, nppath, nkind) = self.node_key(newparent)?;
        if nkind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if nshare.as_ref() != Some(&share) {
            return Err(Errno(libc::EXDEV));
        }
        let to = nppath.join(newname).map_err(|e| Errno::for_path(&e))?;
        if lock(&self.inodes).by_ino.get(&ino).is_some_and(|n| n.virtual_data.is_some()) {
            return Err(Errno::EACCES);
        }
        // Pushes behind closes reach the partner before the rename does
        // (files under a renamed directory included).
        self.drain_behind().await;
        self.settle(ino).await?;
        // A target created here and not pushed yet is only ours to replace.
        let mut replaced = (None, Vec::new());
        if let Ok(target) = self.lookup(newparent, newname).await {
            if noreplace {
                return Err(Errno(libc::EEXIST));
            }
            self.settle(target.ino).await?;
            replaced = self.going(target.ino, &share, &to).await;
        }
        let (_target_gate, held) = replaced;
        // Saving under a new name (Blender's "Save As", the first save of a
        // new scene: `x.blend@` renamed to `x.blend`) leaves the saving
        // process with a file it never opened: without this it would be
        // unleased while the application has it open. Taken before the
        // rename, so no other node can lease the new name in between.
        let lease = if kind == Kind::File && self.lockable(&share, &to).await { self.process_lease(&share, &to, tid).await? } else { None };
        if let Err(e) =
            self.remote.call_done(Request::Rename { share: share.clone(), from: from.clone(), to: to.clone(), replace: !noreplace }).await
        {
            if let Some(need) = lease {
                self.leases.done(&share, &to, &need);
            }
            self.writeback.release(&held);
            return Err(self.remote_errno("rename", &from, e));
        }
        self.writeback.supersede(&held);
        if let Err(e) = self.writeback.rename(self.remote.partner(), &share, &from, &to) {
            tracing::warn!("{e}");
        }
        self.forget(newparent, newname);
        let mut inodes = lock(&self.inodes);
        Self::entries_changed(&mut inodes, parent);
        if let Some(n) = inodes.by_ino.get_mut(&ino) {
            n.changed_ns = now_ns();
        }
        if let Some((c, _)) = inodes.by_ino.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.retain(|(n, _)| n != name);
        }
        // Re-key the inode and, for a directory, everything under it.
        let key = share.to_string();
        let prefix = format!("{}/", from.as_str());
        let moved: Vec<(Ino, SharePath)> = inodes
            .by_ino
            .iter()
            .filter(|(_, n)| n.share.as_ref() == Some(&share) && (n.path == from || n.path.as_str().starts_with(&prefix)))
            // Only inodes that still hold their name: one unlinked or
            // renamed over keeps its old path, and re-keying it too would
            // let it take the new name from the inode that moved.
            .filter(|(i, n)| inodes.by_key.get(&(key.clone(), n.path.clone())) == Some(*i))
            .filter_map(|(i, n)| {
                let rest = &n.path.as_str()[from.as_str().len()..];
                let new = if rest.is_empty() { to.clone() } else { SharePath::parse(&format!("{}{rest}", to.as_str())).ok()? };
                Some((*i, new))
            })
            .collect();
        for (i, new) in moved {
            if let Some(n) = inodes.by_ino.get_mut(&i) {
                let old = std::mem::replace(&mut n.path, new.clone());
                if i == ino {
                    n.parent = newparent;
                }
                inodes.by_key.remove(&(key.clone(), old));
                inodes.by_key.insert((key.clone(), new), i);
            }
        }
        if let Some((c, _)) = inodes.by_ino.get_mut(&newparent).and_then(|p| p.children.as_mut()) {
            c.retain(|(n, _)| n != newname);
            c.push((newname.to_string(), ino));
        }
        Ok(())
    }

    /// chmod, truncate, utimens (`times`: access, modification). A change
    /// moves the inode's ctime; a utimens of a directory gives it the mtime
    /// asked for again, over the time of a change of its entries made here.
    /// The access time is kept here only (the partner keeps none).
    pub async fn setattr(
        &self,
        ino: Ino,
        mode: Option<u32>,
        size: Option<u64>,
        times: (Option<i64>, Option<i64>),
        fh: Option<u64>,
        tid: u32,
    ) -> Result<Attr, Errno> {
        let (atime_ns, mtime_ns) = times;
        let attr = if mode.is_none() && size.is_none() && mtime_ns.is_none() && atime_ns.is_some() {
            // touch -a: the same checks as any change, nothing to send.
            let (share, _, _) = self.node_key(ino)?;
            self.check_writable(&share)?;
            self.cached_attr(ino)?
        } else {
            self.change_attrs(ino, mode, size, mtime_ns, fh, tid).await?
        };
        if mode.is_none() && size.is_none() && mtime_ns.is_none() && atime_ns.is_none() {
            return Ok(attr);
        }
        {
            let mut inodes = lock(&self.inodes);
            if let Some(n) = inodes.by_ino.get_mut(&ino) {
                n.changed_ns = now_ns();
                if mtime_ns.is_some() {
                    n.entries_ns = 0;
                }
                n.atime_ns = atime_ns.or(n.atime_ns);
            }
        }
        self.cached_attr(ino)
    }

    async fn change_attrs(
        &self,
        ino: Ino,
        mode: Option<u32>,
        size: Option<u64>,
        mtime_ns: Option<i64>,
        fh: Option<u64>,
        tid: u32,
    ) -> Result<Attr, Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        if mode.is_none() && size.is_none() && mtime_ns.is_none() {
            return self.getattr(ino).await;
        }
        let (unlinked, orphan) = lock(&self.inodes).by_ino.get(&ino).map_or((false, None), |n| (n.unlinked, n.staged.clone()));
        if unlinked {
            // fchmod, futimens, ftruncate of a file unlinked through the
            // mount while open: its name may be another file's now, so the
            // change stays with the handles.
            if let Some(len) = size {
                let staged = orphan.ok_or(Errno::EBADF)?;
                let _gate = staged.gate.lock().await;
                staged.set_len(len, now_ns()).map_err(io_errno)?;
            }
            let mut inodes = lock(&self.inodes);
            let n = inodes.by_ino.get_mut(&ino).ok_or(Errno::ENOENT)?;
            if let Some(m) = mode {
                n.mode = m & 0o7777;
            }
            if let Some(t) = mtime_ns {
                match &n.staged {
                    Some(st) => st.current().mtime_ns = t,
                    None => n.mtime_ns = t,
                }
            }
            drop(inodes);
            return self.cached_attr(ino);
        }
        let share = self.check_writable(&share)?;
        if let Some(len) = size {
            if kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            let open_for_write = fh.is_some_and(|fh| matches!(lock(&self.handles).get(&fh), Some(Handle::Staged(h)) if h.write));
            if open_for_write {
                let staged = self.stage(ino, false, false).await?;
                let _gate = staged.gate.lock().await;
                staged.set_len(len, now_ns()).map_err(io_errno)?;
                self.touch_handles(ino);
            } else {
                // truncate(2) by path: open, cut, push, close.
                let (tfh, _, _) = self.open(ino, OpenMode { write: true, tid, internal: true, ..Default::default() }, &no_backing).await?;
                let cut = async {
                    let staged = self.stage(ino, false, false).await?;
                    {
                        let _gate = staged.gate.lock().await;
                        staged.set_len(len, now_ns()).map_err(io_errno)?;
                    }
                    self.push(ino).await
                };
                let r = cut.await;
                // Pushed above (or failed, and r says so). Not a handle of
                // the kernel's: its release ends no passthrough.
                let _ = self.release(tfh);
                r?;
            }
        }
        if mode.is_some() || mtime_ns.is_some() {
            // Open for write with changes not pushed yet (tar sets times and
            // mode on the open descriptor before it closes it): keep them
            // for the push that close or fsync makes, rather than push the
            // content now and again at close.
            let staged = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.staged.clone()).filter(|_| size.is_none());
            let deferred = staged.is_some_and(|s| {
                let mut st = s.current();
                let open_dirty = st.dirty && st.handles > 0;
                if open_dirty {
                    st.due_mode = mode.or(st.due_mode);
                    st.due_mtime_ns = mtime_ns.or(st.due_mtime_ns);
                    if let Some(t) = mtime_ns {
                        st.mtime_ns = t;
                    }
                }
                open_dirty
            });
            if deferred {
                if let (Some(m), Some(n)) = (mode, lock(&self.inodes).by_ino.get_mut(&ino)) {
                    n.mode = m & 0o7777;
                }
                return self.cached_attr(ino);
            }
            if kind == Kind::Dir {
                // A push in flight into the directory would move its time
                // again after this (tar sets its directories' times last).
                self.drain_behind().await;
            }
            self.settle(ino).await?;
            self.set_attr_remote(ino, share, &path, mode, mtime_ns).await?;
        }
        self.cached_attr(ino)
    }

    /// `deftfs lock`: a lease held until unlock or `ttl`.
    pub async fn lock_path(&self, ino: Ino, ttl: Option<Duration>) -> Result<u64, Errno> {
        let (share, path) = self.file_key(ino)?;
        // Leases need write access (the partner refuses them otherwise).
        self.check_writable(&Some(share.clone()))?;
        let owner = crate::lease::owner_name("manual");
        let until = ttl.map(|t| Instant::now() + t);
        let token = self.leases.take(&share, &path, &owner, Need::Manual { until }).await.map_err(|e| self.lease_errno(&path, &e))?;
        self.took_lease(&share, &path);
        Ok(token)
    }

    pub async fn unlock_path(&self, ino: Ino) -> Result<bool, Errno> {
        let (share, path) = self.file_key(ino)?;
        Ok(self.leases.release(&share, &path).await)
    }

    /// Every lease on the mounted shares: this node's and others'.
    pub async fn all_leases(&self) -> Vec<crate::mount::leases::LeaseInfo> {
        let shares: Vec<Name> = match &self.config.root {
            Root::Share(s) => vec![s.clone()],
            Root::Shares(_) => lock(&self.writable).iter().cloned().collect(),
        };
        let mut out = Vec::new();
        for s in shares {
            lock(&self.share_leases).remove(&s);
            if let Some((_, leases)) = self.share_leases(&s).await {
                for l in leases {
                    out.push(crate::mount::leases::LeaseInfo {
                        share: s.to_string(),
                        path: l.path.to_string(),
                        holder: l.holder.to_string(),
                        owner: l.owner.to_string(),
                        token: l.token,
                        since_ns: l.since_ns,
                        expires_ns: l.expires_ns,
                        mine: l.holder == self.config.me,
                    });
                }
            }
        }
        out
    }
}
