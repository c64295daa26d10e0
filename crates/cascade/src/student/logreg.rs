//! Multinomial logistic regression on hashed TF-IDF features, trained online by
//! a per-coordinate adaptive optimiser.

use super::features::HashedTfidf;
use super::softmax_regression::SoftmaxRegression;
use super::{decode_state, encode_state, Demonstration, Student, StudentError};
use crate::config::{IdfMode, LogRegConfig};

pub struct LogReg {
    labels: usize,
    features: HashedTfidf,
    idf: IdfMode,
    model: SoftmaxRegression,
}

impl LogReg {
    pub fn new(labels: usize, config: &LogRegConfig) -> Self {
        Self {
            labels,
            features: HashedTfidf::new(config.buckets, config.ngrams),
            idf: config.idf,
            model: SoftmaxRegression::new(
                config.buckets,
                labels,
                config.optimizer,
                config.lr,
                config.l2,
            ),
        }
    }
}

impl Student for LogReg {
    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError> {
        Ok(texts
            .iter()
            .map(|text| self.model.probabilities(&self.features.transform(text)))
            .collect())
    }

    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError> {
        super::check_labels(batch, self.labels)?;
        for demo in batch {
            self.model.step_toward(
                &self.features.transform(demo.text),
                &demo.target(self.labels),
            );
        }
        Ok(())
    }

    fn observe(&mut self, text: &str) {
        self.features.observe(text);
    }

    fn prefit(&mut self, corpus: &[&str]) {
        if self.idf == IdfMode::Prefit {
            self.features.prefit(corpus);
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, StudentError> {
        encode_state(&(&self.features, &self.model))
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), StudentError> {
        let (features, model): (HashedTfidf, SoftmaxRegression) = decode_state(state)?;
        if !features.same_shape(&self.features) || !model.same_shape(&self.model) {
            return Err(StudentError::StateMismatch(
                "written with other buckets or labels".into(),
            ));
        }
        self.features = features;
        self.model = model;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Optimizer;

    fn config(optimizer: Optimizer) -> LogRegConfig {
        LogRegConfig {
            buckets: 1 << 14,
            optimizer,
            ..LogRegConfig::default()
        }
    }

    const TRAIN: &[(&str, usize)] = &[
        ("a wonderful delightful film", 1),
        ("dreadful boring waste of time", 0),
        ("wonderful acting and a delightful story", 1),
        ("boring plot and dreadful acting", 0),
        ("truly wonderful", 1),
        ("a boring waste", 0),
    ];

    fn trained(optimizer: Optimizer) -> LogReg {
        let mut lr = LogReg::new(2, &config(optimizer));
        for (text, _) in TRAIN {
            lr.observe(text);
        }
        let demos: Vec<_> = TRAIN
            .iter()
            .map(|&(text, label)| Demonstration {
                text,
                label,
                probs: None,
            })
            .collect();
        for _ in 0..5 {
            lr.learn(&demos).unwrap();
        }
        lr
    }

    #[test]
    fn untrained_model_is_uniform() {
        let mut lr = LogReg::new(3, &config(Optimizer::Adagrad));
        let p = lr.predict_proba(&["anything at all"]).unwrap();
        for x in &p[0] {
            assert!((x - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn every_optimizer_learns_a_separable_task() {
        for optimizer in [Optimizer::Adagrad, Optimizer::Adam, Optimizer::Ftrl] {
            let mut lr = trained(optimizer);
            let p = lr
                .predict_proba(&["wonderful delightful", "dreadful boring"])
                .unwrap();
            assert!(p[0][1] > 0.7, "{optimizer:?}: {:?}", p[0]);
            assert!(p[1][0] > 0.7, "{optimizer:?}: {:?}", p[1]);
            let sum: f32 = p[0].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn out_of_range_label_is_an_error() {
        let mut lr = LogReg::new(2, &config(Optimizer::Adagrad));
        let err = lr
            .learn(&[Demonstration {
                text: "x y",
                label: 2,
                probs: None,
            }])
            .unwrap_err();
        assert!(err.to_string().contains("out of range"));
    }
}
