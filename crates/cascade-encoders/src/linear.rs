//! A fused dense layer, `x · Wᵀ + b`: the output rows start as the bias and
//! gemm accumulates the product onto them, so the output is written once.
//! candle's `matmul` then `broadcast_add` writes it, reads it and writes a
//! second tensor (5% of a MiniLM forward pass).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use rayon::prelude::*;

use super::ops::{column_sums, f32_slice, gelu_in_place, matmul, par_repeat_rows};

/// `x (rows, in)`, `weight (out, in)` as checkpoints store it, `bias (out)` → `(rows, out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

/// `x · wᵀ + b` (then GELU in place with `gelu`) over the rows of `x`
/// (`rows × inner`), `w` `out × inner`: the dense layer every f32 path uses.
pub(crate) fn dense(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (inner, out): (usize, usize),
    gelu: bool,
) -> Vec<f32> {
    let rows = x.len().checked_div(inner).unwrap_or(0);
    let mut y = par_repeat_rows(b, rows);
    if rows > 0 && out > 0 && inner > 0 {
        // y += x · wᵀ: wᵀ is w read with swapped strides.
        let threads = rayon::current_num_threads();
        // Few rows: each thread multiplies its own rows, single-threaded.
        // gemm's own split packs the activations (a strided gather, 26% of
        // a 1×128 forward pass on AVX-512) for every column block it hands
        // out; this packs each row once. Otherwise one call, which `matmul`
        // splits between the threads by rows.
        let (per_call, parallelism) = if rows <= SPLIT_ROWS_UP_TO && threads > 1 {
            (rows.div_ceil(threads), Parallelism::None)
        } else {
            (rows, Parallelism::Rayon(threads))
        };
        y.par_chunks_mut(per_call * out)
            .zip(x.par_chunks(per_call * inner))
            .for_each(|(y, x)| {
                matmul(
                    (x.len() / inner, out, inner),
                    x,
                    (inner, 1),
                    w,
                    (1, inner),
                    y,
                    true,
                    1.0,
                    parallelism,
                )
            });
    }
    if gelu {
        y.par_chunks_mut(1 << 14).for_each(gelu_in_place);
    }
    y
}

/// The gradients of `y = x · wᵀ + b` given `dy`: `dx` (added to what it
/// holds with `accumulate_dx`), and `dw`, `db` overwritten, each where asked.
pub(crate) fn dense_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (inner, out): (usize, usize),
    dx: Option<(&mut [f32], bool)>,
    params: Option<(&mut [f32], &mut [f32])>,
) {
    let rows = dy.len() / out;
    if rows == 0 || inner == 0 || out == 0 {
        return;
    }
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    if let Some((dx, accumulate)) = dx {
        // dx = dy · w
        matmul(
            (rows, inner, out),
            dy,
            (out, 1),
            w,
            (inner, 1),
            dx,
            accumulate,
            1.0,
            threads,
        );
    }
    if let Some((dw, db)) = params {
        // dw = dyᵀ · x
        matmul(
            (out, inner, rows),
            dy,
            (1, out),
            x,
            (inner, 1),
            dw,
            false,
            1.0,
            threads,
        );
        column_sums(dy, out, db);
    }
}

/// Up to this many rows, each thread multiplies its own rows whatever the
/// output's width (measured on AVX-512 against gemm's own split: 1×128 tokens
/// 0.90×, 4×128 0.96×, 8×128 0.92×, 2×256 no change). Longer products go
/// through `matmul`'s split, which takes rows or columns, whichever is longer.
const SPLIT_ROWS_UP_TO: usize = 1024;

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (x, w, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (rows, inner) = l1.shape().dims2()?;
        let (out, w_inner) = l2.shape().dims2()?;
        if w_inner != inner || b.len() != out {
            bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = dense(x, w, b, (inner, out), false);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Frozen weights are no variables; skip their (rows-sized) products.
        let dx = x.track_op().then(|| grad.matmul(weight)).transpose()?;
        let dw = weight.track_op().then(|| grad.t()?.matmul(x)).transpose()?;
        // Column sums as a gemm: candle's sum over dim 0 walks the rows with a
        // stride and cost 7% of a training step.
        let db = bias
            .track_op()
            .then(|| {
                let ones = Tensor::ones((1, grad.dim(0)?), grad.dtype(), grad.device())?;
                ones.matmul(grad)?.squeeze(0)
            })
            .transpose()?;
        Ok((dx, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(shape: (usize, usize), seed: u32) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u32 * 2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_matmul_plus_bias_forward_and_backward() {
        let x = Var::from_tensor(&values((37, 19), 1)).unwrap();
        let w = Var::from_tensor(&values((23, 19), 2)).unwrap();
        let b = Var::from_tensor(&values((1, 23), 3).flatten_all().unwrap()).unwrap();
        let up = values((37, 23), 4);

        let fused = linear(&x, &w, &b).unwrap();
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff = (&fused - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);

        let g_fused = (fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (reference * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &w, &b] {
            let (a, r) = (g_fused.get(var).unwrap(), g_ref.get(var).unwrap());
            let diff = (a - r).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }

    #[test]
    fn frozen_weights_get_no_gradient_but_inputs_do() {
        let x = Var::from_tensor(&values((5, 4), 1)).unwrap();
        let w = values((3, 4), 2);
        let b = values((1, 3), 3).flatten_all().unwrap();
        let grads = linear(&x, &w, &b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        assert!(grads.get(&x).is_some());
    }
}
