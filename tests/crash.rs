//! `kill -9` of mountd in the middle of writes, at random moments, over
//! and over: what a power cut does to a laptop saving files into a
//! partner's share. Real daemons on loopback, a real FUSE mount.
//!
//! A writer thread saves whole versions of a few files through alice's
//! mount, in place (open with `O_TRUNC`, write in pieces, then `fsync` or a
//! plain close) or the way most applications save (the same into
//! `NAME.tmp`, then a rename over `NAME`), while the test kills alice's
//! daemon at a random moment, starts it again and mounts again. Then, on
//! the serving node:
//! - every file is one whole version, never a torn one (nothing
//!   half-written ever appears there);
//! - it is the last version whose `fsync`, close or rename returned, or one
//!   the writer started after it (a save cut by the kill may have been made
//!   durable before the kill), never an older one: nothing durable is lost;
//! - no other file appears but a `NAME.tmp` left by a cut save, itself a
//!   whole version (no conflict copy: nobody else writes);
//! - the mount shows what the serving node has.
//!
//! `DEFTFS_CRASH_SEED` and `DEFTFS_CRASH_ROUNDS` replay or lengthen a run.

mod common;

use common::world::World;
use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NAMES: [&str; 3] = ["c0.bin", "c1.bin", "c2.bin"];
const PIECE: usize = 256 * 1024;

/// Version `seq` of `name`, `len` bytes: a header line naming it, then
/// bytes only it has.
fn version(name: &str, seq: u64, len: usize) -> Vec<u8> {
    let mut out = format!("deftfs-crash {name} {seq} {len}\n").into_bytes();
    let seed = name.bytes().fold(seq.wrapping_mul(0x100_0000_01b3) | 1, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let body = len.saturating_sub(out.len());
    out.extend(random_bytes(body, seed));
    out
}

/// Which whole version of `name` (or of the file `name` is the temp file
/// of) `data` is, or why it is none.
fn identify(name: &str, data: &[u8]) -> Result<u64, String> {
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    let end = data.iter().take(100).position(|&b| b == b'\n').ok_or_else(|| format!("no header ({} bytes)", data.len()))?;
    let line = String::from_utf8_lossy(&data[..end]);
    let f: Vec<&str> = line.split(' ').collect();
    let (seq, len) = match f.as_slice() {
        ["deftfs-crash", n, s, l] if *n == name => (s.parse::<u64>(), l.parse::<usize>()),
        _ => return Err(format!("bad header {line:?} ({} bytes)", data.len())),
    };
    let (Ok(seq), Ok(len)) = (seq, len) else { return Err(format!("bad header {line:?}")) };
    if len != data.len() {
        return Err(format!("#{seq} says {len} bytes, the file has {}", data.len()));
    }
    if version(name, seq, len) != data {
        let want = version(name, seq, len);
        let first = want.iter().zip(data).position(|(p, q)| p != q);
        return Err(format!("#{seq} ({len} bytes) differs from what was written, first at byte {first:?}"));
    }
    Ok(seq)
}

/// Per file: the last version whose fsync or close returned, and the last
/// one the writer started.
#[derive(Default, Clone, Copy, Debug)]
struct Known {
    durable: Option<u64>,
    started: u64,
}

/// Save one version through the mount, in place or into `NAME.tmp` then
/// renamed over `NAME`; `Ok` once it is durable.
fn save(dir: &Path, name: &str, data: &[u8], fsync: bool, via_temp: bool) -> std::io::Result<()> {
    let target = if via_temp { format!("{name}.tmp") } else { name.to_string() };
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(dir.join(&target))?;
    for (i, piece) in data.chunks(PIECE).enumerate() {
        f.write_all_at(piece, (i * PIECE) as u64)?;
    }
    if fsync {
        f.sync_all()?;
    }
    close(f)?;
    if via_temp {
        std::fs::rename(dir.join(&target), dir.join(name))?;
    }
    Ok(())
}

/// Write versions until `stop`, or until a call fails (the mount's daemon
/// was killed) unless `keep_going` (the partner was: saves fail while it
/// is down, or are kept for it, and go on).
fn writer(
    dir: &Path,
    seed: u64,
    seq: &mut u64,
    known: &Mutex<BTreeMap<&'static str, Known>>,
    stop: &AtomicBool,
    keep_going: bool,
) -> String {
    let mut rnd = seed | 1;
    let mut failed = 0;
    while !stop.load(Ordering::SeqCst) {
        let name = NAMES[xorshift(&mut rnd) as usize % NAMES.len()];
        // Mostly small and mid-sized saves; now and then one large enough
        // to be sent ahead while it is written (16 MiB steps).
        let len = match xorshift(&mut rnd) % 10 {
            0 => 18 << 20,
            1..=3 => 64 + (xorshift(&mut rnd) % 4096) as usize,
            _ => 4096 + (xorshift(&mut rnd) % (3 << 20)) as usize,
        };
        let fsync = xorshift(&mut rnd) % 2 == 0;
        let via_temp = xorshift(&mut rnd) % 3 == 0;
        *seq += 1;
        known.lock().unwrap().entry(name).or_default().started = *seq;
        let data = version(name, *seq, len);
        match save(dir, name, &data, fsync, via_temp) {
            Ok(()) => known.lock().unwrap().entry(name).or_default().durable = Some(*seq),
            Err(_) if keep_going => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return format!("{name} #{} ({len} bytes, fsync {fsync}, via a temp file {via_temp}): {e}", *seq),
        }
    }
    format!("stopped ({failed} saves failed)")
}

/// What the serving node holds: name -> whole version, or why not.
fn served(files: &Path) -> BTreeMap<String, Result<u64, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(files).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Transfer temp files (`.NAME.deftpart-ID`): the share never lists them.
        if name.contains(".deftpart-") {
            continue;
        }
        let got = match std::fs::read(e.path()) {
            Ok(d) => identify(&name, &d),
            // Renamed or removed since the listing (a request the killed
            // daemon sent just before, landing now): not torn, and the
            // next look sees where it went.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => Err(format!("unreadable: {err}")),
        };
        out.insert(name, got);
    }
    out
}

