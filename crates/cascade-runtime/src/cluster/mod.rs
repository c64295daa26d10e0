//! A cluster of workers on NATS JetStream that learn as one cascade.
//!
//! The server holds everything shared; a worker holds only a replica:
//! - **ITEMS** (work-queue retention): the stream's items. One durable pull
//!   consumer is shared by every worker; an item is acked only once its
//!   result is stored, so a dead worker's items are delivered again.
//! - **LABELS**: the log of demonstrations. Every expert answer for a deferred
//!   item is published once (message id = item id). Every worker learns from
//!   this log, in its order, its own labels included and never straight from
//!   its own expert call: the learner is a pure function of the log, and two
//!   replicas that applied labels 1..S hold the same bytes.
//! - **RESULTS**: one record per item (the record of `cascade run`),
//!   de-duplicated by item id.
//! - a key-value bucket (the cluster's fingerprint, the latest snapshot's
//!   pointer) and an object store (learner snapshots at label sequence S, so a
//!   new or restarted worker loads one and replays the log from S + 1).

mod io;
mod worker;

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

pub use io::{collect, publish, CollectOptions, Collected, Published};
pub use worker::{run_worker, WorkerOptions, WorkerReport};

/// Redelivered items and re-asked labels are dropped as duplicates when they
/// come back within this window: far above an item's redelivery delay
/// (`ack_wait`). The server keeps the ids of the window in memory.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// The header that carries an item's input line number (its id when it has none).
pub const LINE_HEADER: &str = "Cascade-Line";

/// The header that says why a published line is not an item (it was too long to send).
pub const ERROR_HEADER: &str = "Cascade-Error";

/// The names of one cluster's streams, subjects, consumer and buckets.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `prefix` (letters, digits, `-`, `_`) names one cluster on a server.
    pub fn new(prefix: &str) -> Result<Self> {
        let valid = !prefix.is_empty()
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(RuntimeError::setting(
                "--cluster",
                format!("must be letters, digits, `-` or `_`, got {prefix:?}"),
            ));
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    fn stream(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix.to_uppercase())
    }

    pub fn items_stream(&self) -> String {
        self.stream("ITEMS")
    }

    pub fn labels_stream(&self) -> String {
        self.stream("LABELS")
    }

    pub fn results_stream(&self) -> String {
        self.stream("RESULTS")
    }

    pub fn items_subject(&self) -> String {
        format!("{}.items", self.prefix)
    }

    pub fn labels_subject(&self) -> String {
        format!("{}.labels", self.prefix)
    }

    pub fn results_subject(&self) -> String {
        format!("{}.results", self.prefix)
    }

    fn consumer(&self) -> &'static str {
        "workers"
    }

    fn bucket(&self) -> String {
        format!("{}_state", self.prefix)
    }

    fn snapshots(&self) -> String {
        format!("{}_snapshots", self.prefix)
    }
}

/// A connection to a cluster's streams and buckets on a NATS server.
pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    /// Counts the client's reconnections: consumers kept in the server's
    /// memory (ordered ones) are gone after a restart and must be made again.
    pub reconnects: tokio::sync::watch::Receiver<u64>,
}

/// How long connecting waits for a NATS server that refuses connections.
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
/// Between two connection attempts.
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

