//! A Gemma 3 text decoder read from a GGUF file, for the local expert: one
//! forward pass over a prompt gives the final hidden state at its last
//! position, and from it the logits of a few chosen tokens.
//!
//! Written here rather than taken from `candle_transformers::quantized_gemma3`,
//! which precomputes RoPE tables for 131,072 positions in every layer (~2.3 GB),
//! mixes mask dtypes on a multi-token forward at a non-zero position, and uses
//! SiLU where Gemma uses GELU. Here the RoPE tables cover only the prompt, the
//! mask is built once per forward in f32, and the layer weights are dequantised
//! to f32 at load (prefill ~4× faster than quantised matmuls on this kind of
//! CPU) while the 262k-row token embedding, which doubles as the output head,
//! stays quantised: only the prompt's rows and the label tokens' rows are read.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use thiserror::Error;

use crate::sentencepiece::{SentencePiece, TokenizerError};

#[derive(Debug, Error)]
pub enum GemmaError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

/// The shape of the network, from the GGUF's `gemma3.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub feed_forward: usize,
    pub rms_eps: f32,
    /// Keys a sliding-window layer sees: the query's own position and the
    /// `sliding_window - 1` before it.
    pub sliding_window: usize,
    /// Every `global_every`-th layer attends globally; the others slide.
    pub global_every: usize,
    pub rope_base_global: f32,
    pub rope_base_local: f32,
    pub bos: u32,
    pub add_bos: bool,
}

struct Layer {
    attn_norm: Tensor,
    /// [q | k | v] projections, (hidden, (heads + 2·kv_heads)·head_dim).
    qkv: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    /// (heads·head_dim, hidden).
    out: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    /// [gate | up], (hidden, 2·feed_forward).
    gate_up: Tensor,
    /// (feed_forward, hidden).
    down: Tensor,
    post_ffn_norm: Tensor,
    sliding: bool,
}

pub struct Gemma {
    config: GemmaConfig,
    embedding: QTensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    device: Device,
}

/// The per-forward tables shared by all layers of one kind.
struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// Additive mask (rows: the queries computed, columns: all keys).
    mask: Tensor,
}

