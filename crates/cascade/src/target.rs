//! An agreement target: answer like the LLM on at least a share A of the
//! items, with confidence 1 − δ at every point of the stream.
//!
//! An item the LLM answers agrees by definition; a student's answer agrees
//! when it equals the label the LLM would have given. Each student answer is
//! audited (also sent to the LLM, whose label is only compared) by a coin of
//! fixed probability α. What must stay small is the number E of student
//! answers that disagree, as they fell (not as expected). Let d_i = 1 when
//! answer i disagrees and a_i = 1 when it was audited; the audits' estimate
//! Ŝ = Σ a_i d_i / α and Z_i = d_i − a_i d_i / α form a martingale (the coin
//! is independent of d_i). Given the past, a disagreeing answer's Z_i is
//! 1 − 1/α with probability α and 1 otherwise, so its exact log moment
//! generating function is ψ(λ) = ln(α e^{λ(1 − 1/α)} + (1 − α) e^λ), and
//! exp(λ ΣZ − ψ(λ) E) is a martingale. By Ville's inequality, with
//! probability 1 − δ', at every n at once,
//!
//!   E (1 − κ_λ) ≤ Ŝ + log(1/δ')/λ,   κ_λ = ψ(λ)/λ = 1 + ln(1 − α + α e^{−λ/α})/λ,
//!
//! for a fixed bet λ; a few bets share δ (the smallest bound is taken), and
//! E ≤ the student answers s trivially. Nothing here assumes the students or
//! the stream stay the same: the bound is on the disagreements that happened,
//! whatever drift made them. An audited answer the LLM disagrees with is
//! replaced by the LLM's label (the call is paid for), so the disagreements
//! the stream keeps are E − D, D those the audits corrected (observed), and
//! the stream's agreement is at least 1 − (E − D)/n. The controller keeps
//! that bound at or above A:
//! - a student may answer the next item only if the bound, with that answer
//!   audited and wrong, stays within (1 − A)(n + 1) (otherwise the LLM answers);
//! - the students' answer threshold is priced from the slack: the more of
//!   the allowed disagreements the bound leaves unused, the more items the
//!   students answer ([`AgreementController::price`]).
//!
//! After a detected change (`drift.rs`) the controller starts a new epoch:
//! the bound of the items so far is frozen as it stands (it holds at any
//! stopping time), and the items from here on must meet A by themselves.
//! Epoch k spends δ(1 − r)r^k of δ (r = [`EPOCH_RATIO`]), so all epochs
//! together spend at most δ, and the stream, a union of epochs each at or
//! above A, stays at or above A.

use serde::{Deserialize, Serialize};

/// The share of student answers audited under a target unless set
/// (`--audit-rate`): chosen on the train halves (results/guarantee.md).
pub const DEFAULT_AUDIT_RATE: f64 = 0.2;

/// The bound is taken at these bets; each gets an equal share of δ.
const BETS: [f64; 5] = [0.02, 0.04, 0.08, 0.16, 0.32];

/// Epoch k of the target spends δ(1 − r)r^k: most of δ goes to the first.
pub const EPOCH_RATIO: f64 = 0.2;

/// The price's gain and reserve unless set (`target_gain`,
/// `target_reserve`): chosen on the train halves (results/guarantee.md).
pub const DEFAULT_GAIN: f64 = 16.0;
pub const DEFAULT_RESERVE: f64 = 0.1;

/// A share of items to answer as the LLM would, with a confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AgreementTarget {
    pub agreement: f64,
    pub confidence: f64,
    /// How steeply the students' threshold follows the bound's slack.
    #[serde(default = "default_gain")]
    pub gain: f64,
    /// The share of the allowed disagreements kept unused at price 0.
    #[serde(default = "default_reserve")]
    pub reserve: f64,
}

fn default_gain() -> f64 {
    DEFAULT_GAIN
}

fn default_reserve() -> f64 {
    DEFAULT_RESERVE
}

/// Why a target is refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {reason}, got {value}")]
pub struct InvalidTarget {
    pub field: &'static str,
    pub reason: &'static str,
    pub value: f64,
}

impl AgreementTarget {
    pub fn new(agreement: f64, confidence: f64) -> Result<Self, InvalidTarget> {
        for (field, value) in [("target_agreement", agreement), ("confidence", confidence)] {
            if !(value > 0.0 && value < 1.0) {
                return Err(InvalidTarget {
                    field,
                    reason: "must be in (0, 1)",
                    value,
                });
            }
        }
        Ok(Self {
            agreement,
            confidence,
            gain: DEFAULT_GAIN,
            reserve: DEFAULT_RESERVE,
        })
    }

