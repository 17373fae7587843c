//! The lease table of a serving node: the lock authority for its shares.
//!
//! [`LeaseTable`] is the pure core (no clock, no file: time is a `now_ns`
//! argument, unix nanoseconds); [`Leases`] wraps it in a mutex and writes
//! every change through to the node's SQLite database, so a restarted
//! daemon keeps its unexpired leases and never reuses a token.
//!
//! Guarantees:
//! - every grant gets a fencing token larger than any token this node
//!   granted before, on any share or path, also across restarts: a grant is
//!   stored before its token is handed out, and [`Leases::load`] continues
//!   after the largest stored token;
//! - a lease on NAME covers its companions in the same directory (`NAME@`,
//!   `NAME1`, `NAME~`, `~$NAME`, `.~lock.NAME#`: the names applications
//!   save through, see [`covering_names`]), so no two holders hold
//!   unexpired leases on names where one covers the other;
//! - a lease is renewed or released only by its holder with its token; an
//!   expired lease stays renewable by its holder until another holder takes
//!   it or a name it covers, since no newer grant means fencing still holds;
//! - the last grant of every (share, path) is kept after release and expiry
//!   (rows are never deleted), so [`LeaseTable::fence_ok`] can refuse a
//!   late write-back made under a lease that was granted again since.
//!
//! A lease is live while it is granted and `now_ns < expires_ns`. Renewals
//! never move a lease's expiry backward.
//!
//! Lock ordering: the caller of a [`Leases`] method that takes a
//! `&Connection` holds the node's database mutex; [`Leases`] then takes
//! its table mutex. The table mutex is never held while waiting for the
//! database mutex.

use crate::proto::{Name, SharePath};
use crate::time::Timestamp;
use rusqlite::{params, Connection};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// One lease, as the authority granted it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    #[serde(serialize_with = "name_text")]
    pub share: Name,
    #[serde(serialize_with = "path_text")]
    pub path: SharePath,
    /// Partner id (node name) holding it.
    #[serde(serialize_with = "name_text")]
    pub holder: Name,
    /// What holds it on that node: a process name, or "manual" (`deftfs lock`), sanitized to a Name.
    #[serde(serialize_with = "name_text")]
    pub owner: Name,
    /// Fencing token: grows with every grant, node-wide, never reused (also across restarts).
    pub token: u64,
    pub since_ns: i64,
    pub expires_ns: i64,
}

// proto's Name and SharePath are not serde types: a lease serializes them
// as plain strings (the root path as "").
fn name_text<S: serde::Serializer>(name: &Name, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

fn path_text<S: serde::Serializer>(path: &SharePath, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(path.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Held by another holder, on the path or a name it covers or is covered by.
    #[error(
        "{} in share {} is locked by {} ({}) until {}: try again when it is released or has expired",
        .0.path,
        .0.share,
        .0.holder,
        .0.owner,
        Timestamp(.0.expires_ns).rfc3339()
    )]
    Held(Lease),
    /// Renew or release of a lease this holder does not have with that token.
    #[error(
        "{path} in share {share} is not leased to you under that token \
         (it was released, or it expired and another node leased it since): lock it again"
    )]
    NotHeld { share: Name, path: SharePath },
    #[error("lease database: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Where a grant stands. Only `Granted` leases can be live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Granted,
    /// Reported by [`LeaseTable::expire`]; still renewable by its holder.
    Expired,
    Released,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Granted => "granted",
            State::Expired => "expired",
            State::Released => "released",
        }
    }

    fn parse(s: &str) -> Option<State> {
        match s {
            "granted" => Some(State::Granted),
            "expired" => Some(State::Expired),
            "released" => Some(State::Released),
            _ => None,
        }
    }
}

/// The last grant of one (share, path).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    lease: Lease,
    state: State,
}

impl Grant {
    fn live(&self, now_ns: i64) -> bool {
        self.state == State::Granted && now_ns < self.lease.expires_ns
    }
}

/// The leases of all shares of one node, in memory.
#[derive(Debug, Default)]
pub struct LeaseTable {
    grants: BTreeMap<Name, BTreeMap<SharePath, Grant>>,
    /// The largest token ever granted (0: none yet).
    last_token: u64,
}

impl LeaseTable {
    pub fn new() -> LeaseTable {
        LeaseTable::default()
    }

    /// Grant `path` to `holder`, or renew it if `holder` already holds it
    /// (same token: one node may open a file from several processes).
    /// Refused with [`LeaseError::Held`] while another holder holds `path`,
    /// a name `path` is a companion of, or a companion of `path`.
    pub fn acquire(
        &mut self,
        share: &Name,
        path: &SharePath,
        holder: &Name,
        owner: &Name,
        ttl_ns: i64,
        now_ns: i64,
    ) -> Result<Lease, LeaseError> {
        if let Some(other) = self.conflict(share, path, holder, now_ns) {
            return Err(LeaseError::Held(other.clone()));
        }
        let expires_ns = now_ns.saturating_add(ttl_ns);
        if let Some(grant) = self.grant_mut(share, path).filter(|g| g.live(now_ns) && g.lease.holder == *holder) {
            grant.lease.expires_ns = grant.lease.expires_ns.max(expires_ns);
            return Ok(grant.lease.clone());
        }
        self.last_token += 1;
        let lease = Lease {
            share: share.clone(),
            path: path.clone(),
            holder: holder.clone(),
            owner: owner.clone(),
            token: self.last_token,
            since_ns: now_ns,
            expires_ns,
        };
        self.put(Grant { lease: lease.clone(), state: State::Granted });
        Ok(lease)
    }

