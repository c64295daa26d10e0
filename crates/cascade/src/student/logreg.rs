//! Multinomial logistic regression on hashed TF-IDF features, trained online by
//! a per-coordinate adaptive optimiser.

use super::features::{HashedTfidf, SparseVector};
use super::{Demonstration, Student, StudentError};
use crate::config::{IdfMode, LogRegConfig, Optimizer};

pub struct LogReg {
    name: String,
    cost: f64,
    labels: usize,
    features: HashedTfidf,
    idf: IdfMode,
    optimizer: Optimizer,
    lr: f32,
    l2: f32,
    /// Row-major `(buckets + 1) × labels`; the last row is the bias.
    weights: Vec<f32>,
    /// Per-coordinate optimiser state (AdaGrad: Σg²; Adam: m, v; FTRL: z, n).
    state_a: Vec<f32>,
    state_b: Vec<f32>,
    steps: u64,
}

const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const EPSILON: f32 = 1e-8;
const FTRL_BETA: f32 = 1.0;

impl LogReg {
    pub fn new(name: impl Into<String>, cost: f64, labels: usize, config: &LogRegConfig) -> Self {
        let size = (config.buckets + 1) * labels;
        let state_b_size = match config.optimizer {
            Optimizer::Adagrad => 0,
            Optimizer::Adam | Optimizer::Ftrl => size,
        };
        Self {
            name: name.into(),
            cost,
            labels,
            features: HashedTfidf::new(config.buckets, config.ngrams),
            idf: config.idf,
            optimizer: config.optimizer,
            lr: config.lr,
            l2: config.l2,
            weights: vec![0.0; size],
            state_a: vec![0.0; size],
            state_b: vec![0.0; state_b_size],
            steps: 0,
        }
    }

    fn probabilities(&self, x: &SparseVector) -> Vec<f32> {
        let bias_row = self.features.buckets() * self.labels;
        let mut logits = self.weights[bias_row..bias_row + self.labels].to_vec();
        for &(bucket, value) in x {
            let row = &self.weights[bucket as usize * self.labels..][..self.labels];
            for (logit, w) in logits.iter_mut().zip(row) {
                *logit += value * w;
            }
        }
        softmax(&mut logits);
        logits
    }

    fn step(&mut self, text: &str, label: usize) {
        let x = self.features.transform(text);
        let p = self.probabilities(&x);
        self.steps += 1;
        let bias = self.features.buckets() as u32;
        for (bucket, value) in x.into_iter().chain(std::iter::once((bias, 1.0))) {
            let l2 = if bucket == bias { 0.0 } else { self.l2 };
            for (class, &prob) in p.iter().enumerate() {
                let target = if class == label { 1.0 } else { 0.0 };
                let index = bucket as usize * self.labels + class;
                let grad = value * (prob - target) + l2 * self.weights[index];
                self.update(index, grad);
            }
        }
    }

    fn update(&mut self, i: usize, g: f32) {
        match self.optimizer {
            Optimizer::Adagrad => {
                self.state_a[i] += g * g;
                self.weights[i] -= self.lr * g / (self.state_a[i].sqrt() + EPSILON);
            }
            Optimizer::Adam => {
                // Lazy Adam: only the coordinates of this example move.
                let t = self.steps as i32;
                let m = &mut self.state_a[i];
                *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
                let v = &mut self.state_b[i];
                *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
                let m_hat = self.state_a[i] / (1.0 - ADAM_BETA1.powi(t));
                let v_hat = self.state_b[i] / (1.0 - ADAM_BETA2.powi(t));
                self.weights[i] -= self.lr * m_hat / (v_hat.sqrt() + EPSILON);
            }
            Optimizer::Ftrl => {
                // FTRL-Proximal (McMahan et al. 2013) with alpha = lr and no L1.
                let n = self.state_b[i];
                let sigma = ((n + g * g).sqrt() - n.sqrt()) / self.lr;
                self.state_a[i] += g - sigma * self.weights[i];
                self.state_b[i] = n + g * g;
                let z = self.state_a[i];
                self.weights[i] = -z / ((FTRL_BETA + self.state_b[i].sqrt()) / self.lr + self.l2);
            }
        }
    }
}

impl Student for LogReg {
    fn name(&self) -> &str {
        &self.name
    }

    fn cost(&self) -> f64 {
        self.cost
    }

    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError> {
        Ok(texts
            .iter()
            .map(|text| self.probabilities(&self.features.transform(text)))
            .collect())
    }

    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError> {
        for demo in batch {
            if demo.label >= self.labels {
                return Err(StudentError::Failed {
                    student: self.name.clone(),
                    reason: format!("label {} out of range 0..{}", demo.label, self.labels),
                });
            }
            self.step(demo.text, demo.label);
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
}

pub(crate) fn softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for l in logits.iter_mut() {
        *l = (*l - max).exp();
        sum += *l;
    }
    logits.iter_mut().for_each(|l| *l /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut lr = LogReg::new("lr", 1.0, 2, &config(optimizer));
        for (text, _) in TRAIN {
            lr.observe(text);
        }
        let demos: Vec<_> = TRAIN
            .iter()
            .map(|&(text, label)| Demonstration { text, label })
            .collect();
        for _ in 0..5 {
            lr.learn(&demos).unwrap();
        }
        lr
    }

    #[test]
    fn untrained_model_is_uniform() {
        let mut lr = LogReg::new("lr", 1.0, 3, &config(Optimizer::Adagrad));
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
        let mut lr = LogReg::new("lr", 1.0, 2, &config(Optimizer::Adagrad));
        let err = lr
            .learn(&[Demonstration {
                text: "x y",
                label: 2,
            }])
            .unwrap_err();
        assert!(err.to_string().contains("out of range"));
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let mut l = [1000.0, 999.0];
        softmax(&mut l);
        assert!((l[0] + l[1] - 1.0).abs() < 1e-6 && l[0] > l[1]);
    }
}
