//! `cascade run`: a cascade over a JSONL stream, one output record per input
//! line, with checkpoints that let a killed run resume and lose nothing.
//!
//! Items are handled in input order and a deferred item waits for the
//! expert's label before the next item is routed, so a run's decisions depend
//! only on the config, the seed and the stream (never on timing); that is what
//! makes a resumed run's labels equal an uninterrupted run's.
//!
//! Checkpoints (`--state DIR`): every `--checkpoint-every` lines and on
//! SIGINT/SIGTERM, the output is flushed and fsynced, then the whole learner,
//! the input position and the output length are written to a temp file,
//! fsynced and renamed over `checkpoint.cbor`. `--resume` restores the learner,
//! cuts the output back to the checkpoint's length (records written after it
//! are recomputed, identically) and continues from the next input line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cascade::{Cascade, Outcome};
use clap::Args;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::live::{write_checkpoint, Checkpoint, Counts, SessionArgs, Settled, Start, CHECKPOINT};
use crate::progress::Progress;
use cascade_expert::input::{read_item, InputItem, LineReader};

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
}

pub fn run(args: &RunArgs) -> Result<()> {
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    if args.session.state.is_some() && (args.input == "-" || args.output == "-") {
        bail!("--state needs --input and --output files (a resumed run re-reads the input and cuts the output back)");
    }
    let Start {
        task,
        mut cascade,
        expert,
        level_names,
        fingerprint,
        audit_rate,
        mut counts,
        mut audit_rng,
        lines_done,
        output_bytes,
    } = Start::new(&args.session)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let checkpoint_path = args.session.state.as_ref().map(|dir| dir.join(CHECKPOINT));
    let mut input: LineReader<Box<dyn BufRead>> = LineReader::new(
        match args.input.as_str() {
            "-" => Box::new(std::io::stdin().lock()),
            path => Box::new(BufReader::new(
                File::open(path).with_context(|| format!("opening {path}"))?,
            )),
        },
        args.max_line_bytes,
    );
    let mut output = Output::open(&args.output, args.session.resume.then_some(output_bytes))?;
    // Skip what the checkpoint covers.
    while input.lines < lines_done {
        if input.next_line()?.is_none() {
            bail!("the input has fewer lines than the checkpoint's {lines_done}: is it the same input?");
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    let total = match args.input.as_str() {
        "-" => 0,
        path => count_lines(Path::new(path))?,
    };
    let mut progress = Progress::new(total, "lines");
    progress.inc(lines_done);
    let save =
        |cascade: &Cascade, counts: &Counts, rng: &ChaCha8Rng, output: &mut Output, lines| {
            let Some(path) = &checkpoint_path else {
                return Ok(());
            };
            let output_bytes = output.sync()?;
            write_checkpoint(
                path,
                &Checkpoint {
                    fingerprint: fingerprint.clone(),
                    lines_done: lines,
                    output_bytes,
                    counts: counts.clone(),
                    audit_rng: rng.clone(),
                    cascade: cascade.save_state()?,
                },
            )
        };

    while let Some(raw) = input.next_line()? {
        let line = input.lines as usize;
        let (id, settled) = match read_item(line, raw, args.max_line_bytes) {
            Err(reason) => (Value::Null, Settled::BadInput { reason }),
            Ok(item) => {
                let ask = |item: &InputItem| runtime.block_on(expert.ask(&item.id, &item.text));
                let settled = handle(
                    &mut cascade,
                    &ask,
                    &item,
                    args,
                    audit_rate,
                    &mut counts,
                    &mut audit_rng,
                )?;
                (item.id, settled)
            }
        };
        counts.add(&settled);
        let record = settled.record(Some(line), &id, &task, &level_names);
        output.write(&record)?;
        progress.inc(1);
        if counts.lines.is_multiple_of(256) {
            progress.set_message(counts.status_line());
        }
        if input.lines.is_multiple_of(args.checkpoint_every) {
            save(&cascade, &counts, &audit_rng, &mut output, input.lines)?;
        }
        if stop.load(Ordering::Relaxed) {
            save(&cascade, &counts, &audit_rng, &mut output, input.lines)?;
            progress.finish();
            eprintln!("{}", counts.status_line());
            bail!(
                "interrupted after input line {}; {}",
                input.lines,
                if checkpoint_path.is_some() {
                    "checkpoint written: continue with --resume"
                } else {
                    "no --state, so nothing to resume"
                }
            );
        }
    }
    save(&cascade, &counts, &audit_rng, &mut output, input.lines)?;
    progress.finish();
    eprintln!("{}", counts.status_line());
    Ok(())
}

/// Routes one item; a deferred one waits for the expert. Audits send a share
/// of student answers to the expert as well.
fn handle(
    cascade: &mut Cascade,
    ask: &dyn Fn(&InputItem) -> std::result::Result<usize, String>,
    item: &InputItem,
    args: &RunArgs,
    audit_rate: f64,
    counts: &mut Counts,
    audit_rng: &mut ChaCha8Rng,
) -> Result<Settled> {
    let routed = cascade.route(&item.text)?;
    Ok(match routed.outcome {
        Outcome::Answered { level, label } => {
            if audit_rng.random::<f64>() < audit_rate {
                if let Ok(reference) = ask(item) {
                    counts.add_audit(reference == label);
                }
            }
            Settled::Student {
                level,
                label,
                probs: routed.level_probs[level].clone(),
            }
        }
        Outcome::Deferred(deferred) => match ask(item) {
            Ok(label) => {
                cascade.learn(deferred, Some(label))?;
                Settled::Llm { label }
            }
            Err(reason) => Settled::expert_failed(
                cascade,
                deferred,
                &item.text,
                reason,
                args.session.on_expert_failure,
            )?,
        },
    })
}

fn count_lines(path: &Path) -> Result<u64> {
    let mut reader =
        BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let mut count = 0u64;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(count);
        }
        count += buffer.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buffer.len();
        reader.consume(n);
    }
}

/// The output stream: a file that can be synced and cut back, or stdout.
enum Output {
    File { writer: BufWriter<File>, bytes: u64 },
    Stdout(BufWriter<std::io::Stdout>),
}

impl Output {
    /// Opens `path`; on resume, cuts the file back to `resume_at` bytes.
    fn open(path: &str, resume_at: Option<u64>) -> Result<Self> {
        if path == "-" {
            return Ok(Self::Stdout(BufWriter::new(std::io::stdout())));
        }
        let mut file = match resume_at {
            Some(bytes) => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("opening {path} to resume"))?;
                let length = file.metadata()?.len();
                if length < bytes {
                    bail!("{path} is shorter ({length} bytes) than the checkpoint says ({bytes}): was it replaced?");
                }
                file.set_len(bytes)?;
                file.seek(std::io::SeekFrom::End(0))?;
                file
            }
            None => File::create(path).with_context(|| format!("creating {path}"))?,
        };
        file.flush()?;
        Ok(Self::File {
            writer: BufWriter::new(file),
            bytes: resume_at.unwrap_or(0),
        })
    }

    fn write(&mut self, record: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        match self {
            Self::File { writer, bytes } => {
                writer.write_all(&line)?;
                *bytes += line.len() as u64;
            }
            Self::Stdout(writer) => writer.write_all(&line)?,
        }
        Ok(())
    }

    /// Flushes to disk; returns the bytes written so far.
    fn sync(&mut self) -> Result<u64> {
        match self {
            Self::File { writer, bytes } => {
                writer.flush()?;
                writer.get_ref().sync_data()?;
                Ok(*bytes)
            }
            Self::Stdout(writer) => {
                writer.flush()?;
                Ok(0)
            }
        }
    }
}
