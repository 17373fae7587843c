//! DEFT/1 grammar, sans-IO: the messages of docs/PROTOCOL.md as Rust enums,
//! with parse and serialize that round-trip. No sockets, no clock, no files:
//! the transport feeds lines in and writes the lines this module produces.
//!
//! Invariants:
//! - every message is one head line `DEFT <VERB> ...\r\n`, possibly followed
//!   by a fixed number of body lines announced by the head (CHUNK lines of a
//!   manifest, FILES / ENTRIES rows); a line never exceeds [`MAX_LINE`] bytes
//!   including its CRLF;
//! - share names, partner ids and transfer ids are validated tokens
//!   ([`name`]); in-share paths are validated relative paths ([`path`]),
//!   percent-encoded on the wire so spaces survive;
//! - any input, however hostile, yields `Ok` or a [`ProtoError`] that maps to
//!   a `DEFT ERROR` code: never a panic.

pub mod decode;
pub mod encode;
pub mod name;
pub mod path;
pub mod range;

pub use decode::{Decoder, Message, ProtoError};
pub use name::{Name, NameError};
pub use path::{PathError, SharePath};
pub use range::{RangeParseError, RangeSet};

use crate::hash::Hash;

/// The longest line, CRLF included, that either side accepts.
pub const MAX_LINE: usize = 64 * 1024;
/// Protocol version sent in HELLO / WELCOME.
pub const VERSION: &str = "1.0";
/// ALPN identifier of DEFT/1 over QUIC.
pub const ALPN: &[u8] = b"deft/1";
/// Most body lines one message may announce (a 256 GiB file at 64 KiB chunks).
pub const MAX_BODY_LINES: u64 = 4 * 1024 * 1024;

/// At most `max` bytes of `s`, cut on a character boundary, with `...` when
/// cut: error values quote what a peer sent, and a quote must stay short.
fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// `s` with every control character (CR and LF included) replaced by a
/// space: free text (an ERROR message) that stays on its line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A capability named in HELLO / WELCOME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    Chunked,
    Parallel,
    Resume,
    Compress,
    Lock,
    Sync,
    /// A small push's chunks may follow BEGIN_TRANSFER without waiting for
    /// TRANSFER_ACCEPTED (PROTOCOL.md 8.3).
    Eager,
    /// DESCRIBE_PART and FILE_PART: a range of a manifest.
    Part,
    /// BEGIN_TRANSFER with `BASE:<hash>` may give its manifest relative to
    /// the base version's, runs of its chunks as SAME lines (PROTOCOL.md 8.1).
    Same,
    /// AHEAD: chunks of a file still being written are sent before its
    /// BEGIN_TRANSFER, which then names them (PROTOCOL.md 8.6).
    Ahead,
}

/// The manifest a BEGIN_TRANSFER carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushManifest {
    /// One CHUNK line per chunk, checked as FILE_INFO's are.
    Whole(Vec<ChunkLine>),
    /// `LINES:<n>` (capability SAME): CHUNK lines and SAME lines, which
    /// stand for runs of chunks of the BASE version's manifest. `chunks` is
    /// the number of chunks of the manifest they describe. Only the receiver,
    /// which knows the base's manifest, can expand it (and check the sizes
    /// and HASH); the decoder checks that the lines number the chunks 0, 1,
    /// 2, ... up to `chunks`.
    Relative { chunks: u32, lines: Vec<RelativeLine> },
}

impl PushManifest {
    /// Chunks in the manifest described.
    pub fn chunk_count(&self) -> u32 {
        match self {
            PushManifest::Whole(lines) => lines.len() as u32,
            PushManifest::Relative { chunks, .. } => *chunks,
        }
    }
}

/// A body line of a relative manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelativeLine {
    /// `CHUNK <index> <offset> <size> <hash>`: a chunk given in full.
    Chunk(ChunkLine),
    /// `SAME <index> <base_index> <count>`: chunks `index..index + count`
    /// have the sizes and hashes of the base manifest's chunks
    /// `base_index..base_index + count`, and follow each other.
    Same { index: u32, base_index: u32, count: u32 },
}

