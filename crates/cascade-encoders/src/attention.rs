//! Fused multi-head attention: `softmax(scale·Q·Kᵀ + mask)·V`, one (batch,
//! head) pair per task, each with single-threaded gemm calls on blocks that
//! stay in cache. The scores are never materialised as a tensor; the backward
//! pass recomputes them per head (as flash attention does) instead of storing them.
//!
//! candle's batched matmul calls a multi-threaded gemm per head, whose thread
//! start-up dominates at these sizes (26 GFLOP/s for Q·Kᵀ at seq 256), and
//! then writes and re-reads a `(batch, heads, seq, seq)` score tensor.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::ops::{dot, f32_slice, matmul, softmax_in_place};

/// Each (batch, head) pair is one Rayon task, so its gemm calls stay single-threaded.
const SERIAL: Parallelism = Parallelism::None;

/// `q, k, v`: `(batch, heads, seq, head_dim)`; `mask_bias`: `(batch, seq)`,
/// added to every query's scores (0 for tokens, very negative for padding);
/// `position_bias`: an optional constant added to each head's scores (MPNet's
/// relative positions). It gets no gradient.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    position_bias: Option<&PositionBias>,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, seq, _dim) = q.dims4()?;
    if mask_bias.dims() != [batch, seq] || k.dims() != q.dims() || v.dims() != q.dims() {
        bail!("attention: q, k, v must share (batch, heads, seq, dim) and mask be (batch, seq)");
    }
    if position_bias.is_some_and(|b| (b.heads, b.seq) != (heads, seq)) {
        bail!("attention: the position bias must be (heads, seq, seq)");
    }
    let mask: Vec<f32> = mask_bias.flatten_all()?.to_vec1()?;
    let op = Attention {
        mask: Arc::new(mask),
        position_bias: position_bias.map(|b| b.values.clone()),
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// A `(heads, seq, seq)` bias on the attention scores, built once per forward
/// pass and shared by every layer without copying.
#[derive(Clone)]
pub struct PositionBias {
    values: Arc<Vec<f32>>,
    heads: usize,
    seq: usize,
}

impl PositionBias {
    /// `values` in `(heads, seq, seq)` order.
    pub fn new(values: Vec<f32>, heads: usize, seq: usize) -> Result<Self> {
        if values.len() != heads * seq * seq {
            bail!(
                "position bias: {} values for ({heads}, {seq}, {seq})",
                values.len()
            );
        }
        Ok(Self {
            values: Arc::new(values),
            heads,
            seq,
        })
    }
}

struct Attention {
    mask: Arc<Vec<f32>>,
    position_bias: Option<Arc<Vec<f32>>>,
    scale: f32,
}

/// The `(seq, seq)` position bias of the `i`-th (batch, head) pair, if any.
fn head_bias(bias: &Option<Arc<Vec<f32>>>, i: usize, d: Dims) -> Option<&[f32]> {
    let size = d.seq * d.seq;
    bias.as_ref().map(|b| &b[(i % d.heads) * size..][..size])
}

/// Dimensions of one call: heads per batch element, sequence, head size.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    seq: usize,
    dim: usize,
}

impl Dims {
    fn from(layout: &Layout) -> Result<Self> {
        match layout.dims() {
            &[_, heads, seq, dim] => Ok(Self { heads, seq, dim }),
            _ => bail!("attention expects 4-d tensors"),
        }
    }
    fn block(&self) -> usize {
        self.seq * self.dim
    }
}

