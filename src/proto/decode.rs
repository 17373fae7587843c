//! Parsing lines into messages: the inverse of [`super::encode`].
//!
//! A [`Decoder`] takes one line at a time (CRLF already stripped by the
//! transport), so it never buffers more than the message being assembled.
//! Guarantees: every input, however hostile, yields a message, `Ok(None)`
//! (a body line was absorbed) or a [`ProtoError`], never a panic; a line
//! longer than [`MAX_LINE`] is refused before it is looked at; a message
//! never announces more than [`MAX_BODY_LINES`] body lines; a manifest
//! (CHUNK lines) is only returned when its chunks are numbered 0, 1, 2..,
//! non-empty, contiguous from offset 0 and cover exactly SIZE bytes; after
//! any error the partial message is dropped and the next line is read as a
//! head line.
//!
//! Tokens are separated by exactly one space. Unknown capabilities in
//! HELLO / WELCOME are skipped, so that a newer peer can offer more. An
//! ERROR message comes out with control characters replaced by spaces, as
//! the encoder writes it: re-encoding a decoded message gives lines that
//! decode to the same message.

use super::{
    AckStatus, Base, Capability, ChunkLine, Completion, DataHeader, Entry, ErrorCode, FilePart, LeaseRow, Name, NameError, PathError,
    PushManifest, RelativeLine, Request, Response, SharePath, ShareRow, MAX_BODY_LINES, MAX_LINE,
};
use Field::{Bare, Tagged};

/// Why a line or message was refused. Every variant maps to a `DEFT ERROR`
/// code through [`ProtoError::code`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("line longer than {} bytes", super::MAX_LINE)]
    LineTooLong,
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("line does not start with 'DEFT '")]
    BadPrefix,
    #[error("unknown verb {0:?}")]
    UnknownVerb(String),
    #[error("malformed {verb}: {detail}")]
    BadArgs { verb: String, detail: String },
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error(transparent)]
    BadPath(#[from] PathError),
    #[error("message announces too many body lines")]
    TooManyLines,
    #[error("expected a body line, got {0:?}")]
    BadBodyLine(String),
}

impl ProtoError {
    /// The `DEFT ERROR` code to answer this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::BadName(_) => ErrorCode::BadName,
            ProtoError::BadPath(_) => ErrorCode::BadPath,
            ProtoError::LineTooLong | ProtoError::TooManyLines => ErrorCode::TooLarge,
            ProtoError::NotUtf8
            | ProtoError::BadPrefix
            | ProtoError::UnknownVerb(_)
            | ProtoError::BadArgs { .. }
            | ProtoError::BadBodyLine(_) => ErrorCode::BadRequest,
        }
    }
}

/// Something a [`Decoder`] can produce: [`Request`] or [`Response`].
pub trait Message: Sized + sealed::Grammar {}
impl Message for Request {}
impl Message for Response {}

mod sealed {
    use super::ProtoError;

    /// The grammar of one direction of the control stream. Sealed: only
    /// [`super::Request`] and [`super::Response`] have one.
    pub trait Grammar: Sized {
        /// A head line into its message (body still empty) and the number
        /// of body lines it announces.
        fn parse_head(line: &str) -> Result<(Self, u64), ProtoError>;
        /// Add one body line to a message whose head announced it.
        fn push_body(&mut self, line: &str) -> Result<(), ProtoError>;
        /// Check a message once its body is complete.
        fn finish(&self) -> Result<(), ProtoError>;
    }
}

/// Turns lines (without their CRLF) into messages, collecting the body
/// lines a head announces. After an error the decoder is reset and ready
/// for the next head line.
pub struct Decoder<M: Message> {
    pending: Option<Pending<M>>,
}

/// A message whose head announced body lines not all received yet.
struct Pending<M> {
    msg: M,
    /// Body lines still expected; never 0.
    remaining: u64,
}

impl<M: Message> Default for Decoder<M> {
    fn default() -> Self {
        Decoder { pending: None }
    }
}

impl<M: Message> Decoder<M> {
    /// Feed one line. `Ok(None)`: a head or body line was taken and the
    /// message still awaits body lines.
    pub fn push_line(&mut self, line: &str) -> Result<Option<M>, ProtoError> {
        // A body line is added in place (a message can be thousands of
        // lines); any error drops the partial message: that is the reset.
        if let Some(pending) = self.pending.as_mut() {
            let added = check_len(line.len()).and_then(|()| pending.msg.push_body(line));
            if let Err(e) = added {
                self.pending = None;
                return Err(e);
            }
            pending.remaining -= 1;
            if pending.remaining > 0 {
                return Ok(None);
            }
        }
        let (msg, remaining) = match self.pending.take() {
            Some(Pending { msg, .. }) => (msg, 0),
            None => {
                check_len(line.len())?;
                M::parse_head(line)?
            }
        };
        if remaining > 0 {
            self.pending = Some(Pending { msg, remaining });
            return Ok(None);
        }
        msg.finish()?;
        Ok(Some(msg))
    }

    /// Feed one line as raw bytes, as read from the stream: refused as
    /// [`ProtoError::LineTooLong`] or [`ProtoError::NotUtf8`] before parsing.
    pub fn push_bytes(&mut self, line: &[u8]) -> Result<Option<M>, ProtoError> {
        let checked = check_len(line.len()).and_then(|()| std::str::from_utf8(line).map_err(|_| ProtoError::NotUtf8));
        match checked {
            Ok(line) => self.push_line(line),
            Err(e) => {
                self.pending = None;
                Err(e)
            }
        }
    }

    /// True while a head has announced body lines that have not all come.
    pub fn is_mid_message(&self) -> bool {
        self.pending.is_some()
    }
}

impl sealed::Grammar for Request {
    fn parse_head(line: &str) -> Result<(Request, u64), ProtoError> {
        let mut args = Args::head(line)?;
        // Struct literals evaluate their fields in the order written, which
        // is the order of the tokens.
        let msg = match args.verb {
            "HELLO" => Request::Hello { version: args.word(Bare("version"))?, caps: args.caps()?, window: args.window()? },
            "AUTH" => Request::Auth { partner: args.name("partner id")? },
            "DISCOVER" => Request::Discover,
            "DESCRIBE" => Request::Describe { share: args.name("share")?, path: args.optional_path()? },
            "DESCRIBE_PART" => Request::DescribePart {
                share: args.name("share")?,
                path: args.path()?,
                offset: args.unsigned(Tagged("OFFSET"))?,
                length: args.unsigned(Tagged("LENGTH"))?,
            },
            "LIST" => Request::List { share: args.name("share")?, path: args.optional_path()? },
            "STAT" => Request::Stat { share: args.name("share")?, path: args.optional_path()? },
            "BEGIN_TRANSFER" => {
                let transfer_id = args.name("transfer id")?;
                let share = args.name("share")?;
                let path = args.path()?;
                let size = args.unsigned(Tagged("SIZE"))?;
                let count = args.line_count(Tagged("CHUNKS"))?;
                let file_hash = args.parsed(Tagged("HASH"))?;
                let base = args.base()?;
                let fence = if args.peek_tag("FENCE") { Some(args.unsigned(Tagged("FENCE"))?) } else { None };
                let mode = if args.peek_tag("MODE") { Some(args.mode(Tagged("MODE"))?) } else { None };
                let mtime_ns = if args.peek_tag("MTIME") { Some(args.signed(Tagged("MTIME"))?) } else { None };
                let relative = if args.peek_tag("LINES") { Some(args.line_count(Tagged("LINES"))?) } else { None };
                let ahead = if args.peek_tag("AHEAD") { Some(Name::new(args.value(Tagged("AHEAD"))?)?) } else { None };
                args.end()?;
                let (manifest, lines) = match relative {
                    None => (PushManifest::Whole(with_capacity_for(count)), count),
                    // A relative manifest names runs of the base's chunks:
                    // there must be a base version to name.
                    Some(_) if !matches!(base, Base::Version(_)) => return Err(args.bad("LINES without BASE:<hash>")),
                    // `count` is at most MAX_BODY_LINES, so it fits a u32.
                    Some(lines) => {
                        let chunks = u32::try_from(count).map_err(|_| ProtoError::TooManyLines)?;
                        (PushManifest::Relative { chunks, lines: with_capacity_for(lines) }, lines)
                    }
                };
                let begin =
                    Request::BeginTransfer { transfer_id, share, path, size, file_hash, base, fence, mode, mtime_ns, manifest, ahead };
                return Ok((begin, lines));
            }
            "AHEAD" => {
                let ahead_id = args.name("ahead id")?;
                let share = args.name("share")?;
                let path = args.path()?;
                let first: u32 = args.unsigned(Tagged("FROM"))?;
                let count = args.line_count(Tagged("CHUNKS"))?;
                args.end()?;
                if u64::from(first) + count > u64::from(u32::MAX) {
                    return Err(args.bad("FROM + CHUNKS: past the last index a manifest can have"));
                }
                return Ok((Request::Ahead { ahead_id, share, path, first, chunks: with_capacity_for(count) }, count));
            }
            "GET" => Request::Get {
                transfer_id: args.name("transfer id")?,
                share: args.name("share")?,
                path: args.path()?,
                file_hash: args.parsed(Bare("file hash"))?,
                chunks: {
                    args.keyword("CHUNKS")?;
                    args.parsed(Bare("chunks"))?
                },
            },
            "TRANSFER_COMPLETE" => Request::TransferComplete(args.completion()?),
            "WATCH" => Request::Watch { share: args.name("share")? },
            "MKDIR" => Request::Mkdir { share: args.name("share")?, path: args.path()?, mode: args.mode(Tagged("MODE"))? },
            "REMOVE" => Request::Remove { share: args.name("share")?, path: args.path()?, kind: args.parsed(Bare("kind"))? },
            "RENAME" => Request::Rename {
                share: args.name("share")?,
                from: args.path()?,
                to: args.path()?,
                replace: match args.token("REPLACE or NOREPLACE")? {
                    "REPLACE" => true,
                    "NOREPLACE" => false,
                    other => return Err(args.bad(format!("expected REPLACE or NOREPLACE, got {:?}", excerpt(other)))),
                },
            },
            "SETATTR" => Request::SetAttr {
                share: args.name("share")?,
                path: args.path()?,
                mode: if args.dash(Tagged("MODE"))? { None } else { Some(args.mode(Tagged("MODE"))?) },
                mtime_ns: if args.dash(Tagged("MTIME"))? { None } else { Some(args.signed(Tagged("MTIME"))?) },
            },
            "LOCK" => Request::Lock {
                share: args.name("share")?,
                path: args.path()?,
                ttl_s: args.ttl()?,
                owner: Name::new(args.value(Tagged("OWNER"))?)?,
            },
            "RENEW" => Request::Renew {
                share: args.name("share")?,
                path: args.path()?,
                token: args.unsigned(Tagged("TOKEN"))?,
                ttl_s: args.ttl()?,
            },
            "UNLOCK" => Request::Unlock { share: args.name("share")?, path: args.path()?, token: args.unsigned(Tagged("TOKEN"))? },
            "LOCKS" => Request::Locks { share: args.name("share")? },
            "BYE" => Request::Bye,
            verb => return Err(unknown_verb(verb)),
        };
        args.end()?;
        Ok((msg, 0))
    }

