//! End-to-end mounts: real daemons on loopback, real FUSE mounts through
//! /dev/fuse, the real `deftfs` CLI talking to the daemon's control socket.
//! Every mount is detached on drop ([`MountGuard`]), on every path.

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Bob serves `files` (read access for alice); alice's daemon mounts it.
/// Fields drop in order: mount, daemons, then the directories.
struct Setup {
    guard: Option<MountGuard>,
    a_daemon: Daemon,
    b_daemon: Daemon,
    a: TestNode,
    b: TestNode,
    files: PathBuf,
    mnt: PathBuf,
    _root: TempDir,
}

impl Setup {
    fn new(tag: &str, prepare: impl FnOnce(&Path)) -> Setup {
        let root = TempDir::new(tag);
        let (a, b) = TestNode::pair(root.path());
        let files = root.path().join("bob-files");
        std::fs::create_dir_all(&files).unwrap();
        prepare(&files);
        b.ok(&["share", "add", "files", files.to_str().unwrap(), "--partner", "alice", "--access", "read"]);
        let mnt = root.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let b_daemon = b.start();
        let a_daemon = a.start();
        Setup { guard: None, a_daemon, b_daemon, a, b, files, mnt, _root: root }
    }

    fn mount(&mut self, extra: &[&str]) {
        self.guard = Some(mount_at(&self.a, "bob:files", &self.mnt, extra));
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The first (only) mount of `deftfs mounts --json`.
    fn info(&self) -> serde_json::Value {
        let v = self.a.json(&["mounts"]);
        v.as_array().and_then(|a| a.first()).cloned().unwrap_or_else(|| panic!("no mount listed: {v}"))
    }

    /// Replace `rel` on bob's side with `len` random bytes and wait until
    /// the mount shows the new content; returns its hash.
    fn replace_and_see(&self, rel: &str, len: usize, seed: u64) -> String {
        write_random(&self.files.join(rel), len, seed);
        let after = hash_file(&self.files.join(rel));
        let seen = wait_until(Duration::from_secs(10), || hash_file(&self.at(rel)) == after);
        assert!(seen, "the changed {rel} did not show through the mount within 10 s");
        after
    }

    fn status(&self, rel: &str) -> serde_json::Value {
        self.a.json(&["status", self.at(rel).to_str().unwrap()])
    }
}

#[test]
fn mounted_256_mib_file_reads_back_identical_sequentially_and_at_random_offsets() {
    let mut s = Setup::new("seqrand", |dir| {
        write_random(&dir.join("big.bin"), 256 * MIB, 7);
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        std::fs::write(dir.join("sub/deeper/small.txt"), b"hello\n").unwrap();
    });
    s.mount(&[]);
    let src = s.files.join("big.bin");
    assert_eq!(std::fs::metadata(s.at("big.bin")).unwrap().len(), 256 * MIB as u64);
    assert_eq!(std::fs::read(s.at("sub/deeper/small.txt")).unwrap(), b"hello\n");

    // Random offsets first, on a cold cache.
    let (mounted_file, source) = (std::fs::File::open(s.at("big.bin")).unwrap(), std::fs::File::open(&src).unwrap());
    let mut x = 0x1234_5678_u64;
    for _ in 0..200 {
        let len = (xorshift(&mut x) % (3 * MIB as u64)) as usize + 1;
        let offset = xorshift(&mut x) % (256 * MIB as u64 - len as u64);
        let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
        mounted_file.read_exact_at(&mut got, offset).unwrap();
        source.read_exact_at(&mut want, offset).unwrap();
        assert!(got == want, "bytes differ at offset {offset}, length {len}");
    }
    // A read past the end returns nothing; one across it returns the tail.
    let mut tail = vec![0u8; 100];
    assert_eq!(mounted_file.read_at(&mut tail, 256 * MIB as u64).unwrap(), 0);
    assert_eq!(mounted_file.read_at(&mut tail, 256 * MIB as u64 - 10).unwrap(), 10);

    assert_eq!(hash_file(&s.at("big.bin")), hash_file(&src), "sequential read differs from the source");

    // Read-only until write-back lands: changes fail at once with EROFS.
    for attempt in [
        std::fs::File::create(s.at("new.txt")).map(|_| ()),
        std::fs::OpenOptions::new().write(true).open(s.at("big.bin")).map(|_| ()),
        std::fs::remove_file(s.at("sub/deeper/small.txt")),
        std::fs::create_dir(s.at("newdir")),
    ] {
        assert_eq!(attempt.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
}

#[test]
fn first_mebibyte_of_a_256_mib_file_fetches_only_a_few_chunks() {
    let mut s = Setup::new("firstmib", |dir| {
        write_random(&dir.join("big.bin"), 256 * MIB, 8);
    });
    s.mount(&[]);
    let mut f = std::fs::File::open(s.at("big.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    f.read_exact(&mut buf).unwrap();
    let mut want = vec![0u8; MIB];
    std::fs::File::open(s.files.join("big.bin")).unwrap().read_exact(&mut want).unwrap();
    assert!(buf == want);
    // Let any readahead in flight land before counting.
    std::thread::sleep(Duration::from_millis(500));
    let info = s.info();
    let fetched = info["bytes_fetched"].as_u64().unwrap();
    let chunks = info["chunks_fetched"].as_u64().unwrap();
    eprintln!("first MiB: {chunks} chunks, {fetched} bytes fetched");
    assert!(fetched >= MIB as u64, "{info}");
    assert!(fetched <= 4 * MIB as u64 && chunks <= 16, "reading 1 MiB fetched {chunks} chunks, {fetched} bytes: {info}");
    let st = s.status("big.bin");
    assert!(st["local_bytes"].as_u64().unwrap() <= 4 * MIB as u64, "{st}");
    assert_eq!(st["size"], 256 * MIB);
}

#[test]
fn listing_10000_files_fetches_no_content() {
    let mut s = Setup::new("ls10k", |dir| {
        let d = dir.join("many");
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..10_000 {
            std::fs::write(d.join(format!("file-{i:05}.txt")), format!("content of file {i}\n")).unwrap();
        }
    });
    s.mount(&[]);
    let mut n = 0;
    let mut total = 0;
    for e in std::fs::read_dir(s.at("many")).unwrap() {
        let e = e.unwrap();
        let md = std::fs::metadata(e.path()).unwrap();
        assert!(md.is_file());
        total += md.len();
        n += 1;
    }
    assert_eq!(n, 10_000);
    let expected: u64 = (0..10_000).map(|i| format!("content of file {i}\n").len() as u64).sum();
    assert_eq!(total, expected);
    let info = s.info();
    assert_eq!(info["bytes_fetched"], 0, "a listing fetched content: {info}");
    // And one of them reads.
    assert_eq!(std::fs::read_to_string(s.at("many/file-04711.txt")).unwrap(), "content of file 4711\n");
}

#[test]
fn a_64_mib_cache_stays_bounded_and_a_pinned_file_survives() {
    let mut s = Setup::new("cache", |dir| {
        write_random(&dir.join("pinned.bin"), 8 * MIB, 20);
        for i in 0..4 {
            write_random(&dir.join(format!("f{i}.bin")), 64 * MIB, 21 + i);
        }
    });
    s.mount(&["--cache-size", "64M"]);
    let out = s.a.ok(&["pin", s.at("pinned.bin").to_str().unwrap()]);
    assert!(out.contains("pinned"), "{out}");
    let st = s.status("pinned.bin");
    assert_eq!(st["local_bytes"], 8 * MIB, "pinning fetches everything now: {st}");
    assert_eq!(st["pinned"], true);

    for i in 0..4 {
        let name = format!("f{i}.bin");
        assert_eq!(hash_file(&s.at(&name)), hash_file(&s.files.join(&name)), "{name}");
        let used = s.info()["cache"]["used_bytes"].as_u64().unwrap();
        assert!(used <= 64 * MIB as u64, "cache holds {used} bytes after reading {name}");
    }
    // On disk too, not only in the counters.
    let cache_dir = PathBuf::from(s.info()["cache_dir"].as_str().unwrap().to_string());
    // The blocks the packs hold (evicted records are punched out of them).
    let on_disk: u64 = walk_files(&cache_dir.join("packs"))
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512))
        .sum();
    assert!(on_disk <= 64 * MIB as u64, "{on_disk} bytes of chunks on disk");
    assert!(s.info()["cache"]["evicted_bytes"].as_u64().unwrap() > 0);

    let st = s.status("pinned.bin");
    assert_eq!(st["local_bytes"], 8 * MIB, "the pinned file was evicted: {st}");
    let cleared = s.a.json(&["cache", "clear"]);
    assert!(cleared[0]["freed_bytes"].as_u64().unwrap() > 0, "{cleared}");
    let st = s.status("pinned.bin");
    assert_eq!(st["local_bytes"], 8 * MIB, "cache clear evicted the pinned file: {st}");
    assert!(s.status("f3.bin")["local_bytes"].as_u64().unwrap() == 0);

    // The cache survives a restart of the daemon. A kill -9 leaves the
    // kernel's mount behind; the next mount on it detaches it first.
    s.a_daemon.kill();
    assert!(mounted(&s.mnt));
    s.a_daemon = s.a.start();
    let out = s.a.ok(&["mount", "bob:files", s.mnt.to_str().unwrap(), "--cache-size", "64M"]);
    assert!(out.contains("mounted bob:files"), "{out}");
    assert!(s.a_daemon.log_text().contains("stale mount"), "{}", s.a_daemon.log_text());
    assert_eq!(s.status("pinned.bin")["local_bytes"], 8 * MIB);
    assert_eq!(hash_file(&s.at("pinned.bin")), hash_file(&s.files.join("pinned.bin")));
    assert_eq!(s.info()["bytes_fetched"], 0, "a cached, pinned file was fetched again after restart");

    let out = s.a.ok(&["unpin", s.at("pinned.bin").to_str().unwrap()]);
    assert!(out.contains("unpinned"), "{out}");
    assert_eq!(s.status("pinned.bin")["pinned"], false);
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// An open of a file whose manifest the mount does not have reads by the
/// start of it (DESCRIBE_PART); a change on the partner after that open
/// must not make the handle serve the new version past the start.
#[test]
fn a_file_changed_after_an_open_on_its_start_never_serves_a_mix_of_versions() {
    let mut s = Setup::new("partchange", |dir| {
        write_random(&dir.join("data.bin"), 32 * MIB, 40);
    });
    s.mount(&[]);
    let old = std::fs::read(s.files.join("data.bin")).unwrap();
    let f = std::fs::File::open(s.at("data.bin")).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == old[..buf.len()]);

    write_random(&s.files.join("data.bin"), 32 * MIB, 41);
    let new = std::fs::read(s.files.join("data.bin")).unwrap();
    let at = 20 * MIB;
    match f.read_exact_at(&mut buf, at as u64) {
        Ok(()) => assert!(buf[..] == old[at..at + buf.len()], "a handle of the old version read new bytes"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
    }
    drop(f);
    // Opened again, the file is the new version.
    let seen = wait_until(Duration::from_secs(10), || {
        let f = std::fs::File::open(s.at("data.bin")).unwrap();
        f.read_exact_at(&mut buf, at as u64).is_ok() && buf[..] == new[at..at + buf.len()]
    });
    assert!(seen, "the new version did not show through a new open");
}

/// The kernel keeps one size per inode and ends reads there. A descriptor
/// reading a file that the partner replaces with a shorter version must
/// not end at the new size once the mount knows it: it reads the version
/// it opened to its end, or fails with `ESTALE`, never a cut file without
/// an error (tests/multi.rs found this: `cp` would have made a short copy).
/// A fresh open meanwhile reads the new version whole.
#[test]
fn a_descriptor_never_ends_at_the_size_of_a_newer_shorter_version() {
    let mut s = Setup::new("shorter", |dir| {
        write_random(&dir.join("data.bin"), 4 * MIB, 50);
    });
    s.mount(&[]);
    let old = std::fs::read(s.files.join("data.bin")).unwrap();
    let mut f = std::fs::File::open(s.at("data.bin")).unwrap();
    let mut head = vec![0u8; 64 * 1024];
    f.read_exact(&mut head).unwrap();
    assert!(head[..] == old[..head.len()]);

    // Replaced on the partner, atomically, by a version of 100,000 bytes.
    let new = random_bytes(100_000, 51);
    std::fs::write(s.files.join("data.bin.tmp"), &new).unwrap();
    std::fs::rename(s.files.join("data.bin.tmp"), s.files.join("data.bin")).unwrap();
    let seen = wait_until(Duration::from_secs(10), || std::fs::metadata(s.at("data.bin")).is_ok_and(|m| m.len() == new.len() as u64));
    assert!(seen, "the new size did not show through the mount within 10 s");
    // The old descriptor still has the old version's size...
    assert_eq!(f.metadata().unwrap().len(), old.len() as u64, "fstat of the old descriptor");
    // ...and reads it to its end, or fails; never stops at the new size.
    let mut rest = Vec::new();
    match f.read_to_end(&mut rest) {
        Ok(_) => {
            assert_eq!(head.len() + rest.len(), old.len(), "the old descriptor's read ended at another version's size");
            assert!(rest[..] == old[head.len()..], "the old descriptor read bytes of another version");
        }
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
    }
    drop(f);
    assert_eq!(std::fs::read(s.at("data.bin")).unwrap(), new, "a fresh open reads the new version");
}

/// A file read once is read again from the kernel's page cache while its
/// version is unchanged: the opens after the first keep the pages
/// (`FOPEN_KEEP_CACHE`), so re-reads send (almost) no READ to the mount.
/// After a change on the partner the next read shows the new content.
#[test]
fn a_reread_of_an_unchanged_file_comes_from_the_page_cache_and_a_change_still_shows() {
    let mut s = Setup::new("reread", |dir| {
        write_random(&dir.join("data.bin"), 8 * MIB, 50);
    });
    s.mount(&[]);
    let want = hash_file(&s.files.join("data.bin"));
    assert_eq!(hash_file(&s.at("data.bin")), want);
    let reads = |s: &Setup| (s.info()["kernel_reads"].as_u64().unwrap(), s.info()["kernel_read_bytes"].as_u64().unwrap());
    let (cold_reads, cold_bytes) = reads(&s);
    assert!(cold_reads > 0 && cold_bytes >= 8 * MIB as u64, "the first read sent {cold_reads} READs of {cold_bytes} bytes");
    for _ in 0..3 {
        assert_eq!(hash_file(&s.at("data.bin")), want);
    }
    let (n, bytes) = reads(&s);
    // The kernel may reclaim a few pages at any time (memory pressure, or
    // a VM's proactive reclaim); reading them again is the only READ
    // allowed. Without the kept cache every re-read would ask for all 8 MiB.
    eprintln!("three re-reads of 8 MiB: {} READs, {} bytes", n - cold_reads, bytes - cold_bytes);
    assert!(bytes - cold_bytes <= MIB as u64, "three re-reads sent {} READs of {} bytes", n - cold_reads, bytes - cold_bytes);

    // Pages the kernel dropped are asked for alone, and come back right
    // (from part of their chunk in the cache).
    let f = std::fs::File::open(s.at("data.bin")).unwrap();
    for i in 0..16i64 {
        // SAFETY: a valid descriptor; the advice only drops clean pages.
        let r = unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), i * 524_288 + 4096, 4096, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
    }
    assert_eq!(hash_file(&s.at("data.bin")), want, "a re-read after the kernel dropped pages differs");
    let (n2, bytes2) = reads(&s);
    eprintln!("after dropping 16 pages: {} READs, {} bytes", n2 - n, bytes2 - bytes);
    assert!(n2 > n, "the dropped pages were not asked for");
    drop(f);

    s.replace_and_see("data.bin", 8 * MIB, 51);
}

/// A file read whole once is read again by the kernel itself from a whole
/// local copy (FUSE passthrough), written once the first read closed: the
/// re-reads send no READ to the mount and come back right, at any offset;
/// a change on the partner still shows, while a descriptor opened before
/// it keeps reading the version it opened.
#[test]
fn a_file_read_whole_is_read_again_by_the_kernel_from_a_local_copy() {
    let mut s = Setup::new("passthrough", |dir| {
        write_random(&dir.join("big.bin"), 32 * MIB, 60);
    });
    s.mount(&[]);
    let source = std::fs::read(s.files.join("big.bin")).unwrap();
    let want = hash_file(&s.files.join("big.bin"));
    assert_eq!(hash_file(&s.at("big.bin")), want);
    // The copy is written once the read has closed the file.
    let made = wait_until(Duration::from_secs(20), || s.info()["whole_copies"] == 1);
    let info = s.info();
    assert!(made, "the read made no whole copy: {info}");
    assert_eq!(info["whole_copy_bytes"], 32 * MIB as u64);
    assert_eq!(info["cache"]["flat_bytes"], 32 * MIB as u64, "the copy is not counted in the cache");
    let reads = info["kernel_reads"].as_u64().unwrap();
    for _ in 0..2 {
        assert_eq!(hash_file(&s.at("big.bin")), want);
    }
    let f = std::fs::File::open(s.at("big.bin")).unwrap();
    let mut x = 60u64;
    for _ in 0..200 {
        let off = (xorshift(&mut x) % (32 * MIB as u64 - 70_000)) as usize;
        let len = 1 + (xorshift(&mut x) % 65_536) as usize;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == source[off..off + len], "bytes at {off}+{len} differ");
    }
    let info = s.info();
    assert!(info["passthrough_opens"].as_u64().unwrap() >= 3, "re-reads did not use the copy: {info}");
    assert_eq!(info["kernel_reads"].as_u64().unwrap(), reads, "re-reads through the copy asked the mount: {info}");

    // `f` stays open on the old version while the partner's file changes.
    let after = s.replace_and_see("big.bin", 32 * MIB, 61);
    let mut head = vec![0u8; 65_536];
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(head == source[..65_536], "a descriptor opened before the change reads another version");

    // The new version, read whole above, gets its copy too; `cache clear`
    // drops both, and the open descriptor still reads its own.
    assert!(wait_until(Duration::from_secs(20), || s.info()["whole_copies"] == 2), "{}", s.info());
    let text = s.a.ok(&["cache"]);
    assert!(text.contains("whole copies 64"), "deftfs cache does not show the copies: {text}");
    s.a.ok(&["cache", "clear"]);
    let info = s.info();
    assert_eq!(info["whole_copies"], 0, "{info}");
    assert_eq!(info["cache"]["flat_bytes"], 0, "{info}");
    f.read_exact_at(&mut head, 4 * MIB as u64).unwrap();
    assert!(head == source[4 * MIB..4 * MIB + 65_536], "a cleared copy broke a descriptor reading it");
    assert_eq!(hash_file(&s.at("big.bin")), after);
}

#[test]
fn a_remote_change_becomes_visible_within_seconds() {
    let mut s = Setup::new("change", |dir| {
        std::fs::write(dir.join("note.txt"), "version one\n").unwrap();
        write_random(&dir.join("data.bin"), 8 * MIB, 30);
    });
    s.mount(&[]);
    assert_eq!(std::fs::read_to_string(s.at("note.txt")).unwrap(), "version one\n");
    let before = hash_file(&s.at("data.bin"));
    assert_eq!(before, hash_file(&s.files.join("data.bin")));

    std::fs::write(s.files.join("note.txt"), "version two, longer\n").unwrap();
    {
        let f = std::fs::OpenOptions::new().write(true).open(s.files.join("data.bin")).unwrap();
        f.write_all_at(&random_bytes(MIB, 31), 3 * MIB as u64).unwrap();
    }
    std::fs::write(s.files.join("added.txt"), "new file\n").unwrap();
    let after = hash_file(&s.files.join("data.bin"));

    let start = Instant::now();
    let seen = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(s.at("note.txt")).ok().as_deref() == Some("version two, longer\n")
            && std::fs::read_dir(&s.mnt).unwrap().flatten().any(|e| e.file_name() == "added.txt")
            && hash_file(&s.at("data.bin")) == after
    });
    assert!(seen, "the change did not show through the mount within 10 s");
    eprintln!("remote change visible after {:.2} s", start.elapsed().as_secs_f64());
    assert_eq!(std::fs::metadata(s.at("note.txt")).unwrap().len(), "version two, longer\n".len() as u64);

