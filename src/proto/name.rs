//! Validated tokens: share names, partner ids, node names, transfer and
//! session ids.
//!
//! A [`Name`] can only be built through [`Name::new`], so holding one
//! guarantees it is 1 to 128 bytes of `[A-Za-z0-9._-]` and none of the
//! reserved words: it is safe as one space-separated token on the wire, as a
//! file or directory name, and in a comma-separated list.

use std::fmt;
use std::str::FromStr;

/// A token of 1 to 128 characters from `[A-Za-z0-9._-]`, not `.` or `..`
/// (path components) nor `-` (the wire's "empty list", as in `VF:-`).
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
    /// Names that would read as something else: `.` and `..` in paths, `-`
    /// as an empty list on the wire.
    pub const RESERVED: [&'static str; 3] = [".", "..", "-"];

    pub fn new(s: impl Into<String>) -> Result<Name, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(NameError::TooLong(super::excerpt(&s, Self::MAX_LEN)));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(NameError::BadChar(s));
        }
        if Self::RESERVED.contains(&s.as_str()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tokens() {
        for ok in ["a", "acme-corp", "invoices_2026.01", "A.b-C_9", "..a", "-x", &"n".repeat(128)] {
            assert_eq!(Name::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_empty() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
    }

    #[test]
    fn refuses_too_long() {
        assert!(matches!(Name::new("n".repeat(129)), Err(NameError::TooLong(_))));
    }

    #[test]
    fn refuses_bad_chars() {
        for bad in ["a/b", "/", "a b", "a\0b", "a\nb", "a\tb", "a\x7fb", "a\\b", "é", "a:b", "a,b", "a%b"] {
            assert!(matches!(Name::new(bad), Err(NameError::BadChar(_))), "{bad:?}");
        }
    }

    #[test]
    fn refuses_reserved() {
        for bad in [".", "..", "-"] {
            assert!(matches!(Name::new(bad), Err(NameError::Reserved(_))), "{bad:?}");
        }
    }

    #[test]
    fn parses_and_displays() {
        let n: Name = "acme".parse().unwrap();
        assert_eq!(n.to_string(), "acme");
        assert_eq!(format!("{n:?}"), "\"acme\"");
    }
}
