//! `cascade bench`: replay a recorded stream through a cascade (or a baseline).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cascade::config::StudentKind;
use cascade::{AnsweredBy, Cascade, CascadeConfig, Metrics, Outcome, Routing, Summary, Task};
use cascade_expert::{read_labels, Dataset, Item, StreamOrder};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Dataset folder (stream.jsonl.zst, labels.txt, split_test_ids.txt).
    #[arg(long)]
    data: PathBuf,
    /// `test` (split_test_ids.txt, in order), `all` (file order), or a file of ids.
    #[arg(long, default_value = "test")]
    stream: String,
    /// The recorded answer field that plays the LLM.
    #[arg(long, default_value = "gpt35")]
    expert_field: String,
    /// Cascade config (TOML). Not needed for `--baseline llm-only`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Task preset (imdb, hatespeech, isear, fever). Default: the dataset folder's
    /// name if it is a preset, else label names from labels.txt.
    #[arg(long)]
    task: Option<String>,
    /// Overrides the config's mu (larger: fewer LLM calls).
    #[arg(long)]
    mu: Option<f64>,
    /// Overrides the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run a baseline instead of the gated cascade.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Online ensemble: each level's fixed probability of answering (one value
    /// for all levels, or one per level, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    route_prob: Vec<f64>,
    /// Write the summary as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write one CSV row per item here: who answered, prediction, LLM label, gold, gate outputs.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    models: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum Baseline {
    /// Every item goes to the LLM.
    LlmOnly,
    /// The same online students with fixed routing probabilities and no gates.
    OnlineEnsemble,
}

