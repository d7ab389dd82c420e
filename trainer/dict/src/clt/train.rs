//! One training step of a cross-layer transcoder, computed sparsely.
//!
//! Inputs `x_i` and targets `y_L` arrive raw and are multiplied by the per-hook scales of the
//! configuration (mean norm √d on the first batch, [`super::job`]).
//!
//! Forward: per layer i, `pre_i = x_i W_encᵢᵀ + b_enc_i` is the one dense GEMM; each token keeps
//! its k largest positive pre-activations (codes `a_i`); `ŷ_L = b_dec_L + Σ_{i ≤ L} a_i W_dec[i→L]`
//! touches only the selected decoder rows.
//!
//! Loss: `Σ_L FVU_L`, with `FVU_L = Σ_t ‖y_L − ŷ_L‖² / Σ_t ‖y_L − ȳ_L‖²` over the batch (ȳ_L: the
//! batch mean) — each layer's MSE normalised by that layer's variance, so that every layer
//! counts alike whatever its scale. Plus AuxK (α = `auxk_alpha`): per layer i, the features of
//! layer i that have not fired for `dead_tokens` tokens reconstruct that layer's own residual
//! `e_i = y_i − ŷ_i` (detached) through their decoders to layer i, with each token's `k_aux` largest
//! positive pre-activations among them: `α ‖e_i − ê_i‖² / Σ_t ‖y_i − ȳ_i‖²`.
//!
//! Backward, with `dY_L = ∂loss/∂ŷ_L`: for each selected (token t, feature f of layer i, value a),
//! `∂W_dec[i→L][f] += a·dY_L[t]` for every L ≥ i, `dz = Σ_{L ≥ i} dY_L[t]·W_dec[i→L][f]`,
//! `∂b_enc_i[f] += dz`, `∂W_enc_i[f] += dz·x_i[t]`; `∂b_dec_L = Σ_t dY_L[t]`. It runs feature by
//! feature (feature-major order of the pairs, features in parallel) with Adam applied while the
//! feature's rows are in cache: no dense `[batch, n]` gradient and no dense decoder gradient exists.
//! A feature with no pair in the batch is left as it is (its Adam moments too: lazy Adam).
//! As TopK SAEs do, each feature's decoder (its decoders to every later layer, concatenated) is kept
//! at unit norm: the gradient's component along it is removed before Adam, and the row is
//! renormalised after.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::super::kernels::{Codes, axpy, dot, topk_row_above};
use super::super::sae::normalize;
use super::super::update::AdamStep;
use super::Clt;

/// Every hyper-parameter of a CLT run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CltConfig {
    /// The model layer of the CLT's layer 0.
    pub first_layer: usize,
    pub n_layers: usize,
    pub d: usize,
    /// Features per layer.
    pub n_features: usize,
    pub k: usize,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// AuxK's weight (0: off).
    pub auxk_alpha: f32,
    pub k_aux: usize,
    /// Tokens without firing after which a feature is dead.
    pub dead_tokens: u64,
    /// Per layer: what inputs (ln2) and targets (mlp_out) are multiplied by while training.
    pub input_scale: Vec<f32>,
    pub output_scale: Vec<f32>,
}

impl CltConfig {
    pub fn new(
        first_layer: usize,
        n_layers: usize,
        d: usize,
        n_features: usize,
        k: usize,
        batch: usize,
    ) -> Self {
        CltConfig {
            first_layer,
            n_layers,
            d,
            n_features,
            k,
            batch,
            lr: super::super::config::default_lr(n_features),
            seed: 0,
            auxk_alpha: 1.0 / 32.0,
            k_aux: (d / 2).max(1).min(n_features),
            dead_tokens: 1_000_000,
            input_scale: vec![1.0; n_layers],
            output_scale: vec![1.0; n_layers],
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_layers == 0 || self.d == 0 || self.n_features == 0 || self.batch == 0 {
            bail!("layers, d, features per layer and batch must be at least 1");
        }
        if self.k == 0 || self.k > self.n_features {
            bail!("TopK k = {} must be between 1 and the features per layer, {}", self.k, self.n_features);
        }
        if self.k_aux == 0 || self.k_aux > self.n_features {
            bail!("k_aux = {} must be between 1 and the features per layer, {}", self.k_aux, self.n_features);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate {} must be a positive number", self.lr);
        }
        if !(self.auxk_alpha.is_finite() && self.auxk_alpha >= 0.0) {
            bail!("auxk_alpha {} must be a number ≥ 0", self.auxk_alpha);
        }
        let scales_ok = |s: &[f32]| s.len() == self.n_layers && s.iter().all(|v| v.is_finite() && *v > 0.0);
        if !scales_ok(&self.input_scale) || !scales_ok(&self.output_scale) {
            bail!("the input and output scales must be {} positive numbers", self.n_layers);
        }
        if self.n_features > u32::MAX as usize / 2 || self.batch > u32::MAX as usize / 2 {
            bail!("features per layer and batch must fit in 31 bits");
        }
        Ok(())
    }
}

/// What one step measured on its batch (before the update).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CltStepStats {
    /// Each layer's FVU.
    pub fvu: Vec<f32>,
    /// Active features per token, averaged over layers.
    pub l0: f32,
    pub aux_loss: f32,
    /// Fraction of all features that have not fired for `dead_tokens` tokens.
    pub dead_fraction: f32,
}