    /// Extend the lease `holder` has on `path` under `token`. An expired
    /// lease is renewed too as long as no other holder took `path` or a
    /// name related to it since.
    pub fn renew(
        &mut self,
        share: &Name,
        path: &SharePath,
        holder: &Name,
        token: u64,
        ttl_ns: i64,
        now_ns: i64,
    ) -> Result<Lease, LeaseError> {
        let not_held = || LeaseError::NotHeld { share: share.clone(), path: path.clone() };
        let ours =
            self.grant(share, path).is_some_and(|g| g.state != State::Released && g.lease.holder == *holder && g.lease.token == token);
        if !ours || self.conflict(share, path, holder, now_ns).is_some() {
            return Err(not_held());
        }
        let grant = self.grant_mut(share, path).ok_or_else(not_held)?;
        grant.state = State::Granted;
        grant.lease.expires_ns = grant.lease.expires_ns.max(now_ns.saturating_add(ttl_ns));
        Ok(grant.lease.clone())
    }

    /// Give up the lease `holder` has on `path` under `token`, expired or
    /// not (so `now_ns` is not needed). Releasing it again is not an error
    /// (a retried UNLOCK whose answer was lost).
    pub fn release(&mut self, share: &Name, path: &SharePath, holder: &Name, token: u64, _now_ns: i64) -> Result<(), LeaseError> {
        match self.grant_mut(share, path) {
            Some(grant) if grant.lease.holder == *holder && grant.lease.token == token => {
                grant.state = State::Released;
                Ok(())
            }
            _ => Err(LeaseError::NotHeld { share: share.clone(), path: path.clone() }),
        }
    }

    /// The live leases of `share`, sorted by path.
    pub fn list(&self, share: &Name, now_ns: i64) -> Vec<Lease> {
        self.grants.get(share).into_iter().flat_map(|paths| paths.values()).filter(|g| g.live(now_ns)).map(|g| g.lease.clone()).collect()
    }

    /// The live leases of all shares, sorted by share, then path.
    pub fn all(&self, now_ns: i64) -> Vec<Lease> {
        self.grants.values().flat_map(|paths| paths.values()).filter(|g| g.live(now_ns)).map(|g| g.lease.clone()).collect()
    }

    /// Err(lease) if a mutation (push, write, truncate, rename, unlink,
    /// mkdir over, setattr) of `path` by `writer` is forbidden: `path` or a
    /// name it is a companion of is leased, unexpired, by another holder.
    pub fn check_write(&self, share: &Name, path: &SharePath, writer: &Name, now_ns: i64) -> Result<(), Lease> {
        match covering_names(path).iter().find_map(|p| self.live(share, p, now_ns).filter(|l| l.holder != *writer)) {
            Some(lease) => Err(lease.clone()),
            None => Ok(()),
        }
    }

    /// Fencing: true if a write-back carrying `token` (the writer's lease
    /// token, for `path` or for the name `path` is a companion of) may
    /// still land: no grant newer than `token` has been made to another
    /// holder for `path` or any of its covering names since.
    ///
    /// The writer is the holder of the grant that carries `token`, found
    /// among the last grants of those names; newer grants to that same
    /// holder (a node holding both `x.blend` and `x.blend@`) do not fence
    /// it out. A token no longer found there, while a newer grant exists,
    /// is refused.
    pub fn fence_ok(&self, share: &Name, path: &SharePath, token: u64) -> bool {
        let grants: Vec<&Lease> = covering_names(path).iter().filter_map(|p| self.grant(share, p)).map(|g| &g.lease).collect();
        let mut newer = grants.iter().filter(|l| l.token > token).peekable();
        if newer.peek().is_none() {
            return true;
        }
        match grants.iter().find(|l| l.token == token) {
            Some(writer) => newer.all(|l| l.holder == writer.holder),
            None => false,
        }
    }

    /// Mark granted leases whose expiry has passed as expired and return
    /// them (each once), so callers can log and notify. They stay
    /// renewable by their holders until someone else takes them.
    pub fn expire(&mut self, now_ns: i64) -> Vec<Lease> {
        let mut expired = Vec::new();
        for grant in self.grants.values_mut().flat_map(|paths| paths.values_mut()) {
            if grant.state == State::Granted && !grant.live(now_ns) {
                grant.state = State::Expired;
                expired.push(grant.lease.clone());
            }
        }
        expired
    }

    /// The first live lease of another holder on `path`, on a name `path`
    /// is a companion of, or on a companion of `path`.
    fn conflict(&self, share: &Name, path: &SharePath, holder: &Name, now_ns: i64) -> Option<&Lease> {
        covering_names(path)
            .into_iter()
            .chain(companion_names(path))
            .find_map(|p| self.live(share, &p, now_ns).filter(|l| l.holder != *holder))
    }

    fn live(&self, share: &Name, path: &SharePath, now_ns: i64) -> Option<&Lease> {
        self.grant(share, path).filter(|g| g.live(now_ns)).map(|g| &g.lease)
    }

    fn grant(&self, share: &Name, path: &SharePath) -> Option<&Grant> {
        self.grants.get(share)?.get(path)
    }

    fn grant_mut(&mut self, share: &Name, path: &SharePath) -> Option<&mut Grant> {
        self.grants.get_mut(share)?.get_mut(path)
    }

