//! Throughput of chunking and hashing a file from the page cache, on one
//! thread: `cargo bench --bench chunk`. The file size in MiB comes from
//! `DEFTFS_BENCH_SIZE_MIB` (default 1024); the file is pseudo-random (so
//! FastCDC finds content-defined cuts, not max-size ones), lives under
//! `$TMPDIR` for the run and is deleted afterwards.
//!
//! Every line reads the file through the same bounded buffer as
//! `chunk_file`, so the differences between lines are the cost of each step.
//! Each figure is the best of `RUNS` runs: the machine is shared, and the
//! best run is the closest to what one free core does.

use deftfs::chunk::{chunk_file, ChunkParams, Cutter};
use fastcdc::v2020;
use std::fs::File;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RUNS: usize = 5;
const MIB: u64 = 1024 * 1024;

/// Deletes the temp file however the bench ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> io::Result<()> {
    let size_mib: u64 = match std::env::var("DEFTFS_BENCH_SIZE_MIB") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("DEFTFS_BENCH_SIZE_MIB={v:?} is not a number")))?,
        Err(_) => 1024,
    };
    let size = size_mib * MIB;
    let params = ChunkParams::default();
    let buf_len = params.buffer_len();
    let file = TempFile(std::env::temp_dir().join(format!("deftfs-bench-chunk-{}.bin", std::process::id())));

    write_random(&file.0, size)?;
    // Warm the page cache: every measured run then reads from memory.
    stream(&file.0, buf_len, |data, _| data.len())?;

    println!(
        "deftfs chunk bench: {size_mib} MiB pseudo-random file in {}, one thread, best of {RUNS} runs",
        std::env::temp_dir().display()
    );
    println!(
        "params: min {} / avg {} / max {} bytes (FastCDC v2020, level 1), read buffer {} MiB",
        params.min,
        params.avg,
        params.max,
        buf_len as u64 / MIB
    );
    println!("cpu: {}", cpu_model());
    println!();
    let _ = io::stdout().flush();

    let cutter = Cutter::new(&params).map_err(io::Error::other)?;
    let mut fastcdc_chunks = 0;
    let mut lane_chunks = 0;
    let mut manifest = None;
    let mut steps: Vec<Step> = vec![
        Step::new("read only (page cache -> buffer)", || stream(&file.0, buf_len, |data, _| black_box(data).len())),
        Step::new("blake3 one pass (read + hash)", || {
            let mut hasher = blake3::Hasher::new();
            stream(&file.0, buf_len, |data, _| {
                hasher.update(data);
                data.len()
            })?;
            black_box(hasher.finalize());
            Ok(())
        }),
        Step::new("fastcdc cut only (crate iterator)", || {
            fastcdc_chunks = 0;
            stream(&file.0, buf_len, |data, at_end| {
                fastcdc_cut(data, at_end, &params, |chunk| {
                    black_box(chunk.len());
                    fastcdc_chunks += 1;
                })
            })
        }),
        Step::new("fastcdc cut + chunk hashes (crate iterator)", || {
            stream(&file.0, buf_len, |data, at_end| {
                fastcdc_cut(data, at_end, &params, |chunk| {
                    black_box(blake3::hash(chunk));
                })
            })
        }),
        Step::new("deftfs cut only (4 lanes, same cuts)", || {
            lane_chunks = 0;
            stream(&file.0, buf_len, |data, at_end| {
                lane_cut(data, at_end, &cutter, |chunk| {
                    black_box(chunk.len());
                    lane_chunks += 1;
                })
            })
        }),
        Step::new("deftfs cut + chunk hashes (bare loop)", || {
            stream(&file.0, buf_len, |data, at_end| {
                lane_cut(data, at_end, &cutter, |chunk| {
                    black_box(blake3::hash(chunk));
                })
            })
        }),
        Step::new("chunk_file: the manifest, file hash included", || {
            manifest = Some(chunk_file(&file.0, &params).map_err(io::Error::other)?);
            Ok(())
        }),
    ];
    // Rounds over all steps rather than all runs of one step in a row, so
    // that a busy spell on the shared machine slows every step alike.
    for _ in 0..RUNS {
        for step in &mut steps {
            step.run()?;
        }
    }
    for step in &steps {
        step.print(size);
    }
    let best: Vec<f64> = steps.iter().map(|s| s.best.as_secs_f64()).collect();
    let (read, cut, cut_hashes, full) = (best[0], best[4], best[5], best[6]);
    drop(steps);

    let manifest = manifest.ok_or_else(|| io::Error::other("no run"))?;
    let n = manifest.chunks.len().max(1) as f64;
    let below_max = manifest.chunks.iter().filter(|c| c.len < params.max).count();
    let ms_per_gib = |secs: f64| secs * 1000.0 * (1u64 << 30) as f64 / size as f64;
    println!();
    println!(
        "chunk_file per GiB, by difference of the lines above: read {:.0} ms, cut {:.0} ms, \
         chunk hashes {:.0} ms, manifest and file hash {:.0} ms, total {:.0} ms",
        ms_per_gib(read),
        ms_per_gib(cut - read),
        ms_per_gib(cut_hashes - cut),
        ms_per_gib(full - cut_hashes),
        ms_per_gib(full),
    );
    println!(
        "chunks: {} (fastcdc: {fastcdc_chunks}, deftfs cut: {lane_chunks}), average {:.1} KiB, {} of them cut by content (below max)",
        manifest.chunks.len(),
        manifest.size as f64 / n / 1024.0,
        below_max
    );
    Ok(())
}

