//! Change notification for watched shares (the serving side of WATCH).
//!
//! One poller per share, shared by every session that watches it: every
//! `storage.watch_interval_ms` it takes a snapshot of the share's tree
//! (path → kind, size, mtime, mode) and broadcasts the paths that differ
//! from the previous snapshot. The poller stops when its last watcher goes.
//!
//! Polling rather than inotify: it sees changes made by any process on any
//! filesystem (NFS, FUSE, bind mounts), costs one `stat` per entry per
//! interval, and bounds how late a change is seen by the interval.

use crate::config::ShareConfig;
use crate::node::Node;
use crate::proto::{Entry, EntryKind, Name, SharePath};
use crate::share::{Share, ShareKind};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// Entries scanned per share at most; past it, deeper changes are not seen
/// and a warning says so.
const MAX_ENTRIES: usize = 200_000;
/// Past this many changed paths in one scan, one "everything changed"
/// (the share root) is sent instead.
const MAX_PATHS: usize = 256;

/// A changed path, and the partner whose request changed it (None: seen
/// by the poller). A watch does not echo a partner's own changes back.
pub type Change = (SharePath, Option<Name>);

type Snapshot = BTreeMap<SharePath, (EntryKind, u64, i64, u32)>;

#[derive(Default)]
pub struct Watchers {
    shares: Mutex<HashMap<Name, broadcast::Sender<Change>>>,
    /// Files this node wrote for a partner and already announced, with the
    /// size and mtime it left them at: the poller does not announce them
    /// again when it finds them so (a `tar x` of 10,000 files through a
    /// mount would otherwise come back as 10,000 more CHANGED).
    announced: Mutex<HashMap<(Name, SharePath), (u64, i64)>>,
}

/// Past this many announced files not seen by a scan yet, the record is
/// dropped (the poller then announces them once more: harmless).
const MAX_ANNOUNCED: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watchers {
    /// Changed paths of `share`, starting with the next scan.
    pub fn subscribe(&self, node: &Arc<Node>, share: &ShareConfig, interval: Duration) -> broadcast::Receiver<Change> {
        let mut shares = lock(&self.shares);
        if let Some(tx) = shares.get(&share.name) {
            if tx.receiver_count() > 0 {
                return tx.subscribe();
            }
        }
        let (tx, rx) = broadcast::channel(1024);
        shares.insert(share.name.clone(), tx.clone());
        tokio::spawn(poll(node.clone(), Share::new(share), tx, interval));
        rx
    }
}

impl Watchers {
    /// Tell the share's watchers now that `path` changed (a change this
    /// node made for a partner: a push, rename, unlink or lease), rather
    /// than at the next scan.
    pub fn notify(&self, share: &Name, path: &SharePath, origin: Option<&Name>) {
        if let Some(tx) = lock(&self.shares).get(share) {
            let _ = tx.send((path.clone(), origin.cloned()));
        }
    }

    /// [`Watchers::notify`] for a file this node just wrote, which it left
    /// at `size` and `mtime_ns`.
    pub fn notify_file(&self, share: &Name, path: &SharePath, origin: Option<&Name>, size: u64, mtime_ns: i64) {
        if lock(&self.shares).contains_key(share) {
            let mut announced = lock(&self.announced);
            if announced.len() >= MAX_ANNOUNCED {
                announced.clear();
            }
            announced.insert((share.clone(), path.clone()), (size, mtime_ns));
        }
        self.notify(share, path, origin);
    }

    /// Whether the poller's change of `path`, found at `row`, is one
    /// already announced (and forget it either way: it has been seen).
    fn already_announced(&self, share: &Name, path: &SharePath, row: Option<&(EntryKind, u64, i64, u32)>) -> bool {
        let Some(stamp) = lock(&self.announced).remove(&(share.clone(), path.clone())) else { return false };
        row.is_some_and(|r| r.0 == EntryKind::File && (r.1, r.2) == stamp)
    }
}

