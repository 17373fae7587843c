//! The serving side of a DEFT/1 session: one task per connection reads the
//! control stream and answers; pushed chunks arrive on their own streams and
//! are verified and stored concurrently; pulled chunks leave on their own
//! streams, at most a window's worth at a time.
//!
//! Policy decided here, for every request: the partner must have said AUTH
//! with the identity its certificate proved; a share it is not granted does
//! not exist for it; pulls need `read`, pushes need `write`; paths are
//! resolved by [`crate::share`] and never leave the share.

// Handlers return `Err(Response::Error)`: the refusal is the answer itself,
// built once and sent as is, so its size on the stack does not matter.
#![allow(clippy::result_large_err)]

use super::assemble::{Ahead, AssembleError, Assembly, Patching, Written};
use super::{manifest_from_lines, manifest_from_relative, manifest_to_lines, party, Facts};
use crate::chunk::Manifest;
use crate::db::TransferRecord;
use crate::fault;
use crate::node::Node;
use crate::proto::{
    self, AckStatus, Capability, ChunkLine, Completion, DataHeader, ErrorCode, FilePart, Name, PushManifest, RangeSet, Request, Response,
    SharePath, ShareRow,
};
use crate::share::{Share, ShareError};
use crate::time::Timestamp;
use crate::transport::{Control, TransportError};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

const SERVER_CAPS: [Capability; 7] = [
    Capability::Chunked,
    Capability::Parallel,
    Capability::Resume,
    Capability::Eager,
    Capability::Part,
    Capability::Same,
    Capability::Ahead,
];

/// Chunks sent ahead of pushes (AHEAD, PROTOCOL.md 8.6) by partner and
/// ahead id, with when each was last used. Kept by the node, not the
/// session: the push that names them may come on another connection.
pub type Aheads = Mutex<HashMap<(Name, Name), (Arc<Ahead>, std::time::Instant)>>;

/// Chunks sent ahead that no AHEAD or push has used for this long are
/// deleted.
const AHEAD_IDLE: Duration = Duration::from_secs(120);

/// Files of chunks sent ahead a partner may have at once.
const MAX_AHEADS: usize = 8;

/// How long a chunk stream that names a push not begun yet waits for its
/// BEGIN_TRANSFER (EAGER, PROTOCOL.md 8.3): the two travel on different
/// streams and may be read in either order.
const EAGER_WAIT: Duration = Duration::from_secs(10);

/// Transfer ids whose BEGIN_TRANSFER a session remembers having answered.
const SETTLED_IDS: usize = 256;

/// A push being received.
struct Incoming {
    share: Name,
    path: SharePath,
    /// Checked again just before the new version replaces the old.
    base: proto::Base,
    /// The new version's permissions and mtime, when the sender gave them.
    mode: Option<u32>,
    mtime_ns: Option<i64>,
    assembly: Mutex<Option<Arc<Assembly>>>,
    manifest: Manifest,
    started: Timestamp,
    bytes: AtomicU64,
    chunks: AtomicU32,
    nacks: AtomicU32,
    _busy: BusyGuard,
}

