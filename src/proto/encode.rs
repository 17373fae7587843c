//! Serializing messages to lines: the inverse of [`super::decode`].
//!
//! Guarantee: for every message whose fields hold values the grammar
//! allows, `encode` produces lines that the matching [`super::Decoder`]
//! turns back into an equal message. Names, paths and hashes are valid by
//! construction; the caller keeps the rest in bounds: versions, TIME and
//! ack reasons are 1 to 64 printable ASCII characters, windows at least 1,
//! manifests contiguous and covering SIZE, ranges within
//! [`super::RangeSet::MAX_WIRE_LEN`]. MODE is masked to its permission
//! bits. Each line ends in CRLF. Only `DEFT ERROR` carries free text, and
//! its message is sanitized and truncated here so that the line always
//! fits [`MAX_LINE`].

use super::{
    Access, AckStatus, Base, Capability, ChunkLine, Completion, DataHeader, Entry, EntryKind, ErrorCode, FilePart, LeaseRow, Name,
    PushManifest, RelativeLine, Request, Response, SharePath, Signature, MAX_LINE,
};
use base64::Engine as _;
use std::fmt::{self, Write as _};

impl Request {
    /// All lines of the message, each ending in CRLF.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        match self {
            Request::Hello { version, caps, window } => {
                line(&mut out, format_args!("DEFT HELLO {version} {} WINDOW_SIZE:{window}", CapList(caps)))
            }
            Request::Auth { partner } => line(&mut out, format_args!("DEFT AUTH {partner}")),
            Request::Discover => line(&mut out, format_args!("DEFT DISCOVER")),
            Request::Describe { share, path } => line(&mut out, format_args!("DEFT DESCRIBE {share}{}", OptionalPath(path))),
            Request::DescribePart { share, path, offset, length } => {
                line(&mut out, format_args!("DEFT DESCRIBE_PART {share} {} OFFSET:{offset} LENGTH:{length}", path.to_wire()))
            }
            Request::List { share, path } => line(&mut out, format_args!("DEFT LIST {share}{}", OptionalPath(path))),
            Request::Stat { share, path } => line(&mut out, format_args!("DEFT STAT {share}{}", OptionalPath(path))),
            Request::BeginTransfer { transfer_id, share, path, size, file_hash, base, fence, mode, mtime_ns, manifest, ahead } => {
                let base = match base {
                    Base::Any => String::new(),
                    Base::Absent => " BASE:-".to_string(),
                    Base::Version(h) => format!(" BASE:{h}"),
                };
                let fence = fence.map(|t| format!(" FENCE:{t}")).unwrap_or_default();
                let mode = mode.map(|m| format!(" MODE:{:o}", m & MODE_BITS)).unwrap_or_default();
                let mtime = mtime_ns.map(|t| format!(" MTIME:{t}")).unwrap_or_default();
                let lines = match manifest {
                    PushManifest::Whole(_) => String::new(),
                    PushManifest::Relative { lines, .. } => format!(" LINES:{}", lines.len()),
                };
                let ahead = ahead.as_ref().map(|id| format!(" AHEAD:{id}")).unwrap_or_default();
                line(
                    &mut out,
                    format_args!(
                        "DEFT BEGIN_TRANSFER {transfer_id} {share} {} SIZE:{size} CHUNKS:{} HASH:{file_hash}{base}{fence}{mode}{mtime}{lines}{ahead}",
                        path.to_wire(),
                        manifest.chunk_count()
                    ),
                );
                match manifest {
                    PushManifest::Whole(chunks) => chunk_lines(&mut out, chunks),
                    PushManifest::Relative { lines, .. } => relative_lines(&mut out, lines),
                }
            }
            Request::Ahead { ahead_id, share, path, first, chunks } => {
                line(&mut out, format_args!("DEFT AHEAD {ahead_id} {share} {} FROM:{first} CHUNKS:{}", path.to_wire(), chunks.len()));
                chunk_lines(&mut out, chunks);
            }
            Request::Get { transfer_id, share, path, file_hash, chunks } => {
                line(&mut out, format_args!("DEFT GET {transfer_id} {share} {} {file_hash} CHUNKS {chunks}", path.to_wire()))
            }
            Request::TransferComplete(completion) => completion_line(&mut out, completion),
            Request::Watch { share } => line(&mut out, format_args!("DEFT WATCH {share}")),
            Request::Mkdir { share, path, mode } => {
                line(&mut out, format_args!("DEFT MKDIR {share} {} MODE:{:o}", path.to_wire(), mode & MODE_BITS))
            }
            Request::Remove { share, path, kind } => {
                line(&mut out, format_args!("DEFT REMOVE {share} {} {}", path.to_wire(), kind.as_str()))
            }
            Request::Rename { share, from, to, replace } => line(
                &mut out,
                format_args!("DEFT RENAME {share} {} {} {}", from.to_wire(), to.to_wire(), if *replace { "REPLACE" } else { "NOREPLACE" }),
            ),
            Request::SetAttr { share, path, mode, mtime_ns } => {
                let mode = mode.map(|m| format!("{:o}", m & MODE_BITS)).unwrap_or_else(|| "-".into());
                let mtime = mtime_ns.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
                line(&mut out, format_args!("DEFT SETATTR {share} {} MODE:{mode} MTIME:{mtime}", path.to_wire()))
            }
            Request::Lock { share, path, ttl_s, owner } => {
                line(&mut out, format_args!("DEFT LOCK {share} {} TTL:{ttl_s} OWNER:{owner}", path.to_wire()))
            }
            Request::Renew { share, path, token, ttl_s } => {
                line(&mut out, format_args!("DEFT RENEW {share} {} TOKEN:{token} TTL:{ttl_s}", path.to_wire()))
            }
            Request::Unlock { share, path, token } => line(&mut out, format_args!("DEFT UNLOCK {share} {} TOKEN:{token}", path.to_wire())),
            Request::Locks { share } => line(&mut out, format_args!("DEFT LOCKS {share}")),
            Request::Bye => line(&mut out, format_args!("DEFT BYE")),
        }
        out
    }
}

