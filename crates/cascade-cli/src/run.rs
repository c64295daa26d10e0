//! `cascade run`: a cascade over a JSONL stream, one output record per input
//! line, with checkpoints that let a killed run resume and lose nothing
//! (the runtime's `jsonl` driver; see there for the guarantees).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cascade_runtime::jsonl::{Ended, JsonlRun};
use cascade_runtime::Live;
use clap::Args;

use crate::args::SessionArgs;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// JSONL with {"id", "text"} per line, or plain text lines; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// JSONL output, one record per input line; `-` for stdout.
    #[arg(long, default_value = "-")]
    output: String,
    /// Input lines between checkpoints.
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Longer lines get an error record.
    #[arg(long, default_value_t = 1 << 20)]
    max_line_bytes: usize,
    /// Expert calls in flight at once. Students keep answering while they
    /// run; each label is learned at the latest N lines after its item, so
    /// the decisions depend on N but never on which call returns first.
    #[arg(long, default_value_t = 1)]
    max_in_flight: usize,
    /// Write each record as soon as it is settled instead of in input order.
    #[arg(long)]
    unordered: bool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let run = JsonlRun {
        input: args.input.clone(),
        output: args.output.clone(),
        checkpoint_every: args.checkpoint_every,
        max_line_bytes: args.max_line_bytes,
        max_in_flight: args.max_in_flight,
        unordered: args.unordered,
    };
    run.check(args.session.state.is_some())?;
    let live = Live::start(&args.session.spec(run.input_lines()?)?, &run.schedule())?;
    if let (Some(position), Some(state)) = (&live.resumed, &live.state) {
        eprintln!(
            "resuming from {} after input line {}",
            state.path().display(),
            position.lines_done
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    let (ended, live) = run.run(live, stop)?;
    eprintln!("{}", live.session.counts().status_line());
    if let Ended::Interrupted { after_line } = ended {
        bail!(
            "interrupted after input line {after_line}; {}",
            if live.state.is_some() {
                "checkpoint written: continue with --resume"
            } else {
                "no --state, so nothing to resume"
            }
        );
    }
    Ok(())
}
