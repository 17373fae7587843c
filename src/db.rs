//! The node's SQLite database (`<home>/deftfs.db`, WAL): the manifest index
//! and the transfer history. Daemon and CLI open it concurrently; a busy
//! timeout makes writers wait for each other instead of failing.

use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
}

pub fn path(home: &Path) -> PathBuf {
    home.join("deftfs.db")
}

/// Open (creating if needed) an SQLite file the daemon shares between its
/// tasks: WAL journal, a 10 s busy timeout, and `synchronous` as given
/// (`NORMAL`, or `FULL` where a commit must survive a power loss).
pub fn open_wal(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    const BUSY: Duration = Duration::from_secs(10);
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY)?;
    // Turning a new database to WAL takes an exclusive lock, and SQLite
    // answers BUSY at once there, without the busy handler: two commands
    // started together on a new node home (a send and a receive) would
    // fail with "database is locked". Wait for the other, as for any lock.
    let deadline = std::time::Instant::now() + BUSY;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => break,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

/// Open (creating if needed) and migrate the node database.
pub fn open(home: &Path) -> Result<Mutex<Connection>, DbError> {
    let path = path(home);
    let wrap = |source| DbError::Open { path: path.clone(), source };
    let conn = open_wal(&path, "NORMAL").map_err(wrap)?;
    crate::index::migrate(&conn).map_err(wrap)?;
    crate::lease::migrate(&conn).map_err(wrap)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS transfers (
            id TEXT PRIMARY KEY,
            direction TEXT NOT NULL,      -- push | pull
            role TEXT NOT NULL,           -- client | server
            partner TEXT NOT NULL,
            share TEXT NOT NULL,
            path TEXT NOT NULL,
            file_hash TEXT NOT NULL,
            bytes_total INTEGER NOT NULL,
            bytes_sent INTEGER NOT NULL,
            chunks_total INTEGER NOT NULL,
            chunks_sent INTEGER NOT NULL,
            retransmissions INTEGER NOT NULL,
            started_ns INTEGER NOT NULL,
            finished_ns INTEGER NOT NULL,
            status TEXT NOT NULL,         -- ok | failed
            error TEXT,
            receipt TEXT
        );
        CREATE INDEX IF NOT EXISTS transfers_finished ON transfers(finished_ns);",
    )
    .map_err(wrap)?;
    Ok(Mutex::new(conn))
}

/// One line of history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransferRecord {
    pub id: String,
    pub direction: String,
    pub role: String,
    pub partner: String,
    pub share: String,
    pub path: String,
    pub file_hash: String,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub chunks_total: u32,
    pub chunks_sent: u32,
    pub retransmissions: u32,
    pub started_ns: i64,
    pub finished_ns: i64,
    pub status: String,
    pub error: Option<String>,
    pub receipt: Option<String>,
}

pub fn record_transfer(conn: &Connection, r: &TransferRecord) -> Result<(), DbError> {
    // Prepared once per connection: one row per transfer, and a `tar x`
    // through a mount makes thousands (parsing the SQL took a third of it).
    conn.prepare_cached(
        "INSERT OR REPLACE INTO transfers (id, direction, role, partner, share, path, file_hash, bytes_total, bytes_sent,
            chunks_total, chunks_sent, retransmissions, started_ns, finished_ns, status, error, receipt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        r.id,
        r.direction,
        r.role,
        r.partner,
        r.share,
        r.path,
        r.file_hash,
        r.bytes_total as i64,
        r.bytes_sent as i64,
        r.chunks_total,
        r.chunks_sent,
        r.retransmissions,
        r.started_ns,
        r.finished_ns,
        r.status,
        r.error,
        r.receipt
    ])?;
    Ok(())
}

/// The most recent transfers first.
pub fn history(conn: &Connection, limit: u32) -> Result<Vec<TransferRecord>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, direction, role, partner, share, path, file_hash, bytes_total, bytes_sent, chunks_total, chunks_sent,
                retransmissions, started_ns, finished_ns, status, error, receipt
         FROM transfers ORDER BY finished_ns DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |row| {
        Ok(TransferRecord {
            id: row.get(0)?,
            direction: row.get(1)?,
            role: row.get(2)?,
            partner: row.get(3)?,
            share: row.get(4)?,
            path: row.get(5)?,
            file_hash: row.get(6)?,
            bytes_total: row.get::<_, i64>(7)?.max(0) as u64,
            bytes_sent: row.get::<_, i64>(8)?.max(0) as u64,
            chunks_total: row.get(9)?,
            chunks_sent: row.get(10)?,
            retransmissions: row.get(11)?,
            started_ns: row.get(12)?,
            finished_ns: row.get(13)?,
            status: row.get(14)?,
            error: row.get(15)?,
            receipt: row.get(16)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
