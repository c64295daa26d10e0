//! An OpenAI-compatible chat-completions server that misbehaves on request,
//! for tests (ours and users'). The item's text (what follows "review: " in the
//! last message, up to the line's end) is a script: its first word names the
//! item, each next word is what the server does on that attempt: `ok`,
//! `nolabel` (an answer with no label word), `nonjson`, `429` (with
//! `Retry-After: 1`), `500`, `503`, `400`, `reset` (drop the connection
//! unanswered) or `slow` (answer after [`TIMEOUT`] × 3). Hostile answers:
//! 429 with a `Retry-After` of `1e20` (`429huge`), `999999` (`429long`), an
//! HTTP-date two seconds ahead (`429date`), a date in the year 9999
//! (`429far`) or nonsense (`429junk`); a body of [`HUGE_BODY`] bytes on a 200
//! (`huge`, valid JSON with "Positive"; `hugeeof`: the same without a
//! Content-Length, ended by closing the connection) or on a 500 (`huge500`).
//! Past the script it answers `ok` ("Positive", with logprobs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server saw.
#[derive(Default)]
pub struct ServerLog {
    /// Attempts per item text, with the time each began.
    pub attempts: Mutex<HashMap<String, Vec<Instant>>>,
    /// Requests read and not yet settled. A request counts from the moment it
    /// is fully read until the server writes its answer or drops it: the
    /// client cannot finish it before then, so this never over-counts the
    /// client's concurrency (a count that ends when the socket closes would:
    /// the client may already be sending its next request). A `slow` request
    /// stops counting when the server decides to stall it, since only the
    /// client's timeout settles it.
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Huge bodies the client hung up on before the server had written them
    /// whole: it read no more than it needed.
    pub huge_bodies_cut_short: AtomicUsize,
    /// Huge bodies written whole: the client read all of them.
    pub huge_bodies_sent_whole: AtomicUsize,
}

/// Counts one request in flight until dropped.
struct InFlight<'a>(&'a ServerLog);

impl<'a> InFlight<'a> {
    fn start(log: &'a ServerLog) -> Self {
        let now = log.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        log.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(log)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ServerLog {
    pub fn attempts(&self, text: &str) -> usize {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(text)
            .map_or(0, Vec::len)
    }
    pub fn total(&self) -> usize {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// How long the server works on each request before it answers.
pub const WORK: Duration = Duration::from_millis(25);

/// The client timeout the `slow` action outlasts (three times over).
pub const TIMEOUT: Duration = Duration::from_millis(600);

/// The size of a `huge` or `huge500` answer's body: 100 MB.
pub const HUGE_BODY: usize = 100_000_000;

async fn serve(listener: TcpListener, log: Arc<ServerLog>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let log = log.clone();
        tokio::spawn(async move { handle(socket, &log).await });
    }
}

/// Reads one request; returns the item text (the user message after "review: ").
async fn read_request(socket: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[end + 4..end + 4 + length]).ok()?;
                let user = body["messages"].as_array()?.last()?["content"].as_str()?;
                let after = user.split("review: ").nth(1)?;
                return Some(after.lines().next()?.to_string());
            }
        }
    }
}

