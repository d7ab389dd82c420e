//! Fitting a MoE-X layer, forward and backward computed sparsely (only the chosen experts' rows),
//! by hand: candle's autograd would build the dense `[batch, E·m]` graph.
//!
//! Like the SAE trainer it works on activations scaled to mean norm √d (inputs by `input_scale`,
//! targets by `output_scale`); the final files are folded back ([`Moex::folded`]).
//!
//! Loss: `FVU = Σ_t ‖ŷ_t − y_t‖² / Σ_t ‖y_t − ȳ‖²` over the batch, plus the optional L1
//! `λ/B · Σ_t Σ_(e,j) g_e·ReLU(h_ej)·‖W_dec[e·m+j]‖` (`l1_coefficient`, default 0; the decoder
//! norm makes it impossible to shrink the penalty by rescaling), plus the optional load-balancing
//! term `balance_alpha·E·Σ_e f_e·P_e` ([`super::router::balance`], default 0).
//!
//! Backward, with `dY = ∂loss/∂ŷ`, per expert e over the tokens routed to it (`U = dY·W_dec_eᵀ`,
//! `n_j` = decoder row norms, λ' = λ/B):
//! - `∂g_e = Σ_j (U_j + λ'n_j)·ReLU(h_j)`, then through the router ([`super::router::backward`])
//!   to `∂μ_e`, `∂σ²_e` (plus load balancing's, for every expert), then to the encoder rows
//!   ([`super::router::weight_grads`]);
//! - `∂h_j = g_e·(U_j + λ'n_j)·[h_j > 0]`, `∂W_enc_e = ∂Hᵀ·X_e`, `∂b_enc_e = Σ_t ∂h`;
//! - `∂W_dec_e = Fᵀ·dY_e` with `F = g·ReLU(H)` (+ the L1's `λ'·Σ_t F_j · W_dec_j/n_j`);
//! - `∂b_dec = Σ_t dY_t`.
//!
//! Experts no token chose are left as they are, their Adam moments too (lazy Adam), unless load
//! balancing is on (its gradient reaches every expert's encoder). Every sum runs
//! in a fixed order (per expert in token order; gemm's blocking is fixed), so a run is
//! reproducible for a given thread count.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Forward, Moex, MoexSpec, gather, gemm, router};
use crate::Dictionary;
use crate::io::SaeMeta;
use crate::job::{Fit, Needs};
use crate::kernels::dot;
use crate::train::{StepStats, total_variance};
use crate::update::AdamStep;

/// Every hyper-parameter of a MoE-X run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoexTrainConfig {
    pub spec: MoexSpec,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Weight of the L1 on the gated hidden activations (0: off).
    pub l1_coefficient: f32,
    /// Weight of the load-balancing term (0: off).
    #[serde(default)]
    pub balance_alpha: f32,
    /// A feature that has not fired for this many training tokens counts as dead.
    pub dead_tokens: u64,
    /// Factors applied to inputs and targets while training.
    pub input_scale: f32,
    pub output_scale: f32,
}

impl MoexTrainConfig {
    /// Defaults: Adam at the SAE trainer's rate for E·m features, no L1, dead after 1M tokens.
    pub fn new(spec: MoexSpec, batch: usize) -> MoexTrainConfig {
        MoexTrainConfig {
            lr: crate::config::default_lr(spec.n_features()),
            spec,
            batch,
            seed: 0,
            l1_coefficient: 0.0,
            balance_alpha: 0.0,
            dead_tokens: 1_000_000,
            input_scale: 1.0,
            output_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if self.batch == 0 || self.batch > u32::MAX as usize / (2 * self.spec.top_k) {
            bail!("batch {} must be at least 1 (and fit in 31 bits with k slots per token)", self.batch);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate {} must be a positive number", self.lr);
        }
        for (name, v) in [("l1_coefficient", self.l1_coefficient), ("balance_alpha", self.balance_alpha)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} {v} must be a number ≥ 0");
            }
        }
        for (name, v) in [("input_scale", self.input_scale), ("output_scale", self.output_scale)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} {v} must be a positive number");
            }
        }
        Ok(())
    }
}

/// Adam's moments of each tensor (`m`, `v`), shaped like the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub w_enc: (Vec<f32>, Vec<f32>),
    pub b_enc: (Vec<f32>, Vec<f32>),
    pub w_dec: (Vec<f32>, Vec<f32>),
    pub b_dec: (Vec<f32>, Vec<f32>),
}

