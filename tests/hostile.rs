//! Hostile peers. A real serving daemon (bob) and an attacker (mallory)
//! that is a trusted partner, its certificate pinned, so it gets past TLS,
//! but that speaks raw DEFT/1 over QUIC itself: malformed lines, lying
//! pushes, paths and symlinks that lead out of a share, and streams and
//! connections it opens and never reads.
//!
//! After every attack the daemon must still run, still serve a
//! well-behaved partner (carol: `deftfs ls` and `deftfs receive`), and
//! nothing outside bob's share directories may have appeared or changed.

mod common;

use common::*;
use deftfs::chunk::ChunkRef;
use deftfs::hash::Hash;
use deftfs::proto::{AckStatus, Base, ChunkLine, ErrorCode, Name, PushManifest, Request, Response, SharePath};
use deftfs::transport::{Control, Endpoint};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Bob serving `inbox` (mallory read-write, carol read) and `outbox`
/// (both read), with symbolic links in both that lead to `outside`.
struct Lab {
    root: TempDir,
    bob: TestNode,
    mallory: TestNode,
    carol: TestNode,
    inbox: PathBuf,
    outbox: PathBuf,
    outside: PathBuf,
    daemon: Daemon,
    rt: tokio::runtime::Runtime,
    before: Vec<String>,
    checks: u32,
}

/// Top-level entries of the lab's root that are not "outside": node homes,
/// the shares themselves and where carol saves what she receives.
const INSIDE: [&str; 6] = ["bob", "mallory", "carol", "inbox", "outbox", "carol-out"];

impl Lab {
    fn new(tag: &str) -> Lab {
        let root = TempDir::new(tag);
        let bob = TestNode::init(root.path(), "bob");
        let mallory = TestNode::init(root.path(), "mallory");
        let carol = TestNode::init(root.path(), "carol");
        for n in [&mallory, &carol] {
            bob.trust(n);
            n.trust(&bob);
        }
        let dir = |name: &str| {
            let p = root.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (inbox, outbox, outside) = (dir("inbox"), dir("outbox"), dir("outside"));
        dir("carol-out");
        dir("inbox/sub");
        std::fs::write(outbox.join("ok.txt"), b"served to honest partners\n").unwrap();
        std::fs::write(inbox.join("sub/mine.txt"), b"a file in the share\n").unwrap();
        std::fs::write(outside.join("secret.txt"), b"never leaves this node\n").unwrap();
        std::fs::create_dir(outside.join("dir")).unwrap();
        std::fs::write(outside.join("dir/victim.txt"), b"must stay as it is\n").unwrap();
        for share in [&inbox, &outbox] {
            std::os::unix::fs::symlink(outside.join("dir"), share.join("out-dir")).unwrap();
            std::os::unix::fs::symlink(outside.join("secret.txt"), share.join("out-file")).unwrap();
        }
        // A link the owner placed that stays inside the share.
        std::os::unix::fs::symlink(outbox.join("ok.txt"), outbox.join("in-link")).unwrap();
        let (i, o) = (inbox.to_str().unwrap(), outbox.to_str().unwrap());
        bob.ok(&["share", "add", "inbox", i, "--partner", "mallory", "--access", "read-write", "--partner", "carol", "--access", "read"]);
        bob.ok(&["share", "add", "outbox", o, "--partner", "mallory", "--access", "read", "--partner", "carol", "--access", "read"]);
        let daemon = bob.start();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut lab = Lab { root, bob, mallory, carol, inbox, outbox, outside, daemon, rt, before: Vec::new(), checks: 0 };
        lab.before = lab.outside_state();
        lab
    }

    /// Every path outside the shares and node homes, with size and hash
    /// (and mode, so a chmod through a link shows).
    fn outside_state(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        let mut todo = vec![self.root.path().to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if d == self.root.path() && INSIDE.iter().any(|n| e.file_name() == *n) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let mode = meta.permissions().mode();
                if meta.is_dir() {
                    out.push(format!("{} dir {mode:o}", p.display()));
                    todo.push(p);
                } else {
                    out.push(format!("{} {} {mode:o} {}", p.display(), meta.len(), hash_file(&p)));
                }
            }
        }
        out.sort();
        out
    }

    /// The daemon is alive, an honest partner is served, and nothing
    /// outside the shares changed.
    fn still_serves(&mut self, after: &str) {
        if let Some(status) = self.daemon.child.try_wait().unwrap() {
            panic!("the daemon died after {after} ({status}):\n{}", self.daemon.log_text());
        }
        let started = Instant::now();
        let ls = self.carol.cmd(&["ls", "bob"]);
        assert!(ls.status.success(), "after {after}: carol's ls failed: {}", String::from_utf8_lossy(&ls.stderr));
        assert!(String::from_utf8_lossy(&ls.stdout).contains("outbox"), "after {after}: {}", String::from_utf8_lossy(&ls.stdout));
        self.checks += 1;
        let dest = self.root.path().join("carol-out").join(format!("ok-{}.txt", self.checks));
        let got = self.carol.cmd(&["receive", "bob", "outbox", "ok.txt", dest.to_str().unwrap()]);
        assert!(got.status.success(), "after {after}: carol's receive failed: {}", String::from_utf8_lossy(&got.stderr));
        assert_eq!(std::fs::read(&dest).unwrap(), b"served to honest partners\n", "after {after}");
        assert!(started.elapsed() < Duration::from_secs(20), "after {after}: an honest ls + receive took {:?}", started.elapsed());
        assert_eq!(self.outside_state(), self.before, "after {after}: something outside the shares changed");
        let log = self.daemon.log_text();
        assert!(!log.contains("panicked"), "after {after}: the daemon logged a panic:\n{log}");
    }

    fn connect(&self) -> Raw {
        self.rt.block_on(Raw::connect(&self.mallory.home, None))
    }

    fn pid(&self) -> u32 {
        self.daemon.child.id()
    }
}

/// The daemon's resident and peak memory (`VmRSS`, `VmHWM`), in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A raw DEFT/1 connection of mallory's to bob.
struct Raw {
    conn: quinn::Connection,
    ctl: Control<Response>,
    _endpoint: Endpoint,
}

impl Raw {
    /// Connect (to `via` instead of bob's address when given).
    async fn connect(home: &Path, via: Option<String>) -> Raw {
        let node = deftfs::node::Node::open(home).unwrap();
        let endpoint = Endpoint::client(node.identity.clone(), node.directory.clone()).unwrap();
        let mut partner = node.config.partner("bob").cloned().unwrap();
        if let Some(v) = via {
            partner.endpoints = vec![v];
        }
        let (conn, _) = endpoint.connect(&partner).await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Raw { conn, ctl: Control::new(send, recv), _endpoint: endpoint }
    }

    async fn send(&mut self, text: &str) {
        self.ctl.send_raw(text).await.unwrap();
    }

    /// The next message; a line the decoder refuses is a test failure.
    async fn next(&mut self) -> Response {
        match tokio::time::timeout(Duration::from_secs(30), self.ctl.recv()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("reading bob's answer: {e}"),
            Err(_) => panic!("bob did not answer within 30 s"),
        }
    }

