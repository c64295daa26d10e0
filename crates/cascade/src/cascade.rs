//! The online cascade: students in order, each behind a gate, with the LLM last.
//!
//! `route` decides who answers an item without ever waiting for the LLM: it
//! returns an answer from a student, or a `Deferred` item for the caller to
//! send to the LLM. When the LLM's label arrives (now or much later), the caller
//! hands it to `learn`, which trains the gates and fills the students' caches.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::budget::{Allowance, Budget, BudgetController};
use crate::config::{CascadeConfig, ConfigError, PricedLevels};
use crate::gate::{argmax, train_gates, Gate, GateExample};
use crate::student::{Demonstration, Student, StudentError};

#[derive(Debug, Error)]
pub enum CascadeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("student `{level}`: {source}")]
    Student {
        level: String,
        #[source]
        source: StudentError,
    },
    #[error("label {label} is out of range for a task with {labels} labels")]
    InvalidLabel { label: usize, labels: usize },
    #[error("{students} students for {levels} configured levels")]
    StudentCount { students: usize, levels: usize },
    #[error("a task needs at least 2 labels, got {0}")]
    TooFewLabels(usize),
    #[error("fixed routing needs one probability in [0, 1] per level, got {0:?}")]
    FixedRouting(Vec<f64>),
    #[error("student `{level}` returned malformed probabilities")]
    MalformedProbabilities { level: String },
    #[error("encoding the cascade's state: {0}")]
    EncodeState(String),
    #[error("the saved state is unreadable: {0}")]
    UnreadableState(String),
    #[error("the saved state does not fit this cascade: {0}")]
    StateMismatch(String),
    #[error("a logged demonstration does not fit this cascade: {0}")]
    MalformedDemonstration(String),
}

/// How levels decide to answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Routing {
    /// The paper's learned gates with decaying exploration.
    Gated,
    /// The online-ensemble baseline: level j answers with a fixed probability
    /// (one per level), gates are neither used nor trained.
    Fixed(Vec<f64>),
}

/// The result of routing one item.
#[derive(Debug)]
pub struct Routed {
    pub outcome: Outcome,
    /// Class probabilities of each level that was evaluated (lazy: unreached levels are `None`).
    pub level_probs: Vec<Option<Vec<f32>>>,
    /// Gate output of each level that was evaluated.
    pub gate_outputs: Vec<Option<f32>>,
}

