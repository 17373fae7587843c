//! The client side of a DEFT/1 session: connect to a partner, handshake,
//! then push or pull files with the sliding window, resume and delta.

use super::assemble::{AssembleError, Assembly, Written};
use super::window::Window;
use super::{manifest_from_lines, manifest_to_lines, new_transfer_id, party, Facts, Progress, Report, TransferError};
use crate::chunk::{ChunkRef, Manifest};
use crate::config::PartnerConfig;
use crate::db::TransferRecord;
use crate::fault;
use crate::hash::Hash;
use crate::node::Node;
use crate::proto::{self, AckStatus, Capability, Completion, DataHeader, Entry, Name, RangeSet, Request, Response, SharePath, ShareRow};
use crate::time::Timestamp;
use crate::transport::{read_line, Control, Endpoint, TransportError};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An authenticated session with one partner.
pub struct Session {
    node: Arc<Node>,
    partner: PartnerConfig,
    conn: quinn::Connection,
    send: quinn::SendStream,
    responses: mpsc::Receiver<Result<Response, TransportError>>,
    peer_cert: Vec<u8>,
    window: u32,
    /// Both sides named EAGER: a small push's chunks may go with its
    /// BEGIN_TRANSFER (PROTOCOL.md 8.3).
    eager: bool,
    /// Both sides named SAME: a push with a known base may give its
    /// manifest relative to the base's (PROTOCOL.md 8.1).
    same: bool,
    /// Both sides named AHEAD: chunks of a file still being written may go
    /// before its push (PROTOCOL.md 8.6).
    ahead: bool,
    /// Shares the partner grants us, from AUTH_OK.
    pub shares: Vec<Name>,
    _endpoint: Endpoint,
}

/// What a push asks the receiver to check before it replaces anything.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub base: proto::Base,
    pub fence: Option<u64>,
    /// The file's manifest, when the caller knows it (a mount's staging
    /// re-cuts only what was written); else the file is indexed.
    pub manifest: Option<Arc<Manifest>>,
    /// Permissions for the new version (default: the partner keeps the
    /// old version's, else 0644).
    pub mode: Option<u32>,
    /// The manifest of the version `base` names, when the caller has it:
    /// the push then describes its manifest relative to it, if the partner
    /// named SAME (a re-save of a large file sends a few lines instead of
    /// one per chunk). Ignored unless its file hash is `base`'s.
    pub base_manifest: Option<Arc<Manifest>>,
    /// The id chunks of this file were sent ahead under
    /// ([`Session::send_ahead`]), if any: the partner may use them.
    pub ahead: Option<Name>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions { base: proto::Base::Any, fence: None, manifest: None, mode: None, base_manifest: None, ahead: None }
    }
}

const OUR_CAPS: [Capability; 6] =
    [Capability::Chunked, Capability::Parallel, Capability::Resume, Capability::Eager, Capability::Same, Capability::Ahead];

/// A file this small has its chunks sent right behind its BEGIN_TRANSFER
/// (when the partner named EAGER): a `tar x` pushes thousands of such
/// files one after the other, and waiting for NEED cost each a round
/// trip. The limit is PROTOCOL.md 8.3's: what the partner turns out to
/// have already, or a push it refuses, wastes at most this much.
pub const EAGER_MAX_BYTES: u64 = 256 * 1024;

impl Session {
    pub async fn open(node: Arc<Node>, partner_id: &str) -> Result<Session, TransferError> {
        Session::open_as(node, partner_id, crate::reach::Attempt::Probe).await
    }

