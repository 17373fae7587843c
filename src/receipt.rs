//! Signed transfer receipts (the DEFT seed's 11.5): the receiver of the
//! data signs a statement of what it received; both sides keep the JSON
//! receipt append-only under `<home>/receipts/YYYY/MM/DD/<transfer_id>.json`.
//!
//! What is signed is not the JSON but a fixed text, the [`statement`], built
//! from the fields that matter in a dispute (who, what, which content,
//! when); the JSON may be re-indented or carry unsigned bookkeeping without
//! breaking the signature. The signer must be the receiver: a receipt whose
//! `signature.signer_cert` is not `receiver.cert_fingerprint` is refused.
//! Signed fields may not contain a newline, which would make the statement
//! ambiguous (share and path paths never do). [`Receipt::verify`] without a
//! certificate proves integrity against the embedded public key only;
//! given the receiver's certificate (pinned, or received in the TLS
//! handshake) it also proves who signed.

use crate::identity::{self, Fingerprint, Identity};
use crate::proto::Name;
use crate::time::Timestamp;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

const STATEMENT_HEADER: &str = "DEFT-RECEIPT/1";
const ALGORITHM: &str = "Ed25519";

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
#[allow(clippy::too_many_arguments)] // one argument per signed field, in order
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
    format!(
        "{STATEMENT_HEADER}\n{transfer_id}\n{share}\n{path}\n{file_hash}\n{total_bytes}\n\
         {chunk_count}\n{sender_fp}\n{receiver_fp}\n{complete_time}\n"
    )
    .into_bytes()
}

impl Receipt {
    /// The statement of this receipt's signed fields.
    pub fn statement(&self) -> Vec<u8> {
        statement(
            &self.transfer_id,
            &self.share,
            &self.path,
            &self.transfer.file_hash,
            self.transfer.total_bytes,
            self.transfer.chunk_count,
            &self.sender.cert_fingerprint,
            &self.receiver.cert_fingerprint,
            &self.transfer.complete_time,
        )
    }

    /// Fill `signature` by signing `statement()` with `identity` (which
    /// must be the receiver).
    pub fn sign(&mut self, identity: &Identity) {
        let sig = identity.sign(&self.statement());
        self.signature = SignatureBlock {
            algorithm: ALGORITHM.to_string(),
            value: BASE64.encode(sig),
            signer_cert: identity.fingerprint().to_string(),
            signer_public_key: BASE64.encode(identity.public_key()),
        };
    }

    /// Check the signature against the embedded public key, that the key
    /// is the receiver's, and, when a certificate is given, that it is the
    /// signer's certificate (fingerprint and key).
    ///
    /// A signer other than the receiver is `Malformed` (the receipt
    /// contradicts itself, whatever certificate is given); a certificate
    /// that is not the signer's is `WrongSigner`.
    pub fn verify(&self, cert_der: Option<&[u8]>) -> Result<(), ReceiptError> {
        let sig = &self.signature;
        if sig.algorithm != ALGORITHM {
            return Err(self.malformed(format!("unknown signature algorithm {:?}", sig.algorithm)));
        }
        let signed_text = [
            &self.transfer_id,
            &self.share,
            &self.path,
            &self.transfer.file_hash,
            &self.sender.cert_fingerprint,
            &self.receiver.cert_fingerprint,
            &self.transfer.complete_time,
        ];
        if signed_text.iter().any(|field| field.contains('\n')) {
            return Err(self.malformed("a signed field contains a newline".into()));
        }
        let public_key: [u8; 32] =
            decode_fixed(&sig.signer_public_key).ok_or_else(|| self.malformed("signer_public_key is not 32 bytes of base64".into()))?;
        let value: [u8; 64] = decode_fixed(&sig.value).ok_or_else(|| self.malformed("signature value is not 64 bytes of base64".into()))?;
        if !identity::verify(&public_key, &self.statement(), &value) {
            return Err(ReceiptError::BadSignature);
        }

        let signer = self.signer_fingerprint()?;
        let receiver: Fingerprint = self
            .receiver
            .cert_fingerprint
            .parse()
            .map_err(|_| self.malformed(format!("receiver fingerprint {:?} is not sha256:<hex>", self.receiver.cert_fingerprint)))?;
        if signer != receiver {
            return Err(self.malformed(format!("signed by {signer}, not by the receiver of the data {receiver}")));
        }

        if let Some(der) = cert_der {
            let given = Fingerprint::of_cert(der);
            let wrong = || ReceiptError::WrongSigner { signer: signer.to_string(), given: given.to_string() };
            if given != signer {
                return Err(wrong());
            }
            if identity::ed25519_public_key(der) != Some(public_key) {
                return Err(wrong());
            }
        }
        Ok(())
    }

