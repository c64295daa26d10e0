//! f32 matrix products for CPUs with AVX2 and FMA but no AVX-512.
//!
//! On AVX2 the `gemm` crate's kernel reached 29-31 G multiply-adds/s a core
//! on the encoder's products (AMD EPYC, Zen 3) against 49 for its FMA
//! units alone. This is the classic 6 × 16 register tile (Goto/BLIS): twelve
//! accumulators, two loads and six broadcasts for twelve FMAs, the k loop
//! unrolled by four, and the C tile prefetched when the tile starts, so its
//! cache misses overlap the products instead of stalling the stores.
//!
//! It gives `gemm`'s bits: every element is one FMA chain along k from zero,
//! k is cut into the blocks `gemm` cuts it into (`kernel_params`), and each
//! block is added as `gemm` adds it (`alpha·sum`, or `fma(alpha, sum, c)`
//! into earlier blocks or kept output). So it changed no embedding, loss or
//! decision that `gemm` gave before (`tests::gives_gemms_bits`). CPUs with
//! AVX-512 keep `gemm`'s AVX-512 kernels.

/// Rows and columns of the register tile.
const MR: usize = 6;
const NR: usize = 16;
/// Rows of A packed per block: 120 × 512 floats (240 KB) stay in a 512 KB L2.
const MC: usize = 120;
/// `gemm`'s AVX2 f32 tile (rows × columns in its orientation), which sets
/// its k blocks through `kernel_params`.
const GEMM_MR: usize = 16;
const GEMM_NR: usize = 6;

/// Whether products of this shape take this path: the CPU has AVX2 and FMA
/// and no AVX-512, and the shape is one `gemm` runs through its blocked
/// kernel (it takes other paths for k ≤ 2, vectors and tiny products). Under
/// 64 columns packing A costs as much as the products (attention's P · V,
/// 256 × 32 × 256: 1.4× gemm's time, which reads A in place), so those stay
/// with gemm.
pub(crate) fn applies(m: usize, n: usize, k: usize) -> bool {
    shape_fits(m, n, k) && cpu_has_path()
}

