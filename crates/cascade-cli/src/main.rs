//! The `cascade` command line.

mod bench;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
    }
}