async fn poll(node: Arc<Node>, share: Share, tx: broadcast::Sender<Change>, interval: Duration) {
    let s = share.clone();
    let mut before = tokio::task::spawn_blocking(move || snapshot(&s)).await.unwrap_or_default();
    loop {
        tokio::time::sleep(interval).await;
        if tx.receiver_count() == 0 {
            return;
        }
        let s = share.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || snapshot(&s)).await else { return };
        let mut changed = diff(&before, &now);
        changed.retain(|p| !node.watchers.already_announced(&share.name, p, now.get(p)));
        // Index changed files before telling watchers, so the DESCRIBE
        // they send next finds the manifest ready.
        let files: Vec<SharePath> = changed.iter().filter(|p| now.get(*p).is_some_and(|r| r.0 == EntryKind::File)).cloned().collect();
        if !files.is_empty() {
            let (node, s) = (node.clone(), share.clone());
            let _ = tokio::task::spawn_blocking(move || warm(&node, &s, &files, &Default::default())).await;
        }
        before = now;
        if changed.len() > MAX_PATHS {
            let _ = tx.send((SharePath::root(), None));
        } else {
            for p in changed {
                let _ = tx.send((p, None));
            }
        }
    }
}

/// Index files of a share ahead of DESCRIBE (chunked, hashed, cached in
/// SQLite), so a mount's first read of a large file does not wait for the
/// whole file to be hashed. Blocking; stops early when `stop` is set.
pub fn warm(node: &Node, share: &Share, paths: &[SharePath], stop: &std::sync::atomic::AtomicBool) {
    for p in paths {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(real) = share.resolve_file(p) else { continue };
        if let Err(e) = crate::index::manifest_for(&node.db, &real, &node.config.storage.chunk) {
            tracing::debug!(share = %share.name, path = %p, "indexing ahead failed: {e}");
        }
    }
}

/// Every file of a share now (bounded like a watch scan).
pub fn files(share: &Share) -> Vec<SharePath> {
    snapshot(share).into_iter().filter(|(_, r)| r.0 == EntryKind::File).map(|(p, _)| p).collect()
}

fn row(e: &Entry) -> (EntryKind, u64, i64, u32) {
    (e.kind, e.size, e.mtime_ns, e.mode)
}

/// The share's tree as it is now. Unreadable directories are skipped.
fn snapshot(share: &Share) -> Snapshot {
    let mut out = Snapshot::new();
    if let ShareKind::File(_) = share.kind {
        if let Ok(e) = share.stat(&SharePath::root()) {
            out.insert(SharePath::root(), row(&e));
        }
        return out;
    }
    let mut todo = vec![SharePath::root()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = share.list(&dir) else { continue };
        for e in entries {
            if out.len() >= MAX_ENTRIES {
                tracing::warn!(share = %share.name, "more than {MAX_ENTRIES} entries: changes past them are not watched");
                return out;
            }
            if e.kind == EntryKind::Dir {
                todo.push(e.path.clone());
            }
            out.insert(e.path.clone(), row(&e));
        }
    }
    out
}

/// Paths added, removed or changed between two snapshots.
fn diff(before: &Snapshot, now: &Snapshot) -> Vec<SharePath> {
    let mut out = Vec::new();
    for (p, r) in now {
        if before.get(p) != Some(r) {
            out.push(p.clone());
        }
    }
    for p in before.keys() {
        if !now.contains_key(p) {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SharePath {
        SharePath::parse(s).unwrap()
    }

    #[test]
    fn diff_names_added_removed_and_changed_paths() {
        let before: Snapshot = [(p("a"), (EntryKind::File, 1, 1, 0o644)), (p("b"), (EntryKind::File, 1, 1, 0o644))].into();
        let now: Snapshot = [(p("a"), (EntryKind::File, 2, 1, 0o644)), (p("c"), (EntryKind::File, 1, 1, 0o644))].into();
        let mut d = diff(&before, &now);
        d.sort();
        assert_eq!(d, vec![p("a"), p("b"), p("c")]);
        assert!(diff(&now, &now).is_empty());
    }
}