impl Routed {
    /// No level evaluated yet; the outcome is set before it is returned.
    fn unreached(levels: usize) -> Self {
        Self {
            outcome: Outcome::Answered { level: 0, label: 0 },
            level_probs: vec![None; levels],
            gate_outputs: vec![None; levels],
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    Answered {
        level: usize,
        label: usize,
    },
    /// The LLM must answer; give its label to [`Cascade::learn`].
    Deferred(Deferred),
}

/// An item waiting for the LLM's label. It keeps what routing computed, so the
/// gates learn from the probabilities they acted on even if the label comes late.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Deferred {
    text: String,
    /// Every level's probabilities, when the gates should learn from this item.
    gate_inputs: Option<Vec<Vec<f32>>>,
    warmup: bool,
}

struct Level {
    name: String,
    /// The cost of deferring past this level (the paper's c_j).
    cost: f64,
    student: Box<dyn Student>,
    cache: Vec<(String, usize)>,
    /// Every demonstration trained on so far, when `replay` > 0.
    history: Vec<(String, usize)>,
    /// The expert's distribution beside each cached and replayed label, when
    /// it gave one (soft labels); kept in step with `cache` and `history`.
    cache_probs: Vec<Option<Vec<f32>>>,
    history_probs: Vec<Option<Vec<f32>>>,
    replay: usize,
    replay_rng: ChaCha8Rng,
    cache_size: usize,
    epochs: usize,
    batch: usize,
    updates: u64,
    /// `updates` when exploration last restarted (a detected change).
    explored_from: u64,
    decaying_factor: f64,
    calibration: f32,
}

pub struct Cascade {
    levels: Vec<Level>,
    gates: Vec<Gate>,
    labels: usize,
    mu: f64,
    warmup_updates: u64,
    combine_levels: bool,
    /// The expert's distribution's weight in what is learned (`soft_label_weight`).
    soft_label_weight: f32,
    priced_levels: PricedLevels,
    routing: Routing,
    /// Prices deferral to meet an LLM-call budget; `None`: the paper's fixed-mu rule.
    budget: Option<BudgetController>,
    /// Fixed routing under a budget: probabilities still to be set from the
    /// budget left when warm-up ends.
    fixed_from_budget: bool,
    rng: ChaCha8Rng,
    /// Learning comes from a shared log of labels (a cluster): students
    /// observe a text when its label is learned, not when it is routed, so
    /// every replica that applied the same log holds the same state.
    learns_from_log: bool,
}

/// What [`Cascade::save_state`] writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct CascadeState {
    levels: Vec<LevelState>,
    gates: Vec<Gate>,
    labels: usize,
    mu: f64,
    routing: Routing,
    budget: Option<BudgetController>,
    fixed_from_budget: bool,
    rng: ChaCha8Rng,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LevelState {
    name: String,
    #[serde(with = "serde_bytes")]
    student: Vec<u8>,
    cache: Vec<(String, usize)>,
    history: Vec<(String, usize)>,
    #[serde(default)]
    cache_probs: Vec<Option<Vec<f32>>>,
    #[serde(default)]
    history_probs: Vec<Option<Vec<f32>>>,
    replay_rng: ChaCha8Rng,
    updates: u64,
    #[serde(default)]
    explored_from: u64,
}

/// Gates train during warm-up once every level has trained more than this often.
const GATE_WARMUP_UPDATES: u64 = 2;

impl Cascade {
    /// Uses the given students, one per configured level, in order.
    pub fn with_students(
        config: &CascadeConfig,
        students: Vec<Box<dyn Student>>,
        labels: usize,
        routing: Routing,
    ) -> Result<Self, CascadeError> {
        config.validate()?;
        if students.len() != config.levels.len() {
            return Err(CascadeError::StudentCount {
                students: students.len(),
                levels: config.levels.len(),
            });
        }
        if labels < 2 {
            return Err(CascadeError::TooFewLabels(labels));
        }
        if let Routing::Fixed(p) = &routing {
            if p.len() != students.len() || p.iter().any(|x| !(0.0..=1.0).contains(x)) {
                return Err(CascadeError::FixedRouting(p.clone()));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let gates = config
            .levels
            .iter()
            .map(|level| Gate::new(labels, &level.gate, &mut rng))
            .collect();
        let levels = config
            .levels
            .iter()
            .zip(students)
            .enumerate()
            .map(|(j, (level, student))| Level {
                name: level.name(),
                cost: level.cost,
                student,
                cache: Vec::with_capacity(level.cache_size),
                history: Vec::new(),
                cache_probs: Vec::with_capacity(level.cache_size),
                history_probs: Vec::new(),
                replay: level.replay,
                // Its own stream, so replay never shifts the routing coins.
                replay_rng: ChaCha8Rng::seed_from_u64(
                    config.seed ^ 0x5eed_0000_0000_0000 ^ j as u64,
                ),
                cache_size: level.cache_size,
                epochs: level.epochs,
                batch: level.batch(),
                updates: 0,
                explored_from: 0,
                decaying_factor: level.gate.decaying_factor,
                calibration: level.gate.calibration,
            })
            .collect();
        Ok(Self {
            levels,
            gates,
            labels,
            mu: config.mu,
            warmup_updates: config.warmup_updates,
            combine_levels: config.combine_levels,
            soft_label_weight: config.soft_label_weight as f32,
            priced_levels: config.budget_prices,
            routing,
            budget: None,
            fixed_from_budget: false,
            rng,
            learns_from_log: false,
        })
    }

    /// From now on what the students observe comes only through
    /// [`Cascade::learn`] (a cluster's shared log of labels): routing changes
    /// no learned state, so the learner is a pure function of the log.
    pub fn learn_from_log(&mut self) {
        self.learns_from_log = true;
    }

    /// Seeds the routing coins (a cluster worker mixes in its own name, so
    /// workers do not flip the same coins).
    pub fn reseed_routing(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// An agreement target's steering of the budget controller (see
    /// [`BudgetController::steer`]); nothing without a budget.
    pub fn steer_budget(&mut self, price: f64, must_defer: bool) {
        if let Some(budget) = &mut self.budget {
            budget.steer(price, must_defer);
        }
    }

    /// Tells the budget controller how many items and LLM calls the whole
    /// cluster has seen, so every worker prices against the global count.
    pub fn sync_budget(&mut self, seen: u64, calls: u64) {
        if let Some(budget) = &mut self.budget {
            budget.sync(seen, calls);
        }
    }

    /// Targets an LLM-call budget from now on. Gated routing prices deferral
    /// online; fixed routing (the online ensemble) sets its answer probabilities
    /// once, from the budget left when warm-up ends.
    pub fn set_budget(&mut self, budget: Budget, step: f64, pacing: f64) {
        self.budget = Some(BudgetController::new(budget, step, pacing));
        self.fixed_from_budget = matches!(self.routing, Routing::Fixed(_));
    }

    pub fn budget(&self) -> Option<&BudgetController> {
        self.budget.as_ref()
    }

    pub fn level_names(&self) -> Vec<&str> {
        self.levels.iter().map(|l| l.name.as_str()).collect()
    }

    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// How many times each level's student has trained on a full cache.
    pub fn updates(&self) -> Vec<u64> {
        self.levels.iter().map(|l| l.updates).collect()
    }

    pub fn in_warmup(&self) -> bool {
        self.min_updates() < self.warmup_updates
    }

    /// The chance that level j's coin lets it answer: `1 − decaying_factor^k`,
    /// k its updates since exploration last (re)started.
    pub fn exploration_probability(&self, level: usize) -> f64 {
        let l = &self.levels[level];
        1.0 - l.decaying_factor.powf((l.updates - l.explored_from) as f64)
    }

    /// After a detected change (the teacher or the texts moved): exploration
    /// restarts, so the gates see the students' new errors on items the LLM
    /// labels, and the replay histories from before the change are dropped,
    /// so the students stop rehearsing labels that may no longer hold.
    pub fn reopen(&mut self) {
        for level in &mut self.levels {
            level.explored_from = level.updates;
            level.history.clear();
            level.history_probs.clear();
        }
    }

    pub fn mu(&self) -> f64 {
        self.mu
    }

    /// Changes the cost weight, e.g. for a budget controller.
    pub fn set_mu(&mut self, mu: f64) {
        self.mu = mu;
    }

    /// Lets students do batch work that changes no decision (embedding caches).
    pub fn precompute(&mut self, texts: &[&str]) -> Result<(), CascadeError> {
        for level in &mut self.levels {
            level
                .student
                .precompute(texts)
                .map_err(|e| level.error(e))?;
        }
        Ok(())
    }

    /// Everything the cascade has learned, as bytes: students, gates, caches,
    /// replay histories, counters, the budget controller and every RNG. A
    /// cascade built from the same config and given these bytes by
    /// [`Cascade::load_state`] makes the same decisions as this one from here on.
    pub fn save_state(&self) -> Result<Vec<u8>, CascadeError> {
        self.encode_state(true)
    }

    /// What was learned only (students, gates, caches, histories, counters),
    /// without the routing coins and budget controller, which in a cluster
    /// belong to each worker. Replicas that applied the same labels give the
    /// same bytes.
    pub fn save_learner_state(&self) -> Result<Vec<u8>, CascadeError> {
        self.encode_state(false)
    }

    /// Restores [`Cascade::save_learner_state`]'s bytes; this cascade keeps
    /// its own routing coins and budget controller.
    pub fn load_learner_state(&mut self, bytes: &[u8]) -> Result<(), CascadeError> {
        let router = (
            self.routing.clone(),
            self.budget.clone(),
            self.fixed_from_budget,
            self.rng.clone(),
        );
        let loaded = self.load_state(bytes);
        (self.routing, self.budget, self.fixed_from_budget, self.rng) = router;
        loaded
    }

    fn encode_state(&self, with_router: bool) -> Result<Vec<u8>, CascadeError> {
        let levels = self
            .levels
            .iter()
            .map(|level| {
                Ok(LevelState {
                    name: level.name.clone(),
                    student: level.student.save_state().map_err(|e| level.error(e))?,
                    cache: level.cache.clone(),
                    history: level.history.clone(),
                    cache_probs: level.cache_probs.clone(),
                    history_probs: level.history_probs.clone(),
                    replay_rng: level.replay_rng.clone(),
                    updates: level.updates,
                    explored_from: level.explored_from,
                })
            })
            .collect::<Result<_, CascadeError>>()?;
        let state = CascadeState {
            levels,
            gates: self.gates.clone(),
            labels: self.labels,
            mu: self.mu,
            routing: self.routing.clone(),
            budget: self.budget.clone().filter(|_| with_router),
            fixed_from_budget: self.fixed_from_budget && with_router,
            rng: if with_router {
                self.rng.clone()
            } else {
                ChaCha8Rng::seed_from_u64(0)
            },
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&state, &mut bytes)
            .map_err(|e| CascadeError::EncodeState(e.to_string()))?;
        Ok(bytes)
    }

    /// Restores [`Cascade::save_state`]'s bytes into a cascade built from the
    /// same config. After an error, build a fresh cascade: this one may be
    /// partly restored.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), CascadeError> {
        let state: CascadeState = ciborium::from_reader(bytes)
            .map_err(|e| CascadeError::UnreadableState(e.to_string()))?;
        let names: Vec<&str> = state.levels.iter().map(|l| l.name.as_str()).collect();
        if names != self.level_names() || state.labels != self.labels {
            return Err(CascadeError::StateMismatch(format!(
                "it has levels {names:?} and {} labels; this cascade has {:?} and {}",
                state.labels,
                self.level_names(),
                self.labels
            )));
        }
        let invalid = |what: &str| CascadeError::StateMismatch(what.to_string());
        if state.gates.len() != self.gates.len()
            || !self
                .gates
                .iter()
                .zip(&state.gates)
                .all(|(g, s)| g.same_shape(s))
        {
            return Err(invalid("gates"));
        }
        let labels_in_range =
            |items: &[(String, usize)]| items.iter().all(|(_, l)| *l < self.labels);
        if !state
            .levels
            .iter()
            .all(|l| labels_in_range(&l.cache) && labels_in_range(&l.history))
        {
            return Err(invalid("a cached label is out of range"));
        }
        // Distributions beside the labels: none (a state from before soft
        // labels) or one per label, each of the task's width.
        let probs_fit = |probs: &[Option<Vec<f32>>], labels: usize| {
            (probs.is_empty() || probs.len() == labels)
                && probs.iter().flatten().all(|p| p.len() == self.labels)
        };
        if !state.levels.iter().all(|l| {
            probs_fit(&l.cache_probs, l.cache.len()) && probs_fit(&l.history_probs, l.history.len())
        }) {
            return Err(invalid("cached label distributions"));
        }
        if state.levels.iter().any(|l| l.explored_from > l.updates) {
            return Err(invalid("exploration restarted after the last update"));
        }
        if let Routing::Fixed(probs) = &state.routing {
            if probs.len() != self.levels.len() || !probs.iter().all(|p| (0.0..=1.0).contains(p)) {
                return Err(invalid("routing probabilities"));
            }
        }
        if !state.mu.is_finite() {
            return Err(invalid("mu"));
        }
        for (level, saved) in self.levels.iter_mut().zip(&state.levels) {
            level
                .student
                .load_state(&saved.student)
                .map_err(|e| level.error(e))?;
        }
        for (level, saved) in self.levels.iter_mut().zip(state.levels) {
            level.cache_probs = pad(saved.cache_probs, saved.cache.len());
            level.history_probs = pad(saved.history_probs, saved.history.len());
            level.cache = saved.cache;
            level.history = saved.history;
            level.replay_rng = saved.replay_rng;
            level.updates = saved.updates;
            level.explored_from = saved.explored_from;
        }
        self.gates = state.gates;
        self.mu = state.mu;
        self.routing = state.routing;
        self.budget = state.budget;
        self.fixed_from_budget = state.fixed_from_budget;
        self.rng = state.rng;
        Ok(())
    }

    /// The deepest student's level and probabilities, for when the LLM gives
    /// no label. Changes nothing the cascade has learned.
    pub fn fallback(&mut self, text: &str) -> Result<(usize, Vec<f32>), CascadeError> {
        let level = self.levels.len() - 1;
        Ok((level, self.predict(level, text)?))
    }

    /// Fits corpus statistics of students configured to look ahead (`idf = "prefit"`).
    pub fn prefit(&mut self, corpus: &[&str]) {
        for level in &mut self.levels {
            level.student.prefit(corpus);
        }
    }

    /// Algorithm 1's inner loop for one query x: level j predicts p_j = f_j(x)
    /// and its policy either answers argmax p_j (later levels never run) or
    /// defers to level j + 1; past the last level the query goes to the LLM
    /// (`Outcome::Deferred`), and [`Cascade::learn`] takes the LLM's label y,
    /// adds (x, y) to every level's demonstrations and updates the gates and
    /// students. Only the levels the item reaches are evaluated.
    pub fn route(&mut self, text: &str) -> Result<Routed, CascadeError> {
        if !self.learns_from_log {
            self.observe(text);
        }
        let warmup = self.in_warmup();
        let allowance = self
            .budget
            .as_ref()
            .map_or(Allowance::Free, BudgetController::allowance);
        let routed = if warmup {
            self.route_warmup(text, allowance)?
        } else {
            if self.fixed_from_budget {
                self.fix_routing_from_budget();
            }
            self.walk_levels(text, allowance)?
        };
        if let Some(budget) = &mut self.budget {
            budget.record(matches!(routed.outcome, Outcome::Deferred(_)), warmup);
        }
        Ok(routed)
    }

    /// The walk down the levels, once warm-up is over.
    fn walk_levels(&mut self, text: &str, allowance: Allowance) -> Result<Routed, CascadeError> {
        let n = self.levels.len();
        let mut routed = Routed::unreached(n);
        for j in 0..n {
            // The budget's guards overrule the policy.
            let forced = match allowance {
                Allowance::MustDefer => Some(false),
                Allowance::MustAnswer if j == n - 1 => Some(true),
                _ => None,
            };
            let answer = match self.fixed_probability(j) {
                // The paper's policy: the gate reads p_j; the level answers when
                // the gate is under the threshold and its exploration coin allows.
                None => {
                    let (label, gate) = self.evaluate(j, text, &mut routed)?;
                    let answers = forced.unwrap_or_else(|| {
                        gate <= self.threshold(j) && self.coin(self.exploration_probability(j))
                    });
                    answers.then_some(label)
                }
                // The online ensemble: a fixed coin; the level runs only to
                // answer (with `combine_levels`, with the levels before it, as
                // the gated cascade's answer at level j would).
                Some(p) => {
                    if forced.unwrap_or_else(|| self.coin(p)) {
                        let probs = self.ensemble_probs(j, text)?;
                        let label = argmax(&probs);
                        routed.level_probs[j] = Some(probs);
                        Some(label)
                    } else {
                        None
                    }
                }
            };
            if let Some(label) = answer {
                routed.outcome = Outcome::Answered { level: j, label };
                return Ok(routed);
            }
        }
        // Every level deferred: the LLM answers. The gates learn from the
        // probabilities they acted on.
        let gate_inputs = (self.routing == Routing::Gated)
            .then(|| routed.level_probs.iter().flatten().cloned().collect());
        routed.outcome = self.defer(text, gate_inputs, false);
        Ok(routed)
    }

    /// Warm-up: the LLM answers while some student has trained too little.
    /// Once every level has trained a few times, all levels are evaluated so
    /// the gates learn (with calibration 0, as in the authors' code).
    fn route_warmup(&mut self, text: &str, allowance: Allowance) -> Result<Routed, CascadeError> {
        let n = self.levels.len();
        let mut routed = Routed::unreached(n);
        if allowance == Allowance::MustAnswer {
            // The budget is smaller than the warm-up: the deepest student answers.
            let (label, _) = self.evaluate(n - 1, text, &mut routed)?;
            routed.outcome = Outcome::Answered {
                level: n - 1,
                label,
            };
            return Ok(routed);
        }
        let gates_learn =
            self.routing == Routing::Gated && self.min_updates() > GATE_WARMUP_UPDATES;
        let gate_inputs = if gates_learn {
            for j in 0..n {
                self.evaluate(j, text, &mut routed)?;
            }
            Some(routed.level_probs.iter().flatten().cloned().collect())
        } else {
            None
        };
        routed.outcome = self.defer(text, gate_inputs, true);
        Ok(routed)
    }

    /// Level j's fixed answer probability (the online ensemble); `None` under gates.
    fn fixed_probability(&self, j: usize) -> Option<f64> {
        match &self.routing {
            Routing::Gated => None,
            Routing::Fixed(p) => Some(p[j]),
        }
    }

    /// The gate output at or under which level j may answer: 0.5 (the paper's
    /// rule), or the budget's priced threshold. Under `budget_prices = "last"`
    /// an earlier level is priced down only (never above 0.5): when the
    /// budget needs more LLM calls than the last level's deferrals give, the
    /// earlier levels must answer less too, or the guards would force the
    /// rest (ISEAR's 3-level cascade at 2,700 calls: 1,220 forced deferrals
    /// with the earlier levels held at 0.5).
    fn threshold(&self, j: usize) -> f32 {
        let priced = self
            .budget
            .as_ref()
            .map_or(0.5, BudgetController::answer_threshold);
        match self.priced_levels {
            PricedLevels::Last if j + 1 < self.levels.len() => priced.min(0.5),
            _ => priced,
        }
    }

    /// Online ensemble under a budget: every level answers with the same
    /// probability p, blind to the item, so that the LLM's share
    /// (1 − p)^levels spends the remaining budget evenly over the remaining
    /// items. Set again before every item: a coin fixed once drifts by its
    /// own variance (±30 calls on ISEAR at 1,500), and the guards then force
    /// the tail; the cascade's front-loaded pacing rate, used before, ran the
    /// budget out early and forced thousands.
    fn fix_routing_from_budget(&mut self) {
        let Some(budget) = &self.budget else { return };
        let defer_rate = budget.even_rate();
        let n = self.levels.len();
        let p = 1.0 - defer_rate.powf(1.0 / n as f64);
        self.routing = Routing::Fixed(vec![p; n]);
    }

    /// Learns from the LLM's label for a deferred item. `None` (the LLM gave no
    /// parsable label) teaches nothing.
    pub fn learn(&mut self, item: Deferred, label: Option<usize>) -> Result<(), CascadeError> {
        self.learn_with_probs(item, label, None)
    }

    /// [`Cascade::learn`] with the expert's probability per label, when it
    /// gives them: with `soft_label_weight` w > 0 the students learn the
    /// cross-entropy to (1 − w)·one-hot(label) + w·probabilities, and the
    /// gates' error target is that mixture's chance that a student's answer
    /// is not the expert's.
    pub fn learn_with_probs(
        &mut self,
        item: Deferred,
        label: Option<usize>,
        probs: Option<&[f32]>,
    ) -> Result<(), CascadeError> {
        let Some(label) = label else {
            return Ok(());
        };
        if label >= self.labels {
            return Err(CascadeError::InvalidLabel {
                label,
                labels: self.labels,
            });
        }
        let probs = match probs.filter(|_| self.soft_label_weight > 0.0) {
            Some(probs) => Some(self.soft_target(label, probs)?),
            None => None,
        };
        if let Some(inputs) = &item.gate_inputs {
            // A deferred item from a log may come from anywhere: check its shape.
            let fits = inputs.len() == self.levels.len()
                && inputs
                    .iter()
                    .all(|p| p.len() == self.labels && p.iter().all(|x| x.is_finite()));
            if !fits {
                return Err(CascadeError::MalformedDemonstration(format!(
                    "gate inputs must be {} rows of {} finite probabilities",
                    self.levels.len(),
                    self.labels
                )));
            }
        }
        if self.learns_from_log {
            self.observe(&item.text);
        }
        if let Some(inputs) = &item.gate_inputs {
            let examples: Vec<GateExample> = inputs
                .iter()
                .zip(&self.levels)
                .map(|(probs_j, level)| GateExample {
                    probs: probs_j,
                    label,
                    soft: probs.as_deref(),
                    calibration: if item.warmup { 0.0 } else { level.calibration },
                    cost: level.cost,
                })
                .collect();
            train_gates(&mut self.gates, &examples, self.mu);
        }
        for level in &mut self.levels {
            level.cache.push((item.text.clone(), label));
            level.cache_probs.push(probs.clone());
            if level.cache.len() >= level.cache_size {
                level.train_on_cache().map_err(|e| level.error(e))?;
            }
        }
        Ok(())
    }

    /// (1 − w)·one-hot(label) + w·the expert's distribution.
    fn soft_target(&self, label: usize, probs: &[f32]) -> Result<Vec<f32>, CascadeError> {
        let w = self.soft_label_weight;
        Ok(self
            .distribution(probs)?
            .iter()
            .enumerate()
            .map(|(k, q)| w * q + (1.0 - w) * f32::from(u8::from(k == label)))
            .collect())
    }

    /// The expert's probabilities as a distribution over this task's labels.
    fn distribution(&self, probs: &[f32]) -> Result<Vec<f32>, CascadeError> {
        let sum: f32 = probs.iter().sum();
        let fits = probs.len() == self.labels
            && probs.iter().all(|p| p.is_finite() && *p >= 0.0)
            && sum > 0.0;
        if !fits {
            return Err(CascadeError::MalformedDemonstration(format!(
                "the expert's probabilities must be {} finite, non-negative numbers with a positive sum, got {probs:?}",
                self.labels
            )));
        }
        Ok(probs.iter().map(|p| p / sum).collect())
    }

    fn observe(&mut self, text: &str) {
        for level in &mut self.levels {
            level.student.observe(text);
        }
    }

    fn min_updates(&self) -> u64 {
        self.levels.iter().map(|l| l.updates).min().unwrap_or(0)
    }

    fn predict(&mut self, level: usize, text: &str) -> Result<Vec<f32>, CascadeError> {
        let labels = self.labels;
        let level = &mut self.levels[level];
        let mut rows = level
            .student
            .predict_proba(&[text])
            .map_err(|e| level.error(e))?;
        match rows.pop() {
            Some(row) if row.len() == labels && rows.is_empty() => Ok(row),
            _ => Err(CascadeError::MalformedProbabilities {
                level: level.name.clone(),
            }),
        }
    }

    /// Level j's probabilities for the online ensemble: its own, or with
    /// `combine_levels` the mean over levels 0..=j (what `evaluate`'s running
    /// mean gives the gated cascade at level j).
    fn ensemble_probs(&mut self, j: usize, text: &str) -> Result<Vec<f32>, CascadeError> {
        let mut probs = self.predict(j, text)?;
        if self.combine_levels && j > 0 {
            for i in 0..j {
                for (p, q) in probs.iter_mut().zip(self.predict(i, text)?) {
                    *p += q;
                }
            }
            let levels = (j + 1) as f32;
            probs.iter_mut().for_each(|p| *p /= levels);
        }
        Ok(probs)
    }

    /// Runs level j's student and gate, records both, and returns (label, gate output).
    fn evaluate(
        &mut self,
        j: usize,
        text: &str,
        routed: &mut Routed,
    ) -> Result<(usize, f32), CascadeError> {
        let mut probs = self.predict(j, text)?;
        if self.combine_levels && j > 0 {
            // Levels 0..j were evaluated before j; level j-1 holds their mean.
            if let Some(previous) = &routed.level_probs[j - 1] {
                let weight = 1.0 / (j as f32 + 1.0);
                for (p, prev) in probs.iter_mut().zip(previous) {
                    *p = weight * *p + (1.0 - weight) * prev;
                }
            }
        }
        let gate = self.gates[j].forward(&probs).output;
        let label = argmax(&probs);
        routed.level_probs[j] = Some(probs);
        routed.gate_outputs[j] = Some(gate);
        Ok((label, gate))
    }

    fn defer(&self, text: &str, gate_inputs: Option<Vec<Vec<f32>>>, warmup: bool) -> Outcome {
        Outcome::Deferred(Deferred {
            text: text.to_owned(),
            gate_inputs,
            warmup,
        })
    }

    fn coin(&mut self, probability: f64) -> bool {
        self.rng.random::<f64>() < probability
    }
}

/// A saved state's distributions beside its labels: from a state written
/// before soft labels, none for each.
fn pad(mut probs: Vec<Option<Vec<f32>>>, labels: usize) -> Vec<Option<Vec<f32>>> {
    probs.resize(labels, None);
    probs
}

impl Level {
    /// A student's error, with the level's name.
    fn error(&self, source: StudentError) -> CascadeError {
        CascadeError::Student {
            level: self.name.clone(),
            source,
        }
    }

    fn train_on_cache(&mut self) -> Result<(), StudentError> {
        let replayed: Vec<usize> = if self.history.is_empty() {
            Vec::new()
        } else {
            (0..self.replay)
                .map(|_| self.replay_rng.random_range(0..self.history.len()))
                .collect()
        };
        let demos: Vec<Demonstration> = self
            .cache
            .iter()
            .zip(&self.cache_probs)
            .chain(
                replayed
                    .iter()
                    .map(|&i| (&self.history[i], &self.history_probs[i])),
            )
            .map(|((text, label), probs)| Demonstration {
                text,
                label: *label,
                probs: probs.as_deref(),
            })
            .collect();
        for _ in 0..self.epochs {
            for batch in demos.chunks(self.batch) {
                self.student.learn(batch)?;
            }
        }
        if self.replay > 0 {
            self.history.append(&mut self.cache);
            self.history_probs.append(&mut self.cache_probs);
        }
        self.cache.clear();
        self.cache_probs.clear();
        self.updates += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A student that always predicts the same distribution and counts its updates.
    struct Fixed {
        probs: Vec<f32>,
        seen: usize,
    }

    impl Student for Fixed {
        fn save_state(&self) -> Result<Vec<u8>, StudentError> {
            crate::student::encode_state(&self.seen)
        }
        fn load_state(&mut self, state: &[u8]) -> Result<(), StudentError> {
            self.seen = crate::student::decode_state(state)?;
            Ok(())
        }
        fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError> {
            Ok(texts.iter().map(|_| self.probs.clone()).collect())
        }
        fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError> {
            self.seen += batch.len();
            Ok(())
        }
    }

    fn config(levels: usize) -> CascadeConfig {
        let level = |j: usize| {
            format!(
                r#"
                [[levels]]
                name = "lr{j}"
                kind = "logreg"
                cost = 1
                cache_size = 4
                [levels.gate]
                decaying_factor = 0.5
                calibration = 0.3
                [levels.logreg]
                buckets = 1024
                "#
            )
        };
        let levels: String = (0..levels).map(level).collect();
        CascadeConfig::from_toml(&format!("mu = 0.1\nwarmup_updates = 3\n{levels}")).unwrap()
    }

    fn fixed_students(n: usize) -> Vec<Box<dyn Student>> {
        (0..n)
            .map(|_| {
                Box::new(Fixed {
                    probs: vec![0.9, 0.1],
                    seen: 0,
                }) as Box<dyn Student>
            })
            .collect()
    }

    #[test]
    fn llm_answers_during_warmup_and_students_fill_caches() {
        let mut c =
            Cascade::with_students(&config(2), fixed_students(2), 2, Routing::Gated).unwrap();
        for i in 0..12 {
            assert!(c.in_warmup(), "item {i}");
            let routed = c.route("text").unwrap();
            let Outcome::Deferred(item) = routed.outcome else {
                panic!("warm-up items go to the LLM");
            };
            c.learn(item, Some(0)).unwrap();
        }
        assert_eq!(c.updates(), vec![3, 3]);
        assert!(!c.in_warmup());
    }

    #[test]
    fn null_labels_teach_nothing() {
        let mut c =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        for _ in 0..8 {
            let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                panic!()
            };
            c.learn(item, None).unwrap();
        }
        assert_eq!(c.updates(), vec![0]);
        assert!(c.in_warmup());
    }

    #[test]
    fn invalid_labels_are_errors() {
        let mut c =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
            panic!()
        };
        assert!(matches!(
            c.learn(item, Some(2)),
            Err(CascadeError::InvalidLabel { label: 2, .. })
        ));
    }

    #[test]
    fn levels_are_evaluated_lazily() {
        // Fixed routing: level 0 always answers, so level 1 is never evaluated.
        let routing = Routing::Fixed(vec![1.0, 1.0]);
        let mut c = Cascade::with_students(&config(2), fixed_students(2), 2, routing).unwrap();
        for _ in 0..12 {
            let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                panic!()
            };
            c.learn(item, Some(0)).unwrap();
        }
        let routed = c.route("x").unwrap();
        assert!(matches!(
            routed.outcome,
            Outcome::Answered { level: 0, label: 0 }
        ));
        assert!(routed.level_probs[0].is_some());
        assert!(routed.level_probs[1].is_none());
    }