    /// Send `line` (CRLF added unless there) and expect ERROR `code`.
    async fn refused(&mut self, line: &str, code: ErrorCode) {
        if line.ends_with("\r\n") {
            self.send(line).await;
        } else {
            self.send(&format!("{line}\r\n")).await;
        }
        match self.next().await {
            Response::Error { code: got, message } => assert_eq!(got, code, "{line:.200}: {message}"),
            other => panic!("{line:.200}: expected ERROR {code:?}, got {other:?}"),
        }
    }

    async fn hello(&mut self) {
        self.send("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME WINDOW_SIZE:64\r\n").await;
        assert!(matches!(self.next().await, Response::Welcome { .. }));
    }

    async fn handshake(&mut self) {
        self.hello().await;
        self.send("DEFT AUTH mallory\r\n").await;
        assert!(matches!(self.next().await, Response::AuthOk { .. }));
    }

    /// Open a PUT stream: the header, then `body`, then FIN if `finish`.
    async fn put(&self, transfer: &str, index: u32, size: u32, hash: Hash, body: &[u8], finish: bool) -> quinn::SendStream {
        let mut s = self.conn.open_uni().await.unwrap();
        // The server may refuse a lying stream by stopping it before all of
        // it is written (`Stopped`): what it answers is what the tests check.
        let wrote = async {
            s.write_all(format!("DEFT PUT {transfer} {index} SIZE:{size} HASH:{hash}\r\n").as_bytes()).await?;
            s.write_all(body).await
        };
        match wrote.await {
            Ok(()) | Err(quinn::WriteError::Stopped(_)) => {}
            Err(e) => panic!("PUT stream: {e}"),
        }
        if finish {
            let _ = s.finish();
        }
        s
    }
}

/// A file to push: its bytes cut at `sizes`, and the manifest's chunks.
struct Upload {
    data: Vec<u8>,
    chunks: Vec<ChunkRef>,
}

impl Upload {
    fn new(sizes: &[u32], seed: u64) -> Upload {
        let data = random_bytes(sizes.iter().map(|&s| s as usize).sum(), seed);
        let mut chunks = Vec::new();
        let mut at = 0u64;
        for &len in sizes {
            chunks.push(ChunkRef { offset: at, len, hash: Hash::of(&data[at as usize..at as usize + len as usize]) });
            at += u64::from(len);
        }
        Upload { data, chunks }
    }

    fn file_hash(&self) -> Hash {
        deftfs::chunk::file_hash(self.data.len() as u64, &self.chunks)
    }

    fn bytes(&self, index: usize) -> &[u8] {
        let c = self.chunks[index];
        &self.data[c.offset as usize..c.end() as usize]
    }

    /// BEGIN_TRANSFER with this manifest, the size and file hash given.
    fn begin_as(&self, id: &str, share: &str, path: &str, size: u64, file_hash: Hash) -> String {
        Request::BeginTransfer {
            transfer_id: Name::new(id).unwrap(),
            share: Name::new(share).unwrap(),
            path: SharePath::parse(path).unwrap(),
            size,
            file_hash,
            base: Base::Any,
            fence: None,
            mode: None,
            mtime_ns: None,
            manifest: PushManifest::Whole(
                self.chunks
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ChunkLine { index: i as u32, offset: c.offset, size: c.len, hash: c.hash })
                    .collect(),
            ),
            ahead: None,
        }
        .encode()
    }

    fn begin(&self, id: &str, share: &str, path: &str) -> String {
        self.begin_as(id, share, path, self.data.len() as u64, self.file_hash())
    }
}

/// Read CHUNK_ACKs (single or batched) until `index` is acknowledged;
/// its status. Other messages fail the test.
async fn ack_of(raw: &mut Raw, index: u32) -> AckStatus {
    loop {
        match raw.next().await {
            Response::ChunkAck { index: i, status, .. } if i == index => return status,
            Response::ChunkAckBatch { chunks, .. } if chunks.contains(index) => return AckStatus::Ok,
            Response::ChunkAck { .. } | Response::ChunkAckBatch { .. } => {}
            other => panic!("waiting for the acknowledgement of chunk {index}: got {other:?}"),
        }
    }
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir).into_iter().filter(|p| p.to_string_lossy().contains(".deftpart-")).collect()
}

