//! Opening a remote file on the start of its manifest.
//!
//! A 1 GiB file has a manifest of about 4,096 chunks; reading the whole of
//! it (DESCRIBE) took most of a fresh `open`. When the partner answers
//! DESCRIBE_PART (PROTOCOL.md 6.2), an open that has no current manifest
//! asks only for the chunks of the first [`START_BYTES`], returns, and the
//! handle reads from them. The whole manifest is asked for in the
//! background once a read has passed half the start ([`Rest::start`]), or
//! at once by a read that goes past the start; the handle then reads by
//! it. A handle that reads only the first MiBs never asks for it.
//!
//! Guarantees:
//! - every chunk is verified against the hash its manifest line names
//!   before it is served, as for a whole manifest;
//! - a handle serves one version: the start and the GETs it makes name the
//!   version's file hash, and the partner refuses a GET of a version it no
//!   longer has (STALE, which a read returns as `ESTALE`);
//! - the whole manifest must have the start's file hash (else the file
//!   changed since the open: reads past the start fail with `ESTALE`, as a
//!   changed file's would; reads within it go on serving the version
//!   opened), must hash to it (checked as any DESCRIBE), and must begin
//!   with the start's lines. If not, the start did not describe the
//!   version it named: the handle fails every later read with `EIO`, and
//!   the kernel's cached pages of the file are dropped, since they were
//!   read through that start. Chunks already in the chunk store stay: each
//!   was verified against its own hash, which is all a chunk is known by.
//! - a version whose start was served but whose whole manifest never came
//!   (closed before, or the partner went offline) is not saved in
//!   `meta.db`: offline, only versions known whole are served.

use super::*;
use crate::mount::remote::Described;
use std::sync::atomic::AtomicBool;

/// Bytes from the start of a file whose chunks an open asks for (about 32
/// CHUNK lines, 3 KB, at the default chunk size): the first reads and the
/// readahead asked with them ([`FIRST_AHEAD`]) fit in the first half, so
/// the whole manifest is not asked for while they are served.
pub(super) const START_BYTES: u64 = 8 << 20;

/// The whole manifest of a version a handle opened on its start.
pub(super) struct Rest {
    ino: Ino,
    remote: Arc<Remote>,
    share: Name,
    path: SharePath,
    start: Arc<Manifest>,
    whole: OnceLock<Described>,
    /// Held while asking for the whole manifest, with the last failure and
    /// the number of the attempt that failed: a reader that waited for an
    /// attempt gets its failure rather than waiting for one more (a read
    /// through a broken link then fails within one offline wait, not two).
    attempt: tokio::sync::Mutex<Option<(u64, RemoteError)>>,
    /// Attempts finished.
    attempts: AtomicU64,
    started: AtomicBool,
    /// The whole manifest contradicted the start: nothing more is served.
    poisoned: AtomicBool,
}