impl Response {
    /// All lines of the message, each ending in CRLF. An Error's message is
    /// sanitized (CR, LF and control characters replaced) and truncated so
    /// the line fits MAX_LINE.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        match self {
            Response::Welcome { version, caps, window, session } => {
                line(&mut out, format_args!("DEFT WELCOME {version} {} WINDOW_SIZE:{window} {session}", CapList(caps)))
            }
            Response::AuthOk { partner, shares } => line(&mut out, format_args!("DEFT AUTH_OK {partner} VF:{}", NameList(shares))),
            Response::Files(rows) => {
                line(&mut out, format_args!("DEFT FILES {}", rows.len()));
                for row in rows {
                    line(
                        &mut out,
                        format_args!("{} {} {} {} {}", row.name, row.kind.as_str(), row.size, row.access.as_str(), row.mtime_ns),
                    );
                }
            }
            Response::FileInfo { share, path, size, file_hash, mtime_ns, mode, chunks } => {
                line(
                    &mut out,
                    format_args!(
                        "DEFT FILE_INFO {share} {} SIZE:{size} CHUNKS:{} HASH:{file_hash} MTIME:{mtime_ns} MODE:{:o}",
                        path.to_wire(),
                        chunks.len(),
                        mode & MODE_BITS
                    ),
                );
                chunk_lines(&mut out, chunks);
            }
            Response::FilePart(FilePart { share, path, size, total, file_hash, mtime_ns, mode, first, chunks }) => {
                line(
                    &mut out,
                    format_args!(
                        "DEFT FILE_PART {share} {} SIZE:{size} CHUNKS:{total} HASH:{file_hash} MTIME:{mtime_ns} MODE:{:o} FIRST:{first} LINES:{}",
                        path.to_wire(),
                        mode & MODE_BITS,
                        chunks.len(),
                    ),
                );
                chunk_lines(&mut out, chunks);
            }
            Response::Entries(entries) => {
                line(&mut out, format_args!("DEFT ENTRIES {}", entries.len()));
                for entry in entries {
                    line(&mut out, format_args!("{}", EntryRow(entry)));
                }
            }
            Response::StatOk(entry) => line(&mut out, format_args!("DEFT STAT_OK {}", EntryRow(entry))),
            Response::TransferAccepted { transfer_id, window, need } => {
                line(&mut out, format_args!("DEFT TRANSFER_ACCEPTED {transfer_id} WINDOW_SIZE:{window} NEED:{need}"))
            }
            Response::ChunkAck { transfer_id, index, status } => match status {
                AckStatus::Ok => line(&mut out, format_args!("DEFT CHUNK_ACK {transfer_id} {index} OK")),
                AckStatus::Error(reason) => line(&mut out, format_args!("DEFT CHUNK_ACK {transfer_id} {index} ERROR {reason}")),
            },
            Response::ChunkAckBatch { transfer_id, chunks } => line(&mut out, format_args!("DEFT CHUNK_ACK_BATCH {transfer_id} {chunks}")),
            Response::TransferComplete(completion) => completion_line(&mut out, completion),
            Response::ReceiptOk { transfer_id } => line(&mut out, format_args!("DEFT RECEIPT_OK {transfer_id}")),
            Response::Watching { share } => line(&mut out, format_args!("DEFT WATCHING {share}")),
            Response::Changed { share, path } => line(&mut out, format_args!("DEFT CHANGED {share}{}", OptionalPath(path))),
            Response::Done { share, path } => line(&mut out, format_args!("DEFT DONE {share}{}", OptionalPath(path))),
            Response::Locked { share, lease } => line(&mut out, format_args!("DEFT LOCKED {share} {}", LeaseLine(lease))),
            Response::Unlocked { share, path } => line(&mut out, format_args!("DEFT UNLOCKED {share} {}", path.to_wire())),
            Response::Leases { share, lockable, leases } => {
                let patterns = if lockable.is_empty() { "-".to_string() } else { lockable.join(",") };
                line(&mut out, format_args!("DEFT LEASES {share} {} LOCKABLE:{patterns}", leases.len()));
                for lease in leases {
                    line(&mut out, format_args!("{}", LeaseLine(lease)));
                }
            }
            Response::Bye => line(&mut out, format_args!("DEFT BYE")),
            Response::Error { code, message } => error_line(&mut out, *code, message),
        }
        out
    }

    /// Convenience: `Response::Error` with a message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error { code, message: message.into() }
    }
}

