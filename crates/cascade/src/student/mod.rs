//! Students: the cheap models of the cascade, trained online on the LLM's labels.

pub mod features;
pub mod logreg;
pub mod softmax_regression;
pub mod transformer;

use thiserror::Error;

pub use logreg::LogReg;

use crate::config::{LevelConfig, StudentKind};
use transformer::{EmbeddingHead, FineTuned};

/// A labelled example handed to a student: the text and the LLM's label.
#[derive(Debug, Clone, Copy)]
pub struct Demonstration<'a> {
    pub text: &'a str,
    pub label: usize,
}

#[derive(Debug, Error)]
pub enum StudentError {
    #[error("student `{student}`: {reason}")]
    Failed { student: String, reason: String },
}

/// A model that gives class probabilities and learns from demonstrations.
pub trait Student: Send {
    fn name(&self) -> &str;

    /// The cost of deferring past this student (the paper's c_j).
    fn cost(&self) -> f64;

    /// Class probabilities for each text: one row per text, one column per label.
    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError>;

    /// One optimisation pass over a batch of demonstrations.
    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError>;

    /// Sees every text of the stream once, labelled or not, before it is routed.
    /// Streaming statistics (document frequencies) live here; most students ignore it.
    fn observe(&mut self, _text: &str) {}

    /// Fits corpus statistics on the whole stream before it starts. This looks
    /// ahead, so only students configured for it (the authors' `prefit` IDF) use it.
    fn prefit(&mut self, _corpus: &[&str]) {}

    /// Batch work ahead of the stream that can change no decision, such as
    /// filling an embedding cache. Most students ignore it.
    fn precompute(&mut self, _texts: &[&str]) -> Result<(), StudentError> {
        Ok(())
    }

    /// Everything the student has learned (weights, optimiser moments, corpus
    /// statistics), for checkpoints; caches that can be recomputed are left out.
    fn save_state(&self) -> Result<Vec<u8>, StudentError> {
        Err(StudentError::Failed {
            student: self.name().to_string(),
            reason: "this kind of student cannot be checkpointed yet".into(),
        })
    }

    /// Restores what `save_state` wrote, into a student built from the same config.
    fn load_state(&mut self, _state: &[u8]) -> Result<(), StudentError> {
        Err(StudentError::Failed {
            student: self.name().to_string(),
            reason: "this kind of student cannot be checkpointed yet".into(),
        })
    }
}

/// Encodes a student's state (CBOR).
pub(crate) fn encode_state<T: serde::Serialize>(
    student: &str,
    state: &T,
) -> Result<Vec<u8>, StudentError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(state, &mut bytes).map_err(|e| StudentError::Failed {
        student: student.to_string(),
        reason: format!("encoding its state: {e}"),
    })?;
    Ok(bytes)
}

/// Decodes a student's state written by [`encode_state`].
pub(crate) fn decode_state<T: serde::de::DeserializeOwned>(
    student: &str,
    bytes: &[u8],
) -> Result<T, StudentError> {
    ciborium::from_reader(bytes).map_err(|e| StudentError::Failed {
        student: student.to_string(),
        reason: format!("its checkpointed state is unreadable: {e}"),
    })
}

/// f32 values stored as one little-endian byte string: in CBOR that is four
/// bytes a value instead of five, and one copy instead of a value at a time,
/// which matters for a fine-tuned encoder's millions of weights and moments.
pub(crate) mod f32_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        if bytes.len() % 4 != 0 {
            return Err(D::Error::custom(format!(
                "{} bytes cannot hold f32 values",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Builds the student a level's config describes.
pub fn build_student(
    level: &LevelConfig,
    labels: usize,
    seed: u64,
) -> Result<Box<dyn Student>, StudentError> {
    let (name, cost) = (level.name(), level.cost);
    Ok(match level.kind {
        StudentKind::Logreg => Box::new(LogReg::new(name, cost, labels, &level.logreg)),
        StudentKind::Transformer => Box::new(FineTuned::new(
            name,
            cost,
            labels,
            &level.transformer,
            seed,
        )?),
        StudentKind::EmbeddingHead => Box::new(EmbeddingHead::new(
            name,
            cost,
            labels,
            &level.embedding_head,
        )?),
    })
}
