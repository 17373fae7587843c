//! Real applications working inside a mount, end to end: rsync, vim, make
//! with a C compiler, and SQLite, each doing what it does on a local disk
//! and checked on the serving node. Bob serves `files` read-write to alice,
//! who mounts it (see [`World`]).
//!
//! These programs notice what a simple copy does not: a directory mtime
//! that moves after it was set (rsync copies again), a file mtime that
//! changes after a write (vim refuses to save: "file changed since
//! reading"; make rebuilds), a mode the partner does not keep.
//!
//! The tools must be installed (`.ci/run` installs rsync and vim); a missing
//! one fails its test with the package to install, rather than pass.

mod common;

use common::world::World;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

/// The path of `tool`, or a failure that says what to install.
fn tool(names: &[&str], package: &str) -> PathBuf {
    for name in names {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{names:?} not found: install the {package} package (apt-get install -y {package}); .ci/run does");
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Longer than the mount's attribute lifetime (one second): what `stat`
/// shows afterwards comes from the partner again.
const PAST_TTL: Duration = Duration::from_millis(1600);

/// A small tree: files in nested directories, with sizes from empty to
/// several chunks.
fn make_tree(root: &Path) {
    for (i, rel) in ["a/f0", "a/f1", "a/b/f2", "a/b/c/f3", "d/f4", "top.txt", "empty"].iter().enumerate() {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let len = if *rel == "empty" { 0 } else { 1000 * (i + 1) * (i + 1) * 37 };
        std::fs::write(&p, random_bytes(len, i as u64 + 11)).unwrap();
    }
}

/// Set the mtime of everything under `root` (and `root`) to distinct times
/// in 2020, directories last: rsync compares times to the second, so a
/// tree made a moment ago would hide a directory time that moved.
fn age(root: &Path) {
    let mut all = walk(root);
    let mut dirs: Vec<PathBuf> =
        all.iter().flat_map(|p| p.ancestors().skip(1).take_while(|a| a.starts_with(root)).map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    dirs.reverse();
    all.extend(dirs);
    for (i, p) in all.iter().enumerate() {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800 + 3600 * i as u64);
        std::fs::File::open(p).and_then(|f| f.set_modified(when)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

/// Every file and directory under `a` has the same content (files) and
/// mtime as under `b`, and the two hold the same names.
fn assert_same_tree(a: &Path, b: &Path) {
    let rel = |root: &Path, p: &Path| p.strip_prefix(root).unwrap().to_path_buf();
    let mut left: Vec<PathBuf> = walk(a).iter().map(|p| rel(a, p)).collect();
    let mut right: Vec<PathBuf> = walk(b).iter().map(|p| rel(b, p)).collect();
    left.sort();
    right.sort();
    assert_eq!(left, right, "files under {} and {}", a.display(), b.display());
    for f in &left {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "content of {}", f.display());
        assert_eq!(mtime(&a.join(f)), mtime(&b.join(f)), "mtime of {}", f.display());
        let mut dir = f.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            assert_eq!(mtime(&a.join(d)), mtime(&b.join(d)), "mtime of directory {}", d.display());
            dir = d.parent();
        }
    }
}

#[test]
fn rsync_into_the_mount_keeps_times_and_a_second_run_copies_nothing() {
    let rsync = tool(&["rsync"], "rsync");
    let w = World::new("rsync", &["alice"], "", |_| {});
    let a = w.c(0);
    let src = w.root.path().join("src");
    make_tree(&src);
    age(&src);
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&rsync);
        cmd.args(args).arg(format!("{}/", src.display())).arg(format!("{}/", a.at("proj").display()));
        ok(cmd.output().unwrap(), &format!("rsync {args:?}"))
    };
    run(&["-a"]);
    assert_same_tree(&src, &w.server("proj"));
    // rsync compares size and mtime: nothing to do, now and once what the
    // mount shows comes from the partner again. A directory whose time it
    // set before the files renamed into it used to show the partner's
    // later time then, and rsync "fixed" it on every run.
    assert_eq!(run(&["-ain"]), "", "a second rsync right away would change something");
    std::thread::sleep(PAST_TTL);
    assert_eq!(run(&["-ain"]), "", "a second rsync later would change something");

    // Changes, a deletion, --inplace: the serving node ends equal to the source.
    std::fs::write(src.join("a/f1"), b"shorter now").unwrap();
    std::fs::remove_file(src.join("a/b/f2")).unwrap();
    std::fs::write(src.join("d/new"), random_bytes(300_000, 99)).unwrap();
    age(&src);
    run(&["-a", "--delete"]);
    assert_same_tree(&src, &w.server("proj"));
    std::fs::write(src.join("top.txt"), random_bytes(50_000, 7)).unwrap();
    age(&src);
    run(&["-a", "--inplace"]);
    assert_same_tree(&src, &w.server("proj"));
    std::thread::sleep(PAST_TTL);
    assert_eq!(run(&["-ain", "--delete"]), "", "rsync still sees differences");

    // And back out of the mount: the same tree.
    let back = w.root.path().join("back");
    let out = Command::new(&rsync).arg("-a").arg(format!("{}/", a.at("proj").display())).arg(&back).output().unwrap();
    ok(out, "rsync out of the mount");
    assert_same_tree(&src, &back);
}

#[test]
fn vim_saves_back_to_back_through_the_mount() {
    let vim = tool(&["vim", "vim.tiny", "vim.basic"], "vim-tiny");
    let w = World::new("vim", &["alice"], "", |_| {});
    let a = w.c(0);
    let edit = |file: &Path, cmds: &[&str]| {
        let mut cmd = Command::new(&vim);
        // Ex mode, silent, no vimrc, no viminfo, not vi-compatible: the
        // commands, then write and quit. (`backupskip` is emptied below:
        // by default vim makes no backup of files under /tmp.)
        cmd.args(["-N", "-Es", "-u", "NONE", "-i", "NONE"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        cmd.arg("-c").arg("wq").arg(file).stdin(std::process::Stdio::null());
        ok(cmd.output().unwrap(), &format!("vim {cmds:?}"))
    };
    for round in 0..3 {
        let file = a.at(&format!("notes{round}.txt"));
        std::fs::write(&file, format!("round {round} one\nline two\n")).unwrap();
        // A save right after the file was written, then one with a backup
        // made by renaming (the write-temp-then-rename dance). vim checks
        // before writing that the file's mtime is still the one it read; a
        // mount whose mtime moves after a push makes it refuse silently.
        edit(&file, &["%s/one/ONE/"]);
        edit(&file, &["set backup backupcopy=no backupskip=", "%s/two/TWO/"]);
        let name = format!("notes{round}.txt");
        assert_eq!(std::fs::read_to_string(w.server(&name)).unwrap(), format!("round {round} ONE\nline TWO\n"), "round {round}");
        assert_eq!(std::fs::read_to_string(w.server(&format!("{name}~"))).unwrap(), format!("round {round} ONE\nline two\n"), "backup");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("round {round} ONE\nline TWO\n"), "through the mount");
    }
    // No swap file left anywhere.
    let left: Vec<_> = walk(&w.files).into_iter().filter(|p| p.to_string_lossy().ends_with(".swp")).collect();
    assert!(left.is_empty(), "swap files left: {left:?}");
}

#[test]
fn make_builds_in_the_mount_and_rebuilds_only_what_changed() {
    tool(&["make"], "make");
    tool(&["cc"], "gcc");
    let w = World::new("make", &["alice"], "", |_| {});
    let a = w.c(0);
    let dir = a.at("proj");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("main.c"),
        "#include <stdio.h>\nint add(int, int);\nint main(void) { printf(\"%d\\n\", add(2, 3)); return 0; }\n",
    )
    .unwrap();
    std::fs::write(dir.join("add.c"), "int add(int a, int b) { return a + b; }\n").unwrap();
    std::fs::write(dir.join("Makefile"), "app: main.o add.o\n\tcc -o app main.o add.o\n%.o: %.c\n\tcc -c $<\n").unwrap();
    let make = || ok(Command::new("make").arg("-C").arg(&dir).arg("--no-print-directory").output().unwrap(), "make");
    let built = make();
    assert!(built.contains("cc -c main.c") && built.contains("cc -o app"), "{built}");
    // Run from the mount (exec maps the file).
    assert_eq!(ok(Command::new(dir.join("app")).output().unwrap(), "app"), "5\n");
    // Up to date at once and once the mount's attributes come from the
    // partner again: the mtimes the compiler's writes left did not move.
    assert!(make().contains("up to date"), "make rebuilt right after building");
    std::thread::sleep(PAST_TTL);
    assert!(make().contains("up to date"), "make rebuilt once attributes came from the partner");
    // One source changed: its object and the program, nothing else.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dir.join("add.c"), "int add(int a, int b) { return a + b + 1; }\n").unwrap();
    let rebuilt = make();
    assert!(rebuilt.contains("cc -c add.c") && !rebuilt.contains("main.c"), "{rebuilt}");
    assert_eq!(ok(Command::new(dir.join("app")).output().unwrap(), "app"), "6\n");
    // The serving node has a program that runs, with its execute bits.
    let served = w.server("proj/app");
    assert_eq!(ok(Command::new(&served).output().unwrap(), "the served app"), "6\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&served).unwrap().permissions().mode() & 0o111, 0o111, "execute bits on the serving node");
}

#[test]
fn sqlite_databases_in_the_mount_stay_consistent() {
    let python = tool(&["python3"], "python3");
    let w = World::new("sqlite", &["alice"], "", |_| {});
    let a = w.c(0);
    std::fs::create_dir(a.at("db")).unwrap();
    // A rollback journal (created, written, fsynced and deleted at every
    // commit) and a WAL database (its -shm file is shared memory, mmap'd).
    let script = r#"
import sqlite3, sys
for name, mode in (("journal.db", "DELETE"), ("wal.db", "WAL")):
    db = sqlite3.connect(sys.argv[1] + "/" + name)
    db.execute("PRAGMA journal_mode=" + mode)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(120):
        with db:
            db.execute("INSERT INTO t VALUES (?, randomblob(?))", (i, 100 + 37 * i))
    with db:
        db.execute("DELETE FROM t WHERE k % 3 = 0")
    db.execute("VACUUM") if mode == "DELETE" else db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(name, db.execute("PRAGMA integrity_check").fetchone()[0], db.execute("SELECT count(*), sum(length(v)) FROM t").fetchone())
    db.close()
"#;
    let out = ok(Command::new(&python).arg("-c").arg(script).arg(a.at("db")).output().unwrap(), "sqlite through the mount");
    let expect_sum: usize = (0..120).filter(|i| i % 3 != 0).map(|i| 100 + 37 * i).sum();
    for name in ["journal.db", "wal.db"] {
        assert!(out.contains(&format!("{name} ok (80, {expect_sum})")), "{out}");
    }
    // The serving node's copies are whole databases with every row.
    let check = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("PRAGMA integrity_check").fetchone()[0], db.execute("SELECT count(*), sum(length(v)) FROM t").fetchone())
"#;
    for name in ["journal.db", "wal.db"] {
        let served = w.server(&format!("db/{name}"));
        let got = ok(Command::new(&python).arg("-c").arg(check).arg(&served).output().unwrap(), "sqlite on the serving node");
        assert_eq!(got.trim(), format!("ok (80, {expect_sum})"), "{name} on the serving node");
    }
    let journals: Vec<_> = walk(&w.files).into_iter().filter(|p| p.to_string_lossy().ends_with("-journal")).collect();
    assert!(journals.is_empty(), "journal left behind: {journals:?}");
}
