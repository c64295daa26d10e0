//! Config and task files: any text parses to a value or an error, never a panic,
//! and a config that validates can build a cascade of LR students.
#![no_main]

use cascade::{CascadeConfig, Routing};
use cascade_expert::Task;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Task::from_toml(text);
    if let Ok(config) = CascadeConfig::from_toml(text) {
        let only_logreg = config
            .levels
            .iter()
            .all(|l| l.kind == cascade::config::StudentKind::Logreg);
        // Building allocates the hashing space: keep it small.
        let small = config.levels.iter().all(|l| l.logreg.buckets <= 1 << 16);
        if config.validate().is_ok() && only_logreg && small {
            let _ = cascade_runtime::build(&config, 2, Routing::Gated, Some(100));
        }
    }
});
