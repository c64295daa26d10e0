//! Fused CPU kernels with analytic backward passes for the encoder.
//!
//! candle 0.11's `LayerNorm` and `softmax_last_dim` take fused paths that have
//! no backward, so gradients silently stop there (upstream issues #3011, #2168);
//! composing them from small ops trains but is slow. These ops are fused in both
//! directions. All take f32 tensors and work on the last dimension.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per parallel task: small rows are batched so threads get real work.
const MIN_PARALLEL_ELEMS: usize = 1 << 14;

pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => bail!("fused ops support f32 only"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused ops need contiguous inputs"),
    }
}

/// `c (m×n, row-major) = [c +] alpha · a · b`, with arbitrary strides for a and b.
/// Panics if a stride or a buffer does not fit the shape.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dims: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    parallelism: Parallelism,
) {
    let (m, n, k) = dims;
    let c = SharedOut::new(c);
    let threads = match parallelism {
        Parallelism::Rayon(t) => t.max(1),
        _ => 1,
    };
    // Each thread multiplies its own block of rows (of columns when there
    // are fewer rows) single-threaded: it packs its own operands and never
    // waits for the other inside the product, where gemm's own split
    // synchronises at every block (training step 8×256 on AVX2: 0.94×).
    // Every element is the same sum in the same order either way.
    let (by_rows, len) = if m >= n { (true, m) } else { (false, n) };
    let blocks = threads.min(len / MIN_SPLIT_BLOCK).max(1);
    // Block i starts at i·len/blocks, down to a whole tile of rows.
    let bound = |i: usize| {
        if i == blocks {
            len
        } else {
            i * len / blocks / 16 * 16
        }
    };
    let (a_rs, _) = a_strides;
    let (_, b_cs) = b_strides;
    let block = |i: usize| {
        let (start, count) = (bound(i), bound(i + 1) - bound(i));
        let (dims, a, b, offset) = if by_rows {
            ((count, n, k), &a[start * a_rs..], b, start * n)
        } else {
            ((m, count, k), a, &b[start * b_cs..], start)
        };
        // Safety: `c` is borrowed mutably for the call, and each block
        // writes only its own rows or columns of it.
        unsafe {
            matmul_into(
                dims,
                a,
                a_strides,
                b,
                b_strides,
                c,
                (offset, n),
                accumulate,
                alpha,
                Parallelism::None,
            )
        }
    };
    if blocks == 1 {
        block(0);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
}

/// Whether a single-threaded product of this shape runs our AVX2 kernel
/// (`sgemm.rs`) on this CPU rather than gemm's.
pub fn own_product_applies(m: usize, n: usize, k: usize) -> bool {
    crate::sgemm::applies(m, n, k)
}

/// A product is split only into blocks of at least this many rows (or
/// columns), so each block, cut down to whole tiles, still has over 64:
/// gemm sums along k in chunks whose length then depends on k alone (smaller
/// products take other paths), and each block gives the single-threaded bits.
const MIN_SPLIT_BLOCK: usize = 96;

/// A mutable f32 buffer that parallel tasks write at disjoint elements (each
/// attention head its own columns of the same rows), which `&mut` slices
/// cannot express.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// Safety: a `SharedOut` is only written through `matmul_into`, whose callers
// promise that no two tasks write the same element.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
        }
    }
}

/// As `matmul`, into the `m × n` block of `c` that starts at element `offset`
/// with rows `c_rs` elements apart.
///
/// # Safety
/// No other thread reads or writes that block during the call, and the
/// buffer behind `c` outlives it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_into(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: SharedOut,
    (offset, c_rs): (usize, usize),
    accumulate: bool,
    alpha: f32,
    parallelism: Parallelism,
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    assert!(n <= c_rs && offset + (m - 1) * c_rs + n <= c.len);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if matches!(parallelism, Parallelism::None) && crate::sgemm::applies(m, n, k) {
        // Safety: as for gemm below.
        unsafe {
            crate::sgemm::product(
                (m, n, k),
                a.as_ptr(),
                (a_rs, a_cs),
                b.as_ptr(),
                (b_rs, b_cs),
                c.ptr.add(offset),
                c_rs,
                accumulate,
                alpha,
            )
        };
        return;
    }
    // Safety: the asserts keep every access inside the buffers; c does not
    // alias a or b, and the caller keeps other threads off its block.
    unsafe {
        gemm_raw(
            (m, n, k),
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            c.ptr.add(offset),
            c_rs,
            accumulate,
            alpha,
            parallelism,
        )
    }
}

