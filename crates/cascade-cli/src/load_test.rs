//! `cascade load-test`: sends a recorded stream to a running `cascade serve`
//! in batches and reports the throughput held and the latency percentiles.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cascade_expert::Task;
use cascade_expert::{Dataset, StreamOrder};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct LoadTestArgs {
    /// The service, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Dataset folder whose test stream is sent (ids let a replay expert answer).
    #[arg(long)]
    data: PathBuf,
    /// Task preset or file (its labels must match the data's).
    #[arg(long, default_value = "imdb")]
    task: String,
    /// Items per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Send only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Environment variable holding the service's bearer token.
    #[arg(long)]
    token_env: Option<String>,
}

pub fn run(args: &LoadTestArgs) -> Result<()> {
    if args.batch == 0 || args.concurrency == 0 {
        bail!("--batch and --concurrency must be at least 1");
    }
    let task = Task::load(&args.task)?;
    let dataset = Dataset::load(&args.data, &task, "gpt35")?;
    let mut stream = dataset.stream(&StreamOrder::Test)?;
    if let Some(limit) = args.limit {
        stream.truncate(limit);
    }
    let bodies: Vec<Value> = stream
        .chunks(args.batch)
        .map(|chunk| {
            let items: Vec<Value> = chunk
                .iter()
                .map(|item| json!({"id": item.id, "text": item.text}))
                .collect();
            json!({ "items": items })
        })
        .collect();
    let token = match &args.token_env {
        Some(name) => Some(std::env::var(name).with_context(|| format!("{name} is not set"))?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let url = format!("{}/v1/classify", args.url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (mut latencies, mut rejected, mut items, mut gold_hits, mut with_gold) =
        (Vec::new(), 0u64, 0u64, 0u64, 0u64);
    runtime.block_on(async {
        for wave in bodies.chunks(args.concurrency) {
            let sends = wave.iter().map(|body| {
                let mut request = client.post(&url).json(body);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                async move {
                    let sent = Instant::now();
                    let response = request.send().await?;
                    let status = response.status();
                    let value: Value = response.json().await?;
                    anyhow::Ok((status, value, sent.elapsed().as_secs_f64()))
                }
            });
            for result in futures::future::join_all(sends).await {
                let (status, value, seconds) = result?;
                if status.as_u16() == 503 {
                    rejected += 1;
                    continue;
                }
                if !status.is_success() {
                    bail!("the service answered {status}: {value}");
                }
                latencies.push(seconds);
                for record in value["results"].as_array().into_iter().flatten() {
                    items += 1;
                    let id = record["id"].as_u64().unwrap_or(u64::MAX);
                    if let (Some(gold), Some(label)) = (
                        dataset.get(id).and_then(|i| i.gold),
                        record["label"].as_str().and_then(|l| task.label_index(l)),
                    ) {
                        with_gold += 1;
                        gold_hits += u64::from(gold == label);
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |s| s * 1000.0)
    };
    println!(
        "{} requests ({} items per request, {} in flight): {:.1} requests/s, {:.0} items/s over {:.2} s; latency p50 {:.1} ms, p99 {:.1} ms; {} rejected (503)",
        latencies.len(),
        args.batch,
        args.concurrency,
        latencies.len() as f64 / seconds,
        items as f64 / seconds,
        seconds,
        percentile(0.5),
        percentile(0.99),
        rejected
    );
    if with_gold > 0 {
        println!(
            "accuracy against gold {:.5} over {with_gold} items",
            gold_hits as f64 / with_gold as f64
        );
    }
    Ok(())
}
