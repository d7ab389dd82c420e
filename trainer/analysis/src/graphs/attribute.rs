//! Edge weights of an attribution graph: the direct effect of each source node on each target
//! through the frozen replacement model ([`super::replacement`]), a batch of targets per backward
//! pass.
//!
//! As circuit-tracer 0.5.0 (`attribution/attribute.py`, `context_transformerlens.py`,
//! `targets.py`):
//! - targets: the logits first (the most probable at the last position until their probability
//!   reaches `logit_probability`, at most `max_logits`; each a demeaned unembedding row read at
//!   the final norm's output, so its value is logit − mean logit), then features in order of
//!   influence, `batch` at a time, re-ranked every 4 batches, up to `max_feature_nodes`; a
//!   feature target is its encoder vector read at its layer's `ln2.hook_normalized`;
//! - sources: token embeddings (`hook_embed`), active features at positions ≥ 1 (position 0,
//!   BOS, is zeroed), errors (real `hook_mlp_out` − transcoder output, zero at position 0);
//!   a source's edge is its activation × (its decoder vectors into every layer the target reads
//!   it through · the backward vector there), an error's or embedding's its vector · the
//!   backward vector;
//! - the backward: attention patterns and norm scales frozen, gradients through the skip
//!   connection, not through MLPs.
//!
//! Where Loupe differs, and why:
//! - Memory. circuit-tracer holds every computed row over *all* active features (rows ×
//!   columns, tens of GB at 2,048 tokens) to re-rank features; Loupe never does. When the
//!   active features exceed `max_feature_nodes` it selects in a first pass that keeps each row
//!   only as its absolute sum (exact) and its [`INFLUENCE_ENTRIES`] largest feature entries
//!   (sparse), ranks with circuit-tracer's power iteration on those, then computes the selected
//!   features' and logits' rows again in a second pass over the final columns only (twice the
//!   backward work for exact edges in bounded memory). The selection equals circuit-tracer's
//!   whenever no row has more than [`INFLUENCE_ENTRIES`] nonzero feature entries; beyond that
//!   the smallest edges are left out of the influence estimate (not out of the graph: every
//!   stored edge is exact). When every active feature fits (`max_feature_nodes` ≥ active),
//!   there is one pass and the graph is circuit-tracer's. When the selection pass's rows fit
//!   [`FULL_ROWS_BYTES`] whole (over every active feature: up to ~512 tokens with 7,500
//!   features on Gemma 3 270M with TopK-16 transcoders), they are kept and the second pass is
//!   skipped.
//! - Order. Nodes are embeddings, features, errors, logits ([`super::RawGraph`]); rows are the
//!   selected features then the logits. Rows are computed in batches sorted by position so
//!   that each batch backs up only to its last position.
//! - Cost. The arithmetic is circuit-tracer's (per target and layer, the OV maps at every
//!   position up to the target's, and the banded pattern products); on 2 CPU cores that is
//!   ~0.13 s of CPU per target at 512 tokens and ~2.7 s at 2,048 (Gemma 3 270M), so a
//!   2,048-token graph of 7,500 features takes hours here. Memory stays bounded: measured peak
//!   RSS 2.2 GiB at 64 tokens (7,500 features), 2.4 GiB at 512 (64 features) and 7.9 GiB at
//!   2,048 (64 features, batch 256; the 7,500-feature adjacency and ranking rows add ~2 GB).
//! - Constant terms. Each target's `bias` is its value in the frozen model with every source
//!   zero (biases, BOS's MLP outputs, GPT-2's position embeddings, b_enc), computed by the
//!   independent forward — so `row sum + bias = pre-activation` is a real check.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use loupe_dict::transcoder::TranscoderSet;
use loupe_model::HookedModel;
use loupe_store::{GraphSettings, Progress};
use rayon::prelude::*;

use super::replacement::{Replacement, Target, dot_last};
use super::{Node, NodeKind, RawGraph};

