//! What `cascade run` and `cascade serve` share: the expert that answers
//! deferred items, the run's counters, and checkpoints of the learner.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cascade::{Cascade, CascadeConfig, Task};
use cascade_expert::local::DEFAULT_MODEL;
use cascade_expert::{
    Dataset, Expert, LocalConfig, LocalExpert, OpenAiConfig, OpenAiExpert, StreamOrder, Usage,
};
use clap::{Args, ValueEnum};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Args, Debug, Clone)]
pub struct ExpertArgs {
    /// Who answers deferred items: `replay` (recorded answers, by item id),
    /// `local` (a GGUF model on this machine) or `openai` (an OpenAI-compatible API).
    #[arg(long, value_enum, default_value = "replay")]
    pub expert: ExpertKind,
    /// Replay expert: the data folder whose recorded answers play the LLM.
    #[arg(long)]
    pub replay_data: Option<PathBuf>,
    /// Replay expert: the recorded answer field.
    #[arg(long, default_value = "gpt35")]
    pub expert_field: String,
    /// Replay expert: delay per call in milliseconds (load and crash tests).
    #[arg(long, default_value_t = 0)]
    pub replay_delay_ms: u64,
    /// Local expert: the GGUF file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub local_model: PathBuf,
    /// Local expert: texts are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    pub max_text_tokens: usize,
    /// OpenAI expert: settings as TOML (the fields of the chat-completions expert).
    #[arg(long)]
    pub expert_config: Option<PathBuf>,
    /// OpenAI expert: endpoint, e.g. http://127.0.0.1:8080/v1 (overrides --expert-config).
    #[arg(long)]
    pub base_url: Option<String>,
    /// OpenAI expert: model name (overrides --expert-config).
    #[arg(long)]
    pub model: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ExpertKind {
    Replay,
    Local,
    Openai,
}

/// Who answers deferred items.
#[derive(Clone)]
pub enum LiveExpert {
    Replay {
        labels: Arc<HashMap<u64, Option<usize>>>,
        delay: Duration,
    },
    Local(Arc<LocalExpert>),
    OpenAi(Arc<OpenAiExpert>),
}

impl LiveExpert {
    pub fn build(args: &ExpertArgs, task: &Task) -> Result<Self> {
        Ok(match args.expert {
            ExpertKind::Replay => {
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
                Self::Replay {
                    labels: Arc::new(labels),
                    delay: Duration::from_millis(args.replay_delay_ms),
                }
            }
            ExpertKind::Local => {
                let config = LocalConfig {
                    model: args.local_model.clone(),
                    max_text_tokens: args.max_text_tokens,
                    cache: None,
                };
                let expert = LocalExpert::load(&config, task.clone()).with_context(|| {
                    format!("loading the local expert {}", args.local_model.display())
                })?;
                Self::Local(Arc::new(expert))
            }
            ExpertKind::Openai => {
                let config = openai_config(
                    args.expert_config.as_deref(),
                    args.base_url.as_deref(),
                    args.model.as_deref(),
                )?;
                Self::OpenAi(Arc::new(OpenAiExpert::new(config, task.clone())?))
            }
        })
    }

