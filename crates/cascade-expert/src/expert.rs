//! The `Expert` trait: something that labels texts for a task, usually an LLM.
//!
//! One trait for every expert (recorded answers, an OpenAI-compatible API, a
//! local model, a user's function): object-safe, so the runtime holds an
//! `Arc<dyn Expert>` whatever answers, and typed errors, so the failure policy
//! can tell an outage from an answer without a label.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

/// An expert's answer for one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub label: usize,
    /// A probability per label, when the expert exposes them (logprobs).
    pub probs: Option<Vec<f32>>,
    /// The expert's raw output.
    pub raw: String,
    /// Served from the response cache: no call was paid for.
    pub cached: bool,
}

impl Answer {
    /// An answer that is just a label (recorded answers, a user's function).
    pub fn label(label: usize) -> Self {
        Self {
            label,
            probs: None,
            raw: String::new(),
            cached: false,
        }
    }
}

/// Why an item has no label. Every item ends with an `Answer` or one of these.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum ExpertError {
    #[error("the answer holds no label: {raw:?}")]
    NoLabel { raw: String },
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The request for this text would be over `max_request_bytes`; not sent.
    #[error("the request would carry {bytes} bytes of prompt, over max_request_bytes ({limit})")]
    RequestTooLarge { bytes: u64, limit: usize },
    #[error("gave up after {attempts} attempts; last error: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<ExpertError>,
    },
    /// The recorded answers hold no item with this id.
    #[error("id {0} is not an item id of the recorded answers")]
    UnknownItem(String),
    /// The expert itself failed (a model error, a crashed worker).
    #[error("the expert failed: {0}")]
    Failed(String),
}

impl ExpertError {
    /// 429, 5xx, timeouts and connection errors may succeed on a retry; other
    /// 4xx and unparsable answers will not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Timeout(_) | Self::Connection(_) => true,
            Self::NoLabel { .. }
            | Self::Malformed(_)
            | Self::RequestTooLarge { .. }
            | Self::Exhausted { .. }
            | Self::UnknownItem(_)
            | Self::Failed(_) => false,
        }
    }
}

/// What an expert has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Requests sent, retries included.
    pub requests: u64,
    /// Items answered from the response cache.
    pub cache_hits: u64,
    pub retries: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One item for an expert: its id as the input gave it (`Value::Null` when
/// none; recorded answers are looked up by it) and its text.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: &'a Value,
    pub text: &'a str,
}

impl<'a> Query<'a> {
    /// A text without an id (live experts ignore ids).
    pub fn text(text: &'a str) -> Self {
        Self {
            id: &Value::Null,
            text,
        }
    }
}

/// The future an expert returns for one item.
pub type AnswerFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer, ExpertError>> + Send + 'a>>;

/// Labels items for one task. CPU-bound experts do their work off the async
/// threads (`spawn_blocking`) inside `label`.
pub trait Expert: Send + Sync {
    /// Labels one item.
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a>;

    /// What the expert has cost so far.
    fn usage(&self) -> Usage;
}

/// Labels texts concurrently (each expert bounds its own concurrency); the
/// answers are in the texts' order, one per text.
pub async fn label_all(expert: &dyn Expert, texts: &[String]) -> Vec<Result<Answer, ExpertError>> {
    futures::future::join_all(texts.iter().map(|t| expert.label(Query::text(t)))).await
}
