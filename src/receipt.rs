//! Signed transfer receipts (the DEFT seed's 11.5): the receiver of the
//! data signs a statement of what it received; both sides keep the JSON
//! receipt append-only under `<home>/receipts/YYYY/MM/DD/<transfer_id>.json`.
//! STUB: contract only, the identity helper implements it.

use crate::identity::{Fingerprint, Identity};
use std::path::{Path, PathBuf};

/// One side of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Party {
    /// The node's name (its partner id as the other side knows it).
    pub node: String,
    /// `sha256:<hex>` of its certificate.
    pub cert_fingerprint: String,
}

/// Facts about the transfer. Signed: file_hash, total_bytes, chunk_count,
/// complete_time. The rest is local bookkeeping, unsigned.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransferFacts {
    pub start_time: String,
    pub complete_time: String,
    pub duration_seconds: f64,
    pub chunk_count: u32,
    pub total_bytes: u64,
    /// Payload bytes that crossed the network (delta: fewer than total).
    pub bytes_sent: u64,
    pub chunks_sent: u32,
    pub file_hash: String,
    pub retransmissions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignatureBlock {
    /// Always "Ed25519".
    pub algorithm: String,
    /// Base64 (standard, padded) of the 64-byte signature.
    pub value: String,
    /// Fingerprint of the signer's certificate (the data's receiver).
    pub signer_cert: String,
    /// Base64 of the signer's 32-byte Ed25519 public key.
    pub signer_public_key: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub transfer_id: String,
    pub protocol_version: String,
    /// "push" or "pull", from the point of view of the node that started it.
    pub direction: String,
    pub share: String,
    pub path: String,
    pub sender: Party,
    pub receiver: Party,
    pub transfer: TransferFacts,
    pub signature: SignatureBlock,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a deftfs receipt: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("signature does not match the receipt's content: it was altered or signed by another key")]
    BadSignature,
    #[error("the receipt was signed by {signer}, but the certificate given is {given}")]
    WrongSigner { signer: String, given: String },
    #[error("receipt {0} already exists: receipts are append-only")]
    Exists(PathBuf),
}

/// The exact bytes the receiver signs: `DEFT-RECEIPT/1` then, one per line
/// ending in `\n`: transfer_id, share, path, file_hash, total_bytes,
/// chunk_count, sender fingerprint, receiver fingerprint, complete_time.
pub fn statement(
    transfer_id: &str,
    share: &str,
    path: &str,
    file_hash: &str,
    total_bytes: u64,
    chunk_count: u32,
    sender_fp: &str,
    receiver_fp: &str,
    complete_time: &str,
) -> Vec<u8> {
    let _ = (transfer_id, share, path, file_hash, total_bytes, chunk_count, sender_fp, receiver_fp, complete_time);
    todo!()
}

impl Receipt {
    /// The statement of this receipt's signed fields.
    pub fn statement(&self) -> Vec<u8> {
        todo!()
    }

    /// Fill `signature` by signing `statement()` with `identity` (which
    /// must be the receiver).
    pub fn sign(&mut self, identity: &Identity) {
        let _ = identity;
        todo!()
    }

    /// Check the signature against the embedded public key, that the key
    /// is the receiver's, and, when a certificate is given, that it is the
    /// signer's certificate (fingerprint and key).
    pub fn verify(&self, cert_der: Option<&[u8]>) -> Result<(), ReceiptError> {
        let _ = cert_der;
        todo!()
    }

    /// Write to `<home>/receipts/YYYY/MM/DD/<transfer_id>.json` (date of
    /// complete_time), created exclusively and fsynced. Returns the path.
    pub fn store(&self, home: &Path) -> Result<PathBuf, ReceiptError> {
        let _ = home;
        todo!()
    }

    pub fn load(path: &Path) -> Result<Receipt, ReceiptError> {
        let _ = path;
        todo!()
    }

    pub fn signer_fingerprint(&self) -> Result<Fingerprint, ReceiptError> {
        todo!()
    }
}