/// A push abandoned before any chunk reached its temp file (the connection
/// closed, or the push was aborted) leaves no temp file: there is nothing
/// in it to resume, and it holds the file's whole size on the disk. Done
/// under the busy-target lock, and only while no later push of the same
/// partner took the target over (and may be using the same temp file).
impl Incoming {
    /// Give the push up: a chunk still arriving can no longer complete it.
    fn abandon(&self) {
        let Some(assembly) = lock(&self.assembly).take() else { return };
        if !assembly.is_untouched() {
            return;
        }
        let busy = lock(&self._busy.node.busy_targets);
        if busy.get(&self._busy.target).is_some_and(|(_, g)| *g == self._busy.generation) {
            assembly.discard();
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// A pull being served: what the receipt will be about.
struct Outgoing {
    share: Name,
    path: SharePath,
    manifest: Manifest,
    started: Timestamp,
    bytes: AtomicU64,
    chunks: AtomicU32,
    /// The test fault hook corrupts one transmission only.
    corrupted: std::sync::atomic::AtomicBool,
}

/// Marks a target as being assembled; released on drop unless another
/// transfer took it over meanwhile.
struct BusyGuard {
    node: Arc<Node>,
    target: PathBuf,
    generation: u64,
}

impl BusyGuard {
    /// Claim `target` for `partner`. Refused while another partner holds
    /// it; the same partner takes it over, since its earlier connection is
    /// dead or about to be (it writes the same verified chunks anyway).
    fn claim(node: &Arc<Node>, target: &std::path::Path, partner: &Name) -> Option<BusyGuard> {
        let generation = node.busy_generation.fetch_add(1, Ordering::SeqCst);
        let mut busy = lock(&node.busy_targets);
        match busy.get(target) {
            Some((holder, _)) if holder != partner => return None,
            Some(_) => tracing::info!(%partner, target = %target.display(), "resumed push takes over the earlier transfer"),
            None => {}
        }
        busy.insert(target.to_path_buf(), (partner.clone(), generation));
        Some(BusyGuard { node: node.clone(), target: target.to_path_buf(), generation })
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = lock(&self.node.busy_targets);
        if busy.get(&self.target).is_some_and(|(_, g)| *g == self.generation) {
            busy.remove(&self.target);
        }
    }
}

struct Session {
    node: Arc<Node>,
    partner: Name,
    peer_cert: Vec<u8>,
    conn: quinn::Connection,
    tx: mpsc::Sender<Response>,
    window: u32,
    incoming: Mutex<HashMap<Name, Arc<Incoming>>>,
    outgoing: Mutex<HashMap<Name, Arc<Outgoing>>>,
    send_permits: Arc<Semaphore>,
    /// Bytes of chunks being received at once, in [`RECEIVE_UNIT`]s: a
    /// chunk stream waits for its share of [`RECEIVE_BUDGET`] before its
    /// buffer is allocated.
    receive_permits: Arc<Semaphore>,
    /// Tasks forwarding CHANGED lines of watched shares.
    watches: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Both sides named EAGER in HELLO and WELCOME.
    eager: std::sync::atomic::AtomicBool,
    /// Both sides named SAME: a push may give its manifest relative to its
    /// base version's.
    same: std::sync::atomic::AtomicBool,
    /// Both sides named AHEAD.
    ahead: std::sync::atomic::AtomicBool,
    /// With EAGER: the latest pushes whose BEGIN_TRANSFER was answered
    /// (accepted, refused or completed at once), and a wake-up for chunk
    /// streams that arrived first (see [`Session::settled`]).
    settled: Mutex<std::collections::VecDeque<Name>>,
    settled_now: tokio::sync::Notify,
}

/// Where a session is in its opening (PROTOCOL.md 5.1, 5.2): HELLO once,
/// then AUTH once, then everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Greeted,
    Authed,
}

/// Pulls a session remembers at most. A mount reads many files with
/// partial GETs and never signs for them, so the oldest are forgotten
/// (a later GET for one of them starts it afresh).
const MAX_OUTGOING: usize = 256;

/// Bytes of chunk data a session receives at once, at most: without a
/// bound, a partner opening thousands of chunk streams that each declare a
/// large chunk would make the daemon allocate them all. A window of 64
/// chunks of the default 1 MiB maximum fits; larger chunks take turns.
const RECEIVE_BUDGET: usize = 64 << 20;
const RECEIVE_UNIT: usize = 4096;

/// A chunk stream that sends nothing for this long is dropped (its
/// buffer freed) and its chunk NACKed: the sender sends it again.
const STREAM_IDLE: Duration = Duration::from_secs(30);

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::error(code, message)
}

/// The code for an assembly that failed: BUSY for a full disk (the client
/// may retry once space is freed), BAD_PATH for a path this file system
/// cannot hold (its share root and the path past PATH_MAX: no retry helps),
/// INTERNAL for the rest.
fn assemble_code(e: &crate::transfer::assemble::AssembleError) -> ErrorCode {
    if e.is_disk_full() {
        ErrorCode::Busy
    } else if e.is_name_too_long() {
        ErrorCode::BadPath
    } else {
        ErrorCode::Internal
    }
}

fn share_err(e: ShareError) -> Response {
    let code = match &e {
        ShareError::Unknown(_) => ErrorCode::UnknownShare,
        ShareError::Denied(..) => ErrorCode::AccessDenied,
        ShareError::NotFound(_) | ShareError::NoMatch(..) => ErrorCode::NotFound,
        ShareError::Outside(_) | ShareError::FileShare(_) | ShareError::NotAFile(_) => ErrorCode::BadPath,
        ShareError::NotADir(_) => ErrorCode::NotDir,
        ShareError::IsDir(_) => ErrorCode::IsDir,
        ShareError::Exists(_) => ErrorCode::Exists,
        ShareError::NotEmpty(_) => ErrorCode::NotEmpty,
        ShareError::Root(_) => ErrorCode::AccessDenied,
        // The share's root and the path together past PATH_MAX here.
        ShareError::Io { source, .. } if source.raw_os_error() == Some(libc::ENAMETOOLONG) => ErrorCode::BadPath,
        ShareError::Io { .. } => ErrorCode::Internal,
    };
    err(code, e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serve one authenticated connection until it closes.
pub async fn serve(node: Arc<Node>, conn: quinn::Connection, partner: Name, peer_cert: Vec<u8>) {
    let remote = conn.remote_address();
    let (send, recv) = match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(2u32.into(), b"no control stream");
            return;
        }
    };
    let (send, mut reader) = Control::<Request>::new(send, recv).split();
    let (tx, rx) = mpsc::channel(4096);
    let writer = tokio::spawn(write_responses(send, rx));
    let window = node.config.storage.window.max(1);
    let session = Arc::new(Session {
        node,
        partner,
        peer_cert,
        conn: conn.clone(),
        tx,
        window,
        incoming: Mutex::new(HashMap::new()),
        outgoing: Mutex::new(HashMap::new()),
        send_permits: Arc::new(Semaphore::new(window as usize)),
        receive_permits: Arc::new(Semaphore::new(RECEIVE_BUDGET / RECEIVE_UNIT)),
        watches: Mutex::new(Vec::new()),
        eager: Default::default(),
        same: Default::default(),
        ahead: Default::default(),
        settled: Default::default(),
        settled_now: tokio::sync::Notify::new(),
    });
    let puts = tokio::spawn(accept_puts(session.clone()));
    let mut phase = Phase::Start;
    loop {
        let req = match reader.recv().await {
            Ok(r) => r,
            Err(TransportError::Protocol(e)) => {
                tracing::warn!(partner = %session.partner, %remote, "bad request: {e}");
                let _ = session.tx.send(err(e.code(), e.to_string())).await;
                continue;
            }
            Err(_) => break,
        };
        let bye = matches!(req, Request::Bye);
        let answer = session.clone().handle(req, &mut phase).await;
        if let Some(answer) = answer {
            if session.tx.send(answer).await.is_err() {
                break;
            }
        }
        if bye {
            break;
        }
    }
    puts.abort();
    for w in lock(&session.watches).drain(..) {
        w.abort();
    }
    drop(session);
    let _ = writer.await;
    tracing::info!(target: "audit", %remote, "session closed");
}

/// Own the control stream's sending half; coalesce consecutive chunk
/// acknowledgements into CHUNK_ACK_BATCH.
async fn write_responses(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Response>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 512 {
                break;
            }
        }
        let mut text = String::new();
        let mut acks: Option<(Name, RangeSet)> = None;
        let flush = |acks: &mut Option<(Name, RangeSet)>, text: &mut String| {
            if let Some((transfer_id, chunks)) = acks.take() {
                let msg = if chunks.len() == 1 {
                    let index = chunks.iter().next().unwrap_or(0);
                    Response::ChunkAck { transfer_id, index, status: AckStatus::Ok }
                } else {
                    Response::ChunkAckBatch { transfer_id, chunks }
                };
                text.push_str(&msg.encode());
            }
        };
        for msg in batch {
            match msg {
                Response::ChunkAck { transfer_id, index, status: AckStatus::Ok } => match &mut acks {
                    Some((id, set)) if *id == transfer_id => set.insert(index),
                    _ => {
                        flush(&mut acks, &mut text);
                        acks = Some((transfer_id, std::iter::once(index).collect()));
                    }
                },
                other => {
                    flush(&mut acks, &mut text);
                    text.push_str(&other.encode());
                }
            }
        }
        flush(&mut acks, &mut text);
        if send.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

impl Session {
    fn share(&self, name: &Name) -> Result<(Share, proto::Access), Response> {
        let config = self.node.config.share(name.as_str());
        match config.and_then(|c| crate::share::access(c, &self.partner).map(|a| (c, a))) {
            Some((c, a)) => Ok((Share::new(c), a)),
            None => Err(share_err(ShareError::Unknown(name.to_string()))),
        }
    }

    fn readable(&self, name: &Name) -> Result<Share, Response> {
        let (share, access) = self.share(name)?;
        if !access.can_read() {
            tracing::warn!(target: "audit", partner = %self.partner, share = %name, "refused pull: no read access");
            return Err(share_err(ShareError::Denied(self.partner.to_string(), "read", name.to_string())));
        }
        Ok(share)
    }

    fn writable(&self, name: &Name) -> Result<Share, Response> {
        let (share, access) = self.share(name)?;
        if !access.can_write() {
            tracing::warn!(target: "audit", partner = %self.partner, share = %name, "refused push: no write access");
            return Err(share_err(ShareError::Denied(self.partner.to_string(), "write", name.to_string())));
        }
        Ok(share)
    }

