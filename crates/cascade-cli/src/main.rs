//! The `cascade` command line.

mod bench;
mod bench_encoder;
mod progress;

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
        Command::BenchEncoder(args) => bench_encoder::run(&args),
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
