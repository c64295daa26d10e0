//! Replays of a recorded stream (`cascade bench`, and each run of the grid):
//! the cascade, driven by the runtime's pipeline with one call in flight, or
//! a baseline, scored against gold and the recorded LLM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cascade::config::{LevelConfig, StudentKind};
use cascade::{AnsweredBy, Budget, CascadeConfig, Metrics, Routing, Summary};
use cascade_expert::Task;
use cascade_expert::{
    read_labels, Dataset, Expert, Item, LocalConfig, LocalExpert, Query, RecordedExpert,
    StreamOrder,
};
use cascade_runtime::progress::Progress;
use cascade_runtime::{
    build, load_config, session_options, OnExpertFailure, Overrides, Pipeline, Session,
    SessionOptions, Settled,
};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::distil::distil;
use super::item_log::{print_table, ItemLog};
use super::local_cost::{measure_local_expert, print_live_expert};

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
pub struct ReplaySpec {
    pub data: PathBuf,
    pub stream: String,
    pub limit: Option<usize>,
    pub expert_field: String,
    /// From this stream position on, another recorded field plays the LLM
    /// (the user switched LLM or prompt mid-stream).
    pub expert_switch: Option<(usize, String)>,
    /// Share of student answers also sent to the LLM (`None`: none, or a
    /// target's default).
    pub audit_rate: Option<f64>,
    pub no_drift_recovery: bool,
    pub hard_labels: bool,
    pub soft_label_weight: Option<f64>,
    /// A local model plays the LLM instead of the recorded answers.
    pub local_expert: Option<LocalConfig>,
    pub config: Option<PathBuf>,
    pub task: Option<String>,
    pub mu: Option<f64>,
    pub llm_budget: Option<u64>,
    pub llm_rate: Option<f64>,
    pub target_agreement: Option<f64>,
    pub confidence: Option<f64>,
    pub seed: Option<u64>,
    pub baseline: Option<Baseline>,
    pub route_prob: Vec<f64>,
    pub level: Option<String>,
    pub distill_epochs: usize,
    pub log: Option<PathBuf>,
    pub models: PathBuf,
    /// When the LLM gives no label: by default (`Error`) an LLM answer
    /// without a label, as in the paper's accounting.
    pub on_failure: OnExpertFailure,
    /// No per-item progress (the grid and the selection report each run).
    pub quiet: bool,
}