    async fn manifest_of(&self, path: PathBuf) -> Result<Manifest, Response> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || crate::index::manifest_for_recent(&node.db, &path, &node.config.storage.chunk))
            .await
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| match e {
                // Removed or renamed between the lookup and the hashing.
                e if e.is_not_found() => err(ErrorCode::NotFound, "no such file (it was removed or renamed just now)"),
                crate::index::IndexError::KeepsChanging { .. } => err(ErrorCode::Busy, format!("{e}: try again")),
                e => err(ErrorCode::Internal, e.to_string()),
            })
    }

    async fn handle(self: Arc<Self>, req: Request, phase: &mut Phase) -> Option<Response> {
        match req {
            Request::Hello { .. } if *phase != Phase::Start => {
                Some(err(ErrorCode::BadRequest, "HELLO was already sent on this connection"))
            }
            Request::Auth { .. } if *phase == Phase::Start => Some(err(ErrorCode::BadRequest, "send HELLO before AUTH")),
            Request::Auth { .. } if *phase == Phase::Authed => {
                Some(err(ErrorCode::BadRequest, "AUTH was already accepted on this connection"))
            }
            Request::Hello { version, caps, window } => {
                if version.split('.').next() != proto::VERSION.split('.').next() {
                    return Some(err(ErrorCode::UnsupportedVersion, format!("this node speaks DEFT {}", proto::VERSION)));
                }
                let caps: Vec<Capability> = SERVER_CAPS.iter().copied().filter(|c| caps.contains(c)).collect();
                self.eager.store(caps.contains(&Capability::Eager), Ordering::SeqCst);
                self.same.store(caps.contains(&Capability::Same), Ordering::SeqCst);
                self.ahead.store(caps.contains(&Capability::Ahead), Ordering::SeqCst);
                let session = super::new_transfer_id();
                *phase = Phase::Greeted;
                Some(Response::Welcome { version: proto::VERSION.into(), caps, window: window.clamp(1, self.window), session })
            }
            Request::Auth { partner } => {
                if partner != self.partner {
                    tracing::warn!(target: "audit", claimed = %partner, proven = %self.partner, "refused AUTH: name does not match the certificate");
                    return Some(err(ErrorCode::AuthFailed, format!("your certificate is partner {}'s, not {partner}'s", self.partner)));
                }
                *phase = Phase::Authed;
                tracing::info!(target: "audit", partner = %self.partner, "authenticated");
                let shares =
                    self.node.config.shares.iter().filter(|s| s.access.contains_key(&self.partner)).map(|s| s.name.clone()).collect();
                Some(Response::AuthOk { partner, shares })
            }
            Request::Bye => Some(Response::Bye),
            // One transfer at a time (PROTOCOL.md 3): during a push the
            // client sends nothing on the control stream.
            _ if !lock(&self.incoming).is_empty() => {
                let drained: Vec<(Name, Arc<Incoming>)> = lock(&self.incoming).drain().collect();
                let aborted: Vec<String> = drained.iter().map(|(id, _)| id.to_string()).collect();
                for (_, incoming) in &drained {
                    incoming.abandon();
                }
                tracing::warn!(partner = %self.partner, ?aborted, "request during a push: the push is aborted");
                Some(err(
                    ErrorCode::BadRequest,
                    format!("push {} was in progress on this connection and is now aborted: send other requests after it ends, or on another connection", aborted.join(",")),
                ))
            }
            _ if *phase != Phase::Authed => Some(err(ErrorCode::AuthRequired, "send AUTH first")),
            Request::Discover => Some(self.discover()),
            Request::Describe { share, path } => Some(self.describe(&share, &path).await.unwrap_or_else(|e| e)),
            Request::DescribePart { share, path, offset, length } => {
                Some(self.describe_part(&share, &path, offset, length).await.unwrap_or_else(|e| e))
            }
            Request::List { share, path } => Some(
                self.share(&share)
                    .and_then(|(s, _)| s.list(&path).map_err(share_err))
                    .map(|entries| Response::Entries(entries.into_iter().map(|e| self.shown(&share, e)).collect()))
                    .unwrap_or_else(|e| e),
            ),
            Request::Stat { share, path } => Some(
                self.share(&share)
                    .and_then(|(s, _)| s.stat(&path).map_err(share_err))
                    .map(|e| Response::StatOk(self.shown(&share, e)))
                    .unwrap_or_else(|e| e),
            ),
            Request::BeginTransfer { transfer_id, share, path, size, file_hash, base, fence, mode, mtime_ns, manifest, ahead } => {
                let id = transfer_id.clone();
                // Chunks sent ahead are used by this push or by none.
                let ahead = ahead.and_then(|a| lock(&self.node.aheads).remove(&(self.partner.clone(), a))).map(|(a, _)| a);
                let push = Push { transfer_id, share, path, size, file_hash, base, fence, mode, mtime_ns, manifest, ahead };
                let answer = self.clone().begin(push).await.unwrap_or_else(|e| e);
                self.answer_before_chunks(id, answer).await
            }
            Request::Ahead { ahead_id, share, path, first, chunks } => {
                let id = ahead_id.clone();
                let answer = self.ahead(ahead_id, share, path, first, chunks).await.unwrap_or_else(|e| e);
                self.answer_before_chunks(id, answer).await
            }
            Request::Mkdir { share, path, mode } => Some(self.mkdir(&share, &path, mode).unwrap_or_else(|e| e)),
            Request::Remove { share, path, kind } => Some(self.remove(&share, &path, kind).unwrap_or_else(|e| e)),
            Request::Rename { share, from, to, replace } => Some(self.rename(&share, &from, &to, replace).unwrap_or_else(|e| e)),
            Request::SetAttr { share, path, mode, mtime_ns } => Some(self.set_attr(&share, &path, mode, mtime_ns).unwrap_or_else(|e| e)),
            Request::Lock { share, path, ttl_s, owner } => Some(self.lock(&share, &path, ttl_s, &owner).unwrap_or_else(|e| e)),
            Request::Renew { share, path, token, ttl_s } => Some(self.renew(&share, &path, token, ttl_s).unwrap_or_else(|e| e)),
            Request::Unlock { share, path, token } => Some(self.unlock(&share, &path, token).unwrap_or_else(|e| e)),
            Request::Locks { share } => Some(self.locks(&share).unwrap_or_else(|e| e)),
            Request::Get { transfer_id, share, path, file_hash, chunks } => {
                self.get(transfer_id, share, path, file_hash, chunks).await.err()
            }
            Request::TransferComplete(c) => Some(self.pull_receipt(c)),
            Request::Watch { share } => Some(self.watch(share).unwrap_or_else(|e| e)),
        }
    }

    /// Forward the share's changes as CHANGED lines until the session ends.
    fn watch(self: Arc<Self>, share: Name) -> Result<Response, Response> {
        self.share(&share)?;
        let config = self.node.config.share(share.as_str()).ok_or_else(|| share_err(ShareError::Unknown(share.to_string())))?;
        let interval = Duration::from_millis(self.node.config.storage.watch_interval_ms);
        let mut rx = self.node.watchers.subscribe(&self.node, config, interval);
        let tx = self.tx.clone();
        let name = share.clone();
        let partner = self.partner.clone();
        let task = tokio::spawn(async move {
            loop {
                let path = match rx.recv().await {
                    Ok((_, Some(origin))) if origin == partner => continue,
                    Ok((p, _)) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => SharePath::root(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Response::Changed { share: name.clone(), path }).await.is_err() {
                    return;
                }
            }
        });
        lock(&self.watches).push(task.abort_handle());
        tracing::info!(partner = %self.partner, %share, "watching");
        Ok(Response::Watching { share })
    }

    fn discover(&self) -> Response {
        let mut rows = Vec::new();
        for config in &self.node.config.shares {
            let Some(access) = crate::share::access(config, &self.partner) else { continue };
            match Share::new(config).summary() {
                Ok((kind, size, mtime_ns)) => rows.push(ShareRow { name: config.name.clone(), kind, size, access, mtime_ns }),
                Err(e) => tracing::warn!(share = %config.name, "share unavailable: {e}"),
            }
        }
        Response::Files(rows)
    }

    async fn describe(&self, share: &Name, path: &SharePath) -> Result<Response, Response> {
        tracing::debug!(partner = %self.partner, %share, %path, "describe");
        let s = self.readable(share)?;
        let real = s.resolve_file(path).map_err(share_err)?;
        let manifest = self.manifest_of(real).await?;
        let entry = self.shown(share, s.stat(path).map_err(share_err)?);
        Ok(Response::FileInfo {
            share: share.clone(),
            path: path.clone(),
            size: manifest.size,
            file_hash: manifest.file_hash,
            mtime_ns: entry.mtime_ns,
            mode: entry.mode,
            chunks: manifest_to_lines(&manifest),
        })
    }

    /// DESCRIBE_PART: the chunk lines of the manifest that hold any byte
    /// of `[offset, offset + length)`, with the whole manifest's head.
    async fn describe_part(&self, share: &Name, path: &SharePath, offset: u64, length: u64) -> Result<Response, Response> {
        tracing::debug!(partner = %self.partner, %share, %path, offset, length, "describe part");
        let s = self.readable(share)?;
        let real = s.resolve_file(path).map_err(share_err)?;
        let manifest = self.manifest_of(real).await?;
        let entry = self.shown(share, s.stat(path).map_err(share_err)?);
        let end = offset.saturating_add(length);
        let first = manifest.chunks.partition_point(|c| c.end() <= offset);
        let last = manifest.chunks.partition_point(|c| c.offset < end).max(first);
        let last = if length == 0 { first } else { last };
        let lines = (first..last).zip(&manifest.chunks[first..last]);
        Ok(Response::FilePart(FilePart {
            share: share.clone(),
            path: path.clone(),
            size: manifest.size,
            total: manifest.chunks.len() as u32,
            file_hash: manifest.file_hash,
            mtime_ns: entry.mtime_ns,
            mode: entry.mode,
            first: first as u32,
            chunks: lines.map(|(i, c)| ChunkLine { index: i as u32, offset: c.offset, size: c.len, hash: c.hash }).collect(),
        }))
    }

    /// AHEAD (PROTOCOL.md 8.6): the next chunks of a file still being
    /// written; answered with those to send.
    async fn ahead(&self, ahead_id: Name, share: Name, path: SharePath, first: u32, lines: Vec<ChunkLine>) -> Result<Response, Response> {
        if !self.ahead.load(Ordering::SeqCst) {
            return Err(err(ErrorCode::BadRequest, "AHEAD needs capability AHEAD, which you did not name"));
        }
        let s = self.writable(&share)?;
        self.unleased(&share, &path)?;
        let target = s.resolve_target(&path).map_err(share_err)?;
        let key = (self.partner.clone(), ahead_id.clone());
        let now = std::time::Instant::now();
        let ahead = {
            let mut all = lock(&self.node.aheads);
            let held = all.keys().filter(|(p, _)| *p == self.partner).count();
            match all.get_mut(&key) {
                Some((a, _)) if a.target() != target => {
                    return Err(err(ErrorCode::BadRequest, format!("ahead {ahead_id} is for another path than {path}")));
                }
                Some((a, used)) => {
                    *used = now;
                    a.clone()
                }
                None if first != 0 => {
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!("no chunks sent ahead as {ahead_id} (unknown, used, or idle for too long): start again at FROM:0"),
                    ));
                }
                None if held >= MAX_AHEADS => {
                    return Err(err(ErrorCode::Busy, format!("you have {MAX_AHEADS} files of chunks sent ahead already; push them first")));
                }
                None => {
                    let a = Arc::new(Ahead::create(&target, ahead_id.as_str()).map_err(|e| err(assemble_code(&e), e.to_string()))?);
                    all.insert(key.clone(), (a.clone(), now));
                    forget_when_idle(self.node.clone(), key);
                    a
                }
            }
        };
        let chunks: Vec<crate::chunk::ChunkRef> =
            lines.iter().map(|l| crate::chunk::ChunkRef { offset: l.offset, len: l.size, hash: l.hash }).collect();
        let sibling = crate::lease::covering_names(&path).into_iter().skip(1).find_map(|p| s.resolve_file(&p).ok());
        let node = self.node.clone();
        let bytes: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        let need = crate::transfer::blocking_io(bytes, move || {
            let params = &node.config.storage.chunk;
            // Chunks the target's current version (or, for a new name saved
            // beside a file, that file) has are copied, not sent.
            let from = [Some(target.clone()), sibling].into_iter().flatten().find(|p| p.is_file());
            let base = from.and_then(|p| crate::index::manifest_for(&node.db, &p, params).ok().map(|m| (p, m)));
            ahead.declare(first, &chunks, base.as_ref().map(|(p, m)| (p.as_path(), m)))
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| err(if matches!(e, AssembleError::Ahead(_)) { ErrorCode::BadRequest } else { assemble_code(&e) }, e.to_string()))?;
        tracing::debug!(partner = %self.partner, %share, %path, %ahead_id, first, chunks = lines.len(), need = need.len(), "chunks ahead declared");
        Ok(Response::TransferAccepted { transfer_id: ahead_id, window: self.window, need: need.into_iter().collect() })
    }

    async fn begin(self: Arc<Self>, push: Push) -> Result<Response, Response> {
        let Push { transfer_id, share, path, size, file_hash, base, fence, mode, mtime_ns, manifest, ahead } = push;
        let s = self.writable(&share)?;
        self.unleased(&share, &path)?;
        if let Some(token) = fence {
            if !self.node.leases.fence_ok(&share, &path, token) {
                tracing::warn!(target: "audit", partner = %self.partner, %share, %path, token, "refused push: a newer lease was granted since");
                return Err(err(
                    ErrorCode::Conflict,
                    format!("{path}: a newer lease than yours (token {token}) was granted since; save your change under another name"),
                ));
            }
        }
        let bad_manifest = |e: super::TransferError| err(ErrorCode::BadRequest, e.to_string());
        // A whole manifest is checked now; one relative to the base version
        // once that version's manifest is at hand, below.
        let manifest = match manifest {
            PushManifest::Whole(chunks) => Ok(manifest_from_lines(size, file_hash, &chunks, self.partner.as_str()).map_err(bad_manifest)?),
            PushManifest::Relative { .. } if !self.same.load(Ordering::SeqCst) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "LINES (a manifest relative to the base) needs capability SAME, which you did not name",
                ));
            }
            PushManifest::Relative { chunks, lines } => Err((chunks, lines)),
        };
        if lock(&self.incoming).contains_key(&transfer_id) {
            return Err(err(ErrorCode::BadRequest, format!("transfer {transfer_id} already started")));
        }
        let target = s.resolve_target(&path).map_err(share_err)?;
        let Some(busy) = BusyGuard::claim(&self.node, &target, &self.partner) else {
            return Err(err(ErrorCode::Busy, format!("{path}: another partner's transfer is writing this file; try again when it ends")));
        };
        // Chunks are reused from the target's current version or, for a
        // new name saved beside a file (`x.blend@`), from that file.
        let sibling = crate::lease::covering_names(&path).into_iter().skip(1).find_map(|p| s.resolve_file(&p).ok());
        let node = self.node.clone();
        let (p2, t2) = (path.clone(), target.clone());
        let partner = self.partner.clone();
        // A small push, next to a small or no current version, is made
        // ready here: a hand-off to the blocking pool and back costs more
        // than creating its temp file (tar x pushes thousands in a row).
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let touched = size.saturating_add(len(&target)).saturating_add(sibling.as_deref().map_or(0, len));
        let prepared = crate::transfer::blocking_io(touched, move || {
            let params = &node.config.storage.chunk;
            let stamped = if t2.is_file() { crate::index::manifest_stamped(&node.db, &t2, params).ok() } else { None };
            let (current, base_stamp) = stamped.map_or((None, None), |(m, s)| (Some(m), Some(s)));
            check_base(&p2, base, file_hash, current.as_ref().map(|c| c.file_hash), t2.exists())?;
            let m = match manifest {
                Ok(m) => m,
                // BASE named the current version, whose manifest this is:
                // the relative lines expand against it, and the result must
                // hash to HASH like any manifest.
                Err((chunks, lines)) => {
                    let Some(base) = current.as_ref() else {
                        return Err(err(ErrorCode::Conflict, format!("{p2}: no current version to give the manifest relative to")));
                    };
                    manifest_from_relative(size, file_hash, chunks, &lines, base, partner.as_str()).map_err(bad_manifest)?
                }
            };
            let from = match (&current, sibling) {
                (Some(c), _) => Some((t2.clone(), c.clone())),
                (None, Some(f)) => crate::index::manifest_for(&node.db, &f, params).ok().map(|m| (f, m)),
                (None, None) => None,
            };
            let storage = &node.config.storage;
            let patching = base_stamp.filter(|_| storage.patch_in_place).map(|base_stamp| Patching {
                journals: crate::transfer::patch::journal_dir(&node.home),
                min: storage.patch_min,
                base_stamp,
                mtime_ns,
            });
            let from = from.as_ref().map(|(p, m)| (p.as_path(), m));
            let prepared = Assembly::prepare_from(&t2, m.clone(), from, patching.as_ref(), ahead.as_deref()).map_err(|e| {
                // Disk full is BUSY (PROTOCOL.md 11): the client may retry once space is freed.
                err(assemble_code(&e), e.to_string())
            })?;
            Ok((prepared, m))
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))??;
        let (prepared, manifest) = prepared;
        let need: RangeSet = prepared.needed().into_iter().collect();
        tracing::info!(partner = %self.partner, %share, %path, %transfer_id, chunks = manifest.chunks.len(), need = need.len(), reused = prepared.reused_bytes, "push accepted");
        let incoming = Arc::new(Incoming {
            share,
            path,
            base,
            mode,
            mtime_ns,
            assembly: Mutex::new(Some(Arc::new(prepared))),
            manifest,
            started: Timestamp::now(),
            bytes: AtomicU64::new(0),
            chunks: AtomicU32::new(0),
            nacks: AtomicU32::new(0),
            _busy: busy,
        });
        lock(&self.incoming).insert(transfer_id.clone(), incoming.clone());
        let accepted = Response::TransferAccepted { transfer_id: transfer_id.clone(), window: self.window, need: need.clone() };
        if need.is_empty() {
            // Everything is already here: answer, then complete at once.
            let _ = self.tx.send(accepted).await;
            return Ok(self.complete_push(&transfer_id, &incoming).await);
        }
        Ok(accepted)
    }

    /// The answer to the BEGIN_TRANSFER or AHEAD of `id`. With EAGER, the
    /// chunk streams of `id` that came first wait until it is on its way:
    /// their acknowledgements must not overtake it.
    async fn answer_before_chunks(&self, id: Name, answer: Response) -> Option<Response> {
        if !self.eager.load(Ordering::SeqCst) {
            return Some(answer);
        }
        let _ = self.tx.send(answer).await;
        self.settle(id);
        None
    }

    /// The BEGIN_TRANSFER of push `id` is answered: its chunks that came
    /// first may go on.
    fn settle(&self, id: Name) {
        let mut settled = lock(&self.settled);
        if settled.len() >= SETTLED_IDS {
            settled.pop_front();
        }
        settled.push_back(id);
        drop(settled);
        self.settled_now.notify_waiters();
    }

    /// With EAGER, wait (at most [`EAGER_WAIT`]) until the BEGIN_TRANSFER
    /// of push `id` is answered. False if it never was.
    async fn settled(&self, id: &Name) -> bool {
        let deadline = tokio::time::Instant::now() + EAGER_WAIT;
        loop {
            let wake = self.settled_now.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if lock(&self.settled).contains(id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return false;
            }
        }
    }

    /// All chunks of a push are in: make the file durable, sign, record.
    async fn complete_push(&self, transfer_id: &Name, incoming: &Incoming) -> Response {
        let assembly = lock(&incoming.assembly).take();
        lock(&self.incoming).remove(transfer_id);
        let Some(assembly) = assembly else { return err(ErrorCode::Internal, "transfer already completed") };
        if let Err(refused) = self.unleased(&incoming.share, &incoming.path) {
            return refused;
        }
        let (node, base, share_path) = (self.node.clone(), incoming.base, incoming.path.clone());
        let (mode, mtime_ns, version) = (incoming.mode, incoming.mtime_ns, incoming.manifest.file_hash);
        let finished = tokio::task::spawn_blocking(move || {
            // A local edit may have landed while the chunks travelled.
            let target = assembly.target().to_path_buf();
            if base != proto::Base::Any {
                let current =
                    if target.is_file() { crate::index::manifest_for(&node.db, &target, &node.config.storage.chunk).ok() } else { None };
                check_base(&share_path, base, version, current.map(|c| c.file_hash), target.exists())?;
            }
            // A patch changes the file in place, maybe keeping its size and
            // mtime: its index row goes first, lest a crash leave it
            // describing the old content.
            if assembly.patches() {
                crate::index::forget(&node.db, &target);
            }
            let path = assembly.finish(mode, mtime_ns).map_err(|e| {
                if e.is_changed() {
                    tracing::warn!(path = %target.display(), "push not placed: {e}");
                    return err(ErrorCode::Conflict, format!("{share_path} changed here while the push arrived; nothing was replaced"));
                }
                if e.is_not_found() {
                    // Someone here moved or removed the directory while the
                    // chunks travelled: nothing was replaced, and a push
                    // again (a write-back makes a conflict copy) recreates
                    // the directory.
                    tracing::warn!(path = %target.display(), "push not placed: its directory was moved or removed meanwhile ({e})");
                    return err(
                        ErrorCode::Conflict,
                        format!("the directory of {share_path} was moved or removed here while the push arrived; nothing was replaced"),
                    );
                }
                tracing::error!(path = %target.display(), "assembly failed: {e}");
                // Disk full is BUSY (PROTOCOL.md 11), as at BEGIN_TRANSFER.
                err(assemble_code(&e), e.to_string())
            })?;
            Ok((path, assembly.finished_meta().cloned()))
        })
        .await;
        let (path, meta) = match finished {
            Ok(Ok(p)) => p,
            Ok(Err(refused)) => return refused,
            Err(e) => return err(ErrorCode::Internal, e.to_string()),
        };
        // Stamped before the rename: a local change since makes the poller
        // announce it anyway. As the poller's listing will show it (see
        // Watchers::notify_file).
        match &meta {
            Some(m) => {
                self.node.watchers.notify_file(&incoming.share, &incoming.path, Some(&self.partner), m.len(), crate::share::mtime_ns(m))
            }
            None => self.node.watchers.notify(&incoming.share, &incoming.path, Some(&self.partner)),
        }
        let facts = Facts {
            transfer_id,
            direction: "push",
            share: incoming.share.as_str(),
            path: incoming.path.as_str(),
            manifest: &incoming.manifest,
            sender: party(self.partner.as_str(), &self.peer_cert),
            receiver: party(self.node.config.node.name.as_str(), self.node.identity.cert_der()),
            started: incoming.started,
            bytes_sent: incoming.bytes.load(Ordering::SeqCst),
            chunks_sent: incoming.chunks.load(Ordering::SeqCst),
            retransmissions: incoming.nacks.load(Ordering::SeqCst),
        };
        let (receipt, completion) = facts.sign(&self.node.identity);
        let stored = self.node.receipts.store(receipt, &self.node.home);
        if let Err(e) = &stored {
            tracing::error!("storing receipt of {transfer_id}: {e}");
        }
        tracing::info!(target: "audit", partner = %self.partner, share = %incoming.share, path = %incoming.path, %transfer_id, file = %path.display(), "push complete");
        // Every chunk checked against its hash: the next look at the file
        // (a DESCRIBE, the base of the next push) need not cut it again.
        // Indexed in the history row's transaction: one commit a push.
        let indexed = meta.as_ref().map(|m| (path.as_path(), m, &incoming.manifest));
        self.record(&facts, "push", stored.ok(), indexed);
        Response::TransferComplete(completion)
    }

    /// The history row of a transfer, and (`indexed`) the index row of the
    /// file it placed, in one transaction.
    fn record(
        &self,
        facts: &Facts<'_>,
        direction: &str,
        receipt: Option<PathBuf>,
        indexed: Option<(&std::path::Path, &std::fs::Metadata, &Manifest)>,
    ) {
        let rec = TransferRecord {
            id: facts.transfer_id.to_string(),
            direction: direction.into(),
            role: "server".into(),
            partner: self.partner.to_string(),
            share: facts.share.to_string(),
            path: facts.path.to_string(),
            file_hash: facts.manifest.file_hash.to_string(),
            bytes_total: facts.manifest.size,
            bytes_sent: facts.bytes_sent,
            chunks_total: facts.manifest.chunks.len() as u32,
            chunks_sent: facts.chunks_sent,
            retransmissions: facts.retransmissions,
            started_ns: facts.started.0,
            finished_ns: Timestamp::now().0,
            status: "ok".into(),
            error: None,
            receipt: receipt.map(|p| p.display().to_string()),
        };
        let db = self.node.db();
        // Without the transaction each row would commit on its own: still
        // recorded, one commit more.
        let tx = db.unchecked_transaction();
        if let Some((path, meta, manifest)) = indexed {
            if let Err(e) = crate::index::record_in(&db, path, meta, &self.node.config.storage.chunk, manifest) {
                tracing::debug!(path = %path.display(), "not indexed: {e}");
            }
        }
        if let Err(e) = crate::db::record_transfer(&db, &rec) {
            tracing::warn!("recording transfer {}: {e}", rec.id);
        }
        if let Ok(tx) = tx {
            if let Err(e) = tx.commit() {
                tracing::warn!("recording transfer {}: {e}", rec.id);
            }
        }
    }

    /// Serve chunks of a file: each on its own stream, a window at a time.
    async fn get(
        self: Arc<Self>,
        transfer_id: Name,
        share: Name,
        path: SharePath,
        file_hash: crate::hash::Hash,
        chunks: RangeSet,
    ) -> Result<(), Response> {
        let s = self.readable(&share)?;
        let real = s.resolve_file(&path).map_err(share_err)?;
        let existing = lock(&self.outgoing).get(&transfer_id).cloned();
        let outgoing = match existing {
            Some(o) if o.share == share && o.path == path && o.manifest.file_hash == file_hash => o,
            Some(_) => return Err(err(ErrorCode::BadRequest, format!("transfer {transfer_id} was about another file"))),
            None => {
                let manifest = self.manifest_of(real.clone()).await?;
                if manifest.file_hash != file_hash {
                    return Err(err(ErrorCode::Stale, format!("{path} changed: it is now {}; describe it again", manifest.file_hash)));
                }
                let o = Arc::new(Outgoing {
                    share,
                    path,
                    manifest,
                    started: Timestamp::now(),
                    bytes: AtomicU64::new(0),
                    chunks: AtomicU32::new(0),
                    corrupted: Default::default(),
                });
                let mut outgoing = lock(&self.outgoing);
                if outgoing.len() >= MAX_OUTGOING {
                    if let Some(oldest) = outgoing.iter().min_by_key(|(_, o)| o.started.0).map(|(k, _)| k.clone()) {
                        outgoing.remove(&oldest);
                    }
                }
                outgoing.insert(transfer_id.clone(), o.clone());
                o
            }
        };
        let count = outgoing.manifest.chunks.len();
        if chunks.iter().any(|i| i as usize >= count) {
            return Err(err(ErrorCode::BadRequest, format!("the file has {count} chunks")));
        }
        let file = Arc::new(std::fs::File::open(&real).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err(ErrorCode::NotFound, format!("{} was removed or renamed just now", outgoing.path)),
            _ => err(ErrorCode::Internal, e.to_string()),
        })?);
        let session = self.clone();
        tokio::spawn(async move {
            for index in chunks.iter() {
                let Ok(permit) = session.send_permits.clone().acquire_owned().await else { return };
                let (session, file, outgoing, transfer_id) = (session.clone(), file.clone(), outgoing.clone(), transfer_id.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = session.send_chunk(&file, &outgoing, &transfer_id, index).await {
                        let _ = session.tx.send(e).await;
                    }
                });
            }
        });
        Ok(())
    }

    async fn send_chunk(&self, file: &Arc<std::fs::File>, outgoing: &Outgoing, transfer_id: &Name, index: u32) -> Result<(), Response> {
        let Some(chunk) = outgoing.manifest.chunks.get(index as usize).copied() else { return Ok(()) };
        let f = file.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; chunk.len as usize];
            f.read_exact_at(&mut buf, chunk.offset).map(|_| buf)
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| match e.kind() {
            // Shortened in place since the manifest was made.
            std::io::ErrorKind::UnexpectedEof => {
                err(ErrorCode::Stale, format!("{} changed during the transfer (it is shorter now); run it again", outgoing.path))
            }
            _ => err(ErrorCode::Internal, e.to_string()),
        })?;
        let mut data = data;
        if crate::hash::Hash::of(&data) != chunk.hash {
            return Err(err(ErrorCode::Stale, format!("{} changed during the transfer (chunk {index}); run it again", outgoing.path)));
        }
        if fault::corrupt_chunk() == Some(index) && !outgoing.corrupted.swap(true, Ordering::SeqCst) {
            if let Some(b) = data.first_mut() {
                *b ^= 0xff;
            }
        }
        let header = DataHeader::ChunkData { transfer_id: transfer_id.clone(), index, size: chunk.len, hash: chunk.hash };
        let mut stream = self.conn.open_uni().await.map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        // Earlier chunks first: the streams of a GET would otherwise share
        // the link, and the read waiting for the first chunk of a file
        // would wait for all the readahead asked with it.
        let _ = stream.set_priority(-(index.min(i32::MAX as u32) as i32));
        stream.write_all(header.encode().as_bytes()).await.map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        // Handed over, not copied into the stream's buffer.
        stream.write_chunk(bytes::Bytes::from(data)).await.map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        let _ = stream.finish();
        outgoing.bytes.fetch_add(chunk.len as u64, Ordering::SeqCst);
        outgoing.chunks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The client received a pulled file and signs for it.
    fn pull_receipt(&self, c: Completion) -> Response {
        let Some(outgoing) = lock(&self.outgoing).remove(&c.transfer_id) else {
            return err(ErrorCode::UnknownTransfer, format!("no pull {} in this session", c.transfer_id));
        };
        let facts = Facts {
            transfer_id: &c.transfer_id,
            direction: "pull",
            share: outgoing.share.as_str(),
            path: outgoing.path.as_str(),
            manifest: &outgoing.manifest,
            sender: party(self.node.config.node.name.as_str(), self.node.identity.cert_der()),
            receiver: party(self.partner.as_str(), &self.peer_cert),
            started: outgoing.started,
            bytes_sent: outgoing.bytes.load(Ordering::SeqCst),
            chunks_sent: outgoing.chunks.load(Ordering::SeqCst),
            retransmissions: 0,
        };
        let Some(receipt) = facts.check(&c, &self.peer_cert) else {
            tracing::warn!(target: "audit", partner = %self.partner, transfer_id = %c.transfer_id, "pull receipt signature does not verify");
            return err(ErrorCode::AuthFailed, "receipt signature does not verify with your certificate");
        };
        let stored = self.node.receipts.store(receipt, &self.node.home);
        if let Err(e) = &stored {
            tracing::error!("storing receipt of {}: {e}", c.transfer_id);
        }
        tracing::info!(target: "audit", partner = %self.partner, share = %outgoing.share, path = %outgoing.path, transfer_id = %c.transfer_id, "pull complete");
        self.record(&facts, "pull", stored.ok(), None);
        Response::ReceiptOk { transfer_id: c.transfer_id }
    }
}