#[test]
fn malformed_control_traffic_is_refused_and_the_daemon_serves_on() {
    let mut lab = Lab::new("hostile-lines");

    // Random bytes, newlines and all, then the stream's end.
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        for seed in 0..8 {
            raw.send(&String::from_utf8_lossy(&random_bytes(128 * 1024, seed))).await;
        }
        let _ = raw.ctl.finish().await;
    });
    drop(raw);
    lab.still_serves("random bytes");

    // A line that never ends: bob keeps serving others while it grows far
    // past the line limit, without buffering it, and refuses it once it ends.
    let mut raw = lab.connect();
    let (rss_before, _) = memory(lab.pid());
    lab.rt.block_on(async {
        raw.send("DEFT DESCRIBE outbox ").await;
        let filler = "a".repeat(MIB);
        for _ in 0..64 {
            raw.send(&filler).await;
        }
    });
    lab.still_serves("a 64 MiB line without its end");
    let (rss_after, _) = memory(lab.pid());
    assert!(rss_after < rss_before + 32 * MIB as u64, "a 64 MiB line grew the daemon from {rss_before} to {rss_after} bytes");
    lab.rt.block_on(async {
        raw.send("\r\n").await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::TooLarge, .. }));
        // Before HELLO and AUTH.
        raw.refused("DEFT DISCOVER", ErrorCode::AuthRequired).await;
        raw.refused("DEFT DESCRIBE outbox ok.txt", ErrorCode::AuthRequired).await;
        raw.refused("DEFT BEGIN_TRANSFER t-1 inbox x SIZE:0 CHUNKS:0 HASH:blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262", ErrorCode::AuthRequired).await;
        raw.refused("DEFT AUTH mallory", ErrorCode::BadRequest).await;
        raw.hello().await;
        raw.refused("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME WINDOW_SIZE:64", ErrorCode::BadRequest).await;
        raw.refused("DEFT DISCOVER", ErrorCode::AuthRequired).await;
        raw.refused("DEFT AUTH carol", ErrorCode::AuthFailed).await;
        raw.refused("DEFT DISCOVER", ErrorCode::AuthRequired).await;
        raw.send("DEFT AUTH mallory\r\n").await;
        assert!(matches!(raw.next().await, Response::AuthOk { .. }));
        raw.refused("DEFT AUTH mallory", ErrorCode::BadRequest).await;
        raw.refused("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME WINDOW_SIZE:64", ErrorCode::BadRequest).await;

        // NUL and control characters, in verbs, names and paths.
        raw.refused("DEFT DISCOVER\0", ErrorCode::BadRequest).await;
        raw.refused("DEFT \u{1}DISCOVER", ErrorCode::BadRequest).await;
        raw.refused("DEFT DESCRIBE outbox ok.txt\0", ErrorCode::BadPath).await;
        raw.refused("DEFT DESCRIBE outbox ok\u{7f}.txt", ErrorCode::BadPath).await;
        raw.refused("DEFT DESCRIBE outbox ok\u{1b}[2J.txt", ErrorCode::BadPath).await;
        raw.refused("DEFT DESCRIBE out\u{0}box ok.txt", ErrorCode::BadName).await;
        raw.refused("DEFT DESCRIBE  outbox ok.txt", ErrorCode::BadRequest).await;
        raw.refused("DEFT DESCRIBE outbox ok.txt ", ErrorCode::BadRequest).await;
        raw.refused("\u{feff}DEFT DISCOVER", ErrorCode::BadRequest).await;

        // Unknown verbs, and messages only a server sends.
        for line in [
            "DEFT FROBNICATE",
            "deft discover",
            "GET / HTTP/1.1",
            "DEFT",
            "",
            "DEFT WELCOME 1.0 - WINDOW_SIZE:1 s-1",
            "DEFT CHUNK_ACK t-1 0 OK",
            "DEFT ERROR INTERNAL boom",
        ] {
            raw.refused(line, ErrorCode::BadRequest).await;
        }

        // Numbers out of range: u64 overflow, negative, too large for their field.
        let h = "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        for line in [
            format!("DEFT BEGIN_TRANSFER t-2 inbox x SIZE:18446744073709551616 CHUNKS:0 HASH:{h}"),
            format!("DEFT BEGIN_TRANSFER t-2 inbox x SIZE:-1 CHUNKS:0 HASH:{h}"),
            format!("DEFT BEGIN_TRANSFER t-2 inbox x SIZE:0 CHUNKS:-1 HASH:{h}"),
            format!("DEFT BEGIN_TRANSFER t-2 inbox x SIZE:0 CHUNKS:0 HASH:{h} FENCE:18446744073709551616"),
            "DEFT SETATTR inbox sub/mine.txt MODE:- MTIME:99999999999999999999".to_string(),
            "DEFT SETATTR inbox sub/mine.txt MODE:- MTIME:--1".to_string(),
            "DEFT SETATTR inbox sub/mine.txt MODE:77777 MTIME:-".to_string(),
            "DEFT SETATTR inbox sub/mine.txt MODE:-7 MTIME:-".to_string(),
            "DEFT LOCK inbox sub/mine.txt TTL:0 OWNER:m".to_string(),
            "DEFT LOCK inbox sub/mine.txt TTL:4294967296 OWNER:m".to_string(),
            "DEFT RENEW inbox sub/mine.txt TOKEN:-1 TTL:10".to_string(),
            format!("DEFT GET t-3 outbox ok.txt {h} CHUNKS 5-1"),
            format!("DEFT GET t-3 outbox ok.txt {h} CHUNKS 0-4294967296"),
        ] {
            raw.refused(&line, ErrorCode::BadRequest).await;
        }
        // Extreme but well-formed times must not crash the daemon.
        for t in ["-9223372036854775808", "9223372036854775807"] {
            raw.send(&format!("DEFT SETATTR inbox sub/mine.txt MODE:- MTIME:{t}\r\n")).await;
            let _ = raw.next().await;
        }
        // Indices past the file's chunks.
        raw.send("DEFT DESCRIBE outbox ok.txt\r\n").await;
        let Response::FileInfo { file_hash, .. } = raw.next().await else { panic!("DESCRIBE ok.txt") };
        raw.refused(&format!("DEFT GET t-4 outbox ok.txt {file_hash} CHUNKS 0-4294967295"), ErrorCode::BadRequest).await;
        raw.refused("DEFT TRANSFER_COMPLETE t-5 HASH:blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 SIZE:0 CHUNKS:0 TIME:2026-01-19T14:35:23.456Z sig:ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==", ErrorCode::UnknownTransfer).await;

        // A huge declared count: above the limit refused at once; at the
        // limit, the body lines that do not follow are refused, and the
        // session recovers.
        raw.refused(&format!("DEFT BEGIN_TRANSFER t-6 inbox x SIZE:1 CHUNKS:4194305 HASH:{h}"), ErrorCode::TooLarge).await;
        raw.send(&format!("DEFT BEGIN_TRANSFER t-7 inbox x SIZE:1 CHUNKS:4194304 HASH:{h}\r\nDEFT DISCOVER\r\n")).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::BadRequest, .. }));
        raw.send("DEFT DISCOVER\r\n").await;
        assert!(matches!(raw.next().await, Response::Files(_)));
    });
    assert!(!lab.inbox.join("x").exists());
    drop(raw);
    lab.still_serves("malformed lines");
}