/// Scores then probabilities of one head into `p` (seq × seq).
fn probabilities(
    q: &[f32],
    k: &[f32],
    mask: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    d: Dims,
    p: &mut [f32],
) {
    let (s, h) = (d.seq, d.dim);
    // P = scale · Q · Kᵀ
    matmul((s, s, h), q, (h, 1), k, (1, h), p, false, scale, SERIAL);
    for (r, row) in p.chunks_mut(s).enumerate() {
        for (x, m) in row.iter_mut().zip(mask) {
            *x += m;
        }
        if let Some(bias) = bias {
            for (x, b) in row.iter_mut().zip(&bias[r * s..][..s]) {
                *x += b;
            }
        }
        softmax_in_place(row);
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let d = Dims::from(l1)?;
        let (s, h, block) = (d.seq, d.dim, d.block());
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(block).enumerate().for_each_init(
            || vec![0f32; s * s],
            |p, (i, o)| {
                let mask = &self.mask[(i / d.heads) * s..][..s];
                let at = i * block;
                probabilities(
                    &q[at..at + block],
                    &k[at..at + block],
                    mask,
                    head_bias(&self.position_bias, i, d),
                    self.scale,
                    d,
                    p,
                );
                // O = P · V
                matmul(
                    (s, h, s),
                    p,
                    (s, 1),
                    &v[at..at + block],
                    (h, 1),
                    o,
                    false,
                    1.0,
                    SERIAL,
                );
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = AttentionBackward {
            mask: self.mask.clone(),
            position_bias: self.position_bias.clone(),
            scale: self.scale,
            grad: grad.contiguous()?,
        };
        let packed = q.apply_op3_no_bwd(k, v, &backward)?;
        let part = |i| packed.narrow(0, i, 1)?.squeeze(0);
        Ok((Some(part(0)?), Some(part(1)?), Some(part(2)?)))
    }
}

/// Computes `(dQ, dK, dV)` packed as `(3, batch, heads, seq, dim)`.
struct AttentionBackward {
    mask: Arc<Vec<f32>>,
    position_bias: Option<Arc<Vec<f32>>>,
    scale: f32,
    grad: Tensor,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
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
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let g = match &*grad_storage {
            candle_core::Storage::Cpu(storage) => f32_slice(storage, grad_layout)?,
            _ => bail!("attention backward runs on the CPU only"),
        };
        let d = Dims::from(l1)?;
        let (s, h, block) = (d.seq, d.dim, d.block());
        let mut out = vec![0f32; 3 * q.len()];
        let (dq_all, rest) = out.split_at_mut(q.len());
        let (dk_all, dv_all) = rest.split_at_mut(q.len());
        dq_all
            .par_chunks_mut(block)
            .zip(
                dk_all
                    .par_chunks_mut(block)
                    .zip(dv_all.par_chunks_mut(block)),
            )
            .enumerate()
            .for_each_init(
                || (vec![0f32; s * s], vec![0f32; s * s]),
                |(p, dp), (i, (dq, (dk, dv)))| {
                    let mask = &self.mask[(i / d.heads) * s..][..s];
                    let at = i * block;
                    let (q, k, v, g) = (
                        &q[at..at + block],
                        &k[at..at + block],
                        &v[at..at + block],
                        &g[at..at + block],
                    );
                    let bias = head_bias(&self.position_bias, i, d);
                    probabilities(q, k, mask, bias, self.scale, d, p);
                    // dV = Pᵀ · dO
                    matmul((s, h, s), p, (1, s), g, (h, 1), dv, false, 1.0, SERIAL);
                    // dP = dO · Vᵀ
                    matmul((s, s, h), g, (h, 1), v, (1, h), dp, false, 1.0, SERIAL);
                    // dS = P ∘ (dP − rowsum(dP ∘ P)), in place in dp
                    for (dp_row, p_row) in dp.chunks_mut(s).zip(p.chunks(s)) {
                        let total = dot(dp_row, p_row);
                        for (x, pv) in dp_row.iter_mut().zip(p_row) {
                            *x = pv * (*x - total);
                        }
                    }
                    // dQ = scale · dS · K;  dK = scale · dSᵀ · Q
                    matmul(
                        (s, h, s),
                        dp,
                        (s, 1),
                        k,
                        (h, 1),
                        dq,
                        false,
                        self.scale,
                        SERIAL,
                    );
                    matmul(
                        (s, h, s),
                        dp,
                        (1, s),
                        q,
                        (h, 1),
                        dk,
                        false,
                        self.scale,
                        SERIAL,
                    );
                },
            );
        let dims = l1.dims();
        Ok((
            CpuStorage::F32(out),
            Shape::from((3, dims[0], dims[1], dims[2], dims[3])),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn values(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                ((((i as u64 + 3) * 2654435761 + seed * 97) % 1009) as f32 / 1009.0 - 0.5) * 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        position_bias: Option<&Tensor>,
        scale: f64,
    ) -> Tensor {
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(bias) = position_bias {
            scores = scores.broadcast_add(bias).unwrap();
        }
        let mask = mask.unsqueeze(1).unwrap().unsqueeze(1).unwrap();
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        p.matmul(v).unwrap()
    }

    #[test]
    fn matches_the_composed_reference_forward_and_backward() {
        check_against_reference(None);
    }

    #[test]
    fn a_position_bias_matches_the_composed_reference() {
        let bias = values(&[3, 5, 5], 5);
        check_against_reference(Some(&bias));
    }

    /// `position_bias` as a `(heads, seq, seq)` tensor, for the reference.
    fn check_against_reference(position_bias: Option<&Tensor>) {
        let shape = [2, 3, 5, 4];
        let (q, k, v) = (
            Var::from_tensor(&values(&shape, 1)).unwrap(),
            Var::from_tensor(&values(&shape, 2)).unwrap(),
            Var::from_tensor(&values(&shape, 3)).unwrap(),
        );
        let mask = Tensor::new(
            &[[0f32, 0., 0., -1e9, -1e9], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let w = values(&shape, 4);
        let fused_bias = position_bias
            .map(|b| PositionBias::new(b.flatten_all().unwrap().to_vec1().unwrap(), 3, 5).unwrap());
        let fused = attention(&q, &k, &v, &mask, fused_bias.as_ref(), 0.5).unwrap();
        let expected = reference(&q, &k, &v, &mask, position_bias, 0.5);
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&fused, &expected) < 1e-5);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let ge = (expected * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for x in [&q, &k, &v] {
            let d = diff(gf.get(x).unwrap(), ge.get(x).unwrap());
            assert!(d < 1e-5, "gradient differs by {d}");
        }
        // Padded keys (positions 3, 4 of batch 0) get no gradient through k and v.
        let dk = gf.get(&k).unwrap().get(0).unwrap();
        let padded = dk
            .narrow(1, 3, 2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(padded.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn masked_keys_get_exactly_zero_weight() {
        // A padded value of 1e38 shows any leftover weight: e^-87 ≈ 1.6e-38
        // times 1e38 is 1.6, far from 0. Such tiny weights are also what made
        // padded backward passes crawl through subnormal arithmetic.
        let shape = [1, 1, 3, 2];
        let (q, k) = (values(&shape, 1), values(&shape, 2));
        let v = Tensor::new(&[[[[1f32, 1.], [1., 1.], [1e38, 1e38]]]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., -1e9]], &Device::Cpu).unwrap();
        let out: Vec<f32> = attention(&q, &k, &v, &mask, None, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for x in out {
            assert!((x - 1.0).abs() < 1e-6, "masked value leaked: {x}");
        }
    }
}
