//! Int8 inference for frozen dense layers, `x · Wᵀ + b`.
//!
//! Weights are quantized once per output channel to 7 bits ([-64, 64], scale
//! `max|w| / 64`), activations per row at run time to 8 bits ([-127, 127]),
//! stored offset by 128 as unsigned bytes. Products are summed exactly in
//! i32; the offset's share, 128·Σw, is known per channel and taken off before
//! scaling back to f32. Seven-bit weights are what make the AVX2 path exact:
//! `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into i16,
//! and 2·255·64 = 32,640 never saturates (ONNX Runtime's `reduce_range` on
//! x86 makes the same trade). Weights are packed in blocks of 16 outputs, 4
//! consecutive inputs each: a broadcast activation word times one 512-bit
//! register (or two 256-bit ones) gives 16 outputs' partial sums in i32
//! lanes, with no horizontal sums. AVX-512 VNNI and AVX-VNNI's `vpdpbusd`
//! does the two multiplies and the add in one instruction; without AVX2 a
//! scalar loop gives the same integers. Every kernel computes the same exact
//! sums, so the outputs do not depend on the CPU.

use std::mem::MaybeUninit;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ops::{f32_slice, gelu_in_place, layer_norm_in_place, widest_vectors};

/// Outputs per block (the i32 lanes of a 512-bit register) and inputs per
/// lane (bytes).
const OUT_BLOCK: usize = 16;
const IN_GROUP: usize = 4;
/// Rows of one tile: 4 rows × 2 blocks keep 8 accumulators in registers.
const TILE_ROWS: usize = 4;
/// Rows per parallel task (a multiple of the 4-row tile).
const ROWS_PER_TASK: usize = 64;
/// The largest weight step count: 7 bits, so byte products never saturate.
const WEIGHT_STEPS: f32 = 64.0;
/// The largest activation step count, and the unsigned offset.
const ACTIVATION_STEPS: f32 = 127.0;
const OFFSET: i32 = 128;

/// The integer kernels. Each gives the same sums; they differ in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable loops, for CPUs without AVX2.
    Scalar,
    /// `vpmaddubsw` then `vpmaddwd`, 8 outputs per 256-bit register.
    Avx2,
    /// AVX-VNNI's `vpdpbusd` on 256-bit registers.
    AvxVnni,
    /// AVX-512 VNNI's `vpdpbusd`, 16 outputs per 512-bit register.
    Avx512Vnni,
}

impl Kernel {
    /// Fastest first.
    pub const ALL: [Kernel; 4] = [
        Kernel::Avx512Vnni,
        Kernel::AvxVnni,
        Kernel::Avx2,
        Kernel::Scalar,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            match self {
                Kernel::Scalar => true,
                Kernel::Avx2 => has!("avx2"),
                Kernel::AvxVnni => has!("avx2") && has!("avxvnni"),
                Kernel::Avx512Vnni => {
                    has!("avx2") && has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Scalar
        }
    }

    /// The fastest kernel this CPU can run.
    pub fn best() -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|kernel| kernel.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// The kernel the layers use: the one `use_kernel` set, else the best.
    pub fn in_use() -> Kernel {
        match CHOSEN.load(Ordering::Relaxed) {
            0 => Kernel::best(),
            n => Kernel::ALL[usize::from(n) - 1],
        }
    }

    fn index(self) -> u8 {
        Kernel::ALL
            .iter()
            .position(|kernel| *kernel == self)
            .map_or(0, |i| i as u8 + 1)
    }
}

impl FromStr for Kernel {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        Kernel::ALL
            .into_iter()
            .find(|kernel| kernel.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown int8 kernel {name:?} (one of: {})",
                    names(Kernel::ALL.into_iter())
                )
            })
    }
}

/// "a, b, c": the kernels' names, for messages.
fn names(kernels: impl Iterator<Item = Kernel>) -> String {
    kernels.map(Kernel::name).collect::<Vec<_>>().join(", ")
}

