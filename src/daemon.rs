//! The whole daemon (`deftfs daemon`, `deftfs-mountd`): serves this node's
//! shares to partners, holds the mounts of partners' shares, and answers
//! the control API. When `shutdown` resolves, every mount is unmounted
//! before the process returns, so no stale mount is left behind.

use crate::mount::Mounts;
use crate::node::{self, Node};
use std::future::Future;
use std::sync::Arc;

/// Cap glibc's malloc at two arenas, before any thread starts. By default
/// each thread that allocates (tokio workers, the blocking pool, the FUSE
/// threads) may get an arena of its own, up to eight per core, and the
/// chunk buffers of up to 1 MiB freed in one arena stay there for reuse:
/// after a cold read of 1 GiB through a mount, mountd held 180 to 223 MiB
/// (the target is 200 MiB), and 119 to 124 MiB with two arenas, reading as
/// fast (docs/PERFORMANCE.md, "the mount bench after the merges"). A lower
/// mmap threshold held 75 MiB but read a third slower: fresh pages cost
/// much on this VM. `MALLOC_ARENA_MAX` or an `arena_max` in
/// `GLIBC_TUNABLES` set by the user wins.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tunables.contains("arena_max") {
            // SAFETY: mallopt only sets an allocator parameter; it is
            // called at start, before the process makes other threads.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
    }
}

/// Run until `shutdown`. `ready`, if given, receives the mounts once the
/// node listens and the control API answers.
pub async fn run(
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Arc<Mounts>>>,
) -> anyhow::Result<()> {
    let listener = crate::api::bind(&node.home)?;
    node.receipts.in_background();
    let mounts = Arc::new(Mounts::new(node.clone())?);
    let api = tokio::spawn(crate::api::serve(listener, mounts.clone()));
    let (listening_tx, listening_rx) = tokio::sync::oneshot::channel();
    if let Some(ready) = ready {
        let mounts = mounts.clone();
        tokio::spawn(async move {
            if listening_rx.await.is_ok() {
                let _ = ready.send(mounts);
            }
        });
    }
    let served = node::run(node.clone(), shutdown, Some(listening_tx)).await;
    mounts.unmount_all().await;
    mounts.writeback.close().await;
    node.receipts.drain();
    api.abort();
    let _ = std::fs::remove_file(crate::api::socket_path(&node.home));
    tracing::info!("stopped");
    served.map_err(Into::into)
}
