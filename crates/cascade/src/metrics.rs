//! Running accuracy and cost figures of a cascade over a stream.

use serde::{Deserialize, Serialize};

/// Who gave an item's final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    Level(usize),
    Llm,
}

#[derive(Debug, Clone, Default)]
struct Tally {
    answered: u64,
    with_gold: u64,
    correct: u64,
}

impl Tally {
    fn add(&mut self, prediction: Option<usize>, gold: Option<usize>) {
        self.answered += 1;
        if let Some(gold) = gold {
            self.with_gold += 1;
            self.correct += u64::from(prediction == Some(gold));
        }
    }

    fn accuracy(&self) -> Option<f64> {
        (self.with_gold > 0).then(|| self.correct as f64 / self.with_gold as f64)
    }
}

/// Counts for precision/recall of one label.
#[derive(Debug, Clone, Default)]
struct Confusion {
    true_positive: u64,
    false_positive: u64,
    false_negative: u64,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    level_names: Vec<String>,
    /// One tally per level, then the LLM.
    by_answerer: Vec<Tally>,
    overall: Tally,
    /// The LLM's own answer on every item where it is known (replay), against gold.
    llm_reference: Tally,
    /// The LLM's own answer on the items a student answered, against gold:
    /// what deferring them would have scored.
    llm_on_student_items: Tally,
    agreement: Tally,
    positive: Option<Confusion>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LevelSummary {
    pub name: String,
    pub answered: u64,
    pub accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub items: u64,
    pub llm_calls: u64,
    pub llm_fraction: f64,
    /// Final answers against gold.
    pub accuracy: Option<f64>,
    /// The LLM's own answers against gold, over all items where they are known.
    pub llm_accuracy: Option<f64>,
    /// Final answers that equal the LLM's label, over items where the LLM gave one.
    pub agreement_with_llm: Option<f64>,
    /// The LLM's own answers against gold on the items the students answered
    /// (replay only): beside the LLM level's accuracy, it shows whether the
    /// gates sent the LLM the items it gets wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_accuracy_on_student_items: Option<f64>,
    pub per_level: Vec<LevelSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
}

impl Metrics {
    /// For two-label tasks, precision/recall/F1 are reported for label 1.
    pub fn new(level_names: Vec<String>, labels: usize) -> Self {
        let answerers = level_names.len() + 1;
        Self {
            level_names,
            by_answerer: vec![Tally::default(); answerers],
            overall: Tally::default(),
            llm_reference: Tally::default(),
            llm_on_student_items: Tally::default(),
            agreement: Tally::default(),
            positive: (labels == 2).then(Confusion::default),
        }
    }

    /// Records an item's final answer. `llm_label` is the LLM's answer when
    /// known (always for replay; `Some(None)` means the LLM gave no label).
    pub fn record(
        &mut self,
        by: AnsweredBy,
        prediction: Option<usize>,
        gold: Option<usize>,
        llm_label: Option<Option<usize>>,
    ) {
        let index = match by {
            AnsweredBy::Level(j) => j,
            AnsweredBy::Llm => self.level_names.len(),
        };
        self.by_answerer[index].add(prediction, gold);
        self.overall.add(prediction, gold);
        if let Some(llm) = llm_label {
            self.llm_reference.add(llm, gold);
            if by != AnsweredBy::Llm {
                self.llm_on_student_items.add(llm, gold);
            }
            self.agreement.add(prediction, llm);
        }
        if let (Some(confusion), Some(gold)) = (&mut self.positive, gold) {
            match (prediction == Some(1), gold == 1) {
                (true, true) => confusion.true_positive += 1,
                (true, false) => confusion.false_positive += 1,
                (false, true) => confusion.false_negative += 1,
                (false, false) => {}
            }
        }
    }

    pub fn items(&self) -> u64 {
        self.overall.answered
    }

    pub fn llm_calls(&self) -> u64 {
        self.by_answerer[self.level_names.len()].answered
    }

    pub fn summary(&self) -> Summary {
        let items = self.items();
        let llm_calls = self.llm_calls();
        let names = self.level_names.iter().cloned().chain(["llm".to_string()]);
        let per_level = names
            .zip(&self.by_answerer)
            .map(|(name, tally)| LevelSummary {
                name,
                answered: tally.answered,
                accuracy: tally.accuracy(),
            })
            .collect();
        let (precision, recall, f1) = match &self.positive {
            Some(c) => {
                let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
                let precision = ratio(c.true_positive, c.true_positive + c.false_positive);
                let recall = ratio(c.true_positive, c.true_positive + c.false_negative);
                let f1 = match (precision, recall) {
                    (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
                    (Some(_), Some(_)) => Some(0.0),
                    _ => None,
                };
                (precision, recall, f1)
            }
            None => (None, None, None),
        };
        Summary {
            items,
            llm_calls,
            llm_fraction: if items > 0 {
                llm_calls as f64 / items as f64
            } else {
                0.0
            },
            accuracy: self.overall.accuracy(),
            llm_accuracy: self.llm_reference.accuracy(),
            agreement_with_llm: self.agreement.accuracy(),
            llm_accuracy_on_student_items: self.llm_on_student_items.accuracy(),
            per_level,
            precision,
            recall,
            f1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accuracy_cost_and_binary_scores() {
        let mut m = Metrics::new(vec!["lr".into()], 2);
        // (by, prediction, gold, llm)
        m.record(AnsweredBy::Llm, Some(1), Some(1), Some(Some(1)));
        m.record(AnsweredBy::Llm, None, Some(1), Some(None));
        m.record(AnsweredBy::Level(0), Some(1), Some(0), Some(Some(0)));
        m.record(AnsweredBy::Level(0), Some(0), Some(0), Some(Some(0)));
        let s = m.summary();
        assert_eq!((s.items, s.llm_calls), (4, 2));
        assert_eq!(s.llm_fraction, 0.5);
        assert_eq!(s.accuracy, Some(0.5));
        // The LLM's own answers: right, null, right, right.
        assert_eq!(s.llm_accuracy, Some(0.75));
        assert_eq!(s.per_level[0].accuracy, Some(0.5));
        assert_eq!(s.per_level[1].answered, 2);
        assert_eq!(s.precision, Some(0.5));
        assert_eq!(s.recall, Some(0.5));
        assert_eq!(s.f1, Some(0.5));
        // Agreement counts only items where the LLM gave a label: 2 of 3.
        assert_eq!(s.agreement_with_llm, Some(2.0 / 3.0));
        // On the two items the LR answered the LLM says 0, gold is 0: both right.
        assert_eq!(s.llm_accuracy_on_student_items, Some(1.0));
    }

    #[test]
    fn multiclass_has_no_binary_scores() {
        let mut m = Metrics::new(vec![], 3);
        m.record(AnsweredBy::Llm, Some(2), Some(2), None);
        let s = m.summary();
        assert_eq!(s.precision, None);
        assert_eq!(s.accuracy, Some(1.0));
        assert_eq!(s.llm_accuracy, None);
        assert_eq!(s.llm_accuracy_on_student_items, None);
    }
}
