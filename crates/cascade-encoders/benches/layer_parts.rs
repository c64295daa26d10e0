//! The parts of one MiniLM layer over 16 texts of 256 tokens, each on its
//! own: where a forward pass spends its time, to profile before optimising.
//! `cargo bench -p cascade-encoders --bench layer_parts`

use candle_core::{DType, Device, Tensor};
use cascade_encoders::{attention::attention, linear::linear, ops};
use criterion::{criterion_group, criterion_main, Criterion};

fn values(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn layer_parts(c: &mut Criterion) {
    let (batch, seq, h, heads) = (16, 256, 384, 12);
    let rows = batch * seq;
    let x = values(&[rows, h], 1);
    let inner = values(&[rows, 4 * h], 2);
    let qkv = values(&[rows, 3 * h], 3);
    let mask = Tensor::zeros((batch, seq), DType::F32, &Device::Cpu).unwrap();
    let (w_qkv, b_qkv) = (values(&[3 * h, h], 4), values(&[3 * h], 5));
    let (w_out, b_out) = (values(&[h, h], 6), values(&[h], 7));
    let (w_up, b_up) = (values(&[4 * h, h], 8), values(&[4 * h], 9));
    let (w_down, gamma) = (values(&[h, 4 * h], 10), values(&[h], 11));
    let mut group = c.benchmark_group("layer parts 16x256");
    group.sample_size(20);
    group.bench_function("qkv 384->1152", |b| {
        b.iter(|| linear(&x, &w_qkv, &b_qkv).unwrap())
    });
    group.bench_function("attention", |b| {
        b.iter(|| attention(&qkv, heads, &mask, None, 0.17).unwrap())
    });
    group.bench_function("attention out 384->384", |b| {
        b.iter(|| linear(&x, &w_out, &b_out).unwrap())
    });
    group.bench_function("ffn up 384->1536", |b| {
        b.iter(|| linear(&x, &w_up, &b_up).unwrap())
    });
    group.bench_function("gelu", |b| b.iter(|| ops::gelu(&inner).unwrap()));
    group.bench_function("ffn down 1536->384", |b| {
        b.iter(|| linear(&inner, &w_down, &b_out).unwrap())
    });
    group.bench_function("residual add + layer norm", |b| {
        b.iter(|| ops::layer_norm(&(&x + &x).unwrap(), &gamma, &b_out, 1e-12).unwrap())
    });
    group.finish();
}

criterion_group!(benches, layer_parts);
criterion_main!(benches);
