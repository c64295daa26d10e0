//! LLM experts for `cascade` behind one `Expert` trait: the recorded expert,
//! which plays back LLM annotations in a dataset folder, an OpenAI-compatible
//! chat-completions expert for live LLMs, and the local Gemma 3 expert.

pub mod cache;
pub mod dataset;
pub mod expert;
pub mod function;
#[cfg(feature = "local")]
pub mod gemma;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;
pub mod recorded;
#[cfg(feature = "local")]
pub mod sentencepiece;
pub mod task;
pub mod testing;

pub use dataset::{read_labels, Dataset, DatasetError, Item, StreamOrder};
pub use expert::{label_all, Answer, AnswerFuture, Expert, ExpertError, Query, Usage};
pub use function::FnExpert;
#[cfg(feature = "local")]
pub use local::{LocalConfig, LocalError, LocalExpert};
pub use openai::{OpenAiConfig, OpenAiExpert, SetupError};
pub use recorded::RecordedExpert;
pub use task::{ParseRule, Task, TaskError};
