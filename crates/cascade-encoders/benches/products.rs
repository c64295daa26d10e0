//! One thread's share of the f32 products of a MiniLM layer over 16 texts of
//! 256 tokens (2,048 of the 4,096 rows; the backward pass's weight gradients
//! over all rows), through `ops::matmul` (our AVX2 kernel on CPUs without
//! AVX-512, else gemm) and through gemm directly, side by side in one run.
//! `cargo bench -p cascade-encoders --bench products`

use cascade_encoders::ops::{gemm_product, matmul, own_product_applies};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gemm::Parallelism;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn products(c: &mut Criterion) {
    let mut group = c.benchmark_group("products one thread");
    group.sample_size(20);
    // (name, m, n, k, a transposed, b transposed): forward x·Wᵀ, the input
    // gradient dy·W, the weight gradient dyᵀ·x.
    let shapes = [
        ("qkv x.Wt", 2048, 1152, 384, false, true),
        ("out x.Wt", 2048, 384, 384, false, true),
        ("up x.Wt", 2048, 1536, 384, false, true),
        ("down x.Wt", 2048, 384, 1536, false, true),
        ("up dy.W", 2048, 384, 1536, false, false),
        ("up dyt.x", 1536, 384, 4096, true, false),
    ];
    for (name, m, n, k, a_t, b_t) in shapes {
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let a_strides = if a_t { (1, m) } else { (k, 1) };
        let b_strides = if b_t { (1, k) } else { (n, 1) };
        let mut out = vec![0f32; m * n];
        let ours = if own_product_applies(m, n, k) {
            "ours"
        } else {
            "ours (gemm here)"
        };
        group.bench_function(BenchmarkId::new(ours, name), |bench| {
            bench.iter(|| {
                matmul(
                    (m, n, k),
                    &a,
                    a_strides,
                    &b,
                    b_strides,
                    &mut out,
                    false,
                    1.0,
                    Parallelism::None,
                )
            })
        });
        group.bench_function(BenchmarkId::new("gemm", name), |bench| {
            bench.iter(|| {
                gemm_product(
                    (m, n, k),
                    &a,
                    a_strides,
                    &b,
                    b_strides,
                    &mut out,
                    n,
                    false,
                    1.0,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
