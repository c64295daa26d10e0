//! Fused multi-head attention: `softmax(scale·Q·Kᵀ + mask)·V`, one (batch,
//! head) pair per task, each with single-threaded gemm calls on blocks that
//! stay in cache. Without gradients the scores are never materialised as a
//! tensor. A training layer keeps each head's probabilities for its backward
//! pass (`forward_keeping`, 25 MB a MiniLM layer at 8×256 tokens, as PyTorch
//! keeps them); the standalone op's backward recomputes them per head, as
//! flash attention does.
//!
//! Q, K and V come packed as the rows of one `x · [Wq; Wk; Wv]ᵀ` product and
//! the context goes out as `(batch·seq, hidden)` rows: each head reads and
//! writes its columns in place through gemm's strides, so no tensor is
//! transposed into `(batch, heads, seq, dim)` and back (four copies a layer).
//!
//! candle's batched matmul calls a multi-threaded gemm per head, whose thread
//! start-up dominates at these sizes (26 GFLOP/s for Q·Kᵀ at seq 256), and
//! then writes and re-reads a `(batch, heads, seq, seq)` score tensor.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::ops::{
    dot, f32_slice, masked_softmax_in_place, matmul, matmul_into, par_zeros, SharedOut,
};

/// Each (batch, head) pair is one Rayon task, so its gemm calls stay single-threaded.
const SERIAL: Parallelism = Parallelism::None;

/// `qkv`: `(batch·seq, 3·hidden)`, each row the token's query, key and value,
/// heads side by side within each; `mask_bias`: `(batch, seq)`, added to
/// every query's scores (0 for tokens, very negative for padding);
/// `position_bias`: an optional constant added to each head's scores (MPNet's
/// relative positions), with no gradient. Returns the context `(batch·seq, hidden)`.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    mask_bias: &Tensor,
    position_bias: Option<&PositionBias>,
    scale: f64,
) -> Result<Tensor> {
    let (batch, seq) = mask_bias.dims2()?;
    let (rows, width) = qkv.dims2()?;
    if rows != batch * seq || heads == 0 || width % (3 * heads) != 0 {
        bail!(
            "attention: qkv {:?} is not (batch·seq, 3·hidden) for mask {:?} and {heads} heads",
            qkv.dims(),
            mask_bias.dims()
        );
    }
    if position_bias.is_some_and(|b| (b.heads, b.seq) != (heads, seq)) {
        bail!("attention: the position bias must be (heads, seq, seq)");
    }
    let mask: Vec<f32> = mask_bias.flatten_all()?.to_vec1()?;
    let op = Attention::new(
        (batch, seq, heads, width / 3 / heads),
        Arc::new(mask),
        position_bias,
        scale,
    );
    qkv.contiguous()?.apply_op1(op)
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

/// One attention over packed q|k|v rows: its shape, mask, position bias and
/// scale. The fused layer (`layer.rs`) calls its passes directly.
#[derive(Clone)]
pub(crate) struct Attention {
    mask: Arc<Vec<f32>>,
    position_bias: Option<Arc<Vec<f32>>>,
    scale: f32,
    dims: Dims,
}

/// Where one (batch, head) pair's blocks sit in the packed rows.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    seq: usize,
    dim: usize,
}

impl Dims {
    fn hidden(&self) -> usize {
        self.heads * self.dim
    }
    fn pairs(&self) -> usize {
        self.batch * self.heads
    }
    /// Row stride of the packed q|k|v rows.
    fn qkv_stride(&self) -> usize {
        3 * self.hidden()
    }
    /// First element of pair `i`'s query block; its key and value blocks
    /// start `hidden` and `2·hidden` further on.
    fn q_at(&self, i: usize) -> usize {
        let (b, head) = (i / self.heads, i % self.heads);
        b * self.seq * self.qkv_stride() + head * self.dim
    }
    /// First element of pair `i`'s block in a `(batch·seq, hidden)` tensor.
    fn out_at(&self, i: usize) -> usize {
        let (b, head) = (i / self.heads, i % self.heads);
        b * self.seq * self.hidden() + head * self.dim
    }
    /// Pair `i`'s query, key and value blocks (each read with row stride `qkv_stride`).
    fn qkv_blocks<'a>(&self, qkv: &'a [f32], i: usize) -> [&'a [f32]; 3] {
        let at = self.q_at(i);
        let h = self.hidden();
        [&qkv[at..], &qkv[at + h..], &qkv[at + 2 * h..]]
    }
}

