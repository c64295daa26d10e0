//! The ordered driver of a session over a stream: `run` and the replays.
//!
//! Items are routed in input order; a call to the expert starts as soon as
//! an item needs one. Before the item on line L is routed, every call for an
//! item on line L − N or earlier is settled, oldest first, so at most N calls
//! are in flight and what the cascade knows at each routing depends only on
//! config, seed, stream and N, never on which call returns first. With N = 1
//! each item's label is learned before the next item is routed (Algorithm 1).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cascade_expert::{Answer, AnswerFuture, Expert, ExpertError, Query};
use tokio::task::JoinHandle;

use crate::error::{Result, RuntimeError};
use crate::input::ItemId;
use crate::session::{Next, Session, Settled, Ticket};

/// An item once it is settled.
#[derive(Debug)]
pub struct Finished {
    pub line: usize,
    pub id: ItemId,
    pub settled: Settled,
    pub gate_outputs: Vec<Option<f32>>,
}

enum Entry {
    Ready(Finished),
    Waiting {
        line: usize,
        id: ItemId,
        gate_outputs: Vec<Option<f32>>,
        ticket: Ticket,
        call: Call,
    },
}

/// An expert call between routing and settling.
enum Call {
    /// Started at once: it runs while later items are routed.
    Spawned(JoinHandle<std::result::Result<Answer, ExpertError>>),
    /// With one call in flight nothing is routed before it is settled, so it
    /// runs then, on the settling thread: no hop to a worker and back per item.
    Inline(AnswerFuture<'static>),
}

pub struct Pipeline {
    session: Session,
    expert: Arc<dyn Expert>,
    runtime: tokio::runtime::Handle,
    max_in_flight: usize,
    ordered: bool,
    queue: VecDeque<Entry>,
    /// Raised by SIGINT/SIGTERM: waits on the expert end (after a grace).
    stop: Option<Arc<AtomicBool>>,
}

/// How long calls in flight may still finish once a stop is asked for; the
/// rest end as expert failures, so the run can checkpoint and exit.
const STOP_GRACE: Duration = Duration::from_secs(2);

impl Pipeline {
    /// `max_in_flight` ≥ 1; `ordered`: items leave in input order (else as settled).
    pub fn new(
        session: Session,
        expert: Arc<dyn Expert>,
        runtime: tokio::runtime::Handle,
        max_in_flight: usize,
        ordered: bool,
    ) -> Result<Self> {
        if max_in_flight == 0 {
            return Err(RuntimeError::setting("max_in_flight", "must be at least 1"));
        }
        Ok(Self {
            session,
            expert,
            runtime,
            max_in_flight,
            ordered,
            queue: VecDeque::new(),
            stop: None,
        })
    }

    /// Lets a raised `stop` end the waits on the expert: calls still out
    /// after a short grace fail (the failure policy answers their items), so
    /// a stopped run checkpoints at once instead of waiting on a slow remote.
    pub fn stop_on(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Routes the item on input line `line` (numbered from 1, increasing),
    /// or records why the line is not an item.
    pub fn push(
        &mut self,
        line: usize,
        id: ItemId,
        text: std::result::Result<&str, String>,
    ) -> Result<()> {
        self.settle_upto(line.saturating_sub(self.max_in_flight))?;
        let text = match text {
            Ok(text) => text,
            Err(reason) => {
                let settled = self.session.bad_input(reason);
                self.queue.push_back(Entry::Ready(Finished {
                    line,
                    id,
                    settled,
                    gate_outputs: Vec::new(),
                }));
                return Ok(());
            }
        };
        let routed = self.session.route(text)?;
        let entry = match routed.next {
            Next::Done(settled) => Entry::Ready(Finished {
                line,
                id,
                settled,
                gate_outputs: routed.gate_outputs,
            }),
            Next::Ask(ticket) => {
                let (expert, call_id, call_text) = (
                    Arc::clone(&self.expert),
                    id.to_value(),
                    ticket.text().to_string(),
                );
                let future: AnswerFuture<'static> = Box::pin(async move {
                    expert
                        .label(Query {
                            id: &call_id,
                            text: &call_text,
                        })
                        .await
                });
                let call = match self.max_in_flight {
                    1 => Call::Inline(future),
                    _ => Call::Spawned(self.runtime.spawn(future)),
                };
                Entry::Waiting {
                    line,
                    id,
                    gate_outputs: routed.gate_outputs,
                    ticket,
                    call,
                }
            }
        };
        self.queue.push_back(entry);
        Ok(())
    }

    /// Settles every call in flight (before a checkpoint, at the end).
    pub fn settle_all(&mut self) -> Result<()> {
        self.settle_upto(usize::MAX)
    }

    /// Items ready to leave: in input order, or (unordered) every settled one.
    pub fn take_ready(&mut self) -> Vec<Finished> {
        let mut ready = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut blocked = false;
        while let Some(entry) = self.queue.pop_front() {
            match entry {
                Entry::Ready(finished) if !blocked => ready.push(finished),
                entry => {
                    blocked |= self.ordered;
                    kept.push_back(entry);
                }
            }
        }
        self.queue = kept;
        ready
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn into_session(self) -> Session {
        self.session
    }

    /// Oldest first, every call for an item on line `upto` or before.
    fn settle_upto(&mut self, upto: usize) -> Result<()> {
        while let Some(index) = self
            .queue
            .iter()
            .position(|e| matches!(e, Entry::Waiting { line, .. } if *line <= upto))
        {
            let Some(Entry::Waiting {
                line,
                id,
                gate_outputs,
                ticket,
                call,
            }) = self.queue.remove(index)
            else {
                unreachable!("position found a waiting entry");
            };
            let answer = self.runtime.block_on(wait(call, self.stop.as_deref()));
            let settled = self.session.settle(ticket, answer)?;
            self.queue.insert(
                index,
                Entry::Ready(Finished {
                    line,
                    id,
                    settled,
                    gate_outputs,
                }),
            );
        }
        Ok(())
    }
}

/// The call's answer; once `stop` is raised, at most [`STOP_GRACE`] more.
async fn wait(call: Call, stop: Option<&AtomicBool>) -> std::result::Result<Answer, ExpertError> {
    let mut call = match call {
        Call::Inline(future) => {
            // No task to abort: dropping the future ends the call.
            let task = async move { Ok(future.await) };
            Box::pin(task) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }
        Call::Spawned(handle) => Box::pin(AbortOnDrop(handle)),
    };
    let joined = |result: std::result::Result<_, tokio::task::JoinError>| {
        result.unwrap_or_else(|e| Err(ExpertError::Failed(format!("expert task: {e}"))))
    };
    let Some(stop) = stop else {
        return joined(call.await);
    };
    let stopped = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        result = &mut call => return joined(result),
        _ = stopped => {}
    }
    match tokio::time::timeout(STOP_GRACE, &mut call).await {
        Ok(result) => joined(result),
        Err(_) => {
            drop(call);
            Err(ExpertError::Failed(
                "interrupted: the run was stopped while this call was out".into(),
            ))
        }
    }
}

/// A spawned call that is aborted when its waiter gives up on it.
struct AbortOnDrop(JoinHandle<std::result::Result<Answer, ExpertError>>);

impl std::future::Future for AbortOnDrop {
    type Output =
        std::result::Result<std::result::Result<Answer, ExpertError>, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
