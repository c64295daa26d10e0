//! The checkpoint loader: any bytes are refused with an error or restore a
//! cascade that still routes; never a panic.
#![no_main]

use cascade::{CascadeConfig, Routing};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
mu = 5e-4
seed = 1
warmup_updates = 2
[[levels]]
name = "lr"
kind = "logreg"
cost = 1182
cache_size = 2
replay = 2
[levels.gate]
decaying_factor = 0.9
calibration = 0.3
[levels.logreg]
buckets = 64
"#;

fuzz_target!(|data: &[u8]| {
    let config = CascadeConfig::from_toml(CONFIG).expect("config");
    let mut cascade = cascade_runtime::build(&config, 2, Routing::Gated, None).expect("cascade");
    if cascade.load_state(data).is_ok() {
        // A state that loads must leave a cascade that works.
        let _ = cascade.route("a short text");
    }
});
