//! Transformer students for `cascade` on candle: our own BERT/MPNet encoder
//! (with a full backward pass), tokenisation, the fused ops that make both
//! fast on CPU, AdamW, and the two students (fine-tuned, embedding head).
//! Model folders are read here; the embedding head keeps an optional file cache.

pub mod attention;
pub mod bert;
pub mod embedding_head;
pub mod error;
pub mod finetune;
mod layer;
pub mod linear;
pub mod ops;
pub mod optim;
pub mod quantized;
mod sgemm;
pub mod tokenize;

pub use bert::{mean_pool, BertConfig, BertEncoder, Trainable};
pub use embedding_head::EmbeddingHead;
pub use error::EncoderError;
pub use finetune::FineTuned;
pub use optim::{AdamW, AdamWConfig};
pub use tokenize::{TextEncoder, TokenBatch};

use std::path::Path;

use candle_core::Device;

/// Loads the encoder and tokenizer of a model folder.
pub fn load_model(
    dir: &Path,
    max_len: usize,
    trainable: Trainable,
) -> Result<(BertEncoder, TextEncoder), EncoderError> {
    if !dir.join("model.safetensors").exists() {
        return Err(EncoderError::MissingWeights(dir.to_path_buf()));
    }
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    if max_len > config.max_tokens() {
        return Err(EncoderError::MaxLen {
            max_len,
            reason: format!("the model has {} positions", config.max_tokens()),
        });
    }
    let text = TextEncoder::load(&dir.join("tokenizer.json"), max_len)?;
    let encoder = BertEncoder::load(dir, config, trainable, &Device::Cpu).map_err(|source| {
        EncoderError::Weights {
            dir: dir.to_path_buf(),
            source,
        }
    })?;
    Ok((encoder, text))
}
