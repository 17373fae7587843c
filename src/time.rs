//! Wall-clock time as unix nanoseconds, and RFC 3339 UTC text.
//!
//! A [`Timestamp`] is a plain `i64` of nanoseconds since 1970-01-01T00:00:00Z
//! (negative before), so it covers 1677-09-21 to 2262-04-11. Calendar
//! conversion uses Howard Hinnant's `days_from_civil` / `civil_from_days`
//! (proleptic Gregorian, exact for every day in range), so no date crate is
//! needed. Leap seconds do not exist here, as in unix time: `:60` is refused
//! by the parser. Only [`Timestamp::now`] reads the clock; everything else is
//! a pure function, so callers that take time as a parameter stay testable.

use std::time::{SystemTime, UNIX_EPOCH};

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
const NANOS_PER_DAY: i64 = NANOS_PER_SEC * SECS_PER_DAY;

/// Unix time in nanoseconds, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from_system(SystemTime::now())
    }

    /// Saturates outside the `i64` range (year 1677 to 2262).
    pub fn from_system(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp(i64::try_from(after.as_nanos()).unwrap_or(i64::MAX)),
            Err(before) => Timestamp(i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n)),
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + std::time::Duration::from_nanos(self.0 as u64)
        } else {
            UNIX_EPOCH - std::time::Duration::from_nanos(self.0.unsigned_abs())
        }
    }

    /// `2026-01-19T14:30:00.123Z` (milliseconds, always UTC, `Z`).
    /// Sub-millisecond digits are truncated toward the past, so the text
    /// never names a later instant than the timestamp.
    pub fn rfc3339(&self) -> String {
        let secs = self.0.div_euclid(NANOS_PER_SEC);
        let millis = self.0.rem_euclid(NANOS_PER_SEC) / 1_000_000;
        let (y, m, d) = civil_from_days(secs.div_euclid(SECS_PER_DAY));
        let sod = secs.rem_euclid(SECS_PER_DAY);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
    }

    /// Parse what `rfc3339` writes (and offsets like `+02:00`, any number
    /// of fraction digits). Also accepts `t`/`z` in lower case and a space
    /// instead of `T`, as RFC 3339 allows. Digits past nanoseconds are
    /// ignored. `None` for anything else, for impossible dates (Feb 30),
    /// and outside the representable range.
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        let year = digits(b, 0, 4)?;
        byte_is(b, 4, b'-')?;
        let month = digits(b, 5, 2)?;
        byte_is(b, 7, b'-')?;
        let day = digits(b, 8, 2)?;
        if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
            return None;
        }
        let hour = digits(b, 11, 2)?;
        byte_is(b, 13, b':')?;
        let minute = digits(b, 14, 2)?;
        byte_is(b, 16, b':')?;
        let second = digits(b, 17, 2)?;
        let mut i = 19;

        let mut nanos = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                if i - start < 9 {
                    nanos = nanos * 10 + i64::from(c - b'0');
                }
                i += 1;
            }
            let count = i - start;
            if count == 0 {
                return None;
            }
            for _ in count..9 {
                nanos *= 10;
            }
        }

        let offset_secs = match b.get(i)? {
            b'Z' | b'z' => {
                i += 1;
                0
            }
            sign @ (b'+' | b'-') => {
                let oh = digits(b, i + 1, 2)?;
                byte_is(b, i + 3, b':')?;
                let om = digits(b, i + 4, 2)?;
                if oh > 23 || om > 59 {
                    return None;
                }
                i += 6;
                let off = oh * 3600 + om * 60;
                if *sign == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return None,
        };
        if i != b.len() {
            return None;
        }

        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let secs = days * SECS_PER_DAY + hour * 3600 + minute * 60 + second - offset_secs;
        secs.checked_mul(NANOS_PER_SEC)?.checked_add(nanos).map(Timestamp)
    }

    /// (year, month 1-12, day 1-31), UTC.
    pub fn ymd(&self) -> (i32, u32, u32) {
        let (y, m, d) = civil_from_days(self.0.div_euclid(NANOS_PER_DAY));
        // The i64 nanosecond range spans years 1677..=2262: always fits.
        (y as i32, m as u32, d as u32)
    }

    pub fn secs_f64_since(&self, earlier: Timestamp) -> f64 {
        (self.0 - earlier.0) as f64 / 1e9
    }
}

/// `n` ASCII digits at `at`, as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let field = b.get(at..at + n)?;
    field.iter().try_fold(0i64, |acc, c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
}