/// The kernel every layer in this process uses; 0 is "the best one".
static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// Makes every int8 layer in this process use `kernel` (`None`: the best the
/// CPU has), e.g. to time two kernels side by side. Fails, changing nothing,
/// when this CPU cannot run it.
pub fn use_kernel(kernel: Option<Kernel>) -> std::result::Result<(), String> {
    match kernel {
        Some(kernel) if !kernel.is_available() => Err(format!(
            "this CPU cannot run the {} int8 kernel (it can: {})",
            kernel.name(),
            names(Kernel::ALL.into_iter().filter(|k| k.is_available()))
        )),
        Some(kernel) => {
            CHOSEN.store(kernel.index(), Ordering::Relaxed);
            Ok(())
        }
        None => {
            CHOSEN.store(0, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// A dense layer with int8 weights, for inference only (no gradient).
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    out: usize,
    inner: usize,
    /// `inner` rounded up to whole groups of 4.
    groups: usize,
    /// `out` rounded up to whole blocks of 16.
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

#[inline(always)]
fn max_abs(row: &[f32]) -> f32 {
    // 32 running maxima in four independent chains (one chain waits on each
    // max's latency); `a > m` rather than `f32::max`, which adds NaN checks.
    // A NaN is skipped either way.
    let mut lanes = [0f32; 32];
    let chunks = row.chunks_exact(32);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    tail.iter().chain(&lanes).fold(0f32, |m, v| m.max(v.abs()))
}

/// The step of an activation row.
fn activation_step(row: &[f32]) -> f32 {
    widest_vectors!(activation_step_body(row: &[f32]) -> f32)
}

#[inline(always)]
fn activation_step_body(row: &[f32]) -> f32 {
    step(row, ACTIVATION_STEPS)
}

/// The step that maps the row's largest magnitude to `steps`; 1 for a zero row.
#[inline(always)]
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

    /// The first `inner` values of each `x_stride`-long row of `x`.
    fn quantize_rows(&self, x: &[f32], x_stride: usize, kernel: Kernel) -> QuantizedRows {
        let stride = self.stride();
        let rows = x.len() / x_stride;
        // Padding holds the offset itself, the byte of a zero.
        let mut bytes = vec![OFFSET as u8; rows * stride];
        let scales = x
            .chunks_exact(x_stride)
            .map(|row| &row[..self.inner])
            .zip(bytes.chunks_exact_mut(stride))
            .map(|(row, q)| {
                let scale = activation_step(row);
                let inverse = 1.0 / scale;
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if kernel != Kernel::Scalar {
                    // Safety: every vector kernel implies AVX2; `q` is at
                    // least as long as `row`.
                    done = unsafe { x86::quantize(row, inverse, q) };
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
        self.apply_with(x, Kernel::in_use(), false)
    }

    /// `apply` with the given kernel, then GELU on every output if `gelu`.
    fn apply_with(&self, x: &[f32], kernel: Kernel, gelu: bool) -> Vec<f32> {
        row_tasks(x, self.inner, self.padded_out(), self.out, |_, x, y| {
            self.rows_into(x, self.inner, y, kernel, gelu)
        })
    }

    /// Outputs rounded up to whole blocks: the width `block_rows` writes.
    fn padded_out(&self) -> usize {
        self.blocks * OUT_BLOCK
    }

    /// `x`'s rows (the first `inner` of every `x_stride`) through the layer
    /// into `y (rows, padded out)`, every element written; GELU after it if
    /// `gelu`.
    fn rows_into(
        &self,
        x: &[f32],
        x_stride: usize,
        y: &mut [MaybeUninit<f32>],
        kernel: Kernel,
        gelu: bool,
    ) {
        let q = self.quantize_rows(x, x_stride, kernel);
        self.block_rows(&q, y, kernel);
        if gelu {
            // Safety: `block_rows` wrote every element of `y`.
            gelu_in_place(unsafe { written(y) });
        }
    }

    /// One task's rows into `y (rows, padded out)`, every element written.
    fn block_rows(&self, q: &QuantizedRows, y: &mut [MaybeUninit<f32>], kernel: Kernel) {
        // The conversion of the sums to floats, 16 lanes wide where it can.
        let layer = self;
        widest_vectors!(block_rows_body(
            layer: &QuantizedLinear,
            q: &QuantizedRows,
            y: &mut [MaybeUninit<f32>],
            kernel: Kernel
        ) -> ())
    }
}

#[inline(always)]
fn block_rows_body(
    layer: &QuantizedLinear,
    q: &QuantizedRows,
    y: &mut [MaybeUninit<f32>],
    kernel: Kernel,
) {
    let rows = q.scales.len();
    let padded_out = layer.blocks * OUT_BLOCK;
    let stride = layer.stride();
    let block_len = layer.groups * OUT_BLOCK * IN_GROUP;
    // The 512-bit kernel takes two blocks at a time (8 of its 32
    // registers); the 256-bit ones one block in two registers a row.
    let blocks_per_tile = if kernel == Kernel::Avx512Vnni { 2 } else { 1 };
    let mut block = 0;
    while block < layer.blocks {
        let blocks = (layer.blocks - block).min(blocks_per_tile);
        let weights = &layer.packed[block * block_len..];
        let mut r = 0;
        while r < rows {
            let tile_rows = if rows - r >= TILE_ROWS { TILE_ROWS } else { 1 };
            let mut dots = [[[0i32; OUT_BLOCK]; 2]; TILE_ROWS];
            let tile = Tile {
                rows: &q.bytes[r * stride..(r + tile_rows) * stride],
                stride,
                weights,
                block_len,
                groups: layer.groups,
                blocks,
            };
            tile.dots(kernel, &mut dots);
            for (i, row_dots) in dots.iter().enumerate().take(tile_rows) {
                let row_scale = q.scales[r + i];
                let y_row = &mut y[(r + i) * padded_out..(r + i + 1) * padded_out];
                for (n, lanes) in row_dots.iter().enumerate().take(blocks) {
                    let outputs = (block + n) * OUT_BLOCK..(block + n + 1) * OUT_BLOCK;
                    // Whole blocks of 16: the compiler makes this vector steps.
                    let y_block = &mut y_row[outputs.clone()];
                    let offsets = &layer.offsets[outputs.clone()];
                    let scales = &layer.scales[outputs.clone()];
                    let bias = &layer.bias[outputs];
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

/// `y` as the floats a layer wrote into it.
///
/// # Safety
/// Every element of `y` has been written (`MaybeUninit<f32>` has the layout
/// of `f32`).
unsafe fn written(y: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // Safety: as the caller promises.
    unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Runs `task(first row, x rows, y rows)` over blocks of `ROWS_PER_TASK`
/// rows of `x` (`inner` wide) on every thread; each call writes every element
/// of its rows' block of a `(rows, padded_out)` output. Returns the output
/// without its padding columns.
fn row_tasks(
    x: &[f32],
    inner: usize,
    padded_out: usize,
    out: usize,
    task: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let rows = x.len() / inner;
    // Every element is written once below: no zero fill first (it cost
    // ~3% of an int8 forward pass).
    let mut y: Vec<f32> = Vec::with_capacity(rows * padded_out);
    if rows == 0 {
        return y;
    }
    y.spare_capacity_mut()
        .par_chunks_mut(ROWS_PER_TASK * padded_out)
        .zip(x.par_chunks(ROWS_PER_TASK * inner))
        .enumerate()
        .for_each(|(i, (y, x))| task(i * ROWS_PER_TASK, x, y));
    // Safety: `task` wrote every (row, padded output) of each chunk.
    unsafe { y.set_len(rows * padded_out) };
    if padded_out != out {
        y = y
            .chunks_exact(padded_out)
            .flat_map(|row| &row[..out])
            .copied()
            .collect();
    }
    y
}

/// A frozen layer norm's parameters, for the "add & norm" steps that follow
/// int8 layers in a BERT block: `norm(layer(x) + residual)`.
#[derive(Debug, Clone)]
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

impl Norm {
    pub fn from_tensors(gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Self> {
        let (gamma, beta): (Vec<f32>, Vec<f32>) = (gamma.to_vec1()?, beta.to_vec1()?);
        if gamma.len() != beta.len() {
            bail!(
                "layer norm: {} scales and {} shifts",
                gamma.len(),
                beta.len()
            );
        }
        Ok(Self {
            gamma,
            beta,
            eps: eps as f32,
        })
    }

    /// `y`'s rows (the first `gamma.len()` of every `stride`) plus the
    /// residual's rows (`residual_stride` apart), then normalised, in place;
    /// the same bits as candle's add followed by `ops::layer_norm`.
    fn add_then_norm(
        &self,
        y: &mut [MaybeUninit<f32>],
        stride: usize,
        residual: &[f32],
        residual_stride: usize,
    ) {
        let d = self.gamma.len();
        // Safety: the layer wrote every element of `y` before this runs.
        let y = unsafe { written(y) };
        for (row, res) in y
            .chunks_exact_mut(stride)
            .zip(residual.chunks_exact(residual_stride))
        {
            let row = &mut row[..d];
            for (v, r) in row.iter_mut().zip(&res[..d]) {
                *v += r;
            }
            layer_norm_in_place(row, &self.gamma, &self.beta, self.eps);
        }
    }
}

/// The part of a BERT layer after its attention, all int8 and row-local:
/// `attended = attention_norm(attention_out(context) + x)`, then
/// `output_norm(down(gelu(up(attended))) + attended)`.
pub struct PostAttention<'a> {
    pub attention_out: &'a QuantizedLinear,
    pub attention_norm: &'a Norm,
    pub up: &'a QuantizedLinear,
    pub down: &'a QuantizedLinear,
    pub output_norm: &'a Norm,
}

impl PostAttention<'_> {
    /// Runs on blocks of 64 rows, each carried through the whole chain while
    /// it is in cache: the attended rows and the wide GELU output are never
    /// written out whole, and each is quantized for the next layer where it
    /// was made. The same numbers as the layers, candle's adds and
    /// `ops::layer_norm` one after another.
    pub fn forward(&self, context: &Tensor, x: &Tensor) -> Result<Tensor> {
        let h = self.attention_out.out;
        let (rows, width) = context.dims2()?;
        let widths = [
            self.attention_out.inner,
            self.up.inner,
            self.down.inner,
            self.down.out,
            self.attention_norm.gamma.len(),
            self.output_norm.gamma.len(),
        ];
        if widths != [width, h, self.up.out, h, h, h] || x.dims2()? != (rows, h) {
            bail!(
                "int8 block: context {:?} and x {:?} do not chain through layers of widths {widths:?}",
                context.dims(),
                x.dims()
            );
        }
        context
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, self)
    }

    fn apply_with(&self, context: &[f32], x: &[f32], kernel: Kernel) -> Vec<f32> {
        let (out, up, down) = (self.attention_out, self.up, self.down);
        let h = out.out;
        let (narrow, wide) = (out.padded_out(), up.padded_out());
        row_tasks(
            context,
            out.inner,
            down.padded_out(),
            h,
            |row, context, y| {
                let rows = context.len() / out.inner;
                let mut attended: Vec<f32> = Vec::with_capacity(rows * narrow);
                out.rows_into(
                    context,
                    out.inner,
                    attended.spare_capacity_mut(),
                    kernel,
                    false,
                );
                let residual = &x[row * h..(row + rows) * h];
                self.attention_norm.add_then_norm(
                    attended.spare_capacity_mut(),
                    narrow,
                    residual,
                    h,
                );
                // Safety: `rows_into` wrote every (row, padded output).
                unsafe { attended.set_len(rows * narrow) };
                let mut hidden: Vec<f32> = Vec::with_capacity(rows * wide);
                up.rows_into(&attended, narrow, hidden.spare_capacity_mut(), kernel, true);
                // Safety: as above.
                unsafe { hidden.set_len(rows * wide) };
                down.rows_into(&hidden, wide, y, kernel, false);
                self.output_norm
                    .add_then_norm(y, down.padded_out(), &attended, narrow);
            },
        )
    }
}

impl CustomOp2 for PostAttention<'_> {
    fn name(&self) -> &'static str {
        "int8-post-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (context, x) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((
            CpuStorage::F32(self.apply_with(context, x, Kernel::in_use())),
            l2.shape().clone(),
        ))
    }
}

/// The integer dots of 1 or `TILE_ROWS` quantized rows with 1 or 2 blocks.
struct Tile<'a> {
    /// The rows' bytes, `stride` apart.
    rows: &'a [u8],
    stride: usize,
    /// From the first block on; blocks are `block_len` bytes apart.
    weights: &'a [i8],
    block_len: usize,
    groups: usize,
    blocks: usize,
}

impl Tile<'_> {
    fn row(&self, i: usize) -> &[u8] {
        &self.rows[i * self.stride..(i + 1) * self.stride]
    }

    /// `dots[row][block][output]` for the tile's rows and blocks.
    fn dots(&self, kernel: Kernel, dots: &mut [[[i32; OUT_BLOCK]; 2]; TILE_ROWS]) {
        let rows = self.rows.len() / self.stride;
        debug_assert!(rows == 1 || rows == TILE_ROWS);
        debug_assert!(self.blocks == 1 || (self.blocks == 2 && kernel == Kernel::Avx512Vnni));
        debug_assert!(
            self.weights.len()
                >= (self.blocks - 1) * self.block_len + self.groups * OUT_BLOCK * IN_GROUP
        );
        #[cfg(target_arch = "x86_64")]
        {
            let four = || [self.row(0), self.row(1), self.row(2), self.row(3)];
            let one = || [self.row(0)];
            let (w, len, g) = (self.weights, self.block_len, self.groups);
            // Safety: `kernel` is only ever one the CPU has (`use_kernel`
            // checks); each row holds `groups` words and each block `groups`
            // 64-byte steps, as asserted above.
            unsafe {
                match (kernel, rows, self.blocks) {
                    (Kernel::Avx512Vnni, 1, 1) => x86::avx512_vnni::<1, 1>(one(), w, len, g, dots),
                    (Kernel::Avx512Vnni, 1, _) => x86::avx512_vnni::<1, 2>(one(), w, len, g, dots),
                    (Kernel::Avx512Vnni, _, 1) => x86::avx512_vnni::<4, 1>(four(), w, len, g, dots),
                    (Kernel::Avx512Vnni, _, _) => x86::avx512_vnni::<4, 2>(four(), w, len, g, dots),
                    (Kernel::AvxVnni, 1, _) => x86::avx_vnni::<1>(one(), w, g, dots),
                    (Kernel::AvxVnni, _, _) => x86::avx_vnni::<4>(four(), w, g, dots),
                    (Kernel::Avx2, 1, _) => x86::avx2::<1>(one(), w, g, dots),
                    (Kernel::Avx2, _, _) => x86::avx2::<4>(four(), w, g, dots),
                    (Kernel::Scalar, _, _) => self.scalar(rows, dots),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar(rows, dots);
    }

    fn scalar(&self, rows: usize, dots: &mut [[[i32; OUT_BLOCK]; 2]; TILE_ROWS]) {
        for (i, row_dots) in dots.iter_mut().enumerate().take(rows) {
            scalar_tile(
                self.row(i),
                self.weights,
                self.block_len,
                self.groups,
                self.blocks,
                row_dots,
            );
        }
    }
}

/// The integers the vector kernels compute, one row, `blocks` blocks of 16.
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
            CpuStorage::F32(layer.apply_with(x, Kernel::in_use(), self.gelu)),
            Shape::from((rows, layer.out)),
        ))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{IN_GROUP, OUT_BLOCK, TILE_ROWS};

    /// A tile's i32 sums: `[row][block][output]`.
    type Dots = [[[i32; OUT_BLOCK]; 2]; TILE_ROWS];
    /// Bytes of one block's group: 16 outputs × 4 inputs.
    const GROUP_BYTES: usize = OUT_BLOCK * IN_GROUP;

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

    /// Dots of `R` unsigned activation rows with `N` blocks of 16 outputs
    /// (`block_len` bytes apart), `groups` words of 4 inputs each: one
    /// `vpdpbusd` per row, block and group.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn avx512_vnni<const R: usize, const N: usize>(
        rows: [&[u8]; R],
        weights: &[i8],
        block_len: usize,
        groups: usize,
        dots: &mut Dots,
    ) {
        let mut acc = [[_mm512_setzero_si512(); N]; R];
        let w = weights.as_ptr();
        let a: [*const u8; R] = rows.map(|r| r.as_ptr());
        for g in 0..groups {
            let mut wv = [_mm512_setzero_si512(); N];
            for (n, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(w.add(n * block_len + g * GROUP_BYTES).cast());
            }
            for r in 0..R {
                // The row's 4 bytes of this group, in every lane.
                let av = _mm512_set1_epi32(a[r].add(g * IN_GROUP).cast::<i32>().read_unaligned());
                for n in 0..N {
                    acc[r][n] = _mm512_dpbusd_epi32(acc[r][n], av, wv[n]);
                }
            }
        }
        for r in 0..R {
            for n in 0..N {
                _mm512_storeu_si512(dots[r][n].as_mut_ptr().cast(), acc[r][n]);
            }
        }
    }

    /// One block of 16 outputs in two 256-bit halves, with AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn avx_vnni<const R: usize>(
        rows: [&[u8]; R],
        weights: &[i8],
        groups: usize,
        dots: &mut Dots,
    ) {
        halves::<R, Vnni>(rows, weights, groups, dots)
    }

    /// One block of 16 outputs in two 256-bit halves, with AVX2 alone.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2<const R: usize>(
        rows: [&[u8]; R],
        weights: &[i8],
        groups: usize,
        dots: &mut Dots,
    ) {
        halves::<R, MaddPairs>(rows, weights, groups, dots)
    }

    /// `acc + Σ of 4 (unsigned a × signed w) byte products` per i32 lane.
    trait DotStep {
        unsafe fn step(acc: __m256i, a: __m256i, w: __m256i) -> __m256i;
    }

    /// AVX2: pairs into i16 (exact for 7-bit weights), then pairs into i32.
    struct MaddPairs;

    impl DotStep for MaddPairs {
        #[inline(always)]
        unsafe fn step(acc: __m256i, a: __m256i, w: __m256i) -> __m256i {
            let pairs = _mm256_maddubs_epi16(a, w);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    struct Vnni;

    impl DotStep for Vnni {
        #[inline(always)]
        unsafe fn step(acc: __m256i, a: __m256i, w: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, a, w)
        }
    }

    /// The 256-bit kernels' body, inlined into each `target_feature` wrapper.
    #[inline(always)]
    unsafe fn halves<const R: usize, S: DotStep>(
        rows: [&[u8]; R],
        weights: &[i8],
        groups: usize,
        dots: &mut Dots,
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let w = weights.as_ptr();
        let a: [*const u8; R] = rows.map(|r| r.as_ptr());
        for g in 0..groups {
            let low = _mm256_loadu_si256(w.add(g * GROUP_BYTES).cast());
            let high = _mm256_loadu_si256(w.add(g * GROUP_BYTES + GROUP_BYTES / 2).cast());
            for r in 0..R {
                let av = _mm256_set1_epi32(a[r].add(g * IN_GROUP).cast::<i32>().read_unaligned());
                acc[r][0] = S::step(acc[r][0], av, low);
                acc[r][1] = S::step(acc[r][1], av, high);
            }
        }
        for r in 0..R {
            for (h, half) in acc[r].iter().enumerate() {
                _mm256_storeu_si256(dots[r][0][h * OUT_BLOCK / 2..].as_mut_ptr().cast(), *half);
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

    #[test]
    fn every_kernel_this_cpu_has_gives_the_scalar_integers() {
        let (groups, block_len) = (24, 24 * OUT_BLOCK * IN_GROUP);
        let stride = groups * IN_GROUP;
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            seed >> 24
        };
        // Full range: bytes 0..=255 against weights -64..=64.
        let rows: Vec<u8> = (0..TILE_ROWS * stride).map(|_| next() as u8).collect();
        let weights: Vec<i8> = (0..2 * block_len)
            .map(|_| (next() % 129) as i32 - 64)
            .map(|w| w as i8)
            .collect();
        let kernels: Vec<Kernel> = Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect();
        assert!(kernels.contains(&Kernel::Scalar));
        for kernel in kernels {
            let max_blocks = if kernel == Kernel::Avx512Vnni { 2 } else { 1 };
            for (tile_rows, blocks) in [(TILE_ROWS, max_blocks), (1, max_blocks), (TILE_ROWS, 1)] {
                let tile = Tile {
                    rows: &rows[(TILE_ROWS - tile_rows) * stride..],
                    stride,
                    weights: &weights,
                    block_len,
                    groups,
                    blocks,
                };
                let mut got = [[[0i32; OUT_BLOCK]; 2]; TILE_ROWS];
                tile.dots(kernel, &mut got);
                for (i, got) in got.iter().enumerate().take(tile_rows) {
                    let mut want = [[0i32; OUT_BLOCK]; 2];
                    scalar_tile(tile.row(i), &weights, block_len, groups, blocks, &mut want);
                    assert_eq!(
                        &want[..blocks],
                        &got[..blocks],
                        "{kernel:?} {tile_rows}x{blocks}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_layer_gives_the_same_floats_with_every_kernel() {
        // 37 outputs: two whole blocks and a padded one; 70 rows: whole
        // tiles and a tail.
        let (out, inner, rows) = (37, 45, 70);
        let layer =
            QuantizedLinear::new(&values(out * inner, 2), &values(out, 3), out, inner).unwrap();
        let x = values(rows * inner, 1);
        let scalar = layer.apply_with(&x, Kernel::Scalar, true);
        for kernel in Kernel::ALL.into_iter().filter(|k| k.is_available()) {
            assert_eq!(layer.apply_with(&x, kernel, true), scalar, "{kernel:?}");
        }
    }

    #[test]
    fn the_fused_block_equals_its_layers_adds_and_norms() {
        use crate::ops::layer_norm;
        // Hidden 24 (one padded block), FFN 37 wide (a padded block between
        // up and down), context 20 wide; 130 rows: three tasks, the last short.
        let (h, wide, inner, rows) = (24, 37, 20, 130);
        let device = candle_core::Device::Cpu;
        let layer = |out, inner, seed| {
            QuantizedLinear::new(
                &values(out * inner, seed),
                &values(out, seed + 1),
                out,
                inner,
            )
            .unwrap()
        };
        let (out, up, down) = (layer(h, inner, 2), layer(wide, h, 4), layer(h, wide, 6));
        let norm = |seed| Norm {
            gamma: values(h, seed),
            beta: values(h, seed + 1),
            eps: 1e-12,
        };
        let (attention_norm, output_norm) = (norm(8), norm(10));
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, h, &device).unwrap();
        let apart_norm = |x: &Tensor, n: &Norm| {
            layer_norm(x, &tensor(n.gamma.clone()), &tensor(n.beta.clone()), 1e-12).unwrap()
        };
        let context = Tensor::from_vec(values(rows * inner, 1), (rows, inner), &device).unwrap();
        let x = Tensor::from_vec(values(rows * h, 9), (rows, h), &device).unwrap();
        let block = PostAttention {
            attention_out: &out,
            attention_norm: &attention_norm,
            up: &up,
            down: &down,
            output_norm: &output_norm,
        };
        let fused = block.forward(&context, &x).unwrap();

        let attended = apart_norm(
            &(out.forward(&context).unwrap() + &x).unwrap(),
            &attention_norm,
        );
        let fed = down.forward(&up.forward_gelu(&attended).unwrap()).unwrap();
        let apart = apart_norm(&(fed + &attended).unwrap(), &output_norm);
        let floats = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(fused.dims(), &[rows, h]);
        assert_eq!(floats(fused), floats(apart));

        let wrong = PostAttention { up: &down, ..block };
        assert!(
            wrong.forward(&context, &x).is_err(),
            "layers that do not chain"
        );
        assert!(
            block.forward(&x, &x).is_err(),
            "a context of the wrong width"
        );
    }

    #[test]
    fn kernels_are_named_and_checked() {
        for kernel in Kernel::ALL {
            assert_eq!(kernel.name().parse::<Kernel>(), Ok(kernel));
        }
        let unknown = "avx9".parse::<Kernel>().unwrap_err();
        assert!(
            unknown.contains("avx9") && unknown.contains("avx512-vnni"),
            "{unknown}"
        );
        assert!(Kernel::best().is_available());
        assert_eq!(Kernel::in_use(), Kernel::best());
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
