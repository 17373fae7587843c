//! Validated tokens: share names, partner ids, node names, transfer and
//! session ids. STUB: contract only, the proto helper implements it.

use std::fmt;
use std::str::FromStr;

/// A token of 1 to 128 characters from `[A-Za-z0-9._-]`, not `.` or `..`.
/// Never contains `/`, spaces, NUL or control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {0:?} is longer than 128 characters")]
    TooLong(String),
    #[error("name {0:?} may only use letters, digits, '.', '_' and '-'")]
    BadChar(String),
    #[error("name {0:?} is reserved")]
    Reserved(String),
}

impl Name {
    pub const MAX_LEN: usize = 128;

    pub fn new(s: impl Into<String>) -> Result<Name, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.chars().count() > Name::MAX_LEN {
            return Err(NameError::TooLong(s));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(NameError::BadChar(s));
        }
        if s == "." || s == ".." {
            return Err(NameError::Reserved(s));
        }
        Ok(Name(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