    /// [`Session::open`], failing at once if `attempt` is a request and
    /// the partner is known to be unreachable ([`crate::reach`]).
    pub async fn open_as(node: Arc<Node>, partner_id: &str, attempt: crate::reach::Attempt) -> Result<Session, TransferError> {
        let partner = node.config.partner(partner_id).cloned().ok_or_else(|| TransferError::UnknownPartner(partner_id.to_string()))?;
        let endpoint = Endpoint::client(node.identity.clone(), node.directory.clone())?;
        let (conn, peer_cert) = node.reach.connect(&endpoint, &partner, attempt).await?;
        let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
        let (send, mut reader) = Control::<Response>::new(send, recv).split();
        let (tx, responses) = mpsc::channel(4096);
        tokio::spawn(async move {
            loop {
                let msg = reader.recv().await;
                let stop = matches!(msg, Err(TransportError::Closed) | Err(TransportError::Connection(_)) | Err(TransportError::Read(_)));
                if tx.send(msg).await.is_err() || stop {
                    break;
                }
            }
        });
        let mut session = Session {
            node,
            partner,
            conn,
            send,
            responses,
            peer_cert,
            window: 1,
            eager: false,
            same: false,
            ahead: false,
            shares: Vec::new(),
            _endpoint: endpoint,
        };
        match session.handshake().await {
            Ok(()) => Ok(session),
            // TLS 1.3 lets the client finish its handshake before the server
            // has checked the client's certificate: a refusal shows up here.
            Err(TransferError::Transport(e)) => Err(TransferError::Other(match crate::node::too_many_connections(&session.conn) {
                Some(reason) => format!("{} refused the connection: {reason}", session.partner.id),
                None => format!(
                    "{} closed the connection during authentication ({e}): it does not know our certificate; \
                     give it our fingerprint (`deftfs id`) so it can `deftfs partner add` us",
                    session.partner.id
                ),
            })),
            Err(e) => Err(e),
        }
    }

    async fn handshake(&mut self) -> Result<(), TransferError> {
        let session = self;
        let hello =
            Request::Hello { version: proto::VERSION.to_string(), caps: OUR_CAPS.to_vec(), window: session.node.config.storage.window };
        match session.request(&hello).await? {
            Response::Welcome { window, caps, .. } => {
                session.window = window.clamp(1, session.node.config.storage.window.max(1));
                session.eager = caps.contains(&Capability::Eager);
                session.same = caps.contains(&Capability::Same);
                session.ahead = caps.contains(&Capability::Ahead);
            }
            other => return Err(session.unexpected(&other)),
        }
        let auth = Request::Auth { partner: session.node.config.node.name.clone() };
        match session.request(&auth).await? {
            Response::AuthOk { shares, .. } => session.shares = shares,
            other => return Err(session.unexpected(&other)),
        }
        Ok(())
    }

    pub fn partner_id(&self) -> &str {
        self.partner.id.as_str()
    }

    fn unexpected(&self, got: &Response) -> TransferError {
        match got {
            Response::Error { code, message } => {
                TransferError::Remote { partner: self.partner_id().to_string(), code: code.as_str(), message: message.clone() }
            }
            other => {
                TransferError::Unexpected { partner: self.partner_id().to_string(), got: format!("{other:?}").chars().take(200).collect() }
            }
        }
    }

    /// The connection timed out: the partner is unreachable (a partition,
    /// a dead link, a stopped machine). Said plainly, since the stream
    /// error that reports it only says "connection lost".
    fn unreachable(&self) -> Option<TransferError> {
        matches!(self.conn.close_reason(), Some(quinn::ConnectionError::TimedOut))
            .then(|| TransferError::Unreachable { partner: self.partner_id().to_string(), secs: crate::transport::IDLE_TIMEOUT.as_secs() })
    }

    /// Send raw text on the control stream (tests use it to play a hostile client).
    pub async fn send_raw(&mut self, text: &str) -> Result<(), TransferError> {
        if let Err(e) = self.send.write_all(text.as_bytes()).await {
            return Err(self.unreachable().unwrap_or_else(|| TransportError::from(e).into()));
        }
        Ok(())
    }

    pub async fn send(&mut self, req: &Request) -> Result<(), TransferError> {
        self.send_raw(&req.encode()).await
    }

    /// Next message from the partner.
    pub async fn next(&mut self) -> Result<Response, TransferError> {
        match self.responses.recv().await {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(self.unreachable().unwrap_or_else(|| e.into())),
            None => Err(self.unreachable().unwrap_or_else(|| TransportError::Closed.into())),
        }
    }