#[test]
fn lying_pushes_are_refused_or_nacked_and_never_assembled() {
    let mut lab = Lab::new("hostile-push");
    let up = Upload::new(&[100_000, 100_000, 50_000], 7);
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.handshake().await;
        // An absurd size: no manifest of legal chunks reaches 1 EiB.
        raw.refused(&up.begin_as("t-eib", "inbox", "eib.bin", 1 << 60, up.file_hash()), ErrorCode::BadRequest).await;
        // Chunk sizes that do not sum to the size, and a file hash that is
        // not the chunk list's.
        raw.refused(&up.begin_as("t-sum", "inbox", "sum.bin", 300_000, up.file_hash()), ErrorCode::BadRequest).await;
        raw.refused(&up.begin_as("t-fh", "inbox", "fh.bin", 250_000, Hash::of(b"not the chunk list")), ErrorCode::BadRequest).await;
    });
    lab.still_serves("manifests that lie");

    // A legal manifest of a file larger than the disk (1 TiB of 16 MiB
    // chunks, or twice the free space if that is more) is refused before
    // anything is allocated.
    let free = {
        let c = std::ffi::CString::new(lab.inbox.to_str().unwrap()).unwrap();
        // SAFETY: an all-zero statvfs is valid; statvfs writes only into it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    };
    let chunk = 16u64 << 20;
    let count = ((2 * free).max(1 << 40)).div_ceil(chunk);
    let same = Hash::of(b"one chunk, many times");
    let huge: Vec<ChunkRef> = (0..count).map(|i| ChunkRef { offset: i * chunk, len: chunk as u32, hash: same }).collect();
    let huge = Upload { data: Vec::new(), chunks: huge };
    let size = count * chunk;
    lab.rt.block_on(async {
        raw.refused(&huge.begin_as("t-huge", "inbox", "huge.bin", size, deftfs::chunk::file_hash(size, &huge.chunks)), ErrorCode::Busy)
            .await;
    });
    assert!(temp_files(&lab.inbox).is_empty(), "a refused push left {:?}", temp_files(&lab.inbox));
    lab.still_serves("a 1 TiB push");

    // A push whose chunk streams lie.
    lab.rt.block_on(async {
        raw.send(&up.begin("t-lies", "inbox", "lies.bin")).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.len(), 3),
            other => panic!("BEGIN_TRANSFER: {other:?}"),
        }
        let (h0, h1, h2) = (up.chunks[0].hash, up.chunks[1].hash, up.chunks[2].hash);
        // Longer than declared.
        let mut long = up.bytes(0).to_vec();
        long.extend_from_slice(b"and more");
        raw.put("t-lies", 0, 100_000, h0, &long, true).await;
        assert_eq!(ack_of(&mut raw, 0).await, AckStatus::Error("BAD_LENGTH".into()), "a chunk stream longer than SIZE");
        // Shorter than declared.
        raw.put("t-lies", 1, 100_000, h1, &up.bytes(1)[..50_000], true).await;
        assert_eq!(ack_of(&mut raw, 1).await, AckStatus::Error("BAD_LENGTH".into()), "a chunk stream shorter than SIZE");
        // A header whose SIZE is not the manifest's.
        raw.put("t-lies", 2, 49_999, h2, &up.bytes(2)[..49_999], true).await;
        assert_eq!(ack_of(&mut raw, 2).await, AckStatus::Error("BAD_LENGTH".into()), "SIZE not the manifest's");
        // An index not in the manifest.
        raw.put("t-lies", 3, 50_000, h2, up.bytes(2), true).await;
        assert_eq!(ack_of(&mut raw, 3).await, AckStatus::Error("BAD_REQUEST".into()), "an index not in the manifest");
        raw.put("t-lies", u32::MAX, 50_000, h2, up.bytes(2), true).await;
        assert_eq!(ack_of(&mut raw, u32::MAX).await, AckStatus::Error("BAD_REQUEST".into()), "index u32::MAX");
        // Bytes that do not match the hash, the header's claim notwithstanding.
        let mut wrong = up.bytes(2).to_vec();
        wrong[0] ^= 1;
        raw.put("t-lies", 2, 50_000, h2, &wrong, true).await;
        assert_eq!(ack_of(&mut raw, 2).await, AckStatus::Error("HASH_MISMATCH".into()));
        raw.put("t-lies", 2, 50_000, Hash::of(&wrong), &wrong, true).await;
        assert_eq!(ack_of(&mut raw, 2).await, AckStatus::Error("HASH_MISMATCH".into()), "a header hash that is not the manifest's");
        // An unknown transfer, and a stream that is not a PUT.
        raw.put("t-nosuch", 0, 100_000, h0, up.bytes(0), true).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::UnknownTransfer, .. }));
        let mut s = raw.conn.open_uni().await.unwrap();
        s.write_all(b"DEFT CHUNK_DATA t-lies 0 SIZE:1 HASH:blake3:00\r\nx").await.unwrap();
        s.finish().unwrap();
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::BadRequest, .. }));
        // TRANSFER_COMPLETE from the client before the chunks: refused,
        // and the push is aborted (nothing but chunks may interrupt it).
        let sig = "sig:ed25519:".to_string() + &"A".repeat(86) + "==";
        let complete =
            format!("DEFT TRANSFER_COMPLETE t-lies HASH:{} SIZE:250000 CHUNKS:3 TIME:2026-01-19T14:35:23.456Z {sig}", up.file_hash());
        raw.refused(&complete, ErrorCode::BadRequest).await;
        raw.put("t-lies", 0, 100_000, h0, up.bytes(0), true).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::UnknownTransfer, .. }), "a chunk of the aborted push");
    });
    assert!(!lab.inbox.join("lies.bin").exists(), "nothing may be assembled before every chunk is verified");
    lab.still_serves("chunk streams that lie");

    // The honest chunks complete the file: none of the bad bytes is in it.
    lab.rt.block_on(async {
        raw.send(&up.begin("t-honest", "inbox", "lies.bin")).await;
        assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
        for i in 0..3u32 {
            raw.put("t-honest", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
        }
        let mut acked = 0;
        loop {
            match raw.next().await {
                Response::ChunkAck { status: AckStatus::Ok, .. } => acked += 1,
                Response::ChunkAckBatch { chunks, .. } => acked += chunks.len(),
                Response::TransferComplete(c) => {
                    assert_eq!(c.file_hash, up.file_hash());
                    break;
                }
                other => panic!("completing t-lies: {other:?}"),
            }
        }
        assert_eq!(acked, 3);
    });
    assert_eq!(std::fs::read(lab.inbox.join("lies.bin")).unwrap(), up.data);
    lab.still_serves("a push completed after lies");

    // Pushes left open: a connection carries one transfer at a time
    // (PROTOCOL.md 3), so a second BEGIN_TRANSFER is refused; and a push
    // abandoned before any chunk leaves no temp file behind.
    let many = Upload::new(&[1 << 20; 8], 8);
    lab.rt.block_on(async {
        raw.send(&many.begin("t-open-1", "inbox", "open-1.bin")).await;
        assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
        raw.refused(&many.begin("t-open-2", "inbox", "open-2.bin"), ErrorCode::BadRequest).await;
        // Both are gone: the session is usable again.
        raw.send("DEFT DISCOVER\r\n").await;
        assert!(matches!(raw.next().await, Response::Files(_)));
        raw.put("t-open-1", 0, 1 << 20, many.chunks[0].hash, many.bytes(0), true).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::UnknownTransfer, .. }), "a chunk of the aborted push");
    });
    drop(raw);
    for n in 0..20 {
        let mut raw = lab.connect();
        lab.rt.block_on(async {
            raw.handshake().await;
            raw.send(&many.begin(&format!("t-left-{n}"), "inbox", &format!("left-{n}.bin"))).await;
            assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
            raw.conn.close(0u32.into(), b"gone");
        });
    }
    assert!(
        wait_until(Duration::from_secs(10), || temp_files(&lab.inbox).is_empty()),
        "abandoned pushes left {} temp files",
        temp_files(&lab.inbox).len()
    );
    lab.still_serves("pushes left open");
}

/// SAME (PROTOCOL.md 8.1): a push may give its manifest relative to the
/// base version's, only if both sides named SAME, only against the version
/// the target has, and only if the expanded manifest is the one HASH names.
#[test]
fn relative_manifests_that_lie_are_refused_and_an_honest_one_is_a_delta() {
    let mut lab = Lab::new("hostile-same");
    let old = Upload::new(&[100_000, 100_000, 50_000], 9);
    let mut new = Upload { data: old.data.clone(), chunks: old.chunks.clone() };
    for b in &mut new.data[100_000..200_000] {
        *b ^= 0x5a;
    }
    new.chunks[1].hash = Hash::of(&new.data[100_000..200_000]);
    let (base, h) = (old.file_hash(), new.file_hash());
    let begin = |id: &str, base: Hash, hash: Hash, chunks: u32, lines: &[String]| {
        let mut text =
            format!("DEFT BEGIN_TRANSFER {id} inbox rel.bin SIZE:250000 CHUNKS:{chunks} HASH:{hash} BASE:{base} LINES:{}\r\n", lines.len());
        for l in lines {
            text.push_str(l);
            text.push_str("\r\n");
        }
        text
    };
    let honest = ["SAME 0 0 1".to_string(), format!("CHUNK 1 100000 100000 {}", new.chunks[1].hash), "SAME 2 2 1".to_string()];
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.handshake().await;
        raw.send(&old.begin("t-old", "inbox", "rel.bin")).await;
        assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
        for i in 0..3u32 {
            raw.put("t-old", i, old.chunks[i as usize].len, old.chunks[i as usize].hash, old.bytes(i as usize), true).await;
        }
        while !matches!(raw.next().await, Response::TransferComplete(_)) {}
        // This connection did not name SAME in its HELLO.
        raw.refused(&begin("t-unasked", base, h, 3, &honest), ErrorCode::BadRequest).await;
    });
    assert_eq!(std::fs::read(lab.inbox.join("rel.bin")).unwrap(), old.data);
    lab.still_serves("a relative manifest on a session without SAME");

    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.send("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME,SAME WINDOW_SIZE:64\r\n").await;
        match raw.next().await {
            Response::Welcome { caps, .. } => assert!(caps.contains(&deftfs::proto::Capability::Same), "{caps:?}"),
            other => panic!("HELLO: {other:?}"),
        }
        raw.send("DEFT AUTH mallory\r\n").await;
        assert!(matches!(raw.next().await, Response::AuthOk { .. }));
        // Runs the base does not have, up to the largest count a head may
        // announce.
        raw.refused(&begin("t-past", base, h, 4, &["SAME 0 0 4".to_string()]), ErrorCode::BadRequest).await;
        raw.refused(&begin("t-far", base, h, 3, &["SAME 0 4000000000 3".to_string()]), ErrorCode::BadRequest).await;
        raw.refused(&begin("t-huge", base, h, 4_194_304, &["SAME 0 0 4194304".to_string()]), ErrorCode::BadRequest).await;
        // Lines that expand to another manifest than HASH names (the base
        // itself, claimed to be the new version).
        raw.refused(&begin("t-hash", base, h, 3, &["SAME 0 0 3".to_string()]), ErrorCode::BadRequest).await;
        // Sizes that do not add up to SIZE once expanded.
        let short = ["SAME 0 0 1".to_string(), format!("CHUNK 1 100000 99999 {}", new.chunks[1].hash), "SAME 2 2 1".to_string()];
        raw.refused(&begin("t-short", base, h, 3, &short), ErrorCode::BadRequest).await;
        // A base that is not the target's version.
        raw.refused(&begin("t-base", h, h, 3, &honest), ErrorCode::Conflict).await;
        // The honest one: only the changed chunk is needed.
        raw.send(&begin("t-new", base, h, 3, &honest)).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.iter().collect::<Vec<_>>(), vec![1]),
            other => panic!("an honest relative manifest: {other:?}"),
        }
        raw.put("t-new", 1, 100_000, new.chunks[1].hash, new.bytes(1), true).await;
        loop {
            match raw.next().await {
                Response::TransferComplete(c) => {
                    assert_eq!(c.file_hash, h);
                    break;
                }
                Response::ChunkAck { status: AckStatus::Ok, .. } | Response::ChunkAckBatch { .. } => {}
                other => panic!("completing t-new: {other:?}"),
            }
        }
    });
    assert_eq!(std::fs::read(lab.inbox.join("rel.bin")).unwrap(), new.data);
    assert!(temp_files(&lab.inbox).is_empty(), "refused pushes left {:?}", temp_files(&lab.inbox));
    lab.still_serves("relative manifests");
}

