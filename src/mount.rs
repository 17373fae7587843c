//! Mounts: a partner's shares as a local filesystem, read and written.
//!
//! - [`remote`]: the link to the partner (metadata, chunk fetches, watch);
//! - [`store`](crate::store): the bounded, verified chunk cache;
//! - [`meta`]: the last known listings and manifests (offline browsing);
//! - [`vfs`]: the filesystem itself, as plain async Rust;
//! - [`stage`]: files being written, staged locally;
//! - [`leases`]: the leases a mount holds on the partner's files;
//! - [`fuse`]: the fuser adapter;
//! - [`Mounts`] (here): the daemon's set of active mounts: mount, unmount,
//!   find the mount a path is in, report.
//!
//! Each mount has its own cache directory, `<home>/cache/<partner>/<share>`
//! (`_all` when the whole partner is mounted), so a mount's `--cache-size`
//! bounds exactly what it uses, and its cache and metadata survive a
//! restart of the daemon.

pub mod ahead;
pub mod errno;
pub mod fuse;
pub mod leases;
pub mod meta;
pub mod remote;
pub mod stage;
pub mod vfs;

use crate::node::Node;
use crate::proto::{EntryKind, Name};
use crate::store::{CacheStats, ChunkStore};
use remote::Remote;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vfs::{Root, Vfs, VfsConfig};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0:?} is not PARTNER or PARTNER:SHARE")]
    BadSpec(String),
    #[error("{0} is not a partner of this node: add it with `deftfs partner add`")]
    UnknownPartner(String),
    #[error("partner {partner} grants no share {share}{}", if .granted.is_empty() { String::new() } else { format!(" (it grants: {})", .granted.join(", ")) })]
    UnknownShare { partner: String, share: String, granted: Vec<String> },
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, String),
    #[error("{0} is already mounted (deftfs unmount it first)")]
    AlreadyMounted(PathBuf),
    #[error("nothing is mounted at {0} (see `deftfs mounts`)")]
    NotMounted(PathBuf),
    #[error("{0} is not inside a deftfs mount (see `deftfs mounts`)")]
    NotInMount(PathBuf),
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("partner {partner} is unreachable and this node has never seen share {share}: try again when it is online ({detail})")]
    NeverSeen { partner: String, share: String, detail: String },
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error("mounting {0}: {1}")]
    Fuse(PathBuf, std::io::Error),
}

/// What to mount: `PARTNER` or `PARTNER:SHARE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub partner: Name,
    pub share: Option<Name>,
}

impl std::str::FromStr for MountSpec {
    type Err = MountError;
    fn from_str(s: &str) -> Result<MountSpec, MountError> {
        let bad = || MountError::BadSpec(s.to_string());
        let (p, sh) = match s.split_once(':') {
            Some((p, sh)) => (p, Some(sh)),
            None => (s, None),
        };
        let partner = Name::new(p).map_err(|_| bad())?;
        let share = sh.map(|sh| Name::new(sh).map_err(|_| bad())).transpose()?;
        Ok(MountSpec { partner, share })
    }
}

impl std::fmt::Display for MountSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.share {
            Some(s) => write!(f, "{}:{s}", self.partner),
            None => write!(f, "{}", self.partner),
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MountOptions {
    /// Cache bound in bytes (default: `[mount] cache_size`).
    pub cache_size: Option<u64>,
    pub read_only: bool,
    /// Seconds an uncached read waits for an unreachable partner.
    pub offline_wait_secs: Option<u64>,
}

/// One line of `deftfs mounts`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountInfo {
    pub spec: String,
    pub mountpoint: PathBuf,
    /// "online" or "offline".
    pub state: String,
    pub read_only: bool,
    /// Whether the partner notifies changes (WATCH) right now.
    pub watching: bool,
    pub cache: CacheStats,
    pub cache_dir: PathBuf,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Changes queued for this partner and not yet on it.
    #[serde(default)]
    pub pending_writebacks: usize,
    /// Leases this mount holds.
    #[serde(default)]
    pub leases: usize,
    /// READ requests the kernel sent this mount, and the bytes they asked
    /// for. A read the kernel's page cache answers counts in neither.
    #[serde(default)]
    pub kernel_reads: u64,
    #[serde(default)]
    pub kernel_read_bytes: u64,
    /// Opens the kernel serves from a whole local copy of the file itself
    /// (FUSE passthrough), and the copies ready (count, bytes).
    #[serde(default)]
    pub passthrough_opens: u64,
    #[serde(default)]
    pub whole_copies: usize,
    #[serde(default)]
    pub whole_copy_bytes: u64,
}

