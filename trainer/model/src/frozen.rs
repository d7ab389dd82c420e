//! The frozen linear model of one prompt, what attribution graphs go through
//! ([`crate::HookedModel::freeze`]): one real forward caches every layer's attention pattern
//! (`attn.hook_pattern`) and every norm's scale (1/rms for Gemma's RMSNorms, 1/std with centring
//! for GPT-2's LayerNorms), and with those held fixed the residual stream is an affine function
//! of what is written into it (embeddings, MLP outputs). Biases (b_V, b_O, LayerNorm β, GPT-2's
//! position embeddings) are constants.
//!
//! Two ways through it:
//! - [`Frozen::forward`]: the affine forward written with plain candle ops, the MLP outputs
//!   supplied by the caller from each layer's frozen `ln2.hook_normalized` — the independent
//!   reference the exactness tests compare against;
//! - the transposed linear maps ([`Frozen::attn_backward`], [`Norm::backward`]): how a gradient
//!   at the residual stream after a block reaches the residual before it, for a batch of targets
//!   at once. They are hand-written rather than taken from candle's autograd because a target at
//!   position p needs only positions ≤ p (causal truncation to the batch's last position), the
//!   sliding-window layers' patterns are banded (the blocked product skips the zero blocks), no
//!   MLP is differentiated (MLP outputs are sources, not functions), and each layer becomes a
//!   few batched GEMMs over the whole batch of targets.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};

/// A norm with its scale frozen at the prompt's values: `y = C(x) · inv_scale[p] · weight + bias`,
/// C centring for a LayerNorm and the identity for an RMSNorm.
#[derive(Clone, Debug)]
pub struct Norm {
    /// RMSNorm (no centring) or LayerNorm.
    pub rms: bool,
    /// `[d_model]`, the factor the model multiplies by (Gemma's `1 + w`).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// `[seq, 1]`: 1/rms or 1/std at each position on the prompt.
    pub inv_scale: Tensor,
}

impl Norm {
    /// The frozen norm of `x` `[.., p, d_model]` (p ≤ the prompt's length).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = x.dim(D::Minus2)?;
        let x = if self.rms { x.clone() } else { x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)? };
        let y = x.broadcast_mul(&self.inv_scale.narrow(0, 0, p)?)?.broadcast_mul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The transposed linear part: the gradient at the norm's input from `g` `[.., p, d_model]`
    /// at its output.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        let p = g.dim(D::Minus2)?;
        let g = g.broadcast_mul(&self.weight)?.broadcast_mul(&self.inv_scale.narrow(0, 0, p)?)?;
        if self.rms { Ok(g) } else { Ok(g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?) }
    }

    /// A norm frozen at the scales of `x` `[seq, d_model]` (the norm's real input).
    pub fn freeze(x: &Tensor, rms: bool, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Norm> {
        let var = if rms {
            x.sqr()?.mean_keepdim(D::Minus1)?
        } else {
            x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?.sqr()?.mean_keepdim(D::Minus1)?
        };
        let inv_scale = (var + eps)?.sqrt()?.recip()?;
        Ok(Norm { rms, weight: weight.clone(), bias: bias.cloned(), inv_scale })
    }
}

/// One block with its attention and norms frozen.
#[derive(Clone, Debug)]
pub struct FrozenLayer {
    pub ln1: Norm,
    /// `[n_heads, seq, seq]` (query, key), zero outside the causal (and sliding) window.
    pub pattern: Tensor,
    /// `[n_heads, seq, seq]` (key, query): the pattern transposed, for the backward.
    pub pattern_t: Tensor,
    /// Keys further back than this get no attention (Gemma's local layers).
    pub window: Option<usize>,
    /// `[n_kv_heads · d_head, d_model]`.
    pub w_v: Tensor,
    pub b_v: Option<Tensor>,
    /// `[d_model, n_heads · d_head]`.
    pub w_o: Tensor,
    pub b_o: Option<Tensor>,
    /// Gemma's post-attention RMSNorm.
    pub attn_norm: Option<Norm>,
    /// The norm before the MLP: its output is `ln2.hook_normalized`, what transcoders read.
    pub ln2: Norm,
}

/// The frozen model of one prompt, with what the real forward gave.
#[derive(Clone, Debug)]
pub struct Frozen {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_model: usize,
    pub seq: usize,
    /// `[seq, d_model]`: `hook_embed` on the prompt (Gemma's scaled by √d_model): the token nodes.
    pub embed: Tensor,
    /// `[seq, d_model]`: a constant added to the embeddings (GPT-2's position embeddings).
    pub embed_const: Option<Tensor>,
    pub layers: Vec<FrozenLayer>,
    pub ln_final: Norm,
    /// `[vocab, d_model]`.
    pub unembed: Tensor,
    /// The real `ln2.hook_normalized` and `hook_mlp_out` of each layer, `[seq, d_model]`.
    pub mlp_in: Vec<Tensor>,
    pub mlp_out: Vec<Tensor>,
    /// `[vocab]`: the real logits at the last position.
    pub logits: Tensor,
}

/// What [`Frozen::forward`] gives: each layer's `ln2.hook_normalized` and the final normed
/// residual, `[seq, d_model]`.
pub struct FrozenRun {
    pub mlp_in: Vec<Tensor>,
    pub final_normed: Tensor,
}