    /// The expert's label for an item, or why there is none (after the
    /// expert's own bounded retries).
    pub async fn ask(&self, id: &Value, text: &str) -> std::result::Result<usize, String> {
        match self {
            Self::Replay { labels, delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(*delay).await;
                }
                let key = id
                    .as_u64()
                    .or_else(|| id.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| format!("id {id} is not an item id of the replay data"))?;
                match labels.get(&key) {
                    Some(Some(label)) => Ok(*label),
                    Some(None) => Err("the recorded answer holds no label".into()),
                    None => Err(format!("id {key} is not in the replay data")),
                }
            }
            Self::Local(expert) => {
                // The forward pass is CPU-bound: keep it off the async workers.
                let (expert, text) = (Arc::clone(expert), text.to_string());
                tokio::task::spawn_blocking(move || expert.label_now(&text, true))
                    .await
                    .map_err(|e| format!("local expert task failed: {e}"))?
                    .map(|a| a.label)
                    .map_err(|e| e.to_string())
            }
            Self::OpenAi(expert) => expert
                .label(text)
                .await
                .map(|a| a.label)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn usage(&self) -> Usage {
        match self {
            Self::Replay { .. } => Usage::default(),
            Self::Local(expert) => expert.usage(),
            Self::OpenAi(expert) => expert.usage(),
        }
    }
}

/// The chat-completions expert's settings: a TOML file (the fields of
/// `OpenAiConfig`), with the endpoint and model given on the command line on top.
pub fn openai_config(
    file: Option<&Path>,
    base_url: Option<&str>,
    model: Option<&str>,
) -> Result<OpenAiConfig> {
    let mut config = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<OpenAiConfig>(&text)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => OpenAiConfig::new(
            base_url.context("--base-url is required (or --expert-config)")?,
            model.context("--model is required (or --expert-config)")?,
        ),
    };
    if let Some(v) = base_url {
        config.base_url = v.to_string();
    }
    if let Some(v) = model {
        config.model = v.to_string();
    }
    Ok(config)
}

/// The share of student answers audited: as given, or by default the deepest
/// level's floor of exploration, `1 − decaying_factor` (0.03 for the authors'
/// 0.97): where exploration fades, a small permanent share stays.
pub fn audit_rate(given: Option<f64>, config: &CascadeConfig) -> Result<f64> {
    let rate = match given {
        Some(rate) => rate,
        None => config
            .levels
            .last()
            .map_or(0.0, |level| 1.0 - level.gate.decaying_factor),
    };
    if !(0.0..=1.0).contains(&rate) {
        bail!("--audit-rate must be in [0, 1], got {rate}");
    }
    Ok(rate)
}

/// Reads, validates and resolves a cascade config; builds the cascade.
pub fn load_cascade(
    path: &Path,
    task: &Task,
    models: &Path,
) -> Result<(Cascade, CascadeConfig, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        CascadeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    config
        .validate()
        .with_context(|| format!("in {}", path.display()))?;
    for level in &mut config.levels {
        level.resolve_model(models);
    }
    let cascade = Cascade::new(&config, task.num_labels(), cascade::Routing::Gated)
        .with_context(|| format!("in {}", path.display()))?;
    Ok((cascade, config, text))
}

/// What to do when the expert gives no label.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum OnExpertFailure {
    /// The deepest student answers, with `status: "expert_unavailable"`.
    Student,
    /// The item gets an error record.
    Error,
}

/// How one item ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    Student {
        level: usize,
        label: usize,
        probs: Option<Vec<f32>>,
    },
    Llm {
        label: usize,
    },
    /// The expert gave no label; the deepest student answered.
    Fallback {
        level: usize,
        label: usize,
        probs: Vec<f32>,
        reason: String,
    },
    Failed {
        reason: String,
    },
    BadInput {
        reason: String,
    },
}

impl Settled {
    /// A deferred item once its expert call has ended: the label is learned,
    /// or on a failure the policy decides the answer.
    pub fn from_expert(
        cascade: &mut Cascade,
        deferred: cascade::Deferred,
        text: &str,
        answer: std::result::Result<usize, String>,
        policy: OnExpertFailure,
    ) -> Result<Self> {
        match answer {
            Ok(label) => {
                cascade.learn(deferred, Some(label))?;
                Ok(Self::Llm { label })
            }
            Err(reason) => Self::expert_failed(cascade, deferred, text, reason, policy),
        }
    }

    /// A deferred item whose expert call failed: the label (none) is handed
    /// to the cascade, then the failure policy decides the answer.
    fn expert_failed(
        cascade: &mut Cascade,
        deferred: cascade::Deferred,
        text: &str,
        reason: String,
        policy: OnExpertFailure,
    ) -> Result<Self> {
        cascade.learn(deferred, None)?;
        Ok(match policy {
            OnExpertFailure::Student => {
                let (level, probs) = cascade.fallback(text)?;
                Self::Fallback {
                    level,
                    label: cascade::gate::argmax(&probs),
                    probs,
                    reason,
                }
            }
            OnExpertFailure::Error => Self::Failed { reason },
        })
    }

    /// The output record (`line` is omitted when `None`).
    pub fn record(&self, line: Option<usize>, id: &Value, task: &Task, levels: &[String]) -> Value {
        let label = |l: &usize| json!(task.labels()[*l]);
        let (label, by, probs, status, error) = match self {
            Self::Student {
                level,
                label: l,
                probs,
            } => (label(l), json!(levels[*level]), json!(probs), "ok", None),
            Self::Llm { label: l } => (label(l), json!("llm"), Value::Null, "ok", None),
            Self::Fallback {
                level,
                label: l,
                probs,
                reason,
            } => (
                label(l),
                json!(levels[*level]),
                json!(probs),
                "expert_unavailable",
                Some(reason),
            ),
            Self::Failed { reason } => {
                (Value::Null, Value::Null, Value::Null, "error", Some(reason))
            }
            Self::BadInput { reason } => (
                Value::Null,
                Value::Null,
                Value::Null,
                "bad_input",
                Some(reason),
            ),
        };
        let mut record =
            json!({"id": id, "label": label, "answered_by": by, "probs": probs, "status": status});
        if let Some(line) = line {
            record["line"] = json!(line);
        }
        if let Some(error) = error {
            record["error"] = json!(error);
        }
        record
    }
}