impl Gemma {
    /// Reads the model and its tokenizer from a GGUF file.
    pub fn load(path: &Path) -> Result<(Self, SentencePiece), GemmaError> {
        let shown = path.display().to_string();
        let io = |source| GemmaError::Io {
            path: shown.clone(),
            source,
        };
        let format = |message: String| GemmaError::Format {
            path: shown.clone(),
            message,
        };
        let mut file = File::open(path).map_err(io)?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| format(format!("not a readable GGUF file ({e})")))?;
        let config = read_config(&content.metadata).map_err(format)?;
        let tokenizer = SentencePiece::from_gguf(&content.metadata)?;
        let device = Device::Cpu;
        let mut reader = TensorReader {
            content: &content,
            file: &mut file,
            device: &device,
            path: &shown,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            let qkv = Tensor::cat(
                &[
                    reader.weight(&name("attn_q"))?,
                    reader.weight(&name("attn_k"))?,
                    reader.weight(&name("attn_v"))?,
                ],
                1,
            )?;
            let gate_up = Tensor::cat(
                &[
                    reader.weight(&name("ffn_gate"))?,
                    reader.weight(&name("ffn_up"))?,
                ],
                1,
            )?;
            layers.push(Layer {
                attn_norm: reader.vector(&name("attn_norm"))?,
                q_norm: reader.vector(&name("attn_q_norm"))?,
                k_norm: reader.vector(&name("attn_k_norm"))?,
                post_attn_norm: reader.vector(&name("post_attention_norm"))?,
                ffn_norm: reader.vector(&name("ffn_norm"))?,
                post_ffn_norm: reader.vector(&name("post_ffw_norm"))?,
                qkv,
                out: reader.weight(&name("attn_output"))?,
                gate_up,
                down: reader.weight(&name("ffn_down"))?,
                sliding: (i + 1) % config.global_every != 0,
            });
        }
        let final_norm = reader.vector("output_norm.weight")?;
        let embedding = reader.quantized("token_embd.weight")?;
        let expected = [config.hidden, config.heads, config.head_dim];
        let q_width = layers[0].qkv.dim(1)?;
        if q_width != (config.heads + 2 * config.kv_heads) * config.head_dim
            || embedding.shape().dims().last() != Some(&config.hidden)
        {
            return Err(format(format!(
                "tensor shapes do not match the metadata (hidden, heads, head_dim = {expected:?})"
            )));
        }
        let model = Self {
            config,
            embedding,
            layers,
            final_norm,
            device,
        };
        Ok((model, tokenizer))
    }

    pub fn config(&self) -> &GemmaConfig {
        &self.config
    }

    /// The final (normed) hidden state at the last position of `ids`.
    pub fn last_hidden(&self, ids: &[u32]) -> Result<Tensor, GemmaError> {
        let c = &self.config;
        let n = ids.len();
        if n == 0 {
            return Err(candle_core::Error::Msg("empty prompt".into()).into());
        }
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = (self.embedding.embedding(&ids)? * (c.hidden as f64).sqrt())?;
        let global = self.positions(n, c.rope_base_global, None)?;
        let local = self.positions(n, c.rope_base_local, Some(c.sliding_window))?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let positions = if layer.sliding { &local } else { &global };
            // The last layer only needs the last position's output.
            x = self.layer_forward(layer, &x, positions, i == last)?;
        }
        let x = x.narrow(0, x.dim(0)? - 1, 1)?;
        Ok(candle_nn::ops::rms_norm(&x, &self.final_norm, c.rms_eps)?.squeeze(0)?)
    }

    /// The output head's logits for `tokens` only (the head is the tied embedding).
    pub fn token_logits(&self, hidden: &Tensor, tokens: &[u32]) -> Result<Vec<f32>, GemmaError> {
        let rows = self
            .embedding
            .embedding(&Tensor::new(tokens, &self.device)?)?;
        Ok(rows.matmul(&hidden.unsqueeze(1)?)?.squeeze(1)?.to_vec1()?)
    }

    fn positions(
        &self,
        n: usize,
        base: f32,
        window: Option<usize>,
    ) -> Result<Positions, GemmaError> {
        let half = self.config.head_dim / 2;
        let inverse: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / self.config.head_dim as f32))
            .collect();
        let angles: Vec<f32> = (0..n)
            .flat_map(|p| inverse.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (n, half), &self.device)?;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    let visible = j <= i && window.is_none_or(|w| i - j < w);
                    if visible {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Positions {
            cos: angles.cos()?,
            sin: angles.sin()?,
            mask: Tensor::from_vec(mask, (n, n), &self.device)?,
        })
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        positions: &Positions,
        last_only: bool,
    ) -> Result<Tensor, GemmaError> {
        let c = &self.config;
        let (n, _) = x.dims2()?;
        let (q_width, kv_width) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let norm = |t: &Tensor, w: &Tensor| candle_nn::ops::rms_norm(t, w, c.rms_eps);
        let qkv = norm(x, &layer.attn_norm)?.matmul(&layer.qkv)?;
        // (n, heads, head_dim) → normed per head → (1, heads, n, head_dim) for RoPE.
        let split = |start: usize, width: usize, heads: usize, w: &Tensor| {
            let t = qkv
                .narrow(1, start, width)?
                .reshape((n, heads, c.head_dim))?;
            let t = norm(&t, w)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
            candle_nn::rotary_emb::rope(&t, &positions.cos, &positions.sin)
        };
        let q = split(0, q_width, c.heads, &layer.q_norm)?;
        let k = split(q_width, kv_width, c.kv_heads, &layer.k_norm)?.squeeze(0)?;
        let v = qkv
            .narrow(1, q_width + kv_width, kv_width)?
            .reshape((n, c.kv_heads, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let (q, mask, residual) = if last_only {
            (
                q.narrow(2, n - 1, 1)?.contiguous()?,
                positions.mask.narrow(0, n - 1, 1)?,
                x.narrow(0, n - 1, 1)?,
            )
        } else {
            (q, positions.mask.clone(), x.clone())
        };
        let m = q.dim(2)?;
        // Grouped-query attention: the query heads sharing a key head are
        // stacked as rows, so each key head is one matmul.
        let groups = c.heads / c.kv_heads;
        let q = q.reshape((c.kv_heads, groups * m, c.head_dim))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (c.head_dim as f64).sqrt()))?
            .reshape((c.kv_heads, groups, m, n))?
            .broadcast_add(&mask)?;
        let weights =
            candle_nn::ops::softmax_last_dim(&scores)?.reshape((c.kv_heads, groups * m, n))?;
        let attended = weights
            .matmul(&v)?
            .reshape((c.heads, m, c.head_dim))?
            .transpose(0, 1)?
            .reshape((m, q_width))?;
        let attended = norm(&attended.matmul(&layer.out)?, &layer.post_attn_norm)?;
        let x = (residual + attended)?;
        let gate_up = norm(&x, &layer.ffn_norm)?.matmul(&layer.gate_up)?;
        let gate = gate_up.narrow(1, 0, c.feed_forward)?.gelu()?;
        let up = gate_up.narrow(1, c.feed_forward, c.feed_forward)?;
        let ffn = norm(&(gate * up)?.matmul(&layer.down)?, &layer.post_ffn_norm)?;
        Ok((x + ffn)?)
    }
}