impl Frozen {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The affine forward from `embed` `[seq, d_model]` (in place of `hook_embed`), with layer
    /// L's MLP output given by `mlp(L, ln2 output)`. Plain candle ops, one head at a time.
    pub fn forward(
        &self,
        embed: &Tensor,
        mlp: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<FrozenRun> {
        let (seq, dh) = (self.seq, self.d_head);
        let group = self.n_heads / self.n_kv_heads;
        let mut x = match &self.embed_const {
            Some(c) => (embed + c)?,
            None => embed.clone(),
        };
        let mut mlp_in = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.ln1.forward(&x)?;
            let mut v = h.matmul(&layer.w_v.t()?)?;
            if let Some(b) = &layer.b_v {
                v = v.broadcast_add(b)?;
            }
            let mut z = Vec::with_capacity(self.n_heads);
            for head in 0..self.n_heads {
                let vk = v.narrow(1, head / group * dh, dh)?.contiguous()?;
                z.push(layer.pattern.get(head)?.matmul(&vk)?);
            }
            let mut attn = Tensor::cat(&z, 1)?.matmul(&layer.w_o.t()?)?;
            if let Some(b) = &layer.b_o {
                attn = attn.broadcast_add(b)?;
            }
            if let Some(n) = &layer.attn_norm {
                attn = n.forward(&attn)?;
            }
            x = (x + attn)?;
            let m = layer.ln2.forward(&x)?;
            let out = mlp(l, &m)?;
            if out.dims() != [seq, self.d_model] {
                bail!(
                    "layer {l}'s MLP output has shape {:?}, expected [{seq}, {}]",
                    out.dims(),
                    self.d_model
                );
            }
            mlp_in.push(m);
            x = (x + out)?;
        }
        Ok(FrozenRun { mlp_in, final_normed: self.ln_final.forward(&x)? })
    }

    /// The gradient that `g` `[batch, p, d_model]` at layer `l`'s `hook_resid_mid` sends through
    /// the frozen attention (and ln1) to `hook_resid_pre` — the residual identity not included.
    /// p may be less than the prompt's length (causal truncation).
    pub fn attn_backward(&self, l: usize, g: &Tensor) -> Result<Tensor> {
        let layer = &self.layers[l];
        let (b, p, d) = g.dims3()?;
        let (h, kv, dh) = (self.n_heads, self.n_kv_heads, self.d_head);
        let g = match &layer.attn_norm {
            Some(n) => n.backward(g)?,
            None => g.clone(),
        };
        // Through W_O: u = g · W_O, as [head, p, batch · d_head].
        let u = g.reshape((b * p, d))?.matmul(&layer.w_o)?;
        let u = u.reshape((b, p, h, dh))?.permute((2, 1, 0, 3))?.contiguous()?.reshape((h, p, b * dh))?;
        // Through the pattern, transposed, summed over the heads sharing a KV head.
        let group = h / kv;
        let mut per_kv = Vec::with_capacity(kv);
        for k in 0..kv {
            let mut acc: Option<Tensor> = None;
            for head in k * group..(k + 1) * group {
                let term = banded_t_matmul(&layer.pattern_t.get(head)?, &u.get(head)?, layer.window)?;
                acc = Some(match acc {
                    Some(a) => (a + term)?,
                    None => term,
                });
            }
            per_kv.push(acc.expect("at least one head per KV head"));
        }
        let w = Tensor::stack(&per_kv, 0)?; // [kv, p, b · dh]
        let w = w.reshape((kv, p, b, dh))?.permute((2, 1, 0, 3))?.contiguous()?.reshape((b * p, kv * dh))?;
        // Through W_V (v = h · W_Vᵀ) and ln1.
        let gh = w.matmul(&layer.w_v)?.reshape((b, p, d))?;
        layer.ln1.backward(&gh)
    }
}

/// Rows of keys per block of [`banded_t_matmul`].
const BLOCK: usize = 128;

/// `At[:p, :p] · u` for a transposed attention pattern `at` `[seq, seq]` (key, query) and `u`
/// `[p, n]`: key s gathers from queries q ∈ [s, min(p, s + window)). Blocks of keys multiply
/// only the queries that can attend to them.
fn banded_t_matmul(at: &Tensor, u: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let p = u.dim(0)?;
    let mut out = Vec::with_capacity(p.div_ceil(BLOCK));
    for s0 in (0..p).step_by(BLOCK) {
        let s1 = (s0 + BLOCK).min(p);
        let q1 = window.map_or(p, |w| (s1 - 1 + w).min(p));
        let a = at.narrow(0, s0, s1 - s0)?.narrow(1, s0, q1 - s0)?.contiguous()?;
        out.push(a.matmul(&u.narrow(0, s0, q1 - s0)?)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn banded_product_equals_the_dense_one() {
        let dev = Device::Cpu;
        let seq = 300;
        let a = Tensor::randn(0f32, 1.0, (seq, seq), &dev).unwrap();
        // A causal windowed pattern (query, key): zero unless q - w < k ≤ q.
        let w = 37;
        let mask: Vec<f32> = (0..seq * seq)
            .map(|i| {
                let (q, k) = (i / seq, i % seq);
                if k <= q && q - k < w { 1.0 } else { 0.0 }
            })
            .collect();
        let pattern = (a * Tensor::from_vec(mask, (seq, seq), &dev).unwrap()).unwrap();
        let at = pattern.t().unwrap().contiguous().unwrap();
        let p = 260;
        let u = Tensor::randn(0f32, 1.0, (p, 5), &dev).unwrap();
        let dense =
            pattern.narrow(0, 0, p).unwrap().narrow(1, 0, p).unwrap().t().unwrap().matmul(&u).unwrap();
        for window in [Some(w), None] {
            let banded = banded_t_matmul(&at, &u, window).unwrap();
            let diff =
                (banded - &dense).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{window:?}: {diff}");
        }
    }
}
