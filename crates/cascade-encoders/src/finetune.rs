//! The `transformer` student: a BERT-family encoder fine-tuned online with a
//! linear head on its mean-pooled output, by AdamW on each full cache.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::optim::AdamWState;
use super::{load_model, mean_pool, AdamW, AdamWConfig, BertEncoder, TextEncoder, Trainable};
use cascade::config::TransformerConfig;
use cascade::student::{Demonstration, Student, StudentError};

use crate::error::EncoderError;

/// Any encoder failure, as a student error.
fn model_error(error: impl Into<EncoderError>) -> StudentError {
    error.into().into()
}

pub struct FineTuned {
    labels: usize,
    encoder: BertEncoder,
    text: TextEncoder,
    head_w: Var,
    head_b: Var,
    optimizer: AdamW,
    device: Device,
}

/// What a checkpoint holds: the trainable weights (the frozen ones are read
/// again from the model folder) and the optimiser's moments.
#[derive(serde::Serialize, serde::Deserialize)]
struct FineTunedState {
    weights: Vec<NamedWeights>,
    optimizer: AdamWState,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NamedWeights {
    name: String,
    #[serde(with = "cascade::student::f32_bytes")]
    values: Vec<f32>,
}

impl FineTuned {
    /// The head is initialised from `seed`, so runs are reproducible.
    pub fn new(labels: usize, config: &TransformerConfig, seed: u64) -> Result<Self, EncoderError> {
        let trainable = Trainable {
            enabled: true,
            embeddings: !config.freeze_embeddings,
            frozen_layers: config.frozen_layers,
        };
        let device = Device::Cpu;
        let (encoder, text) = load_model(Path::new(&config.model), config.max_len, trainable)?;
        let hidden = encoder.config().hidden_size;
        // PyTorch's Linear init: uniform in ±1/√fan_in.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (hidden as f32).sqrt();
        let w: Vec<f32> = (0..hidden * labels)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let b: Vec<f32> = (0..labels)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let head_w = Var::from_tensor(&Tensor::from_vec(w, (hidden, labels), &device)?)?;
        let head_b = Var::from_tensor(&Tensor::from_vec(b, labels, &device)?)?;
        let mut vars: Vec<Var> = encoder.vars().iter().map(|(_, v)| v.clone()).collect();
        vars.extend([head_w.clone(), head_b.clone()]);
        let optimizer = AdamW::new(
            vars,
            AdamWConfig {
                lr: config.lr,
                weight_decay: config.weight_decay,
                ..AdamWConfig::default()
            },
        );
        Ok(Self {
            labels,
            encoder,
            text,
            head_w,
            head_b,
            optimizer,
            device,
        })
    }

    fn logits(&self, texts: &[&str]) -> Result<Tensor, StudentError> {
        let batch = self.text.batch(texts, &self.device).map_err(model_error)?;
        let run = || -> candle_core::Result<Tensor> {
            let hidden = self.encoder.forward(&batch.ids, &batch.mask)?;
            let pooled = mean_pool(&hidden, &batch.mask)?;
            pooled
                .matmul(self.head_w.as_tensor())?
                .broadcast_add(self.head_b.as_tensor())
        };
        run().map_err(model_error)
    }

    /// The trainable weights by name, in the optimiser's order.
    fn trainable(&self) -> Vec<(&str, &Var)> {
        let head = [("head.weight", &self.head_w), ("head.bias", &self.head_b)];
        self.encoder
            .vars()
            .iter()
            .map(|(name, var)| (name.as_str(), var))
            .chain(head)
            .collect()
    }
}

impl Student for FineTuned {
    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError> {
        let logits = self.logits(texts)?.detach();
        candle_nn::ops::softmax_last_dim(&logits)
            .and_then(|p| p.to_vec2::<f32>())
            .map_err(model_error)
    }

    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError> {
        cascade::student::check_labels(batch, self.labels)?;
        let texts: Vec<&str> = batch.iter().map(|d| d.text).collect();
        let labels: Vec<u32> = batch.iter().map(|d| d.label as u32).collect();
        // Soft labels: the mean cross-entropy to each row's distribution.
        let soft = batch.iter().any(|d| d.probs.is_some()).then(|| {
            batch
                .iter()
                .flat_map(|d| d.target(self.labels))
                .collect::<Vec<f32>>()
        });
        let logits = self.logits(&texts)?;
        let step = || -> candle_core::Result<()> {
            let loss = match soft {
                None => {
                    let labels = Tensor::from_vec(labels, texts.len(), &self.device)?;
                    candle_nn::loss::cross_entropy(&logits, &labels)?
                }
                Some(targets) => {
                    let targets =
                        Tensor::from_vec(targets, (texts.len(), self.labels), &self.device)?;
                    let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
                    ((targets * log_probs)?.sum_all()?.neg()? / texts.len() as f64)?
                }
            };
            let grads = loss.backward()?;
            self.optimizer.step(&grads)
        };
        step().map_err(model_error)
    }

    fn save_state(&self) -> Result<Vec<u8>, StudentError> {
        let weights = self
            .trainable()
            .into_iter()
            .map(|(name, var)| {
                Ok(NamedWeights {
                    name: name.to_string(),
                    values: var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                })
            })
            .collect::<candle_core::Result<_>>()
            .map_err(model_error)?;
        let optimizer = self.optimizer.state().map_err(model_error)?;
        cascade::student::encode_state(&FineTunedState { weights, optimizer })
    }

    /// Checks the whole state against this model before changing anything, so a
    /// refused checkpoint leaves the student as it was.
    fn load_state(&mut self, state: &[u8]) -> Result<(), StudentError> {
        let state: FineTunedState = cascade::student::decode_state(state)?;
        let trainable = self.trainable();
        if state.weights.len() != trainable.len() {
            return Err(StudentError::StateMismatch(format!(
                "the checkpoint holds {} trainable tensors, this model {} \
                 (another model, or other frozen layers)",
                state.weights.len(),
                trainable.len()
            )));
        }
        for (saved, (name, var)) in state.weights.iter().zip(&trainable) {
            if saved.name != *name || saved.values.len() != var.elem_count() {
                return Err(StudentError::StateMismatch(format!(
                    "the checkpoint's tensor `{}` ({} values) does not fit `{name}` ({} values)",
                    saved.name,
                    saved.values.len(),
                    var.elem_count()
                )));
            }
        }
        // The weights fit; the optimiser refuses a state that does not fit it
        // before changing anything.
        let trainable: Vec<Var> = trainable.into_iter().map(|(_, var)| var.clone()).collect();
        self.optimizer
            .restore(state.optimizer)
            .map_err(model_error)?;
        let restore = || -> candle_core::Result<()> {
            for (saved, var) in state.weights.into_iter().zip(&trainable) {
                var.set(&Tensor::from_vec(saved.values, var.shape(), &self.device)?)?;
            }
            Ok(())
        };
        restore().map_err(model_error)
    }
}
