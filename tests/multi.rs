//! A multi-node concurrency exerciser: alice and carol mount bob:files and
//! bob edits the share directory himself, one thread per actor, all at
//! once, on a small namespace (shared files, files private to one actor, a
//! directory that comes and goes and moves). Interleavings are not
//! modelled; what must hold whatever the interleaving is checked:
//!
//! - every operation succeeds or fails with an errno docs/SEMANTICS.md
//!   allows for it (`EBUSY` under another node's lease, `ENOENT` after a
//!   concurrent removal, `ESTALE` for a handle whose file changed, ...);
//! - every write writes a whole, self-identifying version (a header naming
//!   writer, sequence number and length, then a body derived from them), and
//!   every read, through a mount or on the serving node, finds one whole
//!   version: never a torn, mixed or empty file;
//! - once all handles are closed, both mounts show exactly the serving
//!   node's tree (names, kinds, sizes, contents, conflict copies included),
//!   every file in it is a whole version, and every version whose close
//!   returned success is still there (as the file or a conflict copy) unless
//!   a later successful change could have replaced or removed it;
//! - no daemon log says "panicked".
//!
//! `DEFTFS_MULTI_SEED` and `DEFTFS_MULTI_OPS` (operations per actor) replay
//! or lengthen a run; `DEFTFS_MULTI_TRACE` sets how many operations of each
//! actor a failure prints.

mod common;

use common::world::World;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Files every actor writes, reads, renames and removes.
const SHARED: [&str; 5] = ["s0.txt", "d0/s1.txt", "d0/s2.txt", "d2/s3.txt", "d3/s3.txt"];
/// Directories that come, go and move (d0 and d1 stay).
const MOVING: [&str; 2] = ["d2", "d3"];
const ACTORS: [&str; 3] = ["alice", "carol", "bob"];

/// A version: who wrote it and its sequence number in the writer's run.
type Version = (String, u64);

fn header(writer: &str, seq: u64, len: usize) -> String {
    format!("deftfs-multi {writer} {seq} {len}\n")
}

/// The whole content of version `seq` of `writer`, `len` bytes or a little
/// more (the header must fit).
fn version_bytes(writer: &str, seq: u64, len: usize) -> Vec<u8> {
    // The header's own length depends on `len`: settle on a fixed point.
    let mut total = len.max(header(writer, seq, len).len() + 1);
    while header(writer, seq, total).len() >= total {
        total += 1;
    }
    let h = header(writer, seq, total);
    let mut out = h.clone().into_bytes();
    out.extend(random_bytes(total - h.len(), body_seed(writer, seq)));
    out
}

fn body_seed(writer: &str, seq: u64) -> u64 {
    writer.bytes().fold(seq.wrapping_mul(0x100_0000_01b3), |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Which whole version `data` is, or why it is none.
fn identify(data: &[u8]) -> Result<Version, String> {
    let end = data.iter().take(80).position(|&b| b == b'\n').ok_or_else(|| format!("no header ({} bytes)", data.len()))?;
    let line = std::str::from_utf8(&data[..end]).map_err(|_| format!("header not UTF-8 ({} bytes)", data.len()))?;
    let f: Vec<&str> = line.split(' ').collect();
    let (writer, seq, len) = match f.as_slice() {
        ["deftfs-multi", w, s, l] => (w.to_string(), s.parse::<u64>(), l.parse::<usize>()),
        _ => return Err(format!("bad header {line:?}")),
    };
    let (Ok(seq), Ok(len)) = (seq, len) else { return Err(format!("bad header {line:?}")) };
    if len != data.len() {
        return Err(format!("{writer} #{seq} says {len} bytes, the file has {}", data.len()));
    }
    if version_bytes(&writer, seq, len) != data {
        let want = version_bytes(&writer, seq, len);
        let first = want.iter().zip(data).position(|(p, q)| p != q);
        return Err(format!("{writer} #{seq} ({len} bytes) differs from what was written, first at byte {first:?}"));
    }
    Ok((writer, seq))
}

/// What a tree holds: path -> None for a directory, Some((stat size,
/// content)) for a file. Temp files of transfers (`.deftpart-`) are left
/// out: the share never lists them.
type Tree = BTreeMap<String, Option<(u64, Vec<u8>)>>;

fn snapshot(root: &Path) -> Result<Tree, String> {
    fn go(root: &Path, dir: &Path, out: &mut Tree) -> Result<(), String> {
        let rd = std::fs::read_dir(dir).map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("readdir {}: {e}", dir.display()))?;
            let p = e.path();
            let rel = p.strip_prefix(root).map_err(|e| e.to_string())?.to_string_lossy().into_owned();
            if rel.contains(".deftpart-") {
                continue;
            }
            let m = std::fs::metadata(&p).map_err(|e| format!("stat {}: {e}", p.display()))?;
            if m.is_dir() {
                out.insert(rel, None);
                go(root, &p, out)?;
            } else {
                let data = std::fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
                out.insert(rel, Some((m.len(), data)));
            }
        }
        Ok(())
    }
    let mut out = Tree::new();
    go(root, root, &mut out)?;
    Ok(out)
}

