//! The daemon's control API: one JSON object per line over the unix socket
//! `<home>/control.sock` (mode 0600), request then response, as many as the
//! client likes on one connection. docs/ARCHITECTURE.md lists the calls.
//!
//! Only the user the daemon runs as (and root) may talk to it: the socket's
//! mode keeps others out, and every connection's peer credentials
//! (SO_PEERCRED) are checked again, so a socket made reachable by a
//! permissive directory still refuses them.

use crate::mount::{MountOptions, MountSpec, Mounts};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("control.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    Mounts,
    Mount { spec: String, mountpoint: PathBuf, options: MountOptions },
    Unmount { mountpoint: PathBuf },
    Pin { path: PathBuf },
    Unpin { path: PathBuf },
    Status { path: PathBuf },
    Cache { clear: bool },
    Lock { path: PathBuf, ttl_secs: Option<u64> },
    Unlock { path: PathBuf },
    Locks { partner: Option<String> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub result: serde_json::Value,
}

fn ok(v: impl Serialize) -> Answer {
    match serde_json::to_value(v) {
        Ok(result) => Answer { ok: true, error: None, result },
        Err(e) => fail(e),
    }
}

fn fail(e: impl std::fmt::Display) -> Answer {
    Answer { ok: false, error: Some(e.to_string()), result: serde_json::Value::Null }
}

async fn answer(mounts: &Mounts, call: Call) -> Answer {
    match call {
        Call::Mounts => ok(mounts.list()),
        Call::Mount { spec, mountpoint, options } => match spec.parse::<MountSpec>() {
            Ok(spec) => mounts.mount(spec, &mountpoint, options).await.map_or_else(fail, ok),
            Err(e) => fail(e),
        },
        Call::Unmount { mountpoint } => mounts.unmount(&mountpoint).await.map_or_else(fail, ok),
        Call::Pin { path } => {
            mounts.pin(&path).await.map_or_else(fail, |(files, bytes)| ok(serde_json::json!({"files": files, "bytes": bytes})))
        }
        Call::Unpin { path } => mounts.unpin(&path).await.map_or_else(fail, |files| ok(serde_json::json!({"files": files}))),
        Call::Status { path } => mounts.status(&path).await.map_or_else(fail, ok),
        Call::Lock { path, ttl_secs } => mounts
            .lock(&path, ttl_secs.map(std::time::Duration::from_secs))
            .await
            .map_or_else(fail, |token| ok(serde_json::json!({"token": token}))),
        Call::Unlock { path } => mounts.unlock(&path).await.map_or_else(fail, |held| ok(serde_json::json!({"released": held}))),
        Call::Locks { partner } => ok(mounts
            .locks(partner.as_deref())
            .await
            .into_iter()
            .map(|(mp, l)| serde_json::json!({"mountpoint": mp, "lease": l}))
            .collect::<Vec<_>>()),
        Call::Cache { clear } => ok(mounts
            .cache(clear)
            .into_iter()
            .map(|(mp, stats, freed)| serde_json::json!({"mountpoint": mp, "cache": stats, "freed_bytes": freed}))
            .collect::<Vec<_>>()),
    }
}

/// Bind the control socket. Refuses if a live daemon already answers on
/// it; replaces a socket file left by a dead one.
pub fn bind(home: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let path = socket_path(home);
    if path.exists() {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(&path) {
            // A daemon killed while a thread of it was stuck on one of its
            // mounts stays half-exited (a zombie holding its sockets) until
            // that mount's connection is aborted: free it, then go on.
            let dying = peer_pid(&stream).filter(|&pid| !crate::mount::process_alive(pid));
            drop(stream);
            let Some(pid) = dying else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another deftfs daemon already runs for {} (its control socket {} answers)", home.display(), path.display()),
                ));
            };
            tracing::warn!(pid, "the daemon that had the control socket died without exiting: ending its mounts");
            crate::mount::end_mounts_of_dead_daemon(pid);
            let gone = (0..200).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                std::os::unix::net::UnixStream::connect(&path).is_err()
            });
            if !gone {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "the daemon that ran for {} (pid {pid}) died but still holds its control socket {}; see `cat /proc/{pid}/task/*/stack`",
                        home.display(),
                        path.display()
                    ),
                ));
            }
        }
        std::fs::remove_file(&path)?;
    }
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(&path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The pid of the process that made the socket at the other end of `stream`.
fn peer_pid(stream: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, for
    // the duration of the call, on an open descriptor of ours.
    let r = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Serve the control API until the listener fails.
pub async fn serve(listener: tokio::net::UnixListener, mounts: Arc<Mounts>) {
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if uid != Some(me) && uid != Some(0) {
            tracing::warn!(target: "audit", ?uid, "control connection refused: not this daemon's user");
            continue;
        }
        let mounts = mounts.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read);
            let mut line = String::new();
            loop {
                line.clear();
                match AsyncReadExt::take(&mut lines, MAX_REQUEST as u64 + 1).read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let reply = if line.len() > MAX_REQUEST {
                    fail(format!("request longer than {MAX_REQUEST} bytes"))
                } else {
                    match serde_json::from_str::<Call>(line.trim_end()) {
                        Ok(call) => answer(&mounts, call).await,
                        Err(e) => fail(format!("bad request: {e}")),
                    }
                };
                let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The CLI's side: one call, blocking.
pub fn call(home: &Path, call: &Call) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(home);
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "no deftfs daemon answers on {} ({e}): start it with `deftfs --home {} daemon` (or deftfs-mountd)",
            path.display(),
            home.display()
        )
    })?;
    let mut text = serde_json::to_string(call)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        anyhow::bail!("the daemon closed the control connection without answering (see its log)");
    }
    let answer: Answer = serde_json::from_str(&reply)?;
    if !answer.ok {
        anyhow::bail!("{}", answer.error.unwrap_or_else(|| "the daemon refused without a reason".into()));
    }
    Ok(answer.result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_a_control_socket_is_the_process_that_bound_it() {
        let dir = crate::testutil::TestDir::new("api-peer");
        let path = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert_eq!(peer_pid(&stream), Some(std::process::id()));
    }
}
