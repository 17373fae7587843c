//! The whole daemon (`deftfs daemon`, `deftfs-mountd`): serves this node's
//! shares to partners, holds the mounts of partners' shares, and answers
//! the control API. When `shutdown` resolves, every mount is unmounted
//! before the process returns, so no stale mount is left behind.

use crate::mount::Mounts;
use crate::node::{self, Node};
use std::future::Future;
use std::sync::Arc;

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