    /// Write to `<home>/receipts/YYYY/MM/DD/<transfer_id>.json` (date of
    /// complete_time), created exclusively. Returns the path.
    pub fn store(&self, home: &Path) -> Result<PathBuf, ReceiptError> {
        let path = self.place(home)?;
        self.write_at(&path)?;
        Ok(path)
    }

    /// Where [`Receipt::store`] puts this receipt (checking that it names
    /// a sound time and id); writes nothing.
    pub fn place(&self, home: &Path) -> Result<PathBuf, ReceiptError> {
        let time = Timestamp::parse_rfc3339(&self.transfer.complete_time)
            .ok_or_else(|| self.malformed(format!("complete_time {:?} is not an RFC 3339 time", self.transfer.complete_time)))?;
        // The id becomes a file name: it must not climb out of the folder.
        let id = Name::new(self.transfer_id.as_str()).map_err(|e| self.malformed(format!("transfer_id: {e}")))?;
        let (y, m, d) = time.ymd();
        let receipts = home.join("receipts");
        let year = receipts.join(format!("{y:04}"));
        let month = year.join(format!("{m:02}"));
        let day = month.join(format!("{d:02}"));
        Ok(day.join(format!("{id}.json")))
    }

    /// Write the receipt as `path`, making its day's folder only when it
    /// is missing: a `tar x` into a mount writes one receipt a file, and a
    /// `mkdir` each (failing with EEXIST) showed in its profile.
    fn write_at(&self, path: &Path) -> Result<(), ReceiptError> {
        match self.write_in_place(path) {
            Err(ReceiptError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                if let Some(day) = path.parent() {
                    fs::create_dir_all(day).map_err(io_error(day))?;
                }
                self.write_in_place(path)
            }
            other => other,
        }
    }

    /// [`Receipt::write_at`] into a directory that exists.
    fn write_in_place(&self, path: &Path) -> Result<(), ReceiptError> {
        let path = path.to_path_buf();
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| self.malformed(format!("cannot serialize: {e}")))?;
        json.push(b'\n');
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ReceiptError::Exists(path.clone()),
            _ => ReceiptError::Io { path: path.clone(), source: e },
        })?;
        // Not fsynced: the transfer's file was, before it was renamed into
        // place. A power cut in the seconds after a transfer can lose its
        // receipt (the partner keeps its own copy), as it can the history
        // row; waiting for the disk here cost two fsyncs a file (tar x).
        file.write_all(&json).map_err(io_error(&path))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Receipt, ReceiptError> {
        let bytes = fs::read(path).map_err(io_error(path))?;
        serde_json::from_slice(&bytes).map_err(|e| ReceiptError::Malformed { path: path.to_path_buf(), detail: e.to_string() })
    }

    pub fn signer_fingerprint(&self) -> Result<Fingerprint, ReceiptError> {
        self.signature
            .signer_cert
            .parse()
            .map_err(|_| self.malformed(format!("signer_cert {:?} is not sha256:<hex>", self.signature.signer_cert)))
    }

    /// A Malformed error for a receipt not (yet) tied to a file.
    fn malformed(&self, detail: String) -> ReceiptError {
        ReceiptError::Malformed { path: PathBuf::from(format!("receipt {}", self.transfer_id)), detail }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReceiptError + '_ {
    move |source| ReceiptError::Io { path: path.to_path_buf(), source }
}

