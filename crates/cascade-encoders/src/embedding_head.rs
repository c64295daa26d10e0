//! The `embedding_head` student: a frozen encoder's normalised mean-pooled
//! embedding under an online softmax regression. The encoder never changes,
//! so each text is encoded once and its embedding cached, in memory and
//! optionally in a file shared by later runs (replays, mu sweeps).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{load_model, mean_pool, BertEncoder, TextEncoder, Trainable};
use cascade::config::{EmbeddingHeadConfig, Optimizer, Quantization};
use cascade::student::features::SparseVector;
use cascade::student::softmax_regression::SoftmaxRegression;
use cascade::student::{Demonstration, Student, StudentError};

use crate::error::EncoderError;

/// Texts encoded per forward pass when filling the cache.
const ENCODE_BATCH: usize = 32;

pub struct EmbeddingHead {
    labels: usize,
    encoder: BertEncoder,
    text: TextEncoder,
    windows: usize,
    /// The encoder layers pooled into the embedding (1-based, ascending).
    layers: Vec<usize>,
    cache: EmbeddingCache,
    head: SoftmaxRegression,
}

impl EmbeddingHead {
    pub fn new(labels: usize, config: &EmbeddingHeadConfig) -> Result<Self, EncoderError> {
        let dir = Path::new(&config.model);
        let (mut encoder, text) = load_model(dir, config.max_len, Trainable::NONE)?;
        if config.quantize == Some(Quantization::Int8) {
            encoder
                .quantize_int8()
                .map_err(|source| EncoderError::Weights {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        }
        let depth = encoder.config().num_hidden_layers;
        let layers = if config.layers.is_empty() {
            vec![depth]
        } else {
            config.layers.clone()
        };
        if let Some(too_deep) = layers.iter().find(|&&l| l > depth) {
            return Err(EncoderError::TooDeep {
                layer: *too_deep,
                depth,
                dir: dir.to_path_buf(),
            });
        }
        let dim = encoder.config().hidden_size * layers.len();
        let cache = match &config.cache_dir {
            None => EmbeddingCache::in_memory(dim),
            Some(cache_dir) => {
                let key = model_key(dir, config, &layers, depth);
                EmbeddingCache::open(Path::new(cache_dir), &key, dim).map_err(|source| {
                    EncoderError::Cache {
                        dir: cache_dir.into(),
                        source,
                    }
                })?
            }
        };
        Ok(Self {
            labels,
            encoder,
            text,
            windows: config.windows,
            layers,
            cache,
            head: SoftmaxRegression::new(dim, labels, Optimizer::Adagrad, config.lr, config.l2),
        })
    }

    /// The embeddings of `texts`, encoding those not yet cached.
    pub fn embeddings(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.fill_cache(texts)?;
        texts
            .iter()
            .map(|text| {
                self.cache
                    .get(text)
                    .map(<[f32]>::to_vec)
                    .ok_or(EncoderError::MissingEmbedding)
            })
            .collect()
    }

    /// Encodes the texts not yet cached.
    fn fill_cache(&mut self, texts: &[&str]) -> Result<(), EncoderError> {
        let mut targets = [(self.layers.as_slice(), &mut self.cache)];
        fill(&self.encoder, &self.text, self.windows, &mut targets, texts)
    }

    fn features(&self, text: &str) -> Result<SparseVector, StudentError> {
        let embedding = self
            .cache
            .get(text)
            .ok_or(StudentError::from(EncoderError::MissingEmbedding))?;
        Ok(embedding
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u32, *v))
            .collect())
    }
}

