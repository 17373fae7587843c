//! config.toml: the node's hand-written configuration (the DEFT seed's 10.2
//! shape), loaded with errors that name the key and line, and edited by the
//! CLI without losing the user's comments.
//! STUB: contract only, the identity helper implements it.

use crate::chunk::ChunkParams;
use crate::identity::Fingerprint;
use crate::proto::{Access, Name};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 7741;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub storage: StorageConfig,
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
    /// `host:port` addresses to reach the partner.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShareConfig {
    pub name: Name,
    /// A file, a directory, or a glob (`/data/orders/*.xml`).
    pub path: PathBuf,
    /// Per-partner access (`[shares.access]` table: `partner = "read"`).
    pub access: BTreeMap<Name, Access>,
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

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let _ = path;
        todo!()
    }

    /// Parse text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let _ = (text, origin);
        todo!()
    }

    /// The text of a new node's config.toml, with comments explaining
    /// each section.
    pub fn initial_text(name: &Name, listen: SocketAddr) -> String {
        let _ = (name, listen);
        todo!()
    }

    pub fn partner(&self, id: &str) -> Option<&PartnerConfig> {
        self.partners.iter().find(|p| p.id.as_str() == id)
    }

    pub fn share(&self, name: &str) -> Option<&ShareConfig> {
        self.shares.iter().find(|s| s.name.as_str() == name)
    }
}

/// `<home>/config.toml`
pub fn config_path(home: &Path) -> PathBuf {
    home.join("config.toml")
}

/// `$DEFTFS_HOME` is handled by clap; this is the fallback:
/// `$XDG_DATA_HOME/deftfs`, else `$HOME/.local/share/deftfs`.
pub fn default_home() -> PathBuf {
    todo!()
}

/// Edits config.toml in place, keeping comments and layout, and writes it
/// back atomically (temp file, fsync, rename) after checking the result
/// still parses.
pub struct ConfigEditor {
    // toml_edit::DocumentMut + path
}

impl ConfigEditor {
    pub fn open(path: &Path) -> Result<ConfigEditor, ConfigError> {
        let _ = path;
        todo!()
    }

    /// Append a `[[partners]]` entry; refuses a duplicate id.
    pub fn add_partner(&mut self, partner: &PartnerConfig) -> Result<(), ConfigError> {
        let _ = partner;
        todo!()
    }

    /// Append a `[[shares]]` entry; refuses a duplicate name or a grant to
    /// an unknown partner.
    pub fn add_share(&mut self, share: &ShareConfig) -> Result<(), ConfigError> {
        let _ = share;
        todo!()
    }

    pub fn save(self) -> Result<Config, ConfigError> {
        todo!()
    }
}