    fn push_body(&mut self, line: &str) -> Result<(), ProtoError> {
        match self {
            Request::BeginTransfer { size, manifest: PushManifest::Whole(chunks), .. } => push_chunk(chunks, 0, *size, line),
            Request::BeginTransfer { size, manifest: PushManifest::Relative { chunks, lines }, .. } => {
                push_relative(lines, *chunks, *size, line)
            }
            // Chunks of a file still being written: no SIZE to end within.
            Request::Ahead { first, chunks, .. } => push_chunk(chunks, *first, u64::MAX, line),
            // Only BEGIN_TRANSFER announces body lines.
            _ => Err(ProtoError::BadBodyLine(excerpt(line))),
        }
    }

    fn finish(&self) -> Result<(), ProtoError> {
        match self {
            Request::BeginTransfer { size, manifest: PushManifest::Whole(chunks), .. } => check_coverage("BEGIN_TRANSFER", chunks, *size),
            Request::BeginTransfer { size, manifest: PushManifest::Relative { chunks, lines }, .. } => {
                let bad = |detail: String| Err(ProtoError::BadArgs { verb: "BEGIN_TRANSFER".to_string(), detail });
                let given = lines.last().map_or(0, RelativeLine::end);
                if given != u64::from(*chunks) {
                    return bad(format!("lines give {given} chunks but CHUNKS is {chunks}"));
                }
                // Where the last chunk ends is known only if a CHUNK line
                // gives it; after a SAME, the receiver checks it.
                match lines.last() {
                    Some(RelativeLine::Chunk(c)) if c.offset + u64::from(c.size) != *size => {
                        bad(format!("chunks cover {} bytes but SIZE is {size}", c.offset + u64::from(c.size)))
                    }
                    None if *size != 0 => bad(format!("chunks cover 0 bytes but SIZE is {size}")),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

impl sealed::Grammar for Response {
    fn parse_head(line: &str) -> Result<(Response, u64), ProtoError> {
        let mut args = Args::head(line)?;
        let msg = match args.verb {
            "WELCOME" => Response::Welcome {
                version: args.word(Bare("version"))?,
                caps: args.caps()?,
                window: args.window()?,
                session: args.name("session id")?,
            },
            "AUTH_OK" => Response::AuthOk { partner: args.name("partner id")?, shares: args.share_list()? },
            "FILES" => {
                let count = args.line_count(Bare("count"))?;
                args.end()?;
                return Ok((Response::Files(with_capacity_for(count)), count));
            }
            "FILE_INFO" => {
                let share = args.name("share")?;
                let path = args.path()?;
                let size = args.unsigned(Tagged("SIZE"))?;
                let count = args.line_count(Tagged("CHUNKS"))?;
                let file_hash = args.parsed(Tagged("HASH"))?;
                let mtime_ns = args.signed(Tagged("MTIME"))?;
                let mode = args.mode(Tagged("MODE"))?;
                args.end()?;
                let chunks = with_capacity_for(count);
                return Ok((Response::FileInfo { share, path, size, file_hash, mtime_ns, mode, chunks }, count));
            }
            "FILE_PART" => {
                let share = args.name("share")?;
                let path = args.path()?;
                let size = args.unsigned(Tagged("SIZE"))?;
                let total: u32 = args.unsigned(Tagged("CHUNKS"))?;
                if u64::from(total) > MAX_BODY_LINES {
                    return Err(ProtoError::TooManyLines);
                }
                let file_hash = args.parsed(Tagged("HASH"))?;
                let mtime_ns = args.signed(Tagged("MTIME"))?;
                let mode = args.mode(Tagged("MODE"))?;
                let first: u32 = args.unsigned(Tagged("FIRST"))?;
                let count = args.line_count(Tagged("LINES"))?;
                args.end()?;
                if u64::from(first) + count > u64::from(total) {
                    return Err(args.bad(format!("lines {first} to {} of a manifest of {total} chunks", u64::from(first) + count)));
                }
                let chunks = with_capacity_for(count);
                let part = FilePart { share, path, size, total, file_hash, mtime_ns, mode, first, chunks };
                return Ok((Response::FilePart(part), count));
            }
            "ENTRIES" => {
                let count = args.line_count(Bare("count"))?;
                args.end()?;
                return Ok((Response::Entries(with_capacity_for(count)), count));
            }
            "STAT_OK" => Response::StatOk(args.entry()?),
            "TRANSFER_ACCEPTED" => Response::TransferAccepted {
                transfer_id: args.name("transfer id")?,
                window: args.window()?,
                need: args.parsed(Tagged("NEED"))?,
            },
            "CHUNK_ACK" => Response::ChunkAck {
                transfer_id: args.name("transfer id")?,
                index: args.unsigned(Bare("chunk index"))?,
                status: args.ack_status()?,
            },
            "CHUNK_ACK_BATCH" => Response::ChunkAckBatch { transfer_id: args.name("transfer id")?, chunks: args.parsed(Bare("chunks"))? },
            "TRANSFER_COMPLETE" => Response::TransferComplete(args.completion()?),
            "RECEIPT_OK" => Response::ReceiptOk { transfer_id: args.name("transfer id")? },
            "WATCHING" => Response::Watching { share: args.name("share")? },
            "CHANGED" => Response::Changed { share: args.name("share")?, path: args.optional_path()? },
            "DONE" => Response::Done { share: args.name("share")?, path: args.optional_path()? },
            "LOCKED" => Response::Locked { share: args.name("share")?, lease: args.lease()? },
            "UNLOCKED" => Response::Unlocked { share: args.name("share")?, path: args.path()? },
            "LEASES" => {
                let share = args.name("share")?;
                let count = args.line_count(Bare("count"))?;
                let lockable = args.patterns()?;
                args.end()?;
                return Ok((Response::Leases { share, lockable, leases: with_capacity_for(count) }, count));
            }
            "BYE" => Response::Bye,
            "ERROR" => Response::Error { code: args.parsed(Bare("code"))?, message: super::one_line(args.rest()) },
            verb => return Err(unknown_verb(verb)),
        };
        args.end()?;
        Ok((msg, 0))
    }

    fn push_body(&mut self, line: &str) -> Result<(), ProtoError> {
        match self {
            Response::FileInfo { size, chunks, .. } => push_chunk(chunks, 0, *size, line),
            Response::FilePart(part) => push_chunk(&mut part.chunks, part.first, part.size, line),
            Response::Files(rows) => {
                let mut args = Args::body("FILES row", line);
                let row = ShareRow {
                    name: args.name("share")?,
                    kind: args.parsed(Bare("kind"))?,
                    size: args.unsigned(Bare("size"))?,
                    access: args.parsed(Bare("access"))?,
                    mtime_ns: args.signed(Bare("mtime"))?,
                };
                args.end()?;
                rows.push(row);
                Ok(())
            }
            Response::Entries(entries) => {
                let mut args = Args::body("ENTRIES row", line);
                let entry = args.entry()?;
                args.end()?;
                entries.push(entry);
                Ok(())
            }
            Response::Leases { leases, .. } => {
                let mut args = Args::body("LEASES row", line);
                let lease = args.lease()?;
                args.end()?;
                leases.push(lease);
                Ok(())
            }
            // Only FILES, FILE_INFO, FILE_PART, ENTRIES and LEASES announce body lines.
            _ => Err(ProtoError::BadBodyLine(excerpt(line))),
        }
    }

    fn finish(&self) -> Result<(), ProtoError> {
        match self {
            Response::FileInfo { size, chunks, .. } => check_coverage("FILE_INFO", chunks, *size),
            // The last chunk of the manifest ends the file.
            Response::FilePart(p) if u64::from(p.first) + p.chunks.len() as u64 == u64::from(p.total) && !p.chunks.is_empty() => {
                check_coverage("FILE_PART", &p.chunks, p.size)
            }
            Response::FilePart(p) if p.total == 0 && p.size != 0 => {
                Err(ProtoError::BadArgs { verb: "FILE_PART".to_string(), detail: format!("no chunks but SIZE is {}", p.size) })
            }
            _ => Ok(()),
        }
    }
}

impl DataHeader {
    /// Parse a chunk stream's header line (without CRLF).
    pub fn parse(line: &str) -> Result<DataHeader, ProtoError> {
        check_len(line.len())?;
        let mut args = Args::head(line)?;
        let header = match args.verb {
            "PUT" => DataHeader::Put {
                transfer_id: args.name("transfer id")?,
                index: args.unsigned(Bare("chunk index"))?,
                size: args.unsigned(Tagged("SIZE"))?,
                hash: args.parsed(Tagged("HASH"))?,
            },
            "CHUNK_DATA" => DataHeader::ChunkData {
                transfer_id: args.name("transfer id")?,
                index: args.unsigned(Bare("chunk index"))?,
                size: args.unsigned(Tagged("SIZE"))?,
                hash: args.parsed(Tagged("HASH"))?,
            },
            verb => return Err(unknown_verb(verb)),
        };
        args.end()?;
        Ok(header)
    }
}

/// Longest lease a LOCK or RENEW may ask for: one day.
pub const MAX_TTL_S: u32 = 86_400;
/// Most lockable patterns one LEASES may carry.
const MAX_PATTERNS: usize = 256;

/// Longest piece of a peer's line quoted in an error value.
const QUOTE: usize = 80;
/// Longest version, TIME or ack reason token.
const MAX_WORD: usize = 64;
/// Body lines reserved up front: a count is only a claim until the lines
/// come, so memory follows the lines received, not the head.
const PREALLOCATE: u64 = 1024;

fn check_len(len: usize) -> Result<(), ProtoError> {
    // MAX_LINE counts the CRLF the transport stripped.
    if len > MAX_LINE - 2 {
        return Err(ProtoError::LineTooLong);
    }
    Ok(())
}

fn unknown_verb(verb: &str) -> ProtoError {
    ProtoError::UnknownVerb(excerpt(verb))
}

fn with_capacity_for<T>(count: u64) -> Vec<T> {
    Vec::with_capacity(usize::try_from(count.min(PREALLOCATE)).unwrap_or(0))
}

/// Add `CHUNK <index> <offset> <size> <hash>` to the lines, from index
/// `first`, of a manifest of a `file_size` bytes file: the next index, at
/// the offset where the previous chunk ended (0 for chunk 0; any for the
/// first line of a part that starts later), non-empty, within the file.
fn push_chunk(chunks: &mut Vec<ChunkLine>, first: u32, file_size: u64, line: &str) -> Result<(), ProtoError> {
    // A manifest of a large file is thousands of these lines: a well-formed
    // one is read by `chunk_fields`, anything else by the general parser,
    // which also words the error.
    let chunk = match chunk_fields(line) {
        Some(chunk) => chunk,
        None => parse_chunk(line)?,
    };
    let bad = |detail: String| ProtoError::BadArgs { verb: "CHUNK".to_string(), detail };
    let expected_index = u64::from(first) + chunks.len() as u64;
    let expected_offset = match chunks.last() {
        Some(c) => c.offset + u64::from(c.size),
        None if first == 0 => 0,
        // Chunk `first` starts after `first` non-empty chunks.
        None => chunk.offset.max(u64::from(first)),
    };
    if u64::from(chunk.index) != expected_index {
        return Err(bad(format!("index {}, expected {expected_index}", chunk.index)));
    }
    if chunk.offset != expected_offset {
        return Err(bad(format!("offset {}, expected {expected_offset}", chunk.offset)));
    }
    if chunk.size == 0 {
        return Err(bad("chunk of 0 bytes".to_string()));
    }
    if chunk.offset.checked_add(u64::from(chunk.size)).is_none_or(|end| end > file_size) {
        return Err(bad(format!("chunk {} ends past SIZE {file_size}", chunk.index)));
    }
    chunks.push(chunk);
    Ok(())
}

/// Add a body line of a relative manifest of `total` chunks and
/// `file_size` bytes: a CHUNK line as [`push_chunk`] takes it (its offset
/// is checked when the line before it gives where it starts: nothing or a
/// CHUNK line), or `SAME <index> <base_index> <count>`. Either must give the
/// next chunk, and none may give a chunk past `total`. What a SAME stands
/// for is only known to the receiver, which expands and checks it.
fn push_relative(lines: &mut Vec<RelativeLine>, total: u32, file_size: u64, line: &str) -> Result<(), ProtoError> {
    let expected_index = lines.last().map_or(0, RelativeLine::end);
    let bad = |verb: &str, detail: String| ProtoError::BadArgs { verb: verb.to_string(), detail };
    let next = if let Some(rest) = line.strip_prefix("SAME ") {
        let mut args = Args::body("SAME", rest);
        let (index, base_index, count): (u32, u32, u32) =
            (args.unsigned(Bare("index"))?, args.unsigned(Bare("base index"))?, args.unsigned(Bare("count"))?);
        args.end()?;
        if u64::from(index) != expected_index {
            return Err(bad("SAME", format!("index {index}, expected {expected_index}")));
        }
        if count == 0 {
            return Err(bad("SAME", "a run of 0 chunks".to_string()));
        }
        if u64::from(base_index) + u64::from(count) > u64::from(u32::MAX) {
            return Err(bad("SAME", format!("base chunks {base_index} + {count} past the last index a manifest can have")));
        }
        RelativeLine::Same { index, base_index, count }
    } else {
        let chunk = match chunk_fields(line) {
            Some(chunk) => chunk,
            None => parse_chunk(line)?,
        };
        if u64::from(chunk.index) != expected_index {
            return Err(bad("CHUNK", format!("index {}, expected {expected_index}", chunk.index)));
        }
        let expected_offset = match lines.last() {
            None => Some(0),
            Some(RelativeLine::Chunk(c)) => Some(c.offset + u64::from(c.size)),
            Some(RelativeLine::Same { .. }) => None,
        };
        if let Some(expected) = expected_offset.filter(|o| *o != chunk.offset) {
            return Err(bad("CHUNK", format!("offset {}, expected {expected}", chunk.offset)));
        }
        if chunk.size == 0 {
            return Err(bad("CHUNK", "chunk of 0 bytes".to_string()));
        }
        if chunk.offset.checked_add(u64::from(chunk.size)).is_none_or(|end| end > file_size) {
            return Err(bad("CHUNK", format!("chunk {} ends past SIZE {file_size}", chunk.index)));
        }
        RelativeLine::Chunk(chunk)
    };
    if next.end() > u64::from(total) {
        return Err(bad("BEGIN_TRANSFER", format!("lines give more than CHUNKS ({total}) chunks")));
    }
    lines.push(next);
    Ok(())
}

/// A CHUNK line's fields, by the general token parser.
fn parse_chunk(line: &str) -> Result<ChunkLine, ProtoError> {
    let rest = line.strip_prefix("CHUNK ").ok_or_else(|| ProtoError::BadBodyLine(excerpt(line)))?;
    let mut args = Args::body("CHUNK", rest);
    let chunk = ChunkLine {
        index: args.unsigned(Bare("index"))?,
        offset: args.unsigned(Bare("offset"))?,
        size: args.unsigned(Bare("size"))?,
        hash: args.parsed(Bare("hash"))?,
    };
    args.end()?;
    Ok(chunk)
}

/// A well-formed CHUNK line's fields in one pass over its bytes, or None
/// for any line [`parse_chunk`] might refuse (it then decides). Accepts
/// exactly what `parse_chunk` accepts, with the same values (a property
/// test checks it), at a fraction of the cost.
fn chunk_fields(line: &str) -> Option<ChunkLine> {
    let rest = line.strip_prefix("CHUNK ")?;
    let (index, rest) = decimal_then_space(rest)?;
    let (offset, rest) = decimal_then_space(rest)?;
    let (size, rest) = decimal_then_space(rest)?;
    Some(ChunkLine { index: u32::try_from(index).ok()?, offset, size: u32::try_from(size).ok()?, hash: rest.parse().ok()? })
}

/// Leading decimal digits (at least one, no overflow) and the single space
/// after them: the number and what follows the space.
fn decimal_then_space(text: &str) -> Option<(u64, &str)> {
    let bytes = text.as_bytes();
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || bytes.get(digits) != Some(&b' ') {
        return None;
    }
    let mut n = 0u64;
    for &b in &bytes[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    // The digits and the space are ASCII, so this is a char boundary.
    Some((n, text.get(digits + 1..)?))
}

/// The chunks of a complete manifest cover exactly `size` bytes.
fn check_coverage(verb: &str, chunks: &[ChunkLine], size: u64) -> Result<(), ProtoError> {
    let covered = chunks.last().map_or(0, |c| c.offset + u64::from(c.size));
    if covered != size {
        return Err(ProtoError::BadArgs { verb: verb.to_string(), detail: format!("chunks cover {covered} bytes but SIZE is {size}") });
    }
    Ok(())
}

/// Where a value sits in a line: a bare token named for error values, or
/// the part after `TAG:` of a token.
#[derive(Clone, Copy)]
enum Field<'t> {
    Bare(&'t str),
    Tagged(&'t str),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Bare(text) | Tagged(text)) = self;
        f.write_str(text)
    }
}

/// The tokens of one line, taken in order.
struct Args<'a> {
    /// The verb, or what a body line is, for error values.
    verb: &'a str,
    /// What is left after the tokens taken; None once all are.
    rest: Option<&'a str>,
}

impl<'a> Args<'a> {
    /// `DEFT <VERB> ...`: the verb, then the arguments.
    fn head(line: &'a str) -> Result<Args<'a>, ProtoError> {
        let after = line.strip_prefix("DEFT ").ok_or(ProtoError::BadPrefix)?;
        let (verb, rest) = match after.split_once(' ') {
            Some((verb, rest)) => (verb, Some(rest)),
            None => (after, None),
        };
        Ok(Args { verb, rest })
    }

    /// A body line: all arguments, no verb.
    fn body(what: &'a str, line: &'a str) -> Args<'a> {
        Args { verb: what, rest: Some(line) }
    }

    fn bad(&self, detail: impl Into<String>) -> ProtoError {
        ProtoError::BadArgs { verb: self.verb.to_string(), detail: detail.into() }
    }

    /// The next token, never empty.
    fn token(&mut self, what: &str) -> Result<&'a str, ProtoError> {
        let rest = self.rest.ok_or_else(|| self.bad(format!("missing {what}")))?;
        let (token, more) = match rest.split_once(' ') {
            Some((token, more)) => (token, Some(more)),
            None => (rest, None),
        };
        self.rest = more;
        if token.is_empty() {
            return Err(self.bad(format!("empty {what}: tokens are separated by exactly one space")));
        }
        Ok(token)
    }

    /// The text of the next field (a tagged value may be empty).
    fn value(&mut self, field: Field<'_>) -> Result<&'a str, ProtoError> {
        match field {
            Bare(what) => self.token(what),
            Tagged(tag) => {
                let token = self.token(tag)?;
                match token.split_once(':') {
                    Some((t, value)) if t == tag => Ok(value),
                    _ => Err(self.bad(format!("expected {tag}:..., got {:?}", excerpt(token)))),
                }
            }
        }
    }

    /// The literal token `keyword`.
    fn keyword(&mut self, keyword: &str) -> Result<(), ProtoError> {
        let token = self.token(keyword)?;
        if token != keyword {
            return Err(self.bad(format!("expected {keyword}, got {:?}", excerpt(token))));
        }
        Ok(())
    }

    /// Everything not taken yet, spaces included (ERROR's message).
    fn rest(&mut self) -> &'a str {
        self.rest.take().unwrap_or("")
    }

    /// No token may be left.
    fn end(&self) -> Result<(), ProtoError> {
        match self.rest {
            None => Ok(()),
            Some(rest) => Err(self.bad(format!("unexpected {:?} after the last argument", excerpt(rest)))),
        }
    }

    /// A value parsed by `T::from_str`.
    fn parsed<T>(&mut self, field: Field<'_>) -> Result<T, ProtoError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let value = self.value(field)?;
        value.parse().map_err(|e: T::Err| self.bad(format!("{field}: {e}")))
    }

    fn name(&mut self, what: &str) -> Result<Name, ProtoError> {
        Ok(Name::new(self.token(what)?)?)
    }

    fn path(&mut self) -> Result<SharePath, ProtoError> {
        Ok(SharePath::from_wire(self.token("path")?)?)
    }

    /// A path that may be left out for the share root.
    fn optional_path(&mut self) -> Result<SharePath, ProtoError> {
        if self.rest.is_none() {
            return Ok(SharePath::root());
        }
        self.path()
    }

    /// 1 to 64 printable ASCII characters: version, TIME, ack reason.
    fn word(&mut self, field: Field<'_>) -> Result<String, ProtoError> {
        let value = self.value(field)?;
        if value.is_empty() || value.len() > MAX_WORD || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.bad(format!("{field} must be 1 to {MAX_WORD} printable ASCII characters")));
        }
        Ok(value.to_string())
    }

    /// Decimal digits only: no sign, no space.
    fn unsigned<T: std::str::FromStr>(&mut self, field: Field<'_>) -> Result<T, ProtoError> {
        let value = self.value(field)?;
        let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        match value.parse() {
            Ok(n) if digits => Ok(n),
            _ => Err(self.bad(format!("{field}: expected an unsigned decimal number, got {:?}", excerpt(value)))),
        }
    }

    /// Decimal digits with an optional leading `-`.
    fn signed(&mut self, field: Field<'_>) -> Result<i64, ProtoError> {
        let value = self.value(field)?;
        let magnitude = value.strip_prefix('-').unwrap_or(value);
        let digits = !magnitude.is_empty() && magnitude.bytes().all(|b| b.is_ascii_digit());
        match value.parse() {
            Ok(n) if digits => Ok(n),
            _ => Err(self.bad(format!("{field}: expected a decimal number, got {:?}", excerpt(value)))),
        }
    }

    /// Octal digits without prefix, at most 0o7777.
    fn mode(&mut self, field: Field<'_>) -> Result<u32, ProtoError> {
        let value = self.value(field)?;
        let octal = !value.is_empty() && value.bytes().all(|b| matches!(b, b'0'..=b'7'));
        match u32::from_str_radix(value, 8) {
            Ok(mode) if octal && mode <= 0o7777 => Ok(mode),
            _ => Err(self.bad(format!("{field}: expected octal digits up to 7777, got {:?}", excerpt(value)))),
        }
    }

    /// A body line count (FILES, ENTRIES, CHUNKS:), at most MAX_BODY_LINES.
    fn line_count(&mut self, field: Field<'_>) -> Result<u64, ProtoError> {
        let count: u64 = self.unsigned(field)?;
        if count > MAX_BODY_LINES {
            return Err(ProtoError::TooManyLines);
        }
        Ok(count)
    }

    /// `WINDOW_SIZE:<n>`, n at least 1: a window of 0 would never move.
    fn window(&mut self) -> Result<u32, ProtoError> {
        let window = self.unsigned(Tagged("WINDOW_SIZE"))?;
        if window == 0 {
            return Err(self.bad("WINDOW_SIZE must be at least 1"));
        }
        Ok(window)
    }

    /// `CAP,CAP,...` or `-`; names this version does not know are skipped.
    fn caps(&mut self) -> Result<Vec<Capability>, ProtoError> {
        let token = self.token("capabilities")?;
        let items = self.list("capabilities", token)?;
        Ok(items.into_iter().filter_map(|item| item.parse().ok()).collect())
    }

    /// `VF:<name,name,...>` or `VF:-`.
    fn share_list(&mut self) -> Result<Vec<Name>, ProtoError> {
        let value = self.value(Tagged("VF"))?;
        let items = self.list("VF", value)?;
        items.into_iter().map(|item| Name::new(item).map_err(ProtoError::from)).collect()
    }

    /// A comma-separated list, `-` for an empty one; no empty item.
    fn list(&self, what: &str, text: &'a str) -> Result<Vec<&'a str>, ProtoError> {
        if text == "-" {
            return Ok(Vec::new());
        }
        let items: Vec<&str> = text.split(',').collect();
        if items.iter().any(|item| item.is_empty()) {
            return Err(self.bad(format!("{what}: empty item in {:?}", excerpt(text))));
        }
        Ok(items)
    }

    /// `<kind> <size> <mtime_ns> <mode-octal> <path-wire>`
    fn entry(&mut self) -> Result<Entry, ProtoError> {
        Ok(Entry {
            kind: self.parsed(Bare("kind"))?,
            size: self.unsigned(Bare("size"))?,
            mtime_ns: self.signed(Bare("mtime"))?,
            mode: self.mode(Bare("mode"))?,
            path: self.path()?,
        })
    }

    /// Whether the next token is `TAG:...` (an optional trailing field).
    fn peek_tag(&self, tag: &str) -> bool {
        self.rest.is_some_and(|r| r.split(' ').next().and_then(|t| t.split_once(':')).is_some_and(|(t, _)| t == tag))
    }

    /// Whether the next field `TAG:` holds `-`; consumes it if so.
    fn dash(&mut self, field: Field<'_>) -> Result<bool, ProtoError> {
        let Tagged(tag) = field else { return Ok(false) };
        let is_dash = self.rest.is_some_and(|r| r.split(' ').next() == Some(&format!("{tag}:-")[..]));
        if is_dash {
            self.value(field)?;
        }
        Ok(is_dash)
    }

    /// Optional `BASE:-` or `BASE:<hash>` of BEGIN_TRANSFER.
    fn base(&mut self) -> Result<Base, ProtoError> {
        if !self.peek_tag("BASE") {
            return Ok(Base::Any);
        }
        if self.dash(Tagged("BASE"))? {
            return Ok(Base::Absent);
        }
        Ok(Base::Version(self.parsed(Tagged("BASE"))?))
    }

    /// `TTL:<seconds>`, 1 to MAX_TTL_S.
    fn ttl(&mut self) -> Result<u32, ProtoError> {
        let ttl: u32 = self.unsigned(Tagged("TTL"))?;
        if ttl == 0 || ttl > MAX_TTL_S {
            return Err(self.bad(format!("TTL must be 1 to {MAX_TTL_S} seconds")));
        }
        Ok(ttl)
    }

    /// `<token> <holder> <owner> <since_ns> <expires_ns> <path-wire>`
    fn lease(&mut self) -> Result<LeaseRow, ProtoError> {
        Ok(LeaseRow {
            token: self.unsigned(Bare("token"))?,
            holder: self.name("holder")?,
            owner: self.name("owner")?,
            since_ns: self.signed(Bare("since"))?,
            expires_ns: self.signed(Bare("expires"))?,
            path: self.path()?,
        })
    }

    /// `LOCKABLE:<pattern,...>` or `LOCKABLE:-`: each pattern 1 to 128
    /// printable ASCII characters without space, comma or slash.
    fn patterns(&mut self) -> Result<Vec<String>, ProtoError> {
        let value = self.value(Tagged("LOCKABLE"))?;
        let items = self.list("LOCKABLE", value)?;
        if items.len() > MAX_PATTERNS {
            return Err(self.bad(format!("LOCKABLE: more than {MAX_PATTERNS} patterns")));
        }
        for item in &items {
            if item.len() > 128 || !item.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b'/') || *item == "-" {
                return Err(self.bad(format!("LOCKABLE: bad pattern {:?}", excerpt(item))));
            }
        }
        Ok(items.into_iter().map(str::to_string).collect())
    }

    /// `OK` or `ERROR <REASON>`.
    fn ack_status(&mut self) -> Result<AckStatus, ProtoError> {
        match self.token("status")? {
            "OK" => Ok(AckStatus::Ok),
            "ERROR" => Ok(AckStatus::Error(self.word(Bare("reason"))?)),
            other => Err(self.bad(format!("status: expected OK or ERROR, got {:?}", excerpt(other)))),
        }
    }

    /// `<transfer_id> HASH:<h> SIZE:<n> CHUNKS:<n> TIME:<t> sig:ed25519:<b64>`
    fn completion(&mut self) -> Result<Completion, ProtoError> {
        Ok(Completion {
            transfer_id: self.name("transfer id")?,
            file_hash: self.parsed(Tagged("HASH"))?,
            size: self.unsigned(Tagged("SIZE"))?,
            chunks: self.unsigned(Tagged("CHUNKS"))?,
            time: self.word(Tagged("TIME"))?,
            signature: self.parsed(Bare("signature"))?,
        })
    }
}

fn excerpt(s: &str) -> String {
    super::excerpt(s, QUOTE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::proto::{Access, EntryKind, RangeSet, Signature};
    use proptest::prelude::*;

    const H: &str = "blake3:0000000000000000000000000000000000000000000000000000000000000000";
    const H1: &str = "blake3:1111111111111111111111111111111111111111111111111111111111111111";

    fn sig() -> String {
        Signature([7; 64]).to_string()
    }

    /// Push every line; all but the last must be absorbed.
    fn feed<M: Message + std::fmt::Debug + PartialEq>(lines: &[&str]) -> Result<M, ProtoError> {
        let mut decoder = Decoder::<M>::default();
        let (last, body) = lines.split_last().unwrap();
        for line in body {
            assert_eq!(decoder.push_line(line)?, None, "{line:?} finished the message early");
        }
        Ok(decoder.push_line(last)?.expect("message incomplete"))
    }

    fn req(lines: &[&str]) -> Result<Request, ProtoError> {
        feed(lines)
    }

    fn resp(lines: &[&str]) -> Result<Response, ProtoError> {
        feed(lines)
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn path(s: &str) -> SharePath {
        SharePath::parse(s).unwrap()
    }

    fn hash(s: &str) -> Hash {
        s.parse().unwrap()
    }

    fn is_bad_args(r: Result<impl std::fmt::Debug, ProtoError>) -> bool {
        matches!(r, Err(ProtoError::BadArgs { .. }))
    }

    #[test]
    fn hello_ignores_unknown_capabilities() {
        assert_eq!(
            req(&["DEFT HELLO 1.0 CHUNKED,TELEPORT,RESUME WINDOW_SIZE:128"]).unwrap(),
            Request::Hello { version: "1.0".into(), caps: vec![Capability::Chunked, Capability::Resume], window: 128 }
        );
        assert_eq!(req(&["DEFT HELLO 2.7 - WINDOW_SIZE:1"]).unwrap(), Request::Hello { version: "2.7".into(), caps: vec![], window: 1 });
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 CHUNKED,,SYNC WINDOW_SIZE:4"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 CHUNKED WINDOW_SIZE:0"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 CHUNKED"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 CHUNKED WINDOW:4"])));
    }

