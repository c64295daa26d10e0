//! `cascade run` end to end: SIGKILL at random points and resume gives the
//! uninterrupted run's output exactly; bad lines and expert failures each get
//! the right record and never stop the stream.

mod common;

use common::{imdb_data as imdb, imdb_input, lr_config, repo_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// The first `n` IMDB test items and an LR → LLM config; their paths.
fn setup(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    imdb_input(dir, n, &lr_config(65536, 16))
}

fn run_command(input: &Path, output: &Path, config: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .args([
            "run",
            "--task",
            "imdb",
            "--expert",
            "replay",
            "--replay-data",
        ])
        .arg(imdb())
        .arg("--config")
        .arg(config)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .current_dir(repo_root());
    command
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn succeed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// Kills `cascade run --state` with SIGKILL at random points, resuming each
/// time, and compares the final output with an uninterrupted run's.
/// `CASCADE_CRASH_FULL=1`: the whole IMDB test stream and ≥ 20 kills.
#[test]
fn killed_and_resumed_runs_equal_an_uninterrupted_run() {
    let full = std::env::var("CASCADE_CRASH_FULL").is_ok_and(|v| v == "1");
    let (items, kills_wanted) = if full { (12_500, 20) } else { (2_500, 6) };
    crash_test(items, kills_wanted, &[]);
}

/// The same with expert calls in flight: a checkpoint settles them first, and
/// labels are learned on a fixed schedule, so resume is still exact.
#[test]
fn killed_runs_with_calls_in_flight_resume_exactly() {
    crash_test(1_500, 4, &["--max-in-flight", "4"]);
}

fn crash_test(items: usize, kills_wanted: usize, flags: &[&str]) {
    let delay_ms = "1";
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), items);
    let reference = dir.path().join("reference.jsonl");
    let started = Instant::now();
    succeed(
        run_command(
            &input,
            &reference,
            &config,
            &[
                &["--replay-delay-ms", delay_ms, "--checkpoint-every", "100"],
                flags,
            ]
            .concat(),
        )
        .output()
        .unwrap(),
    );
    let uninterrupted = started.elapsed();

    let output = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut attempts, mut resumed) = (0, 0, 0);
    loop {
        attempts += 1;
        assert!(attempts < 200, "no progress after {attempts} attempts");
        let mut extra = vec!["--replay-delay-ms", delay_ms, "--checkpoint-every", "100"];
        extra.extend_from_slice(flags);
        // One command line for every start, as a restart loop would use.
        extra.extend(["--state", state.to_str().unwrap(), "--resume", "auto"]);
        let mut child = run_command(&input, &output, &config, &extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill until enough kills landed and one start has resumed (on a
        // loaded machine the early kills may all come before a checkpoint).
        let wait = if kills < kills_wanted || resumed == 0 {
            rng.random_range(0.05..1.0) * uninterrupted.as_secs_f64() / kills_wanted as f64 * 2.0
        } else {
            f64::INFINITY
        };
        let deadline = Instant::now() + Duration::from_secs_f64(wait.min(600.0));
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match finished {
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(status.success(), "{stderr}");
                resumed += usize::from(stderr.contains("resuming from"));
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                let out = child.wait_with_output().unwrap();
                resumed +=
                    usize::from(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
                kills += 1;
            }
        }
    }
    assert!(kills >= kills_wanted, "{kills} kills");
    // The comparison below proves something only if runs did resume.
    assert!(resumed > 0, "no start resumed from a checkpoint");
    let (got, want) = (records(&output), records(&reference));
    assert_eq!(got.len(), items, "one record per input line");
    let lines: Vec<u64> = got.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, (1..=items as u64).collect::<Vec<_>>());
    assert_eq!(got, want, "same decisions as the uninterrupted run");
    let llm = want.iter().filter(|r| r["answered_by"] == "llm").count();
    assert!(llm > items / 10 && llm < items, "{llm} LLM answers");
    eprintln!(
        "{kills} kills in {attempts} starts ({resumed} resumed); uninterrupted {uninterrupted:?}"
    );
}

