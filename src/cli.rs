//! cli: in progress.
