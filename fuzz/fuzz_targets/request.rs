//! Arbitrary bytes, split into lines on `\n`, into the request decoder.
//! It must never panic, and every request it yields must survive
//! encode -> decode unchanged.

#![no_main]

use deftfs::proto::{Decoder, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::<Request>::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Ok(Some(request)) = decoder.push_bytes(line) {
            let mut again = Decoder::<Request>::default();
            let mut decoded = None;
            for line in request.encode().split_terminator("\r\n") {
                decoded = again.push_line(line).expect("an encoded request decodes");
            }
            assert_eq!(decoded.as_ref(), Some(&request));
        }
    }
});
