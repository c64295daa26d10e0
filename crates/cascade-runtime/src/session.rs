//! The session engine: the per-item cycle every front end drives.
//!
//! `route` decides who answers (and, by a coin of its own, whether a student's
//! answer is also audited); an item that needs the expert comes back as a
//! [`Ticket`]. Whoever holds the ticket asks the expert however it likes
//! (at once, concurrently, over the network) and hands the answer to
//! `settle`, which learns the label, applies the failure policy, or compares
//! an audit (an audited answer the LLM disagrees with gets the LLM's label:
//! the call is paid for). Every item is counted exactly once, when settled.

use cascade::{Cascade, Deferred, Outcome};
use cascade_expert::{Answer, ExpertError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// What to do when the expert gives no label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpertFailure {
    /// The deepest student answers, with `status: "expert_unavailable"`.
    Student,
    /// The item gets an error record (in a replay: an LLM answer without a label).
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
    /// A student's audited answer the LLM disagreed with: the LLM's label
    /// is given (the call is paid for). Counted as the level's answer.
    Corrected {
        level: usize,
        student_label: usize,
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
    /// The label given, if any.
    pub fn label(&self) -> Option<usize> {
        match self {
            Self::Student { label, .. }
            | Self::Llm { label }
            | Self::Corrected { label, .. }
            | Self::Fallback { label, .. } => Some(*label),
            Self::Failed { .. } | Self::BadInput { .. } => None,
        }
    }

    /// The student level that answered (a fallback's too), if one did.
    pub fn level(&self) -> Option<usize> {
        match self {
            Self::Student { level, .. }
            | Self::Corrected { level, .. }
            | Self::Fallback { level, .. } => Some(*level),
            Self::Llm { .. } | Self::Failed { .. } | Self::BadInput { .. } => None,
        }
    }

    /// Who answered: a level's name, `"llm"` (a corrected audit too), or nobody.
    pub fn answered_by<'a>(&self, levels: &'a [String]) -> Option<&'a str> {
        match self {
            Self::Llm { .. } | Self::Corrected { .. } => Some("llm"),
            _ => self.level().and_then(|l| levels.get(l)).map(String::as_str),
        }
    }

    /// The answering student's probability per label.
    pub fn probs(&self) -> Option<&[f32]> {
        match self {
            Self::Student { probs, .. } => probs.as_deref(),
            Self::Fallback { probs, .. } => Some(probs),
            Self::Llm { .. }
            | Self::Corrected { .. }
            | Self::Failed { .. }
            | Self::BadInput { .. } => None,
        }
    }

    /// `ok`, `expert_unavailable`, `error` or `bad_input`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Student { .. } | Self::Llm { .. } | Self::Corrected { .. } => "ok",
            Self::Fallback { .. } => "expert_unavailable",
            Self::Failed { .. } => "error",
            Self::BadInput { .. } => "bad_input",
        }
    }

    /// Why the item has no answer from whom it should have had one.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Fallback { reason, .. } | Self::Failed { reason } | Self::BadInput { reason } => {
                Some(reason)
            }
            Self::Student { .. } | Self::Llm { .. } | Self::Corrected { .. } => None,
        }
    }
}

/// Counters of a session; checkpointed with it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub lines: u64,
    pub answered: Vec<u64>,
    /// Deferred items the expert answered.
    pub llm: u64,
    pub bad_input: u64,
    pub expert_unavailable: u64,
    pub errors: u64,
    pub audits: u64,
    pub audit_agreements: u64,
    /// Audited answers the LLM disagreed with, given the LLM's label.
    #[serde(default)]
    pub corrected: u64,
    /// An anytime-valid 95% lower bound on the audited agreement: it holds at
    /// every point of the stream at once, so it may be watched after every
    /// item (the Wilson interval holds at one fixed count only).
    #[serde(default)]
    pub audit_bound: cascade::LowerConfidenceSequence,
    /// The agreement target's controller, when the session has one.
    #[serde(default)]
    pub agreement: Option<cascade::AgreementController>,
    /// The change detector on the audits (with drift recovery).
    #[serde(default)]
    pub drift: cascade::DriftDetector,
    /// The lines at which a change was detected and the cascade re-opened.
    #[serde(default)]
    pub reopened: Vec<u64>,
}

impl Counts {
    pub fn new(levels: usize) -> Self {
        Self {
            answered: vec![0; levels],
            ..Self::default()
        }
    }

