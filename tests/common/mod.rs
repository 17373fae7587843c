//! Helpers for end-to-end tests: temp node homes, the real `deftfs` binary,
//! daemons as child processes on loopback that are killed on drop.

#![allow(dead_code)]

pub mod relay;
pub mod world;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_deftfs"))
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("deftfs-e2e-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    /// Kept when the test failed (or `DEFTFS_TEST_KEEP` is set), so its daemon logs can be read.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("DEFTFS_TEST_KEEP").is_some() {
            eprintln!("test failed: its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A free UDP port on loopback, below the kernel's ephemeral range
/// (32768 and up here): a port the kernel handed out (bound, read,
/// released) could be handed out again before the daemon binds it, to
/// another daemon's outgoing endpoint, and that daemon then failed with
/// "Address already in use" when many tests ran at once. Ports are tried
/// from a place that depends on the process and a counter, so that tests
/// running together seldom try the same one, and each is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..COUNT {
        let port = (FIRST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(101)) % COUNT) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A node home on this machine.
pub struct TestNode {
    pub name: String,
    pub home: PathBuf,
    pub port: u16,
    pub fingerprint: String,
}

impl TestNode {
    pub fn init(root: &Path, name: &str) -> TestNode {
        let home = root.join(name);
        let port = free_port();
        let out = run(&home, &["init", "--name", name, "--listen", &format!("127.0.0.1:{port}")]);
        assert!(out.status.success(), "init {name}: {}", String::from_utf8_lossy(&out.stderr));
        let id = run_ok(&home, &["id"]);
        let fingerprint = id.lines().find_map(|l| l.strip_prefix("fingerprint")).unwrap().trim().to_string();
        TestNode { name: name.to_string(), home, port, fingerprint }
    }

    /// Nodes alice and bob under `root`, each trusting the other.
    pub fn pair(root: &Path) -> (TestNode, TestNode) {
        let a = TestNode::init(root, "alice");
        let b = TestNode::init(root, "bob");
        a.trust(&b);
        b.trust(&a);
        (a, b)
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Trust `other` (pinned fingerprint) and know where to reach it.
    pub fn trust(&self, other: &TestNode) {
        self.trust_at(other, &other.endpoint());
    }

    /// Trust `other`, reaching it at `endpoint` (a relay in front of it).
    pub fn trust_at(&self, other: &TestNode, endpoint: &str) {
        run_ok(&self.home, &["partner", "add", &other.name, "--fingerprint", &other.fingerprint, "--endpoint", endpoint]);
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        run(&self.home, args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        run_ok(&self.home, args)
    }

    /// Run a command with `--json` and parse its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(&self.home)
    }
}

pub fn run(home: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("DEFTFS_FAULT_CORRUPT_CHUNK")
        .env_remove("DEFTFS_FAULT_STALL_AFTER_CHUNKS")
        .env_remove("DEFTFS_FAULT_LOCK_BEHIND_DELAY_MS")
        .output()
        .unwrap()
}

pub fn run_ok(home: &Path, args: &[&str]) -> String {
    let out = run(home, args);
    assert!(
        out.status.success(),
        "deftfs {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running daemon (`deftfs daemon`), killed and reaped on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// Length of the log when this process started: a restarted daemon
    /// appends to the same file, and only what it wrote counts.
    from: usize,
}

impl Daemon {
    pub fn start(home: &Path) -> Daemon {
        Daemon::start_with(home, &[])
    }

    /// A daemon with extra environment variables (the fault hooks of
    /// `deftfs::fault`).
    pub fn start_with(home: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = home.join("daemon.log");
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--home")
            .arg(home)
            .arg("daemon")
            .env("DEFTFS_LOG", std::env::var("DEFTFS_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf);
        // A test killed by a signal runs no Drop: the daemon then gets
        // SIGTERM from the kernel, and on SIGTERM it unmounts every mount
        // it made, so no daemon and no mount outlive the test process.
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon { child, log, from };
        d.wait_for_log("listening", Duration::from_secs(20));
        d
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return;
            }
            assert!(start.elapsed() < timeout, "daemon log never said {needle:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What this process wrote to the log.
    pub fn log_text(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(all.get(self.from..).unwrap_or_default()).into_owned()
    }

    /// SIGKILL, then reap it. A daemon killed with a thread stuck in the
    /// kernel on its own mount cannot be reaped until that mount's
    /// connection is aborted (the next mount there does it): give up
    /// waiting after a while, the test goes on.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("daemon {} killed but not gone after 5 s (a thread stuck in the kernel)", self.child.id());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One step of the xorshift generator every test uses (`x` must not be 0).
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The value of environment variable `name` (a seed, a count), or `default`
/// when it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Close `f`, reporting close's own error (dropping a File ignores it, and
/// on a mount close is where the push happens).
pub fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = std::os::unix::io::IntoRawFd::into_raw_fd(f);
    // SAFETY: `fd` is an open descriptor we own, closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mount `spec` (`PARTNER:SHARE`) at `mnt` through `node`'s daemon, with
/// `extra` flags; the guard detaches it on drop.
/// Wait (at most 30 s) until no write-back of `node`'s mounts is pending:
/// the pushes behind its closes are in. Closes return before their push
/// ends (docs/SEMANTICS.md, "Writes").
pub fn settle(node: &TestNode) {
    let idle = || {
        let out = node.cmd(&["mounts", "--json"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
        v.as_array().is_some_and(|ms| ms.iter().all(|m| m["pending_writebacks"].as_u64() == Some(0)))
    };
    wait_until(Duration::from_secs(30), idle);
}

pub fn mount_at(node: &TestNode, spec: &str, mnt: &Path, extra: &[&str]) -> MountGuard {
    // Something mounted there (a dead daemon's mount, which the new mount
    // ends) is on a directory; looking at it could hang.
    if !mounted(mnt) {
        std::fs::create_dir_all(mnt).unwrap();
    }
    let guard = MountGuard(mnt.to_path_buf());
    let mut args = vec!["mount", spec, mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = node.ok(&args);
    assert!(out.contains(&format!("mounted {spec}")), "{out}");
    assert!(mounted(mnt), "the mount is not in /proc/mounts");
    guard
}

/// Bytes that crossed the wire in the last push `node` recorded for
/// `path` (its history, as the client).
pub fn last_push_bytes(node: &TestNode, path: &str) -> u64 {
    let rows = node.json(&["history", "--limit", "50"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == path && r["direction"] == "push" && r["role"] == "client")
        .unwrap_or_else(|| panic!("no push of {path} in history: {rows}"));
    row["bytes_sent"].as_u64().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), fast and incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&xorshift(&mut x).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_random(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    std::fs::File::create(path).unwrap().write_all(&data).unwrap();
    data
}

pub fn hash_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("blake3:{}", h.finalize().to_hex())
}

/// Two nodes that trust each other, `b` serving `inbox` (a may push) and
/// `outbox` (a may pull), both daemons started.
pub struct Pair {
    pub root: TempDir,
    pub a: TestNode,
    pub b: TestNode,
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub b_daemon: Daemon,
}

impl Pair {
    pub fn new(tag: &str) -> Pair {
        let root = TempDir::new(tag);
        let (a, b) = TestNode::pair(root.path());
        let inbox = root.path().join("bob-inbox");
        let outbox = root.path().join("bob-outbox");
        std::fs::create_dir_all(&inbox).unwrap();
        std::fs::create_dir_all(&outbox).unwrap();
        b.ok(&["share", "add", "inbox", inbox.to_str().unwrap(), "--partner", "alice", "--access", "write"]);
        b.ok(&["share", "add", "outbox", outbox.to_str().unwrap(), "--partner", "alice", "--access", "read"]);
        let b_daemon = b.start();
        Pair { root, a, b, inbox, outbox, b_daemon }
    }
}

/// Read a child's stderr lines until one contains `needle`.
pub fn wait_stderr_line(child: &mut Child, needle: &str, timeout: Duration) -> bool {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout).is_ok()
}

/// Whether something is mounted at `path` (`/proc/mounts`).
pub fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&p))
}

/// Detaches the mount at its path when dropped, whatever happened.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let c = std::ffi::CString::new(self.0.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path for the duration of the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Poll `f` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Every file under `dir`, recursively (none if it is unreadable).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The path of `name`, a tool installed with cargo (`.ci/run` does): `env`
/// if set, else `~/.cargo/bin` or `PATH`; a failure that says how to
/// install it if none.
pub fn cargo_tool(name: &str, version: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let installed = Path::new(&home).join("bin").join(name);
    if installed.is_file() {
        return installed;
    }
    on_path(name)
        .unwrap_or_else(|| panic!("{name} not found: cargo install --locked {name} --version {version} (.ci/run does), or set {env}"))
}

/// fsx-rs (see [`cargo_tool`]) on `file`, `ops` operations of `seed`, with
/// every operation it has enabled; its config and artifacts in `dir`.
pub fn fsx_command(fsx: &Path, dir: &Path, file: &Path, ops: &str, seed: &str) -> Command {
    let conf = dir.join("fsx.toml");
    std::fs::write(
        &conf,
        "flen = 8388608\n[opsize]\nmax = 1048576\n[weights]\nclose_open = 1\ninvalidate = 1\nfsync = 1\nfdatasync = 1\n\
         posix_fallocate = 1\npunch_hole = 1\nsendfile = 1\nposix_fadvise = 1\ncopy_file_range = 1\n",
    )
    .unwrap();
    let artifacts = dir.join("fsx-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut cmd = Command::new(fsx);
    cmd.arg("-f").arg(&conf).args(["-N", ops, "-S", seed]).arg("-P").arg(&artifacts).arg(file);
    cmd
}

/// `name` in a directory of `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var("PATH").unwrap_or_default().split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