/// BEGIN_TRANSFER's fields.
struct Push {
    transfer_id: Name,
    share: Name,
    path: SharePath,
    size: u64,
    file_hash: crate::hash::Hash,
    base: proto::Base,
    fence: Option<u64>,
    mode: Option<u32>,
    mtime_ns: Option<i64>,
    manifest: PushManifest,
    /// Chunks sent ahead that the push named (AHEAD).
    ahead: Option<Arc<Ahead>>,
}

/// BUSY for a change refused because `lease` is held by another node.
fn held(lease: &crate::lease::Lease) -> Response {
    err(
        ErrorCode::Busy,
        format!(
            "{} is locked by {} ({}) until {}: try again when it is released",
            lease.path,
            lease.holder,
            lease.owner,
            Timestamp(lease.expires_ns).rfc3339()
        ),
    )
}

/// Refuse a push whose base is no longer the target's version, unless the
/// target already is the version pushed (`incoming`): a push sent again
/// after it landed (its sender was killed before it saw the receipt) then
/// replaces nothing that differs, and must not become a conflict copy.
fn check_base(
    path: &SharePath,
    base: proto::Base,
    incoming: crate::hash::Hash,
    current: Option<crate::hash::Hash>,
    exists: bool,
) -> Result<(), Response> {
    let conflict = |why: String| Err(err(ErrorCode::Conflict, format!("{path}: {why}; nothing was replaced")));
    if current == Some(incoming) {
        return Ok(());
    }
    match base {
        proto::Base::Any => Ok(()),
        proto::Base::Absent if exists => conflict("it was created here meanwhile".into()),
        proto::Base::Absent => Ok(()),
        proto::Base::Version(want) => match current {
            Some(have) if have == want => Ok(()),
            Some(have) => conflict(format!("it changed here since you read it (now {have})")),
            None => conflict("it was removed here since you read it".into()),
        },
    }
}