    fn add(&mut self, settled: &Settled) {
        self.lines += 1;
        if let Some(agreement) = &mut self.agreement {
            match settled {
                Settled::Student { .. } | Settled::Corrected { .. } | Settled::Fallback { .. } => {
                    agreement.record(true)
                }
                Settled::Llm { .. } => agreement.record(false),
                Settled::Failed { .. } | Settled::BadInput { .. } => {}
            }
        }
        match settled {
            Settled::Student { level, .. } => self.answered[*level] += 1,
            Settled::Corrected { level, .. } => {
                self.answered[*level] += 1;
                self.corrected += 1;
            }
            Settled::Llm { .. } => self.llm += 1,
            Settled::Fallback { .. } => self.expert_unavailable += 1,
            Settled::Failed { .. } => self.errors += 1,
            Settled::BadInput { .. } => self.bad_input += 1,
        }
    }

    /// Items the expert was asked to label because the cascade deferred them
    /// (answered or not; audits not included).
    pub fn deferred(&self) -> u64 {
        self.llm + self.expert_unavailable + self.errors
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
        if let Some(agreement) = &self.agreement {
            let target = agreement.target();
            line += &format!(
                "; agreement ≥ {:.3} (target {}, {:.0}% at every point; {} audits)",
                agreement.agreement_bound(),
                target.agreement,
                100.0 * target.confidence,
                agreement.audits()
            );
        }
        if let Some(last) = self.reopened.last() {
            line += &format!(
                "; re-opened after a change {} time(s), last at line {last}",
                self.reopened.len()
            );
        }
        if let Some((p, half)) = self.audited_agreement() {
            line += &format!(
                "; audited agreement {p:.3} ± {half:.3} ({} audits; ≥ {:.3} at every point, 95%)",
                self.audits,
                self.audit_bound.lower()
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

/// The result of routing one item.
#[derive(Debug)]
pub struct Routed {
    pub next: Next,
    /// Gate output of each level that was evaluated.
    pub gate_outputs: Vec<Option<f32>>,
}

#[derive(Debug)]
pub enum Next {
    /// A student answered; the item is settled and counted.
    Done(Settled),
    /// Ask the expert, then hand its answer to [`Session::settle`].
    Ask(Ticket),
}

/// An item waiting for the expert.
#[derive(Debug)]
pub struct Ticket {
    text: String,
    waiting: Waiting,
}

#[derive(Debug)]
enum Waiting {
    /// A deferred item: its label is learned.
    Label(Deferred),
    /// An audited student answer: the expert's label is compared, never learned.
    Audit(Settled),
}

impl Ticket {
    pub fn text(&self) -> &str {
        &self.text
    }

    /// An audit (a student answered; the expert's label is compared, and given when they differ).
    pub fn is_audit(&self) -> bool {
        matches!(self.waiting, Waiting::Audit(..))
    }
}

/// The expert's label for a deferred item, with what routing computed for
/// it: what the cascade learns from, and what a cluster's log of labels holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demonstration {
    pub deferred: Deferred,
    pub label: usize,
    /// The expert's probability per label, when it gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<f32>>,
}

/// The session's settings beside the cascade's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionOptions {
    /// Share of student answers also sent to the expert, to measure agreement
    /// without bias; audits never train the cascade.
    pub audit_rate: f64,
    pub on_failure: OnExpertFailure,
    /// An agreement target: its bound counts on `audit_rate`, and it sets
    /// the price of the cascade's budget (`cascade::target`).
    pub target: Option<cascade::AgreementTarget>,
    /// Re-open the cascade when the audits show a change (`drift_recovery`).
    pub drift_recovery: bool,
}

/// After a change, at least this share of student answers is audited...
pub const RECOVERY_AUDIT_RATE: f64 = 0.2;
/// ...for this many items: the detector and the bound follow the new regime.
pub const RECOVERY_ITEMS: u64 = 1000;

/// What a session saves beside the cascade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionState {
    pub counts: Counts,
    pub audit_rng: ChaCha8Rng,
    #[serde(with = "serde_bytes")]
    pub cascade: Vec<u8>,
}

/// A cascade and the per-item cycle around it.
pub struct Session {
    cascade: Cascade,
    level_names: Vec<String>,
    counts: Counts,
    options: SessionOptions,
    /// Its own stream, so audits never move the cascade's coins.
    audit_rng: ChaCha8Rng,
}

impl Session {
    pub fn new(cascade: Cascade, seed: u64, options: SessionOptions) -> Self {
        let level_names: Vec<String> = cascade
            .level_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut counts = Counts::new(level_names.len());
        counts.agreement = options
            .target
            .map(|target| cascade::AgreementController::new(target, options.audit_rate));
        Self {
            counts,
            level_names,
            cascade,
            options,
            audit_rng: ChaCha8Rng::seed_from_u64(seed ^ 0xa0d1),
        }
    }