impl Student for EmbeddingHead {
    fn predict_proba(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, StudentError> {
        self.fill_cache(texts)?;
        texts
            .iter()
            .map(|text| Ok(self.head.probabilities(&self.features(text)?)))
            .collect()
    }

    fn learn(&mut self, batch: &[Demonstration<'_>]) -> Result<(), StudentError> {
        cascade::student::check_labels(batch, self.labels)?;
        let texts: Vec<&str> = batch.iter().map(|d| d.text).collect();
        self.fill_cache(&texts)?;
        for demo in batch {
            let x = self.features(demo.text)?;
            self.head.step_toward(&x, &demo.target(self.labels));
        }
        Ok(())
    }

    fn precompute(&mut self, texts: &[&str]) -> Result<(), StudentError> {
        Ok(self.fill_cache(texts)?)
    }

    /// The head only: the encoder is frozen and the embeddings can be recomputed.
    fn save_state(&self) -> Result<Vec<u8>, StudentError> {
        cascade::student::encode_state(&self.head)
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), StudentError> {
        let head: SoftmaxRegression = cascade::student::decode_state(state)?;
        if !head.same_shape(&self.head) {
            return Err(StudentError::StateMismatch(
                "written for another encoder or labels".into(),
            ));
        }
        self.head = head;
        Ok(())
    }
}

/// Encodes `texts` once for several layer choices of one embedding-head
/// config (a search comparing them): the encoder runs to the deepest layer
/// asked and each choice's file cache gets its embedding, as the head with
/// that choice would have computed it.
pub fn fill_caches(
    config: &EmbeddingHeadConfig,
    layer_choices: &[Vec<usize>],
    texts: &[&str],
) -> Result<(), EncoderError> {
    let mut heads = layer_choices
        .iter()
        .map(|layers| {
            let config = EmbeddingHeadConfig {
                layers: layers.clone(),
                ..config.clone()
            };
            EmbeddingHead::new(2, &config)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let Some((first, rest)) = heads.split_first_mut() else {
        return Ok(());
    };
    let mut targets = vec![(first.layers.as_slice(), &mut first.cache)];
    targets.extend(rest.iter_mut().map(|h| (h.layers.as_slice(), &mut h.cache)));
    fill(
        &first.encoder,
        &first.text,
        first.windows,
        &mut targets,
        texts,
    )
}

/// Encodes the texts missing from any target cache, in length-sorted batches
/// of windows, running the encoder once to the deepest layer any target
/// pools. Each target is (its pooled layers, ascending; its cache).
fn fill(
    encoder: &BertEncoder,
    text_encoder: &TextEncoder,
    windows: usize,
    targets: &mut [(&[usize], &mut EmbeddingCache)],
    texts: &[&str],
) -> Result<(), EncoderError> {
    let mut missing: Vec<&str> = Vec::new();
    // (token ids, index into `missing`) for every window of every missing text.
    let mut rows: Vec<(Vec<u32>, usize)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for text in texts {
        let absent = targets.iter().any(|(_, cache)| cache.get(text).is_none());
        if absent && seen.insert(*text) {
            let body = text_encoder.body_ids(text)?;
            let width = text_encoder.body_capacity();
            // At least one window, so an empty text is encoded as `[CLS] [SEP]`.
            let count = body.len().div_ceil(width).clamp(1, windows);
            for window in 0..count {
                let start = (window * width).min(body.len());
                let end = (start + width).min(body.len());
                rows.push((text_encoder.wrap(&body[start..end]), missing.len()));
            }
            missing.push(text);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut all_layers: Vec<usize> = targets
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    all_layers.sort_unstable();
    all_layers.dedup();
    // Similar lengths together: less padding.
    rows.sort_by_key(|(ids, _)| ids.len());
    // Per target, per text: the sum of its windows' embeddings and their count.
    let mut sums: Vec<Vec<Option<WindowSum>>> = vec![vec![None; missing.len()]; targets.len()];
    let device = Device::Cpu;
    for chunk in rows.chunks(ENCODE_BATCH) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(ids, _)| ids.clone()).collect();
        let batch = super::tokenize::pad_batch(&ids, text_encoder.pad_id(), &device)?;
        let hidden = encoder.forward_layers(&batch.ids, &batch.mask, &all_layers)?;
        for ((layers, _), target_sums) in targets.iter().zip(&mut sums) {
            let picked: Vec<&Tensor> = layers
                .iter()
                .filter_map(|l| all_layers.iter().position(|a| a == l).map(|i| &hidden[i]))
                .collect();
            let embeddings = pool(&picked, &batch.mask)?;
            for ((_, text), embedding) in chunk.iter().zip(embeddings) {
                match &mut target_sums[*text] {
                    Some((sum, count)) => {
                        sum.iter_mut().zip(embedding).for_each(|(s, v)| *s += v);
                        *count += 1;
                    }
                    slot => *slot = Some((embedding, 1)),
                }
            }
        }
    }
    for ((_, cache), target_sums) in targets.iter_mut().zip(sums) {
        for (text, sum) in missing.iter().zip(target_sums) {
            if cache.get(text).is_some() {
                continue;
            }
            // Every missing text has at least one window.
            let (mut embedding, count) = sum.ok_or(EncoderError::MissingEmbedding)?;
            if count > 1 {
                // The mean of unit vectors, made unit again. One window is
                // kept as encoded, bit for bit.
                let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
                embedding.iter_mut().for_each(|v| *v /= norm.max(1e-12));
            }
            cache
                .insert(text, embedding)
                .map_err(EncoderError::CacheWrite)?;
        }
        cache.flush().map_err(EncoderError::CacheWrite)?;
    }
    Ok(())
}

/// A text's windows' embeddings summed, and how many.
type WindowSum = (Vec<f32>, usize);

/// Per text: each layer's mean-pooled output made unit, concatenated and
/// scaled so the whole is unit too (one layer: scale 1, exact).
fn pool(hidden: &[&Tensor], mask: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let scale = 1.0 / (hidden.len() as f64).sqrt();
    let parts = hidden
        .iter()
        .map(|hidden| {
            let pooled = mean_pool(hidden, mask)?;
            let norms = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norms)? * scale
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)?.to_vec2()
}

/// A file name per model folder, length limit, window count and pooled layers.
fn model_key(dir: &Path, config: &EmbeddingHeadConfig, layers: &[usize], depth: usize) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let fingerprint = text_key(&format!("{}:{size}", canonical.display()));
    // One window keeps the name caches had before windows existed.
    let windows = if config.windows > 1 {
        format!("-w{}", config.windows)
    } else {
        String::new()
    };
    // The last layer alone keeps the name caches had before layers existed.
    let layers = if layers == [depth] {
        String::new()
    } else {
        let list: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        format!("-l{}", list.join("_"))
    };
    // f32 keeps the name caches had before quantization existed.
    let quantized = match config.quantize {
        None => "",
        Some(Quantization::Int8) => "-int8",
    };
    format!(
        "{name}-len{}{windows}{layers}{quantized}-{:016x}",
        config.max_len, fingerprint as u64
    )
}

/// 128-bit key of a text: two 64-bit FNV-1a hashes with different offsets.
fn text_key(text: &str) -> u128 {
    let hash = |offset: u64| {
        text.bytes().fold(offset, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    ((hash(0xcbf2_9ce4_8422_2325) as u128) << 64) | hash(0x84222325cbf29ce4) as u128
}

/// Embeddings by text, in memory and optionally appended to a file of
/// `(key: u128 LE, dim × f32 LE)` records. A torn last record (a crash during
/// a write) is dropped when the file is opened.
///
/// Several processes may share one file (two runs, or tests in parallel): new
/// records wait in memory and `flush` appends them in one `write` to a file
/// opened for appending, so records of different writers never interleave.
/// The write holds an advisory lock (`flock`) that `open` also takes while it
/// reads, so a record still being written is never taken for a torn one.
pub struct EmbeddingCache {
    dim: usize,
    map: HashMap<u128, Arc<[f32]>>,
    file: Option<File>,
    pending: Vec<u8>,
}

impl EmbeddingCache {
    pub fn in_memory(dim: usize) -> Self {
        Self {
            dim,
            map: HashMap::new(),
            file: None,
            pending: Vec::new(),
        }
    }

    pub fn open(dir: &Path, key: &str, dim: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{key}.emb"));
        let mut map = HashMap::new();
        let record = 16 + 4 * dim;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        // Another process may be appending to the same cache: hold the lock
        // while reading, so a record in flight is not taken for a torn one
        // and cut off.
        file.lock()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let whole = bytes.len() / record * record;
        for chunk in bytes[..whole].chunks_exact(record) {
            let key = u128::from_le_bytes(chunk[..16].try_into().expect("16 bytes"));
            let values: Vec<f32> = chunk[16..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            map.insert(key, values.into());
        }
        if whole != bytes.len() {
            // Only a crash mid-write leaves a partial record.
            file.set_len(whole as u64)?;
        }
        file.unlock()?;
        Ok(Self {
            dim,
            map,
            file: Some(file),
            pending: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, text: &str) -> Option<&[f32]> {
        self.map.get(&text_key(text)).map(|v| &v[..])
    }

    pub fn insert(&mut self, text: &str, embedding: Vec<f32>) -> std::io::Result<()> {
        if embedding.len() != self.dim {
            return Err(std::io::Error::other(format!(
                "embedding of size {} in a cache of size {}",
                embedding.len(),
                self.dim
            )));
        }
        let key = text_key(text);
        if self.file.is_some() {
            self.pending.extend_from_slice(&key.to_le_bytes());
            for v in &embedding {
                self.pending.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.map.insert(key, embedding.into());
        Ok(())
    }

    /// Appends the records inserted since the last flush, whole, in one write.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            if !self.pending.is_empty() {
                // The lock keeps a reader from seeing half of this write.
                file.lock()?;
                let written = file.write_all(&self.pending);
                file.unlock()?;
                written?;
                self.pending.clear();
            }
        }
        Ok(())
    }
}

impl Drop for EmbeddingCache {
    fn drop(&mut self) {
        // A cache: a failed last write only costs a recomputation later.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_survives_reopening_and_drops_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut cache = EmbeddingCache::open(dir.path(), "m", 3).unwrap();
            cache.insert("a", vec![1.0, 2.0, 3.0]).unwrap();
            cache.insert("b", vec![4.0, 5.0, 6.0]).unwrap();
            cache.flush().unwrap();
        }
        let path = dir.path().join("m.emb");
        // A crash mid-write leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3, 4, 5]).unwrap();
        drop(f);
        let mut cache = EmbeddingCache::open(dir.path(), "m", 3).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("b").unwrap(), &[4.0, 5.0, 6.0]);
        assert!(cache.get("c").is_none());
        cache.insert("c", vec![0.0; 3]).unwrap();
        cache.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * (16 + 12));
        assert!(cache.insert("d", vec![0.0; 2]).is_err());
    }

    #[test]
    fn writers_sharing_a_file_never_interleave_records() {
        // Records of a real embedding's size, larger than a write buffer's
        // chunk, from two writers at once; every record must read back whole.
        let dim = 768;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut cache = EmbeddingCache::open(&path, "shared", dim).unwrap();
                    for i in 0..40 {
                        for j in 0..4 {
                            let value = (w * 1000 + i * 4 + j) as f32;
                            cache
                                .insert(&format!("{w}-{i}-{j}"), vec![value; dim])
                                .unwrap();
                        }
                        cache.flush().unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let cache = EmbeddingCache::open(&path, "shared", dim).unwrap();
        assert_eq!(cache.len(), 2 * 40 * 4);
        for w in 0..2 {
            for i in 0..40 {
                for j in 0..4 {
                    let value = (w * 1000 + i * 4 + j) as f32;
                    let got = cache.get(&format!("{w}-{i}-{j}")).unwrap();
                    assert!(got.iter().all(|&v| v == value), "record {w}-{i}-{j} torn");
                }
            }
        }
    }
}