    #[test]
    fn welcome() {
        assert_eq!(
            resp(&["DEFT WELCOME 1.0 CHUNKED,PARALLEL,FUTURE WINDOW_SIZE:64 sess_1"]).unwrap(),
            Response::Welcome {
                version: "1.0".into(),
                caps: vec![Capability::Chunked, Capability::Parallel],
                window: 64,
                session: name("sess_1"),
            }
        );
    }

    #[test]
    fn auth_and_auth_ok() {
        assert_eq!(req(&["DEFT AUTH acme-corp"]).unwrap(), Request::Auth { partner: name("acme-corp") });
        assert_eq!(
            resp(&["DEFT AUTH_OK acme-corp VF:orders,invoices"]).unwrap(),
            Response::AuthOk { partner: name("acme-corp"), shares: vec![name("orders"), name("invoices")] }
        );
        assert_eq!(resp(&["DEFT AUTH_OK acme-corp VF:-"]).unwrap(), Response::AuthOk { partner: name("acme-corp"), shares: vec![] });
        assert!(matches!(req(&["DEFT AUTH a/b"]), Err(ProtoError::BadName(_))));
        assert!(matches!(resp(&["DEFT AUTH_OK a VF:x,.."]), Err(ProtoError::BadName(_))));
        assert!(is_bad_args(req(&["DEFT AUTH"])));
    }

