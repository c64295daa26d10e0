//! One cluster worker: a session whose learning comes from the shared log.
//!
//! The loop, on one task: apply every label the log has delivered, settle
//! every expert call that has returned, route the next item while fewer than
//! `max_in_flight` calls are out. A settled item's result is stored (and its
//! label logged first, for a deferred item) on a task of its own; the item is
//! acked only after that, so a worker killed at any point loses nothing: its
//! unacked items come back to another worker, and the streams' message ids
//! drop what it had already stored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self, AckKind};
use cascade_expert::{Answer, Expert, ExpertError, Query, Task};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Cluster, ERROR_HEADER, LINE_HEADER};
use crate::error::{Result, RuntimeError};
use crate::input::{self, ItemId, RawLine};
use crate::session::{Counts, Demonstration, Next, Session, Settled, Ticket};

/// How often a working worker prints its counts.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// A worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Shown in each result's `worker` field; seeds this worker's coins.
    pub name: String,
    /// Expert calls out at once.
    pub max_in_flight: usize,
    /// Labels between learner snapshots (0: none but the last).
    pub snapshot_every: u64,
    /// Purge the labels that the kept snapshots already hold.
    pub purge_log: bool,
    /// How long an item may stay unacked before the server gives it to
    /// another worker; above the expert's timeout × retries.
    pub ack_wait: Duration,
    /// Where to write the learner's bytes on exit, after catching up with the log.
    pub save_learner: Option<PathBuf>,
    /// The learner's fingerprint (config and task).
    pub fingerprint: String,
}

/// What a worker did, when it stops.
#[derive(Debug)]
pub struct WorkerReport {
    pub counts: Counts,
    /// Labels learned from the log, and the sequence of the last one.
    pub labels_applied: u64,
    pub labels_skipped: u64,
    pub label_sequence: u64,
    /// The snapshot it started from, if any.
    pub restored_from: Option<u64>,
}

/// A label in the log: the demonstration, and for a reader the item's id
/// and the label's name.
#[derive(Serialize)]
struct LabelOut<'a> {
    id: &'a ItemId,
    answer: &'a str,
    #[serde(flatten)]
    demonstration: &'a Demonstration,
}

#[derive(Deserialize)]
struct LabelIn {
    #[serde(flatten)]
    demonstration: Demonstration,
}

/// An expert call that has returned.
struct Returned {
    ticket: Ticket,
    answer: std::result::Result<Answer, ExpertError>,
    id: ItemId,
    message: jetstream::Message,
}