impl RelativeLine {
    /// The index of the chunk after the ones this line gives.
    pub fn end(&self) -> u64 {
        match self {
            RelativeLine::Chunk(c) => u64::from(c.index) + 1,
            RelativeLine::Same { index, count, .. } => u64::from(*index) + u64::from(*count),
        }
    }
}

/// A FILE_PART: the head of a FILE_INFO (the whole manifest's chunk count
/// and file hash) with only the chunk lines `first..first + chunks.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    pub share: Name,
    pub path: SharePath,
    pub size: u64,
    /// Chunks in the whole manifest.
    pub total: u32,
    pub file_hash: Hash,
    pub mtime_ns: i64,
    pub mode: u32,
    /// Index of the first chunk line.
    pub first: u32,
    pub chunks: Vec<ChunkLine>,
}

/// One manifest line: `CHUNK <index> <offset> <size> <hash>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLine {
    pub index: u32,
    pub offset: u64,
    pub size: u32,
    pub hash: Hash,
}

/// What a share or an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
}

/// The access a partner has to a share. `Read` is the DEFT seed's "send"
/// (the partner may pull), `Write` its "receive" (the partner may push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One row of FILES (answer to DISCOVER): a share the partner is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    pub name: Name,
    pub kind: EntryKind,
    /// Bytes: the file's size, or the sum of the files of a directory share.
    pub size: u64,
    pub access: Access,
    /// Last modification, unix nanoseconds.
    pub mtime_ns: i64,
}

/// One row of ENTRIES (answer to LIST), or the body of STAT_OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    /// Unix permission bits (0o7777 at most).
    pub mode: u32,
    /// Path relative to the share root; empty for the share root itself.
    pub path: SharePath,
}

/// Per-chunk acknowledgement status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStatus {
    Ok,
    /// `ERROR <reason>`: the reason is one token, e.g. HASH_MISMATCH.
    Error(String),
}

/// `DEFT ERROR <CODE> <message>` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadName,
    BadPath,
    TooLarge,
    UnsupportedVersion,
    AuthRequired,
    AuthFailed,
    UnknownShare,
    NotFound,
    AccessDenied,
    Stale,
    HashMismatch,
    UnknownTransfer,
    Busy,
    Conflict,
    Exists,
    NotEmpty,
    IsDir,
    NotDir,
    Internal,
}

/// What a push expects the receiver's current version of its target to be
/// (the `BASE:` field of BEGIN_TRANSFER): a write-back made against one
/// version must not silently replace another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// No field: replace whatever is there (`deftfs send`).
    Any,
    /// `BASE:-`: the target must not exist (a file created in a mount).
    Absent,
    /// `BASE:<hash>`: the target must still be this version.
    Version(Hash),
}

/// One lease, as LOCKED and LEASES carry it:
/// `<token> <holder> <owner> <since_ns> <expires_ns> <path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Fencing token: grows with every grant the serving node makes.
    pub token: u64,
    /// The partner id holding the lease.
    pub holder: Name,
    /// What holds it on that node (a process name, or `manual`).
    pub owner: Name,
    pub since_ns: i64,
    pub expires_ns: i64,
    pub path: SharePath,
}

/// The signature carried by TRANSFER_COMPLETE: `sig:ed25519:<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

/// TRANSFER_COMPLETE's fields: what the data's receiver signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub transfer_id: Name,
    pub file_hash: Hash,
    pub size: u64,
    pub chunks: u32,
    /// RFC 3339 UTC time of completion, as signed (kept verbatim).
    pub time: String,
    pub signature: Signature,
}

