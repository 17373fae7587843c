//! db: in progress.
