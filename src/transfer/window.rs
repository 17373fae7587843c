//! window: in progress.
