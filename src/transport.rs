//! transport: in progress.
