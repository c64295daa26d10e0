//! The MPNet encoder (all-mpnet-base-v2, fetched by `scripts/setup.sh`)
//! against an independent NumPy forward pass written from the Hugging Face
//! reference: relative-position buckets, RoBERTa-style positions and the
//! `<s> … </s>` wrapping must all be right for the embeddings to match.
//! The constants come from `scripts/reference/mpnet_reference.py` (its
//! README pins the NumPy environment).

mod common;

use candle_core::Device;
use cascade_encoders::{load_model, mean_pool, Trainable};

const TEXTS: [&str; 4] = [
    "I love this movie",
    "I hate this movie",
    "The weather is nice today",
    "When my best friend moved abroad without saying goodbye, I felt deeply hurt and lonely for weeks.",
];

/// The first six dimensions of each normalised mean-pooled embedding, from the
/// NumPy reference (float32 weights, float64 softmax and norms).
const REFERENCE: [[f32; 6]; 4] = [
    [0.02046, 0.04068, -0.00902, 0.00023, 0.03649, -0.00036],
    [0.04362, 0.0947, -0.00917, -0.00515, 0.00504, 0.02702],
    [-0.04743, -0.02026, -0.03094, 0.04969, -0.00893, -0.03265],
    [0.00984, 0.00523, -0.00472, -0.03686, 0.01654, -0.0159],
];
/// Cosine similarities of the pairs (0, 1), (0, 2) and (1, 3) from the reference.
const COSINES: [((usize, usize), f32); 3] =
    [((0, 1), 0.62315), ((0, 2), 0.10101), ((1, 3), 0.08812)];

fn embeddings(texts: &[&str]) -> Vec<Vec<f32>> {
    let (encoder, text) = load_model(
        &common::model_dir("all-mpnet-base-v2"),
        128,
        Trainable::NONE,
    )
    .unwrap();
    let batch = text.batch(texts, &Device::Cpu).unwrap();
    let hidden = encoder.forward(&batch.ids, &batch.mask).unwrap();
    let pooled: Vec<Vec<f32>> = mean_pool(&hidden, &batch.mask).unwrap().to_vec2().unwrap();
    pooled
        .into_iter()
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

#[test]
fn mpnet_embeddings_match_the_reference_forward_pass() {
    // One padded batch: the short texts are padded to the long one's 21 tokens.
    let batch = embeddings(&TEXTS);
    for (got, want) in batch.iter().zip(REFERENCE) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 5e-4,
                "embedding {got:?} vs reference {want:?}"
            );
        }
    }
    for ((a, b), want) in COSINES {
        let cosine: f32 = batch[a].iter().zip(&batch[b]).map(|(x, y)| x * y).sum();
        assert!(
            (cosine - want).abs() < 2e-3,
            "cosine({a}, {b}) = {cosine}, reference {want}"
        );
    }
    // Alone, unpadded, each text gets the same embedding as in the batch.
    for (i, text) in TEXTS.iter().enumerate() {
        let single = &embeddings(&[text])[0];
        let gap = single
            .iter()
            .zip(&batch[i])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            gap < 1e-5,
            "text {i}: padding changed its embedding by {gap}"
        );
    }
}