/// Feature entries of each row kept for ranking by influence when not every active feature can
/// be selected.
pub const INFLUENCE_ENTRIES: usize = 8192;
/// Memory the selection pass may spend on keeping its rows whole (over every active feature),
/// so that the selected rows need not be computed again.
pub const FULL_ROWS_BYTES: usize = 6 << 30;
/// Batches computed between re-rankings (circuit-tracer's `update_interval`).
const UPDATE_INTERVAL: usize = 4;
/// No column.
const NONE: u32 = u32::MAX;

/// The unpruned graph of `tokens` (BOS first) through `transcoders`: the top logits, the
/// features selected by influence (at most `settings.max_feature_nodes`), every error and
/// embedding node, and the incoming edges of the logits and selected features.
pub fn attribute(
    model: &dyn HookedModel,
    transcoders: &TranscoderSet,
    tokens: &[u32],
    settings: &GraphSettings,
    progress: &dyn Progress,
) -> Result<RawGraph> {
    if tokens.len() < 2 {
        bail!("a prompt needs at least 2 tokens (BOS and one more), got {}", tokens.len());
    }
    progress.stage("forward");
    let rep = Replacement::new(model.freeze(tokens)?, transcoders)?;
    attribute_with(&rep, transcoders, tokens, settings, INFLUENCE_ENTRIES, FULL_ROWS_BYTES, progress)
}

/// [`attribute`] on a built replacement model, keeping `entries` feature entries per row for
/// the ranking, and the selection pass's rows whole when they take at most `full_rows_bytes`.
pub fn attribute_with(
    rep: &Replacement,
    transcoders: &TranscoderSet,
    tokens: &[u32],
    settings: &GraphSettings,
    entries: usize,
    full_rows_bytes: usize,
    progress: &dyn Progress,
) -> Result<RawGraph> {
    let (seq, n_layers) = (rep.seq, rep.n_layers);
    if tokens.len() != seq {
        bail!("{} tokens for a replacement model of {seq}", tokens.len());
    }
    let logits = rep.logit_targets(settings.max_logits as usize, settings.logit_probability)?;
    let n_active = rep.active.len();
    let max = (settings.max_feature_nodes as usize).min(n_active);
    let batch = settings.batch.max(1) as usize;
    let (selected, full) = if max == n_active {
        ((0..n_active).collect(), None)
    } else {
        let probs: Vec<f32> = logits.iter().map(|l| l.1).collect();
        let logit_targets: Vec<Target> = logits.iter().map(|l| l.3.clone()).collect();
        let row_bytes = (seq + n_active + n_layers * seq) * 4;
        let keep_full = (logits.len() + max).saturating_mul(row_bytes) <= full_rows_bytes;
        let ranking = Ranking { max, batch, entries, keep_full };
        select(rep, transcoders, &logit_targets, &probs, &ranking, progress)?
    };
    let cols = Columns::new(rep, &selected, logits.len());

    let node = |kind, layer, position, feature, activation| Node {
        kind,
        layer,
        position,
        feature,
        activation,
        probability: None,
    };
    let mut nodes = Vec::with_capacity(cols.n_cols);
    for (p, &token) in tokens.iter().enumerate() {
        nodes.push(node(NodeKind::Embedding, 0, p, token, 0.0));
    }
    for &i in &selected {
        let a = &rep.active[i];
        nodes.push(node(NodeKind::Feature, a.layer, a.pos, a.feature, a.activation));
    }
    for l in 0..n_layers {
        for p in 0..seq {
            nodes.push(node(NodeKind::Error, l, p, 0, 0.0));
        }
    }
    for (t, p, _, _) in &logits {
        nodes.push(Node { probability: Some(*p), ..node(NodeKind::Logit, n_layers, seq - 1, *t, 0.0) });
    }

    let mut targets: Vec<Target> =
        selected.iter().map(|&i| rep.feature_target(i, transcoders)).collect::<Result<_>>()?;
    targets.extend(logits.iter().map(|l| l.3.clone()));
    let first_logit = cols.n_cols - logits.len();
    let target_nodes: Vec<u32> = (0..selected.len())
        .map(|j| (seq + j) as u32)
        .chain((0..logits.len()).map(|j| (first_logit + j) as u32))
        .collect();

    let n = cols.n_cols;
    let mut adjacency = vec![0f32; targets.len() * n];
    if let Some(full) = full {
        // The selection pass's whole rows, restricted to the final columns.
        let by_node: std::collections::HashMap<usize, &[f32]> =
            full.iter().map(|(node, row)| (*node, row.as_slice())).collect();
        let keys = selected.iter().copied().chain((0..logits.len()).map(|j| n_active + j));
        for (t, key) in keys.enumerate() {
            let (src, dst) = (by_node[&key], &mut adjacency[t * n..(t + 1) * n]);
            dst[..seq].copy_from_slice(&src[..seq]);
            for (j, &i) in selected.iter().enumerate() {
                dst[seq + j] = src[seq + i];
            }
            let errors = n_layers * seq;
            let at = seq + selected.len();
            dst[at..at + errors].copy_from_slice(&src[seq + n_active..seq + n_active + errors]);
        }
        return finish(rep, transcoders, &selected, &logits, nodes, &targets, target_nodes, adjacency);
    }
    progress.stage("edges");
    let mut order: Vec<usize> = (0..targets.len()).collect();
    order.sort_by_key(|&t| (targets[t].pos, targets[t].layer));
    let mut done = 0;
    for chunk in order.chunks(batch) {
        let batch_targets: Vec<&Target> = chunk.iter().map(|&t| &targets[t]).collect();
        let rows = rows(rep, &cols, &batch_targets)?;
        for (k, &t) in chunk.iter().enumerate() {
            adjacency[t * n..(t + 1) * n].copy_from_slice(&rows[k * n..(k + 1) * n]);
        }
        done += chunk.len();
        progress.set(done as u64, targets.len() as u64);
    }

    finish(rep, transcoders, &selected, &logits, nodes, &targets, target_nodes, adjacency)
}

