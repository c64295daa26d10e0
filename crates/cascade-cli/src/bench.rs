//! `cascade bench`: replay a recorded stream through a cascade (or a baseline).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cascade::config::{LevelConfig, StudentKind};
use cascade::student::build_student;
use cascade::{
    AnsweredBy, Budget, Cascade, CascadeConfig, Demonstration, Metrics, Outcome, Routing, Summary,
    Task,
};
use cascade_expert::{read_labels, Dataset, Item, StreamOrder};
use clap::{Args, ValueEnum};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Dataset folder (stream.jsonl.zst, labels.txt, split_test_ids.txt).
    #[arg(long)]
    data: PathBuf,
    /// `test` (split_test_ids.txt, in order), `all` (file order), or a file of ids.
    #[arg(long, default_value = "test")]
    stream: String,
    /// Replay only the first N items of the stream.
    #[arg(long)]
    limit: Option<usize>,
    /// The recorded answer field that plays the LLM.
    #[arg(long, default_value = "gpt35")]
    expert_field: String,
    /// Cascade config (TOML). Not needed for `--baseline llm-only`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Task preset (imdb, hatespeech, isear, fever) or task file (tasks/*.toml).
    /// Default: the dataset folder's name if it is a preset, else label names
    /// from labels.txt.
    #[arg(long)]
    task: Option<String>,
    /// Overrides the config's mu (larger: fewer LLM calls).
    #[arg(long)]
    mu: Option<f64>,
    /// End the run with this many LLM calls, warm-up included, by pricing
    /// deferral online. Overrides the config's `llm_budget`/`llm_rate`. For
    /// `--baseline distilled`: how many train-half items the LLM labels.
    #[arg(long, conflicts_with = "llm_rate")]
    llm_budget: Option<u64>,
    /// Spend this share of the items on the LLM (for streams of unknown length).
    #[arg(long)]
    llm_rate: Option<f64>,
    /// Overrides the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run a baseline instead of the gated cascade.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Online ensemble: each level's fixed probability of answering (one value
    /// for all levels, or one per level, comma-separated). Ignored under a budget,
    /// which sets them.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    route_prob: Vec<f64>,
    /// Distilled baseline: the config level to distil (its name). Default: the last.
    #[arg(long)]
    level: Option<String>,
    /// Distilled baseline: passes over the LLM-labelled train items.
    #[arg(long, default_value_t = 3)]
    distill_epochs: usize,
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

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// Every item goes to the LLM.
    LlmOnly,
    /// The same online students with fixed routing probabilities and no gates.
    OnlineEnsemble,
    /// One student trained offline on the LLM's labels of the first
    /// `--llm-budget` items of split_train_ids.txt, then alone on the stream.
    Distilled,
}

/// One replay: what `cascade bench` runs and `cascade reproduce` runs many of.
#[derive(Clone, Debug)]
pub struct Replay {
    pub data: PathBuf,
    pub stream: String,
    pub limit: Option<usize>,
    pub expert_field: String,
    pub config: Option<PathBuf>,
    pub task: Option<String>,
    pub mu: Option<f64>,
    pub llm_budget: Option<u64>,
    pub llm_rate: Option<f64>,
    pub seed: Option<u64>,
    pub baseline: Option<Baseline>,
    pub route_prob: Vec<f64>,
    pub level: Option<String>,
    pub distill_epochs: usize,
    pub log: Option<PathBuf>,
    pub models: PathBuf,
}

impl Replay {
    /// A gated-cascade replay of the test stream with defaults for the rest.
    pub fn new(data: PathBuf, config: Option<PathBuf>, models: PathBuf) -> Self {
        Self {
            data,
            stream: "test".into(),
            limit: None,
            expert_field: "gpt35".into(),
            config,
            task: None,
            mu: None,
            llm_budget: None,
            llm_rate: None,
            seed: None,
            baseline: None,
            route_prob: vec![0.5],
            level: None,
            distill_epochs: 3,
            log: None,
            models,
        }
    }
}

