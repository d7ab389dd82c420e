//! Attribution patching: each node's and each edge's effect to first order, normalised like
//! [`super::patching`]'s effects (divided by m_corrupt − m_clean, the metric averaged over the
//! pairs).
//!
//! - A node: (a_corrupt − a_clean) · ∂m/∂a, summed over positions and pairs, where a is the
//!   node's output (a head's slice of `attn.hook_z`, an MLP's `hook_mlp_out`) and m the metric
//!   averaged over the pairs. The gradients at every node come from one backward pass of the
//!   clean run, taken through zero-valued gradient variables added at each `hook_z` and
//!   `hook_mlp_out` (so the gradient at a node is its total one, through every later node; a
//!   [`Hooks::grad`] target cuts the graph there and would leave only direct paths).
//! - An edge u → v (EAP): Δr_u · g_v summed over positions and pairs, where Δr_u is what u adds
//!   to the residual stream on the corrupt run minus on the clean run
//!   ([`HookedModel::residual_components`]), and g_v = J_vᵀ ∂m/∂a_v is the gradient of m with
//!   respect to a private copy of v's input that feeds only v (`hook_resid_pre` of v's block
//!   for a head, `hook_resid_mid` for an MLP), J_v the Jacobian of v's output at the clean
//!   input. It is the first-order change of m when v alone reads u's corrupt contribution. The
//!   g_v of one layer come from one pass of the clean batch started at the layer
//!   ([`Hooks::start_at`]) and stopped after it, and a backward per node of ⟨a_v, ∂m/∂a_v⟩ to
//!   `hook_resid_pre` (a head: through its attention only) or `hook_resid_mid` (the MLP).
//!
//! Work: two forwards and one backward of the clean batch (the metric from the final hidden
//! state at each pair's last position only), two residual splits, and n_layers one-block passes
//! with a backward per node.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{D, Device, Tensor, Var};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};
use loupe_store::Progress;

use super::patch::Runs;
use super::patching::normaliser;
use super::{Metric, Node, Scores, Task};

/// Node and edge scores, normalised like [`super::patching`]'s effects (divided by
/// m_corrupt − m_clean).
pub fn attribution(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    progress: &dyn Progress,
) -> Result<Scores> {
    let c = model.config();
    let (_, denom) = normaliser(runs)?;
    let nodes = super::nodes(c);
    progress.stage("attribution");
    let total = (c.n_layers + 2) as u64;
    let (g_z, g_mlp) = node_gradients(model, task, runs)?;
    progress.set(1, total);
    let mut node_scores = Vec::with_capacity(nodes.len());
    for layer in 0..c.n_layers {
        let dz = (&runs.corrupt_z[layer] - &runs.clean_z[layer])?;
        let heads: Vec<f32> = (dz * &g_z[layer])?.sum(3)?.sum(1)?.sum(0)?.to_vec1()?;
        node_scores.extend(heads.iter().map(|s| s / denom));
        let dm = (&runs.corrupt_mlp[layer] - &runs.clean_mlp[layer])?;
        node_scores.push((dm * &g_mlp[layer])?.sum_all()?.to_scalar::<f32>()? / denom);
    }

    let deltas = residual_deltas(model, runs, &nodes)?;
    progress.set(2, total);
    // products[v][u] = Δr_u · g_v for the nodes u up to v's layer, a layer's g_v at once (one
    // read of those Δr) and dropped once used.
    let mut products: Vec<Vec<f32>> = Vec::with_capacity(nodes.len());
    for layer in 0..c.n_layers {
        let g = input_gradients(model, runs, layer, &g_z[layer], &g_mlp[layer])?;
        let g =
            Tensor::stack(&g.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?, 1)?;
        let upstream = deltas.narrow(0, 0, (layer + 1) * (c.n_heads + 1))?;
        products.extend(upstream.matmul(&g)?.t()?.to_vec2::<f32>()?);
        progress.set(layer as u64 + 3, total);
    }
    let edges = super::edges(&nodes).into_iter().map(|(u, v)| (u, v, products[v][u] / denom)).collect();
    Ok(Scores { nodes, node_scores, edges })
}