/// The graph with each target's constant term and real pre-activation.
#[allow(clippy::too_many_arguments)]
fn finish(
    rep: &Replacement,
    transcoders: &TranscoderSet,
    selected: &[usize],
    logits: &[(u32, f32, f32, Target)],
    nodes: Vec<Node>,
    targets: &[Target],
    target_nodes: Vec<u32>,
    adjacency: Vec<f32>,
) -> Result<RawGraph> {
    let n_active = rep.active.len();
    let zero = rep.run(&rep.zero_sources()?)?;
    let bias = targets.iter().map(|t| rep.target_value(&zero, t)).collect::<Result<Vec<f32>>>()?;
    let mut pre_activation =
        selected.iter().map(|&i| rep.feature_pre_activation(i, transcoders)).collect::<Result<Vec<f32>>>()?;
    pre_activation.extend(logits.iter().map(|l| l.2));
    Ok(RawGraph {
        nodes,
        targets: target_nodes,
        adjacency,
        bias,
        pre_activation,
        active_features: n_active as u64,
    })
}

/// Where each source is in a row.
pub struct Columns {
    seq: usize,
    /// Per active feature, its column or [`NONE`].
    feature: Vec<u32>,
    n_features: usize,
    pub n_cols: usize,
}

impl Columns {
    /// Embeddings, the `selected` features (indices into `rep.active`, ascending), errors,
    /// `n_logits` logits.
    pub fn new(rep: &Replacement, selected: &[usize], n_logits: usize) -> Columns {
        let mut feature = vec![NONE; rep.active.len()];
        for (j, &i) in selected.iter().enumerate() {
            feature[i] = (rep.seq + j) as u32;
        }
        let n_cols = rep.seq + selected.len() + rep.n_layers * rep.seq + n_logits;
        Columns { seq: rep.seq, feature, n_features: selected.len(), n_cols }
    }

