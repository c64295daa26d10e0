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

/// Runs `cascade bench-embed` on the first IMDB test texts with `args`.
fn bench_embed(args: &[&str]) -> std::process::Output {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/imdb");
    Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["bench-embed", "--model", minilm().to_str().unwrap()])
        .args(["--data", data.to_str().unwrap()])
        .args(["--texts", "8", "--rounds", "1", "--max-len", "64"])
        .args(args)
        .output()
        .expect("run cascade bench-embed")
}

#[test]
fn int8_embeddings_are_the_same_with_every_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let embeddings = |kernel: Option<&str>| {
        let path = dir.path().join(kernel.unwrap_or("best"));
        let mut args = vec!["--only", "int8", "--save", path.to_str().unwrap()];
        args.extend(kernel.map(|k| ["--int8-kernel", k]).into_iter().flatten());
        let out = bench_embed(&args);
        assert!(
            out.status.success(),
            "{kernel:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(path).unwrap()
    };
    let best = embeddings(None);
    assert_eq!(best.len(), 8 * 384 * 4, "8 embeddings of 384 floats");
    assert!(
        best == embeddings(Some("scalar")),
        "the CPU's best kernel and the scalar one differ"
    );

    let out = bench_embed(&["--int8-kernel", "avx9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("avx9") && stderr.contains("avx512-vnni"),
        "{stderr}"
    );
}
