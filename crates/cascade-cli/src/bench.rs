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
use cascade_expert::local::DEFAULT_MODEL;
use cascade_expert::{read_labels, Dataset, Item, LocalConfig, LocalExpert, StreamOrder};
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
    /// Who plays the LLM: the recorded answers (`--expert-field`), or a local
    /// GGUF model run live on every deferred item.
    #[arg(long, value_enum, default_value = "recorded")]
    expert: ExpertKind,
    /// Local expert: the GGUF file. Default: the Gemma 3 270M that
    /// scripts/setup.sh fetches into the models folder.
    #[arg(long)]
    local_model: Option<PathBuf>,
    /// Local expert: texts are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    max_text_tokens: usize,
    /// Local expert: response cache. An LLM-only run fills it; a cascade run
    /// reads it after the stream (off the clock) to report agreement with the
    /// expert alone on every item. Deferred items are always computed live.
    #[arg(long)]
    expert_cache: Option<PathBuf>,
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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ExpertKind {
    /// The dataset's recorded LLM answers.
    Recorded,
    /// A local GGUF model (Gemma 3), run on the CPU.
    Local,
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
    /// A local model plays the LLM instead of the recorded answers.
    pub local_expert: Option<LocalConfig>,
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
            local_expert: None,
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
            local_expert: (a.expert == ExpertKind::Local).then(|| LocalConfig {
                model: a
                    .local_model
                    .clone()
                    .unwrap_or_else(|| default_local_model(&a.models)),
                max_text_tokens: a.max_text_tokens,
                cache: a.expert_cache.clone(),
            }),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_expert: Option<LiveExpertReport>,
    #[serde(flatten)]
    pub summary: Summary,
    /// Who answered over the stream, in windows of equal length.
    #[serde(default)]
    pub timeline: Vec<Window>,
    pub wall_seconds: f64,
}

