//! Int8 inference for frozen dense layers, `x · Wᵀ + b`.
//!
//! Weights are quantized once per output channel to 7 bits ([-64, 64], scale
//! `max|w| / 64`), activations per row at run time to 8 bits ([-127, 127]),
//! stored offset by 128 as unsigned bytes. Products are summed exactly in
//! i32; the offset's share, 128·Σw, is known per channel and taken off before
//! scaling back to f32. Seven-bit weights are what make the AVX2 path exact:
//! `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into i16,
//! and 2·255·64 = 32,640 never saturates (ONNX Runtime's `reduce_range` on
//! x86 makes the same trade). Weights are packed so that one register holds
//! 4 consecutive inputs of 8 outputs: a broadcast activation word times one
//! register gives 8 outputs' partial sums in 8 i32 lanes, with no horizontal
//! sums. Without AVX2 a scalar loop gives the same integers.

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ops::{f32_slice, gelu_in_place};

/// Outputs per register (i32 lanes) and inputs per lane (bytes).
const OUT_BLOCK: usize = 8;
const IN_GROUP: usize = 4;
/// Rows per parallel task (a multiple of the 4-row tile).
const ROWS_PER_TASK: usize = 64;
/// The largest weight step count: 7 bits, so byte products never saturate.
const WEIGHT_STEPS: f32 = 64.0;
/// The largest activation step count, and the unsigned offset.
const ACTIVATION_STEPS: f32 = 127.0;
const OFFSET: i32 = 128;

/// A dense layer with int8 weights, for inference only (no gradient).
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    out: usize,
    inner: usize,
    /// `inner` rounded up to whole groups of 4.
    groups: usize,
    /// `out` rounded up to whole blocks of 8.
    blocks: usize,
    /// `[block][group][output in block][input in group]`, zero padded.
    packed: Vec<i8>,
    /// Per output (padded): the f32 value of one weight step.
    scales: Vec<f32>,
    /// Per output (padded): `128 · Σ w`, the offset's share of each dot.
    offsets: Vec<i32>,
    /// Per output (padded).
    bias: Vec<f32>,
}

/// Rows quantized to unsigned bytes (value + 128), one scale per row.
struct QuantizedRows {
    bytes: Vec<u8>,
    scales: Vec<f32>,
}

fn max_abs(row: &[f32]) -> f32 {
    // Eight running maxima: the compiler keeps them in one register.
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    tail.iter().chain(&lanes).fold(0f32, |m, v| m.max(v.abs()))
}

/// The step that maps the row's largest magnitude to `steps`; 1 for a zero row.
fn step(row: &[f32], steps: f32) -> f32 {
    let max = max_abs(row);
    if max > 0.0 && max.is_finite() {
        max / steps
    } else {
        1.0
    }
}