/// Whether the serving node's files satisfy `known`; `Err` on a state no
/// later moment can mend (a torn file, a lost durable version, a stray
/// name), `Ok(false)` while durable versions are still on their way.
fn check(files: &Path, known: &BTreeMap<&'static str, Known>) -> Result<bool, String> {
    let got = served(files);
    let mut done = true;
    for (name, v) in &got {
        let file = name.strip_suffix(".tmp").unwrap_or(name);
        let Some(k) = NAMES.iter().find(|n| **n == file).and_then(|n| known.get(n)) else {
            return Err(format!("{name}: a name nobody wrote ({v:?})"));
        };
        let seq = v.clone().map_err(|e| format!("{name} on the serving node is no whole version: {e}"))?;
        if seq > k.started {
            return Err(format!("{name}: #{seq} was never written ({k:?})"));
        }
        if file == name && k.durable.is_some_and(|d| seq < d) {
            done = false;
        }
    }
    for (name, k) in known {
        if k.durable.is_some() && !got.contains_key(*name) {
            done = false;
        }
    }
    Ok(done)
}

#[test]
fn sigkill_of_mountd_in_the_middle_of_writes_loses_nothing_durable_and_tears_nothing() {
    let seed: u64 = env_or("DEFTFS_CRASH_SEED", 0x5eed_c7a5_0001);
    let rounds: usize = env_or("DEFTFS_CRASH_ROUNDS", 14);
    eprintln!("DEFTFS_CRASH_SEED={seed} DEFTFS_CRASH_ROUNDS={rounds}");
    let mut w = World::new("crash", &["alice"], "", |_| {});
    let known: Arc<Mutex<BTreeMap<&'static str, Known>>> = Arc::default();
    let mut rnd = seed | 1;
    let mut seq = 0u64;
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, k, s, wseed, mut wseq) = (w.c(0).mnt.clone(), known.clone(), stop.clone(), xorshift(&mut rnd), seq);
        let thread = std::thread::spawn(move || {
            let why = writer(&dir, wseed, &mut wseq, &k, &s, false);
            (why, wseq)
        });
        std::thread::sleep(Duration::from_millis(200 + xorshift(&mut rnd) % 1800));
        // kill -9 of alice's daemon, whatever it is doing.
        if let Some(d) = w.clients[0].daemon.as_mut() {
            d.kill();
        }
        stop.store(true, Ordering::SeqCst);
        // Nothing torn or stray, even before the daemon is back.
        if let Err(e) = check(&w.files, &known.lock().unwrap().clone()) {
            panic!("round {round}, right after the kill: {e}\n{}", w.c(0).log());
        }
        // Mounted again over the dead mount, not detached first: the dead
        // daemon may have left its connection hanging, with the writer
        // stuck in it, and the new mount must end it (abort_dead_mount).
        let dead = w.clients[0].guard.take();
        w.clients[0].daemon = Some(w.clients[0].node.start());
        w.clients[0].mount();
        // Its path is the new mount's now: not to be detached.
        std::mem::forget(dead);
        let (why, last) = thread.join().expect("the writer thread panicked");
        seq = last;
        eprintln!("round {round}: killed; the writer stopped at: {why}");
        let now = known.lock().unwrap().clone();
        converge(&w, &now, &format!("round {round}"));
    }
    let final_state = known.lock().unwrap().clone();
    assert!(final_state.values().any(|k| k.durable.is_some()), "no save was ever durable: the test proved nothing ({final_state:?})");
}