#[test]
fn bad_lines_get_error_records_and_the_rest_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (good, config) = setup(dir.path(), 40);
    let good = std::fs::read_to_string(good).unwrap();
    let good: Vec<&str> = good.lines().collect();
    let mut bytes = Vec::new();
    let bad: [&[u8]; 7] = [
        b"{\"id\": 1, \"text\": ",
        b"{\"id\": 2}",
        b"{\"id\": 3, \"text\": \"   \"}",
        b"\xff\xfe\xfd",
        b"",
        b"{\"id\": 4, \"text\": [1, 2]}",
        &[b'x'; 30_000],
    ];
    for (i, line) in good.iter().enumerate() {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Some(bad) = bad.get(i) {
            bytes.extend_from_slice(bad);
            bytes.push(b'\n');
        }
    }
    let input = dir.path().join("mixed.jsonl");
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out.jsonl");
    let stderr = succeed(
        run_command(&input, &output, &config, &["--max-line-bytes", "20000"])
            .output()
            .unwrap(),
    );
    let out = records(&output);
    assert_eq!(out.len(), good.len() + bad.len());
    let reasons = [
        "invalid JSON",
        "no string field `text`",
        "empty `text`",
        "invalid UTF-8",
        "empty line",
        "no string field `text`",
        "max-line-bytes",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let record = &out[2 * i + 1];
        assert_eq!(record["status"], "bad_input", "{record}");
        assert_eq!(record["line"], 2 * i as u64 + 2);
        assert!(
            record["error"].as_str().unwrap().contains(reason),
            "{record}"
        );
    }
    // Good lines are answered; the few whose recorded GPT-3.5 answer holds no
    // label get the deepest student's answer instead.
    let answered: Vec<&Value> = out.iter().filter(|r| r["status"] != "bad_input").collect();
    assert_eq!(answered.len(), good.len());
    assert!(answered
        .iter()
        .all(|r| r["status"] == "ok" || r["status"] == "expert_unavailable"));
    assert!(answered
        .iter()
        .all(|r| r["label"] == "pos" || r["label"] == "neg"));
    assert!(stderr.contains("7 bad input"), "{stderr}");
}

#[test]
fn expert_failures_fall_back_to_the_deepest_student_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = setup(dir.path(), 1);
    // Ids the replay data does not know: the expert cannot answer them.
    let input = dir.path().join("unknown.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|i| format!("{{\"id\": \"x{i}\", \"text\": \"a film review number {i}\"}}"))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    succeed(run_command(&input, &output, &config, &[]).output().unwrap());
    let out = records(&output);
    assert_eq!(out.len(), 30);
    for record in &out {
        assert_eq!(record["status"], "expert_unavailable", "{record}");
        assert_eq!(record["answered_by"], "lr");
        assert!(record["label"].is_string());
        assert!(record["error"].as_str().unwrap().contains("not an item id"));
    }
    succeed(
        run_command(&input, &output, &config, &["--on-expert-failure", "error"])
            .output()
            .unwrap(),
    );
    let out = records(&output);
    assert_eq!(out.len(), 30);
    assert!(out
        .iter()
        .all(|r| r["status"] == "error" && r["label"].is_null()));
}

#[test]
fn state_misuse_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), 50);
    let output = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let state_args = ["--state", state.to_str().unwrap()];
    succeed(
        run_command(&input, &output, &config, &state_args)
            .output()
            .unwrap(),
    );
    // A finished run leaves its checkpoint: starting over must be explicit.
    let again = run_command(&input, &output, &config, &state_args)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    // Resuming a finished run adds nothing.
    let before = records(&output);
    let mut resume = state_args.to_vec();
    resume.push("--resume");
    succeed(
        run_command(&input, &output, &config, &resume)
            .output()
            .unwrap(),
    );
    assert_eq!(records(&output), before);
    // Another config cannot resume this state.
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        lr_config(65536, 16).replace("seed = 42", "seed = 43"),
    )
    .unwrap();
    let wrong = run_command(&input, &output, &other, &resume)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("another config"));
    // `--resume auto` continues a checkpoint when there is one...
    let auto = [state_args[0], state_args[1], "--resume", "auto"];
    let resumed = succeed(
        run_command(&input, &output, &config, &auto)
            .output()
            .unwrap(),
    );
    assert!(resumed.contains("resuming from"), "{resumed}");
    assert_eq!(records(&output), before);
    // ...starts fresh when there is none (the first start of a restart loop)...
    let fresh_state = dir.path().join("fresh");
    let fresh_output = dir.path().join("fresh.jsonl");
    let fresh = ["--state", fresh_state.to_str().unwrap(), "--resume", "auto"];
    let started = succeed(
        run_command(&input, &fresh_output, &config, &fresh)
            .output()
            .unwrap(),
    );
    assert!(!started.contains("resuming from"), "{started}");
    assert_eq!(records(&fresh_output), before);
    // ...and still refuses a checkpoint of another config.
    let wrong = run_command(&input, &output, &other, &auto)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("another config"));
    // Checkpoints need files to re-read and cut back.
    let stdout = run_command(&input, Path::new("-"), &config, &state_args)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&stdout.stderr).contains("--state needs"));
}

