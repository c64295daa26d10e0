//! `cascade reproduce --quick` end to end: every run of the grid on the first
//! items of each stream, the JSON, the generated table and the figures.

mod common;

use common::repo_root;
use std::process::Command;

use serde_json::Value;

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

fn assert_models_fetched() {
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
}

#[test]
fn quick_grid_writes_json_table_and_figures_from_its_own_runs() {
    assert_models_fetched();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    cascade(&["reproduce", "--quick", "--out", out_dir]);

    let json: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("table1.json")).unwrap()).unwrap();
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
            let path = out
                .path()
                .join("figures")
                .join(format!("{dataset}-{figure}"));
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
        out.path().join("table1.json").to_str().unwrap(),
        "--out",
        again.path().to_str().unwrap(),
    ]);
    assert_eq!(
        table,
        std::fs::read_to_string(again.path().join("table1.md")).unwrap()
    );
}

/// ISEAR's folder copied with one more annotation column, `other_llm`: an
/// annotator that gives the gold label on even ids and GPT-3.5's answer on
/// odd ones. Returns the new data root.
fn isear_with_another_annotator() -> tempfile::TempDir {
    let source = repo_root().join("../shared/data/isear");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("isear");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["labels.txt", "split_test_ids.txt", "split_train_ids.txt"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let compressed = std::fs::File::open(source.join("stream.jsonl.zst")).unwrap();
    let text = String::from_utf8(zstd::stream::decode_all(compressed).unwrap()).unwrap();
    let mut lines = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let mut record: Value = serde_json::from_str(line).unwrap();
        let other = if record["id"].as_u64().unwrap().is_multiple_of(2) {
            record["label"].clone()
        } else {
            record["gpt35"].clone()
        };
        record["other_llm"] = other;
        lines.push(serde_json::to_string(&record).unwrap());
    }
    std::fs::write(dir.join("stream.jsonl"), lines.join("\n") + "\n").unwrap();
    root
}

#[test]
fn the_grid_replays_another_annotation_column_without_the_papers_numbers() {
    assert_models_fetched();
    let root = isear_with_another_annotator();
    let out = tempfile::tempdir().unwrap();
    cascade(&[
        "reproduce",
        "--quick",
        "--datasets",
        "isear",
        "--data-root",
        root.path().to_str().unwrap(),
        "--expert-field",
        "other_llm",
        "--out",
        out.path().to_str().unwrap(),
    ]);

    // What each annotator scores on the quick stream, counted here.
    let text = std::fs::read_to_string(root.path().join("isear/stream.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids = std::fs::read_to_string(root.path().join("isear/split_test_ids.txt")).unwrap();
    let score = |field: &str| {
        let right = ids
            .lines()
            .take(200)
            .map(|id| id.trim().parse::<usize>().unwrap())
            .filter(|&id| records[id][field] == records[id]["label"])
            .count();
        right as f64 / 200.0
    };
    let (other, gpt35) = (score("other_llm"), score("gpt35"));
    assert_ne!(
        other, gpt35,
        "the two annotators must differ to tell them apart"
    );

    let json: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("table1.json")).unwrap()).unwrap();
    assert_eq!(json["expert_field"], "other_llm");
    let runs = json["runs"].as_array().unwrap();
    let llm_only = runs.iter().find(|r| r["kind"] == "llm-only").unwrap();
    let accuracy = llm_only["report"]["accuracy"].as_f64().unwrap();
    assert!((accuracy - other).abs() < 1e-12, "{accuracy} vs {other}");

    let table = std::fs::read_to_string(out.path().join("table1.md")).unwrap();
    assert!(table.contains("`other_llm`"), "{table}");
    assert!(!table.contains("(paper:"), "{table}");
    for run in runs {
        assert!(run["paper_accuracy"].is_null());
    }
    assert!(out.path().join("figures/isear-curve.svg").exists());
}