    std::fs::remove_file(s.files.join("added.txt")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || !s.at("added.txt").exists()), "a removed file still shows");
}

#[test]
fn offline_partner_cached_reads_work_uncached_fail_with_eio_then_recover() {
    let mut s = Setup::new("offline", |dir| {
        write_random(&dir.join("cached.bin"), 4 * MIB, 40);
        write_random(&dir.join("uncached.bin"), 4 * MIB, 41);
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join("docs/readme.txt"), "read me\n").unwrap();
    });
    s.mount(&["--offline-wait", "3"]);
    let cached = hash_file(&s.files.join("cached.bin"));
    assert_eq!(hash_file(&s.at("cached.bin")), cached);
    assert!(std::fs::read_dir(s.at("docs")).unwrap().count() == 1);
    assert_eq!(std::fs::metadata(s.at("uncached.bin")).unwrap().len(), 4 * MIB as u64);

    s.b_daemon.kill();

    // Listings and cached content from the last known state.
    let names: Vec<String> = std::fs::read_dir(&s.mnt).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"cached.bin".to_string()) && names.contains(&"uncached.bin".to_string()), "{names:?}");
    assert_eq!(hash_file(&s.at("cached.bin")), cached);

    let start = Instant::now();
    let err = std::fs::File::open(s.at("uncached.bin")).and_then(|mut f| {
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map(|_| ())
    });
    let waited = start.elapsed();
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EIO), "an uncached read while offline must fail with EIO");
    assert!(waited < Duration::from_secs(30), "the bounded wait took {waited:?}");
    eprintln!("uncached offline read failed after {:.2} s (offline wait 3 s)", waited.as_secs_f64());
    assert_eq!(s.info()["state"], "offline");
    let log = s.a_daemon.log_text();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("bob")), "the log must name the partner:\n{log}");

    // Back online: the same mount reads again, no remount.
    s.b_daemon = s.b.start();
    let back = wait_until(Duration::from_secs(30), || {
        std::fs::File::open(s.at("uncached.bin")).is_ok_and(|mut f| {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).is_ok()
        })
    });
    assert!(back, "reads did not work again after the partner came back");
    assert_eq!(hash_file(&s.at("uncached.bin")), hash_file(&s.files.join("uncached.bin")));
    assert!(wait_until(Duration::from_secs(10), || s.info()["state"] == "online"));
}

