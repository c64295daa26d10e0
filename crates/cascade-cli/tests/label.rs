//! `cascade label` against the misbehaving test server: one output record per
//! input line, bad lines reported, a re-run served from the response cache.

mod common;

use common::repo_root;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cascade_expert::testing::start_server;
use serde_json::Value;

fn label(url: &str, input: &Path, output: &Path, cache: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args([
            "label",
            "--task",
            "tasks/imdb.toml",
            "--base-url",
            url,
            "--model",
            "m",
        ])
        .args(["--max-attempts", "2", "--timeout", "0.6", "--logprobs"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .arg("--cache")
        .arg(cache)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_gets_one_record_and_a_rerun_pays_nothing() {
    let (url, log) = start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut bytes = Vec::new();
    for line in [
        r#"{"id": "a", "text": "a ok"}"#,
        r#"{"id": 7, "text": "b 503 ok"}"#,
        "c ok",
        r#"{"id": "d", "text": "#,
        r#"{"id": "e"}"#,
        r#"{"id": "f", "text": "  "}"#,
        r#"{"id": "g", "text": "g nolabel"}"#,
        r#"{"id": "h", "text": "h 500 500 500"}"#,
    ] {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"\xff\xfe not utf-8\n");
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out.jsonl");
    let cache = dir.path().join("cache.jsonl");
    let url2 = url.clone();
    let (i, o, c) = (input.clone(), output.clone(), cache.clone());
    // The binary blocks; the server runs on this test's runtime.
    tokio::task::spawn_blocking(move || label(&url2, &i, &o, &c))
        .await
        .unwrap();

    let records: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 9, "one record per input line");
    let status: Vec<&str> = records
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        status,
        [
            "ok",
            "ok",
            "ok",
            "bad_input",
            "bad_input",
            "bad_input",
            "error",
            "error",
            "bad_input"
        ]
    );
    for (k, r) in records.iter().enumerate() {
        assert_eq!(r["line"], k + 1);
    }
    assert_eq!(records[0]["id"], "a");
    assert_eq!(records[1]["id"], 7);
    assert_eq!(records[0]["label"], "pos");
    assert!(records[0]["probs"][1].as_f64().unwrap() > 0.85);
    assert!(records[3]["error"]
        .as_str()
        .unwrap()
        .contains("invalid JSON"));
    assert!(records[4]["error"].as_str().unwrap().contains("text"));
    assert!(records[8]["error"].as_str().unwrap().contains("UTF-8"));
    assert!(records[6]["error"].as_str().unwrap().contains("no label"));
    assert!(records[7]["error"].as_str().unwrap().contains("2 attempts"));

    // A re-run asks again only for what got no answer: a, b, c and g's answer
    // ("I cannot tell") come from the cache; h's server has recovered by its
    // fourth attempt, so h is labelled now.
    let before = log.total();
    let o = output.clone();
    let stderr = tokio::task::spawn_blocking(move || label(&url, &input, &o, &cache))
        .await
        .unwrap();
    assert!(stderr.contains("4 from the cache"), "{stderr}");
    assert_eq!(log.total() - before, 2, "h: one more 500, then ok");
    let again: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again[7]["status"], "ok");
    assert_eq!(again[6]["status"], "error");
}

#[test]
fn the_local_expert_labels_a_stream_offline() {
    let model = repo_root().join("models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    assert!(model.is_file(), "{}: run scripts/setup.sh", model.display());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"text\": \"A wonderful, moving film. I loved it.\"}\nDreadful and boring; I walked out.\n{\"id\": 3}\n",
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args(["label", "--task", "tasks/imdb.toml", "--expert", "local"])
            .arg("--local-model")
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--cache")
            .arg(dir.path().join("cache.jsonl"))
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let records: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["label"], "pos");
    assert_eq!(records[1]["label"], "neg");
    assert_eq!(records[2]["status"], "bad_input");
    assert_eq!(records[0]["cached"], false);
    // A re-run is served from the cache.
    let second = run();
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("0 requests"), "{stderr}");
}

/// Runs `cascade label` with `args` (after the task), killing it and failing
/// the test if it has not ended within `limit`: a hang is a failure.
fn label_within(task: &Path, args: &[&str], limit: Duration) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .arg("label")
        .arg("--task")
        .arg(task)
        .args(args)
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::finish_within(command, limit)
}

fn imdb() -> PathBuf {
    repo_root().join("tasks/imdb.toml")
}