impl From<&BenchArgs> for Replay {
    fn from(a: &BenchArgs) -> Self {
        Self {
            data: a.data.clone(),
            stream: a.stream.clone(),
            limit: a.limit,
            expert_field: a.expert_field.clone(),
            config: a.config.clone(),
            task: a.task.clone(),
            mu: a.mu,
            llm_budget: a.llm_budget,
            llm_rate: a.llm_rate,
            seed: a.seed,
            baseline: a.baseline,
            route_prob: a.route_prob.clone(),
            level: a.level.clone(),
            distill_epochs: a.distill_epochs,
            log: a.log.clone(),
            models: a.models.clone(),
        }
    }
}

/// Who answered within one window of the stream, and the accuracy so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Window {
    /// Items routed up to the end of this window.
    pub end: u64,
    /// Items answered in this window by each level, then the LLM.
    pub answered: Vec<u64>,
    /// Accuracy of all answers up to the end of this window.
    pub running_accuracy: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub dataset: String,
    pub stream: String,
    #[serde(default)]
    pub limit: Option<usize>,
    pub expert_field: String,
    pub config: Option<String>,
    pub baseline: Option<Baseline>,
    pub mu: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The budget controller's final price (log-odds of the answer threshold).
    #[serde(default)]
    pub budget_price: Option<f64>,
    /// Items a student answered because the budget was spent.
    #[serde(default)]
    pub forced_answers: Option<u64>,
    /// Items the LLM answered because only they could reach the budget.
    #[serde(default)]
    pub forced_deferrals: Option<u64>,
    /// LLM calls spent before the stream (the distilled baseline's train labels).
    #[serde(default)]
    pub offline_llm_calls: u64,
    #[serde(flatten)]
    pub summary: Summary,
    /// Who answered over the stream, in windows of equal length.
    #[serde(default)]
    pub timeline: Vec<Window>,
    pub wall_seconds: f64,
}

impl Report {
    /// Every LLM call the run paid for, on the stream and before it.
    pub fn total_llm_calls(&self) -> u64 {
        self.summary.llm_calls + self.offline_llm_calls
    }
}

/// Windows per timeline.
const TIMELINE_WINDOWS: usize = 50;