    #[test]
    fn discover_and_files() {
        assert_eq!(req(&["DEFT DISCOVER"]).unwrap(), Request::Discover);
        assert_eq!(
            resp(&["DEFT FILES 2", "orders dir 1024 read-write -5", "price.csv file 0 read 1700000000000000000"]).unwrap(),
            Response::Files(vec![
                ShareRow { name: name("orders"), kind: EntryKind::Dir, size: 1024, access: Access::ReadWrite, mtime_ns: -5 },
                ShareRow {
                    name: name("price.csv"),
                    kind: EntryKind::File,
                    size: 0,
                    access: Access::Read,
                    mtime_ns: 1_700_000_000_000_000_000
                },
            ])
        );
        assert_eq!(resp(&["DEFT FILES 0"]).unwrap(), Response::Files(vec![]));
        assert!(is_bad_args(resp(&["DEFT FILES 1", "orders folder 1 read 0"])));
        assert!(is_bad_args(resp(&["DEFT FILES 1", "orders dir 1 admin 0"])));
        assert!(is_bad_args(resp(&["DEFT FILES 1", "orders dir 1 read"])));
        assert!(matches!(resp(&["DEFT FILES 1", "../x dir 1 read 0"]), Err(ProtoError::BadName(_))));
    }

    #[test]
    fn describe_list_stat_default_to_the_root() {
        for (verb, make) in [
            ("DESCRIBE", (|share, path| Request::Describe { share, path }) as fn(Name, SharePath) -> Request),
            ("LIST", |share, path| Request::List { share, path }),
            ("STAT", |share, path| Request::Stat { share, path }),
        ] {
            assert_eq!(req(&[&format!("DEFT {verb} docs")]).unwrap(), make(name("docs"), SharePath::root()));
            assert_eq!(req(&[&format!("DEFT {verb} docs .")]).unwrap(), make(name("docs"), SharePath::root()));
            assert_eq!(req(&[&format!("DEFT {verb} docs a/my%20file.txt")]).unwrap(), make(name("docs"), path("a/my file.txt")));
            assert!(matches!(req(&[&format!("DEFT {verb} docs ../etc")]), Err(ProtoError::BadPath(_))));
            assert!(is_bad_args(req(&[&format!("DEFT {verb} docs a b")])));
            assert!(is_bad_args(req(&[&format!("DEFT {verb}")])));
        }
    }

