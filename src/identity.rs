//! A node's identity: an Ed25519 key pair and a self-signed X.509
//! certificate for it; fingerprints; signing and verification.
//!
//! The certificate (rcgen) has CN and DNS SAN equal to the node name and is
//! valid for ten years from one hour before its creation (the hour absorbs
//! clock skew between partners). A certificate is named by its fingerprint,
//! `sha256:<hex>` of its DER; partners pin that.
//!
//! The private key is kept in `<home>/key.pem`, a PKCS#8 PEM file created
//! exclusively with mode 0600, next to `cert.pem` (0644). The OS keyring is
//! deliberately not used in this version: headless servers, the main B2B
//! deployment, have no secret service, and the keyring crate's Linux
//! backends need a D-Bus session; a file with owner-only permissions works
//! the same everywhere and is what ssh and TLS servers do. [`KeyLocation`]
//! leaves room for a keyring later.
//!
//! Loading checks that the certificate's public key is the private key's,
//! so a node never presents a certificate it cannot prove it owns.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE
/// { SEQUENCE { OID 1.3.101.112 }, BIT STRING (33 bytes, 0 unused bits) },
/// followed by the 32 key bytes. Its length is fixed, so a byte search
/// finds it without a full X.509 parser.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Ten years of 365.25 days.
const VALIDITY: Duration = Duration::from_secs(3_652 * 86_400 + 43_200);
/// Certificates start being valid this long before they are made.
const BACKDATE: Duration = Duration::from_secs(3600);

/// PKCS#8 of an Ed25519 key up to its 32-byte seed: v2 as ring writes it
/// (version 1, followed after the seed by the public key), and v1 (RFC
/// 8410, version 0, seed only).
const PKCS8_V2_PREFIX: [u8; 16] = [0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
const PKCS8_V1_PREFIX: [u8; 16] = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

const CERT_LABEL: &str = "CERTIFICATE";
const KEY_LABEL: &str = "PRIVATE KEY";

/// `sha256:<hex>` of a certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_cert(der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
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
    /// byte pairs allowed (as openssl prints them). The `sha256:` prefix is
    /// required (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadFingerprint(s.to_string());
        let hex_part = s.get(..7).filter(|prefix| prefix.eq_ignore_ascii_case("sha256:")).and_then(|_| s.get(7..)).ok_or_else(bad)?;
        let digits: String = if hex_part.contains(':') {
            // Colons only between pairs: every piece is exactly two digits.
            let pieces: Vec<&str> = hex_part.split(':').collect();
            if pieces.len() != 32 || pieces.iter().any(|p| p.len() != 2) {
                return Err(bad());
            }
            pieces.concat()
        } else {
            hex_part.to_string()
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| bad())?;
        Ok(Fingerprint(out))
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

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// Where the private key was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// A 0600 PEM file.
    File(PathBuf),
}

/// The node's key pair and certificate.
pub struct Identity {
    cert_der: Vec<u8>,
    /// PKCS#8 DER, as read or generated (v1 or v2).
    key_der: Vec<u8>,
    key_pair: Ed25519KeyPair,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    /// Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

/// Why a key and certificate pair was refused, before a path is attached.
enum PairError {
    BadKey,
    Mismatch,
}

impl Identity {
    /// New Ed25519 key and self-signed certificate with CN and DNS SAN =
    /// `name`, valid for 10 years.
    pub fn generate(name: &str) -> Result<Identity, IdentityError> {
        let gen_err = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        // Always a DNS name, even when the name looks like an IP address:
        // partners match it against the partner id.
        let dns = rcgen::Ia5String::try_from(name).map_err(gen_err)?;
        params.subject_alt_names = vec![rcgen::SanType::DnsName(dns)];
        let now = SystemTime::now();
        params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
        params.not_after =
            now.checked_add(VALIDITY).ok_or_else(|| IdentityError::Generate("the clock is too far in the future".into()))?.into();
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let key_der = pkcs8_v1(&key.serialize_der());
        Identity::from_der(cert.der().to_vec(), key_der).map_err(|e| match e {
            PairError::BadKey => IdentityError::Generate("rcgen made an unusable key".into()),
            PairError::Mismatch => IdentityError::KeyMismatch,
        })
    }

    fn from_der(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<Identity, PairError> {
        // ring's strict parser wants PKCS#8 v2 (with the public key, as
        // ring and rcgen write); openssl writes v1, which only the
        // unchecked parser reads. The comparison with the certificate's
        // key below makes up for the missing consistency check.
        let key_pair = Ed25519KeyPair::from_pkcs8(&key_der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key_der))
            .map_err(|_| PairError::BadKey)?;
        let cert_key = ed25519_public_key(&cert_der).ok_or(PairError::Mismatch)?;
        if key_pair.public_key().as_ref() != cert_key.as_slice() {
            return Err(PairError::Mismatch);
        }
        let fingerprint = Fingerprint::of_cert(&cert_der);
        Ok(Identity { cert_der, key_der, key_pair, fingerprint })
    }