/// The first difference between two trees.
fn diff(want: &Tree, got: &Tree) -> Option<String> {
    for (k, v) in want {
        match (v, got.get(k)) {
            (_, None) => return Some(format!("{k} is missing")),
            (None, Some(Some(_))) | (Some(_), Some(None)) => return Some(format!("{k}: a directory on one side, a file on the other")),
            (Some((s, d)), Some(Some((gs, gd)))) if s != gs || d != gd => {
                return Some(format!("{k}: size {gs} with {} bytes read, expected size {s} ({:?})", gd.len(), identify(d)))
            }
            _ => {}
        }
    }
    got.keys().find(|k| !want.contains_key(*k)).map(|k| format!("{k} should not be there"))
}

#[derive(Clone, Debug)]
enum Op {
    /// Write a whole version: `inplace` rewrites an existing file (no
    /// O_TRUNC: pwrite at 0, then ftruncate), else O_CREAT|O_TRUNC.
    Write {
        path: String,
        ver: u64,
        len: usize,
        inplace: bool,
        hold_ms: u64,
        fsync: bool,
    },
    Read {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    List {
        path: String,
    },
}

impl Op {
    /// Paths whose file content this operation, if it succeeded, may have
    /// replaced or removed.
    fn destroys(&self) -> Vec<&str> {
        match self {
            Op::Write { path, .. } | Op::Unlink { path } => vec![path],
            Op::Rename { to, .. } => vec![to],
            _ => vec![],
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    actor: &'static str,
    start: Duration,
    end: Duration,
    op: Op,
    /// Ok, or the failing step and its errno.
    result: Result<String, (String, i32)>,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = match &self.result {
            Ok(s) => format!("ok {s}"),
            Err((step, e)) => format!("{step}: {}", std::io::Error::from_raw_os_error(*e)),
        };
        write!(f, "{:>8.3}-{:<8.3} {} {:?} -> {r}", self.start.as_secs_f64(), self.end.as_secs_f64(), self.actor, self.op)
    }
}

/// What the actors share: the traces, the first failure, the stop flag,
/// and what each actor is doing now (for a hang).
struct Shared {
    t0: Instant,
    traces: Vec<Mutex<Vec<Event>>>,
    current: Vec<Mutex<Option<(Duration, Op)>>>,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn report(&self, seed: u64, what: &str) -> String {
        let keep = env_or("DEFTFS_MULTI_TRACE", 25);
        let mut s = format!("seed {seed}: {what}\n");
        for f in self.failures.lock().unwrap().iter() {
            s += &format!("  {f}\n");
        }
        for (i, actor) in ACTORS.iter().enumerate() {
            let t = self.traces[i].lock().unwrap();
            s += &format!("last operations of {actor} ({} in all):\n", t.len());
            for e in &t[t.len().saturating_sub(keep)..] {
                s += &format!("  {e}\n");
            }
            if let Some((at, op)) = &*self.current[i].lock().unwrap() {
                s += &format!("  {actor} is still in {op:?}, started at {:.3}\n", at.as_secs_f64());
            }
        }
        s
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Run `op` at `root`. `tmp`: where bob stages a version before renaming it
/// into place, so that his own writes are atomic too (a torn file on his
/// side would be his, not the mount's). Returns what it found, or the
/// failing step and its errno; reading a file that is no whole version is
/// a failure of its own (`Err` with errno 0).
fn run(op: &Op, actor: &str, root: &Path, tmp: Option<&Path>) -> Result<String, (String, i32)> {
    let at = |p: &str| root.join(p);
    let step = |name: &'static str| move |e: std::io::Error| (name.to_string(), errno(&e));
    match op {
        Op::Write { path, ver, len, inplace, hold_ms, fsync } => {
            let data = version_bytes(actor, *ver, *len);
            if let Some(tmp) = tmp {
                let t = tmp.join(format!("{actor}-{ver}"));
                std::fs::write(&t, &data).map_err(step("write tmp"))?;
                std::thread::sleep(Duration::from_millis(*hold_ms));
                return std::fs::rename(&t, at(path)).map(|_| String::new()).map_err(step("rename into place"));
            }
            let f = if *inplace {
                std::fs::OpenOptions::new().write(true).open(at(path)).map_err(step("open"))?
            } else {
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(at(path)).map_err(step("open"))?
            };
            let wrote = (|| {
                f.write_all_at(&data, 0).map_err(step("write"))?;
                if *inplace {
                    f.set_len(data.len() as u64).map_err(step("ftruncate"))?;
                }
                std::thread::sleep(Duration::from_millis(*hold_ms));
                if *fsync {
                    f.sync_all().map_err(step("fsync"))?;
                }
                Ok(())
            })();
            let closed = close(f).map_err(step("close"));
            wrote?;
            closed.map(|_| String::new())
        }
        Op::Read { path } => {
            let mut f = std::fs::File::open(at(path)).map_err(step("open"))?;
            let mut data = Vec::new();
            f.read_to_end(&mut data).map_err(step("read"))?;
            match identify(&data) {
                Ok((w, s)) => Ok(format!("{w} #{s}")),
                Err(why) => Err((format!("read a torn file: {why}"), 0)),
            }
        }
        Op::Unlink { path } => std::fs::remove_file(at(path)).map(|_| String::new()).map_err(step("unlink")),
        Op::Rename { from, to } => std::fs::rename(at(from), at(to)).map(|_| String::new()).map_err(step("rename")),
        Op::Mkdir { path } => std::fs::create_dir(at(path)).map(|_| String::new()).map_err(step("mkdir")),
        Op::Rmdir { path } => std::fs::remove_dir(at(path)).map(|_| String::new()).map_err(step("rmdir")),
        Op::List { path } => {
            let mut names = Vec::new();
            for e in std::fs::read_dir(at(path)).map_err(step("readdir"))? {
                let e = e.map_err(step("readdir"))?;
                let name = e.file_name().to_string_lossy().into_owned();
                // An entry listed may be gone by the time it is asked about.
                match std::fs::metadata(e.path()) {
                    Ok(_) => names.push(name),
                    Err(e) if errno(&e) == libc::ENOENT => {}
                    Err(e) => return Err((format!("stat {name}"), errno(&e))),
                }
            }
            names.sort();
            Ok(names.join(","))
        }
    }
}

/// Whether a mount may fail `op` with `e` while other nodes change the share
/// (docs/SEMANTICS.md).
fn allowed_through_mount(op: &Op, step: &str, e: i32) -> bool {
    use libc::*;
    match op {
        // Another node's lease; a directory removed or moved meanwhile.
        Op::Write { .. } if step == "open" => [EBUSY, ENOENT].contains(&e),
        // In place: the base of the written range may be a version gone.
        Op::Write { inplace: true, .. } if step == "write" || step == "ftruncate" => e == ESTALE,
        Op::Write { .. } => false,
        // A handle whose file changed (ESTALE) or was removed or renamed
        // (ENOENT) on the partner.
        Op::Read { .. } => (step == "open" && e == ENOENT) || (step == "read" && [ESTALE, ENOENT].contains(&e)),
        Op::Unlink { .. } => [ENOENT, EBUSY].contains(&e),
        // Renames of files and directories: gone, leased, or over a
        // directory that has entries.
        Op::Rename { .. } => [ENOENT, EBUSY, ENOTEMPTY, EEXIST].contains(&e),
        Op::Mkdir { .. } => [EEXIST, ENOENT].contains(&e),
        Op::Rmdir { .. } => [ENOENT, ENOTEMPTY].contains(&e),
        Op::List { .. } => e == ENOENT,
    }
}

/// The next operation of `actor`.
fn pick(actor: &str, rnd: &mut dyn FnMut(usize) -> usize, seq: &mut u64) -> Op {
    let private = [format!("d1/{actor}.txt"), format!("d1/{actor}.old")];
    let file = |rnd: &mut dyn FnMut(usize) -> usize| -> String {
        if rnd(4) == 0 {
            private[rnd(2)].clone()
        } else {
            SHARED[rnd(SHARED.len())].to_string()
        }
    };
    match rnd(100) {
        0..=34 => {
            *seq += 1;
            // Mostly small; sometimes several chunks (256 KiB on average).
            let len = if rnd(4) == 0 { 200_000 + rnd(1_400_000) } else { 1 + rnd(40_000) };
            let path = file(rnd);
            Op::Write {
                path,
                ver: *seq,
                len,
                inplace: rnd(4) == 0,
                hold_ms: if rnd(3) == 0 { rnd(400) as u64 } else { 0 },
                fsync: rnd(5) == 0,
            }
        }
        35..=59 => Op::Read { path: file(rnd) },
        60..=66 => Op::Unlink { path: file(rnd) },
        67..=79 => {
            if rnd(3) == 0 {
                let i = rnd(2);
                Op::Rename { from: private[i].clone(), to: private[1 - i].clone() }
            } else {
                Op::Rename { from: file(rnd), to: file(rnd) }
            }
        }
        80..=83 => Op::Mkdir { path: MOVING[rnd(2)].to_string() },
        84..=86 => Op::Rmdir { path: MOVING[rnd(2)].to_string() },
        87..=90 => {
            let i = rnd(2);
            Op::Rename { from: MOVING[i].to_string(), to: MOVING[1 - i].to_string() }
        }
        _ => Op::List { path: ["", "d0", "d1", "d2", "d3"][rnd(5)].to_string() },
    }
}

#[test]
fn concurrent_operations_from_two_mounts_and_the_serving_node_keep_every_version_whole() {
    exercise("multi", env_or("DEFTFS_MULTI_SEED", 0x3417_0001), &[]);
}

/// The same with a whole local copy for every file read whole, so that
/// re-opens go through FUSE passthrough while files change under them
/// (the copies otherwise need files of 16 MiB).
#[test]
fn the_same_through_whole_copies_read_by_the_kernel() {
    exercise("multi-flat", env_or("DEFTFS_MULTI_SEED", 0x3417_0002), &[("DEFTFS_FLAT_MIN", "1")]);
}

fn exercise(tag: &str, seed: u64, env: &[(&str, &str)]) {
    let ops: usize = env_or("DEFTFS_MULTI_OPS", 300);
    eprintln!("{tag}: seed {seed}, {ops} operations per actor (DEFTFS_MULTI_SEED, DEFTFS_MULTI_OPS), env {env:?}");
    let w = World::granting_with_env("read-write", tag, &["alice", "carol"], "", env, |files| {
        for d in ["d0", "d1", "d2"] {
            std::fs::create_dir(files.join(d)).unwrap();
        }
    });
    let bob_tmp = w.root.path().join("bob-tmp");
    std::fs::create_dir(&bob_tmp).unwrap();
    let roots: [PathBuf; 3] = [w.c(0).mnt.clone(), w.c(1).mnt.clone(), w.files.clone()];
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        traces: ACTORS.iter().map(|_| Mutex::new(Vec::new())).collect(),
        current: ACTORS.iter().map(|_| Mutex::new(None)).collect(),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (i, actor) in ACTORS.iter().copied().enumerate() {
        let (shared, root, done) = (shared.clone(), roots[i].clone(), done_tx.clone());
        let tmp = (actor == "bob").then(|| bob_tmp.clone());
        std::thread::spawn(move || {
            let mut x = (seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            let mut rnd = move |n: usize| -> usize { (xorshift(&mut x) % n.max(1) as u64) as usize };
            let mut seq = 0;
            for _ in 0..ops {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let op = pick(actor, &mut rnd, &mut seq);
                let start = shared.t0.elapsed();
                *shared.current[i].lock().unwrap() = Some((start, op.clone()));
                let result = run(&op, actor, &root, tmp.as_deref());
                *shared.current[i].lock().unwrap() = None;
                let ev = Event { actor, start, end: shared.t0.elapsed(), op, result };
                match &ev.result {
                    Err((_, 0)) => shared.fail(format!("{ev}")),
                    Err((step, e)) if tmp.is_none() && !allowed_through_mount(&ev.op, step, *e) => {
                        shared.fail(format!("errno not allowed: {ev}"))
                    }
                    _ => {}
                }
                shared.traces[i].lock().unwrap().push(ev);
                // A little room between operations so that the others interleave.
                std::thread::sleep(Duration::from_millis(rnd(30) as u64));
            }
            let _ = done.send(i);
        });
    }
    drop(done_tx);
    // A hang is a failure: every actor must finish in time.
    let deadline = Instant::now() + Duration::from_secs(60 + ops as u64);
    for _ in ACTORS {
        if done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            panic!("{}", shared.report(seed, "an actor did not finish (a hang)"));
        }
    }
    let fail = |what: String| -> ! { panic!("{}", shared.report(seed, &what)) };
    if !shared.failures.lock().unwrap().is_empty() {
        fail("an operation failed".into());
    }
    let run_time = shared.t0.elapsed();

    // Quiescent: every handle is closed, and (closes push behind them)
    // every push is in. The mounts must come to show the serving node's
    // tree within a few watch intervals.
    for c in &w.clients {
        c.settle();
    }
    let mut last = String::new();
    let converged = wait_until(Duration::from_secs(15), || {
        let server = match snapshot(&w.files) {
            Ok(t) => t,
            Err(e) => {
                last = format!("serving node: {e}");
                return false;
            }
        };
        for c in &w.clients {
            match snapshot(&c.mnt) {
                Ok(t) => {
                    if let Some(d) = diff(&server, &t) {
                        last = format!("{}'s mount: {d}", c.node.name);
                        return false;
                    }
                }
                Err(e) => {
                    last = format!("{}'s mount: {e}", c.node.name);
                    return false;
                }
            }
        }
        true
    });
    if !converged {
        fail(format!("the mounts never showed the serving node's tree: {last}"));
    }
    let tree = snapshot(&w.files).unwrap_or_else(|e| fail(e));

    // Every file is a whole version; every name is one of the namespace or
    // a conflict copy of one.
    let mut found: BTreeSet<Version> = BTreeSet::new();
    let mut copies = 0;
    let names: BTreeSet<String> =
        SHARED.iter().map(|s| s.to_string()).chain(ACTORS.iter().flat_map(|a| [format!("d1/{a}.txt"), format!("d1/{a}.old")])).collect();
    for (path, v) in &tree {
        let Some((_, data)) = v else { continue };
        match identify(data) {
            Ok(ver) => {
                found.insert(ver);
            }
            Err(why) => fail(format!("at the end, {path} is no whole version: {why}")),
        }
        if path.contains(" (conflict ") {
            copies += 1;
        } else if !names.contains(path) {
            fail(format!("at the end, {path} is a name nobody made"));
        }
    }

    // Nothing lost: a version whose close succeeded is still somewhere, or
    // a successful change that may have come after it (it ended after the
    // write started) replaced or removed the file it was in. Where it can
    // be is followed through successful renames, of it and of its
    // directories.
    let events: Vec<Event> = shared.traces.iter().flat_map(|t| t.lock().unwrap().clone()).filter(|e| e.result.is_ok()).collect();
    let mut lost = Vec::new();
    for e in &events {
        let Op::Write { path, ver, .. } = &e.op else { continue };
        if found.contains(&(e.actor.to_string(), *ver)) {
            continue;
        }
        let mut places: BTreeSet<String> = [path.clone()].into();
        loop {
            let before = places.len();
            for r in events.iter().filter(|r| r.end > e.start) {
                if let Op::Rename { from, to } = &r.op {
                    for p in places.clone() {
                        if let Some(rest) = p.strip_prefix(from.as_str()).filter(|rest| rest.is_empty() || rest.starts_with('/')) {
                            places.insert(format!("{to}{rest}"));
                        }
                    }
                }
            }
            if places.len() == before {
                break;
            }
        }
        let excused =
            events.iter().filter(|r| r.end > e.start && !std::ptr::eq(*r, e)).any(|r| r.op.destroys().iter().any(|d| places.contains(*d)));
        if !excused {
            lost.push(format!("{e}"));
        }
    }
    if !lost.is_empty() {
        fail(format!("versions whose close succeeded are gone and nothing replaced them:\n    {}", lost.join("\n    ")));
    }

    for (name, log) in [("bob", w.bob_daemon.as_ref().map(|d| d.log_text()).unwrap_or_default())]
        .into_iter()
        .chain(w.clients.iter().map(|c| (c.node.name.as_str(), c.log())))
    {
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            fail(format!("{name}'s daemon panicked: {line}"));
        }
    }

    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let all: usize = shared.traces.iter().map(|t| t.lock().unwrap().len()).sum();
    let busy = shared.traces.iter().flat_map(|t| t.lock().unwrap().clone()).filter(|e| matches!(e.result, Err((_, libc::EBUSY)))).count();
    let writes = count(&|e| matches!(e.op, Op::Write { .. }));
    eprintln!(
        "{all} operations in {:.1} s: {} succeeded ({writes} writes), {busy} EBUSY; at the end {} files, {copies} conflict copies",
        run_time.as_secs_f64(),
        events.len(),
        tree.values().filter(|v| v.is_some()).count()
    );
    assert!(writes > ops / 4 && busy > 0, "{}", shared.report(seed, "the run covered too little"));
}
