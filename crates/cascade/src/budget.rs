//! Budget targeting: make a run spend a given number (or share) of LLM calls.
//!
//! mu alone is a bang-bang knob: it acts through gate training, with a lag of
//! hundreds of items, so a small change flips a run from deferring most items
//! to deferring almost none. The controller instead prices deferral at decision
//! time: a level answers when its gate output is at most `sigmoid(price)`
//! (0.5 at price 0, the paper's rule). The price is a dual variable for the
//! constraint "calls ≤ budget": after each routed item it moves by
//! `step · (deferred − target rate)`. With a known stream length the target
//! rate spreads the remaining budget over the remaining items along the pacing
//! curve `calls(t) ∝ (t / length)^pacing`: students are weakest early, so early
//! labels are worth most, and the paper's fixed-mu runs spend along this curve
//! with pacing ≈ 0.72 (IMDB, LR → LLM, every decile). Pacing 1 spends evenly.
//! With an unknown length the target is the fixed rate. The gates still rank items by their learned deferral score; the
//! price only decides how many of them go to the LLM.

use serde::{Deserialize, Serialize};

/// How many LLM calls a run may make.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// `calls` LLM calls over a stream of `stream_length` items, warm-up included.
    Calls { calls: u64, stream_length: u64 },
    /// A share of the items, for streams of unknown length.
    Rate(f64),
}

/// The price a budget controller starts from and is clamped to (log-odds).
const MAX_PRICE: f64 = 8.0;

/// What the budget allows for the next item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Students answer when their gate output is at most the threshold.
    Free,
    /// The budget is spent: a student must answer.
    MustAnswer,
    /// Every remaining item is needed to reach the budget: the LLM answers.
    MustDefer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetController {
    budget: Budget,
    step: f64,
    pacing: f64,
    price: f64,
    seen: u64,
    calls: u64,
    /// Items a student had to answer because the budget was spent.
    forced_answers: u64,
    /// Items the LLM had to answer because only they could reach the budget.
    forced_deferrals: u64,
    /// Set by an agreement target: the next item must go to the LLM.
    #[serde(default)]
    hold: bool,
    /// Items an agreement target held for the LLM.
    #[serde(default)]
    held: u64,
    /// An agreement target sets the price; the rate no longer moves it.
    #[serde(default)]
    priced_by_target: bool,
}

