//! In-share paths, and their percent-encoded wire form.
//!
//! A [`SharePath`] can only be built by [`SharePath::parse`],
//! [`SharePath::from_wire`] or [`SharePath::join`], which all apply the same
//! rules: holding one guarantees a normalized relative path that cannot
//! leave the share (no `..`, no leading `/`), names no special file (no NUL,
//! control characters or `\`), and fits in [`SharePath::MAX_LEN`] bytes.
//! The wire form is one token (no space, never empty) and decodes back to
//! the same path.

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

/// Longest path quoted in an error value.
const QUOTE: usize = 200;

impl SharePath {
    /// Longest path, in bytes (Linux PATH_MAX).
    pub const MAX_LEN: usize = 4096;
    /// Longest component, in bytes (Linux NAME_MAX).
    pub const MAX_COMPONENT: usize = 255;
    /// The wire form of the root.
    pub const WIRE_ROOT: &'static str = ".";

    pub fn root() -> SharePath {
        SharePath(String::new())
    }

    /// Validate a plain (decoded) path. The empty string is the root.
    pub fn parse(s: &str) -> Result<SharePath, PathError> {
        if s.is_empty() {
            return Ok(SharePath::root());
        }
        if s.len() > Self::MAX_LEN {
            return Err(PathError::TooLong);
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(super::excerpt(s, QUOTE)));
        }
        for component in s.split('/') {
            check_component(component, s)?;
        }
        Ok(SharePath(s.to_string()))
    }

    /// Decode the wire form: `.` is the root, else percent-encoded path.
    /// Any `%XX` escape is accepted (even of a character that needs none);
    /// the decoded path must then pass [`SharePath::parse`].
    pub fn from_wire(s: &str) -> Result<SharePath, PathError> {
        if s == Self::WIRE_ROOT {
            return Ok(SharePath::root());
        }
        if s.is_empty() || s.contains(' ') {
            return Err(PathError::BadEncoding(super::excerpt(s, QUOTE)));
        }
        // Each decoded byte takes at most 3 wire bytes.
        if s.len() > 3 * Self::MAX_LEN {
            return Err(PathError::TooLong);
        }
        let decoded = percent_decode(s).ok_or_else(|| PathError::BadEncoding(super::excerpt(s, QUOTE)))?;
        SharePath::parse(&decoded)
    }

    /// The wire form: `.` for the root, else the path with `%`, space,
    /// ASCII control characters and DEL percent-encoded; other bytes,
    /// including UTF-8 beyond ASCII, stay as they are. Never empty, never
    /// contains a space.
    pub fn to_wire(&self) -> String {
        if self.is_root() {
            return Self::WIRE_ROOT.to_string();
        }
        let mut out = String::with_capacity(self.0.len());
        for c in self.0.chars() {
            if c == '%' || c == ' ' || c.is_ascii_control() {
                out.push_str(&format!("%{:02X}", c as u32));
            } else {
                out.push(c);
            }
        }
        out
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
        if self.is_root() {
            return None;
        }
        self.0.rsplit('/').next()
    }

    /// Parent path; None for the root.
    pub fn parent(&self) -> Option<SharePath> {
        if self.is_root() {
            return None;
        }
        match self.0.rsplit_once('/') {
            Some((parent, _)) => Some(SharePath(parent.to_string())),
            None => Some(SharePath::root()),
        }
    }

    /// Append one validated component. A `/` in `component` is refused as
    /// [`PathError::BadChar`]: one component, not a sub-path.
    pub fn join(&self, component: &str) -> Result<SharePath, PathError> {
        if component.contains('/') {
            return Err(PathError::BadChar(super::excerpt(component, QUOTE)));
        }
        check_component(component, component)?;
        let joined = if self.is_root() { component.to_string() } else { format!("{}/{component}", self.0) };
        if joined.len() > Self::MAX_LEN {
            return Err(PathError::TooLong);
        }
        Ok(SharePath(joined))
    }
}

/// One component of `path` (quoted in errors) against the rules of
/// [`SharePath`].
fn check_component(component: &str, path: &str) -> Result<(), PathError> {
    if component.is_empty() {
        return Err(PathError::EmptyComponent(super::excerpt(path, QUOTE)));
    }
    if component == "." || component == ".." {
        return Err(PathError::DotComponent(super::excerpt(path, QUOTE)));
    }
    if component.len() > SharePath::MAX_COMPONENT {
        return Err(PathError::TooLong);
    }
    // char::is_control covers NUL, C0, DEL and C1: none belongs in a name.
    if component.chars().any(|c| c.is_control() || c == '\\') {
        return Err(PathError::BadChar(super::excerpt(path, QUOTE)));
    }
    Ok(())
}