/// Output lines as written (raw text, so numbers are seen as written).
fn output_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_records(path: &Path) -> Vec<Value> {
    output_lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `cascade label` on `input` against a fresh test server: the process
/// output, the output file and the folder holding it.
async fn label_lines(input: &[u8], extra: &[&str]) -> (Output, PathBuf, tempfile::TempDir) {
    let (url, _log) = start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (i, o) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    std::fs::write(&i, input).unwrap();
    let mut args: Vec<String> = vec![
        "--base-url".into(),
        url,
        "--model".into(),
        "m".into(),
        "--max-attempts".into(),
        "2".into(),
        "--cache".into(),
        dir.path().join("cache.jsonl").display().to_string(),
        "--input".into(),
        i.display().to_string(),
        "--output".into(),
        o.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        label_within(&imdb(), &args, Duration::from_secs(60))
    })
    .await
    .unwrap();
    (out, o, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_retry_after_values_neither_crash_nor_hang_label() {
    let (url, log) = start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("expert.toml");
    std::fs::write(
        &config,
        format!(
            "base_url = \"{url}\"\nmodel = \"m\"\napi_key_env = \"CASCADE_TEST_NO_SUCH_KEY\"\nbackoff_base_ms = 10\nbackoff_max_ms = 100\nmax_attempts = 3\n"
        ),
    )
    .unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.jsonl"));
    std::fs::write(
        &input,
        "a 429huge ok\nb 429long ok\nc 429far ok\nd 429junk ok\n",
    )
    .unwrap();
    let args: Vec<String> = vec![
        "--expert-config".into(),
        config.display().to_string(),
        "--cache".into(),
        dir.path().join("cache.jsonl").display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        label_within(&imdb(), &args, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let records = read_records(&output);
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r["status"] == "ok"), "{records:?}");
    assert_eq!(log.total(), 8, "one 429 and one answer per item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_max_line_bytes_is_one_bad_input_and_the_next_is_answered() {
    // 2 MiB on one line: over the default limit of 1 MiB.
    let mut input = b"first ok\n".to_vec();
    input.extend(vec![b'x'; 2 << 20]);
    input.extend_from_slice(b"\nnext ok\n");
    let (out, output, _dir) = label_lines(&input, &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = read_records(&output);
    let status: Vec<&str> = records
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["ok", "bad_input", "ok"]);
    let reason = records[1]["error"].as_str().unwrap();
    assert!(reason.contains("max-line-bytes"), "{reason}");
    assert_eq!(records[1]["line"], 2);
    assert_eq!(records[2]["line"], 3);

    // The limit is a flag.
    let (out, output, _dir) =
        label_lines(b"short ok\na longer line ok\n", &["--max-line-bytes", "10"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Vec<String> = read_records(&output)
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(status, ["ok", "bad_input"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_come_back_exactly_as_the_input_wrote_them() {
    let input = concat!(
        r#"{"id": 18446744073709551617, "text": "a ok"}"#,
        "\n",
        r#"{"id": 18446744073709551618, "text": "b ok"}"#,
        "\n",
        r#"{"id": 0.10000000000000000001, "text": "c ok"}"#,
        "\n",
        r#"{"id": "s-1", "text": "d ok"}"#,
        "\n",
        r#"{"id": -7, "text": "e nolabel"}"#,
        "\n",
        "plain ok\n",
    );
    let (out, output, _dir) = label_lines(input.as_bytes(), &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = output_lines(&output);
    assert_eq!(lines.len(), 6);
    for (line, id) in lines.iter().zip([
        "18446744073709551617",
        "18446744073709551618",
        "0.10000000000000000001",
        "\"s-1\"",
        "-7",
        "6",
    ]) {
        assert!(line.contains(&format!("\"id\":{id},")), "{id}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_is_skipped_and_nul_bytes_are_bad_input() {
    let mut input = b"\xEF\xBB\xBF".to_vec();
    input.extend_from_slice(br#"{"id": "x", "text": "a ok"}"#);
    input.extend_from_slice(b"\n\0\0\0\nafter ok\n");
    let (out, output, _dir) = label_lines(&input, &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = read_records(&output);
    let status: Vec<&str> = records
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["ok", "bad_input", "ok"]);
    assert_eq!(records[0]["id"], "x");
    assert!(records[1]["error"].as_str().unwrap().contains("NUL"));

    // UTF-16 (little-endian, with its byte-order mark): no line is an item.
    let mut utf16 = vec![0xFF, 0xFE];
    for unit in "{\"id\": 1, \"text\": \"a ok\"}\nb ok\n".encode_utf16() {
        utf16.extend_from_slice(&unit.to_le_bytes());
    }
    let (out, output, _dir) = label_lines(&utf16, &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = read_records(&output);
    assert!(!records.is_empty());
    for r in &records {
        assert_eq!(r["status"], "bad_input", "{r}");
        let reason = r["error"].as_str().unwrap();
        assert!(
            reason.contains("NUL") && reason.contains("UTF-16"),
            "{reason}"
        );
    }
}

#[test]
fn a_prompt_that_cannot_fit_a_text_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task.toml");
    let user = format!("review: {}", "{text} ".repeat(100_000));
    std::fs::write(
        &task,
        format!("name = \"t\"\nlabels = [\"neg\", \"pos\"]\nuser = \"{user}\"\n"),
    )
    .unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a ok\n").unwrap();
    let out = label_within(
        &task,
        &[
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--max-attempts",
            "1",
            "--cache",
            dir.path().join("cache.jsonl").to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            dir.path().join("out.jsonl").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("`user`") && stderr.contains("max_request_bytes"),
        "{stderr}"
    );
}
