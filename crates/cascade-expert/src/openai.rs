//! An OpenAI-compatible chat-completions expert (OpenAI, vLLM, llama.cpp
//! server, Ollama, TGI) that survives real APIs: bounded retries with
//! exponential backoff and jitter on 429/5xx/connection errors, `Retry-After`,
//! a per-request timeout, bounded concurrency, a client-side rate limit and a
//! persistent response cache.
//!
//! Nothing a server says can crash, hang or exhaust the client: a
//! `Retry-After` is parsed defensively ([`parse_retry_after`]) and every wait
//! on the server is capped by `backoff_max_ms`; response bodies are read only
//! up to `max_response_bytes` (error bodies only up to what is reported);
//! requests are bounded by `max_request_bytes`.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::task::Task;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::cache::{CachedAnswer, ResponseCache, SharedCache};
use crate::expert::{Answer, AnswerFuture, Expert, ExpertError, Query, Usage};

/// Settings of the chat-completions expert. The API key is read from the
/// environment variable `api_key_env` and never stored in this struct.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub model: String,
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Token id → bias, e.g. toward the label words' tokens (model-specific).
    #[serde(default)]
    pub logit_bias: BTreeMap<String, f32>,
    /// Ask for the first token's top log-probabilities and turn them into a
    /// probability over labels when the server returns them.
    #[serde(default)]
    pub logprobs: bool,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The most bytes of a response body read; a longer answer is malformed.
    /// A chat completion of a few tokens with logprobs is a few KB.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// The most bytes of prompt (system message + user message with the text
    /// in it) one request may carry; a longer request is refused unsent. A
    /// task whose prompt cannot carry a text of [`MAX_TEXT_BYTES`] within it is
    /// refused at setup.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    pub requests_per_minute: Option<u32>,
    /// Estimated as (prompt characters / 4) + max_tokens per request.
    pub tokens_per_minute: Option<u32>,
    /// Append-only JSONL response cache; `None`: in memory only.
    pub cache: Option<PathBuf>,
}

fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_max_tokens() -> u32 {
    5
}
fn default_timeout_secs() -> f64 {
    30.0
}
fn default_max_attempts() -> u32 {
    6
}
fn default_backoff_base_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_concurrency() -> usize {
    8
}
fn default_max_response_bytes() -> usize {
    1 << 20
}
fn default_max_request_bytes() -> usize {
    4 << 20
}

/// The text a task's prompt must be able to carry within `max_request_bytes`
/// (checked at setup): 1 MiB, the default line limit of `cascade run` and
/// `cascade label`. Longer texts are checked per request.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// How much of an error response's body is read: the 200 characters an
/// error reports, at up to 4 bytes each.
const ERROR_BODY_CHARS: usize = 200;
const ERROR_BODY_BYTES: usize = ERROR_BODY_CHARS * 4;

