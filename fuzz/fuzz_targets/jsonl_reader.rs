//! The stream reader: any bytes, any line-length limit, never a panic; every
//! line is an item or a bad-input reason.
#![no_main]

use cascade_runtime::input::{read_item, LineReader, RawLine};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = 1 + data.first().copied().unwrap_or(0) as usize * 4;
    let mut reader = LineReader::new(data, max);
    while let Ok(Some(raw)) = reader.next_line() {
        let line = reader.lines as usize;
        if let RawLine::Bytes(bytes) = &raw {
            assert!(bytes.len() <= max);
        }
        if let Ok(item) = read_item(line, raw, max) {
            assert!(!item.text.trim().is_empty());
        }
    }
});
