//! The cascade's configuration, read from TOML and checked before use.
//!
//! The shape mirrors the authors' YAML: a global `mu`, `seed` and warm-up, and
//! one `[[levels]]` table per student with its cache, cost, training schedule
//! and gate (the authors' "wrapper") settings.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Upper bounds of the size-like fields, checked at load so that a typo
/// (`cache_size = 1000000000000`) is an error that names the field, never an
/// allocation that aborts the process or a loop that never ends.
pub mod limits {
    pub const LEVELS: usize = 16;
    pub const CACHE_SIZE: usize = 100_000;
    pub const EPOCHS: usize = 1_000;
    pub const REPLAY: usize = 100_000;
    pub const GATE_HIDDEN: usize = 4_096;
    pub const WARMUP_UPDATES: u64 = 1_000_000;
    pub const MAX_LEN: usize = 8_192;
    pub const LAYERS: usize = 1_000;
    /// What one cascade's students and gates may take, estimated before
    /// anything is allocated (`CascadeConfig::check_memory`).
    pub const MEMORY_BYTES: u64 = 8 << 30;
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot parse config: {0}")]
    Parse(String),
    #[error("config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// Weight of the deferral cost against the students' errors; larger means fewer LLM calls.
    pub mu: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The LLM answers until every level has trained this many times.
    #[serde(default = "default_warmup_updates")]
    pub warmup_updates: u64,
    /// Spend this many LLM calls over the stream (warm-up included) by pricing
    /// deferral online; mu then only shapes what the gates learn. The caller
    /// supplies the stream's length.
    pub llm_budget: Option<u64>,
    /// Spend this share of items on the LLM, for streams of unknown length.
    pub llm_rate: Option<f64>,
    /// Answer as the LLM would on at least this share of items, with
    /// `confidence` at every point of the stream (audits and a price on
    /// deferral set from a confidence sequence; see `target.rs`).
    #[serde(default)]
    pub target_agreement: Option<f64>,
    /// The target's confidence, 1 − δ (default 0.95).
    #[serde(default)]
    pub confidence: Option<f64>,
    /// How steeply the students' answer threshold follows the bound's slack
    /// under a target (cost only: the guarantee rests on the bound).
    #[serde(default)]
    pub target_gain: Option<f64>,
    /// The share of a target's allowed disagreements kept unused at the
    /// gates' own threshold (cost only).
    #[serde(default)]
    pub target_reserve: Option<f64>,
    /// Which gates the budget's price applies to.
    #[serde(default)]
    pub budget_prices: PricedLevels,
    /// Level j answers (and its gate reads) the mean of the class probabilities
    /// of levels 0..=j instead of its own: deeper levels become ensembles, and
    /// students that disagree give flat probabilities, which gates learn to defer.
    #[serde(default)]
    pub combine_levels: bool,
    /// When the expert gives a probability per label (the local model; not
    /// recorded answers), students and gates learn the mixture
    /// (1 − w)·one-hot(label) + w·probabilities instead of the label alone.
    /// 0: hard labels only; 1: the expert's distribution alone.
    #[serde(default = "default_soft_label_weight")]
    pub soft_label_weight: f64,
    /// When audits show the students' agreement with the LLM has fallen (a
    /// change detector on them, `drift.rs`), re-open the cascade: exploration
    /// restarts, replay forgets the labels from before, a target starts a new
    /// epoch and audits rise for a while. Needs audits to see anything.
    #[serde(default = "default_true")]
    pub drift_recovery: bool,
    /// How fast the budget controller's price (log-odds) moves per item.
    #[serde(default = "default_budget_step")]
    pub budget_step: f64,
    /// Exponent of the budget's spending curve `calls(t) ∝ t^pacing`: 1 spends
    /// evenly, smaller spends more early, while the students are weak.
    #[serde(default = "default_budget_pacing")]
    pub budget_pacing: f64,
    pub levels: Vec<LevelConfig>,
}

