//! The write-back queue: changes made through a mount, on their way to the
//! partner that serves the file.
//!
//! A mount stages a file's new content in `<home>/writeback/<id>.data`;
//! when it is closed or fsynced, the file is fsynced and an entry naming
//! it is committed to `<home>/writeback/queue.db` (SQLite, synchronous
//! FULL). From then on the change survives a `kill -9` or a power loss:
//! [`Writeback::start`] pushes every entry left when the daemon starts.
//!
//! Each entry is pushed as a delta ([`crate::transfer::client::Session`]):
//! only chunks the partner lacks cross the network, and every write-back
//! ends with a signed receipt and a history row. The push carries the
//! version the write started from (`BASE:`) and the lease token it was
//! made under (`FENCE:`); when the partner refuses it as a conflict, the
//! content lands beside the file as `NAME (conflict NODE YYYY-MM-DD
//! HHMMSS).EXT` instead, so nothing is ever silently overwritten or lost.
//! An unreachable partner leaves the entry queued; it is retried.

use crate::chunk::Manifest;
use crate::node::Node;
use crate::proto::{Base, Name, SharePath};
use crate::reach::Attempt;
use crate::time::Timestamp;
use crate::transfer::client::{PushOptions, Session};
use crate::transfer::{Report, TransferError};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error("write-back queue {path}: {source}")]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("write-back staging {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A change an earlier run left queued that has now landed on its partner
/// (as itself or as a conflict copy): the partner does not tell a mount of
/// its own node's changes, and this run's mounts never knew of it.
#[derive(Debug, Clone)]
pub struct Landed {
    pub partner: String,
    pub share: Name,
    pub path: SharePath,
}

/// One queued change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub id: i64,
    pub partner: String,
    pub share: String,
    pub path: String,
    /// The staged content.
    pub data: PathBuf,
    /// `any`, `absent` or the `blake3:` hash the write started from.
    pub base: String,
    pub fence: Option<u64>,
    /// `ready` (waiting or retrying) or `failed` (refused; kept, see error).
    pub state: String,
    pub error: Option<String>,
    pub queued_ns: i64,
    /// The staging the entry was taken from ([`crate::mount::stage::Staged::lineage`]).
    pub lineage: Option<u64>,
}

impl Entry {
    /// The share and path it changes, checked (the queue's columns are
    /// text).
    fn target(&self) -> Option<(Name, SharePath)> {
        Some((Name::new(&self.share).ok()?, SharePath::parse(&self.path).ok()?))
    }
}

/// The queue's columns in the order [`Writeback::row`] reads them, for
/// every SELECT of entries (a literal, so that `concat!` makes each
/// statement one text to prepare once).
macro_rules! entry_columns {
    () => {
        "id, partner, share, path, data, base, fence, state, error, queued_ns, lineage"
    };
}

/// How far [`Writeback::enqueue`] makes an entry durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// fsynced (SQLite `synchronous=FULL`): survives a power loss.
    Durable,
    /// Written, not synced: survives the death of the process.
    Lazy,
}

/// How a write-back ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The partner has the new version.
    Pushed(Box<Report>),
    /// The partner's version had moved on: the change landed under this name.
    Conflict { copy: SharePath, report: Box<Report> },
    /// The partner is unreachable: the entry stays queued and is retried.
    Queued(String),
    /// Refused for good (no write access, bad path): kept, reported.
    Failed { code: &'static str, message: String },
}

/// Names of the spare staging files (see `Writeback::spare`): made again
/// in batches of `SPARE_BATCH` when fewer than `SPARE_LOW` are left.
/// Staging files done with go back to the pool ([`Writeback::recycle`])
/// while it holds fewer than `SPARE_MAX`.
const SPARE_PREFIX: &str = "spare-";
const SPARE_LOW: usize = 8;
const SPARE_BATCH: usize = 32;
const SPARE_MAX: usize = 64;

/// How soon a push through a pooled session must fail for the failure to
/// be taken for a stale session and retried on a fresh one.
const STALE_SESSION_FAILS_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Writeback {
    node: Arc<Node>,
    dir: PathBuf,
    db: Mutex<Connection>,
    /// Idle sessions per partner, reused by the next push.
    sessions: tokio::sync::Mutex<HashMap<String, Vec<Session>>>,
    /// Entries being pushed now (never twice at once).
    busy: Mutex<std::collections::HashSet<i64>>,
    next_data: std::sync::atomic::AtomicU64,
    /// Empty files made ahead of need for new stagings, by a thread of
    /// their own: creating a file can cost a millisecond on some
    /// filesystems (ext4 without a journal here), and `tar x` into a mount
    /// needs one per file while it waits.
    spare: Arc<Mutex<Vec<PathBuf>>>,
    refilling: Arc<std::sync::atomic::AtomicBool>,
    /// Complete local copies of versions this node pushed, newest last, so
    /// that editing one again needs neither a download nor a full re-cut.
    kept: Mutex<std::collections::VecDeque<Kept>>,
    /// The largest id an earlier run left in the queue.
    inherited_up_to: i64,
    /// Where those entries are announced once they land.
    landed: tokio::sync::broadcast::Sender<Landed>,
}

