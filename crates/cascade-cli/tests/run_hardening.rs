//! `cascade run` against hostile input and a hostile LLM server (issue 22):
//! a Retry-After no Duration holds or of days neither crashes nor stalls the
//! run; ids beyond 64 bits stay distinct and keep every digit; a byte-order
//! mark is skipped and NUL lines are bad input.

mod common;

use common::{lr_config, repo_root};
use std::process::{Command, Stdio};
use std::time::Duration;

use cascade_expert::testing::start_server;
use serde_json::Value;

/// Runs `cascade run` on `input` against a fresh test server, failing the
/// test if the run has not ended within a minute (a hang is a failure).
/// Returns the output file's lines as written.
async fn run(input: &[u8]) -> Vec<String> {
    let (url, _log) = start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, expert, i, o) = (
        dir.path().join("config.toml"),
        dir.path().join("expert.toml"),
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
    );
    std::fs::write(&config, lr_config(4096, 0)).unwrap();
    std::fs::write(
        &expert,
        format!(
            "base_url = \"{url}\"\nmodel = \"m\"\nmax_attempts = 3\nbackoff_base_ms = 10\nbackoff_max_ms = 100\ntimeout_secs = 2.0\napi_key_env = \"CASCADE_TEST_NO_KEY\"\n"
        ),
    )
    .unwrap();
    std::fs::write(&i, input).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .args(["run", "--task", "tasks/imdb.toml", "--expert", "openai"])
        .arg("--expert-config")
        .arg(&expert)
        .arg("--config")
        .arg(&config)
        .arg("--input")
        .arg(&i)
        .arg("--output")
        .arg(&o)
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        common::finish_within(command, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::read_to_string(&o)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_retry_after_values_neither_crash_nor_stall_a_run() {
    let lines = run(b"a 429huge ok\nb 429long ok\nc 429far ok\nd 429date ok\n").await;
    let records = parse(&lines);
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["answered_by"], "llm", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_beyond_64_bits_stay_distinct_and_keep_every_digit() {
    let mut input = b"\xEF\xBB\xBF".to_vec();
    input.extend_from_slice(
        concat!(
            r#"{"id": 18446744073709551617, "text": "a ok"}"#,
            "\n",
            r#"{"id": 18446744073709551618, "text": "b ok"}"#,
            "\n",
            "\0\0\0\n",
            r#"{"id": 7, "text": "c ok"}"#,
            "\n",
            r#"{"id": 0.10000000000000000001, "text": "d ok"}"#,
            "\n",
        )
        .as_bytes(),
    );
    let lines = run(&input).await;
    assert_eq!(lines.len(), 5);
    // Each id exactly as written: the number's text, not a float or a string.
    // (The byte-order mark did not make the first line plain text.)
    for (line, id) in lines.iter().zip([
        "18446744073709551617",
        "18446744073709551618",
        "null",
        "7",
        "0.10000000000000000001",
    ]) {
        assert!(line.contains(&format!("\"id\":{id},")), "{id}: {line}");
    }
    // (Parsed into a `Value`, the two big ids would round to the same float.)
    let records = parse(&lines);
    assert_eq!(records[0]["status"], "ok");
    assert_eq!(records[2]["status"], "bad_input");
    assert!(records[2]["error"].as_str().unwrap().contains("NUL"));
    assert_eq!(records[3]["id"], 7);
}