    fn error(&self, layer: usize, pos: usize) -> usize {
        self.seq + self.n_features + layer * self.seq + pos
    }
}

/// Most (target, position) pairs one backward holds: its working tensors are a few times
/// `[targets, positions, d_model]` (~190 MiB each at Gemma 3 270M's width), whatever `batch` is.
const MAX_TARGET_POSITIONS: usize = 1 << 16;

/// The rows of `targets` over `cols`, `[targets, n_cols]`: backwards through the frozen
/// replacement model for as many targets at once as [`MAX_TARGET_POSITIONS`] allows, truncated
/// to their last position.
pub fn rows(rep: &Replacement, cols: &Columns, targets: &[&Target]) -> Result<Vec<f32>> {
    let p = targets.iter().map(|t| t.pos).max().unwrap_or(0) + 1;
    let per = (MAX_TARGET_POSITIONS / p).max(1);
    if targets.len() <= per {
        return rows_once(rep, cols, targets);
    }
    let mut out = Vec::with_capacity(targets.len() * cols.n_cols);
    for chunk in targets.chunks(per) {
        out.extend(rows_once(rep, cols, chunk)?);
    }
    Ok(out)
}

/// [`rows`] in one backward.
fn rows_once(rep: &Replacement, cols: &Columns, targets: &[&Target]) -> Result<Vec<f32>> {
    let (n_layers, d) = (rep.n_layers, rep.d_model);
    let b = targets.len();
    let p = targets.iter().map(|t| t.pos).max().unwrap_or(0) + 1;
    let nc = cols.n_cols;
    let mut out = vec![0f32; b * nc];
    let inject = |layer: usize| -> Result<Option<Tensor>> {
        if !targets.iter().any(|t| t.layer == layer) {
            return Ok(None);
        }
        let mut v = vec![0f32; b * p * d];
        for (k, t) in targets.iter().enumerate().filter(|(_, t)| t.layer == layer) {
            v[(k * p + t.pos) * d..(k * p + t.pos + 1) * d].copy_from_slice(&t.vector);
        }
        Ok(Some(Tensor::from_vec(v, (b, p, d), &Device::Cpu)?))
    };
    let top = targets.iter().map(|t| t.layer).max().unwrap_or(0);
    let mut g = Tensor::zeros((b, p, d), DType::F32, &Device::Cpu)?;
    if let Some(x) = inject(n_layers)? {
        g = rep.frozen.ln_final.backward(&x)?;
    }
    // g: the gradient at hook_resid_post of layer l (= its hook_mlp_out); no layer above the
    // batch's highest target has any.
    for l in (0..n_layers.min(top + 1)).rev() {
        record_mlp_sources(rep, cols, l, &g, &mut out)?;
        let mut gm = match &rep.skips[l] {
            Some(w) => Some(g.reshape((b * p, d))?.matmul(w)?.reshape((b, p, d))?),
            None => None,
        };
        if let Some(x) = inject(l)? {
            gm = Some(match gm {
                Some(m) => (m + x)?,
                None => x,
            });
        }
        if let Some(m) = gm {
            g = (&g + rep.frozen.layers[l].ln2.backward(&m)?)?;
        }
        g = (&g + rep.frozen.attn_backward(l, &g)?)?;
    }
    let e = dot_last(&g, &rep.frozen.embed.narrow(0, 0, p)?)?.to_vec2::<f32>()?;
    for (k, row) in e.iter().enumerate() {
        out[k * nc..k * nc + p].copy_from_slice(row);
    }
    Ok(out)
}