    /// Decides who answers `text`.
    pub fn route(&mut self, text: &str) -> Result<Routed> {
        let audit_rate = match &self.counts.agreement {
            // A target's audits keep one rate: its bound counts on it.
            Some(agreement) => {
                self.cascade
                    .steer_budget(agreement.price(), agreement.must_defer());
                agreement.audit_rate()
            }
            None => match self.counts.reopened.last() {
                Some(&line) if self.counts.lines < line + RECOVERY_ITEMS => {
                    self.options.audit_rate.max(RECOVERY_AUDIT_RATE)
                }
                _ => self.options.audit_rate,
            },
        };
        let routed = self.cascade.route(text)?;
        let next = match routed.outcome {
            Outcome::Answered { level, label } => {
                let settled = Settled::Student {
                    level,
                    label,
                    probs: routed.level_probs[level].clone(),
                };
                if self.audit_rng.random::<f64>() < audit_rate {
                    Next::Ask(Ticket {
                        text: text.to_string(),
                        waiting: Waiting::Audit(settled),
                    })
                } else {
                    self.counts.add(&settled);
                    Next::Done(settled)
                }
            }
            Outcome::Deferred(deferred) => Next::Ask(Ticket {
                text: text.to_string(),
                waiting: Waiting::Label(deferred),
            }),
        };
        Ok(Routed {
            next,
            gate_outputs: routed.gate_outputs,
        })
    }

    /// Ends a ticket with the expert's answer: a deferred item's label is
    /// learned (no label teaches nothing, and the failure policy answers); an
    /// audit is compared with the student's answer, and the LLM's label
    /// given when they differ.
    pub fn settle(
        &mut self,
        ticket: Ticket,
        answer: std::result::Result<Answer, ExpertError>,
    ) -> Result<Settled> {
        let (settled, demonstration) = self.settle_unlearned(ticket, answer)?;
        if let Some(demonstration) = demonstration {
            self.learn(demonstration)?;
        }
        Ok(settled)
    }

    /// [`Session::settle`] without the learning: the label comes back as a
    /// [`Demonstration`] for the caller to log. A cluster worker publishes it
    /// and learns it, like every other worker, when the log delivers it.
    pub fn settle_unlearned(
        &mut self,
        ticket: Ticket,
        answer: std::result::Result<Answer, ExpertError>,
    ) -> Result<(Settled, Option<Demonstration>)> {
        let (settled, demonstration) = match (ticket.waiting, answer) {
            (Waiting::Audit(settled), answer) => {
                let agrees = match (&answer, &settled) {
                    (Ok(answer), Settled::Student { label, .. }) => Some(*label == answer.label),
                    _ => None,
                };
                if let Some(agrees) = agrees {
                    self.counts.audits += 1;
                    self.counts.audit_agreements += u64::from(agrees);
                    self.counts.audit_bound.observe(f64::from(u8::from(agrees)));
                }
                if let Some(agreement) = &mut self.counts.agreement {
                    // No label from the LLM counts against the students.
                    agreement.observe_audit(agrees);
                }
                if let Some(agrees) = agrees {
                    if self.options.drift_recovery && self.counts.drift.observe(!agrees) {
                        self.reopen();
                    }
                }
                let settled = match (settled, answer) {
                    (Settled::Student { level, label, .. }, Ok(answer))
                        if label != answer.label =>
                    {
                        Settled::Corrected {
                            level,
                            student_label: label,
                            label: answer.label,
                        }
                    }
                    (settled, _) => settled,
                };
                (settled, None)
            }
            (Waiting::Label(deferred), Ok(answer)) => (
                Settled::Llm {
                    label: answer.label,
                },
                Some(Demonstration {
                    deferred,
                    label: answer.label,
                    probs: answer.probs,
                }),
            ),
            (Waiting::Label(_), Err(error)) => {
                let reason = error.to_string();
                let settled = match self.options.on_failure {
                    OnExpertFailure::Student => {
                        let (level, probs) = self.cascade.fallback(&ticket.text)?;
                        Settled::Fallback {
                            level,
                            label: cascade::gate::argmax(&probs),
                            probs,
                            reason,
                        }
                    }
                    OnExpertFailure::Error => Settled::Failed { reason },
                };
                (settled, None)
            }
        };
        self.counts.add(&settled);
        Ok((settled, demonstration))
    }

    /// Learns the expert's label for a deferred item (and its distribution,
    /// when the expert gave one: soft labels).
    pub fn learn(&mut self, demonstration: Demonstration) -> Result<()> {
        self.cascade.learn_with_probs(
            demonstration.deferred,
            Some(demonstration.label),
            demonstration.probs.as_deref(),
        )?;
        Ok(())
    }

    /// The audits show a change: the cascade re-opens (exploration restarts,
    /// replay forgets), a target starts a new epoch, and audits rise for
    /// [`RECOVERY_ITEMS`] items.
    fn reopen(&mut self) {
        self.cascade.reopen();
        if let Some(agreement) = &mut self.counts.agreement {
            agreement.start_epoch();
        }
        self.counts.reopened.push(self.counts.lines);
    }