/// The settings `run` and `serve` share: task, config, expert, state, policies.
#[derive(Args, Debug)]
pub struct SessionArgs {
    /// Task file with the prompt and parser (tasks/imdb.toml, ...), or a preset name.
    #[arg(long)]
    pub task: String,
    /// Cascade config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub expert: ExpertArgs,
    /// Checkpoint folder (`run`: needs file input and output).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Continue from the checkpoint in --state.
    #[arg(long, requires = "state")]
    pub resume: bool,
    /// When the expert gives no label: the deepest student answers
    /// (`status: "expert_unavailable"`), or the item gets an error record.
    #[arg(long, value_enum, default_value = "student")]
    pub on_expert_failure: OnExpertFailure,
    /// Share of student-answered items also sent to the expert, to estimate
    /// agreement with it without bias; they do not train the cascade.
    /// Default: 1 − the deepest level's decaying_factor.
    #[arg(long)]
    pub audit_rate: Option<f64>,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    pub models: PathBuf,
}

/// Where a run or a service starts: the cascade (restored from `--state`
/// when resuming), its expert, and the counters.
pub struct Start {
    pub task: Task,
    pub cascade: Cascade,
    pub expert: LiveExpert,
    pub level_names: Vec<String>,
    /// What a checkpoint must match (config, task, expert, audit rate).
    pub fingerprint: String,
    pub audit_rate: f64,
    pub counts: Counts,
    pub audit_rng: ChaCha8Rng,
    /// From the checkpoint: lines (or requests) done, output bytes.
    pub lines_done: u64,
    pub output_bytes: u64,
}

impl Start {
    /// `schedule`: whatever else the decisions depend on (run: calls in
    /// flight and checkpoint spacing); a checkpoint must match it too.
    pub fn new(args: &SessionArgs, schedule: &str) -> Result<Self> {
        let task = Task::load(&args.task)?;
        let (mut cascade, config, config_text) = load_cascade(&args.config, &task, &args.models)?;
        let audit_rate = self::audit_rate(args.audit_rate, &config)?;
        let fingerprint = fingerprint(&config_text, &task, &args.expert, audit_rate, schedule);
        let level_names: Vec<String> = cascade
            .level_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let expert = LiveExpert::build(&args.expert, &task)?;
        let mut counts = Counts::new(level_names.len());
        // Its own stream, so audits never move the cascade's coins.
        let mut audit_rng: ChaCha8Rng = rand::SeedableRng::seed_from_u64(config.seed ^ 0xa0d1);
        let (mut lines_done, mut output_bytes) = (0, 0);
        if let Some(saved) = open_state(
            args.state.as_deref(),
            args.resume,
            &fingerprint,
            &mut cascade,
        )? {
            counts = saved.counts;
            audit_rng = saved.audit_rng;
            lines_done = saved.lines_done;
            output_bytes = saved.output_bytes;
        }
        Ok(Self {
            task,
            cascade,
            expert,
            level_names,
            fingerprint,
            audit_rate,
            counts,
            audit_rng,
            lines_done,
            output_bytes,
        })
    }
}

/// Counters of a run or a service; checkpointed with it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counts {
    pub lines: u64,
    pub answered: Vec<u64>,
    pub llm: u64,
    pub bad_input: u64,
    pub expert_unavailable: u64,
    pub errors: u64,
    pub audits: u64,
    pub audit_agreements: u64,
}

impl Counts {
    pub fn new(levels: usize) -> Self {
        Self {
            answered: vec![0; levels],
            ..Self::default()
        }
    }

    pub fn add(&mut self, settled: &Settled) {
        self.lines += 1;
        match settled {
            Settled::Student { level, .. } => self.answered[*level] += 1,
            Settled::Llm { .. } => self.llm += 1,
            Settled::Fallback { .. } => self.expert_unavailable += 1,
            Settled::Failed { .. } => self.errors += 1,
            Settled::BadInput { .. } => self.bad_input += 1,
        }
    }

    /// An audited student answer and the expert's label for the same item.
    pub fn add_audit(&mut self, answer: &Settled, expert_label: usize) {
        if let Settled::Student { label, .. } = answer {
            self.audits += 1;
            self.audit_agreements += u64::from(*label == expert_label);
        }
    }

    pub fn status_line(&self) -> String {
        let items = self.lines - self.bad_input;
        let share = |n: u64| 100.0 * n as f64 / items.max(1) as f64;
        let mut line = format!(
            "{} lines: {} bad input, LLM {:.1}%, expert unavailable {}, errors {}",
            self.lines,
            self.bad_input,
            share(self.llm),
            self.expert_unavailable,
            self.errors
        );
        if let Some((p, half)) = self.audited_agreement() {
            line += &format!(
                "; audited agreement {p:.3} ± {half:.3} ({} audits)",
                self.audits
            );
        }
        line
    }

