//! An agreement target: answer like the LLM on at least a share A of the
//! items, with confidence 1 − δ at every point of the stream.
//!
//! An item the LLM answers agrees by definition; a student's answer agrees
//! when it equals the label the LLM would have given. Each student answer is
//! audited (also sent to the LLM, whose label is only compared) with a
//! probability α set before the coin; every student answer then gives one
//! observation, X = 1 − 1[audited and disagrees] / (α c) with c = 1 /
//! [`MIN_AUDIT_RATE`], whose conditional mean is 1 − e/c for the answer's
//! chance e of disagreeing, whatever α was (inverse-probability weighting:
//! audits may be frequent early and rare later without biasing the bound).
//! A confidence sequence on the X's gives L = 1 − c(1 − its lower bound), an
//! anytime-valid lower bound on the students' average agreement. With s
//! student answers among n items the stream's agreement is then at least
//! 1 − s(1 − L)/n, at every n at once. The controller keeps that bound at or
//! above A:
//! - a student may answer the next item only if (s + 1)(1 − L) ≤ (1 − A)(n + 1)
//!   (otherwise the item goes to the LLM);
//! - the gates are priced toward the LLM share that would spend the slack
//!   over as many items again as were seen, so the answers students keep are
//!   those their gates are surest of;
//! - audits are frequent while the bound is loose and rare once it is tight:
//!   the audit rate is twice the gap between the estimate and L, within
//!   [`MIN_AUDIT_RATE`, 1].
//!
//! After a detected change (`drift.rs`) the controller starts a new epoch:
//! the bound of the items so far is frozen as it stands (a confidence
//! sequence holds at any stopping time), and the items from here on must meet
//! A by themselves, under a fresh sequence. Epoch k spends δ(1 − r)r^k of δ
//! (r = [`EPOCH_RATIO`]), so all epochs together spend at most δ, and the
//! stream, a union of epochs each at or above A, stays at or above A.

use serde::{Deserialize, Serialize};

use crate::confidence::LowerConfidenceSequence;

/// Audits never stop entirely: the bound must follow the students as they change.
pub const MIN_AUDIT_RATE: f64 = 0.1;

/// λ of the bound on the realized disagreements' excess (`errors_bound`):
/// near-optimal for the variance of a few hundred to a thousand errors.
const NOISE_BET: f64 = 0.1;

/// Epoch k of the target spends δ(1 − r)r^k: most of δ goes to the first.
pub const EPOCH_RATIO: f64 = 0.2;

/// The fewest items over which the controller plans to spend its slack.
pub const HORIZON: u64 = 500;

/// A share of items to answer as the LLM would, with a confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AgreementTarget {
    pub agreement: f64,
    pub confidence: f64,
}

/// Why a target is refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be in (0, 1), got {value}")]
pub struct InvalidTarget {
    pub field: &'static str,
    pub value: f64,
}

impl AgreementTarget {
    pub fn new(agreement: f64, confidence: f64) -> Result<Self, InvalidTarget> {
        for (field, value) in [("target_agreement", agreement), ("confidence", confidence)] {
            if !(value > 0.0 && value < 1.0) {
                return Err(InvalidTarget { field, value });
            }
        }
        Ok(Self {
            agreement,
            confidence,
        })
    }
}

/// The controller's state: the items counted and the audits' bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementController {
    target: AgreementTarget,
    bound: LowerConfidenceSequence,
    /// Items answered (by a student or the LLM) in this epoch.
    items: u64,
    /// Of them, answered by a student (audited ones included).
    student_answers: u64,
    audits: u64,
    /// Epochs ended by a detected change, and their items and bound on
    /// disagreements, frozen.
    #[serde(default)]
    epoch: u32,
    #[serde(default)]
    frozen_items: u64,
    #[serde(default)]
    frozen_errors: f64,
}

/// The weight's scale: X = 1 − 1[audited, disagrees]/(α c) stays in [0, 1].
const SCALE: f64 = 1.0 / MIN_AUDIT_RATE;

impl AgreementController {
    pub fn new(target: AgreementTarget) -> Self {
        Self {
            target,
            bound: Self::sequence(target, 0),
            items: 0,
            student_answers: 0,
            audits: 0,
            epoch: 0,
            frozen_items: 0,
            frozen_errors: 0.0,
        }
    }

    /// Epoch k's share of δ.
    fn delta(target: AgreementTarget, epoch: u32) -> f64 {
        (1.0 - target.confidence) * (1.0 - EPOCH_RATIO) * EPOCH_RATIO.powi(epoch as i32)
    }