impl Cluster {
    /// Connects (waiting up to [`CONNECT_PATIENCE`] for a server that refuses
    /// connections, as one being restarted does) and creates whatever of the
    /// cluster does not exist yet.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let names = Names::new(prefix)?;
        let (connected, reconnects) = tokio::sync::watch::channel(0u64);
        let options = || {
            let connected = connected.clone();
            async_nats::ConnectOptions::new()
                .name("cascade")
                .event_callback(move |event| {
                    let connected = connected.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => connected.send_modify(|n| *n += 1),
                            async_nats::Event::Disconnected => {
                                eprintln!("the NATS server is gone; reconnecting")
                            }
                            _ => {}
                        }
                    }
                })
        };
        // A server being restarted refuses connections for a moment: wait
        // for it (a worker started then would otherwise exit), not forever.
        let started = std::time::Instant::now();
        let client = loop {
            match options().connect(url).await {
                Ok(client) => break client,
                Err(e)
                    if e.kind() == async_nats::ConnectErrorKind::Io
                        && started.elapsed() < CONNECT_PATIENCE =>
                {
                    if started.elapsed() < CONNECT_RETRY {
                        eprintln!(
                            "no NATS server at {url} yet ({e}); retrying for up to {} s",
                            CONNECT_PATIENCE.as_secs()
                        );
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(e) => {
                    return Err(RuntimeError::nats(format!("connecting to {url}"))(e));
                }
            }
        };
        let js = jetstream::new(client.clone());
        let cluster = Self {
            client,
            js,
            names,
            reconnects,
        };
        cluster.create_streams().await?;
        Ok(cluster)
    }

    async fn create_streams(&self) -> Result<()> {
        let names = &self.names;
        let streams = [
            (
                names.items_stream(),
                names.items_subject(),
                stream::RetentionPolicy::WorkQueue,
            ),
            (
                names.labels_stream(),
                names.labels_subject(),
                stream::RetentionPolicy::Limits,
            ),
            (
                names.results_stream(),
                names.results_subject(),
                stream::RetentionPolicy::Limits,
            ),
        ];
        for (name, subject, retention) in streams {
            self.js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject],
                    retention,
                    storage: stream::StorageType::File,
                    duplicate_window: DUPLICATE_WINDOW,
                    allow_direct: true,
                    ..Default::default()
                })
                .await
                .map_err(RuntimeError::nats(format!("stream {name}")))?;
        }
        self.js
            .create_or_update_key_value(kv::Config {
                bucket: names.bucket(),
                history: 1,
                ..Default::default()
            })
            .await
            .map_err(RuntimeError::nats(format!("bucket {}", names.bucket())))?;
        if self.js.get_object_store(names.snapshots()).await.is_err() {
            self.js
                .create_object_store(object_store::Config {
                    bucket: names.snapshots(),
                    ..Default::default()
                })
                .await
                .map_err(RuntimeError::nats(format!(
                    "object store {}",
                    names.snapshots()
                )))?;
        }
        Ok(())
    }

    async fn state(&self) -> Result<kv::Store> {
        self.js
            .get_key_value(self.names.bucket())
            .await
            .map_err(RuntimeError::nats(format!(
                "bucket {}",
                self.names.bucket()
            )))
    }

    async fn snapshot_store(&self) -> Result<object_store::ObjectStore> {
        self.js
            .get_object_store(self.names.snapshots())
            .await
            .map_err(RuntimeError::nats(format!(
                "object store {}",
                self.names.snapshots()
            )))
    }

    /// Binds this cluster to one config and task: the first worker records
    /// its learner fingerprint; a worker with another is refused.
    pub async fn bind(&self, fingerprint: &str) -> Result<()> {
        let state = self.state().await?;
        let key = "fingerprint";
        if state
            .create(key, fingerprint.to_string().into())
            .await
            .is_ok()
        {
            return Ok(());
        }
        let stored = state
            .get(key)
            .await
            .map_err(RuntimeError::nats("reading the cluster's fingerprint"))?;
        match stored {
            Some(stored) if stored.as_ref() == fingerprint.as_bytes() => Ok(()),
            _ => Err(RuntimeError::setting(
                "--config",
                format!(
                    "does not match cluster `{}`: its workers run another config or task (every worker needs the same; a new --cluster name starts a new cluster)",
                    self.names.prefix
                ),
            )),
        }
    }

    /// The latest learner snapshot: its label sequence and bytes.
    pub async fn latest_snapshot(&self, fingerprint: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(entry) = self
            .state()
            .await?
            .entry(SNAPSHOT_KEY)
            .await
            .map_err(RuntimeError::nats("reading the snapshot pointer"))?
        else {
            return Ok(None);
        };
        let pointer: SnapshotPointer = serde_json::from_slice(&entry.value).map_err(|e| {
            RuntimeError::setting("the snapshot pointer", format!("is unreadable: {e}"))
        })?;
        if pointer.fingerprint != fingerprint {
            return Err(RuntimeError::setting(
                "the snapshot pointer",
                "names a snapshot of another config",
            ));
        }
        let mut object = self
            .snapshot_store()
            .await?
            .get(&pointer.object)
            .await
            .map_err(RuntimeError::nats(format!("snapshot {}", pointer.object)))?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(RuntimeError::nats(format!(
                "reading snapshot {}",
                pointer.object
            )))?;
        Ok(Some((pointer.sequence, bytes)))
    }

    /// Stores a snapshot of the learner at label sequence `sequence` and
    /// points to it, unless a snapshot as recent exists. Any worker may call
    /// this: replicas at the same sequence hold the same bytes, so a race
    /// between two writes the same object. The snapshot two before is
    /// removed; with `purge_log`, so are the labels the kept ones hold.
    pub async fn save_snapshot(
        &self,
        sequence: u64,
        bytes: &[u8],
        fingerprint: &str,
        purge_log: bool,
    ) -> Result<bool> {
        let state = self.state().await?;
        let entry = state
            .entry(SNAPSHOT_KEY)
            .await
            .map_err(RuntimeError::nats("reading the snapshot pointer"))?;
        let previous: Option<SnapshotPointer> = entry
            .as_ref()
            .and_then(|e| serde_json::from_slice(&e.value).ok());
        if previous.as_ref().is_some_and(|p| p.sequence >= sequence) {
            return Ok(false);
        }
        let object = format!("learner-{sequence:020}");
        let store = self.snapshot_store().await?;
        store
            .put(object.as_str(), &mut &bytes[..])
            .await
            .map_err(RuntimeError::nats(format!("writing snapshot {object}")))?;
        let pointer = SnapshotPointer {
            sequence,
            object,
            fingerprint: fingerprint.to_string(),
            previous: previous.as_ref().map(|p| p.object.clone()),
        };
        let value = serde_json::to_vec(&pointer)
            .map_err(|e| RuntimeError::setting("the snapshot pointer", e.to_string()))?;
        let written = match &entry {
            Some(entry) => state
                .update(SNAPSHOT_KEY, value.into(), entry.revision)
                .await
                .is_ok(),
            None => state.create(SNAPSHOT_KEY, value.into()).await.is_ok(),
        };
        // Keep the one before (a worker may be reading it now); drop older.
        if let Some(previous) = previous.filter(|_| written) {
            if let Some(older) = &previous.previous {
                let _ = store.delete(older).await;
            }
            if purge_log {
                // Every kept snapshot holds the labels up to its sequence.
                self.labels()
                    .await?
                    .purge()
                    .sequence(previous.sequence + 1)
                    .await
                    .map_err(RuntimeError::nats("purging the LABELS log"))?;
            }
        }
        Ok(written)
    }

    /// The LABELS stream (the log).
    pub(crate) async fn labels(&self) -> Result<async_nats::jetstream::stream::Stream> {
        self.js
            .get_stream(self.names.labels_stream())
            .await
            .map_err(RuntimeError::nats("the LABELS stream"))
    }

    /// The sequence of the last label in the log.
    pub async fn last_label(&self) -> Result<u64> {
        let mut labels = self.labels().await?;
        let info = labels
            .info()
            .await
            .map_err(RuntimeError::nats("the LABELS stream"))?;
        Ok(info.state.last_sequence)
    }
}

const SNAPSHOT_KEY: &str = "learner";

/// What the key-value bucket's `learner` key holds.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPointer {
    sequence: u64,
    object: String,
    fingerprint: String,
    #[serde(default)]
    previous: Option<String>,
}
