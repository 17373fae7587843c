//! Parsing lines into messages. STUB: contract only.

use super::{DataHeader, ErrorCode, NameError, PathError, Request, Response};

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
    pub fn code(&self) -> ErrorCode {
        todo!()
    }
}

/// Something a [`Decoder`] can produce: [`Request`] or [`Response`].
pub trait Message: Sized {}
impl Message for Request {}
impl Message for Response {}

/// Turns lines (without their CRLF) into messages, collecting the body
/// lines a head announces. After an error the decoder is reset and ready
/// for the next head line.
pub struct Decoder<M: Message> {
    _m: std::marker::PhantomData<M>,
}

impl<M: Message> Default for Decoder<M> {
    fn default() -> Self {
        Decoder { _m: std::marker::PhantomData }
    }
}

impl Decoder<Request> {
    pub fn push_line(&mut self, line: &str) -> Result<Option<Request>, ProtoError> {
        todo!("{line}")
    }
}

impl Decoder<Response> {
    pub fn push_line(&mut self, line: &str) -> Result<Option<Response>, ProtoError> {
        todo!("{line}")
    }
}

impl DataHeader {
    /// Parse a chunk stream's header line (without CRLF).
    pub fn parse(line: &str) -> Result<DataHeader, ProtoError> {
        todo!("{line}")
    }
}
