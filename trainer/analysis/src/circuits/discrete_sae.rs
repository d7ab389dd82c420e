//! Discrete-SAE circuit discovery (O'Neill & Bui, "Sparse autoencoders enable scalable and
//! reliable circuit identification in language models", 2024).
//!
//! Every prompt of the task is run once: the clean prompts are the positives (the model can
//! predict the answer), the corrupt ones the negatives. Each head's output in model space
//! (`attn.hook_result`, before the heads are summed) is averaged over the prompt's real positions
//! (pairs are right-padded to the longest: positions after [`Runs::last`] are left out). One
//! small SAE is fitted on all (prompt, head) vectors, and each is coded by its most active
//! feature (argmax; ties and all-zero rows take the lowest index, as numpy's argmax does). Then
//!
//! - node score of head h = |codes_pos(h) \ codes_neg(h)|: the codes h takes on some positive
//!   prompt and on no negative one;
//! - edge score of u → v (heads only, u [precedes](Node::precedes) v) = the number of distinct
//!   code pairs (code_u, code_v) seen together on some positive prompt and on no negative one.
//!
//! MLP nodes (not in the paper) are scored the same way from `hook_mlp_out` averaged over the real
//! positions, with a second SAE of the same settings (seed + 1) fitted on the (prompt, MLP)
//! vectors alone, so that the heads' codes are exactly the paper's method; MLPs get no edges.
//!
//! The SAE follows the paper's code (github.com/charlieoneill11/sae-circuits, `src/sae.py`,
//! `src/train.py`): inputs are the raw averaged outputs, not normalised; a tied bias b (zero at
//! the start) is subtracted before the encoder and added after the decoder;
//! f = ReLU(W_enc (x − b) + b_enc), x̂ = W_dec f + b; loss = the mean squared error over all
//! elements plus `l1` × the mean over vectors of ‖f‖₁; Adam (PyTorch's defaults, β = 0.9/0.999, ε = 1e-8).
//! Encoder rows and decoder columns (each feature's dictionary vector) are rescaled to unit norm
//! after every step. Departures, each for the sake of a bounded, task-independent cost: the
//! paper takes 500 full-batch steps on the vectors of 10 prompts; we take `steps` Adam steps of
//! `batch` vectors drawn without replacement from all of them (reshuffled after each pass), and
//! its decoder normalisation (along the feature axis, a slip of its copied layer) is replaced by
//! the usual one of each dictionary vector. Everything random (initialisation, batches) is a
//! splitmix64 stream of `seed`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks};
use loupe_store::Progress;

use super::patch::Runs;
use super::{Node, Scores, Task, edges, nodes};
use crate::heads::detectors::splitmix64;

/// The discrete SAE's settings: the paper's features, L1 and learning rate; our steps and batch.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteSaeConfig {
    pub features: usize,
    pub l1: f32,
    pub lr: f64,
    /// Adam steps.
    pub steps: usize,
    /// Vectors per step (all of them when there are fewer).
    pub batch: usize,
    pub seed: u64,
}

impl Default for DiscreteSaeConfig {
    fn default() -> Self {
        DiscreteSaeConfig { features: 200, l1: 0.02, lr: 1e-3, steps: 500, batch: 256, seed: 0 }
    }
}

impl DiscreteSaeConfig {
    /// One line for a setting that cannot train.
    pub fn check(&self) -> Result<()> {
        if self.features == 0 || self.steps == 0 || self.batch == 0 {
            bail!("the discrete SAE needs at least 1 feature, 1 step and a batch of 1");
        }
        let l1_ok = self.l1.is_finite() && self.l1 >= 0.0;
        let lr_ok = self.lr.is_finite() && self.lr > 0.0;
        if !l1_ok || !lr_ok {
            bail!("the discrete SAE's L1 must be ≥ 0 and its learning rate > 0");
        }
        Ok(())
    }

    /// The settings as a circuit entry records them.
    pub fn settings(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::from([
            ("features".into(), self.features.into()),
            ("l1".into(), f64::from(self.l1).into()),
            ("lr".into(), self.lr.into()),
            ("steps".into(), self.steps.into()),
            ("batch".into(), self.batch.into()),
            ("seed".into(), self.seed.into()),
        ])
    }
}

