//! End-to-end transfers between two real nodes: real daemons, real QUIC
//! with mutual TLS on loopback, real SQLite, real files.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

#[test]
fn push_and_pull_64_mib_arrive_intact_with_receipts_on_both_sides() {
    let p = Pair::new("pushpull");
    let src = p.root.path().join("big.bin");
    write_random(&src, 64 * MIB, 1);
    let expected = hash_file(&src);
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(when).unwrap();
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    // The DEFT/1 file hash: of the chunk list, for the default chunk sizes.
    let deft_hash = deftfs::chunk::chunk_file(&src, &deftfs::chunk::ChunkParams::default()).unwrap().file_hash.to_string();

    let sent = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    assert_eq!(sent["file_hash"], deft_hash.as_str());
    assert_eq!(sent["bytes_total"], 64 * MIB);
    assert_eq!(hash_file(&p.inbox.join("big.bin")), expected);
    assert_eq!(mtime(&p.inbox.join("big.bin")), when, "a pushed file keeps its mtime");

    std::fs::copy(&src, p.outbox.join("out.bin")).unwrap();
    let dest = p.root.path().join("pulled.bin");
    let got = p.a.json(&["receive", "bob", "outbox", "out.bin", dest.to_str().unwrap()]);
    assert_eq!(got["file_hash"], deft_hash.as_str());
    assert_eq!(hash_file(&dest), expected);
    assert_eq!(mtime(&dest), mtime(&p.outbox.join("out.bin")), "a pulled file keeps the partner's mtime");

    // Receipts exist on both sides and verify.
    for receipt in [sent["receipt"].as_str().unwrap(), got["receipt"].as_str().unwrap()] {
        let out = p.a.ok(&["receipt", "verify", receipt]);
        assert!(out.contains("valid signature"), "{out}");
    }
    // The daemon writes its receipts on a thread of its own, a moment later.
    wait_until(Duration::from_secs(5), || walk(&p.b.home.join("receipts")).len() >= 2);
    let b_receipts = walk(&p.b.home.join("receipts"));
    assert_eq!(b_receipts.len(), 2, "bob keeps a receipt of the push and of the pull: {b_receipts:?}");
    // History on both sides, across processes.
    let hist_a = p.a.ok(&["history"]);
    assert_eq!(hist_a.lines().count(), 2, "{hist_a}");
    let hist_b = p.b.ok(&["history", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&hist_b).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
}

#[test]
fn killed_push_resumes_without_resending_acknowledged_chunks() {
    let p = Pair::new("resume");
    let src = p.root.path().join("resume.bin");
    write_random(&src, 64 * MIB, 2);
    let stall_after = 100;
    let mut child = Command::new(bin())
        .arg("--home")
        .arg(&p.a.home)
        .args(["send", "bob", "inbox", src.to_str().unwrap(), "--json"])
        .env("DEFTFS_FAULT_STALL_AFTER_CHUNKS", stall_after.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_stderr_line(&mut child, "stalled", Duration::from_secs(120)), "sender never reached the stall point");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!p.inbox.join("resume.bin").exists(), "a partial file must never appear under its final name");

    let again = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    let total = again["chunks_total"].as_u64().unwrap();
    let sent = again["chunks_sent"].as_u64().unwrap();
    assert!(total > stall_after as u64, "the file must have more chunks than the stall point ({total})");
    assert!(sent <= total - stall_after as u64, "resume re-sent acknowledged chunks: sent {sent} of {total}");
    assert!(sent > 0);
    assert_eq!(hash_file(&p.inbox.join("resume.bin")), hash_file(&src));
}