/// Which gates a budget prices.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PricedLevels {
    /// Every level answers below the priced threshold: under budget pressure a
    /// strong first student takes more items.
    #[default]
    All,
    /// Only the last student, whose deferrals are the LLM calls, is asked to
    /// answer more than at 0.5; earlier levels keep the 0.5 threshold unless
    /// the budget needs more calls, and then fall with it. Which of the two
    /// a dataset uses is chosen on its train half (results/selection.md).
    Last,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    /// Shown in logs; defaults to the kind.
    pub name: Option<String>,
    pub kind: StudentKind,
    /// The cost of deferring past this level (the authors' model cost).
    pub cost: f64,
    /// Demonstrations gathered before the student trains on them.
    pub cache_size: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Past demonstrations, drawn at random from every label so far, mixed
    /// into each training pass: more steps per LLM label without forgetting.
    #[serde(default)]
    pub replay: usize,
    /// Defaults to the cache size.
    pub batch: Option<usize>,
    pub gate: GateConfig,
    #[serde(default)]
    pub logreg: LogRegConfig,
    #[serde(default)]
    pub transformer: TransformerConfig,
    #[serde(default)]
    pub embedding_head: EmbeddingHeadConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StudentKind {
    /// Hashed TF-IDF logistic regression (`[levels.logreg]`).
    Logreg,
    /// A BERT-family encoder fine-tuned online with a linear head (`[levels.transformer]`).
    Transformer,
    /// A frozen encoder's mean-pooled embedding under an online softmax head
    /// (`[levels.embedding_head]`).
    EmbeddingHead,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    #[serde(default = "default_gate_lr")]
    pub lr: f32,
    /// L2 penalty on the gate's parameters (sum of squares).
    #[serde(default = "default_gate_regularization")]
    pub regularization: f32,
    /// Exploration: the level may answer with probability `1 - decaying_factor^updates`.
    pub decaying_factor: f64,
    /// Added to the gate's 0/1 error target: a correct level is pushed towards this.
    pub calibration: f32,
    #[serde(default = "default_gate_hidden")]
    pub hidden: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adagrad,
    Adam,
    Ftrl,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IdfMode {
    /// Document frequencies of the texts seen so far (no look-ahead).
    Streaming,
    /// Fitted on the whole stream before it starts, as the authors did. A leak:
    /// only for fidelity comparisons.
    Prefit,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogRegConfig {
    /// Hash buckets for word n-grams; a power of two.
    pub buckets: usize,
    /// 1: unigrams; 2: unigrams and bigrams.
    pub ngrams: usize,
    pub optimizer: Optimizer,
    pub lr: f32,
    pub l2: f32,
    pub idf: IdfMode,
}

impl Default for LogRegConfig {
    fn default() -> Self {
        Self {
            buckets: 1 << 20,
            ngrams: 2,
            optimizer: Optimizer::Adagrad,
            lr: 0.5,
            l2: 1e-6,
            idf: IdfMode::Streaming,
        }
    }
}

/// The fine-tuned transformer student. Defaults are chosen for 2 CPU cores
/// (results/transformer.md); the authors used max_len 512, epochs 5, lr 1e-5,
/// everything trainable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerConfig {
    /// A model folder, or a name under the models folder (`scripts/setup.sh`).
    pub model: String,
    /// Tokens per text, [CLS] and [SEP] included.
    pub max_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub freeze_embeddings: bool,
    /// The lowest this many encoder layers do not train.
    pub frozen_layers: usize,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            model: "all-minilm-l6-v2".into(),
            max_len: 128,
            lr: 5e-5,
            weight_decay: 0.01,
            freeze_embeddings: true,
            frozen_layers: 0,
        }
    }
}

