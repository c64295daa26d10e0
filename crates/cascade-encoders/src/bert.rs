//! A BERT-family encoder that trains: every weight can be a `Var`; each f32
//! layer is one fused op with its own backward pass (`layer.rs`), the
//! embeddings' norm the fused op of `ops.rs`; int8 layers (inference only)
//! are `quantized.rs`.
//!
//! Loads any Hugging Face BERT folder (`config.json`, `model.safetensors`,
//! memory-mapped); checkpoints with or without the `bert.` prefix. MPNet
//! folders (`model_type = "mpnet"`, e.g. all-mpnet-base-v2) load too: the same
//! layers under other names, RoBERTa-style position ids, no token types, and a
//! relative-position bias on the attention scores shared by all layers.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use serde::Deserialize;

use std::sync::Arc;

use super::attention::{Attention, PositionBias};
use super::layer::LayerShape;
use super::ops;
use super::quantized::{Norm, QuantizedLinear};

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// `bert` when absent, or `mpnet`.
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub pad_token_id: usize,
    /// MPNet's relative-position buckets.
    #[serde(default = "default_relative_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_relative_buckets() -> usize {
    32
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn from_file(path: &Path) -> std::result::Result<Self, crate::error::EncoderError> {
        let bad = |reason: String| crate::error::EncoderError::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a BERT config: {e}")))?;
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if !matches!(
            config.model_type.as_deref(),
            None | Some("bert") | Some("mpnet")
        ) {
            return Err(bad(format!(
                "model_type `{}` is not supported (only `bert` and `mpnet`)",
                config.model_type.as_deref().unwrap_or_default()
            )));
        }
        if config.max_tokens() < 3 {
            return Err(bad(format!(
                "max_position_embeddings {} leaves fewer than 3 positions",
                config.max_position_embeddings
            )));
        }
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only `gelu`)",
                config.hidden_act
            )));
        }
        Ok(config)
    }

    pub fn is_mpnet(&self) -> bool {
        self.model_type.as_deref() == Some("mpnet")
    }

    /// The first position id of a text: MPNet, like RoBERTa, skips the rows up
    /// to `pad_token_id`.
    fn position_offset(&self) -> usize {
        if self.is_mpnet() {
            self.pad_token_id + 1
        } else {
            0
        }
    }

    /// The longest token sequence the position table holds.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }
}

/// MPNet's (and T5's) bidirectional bucket of a relative position `key −
/// query`: exact up to a quarter of the buckets on each side, then
/// logarithmic up to `max_distance`. In f32, as the reference implementation.
fn relative_position_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let side = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let exact = half / 2;
    if n < exact {
        return side + n;
    }
    let log_ratio = (n as f32 / exact as f32).ln() / (max_distance as f32 / exact as f32).ln();
    let large = exact + (log_ratio * (half - exact) as f32) as usize;
    side + large.min(half - 1)
}

/// MPNet's fixed maximum distance for relative-position buckets.
const RELATIVE_MAX_DISTANCE: usize = 128;

/// Checkpoint names of a layer's attention weights, per architecture.
struct AttentionNames {
    query: &'static str,
    key: &'static str,
    value: &'static str,
    output: &'static str,
    norm: &'static str,
}

const BERT_ATTENTION: AttentionNames = AttentionNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    output: "attention.output.dense",
    norm: "attention.output.LayerNorm",
};

const MPNET_ATTENTION: AttentionNames = AttentionNames {
    query: "attention.attn.q",
    key: "attention.attn.k",
    value: "attention.attn.v",
    output: "attention.attn.o",
    norm: "attention.LayerNorm",
};

/// Which weights train; the rest are plain tensors with no gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trainable {
    pub enabled: bool,
    pub embeddings: bool,
    /// The lowest this many layers are frozen.
    pub frozen_layers: usize,
}

impl Trainable {
    pub const NONE: Self = Self {
        enabled: false,
        embeddings: false,
        frozen_layers: 0,
    };
    pub const ALL: Self = Self {
        enabled: true,
        embeddings: true,
        frozen_layers: 0,
    };
}

