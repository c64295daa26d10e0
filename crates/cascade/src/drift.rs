//! A change detector on the audit stream: has the students' disagreement
//! with the LLM jumped?
//!
//! Audits are a random share of student answers, drawn independently of the
//! gates, so their disagreements estimate the students' current error rate
//! without the gates' selection bias. The detector keeps a slowly moving
//! baseline p₀ of that rate (an exponentially weighted mean over the last few
//! hundred audits, so the students' own slow improvement or a slowly growing
//! student share does not count as a change) and runs a Bernoulli CUSUM of
//! "the rate is now p₁" against "it is still p₀", with p₁ = max(2p₀, p₀ + 0.1):
//! a change must at least double the disagreement, or add ten points, to be
//! found. It alarms when the log-likelihood ratio's CUSUM passes
//! [`DriftDetector::THRESHOLD`], and then starts afresh (a new baseline for
//! the new regime).

use serde::{Deserialize, Serialize};

/// Audits before the detector may alarm: the baseline needs a few.
const WARMUP_AUDITS: u64 = 30;

/// The baseline's memory: an audit's weight halves after this many audits.
const BASELINE_HALF_LIFE: f64 = 200.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DriftDetector {
    /// Exponentially weighted disagreements and audits of the baseline.
    disagreements: f64,
    weight: f64,
    audits: u64,
    /// The CUSUM of log(P₁/P₀) over the audits since it last sat at zero.
    statistic: f64,
}

impl DriftDetector {
    /// The CUSUM's alarm level, log(1/false-alarm rate per audit) roughly: at
    /// 8, a stream without change alarms about once per several thousand
    /// audits (measured: `tests::a_steady_stream_rarely_alarms`).
    pub const THRESHOLD: f64 = 8.0;

    pub fn new() -> Self {
        Self::default()
    }

    /// The baseline disagreement rate p₀ (smoothed toward 1/2 while few
    /// audits are in).
    pub fn baseline(&self) -> f64 {
        (self.disagreements + 0.5) / (self.weight + 1.0)
    }

    /// One audited student answer. True when this audit completes a change:
    /// the detector has then started afresh.
    pub fn observe(&mut self, disagrees: bool) -> bool {
        let p0 = self.baseline().clamp(1e-3, 0.9);
        let p1 = (2.0 * p0).max(p0 + 0.1).min(0.95);
        let step = if disagrees {
            (p1 / p0).ln()
        } else {
            ((1.0 - p1) / (1.0 - p0)).ln()
        };
        if self.audits >= WARMUP_AUDITS {
            self.statistic = (self.statistic + step).max(0.0);
        }
        let decay = 0.5f64.powf(1.0 / BASELINE_HALF_LIFE);
        self.disagreements = decay * self.disagreements + f64::from(u8::from(disagrees));
        self.weight = decay * self.weight + 1.0;
        self.audits += 1;
        if self.statistic > Self::THRESHOLD {
            *self = Self::new();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn alarms(rates: &[(usize, f64)], seed: u64) -> Vec<usize> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut detector = DriftDetector::new();
        let mut at = Vec::new();
        let mut i = 0;
        for &(audits, rate) in rates {
            for _ in 0..audits {
                if detector.observe(rng.random::<f64>() < rate) {
                    at.push(i);
                }
                i += 1;
            }
        }
        at
    }

    /// 200 streams of 2,000 audits at a steady 7% disagreement (an IMDB
    /// student): at most a few false alarms in all of them.
    #[test]
    fn a_steady_stream_rarely_alarms() {
        let false_alarms: usize = (0..200).map(|s| alarms(&[(2000, 0.07)], s).len()).sum();
        assert!(
            false_alarms <= 10,
            "{false_alarms} alarms in 400,000 audits"
        );
        // Students that improve (30% → 5%) raise none either.
        let improving: Vec<(usize, f64)> = (0..25).map(|k| (40, 0.30 - 0.01 * k as f64)).collect();
        let false_alarms: usize = (0..200).map(|s| alarms(&improving, s).len()).sum();
        assert!(false_alarms <= 5, "{false_alarms}");
    }

    /// The teacher flips its rule half way: 7% disagreement becomes 60%. The
    /// change is found within 40 audits in every stream, never before it.
    #[test]
    fn a_flipped_rule_is_found_within_a_few_dozen_audits() {
        for seed in 0..200 {
            let at = alarms(&[(1000, 0.07), (500, 0.60)], seed);
            let first_after = at.iter().find(|&&i| i >= 1000);
            let delay = first_after.map(|i| i - 1000);
            assert!(delay.is_some_and(|d| d < 40), "seed {seed}: {at:?}");
        }
    }
}
