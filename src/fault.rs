//! Fault injection for end-to-end tests, driven by environment variables.
//! Each hook only makes this node misbehave as a broken peer or network
//! would; the protocol's checks must catch every one of them.
//!
//! - `DEFTFS_FAULT_CORRUPT_CHUNK=<index>`: a sender flips one byte of the
//!   first transmission of that chunk (the receiver must NACK it);
//! - `DEFTFS_FAULT_STALL_AFTER_CHUNKS=<n>`: a sender stops sending new
//!   chunks once n chunks are acknowledged, prints `stalled` on stderr, and
//!   waits (a test then kills it to interrupt the transfer);
//! - `DEFTFS_FAULT_PUSH_BEHIND_DELAY_MS=<n>`: a mount's push behind a close
//!   starts n ms late (a slow partner), so that tests can look at the
//!   state between a close and its push;
//! - `DEFTFS_FAULT_LOCK_BEHIND_DELAY_MS=<n>`: the LOCK a mount sends
//!   behind a create goes out n ms late, so that tests can take the name
//!   elsewhere in between (the race two creates of one new name run);
//! - `DEFTFS_FAULT_RELEASE_PUSH_DELAY_MS=<n>`: the push a mount makes at
//!   the last release of a file (what no close pushed) starts n ms late,
//!   so that tests can open the file again before it;
//! - `DEFTFS_FAULT_CHANGED_DELAY_MS=<n>`: a mount takes each change the
//!   partner announces (WATCH's CHANGED) n ms late, as a slow watch would,
//!   so that tests can look at the mount before it knows;
//! - `DEFTFS_FAULT_REPLAY_DELAY_MS=<n>`: the write-back queue's retry loop
//!   starts n ms after the daemon, so that tests can mount and list before
//!   an earlier run's queued changes land;
//! - `DEFTFS_FAULT_CRASH_IN_PATCH=1`: a serving node patching a file in
//!   place ([`crate::transfer::patch`]) kills itself (`abort`) after the
//!   first range is written, as a power loss would stop it: the next start
//!   must finish the patch from its journal.

use std::sync::OnceLock;

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok()?.trim().parse().ok()
}

pub fn corrupt_chunk() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_CORRUPT_CHUNK"))
}

pub fn stall_after_chunks() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_STALL_AFTER_CHUNKS"))
}

pub fn push_behind_delay_ms() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_PUSH_BEHIND_DELAY_MS"))
}

pub fn lock_behind_delay_ms() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_LOCK_BEHIND_DELAY_MS"))
}

pub fn release_push_delay_ms() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_RELEASE_PUSH_DELAY_MS"))
}

pub fn changed_delay_ms() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_CHANGED_DELAY_MS"))
}

pub fn replay_delay_ms() -> Option<u32> {
    static V: OnceLock<Option<u32>> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_REPLAY_DELAY_MS"))
}

pub fn crash_in_patch() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| env_u32("DEFTFS_FAULT_CRASH_IN_PATCH").is_some_and(|v| v > 0))
}
