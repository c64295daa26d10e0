//! Gates (the paper's deferral policies): a small MLP per level that reads the
//! level's class probabilities and outputs the probability that it should defer.
//!
//! The gates are trained jointly on each LLM-labelled item with
//!
//! ```text
//! Σ_j MSE(g_j, min(1[argmax p_j ≠ y] + a_j, 1)) + λ_j ‖θ_j‖²
//!   + Σ_j (Π_{k<j} g_k) · [(1 − g_j) · CE(p_j, y) + g_j · c_j · μ]
//! ```
//!
//! where the students' probabilities p_j are constants. CE is the true
//! cross-entropy −ln p_j[y]; the authors' code applies a second softmax to the
//! probabilities, which squeezes CE into a narrow band (see ARCHITECTURE.md).

use rand::Rng;

use crate::config::GateConfig;

const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const ADAM_EPSILON: f32 = 1e-8;
/// Probabilities are clamped here before the log so a confident mistake costs
/// a large but finite loss.
const MIN_PROBABILITY: f32 = 1e-7;

/// `Linear(inputs, hidden) → ReLU → Linear(hidden, 1) → Sigmoid`, trained with Adam.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Gate {
    inputs: usize,
    hidden: usize,
    lr: f32,
    regularization: f32,
    /// Flat parameters: `w1 (hidden × inputs) | b1 (hidden) | w2 (hidden) | b2`.
    params: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    steps: i32,
}

/// A forward pass kept for the backward pass.
#[derive(Debug, Clone)]
pub struct GateForward {
    hidden: Vec<f32>,
    pub output: f32,
}

/// What one gate needs for a training step on an LLM-labelled item.
#[derive(Debug, Clone, Copy)]
pub struct GateExample<'a> {
    /// The level's class probabilities for the item.
    pub probs: &'a [f32],
    /// The LLM's label.
    pub label: usize,
    /// The LLM's distribution over the labels, when it gave one (soft labels).
    pub soft: Option<&'a [f32]>,
    /// Added to the 0/1 error target (0 during warm-up).
    pub calibration: f32,
    /// The level's deferral cost c_j.
    pub cost: f64,
}

impl Gate {
    /// PyTorch's default `Linear` init: uniform in ±1/√fan_in.
    pub fn new(inputs: usize, config: &GateConfig, rng: &mut impl Rng) -> Self {
        let hidden = config.hidden;
        let mut params = Vec::with_capacity(hidden * inputs + 2 * hidden + 1);
        let bound1 = 1.0 / (inputs as f32).sqrt();
        let bound2 = 1.0 / (hidden as f32).sqrt();
        params.extend((0..hidden * inputs + hidden).map(|_| rng.random_range(-bound1..bound1)));
        params.extend((0..=hidden).map(|_| rng.random_range(-bound2..bound2)));
        let size = params.len();
        Self {
            inputs,
            hidden,
            lr: config.lr,
            regularization: config.regularization,
            params,
            adam_m: vec![0.0; size],
            adam_v: vec![0.0; size],
            steps: 0,
        }
    }

    /// Same inputs, hidden size and parameter sizes: a checkpoint of one fits the other.
    pub fn same_shape(&self, other: &Self) -> bool {
        (self.inputs, self.hidden) == (other.inputs, other.hidden)
            && other.params.len() == self.params.len()
            && other.adam_m.len() == self.params.len()
            && other.adam_v.len() == self.params.len()
    }

    pub fn forward(&self, probs: &[f32]) -> GateForward {
        debug_assert_eq!(probs.len(), self.inputs);
        let (w1, rest) = self.params.split_at(self.hidden * self.inputs);
        let (b1, rest) = rest.split_at(self.hidden);
        let (w2, b2) = rest.split_at(self.hidden);
        let hidden: Vec<f32> = (0..self.hidden)
            .map(|h| {
                let row = &w1[h * self.inputs..(h + 1) * self.inputs];
                let z = b1[h] + row.iter().zip(probs).map(|(w, x)| w * x).sum::<f32>();
                z.max(0.0)
            })
            .collect();
        let z = b2[0] + w2.iter().zip(&hidden).map(|(w, h)| w * h).sum::<f32>();
        GateForward {
            hidden,
            output: sigmoid(z),
        }
    }

