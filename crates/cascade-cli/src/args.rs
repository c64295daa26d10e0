//! Command-line settings shared by the subcommands, mapped onto the runtime's types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use cascade_expert::local::DEFAULT_MODEL;
use cascade_expert::LocalConfig;
use cascade_runtime::experts::openai_config;
use cascade_runtime::{ExpertSpec, LiveSpec, OnExpertFailure, Overrides, Resume};
use clap::{Args, ValueEnum};

/// Who answers deferred items.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ExpertKind {
    /// Answers recorded in a dataset folder, by item id.
    #[value(alias = "replay")]
    Recorded,
    /// A GGUF model on this machine (Gemma 3).
    Local,
    /// An OpenAI-compatible chat-completions API.
    Openai,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum FailurePolicy {
    /// The deepest student answers, with `status: "expert_unavailable"`.
    Student,
    /// The item gets an error record.
    Error,
}

impl From<FailurePolicy> for OnExpertFailure {
    fn from(policy: FailurePolicy) -> Self {
        match policy {
            FailurePolicy::Student => Self::Student,
            FailurePolicy::Error => Self::Error,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ExpertArgs {
    /// Who answers deferred items: `recorded` (answers recorded in
    /// --recorded-data, by item id), `local` (a GGUF model on this machine) or
    /// `openai` (an OpenAI-compatible API).
    #[arg(long, value_enum, default_value = "recorded")]
    pub expert: ExpertKind,
    /// Recorded expert: the data folder whose recorded answers play the LLM.
    #[arg(long, alias = "replay-data")]
    pub recorded_data: Option<PathBuf>,
    /// Recorded expert: the recorded answer field.
    #[arg(long, default_value = "gpt35")]
    pub expert_field: String,
    /// Recorded expert: delay per call in milliseconds (load and crash tests).
    #[arg(long, alias = "replay-delay-ms", default_value_t = 0)]
    pub recorded_delay_ms: u64,
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

impl ExpertArgs {
    pub fn spec(&self) -> Result<ExpertSpec> {
        Ok(match self.expert {
            ExpertKind::Recorded => ExpertSpec::Recorded {
                data: self
                    .recorded_data
                    .clone()
                    .context("--expert recorded needs --recorded-data DIR")?,
                field: self.expert_field.clone(),
                delay: Duration::from_millis(self.recorded_delay_ms),
            },
            ExpertKind::Local => ExpertSpec::Local(LocalConfig {
                model: self.local_model.clone(),
                max_text_tokens: self.max_text_tokens,
                ..LocalConfig::default()
            }),
            ExpertKind::Openai => ExpertSpec::OpenAi(openai_config(
                self.expert_config.as_deref(),
                self.base_url.as_deref(),
                self.model.as_deref(),
            )?),
        })
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
    /// Overrides the config's mu.
    #[arg(long)]
    pub mu: Option<f64>,
    /// Overrides the config's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Spend this many LLM calls over the stream (needs its length: `run`
    /// counts an input file's lines, or give --stream-length). Overrides the
    /// config's llm_budget/llm_rate.
    #[arg(long, conflicts_with = "llm_rate")]
    pub llm_budget: Option<u64>,
    /// Spend this share of the items on the LLM (a stream of unknown length).
    #[arg(long)]
    pub llm_rate: Option<f64>,
    /// Answer as the LLM would on at least this share of items, with
    /// --confidence at every point of the stream: the deferral price follows an
    /// anytime-valid bound on the audits. Overrides the config's
    /// budget.
    #[arg(long, conflicts_with_all = ["llm_budget", "llm_rate"])]
    pub target_agreement: Option<f64>,
    /// The agreement target's confidence, 1 − δ (default 0.95).
    #[arg(long, requires = "target_agreement")]
    pub confidence: Option<f64>,
    /// Do not re-open the cascade when audits show the students' agreement
    /// with the LLM has fallen (config `drift_recovery`; a cluster worker
    /// never re-opens: its learner follows the shared log only).
    #[arg(long)]
    pub no_drift_recovery: bool,
    /// Learn the expert's label only, even when it gives a probability per
    /// label (config `soft_label_weight = 0`).
    #[arg(long)]
    pub hard_labels: bool,
    /// The number of items to come, for llm_budget (`run`: default the input file's lines).
    #[arg(long)]
    pub stream_length: Option<u64>,
    #[command(flatten)]
    pub expert: ExpertArgs,
    /// Checkpoint folder (`run`: needs file input and output).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Continue from the checkpoint in --state. `--resume auto`: continue
    /// when one exists, start fresh when none does (one command line for a
    /// restart loop); a checkpoint of another config is still refused.
    #[arg(long, requires = "state", num_args = 0..=1, default_missing_value = "yes", value_enum)]
    pub resume: Option<ResumeArg>,
    /// When the expert gives no label: the deepest student answers
    /// (`status: "expert_unavailable"`), or the item gets an error record.
    #[arg(long, value_enum, default_value = "student")]
    pub on_expert_failure: FailurePolicy,
    /// Share of student-answered items also sent to the expert, to estimate
    /// agreement with it without bias; they do not train the cascade.
    /// Default: 0.2 under --target-agreement (its bound rests on them), else
    /// 1 − the deepest level's decaying_factor.
    #[arg(long)]
    pub audit_rate: Option<f64>,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    pub models: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ResumeArg {
    Yes,
    Auto,
}

impl SessionArgs {
    /// The live session these settings describe; `stream_length` is the
    /// caller's count when the flag is not given.
    pub fn spec(&self, stream_length: Option<u64>) -> Result<LiveSpec> {
        Ok(LiveSpec {
            task: self.task.clone(),
            config: self.config.clone(),
            overrides: Overrides {
                mu: self.mu,
                seed: self.seed,
                llm_budget: self.llm_budget,
                llm_rate: self.llm_rate,
                target_agreement: self.target_agreement,
                confidence: self.confidence,
                no_drift_recovery: self.no_drift_recovery,
                hard_labels: self.hard_labels,
                soft_label_weight: None,
            },
            models: self.models.clone(),
            expert: self.expert.spec()?,
            audit_rate: self.audit_rate,
            on_failure: self.on_expert_failure.into(),
            state: self.state.clone(),
            resume: match self.resume {
                None => Resume::Never,
                Some(ResumeArg::Yes) => Resume::Required,
                Some(ResumeArg::Auto) => Resume::Auto,
            },
            stream_length: self.stream_length.or(stream_length),
        })
    }
}

/// The default GGUF model inside a models folder.
pub fn default_local_model(models: &Path) -> PathBuf {
    models.join(
        Path::new(DEFAULT_MODEL)
            .strip_prefix("models")
            .unwrap_or(Path::new(DEFAULT_MODEL)),
    )
}