impl DataHeader {
    /// The header line, ending in CRLF.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        match self {
            DataHeader::Put { transfer_id, index, size, hash } => {
                line(&mut out, format_args!("DEFT PUT {transfer_id} {index} SIZE:{size} HASH:{hash}"))
            }
            DataHeader::ChunkData { transfer_id, index, size, hash } => {
                line(&mut out, format_args!("DEFT CHUNK_DATA {transfer_id} {index} SIZE:{size} HASH:{hash}"))
            }
        }
        out
    }
}

/// Permission bits a MODE field carries; file-type bits of a `st_mode` are
/// dropped rather than sent.
const MODE_BITS: u32 = 0o7777;

/// Append one line and its CRLF.
fn line(out: &mut String, args: fmt::Arguments<'_>) {
    // Writing into a String cannot fail.
    let _ = out.write_fmt(args);
    out.push_str("\r\n");
}

/// CHUNK lines, written without the formatting machinery: a manifest of a
/// large file is thousands of them, and `format_args!` took most of the
/// encoding time.
fn chunk_lines(out: &mut String, chunks: &[ChunkLine]) {
    // "CHUNK " + three numbers and their spaces + the hash + CRLF.
    out.reserve(chunks.len() * (6 + 10 + 1 + 20 + 1 + 10 + 1 + 71 + 2));
    for c in chunks {
        chunk_line(out, c);
    }
}

/// The body of a relative manifest: CHUNK and SAME lines.
fn relative_lines(out: &mut String, lines: &[RelativeLine]) {
    for l in lines {
        match l {
            RelativeLine::Chunk(c) => chunk_line(out, c),
            RelativeLine::Same { index, base_index, count } => {
                out.push_str("SAME ");
                push_decimal(out, u64::from(*index));
                out.push(' ');
                push_decimal(out, u64::from(*base_index));
                out.push(' ');
                push_decimal(out, u64::from(*count));
                out.push_str("\r\n");
            }
        }
    }
}

fn chunk_line(out: &mut String, c: &ChunkLine) {
    out.push_str("CHUNK ");
    push_decimal(out, u64::from(c.index));
    out.push(' ');
    push_decimal(out, c.offset);
    out.push(' ');
    push_decimal(out, u64::from(c.size));
    out.push(' ');
    let hash = c.hash.to_text();
    // `to_text` writes ASCII only.
    out.push_str(std::str::from_utf8(&hash).unwrap_or_default());
    out.push_str("\r\n");
}

/// `n` in decimal, without leading zeros.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

fn completion_line(out: &mut String, c: &Completion) {
    line(
        out,
        format_args!(
            "DEFT TRANSFER_COMPLETE {} HASH:{} SIZE:{} CHUNKS:{} TIME:{} {}",
            c.transfer_id, c.file_hash, c.size, c.chunks, c.time, c.signature
        ),
    );
}

/// `DEFT ERROR <CODE> <message>`, the message on one line and cut to fit.
fn error_line(out: &mut String, code: ErrorCode, message: &str) {
    let head = format!("DEFT ERROR {}", code.as_str());
    let clean = super::one_line(message);
    // Room left once the head, the separating space and the CRLF are in.
    let room = MAX_LINE - head.len() - 3;
    let clean = if clean.len() > room { super::excerpt(&clean, room - 3) } else { clean };
    if clean.is_empty() {
        line(out, format_args!("{head}"));
    } else {
        line(out, format_args!("{head} {clean}"));
    }
}

/// `CHUNKED,RESUME`, or `-` for none.
struct CapList<'a>(&'a [Capability]);

impl fmt::Display for CapList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        comma_list(f, self.0.iter().map(|c| c.as_str()))
    }
}

/// `orders,invoices`, or `-` for none.
struct NameList<'a>(&'a [Name]);

impl fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        comma_list(f, self.0.iter().map(Name::as_str))
    }
}

fn comma_list<'a>(f: &mut fmt::Formatter<'_>, mut items: impl Iterator<Item = &'a str>) -> fmt::Result {
    let Some(first) = items.next() else {
        return f.write_str("-");
    };
    f.write_str(first)?;
    for item in items {
        write!(f, ",{item}")?;
    }
    Ok(())
}

/// ` <path-wire>`, or nothing for the root (DESCRIBE, LIST, STAT).
struct OptionalPath<'a>(&'a SharePath);

impl fmt::Display for OptionalPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_root() {
            Ok(())
        } else {
            write!(f, " {}", self.0.to_wire())
        }
    }
}

/// `<token> <holder> <owner> <since_ns> <expires_ns> <path-wire>` (LOCKED, LEASES).
struct LeaseLine<'a>(&'a LeaseRow);