/// The embedding-head student: frozen encoder, online softmax regression on
/// its normalised mean-pooled embedding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingHeadConfig {
    pub model: String,
    pub max_len: usize,
    /// A text longer than `max_len` is read in up to this many consecutive
    /// windows whose embeddings are averaged; 1 reads the first window only.
    /// Long reviews often give their verdict at the end.
    pub windows: usize,
    /// Encoder layers (1-based) whose mean-pooled outputs, each normalised,
    /// are concatenated into the embedding; empty reads the last layer only.
    /// Middle layers keep word-level cues (sentiment) that a sentence
    /// encoder's last layer partly trains away.
    pub layers: Vec<usize>,
    /// AdaGrad step size of the head.
    pub lr: f32,
    pub l2: f32,
    /// Where embeddings are kept across runs (one file per model, max_len and
    /// windows); none keeps them in memory only.
    pub cache_dir: Option<String>,
    /// Run the frozen encoder with int8 weights and activations (`"int8"`):
    /// faster, embeddings within ~1% in cosine; its own cache file. None
    /// keeps f32.
    pub quantize: Option<Quantization>,
}

/// A reduced-precision inference scheme for a frozen encoder.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// Weights per output channel, activations per row, i32 sums.
    Int8,
}

impl Default for EmbeddingHeadConfig {
    fn default() -> Self {
        Self {
            model: "all-minilm-l6-v2".into(),
            max_len: 256,
            windows: 1,
            layers: Vec::new(),
            lr: 0.5,
            l2: 1e-5,
            cache_dir: None,
            quantize: None,
        }
    }
}

fn default_seed() -> u64 {
    42
}
fn default_warmup_updates() -> u64 {
    10
}
fn default_epochs() -> usize {
    1
}
fn default_gate_lr() -> f32 {
    7e-4
}
/// Chosen on IMDB's train half with the local expert (results/guarantee.md):
/// its probabilities, near 0.5 and biased to one label, cost agreement at
/// every weight tried, so by default the label alone is learned.
fn default_soft_label_weight() -> f64 {
    0.0
}

fn default_true() -> bool {
    true
}

fn default_budget_step() -> f64 {
    0.01
}
fn default_budget_pacing() -> f64 {
    0.7
}
fn default_gate_regularization() -> f32 {
    1e-4
}
fn default_gate_hidden() -> usize {
    128
}

impl CascadeConfig {
    /// Parses and validates a TOML config.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The agreement target, when `target_agreement` is set (checked by `validate`).
    pub fn agreement_target(&self) -> Option<crate::AgreementTarget> {
        self.checked_target()?.ok()
    }