/// Wait until every durable version is on the serving node and nothing
/// there is torn or stray, then until the mount reads what it has.
fn converge(w: &World, now: &BTreeMap<&'static str, Known>, when: &str) {
    let log = || format!("alice:\n{}\nbob:\n{}", w.c(0).log(), w.bob_daemon.as_ref().map(|d| d.log_text()).unwrap_or_default());
    let start = Instant::now();
    loop {
        match check(&w.files, now) {
            Ok(true) => break,
            Ok(false) if start.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(100)),
            Ok(false) => {
                panic!("{when}: durable versions never reached the serving node: {now:?}, it has {:?}\n{}", served(&w.files), log())
            }
            Err(e) => panic!("{when}: {e}\n{}", log()),
        }
    }
    w.c(0).settle();
    for name in NAMES {
        let server = std::fs::read(w.server(name)).ok();
        let seen = || std::fs::read(w.c(0).at(name)).ok() == server;
        if !wait_until(Duration::from_secs(10), seen) {
            let mount = std::fs::read(w.c(0).at(name)).map(|d| identify(name, &d));
            panic!(
                "{when}: {name} through the mount is {mount:?}, on the serving node {:?}\n{}",
                server.map(|d| identify(name, &d)),
                log()
            );
        }
    }
    assert!(!log().contains("panicked"), "{when}: a daemon panicked:\n{}", log());
}

/// The same saves while the serving node's daemon is killed with
/// `kill -9` at random moments and started again: saves that fail while
/// it is down are allowed, those that returned must all arrive, whole.
#[test]
fn sigkill_of_the_serving_daemon_during_saves_loses_nothing_durable_and_tears_nothing() {
    let seed: u64 = env_or("DEFTFS_CRASH_SEED", 0x5eed_c7a5_0001) ^ 0x5e4e;
    let rounds: usize = env_or("DEFTFS_CRASH_SERVER_ROUNDS", 6);
    eprintln!("DEFTFS_CRASH_SEED={} DEFTFS_CRASH_SERVER_ROUNDS={rounds}", seed ^ 0x5e4e);
    let mut w = World::new("crash-server", &["alice"], "", |_| {});
    let known: Arc<Mutex<BTreeMap<&'static str, Known>>> = Arc::default();
    let mut rnd = seed | 1;
    let stop = Arc::new(AtomicBool::new(false));
    let (dir, k, s, wseed) = (w.c(0).mnt.clone(), known.clone(), stop.clone(), xorshift(&mut rnd));
    let thread = std::thread::spawn(move || writer(&dir, wseed, &mut 0, &k, &s, true));
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(300 + xorshift(&mut rnd) % 1200));
        if let Some(d) = w.bob_daemon.as_mut() {
            d.kill();
        }
        // What a reader on the serving node sees is whole, always.
        let now = known.lock().unwrap().clone();
        if let Err(e) = check(&w.files, &now) {
            panic!("round {round}, right after the kill: {e}\n{}", w.c(0).log());
        }
        std::thread::sleep(Duration::from_millis(xorshift(&mut rnd) % 800));
        w.bob_daemon = Some(w.bob.start());
        eprintln!("round {round}: the serving daemon was killed and started again");
    }
    stop.store(true, Ordering::SeqCst);
    let why = thread.join().expect("the writer thread panicked");
    eprintln!("the writer {why}");
    let now = known.lock().unwrap().clone();
    converge(&w, &now, "at the end");
    assert!(now.values().any(|k| k.durable.is_some()), "no save was ever durable: the test proved nothing ({now:?})");
}
