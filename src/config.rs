//! config.toml: the node's hand-written configuration (the DEFT seed's 10.2
//! shape), loaded with errors that name the key and line, and edited by the
//! CLI without losing the user's comments.
//!
//! Loading is two steps: `toml` deserializes into private `Raw*` structs
//! that refuse unknown keys and keep each value's byte span, then
//! validation turns them into the public types ([`Name`], [`Fingerprint`],
//! [`Access`], sizes checked) and reports the first problem as
//! `file:line: key: message`. Keys are dotted paths: `node.name`,
//! `storage.window`, `partners[N].fingerprint` (entries counted from 0),
//! `shares.<name>.access.<partner>` (shares by name, or `shares[N]` while
//! the name itself is wrong). docs/CONFIGURATION.md documents every
//! key; [`Config::initial_text`] is the commented file `deftfs init` writes.
//!
//! Invariants of a loaded [`Config`]: partner ids and share names are
//! unique, every partner has at least one way to check its certificate,
//! every share grants access only to known partners, share paths are
//! absolute, endpoints are `host:port`, and every lockable pattern is a
//! valid glob that a `DEFT LEASES` line can carry ([`check_lockable`]).
//!
//! [`ConfigEditor`] edits the TOML document itself (toml_edit), so comments
//! and layout survive; it re-validates the whole new text before replacing
//! the file atomically.

use crate::chunk::ChunkParams;
use crate::glob::Glob;
use crate::identity::Fingerprint;
use crate::proto::{Access, Name};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use toml::Spanned;

pub const DEFAULT_PORT: u16 = 7741;
const DEFAULT_WINDOW: u32 = 64;
const MAX_WINDOW: u32 = 4096;
const DEFAULT_CHUNK_TIMEOUT_SECS: u64 = 30;
const DEFAULT_MAX_RETRIES: u32 = 3;
/// The bounds of `ChunkParams::validate`, checked here so that config
/// errors can name the key and line.
const MIN_CHUNK: u32 = 64;
const MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Leases are renewed every ttl/3 (DESIGN.md 10): below 3 s a renewal
/// would be due more than once a second.
const MIN_LEASE_TTL_SECS: u64 = 3;
/// A crashed holder blocks the file for up to one ttl: an hour is plenty.
const MAX_LEASE_TTL_SECS: u64 = 3600;
/// The limits of the `LOCKABLE:` field of `DEFT LEASES` (proto/decode.rs),
/// so that a share that loads can always be described to a partner.
const MAX_LOCKABLE_PATTERNS: usize = 256;
const MAX_LOCKABLE_LEN: usize = 128;

/// The lockable patterns of a share whose table has no `lockable` key: the
/// files of creative and office applications, which cannot be merged, so
/// that two people editing one at once would lose someone's work.
pub const DEFAULT_LOCKABLE: &[&str] = &[
    "*.blend", "*.psd", "*.kra", "*.xcf", "*.ma", "*.mb", "*.max", "*.c4d", "*.hip", "*.aep", "*.prproj", "*.docx", "*.xlsx", "*.pptx",
    "*.odt", "*.ods", "*.odp",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub storage: StorageConfig,
    pub mount: MountConfig,
    pub partners: Vec<PartnerConfig>,
    pub shares: Vec<ShareConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: Name,
    /// Default 0.0.0.0:7741.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    pub chunk: ChunkParams,
    /// Chunks in flight per transfer; default 64.
    pub window: u32,
    /// Seconds without an ack before a chunk is sent again; default 30.
    pub chunk_timeout_secs: u64,
    /// Retransmissions of one chunk before the transfer aborts; default 3.
    pub max_retries: u32,
    /// How often shares that a partner watches are scanned for changes,
    /// in milliseconds; default 1000.
    pub watch_interval_ms: u64,
    /// Hours after which the partial file of a push nobody resumed is
    /// deleted from the share; default 24.
    pub partial_ttl_hours: u64,
    /// A pushed version of a large file that keeps most of its chunks in
    /// place is written into the file (under a journal) rather than into a
    /// copy renamed over it; default true.
    pub patch_in_place: bool,
    /// Smallest file patched in place, bytes; default 16 MiB.
    pub patch_min: u64,
}

/// Defaults of `deftfs mount` (`[mount]`); the command's flags override them.
#[derive(Debug, Clone, PartialEq)]
pub struct MountConfig {
    /// Chunk cache bound per mount, bytes; default 10 GiB.
    pub cache_size: u64,
    /// How long a read waits for an unreachable partner before EIO; default 10 s.
    pub offline_wait_secs: u64,
    /// The ttl a mount asks for when it takes a lease; default 30 s, 3 to 3600.
    pub lease_ttl_secs: u64,
    /// Let the kernel read whole copies of files read before, itself (FUSE
    /// passthrough, Linux 6.9+); default true.
    pub passthrough: bool,
    /// Send the chunks of a large file the kernel writes to the partner
    /// while it is written, before its push (AHEAD); default true.
    pub send_ahead: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig { cache_size: 10 << 30, offline_wait_secs: 10, lease_ttl_secs: 30, passthrough: true, send_ahead: true }
    }
}

/// A size: a number of bytes with an optional unit K, M, G or T (powers of
/// 1024; `KiB`, `KB`, `k` are accepted alike), e.g. `64M`, `10 GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let bad = || format!("{text:?} is not a size: write bytes or a number with K, M, G or T, like \"64M\" or \"10G\"");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            chunk: ChunkParams::default(),
            window: DEFAULT_WINDOW,
            chunk_timeout_secs: DEFAULT_CHUNK_TIMEOUT_SECS,
            max_retries: DEFAULT_MAX_RETRIES,
            watch_interval_ms: 1000,
            partial_ttl_hours: 24,
            patch_in_place: true,
            patch_min: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartnerConfig {
    pub id: Name,
    /// Pinned certificate fingerprints (`fingerprint = "sha256:..."`, or a list).
    pub fingerprints: Vec<Fingerprint>,
    /// Pinned certificate files (`allowed_certs = [...]`): their fingerprints
    /// are pinned too. Relative paths are relative to the node home.
    pub allowed_certs: Vec<PathBuf>,
    /// A CA whose certificates with CN or DNS SAN equal to `id` are this
    /// partner (`ca = "..."`).
    pub ca: Option<PathBuf>,
    /// `host:port` addresses to reach the partner. A `host` written without
    /// a port gets [`DEFAULT_PORT`].
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShareConfig {
    pub name: Name,
    /// A file, a directory, or a glob (`/data/orders/*.xml`). Absolute.
    pub path: PathBuf,
    /// Per-partner access (`[shares.access]` table: `partner = "read"`).
    pub access: BTreeMap<Name, Access>,
    /// Glob patterns on file names (`*.blend`): opening a matching file
    /// through a mount leases it while the opening process lives
    /// (DESIGN.md 10). [`DEFAULT_LOCKABLE`] when the key is absent; empty
    /// means nothing is lockable. Each passes [`check_lockable`].
    pub lockable: Vec<String>,
}

impl ShareConfig {
    /// Whether a file of this name is lockable: its last `/`-separated
    /// component matches one of the patterns, ASCII letters compared
    /// without case (`REPORT.DOCX` matches `*.docx`, and `*.DOCX` matches
    /// `report.docx`).
    pub fn is_lockable(&self, file_name: &str) -> bool {
        let name = file_name.rsplit('/').next().unwrap_or(file_name).to_ascii_lowercase();
        // Patterns were checked when loaded; one built in code that is not
        // a glob matches nothing.
        self.lockable.iter().filter_map(|p| Glob::new(&p.to_ascii_lowercase()).ok()).any(|g| g.matches(&name))
    }

    /// True when `lockable` is [`DEFAULT_LOCKABLE`], so the file need not
    /// say it.
    pub fn has_default_lockable(&self) -> bool {
        self.lockable.iter().map(String::as_str).eq(DEFAULT_LOCKABLE.iter().copied())
    }
}

/// [`DEFAULT_LOCKABLE`] as owned strings.
pub fn default_lockable() -> Vec<String> {
    DEFAULT_LOCKABLE.iter().map(|p| p.to_string()).collect()
}

/// Why `pattern` cannot be a lockable pattern, if it cannot: it must be a
/// valid glob on a file name (no `/`), and printable ASCII without `,`, at
/// most 128 bytes, and not `-`, since a `DEFT LEASES` line carries the
/// patterns as `LOCKABLE:<p>,<p>,...` (`LOCKABLE:-` when there are none).
pub fn check_lockable(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("pattern is empty".into());
    }
    if let Some(c) = pattern.chars().find(|&c| c == '/' || c == ',' || c.is_whitespace() || c.is_control()) {
        let what = match c {
            '/' => "a pattern matches a file name, not a path: it may not contain '/'".to_string(),
            ',' => "a pattern may not contain ','".to_string(),
            c => format!("a pattern may not contain whitespace or control characters ({c:?})"),
        };
        return Err(format!("{pattern:?}: {what}"));
    }
    if !pattern.is_ascii() {
        return Err(format!("{pattern:?}: a pattern must be ASCII (DEFT/1 carries lockable patterns as ASCII)"));
    }
    if pattern == "-" {
        return Err("\"-\" is not a pattern (DEFT/1 uses it for an empty list): write lockable = [] for none".into());
    }
    if pattern.len() > MAX_LOCKABLE_LEN {
        return Err(format!("pattern is longer than {MAX_LOCKABLE_LEN} bytes"));
    }
    Glob::new(pattern).map(|_| ()).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Syntax or type error: names the line (1-based) and key when known.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid { path: PathBuf, line: usize, key: String, message: String },
    #[error("{path}: partner {0} already exists", .id)]
    DuplicatePartner { path: PathBuf, id: String },
    #[error("{path}: share {0} already exists", .name)]
    DuplicateShare { path: PathBuf, name: String },
    #[error("{path}: share {share} grants access to {partner}, who is not a partner: add it with `deftfs partner add`")]
    UnknownPartner { path: PathBuf, share: String, partner: String },
}

