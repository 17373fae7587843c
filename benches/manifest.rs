//! The cost of a manifest on the wire, per CHUNK line, on one thread:
//! `cargo bench --bench manifest`. A 1 GiB file at the default chunk size
//! has about 4,096 chunks; a DESCRIBE of it is one FILE_INFO with that many
//! CHUNK lines, which the server encodes and the mount reads line by line,
//! decodes and checks before `open` returns.
//!
//! Steps, each the best of `RUNS` runs (the machine is shared):
//! - encode: `Response::FileInfo::encode`, the server's side;
//! - read lines: the transport's `read_line_bytes` over the encoded bytes;
//! - decode: the decoder fed those lines;
//! - to manifest: `manifest_from_lines` (the conversion, the offsets and
//!   the file hash checked).

use deftfs::chunk::{file_hash, ChunkRef, Manifest};
use deftfs::hash::Hash;
use deftfs::proto::{Decoder, Name, Response, SharePath};
use deftfs::transfer::{manifest_from_lines, manifest_to_lines};
use std::hint::black_box;
use std::time::{Duration, Instant};

const RUNS: usize = 20;

fn manifest(chunks: usize) -> Manifest {
    let mut offset = 0u64;
    let mut refs = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let len = 200_000 + (i as u32 * 7919) % 120_000;
        refs.push(ChunkRef { offset, len, hash: Hash::of(&i.to_le_bytes()) });
        offset += u64::from(len);
    }
    Manifest { size: offset, file_hash: file_hash(offset, &refs), chunks: refs }
}

fn best<T>(mut f: impl FnMut() -> T) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn report(step: &str, d: Duration, lines: usize) {
    println!("{step:<14} {:>8.1} us  {:>6.0} ns/line", d.as_secs_f64() * 1e6, d.as_secs_f64() * 1e9 / lines as f64);
}

fn main() {
    let lines = 4096;
    let m = manifest(lines);
    let info = Response::FileInfo {
        share: Name::new("files").expect("a valid name"),
        path: SharePath::parse("data.bin").expect("a valid path"),
        size: m.size,
        file_hash: m.file_hash,
        mtime_ns: 1_765_000_000_000_000_000,
        mode: 0o644,
        chunks: manifest_to_lines(&m),
    };
    let text = info.encode();
    println!("FILE_INFO of {lines} chunks: {} bytes", text.len());

    report("to lines", best(|| manifest_to_lines(&m)), lines);
    report("encode", best(|| info.encode()), lines);

    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let read = || {
        rt.block_on(async {
            let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, text.as_bytes());
            let mut buf = Vec::new();
            let mut n = 0;
            while let Ok(Some(Ok(()))) = deftfs::transport::read_line_bytes(&mut reader, &mut buf).await {
                n += buf.len();
            }
            n
        })
    };
    report("read lines", best(read), lines);

    let split: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    let decode = || {
        let mut d = Decoder::<Response>::default();
        let mut got = None;
        for l in &split {
            if let Ok(Some(msg)) = d.push_line(l) {
                got = Some(msg);
            }
        }
        got
    };
    report("decode", best(decode), lines);
    let Some(Response::FileInfo { size, file_hash, chunks, .. }) = decode() else {
        panic!("the encoded FILE_INFO does not decode");
    };
    report("to manifest", best(|| manifest_from_lines(size, file_hash, &chunks, "bench")), lines);
}
