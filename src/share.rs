//! Shares on disk: mapping a share name and an in-share path to a real file,
//! listing, and the access each partner has.
//!
//! A share's path is a file, a directory, or a glob whose wildcards are in
//! the last component (`/data/orders/*.xml`). Guarantees:
//! - an in-share path is a validated [`SharePath`] (no `..`, no absolute
//!   path), and the real path it resolves to, symlinks followed, stays
//!   inside the share's root: anything else is refused as outside the share;
//! - in a glob share only names matching the pattern exist;
//! - the temp files of transfers in progress are never listed or served.

use crate::config::ShareConfig;
use crate::glob::Glob;
use crate::proto::{Access, Entry, EntryKind, Name, SharePath};
use crate::time::Timestamp;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Suffix of transfer temp files (`.NAME.deftpart-<hash>`), never exposed.
pub const TEMP_MARKER: &str = ".deftpart-";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("no share named {0} is granted to you")]
    Unknown(String),
    #[error("{0} is not granted {1} access to share {2}")]
    Denied(String, &'static str, String),
    #[error("{0}: no such file or directory in the share")]
    NotFound(String),
    #[error("{0}: resolves outside the share")]
    Outside(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: not a directory")]
    NotADir(String),
    #[error("{0}: does not match the share's pattern {1}")]
    NoMatch(String, String),
    #[error("share {0} is a single file: give no path inside it")]
    FileShare(String),
    #[error("{0}: already exists")]
    Exists(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    #[error("{0}: is a directory")]
    IsDir(String),
    #[error("{0}: the share's root cannot be removed or renamed")]
    Root(String),
    #[error("share {share}: {path}: {source}")]
    Io { share: String, path: String, source: std::io::Error },
}

/// What a share's path names.
#[derive(Debug, Clone)]
pub enum ShareKind {
    File(PathBuf),
    Dir(PathBuf),
    Glob { dir: PathBuf, pattern: Glob },
}

/// A share as this node serves it.
#[derive(Debug, Clone)]
pub struct Share {
    pub name: Name,
    pub kind: ShareKind,
}

impl Share {
    pub fn new(config: &ShareConfig) -> Share {
        let path = &config.path;
        let last = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let kind = if Glob::is_pattern(last) {
            match (path.parent(), Glob::new(last)) {
                (Some(dir), Ok(pattern)) => ShareKind::Glob { dir: dir.to_path_buf(), pattern },
                _ => ShareKind::File(path.clone()),
            }
        } else if path.is_dir() {
            ShareKind::Dir(path.clone())
        } else {
            ShareKind::File(path.clone())
        };
        Share { name: config.name.clone(), kind }
    }

    fn io(&self, path: &SharePath, source: std::io::Error) -> ShareError {
        use std::io::ErrorKind;
        match source.kind() {
            ErrorKind::NotFound => ShareError::NotFound(path.to_string()),
            ErrorKind::AlreadyExists => ShareError::Exists(path.to_string()),
            ErrorKind::DirectoryNotEmpty => ShareError::NotEmpty(path.to_string()),
            ErrorKind::IsADirectory => ShareError::IsDir(path.to_string()),
            ErrorKind::NotADirectory => ShareError::NotADir(path.to_string()),
            _ => ShareError::Io { share: self.name.to_string(), path: path.to_string(), source },
        }
    }

    /// The real path of an entry to create, remove or rename: never the
    /// root, never a temp file, its parent an existing directory inside the
    /// share (symlinks followed), the entry itself not followed.
    fn entry_path(&self, path: &SharePath) -> Result<PathBuf, ShareError> {
        if path.is_root() {
            return Err(ShareError::Root(self.name.to_string()));
        }
        if let ShareKind::File(_) = self.kind {
            return Err(ShareError::FileShare(self.name.to_string()));
        }
        let physical = self.physical(path)?;
        let name = physical.file_name().ok_or_else(|| ShareError::Outside(path.to_string()))?.to_os_string();
        let parent = physical.parent().ok_or_else(|| ShareError::Outside(path.to_string()))?;
        let parent_path = path.parent().unwrap_or_else(SharePath::root);
        let parent = self.contain(&parent_path, parent)?;
        if !parent.is_dir() {
            return Err(ShareError::NotADir(parent_path.to_string()));
        }
        Ok(parent.join(name))
    }

    /// `mkdir` inside the share.
    pub fn mkdir(&self, path: &SharePath, mode: u32) -> Result<Entry, ShareError> {
        use std::os::unix::fs::DirBuilderExt;
        let real = self.entry_path(path)?;
        std::fs::DirBuilder::new().mode(mode & 0o7777).create(&real).map_err(|e| self.io(path, e))?;
        let meta = std::fs::metadata(&real).map_err(|e| self.io(path, e))?;
        Ok(entry(path.clone(), &meta))
    }

    /// Unlink a file (`kind` File) or remove an empty directory (Dir).
    pub fn remove(&self, path: &SharePath, kind: EntryKind) -> Result<(), ShareError> {
        let real = self.entry_path(path)?;
        let meta = std::fs::symlink_metadata(&real).map_err(|e| self.io(path, e))?;
        match kind {
            EntryKind::File if meta.is_dir() => Err(ShareError::IsDir(path.to_string())),
            EntryKind::File => std::fs::remove_file(&real).map_err(|e| self.io(path, e)),
            EntryKind::Dir if !meta.is_dir() => Err(ShareError::NotADir(path.to_string())),
            EntryKind::Dir => std::fs::remove_dir(&real).map_err(|e| self.io(path, e)),
        }?;
        sync_parent(&real);
        Ok(())
    }

    /// Rename within the share. Without `replace`, an existing `to` is
    /// refused atomically (renameat2 RENAME_NOREPLACE).
    pub fn rename(&self, from: &SharePath, to: &SharePath, replace: bool) -> Result<(), ShareError> {
        let src = self.entry_path(from)?;
        let dst = self.entry_path(to)?;
        std::fs::symlink_metadata(&src).map_err(|e| self.io(from, e))?;
        if replace {
            std::fs::rename(&src, &dst).map_err(|e| self.io(to, e))?;
        } else {
            rename_noreplace(&src, &dst).map_err(|e| self.io(to, e))?;
        }
        sync_parent(&dst);
        if src.parent() != dst.parent() {
            sync_parent(&src);
        }
        Ok(())
    }

    /// chmod and/or set the modification time of an entry.
    pub fn set_attr(&self, path: &SharePath, mode: Option<u32>, mtime_ns: Option<i64>) -> Result<Entry, ShareError> {
        use std::os::unix::fs::PermissionsExt;
        let real = self.contain(path, &self.physical(path)?)?;
        if let Some(mode) = mode {
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| self.io(path, e))?;
        }
        if let Some(ns) = mtime_ns {
            let file = std::fs::File::open(&real).map_err(|e| self.io(path, e))?;
            file.set_modified(crate::time::Timestamp(ns).to_system()).map_err(|e| self.io(path, e))?;
        }
        self.stat(path)
    }

    /// Delete the partial files of pushes (kept so an interrupted push can
    /// resume) last written before `before`, except those `in_use` says a
    /// transfer holds. Symlinks are not followed. Returns what was deleted
    /// and the bytes it held on disk.
    pub fn sweep_partials(&self, before: std::time::SystemTime, in_use: impl Fn(&Path) -> bool) -> (Vec<PathBuf>, u64) {
        use std::os::unix::fs::MetadataExt;
        let (mut gone, mut bytes) = (Vec::new(), 0u64);
        let mut dirs = vec![self.root().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(read) = std::fs::read_dir(&dir) else { continue };
            for item in read.flatten() {
                let Ok(meta) = item.metadata() else { continue };
                let path = item.path();
                if meta.is_dir() {
                    // Only a directory share's tree is the share's: a file
                    // or glob share lives in a directory that holds more.
                    if matches!(self.kind, ShareKind::Dir(_)) {
                        dirs.push(path);
                    }
                    continue;
                }
                let partial = meta.is_file() && item.file_name().to_str().is_some_and(|n| n.contains(TEMP_MARKER));
                let stale = meta.modified().is_ok_and(|m| m < before);
                if partial && stale && !in_use(&path) && std::fs::remove_file(&path).is_ok() {
                    bytes += meta.blocks() * 512;
                    gone.push(path);
                }
            }
        }
        (gone, bytes)
    }

    /// The directory that contains everything of the share.
    fn root(&self) -> &Path {
        match &self.kind {
            ShareKind::File(f) => f.parent().unwrap_or(Path::new("/")),
            ShareKind::Dir(d) => d,
            ShareKind::Glob { dir, .. } => dir,
        }
    }

    /// The real path of an in-share path, without requiring it to exist.
    fn physical(&self, path: &SharePath) -> Result<PathBuf, ShareError> {
        if path.components().any(|c| c.contains(TEMP_MARKER)) {
            return Err(ShareError::NotFound(path.to_string()));
        }
        match &self.kind {
            ShareKind::File(f) if path.is_root() => Ok(f.clone()),
            ShareKind::File(_) => Err(ShareError::FileShare(self.name.to_string())),
            ShareKind::Dir(d) => Ok(path.components().fold(d.clone(), |p, c| p.join(c))),
            ShareKind::Glob { dir, .. } if path.is_root() => Ok(dir.clone()),
            ShareKind::Glob { dir, pattern } => {
                let mut parts = path.components();
                let (Some(name), None) = (parts.next(), parts.next()) else {
                    return Err(ShareError::NoMatch(path.to_string(), pattern.as_str().to_string()));
                };
                if !pattern.matches(name) {
                    return Err(ShareError::NoMatch(path.to_string(), pattern.as_str().to_string()));
                }
                Ok(dir.join(name))
            }
        }
    }

    /// Refuse a real path that symlinks lead outside the share's root.
    fn contain(&self, path: &SharePath, real: &Path) -> Result<PathBuf, ShareError> {
        let root = self.root().canonicalize().map_err(|e| self.io(&SharePath::root(), e))?;
        let canon = real.canonicalize().map_err(|e| self.io(path, e))?;
        if canon.starts_with(&root) {
            Ok(canon)
        } else {
            Err(ShareError::Outside(path.to_string()))
        }
    }

    /// An existing regular file to read.
    pub fn resolve_file(&self, path: &SharePath) -> Result<PathBuf, ShareError> {
        let real = self.contain(path, &self.physical(path)?)?;
        let meta = std::fs::metadata(&real).map_err(|e| self.io(path, e))?;
        if !meta.is_file() {
            return Err(ShareError::NotAFile(path.to_string()));
        }
        Ok(real)
    }

    /// The path in the file system that `path` names, as written (no
    /// symlink followed, nothing checked or created): to match paths this
    /// node keeps for its own work, never to open.
    pub fn spelled(&self, path: &SharePath) -> Result<PathBuf, ShareError> {
        self.physical(path)
    }

    /// Where a pushed file lands: its parent directories are created inside
    /// the share (each checked to stay inside); the file itself may be
    /// missing, and must be a regular file if present.
    pub fn resolve_target(&self, path: &SharePath) -> Result<PathBuf, ShareError> {
        let target = self.physical(path)?;
        // Whether a directory on the way is a symlink: else the parent is
        // the root or a real directory under it, inside by construction.
        let mut via_link = false;
        if let ShareKind::Dir(_) = self.kind {
            if path.is_root() {
                return Err(ShareError::NotAFile(path.to_string()));
            }
            let mut dir = self.root().to_path_buf();
            let mut so_far = SharePath::root();
            let parent_components: Vec<&str> = path.components().collect();
            for c in &parent_components[..parent_components.len().saturating_sub(1)] {
                dir.push(c);
                so_far = so_far.join(c).map_err(|_| ShareError::NotFound(path.to_string()))?;
                match std::fs::symlink_metadata(&dir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) if m.file_type().is_symlink() => {
                        self.contain(&so_far, &dir)?;
                        via_link = true;
                    }
                    Ok(_) => return Err(ShareError::NotADir(so_far.to_string())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir(&dir).map_err(|e| self.io(&so_far, e))?;
                    }
                    Err(e) => return Err(self.io(&so_far, e)),
                }
            }
        }
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let real = self.contain(path, &target)?;
                if !real.is_file() {
                    return Err(ShareError::NotAFile(path.to_string()));
                }
                Ok(real)
            }
            Ok(m) if !m.is_file() => Err(ShareError::NotAFile(path.to_string())),
            Ok(_) => Ok(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = target.parent().ok_or_else(|| ShareError::Outside(path.to_string()))?;
                let top = path.parent().is_none_or(|p| p.is_root());
                if via_link || !matches!(self.kind, ShareKind::Dir(_)) || (top && !self.root().is_dir()) {
                    self.contain(path, parent)?;
                }
                Ok(target)
            }
            Err(e) => Err(self.io(path, e)),
        }
    }

    /// Metadata of one entry.
    pub fn stat(&self, path: &SharePath) -> Result<Entry, ShareError> {
        let real = self.contain(path, &self.physical(path)?)?;
        let meta = std::fs::metadata(&real).map_err(|e| self.io(path, e))?;
        Ok(entry(path.clone(), &meta))
    }

    /// The entries of a directory of the share, sorted by name.
    pub fn list(&self, path: &SharePath) -> Result<Vec<Entry>, ShareError> {
        if let ShareKind::File(f) = &self.kind {
            if !path.is_root() {
                return Err(ShareError::FileShare(self.name.to_string()));
            }
            let meta = std::fs::metadata(f).map_err(|e| self.io(path, e))?;
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let p = SharePath::parse(name).map_err(|_| ShareError::NotFound(name.to_string()))?;
            return Ok(vec![entry(p, &meta)]);
        }
        let real = self.contain(path, &self.physical(path)?)?;
        let read = std::fs::read_dir(&real).map_err(|e| self.io(path, e))?;
        let mut out = Vec::new();
        for item in read {
            let item = item.map_err(|e| self.io(path, e))?;
            let Some(name) = item.file_name().to_str().map(str::to_string) else { continue };
            if name.contains(TEMP_MARKER) {
                continue;
            }
            if let ShareKind::Glob { pattern, .. } = &self.kind {
                if !pattern.matches(&name) {
                    continue;
                }
            }
            let Ok(child) = path.join(&name) else { continue };
            // Follow symlinks; skip entries that dangle or leave the share.
            // Anything else is inside, as its directory is: no need to
            // resolve its path (two `realpath`s, a `readlink` per component,
            // for every entry of every scan of a watched share).
            let meta = if item.file_type().is_ok_and(|t| !t.is_symlink()) {
                item.metadata()
            } else {
                let Ok(canon) = self.contain(&child, &item.path()) else { continue };
                std::fs::metadata(&canon)
            };
            let Ok(meta) = meta else { continue };
            if meta.is_file() || meta.is_dir() {
                out.push(entry(child, &meta));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// One DISCOVER row: kind, size (a directory's direct files summed) and
    /// latest mtime.
    pub fn summary(&self) -> Result<(EntryKind, u64, i64), ShareError> {
        match &self.kind {
            ShareKind::File(_) => {
                let e = self.stat(&SharePath::root())?;
                Ok((EntryKind::File, e.size, e.mtime_ns))
            }
            _ => {
                let entries = self.list(&SharePath::root())?;
                let size = entries.iter().filter(|e| e.kind == EntryKind::File).map(|e| e.size).sum();
                let mtime = entries.iter().map(|e| e.mtime_ns).max().unwrap_or(0);
                Ok((EntryKind::Dir, size, mtime))
            }
        }
    }
}

/// fsync the directory holding `path`, so a create, rename or unlink
/// survives a crash. Best effort: the change itself is already made.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), "fsync of directory failed: {e}");
        }
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A file's mtime as listings show it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified().map(Timestamp::from_system).map(|t| t.0).unwrap_or(0)
}

