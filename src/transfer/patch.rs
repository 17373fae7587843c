//! Patching a large file in place: a new version that keeps most chunks of
//! the current one at their offsets (an edit in place) is written into the
//! current file, instead of into a full copy renamed over it.
//!
//! Why: replacing a 1 GiB file for a 1 MiB edit reads, writes and fsyncs
//! 1 GiB on the receiving node (no reflinks on ext4). Patching writes and
//! fsyncs the changed ranges only.
//!
//! How, and what it guarantees:
//! - the chunks that change are received, verified, into the push's temp
//!   file beside the target (a sparse file: only those ranges hold data),
//!   exactly as for a replacement; nothing touches the target until every
//!   chunk is in and the temp file is fsynced;
//! - then a journal (`<home>/patches/<id>.json`: the target, its inode, the
//!   ranges, the new size, mode and mtime) is written and fsynced, the
//!   ranges are copied into the target, which is truncated or extended to
//!   the new size and fsynced, and the journal is deleted;
//! - a crash between the journal and its deletion leaves the journal: the
//!   daemon applies it again at its next start, before it serves anything
//!   ([`recover`]), unless the file was removed, replaced or (after a
//!   failed patch) changed since. Applying is idempotent;
//! - a patch that fails while the daemon runs (a disk error) is tried once
//!   more, then left in its journal, marked with the file's state, and the
//!   push fails: the file holds part of its new version until the next
//!   start applies the journal;
//! - the target is patched only if it is still the version the push was
//!   prepared against (same size, mtime, inode and ctime), has one name,
//!   and belongs to the daemon's user (chmod and utimes need it); the
//!   chunks kept are trusted from the index's manifest while the size,
//!   mtime and inode are those it was made for (rsync's quick check): a
//!   replacement checks them as it copies them, a patch does not read them;
//! - unlike a replacement, a program reading the target on this node while
//!   the ranges are copied (milliseconds for a few MiB) can see some new
//!   ranges and some old: the same as when any program writes a file in
//!   place, which is what the writer did on its side. Hard links to the
//!   target see the new content; a descriptor open on it sees it too.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The folder of journals under the node home.
pub fn journal_dir(home: &Path) -> PathBuf {
    home.join("patches")
}

/// What is needed to apply a patch again after a crash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    /// The file patched.
    pub target: PathBuf,
    /// Its inode and device: a journal whose target was replaced since is
    /// dropped.
    pub inode: u64,
    pub dev: u64,
    /// Its size before the patch: after a crash it has this one or `size`.
    pub old_size: u64,
    /// The temp file holding the new bytes of `ranges`, at their offsets.
    pub data: PathBuf,
    /// `(offset, length)` of every range that changes, ascending.
    pub ranges: Vec<(u64, u64)>,
    /// The new version's size.
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: Option<i64>,
    /// Set when applying failed while the daemon ran: the file as it was
    /// then. The patch is applied again only while the file is still so.
    #[serde(default)]
    pub failed: Option<crate::index::Stamp>,
}

/// Bytes copied from the temp file into the target at a time.
const PIECE: usize = 4 << 20;

impl Journal {
    /// Copy the ranges into the target, set its size, mode and mtime, and
    /// fsync it. Idempotent. Returns the target's metadata once durable.
    pub fn apply(&self) -> std::io::Result<std::fs::Metadata> {
        let data = File::open(&self.data)?;
        let target = OpenOptions::new().write(true).open(&self.target)?;
        if target.metadata()?.ino() != self.inode {
            return Err(std::io::Error::other(format!("{} was replaced before it could be patched", self.target.display())));
        }
        let mut buf = vec![0u8; PIECE.min(self.ranges.iter().map(|r| r.1 as usize).max().unwrap_or(0))];
        for &(offset, len) in &self.ranges {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                data.read_exact_at(&mut buf[..n], offset + done)?;
                target.write_all_at(&buf[..n], offset + done)?;
                done += n as u64;
            }
            if crate::fault::crash_in_patch() {
                tracing::error!(target = %self.target.display(), "DEFTFS_FAULT_CRASH_IN_PATCH: aborting in the middle of a patch");
                std::process::abort();
            }
        }
        if target.metadata()?.len() != self.size {
            target.set_len(self.size)?;
        }
        target.set_permissions(std::fs::Permissions::from_mode(self.mode & 0o7777))?;
        if let Some(ns) = self.mtime_ns {
            target.set_modified(crate::time::Timestamp(ns).to_system())?;
        }
        target.sync_all()?;
        target.metadata()
    }

    /// Write the journal durably under `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            if let Some(home) = dir.parent() {
                File::open(home)?.sync_all()?;
            }
        }
        // One journal per target and version (the temp file names both).
        let id = crate::hash::Hash::of(self.data.as_os_str().as_encoded_bytes()).short();
        let path = dir.join(format!("{id}.json"));
        let temp = path.with_extension("json.new");
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = File::create(&temp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&temp, &path)?;
        File::open(dir)?.sync_all()?;
        Ok(path)
    }
}

