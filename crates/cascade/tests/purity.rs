//! The core holds the algorithm only: its dependency tree has no candle,
//! tokenizers, async runtime or HTTP client, and a runtime without its
//! default features (LR students, recorded or OpenAI experts) has no candle.

use std::process::Command;

fn tree(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_core_depends_on_no_candle_tokio_or_reqwest() {
    let core = tree(&["-p", "cascade"]);
    // The tree was really listed.
    assert!(core.contains("rand_chacha"), "{core}");
    for banned in ["candle", "tokenizers", "gemm", "tokio", "reqwest", "hyper"] {
        assert!(
            !core.contains(banned),
            "the core depends on {banned}:\n{core}"
        );
    }
}

#[test]
fn a_runtime_of_lr_students_depends_on_no_candle() {
    let lean = tree(&["-p", "cascade-runtime", "--no-default-features"]);
    assert!(lean.contains("cascade-expert"), "{lean}");
    for banned in ["candle", "tokenizers", "gemm"] {
        assert!(
            !lean.contains(banned),
            "the lean runtime depends on {banned}:\n{lean}"
        );
    }
    // With its default features it does carry the encoders.
    assert!(tree(&["-p", "cascade-runtime"]).contains("candle-core"));
}