/// Where weights come from: a checkpoint, or a seeded random init (tests).
pub enum WeightSource<'a> {
    Safetensors(&'a MmapedSafetensors, &'a str),
    Random(&'a mut dyn FnMut(&[usize]) -> Vec<f32>),
}

struct Loader<'a> {
    source: WeightSource<'a>,
    device: Device,
    vars: Vec<(String, Var)>,
}

impl Loader<'_> {
    fn get(&mut self, name: &str, shape: &[usize], trainable: bool) -> Result<Tensor> {
        self.get_as(name, shape, trainable, false)
    }

    /// Like `get`; `transpose` stores a 2-d weight as its contiguous transpose.
    fn get_as(
        &mut self,
        name: &str,
        shape: &[usize],
        trainable: bool,
        transpose: bool,
    ) -> Result<Tensor> {
        let tensor = match &mut self.source {
            WeightSource::Safetensors(st, prefix) => {
                let full = format!("{prefix}{name}");
                // Older checkpoints call LayerNorm weights gamma/beta.
                let t = st.load(&full, &self.device).or_else(|_| {
                    let legacy = full.replace(".weight", ".gamma").replace(".bias", ".beta");
                    st.load(&legacy, &self.device)
                })?;
                if t.dims() != shape {
                    candle_core::bail!("{full}: expected shape {shape:?}, found {:?}", t.dims());
                }
                t.to_dtype(DType::F32)?
            }
            WeightSource::Random(init) => Tensor::from_vec(init(shape), shape, &self.device)?,
        };
        let tensor = if transpose {
            tensor.t()?.contiguous()?
        } else {
            tensor
        };
        if trainable {
            let var = Var::from_tensor(&tensor)?;
            let t = var.as_tensor().clone();
            self.vars.push((name.to_string(), var));
            Ok(t)
        } else {
            Ok(tensor)
        }
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(l: &mut Loader, name: &str, dim: usize, eps: f64, train: bool) -> Result<Self> {
        Ok(Self {
            weight: l.get(&format!("{name}.weight"), &[dim], train)?,
            bias: l.get(&format!("{name}.bias"), &[dim], train)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// One layer's f32 weights, in `LayerShape`'s flat order.
enum LayerWeights {
    /// Concatenated once at load.
    Frozen(Tensor),
    /// The checkpoint's variables (one per name), flattened and concatenated
    /// per pass: 12·h² floats, against 15·rows·h written by the layer.
    Trainable(Vec<Tensor>),
    /// Quantized: the f32 weights are no longer read.
    Dropped,
}

impl LayerWeights {
    fn flat(&self) -> Result<Tensor> {
        match self {
            Self::Frozen(flat) => Ok(flat.clone()),
            Self::Trainable(parts) => {
                let flat: Vec<Tensor> = parts
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<Result<_>>()?;
                Tensor::cat(&flat, 0)
            }
            Self::Dropped => {
                candle_core::bail!("the layer's f32 weights were dropped when it was quantized")
            }
        }
    }
}

/// The int8 layer: dense products in int8, attention and norms in f32.
struct Int8Layer {
    qkv: QuantizedLinear,
    attention_out: QuantizedLinear,
    attention_norm: Norm,
    up: QuantizedLinear,
    down: QuantizedLinear,
    output_norm: Norm,
}

impl Int8Layer {
    fn new(flat: &Tensor, shape: &LayerShape) -> Result<Self> {
        let (h, i) = (shape.hidden, shape.intermediate);
        let mut at = 0;
        let mut next = |dims: &[usize]| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let part = flat.narrow(0, at, n)?.reshape(dims)?;
            at += n;
            Ok(part)
        };
        let (qkv_w, qkv_b) = (next(&[3 * h, h])?, next(&[3 * h])?);
        let (out_w, out_b) = (next(&[h, h])?, next(&[h])?);
        let (norm1_g, norm1_b) = (next(&[h])?, next(&[h])?);
        let (up_w, up_b) = (next(&[i, h])?, next(&[i])?);
        let (down_w, down_b) = (next(&[h, i])?, next(&[h])?);
        let (norm2_g, norm2_b) = (next(&[h])?, next(&[h])?);
        let eps = shape.eps as f64;
        Ok(Self {
            qkv: QuantizedLinear::from_tensors(&qkv_w, &qkv_b)?,
            attention_out: QuantizedLinear::from_tensors(&out_w, &out_b)?,
            attention_norm: Norm::from_tensors(&norm1_g, &norm1_b, eps)?,
            up: QuantizedLinear::from_tensors(&up_w, &up_b)?,
            down: QuantizedLinear::from_tensors(&down_w, &down_b)?,
            output_norm: Norm::from_tensors(&norm2_g, &norm2_b, eps)?,
        })
    }

    /// The layer over `x`, its attention the fused f32 op.
    fn forward(&self, x: &Tensor, attention: &AttentionArgs) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let context = super::attention::attention(
            &qkv,
            attention.heads,
            &attention.mask_bias,
            attention.position_bias.as_ref(),
            attention.scale,
        )?;
        let block = super::quantized::PostAttention {
            attention_out: &self.attention_out,
            attention_norm: &self.attention_norm,
            up: &self.up,
            down: &self.down,
            output_norm: &self.output_norm,
        };
        block.forward(&context, x)
    }
}

/// What every layer's attention of one pass shares.
struct AttentionArgs {
    heads: usize,
    mask_bias: Tensor,
    position_bias: Option<PositionBias>,
    scale: f64,
}

struct Layer {
    weights: LayerWeights,
    shape: LayerShape,
    /// Set by `BertEncoder::quantize_int8`: the forward pass uses it instead.
    int8: Option<Int8Layer>,
}

pub struct BertEncoder {
    config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    /// BERT only; MPNet has no token types.
    token_type_embeddings: Option<Tensor>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    /// MPNet only: `(buckets, heads)`, frozen.
    relative_attention_bias: Option<Tensor>,
    vars: Vec<(String, Var)>,
}

/// Added to attention scores of padding keys.
const MASKED: f32 = -1e9;

impl BertEncoder {
    /// Loads `model.safetensors` from a model folder, memory-mapped.
    pub fn load(
        dir: &Path,
        config: BertConfig,
        trainable: Trainable,
        device: &Device,
    ) -> Result<Self> {
        let path = dir.join("model.safetensors");
        // Safety: the file is not modified while mapped (model folders are read-only inputs).
        let st = unsafe { MmapedSafetensors::new(&path)? };
        let prefix = ["bert.", "mpnet."]
            .into_iter()
            .find(|p| {
                st.get(&format!("{p}embeddings.word_embeddings.weight"))
                    .is_ok()
            })
            .unwrap_or("");
        Self::build(
            config,
            trainable,
            WeightSource::Safetensors(&st, prefix),
            device,
        )
    }

    pub fn build(
        config: BertConfig,
        trainable: Trainable,
        source: WeightSource<'_>,
        device: &Device,
    ) -> Result<Self> {
        let mut l = Loader {
            source,
            device: device.clone(),
            vars: Vec::new(),
        };
        let (h, c) = (config.hidden_size, &config);
        let emb = trainable.enabled && trainable.embeddings;
        let word_embeddings =
            l.get("embeddings.word_embeddings.weight", &[c.vocab_size, h], emb)?;
        let position_embeddings = l.get(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
            emb,
        )?;
        let token_type_embeddings = if c.is_mpnet() {
            None
        } else {
            Some(l.get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, h],
                emb,
            )?)
        };
        let names = if c.is_mpnet() {
            &MPNET_ATTENTION
        } else {
            &BERT_ATTENTION
        };
        let embedding_norm =
            LayerNorm::load(&mut l, "embeddings.LayerNorm", h, c.layer_norm_eps, emb)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let train = trainable.enabled && i >= trainable.frozen_layers;
            let p = format!("encoder.layer.{i}");
            let inter = c.intermediate_size;
            // Loaded in the checkpoint's order (the variables' order), then
            // arranged in the layer's flat order (`LayerShape`).
            let mut get = |name: &str, part: &str, shape: &[usize]| {
                l.get(&format!("{p}.{name}.{part}"), shape, train)
            };
            let mut qkv_w = Vec::with_capacity(3);
            let mut qkv_b = Vec::with_capacity(3);
            for name in [names.query, names.key, names.value] {
                qkv_w.push(get(name, "weight", &[h, h])?);
                qkv_b.push(get(name, "bias", &[h])?);
            }
            let mut parts = [qkv_w, qkv_b].concat();
            for (name, weight_dims) in [
                (names.output, &[h, h][..]),
                (names.norm, &[h][..]),
                ("intermediate.dense", &[inter, h][..]),
                ("output.dense", &[h, inter][..]),
                ("output.LayerNorm", &[h][..]),
            ] {
                parts.push(get(name, "weight", weight_dims)?);
                parts.push(get(name, "bias", &weight_dims[..1])?);
            }
            let weights = if train {
                LayerWeights::Trainable(parts)
            } else {
                LayerWeights::Trainable(parts)
                    .flat()
                    .map(LayerWeights::Frozen)?
            };
            layers.push(Layer {
                weights,
                shape: LayerShape {
                    hidden: h,
                    intermediate: inter,
                    eps: c.layer_norm_eps as f32,
                },
                int8: None,
            });
        }
        // The relative-position table does not train (the fused attention
        // gives its bias no gradient).
        let relative_attention_bias = if c.is_mpnet() {
            Some(l.get(
                "encoder.relative_attention_bias.weight",
                &[c.relative_attention_num_buckets, c.num_attention_heads],
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
            relative_attention_bias,
            vars: l.vars,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Switches every layer's dense products to int8 weights (per output
    /// channel) and int8 activations (per row): inference only, so a
    /// trainable encoder is refused.
    pub fn quantize_int8(&mut self) -> Result<()> {
        if !self.vars.is_empty() {
            candle_core::bail!("a trainable encoder cannot be quantized");
        }
        for layer in &mut self.layers {
            if layer.int8.is_none() {
                layer.int8 = Some(Int8Layer::new(&layer.weights.flat()?, &layer.shape)?);
                // The f32 weights are no longer read; do not keep 4× the bytes.
                layer.weights = LayerWeights::Dropped;
            }
        }
        Ok(())
    }

    /// The trainable weights, by checkpoint name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// `ids (batch, seq)` u32 and `mask (batch, seq)` f32 (1 for tokens, 0 for
    /// padding) → hidden states `(batch, seq, hidden)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut last = self.forward_layers(ids, mask, &[self.layers.len()])?;
        last.pop()
            .ok_or_else(|| candle_core::Error::Msg("the encoder has no layers".into()))
    }

    /// As `forward`, but returns the hidden states after each of `layers`
    /// (1-based, ascending; layer 0 is the embedding output), and stops after
    /// the last one asked for.
    pub fn forward_layers(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>> {
        let (batch, seq) = ids.dims2()?;
        if layers.windows(2).any(|w| w[0] >= w[1]) || layers.iter().any(|&l| l > self.layers.len())
        {
            candle_core::bail!(
                "layers {layers:?} are not ascending within 0..={}",
                self.layers.len()
            );
        }
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_dim = h / heads;
        if seq > self.config.max_tokens() {
            candle_core::bail!(
                "sequence of {seq} tokens exceeds the model's {} positions",
                self.config.max_tokens()
            );
        }
        let words = self.word_embeddings.embedding(&ids.flatten_all()?)?;
        // Padding is right-aligned, so every real token's position is its index.
        let positions = self
            .position_embeddings
            .narrow(0, self.config.position_offset(), seq)?
            .repeat((batch, 1))?;
        let mut embedded = (words + positions)?;
        if let Some(types) = &self.token_type_embeddings {
            // Single-segment input: every token has type 0.
            embedded = embedded.broadcast_add(&types.narrow(0, 0, 1)?)?;
        }
        let mut x = self.embedding_norm.forward(&embedded)?;
        let position_bias = self.position_bias(seq)?;
        // x is (batch·seq, hidden) from here on.
        let mask_bias = ((1.0 - mask)? * MASKED as f64)?.to_dtype(DType::F32)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let attention = Attention::new(
            (batch, seq, heads, head_dim),
            Arc::new(mask_bias.flatten_all()?.to_vec1()?),
            position_bias.as_ref(),
            scale,
        );
        let int8_attention = AttentionArgs {
            heads,
            mask_bias,
            position_bias,
            scale,
        };
        let mut kept = Vec::with_capacity(layers.len());
        if layers.first() == Some(&0) {
            kept.push(x.reshape((batch, seq, h))?);
        }
        let deepest = layers.last().copied().unwrap_or(0);
        for (index, layer) in self.layers.iter().enumerate().take(deepest) {
            x = match &layer.int8 {
                Some(int8) => int8.forward(&x, &int8_attention)?,
                None => {
                    super::layer::layer(&x, &layer.weights.flat()?, layer.shape, attention.clone())?
                }
            };
            if layers.contains(&(index + 1)) {
                kept.push(x.reshape((batch, seq, h))?);
            }
        }
        Ok(kept)
    }

    /// MPNet's `(heads, seq, seq)` relative-position bias; `None` for BERT.
    fn position_bias(&self, seq: usize) -> Result<Option<PositionBias>> {
        let Some(table) = &self.relative_attention_bias else {
            return Ok(None);
        };
        let (buckets, heads) = table.dims2()?;
        let table: Vec<Vec<f32>> = table.to_vec2()?;
        let mut bias = vec![0f32; heads * seq * seq];
        for query in 0..seq {
            for key in 0..seq {
                let relative = key as i64 - query as i64;
                let row =
                    &table[relative_position_bucket(relative, buckets, RELATIVE_MAX_DISTANCE)];
                for (head, b) in row.iter().enumerate() {
                    bias[(head * seq + query) * seq + key] = *b;
                }
            }
        }
        PositionBias::new(bias, heads, seq).map(Some)
    }
}

/// Mean of the hidden states over real tokens: `(batch, seq, hidden) → (batch, hidden)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
    summed.broadcast_div(&counts)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub fn tiny_config() -> BertConfig {
        BertConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            max_position_embeddings: 32,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            model_type: None,
            pad_token_id: 0,
            relative_attention_num_buckets: 32,
        }
    }

    pub fn tiny_encoder(trainable: Trainable, seed: u64) -> BertEncoder {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut init = |shape: &[usize]| -> Vec<f32> {
            let n: usize = shape.iter().product();
            if shape.len() == 1 {
                // Norm weights near 1 and biases near 0 keep activations sane.
                (0..n).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
            } else {
                (0..n).map(|_| rng.random_range(-0.2..0.2)).collect()
            }
        };
        BertEncoder::build(
            tiny_config(),
            trainable,
            WeightSource::Random(&mut init),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn batch() -> (Tensor, Tensor) {
        let ids = Tensor::new(&[[1u32, 5, 9, 2, 0], [1, 7, 3, 8, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 0.], [1., 1., 1., 1., 1.]],
            &Device::Cpu,
        )
        .unwrap();
        (ids, mask)
    }

    fn loss(encoder: &BertEncoder) -> Tensor {
        let (ids, mask) = batch();
        let hidden = encoder.forward(&ids, &mask).unwrap();
        let pooled = mean_pool(&hidden, &mask).unwrap();
        // A fixed, non-symmetric readout so every weight matters.
        let w: Vec<f32> = (0..16).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let w = Tensor::from_vec(w, (16, 1), &Device::Cpu).unwrap();
        pooled.matmul(&w).unwrap().sqr().unwrap().sum_all().unwrap()
    }

    #[test]
    fn forward_layers_returns_the_asked_layers_and_ends_on_forward() {
        let encoder = tiny_encoder(Trainable::NONE, 3);
        let (ids, mask) = batch();
        let last = encoder.forward(&ids, &mask).unwrap();
        let kept = encoder.forward_layers(&ids, &mask, &[0, 1, 2]).unwrap();
        assert_eq!(kept.len(), 3);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&kept[2]), values(&last));
        // Each layer changes the states: the three are distinct.
        assert_ne!(values(&kept[0]), values(&kept[1]));
        assert_ne!(values(&kept[1]), values(&kept[2]));
        // Stopping early gives the same first layer.
        let first = encoder.forward_layers(&ids, &mask, &[1]).unwrap();
        assert_eq!(values(&first[0]), values(&kept[1]));
        for bad in [&[2usize, 1][..], &[3], &[1, 1]] {
            assert!(encoder.forward_layers(&ids, &mask, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relative_positions_fall_in_exact_then_logarithmic_buckets() {
        let bucket = |relative| relative_position_bucket(relative, 32, 128);
        // Keys before the query use buckets 0..16, keys after it 16..32.
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(-1), 1);
        assert_eq!(bucket(1), 17);
        assert_eq!(bucket(-7), 7);
        // From 8 on, buckets double in width: 8..16 → 8, 9; 16 → 10; 64 → 14.
        assert_eq!(bucket(-8), 8);
        assert_eq!(bucket(-15), 9);
        assert_eq!(bucket(-16), 10);
        assert_eq!(bucket(-64), 14);
        // Everything at or past max_distance shares the last bucket.
        assert_eq!(bucket(-128), 15);
        assert_eq!(bucket(-1000), 15);
        assert_eq!(bucket(1000), 31);
    }

    #[test]
    fn every_trainable_tensor_gets_a_nonzero_gradient() {
        let encoder = tiny_encoder(Trainable::ALL, 1);
        // 5 embedding tensors + 16 per layer.
        assert_eq!(encoder.vars().len(), 5 + 16 * 2);
        let grads = loss(&encoder).backward().unwrap();
        for (name, var) in encoder.vars() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if name.contains("token_type") {
                // Only row 0 is used; it must still receive gradient.
                assert!(norm > 0.0, "{name}");
                continue;
            }
            assert!(norm > 0.0, "{name} got a zero gradient");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let encoder = tiny_encoder(Trainable::ALL, 2);
        let grads = loss(&encoder).backward().unwrap();
        let mut checked = 0;
        for (name, var) in encoder.vars() {
            if !(name.contains("query.weight")
                || name.contains("output.dense.weight")
                || name.ends_with("LayerNorm.weight")
                || name.contains("word_embeddings"))
            {
                continue;
            }
            let analytic: Vec<f32> = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let original: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            // The largest-gradient coordinates are well above f32 noise.
            let mut order: Vec<usize> = (0..analytic.len()).collect();
            order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
            for &i in order.iter().take(3) {
                let h = 1e-2f32;
                let eval = |delta: f32| {
                    let mut v = original.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&encoder).to_scalar::<f32>().unwrap()
                };
                let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let rel = (numeric - analytic[i]).abs() / analytic[i].abs().max(1e-3);
                assert!(
                    rel < 0.05,
                    "{name}[{i}]: analytic {} numeric {numeric}",
                    analytic[i]
                );
                checked += 1;
            }
        }
        assert!(checked >= 12, "checked {checked} coordinates");
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let encoder = tiny_encoder(Trainable::NONE, 3);
        let short = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
        let short_mask = Tensor::new(&[[1f32, 1., 1., 1.]], &Device::Cpu).unwrap();
        let padded = Tensor::new(&[[1u32, 5, 9, 2, 0, 0]], &Device::Cpu).unwrap();
        let padded_mask = Tensor::new(&[[1f32, 1., 1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let a = mean_pool(&encoder.forward(&short, &short_mask).unwrap(), &short_mask).unwrap();
        let b = mean_pool(
            &encoder.forward(&padded, &padded_mask).unwrap(),
            &padded_mask,
        )
        .unwrap();
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn freezing_limits_the_trainable_set() {
        let frozen = Trainable {
            enabled: true,
            embeddings: false,
            frozen_layers: 1,
        };
        let encoder = tiny_encoder(frozen, 4);
        assert_eq!(encoder.vars().len(), 16);
        assert!(encoder
            .vars()
            .iter()
            .all(|(n, _)| n.starts_with("encoder.layer.1.")));
        assert!(tiny_encoder(Trainable::NONE, 4).vars().is_empty());
    }
}
