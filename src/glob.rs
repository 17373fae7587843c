//! Shell-style wildcard patterns for share globs and lockable patterns:
//! `*` (any run, not `/`), `?` (one char, not `/`), `[abc]`, `[a-z]`, `[!x]`.
//!
//! A pattern is compiled once into tokens split at its literal `/`. Since no
//! wildcard matches `/`, a text matches only if it has exactly as many `/`
//! as the pattern and each `/`-separated component matches its pattern
//! component. Each component is matched iteratively, remembering only the
//! last `*` to backtrack to: time is O(pattern × text) at worst, never
//! exponential. There is no escape character (`\` is a literal, as share
//! paths are unix paths); `]` right after `[` or `[!` is a literal member,
//! as is `-` first or last. Matching is by Unicode scalar value.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    /// The pattern's tokens, one list per `/`-separated component.
    components: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    AnyOne,
    /// `*`
    AnyRun,
    /// `[...]`: inclusive ranges (a single char is a range of one).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    /// Whether this single-char token matches `c` (`*` is handled apart).
    fn matches_one(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid pattern {0:?}: unclosed '['")]
pub struct GlobError(pub String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut components = vec![Vec::new()];
        let mut i = 0;
        while i < chars.len() {
            let token = match chars[i] {
                '/' => {
                    components.push(Vec::new());
                    i += 1;
                    continue;
                }
                '*' => Token::AnyRun,
                '?' => Token::AnyOne,
                '[' => {
                    let (token, end) = parse_class(&chars, i + 1).ok_or_else(|| GlobError(pattern.to_string()))?;
                    i = end;
                    token
                }
                c => Token::Literal(c),
            };
            if let Some(current) = components.last_mut() {
                current.push(token);
            }
            i += 1;
        }
        Ok(Glob { pattern: pattern.to_string(), components })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whole-string match.
    pub fn matches(&self, name: &str) -> bool {
        if name.split('/').count() != self.components.len() {
            return false;
        }
        name.split('/').zip(&self.components).all(|(text, tokens)| match_component(tokens, &text.chars().collect::<Vec<_>>()))
    }

    /// True when the text has a wildcard character.
    pub fn is_pattern(text: &str) -> bool {
        text.contains(['*', '?', '['])
    }
}

/// Parse a class whose `[` is just before `start`. Returns the token and
/// the index of the closing `]`, or None if it is never closed.
fn parse_class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'!');
    if negated {
        i += 1;
    }
    let first = i;
    let mut ranges = Vec::new();
    loop {
        let c = *chars.get(i)?;
        if c == ']' && i > first {
            return Some((Token::Class { negated, ranges }, i));
        }
        match (chars.get(i + 1), chars.get(i + 2)) {
            (Some('-'), Some(&hi)) if hi != ']' => {
                ranges.push((c, hi));
                i += 3;
            }
            _ => {
                ranges.push((c, c));
                i += 1;
            }
        }
    }
}

/// Match one component (no `/` in `text`), backtracking only to the most
/// recent `*`: any later success of an earlier `*` is also reachable by
/// letting the most recent one absorb more.
fn match_component(tokens: &[Token], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    // (index of the last `*`, text index it is currently matched up to)
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(p) {
            Some(Token::AnyRun) => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(token) if token.matches_one(text[t]) => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                star = Some((sp, st + 1));
                p = sp + 1;
                t = st + 1;
            }
            None => return false,
        }
    }
    tokens[p..].iter().all(|token| *token == Token::AnyRun)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).unwrap().matches(text)
    }

    #[test]
    fn literals_and_question_mark() {
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("abc", "abc"));
        assert!(!m("abc", "abcd"));
        assert!(!m("abc", "ab"));
        assert!(m("a?c", "abc"));
        assert!(m("a?c", "aéc"));
        assert!(!m("a?c", "ac"));
        assert!(!m("a?c", "a/c"));
        assert!(m("a\\b", "a\\b"));
    }

    #[test]
    fn star() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(!m("*", "a/b"));
        assert!(m("*.xml", "order-1.xml"));
        assert!(!m("*.xml", "order-1.xml.tmp"));
        assert!(m("*.xml*", "order-1.xml.tmp"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("**", "abc"));
        assert!(m("*a", "aaa"));
        assert!(m("*ab", "aab"));
    }

    #[test]
    fn slash_is_never_matched_by_a_wildcard() {
        assert!(m("/data/orders/*.xml", "/data/orders/1.xml"));
        assert!(!m("/data/orders/*.xml", "/data/orders/sub/1.xml"));
        assert!(m("/data/*/*.xml", "/data/orders/1.xml"));
        assert!(m("*/*", "a/b"));
        assert!(!m("*/*", "a/b/c"));
        assert!(!m("a[/]b", "a/b"));
        assert!(m("dir/", "dir/"));
        assert!(!m("dir/", "dir"));
    }

    #[test]
    fn classes() {
        assert!(m("[abc]", "b"));
        assert!(!m("[abc]", "d"));
        assert!(m("[a-z]1", "q1"));
        assert!(!m("[a-z]1", "Q1"));
        assert!(m("[!x]", "y"));
        assert!(!m("[!x]", "x"));
        assert!(!m("[!x]", "/"));
        assert!(m("[]]", "]"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("[-a]", "-"));
        assert!(m("[0-9a-fA-F][0-9]", "F7"));
        assert!(m("v[0-9].*", "v2.tar"));
    }

    #[test]
    fn unclosed_bracket() {
        for bad in ["[", "a[bc", "[!", "[]", "[!]", "x/[a-"] {
            assert_eq!(Glob::new(bad), Err(GlobError(bad.to_string())), "{bad}");
        }
        assert_eq!(Glob::new("a[").unwrap_err().to_string(), "invalid pattern \"a[\": unclosed '['");
    }

    #[test]
    fn no_exponential_blowup() {
        let text = "a".repeat(100_000);
        let started = std::time::Instant::now();
        assert!(!m("a*a*a*a*a*b", &text));
        assert!(m("a*a*a*a*a*", &text));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn is_pattern_and_as_str() {
        assert!(Glob::is_pattern("/data/*.xml"));
        assert!(Glob::is_pattern("file?"));
        assert!(Glob::is_pattern("[ab]"));
        assert!(!Glob::is_pattern("/data/invoices"));
        assert_eq!(Glob::new("a*").unwrap().as_str(), "a*");
    }
}
