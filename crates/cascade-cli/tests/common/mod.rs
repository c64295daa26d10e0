//! Helpers shared by the `cascade` binary's integration tests.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root: configs, tasks and models are named from there.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `command` to its end, killing it and failing the test if it is
/// still running after `limit`: a hang is a failure.
pub fn finish_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{command:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The IMDB benchmark folder beside the repository.
pub fn imdb_data() -> PathBuf {
    repo_root().join("../shared/data/imdb")
}

/// LR → LLM with `buckets` hashing buckets (small, so a test run is quick)
/// and `replay` past labels per training pass; the first items all go to
/// the LLM (warm-up).
pub fn lr_config(buckets: usize, replay: usize) -> String {
    format!(
        r#"
mu = 4.25e-4
seed = 42
warmup_updates = 10
[[levels]]
name = "lr"
kind = "logreg"
cost = 1182
cache_size = 8
replay = {replay}
[levels.gate]
lr = 7e-4
regularization = 1e-4
decaying_factor = 0.97
calibration = 0.40
[levels.logreg]
buckets = {buckets}
ngrams = 2
optimizer = "adagrad"
lr = 0.5
"#
    )
}

/// Writes the first `n` IMDB test items as JSONL (`in.jsonl`) and `config`
/// (`config.toml`) into `dir`; returns their paths.
pub fn imdb_input(dir: &Path, n: usize, config: &str) -> (PathBuf, PathBuf) {
    use std::io::Write;
    let task = cascade_expert::Task::preset("imdb").unwrap();
    let dataset = cascade_expert::Dataset::load(&imdb_data(), &task, "gpt35").unwrap();
    let stream = dataset.stream(&cascade_expert::StreamOrder::Test).unwrap();
    let input = dir.join("in.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    for item in stream.iter().take(n) {
        let line = serde_json::json!({"id": item.id, "text": item.text});
        writeln!(file, "{line}").unwrap();
    }
    file.flush().unwrap();
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    (input, config_path)
}
