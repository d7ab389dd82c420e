//! Layer operations shared by the architectures. Each has a fast path (candle's fused kernels,
//! which have no backward) and a differentiable path from basic ops, chosen by `diff`.

use anyhow::Result;
use candle_core::{D, DType, Device, Tensor};

/// `x @ w.T` for `x` of shape `[.., in]` and `w` of `[out, in]`, plus an optional bias.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out_dim, in_dim) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-scalar") = out_dim;
    Ok(y.reshape(out)?)
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * scale`.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64, diff: bool) -> Result<Tensor> {
    if diff {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(scale)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, scale, eps as f32)?)
    }
}

/// Softmax over the last dim. candle's fused `softmax_last_dim` has no backward (gradients would
/// silently stop there), so the differentiable path is built from basic ops.
pub fn softmax(x: &Tensor, diff: bool) -> Result<Tensor> {
    if diff {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(x)?)
    }
}

/// LayerNorm over the last dim with weight and bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// cos and sin tables `[seq, d_head / 2]` for rotary embeddings with base `theta`.
pub fn rope_tables(seq: usize, d_head: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> =
        (0..d_head / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / d_head as f64)) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, d_head / 2), device)?;
    let pos = Tensor::arange(0u32, seq as u32, device)?.to_dtype(DType::F32)?.reshape((seq, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Rotary embedding, "rotate half" (GPT-NeoX) convention, on `x` of shape `[b, h, s, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, diff: bool) -> Result<Tensor> {
    if !diff {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Additive attention mask `[s, s]`: 0 where query `i` may see key `j` (`j <= i` and, with a
/// window, `i - j < window`), -inf elsewhere.
pub fn causal_mask(seq: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..seq).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, seq), device)?)
}