async fn handle(mut socket: TcpStream, log: &ServerLog) {
    let Some(text) = read_request(&mut socket).await else {
        return;
    };
    let mut in_flight = Some(InFlight::start(log));
    // A real server takes a while to answer; without it requests rarely overlap
    // and the concurrency limit would go unexercised.
    tokio::time::sleep(WORK).await;
    let attempt = {
        let mut attempts = log.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let list = attempts.entry(text.clone()).or_default();
        list.push(Instant::now());
        list.len()
    };
    // The script is the text's words after the first (the item's name).
    let script: Vec<&str> = text.split_whitespace().skip(1).collect();
    let action = script.get(attempt - 1).copied().unwrap_or("ok");
    let ok_body = |content: &str| {
        serde_json::json!({
            "choices": [{
                "message": {"role": "assistant", "content": content},
                "logprobs": {"content": [{
                    "token": "Positive", "logprob": -0.105,
                    "top_logprobs": [
                        {"token": "Positive", "logprob": -0.105},
                        {"token": " negative", "logprob": -2.303},
                        {"token": "The", "logprob": -5.0}
                    ]
                }]}
            }],
            "usage": {"prompt_tokens": 40, "completion_tokens": 1}
        })
        .to_string()
    };
    if let Some((status, with_length)) = match action {
        "huge" => Some(("200 OK", true)),
        "hugeeof" => Some(("200 OK", false)),
        "huge500" => Some(("500 Internal Server Error", true)),
        _ => None,
    } {
        drop(in_flight);
        let whole = send_huge(&mut socket, status, with_length).await;
        let counter = if whole {
            &log.huge_bodies_sent_whole
        } else {
            &log.huge_bodies_cut_short
        };
        counter.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let retry_date = |at: SystemTime| format!("Retry-After: {}\r\n", httpdate::fmt_http_date(at));
    let (status, extra, body) = match action {
        "ok" => ("200 OK", String::new(), ok_body("Positive")),
        "nolabel" => ("200 OK", String::new(), ok_body("I cannot tell")),
        "nonjson" => ("200 OK", String::new(), "<html>gateway</html>".to_string()),
        "429" => (TOO_MANY, "Retry-After: 1\r\n".into(), "{}".into()),
        "429huge" => (TOO_MANY, "Retry-After: 1e20\r\n".into(), "{}".into()),
        "429long" => (TOO_MANY, "Retry-After: 999999\r\n".into(), "{}".into()),
        "429date" => (
            TOO_MANY,
            retry_date(SystemTime::now() + Duration::from_secs(2)),
            "{}".into(),
        ),
        "429far" => (
            TOO_MANY,
            "Retry-After: Fri, 31 Dec 9999 23:59:59 GMT\r\n".into(),
            "{}".into(),
        ),
        "429junk" => (TOO_MANY, "Retry-After: soon-ish\r\n".into(), "{}".into()),
        "500" => ("500 Internal Server Error", String::new(), "oops".into()),
        "503" => ("503 Service Unavailable", String::new(), "busy".into()),
        "400" => (
            "400 Bad Request",
            String::new(),
            "{\"error\": \"bad\"}".into(),
        ),
        "reset" => return, // dropped without an answer
        "slow" => {
            // Answers after the client's timeout, unless the client hangs up first.
            in_flight = None;
            let mut probe = [0u8; 1];
            tokio::select! {
                _ = tokio::time::sleep(TIMEOUT * 3) => {}
                _ = socket.read(&mut probe) => return,
            }
            ("200 OK", String::new(), ok_body("Positive"))
        }
        _ => (
            "400 Bad Request",
            String::new(),
            "{\"error\": \"unknown script action\"}".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    drop(in_flight);
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

const TOO_MANY: &str = "429 Too Many Requests";

/// Writes a [`HUGE_BODY`]-byte answer in 64 KiB pieces (never held whole):
/// a chat completion saying "Positive" padded with spaces, announced by a
/// Content-Length or not (then ended by closing the connection). True when
/// the client read it all, false when it hung up first.
async fn send_huge(socket: &mut TcpStream, status: &str, with_length: bool) -> bool {
    let json = r#"{"choices": [{"message": {"role": "assistant", "content": "Positive"}}]"#;
    let length = if with_length {
        format!("Content-Length: {HUGE_BODY}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{length}Connection: close\r\n\r\n{json}"
    );
    if socket.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let piece = vec![b' '; 64 * 1024];
    // Spaces up to the closing brace, which ends the body at HUGE_BODY bytes.
    let mut left = HUGE_BODY - json.len() - 1;
    while left > 0 {
        let n = left.min(piece.len());
        if socket.write_all(&piece[..n]).await.is_err() {
            return false;
        }
        left -= n;
    }
    if socket.write_all(b"}").await.is_err() {
        return false;
    }
    socket.shutdown().await.is_ok()
}

/// Starts the server on a free port; returns its base URL and its log.
pub async fn start_server() -> std::io::Result<(String, Arc<ServerLog>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    let log = Arc::new(ServerLog::default());
    tokio::spawn(serve(listener, log.clone()));
    Ok((url, log))
}