    /// Write `cert.pem` and `key.pem` (0600, created exclusively) into
    /// `home`, creating `home` (0700) if needed. Refuses if either exists.
    pub fn save(&self, home: &Path) -> Result<KeyLocation, IdentityError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(home).map_err(io_error(home))?;
        let cert_path = Identity::cert_path(home);
        let key_path = Identity::key_path(home);
        if cert_path.symlink_metadata().is_ok() || key_path.symlink_metadata().is_ok() {
            return Err(IdentityError::Exists(home.to_path_buf()));
        }
        let key_pem = pem_encode(KEY_LABEL, &self.key_der);
        write_new(&key_path, key_pem.as_bytes(), 0o600).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::Exists(home.to_path_buf()),
            _ => IdentityError::Io { path: key_path.clone(), source: e },
        })?;
        if let Err(e) = write_new(&cert_path, cert_pem(&self.cert_der).as_bytes(), 0o644) {
            // Leave no key without its certificate: the next attempt
            // would refuse to overwrite it.
            let _ = fs::remove_file(&key_path);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => IdentityError::Exists(home.to_path_buf()),
                _ => IdentityError::Io { path: cert_path, source: e },
            });
        }
        File::open(home).and_then(|d| d.sync_all()).map_err(io_error(home))?;
        Ok(KeyLocation::File(key_path))
    }

    /// Load `cert.pem` and `key.pem` from `home`, checking they match.
    pub fn load(home: &Path) -> Result<Identity, IdentityError> {
        let cert_path = Identity::cert_path(home);
        let key_path = Identity::key_path(home);
        let cert_der = load_cert_file(&cert_path)?;
        let key_text = fs::read(&key_path).map_err(io_error(&key_path))?;
        let key_der = std::str::from_utf8(&key_text)
            .ok()
            .and_then(|text| pem_decode(text, KEY_LABEL))
            .ok_or_else(|| IdentityError::BadKey { path: key_path.clone() })?;
        Identity::from_der(cert_der, key_der).map_err(|e| match e {
            PairError::BadKey => IdentityError::BadKey { path: key_path },
            PairError::Mismatch => IdentityError::KeyMismatch,
        })
    }

    pub fn cert_path(home: &Path) -> PathBuf {
        home.join("cert.pem")
    }

    pub fn key_path(home: &Path) -> PathBuf {
        home.join("key.pem")
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// PKCS#8 DER of the private key (for rustls).
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key_pair.public_key().as_ref());
        out
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.key_pair.sign(msg).as_ref());
        out
    }
}

/// ring (under rcgen) writes PKCS#8 v2 (RFC 8410 with the public key),
/// which OpenSSL 3.0 refuses ("unsupported"). Store the v1 form instead,
/// as `openssl genpkey` writes it, so the key stays usable by standard
/// tools; the public key is derived again from the seed on load. Anything
/// else is kept as it is.
fn pkcs8_v1(der: &[u8]) -> Vec<u8> {
    match (der.get(..PKCS8_V2_PREFIX.len()), der.get(PKCS8_V2_PREFIX.len()..PKCS8_V2_PREFIX.len() + 32)) {
        (Some(prefix), Some(seed)) if prefix == PKCS8_V2_PREFIX => {
            let mut v1 = PKCS8_V1_PREFIX.to_vec();
            v1.extend_from_slice(seed);
            v1
        }
        _ => der.to_vec(),
    }
}

/// Create `path` exclusively with `mode`, write `data`, fsync.
fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// The Ed25519 public key inside a certificate, if it holds one (and only
/// one Ed25519 key-info: an ambiguous certificate gives None).
pub fn ed25519_public_key(cert_der: &[u8]) -> Option<[u8; 32]> {
    let n = ED25519_SPKI_PREFIX.len();
    let mut found = None;
    for (i, window) in cert_der.windows(n).enumerate() {
        if window == ED25519_SPKI_PREFIX {
            if found.is_some() {
                return None;
            }
            found = Some(i + n);
        }
    }
    let start = found?;
    cert_der.get(start..start + 32)?.try_into().ok()
}

/// Check an Ed25519 signature.
pub fn verify(public_key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key).verify(msg, sig).is_ok()
}

/// Read a certificate file, PEM or DER, returning the DER of the first
/// certificate.
pub fn load_cert_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    if is_der_sequence(&bytes) {
        return Ok(bytes);
    }
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| pem_decode(text, CERT_LABEL))
        .filter(|der| is_der_sequence(der))
        .ok_or_else(|| IdentityError::BadCert { path: path.to_path_buf() })
}