impl Moments {
    pub fn like(moex: &Moex) -> Moments {
        let z = |v: &[f32]| (vec![0.0; v.len()], vec![0.0; v.len()]);
        Moments { w_enc: z(&moex.w_enc), b_enc: z(&moex.b_enc), w_dec: z(&moex.w_dec), b_dec: z(&moex.b_dec) }
    }
}

/// Optimiser state and counters (what a checkpoint adds to the weights).
pub struct MoexState {
    pub step: u64,
    pub tokens: u64,
    pub moments: Moments,
    /// Training tokens since each feature last fired.
    pub since_fired: Vec<u64>,
}

pub struct MoexTrainer {
    pub cfg: MoexTrainConfig,
    pub moex: Moex,
    pub state: MoexState,
}

/// Dense gradients (for checks on small layers; training never builds the dense ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
}

/// One expert's gradients.
struct ExpertGrads {
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    w_dec: Vec<f32>,
}

/// The forward pass of a batch and what the backward reads.
struct Pass {
    xs: Vec<f32>,
    fw: Forward,
    dy: Vec<f32>,
    /// Decoder row norms (the L1's weights).
    norms: Vec<f32>,
    /// λ/B.
    l1: f32,
    /// Load balancing's `(∂/∂μ, ∂/∂σ²)` per (token, expert), when on.
    balance: Option<(Vec<f64>, Vec<f64>)>,
    loss: f64,
    stats: StepStats,
}

impl MoexTrainer {
    pub fn new(cfg: MoexTrainConfig) -> Result<MoexTrainer> {
        cfg.validate()?;
        let moex = Moex::init(cfg.spec.clone(), cfg.seed)?;
        let state = MoexState {
            step: 0,
            tokens: 0,
            moments: Moments::like(&moex),
            since_fired: vec![0; cfg.spec.n_features()],
        };
        Ok(MoexTrainer { cfg, moex, state })
    }