/// Reads named tensors out of an open GGUF file.
struct TensorReader<'a> {
    content: &'a gguf_file::Content,
    file: &'a mut File,
    device: &'a Device,
    path: &'a str,
}

impl TensorReader<'_> {
    fn quantized(&mut self, name: &str) -> Result<QTensor, GemmaError> {
        self.content
            .tensor(self.file, name, self.device)
            .map_err(|e| GemmaError::Format {
                path: self.path.to_string(),
                message: format!("tensor `{name}`: {e}"),
            })
    }

    /// A norm's weights, in f32.
    fn vector(&mut self, name: &str) -> Result<Tensor, GemmaError> {
        Ok(self.quantized(name)?.dequantize(self.device)?)
    }

    /// A projection, dequantised and transposed from the file's (out, in) to
    /// (in, out) so that x·W is a plain matmul.
    fn weight(&mut self, name: &str) -> Result<Tensor, GemmaError> {
        Ok(self
            .quantized(name)?
            .dequantize(self.device)?
            .t()?
            .contiguous()?)
    }
}

fn read_config(
    metadata: &std::collections::HashMap<String, gguf_file::Value>,
) -> Result<GemmaConfig, String> {
    let get = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| format!("no `{key}` in metadata"))
    };
    let arch = get("general.architecture")?
        .to_string()
        .map_err(|e| e.to_string())?;
    if arch != "gemma3" {
        return Err(format!(
            "architecture `{arch}` is not supported (the local expert runs `gemma3` models)"
        ));
    }
    let int = |key: &str| -> Result<usize, String> {
        get(&format!("gemma3.{key}"))?
            .to_u32()
            .map(|v| v as usize)
            .map_err(|e| format!("`gemma3.{key}`: {e}"))
    };
    let float = |key: &str, default: f32| -> Result<f32, String> {
        match metadata.get(&format!("gemma3.{key}")) {
            Some(v) => v.to_f32().map_err(|e| format!("`gemma3.{key}`: {e}")),
            None => Ok(default),
        }
    };
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv")?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{heads} attention heads cannot share {kv_heads} key/value heads"
        ));
    }
    Ok(GemmaConfig {
        layers: int("block_count")?,
        hidden: int("embedding_length")?,
        heads,
        kv_heads,
        head_dim: int("attention.key_length")?,
        feed_forward: int("feed_forward_length")?,
        rms_eps: float("attention.layer_norm_rms_epsilon", 1e-6)?,
        sliding_window: int("attention.sliding_window")?,
        // llama.cpp's values for Gemma 3; GGUFs do not record them.
        global_every: 6,
        rope_base_global: float("rope.freq_base", 1e6)?,
        rope_base_local: float("rope.local_freq_base", 1e4)?,
        bos: metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2),
        add_bos: metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true),
    })
}