    fn put(&mut self, grant: Grant) {
        self.last_token = self.last_token.max(grant.lease.token);
        self.grants.entry(grant.lease.share.clone()).or_default().insert(grant.lease.path.clone(), grant);
    }

    /// Put back what [`LeaseTable::grant`] returned before a change that
    /// could not be stored. `last_token` stays: a token is never reused,
    /// even one that was never handed out.
    fn restore(&mut self, share: &Name, path: &SharePath, before: Option<Grant>) {
        match before {
            Some(grant) => self.put(grant),
            None => {
                if let Some(paths) = self.grants.get_mut(share) {
                    paths.remove(path);
                }
            }
        }
    }
}

/// How applications name the files they save through, as (prefix, suffix)
/// around the name they belong to: Blender writes `NAME@` and keeps
/// `NAME1`, editors keep `NAME~`, Microsoft Office marks an open file with
/// `~$NAME`, LibreOffice with `.~lock.NAME#`.
const COMPANIONS: [(&str, &str); 5] = [("", "@"), ("", "1"), ("", "~"), ("~$", ""), (".~lock.", "#")];

/// The names whose lease covers `path`: `path` itself first, then NAME
/// when `path` is `NAME@`, `NAME1`, `NAME~`, `~$NAME` or `.~lock.NAME#` in
/// the same directory. `d/x.blend1` gives `[d/x.blend1, d/x.blend]`,
/// `x.blend` gives `[x.blend]`. `file1` also gives `file`: that only
/// matters while `file` is leased, and then protecting `file1` is harmless.
pub fn covering_names(path: &SharePath) -> Vec<SharePath> {
    let mut names = vec![path.clone()];
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else { return names };
    for (prefix, suffix) in COMPANIONS {
        let base = file.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix));
        // join refuses "", "." and "..": `@` alone covers nothing.
        if let Some(name) = base.and_then(|b| parent.join(b).ok()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The companions of `path` that exist as valid names: the inverse of
/// [`covering_names`] (without `path` itself).
fn companion_names(path: &SharePath) -> Vec<SharePath> {
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else { return Vec::new() };
    COMPANIONS.iter().filter_map(|(prefix, suffix)| parent.join(&format!("{prefix}{file}{suffix}")).ok()).collect()
}

/// A process name (from `/proc/PID/comm`: may contain spaces or odd
/// bytes) as a [`Name`]: surrounding whitespace (comm's newline) dropped,
/// invalid characters made `_`, cut to 128; empty becomes `process`, and
/// the reserved `.`, `..` and `-` become underscores.
pub fn owner_name(raw: &str) -> Name {
    let keep = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut name: String = raw.trim().chars().map(|c| if keep(c) { c } else { '_' }).take(Name::MAX_LEN).collect();
    if name.is_empty() {
        name = "process".to_string();
    }
    if Name::RESERVED.contains(&name.as_str()) {
        name = "_".repeat(name.len());
    }
    Name::new(name).expect("sanitized to 1 to 128 of [A-Za-z0-9._-], not reserved")
}

/// Create the lease table if missing. Called by `db::open`.
///
/// One row per (share, path): its last grant. Rows are never deleted: the
/// largest token is the node's token counter, and fencing needs the last
/// grant of every path.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS leases (
            share TEXT NOT NULL,
            path TEXT NOT NULL,
            holder TEXT NOT NULL,
            owner TEXT NOT NULL,
            token INTEGER NOT NULL,
            since_ns INTEGER NOT NULL,
            expires_ns INTEGER NOT NULL,
            state TEXT NOT NULL,          -- granted | expired | released
            PRIMARY KEY (share, path)
        );",
    )
}

/// The lease table the serving node uses: a [`LeaseTable`] whose changes
/// are written through to the node database (one upsert per change). A
/// change that cannot be stored is undone and returned as
/// [`LeaseError::Db`], so no token is handed out unstored.
#[derive(Debug, Default)]
pub struct Leases {
    table: Mutex<LeaseTable>,
}

impl Leases {
    /// Restore the table from `conn` (migrated): tokens continue after the
    /// largest stored one; leases whose expiry passed while the daemon was
    /// down count as expired (renewable, not reported by `expire`). Rows
    /// that do not validate are skipped with a warning.
    pub fn load(conn: &Connection, now_ns: i64) -> Result<Leases, LeaseError> {
        let mut table = LeaseTable::new();
        let max: Option<i64> = conn.query_row("SELECT MAX(token) FROM leases", [], |row| row.get(0))?;
        table.last_token = max.map_or(0, |t| u64::try_from(t).unwrap_or(0));
        let mut stmt = conn.prepare("SELECT share, path, holder, owner, token, since_ns, expires_ns, state FROM leases")?;
        let rows = stmt.query_map([], |row| {
            Ok(StoredRow {
                share: row.get(0)?,
                path: row.get(1)?,
                holder: row.get(2)?,
                owner: row.get(3)?,
                token: row.get(4)?,
                since_ns: row.get(5)?,
                expires_ns: row.get(6)?,
                state: row.get(7)?,
            })
        })?;
        for row in rows {
            let row = row?;
            match row.grant() {
                Some(mut grant) => {
                    if grant.state == State::Granted && !grant.live(now_ns) {
                        grant.state = State::Expired;
                    }
                    table.put(grant);
                }
                None => tracing::warn!(share = %row.share, path = %row.path, token = row.token, "lease row does not validate: skipped"),
            }
        }
        Ok(Leases { table: Mutex::new(table) })
    }