/// The edges from layer `l`'s MLP output (errors and the features decoding into it) for the
/// gradient `g` `[batch, p, d_model]` there.
fn record_mlp_sources(
    rep: &Replacement,
    cols: &Columns,
    l: usize,
    g: &Tensor,
    out: &mut [f32],
) -> Result<()> {
    let (b, p, d) = g.dims3()?;
    let nc = cols.n_cols;
    let e = dot_last(g, &rep.errors[l].narrow(0, 0, p)?)?.to_vec2::<f32>()?;
    for (k, row) in e.iter().enumerate() {
        let start = k * nc + cols.error(l, 0);
        out[start..start + p].copy_from_slice(row);
    }
    let mut gt: Option<Tensor> = None;
    for source in 0..=l {
        let Some(w_dec) = rep.decoder(source, l - source) else { continue };
        let features: Vec<usize> = rep.layer_ranges[source]
            .clone()
            .filter(|&i| rep.active[i].pos < p && cols.feature[i] != NONE)
            .collect();
        if features.is_empty() {
            continue;
        }
        // Decoder rows × activations, padded per position: [p, kmax, d], one batched GEMM.
        let mut slot = vec![0usize; p];
        let mut slots = Vec::with_capacity(features.len());
        for &i in &features {
            let pos = rep.active[i].pos;
            slots.push(slot[pos]);
            slot[pos] += 1;
        }
        let kmax = slot.iter().copied().max().unwrap_or(0);
        let mut padded = vec![0f32; p * kmax * d];
        for (&i, &s) in features.iter().zip(&slots) {
            let a = &rep.active[i];
            let f = a.feature as usize;
            let row = &mut padded[(a.pos * kmax + s) * d..(a.pos * kmax + s + 1) * d];
            row.iter_mut().zip(&w_dec[f * d..(f + 1) * d]).for_each(|(o, w)| *o = a.activation * w);
        }
        let padded = Tensor::from_vec(padded, (p, kmax, d), &Device::Cpu)?;
        if gt.is_none() {
            gt = Some(g.transpose(0, 1)?.contiguous()?); // [p, b, d]
        }
        let gt = gt.as_ref().expect("set above");
        // [p, b, kmax]
        let dots = gt.matmul(&padded.transpose(1, 2)?)?.flatten_all()?.to_vec1::<f32>()?;
        for (&i, &s) in features.iter().zip(&slots) {
            let pos = rep.active[i].pos;
            let col = cols.feature[i] as usize;
            for k in 0..b {
                out[k * nc + col] += dots[(pos * b + k) * kmax + s];
            }
        }
    }
    Ok(())
}

/// A row kept for ranking: its node (an active feature, or `n_active + j` for logit j), its
/// absolute sum over every column and its largest feature entries (absolute values).
struct SparseRow {
    node: usize,
    total: f32,
    entries: Vec<(u32, f32)>,
}

/// How [`select`] ranks.
#[derive(Clone, Copy)]
struct Ranking {
    /// Features to select.
    max: usize,
    /// Targets per backward.
    batch: usize,
    /// Feature entries kept per row for the influence.
    entries: usize,
    /// Keep each row whole too.
    keep_full: bool,
}

/// Rows kept whole, each with its node (an active feature, or `n_active + j` for logit j).
type FullRows = Vec<(usize, Vec<f32>)>;