#[test]
fn sigterm_of_the_daemon_unmounts_and_leaves_nothing_behind() {
    let mut s = Setup::new("sigterm", |dir| {
        std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    });
    s.mount(&[]);
    // A process sitting in the mount must not keep it alive.
    let mut f = std::fs::File::open(s.at("a.txt")).unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(s.a_daemon.child.id() as i32, libc::SIGTERM) };
    let status = s.a_daemon.child.wait().unwrap();
    assert!(status.success(), "daemon exit on SIGTERM: {status}\n{}", s.a_daemon.log_text());
    assert!(!mounted(&s.mnt), "a mount is left in /proc/mounts");
    assert!(!s.a.home.join("control.sock").exists(), "the control socket is left behind");
    drop(f);
    let log = s.a_daemon.log_text();
    assert!(log.contains("unmounted"), "{log}");
}

/// A mount whose daemon was killed with `kill -9` is ended by `deftfs
/// unmount` through the next daemon (its FUSE connection aborted, then
/// detached), and a mount of a live daemon is not taken for a dead one.
#[test]
fn unmount_through_a_new_daemon_ends_a_mount_whose_daemon_died() {
    let mut s = Setup::new("dead-mount", |dir| std::fs::write(dir.join("a.txt"), "a\n").unwrap());
    s.mount(&[]);
    let source = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let pid = s.a_daemon.child.id();
    assert!(source.contains(&format!("deftfs:bob:files@{pid}")), "the mount's source names its daemon:\n{source}");
    s.a_daemon.kill();
    assert!(mounted(&s.mnt), "the dead daemon's mount is gone");
    s.a_daemon = s.a.start();
    let out = s.a.cmd(&["unmount", s.mnt.to_str().unwrap()]);
    assert!(out.status.success(), "unmount of a dead daemon's mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!mounted(&s.mnt), "the dead daemon's mount is left in /proc/mounts");
    // A live mount at a place this daemon did not mount is refused, untouched.
    s.guard = None;
    s.mount(&[]);
    let b = TestNode::init(s._root.path(), "carol");
    let _carol = b.start();
    let out = b.cmd(&["unmount", s.mnt.to_str().unwrap()]);
    assert!(!out.status.success(), "another daemon unmounted a live mount");
    assert!(mounted(&s.mnt));
    assert_eq!(std::fs::read_to_string(s.at("a.txt")).unwrap(), "a\n");
}

#[test]
fn control_socket_is_private_and_errors_are_clear() {
    let mut s = Setup::new("control", |dir| {
        std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    });
    let sock = s.a.home.join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    // Another local user cannot drive this daemon.
    let nobody = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(bin()).arg("--home").arg(&s.a.home).arg("mounts").uid(65534).gid(65534).output().unwrap()
    };
    assert!(!nobody.status.success(), "user nobody drove the daemon: {}", String::from_utf8_lossy(&nobody.stdout));

    // Clear errors, nothing mounted by them.
    let home = s.a.home.clone();
    let bad = |args: &[&str], needle: &str| {
        let out = run(&home, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && err.contains(needle), "{args:?}: expected {needle:?} in: {err}");
    };
    let mnt = s.mnt.to_str().unwrap().to_string();
    bad(&["mount", "carol:files", &mnt], "not a partner");
    bad(&["mount", "bob:nope", &mnt], "grants no share nope");
    bad(&["mount", "bob:files", "/nonexistent/deftfs-mnt"], "does not exist");
    bad(&["mount", "bob:files", &mnt, "--cache-size", "lots"], "not a size");
    bad(&["unmount", &mnt], "nothing is mounted");
    bad(&["status", "/etc/hostname"], "not inside a deftfs mount");
    assert!(!mounted(&s.mnt));

    s.mount(&[]);
    bad(&["mount", "bob:files", &mnt], "already mounted");
    let out = s.a.ok(&["mounts"]);
    assert!(out.contains("bob:files") && out.contains("online"), "{out}");
    let out = s.a.ok(&["cache"]);
    assert!(out.contains("of 10.0 GiB"), "{out}");
    s.a.ok(&["unmount", &mnt]);
    assert!(!mounted(&s.mnt));
    // Without a daemon, the CLI says how to start one.
    s.a_daemon.kill();
    let out = s.a.cmd(&["mounts"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no deftfs daemon answers"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn demo_mounts_the_samples_and_stops_cleanly() {
    let dir = TempDir::new("demo");
    let _guard = MountGuard(dir.path().join("mnt"));
    let out = std::process::Command::new(bin()).args(["demo", "--exit", "--dir"]).arg(dir.path()).output().unwrap();
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("mounted partner:samples"), "{text}");
    assert!(text.contains("valid signature"), "{text}");
    assert!(text.contains("100.0 MiB  scene.bin"), "{text}");
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "{err}");
    assert!(!mounted(&dir.path().join("mnt")), "the demo left its mount behind");
    assert_eq!(std::fs::metadata(dir.path().join("partner-files/media/scene.bin")).unwrap().len(), 100 * MIB as u64);
}

