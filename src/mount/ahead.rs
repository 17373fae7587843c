//! Chunks of a file the kernel writes itself, sent while it is written.
//!
//! A staging the kernel writes through passthrough ([`super::vfs`]) shows
//! mountd nothing but its size and mtime until the file is closed, and
//! the push that follows would then send the whole file. For a large file
//! written from start to end (`cp`, `dd`, an application saving), an
//! [`AheadSender`] follows it instead: every [`POLL`] it reads what the
//! file gained, cuts it as the push would ([`StreamChunker`]: a chunk is
//! final once a cut point ends it), and sends the final chunks to the
//! partner under an ahead id (AHEAD, PROTOCOL.md 8.6). The partner copies
//! those its current version has and stores the others, verified, in a
//! temp file beside the target. The push at the close names the id, and
//! the partner keeps every chunk it holds at the same place in the
//! manifest the push sends: only the rest crosses the network then.
//!
//! Nothing here is trusted for the content of the new version. The push
//! checks every chunk cut here against the file as it is then, and cuts
//! the whole file if one no longer matches
//! ([`crate::mount::stage::Staged::manifest_after`]), so a chunk the
//! kernel rewrote after it was sent ahead is simply not kept (its hash no
//! longer matches) and is sent with the push. The cost of a file
//! rewritten in place is the bytes sent twice, never a wrong file. A
//! partner that does not know AHEAD, refuses it, or fails, ends the
//! sending: the push sends what it would have sent anyway.
//!
//! Only new files are followed ([`crate::mount::vfs`]): a file rewritten
//! over a version the partner has goes as a delta at the close. A file
//! that is mostly holes (a truncate to a large size) is not followed.

use crate::chunk::{ChunkParams, ChunkRef, StreamChunker};
use crate::proto::{Name, SharePath};
use crate::writeback::Writeback;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the file is looked at.
const POLL: Duration = Duration::from_millis(100);

/// Bytes the file must have gained before they are cut and sent: fewer,
/// larger rounds (each is a round trip), and a small file closed within
/// a round never sends anything ahead.
const STEP: u64 = 16 << 20;

/// Bytes read from the file at a time.
const READ: usize = 4 << 20;

/// How long a push waits for the last round (what the file gained since
/// the round before, sent while the push cuts the file) before it goes on
/// without it (the partner is slow or gone): the chunks the partner has
/// checked by then count, the push sends the others.
const FINISH_WAIT: Duration = Duration::from_secs(3);

/// Sends the chunks of one staging ahead of its push; see the module.
pub struct AheadSender {
    id: Name,
    stop: Arc<AtomicBool>,
    /// A push is cutting the file: send what is left, tail included, and end.
    last: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    /// Whether an AHEAD was sent: only then does the push name the id.
    sent: Arc<AtomicBool>,
    /// The final chunks cut so far, from the start of the file.
    cut: Arc<Mutex<Vec<ChunkRef>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one sender needs to reach the partner.
pub struct Target {
    pub writeback: Arc<Writeback>,
    pub partner: String,
    pub share: Name,
    pub path: SharePath,
}

impl AheadSender {
    /// Follow `data` (a staging the kernel writes, open as `file`) and send
    /// its chunks to `target`, until [`AheadSender::finish`].
    pub fn start(target: Target, data: PathBuf, file: std::fs::File, params: ChunkParams) -> AheadSender {
        let id = crate::transfer::new_transfer_id();
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let sent = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Mutex::new(Vec::new()));
        let run = Run {
            cut: cut.clone(),
            id: id.clone(),
            target,
            data,
            file: Arc::new(file),
            stop: stop.clone(),
            last: last.clone(),
            wake: wake.clone(),
            sent: sent.clone(),
        };
        let task = tokio::spawn(run.follow(params));
        AheadSender { id, stop, last, wake, sent, cut, task: Mutex::new(Some(task)) }
    }

    /// Whether a round was sent (or is being sent): a push then names the
    /// id. One made before (the empty file a `dd` or a shell's `>` pushes
    /// at its first close) leaves the sender following the file.
    pub fn has_sent(&self) -> bool {
        self.sent.load(Ordering::SeqCst)
    }

    /// The chunks cut so far from the start of the file, as they were
    /// when cut: the push checks them rather than cut them again
    /// ([`crate::mount::stage::Staged::manifest_after`]).
    pub fn cut_so_far(&self) -> Vec<ChunkRef> {
        lock(&self.cut).clone()
    }

    /// Stop following the file (the last writer closed it): a round in
    /// flight goes on, for the push that names the id.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// For the push that takes the file as it is now: send what it gained
    /// since the last round, its last chunk included (at most
    /// [`FINISH_WAIT`]), and return the id for the push to name, if
    /// anything was sent.
    pub async fn finish(&self) -> Option<Name> {
        self.last.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let task = lock(&self.task).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(FINISH_WAIT, &mut task).await.is_err() {
                tracing::debug!(id = %self.id, "chunks ahead: the round in flight is left behind");
                task.abort();
            }
        }
        self.sent.load(Ordering::SeqCst).then(|| self.id.clone())
    }
}