// The file as written, before validation. Spans locate values for errors.

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    storage: Option<RawStorage>,
    mount: Option<RawMount>,
    #[serde(default)]
    partners: Vec<RawPartner>,
    #[serde(default)]
    shares: Vec<RawShare>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    listen: Option<Spanned<String>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    chunk_min: Option<Spanned<u32>>,
    chunk_avg: Option<Spanned<u32>>,
    chunk_max: Option<Spanned<u32>>,
    window: Option<Spanned<u32>>,
    chunk_timeout_secs: Option<Spanned<u64>>,
    max_retries: Option<Spanned<u32>>,
    watch_interval_ms: Option<Spanned<u64>>,
    partial_ttl_hours: Option<Spanned<u64>>,
    patch_in_place: Option<bool>,
    patch_min: Option<Spanned<String>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMount {
    cache_size: Option<Spanned<String>>,
    offline_wait_secs: Option<Spanned<u64>>,
    lease_ttl_secs: Option<Spanned<u64>>,
    passthrough: Option<bool>,
    send_ahead: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartner {
    id: Spanned<String>,
    fingerprint: Option<Spanned<String>>,
    #[serde(default)]
    fingerprints: Vec<Spanned<String>>,
    #[serde(default)]
    allowed_certs: Vec<Spanned<String>>,
    ca: Option<Spanned<String>>,
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    access: BTreeMap<String, Spanned<String>>,
    lockable: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Builds errors that point into one text.
struct Source<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Source<'_> {
    fn invalid(&self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            line: line_of(self.text, span.start),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A syntax or type error from the toml crate: find the key at its
    /// position in the document.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map(|s| s.start);
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            line: offset.map_or(1, |o| line_of(self.text, o)),
            key: offset.and_then(|o| key_path_at(self.text, o)).unwrap_or_else(|| "(document)".to_string()),
            message: e.message().trim().to_string(),
        }
    }

    /// A non-empty path string.
    fn path(&self, value: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        if value.get_ref().is_empty() {
            return Err(self.invalid(value.span(), key, "path is empty"));
        }
        Ok(PathBuf::from(value.get_ref()))
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parse text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let src = Source { text, origin };
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.toml_error(&e))?;

        let node = NodeConfig {
            name: Name::new(raw.node.name.get_ref().as_str()).map_err(|e| src.invalid(raw.node.name.span(), "node.name", e.to_string()))?,
            listen: match &raw.node.listen {
                None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
                Some(listen) => listen.get_ref().parse().map_err(|_| {
                    src.invalid(
                        listen.span(),
                        "node.listen",
                        format!("{:?} is not an ip:port address, like \"0.0.0.0:7741\"", listen.get_ref()),
                    )
                })?,
            },
        };
        let storage = storage(&src, raw.storage.unwrap_or_default())?;
        let mount = mount(&src, raw.mount.unwrap_or_default())?;
        let partners = partners(&src, &raw.partners)?;
        let shares = shares(&src, &raw.shares, &partners)?;
        Ok(Config { node, storage, mount, partners, shares })
    }

    /// The text of a new node's config.toml, with comments explaining
    /// each section.
    pub fn initial_text(name: &Name, listen: SocketAddr) -> String {
        format!(
            r#"# deftfs node configuration; docs/CONFIGURATION.md describes every key.
#
# `deftfs partner add` and `deftfs share add` append [[partners]] and
# [[shares]] entries at the end of this file and keep your comments; you
# may edit it by hand as well. The daemon reads it at start and on SIGHUP.
# This node's certificate is cert.pem and its private key key.pem (mode
# 0600), next to this file.
#
# Optional tuning, shown with the defaults:
#
#   [storage]
#   chunk_min = 65536          # bytes, at least 64
#   chunk_avg = 262144         # bytes, chunk_min <= chunk_avg <= chunk_max
#   chunk_max = 1048576        # bytes, at most 16 MiB
#   window = 64                # chunks in flight per transfer, 1 to 4096
#   chunk_timeout_secs = 30    # seconds without an ack before resending a chunk
#   max_retries = 3            # resends of one chunk before the transfer fails
#   watch_interval_ms = 1000   # how often watched shares are scanned for changes
#   partial_ttl_hours = 24     # a push's partial file nobody resumed is deleted after this
#   patch_in_place = true      # a large file edited in place is patched, not copied whole
#   patch_min = "16M"          # smallest file patched in place (K, M, G, T)
#
#   [mount]                    # defaults of `deftfs mount`
#   cache_size = "10G"         # chunk cache per mount (K, M, G, T)
#   offline_wait_secs = 10     # an uncached read of an unreachable partner fails after this
#   lease_ttl_secs = 30        # lease ttl a mount asks for, 3 to 3600
#   passthrough = true         # re-reads of a file read before go to a whole local copy (Linux 6.9+)
#   send_ahead = true          # a large new file's chunks go to the partner while it is written
#
# A partner is another node, bound to its certificate by a pinned
# fingerprint, certificate files, and/or a CA (whose certificate for the
# partner has CN or DNS SAN equal to its id); at least one is required:
#
#   [[partners]]
#   id = "bob"
#   fingerprint = "sha256:<64 hex digits>"  # or fingerprints = ["sha256:...", ...]
#   allowed_certs = ["partners/bob.pem"]    # relative to this node's home
#   ca = "partners/ca.pem"
#   endpoints = ["bob.example.com:7741"]    # where to reach bob
#
# A share is what this node offers: a file, a directory, or a glob such as
# /data/orders/*.xml (absolute paths), and what each partner may do with it:
# "read" (the partner may pull), "write" (the partner may push), or
# "read-write". Files matching `lockable` are leased while a process has
# them open through a mount (default: common creative and office formats,
# *.blend, *.psd, *.docx, ...; [] for none); write it before [shares.access]:
#
#   [[shares]]
#   name = "invoices"
#   path = "/data/invoices"
#   lockable = ["*.pdf", "*.xlsx"]
#   [shares.access]
#   bob = "read"

[node]
# This node's name: partners know it by this name; it is the CN of cert.pem.
name = "{name}"
# UDP address for QUIC (DEFT/1).
listen = "{listen}"
"#
        )
    }

    pub fn partner(&self, id: &str) -> Option<&PartnerConfig> {
        self.partners.iter().find(|p| p.id.as_str() == id)
    }

    pub fn share(&self, name: &str) -> Option<&ShareConfig> {
        self.shares.iter().find(|s| s.name.as_str() == name)
    }
}

