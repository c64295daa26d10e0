//! The runtime's errors: one variant per way to fail, upstream errors wrapped.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("in {path}: {source}")]
    Config {
        path: PathBuf,
        source: cascade::ConfigError,
    },
    /// A setting (a config field or a command-line option) that cannot work.
    #[error("{field} {reason}")]
    Setting { field: String, reason: String },
    #[error(transparent)]
    Cascade(#[from] cascade::CascadeError),
    #[cfg(feature = "encoders")]
    #[error("level `{level}`: {source}")]
    Encoder {
        level: String,
        source: Box<cascade_encoders::EncoderError>,
    },
    #[error(transparent)]
    Task(#[from] cascade_expert::TaskError),
    #[error(transparent)]
    Dataset(#[from] cascade_expert::DatasetError),
    #[cfg(feature = "local")]
    #[error(transparent)]
    LocalExpert(#[from] cascade_expert::LocalError),
    #[error(transparent)]
    OpenAiExpert(#[from] cascade_expert::SetupError),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the input: {0}")]
    Input(String),
    #[error("writing the output: {0}")]
    Output(std::io::Error),
    #[error("the expert's task failed: {0}")]
    ExpertTask(String),
    /// The NATS server or one of the cluster's streams, buckets or consumers.
    #[error("NATS ({what}): {reason}")]
    Nats { what: String, reason: String },
}

impl RuntimeError {
    pub(crate) fn setting(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Setting {
            field: field.into(),
            reason: reason.into(),
        }
    }

    #[cfg(feature = "cluster")]
    pub(crate) fn nats<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |e| Self::Nats {
            what,
            reason: e.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