    /// Send a request and wait for its answer.
    pub async fn request(&mut self, req: &Request) -> Result<Response, TransferError> {
        self.send(req).await?;
        tokio::time::timeout(Duration::from_secs(60), self.next()).await.map_err(|_| TransferError::from(TransportError::Timeout))?
    }

    pub async fn discover(&mut self) -> Result<Vec<ShareRow>, TransferError> {
        match self.request(&Request::Discover).await? {
            Response::Files(rows) => Ok(rows),
            other => Err(self.unexpected(&other)),
        }
    }

    pub async fn list(&mut self, share: &Name, path: &SharePath) -> Result<Vec<Entry>, TransferError> {
        match self.request(&Request::List { share: share.clone(), path: path.clone() }).await? {
            Response::Entries(e) => Ok(e),
            other => Err(self.unexpected(&other)),
        }
    }

    pub async fn close(mut self) {
        let _ = self.send(&Request::Bye).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.next()).await;
        let _ = self.send.finish();
        self.conn.close(0u32.into(), b"bye");
        self._endpoint.quinn.wait_idle().await;
    }

    fn record(&self, report: &Report, started: Timestamp, status: &str, error: Option<String>) {
        let rec = TransferRecord {
            id: report.transfer_id.clone(),
            direction: report.direction.clone(),
            role: "client".into(),
            partner: self.partner_id().to_string(),
            share: report.share.clone(),
            path: report.path.clone(),
            file_hash: report.file_hash.clone(),
            bytes_total: report.bytes_total,
            bytes_sent: report.bytes_sent,
            chunks_total: report.chunks_total,
            chunks_sent: report.chunks_sent,
            retransmissions: report.retransmissions,
            started_ns: started.0,
            finished_ns: Timestamp::now().0,
            status: status.into(),
            error,
            receipt: Some(report.receipt.display().to_string()).filter(|s| !s.is_empty()),
        };
        if let Err(e) = crate::db::record_transfer(&self.node.db(), &rec) {
            tracing::warn!("could not record transfer {} in history: {e}", rec.id);
        }
    }

    /// Push `file` to `share`/`path` on the partner, replacing whatever is there.
    pub async fn push(&mut self, share: &Name, path: &SharePath, file: &Path, progress: Option<Progress>) -> Result<Report, TransferError> {
        self.push_with(share, path, file, PushOptions::default(), progress).await
    }

    /// Push with a base version to check and a lease token to present: the
    /// partner refuses with CONFLICT when its version is no longer `base` or
    /// a newer lease was granted on the path than `fence`.
    pub async fn push_with(
        &mut self,
        share: &Name,
        path: &SharePath,
        file: &Path,
        options: PushOptions,
        progress: Option<Progress>,
    ) -> Result<Report, TransferError> {
        let started = Timestamp::now();
        let clock = Instant::now();
        let node = self.node.clone();
        let params = node.config.storage.chunk;
        let file_path = file.to_path_buf();
        let manifest = match options.manifest.clone() {
            Some(m) => Manifest::clone(&m),
            None => tokio::task::spawn_blocking(move || crate::index::manifest_for(&node.db, &file_path, &params))
                .await
                .map_err(|e| TransferError::Other(format!("indexing task failed: {e}")))??,
        };
        let transfer_id = new_transfer_id();
        let source = std::fs::File::open(file).map_err(|source| TransferError::Io { path: file.to_path_buf(), source })?;
        // The new version keeps the file's mtime, as a local copy would.
        let mtime_ns = source.metadata().map(|m| crate::share::mtime_ns(&m)).ok();
        let begin = Request::BeginTransfer {
            transfer_id: transfer_id.clone(),
            share: share.clone(),
            path: path.clone(),
            size: manifest.size,
            file_hash: manifest.file_hash,
            base: options.base,
            fence: options.fence,
            mode: options.mode,
            mtime_ns,
            manifest: self.manifest_lines(&manifest, &options),
            ahead: options.ahead.clone().filter(|_| self.ahead),
        };
        let mut sender = ChunkSender::new(self.conn.clone(), transfer_id.clone(), source, file);
        // A small file's chunks go right behind BEGIN_TRANSFER (EAGER),
        // within the session's window: its NEED is then only a formality.
        let eager = self.eager
            && manifest.size <= EAGER_MAX_BYTES
            && manifest.chunks.len() <= self.window as usize
            && fault::stall_after_chunks().is_none();
        self.send(&begin).await?;
        let early_at = Instant::now();
        let early: Vec<u32> = if eager {
            (0..manifest.chunks.len() as u32).filter(|&i| sender.send(i, manifest.chunks.get(i as usize).copied())).collect()
        } else {
            Vec::new()
        };
        let (need, mut window) = self.accepted().await?;
        for index in early {
            window.sent_early(index, early_at);
        }
        let need_bytes: u64 = need.iter().filter_map(|i| manifest.chunks.get(i as usize)).map(|c| c.len as u64).sum();
        let already = manifest.size.saturating_sub(need_bytes);
        let mut acked_bytes = 0u64;
        let on_acked = |index: u32| {
            acked_bytes += manifest.chunks.get(index as usize).map_or(0, |c| c.len as u64);
            if let Some(p) = &progress {
                p(already + acked_bytes, manifest.size);
            }
        };
        let completion = self.pump(&mut sender, &mut window, |i| manifest.chunks.get(i as usize).copied(), on_acked, false).await?;
        let Some(completion) = completion else {
            return Err(TransferError::Other(format!("{}: every chunk acknowledged but no TRANSFER_COMPLETE", self.partner.id)));
        };
        let (bytes_sent, chunks_sent) = (sender.bytes_sent, sender.chunks_sent);
        let facts = Facts {
            transfer_id: &transfer_id,
            direction: "push",
            share: share.as_str(),
            path: path.as_str(),
            manifest: &manifest,
            sender: party(self.node.config.node.name.as_str(), self.node.identity.cert_der()),
            receiver: party(self.partner_id(), &self.peer_cert),
            started,
            bytes_sent,
            chunks_sent,
            retransmissions: window.retransmissions,
        };
        let receipt = facts
            .check(&completion, &self.peer_cert)
            .ok_or_else(|| TransferError::BadReceipt { partner: self.partner_id().to_string() })?;
        let receipt_path = self.node.receipts.store(receipt, &self.node.home)?;
        let report = Report {
            transfer_id: transfer_id.to_string(),
            direction: "push".into(),
            partner: self.partner_id().to_string(),
            share: share.to_string(),
            path: path.to_string(),
            local_path: file.to_path_buf(),
            file_hash: manifest.file_hash.to_string(),
            bytes_total: manifest.size,
            bytes_sent,
            chunks_total: manifest.chunks.len() as u32,
            chunks_sent,
            retransmissions: window.retransmissions,
            duration_s: clock.elapsed().as_secs_f64(),
            receipt: receipt_path,
        };
        self.record(&report, started, "ok", None);
        Ok(report)
    }

    /// The answer to a BEGIN_TRANSFER or AHEAD: NEED, and the window that
    /// sends it.
    async fn accepted(&mut self) -> Result<(RangeSet, Window), TransferError> {
        let accepted = tokio::time::timeout(Duration::from_secs(60), self.next())
            .await
            .map_err(|_| TransferError::from(TransportError::Timeout))??;
        let (window_size, need) = match accepted {
            Response::TransferAccepted { window, need, .. } => (window, need),
            other => return Err(self.unexpected(&other)),
        };
        let storage = &self.node.config.storage;
        let window = Window::new(
            need.iter(),
            window_size.clamp(1, self.window),
            Duration::from_secs(storage.chunk_timeout_secs),
            storage.max_retries,
        );
        Ok((need, window))
    }

    /// Send the chunks of `window` (`chunk_of` gives each index's place in
    /// the file) until every one is acknowledged (`until_acked`: an AHEAD)
    /// or the partner answers TRANSFER_COMPLETE (a push). `on_acked` is
    /// called once per chunk acknowledged.
    async fn pump(
        &mut self,
        sender: &mut ChunkSender,
        window: &mut Window,
        chunk_of: impl Fn(u32) -> Option<ChunkRef>,
        mut on_acked: impl FnMut(u32),
        until_acked: bool,
    ) -> Result<Option<Completion>, TransferError> {
        let mut stalled = false;
        loop {
            if until_acked && window.is_done() {
                return Ok(None);
            }
            // Fill the window.
            let stall = fault::stall_after_chunks().is_some_and(|n| window.done() >= n as usize);
            if stall && !stalled && window.in_flight() == 0 {
                stalled = true;
                eprintln!("stalled");
            }
            while let Some(index) = if stall { None } else { window.next_to_send(Instant::now()) } {
                if !sender.send(index, chunk_of(index)) {
                    break;
                }
            }
            let deadline = window
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = self.next() => match msg? {
                    Response::ChunkAck { index, status: AckStatus::Ok, .. } => {
                        if window.on_ack(index) {
                            on_acked(index);
                        }
                    }
                    Response::ChunkAck { index, status: AckStatus::Error(reason), .. } => {
                        tracing::warn!(partner = %self.partner.id, index, %reason, "chunk refused, sending it again");
                        window.on_nack(index, &reason)?;
                    }
                    Response::ChunkAckBatch { chunks, .. } => {
                        for index in chunks.iter() {
                            if window.on_ack(index) {
                                on_acked(index);
                            }
                        }
                    }
                    Response::TransferComplete(c) if !until_acked => return Ok(Some(c)),
                    other => return Err(self.unexpected(&other)),
                },
                Some(done) = sender.senders.join_next(), if !sender.senders.is_empty() => {
                    if let Ok(Err(e)) = done {
                        return Err(self.unreachable().unwrap_or_else(|| TransferError::Other(format!("sending to {}: {e}", self.partner.id))));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => window.check_timeouts(Instant::now())?,
            }
        }
    }

    /// AHEAD (PROTOCOL.md 8.6): send the chunks `chunks` of `file`, a file
    /// still being written, numbered from `first` under `ahead_id`, before
    /// its push, which names `ahead_id` ([`PushOptions::ahead`]). Returns
    /// when the partner has every one (copied from what it has, or sent
    /// and acknowledged). False when the partner does not take chunks
    /// ahead (it did not name AHEAD): the push then simply sends them.
    pub async fn send_ahead(
        &mut self,
        ahead_id: &Name,
        share: &Name,
        path: &SharePath,
        first: u32,
        chunks: &[ChunkRef],
        file: &Path,
    ) -> Result<bool, TransferError> {
        if !self.ahead {
            return Ok(false);
        }
        let lines: Vec<proto::ChunkLine> = chunks
            .iter()
            .enumerate()
            .map(|(k, c)| proto::ChunkLine { index: first + k as u32, offset: c.offset, size: c.len, hash: c.hash })
            .collect();
        let source = std::fs::File::open(file).map_err(|source| TransferError::Io { path: file.to_path_buf(), source })?;
        self.send(&Request::Ahead { ahead_id: ahead_id.clone(), share: share.clone(), path: path.clone(), first, chunks: lines }).await?;
        let (_, mut window) = self.accepted().await?;
        let mut sender = ChunkSender::new(self.conn.clone(), ahead_id.clone(), source, file);
        let chunk_of = |i: u32| i.checked_sub(first).and_then(|k| chunks.get(k as usize).copied());
        self.pump(&mut sender, &mut window, chunk_of, |_| {}, true).await?;
        Ok(true)
    }

    /// The manifest as BEGIN_TRANSFER carries it: relative to the base
    /// version's when both sides named SAME and the caller gave the base's
    /// manifest, else whole.
    fn manifest_lines(&self, manifest: &Manifest, options: &PushOptions) -> proto::PushManifest {
        let base = match (&options.base, &options.base_manifest) {
            (proto::Base::Version(h), Some(m)) if self.same && m.file_hash == *h => m,
            _ => return proto::PushManifest::Whole(manifest_to_lines(manifest)),
        };
        let lines = super::relative::relative_lines(manifest, base);
        if lines.len() >= manifest.chunks.len() {
            // Nothing in common with the base: the whole form says as much.
            return proto::PushManifest::Whole(manifest_to_lines(manifest));
        }
        proto::PushManifest::Relative { chunks: manifest.chunks.len() as u32, lines }
    }

    /// Pull `share`/`path` from the partner into `out` (a file path, or an
    /// existing directory to put it in).
    pub async fn pull(&mut self, share: &Name, path: &SharePath, out: &Path, progress: Option<Progress>) -> Result<Report, TransferError> {
        let started = Timestamp::now();
        let clock = Instant::now();
        let (size, file_hash, mtime_ns, lines) = match self.request(&Request::Describe { share: share.clone(), path: path.clone() }).await?
        {
            Response::FileInfo { size, file_hash, mtime_ns, chunks, .. } => (size, file_hash, mtime_ns, chunks),
            other => return Err(self.unexpected(&other)),
        };
        let manifest = manifest_from_lines(size, file_hash, &lines, self.partner_id())?;
        tracing::debug!(elapsed = ?clock.elapsed(), chunks = manifest.chunks.len(), "pull: described");
        let target = if out.is_dir() {
            let name = path.file_name().or_else(|| Some(share.as_str())).unwrap_or("file");
            out.join(name)
        } else {
            out.to_path_buf()
        };
        let node = self.node.clone();
        let (target2, manifest2) = (target.clone(), manifest.clone());
        let assembly = tokio::task::spawn_blocking(move || {
            let base =
                if target2.is_file() { crate::index::manifest_for(&node.db, &target2, &node.config.storage.chunk).ok() } else { None };
            Assembly::prepare(&target2, manifest2, base.as_ref())
        })
        .await
        .map_err(|e| TransferError::Other(format!("preparing {}: {e}", target.display())))??;
        let assembly = Arc::new(assembly);
        let need = assembly.needed();
        tracing::debug!(elapsed = ?clock.elapsed(), need = need.len(), "pull: prepared");
        let transfer_id = new_transfer_id();
        let storage = &self.node.config.storage;
        let mut window =
            Window::new(need.iter().copied(), self.window, Duration::from_secs(storage.chunk_timeout_secs), storage.max_retries);
        let (arrivals_tx, mut arrivals) = mpsc::channel::<(u32, Result<Written, String>, u64)>(1024);
        let receiver = tokio::spawn(receive_chunks(self.conn.clone(), assembly.clone(), transfer_id.clone(), arrivals_tx));
        let need_bytes: u64 = need.iter().filter_map(|&i| manifest.chunks.get(i as usize)).map(|c| c.len as u64).sum();
        let already = manifest.size.saturating_sub(need_bytes);
        let (mut bytes_sent, mut chunks_sent, mut got_bytes) = (0u64, 0u32, 0u64);
        let result: Result<(), TransferError> = async {
            if need.is_empty() {
                // Nothing to fetch: still open the transfer on the server,
                // so it can record the receipt we are about to sign.
                self.send(&Request::Get { transfer_id: transfer_id.clone(), share: share.clone(), path: path.clone(), file_hash, chunks: RangeSet::new() }).await?;
            }
            while !window.is_done() && !assembly.is_complete() {
                let batch: RangeSet = std::iter::from_fn(|| window.next_to_send(Instant::now())).collect();
                if !batch.is_empty() {
                    self.send(&Request::Get {
                        transfer_id: transfer_id.clone(),
                        share: share.clone(),
                        path: path.clone(),
                        file_hash,
                        chunks: batch,
                    })
                    .await?;
                }
                let deadline = window
                    .next_deadline()
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    Some((index, outcome, n)) = arrivals.recv() => {
                        bytes_sent += n;
                        chunks_sent += 1;
                        match outcome {
                            Ok(_) => {
                                if window.on_ack(index) {
                                    got_bytes += manifest.chunks.get(index as usize).map_or(0, |c| c.len as u64);
                                }
                            }
                            Err(reason) => {
                                tracing::warn!(partner = %self.partner.id, index, %reason, "chunk refused, asking again");
                                window.on_nack(index, &reason)?;
                            }
                        }
                    }
                    msg = self.next() => return Err(self.unexpected(&msg?)),
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(partner = %self.partner.id, in_flight = window.in_flight(), done = window.done(), "chunks timed out, asking again");
                        window.check_timeouts(Instant::now())?
                    }
                }
                if let Some(p) = &progress {
                    p(already + got_bytes, manifest.size);
                }
            }
            Ok(())
        }
        .await;
        receiver.abort();
        result?;
        tracing::debug!(elapsed = ?clock.elapsed(), "pull: all chunks in");
        let final_path = tokio::task::spawn_blocking(move || assembly.finish(None, Some(mtime_ns)))
            .await
            .map_err(|e| TransferError::Other(e.to_string()))??;
        let facts = Facts {
            transfer_id: &transfer_id,
            direction: "pull",
            share: share.as_str(),
            path: path.as_str(),
            manifest: &manifest,
            sender: party(self.partner_id(), &self.peer_cert),
            receiver: party(self.node.config.node.name.as_str(), self.node.identity.cert_der()),
            started,
            bytes_sent,
            chunks_sent,
            retransmissions: window.retransmissions,
        };
        let (receipt, completion) = facts.sign(&self.node.identity);
        let receipt_path = self.node.receipts.store(receipt, &self.node.home)?;
        match self.request(&Request::TransferComplete(completion)).await? {
            Response::ReceiptOk { .. } => {}
            other => tracing::warn!(partner = %self.partner.id, "partner did not store our receipt: {:?}", other),
        }
        let report = Report {
            transfer_id: transfer_id.to_string(),
            direction: "pull".into(),
            partner: self.partner_id().to_string(),
            share: share.to_string(),
            path: path.to_string(),
            local_path: final_path,
            file_hash: manifest.file_hash.to_string(),
            bytes_total: manifest.size,
            bytes_sent,
            chunks_total: manifest.chunks.len() as u32,
            chunks_sent,
            retransmissions: window.retransmissions,
            duration_s: clock.elapsed().as_secs_f64(),
            receipt: receipt_path,
        };
        self.record(&report, started, "ok", None);
        Ok(report)
    }
}

