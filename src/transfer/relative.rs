//! A push's manifest relative to its base version's (capability SAME,
//! PROTOCOL.md 8.1): what the sender writes instead of one CHUNK line per
//! chunk, and how the receiver rebuilds the whole manifest from it.
//!
//! A re-save of a large file keeps most of its chunks, in the base's order:
//! a 1 MiB edit of a 1 GiB file changes 4 of ~4,000 chunks, and an insert
//! at the start moves every chunk by the same distance but keeps its size
//! and hash. Each run of chunks the base has, one after the other, becomes
//! one SAME line (~20 bytes) instead of a CHUNK line each (~90 bytes).
//!
//! Guarantees: [`expand`] of what [`relative_lines`] wrote, against the same
//! base, gives back the new manifest exactly (a property test checks it).
//! [`expand`] takes any lines, however hostile: it never panics, never
//! builds more than CHUNKS chunks, refuses a run outside the base, and only
//! returns a manifest that passes [`Manifest::validate`], so the file hash
//! the sender named is checked as for a whole manifest. Plain Rust: no I/O.

use crate::chunk::{ChunkRef, Manifest, ManifestError};
use crate::hash::Hash;
use crate::proto::{ChunkLine, RelativeLine};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelativeError {
    #[error("line for chunk {index}: expected chunk {expected}")]
    Order { index: u32, expected: usize },
    #[error("CHUNK {index} starts at {offset}, expected {expected}")]
    Gap { index: u32, offset: u64, expected: u64 },
    #[error("SAME {index}: base chunks {base_index} to {end} are not all in the base version's manifest of {base_len} chunks")]
    OutsideBase { index: u32, base_index: u32, end: u64, base_len: usize },
    #[error("the lines give more chunks than CHUNKS ({chunks})")]
    TooMany { chunks: u32 },
    #[error("the lines give {given} chunks but CHUNKS is {chunks}")]
    TooFew { given: usize, chunks: u32 },
    #[error("the chunks go past SIZE ({size})")]
    PastSize { size: u64 },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// The lines that describe `new` relative to `base`: a SAME line for each
/// run of chunks (same size and hash) that follow each other in `base`,
/// a CHUNK line for each chunk `base` does not have.
pub fn relative_lines(new: &Manifest, base: &Manifest) -> Vec<RelativeLine> {
    // The first place each chunk is in the base: where a run may start.
    let mut first: HashMap<(Hash, u32), u32> = HashMap::with_capacity(base.chunks.len());
    for (i, c) in base.chunks.iter().enumerate() {
        first.entry((c.hash, c.len)).or_insert(i as u32);
    }
    let same = |b: Option<&ChunkRef>, c: &ChunkRef| b.is_some_and(|b| b.hash == c.hash && b.len == c.len);
    let mut lines: Vec<RelativeLine> = Vec::new();
    for (i, c) in new.chunks.iter().enumerate() {
        let index = i as u32;
        if let Some(RelativeLine::Same { base_index, count, .. }) = lines.last_mut() {
            let next = u64::from(*base_index) + u64::from(*count);
            if same(usize::try_from(next).ok().and_then(|n| base.chunks.get(n)), c) {
                *count += 1;
                continue;
            }
        }
        match first.get(&(c.hash, c.len)) {
            Some(&base_index) => lines.push(RelativeLine::Same { index, base_index, count: 1 }),
            None => lines.push(RelativeLine::Chunk(ChunkLine { index, offset: c.offset, size: c.len, hash: c.hash })),
        }
    }
    lines
}

/// Rebuild the manifest of `chunks` chunks, `size` bytes and file hash
/// `file_hash` that `lines` describe relative to `base`, and check it as a
/// whole manifest is checked (chunk sizes up to `max_chunk`, coverage, file
/// hash).
pub fn expand(
    size: u64,
    file_hash: Hash,
    chunks: u32,
    lines: &[RelativeLine],
    base: &Manifest,
    max_chunk: u32,
) -> Result<Manifest, RelativeError> {
    // Memory follows what the lines give, up to CHUNKS: a count is only a
    // claim until the runs are found in the base.
    let mut out: Vec<ChunkRef> = Vec::with_capacity((chunks as usize).min(base.chunks.len().saturating_add(lines.len())));
    let mut offset = 0u64;
    for line in lines {
        match *line {
            RelativeLine::Chunk(c) => {
                if c.index as usize != out.len() {
                    return Err(RelativeError::Order { index: c.index, expected: out.len() });
                }
                if c.offset != offset {
                    return Err(RelativeError::Gap { index: c.index, offset: c.offset, expected: offset });
                }
                if out.len() >= chunks as usize {
                    return Err(RelativeError::TooMany { chunks });
                }
                out.push(ChunkRef { offset, len: c.size, hash: c.hash });
                offset = offset.saturating_add(u64::from(c.size));
            }
            RelativeLine::Same { index, base_index, count } => {
                if index as usize != out.len() {
                    return Err(RelativeError::Order { index, expected: out.len() });
                }
                let end = u64::from(base_index) + u64::from(count);
                let run = usize::try_from(end).ok().and_then(|end| base.chunks.get(base_index as usize..end));
                let Some(run) = run else {
                    return Err(RelativeError::OutsideBase { index, base_index, end, base_len: base.chunks.len() });
                };
                if out.len() + run.len() > chunks as usize {
                    return Err(RelativeError::TooMany { chunks });
                }
                for b in run {
                    out.push(ChunkRef { offset, len: b.len, hash: b.hash });
                    offset = offset.saturating_add(u64::from(b.len));
                }
            }
        }
        if offset > size {
            return Err(RelativeError::PastSize { size });
        }
    }
    if out.len() != chunks as usize {
        return Err(RelativeError::TooFew { given: out.len(), chunks });
    }
    let manifest = Manifest { size, file_hash, chunks: out };
    manifest.validate(max_chunk)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u32 = 16 << 20;

    fn chunk(n: u8) -> (u32, Hash) {
        (1000 + u32::from(n), Hash(*blake3::hash(&[n]).as_bytes()))
    }

    /// A manifest of the chunks named by `ids` (the same id, the same chunk).
    fn manifest(ids: &[u8]) -> Manifest {
        let mut offset = 0;
        let chunks = ids
            .iter()
            .map(|&n| {
                let (len, hash) = chunk(n);
                let c = ChunkRef { offset, len, hash };
                offset += u64::from(len);
                c
            })
            .collect::<Vec<_>>();
        Manifest::new(offset, chunks)
    }

    fn round_trip(new: &Manifest, base: &Manifest) -> Vec<RelativeLine> {
        let lines = relative_lines(new, base);
        let chunks = new.chunks.len() as u32;
        assert_eq!(expand(new.size, new.file_hash, chunks, &lines, base, MAX).as_ref(), Ok(new));
        lines
    }

    #[test]
    fn an_edit_in_the_middle_is_two_runs_and_the_new_chunks() {
        let base = manifest(&(0..100).collect::<Vec<_>>());
        let mut ids: Vec<u8> = (0..100).collect();
        ids[50] = 200;
        ids[51] = 201;
        let lines = round_trip(&manifest(&ids), &base);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], RelativeLine::Same { index: 0, base_index: 0, count: 50 });
        assert_eq!(lines[3], RelativeLine::Same { index: 52, base_index: 52, count: 48 });
    }

    #[test]
    fn an_insert_at_the_start_moves_every_chunk_but_keeps_one_run() {
        let base = manifest(&(0..100).collect::<Vec<_>>());
        let mut ids = vec![250u8];
        ids.extend(1..100u8);
        let lines = round_trip(&manifest(&ids), &base);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[1], RelativeLine::Same { index: 1, base_index: 1, count: 99 });
    }

    #[test]
    fn reordered_repeated_and_empty_manifests_round_trip() {
        let base = manifest(&[1, 2, 3, 1, 2, 3, 4]);
        round_trip(&manifest(&[3, 4, 1, 2, 3, 3, 9, 1]), &base);
        round_trip(&manifest(&[]), &base);
        round_trip(&manifest(&[5, 6]), &manifest(&[]));
    }

    #[test]
    fn hostile_lines_are_refused() {
        let base = manifest(&[1, 2, 3]);
        let new = manifest(&[1, 2, 3]);
        let (size, hash) = (new.size, new.file_hash);
        let same = |index, base_index, count| RelativeLine::Same { index, base_index, count };
        let cases: Vec<(u32, Vec<RelativeLine>)> = vec![
            (3, vec![same(0, 0, 4)]),                               // run past the base
            (3, vec![same(0, u32::MAX, 3)]),                        // far past it
            (3, vec![same(0, 0, 2)]),                               // too few chunks
            (2, vec![same(0, 0, 3)]),                               // more than CHUNKS
            (3, vec![same(0, 0, 1), same(2, 1, 2)]),                // skips an index
            (3, vec![same(0, 1, 1), same(1, 1, 1), same(2, 2, 1)]), // other chunks: the hash differs
            (4, vec![same(0, 0, 3), same(3, 0, 1)]),                // past SIZE
        ];
        for (chunks, lines) in cases {
            assert!(expand(size, hash, chunks, &lines, &base, MAX).is_err(), "{chunks} {lines:?}");
        }
        // A CHUNK line must start where the run before it ended.
        let (len, h) = chunk(3);
        let at = |offset| vec![same(0, 0, 2), RelativeLine::Chunk(ChunkLine { index: 2, offset, size: len, hash: h })];
        assert!(expand(size, hash, 3, &at(2003), &base, MAX).is_ok());
        assert!(matches!(expand(size, hash, 3, &at(2002), &base, MAX), Err(RelativeError::Gap { .. })));
    }

    proptest! {
        /// Whatever the new and the base versions share, the relative form
        /// rebuilds the new manifest exactly, in at most as many lines.
        #[test]
        fn relative_lines_expand_to_the_manifest(
            base in prop::collection::vec(0u8..12, 0..40),
            new in prop::collection::vec(0u8..16, 0..40),
        ) {
            let (base, new) = (manifest(&base), manifest(&new));
            let lines = relative_lines(&new, &base);
            prop_assert!(lines.len() <= new.chunks.len());
            let got = expand(new.size, new.file_hash, new.chunks.len() as u32, &lines, &base, MAX);
            prop_assert_eq!(got, Ok(new));
        }

        /// Arbitrary lines never panic, and what they expand to is a valid
        /// manifest of CHUNKS chunks.
        #[test]
        fn arbitrary_lines_never_panic(
            base in prop::collection::vec(0u8..8, 0..10),
            chunks in 0u32..12,
            size in 0u64..20_000,
            lines in prop::collection::vec(prop_oneof![
                (0u32..12, prop_oneof![0u32..12, Just(u32::MAX)], 0u32..12)
                    .prop_map(|(index, base_index, count)| RelativeLine::Same { index, base_index, count }),
                (0u32..12, 0u64..20_000, 0u32..2000, 0u8..8).prop_map(|(index, offset, size, n)| {
                    RelativeLine::Chunk(ChunkLine { index, offset, size, hash: chunk(n).1 })
                }),
            ], 0..8),
        ) {
            let base = manifest(&base);
            let hash = crate::chunk::file_hash(size, &[]);
            if let Ok(m) = expand(size, hash, chunks, &lines, &base, MAX) {
                prop_assert_eq!(m.chunks.len(), chunks as usize);
                prop_assert!(m.validate(MAX).is_ok());
            }
        }
    }
}