/// EAGER (PROTOCOL.md 8.3): chunks sent before their BEGIN_TRANSFER is
/// even read wait for it, and their acknowledgements never overtake its
/// answer; chunks of a push that is refused, that needed nothing, or that
/// never begins are dropped without a word on the control stream.
#[test]
fn eager_chunks_wait_for_their_push_and_stray_ones_are_dropped_silently() {
    let mut lab = Lab::new("hostile-eager");
    let up = Upload::new(&[3000, 2000], 11);
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.send("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME,EAGER WINDOW_SIZE:64\r\n").await;
        match raw.next().await {
            Response::Welcome { caps, .. } => assert!(caps.contains(&deftfs::proto::Capability::Eager), "{caps:?}"),
            other => panic!("expected WELCOME, got {other:?}"),
        }
        raw.send("DEFT AUTH mallory\r\n").await;
        assert!(matches!(raw.next().await, Response::AuthOk { .. }));
        // The chunks first, then, a moment later, their BEGIN_TRANSFER.
        for i in 0..2u32 {
            raw.put("t-eager", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        raw.send(&up.begin("t-eager", "inbox", "eager.bin")).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.len(), 2),
            other => panic!("the answer to BEGIN_TRANSFER must come first, got {other:?}"),
        }
        let mut acked = 0;
        loop {
            match raw.next().await {
                Response::ChunkAck { status: AckStatus::Ok, .. } => acked += 1,
                Response::ChunkAckBatch { chunks, .. } => acked += chunks.len(),
                Response::TransferComplete(c) => {
                    assert_eq!(c.file_hash, up.file_hash());
                    break;
                }
                other => panic!("completing t-eager: {other:?}"),
            }
        }
        assert_eq!(acked, 2);
        // The same file again: nothing is needed, the chunks are stray.
        raw.send(&up.begin("t-again", "inbox", "eager.bin")).await;
        for i in 0..2u32 {
            raw.put("t-again", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
        }
        assert!(matches!(raw.next().await, Response::TransferAccepted { need, .. } if need.is_empty()));
        assert!(matches!(raw.next().await, Response::TransferComplete(_)));
        // A refused push, and chunks of a push that never begins.
        raw.send(&up.begin("t-refused", "nosuch", "eager.bin")).await;
        raw.put("t-refused", 0, up.chunks[0].len, up.chunks[0].hash, up.bytes(0), true).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::UnknownShare, .. }));
        raw.put("t-never", 0, up.chunks[0].len, up.chunks[0].hash, up.bytes(0), true).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        raw.send("DEFT DISCOVER\r\n").await;
        assert!(matches!(raw.next().await, Response::Files(_)), "no word about the stray chunks");
    });
    assert_eq!(std::fs::read(lab.inbox.join("eager.bin")).unwrap(), up.data);
    assert!(temp_files(&lab.inbox).is_empty(), "{:?}", temp_files(&lab.inbox));
    lab.still_serves("eager chunks");
}

#[test]
fn symlinks_out_of_a_share_are_never_followed_for_reading_or_writing() {
    let mut lab = Lab::new("hostile-links");
    let victim = lab.outside.join("dir/victim.txt");
    let up = Upload::new(&[1000], 9);
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.handshake().await;
        // Writing through a link to a directory outside, or onto a link
        // to a file outside: refused before anything is created.
        for (i, path) in ["out-dir/x", "out-dir/new/deeper.txt", "out-file", "out-dir/victim.txt"].into_iter().enumerate() {
            raw.refused(&up.begin(&format!("t-link-{i}"), "inbox", path), ErrorCode::BadPath).await;
        }
        raw.refused("DEFT MKDIR inbox out-dir/m MODE:755", ErrorCode::BadPath).await;
        raw.refused("DEFT REMOVE inbox out-dir/victim.txt file", ErrorCode::BadPath).await;
        raw.refused("DEFT RENAME inbox out-dir/victim.txt stolen.txt REPLACE", ErrorCode::BadPath).await;
        raw.refused("DEFT RENAME inbox sub/mine.txt out-dir/mine.txt NOREPLACE", ErrorCode::BadPath).await;
        raw.refused("DEFT RENAME inbox sub/mine.txt out-dir/victim.txt REPLACE", ErrorCode::BadPath).await;
        raw.refused("DEFT SETATTR inbox out-file MODE:777 MTIME:0", ErrorCode::BadPath).await;
        raw.refused("DEFT SETATTR inbox out-dir/victim.txt MODE:777 MTIME:-", ErrorCode::BadPath).await;
        // Reading through them: refused, and not listed.
        for share in ["inbox", "outbox"] {
            raw.refused(&format!("DEFT DESCRIBE {share} out-file"), ErrorCode::BadPath).await;
            raw.refused(&format!("DEFT DESCRIBE {share} out-dir/victim.txt"), ErrorCode::BadPath).await;
            raw.refused(&format!("DEFT STAT {share} out-dir"), ErrorCode::BadPath).await;
            raw.refused(&format!("DEFT LIST {share} out-dir"), ErrorCode::BadPath).await;
            raw.refused(&format!("DEFT GET t-get outbox out-file {} CHUNKS 0", Hash::of(b"never leaves this node\n")), ErrorCode::BadPath)
                .await;
            raw.send(&format!("DEFT LIST {share}\r\n")).await;
            match raw.next().await {
                Response::Entries(rows) => {
                    let names: Vec<String> = rows.iter().map(|e| e.path.to_string()).collect();
                    assert!(!names.iter().any(|n| n.starts_with("out-")), "{share} lists a link that leaves it: {names:?}");
                }
                other => panic!("LIST {share}: {other:?}"),
            }
        }
        // A link the owner placed inside the share reads as its target.
        raw.send("DEFT DESCRIBE outbox in-link\r\n").await;
        assert!(matches!(raw.next().await, Response::FileInfo { size: 26, .. }));
        // A read-only grant allows no change.
        for line in [
            "DEFT MKDIR outbox m MODE:755".to_string(),
            "DEFT REMOVE outbox ok.txt file".to_string(),
            "DEFT RENAME outbox ok.txt gone.txt REPLACE".to_string(),
            "DEFT SETATTR outbox ok.txt MODE:777 MTIME:-".to_string(),
            "DEFT LOCK outbox ok.txt TTL:60 OWNER:m".to_string(),
            up.begin("t-ro", "outbox", "ok.txt"),
        ] {
            raw.refused(&line, ErrorCode::AccessDenied).await;
        }
    });
    assert_eq!(std::fs::read(&victim).unwrap(), b"must stay as it is\n");
    assert!(!lab.outside.join("dir/x").exists() && !lab.outside.join("dir/new").exists() && !lab.outside.join("dir/m").exists());
    assert!(lab.inbox.join("sub/mine.txt").exists(), "a refused rename moved the file");
    assert!(lab.outbox.join("ok.txt").exists());
    assert!(temp_files(lab.root.path()).is_empty(), "{:?}", temp_files(lab.root.path()));
    lab.still_serves("writes and reads through symlinks");
}

