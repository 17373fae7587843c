//! The leases a mount holds on its partner's files (the partner is the
//! lock authority and enforces them; see [`crate::lease`]).
//!
//! A lease is held on this node's behalf for as long as something needs
//! it, each need being a [`Need`]:
//! - a **process** that opened a lockable file, in any mode, or renamed a
//!   file to a lockable name (an application's "Save As"), for as long as
//!   that process lives (checked by pid and start time, so a reused pid is
//!   not mistaken for it);
//! - an open **write handle**, until it is released;
//! - a **manual** `deftfs lock`, until `deftfs unlock` or its own ttl;
//! - a **push** a close left in flight, until its receipt (or its failure)
//!   is in: the file stays leased between the close and the partner having
//!   its new version, so no other node writes it in between.
//!
//! [`Leases::tick`] runs every ttl/3: it drops needs that ended, releases
//! leases nothing needs any more, and renews the rest. A lease the partner
//! no longer grants (expired while this node was cut off, and taken by
//! another) is dropped with a warning; its writes then go back as conflict
//! copies, because the partner refuses their old fencing token.
//!
//! A lease on a name that does not exist yet may be *asked* for without
//! waiting ([`Leases::take_behind`], for a create): until the LOCK is
//! answered the lease is neither held nor free. Needs that come meanwhile
//! are kept for the grant, [`Leases::answered`] waits for the answer (a
//! push does before it goes), and the release of a lease whose needs all
//! ended meanwhile is sent after the answer, never before the LOCK. A
//! refusal leaves the name unleased; the partner then refuses this node's
//! push of it and the change becomes a conflict copy.
//!
//! Lock order: `held`, then `asked`.

use super::remote::{Remote, RemoteError};
use crate::proto::{LeaseRow, Name, Request, SharePath};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Something that needs a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Process {
        pid: i32,
        start: u64,
    },
    Handle(u64),
    Manual {
        until: Option<Instant>,
    },
    /// A push behind a close, by its sequence number.
    Push(u64),
}

impl Need {
    fn alive(&self, now: Instant) -> bool {
        match self {
            Need::Process { pid, start } => process_start(*pid) == Some(*start),
            Need::Handle(_) | Need::Push(_) => true,
            Need::Manual { until } => until.is_none_or(|u| now < u),
        }
    }
}

/// A lease as `deftfs locks` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LeaseInfo {
    pub share: String,
    pub path: String,
    pub holder: String,
    pub owner: String,
    pub token: u64,
    pub since_ns: i64,
    pub expires_ns: i64,
    /// Held by this node.
    pub mine: bool,
}

struct Held {
    row: LeaseRow,
    needs: Vec<Need>,
}

/// A LOCK sent behind a create and not answered yet.
struct Asked {
    needs: Vec<Need>,
    /// Its sender is dropped once the answer is taken in.
    answered: tokio::sync::watch::Receiver<()>,
}

type Key = (Name, SharePath);

fn add(needs: &mut Vec<Need>, need: Need) {
    if !needs.contains(&need) {
        needs.push(need);
    }
}

/// Add `need` to the lease held, or else asked for, on `key`; gives it
/// back when there is neither.
fn add_to(held: &mut HashMap<Key, Held>, asked: &mut HashMap<Key, Asked>, key: &Key, need: Need) -> Result<(), Need> {
    match (held.get_mut(key), asked.get_mut(key)) {
        (Some(h), _) => add(&mut h.needs, need),
        (None, Some(a)) => add(&mut a.needs, need),
        (None, None) => return Err(need),
    }
    Ok(())
}