    /// The price's gain (> 0) and reserve (in [0, 1)): they move the cost,
    /// never the guarantee, which rests on the bound alone.
    pub fn with_steering(mut self, gain: f64, reserve: f64) -> Result<Self, InvalidTarget> {
        if !(gain.is_finite() && gain > 0.0) {
            return Err(InvalidTarget {
                field: "target_gain",
                reason: "must be a finite number > 0",
                value: gain,
            });
        }
        if !(0.0..1.0).contains(&reserve) {
            return Err(InvalidTarget {
                field: "target_reserve",
                reason: "must be in [0, 1)",
                value: reserve,
            });
        }
        self.gain = gain;
        self.reserve = reserve;
        Ok(self)
    }
}

/// The controller's state: the items counted and the audits' estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementController {
    target: AgreementTarget,
    /// α, the same for every student answer.
    audit_rate: f64,
    /// Items answered (by a student or the LLM) in this epoch.
    items: u64,
    /// Of them, answered by a student (audited ones included).
    student_answers: u64,
    /// Ŝ: audited disagreements, each weighted 1/α.
    weighted_disagreements: f64,
    audits: u64,
    /// D: audited disagreements of this epoch, answered with the LLM's label.
    #[serde(default)]
    corrected: u64,
    /// Epochs ended by a detected change, and their items and bound on
    /// disagreements, frozen.
    epoch: u32,
    frozen_items: u64,
    frozen_errors: f64,
}

impl AgreementController {
    /// `audit_rate` in (0, 1] (clamped there).
    pub fn new(target: AgreementTarget, audit_rate: f64) -> Self {
        Self {
            target,
            audit_rate: audit_rate.clamp(1e-3, 1.0),
            items: 0,
            student_answers: 0,
            weighted_disagreements: 0.0,
            audits: 0,
            corrected: 0,
            epoch: 0,
            frozen_items: 0,
            frozen_errors: 0.0,
        }
    }

    pub fn target(&self) -> AgreementTarget {
        self.target
    }

    /// A change was detected: the items so far keep the bound they have, and
    /// those from here on must meet the target by themselves.
    pub fn start_epoch(&mut self) {
        self.frozen_errors += self.errors_bound();
        self.frozen_items += self.items;
        self.epoch += 1;
        self.items = 0;
        self.student_answers = 0;
        self.weighted_disagreements = 0.0;
        self.corrected = 0;
    }

    /// Epochs started by a detected change.
    pub fn epochs_restarted(&self) -> u32 {
        self.epoch
    }

    /// One item answered, by a student or not.
    pub fn record(&mut self, by_student: bool) {
        self.items += 1;
        self.student_answers += u64::from(by_student);
    }

    /// An audited student answer: did it agree with the LLM? (`None`: the
    /// LLM gave no label, counted as a disagreement the student's answer
    /// keeps; `Some(false)`: the LLM's label replaced it.) The rate it was
    /// drawn at is the controller's own.
    pub fn observe_audit(&mut self, agrees: Option<bool>) {
        self.audits += 1;
        if agrees != Some(true) {
            self.weighted_disagreements += 1.0 / self.audit_rate;
        }
        self.corrected += u64::from(agrees == Some(false));
    }

    /// The stream's agreement so far is at least this (1 when nothing was answered).
    pub fn agreement_bound(&self) -> f64 {
        let items = self.frozen_items + self.items;
        if items == 0 {
            return 1.0;
        }
        let errors = self.frozen_errors + self.errors_bound();
        (1.0 - errors / items as f64).max(0.0)
    }

    /// Whether a student answering the next item could break the bound: the
    /// answer is counted, and counted as audited and wrong (but not as
    /// corrected, which covers its staying unaudited and wrong too).
    pub fn must_defer(&self) -> bool {
        let answers = (self.student_answers + 1) as f64;
        let worst = self.errors_given(self.weighted_disagreements + 1.0 / self.audit_rate);
        answers.min(worst) - self.corrected as f64
            > (1.0 - self.target.agreement) * (self.items + 1) as f64
    }

    /// A bound on the disagreements this epoch's student answers kept: all
    /// of them (E ≤ s, or the martingale's bound) less those the audits corrected.
    fn errors_bound(&self) -> f64 {
        let all = (self.student_answers as f64).min(self.errors_given(self.weighted_disagreements));
        (all - self.corrected as f64).max(0.0)
    }

