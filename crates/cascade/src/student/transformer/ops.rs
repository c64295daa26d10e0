//! Fused CPU kernels with analytic backward passes for the encoder.
//!
//! candle 0.11's `LayerNorm` and `softmax_last_dim` take fused paths that have
//! no backward, so gradients silently stop there (upstream issues #3011, #2168);
//! composing them from small ops trains but is slow. These ops are fused in both
//! directions. All take f32 tensors and work on the last dimension.

use candle_core::cpu::erf::erf_f32;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Rows per parallel task: small rows are batched so threads get real work.
const MIN_PARALLEL_ELEMS: usize = 1 << 14;

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => bail!("fused ops support f32 only"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused ops need contiguous inputs"),
    }
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

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
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
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * rows_per_task(d))
            .zip(x.par_chunks(d * rows_per_task(d)))
            .for_each(|(out, x)| {
                for (y, row) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = row_stats(row, self.eps);
                    for i in 0..d {
                        y[i] = (row[i] - mean) * rstd * gamma[i] + beta[i];
                    }
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
        let chunk = d * rows_per_task(d);
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx_all, param_grads) = out.split_at_mut(rows * d);
        let partials: Vec<Vec<f32>> = dx_all
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(grad.par_chunks(chunk)))
            .map(|(dx, (x, grad))| {
                // dgamma then dbeta for this block of rows.
                let mut partial = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                for ((dx, row), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(grad.chunks(d)) {
                    let (mean, rstd) = row_stats(row, self.eps);
                    let (mut mean_dxhat, mut mean_dxhat_xhat) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (row[i] - mean) * rstd;
                        let dxhat = g[i] * gamma[i];
                        mean_dxhat += dxhat;
                        mean_dxhat_xhat += dxhat * xhat[i];
                        partial[i] += g[i] * xhat[i];
                        partial[d + i] += g[i];
                    }
                    mean_dxhat /= d as f32;
                    mean_dxhat_xhat /= d as f32;
                    for i in 0..d {
                        let dxhat = g[i] * gamma[i];
                        dx[i] = rstd * (dxhat - mean_dxhat - xhat[i] * mean_dxhat_xhat);
                    }
                }
                partial
            })
            .collect();
        for partial in partials {
            for (total, p) in param_grads.iter_mut().zip(partial) {
                *total += p;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// Softmax over the last dimension of `scores` after adding `mask_bias`, a
/// `(batch, keys)` tensor broadcast over every row of the same batch element
/// (0 for real tokens, a large negative number for padding). The mask gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op2(&mask_bias.contiguous()?, MaskedSoftmax)
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (scores, mask) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let dims = l1.dims();
        let keys = dims[dims.len() - 1];
        let batch = dims[0];
        if mask.len() != batch * keys {
            bail!("masked softmax: mask must be (batch, keys)");
        }
        let rows_per_batch = scores.len() / (batch * keys);
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(keys)
            .zip(scores.par_chunks(keys))
            .enumerate()
            .for_each(|(row_index, (y, x))| {
                let m = &mask[(row_index / rows_per_batch) * keys..][..keys];
                let mut max = f32::NEG_INFINITY;
                for i in 0..keys {
                    y[i] = x[i] + m[i];
                    max = max.max(y[i]);
                }
                let mut sum = 0f32;
                for v in y.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?;
        Ok((Some(dx), None))
    }
}

/// dx = y · (g − Σ g·y), row by row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let dims = l1.dims();
        let keys = dims[dims.len() - 1];
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(keys)
            .zip(y.par_chunks(keys).zip(g.par_chunks(keys)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for i in 0..keys {
                    dx[i] = y[i] * (g[i] - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU with the exact erf, as BERT uses.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn gelu_derivative(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(MIN_PARALLEL_ELEMS)
            .zip(x.par_chunks(MIN_PARALLEL_ELEMS))
            .for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y = gelu_value(*x);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
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
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(MIN_PARALLEL_ELEMS)
            .zip(
                x.par_chunks(MIN_PARALLEL_ELEMS)
                    .zip(g.par_chunks(MIN_PARALLEL_ELEMS)),
            )
            .for_each(|(dx, (x, g))| {
                for i in 0..dx.len() {
                    dx[i] = g[i] * gelu_derivative(x[i]);
                }
            });
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
    fn masked_softmax_matches_the_composed_reference() {
        let scores = Var::from_tensor(&randn(&[2, 3, 4, 5], 5)).unwrap();
        let mask = Tensor::new(
            &[[0f32, 0., 0., -1e4, -1e4], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let w = randn(&[2, 3, 4, 5], 6);
        let fused = masked_softmax(&scores, &mask).unwrap();
        let biased = scores
            .broadcast_add(&mask.unsqueeze(1).unwrap().unsqueeze(1).unwrap())
            .unwrap();
        let reference = candle_nn::ops::softmax(&biased, D::Minus1).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-6);
        // Padded keys get no attention.
        let p: Vec<f32> = fused
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(p[3] < 1e-6 && p[4] < 1e-6);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(gf.get(&scores).unwrap(), gr.get(&scores).unwrap()) < 1e-5);
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
}
