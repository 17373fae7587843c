//! Group commit of directory fsyncs.
//!
//! A file made durable under its final name needs its directory fsynced
//! after the rename ([`crate::transfer::assemble`]). When several pushes
//! land in one directory at once (a `tar x` into a mount pushes up to
//! eight files at a time, mostly into the same directory), one fsync of
//! the directory makes all their renames durable: [`DirSync::sync`] waits
//! for an fsync of the directory that *started after* the caller's rename,
//! and runs one itself when none is running. Guarantee: when `sync`
//! returns `Ok`, an fsync of the directory begun after the call returned
//! `Ok`. A failed fsync is not shared: each caller it would have covered
//! tries again itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The fsyncs of one key (a directory).
#[derive(Default)]
struct Line {
    state: Mutex<Tickets>,
    done_now: Condvar,
}

#[derive(Default)]
struct Tickets {
    /// Tickets handed out: the callers that asked so far.
    asked: u64,
    /// Every ticket up to this one is covered by a completed fsync.
    covered: u64,
    /// An fsync is running.
    running: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shares fsyncs of a key between the callers that ask at once.
pub struct Group<K> {
    lines: Mutex<HashMap<K, Arc<Line>>>,
}

impl<K> Default for Group<K> {
    fn default() -> Self {
        Group { lines: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone> Group<K> {
    /// Return once a run of `fsync` on `key` that began after this call
    /// has succeeded; run it here if none is running. Blocking.
    pub fn sync(&self, key: &K, fsync: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
        let line = lock(&self.lines).entry(key.clone()).or_default().clone();
        let result = Self::sync_on(&line, fsync);
        let mut lines = lock(&self.lines);
        // The map's and ours: nobody else waits on this line.
        if Arc::strong_count(&line) == 2 {
            lines.remove(key);
        }
        result
    }

    fn sync_on(line: &Line, fsync: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
        let mut t = lock(&line.state);
        t.asked += 1;
        let ticket = t.asked;
        loop {
            if t.covered >= ticket {
                return Ok(());
            }
            if !t.running {
                // Everyone who asked so far had finished what it needs made
                // durable before it asked: this fsync covers them all.
                let upto = t.asked;
                t.running = true;
                drop(t);
                let result = fsync();
                t = lock(&line.state);
                t.running = false;
                if result.is_ok() {
                    t.covered = t.covered.max(upto);
                }
                line.done_now.notify_all();
                return result;
            }
            t = line.done_now.wait(t).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// [`Group`] of directories, fsynced by path.
pub type DirSync = Group<PathBuf>;

impl DirSync {
    /// fsync directory `dir` (see [`Group::sync`]).
    pub fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.sync(&dir.to_path_buf(), || std::fs::File::open(dir).and_then(|d| d.sync_all()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn callers_at_once_share_fsyncs_and_each_waits_for_one_begun_after_it_asked() {
        let group = Arc::new(Group::<u32>::default());
        let runs = Arc::new(AtomicU32::new(0));
        // Each fsync records the highest "write" it covers: a caller
        // writes (bumps `written`) before it asks, and checks afterwards
        // that a completed fsync began after its write.
        let written = Arc::new(AtomicU32::new(0));
        let durable = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (group, runs, written, durable) = (group.clone(), runs.clone(), written.clone(), durable.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        group
                            .sync(&7, || {
                                runs.fetch_add(1, Ordering::SeqCst);
                                let seen = written.load(Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(1));
                                durable.fetch_max(seen, Ordering::SeqCst);
                                Ok(())
                            })
                            .unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= mine, "returned before an fsync covered write {mine}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let runs = runs.load(Ordering::SeqCst);
        assert!(runs < 320, "{runs} fsyncs for 320 callers: none shared");
        assert!(lock(&group.lines).is_empty(), "idle lines are dropped");
    }

    #[test]
    fn a_failed_fsync_is_not_taken_for_a_success_by_those_it_would_have_covered() {
        // Call 1 succeeds slowly; two callers ask meanwhile, and the one
        // that runs the next fsync (call 2, covering both) fails: the other
        // must run its own (call 3) rather than return Ok.
        let group = Arc::new(Group::<u32>::default());
        let calls = Arc::new(AtomicU32::new(0));
        let fsync = |calls: Arc<AtomicU32>| {
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                std::thread::sleep(Duration::from_millis(100));
                if n == 2 {
                    Err(std::io::Error::other("disk gone"))
                } else {
                    Ok(())
                }
            }
        };
        let (g, f) = (group.clone(), fsync(calls.clone()));
        let first = std::thread::spawn(move || g.sync(&1, f));
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (g, f) = (group.clone(), fsync(calls.clone()));
                std::thread::spawn(move || g.sync(&1, f))
            })
            .collect();
        assert!(first.join().unwrap().is_ok());
        let oks = others.into_iter().map(|t| t.join().unwrap()).filter(Result::is_ok).count();
        assert_eq!(oks, 1, "the one whose fsync failed says so, the other synced on its own");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_directory_is_synced() {
        let dir = crate::testutil::TestDir::new("dirsync");
        DirSync::default().sync_dir(dir.path()).unwrap();
        assert!(DirSync::default().sync_dir(&dir.path().join("missing")).is_err());
    }
}
