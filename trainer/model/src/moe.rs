//! The sparse mixture-of-experts MLP that OLMoE and Qwen3-MoE share, with its router hooks.
//!
//! For each token `x` (the normalized residual, `ln2.hook_normalized`):
//!
//! 1. router logits `l = W_router · x` (`mlp.hook_router_logits`, `[b, p, n_experts]`);
//! 2. probabilities `p = softmax(l)` (`mlp.hook_router_probs`);
//! 3. the `k` most probable experts get weight `p_e`, divided by their sum when the model
//!    renormalises (`norm_topk_prob`); every other expert weight 0 (`mlp.hook_expert_weights`);
//! 4. the chosen experts are the `k` largest weights, by descending weight, ties to the lower id
//!    (`mlp.hook_expert_indices`, `[b, p, k]`, ids as f32);
//! 5. each chosen expert's SwiGLU output `W_down · (silu(W_gate · x) ⊙ W_up · x)`, computed only for
//!    the tokens routed to it (`mlp.hook_expert_out`, `[b, p, k, d_model]`);
//! 6. the MLP output `Σ_j weight[idx_j] · out_j` (`hook_mlp_out`).
//!
//! Every step reads the previous one *after* its hook, so an intervention propagates: changing the
//! router logits or probabilities changes the choice; zeroing an expert's weight removes it from
//! the output (it stays among the indices with weight 0 when fewer than `k` weights are non-zero);
//! giving an unchosen expert a weight larger than a chosen one's swaps it in (only the `k` largest
//! weights are computed, as the model would). Replaced indices must be whole expert ids.
//!
//! Steps 1–3 and 6 are differentiable candle ops (the choice itself, a top-k, is a constant mask),
//! so gradients reach the router hooks through the weights.

use anyhow::{Result, bail};
use candle_core::{D, DType, Tensor};

use super::Hooks;
use super::hooks::{self, names::*};
use super::ops::{linear, softmax};

/// One sparse MoE MLP: the router and the experts (SwiGLU, no biases).
pub struct SparseMoe {
    /// `[n_experts, d_model]`.
    pub router: Tensor,
    /// Per expert, the gate and up projections stacked `[2·d_expert, d_model]`.
    pub gate_up: Vec<Tensor>,
    /// Per expert, `[d_model, d_expert]`.
    pub down: Vec<Tensor>,
    /// Experts per token.
    pub top_k: usize,
    /// Whether the chosen experts' probabilities are divided by their sum.
    pub norm_topk_prob: bool,
}

impl SparseMoe {
    pub fn n_experts(&self) -> usize {
        self.gate_up.len()
    }

    /// Check the weights against `d_model` and the expert width `d_expert`; errors name `what`.
    pub fn check(&self, d_model: usize, d_expert: usize, what: &str) -> Result<()> {
        let n = self.n_experts();
        if self.router.dims() != [n, d_model] {
            bail!("{what} router has shape {:?}, expected [{n}, {d_model}]", self.router.dims());
        }
        if self.top_k == 0 || self.top_k > n {
            bail!("{what}: {} experts per token does not fit {n} experts", self.top_k);
        }
        for (e, (gu, down)) in self.gate_up.iter().zip(&self.down).enumerate() {
            if gu.dims() != [2 * d_expert, d_model] {
                bail!(
                    "{what} expert {e} gate/up has shape {:?}, expected [2·{d_expert}, {d_model}]",
                    gu.dims()
                );
            }
            if down.dims() != [d_model, d_expert] {
                bail!("{what} expert {e} down has shape {:?}, expected [{d_model}, {d_expert}]", down.dims());
            }
        }
        Ok(())
    }