impl CltStepStats {
    pub fn mean_fvu(&self) -> f32 {
        self.fvu.iter().sum::<f32>() / self.fvu.len().max(1) as f32
    }
}

/// Dense gradients of the loss (for checks on small CLTs; training never builds them).
#[derive(Clone, Debug, PartialEq)]
pub struct CltGradients {
    pub w_enc: Vec<Vec<f32>>,
    pub b_enc: Vec<Vec<f32>>,
    pub w_dec: Vec<Vec<f32>>,
    pub b_dec: Vec<Vec<f32>>,
}

/// Adam's moments of one group of tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Moments {
    fn like(x: &[Vec<f32>]) -> Moments {
        let zeros: Vec<Vec<f32>> = x.iter().map(|v| vec![0.0; v.len()]).collect();
        Moments { m: zeros.clone(), v: zeros }
    }
}

/// A CLT being trained (in the scaled space of its configuration).
pub struct CltTrainer {
    pub cfg: CltConfig,
    pub clt: Clt,
    pub w_enc: Moments,
    pub b_enc: Moments,
    pub w_dec: Moments,
    pub b_dec: Moments,
    /// Per layer and feature: tokens since it last fired.
    pub since_fired: Vec<Vec<u64>>,
    pub step: u64,
    pub tokens: u64,
}

/// What the backward pass reads: the scaled batch, the selected pairs and the upstream gradients.
struct Pass {
    tokens: usize,
    xs: Vec<Vec<f32>>,
    codes: Vec<Codes>,
    aux: Vec<Codes>,
    /// `∂loss/∂ŷ`, `[tokens, n_layers, d]`.
    dy: Vec<f32>,
    /// AuxK's `∂loss/∂ê_i` per layer, `[tokens, d]` (empty when layer i had no aux pairs).
    de: Vec<Vec<f32>>,
    /// AuxK's target, the residual `y_i − ŷ_i` per layer (empty when layer i had no aux pairs).
    #[cfg_attr(not(test), allow(dead_code))]
    residual: Vec<Vec<f32>>,
    loss: f64,
    stats: CltStepStats,
}

/// One layer's pairs in feature-major order.
struct Order {
    starts: Vec<u32>,
    order: Vec<u32>,
    token: Vec<u32>,
}

impl Order {
    fn of(codes: &Codes, n: usize) -> Order {
        let (starts, order) = codes.by_feature(n);
        Order { starts, order, token: codes.entry_tokens() }
    }
}

