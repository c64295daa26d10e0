//! The chat-completions expert against a misbehaving OpenAI-compatible server
//! started inside the test on 127.0.0.1 (`cascade_expert::testing`): each
//! item's text scripts what the server does on each attempt for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cascade_expert::testing::{start_server, TIMEOUT};
use cascade_expert::Task;
use cascade_expert::{label_all, Expert, ExpertError, OpenAiConfig, OpenAiExpert, Query};
use tokio::net::TcpListener;

fn imdb_task() -> Task {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tasks/imdb.toml");
    Task::load(path.to_str().unwrap()).unwrap()
}

fn config(url: &str, cache: Option<PathBuf>) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(url, "test-model");
    c.timeout_secs = TIMEOUT.as_secs_f64();
    c.max_attempts = 4;
    c.backoff_base_ms = 10;
    c.backoff_max_ms = 50;
    c.concurrency = 3;
    c.logprobs = true;
    c.api_key_env = "CASCADE_TEST_NO_SUCH_KEY".into();
    c.cache = cache;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_item_ends_labelled_or_with_a_typed_error() {
    let (url, log) = start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("responses.jsonl");
    let mut c = config(&url, Some(cache.clone()));
    // Every wait is capped by backoff_max_ms: room for Retry-After: 1.
    c.backoff_max_ms = 1_500;
    let expert = OpenAiExpert::new(c, imdb_task()).unwrap();

    let mut texts: Vec<String> = [
        "a ok",
        "b 429 ok",
        "c 500 503 ok",
        "d reset ok",
        "e slow ok",
        "f nonjson",
        "g nolabel",
        "h 500 500 500 500 500",
        "i 400 ok",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.extend((0..24).map(|i| format!("load{i} ok")));
    let started = Instant::now();
    let results = label_all(&expert, &texts).await;

    assert_eq!(results.len(), texts.len(), "one result per item");
    for (text, result) in texts.iter().zip(&results) {
        let name = text.split_whitespace().next().unwrap();
        match name {
            "f" => assert!(
                matches!(result, Err(ExpertError::Malformed(_))),
                "{result:?}"
            ),
            "g" => assert!(
                matches!(result, Err(ExpertError::NoLabel { .. })),
                "{result:?}"
            ),
            "h" => assert!(
                matches!(result, Err(ExpertError::Exhausted { attempts: 4, .. })),
                "{result:?}"
            ),
            "i" => assert!(
                matches!(result, Err(ExpertError::Status { status: 400, .. })),
                "{result:?}"
            ),
            _ => {
                let answer = result.as_ref().unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(answer.label, 1, "{text}");
                let probs = answer.probs.as_ref().expect("logprobs give probabilities");
                assert!(
                    (probs[1] - 0.9).abs() < 0.01 && (probs[0] - 0.1).abs() < 0.01,
                    "{probs:?}"
                );
            }
        }
    }
    // Bounded retries, never on a 4xx other than 429 or an unparsable answer.
    for (text, attempts) in [
        ("a ok", 1),
        ("b 429 ok", 2),
        ("c 500 503 ok", 3),
        ("d reset ok", 2),
        ("e slow ok", 2),
        ("f nonjson", 1),
        ("g nolabel", 1),
        ("h 500 500 500 500 500", 4),
        ("i 400 ok", 1),
    ] {
        assert_eq!(log.attempts(text), attempts, "{text}");
    }
    // Retry-After: 1 is honoured (it is under backoff_max_ms).
    let b = log.attempts.lock().unwrap()["b 429 ok"].clone();
    assert!(
        b[1] - b[0] >= Duration::from_millis(990),
        "{:?}",
        b[1] - b[0]
    );
    let max_in_flight = log.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&max_in_flight),
        "{max_in_flight} requests in flight"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let usage = expert.usage();
    assert_eq!(usage.requests as usize, log.total());
    assert_eq!(usage.retries as usize, log.total() - texts.len());

    // A re-run pays for nothing that was answered: the cache serves it.
    drop(expert);
    let before = log.total();
    let again = OpenAiExpert::new(config(&url, Some(cache)), imdb_task()).unwrap();
    let answered: Vec<String> = texts
        .iter()
        .filter(|t| !["f", "g", "h", "i"].contains(&t.split_whitespace().next().unwrap()))
        .cloned()
        .collect();
    let results = label_all(&again, &answered).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|a| a.cached)));
    assert_eq!(log.total(), before, "no request for a cached answer");
    assert_eq!(again.usage().cache_hits as usize, answered.len());
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_field_named() {
    let mut c = config("ftp://x", None);
    let err = OpenAiExpert::new(c.clone(), imdb_task()).err().unwrap();
    assert!(err.to_string().contains("base_url"), "{err}");
    c.base_url = "http://127.0.0.1:9".into();
    c.concurrency = 0;
    let err = OpenAiExpert::new(c, imdb_task()).err().unwrap();
    assert!(err.to_string().contains("concurrency"), "{err}");
    // A preset has no prompt: the expert needs a task file.
    let err = OpenAiExpert::new(
        config("http://127.0.0.1:9", None),
        Task::preset("imdb").unwrap(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("task file"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_ends_in_a_bounded_typed_error() {
    // Nothing listens on this port once the listener is dropped.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);
    let expert = OpenAiExpert::new(config(&url, None), imdb_task()).unwrap();
    let result = expert.label(Query::text("x ok")).await;
    match result {
        Err(ExpertError::Exhausted { attempts: 4, last }) => {
            assert!(matches!(*last, ExpertError::Connection(_)), "{last:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_side_rate_limit_spaces_requests() {
    let (url, log) = start_server().await.unwrap();
    let mut c = config(&url, None);
    c.concurrency = 8;
    // 60 a minute: a burst of 60, then one a second.
    c.requests_per_minute = Some(60);
    let expert = OpenAiExpert::new(c, imdb_task()).unwrap();
    let texts: Vec<String> = (0..62).map(|i| format!("r{i} ok")).collect();
    let started = Instant::now();
    let results = label_all(&expert, &texts).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(log.total(), 62);
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
}

/// Labels one item, or fails the test if that takes more than `limit`: the
/// expert must end every call, whatever the server says.
async fn label_within(
    expert: &OpenAiExpert,
    text: &str,
    limit: Duration,
) -> Result<cascade_expert::Answer, ExpertError> {
    tokio::time::timeout(limit, expert.label(Query::text(text)))
        .await
        .unwrap_or_else(|_| panic!("{text}: no answer within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_any_duration_is_a_capped_wait_not_a_panic() {
    let (url, log) = start_server().await.unwrap();
    let expert = OpenAiExpert::new(config(&url, None), imdb_task()).unwrap();
    // Retry-After: 1e20 seconds is more than a Duration holds.
    let answer = label_within(&expert, "h 429huge ok", Duration::from_secs(10)).await;
    assert_eq!(answer.unwrap().label, 1);
    assert_eq!(log.attempts("h 429huge ok"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wait_on_the_server_is_capped_by_backoff_max() {
    let (url, log) = start_server().await.unwrap();
    // backoff_max_ms is 50: 999999 seconds, a date in the year 9999 and a
    // date two seconds ahead all become waits of at most 50 ms.
    let expert = OpenAiExpert::new(config(&url, None), imdb_task()).unwrap();
    for text in ["l 429long 429long ok", "f 429far ok", "d 429date ok"] {
        let answer = label_within(&expert, text, Duration::from_secs(10)).await;
        assert_eq!(answer.unwrap().label, 1, "{text}");
        let times = log.attempts.lock().unwrap()[text].clone();
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] < Duration::from_millis(900),
                "{text}: waited {:?}",
                pair[1] - pair[0]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_date_retry_after_is_honoured_and_nonsense_is_ignored() {
    let (url, log) = start_server().await.unwrap();
    let mut c = config(&url, None);
    c.backoff_max_ms = 5_000;
    let expert = OpenAiExpert::new(c, imdb_task()).unwrap();
    let answer = label_within(&expert, "d 429date ok", Duration::from_secs(10)).await;
    assert_eq!(answer.unwrap().label, 1);
    let times = log.attempts.lock().unwrap()["d 429date ok"].clone();
    // The date is two seconds ahead, to the second: at least one second away.
    assert!(
        times[1] - times[0] >= Duration::from_millis(900),
        "{:?}",
        times[1] - times[0]
    );
    // Nonsense falls back to the exponential backoff (base 10 ms).
    let answer = label_within(&expert, "j 429junk ok", Duration::from_secs(10)).await;
    assert_eq!(answer.unwrap().label, 1);
    assert_eq!(log.attempts("j 429junk ok"), 2);
}

#[tokio::test]
async fn a_timeout_beyond_any_duration_is_refused_at_setup() {
    let mut c = config("http://127.0.0.1:9", None);
    c.timeout_secs = 1e20;
    let err = OpenAiExpert::new(c, imdb_task()).err().unwrap();
    assert!(err.to_string().contains("timeout_secs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_read_only_up_to_a_cap() {
    let (url, log) = start_server().await.unwrap();
    let expert = OpenAiExpert::new(config(&url, None), imdb_task()).unwrap();
    // A 100 MB chat completion that would say "Positive" is refused, whether
    // its length is announced or not.
    for text in ["big huge", "big2 hugeeof"] {
        let result = label_within(&expert, text, Duration::from_secs(20)).await;
        match result {
            Err(ExpertError::Malformed(reason)) => {
                assert!(reason.contains("max_response_bytes"), "{reason}")
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    // A 100 MB error body: the status counts (a retry), the body is cut.
    let answer = label_within(&expert, "err huge500 ok", Duration::from_secs(20)).await;
    assert_eq!(answer.unwrap().label, 1);
    assert_eq!(log.attempts("err huge500 ok"), 2);
    let result = label_within(
        &expert,
        "err2 huge500 huge500 huge500 huge500",
        Duration::from_secs(20),
    )
    .await;
    match result {
        Err(ExpertError::Exhausted { last, .. }) => match *last {
            ExpertError::Status { status: 500, body } => {
                assert!(body.chars().count() <= 200, "{} chars", body.len())
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    // The client hung up on every huge body before the server had sent it
    // (the server notices a moment after the client has moved on).
    let counted = || {
        log.huge_bodies_sent_whole.load(Ordering::SeqCst)
            + log.huge_bodies_cut_short.load(Ordering::SeqCst)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while counted() < 7 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(log.huge_bodies_sent_whole.load(Ordering::SeqCst), 0);
    assert_eq!(log.huge_bodies_cut_short.load(Ordering::SeqCst), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_max_request_bytes_is_refused_unsent() {
    let (url, log) = start_server().await.unwrap();
    let mut c = config(&url, None);
    // Too small for the prompt with a text of MAX_TEXT_BYTES: refused at setup.
    c.max_request_bytes = 1_000;
    let err = OpenAiExpert::new(c.clone(), imdb_task()).err().unwrap();
    let message = err.to_string();
    assert!(
        message.contains("`user`") && message.contains("max_request_bytes"),
        "{message}"
    );
    // Room for a text of MAX_TEXT_BYTES; a longer text is refused per item.
    c.max_request_bytes = cascade_expert::openai::MAX_TEXT_BYTES + 4_096;
    let expert = OpenAiExpert::new(c, imdb_task()).unwrap();
    let long = format!("long {}", "x".repeat(2 << 20));
    let result = label_within(&expert, &long, Duration::from_secs(10)).await;
    assert!(
        matches!(result, Err(ExpertError::RequestTooLarge { .. })),
        "{result:?}"
    );
    let answer = label_within(&expert, "short ok", Duration::from_secs(10)).await;
    assert_eq!(answer.unwrap().label, 1);
    assert_eq!(log.total(), 1, "the long text was never sent");
}