fn storage(src: &Source, raw: RawStorage) -> Result<StorageConfig, ConfigError> {
    let defaults = StorageConfig::default();
    let get = |v: &Option<Spanned<u32>>, default: u32| v.as_ref().map_or(default, |s| *s.get_ref());
    let span = |v: &Option<Spanned<u32>>| v.as_ref().map(Spanned::span);
    let chunk = ChunkParams {
        min: get(&raw.chunk_min, defaults.chunk.min),
        avg: get(&raw.chunk_avg, defaults.chunk.avg),
        max: get(&raw.chunk_max, defaults.chunk.max),
    };
    // A rule between two sizes blames the first of its keys written in the
    // file (the other may be a default).
    let blame = |keys: &[(&str, Option<Range<usize>>)], message: String| {
        let (key, at) =
            keys.iter().find_map(|(key, at)| at.clone().map(|at| (*key, at))).unwrap_or((keys.first().map_or("", |k| k.0), 0..0));
        src.invalid(at, format!("storage.{key}"), message)
    };
    let (min, avg, max) = (span(&raw.chunk_min), span(&raw.chunk_avg), span(&raw.chunk_max));
    if chunk.min < MIN_CHUNK {
        return Err(blame(&[("chunk_min", min)], format!("{} is below the minimum of {MIN_CHUNK} bytes", chunk.min)));
    }
    if chunk.avg < chunk.min {
        return Err(blame(
            &[("chunk_avg", avg), ("chunk_min", min)],
            format!("chunk_avg ({}) must be at least chunk_min ({})", chunk.avg, chunk.min),
        ));
    }
    if chunk.max < chunk.avg {
        return Err(blame(
            &[("chunk_max", max), ("chunk_avg", avg)],
            format!("chunk_max ({}) must be at least chunk_avg ({})", chunk.max, chunk.avg),
        ));
    }
    if chunk.max > MAX_CHUNK {
        return Err(blame(&[("chunk_max", max)], format!("{} is above the maximum of 16 MiB ({MAX_CHUNK})", chunk.max)));
    }

    let window = get(&raw.window, defaults.window);
    if !(1..=MAX_WINDOW).contains(&window) {
        return Err(blame(&[("window", span(&raw.window))], format!("{window} is not between 1 and {MAX_WINDOW}")));
    }
    let chunk_timeout_secs = match &raw.chunk_timeout_secs {
        None => defaults.chunk_timeout_secs,
        Some(t) if *t.get_ref() == 0 => return Err(src.invalid(t.span(), "storage.chunk_timeout_secs", "must be at least 1 second")),
        Some(t) => *t.get_ref(),
    };
    let watch_interval_ms = match &raw.watch_interval_ms {
        None => defaults.watch_interval_ms,
        Some(t) if !(50..=3_600_000).contains(t.get_ref()) => {
            return Err(src.invalid(t.span(), "storage.watch_interval_ms", "must be between 50 and 3600000"))
        }
        Some(t) => *t.get_ref(),
    };
    let partial_ttl_hours = match &raw.partial_ttl_hours {
        None => defaults.partial_ttl_hours,
        Some(t) if !(1..=8760).contains(t.get_ref()) => {
            return Err(src.invalid(t.span(), "storage.partial_ttl_hours", "must be between 1 and 8760 hours"))
        }
        Some(t) => *t.get_ref(),
    };
    let max_retries = get(&raw.max_retries, defaults.max_retries);
    let patch_in_place = raw.patch_in_place.unwrap_or(defaults.patch_in_place);
    let patch_min = match &raw.patch_min {
        None => defaults.patch_min,
        Some(v) => parse_size(v.get_ref()).map_err(|m| src.invalid(v.span(), "storage.patch_min", m))?,
    };
    Ok(StorageConfig { chunk, window, chunk_timeout_secs, max_retries, watch_interval_ms, partial_ttl_hours, patch_in_place, patch_min })
}

fn mount(src: &Source, raw: RawMount) -> Result<MountConfig, ConfigError> {
    let defaults = MountConfig::default();
    let cache_size = match &raw.cache_size {
        None => defaults.cache_size,
        Some(v) => parse_size(v.get_ref()).map_err(|m| src.invalid(v.span(), "mount.cache_size", m))?,
    };
    let offline_wait_secs = match &raw.offline_wait_secs {
        None => defaults.offline_wait_secs,
        Some(t) if *t.get_ref() == 0 || *t.get_ref() > 3600 => {
            return Err(src.invalid(t.span(), "mount.offline_wait_secs", "must be between 1 and 3600 seconds"))
        }
        Some(t) => *t.get_ref(),
    };
    let lease_ttl_secs = match &raw.lease_ttl_secs {
        None => defaults.lease_ttl_secs,
        Some(t) if !(MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(t.get_ref()) => {
            return Err(src.invalid(
                t.span(),
                "mount.lease_ttl_secs",
                format!("must be between {MIN_LEASE_TTL_SECS} and {MAX_LEASE_TTL_SECS} seconds"),
            ))
        }
        Some(t) => *t.get_ref(),
    };
    let passthrough = raw.passthrough.unwrap_or(defaults.passthrough);
    let send_ahead = raw.send_ahead.unwrap_or(defaults.send_ahead);
    Ok(MountConfig { cache_size, offline_wait_secs, lease_ttl_secs, passthrough, send_ahead })
}

fn partners(src: &Source, raw: &[RawPartner]) -> Result<Vec<PartnerConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let at = format!("partners[{i}]");
        let id = Name::new(p.id.get_ref().as_str()).map_err(|e| src.invalid(p.id.span(), format!("{at}.id"), e.to_string()))?;
        if !seen.insert(id.clone()) {
            return Err(ConfigError::DuplicatePartner { path: src.origin.to_path_buf(), id: id.to_string() });
        }
        let fingerprint =
            |v: &Spanned<String>, key: String| v.get_ref().parse::<Fingerprint>().map_err(|e| src.invalid(v.span(), key, e.to_string()));
        let mut fingerprints = Vec::new();
        if let Some(f) = &p.fingerprint {
            fingerprints.push(fingerprint(f, format!("{at}.fingerprint"))?);
        }
        for (j, f) in p.fingerprints.iter().enumerate() {
            fingerprints.push(fingerprint(f, format!("{at}.fingerprints[{j}]"))?);
        }
        let allowed_certs = p
            .allowed_certs
            .iter()
            .enumerate()
            .map(|(j, c)| src.path(c, &format!("{at}.allowed_certs[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let ca = p.ca.as_ref().map(|c| src.path(c, &format!("{at}.ca"))).transpose()?;
        let endpoints = p
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, e)| normalize_endpoint(e.get_ref()).map_err(|message| src.invalid(e.span(), format!("{at}.endpoints[{j}]"), message)))
            .collect::<Result<Vec<_>, _>>()?;
        if fingerprints.is_empty() && allowed_certs.is_empty() && ca.is_none() {
            return Err(src.invalid(
                p.id.span(),
                at,
                format!("partner {id} has no certificate to check: set fingerprint, fingerprints, allowed_certs or ca"),
            ));
        }
        out.push(PartnerConfig { id, fingerprints, allowed_certs, ca, endpoints });
    }
    Ok(out)
}