/// One measured operation and its best time so far.
struct Step<'a> {
    label: &'static str,
    run: Box<dyn FnMut() -> io::Result<()> + 'a>,
    best: Duration,
}

impl<'a> Step<'a> {
    fn new(label: &'static str, run: impl FnMut() -> io::Result<()> + 'a) -> Step<'a> {
        Step { label, run: Box::new(run), best: Duration::MAX }
    }

    fn run(&mut self) -> io::Result<()> {
        let start = Instant::now();
        (self.run)()?;
        self.best = self.best.min(start.elapsed());
        Ok(())
    }

    /// The best throughput over `bytes`.
    fn print(&self, bytes: u64) {
        let secs = self.best.as_secs_f64();
        println!(
            "{:<44} {:>6.2} GB/s  {:>6.2} GiB/s  ({:.3} s)",
            self.label,
            bytes as f64 / 1e9 / secs,
            bytes as f64 / (1u64 << 30) as f64 / secs,
            secs
        );
    }
}

/// Read `path` through a buffer of `buf_len` bytes, as `chunk_reader` does:
/// `f(buffered, at_end)` returns how many leading bytes it consumed, the rest
/// is carried to the front before the next refill.
fn stream(path: &Path, buf_len: usize, mut f: impl FnMut(&[u8], bool) -> usize) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; buf_len];
    let mut filled = 0;
    loop {
        let mut at_end = false;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => {
                    at_end = true;
                    break;
                }
                n => filled += n,
            }
        }
        let consumed = f(&buf[..filled], at_end);
        if at_end {
            return Ok(());
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

/// Cut `data` with fastcdc's own iterator, passing each final chunk to
/// `on_chunk`; a chunk is final when `max` bytes were visible to the cutter
/// or the input ended. Returns the bytes consumed.
fn fastcdc_cut(data: &[u8], at_end: bool, params: &ChunkParams, mut on_chunk: impl FnMut(&[u8])) -> usize {
    let max = params.max as usize;
    for c in v2020::FastCDC::new(data, params.min, params.avg, params.max) {
        if !at_end && data.len() - c.offset < max {
            return c.offset;
        }
        on_chunk(&data[c.offset..c.offset + c.length]);
    }
    data.len()
}

/// As [`fastcdc_cut`], with deftfs's cutter.
fn lane_cut(data: &[u8], at_end: bool, cutter: &Cutter, mut on_chunk: impl FnMut(&[u8])) -> usize {
    let max = cutter.max_len();
    let mut pos = 0;
    while pos < data.len() && (at_end || data.len() - pos >= max) {
        let len = cutter.next_len(&data[pos..]);
        on_chunk(&data[pos..pos + len]);
        pos += len;
    }
    pos
}

/// Write `size` bytes of xorshift64* output, then flush them to disk so
/// writeback does not run during the measurements.
fn write_random(path: &Path, size: u64) -> io::Result<()> {
    let mut file = File::create(path)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 4 * MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

fn cpu_model() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();
    format!("{model}, {cores} cores, load average {load} at start")
}
