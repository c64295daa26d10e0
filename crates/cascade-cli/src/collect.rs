//! `cascade collect`: a cluster's results, one JSON line per item.

use std::io::{BufWriter, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use cascade_runtime::cluster::{collect, Cluster, CollectOptions};
use clap::Args;

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The cluster's name on the server.
    #[arg(long, default_value = "cascade")]
    cluster: String,
    /// JSONL output; `-` for stdout.
    #[arg(long, default_value = "-")]
    output: String,
    /// Stop after this many results (e.g. the number of lines published).
    #[arg(long)]
    expect: Option<u64>,
    /// Stop once no result has come for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    idle_secs: f64,
}

pub fn run(args: &CollectArgs) -> Result<()> {
    let out: Box<dyn Write> = match args.output.as_str() {
        "-" => Box::new(std::io::stdout().lock()),
        path => Box::new(std::fs::File::create(path).with_context(|| format!("--output {path}"))?),
    };
    let idle = Duration::try_from_secs_f64(args.idle_secs)
        .context("--idle-secs must be a non-negative number of seconds")?;
    let options = CollectOptions {
        expect: args.expect,
        idle,
    };
    let runtime = cascade_runtime::async_runtime()?;
    let collected = runtime.block_on(async {
        let cluster = Cluster::connect(&args.nats, &args.cluster).await?;
        collect(&cluster, BufWriter::new(out), &options, |n| {
            if n % 10_000 == 0 {
                eprintln!("{n} results");
            }
        })
        .await
    })?;
    eprintln!("{} results collected", collected.results);
    if let Some(expected) = args.expect.filter(|&n| n > collected.results) {
        anyhow::bail!(
            "{} results of the {expected} expected (no result for {}s)",
            collected.results,
            args.idle_secs
        );
    }
    Ok(())
}
