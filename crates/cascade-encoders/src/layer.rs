//! One f32 encoder layer as one op, forward and backward: `attended =
//! norm₁(x·Woᵀ-of-attention(x·Wqkvᵀ) + x)`, `out = norm₂(gelu(attended·Wupᵀ)·Wdownᵀ
//! + attended)`, over the layer's weights as one flat vector.
//!
//! Why one op: candle's backward pass adds every gradient contribution into a
//! fresh zero tensor (`or_insert` then `add`, on one thread, through newly
//! mapped memory). As a dozen ops a layer had ~16 M floats of such
//! contributions per training step at 8×256 tokens, while the other core
//! waited; as one op it has the layer input's and the flat weights'. The
//! residual adds, norms and GELU run fused on every thread, and the backward
//! pass reuses its buffers. The forward pass of frozen layers (no gradient) is
//! the same code without keeping the activations.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::attention::Attention;
use super::linear::{dense, dense_backward};
use super::ops::{
    add_then_layer_norm, f32_slice, gelu_backward_in_place, gelu_of, layer_norm_backward, par_zeros,
};
use rayon::prelude::*;

/// A layer's sizes; its weights are one flat vector in the order of `Weights`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub eps: f32,
}

/// How many weights of each part, in the flat order: `[Wq; Wk; Wv]` (3h × h),
/// `[bq; bk; bv]`, attention output W (h × h) and b, its norm's γ and β,
/// up W (i × h) and b, down W (h × i) and b, the output norm's γ and β.
const PARTS: usize = 12;

impl LayerShape {
    pub(crate) fn sizes(&self) -> [usize; PARTS] {
        let (h, i) = (self.hidden, self.intermediate);
        [3 * h * h, 3 * h, h * h, h, h, h, i * h, i, h * i, h, h, h]
    }

    pub(crate) fn len(&self) -> usize {
        self.sizes().iter().sum()
    }
}

/// The layer's weights, or their gradients, as slices of the flat vector.
struct Weights<T> {
    qkv_w: T,
    qkv_b: T,
    out_w: T,
    out_b: T,
    norm1_g: T,
    norm1_b: T,
    up_w: T,
    up_b: T,
    down_w: T,
    down_b: T,
    norm2_g: T,
    norm2_b: T,
}

impl<T> Weights<T> {
    fn from_parts(
        [qkv_w, qkv_b, out_w, out_b, norm1_g, norm1_b, up_w, up_b, down_w, down_b, norm2_g, norm2_b]: [T; PARTS],
    ) -> Self {
        Self {
            qkv_w,
            qkv_b,
            out_w,
            out_b,
            norm1_g,
            norm1_b,
            up_w,
            up_b,
            down_w,
            down_b,
            norm2_g,
            norm2_b,
        }
    }
}

fn split<'a>(shape: &LayerShape, mut rest: &'a [f32]) -> Result<Weights<&'a [f32]>> {
    if rest.len() != shape.len() {
        bail!(
            "layer: {} weights for a layer of {}",
            rest.len(),
            shape.len()
        );
    }
    Ok(Weights::from_parts(shape.sizes().map(|n| {
        let (part, tail) = rest.split_at(n);
        rest = tail;
        part
    })))
}

fn split_mut<'a>(shape: &LayerShape, mut rest: &'a mut [f32]) -> Weights<&'a mut [f32]> {
    Weights::from_parts(shape.sizes().map(|n| {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        part
    }))
}

/// `x (rows, hidden)` through one layer whose weights are `weights` (flat, see
/// `LayerShape`). Differentiable in both when either tracks gradients.
pub(crate) fn layer(
    x: &Tensor,
    weights: &Tensor,
    shape: LayerShape,
    attention: Attention,
) -> Result<Tensor> {
    let (x, weights) = (x.contiguous()?, weights.contiguous()?);
    let (_, hidden) = x.dims2()?;
    if hidden != shape.hidden || weights.elem_count() != shape.len() {
        bail!(
            "layer: input {:?} and {} weights for hidden {} and intermediate {}",
            x.dims(),
            weights.elem_count(),
            shape.hidden,
            shape.intermediate
        );
    }
    let train = x.track_op() || weights.track_op();
    let op = Layer {
        shape,
        attention,
        saved: train.then(|| Mutex::new(None)),
    };
    if train {
        x.apply_op2(&weights, op)
    } else {
        x.apply_op2_no_bwd(&weights, &op)
    }
}