/// Forwards the first datagram from a client to `to`, then drops
/// everything: the server sees a handshake start and never finish.
fn half_open_relay(to: u16) -> String {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let Ok((n, _)) = sock.recv_from(&mut buf) else { return };
        let _ = sock.send_to(&buf[..n], ("127.0.0.1", to));
        sock.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        while sock.recv_from(&mut buf).is_ok() {}
    });
    addr
}

#[test]
fn streams_and_connections_left_hanging_do_not_stop_the_daemon_or_grow_it_without_bound() {
    let mut lab = Lab::new("hostile-load");
    write_random(&lab.outbox.join("big.bin"), 64 * MIB, 10);
    lab.still_serves("the start");
    let (rss_start, _) = memory(lab.pid());

    // A handshake that starts and never finishes.
    let relay = half_open_relay(lab.bob.port);
    let home = lab.mallory.home.clone();
    let stalled = lab.rt.spawn(async move {
        let node = deftfs::node::Node::open(&home).unwrap();
        let endpoint = Endpoint::client(node.identity.clone(), node.directory.clone()).unwrap();
        let mut partner = node.config.partner("bob").cloned().unwrap();
        partner.endpoints = vec![relay];
        assert!(endpoint.connect(&partner).await.is_err(), "a handshake through a relay that drops all but one datagram");
    });
    std::thread::sleep(Duration::from_millis(300));
    lab.still_serves("a stalled handshake");

    // Many connections at once, each authenticated and then idle, each
    // with every extra stream it may open filled and never read, and a
    // pull whose chunk streams it never reads.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut raw = lab.connect();
        lab.rt.block_on(async {
            raw.handshake().await;
            for _ in 0..4 {
                let Ok(Ok((mut s, _r))) = tokio::time::timeout(Duration::from_millis(200), raw.conn.open_bi()).await else { break };
                let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&vec![b'x'; 2 * MIB])).await;
            }
        });
        held.push(raw);
    }
    lab.still_serves("40 idle connections with extra streams");
    // Only the control stream may be opened: nothing unread piles up.
    let (rss, _) = memory(lab.pid());
    assert!(rss < rss_start + 128 * MIB as u64, "40 idle connections grew the daemon from {} to {} MiB", rss_start >> 20, rss >> 20);
    for raw in held.iter_mut().take(10) {
        lab.rt.block_on(async {
            raw.send("DEFT DESCRIBE outbox big.bin\r\n").await;
            let Response::FileInfo { file_hash, .. } = raw.next().await else { panic!("DESCRIBE big.bin") };
            raw.send(&format!("DEFT GET t-starve outbox big.bin {file_hash} CHUNKS 0-200\r\n")).await;
        });
    }
    // PUT streams that stop halfway and never end.
    let up = Upload::new(&[1 << 20; 64], 11);
    let mut parked = Vec::new();
    for (n, raw) in held.iter_mut().skip(10).take(4).enumerate() {
        lab.rt.block_on(async {
            raw.send(&up.begin(&format!("t-park-{n}"), "inbox", &format!("park-{n}.bin"))).await;
            assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
            for i in 0..64u32 {
                let c = up.chunks[i as usize];
                let id = format!("t-park-{n}");
                let put = raw.put(&id, i, c.len, c.hash, &up.bytes(i as usize)[..c.len as usize / 2], false);
                match tokio::time::timeout(Duration::from_secs(2), put).await {
                    Ok(s) => parked.push(s),
                    Err(_) => break,
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    lab.still_serves("starved pulls and parked chunk streams");
    let (rss, hwm) = memory(lab.pid());
    eprintln!("daemon memory: {} MiB at the start, {} MiB now, peak {} MiB", rss_start >> 20, rss >> 20, hwm >> 20);
    assert!(rss < rss_start + 1024 * MIB as u64, "the daemon grew from {} to {} MiB", rss_start >> 20, rss >> 20);

    drop(parked);
    drop(held);
    lab.rt.block_on(stalled).unwrap();
    assert!(!lab.inbox.read_dir().unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("park-")));
    lab.still_serves("the attackers left");
}

#[test]
fn a_partner_is_held_to_a_bounded_number_of_connections_and_others_are_served() {
    let mut lab = Lab::new("hostile-conns");
    let limit = deftfs::node::MAX_CONNECTIONS_PER_PARTNER;
    let home = lab.mallory.home.clone();
    let close_of = |why: &quinn::ConnectionError| match why {
        quinn::ConnectionError::ApplicationClosed(c) => (c.error_code, String::from_utf8_lossy(&c.reason).into_owned()),
        other => panic!("expected an application close, got {other}"),
    };
    // One process (one address) opens the limit, then one more: its
    // handshake succeeds (the partner is trusted), then bob closes it,
    // saying why.
    let (endpoint, mut held, refused) = lab.rt.block_on(async move {
        let node = deftfs::node::Node::open(&home).unwrap();
        let endpoint = Endpoint::client(node.identity.clone(), node.directory.clone()).unwrap();
        let partner = node.config.partner("bob").cloned().unwrap();
        // Each with its control stream open (a session ends with it), and
        // placed by bob once it answers a request.
        let mut held = Vec::new();
        for _ in 0..limit {
            let (conn, _) = endpoint.connect(&partner).await.unwrap();
            let (send, recv) = conn.open_bi().await.unwrap();
            let mut ctl: Control<Response> = Control::new(send, recv);
            ctl.send_raw("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME WINDOW_SIZE:64\r\n").await.unwrap();
            assert!(matches!(ctl.recv().await, Ok(Response::Welcome { .. })));
            held.push((conn, ctl));
        }
        let (conn, _) = endpoint.connect(&partner).await.unwrap();
        let why = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("bob did not close the extra connection");
        // What a client tells its user instead of "connection lost".
        let told = deftfs::node::too_many_connections(&conn).expect("the refusal is recognised");
        assert!(told.contains("too many connections from this node (64 at once)"), "{told}");
        (endpoint, held, why)
    });
    let (code, reason) = close_of(&refused);
    assert_eq!(code, quinn::VarInt::from_u32(deftfs::node::TOO_MANY_CONNECTIONS), "{refused}");
    assert!(reason.contains("too many connections"), "{refused}");
    // Another partner is not affected.
    lab.still_serves(&format!("{limit} connections of mallory's"));
    // The same node from another address (a new process, after the first
    // was killed with its connections left open here): it is served, and
    // the oldest connection of the first gives its place up.
    let mut again = lab.connect();
    lab.rt.block_on(again.handshake());
    let oldest = held[0].0.clone();
    let replaced = lab.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(10), oldest.closed()).await.expect("the oldest connection was not closed")
    });
    let told = deftfs::node::too_many_connections(&held[0].0).expect("the replacement is recognised");
    assert!(told.contains("gave its place"), "{told}");
    let (code, reason) = close_of(&replaced);
    assert_eq!(code, quinn::VarInt::from_u32(deftfs::node::TOO_MANY_CONNECTIONS), "{replaced}");
    assert!(reason.contains("gave its place"), "{replaced}");
    assert!(held[1..].iter().all(|(c, _)| c.close_reason().is_none()), "only the oldest connection is closed");
    // The limit counts only open connections: once some close, the first
    // process may connect again.
    held.truncate(limit - 4);
    std::thread::sleep(Duration::from_millis(500));
    let home = lab.mallory.home.clone();
    lab.rt.block_on(async move {
        let node = deftfs::node::Node::open(&home).unwrap();
        let partner = node.config.partner("bob").cloned().unwrap();
        let (conn, _) = endpoint.connect(&partner).await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut ctl: Control<Response> = Control::new(send, recv);
        ctl.send_raw("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME WINDOW_SIZE:64\r\n").await.unwrap();
        assert!(matches!(ctl.recv().await, Ok(Response::Welcome { .. })), "a connection after some closed was not served");
    });
    let log = lab.daemon.log_text();
    assert!(log.contains("connection refused"), "the refusal is logged:\n{log}");
    assert!(log.contains("connection replaced"), "the replacement is logged:\n{log}");
}