    #[test]
    fn file_info_with_manifest() {
        let head = format!("DEFT FILE_INFO docs a.bin SIZE:300 CHUNKS:2 HASH:{H} MTIME:-1 MODE:644");
        let c0 = format!("CHUNK 0 0 100 {H1}");
        let c1 = format!("CHUNK 1 100 200 {H}");
        assert_eq!(
            resp(&[&head, &c0, &c1]).unwrap(),
            Response::FileInfo {
                share: name("docs"),
                path: path("a.bin"),
                size: 300,
                file_hash: hash(H),
                mtime_ns: -1,
                mode: 0o644,
                chunks: vec![
                    ChunkLine { index: 0, offset: 0, size: 100, hash: hash(H1) },
                    ChunkLine { index: 1, offset: 100, size: 200, hash: hash(H) },
                ],
            }
        );
        let empty = format!("DEFT FILE_INFO docs e SIZE:0 CHUNKS:0 HASH:{H} MTIME:0 MODE:0");
        assert!(matches!(resp(&[&empty]).unwrap(), Response::FileInfo { size: 0, .. }));
        for mode in ["MODE:8", "MODE:10000", "MODE:0o644", "MODE:", "MODE:-1"] {
            let line = format!("DEFT FILE_INFO docs e SIZE:0 CHUNKS:0 HASH:{H} MTIME:0 {mode}");
            assert!(is_bad_args(resp(&[&line])), "{mode}");
        }
    }

    #[test]
    fn file_part_is_a_checked_run_of_manifest_lines() {
        let part = |head: &str, lines: &[&str]| {
            let mut all = vec![head];
            all.extend_from_slice(lines);
            resp(&all)
        };
        let head = format!("DEFT FILE_PART docs a.bin SIZE:600 CHUNKS:4 HASH:{H} MTIME:-1 MODE:644 FIRST:1 LINES:2");
        let c1 = format!("CHUNK 1 100 200 {H1}");
        let c2 = format!("CHUNK 2 300 100 {H}");
        assert_eq!(
            part(&head, &[&c1, &c2]).unwrap(),
            Response::FilePart(FilePart {
                share: name("docs"),
                path: path("a.bin"),
                size: 600,
                total: 4,
                file_hash: hash(H),
                mtime_ns: -1,
                mode: 0o644,
                first: 1,
                chunks: vec![
                    ChunkLine { index: 1, offset: 100, size: 200, hash: hash(H1) },
                    ChunkLine { index: 2, offset: 300, size: 100, hash: hash(H) },
                ],
            })
        );
        // Not contiguous, not numbered from FIRST, past SIZE, more lines
        // than the manifest has, a last chunk that does not end the file,
        // a first chunk not at 0.
        let bad_cases = [
            (head.clone(), vec![c1.clone(), format!("CHUNK 2 301 100 {H}")]),
            (head.clone(), vec![format!("CHUNK 2 300 100 {H}"), c2.clone()]),
            (head.clone(), vec![c1.clone(), format!("CHUNK 2 300 301 {H}")]),
            (format!("DEFT FILE_PART docs a SIZE:600 CHUNKS:2 HASH:{H} MTIME:0 MODE:0 FIRST:1 LINES:2"), vec![c1.clone(), c2.clone()]),
            (format!("DEFT FILE_PART docs a SIZE:600 CHUNKS:3 HASH:{H} MTIME:0 MODE:0 FIRST:1 LINES:2"), vec![c1.clone(), c2.clone()]),
            (format!("DEFT FILE_PART docs a SIZE:600 CHUNKS:3 HASH:{H} MTIME:0 MODE:0 FIRST:0 LINES:1"), vec![format!("CHUNK 0 5 10 {H}")]),
            (format!("DEFT FILE_PART docs a SIZE:600 CHUNKS:3 HASH:{H} MTIME:0 MODE:0 FIRST:2 LINES:1"), vec![format!("CHUNK 2 1 10 {H}")]),
        ];
        for (head, lines) in &bad_cases {
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            assert!(is_bad_args(part(head, &lines)), "{head} {lines:?}");
        }
        // An empty run (a range past the end), and the empty file.
        let past = format!("DEFT FILE_PART docs a SIZE:600 CHUNKS:4 HASH:{H} MTIME:0 MODE:0 FIRST:4 LINES:0");
        assert!(matches!(part(&past, &[]), Ok(Response::FilePart(FilePart { first: 4, .. }))));
        let empty = format!("DEFT FILE_PART docs e SIZE:0 CHUNKS:0 HASH:{H} MTIME:0 MODE:0 FIRST:0 LINES:0");
        assert!(matches!(part(&empty, &[]), Ok(Response::FilePart(FilePart { size: 0, .. }))));
        let nothing = format!("DEFT FILE_PART docs e SIZE:5 CHUNKS:0 HASH:{H} MTIME:0 MODE:0 FIRST:0 LINES:0");
        assert!(is_bad_args(part(&nothing, &[])));
        let huge = format!("DEFT FILE_PART docs e SIZE:5 CHUNKS:4194305 HASH:{H} MTIME:0 MODE:0 FIRST:0 LINES:0");
        assert_eq!(part(&huge, &[]), Err(ProtoError::TooManyLines));
        assert_eq!(
            req(&["DEFT DESCRIBE_PART docs a.bin OFFSET:0 LENGTH:4194304"]).unwrap(),
            Request::DescribePart { share: name("docs"), path: path("a.bin"), offset: 0, length: 4 << 20 }
        );
        assert!(is_bad_args(req(&["DEFT DESCRIBE_PART docs OFFSET:0 LENGTH:1"])));
    }

    #[test]
    fn entries_and_stat_ok() {
        let entries = resp(&["DEFT ENTRIES 2", "dir 0 10 755 sub", "file 5 -10 600 sub/n%C3%A9%20e"]).unwrap();
        assert_eq!(
            entries,
            Response::Entries(vec![
                Entry { kind: EntryKind::Dir, size: 0, mtime_ns: 10, mode: 0o755, path: path("sub") },
                Entry { kind: EntryKind::File, size: 5, mtime_ns: -10, mode: 0o600, path: path("sub/né e") },
            ])
        );
        assert_eq!(
            resp(&["DEFT STAT_OK dir 0 1 7777 ."]).unwrap(),
            Response::StatOk(Entry { kind: EntryKind::Dir, size: 0, mtime_ns: 1, mode: 0o7777, path: SharePath::root() })
        );
        assert!(matches!(resp(&["DEFT ENTRIES 1", "file 1 1 644 a//b"]), Err(ProtoError::BadPath(_))));
        assert!(matches!(resp(&["DEFT STAT_OK file 1 1 644 /abs"]), Err(ProtoError::BadPath(_))));
        assert!(is_bad_args(resp(&["DEFT STAT_OK file 1 1 644"])));
        assert!(is_bad_args(resp(&["DEFT STAT_OK file +1 1 644 a"])));
    }