struct Layer {
    shape: LayerShape,
    attention: Attention,
    /// Where a training pass keeps its activations for the backward pass.
    saved: Option<Mutex<Option<Activations>>>,
}

/// What the backward pass reads: `rows ×` the named width unless said.
struct Activations {
    /// `3·hidden`
    qkv: Vec<f32>,
    /// The attention's, `(batch·heads) × seq × seq`.
    probabilities: Vec<f32>,
    context: Vec<f32>,
    /// The attention block's residual sum, before its norm.
    sum1: Vec<f32>,
    attended: Vec<f32>,
    /// `intermediate`, before and after the GELU.
    up: Vec<f32>,
    activated: Vec<f32>,
    /// The feed-forward block's residual sum, before its norm.
    sum2: Vec<f32>,
}

impl CustomOp2 for Layer {
    fn name(&self) -> &'static str {
        "fused-encoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, weights) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let LayerShape {
            hidden: h,
            intermediate: i,
            eps,
        } = self.shape;
        let w = split(&self.shape, weights)?;
        let keep = self.saved.is_some();
        let qkv = dense(x, w.qkv_w, w.qkv_b, (h, 3 * h), false);
        let (context, probabilities) = if keep {
            let (context, probabilities) = self.attention.forward_keeping(&qkv);
            (context, Some(probabilities))
        } else {
            (self.attention.forward(&qkv), None)
        };
        let mut attended = dense(&context, w.out_w, w.out_b, (h, h), false);
        let sum1 = add_then_layer_norm(&mut attended, x, w.norm1_g, w.norm1_b, eps, keep);
        // Without gradients the GELU runs in place on the product.
        let up = dense(&attended, w.up_w, w.up_b, (h, i), !keep);
        let activated = keep.then(|| gelu_of(&up));
        let mut out = dense(
            activated.as_deref().unwrap_or(&up),
            w.down_w,
            w.down_b,
            (i, h),
            false,
        );
        let sum2 = add_then_layer_norm(&mut out, &attended, w.norm2_g, w.norm2_b, eps, keep);
        if let (Some(saved), Some(probabilities), Some(sum1), Some(activated), Some(sum2)) =
            (&self.saved, probabilities, sum1, activated, sum2)
        {
            *saved.lock().map_err(|_| poisoned())? = Some(Activations {
                qkv,
                probabilities,
                context,
                sum1,
                attended,
                up,
                activated,
                sum2,
            });
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = &self.saved else {
            bail!("layer: a pass without gradients has no backward pass");
        };
        let Some(activations) = saved.lock().map_err(|_| poisoned())?.take() else {
            bail!("layer: the backward pass ran twice");
        };
        let backward = LayerBackward {
            shape: self.shape,
            attention: self.attention.clone(),
            activations: Mutex::new(Some(activations)),
            weight_grads: weights.track_op(),
        };
        // One buffer: dx, then the weights' gradients when they train.
        let packed = x.apply_op3_no_bwd(weights, &grad.contiguous()?, &backward)?;
        let n = x.elem_count();
        let dx = x
            .track_op()
            .then(|| packed.narrow(0, 0, n)?.reshape(x.shape()))
            .transpose()?;
        let dw = backward
            .weight_grads
            .then(|| packed.narrow(0, n, self.shape.len()))
            .transpose()?;
        Ok((dx, dw))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("layer: a thread panicked while holding the activations".into())
}

struct LayerBackward {
    shape: LayerShape,
    attention: Attention,
    activations: Mutex<Option<Activations>>,
    weight_grads: bool,
}