fn shares(src: &Source, raw: &[RawShare], partners: &[PartnerConfig]) -> Result<Vec<ShareConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let name =
            Name::new(s.name.get_ref().as_str()).map_err(|e| src.invalid(s.name.span(), format!("shares[{i}].name"), e.to_string()))?;
        if !seen.insert(name.clone()) {
            return Err(ConfigError::DuplicateShare { path: src.origin.to_path_buf(), name: name.to_string() });
        }
        let at = format!("shares.{}", key_text(name.as_str()));
        let text = s.path.get_ref();
        if !Path::new(text).is_absolute() {
            return Err(src.invalid(s.path.span(), format!("{at}.path"), format!("{text:?} is not an absolute path")));
        }
        if Glob::is_pattern(text) {
            Glob::new(text).map_err(|e| src.invalid(s.path.span(), format!("{at}.path"), e.to_string()))?;
        }
        let mut access = BTreeMap::new();
        for (partner, grant) in &s.access {
            let key = format!("{at}.access.{}", key_text(partner));
            let partner = Name::new(partner.as_str()).map_err(|e| src.invalid(grant.span(), &key, e.to_string()))?;
            if !partners.iter().any(|p| p.id == partner) {
                return Err(ConfigError::UnknownPartner {
                    path: src.origin.to_path_buf(),
                    share: name.to_string(),
                    partner: partner.to_string(),
                });
            }
            let grant = grant.get_ref().parse::<Access>().map_err(|message| src.invalid(grant.span(), key, message))?;
            access.insert(partner, grant);
        }
        let lockable = match &s.lockable {
            None => default_lockable(),
            Some(list) => lockable(src, list, &at)?,
        };
        out.push(ShareConfig { name, path: PathBuf::from(text), access, lockable });
    }
    Ok(out)
}

/// A share's `lockable` list, each pattern checked; `at` is the share's key.
fn lockable(src: &Source, list: &Spanned<Vec<Spanned<String>>>, at: &str) -> Result<Vec<String>, ConfigError> {
    if list.get_ref().len() > MAX_LOCKABLE_PATTERNS {
        return Err(src.invalid(list.span(), format!("{at}.lockable"), format!("more than {MAX_LOCKABLE_PATTERNS} patterns")));
    }
    list.get_ref()
        .iter()
        .enumerate()
        .map(|(j, p)| {
            check_lockable(p.get_ref()).map_err(|m| src.invalid(p.span(), format!("{at}.lockable[{j}]"), m))?;
            Ok(p.get_ref().clone())
        })
        .collect()
}

/// `host:port`, `[v6]:port`; a bare host or IPv6 address gets the default
/// port.
fn normalize_endpoint(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not host:port");
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p != 0);
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
        return Err(bad());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        addr.parse::<Ipv6Addr>().map_err(|_| bad())?;
        return match after.strip_prefix(':') {
            None if after.is_empty() => Ok(format!("[{addr}]:{DEFAULT_PORT}")),
            Some(port) if port_ok(port) => Ok(s.to_string()),
            _ => Err(bad()),
        };
    }
    if let Ok(v6) = s.parse::<Ipv6Addr>() {
        return Ok(format!("[{v6}]:{DEFAULT_PORT}"));
    }
    match s.rsplit_once(':') {
        None => Ok(format!("{s}:{DEFAULT_PORT}")),
        Some((host, port)) if !host.is_empty() && !host.contains(':') && port_ok(port) => Ok(s.to_string()),
        Some(_) => Err(bad()),
    }
}

/// A key as written in a dotted path: bare when TOML allows it, else quoted.
fn key_text(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// The dotted path of the innermost key or value at byte `offset`, e.g.
/// `partners[1].fingerprint`. None when the text does not parse.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut found = None;
    visit_table(doc.as_table(), "", offset, &mut found);
    found
}

fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

fn visit_table(table: &toml_edit::Table, prefix: &str, offset: usize, found: &mut Option<String>) {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() { key_text(key) } else { format!("{prefix}.{}", key_text(key)) };
        if contains(table.key(key).and_then(|k| k.span()), offset) || contains(item.span(), offset) {
            *found = Some(path.clone());
        }
        visit_item(item, &path, offset, found);
    }
}

fn visit_item(item: &toml_edit::Item, path: &str, offset: usize, found: &mut Option<String>) {
    match item {
        toml_edit::Item::Table(table) => visit_table(table, path, offset, found),
        toml_edit::Item::ArrayOfTables(array) => {
            for (i, table) in array.iter().enumerate() {
                // Shares are named by their name, as in validation errors.
                let share =
                    (path == "shares").then(|| table.get("name").and_then(|n| n.as_str())).flatten().filter(|n| Name::new(*n).is_ok());
                let path = match share {
                    Some(name) => format!("{path}.{}", key_text(name)),
                    None => format!("{path}[{i}]"),
                };
                if contains(table.span(), offset) {
                    *found = Some(path.clone());
                }
                visit_table(table, &path, offset, found);
            }
        }
        toml_edit::Item::Value(value) => visit_value(value, path, offset, found),
        toml_edit::Item::None => {}
    }
}

fn visit_value(value: &toml_edit::Value, path: &str, offset: usize, found: &mut Option<String>) {
    match value {
        toml_edit::Value::InlineTable(table) => {
            for (key, value) in table.iter() {
                let path = format!("{path}.{}", key_text(key));
                if contains(table.key(key).and_then(|k| k.span()), offset) || contains(value.span(), offset) {
                    *found = Some(path.clone());
                }
                visit_value(value, &path, offset, found);
            }
        }
        toml_edit::Value::Array(array) => {
            for (i, value) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                if contains(value.span(), offset) {
                    *found = Some(path.clone());
                }
                visit_value(value, &path, offset, found);
            }
        }
        _ => {}
    }
}

/// `<home>/config.toml`
pub fn config_path(home: &Path) -> PathBuf {
    home.join("config.toml")
}

/// `$DEFTFS_HOME` is handled by clap; this is the fallback:
/// `$XDG_DATA_HOME/deftfs`, else `$HOME/.local/share/deftfs`, else (no
/// HOME, as for some system services) `/var/lib/deftfs`. Relative values
/// of the variables are ignored, as the XDG specification says.
pub fn default_home() -> PathBuf {
    let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(data) = absolute("XDG_DATA_HOME") {
        data.join("deftfs")
    } else if let Some(home) = absolute("HOME") {
        home.join(".local/share/deftfs")
    } else {
        PathBuf::from("/var/lib/deftfs")
    }
}

/// Edits config.toml in place, keeping comments and layout, and writes it
/// back atomically (temp file, fsync, rename) after checking the result
/// still parses.
pub struct ConfigEditor {
    path: PathBuf,
    doc: toml_edit::DocumentMut,
    /// The configuration as edited so far, for duplicate checks.
    config: Config,
}