/// A daemon killed with `kill -9` while one of its threads was stuck in
/// the kernel (on one of its own mounts, see `abort_dead_mount`) stays
/// half-exited: its main thread a zombie, its sockets open, its control
/// socket still answering, until that thread gets out. The next daemon
/// must not take that socket for a live daemon's (it refused to start:
/// seen in tests/crash.rs): it ends the dead daemon's mounts, which is
/// what frees such a thread, waits for the socket to go, and starts.
/// Here the half-exited daemon is a small C program in that shape (its
/// main thread exits; another keeps the process 3 s more). A live daemon
/// on the socket is still refused.
#[test]
fn a_daemon_starts_over_the_control_socket_of_a_half_exited_one() {
    let root = TempDir::new("half-exited");
    let node = TestNode::init(root.path(), "alice");
    let cc = on_path("cc").expect("cc not found: install gcc (apt-get install -y gcc)");
    let src = root.path().join("half.c");
    std::fs::write(
        &src,
        r#"#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static void *later(void *arg) { (void)arg; sleep(3); exit(0); }
int main(int argc, char **argv) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (argc < 2 || s < 0) return 2;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) return 1;
    pthread_t t;
    pthread_create(&t, 0, later, 0);
    pthread_exit(0);
}
"#,
    )
    .unwrap();
    let exe = root.path().join("half");
    let out = std::process::Command::new(cc).arg("-pthread").arg("-o").arg(&exe).arg(&src).output().unwrap();
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    let sock = node.home.join("control.sock");
    let mut half = std::process::Command::new(&exe).arg(&sock).spawn().unwrap();
    let pid = half.id();
    // Its main thread a zombie, its socket still answering.
    let zombie = wait_until(Duration::from_secs(10), || {
        !deftfs::mount::process_alive(pid) && std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    assert!(zombie, "the helper did not reach its half-exited state");
    let daemon = node.start();
    let log = daemon.log_text();
    assert!(log.contains("died without exiting"), "{log}");
    assert!(half.wait().unwrap().success());
    // A live daemon's socket is refused, and left alone.
    let out = std::process::Command::new(bin()).arg("--home").arg(&node.home).arg("daemon").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another deftfs daemon already runs"), "{err}");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok(), "the live daemon's socket was taken");
}