struct Kept {
    data: PathBuf,
    manifest: Arc<Manifest>,
}

/// Idle push sessions kept per partner: as many as a mount runs pushes
/// behind closes at once ([`crate::mount::vfs::WRITE_BEHIND`]), so that a
/// `tar x` does not open (TLS handshake, HELLO) and close a connection for
/// most of its files.
const IDLE_SESSIONS: usize = crate::mount::vfs::WRITE_BEHIND as usize;

/// At most this many bytes of kept copies (and [`KEPT_FILES`] files).
const KEPT_BYTES: u64 = 4 << 30;
const KEPT_FILES: usize = 16;

/// Conflict-copy names tried for one conflict before giving up (each taken
/// one costs a round trip; more than a few conflicts of one file by one node
/// in one second is already unlikely).
const CONFLICT_NAME_TRIES: u32 = 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn base_text(base: Base) -> String {
    match base {
        Base::Any => "any".into(),
        Base::Absent => "absent".into(),
        Base::Version(h) => h.to_string(),
    }
}

fn parse_base(text: &str) -> Base {
    match text {
        "absent" => Base::Absent,
        "any" => Base::Any,
        h => h.parse().map(Base::Version).unwrap_or(Base::Any),
    }
}

/// `NAME (conflict NODE YYYY-MM-DD HHMMSS).EXT` beside `path`; the `n`th
/// try (from 2 on, when the names before were taken: two conflicts of one
/// file in one second) ends in ` N` before the parenthesis. Pure.
pub fn conflict_name(path: &SharePath, node: &str, at: Timestamp, n: u32) -> Option<SharePath> {
    let name = path.file_name()?;
    let stamp = at.rfc3339();
    // 2026-12-03T10:15:00.123Z -> "2026-12-03 101500"
    let (date, time) = stamp.split_once('T')?;
    let hms: String = time.chars().take(8).filter(|c| *c != ':').collect();
    let (mut stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let nth = if n > 1 { format!(" {n}") } else { String::new() };
    let mut tail = format!(" (conflict {node} {date} {hms}{nth}){ext}");
    if ext.len() >= SharePath::MAX_COMPONENT / 2 || tail.len() >= SharePath::MAX_COMPONENT {
        // An "extension" that is most of the name (or leaves no room
        // beside a long node name): treat it as part of the stem.
        stem = name;
        tail = format!(" (conflict {node} {date} {hms}{nth})");
    }
    // The copy's name must fit NAME_MAX too: a long stem loses its end.
    let mut cut = stem.len().min(SharePath::MAX_COMPONENT.saturating_sub(tail.len()));
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let copy = format!("{}{tail}", &stem[..cut]);
    match path.parent() {
        Some(dir) => dir.join(&copy).ok(),
        None => SharePath::parse(&copy).ok(),
    }
}

/// Remove staging file `path` if it has another name, a queue entry's
/// hard link (a change queued while the partner was unreachable): its
/// content is the entry's, not to be edited or emptied. Whether it did.
fn unlink_if_queued(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let queued = std::fs::metadata(path).is_ok_and(|m| m.nlink() > 1);
    if queued {
        let _ = std::fs::remove_file(path);
    }
    queued
}

/// Run `f` on `db` with `PRAGMA synchronous = OFF` (committed, not
/// synced), and set it back to FULL whatever `f` gave, before anything
/// else commits on this connection.
fn unsynced<T>(db: &rusqlite::Connection, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    db.execute_batch("PRAGMA synchronous = OFF")?;
    let r = f(db);
    let back = db.execute_batch("PRAGMA synchronous = FULL");
    let r = r?;
    back.map(|()| r)
}

/// fsync the file at `path`.
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all())
}

impl Writeback {
    pub fn open(node: Arc<Node>) -> Result<Arc<Writeback>, WritebackError> {
        let dir = node.home.join("writeback");
        std::fs::create_dir_all(&dir).map_err(|source| WritebackError::Io { path: dir.clone(), source })?;
        // Kept copies of an earlier run: nothing records what they hold.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("kept-") || name.starts_with(SPARE_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let path = dir.join("queue.db");
        let wrap = |source| WritebackError::Db { path: path.clone(), source };
        // A committed entry must survive a power loss: FULL, not NORMAL.
        let conn = crate::db::open_wal(&path, "FULL").map_err(wrap)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS queue (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                partner TEXT NOT NULL,
                share TEXT NOT NULL,
                path TEXT NOT NULL,
                data TEXT NOT NULL,
                base TEXT NOT NULL,
                fence INTEGER,
                state TEXT NOT NULL,
                error TEXT,
                queued_ns INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS conflicts (
                partner TEXT NOT NULL,
                share TEXT NOT NULL,
                path TEXT NOT NULL,
                copy TEXT NOT NULL,
                at_ns INTEGER NOT NULL
            );",
        )
        .map_err(wrap)?;
        // Queues made before entries named their staging.
        let has_lineage = conn
            .prepare("SELECT 1 FROM pragma_table_info('queue') WHERE name = 'lineage'")
            .and_then(|mut st| st.exists([]))
            .map_err(wrap)?;
        if !has_lineage {
            conn.execute_batch("ALTER TABLE queue ADD COLUMN lineage INTEGER").map_err(wrap)?;
        }
        // Ids only grow (AUTOINCREMENT): those up to here are an earlier run's.
        let inherited_up_to = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM queue", [], |r| r.get(0)).map_err(wrap)?;
        Ok(Arc::new(Writeback {
            inherited_up_to,
            landed: tokio::sync::broadcast::channel(256).0,
            node,
            dir,
            db: Mutex::new(conn),
            sessions: Default::default(),
            busy: Default::default(),
            next_data: std::sync::atomic::AtomicU64::new(0),
            spare: Default::default(),
            refilling: Default::default(),
            kept: Default::default(),
        }))
    }

