//! A node: its home, configuration, identity, partners and database, opened
//! once and shared by the daemon's tasks and the CLI's commands; and the
//! daemon's serving loop, [`run`], which stops when `shutdown` resolves.

use crate::config::{self, Config, ConfigError};
use crate::db::{self, DbError};
use crate::identity::{Identity, IdentityError};
use crate::transport::{DirectoryError, Endpoint, PartnerDirectory, TransportError};
use rusqlite::Connection;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no deftfs node in {0}: create one with `deftfs init --name NAME` (or pass --home)")]
    NotInitialized(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("leases: {0}")]
    Leases(String),
}

pub struct Node {
    pub home: PathBuf,
    pub config: Config,
    pub identity: Arc<Identity>,
    pub directory: Arc<PartnerDirectory>,
    pub db: Mutex<Connection>,
    /// Targets being assembled right now: (partner, generation). Two
    /// partners never write one target at once; the same partner may take
    /// its own target over (a resumed push after its connection died).
    pub(crate) busy_targets: Mutex<std::collections::HashMap<PathBuf, (crate::proto::Name, u64)>>,
    pub(crate) busy_generation: std::sync::atomic::AtomicU64,
    /// Chunks sent ahead of pushes (AHEAD), by partner and ahead id, with
    /// when each was last used.
    pub(crate) aheads: crate::transfer::serve::Aheads,
    /// Pollers of watched shares.
    pub(crate) watchers: crate::watch::Watchers,
    /// The leases this node grants on its shares (it is their lock authority).
    pub leases: crate::lease::Leases,
    /// Where receipts are written (in the background in the daemon).
    pub receipts: crate::receipt::Receipts,
    /// Partners found unreachable, so that requests do not each wait for
    /// them ([`crate::reach`]).
    pub reach: crate::reach::Reach,
}

impl Node {
    pub fn open(home: &Path) -> Result<Arc<Node>, NodeError> {
        let config_path = config::config_path(home);
        if !config_path.exists() {
            return Err(NodeError::NotInitialized(home.to_path_buf()));
        }
        let config = Config::load(&config_path)?;
        let identity = Arc::new(Identity::load(home)?);
        let directory = Arc::new(PartnerDirectory::new(&config, home)?);
        let db = db::open(home)?;
        let leases = {
            let conn = db.lock().unwrap_or_else(|p| p.into_inner());
            crate::lease::Leases::load(&conn, crate::time::Timestamp::now().0).map_err(|e| NodeError::Leases(e.to_string()))?
        };
        Ok(Arc::new(Node {
            home: home.to_path_buf(),
            config,
            identity,
            directory,
            db,
            busy_targets: Default::default(),
            busy_generation: Default::default(),
            aheads: Default::default(),
            watchers: Default::default(),
            leases,
            receipts: Default::default(),
            reach: Default::default(),
        }))
    }

    /// The database, even if a panicking thread poisoned its lock.
    pub fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serve partners until `shutdown` resolves. Returns the bound address
/// through `ready` as soon as the endpoint listens.
pub async fn run(
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), NodeError> {
    // Patches a crash interrupted are finished before anything is served.
    {
        let node = node.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for target in crate::transfer::patch::recover(&crate::transfer::patch::journal_dir(&node.home)) {
                crate::index::forget(&node.db, &target);
            }
        })
        .await;
    }
    let endpoint = Arc::new(Endpoint::server(node.config.node.listen, node.identity.clone(), node.directory.clone())?);
    let addr = endpoint.local_addr().map_err(|source| TransportError::Socket { addr: node.config.node.listen, source })?;
    tracing::info!(node = %node.config.node.name, %addr, fingerprint = %node.identity.fingerprint(), "listening");
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    // Index the shares in the background (one thread), so the first
    // DESCRIBE of a large file is answered from the index.
    let stop_indexing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (node, stop) = (node.clone(), stop_indexing.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            for config in &node.config.shares {
                let share = crate::share::Share::new(config);
                crate::watch::warm(&node, &share, &crate::watch::files(&share), &stop);
            }
            tracing::info!("shares indexed in {:.2} s", started.elapsed().as_secs_f64());
        });
    }
    // Partial files of pushes nobody resumed: deleted once stale, at start
    // and every hour, so abandoned pushes cannot fill the disk.
    let partials = {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                let node2 = node.clone();
                let _ = tokio::task::spawn_blocking(move || sweep_partials(&node2)).await;
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
        })
    };
    // Expired leases: tell watchers, so other mounts drop `.NAME.lock`.
    let sweeper = {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let expired = node.leases.expire(&node.db(), crate::time::Timestamp::now().0);
                for lease in expired {
                    tracing::info!(target: "audit", holder = %lease.holder, share = %lease.share, path = %lease.path, "lease expired");
                    node.watchers.notify(&lease.share, &lease.path, None);
                }
            }
        })
    };
    let mut connections = tokio::task::JoinSet::new();
    let per_partner: Arc<Mutex<Connections>> = Default::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Each handshake runs on the connection's own task: a stalled
            // one must not keep others out, and this select must be able to
            // drop the accept without dropping a half-made connection.
            incoming = endpoint.incoming() => {
                let Some(incoming) = incoming else { break };
                let (node, endpoint, per_partner) = (node.clone(), endpoint.clone(), per_partner.clone());
                connections.spawn(async move {
                    let Some((conn, partner, cert)) = endpoint.handshake(incoming).await else { return };
                    let Some(_slot) = ConnectionSlot::take(&per_partner, partner.as_str(), &conn) else {
                        tracing::warn!(target: "audit", %partner, remote = %conn.remote_address(), "connection refused: {MAX_CONNECTIONS_PER_PARTNER} already open");
                        conn.close(TOO_MANY_CONNECTIONS.into(), TOO_MANY_REASON.as_bytes());
                        return;
                    };
                    crate::transfer::serve::serve(node, conn, partner, cert).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    tracing::info!("shutting down");
    sweeper.abort();
    partials.abort();
    stop_indexing.store(true, std::sync::atomic::Ordering::Relaxed);
    endpoint.quinn.close(0u32.into(), SHUTDOWN_REASON);
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    endpoint.quinn.wait_idle().await;
    Ok(())
}

/// Connections one partner may hold open at once. A node's mounts, sends
/// and receives each take one or two; a partner that opens more (a bug,
/// or a hostile peer) is held to this many rather than let grow the daemon.
pub const MAX_CONNECTIONS_PER_PARTNER: usize = 64;
/// QUIC application close code of a connection refused, or replaced, for
/// that reason.
pub const TOO_MANY_CONNECTIONS: u32 = 0x4445_0001;
const TOO_MANY_REASON: &str = "too many connections from this node (64 at once): close some, or wait for them to end";
const REPLACED_REASON: &str = "too many connections from this node (64 at once): this one, the oldest, gave its place to a newer one";

/// What a stopping daemon closes its connections with.
const SHUTDOWN_REASON: &[u8] = b"shutdown";

/// Whether the partner closed `conn` because its daemon is stopping.
pub fn shut_down(conn: &quinn::Connection) -> bool {
    matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c)) if &c.reason[..] == SHUTDOWN_REASON)
}