#[derive(Serialize)]
struct Report<'a> {
    dataset: String,
    stream: &'a str,
    expert_field: &'a str,
    config: Option<String>,
    baseline: Option<Baseline>,
    mu: Option<f64>,
    seed: Option<u64>,
    #[serde(flatten)]
    summary: Summary,
    wall_seconds: f64,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let task = load_task(&args.data, args.task.as_deref())?;
    let dataset = Dataset::load(&args.data, &task, &args.expert_field)?;
    let stream = dataset.stream(&StreamOrder::parse(&args.stream))?;
    if stream.is_empty() {
        bail!("the stream `{}` has no items", args.stream);
    }
    let mut cascade = match args.baseline {
        Some(Baseline::LlmOnly) => None,
        _ => Some(build_cascade(args, &task, &stream)?),
    };
    let level_names: Vec<String> = cascade
        .as_ref()
        .map(|c| c.level_names().iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    let mut metrics = Metrics::new(level_names.clone(), task.num_labels());
    let mut log = match &args.log {
        Some(path) => Some(ItemLog::create(path, &level_names)?),
        None => None,
    };

    let mut progress = Progress::new(stream.len() as u64, "items");
    for (position, item) in stream.iter().enumerate() {
        let record = match &mut cascade {
            None => ItemRecord::llm(item),
            Some(cascade) => step(cascade, item)?,
        };
        metrics.record(record.by, record.prediction, item.gold, Some(item.expert));
        if let Some(log) = &mut log {
            log.write(position, item, &record, &task)?;
        }
        progress.inc(1);
        if position % 256 == 0 {
            let calls = metrics.llm_calls() as f64 / metrics.items() as f64;
            progress.set_message(format!("LLM calls {:.1}%", 100.0 * calls));
        }
    }
    progress.finish();
    if let Some(log) = log {
        log.finish()?;
    }

    let summary = metrics.summary();
    print_table(&args.data, &summary);
    let report = Report {
        dataset: args.data.display().to_string(),
        stream: &args.stream,
        expert_field: &args.expert_field,
        config: args.config.as_ref().map(|p| p.display().to_string()),
        baseline: args.baseline,
        mu: cascade.as_ref().map(|c| c.mu()),
        seed: args.seed,
        summary,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    println!("wall time: {:.2} s", report.wall_seconds);
    if let Some(path) = &args.summary {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The task: an explicit preset, the folder's preset, or label names from labels.txt.
fn load_task(data: &Path, name: Option<&str>) -> Result<Task> {
    let labels = read_labels(data)?;
    let folder = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let task = match name {
        Some(name) => Task::preset(name).with_context(|| {
            format!("unknown task `{name}`; presets: imdb, hatespeech, isear, fever")
        })?,
        None => match Task::preset(&folder) {
            Some(task) => task,
            None => Task::with_default_rules(folder, labels.clone())?,
        },
    };
    if task.labels() != labels.as_slice() {
        bail!(
            "task `{}` has labels {:?} but {} lists {:?}",
            task.name(),
            task.labels(),
            data.join("labels.txt").display(),
            labels
        );
    }
    Ok(task)
}

fn build_cascade(args: &BenchArgs, task: &Task, stream: &[&Item]) -> Result<Cascade> {
    let path = args
        .config
        .as_ref()
        .context("--config is required unless --baseline llm-only")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        CascadeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    if let Some(mu) = args.mu {
        config.mu = mu;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    for level in &mut config.levels {
        level.resolve_model(&args.models);
    }
    let routing = match args.baseline {
        Some(Baseline::OnlineEnsemble) => {
            let levels = config.levels.len();
            let probs = match args.route_prob.as_slice() {
                [p] => vec![*p; levels],
                many => many.to_vec(),
            };
            Routing::Fixed(probs)
        }
        _ => Routing::Gated,
    };
    let mut cascade = Cascade::new(&config, task.num_labels(), routing)
        .with_context(|| format!("in {}", path.display()))?;
    let corpus: Vec<&str> = stream.iter().map(|item| item.text.as_str()).collect();
    cascade.prefit(&corpus);
    if config
        .levels
        .iter()
        .any(|level| level.kind == StudentKind::EmbeddingHead)
    {
        // Encode the stream once up front, in batches; this changes no decision.
        let mut progress = Progress::new(corpus.len() as u64, "texts embedded");
        for chunk in corpus.chunks(512) {
            cascade.precompute(chunk)?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
    }
    Ok(cascade)
}

/// What happened to one item.
struct ItemRecord {
    by: AnsweredBy,
    prediction: Option<usize>,
    gate_outputs: Vec<Option<f32>>,
}

impl ItemRecord {
    fn llm(item: &Item) -> Self {
        Self {
            by: AnsweredBy::Llm,
            prediction: item.expert,
            gate_outputs: Vec::new(),
        }
    }
}

/// Routes one item; a deferred item is answered at once by the recorded LLM.
fn step(cascade: &mut Cascade, item: &Item) -> Result<ItemRecord> {
    let routed = cascade.route(&item.text)?;
    let (by, prediction) = match routed.outcome {
        Outcome::Answered { level, label } => (AnsweredBy::Level(level), Some(label)),
        Outcome::Deferred(deferred) => {
            cascade.learn(deferred, item.expert)?;
            (AnsweredBy::Llm, item.expert)
        }
    };
    Ok(ItemRecord {
        by,
        prediction,
        gate_outputs: routed.gate_outputs,
    })
}

struct ItemLog {
    writer: csv::Writer<std::fs::File>,
    levels: Vec<String>,
}

impl ItemLog {
    fn create(path: &Path, levels: &[String]) -> Result<Self> {
        let mut writer =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        let mut header: Vec<String> = [
            "position",
            "id",
            "answered_by",
            "prediction",
            "llm_label",
            "gold",
        ]
        .map(String::from)
        .to_vec();
        header.extend(levels.iter().map(|name| format!("gate_{name}")));
        writer.write_record(&header)?;
        Ok(Self {
            writer,
            levels: levels.to_vec(),
        })
    }

    fn write(
        &mut self,
        position: usize,
        item: &Item,
        record: &ItemRecord,
        task: &Task,
    ) -> Result<()> {
        let label = |l: Option<usize>| l.map(|l| task.labels()[l].clone()).unwrap_or_default();
        let answered_by = match record.by {
            AnsweredBy::Level(j) => self.levels[j].clone(),
            AnsweredBy::Llm => "llm".into(),
        };
        let mut row = vec![
            position.to_string(),
            item.id.to_string(),
            answered_by,
            label(record.prediction),
            label(item.expert),
            label(item.gold),
        ];
        for j in 0..self.levels.len() {
            let gate = record.gate_outputs.get(j).copied().flatten();
            row.push(gate.map(|g| g.to_string()).unwrap_or_default());
        }
        self.writer.write_record(&row)?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.writer.flush()?;
        Ok(())
    }
}

fn print_table(data: &Path, s: &Summary) {
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.5}")).unwrap_or_else(|| "-".into());
    println!(
        "{}: {} items, {} LLM calls ({:.2}%), accuracy {} (LLM alone {}), agreement with LLM {}",
        data.display(),
        s.items,
        s.llm_calls,
        100.0 * s.llm_fraction,
        fmt(s.accuracy),
        fmt(s.llm_accuracy),
        fmt(s.agreement_with_llm)
    );
    if s.recall.is_some() {
        println!(
            "label 1: precision {}  recall {}  f1 {}",
            fmt(s.precision),
            fmt(s.recall),
            fmt(s.f1)
        );
    }
    println!(
        "{:<12} {:>9} {:>8} {:>9}",
        "answered by", "items", "share", "accuracy"
    );
    for level in &s.per_level {
        println!(
            "{:<12} {:>9} {:>7.2}% {:>9}",
            level.name,
            level.answered,
            100.0 * level.answered as f64 / s.items.max(1) as f64,
            fmt(level.accuracy)
        );
    }
}
