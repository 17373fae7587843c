//! fault: in progress.
