//! `deftfs-mountd`: the node daemon. Serves this node's shares to partners
//! and holds the mounts of partners' shares until SIGTERM or SIGINT, then
//! unmounts everything and closes connections cleanly.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "deftfs-mountd", version, about = "The deftfs node daemon")]
struct Args {
    /// Node home directory (default: $XDG_DATA_HOME/deftfs or ~/.local/share/deftfs).
    #[arg(long, env = "DEFTFS_HOME")]
    home: Option<PathBuf>,
}

fn main() -> Result<()> {
    deftfs::daemon::limit_malloc_arenas();
    let args = Args::parse();
    deftfs::cli::init_logging("info");
    let home = args.home.unwrap_or_else(deftfs::config::default_home);
    let node = deftfs::node::Node::open(&home)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(deftfs::daemon::run(node, deftfs::cli::shutdown_signal(), None))
}