/// The metric of `task` averaged over its pairs, as a differentiable scalar of the final hidden
/// state `hidden` `[pairs, len, d_model]` at each pair's `last` position (logits of those rows
/// only).
pub fn metric_tensor(
    model: &dyn HookedModel,
    task: &Task,
    hidden: &Tensor,
    last: &[usize],
) -> Result<Tensor> {
    let w = model.unembedding().context("the model has no unembedding")?;
    let (pairs, len, d) = hidden.dims3()?;
    let rows: Vec<u32> = last.iter().enumerate().map(|(p, &l)| (p * len + l) as u32).collect();
    let rows = Tensor::new(rows.as_slice(), hidden.device())?;
    let h = hidden.reshape((pairs * len, d))?.index_select(&rows, 0)?.to_dtype(w.dtype())?;
    // Through the linear kernel, whose backward gives the unembedding no gradient (a matmul's
    // would compute a [vocab, d_model] one).
    let logits = loupe_model::ops::linear(&h, w, None)?.to_dtype(candle_core::DType::F32)?;
    let vocab = logits.dim(1)?;
    // ±1 at each pair's answers and wrongs: m = Σ sign · logit (or probability), per pair.
    let mut sign = vec![0f32; pairs * vocab];
    for (p, pair) in task.pairs.iter().enumerate() {
        pair.answers.iter().for_each(|&a| sign[p * vocab + a as usize] += 1.0);
        pair.wrongs.iter().for_each(|&a| sign[p * vocab + a as usize] -= 1.0);
    }
    let sign = Tensor::from_vec(sign, (pairs, vocab), logits.device())?;
    let values = match task.metric {
        Metric::LogitDiff => logits,
        Metric::ProbDiff => {
            // softmax, the row maximum a constant shift (no gradient needed through it)
            let e = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
    };
    Ok(((values * sign)?.sum_all()? / pairs as f64)?)
}

/// ∂m/∂`attn.hook_z` and ∂m/∂`hook_mlp_out` of every layer on the clean run (the total
/// gradient: zero variables added at those hooks keep the graph whole).
fn node_gradients(model: &dyn HookedModel, task: &Task, runs: &Runs) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let n_layers = model.config().n_layers;
    let add = |v: &Var| {
        let v = v.as_tensor().clone();
        Intervention::Map(Arc::new(move |x: &Tensor| x + &v))
    };
    // A gradient target at block 0's input makes every block run differentiable ops.
    let mut hooks = Hooks::new().grad(in_block(0, names::RESID_PRE)).skip_unembed();
    let mut vars = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let z = Var::zeros(runs.clean_z[layer].shape(), runs.clean_z[layer].dtype(), &Device::Cpu)?;
        let mlp = Var::zeros(runs.clean_mlp[layer].shape(), runs.clean_mlp[layer].dtype(), &Device::Cpu)?;
        hooks = hooks
            .intervene(in_block(layer, names::Z), add(&z))
            .intervene(in_block(layer, names::MLP_OUT), add(&mlp));
        vars.push((z, mlp));
    }
    let hidden = model.forward(&runs.clean, &mut hooks)?.context("the forward pass stopped early")?;
    let grads = metric_tensor(model, task, &hidden, &runs.last)?.backward()?;
    let grad = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        }
    };
    let mut g_z = Vec::with_capacity(n_layers);
    let mut g_mlp = Vec::with_capacity(n_layers);
    for (z, mlp) in &vars {
        g_z.push(grad(z)?);
        g_mlp.push(grad(mlp)?);
    }
    Ok((g_z, g_mlp))
}

/// What each node adds to the residual stream, corrupt minus clean, flattened: `[nodes,
/// pairs · len · d_model]`, in the order of `nodes`.
fn residual_deltas(model: &dyn HookedModel, runs: &Runs, nodes: &[Node]) -> Result<Tensor> {
    let hook = in_block(model.config().n_layers - 1, names::RESID_POST);
    let stacked = |tokens: &Tensor| -> Result<Tensor> {
        let terms = model.residual_components(tokens, &hook)?;
        let rows = nodes
            .iter()
            .map(|node| {
                let name = node.to_string();
                let t = terms
                    .iter()
                    .find(|(n, _)| *n == name)
                    .with_context(|| format!("no residual term {name}"))?;
                Ok(t.1.to_dtype(candle_core::DType::F32)?.flatten_all()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    };
    let clean = stacked(&runs.clean)?;
    Ok((stacked(&runs.corrupt)? - clean)?)
}

/// g_v `[pairs, len, d_model]` of each node v of `layer` (its heads, then its MLP): the gradient
/// of ⟨v's output, ∂m/∂(v's output)⟩ at v's input, from one pass of the clean batch that starts
/// at `layer` and stops after it, and one backward per node (a head's reaches only its
/// attention, the MLP's stops at `hook_resid_mid`).
fn input_gradients(
    model: &dyn HookedModel,
    runs: &Runs,
    layer: usize,
    g_z: &Tensor,
    g_mlp: &Tensor,
) -> Result<Vec<Tensor>> {
    let heads = model.config().n_heads;
    let (pre, mid) = (in_block(layer, names::RESID_PRE), in_block(layer, names::RESID_MID));
    let (z, mlp) = (in_block(layer, names::Z), in_block(layer, names::MLP_OUT));
    let mut hooks = Hooks::new()
        .start_at(layer, runs.clean_resid_pre[layer].clone())
        .grad(pre.as_str())
        .grad(mid.as_str())
        .capture(z.as_str())
        .capture(mlp.as_str())
        .stop_after_layer(layer);
    model.forward(&runs.clean, &mut hooks)?;
    let at = |loss: Tensor, hook: &str| -> Result<Tensor> {
        let grads = loss.backward()?;
        let var = hooks.var(hook).context("the gradient target was not reached")?;
        Ok(match grads.get(var.as_tensor()) {
            Some(g) => g.to_dtype(candle_core::DType::F32)?,
            None => var.as_tensor().zeros_like()?.to_dtype(candle_core::DType::F32)?,
        })
    };
    let z = hooks.get(&z)?;
    let mut out = Vec::with_capacity(heads + 1);
    for h in 0..heads {
        out.push(at((z.narrow(2, h, 1)? * g_z.narrow(2, h, 1)?)?.sum_all()?, &pre)?);
    }
    out.push(at((hooks.get(&mlp)? * g_mlp)?.sum_all()?, &mid)?);
    Ok(out)
}

#[cfg(test)]
mod tests;
