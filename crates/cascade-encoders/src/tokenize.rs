//! WordPiece/BPE tokenisation with our own limits: the tokenizer file's
//! truncation and padding are switched off, texts are cut to `max_len` tokens
//! (special tokens included) and each batch is padded to its longest member.

use crate::error::EncoderError;
use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_len: usize,
    cls: u32,
    sep: u32,
    pad: u32,
}

/// A padded batch: token ids `(batch, seq)` u32 and mask `(batch, seq)` f32.
pub struct TokenBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub lengths: Vec<usize>,
}

impl TextEncoder {
    pub fn load(path: &Path, max_len: usize) -> Result<Self, EncoderError> {
        let bad = |reason: String| EncoderError::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| bad(format!("cannot load the tokenizer: {e}")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| bad(e.to_string()))?;
        tokenizer.with_padding(None);
        // The tokenizer's own opening and closing tokens ([CLS]/[SEP] for
        // BERT, <s>/</s> for MPNet): what it wraps an empty text in.
        let empty = tokenizer.encode("", true).map_err(|e| bad(e.to_string()))?;
        let &[cls, sep] = empty.get_ids() else {
            return Err(bad(format!(
                "the tokenizer wraps a text in {} special tokens, not two",
                empty.get_ids().len()
            )));
        };
        // Padding is masked out, so its id only has to exist.
        let pad = ["[PAD]", "<pad>"]
            .into_iter()
            .find_map(|token| tokenizer.token_to_id(token))
            .ok_or_else(|| bad("no `[PAD]` or `<pad>` token".into()))?;
        if max_len < 3 {
            return Err(EncoderError::MaxLen {
                max_len,
                reason: "it must be at least 3".into(),
            });
        }
        Ok(Self {
            cls,
            sep,
            pad,
            tokenizer,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The text's token ids without special tokens or truncation.
    pub fn body_ids(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The most body tokens one wrapped text holds (`max_len` less the two
    /// wrapping tokens).
    pub fn body_capacity(&self) -> usize {
        self.max_len - 2
    }

    /// `[CLS] body [SEP]` with the body cut so the whole fits in `max_len`.
    pub fn wrap(&self, body: &[u32]) -> Vec<u32> {
        let keep = body.len().min(self.body_capacity());
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(self.cls);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.sep);
        ids
    }

    /// `[CLS] tokens… [SEP]`, cut to `max_len`.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        Ok(self.wrap(&self.body_ids(text)?))
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Tokenises and pads a batch to its longest member.
    pub fn batch(&self, texts: &[&str], device: &Device) -> Result<TokenBatch, EncoderError> {
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<_, _>>()?;
        pad_batch(&rows, self.pad, device)
    }
}

/// Pads token rows to the longest one.
pub fn pad_batch(rows: &[Vec<u32>], pad: u32, device: &Device) -> Result<TokenBatch, EncoderError> {
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * seq);
    let mut mask = Vec::with_capacity(rows.len() * seq);
    for row in rows {
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, seq - row.len()));
        mask.extend(std::iter::repeat_n(1f32, row.len()));
        mask.extend(std::iter::repeat_n(0f32, seq - row.len()));
    }
    let shape = (rows.len(), seq);
    Ok(TokenBatch {
        ids: Tensor::from_vec(ids, shape, device)?,
        mask: Tensor::from_vec(mask, shape, device)?,
        lengths: rows.iter().map(Vec::len).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_to_the_longest_row() {
        let b = pad_batch(&[vec![1, 2, 3], vec![1, 2]], 0, &Device::Cpu).unwrap();
        assert_eq!(b.ids.dims(), &[2, 3]);
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3], vec![1, 2, 0]]
        );
        assert_eq!(b.mask.to_vec2::<f32>().unwrap()[1], vec![1.0, 1.0, 0.0]);
        assert_eq!(b.lengths, vec![3, 2]);
    }
}
