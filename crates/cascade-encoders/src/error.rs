//! The encoders' errors, one variant per way to fail.

use std::path::PathBuf;

use cascade::student::StudentError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EncoderError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model folder's file (config.json, tokenizer.json) that cannot be used.
    #[error("{path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    #[error("no model.safetensors in {0} (run scripts/setup.sh to fetch the default models)")]
    MissingWeights(PathBuf),
    #[error("loading {dir}: {source}")]
    Weights {
        dir: PathBuf,
        source: candle_core::Error,
    },
    #[error("max_len {max_len} does not fit: {reason}")]
    MaxLen { max_len: usize, reason: String },
    #[error("layer {layer} asked for, but {dir} has {depth} layers")]
    TooDeep {
        layer: usize,
        depth: usize,
        dir: PathBuf,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("embedding cache in {dir}: {source}")]
    Cache {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the embedding cache: {0}")]
    CacheWrite(std::io::Error),
    #[error("the embedding of a text is missing from the cache")]
    MissingEmbedding,
    /// A saved optimiser or model state written for other parameters.
    #[error("{0}")]
    StateMismatch(String),
}

impl From<EncoderError> for StudentError {
    fn from(error: EncoderError) -> Self {
        match error {
            EncoderError::StateMismatch(reason) => StudentError::StateMismatch(reason),
            other => StudentError::Model(Box::new(other)),
        }
    }
}

pub type Result<T, E = EncoderError> = std::result::Result<T, E>;