    /// Chunking parameters of this node's pushes.
    pub fn chunk_params(&self) -> crate::chunk::ChunkParams {
        self.node.config.storage.chunk
    }

    /// Keep staging file `data`, whose content is `manifest`'s version,
    /// for a later edit of that version ([`Writeback::take_kept`]); the
    /// oldest copies go beyond the bounds.
    pub fn keep(&self, data: &Path, manifest: Arc<Manifest>) {
        if unlink_if_queued(data) {
            return;
        }
        let hex: String = manifest.file_hash.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let kept = self.dir.join(format!("kept-{hex}.data"));
        if std::fs::rename(data, &kept).is_err() {
            self.recycle(data);
            return;
        }
        let mut all = lock(&self.kept);
        all.retain(|k| k.data != kept);
        all.push_back(Kept { data: kept, manifest });
        while all.len() > KEPT_FILES || all.iter().map(|k| k.manifest.size).sum::<u64>() > KEPT_BYTES {
            let Some(old) = all.pop_front() else { break };
            self.recycle(&old.data);
        }
    }

    /// Done with staging file `data`: emptied and put back in the spare
    /// pool rather than deleted, while the pool has room. A `tar x` into a
    /// mount stages one file per file it makes; deleting each and creating
    /// the next costs more than the file's push on ext4 without a journal,
    /// which skips every inode freed in the last minute when it allocates
    /// one (PERFORMANCE.md, "What limits deftfs (write path)").
    pub fn recycle(&self, data: &Path) {
        if unlink_if_queued(data) {
            return;
        }
        let room = lock(&self.spare).len() < SPARE_MAX;
        let spare = self.fresh_path(SPARE_PREFIX);
        let emptied = room && std::fs::OpenOptions::new().write(true).truncate(true).open(data).is_ok();
        if emptied && std::fs::rename(data, &spare).is_ok() {
            lock(&self.spare).push(spare);
        } else {
            let _ = std::fs::remove_file(data);
        }
    }

    /// A kept copy of version `file_hash`, moved to `to` (a staging path).
    pub fn take_kept(&self, file_hash: &crate::hash::Hash, to: &Path) -> Option<Arc<Manifest>> {
        let mut all = lock(&self.kept);
        let i = all.iter().position(|k| k.manifest.file_hash == *file_hash)?;
        let k = all.remove(i)?;
        std::fs::rename(&k.data, to).ok()?;
        Some(k.manifest)
    }

    fn wrap(&self, source: rusqlite::Error) -> WritebackError {
        WritebackError::Db { path: self.dir.join("queue.db"), source }
    }

    /// A path for a new staging file: an empty spare file when one is ready
    /// (see `spare`), else a fresh name (not created). Starts making spares
    /// again when few are left.
    pub fn staging_path(&self) -> PathBuf {
        use std::sync::atomic::Ordering;
        let (spare, left) = {
            let mut spare = lock(&self.spare);
            (spare.pop(), spare.len())
        };
        if left < SPARE_LOW && !self.refilling.swap(true, Ordering::SeqCst) {
            let (pool, refilling) = (self.spare.clone(), self.refilling.clone());
            let names: Vec<PathBuf> = (0..SPARE_BATCH).map(|_| self.fresh_path(SPARE_PREFIX)).collect();
            let made = std::thread::Builder::new().name("spare-files".into()).spawn(move || {
                for name in names {
                    match std::fs::OpenOptions::new().write(true).create_new(true).open(&name) {
                        Ok(_) => lock(&pool).push(name),
                        Err(e) => {
                            tracing::debug!("no spare staging file: {e}");
                            break;
                        }
                    }
                }
                refilling.store(false, Ordering::SeqCst);
            });
            if made.is_err() {
                self.refilling.store(false, Ordering::SeqCst);
            }
        }
        spare.unwrap_or_else(|| self.fresh_path(""))
    }

    /// A name in the write-back folder that nothing uses yet.
    pub fn fresh_path(&self, prefix: &str) -> PathBuf {
        let n = self.next_data.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.dir.join(format!("{prefix}{}-{}-{n}.data", std::process::id(), Timestamp::now().0))
    }

