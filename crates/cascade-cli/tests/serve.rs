//! `cascade serve` over HTTP on 127.0.0.1: classify single and batch, auth,
//! bad bodies, a full queue, metrics, and shutdown with a checkpoint.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cascade serve` on a free port with the replay expert.
fn serve_command(extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .args([
            "serve",
            "--task",
            "imdb",
            "--config",
            "configs/imdb-lr.toml",
        ])
        .args([
            "--replay-data",
            "../shared/data/imdb",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("CASCADE_TEST_TOKEN", "s3cret")
        .current_dir(repo_root());
    command
}

/// Starts the server and waits for its address.
fn serve(extra: &[&str]) -> Server {
    let mut child = serve_command(extra).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    Server { child, url }
}

async fn post(
    server: &Server,
    body: &str,
    token: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/classify", server.url))
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let value = response.json().await.unwrap_or(Value::Null);
    (status, value, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_auth_bad_bodies_and_metrics() {
    let server = serve(&[
        "--token-env",
        "CASCADE_TEST_TOKEN",
        "--max-body-bytes",
        "100000",
    ]);
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200, "health needs no token");

    let (status, _, _) = post(&server, r#"{"id": 1, "text": "fine"}"#, None).await;
    assert_eq!(status, 401);
    let (status, _, _) = post(&server, r#"{"id": 1, "text": "fine"}"#, Some("wrong")).await;
    assert_eq!(status, 401);

    // Item ids of the IMDB data: the replay expert answers them.
    let (status, single, _) = post(
        &server,
        r#"{"id": 0, "text": "A fine film."}"#,
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{single}");
    assert_eq!(single["status"], "ok");
    assert!(single["label"] == "pos" || single["label"] == "neg");

    let batch = json!({"items": [
        {"id": 1, "text": "Loved it."},
        {"id": 2},
        {"id": 3, "text": "  "},
        {"id": "nope", "text": "an id the replay data lacks"},
    ]});
    let (status, out, _) = post(&server, &batch.to_string(), Some("s3cret")).await;
    assert_eq!(status, 200, "{out}");
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["status"], "ok");
    assert_eq!(results[1]["status"], "bad_input");
    assert_eq!(results[2]["status"], "bad_input");
    // Deferred during warm-up, and the expert cannot answer: the student stands in.
    assert_eq!(results[3]["status"], "expert_unavailable", "{}", results[3]);

    let (status, out, _) = post(&server, "{not json", Some("s3cret")).await;
    assert_eq!(status, 400);
    assert!(out["error"].as_str().unwrap().contains("invalid JSON"));
    let big = json!({"text": "x".repeat(200_000)}).to_string();
    let (status, _, _) = post(&server, &big, Some("s3cret")).await;
    assert_eq!(status, 413, "body over --max-body-bytes");

    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "cascade_items_total{answered_by=\"llm\",status=\"ok\"} 2",
        "cascade_items_total{answered_by=\"\",status=\"bad_input\"} 2",
        "cascade_items_total{answered_by=\"lr\",status=\"expert_unavailable\"} 1",
        "cascade_exploration_probability{level=\"lr\"}",
        "cascade_request_duration_seconds_count 2",
        "cascade_audited_agreement",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = serve(&["--max-pending", "1", "--replay-delay-ms", "1500"]);
    let slow = {
        let url = server.url.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/classify"))
                .body(r#"{"id": 5, "text": "deferred during warm-up, slow expert"}"#)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, headers) = post(&server, r#"{"id": 6, "text": "next"}"#, None).await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!(
        slow.await.unwrap(),
        200,
        "the first request still completes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_a_checkpoint_that_a_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let mut server = serve(&["--state", &state_arg]);
    for id in 0..20 {
        let (status, _, _) = post(
            &server,
            &json!({"id": id, "text": format!("review {id}")}).to_string(),
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(state.join("checkpoint.cbor").exists());
    // Without --resume the checkpoint is not silently overwritten.
    let refused = serve_command(&["--state", &state_arg]).output().unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    let resumed = serve(&["--state", &state_arg, "--resume"]);
    let metrics = reqwest::get(format!("{}/metrics", resumed.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cascade_items_total{answered_by=\"llm\",status=\"ok\"} 20"),
        "counts restored:\n{metrics}"
    );
}
