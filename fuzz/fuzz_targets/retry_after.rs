//! The `Retry-After` parser: any header bytes at any clock, never a panic;
//! plain seconds are read exactly.
#![no_main]

use std::time::{Duration, SystemTime};

use cascade_expert::openai::parse_retry_after;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes set the clock (up to ~35,000 years past 1970).
    let (clock, value) = data.split_at(data.len().min(8));
    let mut seconds = [0u8; 8];
    seconds[..clock.len()].copy_from_slice(clock);
    let now = SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(u64::from_le_bytes(seconds) >> 24))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let wait = parse_retry_after(value, now);
    if let Ok(text) = std::str::from_utf8(value) {
        let text = text.trim();
        if !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()) {
            let n: u64 = text.parse().expect("at most 19 digits");
            assert_eq!(wait, Some(Duration::from_secs(n)), "{text:?}");
        }
    }
});
