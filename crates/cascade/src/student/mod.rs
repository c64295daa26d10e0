//! Students: the cheap models of the cascade, trained online on the LLM's labels.

pub mod features;
pub mod logreg;
pub mod softmax_regression;

use thiserror::Error;

pub use logreg::LogReg;

/// A labelled example handed to a student: the text and the LLM's label.
#[derive(Debug, Clone, Copy)]
pub struct Demonstration<'a> {
    pub text: &'a str,
    pub label: usize,
    /// The LLM's probability per label (a distribution), when it gave one:
    /// students then learn the cross-entropy to it instead of to the label.
    pub probs: Option<&'a [f32]>,
}

impl Demonstration<'_> {
    /// What the student's cross-entropy aims at: the expert's distribution,
    /// or the label as a one-hot row.
    pub fn target(&self, labels: usize) -> Vec<f32> {
        match self.probs {
            Some(probs) if probs.len() == labels => probs.to_vec(),
            _ => (0..labels)
                .map(|k| f32::from(u8::from(k == self.label)))
                .collect(),
        }
    }
}

/// Why a student failed. The cascade adds the level's name.
#[derive(Debug, Error)]
pub enum StudentError {
    #[error("label {label} is out of range for {labels} labels")]
    LabelOutOfRange { label: usize, labels: usize },
    #[error("encoding its state: {0}")]
    EncodeState(String),
    #[error("its saved state is unreadable: {0}")]
    UnreadableState(String),
    /// A readable state written for another student (other sizes, labels, model).
    #[error("its saved state does not fit: {0}")]
    StateMismatch(String),
    /// The model behind the student (an encoder, its files, its cache) failed.
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
}

/// A model that gives class probabilities and learns from demonstrations.
/// Its name and cost belong to the level it sits at, not to it.
pub trait Student: Send {
    /// Class probabilities for each text: one row per text, one column per label.
    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError>;

    /// One optimisation pass over a batch of demonstrations.
    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError>;

    /// Everything the student has learned (weights, optimiser moments, corpus
    /// statistics), for checkpoints; caches that can be recomputed are left out.
    fn save_state(&self) -> Result<Vec<u8>, StudentError>;

    /// Restores what `save_state` wrote, into a student built from the same
    /// config; a state that does not fit is refused before anything changes.
    fn load_state(&mut self, state: &[u8]) -> Result<(), StudentError>;

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
}

/// Refuses a batch holding a label outside `0..labels`.
pub fn check_labels(batch: &[Demonstration<'_>], labels: usize) -> Result<(), StudentError> {
    match batch.iter().find(|d| d.label >= labels) {
        Some(bad) => Err(StudentError::LabelOutOfRange {
            label: bad.label,
            labels,
        }),
        None => Ok(()),
    }
}

/// Encodes a student's state (CBOR).
pub fn encode_state<T: serde::Serialize>(state: &T) -> Result<Vec<u8>, StudentError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(state, &mut bytes)
        .map_err(|e| StudentError::EncodeState(e.to_string()))?;
    Ok(bytes)
}

/// Decodes a student's state written by [`encode_state`].
pub fn decode_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StudentError> {
    ciborium::from_reader(bytes).map_err(|e| StudentError::UnreadableState(e.to_string()))
}

/// f32 values stored as one little-endian byte string: in CBOR that is four
/// bytes a value instead of five, and one copy instead of a value at a time,
/// which matters for a fine-tuned encoder's millions of weights and moments.
pub mod f32_bytes {
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