impl ConfigEditor {
    /// Refuses a file that does not load: fix it by hand first.
    pub fn open(path: &Path) -> Result<ConfigEditor, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let config = Config::parse(&text, path)?;
        let doc = text.parse::<toml_edit::DocumentMut>().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |s| line_of(&text, s.start)),
            key: "(document)".into(),
            message: e.message().trim().to_string(),
        })?;
        Ok(ConfigEditor { path: path.to_path_buf(), doc, config })
    }

    /// Append a `[[partners]]` entry; refuses a duplicate id.
    pub fn add_partner(&mut self, partner: &PartnerConfig) -> Result<(), ConfigError> {
        if self.config.partner(partner.id.as_str()).is_some() {
            return Err(ConfigError::DuplicatePartner { path: self.path.clone(), id: partner.id.to_string() });
        }
        let key = format!("partners[{}]", self.config.partners.len());
        let mut table = toml_edit::Table::new();
        table.decor_mut().set_prefix("\n");
        table.insert("id", toml_edit::value(partner.id.as_str()));
        match partner.fingerprints.as_slice() {
            [] => {}
            [one] => {
                table.insert("fingerprint", toml_edit::value(one.to_string()));
            }
            many => {
                let list: toml_edit::Array = many.iter().map(|f| f.to_string()).collect();
                table.insert("fingerprints", toml_edit::value(list));
            }
        }
        if !partner.allowed_certs.is_empty() {
            let list = partner
                .allowed_certs
                .iter()
                .map(|p| self.path_text(p, &format!("{key}.allowed_certs")))
                .collect::<Result<toml_edit::Array, _>>()?;
            table.insert("allowed_certs", toml_edit::value(list));
        }
        if let Some(ca) = &partner.ca {
            table.insert("ca", toml_edit::value(self.path_text(ca, &format!("{key}.ca"))?));
        }
        if !partner.endpoints.is_empty() {
            let list: toml_edit::Array = partner.endpoints.iter().map(String::as_str).collect();
            table.insert("endpoints", toml_edit::value(list));
        }
        self.array_of_tables("partners")?.push(table);
        self.config.partners.push(partner.clone());
        Ok(())
    }

    /// Append a `[[shares]]` entry; refuses a duplicate name or a grant to
    /// an unknown partner.
    pub fn add_share(&mut self, share: &ShareConfig) -> Result<(), ConfigError> {
        if self.config.share(share.name.as_str()).is_some() {
            return Err(ConfigError::DuplicateShare { path: self.path.clone(), name: share.name.to_string() });
        }
        if let Some(unknown) = share.access.keys().find(|p| self.config.partner(p.as_str()).is_none()) {
            return Err(ConfigError::UnknownPartner {
                path: self.path.clone(),
                share: share.name.to_string(),
                partner: unknown.to_string(),
            });
        }
        let mut table = toml_edit::Table::new();
        table.decor_mut().set_prefix("\n");
        table.insert("name", toml_edit::value(share.name.as_str()));
        let path = self.path_text(&share.path, &format!("shares.{}.path", key_text(share.name.as_str())))?;
        table.insert("path", toml_edit::value(path));
        // Absent means the defaults, which may grow in a later version:
        // only a list the user chose is written.
        if !share.has_default_lockable() {
            let list: toml_edit::Array = share.lockable.iter().map(String::as_str).collect();
            table.insert("lockable", toml_edit::value(list));
        }
        // A real `[shares.access]` sub-table, written even when empty so
        // that the place to grant access is visible.
        let mut access = toml_edit::Table::new();
        access.set_implicit(false);
        access.decor_mut().set_prefix("");
        for (partner, grant) in &share.access {
            access.insert(partner.as_str(), toml_edit::value(grant.as_str()));
        }
        table.insert("access", toml_edit::Item::Table(access));
        self.array_of_tables("shares")?.push(table);
        self.config.shares.push(share.clone());
        Ok(())
    }

    /// Check the edited text loads, then replace the file atomically,
    /// keeping its permissions. Returns the configuration as now written.
    pub fn save(self) -> Result<Config, ConfigError> {
        let text = self.doc.to_string();
        let config = Config::parse(&text, &self.path)?;
        write_atomic(&self.path, text.as_bytes())?;
        Ok(config)
    }

    /// The `[[name]]` array of tables, created at the end if absent.
    fn array_of_tables(&mut self, name: &str) -> Result<&mut toml_edit::ArrayOfTables, ConfigError> {
        let path = self.path.clone();
        self.doc.entry(name).or_insert(toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new())).as_array_of_tables_mut().ok_or(
            ConfigError::Invalid {
                path,
                line: 1,
                key: name.to_string(),
                message: format!("is not written as [[{name}]] tables: add the entry by hand"),
            },
        )
    }

    /// TOML strings are UTF-8; a path that is not cannot be written.
    fn path_text(&self, path: &Path, key: &str) -> Result<String, ConfigError> {
        path.to_str().map(str::to_string).ok_or_else(|| ConfigError::Invalid {
            path: self.path.clone(),
            line: self.doc.to_string().lines().count() + 1,
            key: key.to_string(),
            message: format!("{} is not valid UTF-8", path.display()),
        })
    }
}

