//! Items into a cluster (`cascade publish`) and results out (`cascade collect`).

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;
use futures::StreamExt;

use super::{Cluster, ERROR_HEADER, LINE_HEADER};
use crate::error::{Result, RuntimeError};
use crate::input::{self, LineReader, RawLine};

/// Acks awaited at once while publishing: the server's round trips overlap.
const PUBLISHES_IN_FLIGHT: usize = 256;

/// What `publish` sent.
#[derive(Debug, Default)]
pub struct Published {
    pub lines: u64,
    /// Lines the server dropped as already published (same item id).
    pub duplicates: u64,
}

/// Publishes each line of `reader` as an item, with its line number in a
/// header. Lines are sent as written: a worker parses them (and gives a bad
/// line its `bad_input` record, as `run` does). An item with an id is sent
/// with that id as its message id, so publishing a file again within the
/// duplicate window adds nothing.
pub async fn publish<R: BufRead>(
    cluster: &Cluster,
    reader: R,
    max_line_bytes: usize,
    mut progress: impl FnMut(u64),
) -> Result<Published> {
    let subject = cluster.names.items_subject();
    let mut lines = LineReader::new(reader, max_line_bytes);
    let mut acks: VecDeque<PublishAckFuture> = VecDeque::new();
    let mut published = Published::default();
    let mut line = 0usize;
    while let Some(raw) = lines
        .next_line()
        .map_err(|e| RuntimeError::Input(e.to_string()))?
    {
        line += 1;
        let mut message = Publish::build().header(LINE_HEADER, line.to_string());
        let bytes = match raw {
            RawLine::Bytes(bytes) => {
                let id = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|raw| input::parse_line(line, raw).ok())
                    .map(|item| item.id)
                    .filter(|id| id.as_json() != line.to_string());
                if let Some(id) = id {
                    message = message.message_id(id.as_json());
                }
                bytes
            }
            // Not sent; the worker records it as bad input, by its line number.
            too_long => {
                let reason = input::read_item(line, too_long, max_line_bytes)
                    .err()
                    .unwrap_or_default();
                message = message.header(ERROR_HEADER, reason);
                Vec::new()
            }
        };
        let ack = cluster
            .js
            .send_publish(subject.clone(), message.payload(bytes.into()))
            .await
            .map_err(RuntimeError::nats(format!("publishing line {line}")))?;
        acks.push_back(ack);
        if acks.len() >= PUBLISHES_IN_FLIGHT {
            settle_ack(&mut acks, &mut published).await?;
        }
        published.lines += 1;
        progress(published.lines);
    }
    while !acks.is_empty() {
        settle_ack(&mut acks, &mut published).await?;
    }
    Ok(published)
}

async fn settle_ack(
    acks: &mut VecDeque<PublishAckFuture>,
    published: &mut Published,
) -> Result<()> {
    if let Some(ack) = acks.pop_front() {
        let ack = ack
            .await
            .map_err(RuntimeError::nats("the server's ack of an item"))?;
        published.duplicates += u64::from(ack.duplicate);
    }
    Ok(())
}

/// When `collect` stops.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Stop after this many results.
    pub expect: Option<u64>,
    /// Stop once no result has come for this long (after the stored ones).
    pub idle: Duration,
}

#[derive(Debug, Default)]
pub struct Collected {
    pub results: u64,
}

/// Writes every result in the RESULTS stream, one JSON line each, from the
/// first; stops at `expect` results or after `idle` without one.
pub async fn collect<W: Write>(
    cluster: &Cluster,
    mut out: W,
    options: &CollectOptions,
    mut progress: impl FnMut(u64),
) -> Result<Collected> {
    let stream = cluster
        .js
        .get_stream(cluster.names.results_stream())
        .await
        .map_err(RuntimeError::nats("the RESULTS stream"))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(RuntimeError::nats("reading RESULTS"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(RuntimeError::nats("reading RESULTS"))?;
    let mut collected = Collected::default();
    while options.expect.is_none_or(|n| collected.results < n) {
        let message = match tokio::time::timeout(options.idle, messages.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => {
                eprintln!("reading RESULTS: {e}");
                continue;
            }
            Ok(Some(Ok(message))) => message,
        };
        out.write_all(&message.payload)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(RuntimeError::Output)?;
        collected.results += 1;
        progress(collected.results);
    }
    out.flush().map_err(RuntimeError::Output)?;
    Ok(collected)
}