impl fmt::Display for LeaseLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.0;
        write!(f, "{} {} {} {} {} {}", l.token, l.holder, l.owner, l.since_ns, l.expires_ns, l.path.to_wire())
    }
}

/// `<kind> <size> <mtime_ns> <mode-octal> <path-wire>` (ENTRIES, STAT_OK).
struct EntryRow<'a>(&'a Entry);

impl fmt::Display for EntryRow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        write!(f, "{} {} {} {:o} {}", e.kind.as_str(), e.size, e.mtime_ns, e.mode & MODE_BITS, e.path.to_wire())
    }
}

impl EntryKind {
    /// `file` or `dir`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
        }
    }
}

impl std::str::FromStr for EntryKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "file" => Ok(EntryKind::File),
            "dir" => Ok(EntryKind::Dir),
            other => Err(format!("unknown kind {:?}: expected file or dir", super::excerpt(other, 32))),
        }
    }
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadRequest,
        ErrorCode::BadName,
        ErrorCode::BadPath,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::AuthRequired,
        ErrorCode::AuthFailed,
        ErrorCode::UnknownShare,
        ErrorCode::NotFound,
        ErrorCode::AccessDenied,
        ErrorCode::Stale,
        ErrorCode::HashMismatch,
        ErrorCode::UnknownTransfer,
        ErrorCode::Busy,
        ErrorCode::Conflict,
        ErrorCode::Exists,
        ErrorCode::NotEmpty,
        ErrorCode::IsDir,
        ErrorCode::NotDir,
        ErrorCode::Internal,
    ];

    /// Upper-case wire form, e.g. `ACCESS_DENIED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::BadName => "BAD_NAME",
            ErrorCode::BadPath => "BAD_PATH",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::UnknownShare => "UNKNOWN_SHARE",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AccessDenied => "ACCESS_DENIED",
            ErrorCode::Stale => "STALE",
            ErrorCode::HashMismatch => "HASH_MISMATCH",
            ErrorCode::UnknownTransfer => "UNKNOWN_TRANSFER",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Exists => "EXISTS",
            ErrorCode::NotEmpty => "NOT_EMPTY",
            ErrorCode::IsDir => "IS_DIR",
            ErrorCode::NotDir => "NOT_DIR",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL.into_iter().find(|code| code.as_str() == s).ok_or_else(|| format!("unknown error code {:?}", super::excerpt(s, 32)))
    }
}

impl Capability {
    pub const ALL: [Capability; 10] = [
        Capability::Chunked,
        Capability::Parallel,
        Capability::Resume,
        Capability::Compress,
        Capability::Lock,
        Capability::Sync,
        Capability::Eager,
        Capability::Part,
        Capability::Same,
        Capability::Ahead,
    ];

    /// Upper-case wire form, e.g. `CHUNKED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Capability::Chunked => "CHUNKED",
            Capability::Parallel => "PARALLEL",
            Capability::Resume => "RESUME",
            Capability::Compress => "COMPRESS",
            Capability::Lock => "LOCK",
            Capability::Sync => "SYNC",
            Capability::Eager => "EAGER",
            Capability::Part => "PART",
            Capability::Same => "SAME",
            Capability::Ahead => "AHEAD",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Capability {
    type Err = String;
    /// Known names only; a peer's unknown capability is for the decoder to
    /// skip, not an error of the message.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL.into_iter().find(|cap| cap.as_str() == s).ok_or_else(|| format!("unknown capability {:?}", super::excerpt(s, 32)))
    }
}

impl Access {
    /// `read`, `write` or `read-write`, on the wire and in config.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "read-write",
        }
    }
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Access::Read),
            "write" => Ok(Access::Write),
            "read-write" => Ok(Access::ReadWrite),
            other => Err(format!("unknown access {other:?}: expected read, write or read-write")),
        }
    }
}

impl Signature {
    pub const PREFIX: &'static str = "sig:ed25519:";
}