impl ReplaySpec {
    /// A gated-cascade replay of the test stream with defaults for the rest.
    pub fn new(data: PathBuf, config: Option<PathBuf>, models: PathBuf) -> Self {
        Self {
            data,
            stream: "test".into(),
            limit: None,
            expert_field: "gpt35".into(),
            expert_switch: None,
            audit_rate: None,
            no_drift_recovery: false,
            hard_labels: false,
            soft_label_weight: None,
            local_expert: None,
            config,
            task: None,
            mu: None,
            llm_budget: None,
            llm_rate: None,
            target_agreement: None,
            confidence: None,
            seed: None,
            baseline: None,
            route_prob: vec![0.5],
            level: None,
            distill_epochs: 3,
            log: None,
            models,
            on_failure: OnExpertFailure::Error,
            quiet: false,
        }
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            mu: self.mu,
            seed: self.seed,
            llm_budget: self.llm_budget,
            llm_rate: self.llm_rate,
            target_agreement: self.target_agreement,
            confidence: self.confidence,
            no_drift_recovery: self.no_drift_recovery,
            hard_labels: self.hard_labels,
            soft_label_weight: self.soft_label_weight,
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
    /// Student answers also sent to the LLM (audits): LLM calls beside
    /// `llm_calls`, which counts the items the LLM answered.
    #[serde(default)]
    pub audits: u64,
    /// The agreement target, and the anytime-valid bound on the stream's
    /// agreement with the LLM at the end.
    #[serde(default)]
    pub target_agreement: Option<f64>,
    #[serde(default)]
    pub agreement_bound: Option<f64>,
    /// (items, agreement with the recorded LLM so far) every
    /// [`AGREEMENT_CHECK_EVERY`] items and at the end.
    #[serde(default)]
    pub agreement_checks: Vec<(u64, f64)>,
    /// (items, the agreement target's lower bound) every 100 items.
    #[serde(default)]
    pub bound_checks: Vec<(u64, f64)>,
    /// Items an agreement target sent to the LLM because its bound allowed
    /// no student answer.
    #[serde(default)]
    pub target_holds: Option<u64>,
    /// Items after which audits showed a change and the cascade re-opened.
    #[serde(default)]
    pub reopened: Vec<u64>,
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
    /// Every LLM call the run paid for, on the stream (audits included) and before it.
    pub fn total_llm_calls(&self) -> u64 {
        self.summary.llm_calls + self.audits + self.offline_llm_calls
    }
}

/// Items between two checks of the realized agreement with the LLM.
pub const AGREEMENT_CHECK_EVERY: usize = 500;

/// Windows per timeline.
const TIMELINE_WINDOWS: usize = 50;

/// The texts of the spec's stream, in order (limit applied).
pub fn stream_texts(spec: &ReplaySpec) -> Result<Vec<String>> {
    let task = load_task(&spec.data, spec.task.as_deref())?;
    let dataset = Dataset::load(&spec.data, &task, &spec.expert_field)?;
    let stream = dataset.stream(&StreamOrder::parse(&spec.stream))?;
    Ok(stream
        .iter()
        .take(spec.limit.unwrap_or(usize::MAX))
        .map(|item| item.text.clone())
        .collect())
}

/// Runs one replay and prints its table when `print` is set.
pub fn replay(spec: &ReplaySpec, print: bool) -> Result<Report> {
    let started = Instant::now();
    // A live expert needs the task file's prompt, which the built-in presets lack.
    let task_name = match (&spec.task, &spec.local_expert) {
        (None, Some(_)) => task_file_for(&spec.data),
        (name, _) => name.clone(),
    };
    let task = load_task(&spec.data, task_name.as_deref())?;
    let mut dataset = Dataset::load(&spec.data, &task, &spec.expert_field)?;
    if let Some((position, field)) = &spec.expert_switch {
        let switched = Dataset::load(&spec.data, &task, field)?;
        let ids: Vec<u64> = dataset
            .stream(&StreamOrder::parse(&spec.stream))?
            .iter()
            .skip(*position)
            .map(|item| item.id)
            .collect();
        dataset.take_expert_from(&switched, &ids);
    }
    let mut stream = dataset.stream(&StreamOrder::parse(&spec.stream))?;
    if let Some(limit) = spec.limit {
        stream.truncate(limit);
    }
    if stream.is_empty() {
        bail!("the stream `{}` has no items", spec.stream);
    }
    let (expert, local): (Arc<dyn Expert>, Option<LocalExpert>) = match &spec.local_expert {
        None => (
            Arc::new(RecordedExpert::new(&dataset, Duration::ZERO)),
            None,
        ),
        Some(config) => {
            if spec.baseline == Some(Baseline::Distilled) {
                bail!("--baseline distilled trains on recorded labels; it does not run with --expert local");
            }
            // Deferred items are computed live, to measure the model's cost,
            // unless the caller asked for the cache's answers.
            let config = config.clone();
            let expert = LocalExpert::load(&config, task.clone())
                .with_context(|| format!("loading the local expert {}", config.model.display()))?;
            (Arc::new(expert.clone()), Some(expert))
        }
    };
    let runtime = cascade_runtime::async_runtime()?;
    let (mut answerers, offline_calls) = match spec.baseline {
        Some(Baseline::LlmOnly) => (Answerers::Llm, 0),
        Some(Baseline::Distilled) => {
            let (name, student, calls) = distil(spec, &task, &dataset, &stream)?;
            (Answerers::Alone(name, student), calls)
        }
        _ => {
            let session = build_session(spec, &task, &stream)?;
            let pipeline =
                Pipeline::new(session, expert.clone(), runtime.handle().clone(), 1, true)?;
            (Answerers::Cascade(Box::new(pipeline)), 0)
        }
    };
    let level_names = answerers.level_names();
    let mut metrics = Metrics::new(level_names.clone(), task.num_labels());
    let mut log = match &spec.log {
        Some(path) => Some(ItemLog::create(path, &level_names)?),
        None => None,
    };
    let window = stream.len().div_ceil(TIMELINE_WINDOWS);
    let mut timeline = Vec::new();
    let mut in_window = vec![0u64; level_names.len() + 1];
    // The LLM's label is known without a call when it is the recorded one.
    let recorded_llm = local.is_none();

    let (mut agreeing, mut agreement_checks) = (0u64, Vec::new());
    let mut predictions = Vec::with_capacity(stream.len());
    let mut progress = if spec.quiet {
        Progress::hidden()
    } else {
        Progress::new(stream.len() as u64, "items")
    };
    let mut position = 0;
    let mut score = |record: ItemRecord| -> Result<()> {
        let item = stream[position];
        metrics.record(
            record.by,
            record.prediction,
            item.gold,
            recorded_llm.then_some(item.expert),
        );
        if recorded_llm {
            agreeing += u64::from(record.prediction == item.expert);
            let seen = position + 1;
            if seen % AGREEMENT_CHECK_EVERY == 0 || seen == stream.len() {
                agreement_checks.push((seen as u64, agreeing as f64 / seen as f64));
            }
        }
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
        position += 1;
        Ok(())
    };
    let mut bound_checks = Vec::new();
    for (index, item) in stream.iter().enumerate() {
        for record in answerers.answer(index, item, &*expert, &runtime)? {
            score(record)?;
        }
        if (index + 1) % 100 == 0 {
            if let Answerers::Cascade(c) = &answerers {
                if let Some(target) = &c.session().counts().agreement {
                    bound_checks.push((index as u64 + 1, target.agreement_bound()));
                }
            }
        }
    }
    for record in answerers.finish()? {
        score(record)?;
    }
    progress.finish();
    if let Some(log) = log {
        log.finish()?;
    }

    let mut summary = metrics.summary();
    let wall_seconds = started.elapsed().as_secs_f64();
    let live_expert = match &local {
        None => None,
        Some(expert) => Some(measure_local_expert(
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
        Answerers::Cascade(c) => Some(c.session().cascade()),
        _ => None,
    };
    let budget = cascade.and_then(|c| c.budget());
    let counts = match &answerers {
        Answerers::Cascade(c) => Some(c.session().counts()),
        _ => None,
    };
    let target = counts.and_then(|c| c.agreement.as_ref());
    let report = Report {
        dataset: spec.data.display().to_string(),
        stream: spec.stream.clone(),
        limit: spec.limit,
        expert_field: spec.expert_field.clone(),
        config: spec.config.as_ref().map(|p| p.display().to_string()),
        baseline: spec.baseline,
        mu: cascade.map(|c| c.mu()),
        seed: spec.seed,
        budget: budget.map(|b| b.budget()),
        budget_price: budget.map(|b| b.price()),
        forced_answers: budget.map(|b| b.forced_answers()),
        forced_deferrals: budget.map(|b| b.forced_deferrals()),
        target_holds: budget.map(|b| b.held()).filter(|_| target.is_some()),
        offline_llm_calls: offline_calls,
        live_expert,
        summary,
        timeline,
        audits: counts.map_or(0, |c| c.audits),
        target_agreement: target.map(|t| t.target().agreement),
        agreement_bound: target.map(|t| t.agreement_bound()),
        agreement_checks,
        bound_checks,
        reopened: counts.map_or_else(Vec::new, |c| c.reopened.clone()),
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
    /// The cascade, one expert call in flight: each label is learned before
    /// the next item is routed.
    Cascade(Box<Pipeline>),
    /// A distilled student (its level's name) answers everything.
    Alone(String, Box<dyn cascade::Student>),
}

impl Answerers {
    fn level_names(&self) -> Vec<String> {
        match self {
            Self::Llm => Vec::new(),
            Self::Cascade(p) => p.session().level_names().to_vec(),
            Self::Alone(name, _) => vec![name.clone()],
        }
    }

    /// The records of the items settled by now, in stream order.
    fn answer(
        &mut self,
        index: usize,
        item: &Item,
        expert: &dyn Expert,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<Vec<ItemRecord>> {
        Ok(match self {
            Self::Llm => {
                let id = serde_json::json!(item.id);
                let answer = runtime.block_on(expert.label(Query {
                    id: &id,
                    text: &item.text,
                }));
                vec![ItemRecord {
                    by: AnsweredBy::Llm,
                    prediction: answer.ok().map(|a| a.label),
                    probability: None,
                    gate_outputs: Vec::new(),
                }]
            }
            Self::Cascade(pipeline) => {
                pipeline.push(index + 1, item.id.into(), Ok(&item.text))?;
                pipeline
                    .take_ready()
                    .into_iter()
                    .map(ItemRecord::from)
                    .collect()
            }
            Self::Alone(_, student) => {
                let probs = student.predict_proba(&[&item.text])?;
                let prediction = probs.first().map(|p| cascade::gate::argmax(p));
                vec![ItemRecord {
                    by: AnsweredBy::Level(0),
                    prediction,
                    probability: probs.first().zip(prediction).map(|(p, l)| p[l]),
                    gate_outputs: Vec::new(),
                }]
            }
        })
    }

    /// The records still in flight at the end of the stream.
    fn finish(&mut self) -> Result<Vec<ItemRecord>> {
        Ok(match self {
            Self::Cascade(pipeline) => {
                pipeline.settle_all()?;
                pipeline
                    .take_ready()
                    .into_iter()
                    .map(ItemRecord::from)
                    .collect()
            }
            _ => Vec::new(),
        })
    }
}

/// What happened to one item.
pub struct ItemRecord {
    pub by: AnsweredBy,
    pub prediction: Option<usize>,
    /// The answering student's probability of its answer (none for the LLM).
    pub probability: Option<f32>,
    pub gate_outputs: Vec<Option<f32>>,
}

impl From<cascade_runtime::Finished> for ItemRecord {
    fn from(done: cascade_runtime::Finished) -> Self {
        // The answering student's probabilities, where it gave them.
        let (by, prediction, probs) = match &done.settled {
            Settled::Student {
                level,
                label,
                probs,
            } => (AnsweredBy::Level(*level), Some(*label), probs.as_deref()),
            Settled::Fallback {
                level,
                label,
                probs,
                ..
            } => (AnsweredBy::Level(*level), Some(*label), Some(&probs[..])),
            Settled::Llm { label } => (AnsweredBy::Llm, Some(*label), None),
            // A corrected audit: its call is counted among the audits.
            Settled::Corrected { level, label, .. } => {
                (AnsweredBy::Level(*level), Some(*label), None)
            }
            // An LLM answer without a label: an LLM call, and an error.
            Settled::Failed { .. } | Settled::BadInput { .. } => (AnsweredBy::Llm, None, None),
        };
        let probability = prediction.zip(probs).and_then(|(l, p)| p.get(l).copied());
        Self {
            by,
            prediction,
            probability,
            gate_outputs: done.gate_outputs,
        }
    }
}

/// The replay's session: the cascade the config describes (through the
/// runtime's one build), the online ensemble's fixed routing, and the work
/// ahead of the stream that changes no decision.
fn build_session(spec: &ReplaySpec, task: &Task, stream: &[&Item]) -> Result<Session> {
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
    let mut cascade = build(
        &config,
        task.num_labels(),
        routing,
        Some(stream.len() as u64),
    )
    .with_context(|| format!("in {}", path.display()))?;
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
    // The paper's replays audit nothing unless asked (a target audits by default).
    let audit_rate = match spec.audit_rate {
        None if config.target_agreement.is_none() => 0.0,
        given => SessionOptions::audit_rate(given, &config)?,
    };
    let options = session_options(&config, audit_rate, spec.on_failure);
    Ok(Session::new(cascade, config.seed, options))
}

pub(super) fn read_config(spec: &ReplaySpec) -> Result<(CascadeConfig, &Path)> {
    let path = spec
        .config
        .as_deref()
        .context("--config is required unless --baseline llm-only")?;
    let config = load_config(path, &spec.overrides(), &spec.models)
        .with_context(|| format!("{} with the command line's settings", path.display()))?;
    Ok((config, path))
}

pub(super) fn uses_embedding_cache(level: &LevelConfig) -> bool {
    level.kind == StudentKind::EmbeddingHead
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

/// `tasks/<dataset folder>.toml`, when it exists.
fn task_file_for(data: &Path) -> Option<String> {
    let folder = data.file_name()?.to_string_lossy();
    let path = Path::new("tasks").join(format!("{folder}.toml"));
    path.is_file().then(|| path.display().to_string())
}