/// File operations and leases.
impl Session {
    /// Refuse a change to `path` while another node holds a lease on it.
    fn unleased(&self, share: &Name, path: &SharePath) -> Result<(), Response> {
        match self.node.leases.check_write(share, path, &self.partner, Timestamp::now().0) {
            Ok(()) => Ok(()),
            Err(lease) => {
                tracing::info!(target: "audit", partner = %self.partner, %share, %path, holder = %lease.holder, "refused change: leased");
                Err(held(&lease))
            }
        }
    }

    /// An entry as this partner sees it: write bits cleared while another
    /// node holds a lease on it.
    fn shown(&self, share: &Name, mut e: proto::Entry) -> proto::Entry {
        if e.kind == proto::EntryKind::File && self.node.leases.check_write(share, &e.path, &self.partner, Timestamp::now().0).is_err() {
            e.mode &= !0o222;
        }
        e
    }

    fn changed(&self, share: &Name, path: &SharePath) {
        self.node.watchers.notify(share, path, Some(&self.partner));
    }

    fn mkdir(&self, share: &Name, path: &SharePath, mode: u32) -> Result<Response, Response> {
        let s = self.writable(share)?;
        self.unleased(share, path)?;
        let entry = s.mkdir(path, mode).map_err(share_err)?;
        tracing::info!(target: "audit", partner = %self.partner, %share, %path, "mkdir");
        self.changed(share, path);
        Ok(Response::StatOk(entry))
    }

