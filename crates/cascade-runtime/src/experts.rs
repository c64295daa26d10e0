//! Which expert answers deferred items, built from its settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cascade_expert::Task;
use cascade_expert::{Dataset, Expert, OpenAiConfig, OpenAiExpert, RecordedExpert};
#[cfg(feature = "local")]
use cascade_expert::{LocalConfig, LocalExpert};

use crate::error::{Result, RuntimeError};

/// An expert's settings.
#[derive(Debug, Clone)]
pub enum ExpertSpec {
    /// The answers recorded in a dataset folder's column, looked up by item id.
    Recorded {
        data: PathBuf,
        field: String,
        /// Per-call delay, to play a slow LLM.
        delay: Duration,
    },
    /// A GGUF model on this machine.
    #[cfg(feature = "local")]
    Local(LocalConfig),
    /// An OpenAI-compatible chat-completions API.
    OpenAi(OpenAiConfig),
}

impl ExpertSpec {
    /// What a checkpoint must match: who answers, never how fast.
    pub fn fingerprint(&self) -> String {
        match self {
            Self::Recorded { data, field, .. } => format!("recorded|{}|{field}", data.display()),
            #[cfg(feature = "local")]
            Self::Local(config) => format!(
                "local|{}|{}",
                config.model.display(),
                config.max_text_tokens
            ),
            Self::OpenAi(config) => format!("openai|{}|{}", config.base_url, config.model),
        }
    }

    /// The longest one call may take, retries and backoff included, when
    /// the settings bound it (a local model's time is not bounded here).
    pub fn longest_call(&self) -> Option<Duration> {
        match self {
            Self::Recorded { delay, .. } => Some(*delay),
            #[cfg(feature = "local")]
            Self::Local(_) => None,
            // Settings too large for a Duration bound nothing.
            Self::OpenAi(config) => {
                let attempts = config.max_attempts.max(1);
                let timeout = Duration::try_from_secs_f64(config.timeout_secs).ok()?;
                let waits =
                    Duration::from_millis(config.backoff_max_ms).checked_mul(attempts - 1)?;
                timeout.checked_mul(attempts)?.checked_add(waits)
            }
        }
    }
}

/// The expert a spec describes.
pub fn build_expert(spec: &ExpertSpec, task: &Task) -> Result<Arc<dyn Expert>> {
    Ok(match spec {
        ExpertSpec::Recorded { data, field, delay } => Arc::new(RecordedExpert::new(
            &Dataset::load(data, task, field)?,
            *delay,
        )),
        #[cfg(feature = "local")]
        ExpertSpec::Local(config) => Arc::new(LocalExpert::load(config, task.clone())?),
        ExpertSpec::OpenAi(config) => Arc::new(OpenAiExpert::new(config.clone(), task.clone())?),
    })
}

/// The chat-completions expert's settings: a TOML file (the fields of
/// `OpenAiConfig`), with the endpoint and model given on the command line on top.
pub fn openai_config(
    file: Option<&Path>,
    base_url: Option<&str>,
    model: Option<&str>,
) -> Result<OpenAiConfig> {
    let mut config = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(RuntimeError::io(path))?;
            toml::from_str::<OpenAiConfig>(&text).map_err(|e| {
                RuntimeError::setting(
                    path.display().to_string(),
                    format!("is not a valid expert config: {e}"),
                )
            })?
        }
        None => OpenAiConfig::new(
            base_url.ok_or_else(|| {
                RuntimeError::setting("--base-url", "is required (or --expert-config)")
            })?,
            model.ok_or_else(|| {
                RuntimeError::setting("--model", "is required (or --expert-config)")
            })?,
        ),
    };
    if let Some(v) = base_url {
        config.base_url = v.to_string();
    }
    if let Some(v) = model {
        config.model = v.to_string();
    }
    Ok(config)
}