impl Attention {
    /// `(batch, seq, heads, head_dim)`; `mask`: `(batch, seq)` values added to
    /// every query's scores; `position_bias` as in `attention`.
    pub(crate) fn new(
        (batch, seq, heads, dim): (usize, usize, usize, usize),
        mask: Arc<Vec<f32>>,
        position_bias: Option<&PositionBias>,
        scale: f64,
    ) -> Self {
        Self {
            mask,
            position_bias: position_bias.map(|b| b.values.clone()),
            scale: scale as f32,
            dims: Dims {
                batch,
                heads,
                seq,
                dim,
            },
        }
    }

    /// The context `(batch·seq, hidden)` of packed `qkv` rows.
    pub(crate) fn forward(&self, qkv: &[f32]) -> Vec<f32> {
        self.context(qkv, false).0
    }

    /// As `forward`, and every pair's probabilities (`pairs × seq × seq`),
    /// which spare the backward pass recomputing them.
    pub(crate) fn forward_keeping(&self, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (context, probabilities) = self.context(qkv, true);
        (context, probabilities.unwrap_or_default())
    }

    fn context(&self, qkv: &[f32], keep: bool) -> (Vec<f32>, Option<Vec<f32>>) {
        let d = self.dims;
        let (s, h, rows) = (d.seq, d.dim, d.batch * d.seq);
        let mut out = par_zeros(rows * d.hidden());
        let shared = SharedOut::new(&mut out);
        let pair = |i: usize, p: &mut [f32]| {
            let [_, _, v] = self.pair_probabilities(qkv, i, p);
            // O = P · V, into this head's columns of the context rows.
            // Safety: each pair writes only its own (rows, columns) block.
            unsafe {
                matmul_into(
                    (s, h, s),
                    p,
                    (s, 1),
                    v,
                    (d.qkv_stride(), 1),
                    shared,
                    (d.out_at(i), d.hidden()),
                    false,
                    1.0,
                    SERIAL,
                )
            };
        };
        let kept = if keep {
            let mut all = par_zeros(d.pairs() * s * s);
            all.par_chunks_mut(s * s)
                .enumerate()
                .for_each(|(i, p)| pair(i, p));
            Some(all)
        } else {
            (0..d.pairs())
                .into_par_iter()
                .for_each_init(|| vec![0f32; s * s], |p, i| pair(i, p));
            None
        };
        (out, kept)
    }