    /// Delete the chunks sent ahead for `path` or anything under it (a
    /// file or directory removed, or moved away): their temp files would
    /// keep a directory from being removed, or move with it.
    fn drop_aheads_under(&self, s: &Share, path: &SharePath) {
        let Ok(real) = s.spelled(path) else { return };
        let gone: Vec<Arc<Ahead>> = {
            let mut all = lock(&self.node.aheads);
            let keys: Vec<(Name, Name)> = all.iter().filter(|(_, (a, _))| a.target().starts_with(&real)).map(|(k, _)| k.clone()).collect();
            keys.iter().filter_map(|k| all.remove(k)).map(|(a, _)| a).collect()
        };
        for a in gone {
            a.discard();
        }
    }

    fn remove(&self, share: &Name, path: &SharePath, kind: proto::EntryKind) -> Result<Response, Response> {
        let s = self.writable(share)?;
        self.unleased(share, path)?;
        self.drop_aheads_under(&s, path);
        s.remove(path, kind).map_err(share_err)?;
        tracing::info!(target: "audit", partner = %self.partner, %share, %path, kind = kind.as_str(), "removed");
        self.changed(share, path);
        Ok(Response::Done { share: share.clone(), path: path.clone() })
    }

    fn rename(&self, share: &Name, from: &SharePath, to: &SharePath, replace: bool) -> Result<Response, Response> {
        let s = self.writable(share)?;
        self.unleased(share, from)?;
        self.unleased(share, to)?;
        self.drop_aheads_under(&s, from);
        self.drop_aheads_under(&s, to);
        s.rename(from, to, replace).map_err(share_err)?;
        tracing::info!(target: "audit", partner = %self.partner, %share, %from, %to, "renamed");
        self.changed(share, from);
        self.changed(share, to);
        Ok(Response::Done { share: share.clone(), path: to.clone() })
    }