    /// One Adam step given dLoss/dOutput for this gate's forward pass.
    fn step(&mut self, probs: &[f32], forward: &GateForward, d_output: f32) {
        let g = forward.output;
        let d_z = d_output * g * (1.0 - g);
        let mut grad = vec![0.0f32; self.params.len()];
        let w2_start = self.hidden * self.inputs + self.hidden;
        {
            let (g_w1, rest) = grad.split_at_mut(self.hidden * self.inputs);
            let (g_b1, rest) = rest.split_at_mut(self.hidden);
            let (g_w2, g_b2) = rest.split_at_mut(self.hidden);
            g_b2[0] = d_z;
            for h in 0..self.hidden {
                g_w2[h] = d_z * forward.hidden[h];
                if forward.hidden[h] > 0.0 {
                    let d_hidden = d_z * self.params[w2_start + h];
                    g_b1[h] = d_hidden;
                    for (gw, x) in g_w1[h * self.inputs..(h + 1) * self.inputs]
                        .iter_mut()
                        .zip(probs)
                    {
                        *gw = d_hidden * x;
                    }
                }
            }
        }
        self.steps += 1;
        let correction1 = 1.0 - ADAM_BETA1.powi(self.steps);
        let correction2 = 1.0 - ADAM_BETA2.powi(self.steps);
        for (i, g) in grad.into_iter().enumerate() {
            let g = g + 2.0 * self.regularization * self.params[i];
            self.adam_m[i] = ADAM_BETA1 * self.adam_m[i] + (1.0 - ADAM_BETA1) * g;
            self.adam_v[i] = ADAM_BETA2 * self.adam_v[i] + (1.0 - ADAM_BETA2) * g * g;
            let m_hat = self.adam_m[i] / correction1;
            let v_hat = self.adam_v[i] / correction2;
            self.params[i] -= self.lr * m_hat / (v_hat.sqrt() + ADAM_EPSILON);
        }
    }
}

