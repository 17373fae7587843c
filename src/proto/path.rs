//! In-share paths. STUB: contract only, the proto helper implements it.

use std::fmt;

/// A path relative to a share's root: components separated by `/`, each
/// non-empty, not `.` or `..`, without NUL, control characters or `\`;
/// no leading or trailing `/`. The empty path is the share root.
/// At most 4096 bytes, components at most 255 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SharePath(String);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} is absolute; give a path relative to the share")]
    Absolute(String),
    #[error("path {0:?} contains '..' or '.'; give a normalized path inside the share")]
    DotComponent(String),
    #[error("path {0:?} contains an empty component")]
    EmptyComponent(String),
    #[error("path {0:?} contains NUL, a control character or a backslash")]
    BadChar(String),
    #[error("path is longer than 4096 bytes or has a component longer than 255")]
    TooLong,
    #[error("path {0:?} is not valid percent-encoding")]
    BadEncoding(String),
}

impl SharePath {
    pub fn root() -> SharePath {
        SharePath(String::new())
    }

    /// Validate a plain (decoded) path. The empty string is the root.
    pub fn parse(s: &str) -> Result<SharePath, PathError> {
        todo!("{s}")
    }

    /// Decode the wire form: `.` is the root, else percent-encoded path.
    pub fn from_wire(s: &str) -> Result<SharePath, PathError> {
        todo!("{s}")
    }

    /// The wire form: `.` for the root, else the path with `%`, space,
    /// and every byte outside printable ASCII except UTF-8 letters
    /// percent-encoded. Never empty, never contains a space.
    pub fn to_wire(&self) -> String {
        todo!()
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// Last component; None for the root.
    pub fn file_name(&self) -> Option<&str> {
        todo!()
    }

    /// Parent path; None for the root.
    pub fn parent(&self) -> Option<SharePath> {
        todo!()
    }

    /// Append one validated component.
    pub fn join(&self, component: &str) -> Result<SharePath, PathError> {
        todo!("{component}")
    }
}

impl fmt::Display for SharePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for SharePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
