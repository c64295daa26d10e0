//! Transformer students on candle: our own BERT encoder (with a full backward
//! pass), tokenisation, and the fused ops that make both fast on CPU.

pub mod attention;
pub mod bert;
pub mod embedding_head;
pub mod finetune;
pub mod linear;
pub mod ops;
pub mod optim;
pub mod tokenize;

pub use bert::{mean_pool, BertConfig, BertEncoder, Trainable};
pub use embedding_head::EmbeddingHead;
pub use finetune::FineTuned;
pub use optim::{AdamW, AdamWConfig};
pub use tokenize::{TextEncoder, TokenBatch};

use std::path::Path;

use candle_core::Device;

use crate::student::StudentError;

/// Loads the encoder and tokenizer of a model folder for student `name`.
pub fn load_model(
    name: &str,
    dir: &Path,
    max_len: usize,
    trainable: Trainable,
) -> Result<(BertEncoder, TextEncoder), StudentError> {
    let fail = |reason: String| StudentError::Failed {
        student: name.to_string(),
        reason,
    };
    if !dir.join("model.safetensors").exists() {
        return Err(fail(format!(
            "no model.safetensors in {} (run scripts/setup.sh to fetch the default models)",
            dir.display()
        )));
    }
    let config = BertConfig::from_file(&dir.join("config.json")).map_err(fail)?;
    if max_len > config.max_tokens() {
        return Err(fail(format!(
            "max_len {max_len} exceeds the model's {} positions",
            config.max_tokens()
        )));
    }
    let text = TextEncoder::load(&dir.join("tokenizer.json"), max_len).map_err(fail)?;
    let encoder = BertEncoder::load(dir, config, trainable, &Device::Cpu)
        .map_err(|e| fail(format!("loading {}: {e}", dir.display())))?;
    Ok((encoder, text))
}