/// Accept CHUNK_DATA streams, verify and store each chunk, report arrivals.
/// Sends chunks of one file, each on its own PUT stream.
struct ChunkSender {
    conn: quinn::Connection,
    transfer_id: Name,
    source: Arc<std::fs::File>,
    /// The file opened for direct reads: chunks not in the page cache are
    /// read past it (see crate::direct).
    direct: Arc<Option<std::fs::File>>,
    senders: tokio::task::JoinSet<Result<(), String>>,
    bytes_sent: u64,
    chunks_sent: u32,
    /// The test fault hook corrupts one transmission only.
    corrupted_once: bool,
}

impl ChunkSender {
    fn new(conn: quinn::Connection, transfer_id: Name, source: std::fs::File, path: &Path) -> ChunkSender {
        ChunkSender {
            conn,
            transfer_id,
            source: Arc::new(source),
            direct: Arc::new(crate::direct::open_direct_read(path)),
            senders: tokio::task::JoinSet::new(),
            bytes_sent: 0,
            chunks_sent: 0,
            corrupted_once: false,
        }
    }

    /// Start sending chunk `index`, which is `chunk` of the file. False
    /// when there is no such chunk.
    fn send(&mut self, index: u32, chunk: Option<ChunkRef>) -> bool {
        let Some(chunk) = chunk else { return false };
        let corrupt = fault::corrupt_chunk() == Some(index) && !self.corrupted_once;
        self.corrupted_once |= corrupt;
        self.bytes_sent += chunk.len as u64;
        self.chunks_sent += 1;
        let conn = self.conn.clone();
        let (source, direct) = (self.source.clone(), self.direct.clone());
        let header = DataHeader::Put { transfer_id: self.transfer_id.clone(), index, size: chunk.len, hash: chunk.hash };
        self.senders.spawn(async move {
            // A chunk in the page cache is one memory copy: read here, not
            // on the blocking pool, whose hand-off costs two thread
            // wake-ups a chunk. One that is not waits for the disk there.
            let (offset, len) = (chunk.offset, chunk.len as usize);
            let data = if crate::direct::all_cached(&source, offset, len as u64) == Some(true) {
                crate::direct::Landing::read(&source, None, offset, len)
            } else {
                let read = move || crate::direct::Landing::read(&source, direct.as_ref().as_ref(), offset, len);
                crate::transfer::blocking_io(len as u64, read).await.map_err(|e| e.to_string())?
            };
            let mut data = data.map_err(|e| format!("reading chunk {index}: {e}"))?;
            if corrupt {
                if let Some(b) = data.bytes_mut().first_mut() {
                    *b ^= 0xff;
                }
            }
            let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
            // Header and data in one call; the data handed over, not copied
            // into the stream's buffer.
            let mut parts = [bytes::Bytes::from(header.encode()), bytes::Bytes::from_owner(data)];
            stream.write_all_chunks(&mut parts).await.map_err(|e| e.to_string())?;
            stream.finish().map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        });
        true
    }
}