#[test]
fn killed_receiver_daemon_resumes_after_restart() {
    let mut p = Pair::new("restart");
    let src = p.root.path().join("r.bin");
    write_random(&src, 32 * MIB, 3);
    let mut child = Command::new(bin())
        .arg("--home")
        .arg(&p.a.home)
        .args(["send", "bob", "inbox", src.to_str().unwrap()])
        .env("DEFTFS_FAULT_STALL_AFTER_CHUNKS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_stderr_line(&mut child, "stalled", Duration::from_secs(120)));
    // The connection is lost from the receiver's side: kill -9 its daemon.
    p.b_daemon.kill();
    child.kill().unwrap();
    child.wait().unwrap();
    p.b_daemon = p.b.start();
    let again = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    assert!(again["chunks_sent"].as_u64().unwrap() <= again["chunks_total"].as_u64().unwrap() - 40);
    assert_eq!(hash_file(&p.inbox.join("r.bin")), hash_file(&src));
}

#[test]
fn a_receiver_killed_in_the_middle_of_a_patch_finishes_it_when_it_starts_again() {
    let mut p = Pair::new("patch-crash");
    let src = p.root.path().join("p.bin");
    let old = write_random(&src, 48 * MIB, 11);
    p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    // Two edits far apart: two ranges to patch, and the crash between them.
    let mut new = old.clone();
    for at in [8 * MIB, 40 * MIB] {
        for b in &mut new[at..at + 100_000] {
            *b = b.wrapping_add(1);
        }
    }
    std::fs::write(&src, &new).unwrap();
    p.b_daemon.kill();
    p.b_daemon = Daemon::start_with(&p.b.home, &[("DEFTFS_FAULT_CRASH_IN_PATCH", "1")]);
    let out = p.a.cmd(&["send", "bob", "inbox", src.to_str().unwrap()]);
    assert!(!out.status.success(), "the receiver aborted, the push cannot have completed");
    assert!(wait_until(Duration::from_secs(20), || p.b_daemon.child.try_wait().unwrap().is_some()), "the daemon did not abort");
    let target = p.inbox.join("p.bin");
    let torn = std::fs::read(&target).unwrap();
    assert!(torn != old && torn != new, "the crash must come between the two ranges");
    assert_eq!(std::fs::read_dir(p.b.home.join("patches")).unwrap().count(), 1, "the journal");

    p.b_daemon = p.b.start();
    assert_eq!(std::fs::read(&target).unwrap(), new, "the journal is applied again before the daemon serves");
    assert_eq!(std::fs::read_dir(p.b.home.join("patches")).unwrap().count(), 0);
    let v = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    assert_eq!(v["chunks_sent"].as_u64(), Some(0), "the version is there already: {v}");
    assert_eq!(std::fs::read(&target).unwrap(), new);
}

#[test]
fn chunk_corrupted_in_flight_is_nacked_and_resent() {
    let p = Pair::new("corrupt");
    let src = p.root.path().join("c.bin");
    write_random(&src, 8 * MIB, 4);
    let out = Command::new(bin())
        .arg("--home")
        .arg(&p.a.home)
        .args(["send", "bob", "inbox", src.to_str().unwrap(), "--json"])
        .env("DEFTFS_FAULT_CORRUPT_CHUNK", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["retransmissions"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["chunks_sent"].as_u64().unwrap(), v["chunks_total"].as_u64().unwrap() + 1);
    assert_eq!(hash_file(&p.inbox.join("c.bin")), hash_file(&src));
    assert!(p.b_daemon.log_text().contains("chunk hash mismatch"));

    // And in the other direction: the serving node corrupts a pulled chunk.
    let mut p2 = Pair::new("corrupt-pull");
    p2.b_daemon.kill();
    std::fs::copy(&src, p2.outbox.join("c.bin")).unwrap();
    let log = p2.b.home.join("daemon2.log");
    let mut d = Command::new(bin())
        .arg("--home")
        .arg(&p2.b.home)
        .arg("daemon")
        .env("DEFTFS_FAULT_CORRUPT_CHUNK", "2")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let dest = p2.root.path().join("c.out");
    let got = p2.a.cmd(&["receive", "bob", "outbox", "c.bin", dest.to_str().unwrap(), "--json"]);
    let _ = d.kill();
    let _ = d.wait();
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert!(v["retransmissions"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(hash_file(&dest), hash_file(&src));
}

#[test]
fn delta_push_sends_only_changed_chunks() {
    let p = Pair::new("delta");
    let src = p.root.path().join("d.bin");
    let mut data = write_random(&src, 64 * MIB, 5);
    p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);

    // 1 MiB changed in the middle.
    let mid = 32 * MIB;
    for b in &mut data[mid..mid + MIB] {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&src, &data).unwrap();
    let inode = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&p.inbox.join("d.bin"));
    let v = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    let sent = v["bytes_sent"].as_u64().unwrap();
    assert!(sent < 4 * MIB as u64, "1 MiB edit sent {sent} bytes");
    assert_eq!(hash_file(&p.inbox.join("d.bin")), hash_file(&src));
    assert_eq!(inode(&p.inbox.join("d.bin")), before, "an edit in place of a large file is patched into it, not copied whole");

    // 100 bytes inserted at the start.
    let mut shifted = vec![7u8; 100];
    shifted.extend_from_slice(&data);
    std::fs::write(&src, &shifted).unwrap();
    let v = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    let sent = v["bytes_sent"].as_u64().unwrap();
    assert!(sent < 4 * MIB as u64, "100-byte insert sent {sent} bytes");
    assert_eq!(hash_file(&p.inbox.join("d.bin")), hash_file(&src));

    // Pull is delta too: an outdated local copy is patched.
    std::fs::copy(&src, p.outbox.join("d.bin")).unwrap();
    let local = p.root.path().join("local.bin");
    std::fs::write(&local, &data).unwrap();
    let v = p.a.json(&["receive", "bob", "outbox", "d.bin", local.to_str().unwrap()]);
    assert!(v["bytes_sent"].as_u64().unwrap() < 4 * MIB as u64, "{v}");
    assert_eq!(hash_file(&local), hash_file(&src));
}

#[test]
fn receipt_verifies_and_one_changed_byte_breaks_it() {
    let p = Pair::new("receipt");
    let src = p.root.path().join("r.txt");
    std::fs::write(&src, b"invoice 42: 1000 EUR\n").unwrap();
    let v = p.a.json(&["send", "bob", "inbox", src.to_str().unwrap()]);
    let receipt = std::path::PathBuf::from(v["receipt"].as_str().unwrap());
    let bob_cert = p.b.home.join("cert.pem");
    let alice_cert = p.a.home.join("cert.pem");
    let ok = p.a.ok(&["receipt", "verify", receipt.to_str().unwrap(), "--cert", bob_cert.to_str().unwrap()]);
    assert!(ok.contains("valid signature"), "{ok}");
    // Signed by bob, not alice.
    let wrong = p.a.cmd(&["receipt", "verify", receipt.to_str().unwrap(), "--cert", alice_cert.to_str().unwrap()]);
    assert!(!wrong.status.success());

    let text = std::fs::read_to_string(&receipt).unwrap();
    let hash_hex = v["file_hash"].as_str().unwrap().trim_start_matches("blake3:");
    let i = text.find(hash_hex).unwrap() + 10;
    let mut bytes = text.into_bytes();
    bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
    let tampered = p.root.path().join("tampered.json");
    std::fs::write(&tampered, &bytes).unwrap();
    let bad = p.a.cmd(&["receipt", "verify", tampered.to_str().unwrap()]);
    assert!(!bad.status.success(), "a tampered receipt must not verify");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("INVALID"), "{err}");
}

#[test]
fn unknown_certificate_and_missing_access_are_refused_clearly() {
    let p = Pair::new("refuse");
    // carol trusts bob, but bob does not know carol.
    let carol = TestNode::init(p.root.path(), "carol");
    carol.trust(&p.b);
    let out = carol.cmd(&["ls", "bob"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not know our certificate") || err.contains("certificate"), "{err}");
    p.b_daemon.wait_for_log("not a known partner", Duration::from_secs(5));

    // alice may only pull from outbox and only push to inbox.
    let src = p.root.path().join("x.txt");
    std::fs::write(&src, b"x").unwrap();
    let out = p.a.cmd(&["send", "bob", "outbox", src.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ACCESS_DENIED") && err.contains("write"), "{err}");
    std::fs::write(p.inbox.join("secret.txt"), b"s").unwrap();
    let out = p.a.cmd(&["receive", "bob", "inbox", "secret.txt", p.root.path().join("s").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ACCESS_DENIED") && err.contains("read"), "{err}");
    // A share not granted does not exist for the partner.
    let out = p.a.cmd(&["receive", "bob", "nosuch", "f", p.root.path().join("s").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNKNOWN_SHARE"));
    // ls shows exactly what is granted.
    let ls = p.a.ok(&["ls", "bob"]);
    assert!(ls.contains("inbox") && ls.contains("outbox"), "{ls}");
}

#[test]
fn hostile_names_and_paths_are_refused_by_the_serving_node() {
    use deftfs::proto::{ErrorCode, Response};
    let p = Pair::new("hostile");
    std::fs::write(p.root.path().join("secret"), b"top secret").unwrap();
    std::fs::write(p.outbox.join("ok.txt"), b"fine").unwrap();
    // The CLI refuses bad paths before sending anything.
    for bad in ["../secret", "/etc/passwd", "a/../../secret", "a\u{1}b"] {
        let out = p.a.cmd(&["receive", "bob", "outbox", bad, p.root.path().join("o").to_str().unwrap()]);
        assert!(!out.status.success(), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("path"), "{bad}");
    }
    // A hostile client bypassing the CLI gets DEFT ERROR, and the daemon lives on.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let node = deftfs::node::Node::open(&p.a.home).unwrap();
        let mut s = deftfs::transfer::client::Session::open(node, "bob").await.unwrap();
        let cases = [
            ("DEFT DESCRIBE outbox ../secret", ErrorCode::BadPath),
            ("DEFT DESCRIBE outbox /etc/passwd", ErrorCode::BadPath),
            ("DEFT DESCRIBE outbox a/%2E%2E/%2E%2E/secret", ErrorCode::BadPath),
            ("DEFT DESCRIBE outbox ok.txt%00", ErrorCode::BadPath),
            ("DEFT DESCRIBE outbox ok%01.txt", ErrorCode::BadPath),
            ("DEFT DESCRIBE ../outbox ok.txt", ErrorCode::BadName),
            ("DEFT DESCRIBE out/box ok.txt", ErrorCode::BadName),
            ("DEFT LIST outbox ..", ErrorCode::BadPath),
            ("DEFT BEGIN_TRANSFER t-1 inbox ../evil SIZE:1 CHUNKS:1 HASH:blake3:0000000000000000000000000000000000000000000000000000000000000000", ErrorCode::BadPath),
        ];
        for (line, code) in cases {
            s.send_raw(&format!("{line}\r\n")).await.unwrap();
            match s.next().await.unwrap() {
                Response::Error { code: got, .. } => assert_eq!(got, code, "{line}"),
                other => panic!("{line}: expected an error, got {other:?}"),
            }
        }
        // An over-long line is refused too.
        s.send_raw(&format!("DEFT DESCRIBE outbox {}\r\n", "a".repeat(70_000))).await.unwrap();
        assert!(matches!(s.next().await.unwrap(), Response::Error { code: ErrorCode::TooLarge, .. }));
        // The session still works.
        let rows = s.discover().await.unwrap();
        assert_eq!(rows.len(), 2);
    });
    assert!(!p.root.path().join("evil").exists());
    let out = p.a.ok(&["receive", "bob", "outbox", "ok.txt", p.root.path().join("ok.out").to_str().unwrap()]);
    assert!(out.contains("received"));
}

/// Commands started together on a node whose database does not exist yet
/// (a send and a receive right after init) all run: the first ones used to
/// fail with "database is locked" while another turned the new database
/// to WAL.
#[test]
fn commands_started_together_on_a_new_node_home_all_open_its_database() {
    let root = TempDir::new("dbrace");
    for round in 0..8 {
        let node = TestNode::init(root.path(), &format!("n{round}"));
        // As `init` leaves it (`id`, which TestNode::init ran, made it).
        for f in ["deftfs.db", "deftfs.db-wal", "deftfs.db-shm"] {
            let _ = std::fs::remove_file(node.home.join(f));
        }
        let runs: Vec<_> = (0..4)
            .map(|_| {
                Command::new(bin())
                    .arg("--home")
                    .arg(&node.home)
                    .arg("history")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for r in runs {
            let out = r.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The partial file of a push nobody came back for is deleted once stale
/// (`[storage] partial_ttl_hours`), when the daemon starts and every hour;
/// a fresh one stays for the push to resume.
#[test]
fn stale_partial_files_of_abandoned_pushes_are_deleted() {
    let root = TempDir::new("partials");
    let (a, b) = TestNode::pair(root.path());
    let inbox = root.path().join("bob-inbox");
    std::fs::create_dir_all(inbox.join("sub")).unwrap();
    b.ok(&["share", "add", "inbox", inbox.to_str().unwrap(), "--partner", &a.name, "--access", "write"]);
    let stale = inbox.join("sub/.big.bin.deftpart-0123456789abcdef");
    let fresh = inbox.join(".other.bin.deftpart-fedcba9876543210");
    for p in [&stale, &fresh] {
        std::fs::write(p, vec![0u8; 1 << 20]).unwrap();
    }
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_days_ago).unwrap();
    let d = b.start();
    d.wait_for_log("deleted partial files", Duration::from_secs(20));
    assert!(!stale.exists(), "the stale partial file is still there");
    assert!(fresh.exists(), "a fresh partial file was deleted");
}
