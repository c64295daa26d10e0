//! The one place a cascade is built: a config file, the caller's overrides,
//! the students, the routing and the LLM budget.

use std::path::Path;

use cascade::{Budget, Cascade, CascadeConfig, Routing};

use crate::error::{Result, RuntimeError};
use crate::session::{OnExpertFailure, Session, SessionOptions};
use crate::students::build_students;

/// What the command line (or any caller) changes in a config file's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub mu: Option<f64>,
    pub seed: Option<u64>,
    /// Replaces the config's budget, whichever kind (with `llm_rate`).
    pub llm_budget: Option<u64>,
    pub llm_rate: Option<f64>,
    /// Replaces the config's agreement target (and clears its budget).
    pub target_agreement: Option<f64>,
    pub confidence: Option<f64>,
    /// Turns drift recovery off (`drift_recovery = false`).
    pub no_drift_recovery: bool,
    /// Learns the expert's label only, not its distribution (`soft_label_weight = 0`).
    pub hard_labels: bool,
    /// Replaces `soft_label_weight`.
    pub soft_label_weight: Option<f64>,
}

impl Overrides {
    pub fn apply(&self, config: &mut CascadeConfig) {
        if let Some(mu) = self.mu {
            config.mu = mu;
        }
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        if self.llm_budget.is_some() || self.llm_rate.is_some() {
            config.llm_budget = self.llm_budget;
            config.llm_rate = self.llm_rate;
            config.target_agreement = None;
            config.confidence = None;
        }
        if self.target_agreement.is_some() {
            config.target_agreement = self.target_agreement;
            config.llm_budget = None;
            config.llm_rate = None;
        }
        if self.confidence.is_some() {
            config.confidence = self.confidence;
        }
        if self.no_drift_recovery {
            config.drift_recovery = false;
        }
        if let Some(weight) = self.soft_label_weight {
            config.soft_label_weight = weight;
        }
        if self.hard_labels {
            config.soft_label_weight = 0.0;
        }
    }
}

/// Reads a config file, applies the overrides, validates the result and
/// points model names at the models folder.
pub fn load_config(path: &Path, overrides: &Overrides, models: &Path) -> Result<CascadeConfig> {
    let text = std::fs::read_to_string(path).map_err(RuntimeError::io(path))?;
    config_from_toml(&text, overrides, models).map_err(|source| match source {
        RuntimeError::Config { source, .. } => RuntimeError::Config {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    })
}

/// [`load_config`] for a config given as text (a path-less caller: tests, Python).
pub fn config_from_toml(text: &str, overrides: &Overrides, models: &Path) -> Result<CascadeConfig> {
    let invalid = |source| RuntimeError::Config {
        path: "<config>".into(),
        source,
    };
    let mut config = CascadeConfig::from_toml(text).map_err(invalid)?;
    overrides.apply(&mut config);
    config.validate().map_err(invalid)?;
    resolve_models(&mut config, models);
    Ok(config)
}

/// Points each level's model name at `models/<name>` unless it already names a folder.
pub fn resolve_models(config: &mut CascadeConfig, models: &Path) {
    for model in config.levels.iter_mut().filter_map(|l| l.model_mut()) {
        if !Path::new(model.as_str()).is_dir() {
            *model = models.join(model.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// Builds the cascade a checked config describes: its students, gates and
/// routing, and the LLM budget when the config sets one. `stream_length` is
/// the number of items to come, when known; `llm_budget` needs it.
pub fn build(
    config: &CascadeConfig,
    labels: usize,
    routing: Routing,
    stream_length: Option<u64>,
) -> Result<Cascade> {
    let budget = match (config.llm_budget, config.llm_rate) {
        (Some(calls), _) => Some(Budget::Calls {
            calls,
            stream_length: stream_length.ok_or_else(|| {
                RuntimeError::setting(
                    "llm_budget",
                    "needs a stream of known length (an input file, or --stream-length); use llm_rate for an open stream",
                )
            })?,
        }),
        (None, Some(rate)) => Some(Budget::Rate(rate)),
        // An agreement target steers a rate budget (from all-LLM at first).
        (None, None) if config.target_agreement.is_some() => Some(Budget::Rate(1.0)),
        (None, None) => None,
    };
    // Before anything is allocated: a size typo is an error naming the field.
    config
        .check_memory(labels, cascade::config::limits::MEMORY_BYTES)
        .map_err(|source| RuntimeError::Config {
            path: "<config>".into(),
            source,
        })?;
    let students = build_students(config, labels)?;
    let mut cascade = Cascade::with_students(config, students, labels, routing)?;
    if let Some(budget) = budget {
        cascade.set_budget(budget, config.budget_step, config.budget_pacing);
    }
    Ok(cascade)
}

/// A live session on a checked config (`run`, `serve`, the Python package):
/// the gated cascade [`build`] makes, the audit rate (`None`: the deepest
/// level's exploration floor) and the failure policy.
pub fn build_session(
    config: &CascadeConfig,
    labels: usize,
    audit_rate: Option<f64>,
    on_failure: OnExpertFailure,
    stream_length: Option<u64>,
) -> Result<Session> {
    let cascade = build(config, labels, Routing::Gated, stream_length)?;
    let audit_rate = SessionOptions::audit_rate(audit_rate, config)?;
    let options = session_options(config, audit_rate, on_failure);
    Ok(Session::new(cascade, config.seed, options))
}

/// What a config sets in a session besides its cascade: the one place every
/// front end (and the replays, which build their cascade themselves) takes
/// them from. `audit_rate` is resolved ([`SessionOptions::audit_rate`]).
pub fn session_options(
    config: &CascadeConfig,
    audit_rate: f64,
    on_failure: OnExpertFailure,
) -> SessionOptions {
    SessionOptions {
        audit_rate,
        on_failure,
        target: config.agreement_target(),
        drift_recovery: config.drift_recovery,
    }
}