/// Base64 (standard, padded) of exactly N bytes.
fn decode_fixed<const N: usize>(text: &str) -> Option<[u8; N]> {
    BASE64.decode(text).ok()?.try_into().ok()
}

/// Where a node stores receipts: at once (a command that exits when the
/// transfer ends), or, in the daemon, on a thread of its own, off the
/// transfer's path. Creating a file can cost a millisecond on some
/// filesystems, and a `tar x` into a mount made two a file, one on each
/// side, while the application waited. [`Receipts::drain`] (the daemon's
/// shutdown) waits for what is queued.
#[derive(Default)]
pub struct Receipts {
    writer: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

enum Job {
    Write(Box<Receipt>, PathBuf),
    Drained(std::sync::mpsc::Sender<()>),
}

impl Receipts {
    /// From now on, write on a background thread.
    pub fn in_background(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if writer.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("receipts".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Write(receipt, path) => {
                        if let Err(e) = receipt.write_at(&path) {
                            tracing::error!("storing receipt {}: {e}", path.display());
                        }
                    }
                    Job::Drained(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        match spawned {
            Ok(_) => *writer = Some(tx),
            Err(e) => tracing::warn!("receipts are written inline: no thread for them: {e}"),
        }
    }

    /// Store `receipt` under `home`; returns its path. In the background
    /// the file appears a moment later.
    pub fn store(&self, receipt: Receipt, home: &Path) -> Result<PathBuf, ReceiptError> {
        let path = receipt.place(home)?;
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match writer {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(Job::Write(receipt, path))) = tx.send(Job::Write(Box::new(receipt), path.clone())) {
                    receipt.write_at(&path)?;
                }
            }
            None => receipt.write_at(&path)?,
        }
        Ok(path)
    }

