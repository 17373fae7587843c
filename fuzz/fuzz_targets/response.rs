//! Arbitrary bytes, split into lines on `\n`, into the response decoder.
//! It must never panic, and every response it yields must survive
//! encode -> decode unchanged.

#![no_main]

use deftfs::proto::{Decoder, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::<Response>::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Ok(Some(response)) = decoder.push_bytes(line) {
            let mut again = Decoder::<Response>::default();
            let mut decoded = None;
            for line in response.encode().split_terminator("\r\n") {
                decoded = again.push_line(line).expect("an encoded response decodes");
            }
            assert_eq!(decoded.as_ref(), Some(&response));
        }
    }
});