/// Runs until `stop` is raised (then finishes the calls out, catches up
/// with the log, snapshots and returns) or a fatal error.
pub async fn run_worker(
    cluster: &Cluster,
    mut session: Session,
    expert: Arc<dyn Expert>,
    task: &Task,
    options: &WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<WorkerReport> {
    if options.max_in_flight == 0 {
        return Err(RuntimeError::setting(
            "--max-in-flight",
            "must be at least 1",
        ));
    }
    cluster.bind(&options.fingerprint).await?;
    session.learn_from_log();
    session.reseed(name_seed(&options.name));

    let mut learner = Learner {
        applied: 0,
        skipped: 0,
        sequence: 0,
        restored_from: None,
    };
    if let Some((sequence, bytes)) = cluster.latest_snapshot(&options.fingerprint).await? {
        session.cascade_mut().load_learner_state(&bytes)?;
        learner.sequence = sequence;
        learner.restored_from = Some(sequence);
    }
    let mut labels = follow_labels(cluster, learner.sequence).await?;
    // Catch up with the log before routing anything.
    let (last, started) = (cluster.last_label().await?, Instant::now());
    while learner.sequence < last {
        match labels.recv().await {
            Some(label) => learner.apply(&mut session, label)?,
            None => return Err(log_ended()),
        }
    }
    if learner.applied > 0 {
        eprintln!(
            "worker {}: caught up with the log: {} labels learned in {:.1} s{}",
            options.name,
            learner.applied,
            started.elapsed().as_secs_f64(),
            learner
                .restored_from
                .map(|s| format!(" after the snapshot at {s}"))
                .unwrap_or_default()
        );
    }

    let items = cluster
        .js
        .get_stream(cluster.names.items_stream())
        .await
        .map_err(RuntimeError::nats("the ITEMS stream"))?;
    let consumer: consumer::PullConsumer = items
        .get_or_create_consumer(
            cluster.names.consumer(),
            pull::Config {
                durable_name: Some(cluster.names.consumer().to_string()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: options.ack_wait,
                max_ack_pending: 1024,
                ..Default::default()
            },
        )
        .await
        .map_err(RuntimeError::nats("the workers' consumer"))?;
    let mut pulled = pull_items(&consumer, options.max_in_flight)
        .await
        .map_err(RuntimeError::nats("pulling items"))?;
    // After a reconnection the server may have lost the pull requests: pull afresh.
    let mut reconnects = cluster.reconnects.clone();
    reconnects.mark_unchanged();
    let mut repull = false;

    let levels = session.level_names().to_vec();
    let (returned_tx, mut returned_rx) = mpsc::unbounded_channel::<Returned>();
    let mut in_flight = 0usize;
    let mut storing = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_sync = Instant::now();
    let (mut last_report, mut reported) = (Instant::now(), 0);
    let mut last_snapshot = learner.sequence;
    let store = Store {
        js: cluster.js.clone(),
        labels: cluster.names.labels_subject(),
        results: cluster.names.results_subject(),
        worker: options.name.clone(),
    };

    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && in_flight == 0 {
            break;
        }
        tokio::select! {
            biased;
            label = labels.recv() => match label {
                Some(label) => learner.apply(&mut session, label)?,
                None => return Err(log_ended()),
            },
            returned = returned_rx.recv() => {
                let Some(Returned { ticket, answer, id, message }) = returned else {
                    unreachable!("the worker holds a sender");
                };
                in_flight -= 1;
                let (settled, demonstration) = session.settle_unlearned(ticket, answer)?;
                let record = result_record(&settled, &id, task, &levels, &options.name)?;
                let label = demonstration
                    .map(|d| label_record(&d, &id, task))
                    .transpose()?;
                storing.spawn(store.clone().store(id, label, record, message));
            }
            message = pulled.next(), if !stopping && in_flight < options.max_in_flight => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        // Missed heartbeats while the server restarts: the
                        // stream keeps pulling once it is back.
                        eprintln!("worker {}: pulling items: {error}", options.name);
                        continue;
                    }
                    None => return Err(RuntimeError::Nats {
                        what: "pulling items".into(),
                        reason: "the consumer's stream ended".into(),
                    }),
                };
                let (id, text) = read_item(&message);
                let text = match text {
                    Ok(text) => text,
                    Err(reason) => {
                        let settled = session.bad_input(reason);
                        let record = result_record(&settled, &id, task, &levels, &options.name)?;
                        storing.spawn(store.clone().store(id, None, record, message));
                        continue;
                    }
                };
                match session.route(&text)?.next {
                    Next::Done(settled) => {
                        let record = result_record(&settled, &id, task, &levels, &options.name)?;
                        storing.spawn(store.clone().store(id, None, record, message));
                    }
                    Next::Ask(ticket) => {
                        in_flight += 1;
                        let (expert, returned) = (Arc::clone(&expert), returned_tx.clone());
                        tokio::spawn(async move {
                            let query_id = id.to_value();
                            let answer = expert
                                .label(Query { id: &query_id, text: ticket.text() })
                                .await;
                            let _ = returned.send(Returned { ticket, answer, id, message });
                        });
                    }
                }
            }
            Ok(()) = reconnects.changed() => repull = true,
            _ = tick.tick() => {
                if repull {
                    match pull_items(&consumer, options.max_in_flight).await {
                        Ok(stream) => (pulled, repull) = (stream, false),
                        Err(e) => eprintln!("worker {}: pulling items: {e}", options.name),
                    }
                }
                while let Some(done) = storing.try_join_next() {
                    if let Err(e) = done {
                        eprintln!("worker {}: storing a result: {e}", options.name);
                    }
                }
                if last_report.elapsed() >= REPORT_EVERY && session.counts().lines > reported {
                    last_report = Instant::now();
                    reported = session.counts().lines;
                    eprintln!(
                        "worker {}: {}; log at label {}",
                        options.name,
                        session.counts().status_line(),
                        learner.sequence
                    );
                }
                if last_sync.elapsed() >= Duration::from_secs(1) {
                    last_sync = Instant::now();
                    sync_budget(&mut session, &consumer, learner.sequence).await;
                }
                if options.snapshot_every > 0
                    && learner.sequence >= last_snapshot + options.snapshot_every
                {
                    last_snapshot = learner.sequence;
                    snapshot(cluster, &session, &learner, options).await;
                }
            }
        }
    }

    // Stopping: the results stored, then the learner caught up with the log.
    while let Some(done) = storing.join_next().await {
        if let Err(e) = done {
            eprintln!("worker {}: storing a result: {e}", options.name);
        }
    }
    drop(pulled);
    let last = cluster.last_label().await?;
    while learner.sequence < last {
        match tokio::time::timeout(Duration::from_secs(30), labels.recv()).await {
            Ok(Some(label)) => learner.apply(&mut session, label)?,
            _ => return Err(log_ended()),
        }
    }
    snapshot(cluster, &session, &learner, options).await;
    if let Some(path) = &options.save_learner {
        let bytes = session.cascade().save_learner_state()?;
        std::fs::write(path, bytes).map_err(RuntimeError::io(path))?;
    }
    Ok(WorkerReport {
        counts: session.counts().clone(),
        labels_applied: learner.applied,
        labels_skipped: learner.skipped,
        label_sequence: learner.sequence,
        restored_from: learner.restored_from,
    })
}