impl BudgetController {
    /// `step`: how far the price moves per item; `pacing` in (0, 1]: the
    /// exponent of the spending curve (1 spends evenly, smaller spends earlier).
    pub fn new(budget: Budget, step: f64, pacing: f64) -> Self {
        Self {
            budget,
            step,
            pacing,
            price: 0.0,
            seen: 0,
            calls: 0,
            forced_answers: 0,
            forced_deferrals: 0,
            hold: false,
            held: 0,
            priced_by_target: false,
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The share of the coming items the LLM should answer to meet the budget.
    pub fn target_rate(&self) -> f64 {
        match self.budget {
            Budget::Rate(rate) => rate,
            Budget::Calls {
                calls,
                stream_length,
            } => {
                if self.seen >= stream_length {
                    return 0.0;
                }
                let curve = |t: u64| (t as f64 / stream_length as f64).powf(self.pacing);
                let weight_left = 1.0 - curve(self.seen);
                let weight_next = curve(self.seen + 1) - curve(self.seen);
                let calls_left = calls.saturating_sub(self.calls) as f64;
                (calls_left * weight_next / weight_left).min(1.0)
            }
        }
    }

    /// (items left, calls left) under a call budget.
    fn left(&self) -> Option<(u64, u64)> {
        match self.budget {
            Budget::Rate(_) => None,
            Budget::Calls {
                calls,
                stream_length,
            } => Some((
                stream_length.saturating_sub(self.seen),
                calls.saturating_sub(self.calls),
            )),
        }
    }

    /// The remaining calls over the remaining items (a `Rate`: the rate):
    /// the share that spends the budget evenly from here on.
    pub fn even_rate(&self) -> f64 {
        match (self.budget, self.left()) {
            (Budget::Rate(rate), _) => rate,
            (_, Some((0, _)) | None) => 0.0,
            (_, Some((items_left, calls_left))) => (calls_left as f64 / items_left as f64).min(1.0),
        }
    }

    pub fn allowance(&self) -> Allowance {
        if self.hold {
            return Allowance::MustDefer;
        }
        match self.left() {
            None => Allowance::Free,
            Some((items_left, calls_left)) => {
                if calls_left == 0 {
                    Allowance::MustAnswer
                } else if items_left <= calls_left {
                    Allowance::MustDefer
                } else {
                    Allowance::Free
                }
            }
        }
    }

    /// A level answers when its gate output is at most this.
    pub fn answer_threshold(&self) -> f32 {
        (1.0 / (1.0 + (-self.price).exp())) as f32
    }

    pub fn price(&self) -> f64 {
        self.price
    }

    /// Items a student had to answer because the budget was spent.
    pub fn forced_answers(&self) -> u64 {
        self.forced_answers
    }

    /// Items the LLM had to answer to reach the budget.
    pub fn forced_deferrals(&self) -> u64 {
        self.forced_deferrals
    }

    /// Items an agreement target sent to the LLM because its bound allowed
    /// no student answer.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// An agreement target's steering: the price (set from its bound's
    /// slack; the rate no longer moves it) and whether the next item must go
    /// to the LLM.
    pub fn steer(&mut self, price: f64, must_defer: bool) {
        self.price = price.clamp(-MAX_PRICE, MAX_PRICE);
        self.hold = must_defer;
        self.priced_by_target = true;
    }

    /// Sets the items seen and calls made to a count kept elsewhere (a
    /// cluster's global count); `record` adds this worker's own from here.
    pub fn sync(&mut self, seen: u64, calls: u64) {
        self.seen = seen;
        self.calls = calls;
    }

    /// Records one routed item. During warm-up the LLM must answer whatever the
    /// price, so the price does not move (it would only wind up). An item an
    /// agreement target held for the LLM is the target's doing, not a
    /// forced deferral of the budget's guards.
    pub fn record(&mut self, deferred: bool, warmup: bool) {
        match self.allowance() {
            _ if self.hold => self.held += 1,
            Allowance::MustAnswer => self.forced_answers += 1,
            Allowance::MustDefer => self.forced_deferrals += 1,
            Allowance::Free => {}
        }
        if !warmup && !self.priced_by_target {
            let error = f64::from(u8::from(deferred)) - self.target_rate();
            self.price = (self.price + self.step * error).clamp(-MAX_PRICE, MAX_PRICE);
        }
        self.seen += 1;
        self.calls += u64::from(deferred);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_even_rate_spreads_what_is_left_over_what_is_left() {
        let budget = Budget::Calls {
            calls: 300,
            stream_length: 1000,
        };
        let mut c = BudgetController::new(budget, 0.01, 0.7);
        assert!((c.even_rate() - 0.3).abs() < 1e-12);
        for _ in 0..100 {
            c.record(true, true); // a warm-up of 100 calls
        }
        assert!((c.even_rate() - 200.0 / 900.0).abs() < 1e-12);
        // The paced rate is front-loaded: above the even rate early on.
        assert!(c.target_rate() > c.even_rate());
    }

    #[test]
    fn price_rises_while_over_budget_and_falls_while_under() {
        let mut c = BudgetController::new(Budget::Rate(0.3), 0.1, 1.0);
        let start = c.answer_threshold();
        for _ in 0..10 {
            c.record(true, false);
        }
        assert!(
            c.answer_threshold() > start,
            "over budget: students answer more"
        );
        let high = c.price();
        for _ in 0..10 {
            c.record(false, false);
        }
        assert!(c.price() < high);
    }

    #[test]
    fn warmup_spends_budget_without_moving_the_price() {
        let mut c = BudgetController::new(
            Budget::Calls {
                calls: 10,
                stream_length: 100,
            },
            0.1,
            1.0,
        );
        for _ in 0..4 {
            c.record(true, true);
        }
        assert_eq!(c.price(), 0.0);
        assert!((c.target_rate() - 6.0 / 96.0).abs() < 1e-12);
    }

    #[test]
    fn pacing_below_one_spends_earlier() {
        let budget = Budget::Calls {
            calls: 300,
            stream_length: 1000,
        };
        let even = BudgetController::new(budget, 0.1, 1.0);
        let early = BudgetController::new(budget, 0.1, 0.7);
        assert!(early.target_rate() > even.target_rate());
        // Each on its own curve halfway (300 · 0.5^0.7 ≈ 185 calls), the
        // front-loaded one spends the rest more thinly.
        let (mut even, mut early) = (even, early);
        (even.seen, even.calls) = (500, 150);
        (early.seen, early.calls) = (500, 185);
        assert!(early.target_rate() < even.target_rate());
    }

    #[test]
    fn guards_land_the_budget_exactly() {
        let budget = Budget::Calls {
            calls: 3,
            stream_length: 6,
        };
        let mut c = BudgetController::new(budget, 0.1, 0.7);
        c.record(true, false);
        c.record(true, false);
        c.record(true, false);
        assert_eq!(c.allowance(), Allowance::MustAnswer);
        let mut c = BudgetController::new(budget, 0.1, 0.7);
        c.record(false, false);
        c.record(false, false);
        assert_eq!(c.allowance(), Allowance::Free);
        c.record(false, false);
        assert_eq!(c.allowance(), Allowance::MustDefer);
    }
}