/// AHEAD lines for the chunks `first..` of `up`, as sent ahead under `id`.
fn ahead_of(up: &Upload, id: &str, path: &str, first: usize, count: usize) -> String {
    Request::Ahead {
        ahead_id: Name::new(id).unwrap(),
        share: Name::new("inbox").unwrap(),
        path: SharePath::parse(path).unwrap(),
        first: first as u32,
        chunks: up.chunks[first..first + count]
            .iter()
            .enumerate()
            .map(|(k, c)| ChunkLine { index: (first + k) as u32, offset: c.offset, size: c.len, hash: c.hash })
            .collect(),
    }
    .encode()
}

/// Chunks sent ahead (AHEAD, PROTOCOL.md 8.6) are held to what they
/// declared: a lie is refused or NACKed and never lands in a file, a
/// declaration that does not follow the one before is refused, chunks
/// ahead never show in a listing, and a push that names them keeps only
/// the verified ones at the place its own manifest gives.
#[test]
fn chunks_sent_ahead_are_checked_and_a_push_keeps_only_what_it_names() {
    let mut lab = Lab::new("hostile-ahead");
    let up = Upload::new(&[100_000, 100_000, 100_000, 50_000], 13);
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        // Without the capability, AHEAD is refused.
        raw.handshake().await;
        raw.refused(&ahead_of(&up, "a-nocap", "big.bin", 0, 1), ErrorCode::BadRequest).await;
    });
    let mut raw = lab.connect();
    lab.rt.block_on(async {
        raw.send("DEFT HELLO 1.0 CHUNKED,PARALLEL,RESUME,AHEAD WINDOW_SIZE:64\r\n").await;
        match raw.next().await {
            Response::Welcome { caps, .. } => assert!(caps.contains(&deftfs::proto::Capability::Ahead), "{caps:?}"),
            other => panic!("expected WELCOME, got {other:?}"),
        }
        raw.send("DEFT AUTH mallory\r\n").await;
        assert!(matches!(raw.next().await, Response::AuthOk { .. }));
        // A read-only share, a path out of the share, an unknown id that
        // does not start at 0.
        let mut ro = ahead_of(&up, "a-ro", "big.bin", 0, 1);
        ro = ro.replacen(" inbox ", " outbox ", 1);
        raw.refused(&ro, ErrorCode::AccessDenied).await;
        raw.refused(&ahead_of(&up, "a-late", "big.bin", 2, 1), ErrorCode::BadRequest).await;
        // The first two chunks, declared and sent: chunk 1 with bytes that
        // are not its own.
        raw.send(&ahead_of(&up, "a-1", "big.bin", 0, 2)).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.len(), 2),
            other => panic!("AHEAD: {other:?}"),
        }
        raw.put("a-1", 0, 100_000, up.chunks[0].hash, up.bytes(0), true).await;
        assert_eq!(ack_of(&mut raw, 0).await, AckStatus::Ok);
        raw.put("a-1", 1, 100_000, up.chunks[1].hash, up.bytes(2), true).await;
        assert_eq!(ack_of(&mut raw, 1).await, AckStatus::Error("HASH_MISMATCH".into()));
        // An index not declared, and a size not the declared one.
        raw.put("a-1", 5, 100_000, up.chunks[0].hash, up.bytes(0), true).await;
        assert_eq!(ack_of(&mut raw, 5).await, AckStatus::Error("BAD_REQUEST".into()));
        raw.put("a-1", 0, 50_000, up.chunks[0].hash, &up.bytes(0)[..50_000], true).await;
        assert_eq!(ack_of(&mut raw, 0).await, AckStatus::Error("BAD_LENGTH".into()));
        // A declaration that skips chunks, or repeats them, or moves the
        // id to another path.
        raw.refused(&ahead_of(&up, "a-1", "big.bin", 3, 1), ErrorCode::BadRequest).await;
        raw.refused(&ahead_of(&up, "a-1", "big.bin", 0, 2), ErrorCode::BadRequest).await;
        raw.refused(&ahead_of(&up, "a-1", "other.bin", 2, 1), ErrorCode::BadRequest).await;
        // Chunks ahead are not part of the share.
        raw.send("DEFT LIST inbox\r\n").await;
        match raw.next().await {
            Response::Entries(entries) => {
                assert!(entries.iter().all(|e| !e.path.as_str().contains("deftpart")), "{entries:?}");
            }
            other => panic!("LIST: {other:?}"),
        }
        // The push names them: chunk 0 was verified and is kept; chunk 1
        // never was, so it is needed, as are the chunks never declared.
        let mut begin = up.begin("t-1", "inbox", "big.bin");
        begin = begin.replacen("\r\n", " AHEAD:a-1\r\n", 1);
        raw.send(&begin).await;
        let need = match raw.next().await {
            Response::TransferAccepted { need, .. } => need,
            other => panic!("BEGIN_TRANSFER: {other:?}"),
        };
        assert_eq!(need.iter().collect::<Vec<u32>>(), vec![1, 2, 3]);
        for i in 1..4u32 {
            raw.put("t-1", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
        }
        loop {
            match raw.next().await {
                Response::ChunkAck { status: AckStatus::Ok, .. } | Response::ChunkAckBatch { .. } => {}
                Response::TransferComplete(c) => {
                    assert_eq!(c.file_hash, up.file_hash());
                    break;
                }
                other => panic!("completing t-1: {other:?}"),
            }
        }
        // The id is spent: its chunks cannot be sent again.
        raw.put("a-1", 0, 100_000, up.chunks[0].hash, up.bytes(0), true).await;
        assert!(matches!(raw.next().await, Response::Error { code: ErrorCode::UnknownTransfer, .. }));
        raw.refused(&ahead_of(&up, "a-1", "big.bin", 2, 1), ErrorCode::BadRequest).await;
        // Chunks ahead of a file saved under another name than the push's
        // are not used, and their file goes.
        raw.send(&ahead_of(&up, "a-2", "first.bin", 0, 4)).await;
        let need = match raw.next().await {
            Response::TransferAccepted { need, .. } => need,
            other => panic!("AHEAD: {other:?}"),
        };
        for i in need.iter() {
            raw.put("a-2", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
            assert_eq!(ack_of(&mut raw, i).await, AckStatus::Ok);
        }
        assert!(!temp_files(&lab.inbox).is_empty(), "chunks ahead are kept in a temp file");
        let begin = up.begin("t-2", "inbox", "second.bin").replacen("\r\n", " AHEAD:a-2\r\n", 1);
        raw.send(&begin).await;
        let need = match raw.next().await {
            Response::TransferAccepted { need, .. } => need,
            other => panic!("BEGIN_TRANSFER: {other:?}"),
        };
        assert_eq!(need.len(), 4, "chunks ahead of another name are not used");
        for i in need.iter() {
            raw.put("t-2", i, up.chunks[i as usize].len, up.chunks[i as usize].hash, up.bytes(i as usize), true).await;
        }
        loop {
            match raw.next().await {
                Response::ChunkAck { status: AckStatus::Ok, .. } | Response::ChunkAckBatch { .. } => {}
                Response::TransferComplete(_) => break,
                other => panic!("completing t-2: {other:?}"),
            }
        }
        // A directory holding a file being sent ahead can be renamed, then
        // removed: the chunks sent ahead go with neither.
        let done = |r: Response| assert!(matches!(r, Response::Done { .. } | Response::StatOk(_)), "{r:?}");
        raw.send("DEFT MKDIR inbox d1 MODE:755\r\n").await;
        done(raw.next().await);
        raw.send(&ahead_of(&up, "a-3", "d1/x.bin", 0, 1)).await;
        assert!(matches!(raw.next().await, Response::TransferAccepted { .. }));
        raw.put("a-3", 0, up.chunks[0].len, up.chunks[0].hash, up.bytes(0), true).await;
        assert_eq!(ack_of(&mut raw, 0).await, AckStatus::Ok);
        assert_eq!(temp_files(&lab.inbox.join("d1")).len(), 1);
        raw.send("DEFT RENAME inbox d1 d2 NOREPLACE\r\n").await;
        done(raw.next().await);
        assert!(temp_files(&lab.inbox.join("d2")).is_empty(), "{:?}", temp_files(&lab.inbox.join("d2")));
        raw.send("DEFT REMOVE inbox d2 dir\r\n").await;
        done(raw.next().await);
    });
    assert!(!lab.inbox.join("d2").exists());
    assert_eq!(std::fs::read(lab.inbox.join("big.bin")).unwrap(), up.data);
    assert_eq!(std::fs::read(lab.inbox.join("second.bin")).unwrap(), up.data);
    assert!(!lab.inbox.join("first.bin").exists());
    assert!(temp_files(&lab.inbox).is_empty(), "{:?}", temp_files(&lab.inbox));
    lab.still_serves("chunks sent ahead that lie");
}

