//! Serializing messages to lines. STUB: contract only.

use super::{Access, Capability, DataHeader, ErrorCode, Request, Response, Signature};

impl Request {
    /// All lines of the message, each ending in CRLF.
    pub fn encode(&self) -> String {
        todo!()
    }
}

impl Response {
    /// All lines of the message, each ending in CRLF. An Error's message is
    /// sanitized (CR, LF and control characters replaced) and truncated so
    /// the line fits MAX_LINE.
    pub fn encode(&self) -> String {
        todo!()
    }

    /// Convenience: `Response::Error` with a message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error { code, message: message.into() }
    }
}

impl DataHeader {
    /// The header line, ending in CRLF.
    pub fn encode(&self) -> String {
        todo!()
    }
}

impl ErrorCode {
    /// Upper-case wire form, e.g. `ACCESS_DENIED`.
    pub fn as_str(&self) -> &'static str {
        todo!()
    }
}

impl Capability {
    /// Upper-case wire form, e.g. `CHUNKED`.
    pub fn as_str(&self) -> &'static str {
        todo!()
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

impl std::fmt::Display for Signature {
    /// `sig:ed25519:<base64 standard, padded>`
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        todo!()
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for Signature {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
    }
}