    /// Commit a staged file as a change to push. Returns its id.
    /// [`Commit::Durable`]: the caller fsynced `data`, and the entry is on
    /// disk when this returns (it survives a power loss).
    /// [`Commit::Lazy`]: neither is synced (it survives a `kill -9` of this
    /// process, not a power loss); a push behind a close, made durable if
    /// it has to wait ([`Writeback::flush`]) or at unmount
    /// ([`Writeback::make_durable`]).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue(
        &self,
        partner: &str,
        share: &Name,
        path: &SharePath,
        data: &Path,
        base: Base,
        fence: Option<u64>,
        lineage: u64,
        commit: Commit,
    ) -> Result<i64, WritebackError> {
        let db = lock(&self.db);
        let insert = |db: &rusqlite::Connection| {
            // Statements prepared once per connection, here and below: a `tar
            // x` into a mount queues, looks up and deletes an entry per file.
            db.prepare_cached(
                "INSERT INTO queue (partner, share, path, data, base, fence, state, queued_ns, lineage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'ready', ?7, ?8)",
            )?
            .execute(params![
                    partner,
                    share.as_str(),
                    path.as_str(),
                    data.display().to_string(),
                    base_text(base),
                    fence.map(|f| f as i64),
                    Timestamp::now().0,
                    lineage as i64
                ],
            )
        };
        match commit {
            Commit::Durable => insert(&db),
            Commit::Lazy => unsynced(&db, insert),
        }
        .map_err(|e| self.wrap(e))?;
        let id = db.last_insert_rowid();
        // Reserved for the caller's flush (see there).
        lock(&self.busy).insert(id);
        Ok(id)
    }

    /// Whether an entry for `path` waits in the queue (a later change of it
    /// must go after it, through the queue).
    pub fn pending(&self, partner: &str, share: &Name, path: &SharePath) -> bool {
        let db = lock(&self.db);
        let Ok(mut stmt) = db.prepare_cached("SELECT 1 FROM queue WHERE partner = ?1 AND share = ?2 AND path = ?3 LIMIT 1") else {
            return false;
        };
        stmt.exists(params![partner, share.as_str(), path.as_str()]).unwrap_or(false)
    }

    /// Whether an entry taken from staging `lineage` is still queued
    /// (waiting, or refused and kept).
    pub fn pending_lineage(&self, lineage: u64) -> bool {
        let db = lock(&self.db);
        let Ok(mut stmt) = db.prepare_cached("SELECT 1 FROM queue WHERE lineage = ?1 LIMIT 1") else {
            return false;
        };
        stmt.exists(params![lineage as i64]).unwrap_or(false)
    }

    /// Push `data` now, without a queue entry: for a close, whose caller
    /// waits for the answer, so the change is on the partner (durable
    /// there) once this returns `Pushed` or `Conflict`. On `Queued` or
    /// `Failed` the caller commits it to the queue ([`Writeback::enqueue`],
    /// then [`Writeback::fail`] for `Failed`).
    pub async fn push_direct(&self, partner: &str, share: &Name, path: &SharePath, data: &Path, options: PushOptions) -> Outcome {
        let entry = Entry {
            id: -1,
            partner: partner.to_string(),
            share: share.to_string(),
            path: path.to_string(),
            data: data.to_path_buf(),
            base: base_text(options.base),
            fence: options.fence,
            state: "ready".into(),
            error: None,
            queued_ns: Timestamp::now().0,
            lineage: None,
        };
        let outcome = self.push_entry(&entry, options.manifest, options.mode, options.base_manifest, options.ahead).await;
        if let Outcome::Conflict { .. } = outcome {
            self.finish(&entry, &outcome);
        }
        outcome
    }

    /// Give up the hold [`Writeback::enqueue`] took on entry `id` without
    /// flushing it: the retry loop may push it.
    pub fn unhold(&self, id: i64) {
        lock(&self.busy).remove(&id);
    }

    /// Mark entry `id` refused: kept, not retried.
    pub fn fail(&self, id: i64, code: &'static str, message: &str) {
        if let Some(entry) = self.get(id) {
            self.finish(&entry, &Outcome::Failed { code, message: message.to_string() });
        }
    }

    /// Reserve the changes of `path` from staging `lineage` waiting in the
    /// queue (`ready`), those older than entry `below` if given, once none
    /// of them is being pushed: nothing else pushes them until
    /// [`Writeback::release`] or [`Writeback::supersede`].
    ///
    /// A later change of a file made in a mount holds the earlier ones of
    /// its staging (written on; it goes with base `any` once one of them
    /// was queued): pushed after it, the earlier entry would find its base
    /// gone and come back as a conflict copy of stale content. So a push
    /// that lands supersedes them, and so does an unlink of the file, or a
    /// rename over it, made through the mount. Entries of another staging
    /// (the file closed, its staging retired, opened again) are not held:
    /// the later change does not hold theirs.
    ///
    /// All or nothing: while one of them is busy (the retry loop pushing
    /// it, or another caller holding it), none is taken, so two callers
    /// never wait on each other's half.
    pub async fn hold_pending(&self, partner: &str, share: &Name, path: &SharePath, lineage: u64, below: Option<i64>) -> Vec<Entry> {
        loop {
            let waiting: Vec<Entry> = {
                let db = lock(&self.db);
                let Ok(mut stmt) = db.prepare_cached(
                    concat!(
                        "SELECT ",
                        entry_columns!(),
                        " FROM queue WHERE partner = ?1 AND share = ?2 AND path = ?3 AND lineage = ?4 AND id < ?5 AND state = 'ready' ORDER BY id"
                    ),
                ) else {
                    return Vec::new();
                };
                let rows =
                    stmt.query_map(params![partner, share.as_str(), path.as_str(), lineage as i64, below.unwrap_or(i64::MAX)], Self::row);
                rows.map(|r| r.filter_map(Result::ok).collect()).unwrap_or_default()
            };
            {
                let mut busy = lock(&self.busy);
                if waiting.iter().all(|e| !busy.contains(&e.id)) {
                    for e in &waiting {
                        busy.insert(e.id);
                    }
                    return waiting;
                }
            }
            // Being pushed: that ends within a push's time.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Give back entries [`Writeback::hold_pending`] reserved.
    pub fn release(&self, held: &[Entry]) {
        let mut busy = lock(&self.busy);
        for e in held {
            busy.remove(&e.id);
        }
    }

    /// Delete entries [`Writeback::hold_pending`] reserved: a later change
    /// of the file, or its removal, replaced them on the partner.
    pub fn supersede(&self, held: &[Entry]) {
        for e in held {
            let r = unsynced(&lock(&self.db), |db| db.prepare_cached("DELETE FROM queue WHERE id = ?1")?.execute(params![e.id]));
            match r {
                Ok(_) => {
                    tracing::info!(partner = %e.partner, share = %e.share, path = %e.path, id = e.id, "queued change superseded");
                    let _ = std::fs::remove_file(&e.data);
                }
                Err(err) => tracing::error!(id = e.id, "write-back queue: {err}"),
            }
        }
        self.release(held);
    }

    /// Point a queued entry at a new path (the file was renamed before its
    /// content went back).
    pub fn rename(&self, partner: &str, share: &Name, from: &SharePath, to: &SharePath) -> Result<(), WritebackError> {
        lock(&self.db)
            .execute(
                "UPDATE queue SET path = ?4 WHERE partner = ?1 AND share = ?2 AND path = ?3",
                params![partner, share.as_str(), from.as_str(), to.as_str()],
            )
            .map(|_| ())
            .map_err(|e| self.wrap(e))
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
        Ok(Entry {
            id: r.get(0)?,
            partner: r.get(1)?,
            share: r.get(2)?,
            path: r.get(3)?,
            data: PathBuf::from(r.get::<_, String>(4)?),
            base: r.get(5)?,
            fence: r.get::<_, Option<i64>>(6)?.map(|f| f as u64),
            state: r.get(7)?,
            error: r.get(8)?,
            queued_ns: r.get(9)?,
            lineage: r.get::<_, Option<i64>>(10)?.map(|l| l as u64),
        })
    }

    pub fn get(&self, id: i64) -> Option<Entry> {
        let db = lock(&self.db);
        const GET: &str = concat!("SELECT ", entry_columns!(), " FROM queue WHERE id = ?1");
        let Ok(mut stmt) = db.prepare_cached(GET) else { return None };
        stmt.query_row(params![id], Self::row).optional().ok().flatten()
    }

    /// Every entry, oldest first; `partner` filters.
    pub fn entries(&self, partner: Option<&str>) -> Vec<Entry> {
        let db = lock(&self.db);
        let Ok(mut stmt) = db.prepare(concat!("SELECT ", entry_columns!(), " FROM queue ORDER BY id")) else { return Vec::new() };
        let rows = stmt.query_map([], Self::row).map(|rows| rows.filter_map(Result::ok).collect::<Vec<_>>()).unwrap_or_default();
        rows.into_iter().filter(|e| partner.is_none_or(|p| p == e.partner)).collect()
    }

    /// Conflict copies made: (share, path, copy, at_ns), newest first.
    pub fn conflicts(&self, partner: &str) -> Vec<(String, String, String, i64)> {
        let db = lock(&self.db);
        let Ok(mut stmt) = db.prepare("SELECT share, path, copy, at_ns FROM conflicts WHERE partner = ?1 ORDER BY at_ns DESC LIMIT 100")
        else {
            return Vec::new();
        };
        stmt.query_map(params![partner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    fn finish(&self, entry: &Entry, outcome: &Outcome) {
        let db = lock(&self.db);
        let r = match outcome {
            // Not synced: should a power loss undo the delete, the entry is
            // pushed again and its base check refuses it (a conflict copy
            // at worst); fsyncing here would cost every push behind a close
            // an fsync on this node.
            Outcome::Pushed(_) | Outcome::Conflict { .. } => {
                unsynced(&db, |db| db.prepare_cached("DELETE FROM queue WHERE id = ?1")?.execute(params![entry.id]))
            }
            Outcome::Queued(why) => db.execute("UPDATE queue SET error = ?2 WHERE id = ?1", params![entry.id, why]),
            Outcome::Failed { code, message } => {
                db.execute("UPDATE queue SET state = 'failed', error = ?2 WHERE id = ?1", params![entry.id, format!("{code}: {message}")])
            }
        };
        if let Outcome::Conflict { copy, .. } = outcome {
            let _ = db.execute(
                "INSERT INTO conflicts (partner, share, path, copy, at_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![entry.partner, entry.share, entry.path, copy.as_str(), Timestamp::now().0],
            );
        }
        if let Err(e) = r {
            tracing::error!(id = entry.id, "write-back queue: {e}");
        }
    }

    /// A session with `partner`, from the pool or new; hand it back with
    /// [`Writeback::give_back`]. Fails at once while the partner is known
    /// to be unreachable: the retry loop finds out when it is back
    /// ([`crate::reach`]).
    pub(crate) async fn session(&self, partner: &str) -> Result<Session, TransferError> {
        if let Some(s) = self.sessions.lock().await.get_mut(partner).and_then(Vec::pop) {
            return Ok(s);
        }
        Session::open_as(self.node.clone(), partner, Attempt::Request).await
    }

    pub(crate) async fn give_back(&self, partner: &str, session: Session) {
        let mut sessions = self.sessions.lock().await;
        let idle = sessions.entry(partner.to_string()).or_default();
        if idle.len() < IDLE_SESSIONS {
            idle.push(session);
        } else {
            drop(sessions);
            session.close().await;
        }
    }

    /// One push on a pooled session; a session that turned out dead is
    /// replaced once.
    async fn push(
        &self,
        partner: &str,
        share: &Name,
        path: &SharePath,
        data: &Path,
        options: PushOptions,
    ) -> Result<Report, TransferError> {
        for attempt in 0..2 {
            let mut session = self.session(partner).await?;
            let started = std::time::Instant::now();
            match session.push_with(share, path, data, options.clone(), None).await {
                Ok(report) => {
                    self.give_back(partner, session).await;
                    return Ok(report);
                }
                Err(e @ TransferError::Remote { .. }) => {
                    self.give_back(partner, session).await;
                    return Err(e);
                }
                Err(e) if attempt == 1 => return Err(e),
                // A pooled session whose connection died while idle fails at
                // once: a fresh one may work. One that failed after a long
                // silence (the partner died mid-push: the idle timeout) has
                // said the partner is unreachable, and a fresh connection
                // would only add the connect timeout before an fsync
                // returns with the change queued.
                Err(e) if started.elapsed() > STALE_SESSION_FAILS_WITHIN => return Err(e),
                Err(e) => tracing::debug!(partner, "write-back session failed ({e}); trying a fresh one"),
            }
        }
        Err(TransferError::Other(format!("{partner}: no session could be opened")))
    }

    /// Push entry `id` now. The caller holds the entry: it was returned by
    /// [`Writeback::enqueue`], which reserves it, or reserved in `busy` by
    /// the retry loop. So two pushes of one entry never run at once, and
    /// the retry loop cannot take an entry whose close is waiting for it.
    /// `manifest`: the entry's data's manifest, when the caller knows it.
    /// `mode` and `base_manifest` as in [`PushOptions`].
    /// An entry that stays queued (partner unreachable) is made durable
    /// here first: its data fsynced, the queue's update committed FULL.
    pub async fn flush(
        &self,
        id: i64,
        manifest: Option<Arc<Manifest>>,
        mode: Option<u32>,
        base_manifest: Option<Arc<Manifest>>,
        ahead: Option<Name>,
    ) -> Outcome {
        let Some(entry) = self.get(id) else {
            lock(&self.busy).remove(&id);
            return Outcome::Queued("not in the queue".into());
        };
        // Earlier changes of the file's staging still queued: this one holds them.
        let older = match (entry.target(), entry.lineage) {
            (Some((share, path)), Some(lineage)) => self.hold_pending(&entry.partner, &share, &path, lineage, Some(entry.id)).await,
            _ => Vec::new(),
        };
        let outcome = self.push_entry(&entry, manifest, mode, base_manifest, ahead).await;
        if matches!(outcome, Outcome::Pushed(_)) {
            self.supersede(&older);
        } else {
            self.release(&older);
        }
        if matches!(outcome, Outcome::Queued(_) | Outcome::Failed { .. }) {
            let data = entry.data.clone();
            let synced = tokio::task::spawn_blocking(move || sync_file(&data)).await;
            if let Ok(Err(e)) = synced {
                tracing::warn!(path = %entry.path, "write-back staging not synced: {e}");
            }
        }
        // Finished before it is let go: the retry loop, which may have
        // listed it, then finds it gone (or updated) rather than pushing
        // it a second time.
        self.finish(&entry, &outcome);
        lock(&self.busy).remove(&id);
        if entry.id <= self.inherited_up_to {
            self.announce(&entry, &outcome);
        }
        if matches!(outcome, Outcome::Pushed(_) | Outcome::Conflict { .. }) {
            let _ = std::fs::remove_file(&entry.data);
        }
        outcome
    }

    /// Tell this run's mounts that an earlier run's change landed.
    fn announce(&self, entry: &Entry, outcome: &Outcome) {
        let Some((share, path)) = entry.target() else { return };
        let paths = match outcome {
            Outcome::Pushed(_) => vec![path],
            Outcome::Conflict { copy, .. } => vec![path, copy.clone()],
            Outcome::Queued(_) | Outcome::Failed { .. } => return,
        };
        for path in paths {
            // No mount listening is fine: a later one lists afresh.
            let _ = self.landed.send(Landed { partner: entry.partner.clone(), share: share.clone(), path });
        }
    }

    /// Changes of earlier runs as they land ([`Landed`]).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Landed> {
        self.landed.subscribe()
    }

    async fn push_entry(
        &self,
        entry: &Entry,
        manifest: Option<Arc<Manifest>>,
        mode: Option<u32>,
        base_manifest: Option<Arc<Manifest>>,
        ahead: Option<Name>,
    ) -> Outcome {
        let Some((share, path)) = entry.target() else {
            return Outcome::Failed { code: "BAD_PATH", message: format!("{}:{} is not a valid share path", entry.share, entry.path) };
        };
        let options =
            PushOptions { base: parse_base(&entry.base), fence: entry.fence, manifest: manifest.clone(), mode, base_manifest, ahead };
        match self.push(&entry.partner, &share, &path, &entry.data, options).await {
            Ok(report) => {
                tracing::info!(partner = %entry.partner, %share, %path, bytes_sent = report.bytes_sent, "write-back pushed");
                Outcome::Pushed(Box::new(report))
            }
            Err(TransferError::Remote { code: "CONFLICT", message, .. }) | Err(TransferError::Remote { code: "BUSY", message, .. }) => {
                let node = self.node.config.node.name.to_string();
                let at = Timestamp::now();
                // A copy is pushed as new (BASE absent), so a name taken by an
                // earlier conflict is refused as CONFLICT: take the next one.
                for n in 1..=CONFLICT_NAME_TRIES {
                    let Some(copy) = conflict_name(&path, &node, at, n) else {
                        return Outcome::Failed { code: "CONFLICT", message };
                    };
                    let options =
                        PushOptions { base: Base::Absent, fence: None, manifest: manifest.clone(), mode, base_manifest: None, ahead: None };
                    match self.push(&entry.partner, &share, &copy, &entry.data, options).await {
                        Ok(report) => {
                            tracing::warn!(partner = %entry.partner, %share, %path, %copy, "conflict: {message}; your version was saved as {copy}");
                            return Outcome::Conflict { copy, report: Box::new(report) };
                        }
                        Err(TransferError::Remote { code: "CONFLICT", .. }) if n < CONFLICT_NAME_TRIES => continue,
                        Err(TransferError::Remote { code, message, .. }) => return Outcome::Failed { code, message },
                        Err(e) => return Outcome::Queued(e.to_string()),
                    }
                }
                Outcome::Failed { code: "CONFLICT", message }
            }
            Err(TransferError::Remote { code: "HASH_MISMATCH" | "INTERNAL", message, .. }) => {
                // The partner could not finish this time (its disk, or an
                // older partner whose reused chunks did not add up): retry.
                tracing::warn!(partner = %entry.partner, %share, %path, "write-back to retry: {message}");
                Outcome::Queued(message)
            }
            Err(TransferError::Remote { code, message, .. }) => {
                tracing::error!(partner = %entry.partner, %share, %path, code, "write-back refused: {message}; the change is kept in {}", entry.data.display());
                Outcome::Failed { code, message }
            }
            // Known unreachable already (said when it was found so): no
            // warning per change, nor per retry.
            Err(e @ TransferError::Transport(crate::transport::TransportError::Unreachable { .. })) => {
                tracing::debug!(partner = %entry.partner, %share, %path, "write-back queued: {e}");
                Outcome::Queued(e.to_string())
            }
            Err(e) => {
                tracing::warn!(partner = %entry.partner, %share, %path, "write-back queued, partner unreachable: {e}");
                Outcome::Queued(e.to_string())
            }
        }
    }

    /// Push what earlier runs left in the queue, and keep retrying entries
    /// whose partner is unreachable, until `stop` is set.
    pub fn start(self: &Arc<Self>) -> tokio::task::AbortHandle {
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(ms) = crate::fault::replay_delay_ms() {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
            }
            let mut wait = Duration::from_millis(200);
            loop {
                let ready: Vec<Entry> = me.entries(None).into_iter().filter(|e| e.state == "ready").collect();
                // Partners found unreachable: one attempt each to find out
                // whether they are back (the pushes below do not try).
                let partners: std::collections::BTreeSet<&str> = ready.iter().map(|e| e.partner.as_str()).collect();
                for partner in partners {
                    if me.node.reach.held_off(partner).is_some() {
                        if let Ok(session) = Session::open_as(me.node.clone(), partner, Attempt::Probe).await {
                            me.give_back(partner, session).await;
                        }
                    }
                }
                let mut queued = false;
                for e in ready {
                    if !lock(&me.busy).insert(e.id) {
                        continue;
                    }
                    if let Outcome::Queued(_) = me.flush(e.id, None, None, None, None).await {
                        queued = true;
                    }
                }
                wait = if queued { (wait * 2).min(Duration::from_secs(5)) } else { Duration::from_secs(2) };
                tokio::time::sleep(wait).await;
            }
        })
        .abort_handle()
    }

    /// Make every queued entry durable: its data fsynced, the queue
    /// checkpointed with fsyncs. For entries committed [`Commit::Lazy`]
    /// whose push did not finish before an unmount.
    pub async fn make_durable(self: &Arc<Self>) {
        let me = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            for e in me.entries(None) {
                if let Err(err) = sync_file(&e.data) {
                    tracing::warn!(path = %e.path, "queued staging not synced: {err}");
                }
            }
            lock(&me.db).query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!("write-back queue not checkpointed: {e}");
        }
    }

    pub async fn close(&self) {
        let all: Vec<(String, Vec<Session>)> = self.sessions.lock().await.drain().collect();
        for (_, sessions) in all {
            for s in sessions {
                s.close().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_keep_the_extension_and_the_directory() {
        let at = Timestamp::parse_rfc3339("2026-12-03T10:15:07.5Z").unwrap();
        let p = SharePath::parse("d/scene.blend").unwrap();
        assert_eq!(conflict_name(&p, "bob", at, 1).unwrap().as_str(), "d/scene (conflict bob 2026-12-03 101507).blend");
        let p = SharePath::parse("README").unwrap();
        assert_eq!(conflict_name(&p, "bob", at, 1).unwrap().as_str(), "README (conflict bob 2026-12-03 101507)");
        let p = SharePath::parse(".bashrc").unwrap();
        assert_eq!(conflict_name(&p, "bob", at, 1).unwrap().as_str(), ".bashrc (conflict bob 2026-12-03 101507)");
        let p = SharePath::parse("d/notes.txt").unwrap();
        assert_eq!(conflict_name(&p, "bob", at, 2).unwrap().as_str(), "d/notes (conflict bob 2026-12-03 101507 2).txt");
    }

    #[test]
    fn conflict_names_of_the_longest_names_fit_name_max() {
        let at0 = Timestamp::parse_rfc3339("2026-12-03T10:15:07.5Z").unwrap();
        // A node name of 128 bytes keeps a short extension.
        let node = "n".repeat(128);
        let copy = conflict_name(&SharePath::parse("d/scene.blend").unwrap(), &node, at0, 2).unwrap();
        assert!(copy.as_str().ends_with(").blend") && copy.file_name().unwrap().len() <= 255, "{copy:?}");
        let copy = conflict_name(&SharePath::parse(&format!("{}.blend", "s".repeat(240))).unwrap(), &node, at0, 2).unwrap();
        assert!(copy.file_name().unwrap().len() <= 255, "{copy:?}");
        let at = Timestamp::parse_rfc3339("2026-12-03T10:15:07.5Z").unwrap();
        let name = |p: &SharePath| p.file_name().unwrap().to_string();
        // A 255-byte name (multi-byte characters at the cut) keeps its extension.
        let long = format!("d/{}.blend", "é".repeat(124));
        let copy = name(&conflict_name(&SharePath::parse(&long).unwrap(), "bob", at, 3).unwrap());
        assert!(copy.len() <= 255, "{} bytes", copy.len());
        assert!(copy.starts_with("éé") && copy.ends_with(" (conflict bob 2026-12-03 101507 3).blend"), "{copy}");
        // An extension that is most of the name.
        let ext = format!("a.{}", "x".repeat(253));
        let copy = name(&conflict_name(&SharePath::parse(&ext).unwrap(), "bob", at, 1).unwrap());
        assert!(copy.len() <= 255 && copy.starts_with("a.xxx") && copy.ends_with(" (conflict bob 2026-12-03 101507)"), "{copy}");
    }

    #[test]
    fn unsynced_sets_synchronous_back_to_full_even_when_its_statement_fails() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch("PRAGMA synchronous = FULL; CREATE TABLE t (x INTEGER NOT NULL)").unwrap();
        let mode = |db: &rusqlite::Connection| db.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)).unwrap();
        assert!(unsynced(&db, |db| db.execute("INSERT INTO t VALUES (NULL)", [])).is_err());
        assert_eq!(mode(&db), 2, "synchronous left off after a failed statement");
        assert_eq!(unsynced(&db, |db| db.execute("INSERT INTO t VALUES (1)", [])).unwrap(), 1);
        assert_eq!(mode(&db), 2);
    }

    #[test]
    fn bases_round_trip_through_their_text() {
        let h = crate::hash::Hash::of(b"x");
        for b in [Base::Any, Base::Absent, Base::Version(h)] {
            assert_eq!(parse_base(&base_text(b)), b);
        }
    }
}
