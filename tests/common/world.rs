//! A serving node and its clients, each with a daemon and a mount: the
//! world the write and application tests run in. Bob serves `files` to
//! every client; each client mounts it. Every mount is detached on drop
//! ([`MountGuard`]).

use super::*;
use std::path::{Path, PathBuf};

/// One client node with its daemon and mount of bob:files.
pub struct Client {
    pub guard: Option<MountGuard>,
    pub daemon: Option<Daemon>,
    pub node: TestNode,
    pub mnt: PathBuf,
}

impl Client {
    pub fn mount(&mut self) {
        self.guard = Some(mount_at(&self.node, "bob:files", &self.mnt, &[]));
    }

    pub fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default()
    }

    /// Wait until this client's pushes are all in: a close returns before
    /// its push ends (write-behind, docs/SEMANTICS.md).
    pub fn settle(&self) {
        settle(&self.node);
    }
}

/// Bob serves `files` (read-write) to the clients; fields drop in order:
/// clients (mounts, then daemons), bob's daemon, directories.
pub struct World {
    pub clients: Vec<Client>,
    pub bob_daemon: Option<Daemon>,
    pub bob: TestNode,
    pub files: PathBuf,
    pub root: TempDir,
}

impl World {
    /// `names`: the client nodes; `config`: extra lines for their config.toml.
    pub fn new(tag: &str, names: &[&str], config: &str, prepare: impl FnOnce(&Path)) -> World {
        World::granting("read-write", tag, names, config, prepare)
    }

    /// Like [`World::new`], with `access` granted to every client.
    pub fn granting(access: &str, tag: &str, names: &[&str], config: &str, prepare: impl FnOnce(&Path)) -> World {
        World::granting_with_env(access, tag, names, config, &[], prepare)
    }

    /// Like [`World::granting`], the clients' daemons started with `env`.
    pub fn granting_with_env(
        access: &str,
        tag: &str,
        names: &[&str],
        config: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> World {
        let root = TempDir::new(tag);
        let bob = TestNode::init(root.path(), "bob");
        let files = root.path().join("bob-files");
        std::fs::create_dir_all(&files).unwrap();
        prepare(&files);
        let mut clients = Vec::new();
        let mut share = vec!["share".to_string(), "add".into(), "files".into(), files.display().to_string()];
        for name in names {
            let node = TestNode::init(root.path(), name);
            node.trust(&bob);
            bob.trust(&node);
            if !config.is_empty() {
                let path = node.home.join("config.toml");
                let mut text = std::fs::read_to_string(&path).unwrap();
                text.push_str(config);
                std::fs::write(&path, text).unwrap();
            }
            share.extend(["--partner".into(), name.to_string(), "--access".into(), access.to_string()]);
            let mnt = root.path().join(format!("mnt-{name}"));
            clients.push(Client { guard: None, daemon: None, node, mnt });
        }
        let args: Vec<&str> = share.iter().map(String::as_str).collect();
        bob.ok(&args);
        let bob_daemon = Some(bob.start());
        for c in &mut clients {
            c.daemon = Some(Daemon::start_with(&c.node.home, env));
            c.mount();
        }
        World { clients, bob_daemon, bob, files, root }
    }

    pub fn c(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    pub fn server(&self, rel: &str) -> PathBuf {
        self.files.join(rel)
    }
}