/// One joint training step of all gates on an LLM-labelled item.
/// `examples[j]` belongs to `gates[j]`. Returns the loss before the step.
pub fn train_gates(gates: &mut [Gate], examples: &[GateExample<'_>], mu: f64) -> f32 {
    assert_eq!(gates.len(), examples.len());
    let forwards: Vec<GateForward> = gates
        .iter()
        .zip(examples)
        .map(|(gate, ex)| gate.forward(ex.probs))
        .collect();
    let outputs: Vec<f32> = forwards.iter().map(|f| f.output).collect();
    let targets: Vec<f32> = examples.iter().map(error_target).collect();
    let ce: Vec<f32> = examples.iter().map(cross_entropy).collect();
    let deferral: Vec<f32> = examples.iter().map(|ex| (ex.cost * mu) as f32).collect();

    let (loss, d_outputs) = loss_and_gradient(&outputs, &targets, &ce, &deferral);
    for ((gate, ex), (forward, d)) in gates
        .iter_mut()
        .zip(examples)
        .zip(forwards.iter().zip(d_outputs))
    {
        gate.step(ex.probs, forward, d);
    }
    loss
}

/// `min(1[argmax p ≠ y] + calibration, 1)`; with a soft label q, the chance
/// 1 − q[argmax p] that the answer is not the LLM's takes the indicator's place.
fn error_target(ex: &GateExample<'_>) -> f32 {
    let answer = argmax(ex.probs);
    let wrong = match ex.soft {
        Some(q) => 1.0 - q[answer],
        None => f32::from(u8::from(answer != ex.label)),
    };
    (wrong + ex.calibration).min(1.0)
}

/// The student's cross-entropy to the LLM's label, or to its distribution.
fn cross_entropy(ex: &GateExample<'_>) -> f32 {
    match ex.soft {
        Some(q) => q
            .iter()
            .zip(ex.probs)
            .map(|(q, p)| -q * p.max(MIN_PROBABILITY).ln())
            .sum(),
        None => -ex.probs[ex.label].max(MIN_PROBABILITY).ln(),
    }
}

/// The loss without the regulariser, and its gradient with respect to each gate output.
fn loss_and_gradient(g: &[f32], target: &[f32], ce: &[f32], deferral: &[f32]) -> (f32, Vec<f32>) {
    let n = g.len();
    // T_j: the cost at level j given that the item reached it.
    let t: Vec<f32> = (0..n)
        .map(|j| (1.0 - g[j]) * ce[j] + g[j] * deferral[j])
        .collect();
    let reach = |j: usize, skip: Option<usize>| -> f32 {
        (0..j).filter(|&k| Some(k) != skip).map(|k| g[k]).product()
    };
    let mut loss = 0.0;
    let mut grad = vec![0.0; n];
    for i in 0..n {
        loss += (g[i] - target[i]).powi(2) + reach(i, None) * t[i];
        grad[i] = 2.0 * (g[i] - target[i]) + reach(i, None) * (deferral[i] - ce[i]);
        for (j, t_j) in t.iter().enumerate().skip(i + 1) {
            grad[i] += reach(j, Some(i)) * t_j;
        }
    }
    (loss, grad)
}

pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn config() -> GateConfig {
        GateConfig {
            lr: 1e-2,
            regularization: 1e-4,
            decaying_factor: 0.9,
            calibration: 0.3,
            hidden: 16,
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let g = [0.3f32, 0.6, 0.8];
        let target = [1.0f32, 0.4, 0.4];
        let ce = [1.2f32, 0.2, 0.05];
        let deferral = [0.5f32, 0.3, 2.0];
        let (_, grad) = loss_and_gradient(&g, &target, &ce, &deferral);
        for i in 0..3 {
            let h = 1e-3;
            let mut up = g;
            up[i] += h;
            let mut down = g;
            down[i] -= h;
            let numeric = (loss_and_gradient(&up, &target, &ce, &deferral).0
                - loss_and_gradient(&down, &target, &ce, &deferral).0)
                / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-2,
                "dL/dg{i}: analytic {} numeric {numeric}",
                grad[i]
            );
        }
    }

    #[test]
    fn gate_learns_to_defer_on_uncertain_inputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut gates = vec![Gate::new(2, &config(), &mut rng)];
        // Confident inputs are right, uncertain ones are wrong.
        for step in 0..3000 {
            let (probs, label) = if step % 2 == 0 {
                ([0.95, 0.05], 0)
            } else {
                ([0.45, 0.55], 0)
            };
            let ex = GateExample {
                soft: None,
                probs: &probs,
                label,
                calibration: 0.3,
                cost: 1.0,
            };
            train_gates(&mut gates, &[ex], 1e-3);
        }
        let confident = gates[0].forward(&[0.95, 0.05]).output;
        let uncertain = gates[0].forward(&[0.45, 0.55]).output;
        assert!(
            confident < 0.5,
            "confident input should answer: {confident}"
        );
        assert!(uncertain > 0.5, "uncertain input should defer: {uncertain}");
    }

    /// With a soft label the gate's error target is the chance that the
    /// answer is not the LLM's, and its cross-entropy is to the distribution.
    #[test]
    fn a_soft_label_sets_the_error_target_and_cross_entropy() {
        let soft = [0.8, 0.2];
        let ex = GateExample {
            soft: Some(&soft),
            probs: &[0.6, 0.4],
            label: 0,
            calibration: 0.1,
            cost: 1.0,
        };
        assert!((error_target(&ex) - 0.3).abs() < 1e-6);
        let ce = -(0.8 * 0.6f32.ln() + 0.2 * 0.4f32.ln());
        assert!((cross_entropy(&ex) - ce).abs() < 1e-6);
        let hard = GateExample { soft: None, ..ex };
        assert!((error_target(&hard) - 0.1).abs() < 1e-6);
        assert!((cross_entropy(&hard) + 0.6f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn a_large_mu_makes_deferring_expensive() {
        let train = |mu: f64| {
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut gates = vec![Gate::new(2, &config(), &mut rng)];
            for _ in 0..2000 {
                let ex = GateExample {
                    soft: None,
                    probs: &[0.6, 0.4],
                    label: 1,
                    calibration: 0.0,
                    cost: 1.0,
                };
                train_gates(&mut gates, &[ex], mu);
            }
            gates[0].forward(&[0.6, 0.4]).output
        };
        assert!(train(0.0) > 0.5);
        assert!(train(10.0) < 0.5);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.2, 0.5, 0.5]), 1);
        assert_eq!(argmax(&[1.0]), 0);
    }
}