struct Mounted {
    spec: MountSpec,
    mountpoint: PathBuf,
    vfs: Arc<Vfs>,
    session: Mutex<Option<::fuser::BackgroundSession>>,
    watch: tokio::task::AbortHandle,
    renew: tokio::task::AbortHandle,
}

impl Mounted {
    fn info(&self) -> MountInfo {
        let link = self.vfs.remote.stats();
        let pending = self.vfs.writeback.entries(Some(self.vfs.remote.partner())).len();
        let (kernel_reads, kernel_read_bytes) = self.vfs.kernel_reads();
        let (passthrough_opens, whole_copies, whole_copy_bytes) = self.vfs.passthrough_stats();
        MountInfo {
            spec: self.spec.to_string(),
            mountpoint: self.mountpoint.clone(),
            state: if link.online { "online" } else { "offline" }.into(),
            read_only: self.vfs.read_only(),
            watching: self.vfs.is_watching(),
            cache: self.vfs.store.stats(),
            cache_dir: self.vfs.store.dir().to_path_buf(),
            chunks_fetched: link.chunks_fetched,
            bytes_fetched: link.bytes_fetched,
            pending_writebacks: pending,
            leases: self.vfs.leases.mine().len(),
            kernel_reads,
            kernel_read_bytes,
            passthrough_opens,
            whole_copies,
            whole_copy_bytes,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The daemon's active mounts.
pub struct Mounts {
    node: Arc<Node>,
    active: Mutex<Vec<Arc<Mounted>>>,
    pub writeback: Arc<crate::writeback::Writeback>,
}

/// Readahead of a sequential reader.
const READAHEAD: u64 = 8 << 20;

impl Mounts {
    /// The daemon's mounts, with the write-back queue they share; pushes
    /// what earlier runs left queued.
    pub fn new(node: Arc<Node>) -> Result<Mounts, crate::writeback::WritebackError> {
        let writeback = crate::writeback::Writeback::open(node.clone())?;
        writeback.start();
        Ok(Mounts { node, active: Mutex::new(Vec::new()), writeback })
    }

    pub fn list(&self) -> Vec<MountInfo> {
        lock(&self.active).iter().map(|m| m.info()).collect()
    }

    /// Mount `spec` on `mountpoint`; returns once the kernel serves it.
    pub async fn mount(&self, spec: MountSpec, mountpoint: &Path, opts: MountOptions) -> Result<MountInfo, MountError> {
        let partner = spec.partner.as_str();
        if self.node.config.partner(partner).is_none() {
            return Err(MountError::UnknownPartner(partner.to_string()));
        }
        let mountpoint = prepare_mountpoint(mountpoint)?;
        if lock(&self.active).iter().any(|m| m.mountpoint == mountpoint) {
            return Err(MountError::AlreadyMounted(mountpoint));
        }
        let cache_dir = self.node.home.join("cache").join(partner).join(spec.share.as_ref().map_or("_all", |s| s.as_str()));
        std::fs::create_dir_all(&cache_dir).map_err(|e| MountError::Path { path: cache_dir.clone(), message: e.to_string() })?;
        let limit = opts.cache_size.unwrap_or(self.node.config.mount.cache_size);
        let store = ChunkStore::open(&cache_dir, limit)?;
        let meta = meta::Meta::open(&cache_dir)?;
        let wait = Duration::from_secs(opts.offline_wait_secs.unwrap_or(self.node.config.mount.offline_wait_secs).max(1));
        let remote = Remote::new(self.node.clone(), partner, store.clone(), wait)?;
        let mut access = None;
        let root = match &spec.share {
            None => Root::Shares(None),
            Some(share) => {
                let (kind, known) = share_kind(&remote, &meta, share).await?;
                access = Some(known);
                match kind {
                    EntryKind::Dir => Root::Share(share.clone()),
                    EntryKind::File => Root::Shares(Some(share.clone())),
                }
            }
        };
        let leases = leases::Leases::new(remote.clone(), self.node.config.mount.lease_ttl_secs as u32);
        let config = VfsConfig {
            root: root.clone(),
            read_only: opts.read_only,
            me: self.node.config.node.name.clone(),
            readahead: READAHEAD,
            send_ahead: self.node.config.mount.send_ahead,
        };
        // Whole copies for passthrough: only a speed-up, so a mount goes on
        // without them.
        let flats = if self.node.config.mount.passthrough {
            let dir = cache_dir.join("flat");
            crate::flat::Flats::open(&dir, store.clone())
                .map_err(|e| tracing::warn!(dir = %dir.display(), "no whole copies, re-reads go through the page cache: {e}"))
                .ok()
        } else {
            None
        };
        let vfs = Arc::new(Vfs::new(remote.clone(), store, meta, config, self.writeback.clone(), leases.clone(), flats));
        match access {
            Some(Access::Said(rows)) => vfs.set_access(&rows),
            // Mounted while the partner is unreachable: what we may
            // write, as it last said.
            Some(Access::LastKnown(entries)) => vfs.set_access_from_listing(&entries),
            None => {}
        }

        let mut config = ::fuser::Config::default();
        config.mount_options = vec![
            // The daemon's pid: a later daemon tells a mount whose daemon
            // died (abort_dead_mount) from another live daemon's.
            ::fuser::MountOption::FSName(format!("deftfs:{spec}@{}", std::process::id())),
            ::fuser::MountOption::Subtype("deftfs".into()),
            ::fuser::MountOption::NoDev,
            ::fuser::MountOption::NoSuid,
        ];
        if opts.read_only {
            // The kernel answers EROFS for every change, at once.
            config.mount_options.push(::fuser::MountOption::RO);
        }
        config.n_threads = Some(2);
        let fs = fuse::Fuse::new(vfs.clone(), tokio::runtime::Handle::current());
        let mp = mountpoint.clone();
        let session = tokio::task::spawn_blocking(move || ::fuser::spawn_mount(fs, &mp, &config))
            .await
            .map_err(|e| MountError::Fuse(mountpoint.clone(), std::io::Error::other(e.to_string())))?
            .map_err(|e| MountError::Fuse(mountpoint.clone(), e))?;
        vfs.set_invalidator(fuse::invalidator(session.notifier()));
        // What processes' maps show for a mapped file of the mount.
        let mp = mountpoint.clone();
        match tokio::task::spawn_blocking(move || std::fs::metadata(mp)).await {
            Ok(Ok(meta)) => vfs.set_mount_dev(std::os::unix::fs::MetadataExt::dev(&meta)),
            Ok(Err(e)) => tracing::warn!(mountpoint = %mountpoint.display(), "the new mount cannot be looked at: {e}"),
            Err(e) => tracing::warn!(mountpoint = %mountpoint.display(), "the new mount cannot be looked at: {e}"),
        }
        let replays = self.writeback.subscribe();
        let watch = tokio::spawn({
            let vfs = vfs.clone();
            async move { tokio::join!(watch_loop(vfs.clone(), root), follow_replays(vfs, replays)) }
        })
        .abort_handle();
        // Ready means ready to read: the data link is up too, if the
        // partner is reachable (else the first read connects it). Not
        // before the steps that can fail: its tasks would keep it open.
        let data_link = remote.warm_data();
        if remote.is_online() {
            let _ = tokio::time::timeout(wait, data_link).await;
        }
        let renew = leases.start();
        let mounted =
            Arc::new(Mounted { spec: spec.clone(), mountpoint: mountpoint.clone(), vfs, session: Mutex::new(Some(session)), watch, renew });
        lock(&self.active).push(mounted.clone());
        tracing::info!(%spec, mountpoint = %mountpoint.display(), cache = %cache_dir.display(), limit, "mounted");
        Ok(mounted.info())
    }

    /// Unmount what is mounted at `mountpoint`.
    pub async fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        let found = {
            let mut active = lock(&self.active);
            let i = active.iter().position(|m| m.mountpoint == abs || m.mountpoint == mountpoint);
            i.map(|i| active.remove(i))
        };
        let Some(m) = found else {
            // Left by a daemon that died: ended here as a new mount would.
            let path = abs.clone();
            if tokio::task::spawn_blocking(move || abort_dead_mount(&path)).await.unwrap_or(false) {
                return Ok(());
            }
            return Err(MountError::NotMounted(abs));
        };
        stop(&m).await;
        Ok(())
    }

    pub async fn unmount_all(&self) {
        let all: Vec<_> = lock(&self.active).drain(..).collect();
        for m in all {
            stop(&m).await;
        }
    }

    /// The mount `path` is in, and the path relative to its root.
    fn find(&self, path: &Path) -> Result<(Arc<Mounted>, PathBuf), MountError> {
        let abs = std::path::absolute(path).map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.to_string() })?;
        let active = lock(&self.active);
        let best = active.iter().filter(|m| abs.starts_with(&m.mountpoint)).max_by_key(|m| m.mountpoint.components().count());
        let m = best.ok_or_else(|| MountError::NotInMount(abs.clone()))?;
        let rel = abs.strip_prefix(&m.mountpoint).map(Path::to_path_buf).unwrap_or_default();
        Ok((m.clone(), rel))
    }

