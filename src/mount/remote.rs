//! A mount's link to the partner that serves it.
//!
//! Three kinds of connection, each authenticated on its own (PROTOCOL.md
//! section 3):
//!
//! - **metadata**: request, then response, one at a time (DISCOVER, LIST,
//!   STAT, DESCRIBE);
//! - **data**: GETs only. Many partial pulls are multiplexed on it, one
//!   transfer id per file version; chunks arrive on their own streams and are
//!   verified and stored in the [`ChunkStore`] before anyone waiting for them
//!   is woken. Because the connection carries nothing but GETs, an ERROR on
//!   it can only be about a GET, and fails every fetch pending on it;
//! - **watch** (see [`Remote::watch`]): WATCH, then the server's CHANGED
//!   lines.
//!
//! Connections are made on demand and remade after a failure, so a partner
//! that comes back is used again without remounting. Every wait is bounded
//! by the mount's offline wait (a short try while the partner is known to be
//! offline): past it, the caller gets [`RemoteError::Offline`] and decides
//! what to serve instead. A fetch whose chunks are late while other chunks
//! keep arriving waits on: the partner is slow, not unreachable.
//!
//! Two readers asking for the same chunk share one fetch (`inflight`).

use crate::chunk::{ChunkRef, Manifest};
use crate::hash::Hash;
use crate::node::Node;
use crate::proto::{self, Capability, DataHeader, Entry, ErrorCode, Name, RangeSet, Request, Response, SharePath, ShareRow};
use crate::reach::Attempt;
use crate::store::ChunkStore;
use crate::transport::{read_line, Control, ControlReader, Endpoint, TransportError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    #[error("partner {partner} is unreachable: {detail}")]
    Offline { partner: String, detail: String },
    #[error("partner {partner} refused: {code}: {message}")]
    Refused { partner: String, code: &'static str, message: String },
    #[error("partner {partner} sent an unexpected answer: {got}")]
    Unexpected { partner: String, got: String },
    #[error("{path} changed on partner {partner} while it was open; open it again")]
    Stale { partner: String, path: String },
    #[error("chunk {hash} from partner {partner} failed: {detail}")]
    Chunk { partner: String, hash: String, detail: String },
}

impl RemoteError {
    /// The error code of a refusal, if this is one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            RemoteError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One authenticated connection with its control stream.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: ControlReader<Response>,
    /// Answers still to come to requests sent without waiting (see
    /// [`Remote::send_later`]): the partner answers in order, so the next
    /// call reads them first.
    unread: usize,
}

impl Link {
    async fn send(&mut self, req: &Request) -> Result<(), TransportError> {
        self.send.write_all(req.encode().as_bytes()).await.map_err(TransportError::from)
    }

    async fn call(&mut self, req: &Request) -> Result<Response, TransportError> {
        self.send(req).await?;
        while self.unread > 0 {
            let answer = self.reader.recv().await?;
            self.unread -= 1;
            if let Response::Error { code, message } = answer {
                tracing::debug!(?code, "a request sent without waiting was refused: {message}");
            }
        }
        self.reader.recv().await
    }
}

/// The description of one remote file version.
#[derive(Debug, Clone)]
pub struct Described {
    pub manifest: Arc<Manifest>,
    pub mtime_ns: i64,
    pub mode: u32,
}

/// What [`Remote::describe_start`] learnt: a whole manifest, or its start.
#[derive(Debug, Clone)]
pub struct Started {
    pub described: Described,
    pub complete: bool,
}

/// What the mount's status shows about the link.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LinkStats {
    pub online: bool,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
}

/// The data connection: GETs out, chunk streams in.
struct DataLink {
    conn: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    /// Transfer id per (share, path, file hash).
    transfers: Mutex<HashMap<(Name, SharePath, Hash), Name>>,
    /// Chunks asked for on this link and not yet arrived.
    pending: Mutex<HashMap<(Name, u32), Hash>>,
    dead: AtomicBool,
}

/// The largest chunk any valid manifest has (the chunk-size bound of config.toml).
const MAX_CHUNK_BYTES: u32 = 16 * 1024 * 1024;

type Waiters = Vec<oneshot::Sender<Result<(), RemoteError>>>;