impl CustomOp3 for LayerBackward {
    fn name(&self) -> &'static str {
        "fused-encoder-layer-backward"
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
        let (x, weights, dy) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let Some(a) = self.activations.lock().map_err(|_| poisoned())?.take() else {
            bail!("layer: the backward pass ran twice");
        };
        let LayerShape {
            hidden: h,
            intermediate: i,
            eps,
        } = self.shape;
        let w = split(&self.shape, weights)?;
        let grads_len = if self.weight_grads {
            self.shape.len()
        } else {
            0
        };
        let mut out = par_zeros(x.len() + grads_len);
        let (dx, dw_flat) = out.split_at_mut(x.len());
        let mut dw = self.weight_grads.then(|| split_mut(&self.shape, dw_flat));
        // Frozen weights: the norms' γ and β gradients come with dx anyway; discard them.
        let (mut scratch_g, mut scratch_b) = (vec![0f32; h], vec![0f32; h]);

        // Output norm, then the feed-forward block.
        let mut d_sum2 = par_zeros(a.sum2.len());
        {
            let (dg, db) = match dw.as_mut() {
                Some(g) => (&mut *g.norm2_g, &mut *g.norm2_b),
                None => (&mut scratch_g[..], &mut scratch_b[..]),
            };
            layer_norm_backward(&a.sum2, w.norm2_g, dy, eps, &mut d_sum2, dg, db);
        }
        let mut d_up = par_zeros(a.up.len());
        dense_backward(
            &a.activated,
            w.down_w,
            &d_sum2,
            (i, h),
            Some((&mut d_up, false)),
            dw.as_mut().map(|g| (&mut *g.down_w, &mut *g.down_b)),
        );
        gelu_backward_in_place(&a.up, &mut d_up);
        // d_attended = d_sum2 (the residual) + d_up · W_up, in d_sum2's buffer.
        let mut d_attended = d_sum2;
        dense_backward(
            &a.attended,
            w.up_w,
            &d_up,
            (h, i),
            Some((&mut d_attended, true)),
            dw.as_mut().map(|g| (&mut *g.up_w, &mut *g.up_b)),
        );
        drop(d_up);

        // Attention norm, output projection, attention.
        let mut d_sum1 = par_zeros(a.sum1.len());
        {
            let (dg, db) = match dw.as_mut() {
                Some(g) => (&mut *g.norm1_g, &mut *g.norm1_b),
                None => (&mut scratch_g[..], &mut scratch_b[..]),
            };
            layer_norm_backward(&a.sum1, w.norm1_g, &d_attended, eps, &mut d_sum1, dg, db);
        }
        let mut d_context = d_attended;
        dense_backward(
            &a.context,
            w.out_w,
            &d_sum1,
            (h, h),
            Some((&mut d_context, false)),
            dw.as_mut().map(|g| (&mut *g.out_w, &mut *g.out_b)),
        );
        let d_qkv = self
            .attention
            .backward(&a.qkv, &d_context, Some(&a.probabilities));
        // dx = d_sum1 (the residual) + d_qkv · W_qkv.
        dx.par_chunks_mut(1 << 16)
            .zip(d_sum1.par_chunks(1 << 16))
            .for_each(|(dx, d)| dx.copy_from_slice(d));
        dense_backward(
            x,
            w.qkv_w,
            &d_qkv,
            (h, 3 * h),
            Some((dx, true)),
            dw.as_mut().map(|g| (&mut *g.qkv_w, &mut *g.qkv_b)),
        );
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::attention::{attention, PositionBias};
    use crate::linear::linear;
    use crate::ops::{gelu, layer_norm};
    use candle_core::{Device, Var};