/// What a live expert cost in a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LiveExpertReport {
    pub model: String,
    /// Prompts the model ran on the stream (the run's LLM calls).
    pub prompts: u64,
    pub prompt_tokens: u64,
    /// Time inside the model on the stream.
    pub model_seconds: f64,
    pub prompt_tokens_per_second: f64,
    pub labels_per_second: f64,
    /// Items whose expert-alone label came from the response cache, or was
    /// computed after the stream, to measure agreement.
    pub reference_items: u64,
    pub peak_rss_mb: f64,
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
    // A live expert needs the task file's prompt, which the built-in presets lack.
    let task_name = match (&spec.task, &spec.local_expert) {
        (None, Some(_)) => task_file_for(&spec.data),
        (name, _) => name.clone(),
    };
    let task = load_task(&spec.data, task_name.as_deref())?;
    let dataset = Dataset::load(&spec.data, &task, &spec.expert_field)?;
    let mut stream = dataset.stream(&StreamOrder::parse(&spec.stream))?;
    if let Some(limit) = spec.limit {
        stream.truncate(limit);
    }
    if stream.is_empty() {
        bail!("the stream `{}` has no items", spec.stream);
    }
    let teacher = match &spec.local_expert {
        None => Teacher::Recorded,
        Some(config) => {
            if spec.baseline == Some(Baseline::Distilled) {
                bail!("--baseline distilled trains on recorded labels; it does not run with --expert local");
            }
            let expert = LocalExpert::load(config, task.clone())
                .with_context(|| format!("loading the local expert {}", config.model.display()))?;
            Teacher::Local(Box::new(expert))
        }
    };
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

    let mut predictions = Vec::with_capacity(stream.len());
    let mut progress = Progress::new(stream.len() as u64, "items");
    for (position, item) in stream.iter().enumerate() {
        let record = answerers.answer(item, &teacher)?;
        metrics.record(
            record.by,
            record.prediction,
            item.gold,
            teacher.recorded_label(item),
        );
        predictions.push((record.by, record.prediction));
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

    let mut summary = metrics.summary();
    let wall_seconds = started.elapsed().as_secs_f64();
    let live_expert = match &teacher {
        Teacher::Recorded => None,
        Teacher::Local(expert) => Some(measure_local_expert(
            expert,
            spec,
            &stream,
            &predictions,
            &mut summary,
        )?),
    };
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
        live_expert,
        summary,
        timeline,
        wall_seconds,
    };
    if print {
        if let Some(live) = &report.live_expert {
            print_live_expert(live, &report.summary);
        }
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

    fn answer(&mut self, item: &Item, teacher: &Teacher) -> Result<ItemRecord> {
        Ok(match self {
            Self::Llm => ItemRecord {
                by: AnsweredBy::Llm,
                prediction: teacher.ask(item)?,
                gate_outputs: Vec::new(),
            },
            Self::Cascade(cascade) => step(cascade, item, teacher)?,
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

/// Who plays the LLM for deferred items.
enum Teacher {
    /// The recorded answers of `--expert-field`.
    Recorded,
    /// A local model, run live.
    Local(Box<LocalExpert>),
}

impl Teacher {
    /// The LLM's label for an item sent to it (paid for).
    fn ask(&self, item: &Item) -> Result<Option<usize>> {
        match self {
            Self::Recorded => Ok(item.expert),
            Self::Local(expert) => Ok(Some(expert.label_now(&item.text, false)?.label)),
        }
    }

    /// The LLM's label for metrics, when known without paying for it.
    fn recorded_label(&self, item: &Item) -> Option<Option<usize>> {
        match self {
            Self::Recorded => Some(item.expert),
            Self::Local(_) => None,
        }
    }
}

/// Routes one item; a deferred item is answered at once by the LLM.
fn step(cascade: &mut Cascade, item: &Item, teacher: &Teacher) -> Result<ItemRecord> {
    let routed = cascade.route(&item.text)?;
    let (by, prediction) = match routed.outcome {
        Outcome::Answered { level, label } => (AnsweredBy::Level(level), Some(label)),
        Outcome::Deferred(deferred) => {
            let label = teacher.ask(item)?;
            cascade.learn(deferred, label)?;
            (AnsweredBy::Llm, label)
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

/// `tasks/<dataset folder>.toml`, when it exists.
fn task_file_for(data: &Path) -> Option<String> {
    let folder = data.file_name()?.to_string_lossy();
    let path = Path::new("tasks").join(format!("{folder}.toml"));
    path.is_file().then(|| path.display().to_string())
}

fn default_local_model(models: &Path) -> PathBuf {
    models.join(
        Path::new(DEFAULT_MODEL)
            .strip_prefix("models")
            .unwrap_or(Path::new(DEFAULT_MODEL)),
    )
}

/// The local expert's cost on the stream and, where its label of every item
/// is known (an LLM-only run, or a cascade run with `--expert-cache` after an
/// LLM-only run filled it), the expert alone's accuracy and the run's
/// agreement with it. Labels missing from the cache are computed here, after
/// the stream and outside its wall time.
fn measure_local_expert(
    expert: &LocalExpert,
    spec: &Replay,
    stream: &[&Item],
    predictions: &[(AnsweredBy, Option<usize>)],
    summary: &mut Summary,
) -> Result<LiveExpertReport> {
    let compute = expert.compute_time();
    let peak_rss_mb = crate::bench_encoder::peak_rss_mb();
    let has_cache = spec
        .local_expert
        .as_ref()
        .is_some_and(|c| c.cache.is_some());
    let all_deferred = predictions.iter().all(|(by, _)| *by == AnsweredBy::Llm);
    let mut reference_items = 0;
    if has_cache || all_deferred {
        let mut progress = Progress::new(stream.len() as u64, "expert-alone labels");
        let (mut agree, mut expert_correct, mut with_gold) = (0u64, 0u64, 0u64);
        // The expert alone on the items the students answered.
        let (mut student_items_correct, mut student_items_with_gold) = (0u64, 0u64);
        for (item, (by, prediction)) in stream.iter().zip(predictions) {
            let reference = match by {
                AnsweredBy::Llm => *prediction,
                AnsweredBy::Level(_) => {
                    reference_items += 1;
                    Some(expert.label_now(&item.text, true)?.label)
                }
            };
            agree += u64::from(reference == *prediction);
            if let Some(gold) = item.gold {
                with_gold += 1;
                expert_correct += u64::from(reference == Some(gold));
                if *by != AnsweredBy::Llm {
                    student_items_with_gold += 1;
                    student_items_correct += u64::from(reference == Some(gold));
                }
            }
            progress.inc(1);
        }
        progress.finish();
        summary.agreement_with_llm = Some(agree as f64 / stream.len().max(1) as f64);
        summary.llm_accuracy = (with_gold > 0).then(|| expert_correct as f64 / with_gold as f64);
        summary.llm_accuracy_on_student_items = (student_items_with_gold > 0)
            .then(|| student_items_correct as f64 / student_items_with_gold as f64);
    }
    let seconds = compute.elapsed.as_secs_f64();
    let per_second = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    Ok(LiveExpertReport {
        model: spec
            .local_expert
            .as_ref()
            .map(|c| c.model.display().to_string())
            .unwrap_or_default(),
        prompts: compute.prompts,
        prompt_tokens: compute.prompt_tokens,
        model_seconds: seconds,
        prompt_tokens_per_second: per_second(compute.prompt_tokens),
        labels_per_second: per_second(compute.prompts),
        reference_items,
        peak_rss_mb,
    })
}

fn print_live_expert(live: &LiveExpertReport, summary: &Summary) {
    println!(
        "local expert {}: {} prompts, {} prompt tokens in {:.1} s ({:.0} tokens/s, {:.2} labels/s), peak RSS {:.0} MB",
        live.model,
        live.prompts,
        live.prompt_tokens,
        live.model_seconds,
        live.prompt_tokens_per_second,
        live.labels_per_second,
        live.peak_rss_mb
    );
    if summary.agreement_with_llm.is_none() {
        println!("agreement with the expert alone: not measured (give --expert-cache filled by an LLM-only run)");
    } else if live.reference_items > 0 {
        println!(
            "agreement and LLM-alone accuracy use the expert's labels of {} student-answered items, from --expert-cache or computed after the stream",
            live.reference_items
        );
    }
}