pub struct Remote {
    node: Arc<Node>,
    partner: String,
    endpoint: Arc<Endpoint>,
    store: Arc<ChunkStore>,
    offline_wait: Duration,
    meta: tokio::sync::Mutex<Option<Link>>,
    data: tokio::sync::Mutex<Option<Arc<DataLink>>>,
    inflight: Mutex<HashMap<Hash, Waiters>>,
    online: AtomicBool,
    /// Set by [`Remote::close`]: links ending now are our doing.
    closing: AtomicBool,
    /// The partner named PART in its last WELCOME: it answers DESCRIBE_PART.
    parts: AtomicBool,
    last_failure: Mutex<Option<Instant>>,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    /// Bytes of chunk data read off data streams, counted as they come
    /// (a chunk whole or not): what tells a slow link from a dead one.
    bytes_arriving: AtomicU64,
}

/// How a metadata request connects ([`crate::reach`]): a change of the
/// namespace or of attributes has no answer without the partner (it is
/// not queued), so it tries even while the partner is known to be
/// unreachable; what has an answer of its own (a listing or manifest from
/// `meta.db`, a write without a lease, a lease to forget) does not wait.
fn attempt_for(req: &Request) -> Attempt {
    match req {
        Request::Remove { .. } | Request::Rename { .. } | Request::Mkdir { .. } | Request::SetAttr { .. } => Attempt::Probe,
        _ => Attempt::Request,
    }
}

impl Remote {
    pub fn new(node: Arc<Node>, partner: &str, store: Arc<ChunkStore>, offline_wait: Duration) -> Result<Arc<Remote>, RemoteError> {
        let endpoint = Endpoint::client(node.identity.clone(), node.directory.clone())
            .map_err(|e| RemoteError::Offline { partner: partner.to_string(), detail: e.to_string() })?;
        Ok(Arc::new(Remote {
            node,
            partner: partner.to_string(),
            endpoint: Arc::new(endpoint),
            store,
            offline_wait,
            meta: Default::default(),
            data: Default::default(),
            inflight: Default::default(),
            online: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            parts: AtomicBool::new(false),
            last_failure: Mutex::new(None),
            chunks_fetched: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            bytes_arriving: AtomicU64::new(0),
        }))
    }

    pub fn partner(&self) -> &str {
        &self.partner
    }