    const SHAPE: LayerShape = LayerShape {
        hidden: 12,
        intermediate: 20,
        eps: 1e-5,
    };
    const HEADS: usize = 3;
    const SCALE: f64 = 0.5;

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = (((i as u64 + 3) * 2654435761 + seed * 97) % 1009) as f32 / 1009.0;
                (u - 0.5) * 2.0 * scale
            })
            .collect()
    }

    /// Weights around 0.3 in size, the norms' γ around 1.
    fn weights() -> Tensor {
        let mut flat = values(SHAPE.len(), 2, 0.3);
        let h = SHAPE.hidden;
        let sizes = SHAPE.sizes();
        for gamma in [4, 10] {
            let at: usize = sizes[..gamma].iter().sum();
            for v in &mut flat[at..at + h] {
                *v += 1.0;
            }
        }
        Tensor::from_vec(flat, SHAPE.len(), &Device::Cpu).unwrap()
    }

    /// Batch 2 of 5 tokens, the last two of the first padding.
    fn mask() -> Tensor {
        Tensor::new(
            &[[0f32, 0., 0., -1e9, -1e9], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap()
    }

    fn bias() -> PositionBias {
        PositionBias::new(values(HEADS * 25, 5, 1.0), HEADS, 5).unwrap()
    }

    fn fused(x: &Tensor, flat: &Tensor) -> Tensor {
        let mask: Vec<f32> = mask().flatten_all().unwrap().to_vec1().unwrap();
        let attention = Attention::new(
            (2, 5, HEADS, SHAPE.hidden / HEADS),
            Arc::new(mask),
            Some(&bias()),
            SCALE,
        );
        layer(x, flat, SHAPE, attention).unwrap()
    }

    /// The same layer composed from the separate differentiable ops.
    fn composed(x: &Tensor, flat: &Tensor) -> Tensor {
        let (h, i) = (SHAPE.hidden, SHAPE.intermediate);
        let dims: [&[usize]; PARTS] = [
            &[3 * h, h],
            &[3 * h],
            &[h, h],
            &[h],
            &[h],
            &[h],
            &[i, h],
            &[i],
            &[h, i],
            &[h],
            &[h],
            &[h],
        ];
        let mut at = 0;
        let p: Vec<Tensor> = dims
            .iter()
            .map(|d| {
                let n: usize = d.iter().product();
                at += n;
                flat.narrow(0, at - n, n).unwrap().reshape(*d).unwrap()
            })
            .collect();
        let eps = SHAPE.eps as f64;
        let qkv = linear(x, &p[0], &p[1]).unwrap();
        let context = attention(&qkv, HEADS, &mask(), Some(&bias()), SCALE).unwrap();
        let sum1 = (linear(&context, &p[2], &p[3]).unwrap() + x).unwrap();
        let attended = layer_norm(&sum1, &p[4], &p[5], eps).unwrap();
        let up = gelu(&linear(&attended, &p[6], &p[7]).unwrap()).unwrap();
        let sum2 = (linear(&up, &p[8], &p[9]).unwrap() + &attended).unwrap();
        layer_norm(&sum2, &p[10], &p[11], eps).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn input() -> Tensor {
        Tensor::from_vec(
            values(10 * SHAPE.hidden, 1, 1.0),
            (10, SHAPE.hidden),
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn matches_the_composed_ops_forward_and_backward() {
        let x = Var::from_tensor(&input()).unwrap();
        let flat = Var::from_tensor(&weights()).unwrap();
        let up = Tensor::from_vec(
            values(10 * SHAPE.hidden, 7, 1.0),
            (10, SHAPE.hidden),
            &Device::Cpu,
        )
        .unwrap();
        let (ours, theirs) = (fused(&x, &flat), composed(&x, &flat));
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g_ours = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [x.as_tensor(), flat.as_tensor()] {
            let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
            let d = max_diff(a, b);
            assert!(d < 1e-4, "gradients differ by {d}");
            let largest: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(largest > 1e-2, "a gradient this small tests nothing");
        }
    }

    #[test]
    fn frozen_weights_pass_the_input_gradient_and_get_none() {
        let x = Var::from_tensor(&input()).unwrap();
        let frozen = weights();
        let (ours, theirs) = (fused(&x, &frozen), composed(&x, &frozen));
        let g_ours = ours.sum_all().unwrap().backward().unwrap();
        let g_theirs = theirs.sum_all().unwrap().backward().unwrap();
        let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
        assert!(max_diff(a, b) < 1e-4);
        assert!(g_ours.get(&frozen).is_none());
    }

    #[test]
    fn a_pass_without_gradients_gives_the_same_bits_as_a_training_pass() {
        let x = input();
        let frozen = fused(&x, &weights());
        let training = fused(&Var::from_tensor(&x).unwrap(), &weights());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            frozen.flatten_all().unwrap().to_vec1().unwrap(),
            training.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let mask = Arc::new(vec![0f32; 10]);
        let attention = Attention::new((2, 5, HEADS, 4), mask, None, SCALE);
        let short = Tensor::zeros(SHAPE.len() - 1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let error = layer(&input(), &short, SHAPE, attention).unwrap_err();
        assert!(error.to_string().contains("weights"), "{error}");
    }
}
