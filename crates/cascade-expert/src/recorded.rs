//! The recorded expert: plays back the answers an LLM gave, by item id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::dataset::Dataset;
use crate::expert::{Answer, AnswerFuture, Expert, ExpertError, Query, Usage};

/// Answers from a dataset's recorded answer column. An item whose recorded
/// answer held no label fails with [`ExpertError::NoLabel`], as a live LLM's would.
#[derive(Debug)]
pub struct RecordedExpert {
    labels: HashMap<u64, Option<usize>>,
    /// Per-call delay, to play a slow LLM in load and crash tests.
    delay: Duration,
    requests: AtomicU64,
}

impl RecordedExpert {
    /// Every item of the dataset, with the column it was loaded with.
    pub fn new(dataset: &Dataset, delay: Duration) -> Self {
        Self {
            labels: dataset.items().iter().map(|i| (i.id, i.expert)).collect(),
            delay,
            requests: AtomicU64::new(0),
        }
    }

    /// The recorded label of an item, without a call: `None` when the id is
    /// unknown, `Some(None)` when the recorded answer held no label.
    pub fn recorded(&self, id: u64) -> Option<Option<usize>> {
        self.labels.get(&id).copied()
    }

    fn lookup(&self, id: &Value) -> Result<Answer, ExpertError> {
        let key = id
            .as_u64()
            .or_else(|| id.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| ExpertError::UnknownItem(id.to_string()))?;
        match self.labels.get(&key) {
            Some(Some(label)) => Ok(Answer::label(*label)),
            Some(None) => Err(ExpertError::NoLabel {
                raw: "(recorded answer without a label)".into(),
            }),
            None => Err(ExpertError::UnknownItem(key.to_string())),
        }
    }
}

impl Expert for RecordedExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.lookup(query.id)
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            requests: self.requests.load(Ordering::Relaxed),
            ..Usage::default()
        }
    }
}
