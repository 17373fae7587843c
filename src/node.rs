//! node: in progress.