    /// [`LeaseTable::acquire`], stored.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &self,
        conn: &Connection,
        share: &Name,
        path: &SharePath,
        holder: &Name,
        owner: &Name,
        ttl_ns: i64,
        now_ns: i64,
    ) -> Result<Lease, LeaseError> {
        self.write_through(conn, share, path, |t| t.acquire(share, path, holder, owner, ttl_ns, now_ns))
    }

    /// [`LeaseTable::renew`], stored.
    #[allow(clippy::too_many_arguments)]
    pub fn renew(
        &self,
        conn: &Connection,
        share: &Name,
        path: &SharePath,
        holder: &Name,
        token: u64,
        ttl_ns: i64,
        now_ns: i64,
    ) -> Result<Lease, LeaseError> {
        self.write_through(conn, share, path, |t| t.renew(share, path, holder, token, ttl_ns, now_ns))
    }

    /// [`LeaseTable::release`], stored.
    pub fn release(
        &self,
        conn: &Connection,
        share: &Name,
        path: &SharePath,
        holder: &Name,
        token: u64,
        now_ns: i64,
    ) -> Result<(), LeaseError> {
        self.write_through(conn, share, path, |t| t.release(share, path, holder, token, now_ns))
    }

    /// [`LeaseTable::list`].
    pub fn list(&self, share: &Name, now_ns: i64) -> Vec<Lease> {
        self.lock().list(share, now_ns)
    }

    /// [`LeaseTable::all`].
    pub fn all(&self, now_ns: i64) -> Vec<Lease> {
        self.lock().all(now_ns)
    }

    /// [`LeaseTable::check_write`].
    pub fn check_write(&self, share: &Name, path: &SharePath, writer: &Name, now_ns: i64) -> Result<(), Lease> {
        self.lock().check_write(share, path, writer, now_ns)
    }

    /// [`LeaseTable::fence_ok`].
    pub fn fence_ok(&self, share: &Name, path: &SharePath, token: u64) -> bool {
        self.lock().fence_ok(share, path, token)
    }

    /// [`LeaseTable::expire`], stored. A row that cannot be updated is
    /// logged and left: after a restart its lease loads as expired anyway.
    pub fn expire(&self, conn: &Connection, now_ns: i64) -> Vec<Lease> {
        let mut table = self.lock();
        let expired = table.expire(now_ns);
        for lease in &expired {
            if let Some(grant) = table.grant(&lease.share, &lease.path) {
                if let Err(e) = store(conn, grant) {
                    tracing::warn!(share = %lease.share, path = %lease.path, "storing an expired lease: {e}");
                }
            }
        }
        expired
    }

    /// Apply `change` to the grant of (share, path) and store the result;
    /// undo it if storing fails.
    fn write_through<T>(
        &self,
        conn: &Connection,
        share: &Name,
        path: &SharePath,
        change: impl FnOnce(&mut LeaseTable) -> Result<T, LeaseError>,
    ) -> Result<T, LeaseError> {
        let mut table = self.lock();
        let before = table.grant(share, path).cloned();
        let out = change(&mut table)?;
        let Some(after) = table.grant(share, path).filter(|g| Some(*g) != before.as_ref()) else { return Ok(out) };
        if let Err(e) = store(conn, after) {
            table.restore(share, path, before);
            return Err(e.into());
        }
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, LeaseTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn store(conn: &Connection, grant: &Grant) -> rusqlite::Result<()> {
    let l = &grant.lease;
    let token = i64::try_from(l.token).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO leases (share, path, holder, owner, token, since_ns, expires_ns, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        l.share.as_str(),
        l.path.as_str(),
        l.holder.as_str(),
        l.owner.as_str(),
        token,
        l.since_ns,
        l.expires_ns,
        grant.state.as_str()
    ])?;
    Ok(())
}

/// A `leases` row as stored, before validation.
struct StoredRow {
    share: String,
    path: String,
    holder: String,
    owner: String,
    token: i64,
    since_ns: i64,
    expires_ns: i64,
    state: String,
}

