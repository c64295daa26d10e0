//! Multinomial logistic regression over sparse inputs, trained one example at
//! a time by a per-coordinate adaptive optimiser. Shared by the hashed TF-IDF
//! student and the embedding-head student.

use super::features::SparseVector;
use crate::config::Optimizer;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SoftmaxRegression {
    inputs: usize,
    labels: usize,
    optimizer: Optimizer,
    lr: f32,
    l2: f32,
    /// Row-major `(inputs + 1) × labels`; the last row is the bias.
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

impl SoftmaxRegression {
    pub fn new(inputs: usize, labels: usize, optimizer: Optimizer, lr: f32, l2: f32) -> Self {
        let size = (inputs + 1) * labels;
        let state_b_size = match optimizer {
            Optimizer::Adagrad => 0,
            Optimizer::Adam | Optimizer::Ftrl => size,
        };
        Self {
            inputs,
            labels,
            optimizer,
            lr,
            l2,
            weights: vec![0.0; size],
            state_a: vec![0.0; size],
            state_b: vec![0.0; state_b_size],
            steps: 0,
        }
    }

    /// Same inputs, labels, optimiser and parameter sizes: a checkpoint of one
    /// fits the other.
    pub fn same_shape(&self, other: &Self) -> bool {
        (self.inputs, self.labels, self.optimizer) == (other.inputs, other.labels, other.optimizer)
            && (self.weights.len(), self.state_a.len(), self.state_b.len())
                == (
                    other.weights.len(),
                    other.state_a.len(),
                    other.state_b.len(),
                )
    }

    pub fn probabilities(&self, x: &SparseVector) -> Vec<f32> {
        let bias_row = self.inputs * self.labels;
        let mut logits = self.weights[bias_row..bias_row + self.labels].to_vec();
        for &(index, value) in x {
            let row = &self.weights[index as usize * self.labels..][..self.labels];
            for (logit, w) in logits.iter_mut().zip(row) {
                *logit += value * w;
            }
        }
        softmax(&mut logits);
        logits
    }

    /// One optimiser step on the cross-entropy of one example.
    pub fn step(&mut self, x: &SparseVector, label: usize) {
        let target: Vec<f32> = (0..self.labels)
            .map(|k| f32::from(u8::from(k == label)))
            .collect();
        self.step_toward(x, &target);
    }

    /// One optimiser step on the cross-entropy to a distribution over the labels.
    pub fn step_toward(&mut self, x: &SparseVector, target: &[f32]) {
        let p = self.probabilities(x);
        self.steps += 1;
        let bias = self.inputs as u32;
        for &(index, value) in x.iter().chain(std::iter::once(&(bias, 1.0))) {
            let l2 = if index == bias { 0.0 } else { self.l2 };
            for (class, (&prob, &target)) in p.iter().zip(target).enumerate() {
                let i = index as usize * self.labels + class;
                let grad = value * (prob - target) + l2 * self.weights[i];
                self.update(i, grad);
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
                self.state_a[i] = ADAM_BETA1 * self.state_a[i] + (1.0 - ADAM_BETA1) * g;
                self.state_b[i] = ADAM_BETA2 * self.state_b[i] + (1.0 - ADAM_BETA2) * g * g;
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
                self.weights[i] =
                    -self.state_a[i] / ((FTRL_BETA + self.state_b[i].sqrt()) / self.lr + self.l2);
            }
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

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let mut l = [1000.0, 999.0];
        softmax(&mut l);
        assert!((l[0] + l[1] - 1.0).abs() < 1e-6 && l[0] > l[1]);
    }

    #[test]
    fn dense_inputs_are_learned() {
        let mut model = SoftmaxRegression::new(2, 2, Optimizer::Adagrad, 0.5, 0.0);
        let a: SparseVector = vec![(0, 1.0), (1, 0.0)];
        let b: SparseVector = vec![(0, 0.0), (1, 1.0)];
        for _ in 0..50 {
            model.step(&a, 0);
            model.step(&b, 1);
        }
        assert!(model.probabilities(&a)[0] > 0.9);
        assert!(model.probabilities(&b)[1] > 0.9);
    }

    /// A soft label is learned as the distribution it is, not as its argmax.
    #[test]
    fn a_soft_label_is_learned_as_a_distribution() {
        let mut soft = SoftmaxRegression::new(2, 2, Optimizer::Adagrad, 0.5, 0.0);
        let mut hard = soft.clone();
        let x: SparseVector = vec![(0, 1.0)];
        for _ in 0..500 {
            soft.step_toward(&x, &[0.7, 0.3]);
            hard.step(&x, 0);
        }
        let p = soft.probabilities(&x)[0];
        assert!((p - 0.7).abs() < 0.02, "{p}");
        assert!(hard.probabilities(&x)[0] > 0.95);
    }
}
