//! Arbitrary bytes, split into lines on `\n`, into the chunk stream header
//! parser. It must never panic, and every header it yields must survive
//! encode -> parse unchanged.

#![no_main]

use deftfs::proto::DataHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Ok(header) = DataHeader::parse(line) {
            let encoded = header.encode();
            let again = encoded.strip_suffix("\r\n").expect("a header line ends in CRLF");
            assert_eq!(DataHeader::parse(again).as_ref(), Ok(&header));
        }
    }
});