pub fn run(args: &BenchArgs) -> Result<()> {
    let report = replay(&Replay::from(args), true)?;
    if let Some(path) = &args.summary {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs one replay and prints its table when `print` is set.
pub fn replay(spec: &Replay, print: bool) -> Result<Report> {
    let started = Instant::now();
    let task = load_task(&spec.data, spec.task.as_deref())?;
    let dataset = Dataset::load(&spec.data, &task, &spec.expert_field)?;
    let mut stream = dataset.stream(&StreamOrder::parse(&spec.stream))?;
    if let Some(limit) = spec.limit {
        stream.truncate(limit);
    }
    if stream.is_empty() {
        bail!("the stream `{}` has no items", spec.stream);
    }
    let (answerers, offline_calls) = match spec.baseline {
        Some(Baseline::LlmOnly) => (Answerers::Llm, 0),
        Some(Baseline::Distilled) => {
            let (student, calls) = distil(spec, &task, &dataset, &stream)?;
            (Answerers::Alone(student), calls)
        }
        _ => (
            Answerers::Cascade(Box::new(build_cascade(spec, &task, &stream)?)),
            0,
        ),
    };
    let mut answerers = answerers;
    let level_names = answerers.level_names();
    let mut metrics = Metrics::new(level_names.clone(), task.num_labels());
    let mut log = match &spec.log {
        Some(path) => Some(ItemLog::create(path, &level_names)?),
        None => None,
    };
    let window = stream.len().div_ceil(TIMELINE_WINDOWS);
    let mut timeline = Vec::new();
    let mut in_window = vec![0u64; level_names.len() + 1];

    let mut progress = Progress::new(stream.len() as u64, "items");
    for (position, item) in stream.iter().enumerate() {
        let record = answerers.answer(item)?;
        metrics.record(record.by, record.prediction, item.gold, Some(item.expert));
        in_window[match record.by {
            AnsweredBy::Level(j) => j,
            AnsweredBy::Llm => level_names.len(),
        }] += 1;
        if (position + 1) % window == 0 || position + 1 == stream.len() {
            timeline.push(Window {
                end: position as u64 + 1,
                answered: std::mem::replace(&mut in_window, vec![0; level_names.len() + 1]),
                running_accuracy: metrics.summary().accuracy,
            });
        }
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
    if print {
        print_table(&spec.data, &summary);
        if offline_calls > 0 {
            println!("plus {offline_calls} LLM calls to label the distilled student's train items");
        }
    }
    let cascade = match &answerers {
        Answerers::Cascade(c) => Some(c),
        _ => None,
    };
    let report = Report {
        dataset: spec.data.display().to_string(),
        stream: spec.stream.clone(),
        limit: spec.limit,
        expert_field: spec.expert_field.clone(),
        config: spec.config.as_ref().map(|p| p.display().to_string()),
        baseline: spec.baseline,
        mu: cascade.map(|c| c.mu()),
        seed: spec.seed,
        budget: cascade.and_then(|c| c.budget()).map(|b| b.budget()),
        budget_price: cascade.and_then(|c| c.budget()).map(|b| b.price()),
        forced_answers: cascade.and_then(|c| c.budget()).map(|b| b.forced_answers()),
        forced_deferrals: cascade
            .and_then(|c| c.budget())
            .map(|b| b.forced_deferrals()),
        offline_llm_calls: offline_calls,
        summary,
        timeline,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    if print {
        println!("wall time: {:.2} s", report.wall_seconds);
    }
    Ok(report)
}

/// Who answers the stream's items.
enum Answerers {
    Llm,
    Cascade(Box<Cascade>),
    /// A distilled student answers everything.
    Alone(Box<dyn cascade::Student>),
}

impl Answerers {
    fn level_names(&self) -> Vec<String> {
        match self {
            Self::Llm => Vec::new(),
            Self::Cascade(c) => c.level_names().iter().map(|s| s.to_string()).collect(),
            Self::Alone(student) => vec![student.name().to_string()],
        }
    }

    fn answer(&mut self, item: &Item) -> Result<ItemRecord> {
        Ok(match self {
            Self::Llm => ItemRecord::llm(item),
            Self::Cascade(cascade) => step(cascade, item)?,
            Self::Alone(student) => {
                let probs = student.predict_proba(&[&item.text])?;
                ItemRecord {
                    by: AnsweredBy::Level(0),
                    prediction: probs.first().map(|p| cascade::gate::argmax(p)),
                    gate_outputs: Vec::new(),
                }
            }
        })
    }
}

fn read_config(spec: &Replay) -> Result<(CascadeConfig, &Path)> {
    let path = spec
        .config
        .as_deref()
        .context("--config is required unless --baseline llm-only")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        CascadeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    if let Some(mu) = spec.mu {
        config.mu = mu;
    }
    if let Some(seed) = spec.seed {
        config.seed = seed;
    }
    // A budget on the command line replaces the config's, whichever kind.
    if spec.llm_budget.is_some() || spec.llm_rate.is_some() {
        config.llm_budget = spec.llm_budget;
        config.llm_rate = spec.llm_rate;
    }
    config
        .validate()
        .with_context(|| format!("{} with the command line's settings", path.display()))?;
    for level in &mut config.levels {
        level.resolve_model(&spec.models);
    }
    Ok((config, path))
}

fn build_cascade(spec: &Replay, task: &Task, stream: &[&Item]) -> Result<Cascade> {
    let (config, path) = read_config(spec)?;
    let routing = match spec.baseline {
        Some(Baseline::OnlineEnsemble) => {
            let levels = config.levels.len();
            let probs = match spec.route_prob.as_slice() {
                [p] => vec![*p; levels],
                many => many.to_vec(),
            };
            Routing::Fixed(probs)
        }
        _ => Routing::Gated,
    };
    let mut cascade = Cascade::new(&config, task.num_labels(), routing)
        .with_context(|| format!("in {}", path.display()))?;
    let budget = match (config.llm_budget, config.llm_rate) {
        (Some(calls), _) => Some(Budget::Calls {
            calls,
            stream_length: stream.len() as u64,
        }),
        (None, Some(rate)) => Some(Budget::Rate(rate)),
        (None, None) => None,
    };
    if let Some(budget) = budget {
        cascade.set_budget(budget, config.budget_step, config.budget_pacing);
    }
    let corpus: Vec<&str> = stream.iter().map(|item| item.text.as_str()).collect();
    cascade.prefit(&corpus);
    if config.levels.iter().any(uses_embedding_cache) {
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

fn uses_embedding_cache(level: &LevelConfig) -> bool {
    level.kind == StudentKind::EmbeddingHead
}

/// The distilled baseline: trains one configured student offline on the LLM's
/// labels of the first `llm_budget` items of split_train_ids.txt (items the
/// LLM gave no label teach nothing but were still paid for), in a seeded
/// shuffled order per epoch. IDF statistics see the train texts only.
fn distil(
    spec: &Replay,
    task: &Task,
    dataset: &Dataset,
    stream: &[&Item],
) -> Result<(Box<dyn cascade::Student>, u64)> {
    let calls = spec
        .llm_budget
        .context("--baseline distilled needs --llm-budget N (train items the LLM labels)")?;
    let (config, path) = read_config(spec)?;
    let level = match &spec.level {
        Some(name) => config
            .levels
            .iter()
            .find(|l| &l.name() == name)
            .with_context(|| format!("{} has no level named `{name}`", path.display()))?,
        None => config.levels.last().context("config has no levels")?,
    };
    let train_ids = spec.data.join("split_train_ids.txt");
    let train = dataset.stream(&StreamOrder::Ids(train_ids.clone()))?;
    if (train.len() as u64) < calls {
        bail!(
            "{} lists {} items, fewer than the {calls} to distil from",
            train_ids.display(),
            train.len()
        );
    }
    let train = &train[..calls as usize];
    let mut student = build_student(level, task.num_labels(), config.seed)?;
    let texts: Vec<&str> = train.iter().map(|i| i.text.as_str()).collect();
    for text in &texts {
        student.observe(text);
    }
    if uses_embedding_cache(level) {
        let all: Vec<&str> = texts
            .iter()
            .copied()
            .chain(stream.iter().map(|i| i.text.as_str()))
            .collect();
        let mut progress = Progress::new(all.len() as u64, "texts embedded");
        for chunk in all.chunks(512) {
            student.precompute(chunk)?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
    }
    let mut demos: Vec<Demonstration> = train
        .iter()
        .filter_map(|item| {
            item.expert.map(|label| Demonstration {
                text: &item.text,
                label,
            })
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let batch = level.batch();
    let mut progress = Progress::new(
        (spec.distill_epochs * demos.len()) as u64,
        "distillation examples",
    );
    for _ in 0..spec.distill_epochs {
        demos.shuffle(&mut rng);
        for chunk in demos.chunks(batch) {
            student.learn(chunk)?;
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish();
    Ok((student, calls))
}

/// The task: an explicit preset, the folder's preset, or label names from labels.txt.
fn load_task(data: &Path, name: Option<&str>) -> Result<Task> {
    let labels = read_labels(data)?;
    let folder = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let task = match name {
        Some(name) => Task::load(name)?,
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
