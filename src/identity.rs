//! A node's identity: an Ed25519 key pair and a self-signed X.509
//! certificate for it; fingerprints; signing and verification.
//! STUB: contract only, the identity helper implements it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// `sha256:<hex>` of a certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_cert(der: &[u8]) -> Fingerprint {
        let _ = der;
        todo!()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    /// Accepts `sha256:<64 hex>`, case-insensitive hex, colons between
    /// byte pairs allowed (as openssl prints them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid fingerprint {0:?}: expected sha256:<64 hex digits>")]
    BadFingerprint(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a PEM or DER certificate")]
    BadCert { path: PathBuf },
    #[error("{path}: not an Ed25519 PKCS#8 private key")]
    BadKey { path: PathBuf },
    #[error("certificate and private key do not match")]
    KeyMismatch,
    #[error("generating the certificate: {0}")]
    Generate(String),
    #[error("a node already exists in {0}: refusing to overwrite it")]
    Exists(PathBuf),
}

/// Where the private key was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// A 0600 PEM file.
    File(PathBuf),
}

/// The node's key pair and certificate.
pub struct Identity {
    // cert DER, key PKCS#8 DER, ring Ed25519KeyPair
}

impl Identity {
    /// New Ed25519 key and self-signed certificate with CN and DNS SAN =
    /// `name`, valid for 10 years.
    pub fn generate(name: &str) -> Result<Identity, IdentityError> {
        let _ = name;
        todo!()
    }

    /// Write `cert.pem` and `key.pem` (0600, created exclusively) into
    /// `home`. Refuses if either exists.
    pub fn save(&self, home: &Path) -> Result<KeyLocation, IdentityError> {
        let _ = home;
        todo!()
    }

    /// Load `cert.pem` and `key.pem` from `home`, checking they match.
    pub fn load(home: &Path) -> Result<Identity, IdentityError> {
        let _ = home;
        todo!()
    }

    pub fn cert_path(home: &Path) -> PathBuf {
        home.join("cert.pem")
    }

    pub fn cert_der(&self) -> &[u8] {
        todo!()
    }

    /// PKCS#8 DER of the private key (for rustls).
    pub fn key_der(&self) -> &[u8] {
        todo!()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        todo!()
    }

    pub fn public_key(&self) -> [u8; 32] {
        todo!()
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let _ = msg;
        todo!()
    }
}

/// The Ed25519 public key inside a certificate, if it holds one.
pub fn ed25519_public_key(cert_der: &[u8]) -> Option<[u8; 32]> {
    let _ = cert_der;
    todo!()
}

/// Check an Ed25519 signature.
pub fn verify(public_key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let _ = (public_key, msg, sig);
    todo!()
}

/// Read a certificate file, PEM or DER, returning the DER of the first
/// certificate.
pub fn load_cert_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let _ = path;
    todo!()
}

/// PEM text of a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    let _ = der;
    todo!()
}