/// `%XX` (either case) decoded to its byte; None on a malformed escape or
/// when the bytes are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = hex_digit(bytes.next()?)?;
            let lo = hex_digit(bytes.next()?)?;
            out.push(hi << 4 | lo);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> SharePath {
        SharePath::parse(s).unwrap()
    }

    #[test]
    fn root_is_empty_and_dot_on_the_wire() {
        assert!(p("").is_root());
        assert_eq!(SharePath::root().to_wire(), ".");
        assert_eq!(SharePath::from_wire(".").unwrap(), SharePath::root());
        assert_eq!(SharePath::root().to_string(), "/");
    }

    #[test]
    fn accepts_relative_paths() {
        for ok in ["a", "a/b/c", "dir with space/file.txt", "été/naïve.blend", "..a/b..", ".hidden", "a/%41"] {
            assert_eq!(p(ok).as_str(), ok);
        }
    }

    #[test]
    fn refuses_absolute() {
        assert!(matches!(SharePath::parse("/etc/passwd"), Err(PathError::Absolute(_))));
        assert!(matches!(SharePath::from_wire("/etc"), Err(PathError::Absolute(_))));
        assert!(matches!(SharePath::from_wire("%2Fetc"), Err(PathError::Absolute(_))));
    }

    #[test]
    fn refuses_dot_components() {
        for bad in ["..", ".", "../x", "a/../b", "a/..", "./a", "a/./b"] {
            assert!(matches!(SharePath::parse(bad), Err(PathError::DotComponent(_))), "{bad:?}");
        }
        for bad in ["..", "a/..", "%2E%2E/x", "a/%2e"] {
            assert!(matches!(SharePath::from_wire(bad), Err(PathError::DotComponent(_))), "{bad:?}");
        }
    }

    #[test]
    fn refuses_empty_components() {
        for bad in ["a//b", "a/", "a/b/"] {
            assert!(matches!(SharePath::parse(bad), Err(PathError::EmptyComponent(_))), "{bad:?}");
            assert!(matches!(SharePath::from_wire(bad), Err(PathError::EmptyComponent(_))), "{bad:?}");
        }
    }

    #[test]
    fn refuses_nul_control_and_backslash() {
        for bad in ["a\0b", "a\nb", "a\rb", "a\tb", "a\x1bb", "a\x7fb", "a\u{85}b", "a\\b", "C:\\x"] {
            assert!(matches!(SharePath::parse(bad), Err(PathError::BadChar(_))), "{bad:?}");
        }
        for bad in ["a%00b", "a%0Ab", "a%0d", "%09", "a%7F", "a%5Cb", "a%C2%85"] {
            assert!(matches!(SharePath::from_wire(bad), Err(PathError::BadChar(_))), "{bad:?}");
        }
    }

    #[test]
    fn refuses_too_long() {
        let long = vec!["d".repeat(200); 21].join("/");
        assert!(long.len() > 4096);
        assert_eq!(SharePath::parse(&long), Err(PathError::TooLong));
        assert_eq!(SharePath::parse(&"c".repeat(256)), Err(PathError::TooLong));
        assert!(SharePath::parse(&"c".repeat(255)).is_ok());
        assert_eq!(SharePath::from_wire(&"%41".repeat(4097)), Err(PathError::TooLong));
    }

    #[test]
    fn refuses_bad_encoding() {
        for bad in ["", "a%", "a%4", "a%zz", "a%G0", "a b", "%FF", "%C3", "%C3%28"] {
            assert!(matches!(SharePath::from_wire(bad), Err(PathError::BadEncoding(_))), "{bad:?}");
        }
    }

    #[test]
    fn wire_escapes_percent_space_and_controls() {
        assert_eq!(p("my file 100%.txt").to_wire(), "my%20file%20100%25.txt");
        assert_eq!(p("été").to_wire(), "été");
        assert_eq!(SharePath::from_wire("my%20file%20100%25.txt").unwrap(), p("my file 100%.txt"));
        assert_eq!(SharePath::from_wire("a%2fb").unwrap(), p("a/b"));
    }

    #[test]
    fn file_name_parent_and_join() {
        let x = p("a/b/c.txt");
        assert_eq!(x.file_name(), Some("c.txt"));
        assert_eq!(x.parent(), Some(p("a/b")));
        assert_eq!(p("a").parent(), Some(SharePath::root()));
        assert_eq!(SharePath::root().parent(), None);
        assert_eq!(SharePath::root().file_name(), None);
        assert_eq!(SharePath::root().join("a").unwrap(), p("a"));
        assert_eq!(p("a").join("b c").unwrap(), p("a/b c"));
        assert_eq!(x.components().collect::<Vec<_>>(), ["a", "b", "c.txt"]);
        assert!(matches!(p("a").join(".."), Err(PathError::DotComponent(_))));
        assert!(matches!(p("a").join(""), Err(PathError::EmptyComponent(_))));
        assert!(matches!(p("a").join("b/c"), Err(PathError::BadChar(_))));
        assert!(matches!(p("a").join("b\0"), Err(PathError::BadChar(_))));
    }

    fn component() -> impl Strategy<Value = String> {
        "[^/\\\\\\p{Cc}]{1,12}".prop_filter("dot component", |c| c != "." && c != "..")
    }

    proptest! {
        #[test]
        fn wire_round_trips(parts in proptest::collection::vec(component(), 0..6)) {
            let path = p(&parts.join("/"));
            let wire = path.to_wire();
            prop_assert!(!wire.is_empty() && !wire.contains(' '));
            prop_assert_eq!(SharePath::from_wire(&wire).unwrap(), path);
        }

        #[test]
        fn from_wire_never_panics(s in "\\PC{0,40}|[%./a-z 0-9A-F\\\\]{0,40}") {
            let _ = SharePath::from_wire(&s);
        }
    }
}