/// A serving node leaves chunks of zeros out of NEED and writes holes for
/// them (a sparse file): only chunks whose hash is that of as many zeros
/// as their length. A line that gives the hash of 4 KiB of zeros with
/// another length is needed like any chunk, and no bytes satisfy it.
#[test]
fn chunks_of_zeros_become_holes_only_when_they_are_zeros() {
    let mut lab = Lab::new("hostile-zeros");
    let mut raw = lab.connect();
    let (small, big) = (4096u32, 1u32 << 20);
    let (h_small, h_big) = (Hash::of(&vec![0u8; small as usize]), Hash::of(&vec![0u8; big as usize]));
    let payload = random_bytes(100_000, 11);
    // Ten 4 KiB and twenty 1 MiB chunks of zeros, data, then the lie.
    let mut lens: Vec<(u32, Hash)> = vec![(small, h_small); 10];
    lens.extend(vec![(big, h_big); 20]);
    lens.push((payload.len() as u32, Hash::of(&payload)));
    let honest = lens.len();
    let mut at = 0u64;
    let mut chunks = Vec::new();
    for (len, hash) in &lens {
        chunks.push(ChunkRef { offset: at, len: *len, hash: *hash });
        at += u64::from(*len);
    }
    let mut data = vec![0u8; at as usize];
    data[at as usize - payload.len()..].copy_from_slice(&payload);
    let sparse = Upload { data: data.clone(), chunks: chunks.clone() };
    let mut lying = Upload { data, chunks };
    lying.chunks.push(ChunkRef { offset: at, len: big, hash: h_small });
    lying.data.extend(vec![0u8; big as usize]);
    lab.rt.block_on(async {
        raw.handshake().await;
        // The honest one: only the data is needed.
        raw.send(&sparse.begin("t-sparse", "inbox", "sparse.img")).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.iter().collect::<Vec<u32>>(), [honest as u32 - 1]),
            other => panic!("BEGIN_TRANSFER: {other:?}"),
        }
        let last = honest - 1;
        raw.put("t-sparse", last as u32, sparse.chunks[last].len, sparse.chunks[last].hash, sparse.bytes(last), true).await;
        while !matches!(raw.next().await, Response::TransferComplete(_)) {}
        // The lie is needed, and zeros of its length do not pass for it.
        raw.send(&lying.begin("t-lie", "inbox", "lie.img")).await;
        match raw.next().await {
            Response::TransferAccepted { need, .. } => assert_eq!(need.iter().collect::<Vec<u32>>(), [honest as u32 - 1, honest as u32]),
            other => panic!("BEGIN_TRANSFER: {other:?}"),
        }
        raw.put("t-lie", honest as u32, big, h_small, &vec![0u8; big as usize], true).await;
        assert_eq!(ack_of(&mut raw, honest as u32).await, AckStatus::Error("HASH_MISMATCH".into()));
    });
    let img = lab.inbox.join("sparse.img");
    assert!(std::fs::read(&img).unwrap() == sparse.data, "sparse.img differs from what was pushed");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(allocated < 4 << 20, "sparse.img takes {allocated} bytes for 100 KB of data");
    assert!(!lab.inbox.join("lie.img").exists());
    lab.still_serves("chunks of zeros, true and false");
}