    /// The MLP of block `layer` on `x` `[batch, seq, d_model]`, through the router and expert hooks
    /// (not `hook_mlp_out`, which the caller applies).
    pub fn forward(&self, layer: usize, x: &Tensor, hooks: &mut Hooks, diff: bool) -> Result<Tensor> {
        let (batch, seq, d_model) = x.dims3()?;
        let (n, k) = (self.n_experts(), self.top_k);
        let name = |s: &str| hooks::in_block(layer, s);
        let logits = hooks.apply(&name(ROUTER_LOGITS), linear(x, &self.router, None)?)?;
        let probs = hooks.apply(&name(ROUTER_PROBS), softmax(&logits.contiguous()?, diff)?)?;
        let chosen = top_k(&probs, k)?;
        let mask = one_hot(&chosen, n, k, probs.dtype(), probs.device())?.reshape(probs.dims())?;
        let mut weights = (&probs * &mask)?;
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        let weights = hooks.apply(&name(EXPERT_WEIGHTS), weights)?;
        let order = top_k(&weights, k)?;
        let ids: Vec<f32> = order.iter().map(|&e| e as f32).collect();
        let ids = Tensor::from_vec(ids, (batch, seq, k), x.device())?.to_dtype(x.dtype())?;
        let ids = hooks.apply(&name(EXPERT_INDICES), ids)?;
        let order = expert_ids(&ids, n)?;
        let out = self.experts(&x.reshape((batch * seq, d_model))?, &order, k)?;
        let out = hooks.apply(&name(EXPERT_OUT), out.reshape((batch, seq, k, d_model))?)?;
        let index = Tensor::from_vec(order, (batch, seq, k), x.device())?;
        let slot_weights = weights.contiguous()?.gather(&index, D::Minus1)?;
        Ok(out.broadcast_mul(&slot_weights.unsqueeze(D::Minus1)?)?.sum(2)?)
    }

    /// Each token's chosen experts' outputs `[tokens·k, d_model]` (slot `j` of token `t` at row
    /// `t·k + j`) for `x` `[tokens, d_model]` and the expert ids `order` (`k` per token): every
    /// expert runs once, on the tokens routed to it.
    fn experts(&self, x: &Tensor, order: &[u32], k: usize) -> Result<Tensor> {
        let mut routed: Vec<Vec<u32>> = vec![Vec::new(); self.n_experts()];
        for (slot, &e) in order.iter().enumerate() {
            routed[e as usize].push(slot as u32);
        }
        let mut outputs = Vec::new();
        // Where each slot's row ends up in the concatenated outputs.
        let mut row_of = vec![0u32; order.len()];
        let mut next = 0u32;
        for (e, slots) in routed.iter().enumerate() {
            if slots.is_empty() {
                continue;
            }
            let tokens: Vec<u32> = slots.iter().map(|&s| s / k as u32).collect();
            let tokens = Tensor::from_vec(tokens, slots.len(), x.device())?;
            let h = linear(&x.index_select(&tokens, 0)?, &self.gate_up[e], None)?;
            let d_expert = h.dim(1)? / 2;
            let act = (h.narrow(1, 0, d_expert)?.silu()? * h.narrow(1, d_expert, d_expert)?)?;
            outputs.push(linear(&act, &self.down[e], None)?);
            for &s in slots {
                row_of[s as usize] = next;
                next += 1;
            }
        }
        let all = Tensor::cat(&outputs, 0)?;
        let rows = Tensor::from_vec(row_of, order.len(), x.device())?;
        Ok(all.index_select(&rows, 0)?)
    }
}

/// Per row of `x` `[.., n]`, the indices of its `k` largest values, by descending value (ties to
/// the lower index), flattened.
fn top_k(x: &Tensor, k: usize) -> Result<Vec<u32>> {
    let n = x.dim(D::Minus1)?;
    let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(values.len() / n * k);
    let mut idx: Vec<u32> = Vec::with_capacity(n);
    for row in values.chunks(n) {
        idx.clear();
        idx.extend(0..n as u32);
        // Stable: equal values keep the lower index first. NaN sorts last.
        idx.sort_by(|&a, &b| {
            let (a, b) = (row[a as usize], row[b as usize]);
            b.partial_cmp(&a).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
        });
        out.extend_from_slice(&idx[..k]);
    }
    Ok(out)
}

