//! The `cascade` command line.

mod args;
mod bench;
mod bench_embed;
mod bench_encoder;
mod collect;
mod experiments;
mod label;
mod load_test;
mod publish;
mod report;
mod reproduce;
mod run;
mod serve;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Online cascade learning: cheap students learn from an LLM's answers and take
/// over more of the stream over time.
#[derive(Parser)]
#[command(name = "cascade", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a recorded stream through a cascade and report accuracy and LLM calls.
    Bench(bench::BenchArgs),
    /// Time the encoder's forward pass and training step (compare with pytorch_minilm.py).
    BenchEncoder(bench_encoder::BenchEncoderArgs),
    /// Time a frozen encoder embedding a stream's texts, f32 against int8, and
    /// compare their embeddings.
    BenchEmbed(bench_embed::BenchEmbedArgs),
    /// Label a JSONL stream with a live LLM alone (OpenAI-compatible API).
    Label(label::LabelArgs),
    /// Run the paper's Table 1 grid (cascades, baselines, mu sweep, shift) and
    /// write results/table1.json, results/table1.md and results/figures.
    Reproduce(reproduce::ReproduceArgs),
    /// Regenerate table1.md and the figures from a grid's JSON (results/table1.json).
    Report(report::ReportArgs),
    /// Run a cascade over a JSONL stream: one record per line, checkpoints, resume.
    Run(run::RunArgs),
    /// Serve the cascade over HTTP: POST /v1/classify, GET /healthz, GET /metrics.
    Serve(serve::ServeArgs),
    /// Send a recorded stream to a running `cascade serve`; report requests/s and latency.
    LoadTest(load_test::LoadTestArgs),
    /// Join a cluster on NATS JetStream: pull items, answer, log labels, learn from the shared log.
    Worker(worker::WorkerArgs),
    /// Publish a JSONL stream's lines to a cluster's ITEMS stream.
    Publish(publish::PublishArgs),
    /// Write a cluster's results (one JSON line per item) from its RESULTS stream.
    Collect(collect::CollectArgs),
}

/// glibc hands large freed blocks back to the OS and page-faults fresh ones in
/// for every tensor; keeping them mapped made the MiniLM forward pass ~11%
/// faster (16×256: 0.62 vs 0.69 s) and a training step ~22% faster (8×256:
/// 1.11 vs 1.45 s), alternating A/B, for +5% peak RSS.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator tuning; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
        Command::BenchEncoder(args) => bench_encoder::run(&args),
        Command::BenchEmbed(args) => bench_embed::run(&args),
        Command::Label(args) => label::run(&args),
        Command::Reproduce(args) => reproduce::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::LoadTest(args) => load_test::run(&args),
        Command::Worker(args) => worker::run(&args),
        Command::Publish(args) => publish::run(&args),
        Command::Collect(args) => collect::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole chain of causes; no backtrace for user errors.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
