//! Early writeback: start the kernel writing a file's dirty pages while it
//! is still being written, so the fsync that ends the write finds little
//! left to do.
//!
//! A 1 GiB file written at network speed and fsynced at the end spends its
//! last second (on this class of disk) waiting for the whole gigabyte to
//! reach the device, with nothing else going on. Kicking writeback every
//! few MiB overlaps that with the transfer. The kick only *starts* I/O
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): it never waits for it, it
//! guarantees nothing, and the closing fsync stays the durability point.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes written between two kicks.
const STEP: u64 = 8 << 20;

/// Counts bytes written to one file and starts its writeback every [`STEP`].
#[derive(Debug, Default)]
pub struct EarlyWriteback {
    written: AtomicU64,
}

impl EarlyWriteback {
    /// `n` more bytes were written to `file`.
    pub fn wrote(&self, file: &File, n: u64) {
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if (before + n) / STEP != before / STEP {
            start_writeback(file);
        }
    }
}

/// Ask the kernel to start writing every dirty page of `file` now. Advisory:
/// a failure here (a file system without support) changes nothing, since
/// the fsync that follows reports real write errors.
pub fn start_writeback(file: &File) {
    // SAFETY: the descriptor is open for the duration of the call; offset 0
    // and length 0 mean the whole file; the call does not touch memory.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;
    use std::os::unix::fs::FileExt;

    #[test]
    fn kicks_leave_the_content_alone() {
        let dir = TestDir::new("flush");
        let path = dir.path().join("f");
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let ew = EarlyWriteback::default();
        let block = vec![7u8; 3 << 20];
        for i in 0..6u64 {
            file.write_all_at(&block, i * block.len() as u64).unwrap();
            ew.wrote(&file, block.len() as u64);
        }
        assert_eq!(ew.written.load(Ordering::Relaxed), 18 << 20);
        file.sync_all().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 18 << 20);
        assert!(back.iter().all(|&b| b == 7));
    }
}
