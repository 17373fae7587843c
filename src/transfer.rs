//! Moving files between nodes: the client's push and pull
//! ([`client::Session`]) and the server's side of both ([`serve`]).
//!
//! Both directions share one shape: the receiver of the data learns the
//! manifest, assembles what it lacks ([`assemble`]) under a sliding window
//! ([`window`]), proves the whole file, moves it into place, and signs a
//! receipt that both sides store.

pub mod assemble;
pub mod client;
pub mod patch;
pub mod relative;
pub mod serve;
pub mod window;

use crate::chunk::{ChunkRef, Manifest};
use crate::identity::{Fingerprint, Identity};
use crate::proto::{ChunkLine, Completion, Name, Signature};
use crate::receipt::{self, Party, Receipt, SignatureBlock, TransferFacts};
use crate::time::Timestamp;
use base64::Engine;
use std::path::PathBuf;

/// Largest chunk a peer may announce: bounds the memory one chunk takes.
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("no partner named {0} in config.toml: add it with `deftfs partner add`")]
    UnknownPartner(String),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error("partner {partner} is unreachable: nothing heard from it for {secs} s; run the same command again to resume (what it verified is kept)")]
    Unreachable { partner: String, secs: u64 },
    #[error("{partner} refused: {code}: {message}")]
    Remote { partner: String, code: &'static str, message: String },
    #[error("{partner} sent an unexpected answer: {got}")]
    Unexpected { partner: String, got: String },
    #[error(transparent)]
    Window(#[from] window::WindowError),
    #[error(transparent)]
    Assemble(#[from] assemble::AssembleError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Receipt(#[from] crate::receipt::ReceiptError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{partner} sent an invalid manifest: {detail}")]
    BadManifest { partner: String, detail: String },
    #[error("{partner}'s receipt signature does not verify: refusing to record the transfer as proven")]
    BadReceipt { partner: String },
    #[error("{0}")]
    Other(String),
}

/// What a finished transfer reports (`deftfs send/receive --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub transfer_id: String,
    pub direction: String,
    pub partner: String,
    pub share: String,
    pub path: String,
    pub local_path: PathBuf,
    pub file_hash: String,
    pub bytes_total: u64,
    /// Payload bytes that crossed the network.
    pub bytes_sent: u64,
    pub chunks_total: u32,
    pub chunks_sent: u32,
    pub retransmissions: u32,
    pub duration_s: f64,
    pub receipt: PathBuf,
}

/// Progress callback: (bytes done, bytes total).
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

pub fn new_transfer_id() -> Name {
    let mut bytes = [0u8; 16];
    // ring's SystemRandom reads the OS RNG; on failure fall back to time
    // and pid, which only needs to be unique, not secret.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let t = Timestamp::now().0.to_le_bytes();
        bytes[..8].copy_from_slice(&t);
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    Name::new(format!("t-{}", hex::encode(bytes))).unwrap_or_else(|_| unreachable_name())
}

fn unreachable_name() -> Name {
    // "t-" + hex always validates; keep a valid fallback rather than panic.
    Name::new("t-0").unwrap_or_else(|_| std::process::abort())
}

/// Page-cache work on at most this many bytes runs inline: handing it to
/// the blocking pool costs two thread wake-ups, more than the work.
const INLINE_IO: u64 = 64 * 1024;

/// Run blocking file work that touches `bytes` bytes (reads and writes of
/// the page cache, no fsync): inline when small, else on the blocking pool.
pub(crate) async fn blocking_io<T: Send + 'static>(
    bytes: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if bytes <= INLINE_IO {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

pub fn manifest_to_lines(m: &Manifest) -> Vec<ChunkLine> {
    m.chunks.iter().enumerate().map(|(i, c)| ChunkLine { index: i as u32, offset: c.offset, size: c.len, hash: c.hash }).collect()
}

/// Rebuild and check a manifest received from a peer.
pub fn manifest_from_lines(size: u64, file_hash: crate::hash::Hash, lines: &[ChunkLine], partner: &str) -> Result<Manifest, TransferError> {
    let m = Manifest { size, file_hash, chunks: lines.iter().map(|l| ChunkRef { offset: l.offset, len: l.size, hash: l.hash }).collect() };
    m.validate(MAX_CHUNK).map_err(|e| TransferError::BadManifest { partner: partner.to_string(), detail: e.to_string() })?;
    Ok(m)
}

/// Rebuild and check a manifest a peer sent relative to `base`, the
/// manifest of the version its BASE names ([`relative::expand`]).
pub fn manifest_from_relative(
    size: u64,
    file_hash: crate::hash::Hash,
    chunks: u32,
    lines: &[crate::proto::RelativeLine],
    base: &Manifest,
    partner: &str,
) -> Result<Manifest, TransferError> {
    relative::expand(size, file_hash, chunks, lines, base, MAX_CHUNK)
        .map_err(|e| TransferError::BadManifest { partner: partner.to_string(), detail: e.to_string() })
}

/// The facts both sides know about a finished transfer, to sign or check.
pub struct Facts<'a> {
    pub transfer_id: &'a Name,
    pub direction: &'static str,
    pub share: &'a str,
    pub path: &'a str,
    pub manifest: &'a Manifest,
    pub sender: Party,
    pub receiver: Party,
    pub started: Timestamp,
    pub bytes_sent: u64,
    pub chunks_sent: u32,
    pub retransmissions: u32,
}

impl Facts<'_> {
    fn statement(&self, time: &str) -> Vec<u8> {
        receipt::statement(
            self.transfer_id.as_str(),
            self.share,
            self.path,
            &self.manifest.file_hash.to_string(),
            self.manifest.size,
            self.manifest.chunks.len() as u32,
            &self.sender.cert_fingerprint,
            &self.receiver.cert_fingerprint,
            time,
        )
    }

    /// As the data's receiver: sign, and give the completion to send.
    pub fn sign(&self, identity: &Identity) -> (Receipt, Completion) {
        let now = Timestamp::now();
        let time = now.rfc3339();
        let sig = identity.sign(&self.statement(&time));
        let receipt = self.receipt(now, &time, &sig, &identity.public_key());
        let completion = Completion {
            transfer_id: self.transfer_id.clone(),
            file_hash: self.manifest.file_hash,
            size: self.manifest.size,
            chunks: self.manifest.chunks.len() as u32,
            time,
            signature: Signature(sig),
        };
        (receipt, completion)
    }

    /// As the data's sender: check the receiver's signature with the key of
    /// its certificate.
    pub fn check(&self, completion: &Completion, receiver_cert: &[u8]) -> Option<Receipt> {
        let key = crate::identity::ed25519_public_key(receiver_cert)?;
        if completion.file_hash != self.manifest.file_hash
            || completion.size != self.manifest.size
            || completion.transfer_id != *self.transfer_id
        {
            return None;
        }
        if !crate::identity::verify(&key, &self.statement(&completion.time), &completion.signature.0) {
            return None;
        }
        let complete = Timestamp::parse_rfc3339(&completion.time).unwrap_or_else(Timestamp::now);
        Some(self.receipt(complete, &completion.time, &completion.signature.0, &key))
    }

    fn receipt(&self, complete: Timestamp, time: &str, sig: &[u8; 64], key: &[u8; 32]) -> Receipt {
        let b64 = base64::engine::general_purpose::STANDARD;
        Receipt {
            transfer_id: self.transfer_id.to_string(),
            protocol_version: crate::proto::VERSION.to_string(),
            direction: self.direction.to_string(),
            share: self.share.to_string(),
            path: self.path.to_string(),
            sender: self.sender.clone(),
            receiver: self.receiver.clone(),
            transfer: TransferFacts {
                start_time: self.started.rfc3339(),
                complete_time: time.to_string(),
                duration_seconds: complete.secs_f64_since(self.started).max(0.0),
                chunk_count: self.manifest.chunks.len() as u32,
                total_bytes: self.manifest.size,
                bytes_sent: self.bytes_sent,
                chunks_sent: self.chunks_sent,
                file_hash: self.manifest.file_hash.to_string(),
                retransmissions: self.retransmissions,
            },
            signature: SignatureBlock {
                algorithm: "Ed25519".to_string(),
                value: b64.encode(sig),
                signer_cert: self.receiver.cert_fingerprint.clone(),
                signer_public_key: b64.encode(key),
            },
        }
    }
}

pub fn party(node: &str, cert_der: &[u8]) -> Party {
    Party { node: node.to_string(), cert_fingerprint: Fingerprint::of_cert(cert_der).to_string() }
}
