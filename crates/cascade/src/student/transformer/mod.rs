//! Transformer students on candle: our own BERT encoder (with a full backward
//! pass), tokenisation, and the fused ops that make both fast on CPU.

pub mod attention;
pub mod bert;
pub mod ops;
pub mod optim;
pub mod tokenize;

pub use bert::{mean_pool, BertConfig, BertEncoder, Trainable};
pub use optim::{AdamW, AdamWConfig};
pub use tokenize::{TextEncoder, TokenBatch};