/// `c (m×n, rows c_rs apart) = [c +] alpha · a · b` in gemm alone, one
/// thread: what `matmul` computes, the reference our AVX2 kernel is checked
/// and benchmarked against. Panics if a stride or a buffer does not fit.
#[allow(clippy::too_many_arguments)]
pub fn gemm_product(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    alpha: f32,
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    assert!(n <= c_rs && (m - 1) * c_rs + n <= c.len());
    // Safety: the asserts keep every access inside the buffers; `c` is
    // borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm_raw(
            (m, n, k),
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            c.as_mut_ptr(),
            c_rs,
            accumulate,
            alpha,
            Parallelism::None,
        )
    }
}

/// The one call into gemm, row-major c.
///
/// # Safety
/// As for `matmul_into`: every addressed element is inside its buffer, c
/// aliases neither operand and no other thread touches c's block.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    alpha: f32,
    parallelism: Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Elements per task when filling a fresh buffer.
const FILL_CHUNK: usize = 1 << 16;

/// `len` zeros, written by every thread. `vec![0.0; len]` is one core's
/// memset: glibc's calloc must clear memory it kept mapped (the binary keeps
/// freed memory mapped), and a 25 MB output then costs a few ms while the
/// other core waits.
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(FILL_CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // Safety: the first `len` elements were written just above.
    unsafe { v.set_len(len) };
    v
}

/// `rows` copies of `row`, written by every thread (see `par_zeros`).
pub(crate) fn par_repeat_rows(row: &[f32], rows: usize) -> Vec<f32> {
    let len = rows * row.len();
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if row.is_empty() {
        return v;
    }
    let per_task = row.len() * (FILL_CHUNK / row.len()).max(1);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(per_task)
        .for_each(|c| {
            for dst in c.chunks_mut(row.len()) {
                for (d, s) in dst.iter_mut().zip(row) {
                    d.write(*s);
                }
            }
        });
    // Safety: the chunks cover the first `len` elements, each whole rows.
    unsafe { v.set_len(len) };
    v
}

/// A copy of `values`, written by every thread (see `par_zeros`).
pub(crate) fn par_copy(values: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(values.len());
    v.spare_capacity_mut()[..values.len()]
        .par_chunks_mut(FILL_CHUNK)
        .zip(values.par_chunks(FILL_CHUNK))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src) {
                d.write(*s);
            }
        });
    // Safety: the chunks cover the first `values.len()` elements.
    unsafe { v.set_len(values.len()) };
    v
}