fn shape_fits(m: usize, n: usize, k: usize) -> bool {
    m >= 16 && n >= 64 && m.max(n) > 64 && k >= 16
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn cpu_has_path() -> bool {
    static NO_AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NO_AVX512.get_or_init(|| !std::is_x86_feature_detected!("avx512f"))
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn cpu_has_path() -> bool {
    false
}

/// `gemm`'s length of a k block for a product of depth `k`.
pub(crate) fn k_block(m: usize, n: usize, k: usize) -> usize {
    gemm_common::cache::kernel_params(n, m, k, GEMM_MR, GEMM_NR, std::mem::size_of::<f32>()).kc
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
pub(crate) use avx2::product;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{k_block, MC, MR, NR};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// A cache line of floats, so packed panels load aligned.
    #[repr(align(64))]
    #[derive(Clone, Copy)]
    struct Line(#[allow(dead_code)] [f32; 16]);

    thread_local! {
        /// Packed B (one k block, every column panel) and packed A (one row
        /// block), kept per thread between calls.
        static PACKED: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    fn floats(buffer: &mut Vec<Line>, len: usize) -> *mut f32 {
        let lines = len.div_ceil(16);
        if buffer.len() < lines {
            *buffer = vec![Line([0.0; 16]); lines];
        }
        buffer.as_mut_ptr().cast()
    }

    /// `c (m × n, rows c_rs apart) = [c +] alpha · a · b`, one thread; a's
    /// element (i, p) at `a[i·a_rs + p·a_cs]`, b's (p, j) at `b[p·b_rs + j·b_cs]`.
    ///
    /// # Safety
    /// Every element of a, b and c so addressed is inside its buffer, c does
    /// not overlap a or b, and no other thread touches c's block meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn product(
        (m, n, k): (usize, usize, usize),
        a: *const f32,
        (a_rs, a_cs): (usize, usize),
        b: *const f32,
        (b_rs, b_cs): (usize, usize),
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
        alpha: f32,
    ) {
        let kc_max = k_block(m, n, k);
        let panels = n.div_ceil(NR);
        PACKED.with(|packed| {
            let (packed_b, packed_a) = &mut *packed.borrow_mut();
            let packed_b = floats(packed_b, panels * NR * kc_max);
            let packed_a = floats(packed_a, MC.div_ceil(MR) * MR * kc_max);
            let mut depth = 0;
            while depth < k {
                let kc = kc_max.min(k - depth);
                // Blocks after the first add to what the first wrote.
                let add = accumulate || depth > 0;
                // Safety: the caller's bounds cover rows/columns < m, n and
                // depths < k; the packed buffers hold panels·NR·kc_max and
                // MC·kc_max floats.
                unsafe {
                    pack::<NR>(b.add(depth * b_rs), (b_cs, b_rs), n, kc, packed_b);
                    let mut row = 0;
                    while row < m {
                        let rows = MC.min(m - row);
                        pack::<MR>(
                            a.add(row * a_rs + depth * a_cs),
                            (a_rs, a_cs),
                            rows,
                            kc,
                            packed_a,
                        );
                        block(
                            rows,
                            n,
                            kc,
                            packed_a,
                            packed_b,
                            c.add(row * c_rs),
                            c_rs,
                            add,
                            alpha,
                        );
                        row += rows;
                    }
                }
                depth += kc;
            }
        });
    }

    /// Panels of `WIDTH` lanes, k-major: element (lane, p) of the source is
    /// at `src[lane·lane_stride + p·k_stride]`, and lanes past `lanes` are
    /// zeros. B packs its columns (lane stride b_cs, k stride b_rs), A its
    /// rows (a_rs, a_cs).
    unsafe fn pack<const WIDTH: usize>(
        src: *const f32,
        (lane_stride, k_stride): (usize, usize),
        lanes: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        unsafe {
            for panel in 0..lanes.div_ceil(WIDTH) {
                let first = panel * WIDTH;
                let used = WIDTH.min(lanes - first);
                let dst = dst.add(panel * WIDTH * kc);
                for p in 0..kc {
                    let from = src.add(first * lane_stride + p * k_stride);
                    let to = dst.add(p * WIDTH);
                    if lane_stride == 1 && used == WIDTH {
                        std::ptr::copy_nonoverlapping(from, to, WIDTH);
                    } else {
                        for lane in 0..WIDTH {
                            *to.add(lane) = if lane < used {
                                *from.add(lane * lane_stride)
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }

    /// One packed row block against every packed column panel.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        m: usize,
        n: usize,
        kc: usize,
        packed_a: *const f32,
        packed_b: *const f32,
        c: *mut f32,
        c_rs: usize,
        add: bool,
        alpha: f32,
    ) {
        unsafe {
            for panel in 0..n.div_ceil(NR) {
                let first_col = panel * NR;
                let cols = NR.min(n - first_col);
                let b = packed_b.add(panel * NR * kc);
                for row_panel in 0..m.div_ceil(MR) {
                    let first_row = row_panel * MR;
                    let rows = MR.min(m - first_row);
                    let a = packed_a.add(row_panel * MR * kc);
                    let c = c.add(first_row * c_rs + first_col);
                    if rows == MR && cols == NR {
                        tile(kc, a, b, c, c_rs, add, alpha);
                    } else {
                        // Edge tiles go through a full tile on the stack.
                        let mut edge = [0.0f32; MR * NR];
                        if add {
                            for i in 0..rows {
                                for j in 0..cols {
                                    edge[i * NR + j] = *c.add(i * c_rs + j);
                                }
                            }
                        }
                        tile(kc, a, b, edge.as_mut_ptr(), NR, add, alpha);
                        for i in 0..rows {
                            for j in 0..cols {
                                *c.add(i * c_rs + j) = edge[i * NR + j];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The 6 × 16 register tile over one k block: `c = alpha·sum` or
    /// `c = fma(alpha, sum, c)`, as `gemm` stores a block.
    #[inline(always)]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        add: bool,
        alpha: f32,
    ) {
        unsafe {
            for i in 0..MR {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs).cast());
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs + NR - 1).cast());
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let (mut a, mut b) = (a, b);
            macro_rules! step {
                ($p:expr) => {{
                    let b0 = _mm256_load_ps(b.add($p * NR));
                    let b1 = _mm256_load_ps(b.add($p * NR + 8));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*a.add($p * MR + i));
                        acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                    }
                }};
            }
            let mut p = 0;
            while p + 4 <= kc {
                step!(0);
                step!(1);
                step!(2);
                step!(3);
                a = a.add(4 * MR);
                b = b.add(4 * NR);
                p += 4;
            }
            while p < kc {
                step!(0);
                a = a.add(MR);
                b = b.add(NR);
                p += 1;
            }
            let alpha = _mm256_set1_ps(alpha);
            for (i, acc) in acc.iter().enumerate() {
                let row = c.add(i * c_rs);
                for (half, &sum) in acc.iter().enumerate() {
                    let out = row.add(half * 8);
                    let value = if add {
                        _mm256_fmadd_ps(alpha, sum, _mm256_loadu_ps(out))
                    } else {
                        _mm256_mul_ps(alpha, sum)
                    };
                    _mm256_storeu_ps(out, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm_product;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 1.7)
            .collect()
    }

    /// The order the kernel promises, one element at a time: an FMA chain
    /// from zero along each k block, the block added as `alpha·sum` (the
    /// first, output not kept) or `fma(alpha, sum, c)`.
    #[allow(clippy::too_many_arguments)]
    fn in_gemms_order(
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
        let kc = k_block(m, n, k);
        for i in 0..m {
            for j in 0..n {
                let mut depth = 0;
                while depth < k {
                    let end = k.min(depth + kc);
                    let sum = (depth..end).fold(0.0f32, |sum, p| {
                        a[i * a_rs + p * a_cs].mul_add(b[p * b_rs + j * b_cs], sum)
                    });
                    let out = &mut c[i * c_rs + j];
                    *out = if accumulate || depth > 0 {
                        alpha.mul_add(sum, *out)
                    } else {
                        alpha * sum
                    };
                    depth = end;
                }
            }
        }
    }

    /// Over the encoder's shapes and their edges (rows and columns off the
    /// tile, k blocks, both operand layouts, kept output, a scale, an output
    /// wider than the product): the kernel sums in the order above, and
    /// where it runs (AVX2 without AVX-512, where `gemm` runs its AVX2
    /// kernel) that order gives `gemm`'s bits. On an AVX-512 CPU `gemm`
    /// blocks and sums its own way and keeps every product.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn gives_gemms_bits() {
        let shapes = [
            (96, 64, 32),
            (131, 384, 384),
            (257, 1152, 384),
            (100, 384, 1536),
            (384, 77, 1100),
            (128, 128, 32),
            (200, 32, 256),
            (70, 19, 17),
        ];
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    for (accumulate, alpha) in
                        [(false, 1.0), (true, 1.0), (false, 0.17677669), (true, -0.3)]
                    {
                        let a = values(m * k, case);
                        let b = values(k * n, case + 1);
                        let a_strides = if a_t { (1, m) } else { (k, 1) };
                        let b_strides = if b_t { (1, k) } else { (n, 1) };
                        let c_rs = n + 3;
                        let start = values(m * c_rs, case + 2);
                        let mut ours = start.clone();
                        let mut ordered = start.clone();
                        let mut theirs = start.clone();
                        in_gemms_order(
                            (m, n, k),
                            &a,
                            a_strides,
                            &b,
                            b_strides,
                            &mut ordered,
                            c_rs,
                            accumulate,
                            alpha,
                        );
                        gemm_product(
                            (m, n, k),
                            &a,
                            a_strides,
                            &b,
                            b_strides,
                            &mut theirs,
                            c_rs,
                            accumulate,
                            alpha,
                        );
                        unsafe {
                            product(
                                (m, n, k),
                                a.as_ptr(),
                                a_strides,
                                b.as_ptr(),
                                b_strides,
                                ours.as_mut_ptr(),
                                c_rs,
                                accumulate,
                                alpha,
                            )
                        };
                        let same = |other: &[f32]| {
                            ours.iter()
                                .zip(other)
                                .all(|(x, y)| x.to_bits() == y.to_bits())
                        };
                        let case = format!(
                            "{m}×{n}×{k}, a transposed {a_t}, b transposed {b_t}, accumulate {accumulate}, alpha {alpha}"
                        );
                        assert!(same(&ordered), "not in gemm's order: {case}");
                        if cpu_has_path() {
                            assert!(same(&theirs), "not gemm's bits: {case}");
                        }
                        // Columns past n are never written.
                        for i in 0..m {
                            assert_eq!(
                                ours[i * c_rs + n..i * c_rs + c_rs],
                                start[i * c_rs + n..i * c_rs + c_rs]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_products_stay_with_gemm() {
        assert!(shape_fits(4096, 384, 384));
        assert!(shape_fits(128, 576, 384));
        assert!(!shape_fits(64, 64, 384));
        assert!(!shape_fits(4096, 8, 384));
        assert!(!shape_fits(4096, 384, 2));
        assert!(!shape_fits(256, 32, 256));
    }
}
