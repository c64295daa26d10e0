//! An anytime-valid lower confidence bound on the mean of a stream of
//! observations in [0, 1] (e.g. agreement with the LLM on audited items).
//!
//! A Wilson interval recomputed after every item is valid at one fixed
//! sample size, not under continuous monitoring: watched after every item it
//! will, sooner or later, exclude the truth. A confidence sequence holds at
//! every time at once: P(∀t: mean ≥ L_t) ≥ 1 − α, so the bound may be read
//! (and acted on) after every item. This is the predictable plug-in
//! empirical-Bernstein confidence sequence of Waudby-Smith & Ramdas,
//! "Estimating means of bounded random variables by betting" (JRSS-B 2024,
//! Theorem 2), one-sided:
//!
//! L_t = (Σ λ_i X_i − log(1/α) − Σ v_i ψ_E(λ_i)) / Σ λ_i,
//!
//! with v_i = 4 (X_i − μ̂_{i−1})², ψ_E(λ) = (−ln(1 − λ) − λ) / 4, and the
//! predictable bets λ_i = min(√(2 log(1/α) / (σ̂²_{i−1} i ln(1 + i))), 1/2),
//! where μ̂ and σ̂² are running estimates started at 1/2 and 1/4. With a
//! constant mean every L_t bounds it; when the mean moves (the students or
//! the LLM change), L_t bounds the bet-weighted average of the conditional
//! means so far (Σ λ_i μ_i / Σ λ_i), which favours early observations. So the
//! bound reported is L_t itself, not its running maximum (which is valid only
//! for a constant mean, and would hide a fall). The agreement target does not
//! rest on it (`target.rs` bounds the realized disagreements directly).

use serde::{Deserialize, Serialize};

/// Bets are truncated here (the paper's c = 1/2).
const MAX_BET: f64 = 0.5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LowerConfidenceSequence {
    /// log(1/α).
    log_inverse_alpha: f64,
    observations: u64,
    sum: f64,
    /// Σ (X_i − μ̂_i)², for the variance estimate.
    squared_deviations: f64,
    bets: f64,
    weighted_sum: f64,
    /// Σ v_i ψ_E(λ_i).
    penalty: f64,
    lower: f64,
}

impl Default for LowerConfidenceSequence {
    /// At 95% confidence.
    fn default() -> Self {
        Self::new(0.95).expect("0.95 is in (0, 1)")
    }
}

/// Why a confidence level is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("confidence must be in (0, 1), got {0}")]
pub struct InvalidConfidence(pub f64);

impl LowerConfidenceSequence {
    /// A sequence whose bounds all hold at once with probability
    /// `confidence` (1 − α), e.g. 0.95.
    pub fn new(confidence: f64) -> Result<Self, InvalidConfidence> {
        if !(confidence > 0.0 && confidence < 1.0) {
            return Err(InvalidConfidence(confidence));
        }
        Ok(Self {
            log_inverse_alpha: -(1.0 - confidence).ln(),
            observations: 0,
            sum: 0.0,
            squared_deviations: 0.0,
            bets: 0.0,
            weighted_sum: 0.0,
            penalty: 0.0,
            lower: 0.0,
        })
    }

    /// Adds one observation (clamped to [0, 1]); returns the new lower bound.
    pub fn observe(&mut self, x: f64) -> f64 {
        let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        let i = (self.observations + 1) as f64;
        // The estimates before this observation (predictable).
        let mean_before = (0.5 + self.sum) / i;
        let variance_before = (0.25 + self.squared_deviations) / i;
        let bet = (2.0 * self.log_inverse_alpha / (variance_before * i * (1.0 + i).ln()))
            .sqrt()
            .min(MAX_BET);
        let v = 4.0 * (x - mean_before).powi(2);
        self.bets += bet;
        self.weighted_sum += bet * x;
        self.penalty += v * psi_e(bet);
        self.observations += 1;
        self.sum += x;
        let mean_after = (0.5 + self.sum) / (i + 1.0);
        self.squared_deviations += (x - mean_after).powi(2);
        let bound = (self.weighted_sum - self.log_inverse_alpha - self.penalty) / self.bets;
        self.lower = bound.clamp(0.0, 1.0);
        self.lower
    }

    /// The lower bound on the mean so far (0 before any observation).
    pub fn lower(&self) -> f64 {
        self.lower
    }