/// A `[rows·n]` 0/1 mask with a 1 at each row's chosen ids (`chosen`: `k` per row).
fn one_hot(chosen: &[u32], n: usize, k: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let rows = chosen.len() / k;
    let mut mask = vec![0f32; rows * n];
    for (slot, &e) in chosen.iter().enumerate() {
        mask[slot / k * n + e as usize] = 1.0;
    }
    Ok(Tensor::from_vec(mask, rows * n, device)?.to_dtype(dtype)?)
}

/// The expert ids of `ids` `[b, p, k]` (f32 after its hook) as integers, checked to be whole ids
/// below `n`.
fn expert_ids(ids: &Tensor, n: usize) -> Result<Vec<u32>> {
    let values: Vec<f32> = ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    values
        .iter()
        .map(|&v| {
            if v.fract() != 0.0 || v < 0.0 || v >= n as f32 {
                bail!("hook_expert_indices holds {v}, not an expert id (0..{n})");
            }
            Ok(v as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn top_k_is_descending_with_ties_to_the_lower_index() {
        let x = Tensor::new(&[[0.1f32, 0.5, 0.2, 0.5], [3.0, 1.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(top_k(&x, 2).unwrap(), [1, 3, 0, 2]);
    }

    #[test]
    fn replaced_indices_must_be_expert_ids() {
        let ids = |v: f32| Tensor::new(&[[[0f32, v]]], &Device::Cpu).unwrap();
        assert_eq!(expert_ids(&ids(7.0), 8).unwrap(), [0, 7]);
        for bad in [8.0, -1.0, 1.5, f32::NAN] {
            let err = expert_ids(&ids(bad), 8).unwrap_err().to_string();
            assert!(err.contains("not an expert id (0..8)"), "{err}");
        }
    }

    /// The routed computation equals running every expert on every token and summing the chosen
    /// ones by hand.
    #[test]
    fn routed_experts_equal_the_dense_sum_over_the_chosen() {
        let dev = Device::Cpu;
        let (n, k, d, f) = (5, 2, 6, 4);
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        for norm in [false, true] {
            let moe = SparseMoe {
                router: r(&[n, d]),
                gate_up: (0..n).map(|_| r(&[2 * f, d])).collect(),
                down: (0..n).map(|_| r(&[d, f])).collect(),
                top_k: k,
                norm_topk_prob: norm,
            };
            moe.check(d, f, "test").unwrap();
            let x = r(&[2, 3, d]);
            let got = moe.forward(0, &x, &mut Hooks::new(), false).unwrap();
            let rows: Vec<Vec<f32>> = x.reshape((6, d)).unwrap().to_vec2().unwrap();
            let got: Vec<Vec<f32>> = got.reshape((6, d)).unwrap().to_vec2().unwrap();
            for (t, row) in rows.iter().enumerate() {
                let xt = Tensor::new(row.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
                let logits: Vec<f32> =
                    xt.matmul(&moe.router.t().unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                let z: f32 = logits.iter().map(|l| l.exp()).sum();
                let probs: Vec<f32> = logits.iter().map(|l| l.exp() / z).collect();
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                let total: f32 = order[..k].iter().map(|&e| probs[e]).sum();
                let mut want = vec![0f32; d];
                for &e in &order[..k] {
                    let h = xt.matmul(&moe.gate_up[e].t().unwrap()).unwrap();
                    let act =
                        (h.narrow(1, 0, f).unwrap().silu().unwrap() * h.narrow(1, f, f).unwrap()).unwrap();
                    let y: Vec<f32> =
                        act.matmul(&moe.down[e].t().unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                    let w = if norm { probs[e] / total } else { probs[e] };
                    want.iter_mut().zip(y).for_each(|(a, b)| *a += w * b);
                }
                for (a, b) in got[t].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "token {t}: {a} vs {b}");
                }
            }
        }
    }
}
