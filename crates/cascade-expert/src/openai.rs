//! An OpenAI-compatible chat-completions expert (OpenAI, vLLM, llama.cpp
//! server, Ollama, TGI) that survives real APIs: bounded retries with
//! exponential backoff and jitter on 429/5xx/connection errors, `Retry-After`,
//! a per-request timeout, bounded concurrency, a client-side rate limit and a
//! persistent response cache.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

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
        if !(config.timeout_secs.is_finite() && config.timeout_secs > 0.0) {
            return Err(invalid(
                "timeout_secs",
                "must be a positive number of seconds",
            ));
        }
        let prompt = task
            .prompt()
            .ok_or_else(|| SetupError::NoPrompt(task.name().into()))?;
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

    fn body(&self, text: &str) -> Value {
        let prompt = self.task.prompt().expect("checked in new");
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
        body
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
        let timeout = Duration::from_secs_f64(self.config.timeout_secs);
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
        let response = request.send().await.map_err(|e| fail(transport(e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = response.text().await.map_err(|e| fail(transport(e)))?;
        if !status.is_success() {
            return Err(Failure {
                error: ExpertError::Status {
                    status: status.as_u16(),
                    body: text.chars().take(200).collect(),
                },
                retry_after,
            });
        }
        let value: Value = serde_json::from_str(&text)
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
        let body = self.body(text);
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
                    let wait = failure.retry_after.unwrap_or_else(|| self.backoff(attempt));
                    tokio::time::sleep(wait).await;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }
}