    /// Forward pass and upstream gradient on raw `x` (`[B, d_in]`) and `target` (`None`: `x`).
    fn pass(&self, x: &[f32], target: Option<&[f32]>) -> Result<Pass> {
        let spec = &self.cfg.spec;
        let (d, o, m) = (spec.d_in, spec.d_out, spec.expert_width);
        if x.is_empty() || !x.len().is_multiple_of(d) {
            bail!("batch is not [tokens, {d}]");
        }
        let b = x.len() / d;
        let target = target.unwrap_or(x);
        if target.len() != b * o {
            bail!("targets are not [{b}, {o}]");
        }
        if let Some(i) = x.iter().chain(target).position(|v| !v.is_finite()) {
            bail!("batch holds a non-finite value at flat index {i}");
        }
        let xs: Vec<f32> = x.iter().map(|v| v * self.cfg.input_scale).collect();
        let ys: Vec<f32> = target.iter().map(|v| v * self.cfg.output_scale).collect();
        let var = total_variance(&ys, o).max(f64::MIN_POSITIVE);
        let fw = self.moex.forward(&xs);
        let mut dy = vec![0f32; b * o];
        let err: f64 = dy
            .par_chunks_mut(o)
            .zip(fw.y.par_chunks(o).zip(ys.par_chunks(o)))
            .map(|(g, (yh, y))| {
                let mut e = 0f64;
                for ((g, a), b) in g.iter_mut().zip(yh).zip(y) {
                    let diff = (a - b) as f64;
                    e += diff * diff;
                    *g = (2.0 * diff / var) as f32;
                }
                e
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let l1 = self.cfg.l1_coefficient / b as f32;
        let norms: Vec<f32> = self.moex.w_dec.chunks(o).map(|r| dot(r, r).sqrt()).collect();
        let (mut penalty, mut active) = (0f64, 0usize);
        for (e, h) in fw.pre.iter().enumerate() {
            for (r, row) in h.chunks(m).enumerate() {
                let g = fw.routing.gate[fw.groups.slots(e)[r] as usize];
                for (j, &v) in row.iter().enumerate() {
                    if v > 0.0 && g > 0.0 {
                        active += 1;
                        penalty += (g * v * norms[e * m + j]) as f64;
                    }
                }
            }
        }
        let mut penalty = l1 as f64 * penalty;
        let balance = (self.cfg.balance_alpha > 0.0).then(|| {
            let (loss, dmu, dvar) = router::balance(&fw.routing, spec.experts, self.cfg.balance_alpha as f64);
            penalty += loss;
            (dmu, dvar)
        });
        let dead = self.state.since_fired.iter().filter(|&&s| s >= self.cfg.dead_tokens).count();
        let stats = StepStats {
            fvu: (err / var) as f32,
            l0: active as f32 / b as f32,
            aux_loss: penalty as f32,
            multi_fvu: 0.0,
            dead_fraction: dead as f32 / spec.n_features() as f32,
        };
        Ok(Pass { xs, fw, dy, norms, l1, balance, loss: err / var + penalty, stats })
    }

    /// Each expert's gradients (`None` for an expert no token chose).
    fn expert_grads(&self, p: &Pass) -> Vec<Option<ExpertGrads>> {
        let spec = &self.cfg.spec;
        let (d, o, m, k, e_n) = (spec.d_in, spec.d_out, spec.expert_width, spec.top_k, spec.experts);
        let (fw, moex) = (&p.fw, &self.moex);
        // Phase 1: U = dY·W_decᵀ per expert, and ∂g per slot.
        let us: Vec<(Vec<f32>, Vec<f32>)> = (0..e_n)
            .into_par_iter()
            .map(|e| {
                let n = fw.groups.len(e);
                let dy = gather(&p.dy, o, fw.groups.slots(e), k);
                let mut u = vec![0f32; n * m];
                gemm(&dy, false, moex.rows(&moex.w_dec, e, o), true, &mut u, n, m, o);
                let norms = &p.norms[e * m..(e + 1) * m];
                let dg = u
                    .chunks(m)
                    .zip(fw.pre[e].chunks(m))
                    .map(|(ur, hr)| {
                        ur.iter().zip(hr).zip(norms).map(|((u, h), nj)| (u + p.l1 * nj) * h.max(0.0)).sum()
                    })
                    .collect();
                (u, dg)
            })
            .collect();
        let mut dgate = vec![0f32; fw.routing.expert.len()];
        for (e, (_, dg)) in us.iter().enumerate() {
            for (&s, g) in fw.groups.slots(e).iter().zip(dg) {
                dgate[s as usize] = *g;
            }
        }
        // Phase 2: through the router.
        let (dmu, dvar) = router::backward(&fw.routing, &dgate);
        let st = router::stats(moex);
        // Phase 3: per expert, every weight gradient.
        (0..e_n)
            .into_par_iter()
            .map(|e| {
                let n = fw.groups.len(e);
                if n == 0 && p.balance.is_none() {
                    return None;
                }
                let slots = fw.groups.slots(e);
                let (u, h) = (&us[e].0, &fw.pre[e]);
                let norms = &p.norms[e * m..(e + 1) * m];
                let mut dh = vec![0f32; n * m];
                let mut f = vec![0f32; n * m];
                for (r, &s) in slots.iter().enumerate() {
                    let g = fw.routing.gate[s as usize];
                    for (j, nj) in norms.iter().enumerate() {
                        let at = r * m + j;
                        if h[at] > 0.0 {
                            dh[at] = g * (u[at] + p.l1 * nj);
                            f[at] = g * h[at];
                        }
                    }
                }
                let xe = gather(&p.xs, d, slots, k);
                let dy = gather(&p.dy, o, slots, k);
                let mut w_dec = vec![0f32; m * o];
                gemm(&f, true, &dy, false, &mut w_dec, m, o, n);
                if p.l1 > 0.0 {
                    let rows = moex.rows(&moex.w_dec, e, o);
                    for j in 0..m {
                        let total: f32 = (0..n).map(|r| f[r * m + j]).sum();
                        if total > 0.0 && norms[j] > 0.0 {
                            let a = p.l1 * total / norms[j];
                            let (g, w) = (&mut w_dec[j * o..(j + 1) * o], &rows[j * o..(j + 1) * o]);
                            g.iter_mut().zip(w).for_each(|(g, w)| *g += a * w);
                        }
                    }
                }
                let mut w_enc = vec![0f32; m * d];
                gemm(&dh, true, &xe, false, &mut w_enc, m, d, n);
                let mut b_enc = vec![0f32; m];
                for row in dh.chunks(m) {
                    b_enc.iter_mut().zip(row).for_each(|(b, v)| *b += v);
                }
                // The router's share, through the encoder's column statistics.
                let (mut dm, mut ds, mut dbm, mut dbv) = (vec![0f64; d], vec![0f64; d], 0f64, 0f64);
                for (r, &s) in slots.iter().enumerate() {
                    let (a, v) = (dmu[s as usize], dvar[s as usize]);
                    let x = &xe[r * d..(r + 1) * d];
                    for i in 0..d {
                        let xi = x[i] as f64;
                        dm[i] += a * xi;
                        ds[i] += v * xi * xi;
                    }
                    dbm += a;
                    dbv += v;
                }
                if let Some((bmu, bvar)) = &p.balance {
                    for (t, x) in p.xs.chunks(d).enumerate() {
                        let (a, v) = (bmu[t * e_n + e], bvar[t * e_n + e]);
                        for i in 0..d {
                            let xi = x[i] as f64;
                            dm[i] += a * xi;
                            ds[i] += v * xi * xi;
                        }
                        dbm += a;
                        dbv += v;
                    }
                }
                router::weight_grads(moex, &st, e, &dm, &ds, (dbm, dbv), &mut w_enc, &mut b_enc);
                Some(ExpertGrads { w_enc, b_enc, w_dec })
            })
            .collect()
    }

    fn b_dec_grad(&self, p: &Pass) -> Vec<f32> {
        let o = self.cfg.spec.d_out;
        let mut g = vec![0f32; o];
        for row in p.dy.chunks(o) {
            g.iter_mut().zip(row).for_each(|(g, v)| *g += v);
        }
        g
    }

    /// The loss of a batch (FVU + L1), without updating (for checks).
    pub fn loss(&self, x: &[f32], target: Option<&[f32]>) -> Result<f64> {
        Ok(self.pass(x, target)?.loss)
    }

    /// The routing of a batch (for checks: finite differences are valid where it does not change).
    pub fn routing(&self, x: &[f32]) -> router::Routing {
        let xs: Vec<f32> = x.iter().map(|v| v * self.cfg.input_scale).collect();
        router::route(&self.moex, &xs)
    }

    /// Dense gradients of the loss of a batch (for checks on small layers).
    pub fn gradients(&self, x: &[f32], target: Option<&[f32]>) -> Result<Grads> {
        let p = self.pass(x, target)?;
        let spec = &self.cfg.spec;
        let (d, o, m) = (spec.d_in, spec.d_out, spec.expert_width);
        let n = spec.n_features();
        let mut g = Grads {
            w_enc: vec![0.0; n * d],
            b_enc: vec![0.0; n],
            w_dec: vec![0.0; n * o],
            b_dec: self.b_dec_grad(&p),
        };
        for (e, eg) in self.expert_grads(&p).into_iter().enumerate() {
            if let Some(eg) = eg {
                g.w_enc[e * m * d..(e + 1) * m * d].copy_from_slice(&eg.w_enc);
                g.b_enc[e * m..(e + 1) * m].copy_from_slice(&eg.b_enc);
                g.w_dec[e * m * o..(e + 1) * m * o].copy_from_slice(&eg.w_dec);
            }
        }
        Ok(g)
    }

    /// One step on raw `x` (`[B, d_in]`) towards raw `target` (`[B, d_out]`; `None`: `x`).
    pub fn train_step(&mut self, x: &[f32], target: Option<&[f32]>) -> Result<StepStats> {
        let spec = self.cfg.spec.clone();
        let (d, o, m) = (spec.d_in, spec.d_out, spec.expert_width);
        if self.state.step == 0 {
            // b_dec starts at the first batch's mean target.
            let target = target.unwrap_or(x);
            let b = target.len() / o.max(1);
            self.moex.b_dec.fill(0.0);
            for row in target.chunks(o) {
                self.moex.b_dec.iter_mut().zip(row).for_each(|(a, v)| *a += v * self.cfg.output_scale);
            }
            self.moex.b_dec.iter_mut().for_each(|a| *a /= b.max(1) as f32);
        }
        let p = self.pass(x, target)?;
        let grads = self.expert_grads(&p);
        let g_bdec = self.b_dec_grad(&p);
        let adam = AdamStep::new(self.cfg.lr, (self.state.step + 1) as i32);
        let mo = &mut self.state.moments;
        let mx = &mut self.moex;
        mx.w_enc
            .par_chunks_mut(m * d)
            .zip(mx.b_enc.par_chunks_mut(m))
            .zip(mx.w_dec.par_chunks_mut(m * o))
            .zip(mo.w_enc.0.par_chunks_mut(m * d).zip(mo.w_enc.1.par_chunks_mut(m * d)))
            .zip(mo.b_enc.0.par_chunks_mut(m).zip(mo.b_enc.1.par_chunks_mut(m)))
            .zip(mo.w_dec.0.par_chunks_mut(m * o).zip(mo.w_dec.1.par_chunks_mut(m * o)))
            .zip(grads.par_iter())
            .for_each(|((((((we, be), wd), (me, ve)), (mb, vb)), (md, vd)), g)| {
                if let Some(g) = g {
                    adam.apply(we, &g.w_enc, me, ve);
                    adam.apply(be, &g.b_enc, mb, vb);
                    adam.apply(wd, &g.w_dec, md, vd);
                }
            });
        adam.apply(&mut mx.b_dec, &g_bdec, &mut mo.b_dec.0, &mut mo.b_dec.1);
        // Firing counters: a feature fires when its gated activation is positive.
        let b = x.len() / d;
        let mut fired = vec![false; spec.n_features()];
        for (e, h) in p.fw.pre.iter().enumerate() {
            for (r, row) in h.chunks(m).enumerate() {
                if p.fw.routing.gate[p.fw.groups.slots(e)[r] as usize] > 0.0 {
                    for (j, &v) in row.iter().enumerate() {
                        fired[e * m + j] |= v > 0.0;
                    }
                }
            }
        }
        for (s, f) in self.state.since_fired.iter_mut().zip(fired) {
            *s = if f { 0 } else { *s + b as u64 };
        }
        self.state.step += 1;
        self.state.tokens += b as u64;
        Ok(p.stats)
    }
}

/// MoE-X as a job drives it (`train-moex`).
impl Fit for MoexTrainer {
    type Config = MoexTrainConfig;
    const CHECKPOINT_FILES: &'static [&'static str] =
        &["cfg.json", "sae_weights.safetensors", "state.safetensors", "state.json"];
    const FINAL_FILES: &'static [&'static str] = &["cfg.json", "sae_weights.safetensors"];
    const ACTIVE: &'static str = "L0";