/// circuit-tracer's selection of `max` features by influence on the logits, ranking on rows
/// kept sparse; with the rows themselves (over every active feature) when `keep_full`.
fn select(
    rep: &Replacement,
    transcoders: &TranscoderSet,
    logit_targets: &[Target],
    probs: &[f32],
    ranking: &Ranking,
    progress: &dyn Progress,
) -> Result<(Vec<usize>, Option<FullRows>)> {
    let Ranking { max, batch, entries, keep_full } = *ranking;
    progress.stage("selecting features");
    let mut full: FullRows = Vec::new();
    let n_active = rep.active.len();
    let all: Vec<usize> = (0..n_active).collect();
    let cols = Columns::new(rep, &all, 0);
    let sparse = |row: &[f32], node: usize| -> SparseRow {
        let total = row.iter().map(|v| v.abs()).sum();
        let mut e: Vec<(u32, f32)> = row[rep.seq..rep.seq + n_active]
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, v)| (i as u32, v.abs()))
            .collect();
        if e.len() > entries {
            e.select_nth_unstable_by(entries - 1, |a, b| b.1.total_cmp(&a.1));
            e.truncate(entries);
        }
        SparseRow { node, total, entries: e }
    };
    let nc = cols.n_cols;
    let mut kept: Vec<SparseRow> = Vec::new();
    for (c, chunk) in logit_targets.chunks(batch).enumerate() {
        let refs: Vec<&Target> = chunk.iter().collect();
        let r = rows(rep, &cols, &refs)?;
        kept.extend(
            (0..chunk.len())
                .into_par_iter()
                .map(|k| sparse(&r[k * nc..(k + 1) * nc], n_active + c * batch + k))
                .collect::<Vec<_>>(),
        );
        if keep_full {
            full.extend(
                (0..chunk.len()).map(|k| (n_active + c * batch + k, r[k * nc..(k + 1) * nc].to_vec())),
            );
        }
    }
    let mut visited = vec![false; n_active];
    let mut n_visited = 0;
    while n_visited < max {
        let influence = partial_influences(&kept, probs, n_active)?;
        let mut rank: Vec<usize> = (0..n_active).filter(|&i| !visited[i]).collect();
        rank.sort_by(|a, b| influence[*b].total_cmp(&influence[*a]).then(a.cmp(b)));
        rank.truncate((UPDATE_INTERVAL * batch).min(max - n_visited));
        // The whole queue is computed before the next ranking, so its order is free: by
        // position, each batch backs up only as far as it needs.
        rank.sort_by_key(|&i| rep.active[i].pos);
        for chunk in rank.chunks(batch) {
            let targets: Vec<Target> =
                chunk.iter().map(|&i| rep.feature_target(i, transcoders)).collect::<Result<_>>()?;
            let refs: Vec<&Target> = targets.iter().collect();
            let r = rows(rep, &cols, &refs)?;
            kept.extend(
                (0..chunk.len())
                    .into_par_iter()
                    .map(|k| sparse(&r[k * nc..(k + 1) * nc], chunk[k]))
                    .collect::<Vec<_>>(),
            );
            if keep_full {
                full.extend(chunk.iter().enumerate().map(|(k, &i)| (i, r[k * nc..(k + 1) * nc].to_vec())));
            }
            for &i in chunk {
                visited[i] = true;
            }
            n_visited += chunk.len();
            progress.set(n_visited as u64, max as u64);
        }
    }
    Ok(((0..n_active).filter(|&i| visited[i]).collect(), keep_full.then_some(full)))
}

/// circuit-tracer's `compute_partial_influences`: rows normalised to absolute sum 1, the logits'
/// probabilities pushed back through them until nothing is left; each active feature's total.
fn partial_influences(rows: &[SparseRow], probs: &[f32], n_active: usize) -> Result<Vec<f64>> {
    let mut prod = vec![0f64; n_active + probs.len()];
    for (j, &p) in probs.iter().enumerate() {
        prod[n_active + j] = p as f64;
    }
    let mut influence = vec![0f64; n_active];
    for _ in 0..128 {
        let mut next = vec![0f64; n_active + probs.len()];
        for r in rows {
            let w = prod[r.node] / (r.total as f64).max(1e-8);
            if w != 0.0 {
                for &(c, v) in &r.entries {
                    next[c as usize] += w * v as f64;
                }
            }
        }
        if next.iter().all(|v| *v == 0.0) {
            return Ok(influence);
        }
        influence.iter_mut().zip(&next).for_each(|(i, n)| *i += n);
        prod = next;
    }
    bail!("feature influences did not converge in 128 steps")
}

#[cfg(test)]
#[path = "attribute_tests.rs"]
mod tests;
