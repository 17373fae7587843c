//! Sets of chunk indices, written `0-5,7,9-12` (`-` for the empty set).
//!
//! A [`RangeSet`] is always normalized (sorted, disjoint, non-adjacent
//! ranges), so equal sets compare equal and print the same canonical text.
//! Parsing is lenient about order and overlap but bounded: at most
//! [`RangeSet::MAX_ITEMS`] listed items. A line has room for
//! [`RangeSet::MAX_WIRE_LEN`] bytes of ranges whatever else it carries;
//! [`RangeSet::split_to_fit`] and [`RangeSet::covering_within`] bring a
//! fragmented set within that budget.

use std::fmt;
use std::str::FromStr;

/// A set of u32 chunk indices kept as sorted, disjoint, non-adjacent
/// inclusive ranges.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RangeSet {
    ranges: Vec<(u32, u32)>,
}

impl RangeSet {
    /// Most comma-separated items [`str::parse`] accepts.
    pub const MAX_ITEMS: usize = 1_000_000;
    /// Room for ranges in any one line: a GET with the longest names and
    /// path still fits [`super::MAX_LINE`] with this many bytes of ranges.
    pub const MAX_WIRE_LEN: usize = 32 * 1024;

    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// The set `first..=last` (empty when `first > last`).
    pub fn span(first: u32, last: u32) -> RangeSet {
        let ranges = if first <= last { vec![(first, last)] } else { Vec::new() };
        RangeSet { ranges }
    }

    pub fn insert(&mut self, index: u32) {
        // The first range ending at or after `index`: the one that holds it,
        // or the one after the gap where it belongs.
        let at = self.ranges.partition_point(|&(_, last)| last < index);
        let next = self.ranges.get(at).copied();
        if next.is_some_and(|(first, _)| first <= index) {
            return;
        }
        let joins_prev = at > 0 && self.ranges[at - 1].1 + 1 == index;
        let joins_next = next.is_some_and(|(first, _)| first - 1 == index);
        match (joins_prev, next) {
            (true, Some((_, last))) if joins_next => {
                self.ranges[at - 1].1 = last;
                self.ranges.remove(at);
            }
            (true, _) => self.ranges[at - 1].1 = index,
            (false, Some(_)) if joins_next => self.ranges[at].0 = index,
            (false, _) => self.ranges.insert(at, (index, index)),
        }
    }

    pub fn contains(&self, index: u32) -> bool {
        let at = self.ranges.partition_point(|&(_, last)| last < index);
        self.ranges.get(at).is_some_and(|&(first, _)| first <= index)
    }

    /// Number of indices in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(first, last)| u64::from(last - first) + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..=b)
    }

    /// The inclusive ranges, ascending.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// Cut the set into pieces whose text is at most `max_len` bytes (at
    /// least one piece; a `max_len` below 21, the longest item, counts as
    /// 21). For GET and CHUNK_ACK_BATCH, which may be sent several times.
    pub fn split_to_fit(&self, max_len: usize) -> Vec<RangeSet> {
        let max_len = max_len.max(LONGEST_ITEM);
        let mut pieces = vec![RangeSet::new()];
        let mut len = 0;
        for &range in &self.ranges {
            let item = item_len(range);
            if len > 0 && len + 1 + item > max_len {
                pieces.push(RangeSet::new());
                len = 0;
            }
            if let Some(piece) = pieces.last_mut() {
                piece.ranges.push(range);
            }
            len += if len == 0 { item } else { 1 + item };
        }
        pieces
    }

    /// A superset whose text is at most `max_len` bytes, made by filling
    /// the narrowest gaps first and no more of them than needed (at worst one range, whatever its text).
    /// For NEED, which is sent once: asking for a chunk one already has
    /// costs bandwidth, never correctness.
    pub fn covering_within(&self, max_len: usize) -> RangeSet {
        if self.to_string().len() <= max_len {
            return self.clone();
        }
        let mut gaps: Vec<u32> = self.ranges.windows(2).map(|w| w[1].0 - w[0].1 - 1).collect();
        gaps.sort_unstable();
        gaps.dedup();
        // Filling every gap of at most `gaps[i]` shortens the text as i
        // grows: find the first i that fits.
        let fits = |i: usize| gaps.get(i).is_none_or(|&g| self.fill_gaps(g).to_string().len() <= max_len);
        let (mut lo, mut hi) = (0, gaps.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        match gaps.get(lo) {
            Some(&g) => self.fill_gaps(g),
            None => self.fill_gaps(u32::MAX),
        }
    }

    /// The set with every gap of at most `width` missing indices filled.
    fn fill_gaps(&self, width: u32) -> RangeSet {
        let mut ranges: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(first, last) in &self.ranges {
            match ranges.last_mut() {
                Some(prev) if first - prev.1 - 1 <= width => prev.1 = last,
                _ => ranges.push((first, last)),
            }
        }
        RangeSet { ranges }
    }

    /// Sort and merge overlapping or adjacent ranges (each `first <= last`).
    fn normalized(mut ranges: Vec<(u32, u32)>) -> RangeSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                Some(prev) if u64::from(first) <= u64::from(prev.1) + 1 => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        RangeSet { ranges: merged }
    }
}

/// `4294967295-4294967295`
const LONGEST_ITEM: usize = 21;

fn item_len((first, last): (u32, u32)) -> usize {
    let digits = |n: u32| n.checked_ilog10().unwrap_or(0) as usize + 1;
    if first == last {
        digits(first)
    } else {
        digits(first) + 1 + digits(last)
    }
}

