//! `cascade publish`: a JSONL stream's lines into a cluster's ITEMS stream.

use std::io::BufReader;

use anyhow::{Context, Result};
use cascade_runtime::cluster::{publish, Cluster};
use clap::Args;

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The cluster's name on the server.
    #[arg(long, default_value = "cascade")]
    cluster: String,
    /// JSONL with {"id", "text"} per line, or plain text lines; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// Longer lines are not sent; their item gets a bad_input record.
    #[arg(long, default_value_t = 1 << 20)]
    max_line_bytes: usize,
}

pub fn run(args: &PublishArgs) -> Result<()> {
    let reader: Box<dyn std::io::BufRead> = match args.input.as_str() {
        "-" => Box::new(BufReader::new(std::io::stdin())),
        path => Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("--input {path}"))?,
        )),
    };
    let runtime = cascade_runtime::async_runtime()?;
    let published = runtime.block_on(async {
        let cluster = Cluster::connect(&args.nats, &args.cluster).await?;
        publish(&cluster, reader, args.max_line_bytes, |n| {
            if n % 10_000 == 0 {
                eprintln!("{n} lines published");
            }
        })
        .await
    })?;
    eprintln!(
        "{} lines published to {}.items ({} already there: dropped as duplicates)",
        published.lines, args.cluster, published.duplicates
    );
    Ok(())
}