    fn set_attr(&self, share: &Name, path: &SharePath, mode: Option<u32>, mtime_ns: Option<i64>) -> Result<Response, Response> {
        let s = self.writable(share)?;
        self.unleased(share, path)?;
        let entry = s.set_attr(path, mode, mtime_ns).map_err(share_err)?;
        // The mtime we set, read back, vouches that nobody changed the file
        // since (a local write would have set it to now).
        match mtime_ns {
            Some(t) if entry.kind == proto::EntryKind::File && entry.mtime_ns == t => {
                self.node.watchers.notify_file(share, path, Some(&self.partner), entry.size, entry.mtime_ns)
            }
            _ => self.changed(share, path),
        }
        Ok(Response::StatOk(self.shown(share, entry)))
    }

    fn lease_row(lease: &crate::lease::Lease) -> proto::LeaseRow {
        proto::LeaseRow {
            token: lease.token,
            holder: lease.holder.clone(),
            owner: lease.owner.clone(),
            since_ns: lease.since_ns,
            expires_ns: lease.expires_ns,
            path: lease.path.clone(),
        }
    }

    fn lease_err(&self, e: crate::lease::LeaseError) -> Response {
        match e {
            crate::lease::LeaseError::Held(lease) => held(&lease),
            e @ crate::lease::LeaseError::NotHeld { .. } => err(ErrorCode::NotFound, e.to_string()),
            e => err(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Only a partner that may write a share may lease in it: one that may
    /// only read must not keep the others from writing.
    fn lock(&self, share: &Name, path: &SharePath, ttl_s: u32, owner: &Name) -> Result<Response, Response> {
        self.writable(share)?;
        let ttl = i64::from(ttl_s) * 1_000_000_000;
        let lease = self
            .node
            .leases
            .acquire(&self.node.db(), share, path, &self.partner, owner, ttl, Timestamp::now().0)
            .map_err(|e| self.lease_err(e))?;
        tracing::info!(target: "audit", partner = %self.partner, %share, %path, %owner, token = lease.token, "lease granted");
        self.changed(share, path);
        Ok(Response::Locked { share: share.clone(), lease: Self::lease_row(&lease) })
    }

    fn renew(&self, share: &Name, path: &SharePath, token: u64, ttl_s: u32) -> Result<Response, Response> {
        self.share(share)?;
        let ttl = i64::from(ttl_s) * 1_000_000_000;
        let lease = self
            .node
            .leases
            .renew(&self.node.db(), share, path, &self.partner, token, ttl, Timestamp::now().0)
            .map_err(|e| self.lease_err(e))?;
        Ok(Response::Locked { share: share.clone(), lease: Self::lease_row(&lease) })
    }

    fn unlock(&self, share: &Name, path: &SharePath, token: u64) -> Result<Response, Response> {
        self.share(share)?;
        self.node.leases.release(&self.node.db(), share, path, &self.partner, token, Timestamp::now().0).map_err(|e| self.lease_err(e))?;
        tracing::info!(target: "audit", partner = %self.partner, %share, %path, token, "lease released");
        self.changed(share, path);
        Ok(Response::Unlocked { share: share.clone(), path: path.clone() })
    }

    fn locks(&self, share: &Name) -> Result<Response, Response> {
        self.share(share)?;
        let config = self.node.config.share(share.as_str()).ok_or_else(|| share_err(ShareError::Unknown(share.to_string())))?;
        let leases = self.node.leases.list(share, Timestamp::now().0).iter().map(Self::lease_row).collect();
        Ok(Response::Leases { share: share.clone(), lockable: config.lockable.clone(), leases })
    }
}

impl Session {
    /// This partner's chunks sent ahead as `id`, if still there.
    fn ahead_named(&self, id: &Name) -> Option<Arc<Ahead>> {
        lock(&self.node.aheads).get(&(self.partner.clone(), id.clone())).map(|(a, _)| a.clone())
    }
}

/// Forget (and delete) the chunks sent ahead as `key` once no AHEAD has
/// used them for [`AHEAD_IDLE`], unless a push took them first.
fn forget_when_idle(node: Arc<Node>, key: (Name, Name)) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(AHEAD_IDLE).await;
            let mut all = lock(&node.aheads);
            match all.get(&key) {
                Some((_, used)) if used.elapsed() >= AHEAD_IDLE => {
                    tracing::debug!(partner = %key.0, ahead_id = %key.1, "chunks sent ahead and never pushed: deleted");
                    all.remove(&key);
                    return;
                }
                Some(_) => {}
                None => return,
            }
        }
    });
}