    /// The smallest of the bounds on E given Ŝ, over the bets.
    fn errors_given(&self, estimate: f64) -> f64 {
        let delta = (1.0 - self.target.confidence)
            * (1.0 - EPOCH_RATIO)
            * EPOCH_RATIO.powi(self.epoch as i32)
            / BETS.len() as f64;
        BETS.iter()
            .filter_map(|&bet| {
                let room = 1.0 - self.kappa(bet);
                (room > 0.0).then(|| (estimate + (1.0 / delta).ln() / bet) / room)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// κ_λ = 1 + ln(1 − α + α e^{−λ/α})/λ: the share of E the audits cannot
    /// see, from the audit coin's exact moment generating function. Freedman's
    /// inequality, used before, bounds it by (1/α − 1)(e^λ − 1 − λ)/λ (0.207
    /// against 0.180 at α = 0.2, λ = 0.1).
    fn kappa(&self, bet: f64) -> f64 {
        let rate = self.audit_rate;
        1.0 + (rate * (-bet / rate).exp_m1()).ln_1p() / bet
    }

    /// The price on deferral (the log-odds of the students' answer
    /// threshold) from the bound's slack: the share of this epoch's allowed
    /// disagreements the bound has not used, less a reserve, times a gain.
    /// A rate plan (the LLM share that would spend the slack) made students
    /// answer whatever items the rate needed and then held the rest; a price
    /// that follows the slack keeps the threshold steady, so the answers
    /// students give are those their gates are surest of (fewer calls at the
    /// same target on the train halves, results/guarantee.md).
    pub fn price(&self) -> f64 {
        let allowed = (1.0 - self.target.agreement) * (self.items + 1) as f64;
        let slack = (allowed - self.errors_bound()) / allowed;
        self.target.gain * (slack - self.target.reserve)
    }

    /// The share of student answers to audit: α.
    pub fn audit_rate(&self) -> f64 {
        self.audit_rate
    }

    pub fn audits(&self) -> u64 {
        self.audits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

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

    fn controller(a: f64) -> AgreementController {
        AgreementController::new(AgreementTarget::new(a, 0.95).unwrap(), DEFAULT_AUDIT_RATE)
    }

    #[test]
    fn students_answer_only_as_far_as_the_bound_allows() {
        let mut c = controller(0.9);
        // Nothing is known, but E ≤ s: one answer in ten may go to a student.
        assert!(c.must_defer(), "the first item cannot go to a student");
        let mut llm = 0;
        while c.must_defer() {
            c.record(false);
            llm += 1;
        }
        assert!((9..=10).contains(&llm), "{llm}");
        // Answers that always agree when audited: the bound's floor (the
        // unseen share of a few dozen errors) is soon far under the slack.
        for i in 0..3000 {
            if c.must_defer() {
                c.record(false);
                continue;
            }
            c.record(true);
            if i % 5 == 0 {
                c.observe_audit(Some(true));
            }
        }
        assert!(c.agreement_bound() > 0.95, "{}", c.agreement_bound());
        assert!(!c.must_defer());
        // Most of the slack unused: the students' threshold is above the
        // gates' 0.5.
        assert!(c.price() > 2.0, "{}", c.price());
        assert_eq!(c.audit_rate(), DEFAULT_AUDIT_RATE);
    }

    /// The stream's realized agreement under a controller whose students'
    /// disagreement jumps from `before` to `after` half way (no drift
    /// recovery): the share of streams that stay at or above A at every
    /// item after the first 100.
    fn held(a: f64, before: f64, after: f64, seeds: u64) -> f64 {
        let mut held = 0;
        for seed in 0..seeds {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut c = controller(a);
            let (mut errors, mut ok) = (0u64, true);
            for n in 1..=4000u64 {
                if c.must_defer() {
                    c.record(false);
                } else {
                    let p = if n <= 2000 { before } else { after };
                    let disagrees = rng.random::<f64>() < p;
                    let audited = rng.random::<f64>() < c.audit_rate();
                    // An audited disagreement is answered with the LLM's label.
                    errors += u64::from(disagrees && !audited);
                    c.record(true);
                    if audited {
                        c.observe_audit(Some(!disagrees));
                    }
                }
                let realized = 1.0 - errors as f64 / n as f64;
                ok &= n < 100 || realized >= a;
                ok &= c.agreement_bound() <= realized + 1e-12;
            }
            held += u64::from(ok);
        }
        held as f64 / seeds as f64
    }

    /// The bound is on the disagreements that happened, so it holds however
    /// the students change: in at least 1 − δ of simulated streams, under
    /// continuous monitoring, the bound stays under the realized agreement
    /// and the realized agreement at or above A, at every item.
    #[test]
    fn the_guarantee_holds_at_every_point_whatever_the_students_do() {
        for (a, before, after) in [
            (0.9, 0.05, 0.6),
            (0.9, 0.09, 0.11),
            (0.95, 0.03, 0.3),
            (0.8, 0.3, 0.0),
        ] {
            let share = held(a, before, after, 300);
            assert!(
                share >= 0.95,
                "A = {a}, {before} -> {after}: held in {share}"
            );
        }
    }

    /// The exact κ is under Freedman's for every audit rate and bet (so the
    /// bound is tighter), and both agree as the bet goes to 0.
    #[test]
    fn the_exact_moment_bound_is_tighter_than_freedmans() {
        for rate in [0.05, 0.1, 0.2, 0.3, 0.5, 0.9] {
            let c = AgreementController::new(AgreementTarget::new(0.9, 0.95).unwrap(), rate);
            for bet in BETS {
                let freedman = (1.0 / rate - 1.0) * (bet.exp() - 1.0 - bet) / bet;
                let exact = c.kappa(bet);
                assert!(
                    exact > 0.0 && exact < freedman,
                    "rate {rate}, bet {bet}: {exact} vs {freedman}"
                );
            }
            let small: f64 = 1e-4;
            let freedman = (1.0 / rate - 1.0) * (small.exp() - 1.0 - small) / small;
            assert!(
                (c.kappa(small) / freedman - 1.0).abs() < 1e-2,
                "rate {rate}"
            );
        }
        let c = AgreementController::new(AgreementTarget::new(0.9, 0.95).unwrap(), 0.2);
        assert!((c.kappa(0.1) - 0.1804).abs() < 1e-4);
    }

    /// The students' threshold rises with the unused slack and falls under
    /// the gates' own 0.5 (price 0) once less than the reserve is left.
    #[test]
    fn the_price_follows_the_slack() {
        let mut c = controller(0.9);
        for _ in 0..2000 {
            c.record(true);
        }
        let roomy = c.price();
        assert!(roomy > 0.0, "{roomy}");
        while !c.must_defer() {
            c.observe_audit(Some(false));
        }
        assert!(c.price() < 0.0, "{} after {roomy}", c.price());
        let strict = AgreementTarget::new(0.9, 0.95)
            .unwrap()
            .with_steering(16.0, 0.0)
            .unwrap();
        assert_eq!(strict.gain, 16.0);
        assert!(AgreementTarget::new(0.9, 0.95)
            .unwrap()
            .with_steering(f64::NAN, 0.1)
            .is_err());
    }

    /// An audited disagreement given the LLM's label no longer counts
    /// against the stream: the bound on what the answers kept drops by one
    /// per correction (an audit without a label corrects nothing).
    #[test]
    fn corrected_audits_leave_the_stream_fewer_disagreements() {
        let (mut corrected, mut uncorrected) = (controller(0.9), controller(0.9));
        for c in [&mut corrected, &mut uncorrected] {
            for _ in 0..2000 {
                c.record(true);
            }
        }
        for _ in 0..10 {
            corrected.observe_audit(Some(false));
            uncorrected.observe_audit(None);
        }
        let gap = (corrected.agreement_bound() - uncorrected.agreement_bound()) * 2000.0;
        assert!((gap - 10.0).abs() < 1e-9, "{gap}");
    }

    /// After a change, the items so far keep the bound they had, and the
    /// new epoch must meet the target by itself.
    #[test]
    fn a_new_epoch_keeps_the_old_bound_and_starts_over() {
        let mut c = controller(0.9);
        for _ in 0..4000 {
            let student = !c.must_defer();
            c.record(student);
            if student {
                c.observe_audit(Some(true));
            }
        }
        let (items, bound) = (c.items, c.agreement_bound());
        assert!(bound > 0.95, "{bound}");
        c.start_epoch();
        assert_eq!(c.epochs_restarted(), 1);
        assert!((c.agreement_bound() - bound).abs() < 1e-12);
        assert!(c.must_defer(), "the new epoch starts from nothing");
        assert_eq!(c.frozen_items, items);
    }
}
