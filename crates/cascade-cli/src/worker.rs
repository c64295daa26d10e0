//! `cascade worker`: one worker of a cluster on NATS JetStream (the
//! runtime's `cluster` module; see there for the streams and guarantees).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cascade_runtime::checkpoint::learner_fingerprint;
use cascade_runtime::cluster::{run_worker, Cluster, WorkerOptions};
use cascade_runtime::Live;
use clap::Args;

use crate::args::SessionArgs;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The cluster's name on the server: its streams are <NAME>_ITEMS,
    /// <NAME>_LABELS and <NAME>_RESULTS.
    #[arg(long, default_value = "cascade")]
    cluster: String,
    /// This worker's name (in each result's `worker` field; seeds its coins).
    #[arg(long)]
    name: Option<String>,
    /// Expert calls out at once.
    #[arg(long, default_value_t = 8)]
    max_in_flight: usize,
    /// Labels between snapshots of the learner (a new worker starts from the latest).
    #[arg(long, default_value_t = 1000)]
    snapshot_every: u64,
    /// Delete the labels the kept snapshots already hold (the log then
    /// starts after the older of the two kept snapshots).
    #[arg(long)]
    purge_log: bool,
    /// Seconds an item may stay unacked before the server gives it to
    /// another worker; set it above the expert's timeout × retries.
    #[arg(long, default_value_t = 120)]
    ack_wait_secs: u64,
    /// On exit, after catching up with the label log: write the learner's state here.
    #[arg(long)]
    save_learner: Option<PathBuf>,
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    if args.session.state.is_some() {
        anyhow::bail!("--state: a worker's state is the cluster's (snapshots on the server)");
    }
    let spec = args.session.spec(None)?;
    let ack_wait = Duration::from_secs(args.ack_wait_secs);
    if let Some(longest) = spec.expert.longest_call().filter(|l| *l >= ack_wait) {
        anyhow::bail!(
            "--ack-wait-secs {} is not above the expert's longest call ({:.0} s with its timeout, retries and backoff): the server would give an item to a second worker while the first still waits on its call",
            args.ack_wait_secs,
            longest.as_secs_f64()
        );
    }
    let live = Live::start(&spec, "cluster")?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let options = WorkerOptions {
        name: name.clone(),
        max_in_flight: args.max_in_flight,
        snapshot_every: args.snapshot_every,
        purge_log: args.purge_log,
        ack_wait,
        save_learner: args.save_learner.clone(),
        fingerprint: learner_fingerprint(&live.config, &live.task),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    let runtime = cascade_runtime::async_runtime()?;
    let report = runtime.block_on(async {
        let cluster = Cluster::connect(&args.nats, &args.cluster).await?;
        eprintln!(
            "worker {name}: joined cluster `{}` at {}",
            args.cluster, args.nats
        );
        run_worker(
            &cluster,
            live.session,
            live.expert,
            &live.task,
            &options,
            stop,
        )
        .await
    })?;
    eprintln!(
        "worker {name}: {}; learned {} labels, skipped {} unreadable (log at {}{})",
        report.counts.status_line(),
        report.labels_applied,
        report.labels_skipped,
        report.label_sequence,
        report
            .restored_from
            .map(|s| format!(", started from the snapshot at {s}"))
            .unwrap_or_default()
    );
    Ok(())
}