/// Where a PUT stream's chunk goes.
enum Dest {
    Push(Arc<Incoming>, Arc<Assembly>),
    Ahead(Arc<Ahead>),
}

/// Accept PUT streams for this session's pushes.
async fn accept_puts(session: Arc<Session>) {
    while let Ok(stream) = session.conn.accept_uni().await {
        let session = session.clone();
        tokio::spawn(async move { session.receive_put(stream).await });
    }
}

impl Session {
    async fn receive_put(self: Arc<Self>, stream: quinn::RecvStream) {
        let mut reader = tokio::io::BufReader::with_capacity(4096, stream);
        let mut line = Vec::new();
        let header = match crate::transport::read_line(&mut reader, &mut line).await {
            Ok(Some(Ok(text))) => DataHeader::parse(&text),
            _ => return,
        };
        let Ok(DataHeader::Put { transfer_id, index, size, .. }) = header else {
            let _ = self.tx.send(err(ErrorCode::BadRequest, "expected a PUT chunk stream")).await;
            return;
        };
        let eager = self.eager.load(Ordering::SeqCst);
        if eager && !self.settled(&transfer_id).await {
            tracing::debug!(partner = %self.partner, %transfer_id, "chunk of a push never begun: dropped");
            return;
        }
        let incoming = lock(&self.incoming).get(&transfer_id).cloned();
        let dest = match incoming {
            Some(incoming) => {
                let Some(assembly) = lock(&incoming.assembly).clone() else { return };
                Dest::Push(incoming, assembly)
            }
            None => match self.ahead_named(&transfer_id) {
                Some(ahead) => Dest::Ahead(ahead),
                // Sent before NEED said it was not needed: the push was
                // refused, or completed without it (PROTOCOL.md 8.3); or
                // chunks ahead a push has taken since.
                None if eager => return,
                None => {
                    let _ = self.tx.send(err(ErrorCode::UnknownTransfer, format!("no push {transfer_id} in this session"))).await;
                    return;
                }
            },
        };
        let chunk = match &dest {
            Dest::Push(_, assembly) => assembly.manifest().chunks.get(index as usize).copied(),
            Dest::Ahead(ahead) => ahead.chunk(index),
        };
        let Some(chunk) = chunk else {
            let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status: AckStatus::Error("BAD_REQUEST".into()) }).await;
            return;
        };
        if size != chunk.len {
            let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status: AckStatus::Error("BAD_LENGTH".into()) }).await;
            return;
        }
        // Its share of the session's receive budget, before any allocation.
        let units = (size as usize).div_ceil(RECEIVE_UNIT).clamp(1, RECEIVE_BUDGET / RECEIVE_UNIT) as u32;
        let Ok(_permit) = self.receive_permits.clone().acquire_many_owned(units).await else { return };
        let mut data = crate::direct::Landing::new(chunk.offset, size as usize);
        // Exactly SIZE bytes, then the end of the stream (PROTOCOL.md 7):
        // a stream longer or shorter than it said is refused, not trimmed.
        let mut got = 0;
        let exact = loop {
            let buf = data.bytes_mut();
            if got == buf.len() {
                let mut probe = [0u8; 1];
                break matches!(tokio::time::timeout(STREAM_IDLE, tokio::io::AsyncReadExt::read(&mut reader, &mut probe)).await, Ok(Ok(0)));
            }
            match tokio::time::timeout(STREAM_IDLE, tokio::io::AsyncReadExt::read(&mut reader, &mut buf[got..])).await {
                Ok(Ok(0)) => break false,
                Ok(Ok(n)) => got += n,
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(partner = %self.partner, %transfer_id, index, "chunk stream idle for {} s: dropped", STREAM_IDLE.as_secs());
                    let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status: AckStatus::Error("TIMEOUT".into()) }).await;
                    return;
                }
            }
        };
        if !exact {
            let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status: AckStatus::Error("BAD_LENGTH".into()) }).await;
            return;
        }
        let (incoming, assembly) = match dest {
            Dest::Push(incoming, assembly) => (incoming, assembly),
            Dest::Ahead(ahead) => {
                let written = crate::transfer::blocking_io(size as u64, move || ahead.write_chunk(index, data.bytes())).await;
                let status = match written {
                    Ok(Ok(())) => AckStatus::Ok,
                    Ok(Err(AssembleError::HashMismatch { .. })) => AckStatus::Error("HASH_MISMATCH".into()),
                    Ok(Err(e)) => {
                        tracing::debug!(%transfer_id, index, "chunk sent ahead not stored: {e}");
                        AckStatus::Error("INTERNAL".into())
                    }
                    Err(_) => AckStatus::Error("INTERNAL".into()),
                };
                let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status }).await;
                return;
            }
        };
        incoming.bytes.fetch_add(size as u64, Ordering::SeqCst);
        incoming.chunks.fetch_add(1, Ordering::SeqCst);
        let a = assembly.clone();
        let written = crate::transfer::blocking_io(size as u64, move || a.write_chunk(index, data.bytes())).await;
        drop(assembly);
        let status = match written {
            Ok(Ok(Written::Complete)) => {
                let _ = self.tx.send(Response::ChunkAck { transfer_id: transfer_id.clone(), index, status: AckStatus::Ok }).await;
                let done = self.complete_push(&transfer_id, &incoming).await;
                let _ = self.tx.send(done).await;
                return;
            }
            Ok(Ok(_)) => AckStatus::Ok,
            Ok(Err(AssembleError::HashMismatch { .. })) => {
                incoming.nacks.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(partner = %self.partner, %transfer_id, index, "chunk hash mismatch");
                AckStatus::Error("HASH_MISMATCH".into())
            }
            Ok(Err(e)) => {
                tracing::error!(%transfer_id, index, "storing chunk: {e}");
                AckStatus::Error("INTERNAL".into())
            }
            Err(_) => AckStatus::Error("INTERNAL".into()),
        };
        let _ = self.tx.send(Response::ChunkAck { transfer_id, index, status }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;

    #[test]
    fn a_push_of_the_version_already_there_is_no_conflict() {
        let path = SharePath::parse("k.txt").unwrap();
        let (mine, theirs) = (Hash([1; 32]), Hash([2; 32]));
        // A new file's push sent again after it landed.
        assert!(check_base(&path, proto::Base::Absent, mine, Some(mine), true).is_ok());
        // Another version there: refused, whatever the base.
        assert!(check_base(&path, proto::Base::Absent, mine, Some(theirs), true).is_err());
        assert!(check_base(&path, proto::Base::Version(theirs), mine, Some(theirs), true).is_ok());
        assert!(check_base(&path, proto::Base::Version(Hash([3; 32])), mine, Some(theirs), true).is_err());
        assert!(check_base(&path, proto::Base::Version(theirs), mine, None, false).is_err());
        // An edit whose result someone else already made.
        assert!(check_base(&path, proto::Base::Version(Hash([3; 32])), mine, Some(mine), true).is_ok());
    }
}
