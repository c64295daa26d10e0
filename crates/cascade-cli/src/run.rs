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

use std::collections::VecDeque;
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

use crate::live::{
    write_checkpoint, Checkpoint, Counts, LiveExpert, OnExpertFailure, SessionArgs, Settled, Start,
    CHECKPOINT,
};
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
    if args.checkpoint_every == 0 || args.max_in_flight == 0 {
        bail!("--checkpoint-every and --max-in-flight must be at least 1");
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
    } = Start::new(
        &args.session,
        &format!(
            "run: {} in flight, checkpoint every {}",
            args.max_in_flight, args.checkpoint_every
        ),
    )?;
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

    let mut pipeline = Pipeline {
        queue: VecDeque::new(),
        ordered: !args.unordered,
    };
    let settle = |pipeline: &mut Pipeline,
                  cascade: &mut Cascade,
                  counts: &mut Counts,
                  output: &mut Output,
                  upto: usize|
     -> Result<()> {
        // Oldest first, every call for an item on line `upto` or before.
        while pipeline.oldest_waiting().is_some_and(|line| line <= upto) {
            pipeline.settle_oldest(&runtime, cascade, counts, args.session.on_expert_failure)?;
            pipeline.flush(|line, id, settled| {
                counts.add(settled);
                output.write(&settled.record(Some(line), id, &task, &level_names))
            })?;
        }
        Ok(())
    };
    // A checkpoint holds no call in flight: they are all settled first.
    let checkpoint = |pipeline: &mut Pipeline,
                      cascade: &mut Cascade,
                      counts: &mut Counts,
                      output: &mut Output,
                      rng: &ChaCha8Rng,
                      lines: u64|
     -> Result<()> {
        settle(pipeline, cascade, counts, output, usize::MAX)?;
        save(cascade, counts, rng, output, lines)
    };
    while let Some(raw) = input.next_line()? {
        let line = input.lines as usize;
        // Each label is learned at the latest N lines after its item, before
        // this one is routed: what the cascade knows here is fixed by the
        // stream and N alone, and at most N calls are in flight.
        let upto = line.saturating_sub(args.max_in_flight);
        settle(&mut pipeline, &mut cascade, &mut counts, &mut output, upto)?;
        let entry = match read_item(line, raw, args.max_line_bytes) {
            Err(reason) => Entry::Ready {
                line,
                id: Value::Null,
                settled: Settled::BadInput { reason },
            },
            Ok(item) => route(
                &mut cascade,
                &expert,
                &runtime,
                item,
                audit_rate,
                &mut audit_rng,
            )?,
        };
        pipeline.push(entry);
        pipeline.flush(|line, id, settled| {
            counts.add(settled);
            output.write(&settled.record(Some(line), id, &task, &level_names))
        })?;
        progress.inc(1);
        if input.lines.is_multiple_of(256) {
            progress.set_message(counts.status_line());
        }
        let stopping = stop.load(Ordering::Relaxed);
        if input.lines.is_multiple_of(args.checkpoint_every) || stopping {
            checkpoint(
                &mut pipeline,
                &mut cascade,
                &mut counts,
                &mut output,
                &audit_rng,
                input.lines,
            )?;
        }
        if stopping {
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
    checkpoint(
        &mut pipeline,
        &mut cascade,
        &mut counts,
        &mut output,
        &audit_rng,
        input.lines,
    )?;
    progress.finish();
    eprintln!("{}", counts.status_line());
    Ok(())
}

/// Routes one item: a student's answer is ready at once (an audited one also
/// asks the expert); a deferred item's expert call starts now.
fn route(
    cascade: &mut Cascade,
    expert: &LiveExpert,
    runtime: &tokio::runtime::Runtime,
    item: InputItem,
    audit_rate: f64,
    audit_rng: &mut ChaCha8Rng,
) -> Result<Entry> {
    let ask = |item: &InputItem| {
        let (expert, id, text) = (expert.clone(), item.id.clone(), item.text.clone());
        runtime.spawn(async move { expert.ask(&id, &text).await })
    };
    let routed = cascade.route(&item.text)?;
    Ok(match routed.outcome {
        Outcome::Answered { level, label } => {
            let settled = Settled::Student {
                level,
                label,
                probs: routed.level_probs[level].clone(),
            };
            if audit_rng.random::<f64>() < audit_rate {
                Entry::Waiting {
                    call: ask(&item),
                    item,
                    waiting: Waiting::Audit(settled),
                }
            } else {
                Entry::Ready {
                    line: item.line,
                    id: item.id,
                    settled,
                }
            }
        }
        Outcome::Deferred(deferred) => Entry::Waiting {
            call: ask(&item),
            item,
            waiting: Waiting::Label(deferred),
        },
    })
}

/// An item between routing and output.
enum Entry {
    Ready {
        line: usize,
        id: Value,
        settled: Settled,
    },
    Waiting {
        item: InputItem,
        call: tokio::task::JoinHandle<std::result::Result<usize, String>>,
        waiting: Waiting,
    },
}

enum Waiting {
    /// A deferred item: its label is learned when settled.
    Label(cascade::Deferred),
    /// An audited student answer: the expert's label is only compared.
    Audit(Settled),
}

/// Items between routing and output, in input order.
struct Pipeline {
    queue: VecDeque<Entry>,
    ordered: bool,
}

impl Pipeline {
    fn push(&mut self, entry: Entry) {
        self.queue.push_back(entry);
    }

    /// The input line of the oldest item waiting for the expert.
    fn oldest_waiting(&self) -> Option<usize> {
        self.queue.iter().find_map(|e| match e {
            Entry::Waiting { item, .. } => Some(item.line),
            Entry::Ready { .. } => None,
        })
    }

    /// Waits for the oldest expert call and settles its item.
    fn settle_oldest(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        cascade: &mut Cascade,
        counts: &mut Counts,
        policy: OnExpertFailure,
    ) -> Result<()> {
        let Some(index) = self
            .queue
            .iter()
            .position(|e| matches!(e, Entry::Waiting { .. }))
        else {
            return Ok(());
        };
        let Some(Entry::Waiting {
            item,
            call,
            waiting,
        }) = self.queue.remove(index)
        else {
            unreachable!("position found a waiting entry");
        };
        let answer = runtime
            .block_on(call)
            .unwrap_or_else(|e| Err(format!("expert task failed: {e}")));
        let settled = match (waiting, answer) {
            (Waiting::Label(deferred), answer) => {
                Settled::from_expert(cascade, deferred, &item.text, answer, policy)?
            }
            (Waiting::Audit(settled), answer) => {
                if let Ok(reference) = answer {
                    counts.add_audit(&settled, reference);
                }
                settled
            }
        };
        self.queue.insert(
            index,
            Entry::Ready {
                line: item.line,
                id: item.id,
                settled,
            },
        );
        Ok(())
    }

    /// Writes what is ready: in input order, or (unordered) everything settled.
    fn flush(
        &mut self,
        mut write: impl FnMut(usize, &Value, &Settled) -> Result<()>,
    ) -> Result<()> {
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut blocked = false;
        while let Some(entry) = self.queue.pop_front() {
            match entry {
                Entry::Ready { line, id, settled } if !blocked => write(line, &id, &settled)?,
                entry => {
                    blocked |= self.ordered;
                    kept.push_back(entry);
                }
            }
        }
        self.queue = kept;
        Ok(())
    }
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
