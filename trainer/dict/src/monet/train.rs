//! Fitting a Monet layer: one step is the router (BatchNorm on the batch's statistics), the
//! factorised forward, the loss FVU + α_u·uniformity + α_a·ambiguity ([`super::aux`], averaged
//! over the two sub-routers), candle's autograd, and Adam (PyTorch's formulas, written here over
//! the tensors so that its moments can be checkpointed: candle-nn's AdamW keeps them private).
//! Then the BatchNorm running statistics move towards the batch's, and the experts' firing
//! counters are updated from the sparse codes.
//!
//! Like the SAE trainer, it works on activations scaled to mean norm √d (inputs by
//! `input_scale`, targets by `output_scale`); the final files are folded back
//! ([`Monet::folded`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Monet, MonetSpec, aux};
use crate::Dictionary;
use crate::io::SaeMeta;
use crate::job::{Fit, Needs};
use crate::train::{StepStats, total_variance};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

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
    /// Adam's (m, v) per variable, in [`Monet::vars`] order.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Training tokens since each expert last had a non-zero gate.
    pub since_fired: Vec<u64>,
}

pub struct MonetTrainer {
    pub cfg: MonetTrainConfig,
    pub monet: Monet,
    pub state: MonetState,
}

impl MonetTrainer {
    pub fn new(cfg: MonetTrainConfig) -> Result<MonetTrainer> {
        cfg.validate()?;
        let monet = Monet::init(cfg.spec.clone(), cfg.seed)?;
        let moments = monet
            .vars()
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        let n = cfg.spec.n_experts();
        let state = MonetState { step: 0, tokens: 0, moments, since_fired: vec![0; n] };
        Ok(MonetTrainer { cfg, monet, state })
    }

    /// One step on raw `x` (`[B, d_in]`) towards raw `target` (`[B, d_out]`; `None`: `x`).
    pub fn train_step(&mut self, x: &[f32], target: Option<&[f32]>) -> Result<StepStats> {
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
        if let Some(i) = x.iter().chain(target).position(|v| !v.is_finite()) {
            bail!("batch holds a non-finite value at flat index {i}");
        }
        let xs: Vec<f32> = x.iter().map(|v| v * self.cfg.input_scale).collect();
        let ys: Vec<f32> = target.iter().map(|v| v * self.cfg.output_scale).collect();
        let denom = total_variance(&ys, o).max(f64::MIN_POSITIVE);
        let xt = Tensor::from_vec(xs, (b, d), &Device::Cpu)?;
        let yt = Tensor::from_vec(ys, (b, o), &Device::Cpu)?;

        let (g1, g2) = self.monet.router.route(&xt, true)?;
        let y = self.monet.forward_with(&xt, &g1, &g2)?;
        let fvu = ((y - &yt)?.sqr()?.sum_all()? / denom)?;
        let uniformity = ((aux::uniformity(&g1)? + aux::uniformity(&g2)?)? * 0.5)?;
        let ambiguity = ((aux::ambiguity(&g1)? + aux::ambiguity(&g2)?)? * 0.5)?;
        let aux_loss = ((uniformity * self.cfg.uniformity_alpha as f64)?
            + (ambiguity * self.cfg.ambiguity_alpha as f64)?)?;
        let loss = (&fvu + &aux_loss)?;
        let grads = loss.backward()?;

        // Adam.
        let t = (self.state.step + 1) as i32;
        let (bc1, bc2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        let lr = self.cfg.lr as f64;
        // Detached throughout: a gradient still refers to the forward graph, and moments built
        // from it would chain every step's graph to the next (memory grows without bound).
        for (var, (m, v)) in self.monet.vars().iter().zip(self.state.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            *m = ((&*m * BETA1)? + (&g * (1.0 - BETA1))?)?.detach();
            *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?.detach();
            let denom = ((&*v / bc2)?.sqrt()? + EPS)?;
            let update = ((&*m / bc1)? / denom)?.affine(lr, 0.0)?;
            var.set(&(var.as_tensor() - update)?.detach())?;
        }
        self.monet.router.update_stats(&xt)?;

        let codes = self.monet.codes(&g1, &g2)?;
        let mut fired = vec![false; self.state.since_fired.len()];
        codes.feature.iter().for_each(|&f| fired[f as usize] = true);
        for (s, f) in self.state.since_fired.iter_mut().zip(fired) {
            *s = if f { 0 } else { *s + b as u64 };
        }
        let dead = self.state.since_fired.iter().filter(|&&s| s >= self.cfg.dead_tokens).count();
        self.state.step += 1;
        self.state.tokens += b as u64;
        let fvu = fvu.to_scalar::<f32>()?;
        Ok(StepStats {
            fvu,
            l0: codes.nnz() as f32 / b as f32,
            aux_loss: aux_loss.to_scalar::<f32>()?,
            multi_fvu: 0.0,
            dead_fraction: dead as f32 / self.state.since_fired.len() as f32,
        })
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
        super::io::save(&self.monet, meta, Some(&self.cfg), dir)?;
        super::io::save_state(&self.cfg, &self.state, resume, dir)
    }

    fn load_checkpoint(dir: &Path) -> Result<(MonetTrainer, Value)> {
        let (monet, _) = super::io::load(dir)?;
        let (cfg, state, resume) = super::io::load_state(dir, &monet)?;
        cfg.validate()?;
        if cfg.spec != monet.spec {
            bail!("checkpoint in {} holds a different Monet than its state describes", dir.display());
        }
        Ok((MonetTrainer { cfg, monet, state }, resume))
    }

    fn finish(&self, meta: &SaeMeta, dir: &Path) -> Result<Arc<dyn Dictionary>> {
        let raw = self.monet.folded(self.cfg.input_scale, self.cfg.output_scale)?;
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