    /// Half of the epoch's δ for the students' expected agreement, half for
    /// the noise of the realized one around it (`errors_bound`); the target's
    /// confidence is checked in (0, 1).
    fn sequence(target: AgreementTarget, epoch: u32) -> LowerConfidenceSequence {
        LowerConfidenceSequence::new(1.0 - Self::delta(target, epoch) / 2.0).unwrap_or_default()
    }

    /// A change was detected: the items so far keep the bound they have, and
    /// those from here on must meet the target by themselves.
    pub fn start_epoch(&mut self) {
        self.frozen_errors += self.errors_bound(self.student_answers);
        self.frozen_items += self.items;
        self.epoch += 1;
        self.bound = Self::sequence(self.target, self.epoch);
        self.items = 0;
        self.student_answers = 0;
    }

    /// Epochs started by a detected change.
    pub fn epochs_restarted(&self) -> u32 {
        self.epoch
    }

    pub fn target(&self) -> AgreementTarget {
        self.target
    }

    /// One item answered, by a student or not.
    pub fn record(&mut self, by_student: bool) {
        self.items += 1;
        self.student_answers += u64::from(by_student);
    }

    /// A student answer that was not audited.
    pub fn observe_unaudited(&mut self) {
        self.bound.observe(1.0);
    }

    /// A student answer audited with probability `audit_rate`: did it agree
    /// with the LLM? (`None`: the LLM gave no label, counted as a disagreement.)
    pub fn observe_audit(&mut self, agrees: Option<bool>, audit_rate: f64) {
        self.audits += 1;
        let rate = audit_rate.clamp(MIN_AUDIT_RATE, 1.0);
        let disagrees = f64::from(u8::from(agrees != Some(true)));
        self.bound.observe(1.0 - disagrees / (rate * SCALE));
    }

    /// L: the students' agreement is at least this, at every point, with the
    /// target's confidence.
    pub fn student_bound(&self) -> f64 {
        (1.0 - SCALE * (1.0 - self.bound.lower())).max(0.0)
    }

    /// The stream's agreement so far is at least this (1 when nothing was answered).
    pub fn agreement_bound(&self) -> f64 {
        let items = self.frozen_items + self.items;
        if items == 0 {
            return 1.0;
        }
        let errors = self.frozen_errors + self.errors_bound(self.student_answers);
        (1.0 - errors / items as f64).max(0.0)
    }

    /// Whether a student answering the next item would break the bound.
    pub fn must_defer(&self) -> bool {
        self.errors_bound(self.student_answers + 1)
            > (1.0 - self.target.agreement) * (self.items + 1) as f64
    }

    /// A bound on the disagreements among `answers` student answers, as
    /// they fell, not as expected: the expected ones, E = answers × (1 − L)
    /// (the confidence sequence, at half of δ), and the realized ones' excess
    /// over them, a martingale with steps at most 1 whose variance is at most
    /// E: by Ville's inequality on exp(λ S − (e^λ − 1 − λ) V), at every point
    /// it stays under log(2/δ)/λ + (e^λ − 1 − λ)/λ · E (the other half of δ).
    fn errors_bound(&self, answers: u64) -> f64 {
        if answers == 0 {
            return 0.0;
        }
        let expected = answers as f64 * (1.0 - self.student_bound());
        let delta = Self::delta(self.target, self.epoch);
        expected * (1.0 + Self::psi()) + (2.0 / delta).ln() / NOISE_BET
    }

    /// (e^λ − 1 − λ)/λ: the noise term's share of the expected disagreements.
    fn psi() -> f64 {
        (NOISE_BET.exp() - 1.0 - NOISE_BET) / NOISE_BET
    }

    /// The LLM share to price toward: the one whose student answers, over as
    /// many items again as were seen (at least [`HORIZON`]), would end with
    /// the bound at A: the slack earned so far is spent, not hoarded.
    pub fn llm_rate(&self) -> f64 {
        let horizon = self.items.max(HORIZON) as f64;
        let errors_allowed = (1.0 - self.target.agreement) * (self.items as f64 + horizon);
        let errors_bound = self.errors_bound(self.student_answers);
        // The bound's slope per further student answer.
        let per_answer = (1.0 + Self::psi()) * (1.0 - self.student_bound());
        let student_share = (errors_allowed - errors_bound) / (horizon * per_answer.max(1e-12));
        (1.0 - student_share).clamp(0.0, 1.0)
    }

    /// The share of student answers to audit now: twice the gap between the
    /// students' estimated disagreement and its bound.
    pub fn audit_rate(&self) -> f64 {
        let gap = self
            .bound
            .mean()
            .map_or(1.0, |mean| SCALE * (mean - self.bound.lower()));
        (2.0 * gap).clamp(MIN_AUDIT_RATE, 1.0)
    }