impl Drop for AheadSender {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

struct Run {
    id: Name,
    target: Target,
    data: PathBuf,
    file: Arc<std::fs::File>,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    sent: Arc<AtomicBool>,
    cut: Arc<Mutex<Vec<ChunkRef>>>,
}

impl Run {
    async fn follow(self, params: ChunkParams) {
        // Made at the first round: most files never have one.
        let mut chunker: Option<StreamChunker> = None;
        let mut declared = 0usize;
        // Chunks cut and not declared yet: they go while the next bytes
        // are cut, so that cutting and sending overlap.
        let mut pending: Vec<ChunkRef> = Vec::new();
        let mut wait = true;
        // Kept from round to round (fresh pages are dear on some VMs), and
        // made at the first: most files never have one.
        let mut buf = Vec::new();
        loop {
            if wait {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = self.wake.notified() => {}
                }
            }
            let last = self.last.load(Ordering::SeqCst);
            if self.stop.load(Ordering::SeqCst) && !last {
                return;
            }
            let Ok(meta) = self.file.metadata() else { return };
            let size = meta.len();
            let position = chunker.as_ref().map_or(0, StreamChunker::position);
            // A file made large by a truncate or a write far past its end
            // is mostly holes, not written bytes: nothing to send ahead.
            if std::os::unix::fs::MetadataExt::blocks(&meta).saturating_mul(512) < size / 2 {
                return;
            }
            let grown = size >= position + STEP || last;
            if !grown && pending.is_empty() {
                wait = true;
                continue;
            }
            // Cut what the file gained (from the page cache: it was just
            // written), off the async threads, while the chunks cut before
            // are sent.
            let cut = if grown {
                let mut current = match chunker.take() {
                    Some(c) => c,
                    None => match StreamChunker::new(&params) {
                        Ok(c) => c,
                        Err(_) => return,
                    },
                };
                let file = self.file.clone();
                let mut buf = std::mem::take(&mut buf);
                Some(tokio::task::spawn_blocking(move || -> std::io::Result<(StreamChunker, Vec<u8>)> {
                    buf.resize(READ, 0);
                    while current.position() < size {
                        let want = (size - current.position()).min(READ as u64) as usize;
                        let n = file.read_at(&mut buf[..want], current.position())?;
                        if n == 0 {
                            break;
                        }
                        current.push(&buf[..n]);
                    }
                    Ok((current, buf))
                }))
            } else {
                None
            };
            if !pending.is_empty() {
                if !self.send(declared as u32, &pending).await {
                    return;
                }
                declared += pending.len();
                pending.clear();
            }
            let Some(cut) = cut else {
                wait = true;
                continue;
            };
            let current = match cut.await {
                Ok(Ok((current, kept))) => {
                    buf = kept;
                    chunker.insert(current)
                }
                Ok(Err(e)) => return tracing::debug!(id = %self.id, "chunks ahead: reading the staging: {e}"),
                Err(_) => return,
            };
            let cut = if last {
                // The file as the push cuts it: its last chunk too.
                current.manifest().chunks
            } else {
                let cut = current.final_chunks().to_vec();
                *lock(&self.cut) = cut.clone();
                cut
            };
            pending = cut.get(declared..).unwrap_or_default().to_vec();
            if last {
                if !pending.is_empty() {
                    self.send(declared as u32, &pending).await;
                }
                return;
            }
            // The next round at once if the file grew meanwhile: a writer
            // faster than the rounds is not left further behind by a sleep.
            wait = false;
        }
    }

    /// One round: declare `chunks` (numbered from `first`) and send those
    /// the partner lacks. False when sending ahead is over.
    async fn send(&self, first: u32, chunks: &[crate::chunk::ChunkRef]) -> bool {
        let t = &self.target;
        let mut session = match t.writeback.session(&t.partner).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(partner = %t.partner, "chunks ahead: no session ({e})");
                return false;
            }
        };
        self.sent.store(true, Ordering::SeqCst);
        let sent = session.send_ahead(&self.id, &t.share, &t.path, first, chunks, &self.data).await;
        match sent {
            Ok(true) => {
                t.writeback.give_back(&t.partner, session).await;
                tracing::debug!(partner = %t.partner, path = %t.path, first, chunks = chunks.len(), "chunks sent ahead");
                true
            }
            Ok(false) => {
                // The partner does not take chunks ahead: nothing was sent.
                self.sent.store(first > 0, Ordering::SeqCst);
                t.writeback.give_back(&t.partner, session).await;
                false
            }
            Err(e) => {
                // The session is in an unknown state: not given back.
                tracing::debug!(partner = %t.partner, path = %t.path, "chunks ahead: stopped ({e})");
                false
            }
        }
    }
}
