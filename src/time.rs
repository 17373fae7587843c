//! Wall-clock time as unix nanoseconds, and RFC 3339 UTC text.
//! STUB: contract only, the identity helper implements it.

/// Unix time in nanoseconds, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        todo!()
    }

    pub fn from_system(t: std::time::SystemTime) -> Timestamp {
        let _ = t;
        todo!()
    }

    /// `2026-01-19T14:30:00.123Z` (milliseconds, always UTC, `Z`).
    pub fn rfc3339(&self) -> String {
        todo!()
    }

    /// Parse what `rfc3339` writes (and offsets like `+02:00`, any number
    /// of fraction digits).
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let _ = s;
        todo!()
    }

    /// (year, month 1-12, day 1-31), UTC.
    pub fn ymd(&self) -> (i32, u32, u32) {
        todo!()
    }

    pub fn secs_f64_since(&self, earlier: Timestamp) -> f64 {
        (self.0 - earlier.0) as f64 / 1e9
    }
}