/// Allocate the blocks `target` needs to grow to `size` (not changing its
/// size), so that a disk too full for a longer version is an error before
/// the patch starts rather than in its middle. Overwritten ranges need no
/// new blocks on the file systems that write in place (ext4, xfs).
pub fn reserve(target: &Path, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new().write(true).open(target)?;
    let len = file.metadata()?.len();
    if size <= len {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own, with plain integer
    // arguments; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, len as libc::off_t, (size - len) as libc::off_t) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // A file system without fallocate: the writes will tell.
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    Ok(())
}

/// Delete a journal once its patch is durable, and the temp file with it.
pub fn done(journal: &Path, data: &Path) -> std::io::Result<()> {
    std::fs::remove_file(journal)?;
    if let Some(dir) = journal.parent() {
        File::open(dir)?.sync_all()?;
    }
    let _ = std::fs::remove_file(data);
    Ok(())
}

/// The journals under `dir`, with their paths. Reads only: a journal
/// being written (`.json.new`) is a running patch's.
fn journals(dir: &Path) -> Vec<(PathBuf, Result<Journal, String>)> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for item in read.flatten() {
        let path = item.path();
        if path.extension().is_some_and(|e| e == "json") {
            let journal =
                std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            out.push((path, journal));
        }
    }
    out
}

/// The temp files journals under `dir` still need: not to be swept.
pub fn pending_data(dir: &Path) -> Vec<PathBuf> {
    journals(dir).into_iter().filter_map(|(_, j)| j.ok()).map(|j| j.data).collect()
}