/// Node scores (and edges between heads) of the discrete-SAE method.
pub fn discrete_sae(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    config: &DiscreteSaeConfig,
    progress: &dyn Progress,
) -> Result<Scores> {
    config.check()?;
    let all = nodes(model.config());
    let pairs = task.pairs.len();
    progress.stage("head outputs");
    let clean = node_means(model, &runs.clean, &runs.clean_mlp, &runs.last)?;
    let corrupt = node_means(model, &runs.corrupt, &runs.corrupt_mlp, &runs.last)?;
    let vectors = Tensor::cat(&[clean, corrupt], 0)?;
    let positive: Vec<bool> = (0..2 * pairs).map(|i| i < pairs).collect();
    scores_from_vectors(&all, &vectors, &positive, config, progress)
}

/// Each prompt's mean output of every node over its real positions, `[prompts, nodes, d_model]`
/// in [`nodes`] order: heads from a forward of `tokens` capturing `attn.hook_result`, MLPs from
/// the cached `hook_mlp_out` `mlp` of each layer.
fn node_means(model: &dyn HookedModel, tokens: &Tensor, mlp: &[Tensor], last: &[usize]) -> Result<Tensor> {
    let c = model.config();
    let (rows, len) = tokens.dims2()?;
    // Chunks of prompts so that the captured results stay under 256 MiB.
    let per_prompt = len * c.n_heads * c.d_model * c.n_layers * 4;
    let chunk = ((256 << 20) / per_prompt.max(1)).clamp(1, rows);
    let mut heads = Vec::new(); // per chunk: [chunk, layers * heads, d_model]
    for start in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - start);
        let mut hooks = Hooks::new().skip_unembed();
        for l in 0..c.n_layers {
            hooks = hooks.capture(in_block(l, names::RESULT));
        }
        model.forward(&tokens.narrow(0, start, n)?, &mut hooks)?;
        let mask = position_mask(&last[start..start + n], len)?;
        let layers = (0..c.n_layers)
            .map(|l| {
                let r = hooks.get(&in_block(l, names::RESULT))?.to_dtype(DType::F32)?;
                masked_mean(&r, &mask)
            })
            .collect::<Result<Vec<_>>>()?;
        heads.push(Tensor::cat(&layers, 1)?);
    }
    let heads = Tensor::cat(&heads, 0)?; // [rows, layers * heads, d_model]
    let mask = position_mask(last, len)?;
    let mut columns = Vec::with_capacity(c.n_layers * (c.n_heads + 1));
    for (l, m) in mlp.iter().enumerate() {
        columns.push(heads.narrow(1, l * c.n_heads, c.n_heads)?);
        columns.push(masked_mean(&m.to_dtype(DType::F32)?, &mask)?.unsqueeze(1)?);
    }
    Ok(Tensor::cat(&columns, 1)?)
}

/// `[rows, len]`: 1 at each row's positions up to its `last`, 0 after.
fn position_mask(last: &[usize], len: usize) -> Result<Tensor> {
    let m: Vec<f32> =
        last.iter().flat_map(|&l| (0..len).map(move |p| if p <= l { 1.0 } else { 0.0 })).collect();
    Ok(Tensor::from_vec(m, (last.len(), len), &Device::Cpu)?)
}

/// The mean over positions (dim 1) of `x` `[rows, len, …]` where `mask` `[rows, len]` is 1.
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mut m = mask.clone();
    for _ in 2..x.rank() {
        m = m.unsqueeze(D::Minus1)?;
    }
    let sum = x.broadcast_mul(&m)?.sum(1)?;
    let mut count = mask.sum_keepdim(1)?;
    for _ in 3..x.rank() {
        count = count.unsqueeze(D::Minus1)?;
    }
    Ok(sum.broadcast_div(&count)?)
}

