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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cascade::{Cascade, CascadeConfig, Outcome, Routing, Task};
use cascade_expert::local::DEFAULT_MODEL;
use cascade_expert::{Dataset, LocalConfig, LocalExpert, StreamOrder};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::input::{read_item, InputItem, LineReader};
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Task file with the prompt and parser (tasks/imdb.toml, ...), or a preset name.
    #[arg(long)]
    task: String,
    /// Cascade config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Who answers deferred items: `replay` (recorded answers, by item id) or
    /// `local` (a GGUF model on this machine).
    #[arg(long, value_enum, default_value = "replay")]
    expert: RunExpert,
    /// Replay expert: the data folder whose recorded answers play the LLM.
    #[arg(long)]
    replay_data: Option<PathBuf>,
    /// Replay expert: the recorded answer field.
    #[arg(long, default_value = "gpt35")]
    expert_field: String,
    /// Replay expert: delay per call in milliseconds (load and crash tests).
    #[arg(long, default_value_t = 0)]
    replay_delay_ms: u64,
    /// Local expert: the GGUF file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    local_model: PathBuf,
    /// Local expert: texts are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    max_text_tokens: usize,
    /// JSONL with {"id", "text"} per line, or plain text lines; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// JSONL output, one record per input line; `-` for stdout.
    #[arg(long, default_value = "-")]
    output: String,
    /// Checkpoint folder. Needs file input and output.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Continue from the checkpoint in --state.
    #[arg(long, requires = "state")]
    resume: bool,
    /// Input lines between checkpoints.
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Longer lines get an error record.
    #[arg(long, default_value_t = 1 << 20)]
    max_line_bytes: usize,
    /// When the expert gives no label: the deepest student answers
    /// (`status: "expert_unavailable"`), or the item gets an error record.
    #[arg(long, value_enum, default_value = "student")]
    on_expert_failure: OnExpertFailure,
    /// Share of student-answered items also sent to the expert, to estimate
    /// agreement with it without bias. They do not train the cascade.
    #[arg(long, default_value_t = 0.02)]
    audit_rate: f64,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    models: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum RunExpert {
    Replay,
    Local,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum OnExpertFailure {
    Student,
    Error,
}

/// Who answers deferred items.
enum Expert {
    Replay {
        labels: std::collections::HashMap<u64, Option<usize>>,
        delay: Duration,
    },
    Local(Box<LocalExpert>),
}

impl Expert {
    /// The expert's label, or why there is none.
    fn ask(&self, item: &InputItem) -> std::result::Result<usize, String> {
        match self {
            Self::Replay { labels, delay } => {
                if !delay.is_zero() {
                    std::thread::sleep(*delay);
                }
                let id = item
                    .id
                    .as_u64()
                    .or_else(|| item.id.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| {
                        format!("id {} is not an item id of the replay data", item.id)
                    })?;
                match labels.get(&id) {
                    Some(Some(label)) => Ok(*label),
                    Some(None) => Err("the recorded answer holds no label".into()),
                    None => Err(format!("id {id} is not in the replay data")),
                }
            }
            Self::Local(expert) => expert
                .label_now(&item.text, true)
                .map(|a| a.label)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Counters of a run; checkpointed with it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Counts {
    lines: u64,
    answered: Vec<u64>,
    llm: u64,
    bad_input: u64,
    expert_unavailable: u64,
    errors: u64,
    audits: u64,
    audit_agreements: u64,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// Hash of the config, task and expert settings the state belongs to.
    fingerprint: String,
    /// Input lines fully handled.
    lines_done: u64,
    /// Output bytes after those lines' records.
    output_bytes: u64,
    counts: Counts,
    audit_rng: ChaCha8Rng,
    cascade: Vec<u8>,
}

const CHECKPOINT: &str = "checkpoint.cbor";

pub fn run(args: &RunArgs) -> Result<()> {
    let task = Task::load(&args.task)?;
    let config_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config = CascadeConfig::from_toml(&config_text)
        .with_context(|| format!("in {}", args.config.display()))?;
    config
        .validate()
        .with_context(|| format!("in {}", args.config.display()))?;
    for level in &mut config.levels {
        level.resolve_model(&args.models);
    }
    if !(0.0..=1.0).contains(&args.audit_rate) {
        bail!("--audit-rate must be in [0, 1], got {}", args.audit_rate);
    }
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    if args.state.is_some() && (args.input == "-" || args.output == "-") {
        bail!("--state needs --input and --output files (a resumed run re-reads the input and cuts the output back)");
    }
    let expert = build_expert(args, &task)?;
    let mut cascade = Cascade::new(&config, task.num_labels(), Routing::Gated)
        .with_context(|| format!("in {}", args.config.display()))?;
    let level_names: Vec<String> = cascade
        .level_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let fingerprint = fingerprint(&config_text, &task, args);

    let checkpoint_path = args.state.as_ref().map(|dir| dir.join(CHECKPOINT));
    let mut counts = Counts {
        answered: vec![0; level_names.len()],
        ..Counts::default()
    };
    let mut audit_rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0xa0d1);
    let mut lines_done = 0;
    let mut output_bytes = 0;
    if let Some(path) = &checkpoint_path {
        match (path.exists(), args.resume) {
            (true, false) => bail!(
                "{} holds a checkpoint: pass --resume to continue it, or remove it to start over",
                path.display()
            ),
            (false, true) => bail!("--resume: no checkpoint at {}", path.display()),
            (true, true) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let saved: Checkpoint = ciborium::from_reader(bytes.as_slice())
                    .with_context(|| format!("{} is not a readable checkpoint", path.display()))?;
                if saved.fingerprint != fingerprint {
                    bail!(
                        "{} was written with another config, task or expert",
                        path.display()
                    );
                }
                cascade
                    .load_state(&saved.cascade)
                    .with_context(|| format!("restoring {}", path.display()))?;
                counts = saved.counts;
                audit_rng = saved.audit_rng;
                lines_done = saved.lines_done;
                output_bytes = saved.output_bytes;
            }
            (false, false) => std::fs::create_dir_all(args.state.as_ref().unwrap_or(path))
                .with_context(|| "creating the state folder".to_string())?,
        }
    }

    let mut input: LineReader<Box<dyn BufRead>> = LineReader::new(
        match args.input.as_str() {
            "-" => Box::new(std::io::stdin().lock()),
            path => Box::new(BufReader::new(
                File::open(path).with_context(|| format!("opening {path}"))?,
            )),
        },
        args.max_line_bytes,
    );
    let mut output = Output::open(&args.output, args.resume.then_some(output_bytes))?;
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
        let record = match read_item(line, raw, args.max_line_bytes) {
            Err(reason) => {
                counts.bad_input += 1;
                json!({"line": line, "id": null, "label": null, "answered_by": null, "probs": null,
                       "status": "bad_input", "error": reason})
            }
            Ok(item) => handle(
                &mut cascade,
                &expert,
                &item,
                &task,
                &level_names,
                args,
                &mut counts,
                &mut audit_rng,
            )?,
        };
        output.write(&record)?;
        counts.lines += 1;
        progress.inc(1);
        if counts.lines % 256 == 0 {
            progress.set_message(status_line(&counts));
        }
        if input.lines % args.checkpoint_every == 0 {
            save(&cascade, &counts, &audit_rng, &mut output, input.lines)?;
        }
        if stop.load(Ordering::Relaxed) {
            save(&cascade, &counts, &audit_rng, &mut output, input.lines)?;
            progress.finish();
            eprintln!("{}", status_line(&counts));
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
    eprintln!("{}", status_line(&counts));
    Ok(())
}

/// Routes one item and returns its output record.
#[allow(clippy::too_many_arguments)]
fn handle(
    cascade: &mut Cascade,
    expert: &Expert,
    item: &InputItem,
    task: &Task,
    level_names: &[String],
    args: &RunArgs,
    counts: &mut Counts,
    audit_rng: &mut ChaCha8Rng,
) -> Result<Value> {
    let routed = cascade.route(&item.text)?;
    let mut record = json!({"line": item.line, "id": item.id});
    match routed.outcome {
        Outcome::Answered { level, label } => {
            counts.answered[level] += 1;
            record["label"] = json!(task.labels()[label]);
            record["answered_by"] = json!(level_names[level]);
            record["probs"] = json!(routed.level_probs[level]);
            record["status"] = json!("ok");
            if audit_rng.random::<f64>() < args.audit_rate {
                if let Ok(reference) = expert.ask(item) {
                    counts.audits += 1;
                    counts.audit_agreements += u64::from(reference == label);
                }
            }
        }
        Outcome::Deferred(deferred) => match expert.ask(item) {
            Ok(label) => {
                cascade.learn(deferred, Some(label))?;
                counts.llm += 1;
                record["label"] = json!(task.labels()[label]);
                record["answered_by"] = json!("llm");
                record["probs"] = Value::Null;
                record["status"] = json!("ok");
            }
            Err(reason) => {
                cascade.learn(deferred, None)?;
                match args.on_expert_failure {
                    OnExpertFailure::Student => {
                        let (level, probs) = cascade.fallback(&item.text)?;
                        counts.expert_unavailable += 1;
                        record["label"] = json!(task.labels()[cascade::gate::argmax(&probs)]);
                        record["answered_by"] = json!(level_names[level]);
                        record["probs"] = json!(probs);
                        record["status"] = json!("expert_unavailable");
                    }
                    OnExpertFailure::Error => {
                        counts.errors += 1;
                        record["label"] = Value::Null;
                        record["answered_by"] = Value::Null;
                        record["probs"] = Value::Null;
                        record["status"] = json!("error");
                    }
                }
                record["error"] = json!(reason);
            }
        },
    }
    Ok(record)
}

fn build_expert(args: &RunArgs, task: &Task) -> Result<Expert> {
    Ok(match args.expert {
        RunExpert::Replay => {
            let dir = args
                .replay_data
                .as_ref()
                .context("--expert replay needs --replay-data DIR")?;
            let dataset = Dataset::load(dir, task, &args.expert_field)?;
            let labels = dataset
                .stream(&StreamOrder::All)?
                .into_iter()
                .map(|item| (item.id, item.expert))
                .collect();
            Expert::Replay {
                labels,
                delay: Duration::from_millis(args.replay_delay_ms),
            }
        }
        RunExpert::Local => {
            let config = LocalConfig {
                model: args.local_model.clone(),
                max_text_tokens: args.max_text_tokens,
                cache: None,
            };
            let expert = LocalExpert::load(&config, task.clone()).with_context(|| {
                format!("loading the local expert {}", args.local_model.display())
            })?;
            Expert::Local(Box::new(expert))
        }
    })
}

/// What a checkpoint must match to be resumed.
fn fingerprint(config_text: &str, task: &Task, args: &RunArgs) -> String {
    let mut hash = Sha256::new();
    hash.update(config_text.as_bytes());
    hash.update(format!(
        "|{}|{:?}|{:?}|{:?}|{}|{}",
        task.name(),
        task.labels(),
        args.expert,
        args.replay_data,
        args.expert_field,
        args.audit_rate
    ));
    format!("{:x}", hash.finalize())
}

fn status_line(c: &Counts) -> String {
    let items = c.lines - c.bad_input;
    let share = |n: u64| 100.0 * n as f64 / items.max(1) as f64;
    let mut line = format!(
        "{} lines: {} bad input, LLM {:.1}%, expert unavailable {}, errors {}",
        c.lines,
        c.bad_input,
        share(c.llm),
        c.expert_unavailable,
        c.errors
    );
    if c.audits > 0 {
        let (p, half) = wilson(c.audit_agreements, c.audits);
        line += &format!(
            "; audited agreement {:.3} ± {:.3} ({} audits)",
            p, half, c.audits
        );
    }
    line
}

/// Wilson score interval at 95%: (centre, half-width).
fn wilson(successes: u64, n: u64) -> (f64, f64) {
    let (n, p, z) = (n as f64, successes as f64 / n as f64, 1.96f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    (centre, half)
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

/// Temp file, fsync, rename, fsync the folder: a crash leaves the old
/// checkpoint or the new one, never a torn one.
fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let temp = path.with_extension("cbor.tmp");
    let mut file = BufWriter::new(
        File::create(&temp).with_context(|| format!("creating {}", temp.display()))?,
    );
    ciborium::into_writer(checkpoint, &mut file).context("encoding the checkpoint")?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&temp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_is_centred_and_shrinks() {
        let (p, half) = wilson(90, 100);
        assert!(
            (p - 0.8852).abs() < 1e-3 && (half - 0.0596).abs() < 1e-3,
            "{p} {half}"
        );
        let (_, wide) = wilson(9, 10);
        assert!(wide > half);
    }
}