    async fn resolve(&self, path: &Path) -> Result<(Arc<Mounted>, vfs::Ino), MountError> {
        let (m, rel) = self.find(path)?;
        let ino = m.vfs.resolve(&rel).await.map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.describe() })?;
        Ok((m, ino))
    }

    /// Pin a file or directory: fetch it all now and keep it. (files, bytes)
    pub async fn pin(&self, path: &Path) -> Result<(usize, u64), MountError> {
        let (m, ino) = self.resolve(path).await?;
        m.vfs.pin(ino).await.map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.describe() })
    }

    pub async fn unpin(&self, path: &Path) -> Result<usize, MountError> {
        let (m, ino) = self.resolve(path).await?;
        m.vfs.unpin(ino).await.map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.describe() })
    }

    pub async fn status(&self, path: &Path) -> Result<vfs::FileStatus, MountError> {
        let (m, ino) = self.resolve(path).await?;
        let status = m.vfs.status(ino).await;
        let failed = |e: errno::Errno| MountError::Path { path: path.to_path_buf(), message: e.describe() };
        let Some((share, p)) = m.vfs.share_path(ino) else { return status.map_err(failed) };
        let partner = m.vfs.remote.partner();
        let queued = self.writeback.entries(Some(partner));
        let mut st = match status {
            Ok(st) => st,
            // Not described (the partner unreachable, or without it yet) but
            // queued from here: the latest queued content is what this node
            // has of it, whole.
            Err(e) => queued
                .iter()
                .rev()
                .find(|q| q.share == share.as_str() && q.path == p.as_str())
                .and_then(|q| std::fs::metadata(&q.data).ok())
                .map(|md| vfs::FileStatus {
                    kind: "file".into(),
                    size: md.len(),
                    local_bytes: md.len(),
                    written_here: true,
                    ..Default::default()
                })
                .ok_or_else(|| failed(e))?,
        };
        let under =
            |s: &str, q: &str| s == share.as_str() && (p.is_root() || q == p.as_str() || q.starts_with(&format!("{}/", p.as_str())));
        st.pending_writebacks = queued
            .into_iter()
            .filter(|e| under(&e.share, &e.path))
            .map(|e| format!("{} ({}{})", e.path, e.state, e.error.map(|x| format!(": {x}")).unwrap_or_default()))
            .collect();
        st.conflicts = self
            .writeback
            .conflicts(partner)
            .into_iter()
            .filter(|(s, q, _, _)| under(s, q))
            .map(|(_, q, copy, _)| format!("{q} -> {copy}"))
            .collect();
        Ok(st)
    }

    /// Take a lease on a file by hand (`deftfs lock`). Returns its token.
    pub async fn lock(&self, path: &Path, ttl: Option<Duration>) -> Result<u64, MountError> {
        let (m, ino) = self.resolve(path).await?;
        m.vfs.lock_path(ino, ttl).await.map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.describe() })
    }

    pub async fn unlock(&self, path: &Path) -> Result<bool, MountError> {
        let (m, ino) = self.resolve(path).await?;
        m.vfs.unlock_path(ino).await.map_err(|e| MountError::Path { path: path.to_path_buf(), message: e.describe() })
    }

    /// Leases on every mounted share (of `partner`, if given), with the
    /// mount point they are seen through.
    pub async fn locks(&self, partner: Option<&str>) -> Vec<(PathBuf, leases::LeaseInfo)> {
        let active: Vec<Arc<Mounted>> = lock(&self.active).clone();
        let mut out = Vec::new();
        for m in active {
            if partner.is_some_and(|p| p != m.spec.partner.as_str()) {
                continue;
            }
            for l in m.vfs.all_leases().await {
                out.push((m.mountpoint.clone(), l));
            }
        }
        out
    }

    /// Every mount's cache, or evict what may be evicted. (mountpoint, stats, freed)
    pub fn cache(&self, clear: bool) -> Vec<(PathBuf, CacheStats, u64)> {
        lock(&self.active)
            .iter()
            .map(|m| {
                let freed = if clear { m.vfs.clear_flats() + m.vfs.store.clear() } else { 0 };
                (m.mountpoint.clone(), m.vfs.store.stats(), freed)
            })
            .collect()
    }
}

