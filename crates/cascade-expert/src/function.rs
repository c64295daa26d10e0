//! An expert that is a function of the item: a user's own LLM call (the
//! Python package's `expert=callable`), a rule, a test double.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::expert::{Answer, AnswerFuture, Expert, ExpertError, Query, Usage};

type LabelFn = dyn Fn(Query<'_>) -> Result<Answer, ExpertError> + Send + Sync;

/// Labels each item by calling a function: by default on a blocking thread,
/// so the function may block (a network call, a model) or take a lock
/// (Python's GIL) without stalling the async threads; or in place, where
/// the caller polls one call at a time itself (a pipeline with one call in
/// flight), which saves a thread hop per call.
#[derive(Clone)]
pub struct FnExpert {
    function: Arc<LabelFn>,
    calls: Arc<AtomicU64>,
    in_place: bool,
}

impl FnExpert {
    pub fn new(
        function: impl Fn(Query<'_>) -> Result<Answer, ExpertError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            function: Arc::new(function),
            calls: Arc::new(AtomicU64::new(0)),
            in_place: false,
        }
    }

    /// Calls the function in the future's own poll instead of on a blocking
    /// thread: only for callers that poll it outside the async workers.
    pub fn in_place(mut self, in_place: bool) -> Self {
        self.in_place = in_place;
        self
    }
}

impl Expert for FnExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        let function = Arc::clone(&self.function);
        let (id, text) = (query.id.clone(), query.text.to_string());
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.in_place {
            return Box::pin(async move {
                function(Query {
                    id: &id,
                    text: &text,
                })
            });
        }
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                function(Query {
                    id: &id,
                    text: &text,
                })
            })
            .await
            .map_err(|e| ExpertError::Failed(format!("the expert function's thread: {e}")))?
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            requests: self.calls.load(Ordering::Relaxed),
            ..Usage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_the_function_and_counts_calls() {
        let expert = FnExpert::new(|query| match query.text {
            "good" => Ok(Answer::label(1)),
            _ => Err(ExpertError::Failed("no".into())),
        });
        assert_eq!(expert.label(Query::text("good")).await.unwrap().label, 1);
        assert!(expert.label(Query::text("bad")).await.is_err());
        assert_eq!(expert.usage().requests, 2);
        let expert = expert.in_place(true);
        assert_eq!(expert.label(Query::text("good")).await.unwrap().label, 1);
    }
}
