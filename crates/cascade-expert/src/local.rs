//! The local expert: a base (not instruction-tuned) GGUF model run on the CPU.
//!
//! A base model has no chat template, and free generation rarely produces a
//! label word, so the expert asks with the task's few-shot completion prompt
//! and compares the label words' first-token logits at the first generated
//! position. The label is the highest; the probabilities are a softmax over
//! those logits only.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::task::Task;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cache::{CachedAnswer, ResponseCache, SharedCache};
use crate::expert::{Answer, AnswerFuture, Expert, ExpertError, Query, Usage};
use crate::gemma::{Gemma, GemmaError};
use crate::sentencepiece::SentencePiece;

/// Where `scripts/setup.sh` puts the default model.
pub const DEFAULT_MODEL: &str = "models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf";

#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    /// A GGUF file of a supported architecture (Gemma 3).
    pub model: PathBuf,
    /// Longer texts are cut to this many tokens (the prompt stays within
    /// Gemma 3's 512-token sliding window, and prefill time stays bounded).
    pub max_text_tokens: usize,
    /// Append-only JSONL response cache; `None`: none.
    pub cache: Option<PathBuf>,
    /// Serve cached answers through [`Expert::label`]. Off: the model always
    /// runs there (to measure its cost); answers are still written.
    pub reuse_cached: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from(DEFAULT_MODEL),
            max_text_tokens: 384,
            cache: None,
            reuse_cached: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(transparent)]
    Model(#[from] GemmaError),
    #[error("task `{task}`: {message}")]
    Task { task: String, message: String },
    #[error("response cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

/// Time spent in the model, for throughput reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ComputeTime {
    pub prompts: u64,
    pub prompt_tokens: u64,
    pub elapsed: Duration,
}

/// The local expert; cheap to clone (the model is shared).
#[derive(Clone)]
pub struct LocalExpert(Arc<LocalModel>);

impl Deref for LocalExpert {
    type Target = LocalModel;
    fn deref(&self) -> &LocalModel {
        &self.0
    }
}

/// The loaded model, its prompt and its cache.
pub struct LocalModel {
    model: Gemma,
    tokenizer: SentencePiece,
    task: Task,
    /// The first token of each label word, as it follows the prompt.
    label_tokens: Vec<u32>,
    max_text_tokens: usize,
    model_id: String,
    prompt_fingerprint: String,
    cache: SharedCache,
    usage: Mutex<Usage>,
    compute: Mutex<ComputeTime>,
    reuse_cached: bool,
    /// One forward pass at a time: its matmuls already use every core.
    forward: Mutex<()>,
}

impl LocalExpert {
    pub fn load(config: &LocalConfig, task: Task) -> Result<Self, LocalError> {
        let task_error = |message: String| LocalError::Task {
            task: task.name().to_string(),
            message,
        };
        let prompt = task.prompt().ok_or_else(|| {
            task_error(
                "has no prompt: give a task file with a `few_shot` block (tasks/*.toml)".into(),
            )
        })?;
        let few_shot = prompt.few_shot.as_ref().ok_or_else(|| {
            task_error("has no `few_shot` block, which a base model needs".into())
        })?;
        if config.max_text_tokens == 0 {
            return Err(task_error("max_text_tokens must be at least 1".into()));
        }
        let (model, tokenizer) = Gemma::load(&config.model)?;
        let mut label_tokens = Vec::new();
        for word in &prompt.label_words {
            // The prompt ends just before the label word, which follows a space.
            let token = *tokenizer
                .encode(&format!(" {}", word.trim()))
                .first()
                .ok_or_else(|| task_error(format!("label word `{word}` is empty")))?;
            if let Some(i) = label_tokens.iter().position(|t| *t == token) {
                return Err(task_error(format!(
                    "label words `{}` and `{word}` begin with the same token, so their logits cannot tell them apart",
                    prompt.label_words[i]
                )));
            }
            label_tokens.push(token);
        }
        let size = std::fs::metadata(&config.model)
            .map(|m| m.len())
            .unwrap_or(0);
        let file_name = config
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let model_id = format!("local:{file_name}:{size}");
        let mut hash = Sha256::new();
        hash.update(format!(
            "{few_shot:?}|{:?}|{}",
            prompt.label_words, config.max_text_tokens
        ));
        let prompt_fingerprint = format!("{:x}", hash.finalize());
        let cache =
            SharedCache::open(config.cache.as_deref()).map_err(|source| LocalError::Cache {
                path: config
                    .cache
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            })?;
        Ok(Self(Arc::new(LocalModel {
            model,
            tokenizer,
            task,
            label_tokens,
            max_text_tokens: config.max_text_tokens,
            model_id,
            prompt_fingerprint,
            cache,
            usage: Mutex::new(Usage::default()),
            compute: Mutex::new(ComputeTime::default()),
            reuse_cached: config.reuse_cached,
            forward: Mutex::new(()),
        })))
    }
}