/// Messages a client sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `DEFT HELLO <version> <caps,...> WINDOW_SIZE:<n>`
    Hello { version: String, caps: Vec<Capability>, window: u32 },
    /// `DEFT AUTH <partner_id>`
    Auth { partner: Name },
    /// `DEFT DISCOVER`
    Discover,
    /// `DEFT DESCRIBE <share> [<path>]`
    Describe { share: Name, path: SharePath },
    /// `DEFT DESCRIBE_PART <share> <path> OFFSET:<n> LENGTH:<n>`: the
    /// manifest's chunks that hold any of those bytes (capability PART).
    DescribePart { share: Name, path: SharePath, offset: u64, length: u64 },
    /// `DEFT LIST <share> [<path>]`
    List { share: Name, path: SharePath },
    /// `DEFT STAT <share> [<path>]`
    Stat { share: Name, path: SharePath },
    /// `DEFT BEGIN_TRANSFER <transfer_id> <share> <path> SIZE:<n> CHUNKS:<n> HASH:<h>`
    /// followed by CHUNKS `CHUNK` lines: the manifest of the file to push.
    /// Optional trailing fields: `BASE:<hash>|BASE:-` (see [`Base`]),
    /// `FENCE:<token>` (the writer's lease token for the path), then the
    /// new version's `MODE:<octal>` and `MTIME:<ns>`, then `LINES:<n>` for
    /// a manifest relative to the base's ([`PushManifest::Relative`]).
    BeginTransfer {
        transfer_id: Name,
        share: Name,
        path: SharePath,
        size: u64,
        file_hash: Hash,
        base: Base,
        fence: Option<u64>,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        manifest: PushManifest,
        /// `AHEAD:<ahead_id>` (capability AHEAD): the chunks sent ahead
        /// under that id may be used (PROTOCOL.md 8.6).
        ahead: Option<Name>,
    },
    /// `DEFT AHEAD <ahead_id> <share> <path> FROM:<index> CHUNKS:<n>` and
    /// n CHUNK lines, indices `first`.. (capability AHEAD): the next chunks
    /// of a file still being written, sent before its push.
    Ahead { ahead_id: Name, share: Name, path: SharePath, first: u32, chunks: Vec<ChunkLine> },
    /// `DEFT GET <transfer_id> <share> <path> <file_hash> CHUNKS <ranges>`
    Get { transfer_id: Name, share: Name, path: SharePath, file_hash: Hash, chunks: RangeSet },
    /// Pull receipt: the client received the file and signs for it.
    TransferComplete(Completion),
    /// `DEFT WATCH <share>`: send CHANGED lines for this share on this
    /// connection until it closes.
    Watch { share: Name },
    /// `DEFT MKDIR <share> <path> MODE:<octal>`: answered by STAT_OK.
    Mkdir { share: Name, path: SharePath, mode: u32 },
    /// `DEFT REMOVE <share> <path> file|dir`: unlink a file or remove an
    /// empty directory; answered by DONE.
    Remove { share: Name, path: SharePath, kind: EntryKind },
    /// `DEFT RENAME <share> <from> <to> REPLACE|NOREPLACE`: answered by DONE.
    Rename { share: Name, from: SharePath, to: SharePath, replace: bool },
    /// `DEFT SETATTR <share> <path> MODE:<octal>|MODE:- MTIME:<ns>|MTIME:-`:
    /// answered by STAT_OK.
    SetAttr { share: Name, path: SharePath, mode: Option<u32>, mtime_ns: Option<i64> },
    /// `DEFT LOCK <share> <path> TTL:<s> OWNER:<name>`: answered by LOCKED.
    Lock { share: Name, path: SharePath, ttl_s: u32, owner: Name },
    /// `DEFT RENEW <share> <path> TOKEN:<n> TTL:<s>`: answered by LOCKED.
    Renew { share: Name, path: SharePath, token: u64, ttl_s: u32 },
    /// `DEFT UNLOCK <share> <path> TOKEN:<n>`: answered by UNLOCKED.
    Unlock { share: Name, path: SharePath, token: u64 },
    /// `DEFT LOCKS <share>`: answered by LEASES.
    Locks { share: Name },
    /// `DEFT BYE`
    Bye,
}

