//! share: in progress.
