//! `cascade reproduce --quick` end to end: every run of the grid on the first
//! items of each stream, the JSON, the generated table and the figures.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cascade(args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run cascade");
    assert!(
        output.status.success(),
        "cascade {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn quick_grid_writes_json_table_and_figures_from_its_own_runs() {
    for model in ["all-minilm-l6-v2", "all-mpnet-base-v2"] {
        assert!(
            repo_root()
                .join("models")
                .join(model)
                .join(".complete")
                .exists(),
            "run scripts/setup.sh first (the grid's transformer students need {model})"
        );
    }
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    cascade(&["reproduce", "--quick", "--out", out_dir]);

    let json: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    let kinds = [
        "llm-only",
        "cascade",
        "larger",
        "distilled-lr",
        "distilled-transformer",
        "online-ensemble",
        "mu-sweep",
    ];
    for dataset in ["imdb", "hatespeech", "isear"] {
        for kind in kinds {
            assert!(
                runs.iter()
                    .any(|r| r["dataset"] == dataset && r["kind"] == kind),
                "no {kind} run for {dataset}"
            );
        }
        for figure in ["curve.svg", "curve.png", "case.svg", "case.png"] {
            let path = out.path().join(format!("{dataset}-{figure}"));
            assert!(
                std::fs::metadata(&path)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{} missing or empty",
                path.display()
            );
        }
    }
    assert!(runs.iter().any(|r| r["kind"] == "shift"));
    let table = std::fs::read_to_string(out.path().join("table1.md")).unwrap();
    for run in runs {
        assert_eq!(run["report"]["items"], 200, "quick runs replay 200 items");
        if let Some(budget) = run["budget"].as_u64() {
            let calls = run["report"]["llm_calls"].as_u64().unwrap()
                + run["report"]["offline_llm_calls"].as_u64().unwrap();
            assert!(
                calls.abs_diff(budget) as f64 <= (0.02 * budget as f64).max(1.0),
                "{run}: {calls} calls for a budget of {budget}"
            );
        }
        // Every cascade cell of the table is this run's own accuracy.
        if run["kind"] == "cascade" {
            let accuracy = run["report"]["accuracy"].as_f64().unwrap();
            assert!(table.contains(&format!("**{:.2} (", 100.0 * accuracy)));
        }
        // A quick grid has no paper number beside it: the budgets are scaled.
        assert!(run["paper_accuracy"].is_null());
    }
    for paper in ["87.95", "92.48", "85.35", "69.75"] {
        assert!(
            !table.contains(paper),
            "the quick table shows paper number {paper}"
        );
    }

    // The table is a function of the JSON alone.
    let again = tempfile::tempdir().unwrap();
    cascade(&[
        "report",
        "--json",
        out.path().join("results.json").to_str().unwrap(),
        "--out",
        again.path().to_str().unwrap(),
    ]);
    assert_eq!(
        table,
        std::fs::read_to_string(again.path().join("table1.md")).unwrap()
    );
}