impl FromIterator<u32> for RangeSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = RangeSet::new();
        for i in iter {
            s.insert(i);
        }
        s
    }
}

impl fmt::Display for RangeSet {
    /// The canonical text: `-` when empty, else ascending items.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("-");
        }
        for (i, &(first, last)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RangeSet({self})")
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid chunk ranges {0:?}: expected e.g. 0-5,7,9-12 or -")]
pub struct RangeParseError(pub String);

impl FromStr for RangeSet {
    type Err = RangeParseError;
    /// `-`, or comma-separated `a` / `a-b` items (`a <= b`) in any order,
    /// overlapping or not; at most [`RangeSet::MAX_ITEMS`] items.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-" {
            return Ok(RangeSet::new());
        }
        let err = || RangeParseError(super::excerpt(s, 80));
        let mut ranges = Vec::new();
        for item in s.split(',') {
            if ranges.len() == RangeSet::MAX_ITEMS {
                return Err(err());
            }
            let (first, last) = match item.split_once('-') {
                Some((a, b)) => (index(a).ok_or_else(err)?, index(b).ok_or_else(err)?),
                None => {
                    let a = index(item).ok_or_else(err)?;
                    (a, a)
                }
            };
            if first > last {
                return Err(err());
            }
            ranges.push((first, last));
        }
        Ok(RangeSet::normalized(ranges))
    }
}

/// A decimal u32: digits only, no sign.
fn index(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> RangeSet {
        s.parse().unwrap()
    }

    #[test]
    fn empty_is_dash() {
        assert_eq!(r("-"), RangeSet::new());
        assert_eq!(RangeSet::new().to_string(), "-");
        assert!(r("-").is_empty());
        assert_eq!(r("-").len(), 0);
    }

    #[test]
    fn parses_and_prints_canonically() {
        assert_eq!(r("0-5,7,9-12").to_string(), "0-5,7,9-12");
        assert_eq!(r("9-12,7,0-5").to_string(), "0-5,7,9-12");
        assert_eq!(r("0-5,3-8,9,11,10").to_string(), "0-11");
        assert_eq!(r("4,4,4").to_string(), "4");
        assert_eq!(r("3-3").to_string(), "3");
        assert_eq!(r("0-4294967295").len(), 1 << 32);
        assert_eq!(r("4294967295").to_string(), "4294967295");
    }

    #[test]
    fn refuses_malformed() {
        for bad in ["", ",", "1,", ",1", "1,,2", "5-3", "a", "1-", "-1", "1-2-3", "+1", " 1", "1 ", "4294967296", "1-x"] {
            assert!(bad.parse::<RangeSet>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_too_many_items() {
        let many = vec!["1"; RangeSet::MAX_ITEMS + 1].join(",");
        assert!(many.parse::<RangeSet>().is_err());
        let most = vec!["1"; RangeSet::MAX_ITEMS].join(",");
        assert_eq!(r(&most), r("1"));
    }

    #[test]
    fn insert_merges_neighbours() {
        let mut s = RangeSet::new();
        for i in [5, 3, 4, 10, 0, 11, 9, 1, 4294967295, 0] {
            s.insert(i);
        }
        assert_eq!(s.to_string(), "0-1,3-5,9-11,4294967295");
        s.insert(2);
        assert_eq!(s.to_string(), "0-5,9-11,4294967295");
        assert!(s.contains(0) && s.contains(5) && s.contains(10) && s.contains(u32::MAX));
        assert!(!s.contains(6) && !s.contains(12));
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().take(3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(RangeSet::span(2, 4), r("2-4"));
        assert_eq!(RangeSet::span(4, 2), RangeSet::new());
    }

    #[test]
    fn split_and_cover_fit_the_budget() {
        let sparse: RangeSet = (0..1000).map(|i| i * 3).collect();
        let pieces = sparse.split_to_fit(100);
        assert!(pieces.iter().all(|p| p.to_string().len() <= 100));
        assert_eq!(pieces.iter().map(RangeSet::len).sum::<u64>(), 1000);
        assert_eq!(RangeSet::new().split_to_fit(10), vec![RangeSet::new()]);

        let cover = sparse.covering_within(100);
        assert!(cover.to_string().len() <= 100);
        assert!(sparse.iter().all(|i| cover.contains(i)));
        assert_eq!(sparse.covering_within(1), r("0-2997"));
        assert_eq!(r("1,5").covering_within(100), r("1,5"));
    }

    proptest! {
        #[test]
        fn display_parse_round_trips(indices in proptest::collection::vec(0u32..200, 0..60)) {
            let set: RangeSet = indices.iter().copied().collect();
            prop_assert_eq!(r(&set.to_string()), set.clone());
            for i in 0..200 {
                prop_assert_eq!(set.contains(i), indices.contains(&i));
            }
            prop_assert_eq!(set.len(), set.iter().count() as u64);
        }

        #[test]
        fn parse_normalizes_any_order(items in proptest::collection::vec((0u32..100, 0u32..5), 1..20)) {
            let text = items.iter().map(|(a, n)| format!("{a}-{}", a + n)).collect::<Vec<_>>().join(",");
            let parsed = r(&text);
            let inserted: RangeSet = items.iter().flat_map(|&(a, n)| a..=a + n).collect();
            prop_assert_eq!(parsed, inserted);
        }

        #[test]
        fn parse_never_panics(s in "[0-9,-]{0,30}|\\PC{0,30}") {
            let _ = s.parse::<RangeSet>();
        }
    }
}
