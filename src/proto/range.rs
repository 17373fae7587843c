//! Sets of chunk indices, written `0-5,7,9-12` (`-` for the empty set).
//! STUB: contract only, the proto helper implements it.

use std::fmt;
use std::str::FromStr;

/// A set of u32 chunk indices kept as sorted, disjoint, non-adjacent
/// inclusive ranges.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RangeSet {
    ranges: Vec<(u32, u32)>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    pub fn insert(&mut self, index: u32) {
        todo!("{index}")
    }

    pub fn contains(&self, index: u32) -> bool {
        todo!("{index}")
    }

    /// Number of indices in the set.
    pub fn len(&self) -> u64 {
        todo!()
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
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
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
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
    }
}