fn byte_is(b: &[u8], at: usize, c: u8) -> Option<()> {
    (b.get(at) == Some(&c)).then_some(())
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Years start in March so that the leap day is the last of the year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a count of days since 1970-01-01 (Hinnant).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: i64 = 1_000_000;

    #[test]
    fn epoch() {
        assert_eq!(Timestamp(0).rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(0).ymd(), (1970, 1, 1));
        assert_eq!(Timestamp::parse_rfc3339("1970-01-01T00:00:00Z"), Some(Timestamp(0)));
    }

    #[test]
    fn known_dates() {
        // date -u -d 2000-02-29T12:00:00Z +%s
        let leap = Timestamp(951_825_600 * NANOS_PER_SEC);
        assert_eq!(leap.rfc3339(), "2000-02-29T12:00:00.000Z");
        assert_eq!(leap.ymd(), (2000, 2, 29));
        // date -u -d 2026-01-19T14:30:00Z +%s
        let t = Timestamp(1_768_833_000 * NANOS_PER_SEC + 123 * MS);
        assert_eq!(t.rfc3339(), "2026-01-19T14:30:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339("2026-01-19T14:30:00.123Z"), Some(t));
        assert_eq!(t.ymd(), (2026, 1, 19));
        // Last day of a non-leap century year and first of the next.
        let t = Timestamp::parse_rfc3339("2100-02-28T23:59:59Z").unwrap();
        assert_eq!(Timestamp(t.0 + NANOS_PER_SEC).rfc3339(), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn negative_times() {
        assert_eq!(Timestamp(-1).rfc3339(), "1969-12-31T23:59:59.999Z");
        assert_eq!(Timestamp(-1).ymd(), (1969, 12, 31));
        assert_eq!(Timestamp(-NANOS_PER_DAY).rfc3339(), "1969-12-31T00:00:00.000Z");
        // date -u -d 1900-01-01 +%s
        let t = Timestamp(-2_208_988_800 * NANOS_PER_SEC);
        assert_eq!(t.rfc3339(), "1900-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::parse_rfc3339("1900-01-01T00:00:00.000Z"), Some(t));
        assert_eq!(Timestamp::parse_rfc3339("1969-12-31T23:59:59.999999999Z"), Some(Timestamp(-1)));
    }

    #[test]
    fn offsets_and_fractions() {
        let z = Timestamp::parse_rfc3339("2026-01-19T12:30:00Z").unwrap();
        assert_eq!(Timestamp::parse_rfc3339("2026-01-19T14:30:00+02:00"), Some(z));
        assert_eq!(Timestamp::parse_rfc3339("2026-01-19T07:00:00-05:30"), Some(z));
        assert_eq!(Timestamp::parse_rfc3339("2026-01-19t12:30:00z"), Some(z));
        assert_eq!(Timestamp::parse_rfc3339("2026-01-19 12:30:00Z"), Some(z));
        let f = |s| Timestamp::parse_rfc3339(s).map(|t| t.0 - z.0);
        assert_eq!(f("2026-01-19T12:30:00.5Z"), Some(500 * MS));
        assert_eq!(f("2026-01-19T12:30:00.000000001Z"), Some(1));
        assert_eq!(f("2026-01-19T12:30:00.1234567891234Z"), Some(123_456_789));
    }

    #[test]
    fn refuses_bad_text() {
        for bad in [
            "",
            "2026-01-19",
            "2026-01-19T14:30:00",
            "2026-01-19T14:30:00.Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-01-00T00:00:00Z",
            "2026-01-19T24:00:00Z",
            "2026-01-19T23:60:00Z",
            "2026-01-19T23:59:60Z",
            "2026-01-19T14:30:00+2:00",
            "2026-01-19T14:30:00+24:00",
            "2026-01-19T14:30:00Zjunk",
            "+026-01-19T14:30:00Z",
            "2026-01-19T14:30:0xZ",
            "9999-12-31T23:59:59Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trip() {
        let mut t = -2_208_988_800_000i64 * MS;
        // Steps that are not a whole number of days or seconds, to land
        // on every month, hour and millisecond pattern.
        while t < 4_102_444_800_000 * MS {
            let ts = Timestamp(t);
            let back = Timestamp::parse_rfc3339(&ts.rfc3339()).unwrap();
            assert_eq!(back.0, t.div_euclid(MS) * MS, "{}", ts.rfc3339());
            let (y, m, d) = ts.ymd();
            assert!(ts.rfc3339().starts_with(&format!("{y:04}-{m:02}-{d:02}T")));
            t += 3_337_777_777_777_777;
        }
        for days in -200_000..200_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn from_system() {
        let t = UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(Timestamp::from_system(t), Timestamp(1500 * MS));
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(Timestamp::from_system(t), Timestamp(-1500 * MS));
        let a = Timestamp::now();
        assert!(a.ymd().0 >= 2024);
        assert!(Timestamp::now().secs_f64_since(a) >= 0.0);
    }
}
