//! LLM experts for `cascade`. For now: the replay expert, which answers from
//! recorded LLM annotations in a dataset folder.

pub mod replay;

pub use replay::{read_labels, Dataset, Item, ReplayError, StreamOrder};