impl QuantizedLinear {
    /// `weight (out, inner)` row-major as checkpoints store it, `bias (out)`.
    pub fn new(weight: &[f32], bias: &[f32], out: usize, inner: usize) -> Result<Self> {
        if weight.len() != out * inner || bias.len() != out || inner == 0 || out == 0 {
            bail!(
                "int8 linear: weight of {} values and bias of {} for ({out}, {inner})",
                weight.len(),
                bias.len()
            );
        }
        let groups = inner.div_ceil(IN_GROUP);
        let blocks = out.div_ceil(OUT_BLOCK);
        let padded_out = blocks * OUT_BLOCK;
        let mut packed = vec![0i8; blocks * groups * OUT_BLOCK * IN_GROUP];
        let mut scales = vec![1f32; padded_out];
        let mut offsets = vec![0i32; padded_out];
        let mut padded_bias = vec![0f32; padded_out];
        padded_bias[..out].copy_from_slice(bias);
        for (o, row) in weight.chunks_exact(inner).enumerate() {
            let scale = step(row, WEIGHT_STEPS);
            scales[o] = scale;
            let (block, lane) = (o / OUT_BLOCK, o % OUT_BLOCK);
            let mut sum = 0i32;
            for (k, w) in row.iter().enumerate() {
                let q = (w / scale)
                    .round_ties_even()
                    .clamp(-WEIGHT_STEPS, WEIGHT_STEPS) as i8;
                let (group, within) = (k / IN_GROUP, k % IN_GROUP);
                packed[((block * groups + group) * OUT_BLOCK + lane) * IN_GROUP + within] = q;
                sum += q as i32;
            }
            offsets[o] = OFFSET * sum;
        }
        Ok(Self {
            out,
            inner,
            groups,
            blocks,
            packed,
            scales,
            offsets,
            bias: padded_bias,
        })
    }

    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (out, inner) = weight.dims2()?;
        let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = bias.flatten_all()?.to_vec1()?;
        Self::new(&w, &b, out, inner)
    }

    /// `x (rows, inner) → (rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Op {
            layer: self,
            gelu: false,
        })
    }

    /// `gelu(forward(x))`, the GELU applied to each task's rows while they
    /// are still in cache.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Op {
            layer: self,
            gelu: true,
        })
    }

    /// Bytes per quantized row: whole groups.
    fn stride(&self) -> usize {
        self.groups * IN_GROUP
    }

    fn quantize_rows(&self, x: &[f32], avx2: bool) -> QuantizedRows {
        let stride = self.stride();
        let rows = x.len() / self.inner;
        // Padding holds the offset itself, the byte of a zero.
        let mut bytes = vec![OFFSET as u8; rows * stride];
        let scales = x
            .chunks_exact(self.inner)
            .zip(bytes.chunks_exact_mut(stride))
            .map(|(row, q)| {
                let scale = step(row, ACTIVATION_STEPS);
                let inverse = 1.0 / scale;
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // Safety: AVX2 is present; `q` is at least as long as `row`.
                    done = unsafe { avx2::quantize(row, inverse, q) };
                }
                for (b, v) in q[done..].iter_mut().zip(&row[done..]) {
                    let value = (v * inverse)
                        .round_ties_even()
                        .clamp(-ACTIVATION_STEPS, ACTIVATION_STEPS);
                    *b = (value as i32 + OFFSET) as u8;
                }
                scale
            })
            .collect();
        QuantizedRows { bytes, scales }
    }

    /// `y = x · Wᵀ + b` for `x` of `(rows, inner)` row-major.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.apply_then(x, false)
    }

    /// `apply`, then GELU on every output if `gelu`.
    fn apply_then(&self, x: &[f32], gelu: bool) -> Vec<f32> {
        let rows = x.len() / self.inner;
        let padded_out = self.blocks * OUT_BLOCK;
        // Every element is written once below: no zero fill first (it cost
        // ~3% of an int8 forward pass).
        let mut y: Vec<f32> = Vec::with_capacity(rows * padded_out);
        if rows == 0 {
            return y;
        }
        let avx2 = avx2_available();
        y.spare_capacity_mut()
            .par_chunks_mut(ROWS_PER_TASK * padded_out)
            .zip(x.par_chunks(ROWS_PER_TASK * self.inner))
            .for_each(|(y, x)| {
                let q = self.quantize_rows(x, avx2);
                self.block_rows(&q, y, avx2);
                if gelu {
                    // Safety: `block_rows` wrote every element of `y`, and
                    // `MaybeUninit<f32>` has the layout of `f32`.
                    gelu_in_place(unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) });
                }
            });
        // Safety: `block_rows` wrote every (row, padded output) of each chunk.
        unsafe { y.set_len(rows * padded_out) };
        if padded_out != self.out {
            y = y
                .chunks_exact(padded_out)
                .flat_map(|row| &row[..self.out])
                .copied()
                .collect();
        }
        y
    }

    /// One task's rows into `y (rows, padded out)`, every element written.
    fn block_rows(&self, q: &QuantizedRows, y: &mut [MaybeUninit<f32>], avx2: bool) {
        let rows = q.scales.len();
        let padded_out = self.blocks * OUT_BLOCK;
        let stride = self.stride();
        let block_len = self.groups * OUT_BLOCK * IN_GROUP;
        let groups = self.groups;
        let mut block = 0;
        while block < self.blocks {
            let blocks = (self.blocks - block).min(2);
            let weights = &self.packed[block * block_len..];
            let mut r = 0;
            while r < rows {
                let tile_rows = if rows - r >= 4 { 4 } else { 1 };
                let mut dots = [[[0i32; OUT_BLOCK]; 2]; 4];
                let row = |i: usize| &q.bytes[(r + i) * stride..(r + i + 1) * stride];
                if avx2 {
                    let four = || [row(0), row(1), row(2), row(3)];
                    // Safety: `avx2` is only set where the CPU has it; each
                    // activation row holds `groups` words and the weights
                    // `groups` registers per block.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match (tile_rows, blocks) {
                            (4, 2) => {
                                avx2::tile::<4, 2>(four(), weights, block_len, groups, &mut dots)
                            }
                            (4, _) => {
                                avx2::tile::<4, 1>(four(), weights, block_len, groups, &mut dots)
                            }
                            (_, 2) => {
                                avx2::tile::<1, 2>([row(0)], weights, block_len, groups, &mut dots)
                            }
                            _ => {
                                avx2::tile::<1, 1>([row(0)], weights, block_len, groups, &mut dots)
                            }
                        }
                    }
                } else {
                    for (i, row_dots) in dots.iter_mut().enumerate().take(tile_rows) {
                        scalar_tile(row(i), weights, block_len, groups, blocks, row_dots);
                    }
                }
                for (i, row_dots) in dots.iter().enumerate().take(tile_rows) {
                    let row_scale = q.scales[r + i];
                    let y_row = &mut y[(r + i) * padded_out..(r + i + 1) * padded_out];
                    for (n, lanes) in row_dots.iter().enumerate().take(blocks) {
                        let outputs = (block + n) * OUT_BLOCK..(block + n + 1) * OUT_BLOCK;
                        // Whole blocks of 8: the compiler makes this one vector step.
                        let y_block = &mut y_row[outputs.clone()];
                        let offsets = &self.offsets[outputs.clone()];
                        let scales = &self.scales[outputs.clone()];
                        let bias = &self.bias[outputs];
                        for lane in 0..OUT_BLOCK {
                            let exact = (lanes[lane] - offsets[lane]) as f32;
                            y_block[lane].write(exact * (row_scale * scales[lane]) + bias[lane]);
                        }
                    }
                }
                r += tile_rows;
            }
            block += blocks;
        }
    }
}