/// Which shares we may write: as the partner says now (DISCOVER), or, while
/// it is unreachable, as its last answer said (the saved root listing,
/// [`vfs::root_entries`]).
enum Access {
    Said(Vec<crate::proto::ShareRow>),
    LastKnown(Vec<crate::proto::Entry>),
}

/// Whether `share` is a directory or a file share, and which shares we may
/// write: from the partner, or from the last known state when it is
/// offline.
async fn share_kind(remote: &Arc<Remote>, meta: &meta::Meta, share: &Name) -> Result<(EntryKind, Access), MountError> {
    let partner = remote.partner().to_string();
    match remote.discover().await {
        Ok(rows) => {
            let kind = rows.iter().find(|r| r.name == *share).map(|r| r.kind);
            let _ = meta.save_listing(meta::ROOT_SHARE, &crate::proto::SharePath::root(), &vfs::root_entries(&rows));
            let kind = kind.ok_or_else(|| MountError::UnknownShare {
                partner,
                share: share.to_string(),
                granted: rows.iter().map(|r| r.name.to_string()).collect(),
            })?;
            Ok((kind, Access::Said(rows)))
        }
        Err(e @ remote::RemoteError::Offline { .. }) => meta
            .listing(meta::ROOT_SHARE, &crate::proto::SharePath::root())
            .and_then(|entries| {
                let kind = entries.iter().find(|e| e.path.as_str() == share.as_str())?.kind;
                Some((kind, Access::LastKnown(entries)))
            })
            .ok_or_else(|| MountError::NeverSeen { partner, share: share.to_string(), detail: e.to_string() }),
        Err(e) => Err(e.into()),
    }
}