async fn pull_items(
    consumer: &consumer::PullConsumer,
    batch: usize,
) -> std::result::Result<pull::Stream, async_nats::Error> {
    Ok(consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(10))
        .messages()
        .await?)
}

/// The replica's place in the log.
struct Learner {
    applied: u64,
    /// Labels that did not decode or fit (reported, the first few by number).
    skipped: u64,
    sequence: u64,
    restored_from: Option<u64>,
}

/// A label as the log delivered it: its sequence and payload.
struct Logged {
    sequence: u64,
    payload: bytes::Bytes,
}

impl Learner {
    /// Learns the next label of the log. A label that does not decode or fit
    /// is skipped by every replica alike, so they stay identical.
    fn apply(&mut self, session: &mut Session, label: Logged) -> Result<()> {
        if label.sequence != self.sequence + 1 {
            return Err(RuntimeError::Nats {
                what: "the LABELS log".into(),
                reason: format!(
                    "label {} follows label {}: the log was purged past this worker's snapshot",
                    label.sequence, self.sequence
                ),
            });
        }
        self.sequence = label.sequence;
        let learned = serde_json::from_slice::<LabelIn>(&label.payload)
            .map_err(|e| e.to_string())
            .and_then(|l| session.learn(l.demonstration).map_err(|e| e.to_string()));
        match learned {
            Ok(()) => self.applied += 1,
            Err(reason) => {
                self.skipped += 1;
                if self.skipped <= 10 {
                    eprintln!("label {} skipped: {reason}", label.sequence);
                }
            }
        }
        Ok(())
    }
}

/// The log from `after + 1` on, in order, as a channel fed by an ordered
/// consumer. The consumer lives in the server's memory: when it is lost (a
/// server restart) or errs, a new one starts after the last label sent, at
/// once, rather than after the client's own heartbeat-based recovery.
async fn follow_labels(cluster: &Cluster, after: u64) -> Result<mpsc::Receiver<Logged>> {
    let stream = cluster.labels().await?;
    let mut messages = ordered_from(&stream, after + 1)
        .await
        .map_err(RuntimeError::nats("following the LABELS log"))?;
    let mut reconnects = cluster.reconnects.clone();
    reconnects.mark_unchanged();
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        let mut next = after + 1;
        loop {
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = reconnects.changed() => break,
                };
                let Some(Ok(message)) =
                    message.map(|m| m.inspect_err(|e| eprintln!("following the LABELS log: {e}")))
                else {
                    break;
                };
                let Ok(info) = message.info() else { continue };
                next = info.stream_sequence + 1;
                let logged = Logged {
                    sequence: info.stream_sequence,
                    payload: message.payload.clone(),
                };
                if tx.send(logged).await.is_err() {
                    return; // the worker has stopped
                }
            }
            messages = loop {
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Ok(messages) = ordered_from(&stream, next).await {
                    break messages;
                }
            };
        }
    });
    Ok(rx)
}

async fn ordered_from(
    stream: &jetstream::stream::Stream,
    start_sequence: u64,
) -> std::result::Result<pull::Ordered, async_nats::Error> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