/// The method from per-(prompt, node) vectors `[prompts, nodes, d]` (`nodes` in that order) and
/// each prompt's label: one SAE on the heads' vectors, one on the MLPs', then [`score_codes`].
pub fn scores_from_vectors(
    nodes: &[Node],
    vectors: &Tensor,
    positive: &[bool],
    config: &DiscreteSaeConfig,
    progress: &dyn Progress,
) -> Result<Scores> {
    config.check()?;
    let (prompts, n, d) = vectors.dims3()?;
    if n != nodes.len() || prompts != positive.len() {
        bail!(
            "{prompts} prompts × {n} nodes of vectors for {} labels and {} nodes",
            positive.len(),
            nodes.len()
        );
    }
    let mut codes = vec![vec![0u32; n]; prompts];
    for (kind, is_head, seed) in [("heads", true, config.seed), ("MLPs", false, config.seed.wrapping_add(1))]
    {
        let columns: Vec<usize> = (0..n).filter(|&i| nodes[i].head.is_some() == is_head).collect();
        if columns.is_empty() {
            continue;
        }
        let index =
            Tensor::from_vec(columns.iter().map(|&i| i as u32).collect(), columns.len(), &Device::Cpu)?;
        let x =
            vectors.to_dtype(DType::F32)?.index_select(&index, 1)?.reshape((prompts * columns.len(), d))?;
        progress.stage(&format!("SAE on {kind}"));
        let sae = Sae::fit(&x, &DiscreteSaeConfig { seed, ..config.clone() }, progress)?;
        let found = sae.codes(&x)?;
        for (p, row) in codes.iter_mut().enumerate() {
            for (j, &i) in columns.iter().enumerate() {
                row[i] = found[p * columns.len() + j];
            }
        }
    }
    Ok(score_codes(nodes, &codes, positive))
}

/// Node and head-edge scores from each prompt's code of each node (`codes[prompt][node]`).
pub fn score_codes(nodes: &[Node], codes: &[Vec<u32>], positive: &[bool]) -> Scores {
    let unique = |sets: [BTreeSet<_>; 2]| sets[0].difference(&sets[1]).count() as f32;
    let by_label = |key: &dyn Fn(&[u32]) -> (u32, u32)| {
        let mut sets = [BTreeSet::new(), BTreeSet::new()];
        for (row, &pos) in codes.iter().zip(positive) {
            sets[usize::from(!pos)].insert(key(row));
        }
        sets
    };
    let node_scores = (0..nodes.len()).map(|i| unique(by_label(&|r| (r[i], 0)))).collect();
    let edges = edges(nodes)
        .into_iter()
        .filter(|&(u, v)| nodes[u].head.is_some() && nodes[v].head.is_some())
        .map(|(u, v)| (u, v, unique(by_label(&|r| (r[u], r[v])))))
        .collect();
    Scores { nodes: nodes.to_vec(), node_scores, edges }
}

/// Adam's β₁, β₂ and ε (PyTorch's defaults, as the paper used).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The small SAE: f = ReLU(W_enc (x − b) + b_enc), x̂ = W_dec f + b.
struct Sae {
    w_enc: Var, // [features, d]
    b_enc: Var, // [features]
    w_dec: Var, // [d, features]
    b: Var,     // [d]
}