/// An absolute, existing, empty-or-not directory that nothing stale holds.
fn prepare_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let abs = std::path::absolute(path).map_err(|e| MountError::MountPoint(path.to_path_buf(), e.to_string()))?;
    abort_dead_mount(&abs);
    match std::fs::metadata(&abs) {
        Ok(md) if md.is_dir() => Ok(abs),
        Ok(_) => Err(MountError::MountPoint(abs, "not a directory".into())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // A mount whose daemon died: detach it, then use the directory.
            tracing::warn!(mountpoint = %abs.display(), "stale mount (its daemon died): detaching it");
            lazy_unmount(&abs);
            match std::fs::metadata(&abs) {
                Ok(md) if md.is_dir() => Ok(abs),
                _ => Err(MountError::MountPoint(abs, "a stale mount is in the way and could not be detached".into())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(MountError::MountPoint(abs.clone(), format!("does not exist: create it with `mkdir -p {}`", abs.display())))
        }
        Err(e) => Err(MountError::MountPoint(abs, e.to_string())),
    }
}

/// A deftfs mount at `abs` whose daemon is dead: end its FUSE connection
/// (`/sys/fs/fuse/connections/N/abort`), then detach it. Killed with
/// `kill -9` at the wrong moment, a daemon can leave a thread stuck in the
/// kernel on an invalidation that waits for a directory lock, held by a
/// process that waits for the dead daemon's answer: the connection then
/// never closes, everything that touches the mount hangs (a `stat` of the
/// mount point too), and the daemon stays a zombie, until the connection
/// is aborted. Mounts of a live daemon, and mounts made before the pid
/// was in their source (`deftfs:SPEC@PID`), are left alone.
fn abort_dead_mount(abs: &Path) -> bool {
    let Some((conn, pid)) = deftfs_mount_at(abs) else { return false };
    if process_alive(pid) {
        return false;
    }
    tracing::warn!(mountpoint = %abs.display(), pid, "stale mount (its daemon died): aborting its connection and detaching it");
    abort_and_detach(abs, conn)
}

/// End every mount of daemon `pid` if it is dead, as [`abort_dead_mount`]
/// does for one: what frees a daemon killed while one of its threads was
/// stuck on such a mount, which holds its sockets (its control socket
/// still answers) until that thread is out. Returns how many it ended.
pub fn end_mounts_of_dead_daemon(pid: u32) -> usize {
    if process_alive(pid) {
        return 0;
    }
    let mut ended = 0;
    for (at, conn, _) in deftfs_mounts().into_iter().filter(|m| m.2 == pid) {
        tracing::warn!(mountpoint = %at, pid, "mount of a daemon that died: aborting its connection and detaching it");
        if abort_and_detach(Path::new(&at), conn) {
            ended += 1;
        }
    }
    ended
}

/// Abort FUSE connection `conn` (the mount at `abs`), then detach `abs`.
fn abort_and_detach(abs: &Path, conn: u32) -> bool {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() {
        // The fusectl file system is not mounted on every machine.
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let mounted =
            unsafe { libc::mount(c"fusectl".as_ptr(), c"/sys/fs/fuse/connections".as_ptr(), c"fusectl".as_ptr(), 0, std::ptr::null()) };
        if mounted != 0 {
            tracing::debug!("fusectl: {}", std::io::Error::last_os_error());
        }
    }
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::warn!(mountpoint = %abs.display(), "could not abort the stale mount's connection ({}): {e}", abort.display());
    }
    lazy_unmount(abs)
}