impl fmt::Display for Signature {
    /// `sig:ed25519:<base64 standard, padded>`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for Signature {
    type Err = String;
    /// Exactly 64 bytes in canonical padded base64 (88 characters).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("invalid signature {:?}: expected sig:ed25519:<base64 of 64 bytes>", super::excerpt(s, 100));
        let b64 = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
        if b64.len() != 88 {
            return Err(err());
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| err())?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| err())?;
        Ok(Signature(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::proto::{Decoder, Message, RangeSet, ShareRow};
    use proptest::prelude::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// Decode `text` (lines ending in CRLF) as exactly one message.
    fn decode<M: Message + std::fmt::Debug>(text: &str) -> M {
        let body = text.strip_suffix("\r\n").expect("ends in CRLF");
        let lines: Vec<&str> = body.split("\r\n").collect();
        let mut decoder = Decoder::<M>::default();
        let mut out = None;
        for (i, line) in lines.iter().enumerate() {
            assert!(line.len() + 2 <= MAX_LINE, "line {i} too long");
            assert!(!line.contains(['\r', '\n']), "line {i} holds a bare CR or LF: {line:?}");
            let msg = decoder.push_line(line).unwrap_or_else(|e| panic!("line {i} {line:?}: {e}"));
            assert_eq!(msg.is_some(), i + 1 == lines.len(), "message ended at line {i} of {}", lines.len());
            out = msg;
        }
        out.unwrap()
    }

    #[test]
    fn writes_the_documented_lines() {
        let hello = Request::Hello { version: "1.0".into(), caps: vec![Capability::Chunked, Capability::Resume], window: 8 };
        assert_eq!(hello.encode(), "DEFT HELLO 1.0 CHUNKED,RESUME WINDOW_SIZE:8\r\n");
        let bare = Request::Hello { version: "1.0".into(), caps: vec![], window: 8 };
        assert_eq!(bare.encode(), "DEFT HELLO 1.0 - WINDOW_SIZE:8\r\n");
        let root = Request::List { share: name("docs"), path: SharePath::root() };
        assert_eq!(root.encode(), "DEFT LIST docs\r\n");
        let sub = Request::Stat { share: name("docs"), path: SharePath::parse("a b/c%").unwrap() };
        assert_eq!(sub.encode(), "DEFT STAT docs a%20b/c%25\r\n");
        let auth_ok = Response::AuthOk { partner: name("acme"), shares: vec![] };
        assert_eq!(auth_ok.encode(), "DEFT AUTH_OK acme VF:-\r\n");
        let files = Response::Files(vec![ShareRow {
            name: name("orders"),
            kind: EntryKind::Dir,
            size: 3,
            access: Access::ReadWrite,
            mtime_ns: -1,
        }]);
        assert_eq!(files.encode(), "DEFT FILES 1\r\norders dir 3 read-write -1\r\n");
        let h = Hash::of(b"x");
        let info = Response::FileInfo {
            share: name("s"),
            path: SharePath::parse("f").unwrap(),
            size: 2,
            file_hash: h,
            mtime_ns: 5,
            mode: 0o100644,
            chunks: vec![ChunkLine { index: 0, offset: 0, size: 2, hash: h }],
        };
        assert_eq!(info.encode(), format!("DEFT FILE_INFO s f SIZE:2 CHUNKS:1 HASH:{h} MTIME:5 MODE:644\r\nCHUNK 0 0 2 {h}\r\n"));
        let part = Response::FilePart(FilePart {
            share: name("s"),
            path: SharePath::parse("f").unwrap(),
            size: 9,
            total: 3,
            file_hash: h,
            mtime_ns: 5,
            mode: 0o644,
            first: 1,
            chunks: vec![ChunkLine { index: 1, offset: 2, size: 3, hash: h }],
        });
        assert_eq!(
            part.encode(),
            format!("DEFT FILE_PART s f SIZE:9 CHUNKS:3 HASH:{h} MTIME:5 MODE:644 FIRST:1 LINES:1\r\nCHUNK 1 2 3 {h}\r\n")
        );
        let describe = Request::DescribePart { share: name("s"), path: SharePath::root(), offset: 0, length: 7 };
        assert_eq!(describe.encode(), "DEFT DESCRIBE_PART s . OFFSET:0 LENGTH:7\r\n");
        let nack = Response::ChunkAck { transfer_id: name("t"), index: 4, status: AckStatus::Error("HASH_MISMATCH".into()) };
        assert_eq!(nack.encode(), "DEFT CHUNK_ACK t 4 ERROR HASH_MISMATCH\r\n");
        let put = DataHeader::Put { transfer_id: name("t"), index: 1, size: 9, hash: h };
        assert_eq!(put.encode(), format!("DEFT PUT t 1 SIZE:9 HASH:{h}\r\n"));
    }

    #[test]
    fn error_message_is_one_line_that_fits() {
        let e = Response::error(ErrorCode::NotFound, "no such file:\r\nDEFT BYE\t\u{0}x");
        assert_eq!(e.encode(), "DEFT ERROR NOT_FOUND no such file:  DEFT BYE  x\r\n");
        assert_eq!(Response::error(ErrorCode::Busy, "").encode(), "DEFT ERROR BUSY\r\n");

        let huge = Response::error(ErrorCode::Internal, "é".repeat(MAX_LINE));
        let text = huge.encode();
        assert!(text.len() <= MAX_LINE, "{}", text.len());
        match decode::<Response>(&text) {
            Response::Error { code: ErrorCode::Internal, message } => {
                assert!(message.ends_with("...") && message.starts_with("éé"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            assert!(code.as_str().bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
        }
        assert_eq!(ErrorCode::UnsupportedVersion.as_str(), "UNSUPPORTED_VERSION");
        assert!("bad_request".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn capabilities_round_trip() {
        for cap in Capability::ALL {
            assert_eq!(cap.as_str().parse::<Capability>(), Ok(cap));
        }
        assert!("TELEPORT".parse::<Capability>().is_err());
    }

    #[test]
    fn signature_text() {
        let sig = Signature([0xAB; 64]);
        let text = sig.to_string();
        assert!(text.starts_with("sig:ed25519:") && text.ends_with("=="), "{text}");
        assert_eq!(text.parse::<Signature>(), Ok(sig.clone()));
        assert_eq!(format!("{sig:?}"), text);
        let b64 = &text["sig:ed25519:".len()..];
        for bad in [
            String::new(),
            "sig:ed25519:".to_string(),
            format!("sig:rsa:{b64}"),
            format!("sig:ed25519:{}", &b64[..86]),
            format!("sig:ed25519:{}AA", &b64[..86]),
            format!("sig:ed25519:{}q==", &b64[..85]),
            format!("sig:ed25519:{b64}=="),
            format!("sig:ed25519:{}", "A".repeat(88)),
        ] {
            assert!(bad.parse::<Signature>().is_err(), "{bad}");
        }
    }

    fn arb_name() -> impl Strategy<Value = Name> {
        "[A-Za-z0-9._-]{1,12}".prop_filter_map("reserved", |s| Name::new(s).ok())
    }

    fn arb_path() -> impl Strategy<Value = SharePath> {
        let component = "[^/\\\\\\p{Cc}]{1,8}".prop_filter("dot component", |c| c != "." && c != "..");
        prop::collection::vec(component, 0..4).prop_map(|parts| SharePath::parse(&parts.join("/")).unwrap())
    }

    fn arb_file_path() -> impl Strategy<Value = SharePath> {
        arb_path().prop_filter("root", |p| !p.is_root())
    }

    fn arb_lease() -> impl Strategy<Value = LeaseRow> {
        (any::<u64>(), arb_name(), arb_name(), any::<i64>(), any::<i64>(), arb_file_path())
            .prop_map(|(token, holder, owner, since_ns, expires_ns, path)| LeaseRow { token, holder, owner, since_ns, expires_ns, path })
    }

    fn arb_hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>().prop_map(Hash)
    }

    fn arb_signature() -> impl Strategy<Value = Signature> {
        prop::collection::vec(any::<u8>(), 64).prop_map(|v| Signature(v.try_into().unwrap()))
    }

    /// Version, TIME, ack reason: 1 to 64 printable ASCII characters.
    fn arb_word() -> impl Strategy<Value = String> {
        "[!-~]{1,64}"
    }

    fn arb_caps() -> impl Strategy<Value = Vec<Capability>> {
        prop::collection::vec(prop::sample::select(Capability::ALL.to_vec()), 0..8)
    }

    fn arb_ranges() -> impl Strategy<Value = RangeSet> {
        prop_oneof![
            prop::collection::vec(any::<u32>(), 0..6).prop_map(|v| v.into_iter().collect()),
            prop::collection::vec(0u32..64, 0..30).prop_map(|v| v.into_iter().collect()),
            (any::<u32>(), any::<u32>()).prop_map(|(a, b)| RangeSet::span(a.min(b), a.max(b))),
        ]
    }

    /// A valid manifest: (size, chunks).
    fn arb_manifest() -> impl Strategy<Value = (u64, Vec<ChunkLine>)> {
        prop::collection::vec((1u32.., arb_hash()), 0..6).prop_map(|pieces| {
            let mut offset = 0;
            let mut chunks = Vec::new();
            for (index, (size, hash)) in (0u32..).zip(pieces) {
                chunks.push(ChunkLine { index, offset, size, hash });
                offset += u64::from(size);
            }
            (offset, chunks)
        })
    }

    /// A relative manifest the decoder takes: (SIZE, CHUNKS, lines). Runs
    /// of base chunks stand for chunks of 1 to 3 bytes each, so that SIZE
    /// can be right; the decoder cannot check that, the receiver does.
    fn arb_relative() -> impl Strategy<Value = (u64, u32, Vec<RelativeLine>)> {
        let piece = prop_oneof![
            (1u32..1000, arb_hash()).prop_map(|(size, hash)| (true, size, hash, 0u32)),
            (1u32..5, any::<u32>()).prop_map(|(count, base)| (false, count, Hash([0u8; 32]), base % (u32::MAX - 5))),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|pieces| {
            let (mut offset, mut index, mut lines) = (0u64, 0u32, Vec::new());
            for (chunk, n, hash, base_index) in pieces {
                if chunk {
                    lines.push(RelativeLine::Chunk(ChunkLine { index, offset, size: n, hash }));
                    offset += u64::from(n);
                    index += 1;
                } else {
                    lines.push(RelativeLine::Same { index, base_index, count: n });
                    offset += 2 * u64::from(n);
                    index += n;
                }
            }
            (offset, index, lines)
        })
    }

    /// A valid FILE_PART: any run of the lines of a valid manifest.
    fn arb_file_part() -> impl Strategy<Value = FilePart> {
        (arb_name(), arb_path(), arb_hash(), any::<i64>(), 0u32..=0o7777, arb_manifest(), any::<(usize, usize)>()).prop_map(
            |(share, path, file_hash, mtime_ns, mode, (size, chunks), (a, b))| {
                let total = chunks.len();
                let (from, to) = (a % (total + 1), b % (total + 1));
                let (from, to) = (from.min(to), from.max(to));
                FilePart {
                    share,
                    path,
                    size,
                    total: total as u32,
                    file_hash,
                    mtime_ns,
                    mode,
                    first: from as u32,
                    chunks: chunks[from..to].to_vec(),
                }
            },
        )
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (prop::sample::select(vec![EntryKind::File, EntryKind::Dir]), any::<u64>(), any::<i64>(), 0u32..=0o7777, arb_path())
            .prop_map(|(kind, size, mtime_ns, mode, path)| Entry { kind, size, mtime_ns, mode, path })
    }

    fn arb_completion() -> impl Strategy<Value = Completion> {
        (arb_name(), arb_hash(), any::<u64>(), any::<u32>(), arb_word(), arb_signature()).prop_map(
            |(transfer_id, file_hash, size, chunks, time, signature)| Completion { transfer_id, file_hash, size, chunks, time, signature },
        )
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (arb_word(), arb_caps(), 1u32..).prop_map(|(version, caps, window)| Request::Hello { version, caps, window }),
            arb_name().prop_map(|partner| Request::Auth { partner }),
            Just(Request::Discover),
            (arb_name(), arb_path()).prop_map(|(share, path)| Request::Describe { share, path }),
            (arb_name(), arb_path(), any::<u64>(), any::<u64>()).prop_map(|(share, path, offset, length)| Request::DescribePart {
                share,
                path,
                offset,
                length
            }),
            (arb_name(), arb_path()).prop_map(|(share, path)| Request::List { share, path }),
            (arb_name(), arb_path()).prop_map(|(share, path)| Request::Stat { share, path }),
            (arb_name(), arb_name(), arb_path(), arb_hash(), arb_manifest()).prop_map(
                |(transfer_id, share, path, file_hash, (size, chunks))| {
                    Request::BeginTransfer {
                        transfer_id,
                        share,
                        path,
                        size,
                        file_hash,
                        base: Base::Any,
                        fence: None,
                        mode: None,
                        mtime_ns: None,
                        manifest: PushManifest::Whole(chunks),
                        ahead: None,
                    }
                }
            ),
            (arb_name(), arb_file_path(), arb_hash(), arb_hash(), arb_relative()).prop_map(
                |(share, path, file_hash, base, (size, chunks, lines))| Request::BeginTransfer {
                    transfer_id: share.clone(),
                    share,
                    path,
                    size,
                    file_hash,
                    base: Base::Version(base),
                    fence: None,
                    mode: None,
                    mtime_ns: Some(1),
                    manifest: PushManifest::Relative { chunks, lines },
                    ahead: Some(Name::new("a-1").unwrap()),
                }
            ),
            (
                (arb_name(), arb_file_path(), arb_hash(), prop::option::of(arb_hash()), any::<bool>(), prop::option::of(any::<u64>())),
                (prop::option::of(0u32..=0o7777), prop::option::of(any::<i64>()))
            )
                .prop_map(|((share, path, file_hash, base, absent, fence), (mode, mtime_ns))| {
                    let base = match (base, absent) {
                        (Some(h), _) => Base::Version(h),
                        (None, true) => Base::Absent,
                        (None, false) => Base::Any,
                    };
                    let transfer_id = share.clone();
                    let manifest = PushManifest::Whole(vec![]);
                    Request::BeginTransfer {
                        transfer_id,
                        share,
                        path,
                        size: 0,
                        file_hash,
                        base,
                        fence,
                        mode,
                        mtime_ns,
                        manifest,
                        ahead: None,
                    }
                }),
            (arb_name(), arb_name(), arb_file_path(), 0u32..1000, arb_manifest()).prop_map(
                |(ahead_id, share, path, first, (_, chunks))| {
                    // The same lines, numbered from `first`, starting anywhere.
                    let chunks = chunks
                        .into_iter()
                        .enumerate()
                        .map(|(k, c)| ChunkLine { index: first + k as u32, offset: c.offset + u64::from(first), ..c })
                        .collect();
                    Request::Ahead { ahead_id, share, path, first, chunks }
                }
            ),
            (arb_name(), arb_file_path(), 0u32..=0o7777).prop_map(|(share, path, mode)| Request::Mkdir { share, path, mode }),
            (arb_name(), arb_file_path(), any::<bool>()).prop_map(|(share, path, dir)| Request::Remove {
                share,
                path,
                kind: if dir { EntryKind::Dir } else { EntryKind::File }
            }),
            (arb_name(), arb_file_path(), arb_file_path(), any::<bool>()).prop_map(|(share, from, to, replace)| Request::Rename {
                share,
                from,
                to,
                replace
            }),
            (arb_name(), arb_file_path(), prop::option::of(0u32..=0o7777), prop::option::of(any::<i64>()))
                .prop_map(|(share, path, mode, mtime_ns)| Request::SetAttr { share, path, mode, mtime_ns }),
            (arb_name(), arb_file_path(), 1u32..=86_400, arb_name()).prop_map(|(share, path, ttl_s, owner)| Request::Lock {
                share,
                path,
                ttl_s,
                owner
            }),
            (arb_name(), arb_file_path(), any::<u64>(), 1u32..=86_400).prop_map(|(share, path, token, ttl_s)| Request::Renew {
                share,
                path,
                token,
                ttl_s
            }),
            (arb_name(), arb_file_path(), any::<u64>()).prop_map(|(share, path, token)| Request::Unlock { share, path, token }),
            arb_name().prop_map(|share| Request::Locks { share }),
            (arb_name(), arb_name(), arb_path(), arb_hash(), arb_ranges())
                .prop_map(|(transfer_id, share, path, file_hash, chunks)| Request::Get { transfer_id, share, path, file_hash, chunks }),
            arb_completion().prop_map(Request::TransferComplete),
            arb_name().prop_map(|share| Request::Watch { share }),
            Just(Request::Bye),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        let share_row = (
            arb_name(),
            prop::sample::select(vec![EntryKind::File, EntryKind::Dir]),
            any::<u64>(),
            prop::sample::select(vec![Access::Read, Access::Write, Access::ReadWrite]),
            any::<i64>(),
        )
            .prop_map(|(name, kind, size, access, mtime_ns)| ShareRow { name, kind, size, access, mtime_ns });
        prop_oneof![
            (arb_word(), arb_caps(), 1u32.., arb_name()).prop_map(|(version, caps, window, session)| Response::Welcome {
                version,
                caps,
                window,
                session
            }),
            (arb_name(), prop::collection::vec(arb_name(), 0..5)).prop_map(|(partner, shares)| Response::AuthOk { partner, shares }),
            prop::collection::vec(share_row, 0..5).prop_map(Response::Files),
            (arb_name(), arb_path(), arb_hash(), any::<i64>(), 0u32..=0o7777, arb_manifest()).prop_map(
                |(share, path, file_hash, mtime_ns, mode, (size, chunks))| Response::FileInfo {
                    share,
                    path,
                    size,
                    file_hash,
                    mtime_ns,
                    mode,
                    chunks
                }
            ),
            arb_file_part().prop_map(Response::FilePart),
            prop::collection::vec(arb_entry(), 0..5).prop_map(Response::Entries),
            arb_entry().prop_map(Response::StatOk),
            (arb_name(), 1u32.., arb_ranges())
                .prop_map(|(transfer_id, window, need)| { Response::TransferAccepted { transfer_id, window, need } }),
            (arb_name(), any::<u32>(), prop_oneof![Just(AckStatus::Ok), arb_word().prop_map(AckStatus::Error)])
                .prop_map(|(transfer_id, index, status)| Response::ChunkAck { transfer_id, index, status }),
            (arb_name(), arb_ranges()).prop_map(|(transfer_id, chunks)| Response::ChunkAckBatch { transfer_id, chunks }),
            arb_completion().prop_map(Response::TransferComplete),
            arb_name().prop_map(|transfer_id| Response::ReceiptOk { transfer_id }),
            arb_name().prop_map(|share| Response::Watching { share }),
            (arb_name(), arb_path()).prop_map(|(share, path)| Response::Changed { share, path }),
            (arb_name(), arb_path()).prop_map(|(share, path)| Response::Done { share, path }),
            (arb_name(), arb_lease()).prop_map(|(share, lease)| Response::Locked { share, lease }),
            (arb_name(), arb_file_path()).prop_map(|(share, path)| Response::Unlocked { share, path }),
            (arb_name(), prop::collection::vec("[*?a-z.]{1,8}", 0..4), prop::collection::vec(arb_lease(), 0..4))
                .prop_map(|(share, lockable, leases)| Response::Leases { share, lockable, leases }),
            Just(Response::Bye),
            (prop::sample::select(ErrorCode::ALL.to_vec()), "[^\\p{Cc}]{0,40}")
                .prop_map(|(code, message)| Response::Error { code, message }),
        ]
    }

    fn arb_data_header() -> impl Strategy<Value = DataHeader> {
        (any::<bool>(), arb_name(), any::<u32>(), any::<u32>(), arb_hash()).prop_map(|(put, transfer_id, index, size, hash)| {
            if put {
                DataHeader::Put { transfer_id, index, size, hash }
            } else {
                DataHeader::ChunkData { transfer_id, index, size, hash }
            }
        })
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in arb_request()) {
            prop_assert_eq!(decode::<Request>(&request.encode()), request);
        }

        #[test]
        fn responses_round_trip(response in arb_response()) {
            prop_assert_eq!(decode::<Response>(&response.encode()), response);
        }

        #[test]
        fn data_headers_round_trip(header in arb_data_header()) {
            let text = header.encode();
            let line = text.strip_suffix("\r\n").unwrap();
            prop_assert_eq!(DataHeader::parse(line).unwrap(), header);
        }

        #[test]
        fn any_error_message_encodes_to_one_decodable_line(code in prop::sample::select(ErrorCode::ALL.to_vec()), message in "\\PC*|[\\r\\n\\t\\x00 a]*") {
            let text = Response::error(code, message).encode();
            let decoded = matches!(decode::<Response>(&text), Response::Error { code: c, .. } if c == code);
            prop_assert!(decoded);
        }
    }
}
