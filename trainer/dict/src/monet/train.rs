//! Fitting a Monet layer. One step: the router's logits (one dense GEMM per sub-router) and its
//! selection on the batch's BatchNorm statistics, the sparse forward ([`super::sparse`]), the loss
//! FVU + α_u·uniformity + α_a·ambiguity ([`super::aux`], averaged over the two sub-routers) and
//! its gradients by hand ([`super::backward`]), then Adam (PyTorch's formulas, element by element;
//! every weight, as PyTorch's dense Adam, since a batch touches every sub-expert). The BatchNorm
//! running statistics move towards the batch's (those the forward used, as PyTorch), and the
//! experts' firing counters are updated from the sparse codes (gates above the floor,
//! [`super::sparse::GATE_FLOOR`]). Every sum runs in a fixed order: a run is reproducible.
//!
//! Like the SAE trainer, it works on activations scaled to mean norm √d (inputs by
//! `input_scale`, targets by `output_scale`); the final files are folded back
//! ([`Monet::folded`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backward::{self, Alphas, Loss};
use super::phases;
use super::sparse::{self, Forward, Layout, Norm, Params, Routes};
use super::{Monet, MonetSpec};
use crate::Dictionary;
use crate::io::SaeMeta;
use crate::job::{Fit, Needs};
use crate::train::{StepStats, total_variance};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const BN_MOMENTUM: f32 = 0.1;

/// Every hyper-parameter of a Monet run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonetTrainConfig {
    pub spec: MonetSpec,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Weight of the uniformity loss.
    pub uniformity_alpha: f32,
    /// Weight of the ambiguity loss.
    pub ambiguity_alpha: f32,
    /// An expert that has not fired for this many training tokens counts as dead.
    pub dead_tokens: u64,
    /// Factors applied to inputs and targets while training (see the module docs).
    pub input_scale: f32,
    pub output_scale: f32,
}

