//! The `Expert` trait: something that labels texts for a task, usually an LLM.

use std::time::Duration;

use serde::Serialize;
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
    #[error("gave up after {attempts} attempts; last error: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<ExpertError>,
    },
}

impl ExpertError {
    /// 429, 5xx, timeouts and connection errors may succeed on a retry; other
    /// 4xx and unparsable answers will not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Timeout(_) | Self::Connection(_) => true,
            Self::NoLabel { .. } | Self::Malformed(_) | Self::Exhausted { .. } => false,
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

/// Labels texts for one task.
#[allow(async_fn_in_trait)]
pub trait Expert {
    /// Labels one text.
    async fn label(&self, text: &str) -> Result<Answer, ExpertError>;

    /// Labels a batch; the answers are in the texts' order, one per text.
    /// The default runs the items concurrently; implementations bound it.
    async fn label_batch(&self, texts: &[String]) -> Vec<Result<Answer, ExpertError>> {
        futures::future::join_all(texts.iter().map(|t| self.label(t))).await
    }

    fn usage(&self) -> Usage;
}