impl Rest {
    fn new(ino: Ino, remote: Arc<Remote>, share: Name, path: SharePath, start: Arc<Manifest>) -> Rest {
        Rest {
            ino,
            remote,
            share,
            path,
            start,
            whole: OnceLock::new(),
            attempt: Default::default(),
            attempts: AtomicU64::new(0),
            started: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Where the start's chunks end.
    pub(super) fn known_end(&self) -> u64 {
        self.start.chunks.last().map_or(0, |c| c.end())
    }

    pub(super) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// The whole manifest, if it has come.
    pub(super) fn ready(&self) -> Option<&Described> {
        self.whole.get()
    }

    /// Ask for the whole manifest in the background (once).
    pub(super) fn start(self: &Arc<Self>) {
        if !self.started.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.get().await {
                    tracing::debug!(path = %me.path, "whole manifest not read: {e}");
                }
            });
        }
    }

    /// The whole manifest, asking for it unless an attempt is under way
    /// (then its outcome). A failure is not kept for later callers: they
    /// ask again (the partner may be back).
    pub(super) async fn get(&self) -> Result<&Described, RemoteError> {
        self.started.store(true, Ordering::SeqCst);
        if let Some(d) = self.whole.get() {
            return Ok(d);
        }
        let arrived = self.attempts.load(Ordering::SeqCst);
        let mut failed = self.attempt.lock().await;
        if let Some(d) = self.whole.get() {
            return Ok(d);
        }
        if let Some((n, e)) = failed.as_ref() {
            if *n > arrived {
                return Err(e.clone());
            }
        }
        let got = self.fetch().await;
        let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        match got {
            Ok(d) => Ok(self.whole.get_or_init(|| d)),
            Err(e) => {
                *failed = Some((n, e.clone()));
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<Described, RemoteError> {
        let whole = self.remote.describe(&self.share, &self.path).await?;
        let (m, start) = (&whole.manifest, &self.start);
        if m.file_hash != start.file_hash {
            return Err(RemoteError::Stale { partner: self.remote.partner().to_string(), path: self.path.to_string() });
        }
        if m.size != start.size || m.chunks.get(..start.chunks.len()) != Some(&start.chunks[..]) {
            self.poisoned.store(true, Ordering::SeqCst);
            let got = format!("a manifest of {} whose start differs from the FILE_PART of the same version", self.path);
            return Err(RemoteError::Unexpected { partner: self.remote.partner().to_string(), got });
        }
        Ok(whole)
    }
}

impl Vfs {
    /// The manifest an open reads by: the one we have while it is current,
    /// else the start of the current version's (with the [`Rest`] to come)
    /// when the partner answers DESCRIBE_PART, else as [`Vfs::manifest`].
    pub(super) async fn manifest_to_open(&self, ino: Ino) -> Result<(Name, SharePath, Arc<Manifest>, Option<Arc<Rest>>), Errno> {
        let (share, path, kind) = self.node_key(ino)?;
        let current = lock(&self.inodes).by_ino.get(&ino).and_then(|n| n.manifest.clone());
        let share = match share {
            Some(share) if kind == Kind::File && !(current.is_some() && self.watching.load(Ordering::SeqCst)) => share,
            _ => return self.manifest(ino).await.map(|(s, p, m)| (s, p, m, None)),
        };
        let started = match self.remote.describe_start(&share, &path, START_BYTES).await {
            Ok(Some(started)) => started,
            // No PART (or a partner that lost it since it said so).
            Ok(None) | Err(RemoteError::Refused { code: "BAD_REQUEST", .. }) => {
                return self.manifest(ino).await.map(|(s, p, m)| (s, p, m, None));
            }
            Err(e @ RemoteError::Offline { .. }) => {
                let Some(k) = self.meta.manifest(&share, &path) else {
                    tracing::warn!(partner = %self.remote.partner(), %path, "cannot open: {e}");
                    return Err(Errno::EIO);
                };
                let manifest = Arc::new(k.manifest);
                self.take_version(ino, &manifest, k.mtime_ns, k.mode, true).await?;
                return Ok((share, path, manifest, None));
            }
            Err(e) => return Err(Errno::from_remote(&e)),
        };
        let Described { manifest, mtime_ns, mode } = started.described;
        self.take_version(ino, &manifest, mtime_ns, mode, started.complete).await?;
        if started.complete {
            let known = KnownFile { manifest: (*manifest).clone(), mtime_ns, mode };
            self.meta.save_manifest_later(&share, &path, known);
            return Ok((share, path, manifest, None));
        }
        let rest = Rest::new(ino, self.remote.clone(), share.clone(), path.clone(), manifest.clone());
        Ok((share, path, manifest, Some(Arc::new(rest))))
    }

    /// Read handle `fh` by the whole manifest of `rest` from now on,
    /// waiting for it if `wait` (else only if it has come). Fails as the
    /// rest did (see the module's guarantees).
    pub(super) async fn take_rest(&self, fh: u64, rest: &Rest, wait: bool) -> Result<(), Errno> {
        let whole = if wait {
            match rest.get().await {
                Ok(d) => d,
                Err(e) => {
                    if rest.is_poisoned() {
                        self.drop_poisoned(rest.ino);
                    }
                    tracing::warn!(partner = %self.remote.partner(), path = %rest.path, "read failed: {e}");
                    return Err(Errno::from_remote(&e));
                }
            }
        } else {
            match rest.ready() {
                Some(d) => d,
                None => return Ok(()),
            }
        };
        let manifest = whole.manifest.clone();
        {
            let mut handles = lock(&self.handles);
            if let Some(Handle::Read(h)) = handles.get_mut(&fh) {
                if h.rest.as_ref().is_some_and(|r| std::ptr::eq(&**r, rest)) {
                    h._hold = self.store.hold(manifest.chunks.iter().map(|c| c.hash));
                    h.manifest = manifest.clone();
                    h.rest = None;
                }
            }
        }
        let current = {
            let mut inodes = lock(&self.inodes);
            match inodes.by_ino.get_mut(&rest.ino) {
                Some(n) if n.cached_version == Some(manifest.file_hash) => {
                    n.manifest = Some(manifest.clone());
                    true
                }
                _ => false,
            }
        };
        if current {
            let known = KnownFile { manifest: (*manifest).clone(), mtime_ns: whole.mtime_ns, mode: whole.mode };
            self.meta.save_manifest_later(&rest.share, &rest.path, known);
        }
        Ok(())
    }

    /// The start `ino` was read by was false: the kernel's pages of it go,
    /// and the next open keeps none.
    fn drop_poisoned(&self, ino: Ino) {
        if let Some(n) = lock(&self.inodes).by_ino.get_mut(&ino) {
            n.cached_version = None;
            n.manifest = None;
        }
        if let Some(f) = self.invalidate.get() {
            f(Inval::Inode(ino));
        }
    }
}