    /// Wait until every queued receipt is written.
    pub fn drain(&self) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = writer {
            let (done, wait) = std::sync::mpsc::channel();
            if tx.send(Job::Drained(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_home(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "deftfs-receipt-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn unsigned(sender: &Identity, receiver: &Identity) -> Receipt {
        Receipt {
            transfer_id: "550e8400-e29b-41d4-a716-446655440000".into(),
            protocol_version: "1.0".into(),
            direction: "push".into(),
            share: "invoices".into(),
            path: "2026/january.pdf".into(),
            sender: Party { node: "acme".into(), cert_fingerprint: sender.fingerprint().to_string() },
            receiver: Party { node: "supplier".into(), cert_fingerprint: receiver.fingerprint().to_string() },
            transfer: TransferFacts {
                start_time: "2026-01-19T14:30:00.000Z".into(),
                complete_time: "2026-01-19T14:35:23.456Z".into(),
                duration_seconds: 323.456,
                chunk_count: 400,
                total_bytes: 104_857_600,
                bytes_sent: 5_000_000,
                chunks_sent: 20,
                file_hash: format!("blake3:{}", "ab".repeat(32)),
                retransmissions: 3,
            },
            signature: SignatureBlock {
                algorithm: String::new(),
                value: String::new(),
                signer_cert: String::new(),
                signer_public_key: String::new(),
            },
        }
    }

    fn signed() -> (Receipt, Identity, Identity) {
        let sender = Identity::generate("acme").unwrap();
        let receiver = Identity::generate("supplier").unwrap();
        let mut r = unsigned(&sender, &receiver);
        r.sign(&receiver);
        (r, sender, receiver)
    }

    #[test]
    fn statement_format() {
        let s = statement("t1", "inv", "a/b.pdf", "blake3:00", 10, 2, "sha256:aa", "sha256:bb", "T");
        assert_eq!(String::from_utf8(s).unwrap(), "DEFT-RECEIPT/1\nt1\ninv\na/b.pdf\nblake3:00\n10\n2\nsha256:aa\nsha256:bb\nT\n");
    }

    #[test]
    fn sign_then_verify() {
        let (r, sender, receiver) = signed();
        assert_eq!(r.signature.algorithm, "Ed25519");
        assert_eq!(r.signer_fingerprint().unwrap(), receiver.fingerprint());
        r.verify(None).unwrap();
        r.verify(Some(receiver.cert_der())).unwrap();
        match r.verify(Some(sender.cert_der())) {
            Err(ReceiptError::WrongSigner { signer, given }) => {
                assert_eq!(signer, receiver.fingerprint().to_string());
                assert_eq!(given, sender.fingerprint().to_string());
            }
            other => panic!("{other:?}"),
        }
        // Unsigned bookkeeping may change.
        let mut r2 = r.clone();
        r2.transfer.retransmissions = 99;
        r2.transfer.start_time = "2026-01-19T14:00:00.000Z".into();
        r2.direction = "pull".into();
        r2.verify(Some(receiver.cert_der())).unwrap();
    }

    #[test]
    fn changing_a_signed_field_fails() {
        let (r, _, receiver) = signed();
        let edits: Vec<fn(&mut Receipt)> = vec![
            |r| r.transfer_id.push('x'),
            |r| r.share = "orders".into(),
            |r| r.path.push('x'),
            |r| {
                r.transfer.file_hash.pop();
            },
            |r| r.transfer.total_bytes += 1,
            |r| r.transfer.chunk_count -= 1,
            |r| r.sender.cert_fingerprint = r.receiver.cert_fingerprint.clone(),
            |r| r.receiver.cert_fingerprint = r.sender.cert_fingerprint.clone(),
            |r| r.transfer.complete_time = "2026-01-19T14:35:23.457Z".into(),
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let mut bad = r.clone();
            edit(&mut bad);
            assert!(matches!(bad.verify(None), Err(ReceiptError::BadSignature)), "edit {i}");
            assert!(bad.verify(Some(receiver.cert_der())).is_err(), "edit {i}");
        }
    }

    #[test]
    fn another_key_fails() {
        let (r, sender, receiver) = signed();
        // Signed by the sender, claiming to be the receiver's signature.
        let mut forged = unsigned(&sender, &receiver);
        forged.sign(&sender);
        assert!(matches!(forged.verify(None), Err(ReceiptError::Malformed { .. })));
        forged.signature.signer_cert = receiver.fingerprint().to_string();
        forged.verify(None).unwrap(); // consistent with the embedded key...
        assert!(matches!(forged.verify(Some(receiver.cert_der())), Err(ReceiptError::WrongSigner { .. }))); // ...but not with the receiver's certificate.
                                                                                                            // The right signature with another public key.
        let mut swapped = r.clone();
        swapped.signature.signer_public_key = BASE64.encode(sender.public_key());
        assert!(matches!(swapped.verify(None), Err(ReceiptError::BadSignature)));
        // Signature bytes altered.
        let mut bits = r.clone();
        let mut sig = BASE64.decode(&bits.signature.value).unwrap();
        sig[10] ^= 1;
        bits.signature.value = BASE64.encode(sig);
        assert!(matches!(bits.verify(None), Err(ReceiptError::BadSignature)));
    }

    #[test]
    fn malformed_signatures() {
        let (r, _, _) = signed();
        let cases: Vec<fn(&mut Receipt)> = vec![
            |r| r.signature.algorithm = "RSA-SHA256".into(),
            |r| r.signature.value = "AAAA".into(),
            |r| r.signature.value = "not base64!".into(),
            |r| r.signature.signer_public_key = BASE64.encode([0u8; 31]),
            |r| r.signature.signer_cert = "sha1:00".into(),
            |r| r.path = "a\nb".into(),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let mut bad = r.clone();
            case(&mut bad);
            assert!(matches!(bad.verify(None), Err(ReceiptError::Malformed { .. })), "case {i}");
        }
    }

    #[test]
    fn store_and_load() {
        let home = temp_home("store");
        let (r, _, receiver) = signed();
        let path = r.store(&home).unwrap();
        assert_eq!(path, home.join("receipts/2026/01/19/550e8400-e29b-41d4-a716-446655440000.json"));
        let loaded = Receipt::load(&path).unwrap();
        assert_eq!(loaded, r);
        loaded.verify(Some(receiver.cert_der())).unwrap();
        assert!(matches!(r.store(&home), Err(ReceiptError::Exists(p)) if p == path));

        let mut bad = r.clone();
        bad.transfer_id = "../../escape".into();
        assert!(matches!(bad.store(&home), Err(ReceiptError::Malformed { .. })));
        let mut bad = r.clone();
        bad.transfer.complete_time = "yesterday".into();
        assert!(matches!(bad.store(&home), Err(ReceiptError::Malformed { .. })));

        fs::write(home.join("junk.json"), "{\"transfer_id\": 1}").unwrap();
        match Receipt::load(&home.join("junk.json")) {
            Err(ReceiptError::Malformed { detail, .. }) => assert!(detail.contains("invalid type")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Receipt::load(&home.join("none.json")), Err(ReceiptError::Io { .. })));
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn receipts_written_in_the_background_land_even_when_their_folder_goes_meanwhile() {
        let home = temp_home("background");
        let receipts = Receipts::default();
        receipts.in_background();
        let (r, _, _) = signed();
        let mut second = r.clone();
        second.transfer_id = "second".into();
        let mut third = r.clone();
        third.transfer_id = "third".into();
        let first = receipts.store(r, &home).unwrap();
        let second = receipts.store(second, &home).unwrap();
        receipts.drain();
        assert!(first.is_file() && second.is_file());
        fs::remove_dir_all(home.join("receipts")).unwrap();
        let third = receipts.store(third, &home).unwrap();
        receipts.drain();
        assert!(third.is_file(), "the day's folder is made again");
        fs::remove_dir_all(&home).unwrap();
    }

    /// Change one byte inside each signed value of the stored JSON, one at
    /// a time: the receipt must no longer load and verify.
    #[test]
    fn one_byte_changed_in_the_file_fails() {
        let home = temp_home("tamper");
        let (r, _, receiver) = signed();
        let path = r.store(&home).unwrap();
        let original = fs::read_to_string(&path).unwrap();
        let signed_keys = [
            "transfer_id",
            "share",
            "path",
            "file_hash",
            "total_bytes",
            "chunk_count",
            "cert_fingerprint", // sender and receiver
            "complete_time",
            "value",
            "signer_cert",
            "signer_public_key",
        ];
        let mut tried = 0;
        for key in signed_keys {
            let label = format!("\"{key}\": ");
            let mut found = 0;
            for (at, _) in original.match_indices(&label) {
                found += 1;
                let mut start = at + label.len();
                if original.as_bytes()[start] == b'"' {
                    start += 1;
                }
                let len = original[start..].find(['"', ',', '\n']).unwrap();
                for at in start..start + len {
                    let mut bytes = original.clone().into_bytes();
                    bytes[at] = match bytes[at] {
                        b'0'..=b'8' | b'a'..=b'y' | b'A'..=b'Y' => bytes[at] + 1,
                        b'9' => b'0',
                        b'z' => b'a',
                        b'Z' => b'A',
                        _ => b'x',
                    };
                    fs::write(&path, &bytes).unwrap();
                    let result = Receipt::load(&path).and_then(|r| r.verify(Some(receiver.cert_der())));
                    assert!(result.is_err(), "byte {at} of {key} changed, still verifies");
                    tried += 1;
                }
            }
            assert!(found >= 1, "{key}");
        }
        assert!(tried > 400, "{tried}");
        fs::write(&path, &original).unwrap();
        Receipt::load(&path).unwrap().verify(Some(receiver.cert_der())).unwrap();
        fs::remove_dir_all(&home).unwrap();
    }
}