pub struct Leases {
    remote: Arc<Remote>,
    ttl_s: u32,
    held: Mutex<HashMap<Key, Held>>,
    asked: Mutex<HashMap<Key, Asked>>,
    /// Releases start from FUSE threads, outside the runtime.
    rt: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The thread group (process) of a thread id, None once the thread is
/// gone: FUSE names the calling thread.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// The process of a thread id ([`tgid_of`]), the id itself if it is gone.
pub fn process_of(tid: u32) -> i32 {
    tgid_of(tid).unwrap_or(tid) as i32
}

/// Field `n` (1-based, as proc(5) numbers them; 3 or more) of
/// `/proc/ID/stat`, None once the process or thread is gone. The command
/// name, field 2, is in parentheses and may hold spaces: the fields after
/// it are counted from the last `)`.
pub fn proc_stat_field<T: std::str::FromStr>(id: u32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{id}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// A process's start time (clock ticks since boot, field 22), None once it
/// is gone.
pub fn process_start(pid: i32) -> Option<u64> {
    proc_stat_field(u32::try_from(pid).ok()?, 22)
}

/// A process's name (`/proc/PID/comm`).
pub fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Leases {
    pub fn new(remote: Arc<Remote>, ttl_s: u32) -> Arc<Leases> {
        Arc::new(Leases {
            remote,
            ttl_s: ttl_s.max(3),
            held: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        })
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s as u64)
    }

    /// Hold a lease on `path` for `need`: asks the partner unless this node
    /// already holds it. Returns the fencing token. A lease held by another
    /// node fails with the partner's BUSY refusal.
    pub async fn take(&self, share: &Name, path: &SharePath, owner: &Name, need: Need) -> Result<u64, RemoteError> {
        self.answered(share, path).await;
        {
            let mut held = lock(&self.held);
            if let Some(h) = held.get_mut(&(share.clone(), path.clone())) {
                add(&mut h.needs, need);
                return Ok(h.row.token);
            }
        }
        let req = Request::Lock { share: share.clone(), path: path.clone(), ttl_s: self.ttl_s, owner: owner.clone() };
        let row = self.remote.call_lock(req).await?;
        let token = row.token;
        let mut held = lock(&self.held);
        let h = held.entry((share.clone(), path.clone())).or_insert(Held { row, needs: Vec::new() });
        add(&mut h.needs, need);
        tracing::info!(partner = %self.remote.partner(), %share, %path, %owner, token, "lease taken");
        Ok(h.row.token)
    }

    /// Like [`Leases::take`], without waiting for the partner: `path` is
    /// asked for from now on (see the module's comment), and the LOCK goes
    /// out when the returned future runs. None when the lease is held or
    /// asked for already (`need` is added to it).
    pub fn take_behind(
        self: &Arc<Self>,
        share: &Name,
        path: &SharePath,
        owner: &Name,
        need: Need,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let key = (share.clone(), path.clone());
        let (answer, answered) = tokio::sync::watch::channel(());
        {
            let mut held = lock(&self.held);
            let mut asked = lock(&self.asked);
            let need = add_to(&mut held, &mut asked, &key, need).err()?;
            asked.insert(key.clone(), Asked { needs: vec![need], answered });
        }
        let me = self.clone();
        let req = Request::Lock { share: share.clone(), path: path.clone(), ttl_s: self.ttl_s, owner: owner.clone() };
        Some(async move {
            let reply = me.remote.call_lock(req).await;
            let (share, path) = &key;
            let unneeded = {
                let mut held = lock(&me.held);
                let needs = lock(&me.asked).remove(&key).map(|a| a.needs).unwrap_or_default();
                match reply {
                    Ok(row) if needs.is_empty() => Some(row.token),
                    Ok(row) => {
                        tracing::info!(partner = %me.remote.partner(), %share, %path, token = row.token, "lease taken (asked at create)");
                        held.insert(key.clone(), Held { row, needs });
                        None
                    }
                    Err(e) => {
                        tracing::warn!(partner = %me.remote.partner(), %share, %path, "no lease for a file created ahead of its LOCK: {e}; if another node writes the name, this node's change goes back as a conflict copy");
                        None
                    }
                }
            };
            // Everything that needed it ended before the answer came.
            if let Some(token) = unneeded {
                me.unlock(share, path, token).await;
            }
            drop(answer);
        })
    }

    /// Wait until a LOCK asked for `path` without waiting is answered (at
    /// once if none is in flight).
    pub async fn answered(&self, share: &Name, path: &SharePath) {
        let asked = lock(&self.asked).get(&(share.clone(), path.clone())).map(|a| a.answered.clone());
        if let Some(mut answered) = asked {
            // Err once the sender is dropped: the answer is in.
            while answered.changed().await.is_ok() {}
        }
    }

    /// Add `need` to the lease this node holds or asked for on `path`,
    /// without asking the partner. False when neither.
    pub fn extend(&self, share: &Name, path: &SharePath, need: Need) -> bool {
        let mut held = lock(&self.held);
        add_to(&mut held, &mut lock(&self.asked), &(share.clone(), path.clone()), need).is_ok()
    }

    /// Whether `need` already holds (or asked for) the lease on `path`.
    pub fn holds(&self, share: &Name, path: &SharePath, need: &Need) -> bool {
        let key = (share.clone(), path.clone());
        let held = lock(&self.held);
        held.get(&key).is_some_and(|h| h.needs.contains(need)) || lock(&self.asked).get(&key).is_some_and(|a| a.needs.contains(need))
    }

    /// The token of a lease this node holds that covers `path` (the path
    /// itself, or the file it is saved beside: `x.blend` for `x.blend@`).
    pub fn token(&self, share: &Name, path: &SharePath) -> Option<u64> {
        let held = lock(&self.held);
        crate::lease::covering_names(path).into_iter().find_map(|p| held.get(&(share.clone(), p)).map(|h| h.row.token))
    }

    /// `need` no longer needs the lease on `path`; released if nothing else
    /// does (a lease still asked for: once the partner has answered).
    pub fn done(self: &Arc<Self>, share: &Name, path: &SharePath, need: &Need) {
        let release = {
            let mut held = lock(&self.held);
            let key = (share.clone(), path.clone());
            match held.get_mut(&key) {
                Some(h) => {
                    h.needs.retain(|n| n != need);
                    if h.needs.is_empty() {
                        held.remove(&key).map(|h| h.row.token)
                    } else {
                        None
                    }
                }
                None => {
                    if let Some(a) = lock(&self.asked).get_mut(&key) {
                        a.needs.retain(|n| n != need);
                    }
                    None
                }
            }
        };
        if let Some(token) = release {
            let (me, share, path) = (self.clone(), share.clone(), path.clone());
            self.rt.spawn(async move {
                let req = Request::Unlock { share: share.clone(), path: path.clone(), token };
                if me.remote.send_later(req).await {
                    tracing::info!(partner = %me.remote.partner(), %share, %path, "lease released");
                } else {
                    tracing::debug!(partner = %me.remote.partner(), %share, %path, "lease not released: no connection (it expires by itself)");
                }
            });
        }
    }

    /// Release a lease whatever needs it (`deftfs unlock`). False if not held.
    pub async fn release(&self, share: &Name, path: &SharePath) -> bool {
        self.answered(share, path).await;
        let removed = lock(&self.held).remove(&(share.clone(), path.clone()));
        match removed {
            Some(h) => {
                self.unlock(share, path, h.row.token).await;
                true
            }
            None => false,
        }
    }

    async fn unlock(&self, share: &Name, path: &SharePath, token: u64) {
        match self.remote.unlock(share, path, token).await {
            Ok(()) => tracing::info!(partner = %self.remote.partner(), %share, %path, "lease released"),
            Err(e) => tracing::debug!(partner = %self.remote.partner(), %share, %path, "releasing lease: {e} (it expires by itself)"),
        }
    }

    /// Drop ended needs, release unneeded leases, renew the rest.
    pub async fn tick(&self) {
        let now = Instant::now();
        let (release, renew): (Vec<_>, Vec<_>) = {
            let mut held = lock(&self.held);
            for h in held.values_mut() {
                h.needs.retain(|n| n.alive(now));
            }
            let release: Vec<(Name, SharePath, u64)> =
                held.iter().filter(|(_, h)| h.needs.is_empty()).map(|((s, p), h)| (s.clone(), p.clone(), h.row.token)).collect();
            for (s, p, _) in &release {
                held.remove(&(s.clone(), p.clone()));
            }
            (release, held.iter().map(|((s, p), h)| (s.clone(), p.clone(), h.row.token)).collect())
        };
        for (share, path, token) in release {
            self.unlock(&share, &path, token).await;
        }
        for (share, path, token) in renew {
            let req = Request::Renew { share: share.clone(), path: path.clone(), token, ttl_s: self.ttl_s };
            match self.remote.call_lock(req).await {
                Ok(row) => {
                    if let Some(h) = lock(&self.held).get_mut(&(share.clone(), path.clone())).filter(|h| h.row.token == token) {
                        h.row = row;
                    }
                }
                Err(RemoteError::Offline { .. }) => {
                    tracing::debug!(%share, %path, "cannot renew lease: partner offline");
                }
                Err(e) => {
                    // Released while the renewals went out (its last need
                    // ended): nothing was lost. Taken again since: that
                    // grant is another.
                    let mut held = lock(&self.held);
                    let key = (share, path);
                    if held.get(&key).is_some_and(|h| h.row.token == token) {
                        held.remove(&key);
                        let (share, path) = key;
                        tracing::warn!(partner = %self.remote.partner(), %share, %path, "lease lost: {e}; changes made now go back as conflict copies");
                    }
                }
            }
        }
    }

    /// Renew every ttl/3 until the task is aborted.
    pub fn start(self: &Arc<Self>) -> tokio::task::AbortHandle {
        let me = self.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(me.ttl_s as f64 / 3.0);
            loop {
                tokio::time::sleep(period.min(Duration::from_secs(2))).await;
                // Needs are checked at least every 2 s, so a process exit
                // frees the file soon; renewals go out as often.
                me.tick().await;
            }
        })
        .abort_handle()
    }

    /// Leases this node holds through this mount.
    pub fn mine(&self) -> Vec<LeaseInfo> {
        lock(&self.held)
            .iter()
            .map(|((s, p), h)| LeaseInfo {
                share: s.to_string(),
                path: p.to_string(),
                holder: h.row.holder.to_string(),
                owner: h.row.owner.to_string(),
                token: h.row.token,
                since_ns: h.row.since_ns,
                expires_ns: h.row.expires_ns,
                mine: true,
            })
            .collect()
    }

    /// Release everything (unmount).
    pub async fn release_all(&self) {
        let all: Vec<((Name, SharePath), Held)> = lock(&self.held).drain().collect();
        for ((s, p), h) in all {
            self.unlock(&s, &p, h.row.token).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_named() {
        let pid = std::process::id() as i32;
        let start = process_start(pid).expect("own start time");
        assert!(Need::Process { pid, start }.alive(Instant::now()));
        assert!(!Need::Process { pid, start: start + 1 }.alive(Instant::now()), "a reused pid is another process");
        assert!(!process_name(pid).is_empty());
        assert_eq!(process_of(pid as u32), pid);
    }
}