/// How long the server asks the client to wait, from a `Retry-After` value:
/// seconds (an integer, or leniently a decimal; one too large for a
/// `Duration` gives `Duration::MAX`) or an HTTP-date (a date already past
/// gives zero). `None` for anything else (negative, not finite, nonsense,
/// not UTF-8). Never panics; the caller caps the wait.
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Whole seconds, the standard form: exact (an f64 would round 19 digits).
        return Some(text.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    if text.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        let seconds: f64 = text.parse().ok()?;
        if !seconds.is_finite() {
            return None;
        }
        return Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl OpenAiConfig {
    /// Defaults for everything but the endpoint and model.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: default_key_env(),
            temperature: 0.0,
            seed: None,
            max_tokens: default_max_tokens(),
            logit_bias: BTreeMap::new(),
            logprobs: false,
            timeout_secs: default_timeout_secs(),
            max_attempts: default_max_attempts(),
            backoff_base_ms: default_backoff_base_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            concurrency: default_concurrency(),
            max_response_bytes: default_max_response_bytes(),
            max_request_bytes: default_max_request_bytes(),
            requests_per_minute: None,
            tokens_per_minute: None,
            cache: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("expert config `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("task `{0}` has no prompt; use a task file (tasks/*.toml)")]
    NoPrompt(String),
    #[error("task `{task}`: the prompt's `user` holds `{{text}}` {occurrences} time(s); with a text of {text_bytes} bytes a request would carry {bytes} bytes, over max_request_bytes ({limit})")]
    PromptTooLarge {
        task: String,
        occurrences: usize,
        text_bytes: usize,
        bytes: u64,
        limit: usize,
    },
    #[error("response cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Client(String),
}

pub struct OpenAiExpert {
    config: OpenAiConfig,
    /// `timeout_secs`, checked.
    timeout: Duration,
    task: Task,
    api_key: Option<String>,
    http: reqwest::Client,
    in_flight: Semaphore,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    cache: SharedCache,
    /// Hash of everything in a request but the item: part of the cache key.
    prompt_fingerprint: String,
    usage: Mutex<Usage>,
}

/// One attempt's failure, with the server's `Retry-After` when it gave one.
struct Failure {
    error: ExpertError,
    retry_after: Option<Duration>,
}

impl OpenAiExpert {
    pub fn new(config: OpenAiConfig, task: Task) -> Result<Self, SetupError> {
        let invalid = |field, reason: &str| SetupError::Invalid {
            field,
            reason: reason.into(),
        };
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(invalid("base_url", "must start with http:// or https://"));
        }
        if config.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        if config.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1"));
        }
        let timeout = Duration::try_from_secs_f64(config.timeout_secs)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                invalid(
                    "timeout_secs",
                    "must be a positive number of seconds a duration can hold",
                )
            })?;
        if config.max_response_bytes == 0 {
            return Err(invalid("max_response_bytes", "must be at least 1"));
        }
        let prompt = task
            .prompt()
            .ok_or_else(|| SetupError::NoPrompt(task.name().into()))?;
        // A prompt that repeats `{text}` could turn one text into a request
        // of gigabytes: refuse it before any item.
        let bytes = prompt_bytes(prompt, MAX_TEXT_BYTES);
        if bytes > config.max_request_bytes as u64 {
            return Err(SetupError::PromptTooLarge {
                task: task.name().into(),
                occurrences: prompt.user.matches("{text}").count(),
                text_bytes: MAX_TEXT_BYTES,
                bytes,
                limit: config.max_request_bytes,
            });
        }
        let limiter = |field, per_minute: Option<u32>| -> Result<_, SetupError> {
            per_minute
                .map(|n| {
                    NonZeroU32::new(n)
                        .map(|n| RateLimiter::direct(Quota::per_minute(n)))
                        .ok_or_else(|| invalid(field, "must be at least 1"))
                })
                .transpose()
        };
        let requests = limiter("requests_per_minute", config.requests_per_minute)?;
        let tokens = limiter("tokens_per_minute", config.tokens_per_minute)?;
        let cache =
            SharedCache::open(config.cache.as_deref()).map_err(|source| SetupError::Cache {
                path: config.cache.clone().unwrap_or_default(),
                source,
            })?;
        let mut fingerprint = Sha256::new();
        let parts = [
            prompt.system.clone().unwrap_or_default(),
            prompt.user.clone(),
            config.temperature.to_string(),
            format!("{:?}", config.seed),
            config.max_tokens.to_string(),
            format!("{:?}", config.logit_bias),
            config.logprobs.to_string(),
        ];
        for part in parts {
            fingerprint.update((part.len() as u64).to_le_bytes());
            fingerprint.update(part.as_bytes());
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(Self {
            api_key: std::env::var(&config.api_key_env).ok(),
            in_flight: Semaphore::new(config.concurrency),
            timeout,
            prompt_fingerprint: format!("{:x}", fingerprint.finalize()),
            config,
            task,
            http,
            requests,
            tokens,
            cache,
            usage: Mutex::new(Usage::default()),
        })
    }

    /// The request for one text, or why it is not sent: it would carry more
    /// than `max_request_bytes` (checked before it is built).
    fn body(&self, text: &str) -> Result<Value, ExpertError> {
        let prompt = self.task.prompt().expect("checked in new");
        let bytes = prompt_bytes(prompt, text.len());
        if bytes > self.config.max_request_bytes as u64 {
            return Err(ExpertError::RequestTooLarge {
                bytes,
                limit: self.config.max_request_bytes,
            });
        }
        let mut messages = Vec::new();
        if let Some(system) = &prompt.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt.user_message(text)}));
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        });
        if let Some(seed) = self.config.seed {
            body["seed"] = json!(seed);
        }
        if !self.config.logit_bias.is_empty() {
            body["logit_bias"] = json!(self.config.logit_bias);
        }
        if self.config.logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(10);
        }
        Ok(body)
    }

    /// The longest the client waits on the server between attempts.
    fn backoff_ceiling(&self) -> Duration {
        Duration::from_millis(self.config.backoff_max_ms)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.backoff_base_ms as f64 * 2f64.powi(attempt as i32 - 1);
        let capped = base.min(self.config.backoff_max_ms as f64);
        // Jitter in [0.5, 1) of the capped delay, so clients do not retry in step.
        let jitter = rand::rng().random_range(0.5..1.0);
        Duration::from_millis((capped * jitter) as u64)
    }

    /// One HTTP request; on success the raw answer and the label probabilities.
    async fn attempt(&self, body: &Value) -> Result<(String, Option<Vec<f32>>), Failure> {
        let fail = |error| Failure {
            error,
            retry_after: None,
        };
        let timeout = self.timeout;
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut request = self.http.post(url).timeout(timeout).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| fail(ExpertError::Connection(e.to_string())))?;
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                ExpertError::Timeout(timeout)
            } else {
                ExpertError::Connection(e.to_string())
            }
        };
        let mut response = request.send().await.map_err(|e| fail(transport(e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::now()));
        if !status.is_success() {
            // Only what the error reports is read; the rest is never fetched.
            let (head, _) = read_capped(&mut response, ERROR_BODY_BYTES)
                .await
                .map_err(|e| fail(transport(e)))?;
            return Err(Failure {
                error: ExpertError::Status {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&head)
                        .chars()
                        .take(ERROR_BODY_CHARS)
                        .collect(),
                },
                retry_after,
            });
        }
        let cap = self.config.max_response_bytes;
        let too_large = || {
            fail(ExpertError::Malformed(format!(
                "the response body is over max_response_bytes ({cap} bytes)"
            )))
        };
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err(too_large());
        }
        let (body, complete) = read_capped(&mut response, cap)
            .await
            .map_err(|e| fail(transport(e)))?;
        if !complete {
            return Err(too_large());
        }
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| fail(ExpertError::Malformed(format!("not JSON ({e})"))))?;
        let choice = &value["choices"][0];
        let raw = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                fail(ExpertError::Malformed(
                    "no choices[0].message.content".into(),
                ))
            })?
            .to_string();
        {
            let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            usage.prompt_tokens += value["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            usage.completion_tokens += value["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        }
        let probs = self.label_probabilities(&choice["logprobs"]);
        Ok((raw, probs))
    }

    /// A probability over labels from the first token's top log-probabilities:
    /// each label takes its best token that starts its label word (" Pos" for
    /// "positive"); labels with no such token share what is left.
    fn label_probabilities(&self, logprobs: &Value) -> Option<Vec<f32>> {
        let top = logprobs["content"][0]["top_logprobs"].as_array()?;
        let words = &self.task.prompt()?.label_words;
        let mut best = vec![f64::NEG_INFINITY; words.len()];
        for entry in top {
            let (Some(token), Some(logprob)) = (entry["token"].as_str(), entry["logprob"].as_f64())
            else {
                continue;
            };
            let token = token.trim().to_lowercase();
            if token.is_empty() {
                continue;
            }
            for (label, word) in words.iter().enumerate() {
                if word.to_lowercase().starts_with(&token) {
                    best[label] = best[label].max(logprob);
                }
            }
        }
        let found: f64 = best.iter().filter(|l| l.is_finite()).map(|l| l.exp()).sum();
        if found <= 0.0 {
            return None;
        }
        let missing = best.iter().filter(|l| !l.is_finite()).count();
        let rest = (1.0 - found).max(0.0);
        let total = found + rest;
        Some(
            best.iter()
                .map(|l| {
                    let p = if l.is_finite() {
                        l.exp()
                    } else {
                        rest / missing as f64
                    };
                    (p / total) as f32
                })
                .collect(),
        )
    }

    fn answer(
        &self,
        raw: String,
        probs: Option<Vec<f32>>,
        cached: bool,
    ) -> Result<Answer, ExpertError> {
        match self.task.parse_answer(&raw) {
            Some(label) => Ok(Answer {
                label,
                probs,
                raw,
                cached,
            }),
            None => Err(ExpertError::NoLabel { raw }),
        }
    }

    fn estimated_tokens(&self, body: &Value) -> u32 {
        let chars = body["messages"].to_string().chars().count() as u32;
        chars / 4 + self.config.max_tokens
    }
}

impl Expert for OpenAiExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        Box::pin(self.label_text(query.text))
    }

    fn usage(&self) -> Usage {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OpenAiExpert {
    async fn label_text(&self, text: &str) -> Result<Answer, ExpertError> {
        let key = ResponseCache::key(&self.config.model, &self.prompt_fingerprint, text);
        if let Some(hit) = self.cache.get(&key) {
            self.usage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cache_hits += 1;
            return self.answer(hit.raw, hit.probs, true);
        }
        let body = self.body(text)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(limiter) = &self.requests {
                limiter.until_ready().await;
            }
            if let Some(limiter) = &self.tokens {
                let n =
                    NonZeroU32::new(self.estimated_tokens(&body).max(1)).unwrap_or(NonZeroU32::MIN);
                // A request larger than the whole per-minute budget waits for a full bucket.
                if limiter.until_n_ready(n).await.is_err() {
                    limiter.until_ready().await;
                }
            }
            {
                let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
                usage.requests += 1;
                if attempt > 1 {
                    usage.retries += 1;
                }
            }
            match self.attempt(&body).await {
                Ok((raw, probs)) => {
                    let answer = CachedAnswer {
                        raw: raw.clone(),
                        probs: probs.clone(),
                    };
                    self.cache.insert(key, answer);
                    return self.answer(raw, probs, false);
                }
                Err(failure) if failure.error.is_transient() => {
                    if attempt >= self.config.max_attempts {
                        return Err(ExpertError::Exhausted {
                            attempts: attempt,
                            last: Box::new(failure.error),
                        });
                    }
                    // The server's word, within our ceiling: a Retry-After
                    // of days must not stall the caller.
                    let wait = failure
                        .retry_after
                        .unwrap_or_else(|| self.backoff(attempt))
                        .min(self.backoff_ceiling());
                    tokio::time::sleep(wait).await;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }
}

/// The bytes of prompt a request for a text of `text_bytes` carries: the
/// system message and the user message with `{text}` replaced, computed
/// without building it.
fn prompt_bytes(prompt: &crate::task::Prompt, text_bytes: usize) -> u64 {
    let occurrences = prompt.user.matches("{text}").count() as u64;
    let template = prompt.user.len() as u64 - occurrences * "{text}".len() as u64;
    let system = prompt.system.as_ref().map_or(0, |s| s.len() as u64);
    (system + template).saturating_add(occurrences.saturating_mul(text_bytes as u64))
}

/// Reads a body up to `cap` bytes, chunk by chunk, never more: the bytes read
/// and whether that was the whole body.
async fn read_capped(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date_and_never_a_panic() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let parse = |v: &str| parse_retry_after(v.as_bytes(), now);
        assert_eq!(parse("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        // Too large for a Duration: the longest wait (the caller caps it).
        assert_eq!(parse("1e20"), Some(Duration::MAX));
        assert_eq!(parse("99999999999999999999999"), Some(Duration::MAX));
        assert_eq!(parse("999999"), Some(Duration::from_secs(999_999)));
        assert_eq!(
            parse("1234567890123456789"),
            Some(Duration::from_secs(1_234_567_890_123_456_789))
        );
        // An HTTP-date: the time until then, or zero once past.
        let ahead = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse(&ahead), Some(Duration::from_secs(30)));
        assert_eq!(parse("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert!(parse("Fri, 31 Dec 9999 23:59:59 GMT").is_some());
        for nonsense in [
            "", "soon", "-1", "-0.5", "NaN", "inf", "+inf", "1e999", "1 2", "1s",
        ] {
            assert_eq!(parse(nonsense), None, "{nonsense:?}");
        }
        assert_eq!(parse_retry_after(b"\xff\xfe", now), None);
    }
}