/// Whether the AVX2 kernels can run here; asked once per layer call.
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The integers the vector kernel computes, one row, `blocks` blocks of 8.
fn scalar_tile(
    row: &[u8],
    weights: &[i8],
    block_len: usize,
    groups: usize,
    blocks: usize,
    dots: &mut [[i32; OUT_BLOCK]; 2],
) {
    for (n, lanes) in dots.iter_mut().enumerate().take(blocks) {
        let block = &weights[n * block_len..(n + 1) * block_len];
        *lanes = [0; OUT_BLOCK];
        for g in 0..groups {
            let a = &row[g * IN_GROUP..(g + 1) * IN_GROUP];
            for (lane, dot) in lanes.iter_mut().enumerate() {
                let w = &block[(g * OUT_BLOCK + lane) * IN_GROUP..][..IN_GROUP];
                *dot += a
                    .iter()
                    .zip(w)
                    .map(|(&a, &w)| a as i32 * w as i32)
                    .sum::<i32>();
            }
        }
    }
}

/// The layer as a candle op, with or without a GELU after it.
struct Op<'a> {
    layer: &'a QuantizedLinear,
    gelu: bool,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let (rows, inner) = layout.shape().dims2()?;
        let layer = self.layer;
        if inner != layer.inner {
            bail!(
                "int8 linear: input of width {inner} for a layer of width {}",
                layer.inner
            );
        }
        Ok((
            CpuStorage::F32(layer.apply_then(x, self.gelu)),
            Shape::from((rows, layer.out)),
        ))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{IN_GROUP, OUT_BLOCK};

    /// `row · inverse`, rounded to even and offset by 128, into `bytes`, 32
    /// values at a time; returns how many were done (the tail is the caller's).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(row: &[f32], inverse: f32, bytes: &mut [u8]) -> usize {
        let whole = row.len() / 32 * 32;
        let scale = _mm256_set1_ps(inverse);
        let offset = _mm256_set1_epi32(super::OFFSET);
        // packs work within 128-bit halves; this puts the dwords back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut k = 0;
        while k < whole {
            let p = row.as_ptr().add(k);
            // cvtps rounds to nearest even; |value| ≤ 127 by the row's scale.
            let int = |i: usize| {
                _mm256_add_epi32(
                    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(8 * i)), scale)),
                    offset,
                )
            };
            let low = _mm256_packus_epi32(int(0), int(1));
            let high = _mm256_packus_epi32(int(2), int(3));
            let packed = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(low, high), order);
            _mm256_storeu_si256(bytes.as_mut_ptr().add(k).cast(), packed);
            k += 32;
        }
        whole
    }

    /// Dots of `R` unsigned activation rows with `N` packed blocks of 8
    /// outputs (`block_len` bytes apart), `groups` words of 4 inputs each.
    #[inline(always)]
    pub(super) unsafe fn tile<const R: usize, const N: usize>(
        rows: [&[u8]; R],
        weights: &[i8],
        block_len: usize,
        groups: usize,
        dots: &mut [[[i32; OUT_BLOCK]; 2]; 4],
    ) {
        kernel::<R, N>(rows, weights, block_len, groups, dots)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn kernel<const R: usize, const N: usize>(
        rows: [&[u8]; R],
        weights: &[i8],
        block_len: usize,
        groups: usize,
        dots: &mut [[[i32; OUT_BLOCK]; 2]; 4],
    ) {
        debug_assert!(weights.len() >= (N - 1) * block_len + groups * OUT_BLOCK * IN_GROUP);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); N]; R];
        let w = weights.as_ptr();
        let a: [*const u8; R] = rows.map(|r| r.as_ptr());
        for g in 0..groups {
            let mut wv = [_mm256_setzero_si256(); N];
            for (n, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(w.add(n * block_len + g * OUT_BLOCK * IN_GROUP).cast());
            }
            for r in 0..R {
                // The row's 4 bytes of this group, in every lane.
                let word = a[r].add(g * IN_GROUP).cast::<i32>().read_unaligned();
                let av = _mm256_set1_epi32(word);
                for n in 0..N {
                    let pairs = _mm256_maddubs_epi16(av, wv[n]);
                    acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for r in 0..R {
            for n in 0..N {
                _mm256_storeu_si256(dots[r][n].as_mut_ptr().cast(), acc[r][n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], b: &[f32], inner: usize) -> Vec<f32> {
        let out = b.len();
        x.chunks_exact(inner)
            .flat_map(|row| {
                (0..out).map(move |o| {
                    let dot: f32 = row
                        .iter()
                        .zip(&w[o * inner..(o + 1) * inner])
                        .map(|(a, b)| a * b)
                        .sum();
                    dot + b[o]
                })
            })
            .collect()
    }

    #[test]
    fn the_fused_gelu_equals_gelu_after_the_layer() {
        let (out, inner, rows) = (13, 37, 70);
        let (w, b) = (values(out * inner, 2), values(out, 3));
        let layer = QuantizedLinear::new(&w, &b, out, inner).unwrap();
        let x = values(rows * inner, 1);
        let x = Tensor::from_vec(x, (rows, inner), &candle_core::Device::Cpu).unwrap();
        let fused: Vec<f32> = layer
            .forward_gelu(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let after = crate::ops::gelu(&layer.forward(&x).unwrap()).unwrap();
        assert_eq!(
            fused,
            after.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(
            fused.iter().any(|v| *v < 0.0),
            "GELU's negative lobe is exercised"
        );
    }

    #[test]
    fn matches_the_f32_layer_within_quantization_error() {
        // Odd sizes: a row tail, an output tail and a width not a multiple of 32.
        for (rows, out, inner) in [(67, 13, 45), (4, 2, 32), (130, 64, 384), (1, 1, 1)] {
            let x = values(rows * inner, 1);
            let w = values(out * inner, 2);
            let b = values(out, 3);
            let layer = QuantizedLinear::new(&w, &b, out, inner).unwrap();
            let got = layer.apply(&x);
            let want = reference(&x, &w, &b, inner);
            // Each product's error is at most about half a step of either
            // factor (weights 1/64, activations 1/127 of a magnitude ≤ 1),
            // summed over `inner` terms.
            let bound = inner as f32 * (0.5 / 64.0 + 0.5 / 127.0) + 1e-4;
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() <= bound, "{rows}x{out}x{inner}: {g} vs {r}");
            }
            let error: f32 = got
                .iter()
                .zip(&want)
                .map(|(g, r)| (g - r).abs())
                .sum::<f32>()
                / got.len() as f32;
            assert!(
                error < bound / 4.0,
                "{rows}x{out}x{inner}: mean error {error}"
            );
        }
    }

    #[test]
    fn the_vector_kernel_gives_the_scalar_integers() {
        // Extremes: ±127 everywhere is the largest pair sum the i16 lanes hold.
        let inner = 96;
        let x: Vec<f32> = (0..5 * inner)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let w: Vec<f32> = (0..3 * inner)
            .map(|i| if i % 5 == 0 { 1.0 } else { -1.0 })
            .collect();
        let layer = QuantizedLinear::new(&w, &[0.0; 3], 3, inner).unwrap();
        let got = layer.apply(&x);
        let want = reference(&x, &w, &[0.0; 3], inner);
        // ±1 quantize to ±127 exactly: only the final scaling rounds.
        for (g, r) in got.iter().zip(&want) {
            assert!((g - r).abs() < 1e-4, "{g} vs {r}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_tiles_give_the_scalar_integers() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let (groups, block_len) = (24, 24 * OUT_BLOCK * IN_GROUP);
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            seed >> 24
        };
        // Full range: bytes 0..=255 against weights -64..=64.
        let rows: Vec<Vec<u8>> = (0..4)
            .map(|_| (0..groups * IN_GROUP).map(|_| next() as u8).collect())
            .collect();
        let weights: Vec<i8> = (0..2 * block_len)
            .map(|_| (next() % 129) as i32 - 64)
            .map(|w| w as i8)
            .collect();
        let mut vector = [[[0i32; OUT_BLOCK]; 2]; 4];
        let row_refs = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
        // Safety: AVX2 checked above; sizes as the kernel requires.
        unsafe { avx2::tile::<4, 2>(row_refs, &weights, block_len, groups, &mut vector) };
        for (row, got) in rows.iter().zip(&vector) {
            let mut scalar = [[0i32; OUT_BLOCK]; 2];
            scalar_tile(row, &weights, block_len, groups, 2, &mut scalar);
            assert_eq!(&scalar, got);
        }
        let mut one = [[[0i32; OUT_BLOCK]; 2]; 4];
        unsafe { avx2::tile::<1, 1>([&rows[3][..]], &weights, block_len, groups, &mut one) };
        assert_eq!(one[0][0], vector[3][0]);
    }

    #[test]
    fn zero_rows_and_a_wrong_width_are_handled() {
        let layer = QuantizedLinear::new(&values(6, 1), &[0.0; 2], 2, 3).unwrap();
        assert_eq!(layer.apply(&[0.0; 3]), vec![0.0, 0.0]);
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(layer.forward(&x).is_err());
        assert!(QuantizedLinear::new(&[0.0; 5], &[0.0; 2], 2, 3).is_err());
    }
}