impl Sae {
    fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(self.b.as_tensor())?;
        Ok(centred.matmul(&self.w_enc.as_tensor().t()?)?.broadcast_add(self.b_enc.as_tensor())?.relu()?)
    }

    /// Fit on the rows of `x` `[n, d]`.
    fn fit(x: &Tensor, config: &DiscreteSaeConfig, progress: &dyn Progress) -> Result<Sae> {
        let (n, d) = x.dims2()?;
        let f = config.features;
        let mut next = splitmix64(config.seed);
        let mut uniform = move || ((next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let mut normal = |count: usize| -> Vec<f32> {
            (0..count)
                .map(|_| {
                    let (u1, u2) = (uniform(), uniform());
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        let cpu = &Device::Cpu;
        let w_enc = unit_rows(&Tensor::from_vec(normal(f * d), (f, d), cpu)?)?;
        let w_dec = unit_rows(&Tensor::from_vec(normal(f * d), (f, d), cpu)?)?.t()?.contiguous()?;
        let bound = 1.0 / (d as f64).sqrt();
        let b_enc: Vec<f32> = (0..f).map(|_| ((uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let sae = Sae {
            w_enc: Var::from_tensor(&w_enc)?,
            b_enc: Var::from_tensor(&Tensor::from_vec(b_enc, f, cpu)?)?,
            w_dec: Var::from_tensor(&w_dec)?,
            b: Var::from_tensor(&Tensor::zeros(d, DType::F32, cpu)?)?,
        };
        let vars = [&sae.w_enc, &sae.b_enc, &sae.w_dec, &sae.b];
        let mut moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        let batch = config.batch.min(n);
        let mut order: Vec<u32> = Vec::new();
        for step in 0..config.steps {
            if order.len() < batch {
                order = (0..n as u32).collect();
                for i in (1..n).rev() {
                    order.swap(i, (uniform() * (i + 1) as f64) as usize % (i + 1));
                }
            }
            let take = order.split_off(order.len() - batch);
            let xb = x.index_select(&Tensor::from_vec(take, batch, cpu)?, 0)?;
            let acts = sae.encode(&xb)?;
            let recon = acts.matmul(&sae.w_dec.as_tensor().t()?)?.broadcast_add(sae.b.as_tensor())?;
            let mse = (recon - &xb)?.sqr()?.mean_all()?;
            let l1 = acts.sum(1)?.mean_all()?;
            let loss = (mse + (l1 * f64::from(config.l1))?)?;
            let grads = loss.backward()?;
            let t = (step + 1) as i32;
            let (bc1, bc2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
            for (var, (m, v)) in vars.iter().zip(moments.iter_mut()) {
                let Some(g) = grads.get(var.as_tensor()) else { continue };
                let g = g.detach();
                *m = ((&*m * BETA1)? + (&g * (1.0 - BETA1))?)?.detach();
                *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?.detach();
                let denom = ((&*v / bc2)?.sqrt()? + EPS)?;
                let update = ((&*m / bc1)? / denom)?.affine(config.lr, 0.0)?;
                var.set(&(var.as_tensor() - update)?.detach())?;
            }
            sae.w_enc.set(&unit_rows(sae.w_enc.as_tensor())?)?;
            sae.w_dec.set(&unit_rows(&sae.w_dec.as_tensor().t()?)?.t()?.contiguous()?)?;
            if step % 50 == 0 || step + 1 == config.steps {
                progress.set(step as u64 + 1, config.steps as u64);
            }
        }
        Ok(sae)
    }

    /// Each row's most active feature (the lowest index among equals).
    fn codes(&self, x: &Tensor) -> Result<Vec<u32>> {
        let acts = self.encode(x)?.to_vec2::<f32>()?;
        Ok(acts
            .iter()
            .map(|row| {
                let mut best = 0;
                for (i, &a) in row.iter().enumerate() {
                    if a > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }
}

/// `w` `[rows, d]` with each row scaled to unit norm.
fn unit_rows(w: &Tensor) -> Result<Tensor> {
    let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    Ok(w.broadcast_div(&norm)?.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(layer: usize, head: Option<usize>) -> Node {
        Node { layer, head }
    }

    #[test]
    fn codes_unique_to_positives_score_nodes_and_head_edges() {
        let nodes = [node(0, Some(0)), node(0, None), node(1, Some(0)), node(1, Some(1))];
        // prompts 0, 1 positive; 2, 3 negative.
        let codes = vec![vec![1, 5, 7, 2], vec![2, 5, 8, 2], vec![1, 5, 9, 2], vec![3, 6, 7, 2]];
        let s = score_codes(&nodes, &codes, &[true, true, false, false]);
        assert_eq!(s.node_scores, [1.0, 0.0, 1.0, 0.0]);
        // Head edges only: 0.0 → 1.0 and 0.0 → 1.1 (1.0 → 1.1 is the same layer; 0.mlp has none).
        let e: Vec<(usize, usize, f32)> = s.edges.clone();
        // 0.0 → 1.0: positive pairs (1,7), (2,8); negative (1,9), (3,7): 2 unique.
        // 0.0 → 1.1: positive (1,2), (2,2); negative (1,2), (3,2): 1 unique.
        assert_eq!(e, [(0, 2, 2.0), (0, 3, 1.0)]);
    }

    fn normal_stream(seed: u64) -> impl FnMut() -> f32 {
        let mut next = splitmix64(seed);
        let mut u = move || ((next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        move || ((-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos()) as f32
    }

    /// Planted: every node's output is one of two directions plus noise, drawn independently of
    /// the label — except head 1.1's, which takes two directions on positive prompts and two
    /// others on negative ones. It alone separates the labels, so it gets the top node score.
    #[test]
    fn a_head_that_alone_separates_the_labels_gets_the_top_node_score() {
        let nodes: Vec<Node> =
            (0..2).flat_map(|l| [node(l, Some(0)), node(l, Some(1)), node(l, None)]).collect();
        let planted = 4; // 1.1
        let (prompts, d) = (40, 16);
        let mut noise = normal_stream(7);
        let mut pick = splitmix64(11);
        let mut directions: Vec<Vec<f32>> = (0..nodes.len() * 2 + 2)
            .map(|_| {
                let v: Vec<f32> = (0..d).map(|_| noise()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter().map(|x| 3.0 * x / norm).collect()
            })
            .collect();
        let extra = directions.split_off(nodes.len() * 2); // the planted head's negative directions
        let positive: Vec<bool> = (0..prompts).map(|p| p % 2 == 0).collect();
        let mut data = Vec::with_capacity(prompts * nodes.len() * d);
        for &pos in &positive {
            for i in 0..nodes.len() {
                let which = (pick() % 2) as usize;
                let dir = if i == planted && !pos { &extra[which] } else { &directions[2 * i + which] };
                data.extend(dir.iter().map(|x| x + 0.05 * noise()));
            }
        }
        let vectors = Tensor::from_vec(data, (prompts, nodes.len(), d), &Device::Cpu).unwrap();
        let config = DiscreteSaeConfig { features: 32, steps: 400, batch: 64, ..Default::default() };
        let s = scores_from_vectors(&nodes, &vectors, &positive, &config, &()).unwrap();
        let top = (0..nodes.len()).max_by(|&a, &b| s.node_scores[a].total_cmp(&s.node_scores[b])).unwrap();
        assert_eq!(top, planted, "scores {:?}", s.node_scores);
        let rest = s.node_scores.iter().enumerate().filter(|&(i, _)| i != planted).map(|(_, &v)| v);
        assert!(rest.fold(0.0f32, f32::max) < s.node_scores[planted], "scores {:?}", s.node_scores);
        // The same settings and seed give the same scores.
        assert_eq!(scores_from_vectors(&nodes, &vectors, &positive, &config, &()).unwrap(), s);
    }

    /// On tiny GPT-2: a score per node, head-only edges, the masked mean equal to a mean over a
    /// pair's own positions.
    #[test]
    fn runs_on_a_model_with_padded_pairs() {
        use std::path::Path;

        use crate::circuits::{Metric, Pair};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
        let model = loupe_model::load(&dir).unwrap();
        let pair =
            |clean: Vec<u32>, corrupt: Vec<u32>| Pair { clean, corrupt, answers: vec![7], wrongs: vec![9] };
        let task = Task {
            file: "t.jsonl".into(),
            sha256: String::new(),
            metric: Metric::LogitDiff,
            pairs: vec![
                pair(vec![511, 3, 4, 5, 3], vec![511, 3, 6, 5, 3]),
                pair(vec![511, 8, 2], vec![511, 1, 2]),
            ],
        };
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let means = node_means(model.as_ref(), &runs.clean, &runs.clean_mlp, &runs.last).unwrap();
        // Pair 1 alone (3 tokens, no padding) gives the same means.
        let alone = Tensor::new(&[[511u32, 8, 2]], &Device::Cpu).unwrap();
        let mlp1: Vec<Tensor> =
            runs.clean_mlp.iter().map(|m| m.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap()).collect();
        let one = node_means(model.as_ref(), &alone, &mlp1, &[2]).unwrap();
        let diff = (means.narrow(0, 1, 1).unwrap() - one).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let config = DiscreteSaeConfig { steps: 20, ..Default::default() };
        let s = discrete_sae(model.as_ref(), &task, &runs, &config, &()).unwrap();
        assert_eq!(s.node_scores.len(), 10);
        assert!(s.node_scores.iter().all(|&v| (0.0..=2.0).contains(&v)));
        assert_eq!(s.edges.len(), 4 * 4, "layer-0 heads to layer-1 heads");
    }
}