    /// Learning comes only from a shared log of labels (a cluster worker):
    /// nothing a worker sees alone, such as its audits, may change the
    /// learner, so drift recovery is off.
    pub fn learn_from_log(&mut self) {
        self.cascade.learn_from_log();
        self.options.drift_recovery = false;
    }

    /// An input that is not an item: counted, never routed.
    pub fn bad_input(&mut self, reason: String) -> Settled {
        let settled = Settled::BadInput { reason };
        self.counts.add(&settled);
        settled
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    pub fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    /// Work that changes no decision (prefit statistics, embedding caches).
    pub fn cascade_mut(&mut self) -> &mut Cascade {
        &mut self.cascade
    }

    pub fn level_names(&self) -> &[String] {
        &self.level_names
    }

    pub fn options(&self) -> SessionOptions {
        self.options
    }

    /// Seeds the routing and audit coins afresh (a cluster worker mixes in
    /// its name, so that workers do not flip the same coins).
    pub fn reseed(&mut self, seed: u64) {
        self.cascade.reseed_routing(seed);
        self.audit_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa0d1);
    }

    /// Everything the session has learned and counted.
    pub fn save_state(&self) -> Result<SessionState> {
        Ok(SessionState {
            counts: self.counts.clone(),
            audit_rng: self.audit_rng.clone(),
            cascade: self.cascade.save_state()?,
        })
    }

    /// Restores [`Session::save_state`] into a session built from the same config.
    pub fn load_state(&mut self, state: SessionState) -> Result<()> {
        if state.counts.answered.len() != self.level_names.len() {
            return Err(crate::RuntimeError::setting(
                "state",
                format!(
                    "the saved counts have {} levels; this cascade has {}",
                    state.counts.answered.len(),
                    self.level_names.len()
                ),
            ));
        }
        self.cascade.load_state(&state.cascade)?;
        self.counts = state.counts;
        self.audit_rng = state.audit_rng;
        Ok(())
    }
}

impl Settled {
    /// The output record of `run` and `serve`, its id exactly as the input
    /// wrote it (`line` is omitted when `None`).
    pub fn record<'a>(
        &self,
        line: Option<usize>,
        id: &'a crate::input::ItemId,
        task: &cascade_expert::Task,
        levels: &[String],
    ) -> crate::input::Record<'a> {
        let mut fields = serde_json::json!({
            "label": self.label().map(|l| &task.labels()[l]),
            "answered_by": self.answered_by(levels),
            "probs": self.probs(),
            "status": self.status(),
        });
        if let Some(error) = self.error() {
            fields["error"] = error.into();
        }
        crate::input::Record { line, id, fields }
    }
}

impl SessionOptions {
    /// The share of student answers audited: as given, or by default under
    /// an agreement target [`cascade::target::DEFAULT_AUDIT_RATE`], else the
    /// deepest level's floor of exploration, `1 − decaying_factor` (0.03 for
    /// the authors' 0.97): where exploration fades, a small share stays.
    pub fn audit_rate(given: Option<f64>, config: &cascade::CascadeConfig) -> Result<f64> {
        let target = config.target_agreement.is_some();
        let rate = match given {
            Some(rate) => rate,
            None if target => cascade::target::DEFAULT_AUDIT_RATE,
            None => config
                .levels
                .last()
                .map_or(0.0, |level| 1.0 - level.gate.decaying_factor),
        };
        if !(0.0..=1.0).contains(&rate) {
            return Err(crate::RuntimeError::setting(
                "--audit-rate",
                format!("must be in [0, 1], got {rate}"),
            ));
        }
        if target && rate == 0.0 {
            return Err(crate::RuntimeError::setting(
                "--audit-rate",
                "must be above 0 under an agreement target: its bound rests on the audits",
            ));
        }
        Ok(rate)
    }
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
        let config = cascade::CascadeConfig::from_toml(
            "mu = 1e-4\n[[levels]]\nkind = \"logreg\"\ncost = 1\ncache_size = 4\n[levels.gate]\ndecaying_factor = 0.97\ncalibration = 0.4\n",
        )
        .unwrap();
        let rate = |given| SessionOptions::audit_rate(given, &config);
        assert!((rate(None).unwrap() - 0.03).abs() < 1e-12);
        assert_eq!(rate(Some(0.5)).unwrap(), 0.5);
        assert!(rate(Some(1.5)).is_err());
        // Under a target: its own default, and never 0 (its bound rests on audits).
        let mut target = config.clone();
        target.target_agreement = Some(0.9);
        let rate = |given| SessionOptions::audit_rate(given, &target);
        assert_eq!(rate(None).unwrap(), cascade::target::DEFAULT_AUDIT_RATE);
        let refused = rate(Some(0.0)).unwrap_err().to_string();
        assert!(refused.contains("--audit-rate"), "{refused}");
    }
}