/// An OpenAI-compatible test server that fails every attempt for a stretch of
/// the stream: those items fall back to the student, none is lost, and the
/// LLM answers again once the server recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_outage_loses_nothing_and_recovers() {
    let (url, log) = cascade_expert::testing::start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = setup(dir.path(), 1);
    let expert_config = dir.path().join("expert.toml");
    std::fs::write(
        &expert_config,
        format!(
            "base_url = \"{url}\"\nmodel = \"m\"\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_max_ms = 5\ntimeout_secs = 2.0\napi_key_env = \"CASCADE_TEST_NO_KEY\"\n"
        ),
    )
    .unwrap();
    // The text after the item's name scripts the server: an outage for items 40..80.
    let lines: Vec<String> = (0..120)
        .map(|i| {
            let script = if (40..80).contains(&i) {
                "503 503 503"
            } else {
                "ok"
            };
            format!("{{\"id\": {i}, \"text\": \"item{i} {script}\"}}")
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .args([
            "run",
            "--task",
            "tasks/imdb.toml",
            "--expert",
            "openai",
            "--expert-config",
        ])
        .arg(&expert_config)
        .arg("--config")
        .arg(&config)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .current_dir(repo_root());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    succeed(out);
    let out = records(&output);
    assert_eq!(out.len(), 120, "one record per line");
    for (i, record) in out.iter().enumerate() {
        assert_eq!(record["id"], i as u64);
        assert!(record["label"].is_string(), "{record}");
        let status = record["status"].as_str().unwrap();
        if (40..80).contains(&i) {
            // The student answers, or the server failed and the student stood in.
            assert!(
                status == "ok" && record["answered_by"] == "lr" || status == "expert_unavailable",
                "{record}"
            );
        } else {
            assert_eq!(status, "ok", "{record}");
        }
    }
    let unavailable = out
        .iter()
        .filter(|r| r["status"] == "expert_unavailable")
        .count();
    assert!(unavailable > 0, "the outage was felt");
    // Bounded retries: 3 attempts per failed item.
    for record in out.iter().filter(|r| r["status"] == "expert_unavailable") {
        let i = record["id"].as_u64().unwrap();
        assert_eq!(log.attempts(&format!("item{i} 503 503 503")), 3);
    }
    let llm_after = out[80..]
        .iter()
        .filter(|r| r["answered_by"] == "llm")
        .count();
    assert!(llm_after > 0, "the LLM answers again after the outage");
}

/// Calls in flight: one record per line, in input order by default or as
/// settled with --unordered, and the same decisions on every run.
#[test]
fn calls_in_flight_keep_every_record_and_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for the student to start answering (~7% by item 1,000).
    let (input, config) = setup(dir.path(), 1_500);
    let run = |name: &str, extra: &[&str]| {
        let output = dir.path().join(name);
        let flags = [&["--replay-delay-ms", "3", "--max-in-flight", "8"], extra].concat();
        succeed(
            run_command(&input, &output, &config, &flags)
                .output()
                .unwrap(),
        );
        records(&output)
    };
    let first = run("a.jsonl", &[]);
    assert_eq!(first, run("b.jsonl", &[]), "same decisions on every run");
    let lines: Vec<u64> = first.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, (1..=1_500).collect::<Vec<_>>(), "input order");
    let mut unordered = run("c.jsonl", &["--unordered"]);
    let moved = unordered
        .iter()
        .enumerate()
        .any(|(i, r)| r["line"].as_u64() != Some(i as u64 + 1));
    assert!(moved, "students' answers overtake calls in flight");
    unordered.sort_by_key(|r| r["line"].as_u64());
    assert_eq!(unordered, first, "the same records, in another order");
}