/// Why the partner closed `conn`, when it was for having too many of this
/// node's connections open (a refusal, or a replacement by a newer one).
pub fn too_many_connections(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(TOO_MANY_CONNECTIONS) => {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

/// Every partner's open connections, oldest first.
type Connections = HashMap<String, Vec<quinn::Connection>>;

/// One of a partner's [`MAX_CONNECTIONS_PER_PARTNER`] places, given back
/// when dropped.
struct ConnectionSlot {
    table: Arc<Mutex<Connections>>,
    partner: String,
    /// Its connection's [`quinn::Connection::stable_id`].
    id: usize,
}

impl ConnectionSlot {
    /// A place for `conn`. When the partner has them all, its oldest
    /// connection from another address gives its place up (it is closed):
    /// a node killed or cut off leaves its connections open here until
    /// they time out, and after a few restarts in a row those would keep
    /// the node out. Connections from one address are one running process,
    /// and one that opens too many is refused its new ones.
    fn take(table: &Arc<Mutex<Connections>>, partner: &str, conn: &quinn::Connection) -> Option<ConnectionSlot> {
        let remote = conn.remote_address();
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let open = t.entry(partner.to_string()).or_default();
        if open.len() >= MAX_CONNECTIONS_PER_PARTNER {
            let i = open.iter().position(|o| o.remote_address() != remote)?;
            let old = open.remove(i);
            tracing::warn!(target: "audit", %partner, old = %old.remote_address(), new = %remote, "connection replaced: {MAX_CONNECTIONS_PER_PARTNER} already open; the oldest from another address is closed");
            old.close(TOO_MANY_CONNECTIONS.into(), REPLACED_REASON.as_bytes());
        }
        open.push(conn.clone());
        Some(ConnectionSlot { table: table.clone(), partner: partner.to_string(), id: conn.stable_id() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = t.get_mut(&self.partner) {
            open.retain(|o| o.stable_id() != self.id);
            if open.is_empty() {
                t.remove(&self.partner);
            }
        }
    }
}

/// Delete the partial files of pushes older than `storage.partial_ttl_hours`
/// in every share, except those of transfers running now.
fn sweep_partials(node: &Node) {
    let ttl = std::time::Duration::from_secs(node.config.storage.partial_ttl_hours * 3600);
    let Some(before) = std::time::SystemTime::now().checked_sub(ttl) else { return };
    let busy: Vec<PathBuf> = node.busy_targets.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
    // A patch's journal still names its temp file until the patch is done.
    let pending = crate::transfer::patch::pending_data(&crate::transfer::patch::journal_dir(&node.home));
    let in_use = |partial: &Path| {
        pending.iter().any(|p| p == partial) || busy.iter().any(|target| crate::transfer::assemble::is_temp_of(partial, target))
    };
    for config in &node.config.shares {
        let (gone, bytes) = crate::share::Share::new(config).sweep_partials(before, in_use);
        if !gone.is_empty() {
            tracing::info!(share = %config.name, files = gone.len(), bytes, "deleted partial files of pushes nobody resumed");
        }
    }
}