impl CltTrainer {
    /// A fresh CLT: encoder rows uniform in ±1/√d, decoder rows random with unit norm, biases 0
    /// (b_dec is set to the first batch's mean target).
    pub fn new(cfg: CltConfig) -> Result<CltTrainer> {
        cfg.validate()?;
        let (l, n, d) = (cfg.n_layers, cfg.n_features, cfg.d);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let bound = 1.0 / (d as f32).sqrt();
        let w_enc =
            (0..l).map(|_| (0..n * d).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect()).collect();
        let w_dec = (0..l)
            .map(|i| {
                let mut w: Vec<f32> = (0..n * (l - i) * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                w.chunks_mut((l - i) * d).for_each(normalize);
                w
            })
            .collect();
        let clt = Clt {
            first_layer: cfg.first_layer,
            n_layers: l,
            d,
            n_features: n,
            k: cfg.k,
            w_enc,
            b_enc: vec![vec![0.0; n]; l],
            w_dec,
            b_dec: vec![vec![0.0; d]; l],
            threshold: vec![vec![0.0; n]; l],
        };
        Ok(CltTrainer {
            w_enc: Moments::like(&clt.w_enc),
            b_enc: Moments::like(&clt.b_enc),
            w_dec: Moments::like(&clt.w_dec),
            b_dec: Moments::like(&clt.b_dec),
            since_fired: vec![vec![0; n]; l],
            step: 0,
            tokens: 0,
            cfg,
            clt,
        })
    }

    fn scaled(&self, raw: &[&[f32]], scales: &[f32]) -> Result<Vec<Vec<f32>>> {
        let (l, d, b) = (self.cfg.n_layers, self.cfg.d, raw.first().map_or(0, |x| x.len()));
        if raw.len() != l || raw.iter().any(|x| x.len() != b) || b % d != 0 || b == 0 {
            bail!("a CLT step needs {l} layers of [tokens, {d}] rows, all with the same tokens");
        }
        Ok(raw.iter().zip(scales).map(|(x, s)| x.iter().map(|v| v * s).collect()).collect())
    }

    /// Forward pass, loss and upstream gradients on raw inputs and targets.
    fn pass(&self, xs: &[&[f32]], ys: &[&[f32]]) -> Result<Pass> {
        self.pass_with(xs, ys, None)
    }

    /// [`Self::pass`], with AuxK's residual target given (checks hold it fixed: it is detached).
    fn pass_with(&self, xs: &[&[f32]], ys: &[&[f32]], frozen: Option<&[Vec<f32>]>) -> Result<Pass> {
        let xs = self.scaled(xs, &self.cfg.input_scale)?;
        let ys = self.scaled(ys, &self.cfg.output_scale)?;
        let (l, n, d) = (self.cfg.n_layers, self.cfg.n_features, self.cfg.d);
        let tokens = xs[0].len() / d;
        let use_aux = self.cfg.auxk_alpha > 0.0;
        let mut codes = Vec::with_capacity(l);
        let mut aux = Vec::with_capacity(l);
        let mut dead_count = 0usize;
        for (i, x) in xs.iter().enumerate() {
            let dead: Vec<bool> = self.since_fired[i].iter().map(|&s| s >= self.cfg.dead_tokens).collect();
            dead_count += dead.iter().filter(|d| **d).count();
            let pre = self.clt.pre_activations(i, x);
            codes.push(super::codes_topk(&pre, n, self.cfg.k));
            let any_dead = use_aux && dead.iter().any(|d| *d);
            let rows: Vec<Vec<(u32, f32)>> = if any_dead {
                pre.par_chunks(n)
                    .map_init(
                        || (Vec::new(), vec![0f32; n]),
                        |(scratch, masked), row| {
                            for ((m, &p), &dd) in masked.iter_mut().zip(row).zip(&dead) {
                                *m = if dd { p } else { f32::NEG_INFINITY };
                            }
                            let mut out = Vec::new();
                            topk_row_above(masked, None, 0.0, self.cfg.k_aux, &mut out, scratch);
                            out
                        },
                    )
                    .collect()
            } else {
                vec![Vec::new(); tokens]
            };
            aux.push(Codes::from_rows(rows.iter().map(Vec::as_slice)));
        }
        let mut yhat = vec![0f32; tokens * l * d];
        self.clt.decode_into(&codes, &mut yhat);
        let mut dy = vec![0f32; tokens * l * d];
        let mut fvu = Vec::with_capacity(l);
        let mut de = Vec::with_capacity(l);
        let mut residual = Vec::with_capacity(l);
        let (mut loss, mut aux_loss) = (0.0f64, 0.0f64);
        for (layer, y) in ys.iter().enumerate() {
            let mut mean = vec![0f64; d];
            for row in y.chunks(d) {
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
            }
            mean.iter_mut().for_each(|m| *m /= tokens as f64);
            let var: f64 = y
                .chunks(d)
                .map(|row| row.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
                .sum::<f64>()
                .max(1e-12);
            let mut err = 0f64;
            for (t, row) in y.chunks(d).enumerate() {
                let at = (t * l + layer) * d;
                for j in 0..d {
                    let diff = yhat[at + j] - row[j];
                    err += (diff as f64).powi(2);
                    dy[at + j] = (2.0 * diff as f64 / var) as f32;
                }
            }
            loss += err / var;
            fvu.push((err / var) as f32);
            // AuxK on this layer's own residual.
            if aux[layer].nnz() == 0 {
                de.push(Vec::new());
                residual.push(Vec::new());
                continue;
            }
            let e: Vec<f32> = match frozen {
                Some(r) => r[layer].clone(),
                None => y
                    .chunks(d)
                    .enumerate()
                    .flat_map(|(t, row)| {
                        let at = (t * l + layer) * d;
                        row.iter().zip(&yhat[at..at + d]).map(|(v, h)| v - h).collect::<Vec<_>>()
                    })
                    .collect(),
            };
            let mut ehat = vec![0f32; tokens * d];
            aux[layer].decode_into(&own_decoders(&self.clt, layer), d, None, &mut ehat);
            let alpha = self.cfg.auxk_alpha as f64;
            let mut g = vec![0f32; tokens * d];
            let mut a_err = 0f64;
            for t in 0..tokens {
                for j in 0..d {
                    let diff = ehat[t * d + j] - e[t * d + j];
                    a_err += (diff as f64).powi(2);
                    g[t * d + j] = (alpha * 2.0 * diff as f64 / var) as f32;
                }
            }
            aux_loss += alpha * a_err / var;
            de.push(g);
            residual.push(e);
        }
        let nnz: usize = codes.iter().map(Codes::nnz).sum();
        let stats = CltStepStats {
            fvu,
            l0: nnz as f32 / (tokens * l) as f32,
            aux_loss: aux_loss as f32,
            dead_fraction: dead_count as f32 / (l * n) as f32,
        };
        Ok(Pass { tokens, xs, codes, aux, dy, de, residual, loss: loss + aux_loss, stats })
    }

    /// The loss (Σ FVU + AuxK) of a batch, without updating (for checks).
    pub fn loss(&self, xs: &[&[f32]], ys: &[&[f32]]) -> Result<f64> {
        Ok(self.pass(xs, ys)?.loss)
    }

    /// Dense gradients of the loss of a batch (for checks on small CLTs).
    pub fn gradients(&self, xs: &[&[f32]], ys: &[&[f32]]) -> Result<CltGradients> {
        let p = self.pass(xs, ys)?;
        let (l, n, d) = (self.cfg.n_layers, self.cfg.n_features, self.cfg.d);
        let mut g = CltGradients {
            w_enc: self.clt.w_enc.iter().map(|w| vec![0.0; w.len()]).collect(),
            b_enc: vec![vec![0.0; n]; l],
            w_dec: self.clt.w_dec.iter().map(|w| vec![0.0; w.len()]).collect(),
            b_dec: b_dec_grads(&p, l, d),
        };
        for i in 0..l {
            let (main, aux) = (Order::of(&p.codes[i], n), Order::of(&p.aux[i], n));
            let w = (l - i) * d;
            for f in 0..n {
                let (ge, gd) = (&mut g.w_enc[i][f * d..(f + 1) * d], &mut g.w_dec[i][f * w..(f + 1) * w]);
                let row = &self.clt.w_dec[i][f * w..(f + 1) * w];
                let (gb, _) = feature_grads(&p, i, f, l, d, &main, &aux, row, gd, ge);
                g.b_enc[i][f] = gb;
            }
        }
        Ok(g)
    }

    /// One step on raw inputs `xs[i]` and targets `ys[i]` (`[batch, d]` each, one per layer).
    pub fn step(&mut self, xs: &[&[f32]], ys: &[&[f32]]) -> Result<CltStepStats> {
        if self.step == 0 {
            // b_dec starts at the first batch's mean target.
            let ys = self.scaled(ys, &self.cfg.output_scale)?;
            let d = self.cfg.d;
            for (b, y) in self.clt.b_dec.iter_mut().zip(&ys) {
                b.fill(0.0);
                for row in y.chunks(d) {
                    b.iter_mut().zip(row).for_each(|(b, v)| *b += v);
                }
                let tokens = (y.len() / d) as f32;
                b.iter_mut().for_each(|b| *b /= tokens);
            }
        }
        let p = self.pass(xs, ys)?;
        let (l, n, d) = (self.cfg.n_layers, self.cfg.n_features, self.cfg.d);
        let adam = AdamStep::new(self.cfg.lr, (self.step + 1) as i32);
        for i in 0..l {
            let (main, aux) = (Order::of(&p.codes[i], n), Order::of(&p.aux[i], n));
            let w = (l - i) * d;
            let tokens = p.tokens as u64;
            let (p, main, aux, adam) = (&p, &main, &aux, &adam);
            self.clt.w_enc[i]
                .par_chunks_mut(d)
                .zip(self.clt.w_dec[i].par_chunks_mut(w))
                .zip(self.clt.b_enc[i].par_iter_mut())
                .zip(self.w_enc.m[i].par_chunks_mut(d).zip(self.w_enc.v[i].par_chunks_mut(d)))
                .zip(self.w_dec.m[i].par_chunks_mut(w).zip(self.w_dec.v[i].par_chunks_mut(w)))
                .zip(self.b_enc.m[i].par_iter_mut().zip(self.b_enc.v[i].par_iter_mut()))
                .zip(self.since_fired[i].par_iter_mut())
                .enumerate()
                .for_each_init(
                    || (vec![0f32; d], vec![0f32; w]),
                    |(ge, gd), (f, ((((((we, wd), be), (me, ve)), (md, vd)), (mb, vb)), since))| {
                        let fired = main.starts[f + 1] - main.starts[f];
                        let has_aux = aux.starts[f + 1] > aux.starts[f];
                        *since = if fired > 0 { 0 } else { *since + tokens };
                        if fired == 0 && !has_aux {
                            return;
                        }
                        ge.fill(0.0);
                        gd.fill(0.0);
                        let (gb, _) = feature_grads(p, i, f, l, d, main, aux, wd, gd, ge);
                        let parallel = dot(gd, wd);
                        axpy(-parallel, wd, gd);
                        adam.apply(wd, gd, md, vd);
                        normalize(wd);
                        adam.apply(we, ge, me, ve);
                        adam.apply(
                            std::slice::from_mut(be),
                            &[gb],
                            std::slice::from_mut(mb),
                            std::slice::from_mut(vb),
                        );
                    },
                );
        }
        let g_bdec = b_dec_grads(&p, l, d);
        for (layer, g) in g_bdec.iter().enumerate() {
            adam.apply(&mut self.clt.b_dec[layer], g, &mut self.b_dec.m[layer], &mut self.b_dec.v[layer]);
        }
        self.step += 1;
        self.tokens += p.tokens as u64;
        Ok(p.stats)
    }

    /// The trained CLT for raw activations (the scales folded into its weights).
    pub fn folded(&self) -> Clt {
        let inv = |s: &[f32]| s.iter().map(|v| 1.0 / v).collect::<Vec<_>>();
        let mut clt = self.clt.rescaled(&self.cfg.input_scale, &inv(&self.cfg.output_scale));
        clt.first_layer = self.cfg.first_layer;
        clt
    }
}

/// Layer `i`'s decoders to its own layer, `[n, d]` (for AuxK's decode).
fn own_decoders(clt: &Clt, i: usize) -> Vec<f32> {
    let (d, w) = (clt.d, clt.targets(i) * clt.d);
    clt.w_dec[i].chunks(w).flat_map(|row| row[..d].iter().copied()).collect()
}

/// `∂loss/∂b_dec_L = Σ_t dY_L[t]`.
fn b_dec_grads(p: &Pass, l: usize, d: usize) -> Vec<Vec<f32>> {
    let mut g = vec![vec![0f32; d]; l];
    for row in p.dy.chunks(l * d) {
        for (layer, g) in g.iter_mut().enumerate() {
            g.iter_mut().zip(&row[layer * d..(layer + 1) * d]).for_each(|(g, v)| *g += v);
        }
    }
    g
}

/// Feature f of layer i: adds its decoder row's gradient to `gd` (`[targets · d]`) and its encoder
/// row's to `ge`; returns b_enc's gradient and how many tokens it fired on.
#[allow(clippy::too_many_arguments)]
fn feature_grads(
    p: &Pass,
    i: usize,
    f: usize,
    l: usize,
    d: usize,
    main: &Order,
    aux: &Order,
    w_dec_row: &[f32],
    gd: &mut [f32],
    ge: &mut [f32],
) -> (f32, u32) {
    let x = &p.xs[i];
    let mut gb = 0f32;
    let entries = &main.order[main.starts[f] as usize..main.starts[f + 1] as usize];
    for &e in entries {
        let t = main.token[e as usize] as usize;
        let a = p.codes[i].value[e as usize];
        let dy = &p.dy[(t * l + i) * d..(t + 1) * l * d];
        let dz = dot(dy, w_dec_row);
        axpy(a, dy, gd);
        axpy(dz, &x[t * d..(t + 1) * d], ge);
        gb += dz;
    }
    for &e in &aux.order[aux.starts[f] as usize..aux.starts[f + 1] as usize] {
        let t = aux.token[e as usize] as usize;
        let a = p.aux[i].value[e as usize];
        let de = &p.de[i][t * d..(t + 1) * d];
        let dz = dot(de, &w_dec_row[..d]);
        axpy(a, de, &mut gd[..d]);
        axpy(dz, &x[t * d..(t + 1) * d], ge);
        gb += dz;
    }
    (gb, entries.len() as u32)
}

#[cfg(test)]
mod tests;
