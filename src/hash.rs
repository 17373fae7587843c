//! Content hashes: BLAKE3, written `blake3:<64 hex digits>` on the wire, in
//! manifests, receipts and logs. A `Hash` names a chunk or a whole file.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

/// Why a `blake3:<hex>` string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid hash {0:?}: expected blake3:<64 hex digits>")]
pub struct HashParseError(pub String);

impl Hash {
    pub const PREFIX: &'static str = "blake3:";

    /// Hash a byte slice in one call.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// First 8 bytes in hex: short enough for file names and log lines.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

/// Lower-case hex digits by value.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Value of a hex digit (either case) by byte, or `INVALID`: one table
/// look-up per digit. A manifest of a 1 GiB file has 4,096 hashes to read
/// or write on every DESCRIBE, and the `hex` crate's per-digit branches
/// and allocating encoder were most of the cost of a CHUNK line.
const INVALID: u8 = 0xff;
const HEX_VALUES: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Length of `blake3:<64 hex digits>`.
const TEXT_LEN: usize = Hash::PREFIX.len() + 64;

impl Hash {
    /// The wire form, `blake3:<64 lower-case hex digits>`, without
    /// allocating.
    pub fn to_text(&self) -> [u8; TEXT_LEN] {
        let mut out = [0u8; TEXT_LEN];
        out[..Self::PREFIX.len()].copy_from_slice(Self::PREFIX.as_bytes());
        for (pair, b) in out[Self::PREFIX.len()..].chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX_DIGITS[usize::from(b >> 4)];
            pair[1] = HEX_DIGITS[usize::from(b & 0x0f)];
        }
        out
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.to_text();
        // Only ASCII was written.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HashParseError(s.chars().take(80).collect());
        let hex_part = s.strip_prefix(Self::PREFIX).ok_or_else(err)?.as_bytes();
        if hex_part.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        // Any invalid digit sets the high bits of `bad`: one test at the end.
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(hex_part.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUES[usize::from(pair[0])], HEX_VALUES[usize::from(pair[1])]);
            bad |= hi | lo;
            *o = (hi << 4) | (lo & 0x0f);
        }
        if bad & 0xf0 != 0 {
            return Err(err());
        }
        Ok(Hash(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let h = Hash::of(b"deftfs");
        let s = h.to_string();
        assert!(s.starts_with("blake3:"));
        assert_eq!(s.parse::<Hash>().unwrap(), h);
    }

    #[test]
    fn refuses_malformed() {
        let digits = "0123456789abcdef".repeat(4);
        for bad in [
            "".to_string(),
            "blake3:".into(),
            "sha256:00".into(),
            "blake3:zz".into(),
            format!("blake3:{}", "0".repeat(63)),
            format!("blake3:{}", "0".repeat(65)),
            format!("blake3:{}g", &digits[1..]),
            format!("blake3:{}:", &digits[1..]),
            format!("blake3:{}/", &digits[..63]),
            format!("blake3: {}", &digits[1..]),
            format!("blake3:{}\u{e9}", &digits[..62]),
        ] {
            assert!(bad.parse::<Hash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_upper_case_and_writes_lower_case() {
        let h = Hash::of(b"case");
        let upper = format!("blake3:{}", hex::encode_upper(h.0));
        assert_eq!(upper.parse::<Hash>(), Ok(h));
        assert_eq!(h.to_string(), format!("blake3:{}", hex::encode(h.0)));
    }

    proptest::proptest! {
        /// The table-driven hex agrees with the `hex` crate on every
        /// digest, and on every string: same values accepted, same bytes.
        #[test]
        fn prop_text_matches_the_hex_crate(bytes in proptest::array::uniform32(proptest::prelude::any::<u8>())) {
            let h = Hash(bytes);
            proptest::prop_assert_eq!(h.to_string(), format!("blake3:{}", hex::encode(bytes)));
            proptest::prop_assert_eq!(h.to_string().parse::<Hash>(), Ok(h));
        }

        #[test]
        fn prop_parse_matches_the_hex_crate(text in "[0-9a-fA-FgG:z ]{64}") {
            let mut want = [0u8; 32];
            let ok = hex::decode_to_slice(&text, &mut want).is_ok();
            let got = format!("blake3:{text}").parse::<Hash>();
            proptest::prop_assert_eq!(got.is_ok(), ok);
            if ok {
                proptest::prop_assert_eq!(got.map(|h| h.0), Ok(want));
            }
        }
    }
}