/// Messages a server sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `DEFT WELCOME <version> <caps,...> WINDOW_SIZE:<n> <session_id>`
    Welcome { version: String, caps: Vec<Capability>, window: u32, session: Name },
    /// `DEFT AUTH_OK <partner_id> VF:<share,share,...>` (VF:- when none)
    AuthOk { partner: Name, shares: Vec<Name> },
    /// `DEFT FILES <count>` then count rows `<name> <kind> <size> <access> <mtime_ns>`
    Files(Vec<ShareRow>),
    /// `DEFT FILE_INFO <share> <path> SIZE:<n> CHUNKS:<n> HASH:<h> MTIME:<ns> MODE:<octal>`
    /// then CHUNKS `CHUNK` lines.
    FileInfo { share: Name, path: SharePath, size: u64, file_hash: Hash, mtime_ns: i64, mode: u32, chunks: Vec<ChunkLine> },
    /// `DEFT FILE_PART <share> <path> SIZE:<n> CHUNKS:<n> HASH:<h> MTIME:<ns> MODE:<octal> FIRST:<i> LINES:<n>`
    /// then LINES `CHUNK` lines, indices FIRST, FIRST+1, ...: part of the
    /// manifest FILE_INFO would give, whose CHUNKS and HASH it names.
    FilePart(FilePart),
    /// `DEFT ENTRIES <count>` then count rows `<kind> <size> <mtime_ns> <mode> <path>`
    Entries(Vec<Entry>),
    /// `DEFT STAT_OK <kind> <size> <mtime_ns> <mode> <path>`
    StatOk(Entry),
    /// `DEFT TRANSFER_ACCEPTED <transfer_id> WINDOW_SIZE:<n> NEED:<ranges>`
    TransferAccepted { transfer_id: Name, window: u32, need: RangeSet },
    /// `DEFT CHUNK_ACK <transfer_id> <index> OK|ERROR <reason>`
    ChunkAck { transfer_id: Name, index: u32, status: AckStatus },
    /// `DEFT CHUNK_ACK_BATCH <transfer_id> <ranges>`: all OK.
    ChunkAckBatch { transfer_id: Name, chunks: RangeSet },
    /// Push receipt: the server stored the file and signs for it.
    TransferComplete(Completion),
    /// `DEFT RECEIPT_OK <transfer_id>`: the server stored the client's pull receipt.
    ReceiptOk { transfer_id: Name },
    /// `DEFT WATCHING <share>`: answer to WATCH.
    Watching { share: Name },
    /// `DEFT CHANGED <share> [<path>]`: something at or under `path` changed
    /// (unprompted, after WATCH). The root path means "anything in the share".
    Changed { share: Name, path: SharePath },
    /// `DEFT DONE <share> [<path>]`: REMOVE or RENAME (path: the new name) done.
    Done { share: Name, path: SharePath },
    /// `DEFT LOCKED <share> <lease row>`: answer to LOCK and RENEW.
    Locked { share: Name, lease: LeaseRow },
    /// `DEFT UNLOCKED <share> <path>`: answer to UNLOCK.
    Unlocked { share: Name, path: SharePath },
    /// `DEFT LEASES <share> <count> LOCKABLE:<pattern,...>|LOCKABLE:-` then
    /// count lease rows: the share's live leases and lockable patterns.
    Leases { share: Name, lockable: Vec<String>, leases: Vec<LeaseRow> },
    /// `DEFT BYE`
    Bye,
    /// `DEFT ERROR <CODE> <message>`
    Error { code: ErrorCode, message: String },
}

/// Header line of a chunk payload stream (one QUIC uni stream per chunk).
/// Push: `DEFT PUT <transfer_id> <index> SIZE:<n> HASH:<h>`;
/// pull: `DEFT CHUNK_DATA <transfer_id> <index> SIZE:<n> HASH:<h>`.
/// Exactly SIZE bytes follow the CRLF, then the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataHeader {
    Put { transfer_id: Name, index: u32, size: u32, hash: Hash },
    ChunkData { transfer_id: Name, index: u32, size: u32, hash: Hash },
}