    #[test]
    fn begin_transfer_with_manifest() {
        let head = format!("DEFT BEGIN_TRANSFER t-1 inbox orders/o%201.csv SIZE:10 CHUNKS:2 HASH:{H}");
        let c0 = format!("CHUNK 0 0 4 {H}");
        let c1 = format!("CHUNK 1 4 6 {H1}");
        assert_eq!(
            req(&[&head, &c0, &c1]).unwrap(),
            Request::BeginTransfer {
                transfer_id: name("t-1"),
                share: name("inbox"),
                path: path("orders/o 1.csv"),
                size: 10,
                file_hash: hash(H),
                base: Base::Any,
                fence: None,
                mode: None,
                mtime_ns: None,
                manifest: PushManifest::Whole(vec![
                    ChunkLine { index: 0, offset: 0, size: 4, hash: hash(H) },
                    ChunkLine { index: 1, offset: 4, size: 6, hash: hash(H1) },
                ]),
                ahead: None,
            }
        );
    }

    #[test]
    fn ahead_with_chunks_and_a_push_that_names_it() {
        let c2 = format!("CHUNK 2 100 4 {H}");
        let c3 = format!("CHUNK 3 104 6 {H1}");
        assert_eq!(
            req(&["DEFT AHEAD a-1 inbox big.bin FROM:2 CHUNKS:2", &c2, &c3]).unwrap(),
            Request::Ahead {
                ahead_id: name("a-1"),
                share: name("inbox"),
                path: path("big.bin"),
                first: 2,
                chunks: vec![
                    ChunkLine { index: 2, offset: 100, size: 4, hash: hash(H) },
                    ChunkLine { index: 3, offset: 104, size: 6, hash: hash(H1) },
                ],
            }
        );
        // Lines that skip an index or a byte, or an index past what a
        // manifest can have, are refused.
        assert!(req(&["DEFT AHEAD a-1 inbox big.bin FROM:2 CHUNKS:2", &c2, &format!("CHUNK 4 104 6 {H1}")]).is_err());
        assert!(req(&["DEFT AHEAD a-1 inbox big.bin FROM:2 CHUNKS:2", &c2, &format!("CHUNK 3 105 6 {H1}")]).is_err());
        assert!(req(&["DEFT AHEAD a-1 inbox big.bin FROM:4294967295 CHUNKS:2"]).is_err());
        assert!(req(&["DEFT AHEAD a-1 inbox big.bin FROM:x CHUNKS:0"]).is_err());
        let head = format!("DEFT BEGIN_TRANSFER t-1 inbox big.bin SIZE:0 CHUNKS:0 HASH:{H} AHEAD:a-1");
        let Request::BeginTransfer { ahead, .. } = req(&[&head]).unwrap() else { panic!() };
        assert_eq!(ahead, Some(name("a-1")));
    }

    #[test]
    fn begin_transfer_with_a_manifest_relative_to_its_base() {
        let head = format!("DEFT BEGIN_TRANSFER t s f SIZE:20 CHUNKS:5 HASH:{H} BASE:{H1} MTIME:7 LINES:3");
        let lines = ["SAME 0 0 2".to_string(), format!("CHUNK 2 14 3 {H}"), "SAME 3 9 2".to_string()];
        let begin = req(&[&head, &lines[0], &lines[1], &lines[2]]).unwrap();
        let Request::BeginTransfer { base, mtime_ns, manifest, .. } = &begin else { panic!("{begin:?}") };
        assert_eq!((*base, *mtime_ns), (Base::Version(hash(H1)), Some(7)));
        assert_eq!(
            *manifest,
            PushManifest::Relative {
                chunks: 5,
                lines: vec![
                    RelativeLine::Same { index: 0, base_index: 0, count: 2 },
                    RelativeLine::Chunk(ChunkLine { index: 2, offset: 14, size: 3, hash: hash(H) }),
                    RelativeLine::Same { index: 3, base_index: 9, count: 2 },
                ],
            }
        );
        assert_eq!(begin.encode(), format!("{head}\r\n{}\r\n", lines.join("\r\n")));
        // No lines for a file whose chunks are all the base's in one run.
        let one = format!("DEFT BEGIN_TRANSFER t s f SIZE:20 CHUNKS:4 HASH:{H} BASE:{H1} LINES:1");
        assert!(req(&[&one, "SAME 0 3 4"]).is_ok());
        let empty = format!("DEFT BEGIN_TRANSFER t s f SIZE:0 CHUNKS:0 HASH:{H} BASE:{H1} LINES:0");
        assert!(req(&[&empty]).is_ok());
    }

