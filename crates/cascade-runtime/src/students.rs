//! Students from a level's config: the LR always, the transformer students
//! when the `encoders` feature is on (without it, a cascade of LR students
//! builds and runs with no candle at all).

use cascade::config::{LevelConfig, StudentKind};
use cascade::student::LogReg;
use cascade::{CascadeConfig, Student};

use crate::error::{Result, RuntimeError};

/// One student per configured level, in order; level j is seeded `seed + j`.
pub fn build_students(config: &CascadeConfig, labels: usize) -> Result<Vec<Box<dyn Student>>> {
    config
        .levels
        .iter()
        .enumerate()
        .map(|(j, level)| build_student(level, labels, config.seed.wrapping_add(j as u64)))
        .collect()
}

/// The student a level's config describes.
pub fn build_student(level: &LevelConfig, labels: usize, seed: u64) -> Result<Box<dyn Student>> {
    #[cfg(feature = "encoders")]
    let encoder_error = |source| RuntimeError::Encoder {
        level: level.name(),
        source: Box::new(source),
    };
    Ok(match level.kind {
        StudentKind::Logreg => Box::new(LogReg::new(labels, &level.logreg)),
        #[cfg(feature = "encoders")]
        StudentKind::Transformer => Box::new(
            cascade_encoders::FineTuned::new(labels, &level.transformer, seed)
                .map_err(encoder_error)?,
        ),
        #[cfg(feature = "encoders")]
        StudentKind::EmbeddingHead => Box::new(
            cascade_encoders::EmbeddingHead::new(labels, &level.embedding_head)
                .map_err(encoder_error)?,
        ),
        #[cfg(not(feature = "encoders"))]
        StudentKind::Transformer | StudentKind::EmbeddingHead => {
            let _ = seed;
            return Err(RuntimeError::setting(
                format!("level `{}`", level.name()),
                "is a transformer student: build cascade-runtime with its `encoders` feature",
            ));
        }
    })
}