fn entry(path: SharePath, meta: &std::fs::Metadata) -> Entry {
    let mtime = mtime_ns(meta);
    Entry {
        kind: if meta.is_dir() { EntryKind::Dir } else { EntryKind::File },
        size: if meta.is_dir() { 0 } else { meta.len() },
        mtime_ns: mtime,
        mode: meta.mode() & 0o7777,
        path,
    }
}

/// The access `partner` has to `share`, if any.
pub fn access(share: &ShareConfig, partner: &Name) -> Option<Access> {
    share.access.get(partner).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn share(path: PathBuf) -> Share {
        Share::new(&ShareConfig { name: Name::new("s").unwrap(), path, access: BTreeMap::new(), lockable: Vec::new() })
    }

    #[test]
    fn stale_partial_files_are_swept_and_nothing_else() {
        let dir = crate::testutil::TestDir::new("sweep");
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86_400);
        let make = |rel: &str, stale: bool| {
            let p = d.join(rel);
            std::fs::write(&p, b"x").unwrap();
            if stale {
                std::fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
            }
            p
        };
        let stale = make(&format!(".a{TEMP_MARKER}1"), true);
        let nested = make(&format!("sub/.b{TEMP_MARKER}2"), true);
        let fresh = make(&format!(".c{TEMP_MARKER}3"), false);
        let busy = make(&format!(".d{TEMP_MARKER}4"), true);
        let user = make("old-user-file", true);
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        let (gone, _) = share(d.to_path_buf()).sweep_partials(before, |p| p == busy);
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert!(!stale.exists() && !nested.exists());
        assert!(fresh.exists() && busy.exists() && user.exists());
    }

    #[test]
    fn symlink_out_of_the_share_is_refused() {
        let dir = crate::testutil::TestDir::new("symlink");
        let d = dir.path().to_path_buf();
        let root = d.join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(d.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(&d, root.join("up")).unwrap();
        let s = share(root);
        let p = SharePath::parse("link").unwrap();
        assert!(matches!(s.resolve_file(&p), Err(ShareError::Outside(_))));
        assert!(matches!(s.resolve_target(&SharePath::parse("up/new").unwrap()), Err(ShareError::Outside(_))));
        assert!(s.list(&SharePath::root()).unwrap().is_empty(), "escaping links are not listed");
    }

    #[test]
    fn a_listing_follows_links_inside_the_share_and_a_linked_root() {
        let dir = crate::testutil::TestDir::new("inner-link");
        let d = dir.path().to_path_buf();
        let root = d.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"12345").unwrap();
        std::fs::write(root.join("plain"), b"1").unwrap();
        std::os::unix::fs::symlink(root.join("sub/f"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
        std::os::unix::fs::symlink(&root, d.join("via")).unwrap();
        for s in [share(root.clone()), share(d.join("via"))] {
            let rows: Vec<(String, u64)> = s.list(&SharePath::root()).unwrap().into_iter().map(|e| (e.path.to_string(), e.size)).collect();
            assert_eq!(rows, vec![("link".into(), 5), ("plain".into(), 1), ("sub".into(), 0)]);
        }
    }

    #[test]
    fn glob_share_only_exposes_matching_names() {
        let dir = crate::testutil::TestDir::new("glob");
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("a.xml"), b"1").unwrap();
        std::fs::write(d.join("b.txt"), b"2").unwrap();
        let s = share(d.join("*.xml"));
        let names: Vec<String> = s.list(&SharePath::root()).unwrap().into_iter().map(|e| e.path.to_string()).collect();
        assert_eq!(names, vec!["a.xml"]);
        assert!(matches!(s.resolve_file(&SharePath::parse("b.txt").unwrap()), Err(ShareError::NoMatch(..))));
        assert!(s.resolve_target(&SharePath::parse("c.xml").unwrap()).is_ok());
    }

    #[test]
    fn target_creates_parents_inside_and_hides_temp_files() {
        let dir = crate::testutil::TestDir::new("target");
        let d = dir.path().to_path_buf();
        let s = share(d.clone());
        let t = s.resolve_target(&SharePath::parse("x/y/z.bin").unwrap()).unwrap();
        assert_eq!(t, d.join("x/y/z.bin"));
        assert!(d.join("x/y").is_dir());
        std::fs::write(d.join(format!(".f{TEMP_MARKER}00")), b"").unwrap();
        let names: Vec<String> = s.list(&SharePath::root()).unwrap().into_iter().map(|e| e.path.to_string()).collect();
        assert_eq!(names, vec!["x"]);
    }

    #[test]
    fn file_share_has_no_inner_paths() {
        let dir = crate::testutil::TestDir::new("file");
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("f"), b"abc").unwrap();
        let s = share(d.join("f"));
        assert_eq!(s.resolve_file(&SharePath::root()).unwrap(), d.join("f"));
        assert!(matches!(s.resolve_file(&SharePath::parse("g").unwrap()), Err(ShareError::FileShare(_))));
        assert_eq!(s.summary().unwrap().1, 3);
    }
}