    fn needs(cfg: &MoexTrainConfig) -> Needs {
        Needs { d_in: cfg.spec.d_in, d_out: cfg.spec.d_out, batch: cfg.batch, seed: cfg.seed, grad: false }
    }

    fn with_scales(mut cfg: MoexTrainConfig, input: f32, output: f32) -> MoexTrainConfig {
        cfg.input_scale = input;
        cfg.output_scale = output;
        cfg
    }

    fn validate(cfg: &MoexTrainConfig) -> Result<()> {
        cfg.validate()
    }

    fn start(cfg: MoexTrainConfig) -> Result<MoexTrainer> {
        MoexTrainer::new(cfg)
    }

    fn config(&self) -> &MoexTrainConfig {
        &self.cfg
    }

    fn step(&mut self, x: &[f32], target: Option<&[f32]>) -> Result<StepStats> {
        self.train_step(x, target)
    }

    fn steps(&self) -> u64 {
        self.state.step
    }

    fn tokens(&self) -> u64 {
        self.state.tokens
    }

    fn save_checkpoint(&self, dir: &Path, meta: &SaeMeta, resume: &Value) -> Result<()> {
        super::io::save(&self.moex, meta, Some(&self.cfg), dir)?;
        super::io::save_state(&self.cfg, &self.state, resume, dir)
    }

    fn load_checkpoint(dir: &Path) -> Result<(MoexTrainer, Value)> {
        let (moex, _) = super::io::load(dir)?;
        let (cfg, state, resume) = super::io::load_state(dir, &moex)?;
        cfg.validate()?;
        if cfg.spec != moex.spec {
            bail!("checkpoint in {} holds a different MoE-X than its state describes", dir.display());
        }
        Ok((MoexTrainer { cfg, moex, state }, resume))
    }

    fn finish(&self, meta: &SaeMeta, dir: &Path) -> Result<Arc<dyn Dictionary>> {
        let raw = self.moex.folded(self.cfg.input_scale, self.cfg.output_scale);
        super::io::save(&raw, meta, Some(&self.cfg), dir)?;
        Ok(Arc::new(raw))
    }

    fn listing(&self) -> (&'static str, String, usize) {
        ("moex", format!("E{}-k{}", self.cfg.spec.experts, self.cfg.spec.top_k), self.cfg.spec.n_features())
    }
}