/// The FUSE connection number and daemon pid of the deftfs mount at `abs`,
/// from /proc/self/mountinfo (nothing that touches the mount itself).
fn deftfs_mount_at(abs: &Path) -> Option<(u32, u32)> {
    let want = abs.to_str()?;
    deftfs_mounts().into_iter().rev().find(|m| m.0 == want).map(|(_, conn, pid)| (conn, pid))
}

/// Every deftfs mount whose source names its daemon (`deftfs:SPEC@PID`):
/// (mount point, FUSE connection number, daemon pid), in mountinfo order.
fn deftfs_mounts() -> Vec<(String, u32, u32)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let at = unescape_mountinfo(fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let (fstype, source) = (fields.get(sep + 1)?, fields.get(sep + 2)?);
            if !fstype.starts_with("fuse") || !source.starts_with("deftfs:") {
                return None;
            }
            let pid = source.rsplit_once('@')?.1.parse().ok()?;
            let conn = fields.get(2)?.split_once(':')?.1.parse().ok()?;
            Some((at, conn, pid))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    leases::proc_stat_field::<String>(pid, 3).is_some_and(|state| state != "Z" && state != "X")
}

/// Detach a mount now; the kernel finishes it when its last user goes.
pub fn lazy_unmount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// How long an unmount waits for the pushes its last closes left in flight.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

async fn stop(m: &Arc<Mounted>) {
    m.watch.abort();
    m.renew.abort();
    let session = lock(&m.session).take();
    if let Some(session) = session {
        let mp = m.mountpoint.clone();
        let joined = tokio::task::spawn_blocking(move || {
            if let Err(e) = session.umount_and_join() {
                // Busy (a shell sits in it): detach, the kernel ends it when
                // the last user leaves.
                tracing::warn!(mountpoint = %mp.display(), "unmount: {e}; detaching instead");
                lazy_unmount(&mp);
            }
        })
        .await;
        if let Err(e) = joined {
            tracing::error!("unmount task: {e}");
        }
    }
    // Pushes behind the last closes: let them end (their leases with
    // them), for a while; what is still in flight then stays in the queue,
    // made durable, and goes back when the daemon runs again.
    if tokio::time::timeout(DRAIN_WAIT, m.vfs.drain_behind()).await.is_err() {
        tracing::warn!(mountpoint = %m.mountpoint.display(), "unmount: write-backs still in flight after {DRAIN_WAIT:?}; they stay queued");
    }
    m.vfs.writeback.make_durable().await;
    m.vfs.leases.release_all().await;
    m.vfs.remote.close().await;
    tracing::info!(spec = %m.spec, mountpoint = %m.mountpoint.display(), "unmounted");
}

