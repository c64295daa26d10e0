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
    cascade(&["reproduce", "--quick", "--seeds", "2", "--out", out_dir]);

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
    // The paper's rules run where `--select` wrote the row's configs (the
    // committed ones cover HateSpeech and ISEAR at least).
    for dataset in ["imdb", "hatespeech", "isear"] {
        let selected = repo_root()
            .join("configs/selected")
            .join(format!("{dataset}-paper-rules.toml"))
            .is_file();
        let ran = runs
            .iter()
            .any(|r| r["dataset"] == dataset && r["kind"] == "paper-rules");
        assert_eq!(ran, selected, "{dataset}");
        assert!(
            selected || dataset == "imdb",
            "no selected configs for {dataset}"
        );
    }
    let table = std::fs::read_to_string(out.path().join("table1.md")).unwrap();
    for run in runs {
        assert_eq!(run["report"]["items"], 200, "quick runs replay 200 items");
        // The paper's rules reach a budget through mu alone, as near as it can.
        if let Some(budget) = run["budget"]
            .as_u64()
            .filter(|_| run["kind"] != "paper-rules")
        {
            let calls = run["report"]["llm_calls"].as_u64().unwrap()
                + run["report"]["offline_llm_calls"].as_u64().unwrap();
            assert!(
                calls.abs_diff(budget) as f64 <= (0.02 * budget as f64).max(1.0),
                "{run}: {calls} calls for a budget of {budget}"
            );
        }
        // A cascade cell is the mean ± sd of its seeds' runs.
        if run["kind"] == "cascade" {
            let cell: Vec<f64> = runs
                .iter()
                .filter(|r| {
                    r["kind"] == "cascade"
                        && r["dataset"] == run["dataset"]
                        && r["budget"] == run["budget"]
                })
                .map(|r| r["report"]["accuracy"].as_f64().unwrap())
                .collect();
            assert_eq!(cell.len(), 2, "two seeds per cascade cell");
            let mean = (cell[0] + cell[1]) / 2.0;
            let sd = (cell[0] - cell[1]).abs() / 2f64.sqrt();
            let text = format!("**{:.2} ± {:.2} (", 100.0 * mean, 100.0 * sd);
            assert!(table.contains(&text), "{text} not in the table");
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

/// The configs folder copied with the embedding cache moved into `cache`, so
/// the test neither reads nor grows the shared one.
fn configs_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    let cache = dir.join("cache").display().to_string();
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("\".cache/embeddings\"", &format!("{cache:?}"));
            std::fs::write(configs.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    configs
}

#[test]
fn select_scores_candidates_on_the_train_half_and_writes_what_it_chose() {
    assert_models_fetched();
    let dir = tempfile::tempdir().unwrap();
    let configs = configs_copy(dir.path());
    let out = dir.path().join("out");
    let select_with = |extra: &[&str]| {
        let mut args = vec![
            "reproduce",
            "--select",
            "--quick",
            "--select-seeds",
            "1",
            "--datasets",
            "isear",
            "--configs",
            configs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cascade(&args)
    };
    let select = || select_with(&[]);
    select();
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
    let isear = &json["datasets"][0];
    assert_eq!(isear["dataset"], "isear");
    let candidates = isear["candidates"].as_array().unwrap();
    let scores: Vec<f64> = candidates
        .iter()
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    let chosen = isear["chosen"].as_u64().unwrap() as usize;
    let chosen_index = chosen;
    // The chosen candidate has the best score, the first of equals.
    let best = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(chosen, scores.iter().position(|&s| s == best).unwrap());
    // Stage 1 tries 16 structures at the base's pricing ("last" on ISEAR),
    // then the best of them with the other; stage 2 tunes the best.
    let stage = |n: u64| candidates.iter().filter(move |c| c["stage"] == n);
    assert_eq!(stage(1).count(), 17);
    let structure = |c: &Value| {
        let k = &c["candidate"];
        (
            k["layers"].clone(),
            k["combine_levels"].clone(),
            k["replay"].clone(),
            k["pacing"].clone(),
            k["prices"].clone(),
        )
    };
    let first_sixteen = &candidates[..16];
    assert!(first_sixteen
        .iter()
        .all(|c| c["candidate"]["prices"] == "last"));
    let sixteen_best = first_sixteen
        .iter()
        .reduce(|a, b| {
            if b["score"].as_f64().unwrap() > a["score"].as_f64().unwrap() {
                b
            } else {
                a
            }
        })
        .unwrap();
    let other = &candidates[16];
    assert_eq!(other["candidate"]["prices"], "all");
    let mut same = other["candidate"].clone();
    same["prices"] = "last".into();
    assert_eq!(same, sixteen_best["candidate"]);
    // The best structure: the first of the highest stage-1 scores.
    let stage_one_best = stage(1)
        .reduce(|a, b| {
            if b["score"].as_f64().unwrap() > a["score"].as_f64().unwrap() {
                b
            } else {
                a
            }
        })
        .unwrap();
    assert!(stage(2).count() >= 11);
    assert!(stage(2).all(|c| structure(c) == structure(stage_one_best)));
    // Each run is scored on the train half at the scaled budget: 200 items.
    for c in candidates {
        for run in c["runs"].as_array().unwrap() {
            assert!(run["llm_calls"].as_u64().unwrap() <= 200);
        }
    }

    // The written configs carry the chosen options.
    let chosen = &candidates[chosen]["candidate"];
    let read = |name: &str| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(configs.join("selected").join(name)).unwrap())
            .unwrap()
    };
    let cascade_config = read("isear.toml");
    assert_eq!(
        cascade_config["combine_levels"].as_bool(),
        chosen["combine_levels"].as_bool()
    );
    assert_eq!(
        cascade_config["budget_pacing"].as_float(),
        chosen["pacing"].as_f64()
    );
    assert_eq!(
        cascade_config["budget_prices"].as_str(),
        chosen["prices"].as_str()
    );
    let embed = &cascade_config["levels"][1];
    assert_eq!(embed["kind"].as_str(), Some("embedding_head"));
    assert_eq!(embed["replay"].as_integer(), chosen["replay"].as_i64());
    let calibration = embed["gate"]["calibration"].as_float().unwrap();
    assert!((calibration - chosen["calibration"].as_f64().unwrap()).abs() < 1e-6);
    // The paper's rules: the same students without our mechanisms.
    let paper = read("isear-paper-rules.toml");
    assert_eq!(paper["combine_levels"].as_bool(), Some(false));
    for level in paper["levels"].as_array().unwrap() {
        assert_eq!(level["replay"].as_integer(), Some(0));
    }
    assert_eq!(
        paper["levels"][1]["embedding_head"],
        embed["embedding_head"]
    );
    assert!(configs.join("selected/isear-3level.toml").is_file());
    let md = std::fs::read_to_string(out.join("selection.md")).unwrap();
    assert!(md.contains("**Chosen:"), "{md}");

    // An interrupted search resumes: given the first 5 candidates' scores
    // (as the search leaves them after each), it scores the rest alone and
    // ends where the whole search did.
    let partial = out.join("selection-isear.partial.json");
    assert!(!partial.exists(), "a whole search leaves no partial file");
    let base: cascade::CascadeConfig =
        toml::from_str(&std::fs::read_to_string(configs.join("isear-mpnet.toml")).unwrap())
            .unwrap();
    let kept: Vec<Value> = candidates[..5].to_vec();
    let state = serde_json::json!({
        "dataset": "isear", "quick": true, "base": base,
        "budgets": isear["budgets"], "seeds": json["seeds"], "candidates": kept,
    });
    std::fs::write(&partial, serde_json::to_vec(&state).unwrap()).unwrap();
    let again = select();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("resuming a search with 5 candidates"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("score ").count(),
        candidates.len() - 5,
        "{stderr}"
    );
    let resumed: Value =
        serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
    assert_eq!(&resumed["datasets"][0]["candidates"], &isear["candidates"]);
    assert!(!partial.exists());

    // `--reuse-scores` keeps selection.json's candidates once their best
    // scores the same again (one candidate scored), and scores every
    // candidate again when it does not (here: a recorded run altered).
    let reuse = || select_with(&["--reuse-scores"]);
    let kept = reuse();
    let stderr = String::from_utf8_lossy(&kept.stderr);
    assert_eq!(stderr.matches(": score ").count(), 1, "{stderr}");
    let json_path = out.join("selection.json");
    let reused: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(&reused["datasets"][0]["candidates"], &isear["candidates"]);
    assert_eq!(reused["datasets"][0]["reused"], candidates.len());
    let mut altered = reused.clone();
    altered["datasets"][0]["candidates"][chosen_index]["runs"][0]["llm_calls"] = 1.into();
    std::fs::write(&json_path, serde_json::to_vec(&altered).unwrap()).unwrap();
    let fresh = reuse();
    let stderr = String::from_utf8_lossy(&fresh.stderr);
    assert!(stderr.contains("its runs differ now"), "{stderr}");
    assert_eq!(
        stderr.matches(": score ").count(),
        candidates.len() + 1,
        "{stderr}"
    );
    let rescored: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(&rescored["datasets"][0]["candidates"], &isear["candidates"]);
    assert_eq!(rescored["datasets"][0]["reused"], 0);
}