    pub fn observations(&self) -> u64 {
        self.observations
    }

    /// The plain mean of the observations.
    pub fn mean(&self) -> Option<f64> {
        (self.observations > 0).then(|| self.sum / self.observations as f64)
    }
}

/// ψ_E(λ) = (−ln(1 − λ) − λ) / 4.
fn psi_e(bet: f64) -> f64 {
    (-(1.0 - bet).ln() - bet) / 4.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The share of Bernoulli(p) streams of `length` items whose bound ever
    /// rose above p, watched after every item.
    fn miscoverage(p: f64, confidence: f64, streams: u64, length: usize) -> f64 {
        let mut misses = 0;
        for seed in 0..streams {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut cs = LowerConfidenceSequence::new(confidence).unwrap();
            for _ in 0..length {
                let x = f64::from(u8::from(rng.random::<f64>() < p));
                if cs.observe(x) > p {
                    misses += 1;
                    break;
                }
            }
        }
        misses as f64 / streams as f64
    }

    #[test]
    fn covers_the_true_rate_at_every_time_at_once() {
        // α = 0.05 (and 0.2, where misses are frequent enough to see); the
        // Monte Carlo slack is three standard errors.
        for (confidence, streams) in [(0.95, 1500), (0.8, 1500)] {
            let alpha: f64 = 1.0 - confidence;
            let slack = 3.0 * (alpha * (1.0 - alpha) / streams as f64).sqrt();
            for p in [0.5, 0.9, 0.97] {
                let miss = miscoverage(p, confidence, streams, 2000);
                eprintln!("p {p} confidence {confidence}: miscoverage {miss}");
                assert!(
                    miss <= alpha + slack,
                    "p {p}, confidence {confidence}: bound above p in {miss} of streams"
                );
            }
        }
    }

    #[test]
    fn a_wilson_interval_watched_after_every_item_does_not_cover() {
        // The control: the fixed-n interval, monitored continuously, misses
        // far more often than its 5%, which is why the sequence exists.
        let (p, streams) = (0.9, 500);
        let mut misses = 0;
        for seed in 0..streams {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut agree = 0u64;
            for n in 1..=2000u64 {
                agree += u64::from(rng.random::<f64>() < p);
                let (centre, half) = wilson(agree, n);
                if centre - half > p {
                    misses += 1;
                    break;
                }
            }
        }
        assert!(misses as f64 / streams as f64 > 0.10, "{misses} misses");
    }

    /// Wilson 95% (centre, half-width), as the runtime reports it.
    fn wilson(successes: u64, n: u64) -> (f64, f64) {
        let (z, n, p) = (1.96f64, n as f64, successes as f64 / n as f64);
        let denominator = 1.0 + z * z / n;
        let centre = (p + z * z / (2.0 * n)) / denominator;
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
        (centre, half)
    }

    #[test]
    fn the_bound_tightens_with_data_and_follows_a_fall() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut cs = LowerConfidenceSequence::new(0.95).unwrap();
        let mut at = Vec::new();
        for n in 1..=8000 {
            // 0.97 for 5,000 observations, then 0.5.
            let p = if n <= 5000 { 0.97 } else { 0.5 };
            let bound = cs.observe(f64::from(u8::from(rng.random::<f64>() < p)));
            if [100, 1000, 5000, 8000].contains(&n) {
                at.push(bound);
            }
        }
        eprintln!(
            "bound after 100, 1000, 5000 items of Bernoulli(0.97), then 3,000 of 0.5: {at:?}"
        );
        // Close under the truth once data accumulate (0.97 here).
        assert!(at[0] < at[1] && at[1] < at[2], "{at:?}");
        assert!(at[2] > 0.95 && at[2] < 0.97, "{at:?}");
        // The mean fell: so does the bound, but slowly: it bounds the
        // bet-weighted average, which favours the early 0.97s (the plain
        // average is 0.79). Why the agreement target does not rest on it.
        assert!(at[3] < at[2] - 0.03 && at[3] > 0.79, "{at:?}");
    }

    #[test]
    fn a_confidence_outside_zero_one_is_refused() {
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
            assert!(LowerConfidenceSequence::new(bad).is_err(), "{bad}");
        }
        let err = LowerConfidenceSequence::new(1.5).unwrap_err().to_string();
        assert!(err.contains("confidence"), "{err}");
    }
}
