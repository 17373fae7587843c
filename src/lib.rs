//! deftfs: mount what a partner shares like a local drive, and keep folders
//! in sync peer to peer.
//!
//! Map of the library, from the bottom up (dependencies point downward):
//!
//! - core, plain Rust (no socket, no clock, no file):
//!   [`hash`], [`proto`] (the DEFT/1 grammar), [`glob`],
//!   [`transfer::window`] (the sliding-window state machine);
//! - files and keys: [`chunk`] (FastCDC + BLAKE3 manifests), [`time`],
//!   [`identity`] (Ed25519 keys, certificates), [`receipt`], [`config`],
//!   [`direct`] (direct I/O) and [`flush`] (early writeback) for big writes, [`db`] (SQLite), [`index`] (cached manifests), [`share`] (mapping
//!   share paths to real files, access);
//! - network engine, async: [`transport`] (QUIC, mutual TLS, partner
//!   authentication), [`transfer`] (push and pull with resume and delta),
//!   [`node`] (the daemon's serving loop);
//! - [`cli`]: the `deftfs` command line.

pub mod api;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod direct;
pub mod fault;
pub mod flat;
pub mod flush;
pub mod glob;
pub mod hash;
pub mod identity;
pub mod index;
pub mod lease;
pub mod mount;
pub mod node;
pub mod proto;
pub mod reach;
pub mod receipt;
pub mod share;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod time;
pub mod transfer;
pub mod transport;
pub mod watch;
pub mod writeback;