impl LocalModel {
    pub fn model(&self) -> &Gemma {
        &self.model
    }

    pub fn compute_time(&self) -> ComputeTime {
        *self.compute.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The prompt's token ids: BOS, then the few-shot prompt with the text cut
    /// to `max_text_tokens`.
    pub fn prompt_ids(&self, text: &str) -> Vec<u32> {
        let text_ids = self.tokenizer.encode(text);
        let cut;
        let text = if text_ids.len() > self.max_text_tokens {
            cut = self.tokenizer.decode(&text_ids[..self.max_text_tokens]);
            cut.as_str()
        } else {
            text
        };
        let prompt = self
            .task
            .prompt()
            .and_then(|p| p.few_shot_prompt(self.task.labels(), text))
            .unwrap_or_default();
        let config = self.model.config();
        let mut ids = Vec::with_capacity(text_ids.len() + 64);
        if config.add_bos {
            ids.push(config.bos);
        }
        ids.extend(self.tokenizer.encode(&prompt));
        ids
    }

    /// Labels one text with the model (no cache).
    pub fn classify(&self, text: &str) -> Result<(String, Vec<f32>), ExpertError> {
        let ids = self.prompt_ids(text);
        let _one_at_a_time = self.forward.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let model_error = |e: GemmaError| ExpertError::Malformed(format!("local model: {e}"));
        let hidden = self.model.last_hidden(&ids).map_err(model_error)?;
        let logits = self
            .model
            .token_logits(&hidden, &self.label_tokens)
            .map_err(model_error)?;
        let elapsed = started.elapsed();
        {
            let mut compute = self.compute.lock().unwrap_or_else(|e| e.into_inner());
            compute.prompts += 1;
            compute.prompt_tokens += ids.len() as u64;
            compute.elapsed += elapsed;
        }
        {
            let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            usage.requests += 1;
            usage.prompt_tokens += ids.len() as u64;
        }
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        let raw = self.label_words()[best].clone();
        let max = logits[best];
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        Ok((raw, exp.iter().map(|e| e / total).collect()))
    }

    /// Labels one text on this thread. With `use_cache`, a cached answer is
    /// served; without, the model always runs (to measure its cost). Either
    /// way a computed answer is written to the cache.
    pub fn label_now(&self, text: &str, use_cache: bool) -> Result<Answer, ExpertError> {
        let key = ResponseCache::key(&self.model_id, &self.prompt_fingerprint, text);
        if use_cache {
            if let Some(hit) = self.cache.get(&key) {
                self.usage
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .cache_hits += 1;
                return self.answer(hit.raw, hit.probs.unwrap_or_default(), true);
            }
        }
        let (raw, probs) = self.classify(text)?;
        self.cache.insert(
            key,
            CachedAnswer {
                raw: raw.clone(),
                probs: Some(probs.clone()),
            },
        );
        self.answer(raw, probs, false)
    }

    fn label_words(&self) -> &[String] {
        self.task
            .prompt()
            .map(|p| p.label_words.as_slice())
            .unwrap_or_default()
    }

    fn answer(&self, raw: String, probs: Vec<f32>, cached: bool) -> Result<Answer, ExpertError> {
        // The raw answer is a label word, in label order.
        let label = self
            .label_words()
            .iter()
            .position(|w| *w == raw)
            .ok_or_else(|| ExpertError::NoLabel { raw: raw.clone() })?;
        Ok(Answer {
            label,
            probs: Some(probs),
            raw,
            cached,
        })
    }
}

/// The forward pass runs on a blocking thread, off the async workers.
impl Expert for LocalExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        let (model, text) = (Arc::clone(&self.0), query.text.to_string());
        Box::pin(async move {
            let reuse = model.reuse_cached;
            tokio::task::spawn_blocking(move || model.label_now(&text, reuse))
                .await
                .map_err(|e| ExpertError::Failed(format!("local expert task: {e}")))?
        })
    }

    fn usage(&self) -> Usage {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }
}