fn log_ended() -> RuntimeError {
    RuntimeError::Nats {
        what: "the LABELS log".into(),
        reason: "stopped delivering before this worker caught up".into(),
    }
}

/// An item's id and text, or why it is not an item.
fn read_item(message: &jetstream::Message) -> (ItemId, std::result::Result<String, String>) {
    let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name));
    let line = header(LINE_HEADER)
        .and_then(|v| v.as_str().parse::<usize>().ok())
        .unwrap_or(0);
    if let Some(reason) = header(ERROR_HEADER) {
        return (ItemId::line(line), Err(reason.as_str().to_string()));
    }
    // The same reasons for a bad line as `run` gives.
    match input::read_item(line, RawLine::Bytes(message.payload.to_vec()), usize::MAX) {
        Ok(item) => (item.id, Ok(item.text)),
        Err(reason) => (ItemId::line(line), Err(reason)),
    }
}

fn result_record(
    settled: &Settled,
    id: &ItemId,
    task: &Task,
    levels: &[String],
    worker: &str,
) -> Result<Vec<u8>> {
    let mut record = settled.record(None, id, task, levels);
    record.fields["worker"] = worker.into();
    serde_json::to_vec(&record).map_err(|e| RuntimeError::Input(e.to_string()))
}

fn label_record(demonstration: &Demonstration, id: &ItemId, task: &Task) -> Result<Vec<u8>> {
    let label = task
        .labels()
        .get(demonstration.label)
        .map_or("", String::as_str);
    serde_json::to_vec(&LabelOut {
        id,
        answer: label,
        demonstration,
    })
    .map_err(|e| RuntimeError::Input(e.to_string()))
}

/// Where a settled item goes: its label to the log, its result, then the ack.
#[derive(Clone)]
struct Store {
    js: jetstream::Context,
    labels: String,
    results: String,
    worker: String,
}

impl Store {
    /// Stores, then acks. When the server refuses, the item is handed back
    /// (nak) and comes again; the message ids drop whatever was stored twice.
    async fn store(
        self,
        id: ItemId,
        label: Option<Vec<u8>>,
        result: Vec<u8>,
        message: jetstream::Message,
    ) {
        let stored = async {
            if let Some(label) = label {
                self.publish(&self.labels, id.as_json(), label).await?;
            }
            self.publish(&self.results, id.as_json(), result).await
        };
        match stored.await {
            Ok(()) => {
                if let Err(e) = message.double_ack().await {
                    eprintln!("worker {}: acking item {}: {e}", self.worker, id.as_json());
                }
            }
            Err(e) => {
                eprintln!(
                    "worker {}: item {} handed back: {e}",
                    self.worker,
                    id.as_json()
                );
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn publish(
        &self,
        subject: &str,
        id: &str,
        payload: Vec<u8>,
    ) -> std::result::Result<(), async_nats::Error> {
        let publish = Publish::build().payload(payload.into()).message_id(id);
        self.js
            .send_publish(subject.to_string(), publish)
            .await?
            .await?;
        Ok(())
    }
}

/// Prices against the cluster's counts: items handed to workers so far and
/// labels in the log (each an LLM call).
async fn sync_budget(session: &mut Session, consumer: &consumer::PullConsumer, labels: u64) {
    if session.cascade().budget().is_none() {
        return;
    }
    let mut consumer = consumer.clone();
    if let Ok(info) = consumer.info().await {
        let seen = info.delivered.stream_sequence;
        session.cascade_mut().sync_budget(seen, labels);
    }
}

/// Saves the learner at the sequence it has applied, unless a snapshot as
/// recent exists. A failure is reported and the worker goes on.
async fn snapshot(
    cluster: &Cluster,
    session: &Session,
    learner: &Learner,
    options: &WorkerOptions,
) {
    if learner.sequence == 0 {
        return;
    }
    let saved = match session.cascade().save_learner_state() {
        Ok(bytes) => {
            cluster
                .save_snapshot(
                    learner.sequence,
                    &bytes,
                    &options.fingerprint,
                    options.purge_log,
                )
                .await
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = saved {
        eprintln!(
            "worker {}: snapshot at label {}: {e}",
            options.name, learner.sequence
        );
    }
}

/// This worker's coins: a hash of its name (FNV-1a).
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