    /// The gradient of the packed `qkv` rows, `(dQ | dK | dV)`, given the
    /// context's gradient `g`; the probabilities are recomputed unless the
    /// forward pass kept them (`forward_keeping`: the same bits either way).
    pub(crate) fn backward(&self, qkv: &[f32], g: &[f32], kept: Option<&[f32]>) -> Vec<f32> {
        let attention = self;
        let d = attention.dims;
        let (s, h, stride, hidden) = (d.seq, d.dim, d.qkv_stride(), d.hidden());
        let mut out = par_zeros(qkv.len());
        let shared = SharedOut::new(&mut out);
        (0..d.pairs()).into_par_iter().for_each_init(
            || (vec![0f32; s * s], vec![0f32; s * s]),
            |(scratch, dp), i| {
                let (p, [q, k, v]): (&[f32], _) = match kept {
                    Some(all) => (&all[i * s * s..][..s * s], d.qkv_blocks(qkv, i)),
                    None => {
                        let blocks = attention.pair_probabilities(qkv, i, scratch);
                        (scratch, blocks)
                    }
                };
                let g = &g[d.out_at(i)..];
                let (dq_at, dk_at, dv_at) = (d.q_at(i), d.q_at(i) + hidden, d.q_at(i) + 2 * hidden);
                // Safety (every matmul_into below): each pair writes only its
                // own (rows, columns) blocks of dQ, dK and dV.
                // dV = Pᵀ · dO
                unsafe {
                    matmul_into(
                        (s, h, s),
                        p,
                        (1, s),
                        g,
                        (hidden, 1),
                        shared,
                        (dv_at, stride),
                        false,
                        1.0,
                        SERIAL,
                    )
                };
                // dP = dO · Vᵀ
                matmul(
                    (s, s, h),
                    g,
                    (hidden, 1),
                    v,
                    (1, stride),
                    dp,
                    false,
                    1.0,
                    SERIAL,
                );
                // dS = P ∘ (dP − rowsum(dP ∘ P)), in place in dp
                for (dp_row, p_row) in dp.chunks_mut(s).zip(p.chunks(s)) {
                    let total = dot(dp_row, p_row);
                    for (x, pv) in dp_row.iter_mut().zip(p_row) {
                        *x = pv * (*x - total);
                    }
                }
                // dQ = scale · dS · K;  dK = scale · dSᵀ · Q
                unsafe {
                    matmul_into(
                        (s, h, s),
                        dp,
                        (s, 1),
                        k,
                        (stride, 1),
                        shared,
                        (dq_at, stride),
                        false,
                        attention.scale,
                        SERIAL,
                    );
                    matmul_into(
                        (s, h, s),
                        dp,
                        (1, s),
                        q,
                        (stride, 1),
                        shared,
                        (dk_at, stride),
                        false,
                        attention.scale,
                        SERIAL,
                    );
                };
            },
        );
        out
    }
    /// Pair `i`'s probabilities into `p` (seq × seq), as both passes need
    /// them; returns the pair's query, key and value blocks.
    fn pair_probabilities<'a>(&self, qkv: &'a [f32], i: usize, p: &mut [f32]) -> [&'a [f32]; 3] {
        let d = self.dims;
        let [q, k, v] = d.qkv_blocks(qkv, i);
        let mask = &self.mask[(i / d.heads) * d.seq..][..d.seq];
        let size = d.seq * d.seq;
        let bias = self
            .position_bias
            .as_ref()
            .map(|b| &b[(i % d.heads) * size..][..size]);
        probabilities(q, k, mask, bias, self.scale, d, p);
        [q, k, v]
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
    let (s, h, stride) = (d.seq, d.dim, d.qkv_stride());
    // P = scale · Q · Kᵀ
    matmul(
        (s, s, h),
        q,
        (stride, 1),
        k,
        (1, stride),
        p,
        false,
        scale,
        SERIAL,
    );
    for (r, row) in p.chunks_mut(s).enumerate() {
        masked_softmax_in_place(row, mask, bias.map(|b| &b[r * s..][..s]));
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(storage, layout)?;
        let d = self.dims;
        let out = self.forward(qkv);
        Ok((
            CpuStorage::F32(out),
            Shape::from((d.batch * d.seq, d.hidden())),
        ))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = AttentionBackward(self.clone());
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

/// The gradient of the packed qkv rows: `(dQ | dK | dV)` in the same layout.
struct AttentionBackward(Attention);

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, g) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let out = self.0.backward(qkv, g, None);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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

    /// `(batch, heads, seq, dim)` views of the packed `(batch·seq, 3·hidden)` rows.
    fn split(qkv: &Tensor, batch: usize, heads: usize) -> [Tensor; 3] {
        let (rows, width) = qkv.dims2().unwrap();
        let hidden = width / 3;
        let part = |i: usize| {
            qkv.narrow(1, i * hidden, hidden)
                .unwrap()
                .reshape((batch, rows / batch, heads, hidden / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        [part(0), part(1), part(2)]
    }

    /// Composed candle ops on the split heads, back to `(batch·seq, hidden)`.
    fn reference(
        qkv: &Tensor,
        heads: usize,
        mask: &Tensor,
        position_bias: Option<&Tensor>,
        scale: f64,
    ) -> Tensor {
        let (batch, seq) = mask.dims2().unwrap();
        let [q, k, v] = split(qkv, batch, heads);
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(bias) = position_bias {
            scores = scores.broadcast_add(bias).unwrap();
        }
        let mask = mask.unsqueeze(1).unwrap().unsqueeze(1).unwrap();
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((batch * seq, qkv.dim(1).unwrap() / 3))
            .unwrap()
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
        // batch 2, heads 3, seq 5, dim 4: hidden 12, rows of 36.
        let (heads, hidden) = (3, 12);
        let qkv = Var::from_tensor(&values(&[10, 3 * hidden], 1)).unwrap();
        let mask = Tensor::new(
            &[[0f32, 0., 0., -1e9, -1e9], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let w = values(&[10, hidden], 4);
        let fused_bias = position_bias
            .map(|b| PositionBias::new(b.flatten_all().unwrap().to_vec1().unwrap(), 3, 5).unwrap());
        let fused = attention(&qkv, heads, &mask, fused_bias.as_ref(), 0.5).unwrap();
        let expected = reference(&qkv, heads, &mask, position_bias, 0.5);
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
        let (gf, ge) = (gf.get(&qkv).unwrap(), ge.get(&qkv).unwrap());
        let d = diff(gf, ge);
        assert!(d < 1e-5, "gradient differs by {d}");
        assert!(
            gf.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-3
        );
        // Padded keys (positions 3, 4 of batch 0) get no gradient through k and v.
        let padded = gf
            .narrow(0, 3, 2)
            .unwrap()
            .narrow(1, hidden, 2 * hidden)
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
        // One head of dim 2 over 3 tokens: rows [q | k | v].
        let (q, k) = (values(&[3, 2], 1), values(&[3, 2], 2));
        let v = Tensor::new(&[[1f32, 1.], [1., 1.], [1e38, 1e38]], &Device::Cpu).unwrap();
        let qkv = Tensor::cat(&[&q, &k, &v], 1).unwrap();
        let mask = Tensor::new(&[[0f32, 0., -1e9]], &Device::Cpu).unwrap();
        let out: Vec<f32> = attention(&qkv, 1, &mask, None, 1.0)
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