/// Forget what the mount knew of each path an earlier run's queued change
/// landed on (the partner's watch says nothing of this node's own
/// changes): without it, a restarted mount that listed a directory before
/// the change landed would not show the file, and a create of the name
/// would become a conflict copy.
async fn follow_replays(vfs: Arc<Vfs>, mut landed: tokio::sync::broadcast::Receiver<crate::writeback::Landed>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match landed.recv().await {
            Ok(l) if l.partner == vfs.remote.partner() => vfs.changed(&l.share, &l.path),
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                for share in vfs.known_shares() {
                    vfs.changed(&share, &crate::proto::SharePath::root());
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The longest wait between two attempts to bring a watch back. Each is
/// also what finds out that an unreachable partner is back (requests do
/// not wait for it meanwhile, [`crate::reach`]), so it is short; an
/// attempt is a handshake, a few datagrams.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Keep a watch on the mounted shares, reconnecting with backoff; while it
/// is up, listings are trusted until the partner says they changed.
async fn watch_loop(vfs: Arc<Vfs>, root: Root) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let shares: Vec<Name> = match &root {
            Root::Share(s) | Root::Shares(Some(s)) => vec![s.clone()],
            Root::Shares(None) => match vfs.remote.discover().await {
                Ok(rows) => {
                    vfs.set_access(&rows);
                    rows.into_iter().map(|r| r.name).collect()
                }
                Err(_) => Vec::new(),
            },
        };
        if !shares.is_empty() {
            let started = std::time::Instant::now();
            let v1 = vfs.clone();
            let v2 = vfs.clone();
            let ready = move || {
                v1.set_watching(true);
                // The watch start dropped every listing; the root's is the
                // first any path through the mount needs (a lookup lists
                // the parent): ask for it now rather than in the user's
                // first `stat`, a round trip or two (LIST, LOCKS) later.
                let v = v1.clone();
                tokio::spawn(async move { v.warm_root().await });
            };
            let changed = move |share: &crate::proto::Name, path: &crate::proto::SharePath| match crate::fault::changed_delay_ms() {
                Some(ms) => {
                    let (v, share, path) = (v2.clone(), share.clone(), path.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(ms.into())).await;
                        v.changed(&share, &path);
                    });
                }
                None => v2.changed(share, path),
            };
            let why = vfs.remote.watch(&shares, &ready, &changed).await;
            vfs.set_watching(false);
            // Whatever changed while the watch was down is not known.
            for s in &shares {
                vfs.changed(s, &crate::proto::SharePath::root());
            }
            if let Some(code) = why.code() {
                tracing::info!(partner = %vfs.remote.partner(), "partner does not watch ({code}): refreshing listings every second instead");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
            tracing::debug!(partner = %vfs.remote.partner(), "watch ended: {why}");
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_secs(1);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_unescape_and_dead_processes_are_told_from_live_ones() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain\x"), r"/plain\x");
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not reaped yet: a zombie.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!process_alive(pid), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert_eq!(deftfs_mount_at(Path::new("/no/such/mount")), None);
    }

    #[test]
    fn specs_parse_and_print_back() {
        let s: MountSpec = "bob".parse().unwrap();
        assert_eq!((s.partner.as_str(), s.share.is_none()), ("bob", true));
        let s: MountSpec = "bob:files".parse().unwrap();
        assert_eq!(s.share.as_ref().map(|n| n.as_str()), Some("files"));
        assert_eq!(s.to_string(), "bob:files");
        for bad in ["", ":files", "bob:", "bob:a:b", "../x", "bob:sh are", "b\u{0}b"] {
            let e = bad.parse::<MountSpec>().unwrap_err().to_string();
            assert!(e.contains("is not PARTNER or PARTNER:SHARE"), "{bad:?}: {e}");
        }
    }
}
