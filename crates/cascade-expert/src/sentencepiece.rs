//! SentencePiece encoding from a GGUF's vocabulary (`tokenizer.ggml.model =
//! "llama"`: pieces with scores), which candle's GGUF tokenizer does not do.
//!
//! As SentencePiece's BPE-with-scores: spaces become "▁"; user-defined pieces
//! (Gemma's runs of newlines, tabs, spaces) match whole, longest first, before
//! any merging; in the rest, adjacent symbols are merged while their
//! concatenation is a piece, highest score first (leftmost on ties); a symbol
//! that is not a piece falls back to its UTF-8 bytes (`<0xAB>` pieces).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum TokenizerError {
    #[error("GGUF tokenizer: {0}")]
    Invalid(String),
}

/// SentencePiece's token types, as GGUF stores them.
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<String>,
    scores: Vec<f32>,
    by_piece: HashMap<String, u32>,
    /// User-defined pieces, longest first.
    user_defined: Vec<(String, u32)>,
    bytes: Vec<Option<u32>>,
    unknown: u32,
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text, to skip stale candidates.
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Highest score first; on a tie, the leftmost.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A symbol of the text being merged: a byte range, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SentencePiece {
    /// `types` are SentencePiece's (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte).
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        unknown: u32,
        add_space_prefix: bool,
    ) -> Result<Self, TokenizerError> {
        if pieces.len() != scores.len() || pieces.len() != types.len() {
            return Err(TokenizerError::Invalid(format!(
                "{} pieces, {} scores, {} types",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        if unknown as usize >= pieces.len() {
            return Err(TokenizerError::Invalid(format!(
                "unknown token id {unknown} out of range"
            )));
        }
        let mut by_piece = HashMap::with_capacity(pieces.len());
        let mut user_defined = Vec::new();
        let mut bytes = vec![None; 256];
        for (id, (piece, &kind)) in pieces.iter().zip(&types).enumerate() {
            let id = id as u32;
            match kind {
                // GGUF converters store Gemma's "▁▁" runs as plain spaces;
                // they match the escaped text, so escape them back.
                TYPE_USER_DEFINED => user_defined.push((piece.replace(' ', "▁"), id)),
                TYPE_BYTE => {
                    let byte = piece
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    if let Some(b) = byte {
                        bytes[b as usize] = Some(id);
                    }
                }
                _ => {}
            }
            by_piece.entry(piece.clone()).or_insert(id);
        }
        user_defined.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Self {
            pieces,
            scores,
            by_piece,
            user_defined,
            bytes,
            unknown,
            add_space_prefix,
        })
    }

    /// Reads the vocabulary from a GGUF's metadata.
    pub fn from_gguf(
        metadata: &HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self, TokenizerError> {
        let get = |key: &str| {
            metadata
                .get(key)
                .ok_or_else(|| TokenizerError::Invalid(format!("no `{key}`")))
        };
        let bad =
            |key: &str, e: candle_core::Error| TokenizerError::Invalid(format!("`{key}`: {e}"));
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        if model != "llama" {
            return Err(TokenizerError::Invalid(format!(
                "tokenizer.ggml.model is `{model}`, not SentencePiece (`llama`)"
            )));
        }
        let array = |key: &str| {
            get(key)?
                .to_vec()
                .map(|v| v.to_vec())
                .map_err(|e| bad(key, e))
        };
        let pieces = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("tokenizer.ggml.tokens", e))?;
        let scores = array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("tokenizer.ggml.scores", e))?;
        let types = array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("tokenizer.ggml.token_type", e))?;
        let unknown = get("tokenizer.ggml.unknown_token_id")?
            .to_u32()
            .map_err(|e| bad("tokenizer.ggml.unknown_token_id", e))?;
        let add_space_prefix = match metadata.get("tokenizer.ggml.add_space_prefix") {
            Some(v) => v
                .to_bool()
                .map_err(|e| bad("tokenizer.ggml.add_space_prefix", e))?,
            None => true,
        };
        Self::new(pieces, scores, types, unknown, add_space_prefix)
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id(&self, piece: &str) -> Option<u32> {
        self.by_piece.get(piece).copied()
    }

    /// Token ids of `text` (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut normalized = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && !text.is_empty() {
            normalized.push('▁');
        }
        normalized.push_str(&text.replace(' ', "▁"));
        let mut ids = Vec::new();
        let mut plain_start = 0;
        let mut at = 0;
        while at < normalized.len() {
            let rest = &normalized[at..];
            match self
                .user_defined
                .iter()
                .find(|(p, _)| rest.starts_with(p.as_str()))
            {
                Some((piece, id)) => {
                    self.encode_plain(&normalized[plain_start..at], &mut ids);
                    ids.push(*id);
                    at += piece.len();
                    plain_start = at;
                }
                None => at += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        self.encode_plain(&normalized[plain_start..], &mut ids);
        ids
    }

    /// Merges a stretch without user-defined pieces.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: index.checked_sub(1),
                next: None,
            });
            if index > 0 {
                symbols[index - 1].next = Some(index);
            }
        }
        let mut heap = BinaryHeap::new();
        let candidate = |left: usize, right: usize, symbols: &[Symbol]| {
            let (l, r) = (symbols[left], symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            self.by_piece.get(merged).map(|&id| Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len: merged.len(),
            })
        };
        for i in 1..symbols.len() {
            heap.extend(candidate(i - 1, i, &symbols));
        }
        while let Some(bigram) = heap.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            // Stale: one side has merged since this candidate was pushed.
            if l.len == 0
                || r.len == 0
                || l.len + r.len != bigram.len
                || l.next != Some(bigram.right)
            {
                continue;
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.left].next = r.next;
            symbols[bigram.right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(bigram.left);
            }
            if let Some(prev) = symbols[bigram.left].prev {
                heap.extend(candidate(prev, bigram.left, &symbols));
            }
            if let Some(next) = symbols[bigram.left].next {
                heap.extend(candidate(bigram.left, next, &symbols));
            }
        }
        let mut index = Some(0);
        while let Some(i) = index {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.by_piece.get(piece) {
                Some(&id) => ids.push(id),
                None => {
                    for byte in piece.bytes() {
                        ids.push(self.bytes[byte as usize].unwrap_or(self.unknown));
                    }
                }
            }
            index = s.next;
        }
    }

    /// The text of token ids (byte pieces joined back into UTF-8, "▁" as space).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.piece(id) else {
                continue;
            };
            match self.bytes.iter().position(|b| *b == Some(id)) {
                Some(byte) => bytes.push(byte as u8),
                None => bytes.extend_from_slice(piece.replace('▁', " ").as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: merges score higher the longer they are, except
    /// "ab", which loses to "bc" though both are pieces.
    fn toy() -> SentencePiece {
        let mut pieces: Vec<String> = [
            "<unk>", "▁▁", "\n\n", "a", "b", "c", "▁", "ab", "bc", "abc", "▁a",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut scores = vec![
            0.0, 0.0, 0.0, -5.0, -5.0, -5.0, -5.0, -3.0, -2.0, -1.0, -2.5,
        ];
        let mut types = vec![2, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(6);
        }
        SentencePiece::new(pieces, scores, types, 0, false).unwrap()
    }

    fn pieces(sp: &SentencePiece, text: &str) -> Vec<String> {
        sp.encode(text)
            .iter()
            .map(|&id| sp.piece(id).unwrap().to_string())
            .collect()
    }

    #[test]
    fn merges_follow_scores_not_position() {
        let sp = toy();
        // "bc" (-2) beats "ab" (-3); then "a"+"bc" = "abc".
        assert_eq!(pieces(&sp, "abc"), ["abc"]);
        // No "abca": "abc" then "a".
        assert_eq!(pieces(&sp, "abca"), ["abc", "a"]);
        assert_eq!(pieces(&sp, "cab"), ["c", "ab"]);
    }

    #[test]
    fn user_defined_pieces_match_whole_before_merging() {
        let sp = toy();
        // "▁▁" is one user-defined piece, not "▁" + "▁a".
        assert_eq!(pieces(&sp, "  a"), ["▁▁", "a"]);
        assert_eq!(pieces(&sp, " a"), ["▁a"]);
        assert_eq!(pieces(&sp, "a\n\nb"), ["a", "\n\n", "b"]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_and_decode_back() {
        let sp = toy();
        let ids = sp.encode("aé b");
        let p: Vec<&str> = ids.iter().map(|&i| sp.piece(i).unwrap()).collect();
        assert_eq!(p, ["a", "<0xC3>", "<0xA9>", "▁", "b"]);
        assert_eq!(sp.decode(&ids), "aé b");
    }

    #[test]
    fn inconsistent_vocabularies_are_refused() {
        let err = SentencePiece::new(vec!["a".into()], vec![], vec![1], 0, false).unwrap_err();
        assert!(err.to_string().contains("1 pieces, 0 scores"));
    }
}