    pub fn offline_wait(&self) -> Duration {
        self.offline_wait
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            online: self.online.load(Ordering::SeqCst),
            chunks_fetched: self.chunks_fetched.load(Ordering::SeqCst),
            bytes_fetched: self.bytes_fetched.load(Ordering::SeqCst),
        }
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::SeqCst)
    }

    fn offline(&self, detail: impl std::fmt::Display) -> RemoteError {
        let was = self.online.swap(false, Ordering::SeqCst);
        *lock(&self.last_failure) = Some(Instant::now());
        if was && !self.closing.load(Ordering::SeqCst) {
            tracing::warn!(partner = %self.partner, "partner went offline: {detail}; serving cached content, reconnecting on demand");
        }
        RemoteError::Offline { partner: self.partner.clone(), detail: detail.to_string() }
    }

    fn mark_online(&self) {
        if !self.online.swap(true, Ordering::SeqCst) {
            tracing::info!(partner = %self.partner, "partner online");
        }
    }

    /// How long a request may wait: the full offline wait while the
    /// partner is believed online, a short try while it is known to be
    /// offline (listings then come from the last known state at once, and
    /// the kernel's second attempt at a failed read, right after the
    /// first, does not wait the whole offline wait again).
    fn wait(&self) -> Duration {
        if self.is_online() || lock(&self.last_failure).is_none() {
            self.offline_wait
        } else {
            self.offline_wait.min(Duration::from_secs(2))
        }
    }

    fn refusal(&self, resp: Response) -> RemoteError {
        match resp {
            Response::Error { code, message } => RemoteError::Refused { partner: self.partner.clone(), code: code.as_str(), message },
            other => RemoteError::Unexpected { partner: self.partner.clone(), got: format!("{other:?}").chars().take(200).collect() },
        }
    }

    /// A new metadata link; `attempt` as in [`crate::reach`]: a request
    /// fails at once while the partner is known to be unreachable.
    async fn connect(&self, attempt: Attempt) -> Result<Link, RemoteError> {
        let partner = self.node.config.partner(&self.partner).cloned().ok_or_else(|| RemoteError::Offline {
            partner: self.partner.clone(),
            detail: "not in config.toml: add it with `deftfs partner add`".into(),
        })?;
        let (conn, _cert) = self.node.reach.connect(&self.endpoint, &partner, attempt).await.map_err(|e| match e {
            // RemoteError::Offline says "partner X is unreachable" itself.
            TransportError::Unreachable { why, .. } => self.offline(why),
            e => self.offline(e),
        })?;
        // Closed by the partner for having too many of our connections:
        // say so rather than "connection lost".
        let watched = conn.clone();
        let closed = |e: &dyn std::fmt::Display| match crate::node::too_many_connections(&watched) {
            Some(reason) => self.offline(format!("it refused the connection: {reason}")),
            None => self.offline(e),
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| closed(&e))?;
        let (send, reader) = Control::<Response>::new(send, recv).split();
        let mut link = Link { conn, send, reader, unread: 0 };
        let storage = &self.node.config.storage;
        let hello = Request::Hello {
            version: proto::VERSION.to_string(),
            caps: vec![Capability::Chunked, Capability::Parallel, Capability::Part],
            window: storage.window,
        };
        match link.call(&hello).await.map_err(|e| closed(&e))? {
            Response::Welcome { caps, .. } => self.parts.store(caps.contains(&Capability::Part), Ordering::SeqCst),
            other => return Err(self.refusal(other)),
        }
        match link.call(&Request::Auth { partner: self.node.config.node.name.clone() }).await.map_err(|e| closed(&e))? {
            Response::AuthOk { .. } => {}
            other => return Err(self.refusal(other)),
        }
        self.mark_online();
        Ok(link)
    }

    /// One request on the metadata connection, reconnecting once if the
    /// connection we had turned out dead.
    async fn call(&self, req: Request) -> Result<Response, RemoteError> {
        let wait = self.wait();
        // Set while a connection is being made: a timeout then is a
        // failure to reach the partner, not a slow answer.
        let connecting = AtomicBool::new(false);
        let attempt = async {
            let mut guard = self.meta.lock().await;
            for fresh in [false, true] {
                let link = match guard.as_mut() {
                    Some(l) => l,
                    None => {
                        connecting.store(true, Ordering::SeqCst);
                        let link = self.connect(attempt_for(&req)).await?;
                        connecting.store(false, Ordering::SeqCst);
                        guard.insert(link)
                    }
                };
                match link.call(&req).await {
                    Ok(resp) => {
                        self.mark_online();
                        return Ok(resp);
                    }
                    Err(e) => {
                        *guard = None;
                        if fresh {
                            return Err(self.offline(e));
                        }
                    }
                }
            }
            Err(self.offline("no connection"))
        };
        match tokio::time::timeout(wait, attempt).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be wedged: start afresh next time.
                if let Ok(mut g) = self.meta.try_lock() {
                    *g = None;
                }
                let why = format!("no answer within {} s", wait.as_secs_f32());
                if connecting.load(Ordering::SeqCst) {
                    self.node.reach.failed(&self.partner, &why);
                }
                Err(self.offline(why))
            }
        }
    }

    pub async fn discover(&self) -> Result<Vec<ShareRow>, RemoteError> {
        match self.call(Request::Discover).await? {
            Response::Files(rows) => Ok(rows),
            other => Err(self.refusal(other)),
        }
    }

    pub async fn list(&self, share: &Name, path: &SharePath) -> Result<Vec<Entry>, RemoteError> {
        match self.call(Request::List { share: share.clone(), path: path.clone() }).await? {
            Response::Entries(e) => Ok(e),
            other => Err(self.refusal(other)),
        }
    }

    pub async fn stat(&self, share: &Name, path: &SharePath) -> Result<Entry, RemoteError> {
        match self.call(Request::Stat { share: share.clone(), path: path.clone() }).await? {
            Response::StatOk(e) => Ok(e),
            other => Err(self.refusal(other)),
        }
    }

    pub async fn describe(&self, share: &Name, path: &SharePath) -> Result<Described, RemoteError> {
        match self.call(Request::Describe { share: share.clone(), path: path.clone() }).await? {
            Response::FileInfo { size, file_hash, mtime_ns, mode, chunks, .. } => {
                let manifest = crate::transfer::manifest_from_lines(size, file_hash, &chunks, &self.partner)
                    .map_err(|e| RemoteError::Unexpected { partner: self.partner.clone(), got: e.to_string() })?;
                Ok(Described { manifest: Arc::new(manifest), mtime_ns, mode })
            }
            other => Err(self.refusal(other)),
        }
    }

    /// The start of the manifest of the current version of a file: its
    /// chunks from offset 0 through at least `length` bytes (DESCRIBE_PART),
    /// so that a first read need not wait for a whole large manifest.
    /// `None` when the partner does not answer DESCRIBE_PART (no PART in
    /// its WELCOME, or no metadata connection yet): ask [`Remote::describe`].
    ///
    /// The manifest returned is complete when the part held every chunk,
    /// and then checked like a DESCRIBE's. Otherwise it holds only the
    /// first chunks: its `size` and `file_hash` are the whole version's,
    /// its chunks cover less than `size`, and the file hash cannot be
    /// checked against them; [`Started::complete`] is false.
    pub async fn describe_start(&self, share: &Name, path: &SharePath, length: u64) -> Result<Option<Started>, RemoteError> {
        if !self.parts.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let req = Request::DescribePart { share: share.clone(), path: path.clone(), offset: 0, length };
        let part = match self.call(req).await? {
            Response::FilePart(part) => part,
            other => return Err(self.refusal(other)),
        };
        let unexpected = |got: String| RemoteError::Unexpected { partner: self.partner.clone(), got };
        let described = |manifest: Manifest| Described { manifest: Arc::new(manifest), mtime_ns: part.mtime_ns, mode: part.mode };
        if part.first != 0 {
            return Err(unexpected(format!("FILE_PART from chunk {} for a part from offset 0", part.first)));
        }
        if part.chunks.len() as u64 == u64::from(part.total) {
            let manifest = crate::transfer::manifest_from_lines(part.size, part.file_hash, &part.chunks, &self.partner)
                .map_err(|e| unexpected(e.to_string()))?;
            return Ok(Some(Started { described: described(manifest), complete: true }));
        }
        // The decoder checked that the lines are numbered from 0, contiguous
        // from offset 0, non-empty and within SIZE; the chunk size bound is
        // the one a whole manifest is checked against.
        if let Some(c) = part.chunks.iter().find(|c| c.size > crate::transfer::MAX_CHUNK) {
            return Err(unexpected(format!("FILE_PART chunk {} of {} bytes", c.index, c.size)));
        }
        let chunks = part.chunks.iter().map(|l| ChunkRef { offset: l.offset, len: l.size, hash: l.hash }).collect();
        let start = Manifest { size: part.size, file_hash: part.file_hash, chunks };
        Ok(Some(Started { described: described(start), complete: false }))
    }

    /// A metadata request whose answer is STAT_OK (MKDIR, SETATTR).
    pub async fn call_stat(&self, req: Request) -> Result<Entry, RemoteError> {
        match self.call(req).await? {
            Response::StatOk(e) => Ok(e),
            other => Err(self.refusal(other)),
        }
    }

    /// A metadata request whose answer is DONE (REMOVE, RENAME).
    pub async fn call_done(&self, req: Request) -> Result<(), RemoteError> {
        match self.call(req).await? {
            Response::Done { .. } => Ok(()),
            other => Err(self.refusal(other)),
        }
    }

    /// LOCK or RENEW: the lease granted.
    pub async fn call_lock(&self, req: Request) -> Result<proto::LeaseRow, RemoteError> {
        match self.call(req).await? {
            Response::Locked { lease, .. } => Ok(lease),
            other => Err(self.refusal(other)),
        }
    }

    /// Send `req` on the metadata connection without waiting for its
    /// answer, which the next call reads and drops: for a request whose
    /// answer changes nothing here (an UNLOCK after a close), so the next
    /// request (the next file's LOCK) does not wait a round trip behind it.
    /// Not sent if there is no connection now.
    pub async fn send_later(&self, req: Request) -> bool {
        let mut guard = self.meta.lock().await;
        let Some(link) = guard.as_mut() else { return false };
        match link.send(&req).await {
            Ok(()) => {
                link.unread += 1;
                true
            }
            Err(_) => {
                *guard = None;
                false
            }
        }
    }

    pub async fn unlock(&self, share: &Name, path: &SharePath, token: u64) -> Result<(), RemoteError> {
        match self.call(Request::Unlock { share: share.clone(), path: path.clone(), token }).await? {
            Response::Unlocked { .. } => Ok(()),
            other => Err(self.refusal(other)),
        }
    }

    /// The share's live leases and lockable patterns.
    pub async fn locks(&self, share: &Name) -> Result<(Vec<String>, Vec<proto::LeaseRow>), RemoteError> {
        match self.call(Request::Locks { share: share.clone() }).await? {
            Response::Leases { lockable, leases, .. } => Ok((lockable, leases)),
            other => Err(self.refusal(other)),
        }
    }

    /// Connect the data link now, in the background, so that the first
    /// read does not wait for a handshake. If it fails, the first read
    /// connects (and reports the error).
    pub fn warm_data(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.data_link().await {
                tracing::debug!(partner = %me.partner, "data link not connected ahead of use: {e}");
            }
        })
    }

    /// The data link, connecting it if needed.
    async fn data_link(self: &Arc<Self>) -> Result<Arc<DataLink>, RemoteError> {
        let mut guard = self.data.lock().await;
        if let Some(d) = guard.as_ref() {
            if !d.dead.load(Ordering::SeqCst) && d.conn.close_reason().is_none() {
                return Ok(d.clone());
            }
        }
        *guard = None;
        // A read has no answer without the partner: it tries (for the
        // bounded wait) even while the partner is known to be unreachable.
        let link = self.connect(Attempt::Probe).await?;
        let Link { conn, send, reader, .. } = link;
        let data = Arc::new(DataLink {
            conn: conn.clone(),
            send: tokio::sync::Mutex::new(send),
            transfers: Default::default(),
            pending: Default::default(),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(self.clone().read_errors(data.clone(), reader));
        tokio::spawn(self.clone().accept_chunks(data.clone()));
        *guard = Some(data.clone());
        Ok(data)
    }

    /// Make sure the chunks `indices` of `manifest` are in the store,
    /// fetching those that are not. Returns when they all are, or fails
    /// after the offline wait.
    pub async fn fetch(self: &Arc<Self>, share: &Name, path: &SharePath, manifest: &Manifest, indices: &[u32]) -> Result<(), RemoteError> {
        let mut waits = Vec::new();
        let mut ask = RangeSet::new();
        let mut asked = Vec::new();
        {
            let mut inflight = lock(&self.inflight);
            for &i in indices {
                let Some(c) = manifest.chunks.get(i as usize) else { continue };
                if self.store.contains(&c.hash) {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                match inflight.get_mut(&c.hash) {
                    Some(w) => w.push(tx),
                    None => {
                        inflight.insert(c.hash, vec![tx]);
                        ask.insert(i);
                        asked.push((i, c.hash));
                    }
                }
                waits.push(rx);
            }
        }
        if waits.is_empty() {
            return Ok(());
        }
        let wait = self.wait();
        // Offline means nothing arrives, not that our chunks are late: on a
        // slow link they can wait behind readahead longer than the offline
        // wait, and giving up then would fail a read of a reachable partner
        // and drop the chunks in flight. So wait again while chunk data
        // arrives: bytes, not whole chunks, for a link so slow (loss, a busy
        // machine) that a 1 MiB chunk takes longer than the wait.
        // The work is dropped at the end of this block, before a timeout is
        // handled below: it may hold the data link's lock (connecting).
        let result = {
            let work = async {
                if !ask.is_empty() {
                    if let Err(e) = self.request_chunks(share, path, manifest, &ask).await {
                        self.fail(asked.iter().map(|(_, h)| *h), &e);
                        return Err(e);
                    }
                }
                for rx in waits {
                    match rx.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(self.offline("the fetch was abandoned")),
                    }
                }
                Ok(())
            };
            tokio::pin!(work);
            let mut arrived = self.bytes_arriving.load(Ordering::SeqCst);
            loop {
                match tokio::time::timeout(wait, &mut work).await {
                    Ok(r) => break Some(r),
                    Err(_) => {
                        let now = self.bytes_arriving.load(Ordering::SeqCst);
                        if now == arrived {
                            break None;
                        }
                        arrived = now;
                    }
                }
            }
        };
        match result {
            Some(r) => r,
            None => {
                // Nothing came back in time: the data connection is
                // probably dead. Drop it so the next read reconnects.
                let e = self.offline(format!("no data within {} s", wait.as_secs_f32()));
                if let Some(d) = self.data.lock().await.take() {
                    d.dead.store(true, Ordering::SeqCst);
                    d.conn.close(0u32.into(), b"timeout");
                }
                self.fail(asked.iter().map(|(_, h)| *h), &e);
                Err(e)
            }
        }
    }

    /// Start fetching chunks in the background (readahead, pinning).
    pub fn prefetch(self: &Arc<Self>, share: Name, path: SharePath, manifest: Arc<Manifest>, indices: Vec<u32>) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.fetch(&share, &path, &manifest, &indices).await {
                tracing::debug!(partner = %me.partner, %path, "readahead failed: {e}");
            }
        });
    }

    async fn request_chunks(
        self: &Arc<Self>,
        share: &Name,
        path: &SharePath,
        manifest: &Manifest,
        ask: &RangeSet,
    ) -> Result<(), RemoteError> {
        let data = self.data_link().await?;
        let key = (share.clone(), path.clone(), manifest.file_hash);
        let transfer_id = lock(&data.transfers).entry(key).or_insert_with(crate::transfer::new_transfer_id).clone();
        {
            let mut pending = lock(&data.pending);
            for i in ask.iter() {
                if let Some(c) = manifest.chunks.get(i as usize) {
                    pending.insert((transfer_id.clone(), i), c.hash);
                }
            }
        }
        let req =
            Request::Get { transfer_id, share: share.clone(), path: path.clone(), file_hash: manifest.file_hash, chunks: ask.clone() };
        let mut send = data.send.lock().await;
        send.write_all(req.encode().as_bytes()).await.map_err(|e| {
            data.dead.store(true, Ordering::SeqCst);
            self.offline(e)
        })
    }

    /// Wake everyone waiting for `hashes` with an error.
    fn fail(&self, hashes: impl Iterator<Item = Hash>, e: &RemoteError) {
        let mut inflight = lock(&self.inflight);
        for h in hashes {
            for tx in inflight.remove(&h).unwrap_or_default() {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }

    /// Everything pending on a data link fails with `e`.
    fn fail_link(&self, data: &DataLink, e: &RemoteError) {
        data.dead.store(true, Ordering::SeqCst);
        let hashes: Vec<Hash> = lock(&data.pending).drain().map(|(_, h)| h).collect();
        self.fail(hashes.into_iter(), e);
    }

    /// The data link's control stream carries nothing but ERRORs about GETs.
    async fn read_errors(self: Arc<Self>, data: Arc<DataLink>, mut reader: ControlReader<Response>) {
        loop {
            match reader.recv().await {
                Ok(Response::Error { code, message }) => {
                    tracing::warn!(partner = %self.partner, code = code.as_str(), "chunk request refused: {message}");
                    let e = if code == ErrorCode::Stale {
                        RemoteError::Stale { partner: self.partner.clone(), path: message }
                    } else {
                        RemoteError::Refused { partner: self.partner.clone(), code: code.as_str(), message }
                    };
                    // The link stays usable: only what was pending fails.
                    let hashes: Vec<Hash> = lock(&data.pending).drain().map(|(_, h)| h).collect();
                    self.fail(hashes.into_iter(), &e);
                }
                Ok(_) => {}
                Err(e) => {
                    let e = self.offline(e);
                    self.fail_link(&data, &e);
                    return;
                }
            }
        }
    }

    async fn accept_chunks(self: Arc<Self>, data: Arc<DataLink>) {
        loop {
            match data.conn.accept_uni().await {
                Ok(stream) => {
                    let (me, d) = (self.clone(), data.clone());
                    tokio::spawn(async move { me.receive_chunk(&d, stream).await });
                }
                Err(e) => {
                    let e = self.offline(e);
                    self.fail_link(&data, &e);
                    return;
                }
            }
        }
    }

    async fn receive_chunk(&self, data: &DataLink, stream: quinn::RecvStream) {
        let mut reader = tokio::io::BufReader::with_capacity(8192, stream);
        let mut line = Vec::new();
        let header = match read_line(&mut reader, &mut line).await {
            Ok(Some(Ok(text))) => DataHeader::parse(&text),
            _ => return,
        };
        let Ok(DataHeader::ChunkData { transfer_id, index, size, hash }) = header else {
            tracing::warn!(partner = %self.partner, "unexpected data stream header");
            return;
        };
        let Some(expected) = lock(&data.pending).remove(&(transfer_id.clone(), index)) else {
            // Not asked for (or asked again after a failure): ignore it.
            let mut stream = reader.into_inner();
            let _ = stream.stop(0u32.into());
            return;
        };
        let fail = |detail: String| {
            let e = RemoteError::Chunk { partner: self.partner.clone(), hash: expected.to_string(), detail };
            self.fail(std::iter::once(expected), &e);
        };
        if hash != expected || size > MAX_CHUNK_BYTES {
            return fail(format!("the header names {hash} ({size} bytes), not the chunk asked for"));
        }
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match tokio::io::AsyncReadExt::read(&mut reader, &mut buf[filled..]).await {
                Ok(0) => return fail(format!("stream ended early: {filled} of {size} bytes")),
                Ok(n) => {
                    filled += n;
                    self.bytes_arriving.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) => return fail(format!("stream ended early: {e}")),
            }
        }
        let store = self.store.clone();
        let put = tokio::task::spawn_blocking(move || store.put(&expected, buf)).await;
        match put {
            Ok(Ok(())) => {
                self.chunks_fetched.fetch_add(1, Ordering::SeqCst);
                self.bytes_fetched.fetch_add(size as u64, Ordering::SeqCst);
                let waiters = lock(&self.inflight).remove(&expected).unwrap_or_default();
                for tx in waiters {
                    let _ = tx.send(Ok(()));
                }
            }
            Ok(Err(e)) => fail(e.to_string()),
            Err(e) => fail(e.to_string()),
        }
    }

    /// Open a watch connection for `shares`; once the partner watches them
    /// all, call `on_change(share, root)` for each (what changed before is
    /// not known), then `on_ready`, then `on_change(share, path)` for every
    /// CHANGED line, until the connection fails. Returns why it stopped.
    pub async fn watch(
        &self,
        shares: &[Name],
        on_ready: &(dyn Fn() + Send + Sync),
        on_change: &(dyn Fn(&Name, &SharePath) + Send + Sync),
    ) -> RemoteError {
        let mut link = match self.connect(Attempt::Probe).await {
            Ok(l) => l,
            Err(e) => return e,
        };
        for share in shares {
            match link.call(&Request::Watch { share: share.clone() }).await {
                Ok(Response::Watching { .. }) => {}
                Ok(other) => return self.refusal(other),
                Err(e) => return self.offline(e),
            }
        }
        // Whatever changed while we were not watching; dropped before
        // `on_ready`, so that what is asked for from there on is kept.
        for share in shares {
            on_change(share, &SharePath::root());
        }
        on_ready();
        loop {
            match link.reader.recv().await {
                Ok(Response::Changed { share, path }) => on_change(&share, &path),
                Ok(_) => {}
                Err(e) => {
                    // The partner's daemon said it is stopping: requests
                    // need not find that out again, one attempt each.
                    if crate::node::shut_down(&link.conn) {
                        self.node.reach.failed(&self.partner, "its daemon said it was stopping");
                    }
                    return self.offline(e);
                }
            }
        }
    }

    pub async fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(mut l) = self.meta.lock().await.take() {
            let _ = l.send(&Request::Bye).await;
            l.conn.close(0u32.into(), b"unmount");
        }
        if let Some(d) = self.data.lock().await.take() {
            d.conn.close(0u32.into(), b"unmount");
        }
        self.endpoint.quinn.close(0u32.into(), b"unmount");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_that_are_not_queued_try_and_what_has_an_answer_here_does_not_wait() {
        let share = Name::new("files").unwrap();
        let path = SharePath::parse("a.txt").unwrap();
        let probe = [
            Request::Remove { share: share.clone(), path: path.clone(), kind: proto::EntryKind::File },
            Request::Rename { share: share.clone(), from: path.clone(), to: SharePath::parse("b.txt").unwrap(), replace: true },
            Request::Mkdir { share: share.clone(), path: path.clone(), mode: 0o755 },
            Request::SetAttr { share: share.clone(), path: path.clone(), mode: Some(0o644), mtime_ns: None },
        ];
        for req in &probe {
            assert_eq!(attempt_for(req), Attempt::Probe, "{req:?}");
        }
        let request = [
            Request::List { share: share.clone(), path: path.clone() },
            Request::Stat { share: share.clone(), path: path.clone() },
            Request::Locks { share: share.clone() },
            Request::Discover,
        ];
        for req in &request {
            assert_eq!(attempt_for(req), Attempt::Request, "{req:?}");
        }
    }
}