// ---- Hardening: stops, edited checkpoints and inputs (issue 22, rows 2, 5, 6) ----

/// Starts `cascade run`, raises SIGTERM after `after`, and waits for it to
/// exit (at most `limit`); returns its stderr.
fn terminate_after(mut command: Command, after: Duration, limit: Duration) -> String {
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            signalled.elapsed() < limit,
            "still running {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).to_string()
}

/// Row 2: a run waiting on an expert that takes ten minutes a call stops on
/// SIGTERM within seconds, settles the call as unavailable and checkpoints;
/// the resumed run finishes every line.
#[test]
fn sigterm_ends_a_wait_on_a_slow_expert_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), 40);
    let output = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let state_args = ["--state", state.to_str().unwrap()];
    let mut slow = state_args.to_vec();
    slow.extend(["--recorded-delay-ms", "600000"]);
    let stderr = terminate_after(
        run_command(&input, &output, &config, &slow),
        Duration::from_millis(1500),
        Duration::from_secs(8),
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        state.join("checkpoint.cbor").exists(),
        "no checkpoint: {stderr}"
    );
    let written = records(&output);
    assert!(!written.is_empty());
    assert!(
        written.iter().any(|r| r["status"] == "expert_unavailable"
            && r["error"].as_str().unwrap_or("").contains("interrupted")),
        "{written:?}"
    );
    let mut resume = state_args.to_vec();
    resume.push("--resume");
    succeed(
        run_command(&input, &output, &config, &resume)
            .output()
            .unwrap(),
    );
    assert_eq!(records(&output).len(), 40, "one record per input line");
}

/// Runs `command`, which must fail saying `reason` and leave `output` as `before`.
fn refused_untouched(mut command: Command, reason: &str, output: &Path, before: &[u8]) {
    let refused = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains(reason), "{stderr}");
    assert_eq!(
        std::fs::read(output).unwrap(),
        before,
        "the output was touched"
    );
}

/// Row 5: a checkpoint changed in any byte (here one that still parses) is
/// refused by its checksum, and the output is left as it was.
#[test]
fn an_edited_checkpoint_is_refused_and_the_output_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), 200);
    let output = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let mut args = vec![
        "--state",
        state.to_str().unwrap(),
        "--checkpoint-every",
        "50",
    ];
    succeed(
        run_command(&input, &output, &config, &args)
            .output()
            .unwrap(),
    );
    let checkpoint = state.join("checkpoint.cbor");
    let mut bytes = std::fs::read(&checkpoint).unwrap();
    // Deep inside the students' weights: the file still parses.
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0x01;
    std::fs::write(&checkpoint, &bytes).unwrap();
    let before = std::fs::read(&output).unwrap();
    args.push("--resume");
    refused_untouched(
        run_command(&input, &output, &config, &args),
        "checksum",
        &output,
        &before,
    );
}

/// Row 6: an input edited before the checkpoint's position is refused on
/// resume, before the output is cut; an input that only grew is accepted.
#[test]
fn an_input_edited_before_the_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), 120);
    let output = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let state_args = ["--state", state.to_str().unwrap()];
    let mut slow = state_args.to_vec();
    slow.extend(["--recorded-delay-ms", "30", "--checkpoint-every", "10"]);
    terminate_after(
        run_command(&input, &output, &config, &slow),
        Duration::from_millis(1500),
        Duration::from_secs(8),
    );
    let before = std::fs::read(&output).unwrap();
    assert!(!before.is_empty(), "nothing was written before the stop");
    let original = std::fs::read_to_string(&input).unwrap();
    // The second line, re-written with another text.
    let mut lines: Vec<String> = original.lines().map(String::from).collect();
    lines[1] = serde_json::json!({"id": 1, "text": "an edited line"}).to_string();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut resume = state_args.to_vec();
    resume.extend(["--checkpoint-every", "10", "--resume"]);
    refused_untouched(
        run_command(&input, &output, &config, &resume),
        "was it edited",
        &output,
        &before,
    );
    // The original input, with lines appended after it, resumes.
    std::fs::write(&input, original.clone() + &original).unwrap();
    succeed(
        run_command(&input, &output, &config, &resume)
            .output()
            .unwrap(),
    );
    assert_eq!(records(&output).len(), 240);
}