/// Column sums of `rows × cols` values into `out` (overwritten), as fixed
/// row blocks summed in parallel then added in order: the same bits whatever
/// the thread count.
pub(crate) fn column_sums(values: &[f32], cols: usize, out: &mut [f32]) {
    let chunk = cols * rows_per_task(cols);
    let partials: Vec<Vec<f32>> = values
        .par_chunks(chunk)
        .map(|block| {
            let mut sums = vec![0f32; cols];
            for row in block.chunks_exact(cols) {
                for (s, v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    out.fill(0.0);
    for partial in partials {
        for (total, p) in out.iter_mut().zip(partial) {
            *total += p;
        }
    }
}

/// `rows` of `y += residual` then a layer norm of each, in place, on every
/// thread; with `keep_sums` the sums before the norm are returned too (the
/// backward pass reads them).
pub(crate) fn add_then_layer_norm(
    y: &mut [f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    keep_sums: bool,
) -> Option<Vec<f32>> {
    let d = gamma.len();
    let chunk = d * rows_per_task(d);
    let mut sums = keep_sums.then(|| par_zeros(y.len()));
    let add_norm = |y: &mut [f32], residual: &[f32], mut kept: Option<&mut [f32]>| {
        for (i, (row, res)) in y.chunks_mut(d).zip(residual.chunks(d)).enumerate() {
            for (v, r) in row.iter_mut().zip(res) {
                *v += r;
            }
            if let Some(kept) = kept.as_deref_mut() {
                kept[i * d..][..d].copy_from_slice(row);
            }
            layer_norm_in_place(row, gamma, beta, eps);
        }
    };
    match sums.as_mut() {
        Some(sums) => y
            .par_chunks_mut(chunk)
            .zip(residual.par_chunks(chunk).zip(sums.par_chunks_mut(chunk)))
            .for_each(|(y, (res, kept))| add_norm(y, res, Some(kept))),
        None => y
            .par_chunks_mut(chunk)
            .zip(residual.par_chunks(chunk))
            .for_each(|(y, res)| add_norm(y, res, None)),
    }
    sums
}

fn rows_per_task(row: usize) -> usize {
    (MIN_PARALLEL_ELEMS / row.max(1)).max(1)
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

/// One row's layer norm, in place: the fused op's forward pass and the int8
/// layers' "add & norm" give the same bits through it.
#[inline]
pub(crate) fn layer_norm_in_place(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let (mean, rstd) = row_stats(row, eps);
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * rstd * g + b;
    }
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum(row) / n;
    // var = E[x²] − mean², accumulated lane-wise.
    let var = (dot(row, row) / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let d = gamma.len();
        if beta.len() != d || x.len() % d != 0 {
            bail!("layer norm: shapes do not match");
        }
        let mut out = par_zeros(x.len());
        out.par_chunks_mut(d * rows_per_task(d))
            .zip(x.par_chunks(d * rows_per_task(d)))
            .for_each(|(out, x)| {
                for (y, row) in out.chunks_mut(d).zip(x.chunks(d)) {
                    y.copy_from_slice(row);
                    layer_norm_in_place(y, gamma, beta, self.eps);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.elem_count();
        let rows = x.elem_count() / d;
        // One pass computes dx (rows × d) and, in two extra rows, dgamma and dbeta.
        let packed = x.apply_op3_no_bwd(
            gamma,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, rows, 1)?.reshape(gamma.shape())?;
        let dbeta = packed.narrow(0, rows + 1, 1)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, grad) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let d = gamma.len();
        let rows = x.len() / d;
        let mut out = par_zeros((rows + 2) * d);
        let (dx, param_grads) = out.split_at_mut(rows * d);
        let (dgamma, dbeta) = param_grads.split_at_mut(d);
        layer_norm_backward(x, gamma, grad, self.eps, dx, dgamma, dbeta);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// The layer norm's gradients from its input `x`, `gamma` and the output's
/// gradient: `dx` written, `dgamma` and `dbeta` overwritten. The row blocks'
/// partial sums are added in a fixed order, so the result does not depend on
/// the thread count.
pub(crate) fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    eps: f32,
    dx_all: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    let chunk = d * rows_per_task(d);
    let partials: Vec<Vec<f32>> = dx_all
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(grad.par_chunks(chunk)))
        .map(|(dx, (x, grad))| {
            // dgamma then dbeta for this block of rows.
            let mut partial = vec![0f32; 2 * d];
            let (mut xhat, mut dxhat) = (vec![0f32; d], vec![0f32; d]);
            for ((dx, row), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(grad.chunks(d)) {
                let (mean, rstd) = row_stats(row, eps);
                // Element-wise loops, and the two means summed lane-wise,
                // so every loop vectorises.
                for i in 0..d {
                    xhat[i] = (row[i] - mean) * rstd;
                    dxhat[i] = g[i] * gamma[i];
                    partial[i] += g[i] * xhat[i];
                    partial[d + i] += g[i];
                }
                let mean_dxhat = sum(&dxhat) / d as f32;
                let mean_dxhat_xhat = dot(&dxhat, &xhat) / d as f32;
                for i in 0..d {
                    dx[i] = rstd * (dxhat[i] - mean_dxhat - xhat[i] * mean_dxhat_xhat);
                }
            }
            partial
        })
        .collect();
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for partial in partials {
        for (total, p) in dgamma.iter_mut().zip(&partial[..d]) {
            *total += p;
        }
        for (total, p) in dbeta.iter_mut().zip(&partial[d..]) {
            *total += p;
        }
    }
}

/// GELU with the exact erf, as BERT uses.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

/// GELU of every element, in place (on a product still in cache).
pub(crate) fn gelu_in_place(values: &mut [f32]) {
    widest_vectors!(gelu_all(values: &mut [f32]) -> ())
}

#[inline(always)]
fn gelu_all(values: &mut [f32]) {
    for v in values {
        *v = gelu_value(*v);
    }
}

/// Whether the CPU has the AVX-512 subset `widest_vectors!` compiles for.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `widest_vectors!(body(a: A, b: B) -> R)`, as a function's whole body:
/// calls `body(a, b)` compiled for AVX-512 where the CPU has it, so the
/// compiler vectorises its loops 16 lanes wide instead of the build's 8.
/// `body` must be `#[inline(always)]` (it is then compiled into both
/// versions). The results are the same bits: every loop here fixes its
/// summation order in the source (lane-wise accumulators), and the compiler
/// neither reorders float sums nor fuses multiplies and adds on its own.
macro_rules! widest_vectors {
    ($body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            unsafe fn wide($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            if $crate::ops::has_avx512() {
                // Safety: the CPU has the features `wide` is compiled for.
                return unsafe { wide($($arg),*) };
            }
        }
        $body($($arg),*)
    }};
}
pub(crate) use widest_vectors;

#[inline(always)]
fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn gelu_derivative(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * INV_SQRT_2PI * fast_exp(-0.5 * x * x)
}

/// e^x with a relative error below 1.5e-7, written without branches or calls so
/// loops over it vectorise (libm's `expf` costs ~3 ns an element here).
/// Below −87 it is exactly 0, never a tiny value: masked scores would otherwise
/// leave ~1e-38 probabilities whose products are subnormal floats, which the
/// CPU handles ~100× slower (a padded backward pass took 3–5 s instead of 0.2 s).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    // A NaN becomes −87 (`clamp_between`), never an undefined int conversion below.
    let x = clamp_between(x, -87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // Cody–Waite: ln 2 split in two so r = x − n·ln 2 keeps its precision.
    let r = mul_add(n, 2.121_944_4e-4, mul_add(n, -0.693_359_4, x));
    // e^r for |r| ≤ ln2/2: a polynomial of degree 6 (fitted near-minimax
    // for relative error, 2e-9 before f32 rounding), in Horner steps.
    let p = polynomial(
        r,
        [
            1.0,
            1.0,
            0.499_999_9,
            0.166_664_2,
            0.041_668_225,
            0.008_374_816,
            0.001_383_684_6,
        ],
    );
    // Safety: x is clamped, so n is an integer in [-126, 127]. The unchecked
    // conversion (no saturation logic) is what lets this loop vectorise.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let e = p * f32::from_bits(((n + 127) << 23) as u32);
    if x > -87.0 {
        e
    } else {
        0.0
    }
}

/// `x` held to [lo, hi] by comparisons, which compile to one max and one min
/// instruction (`f32::clamp` and `f32::max` add NaN handling); a NaN comes
/// out as `lo`.
#[inline(always)]
fn clamp_between(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x > lo { x } else { lo };
    if x < hi {
        x
    } else {
        hi
    }
}

/// `c₀ + c₁t + … + c_{N−1}t^{N−1}` in Horner steps of `mul_add`.
#[inline(always)]
fn polynomial<const N: usize>(t: f32, coefficients: [f32; N]) -> f32 {
    let (last, rest) = coefficients
        .split_last()
        .expect("a polynomial has a coefficient");
    rest.iter().rev().fold(*last, |p, &c| mul_add(p, t, c))
}

/// `a·b + c`, in one fused instruction (one rounding) where the build has FMA
/// (x86-64-v3, `.cargo/config.toml`): half the instructions and latency of
/// the polynomials in `fast_exp` and `fast_erf`. The choice is made at
/// compile time, so every kernel of one binary gives the same bits.
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lane-wise reductions: sixteen independent accumulators let the compiler
/// vectorise what a single running sum (strict float order) would keep scalar.
const LANES: usize = 16;

pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Softmax of `row + mask (+ bias)` in place, in three passes over the row
/// (four with a bias): add and take the maximum, exponentiate and sum, scale. Lane-wise
/// accumulators keep each pass vectorised.
pub fn masked_softmax_in_place(row: &mut [f32], mask: &[f32], bias: Option<&[f32]>) {
    widest_vectors!(softmax_body(row: &mut [f32], mask: &[f32], bias: Option<&[f32]>) -> ())
}

#[inline(always)]
fn softmax_body(row: &mut [f32], mask: &[f32], bias: Option<&[f32]>) {
    let n = row.len();
    let mask = &mask[..n];
    if let Some(bias) = bias {
        for (x, b) in row.iter_mut().zip(&bias[..n]) {
            *x += b;
        }
    }
    let mut top = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    let mut mask_chunks = mask.chunks_exact(LANES);
    for (c, mc) in (&mut chunks).zip(&mut mask_chunks) {
        for l in 0..LANES {
            c[l] += mc[l];
            top[l] = if c[l] > top[l] { c[l] } else { top[l] };
        }
    }
    let mut m = top.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (x, mk) in chunks
        .into_remainder()
        .iter_mut()
        .zip(mask_chunks.remainder())
    {
        *x += mk;
        m = m.max(*x);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = fast_exp(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - m);
        total += *x;
    }
    let inv = 1.0 / total;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// erf(x) with an absolute error below 4e-7: x·P(x²)/Q(x²), P and Q of
/// degree 5, fitted (near-minimax, absolute error) on [0, 4] and clamped
/// there (erf(4) = 1 − 1.5e-8). Half the instructions of the exp-based
/// Abramowitz & Stegun 7.1.26 it replaces, at the same accuracy.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    const P: [f32; 6] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        0.196_238_59,
        0.053_465_84,
        0.004_003_106_6,
        2.880_137e-4,
        1.974_720_6e-6,
    ];
    const Q: [f32; 6] = [
        1.0,
        0.507_243_1,
        0.116_471_89,
        0.015_443_384,
        0.001_216_198_2,
        3.747_824_3e-5,
    ];
    let x = clamp_between(x, -4.0, 4.0);
    let t = x * x;
    x * polynomial(t, P) / polynomial(t, Q)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        Ok((CpuStorage::F32(gelu_of(x)), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

/// `grad ← grad · gelu'(x)`, elementwise, on every thread.
pub(crate) fn gelu_backward_in_place(x: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(MIN_PARALLEL_ELEMS)
        .zip(x.par_chunks(MIN_PARALLEL_ELEMS))
        .for_each(|(g, x)| {
            for (g, x) in g.iter_mut().zip(x) {
                *g *= gelu_derivative(*x);
            }
        });
}

/// `gelu(x)` into a new buffer, on every thread.
pub(crate) fn gelu_of(x: &[f32]) -> Vec<f32> {
    let mut out = par_zeros(x.len());
    out.par_chunks_mut(MIN_PARALLEL_ELEMS)
        .zip(x.par_chunks(MIN_PARALLEL_ELEMS))
        .for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x) {
                *y = gelu_value(*x);
            }
        });
    out
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let mut out = par_copy(g);
        gelu_backward_in_place(x, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Reference implementations composed from differentiable candle ops.
    fn layer_norm_ref(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(g)?
            .broadcast_add(b)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without a global RNG.
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let x = ((i as u64 + 1) * 2654435761 + seed * 40503) % 10007;
                (x as f32 / 10007.0 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn layer_norm_matches_the_composed_reference_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[3, 5, 8], 1)).unwrap();
        let g = Var::from_tensor(&(randn(&[8], 2) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[8], 3)).unwrap();
        let w = randn(&[3, 5, 8], 4);
        let fused = layer_norm(&x, &g, &b, 1e-12).unwrap();
        let reference = layer_norm_ref(&x, &g, &b, 1e-12).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-5);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &g, &b] {
            let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        }
    }

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            let e = fast_exp(x);
            assert!(((e - x.exp()) / x.exp()).abs() < 1.5e-7, "exp({x})");
            let erf = candle_core::cpu::erf::erf_f32(x);
            assert!((fast_erf(x) - erf).abs() < 4e-7, "erf({x})");
        }
        assert_eq!(fast_exp(-1e9), 0.0, "no subnormal-producing tails");
        assert_eq!(fast_exp(-87.5), 0.0);
    }

    #[test]
    fn gelu_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[4, 33], 7)).unwrap();
        let fused = gelu(&x).unwrap();
        let reference = x.gelu_erf().unwrap();
        assert!(max_diff(&fused, &reference) < 1e-5);
        let gf = fused.sum_all().unwrap().backward().unwrap();
        let gr = reference.sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-4);
    }

    #[test]
    fn a_product_split_between_threads_gives_the_single_threaded_bits() {
        let values = |n: usize, seed: u64| randn(&[n], seed).to_vec1::<f32>().unwrap();
        // Taller than wide (split by rows), wider than tall (by columns), sums
        // in chunks along k (600), blocks that end in a partial tile;
        // operands plain and transposed.
        for (m, n, k) in [(301, 40, 70), (37, 290, 65), (200, 200, 600)] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true)] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                let a_strides = if a_t { (1, m) } else { (k, 1) };
                let b_strides = if b_t { (1, k) } else { (n, 1) };
                let start = values(m * n, 3);
                let product = |parallelism| {
                    let mut c = start.clone();
                    matmul(
                        (m, n, k),
                        &a,
                        a_strides,
                        &b,
                        b_strides,
                        &mut c,
                        true,
                        0.5,
                        parallelism,
                    );
                    c
                };
                let single = product(Parallelism::None);
                // A naive product, to show the split computes the right thing.
                let (a_rs, a_cs) = a_strides;
                let (b_rs, b_cs) = b_strides;
                for (i, j) in [(0, 0), (m - 1, n - 1), (m / 2, n / 3)] {
                    let dot: f32 = (0..k)
                        .map(|p| a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs])
                        .sum();
                    let want = start[i * n + j] + 0.5 * dot;
                    assert!(
                        (single[i * n + j] - want).abs() < 1e-3,
                        "{m}x{n}x{k} ({i},{j})"
                    );
                }
                for threads in [2, 3] {
                    let split = product(Parallelism::Rayon(threads));
                    let same = single
                        .iter()
                        .zip(&split)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{m}x{n}x{k} a_t {a_t} b_t {b_t} over {threads} threads"
                    );
                }
            }
        }
    }
}