    /// Agreement with the LLM on audited items: Wilson 95% (centre, half-width).
    pub fn audited_agreement(&self) -> Option<(f64, f64)> {
        (self.audits > 0).then(|| wilson(self.audit_agreements, self.audits))
    }
}

/// Wilson score interval at 95%: (centre, half-width).
pub fn wilson(successes: u64, n: u64) -> (f64, f64) {
    let (n, p, z) = (n as f64, successes as f64 / n as f64, 1.96f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    (centre, half)
}

#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// Hash of the config, task and expert settings the state belongs to.
    pub fingerprint: String,
    /// Input lines fully handled (`run`), or requests served (`serve`).
    pub lines_done: u64,
    /// Output bytes after those lines' records (`run`).
    pub output_bytes: u64,
    pub counts: Counts,
    pub audit_rng: ChaCha8Rng,
    #[serde(with = "serde_bytes")]
    pub cascade: Vec<u8>,
}

pub const CHECKPOINT: &str = "checkpoint.cbor";

/// What a checkpoint must match to be resumed.
pub fn fingerprint(
    config_text: &str,
    task: &Task,
    expert: &ExpertArgs,
    audit_rate: f64,
    schedule: &str,
) -> String {
    let mut hash = Sha256::new();
    hash.update(config_text.as_bytes());
    hash.update(format!(
        "|{}|{:?}|{:?}|{:?}|{}|{:?}|{}",
        task.name(),
        task.labels(),
        expert.expert,
        expert.replay_data,
        expert.expert_field,
        expert.model,
        audit_rate
    ));
    hash.update(schedule.as_bytes());
    format!("{:x}", hash.finalize())
}

/// Opens `--state DIR` for a run or a service: refuses a checkpoint left there
/// without `--resume` (and `--resume` without one), restores the cascade from
/// it, and checks up front that this cascade can be checkpointed at all.
/// Returns the restored checkpoint, if any.
pub fn open_state(
    state: Option<&Path>,
    resume: bool,
    fingerprint: &str,
    cascade: &mut Cascade,
) -> Result<Option<Checkpoint>> {
    let Some(dir) = state else {
        return Ok(None);
    };
    let path = dir.join(CHECKPOINT);
    let saved = match (path.exists(), resume) {
        (true, false) => bail!(
            "{} holds a checkpoint: pass --resume to continue it, or remove it to start over",
            path.display()
        ),
        (false, true) => bail!("--resume: no checkpoint at {}", path.display()),
        (true, true) => {
            let saved = read_checkpoint(&path, fingerprint)?;
            cascade
                .load_state(&saved.cascade)
                .with_context(|| format!("restoring {}", path.display()))?;
            Some(saved)
        }
        (false, false) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            None
        }
    };
    // Fail now rather than at the first checkpoint.
    cascade
        .save_state()
        .context("--state: this cascade cannot be checkpointed")?;
    Ok(saved)
}

/// Reads a checkpoint and checks it belongs to this config.
pub fn read_checkpoint(path: &Path, fingerprint: &str) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let saved: Checkpoint = ciborium::from_reader(bytes.as_slice())
        .with_context(|| format!("{} is not a readable checkpoint", path.display()))?;
    if saved.fingerprint != fingerprint {
        bail!(
            "{} was written with another config, task or expert",
            path.display()
        );
    }
    Ok(saved)
}

/// Temp file, fsync, rename, fsync the folder: a crash leaves the old
/// checkpoint or the new one, never a torn one.
pub fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
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

    #[test]
    fn the_audit_rate_defaults_to_the_exploration_floor() {
        let config = CascadeConfig::from_toml(
            "mu = 1e-4\n[[levels]]\nkind = \"logreg\"\ncost = 1\ncache_size = 4\n[levels.gate]\ndecaying_factor = 0.97\ncalibration = 0.4\n",
        )
        .unwrap();
        assert!((audit_rate(None, &config).unwrap() - 0.03).abs() < 1e-12);
        assert_eq!(audit_rate(Some(0.5), &config).unwrap(), 0.5);
        assert!(audit_rate(Some(1.5), &config).is_err());
    }

    #[test]
    fn a_torn_or_foreign_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        std::fs::write(&path, b"\x00\x01torn").unwrap();
        let err = read_checkpoint(&path, "x").err().unwrap().to_string();
        assert!(err.contains("not a readable checkpoint"), "{err}");
        let checkpoint = Checkpoint {
            fingerprint: "a".into(),
            lines_done: 3,
            output_bytes: 10,
            counts: Counts::new(1),
            audit_rng: rand::SeedableRng::seed_from_u64(1),
            cascade: vec![1, 2, 3],
        };
        write_checkpoint(&path, &checkpoint).unwrap();
        assert_eq!(read_checkpoint(&path, "a").unwrap().lines_done, 3);
        let err = read_checkpoint(&path, "b").err().unwrap().to_string();
        assert!(err.contains("another config"), "{err}");
    }
}