    pub fn audits(&self) -> u64 {
        self.audits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_outside_the_open_unit_interval_are_refused_by_field() {
        assert!(AgreementTarget::new(0.95, 0.95).is_ok());
        for (a, c, field) in [
            (0.0, 0.95, "target_agreement"),
            (1.0, 0.95, "target_agreement"),
            (f64::NAN, 0.95, "target_agreement"),
            (0.9, 1.0, "confidence"),
            (0.9, -0.1, "confidence"),
        ] {
            assert_eq!(AgreementTarget::new(a, c).unwrap_err().field, field);
        }
    }

    #[test]
    fn students_answer_only_as_far_as_the_bound_allows() {
        let mut c = AgreementController::new(AgreementTarget::new(0.9, 0.95).unwrap());
        // No audits yet: L = 0, and the realized errors may exceed the
        // expected ones by log(2/δ)/λ ≈ 37: the LLM answers the first ~380
        // items before one student answer fits under A = 0.9.
        assert_eq!(c.student_bound(), 0.0);
        assert!(c.must_defer(), "the first item cannot go to a student");
        let mut llm = 0;
        while c.must_defer() {
            c.record(false);
            llm += 1;
        }
        assert!((300..500).contains(&llm), "{llm}");
        c.record(true);
        c.observe_audit(Some(true), 1.0);
        assert!(c.agreement_bound() >= 0.9 - 1e-9);
        // Student answers that always agree when audited raise L, and with
        // it the students' share.
        for i in 0..3000 {
            c.record(true);
            if i % 4 == 0 {
                c.observe_audit(Some(true), 0.25);
            } else {
                c.observe_unaudited();
            }
        }
        assert!(c.student_bound() > 0.9, "{}", c.student_bound());
        assert!(!c.must_defer());
        assert_eq!(c.llm_rate(), 0.0);
        assert!(c.audit_rate() < 0.2, "a tight bound needs few audits");
        assert_eq!(c.audits(), 751);
    }

    /// After a change, the items so far keep the bound they had, and the
    /// new epoch must meet the target by itself before students answer.
    #[test]
    fn a_new_epoch_keeps_the_old_bound_and_starts_over() {
        let mut c = AgreementController::new(AgreementTarget::new(0.9, 0.95).unwrap());
        while c.must_defer() {
            c.record(false);
        }
        for _ in 0..4000 {
            c.record(true);
            c.observe_audit(Some(true), 1.0);
        }
        let (items, bound) = (c.items, c.agreement_bound());
        assert!(!c.must_defer() && bound > 0.95, "{bound}");
        c.start_epoch();
        assert_eq!(c.epochs_restarted(), 1);
        // Nothing answered since: the stream's bound is the old one.
        assert!((c.agreement_bound() - bound).abs() < 1e-12);
        assert!(c.must_defer(), "the new epoch has no evidence yet");
        assert_eq!(c.audit_rate(), 1.0);
        // Its δ is a fifth of the first's: a longer all-LLM start.
        let mut llm = 0;
        while c.must_defer() {
            c.record(false);
            llm += 1;
        }
        assert!((400..600).contains(&llm), "{llm}");
        assert_eq!(c.frozen_items, items);
    }

    #[test]
    fn audits_are_frequent_while_the_bound_is_loose() {
        let mut c = AgreementController::new(AgreementTarget::new(0.95, 0.95).unwrap());
        assert_eq!(c.audit_rate(), 1.0);
        for i in 0..4000 {
            c.observe_audit(Some(i % 10 != 0), 1.0);
        }
        let rate = c.audit_rate();
        assert!((MIN_AUDIT_RATE..0.3).contains(&rate), "{rate}");
    }

    /// Audit rates that fall over the stream do not bias the bound: with
    /// the students' agreement 0.9 throughout, audited at 100% early and at
    /// the floor later, L stays at or under 0.9 throughout in at least 95%
    /// of 300 streams.
    #[test]
    fn a_falling_audit_rate_keeps_the_bound_valid() {
        use rand::{Rng, SeedableRng};
        let mut covered = 0;
        for seed in 0..300 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut c = AgreementController::new(AgreementTarget::new(0.8, 0.95).unwrap());
            let mut held = true;
            for i in 0..3000 {
                let rate = if i < 300 { 1.0 } else { MIN_AUDIT_RATE };
                if rng.random::<f64>() < rate {
                    c.observe_audit(Some(rng.random::<f64>() < 0.9), rate);
                } else {
                    c.observe_unaudited();
                }
                held &= c.student_bound() <= 0.9;
            }
            covered += usize::from(held);
        }
        assert!(covered >= 285, "covered in {covered} of 300 streams");
    }
}