async fn receive_chunks(
    conn: quinn::Connection,
    assembly: Arc<Assembly>,
    transfer_id: Name,
    tx: mpsc::Sender<(u32, Result<Written, String>, u64)>,
) {
    while let Ok(stream) = conn.accept_uni().await {
        let (assembly, tx, transfer_id) = (assembly.clone(), tx.clone(), transfer_id.clone());
        tokio::spawn(async move {
            match read_chunk_stream(stream, &assembly, &transfer_id).await {
                Ok((index, n, data)) => {
                    let outcome = crate::transfer::blocking_io(n, move || assembly.write_chunk(index, data.bytes())).await;
                    let outcome = match outcome {
                        Ok(Ok(w)) => Ok(w),
                        Ok(Err(AssembleError::HashMismatch { .. })) => Err("HASH_MISMATCH".to_string()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tx.send((index, outcome, n)).await;
                }
                Err(e) => tracing::warn!("bad chunk stream: {e}"),
            }
        });
    }
}

/// Read one chunk stream: header, then exactly SIZE bytes (bounded by the
/// manifest, never by the peer's word alone).
pub(crate) async fn read_chunk_stream(
    stream: quinn::RecvStream,
    assembly: &Assembly,
    transfer_id: &Name,
) -> Result<(u32, u64, crate::direct::Landing), String> {
    let mut reader = tokio::io::BufReader::with_capacity(4096, stream);
    let mut line = Vec::new();
    let header = match read_line(&mut reader, &mut line).await {
        Ok(Some(Ok(text))) => DataHeader::parse(&text).map_err(|e| e.to_string())?,
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("empty chunk stream".into()),
        Err(e) => return Err(e.to_string()),
    };
    let (id, index, size) = match header {
        DataHeader::Put { transfer_id, index, size, .. } | DataHeader::ChunkData { transfer_id, index, size, .. } => {
            (transfer_id, index, size)
        }
    };
    if &id != transfer_id {
        return Err(format!("chunk for unknown transfer {id}"));
    }
    let chunk = assembly.manifest().chunks.get(index as usize).copied().ok_or_else(|| format!("chunk {index} is not part of the file"))?;
    if size != chunk.len {
        return Err(format!("chunk {index} announced {size} bytes, the manifest says {}", chunk.len));
    }
    let mut data = crate::direct::Landing::new(chunk.offset, size as usize);
    tokio::io::AsyncReadExt::read_exact(&mut reader, data.bytes_mut()).await.map_err(|e| format!("chunk {index}: {e}"))?;
    Ok((index, size as u64, data))
}

/// Hash helper used by tests to compare files.
pub fn hash_path(path: &Path) -> std::io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hasher.finalize().into())
}
