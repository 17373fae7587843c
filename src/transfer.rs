//! transfer: in progress.
pub mod window;
