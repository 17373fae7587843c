//! The `deftfs` command line: argument definitions and one function per
//! command. `main.rs` only parses and calls [`run`].

use crate::config::{self, Config, ConfigEditor, PartnerConfig, ShareConfig};
use crate::identity::{self, Fingerprint, Identity};
use crate::node::Node;
use crate::proto::{Access, Name, SharePath};
use crate::receipt::Receipt;
use crate::transfer::client::Session;
use crate::transfer::{Progress, Report};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(name = "deftfs", version, about = "Mount what a partner shares like a local drive; move files with proof.")]
pub struct Cli {
    /// Node home directory (default: $XDG_DATA_HOME/deftfs or ~/.local/share/deftfs).
    #[arg(long, global = true, env = "DEFTFS_HOME")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Two throwaway nodes on this machine: a partner shares sample files and you get them mounted, read on demand.
    Demo {
        /// Where to put the demo nodes (default: a new temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run the scenario, unmount and stop, instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Create a new node: key pair, certificate, config.toml.
    Init {
        #[arg(long)]
        name: String,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7741")]
        listen: SocketAddr,
    },
    /// Print this node's name, certificate fingerprint, certificate path and listen address.
    Id,
    /// Manage partners (other nodes this node trusts).
    #[command(subcommand)]
    Partner(PartnerCmd),
    /// Manage shares (what this node offers to partners).
    #[command(subcommand)]
    Share(ShareCmd),
    /// Run the node in the foreground (same as deftfs-mountd).
    Daemon,
    /// List the shares a partner grants us, or the entries of one of them (SHARE or SHARE/PATH).
    Ls { partner: String, share: Option<String> },
    /// Push a local file into a partner's share.
    Send {
        partner: String,
        share: String,
        file: PathBuf,
        /// Path inside the share (default: the file's name).
        #[arg(long = "as")]
        as_path: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Pull a file from a partner's share.
    Receive {
        partner: String,
        share: String,
        /// PATH inside the share, then OUT; or only OUT for a single-file share.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Past transfers, both directions, most recent first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Work with signed receipts.
    #[command(subcommand)]
    Receipt(ReceiptCmd),
    /// Mount a partner's shares (PARTNER) or one of them (PARTNER:SHARE) on MOUNTPOINT, through the local daemon.
    Mount {
        target: String,
        mountpoint: PathBuf,
        /// Bound of this mount's chunk cache, e.g. 64M or 10G (default: [mount] cache_size, 10G).
        #[arg(long)]
        cache_size: Option<String>,
        /// Mount read-only even where the partner grants `write` (changes get EROFS).
        #[arg(long)]
        read_only: bool,
        /// Seconds an uncached read waits for an unreachable partner before EIO (default: [mount] offline_wait_secs, 10).
        #[arg(long)]
        offline_wait: Option<u64>,
    },
    /// Unmount a deftfs mount.
    Unmount { mountpoint: PathBuf },
    /// The active mounts, with state and cache use.
    Mounts {
        #[arg(long)]
        json: bool,
    },
    /// Fetch a file or directory inside a mount now, and never evict it.
    Pin { path: PathBuf },
    /// Let pinned content be evicted again.
    Unpin { path: PathBuf },
    /// How much of a file (or directory) inside a mount is local.
    Status {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The mounts' chunk caches: size, limit, hit rate; `cache clear` evicts what may be evicted.
    Cache {
        #[arg(value_parser = ["clear"])]
        action: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lease a file inside a mount by hand: other nodes can read it but not change it, until `deftfs unlock` (or --ttl).
    Lock {
        path: PathBuf,
        /// Seconds until the lease ends by itself (default: until unlock).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Release a lease taken with `deftfs lock` (or any lease this node holds on the file).
    Unlock { path: PathBuf },
    /// Leases on the mounted shares: holder node, process, since, expiry.
    Locks {
        partner: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print one JSON object describing the transfer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PartnerCmd {
    /// Trust a partner, pinned by certificate fingerprint or file.
    Add {
        name: String,
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        fingerprint: Option<String>,
        #[arg(long)]
        cert: Option<PathBuf>,
        /// HOST:PORT where the partner listens (repeatable).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum ShareCmd {
    /// Offer PATH (a file, a directory or a glob) as NAME; pair each --partner with an --access.
    Add {
        name: String,
        path: PathBuf,
        #[arg(long = "partner", required = true)]
        partners: Vec<String>,
        /// read (the partner may pull), write (may push) or read-write.
        #[arg(long = "access", required = true)]
        access: Vec<String>,
        /// A file-name glob opened files of which are leased (repeatable; `default` adds the built-in list: *.blend, *.psd, *.docx, ...).
        #[arg(long = "lockable")]
        lockable: Vec<String>,
        /// Nothing in this share is lockable.
        #[arg(long, conflicts_with = "lockable")]
        no_lockable: bool,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCmd {
    /// Check a receipt's signature and print what it proves.
    Verify {
        file: PathBuf,
        /// The signer's certificate, to check the receipt was signed by it.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

/// Run a parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let home = cli.home.clone().unwrap_or_else(config::default_home);
    match cli.command {
        Command::Demo { dir, exit } => demo(dir, exit),
        Command::Init { name, listen } => init(&home, &name, listen),
        Command::Id => id(&home),
        Command::Partner(PartnerCmd::Add { name, fingerprint, cert, endpoints }) => partner_add(&home, &name, fingerprint, cert, endpoints),
        Command::Partner(PartnerCmd::List) => partner_list(&home),
        Command::Share(ShareCmd::Add { name, path, partners, access, lockable, no_lockable }) => {
            share_add(&home, &name, &path, &partners, &access, &lockable, no_lockable)
        }
        Command::Share(ShareCmd::List) => share_list(&home),
        Command::Daemon => daemon(&home),
        Command::Ls { partner, share } => runtime()?.block_on(ls(&home, &partner, share.as_deref())),
        Command::Send { partner, share, file, as_path, out } => {
            runtime()?.block_on(send(&home, &partner, &share, &file, as_path.as_deref(), out.json))
        }
        Command::Receive { partner, share, args, out } => {
            let (path, dest) = match args.as_slice() {
                [dest] => (None, dest),
                [path, dest] => (Some(path.as_str()), dest),
                _ => bail!("usage: deftfs receive PARTNER SHARE [PATH-IN-SHARE] OUT"),
            };
            runtime()?.block_on(receive(&home, &partner, &share, path, Path::new(dest), out.json))
        }
        Command::History { limit, json } => history(&home, limit, json),
        Command::Receipt(ReceiptCmd::Verify { file, cert }) => receipt_verify(&file, cert.as_deref()),
        Command::Mount { target, mountpoint, cache_size, read_only, offline_wait } => {
            mount(&home, &target, &mountpoint, cache_size.as_deref(), read_only, offline_wait)
        }
        Command::Unmount { mountpoint } => unmount(&home, &mountpoint),
        Command::Mounts { json } => mounts(&home, json),
        Command::Pin { path } => pin(&home, &path, true),
        Command::Unpin { path } => pin(&home, &path, false),
        Command::Status { path, json } => status(&home, &path, json),
        Command::Cache { action, json } => cache(&home, action.is_some(), json),
        Command::Lock { path, ttl } => lock_file(&home, &path, ttl),
        Command::Unlock { path } => unlock_file(&home, &path),
        Command::Locks { partner, json } => locks(&home, partner, json),
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

fn mount(home: &Path, target: &str, mountpoint: &Path, cache_size: Option<&str>, read_only: bool, offline_wait: Option<u64>) -> Result<()> {
    let spec: crate::mount::MountSpec = target.parse()?;
    let cache_size = cache_size.map(|s| config::parse_size(s).map_err(|e| anyhow!("--cache-size: {e}"))).transpose()?;
    if let Some(w) = offline_wait {
        if w == 0 || w > 3600 {
            bail!("--offline-wait {w}: must be between 1 and 3600 seconds");
        }
    }
    let options = crate::mount::MountOptions { cache_size, read_only, offline_wait_secs: offline_wait };
    let call = crate::api::Call::Mount { spec: spec.to_string(), mountpoint: absolute(mountpoint)?, options };
    let info: crate::mount::MountInfo = serde_json::from_value(crate::api::call(home, &call)?)?;
    println!(
        "mounted {} on {} ({}, cache limit {})",
        info.spec,
        info.mountpoint.display(),
        if info.read_only { "read-only" } else { "read-write" },
        human(info.cache.limit_bytes)
    );
    Ok(())
}

fn unmount(home: &Path, mountpoint: &Path) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    crate::api::call(home, &crate::api::Call::Unmount { mountpoint: mountpoint.clone() })?;
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

fn mounts(home: &Path, json: bool) -> Result<()> {
    let value = crate::api::call(home, &crate::api::Call::Mounts)?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let list: Vec<crate::mount::MountInfo> = serde_json::from_value(value)?;
    if list.is_empty() {
        println!("nothing mounted: mount a partner's share with `deftfs mount PARTNER[:SHARE] MOUNTPOINT`");
    }
    for m in list {
        println!(
            "{:<24} {:<8} {:<10} cache {} of {}  fetched {}  {}",
            m.spec,
            m.state,
            if m.read_only { "read-only" } else { "read-write" },
            human(m.cache.used_bytes),
            human(m.cache.limit_bytes),
            human(m.bytes_fetched),
            m.mountpoint.display()
        );
        if m.pending_writebacks > 0 {
            println!("{:<24} {} write-back(s) pending (see `deftfs status PATH`)", "", m.pending_writebacks);
        }
    }
    Ok(())
}

fn pin(home: &Path, path: &Path, on: bool) -> Result<()> {
    let path = absolute(path)?;
    if on {
        let r = crate::api::call(home, &crate::api::Call::Pin { path: path.clone() })?;
        let (files, bytes) = (r["files"].as_u64().unwrap_or(0), r["bytes"].as_u64().unwrap_or(0));
        println!("pinned {}: {files} file(s), {} local and kept", path.display(), human(bytes));
    } else {
        let r = crate::api::call(home, &crate::api::Call::Unpin { path: path.clone() })?;
        println!("unpinned {}: {} file(s) may be evicted again", path.display(), r["files"].as_u64().unwrap_or(0));
    }
    Ok(())
}

fn status(home: &Path, path: &Path, json: bool) -> Result<()> {
    let path = absolute(path)?;
    let value = crate::api::call(home, &crate::api::Call::Status { path: path.clone() })?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let st: crate::mount::vfs::FileStatus = serde_json::from_value(value)?;
    let pct = if st.size == 0 { 100.0 } else { st.local_bytes as f64 * 100.0 / st.size as f64 };
    let chunks = if st.written_here { "written here".to_string() } else { format!("{} chunks", st.chunks) };
    println!(
        "{}: {} {}, {} local ({pct:.0}%), {chunks}{}",
        path.display(),
        st.kind,
        human(st.size),
        human(st.local_bytes),
        if st.pinned { ", pinned" } else { "" }
    );
    for p in &st.pending_writebacks {
        println!("  write-back pending: {p}");
    }
    for c in &st.conflicts {
        println!("  conflict copy: {c}");
    }
    Ok(())
}

fn lock_file(home: &Path, path: &Path, ttl: Option<u64>) -> Result<()> {
    let path = absolute(path)?;
    if ttl == Some(0) {
        bail!("--ttl 0: give a number of seconds, or leave --ttl out to hold the lease until `deftfs unlock`");
    }
    let r = crate::api::call(home, &crate::api::Call::Lock { path: path.clone(), ttl_secs: ttl })?;
    let until = ttl.map(|t| format!(" for {t} s")).unwrap_or_else(|| " until `deftfs unlock`".into());
    println!("locked {}{until} (token {})", path.display(), r["token"].as_u64().unwrap_or(0));
    Ok(())
}

fn unlock_file(home: &Path, path: &Path) -> Result<()> {
    let path = absolute(path)?;
    let r = crate::api::call(home, &crate::api::Call::Unlock { path: path.clone() })?;
    if r["released"].as_bool().unwrap_or(false) {
        println!("unlocked {}", path.display());
    } else {
        println!("{}: this node held no lease on it", path.display());
    }
    Ok(())
}

fn locks(home: &Path, partner: Option<String>, json: bool) -> Result<()> {
    let value = crate::api::call(home, &crate::api::Call::Locks { partner })?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let rows = value.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no leases on the mounted shares");
    }
    for row in rows {
        let l: crate::mount::leases::LeaseInfo = serde_json::from_value(row["lease"].clone())?;
        let mp = row["mountpoint"].as_str().unwrap_or("?");
        println!(
            "{mp}/{}: held by {}{} ({}) since {}, expires {}",
            l.path,
            l.holder,
            if l.mine { " (this node)" } else { "" },
            l.owner,
            crate::time::Timestamp(l.since_ns).rfc3339(),
            crate::time::Timestamp(l.expires_ns).rfc3339()
        );
    }
    Ok(())
}

fn cache(home: &Path, clear: bool, json: bool) -> Result<()> {
    let value = crate::api::call(home, &crate::api::Call::Cache { clear })?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let rows = value.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no mounts, no cache in use");
    }
    for row in rows {
        let stats: crate::store::CacheStats = serde_json::from_value(row["cache"].clone())?;
        let looked = stats.hits + stats.misses;
        let rate = if looked == 0 { "no reads yet".to_string() } else { format!("{:.1}% hits", stats.hits as f64 * 100.0 / looked as f64) };
        print!(
            "{}: {} of {} ({} chunks, {} pinned), {rate}",
            row["mountpoint"].as_str().unwrap_or("?"),
            human(stats.used_bytes),
            human(stats.limit_bytes),
            stats.chunks,
            human(stats.pinned_bytes)
        );
        if stats.flat_bytes > 0 {
            print!(", whole copies {}", human(stats.flat_bytes));
        }
        if clear {
            print!(", freed {}", human(row["freed_bytes"].as_u64().unwrap_or(0)));
        }
        println!();
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Logs to stderr; `DEFTFS_LOG` filters (default `info` for the daemon,
/// `warn` for commands).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEFTFS_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn init(home: &Path, name: &str, listen: SocketAddr) -> Result<()> {
    let name = Name::new(name).map_err(|e| anyhow!("--name: {e}"))?;
    let config_path = config::config_path(home);
    if config_path.exists() || Identity::cert_path(home).exists() {
        bail!("a deftfs node already exists in {}: refusing to overwrite it (use another --home)", home.display());
    }
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let identity = Identity::generate(name.as_str())?;
    let location = identity.save(home)?;
    let text = Config::initial_text(&name, listen);
    Config::parse(&text, &config_path).context("the generated config does not parse (a bug)")?;
    write_new(&config_path, &text)?;
    println!("created node {name} in {}", home.display());
    println!("fingerprint  {}", identity.fingerprint());
    println!("certificate  {}", Identity::cert_path(home).display());
    match location {
        identity::KeyLocation::File(p) => println!("private key  {} (file, mode 0600; no OS keyring is used)", p.display()),
    }
    println!("listen       {listen}");
    println!("next: give your fingerprint to a partner, then `deftfs partner add` theirs");
    Ok(())
}

fn demo(dir: Option<PathBuf>, exit: bool) -> Result<()> {
    init_logging("warn");
    let root = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("deftfs-demo-{}", std::process::id())));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let root = std::fs::canonicalize(&root)?;
    let (partner_home, you_home) = (root.join("partner"), root.join("you"));
    let free = || -> Result<SocketAddr> { Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?) };
    let (partner_addr, you_addr) = (free()?, free()?);
    println!("== two nodes in {}", root.display());
    init(&partner_home, "partner", partner_addr)?;
    init(&you_home, "you", you_addr)?;
    let fp = |home: &Path| -> Result<String> { Ok(Identity::load(home)?.fingerprint().to_string()) };
    partner_add(&you_home, "partner", Some(fp(&partner_home)?), None, vec![partner_addr.to_string()])?;
    partner_add(&partner_home, "you", Some(fp(&you_home)?), None, vec![you_addr.to_string()])?;
    let samples = root.join("partner-files");
    let inbox = root.join("partner-inbox");
    println!("\n== sample files for the partner to share: {}", samples.display());
    write_samples(&samples)?;
    std::fs::create_dir_all(&inbox)?;
    share_add(&partner_home, "samples", &samples, &["you".into()], &["read".into()], &[], false)?;
    share_add(&partner_home, "inbox", &inbox, &["you".into()], &["write".into()], &[], false)?;
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt)?;

    runtime()?.block_on(async {
        let (stop_partner, partner_stop) = tokio::sync::oneshot::channel::<()>();
        let (stop_you, you_stop) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let partner = tokio::spawn(crate::daemon::run(
            Node::open(&partner_home)?,
            async move {
                let _ = partner_stop.await;
            },
            Some(ready_tx),
        ));
        ready_rx.await.map_err(|_| anyhow!("the partner daemon did not start (see above)"))?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let you = tokio::spawn(crate::daemon::run(
            Node::open(&you_home)?,
            async move {
                let _ = you_stop.await;
            },
            Some(ready_tx),
        ));
        let mounts = ready_rx.await.map_err(|_| anyhow!("your daemon did not start (see above)"))?;
        let result = demo_scenario(&root, &you_home, &partner_home, &mnt, &mounts).await;
        if result.is_ok() && !exit {
            println!("\nBoth daemons run until Ctrl-C; then the mount is unmounted and they stop.");
            shutdown_signal().await;
            println!();
        }
        // Yours first (it unmounts), then the partner's.
        let _ = stop_you.send(());
        you.await.map_err(|e| anyhow!("your daemon: {e}"))??;
        let _ = stop_partner.send(());
        partner.await.map_err(|e| anyhow!("partner daemon: {e}"))??;
        result?;
        println!("stopped and unmounted; the demo nodes stay in {}", root.display());
        Ok(())
    })
}

/// Small texts, a directory tree and three 100 MiB binaries.
fn write_samples(dir: &Path) -> Result<()> {
    for d in ["invoices", "projects/alpha/src", "projects/alpha/docs", "projects/beta", "media"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(
        dir.join("README.txt"),
        "Sample files shared by the demo partner node.\nEverything here is read on demand, chunk by chunk.\n",
    )?;
    std::fs::write(dir.join("invoices/2026-11.csv"), "id,customer,amount\n1,ACME,1200.00\n2,Globex,560.50\n")?;
    std::fs::write(dir.join("invoices/2026-12.csv"), "id,customer,amount\n3,Initech,99.90\n")?;
    std::fs::write(dir.join("projects/alpha/src/main.rs"), "fn main() {\n    println!(\"hello from alpha\");\n}\n")?;
    std::fs::write(dir.join("projects/alpha/docs/notes.md"), "# Alpha\n\nShip it on Friday.\n")?;
    std::fs::write(dir.join("projects/beta/TODO.txt"), "- render the final scene\n- send the invoice\n")?;
    for (i, name) in ["scene.bin", "render-01.bin", "render-02.bin"].iter().enumerate() {
        write_sample(&dir.join("media").join(name), 100 << 20, i as u64 + 1)?;
    }
    Ok(())
}

async fn demo_scenario(root: &Path, you_home: &Path, partner_home: &Path, mnt: &Path, mounts: &crate::mount::Mounts) -> Result<()> {
    println!("\n== deftfs mount partner:samples {}", mnt.display());
    let spec: crate::mount::MountSpec = "partner:samples".parse()?;
    let info = mounts.mount(spec, mnt, Default::default()).await?;
    println!("mounted {} on {} (read-only, cache limit {})", info.spec, info.mountpoint.display(), human(info.cache.limit_bytes));
    // The mount is served by this very process: touch it from a blocking
    // thread, as any other program would.
    let (m, started) = (mnt.to_path_buf(), std::time::Instant::now());
    let (listing, first_mib) = tokio::task::spawn_blocking(move || -> Result<(Vec<(String, u64)>, usize)> {
        let mut rows = Vec::new();
        for e in std::fs::read_dir(m.join("media"))? {
            let e = e?;
            rows.push((e.file_name().to_string_lossy().into_owned(), e.metadata()?.len()));
        }
        rows.sort();
        use std::io::Read;
        let mut buf = vec![0u8; 1 << 20];
        let n = std::fs::File::open(m.join("media/scene.bin"))?.read(&mut buf)?;
        Ok((rows, n))
    })
    .await??;
    println!("\n== ls -l {}/media (metadata only, nothing downloaded)", mnt.display());
    for (name, len) in listing {
        println!("{:>10}  {name}", human(len));
    }
    let fetched = mounts.list().first().map_or(0, |m| m.bytes_fetched);
    println!(
        "\n== read the first {} of media/scene.bin: {:.1} ms, {} fetched of 100 MiB",
        human(first_mib as u64),
        started.elapsed().as_secs_f64() * 1e3,
        human(fetched)
    );

    let you = Node::open(you_home)?;
    let mut session = Session::open(you, "partner").await?;
    let note = root.join("note.txt");
    std::fs::write(&note, "Order 4711 confirmed.\n")?;
    println!("\n== deftfs send partner inbox {}", note.display());
    let sent = session
        .push(&Name::new("inbox").map_err(|e| anyhow!("{e}"))?, &SharePath::parse("note.txt").map_err(|e| anyhow!("{e}"))?, &note, None)
        .await?;
    print_report(&sent, false)?;
    session.close().await;
    println!("\n== deftfs receipt verify {}", sent.receipt.display());
    receipt_verify(&sent.receipt, Some(&partner_home.join("cert.pem")))?;

    let (h, m) = (you_home.display(), mnt.display());
    println!("\nTry it yourself, in another terminal:");
    println!("  ls -lR {m}");
    println!("  sha256sum {m}/media/scene.bin          # fetched as it is read");
    println!("  deftfs --home {h} mounts");
    println!("  deftfs --home {h} status {m}/media/render-01.bin");
    println!("  deftfs --home {h} pin {m}/projects");
    println!("  deftfs --home {h} cache");
    println!("  echo more >> {}/README.txt             # a change the mount shows within a second", root.join("partner-files").display());
    println!("  deftfs --home {h} send partner inbox /etc/hostname");
    println!("  deftfs --home {h} history");
    Ok(())
}

/// Pseudo-random, incompressible sample content (xorshift), written streaming.
fn write_sample(path: &Path, len: usize, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut block = vec![0u8; 1 << 16];
    for _ in 0..len / block.len() {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn write_new(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn load(home: &Path) -> Result<(Config, Identity)> {
    let path = config::config_path(home);
    if !path.exists() {
        bail!("no deftfs node in {}: create one with `deftfs init --name NAME` (or pass --home)", home.display());
    }
    Ok((Config::load(&path)?, Identity::load(home)?))
}

fn id(home: &Path) -> Result<()> {
    let (config, identity) = load(home)?;
    println!("name         {}", config.node.name);
    println!("fingerprint  {}", identity.fingerprint());
    println!("certificate  {}", Identity::cert_path(home).display());
    println!("listen       {}", config.node.listen);
    Ok(())
}

fn partner_add(home: &Path, name: &str, fingerprint: Option<String>, cert: Option<PathBuf>, endpoints: Vec<String>) -> Result<()> {
    let id = Name::new(name).map_err(|e| anyhow!("partner name: {e}"))?;
    let mut fingerprints = Vec::new();
    let mut allowed_certs = Vec::new();
    if let Some(fp) = fingerprint {
        fingerprints.push(fp.parse::<Fingerprint>()?);
    }
    if let Some(cert) = cert {
        let der = identity::load_cert_file(&cert)?;
        let abs = std::fs::canonicalize(&cert).with_context(|| format!("resolving {}", cert.display()))?;
        println!("pinned {} from {}", Fingerprint::of_cert(&der), abs.display());
        allowed_certs.push(abs);
    }
    for e in &endpoints {
        if !e.contains(':') {
            bail!("--endpoint {e:?}: expected HOST:PORT, e.g. 192.0.2.7:{}", config::DEFAULT_PORT);
        }
    }
    let mut editor = ConfigEditor::open(&config::config_path(home))?;
    editor.add_partner(&PartnerConfig { id: id.clone(), fingerprints, allowed_certs, ca: None, endpoints })?;
    editor.save()?;
    println!("added partner {id}");
    Ok(())
}

fn partner_list(home: &Path) -> Result<()> {
    let (config, _) = load(home)?;
    if config.partners.is_empty() {
        println!("no partners yet: add one with `deftfs partner add NAME --fingerprint sha256:... --endpoint HOST:PORT`");
    }
    for p in &config.partners {
        let mut trust: Vec<String> = p.fingerprints.iter().map(|f| f.to_string()).collect();
        trust.extend(p.allowed_certs.iter().map(|c| format!("cert {}", c.display())));
        if let Some(ca) = &p.ca {
            trust.push(format!("ca {}", ca.display()));
        }
        println!("{}\t{}\t{}", p.id, if p.endpoints.is_empty() { "-".to_string() } else { p.endpoints.join(",") }, trust.join(" "));
    }
    Ok(())
}

fn share_add(
    home: &Path,
    name: &str,
    path: &Path,
    partners: &[String],
    access: &[String],
    lockable: &[String],
    no_lockable: bool,
) -> Result<()> {
    let lockable = if no_lockable {
        Vec::new()
    } else if lockable.is_empty() {
        config::default_lockable()
    } else {
        let mut out: Vec<String> = Vec::new();
        for p in lockable {
            let add = if p == "default" {
                config::default_lockable()
            } else {
                // check_lockable quotes the pattern in its message.
                config::check_lockable(p).map_err(|e| anyhow!("--lockable: {e}"))?;
                vec![p.clone()]
            };
            // `--lockable default --lockable '*.psd'` lists *.psd once.
            for p in add {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    };
    let name = Name::new(name).map_err(|e| anyhow!("share name: {e}"))?;
    if partners.len() != access.len() {
        bail!("give one --access for each --partner (got {} partners, {} access values)", partners.len(), access.len());
    }
    let mut grants = BTreeMap::new();
    for (p, a) in partners.iter().zip(access) {
        let p = Name::new(p.as_str()).map_err(|e| anyhow!("--partner: {e}"))?;
        let a: Access = a.parse().map_err(|e: String| anyhow!("--access: {e}"))?;
        grants.insert(p, a);
    }
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let last = abs.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !crate::glob::Glob::is_pattern(last) && !abs.exists() {
        bail!("{}: no such file or directory (a share is a file, a directory or a glob)", abs.display());
    }
    let mut editor = ConfigEditor::open(&config::config_path(home))?;
    editor.add_share(&ShareConfig { name: name.clone(), path: abs.clone(), access: grants, lockable })?;
    editor.save()?;
    println!("added share {name} -> {}", abs.display());
    Ok(())
}

fn share_list(home: &Path) -> Result<()> {
    let (config, _) = load(home)?;
    for s in &config.shares {
        let grants: Vec<String> = s.access.iter().map(|(p, a)| format!("{p}:{}", a.as_str())).collect();
        let lockable = if s.lockable.is_empty() { "-".to_string() } else { s.lockable.join(",") };
        println!("{}\t{}\t{}\tlockable:{lockable}", s.name, s.path.display(), grants.join(","));
    }
    Ok(())
}

fn daemon(home: &Path) -> Result<()> {
    init_logging("info");
    let node = Node::open(home)?;
    runtime()?.block_on(crate::daemon::run(node, shutdown_signal(), None))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn ls(home: &Path, partner: &str, what: Option<&str>) -> Result<()> {
    init_logging("warn");
    let node = Node::open(home)?;
    let mut session = Session::open(node, partner).await?;
    match what {
        None => {
            let rows = session.discover().await?;
            if rows.is_empty() {
                println!("{partner} grants you no shares");
            }
            for r in rows {
                let kind = if r.kind == crate::proto::EntryKind::Dir { "dir " } else { "file" };
                println!(
                    "{:<24} {kind} {:>14} {:<10} {}",
                    r.name,
                    human(r.size),
                    r.access.as_str(),
                    crate::time::Timestamp(r.mtime_ns).rfc3339()
                );
            }
        }
        Some(spec) => {
            let (share, path) = split_share(spec)?;
            for e in session.list(&share, &path).await? {
                let kind = if e.kind == crate::proto::EntryKind::Dir { "d" } else { "-" };
                println!("{kind} {:>14} {} {}", human(e.size), crate::time::Timestamp(e.mtime_ns).rfc3339(), e.path);
            }
        }
    }
    session.close().await;
    Ok(())
}

fn split_share(spec: &str) -> Result<(Name, SharePath)> {
    let (share, path) = spec.split_once('/').unwrap_or((spec, ""));
    Ok((Name::new(share).map_err(|e| anyhow!("share: {e}"))?, SharePath::parse(path).map_err(|e| anyhow!("path: {e}"))?))
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn progress_bar(json: bool) -> Option<(indicatif::ProgressBar, Progress)> {
    if json || !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let cb: Progress = Arc::new(move |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    Some((bar, cb))
}

fn print_report(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        let verb = if report.direction == "push" { "sent" } else { "received" };
        println!(
            "{verb} {} ({}, {} of {} chunks over the network, {}) in {:.2} s",
            report.path,
            human(report.bytes_total),
            report.chunks_sent,
            report.chunks_total,
            human(report.bytes_sent),
            report.duration_s
        );
        println!("hash     {}", report.file_hash);
        println!("receipt  {}", report.receipt.display());
    }
    Ok(())
}

async fn send(home: &Path, partner: &str, share: &str, file: &Path, as_path: Option<&str>, json: bool) -> Result<()> {
    init_logging("warn");
    let meta = std::fs::metadata(file).with_context(|| format!("{}", file.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", file.display());
    }
    let share = Name::new(share).map_err(|e| anyhow!("share: {e}"))?;
    let name = match as_path {
        Some(p) => p.to_string(),
        None => file.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("{}: file name is not UTF-8", file.display()))?.to_string(),
    };
    let node = Node::open(home)?;
    let mut session = Session::open(node, partner).await?;
    // A single-file share is addressed by its root path.
    let path = if session.discover().await?.iter().any(|r| r.name == share && r.kind == crate::proto::EntryKind::File) {
        SharePath::root()
    } else {
        SharePath::parse(&name).map_err(|e| anyhow!("path in share: {e}"))?
    };
    let bar = progress_bar(json);
    let report = session.push(&share, &path, file, bar.as_ref().map(|b| b.1.clone())).await;
    if let Some((b, _)) = bar {
        b.finish_and_clear();
    }
    let report = report.with_context(|| format!("sending {} to {partner}", file.display()))?;
    session.close().await;
    print_report(&report, json)
}

async fn receive(home: &Path, partner: &str, share: &str, path: Option<&str>, out: &Path, json: bool) -> Result<()> {
    init_logging("warn");
    let share = Name::new(share).map_err(|e| anyhow!("share: {e}"))?;
    let path = SharePath::parse(path.unwrap_or("")).map_err(|e| anyhow!("path in share: {e}"))?;
    let node = Node::open(home)?;
    let mut session = Session::open(node, partner).await?;
    let bar = progress_bar(json);
    let report = session.pull(&share, &path, out, bar.as_ref().map(|b| b.1.clone())).await;
    if let Some((b, _)) = bar {
        b.finish_and_clear();
    }
    let report = report.with_context(|| format!("receiving {share}/{path} from {partner}"))?;
    session.close().await;
    print_report(&report, json)
}

fn history(home: &Path, limit: u32, json: bool) -> Result<()> {
    let db = crate::db::open(home)?;
    let conn = db.lock().map_err(|_| anyhow!("database lock poisoned"))?;
    let rows = crate::db::history(&conn, limit)?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no transfers yet");
    }
    for r in rows {
        let arrow = match (r.direction.as_str(), r.role.as_str()) {
            ("push", "client") | ("pull", "server") => "->",
            _ => "<-",
        };
        println!(
            "{} {} {arrow} {:<12} {}/{} {} ({} on the wire) {}",
            crate::time::Timestamp(r.finished_ns).rfc3339(),
            r.status,
            r.partner,
            r.share,
            r.path,
            human(r.bytes_total),
            human(r.bytes_sent),
            r.id
        );
    }
    Ok(())
}

fn receipt_verify(file: &Path, cert: Option<&Path>) -> Result<()> {
    let receipt = Receipt::load(file)?;
    let der = cert.map(identity::load_cert_file).transpose()?;
    receipt.verify(der.as_deref()).with_context(|| format!("{}: INVALID", file.display()))?;
    let t = &receipt.transfer;
    println!("{}: valid signature", file.display());
    println!(
        "{} received {} ({} bytes, {}) from {} ({}) in transfer {} at {}",
        receipt.receiver.node,
        if receipt.path.is_empty() { receipt.share.clone() } else { format!("{}/{}", receipt.share, receipt.path) },
        t.total_bytes,
        t.file_hash,
        receipt.sender.node,
        receipt.sender.cert_fingerprint,
        receipt.transfer_id,
        t.complete_time
    );
    println!("signed by {} ({})", receipt.receiver.node, receipt.signature.signer_cert);
    if cert.is_none() {
        println!("note: pass --cert with the signer's certificate to check who holds the key");
    }
    Ok(())
}