impl StoredRow {
    fn grant(&self) -> Option<Grant> {
        let lease = Lease {
            share: Name::new(self.share.as_str()).ok()?,
            path: SharePath::parse(&self.path).ok()?,
            holder: Name::new(self.holder.as_str()).ok()?,
            owner: Name::new(self.owner.as_str()).ok()?,
            token: u64::try_from(self.token).ok().filter(|&t| t > 0)?,
            since_ns: self.since_ns,
            expires_ns: self.expires_ns,
        };
        Some(Grant { lease, state: State::parse(&self.state)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: i64 = 1_000_000_000;
    const TTL: i64 = 30 * SEC;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn p(s: &str) -> SharePath {
        SharePath::parse(s).unwrap()
    }

    fn paths(v: &[SharePath]) -> Vec<&str> {
        v.iter().map(|p| p.as_str()).collect()
    }

    /// A table with one lease: "a" holds s/x.blend from t=0.
    fn held() -> (LeaseTable, Lease) {
        let mut t = LeaseTable::new();
        let lease = t.acquire(&n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 0).unwrap();
        (t, lease)
    }

    #[test]
    fn grant_renew_release() {
        let (mut t, lease) = held();
        assert_eq!(lease.token, 1);
        assert_eq!((lease.holder.as_str(), lease.owner.as_str(), lease.since_ns, lease.expires_ns), ("a", "blender", 0, TTL));
        assert_eq!(t.list(&n("s"), SEC), vec![lease.clone()]);

        let renewed = t.renew(&n("s"), &p("x.blend"), &n("a"), 1, TTL, 10 * SEC).unwrap();
        assert_eq!((renewed.token, renewed.since_ns, renewed.expires_ns), (1, 0, 40 * SEC));

        t.release(&n("s"), &p("x.blend"), &n("a"), 1, 11 * SEC).unwrap();
        assert!(t.list(&n("s"), 11 * SEC).is_empty());
        // A retried release is fine; a renew after release is not.
        t.release(&n("s"), &p("x.blend"), &n("a"), 1, 12 * SEC).unwrap();
        assert!(matches!(t.renew(&n("s"), &p("x.blend"), &n("a"), 1, TTL, 12 * SEC), Err(LeaseError::NotHeld { .. })));

        let again = t.acquire(&n("s"), &p("x.blend"), &n("b"), &n("manual"), TTL, 13 * SEC).unwrap();
        assert_eq!(again.token, 2);
    }

    #[test]
    fn renew_and_release_need_holder_and_token() {
        let (mut t, _) = held();
        for (holder, token) in [("a", 2), ("b", 1)] {
            let renewed = t.renew(&n("s"), &p("x.blend"), &n(holder), token, TTL, SEC);
            assert!(matches!(renewed, Err(LeaseError::NotHeld { .. })), "{holder} {token}");
            let released = t.release(&n("s"), &p("x.blend"), &n(holder), token, SEC);
            assert!(matches!(released, Err(LeaseError::NotHeld { .. })), "{holder} {token}");
        }
        assert!(matches!(t.renew(&n("s"), &p("other"), &n("a"), 1, TTL, SEC), Err(LeaseError::NotHeld { .. })));
        let e = t.renew(&n("s"), &p("x.blend"), &n("b"), 1, TTL, SEC).unwrap_err().to_string();
        assert!(e.starts_with("x.blend in share s is not leased to you under that token (it was released"), "{e}");
        assert_eq!(t.list(&n("s"), SEC).len(), 1);
    }

    #[test]
    fn same_holder_reacquires_idempotently() {
        let (mut t, lease) = held();
        let again = t.acquire(&n("s"), &p("x.blend"), &n("a"), &n("other-process"), 10 * SEC, 5 * SEC).unwrap();
        assert_eq!(again.token, lease.token);
        assert_eq!(again.owner, lease.owner, "the first owner stays");
        assert_eq!(again.expires_ns, TTL, "a shorter ttl does not shorten the lease");
        let later = t.acquire(&n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 20 * SEC).unwrap();
        assert_eq!((later.token, later.expires_ns), (lease.token, 50 * SEC));
    }

    #[test]
    fn another_holder_is_refused_with_the_lease() {
        let (mut t, lease) = held();
        match t.acquire(&n("s"), &p("x.blend"), &n("b"), &n("manual"), TTL, SEC) {
            Err(LeaseError::Held(l)) => assert_eq!(l, lease),
            other => panic!("{other:?}"),
        }
        let e = t.acquire(&n("s"), &p("x.blend"), &n("b"), &n("manual"), TTL, SEC).unwrap_err().to_string();
        assert!(e.contains("x.blend") && e.contains("locked by a (blender)") && e.contains("1970-01-01T00:00:30.000Z"), "{e}");
        // Other shares and paths are independent.
        t.acquire(&n("t"), &p("x.blend"), &n("b"), &n("manual"), TTL, SEC).unwrap();
        t.acquire(&n("s"), &p("d/x.blend"), &n("b"), &n("manual"), TTL, SEC).unwrap();
    }

    #[test]
    fn expiry_lets_another_holder_in_with_a_bigger_token() {
        let (mut t, lease) = held();
        assert!(t.acquire(&n("s"), &p("x.blend"), &n("b"), &n("manual"), TTL, TTL - 1).is_err());
        assert!(t.list(&n("s"), TTL).is_empty(), "expired at exactly expires_ns");
        let b = t.acquire(&n("s"), &p("x.blend"), &n("b"), &n("manual"), TTL, TTL).unwrap();
        assert!(b.token > lease.token);
        assert_eq!(b.since_ns, TTL);
        // The old holder lost it: no renew with the old token.
        assert!(matches!(t.renew(&n("s"), &p("x.blend"), &n("a"), lease.token, TTL, TTL + 1), Err(LeaseError::NotHeld { .. })));
    }

    #[test]
    fn expired_lease_nobody_took_is_renewed_with_its_token() {
        let (mut t, lease) = held();
        assert_eq!(t.expire(TTL + SEC), vec![lease.clone()]);
        assert!(t.expire(TTL + 2 * SEC).is_empty(), "reported once");
        let renewed = t.renew(&n("s"), &p("x.blend"), &n("a"), lease.token, TTL, TTL + 3 * SEC).unwrap();
        assert_eq!((renewed.token, renewed.expires_ns), (lease.token, 2 * TTL + 3 * SEC));
        assert_eq!(t.list(&n("s"), TTL + 4 * SEC), [renewed]);
        // Expired again, and a companion taken meanwhile: not renewable.
        t.acquire(&n("s"), &p("x.blend@"), &n("b"), &n("manual"), TTL, 3 * TTL).unwrap();
        assert!(matches!(t.renew(&n("s"), &p("x.blend"), &n("a"), lease.token, TTL, 3 * TTL), Err(LeaseError::NotHeld { .. })));
    }

    #[test]
    fn re_acquire_after_expiry_is_a_new_grant() {
        let (mut t, lease) = held();
        let again = t.acquire(&n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, TTL).unwrap();
        assert!(again.token > lease.token);
        assert_eq!(again.since_ns, TTL);
    }

    #[test]
    fn fence_refuses_the_old_holder_after_a_new_grant() {
        let (mut t, lease) = held();
        let s = n("s");
        assert!(t.fence_ok(&s, &p("x.blend"), lease.token));
        assert!(t.fence_ok(&s, &p("x.blend@"), lease.token), "a companion written under the covering lease");
        assert!(t.fence_ok(&s, &p("never-leased"), 99));
        t.release(&s, &p("x.blend"), &n("a"), lease.token, SEC).unwrap();
        assert!(t.fence_ok(&s, &p("x.blend"), lease.token), "released, nobody took it since");

        let b = t.acquire(&s, &p("x.blend"), &n("b"), &n("manual"), TTL, 2 * SEC).unwrap();
        assert!(!t.fence_ok(&s, &p("x.blend"), lease.token));
        assert!(!t.fence_ok(&s, &p("x.blend1"), lease.token), "nor through a companion");
        assert!(t.fence_ok(&s, &p("x.blend"), b.token));
        assert!(t.fence_ok(&s, &p("other"), lease.token));
    }

    #[test]
    fn fence_refuses_after_a_companion_was_granted_to_another() {
        let (mut t, lease) = held();
        let s = n("s");
        let b = t.acquire(&s, &p("x.blend@"), &n("b"), &n("manual"), TTL, TTL).unwrap();
        assert!(!t.fence_ok(&s, &p("x.blend@"), lease.token));
        assert!(t.fence_ok(&s, &p("x.blend@"), b.token));
        assert!(t.fence_ok(&s, &p("x.blend"), lease.token), "x.blend@ does not cover x.blend");
    }

    #[test]
    fn fence_keeps_a_holder_of_a_name_and_its_companion() {
        // "a" leased x.blend@ (a write handle) before x.blend (Blender
        // opened it), then writes x.blend@ under x.blend@'s older token.
        let mut t = LeaseTable::new();
        let s = n("s");
        let at = t.acquire(&s, &p("x.blend@"), &n("a"), &n("blender"), TTL, 0).unwrap();
        let x = t.acquire(&s, &p("x.blend"), &n("a"), &n("blender"), TTL, 0).unwrap();
        assert!(x.token > at.token);
        assert!(t.fence_ok(&s, &p("x.blend@"), at.token));
        assert!(t.fence_ok(&s, &p("x.blend@"), x.token));
        // A token that is nobody's current grant, older than one: refused.
        assert!(!t.fence_ok(&s, &p("x.blend@"), 0));
    }

    #[test]
    fn companions_conflict_both_ways() {
        let s = n("s");
        for companion in ["x.blend@", "x.blend1", "x.blend~", "~$x.blend", ".~lock.x.blend#"] {
            let (mut t, lease) = held();
            match t.acquire(&s, &p(companion), &n("b"), &n("manual"), TTL, SEC) {
                Err(LeaseError::Held(l)) => assert_eq!(l, lease, "{companion}"),
                other => panic!("{companion}: {other:?}"),
            }
            // The holder itself may lease its companions.
            t.acquire(&s, &p(companion), &n("a"), &n("blender"), TTL, SEC).unwrap();

            let mut t = LeaseTable::new();
            let c = t.acquire(&s, &p(companion), &n("b"), &n("manual"), TTL, 0).unwrap();
            match t.acquire(&s, &p("x.blend"), &n("a"), &n("blender"), TTL, SEC) {
                Err(LeaseError::Held(l)) => assert_eq!(l, c, "{companion}"),
                other => panic!("{companion}: {other:?}"),
            }
        }
        // Siblings of the same name do not cover each other, nor other directories.
        let mut t = LeaseTable::new();
        t.acquire(&s, &p("x.blend@"), &n("a"), &n("blender"), TTL, 0).unwrap();
        t.acquire(&s, &p("x.blend1"), &n("b"), &n("blender"), TTL, 0).unwrap();
        t.acquire(&s, &p("d/x.blend"), &n("b"), &n("blender"), TTL, 0).unwrap();
    }

    #[test]
    fn check_write_allows_the_holder_only() {
        let (t, lease) = held();
        let s = n("s");
        for path in ["x.blend", "x.blend@", "x.blend1", "~$x.blend"] {
            assert_eq!(t.check_write(&s, &p(path), &n("a"), SEC), Ok(()), "{path}");
            assert_eq!(t.check_write(&s, &p(path), &n("b"), SEC), Err(lease.clone()), "{path}");
            assert_eq!(t.check_write(&s, &p(path), &n("b"), TTL), Ok(()), "{path} after expiry");
        }
        assert_eq!(t.check_write(&s, &p("y.blend"), &n("b"), SEC), Ok(()));
        assert_eq!(t.check_write(&n("t"), &p("x.blend"), &n("b"), SEC), Ok(()));
    }

    #[test]
    fn covering_names_cases() {
        assert_eq!(paths(&covering_names(&p("d/x.blend1"))), ["d/x.blend1", "d/x.blend"]);
        assert_eq!(paths(&covering_names(&p("x.blend"))), ["x.blend"]);
        assert_eq!(paths(&covering_names(&p("x.blend@"))), ["x.blend@", "x.blend"]);
        assert_eq!(paths(&covering_names(&p("a/b/x.psd~"))), ["a/b/x.psd~", "a/b/x.psd"]);
        assert_eq!(paths(&covering_names(&p("~$report.docx"))), ["~$report.docx", "report.docx"]);
        assert_eq!(paths(&covering_names(&p(".~lock.a.odt#"))), [".~lock.a.odt#", "a.odt"]);
        assert_eq!(paths(&covering_names(&p("file1"))), ["file1", "file"]);
        // Nothing left, or a dot component: no covered name.
        for alone in ["@", "1", "~", "~$", ".~lock.#", "..1", ".@"] {
            assert_eq!(paths(&covering_names(&p(alone))), [alone]);
        }
        assert_eq!(covering_names(&SharePath::root()), [SharePath::root()]);
    }

    #[test]
    fn owner_name_sanitizes() {
        assert_eq!(owner_name("blender").as_str(), "blender");
        assert_eq!(owner_name("Web Content\n").as_str(), "Web_Content");
        assert_eq!(owner_name("soffice.bin").as_str(), "soffice.bin");
        assert_eq!(owner_name("krita/été").as_str(), "krita__t_");
        assert_eq!(owner_name("").as_str(), "process");
        assert_eq!(owner_name(" \n").as_str(), "process");
        assert_eq!(owner_name("..").as_str(), "__");
        assert_eq!(owner_name("-").as_str(), "_");
        assert_eq!(owner_name(&"x".repeat(300)).as_str(), "x".repeat(128));
    }

    #[test]
    fn lease_serializes_as_plain_json() {
        let (_, lease) = held();
        let json = serde_json::to_string(&lease).unwrap();
        assert_eq!(
            json,
            r#"{"share":"s","path":"x.blend","holder":"a","owner":"blender","token":1,"since_ns":0,"expires_ns":30000000000}"#
        );
    }

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        conn
    }

    #[test]
    fn leases_survive_a_reload_and_tokens_continue() {
        let conn = db();
        let (s, a) = (n("s"), n("a"));
        let leases = Leases::load(&conn, 0).unwrap();
        let first = leases.acquire(&conn, &s, &p("x.blend"), &a, &n("blender"), TTL, 0).unwrap();
        let second = leases.acquire(&conn, &s, &p("y.psd"), &a, &n("krita"), TTL, 0).unwrap();
        leases.release(&conn, &s, &p("y.psd"), &a, second.token, SEC).unwrap();
        let renewed = leases.renew(&conn, &s, &p("x.blend"), &a, first.token, TTL, 2 * SEC).unwrap();

        let reloaded = Leases::load(&conn, 3 * SEC).unwrap();
        assert_eq!(reloaded.all(3 * SEC), vec![renewed.clone()]);
        assert_eq!(reloaded.list(&s, 3 * SEC), vec![renewed.clone()]);
        assert!(reloaded.fence_ok(&s, &p("y.psd"), second.token));
        assert!(matches!(reloaded.acquire(&conn, &s, &p("x.blend"), &n("b"), &n("manual"), TTL, 3 * SEC), Err(LeaseError::Held(_))));
        let next = reloaded.acquire(&conn, &s, &p("y.psd"), &n("b"), &n("manual"), TTL, 3 * SEC).unwrap();
        assert!(next.token > second.token && next.token > first.token);
        assert!(!reloaded.fence_ok(&s, &p("y.psd"), second.token));
        reloaded.renew(&conn, &s, &p("x.blend"), &a, first.token, TTL, 4 * SEC).unwrap();
    }

    #[test]
    fn reload_after_downtime_keeps_expired_leases_renewable() {
        let conn = db();
        let leases = Leases::load(&conn, 0).unwrap();
        let lease = leases.acquire(&conn, &n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 0).unwrap();
        let reloaded = Leases::load(&conn, 10 * TTL).unwrap();
        assert!(reloaded.all(10 * TTL).is_empty());
        assert!(reloaded.expire(&conn, 10 * TTL).is_empty(), "expired while down: nothing to report");
        reloaded.renew(&conn, &n("s"), &p("x.blend"), &n("a"), lease.token, TTL, 10 * TTL).unwrap();
    }

    #[test]
    fn expire_is_stored() {
        let conn = db();
        let leases = Leases::load(&conn, 0).unwrap();
        let lease = leases.acquire(&conn, &n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 0).unwrap();
        assert_eq!(leases.expire(&conn, TTL), [lease]);
        let state: String = conn.query_row("SELECT state FROM leases", [], |r| r.get(0)).unwrap();
        assert_eq!(state, "expired");
    }

    #[test]
    fn a_grant_that_cannot_be_stored_is_undone() {
        let conn = db();
        let leases = Leases::load(&conn, 0).unwrap();
        conn.execute_batch("DROP TABLE leases").unwrap();
        let e = leases.acquire(&conn, &n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 0);
        assert!(matches!(e, Err(LeaseError::Db(_))), "{e:?}");
        assert!(leases.all(0).is_empty());
        assert_eq!(leases.check_write(&n("s"), &p("x.blend"), &n("b"), 0), Ok(()));
    }

    #[test]
    fn load_skips_rows_that_do_not_validate_but_keeps_their_tokens() {
        let conn = db();
        conn.execute(
            "INSERT INTO leases (share, path, holder, owner, token, since_ns, expires_ns, state) VALUES ('s', '../etc', 'a', 'x', 41, 0, ?1, 'granted')",
            [TTL],
        )
        .unwrap();
        let leases = Leases::load(&conn, 0).unwrap();
        assert!(leases.all(0).is_empty());
        let lease = leases.acquire(&conn, &n("s"), &p("x.blend"), &n("a"), &n("blender"), TTL, 0).unwrap();
        assert_eq!(lease.token, 42);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire { share: usize, path: usize, holder: usize, ttl_s: i64 },
        Renew { share: usize, path: usize, holder: usize, stale: bool },
        Release { share: usize, path: usize, holder: usize },
        Expire,
        Advance { s: i64 },
        Reload,
    }

    const SHARES: [&str; 2] = ["s", "t"];
    const PATHS: [&str; 6] = ["x.blend", "x.blend@", "x.blend1", "~$x.blend", "d/x.blend", "y.psd"];
    const HOLDERS: [&str; 3] = ["a", "b", "c"];

    fn op() -> impl Strategy<Value = Op> {
        let (sh, pa, ho) = (0..SHARES.len(), 0..PATHS.len(), 0..HOLDERS.len());
        prop_oneof![
            (sh.clone(), pa.clone(), ho.clone(), 1i64..60).prop_map(|(share, path, holder, ttl_s)| Op::Acquire {
                share,
                path,
                holder,
                ttl_s
            }),
            (sh.clone(), pa.clone(), ho.clone(), any::<bool>()).prop_map(|(share, path, holder, stale)| Op::Renew {
                share,
                path,
                holder,
                stale
            }),
            (sh, pa, ho).prop_map(|(share, path, holder)| Op::Release { share, path, holder }),
            Just(Op::Expire),
            (0i64..40).prop_map(|s| Op::Advance { s }),
            Just(Op::Reload),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Tokens strictly increase across any sequence of operations and
        /// reloads, and no two holders ever hold related names at once.
        #[test]
        fn tokens_strictly_increase(ops in proptest::collection::vec(op(), 1..60)) {
            let conn = db();
            let mut leases = Leases::load(&conn, 0).unwrap();
            let mut now = 0;
            let mut max_token = 0;
            for op in ops {
                let granted = match op {
                    Op::Acquire { share, path, holder, ttl_s } => {
                        let (s, p, h) = (n(SHARES[share]), p(PATHS[path]), n(HOLDERS[holder]));
                        let before = leases.lock().grant(&s, &p).map(|g| g.lease.clone()).filter(|l| l.holder == h);
                        match leases.acquire(&conn, &s, &p, &h, &n("proc"), ttl_s * SEC, now) {
                            Ok(l) if before.as_ref().is_some_and(|b| b.token == l.token) => None,
                            Ok(l) => Some(l.token),
                            Err(LeaseError::Held(other)) => {
                                prop_assert_ne!(other.holder, h);
                                None
                            }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Renew { share, path, holder, stale } => {
                        let (s, p, h) = (n(SHARES[share]), p(PATHS[path]), n(HOLDERS[holder]));
                        let token = leases.lock().grant(&s, &p).map_or(1, |g| g.lease.token) - u64::from(stale);
                        if let Ok(l) = leases.renew(&conn, &s, &p, &h, token, TTL, now) {
                            prop_assert_eq!((l.token, l.holder), (token, h));
                        }
                        None
                    }
                    Op::Release { share, path, holder } => {
                        let (s, p, h) = (n(SHARES[share]), p(PATHS[path]), n(HOLDERS[holder]));
                        let token = leases.lock().grant(&s, &p).map_or(1, |g| g.lease.token);
                        let _ = leases.release(&conn, &s, &p, &h, token, now);
                        None
                    }
                    Op::Expire => {
                        for l in leases.expire(&conn, now) {
                            prop_assert!(l.expires_ns <= now);
                        }
                        None
                    }
                    Op::Advance { s } => {
                        now += s * SEC;
                        None
                    }
                    Op::Reload => {
                        let before = leases.all(now);
                        leases = Leases::load(&conn, now).unwrap();
                        prop_assert_eq!(leases.all(now), before);
                        None
                    }
                };
                if let Some(token) = granted {
                    prop_assert!(token > max_token, "token {} after {}", token, max_token);
                    max_token = token;
                }
                let live = leases.all(now);
                for x in &live {
                    for y in &live {
                        let related = x.share == y.share && covering_names(&x.path).contains(&y.path);
                        prop_assert!(!related || x.holder == y.holder, "{:?} and {:?}", x, y);
                    }
                }
            }
        }

        /// companion_names is the inverse of covering_names.
        #[test]
        fn companions_invert_covering(dir in "(d/)?", name in "[a-z~$@#.1]{1,8}") {
            let Ok(path) = SharePath::parse(&format!("{dir}{name}")) else { return Ok(()) };
            for covered in covering_names(&path).into_iter().skip(1) {
                prop_assert!(companion_names(&covered).contains(&path), "{:?} {:?}", path, covered);
            }
            for companion in companion_names(&path) {
                prop_assert!(covering_names(&companion).contains(&path), "{:?} {:?}", path, companion);
            }
        }
    }
}
