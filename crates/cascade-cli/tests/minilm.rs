//! The real default encoder, as `scripts/setup.sh` fetches it: our BERT must
//! compute what PyTorch computes on the same weights and tokens.
//!
//! Reference figures come from `../shared/bench/pytorch_minilm.py` (torch 2.15
//! CPU), run on the same batches: `fwd 1 128` and `train 8 256`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn minilm() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let models = std::env::var_os("CASCADE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models"));
    let dir = models.join("all-minilm-l6-v2");
    assert!(
        dir.join(".complete").exists(),
        "MiniLM weights missing at {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// Runs `cascade bench-encoder --only SPEC` and returns the `key=` field of its row.
fn bench_encoder_field(spec: &str, iters: &str, key: &str) -> String {
    let model = minilm();
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["bench-encoder", "--model", model.to_str().unwrap()])
        .args(["--only", spec, "--iters", iters])
        .output()
        .expect("run cascade bench-encoder");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench-encoder failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .split_whitespace()
        .find_map(|field| field.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {stdout}"))
        .to_string()
}

#[test]
fn forward_matches_pytorch_checksum() {
    let checksum: f64 = bench_encoder_field("fwd:1:128", "1", "checksum=")
        .parse()
        .unwrap();
    // PyTorch: checksum=0.0184 (sum of the mean-pooled hidden state).
    assert!((checksum - 0.0184).abs() < 5e-4, "checksum {checksum}");
}

#[test]
fn first_three_training_losses_match_pytorch_to_four_decimals() {
    let losses: Vec<f64> = bench_encoder_field("train:8:256", "2", "losses=")
        .split(',')
        .map(|l| l.parse().unwrap())
        .collect();
    let pytorch = [0.693436, 0.691805, 0.689989];
    assert_eq!(losses.len(), 3, "{losses:?}");
    for (ours, theirs) in losses.iter().zip(pytorch) {
        assert!(
            (ours - theirs).abs() < 5e-5,
            "ours {losses:?}, PyTorch {pytorch:?}"
        );
    }
}
