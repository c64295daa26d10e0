//! The dense layers of a MiniLM forward pass over 16 texts of 256 tokens:
//! the fused f32 layer against the int8 one with every integer kernel this
//! CPU has, side by side in one run.
//! `cargo bench -p cascade-encoders --bench int8_linear`

use candle_core::{Device, Tensor};
use cascade_encoders::linear::linear;
use cascade_encoders::quantized::{use_kernel, Kernel, QuantizedLinear};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn dense_layers(c: &mut Criterion) {
    let rows = 16 * 256;
    let mut group = c.benchmark_group("dense 4096 rows");
    group.sample_size(20);
    // (inner, out): attention projections, FFN up, FFN down.
    for (inner, out) in [(384, 384), (384, 1536), (1536, 384)] {
        let device = Device::Cpu;
        let x = Tensor::from_vec(values(rows * inner, 1), (rows, inner), &device).unwrap();
        let w = Tensor::from_vec(values(out * inner, 2), (out, inner), &device).unwrap();
        let b = Tensor::from_vec(values(out, 3), out, &device).unwrap();
        let int8 = QuantizedLinear::from_tensors(&w, &b).unwrap();
        let shape = format!("{inner}x{out}");
        group.bench_with_input(BenchmarkId::new("f32", &shape), &x, |bench, x| {
            bench.iter(|| linear(x, &w, &b).unwrap())
        });
        // Scalar is left out: minutes per sample, and no CPU here lacks AVX2.
        let vector = Kernel::ALL
            .into_iter()
            .filter(|k| *k != Kernel::Scalar && k.is_available());
        for kernel in vector {
            use_kernel(Some(kernel)).unwrap();
            let name = format!("int8 {}", kernel.name());
            group.bench_with_input(BenchmarkId::new(name, &shape), &x, |bench, x| {
                bench.iter(|| int8.forward(x).unwrap())
            });
        }
        use_kernel(None).unwrap();
    }
    group.finish();
}

criterion_group!(benches, dense_layers);
criterion_main!(benches);