    fn checked_target(
        &self,
    ) -> Option<Result<crate::AgreementTarget, crate::target::InvalidTarget>> {
        let agreement = self.target_agreement?;
        Some(
            crate::AgreementTarget::new(agreement, self.confidence.unwrap_or(DEFAULT_CONFIDENCE))
                .and_then(|target| {
                    target.with_steering(
                        self.target_gain.unwrap_or(crate::target::DEFAULT_GAIN),
                        self.target_reserve
                            .unwrap_or(crate::target::DEFAULT_RESERVE),
                    )
                }),
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check("mu", self.mu.is_finite() && self.mu >= 0.0, || {
            format!("must be a finite number >= 0, got {}", self.mu)
        })?;
        check(
            "soft_label_weight",
            (0.0..=1.0).contains(&self.soft_label_weight),
            || format!("must be in [0, 1], got {}", self.soft_label_weight),
        )?;
        check(
            "llm_rate",
            self.llm_rate.is_none_or(|r| r > 0.0 && r <= 1.0),
            || format!("must be in (0, 1], got {:?}", self.llm_rate),
        )?;
        check(
            "llm_budget",
            self.llm_budget.is_none() || self.llm_rate.is_none(),
            || "give either llm_budget or llm_rate, not both".into(),
        )?;
        if let Some(checked) = self.checked_target() {
            checked.map_err(|e| ConfigError::Invalid {
                field: e.field.into(),
                reason: format!("{}, got {}", e.reason, e.value),
            })?;
            check(
                "target_agreement",
                self.llm_budget.is_none() && self.llm_rate.is_none(),
                || "sets the LLM's share itself: give it or llm_budget/llm_rate, not both".into(),
            )?;
        }
        check(
            "confidence",
            self.confidence.is_none() || self.target_agreement.is_some(),
            || "belongs to target_agreement, which is not set".into(),
        )?;
        check(
            "budget_step",
            self.budget_step.is_finite() && self.budget_step > 0.0,
            || format!("must be a finite number > 0, got {}", self.budget_step),
        )?;
        check(
            "budget_pacing",
            self.budget_pacing > 0.0 && self.budget_pacing <= 1.0,
            || format!("must be in (0, 1], got {}", self.budget_pacing),
        )?;
        check("levels", !self.levels.is_empty(), || {
            "needs at least one [[levels]] table".into()
        })?;
        check("levels", self.levels.len() <= limits::LEVELS, || {
            format!(
                "{} levels; at most {} are supported",
                self.levels.len(),
                limits::LEVELS
            )
        })?;
        check(
            "warmup_updates",
            self.warmup_updates <= limits::WARMUP_UPDATES,
            || at_most(self.warmup_updates, limits::WARMUP_UPDATES),
        )?;
        for (i, level) in self.levels.iter().enumerate() {
            level.validate(&format!("levels[{i}]"))?;
            // Names tell levels apart in records, metrics and checkpoints.
            let name = level.name();
            if let Some(first) = self.levels[..i].iter().position(|l| l.name() == name) {
                return Err(ConfigError::Invalid {
                    field: format!("levels[{i}].name"),
                    reason: format!(
                        "`{name}` is already levels[{first}]'s name; give each level its own"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a cascade whose students and gates would take more than
    /// `limit` bytes for a task of `labels` labels, naming the level's field
    /// that costs the most; checked before anything is allocated.
    pub fn check_memory(&self, labels: usize, limit: u64) -> Result<(), ConfigError> {
        let mut total = 0u64;
        for (i, level) in self.levels.iter().enumerate() {
            let (field, bytes) = level.estimated_bytes(labels);
            total = total.saturating_add(bytes);
            if total > limit {
                return Err(ConfigError::Invalid {
                    field: format!("levels[{i}].{field}"),
                    reason: format!(
                        "the cascade would need about {} MB for {labels} labels, more than the {} MB allowed",
                        total >> 20,
                        limit >> 20
                    ),
                });
            }
        }
        Ok(())
    }
}

fn at_most(value: impl std::fmt::Display, limit: impl std::fmt::Display) -> String {
    format!("must be at most {limit}, got {value}")
}

impl LevelConfig {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| match self.kind {
            StudentKind::Logreg => "lr".into(),
            StudentKind::Transformer => "transformer".into(),
            StudentKind::EmbeddingHead => "embedding_head".into(),
        })
    }

    /// The model folder this level loads, if any.
    pub fn model(&self) -> Option<&str> {
        match self.kind {
            StudentKind::Logreg => None,
            StudentKind::Transformer => Some(&self.transformer.model),
            StudentKind::EmbeddingHead => Some(&self.embedding_head.model),
        }
    }

    /// The model name or folder this level loads, to resolve against a models folder.
    pub fn model_mut(&mut self) -> Option<&mut String> {
        match self.kind {
            StudentKind::Logreg => None,
            StudentKind::Transformer => Some(&mut self.transformer.model),
            StudentKind::EmbeddingHead => Some(&mut self.embedding_head.model),
        }
    }

    pub fn batch(&self) -> usize {
        self.batch.unwrap_or(self.cache_size)
    }

    /// The field that sizes this level's memory and an estimate of the bytes:
    /// the LR's weights and two optimiser moments per bucket and label, the
    /// gate, and the cache of demonstrations (texts not counted).
    fn estimated_bytes(&self, labels: usize) -> (&'static str, u64) {
        let per_float = 4u64;
        let gate = (labels as u64 + 2).saturating_mul(self.gate.hidden as u64) * per_float * 3;
        let cache = self.cache_size as u64 * 64;
        let (field, student) = match self.kind {
            StudentKind::Logreg => (
                "logreg.buckets",
                (self.logreg.buckets as u64)
                    .saturating_mul(labels as u64)
                    .saturating_mul(per_float * 3),
            ),
            // The encoders' size is the model folder's; only the head grows with labels.
            StudentKind::Transformer | StudentKind::EmbeddingHead => ("cache_size", 0),
        };
        (field, student.saturating_add(gate).saturating_add(cache))
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{at}.{name}");
        check(
            &field("cost"),
            self.cost.is_finite() && self.cost >= 0.0,
            || format!("must be a finite number >= 0, got {}", self.cost),
        )?;
        let between = |min: usize, max: usize, value: usize| {
            move || format!("must be between {min} and {max}, got {value}")
        };
        check(
            &field("cache_size"),
            (1..=limits::CACHE_SIZE).contains(&self.cache_size),
            between(1, limits::CACHE_SIZE, self.cache_size),
        )?;
        check(
            &field("epochs"),
            (1..=limits::EPOCHS).contains(&self.epochs),
            between(1, limits::EPOCHS, self.epochs),
        )?;
        check(
            &field("batch"),
            (1..=self.cache_size).contains(&self.batch()),
            between(1, self.cache_size, self.batch()),
        )?;
        check(
            &field("replay"),
            self.replay <= limits::REPLAY,
            between(0, limits::REPLAY, self.replay),
        )?;
        let gate = &self.gate;
        check(
            &field("gate.lr"),
            gate.lr.is_finite() && gate.lr > 0.0,
            || format!("must be > 0, got {}", gate.lr),
        )?;
        check(
            &field("gate.regularization"),
            gate.regularization.is_finite() && gate.regularization >= 0.0,
            || format!("must be >= 0, got {}", gate.regularization),
        )?;
        check(
            &field("gate.decaying_factor"),
            (0.0..1.0).contains(&gate.decaying_factor),
            || format!("must be in [0, 1), got {}", gate.decaying_factor),
        )?;
        check(
            &field("gate.calibration"),
            (0.0..=1.0).contains(&gate.calibration),
            || format!("must be in [0, 1], got {}", gate.calibration),
        )?;
        check(
            &field("gate.hidden"),
            (1..=limits::GATE_HIDDEN).contains(&gate.hidden),
            between(1, limits::GATE_HIDDEN, gate.hidden),
        )?;
        let transformer = &self.transformer;
        check(
            &field("transformer.max_len"),
            (3..=limits::MAX_LEN).contains(&transformer.max_len),
            between(3, limits::MAX_LEN, transformer.max_len),
        )?;
        check(
            &field("transformer.frozen_layers"),
            transformer.frozen_layers <= limits::LAYERS,
            between(0, limits::LAYERS, transformer.frozen_layers),
        )?;
        check(
            &field("embedding_head.max_len"),
            (3..=limits::MAX_LEN).contains(&self.embedding_head.max_len),
            between(3, limits::MAX_LEN, self.embedding_head.max_len),
        )?;
        let lr = &self.logreg;
        check(
            &field("logreg.buckets"),
            lr.buckets.is_power_of_two() && (1 << 4..=1 << 26).contains(&lr.buckets),
            || {
                format!(
                    "must be a power of two between 16 and 67108864, got {}",
                    lr.buckets
                )
            },
        )?;
        check(
            &field("logreg.ngrams"),
            (1..=2).contains(&lr.ngrams),
            || format!("must be 1 or 2, got {}", lr.ngrams),
        )?;
        check(
            &field("logreg.lr"),
            lr.lr.is_finite() && lr.lr > 0.0,
            || format!("must be > 0, got {}", lr.lr),
        )?;
        check(
            &field("logreg.l2"),
            lr.l2.is_finite() && lr.l2 >= 0.0,
            || format!("must be >= 0, got {}", lr.l2),
        )?;
        let windows = self.embedding_head.windows;
        check(
            &field("embedding_head.windows"),
            (1..=64).contains(&windows),
            || format!("must be between 1 and 64, got {windows}"),
        )?;
        let layers = &self.embedding_head.layers;
        check(
            &field("embedding_head.layers"),
            layers.windows(2).all(|w| w[0] < w[1])
                && !layers.contains(&0)
                && layers.iter().all(|&l| l <= limits::LAYERS),
            || {
                format!(
                    "must be ascending layer numbers from 1 to {}, got {layers:?}",
                    limits::LAYERS
                )
            },
        )?;
        Ok(())
    }
}

/// The agreement target's confidence when the config gives none.
pub const DEFAULT_CONFIDENCE: f64 = 0.95;

fn check(field: &str, ok: bool, reason: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: field.into(),
            reason: reason(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        mu = 5e-4
        [[levels]]
        kind = "logreg"
        cost = 1182
        cache_size = 8
        [levels.gate]
        decaying_factor = 0.97
        calibration = 0.4
        [levels.logreg]
        buckets = 65536
    "#;

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = CascadeConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.seed, 42);
        assert_eq!(c.warmup_updates, 10);
        let level = &c.levels[0];
        assert_eq!(level.name(), "lr");
        assert_eq!(level.batch(), 8);
        assert_eq!(level.epochs, 1);
        assert_eq!(level.gate.lr, 7e-4);
        assert_eq!(level.gate.hidden, 128);
        assert_eq!(level.logreg.buckets, 65536);
        assert_eq!(level.logreg.idf, IdfMode::Streaming);
    }

    fn error_for(from: &str, to: &str) -> String {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "replacement `{from}` did not apply");
        CascadeConfig::from_toml(&text).unwrap_err().to_string()
    }

    #[test]
    fn agreement_targets_are_checked_by_field() {
        for (to, field) in [
            (
                "mu = 5e-4\ntarget_agreement = 1.5",
                "`target_agreement`: must be in (0, 1), got 1.5",
            ),
            (
                "mu = 5e-4\ntarget_agreement = 0.0",
                "`target_agreement`: must be in (0, 1), got 0",
            ),
            (
                "mu = 5e-4\ntarget_agreement = 0.9\nconfidence = 1.0",
                "`confidence`: must be in (0, 1), got 1",
            ),
            (
                "mu = 5e-4\nconfidence = 0.9",
                "`confidence`: belongs to target_agreement, which is not set",
            ),
            (
                "mu = 5e-4\ntarget_agreement = 0.9\ntarget_gain = 0",
                "`target_gain`: must be a finite number > 0, got 0",
            ),
            (
                "mu = 5e-4\ntarget_agreement = 0.9\ntarget_reserve = 1",
                "`target_reserve`: must be in [0, 1), got 1",
            ),
            (
                "mu = 5e-4\ntarget_agreement = 0.9\nllm_rate = 0.3",
                "`target_agreement`: sets the LLM's share itself",
            ),
            (
                "mu = 5e-4\nsoft_label_weight = 1.5",
                "`soft_label_weight`: must be in [0, 1], got 1.5",
            ),
        ] {
            let error = error_for("mu = 5e-4", to);
            assert!(error.contains(field), "{to}: {error}");
        }
        let ok = CascadeConfig::from_toml(
            &GOOD.replace("mu = 5e-4", "mu = 5e-4\ntarget_agreement = 0.9"),
        )
        .unwrap();
        assert_eq!(
            ok.agreement_target(),
            Some(crate::AgreementTarget::new(0.9, DEFAULT_CONFIDENCE).unwrap())
        );
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            ("mu = 5e-4", "mu = -1.0", "`mu`"),
            ("cache_size = 8", "cache_size = 0", "`levels[0].cache_size`"),
            ("cost = 1182", "cost = -3", "`levels[0].cost`"),
            (
                "decaying_factor = 0.97",
                "decaying_factor = 1.5",
                "`levels[0].gate.decaying_factor`",
            ),
            (
                "calibration = 0.4",
                "calibration = 2.0",
                "`levels[0].gate.calibration`",
            ),
            (
                "buckets = 65536",
                "buckets = 1000",
                "`levels[0].logreg.buckets`",
            ),
            (
                "buckets = 65536",
                "buckets = 65536\n[levels.embedding_head]\nwindows = 0",
                "`levels[0].embedding_head.windows`",
            ),
            (
                "buckets = 65536",
                "buckets = 65536\n[levels.embedding_head]\nlayers = [10, 8]",
                "`levels[0].embedding_head.layers`",
            ),
            (
                "buckets = 65536",
                "buckets = 65536\n[levels.embedding_head]\nlayers = [0]",
                "`levels[0].embedding_head.layers`",
            ),
            // Sizes past their bounds (issue 22, row 7): an error, never an abort.
            (
                "cache_size = 8",
                "cache_size = 1000000000000",
                "`levels[0].cache_size`",
            ),
            (
                "decaying_factor = 0.97",
                "decaying_factor = 0.97\nhidden = 1000000000",
                "`levels[0].gate.hidden`",
            ),
            (
                "cache_size = 8",
                "cache_size = 8\nepochs = 1000000000000",
                "`levels[0].epochs`",
            ),
            (
                "cache_size = 8",
                "cache_size = 8\nreplay = 1000000000000",
                "`levels[0].replay`",
            ),
            (
                "mu = 5e-4",
                "mu = 5e-4\nwarmup_updates = 1000000000000",
                "`warmup_updates`",
            ),
            (
                "buckets = 65536",
                "buckets = 65536\n[levels.embedding_head]\nmax_len = 1000000",
                "`levels[0].embedding_head.max_len`",
            ),
        ];
        for (from, to, field) in cases {
            let err = error_for(from, to);
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn too_many_levels_duplicate_names_and_too_much_memory_are_refused() {
        let level = GOOD.split_once("[[levels]]").unwrap().1;
        let many = format!("mu = 1e-4\n{}", format!("[[levels]]{level}").repeat(10_000));
        let err = CascadeConfig::from_toml(&many).unwrap_err().to_string();
        assert!(
            err.contains("`levels`") && err.contains("at most 16"),
            "{err}"
        );
        let twice = format!("mu = 1e-4\n{}", format!("[[levels]]{level}").repeat(2));
        let err = CascadeConfig::from_toml(&twice).unwrap_err().to_string();
        assert!(
            err.contains("`levels[1].name`") && err.contains("already levels[0]"),
            "{err}"
        );
        let config = CascadeConfig::from_toml(GOOD).unwrap();
        assert!(config.check_memory(2, limits::MEMORY_BYTES).is_ok());
        let huge = GOOD.replace("buckets = 65536", "buckets = 67108864");
        let config = CascadeConfig::from_toml(&huge).unwrap();
        let err = config
            .check_memory(1000, limits::MEMORY_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`levels[0].logreg.buckets`") && err.contains("MB"),
            "{err}"
        );
    }

    #[test]
    fn parse_errors_name_unknown_and_missing_fields() {
        let err = error_for("cache_size = 8", "cache_sise = 8");
        assert!(err.contains("cache_sise"), "{err}");
        let err = error_for("calibration = 0.4", "");
        assert!(err.contains("calibration"), "{err}");
        let err = error_for("kind = \"logreg\"", "kind = \"svm\"");
        assert!(err.contains("svm"), "{err}");
        let err = CascadeConfig::from_toml("mu = 1e-3\nlevels = []").unwrap_err();
        assert!(err.to_string().contains("`levels`"), "{err}");
    }

    #[test]
    fn every_shipped_config_parses_and_validates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = CascadeConfig::from_toml(&text) {
                    panic!("{}: {e}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked >= 9, "only {checked} configs in {}", dir.display());
    }
}
