//! Layer operations shared by the architectures. Each has a fast path (fused kernels without a
//! backward) and a differentiable path, chosen by `diff`: on the CPU in f32 the fused ops of
//! [`super::kernels`] with their own backwards, elsewhere candle's basic ops. Also the
//! biased multi-head attention and MLP activations that GPT-2 and BERT share.

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor};

use super::Hooks;
use super::hooks::{
    self,
    names::{K, PATTERN, Q, RESULT, V, Z},
};

/// `x @ w.T` for `x` of shape `[.., in]` and `w` of `[out, in]`, plus an optional bias. On the CPU
/// in f32 through [`super::kernels::linear`], whose backward computes no weight gradient.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out_dim, in_dim) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x = x.reshape((rows, in_dim))?;
    let y = if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        super::kernels::linear(&x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-scalar") = out_dim;
    Ok(y.reshape(out)?)
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * scale`; on the CPU in f32 one fused
/// pass with its own backward ([`super::kernels::rms_norm`]).
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64, diff: bool) -> Result<Tensor> {
    if fused(x) {
        Ok(super::kernels::rms_norm(x, scale, eps as f32)?)
    } else if diff {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(scale)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, scale, eps as f32)?)
    }
}

/// Softmax over the last dim. candle's fused `softmax_last_dim` has no backward (gradients would
/// silently stop there), so the differentiable path uses [`super::kernels::softmax_diff`] (basic
/// ops on other devices).
pub fn softmax(x: &Tensor, diff: bool) -> Result<Tensor> {
    if diff && fused(x) {
        Ok(super::kernels::softmax_diff(x)?)
    } else if diff {
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
    if fused(x) {
        return Ok(super::kernels::rope_diff(x, cos, sin)?);
    }
    rope_basic(x, cos, sin)
}

/// [`rope`] from candle's basic ops (differentiable on every device).
pub fn rope_basic(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// The MLP activations that GPT-2 and BERT configs name (`activation_function`, `hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    Relu,
}

impl Activation {
    /// The activation an HF config names.
    pub fn from_hf(name: &str) -> Result<Activation> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            other => bail!("unsupported activation function {other:?} (supported: gelu_new, gelu, relu)"),
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// Multi-head self-attention with biases (GPT-2, BERT); weights in the nn.Linear layout `[out, in]`.
pub struct Attention {
    pub q: Tensor,
    pub q_bias: Tensor,
    pub k: Tensor,
    pub k_bias: Tensor,
    pub v: Tensor,
    pub v_bias: Tensor,
    pub o: Tensor,
    pub o_bias: Tensor,
}

impl Attention {
    /// Attention of block `layer` on `x` `[batch, seq, d_model]`, with scores multiplied by `scale`
    /// and `mask` added (broadcast to `[batch, head, query, key]`). Goes through the hooks
    /// `blocks.{layer}.attn.hook_q|k|v|pattern|z|result`; returns the output with its bias.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        n_heads: usize,
        scale: f64,
        mask: &Tensor,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let d_head = self.q.dim(0)? / n_heads;
        let diff = hooks.wants_grad();
        let name = |s: &str| hooks::in_block(layer, s);
        let heads = |w: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok(linear(x, w, Some(b))?.reshape((batch, seq, n_heads, d_head))?)
        };
        let q = hooks.apply(&name(Q), heads(&self.q, &self.q_bias)?)?;
        let k = hooks.apply(&name(K), heads(&self.k, &self.k_bias)?)?;
        let v = hooks.apply(&name(V), heads(&self.v, &self.v_bias)?)?;
        // [b, s, h, d] -> [b, h, s, d] for the score matmuls.
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
        let pattern = hooks.apply(&name(PATTERN), softmax(&scores, diff)?)?;
        let z = pattern.matmul(&v)?.transpose(1, 2)?.contiguous()?;
        let z = hooks.apply(&name(Z), z)?;
        if hooks.is_active(&name(RESULT)) {
            hooks.apply(&name(RESULT), per_head_result(&z, &self.o)?)?;
        }
        linear(&z.reshape((batch, seq, n_heads * d_head))?, &self.o, Some(&self.o_bias))
    }
}

/// Each head's share of the attention output, `z_h @ W_O[:, h]`, as `[batch, pos, head, d_model]`
/// (no output bias), for `z` `[batch, pos, head, d_head]` and `w_o` `[d_model, head * d_head]`.
pub fn per_head_result(z: &Tensor, w_o: &Tensor) -> Result<Tensor> {
    let (_, _, n_heads, d_head) = z.dims4()?;
    let d_model = w_o.dim(0)?;
    // [h, d_head, d_model]: head h's slice of W_O, transposed for a right-multiplication.
    let wo = w_o.reshape((d_model, n_heads, d_head))?.permute((1, 2, 0))?.contiguous()?;
    let zh = z.transpose(1, 2)?.contiguous()?; // [b, h, s, d_head]
    let result = zh.broadcast_matmul(&wo.unsqueeze(0)?)?; // [b, h, s, d_model]
    Ok(result.transpose(1, 2)?.contiguous()?)
}

/// LayerNorm with its affine parameters and epsilon.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GeGLU: `gelu_tanh(gate) * up`, one fused pass ([`super::kernels::geglu`]; with a fused
/// backward when `diff`); candle's ops on other devices.
pub fn geglu(gate: &Tensor, up: &Tensor, diff: bool) -> Result<Tensor> {
    if !fused(gate) {
        return Ok((gate.gelu()? * up)?);
    }
    if diff { Ok(super::kernels::geglu_diff(gate, up)?) } else { Ok(super::kernels::geglu(gate, up)?) }
}

/// Whether the fused kernels of [`super::kernels`] take `x` (f32 on the CPU).
fn fused(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}