/// Apply every journal left under `dir` by a crash (or by a patch that
/// failed); returns the targets patched (their index rows are stale) and
/// logs what could not be. A journal whose target is gone, replaced or
/// changed since is dropped; one whose target's folder is missing (a file
/// system not mounted yet) is kept for the next start.
pub fn recover(dir: &Path) -> Vec<PathBuf> {
    // A journal not yet complete at the crash: its patch never started.
    // (Only here, at start: the hourly sweep's reads run beside patches.)
    for item in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if item.path().extension().is_some_and(|e| e == "new") {
            let _ = std::fs::remove_file(item.path());
        }
    }
    let mut patched = Vec::new();
    for (path, journal) in journals(dir) {
        let journal = match journal {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(journal = %path.display(), "unreadable patch journal, left in place: {e}");
                continue;
            }
        };
        let target = journal.target.display();
        let meta = match std::fs::symlink_metadata(&journal.target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && journal.target.parent().is_some_and(|d| d.is_dir()) => {
                tracing::warn!(%target, "a patch interrupted by a crash was not applied again: the file was removed since");
                let _ = done(&path, &journal.data);
                continue;
            }
            Err(e) => {
                tracing::error!(%target, journal = %path.display(), "a patch interrupted by a crash waits: {e}; it is applied at a later start once the file is there");
                continue;
            }
        };
        let same_file =
            meta.ino() == journal.inode && meta.dev() == journal.dev && (meta.len() == journal.old_size || meta.len() == journal.size);
        let unchanged = journal.failed.is_none_or(|then| crate::index::Stamp::of(&meta) == then);
        if !same_file || !unchanged {
            tracing::warn!(%target, "a patch interrupted by a crash or an error was not applied again: the file was replaced or changed since");
            let _ = done(&path, &journal.data);
            continue;
        }
        match journal.apply() {
            Ok(_) => {
                tracing::info!(%target, ranges = journal.ranges.len(), "applied again a patch interrupted by a crash");
                let _ = done(&path, &journal.data);
                patched.push(journal.target);
            }
            Err(e) => tracing::error!(
                %target,
                journal = %path.display(),
                "a patch interrupted by a crash could not be applied again: {e}; the file may hold part of its new version until it is"
            ),
        }
    }
    patched
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_bytes, TestDir};

    fn setup(dir: &TestDir) -> (Journal, Vec<u8>) {
        let target = dir.path().join("f");
        let old = random_bytes(100_000, 1);
        std::fs::write(&target, &old).unwrap();
        let mut new = old.clone();
        new[10_000..12_000].fill(7);
        new.extend_from_slice(&[8; 500]);
        let data = dir.path().join("f.data");
        let f = File::create(&data).unwrap();
        f.set_len(new.len() as u64).unwrap();
        f.write_all_at(&new[10_000..12_000], 10_000).unwrap();
        f.write_all_at(&new[100_000..], 100_000).unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        let journal = Journal {
            target,
            inode: meta.ino(),
            dev: meta.dev(),
            old_size: meta.len(),
            failed: None,
            data,
            ranges: vec![(10_000, 2_000), (100_000, 500)],
            size: new.len() as u64,
            mode: 0o640,
            mtime_ns: Some(1_600_000_000_000_000_000),
        };
        (journal, new)
    }

    /// Where the tests keep journals, and how many are there.
    fn journals_in(dir: &TestDir) -> PathBuf {
        dir.path().join("patches")
    }

    fn count(journals: &Path) -> usize {
        std::fs::read_dir(journals).unwrap().count()
    }

    #[test]
    fn applying_a_journal_twice_gives_the_new_version() {
        let dir = TestDir::new("patch-apply");
        let (journal, new) = setup(&dir);
        journal.apply().unwrap();
        journal.apply().unwrap();
        assert_eq!(std::fs::read(&journal.target).unwrap(), new);
        let meta = std::fs::metadata(&journal.target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(crate::share::mtime_ns(&meta), 1_600_000_000_000_000_000);
    }

    #[test]
    fn a_journal_left_by_a_crash_is_applied_at_recovery_and_then_gone() {
        let dir = TestDir::new("patch-recover");
        let (journal, new) = setup(&dir);
        let journals = journals_in(&dir);
        journal.write(&journals).unwrap();
        // The crash came after the first range only.
        let t = OpenOptions::new().write(true).open(&journal.target).unwrap();
        t.write_all_at(&new[10_000..11_000], 10_000).unwrap();
        std::fs::write(journals.join("x.json.new"), b"{").unwrap();
        assert_eq!(recover(&journals), vec![journal.target.clone()]);
        assert_eq!(std::fs::read(&journal.target).unwrap(), new);
        assert_eq!(count(&journals), 0, "journals left");
        assert!(!journal.data.exists(), "the temp file goes with its journal");
    }

    #[test]
    fn a_journal_whose_file_was_replaced_since_is_dropped_unapplied() {
        let dir = TestDir::new("patch-replaced");
        let (journal, _) = setup(&dir);
        let journals = journals_in(&dir);
        journal.write(&journals).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"someone else's file").unwrap();
        std::fs::rename(&other, &journal.target).unwrap();
        assert!(recover(&journals).is_empty());
        assert_eq!(std::fs::read(&journal.target).unwrap(), b"someone else's file");
        assert_eq!(count(&journals), 0);
    }

    #[test]
    fn an_unreadable_journal_is_left_for_a_human_and_does_not_stop_recovery() {
        let dir = TestDir::new("patch-garbage");
        let journals = journals_in(&dir);
        std::fs::create_dir_all(&journals).unwrap();
        std::fs::write(journals.join("bad.json"), b"\xff not json").unwrap();
        assert!(recover(&journals).is_empty());
        assert!(journals.join("bad.json").exists());
    }

    #[test]
    fn a_failed_patch_is_applied_again_only_while_its_file_is_as_the_failure_left_it() {
        let dir = TestDir::new("patch-failed");
        let (mut journal, new) = setup(&dir);
        let journals = journals_in(&dir);
        journal.failed = Some(crate::index::Stamp::of(&std::fs::metadata(&journal.target).unwrap()));
        journal.write(&journals).unwrap();
        assert_eq!(recover(&journals).len(), 1);
        assert_eq!(std::fs::read(&journal.target).unwrap(), new);

        // Changed since the failure (a later edit, same inode): not touched.
        let (mut journal, _) = setup(&dir);
        journal.failed = Some(crate::index::Stamp::of(&std::fs::metadata(&journal.target).unwrap()));
        journal.write(&journals).unwrap();
        let f = OpenOptions::new().write(true).open(&journal.target).unwrap();
        f.write_all_at(b"a later edit", 0).unwrap();
        f.set_len(99_000).unwrap();
        let later = std::fs::read(&journal.target).unwrap();
        assert!(recover(&journals).is_empty());
        assert_eq!(std::fs::read(&journal.target).unwrap(), later, "the later edit was overwritten");
        assert_eq!(count(&journals), 0);
    }

    #[test]
    fn a_journal_whose_folder_is_missing_waits_for_it() {
        let dir = TestDir::new("patch-unmounted");
        let (mut journal, _) = setup(&dir);
        let journals = journals_in(&dir);
        journal.target = dir.path().join("not mounted yet/f");
        journal.write(&journals).unwrap();
        assert!(recover(&journals).is_empty());
        assert_eq!(count(&journals), 1, "kept for a later start");
        assert_eq!(pending_data(&journals), vec![journal.data.clone()], "its temp file is not swept");
    }
}