/// PEM text of a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_encode(CERT_LABEL, der)
}

/// True when `bytes` is exactly one DER SEQUENCE (tag 0x30, definite
/// length covering the rest): enough to tell DER from PEM text and to
/// refuse truncated files.
fn is_der_sequence(bytes: &[u8]) -> bool {
    let (Some(&0x30), Some(&first)) = (bytes.first(), bytes.get(1)) else {
        return false;
    };
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return false;
        }
        let Some(len_bytes) = bytes.get(2..2 + n) else {
            return false;
        };
        (len_bytes.iter().fold(0usize, |acc, b| acc << 8 | *b as usize), 2 + n)
    };
    header + len == bytes.len()
}

/// `-----BEGIN label-----`, base64 in lines of 64, `-----END label-----`.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The bytes of the first PEM block labelled `label`; None if there is
/// none, it is unterminated, or its base64 is invalid. Text outside the
/// block (openssl's "Bag Attributes", comments) is ignored.
fn pem_decode(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != begin {
            continue;
        }
        let mut b64 = String::new();
        for line in lines.by_ref() {
            if line == end {
                return base64::engine::general_purpose::STANDARD.decode(b64).ok();
            }
            b64.push_str(line);
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn temp_home(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "deftfs-identity-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn fingerprint_text() {
        let fp = Fingerprint::of_cert(b"abc");
        // sha256("abc")
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(fp.to_string(), format!("sha256:{hex}"));
        assert_eq!(format!("{fp:?}"), format!("sha256:{hex}"));
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("SHA256:{}", hex.to_uppercase()).parse::<Fingerprint>().unwrap(), fp);
        let colons: Vec<String> = hex.as_bytes().chunks(2).map(|c| c.escape_ascii().to_string()).collect();
        let openssl = format!("sha256:{}", colons.join(":").to_uppercase());
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), fp);
        for bad in [
            "",
            hex,
            "sha256:",
            &format!("sha1:{hex}"),
            &format!("sha256:{}", &hex[1..]),
            &format!("sha256:{hex}00"),
            &format!("sha256:{}g", &hex[1..]),
            &format!("sha256::{hex}"),
            &format!("sha256:{}", colons.join("::")),
            &format!("sha256:{}", colons[..31].join(":")),
            &format!("sha256:{}é", &hex[2..]),
        ] {
            let err = bad.parse::<Fingerprint>().unwrap_err();
            assert!(matches!(err, IdentityError::BadFingerprint(ref s) if s == bad), "{bad}");
        }
    }

    #[test]
    fn generate_sign_verify() {
        let id = Identity::generate("alice").unwrap();
        assert_eq!(id.fingerprint(), Fingerprint::of_cert(id.cert_der()));
        assert_eq!(ed25519_public_key(id.cert_der()), Some(id.public_key()));
        let sig = id.sign(b"hello");
        assert!(verify(&id.public_key(), b"hello", &sig));
        assert!(!verify(&id.public_key(), b"hellO", &sig));
        let other = Identity::generate("alice").unwrap();
        assert_ne!(other.fingerprint(), id.fingerprint());
        assert!(!verify(&other.public_key(), b"hello", &sig));
        // The name is in the certificate (CN and SAN), as plain ASCII.
        let hits = id.cert_der().windows(5).filter(|w| w == b"alice").count();
        assert!(hits >= 2, "{hits}");
        assert!(format!("{id:?}").contains(&id.fingerprint().to_string()));
    }

    #[test]
    fn save_and_load() {
        let home = temp_home("save");
        let id = Identity::generate("bob").unwrap();
        let location = id.save(&home).unwrap();
        assert_eq!(location, KeyLocation::File(home.join("key.pem")));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home.join("key.pem")), 0o600);
        assert_eq!(mode(&home.join("cert.pem")) & 0o077 & !0o044, 0);

        let loaded = Identity::load(&home).unwrap();
        assert_eq!(loaded.fingerprint(), id.fingerprint());
        assert_eq!(loaded.public_key(), id.public_key());
        assert_eq!(loaded.key_der(), id.key_der());
        assert!(verify(&id.public_key(), b"m", &loaded.sign(b"m")));

        // Never overwritten.
        let again = Identity::generate("bob").unwrap();
        assert!(matches!(again.save(&home), Err(IdentityError::Exists(_))));
        assert_eq!(Identity::load(&home).unwrap().fingerprint(), id.fingerprint());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn load_refuses_a_foreign_key() {
        let home = temp_home("mismatch");
        Identity::generate("carol").unwrap().save(&home).unwrap();
        let other_home = temp_home("mismatch-other");
        Identity::generate("carol").unwrap().save(&other_home).unwrap();
        fs::copy(other_home.join("key.pem"), home.join("key.pem")).unwrap();
        assert!(matches!(Identity::load(&home), Err(IdentityError::KeyMismatch)));

        fs::write(home.join("key.pem"), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(matches!(Identity::load(&home), Err(IdentityError::BadKey { .. })));
        fs::write(home.join("key.pem"), "no pem here").unwrap();
        assert!(matches!(Identity::load(&home), Err(IdentityError::BadKey { .. })));
        fs::write(home.join("cert.pem"), "garbage").unwrap();
        assert!(matches!(Identity::load(&home), Err(IdentityError::BadCert { .. })));
        fs::remove_file(home.join("cert.pem")).unwrap();
        assert!(matches!(Identity::load(&home), Err(IdentityError::Io { .. })));
        fs::remove_dir_all(&home).unwrap();
        fs::remove_dir_all(&other_home).unwrap();
    }

    #[test]
    fn pkcs8_v1_and_v2_keys_load() {
        // ring and rcgen make PKCS#8 v2, which only ring's strict parser
        // takes and OpenSSL refuses; v1 (what openssl genpkey writes, and
        // what `generate` stores) needs the unchecked parser.
        let rng = ring::rand::SystemRandom::new();
        let v2 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref().to_vec();
        assert_eq!(v2[..16], PKCS8_V2_PREFIX);
        let v1 = pkcs8_v1(&v2);
        assert_eq!(v1.len(), 48);
        assert!(Ed25519KeyPair::from_pkcs8(&v1).is_err());
        assert_eq!(pkcs8_v1(&v1), v1);

        let id = Identity::generate("dave").unwrap();
        assert_eq!(id.key_der()[..16], PKCS8_V1_PREFIX);
        let home = temp_home("v1");
        id.save(&home).unwrap();
        let loaded = Identity::load(&home).unwrap();
        assert_eq!(loaded.public_key(), id.public_key());

        // A v2 key of the same certificate loads too.
        let pair = Ed25519KeyPair::from_pkcs8(&v2).unwrap();
        let mut cert_for_v2 = id.cert_der().to_vec();
        let at = cert_for_v2.windows(32).position(|w| w == id.public_key()).unwrap();
        cert_for_v2[at..at + 32].copy_from_slice(pair.public_key().as_ref());
        fs::write(home.join("cert.pem"), cert_pem(&cert_for_v2)).unwrap();
        fs::write(home.join("key.pem"), pem_encode(KEY_LABEL, &v2)).unwrap();
        let loaded = Identity::load(&home).unwrap();
        assert_eq!(loaded.public_key().as_slice(), pair.public_key().as_ref());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn cert_files_pem_and_der() {
        let home = temp_home("certs");
        fs::create_dir_all(&home).unwrap();
        let id = Identity::generate("erin").unwrap();
        let pem_path = home.join("erin.pem");
        let der_path = home.join("erin.der");
        // Text around the block, as openssl leaves it, is ignored.
        fs::write(&pem_path, format!("Bag Attributes\n{}", cert_pem(id.cert_der()))).unwrap();
        fs::write(&der_path, id.cert_der()).unwrap();
        assert_eq!(load_cert_file(&pem_path).unwrap(), id.cert_der());
        assert_eq!(load_cert_file(&der_path).unwrap(), id.cert_der());
        let truncated = home.join("short.der");
        fs::write(&truncated, &id.cert_der()[..100]).unwrap();
        assert!(matches!(load_cert_file(&truncated), Err(IdentityError::BadCert { .. })));
        assert!(matches!(load_cert_file(&home.join("missing.pem")), Err(IdentityError::Io { .. })));
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn public_key_search() {
        let id = Identity::generate("frank").unwrap();
        assert_eq!(ed25519_public_key(id.cert_der()), Some(id.public_key()));
        assert_eq!(ed25519_public_key(b""), None);
        assert_eq!(ed25519_public_key(&ED25519_SPKI_PREFIX), None);
        let mut twice = id.cert_der().to_vec();
        twice.extend_from_slice(&ED25519_SPKI_PREFIX);
        twice.extend_from_slice(&[7; 32]);
        assert_eq!(ed25519_public_key(&twice), None);
    }

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..=255).collect();
        let pem = pem_encode(CERT_LABEL, &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(pem_decode(&pem, CERT_LABEL), Some(der));
        assert_eq!(pem_decode(&pem, KEY_LABEL), None);
        assert_eq!(pem_decode("-----BEGIN CERTIFICATE-----\nAAAA\n", CERT_LABEL), None);
    }
}
