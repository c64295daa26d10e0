//! What AVX2 allows an int8 kernel, before any memory: register-only loops of
//! `vfmadd231ps` (8 f32 multiply-adds an instruction) against the AVX2 int8
//! kernel's step (`vpmaddubsw` + `vpmaddwd` + `vpaddd`: 32 byte products),
//! each with enough independent accumulators to hide latency. The ratio of
//! their multiply-adds per second bounds an AVX2 int8 pass against f32.
//! `cargo bench -p cascade-encoders --bench int8_ceiling`

use std::time::Instant;

const ITERATIONS: usize = 20_000_000;
/// Independent accumulators a loop: enough to cover the latencies at two
/// multiplies a cycle, few enough to stay in the 16 vector registers.
const FMA_CHAINS: usize = 10;
const INT8_CHAINS: usize = 6;

#[cfg(target_arch = "x86_64")]
mod loops {
    use super::{FMA_CHAINS, INT8_CHAINS, ITERATIONS};
    use std::arch::x86_64::*;

    /// `ITERATIONS × FMA_CHAINS` FMAs; returns a value so nothing is optimised away.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma() -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); FMA_CHAINS];
        let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..ITERATIONS {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, b, c);
            }
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            acc.iter()
                .fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x)),
        );
        out[0]
    }

    /// `ITERATIONS × INT8_CHAINS` int8 steps, each on its own activations;
    /// the weights move every iteration by a step the compiler cannot see,
    /// so no product is hoisted out of the loop.
    #[target_feature(enable = "avx2")]
    pub unsafe fn int8_step(step: i8) -> i32 {
        let mut acc = [_mm256_setzero_si256(); INT8_CHAINS];
        let a: [__m256i; INT8_CHAINS] = std::array::from_fn(|j| _mm256_set1_epi8(j as i8 + 1));
        let (mut w, step, ones) = (
            _mm256_set1_epi8(2),
            _mm256_set1_epi8(step),
            _mm256_set1_epi16(1),
        );
        for _ in 0..ITERATIONS {
            w = _mm256_add_epi8(w, step);
            for j in 0..INT8_CHAINS {
                let pairs = _mm256_maddubs_epi16(a[j], w);
                acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_setzero_si256(), |s, x| _mm256_add_epi32(s, *x));
        _mm256_extract_epi32(sum, 0)
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        println!("this CPU has no AVX2 and FMA: nothing to measure");
        return;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (fma_steps, int8_steps) = (
        (ITERATIONS * FMA_CHAINS) as f64,
        (ITERATIONS * INT8_CHAINS) as f64,
    );
    let (mut fma, mut int8) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        // Safety: the CPU has AVX2 and FMA (checked above).
        std::hint::black_box(unsafe { loops::fma() });
        fma.push(fma_steps * 8.0 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        // Safety: as above.
        std::hint::black_box(unsafe { loops::int8_step(std::hint::black_box(1)) });
        int8.push(int8_steps * 32.0 / t.elapsed().as_secs_f64() / 1e9);
    }
    let (f, i) = (median(fma), median(int8));
    println!("multiply-adds per second on one core, median of 5, registers only:");
    println!("  f32  vfmadd231ps                        {f:7.1} G");
    println!(
        "  int8 vpmaddubsw + vpmaddwd + vpaddd     {i:7.1} G   ({:.2}× f32)",
        i / f
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only");
}
