//! Arbitrary bytes, split into lines on `\n`, into the request decoder.
//! It must never panic, and every request it yields must survive
//! encode -> decode unchanged. A BEGIN_TRANSFER whose manifest is relative
//! to its base (SAME lines) is also expanded against a base manifest made
//! from the input: never a panic, and only ever to a manifest of CHUNKS
//! chunks that passes the checks of a whole one.

#![no_main]

use deftfs::chunk::{ChunkRef, Manifest};
use deftfs::hash::Hash;
use deftfs::proto::{Decoder, PushManifest, Request};
use libfuzzer_sys::fuzz_target;

/// Up to 16 chunks of 1 to 256 bytes, sized by the input's first bytes;
/// chunk `i` has the hash of `[i]`, so that runs repeat across inputs.
fn base_of(data: &[u8]) -> Manifest {
    let mut offset = 0u64;
    let chunks: Vec<ChunkRef> = data
        .iter()
        .take(16)
        .enumerate()
        .map(|(i, &b)| {
            let c = ChunkRef { offset, len: u32::from(b) + 1, hash: Hash::of(&[i as u8]) };
            offset += u64::from(c.len);
            c
        })
        .collect();
    Manifest::new(offset, chunks)
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::<Request>::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Ok(Some(request)) = decoder.push_bytes(line) {
            if let Request::BeginTransfer { size, file_hash, manifest: PushManifest::Relative { chunks, lines }, .. } = &request {
                let base = base_of(data);
                let max = deftfs::transfer::MAX_CHUNK;
                if let Ok(m) = deftfs::transfer::relative::expand(*size, *file_hash, *chunks, lines, &base, max) {
                    assert_eq!(m.chunks.len(), *chunks as usize);
                    assert!(m.validate(max).is_ok());
                }
            }
            let mut again = Decoder::<Request>::default();
            let mut decoded = None;
            for line in request.encode().split_terminator("\r\n") {
                decoded = again.push_line(line).expect("an encoded request decodes");
            }
            assert_eq!(decoded.as_ref(), Some(&request));
        }
    }
});
