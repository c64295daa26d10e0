//! The `cascade` command line.

mod bench;

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
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