/// Replace `path` with `data`: write a temp file in the same directory with
/// the same mode, fsync it, rename it over `path`, fsync the directory. A
/// symlink is followed, so the file it points to is replaced, not the link.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ConfigError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ConfigError::Io { path: p, source }
    };
    let resolved = fs::canonicalize(path);
    let path = resolved.as_deref().unwrap_or(path);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0o644,
        Err(e) => return Err(io(path)(e)),
    };
    let file_name = path.file_name().map_or_else(|| "config.toml".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    // A temp file left by a crash of this same pid is stale.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have removed bits from the mode: set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP_A: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    const FP_B: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000ff";

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "deftfs-config-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn full_example() -> String {
        format!(
            r#"[node]
name = "alice"
listen = "0.0.0.0:7741"

[storage]
chunk_min = 4096
chunk_avg = 16384
chunk_max = 65536
window = 16
chunk_timeout_secs = 5
max_retries = 7

[[partners]]
id = "bob"
fingerprint = "{FP_A}"
endpoints = ["127.0.0.1:7741", "bob.example.com", "[::1]:7000", "::1"]

[[partners]]
id = "carol"
fingerprints = ["{FP_A}", "{FP_B}"]
allowed_certs = ["carol.pem"]
ca = "/etc/deftfs/ca.pem"

[[shares]]
name = "invoices"
path = "/data/invoices"
[shares.access]
bob = "read"
carol = "read-write"

[[shares]]
name = "orders"
path = "/data/orders/*.xml"
[shares.access]
bob = "write"
"#
        )
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("config.toml"))
    }

    /// The error's text, which must be `config.toml:<line>: <key>: ...`.
    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn full_example_parses() {
        let c = parse(&full_example()).unwrap();
        assert_eq!(c.node.name, name("alice"));
        assert_eq!(c.node.listen, "0.0.0.0:7741".parse().unwrap());
        assert_eq!(c.storage.chunk, ChunkParams { min: 4096, avg: 16384, max: 65536 });
        assert_eq!((c.storage.window, c.storage.chunk_timeout_secs, c.storage.max_retries), (16, 5, 7));

        let bob = c.partner("bob").unwrap();
        assert_eq!(bob.fingerprints, vec![FP_A.parse().unwrap()]);
        assert_eq!(bob.endpoints, vec!["127.0.0.1:7741", "bob.example.com:7741", "[::1]:7000", "[::1]:7741"]);
        assert!(bob.allowed_certs.is_empty() && bob.ca.is_none());
        let carol = c.partner("carol").unwrap();
        assert_eq!(carol.fingerprints.len(), 2);
        assert_eq!(carol.allowed_certs, vec![PathBuf::from("carol.pem")]);
        assert_eq!(carol.ca, Some(PathBuf::from("/etc/deftfs/ca.pem")));
        assert!(carol.endpoints.is_empty());

        let invoices = c.share("invoices").unwrap();
        assert_eq!(invoices.path, PathBuf::from("/data/invoices"));
        assert_eq!(invoices.access.get(&name("bob")), Some(&Access::Read));
        assert_eq!(invoices.access.get(&name("carol")), Some(&Access::ReadWrite));
        let orders = c.share("orders").unwrap();
        assert_eq!(orders.access.len(), 1);
        assert_eq!(orders.access.get(&name("bob")), Some(&Access::Write));
        assert!(c.share("nope").is_none() && c.partner("nope").is_none());
    }

    #[test]
    fn defaults() {
        let c = parse("[node]\nname = \"alice\"\n").unwrap();
        assert_eq!(c.node.listen, SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)));
        assert_eq!(c.storage, StorageConfig::default());
        assert_eq!(c.storage.chunk, ChunkParams::default());
        assert_eq!((c.storage.window, c.storage.chunk_timeout_secs, c.storage.max_retries), (64, 30, 3));
        assert!(c.partners.is_empty() && c.shares.is_empty());
    }

    #[test]
    fn bad_fingerprint_names_its_line_and_key() {
        let text = full_example().replace(&format!("fingerprint = \"{FP_A}\""), "fingerprint = \"sha256:abc\"");
        let e = error(&text);
        assert!(e.starts_with("config.toml:15: partners[0].fingerprint: invalid fingerprint"), "{e}");

        let text = "[node]\nname = \"a\"\n\n[[partners]]\nid = \"b\"\nendpoints = []\n\n\nfingerprint = \"md5:x\"\n";
        let e = error(text);
        assert!(e.starts_with("config.toml:9: partners[0].fingerprint: "), "{e}");

        let text = full_example().replace(&format!("[\"{FP_A}\", \"{FP_B}\"]"), &format!("[\"{FP_A}\", \"x\"]"));
        assert!(error(&text).starts_with("config.toml:20: partners[1].fingerprints[1]: "), "{}", error(&text));
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = full_example();
        // Replace `from` by `to` in the full example: the error must start
        // with `config.toml<expected>`.
        let check = |from: &str, to: &str, expected: &str| {
            assert!(text.contains(from), "{from}");
            let e = error(&text.replacen(from, to, 1));
            assert!(e.starts_with(&format!("config.toml{expected}")), "{to}: {e}");
        };
        check("\"alice\"", "\"al ice\"", ":2: node.name: ");
        check("\"0.0.0.0:7741\"", "\"localhost\"", ":3: node.listen: ");
        check("chunk_min = 4096", "chunk_min = 32", ":6: storage.chunk_min: ");
        check("chunk_avg = 16384", "chunk_avg = 1024", ":7: storage.chunk_avg: ");
        check("chunk_max = 65536", "chunk_max = 8192", ":8: storage.chunk_max: ");
        check("chunk_max = 65536", "chunk_max = 33554432", ":8: storage.chunk_max: ");
        check("window = 16", "window = 0", ":9: storage.window: ");
        check("window = 16", "window = 5000", ":9: storage.window: ");
        check("window = 16", "window = \"many\"", ":9: storage.window: invalid type");
        check("window = 16", "window = -1", ":9: storage.window: ");
        check("_secs = 5", "_secs = 0", ":10: storage.chunk_timeout_secs: ");
        check("\"bob\"", "\"b/ob\"", ":14: partners[0].id: ");
        check("\"127.0.0.1:7741\"", "\"127.0.0.1:0\"", ":16: partners[0].endpoints[0]: ");
        check("\"bob.example.com\"", "\"b b\"", ":16: partners[0].endpoints[1]: ");
        check("\"/etc/deftfs/ca.pem\"", "\"\"", ":22: partners[1].ca: path is empty");
        check("\"invoices\"", "\"..\"", ":25: shares[0].name: ");
        check("\"/data/invoices\"", "\"data\"", ":26: shares.invoices.path: ");
        check("\"/data/orders/*.xml\"", "\"/data/[o\"", ":33: shares.orders.path: ");
        check("\"read-write\"", "\"rw\"", ":29: shares.invoices.access.carol: unknown access");
        check("bob = \"write\"", "bob = 1", ":35: shares.orders.access.bob: invalid type");
        check("max_retries = 7", "max_retries = 7\nretries = 3", ":12: storage.retries: ");
        check("\"bob\"", "\"bob\"\nfingerprnt = 1", ":15: partners[0].fingerprnt: unknown field");
        check("\"0.0.0.0:7741\"", "\"0.0.0.0:7741\nx", ":3: (document): ");
        // Unknown keys are named in the message too.
        let e = error(&text.replacen("window = 16", "windw = 16", 1));
        assert!(e.contains(":9: storage.windw: unknown field `windw`, expected one of"), "{e}");
    }

    #[test]
    fn unknown_sections_and_missing_keys() {
        let e = error("[node]\nname = \"a\"\n\n[server]\nenabled = true\n");
        assert!(e.contains(":4:") && e.contains("unknown field `server`"), "{e}");
        let e = error("[node]\nlisten = \"0.0.0.0:1\"\n");
        assert!(e.contains("missing field `name`"), "{e}");
        let e = error("");
        assert!(e.contains("missing field `node`"), "{e}");
        let e = error("[node]\nname = \"a\"\n[[partners]]\nfingerprint = \"x\"\n");
        assert!(e.contains(":3:") && e.contains("missing field `id`"), "{e}");
    }

    #[test]
    fn partner_needs_a_certificate() {
        let e = error("[node]\nname = \"a\"\n\n[[partners]]\nid = \"bob\"\nendpoints = [\"h:1\"]\n");
        assert!(e.starts_with("config.toml:5: partners[0]: partner bob has no certificate"), "{e}");
    }

    #[test]
    fn duplicates_and_unknown_partners() {
        let text = full_example().replace("id = \"carol\"", "id = \"bob\"");
        assert!(matches!(parse(&text), Err(ConfigError::DuplicatePartner { id, .. }) if id == "bob"));
        let text = full_example().replace("name = \"orders\"", "name = \"invoices\"");
        assert!(matches!(parse(&text), Err(ConfigError::DuplicateShare { name, .. }) if name == "invoices"));
        let text = full_example().replace("carol = \"read-write\"", "dave = \"read\"");
        match parse(&text) {
            Err(ConfigError::UnknownPartner { share, partner, .. }) => {
                assert_eq!((share.as_str(), partner.as_str()), ("invoices", "dave"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(normalize_endpoint("h:1").unwrap(), "h:1");
        assert_eq!(normalize_endpoint("h").unwrap(), "h:7741");
        assert_eq!(normalize_endpoint("10.0.0.1").unwrap(), "10.0.0.1:7741");
        assert_eq!(normalize_endpoint("[fe80::1]").unwrap(), "[fe80::1]:7741");
        assert_eq!(normalize_endpoint("fe80::1").unwrap(), "[fe80::1]:7741");
        for bad in ["", ":1", "h:", "h:x", "h:70000", "h:0", "[fe80::1", "[nope]:1", "[::1]1", "a:b:c", "h/x:1"] {
            assert!(normalize_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn initial_text_parses() {
        let listen: SocketAddr = "[::]:7741".parse().unwrap();
        let text = Config::initial_text(&name("alice"), listen);
        let c = parse(&text).unwrap();
        assert_eq!(c.node.name, name("alice"));
        assert_eq!(c.node.listen, listen);
        assert!(c.partners.is_empty() && c.shares.is_empty());
        // Its commented examples are valid once uncommented.
        let example: String =
            text.lines().filter_map(|l| l.strip_prefix("#   ")).map(|l| l.replace("<64 hex digits>", &FP_A[7..]) + "\n").collect();
        let c = parse(&format!("[node]\nname = \"alice\"\n{example}")).unwrap();
        assert_eq!(c.storage, StorageConfig::default());
        assert_eq!(c.partners.len(), 1);
        assert_eq!(c.shares[0].access.get(&name("bob")), Some(&Access::Read));
        assert_eq!(c.shares[0].lockable, ["*.pdf", "*.xlsx"]);
        assert_eq!(c.mount, MountConfig::default());
    }

    #[test]
    fn editor_keeps_comments_and_round_trips() {
        let dir = temp_dir("edit");
        let path = config_path(&dir);
        let original = format!(
            "# my own notes: do not lose me\n[node]\nname = \"alice\" # inline note\n\n[[partners]]\nid = \"bob\"\nfingerprint = \"{FP_A}\"\n\n# trailing note\n"
        );
        fs::write(&path, &original).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        let carol = PartnerConfig {
            id: name("carol"),
            fingerprints: vec![FP_A.parse().unwrap(), FP_B.parse().unwrap()],
            allowed_certs: vec![PathBuf::from("carol.pem")],
            ca: Some(PathBuf::from("/etc/ca.pem")),
            endpoints: vec!["carol.example.com:7741".into()],
        };
        let share = ShareConfig {
            name: name("invoices"),
            path: PathBuf::from("/data/invoices"),
            access: [(name("bob"), Access::Read), (name("carol"), Access::Write)].into(),
            lockable: default_lockable(),
        };
        let mut editor = ConfigEditor::open(&path).unwrap();
        editor.add_partner(&carol).unwrap();
        editor.add_share(&share).unwrap();
        let saved = editor.save().unwrap();

        let text = fs::read_to_string(&path).unwrap();
        for kept in ["# my own notes: do not lose me", "# inline note", "# trailing note"] {
            assert!(text.contains(kept), "{kept} lost:\n{text}");
        }
        assert!(
            text.contains(
                "\n[[shares]]\nname = \"invoices\"\npath = \"/data/invoices\"\n[shares.access]\nbob = \"read\"\ncarol = \"write\"\n"
            ),
            "{text}"
        );
        assert!(text.find("id = \"carol\"").unwrap() > text.find("id = \"bob\"").unwrap());
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);

        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded, saved);
        assert_eq!(loaded.partner("carol"), Some(&carol));
        assert_eq!(loaded.share("invoices"), Some(&share));
        // Nothing left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        // A second edit appends after the first.
        let mut editor = ConfigEditor::open(&path).unwrap();
        let dave = PartnerConfig { id: name("dave"), ..carol.clone() };
        editor.add_partner(&dave).unwrap();
        editor.add_share(&ShareConfig { name: name("empty"), access: BTreeMap::new(), ..share.clone() }).unwrap();
        let c = editor.save().unwrap();
        let ids: Vec<&str> = c.partners.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["bob", "carol", "dave"]);
        assert!(c.share("empty").unwrap().access.is_empty());
        assert_eq!(Config::load(&path).unwrap(), c);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn editor_follows_a_symlink() {
        let dir = temp_dir("link");
        let real = dir.join("real.toml");
        fs::write(&real, "[node]\nname = \"alice\"\n").unwrap();
        let link = config_path(&dir);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut editor = ConfigEditor::open(&link).unwrap();
        let bob = PartnerConfig {
            id: name("bob"),
            fingerprints: vec![FP_A.parse().unwrap()],
            allowed_certs: vec![],
            ca: None,
            endpoints: vec![],
        };
        editor.add_partner(&bob).unwrap();
        editor.save().unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(fs::read_to_string(&real).unwrap().contains("id = \"bob\""));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn editor_refuses_duplicates_and_unknown_partners() {
        let dir = temp_dir("refuse");
        let path = config_path(&dir);
        fs::write(&path, full_example()).unwrap();
        let mut editor = ConfigEditor::open(&path).unwrap();
        let bob = PartnerConfig {
            id: name("bob"),
            fingerprints: vec![FP_B.parse().unwrap()],
            allowed_certs: vec![],
            ca: None,
            endpoints: vec![],
        };
        assert!(matches!(editor.add_partner(&bob), Err(ConfigError::DuplicatePartner { .. })));
        let share = ShareConfig { name: name("orders"), path: PathBuf::from("/x"), access: BTreeMap::new(), lockable: vec![] };
        assert!(matches!(editor.add_share(&share), Err(ConfigError::DuplicateShare { .. })));
        let share = ShareConfig {
            name: name("new"),
            path: PathBuf::from("/x"),
            access: [(name("zed"), Access::Read)].into(),
            lockable: default_lockable(),
        };
        let e = editor.add_share(&share).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownPartner { .. }));
        assert!(e.to_string().contains("deftfs partner add"), "{e}");

        // A partner without any certificate is refused when saving, and
        // the file is left as it was.
        let lonely = PartnerConfig { id: name("lonely"), fingerprints: vec![], ..bob };
        editor.add_partner(&lonely).unwrap();
        assert!(matches!(editor.save(), Err(ConfigError::Invalid { .. })));
        assert_eq!(fs::read_to_string(&path).unwrap(), full_example());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn editor_on_initial_text() {
        let dir = temp_dir("initial");
        let path = config_path(&dir);
        fs::write(&path, Config::initial_text(&name("alice"), "0.0.0.0:7741".parse().unwrap())).unwrap();
        let mut editor = ConfigEditor::open(&path).unwrap();
        editor
            .add_partner(&PartnerConfig {
                id: name("bob"),
                fingerprints: vec![FP_A.parse().unwrap()],
                allowed_certs: vec![],
                ca: None,
                endpoints: vec!["bob:7741".into()],
            })
            .unwrap();
        editor
            .add_share(&ShareConfig {
                name: name("docs"),
                path: PathBuf::from("/srv/docs"),
                access: [(name("bob"), Access::ReadWrite)].into(),
                lockable: default_lockable(),
            })
            .unwrap();
        editor.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let tail = format!(
            "listen = \"0.0.0.0:7741\"\n\n[[partners]]\nid = \"bob\"\nfingerprint = \"{FP_A}\"\nendpoints = [\"bob:7741\"]\n\n[[shares]]\nname = \"docs\"\npath = \"/srv/docs\"\n[shares.access]\nbob = \"read-write\"\n"
        );
        assert!(text.ends_with(&tail), "{text}");
        assert!(text.starts_with("# deftfs node configuration"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors() {
        let dir = temp_dir("load");
        assert!(matches!(Config::load(&dir.join("missing.toml")), Err(ConfigError::Io { .. })));
        let path = dir.join("config.toml");
        fs::write(&path, "[node]\nname = 3\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: node.name: ", path.display())), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn documented_example_loads() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let len = doc[start..].find("```").unwrap();
        let c = parse(&doc[start..start + len]).unwrap();
        assert_eq!(c.storage, StorageConfig::default());
        assert_eq!(c.partners.len(), 2);
        assert_eq!(c.partner("bob").unwrap().endpoints[1], "192.0.2.10:7741");
        let orders = c.share("orders-outbound").unwrap();
        assert_eq!(orders.access.get(&name("supplier-inc")), Some(&Access::ReadWrite));
        assert!(orders.lockable.is_empty());
        let design = c.share("design").unwrap();
        assert_eq!(design.lockable[..2], ["*.blend", "*.psd"]);
        assert!(design.is_lockable("Poster.PSD") && !design.is_lockable("notes.txt"));
        assert_eq!(c.mount.lease_ttl_secs, 30);
    }

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        for bad in ["", "lots", "12X", "-1M", "M", "1..2G"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mount_section_defaults_and_errors() {
        let base = "[node]\nname = \"alice\"\n";
        let c = parse(base).unwrap();
        assert_eq!(c.mount.cache_size, 10 << 30);
        assert_eq!(c.mount.offline_wait_secs, 10);
        let c = parse(&format!("{base}[mount]\ncache_size = \"64M\"\noffline_wait_secs = 3\n")).unwrap();
        assert_eq!((c.mount.cache_size, c.mount.offline_wait_secs), (64 << 20, 3));
        let e = parse(&format!("{base}[mount]\ncache_size = \"huge\"\n")).unwrap_err().to_string();
        assert!(e.contains("mount.cache_size") && e.contains(":4:"), "{e}");
        let e = parse(&format!("{base}[mount]\noffline_wait_secs = 0\n")).unwrap_err().to_string();
        assert!(e.contains("mount.offline_wait_secs"), "{e}");
        let e = parse(&format!("{base}[storage]\nwatch_interval_ms = 1\n")).unwrap_err().to_string();
        assert!(e.contains("storage.watch_interval_ms"), "{e}");
        let e = parse(&format!("{base}[storage]\npartial_ttl_hours = 0\n")).unwrap_err().to_string();
        assert!(e.contains("storage.partial_ttl_hours"), "{e}");
        assert_eq!(parse(&format!("{base}[storage]\npartial_ttl_hours = 2\n")).unwrap().storage.partial_ttl_hours, 2);
    }

    /// One share, `lockable` set to `list` (a TOML array), or absent if None.
    fn with_lockable(list: Option<&str>) -> String {
        let lockable = list.map_or(String::new(), |l| format!("lockable = {l}\n"));
        format!("[node]\nname = \"alice\"\n\n[[shares]]\nname = \"art\"\npath = \"/srv/art\"\n{lockable}")
    }

    #[test]
    fn lockable_defaults_when_absent() {
        let c = parse(&with_lockable(None)).unwrap();
        let art = c.share("art").unwrap();
        assert_eq!(art.lockable, DEFAULT_LOCKABLE);
        assert!(art.has_default_lockable());
        for lockable in ["scene.blend", "cover.psd", "report.docx", "budget.ods", "shot.hip", "edit.prproj"] {
            assert!(art.is_lockable(lockable), "{lockable}");
        }
        for not in ["notes.txt", "scene.blend1", "scene.blend@", "blend", "docx", ".psd.bak", "report.docx.tmp"] {
            assert!(!art.is_lockable(not), "{not}");
        }
    }

    #[test]
    fn lockable_explicit_and_empty() {
        let c = parse(&with_lockable(Some(r#"["*.blend", "master-??.psd", "[A-Z]*.kra"]"#))).unwrap();
        let art = c.share("art").unwrap();
        assert_eq!(art.lockable, ["*.blend", "master-??.psd", "[A-Z]*.kra"]);
        assert!(!art.has_default_lockable());
        assert!(art.is_lockable("a.blend") && art.is_lockable("master-01.psd") && art.is_lockable("Sketch.kra"));
        assert!(!art.is_lockable("cover.psd") && !art.is_lockable("report.docx"));
        // The pattern matches the last component of a path.
        assert!(art.is_lockable("shots/010/a.blend") && !art.is_lockable("a.blend/notes.txt"));

        let c = parse(&with_lockable(Some("[]"))).unwrap();
        let art = c.share("art").unwrap();
        assert!(art.lockable.is_empty() && !art.has_default_lockable());
        assert!(!art.is_lockable("scene.blend") && !art.is_lockable("report.docx"));
    }

    #[test]
    fn lockable_matches_ignoring_ascii_case() {
        let c = parse(&with_lockable(Some(r#"["*.DocX", "Scene.blend"]"#))).unwrap();
        let art = c.share("art").unwrap();
        for name in ["REPORT.DOCX", "report.docx", "Report.dOcX", "scene.blend", "SCENE.BLEND"] {
            assert!(art.is_lockable(name), "{name}");
        }
        assert!(!art.is_lockable("report.doc") && !art.is_lockable("scene2.blend"));
        let art = parse(&with_lockable(None)).unwrap().shares.remove(0);
        assert!(art.is_lockable("REPORT.DOCX") && art.is_lockable("Cover.Psd"));
    }

    #[test]
    fn invalid_lockable_names_key_and_line() {
        // The list starts on line 7; each bad pattern is the second entry.
        for (bad, why) in [
            ("[x", "unclosed '['"),
            ("cuts/*.blend", "not a path"),
            ("*.blend,*.psd", "','"),
            ("my scene.blend", "whitespace"),
            ("a\\tb", "whitespace"),
            ("a\\u0007b", "control"),
            ("", "empty"),
            ("-", "lockable = []"),
            ("*.blénd", "ASCII"),
        ] {
            let e = error(&with_lockable(Some(&format!("[\"*.psd\",\n  \"{bad}\"]"))));
            assert!(e.starts_with("config.toml:8: shares.art.lockable[1]: "), "{bad:?}: {e}");
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = format!("[\"*.{}\"]", "x".repeat(MAX_LOCKABLE_LEN));
        let e = error(&with_lockable(Some(&long)));
        assert!(e.starts_with("config.toml:7: shares.art.lockable[0]: pattern is longer"), "{e}");
        let many = format!("[{}]", vec!["\"*.x\""; MAX_LOCKABLE_PATTERNS + 1].join(", "));
        let e = error(&with_lockable(Some(&many)));
        assert!(e.starts_with("config.toml:7: shares.art.lockable: more than 256 patterns"), "{e}");
        let e = error(&with_lockable(Some("\"*.blend\"")));
        assert!(e.starts_with("config.toml:7: shares.art.lockable: invalid type"), "{e}");
        let e = error(&with_lockable(Some("[\"*.blend\", 3]")));
        assert!(e.starts_with("config.toml:7: shares.art.lockable[1]: invalid type"), "{e}");
        assert!(check_lockable("*.blend").is_ok() && check_lockable("[!.]*.psd").is_ok());
    }

    #[test]
    fn lockable_round_trips_through_the_editor() {
        let dir = temp_dir("lockable");
        let path = config_path(&dir);
        fs::write(&path, "[node]\nname = \"alice\"\n").unwrap();
        let share = |n: &str, lockable: Vec<String>| ShareConfig {
            name: name(n),
            path: PathBuf::from(format!("/srv/{n}")),
            access: BTreeMap::new(),
            lockable,
        };
        let shares = [
            share("defaults", default_lockable()),
            share("chosen", vec!["*.blend".into(), "Cut-[0-9]?.PRPROJ".into()]),
            share("none", vec![]),
            share("more", [default_lockable(), vec!["*.kdenlive".into()]].concat()),
        ];
        let mut editor = ConfigEditor::open(&path).unwrap();
        for s in &shares {
            editor.add_share(s).unwrap();
        }
        let saved = editor.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        // Only a list that differs from the defaults is written, before
        // the access table.
        assert_eq!(text.matches("lockable = ").count(), 3, "{text}");
        assert!(text.contains("name = \"defaults\"\npath = \"/srv/defaults\"\n[shares.access]\n"), "{text}");
        assert!(text.contains("path = \"/srv/chosen\"\nlockable = [\"*.blend\", \"Cut-[0-9]?.PRPROJ\"]\n[shares.access]\n"), "{text}");
        assert!(text.contains("path = \"/srv/none\"\nlockable = []\n"), "{text}");
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded, saved);
        assert_eq!(loaded.shares, shares);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lease_ttl_default_and_bounds() {
        let base = "[node]\nname = \"alice\"\n";
        assert_eq!(parse(base).unwrap().mount.lease_ttl_secs, 30);
        assert_eq!(MountConfig::default().lease_ttl_secs, 30);
        for ok in [3, 30, 3600] {
            let c = parse(&format!("{base}[mount]\nlease_ttl_secs = {ok}\n")).unwrap();
            assert_eq!(c.mount.lease_ttl_secs, ok);
        }
        for bad in ["0", "2", "3601", "86400"] {
            let e = error(&format!("{base}[mount]\ncache_size = \"1G\"\nlease_ttl_secs = {bad}\n"));
            assert!(e.starts_with("config.toml:5: mount.lease_ttl_secs: must be between 3 and 3600 seconds"), "{bad}: {e}");
        }
        let e = error(&format!("{base}[mount]\nlease_ttl_secs = -1\n"));
        assert!(e.starts_with("config.toml:4: mount.lease_ttl_secs: "), "{e}");
        let e = error(&format!("{base}[mount]\nlease_ttl_secs = \"30s\"\n"));
        assert!(e.starts_with("config.toml:4: mount.lease_ttl_secs: invalid type"), "{e}");
    }

    #[test]
    fn default_home_is_absolute() {
        let home = default_home();
        assert!(home.is_absolute());
        assert!(home.ends_with("deftfs"));
    }
}
