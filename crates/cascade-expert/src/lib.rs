//! LLM experts for `cascade`: the replay expert, which answers from recorded
//! LLM annotations in a dataset folder, and an OpenAI-compatible
//! chat-completions expert for live LLMs, the local Gemma 3 expert, and the
//! bounded JSONL stream reader.

pub mod cache;
pub mod expert;
pub mod gemma;
pub mod input;
pub mod local;
pub mod openai;
pub mod replay;
pub mod sentencepiece;
pub mod testing;

pub use expert::{Answer, Expert, ExpertError, Usage};
pub use local::{LocalConfig, LocalError, LocalExpert};
pub use openai::{OpenAiConfig, OpenAiExpert, SetupError};
pub use replay::{read_labels, Dataset, Item, ReplayError, StreamOrder};
