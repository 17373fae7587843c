//! Shell-style wildcard patterns for share globs and lockable patterns:
//! `*` (any run, not `/`), `?` (one char, not `/`), `[abc]`, `[a-z]`, `[!x]`.
//! STUB: contract only, the identity helper implements it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid pattern {0:?}: unclosed '['")]
pub struct GlobError(pub String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let _ = pattern;
        todo!()
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whole-string match.
    pub fn matches(&self, name: &str) -> bool {
        let _ = name;
        todo!()
    }

    /// True when the text has a wildcard character.
    pub fn is_pattern(text: &str) -> bool {
        text.contains(['*', '?', '['])
    }
}