impl MonetTrainConfig {
    /// Defaults: Adam at 1e-3, both auxiliary weights 1e-2, dead after 1M tokens.
    pub fn new(spec: MonetSpec, batch: usize) -> MonetTrainConfig {
        MonetTrainConfig {
            spec,
            batch,
            lr: 1e-3,
            seed: 0,
            uniformity_alpha: 1e-2,
            ambiguity_alpha: 1e-2,
            dead_tokens: 1_000_000,
            input_scale: 1.0,
            output_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if self.batch < 2 {
            bail!("batch must be at least 2 (BatchNorm needs a batch)");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate {} must be a positive number", self.lr);
        }
        for (name, v) in
            [("uniformity_alpha", self.uniformity_alpha), ("ambiguity_alpha", self.ambiguity_alpha)]
        {
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

/// Optimiser state and counters (what a checkpoint adds to the weights).
pub struct MonetState {
    pub step: u64,
    pub tokens: u64,
    /// Adam's first and second moments, laid out as the weights ([`Params`]).
    pub m: Params,
    pub v: Params,
    /// Training tokens since each expert last had a gate above the floor.
    pub since_fired: Vec<u64>,
}

/// Buffers of a step, kept between steps (allocating them anew costs more than the step's
/// arithmetic: the kernel clears every fresh page).
#[derive(Default)]
struct Scratch {
    z: [Vec<f32>; 2],
    forward: Forward,
    y: Vec<f32>,
    back: backward::Scratch,
    grads: Option<Params>,
}

pub struct MonetTrainer {
    pub cfg: MonetTrainConfig,
    /// The weights being trained (the sparse layout; [`MonetTrainer::monet`] gives the layer).
    pub params: Params,
    /// BatchNorm running statistics of the router (inference).
    pub running: Norm,
    pub state: MonetState,
    lay: Layout,
    scratch: Scratch,
}

impl MonetTrainer {
    pub fn new(cfg: MonetTrainConfig) -> Result<MonetTrainer> {
        cfg.validate()?;
        let monet = Monet::init(cfg.spec.clone(), cfg.seed)?;
        let n = cfg.spec.n_experts();
        MonetTrainer::resume(cfg, &monet, None, vec![0; n], 0, 0)
    }

    /// A trainer holding `monet`'s weights, with the given optimiser state (`None`: zero moments).
    fn resume(
        cfg: MonetTrainConfig,
        monet: &Monet,
        moments: Option<(Params, Params)>,
        since_fired: Vec<u64>,
        step: u64,
        tokens: u64,
    ) -> Result<MonetTrainer> {
        let (lay, params) = monet.sparse_params()?;
        let (m, v) = moments.unwrap_or_else(|| (params.zeros_like(), params.zeros_like()));
        let running = Norm { mean: monet.router.running_mean.clone(), var: monet.router.running_var.clone() };
        let state = MonetState { step, tokens, m, v, since_fired };
        Ok(MonetTrainer { cfg, params, running, state, lay, scratch: Scratch::default() })
    }

    /// The layer as trained so far (training units).
    pub fn monet(&self) -> Result<Monet> {
        Monet::from_named(
            self.cfg.spec.clone(),
            &self.params.to_named(&self.lay),
            self.running.mean.clone(),
            self.running.var.clone(),
        )
    }

    /// The loss of a batch (already scaled) and its gradients (`self.scratch.grads`): the
    /// router uses the batch's BatchNorm statistics, returned.
    fn loss_and_gradients(&mut self, xs: &[f32], ys: &[f32]) -> Result<(Loss, Norm)> {
        let denom = total_variance(ys, self.cfg.spec.d_out).max(f64::MIN_POSITIVE);
        let (p, lay, s) = (&self.params, &self.lay, &mut self.scratch);
        phases::mark("variance");
        sparse::logits(p, lay, xs, &mut s.z);
        phases::mark("logits");
        let norm = sparse::batch_norm(lay, &s.z);
        phases::mark("batch-norm");
        let routes = sparse::select(lay, &s.z, &norm);
        phases::mark("select");
        sparse::forward_routed(p, lay, xs, routes, &mut s.forward, &mut s.y);
        let grads = s.grads.get_or_insert_with(|| p.zeros_like());
        let alphas = Alphas { uniformity: self.cfg.uniformity_alpha, ambiguity: self.cfg.ambiguity_alpha };
        let loss = backward::gradients(p, lay, xs, ys, denom, alphas, &s.forward, &s.y, grads, &mut s.back);
        Ok((loss, norm))
    }

    fn scaled(&self, x: &[f32], target: Option<&[f32]>) -> Result<(Vec<f32>, Vec<f32>)> {
        let spec = &self.cfg.spec;
        let (d, o) = (spec.d_in, spec.d_out);
        if x.is_empty() || !x.len().is_multiple_of(d) {
            bail!("batch is not [tokens, {d}]");
        }
        let b = x.len() / d;
        let target = target.unwrap_or(x);
        if target.len() != b * o {
            bail!("targets are not [{b}, {o}]");
        }
        if b < 2 {
            bail!("a batch needs at least 2 tokens (BatchNorm)");
        }
        if let Some(i) = x.iter().chain(target).position(|v| !v.is_finite()) {
            bail!("batch holds a non-finite value at flat index {i}");
        }
        let xs: Vec<f32> = x.iter().map(|v| v * self.cfg.input_scale).collect();
        let ys: Vec<f32> = target.iter().map(|v| v * self.cfg.output_scale).collect();
        Ok((xs, ys))
    }

    /// The loss of raw `x` against `target` and its gradients, without a step (for checks).
    pub fn gradients(&mut self, x: &[f32], target: Option<&[f32]>) -> Result<(Loss, &Params)> {
        let (xs, ys) = self.scaled(x, target)?;
        let (loss, _) = self.loss_and_gradients(&xs, &ys)?;
        Ok((loss, self.scratch.grads.as_ref().expect("gradients were just computed")))
    }

    /// The routes of the last batch.
    pub fn last_routes(&self) -> &Routes {
        &self.scratch.forward.routes
    }

    /// One step on raw `x` (`[B, d_in]`) towards raw `target` (`[B, d_out]`; `None`: `x`).
    pub fn train_step(&mut self, x: &[f32], target: Option<&[f32]>) -> Result<StepStats> {
        phases::start();
        let (xs, ys) = self.scaled(x, target)?;
        phases::mark("scale");
        let b = xs.len() / self.cfg.spec.d_in;
        let (loss, norm) = self.loss_and_gradients(&xs, &ys)?;
        let grads = self.scratch.grads.as_ref().expect("gradients were just computed");
        adam(&mut self.params, grads, &mut self.state, self.cfg.lr);
        phases::mark("adam");

        // BatchNorm running statistics from this batch's (as PyTorch, unbiased variance).
        let count = b * self.cfg.spec.experts;
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        for r in 0..2 {
            for h in 0..self.cfg.spec.heads {
                let (mean, var) = (&mut self.running.mean[r][h], &mut self.running.var[r][h]);
                *mean = (1.0 - BN_MOMENTUM) * *mean + BN_MOMENTUM * norm.mean[r][h];
                *var = (1.0 - BN_MOMENTUM) * *var + BN_MOMENTUM * norm.var[r][h] * unbiased;
            }
        }

        let codes = sparse::codes(&self.scratch.forward.routes, self.cfg.spec.experts);
        let mut fired = vec![false; self.state.since_fired.len()];
        codes.feature.iter().for_each(|&f| fired[f as usize] = true);
        for (s, f) in self.state.since_fired.iter_mut().zip(fired) {
            *s = if f { 0 } else { *s + b as u64 };
        }
        let dead = self.state.since_fired.iter().filter(|&&s| s >= self.cfg.dead_tokens).count();
        phases::mark("codes");
        phases::report();
        self.state.step += 1;
        self.state.tokens += b as u64;
        Ok(StepStats {
            fvu: loss.fvu as f32,
            l0: codes.nnz() as f32 / b as f32,
            aux_loss: loss.aux as f32,
            multi_fvu: 0.0,
            dead_fraction: dead as f32 / self.state.since_fired.len() as f32,
        })
    }
}

/// Adam (PyTorch's formulas) on every weight, element by element.
fn adam(params: &mut Params, grads: &Params, state: &mut MonetState, lr: f32) {
    const CHUNK: usize = 1 << 14;
    let t = (state.step + 1) as i32;
    let (bc1, bc2) = ((1.0 - BETA1.powi(t)) as f32, (1.0 - BETA2.powi(t)) as f32);
    let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, EPS as f32);
    let tensors = params.tensors_mut().into_iter().zip(grads.tensors());
    for ((w, g), (m, v)) in tensors.zip(state.m.tensors_mut().into_iter().zip(state.v.tensors_mut())) {
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| {
                for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *w -= lr * (*m / bc1) / ((*v / bc2).sqrt() + eps);
                }
            });
    }
}

/// Monet as a job drives it (`train-monet`).
impl Fit for MonetTrainer {
    type Config = MonetTrainConfig;
    const CHECKPOINT_FILES: &'static [&'static str] =
        &["cfg.json", "monet_weights.safetensors", "state.safetensors", "state.json"];
    const FINAL_FILES: &'static [&'static str] = &["cfg.json", "monet_weights.safetensors"];
    const ACTIVE: &'static str = "experts/token";

    fn needs(cfg: &MonetTrainConfig) -> Needs {
        Needs { d_in: cfg.spec.d_in, d_out: cfg.spec.d_out, batch: cfg.batch, seed: cfg.seed, grad: false }
    }

    fn with_scales(mut cfg: MonetTrainConfig, input: f32, output: f32) -> MonetTrainConfig {
        cfg.input_scale = input;
        cfg.output_scale = output;
        cfg
    }

    fn validate(cfg: &MonetTrainConfig) -> Result<()> {
        cfg.validate()
    }

    fn start(cfg: MonetTrainConfig) -> Result<MonetTrainer> {
        MonetTrainer::new(cfg)
    }

    fn config(&self) -> &MonetTrainConfig {
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
        super::io::save(&self.monet()?, meta, Some(&self.cfg), dir)?;
        super::io::save_state(&self.cfg, &self.state, resume, dir)
    }

    fn load_checkpoint(dir: &Path) -> Result<(MonetTrainer, Value)> {
        let (monet, _) = super::io::load(dir)?;
        let (cfg, state, resume) = super::io::load_state(dir, &monet)?;
        cfg.validate()?;
        if cfg.spec != monet.spec {
            bail!("checkpoint in {} holds a different Monet than its state describes", dir.display());
        }
        let moments = Some((state.m, state.v));
        let trainer =
            MonetTrainer::resume(cfg, &monet, moments, state.since_fired, state.step, state.tokens)?;
        Ok((trainer, resume))
    }

    fn finish(&self, meta: &SaeMeta, dir: &Path) -> Result<Arc<dyn Dictionary>> {
        let raw = self.monet()?.folded(self.cfg.input_scale, self.cfg.output_scale)?;
        super::io::save(&raw, meta, Some(&self.cfg), dir)?;
        Ok(Arc::new(raw))
    }

    fn listing(&self) -> (&'static str, String, usize) {
        let variant = match self.cfg.spec.decomposition {
            super::Decomposition::Horizontal => "hd",
            super::Decomposition::Vertical => "vd",
        };
        ("monet", variant.to_string(), self.cfg.spec.n_experts())
    }
}