    #[test]
    fn relative_manifest_refusals() {
        let head = |lines: usize| format!("DEFT BEGIN_TRANSFER t s f SIZE:10 CHUNKS:3 HASH:{H} BASE:{H1} LINES:{lines}");
        let cases: Vec<Vec<String>> = vec![
            vec!["SAME 1 0 3".into()],                                                         // does not start at chunk 0
            vec!["SAME 0 0 2".into(), "SAME 1 0 2".into()],                                    // overlaps
            vec!["SAME 0 0 2".into(), "SAME 3 0 1".into()],                                    // skips a chunk
            vec!["SAME 0 0 4".into()],                                                         // past CHUNKS
            vec!["SAME 0 0 2".into()],                                                         // short of CHUNKS
            vec!["SAME 0 0 0".into(), "SAME 0 0 3".into()],                                    // empty run
            vec!["SAME 0 4294967295 3".into()],                                                // base index overflows
            vec!["SAME 0 0 3 4".into()],                                                       // extra token
            vec!["SAME 0 0".into()],                                                           // missing count
            vec!["SAME 0 -1 3".into()],                                                        // signed
            vec![format!("CHUNK 0 1 4 {H}"), "SAME 1 0 2".into()],                             // first chunk not at 0
            vec![format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 5 6 {H}"), "SAME 2 0 1".into()], // gap
            vec!["SAME 0 0 2".into(), format!("CHUNK 2 4 7 {H}")],                             // past SIZE
            vec!["SAME 0 0 2".into(), format!("CHUNK 2 4 5 {H}")],                             // ends short of SIZE
            vec!["SAME 0 0 2".into(), format!("CHUNK 2 4 0 {H}")],                             // empty chunk
        ];
        for lines in &cases {
            let mut all = vec![head(lines.len())];
            all.extend(lines.iter().cloned());
            let got = req(&all.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(is_bad_args(got.clone()), "{lines:?}: {got:?}");
        }
        // A relative manifest needs a base version to be relative to.
        for base in ["", " BASE:-"] {
            let head = format!("DEFT BEGIN_TRANSFER t s f SIZE:10 CHUNKS:1 HASH:{H}{base} LINES:1");
            assert!(is_bad_args(req(&[&head, "SAME 0 0 1"])), "{head}");
        }
        // SAME is no line of a whole manifest, nor of any response.
        let whole = format!("DEFT BEGIN_TRANSFER t s f SIZE:10 CHUNKS:1 HASH:{H} BASE:{H1}");
        assert!(req(&[&whole, "SAME 0 0 1"]).is_err());
        let info = format!("DEFT FILE_INFO s f SIZE:10 CHUNKS:1 HASH:{H} MTIME:0 MODE:0");
        assert!(resp(&[&info, "SAME 0 0 1"]).is_err());
        // Counts past the limit are refused before any line is read.
        let over = MAX_BODY_LINES + 1;
        let many = format!("DEFT BEGIN_TRANSFER t s f SIZE:10 CHUNKS:3 HASH:{H} BASE:{H1} LINES:{over}");
        assert_eq!(req(&[&many]), Err(ProtoError::TooManyLines));
        let many = format!("DEFT BEGIN_TRANSFER t s f SIZE:10 CHUNKS:{over} HASH:{H} BASE:{H1} LINES:1");
        assert_eq!(req(&[&many]), Err(ProtoError::TooManyLines));
    }

    #[test]
    fn manifest_refusals() {
        let head = format!("DEFT BEGIN_TRANSFER t inbox f SIZE:10 CHUNKS:2 HASH:{H}");
        let cases = [
            (format!("CHUNK 1 0 4 {H}"), format!("CHUNK 0 4 6 {H}")),          // out of order
            (format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 5 5 {H}")),          // gap
            (format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 3 7 {H}")),          // overlap
            (format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 4 5 {H}")),          // short of SIZE
            (format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 4 7 {H}")),          // past SIZE
            (format!("CHUNK 0 0 0 {H}"), format!("CHUNK 1 0 10 {H}")),         // empty chunk
            (format!("CHUNK 0 0 4 {H}"), "CHUNK 1 4 6 blake3:00".to_string()), // bad hash
            (format!("CHUNK 0 0 4 {H}"), format!("CHUNK 1 4 6 {H} extra")),
        ];
        for (a, b) in &cases {
            assert!(is_bad_args(req(&[&head, a, b])), "{a} / {b}");
        }
        let not_chunk = req(&[&head, "DEFT BYE"]);
        assert!(matches!(not_chunk, Err(ProtoError::BadBodyLine(_))), "{not_chunk:?}");
        let size_mismatch = format!("DEFT BEGIN_TRANSFER t inbox f SIZE:10 CHUNKS:0 HASH:{H}");
        assert!(is_bad_args(req(&[&size_mismatch])));
        let huge = format!("DEFT FILE_INFO s f SIZE:18446744073709551615 CHUNKS:1 HASH:{H} MTIME:0 MODE:0");
        assert!(is_bad_args(resp(&[&huge, &format!("CHUNK 0 0 4294967295 {H}")])));
    }

    #[test]
    fn too_many_body_lines() {
        let over = MAX_BODY_LINES + 1;
        assert_eq!(resp(&[&format!("DEFT FILES {over}")]), Err(ProtoError::TooManyLines));
        assert_eq!(resp(&[&format!("DEFT ENTRIES {over}")]), Err(ProtoError::TooManyLines));
        let begin = format!("DEFT BEGIN_TRANSFER t s p SIZE:1 CHUNKS:{over} HASH:{H}");
        assert_eq!(req(&[&begin]), Err(ProtoError::TooManyLines));
        assert_eq!(ProtoError::TooManyLines.code(), ErrorCode::TooLarge);
        // At the limit the head is accepted and waits for its lines.
        let mut d = Decoder::<Response>::default();
        assert_eq!(d.push_line(&format!("DEFT FILES {MAX_BODY_LINES}")), Ok(None));
        assert!(d.is_mid_message());
    }

    #[test]
    fn get_and_transfer_accepted() {
        assert_eq!(
            req(&[&format!("DEFT GET t7 docs big.iso {H} CHUNKS 0-5,9,7")]).unwrap(),
            Request::Get {
                transfer_id: name("t7"),
                share: name("docs"),
                path: path("big.iso"),
                file_hash: hash(H),
                chunks: "0-5,7,9".parse().unwrap(),
            }
        );
        assert!(is_bad_args(req(&[&format!("DEFT GET t7 docs big.iso {H} RANGES 0-5")])));
        assert!(is_bad_args(req(&[&format!("DEFT GET t7 docs big.iso {H} CHUNKS 5-3")])));
        assert!(is_bad_args(req(&[&format!("DEFT GET t7 docs big.iso {H} CHUNKS")])));
        assert_eq!(
            resp(&["DEFT TRANSFER_ACCEPTED t7 WINDOW_SIZE:32 NEED:-"]).unwrap(),
            Response::TransferAccepted { transfer_id: name("t7"), window: 32, need: RangeSet::new() }
        );
        assert_eq!(
            resp(&["DEFT TRANSFER_ACCEPTED t7 WINDOW_SIZE:32 NEED:1-3"]).unwrap(),
            Response::TransferAccepted { transfer_id: name("t7"), window: 32, need: RangeSet::span(1, 3) }
        );
        assert!(is_bad_args(resp(&["DEFT TRANSFER_ACCEPTED t7 WINDOW_SIZE:32 NEED:"])));
    }

    #[test]
    fn chunk_acks() {
        assert_eq!(
            resp(&["DEFT CHUNK_ACK t 42 OK"]).unwrap(),
            Response::ChunkAck { transfer_id: name("t"), index: 42, status: AckStatus::Ok }
        );
        assert_eq!(
            resp(&["DEFT CHUNK_ACK t 43 ERROR HASH_MISMATCH"]).unwrap(),
            Response::ChunkAck { transfer_id: name("t"), index: 43, status: AckStatus::Error("HASH_MISMATCH".into()) }
        );
        assert!(is_bad_args(resp(&["DEFT CHUNK_ACK t 43 ERROR"])));
        assert!(is_bad_args(resp(&["DEFT CHUNK_ACK t 43 ERROR TWO WORDS"])));
        assert!(is_bad_args(resp(&["DEFT CHUNK_ACK t 43 FINE"])));
        assert!(is_bad_args(resp(&["DEFT CHUNK_ACK t -1 OK"])));
        assert!(is_bad_args(resp(&["DEFT CHUNK_ACK t 4294967296 OK"])));
        assert_eq!(
            resp(&["DEFT CHUNK_ACK_BATCH t 1-50,52-100"]).unwrap(),
            Response::ChunkAckBatch { transfer_id: name("t"), chunks: "1-50,52-100".parse().unwrap() }
        );
    }

    #[test]
    fn transfer_complete_both_ways_and_receipt_ok() {
        let line = format!("DEFT TRANSFER_COMPLETE t9 HASH:{H} SIZE:104857600 CHUNKS:400 TIME:2026-01-19T14:35:23Z {}", sig());
        let completion = Completion {
            transfer_id: name("t9"),
            file_hash: hash(H),
            size: 104_857_600,
            chunks: 400,
            time: "2026-01-19T14:35:23Z".into(),
            signature: Signature([7; 64]),
        };
        assert_eq!(req(&[&line]).unwrap(), Request::TransferComplete(completion.clone()));
        assert_eq!(resp(&[&line]).unwrap(), Response::TransferComplete(completion));
        let no_time = format!("DEFT TRANSFER_COMPLETE t9 HASH:{H} SIZE:1 CHUNKS:1 TIME: {}", sig());
        assert!(is_bad_args(req(&[&no_time])));
        let bad_sig = format!("DEFT TRANSFER_COMPLETE t9 HASH:{H} SIZE:1 CHUNKS:1 TIME:x sig:ed25519:AAAA");
        assert!(is_bad_args(req(&[&bad_sig])));
        let rsa = format!("DEFT TRANSFER_COMPLETE t9 HASH:{H} SIZE:1 CHUNKS:1 TIME:x sig:rsa:AAAA");
        assert!(is_bad_args(req(&[&rsa])));
        assert_eq!(resp(&["DEFT RECEIPT_OK t9"]).unwrap(), Response::ReceiptOk { transfer_id: name("t9") });
    }

    #[test]
    fn bye_and_error() {
        assert_eq!(req(&["DEFT BYE"]).unwrap(), Request::Bye);
        assert_eq!(resp(&["DEFT BYE"]).unwrap(), Response::Bye);
        assert_eq!(
            resp(&["DEFT ERROR ACCESS_DENIED partner acme may not write  to inbox "]).unwrap(),
            Response::error(ErrorCode::AccessDenied, "partner acme may not write  to inbox ")
        );
        assert_eq!(resp(&["DEFT ERROR STALE"]).unwrap(), Response::error(ErrorCode::Stale, ""));
        assert_eq!(resp(&["DEFT ERROR BUSY a\tb\x7f"]).unwrap(), Response::error(ErrorCode::Busy, "a b "));
        assert!(is_bad_args(resp(&["DEFT ERROR NOPE message"])));
        assert!(is_bad_args(resp(&["DEFT ERROR"])));
        assert!(is_bad_args(req(&["DEFT BYE now"])));
        assert!(is_bad_args(req(&["DEFT BYE "])));
    }

    #[test]
    fn data_headers() {
        assert_eq!(
            DataHeader::parse(&format!("DEFT PUT t 3 SIZE:65536 HASH:{H}")).unwrap(),
            DataHeader::Put { transfer_id: name("t"), index: 3, size: 65536, hash: hash(H) }
        );
        assert_eq!(
            DataHeader::parse(&format!("DEFT CHUNK_DATA t 0 SIZE:1 HASH:{H}")).unwrap(),
            DataHeader::ChunkData { transfer_id: name("t"), index: 0, size: 1, hash: hash(H) }
        );
        assert!(matches!(DataHeader::parse("DEFT GET t"), Err(ProtoError::UnknownVerb(_))));
        assert!(is_bad_args(DataHeader::parse(&format!("DEFT PUT t 3 SIZE:4294967296 HASH:{H}"))));
        assert!(is_bad_args(DataHeader::parse(&format!("DEFT PUT t 3 HASH:{H} SIZE:1"))));
        assert!(matches!(DataHeader::parse(&format!("DEFT PUT .. 3 SIZE:1 HASH:{H}")), Err(ProtoError::BadName(_))));
        assert_eq!(DataHeader::parse("PUT t"), Err(ProtoError::BadPrefix));
        assert_eq!(DataHeader::parse(&"x".repeat(MAX_LINE)), Err(ProtoError::LineTooLong));
    }

    #[test]
    fn refuses_bad_prefix_and_unknown_verbs() {
        for bad in ["", "DEFT", "deft HELLO 1.0 - WINDOW_SIZE:1", "HELLO 1.0", " DEFT BYE", "DEFT\tBYE"] {
            assert_eq!(req(&[bad]), Err(ProtoError::BadPrefix), "{bad:?}");
        }
        assert_eq!(req(&["DEFT WELCOME 1.0 - WINDOW_SIZE:1 s"]), Err(ProtoError::UnknownVerb("WELCOME".into())));
        assert_eq!(resp(&["DEFT HELLO 1.0 - WINDOW_SIZE:1"]), Err(ProtoError::UnknownVerb("HELLO".into())));
        assert_eq!(req(&["DEFT CHUNK_READY x 1 1"]), Err(ProtoError::UnknownVerb("CHUNK_READY".into())));
        assert_eq!(req(&["DEFT  BYE"]), Err(ProtoError::UnknownVerb(String::new())));
        assert_eq!(req(&["DEFT bye"]), Err(ProtoError::UnknownVerb("bye".into())));
    }

    #[test]
    fn refuses_sloppy_tokens() {
        assert!(is_bad_args(req(&["DEFT AUTH  acme"])));
        assert!(is_bad_args(req(&["DEFT AUTH acme "])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 - WINDOW_SIZE:+4"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 - WINDOW_SIZE: 4"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0 - WINDOW_SIZE:4294967296"])));
        assert!(is_bad_args(req(&["DEFT HELLO 1.0\u{1} - WINDOW_SIZE:4"])));
        assert!(is_bad_args(req(&[&format!("DEFT HELLO {} - WINDOW_SIZE:4", "9".repeat(65))])));
    }

    #[test]
    fn refuses_dangerous_paths_and_names() {
        for p in
            ["..", "../x", "a/../../b", "%2E%2E", "/etc/passwd", "%2Fetc", "a%00b", "a%0Ab", "a%0D", "a%1B", "a%7F", "a%5Cb", "a//b", "a/"]
        {
            let r = req(&[&format!("DEFT LIST docs {p}")]);
            assert!(matches!(r, Err(ProtoError::BadPath(_))), "{p}: {r:?}");
            assert_eq!(r.unwrap_err().code(), ErrorCode::BadPath);
        }
        for n in ["..", ".", "-", "a/b", "a%20b", "é"] {
            let r = req(&[&format!("DEFT LIST {n}")]);
            assert!(matches!(r, Err(ProtoError::BadName(_))), "{n}: {r:?}");
            assert_eq!(r.unwrap_err().code(), ErrorCode::BadName);
        }
    }

    #[test]
    fn refuses_long_lines() {
        let longest = format!("DEFT ERROR BUSY {}", "x".repeat(MAX_LINE - 2 - 16));
        assert_eq!(longest.len(), MAX_LINE - 2);
        assert!(resp(&[&longest]).is_ok());
        let too_long = format!("{longest}x");
        assert_eq!(resp(&[&too_long]), Err(ProtoError::LineTooLong));
        assert_eq!(ProtoError::LineTooLong.code(), ErrorCode::TooLarge);
        let mut d = Decoder::<Response>::default();
        assert_eq!(d.push_bytes(too_long.as_bytes()), Err(ProtoError::LineTooLong));
    }

    #[test]
    fn refuses_invalid_utf8_bytes() {
        let mut d = Decoder::<Request>::default();
        assert_eq!(d.push_bytes(b"DEFT AUTH \xff"), Err(ProtoError::NotUtf8));
        assert_eq!(d.push_bytes(b"DEFT AUTH acme"), Ok(Some(Request::Auth { partner: name("acme") })));
    }

    #[test]
    fn resets_after_an_error() {
        let mut d = Decoder::<Response>::default();
        assert_eq!(d.push_line("DEFT ENTRIES 3"), Ok(None));
        assert_eq!(d.push_line("file 1 1 644 a"), Ok(None));
        assert!(d.push_line("file 1 1 644 ..").is_err());
        assert!(!d.is_mid_message());
        // The rest of the broken message is now read as heads, and refused.
        assert_eq!(d.push_line("file 1 1 644 c"), Err(ProtoError::BadPrefix));
        assert_eq!(d.push_line("DEFT BYE"), Ok(Some(Response::Bye)));

        let mut d = Decoder::<Request>::default();
        assert_eq!(d.push_line(&format!("DEFT BEGIN_TRANSFER t s f SIZE:5 CHUNKS:1 HASH:{H}")), Ok(None));
        assert_eq!(d.push_line(&"y".repeat(MAX_LINE)), Err(ProtoError::LineTooLong));
        assert_eq!(d.push_line("DEFT DISCOVER"), Ok(Some(Request::Discover)));
    }

    #[test]
    fn non_canonical_input_re_encodes_to_the_same_message() {
        let upper = H1.to_uppercase().replace("BLAKE3", "blake3");
        let sig = sig();
        let requests: &[&[&str]] = &[
            &["DEFT HELLO 1.0 CHUNKED,FOO,RESUME WINDOW_SIZE:0010"],
            &["DEFT LIST docs a%41/%20b"],
            &["DEFT GET t s f%2fg %H CHUNKS 9,1-3,2"],
            &["DEFT BEGIN_TRANSFER t s f SIZE:05 CHUNKS:2 HASH:%H", "CHUNK 0 0 2 %H", "CHUNK 01 2 3 %H"],
            &["DEFT BEGIN_TRANSFER t s f SIZE:05 CHUNKS:3 HASH:%H BASE:%H LINES:02", "SAME 00 07 02", "CHUNK 2 03 2 %H"],
            &["DEFT TRANSFER_COMPLETE t HASH:%H SIZE:1 CHUNKS:1 TIME:x %S"],
        ];
        let responses: &[&[&str]] = &[
            &["DEFT ERROR BUSY a\tb"],
            &["DEFT FILES 1", "x file 01 read -0"],
            &["DEFT FILE_INFO s . SIZE:2 CHUNKS:1 HASH:%H MTIME:-3 MODE:0644", "CHUNK 0 0 2 %H"],
            &["DEFT TRANSFER_ACCEPTED t WINDOW_SIZE:3 NEED:4,3,1-2"],
            &["DEFT STAT_OK dir 0 0 0000 ."],
        ];
        let fill = |lines: &[&str]| -> Vec<String> { lines.iter().map(|l| l.replace("%H", &upper).replace("%S", &sig)).collect() };
        fn again<M: Message + std::fmt::Debug + PartialEq>(text: &str) -> M {
            let lines: Vec<&str> = text.split_terminator("\r\n").collect();
            feed(&lines).unwrap()
        }
        for lines in requests {
            let lines = fill(lines);
            let first = req(&lines.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            assert_eq!(again::<Request>(&first.encode()), first);
        }
        for lines in responses {
            let lines = fill(lines);
            let first = resp(&lines.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            assert_eq!(again::<Response>(&first.encode()), first);
        }
    }

    #[test]
    fn error_codes() {
        assert_eq!(ProtoError::BadPrefix.code(), ErrorCode::BadRequest);
        assert_eq!(ProtoError::NotUtf8.code(), ErrorCode::BadRequest);
        assert_eq!(ProtoError::UnknownVerb("X".into()).code(), ErrorCode::BadRequest);
        assert_eq!(ProtoError::BadBodyLine("X".into()).code(), ErrorCode::BadRequest);
        assert_eq!(ProtoError::BadArgs { verb: "X".into(), detail: "y".into() }.code(), ErrorCode::BadRequest);
        assert_eq!(ProtoError::BadName(NameError::Empty).code(), ErrorCode::BadName);
        assert_eq!(ProtoError::BadPath(PathError::TooLong).code(), ErrorCode::BadPath);
    }

    /// Lines shaped like the grammar, to reach past the verb.
    fn grammarish_line() -> impl Strategy<Value = String> {
        let verb = prop::sample::select(vec![
            "HELLO",
            "WELCOME",
            "AUTH",
            "AUTH_OK",
            "DISCOVER",
            "FILES",
            "DESCRIBE",
            "DESCRIBE_PART",
            "FILE_INFO",
            "FILE_PART",
            "LIST",
            "ENTRIES",
            "STAT",
            "STAT_OK",
            "BEGIN_TRANSFER",
            "TRANSFER_ACCEPTED",
            "GET",
            "CHUNK_ACK",
            "CHUNK_ACK_BATCH",
            "TRANSFER_COMPLETE",
            "RECEIPT_OK",
            "WATCH",
            "WATCHING",
            "CHANGED",
            "BYE",
            "ERROR",
            "PUT",
            "CHUNK_DATA",
        ]);
        let token = prop_oneof![
            "[a-z0-9.%/-]{1,6}",
            "(SIZE|CHUNKS|HASH|MTIME|MODE|WINDOW_SIZE|NEED|VF|TIME|FIRST|LINES|OFFSET|LENGTH|BASE):[0-9a-f,-]{0,6}",
            Just(format!("HASH:{H}")),
            Just(format!("BASE:{H}")),
            Just(H.to_string()),
            "[0-9]{1,20}",
            "-?[0-7]{1,5}",
            Just("OK".to_string()),
            Just("ERROR".to_string()),
            Just("CHUNKS".to_string()),
            Just(sig()),
            "\\PC{0,4}",
        ];
        let head = (verb, prop::collection::vec(token.clone(), 0..9)).prop_map(|(verb, args)| format!("DEFT {verb} {}", args.join(" ")));
        let body = (prop::sample::select(vec!["CHUNK", "SAME"]), prop::collection::vec(token, 0..7))
            .prop_map(|(kind, args)| format!("{kind} {}", args.join(" ")));
        prop_oneof![head, body, "dir [0-9]{1,3} [0-9]{1,3} [0-7]{3} [a-z.%]{1,5}"]
    }

    /// CHUNK lines near the grammar: numbers at the edges of u32 and u64,
    /// leading zeros, hashes in either case or malformed, stray spaces.
    fn chunkish_line() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            "[0-9]{1,3}",
            "0[0-9]{1,25}",
            Just(u32::MAX.to_string()),
            Just((u64::from(u32::MAX) + 1).to_string()),
            Just(u64::MAX.to_string()),
            Just("18446744073709551616".to_string()),
            "-?[0-9a-f]{0,3}",
        ];
        let hash = prop_oneof![
            Just(H.to_string()),
            Just(format!("blake3:{}", "0123456789abcdef".repeat(4))),
            Just(format!("blake3:{}", "0123456789ABCDEF".repeat(4))),
            Just(format!("BLAKE3:{}", "0123456789abcdef".repeat(4))),
            "blake3:[0-9a-fA-Fg ]{62,66}",
            "\\PC{0,8}",
        ];
        let sep = prop_oneof![8 => Just(" ".to_string()), 1 => Just("  ".to_string()), 1 => Just(String::new())];
        (number.clone(), sep.clone(), number.clone(), sep.clone(), number, sep, hash, prop_oneof![Just(""), Just(" "), Just(" x")])
            .prop_map(|(i, s1, o, s2, n, s3, h, tail)| format!("CHUNK {i}{s1}{o}{s2}{n}{s3}{h}{tail}"))
    }

    proptest! {
        /// The fast CHUNK reader never disagrees with the general parser:
        /// where it reads a line, the parser reads the same fields.
        #[test]
        fn chunk_fields_agree_with_the_parser(line in chunkish_line()) {
            if let Some(fast) = chunk_fields(&line) {
                prop_assert_eq!(parse_chunk(&line), Ok(fast));
            }
        }

        /// And where the parser reads a line, so does the fast reader.
        #[test]
        fn chunk_fields_read_every_line_the_parser_reads(line in chunkish_line()) {
            if let Ok(slow) = parse_chunk(&line) {
                prop_assert_eq!(chunk_fields(&line), Some(slow));
            }
        }

        #[test]
        fn arbitrary_lines_never_panic(lines in prop::collection::vec("\\PC{0,60}|DEFT \\PC{0,60}", 0..8)) {
            let mut requests = Decoder::<Request>::default();
            let mut responses = Decoder::<Response>::default();
            for line in &lines {
                let _ = requests.push_line(line);
                let _ = responses.push_line(line);
                let _ = DataHeader::parse(line);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut requests = Decoder::<Request>::default();
            let mut responses = Decoder::<Response>::default();
            for line in input.split(|&b| b == b'\n') {
                let _ = requests.push_bytes(line);
                let _ = responses.push_bytes(line);
                if let Ok(line) = std::str::from_utf8(line) {
                    let _ = DataHeader::parse(line);
                }
            }
        }

        /// Relative manifests near the grammar: the head of one, then CHUNK
        /// and SAME lines with numbers at the edges. Never a panic, and a
        /// manifest that is accepted numbers its chunks 0 to CHUNKS - 1
        /// and stays within SIZE where its CHUNK lines say where they are.
        #[test]
        fn relative_manifests_never_panic_and_stay_in_bounds(
            size in prop_oneof![0u64..64, Just(u64::MAX)],
            chunks in prop_oneof![0u64..8, Just(MAX_BODY_LINES), Just(u64::from(u32::MAX))],
            lines in prop::collection::vec(prop_oneof![
                chunkish_line(),
                (0u64..8, prop_oneof![0u64..8, Just(u64::from(u32::MAX))], prop_oneof![0u64..8, Just(u64::from(u32::MAX)), Just(u64::MAX)])
                    .prop_map(|(i, b, n)| format!("SAME {i} {b} {n}")),
                "SAME \\PC{0,20}",
            ], 0..8),
        ) {
            let mut d = Decoder::<Request>::default();
            let head = format!("DEFT BEGIN_TRANSFER t s f SIZE:{size} CHUNKS:{chunks} HASH:{H} BASE:{H1} LINES:{}", lines.len());
            let mut got = d.push_line(&head);
            for line in &lines {
                got = d.push_line(line);
            }
            if let Ok(Some(Request::BeginTransfer { manifest: PushManifest::Relative { chunks: n, lines: body }, .. })) = got {
                prop_assert_eq!(u64::from(n), chunks);
                let mut next = 0u64;
                for l in &body {
                    match l {
                        RelativeLine::Chunk(c) => {
                            prop_assert_eq!(u64::from(c.index), next);
                            prop_assert!(c.size > 0 && c.offset + u64::from(c.size) <= size);
                        }
                        RelativeLine::Same { index, count, .. } => {
                            prop_assert_eq!(u64::from(*index), next);
                            prop_assert!(*count > 0);
                        }
                    }
                    next = l.end();
                }
                prop_assert_eq!(next, chunks);
            }
        }

        #[test]
        fn grammarish_lines_never_panic(lines in prop::collection::vec(grammarish_line(), 0..10)) {
            let mut requests = Decoder::<Request>::default();
            let mut responses = Decoder::<Response>::default();
            for line in &lines {
                let _ = requests.push_line(line);
                let _ = responses.push_line(line);
                let _ = DataHeader::parse(line);
            }
        }
    }
}
