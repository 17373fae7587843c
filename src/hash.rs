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

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
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
        let hex_part = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
        if hex_part.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| err())?;
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
        for bad in ["", "blake3:", "sha256:00", "blake3:zz", &format!("blake3:{}", "0".repeat(63))] {
            assert!(bad.parse::<Hash>().is_err(), "{bad}");
        }
    }
}