    #[test]
    fn fixed_routing_is_validated() {
        let err =
            Cascade::with_students(&config(2), fixed_students(2), 2, Routing::Fixed(vec![0.5]))
                .err()
                .unwrap();
        assert!(err.to_string().contains("one probability"));
    }

    #[test]
    fn exploration_grows_with_updates() {
        let mut c =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        assert_eq!(c.exploration_probability(0), 0.0);
        for _ in 0..8 {
            let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                panic!()
            };
            c.learn(item, Some(0)).unwrap();
        }
        assert!((c.exploration_probability(0) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn reopening_restarts_exploration_and_survives_a_checkpoint() {
        let mut c =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        for _ in 0..8 {
            let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                panic!()
            };
            c.learn(item, Some(0)).unwrap();
        }
        c.reopen();
        assert_eq!(c.exploration_probability(0), 0.0);
        let bytes = c.save_state().unwrap();
        let mut restored =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        restored.load_state(&bytes).unwrap();
        assert_eq!(restored.exploration_probability(0), 0.0);
        assert_eq!(restored.save_state().unwrap(), bytes);
    }

    /// The expert's distribution is kept beside its label through a
    /// checkpoint, checked, and ignored with `soft_labels = false`.
    #[test]
    fn soft_labels_are_kept_checked_and_optional() {
        let learn = |config: &CascadeConfig, probs: Option<&[f32]>| {
            let mut c =
                Cascade::with_students(config, fixed_students(1), 2, Routing::Gated).unwrap();
            for _ in 0..3 {
                let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                    panic!()
                };
                c.learn_with_probs(item, Some(0), probs).unwrap();
            }
            c
        };
        let mut pure = config(1);
        pure.soft_label_weight = 1.0;
        let soft = learn(&pure, Some(&[3.0, 1.0]));
        assert_eq!(soft.levels[0].cache_probs, vec![Some(vec![0.75, 0.25]); 3]);
        // Half and half with the label's one-hot row.
        let mut half = config(1);
        half.soft_label_weight = 0.5;
        let mixed = learn(&half, Some(&[3.0, 1.0]));
        assert_eq!(
            mixed.levels[0].cache_probs,
            vec![Some(vec![0.875, 0.125]); 3]
        );
        let bytes = soft.save_state().unwrap();
        let mut restored =
            Cascade::with_students(&config(1), fixed_students(1), 2, Routing::Gated).unwrap();
        restored.load_state(&bytes).unwrap();
        assert_eq!(restored.levels[0].cache_probs, soft.levels[0].cache_probs);
        // The default: the label alone.
        let hard = learn(&config(1), Some(&[3.0, 1.0]));
        assert_eq!(hard.levels[0].cache_probs, vec![None; 3]);
        // A distribution of the wrong width, or negative, is refused.
        let mut c = Cascade::with_students(&pure, fixed_students(1), 2, Routing::Gated).unwrap();
        for bad in [&[1.0f32][..], &[0.5, -0.1]] {
            let Outcome::Deferred(item) = c.route("x").unwrap().outcome else {
                panic!()
            };
            let refused = c.learn_with_probs(item, Some(0), Some(bad));
            assert!(matches!(
                refused,
                Err(CascadeError::MalformedDemonstration(_))
            ));
        }
    }
}
